#!/usr/bin/env python3
"""Two parts of a training step timed against what they replaced, at the presets' shapes.

    python benchmarks/train_parts.py [--threads 2] [--repeats 10] [--json OUT]

- the loss's target term: `grad.scatter_add_` into the (N, V) bf16 gradient of a 3,000-token
  batch (a CPU converts the whole tensor to float32 and back) against the same sums into each
  float32 chunk before it is written (what `nmt.optimization._LabelSmoothedNLL` does now);
- Adam over the parameters of `configs/gnmt_small.yaml` and `configs/tcn_small.yaml`: the
  foreach implementation against `fused=True` (one kernel over all parameters).
Prints milliseconds per call (the minimum over --repeats rounds that alternate the two, as
benchmarks/cpu_precision.py times) and the ratio; each pair's results are checked equal first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_precision import compare  # noqa: E402
from benchmarks.tcn_parts import report  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.models import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N, V, CHUNK = 3000, 8000, 131  # a 3,000-token batch, the presets' vocabulary, the CPU chunk


def time_scatter(repeats: int) -> dict:
    grad = torch.randn(N, V).bfloat16()  # (N, V) the loss's gradient
    target = torch.randint(4, V, (N, 1))
    picked = -torch.rand(N, 1)  # (N, 1) float32

    def whole():
        grad.scatter_add_(1, target, picked.bfloat16())

    def chunked():
        for r0 in range(0, N, CHUNK):
            chunk = grad[r0 : r0 + CHUNK].float()  # the chunk the loss computes in float32
            chunk.scatter_add_(1, target[r0 : r0 + CHUNK], picked[r0 : r0 + CHUNK])
            grad[r0 : r0 + CHUNK] = chunk

    a, b = grad.clone(), grad.clone()
    grad.copy_(a)
    whole()
    a.copy_(grad)
    grad.copy_(b)
    chunked()
    torch.testing.assert_close(a, grad, atol=0.05, rtol=0.01)  # bf16 rounding of the sums
    ms = compare({"ours": chunked, "before": whole}, rounds=repeats, inner=1)
    return {"part": "loss target scatter, bf16 (3000, 8000)", **_pair(ms)}


def time_adam(config: str, repeats: int) -> dict:
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", [])
    models = [build_model(cfg.model, V, V, 0, True) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for a, b in zip(*(m.parameters() for m in models)):
        a.grad = torch.randn_like(a)
        b.grad = a.grad.clone()
    fused = torch.optim.Adam(models[0].parameters(), lr=1e-3, fused=True)
    foreach = torch.optim.Adam(models[1].parameters(), lr=1e-3, foreach=True)
    fused.step()
    foreach.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b)
    ms = compare({"ours": fused.step, "before": foreach.step}, rounds=repeats, inner=1)
    tensors = sum(1 for _ in models[0].parameters())
    return {"part": f"Adam step, {config} ({tensors} tensors)", **_pair(ms)}


def _pair(ms: dict) -> dict:
    return {"ours_ms": ms["ours"], "before_ms": ms["before"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [time_scatter(args.repeats)]
    rows += [time_adam(c, args.repeats) for c in ("gnmt_small", "tcn_small")]
    report(rows, "before", args.json)


if __name__ == "__main__":
    main()
