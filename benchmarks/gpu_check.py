#!/usr/bin/env python3
"""One prepared GPU check, under 8 minutes on one H100; results as JSON in OUT_DIR.

    benchmarks/gpu_check.sh OUT_DIR [--corpus DIR] [--train-minutes M]
    python benchmarks/gpu_check.py OUT_DIR [--corpus DIR] [...] [section.key=value ...]

Stages, each written into OUT_DIR/gpu_check.json as soon as it ends (a run cut short keeps what
it finished):
1. tests: `pytest -m gpu` (tests/test_gpu.py): counts, and the names of failed tests;
2. train: training throughput (source + target tokens/s) of GNMT v2 4x1024
   (configs/gnmt_v2.yaml, bf16) through the trainer's own update (nmt.optimization.Updater:
   autocast, fused Adam, clipping, the on-device skip of non-finite steps), on synthetic
   batches: WMT-like lengths, random ids, the config's token budget; no corpus needed.
   Target >= 250,000 tokens/s;
3. decode: beam-5 decoding at 128 sentences per batch with that model, target tokens/s.
   Its weights are random and end-of-sentence is masked, so that every hypothesis runs to the
   length limit (a * |src| + b): about 1.5x the length a trained model writes. The workload is
   a test set the size of newstest2014 (3,003 sentences; NVIDIA's GNMT figures decode it):
   24 batches of WMT-like lengths, sorted by length and cut in batches as the Translator does
   with a file. Fewer sentences make batches of less even lengths (more rows run idle to their
   batch's longest): 4 batches (512 sentences) decode about a third slower on an H100.
   Target >= 50,000 tokens/s;
4. multi30k: trains the small Multi30k preset (configs/gnmt_small.yaml) for --train-minutes
   and reports beam-5 BLEU on val and test_2016_flickr. Each --variant (extra overrides) trains
   beside it, on the same GPU; a variant that changes tokenizer.* or data.* gets its own
   prepared data; --common overrides go to every run (e.g. train.precision=fp32, as the CPU).
   Needs the corpus: --corpus names a mirror folder holding multi30k/ (as ../shared/corpora);
   without it the stage is skipped, saying so.

Extra `section.key=value` arguments override the throughput model's config; with --device cpu
and a tiny model they make a quick smoke run of the script on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nmt import search, search_graph  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.devices import resolve_dtype  # noqa: E402
from nmt.models import build_model  # noqa: E402

PAD, BOS, EOS = 0, 2, 3  # any distinct ids do for a randomly initialised model
TARGETS = {"train_src_tgt_tok_s": 250_000, "decode_tgt_tok_s": 50_000}


# ---------------------------------------------------------------------------- synthetic data
def wmt_like_lengths(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(src_lens, tgt_lens) as a prepared split stores them: source pieces + eos, target pieces.

    Log-normal source lengths (median ~23, mean ~27 pieces, a long tail cut at 150), target
    about 1.05 times as long: roughly WMT16 En-De under a 32k joint BPE.
    """
    rng = np.random.default_rng(seed)
    src = np.clip(np.rint(rng.lognormal(3.15, 0.55, n)), 1, 150).astype(np.int64)  # (n,)
    ratio = np.clip(rng.normal(1.05, 0.12, n), 0.5, 2.0)  # (n,)
    tgt = np.clip(np.rint(src * ratio), 1, 160).astype(np.int64)  # (n,)
    return src + 1, tgt


def random_batch(src_lens, tgt_lens, vocab: int, rng: np.random.Generator):
    """A collated batch (nmt.batching.Batch) of random ids with these lengths (real `collate`)."""
    from nmt import batching  # pyarrow: imported by the stages that train, not by decode

    examples = {
        "src_ids": [np.append(rng.integers(4, vocab, n - 1), EOS) for n in src_lens],
        "tgt_ids": [rng.integers(4, vocab, n) for n in tgt_lens],
    }
    return batching.collate(examples, list(range(len(src_lens))), PAD, BOS, EOS)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------------------- stages
