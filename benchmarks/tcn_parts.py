#!/usr/bin/env python3
"""Two parts of the TCN timed against what they replace, at the preset's training shapes.

    python benchmarks/tcn_parts.py [--threads 1] [--repeats 20] [--batch 160] [--json OUT]

- dropout: `nmt.models.tcn._Dropout` (`keep_mask`: 15 random bits per element, four to an
  int64 draw) against nn.Dropout (bernoulli_) and against a mask from torch.rand (what
  `_Dropout` drew before), forward and backward over a (B, C, T) activation of a 3,000-token
  batch;
- the dilated depthwise convolution of `separable=true`: `_DilatedDepthwise` (k shifted
  multiply-adds, its own backward) against torch's grouped Conv1d with the same weights,
  forward and backward, at dilations 1-16.
Prints milliseconds per call (the minimum over --repeats rounds that alternate the two, as
benchmarks/cpu_precision.py times) and the ratio; the results of each pair are checked equal
(the convolution) or of the same keep rate (dropout) first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_precision import compare  # noqa: E402
from benchmarks.decode_speed import machine  # noqa: E402
from nmt.models.tcn import _DilatedDepthwise, _Dropout  # noqa: E402

C, T, K = 256, 20, 3  # the preset's width and kernel; 20 target positions


def _rand_mask_dropout(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    keep = torch.rand(x.shape, device=x.device).ge_(p).mul_(1.0 / (1.0 - p))
    return x * keep.to(x.dtype)


def time_dropout(B: int, repeats: int) -> list[dict]:
    x = torch.randn(B, C, T, requires_grad=True)
    ours, theirs = _Dropout(0.2).train(), nn.Dropout(0.2).train()
    kept = (ours(x) != 0).float().mean().item()
    assert abs(kept - 0.8) < 0.01, kept

    def run(module):
        return lambda: module(x).sum().backward()

    fns = {"ours": run(ours), "torch": run(theirs), "rand": run(_rand_mask_dropout)}
    ms = compare(fns, rounds=repeats, inner=1)
    row = {"shape": [B, C, T], "ours_ms": ms["ours"]}
    return [
        {"part": "dropout p=0.2 (nn.Dropout)", **row, "torch_ms": ms["torch"]},
        {"part": "dropout p=0.2 (torch.rand)", **row, "torch_ms": ms["rand"]},
    ]


def time_depthwise(B: int, dilation: int, repeats: int) -> dict:
    x = torch.randn(B, C, T + (K - 1) * dilation, requires_grad=True)  # padded input
    w = torch.randn(C, K, requires_grad=True)
    conv_w = w.detach().clone().unsqueeze(1).requires_grad_()  # (C, 1, K)
    torch.testing.assert_close(
        _DilatedDepthwise.apply(x, w, dilation),
        F.conv1d(x, conv_w, dilation=dilation, groups=C),
        atol=1e-4,
        rtol=0,
    )
    fns = {
        "ours": lambda: _DilatedDepthwise.apply(x, w, dilation).sum().backward(),
        "torch": lambda: F.conv1d(x, conv_w, dilation=dilation, groups=C).sum().backward(),
    }
    ms = compare(fns, rounds=repeats, inner=1)
    part = f"depthwise conv k={K} d={dilation}"
    return {"part": part, "ours_ms": ms["ours"], "torch_ms": ms["torch"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=160, help="sentences (160: a 3,000-token batch)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = time_dropout(args.batch, args.repeats)
    rows += [time_depthwise(args.batch, d, args.repeats) for d in (1, 2, 4, 8, 16)]
    report(rows, "torch", args.json)


def report(rows: list[dict], other: str, json_path: str | None) -> None:
    """Print each row's pair (`ours_ms` against `{other}_ms`) and their ratio; write the rows
    with the machine to `json_path` when given."""
    width = max(len(r["part"]) for r in rows)
    for r in rows:
        ratio = r[f"{other}_ms"] / r["ours_ms"]
        print(
            f"{r['part']:<{width}} ours {r['ours_ms']:7.2f} ms   {other} {r[f'{other}_ms']:7.2f} ms"
            f"   {other} / ours {ratio:5.2f}"
        )
    if json_path:
        Path(json_path).write_text(json.dumps({"machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()
