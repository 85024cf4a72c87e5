"""Parallel text to prepared datasets (layer 2): learn the tokenizer, encode, cache.

Owns: `prepare` (or `prepare_tokenizer`, then `prepare`), which learns the tokenizer (or takes
a given one: `nmt prepare --tokenizer-from CKPT`) and encodes the train and valid splits into
memory-mapped Arrow datasets in `cfg.data.dir`, skipping work whose inputs and settings have not
changed, in memory bounded by chunk and sample sizes, not by the corpus; reading a prepared split
back (`load_split`, `lengths`); writing the `translation` column of a hub dataset
(nmt.corpora.HUB_CORPORA) as line-aligned text (`export_hub_split`, `write_translation_text`).
Does not own: reading text files (nmt.textio), batching (nmt.batching), the model or training.

A prepared split holds, per example: `line` (0-based line in the raw files), `src_ids`
(pieces + [eos]), `tgt_ids` (pieces only; bos/eos are added by `collate`), `src_lens`
(= len(src_ids)) and `tgt_lens` (= len(tgt_ids)); with data.sampling_alpha set, the train
split also keeps the text, `src` and `tgt`. `tokenizer.json` records how the folder's
tokenizer was made (the settings it was learned with, or the checkpoint it was taken from),
`SPLIT/nmt_split.json` what each split was encoded from.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from nmt.config import Config
from nmt.corpora import HubCorpus, get_hub_corpus
from nmt.errors import DataError, NmtError, UsageError
from nmt.textio import atomic_write, atomic_write_text, read_parallel
from nmt.tokenizer import Tokenizer

FORMAT_VERSION = 1
TOKENIZER_SETTINGS = "tokenizer.json"
SPLIT_SETTINGS = "nmt_split.json"


def _log(msg: str) -> None:
    print(f"nmt: {msg}", file=sys.stderr, flush=True)


# -- hub corpora ----------------------------------------------------------------------------------


def load_hub_split(hub: HubCorpus, split: str, streaming: bool = True):
    """One split of a hub corpus: an IterableDataset streamed from the hub (nothing cached), or
    with `streaming=False` a Dataset downloaded into the HF cache and memory-mapped."""
    if split not in hub.splits:
        raise UsageError(f"{hub.name}: unknown split {split!r}; splits: {', '.join(hub.splits)}")
    options = {"revision": hub.revision, "data_dir": hub.data_dir}
    try:
        return datasets.load_dataset(
            hub.path,
            hub.config,
            split=split,
            streaming=streaming,
            **{k: v for k, v in options.items() if v},
        )
    except (OSError, ValueError, RuntimeError) as e:  # ConnectionError, not found, bad split
        raise NmtError(
            f"{hub.name}: cannot load split {split!r} of the Hugging Face dataset {hub.path!r}: "
            f"{e} (this step needs internet access, or the data in the HF cache)"
        ) from None


def _one_line(text: str) -> str:
    """A sentence as one line: line breaks inside it become spaces."""
    return text.replace("\r\n", " ").replace("\n", " ").replace("\r", " ")


def _translation_batches(rows, label: str, batch_size: int) -> Iterator[list]:
    """The `translation` column of `rows` in lists; a failing source is an NmtError."""
    batches, n = rows.iter(batch_size=batch_size), 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # the source's own failure (network, file), not ours
            raise NmtError(
                f"{label}: reading failed after {n} rows: {type(e).__name__}: {e}"
            ) from None
        if "translation" not in batch:
            raise DataError(
                f"{label}: expected a 'translation' column, found columns {sorted(batch)}"
            )
        n += len(batch["translation"])
        yield batch["translation"]


def _write_pairs(rows, langs: tuple[str, str], outs, label: str, batch_size: int) -> int:
    n = 0
    for pairs in _translation_batches(rows, label, batch_size):
        for pair in pairs:
            texts = [pair.get(lang) if isinstance(pair, dict) else None for lang in langs]
            if not all(isinstance(t, str) for t in texts):
                raise DataError(
                    f"{label}, row {n}: expected {langs[0]!r} and {langs[1]!r} texts in "
                    f"'translation', found {str(pair)[:200]}"
                )
            for out, text in zip(outs, texts):
                out.write(_one_line(text) + "\n")
            n += 1
    return n


def write_translation_text(
    rows, src_lang: str, tgt_lang: str, src_path, tgt_path, label="dataset", batch_size=1000
) -> int:
    """Write the `translation` column ({lang: text}) of a datasets Dataset or IterableDataset
    as two line-aligned text files; return the number of pairs.

    Streams batch by batch. Line i is row i: line breaks inside a sentence become spaces and
    empty sentences stay (the length filter of `prepare` drops them). Both files are written
    atomically (nmt.textio.atomic_write): on any failure neither is replaced.
    """
    paths = [Path(src_path), Path(tgt_path)]
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        outs = [stack.enter_context(atomic_write(p, "w")) for p in paths]
        return _write_pairs(rows, (src_lang, tgt_lang), outs, label, batch_size)


def export_hub_split(
    name: str, split: str, src_lang: str, tgt_lang: str, src_path, tgt_path, streaming=True
) -> int:
    """Write `split` of the hub corpus `name` as line-aligned text files (see
    write_translation_text); return the number of pairs."""
    hub = get_hub_corpus(name)
    for lang in (src_lang, tgt_lang):
        if lang not in hub.langs:
            raise UsageError(f"{name}: no language {lang!r}; languages: {', '.join(hub.langs)}")
    start = time.perf_counter()
    rows = load_hub_split(hub, split, streaming=streaming)
    n = write_translation_text(rows, src_lang, tgt_lang, src_path, tgt_path, f"{name} {split}")
    _log(
        f"{name} {split}: {n} pairs in {time.perf_counter() - start:.0f}s -> {src_path}, {tgt_path}"
    )
    return n


# -- prepare --------------------------------------------------------------------------------------


def _file_id(path: str | Path) -> dict:
    """What identifies an input file's content cheaply: absolute path, size, mtime."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"{p}: file not found") from None
    return {"path": str(p.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _models_sha256(tokenizer: Tokenizer) -> str:
    return hashlib.sha256(b"".join(tokenizer.to_bytes().values())).hexdigest()


def _learned_tokenizer(cfg: Config, data_dir: Path, recorded: dict | None) -> Tokenizer:
    """Load the tokenizer in `data_dir` if it was learned with these settings, else learn it."""
    t, d = cfg.tokenizer, cfg.data
    settings = {
        "format": FORMAT_VERSION,
        "model_type": t.model_type,
        "vocab_size": t.vocab_size,
        "joint": t.joint,
        "character_coverage": t.character_coverage,
        "input_sentence_size": t.input_sentence_size,
        "seed": cfg.train.seed,
        "train_src": _file_id(d.train_src),
        "train_tgt": _file_id(d.train_tgt),
    }
    if recorded == settings:
        try:
            tok = Tokenizer.load(data_dir)
            if tok.joint == t.joint:
                _log(f"tokenizer: kept {data_dir} ({tok})")
                return tok
        except UsageError:
            pass
    start = time.perf_counter()
    # fail fast, with the file and line, before minutes of sentencepiece training
    for _ in read_parallel(d.train_src, d.train_tgt):
        pass
    (data_dir / TOKENIZER_SETTINGS).unlink(missing_ok=True)
    tok = Tokenizer.train(
        [d.train_src],
        [d.train_tgt],
        data_dir,
        model_type=t.model_type,
        vocab_size=t.vocab_size,
        joint=t.joint,
        character_coverage=t.character_coverage,
        input_sentence_size=t.input_sentence_size,
        seed=cfg.train.seed,
    )
    _write_json(data_dir / TOKENIZER_SETTINGS, settings)
    _log(f"tokenizer: learned {tok} in {time.perf_counter() - start:.1f}s -> {data_dir}")
    return tok


def _tokenizer_with_sha256(data_dir: Path, sha256: str | None) -> Tokenizer | None:
    """The tokenizer in `data_dir` if its model bytes have this sha256, else None."""
    try:
        tok = Tokenizer.load(data_dir)
    except UsageError:
        return None
    return tok if _models_sha256(tok) == sha256 else None


def _given_tokenizer(tokenizer: Tokenizer, origin: str, data_dir: Path) -> Tokenizer:
    """Write a given tokenizer (a checkpoint's, `nmt prepare --tokenizer-from`) into `data_dir`
    byte for byte, and record where it came from, so that a later prepare keeps it."""
    settings = {"format": FORMAT_VERSION, "checkpoint": origin, "sha256": _models_sha256(tokenizer)}
    if _read_json(data_dir / TOKENIZER_SETTINGS) == settings:
        kept = _tokenizer_with_sha256(data_dir, settings["sha256"])
        if kept is not None:
            _log(f"tokenizer: kept {data_dir} ({kept}), the model of the checkpoint {origin}")
            return kept
    (data_dir / TOKENIZER_SETTINGS).unlink(missing_ok=True)
    tokenizer.save(data_dir)
    _write_json(data_dir / TOKENIZER_SETTINGS, settings)
    _log(
        f"tokenizer: the model of the checkpoint {origin} ({tokenizer}) -> {data_dir}; nothing "
        f"learned, the tokenizer.* settings are not used"
    )
    return Tokenizer.load(data_dir)


def _kept_given_tokenizer(recorded: dict, data_dir: Path) -> Tokenizer:
    """The checkpoint's tokenizer an earlier `--tokenizer-from` wrote into `data_dir`: kept, never
    relearned over; files that are no longer those bytes are refused."""
    origin = recorded["checkpoint"]
    tok = _tokenizer_with_sha256(data_dir, recorded.get("sha256"))
    if tok is None:
        raise UsageError(
            f"{data_dir}: its sentencepiece files are not the model of the checkpoint {origin} "
            f"that {TOKENIZER_SETTINGS} records: run `nmt prepare CONFIG --tokenizer-from "
            f"{origin}` again, or use another data.dir"
        )
    _log(
        f"tokenizer: kept {data_dir} ({tok}), the model of the checkpoint {origin} "
        f"(--tokenizer-from); the tokenizer.* settings are not used"
    )
    return tok


def _ensure_tokenizer(
    cfg: Config, data_dir: Path, given: Tokenizer | None = None, origin: str = ""
) -> Tokenizer:
    """The tokenizer of `data_dir`: `given` (written there), the checkpoint's an earlier
    prepare wrote there, or one learned from the training text (kept if still current)."""
    if given is not None:
        return _given_tokenizer(given, origin, data_dir)
    recorded = _read_json(data_dir / TOKENIZER_SETTINGS)
    if isinstance(recorded, dict) and "checkpoint" in recorded:
        return _kept_given_tokenizer(recorded, data_dir)
    return _learned_tokenizer(cfg, data_dir, recorded)


def _encode_batch(batch: dict, tokenizer: Tokenizer) -> dict:
    eos = tokenizer.eos_id
    src_ids = [ids + [eos] for ids in tokenizer.encode_src(batch["src"])]
    tgt_ids = tokenizer.encode_tgt(batch["tgt"])
    return {
        "src_ids": src_ids,
        "tgt_ids": tgt_ids,
        "src_lens": [len(ids) for ids in src_ids],
        "tgt_lens": [len(ids) for ids in tgt_ids],
    }


def _keep_mask(src_lens, tgt_lens, min_len: int, max_len: int) -> np.ndarray:
    """Pairs whose piece counts (src without its eos) lie in [max(min_len, 1), max_len]."""
    src_pieces = np.asarray(src_lens) - 1
    tgt_pieces = np.asarray(tgt_lens)
    low = max(min_len, 1)
    return (
        (src_pieces >= low)
        & (src_pieces <= max_len)
        & (tgt_pieces >= low)
        & (tgt_pieces <= max_len)
    )


def _features(tokenizer: Tokenizer, keep_text: bool) -> datasets.Features:
    big = max(tokenizer.src_vocab_size, tokenizer.tgt_vocab_size) > np.iinfo(np.int16).max
    dtype = "int32" if big else "int16"
    text = {"src": datasets.Value("string"), "tgt": datasets.Value("string")} if keep_text else {}
    return datasets.Features(
        {
            "line": datasets.Value("int64"),
            **text,
            "src_ids": datasets.List(datasets.Value(dtype)),
            "tgt_ids": datasets.List(datasets.Value(dtype)),
            "src_lens": datasets.Value("int32"),
            "tgt_lens": datasets.Value("int32"),
        }
    )


def _swap_in(tmp_dir: Path, final_dir: Path) -> None:
    """Rename a finished folder into place, replacing an older one."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _raw_pairs(src: str, tgt: str, path: Path, chunk: int = 10_000) -> datasets.Dataset:
    """The pairs (columns line, src, tgt) as an Arrow file written chunk by chunk, memory-mapped.

    Streams: memory holds one chunk, whatever the corpus size. Read errors are DataErrors
    naming the file and line (read_parallel).
    """
    schema = pa.schema([("line", pa.int64()), ("src", pa.string()), ("tgt", pa.string())])
    pairs = read_parallel(src, tgt)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        n = 0
        while block := list(itertools.islice(pairs, chunk)):
            src_text, tgt_text = zip(*block)
            line = pa.array(np.arange(n, n + len(block)), pa.int64())
            columns = [line, pa.array(src_text, pa.string()), pa.array(tgt_text, pa.string())]
            writer.write_batch(pa.record_batch(columns, schema=schema))
            n += len(block)
    return datasets.Dataset.from_file(str(path))


def _split_settings(src: str, tgt: str, tokenizer: Tokenizer, cfg: Config, keep_text: bool) -> dict:
    """What a prepared split depends on: if these match, it is kept."""
    settings = {
        "format": FORMAT_VERSION,
        "tokenizer_sha256": _models_sha256(tokenizer),
        "src": _file_id(src),
        "tgt": _file_id(tgt),
        "min_len": cfg.data.min_len,
        "max_len": cfg.data.max_len,
    }
    if keep_text:  # absent otherwise, so that splits prepared without the key are kept
        settings["text"] = True
    return settings


def _encode_split(
    split: str,
    src: str,
    tgt: str,
    tokenizer: Tokenizer,
    cfg: Config,
    data_dir: Path,
    keep_text: bool = False,
) -> None:
    """Encode one split into `data_dir/split`: raw Arrow file → batched map(encode) → drop
    the pairs outside the length limits → save_to_disk, renamed into place when complete.
    `keep_text` keeps the `src` and `tgt` text columns (for subword sampling)."""

    d = cfg.data
    settings = _split_settings(src, tgt, tokenizer, cfg, keep_text)
    final_dir = data_dir / split
    if _read_json(final_dir / SPLIT_SETTINGS) == settings:
        _log(f"{split}: kept {final_dir}")
        return
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(dir=data_dir, prefix=f".{split}.work-"))
    try:
        encoded = _raw_pairs(src, tgt, work / "raw.arrow").map(
            _encode_batch,
            batched=True,
            batch_size=1000,
            fn_kwargs={"tokenizer": tokenizer},
            remove_columns=[] if keep_text else ["src", "tgt"],
            features=_features(tokenizer, keep_text),
            num_proc=d.num_proc if d.num_proc > 1 else None,
            desc=f"encode {split}",
        )
        lens = encoded.with_format("numpy", columns=["src_lens", "tgt_lens"])[:]
        keep = _keep_mask(lens["src_lens"], lens["tgt_lens"], d.min_len, d.max_len)
        if not keep.any():
            raise DataError(
                f"{src}: no pair of {split} has between {max(d.min_len, 1)} and {d.max_len} "
                f"pieces on both sides (data.min_len, data.max_len)"
            )
        kept = encoded if keep.all() else encoded.select(np.flatnonzero(keep))
        kept.save_to_disk(str(work / "out"))
        _write_json(work / "out" / SPLIT_SETTINGS, settings)
        _swap_in(work / "out", final_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n_all, n_kept = len(keep), int(keep.sum())
    n_long = int(((lens["src_lens"] - 1 > d.max_len) | (lens["tgt_lens"] > d.max_len)).sum())
    _log(
        f"{split}: {n_all} pairs, kept {n_kept}, dropped {n_all - n_kept} ({n_long} over "
        f"{d.max_len} pieces, {n_all - n_kept - n_long} empty or under {max(d.min_len, 1)}) "
        f"in {time.perf_counter() - start:.1f}s -> {final_dir}"
    )


def _checked_data_dir(cfg: Config) -> Path:
    """Check the data paths of `cfg` before any long work; create and return data.dir."""
    d = cfg.data
    if not d.train_src or not d.train_tgt:
        raise UsageError(
            "data.train_src and data.train_tgt must name the training text files "
            "(e.g. from `nmt download multi30k --langs en de --out DIR`)"
        )
    if bool(d.valid_src) != bool(d.valid_tgt):
        raise UsageError("data.valid_src and data.valid_tgt must be set together")
    for path in (d.train_src, d.train_tgt, d.valid_src, d.valid_tgt):
        if path:
            _file_id(path)  # a missing file fails here, before any long work
    data_dir = Path(d.dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    if not sys.stderr.isatty():  # progress bars only on a terminal; logs stay readable
        datasets.disable_progress_bars()
    return data_dir


def prepare_tokenizer(cfg: Config) -> Tokenizer:
    """Learn the tokenizer into `cfg.data.dir` (or keep the one learned with these settings
    from these files). Sentencepiece reads a shuffled sample of
    tokenizer.input_sentence_size sentences, so memory does not grow with the corpus."""
    return _ensure_tokenizer(cfg, _checked_data_dir(cfg))


def prepare(cfg: Config, tokenizer: Tokenizer | None = None, tokenizer_origin: str = "") -> Path:
    """Learn the tokenizer and encode train (and valid, if set) into `cfg.data.dir`.

    Both splits get the same length filter (data.min_len, data.max_len; empty pairs always go);
    the `line` column maps each kept example back to its line in the raw files.

    With `tokenizer` (a checkpoint's, named by `tokenizer_origin`: `nmt prepare
    --tokenizer-from`), nothing is learned: its model files are written into data.dir byte for
    byte and the tokenizer.* settings are not used; a later prepare of the folder keeps it.

    Idempotent: a tokenizer learned from the same files with the same settings, and splits
    encoded from the same files with the same tokenizer and length limits, are kept. Returns
    the data folder.
    """
    d = cfg.data
    data_dir = _checked_data_dir(cfg)
    tokenizer = _ensure_tokenizer(cfg, data_dir, tokenizer, tokenizer_origin)
    keep_text = d.sampling_alpha > 0  # batches of the train split are then re-segmented
    _encode_split("train", d.train_src, d.train_tgt, tokenizer, cfg, data_dir, keep_text)
    if d.valid_src:
        _encode_split("valid", d.valid_src, d.valid_tgt, tokenizer, cfg, data_dir)
    else:
        _log("valid: data.valid_src is not set, no validation split")
    return data_dir


def load_split(data_dir: str | Path, split: str) -> datasets.Dataset:
    """A prepared split (`train` or `valid`), memory-mapped from disk."""
    path = Path(data_dir) / split
    if not (path / SPLIT_SETTINGS).is_file():
        raise DataError(f"{path}: no prepared {split} split here (run `nmt prepare` first)")
    return datasets.load_from_disk(str(path))


def lengths(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(src_lens, tgt_lens) of every example as int64 arrays, read from the length columns."""
    cols = dataset.with_format("numpy", columns=["src_lens", "tgt_lens"])[:]
    return cols["src_lens"].astype(np.int64), cols["tgt_lens"].astype(np.int64)
