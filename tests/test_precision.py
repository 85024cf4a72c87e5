"""Inference precision (issue 20): the probe that chooses it, the int8 and bf16 stand-ins for a
decoder's step products, and whole translations in every precision.

A small GNMT is trained here to reverse sequences through the product's update code
(nmt.optimization.Updater: its loss, clipping and Adam); the int8 and bf16 searches of that
model must give the float32 search's output on at least 95% of fresh sentences. bf16 tests run
only where this CPU offers bf16 (native bf16 and the bf16 LSTM kernel); elsewhere the CLI must
refuse it with one clear error.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers_models import BOS, EOS, PAD, random_batch, reverse_batch, run_steps, tiny_model
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from nmt import checkpoint, search
from nmt.batching import Batch
from nmt.cli import main
from nmt.config import Config, ModelConfig
from nmt.devices import (
    SPEEDUP_NEEDED,
    TORCH_DTYPES,
    Probe,
    cpu_offers,
    inference_precision,
    int8_linear,
    probe,
    quantize_weight,
)
from nmt.distributed import Distributed
from nmt.errors import UsageError
from nmt.models import build_model, build_model_for
from nmt.models.inference import PRODUCTS, Bf16Encoder, CellStep, ConvColumns, Int8Linear
from nmt.optimization import Updater
from nmt.search import SearchSettings
from nmt.tokenizer import Tokenizer
from nmt.translator import prepare_model, search_autocast

CPU = torch.device("cpu")
BF16_MISSING = cpu_offers()["bfloat16"]
needs_bf16 = pytest.mark.skipif(bool(BF16_MISSING), reason=f"no bf16 here: {BF16_MISSING}")
REDUCED = ["int8", pytest.param("bfloat16", marks=needs_bf16)]
ALL_OFFERED = {"float32": "", "bfloat16": "", "int8": ""}


# ---------------------------------------------------------------------- the probe
def _timer(seconds: dict):
    """A stand-in for the probe's clock: {name: fn} -> {name: seconds} from a table; it keeps
    the names it was asked to time (`timer.timed`)."""

    def timer(fns):
        timer.timed = set(fns)
        return {name: seconds[name] for name in fns}

    return timer


@pytest.mark.parametrize(
    "seconds, expected",
    [
        ({"float32": 1.0, "bfloat16": 2.0, "int8": 3.0}, "float32"),  # both slower
        ({"float32": 1.0, "bfloat16": 0.5, "int8": 0.2}, "int8"),  # int8 the fastest
        ({"float32": 1.0, "bfloat16": 0.2, "int8": 0.5}, "bfloat16"),
        ({"float32": 1.0, "bfloat16": 8.0, "int8": 0.5}, "int8"),  # bf16 emulated (AVX2 only)
        ({"float32": 1.0, "bfloat16": 0.95, "int8": 0.97}, "float32"),  # within 10%: ties
        ({"float32": 1.0, "bfloat16": 0.5, "int8": 0.48}, "bfloat16"),  # a tie keeps the exact one
    ],
)
def test_auto_takes_the_fastest_precision_and_float32_on_a_tie(seconds, expected):
    timer = _timer(seconds)
    measured = probe(ALL_OFFERED, timer)
    assert timer.timed == set(ALL_OFFERED)
    assert measured.fastest() == expected
    assert measured.fastest(("float32", "bfloat16")) in ("float32", "bfloat16")  # training's


def test_the_probe_never_picks_a_precision_slower_than_float32():
    rng = random.Random(0)
    for _ in range(300):
        seconds = {name: rng.uniform(0.1, 3.0) for name in ALL_OFFERED}
        chosen = Probe({name: 1.0 / s for name, s in seconds.items()}).fastest()
        assert seconds[chosen] <= seconds["float32"], (seconds, chosen)
        if chosen == "float32":
            assert all(seconds["float32"] / s < SPEEDUP_NEEDED for s in seconds.values())


def test_bf16_without_the_lstm_kernel_is_neither_offered_nor_timed():
    flags = frozenset({"avx512_bf16", "avx512_vnni", "avx2"})
    offered = cpu_offers(flags, "could not create a primitive descriptor for a LSTM forward")
    assert "no bf16 LSTM kernel" in offered["bfloat16"] and offered["float32"] == ""
    timer = _timer({"float32": 1.0, "bfloat16": 0.1, "int8": 0.95})
    measured = probe(offered, timer)
    assert "bfloat16" not in timer.timed and "bfloat16" in measured.missing
    assert measured.fastest() == "float32"


def test_a_cpu_without_native_bf16_does_not_offer_it():
    offered = cpu_offers(frozenset({"avx2", "fma"}), "")
    assert "no native bf16" in offered["bfloat16"]
    with pytest.raises(UsageError, match="search.dtype=bfloat16: this CPU has no native bf16"):
        inference_precision("bfloat16", CPU, offers=offered)
    assert inference_precision("int8", CPU, offers=offered)[0] == "int8"


def test_the_real_probe_times_what_this_machine_offers_once_per_process():
    measured = probe()
    offered = {name for name, why in cpu_offers().items() if not why}
    assert set(measured.gflops) == offered and all(v > 0 for v in measured.gflops.values())
    assert probe() is measured  # cached: one probe per process and thread count
    chosen, note = inference_precision("auto", CPU)
    assert chosen == measured.fastest() and measured.describe() in note


def test_unsupported_combinations_are_one_usage_error():
    with pytest.raises(UsageError, match="int8 decoding is CPU-only"):
        inference_precision("int8", torch.device("cuda"))
    with pytest.raises(UsageError, match="float16 needs a CUDA device"):
        inference_precision("float16", CPU)


def _src_file(tmp_path, lines):
    src = tmp_path / "in.txt"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return src


def test_unsupported_combinations_through_the_command_line(tiny_checkpoint, tmp_path, capsys):
    src, out = _src_file(tmp_path, ["w1 w2"]), tmp_path / "out.txt"
    base = ["translate", str(tiny_checkpoint), "-i", str(src), "-o", str(out)]
    assert main([*base, "--device", "cpu", "--dtype", "float16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search.dtype=float16 needs a CUDA device") and not out.exists()
    code = main([*base, "--device", "cpu", "--dtype", "bfloat16"])
    err = capsys.readouterr().err
    if BF16_MISSING:  # this CPU: one clear error, nothing written
        assert code == 2 and f"search.dtype=bfloat16: {BF16_MISSING}" in err
        assert not out.exists()
    else:
        assert code == 0 and "precision: bfloat16" in err
    code = main([*base, "--device", "cuda", "--dtype", "int8"])
    err = capsys.readouterr().err
    assert code == 2 and ("int8 decoding is CPU-only" in err or "CUDA is not available" in err)


def test_an_unsupported_combination_is_one_line_from_a_real_process(tiny_checkpoint, tmp_path):
    src = _src_file(tmp_path, ["w1 w2"])
    cmd = [sys.executable, "-m", "nmt", "translate", str(tiny_checkpoint), "-i", str(src)]
    result = subprocess.run(
        [*cmd, "--device", "cpu", "--dtype", "float16"], capture_output=True, text=True
    )
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr.startswith("error: search.dtype=float16") and "Traceback" not in result.stderr
    )


# ---------------------------------------------------------------------- the int8 product
@pytest.mark.parametrize("shape", [(1, 7, 3), (5, 256, 1000), (2, 33, 64, 17), (4, 8, 8)])
def test_int8_linear_is_the_float_product_within_the_quantization_error(shape):
    *batch, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*batch, k, generator=gen) * torch.rand(*batch, 1, generator=gen) * 10
    weight = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen)
    bias = torch.randn(n, generator=gen)
    q, scale = quantize_weight(weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    got = int8_linear(x, q, scale, bias)
    want = F.linear(x, weight, bias)
    assert got.shape == want.shape and got.dtype == torch.float32
    # each row's error is bounded by its own scale: compare row by row
    err = (got - want).abs().amax(-1) / (x.abs().amax(-1) * weight.abs().sum(-1).max() + 1e-6)
    assert float(err.max()) < 0.02
    assert torch.equal(int8_linear(torch.zeros(3, k), q, scale, bias), bias.expand(3, n))


def test_int8_rows_are_the_full_layers_columns():
    layer = Int8Linear(torch.randn(50, 16), torch.randn(50))
    x = torch.randn(6, 16)
    ids = torch.tensor([0, 3, 7, 49])
    assert torch.equal(layer.rows(ids)(x), layer(x)[:, ids])


# ---------------------------------------------------------------------- cells and convs
def _cells():
    torch.manual_seed(0)
    return [
        nn.LSTM(12, 8, batch_first=True),
        nn.GRU(12, 8, batch_first=True),
        nn.RNN(12, 8, batch_first=True),
        nn.RNN(12, 8, batch_first=True, nonlinearity="relu"),
    ]


def _tolerance(precision: str) -> float:
    return {"int8": 0.06, "bfloat16": 0.04}[precision]


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize("rnn", _cells(), ids=["lstm", "gru", "rnn_tanh", "rnn_relu"])
def test_a_cell_step_is_its_layer_in_reduced_precision(rnn, precision):
    """One product over [x, h] and the pointwise update give nn.LSTM/GRU/RNN's outputs (GRU:
    the reset gate multiplies the hidden part of the candidate only); from a given state one
    step at a time, and from None over a whole sequence (teacher forcing)."""
    x = torch.randn(5, 4, 12)
    h0 = torch.randn(1, 5, 8).tanh()
    state = (h0, torch.randn(1, 5, 8)) if isinstance(rnn, nn.LSTM) else h0
    cell = CellStep(rnn, PRODUCTS[precision])
    with torch.no_grad():
        for given in (state, None):
            want, want_state = rnn(x, given)
            got, got_state = cell(x, given)
            torch.testing.assert_close(got.float(), want, atol=_tolerance(precision), rtol=0)
            as_list = lambda s: list(s) if isinstance(s, tuple) else [s]  # noqa: E731
            for g, w in zip(as_list(got_state), as_list(want_state), strict=True):
                torch.testing.assert_close(g.float(), w, atol=_tolerance(precision), rtol=0)


@pytest.mark.parametrize("precision", REDUCED)
def test_conv_columns_are_the_weight_normalised_conv(precision):
    torch.manual_seed(0)
    conv = weight_norm(nn.Conv1d(6, 10, 3, dilation=2))
    x = torch.randn(4, 6, 11)  # (B, C_in, T): 11 - 2 * 2 = 7 outputs
    columns = ConvColumns(conv, PRODUCTS[precision])
    with torch.no_grad():
        want = conv(x)  # (4, 10, 7)
        torch.testing.assert_close(columns(x), want, atol=_tolerance(precision), rtol=0)
        taps = x[:, :, -5::2].transpose(1, 2).reshape(4, -1)  # last output's taps side by side
        torch.testing.assert_close(columns.column(taps), want[:, :, -1], atol=0.06, rtol=0)


@pytest.mark.parametrize("precision", REDUCED)
@pytest.mark.parametrize(
    "family, options",
    [("gnmt", {}), ("tcn", {}), ("tcn", {"separable": True, "attention_embeddings": True})],
    ids=["gnmt", "tcn", "tcn-separable"],
)
def test_a_reduced_model_steps_as_it_teacher_forces(family, options, precision):
    """The contract's invariant holds for the reduced models too: `step` T times gives
    `forward`'s log-probs (the same rows meet the same products)."""
    model = prepare_model(tiny_model(family, **options), precision, CPU)
    src_ids, src_lens, tgt_in_ids = random_batch([5, 3], [4, 2], 23)
    with torch.no_grad(), search_autocast(CPU, TORCH_DTYPES[precision]):
        stepped, _ = run_steps(model, src_ids, src_lens, tgt_in_ids)
        forced = torch.log_softmax(model(src_ids, src_lens, tgt_in_ids).float(), dim=-1)
    real = tgt_in_ids != PAD
    torch.testing.assert_close(stepped[real], forced[real], atol=0.05, rtol=0)


