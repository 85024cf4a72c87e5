#!/usr/bin/env python3
"""One decoding step's parts in each CPU precision, timed side by side (the choices behind
nmt/models/inference.py):

    python benchmarks/cpu_precision.py [--rows 640 5] [--threads 1] [--json OUT]

- a GNMT decoder layer at one step (input 512 = hidden + context, hidden 256): nn.LSTM in
  float32 (oneDNN), nn.LSTM with bf16 weights under autocast, and nmt's CellStep (one product
  over [x, h], then the pointwise update) in bf16 and int8;
- the LSTM update's pointwise part with torch.tanh against 2 sigmoid(2x) - 1;
- the output projection 256 -> 8000 in float32, bf16 and int8.

Each figure is the minimum over rounds that take the variants in turn (the least disturbed by
other work on a shared machine), in milliseconds per call; bf16 rows only where this CPU offers
bf16 (nmt.devices.cpu_offers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_speed import machine  # noqa: E402
from nmt.devices import cpu_offers  # noqa: E402
from nmt.models.inference import PRODUCTS, CellStep  # noqa: E402


def compare(fns: dict, rounds: int = 15, inner: int = 5) -> dict:
    """{name: ms per call}: the minimum over `rounds` rounds that call each function in turn."""
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / inner * 1e3)
    return {name: round(ms, 4) for name, ms in best.items()}


def layer_step(rows: int, precisions: list[str]) -> dict:
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(512, 256, batch_first=True).eval()
    x = torch.randn(rows, 1, 512)
    state = (torch.randn(1, rows, 256).tanh(), torch.randn(1, rows, 256))
    fns = {"nn.LSTM float32": lambda: lstm(x, state)}
    if "bfloat16" in precisions:
        lstm16 = torch.nn.LSTM(512, 256, batch_first=True).eval().bfloat16()
        x16, state16 = x.bfloat16(), tuple(s.bfloat16() for s in state)

        def autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return lstm16(x16, state16)

        fns["nn.LSTM bf16 autocast"] = autocast
    for name in precisions:
        cell = CellStep(lstm, PRODUCTS[name])
        fns[f"CellStep {name}"] = lambda cell=cell: cell(x, state)
    with torch.no_grad():
        return compare(fns)


def pointwise(rows: int) -> dict:
    gates, c = torch.randn(rows, 1024), torch.randn(rows, 256)

    def with_tanh():
        i, f, g, o = gates.chunk(4, 1)
        c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c1)

    def with_sigmoid():  # g's rows doubled beforehand, as CellStep does
        i, f, g, o = torch.sigmoid(gates).chunk(4, 1)
        c1 = torch.addcmul(f * c, i, g.mul(2.0).sub_(1.0))
        return (c1 * 2.0).sigmoid_().mul_(2.0).sub_(1.0).mul_(o)

    return compare({"tanh": with_tanh, "2 sigmoid(2x) - 1": with_sigmoid})


def output_projection(rows: int, precisions: list[str]) -> dict:
    torch.manual_seed(0)
    weight, bias, x = torch.randn(8000, 256) * 0.1, torch.randn(8000), torch.randn(rows, 256)
    fns = {"float32": lambda: F.linear(x, weight, bias)}
    for name in precisions:
        product = PRODUCTS[name](weight, bias)
        fns[name] = lambda product=product: product(x)
    with torch.no_grad():
        return compare(fns)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[640, 5], help="batch x beam rows")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    precisions = [n for n, why in cpu_offers().items() if not why and n != "float32"]
    result = {"machine": machine(), "ms_per_call": {}}
    for rows in args.rows:
        result["ms_per_call"][rows] = {
            "decoder layer step": layer_step(rows, precisions),
            "LSTM pointwise update": pointwise(rows),
            "output projection 256 -> 8000": output_projection(rows, precisions),
        }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
