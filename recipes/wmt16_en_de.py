#!/usr/bin/env python3
"""WMT16 En–De, the NVIDIA / MLPerf GNMT v2 setup: 4+4 × 1024 GNMT, 32k joint sentencepiece.

    python recipes/wmt16_en_de.py                        # configs/gnmt_v2.yaml, En→De
    python recipes/wmt16_en_de.py --src de --tgt en
    python recipes/wmt16_en_de.py --end-stage encode     # only fetch and prepare the data
    python recipes/wmt16_en_de.py --start-stage translate --beam-sizes 1 5

Stages: download → tokenizer → encode → train → translate → score. Training text: the hub
dataset `wmt/wmt16`, config de-en (4.5M pairs, streamed into plain text; needs internet access).
Validation: newstest2013; test: newstest2014 (3,003 lines), both from the OPUS-MT-testsets files
(offline: NMT_MIRROR=../shared/corpora). Scores: cased detokenized sacreBLEU, and the
`-lc -tok intl` BLEU that GNMT v2 / MLPerf quote (target 24.0 on newstest2014). A stage's marker
(`RUN/.done/STAGE`) is written only after its outputs are complete; a rerun skips finished
stages, and training resumes from its `last` checkpoint. Extra `section.key=value` arguments
override the config.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HubSetup, hub_main  # noqa: E402

SETUP = HubSetup(
    name="wmt16",
    title="WMT16",
    hub="wmt16",
    config="configs/gnmt_v2.yaml",
    src="en",
    tgt="de",
    test_corpus="wmt",
    test_sets=("newstest2014",),
    valid_sets=("newstest2013",),
)


def main(argv=None) -> int:
    return hub_main(SETUP, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
