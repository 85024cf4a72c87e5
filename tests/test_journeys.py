"""The user's journeys, end to end, through the real command line, on the real Multi30k.

- `nmt download` → `nmt prepare` → `nmt train` → `nmt translate -i -o` → `nmt evaluate` →
  `nmt score` on a slice of the corpus (10,000 training pairs): each step's files, N lines in =
  N lines out, and a trained model that beats the freshly initialised one (the same run with
  `train.lr=0`) on validation loss and BLEU and on held-out test lines (BLEU, chrF, and
  translations that depend on their source), by margins an optimizer doing nothing cannot reach.
- `recipes/multi30k.py` through all its stages with a tiny config.

The corpus comes from the local mirror: `NMT_MIRROR`, else `../shared/corpora` beside the
checkout (the Makefile's rule); without one the tests are skipped. `slow` (about a minute of CPU
each; `.ci/run` runs them). The steps users type run as `python -m nmt` subprocesses with this
checkout first on the path; `evaluate` and `score` run in-process (`nmt.cli.main`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import need_mirror

from nmt import checkpoint, data
from nmt.cli import main
from nmt.evaluation import score_files

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PAIRS, VALID_PAIRS, HELD_OUT = 10_000, 200, 300
STEPS = 300
# A model small enough for a minute of CPU that still learns to attend within STEPS (on the
# 2-core CPU: validation BLEU 4.8-8.6 at step 300 over seeds 1-3, 0 at step 0).
TINY = """\
tokenizer: {vocab_size: 1000}
model: {emb_dim: 64, hidden: 128, bi_hidden: 64, enc_layers: 1, dec_layers: 2, dropout: 0.0,
        emb_scale: true}
train: {max_tokens: 2000, max_epochs: 0, max_steps: %d, valid_every: 100, lr: 0.01,
        schedule: constant, warmup_steps: 10, log_every: 50, device: cpu, threads: 1}
search: {beam_size: 3, max_len_a: 1.2, max_len_b: 5}
"""
RECIPE_TINY = """\
tokenizer: {vocab_size: 300}
model: {emb_dim: 16, hidden: 16, bi_hidden: 8, enc_layers: 1, dec_layers: 2}
train: {max_tokens: 1000, max_epochs: 1, max_steps: 10, valid_bleu: false, device: cpu,
        threads: 1}
search: {beam_size: 1, max_len_a: 0.5, max_len_b: 3}
"""

pytestmark = pytest.mark.slow


@pytest.fixture
def mirror() -> Path:
    """The corpus mirror holding multi30k/ (the test is skipped without one)."""
    return need_mirror("multi30k")


@pytest.fixture
def env(mirror, tmp_path, monkeypatch) -> dict:
    """The environment of the subprocesses: the mirror, a private cache, no hub, one thread,
    and this checkout's nmt first on the path."""
    values = {
        "NMT_MIRROR": str(mirror),
        "NMT_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)  # in-process steps see the same
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path}


def _run(env: dict, *argv: str) -> subprocess.CompletedProcess:
    """A command as a user types it; it must exit 0 without a traceback."""
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900
    )
    where = " ".join(argv[:3])
    assert proc.returncode == 0, f"{where}: exit {proc.returncode}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, f"{where}:\n{proc.stderr[-4000:]}"
    return proc


def _nmt(env: dict, *argv: str) -> subprocess.CompletedProcess:
    return _run(env, "-m", "nmt", *argv)


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]  # every line ends with "\n"


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _no_temp_files(folder: Path) -> None:
    assert sorted(p.name for p in folder.glob(".*.tmp")) == [], folder


def _valid_records(run: Path) -> list[dict]:
    records = [json.loads(line) for line in _lines(run / "log.jsonl")]
    return [r for r in records if r["type"] == "valid"]


