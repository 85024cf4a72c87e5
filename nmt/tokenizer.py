"""Sentencepiece models: learn, load, encode, decode, and carry as bytes (layer 1).

Owns: one joint sentencepiece model shared by both sides, or one per side; the special ids
(`pad_id`, `unk_id`, `bos_id`, `eos_id`, read from the model, never hard-coded elsewhere); the
files `spm.model` (joint) or `spm.src.model` + `spm.tgt.model` in a folder; bytes for
checkpoints. Encoding returns pieces only: adding bos/eos is the data layer's job.
Does not own: which text to learn from (nmt.data.prepare decides) or batching.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import sentencepiece as spm

from nmt.errors import DataError, UsageError
from nmt.textio import atomic_write_bytes

JOINT_FILE = "spm.model"
SRC_FILE = "spm.src.model"
TGT_FILE = "spm.tgt.model"
# The ids every model trained here gets; loaded models are read, not assumed.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# sentencepiece's sampling seed is global to the process: one seeded draw at a time.
_SAMPLING_LOCK = threading.Lock()


def _processor(model_bytes: bytes, name: str) -> spm.SentencePieceProcessor:
    """A processor from model bytes; anything that is not a sentencepiece model is a UsageError."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError, TypeError) as e:
        raise UsageError(f"{name}: not a sentencepiece model ({e})") from None
    missing = [k for k in ("pad", "bos", "eos", "unk") if getattr(sp, f"{k}_id")() < 0]
    if missing:
        raise UsageError(
            f"{name}: the sentencepiece model has no {', '.join(missing)} piece "
            f"(train it with nmt, or with pad_id/bos_id/eos_id set)"
        )
    return sp


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path}: tokenizer model not found") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read tokenizer model: {e.strerror}") from None


