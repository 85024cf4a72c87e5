"""The Seq2Seq contract that search and training rely on.

Owns: `EncoderOut` and the abstract `Seq2Seq` interface. Does not own any layer of a model.

- `encode(src_ids (B, S), src_lens (B,)) -> EncoderOut`
- `forward(src_ids, src_lens, tgt_in_ids (B, T)) -> logits (B, T, V)` (teacher forcing)
- `init_state(enc) -> state`
- `step(tgt_ids_t (B,), state, enc) -> (log_probs (B, V), state, attn (B, S))`
- `reorder_state(state, index)` and `reorder_encoder_out(enc, index)`: select rows by `index`
  (a LongTensor of row numbers, possibly repeated or fewer than B). Beam search grows, reorders
  and shrinks the batch through these alone.
- `compact_state(state)`: the same state with every tensor's first dimension the batch (the
  identity for most models). A state may keep rows that no hypothesis reads any more (the TCN's
  columns after the batch shrank); a CUDA graph's fixed buffers cannot, and
  nmt.search_graph calls this after it shrinks the batch.
- optional, `inspect_attention(src_ids, src_lens, tgt_in_ids) -> attn (B, T, S)`: the attention
  a person reads (pictures, word alignments), by teacher forcing; search never calls it.
- `target_log_probs(src_ids, src_lens, tgt_in_ids, tgt_out_ids) -> (B, T)` float32: the
  log-prob `step` gives each `tgt_out_ids` token after the prefix `tgt_in_ids[:, :t+1]`, by
  teacher forcing (forced decoding: scoring given translations). The base class derives it
  from `forward`; an ensemble (nmt.models.ensemble) gives its own.

Invariants, tested for every architecture: running `step` T times gives the log-softmax of
`forward`'s logits (float tolerance), and a sentence's output does not depend on its batch-mates.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


def config_kwargs(cls: type, model_cfg, **fields_of: str) -> dict:
    """The keyword-only arguments of `cls.__init__`, each read from the `model_cfg` field of
    the same name, or of the name `fields_of` gives it (`num_layers="enc_layers"`). A
    constructor argument with no such field is an AttributeError: a programming error."""
    params = inspect.signature(cls.__init__).parameters.values()
    names = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    return {name: getattr(model_cfg, fields_of.get(name, name)) for name in names}


class WordDropout(nn.Module):
    """In training, zero each token's whole embedding with probability `p` and scale the kept
    ones by 1 / (1 - p) (word dropout: Sennrich & Zhang 2019, after Gal & Ghahramani 2016 §4,
    who drop word types; this drops tokens). The identity in eval mode, so search never sees it.
    """

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty(x.shape[:-1] + (1,), dtype=x.dtype, device=x.device)  # (..., 1)
        return x * keep.bernoulli_(1.0 - self.p).div_(1.0 - self.p)  # (..., E)


def sinusoid_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of integer positions (Vaswani et al. 2017): (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=positions.device, dtype=torch.float32)
        * (-math.log(10000.0) / max(half, 1))
    )  # (dim/2,)
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (..., dim/2)
    out = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2*(dim/2))
    if dim % 2:
        out = F.pad(out, (0, 1))  # (..., dim)
    return out


@dataclass
class EncoderOut:
    memory: torch.Tensor  # (B, S, H_enc)
    src_mask: torch.Tensor  # (B, S) bool, True = real token
    keys: torch.Tensor | None = None  # (B, S, A) attention keys projected once, if the model does
    src_lens: torch.Tensor | None = None  # (B,)
    embedded: torch.Tensor | None = None  # (B, S, E) the encoder's input embeddings (TCN)
    # rows come in runs of this many copies of one sentence (a beam's hypotheses): attention
    # may score a run's queries together, and `per_sentence` keeps one row per run
    sentence_rows: int = 1
    # tensors (B / sentence_rows, S, ...) that a decoder reads at every step, one row per
    # sentence: batch row r reads row r // sentence_rows. Beam search repeats each sentence K
    # times; a field per row would be copied K times over and read K times at every step.
    per_sentence: tuple[torch.Tensor, ...] = ()

    def index_select(self, index: torch.Tensor) -> EncoderOut:
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):  # not `per_sentence`, a tuple: below
                changes[f.name] = value.index_select(0, index)
        runs = _runs_after(index, self.sentence_rows)
        if self.per_sentence:  # the sentence of each new run's first row
            sentences = index[::runs] // self.sentence_rows  # (B' / runs,)
            changes["per_sentence"] = tuple(t.index_select(0, sentences) for t in self.per_sentence)
        return replace(self, sentence_rows=runs, **changes)


def _runs_after(index: torch.Tensor, runs: int) -> int:
    """`sentence_rows` of the rows `index` selects from rows in runs of `runs` copies: `runs`
    again where `index` keeps whole runs in place (beam search dropping finished sentences),
    k where it repeats each row k times in a row (beam search starting), else 1."""
    n = index.numel()
    if runs > 1 and n % runs == 0 and n:
        starts = index.view(-1, runs)[:, :1]  # (n / runs, 1)
        in_place = starts + torch.arange(runs, device=index.device)  # (n / runs, runs)
        if bool((starts % runs == 0).all()) and torch.equal(index.view(-1, runs), in_place):
            return runs
    if n < 2:
        return 1
    copies = int((index == index[0]).sum())  # the first run's length, if runs are equal
    if copies < 2 or n % copies:
        return 1
    rows = index.view(-1, copies)  # (n / copies, copies)
    return copies if bool((rows == rows[:, :1]).all()) else 1


def select_rows(state, index: torch.Tensor):
    """Apply `index_select(0, index)` to every tensor in a nested tuple/list/dict state."""
    if isinstance(state, torch.Tensor):
        return state.index_select(0, index)
    if isinstance(state, (tuple, list)):
        return type(state)(select_rows(s, index) for s in state)
    if isinstance(state, dict):
        return {k: select_rows(v, index) for k, v in state.items()}
    if state is None:
        return None
    raise TypeError(f"cannot reorder state of type {type(state).__name__}")


class Seq2Seq(nn.Module):
    """Base class of every encoder-decoder model. Subclasses implement the five methods."""

    src_vocab_size: int
    tgt_vocab_size: int

    def encode(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> EncoderOut:
        raise NotImplementedError

    def forward(self, src_ids, src_lens, tgt_in_ids) -> torch.Tensor:
        raise NotImplementedError

    def init_state(self, enc: EncoderOut):
        raise NotImplementedError

    def step(self, tgt_ids_t: torch.Tensor, state, enc: EncoderOut):
        raise NotImplementedError

    def reorder_state(self, state, index: torch.Tensor):
        return select_rows(state, index)

    def compact_state(self, state):
        return state

    def target_log_probs(self, src_ids, src_lens, tgt_in_ids, tgt_out_ids) -> torch.Tensor:
        """(B, T) float32: log_softmax(forward)[b, t, tgt_out_ids[b, t]], as `step` would give
        them (its log-softmax is float32 whatever the logits' precision)."""
        logits = self(src_ids, src_lens, tgt_in_ids)  # (B, T, V)
        log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32)  # (B, T, V)
        return log_probs.gather(2, tgt_out_ids.unsqueeze(2)).squeeze(2)  # (B, T)

    def reorder_encoder_out(self, enc: EncoderOut, index: torch.Tensor) -> EncoderOut:
        return enc.index_select(index)

    def inspect_attention(self, src_ids, src_lens, tgt_in_ids) -> torch.Tensor:
        """Optional: attention weights (B, T, S) over given targets (teacher forcing), for
        pictures and word alignments; rows of padded target positions are meaningless."""
        raise NotImplementedError(f"{type(self).__name__} has no attention to show")