# ---------------------------------------------------------------------- a trained model
VOCAB = 20


@pytest.fixture(scope="module")
def trained():
    """A GNMT that reverses sequences, trained through nmt.optimization.Updater until its
    running loss is below 0.1 (usually 250-350 updates)."""
    cfg = Config()
    cfg.model = ModelConfig(emb_dim=32, hidden=64, bi_hidden=32, enc_layers=1, dec_layers=2)
    cfg.model.dropout = 0.0
    cfg.train = dataclasses.replace(
        cfg.train, lr=1e-2, schedule="constant", warmup_steps=1, label_smoothing=0.0
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, VOCAB, VOCAB, PAD, True)
    updater = Updater(cfg, model, Distributed.single(CPU), torch.float32, PAD, 1000)
    gen, running = torch.Generator().manual_seed(0), None
    for _ in range(1000):
        src_ids, src_lens, tgt_in_ids, tgt_out_ids = reverse_batch(gen, 64, VOCAB)
        tgt_lens = (tgt_out_ids != PAD).sum(1)
        batch = Batch(src_ids, src_lens, tgt_in_ids, tgt_out_ids, tgt_lens, torch.arange(64))
        nll = float(updater.step([batch]).figures[1]) / int(tgt_lens.sum())
        running = nll if running is None else 0.9 * running + 0.1 * nll
        if running < 0.1:
            break
    return model.eval()


