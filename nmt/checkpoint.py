"""One self-contained, versioned checkpoint file; atomic writes; safe loads.

Owns: the file format. A checkpoint is a dict of plain data and tensors only:
`format_version`, `config` (the resolved config as nested dicts), `model` (state dict),
`tokenizer` (sentencepiece model bytes as uint8 tensors), and optionally `train_state`
(optimizer, scheduler, step, sampler position, RNG states...) and `shortlist` (the vocabulary
shortlist's tables, nmt.shortlist: tensors only; a file without it loads as before). It is
written to a temporary file in the same folder, flushed to disk and renamed, so a file under its
final name is always complete; it is read with `torch.load(weights_only=True)`, so loading can
never run code. Does not own: what goes into `train_state` (nmt.training does) or `shortlist`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from nmt.errors import NmtError, UsageError
from nmt.textio import atomic_write
from nmt.tokenizer import Tokenizer

FORMAT_VERSION = 1
REQUIRED = ("format_version", "config", "model", "tokenizer")


def bytes_to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def tensor_to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _atomic_write(path: str | Path, write, what: str) -> None:
    """Call `write(f)` on a file written with nmt.textio.atomic_write; a failed write (a full
    disk) is an NmtError that says the previous file is unchanged."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            write(f)
    except BaseException as e:
        os_error = _os_error(e)
        if os_error is not None:
            raise NmtError(
                f"{path}: could not write {what} ({os_error.strerror or os_error}); "
                "the previous file under that name is unchanged"
            ) from None
        raise


def _os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind `e`, if any: torch.save turns a failed write (a full disk) into a
    RuntimeError raised while handling it."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def atomic_torch_save(obj, path: str | Path) -> None:
    """`torch.save` to `path` such that a file under that name is always complete."""
    _atomic_write(path, lambda f: torch.save(obj, f), "checkpoint")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 text to `path` such that a file under that name is always complete."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")), "file")


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files of checkpoint writes that a killed process left in `folder`.

    Call it only where no other process is writing checkpoints into the same folder.
    """
    stale = sorted(Path(folder).glob(".*.pt.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save(
    path: str | Path,
    *,
    config: dict,
    model_state: dict,
    tokenizer_bytes: dict[str, bytes],
    train_state: dict | None = None,
    shortlist: dict | None = None,
) -> None:
    ckpt = {
        "format_version": FORMAT_VERSION,
        "config": config,
        "model": model_state,
        "tokenizer": {k: bytes_to_tensor(v) for k, v in tokenizer_bytes.items()},
    }
    if train_state is not None:
        ckpt["train_state"] = train_state
    if shortlist is not None:
        ckpt["shortlist"] = shortlist
    atomic_torch_save(ckpt, path)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load and check a checkpoint; every way it can be wrong is one clear UsageError."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, expected a checkpoint file (e.g. {path}/best.pt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [line.strip() for line in str(e).splitlines() if "GLOBAL" in line.upper()]
        if lines:
            raise UsageError(
                f"{path}: refused to load: the file contains pickled Python objects, which an "
                f"nmt checkpoint never does and which could run code ({lines[0][:200]})"
            ) from None
        raise UsageError(
            f"{path}: not a readable nmt checkpoint (truncated, or not a checkpoint file)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to parse a user's file is a bad file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(
            f"{path}: not a readable nmt checkpoint (truncated or another format: {msg[:200]})"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise UsageError(f"{path}: not an nmt checkpoint (missing {', '.join(REQUIRED)})")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise UsageError(
            f"{path}: checkpoint format version {ckpt['format_version']!r}, this nmt reads "
            f"version {FORMAT_VERSION}"
        )
    return ckpt


def average(paths: list[str | Path]) -> dict:
    """One checkpoint whose weights are the mean of those in `paths` (Polyak averaging of the
    last few checkpoints of a run, as fairseq's and OpenNMT's averaging scripts do).

    Floating-point tensors are averaged in float64 and cast back; any other tensor (an integer
    buffer) is taken from the last file. Config and tokenizer come from the last file, and there
    is no `train_state`: the result translates, it does not resume (the last file's
    `shortlist`, if any, is kept: it depends on the data, not the weights). Every file must hold the
    same model (the same model config, tokenizer and tensor shapes), else one UsageError.
    """
    if not paths:
        raise UsageError("average: no checkpoints given")
    ref_path = Path(paths[-1])
    ref = load(ref_path)
    ref.pop("train_state", None)
    alias = _aliases(ref["model"])
    sums = {
        k: t.to(torch.float64, copy=True)
        for k, t in ref["model"].items()
        if t.is_floating_point() and alias[k] == k
    }
    for path in paths[:-1]:  # one file in memory at a time besides the sums: large models too
        ckpt = load(path)
        _check_same_model(Path(path), ckpt, ref_path, ref)
        for key, total in sums.items():
            total += ckpt["model"][key].double()
        del ckpt
    means = {key: (total / len(paths)).to(ref["model"][key].dtype) for key, total in sums.items()}
    state = {key: means.get(alias[key], t) for key, t in ref["model"].items()}
    averaged = {**{k: ref[k] for k in REQUIRED}, "model": state}
    if "shortlist" in ref:
        averaged["shortlist"] = ref["shortlist"]
    return averaged


def _aliases(state: dict) -> dict[str, str]:
    """Each key -> the first key naming the same tensor. Tied weights (a shared embedding and
    output projection) are one tensor under several names; `torch.save` writes it once, and the
    average must keep it one tensor, else the file holds a copy per name."""
    first: dict[tuple, str] = {}
    alias = {}
    for key, t in state.items():
        where = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        alias[key] = first.setdefault(where, key)
    return alias


def _check_same_model(path: Path, ckpt: dict, ref_path: Path, ref: dict) -> None:
    if ckpt["config"].get("model") != ref["config"].get("model"):
        raise UsageError(f"{path}: another model config than {ref_path}: cannot average them")
    if tokenizer_bytes(ckpt) != tokenizer_bytes(ref):
        raise UsageError(f"{path}: another tokenizer than {ref_path}: cannot average them")
    shapes = {k: tuple(t.shape) for k, t in ckpt["model"].items()}
    ref_shapes = {k: tuple(t.shape) for k, t in ref["model"].items()}
    if shapes != ref_shapes:
        diff = sorted(set(shapes.items()) ^ set(ref_shapes.items()))[:1]
        raise UsageError(f"{path}: weights differ from {ref_path} ({diff}): cannot average them")


def numbered(folder: str | Path) -> list[Path]:
    """The numbered checkpoints (`step_N.pt`, `train.save_every`) in `folder`, oldest first."""
    paths = Path(folder).glob("step_*.pt")
    return sorted((p for p in paths if p.stem[5:].isdigit()), key=lambda p: int(p.stem[5:]))


def tokenizer_bytes(ckpt: dict) -> dict[str, bytes]:
    return {k: tensor_to_bytes(v) for k, v in ckpt["tokenizer"].items()}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The sentencepiece model(s) of the checkpoint file `path`; a missing or unreadable file,
    or a tokenizer that does not load, is one UsageError naming it."""
    ckpt = load(path)
    try:
        return Tokenizer.from_bytes(tokenizer_bytes(ckpt), name=f"{path} (tokenizer)")
    except (RuntimeError, OSError, ValueError, KeyError, AttributeError) as e:
        raise UsageError(f"{path}: cannot load its sentencepiece model ({e})") from None
