"""Batching: collate and Batch, and the token-bucketed batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmt.batching import Batch, TokenBatchSampler, collate

# -- collate and Batch ---------------------------------------------------------------------------


def test_collate_pads_right_and_adds_bos_eos():
    pad, bos, eos = 0, 2, 3
    examples = {"src_ids": [[5, 6, eos], [7, eos]], "tgt_ids": [[8, 9], [10]]}
    batch = collate(examples, [4, 1], pad, bos, eos)
    assert batch.src_ids.tolist() == [[5, 6, 3], [7, 3, 0]]
    assert batch.src_lens.tolist() == [3, 2]
    assert batch.tgt_in_ids.tolist() == [[2, 8, 9], [2, 10, 0]]
    assert batch.tgt_out_ids.tolist() == [[8, 9, 3], [10, 3, 0]]
    assert batch.tgt_lens.tolist() == [3, 2]
    assert batch.indices.tolist() == [4, 1]
    assert batch.src_mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.tgt_mask.tolist() == [[True, True, True], [True, True, False]]
    assert (batch.num_src_tokens, batch.num_tgt_tokens, len(batch)) == (5, 5, 2)
    assert all(t.dtype == torch.long for t in vars(batch).values())
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tgt_out_ids, batch.tgt_out_ids)
    # an empty target gets bos / eos only
    assert collate({"src_ids": [[3]], "tgt_ids": [[]]}, [0], pad, bos, eos).tgt_in_ids.tolist() == [
        [2]
    ]


# -- TokenBatchSampler ---------------------------------------------------------------------------


def _lens(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    src = rng.integers(1, 60, size=n)
    tgt = np.clip(src + rng.integers(-5, 6, size=n), 1, None)
    src[7] = 500  # over budget on its own: must come as a batch of one
    return src, tgt


def _cost(batch, src, tgt):
    return len(batch) * max(max(src[batch]), max(tgt[batch]) + 1)


def test_sampler_covers_each_example_once_within_budget():
    src, tgt = _lens()
    sampler = TokenBatchSampler(src, tgt, max_tokens=400, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(src)))
    assert all(_cost(b, src, tgt) <= 400 or len(b) == 1 for b in batches)
    assert [7] in batches
    # batches are not tiny: length sorting within pools packs them well
    padded = sum(_cost(b, src, tgt) for b in batches)
    assert padded < 1.3 * sum(np.maximum(src, tgt + 1))


def test_sampler_order_depends_on_seed_and_epoch_only():
    src, tgt = _lens()
    a = TokenBatchSampler(src, tgt, max_tokens=400, seed=1)
    b = TokenBatchSampler(src, tgt, max_tokens=400, seed=1)
    c = TokenBatchSampler(src, tgt, max_tokens=400, seed=2)
    epoch0 = list(a)
    assert list(b) == epoch0
    assert list(c) != epoch0
    a.set_epoch(1)
    epoch1 = list(a)
    assert epoch1 != epoch0
    assert sorted(i for x in epoch1 for i in x) == list(range(len(src)))
    b.set_epoch(1)
    assert list(b) == epoch1


def test_sampler_without_shuffle_is_sorted_and_repeatable():
    src, tgt = _lens()
    sampler = TokenBatchSampler(src, tgt, max_tokens=400, shuffle=False)
    first = list(sampler)
    assert list(sampler) == first  # a finished pass starts over (validation reuses it)
    costs = [int(np.maximum(src[b], tgt[b] + 1).max()) for b in first]
    assert costs == sorted(costs)
    sampler.set_epoch(5)
    assert list(sampler) == first


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampler_rank_shards_are_disjoint_covering_and_even(world_size):
    src, tgt = _lens(n=997)
    for shuffle in (True, False):
        shards = [
            list(
                TokenBatchSampler(
                    src, tgt, 400, shuffle=shuffle, seed=4, rank=r, world_size=world_size
                )
            )
            for r in range(world_size)
        ]
        assert len({len(s) for s in shards}) == 1  # the same number of batches on every rank
        flat = [i for s in shards for b in s for i in b]
        assert sorted(flat) == list(range(len(src)))  # disjoint and covering
        assert all(_cost(b, src, tgt) <= 400 or len(b) == 1 for s in shards for b in s)


def test_sampler_tiny_data_on_many_ranks_repeats_rather_than_starves():
    src, tgt = np.array([3, 4]), np.array([3, 4])
    shards = [list(TokenBatchSampler(src, tgt, 100, rank=r, world_size=4)) for r in range(4)]
    assert all(len(s) == 1 for s in shards)
    assert {i for s in shards for b in s for i in b} == {0, 1}


def test_sampler_resumes_mid_epoch_exactly():
    src, tgt = _lens()
    full = TokenBatchSampler(src, tgt, max_tokens=400, seed=9)
    full.set_epoch(2)
    expected = list(full)

    first = TokenBatchSampler(src, tgt, max_tokens=400, seed=9)
    first.set_epoch(2)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    assert state == {"epoch": 2, "position": 7, "world_size": 1}

    resumed = TokenBatchSampler(src, tgt, max_tokens=400, seed=9)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # a training loop may call this again: it keeps the position
    assert head + list(resumed) == expected
    assert resumed.state_dict() == {"epoch": 2, "position": len(expected), "world_size": 1}
    resumed.set_epoch(3)
    assert resumed.state_dict() == {"epoch": 3, "position": 0, "world_size": 1}


def test_sampler_rejects_bad_settings():
    with pytest.raises(ValueError):
        TokenBatchSampler(np.ones(3), np.ones(4), 10)
    with pytest.raises(ValueError):
        TokenBatchSampler(np.ones(3), np.ones(3), 10, rank=2, world_size=2)
