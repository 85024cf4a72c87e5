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


# ------------------------------------------------------------------ averaging
def _save_weights(path, w, steps=7, config=None, tok=b"\x00spm\xff"):
    checkpoint.save(
        path,
        config=config or {"model": {"hidden": 3}},
        model_state={"w": w, "steps": torch.tensor(steps)},
        tokenizer_bytes={"joint": tok},
        train_state={"step": steps},
    )
    return path


def test_average_is_the_mean_of_float_weights(tmp_path):
    a = _save_weights(tmp_path / "step_10.pt", torch.tensor([1.0, 2.0]), steps=10)
    b = _save_weights(tmp_path / "step_20.pt", torch.tensor([3.0, 6.0]), steps=20)
    avg = checkpoint.average([a, b])
    assert torch.equal(avg["model"]["w"], torch.tensor([2.0, 4.0]))
    assert avg["model"]["w"].dtype == torch.float32
    assert int(avg["model"]["steps"]) == 20  # not a float: taken from the last file
    assert "train_state" not in avg  # translates, does not resume
    checkpoint.atomic_torch_save(avg, tmp_path / "avg.pt")
    assert torch.equal(checkpoint.load(tmp_path / "avg.pt")["model"]["w"], avg["model"]["w"])


def test_average_keeps_tied_weights_one_tensor(tmp_path):
    # an embedding tied to the output projection: one tensor under two names, stored once
    paths = []
    for step, value in [(10, 1.0), (20, 3.0)]:
        emb = torch.full((4, 3), value)
        state = {"emb.weight": emb, "out.weight": emb, "out.bias": torch.full((4,), value)}
        paths.append(tmp_path / f"step_{step}.pt")
        checkpoint.save(paths[-1], config={}, model_state=state, tokenizer_bytes={"j": b"x"})
    avg = checkpoint.average(paths)["model"]
    assert torch.equal(avg["emb.weight"], torch.full((4, 3), 2.0))
    assert torch.equal(avg["out.bias"], torch.full((4,), 2.0))
    assert avg["out.weight"] is avg["emb.weight"]
    checkpoint.atomic_torch_save({"model": avg}, tmp_path / "avg.pt")
    loaded = torch.load(tmp_path / "avg.pt", weights_only=True)["model"]
    storage = [loaded[k].untyped_storage().data_ptr() for k in ("emb.weight", "out.weight")]
    assert storage[0] == storage[1]  # written once


def test_average_keeps_empty_tensors_apart(tmp_path):
    # empty tensors all sit at a null storage address: same address, but not one tensor
    state = {"w": torch.zeros(0), "count": torch.zeros(0, dtype=torch.int64)}
    paths = [tmp_path / "step_1.pt", tmp_path / "step_2.pt"]
    for path in paths:
        checkpoint.save(path, config={}, model_state=state, tokenizer_bytes={"j": b"x"})
    avg = checkpoint.average(paths)["model"]
    assert avg["w"].dtype == torch.float32 and avg["count"].dtype == torch.int64


def test_average_refuses_different_models(tmp_path):
    a = _save_weights(tmp_path / "a.pt", torch.zeros(2))
    other_shape = _save_weights(tmp_path / "b.pt", torch.zeros(3))
    other_config = _save_weights(tmp_path / "c.pt", torch.zeros(2), config={"model": {"x": 1}})
    other_tok = _save_weights(tmp_path / "d.pt", torch.zeros(2), tok=b"other")
    for bad, what in [(other_shape, "weights differ"), (other_config, "model config"),
                      (other_tok, "tokenizer")]:  # fmt: skip
        with pytest.raises(UsageError, match=f"{bad.name}.*{what}"):
            checkpoint.average([bad, a])
    with pytest.raises(UsageError, match="no checkpoints"):
        checkpoint.average([])


def test_numbered_sorts_by_step(tmp_path):
    for step in (100, 20, 3):
        _save_weights(tmp_path / f"step_{step}.pt", torch.zeros(2))
    (tmp_path / "step_x.pt").write_bytes(b"")
    assert [p.name for p in checkpoint.numbered(tmp_path)] == [
        "step_3.pt", "step_20.pt", "step_100.pt"
    ]  # fmt: skip