def run_tests(out_dir: Path, timeout: float) -> dict:
    xml_path = out_dir / "pytest_gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu"]  # the gpu-marked tests
    cmd += ["-p", "no:cacheprovider", f"--junitxml={xml_path}"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env()
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"pytest ran past {timeout:.0f} s"}
    (out_dir / "pytest_gpu.txt").write_text(proc.stdout[-20000:] + proc.stderr[-5000:])
    result = {"returncode": proc.returncode, "seconds": time.perf_counter() - start}
    if xml_path.exists():
        suite = ET.parse(xml_path).getroot().find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        result.update(counts, failed=failed)
        xml_path.unlink()
    result["ran"] = result.get("tests", 0) - result.get("skipped", 0)
    result["ok"] = proc.returncode == 0 and result["ran"] > 0  # all skipped: no CUDA seen
    return result


def train_throughput(cfg, device: torch.device, steps: int, warmup: int) -> tuple[dict, object]:
    """The figures, and the model (reused by the decode stage)."""
    from nmt import batching
    from nmt.distributed import Distributed
    from nmt.optimization import Updater

    torch.manual_seed(cfg.train.seed)
    vocab = cfg.tokenizer.vocab_size
    model = build_model(cfg.model, vocab, vocab, PAD, True).to(device)
    dtype = resolve_dtype(cfg.train.precision, device)
    updater = Updater(cfg, model, Distributed.single(device), dtype, PAD, total_steps=10**6)
    src_lens, tgt_lens = wmt_like_lengths(60_000, seed=1)
    sampler = batching.TokenBatchSampler(src_lens, tgt_lens, cfg.train.max_tokens, seed=1)
    rng = np.random.default_rng(2)
    pin = device.type == "cuda"
    batches = []  # built ahead, pinned: in training, loader workers overlap this with the GPU
    for _, idx in zip(range(warmup + steps), sampler):
        batch = random_batch(src_lens[idx], tgt_lens[idx], vocab, rng)
        batches.append(batch.pin_memory() if pin else batch)
    model.train()
    for batch in batches[:warmup]:
        updater.step([batch])
    _sync(device)
    start = time.perf_counter()
    results = [updater.step([batch]) for batch in batches[warmup:]]
    figures = torch.stack([r.figures for r in results]).tolist()  # (steps, 3): waits for the GPU
    seconds = time.perf_counter() - start
    tokens = sum(r.src_tokens + r.tgt_tokens for r in results)
    timed = batches[warmup:]
    padded = sum(b.src_ids.numel() + b.tgt_out_ids.numel() for b in timed)
    return {
        "model": f"{cfg.model.enc_layers}+{cfg.model.dec_layers} x {cfg.model.hidden} "
        f"{cfg.model.arch}, random init",
        "params": sum(p.numel() for p in model.parameters()),
        "precision": str(dtype).removeprefix("torch."),
        "max_tokens": cfg.train.max_tokens,
        "data": "synthetic: WMT-like lengths (log-normal, mean ~27 pieces), random ids",
        "steps": steps,
        "sentences_per_batch": sum(len(b) for b in timed) / len(timed),
        "padding_fraction": 1 - tokens / padded,
        "seconds": seconds,
        "step_ms": 1000 * seconds / steps,
        "src_tgt_tok_s": tokens / seconds,
        "tgt_tok_s": sum(r.tgt_tokens for r in results) / seconds,
        "skipped_steps": sum(not np.isfinite(f[2]) for f in figures),
        "peak_mib": _peak_mib(device),
        "target_src_tgt_tok_s": TARGETS["train_src_tgt_tok_s"],
        "meets_target": tokens / seconds >= TARGETS["train_src_tgt_tok_s"],
    }, model


def _decode_batches(n_batches: int, batch_size: int, vocab: int, seed: int) -> list[tuple]:
    """Test-set-like batches: lengths drawn, sorted (as the Translator sorts), cut in batches."""
    src_lens, _ = wmt_like_lengths(n_batches * batch_size, seed)
    src_lens = np.sort(src_lens)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_batches):
        lens = src_lens[k * batch_size : (k + 1) * batch_size]
        src_ids = torch.full((len(lens), int(lens.max())), PAD)  # (B, S)
        for row, n in enumerate(lens):
            src_ids[row, : n - 1] = torch.from_numpy(rng.integers(4, vocab, n - 1))
            src_ids[row, n - 1] = EOS
        out.append((src_ids, torch.from_numpy(lens)))
    return out


