#!/usr/bin/env python3
"""Load on `nmt serve`: requests/s, sentences/s and latency at several client concurrencies,
beside `nmt translate`'s sentences/s on the same lines.

    python benchmarks/serve_load.py CHECKPOINT --src runs/.../raw/test_2016_flickr.en \
        [--clients 1 8 32] [--requests 200] [--sentences 1 3] [--beam-size 5] [--threads 2] \
        [--max-batch-sentences 64] [--max-wait-ms 10] [--url http://HOST:PORT] [--json OUT]

Starts `python -m nmt serve CHECKPOINT --port 0` (or loads an already running server given by
--url), sends a few warm-up requests, then, for each concurrency C, the same --requests requests
(each 1-3 consecutive lines of --src, drawn with a fixed seed) from C concurrent clients, each
client sending its next request when the last is answered. Per concurrency: requests/s and
sentences/s over the wall time, p50/p95 latency per request, failed requests, and the server's
search calls (sentences per call shows the batching). The server is then stopped with SIGTERM
(its exit code is reported) and the same lines are translated in this process by the code of
`nmt translate` (model loading excluded) with the same threads: its sentences/s, and whether the
server's answers equal it line by line. Run on a quiet machine: clients and server share the CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.decode_speed import machine  # noqa: E402
from nmt.devices import inference_precision  # noqa: E402
from nmt.textio import read_lines  # noqa: E402
from nmt.translator import Translator, translate_stream  # noqa: E402

DEFAULT_SRC = ROOT / "runs/multi30k_en_de_small/raw/test_2016_flickr.en"


def make_requests(lines: list[str], n: int, sizes: tuple[int, int], seed: int) -> list[list[str]]:
    """`n` requests of `sizes[0]`..`sizes[1]` consecutive lines, cycling through `lines`."""
    rng = random.Random(seed)
    out, start = [], 0
    for _ in range(n):
        k = rng.randint(*sizes)
        out.append([lines[(start + i) % len(lines)] for i in range(k)])
        start = (start + k) % len(lines)
    return out


def start_server(args) -> tuple[subprocess.Popen, str, list[str], threading.Thread]:
    """`nmt serve` on a free port: (process, base URL, its stderr lines as they come, and the
    thread that reads them)."""
    cmd = [sys.executable, "-m", "nmt", "serve", str(args.checkpoint), "--port", "0"]
    cmd += ["--max-batch-sentences", str(args.max_batch_sentences)]
    cmd += ["--max-wait-ms", str(args.max_wait_ms)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    for line in proc.stderr:
        log.append(line)
        found = re.search(r"listening on (http://\S+)", line)
        if found:
            reader = threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True)
            reader.start()
            return proc, found.group(1), log, reader
    proc.wait()
    sys.exit(f"nmt serve did not start (exit {proc.returncode}):\n{''.join(log)}")


async def _health(session, url: str) -> dict:
    async with session.get(f"{url}/health") as resp:
        return await resp.json()


async def run_level(url: str, requests: list[list[str]], clients: int, settings: dict) -> dict:
    """Send `requests` from `clients` concurrent clients; figures and the answers per request."""
    import aiohttp

    answers: list = [None] * len(requests)
    latencies: list[float] = []
    todo = iter(range(len(requests)))
    failed = 0

    async def client(session):
        nonlocal failed
        for k in todo:
            start = time.perf_counter()
            body = {"text": requests[k], **settings}
            async with session.post(f"{url}/translate", json=body) as resp:
                data = await resp.json()
            latencies.append(time.perf_counter() - start)
            if resp.status == 200 and len(data["translations"]) == len(requests[k]):
                answers[k] = data["translations"]
            else:
                failed += 1

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        before = await _health(session, url)
        start = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        wall = time.perf_counter() - start
        after = await _health(session, url)
    sentences = sum(len(r) for r in requests)
    calls = after["batches"] - before["batches"]
    cut = statistics.quantiles(latencies, n=20, method="inclusive")
    figures = {
        "clients": clients,
        "requests": len(requests),
        "sentences": sentences,
        "seconds": round(wall, 3),
        "requests_per_s": round(len(requests) / wall, 2),
        "sents_per_s": round(sentences / wall, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p95_ms": round(1000 * cut[18], 1),
        "failed": failed,
        "search_calls": calls,
        "sents_per_call": round((after["sentences"] - before["sentences"]) / max(calls, 1), 2),
    }
    return {"figures": figures, "answers": answers}


def translate_speed(args, lines: list[str], settings: dict) -> tuple[float, list[str]]:
    """`nmt translate`'s code on `lines` (model loading excluded): (sentences/s, outputs)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    translator = Translator.from_checkpoint(args.checkpoint, device="cpu", dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src.txt", Path(tmp) / "out.txt"
        src.write_text("".join(s + "\n" for s in lines), encoding="utf-8")
        start = time.perf_counter()
        translate_stream(translator, str(src), str(out), **settings)
        wall = time.perf_counter() - start
        return len(lines) / wall, out.read_text(encoding="utf-8").split("\n")[:-1]


