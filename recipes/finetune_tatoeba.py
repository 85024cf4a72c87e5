#!/usr/bin/env python3
"""Fine-tune a trained model on Tatoeba: download → split → prepare → train → translate → score.

    python recipes/finetune_tatoeba.py --from runs/multi30k_en_de_small/model/best.pt
    python recipes/finetune_tatoeba.py --from CKPT --run-dir runs/ft train.max_steps=100
    python recipes/finetune_tatoeba.py --from CKPT --start-stage translate   # redo from a stage on

A domain shift: a model trained on Multi30k's image captions, fine-tuned on Tatoeba's short
everyday sentences (the mirror's tatoeba_test_de_en/, release v2021-08-07, 17,565 pairs: set
NMT_MIRROR), keeping its vocabulary. The direction is the checkpoint's (data.src_lang →
data.tgt_lang); a checkpoint of a language pair other than de/en is refused.

- download: the Tatoeba pairs (nmt.corpora `tatoeba`) and Multi30k test_2016_flickr into RUN/raw.
- split, by a fixed rule (the same for both directions; RUN/raw/split.json holds the counts): of
  the N pairs in file order (0-based index i; the file runs roughly in alphabetical order of its
  German side), the held-out test set (RUN/raw/heldout.*) is the 2,000 pairs at
  i = (j+1)·N // 2000 − 1 for j = 0 … 1,999 (every 8.8th pair, over the whole file, the last one
  included); validation
  (RUN/raw/valid.*) is, of the other 15,565 pairs in order, the 500 at positions
  (j+1)·15,565 // 500 − 1; training (RUN/raw/train.*) is the remaining 15,065 pairs less every
  pair whose German or English sentence is also that of a held-out or validation pair (535 pairs),
  so no held-out sentence is ever trained on, not even with another translation: 14,530 pairs.
  Validation and held-out pairs are not deduplicated against each other (26 validation pairs
  share a sentence with a held-out one): validation only picks the checkpoint.
- prepare: `nmt prepare --tokenizer-from CKPT`: the checkpoint's sentencepiece model, nothing
  learned.
- train: `nmt train --init-from CKPT`: a new run (new optimizer, step 0) from its weights. The
  config is the checkpoint's own, then configs/finetune.yaml (or --config), then the command
  line's `section.key=value`.
- translate, score: the checkpoint (before) and the fine-tuned RUN/model/best.pt (after) on the
  held-out Tatoeba lines and on test_2016_flickr (the old domain), with the same search (the
  run's search settings, beam --beam-size); sacreBLEU and chrF, one table, RUN/scores.json.

Each stage writes its marker (RUN/.done/STAGE) only when its outputs are complete and is
skipped when the marker is there; an interrupted train stage resumes from its `last` checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, Recipe, run_recipe, stage_args  # noqa: E402

STAGES = ("download", "split", "prepare", "train", "translate", "score")
CORPUS, RELEASE = "tatoeba", "v2021-08-07"
OLD_DOMAIN = "test_2016_flickr"  # Multi30k: what the preset model was trained for
HELD_OUT = "heldout"  # RUN/raw/heldout.<lang>; "tatoeba_heldout" in the table
SPLIT_FILES = (HELD_OUT, "valid", "train")


def split_indices(n: int, n_held_out: int, n_valid: int) -> tuple[list[int], list[int]]:
    """The fixed rule: (held-out, validation) 0-based pair indices of a file of `n` pairs.

    Held-out: (j+1)·n // n_held_out − 1 for j < n_held_out, spread over the whole file; then
    validation: the same rule over the pairs left, in order. Training is the rest."""
    from nmt.errors import UsageError

    if n_held_out < 1 or n_valid < 1 or n < n_held_out + n_valid + 1:
        raise UsageError(
            f"{n_held_out} held-out and {n_valid} validation pairs (each >= 1) leave no "
            f"training pairs of {n}"
        )
    held_out = [(j + 1) * n // n_held_out - 1 for j in range(n_held_out)]
    taken = set(held_out)
    rest = [i for i in range(n) if i not in taken]
    valid = [rest[(j + 1) * len(rest) // n_valid - 1] for j in range(n_valid)]
    return held_out, valid


def split_pairs(files: dict, out_dir: Path, n_held_out: int, n_valid: int) -> dict:
    """Split the line-aligned `files` ({lang: path}) by `split_indices` into
    `out_dir/{heldout,valid,train}.<lang>`, each written atomically; training loses every pair
    whose sentence, in either language, is that language's sentence of a held-out or validation
    pair. Returns the counts."""
    from nmt.errors import UsageError
    from nmt.textio import atomic_write_text, read_lines

    lines = {lang: read_lines(path) for lang, path in files.items()}
    (a, a_lines), (b, b_lines) = lines.items()
    if len(a_lines) != len(b_lines):
        raise UsageError(
            f"{files[a]} has {len(a_lines)} lines but {files[b]} has {len(b_lines)}: "
            "expected line-aligned pairs"
        )
    held_out, valid = split_indices(len(a_lines), n_held_out, n_valid)
    seen = {lang: {text[i] for i in held_out + valid} for lang, text in lines.items()}
    kept = set(held_out + valid)
    rest = [i for i in range(len(a_lines)) if i not in kept]
    train = [i for i in rest if all(text[i] not in seen[lang] for lang, text in lines.items())]
    for name, indices in zip(SPLIT_FILES, (held_out, valid, train)):
        for lang, text in lines.items():
            atomic_write_text(out_dir / f"{name}.{lang}", "".join(text[i] + "\n" for i in indices))
    counts = {"pairs": len(a_lines), HELD_OUT: len(held_out), "valid": len(valid)}
    counts.update(train=len(train), train_dropped_as_held_out=len(rest) - len(train))
    return counts


def _parse(argv):
    import argparse

    from nmt.cli import Parser, add_overrides

    p = Parser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--from",
        dest="from_ckpt",
        metavar="CKPT",
        required=True,
        help="the trained checkpoint to fine-tune (its languages: de and en)",
    )
    stage_args(p, STAGES, "runs/finetune_tatoeba_SRC_TGT")
    p.add_argument("--beam-size", type=int, default=5, help="beam of both scorings (default 5)")
    p.add_argument(
        "--heldout-pairs", type=int, default=2000, help="held-out test pairs (default 2000)"
    )
    p.add_argument("--valid-pairs", type=int, default=500, help="validation pairs (default 500)")
    add_overrides(p)
    return p.parse_args(argv)


def checkpoint_langs(path: Path) -> tuple[dict, str, str]:
    """(config, src, tgt) of the checkpoint at `path`; a checkpoint whose languages are not two
    of Tatoeba's is one UsageError."""
    from nmt import checkpoint, corpora
    from nmt.config import from_dict
    from nmt.errors import UsageError

    config = checkpoint.load(path)["config"]
    data = from_dict(config, source=f"{path} (config)").data
    src, tgt = data.src_lang, data.tgt_lang
    langs = corpora.get_corpus(CORPUS).langs()
    if src == tgt or src not in langs or tgt not in langs:
        raise UsageError(
            f"{path}: a {src}→{tgt} model (data.src_lang, data.tgt_lang); Tatoeba here has "
            f"{' and '.join(langs)} only: fine-tune a {langs[0]}→{langs[1]} or "
            f"{langs[1]}→{langs[0]} model"
        )
    return config, src, tgt


