"""Parallel text to batches (layer 2): reading, encoding, caching, token-bucketed sampling.

Owns: validated streaming reads of line-aligned text (`read_parallel`); writing the
`translation` column of a hub dataset (nmt.corpora.HUB_CORPORA) as such text
(`export_hub_split`, `write_translation_text`); `prepare` (or `prepare_tokenizer`, then
`prepare`), which learns the tokenizer and encodes the train and valid splits into memory-mapped
Arrow datasets in `cfg.data.dir` (skipping work whose inputs and settings have not changed),
in memory bounded by chunk and sample sizes, not by the corpus; the
`TokenBatchSampler` (padded-token budget, per-epoch seeded order, per-rank shards, exact
resume); `Batch` and `collate`, from the fixed ids or from text re-segmented per batch
(`SubwordSampling`). Does not own the model, the optimizer or the training loop.

A prepared split holds, per example: `line` (0-based line in the raw files), `src_ids`
(pieces + [eos]), `tgt_ids` (pieces only; bos/eos are added by `collate`), `src_lens`
(= len(src_ids)) and `tgt_lens` (= len(tgt_ids)); with data.sampling_alpha set, the train
split also keeps the text, `src` and `tgt`.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from nmt.config import Config
from nmt.corpora import HubCorpus, get_hub_corpus
from nmt.errors import DataError, NmtError, UsageError
from nmt.tokenizer import Tokenizer

if TYPE_CHECKING:  # imported where used: batches and sampling work without HF datasets
    import datasets

FORMAT_VERSION = 1
TOKENIZER_SETTINGS = "tokenizer.json"
SPLIT_SETTINGS = "nmt_split.json"


def _log(msg: str) -> None:
    print(f"nmt: {msg}", file=sys.stderr, flush=True)


# -- reading --------------------------------------------------------------------------------------


def _open_binary(path: Path):
    try:
        if path.is_dir():
            raise DataError(f"{path}: is a folder, expected a text file")
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def _lines(path: Path) -> Iterator[str]:
    """Decoded lines without their line ends; errors name the file and the line."""
    line_no = 0
    with _open_binary(path) as f:
        try:
            for raw in f:
                line_no += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad = raw[e.start : e.start + 4]
                    raise DataError(
                        f"{path}, line {line_no}: not UTF-8 text (byte {e.start}: {bad!r})"
                    ) from None
                if line_no == 1:
                    text = text.removeprefix("\ufeff")
                yield text.rstrip("\r\n")
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(
                f"{path}: truncated or corrupt gzip file after line {line_no} ({e})"
            ) from None
        except OSError as e:
            raise DataError(f"{path}: read error after line {line_no}: {e}") from None


def _count_rest(it: Iterator[str]) -> int:
    return sum(1 for _ in it)


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> Iterator[tuple[str, str]]:
    """Yield (src, tgt) line pairs, streaming (.gz allowed).

    Raises DataError, naming the file, for: a missing or unreadable file, a file that is empty,
    invalid UTF-8 (with the line number), a truncated gzip, or different line counts (both
    files and both counts). The count check runs when the shorter file ends.
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    src_lines, tgt_lines = _lines(src_path), _lines(tgt_path)
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
    n_src = n + (0 if src is None else 1 + _count_rest(src_lines))
    n_tgt = n + (0 if tgt is None else 1 + _count_rest(tgt_lines))
    for path, count in ((src_path, n_src), (tgt_path, n_tgt)):
        if count == 0:
            raise DataError(f"{path}: empty file")
    raise DataError(
        f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}: "
        f"the two sides must be line-aligned"
    )


# -- hub corpora ----------------------------------------------------------------------------------


