"""Ensembles (nmt.models.ensemble, Translator.from_checkpoints, `nmt translate A.pt B.pt`).

- The ensemble's step log-probs are exactly the mean of its members' (and its attention the
  mean of theirs); an ensemble of a model with itself is that model (tokens and scores, bit for
  bit), through the search and through the command line.
- A GNMT + TCN ensemble keeps the Seq2Seq contract: step equals its teacher-forced forward,
  reordering equals the reordered batch, padding invariance.
- Members that do not share one tokenizer are one clear error naming both files.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import build_retokenized_checkpoint, write_parallel
from helpers_models import BOS, EOS, PAD, VOCAB, random_batch, run_steps, tiny_model

from nmt import checkpoint, search_graph
from nmt.cli import main
from nmt.config import from_dict
from nmt.errors import UsageError
from nmt.models import build_model_for
from nmt.models.ensemble import Ensemble
from nmt.search import SearchSettings, beam_search
from nmt.tokenizer import Tokenizer
from nmt.translator import Translator

ATOL = 1e-5


def _mixed() -> Ensemble:
    return Ensemble([tiny_model("gnmt", seed=1), tiny_model("tcn", seed=2)]).eval()


@torch.no_grad()
def test_step_is_the_mean_of_the_members_steps():
    members = [tiny_model("gnmt", seed=1), tiny_model("tcn", seed=2), tiny_model("gnmt", seed=3)]
    ensemble = Ensemble(members).eval()
    src_ids, src_lens, tgt_in_ids = random_batch([7, 4, 9], [6, 8, 3], VOCAB)
    log_probs, attn = run_steps(ensemble, src_ids, src_lens, tgt_in_ids)  # (B, T, V), (B, T, S)
    alone = [run_steps(m, src_ids, src_lens, tgt_in_ids) for m in members]
    assert torch.equal(log_probs, torch.stack([lp for lp, _ in alone]).mean(0))
    assert torch.equal(attn, torch.stack([a for _, a in alone]).mean(0))
    # not normalised: a geometric mean of distributions that disagree sums to less than 1
    assert bool((log_probs.exp().sum(-1) < 1 - 1e-4).all())


@torch.no_grad()
def test_a_gnmt_tcn_ensemble_keeps_the_contract():
    model = _mixed()
    src_ids, src_lens, tgt_in_ids = random_batch([7, 4, 9, 1], [6, 8, 3, 5], VOCAB)
    log_probs, attn = run_steps(model, src_ids, src_lens, tgt_in_ids)
    torch.testing.assert_close(log_probs, model(src_ids, src_lens, tgt_in_ids), atol=ATOL, rtol=0)
    tgt_out_ids = torch.randint(4, VOCAB, tgt_in_ids.shape)
    expected = log_probs.gather(2, tgt_out_ids.unsqueeze(2)).squeeze(2)  # (B, T)
    got = model.target_log_probs(src_ids, src_lens, tgt_in_ids, tgt_out_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    src_mask = torch.arange(src_ids.size(1))[None, :] < src_lens[:, None]  # (B, S)
    assert torch.all(attn.masked_select(~src_mask[:, None, :].expand_as(attn)) == 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(4, 8), atol=ATOL, rtol=0)
    # padding invariance: each sentence alone gives what it gets in the batch
    for i, (s, t) in enumerate(zip(src_lens.tolist(), [6, 8, 3, 5])):
        one = model(src_ids[i : i + 1, :s], src_lens[i : i + 1], tgt_in_ids[i : i + 1, :t])
        torch.testing.assert_close(one[0], log_probs[i, :t], atol=ATOL, rtol=0)


@torch.no_grad()
def test_reordering_an_ensemble_equals_the_reordered_batch():
    model = _mixed()
    src_ids, src_lens, tgt_in_ids = random_batch([6, 3, 8, 5], [5, 5, 5, 5], VOCAB, seed=5)
    index = torch.tensor([1, 1, 3, 1, 0, 0])
    enc = model.encode(src_ids, src_lens)
    state = model.init_state(enc)
    for t in range(3):
        _, state, _ = model.step(tgt_in_ids[:, t], state, enc)
    state, enc = model.reorder_state(state, index), model.reorder_encoder_out(enc, index)
    got, _, _ = model.step(tgt_in_ids[index, 3], state, enc)
    expected, _ = run_steps(model, src_ids[index], src_lens[index], tgt_in_ids[index, :4])
    torch.testing.assert_close(got, expected[:, 3], atol=ATOL, rtol=0)


def _search(model, src_ids, src_lens, **kw):
    s = SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=1.0, max_len_b=4, **kw)
    return [[(h.tokens, h.score, h.log_prob) for h in hyps] for hyps in beam_search(
        model, src_ids, src_lens, s
    )]  # fmt: skip


@pytest.mark.parametrize("family", ["gnmt", "tcn"])
def test_an_ensemble_of_a_model_with_itself_is_that_model(family):
    model = tiny_model(family, init_scale=1.0)
    twice = Ensemble([model, model]).eval()
    src_ids, src_lens, _ = random_batch([7, 4, 9, 2, 5], [1] * 5, VOCAB, seed=4)
    for kw in (dict(beam_size=1), dict(beam_size=4, n_best=3, beta=0.2)):
        assert _search(twice, src_ids, src_lens, **kw) == _search(model, src_ids, src_lens, **kw)
    sampling = dict(beam_size=1, sampling="topp", topp=0.95, seed=5)
    assert _search(twice, src_ids, src_lens, **sampling) == _search(
        model, src_ids, src_lens, **sampling
    )


# ---------------------------------------------------------------------- checkpoints
def _tcn_checkpoint(tiny_checkpoint, folder):
    """A random TCN checkpoint with the tiny checkpoint's tokenizer: an ensemble partner."""
    ckpt = checkpoint.load(tiny_checkpoint)
    raw = ckpt["config"]
    raw["model"] = {**raw["model"], "arch": "tcn", "channels": 16, "levels": 3}
    raw["data"] = {**raw["data"], "max_len": 20}  # within the receptive field of 3 levels
    tok = Tokenizer.from_bytes(checkpoint.tokenizer_bytes(ckpt))
    torch.manual_seed(5)
    model = build_model_for(from_dict(raw).model, tok)
    path = folder / "tcn.pt"
    checkpoint.save(
        path, config=raw, model_state=model.state_dict(), tokenizer_bytes=tok.to_bytes()
    )
    return path


