"""The Seq2Seq contract, tested for every family in FAMILIES and every encoder/decoder mix
(a new family gets these for free).

- incremental decoding (`step` T times) gives the log-softmax of teacher-forced `forward`, and
  `target_log_probs` (forced scoring) picks the same log-probs;
- padding invariance: a sentence's outputs do not depend on its batch-mates;
- `reorder_state` / `reorder_encoder_out` with a permutation and with repeated rows give the same
  step outputs as building the reordered batch from scratch;
- model classes take explicit arguments only (no `**kwargs`, no defaults of their own).
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from helpers_models import PAD, VOCAB, random_batch, run_steps, tiny_model

from nmt.config import ModelConfig
from nmt.models import FAMILIES
from nmt.models.base import WordDropout

ATOL = 1e-5


# GNMT is tested with every cell and attention; residuals are active (3 + 3 layers, from layer 2).
GNMT_VARIANTS = [{"cell": "lstm", "attention": a} for a in ("bahdanau", "dot", "general")] + [
    {"cell": "gru", "attention": a} for a in ("bahdanau", "dot", "general")
]
GNMT_VARIANTS.append({"cell": "rnn", "attention": "bahdanau"})
GNMT_VARIANTS.append({"cell": "lstm", "attention": "bahdanau", "emb_scale": True})
GNMT_VARIANTS.append({"cell": "lstm", "attention": "bahdanau", "bridge": True, "positions": True})
GNMT_VARIANTS.append({"cell": "gru", "attention": "dot", "bridge": True, "positions": True})
GNMT_VARIANTS.append({"cell": "lstm", "attention": "bahdanau", "input_feeding": True})
GNMT_VARIANTS.append({"cell": "rnn", "attention": "general", "input_feeding": True})
# TCN: every kernel size with its own padding case (1: none, 2: uneven, 3: even), the 1x1
# residual (channels != emb_dim), and the bottleneck before a tied output projection.
TCN_VARIANTS = [
    {"kernel_size": 3},
    {"kernel_size": 1, "channels": 24},
    {"kernel_size": 2, "channels": 24, "levels": 3},
    {"kernel_size": 3, "channels": 24, "tie_embeddings": True},
    # the ConvS2S options: gated linear units, scaled residuals, variance-keeping init
    {"kernel_size": 3, "glu": True, "scaled_residual": True, "conv_init": "convs2s"},
    # depthwise-separable convolutions (with the 1x1 residual, and with kernel size 1)
    {"kernel_size": 3, "channels": 24, "separable": True, "conv_init": "convs2s"},
    {"kernel_size": 1, "separable": True, "glu": True},
    # attention after the last block only; embeddings scaled by sqrt(emb_dim)
    {"kernel_size": 2, "levels": 3, "attention_blocks": 1, "emb_scale": True, "glu": True},
    # ConvS2S attention (embeddings in queries and values), embedding and channel widths apart
    {"kernel_size": 3, "channels": 24, "attention_embeddings": True, "attention_blocks": 2},
]
VARIANTS = {"gnmt": GNMT_VARIANTS, "tcn": TCN_VARIANTS}
CASES = [
    pytest.param(family, variant, id="-".join([family, *map(str, variant.values())]))
    for family in FAMILIES
    for variant in VARIANTS.get(family, [{}])
]
# mixed families (an encoder of one, a decoder of another) share the same contract, whether the
# memory is as wide as the decoder (16) or not (TCN channels 24)
CASES += [
    pytest.param(enc, {"decoder": dec, **wide}, id=f"{enc}+{dec}" + ("-channels24" if wide else ""))
    for enc in FAMILIES
    for dec in FAMILIES
    for wide in ({}, {"channels": 24})
    if enc != dec
]
# a GNMT encoder gives no embeddings: the TCN decoder's ConvS2S attention uses its keys as values
CASES.append(
    pytest.param("gnmt", {"decoder": "tcn", "attention_embeddings": True}, id="gnmt+tcn-emb")
)


@pytest.mark.parametrize("family, variant", CASES)
@torch.no_grad()
def test_step_equals_forward(family, variant):
    model = tiny_model(family, **variant)
    src_ids, src_lens, tgt_in_ids = random_batch([7, 4, 9, 1], [6, 8, 3, 5], VOCAB)
    expected = torch.log_softmax(model(src_ids, src_lens, tgt_in_ids).float(), -1)  # (B, T, V)
    log_probs, attn = run_steps(model, src_ids, src_lens, tgt_in_ids)
    assert log_probs.shape == expected.shape == (4, 8, VOCAB)
    torch.testing.assert_close(log_probs, expected, atol=ATOL, rtol=0)
    # forced scoring's teacher-forced log-prob of each next token is the step's
    tgt_out_ids = torch.randint(
        4, VOCAB, tgt_in_ids.shape, generator=torch.Generator().manual_seed(0)
    )
    got = model.target_log_probs(src_ids, src_lens, tgt_in_ids, tgt_out_ids)  # (B, T)
    chosen = log_probs.gather(2, tgt_out_ids.unsqueeze(2)).squeeze(2)  # (B, T)
    torch.testing.assert_close(got, chosen, atol=ATOL, rtol=0)
    # attention is a distribution over the real source positions only
    src_mask = torch.arange(src_ids.size(1))[None, :] < src_lens[:, None]  # (B, S)
    assert attn.shape == (4, 8, src_ids.size(1))
    assert torch.all(attn.masked_select(~src_mask[:, None, :].expand_as(attn)) == 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 8), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, variant", CASES)
@torch.no_grad()
def test_padding_invariance(family, variant):
    model = tiny_model(family, **variant)
    src_lens, tgt_lens = [5, 11, 2], [4, 9, 6]
    src_ids, src_lens_t, tgt_in_ids = random_batch(src_lens, tgt_lens, VOCAB, seed=3)
    batch_logits = model(src_ids, src_lens_t, tgt_in_ids)  # (B, T, V)
    batch_enc = model.encode(src_ids, src_lens_t)
    for i, (s, t) in enumerate(zip(src_lens, tgt_lens)):
        alone = model(src_ids[i : i + 1, :s], src_lens_t[i : i + 1], tgt_in_ids[i : i + 1, :t])
        torch.testing.assert_close(alone[0], batch_logits[i, :t], atol=ATOL, rtol=0)
        alone_enc = model.encode(src_ids[i : i + 1, :s], src_lens_t[i : i + 1])
        torch.testing.assert_close(alone_enc.memory[0], batch_enc.memory[i, :s], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, variant", CASES)
@pytest.mark.parametrize("index", [[2, 0, 3, 1], [1, 1, 3, 1, 0, 0]], ids=["perm", "repeat"])
@torch.no_grad()
def test_reorder_matches_reordered_batch(family, variant, index):
    model = tiny_model(family, **variant)
    src_ids, src_lens, tgt_in_ids = random_batch([6, 3, 8, 5], [5, 5, 5, 5], VOCAB, seed=5)
    index = torch.tensor(index)
    prefix = 3

    # run the original batch for `prefix` steps, then reorder and continue
    enc = model.encode(src_ids, src_lens)
    state = model.init_state(enc)
    for t in range(prefix):
        _, state, _ = model.step(tgt_in_ids[:, t], state, enc)
    state = model.reorder_state(state, index)
    enc = model.reorder_encoder_out(enc, index)
    got_lp, got_state, got_attn = model.step(tgt_in_ids[index, prefix], state, enc)

    # the reordered batch from scratch
    expected_lp, expected_attn = run_steps(
        model, src_ids[index], src_lens[index], tgt_in_ids[index, : prefix + 1]
    )
    torch.testing.assert_close(got_lp, expected_lp[:, prefix], atol=ATOL, rtol=0)
    torch.testing.assert_close(got_attn, expected_attn[:, prefix], atol=ATOL, rtol=0)
    # a second step from the reordered state still matches
    lp2, _, _ = model.step(tgt_in_ids[index, prefix + 1], got_state, enc)
    expected_lp2, _ = run_steps(
        model, src_ids[index], src_lens[index], tgt_in_ids[index, : prefix + 2]
    )
    torch.testing.assert_close(lp2, expected_lp2[:, prefix + 1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family, variant", CASES)
@torch.no_grad()
def test_inspect_attention_is_what_step_attends_with(family, variant):
    """A GNMT decoder has one attention: `inspect_attention` (teacher forcing) gives what `step`
    returns, so pictures and alignments show what search saw. A TCN decoder gives its last
    attention's, which with one attending block is `step`'s mean of the attentions too."""
    decoder = variant.get("decoder", family)
    one = {"attention_blocks": 1} if decoder == "tcn" else {}
    model = tiny_model(family, **{**variant, **one})
    src_ids, src_lens, tgt_in_ids = random_batch([7, 4, 9, 1], [6, 8, 3, 5], VOCAB)
    _, expected = run_steps(model, src_ids, src_lens, tgt_in_ids)  # (B, T, S)
    got = model.inspect_attention(src_ids, src_lens, tgt_in_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("zeroed", [-1, 0], ids=["last", "first"])
@torch.no_grad()
def test_tcn_inspect_attention_is_the_last_blocks(zeroed):
    """A zero query makes a block attend uniformly (the other's is made peaked):
    `inspect_attention` is uniform when it is the last block's, never `step`'s mean."""
    model = tiny_model("tcn", levels=2)
    for query in model.decoder.queries:
        query.weight.mul_(30.0)  # peaked attention: far from uniform
    torch.nn.init.zeros_(model.decoder.queries[zeroed].weight)
    torch.nn.init.zeros_(model.decoder.queries[zeroed].bias)
    src_ids, src_lens, tgt_in_ids = random_batch([7, 4, 9], [6, 8, 3], VOCAB)
    got = model.inspect_attention(src_ids, src_lens, tgt_in_ids)  # (B, T, S)
    _, mean = run_steps(model, src_ids, src_lens, tgt_in_ids)  # (B, T, S)
    for i, n in enumerate(src_lens.tolist()):
        uniform = torch.full_like(got[i, :, :n], 1 / n)
        assert torch.allclose(got[i, :, :n], uniform, atol=ATOL) == (zeroed == -1)
        assert not torch.allclose(mean[i, :, :n], uniform, atol=1e-3)


def test_every_family_the_config_offers_is_there():
    """`model.arch=tcn` must build a TCN, never meet a family that an import error removed."""
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(FAMILIES) == set(fields["arch"].metadata["choices"])
    for side in ("encoder", "decoder"):
        assert set(FAMILIES) == set(fields[side].metadata["choices"]) - {""}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_backward_shapes_and_grads(family):
    model = tiny_model(family).train()
    src_ids, src_lens, tgt_in_ids = random_batch([4, 7], [5, 2], VOCAB, seed=7)
    logits = model(src_ids, src_lens, tgt_in_ids)
    assert logits.shape == (2, 5, VOCAB)
    logits.float().logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_word_dropout_zeroes_whole_tokens_and_keeps_the_mean():
    drop = WordDropout(0.25).train()
    x = torch.rand(40, 50, 6) + 0.5  # no zero entries of its own
    torch.manual_seed(0)
    y = drop(x)
    dropped = (y == 0).all(-1)  # (40, 50)
    kept = ~dropped
    # every position is either dropped whole or kept whole, scaled by 1 / (1 - p)
    assert not ((y == 0) & kept.unsqueeze(-1)).any()
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert 0.2 < dropped.float().mean().item() < 0.3  # 2,000 draws at p = 0.25
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_word_dropout_acts_in_training_only(family):
    """Same weights with and without word dropout: identical in eval mode (search never sees
    it), different in training (where it drops tokens on both sides)."""
    plain = tiny_model(family, dropout=0.0)
    dropping = tiny_model(family, dropout=0.0, word_dropout=0.5)
    dropping.load_state_dict(plain.state_dict())
    src_ids, src_lens, tgt_in_ids = random_batch([4, 7, 6], [5, 2, 6], VOCAB, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(
            dropping(src_ids, src_lens, tgt_in_ids), plain(src_ids, src_lens, tgt_in_ids)
        )
        plain.train()
        dropping.train()
        torch.manual_seed(0)
        expected = plain(src_ids, src_lens, tgt_in_ids)
        assert torch.equal(plain(src_ids, src_lens, tgt_in_ids), expected)  # no other noise
        assert not torch.allclose(dropping(src_ids, src_lens, tgt_in_ids), expected)


@pytest.mark.parametrize(
    "cls", [cls for pair in FAMILIES.values() for cls in pair], ids=lambda cls: cls.__name__
)
def test_model_classes_take_explicit_arguments_only(cls):
    """No `**kwargs` (an unknown option must fail) and no defaults (they live in ModelConfig),
    and one `from_config` that builds the class from a ModelConfig."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert all(p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params)
    assert all(p.default is p.empty for p in params), [p.name for p in params]
    from_config = inspect.signature(cls.from_config).parameters
    assert list(from_config)[:3] == ["model_cfg", "vocab_size", "pad_id"]
    memory_dim = [16] if "memory_dim" in from_config else []
    assert isinstance(cls.from_config(ModelConfig(), VOCAB, PAD, *memory_dim), cls)
