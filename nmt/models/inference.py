"""Decoding in reduced precision on a CPU: int8 and bfloat16 stand-ins for the products that a
decoding step spends its time in, swapped into a loaded model (`reduce_decoder`).

Owns: `Int8Linear` and `Bf16Linear` (a linear layer whose product runs in int8 or bf16, with the
float32 interface of nn.Linear), `CellStep` (one step of an LSTM/GRU/RNN layer as ONE product
over [x, h], then the cell's pointwise update in float32), `ConvColumns` (a TCN decoder's causal
conv as one product over its dilated taps) and `reduce_decoder`, which swaps them in. Does not
own the int8 product itself (nmt.devices.int8_linear, timed by the same probe that chooses the
precision), the choice of precision (nmt.devices, nmt.translator), or training: the stand-ins
are inference-only (no gradients, no dropout).

What is swapped, per decoder family (the encoder runs once per sentence and stays as it is, or,
with int8 where bf16 pays, runs under bf16 autocast: `Bf16Encoder`):
- GNMT: every decoder layer (`CellStep`), the attention's query projection (Bahdanau), the
  output projection;
- TCN: both convs of every block (dense ones; `separable` convs stay float32) and the 1x1
  residual (`ConvColumns`, with weight norm folded in once), the per-block query and context
  projections, the bottleneck and the output.

int8 is dynamic quantization: weights per output channel, symmetric, once at load time;
activations per row, symmetric, at every call; int32 sums scaled back to float32 with the bias
(nmt.devices.int8_linear). It is written on `torch._int_mm`, the core int8 x int8 -> int32 op,
rather than on `torch.ao.quantization.quantize_dynamic` or torchao: the eager
`torch.ao.quantization` API is deprecated (to be removed; its quantized tensors too), its
dynamic LSTM cannot be run one step at a time as a cell over [x, h], and torchao is a separate
package whose int8 CPU path lowers to the same `_int_mm` through torch.compile. The op that
PyTorch keeps is the one used here; what is built on it (the cell over [x, h], the shortlist's
row selection) is ours and tested (tests/test_precision.py).

bfloat16 keeps the same structure with bf16 weights and products (oneDNN: native with
AVX512-BF16 or AMX) and the cell's state in float32: one product per cell step is about twice
as fast as nn.LSTM under autocast for a few rows (batch-1 beam search) and on a par at 640 rows
(benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nmt.devices import int8_linear, quantize_weight
from nmt.models.attention import BahdanauAttention
from nmt.models.gnmt import GNMTDecoder
from nmt.models.tcn import TCNDecoder


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantized per row at each call.

    Takes and returns float32 (..., in_features) -> (..., out_features)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        q_weight, w_scale = quantize_weight(weight)
        self.register_buffer("q_weight", q_weight)  # (N, K) int8
        self.register_buffer("w_scale", w_scale)  # (N,)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q_weight, self.w_scale, self.bias)  # (..., N)

    def rows(self, ids: torch.Tensor) -> Int8Linear:
        """The same layer restricted to output rows `ids` (per-channel scales: exact)."""
        out = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(out)
        out.register_buffer("q_weight", self.q_weight.index_select(0, ids))
        out.register_buffer("w_scale", self.w_scale.index_select(0, ids))
        bias = None if self.bias is None else self.bias.index_select(0, ids)
        out.register_buffer("bias", bias)
        out.in_features, out.out_features = self.in_features, ids.numel()
        return out


class Bf16Linear(nn.Module):
    """y = x W^T + b in bfloat16 (weights stored in bf16), from float32 or bf16 input."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).clone())  # (N, K)
        self.register_buffer("bias", None if bias is None else bias.detach().bfloat16().clone())
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias)  # (..., N) bf16

    def rows(self, ids: torch.Tensor) -> Bf16Linear:
        bias = None if self.bias is None else self.bias.index_select(0, ids)
        return Bf16Linear(self.weight.index_select(0, ids), bias)


PRODUCTS = {"int8": Int8Linear, "bfloat16": Bf16Linear}


