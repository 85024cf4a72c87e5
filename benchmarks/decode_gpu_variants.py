#!/usr/bin/env python3
"""Exploration on a GPU: beam-5 batch-128 decoding of GNMT v2 4x1024 (bf16 weights, random,
eos masked as in gpu_check) with the decoder's one-step layers as cell functions (the default)
or cuDNN, a profile of the static search's kernels, and (with CHECKPOINT and SRC) a trained model
translating SRC in fp32/bf16 with cells or cuDNN; results in OUT/variants.json.

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

import functools  # noqa: E402

import gpu_check  # noqa: E402

from nmt import search, search_graph  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.models import build_model, gnmt  # noqa: E402

out_dir = Path(sys.argv[1])
out_dir.mkdir(parents=True, exist_ok=True)
device = torch.device("cuda")
cfg = load_config(str(ROOT / "configs/gnmt_v2.yaml"), [])
vocab = cfg.tokenizer.vocab_size
torch.manual_seed(0)
model = build_model(cfg.model, vocab, vocab, gpu_check.PAD, True).to(device)
model.eval()
results = {}


def timed(name, fn, **kw):
    torch.cuda.synchronize()
    try:
        r = gpu_check.decode_throughput(cfg, model, device, torch.bfloat16, 16, 128, **kw)
    except Exception as e:  # noqa: BLE001
        results[name] = {"error": f"{type(e).__name__}: {str(e)[-600:]}"}
        print(name, results[name], flush=True)
        return None
    outputs = r.pop("outputs")
    results[name] = {k: r[k] for k in ("tgt_tok_s", "seconds", "sents_per_s")}
    print(name, results[name], flush=True)
    return outputs


def one_step_layers(cell: bool):
    """Decoder layers at one step as their cell function (the default on CUDA) or cuDNN."""
    run = gnmt.run_layer.__wrapped__ if hasattr(gnmt.run_layer, "__wrapped__") else gnmt.run_layer

    @functools.wraps(run)
    def patched(rnn, x, state, one_step_cell=None):
        return run(rnn, x, state, one_step_cell=cell and x.size(1) == 1)

    gnmt.run_layer = patched


model.to(torch.bfloat16)  # as the Translator and gpu_check keep the weights on CUDA
outputs = {}
for repeat in range(3):  # alternated, medians reported: the figures move by several % per call
    for name, cell in (("graph_cell", True), ("graph_cudnn", False)):
        one_step_layers(cell)
        outputs[name] = timed(f"{name}_{repeat}", None)
one_step_layers(True)
for name in ("graph_cell", "graph_cudnn"):
    runs = [results[f"{name}_{r}"].get("tgt_tok_s", 0) for r in range(3)]
    results[name] = {"median_tgt_tok_s": sorted(runs)[1], "runs": runs}
if all(outputs.values()):
    same = sum(a == b for a, b in zip(outputs["graph_cell"], outputs["graph_cudnn"]))
    results["cell_same_as_cudnn"] = same

# a trained model (Multi30k, CPU-trained checkpoint) on the 1,000 test_2016_flickr sentences
from nmt.translator import Translator  # noqa: E402

trained = sys.argv[2:4]
lines = Path(trained[1]).read_text().splitlines() if trained else []
runs = [("fp32_cell", "fp32", True), ("fp32_cudnn", "fp32", False), ("bf16_cell", "bf16", True)]
for name, dtype, cell in runs if trained else []:  # bf16: the Translator keeps bf16 weights
    one_step_layers(cell)
    tr = Translator.from_checkpoint(trained[0], "cuda", dtype)
    tr.translate(lines[:64], beam_size=5)  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    hyps = tr.translate(lines, beam_size=5)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    (out_dir / f"m30k_{name}.de").write_text("\n".join(hyps) + "\n")
    results[f"m30k_{name}"] = {"seconds": secs, "sents_per_s": len(lines) / secs}
    print(name, results[f"m30k_{name}"], flush=True)
one_step_layers(True)


# where a step's GPU time goes: the static search eagerly (same kernels as the graph)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

batch = gpu_check._decode_batches(1, 128, vocab, seed=8)[0]
wrapped = gpu_check.RunToLimit(model)
s = cfg.search
in_place = functools.partial(search_graph.search, mode="in_place")
settings = search.SearchSettings(
    bos_id=gpu_check.BOS, eos_id=gpu_check.EOS, pad_id=gpu_check.PAD, beam_size=5,
    alpha=s.alpha, max_len_a=s.max_len_a, max_len_b=s.max_len_b,
)  # fmt: skip
with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
    search.beam_search(wrapped, batch[0].to(device), batch[1].to(device), settings, run=in_place)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        search.beam_search(
            wrapped, batch[0].to(device), batch[1].to(device), settings, run=in_place
        )
        torch.cuda.synchronize()
(out_dir / "static_eager_profile.txt").write_text(
    prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=45)
)
(out_dir / "variants.json").write_text(json.dumps(results, indent=1))
print(json.dumps(results, indent=1))
