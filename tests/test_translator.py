"""Translator: one line in, one line out, order kept, nothing lost; clear errors; n-best format.

The tiny checkpoint has random weights: tests compare outputs with each other (order, batch
size, chunking, file vs list API), never with expected translations.
"""

import gzip
import io
import random
import re
import sys

import pytest
import torch

from nmt import checkpoint
from nmt.cli import main
from nmt.errors import UsageError
from nmt.tokenizer import Tokenizer
from nmt.translator import MAX_WARNINGS, Translator, translate_stream

ODD_LINES = [
    "",
    "   \t  ",
    "a\rb w1",  # \r inside a line: not a line break
    "w2\x0bw3",  # vertical tab
    "w4\x1cw5",  # file separator
    "w6\u2028w7",  # Unicode line separator
    "w8\x85w9",  # NEL
    "\x00 w1 \x07",  # NUL and BEL
    "שלום עולם the cat",  # Hebrew, RTL
    "مرحبا بالعالم",  # Arabic, RTL
    "\u202ew1 w2\u202c",  # RTL override
    "😀 the dog 🎉👍🏽",  # emoji, modifiers
    "\ufeffw3 w4",  # a BOM that is not at the start of the file
    "w5 " * 5000,  # 5,000 tokens: truncated with a warning
]


@pytest.fixture(scope="module")
def translator(tiny_checkpoint):
    return Translator.from_checkpoint(tiny_checkpoint, device="cpu")


WORDS = [f"w{i}" for i in range(30)] + ["the", "cat", "sat", "on", "mat", "a", "dog"]


