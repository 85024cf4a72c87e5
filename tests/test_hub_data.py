"""Hub-shaped training data: a `translation` column written as line-aligned text, offline.

The hub itself is never reached: `datasets` runs in offline mode here, and a "hub dataset" is a
local folder laid out like the hub's wmt/wmt16 repository (parquet files under <config>/ and a
README whose YAML header lists the configs), read by the same `datasets.load_dataset` call.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import datasets
import pytest

from nmt import corpora, data
from nmt.errors import DataError, NmtError, UsageError

REPO = Path(__file__).resolve().parents[1]
PAIRS = [
    {"de": "Guten Morgen.", "en": "Good morning."},
    {"de": "Zwei\nZeilen\r\nhier", "en": "Two\rlines"},  # one pair must stay one line
    {"de": "", "en": "Nothing on the other side."},  # empty sides are kept: line i = row i
    {"de": "Straße ß „Zitat“", "en": "Street"},
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def make_hub_folder(root, splits: dict[str, list[dict]], config="de-en"):
    """A local folder shaped like a hub translation dataset with one config."""
    lines = ["---", "configs:", f"- config_name: {config}", "  data_files:"]
    for split, pairs in splits.items():
        path = root / config / f"{split}-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        datasets.Dataset.from_dict({"translation": pairs}).to_parquet(str(path))
        lines += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*lines, "---", "local test copy", ""]))
    return root


def use_local_hub(monkeypatch, name: str, folder) -> corpora.HubCorpus:
    """Point the hub corpus `name` at a local folder made by make_hub_folder."""
    hub = dataclasses.replace(
        corpora.HUB_CORPORA[name], path=str(folder), config="de-en", revision=None, data_dir=None
    )
    monkeypatch.setitem(corpora.HUB_CORPORA, name, hub)
    return hub


def _read(path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    return text[:-1].split("\n")


def _no_leftovers(folder) -> None:
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file


def test_dataset_rows_become_aligned_lines(tmp_path):
    rows = datasets.Dataset.from_dict({"translation": PAIRS})
    n = data.write_translation_text(rows, "en", "de", tmp_path / "t.en", tmp_path / "t.de")
    assert n == len(PAIRS)
    assert _read(tmp_path / "t.en") == [
        "Good morning.",
        "Two lines",
        "Nothing on the other side.",
        "Street",
    ]
    assert _read(tmp_path / "t.de") == ["Guten Morgen.", "Zwei Zeilen hier", "", "Straße ß „Zitat“"]
    _no_leftovers(tmp_path)


def test_streamed_json_gives_the_same_text(tmp_path):
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps({"translation": p}) + "\n" for p in PAIRS), encoding="utf-8")
    stream = datasets.load_dataset("json", data_files=str(src), split="train", streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    data.write_translation_text(
        stream, "de", "en", tmp_path / "s.de", tmp_path / "s.en", batch_size=3
    )
    table = datasets.Dataset.from_dict({"translation": PAIRS})
    data.write_translation_text(table, "de", "en", tmp_path / "d.de", tmp_path / "d.en")
    for lang in ("de", "en"):
        assert _read(tmp_path / f"s.{lang}") == _read(tmp_path / f"d.{lang}")


def test_a_bad_row_names_the_row_and_keeps_the_old_files(tmp_path):
    old = tmp_path / "t.en"
    old.write_text("previous export\n")
    rows = datasets.Dataset.from_dict({"translation": [{"de": "a", "en": "b"}, {"de": "c"}]})
    with pytest.raises(DataError, match=r"test rows, row 1: expected 'en' and 'de' texts"):
        data.write_translation_text(rows, "en", "de", old, tmp_path / "t.de", label="test rows")
    assert old.read_text() == "previous export\n" and not (tmp_path / "t.de").exists()
    _no_leftovers(tmp_path)
    other = datasets.Dataset.from_dict({"text": ["no translation column"]})
    with pytest.raises(
        DataError, match=r"expected a 'translation' column, found columns \['text'\]"
    ):
        data.write_translation_text(other, "en", "de", old, tmp_path / "t.de")


def test_a_source_failing_midway_is_one_clear_error(tmp_path):
    def rows():
        for i in range(5):
            yield {"translation": {"de": f"satz {i}", "en": f"sentence {i}"}}
        raise ConnectionResetError("connection reset by peer")

    stream = datasets.IterableDataset.from_generator(rows)
    with pytest.raises(NmtError, match="reading failed after 4 rows: ConnectionResetError"):
        data.write_translation_text(
            stream, "en", "de", tmp_path / "t.en", tmp_path / "t.de", batch_size=2
        )
    assert not (tmp_path / "t.en").exists()
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("streaming", [True, False])
def test_export_hub_split_reads_a_hub_shaped_dataset(tmp_path, monkeypatch, streaming):
    folder = make_hub_folder(tmp_path / "hub", {"train": PAIRS, "validation": PAIRS[:1]})
    use_local_hub(monkeypatch, "wmt16", folder)
    out = tmp_path / "out"
    n = data.export_hub_split(
        "wmt16", "validation", "en", "de", out / "v.en", out / "v.de", streaming
    )
    assert n == 1 and _read(out / "v.en") == ["Good morning."]
    n = data.export_hub_split("wmt16", "train", "de", "en", out / "t.de", out / "t.en", streaming)
    assert n == len(PAIRS) and _read(out / "t.de")[1] == "Zwei Zeilen hier"


def test_hub_mistakes_are_clear(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match='unknown hub corpus .*did you mean "wmt16"'):
        data.export_hub_split("wmt61", "train", "en", "de", out / "a", out / "b")
    with pytest.raises(UsageError, match="wmt16: no language 'fr'; languages: de, en"):
        data.export_hub_split("wmt16", "train", "fr", "de", out / "a", out / "b")
    with pytest.raises(UsageError, match="unknown split 'dev'; splits: train, validation, test"):
        data.export_hub_split("wmt16", "dev", "en", "de", out / "a", out / "b")
    # the real hub name, offline: an error that says what is missing, not a traceback
    with pytest.raises(NmtError, match="'wmt/wmt16'.*needs internet access") as err:
        data.export_hub_split("wmt16", "train", "en", "de", out / "a", out / "b")
    assert not isinstance(err.value, UsageError)
    folder = make_hub_folder(tmp_path / "hub", {"train": PAIRS})
    use_local_hub(monkeypatch, "wmt16", folder)
    with pytest.raises(NmtError, match="cannot load split 'test'"):
        data.export_hub_split("wmt16", "test", "en", "de", out / "a", out / "b")
    assert not out.exists() or not list(out.iterdir())


def test_data_script_writes_each_split(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("hub_script", REPO / "data_scripts/hub_corpus.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    use_local_hub(monkeypatch, "iwslt14", make_hub_folder(tmp_path / "hub", {"train": PAIRS}))
    out = tmp_path / "out"
    argv = ["iwslt14", "--langs", "de", "en", "--out", str(out)]
    assert script.main(argv) == 0
    assert capsys.readouterr().out.split() == [str(out / "train.de"), str(out / "train.en")]
    assert _read(out / "train.en")[0] == "Good morning."
    assert script.main(["iwslt15", "--out", str(out)]) == 2
    assert "unknown hub corpus 'iwslt15' (did you mean \"iwslt14\"?)" in capsys.readouterr().err