def _plain_inputs(files: Sequence[str | Path], tmp_dir: Path) -> list[str]:
    """Paths sentencepiece can read: .gz files are decompressed into `tmp_dir`."""
    plain = []
    for i, f in enumerate(files):
        f = Path(f)
        if not f.is_file():
            raise DataError(f"{f}: training text not found" + (" (a folder)" if f.exists() else ""))
        if f.suffix != ".gz":
            plain.append(str(f))
            continue
        out = tmp_dir / f"{i}.{f.stem}"
        try:
            with gzip.open(f, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{f}: truncated or corrupt gzip file ({e})") from None
        plain.append(str(out))
    return plain


def _train_one(
    inputs: list[str],
    prefix: Path,
    model_type: str,
    vocab_size: int,
    character_coverage: float,
    input_sentence_size: int,
    seed: int,
) -> None:
    # sentencepiece refuses a sample of 1..100 sentences; such a sample means "small": take 101.
    sample = 0 if input_sentence_size <= 0 else max(input_sentence_size, 101)
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            input=inputs,
            model_prefix=str(prefix),
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=sample,
            shuffle_input_sentence=True,
            hard_vocab_limit=False,  # a small corpus gives a smaller vocabulary, not an error
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            num_threads=max(1, min(16, os.cpu_count() or 1)),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise DataError(
            f"sentencepiece could not learn a model from {', '.join(inputs)}: {e}"
        ) from None


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _fields(data: bytes):
    """(field number, raw bytes of the whole field, payload of a length-delimited one) of a
    protobuf message, in order (the wire format: varint key, then the value)."""
    pos = 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        payload = None
        wire = key & 7
        if wire == 0:
            pos = _varint(data, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            payload, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated protobuf")
        yield key >> 3, data[start:pos], payload


_TRAINER_SPEC, _TRAINER_PATHS = 2, (1, 2)  # ModelProto.trainer_spec; its input, model_prefix


def comparable_bytes(model: bytes) -> bytes:
    """A sentencepiece model's bytes without the file paths its trainer recorded
    (trainer_spec.input and .model_prefix): two models learned alike from the same text in two
    folders (two `nmt prepare` runs) tokenize alike but differ in those paths alone. Everything
    that decides tokenization stays. Bytes that do not parse are returned whole."""
    try:
        out = bytearray()
        for number, raw, payload in _fields(model):
            if number != _TRAINER_SPEC or payload is None:
                out += raw
                continue
            kept = b"".join(r for n, r, _ in _fields(payload) if n not in _TRAINER_PATHS)
            out += raw[: len(raw) - len(payload) - len(_encode_varint(len(payload)))]  # the key
            out += _encode_varint(len(kept)) + kept
        return bytes(out)
    except (ValueError, IndexError):
        return bytes(model)


def _vocab_file(model_file: str) -> str:
    return model_file.replace(".model", ".vocab")


def _install(out_dir: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name: bytes) into `out_dir`, each atomically, after removing the model and
    vocab files not among them: a folder never holds two tokenizers."""
    for model in (JOINT_FILE, SRC_FILE, TGT_FILE):
        for name in (model, _vocab_file(model)):
            if name not in files:
                (out_dir / name).unlink(missing_ok=True)
    for name, data in files.items():
        atomic_write_bytes(out_dir / name, data)


class Tokenizer:
    """One joint sentencepiece model, or a source and a target model."""

    def __init__(self, src_model: bytes, tgt_model: bytes | None = None, name: str = "tokenizer"):
        """`tgt_model=None` means joint: `src_model` serves both sides."""
        self.joint = tgt_model is None
        self._src_bytes = bytes(src_model)
        self._tgt_bytes = self._src_bytes if self.joint else bytes(tgt_model)
        self.src_sp = _processor(self._src_bytes, f"{name} (source)" if not self.joint else name)
        self.tgt_sp = self.src_sp if self.joint else _processor(self._tgt_bytes, f"{name} (target)")
        ids = [
            (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())
            for sp in (self.src_sp, self.tgt_sp)
        ]
        if ids[0] != ids[1]:
            raise UsageError(
                f"{name}: source and target models disagree on special ids "
                f"(pad, unk, bos, eos): {ids[0]} vs {ids[1]}"
            )
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = ids[0]

    # -- learning and files --------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        src_files: Sequence[str | Path],
        tgt_files: Sequence[str | Path],
        out_dir: str | Path,
        model_type: str = "bpe",
        vocab_size: int = 8000,
        joint: bool = True,
        character_coverage: float = 1.0,
        input_sentence_size: int = 2_000_000,
        seed: int = 1,
    ) -> Tokenizer:
        """Learn the model(s) and write them into `out_dir` (renamed into place when complete).

        Joint: one model from source and target text together (`vocab_size` pieces). Separate:
        one model per side, each with `vocab_size` pieces. `input_sentence_size` sentences are
        sampled (shuffled) per model; 0 = all.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        opts = dict(
            model_type=model_type,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            seed=seed,
        )
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".spm-") as tmp:
            tmp = Path(tmp)
            if joint:
                _train_one(_plain_inputs([*src_files, *tgt_files], tmp), tmp / "spm", **opts)
                built = {JOINT_FILE: "spm"}
            else:
                _train_one(_plain_inputs(src_files, tmp), tmp / "spm.src", **opts)
                _train_one(_plain_inputs(tgt_files, tmp), tmp / "spm.tgt", **opts)
                built = {SRC_FILE: "spm.src", TGT_FILE: "spm.tgt"}
            files = {}
            for final, prefix in built.items():
                files[final] = (tmp / f"{prefix}.model").read_bytes()
                files[_vocab_file(final)] = (tmp / f"{prefix}.vocab").read_bytes()
        _install(out_dir, files)
        return cls.load(out_dir)

    def save(self, out_dir: str | Path) -> None:
        """Write the model bytes, unchanged, into `out_dir` (`spm.model`, or `spm.src.model` and
        `spm.tgt.model`), where `load` finds them; files of the other kind, and `.vocab` files
        that would no longer describe the models, are removed."""
        if self.joint:
            _install(Path(out_dir), {JOINT_FILE: self._src_bytes})
        else:
            _install(Path(out_dir), {SRC_FILE: self._src_bytes, TGT_FILE: self._tgt_bytes})

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From a folder holding `spm.model` or `spm.src.model` + `spm.tgt.model` (or a
        `.model` file, read as a joint model)."""
        path = Path(path)
        if path.is_file():
            return cls(_read_bytes(path), name=str(path))
        if (path / JOINT_FILE).is_file():
            return cls(_read_bytes(path / JOINT_FILE), name=str(path / JOINT_FILE))
        if (path / SRC_FILE).is_file() and (path / TGT_FILE).is_file():
            return cls(
                _read_bytes(path / SRC_FILE),
                _read_bytes(path / TGT_FILE),
                name=str(path / "spm.{src,tgt}.model"),
            )
        raise UsageError(
            f"{path}: no tokenizer found (expected {JOINT_FILE}, or {SRC_FILE} and {TGT_FILE})"
        )

    def comparable(self) -> dict[str, bytes]:
        """`to_bytes` through `comparable_bytes`: equal for two tokenizers that tokenize alike
        (the same pieces, scores, special ids, normalization and algorithm), wherever they were
        learned."""
        return {side: comparable_bytes(data) for side, data in self.to_bytes().items()}

    def to_bytes(self) -> dict[str, bytes]:
        """{"joint": model} or {"src": model, "tgt": model}: what a checkpoint stores."""
        if self.joint:
            return {"joint": self._src_bytes}
        return {"src": self._src_bytes, "tgt": self._tgt_bytes}

    @classmethod
    def from_bytes(cls, models: dict[str, bytes], name: str = "checkpoint tokenizer") -> Tokenizer:
        if set(models) == {"joint"}:
            return cls(models["joint"], name=name)
        if set(models) == {"src", "tgt"}:
            return cls(models["src"], models["tgt"], name=name)
        raise UsageError(
            f"{name}: expected the keys 'joint', or 'src' and 'tgt'; found {sorted(models)}"
        )

    def __getstate__(self) -> dict:  # picklable for datasets' worker processes
        return {"models": self.to_bytes()}

    def __setstate__(self, state: dict) -> None:
        models = state["models"]
        if "joint" in models:
            self.__init__(models["joint"])
        else:
            self.__init__(models["src"], models["tgt"])

    # -- sizes and text ------------------------------------------------------------------------

    @property
    def src_vocab_size(self) -> int:
        return self.src_sp.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt_sp.get_piece_size()

    def encode_src(self, lines: Sequence[str]) -> list[list[int]]:
        """Piece ids per line; no bos/eos."""
        return self.src_sp.encode(list(lines), out_type=int)

    def encode_tgt(self, lines: Sequence[str]) -> list[list[int]]:
        """Piece ids per line; no bos/eos."""
        return self.tgt_sp.encode(list(lines), out_type=int)

    def encode_sampled(
        self, src_lines: Sequence[str], tgt_lines: Sequence[str], alpha: float, seed: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        """(source, target) piece ids of one random segmentation per line: subword
        regularization, BPE-dropout with merge-dropout probability `alpha` for a bpe model
        (Provilkov et al. 2020), sampling from all segmentations with smoothing `alpha` for a
        unigram one (Kudo 2018). The same seed gives the same segmentations.

        sentencepiece draws from one generator per thread, seeded from the process-wide seed
        when that thread first samples; so the draw runs in a fresh thread, started under a lock
        just after the seed is set, one line at a time (a batch call would spread the lines
        over a thread pool in an order that is not fixed).
        """
        out: dict = {}

        def draw() -> None:
            opts = dict(out_type=int, enable_sampling=True, alpha=alpha, nbest_size=-1)
            try:
                out["src"] = [self.src_sp.encode(line, **opts) for line in src_lines]
                out["tgt"] = [self.tgt_sp.encode(line, **opts) for line in tgt_lines]
            except Exception as e:  # raised again in the caller's thread
                out["error"] = e

        with _SAMPLING_LOCK:
            spm.set_random_generator_seed(seed)
            worker = threading.Thread(target=draw, name="nmt-subword-sampling")
            worker.start()
            worker.join()
        if "error" in out:
            raise out["error"]
        return out["src"], out["tgt"]

    def _decode(self, sp: spm.SentencePieceProcessor, ids) -> list[str]:
        special = {self.pad_id, self.bos_id, self.eos_id}
        if len(ids) == 0:  # sentencepiece reads an empty list as one empty sentence
            return []
        return sp.decode([[int(i) for i in seq if int(i) not in special] for seq in ids])

    def decode_src(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text per id sequence; pad, bos and eos ids are ignored."""
        return self._decode(self.src_sp, ids)

    def decode_tgt(self, ids: Sequence[Sequence[int]]) -> list[str]:
        """Text per id sequence; pad, bos and eos ids are ignored."""
        return self._decode(self.tgt_sp, ids)

    def __repr__(self) -> str:
        sizes = (
            f"vocab={self.src_vocab_size}"
            if self.joint
            else f"src_vocab={self.src_vocab_size}, tgt_vocab={self.tgt_vocab_size}"
        )
        return f"Tokenizer(joint={self.joint}, {sizes})"
