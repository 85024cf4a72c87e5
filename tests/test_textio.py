"""Text I/O: the one line rule (CRLF, a lone CR, BOM, invalid UTF-8, gzip), read_parallel, and
the one atomic write, including what it leaves behind when the write fails."""

from __future__ import annotations

import gzip
import io
import os
import stat
import sys

import pytest

from nmt import textio
from nmt.errors import DataError, UsageError
from nmt.textio import atomic_write, open_output, read_lines, read_parallel


def _write(path, lines, gz=False):
    text = "".join(f"{line}\n" for line in lines).encode("utf-8")
    path.write_bytes(gzip.compress(text) if gz else text)
    return path


def _raw(path, data: bytes, gz=False):
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# -- the line rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_crlf_reads_as_its_lf_copy(tmp_path, gz):
    crlf = _raw(tmp_path / ("crlf.txt.gz" if gz else "crlf.txt"), b"a b\r\nc\r\n\r\nd\r\n", gz)
    lf = _raw(tmp_path / "lf.txt", b"a b\nc\n\nd\n")
    assert read_lines(crlf) == read_lines(lf) == ["a b", "c", "", "d"]
    last = _raw(tmp_path / "last.txt", b"x\r\ny")  # a last line without a line end counts
    assert read_lines(last) == ["x", "y"]


def test_a_lone_cr_is_text_inside_its_line(tmp_path):
    # only "\n" ends a line: the counts agree with `wc -l`, so N lines in give N lines out
    path = _raw(tmp_path / "cr.txt", b"a\rb\nc\r\r\n\re\n\x0b\x1c\xc2\x85\xe2\x80\xa8\nend\r")
    assert read_lines(path) == ["a\rb", "c\r", "\re", "\x0b\x1c\x85\u2028", "end\r"]


def test_a_bom_is_dropped_at_the_start_of_the_file_only(tmp_path):
    path = _raw(tmp_path / "bom.txt", b"\xef\xbb\xbfone\r\n\xef\xbb\xbftwo\n")
    assert read_lines(path) == ["one", "\ufefftwo"]
    assert read_lines(_raw(tmp_path / "bom.gz", b"\xef\xbb\xbfone\n", gz=True)) == ["one"]


@pytest.mark.parametrize("gz", [False, True])
def test_invalid_utf8_names_the_file_line_and_byte(tmp_path, gz):
    path = _raw(tmp_path / ("bad.txt.gz" if gz else "bad.txt"), b"ok\r\nfine\nab\xffc\n", gz)
    with pytest.raises(DataError) as err:
        read_lines(path)
    assert str(err.value).startswith(f"{path}: line 3: not valid UTF-8 (byte 3 of the line: ")
    assert isinstance(err.value, UsageError)  # the user's file: exit 2


def test_truncated_or_fake_gzip_names_the_file(tmp_path):
    cut = _raw(tmp_path / "cut.txt.gz", gzip.compress(b"line\n" * 5000)[:-30])
    with pytest.raises(DataError, match=rf"{cut}: truncated or corrupt gzip file after line \d+"):
        read_lines(cut)
    fake = _raw(tmp_path / "fake.gz", b"plain text\n")
    with pytest.raises(DataError, match=rf"{fake}: truncated or corrupt gzip file after line 0"):
        read_lines(fake)


def test_missing_folder_and_stdin(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope.txt'}: file not found"):
        read_lines(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=f"{tmp_path}: is a folder, expected a text file"):
        read_lines(tmp_path)
    stdin = io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfa\r\nb\rc\n\xc3\n"))
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(DataError, match="<stdin>: line 3: not valid UTF-8"):
        read_lines("-")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"a\r\nb\rc\n")))
    assert read_lines(None) == ["a", "b\rc"]


def test_chunks_number_their_first_line(tmp_path):
    path = _raw(tmp_path / "five.txt", b"1\r\n2\n3\n4\n5")
    with textio.open_input(path) as (f, name):
        assert list(textio.chunks(f, name, 2)) == [(1, ["1", "2"]), (3, ["3", "4"]), (5, ["5"])]


# -- read_parallel -------------------------------------------------------------------------------


def test_read_parallel_streams_pairs(tmp_path):
    src = _write(tmp_path / "a.en", ["\ufeffone", "two", ""])
    tgt = _write(tmp_path / "a.de.gz", ["eins", "zwei", "leer"], gz=True)
    pairs = read_parallel(src, tgt)
    assert next(pairs) == ("one", "eins")  # a generator: nothing is read ahead in bulk
    assert list(pairs) == [("two", "zwei"), ("", "leer")]


def test_read_parallel_errors_name_the_file(tmp_path):
    good = _write(tmp_path / "good.txt", ["a", "b", "c"])
    short = _write(tmp_path / "short.txt", ["a", "b"])
    with pytest.raises(DataError) as err:
        list(read_parallel(good, short))
    assert f"{good} has 3 lines but {short} has 2" in str(err.value)
    with pytest.raises(DataError, match=f"{short} has 2 lines but {good} has 3"):
        list(read_parallel(short, good))

    empty = _write(tmp_path / "empty.txt", [])
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        list(read_parallel(empty, good))
    with pytest.raises(DataError, match=f"{empty}: empty file"):
        list(read_parallel(good, empty))

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\nalso fine\ncaf\xe9 latin-1\n")
    with pytest.raises(DataError, match=rf"{bad}: line 3: not valid UTF-8"):
        list(read_parallel(bad, good))

    with pytest.raises(DataError, match=f"{tmp_path / 'nope.txt'}: file not found"):
        list(read_parallel(tmp_path / "nope.txt", good))
    with pytest.raises(DataError, match="is a folder"):
        list(read_parallel(good, tmp_path))

    cut = tmp_path / "cut.txt.gz"
    cut.write_bytes(gzip.compress(b"a\nb\nc\n" * 1000)[:-20])
    with pytest.raises(DataError, match=f"{cut}: truncated or corrupt gzip"):
        list(read_parallel(cut, good))


# -- atomic writes --------------------------------------------------------------------------------


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_write_replaces_the_file_with_plain_permissions(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    with atomic_write(path, "w") as f:
        f.write("new\nlines\n")
        assert path.read_text() == "old\n"  # nothing under the final name before the end
        assert len(_files(tmp_path)) == 2  # the temporary file beside it
    assert path.read_bytes() == b"new\nlines\n"
    assert _files(tmp_path) == ["out.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("error", [ValueError("boom"), KeyboardInterrupt()])
def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary_file(tmp_path, error):
    path = tmp_path / "keep.bin"
    path.write_bytes(b"previous")
    with pytest.raises(type(error)):
        with atomic_write(path) as f:
            f.write(b"half of the new")
            raise error
    assert path.read_bytes() == b"previous"
    assert _files(tmp_path) == ["keep.bin"]
    with pytest.raises(type(error)):
        with atomic_write(tmp_path / "fresh.bin") as f:
            raise error
    assert _files(tmp_path) == ["keep.bin"]  # a new name is not created either


def test_open_output_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(UsageError, match="is a folder, expected an output file name"):
        with open_output(tmp_path):
            pass
    with pytest.raises(UsageError, match="the folder .*missing does not exist"):
        with open_output(tmp_path / "missing" / "out.txt"):
            pass
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere
            pytest.skip("running as root")
        with pytest.raises(UsageError, match="cannot write there"):
            with open_output(locked / "out.txt"):
                pass
    finally:
        locked.chmod(0o700)
