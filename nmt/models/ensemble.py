"""Ensembles: several trained models decoding as one Seq2Seq (layer 3).

Owns: `Ensemble`, which runs every member through the Seq2Seq contract (nmt.models.base) and
combines their step outputs, so that search, sampling and forced scoring take an ensemble
wherever they take a model. Does not own loading the members or checking that they belong
together (same tokenizer, same special ids: nmt.translator does that) or any layer of a model.
"""

from __future__ import annotations

import torch
from torch import nn

from nmt.models.base import Seq2Seq


class Ensemble(Seq2Seq):
    """Members (any families, GNMT and TCN mixed) over one shared vocabulary.

    Combination: at every step the ensemble's log-probabilities are the plain mean of the
    members' log-probabilities, log p(y) = (1/M) sum_m log p_m(y): the log of the geometric
    mean of their distributions, NOT renormalised (sum_y exp(...) <= 1, with equality when the
    members agree). The issue's rule, as in OpenNMT-py and Marian (fairseq instead averages the
    probabilities); unnormalised, an ensemble's score of a sentence is exactly the mean of its
    members' scores, and an ensemble of one model with itself is that model, bit for bit.
    Sampling renormalises the mean before drawing (nmt.search.sampling_log_probs).

    Each member keeps its own encoder output and decoder state (tuples, one entry per member);
    `reorder_*` forward the index to every member. The attention `step` returns (for the
    coverage penalty and alignments) is the mean of the members' attentions: still a
    distribution over the real source positions.
    """

    def __init__(self, members: list[Seq2Seq]):
        super().__init__()
        if not members:
            raise ValueError("Ensemble: needs at least one member")
        sizes = {(m.src_vocab_size, m.tgt_vocab_size) for m in members}
        if len(sizes) != 1:
            raise ValueError(f"Ensemble: members of different vocabulary sizes {sorted(sizes)}")
        self.members = nn.ModuleList(members)
        self.src_vocab_size, self.tgt_vocab_size = sizes.pop()

    def encode(self, src_ids, src_lens) -> tuple:
        return tuple(m.encode(src_ids, src_lens) for m in self.members)

    def forward(self, src_ids, src_lens, tgt_in_ids) -> torch.Tensor:
        """The mean of the members' teacher-forced log-probs (B, T, V) float32: what `step`
        gives, position by position. Log-probs, not logits: log_softmax would renormalise them."""
        return torch.stack(
            [
                torch.log_softmax(m(src_ids, src_lens, tgt_in_ids), dim=-1, dtype=torch.float32)
                for m in self.members
            ]
        ).mean(0)  # (B, T, V)

    def target_log_probs(self, src_ids, src_lens, tgt_in_ids, tgt_out_ids) -> torch.Tensor:
        """The mean of the members' `target_log_probs` (B, T): one (B, T, V) at a time."""
        per_member = [
            m.target_log_probs(src_ids, src_lens, tgt_in_ids, tgt_out_ids) for m in self.members
        ]
        return torch.stack(per_member).mean(0)  # (B, T)

    def inspect_attention(self, src_ids, src_lens, tgt_in_ids) -> torch.Tensor:
        """The mean of the members' attention over given targets (B, T, S): the same rule as
        the attention `step` returns for the coverage penalty."""
        per_member = [m.inspect_attention(src_ids, src_lens, tgt_in_ids) for m in self.members]
        return torch.stack([a.float() for a in per_member]).mean(0)  # (B, T, S)

    def shortlisted(self, tgt_ids: torch.Tensor, allowed: torch.Tensor | None = None):
        """This ensemble scoring only the target ids `tgt_ids` (nmt.models.shortlisted): an
        ensemble of its members each shortlisted alike, so that they average over one space."""
        return Ensemble([m.shortlisted(tgt_ids, allowed) for m in self.members])

    def init_state(self, enc: tuple) -> tuple:
        return tuple(m.init_state(e) for m, e in zip(self.members, enc))

    def step(self, tgt_ids_t, state: tuple, enc: tuple):
        outs = [m.step(tgt_ids_t, st, e) for m, st, e in zip(self.members, state, enc)]
        log_probs = torch.stack([lp for lp, _, _ in outs]).mean(0)  # (B, V)
        attn = torch.stack([a.float() for _, _, a in outs]).mean(0)  # (B, S)
        return log_probs, tuple(st for _, st, _ in outs), attn

    def reorder_state(self, state: tuple, index: torch.Tensor) -> tuple:
        return tuple(m.reorder_state(st, index) for m, st in zip(self.members, state))

    def compact_state(self, state: tuple) -> tuple:
        return tuple(m.compact_state(st) for m, st in zip(self.members, state))

    def reorder_encoder_out(self, enc: tuple, index: torch.Tensor) -> tuple:
        return tuple(m.reorder_encoder_out(e, index) for m, e in zip(self.members, enc))
