"""Learning curves: finding runs, reading logs into continuous series (resumes joined, pauses
left out), and the picture (opened and checked for size and content, never pixel by pixel)."""

import json

import pytest
from helpers_pictures import assert_picture
from helpers_training import prepare_tiny, tiny

from nmt import plots
from nmt.cli import main
from nmt.errors import UsageError


def _train(step, time, loss, lr=1e-3, **extra):
    return {
        "type": "train",
        "step": step,
        "epoch": 1,
        "loss": loss,
        "lr": lr,
        "time": time,
        **extra,
    }


def _valid(step, time, loss, bleu, seconds=4.0, **extra):
    record = {"type": "valid", "step": step, "loss": loss, "bleu": bleu, "seconds": seconds}
    return {**record, "time": time, **extra}


def _write_log(folder, records, extra_lines=()):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    (folder / "log.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder / "log.jsonl"


# A run at 1 s per step, stopped after step 40 (its last checkpoint was step 30), resumed 80
# minutes later: the resumed process logs step 40 again, then goes on.
RESUMED = [
    _train(10, 100.0, 5.0),
    _train(20, 110.0, 4.0),
    _train(30, 120.0, 3.5),
    _valid(30, 125.0, 3.6, 10.0),
    _train(40, 130.0, 3.3),
    _train(40, 5000.0, 3.2),  # the resumed process: from here its records count
    _train(50, 5010.0, 3.0),
    _valid(50, 5015.0, 3.1, 20.0),
    _train(60, 5020.0, 2.9),
]


def test_a_resumed_run_is_one_curve_and_its_pause_is_left_out(tmp_path, capsys):
    log = _write_log(tmp_path / "run", RESUMED, extra_lines=['{"type": "train", "step": 7'])
    run = plots.read_run("run", log)
    assert [r["step"] for r in run.train] == [10, 20, 30, 40, 50, 60]
    assert [r["loss"] for r in run.train][3] == 3.2  # the resumed process's step 40
    assert [r["step"] for r in run.valid] == [30, 50]
    # 1 s per step (the median pace), the steps before the first record included; a
    # validation counts its gap, the 80-minute pause counts nothing
    assert [r["wall"] for r in run.train] == [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]
    assert [r["wall"] for r in run.valid] == [35.0, 55.0]
    assert "skipped 1 unreadable line(s): 10" in capsys.readouterr().err


def test_train_seconds_are_the_time_axis_when_every_record_has_them(tmp_path):
    records = [
        _train(10, 100.0, 5.0, train_seconds=12.5),
        _valid(10, 9000.0, 4.0, 5.0, train_seconds=20.0),
        _train(20, 9001.0, 4.0, train_seconds=31.0),
    ]
    run = plots.read_run("r", _write_log(tmp_path / "r", records))
    assert [r["wall"] for r in run.train + run.valid] == [12.5, 31.0, 20.0]


def test_runs_are_found_in_a_run_folder_a_recipe_folder_or_a_parent(tmp_path):
    _write_log(tmp_path / "a", RESUMED)  # a training folder
    _write_log(tmp_path / "b" / "model", RESUMED)  # a recipe's run folder
    (tmp_path / "c").mkdir()  # no log: ignored
    assert plots.find_logs(tmp_path / "a") == [("a", tmp_path / "a" / "log.jsonl")]
    assert plots.find_logs(tmp_path / "b") == [("b", tmp_path / "b" / "model" / "log.jsonl")]
    assert plots.find_logs(tmp_path) == [
        ("a", tmp_path / "a" / "log.jsonl"),
        ("b", tmp_path / "b" / "model" / "log.jsonl"),
    ]
    log = tmp_path / "a" / "log.jsonl"
    assert plots.find_logs(log) == [("a", log)]
    with pytest.raises(UsageError, match="no log.jsonl found"):
        plots.find_logs(tmp_path / "c")
    with pytest.raises(UsageError, match="no such folder"):
        plots.find_logs(tmp_path / "missing")
    _write_log(tmp_path / "d", [_valid(10, 1.0, 3.0, 1.0)])
    with pytest.raises(UsageError, match="no training records yet"):
        plots.read_run("d", tmp_path / "d" / "log.jsonl")


def test_curves_of_several_runs_and_of_a_log_without_bleu(tmp_path, capsys):
    _write_log(tmp_path / "runs" / "a", RESUMED)
    no_bleu = [{k: v for k, v in r.items() if k != "bleu"} for r in RESUMED]
    _write_log(tmp_path / "runs" / "b" / "model", no_bleu)
    assert main(["plot", "curves", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "runs" / "curves.png")
    assert_picture(tmp_path / "runs" / "curves.png", 800, 600)
    out = tmp_path / "b.png"
    assert plots.curves(tmp_path / "runs" / "b", out) == out
    assert_picture(out, 800, 600)


def test_curves_mistakes_are_one_clear_error(tmp_path, capsys):
    assert main(["plot", "curves", str(tmp_path / "missing")]) == 2
    _write_log(tmp_path / "a", RESUMED)
    assert main(["plot", "curves", str(tmp_path / "a"), "-o", str(tmp_path / "no" / "c.png")]) == 2
    assert main(["plot", "curves", str(tmp_path / "a"), "-o", str(tmp_path / "c.svg")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 3 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_curves_of_a_real_stopped_and_resumed_run(tmp_path):
    """The tiny model trained for one epoch, then resumed for a second: one continuous curve."""
    from nmt import training
    from nmt.config import load_config

    prepared = prepare_tiny(tmp_path)
    out = tmp_path / "model"
    training.train(load_config(None, tiny(prepared, out, "train.max_epochs=1")))
    first = plots.read_run("model", out / "log.jsonl")
    training.train(load_config(None, tiny(prepared, out, "train.max_epochs=2")), resume=True)
    run = plots.read_run("model", out / "log.jsonl")
    steps = [r["step"] for r in run.train]
    assert steps == sorted(set(steps)) and steps[-1] > first.train[-1]["step"]
    assert len(run.valid) == 2 and run.valid[0]["step"] < run.valid[1]["step"]
    walls = [r["wall"] for r in run.train]
    assert walls == sorted(walls)
    assert_picture(plots.curves(out), 800, 600)
