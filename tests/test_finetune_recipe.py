"""recipes/finetune_tatoeba.py: its fixed split rule, and the recipe through every stage.

- The split (fast, synthetic files): the counts, held-out and validation pairs at the rule's
  indices, no held-out or validation sentence left in training (in either language), the same
  files from run to run and for either direction.
- The recipe end to end (`slow`; the Tatoeba and Multi30k files from the corpus mirror, skipped
  without it) on a tiny checkpoint built here (a sentencepiece model learned from Multi30k text,
  random weights): the data is encoded with the checkpoint's own tokenizer, training starts
  from its weights, "before" is the checkpoint's translation and "after" the fine-tuned
  model's, and scores.json holds sacreBLEU's figures for those files.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import need_mirror

from nmt import checkpoint
from nmt.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def _recipe():
    spec = importlib.util.spec_from_file_location(
        "recipe_finetune_tatoeba", ROOT / "recipes/finetune_tatoeba.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


recipe = _recipe()


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]  # every line ends with "\n"


# ------------------------------------------------------------------ the split rule
def test_the_rule_spreads_the_held_out_pairs_over_the_whole_file():
    held_out, valid = recipe.split_indices(17_565, 2000, 500)  # Tatoeba v2021-08-07
    assert len(set(held_out)) == 2000 and len(set(valid)) == 500
    assert not set(held_out) & set(valid)
    assert held_out[:3] == [7, 16, 25] and held_out[-1] == 17_564  # the last pair included
    assert {b - a for a, b in zip(held_out, held_out[1:])} == {8, 9}  # 17,565 / 2,000 = 8.8
    assert valid[:2] == [33, 68] and valid[-1] == 17_563
    assert valid == sorted(valid) and held_out == sorted(held_out)
    # 10 pairs, 3 held out: 10//3-1, 20//3-1, 30//3-1 = 2, 5, 9; 2 validation pairs of the 7
    # others (0, 1, 3, 4, 6, 7, 8): positions 7//2-1, 14//2-1 = 2, 6, i.e. pairs 3 and 8
    assert recipe.split_indices(10, 3, 2) == ([2, 5, 9], [3, 8])
    with pytest.raises(UsageError, match="leave no training pairs of 10"):
        recipe.split_indices(10, 6, 4)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _synthetic(folder: Path) -> dict:
    """100 pairs; training pairs 0, 1 and 2 repeat a sentence of a held-out or validation pair
    (with another translation beside it)."""
    de = [f"Satz {i}." for i in range(100)]
    en = [f"Sentence {i}." for i in range(100)]
    # held out: 9, 19, ..., 99; validation: of the other 90, positions 17, 35, ... = 18, 38, ...
    # (see the first test's worked example)
    en[0] = en[9]  # a held-out English sentence, another German one
    de[1] = de[19]  # a held-out German sentence
    de[2] = de[38]  # a validation German sentence
    folder.mkdir(parents=True, exist_ok=True)
    return {"de": _write(folder / "all.de", de), "en": _write(folder / "all.en", en)}


def test_the_split_files_follow_the_rule_and_training_never_sees_a_held_out_sentence(tmp_path):
    files = _synthetic(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    counts = recipe.split_pairs(files, out, 10, 5)
    assert counts == {
        "pairs": 100,
        "heldout": 10,
        "valid": 5,
        "train": 82,
        "train_dropped_as_held_out": 3,
    }
    held_out, valid = recipe.split_indices(100, 10, 5)
    assert held_out == list(range(9, 100, 10)) and valid == [18, 38, 58, 78, 98]
    train = [i for i in range(100) if i not in {*held_out, *valid, 0, 1, 2}]
    for lang, path in files.items():
        text = _lines(path)
        assert _lines(out / f"heldout.{lang}") == [text[i] for i in held_out]
        assert _lines(out / f"valid.{lang}") == [text[i] for i in valid]
        assert _lines(out / f"train.{lang}") == [text[i] for i in train]
        trained = set(_lines(out / f"train.{lang}"))
        assert not trained & set(_lines(out / f"heldout.{lang}") + _lines(out / f"valid.{lang}"))


def test_the_split_is_the_same_every_time_and_for_either_direction(tmp_path):
    files = _synthetic(tmp_path / "in")
    outputs = []
    for name, order in (("a", ("de", "en")), ("b", ("de", "en")), ("c", ("en", "de"))):
        (tmp_path / name).mkdir()
        recipe.split_pairs({lang: files[lang] for lang in order}, tmp_path / name, 10, 5)
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())})
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1] == outputs[2]


def test_split_refuses_files_of_different_lengths(tmp_path):
    de = _write(tmp_path / "x.de", ["a"] * 20)
    en = _write(tmp_path / "x.en", ["b"] * 19)
    with pytest.raises(UsageError, match="x.de has 20 lines but .*x.en has 19"):
        recipe.split_pairs({"de": de, "en": en}, tmp_path, 2, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.de", "x.en"]


# ------------------------------------------------------------------ the recipe, every stage
@pytest.fixture
def mirror(monkeypatch, tmp_path) -> Path:
    """The corpus mirror holding tatoeba_test_de_en/ and multi30k/ (skipped without one)."""
    folder = need_mirror("tatoeba_test_de_en", "multi30k")
    monkeypatch.setenv("NMT_MIRROR", str(folder))
    monkeypatch.setenv("NMT_CACHE", str(tmp_path / "cache"))
    return folder


def _tiny_checkpoint(mirror: Path, folder: Path) -> Path:
    """An en→de GNMT checkpoint with random weights and a 400-piece sentencepiece model learned
    from the first 3,000 Multi30k training pairs: Tatoeba's text is real text to it."""
    import gzip

    from nmt.config import Config
    from nmt.models import build_model_for
    from nmt.tokenizer import Tokenizer

    folder.mkdir()
    raw = mirror / "multi30k/data/task1/raw"
    for lang in ("en", "de"):
        text = gzip.decompress((raw / f"train.{lang}.gz").read_bytes()).decode("utf-8")
        _write(folder / f"train.{lang}", text.split("\n")[:3000])
    tok = Tokenizer.train(
        [folder / "train.en"], [folder / "train.de"], folder / "spm", vocab_size=400
    )
    cfg = Config()
    cfg.tokenizer.vocab_size = 400
    m = cfg.model
    m.emb_dim, m.hidden, m.bi_hidden, m.enc_layers, m.dec_layers = 16, 16, 8, 1, 2
    cfg.train.max_tokens = 1000
    torch.manual_seed(0)
    path = folder / "tiny.pt"
    checkpoint.save(
        path,
        config=cfg.to_dict(),
        model_state=build_model_for(m, tok).state_dict(),
        tokenizer_bytes=tok.to_bytes(),
    )
    return path


