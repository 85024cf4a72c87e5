"""Config: defaults, YAML loading, overrides and the exact error messages."""

import dataclasses

import pytest

from nmt.config import Config, defaults_yaml, load_config, read_yaml
from nmt.errors import ConfigError, UsageError


def test_defaults_load_and_render():
    cfg = load_config()
    assert cfg == Config()
    text = defaults_yaml()
    for key in ("vocab_size: 8000", "beam_size: 5", "cell: lstm  # recurrent cell"):
        assert key in text


def test_unknown_key_bad_type_bad_value_all_reported_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 0.1\n  max_tokens: lots\nmodel:\n  dropout: 1.5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"3 config problems in {path}:")
    assert '  - train.lrr: unknown key (did you mean "lr"?)' in msg
    assert "  - train.max_tokens: expected int, found str 'lots'" in msg
    assert "  - model.dropout: must be <= 0.9, found 1.5" in msg


def test_choice_with_suggestion_and_unknown_section():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.cell=lstn", "modle.hidden=3"])
    msg = str(err.value)
    assert "model.cell: expected one of 'lstm', 'gru', 'rnn', found 'lstn' (did you mean" in msg
    assert 'modle: unknown section (did you mean "model"?)' in msg


def test_overrides_apply_after_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.1\n  seed: 7\n")
    cfg = load_config(path, ["train.lr=0.5", "model.tie_embeddings=true", "data.dir=x/y"])
    assert cfg.train.lr == 0.5 and cfg.train.seed == 7
    assert Config().model.tie_embeddings is False and cfg.model.tie_embeddings is True
    assert cfg.data.dir == "x/y"


def test_a_base_comes_before_the_file_and_the_overrides(tmp_path):
    # a fine-tuning run: the checkpoint's config, then the fine-tuning file, then the command line
    base = Config()
    base.model.hidden, base.train.lr, base.train.seed = 48, 0.002, 3
    base.search = dataclasses.replace(base.search, beam_size=7)  # frozen: replaced whole
    path = tmp_path / "ft.yaml"
    path.write_text("train:\n  lr: 0.0005\n  max_steps: 300\nsearch:\n")  # search: empty
    cfg = load_config(path, ["train.max_steps=10"], base=base.to_dict())
    assert (cfg.model.hidden, cfg.train.seed) == (48, 3)  # kept from the base
    assert (cfg.train.lr, cfg.train.max_steps) == (0.0005, 10)  # the file, then the override
    assert cfg.search.beam_size == 7  # an empty section keeps the base's
    assert load_config(path).model.hidden == Config().model.hidden  # no base: the defaults


def test_int_accepted_for_float_but_not_bool_for_int():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="train.max_tokens: expected int, found bool True"):
        load_config(None, ["train.max_tokens=true"])


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; a user means the number, in a file or override.
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 2e-3\n")
    assert load_config(path, ["train.min_loss_scale=1E9"]).train.lr == 0.002
    assert load_config(None, ["train.min_loss_scale=1E9"]).train.min_loss_scale == 1e9
    with pytest.raises(ConfigError, match="train.lr: expected float, found str '1e'"):
        load_config(None, ["train.lr=1e"])
    with pytest.raises(ConfigError, match="train.max_tokens: expected int, found str '3e3'"):
        load_config(None, ["train.max_tokens=3e3"])


def test_malformed_override():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["lr=0.1"])


def test_cross_check_n_best_beam():
    with pytest.raises(ConfigError, match=r"search.n_best: must be <= search.beam_size \(2\)"):
        load_config(None, ["search.beam_size=2", "search.n_best=3"])


def test_yaml_with_tab_names_line(tmp_path):
    path = tmp_path / "tab.yaml"
    path.write_text("train:\n\tlr: 0.1\n")
    with pytest.raises(UsageError) as err:
        read_yaml(path)
    assert str(path) in str(err.value) and "line 2" in str(err.value)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  lr: \xff\n")
    with pytest.raises(UsageError, match="not UTF-8"):
        load_config(bad)


@pytest.mark.parametrize(
    "name",
    ["gnmt_small", "gnmt_v2", "gnmt_paper", "gnmt_iwslt14", "demo", "tcn_small", "finetune"],
)
def test_shipped_configs_are_valid(name):
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    assert path.read_text().startswith("#")
    load_config(path)


def test_tcn_receptive_field_must_cover_max_len():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.arch=tcn", "model.kernel_size=3", "model.levels=4"])
    msg = str(err.value)
    assert "model.levels: the TCN receptive field 1 + 2(k-1)(2^L - 1) = 61" in msg
    assert "use model.levels >= 6 (receptive field 253)" in msg
    load_config(None, ["model.arch=tcn", "model.levels=6"])
    load_config(None, ["model.arch=tcn", "data.max_len=60"])


def test_gnmt_decoder_needs_two_layers():
    with pytest.raises(ConfigError, match="model.dec_layers: the GNMT decoder needs >= 2"):
        load_config(None, ["model.dec_layers=1"])


@pytest.mark.parametrize(
    ("text", "line", "key", "first"),
    [
        ("model:\n  hidden: 256\n  emb_dim: 64\n  hidden: 512\n", 4, "model.hidden", 2),
        ("train:\n  lr: 0.1\nmodel:\n  hidden: 8\ntrain:\n  seed: 3\n", 5, "train", 1),
        ("search: {beam_size: 2, alpha: 0.6, beam_size: 5}\n", 1, "search.beam_size", 1),
    ],
)
def test_a_key_given_twice_is_one_error_naming_its_line(tmp_path, text, line, key, first):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: line {line}, column ")
    assert f"duplicate key {key} (first given on line {first};" in msg


def test_the_same_key_in_other_mappings_and_yaml_merges_are_fine(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("a: {x: 1, y: [{x: 2}, {x: 3}]}\nb:\n  x: 4\n")
    assert read_yaml(path) == {"a": {"x": 1, "y": [{"x": 2}, {"x": 3}]}, "b": {"x": 4}}
    merged = tmp_path / "merged.yaml"
    merged.write_text("a: &base {hidden: 8, emb_dim: 8}\nmodel:\n  <<: *base\n  hidden: 32\n")
    assert read_yaml(merged)["model"] == {"hidden": 32, "emb_dim": 8}  # a merge may be overridden
    twice = tmp_path / "twice.yaml"
    twice.write_text("a: {x: 1, y: [{x: 2, x: 3}]}\n")
    with pytest.raises(UsageError, match=r"line 1, column 22: .*duplicate key a\.y\[0\]\.x"):
        read_yaml(twice)
