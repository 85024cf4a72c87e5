"""The hub-data recipes (WMT16, WMT14, IWSLT14) and the Multi30k recipe, offline.

Training text comes from a local folder shaped like the hub dataset (see test_hub_data.py), the
test and validation sets from the shared mirror (NMT_MIRROR), so the download code is the one
that runs online. Each recipe is run through its `main(argv)`, as from the command line.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import datasets
import pytest
from conftest import SHARED_CORPORA, WORDS, need_mirror
from helpers_pictures import assert_picture
from test_hub_data import make_hub_folder, use_local_hub

from nmt import corpora, data

REPO = Path(__file__).resolve().parents[1]
TINY = """
tokenizer: {vocab_size: 100, input_sentence_size: 0}
model: {emb_dim: 16, hidden: 16, bi_hidden: 8, enc_layers: 1, dec_layers: 2}
train: {max_tokens: 400, max_epochs: 1, max_steps: 3, valid_bleu: false, device: cpu, threads: 1}
search: {beam_size: 1, max_len_a: 0.5, max_len_b: 3, batch_size: 128}
"""


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    # every test: no hub, no internet (the mirror, present or not, stands for the network)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(corpora.MIRROR_ENV, str(SHARED_CORPORA))
    monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def mirror():
    """Skips a test that reads corpus files when the shared mirror is absent."""
    need_mirror("opus-mt-testsets", "multi30k", "iwslt14_de_en")


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(2, 9))
        rows.append({"de": " ".join(words), "en": " ".join(reversed(words)).upper()})
    return rows


@pytest.fixture
def tiny_config(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _markers(run: Path) -> list[str]:
    return sorted(p.name for p in (run / ".done").iterdir())


def test_stages_skip_what_is_done_and_redo_from_the_start_stage(
    mirror, tmp_path, monkeypatch, capsys, tiny_config
):
    hub = make_hub_folder(tmp_path / "hub", {"train": pairs(300, 1), "validation": pairs(30, 2)})
    use_local_hub(monkeypatch, "iwslt14", hub)
    run = tmp_path / "run"
    iwslt = recipe("iwslt14_de_en")
    argv = ["--run-dir", str(run), "--config", str(tiny_config), "--test-sets", "tst2011"]

    assert iwslt.main([*argv, "--end-stage", "encode"]) == 0
    assert _markers(run) == ["download", "encode", "tokenizer"]
    assert len(_lines(run / "raw/train.de")) == 300 and len(_lines(run / "raw/valid.en")) == 30
    assert len(_lines(run / "raw/tst2011.de")) == 1433
    assert 0 < len(data.load_split(run / "data", "train")) <= 300
    assert len(data.load_split(run / "data", "valid")) <= 30
    spm_time = (run / "data/spm.model").stat().st_mtime_ns
    capsys.readouterr()

    assert iwslt.main([*argv, "--end-stage", "encode"]) == 0  # all done: nothing runs
    err = capsys.readouterr().err
    assert err.count("done already, skipped") == 3 and "[encode] ..." not in err

    assert iwslt.main([*argv, "--start-stage", "encode", "--end-stage", "encode"]) == 0
    err = capsys.readouterr().err
    assert "[tokenizer] done already, skipped" in err and "[encode] done in" in err
    assert (run / "data/spm.model").stat().st_mtime_ns == spm_time  # encode keeps it

    redo_download = ["--start-stage", "download", "--end-stage", "download"]
    assert iwslt.main([*argv, *redo_download]) == 0  # redone, but the finished export is kept
    err = capsys.readouterr().err
    assert "[download] done in" in err and "iwslt14 train: kept" in err
    assert "iwslt14 validation: kept" in err


def test_a_failing_stage_writes_no_marker_and_a_rerun_continues(
    mirror, tmp_path, monkeypatch, capsys
):
    hub = make_hub_folder(tmp_path / "hub", {"train": pairs(50, 1)})  # no validation split
    use_local_hub(monkeypatch, "iwslt14", hub)
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--test-sets", "tst2012", "--end-stage", "download"]
    iwslt = recipe("iwslt14_de_en")
    assert iwslt.main(argv) == 1
    assert "error: iwslt14: cannot load split 'validation'" in capsys.readouterr().err
    assert _markers(run) == []
    assert (run / "raw/train.en").exists() and not (run / "raw/valid.en").exists()

    make_hub_folder(hub, {"train": pairs(50, 1), "validation": pairs(5, 2)})
    assert iwslt.main(argv) == 0
    assert "iwslt14 train: kept" in capsys.readouterr().err  # finished exports are not redone
    assert _markers(run) == ["download"]
    assert len(_lines(run / "raw/valid.de")) == 5


@pytest.mark.parametrize(
    ("name", "valid_sets"),
    [("wmt16_en_de", ["newstest2013"]), ("wmt14_en_de", ["newstest2012", "newstest2013"])],
)
def test_wmt_recipes_validate_on_newstest_and_test_on_2014(
    mirror, tmp_path, monkeypatch, name, valid_sets
):
    hub = make_hub_folder(tmp_path / "hub", {"train": pairs(20, 1)})
    use_local_hub(monkeypatch, name[:5], hub)
    run = tmp_path / "run"
    assert recipe(name).main(["--run-dir", str(run), "--end-stage", "download"]) == 0
    assert _lines(run / "raw/train.en") == [p["en"] for p in pairs(20, 1)]
    expected = []
    for split in valid_sets:  # the validation file is the sets one after the other
        expected += _lines(run / "raw/en-de" / f"{split}.de")
    assert _lines(run / "raw/valid.de") == expected
    assert len(expected) == {"wmt16_en_de": 3000, "wmt14_en_de": 3003 + 3000}[name]
    assert len(_lines(run / "raw/en-de/newstest2014.en")) == 3003
    assert _markers(run) == ["download"]


def test_the_language_pair_is_a_parameter(mirror, tmp_path, monkeypatch):
    use_local_hub(monkeypatch, "wmt16", make_hub_folder(tmp_path / "hub", {"train": pairs(5, 1)}))
    run = tmp_path / "run"
    argv = ["--src", "de", "--tgt", "en", "--run-dir", str(run), "--end-stage", "download"]
    wmt16 = recipe("wmt16_en_de")
    assert wmt16.main(argv) == 0
    assert _lines(run / "raw/train.de") == [p["de"] for p in pairs(5, 1)]
    assert len(_lines(run / "raw/de-en/newstest2014.de")) == 3003
    cfg = sys.modules["_common"].hub_recipe(wmt16.SETUP, wmt16.__doc__, argv).config()
    assert (cfg.data.src_lang, cfg.data.tgt_lang, cfg.data.corpus) == ("de", "en", "wmt16")
    assert cfg.data.valid_src == f"{run}/raw/valid.de" and cfg.model.hidden == 1024  # gnmt_v2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--src", "fr"], "--src and --tgt must be two of de, en, found fr and de"),
        (["--tgt", "en"], "found en and en"),
        (
            ["--test-sets", "newstest2041"],
            "unknown test set newstest2041; test sets: news-test2008",
        ),
        (["--start-stage", "train", "--end-stage", "download"], "comes before --start-stage train"),
        (["train.lr=fast"], "train.lr: expected float, found str 'fast'"),
        (["--config", "nope.yaml"], "nope.yaml: config file not found"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    assert recipe("wmt16_en_de").main(["--run-dir", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (run / "raw").exists()


def _mark_done(run: Path, stages) -> None:
    (run / ".done").mkdir(parents=True, exist_ok=True)
    for stage in stages:
        (run / ".done" / stage).write_text("0\n")


def test_score_gives_cased_and_lowercased_intl_bleu(mirror, tmp_path):
    run = tmp_path / "run"
    _mark_done(run, ["download", "tokenizer", "encode", "train", "translate"])
    refs = corpora.download("iwslt14", ["de", "en"], run / "raw", splits=["tst2011"])
    ref_lines = _lines(refs["tst2011"]["en"])
    hyp = run / "hyps" / "tst2011.beam5.en"
    hyp.parent.mkdir(parents=True)
    argv = ["--run-dir", str(run), "--test-sets", "tst2011", "--beam-sizes", "5"]
    argv += ["--start-stage", "score"]
    iwslt = recipe("iwslt14_de_en")

    hyp.write_text("".join(line + "\n" for line in ref_lines), encoding="utf-8")
    assert iwslt.main(argv) == 0
    (row,) = json.loads((run / "scores.json").read_text())
    assert (row["test"], row["beam"]) == ("tst2011", 5)
    assert row["bleu"] == pytest.approx(100) and row["bleu_lc_intl"] == pytest.approx(100)
    assert "case:mixed" in row["signature"] and "tok:13a" in row["signature"]
    assert "case:lc" in row["signature_lc_intl"] and "tok:intl" in row["signature_lc_intl"]

    hyp.write_text("".join(line.upper() + "\n" for line in ref_lines), encoding="utf-8")
    assert iwslt.main(argv) == 0
    (row,) = json.loads((run / "scores.json").read_text())
    assert row["bleu_lc_intl"] == pytest.approx(100) and row["bleu"] < 20  # only case differs


def test_training_draws_the_learning_curves(mirror, tmp_path, monkeypatch, capsys, tiny_config):
    hub = make_hub_folder(tmp_path / "hub", {"train": pairs(300, 1), "validation": pairs(30, 2)})
    use_local_hub(monkeypatch, "iwslt14", hub)
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--config", str(tiny_config), "--test-sets", "tst2011"]
    assert recipe("iwslt14_de_en").main([*argv, "--end-stage", "train", "train.log_every=1"]) == 0
    assert f"learning curves: {run / 'curves.png'}" in capsys.readouterr().err
    assert_picture(run / "curves.png", 800, 600)


def test_the_score_stage_shows_five_sentences_the_curves_and_then_the_hint(
    mirror, tmp_path, capsys
):
    run = tmp_path / "run"
    _mark_done(run, ["download", "tokenizer", "encode", "train", "translate"])
    files = corpora.download("iwslt14", ["de", "en"], run / "raw", splits=["tst2011"])
    (run / "hyps").mkdir()
    for beam in (1, 5):  # the hypotheses: the references, marked with their beam
        hyps = [f"{line} (beam {beam})" for line in _lines(files["tst2011"]["en"])]
        (run / "hyps" / f"tst2011.beam{beam}.en").write_text("\n".join(hyps) + "\n")
    (run / "curves.png").write_bytes(b"drawn by the train stage")
    argv = ["--run-dir", str(run), "--test-sets", "tst2011", "--beam-sizes", "1", "5"]
    assert recipe("iwslt14_de_en").main([*argv, "--start-stage", "score"]) == 0
    out = capsys.readouterr().out.splitlines()
    sources, refs = _lines(files["tst2011"]["de"]), _lines(files["tst2011"]["en"])
    start = out.index("5 sentences of tst2011 (beam 5):")
    shown = [line.split(None, 1) for line in out[start + 1 :] if line.startswith("  ")][:15]
    assert [label for label, _ in shown] == ["source", "translation", "reference"] * 5
    picks = [k * len(sources) // 5 for k in range(5)]  # spread over the test set
    assert [text for _, text in shown[0::3]] == [sources[i] for i in picks]
    assert [text for _, text in shown[1::3]] == [f"{refs[i]} (beam 5)" for i in picks]
    assert [text for _, text in shown[2::3]] == [refs[i] for i in picks]
    curves = [line for line in out if line.startswith("Learning curves: ")]
    assert len(curves) == 1 and Path(curves[0].split(": ", 1)[1]).resolve() == run / "curves.png"
    assert out.index(curves[0]) > start and out[-2] == "Translate your own file with this model:"


def test_multi30k_recipe_keeps_its_layout(mirror, tmp_path):
    run = tmp_path / "run"
    m30k = recipe("multi30k")
    assert m30k.main(["--run-dir", str(run), "--end-stage", "download"]) == 0
    assert len(_lines(run / "raw/train.en")) == 29000 and len(_lines(run / "raw/val.de")) == 1014
    assert (run / "raw/test_2017_mscoco.de").is_file()
    args = m30k._parse(["--run-dir", str(run), "--preset", "demo"])
    cfg = m30k.Multi30k(args).config()
    assert cfg.data.valid_src == f"{run}/raw/val.en" and cfg.data.corpus == "multi30k"
    assert m30k.Multi30k(args).beams == [5] and m30k.Multi30k(m30k._parse([])).beams == [1, 5]
    assert m30k.Multi30k(args).test_sets == ["test_2016_flickr"]  # the demo keeps to its minutes
    assert len(m30k.Multi30k(m30k._parse([])).test_sets) == 3
    assert cfg.train.max_minutes > 0  # a time budget, not an epoch count


def test_the_closing_hint_is_one_line_that_runs_from_the_current_folder(
    tmp_path, monkeypatch, capsys
):
    run = tmp_path / ("a_long_folder_name_" * 5) / "run"  # longer than a terminal line
    (run / "model").mkdir(parents=True)
    (run / "model/best.pt").touch()
    monkeypatch.chdir(tmp_path)
    m30k = recipe("multi30k")
    m30k.Multi30k(m30k._parse(["--run-dir", str(run)]))._print_table([])
    out = capsys.readouterr().out.splitlines()
    assert out[-2] == "Translate your own file with this model:"
    nmt, subcommand, model, *rest = out[-1].split()
    assert Path(nmt).resolve() == Path(sys.executable).with_name("nmt").resolve()
    assert subcommand == "translate" and rest == ["-i", "FILE", "-o", "OUT"]
    assert Path(model).resolve() == (run / "model/best.pt").resolve()


@pytest.mark.slow
def test_iwslt14_recipe_end_to_end(mirror, tmp_path, monkeypatch, tiny_config):
    hub = make_hub_folder(tmp_path / "hub", {"train": pairs(300, 1), "validation": pairs(30, 2)})
    use_local_hub(monkeypatch, "iwslt14", hub)
    run = tmp_path / "run"
    argv = ["--run-dir", str(run), "--config", str(tiny_config), "--test-sets", "dev2010"]
    assert recipe("iwslt14_de_en").main([*argv, "--beam-sizes", "1", "2"]) == 0
    assert _markers(run) == sorted(sys.modules["_common"].HubRecipe.stages)
    rows = json.loads((run / "scores.json").read_text())
    assert [(r["test"], r["beam"]) for r in rows] == [("dev2010", 1), ("dev2010", 2)]
    for beam in (1, 2):
        assert len(_lines(run / f"hyps/dev2010.beam{beam}.en")) == 887
    assert all(0 <= r["bleu"] <= 100 and 0 <= r["bleu_lc_intl"] <= 100 for r in rows)


def test_overrides_work_in_any_position_with_the_real_recipe_parsers(tmp_path, capsys):
    # after a list option they used to be read as its values: "invalid int value: 'train...'"
    m30k = recipe("multi30k")
    argv = [
        "--beam-sizes",
        "1",
        "5",
        "train.max_minutes=5",
        "--preset",
        "demo",
        "model.dropout=0.3",
    ]
    args = m30k._parse(["--run-dir", str(tmp_path / "run"), *argv])
    assert args.beam_sizes == [1, 5] and args.preset == "demo"
    cfg = m30k.Multi30k(args).config()
    assert (cfg.train.max_minutes, cfg.model.dropout) == (5, 0.3)

    wmt16 = recipe("wmt16_en_de")
    argv = ["--test-sets", "newstest2014", "train.lr=0.5", "--beam-sizes", "2", "model.hidden=64"]
    built = sys.modules["_common"].hub_recipe(wmt16.SETUP, wmt16.__doc__, argv)
    assert built.test_sets == ["newstest2014"] and built.beams == [2]
    assert (built.config().train.lr, built.config().model.hidden) == (0.5, 64)

    # through main: a bad value given after a list option is the config's one clear error
    run = tmp_path / "run2"
    assert m30k.main(["--run-dir", str(run), "--beam-sizes", "1", "5", "train.lr=fast"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: expected float, found str 'fast'" in err and "--beam-sizes" not in err
