#!/usr/bin/env python3
"""Training throughput of a config on real prepared batches: target and source+target tokens/s.

    python benchmarks/train_speed.py configs/gnmt_small.yaml \
        --data-dir runs/multi30k_en_de_small/data \
        [--threads 1 2] [--steps 30] [--warmup 5] [--json OUT]

Runs forward + label-smoothed loss + backward + clipping + Adam on the first batches of the
shuffled training order (the same sampler as `nmt train`), after `--warmup` steps; reports the
median over `--steps` steps, the spread, the padding fraction and the peak RSS. Prints the
machine (CPU, threads, torch) with the figures. Benchmark on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_speed import machine  # noqa: E402
from nmt import data  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.models import build_model_for  # noqa: E402
from nmt.tokenizer import Tokenizer  # noqa: E402
from nmt.training import label_smoothed_loss  # noqa: E402


def measure(cfg, data_dir: Path, threads: int, steps: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)
    tok = Tokenizer.load(data_dir)
    train = data.load_split(data_dir, "train")
    sampler = data.TokenBatchSampler(*data.lengths(train), cfg.train.max_tokens, seed=1)
    batches = data.make_batches(train, sampler, tok.pad_id, tok.bos_id, tok.eos_id)
    model = build_model_for(cfg.model, tok)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    times, tgt, src, padded = [], [], [], []
    for i, batch in zip(range(warmup + steps), batches):
        start = time.perf_counter()
        logits = model(batch.src_ids, batch.src_lens, batch.tgt_in_ids)
        loss, _ = label_smoothed_loss(logits, batch.tgt_out_ids, tok.pad_id, 0.1)
        opt.zero_grad(set_to_none=True)
        (loss / batch.num_tgt_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tgt.append(batch.num_tgt_tokens)
            src.append(batch.num_src_tokens)
            padded.append(batch.tgt_out_ids.numel() + batch.src_ids.numel())
    per_tgt = [t / s for t, s in zip(tgt, times)]
    per_all = [(t + s) / d for t, s, d in zip(tgt, src, times)]
    return {
        "threads": threads,
        "steps": len(times),
        "tgt_tok_per_s": statistics.median(per_tgt),
        "tgt_tok_per_s_spread": [min(per_tgt), max(per_tgt)],
        "src_tgt_tok_per_s": statistics.median(per_all),
        "median_step_s": statistics.median(times),
        "padding_fraction": 1 - (sum(tgt) + sum(src)) / sum(padded),
        "params": sum(p.numel() for p in model.parameters()),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("--data-dir", required=True, help="a folder made by `nmt prepare`")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    rows = [measure(cfg, Path(args.data_dir), t, args.steps, args.warmup) for t in args.threads]
    info = {
        "machine": machine(),
        "config": args.config,
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
