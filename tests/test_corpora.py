"""Corpus definitions and download: a real local HTTP server, a mirror folder, real failures."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import pytest
from conftest import SHARED_CORPORA, need_mirror
from helpers_http import closed_port, serve_folder

from nmt import corpora
from nmt.cli import main
from nmt.corpora import Corpus, FileSpec
from nmt.errors import DownloadError, NmtError, UsageError

REPO = Path(__file__).resolve().parents[1]
TEXT = {
    ("train", "en"): "a dog runs .\ntwo men talk .\na red car\n",
    ("train", "de"): "ein hund rennt .\nzwei männer reden .\nein rotes auto\n",
    ("test", "en"): "hello world\n",
    ("test", "de"): "hallo welt\n",
}


@pytest.fixture(autouse=True)
def _no_mirror(monkeypatch, tmp_path):
    # The Makefile exports NMT_MIRROR; these tests choose it themselves.
    monkeypatch.delenv(corpora.MIRROR_ENV, raising=False)
    monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path / "cache"))


def _spec(data: bytes, path: str) -> FileSpec:
    return FileSpec(path, hashlib.sha256(data).hexdigest(), len(data))


def _tiny(root: Path, base_url: str, monkeypatch, corrupt: dict | None = None) -> Corpus:
    """Write a gzip corpus under root/<path> and register it as corpus "tiny"."""
    files: dict[str, dict[str, FileSpec]] = {}
    for (split, lang), text in TEXT.items():
        path = f"data/{split}.{lang}.gz"
        data = gzip.compress(text.encode("utf-8"), mtime=0)
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
        files.setdefault(split, {})[lang] = _spec(data, path)
    for (split, lang), spec in (corrupt or {}).items():
        files[split][lang] = spec
    corpus = Corpus("tiny", base_url, "tinymirror", files, default_splits=("train",))
    monkeypatch.setitem(corpora.CORPORA, "tiny", corpus)
    return corpus


def _looks_complete(out_dir: Path) -> list[str]:
    """Every file in out_dir (a failure may leave folders, never files)."""
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file())


def test_download_verifies_unpacks_and_is_idempotent(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, requests):
        _tiny(srv, url, monkeypatch)
        out = tmp_path / "out"
        files = corpora.download("tiny", ["en", "de"], out, splits=["train", "test"], quiet=True)
        assert set(files) == {"train", "test"}
        for (split, lang), text in TEXT.items():
            assert files[split][lang] == out / f"{split}.{lang}"
            assert files[split][lang].read_text(encoding="utf-8") == text
        assert len(requests) == 4
        assert not [p for p in _looks_complete(out) if Path(p).name.startswith(".")]

        again = corpora.download("tiny", ["en", "de"], out, splits=["train", "test"], quiet=True)
        assert again == files
        assert len(requests) == 4  # verified files are not fetched again

        (out / "train.en.gz").write_bytes(b"damaged")  # a bad local copy is fetched again
        corpora.download("tiny", ["en"], out, quiet=True)
        assert len(requests) == 5
        assert (out / "train.en").read_text(encoding="utf-8") == TEXT[("train", "en")]


def test_checksum_mismatch_leaves_nothing(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, _):
        corpus = _tiny(srv, url, monkeypatch)
        good = corpus.files["train"]["en"]
        corpus.files["train"]["en"] = FileSpec(good.path, "0" * 64, good.size)
        out = tmp_path / "out"
        with pytest.raises(DownloadError) as err:
            corpora.download("tiny", ["en"], out, splits=["train"], quiet=True)
        msg = str(err.value)
        assert "checksum mismatch" in msg and "train.en.gz" in msg
        assert "0" * 64 in msg and good.sha256 in msg  # expected and found
        assert _looks_complete(out) == []


@pytest.mark.parametrize("extra", [1, -1])
def test_a_wrong_size_alone_is_caught(tmp_path, monkeypatch, extra):
    # the right sha256 with a size one byte off: only the size check can refuse the file
    # (+1: the server's file is shorter than promised; -1: longer, read no further than that)
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, _):
        corpus = _tiny(srv, url, monkeypatch)
        good = corpus.files["train"]["en"]
        corpus.files["train"]["en"] = FileSpec(good.path, good.sha256, good.size + extra)
        out = tmp_path / "out"
        with pytest.raises(DownloadError) as err:
            corpora.download("tiny", ["en"], out, splits=["train"], quiet=True)
        got = f"({good.size} bytes)" if extra > 0 else f"(more than {good.size - 1} bytes)"
        assert f"({good.size + extra} bytes), found " in str(err.value) and got in str(err.value)
        assert _looks_complete(out) == []


def test_failed_downloads_exit_1_and_user_mistakes_exit_2(tmp_path, monkeypatch, capsys):
    # a server's missing or bad file is no mistake of the user's: a runtime failure
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, _):
        corpus = _tiny(srv, url, monkeypatch)
        args = ["download", "tiny", "--langs", "en", "de", "--out", str(tmp_path / "out")]
        (srv / "data" / "test.de.gz").unlink()
        assert main([*args, "--splits", "test"]) == 1
        assert "test.de.gz: not found at http" in capsys.readouterr().err
        good = corpus.files["train"]["en"]
        corpus.files["train"]["en"] = FileSpec(good.path, "0" * 64, good.size)
        assert main([*args, "--splits", "train"]) == 1
        assert "checksum mismatch" in capsys.readouterr().err
        assert main([*args, "--splits", "valid"]) == 2  # the user's mistake
        assert "unknown split 'valid'" in capsys.readouterr().err


def test_connection_refused_is_clear(tmp_path, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}/"
    _tiny(tmp_path / "unused", url, monkeypatch)
    out = tmp_path / "out"
    with pytest.raises(NmtError) as err:
        corpora.download("tiny", ["en"], out, retries=2, backoff=0, quiet=True)
    msg = str(err.value)
    assert "refused" in msg and f"{url}data/train.en.gz" in msg and "2 tries" in msg
    assert not isinstance(err.value, UsageError)  # a runtime failure: exit code 1
    assert _looks_complete(out) == []


def test_missing_file_names_file_and_url(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, _):
        _tiny(srv, url, monkeypatch)
        (srv / "data" / "test.de.gz").unlink()
        out = tmp_path / "out"
        with pytest.raises(DownloadError) as err:
            corpora.download("tiny", ["en", "de"], out, splits=["test"], quiet=True)
        msg = str(err.value)
        assert "test.de.gz" in msg and "not found" in msg and f"{url}data/test.de.gz" in msg
        assert (out / "test.en").exists() and not (out / "test.de").exists()


def test_truncated_gzip_is_a_clear_error(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, _):
        corpus = _tiny(srv, url, monkeypatch)
        data = (srv / "data" / "train.en.gz").read_bytes()[:-12]  # checksum of the cut file
        (srv / "data" / "train.en.gz").write_bytes(data)
        corpus.files["train"]["en"] = _spec(data, "data/train.en.gz")
        out = tmp_path / "out"
        with pytest.raises(DownloadError, match=r"train\.en\.gz: truncated or corrupt gzip"):
            corpora.download("tiny", ["en"], out, quiet=True)
        assert not (out / "train.en").exists()
        assert not [p for p in _looks_complete(out) if Path(p).name.startswith(".")]


@pytest.mark.parametrize("form", ["path", "file_url", "http_url"])
def test_mirror_replaces_the_base_address(tmp_path, monkeypatch, form):
    mirror = tmp_path / "mirror"
    _tiny(mirror / "tinymirror", f"http://127.0.0.1:{closed_port()}/", monkeypatch)
    out = tmp_path / "out"
    if form == "http_url":
        with serve_folder(mirror) as (url, requests):
            monkeypatch.setenv(corpora.MIRROR_ENV, url)
            files = corpora.download("tiny", ["en", "de"], out, quiet=True)
        assert requests == ["/tinymirror/data/train.en.gz", "/tinymirror/data/train.de.gz"]
    else:
        value = mirror.as_uri() if form == "file_url" else str(mirror)
        monkeypatch.setenv(corpora.MIRROR_ENV, value)
        files = corpora.download("tiny", ["en", "de"], out, quiet=True)
    assert files["train"]["de"].read_text(encoding="utf-8") == TEXT[("train", "de")]


def test_file_missing_in_mirror_names_file_and_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    _tiny(mirror / "tinymirror", "https://example.invalid/", monkeypatch)
    (mirror / "tinymirror" / "data" / "test.en.gz").unlink()
    monkeypatch.setenv(corpora.MIRROR_ENV, str(mirror))
    with pytest.raises(DownloadError) as err:
        corpora.download("tiny", ["en"], tmp_path / "out", splits=["test"], quiet=True)
    assert str(mirror / "tinymirror" / "data" / "test.en.gz") in str(err.value)
    assert "test.en.gz: not found" in str(err.value)


def test_resolve_url_public_and_mirror(monkeypatch):
    rel = "data/task1/raw/val.en.gz"
    assert corpora.resolve_url("multi30k", rel) == (
        "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/val.en.gz"
    )
    monkeypatch.setenv(corpora.MIRROR_ENV, str(SHARED_CORPORA))
    expected = SHARED_CORPORA.resolve() / "multi30k" / "data" / "task1" / "raw" / "val.en.gz"
    assert corpora.resolve_url("multi30k", rel) == str(expected)
    wmt = corpora.CORPORA["wmt"]
    spec = wmt.files[wmt.split_key("newstest2019", ["en", "de"])]["en"]
    assert spec.path == "testsets/en-de/newstest2019.en"
    assert corpora.resolve_url(wmt, spec.path) == str(
        SHARED_CORPORA.resolve() / "opus-mt-testsets" / "testsets" / "en-de" / "newstest2019.en"
    )
    monkeypatch.setenv(corpora.MIRROR_ENV, "ftp://host/corpora")
    with pytest.raises(UsageError, match="NMT_MIRROR"):
        corpora.resolve_url("multi30k", rel)


def test_bad_requests_are_usage_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError, match='unknown corpus .*did you mean "multi30k"'):
        corpora.download("multi30", ["en"], out)
    with pytest.raises(UsageError, match="unknown split 'tset_2016_flickr'.*test_2016_flickr"):
        corpora.download("multi30k", ["en"], out, splits=["tset_2016_flickr"])
    with pytest.raises(UsageError, match="unknown language 'xx'; languages: cs, de, en, fr"):
        corpora.download("multi30k", ["en", "xx"], out)
    with pytest.raises(UsageError, match="'test_2017_mscoco' has no cs file"):
        corpora.download("multi30k", ["en", "cs"], out, splits=["test_2017_mscoco"])
    with pytest.raises(UsageError, match="exactly two languages"):
        corpora.download("wmt", ["en"], out)
    with pytest.raises(UsageError, match="CORPUS:SPLIT"):
        corpora.resolve_testset("newstest2014", "en", "de")
    assert not out.exists()  # nothing is fetched before the request is checked


def _sums(path: Path) -> dict[str, tuple[str, int]]:
    rows = [line.split() for line in path.read_text().splitlines() if not line.startswith("#")]
    return {rel: (sha, int(size)) for sha, size, rel in rows}


@pytest.mark.parametrize(
    ("name", "folder"), [("multi30k", "multi30k"), ("wmt", "opus-mt-testsets")]
)
def test_definitions_match_the_published_checksums(name, folder):
    sums_file = SHARED_CORPORA / folder / "SHA256SUMS"
    if not sums_file.exists():
        pytest.skip(f"{sums_file} not present")
    sums = _sums(sums_file)
    corpus = corpora.CORPORA[name]
    defined = {
        s.path: (s.sha256, s.size) for by_lang in corpus.files.values() for s in by_lang.values()
    }
    assert defined == sums  # every listed file, each with its sha256 and size
    assert corpus.mirror_dir == folder


def test_resolve_testset_uses_the_cache(tmp_path, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, _):
        _tiny(srv, url, monkeypatch)
        src, ref = corpora.resolve_testset("tiny:test", "de", "en")
    cache = tmp_path / "cache" / "tiny"
    assert (src, ref) == (cache / "test.de", cache / "test.en")
    assert ref.read_text(encoding="utf-8") == TEXT[("test", "en")]


def test_data_script_entry_point(tmp_path, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("m30k_script", REPO / "data_scripts/multi30k.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    srv = tmp_path / "srv"
    srv.mkdir()
    with serve_folder(srv) as (url, _):
        _tiny(srv, url, monkeypatch)
        out = tmp_path / "out"
        assert script.main(["--out", str(out), "--splits", "test"], corpus="tiny") == 0
        assert capsys.readouterr().out.split() == [str(out / "test.en"), str(out / "test.de")]
        assert script.main(["--out", str(out), "--splits", "nope"], corpus="tiny") == 2
        assert "unknown split 'nope'" in capsys.readouterr().err


@pytest.mark.slow
def test_real_multi30k_and_wmt_from_the_mirror(tmp_path, monkeypatch):
    need_mirror("multi30k")
    monkeypatch.setenv(corpora.MIRROR_ENV, str(SHARED_CORPORA))
    splits = ["val", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco"]
    files = corpora.download("multi30k", ["en", "de"], tmp_path / "m30k", splits=splits)
    counts = {
        "val": 1014,
        "test_2016_flickr": 1000,
        "test_2017_flickr": 1000,
        "test_2017_mscoco": 461,
    }
    for split, n in counts.items():
        for lang in ("en", "de"):
            assert len(files[split][lang].read_text(encoding="utf-8").splitlines()) == n
    src, ref = corpora.resolve_testset("wmt:newstest2014", "en", "de", tmp_path / "cache")
    assert len(src.read_text(encoding="utf-8").splitlines()) == 3003
    assert len(ref.read_text(encoding="utf-8").splitlines()) == 3003
    with pytest.raises(DownloadError, match="test_2018_flickr.en.gz: not found"):
        corpora.download("multi30k", ["en", "de"], tmp_path / "m30k", splits=["test_2018_flickr"])


def test_iwslt14_definitions_match_the_mirror_files():
    folder = need_mirror("iwslt14_de_en") / "iwslt14_de_en"
    corpus = corpora.CORPORA["iwslt14"]
    assert corpus.mirror_dir == "iwslt14_de_en"
    raw = {str(p.relative_to(folder)) for p in (folder / "raw").glob("*.gz")}
    defined = [s for by_lang in corpus.files.values() for s in by_lang.values()]
    assert {s.path for s in defined} == raw  # every raw/ file, each defined once
    for spec in defined:
        data = (folder / spec.path).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (spec.sha256, spec.size)


def test_a_mirror_only_corpus_needs_the_mirror(tmp_path):
    with pytest.raises(
        UsageError, match="iwslt14: these files have no public address; set NMT_MIRROR"
    ):
        corpora.download("iwslt14", ["de", "en"], tmp_path / "out", quiet=True)


@pytest.mark.parametrize("form", ["path", "http_url"])
def test_iwslt14_test_sets_from_the_mirror(tmp_path, monkeypatch, form):
    need_mirror("iwslt14_de_en")
    out = tmp_path / "out"
    if form == "http_url":
        with serve_folder(SHARED_CORPORA) as (url, requests):
            monkeypatch.setenv(corpora.MIRROR_ENV, url)
            files = corpora.download("iwslt14", ["de", "en"], out, splits=["tst2011"], quiet=True)
        assert requests == [
            "/iwslt14_de_en/raw/IWSLT14.TED.tst2011.de-en.de.gz",
            "/iwslt14_de_en/raw/IWSLT14.TED.tst2011.de-en.en.gz",
        ]
        counts = {"tst2011": 1433}
    else:
        monkeypatch.setenv(corpora.MIRROR_ENV, str(SHARED_CORPORA))
        files = corpora.download(
            "iwslt14", ["en", "de"], out, splits=["dev2010", "test"], quiet=True
        )
        counts = {"dev2010": 887, "test": 6750}
    for split, n in counts.items():
        for lang in ("de", "en"):
            assert len(files[split][lang].read_text(encoding="utf-8").splitlines()) == n
    if form == "path":  # the first line of the fairseq test set (mirror README's sample)
        assert files["test"]["en"].read_text(encoding="utf-8").startswith("You know, one of")


TATOEBA_PAIRS = 17_565  # v2021-08-07 (the mirror README)


def test_tatoeba_definitions_match_the_mirror_files():
    mirror = need_mirror("tatoeba_test_de_en")
    folder = mirror / "tatoeba_test_de_en"
    corpus = corpora.CORPORA["tatoeba"]
    assert (corpus.mirror_dir, corpus.base_url, corpus.default_splits) == (
        "tatoeba_test_de_en",
        "",
        ("v2021-08-07",),
    )
    defined = [s for by_lang in corpus.files.values() for s in by_lang.values()]
    assert {s.path for s in defined} == {p.name for p in folder.glob("*.gz")}  # each one once
    for spec in defined:
        data = (folder / spec.path).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (spec.sha256, spec.size)


def test_tatoeba_from_the_mirror_over_http(tmp_path, monkeypatch):
    mirror = need_mirror("tatoeba_test_de_en")
    out = tmp_path / "out"
    with serve_folder(mirror) as (url, requests):
        monkeypatch.setenv(corpora.MIRROR_ENV, url)
        files = corpora.download("tatoeba", ["en", "de"], out, quiet=True)  # default split
    assert requests == [
        "/tatoeba_test_de_en/tatoeba-test-v2021-08-07.en.gz",
        "/tatoeba_test_de_en/tatoeba-test-v2021-08-07.de.gz",
    ]
    assert files == {"v2021-08-07": {lang: out / f"v2021-08-07.{lang}" for lang in ("en", "de")}}
    de = files["v2021-08-07"]["de"].read_text(encoding="utf-8").splitlines()
    en = files["v2021-08-07"]["en"].read_text(encoding="utf-8").splitlines()
    assert len(de) == len(en) == TATOEBA_PAIRS
    # the first and last pairs of the mirror README's sample
    assert de[0].startswith("1935 erhielt Einstein") and en[0].startswith("In 1935 Einstein")
    assert (de[-1], en[-1]) == ("Zwischen uns ist alles vorbei.", "It's all over between us.")


def test_tatoeba_refuses_a_file_with_another_checksum(tmp_path, monkeypatch):
    # a mirror whose file has the right size but other bytes: refused, nothing left behind
    spec = corpora.CORPORA["tatoeba"].files["v2021-08-07"]["de"]
    fake = tmp_path / "mirror" / "tatoeba_test_de_en" / spec.path
    fake.parent.mkdir(parents=True)
    fake.write_bytes(b"x" * spec.size)
    monkeypatch.setenv(corpora.MIRROR_ENV, str(tmp_path / "mirror"))
    out = tmp_path / "out"
    with pytest.raises(DownloadError) as err:
        corpora.download("tatoeba", ["de", "en"], out, splits=["v2021-08-07"], quiet=True)
    msg = str(err.value)
    assert "tatoeba-test-v2021-08-07.de.gz: checksum mismatch" in msg and spec.sha256 in msg
    assert _looks_complete(out) == []
    monkeypatch.delenv(corpora.MIRROR_ENV)
    with pytest.raises(UsageError, match="tatoeba: these files have no public address"):
        corpora.download("tatoeba", ["de", "en"], out, quiet=True)
