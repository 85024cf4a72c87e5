#!/usr/bin/env python3
"""Multi30k recipe: download → sentencepiece + encode → train → translate → score.

    python recipes/multi30k.py                       # small GNMT preset, En→De
    python recipes/multi30k.py --preset demo         # `make demo`: a few minutes on a CPU
    python recipes/multi30k.py --src de --tgt en --config configs/gnmt_small.yaml
    python recipes/multi30k.py --start-stage translate   # redo from a stage on

Each stage writes a completion marker (`RUN/.done/STAGE`) only after its outputs are complete,
and is skipped when the marker is there, so an interrupted stage is redone (training resumes
from its `last` checkpoint). Offline: `NMT_MIRROR=../shared/corpora` reads the local mirror.
Extra `section.key=value` arguments override the config.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("download", "prepare", "train", "translate", "score")
PRESETS = {"demo": ROOT / "configs/demo.yaml", "small": ROOT / "configs/gnmt_small.yaml"}
TEST_SETS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default="en", help="source language (default en)")
    p.add_argument("--tgt", default="de", help="target language (default de)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="small")
    p.add_argument("--config", help="config file (instead of --preset)")
    p.add_argument("--run-dir", help="default: runs/multi30k_SRC_TGT_PRESET")
    p.add_argument(
        "--start-stage",
        choices=STAGES,
        default=None,
        help="redo this stage and every later one (default: resume at the first stage "
        "not yet done)",
    )
    p.add_argument(
        "--beam-sizes",
        type=int,
        nargs="+",
        default=None,
        help="beam sizes to translate with (default: 1 5; demo: 5)",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


class Recipe:
    def __init__(self, args):
        from nmt import corpora

        self.args = args
        name = args.preset if not args.config else Path(args.config).stem
        self.run_dir = Path(
            args.run_dir or ROOT / "runs" / f"multi30k_{args.src}_{args.tgt}_{name}"
        )
        self.raw = self.run_dir / "raw"
        self.done = self.run_dir / ".done"
        corpus = corpora.get_corpus("multi30k")
        available = corpus.split_names([args.src, args.tgt])
        self.test_sets = [t for t in TEST_SETS if t in available]
        self.beams = args.beam_sizes or (
            [5] if args.preset == "demo" and not args.config else [1, 5]
        )

    def config(self):
        from nmt.config import load_config

        r, a = self.raw, self.args
        paths = [
            "data.corpus=multi30k",
            f"data.src_lang={a.src}",
            f"data.tgt_lang={a.tgt}",
            f"data.train_src={r}/train.{a.src}",
            f"data.train_tgt={r}/train.{a.tgt}",
            f"data.valid_src={r}/val.{a.src}",
            f"data.valid_tgt={r}/val.{a.tgt}",
            f"data.dir={self.run_dir}/data",
            f"train.out_dir={self.run_dir}/model",
        ]
        return load_config(a.config or PRESETS[a.preset], paths + list(a.overrides))

    # each stage: do the work; the marker is written by `run` only after it returns
    def download(self):
        from nmt import corpora

        corpora.download(
            "multi30k",
            [self.args.src, self.args.tgt],
            self.raw,
            splits=["train", "val", *self.test_sets],
        )

    def prepare(self):
        from nmt import data

        data.prepare(self.config())

    def train(self):
        from nmt import training

        cfg = self.config()
        resume = (Path(cfg.train.out_dir) / "last.pt").exists()
        summary = training.train(cfg, resume=resume)
        if summary["stop"] in ("SIGINT", "SIGTERM"):
            raise KeyboardInterrupt

    def translate(self):
        from nmt.translator import Translator, translate_stream

        model = self.run_dir / "model" / "best.pt"
        translator = Translator.from_checkpoint(model)
        (self.run_dir / "hyps").mkdir(parents=True, exist_ok=True)
        for test in self.test_sets:
            for beam in self.beams:
                start = time.perf_counter()
                n = translate_stream(
                    translator,
                    str(self.raw / f"{test}.{self.args.src}"),
                    str(self._hyp(test, beam)),
                    beam_size=beam,
                )
                secs = time.perf_counter() - start
                print(
                    f"translated {test} (beam {beam}): {n} lines in {secs:.1f} s "
                    f"({n / secs:.0f} sentences/s)",
                    file=sys.stderr,
                )

    def _hyp(self, test, beam):
        return self.run_dir / "hyps" / f"{test}.beam{beam}.{self.args.tgt}"

    def score(self):
        from nmt.evaluation import score_files

        rows = []
        for test in self.test_sets:
            for beam in self.beams:
                ref = self.raw / f"{test}.{self.args.tgt}"
                result = score_files(str(self._hyp(test, beam)), [str(ref)])
                rows.append(
                    {
                        "test": test,
                        "beam": beam,
                        "bleu": result["bleu"]["score"],
                        "chrf": result["chrf"]["score"],
                        "signature": result["bleu"]["signature"],
                    }
                )
        (self.run_dir / "scores.json").write_text(json.dumps(rows, indent=1))
        self._print_table(rows)

    def _print_table(self, rows):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"Multi30k {self.args.src}→{self.args.tgt} ({self.run_dir.name})")
        for col in ("test set", "beam", "BLEU", "chrF"):
            table.add_column(col, justify="left" if col == "test set" else "right")
        for r in rows:
            table.add_row(r["test"], str(r["beam"]), f"{r['bleu']:.1f}", f"{r['chrf']:.1f}")
        console = Console()
        console.print(table)
        console.print(f"sacreBLEU: {rows[0]['signature']}" if rows else "")
        model = self.run_dir / "model" / "best.pt"
        console.print(
            "Translate your own file with this model:\n"
            f"  .venv/bin/nmt translate {os.path.relpath(model)} -i FILE -o OUT"
        )

    def run(self):
        start = STAGES.index(self.args.start_stage) if self.args.start_stage else len(STAGES)
        self.done.mkdir(parents=True, exist_ok=True)
        redo = False  # once a stage runs, every later stage runs too
        for i, stage in enumerate(STAGES):
            marker = self.done / stage
            if i < start and marker.exists() and not redo:
                print(f"[{stage}] done already, skipped", file=sys.stderr)
                continue
            redo = True
            marker.unlink(missing_ok=True)
            t0 = time.perf_counter()
            print(f"[{stage}] ...", file=sys.stderr, flush=True)
            getattr(self, stage)()
            marker.write_text(f"{time.time():.0f}\n")
            print(f"[{stage}] done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def main(argv=None) -> int:
    args = _parse(argv)
    sys.path.insert(0, str(ROOT))
    from nmt.errors import NmtError

    try:
        Recipe(args).run()
    except NmtError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