class RunToLimit:
    """The Seq2Seq contract of `model` with end-of-sentence never chosen: every hypothesis runs
    to the length limit a * |src| + b, a fixed workload. Random weights otherwise end most
    hypotheses within a few steps, which would measure the start-up and not the decoding."""

    def __init__(self, model):
        self.model = model
        self.encode = model.encode
        self.init_state = model.init_state
        self.reorder_state = model.reorder_state
        self.reorder_encoder_out = model.reorder_encoder_out

    def step(self, tgt_ids, state, enc):
        log_probs, state, attn = self.model.step(tgt_ids, state, enc)
        log_probs[:, EOS] = -1e4  # in place, on the step's own output: no per-step host copy
        return log_probs, state, attn


def decode_throughput(
    cfg,
    model,
    device,
    dtype,
    n_batches: int,
    batch_size: int,
    cuda_graph: bool = True,
    profile: Path | None = None,
) -> dict:
    s = cfg.search
    vocab = cfg.tokenizer.vocab_size
    model.eval()
    model = RunToLimit(model)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    settings = search.SearchSettings(
        bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=5, alpha=s.alpha, beta=s.beta,
        max_len_a=s.max_len_a, max_len_b=s.max_len_b,
    )  # fmt: skip
    run = search_graph.runner(device, cuda_graph)

    def decode(src_ids, src_lens):
        with torch.inference_mode(), autocast:
            return search.beam_search(
                model, src_ids.to(device), src_lens.to(device), settings, run=run
            )

    decode(*_decode_batches(1, batch_size, vocab, seed=7)[0])  # warm-up
    batches = _decode_batches(n_batches, batch_size, vocab, seed=8)
    if profile is not None:  # one batch under the profiler: where a step's time goes
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []
        )
        with torch_profile(activities=activities) as prof:
            decode(*batches[0])
            _sync(device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        profile.write_text(table)
    _sync(device)
    start = time.perf_counter()
    outputs = [decode(*b) for b in batches]
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = sum(len(h[0].tokens) + 1 for out in outputs for h in out)  # pieces + eos
    limit = sum(int(s.max_len_a * n + s.max_len_b) + 1 for _, lens in batches for n in lens)
    return {
        "beam": 5,
        "cuda_graph": cuda_graph,
        "outputs": [h[0].tokens for out in outputs for h in out],
        "batch_size": batch_size,
        "sentences": n_batches * batch_size,
        "precision": str(dtype).removeprefix("torch."),
        "weights": "random, end-of-sentence masked: every output runs to the length limit "
        "(a * |src| + b); speed only, not quality",
        "output_tokens_over_limit": tokens / limit,
        "seconds": seconds,
        "tgt_tok_s": tokens / seconds,
        "sents_per_s": n_batches * batch_size / seconds,
        "target_tgt_tok_s": TARGETS["decode_tgt_tok_s"],
        "meets_target": tokens / seconds >= TARGETS["decode_tgt_tok_s"],
    }


def _env() -> dict:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def _nmt(*args: str, timeout: float, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nmt", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"`nmt {args[0]}` exited with {proc.returncode}: {proc.stderr[-1500:]}")
    return proc


def _start_training(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "nmt", "train", *args], stderr=err, env=env, cwd=ROOT
        )


def _finish(proc: subprocess.Popen, deadline: float) -> int:
    """Its exit code; sent SIGTERM (it then saves `last`) if it runs past `deadline`."""
    try:
        return proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=120)


def _summary(run: Path, code: int, seconds: float) -> dict:
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    valid = [r for r in log if r["type"] == "valid"]
    train = [r for r in log if r["type"] == "train"]
    return {
        "train_seconds": seconds,
        "train_exit_code": code,  # 0: finished (epochs or max_minutes); 143: SIGTERM
        "epochs_validated": len(valid),
        "valid_bleu_by_validation": [round(r.get("bleu", float("nan")), 2) for r in valid],
        "steps": max((r.get("step", 0) for r in log), default=0),
        "train_tgt_tok_s": train[-1]["tgt_tok_s"] if train else None,
    }


