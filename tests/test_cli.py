"""The `nmt` command: in-process and once as a real subprocess."""

import subprocess
import sys

import pytest
from conftest import need_mirror

from nmt.cli import main
from nmt.errors import DataError, DownloadError, NmtError, UsageError, exit_code

SUBCOMMANDS = ("download", "config", "prepare", "train", "translate", "evaluate", "score")


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


def test_python_dash_m_nmt_help_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "nmt", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0
    assert all(name in result.stdout for name in SUBCOMMANDS)


def test_config_defaults_and_resolved(capsys, tmp_path):
    assert main(["config", "--defaults"]) == 0
    assert "beam_size: 5  # beam size" in capsys.readouterr().out
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    assert main(["config", str(path), "train.seed=9"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.1" in out and "seed: 9" in out


def test_config_error_exits_2_with_one_message(capsys):
    assert main(["config", "train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 1 config problem:")
    assert "Traceback" not in err


def test_unknown_subcommand_and_flag_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["tranlsate"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["translate", "x.pt", "--beam", "x"])
    assert e.value.code == 2


def test_download_from_the_mirror(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NMT_MIRROR", str(need_mirror("multi30k")))
    args = ["download", "multi30k", "--langs", "en", "de", "--out", str(tmp_path)]
    assert main([*args, "--splits", "test_2017_mscoco"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sorted(line.split("\t")[1] for line in out) == ["de", "en"]
    for lang in ("en", "de"):
        assert len((tmp_path / f"test_2017_mscoco.{lang}").read_text().splitlines()) == 461
    assert main([*args, "--splits", "test_2099"]) == 2
    assert "test_2099" in capsys.readouterr().err


def _raises(error):
    def run():
        raise error

    return run


@pytest.mark.parametrize(
    ("run", "code", "err"),
    [
        (lambda: None, 0, ""),
        (lambda: 3, 3, ""),
        (_raises(UsageError("bad flag")), 2, "error: bad flag\n"),
        (_raises(DataError("f.txt: line 2: not valid UTF-8")), 2, "error: f.txt: line 2"),
        (_raises(NmtError("disk full")), 1, "error: disk full\n"),
        (_raises(DownloadError("x.gz: checksum mismatch")), 1, "error: x.gz: checksum mismatch"),
        (_raises(KeyboardInterrupt()), 130, "stopped\n"),
        (_raises(BrokenPipeError()), 0, ""),
    ],
)
def test_one_rule_turns_errors_into_exit_codes(capsys, run, code, err):
    # the rule of the `nmt` command, the recipes and the data scripts (nmt.errors.exit_code)
    assert exit_code(run, interrupted="stopped") == code
    captured = capsys.readouterr()
    assert captured.err.startswith(err) and bool(captured.err) == bool(err)
    assert captured.out == ""


def test_overrides_work_in_any_position(capsys, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n")
    assert main(["config", "train.seed=9", str(path), "model.hidden=32"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.1" in out and "seed: 9" in out and "hidden: 32" in out
    from nmt.cli import build_parser

    argv = ["train", str(path), "--resume", "train.lr=1", "--reset-optimizer", "train.seed=2"]
    args = build_parser().parse_args(argv)
    assert args.resume and args.reset_optimizer and args.config == str(path)
    assert args.overrides == ["train.lr=1", "train.seed=2"]  # in their order: the last one wins
    # a command without overrides reads every argument as it is
    args = build_parser().parse_args(["translate", "m.pt", "-i", "a.b=c.txt"])
    assert args.input == "a.b=c.txt"
