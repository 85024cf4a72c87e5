"""Forced scoring of given translations: nmt.forced, `Translator.score`, `nmt score-pairs`.

- The score of the search's own best hypothesis is the search's raw score (`Hypothesis.log_prob`;
  with alpha = beta = 0 its score too), for greedy and beam search, GNMT and TCN, and ensembles.
- N pairs in, N lines out, in input order, whatever the batching; empty targets are eos alone,
  empty sources the eos alone; lengths that differ are one error naming both files, before any
  output; the output file is written atomically.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers_models import BOS, EOS, PAD, VOCAB, random_batch, tiny_model

from nmt import forced
from nmt.cli import main
from nmt.errors import UsageError
from nmt.models.ensemble import Ensemble
from nmt.search import SearchSettings, beam_search
from nmt.translator import Translator


def _settings(**kw) -> SearchSettings:
    return SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, max_len_a=1.0, max_len_b=4, **kw)


MODELS = {
    "gnmt": lambda: tiny_model("gnmt", init_scale=1.0),
    "tcn": lambda: tiny_model("tcn", init_scale=1.0),
    "gnmt+tcn": lambda: Ensemble([tiny_model("gnmt", seed=1), tiny_model("tcn", seed=2)]).eval(),
}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("search", [dict(beam_size=1), dict(beam_size=4, n_best=4)])
def test_the_score_of_a_hypothesis_is_the_searchs_raw_score(name, search):
    model = MODELS[name]()
    src_ids, src_lens, _ = random_batch([7, 4, 9, 2, 5, 1], [1] * 6, VOCAB, seed=4)
    for alpha, beta in ((0.0, 0.0), (0.6, 0.3)):
        results = beam_search(model, src_ids, src_lens, _settings(alpha=alpha, beta=beta, **search))
        # every hypothesis of the n-best lists, the whole batch scored at once
        rows = [i for i, hyps in enumerate(results) for _ in hyps]
        hyps = [h for sent in results for h in sent]
        index = torch.tensor(rows)
        totals = forced.target_scores(
            model, src_ids[index], src_lens[index], [h.tokens for h in hyps], _settings()
        )
        for h, total in zip(hyps, totals.tolist()):
            assert total == pytest.approx(h.log_prob, abs=1e-4)
            if alpha == beta == 0.0:
                assert total == pytest.approx(h.score, abs=1e-4)
        assert len({len(h.tokens) for h in hyps}) > 1  # not trivial: outputs of several lengths


@torch.no_grad()
def test_an_ensembles_score_is_the_mean_of_its_members():
    members = [tiny_model("gnmt", seed=1), tiny_model("tcn", seed=2)]
    src_ids, src_lens, _ = random_batch([7, 4, 9], [1] * 3, VOCAB, seed=4)
    targets = [[5, 6, 7], [], [8, 9, 10, 11, 12]]
    alone = [forced.target_scores(m, src_ids, src_lens, targets, _settings()) for m in members]
    both = forced.target_scores(Ensemble(members).eval(), src_ids, src_lens, targets, _settings())
    torch.testing.assert_close(both, (alone[0] + alone[1]) / 2, atol=1e-5, rtol=0)


@torch.no_grad()
def test_an_empty_target_is_the_eos_alone():
    model = MODELS["gnmt"]()
    src_ids, src_lens, _ = random_batch([5], [1], VOCAB, seed=2)
    (total,) = forced.target_scores(model, src_ids, src_lens, [[]], _settings()).tolist()
    enc = model.encode(src_ids, src_lens)
    log_probs, _, _ = model.step(torch.tensor([BOS]), model.init_state(enc), enc)
    assert total == pytest.approx(float(log_probs[0, EOS]), abs=1e-5)


# ---------------------------------------------------------------------- the Translator
@pytest.fixture(scope="module")
def translator(tiny_checkpoint):
    return Translator.from_checkpoint(tiny_checkpoint, device="cpu")


def test_translator_scores_its_own_nbest_lists(translator):
    lines = ["w1 w2 the cat", "w3 dog sat on a mat", "w7", "a a a"]
    pieces, _ = translator.encode(lines, 40)
    s = translator.search_settings(2, alpha=0.0, beta=0.0)
    src_ids, src_lens = forced.source_batch(pieces, s.eos_id, s.pad_id)
    hyps = beam_search(translator.model, src_ids, src_lens, s)
    src, tgt = [], []
    for p, sent in zip(pieces, hyps):
        for h in sent:
            src.append(p)
            tgt.append(h.tokens)
    scores = translator.score_pieces(src, tgt, batch_size=3)
    flat = [h for sent in hyps for h in sent]
    for score, h in zip(scores, flat):
        assert score.log_prob == pytest.approx(h.score, abs=1e-4)
        assert score.pieces == len(h.tokens) + 1


def test_translator_score_keeps_order_whatever_the_batch(translator):
    src = ["w1 w2", "", "the cat sat on the mat", "   ", "w9"] * 4
    tgt = ["W2 W1", "W3", "", "", "MAT THE ON SAT CAT THE W9 W9"] * 4
    big = translator.score(src, tgt, batch_size=64)
    small = translator.score(src, tgt, batch_size=3)
    assert len(big) == 20
    for a, b in zip(big, small):
        assert a.pieces == b.pieces and a.log_prob == pytest.approx(b.log_prob, abs=1e-5)
    assert big[:5] != big[1:6]  # not trivial: the pairs get different scores
    assert big[2].pieces == 1 and big[3].pieces == 1  # empty targets: the eos alone
    assert all(math.isfinite(s.log_prob) and s.log_prob < 0 for s in big)
    with pytest.raises(UsageError, match="score: 2 source lines but 1 target lines"):
        translator.score(["a", "b"], ["A"])


# ---------------------------------------------------------------------- the command line
def _files(tmp_path, src_lines, tgt_lines):
    src, tgt = tmp_path / "s.txt", tmp_path / "t.txt"
    src.write_text("".join(x + "\n" for x in src_lines), encoding="utf-8")
    tgt.write_text("".join(x + "\n" for x in tgt_lines), encoding="utf-8")
    return str(src), str(tgt)


SRC = ["w1 w2", "", "the cat sat on the mat", "w9 😀", "w3\rw4"]
TGT = ["W2 W1", "W3", "", "W9", "W4 W3"]


def test_cli_score_pairs_n_in_n_out_tab_and_json(tiny_checkpoint, translator, tmp_path, capsys):
    src, tgt = _files(tmp_path, SRC, TGT)
    out = tmp_path / "scores.tsv"
    argv = ["score-pairs", str(tiny_checkpoint), "--src", src, "--tgt", tgt]
    assert main([*argv, "-o", str(out)]) == 0
    rows = [line.split("\t") for line in out.read_text().split("\n")[:-1]]
    expected = translator.score(SRC, TGT)
    assert len(rows) == len(SRC)
    for (total, per_piece, pieces), score in zip(rows, expected):
        assert float(total) == pytest.approx(score.log_prob, abs=1e-4)
        assert float(per_piece) == pytest.approx(score.per_piece, abs=1e-4)
        assert int(pieces) == score.pieces
    assert main([*argv, "--json", "--batch-size", "2"]) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["pieces"] for o in objects] == [s.pieces for s in expected]
    for o, score in zip(objects, expected):
        assert o["log_prob"] == pytest.approx(score.log_prob, abs=1e-5)
        assert o["per_piece"] == pytest.approx(o["log_prob"] / o["pieces"])
    # an ensemble of the checkpoint with itself scores as the checkpoint
    assert main([*argv[:2], str(tiny_checkpoint), *argv[2:], "--json"]) == 0
    twice = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert twice == objects


def test_cli_score_pairs_refuses_files_of_different_lengths(tiny_checkpoint, tmp_path, capsys):
    src, tgt = _files(tmp_path, SRC, TGT[:3])
    out = tmp_path / "scores.tsv"
    argv = ["score-pairs", str(tiny_checkpoint), "--src", src, "--tgt", tgt, "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{src} has 5 lines but {tgt} has 3" in err and err.count("error:") == 1
    assert not out.exists()
    assert main(["score-pairs", str(tiny_checkpoint), "--src", "-", "--tgt", tgt]) == 2
    assert "score-pairs --src: give a file" in capsys.readouterr().err


def test_cli_score_pairs_output_is_atomic(tiny_checkpoint, tmp_path, monkeypatch):
    src, tgt = _files(tmp_path, SRC * 3, TGT * 3)
    out = tmp_path / "scores.tsv"
    out.write_text("previous complete file\n")
    calls = []
    real = Translator.score_run

    def failing(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated failure mid-way")
        return real(self, *args)

    monkeypatch.setattr(Translator, "score_run", failing)
    from nmt import evaluation

    with pytest.raises(RuntimeError, match="mid-way"):
        evaluation.score_pairs([str(tiny_checkpoint)], src, tgt, str(out), chunk_lines=4)
    assert out.read_text() == "previous complete file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.txt", "scores.tsv", "t.txt"]
