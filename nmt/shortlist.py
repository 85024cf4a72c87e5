"""The vocabulary shortlist (Marian's lexical shortlist): which target pieces the output layer
scores for a batch.

Owns: learning the lexical table from the training pairs (`learn`, `learn_from_split`), its
form in a checkpoint (the optional `shortlist` key: plain tensors, format version unchanged),
adding it to an existing checkpoint (`nmt shortlist`, `add_to_checkpoint`), and choosing a
batch's target ids (`select`) and mapping a search into and out of them (`SearchSpace`). Does
not own the restricted output layer (nmt.models: `EncoderDecoder.shortlisted`) or the search.

The table: for every source piece, its TABLE_WIDTH best target pieces by the lexical
translation probability t(tgt | src) of IBM model 1 (Brown et al. 1993), learned by EM_ROUNDS
rounds of EM on the training pairs, the source's eos standing for IBM-1's NULL word (it is in
every sentence, so it collects the target pieces that no source piece explains); and every
target piece ranked by its count in the training targets. At decoding (search.shortlist K > 0)
a sentence may produce the K best of each of its source pieces, the search.shortlist_frequent
most frequent target pieces and the special ids (pad, unk, bos, eos). The output projection
computes the rows of the batch's union of those lists only, and each sentence's log-softmax runs
over its own list (the rest of the union at -inf): Marian's shortlist is per batch, this one per
sentence, so that a sentence's translation does not depend on its batch-mates (the batch gives
the speed, not the result). The search runs in the union's positions 0..n-1 and its hypotheses
are mapped back.

Learning reads at most MAX_TOKEN_PAIRS (source piece, target piece) co-occurrences: on a large
corpus, an evenly spaced subset of the sentence pairs (Multi30k's 29k pairs fit whole).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from nmt import checkpoint, data
from nmt.errors import UsageError

TABLE_WIDTH = 100  # target pieces kept per source piece (Marian's shortlist default: 100)
EM_ROUNDS = 5
MAX_TOKEN_PAIRS = 20_000_000
_CHUNK_PAIRS = 2_000_000  # co-occurrences per chunk of the E-step: bounds its memory


# ---------------------------------------------------------------------- learning
@dataclass
class _Pairs:
    """Every (source piece, target piece) co-occurrence of a set of sentence pairs, by chunk:
    per chunk the index of its key in `keys` (sorted src * V_tgt + tgt) and the target token
    it belongs to (its E-step normaliser)."""

    keys: torch.Tensor  # (U,) int64, sorted
    chunks: list[tuple[torch.Tensor, torch.Tensor, int]]  # (key index (P,), tgt token (P,), T)


def _chunk_keys(src: list[list[int]], tgt: list[list[int]], tgt_vocab: int):
    """(keys (P,), target token index (P,), target tokens T) of the pairs (src[p], tgt[p])."""
    src_lens = torch.tensor([len(s) for s in src], dtype=torch.long)  # (N,)
    tgt_lens = torch.tensor([len(t) for t in tgt], dtype=torch.long)  # (N,)
    src_flat = torch.tensor([i for s in src for i in s], dtype=torch.long)  # (S_total,)
    tgt_flat = torch.tensor([i for t in tgt for i in t], dtype=torch.long)  # (T_total,)
    src_start = torch.cumsum(src_lens, 0) - src_lens  # (N,)
    tgt_sent = torch.repeat_interleave(torch.arange(len(tgt)), tgt_lens)  # (T_total,)
    per_tgt = src_lens[tgt_sent]  # (T_total,) source pieces each target token meets
    tgt_token = torch.repeat_interleave(torch.arange(tgt_flat.numel()), per_tgt)  # (P,)
    offset = torch.arange(tgt_token.numel()) - torch.repeat_interleave(
        torch.cumsum(per_tgt, 0) - per_tgt, per_tgt
    )  # (P,) 0.. per_tgt - 1 within each target token
    src_pos = src_start[tgt_sent[tgt_token]] + offset  # (P,)
    keys = src_flat[src_pos] * tgt_vocab + tgt_flat[tgt_token]  # (P,)
    return keys, tgt_token, tgt_flat.numel()


def _subset(n: int, src_lens, tgt_lens) -> list[int]:
    """Evenly spaced sentence pairs whose co-occurrences stay under MAX_TOKEN_PAIRS."""
    total = sum(s * t for s, t in zip(src_lens, tgt_lens))
    if total <= MAX_TOKEN_PAIRS:
        return list(range(n))
    keep = max(1, int(n * MAX_TOKEN_PAIRS / total))
    return sorted({int(i * n / keep) for i in range(keep)})


def _co_occurrences(src: list[list[int]], tgt: list[list[int]], tgt_vocab: int) -> _Pairs:
    parts, start = [], 0
    while start < len(src):
        end, pairs = start, 0
        while end < len(src) and (end == start or pairs < _CHUNK_PAIRS):
            pairs += len(src[end]) * len(tgt[end])
            end += 1
        parts.append(_chunk_keys(src[start:end], tgt[start:end], tgt_vocab))
        start = end
    if not parts:
        return _Pairs(torch.empty(0, dtype=torch.long), [])
    keys, index = torch.unique(torch.cat([k for k, _, _ in parts]), return_inverse=True)
    sizes = [k.numel() for k, _, _ in parts]
    chunks = [(i.int(), j.int(), n) for i, (_, j, n) in zip(index.split(sizes), parts)]
    return _Pairs(keys, chunks)


def _ibm1(pairs: _Pairs, tgt_vocab: int, src_vocab: int) -> torch.Tensor:
    """t(tgt | src) per key of `pairs.keys`, after EM_ROUNDS rounds of IBM-1 EM (uniform
    start: the first round's counts are each target token split evenly over its sentence's
    source pieces)."""
    prob = torch.ones(pairs.keys.numel())  # (U,)
    src_of_key = pairs.keys // tgt_vocab  # (U,)
    for _ in range(EM_ROUNDS):
        counts = torch.zeros_like(prob)  # (U,)
        for key_index, tgt_token, n_tgt in pairs.chunks:  # int32 indices: half the memory
            value = prob[key_index]  # (P,)
            norm = torch.zeros(n_tgt).index_add_(0, tgt_token, value)  # (T,)
            counts.index_add_(0, key_index, value.div_(norm[tgt_token]))
        totals = torch.zeros(src_vocab).index_add_(0, src_of_key, counts)  # (V_src,)
        prob = counts / totals[src_of_key]  # (U,)
    return prob


def _rank_per_source(keys, score, tgt_vocab: int, src_vocab: int, width: int) -> torch.Tensor:
    """(src_vocab, width) int32: each source piece's best target pieces by `score` (U,),
    best first; -1 where it met fewer."""
    src, tgt = keys // tgt_vocab, keys % tgt_vocab  # (U,) each
    by_src_then_score = src.double() * 4.0 - score / score.max().clamp(min=1e-300)  # (U,)
    order = torch.argsort(by_src_then_score, stable=True)  # ties: the lower target id first
    src, tgt = src[order], tgt[order]
    starts = torch.searchsorted(src, src, right=False)  # (U,) first entry of each source piece
    rank = torch.arange(src.numel()) - starts  # (U,)
    keep = rank < width
    table = torch.full((src_vocab, width), -1, dtype=torch.int32)
    table[src[keep], rank[keep]] = tgt[keep].int()
    return table


def learn(src: list[list[int]], tgt: list[list[int]], src_vocab: int, tgt_vocab: int) -> dict:
    """The shortlist of the sentence pairs (src[p] (source ids, eos included), tgt[p] (target
    pieces)), in its checkpoint form: {"table": (src_vocab, TABLE_WIDTH) int32 target ids best
    first (-1: none), "frequent": (tgt_vocab,) int32 target ids by count, most frequent first}.
    """
    if len(src) != len(tgt):
        raise ValueError(f"shortlist.learn: {len(src)} source and {len(tgt)} target sentences")
    keep = _subset(len(src), [len(s) for s in src], [len(t) for t in tgt])
    src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    pairs = _co_occurrences(src, tgt, tgt_vocab)
    prob = _ibm1(pairs, tgt_vocab, src_vocab)
    counts = torch.bincount(torch.tensor([i for t in tgt for i in t], dtype=torch.long),
                            minlength=tgt_vocab)  # fmt: skip
    frequent = torch.argsort(-counts, stable=True).int()  # (V_tgt,) ties: the lower id first
    table = _rank_per_source(pairs.keys, prob, tgt_vocab, src_vocab, TABLE_WIDTH)
    return {"table": table, "frequent": frequent}


def learn_from_split(dataset, src_vocab: int, tgt_vocab: int) -> dict:
    """`learn` on a prepared split (nmt.data: `src_ids` with eos, `tgt_ids`)."""
    columns = dataset.with_format(None, columns=["src_ids", "tgt_ids"])[:]
    return learn(columns["src_ids"], columns["tgt_ids"], src_vocab, tgt_vocab)


# ---------------------------------------------------------------------- checkpoints
def check(shortlist, where: str) -> dict | None:
    """A checkpoint's `shortlist` entry checked (None stays None): one UsageError naming
    `where` for anything else than the form `learn` gives."""
    if shortlist is None:
        return None
    table = shortlist.get("table") if isinstance(shortlist, dict) else None
    frequent = shortlist.get("frequent") if isinstance(shortlist, dict) else None
    if not (
        isinstance(table, torch.Tensor)
        and isinstance(frequent, torch.Tensor)
        and table.dim() == 2
        and frequent.dim() == 1
    ):
        raise UsageError(f"{where}: its `shortlist` entry is not a shortlist table")
    return {"table": table.long(), "frequent": frequent.long()}


def add_to_checkpoint(ckpt_path: str, out_path: str, data_dir: str | None = None,
                      src: str | None = None, tgt: str | None = None) -> dict:  # fmt: skip
    """Learn a shortlist from a prepared data folder's train split (`data_dir`, which must
    hold the checkpoint's own tokenizer) or from parallel text files (`src`, `tgt`, encoded
    with the checkpoint's tokenizer) and write the checkpoint with it to `out_path`
    (atomically; it may be `ckpt_path`). Returns {"pairs", "table_width"}."""
    ckpt = checkpoint.load(ckpt_path)
    tokenizer = checkpoint.load_tokenizer(ckpt_path)
    if data_dir is not None:
        src_ids, tgt_ids = _split_ids(data_dir, ckpt, ckpt_path)
    else:
        src_ids, tgt_ids = _text_ids(src, tgt, tokenizer)
    ckpt["shortlist"] = learn(src_ids, tgt_ids, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
    checkpoint.atomic_torch_save(ckpt, out_path)
    return {"pairs": len(src_ids), "table_width": TABLE_WIDTH}


def _split_ids(data_dir: str, ckpt: dict, ckpt_path: str):
    from nmt.tokenizer import Tokenizer

    if Tokenizer.load(data_dir).to_bytes() != checkpoint.tokenizer_bytes(ckpt):
        raise UsageError(
            f"{data_dir}: its tokenizer is not the one of {ckpt_path}: a shortlist must be "
            "learned from data encoded with the checkpoint's own pieces"
        )
    columns = data.load_split(data_dir, "train").with_format(None, ["src_ids", "tgt_ids"])[:]
    return columns["src_ids"], columns["tgt_ids"]


def _text_ids(src: str, tgt: str, tokenizer):
    from nmt.textio import read_parallel

    pairs = list(read_parallel(src, tgt))
    src_lines, tgt_lines = [p[0] for p in pairs], [p[1] for p in pairs]
    src_ids = [ids + [tokenizer.eos_id] for ids in tokenizer.encode_src(src_lines)]
    return src_ids, tokenizer.encode_tgt(tgt_lines)


# ---------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class SearchSpace:
    """A batch's target ids (`ids`, sorted): the search runs in their positions; `allowed`
    (B, n): the positions each sentence may produce (its own shortlist)."""

    ids: torch.Tensor  # (n,) int64, sorted, unique
    allowed: torch.Tensor | None = None  # (B, n) bool

    def settings(self, s):
        """The search settings with the special ids moved to their positions in `ids`."""
        where = {name: getattr(s, name) for name in ("bos_id", "eos_id", "pad_id")}
        moved = {k: self.position(v) for k, v in where.items() if v is not None}
        return replace(s, **moved)

    def position(self, token: int) -> int:
        at = int(torch.searchsorted(self.ids, torch.tensor(token, device=self.ids.device)))
        if at >= self.ids.numel() or int(self.ids[at]) != token:
            raise ValueError(f"shortlist: special id {token} is not in the batch's ids")
        return at

    def tokens(self, positions: list[int]) -> list[int]:
        ids = self.ids.tolist()
        return [ids[p] for p in positions]


def select(shortlist: dict, src_ids, src_lens, k: int, n_frequent: int, special) -> SearchSpace:
    """The target ids a batch (src_ids (B, S), src_lens (B,)) may produce: per sentence, the
    `k` best of each of its source pieces, the `n_frequent` most frequent target pieces and the
    `special` ids; the search space is their union, `allowed` each sentence's own."""
    table, frequent = shortlist["table"], shortlist["frequent"]
    real = torch.arange(src_ids.size(1), device=src_ids.device) < src_lens[:, None]  # (B, S)
    rows = table[src_ids][:, :, :k].masked_fill(~real[:, :, None], -1)  # (B, S, k)
    common = torch.cat(
        [frequent[:n_frequent], torch.tensor(sorted(special), device=table.device)]
    )  # (F,)
    ids = torch.unique(torch.cat([rows[rows >= 0], common]))  # (n,) sorted
    allowed = torch.zeros(src_ids.size(0), ids.numel(), dtype=torch.bool, device=ids.device)
    allowed[:, torch.searchsorted(ids, common)] = True
    sent, _, _ = (rows >= 0).nonzero(as_tuple=True)
    allowed[sent, torch.searchsorted(ids, rows[rows >= 0])] = True  # (B, n)
    return SearchSpace(ids, allowed)
