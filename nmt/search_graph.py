"""Beam and greedy search with static shapes, one CUDA graph per decoding step (layer 4).

Owns: a second implementation of nmt.search's loop in which no tensor changes shape from one
step to the next and nothing in a step waits for the host: finished sentences stay in the batch
until half of it is done (their rows are computed and ignored), finished hypotheses live on the
device in fixed (n, K) buffers, the step index is a device tensor and the length penalties a
table read with it. On a GPU the whole step (model.step, scoring, top-k, finishing, reordering)
is then captured as a CUDA graph and replayed, and captured again, smaller, each time the batch
shrinks: one launch per step instead of ~150 operator calls from Python, which is what bounds
beam search there (the kernels themselves take microseconds).

Results equal nmt.search's: the same candidate scores and the same tie rules. Finishing merges
the kept hypotheses and the new ones (in rank order) with one stable sort, which keeps exactly
what nmt.search's one-by-one insertion keeps. On the CPU the same step runs eagerly; the tests
compare it with nmt.search there, and tests/test_gpu.py compares the graphs on a GPU. Not
supported (nmt.search's loop runs instead): `return_attn`, sampling. The price of static
shapes: rows of finished sentences are computed until the next shrink (at most half of the
batch).
Does not own: the settings (nmt.search.SearchSettings) and the rules it shares with nmt.search
(blocked ids, live beam, coverage penalty, done rule, output limits, length penalties): it calls
nmt.search's pure functions for them.
"""

from __future__ import annotations

import math
import sys

import torch
from torch.utils import _pytree as pytree

from nmt.search import (
    Hypothesis,
    SearchSettings,
    _search,
    blocked_ids,
    coverage_penalty,
    ends_in_eos,
    length_penalty_table,
    live_beam,
    output_limits,
    sentences_done,
)

CHECK_EVERY = 4  # steps between two host checks of which sentences are done
MIN_LEFT = 16  # shrink the batch only when at least this many steps may remain


class _Consts:
    """What every step reads and none changes, all on the device."""

    def __init__(self, src_lens, cfg: SearchSettings, steps: int, device):
        n, k = src_lens.size(0), cfg.beam_size
        self.cfg, self.n, self.k = cfg, n, k
        self.src_lens = src_lens  # (n,)
        self.max_lens, self.lp_at_max = output_limits(src_lens, cfg)  # (n,), (n,)
        self.lp_table = length_penalty_table(steps + 2, cfg.alpha, device)  # (steps + 2,)
        self.sent_rows = torch.arange(n, device=device) * k  # (n,) first row of each sentence
        self.row_src_lens = src_lens.repeat_interleave(k)  # (n*K,)
        self.blocked = blocked_ids(cfg, device)
        # nmt.search divides by a Python float, which CUDA kernels do as a multiplication by its
        # float32 reciprocal: the same arithmetic here keeps the scores bit-identical
        self.reciprocal = device.type == "cuda"

    def block(self, scores: torch.Tensor) -> torch.Tensor:
        """-inf on the blocked ids' columns of `scores` (rows, V), in place (never eos)."""
        return scores if self.blocked is None else scores.index_fill_(1, self.blocked, -math.inf)


def runner(device: torch.device, cuda_graph: bool = True):
    """The `run` argument of nmt.search.beam_search/greedy_search for `device`: this module's
    search on CUDA (unless `cuda_graph` is False), else None (nmt.search's own loop)."""
    return search if cuda_graph and torch.device(device).type == "cuda" else None


def search(model, src_ids, src_lens, cfg: SearchSettings, mode: str | None = None):
    """nmt.search's result for (src_ids (n, S), src_lens (n,)).

    `mode`: "graph" (capture and replay), "in_place" (eagerly, what a replay does: every step
    written back into the same buffers), "eager" (a new carry each step); None: "graph" on
    CUDA, else "eager"."""
    device, n, k = src_ids.device, src_ids.size(0), cfg.beam_size
    if n == 0:
        return []
    if cfg.return_attn or cfg.sampling != "none":  # growing attention histories; sampling
        return _search(model, src_ids, src_lens, cfg)
    src_lens = src_lens.to(device)
    max_len = int(output_limits(src_lens, cfg)[0].max())
    steps = max_len + 1 + CHECK_EVERY  # every sentence is done at step max_len; slack to check
    consts = _Consts(src_lens, cfg, steps, device)
    enc = model.encode(src_ids, src_lens)
    if k > 1:
        enc = model.reorder_encoder_out(enc, torch.arange(n, device=device).repeat_interleave(k))
    carry = _initial_carry(model.init_state(enc), consts, steps, src_ids.size(1), device)
    mode = mode or ("graph" if device.type == "cuda" else "eager")
    return _run(mode, model, enc, carry, consts, steps)


