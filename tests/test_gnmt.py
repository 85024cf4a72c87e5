"""GNMT-specific checks: sizes, the bidirectional layer, attention against its reference formula,
initialisation, config errors, and a tiny model that must learn to reverse sequences."""

from __future__ import annotations

import pytest
import torch
from helpers_models import BOS, PAD, exact_match, reverse_batch
from helpers_training import prepare_tiny, tiny
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.cli import main
from nmt.config import ModelConfig
from nmt.errors import ConfigError
from nmt.models import attention, build_model
from nmt.models.gnmt import BiRNN, GNMTDecoder, GNMTEncoder, reverse_within_lengths, run_layer


def cfg_of(**fields) -> ModelConfig:
    return ModelConfig(**fields)


# --- sizes ------------------------------------------------------------------------------------


def rnn_params(input_dim: int, hidden: int, gates: int = 4) -> int:
    """One PyTorch recurrent layer: W_ih, W_hh and the two bias vectors b_ih, b_hh."""
    return gates * hidden * (input_dim + hidden) + 2 * gates * hidden


def gnmt_params(v, emb, hidden, bi, enc_layers, dec_layers, shared=True, tied=False) -> int:
    """Closed form of the GNMT v2 size with LSTM cells and normalized Bahdanau attention."""
    encoder = v * emb + 2 * rnn_params(emb, bi)
    if enc_layers >= 2:
        encoder += rnn_params(2 * bi, hidden) + (enc_layers - 2) * rnn_params(hidden, hidden)
    memory = hidden if enc_layers >= 2 else 2 * bi
    decoder = 0 if shared else v * emb
    decoder += rnn_params(emb, hidden) + (dec_layers - 1) * rnn_params(hidden + memory, hidden)
    # W_q (H x H), W_k (D x H), v (H), bias (H), scalar gain
    decoder += hidden * hidden + memory * hidden + 2 * hidden + 1
    decoder += (0 if tied else hidden * v) + v  # output projection and its bias
    return encoder + decoder


PRESETS = {
    # name: (ModelConfig fields, vocab, expected range or None)
    "small": (dict(emb_dim=256, hidden=256, bi_hidden=128, enc_layers=2, dec_layers=2), 8000),
    "gnmt_v2": (
        dict(emb_dim=1024, hidden=1024, bi_hidden=1024, enc_layers=4, dec_layers=4),
        32000,
    ),
    "paper_8x8": (
        dict(emb_dim=1024, hidden=1024, bi_hidden=512, enc_layers=8, dec_layers=8),
        32000,
    ),
}


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_matches_closed_form(name, tied):
    fields, vocab = PRESETS[name]
    with torch.device("meta"):  # sizes only: no memory, no init cost
        model = build_model(cfg_of(**fields, tie_embeddings=tied), vocab, vocab, PAD, True)
    count = sum(p.numel() for p in model.parameters())
    expected = gnmt_params(
        vocab,
        fields["emb_dim"],
        fields["hidden"],
        fields["bi_hidden"],
        fields["enc_layers"],
        fields["dec_layers"],
        tied=tied,
    )
    assert count == expected
    if name == "gnmt_v2" and not tied:
        assert 150e6 < count < 170e6  # NVIDIA reports about 160M for GNMT v2


def test_parameter_count_unshared_and_gru():
    fields, vocab = PRESETS["small"]
    model = build_model(cfg_of(**fields, cell="gru"), 8000, 6000, PAD, False)
    count = sum(p.numel() for p in model.parameters())
    e, h, b = 256, 256, 128
    expected = 8000 * e + 2 * rnn_params(e, b, 3) + rnn_params(2 * b, h, 3)
    expected += 6000 * e + rnn_params(e, h, 3) + rnn_params(2 * h, h, 3)
    expected += 2 * h * h + 2 * h + 1 + h * 6000 + 6000
    assert count == expected


# --- encoder ----------------------------------------------------------------------------------


def test_reverse_within_lengths_reverses_real_tokens_and_is_an_involution():
    x = torch.arange(2 * 5).view(2, 5, 1).float()
    lens = torch.tensor([3, 5])
    out = reverse_within_lengths(x, lens)
    assert out[0, :, 0].tolist() == [2, 1, 0, 3, 4]
    assert out[1, :, 0].tolist() == [9, 8, 7, 6, 5]
    assert torch.equal(reverse_within_lengths(out, lens), x)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@torch.no_grad()
