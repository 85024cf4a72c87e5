"""GNMT recurrent encoder and decoder (Wu et al. 2016 §3; NVIDIA's GNMT v2 is the reference).

Owns: the embeddings, the recurrent stacks, the output projection and the decoder's per-layer
state. Attention lives in `nmt.models.attention`; search and training see only the contract of
`nmt.models.base` through `EncoderDecoder`.

Departures from the paper, as in NVIDIA GNMT v2:
- attention is queried by the output of decoder layer 1 at the current step (the paper uses the
  bottom layer's output of the previous step), and its context is fed to every upper layer.
  Attention therefore depends on layer 1 alone, so in training each layer runs over the whole
  target sequence in one call: no Python loop over time steps;
- the decoder starts from zero states: encoder states are not bridged to the decoder;
- every parameter starts uniform(-init_scale, init_scale) (attention gain and bias excepted,
  see `BahdanauAttention`); unlike NVIDIA, the padding row of the embedding is then zeroed.

Sources must hold at least one token each (`src_lens >= 1`, e.g. the eos).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from nmt.config import ModelConfig
from nmt.errors import ConfigError
from nmt.models.attention import build_attention
from nmt.models.base import (
    EncoderOut,
    WordDropout,
    config_kwargs,
    select_rows,
    sinusoid_positions,
)

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}


def _make_rnn(cell: str, input_dim: int, hidden: int, bidirectional: bool = False) -> nn.Module:
    if cell not in CELLS:
        raise ConfigError([f"model.cell: expected one of {', '.join(CELLS)}, found {cell!r}"])
    return CELLS[cell](input_dim, hidden, batch_first=True, bidirectional=bidirectional)


# One-step functions of the three cells, with nn.LSTM/GRU/RNN's weights and gate order.
_CELL_STEPS = {nn.LSTM: torch.lstm_cell, nn.GRU: torch.gru_cell, nn.RNN: torch.rnn_tanh_cell}


def run_layer(rnn: nn.Module, x: torch.Tensor, state, one_step_cell: bool | None = None):
    """`rnn(x, state)` for x (B, T, I) and a state in nn.LSTM's (1, B, H) form.

    For one step on a GPU (`one_step_cell` None: T == 1 and x on CUDA) the layer runs as its
    cell function instead: two GEMMs and one fused pointwise kernel, where cuDNN's sequence set-up
    and copies outweigh the arithmetic of a single step (figures: benchmarks/README.md, Models).
    On the CPU oneDNN's single-step LSTM is the faster one, so it stays.
    """
    if one_step_cell is None:
        one_step_cell = x.size(1) == 1 and x.is_cuda
    if not one_step_cell or state is None:
        return rnn(x, state)
    weights = (rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
    if isinstance(rnn, nn.LSTM):
        h, c = torch.lstm_cell(x[:, 0], (state[0][0], state[1][0]), *weights)  # (B, H) each
        return h.unsqueeze(1), (h.unsqueeze(0), c.unsqueeze(0))
    h = _CELL_STEPS[type(rnn)](x[:, 0], state[0], *weights)  # (B, H)
    return h.unsqueeze(1), h.unsqueeze(0)


def _init_uniform(module: nn.Module, init_scale: float, embed: nn.Embedding) -> None:
    for param in module.parameters():
        nn.init.uniform_(param, -init_scale, init_scale)
    if embed.padding_idx is not None:
        with torch.no_grad():
            embed.weight[embed.padding_idx].zero_()


def _embed(embed, ids, positions, scale: float, add_positions: bool, word_dropout) -> torch.Tensor:
    """Token embeddings times `scale` (whole tokens dropped in training by `word_dropout`), plus
    sinusoidal features of `positions` if asked."""
    x = word_dropout(embed(ids) * scale)  # (B, T, E)
    if add_positions:
        x = x + sinusoid_positions(positions, x.size(-1)).to(x.dtype)  # (B, T, E)
    return x


def reverse_within_lengths(x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first `lens[b]` positions, leave its padding in place: x (B, S, C).

    Its own inverse. It lets the backward direction of a bidirectional layer run as a plain
    left-to-right pass that starts at each sentence's real last token.
    """
    seq_len = x.size(1)
    positions = torch.arange(seq_len, device=x.device)  # (S,)
    flipped = lens[:, None] - 1 - positions[None, :]  # (B, S)
    index = torch.where(flipped >= 0, flipped, positions[None, :])  # (B, S)
    return x.gather(1, index.unsqueeze(-1).expand_as(x))  # (B, S, C)