@pytest.mark.slow
def test_the_recipe_fine_tunes_the_checkpoint_and_scores_before_and_after(mirror, tmp_path, capsys):
    from nmt.evaluation import score_files
    from nmt.tokenizer import Tokenizer
    from nmt.translator import Translator

    ckpt = _tiny_checkpoint(mirror, tmp_path / "ckpt")
    run = tmp_path / "run"
    argv = ["--from", str(ckpt), "--run-dir", str(run), "--beam-size", "2"]
    argv += ["--heldout-pairs", "200", "--valid-pairs", "50"]
    steps = ["train.max_steps=4", "train.valid_every=2", "train.valid_bleu=false"]
    steps += ["train.lr=0.01", "train.warmup_steps=0", "train.device=cpu", "train.threads=1"]
    search = ["search.max_len_a=0.5", "search.max_len_b=4"]  # random weights: short outputs
    assert recipe.main([*argv, *steps, *search]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in (run / ".done").iterdir()) == sorted(recipe.STAGES)

    # split: the rule's counts of the 17,565 pairs; the held-out lines never in training
    split = json.loads((run / "raw/split.json").read_text())
    assert (split["pairs"], split["heldout"], split["valid"]) == (17_565, 200, 50)
    assert split["train"] + split["train_dropped_as_held_out"] == 17_565 - 250
    assert len(_lines(run / "raw/train.en")) == split["train"]
    assert not set(_lines(run / "raw/heldout.en")) & set(_lines(run / "raw/train.en"))

    # prepare and train: the checkpoint's tokenizer byte for byte, a new run from its weights
    # with the checkpoint's model and finetune.yaml's schedule under the command line's
    original = checkpoint.load(ckpt)
    assert Tokenizer.load(run / "data").to_bytes() == checkpoint.tokenizer_bytes(original)
    last = checkpoint.load(run / "model/last.pt")
    assert last["train_state"]["step"] == 4 and last["train_state"]["init_from"] == str(ckpt)
    assert last["config"]["model"] == original["config"]["model"]
    assert last["config"]["train"]["save_every"] == 0  # finetune.yaml's
    assert last["config"]["train"]["max_tokens"] == 1000  # the checkpoint's
    records = [json.loads(line) for line in _lines(run / "model/log.jsonl")]
    assert {"type": "init", "step": 0, "from": str(ckpt)}.items() <= records[0].items()
    best = checkpoint.load(run / "model/best.pt")["model"]
    assert any(not torch.equal(best[k], original["model"][k]) for k in best)

    # translate: "before" is the checkpoint's output, "after" the fine-tuned model's
    src = _lines(run / "raw/heldout.en")
    hyps = {m: _lines(run / f"hyps/tatoeba_heldout.{m}.beam2.de") for m in ("before", "after")}
    for model, path in (("before", ckpt), ("after", run / "model/best.pt")):
        translator = Translator.from_checkpoint(path, "cpu", dtype="float32")
        assert translator.translate(src, beam_size=2, max_len_a=0.5, max_len_b=4) == hyps[model]
    assert hyps["before"] != hyps["after"]
    assert len(_lines(run / "hyps/test_2016_flickr.after.beam2.de")) == 1000

    # score: sacreBLEU's figures for those files, in one table
    scores = json.loads((run / "scores.json").read_text())
    assert (scores["before"], scores["after"]) == (str(ckpt), str(run / "model/best.pt"))
    assert [(r["test"], r["lines"]) for r in scores["rows"]] == [
        ("tatoeba_heldout", 200),
        ("test_2016_flickr", 1000),
    ]
    refs = {
        "tatoeba_heldout": run / "raw/heldout.de",
        "test_2016_flickr": run / "raw/test_2016_flickr.de",
    }
    for row in scores["rows"]:
        for model in ("before", "after"):
            hyp = run / f"hyps/{row['test']}.{model}.beam2.de"
            alone = score_files(str(hyp), [str(refs[row["test"]])])
            assert row[model] == {"bleu": alone["bleu"]["score"], "chrf": alone["chrf"]["score"]}
    assert scores["signature"]["bleu"].startswith("nrefs:1|case:mixed")
    assert "Fine-tuning on Tatoeba en→de" in printed and "nmt translate" in printed
