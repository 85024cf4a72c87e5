"""Device and precision choice from the user's words ("auto", "cuda:1", "bf16", "int8").

Owns: turning a device/precision setting into torch objects, with one clear UsageError for a
device that does not exist or a precision this machine cannot run; the precision probe (which
precisions this build and CPU offer, and how fast a product of decoding's shapes runs in each);
and the int8 product (`int8_linear`) that the probe times and nmt.models.quantized uses.
Layer 0.

The probe, not a flag name or a CPU model, decides `auto` on a CPU: CPUs differ from machine to
machine (bf16 is 4-7x faster than float32 with AVX512-BF16 or AMX and 6-9x slower without; int8
products are fast wherever VNNI or AMX exist). It times one product of a GNMT decoder layer's
shape in float32, and in bfloat16 and int8 where they are offered, once per process and thread
count, and takes the fastest only if it beats float32 by SPEEDUP_NEEDED (a tie keeps float32).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nmt.errors import UsageError

CPU_PRECISIONS = ("float32", "bfloat16", "int8")  # in order of preference on a tie
CUDA_PRECISIONS = ("float32", "bfloat16", "float16")
TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int8": torch.float32,  # int8 products inside float32 layers: no autocast
}
PROBE_SHAPE = (256, 768, 1024)  # rows (batch x beam), [input, context, h] width, 4 x hidden
PROBE_ROUNDS = 5
SPEEDUP_NEEDED = 1.1  # below this ratio to float32 a precision is a tie, and float32 is kept


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
    """`train.precision`. auto: bf16 on a GPU with bf16 units (Ampere and later), fp16 on older
    GPUs; on a CPU bf16 where the probe finds it faster than fp32 (which needs native bf16 and
    the bf16 LSTM kernel), else fp32. fp16 needs a GPU: the CPU has no fp16 LSTM kernels."""
    if precision == "auto":
        if device.type != "cuda":
            return TORCH_DTYPES[probe().fastest(("float32", "bfloat16"))]
        return (
            torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float16
        )
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(
            f"precision fp16 needs a CUDA device, found {device}: the CPU has no fp16 LSTM "
            "kernels (use fp32 or bf16)"
        )
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def inference_precision(
    name: str, device: torch.device, key: str = "search.dtype", offers: dict | None = None
):
    """`search.dtype` `name` on `device` -> (precision, how it was chosen: one line).

    On a CPU, auto is the probe's fastest of CPU_PRECISIONS; bfloat16 and int8 are checked
    against what this CPU offers. On CUDA, auto is bfloat16 (float16 before Ampere) as for
    training; int8 is CPU-only. A combination this machine cannot run is one UsageError
    naming `key`. `offers`: `cpu_offers()`'s answer (read from the machine when None)."""
    if device.type == "cuda":
        if name == "int8":
            raise UsageError(
                f"{key}=int8: int8 decoding is CPU-only; on CUDA use auto, "
                "bfloat16, float16 or float32"
            )
        if name == "auto":
            chosen = "bfloat16" if resolve_dtype("auto", device) == torch.bfloat16 else "float16"
            return chosen, f"{chosen} (auto on {torch.cuda.get_device_name(device)})"
        return name, name
    if name == "float16":
        raise UsageError(
            f"{key}=float16 needs a CUDA device, found {device}: the CPU has no "
            "fp16 LSTM kernels (use auto, float32, bfloat16 or int8)"
        )
    if name == "auto":
        measured = probe()
        chosen = measured.fastest()
        return chosen, f"{chosen} (auto; {measured.describe()})"
    offers = cpu_offers() if offers is None else offers
    if offers.get(name):
        usable = ", ".join(["auto", *(p for p, why in offers.items() if not why)])
        raise UsageError(f"{key}={name}: {offers[name]}; this machine offers {usable}")
    return name, name


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