def count_equal(requests: list[list[str]], answers: list, expected: list[str]) -> int:
    """Lines whose answer equals `expected` (the lines of all requests in order)."""
    got = []
    for lines, answer in zip(requests, answers):
        got.extend(answer if answer is not None else [None] * len(lines))  # a failed request
    return sum(g == e for g, e in zip(got, expected))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--src", type=Path, default=DEFAULT_SRC, help="source lines to send")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=200, help="requests per concurrency")
    p.add_argument("--sentences", type=int, nargs=2, default=[1, 3], help="lines per request")
    p.add_argument("--beam-size", type=int, help="sent with each request (default: checkpoint's)")
    p.add_argument("--threads", type=int, help="torch threads of the server and of translate")
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "int8"),
        default="auto",
        help="precision of the server and of translate (auto: chosen once, here, by the probe, "
        "and given to both, so that their answers can be compared)",
    )
    p.add_argument("--max-batch-sentences", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--url", help="an already running server (not stopped at the end)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the figures here")
    args = p.parse_args(argv)
    if not args.src.is_file():
        p.error(f"--src {args.src}: no such file")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = inference_precision(args.dtype, torch.device("cpu"))[0]
    return args


def report(result: dict) -> None:
    head = ["clients", "requests", "requests_per_s", "sents_per_s", "p50_ms", "p95_ms"]
    head += ["failed", "search_calls", "sents_per_call"]
    print(" ".join(f"{h:>14}" for h in head))
    for level in result["levels"]:
        print(" ".join(f"{level[h]:>14}" for h in head))
    t = result["translate"]
    print(
        f"nmt translate, the same {t['sentences']} lines: {t['sents_per_s']:.2f} sentences/s; "
        f"server answers equal to it on {t['equal_lines']}/{t['sentences']} lines"
    )
    if result["server_exit"] is not None:
        print(f"server stopped by SIGTERM, exit code {result['server_exit']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    lines = read_lines(str(args.src))
    requests = make_requests(lines, args.requests, tuple(args.sentences), args.seed)
    settings = {"beam_size": args.beam_size} if args.beam_size else {}
    proc, url = None, args.url
    if url is None:
        proc, url, log, reader = start_server(args)
    try:
        asyncio.run(run_level(url, requests[:4], 2, settings))  # warm-up
        levels = [asyncio.run(run_level(url, requests, c, settings)) for c in args.clients]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            reader.join(120)
            proc.stderr.close()
    sent = [s for r in requests for s in r]
    sents_per_s, expected = translate_speed(args, sent, settings)
    equal = min(count_equal(requests, level["answers"], expected) for level in levels)
    if proc is not None and proc.returncode != 0:
        print("".join(log), file=sys.stderr)
    result = {
        "machine": machine(),
        "checkpoint": str(args.checkpoint),
        "src": str(args.src),
        "settings": {k: getattr(args, k) for k in ("beam_size", "max_batch_sentences", "dtype")}
        | {"max_wait_ms": args.max_wait_ms, "sentences_per_request": args.sentences},
        "levels": [level["figures"] for level in levels],
        "translate": {
            "sentences": len(sent),
            "sents_per_s": round(sents_per_s, 2),
            "equal_lines": equal,
        },
        "server_exit": None if proc is None else proc.returncode,
    }
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
