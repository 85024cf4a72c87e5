"""The search settings have one home, nmt.config.SearchConfig: each of its fields is, with nothing
written anywhere else, a flag of `nmt translate` and `nmt evaluate`, a keyword of the Translator
(of each call, or of `Translator.from_checkpoint` for the load-time ones: dtype, threads), a line
of `nmt config --defaults`, and checked against its range on every path.

The tests read the fields; they name none of them, so a field added tomorrow is covered too.
"""

from __future__ import annotations

import dataclasses
import re

import pytest

from nmt import config
from nmt.cli import _search_kwargs, build_parser, main
from nmt.config import SearchConfig, defaults_yaml, load_config
from nmt.errors import ConfigError, UsageError
from nmt.search import SearchSettings
from nmt.translator import Translator

FIELDS = dataclasses.fields(SearchConfig)
PER_CALL = [f for f in FIELDS if not f.metadata["load_time"]]
LOAD_TIME = [f for f in FIELDS if f.metadata["load_time"]]
OWN_FLAG = {"n_best": "--n-best"}  # `nmt translate --n-best`: the call's own, not the checkpoint's
# the settings a value of one key needs beside it, by a cross check of nmt.config (the one
# place a key cannot change alone): sampling draws one output per sentence, so beam_size 1
COMPANIONS = {"sampling": {"beam_size": 1}}


def _kind(f: dataclasses.Field):
    return config.field_type(SearchConfig, f)


def _other_value(f: dataclasses.Field):
    """A valid value of `f` other than its default."""
    meta = f.metadata
    if _kind(f) is bool:
        return not f.default
    if meta["choices"]:
        return next(c for c in meta["choices"] if c != f.default)
    value = _kind(f)(f.default + 1)
    if meta["max"] is None or value <= meta["max"]:
        return value
    return _kind(f)((meta["min"] + meta["max"]) / 2)  # inside the range, ends excluded


def _bad_values(f: dataclasses.Field) -> list[tuple[object, str]]:
    """Values `f` must refuse, with what the error must say."""
    path = f"search.{f.name}"
    meta, kind = f.metadata, _kind(f)
    wrong_type = 7 if kind is str else "seven"
    bad = [(wrong_type, f"{path}: expected {kind.__name__}, found")]
    if meta["min"] is not None:
        bad.append((kind(meta["min"] - 1), f"{path}: must be >= {meta['min']}"))
    if meta["max"] is not None:
        bad.append((kind(meta["max"] + 1), f"{path}: must be <= {meta['max']}"))
    if meta["choices"]:
        bad.append(("no-such-choice", f"{path}: expected one of"))
    return bad


def _flag(f: dataclasses.Field) -> str:
    return OWN_FLAG.get(f.name, "--" + f.name.replace("_", "-"))


def _argv(f: dataclasses.Field, value) -> list[str]:
    if _kind(f) is bool:
        return [_flag(f) if value else _flag(f).replace("--", "--no-", 1)]
    return [_flag(f), str(value)]


@pytest.fixture(scope="module")
def translator(tiny_checkpoint):
    return Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype="float32")


@pytest.mark.parametrize("command", ["translate", "evaluate"])
def test_every_key_is_a_flag_with_the_fields_help(command, tiny_checkpoint, capsys):
    parser = build_parser()
    plain = parser.parse_args([command, str(tiny_checkpoint)])
    assert _search_kwargs(plain) == {}  # a flag not given keeps the checkpoint's value
    with pytest.raises(SystemExit):
        parser.parse_args([command, "--help"])
    listing = re.sub(r"\s+", "", capsys.readouterr().out)
    for f in FIELDS:
        if f.name in OWN_FLAG:
            continue
        value = _other_value(f)
        args = parser.parse_args([command, str(tiny_checkpoint), *_argv(f, value)])
        assert _search_kwargs(args) == {f.name: value}, f.name
        assert re.sub(r"\s+", "", f.metadata["help"]) in listing, f.name
        assert _flag(f) in listing


