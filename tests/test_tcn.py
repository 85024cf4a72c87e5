"""TCN-specific checks: the receptive field (formula, measured, config check), causality, the
cache against recomputation, weight norm in the state dict, tying, and a tiny model that must
learn to reverse sequences. The Seq2Seq contract (step == forward, padding invariance, reorder,
mixed GNMT/TCN pairs) is tested for every family in test_models.py."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn.functional as F
from helpers_models import PAD, exact_match, random_batch, reverse_batch

from nmt.config import ModelConfig
from nmt.errors import ConfigError
from nmt.models import build_model
from nmt.models.tcn import (
    TCNDecoder,
    TCNEncoder,
    TemporalBlock,
    _DilatedDepthwise,
    _Dropout,
    _History,
    check_receptive_field,
    keep_mask,
    receptive_field,
    rounded_p,
)

V = 20


# The block and decoder options, each through the causality and cache tests (the contract tests
# in test_models.py run them too).
OPTIONS = {
    "bai": {},
    "convs2s": {"glu": True, "scaled_residual": True, "conv_init": "convs2s"},
    "separable": {"separable": True, "glu": True, "conv_init": "convs2s"},
    "last-attention": {"attention_blocks": 1, "emb_scale": True, "scaled_residual": True},
    "attention-embeddings": {"attention_embeddings": True, "attention_blocks": 2},
}


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


# ---- receptive field ----------------------------------------------------------------------


def test_receptive_field_formula():
    assert receptive_field(3, 4) == 61
    assert receptive_field(2, 1) == 3
    assert receptive_field(1, 5) == 1


@pytest.mark.parametrize("k,levels,options", [
    (1, 2, "bai"), (2, 1, "bai"), (2, 3, "bai"), (3, 2, "bai"), (4, 2, "bai"),
    (3, 2, "separable"), (2, 3, "convs2s"),
])  # fmt: skip
def test_receptive_field_measured(k, levels, options):
    """Perturb one input; the outputs that move span exactly the receptive field."""
    rf = receptive_field(k, levels)
    encoder, decoder = make_pair(kernel_size=k, levels=levels, dropout=0.0, **OPTIONS[options])
    n, p = 2 * rf + 4, rf // 2 + 2  # no moved output falls off either edge
    src_ids, src_lens, tgt_ids = random_batch([n], [n], V)
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


# ---- the block options ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "glu, scaled_residual, separable",
    [(False, False, False), (True, True, False), (True, False, True), (False, True, True)],
)
def test_block_computes_what_its_options_say(glu, scaled_residual, separable):
    """The block against its definition written out with plain convolutions: activation (ReLU,
    or GLU = first half * sigmoid(second half)) after each conv, then ReLU(x + f(x)) or
    (x + f(x)) * sqrt(0.5); a separable conv is a grouped (depthwise) conv then a 1x1 conv."""
    torch.manual_seed(0)
    block = TemporalBlock(
        8, 8, 3, 2, 0.0, True, glu=glu, scaled_residual=scaled_residual, separable=separable,
        conv_init="convs2s",
    ).eval()  # fmt: skip
    x = torch.randn(3, 8, 10)  # (B, C, T)

    def conv(module, h):
        h = F.pad(h, (4, 0))  # causal: (k - 1) * d on the left
        if separable:
            depthwise, pointwise = module.depthwise, module.pointwise
            h = F.conv1d(h, depthwise.weight, depthwise.bias, dilation=2, groups=8)
            return F.conv1d(h, pointwise.weight, pointwise.bias)
        return F.conv1d(h, module.weight, module.bias, dilation=2)

    def activate(h):
        if glu:
            a, b = h.chunk(2, dim=1)
            return a * torch.sigmoid(b)
        return torch.relu(h)

    with torch.no_grad():
        h = activate(conv(block.conv2, activate(conv(block.conv1, x))))
        expected = (x + h) * 0.5**0.5 if scaled_residual else torch.relu(x + h)
        torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize("separable", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("k", [2, 3])
def test_taps_that_read_only_padding_are_left_out_exactly(k, causal, separable):
    """Dilation 8, k = 3: a causal conv's oldest tap reads 16 back, a centered one's side taps 8
    either way (k = 2, centered: 4 back and 4 ahead). Over sequences shorter than that those
    taps read padding only; the block leaves them out and must give what the full convolutions
    give (values and gradients)."""
    torch.manual_seed(0)
    block = TemporalBlock(
        6, 6, k, 8, 0.0, causal, glu=False, scaled_residual=False, separable=separable,
        conv_init="bai",
    ).eval()  # fmt: skip
    if (k, causal) == (3, True):
        assert [block.reaching_taps(n) for n in (5, 9, 16, 17)] == [(2, 3), (1, 3), (1, 3), (0, 3)]
    elif (k, causal) == (3, False):
        assert [block.reaching_taps(n) for n in (5, 8, 9)] == [(1, 2), (1, 2), (0, 3)]
    elif (k, causal) == (2, False):  # one tap is left, the one 4 ahead: padding alone
        assert [block.reaching_taps(n) for n in (3, 4, 5)] == [(1, 2), (1, 2), (0, 2)]

    def full(conv, h):
        h = F.pad(h, block.padding)
        if separable:
            depthwise, pointwise = conv.depthwise, conv.pointwise
            h = F.conv1d(h, depthwise.weight, depthwise.bias, dilation=8, groups=6)
            return F.conv1d(h, pointwise.weight, pointwise.bias)
        return F.conv1d(h, conv.weight, conv.bias, dilation=8)

    for length in (3, 5, 12):
        x = torch.randn(2, 6, length, requires_grad=True)
        y = block(x)
        expected = torch.relu(x + torch.relu(full(block.conv2, torch.relu(full(block.conv1, x)))))
        torch.testing.assert_close(y, expected)
        grad = torch.autograd.grad(y.square().sum(), x)[0]
        torch.testing.assert_close(grad, torch.autograd.grad(expected.square().sum(), x)[0])


@pytest.mark.parametrize("k,dilation", [(1, 1), (2, 3), (3, 2)])
def test_dilated_depthwise_gradients(k, dilation):
    """The separable conv's own depthwise function: its values equal a grouped conv1d, and its
    hand-written backward passes gradcheck (float64)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5 + (k - 1) * dilation, dtype=torch.float64, generator=gen)
    w = torch.randn(3, k, dtype=torch.float64, generator=gen)
    expected = F.conv1d(x, w[:, None], dilation=dilation, groups=3)
    torch.testing.assert_close(_DilatedDepthwise.apply(x, w, dilation), expected)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: _DilatedDepthwise.apply(x, w, dilation), (x, w))