def _initial_carry(state, c: _Consts, steps: int, src_len: int, device) -> dict:
    n, k = c.n, c.k
    cum = torch.full((n, k), -math.inf, device=device)  # (n, K): beams 1.. start dead
    cum[:, 0] = 0.0
    carry = {
        "t": torch.zeros((), dtype=torch.long, device=device),
        "tgt": torch.full((n * k,), c.cfg.bos_id, dtype=torch.long, device=device),
        "state": _own(state),  # a replay writes each leaf back in turn: no shared buffers
        "cum": cum,
        "history": torch.zeros((n * k, steps + 1), dtype=torch.long, device=device),
        "fin_scores": torch.full((n, k), -math.inf, device=device),  # sorted, best first
        "fin_log_probs": torch.zeros((n, k), device=device),
        "fin_lens": torch.zeros((n, k), dtype=torch.long, device=device),
        "fin_tokens": torch.zeros((n, k, steps + 1), dtype=torch.long, device=device),
        "done": torch.zeros(n, dtype=torch.bool, device=device),
    }
    if c.cfg.beta != 0.0:
        carry["coverage"] = torch.zeros((n * k, src_len), device=device)  # (n*K, S)
    return carry


def _step(model, enc, carry: dict, c: _Consts) -> dict:
    """One decoding step for every row; a pure function of `carry` (returns a new one)."""
    cfg, n, k, t = c.cfg, c.n, c.k, carry["t"]
    log_probs, state, attn = model.step(carry["tgt"], carry["state"], enc)
    at_max = (c.max_lens == t)[:, None].expand(n, k).reshape(-1)  # (n*K,)
    scores = c.block(end_at_max(log_probs.float(), carry["cum"].view(-1, 1), at_max, cfg.eos_id))
    cand_scores, cand_beams, cand_tokens = _top_candidates_per_sentence(scores, n, k)
    is_eos = ends_in_eos(cand_scores, cand_tokens, cfg.eos_id)  # (n, 2K)
    attn = attn.float()  # (n*K, S)

    # finished: the eos candidates among the k best of the sentences not done before
    rows = (c.sent_rows[:, None] + cand_beams[:, :k]).view(-1)  # (n*K,)
    lp = c.lp_table.index_select(0, t.view(1)).float()  # (1,) lp(t + 1)
    new_scores = cand_scores[:, :k] * (1.0 / lp) if c.reciprocal else cand_scores[:, :k] / lp
    if "coverage" in carry:
        attn_sums = (carry["coverage"] + attn).index_select(0, rows)  # (n*K, S)
        # rows of sentence i are i*k .. i*k+k-1, so position j of `rows` is sentence j // k
        penalty = coverage_penalty(attn_sums, c.row_src_lens, cfg.beta)  # (n*K,)
        new_scores = new_scores + penalty.view(n, k)
    new_fin = is_eos[:, :k] & ~carry["done"][:, None]  # (n, K)
    new_scores = new_scores.masked_fill(~new_fin, -math.inf)
    fin = _merge_finished(carry, new_scores, cand_scores[:, :k], rows, t, k)

    live_scores, live_tokens, parents = live_beam(cand_scores, cand_beams, cand_tokens, is_eos, k)
    parents = parents.view(-1)  # (n*K,)
    done = carry["done"] | _done(c, fin["fin_scores"], live_scores, t)  # (n,)

    if k > 1:
        state = model.reorder_state(state, parents)
    history = carry["history"].index_select(0, parents)  # (n*K, L)
    history.scatter_(1, t.expand(n * k, 1), live_tokens.view(-1, 1))
    out = {**fin, "t": t + 1, "tgt": live_tokens.view(-1), "state": state, "cum": live_scores}
    out.update(history=history, done=done)
    if "coverage" in carry:
        out["coverage"] = (carry["coverage"] + attn).index_select(0, parents)  # (n*K, S)
    return {key: out[key] for key in carry}  # the carry's order: a graph copies leaf by leaf


def end_at_max(log_probs, cum, at_max, eos_id: int):
    """log_probs (n*K, V) + cum (n*K, 1), with -inf on every continuation but eos of the rows
    `at_max` (n*K,): folded into the one pass over (n*K, V) that adds `cum`, the eos column put
    back after. Element for element the same sums as adding first and masking after, without a
    (n*K, V) mask and a second pass."""
    scores = log_probs + cum.masked_fill(at_max[:, None], -math.inf)  # (n*K, V)
    scores[:, eos_id] = log_probs[:, eos_id] + cum[:, 0]  # (n*K,)
    return scores


