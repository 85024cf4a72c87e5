"""Reading and writing the toolkit's files (layer 0): one line rule, one atomic write.

Owns: the line reader every text input goes through (training and validation text, files to
translate, hypotheses, references); opening an input (a file, a `.gz` file, or stdin) and an
output (a file written atomically, or stdout); line-aligned pairs of files (`read_parallel`);
`atomic_write`, the one way any file of the toolkit is written under its final name
(checkpoints, downloads, tokenizer models, prepared-data settings, translations, recipe files).
Does not own: what the lines mean (nmt.data, nmt.translator, nmt.evaluation), or turning a
failed checkpoint write into a run's error message (nmt.checkpoint).

The line rule, the same for every file read here:
- a line ends at "\\n"; one "\\r" just before it belongs to the line end, so a CRLF file reads as
  its LF copy; a "\\r" anywhere else (and "\\x0b", "\\x1c", "\\x85", "\\u2028") is text inside its
  line. The line count is thus that of `wc -l` (plus a last line without "\\n"), and a line
  holding a lone "\\r" keeps translation N lines in, N lines out;
- text is strict UTF-8; a BOM at the start of the file is dropped; invalid UTF-8 is a DataError
  naming the file, the line and the byte;
- a file named `*.gz` is read through gzip; a truncated or corrupt one is a DataError naming the
  file and the last good line.

Atomic writes: the data goes to a temporary file in the same folder (`.NAME.XXXX.tmp`), is
flushed and fsynced, gets the permissions a plain `open` would give, and is renamed onto the
final name; on any error or interrupt the temporary file is removed and a file already under the
final name is left as it was.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import sys
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from nmt.errors import DataError, UsageError

_BOM = b"\xef\xbb\xbf"


# -- reading --------------------------------------------------------------------------------------


def _decode(raw: bytes, lineno: int, name: str) -> str:
    if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if lineno == 1 and raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{name}: line {lineno}: not valid UTF-8 (byte {e.start + 1} of the line: "
            f"{raw[e.start : e.end]!r}); convert the file to UTF-8, e.g. with iconv"
        ) from None


def iter_lines(f, name: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) for each line of the binary stream `f`, by the line rule of
    the module docstring; `name` is the file's name in error messages."""
    lineno = 0
    try:
        for raw in f:
            lineno += 1
            yield lineno, _decode(raw, lineno, name)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(
            f"{name}: truncated or corrupt gzip file after line {lineno} ({e})"
        ) from None
    except OSError as e:
        raise DataError(f"{name}: read error after line {lineno}: {e.strerror or e}") from None


def _is_std(path) -> bool:
    return path is None or str(path) == "-"


@contextlib.contextmanager
def open_input(path: str | Path | None):
    """Yield (binary stream, display name) for `path`: stdin for None or "-", a `.gz` file read
    through gzip, else the file. A missing, unreadable or folder path is a DataError."""
    if _is_std(path):
        yield getattr(sys.stdin, "buffer", sys.stdin), "<stdin>"
        return
    path = Path(path)
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        yield f, str(path)


def file_lines(path: str | Path | None) -> Iterator[str]:
    """The lines of `path` (see `open_input`), streaming; the file closes when they end."""
    with open_input(path) as (f, name):
        for _, text in iter_lines(f, name):
            yield text


def read_lines(path: str | Path | None) -> list[str]:
    """Every line of `path` (see `open_input`)."""
    return list(file_lines(path))


def chunks(f, name: str, chunk_lines: int) -> Iterator[tuple[int, list[str]]]:
    """(1-based number of the chunk's first line, its lines), `chunk_lines` at a time."""
    chunk: list[str] = []
    first = 1
    for lineno, text in iter_lines(f, name):
        if not chunk:
            first = lineno
        chunk.append(text)
        if len(chunk) == chunk_lines:
            yield first, chunk
            chunk = []
    if chunk:
        yield first, chunk


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (src, tgt) line pairs of two line-aligned files, streaming (.gz allowed).

    Raises DataError, naming the file, for: a missing or unreadable file, a file that is empty,
    invalid UTF-8 (with the line number), a truncated gzip, or different line counts (both
    files and both counts). The count check runs when the shorter file ends.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src_lines, tgt_lines = file_lines(src_path), file_lines(tgt_path)
    n = 0
    while True:
        src = next(src_lines, None)
        tgt = next(tgt_lines, None)
        if src is None or tgt is None:
            break
        n += 1
        yield src, tgt
    if src is None and tgt is None:
        if n == 0:
            raise DataError(f"{src_path}: empty file (and {tgt_path})")
        return
    n_src = n + (0 if src is None else 1 + sum(1 for _ in src_lines))
    n_tgt = n + (0 if tgt is None else 1 + sum(1 for _ in tgt_lines))
    for path, count in ((src_path, n_src), (tgt_path, n_tgt)):
        if count == 0:
            raise DataError(f"{path}: empty file")
    raise DataError(
        f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}: "
        f"the two sides must be line-aligned"
    )


# -- writing --------------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "wb"):
    """Yield a file open on a temporary name beside `path` ("wb", or "w" for UTF-8 text with
    "\\n" line ends); when the block ends without error it is fsynced and renamed onto `path`.
    On any error (or interrupt) the temporary file is removed and `path` is left as it was.
    The folder must exist."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', found {mode!r}")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        text = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
        with open(fd, mode, **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically (see `atomic_write`)."""
    with atomic_write(path, "w") as f:
        f.write(text)


@contextlib.contextmanager
def open_output(path: str | Path | None):
    """Yield a write(bytes) function for `path` (stdout for None or "-").

    A file is written with `atomic_write`: a file under the final name is always complete.
    A folder, a missing parent folder or a folder that cannot be written is a UsageError.
    """
    if _is_std(path):
        sys.stdout.flush()  # text written before must come first
        out = getattr(sys.stdout, "buffer", None)
        if out is None:  # a text-only stream (some test harnesses)
            yield lambda data: sys.stdout.write(data.decode("utf-8"))
        else:
            yield out.write
        sys.stdout.flush()
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{path}: is a folder, expected an output file name")
    if not target.parent.is_dir():
        raise UsageError(f"{path}: the folder {target.parent} does not exist")
    stack = contextlib.ExitStack()
    try:
        f = stack.enter_context(atomic_write(target))
    except OSError as e:  # the temporary file cannot be created
        raise UsageError(f"{path}: cannot write there ({e.strerror or e})") from None
    with stack:
        yield f.write
