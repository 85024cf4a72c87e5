"""Forced decoding: the model's log-probability of given targets (layer 4).

Owns: turning (source pieces, target pieces) pairs into one teacher-forced batch and summing
each target's log-probabilities, eos included. Does not own tokenisation, the sorting of pairs
into batches or file handling (nmt.translator, nmt.evaluation), or the model: it reads only
the Seq2Seq contract's `target_log_probs` (nmt.models.base), which an ensemble gives too.

The number is the one search computes for the same tokens: the sum over t of log p(y_t | y_<t,
x) with y ending in eos, which is `Hypothesis.log_prob` (and, with alpha = beta = 0, its score).
"""

from __future__ import annotations

import torch


def _pad(seqs: list[list[int]], pad_id: int) -> torch.Tensor:
    out = torch.full((len(seqs), max(len(q) for q in seqs)), pad_id, dtype=torch.long)
    for row, q in enumerate(seqs):
        out[row, : len(q)] = torch.tensor(q, dtype=torch.long)
    return out  # (B, L)


def source_batch(src_pieces: list[list[int]], eos_id: int, pad_id: int):
    """(src_ids (B, S), src_lens (B,)): each source's pieces then eos, right-padded. A source
    without pieces is eos alone."""
    seqs = [list(p) + [eos_id] for p in src_pieces]
    return _pad(seqs, pad_id), torch.tensor([len(q) for q in seqs], dtype=torch.long)


@torch.no_grad()
def target_scores(model, src_ids, src_lens, tgt_pieces: list[list[int]], ids) -> torch.Tensor:
    """Per pair (B,) float32: the sum of log p(y_t | y_<t, x) over the target's pieces and the
    final eos, by teacher forcing. `tgt_pieces`: the targets without bos/eos (an empty one is
    scored as eos alone); `ids`: the special ids (bos_id, eos_id, pad_id: a Tokenizer or
    nmt.search.SearchSettings). The tensors go to `src_ids`' device."""
    device = src_ids.device
    tgt_in_ids = _pad([[ids.bos_id, *p] for p in tgt_pieces], ids.pad_id).to(device)  # (B, T)
    tgt_out_ids = _pad([[*p, ids.eos_id] for p in tgt_pieces], ids.pad_id).to(device)  # (B, T)
    lens = torch.tensor([len(p) + 1 for p in tgt_pieces], device=device)  # (B,)
    real_mask = torch.arange(tgt_in_ids.size(1), device=device)[None, :] < lens[:, None]
    log_probs = model.target_log_probs(src_ids, src_lens, tgt_in_ids, tgt_out_ids)  # (B, T)
    return torch.where(real_mask, log_probs.float(), 0.0).sum(dim=1)  # (B,)