class BiRNN(nn.Module):
    """A bidirectional layer as two unidirectional ones over right-padded batches.

    Same parameters and output as `nn.LSTM(bidirectional=True)` on packed sequences, but both
    passes stay on the fast padded kernels (packed sequences fall back to a slow per-step loop on
    CPU). Outputs at padded positions are meaningless; they are masked downstream.
    """

    def __init__(self, cell: str, input_dim: int, hidden: int):
        super().__init__()
        self.fwd = _make_rnn(cell, input_dim, hidden)
        self.bwd = _make_rnn(cell, input_dim, hidden)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        fwd = self.fwd(x)[0]  # (B, S, H)
        bwd = reverse_within_lengths(self.bwd(reverse_within_lengths(x, lens))[0], lens)
        return torch.cat((fwd, bwd), dim=-1)  # (B, S, 2H)


class GNMTEncoder(nn.Module):
    """Embedding, one bidirectional layer, then unidirectional layers with residuals.

    Layer 1 is bidirectional (`bi_hidden` per direction, concatenated); layers 2..`num_layers`
    have `hidden` units; layer i >= `residual_start` (1-based) adds its input to its output;
    dropout on the embeddings and between layers. The backward direction starts at each
    sentence's last real token and every upper layer runs left to right, so a sentence's memory
    at its real positions does not depend on its batch-mates (padded positions hold garbage,
    masked by `src_mask`). Arguments are `ModelConfig`'s fields of the same names (help and
    defaults there), with `num_layers` for `enc_layers`.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        *,
        emb_dim: int,
        hidden: int,
        bi_hidden: int,
        num_layers: int,
        residual_start: int,
        cell: str,
        dropout: float,
        word_dropout: float,
        init_scale: float,
        emb_scale: bool,
        positions: bool,
    ):
        super().__init__()
        self.residual_start = max(2, residual_start)
        if num_layers >= 2 and self.residual_start == 2 and 2 * bi_hidden != hidden:
            problem = (
                f"model.residual_start: a residual at encoder layer 2 needs 2 * model.bi_hidden"
                f" == model.hidden, found {2 * bi_hidden} and {hidden} (use residual_start >= 3)"
            )
            raise ConfigError([problem])
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.emb_scale = emb_dim**0.5 if emb_scale else 1.0
        self.positions = positions
        self.dropout = nn.Dropout(dropout)
        self.word_dropout = WordDropout(word_dropout)
        self.bi_layer = BiRNN(cell, emb_dim, bi_hidden)
        self.layers = nn.ModuleList()
        for i in range(2, num_layers + 1):
            self.layers.append(_make_rnn(cell, 2 * bi_hidden if i == 2 else hidden, hidden))
        self.out_dim = hidden if num_layers > 1 else 2 * bi_hidden
        _init_uniform(self, init_scale, self.embed)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int, pad_id: int) -> GNMTEncoder:
        return cls(vocab_size, pad_id, **config_kwargs(cls, model_cfg, num_layers="enc_layers"))

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor) -> EncoderOut:
        positions = torch.arange(src_ids.size(1), device=src_ids.device)
        src_mask = positions[None, :] < src_lens[:, None]  # (B, S)
        x = _embed(
            self.embed, src_ids, positions, self.emb_scale, self.positions, self.word_dropout
        )  # (B, S, E)
        x = self.bi_layer(self.dropout(x), src_lens)  # (B, S, 2 * bi_hidden)
        for i, rnn in enumerate(self.layers, start=2):
            out = rnn(self.dropout(x))[0]  # (B, S, H)
            x = out + x if i >= self.residual_start else out
        return EncoderOut(memory=x, src_mask=src_mask, src_lens=src_lens)


class GNMTDecoder(nn.Module):
    """GNMT v2 decoder: layer 1 on the target embeddings queries the memory; upper layers read
    [their input, context]; layer i >= `residual_start` adds its input (not the context); dropout
    on the embeddings and on every upper layer's input; a projection hidden -> V. Arguments are
    `ModelConfig`'s fields of the same names, with `num_layers` for `dec_layers`; `memory_dim` is
    the encoder's `out_dim`.

    State: {"layers": one entry per layer, `(h, c)` for an LSTM or `h` for GRU/RNN, each (B, H),
    "pos": (B,)}, batch first so that `select_rows` reorders it. `init_state` gives zeros (GNMT v2
    does not bridge encoder states) unless `bridge` is set.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        memory_dim: int,
        *,
        emb_dim: int,
        hidden: int,
        num_layers: int,
        residual_start: int,
        cell: str,
        attention: str,
        dropout: float,
        word_dropout: float,
        init_scale: float,
        emb_scale: bool,
        positions: bool,
        input_feeding: bool,
        bridge: bool,
    ):
        super().__init__()
        self.hidden = hidden
        self.is_lstm = cell == "lstm"
        self.residual_start = residual_start
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        self.emb_scale = emb_dim**0.5 if emb_scale else 1.0
        self.positions = positions
        self.input_feeding = input_feeding
        self.memory_dim = memory_dim
        self.dropout = nn.Dropout(dropout)
        self.word_dropout = WordDropout(word_dropout)
        first_in = emb_dim + (memory_dim if input_feeding else 0)
        self.layers = nn.ModuleList([_make_rnn(cell, first_in, hidden)])
        for _ in range(2, num_layers + 1):
            self.layers.append(_make_rnn(cell, hidden + memory_dim, hidden))
        self.out = nn.Linear(hidden, vocab_size)
        self.bridge = nn.Linear(memory_dim, num_layers * hidden) if bridge else None
        _init_uniform(self, init_scale, self.embed)
        # built after the uniform init so that its own defaults (gain, bias) stand
        self.attention = build_attention(attention, hidden, memory_dim, init_scale)

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, vocab_size: int, pad_id: int, memory_dim: int
    ) -> GNMTDecoder:
        return cls(
            vocab_size, pad_id, memory_dim, **config_kwargs(cls, model_cfg, num_layers="dec_layers")
        )

    def tie_output(self) -> None:
        """Share the output projection's weight with `self.embed` (needs emb_dim == hidden)."""
        if self.embed.weight.shape != self.out.weight.shape:
            raise ConfigError(
                [
                    f"model.tie_embeddings: needs model.emb_dim == model.hidden, found "
                    f"{self.embed.embedding_dim} and {self.hidden}"
                ]
            )
        self.out.weight = self.embed.weight

    def prepare(self, enc: EncoderOut) -> EncoderOut:
        """Project the memory to attention keys once per sentence."""
        return replace(enc, keys=self.attention.project_keys(enc.memory))  # keys (B, S, A)

    def _run(
        self,
        tgt_ids: torch.Tensor,
        positions: torch.Tensor,
        states: list,
        enc,
        feed=None,
        project=None,
    ):
        """All layers over tgt_ids (B, T) at `positions` ((T,) or (B, 1)); `states` holds each
        layer's initial state (nn.LSTM form) or None; `feed` the previous context (B, D) when
        input feeding; `project` the output projection (None: `self.out`; a shortlist's rows).
        Returns logits (B, T, V), states, attn (B, T, S), last context (B, D)."""
        x = _embed(
            self.embed, tgt_ids, positions, self.emb_scale, self.positions, self.word_dropout
        )  # (B, T, E)
        x = self.dropout(x)
        if self.input_feeding:
            x, context, attn, states[0] = self._fed_first_layer(x, states[0], enc, feed)
        else:
            x, states[0] = run_layer(self.layers[0], x, states[0])  # (B, T, H)
            context, attn = self.attention(x, enc.keys, enc.memory, enc.src_mask)  # (B,T,D)
        for i in range(1, len(self.layers)):
            inputs = self.dropout(torch.cat((x, context), dim=-1))  # (B, T, H + D)
            out, states[i] = run_layer(self.layers[i], inputs, states[i])  # (B, T, H)
            x = out + x if i + 1 >= self.residual_start else out
        return (project or self.out)(x), states, attn, context[:, -1]  # (B, T, V)

    def _fed_first_layer(self, x, state, enc, feed):
        """Layer 1 and attention one step at a time, each step reading [x_t, context_{t-1}]
        (input feeding, Luong et al. 2015 §3.3; TF GNMT's AttentionWrapper does the same)."""
        if feed is None:
            feed = x.new_zeros(x.size(0), self.memory_dim)  # (B, D)
        outs, contexts, attns = [], [], []
        for t in range(x.size(1)):
            step_in = torch.cat((x[:, t], self.dropout(feed)), dim=-1).unsqueeze(1)  # (B,1,E+D)
            out, state = run_layer(self.layers[0], step_in, state)  # (B, 1, H)
            context, attn = self.attention(out, enc.keys, enc.memory, enc.src_mask)  # (B,1,D)
            feed = context[:, 0]  # (B, D)
            outs.append(out)
            contexts.append(context)
            attns.append(attn)
        return torch.cat(outs, 1), torch.cat(contexts, 1), torch.cat(attns, 1), state

    def _teacher_forced(self, tgt_in_ids: torch.Tensor, enc: EncoderOut):
        """`_run` over the whole of tgt_in_ids (B, T) from the initial state."""
        positions = torch.arange(tgt_in_ids.size(1), device=tgt_in_ids.device)  # (T,)
        if self.bridge is None:
            states = [None] * len(self.layers)
        else:
            states = self._hx(self.init_state(enc)["layers"])
        feed = self.init_state(enc).get("feed") if self.input_feeding else None
        return self._run(tgt_in_ids, positions, states, enc, feed)

    def forward(self, tgt_in_ids: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        return self._teacher_forced(tgt_in_ids, enc)[0]  # (B, T, V)

    def inspect_attention(self, tgt_in_ids: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        """Teacher forcing: the attention weights (B, T, S), the same as `step` returns."""
        return self._teacher_forced(tgt_in_ids, enc)[2]  # (B, T, S)

    def init_state(self, enc: EncoderOut) -> dict:
        """{"layers": per layer (h, c) or h, each (B, H); "pos": (B,) next target position}."""
        batch = enc.memory.size(0)
        pos = torch.zeros(batch, dtype=torch.long, device=enc.memory.device)  # (B,)
        zeros = enc.memory.new_zeros(batch, self.hidden)  # (B, H)
        if self.bridge is None:
            starts = [zeros] * len(self.layers)
        else:
            mask = enc.src_mask.unsqueeze(-1).to(enc.memory.dtype)  # (B, S, 1)
            mean = (enc.memory * mask).sum(1) / mask.sum(1).clamp(min=1)  # (B, D)
            starts = torch.tanh(self.bridge(mean)).view(batch, -1, self.hidden).unbind(1)
        layers = tuple((h, zeros) if self.is_lstm else h for h in starts)
        state = {"layers": layers, "pos": pos}
        if self.input_feeding:
            state["feed"] = enc.memory.new_zeros(batch, self.memory_dim)  # (B, D)
        return state

    def _hx(self, layers: tuple) -> list:
        """Batch-first (B, H) states -> the (1, B, H) form that nn.LSTM/GRU/RNN take."""
        if self.is_lstm:
            return [(h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()) for h, c in layers]
        return [h.unsqueeze(0).contiguous() for h in layers]

    def step(self, tgt_ids_t: torch.Tensor, state: dict, enc: EncoderOut, project=None):
        """One decoding step with the same modules: tgt_ids_t (B,) -> logits (B, V); `project`:
        the output projection to use (None: `self.out`; a shortlist's rows, V of them)."""
        logits, hx, attn, context = self._run(
            tgt_ids_t.unsqueeze(1),
            state["pos"].unsqueeze(1),
            self._hx(state["layers"]),
            enc,
            state.get("feed"),
            project,
        )  # (B, 1, V)
        if self.is_lstm:
            layers = tuple((h[0], c[0]) for h, c in hx)  # (B, H) each
        else:
            layers = tuple(h[0] for h in hx)  # (B, H)
        state = {"layers": layers, "pos": state["pos"] + 1}
        if self.input_feeding:
            state["feed"] = context  # (B, D)
        return logits.squeeze(1), state, attn.squeeze(1)  # (B, V) (B, S)

    def reorder_state(self, state: tuple, index: torch.Tensor) -> tuple:
        return select_rows(state, index)