def _top_candidates_per_sentence(scores, n, k):
    """nmt.search._top_candidates, (n, 2K) (score, beam, token), by one top-k over each
    sentence's K*V scores instead of one per hypothesis then one over the survivors: the same
    2k best (the same order: by score, ties by the lower beam * V + token), and on a GPU one
    top-k kernel over n slices is faster than two over n*K (measured: benchmarks/README.md)."""
    vocab = scores.size(1)
    top_scores, flat = scores.view(n, -1).topk(min(2 * k, k * vocab), dim=1)  # (n, 2K)
    flat, order = flat.sort(dim=1)  # ties: the lower (beam, token) first, as nmt.search
    top_scores = top_scores.gather(1, order)
    top_scores, order = top_scores.sort(dim=1, descending=True, stable=True)
    flat = flat.gather(1, order)
    return top_scores, flat // vocab, flat % vocab


def _merge_finished(carry, new_scores, new_log_probs, rows, t, k) -> dict:
    """The k best of the kept finished hypotheses (n, K) and the new ones (n, K), by a stable
    sort: equal scores keep the kept ones first and the new ones in rank order, as nmt.search's
    insertion does."""
    n = new_scores.size(0)
    scores = torch.cat([carry["fin_scores"], new_scores], dim=1)  # (n, 2K)
    order = scores.sort(dim=1, descending=True, stable=True).indices[:, :k]  # (n, K)
    lens = torch.cat([carry["fin_lens"], t.expand(n, k)], dim=1)  # (n, 2K)
    log_probs = torch.cat([carry["fin_log_probs"], new_log_probs], dim=1)  # (n, 2K)
    history = carry["history"]
    new_tokens = history.index_select(0, rows).view(n, k, -1)  # (n, K, L)
    tokens = torch.cat([carry["fin_tokens"], new_tokens], dim=1)  # (n, 2K, L)
    return {
        "fin_scores": scores.gather(1, order),
        "fin_log_probs": log_probs.gather(1, order),
        "fin_lens": lens.gather(1, order),
        "fin_tokens": tokens.gather(1, order[:, :, None].expand(n, k, tokens.size(2))),
    }


def _done(c: _Consts, fin_scores, live_scores, t) -> torch.Tensor:
    """nmt.search.sentences_done on the device, from the kept hypotheses (n, K), best first."""
    lp_next = None
    if c.cfg.exact_stop:  # read only then: no lookup in the other steps' graphs
        lp_next = c.lp_table.index_select(0, (t + 1).view(1))  # (1,) lp(t + 2)
    num_finished = torch.isfinite(fin_scores).sum(dim=1)  # (n,)
    limits = (c.max_lens, c.lp_at_max)
    return sentences_done(live_scores, num_finished, fin_scores[:, -1], limits, t, c.cfg, lp_next)


class _Eager:
    """Steps without graphs: a new carry each step ("eager") or written back in place, as a
    graph replay does ("in_place")."""

    def __init__(self, model, enc, carry, c, in_place: bool):
        self.args, self.carry, self.in_place = (model, enc, c), carry, in_place
        self.leaves, self.spec = pytree.tree_flatten(carry)

    def step(self) -> dict:
        out = _step(self.args[0], self.args[1], self.carry, self.args[2])
        if self.in_place:
            _write_back(self.leaves, self.spec, out)
        else:
            self.carry = out
        return self.carry


class _Graph:
    """`_step` writing back into `carry`, captured once as a CUDA graph; `step` replays it."""

    warmed: set = set()  # devices whose lazy cuBLAS/cuDNN set-up ran before a first capture

    def __init__(self, model, enc, carry, c):
        device = carry["t"].device
        # autocast's weight cache must not be filled inside a capture: the graph does its casts
        autocast = torch.autocast(
            device.type,
            dtype=torch.get_autocast_dtype(device.type),
            enabled=torch.is_autocast_enabled(device.type),
            cache_enabled=False,
        )
        if device not in _Graph.warmed:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side), autocast:
                _step(model, enc, carry, c)  # pure: the carry is unchanged
            torch.cuda.current_stream(device).wait_stream(side)
            _Graph.warmed.add(device)
        self.carry, self.graph = carry, torch.cuda.CUDAGraph()
        leaves, spec = pytree.tree_flatten(carry)
        with torch.cuda.graph(self.graph), autocast:
            _write_back(leaves, spec, _step(model, enc, carry, c))

    def step(self) -> dict:
        self.graph.replay()
        return self.carry


