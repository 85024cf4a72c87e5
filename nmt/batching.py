"""Prepared examples to padded batches (layer 2): the token-bucketed sampler, `Batch`, loaders.

Owns: the `TokenBatchSampler` (padded-token budget, per-epoch seeded order, per-rank shards,
exact resume); `Batch` and `collate`, from the fixed ids of a prepared split or from its text
re-segmented per batch (`SubwordSampling`); building batches in this process (`make_batches`) or
in loader workers (`batch_loader`). Does not own: preparing the splits (nmt.data), the model,
the optimizer or the training loop. Needs no HF `datasets` import: a split is used through its
`with_format` and `column_names`.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from nmt.errors import UsageError
from nmt.tokenizer import Tokenizer

if TYPE_CHECKING:
    import datasets


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
