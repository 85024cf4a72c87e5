"""Attention of a decoder query over the encoder memory.

Owns: the score functions (normalized Bahdanau, Luong dot and general), the key projection done
once per sentence (`project_keys`), source masking and the float32 softmax. Does not own the
recurrent layers or any decoding state.

Both classes share one interface:

- `project_keys(memory (B, S, D)) -> keys (B, S, A)`, or `None` where the memory itself is the key
  (Luong dot with D == query size). Call it once per sentence (the decoder's `prepare`).
- `forward(query (B, T, Hq), keys, memory (B, S, D), src_mask (B, S)) -> (context (B, T, D),
  attn (B, T, S))`, for all T target positions at once (T = 1 in incremental decoding).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Bahdanau scores need tanh(q_t + k_s) for every (t, s): a (B, T, S, A) tensor that has no cheaper
# exact formulation. It is built in chunks over T of at most this many elements; in training the
# chunks are recomputed in backward when the whole tensor would exceed it, so memory stays bounded.
BAHDANAU_CHUNK_ELEMENTS = 32 * 2**20


def _chunk_len(b: int, t: int, s: int, a: int) -> int:
    return max(1, min(t, BAHDANAU_CHUNK_ELEMENTS // max(1, b * s * a)))


def _additive_scores_nograd(query: torch.Tensor, keys: torch.Tensor, v: torch.Tensor):
    """tanh(q_t + k_s) · v for every (t, s), chunked over T, without autograd."""
    b, t, a = query.shape
    chunk = _chunk_len(b, t, keys.size(1), a)
    parts = []
    for t0 in range(0, t, chunk):
        hidden = torch.add(query[:, t0 : t0 + chunk, None, :], keys[:, None, :, :])  # (B,t,S,A)
        parts.append(torch.matmul(hidden.tanh_(), v))  # (B, t, S)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, T, S)


class _AdditiveScores(torch.autograd.Function):
    """scores[b, t, s] = tanh(query[b, t] + keys[b, s]) · v with memory bounded by chunking.

    The tanh tensor is kept for backward when it fits in one chunk (the common case on a CPU
    batch) and recomputed chunk by chunk otherwise (large GPU batches). Backward does the same
    passes autograd would, fused through `aten.tanh_backward`.
    """

    @staticmethod
    def forward(ctx, query, keys, v):
        b, t, a = query.shape
        s = keys.size(1)
        chunk = _chunk_len(b, t, s, a)
        if chunk >= t:
            hidden = torch.add(query[:, :, None, :], keys[:, None, :, :]).tanh_()  # (B,T,S,A)
            ctx.save_for_backward(query, keys, v, hidden)
            ctx.chunk = t
            return torch.matmul(hidden, v)  # (B, T, S)
        ctx.save_for_backward(query, keys, v)
        ctx.chunk = chunk
        return _additive_scores_nograd(query, keys, v)  # (B, T, S)

    @staticmethod
    def backward(ctx, grad_scores):
        query, keys, v = ctx.saved_tensors[:3]
        saved_hidden = ctx.saved_tensors[3] if len(ctx.saved_tensors) == 4 else None
        t = query.size(1)
        a = query.size(2)
        grad_query = torch.empty_like(query)
        grad_keys = torch.zeros_like(keys)
        grad_v = torch.zeros_like(v)
        for t0 in range(0, t, ctx.chunk):
            t1 = min(t, t0 + ctx.chunk)
            if saved_hidden is not None:
                hidden = saved_hidden
            else:
                hidden = torch.add(query[:, t0:t1, None, :], keys[:, None, :, :]).tanh_()
            grad_s = grad_scores[:, t0:t1].contiguous()  # (B, t, S)
            grad_v += grad_s.reshape(1, -1).matmul(hidden.reshape(-1, a)).squeeze(0)  # (A,)
            grad_hidden = grad_s.unsqueeze(-1) * v  # (B, t, S, A)
            grad_pre = torch.ops.aten.tanh_backward(grad_hidden, hidden)  # (B, t, S, A)
            grad_query[:, t0:t1] = grad_pre.sum(dim=2)  # (B, t, A)
            grad_keys += grad_pre.sum(dim=1)  # (B, S, A)
        return grad_query, grad_keys, grad_v


def additive_scores(query: torch.Tensor, keys: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """tanh(query[:, t] + keys[:, s]) · v: query (B, T, A), keys (B, S, A), v (A,) -> (B, T, S)."""
    v = v.to(query.dtype)
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad or v.requires_grad):
        return _AdditiveScores.apply(query, keys, v)
    return _additive_scores_nograd(query, keys, v)


def masked_attention(scores, memory, src_mask):
    """Float32 softmax over real source positions, then the weighted sum of the memory."""
    scores = scores.float().masked_fill(~src_mask[:, None, :], float("-inf"))  # (B, T, S)
    attn = torch.softmax(scores, dim=-1)  # (B, T, S)
    context = torch.bmm(attn.to(memory.dtype), memory)  # (B, T, D)
    return context, attn


class BahdanauAttention(nn.Module):
    """Normalized additive attention, as NVIDIA GNMT v2's `BahdanauAttention(normalize=True)`.

    score(q, k) = g · v/|v| · tanh(W_q q + W_k k + b), with a scalar g (init 1/sqrt(A)) and a bias b
    (init 0); W_q, W_k and v are uniform(-init_scale, init_scale) like every other weight. The bias
    is folded into the keys at `project_keys`, so it costs nothing per decoding step.
    """

    def __init__(self, query_dim: int, memory_dim: int, attn_dim: int, init_scale: float):
        super().__init__()
        self.query_proj = nn.Linear(query_dim, attn_dim, bias=False)
        self.key_proj = nn.Linear(memory_dim, attn_dim, bias=False)
        self.v = nn.Parameter(torch.empty(attn_dim))
        self.scale = nn.Parameter(torch.empty(1))
        self.bias = nn.Parameter(torch.empty(attn_dim))
        self.reset_parameters(init_scale)

    def reset_parameters(self, init_scale: float) -> None:
        for weight in (self.query_proj.weight, self.key_proj.weight, self.v):
            nn.init.uniform_(weight, -init_scale, init_scale)
        nn.init.constant_(self.scale, 1.0 / math.sqrt(self.v.numel()))
        nn.init.zeros_(self.bias)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return self.key_proj(memory) + self.bias  # (B, S, A)

    def forward(self, query, keys, memory, src_mask):
        if keys is None:
            keys = self.project_keys(memory)  # (B, S, A)
        v = self.v * (self.scale / self.v.norm())  # (A,)
        scores = additive_scores(self.query_proj(query), keys, v)  # (B, T, S)
        return masked_attention(scores, memory, src_mask)


class LuongAttention(nn.Module):
    """Multiplicative attention (Luong et al. 2015 §3.1): `dot` q·m or `general` q·W m.

    `dot` needs the memory width to equal the query width; where they differ it gets the same
    projection as `general`. The projection W (no bias) is applied to the memory once per
    sentence at `project_keys`.
    """

    def __init__(self, query_dim: int, memory_dim: int, general: bool, init_scale: float):
        super().__init__()
        self.key_proj = None
        if general or memory_dim != query_dim:
            self.key_proj = nn.Linear(memory_dim, query_dim, bias=False)
            nn.init.uniform_(self.key_proj.weight, -init_scale, init_scale)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor | None:
        return None if self.key_proj is None else self.key_proj(memory)  # (B, S, H)

    def forward(self, query, keys, memory, src_mask):
        if keys is None:
            keys = memory if self.key_proj is None else self.key_proj(memory)  # (B, S, H)
        scores = torch.bmm(query, keys.transpose(1, 2))  # (B, T, S)
        return masked_attention(scores, memory, src_mask)


def build_attention(kind: str, query_dim: int, memory_dim: int, init_scale: float) -> nn.Module:
    """The attention named by `ModelConfig.attention`; its size is the query (decoder) width."""
    if kind == "bahdanau":
        return BahdanauAttention(query_dim, memory_dim, query_dim, init_scale)
    if kind in ("dot", "general"):
        return LuongAttention(query_dim, memory_dim, kind == "general", init_scale)
    raise ValueError(f"model.attention: expected bahdanau, dot or general, found {kind!r}")
