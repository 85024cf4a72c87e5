"""Tiny models, batches and decoding loops shared by the model tests (test_models, test_gnmt,
test_tcn, test_benchmarks, test_gpu).

Ids follow the toolkit's tokenizer: pad 0, unk 1, bos 2, eos 3; real tokens are 4..vocab-1.
"""

from __future__ import annotations

import torch

from nmt.config import ModelConfig
from nmt.models import build_model

PAD, UNK, BOS, EOS = 0, 1, 2, 3
VOCAB = 23  # tiny_model's joint vocabulary


def tiny_model(family: str, seed: int = 0, **overrides):
    """A small model in eval mode (dropout > 0, so that eval really switches it off)."""
    sizes = dict(
        emb_dim=16,
        hidden=16,
        bi_hidden=8,
        enc_layers=3,
        dec_layers=3,
        residual_start=2,
        dropout=0.3,
        channels=16,
        levels=2,
        kernel_size=3,
    )
    sizes.update(overrides)
    torch.manual_seed(seed)
    model_cfg = ModelConfig(arch=family, **sizes)
    return build_model(model_cfg, VOCAB, VOCAB, PAD, joint_vocab=True).eval()


def random_batch(src_lens, tgt_lens, vocab: int, seed: int = 1):
    """Right-padded src (B, S) ending with EOS and tgt_in (B, T) starting with BOS, of the given
    lengths, with random real tokens; returns (src_ids, src_lens (B,), tgt_in_ids)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(src_lens)
    src_ids = torch.full((b, max(src_lens)), PAD)
    tgt_in_ids = torch.full((b, max(tgt_lens)), PAD)
    for i, (s, t) in enumerate(zip(src_lens, tgt_lens)):
        src_ids[i, :s] = torch.randint(4, vocab, (s,), generator=gen)
        src_ids[i, s - 1] = EOS
        tgt_in_ids[i, :t] = torch.randint(4, vocab, (t,), generator=gen)
        tgt_in_ids[i, 0] = BOS
    return src_ids, torch.tensor(src_lens), tgt_in_ids


def run_steps(model, src_ids, src_lens, tgt_in_ids):
    """Log-probs (B, T, V) and attention (B, T, S) from `step`, one target position at a time."""
    enc = model.encode(src_ids, src_lens)
    state = model.init_state(enc)
    log_probs, attns = [], []
    for t in range(tgt_in_ids.size(1)):
        lp, state, attn = model.step(tgt_in_ids[:, t], state, enc)
        log_probs.append(lp)
        attns.append(attn)
    return torch.stack(log_probs, 1), torch.stack(attns, 1)


def reverse_batch(gen: torch.Generator, size: int, vocab: int):
    """Random sequences of 3-10 symbols: src = seq + eos, tgt = reversed seq + eos.

    Returns src_ids (B, S), src_lens (B,), tgt_in_ids (B, T) (bos first), tgt_out_ids (B, T).
    """
    lens = torch.randint(3, 11, (size,), generator=gen)
    width = int(lens.max()) + 1
    src_ids = torch.full((size, width), PAD)
    tgt_in_ids = torch.full((size, width), PAD)
    tgt_out_ids = torch.full((size, width), PAD)
    for i, n in enumerate(lens.tolist()):
        seq = torch.randint(4, vocab, (n,), generator=gen)
        src_ids[i, :n], src_ids[i, n] = seq, EOS
        tgt_in_ids[i, 0], tgt_in_ids[i, 1 : n + 1] = BOS, seq.flip(0)
        tgt_out_ids[i, :n], tgt_out_ids[i, n] = seq.flip(0), EOS
    return src_ids, lens + 1, tgt_in_ids, tgt_out_ids


@torch.no_grad()
def greedy(model, src_ids, src_lens, max_len: int) -> list[list[int]]:
    """Greedy decoding through the model's own `step`; each output cut before its first EOS."""
    enc = model.encode(src_ids, src_lens)
    state = model.init_state(enc)
    tokens = torch.full((src_ids.size(0),), BOS)
    out = []
    finished = torch.zeros(src_ids.size(0), dtype=torch.bool)
    for _ in range(max_len):
        log_probs, state, _ = model.step(tokens, state, enc)
        tokens = log_probs.argmax(-1)  # (B,)
        out.append(tokens)
        finished |= tokens == EOS
        if finished.all():
            break
    hyps = torch.stack(out, 1).tolist()
    return [h[: h.index(EOS)] if EOS in h else h for h in hyps]


def exact_match(model, vocab: int, size: int = 200, seed: int = 123) -> float:
    """Share of `size` fresh reverse_batch sentences that greedy decoding reverses exactly."""
    src_ids, src_lens, _, tgt_out_ids = reverse_batch(
        torch.Generator().manual_seed(seed), size, vocab
    )
    hyps = greedy(model.eval(), src_ids, src_lens, max_len=int(src_lens.max()) + 2)
    refs = [t[: t.index(EOS)] for t in tgt_out_ids.tolist()]
    return sum(h == r for h, r in zip(hyps, refs)) / len(refs)
