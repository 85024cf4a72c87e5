"""Hard word alignments from attention, in the Pharaoh `i-j` format (layer 1).

Owns: which word each sentencepiece piece belongs to, the rule that merges a piece-level
attention matrix into word links, and the text of an alignment. Does not own where the attention
comes from (nmt.translator, through the model's `inspect_attention`) or pictures (nmt.plots).

Words are whitespace-separated tokens. Target words are those of the translation as written
out: a target piece belongs to the word holding the first non-space character it adds to the
text when the pieces are decoded one more at a time (one that adds only spaces belongs to no
word; one that adds nothing, part of a character spelled in byte pieces, to the previous
piece's word). Source words are those of the source line: sentencepiece starts a word at each
piece that begins with "▁" (the whitespace of the line, runs of it collapsed), so a source
piece belongs to the word of the last such piece (a lone "▁" piece to none). This counts the
line's own words unless sentencepiece's normalization puts a space inside one (NFKC does so for
a few rare characters, e.g. "a¨b" -> "a ̈b": then the alignment counts two). Decoding the source
would not do: an unknown character decodes as " ⁇ ", a word of its own.

The rule (what fairseq's and OpenNMT's attention alignments do, pieces merged by word): the
attention is summed over the pieces of each (target word, source word) pair, and each target
word is linked to the one source word with the largest sum (ties: the lower index). The rows
and columns of the end-of-sentence token and of pieces that belong to no word are left out. So
every target word has exactly one link, a source word any number.

Text: `i-j` pairs (source word index, target word index, both 0-based) separated by one space,
sorted by i then j, as fast_align and Moses write them; no words on either side give "".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

_WORD = re.compile(r"\S+")
WORD_START = "\u2581"  # "▁": sentencepiece's mark of a piece that starts a word


def source_words(pieces: Sequence[str]) -> list[int | None]:
    """The word index of each source piece (see the module docstring)."""
    words: list[int | None] = []
    current = -1
    for k, piece in enumerate(pieces):
        if piece.startswith(WORD_START) or k == 0:  # a line's first piece opens its first word
            current += 1
        words.append(None if piece == WORD_START else current)
    return words


def target_words(ids: Sequence[int], decode: Callable[[list[list[int]]], list[str]]):
    """The word index of each target piece of `ids` (None: a piece of no word; see the module
    docstring). `decode` turns id sequences into text as it is written out (e.g.
    Tokenizer.decode_tgt); it is called once, with every prefix of `ids`."""
    ids = [int(i) for i in ids]
    if not ids:
        return []
    prefixes = decode([ids[: k + 1] for k in range(len(ids))])
    text = prefixes[-1]
    starts = [m.start() for m in _WORD.finditer(text)]
    ends = [m.end() for m in _WORD.finditer(text)]
    # where each piece's text ends; None where a prefix is not the start of the text (a part
    # of a character spelled in byte pieces): it ends where the next complete prefix does
    stops: list[int | None] = [len(p) if text.startswith(p) else None for p in prefixes]
    for k in range(len(stops) - 2, -1, -1):
        if stops[k] is None:
            stops[k] = stops[k + 1]
    stops[-1] = len(text)
    words: list[int | None] = []
    begin = 0
    for stop in stops:
        if stop <= begin:  # adds nothing: the previous piece's word
            words.append(words[-1] if words else None)
            continue
        found = _WORD.search(text, begin, stop)
        words.append(_word_at(starts, ends, found.start()) if found else None)
        begin = stop
    return words


def _word_at(starts: list[int], ends: list[int], char: int) -> int:
    """Index of the word whose characters include `char` (a non-space character)."""
    for index, (start, end) in enumerate(zip(starts, ends)):
        if start <= char < end:
            return index
    raise ValueError(f"character {char} is in no word")  # unreachable for a non-space char


def hard_alignment(
    weights: torch.Tensor,
    src_words: Sequence[int | None],
    tgt_words: Sequence[int | None],
) -> list[tuple[int, int]]:
    """(source word, target word) links of `weights` (T, S): row t is the attention of target
    piece t over the source pieces; `src_words` (S) and `tgt_words` (T) give each piece's word
    (None: none, e.g. the end-of-sentence token). See the module docstring for the rule."""
    if weights.shape != (len(tgt_words), len(src_words)):
        raise ValueError(
            f"weights {tuple(weights.shape)} do not match {len(tgt_words)} target and "
            f"{len(src_words)} source pieces"
        )
    n_src = 1 + max((w for w in src_words if w is not None), default=-1)
    n_tgt = 1 + max((w for w in tgt_words if w is not None), default=-1)
    if not n_src or not n_tgt:
        return []
    src_of = _one_hot(src_words, n_src)  # (S, n_src)
    tgt_of = _one_hot(tgt_words, n_tgt)  # (T, n_tgt)
    sums = tgt_of.T @ weights.float().cpu() @ src_of  # (n_tgt, n_src)
    has_piece = tgt_of.sum(0) > 0  # (n_tgt,)
    best = sums.argmax(dim=1)  # (n_tgt,) the first maximum: ties go to the lower index
    links = [(int(best[j]), j) for j in range(n_tgt) if has_piece[j]]
    return sorted(links)


def _one_hot(words: Sequence[int | None], n: int) -> torch.Tensor:
    """(len(words), n): 1 where piece k belongs to word w."""
    out = torch.zeros(len(words), n)
    for k, w in enumerate(words):
        if w is not None:
            out[k, w] = 1.0
    return out


def to_text(links: Sequence[tuple[int, int]]) -> str:
    """`links` as Pharaoh text: "0-0 1-2 2-1" (sorted by source then target index)."""
    return " ".join(f"{i}-{j}" for i, j in sorted(links))
