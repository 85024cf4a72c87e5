"""Device and precision choice from the user's words ("auto", "cuda:1", "bf16").

Owns: turning a device/precision setting into torch objects, with one clear UsageError for a
device that does not exist. Layer 0.
"""

from __future__ import annotations

import torch

from nmt.errors import UsageError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {name!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) here"
            )
    elif device.type != "cpu":
        raise UsageError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU with bf16 units (Ampere and later), fp16 on older GPUs, fp32 on the
    CPU. fp16 needs a GPU: the CPU has no fp16 LSTM kernels."""
    if precision == "auto":
        if device.type != "cuda":
            return torch.float32
        return (
            torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        )
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(
            f"precision fp16 needs a CUDA device, found {device}: the CPU has no fp16 LSTM "
            "kernels (use fp32 or bf16)"
        )
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def check_autocast(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, key: str):
    """One UsageError, naming `key`, where this build cannot run `model`'s recurrent layers
    under autocast at `dtype` on `device`.

    bf16 LSTM/GRU/RNN layers on a CPU need oneDNN's bf16 RNN kernels, which some PyTorch builds
    and CPUs lack ("could not create a primitive descriptor"); a tiny layer of each kind in the
    model is probed once, so the run fails before any work rather than at its first batch.
    """
    if device.type != "cpu" or dtype == torch.float32:
        return
    kinds = {type(m) for m in model.modules() if isinstance(m, torch.nn.RNNBase)}
    for kind in sorted(kinds, key=lambda k: k.__name__):
        try:
            with torch.random.fork_rng(), torch.autocast("cpu", dtype=dtype), torch.no_grad():
                kind(8, 8, batch_first=True)(torch.zeros(1, 2, 8))  # leaves the seed's stream
        except RuntimeError as e:
            name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
            raise UsageError(
                f"{key}={name}: this PyTorch ({torch.__version__}) has no {name} "
                f"{kind.__name__} kernel on this CPU ({str(e).split('.')[0]}); use fp32 on the "
                "CPU, or a TCN model"
            ) from None
