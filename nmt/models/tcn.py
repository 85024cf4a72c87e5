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
  encoder outputs it scored) projected back and added to the block output. The projection is
  applied to the keys (values) before the weighted sum, once per source position in `prepare`
  (the same function: it is linear and the weights sum to 1). `step` returns the
  mean of the blocks' attention weights (a distribution over the source, as coverage wants);
  `inspect_attention` the last block's (pictures and word alignments);
- both sides add sinusoidal position features (Vaswani et al. 2017) times a learned scalar
  (started at the RMS of the embedding initialisation) to the token embeddings. ConvS2S learns a
  position table instead; sinusoids need no maximum length. Convolutions only see relative order
  and the sentence edges within their window; absolute positions make "attend to source position
  n - t" (reordering) easy to learn;
- dropout masks come from 7 random bits per element, eight elements to one int64 draw
  (`keep_mask`: nn.Dropout's distribution with p rounded to a multiple of 2**-7, 0.2 -> 0.203,
  not its random stream): nn.Dropout's element-by-element bernoulli_, and a torch.rand mask,
  are several times slower on a CPU, and a 15-bit mask about 1.5 times (benchmarks/README.md, TCN
  parts).

Options from ConvS2S and after (all off by default; `configs/tcn_small.yaml` turns on the three
that paid). Measured on Multi30k, 164 steps of 3,000-token batches at lr 2e-3 and warm-up 50
unless said, validation loss (lower is better; the Bai et al. block alone: 5.31):
- `emb_scale` (embeddings times sqrt(emb_dim)) with `tie_embeddings` (the output projection is
  the target embedding, through a bottleneck where channels != emb_dim): 4.98;
- `attention_embeddings` (ConvS2S Sec. 3.3: the target embedding joins each attention query,
  the source embeddings join the values, each sum times sqrt(0.5)): 5.22 alone, 4.73 with the
  two above; with lr 3e-3 as well 4.48 (the preset; the GNMT small preset: 4.78 at step 163);
