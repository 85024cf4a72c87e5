"""The data pipeline at WMT scale (slow): a million synthetic pairs through prepare and the sampler.

The corpus (benchmarks/data_speed.py) has a known set of pairs that must go: empty sources and
4,001-word sources (each word is at least one piece, and data.max_len is 4,000); every other pair
has at most 1,350 pieces a side, so exactly the marked pairs are dropped, whatever the tokenizer
learns. NMT_SCALE_PAIRS sets another size (the default is 1,000,000).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from nmt import batching, data
from nmt.config import load_config

REPO = Path(__file__).resolve().parents[1]
N_PAIRS = int(os.environ.get("NMT_SCALE_PAIRS", "1000000"))


def _benchmark():
    spec = importlib.util.spec_from_file_location("data_speed", REPO / "benchmarks/data_speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check_shards(src_lens, tgt_lens, max_tokens: int, world_size: int, epoch: int) -> None:
    """The ranks' batches of one epoch: each example once, each batch within the budget
    (or alone), the same number of batches on every rank."""
    counts = np.zeros(len(src_lens), dtype=np.int64)
    sizes = []
    for rank in range(world_size):
        sampler = batching.TokenBatchSampler(
            src_lens, tgt_lens, max_tokens, seed=5, rank=rank, world_size=world_size
        )
        sampler.set_epoch(epoch)
        batches = list(sampler)
        sizes.append(len(batches))
        for batch in batches:
            np.add.at(counts, batch, 1)
            cost = sampler.cost[batch]
            assert len(batch) == 1 or len(batch) * cost.max() <= max_tokens
    assert (counts == 1).all(), f"{int((counts != 1).sum())} examples not seen exactly once"
    assert len(set(sizes)) == 1


@pytest.mark.slow
def test_prepare_and_sampler_at_a_million_pairs(tmp_path):
    bench = _benchmark()
    n_empty, n_long = max(1, N_PAIRS // 2000), max(1, N_PAIRS // 5000)
    src, tgt, marks = bench.write_synthetic(tmp_path, N_PAIRS, seed=3, empty=n_empty, long=n_long)
    cfg = load_config(
        None,
        [
            f"data.train_src={src}",
            f"data.train_tgt={tgt}",
            f"data.dir={tmp_path / 'data'}",
            "data.max_len=4000",
            "tokenizer.vocab_size=8000",
            "tokenizer.input_sentence_size=200000",  # sentencepiece samples this many
        ],
    )
    data.prepare(cfg)
    train = data.load_split(cfg.data.dir, "train")

    dropped = np.array(sorted(marks["empty"] + marks["long"]))
    assert len(dropped) == n_empty + n_long
    assert len(train) == N_PAIRS - len(dropped)
    lines = train.with_format("numpy", columns=["line"])[:]["line"]
    assert np.array_equal(lines, np.setdiff1d(np.arange(N_PAIRS), dropped))  # in file order

    src_lens, tgt_lens = data.lengths(train)
    assert src_lens.min() >= 2 and tgt_lens.min() >= 1  # at least one piece (+ eos)
    assert src_lens.max() <= 1351 and tgt_lens.max() <= 1350
    for world_size, epoch in ((1, 0), (1, 1), (2, 0)):
        _check_shards(src_lens, tgt_lens, 16_000, world_size, epoch)
    one = batching.TokenBatchSampler(src_lens, tgt_lens, 16_000, seed=5)
    assert bench.check_epoch(one, len(train)) == len(one)
