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

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from nmt.errors import ConfigError

# Bahdanau scores need tanh(q_t + k_s) for every (t, s): a (B, T, S, A) tensor that has no cheaper
# exact formulation. It is never materialised whole: it is built in chunks over T of at most this
# many elements (cache-sized on a CPU, where fresh large buffers cost page faults; larger on a GPU
# to keep kernels big), reduced to scores at once, and recomputed chunk by chunk in backward.
CHUNK_ELEMENTS_CPU = 2**20
CHUNK_ELEMENTS_GPU = 32 * 2**20


def _chunk_len(query: torch.Tensor, keys: torch.Tensor) -> int:
    b, t, a = query.shape
    budget = CHUNK_ELEMENTS_CPU if query.device.type == "cpu" else CHUNK_ELEMENTS_GPU
    return max(1, min(t, budget // max(1, b * keys.size(1) * a)))


def _chunk_view(buffer: torch.Tensor, t: int) -> torch.Tensor:
    """The contiguous (B, t, S, A) prefix of a (B, chunk, S, A) buffer."""
    b, _, s, a = buffer.shape
    return buffer.view(-1)[: b * t * s * a].view(b, t, s, a)


def _sigmoid_chunk(query, keys, t0: int, t1: int, buffer) -> torch.Tensor:
    hidden = _chunk_view(buffer, t1 - t0)  # (B, t, S, A)
    torch.add(query[:, t0:t1, None, :], keys[:, None, :, :], out=hidden)
    return hidden.sigmoid_()


def _sigmoid_scores(query, keys, w, chunk: int) -> torch.Tensor:
    b, t, a = query.shape
    s = keys.size(1)
    scores = query.new_empty(b, t, s)  # (B, T, S)
    buffer = query.new_empty(b, chunk, s, a)  # (B, chunk, S, A)
    for t0 in range(0, t, chunk):
        t1 = min(t, t0 + chunk)
        hidden = _sigmoid_chunk(query, keys, t0, t1, buffer)  # (B, t, S, A)
        scores[:, t0:t1] = torch.mv(hidden.view(-1, a), w).view(b, t1 - t0, s)
    return scores


class _SigmoidScores(torch.autograd.Function):
    """scores[b, t, s] = sigmoid(query[b, t] + keys[b, s]) · w, chunked over T.

    Saves only its inputs; backward recomputes each chunk (an add and a sigmoid, cheap next to
    the reductions) so memory stays at one chunk whatever the batch.
    """

    @staticmethod
    def forward(ctx, query, keys, w):
        ctx.chunk = _chunk_len(query, keys)
        ctx.save_for_backward(query, keys, w)
        return _sigmoid_scores(query, keys, w, ctx.chunk)  # (B, T, S)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_scores):
        query, keys, w = ctx.saved_tensors
        b, t, a = query.shape
        s = keys.size(1)
        grad_query = torch.empty_like(query)
        grad_keys = torch.zeros_like(keys)
        grad_w = torch.zeros_like(w)
        buffer = query.new_empty(b, ctx.chunk, s, a)  # (B, chunk, S, A)
        grad_buffer = torch.empty_like(buffer)
        for t0 in range(0, t, ctx.chunk):
            t1 = min(t, t0 + ctx.chunk)
            hidden = _sigmoid_chunk(query, keys, t0, t1, buffer)  # (B, t, S, A)
            grad_s = grad_scores[:, t0:t1]  # (B, t, S)
            grad_w.addmv_(hidden.view(-1, a).t(), grad_s.reshape(-1))  # (A,)
            grad_pre = _chunk_view(grad_buffer, t1 - t0)  # (B, t, S, A)
            torch.mul(grad_s.unsqueeze(-1), w, out=grad_pre)
            torch.ops.aten.sigmoid_backward.grad_input(grad_pre, hidden, grad_input=grad_pre)
            grad_query[:, t0:t1] = grad_pre.sum(dim=2)  # (B, t, A)
            # a sum over a length-1 dim would cost a zero-fill and a copy
            grad_keys += grad_pre[:, 0] if t1 - t0 == 1 else grad_pre.sum(dim=1)  # (B, S, A)
        return grad_query, grad_keys, grad_w


def sigmoid_scores(query: torch.Tensor, keys: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """sigmoid(query[:, t] + keys[:, s]) · w: query (B, T, A), keys (B, S, A), w (A,) -> (B,T,S)."""
    keys = keys.to(query.dtype)
    w = w.to(query.dtype)
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad or w.requires_grad):
        return _SigmoidScores.apply(query, keys, w)  # (B, T, S)
    return _sigmoid_scores(query, keys, w, _chunk_len(query, keys))  # (B, T, S)


def masked_attention(scores, memory, src_mask):
    """Float32 softmax over real source positions, then the weighted sum of the memory."""
    scores = scores.float().masked_fill(~src_mask[:, None, :], float("-inf"))  # (B, T, S)
    attn = torch.softmax(scores, dim=-1)  # (B, T, S)
    context = torch.bmm(attn.to(memory.dtype), memory)  # (B, T, D)
    return context, attn


class BahdanauAttention(nn.Module):
    """Normalized additive attention, as NVIDIA GNMT v2's `BahdanauAttention(normalize=True)`.

    score(q, k) = g · v/|v| · tanh(W_q q + W_k k + b), with a scalar g and a bias b (init 0);
    W_q, W_k and v are uniform(-init_scale, init_scale) like every other weight. g starts at 1,
    not NVIDIA's 1/sqrt(A): |score| <= g·sqrt(A), so at 1/sqrt(A) attention cannot be sharper than
    e^2 between positions until Adam has grown g (~lr per step), which on Multi30k (160 steps an
    epoch) cost validation perplexity 71.5 vs 61.9 after 330 steps.

    Computed as sigmoid(2 W_q q + 2(W_k k + b)) · 2u - sum(u), u = g v/|v|, since
    tanh(x) = 2 sigmoid(2x) - 1: the same function, but sigmoid and its backward are several
    times cheaper than tanh's on a CPU. `project_keys` returns 2(W_k m + b), so the bias and the
    doubling cost nothing per decoding step.
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
        nn.init.constant_(self.scale, 1.0)
        nn.init.zeros_(self.bias)

    def project_keys(self, memory: torch.Tensor) -> torch.Tensor:
        return 2 * (self.key_proj(memory) + self.bias)  # (B, S, A)

    def forward(self, query, keys, memory, src_mask):
        if keys is None:
            keys = self.project_keys(memory)  # (B, S, A)
        u = self.v * (self.scale / self.v.norm())  # (A,)
        scores = sigmoid_scores(2 * self.query_proj(query), keys, 2 * u) - u.sum()  # (B, T, S)
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
    raise ConfigError([f"model.attention: expected bahdanau, dot or general, found {kind!r}"])