def _search(model, precision, beam: int):
    src_ids, src_lens, _, tgt_out_ids = reverse_batch(torch.Generator().manual_seed(9), 200, VOCAB)
    settings = SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=beam, alpha=0.0)
    with search_autocast(CPU, TORCH_DTYPES[precision]):
        hyps = search.beam_search(model, src_ids, src_lens, settings)
    refs = [t[: t.index(EOS)] for t in tgt_out_ids.tolist()]
    return [h[0].tokens for h in hyps], refs


@pytest.mark.parametrize("beam", [1, 4])
@pytest.mark.parametrize(
    "precision, bf16_encoder",
    [
        ("int8", False),
        pytest.param("int8", True, marks=needs_bf16),
        pytest.param("bfloat16", False, marks=needs_bf16),
    ],
    ids=["int8", "int8-bf16-encoder", "bfloat16"],
)
def test_int8_and_bf16_give_the_float32_output_on_95_percent_of_sentences(
    trained, precision, bf16_encoder, beam
):
    want, refs = _search(trained, "float32", beam)
    assert sum(w == r for w, r in zip(want, refs)) / len(refs) >= 0.9  # a trained model
    reduced = prepare_model(copy.deepcopy(trained), precision, CPU, bf16_encoder)
    assert not any(isinstance(m, nn.LSTM) for m in reduced.decoder.modules())
    assert isinstance(reduced.encoder, Bf16Encoder) == bf16_encoder
    got, _ = _search(reduced, precision, beam)
    same = sum(g == w for g, w in zip(got, want)) / len(want)
    assert same >= 0.95, f"{precision}: {same:.3f} of the sentences as in float32"


