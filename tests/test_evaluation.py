"""Evaluation: BLEU/chrF on files with sacreBLEU signatures, alignment checks, `evaluate`."""

import json
import types

import pytest

from nmt import evaluation
from nmt.cli import main
from nmt.errors import UsageError
from nmt.evaluation import evaluate, format_report, score, score_files
from nmt.translator import Translator

REFS = [
    "the quick brown fox jumps over the lazy dog",
    "a man is riding a bicycle down the street",
    "two children are playing in the park today",
]


def _write(path, lines, final_newline=True):
    path.write_bytes(("\n".join(lines) + ("\n" if final_newline else "")).encode("utf-8"))
    return str(path)


def test_perfect_hypothesis_scores_100_with_signatures(tmp_path):
    ref = _write(tmp_path / "ref.txt", REFS)
    hyp = _write(tmp_path / "hyp.txt", REFS, final_newline=False)  # no final newline: same lines
    result = score_files(hyp, [ref])
    assert result["n"] == 3
    assert result["bleu"]["score"] == pytest.approx(100.0)
    assert result["chrf"]["score"] == pytest.approx(100.0)
    sig = result["bleu"]["signature"]
    assert "nrefs:1" in sig and "tok:13a" in sig and "case:mixed" in sig
    assert "nrefs:1" in result["chrf"]["signature"]
    report = format_report(result)
    assert "BLEU = 100.00" in report and sig in report and "chrF2 = 100.00" in report


def test_imperfect_hypothesis_scores_below_100(tmp_path):
    ref = _write(tmp_path / "ref.txt", REFS)
    hyp = _write(tmp_path / "hyp.txt", [REFS[0], "a man rides a bike", "children play"])
    result = score_files(hyp, [ref])
    assert 0 < result["bleu"]["score"] < 100 and 0 < result["chrf"]["score"] < 100


def test_lowercase_and_intl_tokenizer(tmp_path):
    ref = _write(tmp_path / "ref.txt", REFS)
    hyp = _write(tmp_path / "hyp.txt", [r.upper() for r in REFS])
    cased = score_files(hyp, [ref])
    assert cased["bleu"]["score"] < 1
    lc = score_files(hyp, [ref], lowercase=True, tokenize="intl")
    assert lc["bleu"]["score"] == pytest.approx(100.0)
    assert "case:lc" in lc["bleu"]["signature"] and "tok:intl" in lc["bleu"]["signature"]


def test_several_references(tmp_path):
    ref1 = _write(tmp_path / "ref1.txt", REFS)
    ref2 = _write(tmp_path / "ref2.txt", ["x y z"] * 3)
    result = score_files(_write(tmp_path / "hyp.txt", REFS), [ref1, ref2])
    assert "nrefs:2" in result["bleu"]["signature"]
    assert result["bleu"]["score"] == pytest.approx(100.0)


def test_line_count_mismatch_names_files_and_counts(tmp_path):
    ref = _write(tmp_path / "ref.txt", REFS)
    hyp = _write(tmp_path / "hyp.txt", REFS[:2])
    with pytest.raises(UsageError, match=r"ref\.txt has 3 lines but .*hyp\.txt has 2"):
        score_files(hyp, [ref])


def test_only_newline_ends_a_line(tmp_path):
    lines = ["a\rb c d e f", "g\u2028h i j k l", "m\x0bn\x1co\x85p q r"]
    ref = _write(tmp_path / "ref.txt", lines)
    result = score_files(_write(tmp_path / "hyp.txt", lines), [ref])
    assert result["n"] == 3


