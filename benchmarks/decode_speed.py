#!/usr/bin/env python3
"""Decoding speed of a checkpoint on a test set: sentences/s, target tokens/s, peak memory.

    python benchmarks/decode_speed.py CHECKPOINT --src runs/.../raw/test_2016_flickr.en \
        [--beam-sizes 1 5] [--batch-size N] [--repeats 3] [--threads 2] [--json OUT]
    # precisions and shortlists side by side (one process: same-minute ratios), BLEU, the peer
    python benchmarks/decode_speed.py CHECKPOINT --src test.en --ref test.de \
        --dtype float32 int8 bfloat16 --shortlist 0 10 --peer ../onmt/onmt.json
    # TCN only: also time the decoder that recomputes the whole prefix at every step
    python benchmarks/decode_speed.py CHECKPOINT --src ... --recompute
    # also one sentence at a time: latency per sentence (median, p95)
    python benchmarks/decode_speed.py CHECKPOINT --src ... --latency 1000

Model loading is excluded; each figure is the median of --repeats full passes over the file
(spread reported as min-max). With several --dtype/--shortlist settings, each repeat runs every
setting in turn, so that all of them meet the same load on a shared machine; the summary gives
each setting's speed as a ratio to the first one (and to the peer's figures with --peer: the
JSON that ../shared/bench/peer_onmt.sh writes, `beam5_sents_per_s_median` and
`greedy_sents_per_s_median`). Prints the machine (CPU, threads, torch) with the figures.

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
from nmt import metrics  # noqa: E402
from nmt.devices import cpu_flags, probe  # noqa: E402
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
    flags = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"}
    return {
        "cpu": cpu,
        "cpu_flags": sorted(cpu_flags() & flags),
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
    tokens encoded (and the sentences' lengths), decoder row-steps (and the rows run at each
    position) and (row, real source position) pairs attended. Costs a Python call per step,
    nothing per token."""

    def __init__(self, model):
        self.model = model
        self.src_tokens = self.row_steps = self.row_src_pairs = 0
        self.src_lens, self.rows_at, self.position = [], {}, 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, src_ids, src_lens):
        self.src_tokens += int(src_lens.sum())
        self.src_lens += src_lens.tolist()
        return self.model.encode(src_ids, src_lens)

    def init_state(self, enc):
        self.position = 0
        return self.model.init_state(enc)

    def step(self, tgt_ids_t, state, enc):
        rows = tgt_ids_t.size(0)
        self.row_steps += rows
        self.rows_at[self.position] = self.rows_at.get(self.position, 0) + rows
        self.position += 1
        self.row_src_pairs += int(enc.src_lens.sum())
        return self.model.step(tgt_ids_t, state, enc)

    def work(self) -> tuple:
        """`decode_flops`' arguments after the model."""
        return self.src_tokens, self.row_steps, self.row_src_pairs, self.rows_at, self.src_lens


def run(translator, lines: list[str], beam: int, batch, repeats: int, peak=None, **search) -> dict:
    """`repeats` timed passes; with the fp32 matmul `peak` (FLOP/s), the first also counts the
    search's work: model FLOPs, their rate, MFU and the rate that the peak would allow.
    `search`: more search settings (shortlist, ...)."""
    times, outputs = [], None
    for i in range(repeats):
        seconds, outputs, counter = _one_pass(
            translator, lines, beam, batch, i == 0 and peak, search
        )
        times.append(seconds)
        if counter is not None:
            work = counter
    result = _figures(translator, lines, beam, batch, times, outputs)
    if peak:
        result.update(_work_figures(translator.model, work, len(lines), result["seconds"], peak))
    return result


def _one_pass(translator, lines, beam: int, batch, count: bool, search: dict):
    """(seconds, outputs, the WorkCounter when `count`) of one pass over `lines`."""
    model = translator.model
    counter = WorkCounter(model) if count else None
    translator.model = counter or model
    try:
        start = time.perf_counter()
        outputs = translator.translate(lines, beam_size=beam, batch_size=batch, **search)
        return time.perf_counter() - start, outputs, counter
    finally:
        translator.model = model


