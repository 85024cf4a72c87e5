"""Shared fixtures.

`tiny_checkpoint`: a real checkpoint file built without training (synthetic parallel text, a
sentencepiece model of ~100 pieces, a randomly initialised tiny GNMT, the vocabulary shortlist
learned from the text). Its weights are random,
so tests using it assert alignment, order and format invariants, never translation quality.
"""

from __future__ import annotations

import dataclasses
import os
import random
from pathlib import Path

import pytest
import torch

# Tests use one torch thread: tiny models gain nothing from two, and with the other core busy
# (CI, a parallel job) two threads run several times slower than one.
torch.set_num_threads(1)


def _started_mirror() -> Path:
    """The local corpus mirror: NMT_MIRROR as the suite was started, when it names a folder (the
    Makefile exports ../shared/corpora when one sits beside the checkout; CI may run a clone
    elsewhere), else ../shared/corpora beside the checkout. It may not exist."""
    started = os.environ.get("NMT_MIRROR", "").strip()
    if started and Path(started).is_dir():
        return Path(started).resolve()
    return Path(__file__).resolve().parents[2] / "shared" / "corpora"


# Read once, at import: tests and their fixtures change NMT_MIRROR (a local HTTP server, none).
SHARED_CORPORA = _started_mirror()


def need_mirror(*folders: str) -> Path:
    """SHARED_CORPORA when it holds every folder named; else the calling test is skipped."""
    missing = [f"{folder}/" for folder in folders if not (SHARED_CORPORA / folder).is_dir()]
    if missing:
        pytest.skip(f"{SHARED_CORPORA} lacks {', '.join(missing)}: set NMT_MIRROR to a mirror")
    return SHARED_CORPORA


WORDS = [f"w{i}" for i in range(30)] + ["the", "cat", "sat", "on", "mat", "a", "dog"]


def write_parallel(folder, n: int, seed: int) -> tuple:
    """`n` synthetic pairs: random words, and the same words reversed in upper case."""
    rng = random.Random(seed)
    src, tgt = [], []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(2, 9))
        src.append(" ".join(words))
        tgt.append(" ".join(reversed(words)).upper())
    src_path, tgt_path = folder / f"pairs{seed}.src", folder / f"pairs{seed}.tgt"
    src_path.write_text("\n".join(src) + "\n", encoding="utf-8")
    tgt_path.write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return src_path, tgt_path


def build_tiny_checkpoint(folder, vocab_size: int = 100, seed: int = 0, **search):
    """Train a tokenizer, build a random tiny GNMT and save both as `folder/tiny.pt`."""
    from nmt import checkpoint, shortlist
    from nmt.config import Config
    from nmt.models import build_model_for
    from nmt.tokenizer import Tokenizer

    src_path, tgt_path = write_parallel(folder, 300, seed=1)
    tok = Tokenizer.train([src_path], [tgt_path], folder / "spm", vocab_size=vocab_size)
    cfg = Config()
    cfg.data.src_lang, cfg.data.tgt_lang = "en", "de"
    cfg.tokenizer.vocab_size = vocab_size
    m = cfg.model
    m.emb_dim, m.hidden, m.bi_hidden, m.enc_layers, m.dec_layers = 16, 32, 16, 1, 2
    m.init_scale = 1.0  # large random weights: outputs that differ from line to line
    # Short outputs keep the tests fast: random weights rarely choose eos early.
    short = dict(beam_size=2, batch_size=64, max_src_len=40, max_len_a=0.5, max_len_b=4)
    cfg.search = dataclasses.replace(cfg.search, **{**short, **search})  # frozen: replaced whole
    torch.manual_seed(seed)
    model = build_model_for(cfg.model, tok)
    path = folder / "tiny.pt"
    src_lines = src_path.read_text(encoding="utf-8").splitlines()
    tgt_lines = tgt_path.read_text(encoding="utf-8").splitlines()
    src_ids = [ids + [tok.eos_id] for ids in tok.encode_src(src_lines)]
    table = shortlist.learn(
        src_ids, tok.encode_tgt(tgt_lines), tok.src_vocab_size, tok.tgt_vocab_size
    )
    checkpoint.save(
        path,
        config=cfg.to_dict(),
        model_state=model.state_dict(),
        tokenizer_bytes=tok.to_bytes(),
        shortlist=table,
    )
    return path


def build_retokenized_checkpoint(tiny_path, folder, special_ids=(0, 1, 2, 3)):
    """`folder/retokenized.pt`: the tiny checkpoint's config and weights with another
    sentencepiece model of the same size, learned from other text, with `special_ids` (pad, unk,
    bos, eos). It loads and translates alone; an ensemble with the tiny checkpoint is refused."""
    import sentencepiece as spm

    from nmt import checkpoint

    ckpt = checkpoint.load(tiny_path)
    src_path, tgt_path = write_parallel(folder, 300, seed=5)
    pad, unk, bos, eos = special_ids
    spm.SentencePieceTrainer.train(
        input=[str(src_path), str(tgt_path)],
        model_prefix=str(folder / "retokenized"),
        vocab_size=ckpt["model"]["encoder.embed.weight"].shape[0],
        model_type="bpe",
        **dict(pad_id=pad, unk_id=unk, bos_id=bos, eos_id=eos, minloglevel=2),
    )
    path = folder / "retokenized.pt"
    model_bytes = (folder / "retokenized.model").read_bytes()
    checkpoint.save(
        path,
        config=ckpt["config"],
        model_state=ckpt["model"],
        tokenizer_bytes={"joint": model_bytes},
    )
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a real, randomly initialised tiny GNMT checkpoint (joint vocab of ~100 pieces)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint"))


@pytest.fixture(scope="session")
def synthetic_words():
    """The words of the synthetic corpus the tiny checkpoint's tokenizer was learned from."""
    return list(WORDS)


@pytest.fixture
def parallel_text(tmp_path):
    """`make(n, seed)` writes `n` synthetic pairs under tmp_path; returns (src, tgt) paths."""
    return lambda n, seed=1: write_parallel(tmp_path, n, seed)