def _evaluate(capsys, ckpt: Path, src: Path, ref: Path, out: Path) -> dict:
    capsys.readouterr()
    argv = ["evaluate", str(ckpt), "--src", str(src), "--ref", str(ref), "-o", str(out)]
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _download(env: dict, raw: Path) -> dict:
    splits = ["train", "val", "test_2016_flickr"]
    proc = _nmt(
        env, "download", "multi30k", "--langs", "en", "de", "--out", str(raw), "--splits", *splits
    )
    printed = [line.split("\t") for line in proc.stdout.splitlines()]
    files = {(split, lang): Path(path) for split, lang, path in printed}
    assert sorted(files) == sorted((s, lang) for s in splits for lang in ("en", "de"))
    counts = {"train": 29_000, "val": 1_014, "test_2016_flickr": 1_000}
    for (split, _), path in files.items():
        assert path.parent == raw and len(_lines(path)) == counts[split], path
    return files


def _slice(files: dict, work: Path) -> tuple[list[str], Path, Path]:
    """What a user does with `head`: the first pairs of train and val as the training and
    validation files, the first test lines (never trained on) as held-out text. The held-out
    source gets an empty line, as real input files have; its reference too, to stay aligned."""
    overrides = []
    for split, name, n in (("train", "train", TRAIN_PAIRS), ("val", "valid", VALID_PAIRS)):
        for lang, side in (("en", "src"), ("de", "tgt")):
            path = _write_lines(work / f"{name}.{lang}", _lines(files[split, lang])[:n])
            overrides.append(f"data.{name}_{side}={path}")
    held = {}
    for lang in ("en", "de"):
        lines = _lines(files["test_2016_flickr", lang])[:HELD_OUT]
        held[lang] = _write_lines(work / f"held.{lang}", [*lines[:7], "", *lines[7:]])
    return overrides, held["en"], held["de"]


def _prepare(env: dict, config: Path, overrides: list[str], data_dir: Path) -> None:
    """A joint sentencepiece model and the encoded splits."""
    proc = _nmt(env, "prepare", str(config), *overrides)
    assert proc.stdout.strip() == str(data_dir)
    assert (data_dir / "spm.model").is_file() and (data_dir / "tokenizer.json").is_file()
    assert len(data.load_split(data_dir, "train")) == TRAIN_PAIRS
    assert len(data.load_split(data_dir, "valid")) == VALID_PAIRS


def _train(env: dict, config: Path, overrides: list[str], run: Path) -> list[dict]:
    """The run folder, a summary on stdout; returns the validations of the log."""
    proc = _nmt(env, "train", str(config), *overrides, f"train.out_dir={run}")
    summary = json.loads(proc.stdout)
    assert (summary["step"], summary["stop"]) == (STEPS, "max_steps")
    for name in ("best.pt", "last.pt", "config.yaml", "log.jsonl"):
        assert (run / name).is_file(), name
    assert checkpoint.load(run / "last.pt")["train_state"]["step"] == STEPS
    _no_temp_files(run)
    validations = _valid_records(run)
    assert [r["step"] for r in validations] == [100, 200, 300]
    return validations


def _train_untrained(config: Path, overrides: list[str], run: Path) -> dict:
    """The same run, freshly initialised (the same seed): lr 0 leaves the weights of step 0.
    Returns its validation."""
    argv = ["train", str(config), *overrides, f"train.out_dir={run}"]
    assert main([*argv, "train.lr=0", "train.max_steps=1", "train.valid_every=1"]) == 0
    (validation,) = _valid_records(run)
    return validation


def _translate(env: dict, ckpt: Path, src: Path, hyp: Path) -> list[str]:
    """N lines in, N lines out, the empty line kept empty, the file complete."""
    proc = _nmt(env, "translate", str(ckpt), "-i", str(src), "-o", str(hyp))
    assert proc.stdout == ""
    hyps = _lines(hyp)
    assert len(hyps) == len(_lines(src)) == HELD_OUT + 1
    assert hyps[7] == "" and all(hyps[:7] + hyps[8:])
    _no_temp_files(hyp.parent)
    return hyps


