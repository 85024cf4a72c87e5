"""TCN family: causality, receptive field, incremental decoding, padding invariance, a task."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F

from nmt.config import ModelConfig
from nmt.errors import ConfigError
from nmt.models import build_model
from nmt.models.tcn import (
    TCNDecoder,
    TCNEncoder,
    check_receptive_field,
    receptive_field,
)

PAD, UNK, BOS, EOS = 0, 1, 2, 3
V = 20


def make_cfg(**overrides) -> ModelConfig:
    base = dict(arch="tcn", emb_dim=16, channels=24, kernel_size=3, levels=3, dropout=0.1)
    base.update(overrides)
    return ModelConfig(**base)


def make_pair(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = make_cfg(**overrides)
    encoder = TCNEncoder.from_config(cfg, V, PAD).eval()
    decoder = TCNDecoder.from_config(cfg, V, PAD, encoder.out_dim).eval()
    return encoder, decoder


def random_batch(gen: torch.Generator, lens: list[int], tgt_len: int):
    """Right-padded src (B, S) with lengths `lens`, and full-length tgt (B, T)."""
    src_ids = torch.full((len(lens), max(lens)), PAD, dtype=torch.long)
    for i, n in enumerate(lens):
        src_ids[i, :n] = torch.randint(4, V, (n,), generator=gen)
    tgt_ids = torch.randint(4, V, (len(lens), tgt_len), generator=gen)
    return src_ids, torch.tensor(lens), tgt_ids


def run_steps(decoder, tgt_ids, enc):
    state = decoder.init_state(enc)
    logits, attns = [], []
    for t in range(tgt_ids.size(1)):
        logits_t, state, attn = decoder.step(tgt_ids[:, t], state, enc)
        logits.append(logits_t)
        attns.append(attn)
    return torch.stack(logits, 1), torch.stack(attns, 1)  # (B, T, V), (B, T, S)


# ---- receptive field ----------------------------------------------------------------------


def test_receptive_field_formula():
    assert receptive_field(3, 4) == 61
    assert receptive_field(2, 1) == 3
    assert receptive_field(1, 5) == 1


@pytest.mark.parametrize("k,levels", [(1, 2), (2, 1), (2, 3), (3, 2), (4, 2)])
def test_receptive_field_measured(k, levels):
    """Perturb one input; the outputs that move span exactly the receptive field."""
    rf = receptive_field(k, levels)
    encoder, decoder = make_pair(kernel_size=k, levels=levels, dropout=0.0)
    gen = torch.Generator().manual_seed(1)
    n, p = 2 * rf + 4, rf // 2 + 2  # no moved output falls off either edge
    src_ids, src_lens, tgt_ids = random_batch(gen, [n], n)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        tgt_2 = tgt_ids.clone()
        tgt_2[0, p] = 4 + (tgt_ids[0, p] - 3) % (V - 4)
        moved = (decoder(tgt_ids, enc) != decoder(tgt_2, enc)).any(-1)[0]  # (T,)
        assert moved.nonzero().flatten().tolist() == list(range(p, p + rf))
        src_2 = src_ids.clone()
        src_2[0, p] = 4 + (src_ids[0, p] - 3) % (V - 4)
        moved = (encoder(src_ids, src_lens).memory != encoder(src_2, src_lens).memory).any(-1)[0]
        # Centered: every conv reads `left` inputs before and `right` after its output, so
        # input p moves the outputs from p - sum(right) to p + sum(left); rf of them in all.
        left = sum(2 * block.padding[0] for block in encoder.blocks)
        right = sum(2 * block.padding[1] for block in encoder.blocks)
        assert left + right + 1 == rf and left >= right
        assert moved.nonzero().flatten().tolist() == list(range(p - right, p + left + 1))


def test_check_receptive_field():
    def check(max_len, **overrides):
        return check_receptive_field(dataclasses.asdict(make_cfg(**overrides)), max_len)

    assert check(61, kernel_size=3, levels=4) is None
    problem = check(200, kernel_size=3, levels=4)
    assert "model.levels" in problem and "61" in problem and "levels >= 6" in problem
    assert "kernel_size >= 2" in check(10, kernel_size=1)
    assert check(500, arch="gnmt", kernel_size=1) is None
    assert "levels >= 4" in check(20, arch="gnmt", decoder="tcn", kernel_size=2, levels=2)


# ---- causality ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_decoder_is_causal_and_encoder_is_not(k):
    encoder, decoder = make_pair(kernel_size=k)
    gen = torch.Generator().manual_seed(2)
    src_ids, src_lens, tgt_ids = random_batch(gen, [9, 6], 8)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        logits = decoder(tgt_ids, enc)
        for t in range(7):
            perturbed = tgt_ids.clone()
            perturbed[:, t + 1] = 4 + (tgt_ids[:, t + 1] - 3) % (V - 4)
            moved = decoder(perturbed, enc)
            assert torch.equal(moved[:, : t + 1], logits[:, : t + 1])
            assert not torch.equal(moved[:, t + 1], logits[:, t + 1])
        if k > 1:
            memory = encoder(src_ids, src_lens).memory
            src_2 = src_ids.clone()
            src_2[0, 4] = 4 + (src_ids[0, 4] - 3) % (V - 4)
            assert not torch.equal(encoder(src_2, src_lens).memory[0, 3], memory[0, 3])


# ---- incremental decoding -----------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3])
def test_step_equals_forward(k):
    encoder, decoder = make_pair(kernel_size=k, levels=3)
    gen = torch.Generator().manual_seed(3)
    src_ids, src_lens, tgt_ids = random_batch(gen, [7, 3, 5], 12)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        logits, attn = decoder.forward_with_attention(tgt_ids, enc)
        step_logits, step_attn = run_steps(decoder, tgt_ids, enc)
        torch.testing.assert_close(step_logits, logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(step_attn, attn, atol=1e-5, rtol=0)
        torch.testing.assert_close(step_attn.sum(-1), torch.ones(3, 12))
        assert (step_attn[1, :, 3:] == 0).all()  # padded source positions get no attention
        for t in (1, 6, 12):
            # the uncached path (what benchmarks/decode_speed.py --recompute measures)
            slow_logits, _ = decoder.forward_with_attention(tgt_ids[:, :t], enc)
            torch.testing.assert_close(slow_logits[:, -1], step_logits[:, t - 1], atol=1e-5, rtol=0)


def test_reorder_state_permutation_and_repeat():
    encoder, decoder = make_pair()
    gen = torch.Generator().manual_seed(4)
    src_ids, src_lens, tgt_ids = random_batch(gen, [6, 4, 8], 10)
    index = torch.tensor([2, 0, 0, 1, 2])
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        state = decoder.init_state(enc)
        for t in range(4):
            _, state, _ = decoder.step(tgt_ids[:, t], state, enc)
        state = decoder.reorder_state(state, index)
        enc_r = enc.index_select(index)
        tgt_r = tgt_ids.index_select(0, index)
        logits = []
        for t in range(4, 10):
            logits_t, state, _ = decoder.step(tgt_r[:, t], state, enc_r)
            logits.append(logits_t)
        expected = decoder(tgt_r, enc_r)[:, 4:]  # (5, 6, V)
        torch.testing.assert_close(torch.stack(logits, 1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [2, 3])
def test_padding_invariance(k):
    """A sentence's memory and logits are the same alone and among longer batch-mates."""
    encoder, decoder = make_pair(kernel_size=k)
    gen = torch.Generator().manual_seed(5)
    src_ids, src_lens, tgt_ids = random_batch(gen, [4, 11, 7], 6)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        assert (enc.memory[0, 4:] == 0).all()
        logits = decoder(tgt_ids, enc)
        step_logits, _ = run_steps(decoder, tgt_ids, enc)
        for i, n in enumerate(src_lens.tolist()):
            alone = decoder.prepare(encoder(src_ids[i : i + 1, :n], src_lens[i : i + 1]))
            torch.testing.assert_close(enc.memory[i, :n], alone.memory[0], atol=1e-5, rtol=0)
            alone_logits = decoder(tgt_ids[i : i + 1], alone)
            torch.testing.assert_close(logits[i], alone_logits[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(step_logits[i], alone_logits[0], atol=1e-5, rtol=0)


# ---- parameters ---------------------------------------------------------------------------


def test_weight_norm_state_dict_round_trip():
    encoder, decoder = make_pair(seed=6)
    keys = list(decoder.state_dict())
    assert "blocks.0.conv1.parametrizations.weight.original0" in keys  # g
    assert "blocks.0.conv1.parametrizations.weight.original1" in keys  # v
    buffer = io.BytesIO()
    torch.save({"enc": encoder.state_dict(), "dec": decoder.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    encoder_2, decoder_2 = make_pair(seed=7)
    encoder_2.load_state_dict(saved["enc"])
    decoder_2.load_state_dict(saved["dec"])
    gen = torch.Generator().manual_seed(6)
    src_ids, src_lens, tgt_ids = random_batch(gen, [5, 3], 4)
    with torch.no_grad():
        a = decoder(tgt_ids, decoder.prepare(encoder(src_ids, src_lens)))
        b = decoder_2(tgt_ids, decoder_2.prepare(encoder_2(src_ids, src_lens)))
    assert torch.equal(a, b)


def test_tie_output():
    cfg = make_cfg(emb_dim=16, channels=24, tie_embeddings=True)
    decoder = TCNDecoder.from_config(cfg, V, PAD, memory_dim=10)
    decoder.tie_output()
    assert decoder.out.weight is decoder.embed.weight
    assert decoder.bottleneck is not None  # channels 24 -> emb 16 before the tied projection
    cfg = make_cfg(emb_dim=24, channels=24, tie_embeddings=True)
    same = TCNDecoder.from_config(cfg, V, PAD, memory_dim=10)
    same.tie_output()
    assert same.bottleneck is None and same.out.weight is same.embed.weight
    untied = TCNDecoder.from_config(make_cfg(emb_dim=16, channels=24), V, PAD, memory_dim=10)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        untied.tie_output()


# ---- mixed families -----------------------------------------------------------------------


@pytest.mark.parametrize("encoder_family,decoder_family", [("gnmt", "tcn"), ("tcn", "gnmt")])
def test_mixed_families(encoder_family, decoder_family):
    torch.manual_seed(8)
    cfg = make_cfg(
        arch="gnmt", encoder=encoder_family, decoder=decoder_family, hidden=24, bi_hidden=12
    )
    model = build_model(cfg, V, V, PAD, joint_vocab=True).eval()
    gen = torch.Generator().manual_seed(8)
    src_ids, src_lens, tgt_ids = random_batch(gen, [6, 3], 5)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(src_ids, src_lens, tgt_ids), dim=-1)  # (B, T, V)
        enc = model.encode(src_ids, src_lens)
        state = model.init_state(enc)
        for t in range(5):
            step_log_probs, state, attn = model.step(tgt_ids[:, t], state, enc)
            torch.testing.assert_close(step_log_probs, log_probs[:, t], atol=1e-5, rtol=0)
            assert attn.shape == (2, 6)


# ---- a task -------------------------------------------------------------------------------


def reverse_batch(gen: torch.Generator, batch: int):
    """Random sequences of length 3..10 over ids 4..V-1; the target is the reversal + EOS."""
    src_lens = torch.randint(3, 11, (batch,), generator=gen)
    S = int(src_lens.max())
    src_ids = torch.full((batch, S), PAD, dtype=torch.long)
    tgt_in_ids = torch.full((batch, S + 1), PAD, dtype=torch.long)
    tgt_out_ids = torch.full((batch, S + 1), PAD, dtype=torch.long)
    for i, n in enumerate(src_lens.tolist()):
        seq = torch.randint(4, V, (n,), generator=gen)
        src_ids[i, :n] = seq
        tgt_in_ids[i, 0] = BOS
        tgt_in_ids[i, 1 : n + 1] = seq.flip(0)
        tgt_out_ids[i, :n] = seq.flip(0)
        tgt_out_ids[i, n] = EOS
    return src_ids, src_lens, tgt_in_ids, tgt_out_ids


def test_tiny_tcn_learns_reverse():
    """A real end-to-end check: train with teacher forcing, decode greedily with `step`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder, decoder = make_pair(seed=0, emb_dim=32, channels=32, levels=3, dropout=0.0)
        encoder.train()
        decoder.train()
        params = list(encoder.parameters()) + list(decoder.parameters())
        steps = 300
        optimizer = torch.optim.Adam(params, lr=5e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
        gen = torch.Generator().manual_seed(0)
        for _ in range(steps):
            src_ids, src_lens, tgt_in_ids, tgt_out_ids = reverse_batch(gen, 64)
            logits = decoder(tgt_in_ids, decoder.prepare(encoder(src_ids, src_lens)))
            loss = F.cross_entropy(logits.reshape(-1, V), tgt_out_ids.flatten(), ignore_index=PAD)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
        encoder.eval()
        decoder.eval()
        src_ids, src_lens, _, tgt_out_ids = reverse_batch(torch.Generator().manual_seed(99), 200)
        with torch.no_grad():
            enc = decoder.prepare(encoder(src_ids, src_lens))
            state = decoder.init_state(enc)
            token = torch.full((200,), BOS)
            hyp = []
            for _ in range(tgt_out_ids.size(1)):
                logits, state, _ = decoder.step(token, state, enc)
                token = logits.argmax(-1)  # (B,)
                hyp.append(token)
            hyp_ids = torch.stack(hyp, 1)  # (B, T)
        real = tgt_out_ids != PAD
        exact = ((hyp_ids == tgt_out_ids) | ~real).all(1).float().mean().item()
        assert exact >= 0.95, f"exact match {exact:.3f}"
    finally:
        torch.set_num_threads(threads)