def multi30k_bleu(
    corpus: Path | None,
    work: Path,
    out_dir: Path,
    minutes: float,
    device,
    variants: list[str],
    common: list[str] = (),
) -> dict:
    """The small preset, and each variant (extra overrides) beside it, trained side by side.

    `common` overrides go to every run, the preset's too (e.g. train.precision=fp32, as the CPU).
    """
    if corpus is None or not (corpus / "multi30k").is_dir():
        return {
            "skipped": f"no Multi30k mirror ({corpus or 'no --corpus'}): pass --corpus DIR, a "
            "folder holding multi30k/ (e.g. ../shared/corpora, copied next to the repository)"
        }
    env = {**_env(), "NMT_MIRROR": str(corpus.resolve())}
    raw = work / "multi30k_raw"
    splits = ["train", "val", "test_2016_flickr"]
    download = ["download", "multi30k", "--langs", "en", "de", "--out", str(raw), "--splits"]
    _nmt(*download, *splits, timeout=300, env=env)
    preset = str(ROOT / "configs/gnmt_small.yaml")
    runs = [("preset", [])] + [(v, v.split()) for v in variants]
    runs = [(name, [*common, *extra]) for name, extra in runs]
    # A variant that changes the tokenizer or the data filter gets its own prepared data.
    data_keys = [
        tuple(x for x in extra if x.startswith(("tokenizer.", "data."))) for _, extra in runs
    ]
    groups = list(dict.fromkeys(data_keys))

    def data_overrides(key: tuple) -> list[str]:
        return [
            f"data.train_src={raw}/train.en",
            f"data.train_tgt={raw}/train.de",
            f"data.valid_src={raw}/val.en",
            f"data.valid_tgt={raw}/val.de",
            f"data.dir={work}/multi30k_data{groups.index(key)}",
            *key,
        ]

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        list(
            pool.map(
                lambda k: _nmt("prepare", preset, *data_overrides(k), timeout=600, env=env), groups
            )
        )
    prepare_s = time.perf_counter() - start
    procs = []
    start = time.perf_counter()
    for k, ((_, extra), key) in enumerate(zip(runs, data_keys)):
        run = work / f"multi30k_run{k}"
        shutil.rmtree(run, ignore_errors=True)  # a rerun in the same --work-dir starts afresh
        args = [preset, *data_overrides(key), f"train.out_dir={run}", f"train.device={device.type}"]
        args += [f"train.max_minutes={minutes}", *[x for x in extra if x not in key]]
        procs.append((run, _start_training(args, env, work / f"multi30k_train{k}.log")))
    deadline = start + 60 * minutes + 90  # max_minutes stops them; the kill is a backstop
    codes = [_finish(proc, deadline) for _, proc in procs]
    train_s = time.perf_counter() - start
    scored = {"val": "val", "test": "test_2016_flickr"}  # result key: split

    def evaluate(model: Path, key: str) -> dict:
        search_args = ["--beam-size=5", f"--device={device.type}", "--json"]
        text = [f"--src={raw}/{scored[key]}.en", f"--ref={raw}/{scored[key]}.de"]
        name = f"{key}_beam5"
        try:
            out = _nmt("evaluate", str(model), *text, *search_args, timeout=300, env=env)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            return {f"{name}_error": str(e)[-800:]}
        score = json.loads(out.stdout)
        return {
            f"{name}_bleu": score["bleu"]["score"],
            f"{name}_chrf": score["chrf"]["score"],
            "bleu_signature": score["bleu"]["signature"],
        }

    results = []
    jobs = []
    with ThreadPoolExecutor(max_workers=2 * len(runs)) as pool:  # the GPU takes them together
        for k, ((name, _), (run, _), code) in enumerate(zip(runs, procs, codes)):
            model = run / ("best.pt" if (run / "best.pt").exists() else "last.pt")
            result = {"overrides": name, "checkpoint": model.name}
            try:
                result.update(_summary(run, code, train_s))
            except (OSError, ValueError, KeyError) as e:
                result["log_error"] = f"{type(e).__name__}: {e}"
            if code != 0:
                result["stderr_tail"] = (work / f"multi30k_train{k}.log").read_text()[-800:]
            results.append(result)
            if model.exists():
                jobs += [(result, pool.submit(evaluate, model, key)) for key in scored]
        for result, job in jobs:
            result.update(job.result())
    return {
        "preset": "configs/gnmt_small.yaml",
        "test": "test_2016_flickr",
        "prepare_seconds": prepare_s,
        "runs_side_by_side": len(runs),
        "runs": results,
        "reference_cpu_beam5_bleu": 36.5,  # README: the preset, 100 min on a 2-core CPU
    }