def test_crlf_references_score_as_their_lf_copy(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_bytes("".join(line + "\r\n" for line in REFS).encode("utf-8"))
    result = score_files(_write(tmp_path / "hyp.txt", REFS), [str(ref)])
    assert result["n"] == 3 and result["bleu"]["score"] == pytest.approx(100.0)


def test_invalid_utf8_and_empty_files(tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_bytes(b"fine\nalso fine\nbroken \xe2\x28 here\n")
    hyp = _write(tmp_path / "hyp.txt", ["a", "b", "c"])
    with pytest.raises(UsageError, match=r"ref\.txt: line 3: not valid UTF-8"):
        score_files(hyp, [str(ref)])
    empty = _write(tmp_path / "empty.txt", [], final_newline=False)
    with pytest.raises(UsageError, match="empty"):
        score_files(empty, [str(ref)])
    with pytest.raises(UsageError, match="not found"):
        score_files(str(tmp_path / "missing.txt"), [str(ref)])
    with pytest.raises(UsageError):
        score([], [[]])


def test_evaluate_files_writes_hypotheses_and_scores_them(tiny_checkpoint, tmp_path, monkeypatch):
    # A clock that moves only while the Translator translates, by 2.5 s: the time reported must
    # be the translation's, and the speed 4 lines / 2.5 s.
    now = [100.0]
    translate = Translator.run

    def timed_run(self, lines, settings):
        results = translate(self, lines, settings)
        now[0] += 2.5
        return results

    monkeypatch.setattr(Translator, "run", timed_run)
    monkeypatch.setattr(evaluation, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    src_lines = ["the cat sat on the mat", "", "w1 w2 w3 w4", "a dog"]
    src = _write(tmp_path / "src.txt", src_lines)
    ref = _write(tmp_path / "ref.txt", ["DIE KATZE", "", "W4 W3 W2 W1", "EIN HUND"])
    out = tmp_path / "hyp.txt"
    result = evaluate(
        tiny_checkpoint, src, [ref], None, hyp_out=str(out), device="cpu", beam_size=2, batch_size=3
    )
    assert result["n"] == 4 and result["src"] == src and result["testset"] is None
    assert result["search"]["beam_size"] == 2 and result["search"]["batch_size"] == 3
    assert result["seconds"] == 2.5 and result["sents_per_s"] == 1.6
    assert "nrefs:1" in result["bleu"]["signature"]
    hyps = out.read_text(encoding="utf-8").split("\n")
    assert len(hyps) == 5 and hyps[1] == "" and hyps[-1] == ""
    rescored = score_files(str(out), [ref])
    assert rescored["bleu"]["score"] == pytest.approx(result["bleu"]["score"])
    assert rescored["chrf"]["score"] == pytest.approx(result["chrf"]["score"])
    json.dumps(result)  # the CLI's --json needs plain data
    assert "BLEU = " in format_report(result)


def test_evaluate_checks_alignment_before_translating(tiny_checkpoint, tmp_path):
    src = _write(tmp_path / "src.txt", ["w1", "w2"])
    ref = _write(tmp_path / "ref.txt", ["W1"])
    with pytest.raises(UsageError, match=r"ref\.txt has 1 lines but .*src\.txt has 2"):
        evaluate(tiny_checkpoint, src, [ref], None, device="cpu")
    with pytest.raises(UsageError, match="not both"):
        evaluate(tiny_checkpoint, src, [ref], "multi30k:test_2016_flickr", device="cpu")
    with pytest.raises(UsageError, match="test set name"):
        evaluate(tiny_checkpoint, src, [], None, device="cpu")
    with pytest.raises(UsageError, match="beam_size"):
        evaluate(tiny_checkpoint, src, [src], None, device="cpu", beam_size=0)


def test_evaluate_testset_uses_checkpoint_languages(tiny_checkpoint, tmp_path, monkeypatch):
    src = _write(tmp_path / "test.en", ["the cat", "w1 w2"])
    ref = _write(tmp_path / "test.de", ["DIE KATZE", "W2 W1"])
    asked = []

    def fake_resolve(name, src_lang, tgt_lang, cache_dir=None):
        asked.append((name, src_lang, tgt_lang))
        return tmp_path / "test.en", tmp_path / "test.de"

    monkeypatch.setattr(evaluation.corpora, "resolve_testset", fake_resolve)
    result = evaluate(tiny_checkpoint, None, [], "multi30k:test_2016_flickr", device="cpu")
    assert asked == [("multi30k:test_2016_flickr", "en", "de")]
    assert result["testset"] == "multi30k:test_2016_flickr" and result["n"] == 2
    assert result["src"] == src and result["refs"] == [ref]
    assert format_report(result).startswith("multi30k:test_2016_flickr: 2 sentences")


def test_cli_score_and_evaluate(tiny_checkpoint, tmp_path, capsys):
    ref = _write(tmp_path / "ref.txt", REFS)
    assert main(["score", ref, "--ref", ref]) == 0
    assert "BLEU = 100.00" in capsys.readouterr().out
    assert main(["score", ref, "--ref", ref, "--json", "--lowercase", "--tokenize", "intl"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "case:lc" in result["bleu"]["signature"]
    short = _write(tmp_path / "short.txt", REFS[:1])
    assert main(["score", short, "--ref", ref]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    src = _write(tmp_path / "src.txt", ["w1 w2", "the cat", "a"])
    code = main(
        ["evaluate", str(tiny_checkpoint), "--src", src, "--ref", ref, "--device", "cpu", "--json"]
    )
    assert code == 0 and json.loads(capsys.readouterr().out)["n"] == 3
