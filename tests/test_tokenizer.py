"""Sentencepiece wrapper: learned on synthetic text, round trips, special ids, bytes, errors."""

from __future__ import annotations

import gzip
import pickle
import random
from pathlib import Path

import pytest
from conftest import need_mirror

from nmt.errors import DataError, UsageError
from nmt.tokenizer import Tokenizer, _fields, comparable_bytes

SRC_WORDS = "a dog cat runs jumps over the red green small big house street man woman".split()
TGT_WORDS = "ein hund katze rennt springt über das rote grüne kleine große haus straße".split()


def _lines(words: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, Path, list[str], list[str]]:
    """300 source lines (plain) and 300 target lines (gzip, to test .gz input)."""
    src, tgt = _lines(SRC_WORDS, 300, 1), _lines(TGT_WORDS, 300, 2)
    src_path, tgt_path = tmp_path / "train.en", tmp_path / "train.de.gz"
    src_path.write_text("\n".join(src) + "\n", encoding="utf-8")
    with gzip.open(tgt_path, "wt", encoding="utf-8") as f:
        f.write("\n".join(tgt) + "\n")
    return src_path, tgt_path, src, tgt


@pytest.fixture
def joint(corpus, tmp_path) -> Tokenizer:
    src_path, tgt_path, _, _ = corpus
    return Tokenizer.train([src_path], [tgt_path], tmp_path / "tok", vocab_size=120)


def test_joint_round_trip_and_special_ids(joint, corpus, tmp_path):
    _, _, src, tgt = corpus
    assert joint.joint and joint.src_vocab_size == joint.tgt_vocab_size <= 120
    assert (joint.pad_id, joint.unk_id, joint.bos_id, joint.eos_id) == (0, 1, 2, 3)
    assert [joint.src_sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    src_ids, tgt_ids = joint.encode_src(src), joint.encode_tgt(tgt)
    assert joint.decode_src(src_ids) == src
    assert joint.decode_tgt(tgt_ids) == tgt
    specials = {joint.pad_id, joint.bos_id, joint.eos_id}
    assert all(specials.isdisjoint(ids) and ids for ids in src_ids)  # pieces only
    padded = [[joint.bos_id, *ids, joint.eos_id, joint.pad_id, joint.pad_id] for ids in tgt_ids]
    assert joint.decode_tgt(padded) == tgt  # pad/bos/eos are ignored
    assert joint.decode_tgt([]) == []
    assert (tmp_path / "tok" / "spm.model").is_file()
    assert not list((tmp_path / "tok").glob(".spm-*"))  # the temp folder is gone


def test_comparable_bytes_drop_the_trainers_paths_alone(joint, corpus, tmp_path):
    # the same text learned in another folder: other recorded paths, the same tokenizer
    src_path, tgt_path, src, _ = corpus
    again = Tokenizer.train([src_path], [tgt_path], tmp_path / "again", vocab_size=120)
    raw, other = joint.to_bytes()["joint"], again.to_bytes()["joint"]
    assert raw != other and joint.comparable() == again.comparable()
    comparable = comparable_bytes(raw)
    assert b".spm-" in raw and b".spm-" not in comparable  # the temporary folder's name
    # every other field stays, the trainer spec's too (model type, normalization, ...)
    spec = {n: p for n, _, p in _fields(raw)}[2]
    kept = {n: p for n, _, p in _fields(comparable)}[2]
    assert [r for n, r, _ in _fields(spec) if n not in (1, 2)] == [r for _, r, _ in _fields(kept)]
    assert [r for n, r, _ in _fields(raw) if n != 2] == [
        r for n, r, _ in _fields(comparable) if n != 2
    ]
    assert Tokenizer(comparable).encode_src(src) == joint.encode_src(src)
    assert comparable_bytes(b"not a model") == b"not a model"


def test_bytes_pickle_and_load_give_identical_ids(joint, corpus, tmp_path):
    _, _, src, tgt = corpus
    blobs = joint.to_bytes()
    assert list(blobs) == ["joint"]
    for other in (
        Tokenizer.from_bytes(blobs),
        pickle.loads(pickle.dumps(joint)),
        Tokenizer.load(tmp_path / "tok"),
        Tokenizer.load(tmp_path / "tok" / "spm.model"),
    ):
        assert other.joint
        assert other.encode_src(src) == joint.encode_src(src)
        assert other.encode_tgt(tgt) == joint.encode_tgt(tgt)
        assert other.to_bytes() == blobs


def test_separate_models(corpus, tmp_path, joint):
    src_path, tgt_path, src, tgt = corpus
    out = tmp_path / "tok"  # already holds a joint model: it must not be left beside
    tok = Tokenizer.train([src_path], [tgt_path], out, vocab_size=60, joint=False, seed=3)
    assert not tok.joint
    assert (out / "spm.src.model").is_file() and (out / "spm.tgt.model").is_file()
    assert not (out / "spm.model").exists()
    assert tok.decode_src(tok.encode_src(src)) == src
    assert tok.decode_tgt(tok.encode_tgt(tgt)) == tgt
    # each side learned only its own text: "ü" and "ß" are unknown to the source model
    assert tok.unk_id in sum(tok.encode_src(tgt), [])
    assert tok.unk_id not in sum(tok.encode_tgt(tgt), [])
    blobs = tok.to_bytes()
    assert set(blobs) == {"src", "tgt"} and blobs["src"] != blobs["tgt"]
    again = Tokenizer.from_bytes(blobs)
    assert again.encode_src(src) == tok.encode_src(src)
    assert again.encode_tgt(tgt) == tok.encode_tgt(tgt)
    assert Tokenizer.load(out).to_bytes() == blobs
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)


def test_unigram_and_tiny_sample(corpus, tmp_path):
    src_path, tgt_path, src, _ = corpus
    tok = Tokenizer.train(
        [src_path],
        [tgt_path],
        tmp_path / "u",
        model_type="unigram",
        vocab_size=80,
        input_sentence_size=50,
    )
    assert tok.decode_src(tok.encode_src(src)) == src


def test_errors_name_the_file(tmp_path, corpus):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"this is not a sentencepiece model")
    with pytest.raises(UsageError, match="junk.model: not a sentencepiece model"):
        Tokenizer.load(junk)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "spm.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(UsageError, match=r"dir/spm.model: not a sentencepiece model"):
        Tokenizer.load(tmp_path / "dir")
    with pytest.raises(UsageError, match="no tokenizer found"):
        Tokenizer.load(tmp_path / "empty")
    with pytest.raises(UsageError, match="expected the keys"):
        Tokenizer.from_bytes({"source": b""})
    with pytest.raises(DataError, match="missing.txt: training text not found"):
        Tokenizer.train([tmp_path / "missing.txt"], [corpus[1]], tmp_path / "t", vocab_size=50)


@pytest.mark.slow
def test_real_multi30k_lines(tmp_path):
    raw = need_mirror("multi30k/data/task1/raw") / "multi30k" / "data" / "task1" / "raw"
    tok = Tokenizer.train([raw / "train.en.gz"], [raw / "train.de.gz"], tmp_path, vocab_size=8000)
    assert tok.src_vocab_size == 8000
    with gzip.open(raw / "val.de.gz", "rt", encoding="utf-8") as f:
        val = [" ".join(line.split()) for line in f]
    decoded = tok.decode_tgt(tok.encode_tgt(val))
    same = sum(a == b for a, b in zip(decoded, val))
    assert same >= 0.98 * len(val)  # only unseen characters (unk) or normalization may differ
    lens = [len(ids) for ids in tok.encode_tgt(val)]
    assert sum(lens) / len(lens) < 30  # subwords, not characters