- kept as options, they did not pay here: `glu` with `scaled_residual` and `conv_init=convs2s`
  (ConvS2S's block and its variance-keeping initialisation) 5.67, `scaled_residual` alone 6.05,
  `conv_init=convs2s` over tie and scaling 5.27 (against 4.98), `attention_blocks=2` (attend
  after the last two blocks only) 5.05; `separable` (a dilated depthwise convolution then a
  1x1 one: k times fewer products; its depthwise conv runs as k shifted multiply-adds with its
  own backward, faster than torch's grouped conv backward with a dilation) was not screened
  for quality.

Depth: the preset has the default 4 levels (kernel size 3, receptive field 61, data.max_len 60;
the longest Multi30k training pair is 52 pieces) where it had 5 (125). A fifth block adds a
fifth of the work and of the attention, and Multi30k sentences (about 20 pieces) hardly reach
its taps: trained in one process over the same batches as the GNMT preset (bf16, 2 threads),
4 levels ran at 1.26x the GNMT's target tok/s where 5 ran at 1.04x, and learned about as fast
per step (greedy validation BLEU 15.25 against 15.99 after one epoch; test_2016_flickr beam 5
without coverage penalty 29.79 against 30.87 after 500 steps, 35.21 against 36.71 after 2,500,
whose outputs were short: the preset's coverage penalty, search.beta 0.2, gives 37.09; README,
"TCN against GNMT").

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

Work left out, none of it changing a result (README, "TCN against GNMT", has the figures):
- a conv tap that reads only padding (deep levels over short sentences: with dilation 16 the
  decoder's oldest tap is 32 back, and Multi30k sentences are ~20 pieces) is not computed, in
  training (`reaching_taps` of the batch's length) and at each decoding step (the taps before
  position 0, read on a CPU: a GPU would wait for the position, and a CUDA graph needs the
  same taps at every step);
- a beam's hypotheses share their sentence: the keys and projected values are kept once per
  sentence (`EncoderOut.per_sentence`, not copied for every beam row) and a sentence's K query
  rows are scored in one product (`EncoderOut.sentence_rows`);
- a reorder selects rows of the history's row table only, whatever the batch size
  (`_History`); `compact_state` gathers the columns for a CUDA graph's fixed buffers.

Interfaces are batch-first; only the inside of the stacks transposes to (B, C, T).
The `hidden` setting is a GNMT size and is not used here: every TCN width is `channels`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from nmt.config import ModelConfig, check_receptive_field, receptive_field  # noqa: F401
from nmt.errors import ConfigError
from nmt.models.base import EncoderOut, WordDropout, config_kwargs, sinusoid_positions

HALF_SQRT = math.sqrt(0.5)


DROPOUT_BITS = 7  # a dropout mask's resolution: p is rounded to a multiple of 2**-7
_SAME_WIDTH_INT = {  # a float dtype -> the int dtype whose bits it reinterprets
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def rounded_p(p: float) -> float:
    """The dropout probability `keep_mask` draws with: p rounded to a multiple of 2**-7."""
    return round(p * 2**DROPOUT_BITS) / 2**DROPOUT_BITS


def keep_mask(
    shape: torch.Size, p: float, dtype: torch.dtype, device, keep: float = 1.0
) -> torch.Tensor:
    """A (shape) tensor of `keep` (probability 1 - rounded_p(p)) and 0 in `dtype`, from 7 random
    bits per element: eight elements share one 64-bit draw (`random_` fills an int64 with 63
    random bits; each byte's low 7 are used). Adding 2**7 - threshold to those 7 bits sets the
    byte's top bit exactly when they are at or above the threshold; an arithmetic shift
    spreads that bit over the byte, a sign-extending cast over the width of `dtype`, and an AND
    with the bits of `keep` leaves `keep` or 0.0: no comparison, no bool and no int-to-float
    conversion (each runs element by element on a CPU); and random_, the bulk of the cost,
    draws half the bits of the 15-bit mask used before. Dropout with it over a (160, 256, 20)
    bf16 activation, forward and backward, took 1.04 ms against 1.53 with the 15-bit mask,
    3.23 with a `torch.rand` mask and 7.13 with nn.Dropout on the 2-core Zen 4
    (`benchmarks/tcn_parts.py`; benchmarks/README.md, TCN parts)."""
    threshold = round(p * 2**DROPOUT_BITS)
    if threshold in (0, 2**DROPOUT_BITS):  # p rounds to 0 or 1: keep all, or nothing
        return torch.full(shape, keep if threshold == 0 else 0.0, dtype=dtype, device=device)
    n = math.prod(shape)
    draws = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_()
    lanes = draws.view(torch.int8)[:n].view(shape)  # (shape) bytes of the draws
    kept = lanes.bitwise_and_(2**DROPOUT_BITS - 1).add_(2**DROPOUT_BITS - threshold)
    kept = kept.bitwise_right_shift_(DROPOUT_BITS)  # (shape) int8: -1 (all ones) kept, 0 dropped
    int_type = _SAME_WIDTH_INT[dtype]
    return kept.to(int_type).bitwise_and_(_bits_of(keep, dtype)).view(dtype)


@functools.cache
def _bits_of(value: float, dtype: torch.dtype) -> int:
    """The bits of `value` in float `dtype`, read as the signed int of the same width."""
    return torch.tensor(value, dtype=dtype).view(_SAME_WIDTH_INT[dtype]).item()


class _Dropout(nn.Module):
    """Dropout (Srivastava et al. 2014) with the mask from `keep_mask`: zero with probability
    p' = `rounded_p(p)` (p rounded to a multiple of 2**-7: 0.2 -> 0.203), scale the rest by
    1 / (1 - p'), the identity in eval mode; the distribution of nn.Dropout(p'), not its random
    stream. On a CPU nn.Dropout's bernoulli_ draws element by element, several times slower
    (`benchmarks/tcn_parts.py`; benchmarks/README.md, TCN parts)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        # the scale rides on the mask: one product over x, forward and backward
        keep = 1.0 / max(1.0 - rounded_p(self.p), 2**-DROPOUT_BITS)
        return x * keep_mask(x.shape, self.p, x.dtype, x.device, keep)


class _Embedding(nn.Module):
    """Token embedding (times sqrt(emb_dim) with `emb_scale`) plus scaled sinusoidal positions,
    then dropout. Owns the position scale only: `embed` is assigned by the owner so that
    `build_model` can share it."""

    def __init__(
        self, emb_dim: int, init_scale: float, dropout: float, word_dropout: float, emb_scale: bool
    ):
        super().__init__()
        self.emb_dim = emb_dim
        self.scale = math.sqrt(emb_dim) if emb_scale else 1.0
        # started at the RMS of the (scaled) embedding initialisation
        self.pos_scale = nn.Parameter(torch.tensor(self.scale * init_scale / math.sqrt(3.0)))
        self.dropout = _Dropout(dropout)
        self.word_dropout = WordDropout(word_dropout)

    def forward(self, embed: nn.Embedding, ids: torch.Tensor, positions: torch.Tensor):
        pos = sinusoid_positions(positions, self.emb_dim)  # (..., E)
        x = self.word_dropout(embed(ids) * self.scale)  # (..., E)
        return self.dropout(x + self.pos_scale * pos)  # (..., E)


def _init_normal_(module: nn.Module, gain: float, dropout: float) -> None:
    """ConvS2S's variance-keeping rule: normal(0, sqrt(gain * (1 - dropout) / fan_in)), bias 0."""
    fan_in = module.weight[0].numel()  # C_in * k (or k for a depthwise conv), in_features
    nn.init.normal_(module.weight, std=math.sqrt(gain * (1.0 - dropout) / fan_in))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class _DilatedDepthwise(torch.autograd.Function):
    """y[:, c, t] = sum_i w[c, i] * x[:, c, t + i*d]: a dilated depthwise convolution over an
    already padded x (B, C, T + (k-1)d) with weight w (C, k), as k shifted multiply-adds.

    PyTorch's grouped conv1d does the same sums, but its CPU backward with a dilation ran
    slower than these multiply-adds (`benchmarks/tcn_parts.py`; benchmarks/README.md, TCN
    parts); the results are equal and the gradients equal up to the order of the sums.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, dilation: int) -> torch.Tensor:
        k = w.size(1)
        steps = x.size(2) - (k - 1) * dilation  # T
        y = x[:, :, :steps] * w[:, :1]  # (B, C, T)
        for i in range(1, k):
            y.addcmul_(x[:, :, i * dilation : i * dilation + steps], w[:, i : i + 1])
        ctx.save_for_backward(x, w)
        ctx.dilation = dilation
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, w = ctx.saved_tensors
        d, steps = ctx.dilation, grad_y.size(2)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)  # (B, C, T + (k-1)d)
            for i in range(w.size(1)):
                grad_x[:, :, i * d : i * d + steps].addcmul_(grad_y, w[:, i : i + 1])
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack(
                [(grad_y * x[:, :, i * d : i * d + steps]).sum((0, 2)) for i in range(w.size(1))],
                dim=1,
            )  # (C, k)
        return grad_x, grad_w, None


class _SeparableConv(nn.Module):
    """A dilated depthwise convolution (k weights per channel) then a 1x1 convolution, both
    weight-normalised: about k times fewer products than a dense (C_out, C_in, k) one."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int):
        super().__init__()
        self.depthwise = nn.Conv1d(
            in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels
        )
        self.pointwise = nn.Conv1d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, first: int = 0, last: int | None = None) -> torch.Tensor:
        """x (B, C_in, T + (last-first-1)d), padded -> (B, C_out, T): taps first..last-1 of k."""
        depthwise = self.depthwise
        w = depthwise.weight.squeeze(1)[:, first:last]  # (C_in, last - first)
        h = _DilatedDepthwise.apply(x, w, depthwise.dilation[0])  # (B, C_in, T)
        return self.pointwise(h + depthwise.bias[:, None])  # (B, C_out, T)


def _make_conv(c_in, c_out, kernel_size, dilation, separable, init, gain, dropout) -> nn.Module:
    """A weight-normalised dilated conv (dense or separable), initialised as `init` says; weight
    norm starts with g = ||v||, so the initial function is the initialised one."""
    if separable:
        conv = _SeparableConv(c_in, c_out, kernel_size, dilation)
        if init == "convs2s":
            _init_normal_(conv.depthwise, 1.0, 0.0)  # a plain (variance-keeping) sum of k taps
            _init_normal_(conv.pointwise, gain, dropout)
        conv.depthwise = weight_norm(conv.depthwise)
        conv.pointwise = weight_norm(conv.pointwise)
        return conv
    conv = nn.Conv1d(c_in, c_out, kernel_size, dilation=dilation)
    if init == "convs2s":
        _init_normal_(conv, gain, dropout)
    return weight_norm(conv)


def _last_column(conv: nn.Module, taps: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The one output of `conv` whose dilated inputs first..k-1 are taps (B, (k-first) * C_in),
    oldest first, -> (B, C_out); the inputs before `first` are zeros (the padding before the
    sentence start) and add nothing.

    One matrix product over the k columns side by side (a depthwise weighted sum first for a
    separable conv): several times faster on CPU than a dilated conv call over the window, and
    the same sum up to rounding. Columns side by side (not interleaved, as the conv weight's
    (C_out, C_in, k) layout would want) make gathering them one contiguous copy per row.
    """
    batch = taps.size(0)
    if not isinstance(conv, (nn.Conv1d, _SeparableConv)):
        return conv.column(taps, first)  # a reduced-precision stand-in (inference.ConvColumns)
    if isinstance(conv, _SeparableConv):
        depthwise = conv.depthwise.weight.squeeze(1).t()[first:]  # (k - first, C_in)
        mixed = (taps.view(batch, depthwise.size(0), -1) * depthwise).sum(1)  # (B, C_in)
        mixed = mixed + conv.depthwise.bias
        return F.linear(mixed, conv.pointwise.weight.squeeze(2), conv.pointwise.bias)
    weight = conv.weight.transpose(1, 2)[:, first:]  # (C_out, k - first, C_in); weight norm
    return F.linear(taps, weight.reshape(weight.size(0), -1), conv.bias)  # (B, C_out)


class TemporalBlock(nn.Module):
    """Two weight-normalised dilated convs, each followed by its activation (ReLU, or a GLU)
    and dropout, plus a residual (Bai et al.; the GLU and scaled residual of ConvS2S as options).

    Owns its convs and padding. `forward` works on (B, C, T); `step` computes one new column
    from the inputs each conv read at earlier steps (causal blocks only; see `TCNDecoder`).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        dilation: int,
        dropout: float,
        causal: bool,
        *,
        glu: bool,
        scaled_residual: bool,
        separable: bool,
        conv_init: str,
    ):
        super().__init__()
        self.kernel_size, self.dilation = kernel_size, dilation
        self.in_channels, self.out_channels = in_channels, out_channels
        self.span = (kernel_size - 1) * dilation  # inputs before the newest one a conv reads
        self.causal, self.glu, self.scaled_residual = causal, glu, scaled_residual
        if causal:
            self.padding = (self.span, 0)
        else:  # centered; for even kernel sizes the extra position goes to the left
            self.padding = ((self.span + 1) // 2, self.span // 2)
        width, gain = (2 * out_channels, 4.0) if glu else (out_channels, 2.0)
        conv = (kernel_size, dilation, separable, conv_init, gain, dropout)
        self.conv1 = _make_conv(in_channels, width, *conv)
        self.conv2 = _make_conv(out_channels, width, *conv)
        self.residual = None
        if in_channels != out_channels:
            self.residual = nn.Conv1d(in_channels, out_channels, 1)
            if conv_init == "convs2s":
                _init_normal_(self.residual, 1.0, 0.0)
        self.dropout = _Dropout(dropout)

    def reaching_taps(self, length: int) -> tuple[int, int]:
        """Taps first..last-1 of each conv can read a position of a length-`length` sequence;
        the others read padding only (the deep levels of short sentences: with dilation 16 the
        decoder's oldest tap is 32 back) and are left out, which changes no result."""
        k, d, left = self.kernel_size, self.dilation, self.padding[0]
        first, last = 0, k
        while first < k - 1 and left - first * d >= length:  # before position 0
            first += 1
        while last - 1 > first and (last - 1) * d - left >= length:  # after the last position
            last -= 1
        return first, last

    def _conv(self, conv: nn.Module, x: torch.Tensor, taps: tuple[int, int]) -> torch.Tensor:
        """conv over x (B, C_in, T) with its padding, through taps first..last-1 only."""
        (first, last), k, d = taps, self.kernel_size, self.dilation
        if not isinstance(conv, (nn.Conv1d, _SeparableConv)):
            return conv(F.pad(x, self.padding))  # (B, C_out, T)
        left, right = self.padding[0] - first * d, self.padding[1] - (k - last) * d
        if left == right and left >= 0 and isinstance(conv, nn.Conv1d):  # no padded copy
            return F.conv1d(x, conv.weight[:, :, first:last], conv.bias, padding=left, dilation=d)
        x = F.pad(x, (max(left, 0), max(right, 0)))  # (B, C_in, T + left + right), padded ...
        x = x[:, :, max(-left, 0) : x.size(2) - max(-right, 0)]  # ... then cut (even k: a
        # centered conv's one remaining tap can read the padding alone, further than T away)
        if isinstance(conv, _SeparableConv):
            return conv(x, first, last)  # (B, C_out, T)
        return F.conv1d(x, conv.weight[:, :, first:last], conv.bias, dilation=d)  # (B, C_out, T)

    def _activate(self, h: torch.Tensor, dim: int) -> torch.Tensor:
        # h is a fresh conv output that its conv's backward does not read: ReLU in place
        return self.dropout(F.glu(h, dim=dim) if self.glu else F.relu(h, inplace=True))

    def _join(self, h: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
        return (h + res) * HALF_SQRT if self.scaled_residual else F.relu(h + res)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, T), mask (B, 1, T) float with 1 = real token, or None -> (B, C_out, T)."""
        if mask is not None:
            x = x * mask
        taps = self.reaching_taps(x.size(2))
        h = self._activate(self._conv(self.conv1, x, taps), dim=1)  # (B, C_out, T)
        if mask is not None:
            # in h's dtype: a float32 mask would promote a bf16 h to float32 under autocast, and
            # conv2 would cast it back (a copy forward and backward for the same values)
            h = h * mask.to(h.dtype)
        h = self._activate(self._conv(self.conv2, h, taps), dim=1)  # (B, C_out, T)
        res = x if self.residual is None else self.residual(x)  # (B, C_out, T)
        return self._join(h, res)

    def step(self, x_t: torch.Tensor, history: _History, convs: tuple[int, int], pos: int):
        """x_t (B, C_in) at position `pos` (at most; None: unknown) -> (y_t (B, C_out),
        [x_t, h_t]: what conv1 and conv2 read at this step, for `history` to keep). Causal
        blocks only; the taps before position 0 are left out as in `forward`."""
        first = 0 if pos is None else self.reaching_taps(pos + 1)[0]
        taps = history.taps(convs[0], x_t, first)
        h = self._activate(_last_column(self.conv1, taps, first), dim=1)  # (B, C_out)
        taps = history.taps(convs[1], h, first)
        h_out = self._activate(_last_column(self.conv2, taps, first), dim=1)  # (B, C_out)
        res = x_t if self.residual is None else _last_column(self.residual, x_t)  # (B, C_out)
        return self._join(h_out, res), [x_t, h]


class _History:
    """The inputs that the decoder's causal convs read at earlier steps: for conv c, the last
    span_c columns (oldest first), and one row table for all convs.

    Beam search reorders the rows at every step. Copying every conv's last span_c columns (the
    cache) per step moves sum(span_c) columns per row where the products read k - 1 per conv
    (5 levels of k = 3: 124 against 20): instead
    `rows[:, W - m]` (W the longest span) says which row of the column written m steps ago holds
    each current row's input, so a reorder only selects rows of this (B, W) table, and a step
    gathers just the k - 1 columns each conv reads. That holds when the batch shrinks too (beam
    search drops a finished sentence at most steps of a large batch): the old columns keep the
    rows nobody reads until they leave the window. `compact` gathers every column to the
    batch's rows, for a CUDA graph's fixed buffers (nmt.search_graph).
    """

    def __init__(self, state: dict, spans: list[int], dilations: list[int]):
        self.cols, self.rows = state["cols"], state["rows"]
        self.spans, self.dilations = spans, dilations

    def taps(self, conv: int, x_t: torch.Tensor, first: int = 0) -> torch.Tensor:
        """Inputs first..k-1 of those conv `conv` reads at this step, oldest first:
        (B, (k - first) * C_in)."""
        span, d, width = self.spans[conv], self.dilations[conv], self.rows.size(1)
        cols = [
            self.cols[conv][span - m].index_select(0, self.rows[:, width - m])  # (B, C_in)
            for m in range(span - first * d, 0, -d)
        ]
        return torch.cat([*cols, x_t], dim=1)  # (B, k * C_in)

    @staticmethod
    def advance(state: dict, new_cols: list[torch.Tensor]) -> dict:
        """The state one step later: each conv's oldest column out, its new input in."""
        rows = state["rows"]
        own = torch.arange(rows.size(0), device=rows.device)[:, None]  # (B, 1)
        cols = [c[1:] + [x] if c else c for c, x in zip(state["cols"], new_cols)]
        return {"pos": state["pos"] + 1, "rows": torch.cat([rows[:, 1:], own], 1), "cols": cols}

    @staticmethod
    def reorder(state: dict, index: torch.Tensor) -> dict:
        rows = state["rows"].index_select(0, index)  # (B', W)
        return {"pos": state["pos"].index_select(0, index), "rows": rows, "cols": state["cols"]}

    @staticmethod
    def compact(state: dict) -> dict:
        """Every column gathered to the batch's rows, the row table reset to each row's own."""
        rows = state["rows"]  # (B, W)
        batch, width = rows.shape
        cols = [
            [col.index_select(0, rows[:, width - len(c) + p]) for p, col in enumerate(c)]
            for c in state["cols"]
        ]
        own = torch.arange(batch, device=rows.device)[:, None].expand(-1, width)
        return {"pos": state["pos"], "rows": own.contiguous(), "cols": cols}


def _stack(in_dim, channels, kernel_size, levels, dropout, causal, options: dict):
    return nn.ModuleList(
        TemporalBlock(
            in_dim if level == 0 else channels,
            channels,
            kernel_size,
            2**level,
            dropout,
            causal,
            **options,
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
        emb_scale: bool,
        glu: bool,
        scaled_residual: bool,
        separable: bool,
        conv_init: str,
    ):
        super().__init__()
        self.out_dim = channels
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -init_scale, init_scale)
        self.embed_pos = _Embedding(emb_dim, init_scale, dropout, word_dropout, emb_scale)
        options = dict(
            glu=glu, scaled_residual=scaled_residual, separable=separable, conv_init=conv_init
        )
        self.blocks = _stack(emb_dim, channels, kernel_size, levels, dropout, False, options)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, vocab_size: int, pad_id: int) -> TCNEncoder:
        return cls(vocab_size, pad_id, **config_kwargs(cls, model_cfg))

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
        embedded = x * mask.transpose(1, 2)  # (B, S, E)
        return EncoderOut(memory=memory, src_mask=src_mask, src_lens=src_lens, embedded=embedded)


class TCNDecoder(nn.Module):
    """Target embedding + positions, a causal TCN stack with attention after the last
    `attention_blocks` blocks (0 = every block: ConvS2S multi-step attention), and the output
    projection. Owns all of these and the incremental-decoding state. Arguments are
    `ModelConfig`'s fields of the same names; `memory_dim` is the encoder's `out_dim`;
    `tie_embeddings` builds the output projection so that `tie_output` can share it with the
    embedding (a bottleneck channels -> emb_dim first where they differ).
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
        emb_scale: bool,
        glu: bool,
        scaled_residual: bool,
        separable: bool,
        conv_init: str,
        attention_blocks: int,
        attention_embeddings: bool,
    ):
        super().__init__()
        self.channels, self.scaled_residual = channels, scaled_residual
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=pad_id)
        nn.init.uniform_(self.embed.weight, -init_scale, init_scale)
        self.embed_pos = _Embedding(emb_dim, init_scale, dropout, word_dropout, emb_scale)
        options = dict(
            glu=glu, scaled_residual=scaled_residual, separable=separable, conv_init=conv_init
        )
        self.blocks = _stack(emb_dim, channels, kernel_size, levels, dropout, True, options)
        # queries[i] and contexts[i] belong to block first_attending + i
        attending = attention_blocks or levels
        self.first_attending = levels - attending
        self.key_proj = nn.Linear(memory_dim, channels)
        self.queries = nn.ModuleList(nn.Linear(channels, channels) for _ in range(attending))
        self.contexts = nn.ModuleList(nn.Linear(channels, channels) for _ in range(attending))
        # ConvS2S attention: the target embedding joins each query, the source embedding each
        # value, both projected to `channels` once per token
        self.query_embed = nn.Linear(emb_dim, channels) if attention_embeddings else None
        self.value_embed = nn.Linear(emb_dim, channels) if attention_embeddings else None
        if conv_init == "convs2s":
            for linear in (self.key_proj, *self.queries, *self.contexts):
                _init_normal_(linear, 1.0, 0.0)
        self.dropout = _Dropout(dropout)
        # Tying needs the output input width to be the embedding width: project down first.
        needs_bottleneck = tie_embeddings and channels != emb_dim
        self.bottleneck = nn.Linear(channels, emb_dim) if needs_bottleneck else None
        self.out = nn.Linear(emb_dim if needs_bottleneck else channels, vocab_size)
        # the decoding state's layout: conv 2l + j (j = 0, 1) of block l reads span_l columns
        self.spans = [block.span for block in self.blocks for _ in range(2)]
        self.dilations = [block.dilation for block in self.blocks for _ in range(2)]

    @classmethod
    def from_config(
        cls, model_cfg: ModelConfig, vocab_size: int, pad_id: int, memory_dim: int
    ) -> TCNDecoder:
        return cls(vocab_size, pad_id, memory_dim, **config_kwargs(cls, model_cfg))

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
        """Project the attention keys and each attention's values once per sentence, into
        `enc.per_sentence` (1 + A tensors (B, S, C)): the keys, then for attention i its values
        already through its context projection (contexts[i] is linear and the weights of a
        row sum to 1, so contexts[i](attn @ values) = attn @ contexts[i](values): one product
        per source position instead of one per target position and beam row at every step).
        The values add the source embeddings where the encoder gives them (a TCN encoder),
        else they are the keys. The embeddings are not needed after this."""
        keys = self.key_proj(enc.memory)  # (B, S, C)
        values = keys
        if self.value_embed is not None and enc.embedded is not None:
            values = (keys + self.value_embed(enc.embedded)) * HALF_SQRT  # (B, S, C)
        projected = [context(values) for context in self.contexts]  # A x (B, S, C)
        return replace(enc, per_sentence=(keys, *projected), sentence_rows=1, embedded=None)

    def attention_keys(self, enc: EncoderOut) -> torch.Tensor:
        """(B / g, S, C): the keys of every sentence (g = enc.sentence_rows)."""
        return enc.per_sentence[0]

    def attention_values(self, enc: EncoderOut, i: int) -> torch.Tensor:
        """(B / g, S, C): attention i's values, through its context projection."""
        return enc.per_sentence[1 + i]

    def _attend(self, i: int, h: torch.Tensor, enc: EncoderOut, query_embed):
        """Attention i: h (B, T, C), query_embed (B, T, C) or None -> (h joined with its context
        (B, T, C), attn (B, T, S)).

        Rows in runs of g copies of one sentence (`enc.sentence_rows`: a beam's hypotheses)
        are scored as one sentence's g*T queries against its keys: one (g*T, C) x (C, S)
        product per sentence where one row's queries would make g products of T rows each
        (at a decoding step T = 1: a matrix-vector product per hypothesis)."""
        batch, steps, _ = h.shape
        g = enc.sentence_rows
        query = self.queries[i](h)  # (B, T, C)
        scale = 1.0 / math.sqrt(self.channels)  # the scaled dot product, folded into the query
        if query_embed is not None:
            query = (query + query_embed) * (HALF_SQRT * scale)
        else:
            query = query * scale
        keys, values = self.attention_keys(enc), self.attention_values(enc, i)  # (B/g, S, C)
        query = query.reshape(batch // g, g * steps, -1)  # (B/g, g*T, C)
        scores = torch.bmm(query, keys.transpose(1, 2))  # (B/g, g*T, S)
        scores = scores.masked_fill(~enc.src_mask[::g].unsqueeze(1), float("-inf"))
        attn = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        context = torch.bmm(attn, values).view(batch, steps, -1)  # (B, T, C)
        attn = attn.view(batch, steps, -1)  # (B, T, S)
        if self.scaled_residual:
            return (h + context) * HALF_SQRT, attn
        return h + context, attn

    def _output(self, h: torch.Tensor, project=None) -> torch.Tensor:
        h = self.dropout(h)
        if self.bottleneck is not None:
            h = self.bottleneck(h)  # (..., E)
        return (project or self.out)(h)  # (..., V)

    def _teacher_forced(self, tgt_in_ids: torch.Tensor, enc: EncoderOut):
        """The last block's output (B, T, C) and each attention's weights [(B, T, S)]."""
        positions = torch.arange(tgt_in_ids.size(1), device=tgt_in_ids.device)  # (T,)
        x = self.embed_pos(self.embed, tgt_in_ids, positions)  # (B, T, E)
        query_embed = None if self.query_embed is None else self.query_embed(x)  # (B, T, C)
        h = x.transpose(1, 2)  # (B, E, T)
        attns = []
        for level, block in enumerate(self.blocks):
            h = block(h)  # (B, C, T)
            if level >= self.first_attending:
                i = level - self.first_attending
                h, attn = self._attend(i, h.transpose(1, 2), enc, query_embed)  # (B,T,C), (B,T,S)
                attns.append(attn)
                h = h.transpose(1, 2)  # (B, C, T)
        return h.transpose(1, 2), attns  # (B, T, C)

    def forward_with_attention(self, tgt_in_ids: torch.Tensor, enc: EncoderOut):
        """Teacher forcing: (logits (B, T, V), attn (B, T, S) averaged over the attentions)."""
        h, attns = self._teacher_forced(tgt_in_ids, enc)
        return self._output(h), sum(attns) / len(attns)  # (B, T, V), (B, T, S)

    def inspect_attention(self, tgt_in_ids: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        """Teacher forcing: the last attention's weights (B, T, S), the ones pictures and
        word alignments show (`step` returns the attentions' mean, which the coverage penalty
        reads: search results do not depend on this method)."""
        return self._teacher_forced(tgt_in_ids, enc)[1][-1]  # (B, T, S)

    def forward(self, tgt_in_ids: torch.Tensor, enc: EncoderOut) -> torch.Tensor:
        return self.forward_with_attention(tgt_in_ids, enc)[0]  # (B, T, V)

    def init_state(self, enc: EncoderOut) -> dict:
        """{"pos": (B,) next position, "rows": (B, W) row table, "cols": per conv its last
        span inputs (B, C_in), oldest first} (see `_History`); zeros stand for the padding."""
        batch, like = enc.memory.size(0), enc.memory
        cols = []
        for block in self.blocks:
            for width in (block.in_channels, block.out_channels):
                cols.append([like.new_zeros(batch, width)] * block.span)  # never written to
        width = max(self.spans, default=0)
        rows = torch.arange(batch, device=like.device)[:, None].expand(-1, width)  # (B, W)
        pos = torch.zeros(batch, dtype=torch.long, device=like.device)
        return {"pos": pos, "rows": rows.contiguous(), "cols": cols}

    def step(self, tgt_ids_t: torch.Tensor, state: dict, enc: EncoderOut, project=None):
        """One column: tgt_ids_t (B,) -> (logits (B, V), state, attn (B, S)); `project`: the
        output projection to use (None: `self.out`; a shortlist's rows, V of them)."""
        h = self.embed_pos(self.embed, tgt_ids_t, state["pos"])  # (B, E)
        query_embed = None if self.query_embed is None else self.query_embed(h).unsqueeze(1)
        history = _History(state, self.spans, self.dilations)
        # the furthest position of any row, read on a CPU only (a GPU would wait for it, and a
        # CUDA graph needs the same taps at every step)
        pos = int(state["pos"].max()) if state["pos"].device.type == "cpu" else None
        new_cols = []
        attn_sum = 0.0
        for level, block in enumerate(self.blocks):
            h, inputs = block.step(h, history, (2 * level, 2 * level + 1), pos)  # (B, C)
            new_cols.extend(inputs)
            if level >= self.first_attending:
                i = level - self.first_attending
                h, attn = self._attend(i, h.unsqueeze(1), enc, query_embed)  # (B, 1, C)
                attn_sum = attn_sum + attn.squeeze(1)  # (B, S)
                h = h.squeeze(1)  # (B, C)
        logits = self._output(h, project)  # (B, V)
        return logits, _History.advance(state, new_cols), attn_sum / len(self.queries)

    def reorder_state(self, state: dict, index: torch.Tensor) -> dict:
        return _History.reorder(state, index)

    def compact_state(self, state: dict) -> dict:
        return _History.compact(state)
