"""A tiny prepared dataset and a tiny model config for training tests (distributed, GPU).

The same data as the `prepared` fixture of tests/test_training.py: 300 pairs of random words
and the same words reversed in upper case, 20 validation pairs, a 120-piece joint vocabulary.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = [f"w{i}" for i in range(40)]


def write_corpus(folder: Path, n: int, seed: int, words=WORDS) -> tuple[Path, Path]:
    """`n` pairs of 2-8 random `words` and the same words reversed in upper case."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        words_ = rng.choices(words, k=rng.randint(2, 8))
        src.append(" ".join(words_))
        tgt.append(" ".join(reversed(words_)).upper())
    (folder / f"s{seed}.src").write_text("\n".join(src) + "\n")
    (folder / f"s{seed}.tgt").write_text("\n".join(tgt) + "\n")
    return folder / f"s{seed}.src", folder / f"s{seed}.tgt"


def prepare_tiny(folder: Path, *extra: str, words=WORDS) -> list[str]:
    """Prepare the tiny dataset under `folder` (`extra`: more `data.*` overrides; `words`: the
    vocabulary of its sentences); returns its `data.*`/`tokenizer.*` overrides."""
    from nmt import data
    from nmt.config import load_config

    train, valid = write_corpus(folder, 300, 1, words), write_corpus(folder, 20, 2, words)
    overrides = [*split_overrides(folder, train, valid), "tokenizer.vocab_size=120", *extra]
    data.prepare(load_config(None, overrides))
    return overrides


def split_overrides(folder: Path, train: tuple, valid: tuple) -> list[str]:
    """The `data.*` overrides of a train and a valid split, each a (src, tgt) pair of files,
    with the prepared data in `folder / "data"`."""
    return [
        f"data.train_src={train[0]}",
        f"data.train_tgt={train[1]}",
        f"data.valid_src={valid[0]}",
        f"data.valid_tgt={valid[1]}",
        f"data.dir={folder / 'data'}",
    ]


def tiny(prepared: list[str], out_dir, *extra: str) -> list[str]:
    """Overrides of a tiny GNMT run (2 epochs, CPU) writing to `out_dir`; `extra` wins."""
    return [
        *prepared,
        f"train.out_dir={out_dir}",
        "model.emb_dim=16",
        "model.hidden=32",
        "model.bi_hidden=16",
        "model.enc_layers=1",
        "model.dec_layers=2",
        "train.max_tokens=200",
        "train.max_epochs=2",
        "train.log_every=2",
        "train.warmup_steps=3",
        "train.device=cpu",
        "train.lr=0.01",
        # auto is the machine's choice (bf16 on a CPU where the probe finds it faster): the
        # tests' figures and tolerances are float32's
        "train.precision=fp32",
        *extra,
    ]


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node=NPROC -m nmt train ARGS` with this checkout's
    nmt; fails the test, showing the end of stderr, unless it exits with 0."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "nmt", "train", *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result
