"""Preparing data: prepare() end to end, its cache, bad inputs, and batches of a prepared split."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
from conftest import need_mirror

from nmt import batching, checkpoint, data
from nmt.batching import TokenBatchSampler
from nmt.cli import main
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

    mirror = need_mirror("multi30k")
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


# -- prepare --tokenizer-from CKPT -------------------------------------------------------------


def _spm_files(data_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data_dir.glob("spm*"))}


def _ckpt_models(path) -> dict[str, bytes]:
    return checkpoint.tokenizer_bytes(checkpoint.load(path))


def test_prepare_with_a_checkpoints_tokenizer(tiny_checkpoint, parallel_text, tmp_path, capsys):
    src, tgt = parallel_text(120, seed=5)
    data_dir = tmp_path / "data"
    config = tmp_path / "ft.yaml"
    config.write_text(f"data:\n  train_src: {src}\n  train_tgt: {tgt}\n")
    more = [f"data.dir={data_dir}", "tokenizer.vocab_size=40", "tokenizer.joint=false"]
    # the order: CONFIG --tokenizer-from CKPT, then overrides
    assert main(["prepare", str(config), "--tokenizer-from", str(tiny_checkpoint), *more]) == 0
    err = capsys.readouterr().err
    assert "nothing learned" in err and "learned Tokenizer" not in err
    models = _ckpt_models(tiny_checkpoint)
    assert _spm_files(data_dir) == {"spm.model": models["joint"]}  # byte for byte, nothing else
    tok = Tokenizer.load(data_dir)
    assert tok.to_bytes() == models  # what training and --init-from will compare
    settings = json.loads((data_dir / data.TOKENIZER_SETTINGS).read_text())
    assert settings["checkpoint"] == str(tiny_checkpoint.resolve())

    # the split is encoded with the checkpoint's model (joint, ~100 pieces, not 40 separate)
    rows = load_split(data_dir, "train")[:]
    src_lines = src.read_text().splitlines()
    assert rows["src_ids"] == [
        tok.encode_src([src_lines[i]])[0] + [tok.eos_id] for i in rows["line"]
    ]

    # a later prepare without the flag keeps that tokenizer: it never relearns over it
    spm_time = (data_dir / "spm.model").stat().st_mtime_ns
    assert main(["prepare", str(config), *more, "data.max_len=30"]) == 0
    err = capsys.readouterr().err
    assert f"the model of the checkpoint {tiny_checkpoint.resolve()}" in err
    assert "train: kept" not in err  # the new length limit re-encodes, with the same tokenizer
    assert _spm_files(data_dir) == {"spm.model": models["joint"]}
    assert (data_dir / "spm.model").stat().st_mtime_ns == spm_time
    assert main(["prepare", str(config), "--tokenizer-from", str(tiny_checkpoint), *more]) == 0
    assert (data_dir / "spm.model").stat().st_mtime_ns == spm_time  # the same: kept as it is


def test_prepare_refuses_a_tokenizer_that_is_no_longer_the_checkpoints(
    tiny_checkpoint, parallel_text, tmp_path, capsys
):
    src, tgt = parallel_text(120, seed=5)
    data_dir = tmp_path / "data"
    argv = ["prepare", f"data.train_src={src}", f"data.train_tgt={tgt}", f"data.dir={data_dir}"]
    assert main([*argv, "--tokenizer-from", str(tiny_checkpoint)]) == 0
    other = Tokenizer.train([src], [tgt], tmp_path / "other", vocab_size=60)
    other.save(data_dir)  # someone copied another model in
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "not the model of the checkpoint" in err
    assert f"--tokenizer-from {tiny_checkpoint.resolve()}" in err  # how to repair it
    assert main([*argv, "--tokenizer-from", str(tiny_checkpoint)]) == 0
    assert Tokenizer.load(data_dir).to_bytes() == _ckpt_models(tiny_checkpoint)


def test_prepare_tokenizer_from_replaces_a_learned_one_of_either_kind(
    tiny_checkpoint, parallel_text, tmp_path
):
    src, tgt = parallel_text(120, seed=5)
    data_dir = tmp_path / "data"
    argv = ["prepare", f"data.train_src={src}", f"data.train_tgt={tgt}", f"data.dir={data_dir}"]
    assert main([*argv, "tokenizer.vocab_size=60"]) == 0  # a learned joint model, with .vocab
    assert set(_spm_files(data_dir)) == {"spm.model", "spm.vocab"}
    separate = Tokenizer.train([src], [tgt], tmp_path / "sep", vocab_size=50, joint=False)
    ckpt = checkpoint.load(tiny_checkpoint)
    path = tmp_path / "separate.pt"
    checkpoint.save(
        path,
        config=ckpt["config"],
        model_state=ckpt["model"],
        tokenizer_bytes=separate.to_bytes(),
    )
    assert main([*argv, "--tokenizer-from", str(path)]) == 0
    assert _spm_files(data_dir) == {
        "spm.src.model": separate.to_bytes()["src"],
        "spm.tgt.model": separate.to_bytes()["tgt"],
    }
    assert len(load_split(data_dir, "train")) > 0


@pytest.mark.parametrize("bad", ["missing.pt", "notes.txt", "folder"])
def test_prepare_tokenizer_from_a_bad_checkpoint_is_one_error(parallel_text, tmp_path, bad, capsys):
    src, tgt = parallel_text(20, seed=5)
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "folder").mkdir()
    data_dir = tmp_path / "data"
    argv = ["prepare", f"data.train_src={src}", f"data.train_tgt={tgt}", f"data.dir={data_dir}"]
    assert main([*argv, "--tokenizer-from", str(tmp_path / bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{tmp_path / bad}:" in err and "Traceback" not in err
    assert not data_dir.exists()  # refused before anything was written
