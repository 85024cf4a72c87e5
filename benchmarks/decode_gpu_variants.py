#!/usr/bin/env python3
"""Exploration on a GPU: beam-5 batch-128 decoding of GNMT v2 4x1024 (bf16, random weights,
eos masked as in gpu_check) under search variants, a top-k micro-benchmark, a profile of the
static search's kernels, and (with CHECKPOINT and SRC) a trained model translating SRC in
fp32/bf16 with and without graphs; results in OUT/variants.json.

    python benchmarks/decode_gpu_variants.py OUT [CHECKPOINT SRC]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402

import gpu_check  # noqa: E402

from nmt import search, search_graph  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.models import build_model  # noqa: E402

out_dir = Path(sys.argv[1])
out_dir.mkdir(parents=True, exist_ok=True)
device = torch.device("cuda")
cfg = load_config(str(ROOT / "configs/gnmt_v2.yaml"), [])
vocab = cfg.tokenizer.vocab_size
torch.manual_seed(0)
model = build_model(dataclasses.asdict(cfg.model), vocab, vocab, gpu_check.PAD, True).to(device)
model.eval()
results = {}


def timed(name, fn, **kw):
    torch.cuda.synchronize()
    try:
        r = gpu_check.decode_throughput(cfg, model, device, torch.bfloat16, 4, 128, **kw)
    except Exception as e:  # noqa: BLE001
        results[name] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
        print(name, results[name], flush=True)
        return None
    outputs = r.pop("outputs")
    results[name] = {k: r[k] for k in ("tgt_tok_s", "seconds", "sents_per_s")}
    print(name, results[name], flush=True)
    return outputs


graph_out = timed("graph", None)


def top_direct(scores, n, k):
    """The 2k best of each sentence straight from its (K*V) scores (one top-k per sentence)."""
    vocab_size = scores.size(1)
    top_scores, flat = scores.view(n, -1).topk(min(2 * k, k * vocab_size), dim=1)
    flat, order = flat.sort(dim=1)
    top_scores = top_scores.gather(1, order)
    top_scores, order = top_scores.sort(dim=1, descending=True, stable=True)
    flat = flat.gather(1, order)
    return top_scores, flat // vocab_size, flat % vocab_size


orig = search_graph._top_candidates
search_graph._top_candidates = top_direct
direct_out = timed("graph_topk_per_sentence", None)
if graph_out and direct_out:
    results["topk_per_sentence_same"] = sum(a == b for a, b in zip(graph_out, direct_out))
search_graph._top_candidates = orig

fp32_model = model
model = copy.deepcopy(fp32_model).to(torch.bfloat16)
bf16_out = timed("graph_bf16_weights", None)
if graph_out and bf16_out:
    results["bf16_weights_same"] = sum(a == b for a, b in zip(graph_out, bf16_out))
model = fp32_model

# a trained model (Multi30k, CPU-trained checkpoint) on the 1,000 test_2016_flickr sentences
from nmt.translator import Translator  # noqa: E402

trained = sys.argv[2:4]
lines = Path(trained[1]).read_text().splitlines() if trained else []
runs = [("fp32_graph", "fp32", True), ("bf16_graph", "bf16", True), ("bf16_eager", "bf16", False)]
for name, dtype, graphs in runs if trained else []:  # bf16: the Translator keeps bf16 weights
    tr = Translator.from_checkpoint(trained[0], "cuda", dtype)
    tr.cfg.search.cuda_graph = graphs
    tr.translate(lines[:64], beam_size=5)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hyps = tr.translate(lines, beam_size=5)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    (out_dir / f"m30k_{name}.de").write_text("\n".join(hyps) + "\n")
    results[f"m30k_{name}"] = {"seconds": secs, "sents_per_s": len(lines) / secs}
    print(name, results[f"m30k_{name}"], flush=True)


# where a step's GPU time goes: the static search eagerly (same kernels as the graph)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

batch = gpu_check._decode_batches(1, 128, vocab, seed=8)[0]
wrapped = gpu_check.RunToLimit(model)
s = cfg.search
in_place = functools.partial(search_graph.search, mode="in_place")
kw = dict(bos_id=gpu_check.BOS, eos_id=gpu_check.EOS, pad_id=gpu_check.PAD, beam_size=5)
kw.update(alpha=s.alpha, max_len_a=s.max_len_a, max_len_b=s.max_len_b, run=in_place)
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    model.to(torch.bfloat16)
    search.beam_search(wrapped, batch[0].to(device), batch[1].to(device), **kw)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        search.beam_search(wrapped, batch[0].to(device), batch[1].to(device), **kw)
        torch.cuda.synchronize()
(out_dir / "static_eager_profile.txt").write_text(
    prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
)
(out_dir / "variants.json").write_text(json.dumps(results, indent=1))
print(json.dumps(results, indent=1))
