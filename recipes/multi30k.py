#!/usr/bin/env python3
"""Multi30k recipe: download → sentencepiece + encode → train → translate → score.

    python recipes/multi30k.py                       # small GNMT preset, En→De
    python recipes/multi30k.py --preset demo         # `make demo`: ~5 minutes on a CPU, 1 test set
    python recipes/multi30k.py --src de --tgt en --config configs/gnmt_small.yaml
    python recipes/multi30k.py --start-stage translate   # redo from a stage on

Each stage writes a completion marker (`RUN/.done/STAGE`) only after its outputs are complete,
and is skipped when the marker is there, so an interrupted stage is redone (training resumes
from its `last` checkpoint). Offline: `NMT_MIRROR=../shared/corpora` reads the local mirror.
Extra `section.key=value` arguments, anywhere on the line, override the config.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, Recipe, parser, run_recipe  # noqa: E402

STAGES = ("download", "prepare", "train", "translate", "score")
PRESETS = {"demo": ROOT / "configs/demo.yaml", "small": ROOT / "configs/gnmt_small.yaml"}
TEST_SETS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco")


def _parse(argv):
    p = parser(__doc__, STAGES, "en", "de", "1 5; demo: 5")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    return p.parse_args(argv)


class Multi30k(Recipe):
    stages = STAGES
    title = "Multi30k"
    corpus = test_corpus = "multi30k"
    valid_name = "val"

    def __init__(self, args):
        from nmt import corpora

        name = args.preset if not args.config else Path(args.config).stem
        run_dir = args.run_dir or ROOT / "runs" / f"multi30k_{args.src}_{args.tgt}_{name}"
        available = corpora.get_corpus("multi30k").split_names([args.src, args.tgt])
        demo = args.preset == "demo" and not args.config
        # the demo keeps to its few minutes: one test set (1,000 sentences), beam 5
        tests = args.test_sets or [t for t in TEST_SETS[: 1 if demo else None] if t in available]
        super().__init__(args, run_dir, tests, args.beam_sizes or ([5] if demo else [1, 5]))

    def config_file(self) -> Path:
        return Path(self.args.config) if self.args.config else PRESETS[self.args.preset]

    def download(self):
        from nmt import corpora

        splits = ["train", "val", *self.test_sets]
        corpora.download("multi30k", self.langs, self.raw, splits=splits)

    def prepare(self):
        from nmt import data

        data.prepare(self.config())


def main(argv=None) -> int:
    return run_recipe(lambda: Multi30k(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