@pytest.mark.parametrize("scaled_residual", [False, True])
def test_attention_joins_its_context_as_the_residual_option_says(scaled_residual):
    """h + context (Bai et al. add it plainly), or (h + context) * sqrt(0.5) (ConvS2S); the
    context projected after the weighted sum, as written here (`prepare` projects the values
    before it, which must come to the same)."""
    encoder, decoder = make_pair(scaled_residual=scaled_residual)
    src_ids, src_lens, _ = random_batch([5, 3], [1, 1], V, seed=2)
    h = torch.randn(2, 4, 24)  # (B, T, C)
    with torch.no_grad():
        raw = encoder(src_ids, src_lens)
        enc = decoder.prepare(raw)
        keys = decoder.key_proj(raw.memory)  # (B, S, C)
        scores = decoder.queries[1](h) @ keys.transpose(1, 2) / 24**0.5  # (B, T, S)
        scores = scores.masked_fill(~enc.src_mask[:, None, :], float("-inf"))
        context = decoder.contexts[1](scores.softmax(-1) @ keys)  # (B, T, C)
        expected = (h + context) * 0.5**0.5 if scaled_residual else h + context
        torch.testing.assert_close(decoder._attend(1, h, enc, None)[0], expected)


def test_convs2s_attention_adds_the_embeddings():
    """Values (keys + W_v source embedding) * sqrt(0.5), queries (W_q h + W_e target embedding)
    * sqrt(0.5) (Gehring et al. 2017, Sec. 3.3)."""
    encoder, decoder = make_pair(attention_embeddings=True)
    src_ids, src_lens, _ = random_batch([5, 3], [1, 1], V, seed=2)
    h, tgt_embedded = torch.randn(2, 4, 24), torch.randn(2, 4, 16)  # (B, T, C), (B, T, E)
    with torch.no_grad():
        raw = encoder(src_ids, src_lens)
        assert raw.embedded.shape == (2, 5, 16) and (raw.embedded[1, 3:] == 0).all()
        enc = decoder.prepare(raw)
        assert enc.embedded is None  # in the values now: not copied for every beam row
        keys = decoder.key_proj(raw.memory)  # (B, S, C)
        values = (keys + decoder.value_embed(raw.embedded)) * 0.5**0.5  # (B, S, C)
        query_embed = decoder.query_embed(tgt_embedded)  # (B, T, C)
        query = (decoder.queries[0](h) + query_embed) * 0.5**0.5
        scores = query @ keys.transpose(1, 2) / 24**0.5  # (B, T, S)
        scores = scores.masked_fill(~enc.src_mask[:, None, :], float("-inf"))
        expected = h + decoder.contexts[0](scores.softmax(-1) @ values)
        torch.testing.assert_close(decoder._attend(0, h, enc, query_embed)[0], expected)