def test_translator_ensemble_of_itself_and_of_gnmt_with_tcn(tiny_checkpoint, tmp_path):
    lines = ["w1 w2 the cat", "", "w3 dog sat on a mat", "w7"]
    one = Translator.from_checkpoint(tiny_checkpoint, device="cpu")
    twice = Translator.from_checkpoints([tiny_checkpoint, tiny_checkpoint], device="cpu")
    assert isinstance(twice.model, Ensemble) and not isinstance(one.model, Ensemble)
    assert twice.translate_nbest(lines, 2) == one.translate_nbest(lines, 2)
    tcn = _tcn_checkpoint(tiny_checkpoint, tmp_path)
    mixed = Translator.from_checkpoints([tiny_checkpoint, tcn], device="cpu")
    assert mixed.cfg.search == one.cfg.search  # the first checkpoint's settings
    out = mixed.translate_nbest(lines, 2)
    assert len(out) == 4 and out[1] == [("", 0.0)]
    assert out != one.translate_nbest(lines, 2)  # the TCN member changes the outputs


def test_cli_translate_and_evaluate_take_several_checkpoints(tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("w1 w2\nthe cat sat\n\nw4 w5 w6\n")
    ref = tmp_path / "ref.txt"
    ref.write_text("W2 W1\nSAT CAT THE\n\nW6 W5 W4\n")
    outs = []
    for ckpts in ([tiny_checkpoint], [tiny_checkpoint, tiny_checkpoint]):
        out = tmp_path / f"out{len(ckpts)}.txt"
        assert main(["translate", *map(str, ckpts), "-i", str(src), "-o", str(out)]) == 0
        outs.append(out.read_text())
        argv = ["evaluate", *map(str, ckpts), "--src", str(src), "--ref", str(ref), "--json"]
        assert main(argv) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["checkpoints"] == list(map(str, ckpts))
        outs.append(result["bleu"]["score"])
    assert outs[0] == outs[2] and len(outs[0].split("\n")) == 5
    assert outs[1] == outs[3]


def test_members_whose_tokenizers_differ_only_in_training_paths_are_accepted(
    tiny_checkpoint, tmp_path
):
    # the tiny checkpoint's tokenizer learned again from the same text in another folder: the
    # trainer records other paths, so the bytes differ, but every piece and rule is the same
    ckpt = checkpoint.load(tiny_checkpoint)
    first = Tokenizer.from_bytes(checkpoint.tokenizer_bytes(ckpt))
    src, tgt = write_parallel(tmp_path, 300, seed=1)
    again = Tokenizer.train([src], [tgt], tmp_path / "spm", vocab_size=first.src_vocab_size)
    assert again.to_bytes() != first.to_bytes() and again.comparable() == first.comparable()
    path = tmp_path / "again.pt"
    checkpoint.save(
        path, config=ckpt["config"], model_state=ckpt["model"], tokenizer_bytes=again.to_bytes()
    )
    lines = ["w1 w2 the cat", "w3 dog sat on a mat"]
    both = Translator.from_checkpoints([tiny_checkpoint, path], device="cpu")
    assert both.translate_nbest(lines, 2) == Translator.from_checkpoint(
        tiny_checkpoint, device="cpu"
    ).translate_nbest(lines, 2)


@pytest.mark.parametrize(
    "special_ids, message",
    [((0, 1, 2, 3), "different sentencepiece models"), ((0, 1, 3, 2), "different special ids")],
)
def test_members_with_other_tokenizers_are_refused(tiny_checkpoint, tmp_path, special_ids, message):
    other = build_retokenized_checkpoint(tiny_checkpoint, tmp_path, special_ids)
    Translator.from_checkpoint(other, device="cpu")  # fine alone
    for pair in ([tiny_checkpoint, other], [other, tiny_checkpoint, tiny_checkpoint]):
        with pytest.raises(UsageError, match=message) as e:
            Translator.from_checkpoints(pair, device="cpu")
        assert str(tiny_checkpoint) in str(e.value) and str(other) in str(e.value)


@pytest.mark.parametrize("mode", ["eager", "in_place"])
def test_the_static_shape_search_takes_an_ensemble(mode):
    # nmt.search_graph keeps the state as one pytree, written back leaf by leaf as a CUDA graph
    # replay does ("in_place"): an ensemble's tuple of member states must go through it whole
    model = _mixed()
    src_ids, src_lens, _ = random_batch([7, 4, 9, 2, 5], [1] * 5, VOCAB, seed=4)
    s = SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=1.0, max_len_b=4)
    s = dataclasses.replace(s, beam_size=3, n_best=2, beta=0.2)
    graph = search_graph.search(model, src_ids, src_lens, s, mode=mode)
    loop = beam_search(model, src_ids, src_lens, s)
    assert [[h.tokens for h in hyps] for hyps in graph] == [
        [h.tokens for h in hyps] for hyps in loop
    ]
    for g, lo in zip(graph, loop):
        assert [h.score for h in g] == pytest.approx([h.score for h in lo], abs=1e-5)