# ---------------------------------------------------------------------- whole files
def _tcn_checkpoint(folder):
    """A randomly initialised tiny TCN checkpoint on the tiny checkpoint's kind of text."""
    src = folder / "tcn.src"
    src.write_text("".join(f"w{i} w{i + 1} the cat\n" for i in range(30)), encoding="utf-8")
    tok = Tokenizer.train([src], [src], folder / "spm", vocab_size=60)
    cfg = Config()
    cfg.data.max_len = 20  # within the receptive field of 3 levels (29)
    cfg.model = ModelConfig(arch="tcn", emb_dim=16, channels=24, levels=3, kernel_size=3)
    cfg.search = dataclasses.replace(cfg.search, beam_size=2, max_len_a=0.5, max_len_b=4)
    torch.manual_seed(0)
    model = build_model_for(cfg.model, tok)
    path = folder / "tcn.pt"
    checkpoint.save(
        path, config=cfg.to_dict(), model_state=model.state_dict(), tokenizer_bytes=tok.to_bytes()
    )
    return path


LINES = ["the cat sat on the mat", "", "w1 w2 w3", "   ", "a dog w7", " ".join(["w4 cat"] * 40)]


@pytest.mark.parametrize("precision", ["auto", "float32", *REDUCED])
@pytest.mark.parametrize("family", ["gnmt", "tcn"])
def test_every_precision_translates_a_file_line_for_line(
    family, precision, tiny_checkpoint, tmp_path, capsys
):
    ckpt = tiny_checkpoint if family == "gnmt" else _tcn_checkpoint(tmp_path)
    src, out = _src_file(tmp_path, LINES), tmp_path / "out.txt"
    args = ["translate", str(ckpt), "-i", str(src), "-o", str(out), "--device", "cpu"]
    assert main([*args, "--dtype", precision, "--threads", "1"]) == 0
    got = out.read_text(encoding="utf-8").split("\n")
    assert len(got) == len(LINES) + 1 and got[-1] == ""  # N lines in, N lines out
    assert got[1] == got[3] == ""
    err = capsys.readouterr().err
    chosen = probe().fastest() if precision == "auto" else precision
    assert f"precision: {chosen}" in err
    if precision == "auto":
        assert probe().describe() in err  # auto shows the probe's figures