def test_dropout_zeroes_p_and_scales_the_rest():
    drop = _Dropout(0.25).train()
    x = torch.rand(100, 200) + 0.5  # no zero entries of its own
    torch.manual_seed(0)
    y = drop(x)
    dropped = y == 0
    assert 0.23 < dropped.float().mean().item() < 0.27  # 20,000 draws at p = 0.25
    torch.testing.assert_close(y[~dropped], x[~dropped] / 0.75)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(_Dropout(0.0).train()(x), x)
    # p = 0.2 draws with p' = 26/128 = 0.203: the rest scaled by 1 / (1 - p'), unbiased
    y = _Dropout(0.2).train()(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - 26 / 128))
    assert abs((y.sum() / x.sum()).item() - 1.0) < 0.01


def test_under_bf16_autocast_a_blocks_second_conv_reads_bf16(monkeypatch):
    """What train.precision=bf16 runs on a CPU: autocast. A block's first conv reads the float32
    residual stream (autocast casts it), and its second conv reads the first one's bf16 output:
    the padding mask multiplies it in its own dtype (a float32 mask would promote it to float32
    and autocast would cast it back, a copy forward and backward). The encoding stays within
    bf16 rounding of float32's."""
    encoder, _ = make_pair()
    src_ids, src_lens, _ = random_batch([7, 4, 2], [3, 3, 3], V)
    with torch.no_grad():
        reference = encoder(src_ids, src_lens).memory
    read = []
    conv1d = F.conv1d
    monkeypatch.setattr(F, "conv1d", lambda x, *a, **k: read.append(x.dtype) or conv1d(x, *a, **k))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        memory = encoder(src_ids, src_lens).memory
    # per block: conv1 (float32), conv2 (bf16), and block 0's 1x1 residual (float32, 16 -> 24)
    assert read.count(torch.bfloat16) == len(encoder.blocks) and len(read) == 7
    torch.testing.assert_close(memory.float(), reference, atol=0.05, rtol=0.05)


def test_keep_mask_is_unbiased_in_every_lane():
    """Eight elements share one 64-bit draw, whose top bit `random_` leaves 0: each element's
    byte must still keep with probability 1 - p', p' = p rounded to a multiple of 2**-7 (a mask
    that read the top bit would drop nothing in every eighth element)."""
    torch.manual_seed(0)
    assert rounded_p(0.3) == 38 / 128
    keep = keep_mask(torch.Size([200, 400]), 0.3, torch.float32, "cpu").flatten()
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    for lane in range(8):  # 10,000 draws each: a standard deviation of 0.005
        assert abs(keep[lane::8].mean().item() - 90 / 128) < 0.02
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        mask = keep_mask(torch.Size([70, 30]), 0.5, dtype, "cpu", 2.0)
        assert mask.dtype == dtype and set(mask.unique().tolist()) == {0.0, 2.0}
    assert keep_mask(torch.Size([5]), 0.001, torch.float32, "cpu", 1.5).tolist() == [1.5] * 5
    assert keep_mask(torch.Size([5]), 0.999, torch.float32, "cpu").tolist() == [0.0] * 5


