#!/usr/bin/env python3
"""Data pipeline speed and memory at scale: prepare (sentencepiece, encode) and the sampler.

    python benchmarks/data_speed.py --pairs 1000000 [--work DIR] [--max-tokens 16000]
        [--json OUT] [section.key=value ...]      # e.g. tokenizer.vocab_size=32000

Writes a synthetic parallel corpus (Zipf-distributed random words; sentence lengths log-normal
around 20 words with a tail to 150, the target 0.8-1.25 times the source, as in WMT news and
Europarl text), runs `nmt.data.prepare_tokenizer` and `nmt.data.prepare` on it, then one epoch of
the TokenBatchSampler (index batches) and of `make_batches` (padded tensors). Reports per phase
pairs/s (or batches/s), wall and CPU seconds (on a shared machine the wall time overstates the
cost; the CPU time does not), and the peak RSS after the phase: getrusage's high-water mark of
the whole process so far, so the phase after which it jumps is the one that needed the memory.
Also the machine and its load average. It checks what it measures: every kept example comes
exactly once in the sampler's epoch. The settings are the config defaults unless overridden:
`--config configs/gnmt_v2.yaml` measures the WMT16 recipe's tokenizer (32k pieces).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_speed import machine  # noqa: E402
from nmt import batching, data  # noqa: E402
from nmt.config import load_config  # noqa: E402
from nmt.tokenizer import Tokenizer  # noqa: E402

LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyzäöü"))
MAX_WORDS = 150  # longest ordinary sentence; a word is at most 8 letters


def _vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    """`size` distinct random words of 2-8 letters."""
    words: set[str] = set()
    while len(words) < size:
        for n in rng.integers(2, 9, size=size):
            words.add("".join(rng.choice(LETTERS, size=n)))
    return sorted(words)[:size]


def _sentences(rng, words: list[str], weights: np.ndarray, lens: np.ndarray) -> list[str]:
    ids = rng.choice(len(words), size=int(lens.sum()), p=weights).tolist()
    bounds = np.concatenate([[0], np.cumsum(lens)]).tolist()
    return [" ".join(words[i] for i in ids[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def write_synthetic(
    folder: Path, n_pairs: int, seed: int = 1, empty: int = 0, long: int = 0, chunk: int = 50_000
) -> tuple[Path, Path, dict]:
    """Write `n_pairs` synthetic pairs as `folder/train.{src,tgt}`, chunk by chunk.

    `empty` pairs have an empty source and `long` pairs a 4,001-word source (each word is at
    least one piece, so both are dropped by any data.max_len in [1350, 4000]); every other pair
    has 1-150 words of at most 8 letters a side, at most 1,350 pieces. Returns the two paths
    and {"empty": line numbers, "long": line numbers}.
    """
    rng = np.random.default_rng(seed)
    vocab = [_vocabulary(rng, 50_000), _vocabulary(rng, 50_000)]
    zipf = 1.0 / (np.arange(50_000) + 10.0)
    zipf /= zipf.sum()
    special = rng.choice(n_pairs, size=empty + long, replace=False)
    marks = {"empty": np.sort(special[:empty]).tolist(), "long": np.sort(special[empty:]).tolist()}
    kind = dict.fromkeys(marks["empty"], "empty") | dict.fromkeys(marks["long"], "long")
    paths = (folder / "train.src", folder / "train.tgt")
    with open(paths[0], "w", encoding="utf-8") as fs, open(paths[1], "w", encoding="utf-8") as ft:
        for start in range(0, n_pairs, chunk):
            size = min(chunk, n_pairs - start)
            src_lens = np.clip(np.rint(rng.lognormal(np.log(20), 0.55, size)), 1, MAX_WORDS)
            ratio = rng.uniform(0.8, 1.25, size)
            tgt_lens = np.clip(np.rint(src_lens * ratio), 1, MAX_WORDS).astype(np.int64)
            src = _sentences(rng, vocab[0], zipf, src_lens.astype(np.int64))
            tgt = _sentences(rng, vocab[1], zipf, tgt_lens)
            for i in range(size):
                what = kind.get(start + i)
                if what == "empty":
                    src[i] = ""
                elif what == "long":
                    src[i] = " ".join(vocab[0][:4001])
            fs.write("\n".join(src) + "\n")
            ft.write("\n".join(tgt) + "\n")
    return paths[0], paths[1], marks


def check_epoch(sampler: batching.TokenBatchSampler, n_examples: int) -> int:
    """Run one epoch of `sampler`; assert every index in [0, n_examples) comes exactly once.
    Returns the number of batches."""
    counts = np.zeros(n_examples, dtype=np.int64)
    n_batches = 0
    for batch in sampler:
        np.add.at(counts, batch, 1)
        n_batches += 1
    if not (counts == 1).all():
        bad = np.flatnonzero(counts != 1)[:5].tolist()
        raise AssertionError(f"examples {bad}... appear {counts[bad].tolist()} times, not once")
    return n_batches


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _timed(results: dict, phase: str, n: int, unit: str, fn):
    start, cpu = time.perf_counter(), _cpu_seconds()
    value = fn()
    secs = time.perf_counter() - start
    results[phase] = {
        "seconds": round(secs, 2),
        "cpu_seconds": round(_cpu_seconds() - cpu, 2),  # all threads; on a busy machine < wall
        f"{unit}_per_s": round(n / secs, 1),
        "peak_rss_mib_so_far": round(_rss_mib(), 1),
    }
    print(f"{phase}: {json.dumps(results[phase])}", file=sys.stderr, flush=True)
    return value


def measure(work: Path, n_pairs: int, max_tokens: int, overrides: list[str], config=None) -> dict:
    results: dict = {"pairs": n_pairs, "start_rss_mib": round(_rss_mib(), 1)}
    src, tgt, _ = _timed(
        results, "generate", n_pairs, "pairs", lambda: write_synthetic(work, n_pairs)
    )
    paths = [f"data.train_src={src}", f"data.train_tgt={tgt}", f"data.dir={work / 'data'}"]
    cfg = load_config(config, [*overrides, *paths])
    _timed(results, "tokenizer", n_pairs, "pairs", lambda: data.prepare_tokenizer(cfg))
    _timed(results, "encode", n_pairs, "pairs", lambda: data.prepare(cfg))
    train = data.load_split(cfg.data.dir, "train")
    results["kept"] = len(train)
    lens = data.lengths(train)
    sampler = batching.TokenBatchSampler(*lens, max_tokens, seed=1)
    n_batches = len(sampler)
    _timed(results, "sampler_epoch", n_batches, "batches", lambda: check_epoch(sampler, len(train)))
    tok = Tokenizer.load(cfg.data.dir)
    sampler.set_epoch(1)
    batches = batching.make_batches(train, sampler, tok.pad_id, tok.bos_id, tok.eos_id)
    _timed(results, "make_batches_epoch", len(sampler), "batches", lambda: sum(1 for _ in batches))
    results["batches"] = n_batches
    results["settings"] = {
        "vocab_size": cfg.tokenizer.vocab_size,
        "input_sentence_size": cfg.tokenizer.input_sentence_size,
        "max_len": cfg.data.max_len,
        "max_tokens": max_tokens,
    }
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=1_000_000)
    p.add_argument("--max-tokens", type=int, default=16_000, help="sampler budget (gnmt_v2's)")
    p.add_argument("--config", help="config file (default: the config defaults)")
    p.add_argument("--work", help="folder for the corpus and the prepared data (default: a temp)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work, prefix="data_speed-") as work:
        results = measure(Path(work), args.pairs, args.max_tokens, args.overrides, args.config)
    info = {"machine": {**machine(), "cpu_count": os.cpu_count()}, "overrides": args.overrides}
    info.update(config=args.config, load_average=os.getloadavg(), **results)
    print(json.dumps(info, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
