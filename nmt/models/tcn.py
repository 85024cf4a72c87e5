"""Temporal convolutional encoder and decoder (TCN family).

Owns: `TemporalBlock`, `TCNEncoder`, `TCNDecoder`, the receptive-field formula and its config
check. Does not own search, losses or embedding sharing (see `nmt.models.build_model`).

Temporal block (Bai, Kolter & Koltun 2018, "An empirical evaluation of generic convolutional and
recurrent networks for sequence modeling", Sec. 3 and Fig. 1): two dilated Conv1d, each
weight-normalised with `torch.nn.utils.parametrizations.weight_norm`, each followed by ReLU and
dropout; a residual connection (1x1 conv where the widths differ) and a final ReLU. Level `l`
(0-based) has dilation 2**l, so a stack of L blocks with kernel size k sees
`1 + 2(k-1)(2**L - 1)` positions. Departures from the reference code:
- padding is explicit (`F.pad`) instead of pad-both-sides-then-chomp, so kernel size 1 works;
- the encoder is non-causal: each conv pads ceil((k-1)d/2) on the left and floor((k-1)d/2) on the
  right (equal for odd k), so a position sees both sides. Padded positions of a batch are set to
  zero before every conv, so a sentence's encoding is exactly what it would be alone;
- the decoder is causal (left padding (k-1)d only) and attends to the encoder after every block,
  as in ConvS2S (Gehring et al. 2017, Sec. 3.3, "multi-step attention"): a per-block query
  projection of the decoder state, scaled dot product against keys projected once from the
  encoder memory (`prepare`), the context (a weighted sum of the same keys, as ConvS2S sums the
  encoder outputs it scored) projected back and added to the block output. `step` returns the
  mean of the blocks' attention weights (a distribution over the source, as coverage wants);
  `inspect_attention` the last block's (pictures and word alignments);
- both sides add sinusoidal position features (Vaswani et al. 2017) times a learned scalar
  (started at the RMS of the embedding initialisation) to the token embeddings. ConvS2S learns a
  position table instead; sinusoids need no maximum length. Convolutions only see relative order
  and the sentence edges within their window; absolute positions make "attend to source position
  n - t" (reordering) easy to learn.

Initialisation: embeddings uniform(-init_scale, init_scale); convolutions and linear layers keep
PyTorch's fan-in scaled defaults (a fixed uniform range would blow up or shrink a deep stack as
`channels` changes); weight norm starts with g = ||v|| so the initial function is unchanged.
The weight-norm parameters live in the state dict as `...parametrizations.weight.original0`
(g) and `.original1` (v), so `state_dict`/`load_state_dict` round-trip them without any hook.

Incremental decoding: the state keeps, for every conv of every decoder block, the last (k-1)d
inputs of that conv; one `step` runs each conv on that window plus the new column only, so it
costs O(levels * k) column products instead of recomputing the prefix (the uncached path, the
whole prefix through `forward_with_attention` at every step, lives only in tests and in
`benchmarks/decode_speed.py --recompute`).

Interfaces are batch-first; only the inside of the stacks transposes to (B, C, T).
The `hidden` setting is a GNMT size and is not used here: every TCN width is `channels`.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from nmt.config import ModelConfig, check_receptive_field, receptive_field  # noqa: F401
from nmt.errors import ConfigError
from nmt.models.base import EncoderOut, WordDropout, select_rows, sinusoid_positions


class _Embedding(nn.Module):
    """Token embedding plus scaled sinusoidal positions, then dropout. Owns the position scale
    only: `embed` is assigned by the owner so that `build_model` can share it."""

    def __init__(self, emb_dim: int, init_scale: float, dropout: float, word_dropout: float):
        super().__init__()
        self.emb_dim = emb_dim
        self.pos_scale = nn.Parameter(torch.tensor(init_scale / math.sqrt(3.0)))
        self.dropout = nn.Dropout(dropout)
        self.word_dropout = WordDropout(word_dropout)

    def forward(self, embed: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor):
        pos = sinusoid_positions(positions, self.emb_dim)  # (..., E)
        return self.dropout(self.word_dropout(embed(ids)) + self.pos_scale * pos)  # (..., E)


def _last_column(conv: nn.Module, window: torch.Tensor) -> torch.Tensor:
    """The one output of `conv` over window (B, C_in, (k-1)d + 1) -> (B, C_out, 1).

    Gathers the k dilated taps and runs one matrix product: several times faster on CPU than
    a dilated conv call over the window, and the same sum up to float rounding. A reduced-
    precision stand-in for the conv (nmt.models.inference.ConvColumns) runs its own product.
    """
    taps = window[:, :, :: conv.dilation[0]]  # (B, C_in, k)
    taps = taps.reshape(taps.size(0), -1)  # (B, C_in * k)
    if not isinstance(conv, nn.Conv1d):
        return conv.column(taps).unsqueeze(2)  # (B, C_out, 1)
    weight = conv.weight  # (C_out, C_in, k); weight norm recomputes it here
    out = F.linear(taps, weight.reshape(weight.size(0), -1), conv.bias)  # (B, C_out)
    return out.unsqueeze(2)  # (B, C_out, 1)


class TemporalBlock(nn.Module):
    """Two weight-normalised dilated convs with ReLU and dropout, plus a residual (Bai et al.).

    Owns its convs and padding. `forward` works on (B, C, T); `step` computes one new column
    from a cache of each conv's last (k-1)*dilation inputs (causal blocks only).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        dropout: float,
        causal: bool,
    ):
        super().__init__()
        self.span = (kernel_size - 1) * dilation  # inputs before the newest one a conv reads
        self.causal = causal
        if causal:
            self.padding = (self.span, 0)
        else:  # centered; for even kernel sizes the extra position goes to the left
            self.padding = ((self.span + 1) // 2, self.span // 2)
        self.conv1 = weight_norm(
            nn.Conv1d(in_channels, out_channels, kernel_size, dilation=dilation)
        )
        self.conv2 = weight_norm(
            nn.Conv1d(out_channels, out_channels, kernel_size, dilation=dilation)
        )
        self.residual = (
            nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else None
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, T), mask (B, 1, T) float with 1 = real token, or None -> (B, C_out, T)."""
        if mask is not None:
            x = x * mask
        h = self.dropout(F.relu(self.conv1(F.pad(x, self.padding))))  # (B, C_out, T)
        if mask is not None:
            h = h * mask
        h = self.dropout(F.relu(self.conv2(F.pad(h, self.padding))))  # (B, C_out, T)
        res = x if self.residual is None else self.residual(x)  # (B, C_out, T)
        return F.relu(h + res)

    def init_cache(self, batch: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Zeros standing for the left padding: [(B, C_in, span), (B, C_out, span)]."""
        c_in, c_out = self.conv1.in_channels, self.conv1.out_channels
        return [like.new_zeros(batch, c_in, self.span), like.new_zeros(batch, c_out, self.span)]

    def step(self, x_t: torch.Tensor, cache: list[torch.Tensor]):
        """x_t (B, C_in, 1) -> (y_t (B, C_out, 1), new cache). Causal blocks only."""
        window1 = torch.cat([cache[0], x_t], dim=2)  # (B, C_in, span + 1)
        h = self.dropout(F.relu(_last_column(self.conv1, window1)))  # (B, C_out, 1)
        window2 = torch.cat([cache[1], h], dim=2)  # (B, C_out, span + 1)
        h = self.dropout(F.relu(_last_column(self.conv2, window2)))  # (B, C_out, 1)
        res = x_t if self.residual is None else self.residual(x_t)  # (B, C_out, 1)
        return F.relu(h + res), [window1[:, :, 1:], window2[:, :, 1:]]


def _stack(in_dim: int, channels: int, kernel_size: int, levels: int, dropout: float, causal):
    return nn.ModuleList(
        TemporalBlock(
            in_dim if level == 0 else channels, channels, kernel_size, 2**level, dropout, causal
        )
        for level in range(levels)
    )


class TCNEncoder(nn.Module):
    """Source embedding + positions, then a non-causal TCN stack. Owns its embedding and stack.

    forward(src_ids (B, S), src_lens (B,)) -> EncoderOut(memory (B, S, channels), src_mask,
    src_lens); memory is zero at padded positions. Arguments are `ModelConfig`'s fields of the
    same names.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        *,
        emb_dim: int,
        channels: int,
        kernel_size: int,
        levels: int,
        dropout: float,
        word_dropout: float,
        init_scale: float,
    ):
        super().__init__()
        self.out_dim = channels
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -init_scale, init_scale)
        self.embed_pos = _Embedding(emb_dim, init_scale, dropout, word_dropout)
        self.blocks = _stack(emb_dim, channels, kernel_size, levels, dropout, causal=False)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int, pad_id: int) -> TCNEncoder:
        m = model_cfg
        return cls(
            vocab_size,
            pad_id,
            emb_dim=m.emb_dim,
            channels=m.channels,
            kernel_size=m.kernel_size,
            levels=m.levels,
            dropout=m.dropout,
            word_dropout=m.word_dropout,
            init_scale=m.init_scale,
        )

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> EncoderOut:
        S = src_ids.size(1)
        positions = torch.arange(S, device=src_ids.device)  # (S,)
        src_mask = positions.unsqueeze(0) < src_lens.to(src_ids.device).unsqueeze(1)  # (B, S)
        x = self.embed_pos(self.embed, src_ids, positions)  # (B, S, E)
        mask = src_mask.unsqueeze(1).to(x.dtype)  # (B, 1, S)
        h = x.transpose(1, 2)  # (B, E, S)
        for block in self.blocks:
            h = block(h, mask)  # (B, C, S)
        memory = (h * mask).transpose(1, 2)  # (B, S, C)
        return EncoderOut(memory=memory, src_mask=src_mask, src_lens=src_lens)


class TCNDecoder(nn.Module):
    """Target embedding + positions, a causal TCN stack with attention after every block
    (ConvS2S multi-step attention), and the output projection. Owns all of these and the
    incremental-decoding state (per-conv caches and the position). Arguments are `ModelConfig`'s
    fields of the same names; `memory_dim` is the encoder's `out_dim`; `tie_embeddings` builds the
    output projection so that `tie_output` can share it with the embedding (a bottleneck
    channels -> emb_dim first where they differ).
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        memory_dim: int,
        *,
        emb_dim: int,
        channels: int,
        kernel_size: int,
        levels: int,
        dropout: float,
        word_dropout: float,
        init_scale: float,
        tie_embeddings: bool,
    ):
        super().__init__()
        self.channels = channels
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -init_scale, init_scale)
        self.embed_pos = _Embedding(emb_dim, init_scale, dropout, word_dropout)
        self.blocks = _stack(emb_dim, channels, kernel_size, levels, dropout, causal=True)
        self.key_proj = nn.Linear(memory_dim, channels)
        self.queries = nn.ModuleList(nn.Linear(channels, channels) for _ in range(levels))
        self.contexts = nn.ModuleList(nn.Linear(channels, channels) for _ in range(levels))
        self.dropout = nn.Dropout(dropout)
        # Tying needs the output input width to be the embedding width: project down first.
        needs_bottleneck = tie_embeddings and channels != emb_dim
        self.bottleneck = nn.Linear(channels, emb_dim) if needs_bottleneck else None
        self.out = nn.Linear(emb_dim if needs_bottleneck else channels, vocab_size)

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, vocab_size: int, pad_id: int, memory_dim: int
    ) -> TCNDecoder:
        m = model_cfg
        return cls(
            vocab_size,
            pad_id,
            memory_dim,
            emb_dim=m.emb_dim,
            channels=m.channels,
            kernel_size=m.kernel_size,
            levels=m.levels,
            dropout=m.dropout,
            word_dropout=m.word_dropout,
            init_scale=m.init_scale,
            tie_embeddings=m.tie_embeddings,
        )

    def tie_output(self) -> None:
        """Share the output projection weight with `self.embed` (call after any sharing)."""
        if self.out.in_features != self.embed.embedding_dim:
            raise ConfigError(
                [
                    f"model.tie_embeddings: the TCN decoder cannot tie its output projection "
                    f"(input width {self.out.in_features}) to an embedding of width "
                    f"{self.embed.embedding_dim}; build it with tie_embeddings=True"
                ]
            )
        self.out.weight = self.embed.weight

    def prepare(self, enc: EncoderOut) -> EncoderOut:
        """Project the attention keys once per sentence."""
        return replace(enc, keys=self.key_proj(enc.memory))  # keys (B, S, C)

    def _attend(self, level: int, h: torch.Tensor, enc: EncoderOut):
        """h (B, T, C) -> (h + context (B, T, C), attn (B, T, S))."""
        query = self.queries[level](h)  # (B, T, C)
        scores = torch.bmm(query, enc.keys.transpose(1, 2)) / math.sqrt(self.channels)  # (B,T,S)
        scores = scores.masked_fill(~enc.src_mask.unsqueeze(1), float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(query.dtype)  # (B, T, S)
        context = torch.bmm(attn, enc.keys)  # (B, T, C)
        return h + self.contexts[level](context), attn

    def _output(self, h: torch.Tensor, project=None) -> torch.Tensor:
        h = self.dropout(h)
        if self.bottleneck is not None:
            h = self.bottleneck(h)  # (..., E)
        return (project or self.out)(h)  # (..., V)

    def _teacher_forced(self, tgt_in_ids: torch.Tensor, enc: EncoderOut):
        """The last block's output (B, T, C) and each block's attention [(B, T, S)]."""
        positions = torch.arange(tgt_in_ids.size(1), device=tgt_in_ids.device)  # (T,)
        x = self.embed_pos(self.embed, tgt_in_ids, positions)  # (B, T, E)
        h = x.transpose(1, 2)  # (B, E, T)
        attns = []
        for level, block in enumerate(self.blocks):
            h = block(h)  # (B, C, T)
            h, attn = self._attend(level, h.transpose(1, 2), enc)  # (B, T, C), (B, T, S)
            attns.append(attn)
            h = h.transpose(1, 2)  # (B, C, T)
        return h.transpose(1, 2), attns  # (B, T, C)

    def forward_with_attention(self, tgt_in_ids: torch.Tensor, enc: EncoderOut):
        """Teacher forcing: (logits (B, T, V), attn (B, T, S) averaged over the blocks)."""
        h, attns = self._teacher_forced(tgt_in_ids, enc)
        return self._output(h), sum(attns) / len(self.blocks)  # (B, T, V), (B, T, S)

    def inspect_attention(self, tgt_in_ids: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        """Teacher forcing: the last block's attention weights (B, T, S), the ones pictures and
        word alignments show (`step` returns the blocks' mean, which the coverage penalty
        reads: search results do not depend on this method)."""
        return self._teacher_forced(tgt_in_ids, enc)[1][-1]  # (B, T, S)

    def forward(self, tgt_in_ids: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        return self.forward_with_attention(tgt_in_ids, enc)[0]  # (B, T, V)

    def init_state(self, enc: EncoderOut) -> dict:
        """{"pos": (B,) next position, "caches": [per conv (B, C_in, (k-1)d)]} (zeros = padding)."""
        batch = enc.memory.size(0)
        caches = []
        for block in self.blocks:
            caches.extend(block.init_cache(batch, enc.memory))
        pos = torch.zeros(batch, dtype=torch.long, device=enc.memory.device)
        return {"pos": pos, "caches": caches}

    def step(self, tgt_ids_t: torch.Tensor, state: dict, enc: EncoderOut, project=None):
        """One column: tgt_ids_t (B,) -> (logits (B, V), state, attn (B, S)); `project`: the
        output projection to use (None: `self.out`; a shortlist's rows, V of them)."""
        x = self.embed_pos(self.embed, tgt_ids_t, state["pos"])  # (B, E)
        h = x.unsqueeze(2)  # (B, E, 1)
        caches = []
        attn_sum = 0.0
        for level, block in enumerate(self.blocks):
            h, cache = block.step(h, state["caches"][2 * level : 2 * level + 2])  # (B, C, 1)
            caches.extend(cache)
            h, attn = self._attend(level, h.transpose(1, 2), enc)  # (B, 1, C), (B, 1, S)
            attn_sum = attn_sum + attn
            h = h.transpose(1, 2)  # (B, C, 1)
        logits = self._output(h.squeeze(2), project)  # (B, V)
        attn = (attn_sum / len(self.blocks)).squeeze(1)  # (B, S)
        return logits, {"pos": state["pos"] + 1, "caches": caches}, attn

    def reorder_state(self, state: dict, index: torch.Tensor) -> dict:
        return select_rows(state, index)