def test_bidirectional_layer_equals_packed_bidirectional_rnn(cell):
    torch.manual_seed(0)
    layer = BiRNN(cell, 6, 5)
    reference = type(layer.fwd)(6, 5, batch_first=True, bidirectional=True)
    for name, param in layer.fwd.named_parameters():
        getattr(reference, name).copy_(param)
        getattr(reference, name + "_reverse").copy_(getattr(layer.bwd, name))
    x = torch.randn(3, 7, 6)
    lens = torch.tensor([7, 2, 5])
    packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=False)
    expected = pad_packed_sequence(reference(packed)[0], batch_first=True)[0]  # (B, S, 10)
    got = layer(x, lens)
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(got[i, :n], expected[i, :n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@torch.no_grad()
def test_one_step_cell_equals_the_layer(cell):
    """The cell function that runs a decoding step on CUDA gives the layer's own step."""
    torch.manual_seed(0)
    rnn = BiRNN(cell, 6, 5).fwd
    x = torch.randn(3, 1, 6)  # (B, 1, I)
    h = torch.randn(1, 3, 5)
    state = (h, torch.randn(1, 3, 5)) if cell == "lstm" else h
    expected_out, expected_state = rnn(x, state)
    out, new_state = run_layer(rnn, x, state, one_step_cell=True)
    torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(new_state, expected_state, atol=1e-6, rtol=0)  # shapes too


def test_encoder_sizes_and_mask():
    enc = GNMTEncoder.from_config(cfg_of(emb_dim=8, hidden=12, bi_hidden=5, enc_layers=1), 11, PAD)
    assert enc.out_dim == 10
    out = enc(torch.tensor([[4, 5, 3], [6, 3, 0]]), torch.tensor([3, 2]))
    assert out.memory.shape == (2, 3, 10)
    assert out.src_mask.tolist() == [[True, True, True], [True, True, False]]
    enc = GNMTEncoder.from_config(cfg_of(emb_dim=8, hidden=12, bi_hidden=5, enc_layers=3), 11, PAD)
    assert enc.out_dim == 12


def test_residual_at_layer_two_needs_matching_widths():
    with pytest.raises(ConfigError, match="residual_start"):
        GNMTEncoder.from_config(
            cfg_of(hidden=16, bi_hidden=4, enc_layers=2, residual_start=2), 10, PAD
        )
    GNMTEncoder.from_config(cfg_of(hidden=16, bi_hidden=8, enc_layers=2, residual_start=2), 10, PAD)
    GNMTEncoder.from_config(cfg_of(hidden=16, bi_hidden=4, enc_layers=3, residual_start=3), 10, PAD)


# --- config errors ----------------------------------------------------------------------------


def test_config_mistakes_reaching_the_models_are_config_errors():
    """nmt.config rejects these first; a ModelConfig built in code still gets a ConfigError
    (exit 2 through the CLI) that names the key, never a ValueError."""
    with pytest.raises(ConfigError, match="model.attention: expected bahdanau, dot or general"):
        build_model(cfg_of(attention="luong"), 30, 30, PAD, True)
    with pytest.raises(ConfigError, match="model.cell: expected one of lstm, gru, rnn"):
        build_model(cfg_of(cell="lstn"), 30, 30, PAD, True)
    with pytest.raises(ConfigError, match="model.arch: expected one of gnmt, tcn, found 'rnn'"):
        build_model(cfg_of(arch="rnn"), 30, 30, PAD, True)
    with pytest.raises(ConfigError, match="model.decoder: expected one of gnmt, tcn, found 'cnn'"):
        build_model(cfg_of(decoder="cnn"), 30, 30, PAD, True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("corpus"))


def test_a_model_check_through_the_cli_is_one_error_line_and_exit_2(prepared, tmp_path, capsys):
    """`nmt train` with a residual at encoder layer 2 that the widths cannot take: the encoder's
    own check (nmt.config does not make it) ends the run with one `error:` line, exit 2."""
    out = tmp_path / "run"
    layers = ("model.enc_layers=2", "model.residual_start=2", "model.bi_hidden=8")
    assert main(["train", "--", *tiny(prepared, out, *layers)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    assert "model.residual_start: a residual at encoder layer 2" in err
    assert "found 16 and 32" in err
    assert not list(out.glob("*.pt"))


# --- decoder ----------------------------------------------------------------------------------


def test_initialisation_follows_nvidia_except_the_attention_gain():
    model = build_model(
        cfg_of(emb_dim=16, hidden=16, bi_hidden=8, init_scale=0.05), 30, 30, 0, True
    )
    att = model.decoder.attention
    for name, param in model.named_parameters():
        if name.endswith("attention.scale"):
            assert param.item() == 1.0  # NVIDIA: 1/sqrt(A); see BahdanauAttention
        elif name.endswith("attention.bias"):
            assert torch.all(param == 0)
        else:
            assert param.abs().max() <= 0.05, name
            assert param.abs().max() > 0.01, name
    assert torch.all(model.encoder.embed.weight[PAD] == 0)
    assert model.decoder.embed is model.encoder.embed  # joint vocab: shared
    assert isinstance(att, attention.BahdanauAttention)


def test_tie_output():
    model = build_model(cfg_of(emb_dim=16, hidden=16, tie_embeddings=True), 30, 30, PAD, True)
    assert model.decoder.out.weight is model.decoder.embed.weight
    decoder = GNMTDecoder.from_config(cfg_of(emb_dim=8, hidden=16), 30, PAD, 16)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        decoder.tie_output()


@pytest.mark.parametrize("cell, entry", [("lstm", 2), ("gru", None), ("rnn", None)])
def test_state_is_batch_first_per_layer(cell, entry):
    model = build_model(
        cfg_of(emb_dim=8, hidden=8, bi_hidden=4, dec_layers=3, cell=cell), 9, 9, 0, 1
    )
    enc = model.encode(torch.tensor([[4, 3], [5, 3], [6, 0]]), torch.tensor([2, 2, 1]))
    state = model.init_state(enc)
    _, state, attn = model.step(torch.tensor([BOS] * 3), state, enc)
    assert len(state["layers"]) == 3 and attn.shape == (3, 2)
    assert state["pos"].tolist() == [1, 1, 1]
    for layer in state["layers"]:
        tensors = layer if entry else (layer,)
        assert len(tensors) == (entry or 1)
        assert all(t.shape == (3, 8) for t in tensors)


def test_prepared_keys_are_only_a_cache():
    model = build_model(cfg_of(emb_dim=8, hidden=8, bi_hidden=4), 9, 9, PAD, True).eval()
    src_ids, src_lens = torch.tensor([[4, 5, 3], [6, 3, 0]]), torch.tensor([3, 2])
    tgt_in_ids = torch.tensor([[BOS, 4, 5], [BOS, 6, 7]])
    raw = model.encoder(src_ids, src_lens)
    prepared = model.decoder.prepare(raw)
    assert prepared.keys is not None and raw.keys is None
    torch.testing.assert_close(
        model.decoder(tgt_in_ids, prepared), model.decoder(tgt_in_ids, raw), atol=1e-6, rtol=0
    )


# --- attention --------------------------------------------------------------------------------


def nvidia_bahdanau(att, query, memory, src_mask):
    """NVIDIA GNMT v2 `BahdanauAttention(normalize=True)`, written out with tanh."""
    pre = att.query_proj(query)[:, :, None] + att.key_proj(memory)[:, None] + att.bias
    scores = torch.tanh(pre) @ (att.scale * att.v / att.v.norm())  # (B, T, S)
    weights = scores.masked_fill(~src_mask[:, None], float("-inf")).softmax(-1)
    return weights @ memory, weights


@pytest.mark.parametrize("chunk_elements", [10**9, 1, 200], ids=["whole", "t=1", "t=2"])
def test_bahdanau_matches_reference_values_and_gradients(chunk_elements, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK_ELEMENTS_CPU", chunk_elements)
    torch.manual_seed(0)
    att = attention.BahdanauAttention(6, 5, 4, init_scale=0.5).double()
    torch.nn.init.uniform_(att.bias, -0.3, 0.3)
    query = torch.randn(3, 5, 6, dtype=torch.double, requires_grad=True)
    memory = torch.randn(3, 5, 5, dtype=torch.double, requires_grad=True)
    src_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]]).bool()
    weight = torch.randn(3, 5, 5, dtype=torch.double)
    params = [query, memory, *att.parameters()]

    context, attn = att(query, att.project_keys(memory), memory, src_mask)
    grads = torch.autograd.grad((context * weight).sum(), params)
    ref_context, ref_attn = nvidia_bahdanau(att, query, memory, src_mask)
    ref_grads = torch.autograd.grad((ref_context * weight).sum(), params)
    # the softmax runs in float32 by design, hence the tolerance
    torch.testing.assert_close(context, ref_context, atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.double(), ref_attn, atol=1e-6, rtol=0)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_sigmoid_scores_gradcheck():
    q = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    k = torch.randn(2, 5, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(attention.sigmoid_scores, (q, k, w))


def test_luong_projection_only_where_needed():
    assert attention.LuongAttention(8, 8, general=False, init_scale=0.1).key_proj is None
    assert attention.LuongAttention(8, 6, general=False, init_scale=0.1).key_proj is not None
    assert attention.LuongAttention(8, 8, general=True, init_scale=0.1).key_proj is not None
    att = attention.LuongAttention(3, 3, general=False, init_scale=0.1)
    memory = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    context, attn = att(torch.tensor([[[0.0, 5.0, 0.0]]]), None, memory, torch.ones(1, 3).bool())
    assert attn.argmax(-1).item() == 1 and attn[0, 0, 1] > 0.98


# --- learning ---------------------------------------------------------------------------------

VOCAB = 20  # pad, unk, bos, eos and 16 symbols


def test_tiny_gnmt_learns_to_reverse():
    torch.manual_seed(0)
    cfg = cfg_of(emb_dim=32, hidden=64, bi_hidden=32, enc_layers=1, dec_layers=2, dropout=0.0)
    model = build_model(cfg, VOCAB, VOCAB, PAD, True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    running = None
    # it usually converges in 300-500 updates; stop early once the running loss is tiny
    for _ in range(1200):
        src_ids, src_lens, tgt_in_ids, tgt_out_ids = reverse_batch(gen, 64, VOCAB)
        logits = model(src_ids, src_lens, tgt_in_ids)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), tgt_out_ids.reshape(-1), ignore_index=PAD
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if running < 0.05:
            break
    exact = exact_match(model, VOCAB)
    assert exact >= 0.95, f"exact match {exact:.3f} after loss {running:.4f}"