def _mixed_lines(n, seed=0):
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        if i % 10 == 3:
            lines.append(ODD_LINES[(i // 10) % len(ODD_LINES)])
        else:
            lines.append(" ".join(rng.choices(WORDS, k=rng.randint(1, 12))))
    return lines


def _write(path, lines, final_newline=True):
    data = "\n".join(lines) + ("\n" if final_newline else "")
    path.write_bytes(data.encode("utf-8"))
    return path


def _read_out(path):
    data = path.read_bytes()
    assert data.endswith(b"\n")
    return data.decode("utf-8").split("\n")[:-1]


def test_two_thousand_mixed_lines_in_equal_lines_out(translator, tmp_path, capsys):
    lines = _mixed_lines(2000)
    src = _write(tmp_path / "in.txt", lines)
    out = tmp_path / "out.txt"
    assert translate_stream(translator, str(src), str(out), chunk_lines=300) == 2000
    hyps = _read_out(out)
    assert len(hyps) == 2000
    for line, hyp in zip(lines, hyps):
        if not line.strip():
            assert hyp == ""
        assert "\r" not in hyp
    # each output belongs to its input line: translate a sample again, in batches of their own
    sample = random.Random(0).sample(range(2000), 25) + [3, 13, 23, 33, 43, 53, 63, 73, 83]
    assert [hyps[i] for i in sample] == translator.translate([lines[i] for i in sample])
    err = capsys.readouterr().err
    long_lines = [i + 1 for i, line in enumerate(lines) if line.startswith("w5 w5 w5")]
    assert long_lines
    for lineno in long_lines[:MAX_WARNINGS]:
        assert err.count(f"{src}:{lineno}: ") == 1
    assert sorted(tmp_path.iterdir()) == [src, out]  # no temporary file left behind


def test_order_does_not_depend_on_batch_size_or_chunking(translator, tmp_path):
    lines = _mixed_lines(40, seed=1)
    one_by_one = translator.translate(lines, batch_size=1)
    assert translator.translate(lines, batch_size=64) == one_by_one
    assert translator.translate(lines[::-1], batch_size=7)[::-1] == one_by_one
    assert len(set(one_by_one)) > 8  # the outputs do depend on the input
    src = _write(tmp_path / "in.txt", lines)
    for chunk_lines in (3, 1000):
        out = tmp_path / f"out{chunk_lines}.txt"
        translate_stream(translator, str(src), str(out), chunk_lines=chunk_lines, batch_size=5)
        assert _read_out(out) == one_by_one


def test_beam_search_order_and_nbest_lists(translator):
    lines = _mixed_lines(30, seed=2)
    one_by_one = translator.translate_nbest(lines, 2, beam_size=3, batch_size=1)
    batched = translator.translate_nbest(lines, 2, beam_size=3, batch_size=30)
    for hyps, batched_hyps in zip(one_by_one, batched):  # same texts; scores to float noise
        assert [t for t, _ in batched_hyps] == [t for t, _ in hyps]
        assert [s for _, s in batched_hyps] == pytest.approx([s for _, s in hyps], abs=1e-4)
    best = translator.translate(lines, beam_size=3)
    for line, hyps, top in zip(lines, one_by_one, best):
        assert hyps[0][0] == top
        if line.strip():
            assert len(hyps) == 2 and hyps[0][1] >= hyps[1][1]
        else:
            assert hyps == [("", 0.0)]


def test_stdin_to_stdout(translator, monkeypatch, capsysbinary):
    lines = ["the cat sat", "", "w1\rw2", "w3 w4 w5"]
    data = "\n".join(lines).encode("utf-8")  # no final newline: the last line still counts
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    assert translate_stream(translator, "-", None) == 4
    out = capsysbinary.readouterr().out.decode("utf-8").split("\n")
    assert out[-1] == "" and out[:-1] == translator.translate(lines)


def test_leading_bom_is_dropped(translator, tmp_path):
    src = tmp_path / "bom.txt"
    src.write_bytes(b"\xef\xbb\xbfthe cat\nw1 w2\n")
    out = tmp_path / "out.txt"
    translate_stream(translator, str(src), str(out))
    assert _read_out(out) == translator.translate(["the cat", "w1 w2"])


def test_a_crlf_file_translates_as_its_lf_copy(translator, tmp_path):
    # the line rule of nmt.textio, the one training text is read by: "\r\n" ends a line, a
    # lone "\r" stays inside it (one line in, one line out)
    lines = ["the cat sat", "", "w1\rw2", "w3 w4 w5"]
    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes("".join(line + "\r\n" for line in lines).encode("utf-8"))
    translate_stream(translator, str(crlf), str(tmp_path / "out.txt"))
    assert _read_out(tmp_path / "out.txt") == translator.translate(lines)


def test_a_gzip_input_is_read_through_gzip(translator, tmp_path):
    lines = ["the cat sat", "", "w1 w2"]
    src = tmp_path / "in.txt.gz"
    src.write_bytes(gzip.compress("".join(line + "\n" for line in lines).encode("utf-8")))
    assert translate_stream(translator, str(src), str(tmp_path / "out.txt")) == 3
    assert _read_out(tmp_path / "out.txt") == translator.translate(lines)


def test_invalid_utf8_names_file_and_line(translator, tmp_path, monkeypatch):
    src = tmp_path / "bad.txt"
    src.write_bytes(b"the cat\nw1 w2\nw3 \xff\xfe w4\nw5\n")
    out = tmp_path / "out.txt"
    with pytest.raises(UsageError, match=r"bad\.txt: line 3: not valid UTF-8"):
        translate_stream(translator, str(src), str(out), chunk_lines=1)
    assert sorted(tmp_path.iterdir()) == [src]  # no output, no temporary file
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xc3\n")))
    with pytest.raises(UsageError, match=r"<stdin>: line 2"):
        translate_stream(translator, None, str(out))


def test_output_is_atomic_when_translation_fails(translator, tmp_path, monkeypatch):
    src = _write(tmp_path / "in.txt", _mixed_lines(50))
    out = tmp_path / "out.txt"
    out.write_text("previous complete file\n")
    calls = []
    real_run = Translator.run

    def failing_run(self, lines, settings, line_ids=None):
        calls.append(len(lines))
        if len(calls) == 3:
            raise RuntimeError("simulated failure mid-way")
        return real_run(self, lines, settings, line_ids)

    monkeypatch.setattr(Translator, "run", failing_run)
    with pytest.raises(RuntimeError, match="mid-way"):
        translate_stream(translator, str(src), str(out), chunk_lines=10)
    assert out.read_text() == "previous complete file\n"
    out.unlink()
    calls.clear()
    with pytest.raises(RuntimeError):
        translate_stream(translator, str(src), str(out), chunk_lines=10)
    assert sorted(tmp_path.iterdir()) == [src]


def test_outputs_never_contain_line_breaks(translator, tmp_path, monkeypatch):
    def decode_with_breaks(ids):
        return ["a\nb\r\nc\rd" for _ in ids]

    monkeypatch.setattr(translator.tokenizer, "decode_tgt", decode_with_breaks)
    assert translator.translate(["w1", "", "w2 w3"]) == ["a b  c d", "", "a b  c d"]
    src = _write(tmp_path / "in.txt", ["w1", "w2", "", "w3"])
    out = tmp_path / "out.txt"
    translate_stream(translator, str(src), str(out))
    assert len(_read_out(out)) == 4


def test_overlong_lines_warn_once_each_then_summarise(translator, capsys):
    lines = ["w1 " * 300] * (MAX_WARNINGS + 2) + ["w2"]
    hyps = translator.translate(lines)
    assert len(hyps) == len(lines) and all(hyps)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == MAX_WARNINGS + 1
    assert err[0].startswith("warning: line 1: ") and "truncated" in err[0]
    assert "not shown" in err[-1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beam_size": 0}, "search.beam_size: must be >= 1, found 0"),
        (
            {"n_best": 3, "beam_size": 2},
            r"search.n_best: must be <= search.beam_size \(2\), found 3",
        ),
        ({"n_best": 0}, "search.n_best: must be >= 1, found 0"),
        ({"batch_size": 0}, "batch_size"),
        ({"alpha": -1.0}, "search.alpha: must be >= 0.0, found -1.0"),
        ({"beam_size": "5"}, "search.beam_size: expected int, found str '5'"),
        ({"beam_size": 2, "chunk_lines": 0}, "chunk_lines"),
        ({"bogus": 1}, "search.bogus: unknown key; the keys are beam_size, n_best"),
        ({"bogus": 1, "alpha": -1.0}, "(?s)2 config problems.*search.bogus.*search.alpha"),
    ],
)
def test_bad_search_settings_are_usage_errors(translator, tmp_path, kwargs, message):
    src = _write(tmp_path / "in.txt", ["w1"])
    out = tmp_path / "out.txt"
    with pytest.raises(UsageError, match=message):
        translate_stream(translator, str(src), str(out), **kwargs)
    assert not out.exists()


def test_list_api_validates_too(translator):
    with pytest.raises(UsageError, match="beam_size"):
        translator.translate(["w1"], beam_size=0)
    with pytest.raises(UsageError, match="n_best"):
        translator.translate_nbest(["w1"], 4, beam_size=2)


def test_bad_device_and_missing_files(tiny_checkpoint, translator, tmp_path):
    with pytest.raises(UsageError, match="device 'tpu'"):
        Translator.from_checkpoint(tiny_checkpoint, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            Translator.from_checkpoint(tiny_checkpoint, device="cuda")
    with pytest.raises(UsageError, match="nope.txt: file not found"):
        translate_stream(translator, str(tmp_path / "nope.txt"), None)
    src = _write(tmp_path / "in.txt", ["w1"])
    with pytest.raises(UsageError, match="does not exist"):
        translate_stream(translator, str(src), str(tmp_path / "no" / "out.txt"))


def test_tokenizer_that_does_not_match_the_model_is_refused(
    tiny_checkpoint, tmp_path, parallel_text
):
    ckpt = checkpoint.load(tiny_checkpoint)
    src, tgt = parallel_text(200, seed=3)
    other = Tokenizer.train([src], [tgt], tmp_path / "spm", vocab_size=80)
    bad = tmp_path / "bad.pt"
    checkpoint.save(
        bad, config=ckpt["config"], model_state=ckpt["model"], tokenizer_bytes=other.to_bytes()
    )
    with pytest.raises(UsageError, match="sentencepiece model has 80 pieces"):
        Translator.from_checkpoint(bad, device="cpu")


def test_nbest_output_format(translator, tmp_path):
    lines = ["the cat sat", "", "w1 w2 w3", "   "]
    src = _write(tmp_path / "in.txt", lines)
    out = tmp_path / "out.txt"
    assert (
        translate_stream(translator, str(src), str(out), n_best=2, beam_size=3, chunk_lines=3) == 4
    )
    pattern = re.compile(r"^(\d+) \|\|\| (.*) \|\|\| (-?\d+\.\d{4})$")
    entries: dict[int, list] = {}
    for row in _read_out(out):
        match = pattern.match(row)
        assert match, row
        entries.setdefault(int(match[1]), []).append((match[2], float(match[3])))
    assert sorted(entries) == [0, 1, 2, 3]
    assert entries[1] == [("", 0.0)] and entries[3] == [("", 0.0)]
    nbest = translator.translate_nbest(lines, 2, beam_size=3)
    for i in (0, 2):
        assert [text for text, _ in entries[i]] == [text for text, _ in nbest[i]]
        assert entries[i][0][1] >= entries[i][1][1]


def test_cli_translate_in_process(tiny_checkpoint, tmp_path, capsys):
    src = _write(tmp_path / "in.txt", ["the cat", "", "w1 w2"])
    out = tmp_path / "out.txt"
    code = main(
        [
            "translate",
            str(tiny_checkpoint),
            "-i",
            str(src),
            "-o",
            str(out),
            "--device",
            "cpu",
            "--beam-size",
            "2",
        ]
    )
    assert code == 0 and len(_read_out(out)) == 3
    assert capsys.readouterr().err.startswith("precision: ")  # what the model computed in
    code = main(["translate", str(tiny_checkpoint), "-i", str(src), "--beam-size", "0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
