#!/usr/bin/env python3
"""WMT14 En–De, the GNMT paper setup (Wu et al. 2016): 8+8 × 1024 GNMT, 32k joint sentencepiece.

    python recipes/wmt14_en_de.py                        # configs/gnmt_paper.yaml, En→De
    python recipes/wmt14_en_de.py --src de --tgt en
    python recipes/wmt14_en_de.py --end-stage encode     # only fetch and prepare the data

Stages: download → tokenizer → encode → train → translate → score. Training text: the hub
dataset `wmt/wmt14`, config de-en (4.5M pairs, streamed into plain text; needs internet access).
Validation: newstest2012 + newstest2013, as in the paper; test: newstest2014, both from the
OPUS-MT-testsets files (offline: NMT_MIRROR=../shared/corpora). Scores: cased detokenized
sacreBLEU and `-lc -tok intl` BLEU. Finished stages are skipped on a rerun (markers in
`RUN/.done/`); extra `section.key=value` arguments override the config.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HubSetup, hub_main  # noqa: E402

SETUP = HubSetup(
    name="wmt14",
    title="WMT14",
    hub="wmt14",
    config="configs/gnmt_paper.yaml",
    src="en",
    tgt="de",
    test_corpus="wmt",
    test_sets=("newstest2014",),
    valid_sets=("newstest2012", "newstest2013"),
)


def main(argv=None) -> int:
    return hub_main(SETUP, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
