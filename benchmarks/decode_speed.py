#!/usr/bin/env python3
"""Decoding speed of a checkpoint on a test set: sentences/s, target tokens/s, peak memory.

    python benchmarks/decode_speed.py CHECKPOINT --src runs/.../raw/test_2016_flickr.en \
        [--beam-sizes 1 5] [--batch-size N] [--repeats 3] [--threads 2] [--json OUT]
    # TCN only: also time the decoder that recomputes the whole prefix at every step
    python benchmarks/decode_speed.py CHECKPOINT --src ... --recompute
    # also one sentence at a time: latency per sentence (median, p95)
    python benchmarks/decode_speed.py CHECKPOINT --src ... --latency 1000

Model loading is excluded; each figure is the median of --repeats full passes over the file
(spread reported as min-max). Prints the machine (CPU, threads, torch) with the figures.

The first pass also counts the search's work (benchmarks/flops.py, `decode_flops`): model GFLOPs,
their rate, MFU against a 2048³ float32 matrix product measured in the same run, and
`sents_per_s_at_peak`, the rate the same work would reach at that peak: a ceiling for any
exact speed-up of this search on this machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.flops import decode_flops, matmul_peak  # noqa: E402
from nmt.textio import read_lines  # noqa: E402
from nmt.translator import Translator  # noqa: E402


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }


class RecomputePrefix(torch.nn.Module):
    """Wraps a TCN model so that every step re-runs the whole prefix through the decoder's
    teacher-forcing path (no cache), and keeps its last position.

    The state is the prefix itself (B, t); used only to measure what the cache saves.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def encode(self, src_ids, src_lens):
        return self.model.encode(src_ids, src_lens)

    def init_state(self, enc):
        return torch.empty(enc.memory.size(0), 0, dtype=torch.long, device=enc.memory.device)

    def step(self, tgt_ids_t, prefix, enc):
        prefix = torch.cat([prefix, tgt_ids_t[:, None]], dim=1)  # (B, t+1)
        logits, attn = self.model.decoder.forward_with_attention(prefix, enc)  # (B, t+1, V)
        return torch.log_softmax(logits[:, -1].float(), dim=-1), prefix, attn[:, -1]

    def reorder_state(self, prefix, index):
        return prefix.index_select(0, index)

    def reorder_encoder_out(self, enc, index):
        return self.model.reorder_encoder_out(enc, index)


class WorkCounter:
    """Passes every call on to `model` and counts the work of the search's passes: real source
    tokens encoded, decoder row-steps and (row, real source position) pairs attended. Costs a
    Python call per step, nothing per token."""

    def __init__(self, model):
        self.model = model
        self.src_tokens = self.row_steps = self.row_src_pairs = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, src_ids, src_lens):
        self.src_tokens += int(src_lens.sum())
        return self.model.encode(src_ids, src_lens)

    def step(self, tgt_ids_t, state, enc):
        self.row_steps += tgt_ids_t.size(0)
        self.row_src_pairs += int(enc.src_lens.sum())
        return self.model.step(tgt_ids_t, state, enc)


def run(translator, lines: list[str], beam: int, batch, repeats: int, peak=None) -> dict:
    """`repeats` timed passes; with the fp32 matmul `peak` (FLOP/s), the first also counts the
    search's work: model FLOPs, their rate, MFU and the rate that the peak would allow."""
    times, outputs = [], None
    model, counter = translator.model, WorkCounter(translator.model)
    for i in range(repeats):
        translator.model = counter if i == 0 and peak else model
        start = time.perf_counter()
        outputs = translator.translate(lines, beam_size=beam, batch_size=batch)
        times.append(time.perf_counter() - start)
    translator.model = model
    tokens = sum(len(p) + 1 for p in translator.tokenizer.encode_tgt(outputs))  # pieces + eos
    med = statistics.median(times)
    result = {
        "beam": beam,
        "batch_size": batch or translator.cfg.search.batch_size,
        "sentences": len(lines),
        "seconds": med,
        "spread": [min(times), max(times)],
        "sents_per_s": len(lines) / med,
        "tgt_tok_per_s": tokens / med,
        "outputs": outputs,
    }
    if peak:
        flops = decode_flops(model, counter.src_tokens, counter.row_steps, counter.row_src_pairs)
        result.update(
            row_steps=counter.row_steps,
            model_gflop=flops / 1e9,
            model_gflop_per_s=flops / med / 1e9,
            mfu=flops / med / peak,
            sents_per_s_at_peak=len(lines) / (flops / peak),
        )
    return result


def latency(translator: Translator, lines: list[str], beam: int) -> dict:
    """One sentence at a time (batch 1): per-sentence latency, median and 95th percentile."""
    times, outputs = [], []
    for line in lines:
        start = time.perf_counter()
        outputs += translator.translate([line], beam_size=beam, batch_size=1)
        times.append(time.perf_counter() - start)
    tokens = sum(len(p) + 1 for p in translator.tokenizer.encode_tgt(outputs))  # pieces + eos
    total = sum(times)
    ms = sorted(1000 * t for t in times)
    return {
        "beam": beam,
        "batch_size": 1,
        "sentences": len(lines),
        "seconds": total,
        "sents_per_s": len(lines) / total,
        "tgt_tok_per_s": tokens / total,
        "latency_ms_median": statistics.median(ms),
        "latency_ms_p95": ms[min(len(ms) - 1, int(0.95 * len(ms)))],
        "outputs": outputs,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--src", required=True)
    p.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 5])
    p.add_argument(
        "--batch-size", type=int, help="sentences per batch (default: the checkpoint's setting)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--recompute", action="store_true", help="TCN: also time prefix recompute")
    p.add_argument(
        "--latency",
        type=int,
        default=0,
        metavar="N",
        help="also translate the first N lines one at a time (batch 1): latency median and p95",
    )
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    translator = Translator.from_checkpoint(args.checkpoint, device="cpu")
    lines = read_lines(args.src)
    peak = matmul_peak(torch.float32, torch.device("cpu"))
    results = []
    for beam in args.beam_sizes:
        r = run(translator, lines, beam, args.batch_size, args.repeats, peak)
        r["path"] = "cached"
        results.append(r)
        if args.recompute:
            cached_model = translator.model
            translator.model = RecomputePrefix(cached_model).eval()
            slow = run(translator, lines, beam, args.batch_size, 1)
            translator.model = cached_model
            slow["path"] = "recompute"
            slow["same_output"] = slow["outputs"] == r["outputs"]
            slow["speedup_of_cache"] = slow["seconds"] / r["seconds"]
            results.append(slow)
        if args.latency:
            one = latency(translator, lines[: args.latency], beam)
            one["path"] = "batch 1"
            one["same_output"] = one["outputs"] == r["outputs"][: args.latency]
            results.append(one)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = {
        "machine": machine(),
        "checkpoint": args.checkpoint,
        "src": args.src,
        "peak_rss_mib": peak_mib,
        "matmul_peak_gflop_per_s": peak / 1e9,
    }
    print(json.dumps(info))
    for r in results:
        row = {k: v for k, v in r.items() if k != "outputs"}
        print(json.dumps(row))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    **info,
                    "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results],
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
