"""`batching.batch_loader`: background workers give the batches the training process would build."""

import pytest
import torch
from helpers_training import prepare_tiny

from nmt import batching, data
from nmt.config import load_config
from nmt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    overrides = prepare_tiny(tmp_path_factory.mktemp("corpus"))
    data_dir = load_config(None, overrides).data.dir
    tok = Tokenizer.load(data_dir)
    return data.load_split(data_dir, "train"), (tok.pad_id, tok.bos_id, tok.eos_id)


def _same(a: batching.Batch, b: batching.Batch) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("src_ids", "tgt_in_ids", "tgt_out_ids", "src_lens", "tgt_lens", "indices")
    )


def test_workers_give_the_in_process_batches_from_the_sampler_position(split):
    train, ids = split
    sampler = batching.TokenBatchSampler(*data.lengths(train), 200, seed=3, rank=1, world_size=2)
    sampler.set_epoch(2)
    expected = list(batching.make_batches(train, sampler, *ids))
    assert len(expected) == len(sampler) > 4

    loader = batching.batch_loader(train, sampler, *ids, workers=2)
    assert isinstance(loader, torch.utils.data.DataLoader)
    for start in (0, 3):  # a fresh epoch, then a resumed one; the workers are kept
        sampler.position = start
        got = list(loader)
        assert len(got) == len(expected) - start
        assert all(_same(a, b) for a, b in zip(got, expected[start:]))


def test_without_workers_the_loader_builds_batches_in_process(split):
    train, ids = split
    sampler = batching.TokenBatchSampler(*data.lengths(train), 200, seed=3)
    loader = batching.batch_loader(train, sampler, *ids)
    assert not isinstance(loader, torch.utils.data.DataLoader)
    first = list(loader)
    sampler.position = 0
    assert all(_same(a, b) for a, b in zip(first, batching.make_batches(train, sampler, *ids)))