def load_hub_split(hub: HubCorpus, split: str, streaming: bool = True):
    """One split of a hub corpus: an IterableDataset streamed from the hub (nothing cached), or
    with `streaming=False` a Dataset downloaded into the HF cache and memory-mapped."""
    import datasets

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
    under temporary names and renamed when complete.
    """
    paths = [Path(src_path), Path(tgt_path)]
    tmps = [p.with_name(f".{p.name}.{os.getpid()}.part") for p in paths]
    try:
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(tmps[0], "w", encoding="utf-8", newline="\n") as src_out,
            open(tmps[1], "w", encoding="utf-8", newline="\n") as tgt_out,
        ):
            n = _write_pairs(rows, (src_lang, tgt_lang), (src_out, tgt_out), label, batch_size)
        for tmp, path in zip(tmps, paths):
            os.replace(tmp, path)
        return n
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _ensure_tokenizer(cfg: Config, data_dir: Path) -> Tokenizer:
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
    if _read_json(data_dir / TOKENIZER_SETTINGS) == settings:
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
    import datasets

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
    import datasets

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
        "tokenizer_sha256": hashlib.sha256(b"".join(tokenizer.to_bytes().values())).hexdigest(),
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
        import datasets

        datasets.disable_progress_bars()
    return data_dir


def prepare_tokenizer(cfg: Config) -> Tokenizer:
    """Learn the tokenizer into `cfg.data.dir` (or keep the one learned with these settings
    from these files). Sentencepiece reads a shuffled sample of
    tokenizer.input_sentence_size sentences, so memory does not grow with the corpus."""
    return _ensure_tokenizer(cfg, _checked_data_dir(cfg))


def prepare(cfg: Config) -> Path:
    """Learn the tokenizer and encode train (and valid, if set) into `cfg.data.dir`.

    Both splits get the same length filter (data.min_len, data.max_len; empty pairs always go);
    the `line` column maps each kept example back to its line in the raw files.

    Idempotent: a tokenizer learned from the same files with the same settings, and splits
    encoded from the same files with the same tokenizer and length limits, are kept. Returns
    the data folder.
    """
    d = cfg.data
    data_dir = _checked_data_dir(cfg)
    tokenizer = _ensure_tokenizer(cfg, data_dir)
    keep_text = d.sampling_alpha > 0  # batches of the train split are then re-segmented
    _encode_split("train", d.train_src, d.train_tgt, tokenizer, cfg, data_dir, keep_text)
    if d.valid_src:
        _encode_split("valid", d.valid_src, d.valid_tgt, tokenizer, cfg, data_dir)
    else:
        _log("valid: data.valid_src is not set, no validation split")
    return data_dir


def load_split(data_dir: str | Path, split: str) -> datasets.Dataset:
    """A prepared split (`train` or `valid`), memory-mapped from disk."""
    import datasets

    path = Path(data_dir) / split
    if not (path / SPLIT_SETTINGS).is_file():
        raise DataError(f"{path}: no prepared {split} split here (run `nmt prepare` first)")
    return datasets.load_from_disk(str(path))


def lengths(dataset: datasets.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """(src_lens, tgt_lens) of every example as int64 arrays, read from the length columns."""
    cols = dataset.with_format("numpy", columns=["src_lens", "tgt_lens"])[:]
    return cols["src_lens"].astype(np.int64), cols["tgt_lens"].astype(np.int64)


# -- batching -------------------------------------------------------------------------------------


def _greedy_batches(ids: np.ndarray, cost: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut `ids` (sorted by ascending `cost`) into the longest runs whose padded size
    len(run) * max(cost in run) fits `max_tokens`; an example over budget is a batch alone."""
    out, i, m = [], 0, len(ids)
    while i < m:
        j = min(m, i + max(1, max_tokens // int(cost[i])))  # an upper bound on the run's end
        while j - i > 1 and (j - i) * int(cost[j - 1]) > max_tokens:
            j = i + max(1, max_tokens // int(cost[j - 1]))  # still an upper bound, and smaller
        out.append(ids[i:j])
        i = j
    return out


def _even_out(batches: list[np.ndarray], world_size: int) -> list[np.ndarray]:
    """Make the number of batches a multiple of `world_size` by halving the largest batches
    (at most world_size - 1 splits, so every example still appears exactly once). Only when
    there are too few examples to split does it repeat batches from the start."""
    need = (-len(batches)) % world_size
    for _ in range(need):
        k = max(range(len(batches)), key=lambda b: len(batches[b]))
        if len(batches[k]) < 2:
            break
        half = len(batches[k]) // 2
        batches[k : k + 1] = [batches[k][:half], batches[k][half:]]
    need = (-len(batches)) % world_size
    return batches + [batches[k % len(batches)] for k in range(need)]


class TokenBatchSampler:
    """Batches of example indices under a padded-token budget, sharded per rank.

    Cost of a batch: n_sentences * max(max src len, max tgt len + 1), i.e. padded tokens of the
    larger side (`tgt_lens` count pieces; +1 for the bos/eos that `collate` adds). With
    `shuffle`, each epoch draws a permutation from (seed, epoch), sorts examples by length
    within pools of about `pool_size` batches, cuts batches greedily and shuffles the batch
    order; without it, one deterministic length-sorted order (for validation). Ranks take every
    `world_size`-th batch after the count has been made a multiple of `world_size` by splitting
    the largest batches (see `_even_out`): shards are disjoint, cover every example, and have the
    same number of batches.

    Position: `position` counts the batches of the current epoch already yielded; `__iter__`
    resumes there (an iteration that starts at the end of the epoch starts it over), and
    `state_dict`/`load_state_dict` carry (epoch, position, world_size) for an exact resume
    mid-epoch (approximate by a few batches when the number of ranks changes).
    `set_epoch(e)` moves to epoch e at position 0 (no-op if e is the current epoch, so that it
    can follow `load_state_dict`).
    """

    def __init__(
        self,
        src_lens: np.ndarray,
        tgt_lens: np.ndarray,
        max_tokens: int,
        shuffle: bool = True,
        seed: int = 1,
        rank: int = 0,
        world_size: int = 1,
        pool_size: int = 100,
    ):
        src_lens, tgt_lens = np.asarray(src_lens), np.asarray(tgt_lens)
        if src_lens.shape != tgt_lens.shape or src_lens.ndim != 1:
            raise ValueError(f"src_lens {src_lens.shape} and tgt_lens {tgt_lens.shape} differ")
        if max_tokens < 1 or pool_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"bad sampler settings: max_tokens={max_tokens}, "
                f"pool_size={pool_size}, rank={rank}, world_size={world_size}"
            )
        self.src_lens = src_lens.astype(np.int64)
        self.cost = np.maximum(self.src_lens, tgt_lens.astype(np.int64) + 1)  # (N,)
        self.max_tokens, self.shuffle, self.seed = int(max_tokens), shuffle, int(seed)
        self.rank, self.world_size = rank, world_size
        mean_cost = max(1, int(self.cost.mean())) if len(self.cost) else 1
        per_batch = max(1, self.max_tokens // mean_cost)
        self.pool_examples = pool_size * per_batch
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def _all_batches(self, epoch: int) -> list[np.ndarray]:
        n = len(self.cost)
        if n == 0:
            return []
        if not self.shuffle:
            order = np.lexsort((self.src_lens, self.cost))  # stable: ties keep index order
            return _even_out(
                _greedy_batches(order, self.cost[order], self.max_tokens), self.world_size
            )
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n)
        pool_of = np.arange(n) // self.pool_examples
        order = order[np.lexsort((self.cost[order], pool_of))]  # sorted within each pool
        batches = []
        for start in range(0, n, self.pool_examples):
            ids = order[start : start + self.pool_examples]
            batches += _greedy_batches(ids, self.cost[ids], self.max_tokens)
        batches = _even_out(batches, self.world_size)
        return [batches[k] for k in rng.permutation(len(batches))]

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch, in order."""
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self._all_batches(self.epoch)[self.rank :: self.world_size])
        return self._cache[1]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def __len__(self) -> int:
        return len(self.batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches()
        if self.position >= len(batches):
            self.position = 0
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch.tolist()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state` left off, under this sampler's number of ranks.

        Saved under the same number of ranks (or without `world_size`, a single-process
        state), the position is restored exactly. Saved under another number, it is mapped
        through the global count of batches the epoch had consumed, `position * world_size`
        (every rank had consumed as many), onto this sharding, rounded down: the epoch goes on
        after about the same share of its batches. That is approximate by a few batches: up to
        world_size - 1 are repeated by the rounding, and the order differs by the few batches
        that `_even_out` splits for one world size and not for the other.
        """
        saved_world_size = int(state.get("world_size", 1))
        consumed = int(state["position"]) * saved_world_size
        self.epoch, self.position = int(state["epoch"]), consumed // self.world_size


@dataclass
class Batch:
    """Padded (right) tensors of one batch. Masks: True = real token."""

    src_ids: torch.Tensor  # (B, S) pieces + [eos]
    src_lens: torch.Tensor  # (B,)
    tgt_in_ids: torch.Tensor  # (B, T) [bos] + pieces
    tgt_out_ids: torch.Tensor  # (B, T) pieces + [eos]
    tgt_lens: torch.Tensor  # (B,) pieces + 1
    indices: torch.Tensor  # (B,) example indices in the dataset

    @property
    def src_mask(self) -> torch.Tensor:
        positions = torch.arange(self.src_ids.size(1), device=self.src_ids.device)
        return positions[None, :] < self.src_lens[:, None]  # (B, S)

    @property
    def tgt_mask(self) -> torch.Tensor:
        positions = torch.arange(self.tgt_in_ids.size(1), device=self.tgt_in_ids.device)
        return positions[None, :] < self.tgt_lens[:, None]  # (B, T)

    @property
    def num_src_tokens(self) -> int:
        return int(self.src_lens.sum())

    @property
    def num_tgt_tokens(self) -> int:
        return int(self.tgt_lens.sum())

    def __len__(self) -> int:
        return self.src_ids.size(0)

    def to(self, device: torch.device | str) -> Batch:
        """A copy on `device` (from pinned memory, without blocking, when it is a GPU)."""
        device = torch.device(device)
        pin = device.type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            if pin and t.device.type == "cpu" and not t.is_pinned():
                t = t.pin_memory()
            return t.to(device, non_blocking=True)

        return Batch(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def pin_memory(self) -> Batch:
        """A copy in page-locked memory (called by torch's DataLoader with pin_memory=True)."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})


def _ragged(column) -> tuple[np.ndarray, np.ndarray]:
    """(all values concatenated, length of each row) of a column of id sequences: a pyarrow
    list array (fast path, what `make_batches` passes) or a sequence of sequences."""
    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        row_lens = np.diff(column.offsets.to_numpy())
        values = column.flatten().to_numpy(zero_copy_only=False)
        return values.astype(np.int64), row_lens.astype(np.int64)
    row_lens = np.array([len(s) for s in column], dtype=np.int64)
    if len(column) == 0:
        return np.zeros(0, dtype=np.int64), row_lens
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in column]), row_lens


def collate(examples: dict, indices, pad_id: int, bos_id: int, eos_id: int) -> Batch:
    """`examples` = columns `src_ids`, `tgt_ids` of dataset[indices] -> a right-padded Batch.

    Columns may be lists of id lists, lists of arrays, or pyarrow list arrays.
    """
    src_values, src_lens = _ragged(examples["src_ids"])  # (sum S_i,), (B,)
    tgt_values, n_pieces = _ragged(examples["tgt_ids"])  # (sum T_i - 1,), (B,)
    if len(src_lens) == 0:
        raise ValueError("collate: empty batch")
    tgt_lens = n_pieces + 1
    bsz, src_len, tgt_len = len(src_lens), int(src_lens.max()), int(tgt_lens.max())

    src_pos = np.arange(src_len)[None, :]  # (1, S)
    src_ids = np.full((bsz, src_len), pad_id, dtype=np.int64)  # (B, S)
    src_ids[src_pos < src_lens[:, None]] = src_values  # row-major fill = concatenation order

    tgt_pos = np.arange(tgt_len)[None, :]  # (1, T)
    tgt_in_ids = np.full((bsz, tgt_len), pad_id, dtype=np.int64)  # (B, T)
    tgt_in_ids[:, 0] = bos_id
    tgt_in_ids[(tgt_pos >= 1) & (tgt_pos <= n_pieces[:, None])] = tgt_values
    tgt_out_ids = np.full((bsz, tgt_len), pad_id, dtype=np.int64)  # (B, T)
    tgt_out_ids[tgt_pos < n_pieces[:, None]] = tgt_values
    tgt_out_ids[np.arange(bsz), n_pieces] = eos_id
    return Batch(
        src_ids=torch.from_numpy(src_ids),
        src_lens=torch.from_numpy(src_lens),
        tgt_in_ids=torch.from_numpy(tgt_in_ids),
        tgt_out_ids=torch.from_numpy(tgt_out_ids),
        tgt_lens=torch.from_numpy(tgt_lens),
        indices=torch.as_tensor(np.asarray(indices, dtype=np.int64)),
    )


@dataclass(frozen=True)
class SubwordSampling:
    """Subword regularization (data.sampling_alpha): each training batch is segmented afresh
    from its text, with `Tokenizer.encode_sampled`, instead of read from the fixed ids.

    The draw is seeded by `seed` and the batch's example indices (in order), so that a batch
    gets the same pieces in every process and after a resume, and the reshuffled batches of
    another epoch get new ones. Lengths stay those of the fixed segmentation for bucketing
    (sampled ones run longer: BPE-dropout 0.1 adds about 40% pieces on Multi30k), and the
    data.max_len filter applies to them too.
    """

    tokenizer: Tokenizer
    alpha: float
    seed: int

    def examples(self, table: pa.Table, indices) -> dict:
        """The `src_ids` and `tgt_ids` columns, sampled from the `src` and `tgt` text."""
        key = zlib.crc32(np.asarray(indices, dtype=np.int64).tobytes())
        seed = zlib.crc32(f"{self.seed}:{key}".encode())  # 32 bits, as sentencepiece takes
        src = table.column("src").to_pylist()
        tgt = table.column("tgt").to_pylist()
        src_ids, tgt_ids = self.tokenizer.encode_sampled(src, tgt, self.alpha, seed)
        eos = self.tokenizer.eos_id
        return {"src_ids": [ids + [eos] for ids in src_ids], "tgt_ids": tgt_ids}


class _Collated:
    """dataset[list of indices] -> Batch: what a loader asks for, one batch per key."""

    def __init__(
        self,
        dataset: datasets.Dataset,
        pad_id: int,
        bos_id: int,
        eos_id: int,
        sampling: SubwordSampling | None = None,
    ):
        if sampling is not None and not {"src", "tgt"} <= set(dataset.column_names):
            raise UsageError(
                "data.sampling_alpha needs the text in the prepared train split: prepare it "
                "again with data.sampling_alpha set (`nmt prepare`, or a recipe's "
                "--start-stage prepare), which keeps the text"
            )
        names = ["src", "tgt"] if sampling is not None else ["src_ids", "tgt_ids"]
        self.columns = dataset.with_format("arrow", columns=names)
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.sampling = sampling

    def __getitem__(self, indices: list[int]) -> Batch:
        table = self.columns[indices]  # a pyarrow Table: no per-row Python objects
        if self.sampling is not None:
            examples = self.sampling.examples(table, indices)
        else:
            examples = {name: table.column(name) for name in ("src_ids", "tgt_ids")}
        return collate(examples, indices, self.pad_id, self.bos_id, self.eos_id)


def make_batches(
    dataset: datasets.Dataset,
    sampler: TokenBatchSampler,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    sampling: SubwordSampling | None = None,
) -> Iterator[Batch]:
    """Batches in the sampler's order (resuming at its position), built in this process."""
    collated = _Collated(dataset, pad_id, bos_id, eos_id, sampling)
    for indices in sampler:
        yield collated[indices]


class _InProcess:
    """Iterable once per epoch: the batches from the sampler's position, as `make_batches`."""

    def __init__(self, collated: _Collated, sampler: TokenBatchSampler):
        self.collated, self.sampler = collated, sampler

    def __iter__(self) -> Iterator[Batch]:
        return (self.collated[indices] for indices in self.sampler)


def _as_is(batch: Batch) -> Batch:
    return batch


def batch_loader(
    dataset: datasets.Dataset,
    sampler: TokenBatchSampler,
    pad_id: int,
    bos_id: int,
    eos_id: int,
    workers: int = 0,
    pin_memory: bool = False,
    sampling: SubwordSampling | None = None,
):
    """An iterable over the rest of the sampler's epoch, one pass per `iter()`.

    Without workers or pinning, the batches are built in this process, as `make_batches` does.
    Otherwise a torch DataLoader builds them in `workers` background processes (kept across
    epochs) and copies them into page-locked memory, so that `Batch.to("cuda")` does not block.
    The loader then draws indices from the sampler ahead of the batches the caller has used:
    the caller must count the batches it consumed to know the resumable position.
    """
    collated = _Collated(dataset, pad_id, bos_id, eos_id, sampling)
    if workers == 0 and not pin_memory:
        return _InProcess(collated, sampler)
    return torch.utils.data.DataLoader(
        collated,
        batch_size=None,  # the sampler yields whole batches of indices
        sampler=sampler,
        num_workers=workers,
        collate_fn=_as_is,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        generator=torch.Generator(),  # its seeds for the workers leave the global RNG alone
    )