def _gru_weight(rnn: nn.GRU) -> tuple[torch.Tensor, torch.Tensor]:
    """GRU's gates over [x, h] as 4H rows: r and z sum both parts, but the candidate n needs its
    input part and its hidden part apart (n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), the
    reset gate multiplying the hidden part only): rows [r; z; n_x; n_h]."""
    w_ih, w_hh = rnn.weight_ih_l0.detach(), rnn.weight_hh_l0.detach()  # (3H, I), (3H, H)
    b_ih, b_hh = rnn.bias_ih_l0.detach(), rnn.bias_hh_l0.detach()
    h = rnn.hidden_size
    rz = torch.cat([w_ih[: 2 * h], w_hh[: 2 * h]], dim=1)  # (2H, I + H)
    n_x = torch.cat([w_ih[2 * h :], torch.zeros_like(w_hh[2 * h :])], dim=1)  # (H, I + H)
    n_h = torch.cat([torch.zeros_like(w_ih[2 * h :]), w_hh[2 * h :]], dim=1)  # (H, I + H)
    bias = torch.cat([b_ih[: 2 * h] + b_hh[: 2 * h], b_ih[2 * h :], b_hh[2 * h :]])  # (4H,)
    return torch.cat([rz, n_x, n_h]), bias  # (4H, I + H), (4H,)


class CellStep(nn.Module):
    """A one-layer, unidirectional, batch-first nn.LSTM/GRU/RNN as a cell function: at each
    step one product over [x_t, h] (`product`, int8 or bf16), then the cell's pointwise update
    in float32. Same call as the layer it stands for: (x (B, T, I), state in nn.LSTM's
    (1, B, H) form or None) -> (out (B, T, H), state)."""

    def __init__(self, rnn: nn.RNNBase, product: type):
        super().__init__()
        if rnn.num_layers != 1 or rnn.bidirectional or not rnn.batch_first:
            raise ValueError("CellStep: expected one unidirectional batch-first layer")
        kinds = {nn.LSTM: "lstm", nn.GRU: "gru"}
        self.kind = kinds[type(rnn)] if type(rnn) in kinds else rnn.nonlinearity  # tanh, relu
        self.hidden = rnn.hidden_size
        if self.kind == "gru":
            weight, bias = _gru_weight(rnn)
        else:
            weight = torch.cat([rnn.weight_ih_l0, rnn.weight_hh_l0], dim=1)  # (G*H, I + H)
            bias = rnn.bias_ih_l0 + rnn.bias_hh_l0  # (G*H,)
        if self.kind == "lstm":  # the cell gate's rows doubled: tanh(g) = 2 sigmoid(2g) - 1
            h = self.hidden
            weight, bias = weight.detach().clone(), bias.detach().clone()
            weight[2 * h : 3 * h] *= 2
            bias[2 * h : 3 * h] *= 2
        self.product = product(weight.detach(), bias.detach())

    def forward(self, x: torch.Tensor, state=None):
        batch = x.size(0)
        if state is None:
            zeros = x.new_zeros(1, batch, self.hidden, dtype=torch.float32)  # (1, B, H)
            state = (zeros, zeros) if self.kind == "lstm" else zeros
        h = (state[0] if self.kind == "lstm" else state)[0].float()  # (B, H)
        c = state[1][0].float() if self.kind == "lstm" else None  # (B, H)
        outs = []
        for t in range(x.size(1)):
            xh = torch.cat([x[:, t], h.to(x.dtype)], dim=1)  # (B, I + H)
            gates = self.product(xh).float()  # (B, G*H)
            h, c = self._update(gates, h, c)  # (B, H) each
            outs.append(h)
        out = torch.stack(outs, dim=1)  # (B, T, H)
        h_n = h.unsqueeze(0)  # (1, B, H)
        return out, ((h_n, c.unsqueeze(0)) if self.kind == "lstm" else h_n)

    def _update(self, gates: torch.Tensor, h: torch.Tensor, c):
        """The cell's pointwise update in float32. tanh is written 2 sigmoid(2x) - 1, the same
        function: on a CPU torch's float tanh is ~20x slower than its sigmoid (and nn.LSTM's
        fused kernel pays neither)."""
        if self.kind == "lstm":  # nn.LSTM's gate order: input, forget, cell, output
            i, f, g, o = torch.sigmoid(gates).chunk(4, dim=1)  # g's rows doubled in __init__
            c = torch.addcmul(f * c, i, g.mul(2.0).sub_(1.0))  # f c + i tanh(g)
            return _tanh_(c * 2.0).mul_(o), c  # o tanh(c)
        if self.kind == "gru":  # rows [r; z; n_x; n_h] (_gru_weight)
            r, z, n_x, n_h = gates.chunk(4, dim=1)
            n = _tanh_(torch.addcmul(n_x, torch.sigmoid(r), n_h).mul_(2.0))
            return n + torch.sigmoid(z) * (h - n), None  # (1 - z) n + z h
        return (_tanh_(gates * 2.0) if self.kind == "tanh" else torch.relu(gates)), None