def _figures(translator, lines, beam: int, batch, times: list[float], outputs) -> dict:
    tokens = sum(len(p) + 1 for p in translator.tokenizer.encode_tgt(outputs))  # pieces + eos
    med = statistics.median(times)
    return {
        "beam": beam,
        "batch_size": batch or translator.cfg.search.batch_size,
        "sentences": len(lines),
        "seconds": med,
        "spread": [min(times), max(times)],
        "sents_per_s": len(lines) / med,
        "sents_per_s_spread": [len(lines) / max(times), len(lines) / min(times)],
        "tgt_tok_per_s": tokens / med,
        "outputs": outputs,
    }


def _work_figures(model, counter, n_lines: int, seconds: float, peak: float) -> dict:
    flops = decode_flops(model, *counter.work())
    return {
        "row_steps": counter.row_steps,
        "model_gflop": flops / 1e9,
        "model_gflop_per_s": flops / seconds / 1e9,
        "mfu": flops / seconds / peak,
        "sents_per_s_at_peak": n_lines / (flops / peak),
    }


def _counts_work(setting: dict) -> bool:
    """Whether `decode_flops` can count this setting's work: float32 over the full vocabulary."""
    return setting["translator"].precision == "float32" and not setting["search"]["shortlist"]


def run_settings(settings: list[dict], lines, beam: int, batch, repeats: int, peak=None):
    """Each setting ({"name", "translator", "search"}) timed over `repeats` rounds that run
    every setting in turn (the same minute for all); their figures, in `settings`' order. With
    the fp32 matmul `peak`, the first pass of a float32 full-vocabulary setting also counts its
    work (MFU; the analytic count knows float32 layers only)."""
    times = {s["name"]: [] for s in settings}
    outputs, counters = {}, {}
    for i in range(repeats):
        for s in settings:
            count = bool(peak) and i == 0 and _counts_work(s)
            seconds, outputs[s["name"]], counter = _one_pass(
                s["translator"], lines, beam, batch, count, s["search"]
            )
            times[s["name"]].append(seconds)
            counters[s["name"]] = counter or counters.get(s["name"])
    results = []
    for s in settings:
        r = _figures(s["translator"], lines, beam, batch, times[s["name"]], outputs[s["name"]])
        r.update(setting=s["name"], precision=s["translator"].precision, **s["search"])
        if counters[s["name"]] is not None:
            work = _work_figures(
                s["translator"].model, counters[s["name"]], len(lines), r["seconds"], peak
            )
            r.update(work)
        results.append(r)
    return results


def latency(translator: Translator, lines: list[str], beam: int, **search) -> dict:
    """One sentence at a time (batch 1): per-sentence latency, median and 95th percentile."""
    times, outputs = [], []
    for line in lines:
        start = time.perf_counter()
        outputs += translator.translate([line], beam_size=beam, batch_size=1, **search)
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


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--src", required=True)
    p.add_argument("--ref", help="reference translations of --src: BLEU of every setting")
    p.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 5])
    p.add_argument(
        "--batch-size", type=int, help="sentences per batch (default: the checkpoint's setting)"
    )
    p.add_argument(
        "--dtype",
        nargs="+",
        default=["float32"],
        choices=("auto", "float32", "bfloat16", "int8"),
        help="precisions to time, side by side (search.dtype)",
    )
    p.add_argument(
        "--shortlist",
        type=int,
        nargs="+",
        default=[0],
        metavar="K",
        help="search.shortlist values to time (0 = every piece), side by side",
    )
    p.add_argument("--peer", help="OpenNMT-py's figures (onmt.json of peer_onmt.sh): ratios")
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
    return p.parse_args(argv)


def _settings(args) -> list[dict]:
    """One setting per (precision, shortlist), each precision's model loaded once."""
    settings = []
    for dtype in args.dtype:
        translator = Translator.from_checkpoint(args.checkpoint, device="cpu", dtype=dtype)
        name = translator.precision if dtype != "auto" else f"auto={translator.precision}"
        for k in args.shortlist:
            search = {"shortlist": k}  # 0: off, whatever the checkpoint's search.shortlist
            settings.append(
                {
                    "name": name + (f" shortlist {k}" if k else ""),
                    "translator": translator,
                    "search": search,
                }
            )
    return settings