def test_n_best_is_a_flag_of_translate_only(tiny_checkpoint):
    parser = build_parser()
    assert parser.parse_args(["translate", "x.pt"]).n_best == 1
    assert parser.parse_args(["translate", "x.pt", "--n-best", "2"]).n_best == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "x.pt", "--n-best", "2"])


def test_the_load_time_keys_are_dtype_and_threads():
    assert config.load_time_keys() == tuple(f.name for f in LOAD_TIME) == ("dtype", "threads")


@pytest.mark.parametrize("f", PER_CALL, ids=lambda f: f.name)
def test_every_key_is_a_translator_override(f, translator):
    value = _other_value(f)
    assert getattr(translator.cfg.search, f.name) != value
    changes = {f.name: value, **COMPANIONS.get(f.name, {})}
    settings = translator.search_settings(**changes)
    assert getattr(settings, f.name) == value
    others = [g.name for g in FIELDS if g.name not in (*changes, "n_best")]
    assert all(getattr(settings, k) == getattr(translator.cfg.search, k) for k in others)
    assert len(translator.translate(["w1 w2", "the cat"], **changes)) == 2


@pytest.mark.parametrize("f", LOAD_TIME, ids=lambda f: f.name)
def test_every_load_time_key_is_a_loading_keyword_and_refused_per_call(f, tiny_checkpoint):
    value = "float32" if f.name == "dtype" else _other_value(f)  # a value every CPU can run
    loaded = Translator.from_checkpoint(tiny_checkpoint, device="cpu", **{f.name: value})
    assert getattr(loaded.cfg.search, f.name) == value
    assert len(loaded.translate(["w1 w2", "the cat"])) == 2
    for call in (loaded.search_settings, loaded.translate_nbest):
        args = (["w1"], 1) if call == loaded.translate_nbest else ()
        with pytest.raises(UsageError, match=f"search.{f.name}: read when the model is loaded"):
            call(*args, **{f.name: value})


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_every_key_refuses_bad_values_on_every_path(f, translator, tiny_checkpoint):
    ids = {"bos_id": 1, "eos_id": 2, "pad_id": 0}
    for value, message in _bad_values(f):
        with pytest.raises(ConfigError, match=re.escape(message)):
            if f.metadata["load_time"]:
                Translator.from_checkpoint(tiny_checkpoint, device="cpu", **{f.name: value})
            else:
                translator.search_settings(**{f.name: value})
        with pytest.raises(ConfigError, match=re.escape(message)):
            SearchSettings(**ids, **{f.name: value})
        with pytest.raises(ConfigError, match=re.escape(message)):
            dataclasses.replace(SearchSettings(**ids), **{f.name: value})
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(None, [f"search.{f.name}={value}"])


@pytest.mark.parametrize(
    "f", [f for f in FIELDS if f.metadata["min"] is not None], ids=lambda f: f.name
)
def test_the_command_line_refuses_out_of_range_values(f, tiny_checkpoint, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("w1 w2\n")
    out = tmp_path / "out.txt"
    low = _kind(f)(f.metadata["min"] - 1)
    argv = ["translate", str(tiny_checkpoint), "-i", str(src), "-o", str(out), *_argv(f, low)]
    assert main(argv) == 2
    assert f"search.{f.name}: must be >= {f.metadata['min']}" in capsys.readouterr().err
    assert not out.exists()


def test_every_key_is_listed_with_its_default_and_help():
    listing = defaults_yaml()
    section = listing[listing.index("\nsearch:") :]
    for f in FIELDS:
        default = str(f.default).lower() if _kind(f) is bool else str(f.default)
        assert f"\n  {f.name}: {default}  # {f.metadata['help']}" in section, f.name


def test_a_new_flag_reaches_the_search(tiny_checkpoint, tmp_path, capsys):
    # --max-src-len came with the generated flags: it must change what is translated
    src = tmp_path / "in.txt"
    src.write_text("w1 w2 w3 w4 w5 w6 w7 w8\n")
    assert main(["translate", str(tiny_checkpoint), "-i", str(src), "--max-src-len", "2"]) == 0
    captured = capsys.readouterr()
    assert "truncated to the first 2 (search.max_src_len)" in captured.err
    assert len(captured.out.splitlines()) == 1
