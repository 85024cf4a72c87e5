"""A model restricted to a vocabulary shortlist (nmt.shortlist chooses the ids).

Owns: `Shortlisted`, the Seq2Seq that scores a batch's shortlisted target ids only, and
`output_rows`, an output projection restricted to some of its rows. Does not own which ids a
batch gets (nmt.shortlist) or the search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nmt.models.base import Seq2Seq


class _Rows(nn.Module):
    """The rows `ids` of a linear layer: y = x W[ids]^T + b[ids]."""

    def __init__(self, linear: nn.Module, ids: torch.Tensor):
        super().__init__()
        self.weight = linear.weight.index_select(0, ids)  # (n, H)
        self.bias = None if linear.bias is None else linear.bias.index_select(0, ids)  # (n,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., n)


def output_rows(linear: nn.Module, ids: torch.Tensor) -> nn.Module:
    """The output projection `linear` restricted to its rows `ids`: an nn.Linear's weight rows,
    or a reduced-precision stand-in's own `rows` (nmt.models.inference)."""
    return linear.rows(ids) if hasattr(linear, "rows") else _Rows(linear, ids)


@dataclass
class _Encoded:
    """The model's encoder output and, per row, the shortlisted positions it may produce."""

    enc: object
    allowed: torch.Tensor | None  # (B, n) bool, or None: every position


class Shortlisted(Seq2Seq):
    """An EncoderDecoder whose `step` scores only the target ids `tgt_ids` (n,), sorted: its
    output projection computes those n rows and the log-softmax runs over them (as in
    Marian); its token ids are positions 0..n-1 in `tgt_ids` (the ids it reads back are
    mapped to the model's). `allowed` (B, n), per sentence of the batch: the positions that
    sentence may produce (its own shortlist; the others get -inf before the log-softmax), so
    that a sentence's result does not depend on its batch-mates; None: all n. With every id
    allowed, its step equals the model's. The other calls are the model's own."""

    def __init__(self, model, tgt_ids: torch.Tensor, allowed: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.tgt_ids = tgt_ids
        self.allowed = allowed
        self.out = output_rows(model.decoder.out, tgt_ids)
        self.src_vocab_size, self.tgt_vocab_size = model.src_vocab_size, tgt_ids.numel()

    def encode(self, src_ids, src_lens) -> _Encoded:
        return _Encoded(self.model.encode(src_ids, src_lens), self.allowed)

    def init_state(self, enc: _Encoded):
        return self.model.init_state(enc.enc)

    def step(self, tgt_ids_t, state, enc: _Encoded):
        model_ids = self.tgt_ids[tgt_ids_t]  # (B,)
        logits, state, attn = self.model.decoder.step(model_ids, state, enc.enc, project=self.out)
        if enc.allowed is not None:
            logits = logits.masked_fill(~enc.allowed, -math.inf)  # (B, n)
        return torch.log_softmax(logits, dim=-1, dtype=torch.float32), state, attn  # (B, n)

    def reorder_state(self, state, index):
        return self.model.reorder_state(state, index)

    def compact_state(self, state):
        return self.model.compact_state(state)

    def reorder_encoder_out(self, enc: _Encoded, index) -> _Encoded:
        allowed = None if enc.allowed is None else enc.allowed.index_select(0, index)
        return _Encoded(self.model.reorder_encoder_out(enc.enc, index), allowed)
