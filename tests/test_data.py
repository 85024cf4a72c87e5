"""Data layer: validated reading, prepare() end to end, collate, and the token batch sampler."""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nmt import data
from nmt.config import Config
from nmt.data import Batch, TokenBatchSampler, collate, load_split, prepare, read_parallel
from nmt.errors import DataError, UsageError
from nmt.tokenizer import Tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _write(path, lines, gz=False):
    text = "".join(f"{line}\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


# -- read_parallel -------------------------------------------------------------------------------


def test_read_parallel_streams_pairs(tmp_path):
    src = _write(tmp_path / "a.en", ["\ufeffone", "two", ""])
    tgt = _write(tmp_path / "a.de.gz", ["eins", "zwei", "leer"], gz=True)
    pairs = read_parallel(src, tgt)
    assert next(pairs) == ("one", "eins")  # a generator: nothing is read ahead in bulk
    assert list(pairs) == [("two", "zwei"), ("", "leer")]


def test_read_parallel_errors_name_the_file(tmp_path):
    good = _write(tmp_path / "good.txt", ["a", "b", "c"])
    short = _write(tmp_path / "short.txt", ["a", "b"])
    with pytest.raises(DataError) as err:
        list(read_parallel(good, short))
    assert f"{good} has 3 lines but {short} has 2" in str(err.value)
    with pytest.raises(DataError, match=f"{short} has 2 lines but {good} has 3"):
        list(read_parallel(short, good))

    empty = _write(tmp_path / "empty.txt", [])
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        list(read_parallel(empty, good))
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        list(read_parallel(good, empty))

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\ncaf\xe9 latin-1\n")
    with pytest.raises(DataError, match=rf"{bad}, line 3: not UTF-8"):
        list(read_parallel(bad, good))

    with pytest.raises(DataError, match=f"{tmp_path / 'nope.txt'}: file not found"):
        list(read_parallel(tmp_path / "nope.txt", good))
    with pytest.raises(DataError, match="is a folder"):
        list(read_parallel(good, tmp_path))

    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(b"a\nb\nc\n" * 1000)[:-20])
    with pytest.raises(DataError, match=f"{cut}: truncated or corrupt gzip"):
        list(read_parallel(cut, good))


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


# -- collate and Batch ---------------------------------------------------------------------------


def test_collate_pads_right_and_adds_bos_eos():
    pad, bos, eos = 0, 2, 3
    examples = {"src_ids": [[5, 6, eos], [7, eos]], "tgt_ids": [[8, 9], [10]]}
    batch = collate(examples, [4, 1], pad, bos, eos)
    assert batch.src_ids.tolist() == [[5, 6, 3], [7, 3, 0]]
    assert batch.src_lens.tolist() == [3, 2]
    assert batch.tgt_in_ids.tolist() == [[2, 8, 9], [2, 10, 0]]
    assert batch.tgt_out_ids.tolist() == [[8, 9, 3], [10, 3, 0]]
    assert batch.tgt_lens.tolist() == [3, 2]
    assert batch.indices.tolist() == [4, 1]
    assert batch.src_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.tgt_mask.tolist() == [[True, True, True], [True, True, False]]
    assert (batch.num_src_tokens, batch.num_tgt_tokens, len(batch)) == (5, 5, 2)
    assert all(t.dtype == torch.long for t in vars(batch).values())
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tgt_out_ids, batch.tgt_out_ids)
    # an empty target gets bos / eos only
    assert collate({"src_ids": [[3]], "tgt_ids": [[]]}, [0], pad, bos, eos).tgt_in_ids.tolist() == [
        [2]
    ]


def test_make_batches_rebuild_the_dataset(tmp_path):
    src, tgt = _corpus(tmp_path, n=120)
    data_dir = prepare(_config(tmp_path, src, tgt))
    tok = Tokenizer.load(data_dir)
    train = load_split(data_dir, "train")
    sampler = TokenBatchSampler(*data.lengths(train), max_tokens=80, seed=3)
    seen = []
    for batch in data.make_batches(train, sampler, tok.pad_id, tok.bos_id, tok.eos_id):
        assert batch.src_ids.numel() <= 80 or len(batch) == 1
        for row in range(len(batch)):
            i = int(batch.indices[row])
            n = int(batch.tgt_lens[row])
            assert batch.tgt_out_ids[row, : n - 1].tolist() == train[i]["tgt_ids"]
            assert batch.src_ids[row, : int(batch.src_lens[row])].tolist() == train[i]["src_ids"]
            seen.append(i)
    assert sorted(seen) == list(range(len(train)))