def _tanh_(doubled: torch.Tensor) -> torch.Tensor:
    """tanh(x) from 2x, in place: 2 sigmoid(2x) - 1."""
    return doubled.sigmoid_().mul_(2.0).sub_(1.0)


class ConvColumns(nn.Module):
    """A (weight-normalised) dilated Conv1d as one product over each output's k taps, with the
    weight (weight norm folded in) in `product`'s precision. `column(taps (B, k * C_in))`, the
    k input columns side by side, oldest first, gives one output column (the TCN decoder's
    step, nmt.models.tcn._last_column); `forward` takes a padded (B, C_in, T) sequence as
    Conv1d does (teacher forcing)."""

    def __init__(self, conv: nn.Conv1d, product: type):
        super().__init__()
        weight = conv.weight.detach().transpose(1, 2)  # (C_out, k, C_in); weight norm folded
        self.dilation, self.kernel_size = conv.dilation, conv.kernel_size
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        # products[i] reads taps i..k-1 (the decoder leaves out taps before the sentence start)
        self.products = nn.ModuleList(
            product(weight[:, first:].reshape(weight.size(0), -1), conv.bias)
            for first in range(weight.size(1))
        )

    def column(self, taps: torch.Tensor, first: int = 0) -> torch.Tensor:
        """taps (B, (k - first) * C_in), inputs first..k-1 side by side -> (B, C_out)."""
        return self.products[first](taps).float()  # (B, C_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        span = (self.kernel_size[0] - 1) * self.dilation[0]
        windows = x.unfold(2, span + 1, 1)[..., :: self.dilation[0]]  # (B, C_in, T', k)
        taps = windows.permute(0, 2, 3, 1).reshape(x.size(0), windows.size(2), -1)  # (B,T',k*C)
        return self.column(taps).transpose(1, 2)  # (B, C_out, T')


def _linear(linear: nn.Linear, product: type) -> nn.Module:
    return product(linear.weight.detach(), linear.bias)


class Bf16Encoder(nn.Module):
    """An encoder run under bf16 autocast, its memory handed on in float32: with int8 decoding
    where bf16 is native and faster, the encoder (one pass over each sentence: oneDNN's bf16
    LSTM) takes 12% less of greedy decoding's time (benchmarks/README.md)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.out_dim = encoder.out_dim

    def forward(self, src_ids: torch.Tensor, src_lens: torch.Tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = self.encoder(src_ids, src_lens)
        return dataclasses.replace(out, memory=out.memory.float())  # (B, S, D)


@torch.no_grad()
def reduce_decoder(model: nn.Module, precision: str) -> nn.Module:
    """Swap the decoder's step products of `model` (an EncoderDecoder in eval mode) for
    `precision`'s ("int8" or "bfloat16") stand-ins, in place; returns `model`. Products keep
    their output dtype (float32 for int8, bf16 for bfloat16, as autocast gives); the cells'
    state stays float32, and log_softmax reads bf16 logits into float32."""
    product = PRODUCTS[precision]
    dec = model.decoder
    if isinstance(dec, GNMTDecoder):
        dec.layers = nn.ModuleList(CellStep(rnn, product) for rnn in dec.layers)
        if isinstance(dec.attention, BahdanauAttention):
            dec.attention.query_proj = _linear(dec.attention.query_proj, product)
    elif isinstance(dec, TCNDecoder):
        for block in dec.blocks:  # separable convs stay float32 (no stand-in for them yet)
            if isinstance(block.conv1, nn.Conv1d):
                block.conv1 = ConvColumns(block.conv1, product)
                block.conv2 = ConvColumns(block.conv2, product)
            if block.residual is not None:
                block.residual = ConvColumns(block.residual, product)
        dec.queries = nn.ModuleList(_linear(q, product) for q in dec.queries)
        dec.contexts = nn.ModuleList(_linear(c, product) for c in dec.contexts)
        if dec.bottleneck is not None:
            dec.bottleneck = _linear(dec.bottleneck, product)
    else:
        raise TypeError(f"reduce_decoder: no {precision} stand-ins for {type(dec).__name__}")
    dec.out = _linear(dec.out, product)
    return model
