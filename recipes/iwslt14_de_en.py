#!/usr/bin/env python3
"""IWSLT14 De–En (TED talks): a mid-size GNMT, 10k joint sentencepiece.

    python recipes/iwslt14_de_en.py                      # configs/gnmt_iwslt14.yaml, De→En
    python recipes/iwslt14_de_en.py --src en --tgt de
    python recipes/iwslt14_de_en.py --test-sets tst2010 tst2011 tst2012 test

Stages: download → tokenizer → encode → train → translate → score. Training and validation
text: the hub dataset `bbaaaa/iwslt14-de-en` (read from the hub's parquet export; needs internet
access). Test sets: the IWSLT14 dev/test sets of the local mirror (NMT_MIRROR must point at it:
they have no public address); `test` is the 6,750-line set fairseq's IWSLT14 results use
(dev2010, dev2012, tst2010-2012), here untokenized and cased. Scores: cased detokenized
sacreBLEU and `-lc -tok intl` BLEU (close to, not the same as, the tokenized lowercased BLEU of
fairseq's recipe). Finished stages are skipped on a rerun (markers in `RUN/.done/`); extra
`section.key=value` arguments override the config.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import HubSetup, hub_main  # noqa: E402

SETUP = HubSetup(
    name="iwslt14",
    title="IWSLT14",
    hub="iwslt14",
    config="configs/gnmt_iwslt14.yaml",
    src="de",
    tgt="en",
    test_corpus="iwslt14",
    test_sets=("test",),
    beams=(1, 5),
)


def main(argv=None) -> int:
    return hub_main(SETUP, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