def _stepper(mode: str, model, enc, carry, c):
    if mode == "graph":
        try:
            return _Graph(model, enc, carry, c)
        except RuntimeError as e:  # an operator that cannot be captured: no graphs
            print(f"warning: CUDA graph capture failed, decoding without: {e}", file=sys.stderr)
            mode = "in_place"
    return _Eager(model, enc, carry, c, in_place=mode == "in_place")


def _run(mode, model, enc, carry, c: _Consts, steps: int):
    """Step until every sentence is done, checking every CHECK_EVERY steps. When at most half
    of the sentences are left and at least MIN_LEFT steps may remain, the finished sentences
    leave the batch (their results are read) and a smaller graph is captured."""
    results: list = [None] * c.n
    sent_ids = torch.arange(c.n)  # (n,) on the host: input position of each sentence
    max_lens, t = c.max_lens.tolist(), 0
    while True:
        stepper = _stepper(mode, model, enc, carry, c)
        while True:
            for _ in range(CHECK_EVERY):
                carry = stepper.step()
            t += CHECK_EVERY
            done = carry["done"].cpu()  # (n,) the one host sync per CHECK_EVERY steps
            left = (~done).nonzero().squeeze(1)  # (n',)
            if left.numel() == 0 or t >= steps:
                for i, hyps in zip(sent_ids.tolist(), _results(carry, c.cfg)):
                    results[i] = hyps
                return results
            most = max(max_lens[i] for i in left.tolist()) + 1 - t  # steps that may remain
            if left.numel() <= c.n // 2 and most >= MIN_LEFT:
                break
        finished = done.nonzero().squeeze(1)
        sub = {key: carry[key].index_select(0, finished.to(c.sent_rows.device))
               for key in _FINISHED}  # fmt: skip
        for i, hyps in zip(sent_ids[finished].tolist(), _results(sub, c.cfg)):
            results[i] = hyps
        carry, enc, c = _select(model, carry, enc, c, left, steps)
        sent_ids, max_lens = sent_ids[left], [max_lens[i] for i in left.tolist()]


_FINISHED = ("fin_scores", "fin_log_probs", "fin_lens", "fin_tokens")
_PER_SENTENCE = (*_FINISHED, "cum", "done")
_PER_ROW = ("tgt", "history", "coverage")


def _select(model, carry: dict, enc, c: _Consts, keep: torch.Tensor, steps: int):
    """The carry, encoder output and constants of the sentences `keep` (n',) only."""
    keep = keep.to(c.sent_rows.device)
    rows = (keep[:, None] * c.k + torch.arange(c.k, device=keep.device)).view(-1)  # (n'*K,)
    state = model.compact_state(model.reorder_state(carry["state"], rows))  # fixed buffers
    out = {"t": carry["t"].clone(), "state": _own(state)}
    for key in _PER_SENTENCE:
        out[key] = carry[key].index_select(0, keep)
    for key in _PER_ROW:
        if key in carry:
            out[key] = carry[key].index_select(0, rows)
    consts = _Consts(c.src_lens.index_select(0, keep), c.cfg, steps, keep.device)
    return {key: out[key] for key in carry}, model.reorder_encoder_out(enc, rows), consts


def _own(state):
    """Every leaf of `state` in its own contiguous buffer (leaves may share one tensor)."""
    return pytree.tree_map(lambda x: x.clone(memory_format=torch.contiguous_format), state)


def _write_back(leaves: list, spec, out: dict) -> None:
    """Copy the leaves of the step's result `out` into the carry's `leaves`, in place."""
    out_leaves, out_spec = pytree.tree_flatten(out)
    if out_spec != spec:
        raise RuntimeError(f"the model's step changed the state's structure: {out_spec}")
    for dst, src in zip(leaves, out_leaves):
        dst.copy_(src)


def _results(carry: dict, cfg: SearchSettings) -> list[list[Hypothesis]]:
    scores = carry["fin_scores"].tolist()
    log_probs = carry["fin_log_probs"].tolist()
    lens = carry["fin_lens"].tolist()
    tokens = carry["fin_tokens"].tolist()
    empty = Hypothesis(tokens=[], score=-math.inf, log_prob=-math.inf)
    out = []
    for i, row in enumerate(scores):
        hyps = [
            Hypothesis(tokens=tokens[i][j][: lens[i][j]], score=s, log_prob=log_probs[i][j])
            for j, s in enumerate(row[: cfg.n_best])
            if s != -math.inf
        ]
        out.append(hyps or [empty])
    return out
