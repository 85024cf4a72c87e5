"""The run log: log.jsonl is one continuous record across resumes; TensorBoard mirrors it."""

import json
import sys
import time

import pytest
import torch
from helpers_training import prepare_tiny, tiny

from nmt.cli import main
from nmt.config import load_config
from nmt.optimization import StepResult
from nmt.runlog import Window
from nmt.training import Stop, Trainer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("corpus"))


def _records(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_a_resumed_run_logs_one_continuous_curve(prepared, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, tiny(prepared, out, "train.valid_every=3"))
    trainer = Trainer(cfg)
    original = Trainer._optimizer_step

    def stop_at_5(self, batches):
        original(self, batches)
        if self.state.step == 5:
            self.signals.received = Stop.SIGINT

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_at_5)
    assert trainer.run()["stop"] == Stop.SIGINT
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    before = len(_records(out))
    Trainer(cfg, resume=True).run()
    records = [r for r in _records(out) if r["type"] in ("train", "valid")]
    assert len(records) > before > 2
    for r in records:
        assert {"step", "time", "train_seconds"} <= r.keys(), r
    # against steps and against training time alike, the resumed run goes on where it stopped
    for kind in ("train", "valid"):
        steps = [r["step"] for r in records if r["type"] == kind]
        seconds = [r["train_seconds"] for r in records if r["type"] == kind]
        assert steps == sorted(set(steps)) and seconds == sorted(seconds), kind
    first_after = _records(out)[before]
    assert first_after["train_seconds"] >= max(r["train_seconds"] for r in records[:before])


def test_the_throughput_leaves_out_the_time_spent_paused():
    now = [0.0]
    window = Window(clock=lambda: now[0])
    figures = torch.tensor([30.0, 20.0, 1.0])
    window.add(1, StepResult(figures, tgt_tokens=300, src_tokens=200))
    now[0] += 1.0  # the step
    with window.paused():  # a validation, with a checkpoint write inside it
        now[0] += 50.0
        with window.paused():
            now[0] += 20.0
    window.add(2, StepResult(figures, tgt_tokens=300, src_tokens=200))
    now[0] += 1.0
    window.drain()
    record = window.record(2, 1, 60.0, 40.0, 1e-3, None)
    assert record["tgt_tok_s"] == pytest.approx(600 / 2.0)  # not 600 / 72
    assert record["src_tgt_tok_s"] == pytest.approx(1000 / 2.0)
    window.reset()  # the next window starts with nothing paused
    window.add(3, StepResult(figures, tgt_tokens=300, src_tokens=200))
    now[0] += 3.0
    window.drain()
    assert window.record(3, 1, 30.0, 20.0, 1e-3, None)["tgt_tok_s"] == pytest.approx(100.0)


def test_validations_and_checkpoint_writes_do_not_count_as_training_time(prepared, tmp_path):
    """Each validation and checkpoint write here takes 1,000 s by the window's clock: a window
    holding one would log fewer than one token a second if they counted."""
    out = tmp_path / "run"
    extra = ("train.valid_every=3", "train.save_every=2", "train.log_every=1")
    trainer = Trainer(load_config(None, tiny(prepared, out, *extra)))
    late = [0.0]
    trainer.window.clock = lambda: time.perf_counter() + late[0]
    trainer.window.reset()
    validate, save = trainer.validator, trainer.save

    def slow(work):
        def run(*args, **kwargs):
            late[0] += 1000.0
            return work(*args, **kwargs)

        return run

    trainer.validator, trainer.save = slow(validate), slow(save)
    trainer.run()
    records = _records(out)
    assert any(r["type"] == "valid" for r in records)
    train = [r for r in records if r["type"] == "train"]
    assert len(train) > 6
    assert min(r["tgt_tok_s"] for r in train) > 10, train


def test_tensorboard_gets_the_scalars_of_the_log(prepared, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    extra = ("train.tensorboard=true", "train.save_every=4", "train.average_last=2")
    assert main(["train", *tiny(prepared, out, *extra)]) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [r for r in _records(out) if r["type"] in ("train", "valid", "average")]
    expected = {}
    for r in records:
        for key, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if key not in ("step", "time"):
                    expected.setdefault(f"{r['type']}/{key}", []).append((r["step"], value))
    assert {"train/loss", "train/lr", "valid/loss", "valid/bleu", "average/loss"} <= set(expected)
    assert set(events.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_asked_for_but_missing_is_one_usage_error(
    prepared, tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import raises
    out = tmp_path / "run"
    assert main(["train", *tiny(prepared, out, "train.tensorboard=true")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert "train.tensorboard=true needs the tensorboard package" in err
    assert not out.exists()  # refused before anything was written