# -- TokenBatchSampler ---------------------------------------------------------------------------


def _lens(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 60, size=n)
    tgt = np.clip(src + rng.integers(-5, 6, size=n), 1, None)
    src[7] = 500  # over budget on its own: must come as a batch of one
    return src, tgt


def _cost(batch, src, tgt):
    return len(batch) * max(max(src[batch]), max(tgt[batch]) + 1)


def test_sampler_covers_each_example_once_within_budget():
    src, tgt = _lens()
    sampler = TokenBatchSampler(src, tgt, max_tokens=400, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(src)))
    assert all(_cost(b, src, tgt) <= 400 or len(b) == 1 for b in batches)
    assert [7] in batches
    # batches are not tiny: length sorting within pools packs them well
    padded = sum(_cost(b, src, tgt) for b in batches)
    assert padded < 1.3 * sum(np.maximum(src, tgt + 1))


def test_sampler_order_depends_on_seed_and_epoch_only():
    src, tgt = _lens()
    a = TokenBatchSampler(src, tgt, max_tokens=400, seed=1)
    b = TokenBatchSampler(src, tgt, max_tokens=400, seed=1)
    c = TokenBatchSampler(src, tgt, max_tokens=400, seed=2)
    epoch0 = list(a)
    assert list(b) == epoch0
    assert list(c) != epoch0
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    assert sorted(i for x in epoch1 for i in x) == list(range(len(src)))
    b.set_epoch(1)
    assert list(b) == epoch1


def test_sampler_without_shuffle_is_sorted_and_repeatable():
    src, tgt = _lens()
    sampler = TokenBatchSampler(src, tgt, max_tokens=400, shuffle=False)
    first = list(sampler)
    assert list(sampler) == first  # a finished pass starts over (validation reuses it)
    costs = [int(np.maximum(src[b], tgt[b] + 1).max()) for b in first]
    assert costs == sorted(costs)
    sampler.set_epoch(5)
    assert list(sampler) == first


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampler_rank_shards_are_disjoint_covering_and_even(world_size):
    src, tgt = _lens(n=997)
    for shuffle in (True, False):
        shards = [
            list(
                TokenBatchSampler(
                    src, tgt, 400, shuffle=shuffle, seed=4, rank=r, world_size=world_size
                )
            )
            for r in range(world_size)
        ]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
        flat = [i for s in shards for b in s for i in b]
        assert sorted(flat) == list(range(len(src)))  # disjoint and covering
        assert all(_cost(b, src, tgt) <= 400 or len(b) == 1 for s in shards for b in s)


def test_sampler_tiny_data_on_many_ranks_repeats_rather_than_starves():
    src, tgt = np.array([3, 4]), np.array([3, 4])
    shards = [list(TokenBatchSampler(src, tgt, 100, rank=r, world_size=4)) for r in range(4)]
    assert all(len(s) == 1 for s in shards)
    assert {i for s in shards for b in s for i in b} == {0, 1}


def test_sampler_resumes_mid_epoch_exactly():
    src, tgt = _lens()
    full = TokenBatchSampler(src, tgt, max_tokens=400, seed=9)
    full.set_epoch(2)
    expected = list(full)

    first = TokenBatchSampler(src, tgt, max_tokens=400, seed=9)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    assert state == {"epoch": 2, "position": 7, "world_size": 1}

    resumed = TokenBatchSampler(src, tgt, max_tokens=400, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop may call this again: it keeps the position
    assert head + list(resumed) == expected
    assert resumed.state_dict() == {"epoch": 2, "position": len(expected), "world_size": 1}
    resumed.set_epoch(3)
    assert resumed.state_dict() == {"epoch": 3, "position": 0, "world_size": 1}


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError):
        TokenBatchSampler(np.ones(3), np.ones(4), 10)
    with pytest.raises(ValueError):
        TokenBatchSampler(np.ones(3), np.ones(3), 10, rank=2, world_size=2)


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
    n = sum(len(b) for b in data.make_batches(valid, sampler, tok.pad_id, tok.bos_id, tok.eos_id))
    assert n == 1014
