#!/usr/bin/env python3
"""Training throughput of a config through the trainer's own update: tokens/s and MFU.

    python benchmarks/train_speed.py configs/gnmt_small.yaml \
        --data-dir runs/multi30k_en_de_small/data [--threads 1 2] [--json OUT] [overrides]
    python benchmarks/train_speed.py configs/gnmt_small.yaml --synthetic  # WMT-like lengths
    python benchmarks/train_speed.py configs/gnmt_small.yaml --data-dir ... train.precision=bf16

Each step is `nmt.optimization.Updater.step` (autocast at train.precision, label-smoothed loss,
backward, clipping, Adam), on batches from the same token-bucketed sampler as `nmt train`:
real prepared data (--data-dir), or random ids with WMT-like lengths (--synthetic, no data
needed). After --warmup steps, --windows windows of --steps steps are timed; figures are the
median window and the spread (min-max): target and source+target tokens/s, padding fraction,
model FLOPs utilisation (benchmarks/flops.py gives the formula; the peak is a 2048³ matrix
product at the same precision, measured in the same run), and peak RSS. Prints the machine with
the figures. Benchmark on a quiet machine: a busy core slows two threads several times.

    python benchmarks/train_speed.py configs/tcn_small.yaml --against configs/gnmt_small.yaml \
        --data-dir ... --threads 2 --windows 10 --steps 6

compares two configs in one process over the same batches: each batch is one step of each
model, the order alternating from batch to batch, so a change in the machine's load between
two runs (on a shared 2-core host, 0.8-1.2x from one process to the next) falls on both alike.
It adds `paired`: each window's ratio of target tokens/s (CONFIG over --against), their median
and range, and the ratio of the totals. The two configs must make the same batches (the same
train.max_tokens and vocabulary).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_speed import machine  # noqa: E402
from benchmarks.flops import forward_flops, matmul_peak  # noqa: E402
from benchmarks.gpu_check import random_batch, wmt_like_lengths  # noqa: E402
from nmt import batching, data  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.devices import resolve_dtype  # noqa: E402
from nmt.distributed import Distributed  # noqa: E402
from nmt.models import build_model, build_model_for  # noqa: E402
from nmt.optimization import Updater  # noqa: E402
from nmt.tokenizer import Tokenizer  # noqa: E402

SYNTHETIC_PAD = 0


def real_batches(cfg, data_dir: Path, n: int):
    tok = Tokenizer.load(data_dir)
    train = data.load_split(data_dir, "train")
    sampler = batching.TokenBatchSampler(*data.lengths(train), cfg.train.max_tokens, seed=1)
    batches = batching.make_batches(train, sampler, tok.pad_id, tok.bos_id, tok.eos_id)
    return [b for _, b in zip(range(n), batches)], build_model_for(cfg.model, tok), tok.pad_id


def synthetic_batches(cfg, n: int):
    vocab = cfg.tokenizer.vocab_size
    src_lens, tgt_lens = wmt_like_lengths(60_000, seed=1)
    sampler = batching.TokenBatchSampler(src_lens, tgt_lens, cfg.train.max_tokens, seed=1)
    rng = np.random.default_rng(2)
    batches = [
        random_batch(src_lens[idx], tgt_lens[idx], vocab, rng) for _, idx in zip(range(n), sampler)
    ]
    return batches, build_model(cfg.model, vocab, vocab, SYNTHETIC_PAD, True), SYNTHETIC_PAD


def _setup(cfg, args, threads: int):
    """(batches, model, updater, dtype) of `cfg`: the model built and trained from its seed."""
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    device = torch.device("cpu")
    n = args.warmup + args.windows * args.steps
    if args.synthetic:
        batches, model, pad_id = synthetic_batches(cfg, n)
    else:
        batches, model, pad_id = real_batches(cfg, Path(args.data_dir), n)
    if len(batches) < n:
        raise SystemExit(f"only {len(batches)} batches in the data; lower --steps or --windows")
    dtype = resolve_dtype(cfg.train.precision, device)
    updater = Updater(cfg, model, Distributed.single(device), dtype, pad_id, total_steps=10**6)
    model.train()
    return batches, model, updater, dtype


def _windows(batches, args) -> list[list]:
    timed = batches[args.warmup :]
    return [timed[w * args.steps : (w + 1) * args.steps] for w in range(args.windows)]


def _figures(model, dtype, threads, args, windows, seconds, peak) -> dict:
    """The row of one model: `seconds[w]` is the time its steps over `windows[w]` took."""
    rates = []
    for chunk, secs in zip(windows, seconds):
        tgt = sum(b.num_tgt_tokens for b in chunk)
        src = sum(b.num_src_tokens for b in chunk)
        flops = 3 * sum(forward_flops(model, b.src_lens, b.tgt_lens) for b in chunk)
        rates.append({"tgt": tgt / secs, "all": (tgt + src) / secs, "flops": flops / secs})
    timed = [b for chunk in windows for b in chunk]
    real = sum(b.num_src_tokens + b.num_tgt_tokens for b in timed)
    padded = sum(b.src_ids.numel() + b.tgt_out_ids.numel() for b in timed)

    def median_and_spread(key):
        values = [r[key] for r in rates]
        return statistics.median(values), [min(values), max(values)]

    tgt, tgt_spread = median_and_spread("tgt")
    flops, _ = median_and_spread("flops")
    return {
        "threads": threads,
        "precision": str(dtype).removeprefix("torch."),
        "steps_per_window": args.steps,
        "windows": args.windows,
        "sentences_per_batch": sum(len(b) for b in timed) / len(timed),
        "tgt_tok_per_s": tgt,
        "tgt_tok_per_s_spread": tgt_spread,
        "src_tgt_tok_per_s": median_and_spread("all")[0],
        "padding_fraction": 1 - real / padded,
        "model_gflop_per_s": flops / 1e9,
        "matmul_peak_gflop_per_s": peak / 1e9,
        "mfu": flops / peak,
        "params": sum(p.numel() for p in model.parameters()),
    }


def measure(cfg, args, threads: int) -> dict:
    batches, model, updater, dtype = _setup(cfg, args, threads)
    for batch in batches[: args.warmup]:
        updater.step([batch])
    windows, seconds = _windows(batches, args), []
    for chunk in windows:
        start = time.perf_counter()
        for batch in chunk:
            updater.step([batch])
        seconds.append(time.perf_counter() - start)
    peak = matmul_peak(dtype, torch.device("cpu"))
    return _figures(model, dtype, threads, args, windows, seconds, peak)


def measure_paired(cfgs: list, args, threads: int) -> dict:
    """Both configs over the same batches in this process, a step of each per batch (the order
    alternating): their rows and `paired`, the per-window ratios of the first to the second."""
    runs = [_setup(cfg, args, threads) for cfg in cfgs]
    shapes = [[(b.src_ids.shape, b.tgt_out_ids.shape) for b in run[0]] for run in runs]
    if shapes[0] != shapes[1]:
        raise SystemExit(
            "--against: the two configs make different batches; give them the same "
            "train.max_tokens and tokenizer"
        )
    batches = runs[0][0]
    for batch in batches[: args.warmup]:
        for run in runs:
            run[2].step([batch])
    windows, seconds, turn = _windows(batches, args), [[], []], 0
    for chunk in windows:
        spent = [0.0, 0.0]
        for batch in chunk:
            for k in (turn, 1 - turn):
                start = time.perf_counter()
                runs[k][2].step([batch])
                spent[k] += time.perf_counter() - start
            turn = 1 - turn
        for k in (0, 1):
            seconds[k].append(spent[k])
    peaks = {dtype: matmul_peak(dtype, torch.device("cpu")) for *_, dtype in runs}
    rows = [
        _figures(model, dtype, threads, args, windows, seconds[k], peaks[dtype])
        for k, (_, model, _, dtype) in enumerate(runs)
    ]
    ratios = [b / a for a, b in zip(*seconds)]  # tok/s of the first over the second's
    rows[0]["paired"] = {
        "tgt_tok_per_s_ratio": sum(seconds[1]) / sum(seconds[0]),
        "window_ratio_median": statistics.median(ratios),
        "window_ratio_spread": [min(ratios), max(ratios)],
        "window_ratios": ratios,
    }
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument(
        "--against", help="a second config, timed in the same process over the same batches"
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data-dir", help="a folder made by `nmt prepare`")
    source.add_argument("--synthetic", action="store_true", help="random ids, WMT-like lengths")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=10, help="steps per timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.against:
        against = load_config(args.against, args.overrides)
        rows = [row for t in args.threads for row in measure_paired([cfg, against], args, t)]
        for row, name in zip(rows, [args.config, args.against] * len(args.threads)):
            row["config"] = name
    else:
        rows = [measure(cfg, args, t) for t in args.threads]
    info = {
        "machine": machine(),
        "config": args.config,
        "against": args.against,
        "data": "synthetic (WMT-like lengths)" if args.synthetic else args.data_dir,
        "overrides": args.overrides,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print(json.dumps(info))
    for row in rows:
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(json.dumps({**info, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
