"""Subword regularization (data.sampling_alpha): training batches segmented afresh from text,
reproducibly, in any process, and decoding to the same sentences as the fixed segmentation."""

import pytest
import torch
from helpers_training import prepare_tiny

from nmt import batching, data
from nmt.config import load_config
from nmt.errors import UsageError
from nmt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def prepared(folder):
    """The tiny corpus prepared for sampling: (train split, tokenizer, raw source lines)."""
    overrides = prepare_tiny(folder, "data.sampling_alpha=0.1")
    data_dir = load_config(None, overrides).data.dir
    src_lines = (folder / "s1.src").read_text().splitlines()
    return data.load_split(data_dir, "train"), Tokenizer.load(data_dir), src_lines


def _rows(batch: batching.Batch, tok: Tokenizer) -> tuple[list[str], list[str]]:
    """The (source, target) text of each row of a batch."""
    src = [ids[:n].tolist() for ids, n in zip(batch.src_ids, batch.src_lens)]
    tgt = [ids[:n].tolist() for ids, n in zip(batch.tgt_out_ids, batch.tgt_lens)]
    return tok.decode_src(src), tok.decode_tgt(tgt)


def test_encode_sampled_is_seeded_and_decodes_to_the_text(prepared):
    _, tok, lines = prepared
    lines = lines[:50]
    src, tgt = tok.encode_sampled(lines, lines[::-1], 0.3, seed=7)
    assert (src, tgt) == tok.encode_sampled(lines, lines[::-1], 0.3, seed=7)
    assert src != tok.encode_sampled(lines, lines[::-1], 0.3, seed=8)[0]
    assert tok.decode_src(src) == tok.decode_src(tok.encode_src(lines))
    assert tok.decode_tgt(tgt) == tok.decode_tgt(tok.encode_tgt(lines[::-1]))
    fixed = sum(map(len, tok.encode_src(lines)))
    assert sum(map(len, src)) > fixed  # dropped merges leave more, shorter pieces
    assert tok.encode_sampled(lines, lines, 0.0, seed=7)[0] == tok.encode_src(lines)


def test_prepare_keeps_the_text_only_for_sampling(tmp_path, capsys):
    # its own folder: re-preparing replaces the split files the module's fixture maps
    overrides = prepare_tiny(tmp_path, "data.sampling_alpha=0.1")
    data_dir = load_config(None, overrides).data.dir
    lines = (tmp_path / "s1.src").read_text().splitlines()
    train = data.load_split(data_dir, "train")
    assert {"src", "tgt", "src_ids", "line"} <= set(train.column_names)
    rows = train[:5]
    assert rows["src"] == [lines[i] for i in rows["line"]]
    sampled_split_ids = train["src_ids"]
    capsys.readouterr()

    prepare_tiny(tmp_path)  # sampling off: re-encoded, without the text
    assert "train: kept" not in capsys.readouterr().err
    plain = data.load_split(data_dir, "train")
    assert "src" not in plain.column_names
    assert plain["src_ids"] == sampled_split_ids
    prepare_tiny(tmp_path, "data.sampling_alpha=0.1")  # and on again: the text comes back
    assert "train: kept" not in capsys.readouterr().err
    assert "src" in data.load_split(data_dir, "train").column_names


def test_sampled_batches_are_reproducible_and_hold_the_same_sentences(prepared):
    train, tok, _ = prepared
    ids = (tok.pad_id, tok.bos_id, tok.eos_id)
    sampling = batching.SubwordSampling(tok, 0.1, seed=3)
    sampler = batching.TokenBatchSampler(*data.lengths(train), 200, seed=3)
    sampler.set_epoch(1)
    fixed = list(batching.make_batches(train, sampler, *ids))
    sampled = list(batching.make_batches(train, sampler, *ids, sampling=sampling))
    again = list(batching.make_batches(train, sampler, *ids, sampling=sampling))
    assert len(fixed) == len(sampled) == len(again) > 4
    differ = 0
    for f, s, a in zip(fixed, sampled, again):
        assert torch.equal(s.src_ids, a.src_ids) and torch.equal(s.tgt_out_ids, a.tgt_out_ids)
        assert torch.equal(f.indices, s.indices)
        assert _rows(f, tok) == _rows(s, tok)
        assert (s.tgt_in_ids[:, 0] == tok.bos_id).all()
        assert (s.src_ids.gather(1, s.src_lens[:, None] - 1) == tok.eos_id).all()
        differ += f.src_ids.shape != s.src_ids.shape or not torch.equal(f.src_ids, s.src_ids)
    assert differ > len(fixed) // 2
    other = batching.SubwordSampling(tok, 0.1, seed=4)
    first = next(iter(batching.make_batches(train, sampler, *ids, sampling=other)))
    assert not torch.equal(first.src_ids, sampled[0].src_ids)


def test_workers_draw_the_in_process_segmentation(prepared):
    train, tok, _ = prepared
    ids = (tok.pad_id, tok.bos_id, tok.eos_id)
    sampling = batching.SubwordSampling(tok, 0.1, seed=3)
    sampler = batching.TokenBatchSampler(*data.lengths(train), 200, seed=3)
    expected = list(batching.make_batches(train, sampler, *ids, sampling=sampling))
    got = list(batching.batch_loader(train, sampler, *ids, workers=2, sampling=sampling))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a.src_ids, b.src_ids) and torch.equal(a.tgt_out_ids, b.tgt_out_ids)


def test_sampling_from_a_split_without_text_is_one_clear_error(tmp_path):
    overrides = prepare_tiny(tmp_path)
    data_dir = load_config(None, overrides).data.dir
    train, tok = data.load_split(data_dir, "train"), Tokenizer.load(data_dir)
    ids = (tok.pad_id, tok.bos_id, tok.eos_id)
    sampler = batching.TokenBatchSampler(*data.lengths(train), 200)
    sampling = batching.SubwordSampling(tok, 0.1, seed=1)
    for workers in (0, 2):  # raised when the loader is made, before any batch
        with pytest.raises(UsageError, match="data.sampling_alpha needs the text"):
            batching.batch_loader(train, sampler, *ids, workers=workers, sampling=sampling)