# ---------------------------------------------------------------------- the int8 product
def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (N, K) float -> (q (N, K) int8, scale (N,)
    float32) with weight ~= q * scale[:, None]."""
    weight = weight.detach().float()
    scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (N,)
    q = torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q.contiguous(), scale.contiguous()


def int8_linear(x: torch.Tensor, q_weight, w_scale, bias=None) -> torch.Tensor:
    """x (..., K) float32 @ int8 weight (N, K) (`quantize_weight`) -> (..., N) float32.

    Dynamic quantization: each row of x gets its own symmetric int8 scale (absmax / 127), the
    product runs int8 x int8 -> int32 (`torch._int_mm`, the core op that torchao and inductor
    lower int8 matrix products to; on a CPU it takes any sizes and a transposed weight), and
    the int32 sums are scaled back by (row scale x channel scale) in float32, plus the bias.
    """
    rows = x.reshape(-1, x.size(-1)).float()  # (M, K)
    x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12) / 127.0  # (M, 1)
    q_rows = torch.round(rows / x_scale).to(torch.int8)  # (M, K), |values| <= 127
    acc = torch._int_mm(q_rows, q_weight.t())  # (M, N) int32
    out = (acc * x_scale).mul_(w_scale)  # (M, N) float32: int32 x float promotes in one pass
    if bias is not None:  # in place: a large output's fresh buffer costs more than a pass
        out.add_(bias)
    return out.view(*x.shape[:-1], q_weight.size(0))  # (..., N)


# ---------------------------------------------------------------------- what this CPU offers
def cpu_flags() -> set[str]:
    """The CPU's feature words: torch's view (cpuinfo), plus /proc/cpuinfo where it exists."""
    caps = getattr(torch.cpu, "get_capabilities", dict)()
    flags = {k for k, v in caps.items() if v is True}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":")[0].strip() in ("flags", "Features"):
                flags |= set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return flags


def _native_bf16(flags: set[str]) -> bool:
    """bf16 arithmetic in hardware: AVX512-BF16 or AMX (x86), BF16 (Arm)."""
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"})


def bf16_rnn_problem() -> str:
    """'' where oneDNN's bf16 LSTM kernel runs here under autocast, else its error's first
    sentence (some builds and CPUs lack it: "could not create a primitive descriptor")."""
    try:
        with torch.random.fork_rng(), torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                torch.nn.LSTM(8, 8, batch_first=True)(torch.zeros(1, 2, 8))
    except RuntimeError as e:
        return str(e).split(".")[0]
    return ""


def _int8_problem() -> str:
    try:
        torch._int_mm(torch.ones(1, 8, dtype=torch.int8), torch.ones(8, 8, dtype=torch.int8))
    except (RuntimeError, AttributeError, NotImplementedError) as e:
        return f"this PyTorch ({torch.__version__}) has no CPU int8 product ({str(e)[:80]})"
    return ""


@functools.cache
def cpu_offers(flags: frozenset[str] | None = None, bf16_rnn: str | None = None) -> dict:
    """{precision: '' if this build and CPU offer it, else why not}, for CPU_PRECISIONS.

    `flags` (the CPU's feature words) and `bf16_rnn` (`bf16_rnn_problem()`'s answer) are read
    from the machine when None; tests give them."""
    flags = set(cpu_flags() if flags is None else flags)
    bf16 = (
        "" if _native_bf16(flags) else "this CPU has no native bf16 (AVX512-BF16, AMX or Arm BF16)"
    )
    if not bf16:
        problem = bf16_rnn_problem() if bf16_rnn is None else bf16_rnn
        if problem:
            bf16 = f"this PyTorch ({torch.__version__}) has no bf16 LSTM kernel here ({problem})"
    return {"float32": "", "bfloat16": bf16, "int8": _int8_problem()}


# ---------------------------------------------------------------------- the probe
@dataclass(frozen=True)
class Probe:
    """GFLOP/s of one product of PROBE_SHAPE in each precision offered (`gflops`), why the
    others are not (`missing`), and the thread count it ran at."""

    gflops: dict[str, float]
    missing: dict[str, str] = field(default_factory=dict)
    threads: int = 1

    def fastest(self, allowed=CPU_PRECISIONS) -> str:
        """The offered precision in `allowed` to decode in: taken in CPU_PRECISIONS' order
        (float32, bfloat16, int8), each replaces the one chosen so far only where it is at
        least SPEEDUP_NEEDED times faster. So never one slower than float32, and a tie keeps
        the more exact one (float32 first)."""
        best = "float32"
        for name in CPU_PRECISIONS:
            rate = self.gflops.get(name)
            if name in allowed and rate is not None:
                if rate >= SPEEDUP_NEEDED * self.gflops[best]:
                    best = name
        return best

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v:.0f}" for k, v in self.gflops.items())
        return f"probe GFLOP/s at {self.threads} thread(s): {rates}"


def _time_each(fns: dict[str, Callable[[], object]], rounds: int = PROBE_ROUNDS) -> dict:
    """Seconds per call of each function: the minimum over `rounds` passes that take the
    functions in turn (the figure least disturbed by other work on a shared machine)."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()  # first call: allocation and kernel set-up, not timed
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _probe_products(offered: dict) -> dict[str, Callable[[], object]]:
    m, k, n = PROBE_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)  # (M, K)
    weight = torch.randn(n, k, generator=gen) * 0.05  # (N, K)
    bias = torch.zeros(n)
    fns = {"float32": lambda: torch.nn.functional.linear(x, weight, bias)}
    if offered.get("bfloat16") == "":
        w16, b16 = weight.bfloat16(), bias.bfloat16()
        fns["bfloat16"] = lambda: torch.nn.functional.linear(x.bfloat16(), w16, b16)
    if offered.get("int8") == "":
        q, scale = quantize_weight(weight)
        fns["int8"] = lambda: int8_linear(x, q, scale, bias)
    return fns


_PROBES: dict[int, Probe] = {}


def probe(offered: dict | None = None, timer=None) -> Probe:
    """Time PROBE_SHAPE's product in each precision `offered` ({name: '' or why not}; default:
    `cpu_offers()`) with `timer` ({name: fn} -> {name: seconds per call}; default: the minimum
    of PROBE_ROUNDS round-robin passes). Measured once per process and thread count; a call
    with a `timer` or `offered` of its own is never cached."""
    threads = torch.get_num_threads()
    cached = offered is None and timer is None
    if cached and threads in _PROBES:
        return _PROBES[threads]
    offered = cpu_offers() if offered is None else offered
    seconds = (timer or _time_each)(_probe_products(offered))
    flop = 2.0 * PROBE_SHAPE[0] * PROBE_SHAPE[1] * PROBE_SHAPE[2]
    gflops = {name: flop / max(s, 1e-12) / 1e9 for name, s in seconds.items()}
    result = Probe(gflops, {k: v for k, v in offered.items() if v}, threads)
    if cached:
        _PROBES[threads] = result
    return result
