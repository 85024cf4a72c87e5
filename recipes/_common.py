"""What the recipes share: arguments, the stage runner, and the train, translate, score stages.

A recipe is a `Recipe` subclass that names its stages and adds one method per stage it owns
(download, and prepare or tokenizer + encode); train, translate and score live here. `run` writes
a stage's completion marker (`RUN/.done/STAGE`) only after the stage returns, and skips a stage
whose marker is there, unless --start-stage names it or an earlier one, or an earlier stage ran:
once a stage runs, every later one runs too. --end-stage stops after a stage. Training draws
`RUN/curves.png` (nmt.plots); the score stage prints the table, five test sentences with their
translation and reference, the path of the curves, and last how to translate your own file.

`HubRecipe` is a recipe whose training text comes from a Hugging Face hub dataset (streamed into
plain text files by nmt.data.export_hub_split) and whose test sets come from an nmt.corpora
definition (read from the local mirror when NMT_MIRROR is set).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (key in scores.json, lowercase, sacreBLEU tokenizer)
BLEU_CASED = ("bleu", False, "13a")  # detokenized, cased: sacreBLEU's default
BLEU_LC_INTL = ("bleu_lc_intl", True, "intl")  # `-lc -tok intl`: what GNMT v2 / MLPerf quote
BLEU_LABELS = {"bleu": "BLEU", "bleu_lc_intl": "BLEU lc intl"}
EXAMPLES = 5  # test sentences printed with their translation and reference at the end


def parser(doc: str, stages, src: str, tgt: str, beams: str) -> argparse.ArgumentParser:
    """The arguments every recipe takes; `doc` is the recipe's module docstring. Config overrides
    (`section.key=value`) may stand anywhere, as in `nmt train`."""
    from nmt.cli import Parser, add_overrides

    p = Parser(
        description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--src", default=src, help=f"source language (default {src})")
    p.add_argument("--tgt", default=tgt, help=f"target language (default {tgt})")
    stage_args(p, stages, "runs/RECIPE_SRC_TGT_CONFIG")
    p.add_argument("--test-sets", nargs="+", help="test sets to translate (default: the recipe's)")
    p.add_argument(
        "--beam-sizes",
        type=int,
        nargs="+",
        default=None,
        help=f"beam sizes to translate with (default: {beams})",
    )
    add_overrides(p)
    return p


def stage_args(p: argparse.ArgumentParser, stages, run_dir: str) -> None:
    """--config, --run-dir (default `run_dir`), --start-stage and --end-stage."""
    p.add_argument("--config", help="config file (default: the recipe's)")
    p.add_argument("--run-dir", help=f"output folder (default: {run_dir})")
    p.add_argument(
        "--start-stage",
        choices=stages,
        help="redo this stage and every later one (default: the first stage not done)",
    )
    p.add_argument("--end-stage", choices=stages, default=stages[-1], help="stop after this stage")


class Recipe:
    """Stages of one experiment in `run_dir`: raw text in `raw/`, markers in `.done/`."""

    stages: tuple[str, ...] = ()
    title = ""  # table title
    corpus = ""  # data.corpus of the config
    test_corpus = ""  # the nmt.corpora definition holding the test sets
    valid_name = "valid"  # raw/<valid_name>.<lang>
    bleu: tuple = (BLEU_CASED,)
    init_from: Path | None = None  # a checkpoint whose weights start the run (fine-tuning)

    def __init__(self, args, run_dir: Path, test_sets: list[str], beams: list[int]):
        self.args, self.run_dir = args, Path(run_dir)
        self.raw, self.done = self.run_dir / "raw", self.run_dir / ".done"
        self.langs = [args.src, args.tgt]
        self.test_sets, self.beams = list(test_sets), list(beams)

    def config_file(self) -> Path:
        raise NotImplementedError

    def config(self):
        from nmt.config import load_config

        r, (src, tgt) = self.raw, self.langs
        paths = [
            f"data.corpus={self.corpus}",
            f"data.src_lang={src}",
            f"data.tgt_lang={tgt}",
            f"data.train_src={r}/train.{src}",
            f"data.train_tgt={r}/train.{tgt}",
            f"data.valid_src={r}/{self.valid_name}.{src}",
            f"data.valid_tgt={r}/{self.valid_name}.{tgt}",
            f"data.dir={self.run_dir}/data",
            f"train.out_dir={self.run_dir}/model",
        ]
        overrides = paths + list(self.args.overrides)
        return load_config(self.config_file(), overrides, base=self.base_config())

    def base_config(self) -> dict | None:
        """Settings under the config file's (a checkpoint's config, to fine-tune it); None: the
        defaults."""
        return None

    def download_test_sets(self) -> dict:
        """{test set: {lang: text file}}, fetched (or verified) into raw/."""
        from nmt import corpora

        return corpora.download(self.test_corpus, self.langs, self.raw, splits=self.test_sets)

    # -- shared stages ------------------------------------------------------------------------

    def train(self):
        from nmt import training

        cfg = self.config()
        resume = (Path(cfg.train.out_dir) / "last.pt").exists()
        init_from = None if resume else self.init_from  # a resumed run has its weights already
        summary = training.train(cfg, resume=resume, init_from=init_from)
        if summary["stop"].by_signal:
            raise KeyboardInterrupt
        self.draw_curves()

    def draw_curves(self):
        """RUN/curves.png from the training log (a picture: its failure only warns)."""
        from nmt import plots
        from nmt.errors import NmtError

        try:
            path = plots.curves(self.run_dir, self.curves_path)
        except (NmtError, OSError) as e:
            print(f"warning: no learning curves: {e}", file=sys.stderr)
            return
        print(f"learning curves: {path}", file=sys.stderr)

    @property
    def curves_path(self) -> Path:
        return self.run_dir / "curves.png"

    def translate(self):
        from nmt.translator import Translator, translate_stream

        tests = self.download_test_sets()  # verified copies are kept: no network needed
        translator = Translator.from_checkpoint(self.run_dir / "model" / "best.pt")
        (self.run_dir / "hyps").mkdir(parents=True, exist_ok=True)
        for test in self.test_sets:
            for beam in self.beams:
                start = time.perf_counter()
                src = tests[test][self.args.src]
                n = translate_stream(
                    translator, str(src), str(self._hyp(test, beam)), beam_size=beam
                )
                secs = time.perf_counter() - start
                print(
                    f"translated {test} (beam {beam}): {n} lines in {secs:.1f} s "
                    f"({n / secs:.0f} sentences/s)",
                    file=sys.stderr,
                )

    def _hyp(self, test: str, beam: int) -> Path:
        return self.run_dir / "hyps" / f"{test}.beam{beam}.{self.args.tgt}"

    def score(self):
        from nmt.evaluation import score_files
        from nmt.textio import atomic_write_text

        tests = self.download_test_sets()
        rows = []
        for test in self.test_sets:
            ref = str(tests[test][self.args.tgt])
            for beam in self.beams:
                row = {"test": test, "beam": beam}
                for key, lowercase, tokenize in self.bleu:
                    result = score_files(
                        str(self._hyp(test, beam)), [ref], lowercase=lowercase, tokenize=tokenize
                    )
                    row[key] = result["bleu"]["score"]
                    row["signature" + key.removeprefix("bleu")] = result["bleu"]["signature"]
                row["chrf"] = result["chrf"]["score"]
                rows.append(row)
        atomic_write_text(self.run_dir / "scores.json", json.dumps(rows, indent=1))
        self._print_table(rows, tests)

    def _print_table(self, rows, tests=None):
        from rich.console import Console
        from rich.table import Table

        src, tgt = self.langs
        table = Table(title=f"{self.title} {src}→{tgt} ({self.run_dir.name})")
        keys = [key for key, _, _ in self.bleu]
        table.add_column("test set", justify="left")
        for col in ["beam", *(BLEU_LABELS[k] for k in keys), "chrF"]:
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                r["test"], str(r["beam"]), *(f"{r[k]:.1f}" for k in keys), f"{r['chrf']:.1f}"
            )
        console = Console()
        console.print(table)
        for key in keys if rows else ():
            signature = rows[0]["signature" + key.removeprefix("bleu")]
            console.print(f"sacreBLEU ({BLEU_LABELS[key]}): {signature}")
        if rows and tests:  # the first test set, at its largest beam
            row = max((r for r in rows if r["test"] == rows[0]["test"]), key=lambda r: r["beam"])
            self._print_examples(console, row, tests[row["test"]])
        if self.curves_path.is_file():
            console.print(f"Learning curves: {os.path.relpath(self.curves_path)}", soft_wrap=True)
        model = self.run_dir / "model" / "best.pt"
        nmt_bin = Path(sys.executable).with_name("nmt")  # the nmt of the Python running this
        command = os.path.relpath(nmt_bin) if nmt_bin.exists() else "nmt"
        console.print(
            "Translate your own file with this model:\n"
            f"  {command} translate {os.path.relpath(model)} -i FILE -o OUT",
            soft_wrap=True,  # a long path must stay one line that can be pasted
        )

    def _print_examples(self, console, row: dict, files: dict, count: int = EXAMPLES):
        """`count` sentences of the test set of `row`, spread over it, each with its translation
        (at the beam of `row`) and its reference."""
        from nmt.textio import read_lines

        src, tgt = self.langs
        sources, refs = read_lines(files[src]), read_lines(files[tgt])
        hyps = read_lines(self._hyp(row["test"], row["beam"]))
        if not sources or not len(sources) == len(refs) == len(hyps):
            return
        console.print(f"\n{count} sentences of {row['test']} (beam {row['beam']}):")
        for i in sorted({k * len(sources) // count for k in range(count)}):
            for label, text in (
                ("source", sources[i]),
                ("translation", hyps[i]),
                ("reference", refs[i]),
            ):
                console.print(
                    f"  {label:<12} {text}", markup=False, highlight=False, soft_wrap=True
                )
            console.print()

    # -- the runner ---------------------------------------------------------------------------

    def run(self):
        from nmt.errors import UsageError

        first = self.args.start_stage
        start = self.stages.index(first) if first else len(self.stages)
        end = self.stages.index(self.args.end_stage)
        if first and end < start:
            raise UsageError(
                f"--end-stage {self.args.end_stage} comes before --start-stage "
                f"{self.args.start_stage}; stages: {' → '.join(self.stages)}"
            )
        self.config()  # a config mistake fails now, not after a long download
        self.done.mkdir(parents=True, exist_ok=True)
        redo = False  # once a stage runs, every later stage runs too
        for i, stage in enumerate(self.stages[: end + 1]):
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


@dataclass(frozen=True)
class HubSetup:
    """What differs between the hub-data recipes."""

    name: str  # run folder prefix
    title: str
    hub: str  # nmt.corpora.HUB_CORPORA name: the training data
    config: str  # default config, relative to the repository root
    src: str
    tgt: str
    test_corpus: str  # nmt.corpora name: the test (and validation) sets
    test_sets: tuple[str, ...]
    valid_sets: tuple[str, ...] = ()  # from test_corpus, concatenated; () = the hub's validation
    beams: tuple[int, ...] = (5,)


class HubRecipe(Recipe):
    """download (hub train text, test sets) → tokenizer → encode → train → translate → score."""

    stages = ("download", "tokenizer", "encode", "train", "translate", "score")
    bleu = (BLEU_CASED, BLEU_LC_INTL)

    def __init__(self, setup: HubSetup, args):
        from nmt import corpora
        from nmt.errors import UsageError

        hub = corpora.get_hub_corpus(setup.hub)
        if args.src == args.tgt or not {args.src, args.tgt} <= set(hub.langs):
            raise UsageError(
                f"{setup.name}: --src and --tgt must be two of {', '.join(hub.langs)}, "
                f"found {args.src} and {args.tgt}"
            )
        self.setup, self.hub = setup, hub
        self.title, self.corpus, self.test_corpus = setup.title, setup.hub, setup.test_corpus
        tests = args.test_sets or list(setup.test_sets)
        known = corpora.get_corpus(setup.test_corpus).split_names([args.src, args.tgt])
        unknown = [t for t in [*tests, *setup.valid_sets] if t not in known]
        if unknown:
            raise UsageError(
                f"{setup.test_corpus}: unknown test set {', '.join(unknown)}; "
                f"test sets: {', '.join(known)}"
            )
        stem = Path(args.config).stem if args.config else Path(setup.config).stem
        run_dir = args.run_dir or ROOT / "runs" / f"{setup.name}_{args.src}_{args.tgt}_{stem}"
        super().__init__(args, run_dir, tests, args.beam_sizes or list(setup.beams))

    def config_file(self) -> Path:
        return Path(self.args.config) if self.args.config else ROOT / self.setup.config

    def download(self):
        self._export("train", "train")
        if self.setup.valid_sets:
            self._valid_from_test_corpus()
        else:
            self._export("validation", "valid")
        self.download_test_sets()

    def tokenizer(self):
        from nmt import data

        data.prepare_tokenizer(self.config())

    def encode(self):
        from nmt import data

        data.prepare(self.config())  # keeps the tokenizer of the previous stage

    def _export(self, split: str, name: str):
        """raw/<name>.<lang> from the hub split, kept if an earlier export of it completed."""
        from nmt import data
        from nmt.textio import atomic_write_text

        paths = [self.raw / f"{name}.{lang}" for lang in self.langs]
        stamp = self.raw / f".{name}.export.json"
        what = {"hub": self.hub.path, "revision": self.hub.revision, "config": self.hub.config}
        what.update({"data_dir": self.hub.data_dir, "split": split, "langs": self.langs})
        if _read_stamp(stamp) == {"what": what, "sizes": _sizes(paths)}:
            print(f"{self.hub.name} {split}: kept {paths[0]}, {paths[1]}", file=sys.stderr)
            return
        stamp.unlink(missing_ok=True)
        data.export_hub_split(self.hub.name, split, *self.langs, *paths)
        atomic_write_text(stamp, json.dumps({"what": what, "sizes": _sizes(paths)}))

    def _valid_from_test_corpus(self):
        from nmt import corpora

        files = corpora.download(
            self.test_corpus, self.langs, self.raw, splits=list(self.setup.valid_sets)
        )
        for lang in self.langs:
            parts = [files[s][lang] for s in self.setup.valid_sets]
            _concat(parts, self.raw / f"{self.valid_name}.{lang}")


def _sizes(paths) -> list:
    return [p.stat().st_size if p.is_file() else None for p in paths]


def _read_stamp(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _concat(parts, out: Path) -> None:
    """`parts` one after the other into `out`, written atomically."""
    from nmt.textio import atomic_write

    with atomic_write(out) as f:
        for part in parts:
            text = Path(part).read_bytes()
            f.write(text if not text or text.endswith(b"\n") else text + b"\n")


def hub_recipe(setup: HubSetup, doc: str, argv=None) -> HubRecipe:
    """A hub recipe from its command line (`doc`: the recipe's docstring)."""
    beams = " ".join(map(str, setup.beams))
    args = parser(doc, HubRecipe.stages, setup.src, setup.tgt, beams).parse_args(argv)
    return HubRecipe(setup, args)


def hub_main(setup: HubSetup, doc: str, argv=None) -> int:
    """The command line of a hub recipe: run it; errors are one line and an exit code."""
    return run_recipe(lambda: hub_recipe(setup, doc, argv))


def run_recipe(build) -> int:
    """Build the recipe (`build()`) and run it; errors become one line and an exit code."""
    from nmt.errors import exit_code

    return exit_code(
        lambda: build().run(), interrupted="interrupted: rerun the same command to continue"
    )