def _compare(results: list[dict], refs, peer: dict | None) -> None:
    """BLEU, the ratio to the first setting of the same beam, and to the peer's figures."""
    first = {}
    for r in results:
        if refs is not None and "outputs" in r:  # batch 1 translates the first lines only
            r["bleu"] = round(metrics.bleu(r["outputs"], [refs[: len(r["outputs"])]]).score, 2)
        if r.get("path") != "batch 1":
            base = first.setdefault(r["beam"], r)
            r["speedup_vs_first"] = round(r["sents_per_s"] / base["sents_per_s"], 3)
            key = {1: "greedy", 5: "beam5"}.get(r["beam"])
            if peer and key and f"{key}_sents_per_s_median" in peer:
                r["ratio_to_peer"] = round(r["sents_per_s"] / peer[f"{key}_sents_per_s_median"], 3)
                r["peer_bleu"] = peer.get(f"{key}_bleu")


def _run_all(args, settings, lines, peak) -> list[dict]:
    results = []
    for beam in args.beam_sizes:
        timed = run_settings(settings, lines, beam, args.batch_size, args.repeats, peak)
        for r in timed:
            r["path"] = "cached"
        results += timed
        translator = settings[0]["translator"]
        if args.recompute:
            cached_model = translator.model
            translator.model = RecomputePrefix(cached_model).eval()
            slow = run(translator, lines, beam, args.batch_size, 1)
            translator.model = cached_model
            slow["path"] = "recompute"
            slow["same_output"] = slow["outputs"] == timed[0]["outputs"]
            slow["speedup_of_cache"] = slow["seconds"] / timed[0]["seconds"]
            results.append(slow)
        for s, r in zip(settings, timed) if args.latency else ():
            one = latency(s["translator"], lines[: args.latency], beam, **s["search"])
            one.update(path="batch 1", setting=s["name"], precision=s["translator"].precision)
            one["same_output"] = one["outputs"] == r["outputs"][: args.latency]
            results.append(one)
    return results


def main(argv=None) -> int:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = _settings(args)
    lines = read_lines(args.src)
    refs = read_lines(args.ref) if args.ref else None
    peer = json.loads(Path(args.peer).read_text()) if args.peer else None
    counted = any(_counts_work(s) for s in settings)
    peak = matmul_peak(torch.float32, torch.device("cpu")) if counted else None
    results = _run_all(args, settings, lines, peak)
    _compare(results, refs, peer)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    info = {
        "machine": machine(),
        "checkpoint": args.checkpoint,
        "src": args.src,
        "peak_rss_mib": peak_mib,
        "matmul_peak_gflop_per_s": peak / 1e9 if peak else None,
        "probe": probe().describe(),
        "peer": peer,
    }
    print(json.dumps(info))
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "outputs"}))
    _summary(results)
    if args.json:
        rows = [{k: v for k, v in r.items() if k != "outputs"} for r in results]
        Path(args.json).write_text(json.dumps({**info, "results": rows}, indent=1))
    return 0


def _summary(results: list[dict]) -> None:
    """One line per timed setting: sentences/s (min-max), the ratios, BLEU, latency."""
    for r in results:
        lo, hi = r.get("sents_per_s_spread", (r["sents_per_s"], r["sents_per_s"]))
        line = (
            f"beam {r['beam']:<2} {r.get('setting', r['path']):<28} {r['path']:<9} "
            f"{r['sents_per_s']:8.1f} sents/s ({lo:.1f}-{hi:.1f})"
        )
        for key, label in (("speedup_vs_first", "x first"), ("ratio_to_peer", "x peer")):
            if key in r:
                line += f"  {r[key]:.2f} {label}"
        if "bleu" in r:
            line += f"  BLEU {r['bleu']:.2f}"
        if "latency_ms_median" in r:
            ms = (r["latency_ms_median"], r["latency_ms_p95"])
            line += f"  latency median {ms[0]:.1f} ms, p95 {ms[1]:.1f} ms"
        print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
