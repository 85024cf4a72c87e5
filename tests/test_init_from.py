"""`nmt train --init-from CKPT`: a new run from another run's weights, and its refusals.

Half A of a synthetic corpus uses the words w0..w19, half B the words w20..w39 (the same task,
reversal into upper case, over a vocabulary the first model has not seen as words). A model
trained on A is fine-tuned on B, encoded with A's tokenizer (`nmt prepare --tokenizer-from`).
"""

import json

import pytest
import torch
from helpers_training import WORDS, prepare_tiny, split_overrides, tiny, write_corpus

from nmt import checkpoint
from nmt.cli import main
from nmt.config import load_config
from nmt.training import Trainer, lr_factor


def _prepare_with_tokenizer_of(ckpt, folder, words) -> list[str]:
    """Half B's data folder, encoded with the checkpoint's own sentencepiece model
    (`nmt prepare --tokenizer-from CKPT`); returns its overrides."""
    train, valid = write_corpus(folder, 300, 1, words), write_corpus(folder, 20, 2, words)
    overrides = split_overrides(folder, train, valid)
    assert main(["prepare", "--tokenizer-from", str(ckpt), *overrides]) == 0
    return overrides


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """(half A's overrides, A's checkpoint, half B's overrides with A's tokenizer)."""
    a = prepare_tiny(tmp_path_factory.mktemp("half_a"), words=WORDS[:20])
    run_a = tmp_path_factory.mktemp("run_a") / "model"
    Trainer(load_config(None, tiny(a, run_a, "train.max_epochs=4"))).run()
    b = _prepare_with_tokenizer_of(run_a / "last.pt", tmp_path_factory.mktemp("half_b"), WORDS[20:])
    return a, run_a / "last.pt", b


def _valid_losses(out_dir) -> list[float]:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["type"] == "valid"]


def test_fine_tuning_on_half_b_improves_on_its_held_out_lines(halves, tmp_path):
    _, ckpt, b = halves
    source = checkpoint.load(ckpt)
    out = tmp_path / "fine"
    cfg = load_config(None, tiny(b, out, "train.max_epochs=2", "train.warmup_steps=10"))
    trainer = Trainer(cfg, init_from=ckpt)
    # a new run (step 0, a fresh optimizer) from the checkpoint's weights, A's tokenization
    assert trainer.state.step == 0 and trainer.optimizer.state_dict()["state"] == {}
    for name, weight in trainer.model.state_dict().items():
        assert torch.equal(weight, source["model"][name]), name
    before = trainer.validator(trainer.model)["loss"]  # A's model on B's held-out lines
    trainer.run()
    after = _valid_losses(out)
    print("valid loss on B: A's model", before, "fine-tuned", after)
    assert after[-1] < 0.8 * before, (before, after)
    # the same budget from scratch ends worse: the weights of A carry over
    scratch = tmp_path / "scratch"
    Trainer(
        load_config(None, tiny(b, scratch, "train.max_epochs=2", "train.warmup_steps=10"))
    ).run()
    print("from scratch", _valid_losses(scratch))
    assert after[-1] < _valid_losses(scratch)[-1]

    tuned = checkpoint.load(out / "last.pt")
    assert checkpoint.tokenizer_bytes(tuned) == checkpoint.tokenizer_bytes(source)
    assert tuned["train_state"]["init_from"] == str(ckpt)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[0] == {**records[0], "type": "init", "step": 0, "from": str(ckpt)}
    first = next(r for r in records if r["type"] == "train")  # the config's schedule, warming up
    expected_lr = cfg.train.lr * lr_factor(cfg, first["step"] + 1, trainer.total_steps)  # next
    assert first["lr"] == pytest.approx(expected_lr) and expected_lr < cfg.train.lr / 10


def _refused(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err, err
    return err


def test_init_from_refusals_through_the_cli(halves, tmp_path, capsys):
    _, ckpt, b = halves
    out = tmp_path / "run"
    train = ["train", "--init-from", str(ckpt)]
    err = _refused([*train, *tiny(b, out, "model.hidden=48")], capsys)
    assert f"{ckpt}: the model config changes weight" in err
    assert "weight decoder.attention.bias from shape (32,) (checkpoint) to (48,) (config)" in err
    (tmp_path / "own").mkdir()
    other = prepare_tiny(tmp_path / "own", words=WORDS[20:])  # half B with a tokenizer of its own
    err = _refused([*train, *tiny(other, out)], capsys)
    assert f"{ckpt}: its tokenizer is not the one in data.dir" in err and "--tokenizer-from" in err
    err = _refused([*train, "--resume", *tiny(b, out)], capsys)
    assert "--init-from starts a new run and --resume continues one" in err
    err = _refused(["train", "--init-from", str(tmp_path / "nope.pt"), *tiny(b, out)], capsys)
    assert "nope.pt: checkpoint not found" in err
    (tmp_path / "notes.pt").write_text("not a checkpoint\n")
    err = _refused(["train", "--init-from", str(tmp_path / "notes.pt"), *tiny(b, out)], capsys)
    assert "notes.pt: not a readable nmt checkpoint" in err
    assert not (out / "last.pt").exists()