def test_download_prepare_train_translate_evaluate_score(env, tmp_path, capsys):
    files = _download(env, tmp_path / "raw")
    overrides, held_src, held_ref = _slice(files, tmp_path)
    config, data_dir, run = tmp_path / "tiny.yaml", tmp_path / "data", tmp_path / "run"
    config.write_text(TINY % STEPS)
    overrides.append(f"data.dir={data_dir}")
    _prepare(env, config, overrides, data_dir)
    trained = _train(env, config, overrides, run)[-1]
    untrained = _train_untrained(config, overrides, tmp_path / "untrained")
    (tmp_path / "out").mkdir()
    hyps = _translate(env, run / "best.pt", held_src, tmp_path / "out" / "held.hyp.de")

    # evaluate: the same translations as `translate`, scored; and the untrained model's
    scored = _evaluate(capsys, run / "best.pt", held_src, held_ref, tmp_path / "eval.de")
    assert _lines(tmp_path / "eval.de") == hyps and scored["n"] == HELD_OUT + 1
    baseline = _evaluate(
        capsys, tmp_path / "untrained" / "best.pt", held_src, held_ref, tmp_path / "base.de"
    )

    # score: the hypothesis file alone gives evaluate's figures
    argv = ["score", str(tmp_path / "out" / "held.hyp.de"), "--ref", str(held_ref), "--json"]
    assert main(argv) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone["bleu"]["score"] == scored["bleu"]["score"]
    assert alone["chrf"]["score"] == scored["chrf"]["score"]

    # learning: the trained model beats the untrained one on every measure, by margins that an
    # optimizer doing nothing cannot reach (measured: see the comments)
    bleu, chrf = scored["bleu"]["score"], scored["chrf"]["score"]
    print(  # shown by pytest -rP
        f"step {STEPS} vs untrained: valid loss {trained['loss']:.2f} vs "
        f"{untrained['loss']:.2f}, valid BLEU {trained['bleu']:.1f} vs {untrained['bleu']:.1f}, "
        f"held-out BLEU {bleu:.1f} vs {baseline['bleu']['score']:.1f}, chrF {chrf:.1f} vs "
        f"{baseline['chrf']['score']:.1f}, {len(set(hyps))} distinct of {len(hyps)}"
    )
    assert trained["loss"] < untrained["loss"] - 2.0, (trained, untrained)  # 3.8 vs 6.9 nats
    assert trained["bleu"] > untrained["bleu"] + 2.0, (trained, untrained)  # 4.8-8.6 vs 0
    assert bleu > baseline["bleu"]["score"] + 2.0, (bleu, baseline["bleu"])  # 7.8 vs 0
    assert chrf > baseline["chrf"]["score"] + 15.0, (chrf, baseline["chrf"])  # 25.4 vs 1.4
    # a decoder that ignores its source (a language model) says the same thing to every line
    assert len(set(hyps)) > HELD_OUT // 2, sorted(set(hyps))[:10]  # 269 of 301


def test_multi30k_recipe_runs_every_stage(env, tmp_path):
    config, run = tmp_path / "recipe_tiny.yaml", tmp_path / "recipe"
    config.write_text(RECIPE_TINY)
    argv = ["--run-dir", str(run), "--config", str(config), "--test-sets", "test_2016_flickr"]
    proc = _run(env, str(ROOT / "recipes/multi30k.py"), *argv, "--beam-sizes", "1", "2")
    recipe_stages = ["download", "prepare", "train", "translate", "score"]
    assert sorted(p.name for p in (run / ".done").iterdir()) == sorted(recipe_stages)
    assert len(_lines(run / "raw/train.de")) == 29_000 and len(_lines(run / "raw/val.en")) == 1014
    assert len(data.load_split(run / "data", "valid")) == 1014
    assert (run / "model/best.pt").is_file() and (run / "model/last.pt").is_file()
    ref = run / "raw/test_2016_flickr.de"
    rows = json.loads((run / "scores.json").read_text())
    assert [(r["test"], r["beam"]) for r in rows] == [
        ("test_2016_flickr", 1),
        ("test_2016_flickr", 2),
    ]
    for row in rows:
        hyp = run / f"hyps/test_2016_flickr.beam{row['beam']}.de"
        assert len(_lines(hyp)) == 1000
        alone = score_files(str(hyp), [str(ref)])
        assert (row["bleu"], row["chrf"]) == (alone["bleu"]["score"], alone["chrf"]["score"])
        assert row["signature"].startswith("nrefs:1|case:mixed")
    assert "Multi30k en→de" in proc.stdout and "translate" in proc.stdout.splitlines()[-1]
    for folder in (run, run / "model", run / "hyps"):
        _no_temp_files(folder)