class FinetuneTatoeba(Recipe):
    stages = STAGES
    title = "Fine-tuning on Tatoeba"
    corpus = CORPUS

    def __init__(self, args):
        self.init_from = Path(args.from_ckpt)
        self.ckpt_config, args.src, args.tgt = checkpoint_langs(self.init_from)
        run_dir = args.run_dir or ROOT / "runs" / f"finetune_tatoeba_{args.src}_{args.tgt}"
        super().__init__(args, run_dir, [f"tatoeba_{HELD_OUT}", OLD_DOMAIN], [args.beam_size])

    def config_file(self) -> Path:
        return Path(self.args.config) if self.args.config else ROOT / "configs/finetune.yaml"

    def base_config(self) -> dict:
        return self.ckpt_config

    @property
    def best(self) -> Path:
        return self.run_dir / "model" / "best.pt"

    def test_files(self) -> dict:
        """{test set: {lang: text file}}: the held-out Tatoeba lines and the old domain's test
        set (fetched again only if its verified copy is gone)."""
        from nmt import corpora

        old = corpora.download("multi30k", self.langs, self.raw, splits=[OLD_DOMAIN], quiet=True)
        held_out = {lang: self.raw / f"{HELD_OUT}.{lang}" for lang in self.langs}
        return {self.test_sets[0]: held_out, OLD_DOMAIN: old[OLD_DOMAIN]}

    def download(self):
        from nmt import corpora

        corpora.download(CORPUS, self.langs, self.raw, splits=[RELEASE])
        corpora.download("multi30k", self.langs, self.raw, splits=[OLD_DOMAIN])

    def split(self):
        from nmt.textio import atomic_write_text

        files = {lang: self.raw / f"{RELEASE}.{lang}" for lang in self.langs}
        counts = split_pairs(files, self.raw, self.args.heldout_pairs, self.args.valid_pairs)
        counts = {"release": f"{CORPUS} {RELEASE}", **counts}
        atomic_write_text(self.raw / "split.json", json.dumps(counts, indent=1))
        print(
            f"split: {counts['pairs']} pairs -> {counts[HELD_OUT]} held out, {counts['valid']} "
            f"validation, {counts['train']} training ({counts['train_dropped_as_held_out']} "
            "left out: they share a sentence with a held-out or validation pair)",
            file=sys.stderr,
        )

    def prepare(self):
        from nmt import checkpoint, data

        tokenizer = checkpoint.load_tokenizer(self.init_from)
        origin = str(self.init_from.resolve())
        data.prepare(self.config(), tokenizer, tokenizer_origin=origin)

    def translate(self):
        """Both models, every test set, the same search: the run's settings, --beam-size."""
        import dataclasses
        import time

        from nmt.config import load_time_keys
        from nmt.translator import Translator, translate_stream

        cfg, tests = self.config(), self.test_files()
        skip = {"n_best", *load_time_keys()}
        search = {k: v for k, v in dataclasses.asdict(cfg.search).items() if k not in skip}
        search["beam_size"] = self.args.beam_size
        (self.run_dir / "hyps").mkdir(parents=True, exist_ok=True)
        for model, path in (("before", self.init_from), ("after", self.best)):
            translator = Translator.from_checkpoint(
                path, cfg.train.device, dtype=cfg.search.dtype, threads=cfg.search.threads
            )
            for test, files in tests.items():
                start = time.perf_counter()
                hyp = self._hyp_of(test, model)
                n = translate_stream(translator, str(files[self.args.src]), str(hyp), **search)
                secs = time.perf_counter() - start
                print(f"translated {test} ({model}): {n} lines in {secs:.1f} s", file=sys.stderr)

    def _hyp_of(self, test: str, model: str) -> Path:
        return self.run_dir / "hyps" / f"{test}.{model}.beam{self.args.beam_size}.{self.args.tgt}"

    def score(self):
        from nmt.evaluation import score_files
        from nmt.textio import atomic_write_text, read_lines

        rows, signature, tests = [], {}, self.test_files()
        for test, files in tests.items():
            ref = str(files[self.args.tgt])
            row = {"test": test, "lines": len(read_lines(ref)), "beam": self.args.beam_size}
            for model in ("before", "after"):
                result = score_files(str(self._hyp_of(test, model)), [ref])
                row[model] = {"bleu": result["bleu"]["score"], "chrf": result["chrf"]["score"]}
                signature = {"bleu": result["bleu"]["signature"]}
                signature["chrf"] = result["chrf"]["signature"]
            rows.append(row)
        scores = {"before": str(self.init_from), "after": str(self.best)}
        scores.update(src=self.args.src, tgt=self.args.tgt, rows=rows, signature=signature)
        atomic_write_text(self.run_dir / "scores.json", json.dumps(scores, indent=1))
        self._print_scores(scores, tests)

    def _print_scores(self, scores: dict, tests: dict) -> None:
        import os

        from rich.console import Console
        from rich.table import Table

        src, tgt = self.langs
        beam = self.args.beam_size
        table = Table(title=f"{self.title} {src}→{tgt}, beam {beam} ({self.run_dir.name})")
        table.add_column("test set", justify="left", no_wrap=True)
        for col in ("lines", "BLEU before", "BLEU after", "chrF before", "chrF after"):
            table.add_column(col, justify="right")
        for r in scores["rows"]:
            figures = [f"{r[m][key]:.1f}" for key in ("bleu", "chrf") for m in ("before", "after")]
            table.add_row(r["test"], str(r["lines"]), *figures)
        console = Console()
        console.print(table)
        console.print(f"before: {scores['before']}\nafter:  {scores['after']}", soft_wrap=True)
        console.print(f"sacreBLEU: {scores['signature']['bleu']}")
        console.print(f"chrF: {scores['signature']['chrf']}")
        self._print_examples(console, tests[self.test_sets[0]])
        model = os.path.relpath(self.best)
        model = str(self.best.resolve()) if model.startswith("..") else model
        console.print(
            f"Translate your own file with the fine-tuned model:\n  nmt translate {model} "
            "-i FILE -o OUT",
            soft_wrap=True,  # a long path must stay one line that can be pasted
        )

    def _print_examples(self, console, files: dict, count: int = 5) -> None:
        """`count` held-out sentences, spread over the set: source, before, after, reference."""
        from nmt.textio import read_lines

        sources, refs = read_lines(files[self.args.src]), read_lines(files[self.args.tgt])
        test = self.test_sets[0]
        hyps = {m: read_lines(self._hyp_of(test, m)) for m in ("before", "after")}
        console.print(f"\n{count} sentences of {test}:")
        for i in sorted({k * len(sources) // count for k in range(count)}):
            text = (sources[i], hyps["before"][i], hyps["after"][i], refs[i])
            for label, line in zip(("source", "before", "after", "reference"), text):
                console.print(
                    f"  {label:<10} {line}", markup=False, highlight=False, soft_wrap=True
                )
            console.print()


def main(argv=None) -> int:
    return run_recipe(lambda: FinetuneTatoeba(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