def test_ensemble_attention_is_the_members_mean_and_alignments_work(tiny_checkpoint, tmp_path):
    from nmt.translator import Translator, translate_stream

    single = Translator.from_checkpoint(tiny_checkpoint, device="cpu")
    pair = Translator.from_checkpoints([tiny_checkpoint, tiny_checkpoint], device="cpu")
    lines = ["w1 w2 w3", "", "the cat sat"]
    one = single.translate(lines, return_attention=True)
    two = pair.translate(lines, return_attention=True)
    for a, b in zip(one, two):
        assert a.text == b.text and a.alignment == b.alignment
        assert torch.allclose(a.attention, b.attention)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(lines) + "\n")
    translate_stream(pair, str(src), str(tmp_path / "out.txt"), alignments=True)
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 3


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_ensemble_of_itself_with_a_precision_and_a_shortlist_equals_the_single_model(
    tiny_checkpoint, dtype
):
    from nmt.devices import cpu_offers
    from nmt.translator import Translator

    why_not = cpu_offers().get(dtype, "")
    if why_not:
        pytest.skip(f"this CPU does not offer {dtype}: {why_not}")
    single = Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype=dtype)
    pair = Translator.from_checkpoints([tiny_checkpoint] * 2, device="cpu", dtype=dtype)
    assert pair.precision == single.precision == dtype
    lines = ["w1 w2 w3", "", "the cat sat on the mat", "w7"]
    for shortlist in (0, 3):
        want = single.translate_nbest(lines, 2, beam_size=2, shortlist=shortlist)
        assert pair.translate_nbest(lines, 2, beam_size=2, shortlist=shortlist) == want
