"""Preparing data: prepare() end to end, its cache, bad inputs, and batches of a prepared split."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest

from nmt import batching, data
from nmt.batching import TokenBatchSampler
from nmt.config import Config
from nmt.data import load_split, prepare
from nmt.errors import DataError, UsageError
from nmt.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _write(path, lines, gz=False):
    text = "".join(f"{line}\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


# -- prepare -------------------------------------------------------------------------------------


def _corpus(tmp_path, n=300, seed=0):
    """Synthetic pairs (target = upper-cased source), with one empty pair and some long ones."""
    rng = random.Random(seed)
    src = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14))) for _ in range(n)]
    src[5] = ""
    tgt = [s.upper() for s in src]
    return src, tgt


def _config(tmp_path, src, tgt, **data_overrides) -> Config:
    cfg = Config()
    d = cfg.data
    d.train_src = str(_write(tmp_path / "train.en", src))
    d.train_tgt = str(_write(tmp_path / "train.de.gz", tgt, gz=True))
    d.valid_src = str(_write(tmp_path / "valid.en", src[:40]))
    d.valid_tgt = str(_write(tmp_path / "valid.de", tgt[:40]))
    d.dir = str(tmp_path / "data")
    d.max_len = 30
    cfg.tokenizer.vocab_size = 100
    for key, value in data_overrides.items():
        setattr(d, key, value)
    return cfg


def test_prepare_end_to_end(tmp_path, capsys):
    src, tgt = _corpus(tmp_path)
    cfg = _config(tmp_path, src, tgt)
    data_dir = prepare(cfg)
    assert data_dir == tmp_path / "data"
    tok = Tokenizer.load(data_dir)

    # what the filter must keep, worked out independently
    src_pieces, tgt_pieces = tok.encode_src(src), tok.encode_tgt(tgt)
    expected = [
        i
        for i in range(len(src))
        if 1 <= len(src_pieces[i]) <= 30 and 1 <= len(tgt_pieces[i]) <= 30
    ]
    assert 0 < len(expected) < len(src) - 1  # the test corpus drops long pairs and the empty one

    train = load_split(data_dir, "train")
    assert train.column_names == ["line", "src_ids", "tgt_ids", "src_lens", "tgt_lens"]
    rows = train[:]
    assert rows["line"] == expected
    for k, line in enumerate(expected):
        assert rows["src_ids"][k] == src_pieces[line] + [tok.eos_id]
        assert rows["tgt_ids"][k] == tgt_pieces[line]  # no bos/eos: collate adds them
    src_lens, tgt_lens = data.lengths(train)
    assert src_lens.dtype == np.int64
    assert src_lens.tolist() == [len(s) for s in rows["src_ids"]]
    assert tgt_lens.tolist() == [len(t) for t in rows["tgt_ids"]]
    assert len(load_split(data_dir, "valid")) > 0
    log = capsys.readouterr().err
    assert f"train: {len(src)} pairs, kept {len(expected)}" in log

    # a second run keeps everything; a new length limit re-encodes but keeps the tokenizer
    model_mtime = (data_dir / "spm.model").stat().st_mtime_ns
    prepare(cfg)
    assert "train: kept" in capsys.readouterr().err
    cfg.data.max_len = 10
    prepare(cfg)
    log = capsys.readouterr().err
    assert "tokenizer: kept" in log and "train: kept" not in log
    assert (data_dir / "spm.model").stat().st_mtime_ns == model_mtime
    assert max(data.lengths(load_split(data_dir, "train"))[1]) <= 10
    assert not [p.name for p in data_dir.iterdir() if p.name.startswith(".")]  # no leftovers


def test_prepare_bad_input(tmp_path):
    src, tgt = _corpus(tmp_path, n=50)
    cfg = _config(tmp_path, src, tgt)
    cfg.data.train_src = ""
    with pytest.raises(UsageError, match="data.train_src"):
        prepare(cfg)
    cfg.data.train_src = str(tmp_path / "missing.en")
    with pytest.raises(DataError, match="missing.en: file not found"):
        prepare(cfg)
    cfg = _config(tmp_path, src, tgt)
    _write(tmp_path / "valid.de", tgt[:39])  # one line short
    with pytest.raises(DataError, match="valid.en has 40 lines but .*valid.de has 39"):
        prepare(cfg)
    data_dir = tmp_path / "data"
    assert (data_dir / "train").is_dir() and not (data_dir / "valid").exists()
    assert not [p.name for p in data_dir.iterdir() if p.name.startswith(".")]


def test_load_split_missing(tmp_path):
    with pytest.raises(DataError, match="no prepared valid split"):
        load_split(tmp_path, "valid")


def test_make_batches_rebuild_the_dataset(tmp_path):
    src, tgt = _corpus(tmp_path, n=120)
    data_dir = prepare(_config(tmp_path, src, tgt))
    tok = Tokenizer.load(data_dir)
    train = load_split(data_dir, "train")
    sampler = TokenBatchSampler(*data.lengths(train), max_tokens=80, seed=3)
    seen = []
    for batch in batching.make_batches(train, sampler, tok.pad_id, tok.bos_id, tok.eos_id):
        assert batch.src_ids.numel() <= 80 or len(batch) == 1
        for row in range(len(batch)):
            i = int(batch.indices[row])
            n = int(batch.tgt_lens[row])
            assert batch.tgt_out_ids[row, : n - 1].tolist() == train[i]["tgt_ids"]
            assert batch.src_ids[row, : int(batch.src_lens[row])].tolist() == train[i]["src_ids"]
            seen.append(i)
    assert sorted(seen) == list(range(len(train)))


@pytest.mark.slow
def test_prepare_real_multi30k(tmp_path, monkeypatch):
    from nmt import corpora

    mirror = Path(__file__).resolve().parents[2] / "shared" / "corpora"
    if not (mirror / "multi30k").is_dir():
        pytest.skip(f"{mirror} not present")
    monkeypatch.setenv(corpora.MIRROR_ENV, str(mirror))
    train_src, train_tgt = corpora.split_files("multi30k", "train", "en", "de", tmp_path / "raw")
    valid_src, valid_tgt = corpora.split_files("multi30k", "val", "en", "de", tmp_path / "raw")
    cfg = Config()
    d = cfg.data
    d.train_src, d.train_tgt = str(train_src), str(train_tgt)
    d.valid_src, d.valid_tgt = str(valid_src), str(valid_tgt)
    d.dir = str(tmp_path / "data")
    cfg.tokenizer.vocab_size = 4000
    data_dir = prepare(cfg)
    assert len(load_split(data_dir, "train")) == 29000  # Multi30k has no empty or long pairs
    valid = load_split(data_dir, "valid")
    tok = Tokenizer.load(data_dir)
    sampler = TokenBatchSampler(*data.lengths(valid), max_tokens=2000, shuffle=False)
    n = sum(
        len(b) for b in batching.make_batches(valid, sampler, tok.pad_id, tok.bos_id, tok.eos_id)
    )
    assert n == 1014
