"""Model FLOPs counted analytically, and the matrix-product peak of the device they run on.

A weight matrix of shape (m, n) applied to one token costs 2·m·n FLOPs (a multiply and an add
per weight). Forward FLOPs of a batch:

    F = 2 · (W_src · N_src + W_tgt · N_tgt) + 2 · L · (A + C) · Σ_i S_i · T_i

- N_src, N_tgt: real (unpadded) source and target tokens of the batch; S_i, T_i: sentence i's;
- W_src: weights applied once per source token: every encoder matrix (both directions' LSTM
  input and recurrent matrices, TCN convolutions k·C_in·C_out and 1×1 residual convolutions,
  linear layers), the attention key projection and the TCN's context projections (run over
  its values, `TCNDecoder.prepare`);
- W_tgt: weights applied once per target token: the decoder's LSTM matrices or convolutions,
  attention query projections (and GNMT's context side), the output projection (tied or not,
  it is a product);
- the last term is attention: a score (width A) and a context (width C) for every pair of a
  target and a real source position, L times (GNMT: once; TCN: after each of its L blocks).

TCN convolution taps that read padding only are not computed (`TemporalBlock.reaching_taps`)
and not counted: a sentence of length n skips, in each conv of a block, the taps that block
leaves out for length n, k·C_in·C_out / k weights per tap and position (`_skipped`).

Decoding (search) runs the encoder once per sentence and the decoder once per live hypothesis
row and step, so the same formula holds with N_tgt = R, the row-steps (the sum over steps of
the rows the decoder ran), and Σ S_i·T_i = P, the sum over those row-steps of the row's real
source length (`decode_flops`); a TCN step at position t leaves out the taps before position 0,
so `decode_flops` takes the rows run at each position. Search's own work (top-k, sorting) is
left out like softmax.

Left out: biases, activations, gates' elementwise work, softmax, normalisation, dropout and
embedding lookups (together a few percent of F at these sizes). Padding is not counted: what
padding costs shows as lower utilisation. A training step costs 3·F (the backward pass is about
twice the forward). MFU = 3·F / step time / peak, the peak being the median FLOP/s of a large
matrix product measured in the same process, on the same device, at the same precision.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from nmt.models.attention import BahdanauAttention

RECURRENT = (nn.LSTM, nn.GRU, nn.RNN)


def _matrix_weights(module: nn.Module) -> int:
    """Weights of `module` itself (not its children) that act as a matrix on each token."""
    if isinstance(module, (nn.Linear, nn.Conv1d)):
        return module.weight.numel()  # Conv1d: C_out · C_in · k, weight norm included
    if isinstance(module, RECURRENT):
        return sum(p.numel() for n, p in module.named_parameters() if n.startswith("weight_"))
    return 0


def weights_per_token(model: nn.Module) -> tuple[int, int]:
    """(W_src, W_tgt) of an nmt Seq2Seq model."""
    per_src = per_tgt = 0
    for name, module in model.named_modules():
        n = _matrix_weights(module)
        if name.endswith("bridge"):
            continue  # once per sentence, not per token
        if name.startswith("encoder.") or name.endswith("key_proj") or _is_tcn_context(name):
            per_src += n  # the decoder's key (and TCN context) projections run over the source
        elif name.startswith("decoder."):
            per_tgt += n
    return per_src, per_tgt


def _is_tcn_context(name: str) -> bool:
    return name.startswith("decoder.contexts.")


def _skipped(stack, length: int) -> int:
    """Weights a TCN stack does not apply per position of a sequence of `length`: the taps
    outside `reaching_taps` (a causal stack at decoding position t: `length` t + 1)."""
    total = 0
    for block in stack:
        first, last = block.reaching_taps(length)
        for conv in (block.conv1, block.conv2):
            if isinstance(conv, nn.Conv1d):  # dense convs (separable ones: counted in full)
                total += (
                    conv.weight.numel() // block.kernel_size * (block.kernel_size - last + first)
                )
    return total


def _skipped_products(model: nn.Module, src_lens, tgt_positions) -> int:
    """Weights left out by the TCN stacks of `model`: its encoder over sentences of `src_lens`,
    its decoder over `tgt_positions`, pairs (length, positions run at that length)."""
    total = 0
    enc_blocks, dec_blocks = (
        getattr(model.encoder, "blocks", None),
        getattr(model.decoder, "blocks", None),
    )
    if enc_blocks is not None:
        total += sum(_skipped(enc_blocks, n) * n for n in src_lens)
    if dec_blocks is not None:
        total += sum(_skipped(dec_blocks, n) * count for n, count in tgt_positions)
    return total


def attention_widths(model: nn.Module) -> tuple[int, int, int]:
    """(L, A, C): attention applications per target token, score width, context width."""
    dec = model.decoder
    if hasattr(dec, "queries"):  # TCN: attention after every block, over the projected keys
        return len(dec.queries), dec.channels, dec.channels
    score = (
        dec.attention.key_proj.out_features
        if isinstance(dec.attention, BahdanauAttention)
        else dec.hidden
    )
    return 1, score, dec.memory_dim


def forward_flops(model: nn.Module, src_lens, tgt_lens) -> float:
    """F for a batch with these real lengths (sequences of ints or 1-D tensors)."""
    w_src, w_tgt = weights_per_token(model)
    levels, score, context = attention_widths(model)
    src = [int(n) for n in src_lens]
    tgt = [int(n) for n in tgt_lens]
    pairs = sum(s * t for s, t in zip(src, tgt))
    skipped = _skipped_products(model, src, [(n, n) for n in tgt])  # n positions of length n
    products = w_src * sum(src) + w_tgt * sum(tgt) - skipped
    return 2.0 * products + 2.0 * levels * (score + context) * pairs


def decode_flops(
    model: nn.Module,
    src_tokens: int,
    row_steps: int,
    row_src_pairs: int,
    rows_at: dict | None = None,
    src_lens=(),
) -> float:
    """F of a search: the encoder over `src_tokens` real source tokens (sentences of `src_lens`),
    the decoder over `row_steps` hypothesis rows, attending over `row_src_pairs` (row, real
    source position); `rows_at` {position: rows run there} for a TCN decoder's skipped taps."""
    w_src, w_tgt = weights_per_token(model)
    levels, score, context = attention_widths(model)
    positions = [(t + 1, rows) for t, rows in (rows_at or {}).items()]  # step t reads t + 1
    skipped = _skipped_products(model, [int(n) for n in src_lens], positions)
    return (
        2.0 * (w_src * src_tokens + w_tgt * row_steps - skipped)
        + 2.0 * levels * (score + context) * row_src_pairs
    )


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int = 2048, repeats: int = 7) -> float:
    """Median FLOP/s of an n×n by n×n product (2·n³ FLOPs) after one warm-up."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)