# ---------------------------------------------------------------------------- driver
def machine(device: torch.device) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        import datasets

        info["datasets"] = datasets.__version__
    except ImportError:
        info["datasets"] = None  # tests that prepare data and the multi30k stage need it
    return info


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", help="folder for the JSON results (created)")
    p.add_argument("--corpus", type=Path, help="mirror folder holding multi30k/ (NMT_MIRROR)")
    p.add_argument("--train-minutes", type=float, default=2.5, help="multi30k training time")
    p.add_argument("--budget-minutes", type=float, default=7.5, help="the whole check's time")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/nmt_gpu_check"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default=str(ROOT / "configs/gnmt_v2.yaml"))
    p.add_argument("--steps", type=int, default=40, help="timed training steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument(
        "--more-max-tokens",
        type=int,
        action="append",
        default=[],
        help="train: also measure at this token budget per batch (repeatable)",
    )
    p.add_argument(
        "--decode-batches",
        type=int,
        default=24,
        help="timed batches of --batch-size (24 x 128: a newstest2014-sized test set)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--profile", action="store_true", help="decode: write profiler tables")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="OVERRIDES",
        help="multi30k: one more run beside the preset, its overrides space-separated, e.g. "
        "'train.lr=0.004 train.max_epochs=25' (repeatable; the runs share the GPU)",
    )
    p.add_argument(
        "--common",
        default="",
        metavar="OVERRIDES",
        help="multi30k: overrides for every run, the preset's too (space-separated)",
    )
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=("tests", "train", "decode", "multi30k"),
        help="leave a stage out (repeatable)",
    )
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_intermixed_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    begin = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    report = {
        "machine": machine(device),
        "config": args.config,
        "overrides": args.overrides,
        "targets": TARGETS,
    }

    def stage(name, fn):
        if name in args.skip:
            report[name] = {"skipped": "--skip"}
        else:
            start = time.perf_counter()
            try:
                report[name] = fn()
            except Exception as e:  # noqa: BLE001 - one failed stage must not lose the others
                report[name] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
            report[name]["stage_seconds"] = time.perf_counter() - start
            print(f"{name}: {json.dumps(report[name])}", file=sys.stderr, flush=True)
        (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))

    stage("tests", lambda: run_tests(out_dir, timeout=240))
    cfg = load_config(args.config, args.overrides)
    held = {}

    def train():
        result, held["model"] = train_throughput(cfg, device, args.steps, args.warmup)
        for n in args.more_max_tokens:  # the same model at other batch sizes
            other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_tokens=n))
            try:
                result.setdefault("more_max_tokens", []).append(
                    train_throughput(other, device, args.steps, args.warmup)[0]
                )
            except torch.OutOfMemoryError as e:
                result.setdefault("more_max_tokens", []).append({"max_tokens": n, "oom": str(e)})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return result

    stage("train", train)

    def decode():
        if "model" not in held:  # the train stage was skipped or failed before its model
            vocab = cfg.tokenizer.vocab_size
            held["model"] = build_model(cfg.model, vocab, vocab, PAD, True).to(device)
        dtype = resolve_dtype(cfg.train.precision, device)
        if device.type == "cuda":
            held["model"].to(dtype)  # weights in bf16 too, as the Translator has them on CUDA
        n, size = args.decode_batches, args.batch_size
        where = out_dir / "decode_profile_graphs.txt" if args.profile else None
        graphs = decode_throughput(cfg, held["model"], device, dtype, n, size, profile=where)
        if device.type != "cuda":
            graphs.pop("outputs")
            return graphs
        where = out_dir / "decode_profile_eager.txt" if args.profile else None
        model = held["model"]
        eager = decode_throughput(cfg, model, device, dtype, n, size, False, profile=where)
        same = sum(a == b for a, b in zip(graphs.pop("outputs"), eager.pop("outputs")))
        graphs["eager_search"] = eager  # nmt.search: shrinking batches, no graphs
        graphs["same_outputs_as_eager"] = f"{same} of {n * size} sentences"
        graphs["speedup_over_eager"] = graphs["tgt_tok_s"] / eager["tgt_tok_s"]
        return graphs

    stage("decode", decode)
    held.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    left = args.budget_minutes - (time.perf_counter() - begin) / 60 - 1.5  # prepare, evaluate
    minutes = max(0.5, min(args.train_minutes, left))
    stage(
        "multi30k",
        lambda: multi30k_bleu(
            args.corpus,
            args.work_dir,
            out_dir,
            minutes,
            device,
            args.variant,
            args.common.split(),
        ),
    )
    report["total_seconds"] = time.perf_counter() - begin
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
