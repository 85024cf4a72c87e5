"""nmt.alignment: pieces to words (with real sentencepiece models), the merging rule worked out
by hand, the Pharaoh text."""

import random

import pytest
import sentencepiece as spm
import torch

from nmt.alignment import hard_alignment, source_words, target_words, to_text


@pytest.fixture(scope="module")
def byte_fallback_sp(tmp_path_factory):
    """A small real sentencepiece model with byte fallback: characters it never saw are spelled
    in byte pieces, which decode to a character only when all of them are there."""
    folder = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = "the cat sat on mat a dog house green".split()
    text = "\n".join(" ".join(rng.choices(words, k=5)) for _ in range(200))
    (folder / "text.txt").write_text(text + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "text.txt"),
        model_prefix=str(folder / "bf"),
        vocab_size=300,
        byte_fallback=True,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=str(folder / "bf.model"))


def test_source_pieces_belong_to_the_word_their_last_word_start_opened():
    pieces = ["▁A", "▁bi", "ke", ".", "▁", "<unk>", "x", "▁ok"]
    # "A" | "bike." | a lone "▁" (no characters of its own) opens "<unk>x" | "ok"
    assert source_words(pieces) == [0, 1, 1, 1, None, 2, 2, 3]
    assert source_words(["ab", "▁c"]) == [0, 1]  # no leading "▁": still word 0
    assert source_words([]) == []


def test_target_pieces_follow_the_text_as_written_out(byte_fallback_sp):
    sp = byte_fallback_sp
    ids = sp.encode("the €cat  sat € x")
    pieces = [sp.id_to_piece(i) for i in ids]
    words = target_words(ids, sp.decode)
    text = sp.decode(ids)
    assert text.split() == ["the", "€cat", "sat", "€", "x"]
    by_word = {}
    for piece, word in zip(pieces, words):
        by_word.setdefault(word, []).append(piece)
    # "€" is three byte pieces: the first two decode to no complete character, yet all three
    # belong to the word "€cat" (and to the word "€", whose text a space follows); the lone
    # "▁" pieces add only a space: no word
    euro = ["<0xE2>", "<0x82>", "<0xAC>"]
    assert by_word[1][:3] == euro and "".join(by_word[1][3:]) == "cat"
    assert by_word[0] == ["▁the"] and by_word[2] == ["▁sat"] and by_word[3] == euro
    assert all(piece == "▁" for piece in by_word[None])
    assert max(w for w in words if w is not None) == len(text.split()) - 1
    assert target_words([], sp.decode) == []


def test_unknown_characters_are_words_of_their_own_on_the_target_side(tiny_checkpoint):
    from nmt.checkpoint import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint)
    ids = tok.encode_tgt(["W1 ☃W2"])[0]  # "☃" is not in the model: <unk>, decoded " ⁇ "
    assert tok.unk_id in ids
    text = tok.decode_tgt([ids])[0]
    words = target_words(ids, tok.decode_tgt)
    assert max(w for w in words if w is not None) + 1 == len(text.split())


def test_links_sum_attention_over_pieces_then_take_the_largest():
    # source words: "a" (pieces 0, 1) and "b" (piece 2); column 3 is eos (no word)
    # target words: "X" (pieces 0, 1) and "Y" (piece 2); row 3 is eos
    weights = torch.tensor(
        [
            [0.3, 0.3, 0.4, 0.0],  # X: a 0.6, b 0.4
            [0.1, 0.0, 0.5, 0.4],  # X: a 0.1, b 0.5 -> X sums: a 0.7, b 0.9 -> b
            [0.2, 0.2, 0.1, 0.5],  # Y: a 0.4, b 0.1 (eos 0.5 does not count) -> a
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    links = hard_alignment(weights, [0, 0, 1, None], [0, 0, 1, None])
    assert links == [(0, 1), (1, 0)]
    # row 0 alone: its largest single weight is b's 0.4, but a's two pieces sum to 0.6
    assert hard_alignment(weights[:1], [0, 0, 1, None], [0]) == [(0, 0)]


def test_ties_go_to_the_lower_source_word_and_every_target_word_has_one_link():
    weights = torch.full((3, 4), 0.25)
    assert hard_alignment(weights, [0, 1, 2, None], [0, 1, None]) == [(0, 0), (0, 1)]
    assert hard_alignment(weights, [None, None, None, None], [0, 1, None]) == []
    assert hard_alignment(torch.zeros(0, 0), [], []) == []
    with pytest.raises(ValueError, match="do not match"):
        hard_alignment(weights, [0, 1], [0, 1, None])


def test_pharaoh_text():
    assert to_text([(2, 1), (0, 0), (0, 2)]) == "0-0 0-2 2-1"
    assert to_text([]) == ""