def test_emb_scale_multiplies_the_token_embeddings():
    """emb_dim 16: tokens times 4, and the position features start 4 times larger too (at the
    RMS of the scaled embedding initialisation)."""
    encoder, _ = make_pair(dropout=0.0)
    scaled, _ = make_pair(dropout=0.0, emb_scale=True)
    torch.testing.assert_close(scaled.embed_pos.pos_scale, 4.0 * encoder.embed_pos.pos_scale)
    ids, positions = torch.tensor([[4, 5, 6]]), torch.arange(3)
    with torch.no_grad():
        for enc in (encoder, scaled):
            enc.embed_pos.pos_scale.zero_()  # the token embeddings alone
        plain = encoder.embed_pos(encoder.embed, ids, positions)
        torch.testing.assert_close(scaled.embed_pos(scaled.embed, ids, positions), plain * 4.0)


# ---- causality ----------------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_decoder_is_causal_and_encoder_is_not(k, options):
    encoder, decoder = make_pair(kernel_size=k, **OPTIONS[options])
    src_ids, src_lens, tgt_ids = random_batch([9, 6], [8, 8], V, seed=2)
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


def test_memory_is_zero_at_padded_positions():
    encoder, _ = make_pair()
    src_ids, src_lens, _ = random_batch([4, 11, 7], [1, 1, 1], V, seed=5)
    with torch.no_grad():
        memory = encoder(src_ids, src_lens).memory  # (B, S, C)
    assert (memory[0, 4:] == 0).all() and (memory[2, 7:] == 0).all()
    assert (memory[0, :4] != 0).any(-1).all()


