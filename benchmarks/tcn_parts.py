#!/usr/bin/env python3
"""Two parts of the TCN timed against what they replace, at the preset's training shapes.

    python benchmarks/tcn_parts.py [--threads 1] [--repeats 20] [--batch 160] [--json OUT]

- dropout: `nmt.models.tcn._Dropout` (`keep_mask`: 7 random bits per element, eight to an
  int64 draw) against nn.Dropout (bernoulli_), a mask from torch.rand (what `_Dropout` drew
  until 2026-12-02) and the 15-bit mask it drew until 2026-12-03 (four elements to a draw),
  forward and backward over a (B, C, T) activation of a 3,000-token batch, in float32 and in
  bf16 (what autocast hands it on a CPU with native bf16);
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


def _mask15_dropout(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    n = x.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    lanes = draws.view(torch.int16)[:n].view(x.shape)  # 16-bit lanes, the low 15 bits used
    dropped = lanes.bitwise_and_(2**15 - 1).sub_(round(p * 2**15)).bitwise_right_shift_(15)
    return x * dropped.add_(1).to(x.dtype).mul_(1.0 / (1.0 - p))


def time_dropout(B: int, repeats: int, dtype: torch.dtype) -> list[dict]:
    x = torch.randn(B, C, T, dtype=dtype, requires_grad=True)
    ours, theirs = _Dropout(0.2).train(), nn.Dropout(0.2).train()
    kept = (ours(x) != 0).float().mean().item()
    assert abs(kept - 0.8) < 0.01, kept

    def run(module):
        return lambda: module(x).sum().backward()

    others = {"nn.Dropout": theirs, "torch.rand": _rand_mask_dropout, "15 bits": _mask15_dropout}
    fns = {"ours": run(ours), **{name: run(f) for name, f in others.items()}}
    ms = compare(fns, rounds=repeats, inner=1)
    row = {"shape": [B, C, T], "dtype": str(dtype).removeprefix("torch."), "ours_ms": ms["ours"]}
    return [
        {"part": f"dropout p=0.2 {row['dtype']} ({name})", **row, "torch_ms": ms[name]}
        for name in others
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
    rows = [
        r
        for dt in (torch.float32, torch.bfloat16)
        for r in time_dropout(args.batch, args.repeats, dt)
    ]
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
