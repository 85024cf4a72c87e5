"""Checkpoint file format: round trip, atomic writes, and every way a file can be wrong."""

import os
import pickle

import pytest
import torch

from nmt import checkpoint
from nmt.errors import NmtError, UsageError


def _save(path, **extra):
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    checkpoint.save(
        path,
        config={"model": {"hidden": 3}},
        model_state=state,
        tokenizer_bytes={"joint": b"\x00spm\xff"},
        train_state=extra or None,
    )
    return state


def test_round_trip_bit_identical(tmp_path):
    path = tmp_path / "a.pt"
    state = _save(path, step=3, rng={"python": (3, (1, 2), None)})
    ckpt = checkpoint.load(path)
    assert torch.equal(ckpt["model"]["w"], state["w"])
    assert checkpoint.tokenizer_bytes(ckpt) == {"joint": b"\x00spm\xff"}
    assert ckpt["train_state"]["step"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]  # no temp file left


def test_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "t.pt"
    _save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match=f"{path}: not a readable nmt checkpoint"):
        checkpoint.load(path)


def test_non_checkpoint_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(UsageError, match="notes.txt"):
        checkpoint.load(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(UsageError, match="not an nmt checkpoint"):
        checkpoint.load(other)
    with pytest.raises(UsageError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")
    with pytest.raises(UsageError, match="is a folder"):
        checkpoint.load(tmp_path)


def test_other_format_version(tmp_path):
    path = tmp_path / "v.pt"
    torch.save({"format_version": 99, "config": {}, "model": {}, "tokenizer": {}}, path)
    with pytest.raises(UsageError, match="format version 99, this nmt reads version 1"):
        checkpoint.load(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "config": _Evil(), "model": {}, "tokenizer": {}}, path)
    with pytest.raises(UsageError, match="refused to load"):
        checkpoint.load(path)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(UsageError):
        checkpoint.load(raw)
    assert not (tmp_path / "PWNED_BY_CHECKPOINT").exists()


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    _save(path, step=1)
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(NmtError, match="No space left on device.*previous file"):
        _save(path, step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