# ---- incremental decoding -----------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_cache_equals_recompute(k, options):
    """A cached `step` gives what the uncached path (the whole prefix through
    `forward_with_attention`, what benchmarks/decode_speed.py --recompute measures) gives at its
    last position: logits and the blocks' mean attention."""
    encoder, decoder = make_pair(kernel_size=k, levels=3, **OPTIONS[options])
    src_ids, src_lens, tgt_ids = random_batch([7, 3, 5], [12, 12, 12], V, seed=3)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        state = decoder.init_state(enc)
        for t in range(1, 13):
            step_logits, state, step_attn = decoder.step(tgt_ids[:, t - 1], state, enc)
            logits, attn = decoder.forward_with_attention(tgt_ids[:, :t], enc)
            torch.testing.assert_close(step_logits, logits[:, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(step_attn, attn[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("options", ["bai", "separable"])
def test_reorders_at_every_step_equal_recompute(options):
    """Beam search reorders (and shrinks) the rows at every step: the row table must compose
    those reorders over the whole span of every conv. Each step here reorders by a random
    permutation, a repeat, or a shrink, and is checked against the reordered prefix recomputed
    through `forward_with_attention`."""
    encoder, decoder = make_pair(kernel_size=3, levels=3, **OPTIONS[options])  # spans up to 8
    src_ids, src_lens, tgt_ids = random_batch([7, 3, 5, 6], [14] * 4, V, seed=4)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        state = decoder.init_state(enc)
        prefix = tgt_ids[:, :0]  # (B, 0): each row's tokens so far, reordered with it
        for t in range(13):
            tokens = tgt_ids[torch.arange(prefix.size(0)) % tgt_ids.size(0), t]  # (B,)
            logits, state, attn = decoder.step(tokens, state, enc)
            prefix = torch.cat([prefix, tokens[:, None]], dim=1)  # (B, t + 1)
            expected, expected_attn = decoder.forward_with_attention(prefix, enc)
            torch.testing.assert_close(logits, expected[:, -1], atol=1e-5, rtol=0)
            torch.testing.assert_close(attn, expected_attn[:, -1], atol=1e-5, rtol=0)
            rows = prefix.size(0)
            kind = t % 3
            if kind == 0:  # same size: the row table alone changes
                index = torch.randperm(rows, generator=gen)
            elif kind == 1:  # repeats and drops rows at the same size
                index = torch.randint(0, rows, (rows,), generator=gen)
            else:  # the batch grows (up to 6 rows) or shrinks (down to 2)
                size = 6 if rows < 4 else 2
                index = torch.randint(0, rows, (size,), generator=gen)
            state = decoder.reorder_state(state, index)
            enc = enc.index_select(index)
            prefix = prefix[index]


def test_step_leaves_out_taps_before_the_sentence_start_exactly():
    """On a CPU a step reads only the taps that reach position 0 or later (levels 3, k = 3: the
    oldest tap of the last level is 8 back); a step that reads every tap (`pos` unknown, as on
    a GPU) must give the same logits."""
    encoder, decoder = make_pair(kernel_size=3, levels=3)
    src_ids, src_lens, tgt_ids = random_batch([7, 3, 5], [10] * 3, V, seed=5)
    block = decoder.blocks[-1]
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        state = decoder.init_state(enc)
        for t in range(10):
            h = decoder.embed_pos(decoder.embed, tgt_ids[:, t], state["pos"])  # (B, E)
            history = _History(state, decoder.spans, decoder.dilations)
            h = h.new_zeros(h.size(0), block.in_channels).normal_()
            trimmed, _ = block.step(h, history, (4, 5), t)
            full, _ = block.step(h, history, (4, 5), None)
            torch.testing.assert_close(trimmed, full)
            _, state, _ = decoder.step(tgt_ids[:, t], state, enc)


def test_beam_rows_of_one_sentence_attend_in_one_product():
    """`EncoderOut.index_select` notes when rows come in runs of one sentence (beam search's
    start and its dropping of finished sentences) and nothing else; the decoder then scores a
    run's queries together, which must give what row-by-row attention gives."""
    encoder, decoder = make_pair(kernel_size=3, levels=3, attention_embeddings=True)
    src_ids, src_lens, tgt_ids = random_batch([7, 3, 5], [6] * 3, V, seed=6)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        beams = enc.index_select(torch.arange(3).repeat_interleave(4))  # 12 rows, runs of 4
        assert beams.sentence_rows == 4 and torch.equal(beams.per_sentence[0], enc.per_sentence[0])
        swapped = beams.index_select(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]))
        assert swapped.sentence_rows == 4  # one row per sentence, in the new order
        assert torch.equal(swapped.per_sentence[2], enc.per_sentence[2][[1, 0]])
        mixed = beams.index_select(torch.tensor([0, 1, 2, 3, 5, 6, 7, 8]))
        assert mixed.sentence_rows == 1  # one row per batch row again
        assert torch.equal(mixed.per_sentence[1], enc.per_sentence[1][[0, 0, 0, 0, 1, 1, 1, 2]])
        assert beams.index_select(torch.tensor([1, 0, 2, 3])).sentence_rows == 1
        assert enc.index_select(torch.tensor([2, 2, 0, 0, 1, 1])).sentence_rows == 2
        assert enc.index_select(torch.tensor([2, 2, 0, 1, 1, 1])).sentence_rows == 1
        per_row = tuple(t.repeat_interleave(4, dim=0) for t in enc.per_sentence)  # (12, S, C)
        rows = dataclasses.replace(beams, sentence_rows=1, per_sentence=per_row)
        tgt = tgt_ids.repeat_interleave(4, dim=0)  # (12, T)
        state_g, state_1 = decoder.init_state(beams), decoder.init_state(rows)
        for t in range(tgt.size(1)):
            logits_g, state_g, attn_g = decoder.step(tgt[:, t], state_g, beams)
            logits_1, state_1, attn_1 = decoder.step(tgt[:, t], state_1, rows)
            torch.testing.assert_close(logits_g, logits_1)
            torch.testing.assert_close(attn_g, attn_1)


def test_reorders_copy_no_column_and_compact_gathers_them():
    """What makes the reorder cheap: at any batch size (beam search shrinks the batch whenever
    a sentence finishes) it selects rows of the (B, W) table only and keeps every column;
    `compact_state` (a CUDA graph's fixed buffers) gathers each column to the batch's rows and
    changes no later step."""
    encoder, decoder = make_pair(kernel_size=3, levels=3)
    src_ids, src_lens, tgt_ids = random_batch([7, 3, 5], [8] * 3, V, seed=4)
    with torch.no_grad():
        enc = decoder.prepare(encoder(src_ids, src_lens))
        state = decoder.init_state(enc)
        for t in range(4):
            _, state, _ = decoder.step(tgt_ids[:, t], state, enc)
        for index in (torch.tensor([2, 0, 0]), torch.tensor([2, 0]), torch.tensor([2, 0, 0, 1])):
            moved = decoder.reorder_state(state, index)
            assert all(a is b for c, d in zip(state["cols"], moved["cols"]) for a, b in zip(c, d))
            assert moved["rows"].shape == (index.numel(), 8)  # W = (k - 1) * 2**(L - 1)
        index = torch.tensor([2, 0])
        loose, compact = decoder.reorder_state(state, index), None
        compact = decoder.compact_state(loose)
        assert all(col.shape[0] == 2 for c in compact["cols"] for col in c)
        assert torch.equal(compact["rows"], torch.arange(2)[:, None].expand(-1, 8))
        sub = enc.index_select(index)
        for t in range(4, 8):
            a, loose, _ = decoder.step(tgt_ids[index, t], loose, sub)
            b, compact, _ = decoder.step(tgt_ids[index, t], compact, sub)
            torch.testing.assert_close(a, b)


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
    src_ids, src_lens, tgt_ids = random_batch([5, 3], [4, 4], V, seed=6)
    with torch.no_grad():
        a = decoder(tgt_ids, decoder.prepare(encoder(src_ids, src_lens)))
        b = decoder_2(tgt_ids, decoder_2.prepare(encoder_2(src_ids, src_lens)))
    assert torch.equal(a, b)


def _block_output_stds(conv_init: str) -> list[float]:
    torch.manual_seed(0)
    cfg = make_cfg(
        emb_dim=64, channels=64, levels=8, dropout=0.0, glu=True, scaled_residual=True,
        conv_init=conv_init,
    )  # fmt: skip
    encoder = TCNEncoder.from_config(cfg, V, PAD)
    h = torch.randn(16, 64, 40)  # (B, C, S): unit variance in
    stds = []
    with torch.no_grad():
        for block in encoder.blocks:
            h = block(h)
            stds.append(h.std().item())
    return stds


def test_convs2s_init_keeps_the_variance_through_the_stack():
    """ConvS2S's rule (std sqrt(4 / fan_in) before a GLU) keeps a unit-variance input within a
    small factor of unit variance through 8 GLU blocks with scaled residuals (about 1.2-2.8
    here); with PyTorch's fan-in uniform default each block's branch is small, so each
    sqrt(0.5) residual join shrinks the signal (std 0.07 after 8 blocks)."""
    kept = _block_output_stds("convs2s")
    assert all(0.7 < std < 4.0 for std in kept), kept
    shrunk = _block_output_stds("pytorch")
    assert shrunk[-1] < 0.15, shrunk


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


# ---- a task -------------------------------------------------------------------------------


def test_tiny_tcn_learns_reverse():
    """A real end-to-end check: train with teacher forcing, decode greedily with `step`."""
    torch.manual_seed(0)
    cfg = make_cfg(emb_dim=32, channels=32, levels=3, dropout=0.0)
    model = build_model(cfg, V, V, PAD, joint_vocab=True)
    steps = 300
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        src_ids, src_lens, tgt_in_ids, tgt_out_ids = reverse_batch(gen, 64, V)
        logits = model(src_ids, src_lens, tgt_in_ids)
        loss = F.cross_entropy(logits.reshape(-1, V), tgt_out_ids.flatten(), ignore_index=PAD)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    exact = exact_match(model, V)
    assert exact >= 0.95, f"exact match {exact:.3f}"
