"""Greedy and batched beam search over the Seq2Seq contract (layer 4).

Owns: the decoding loop, hypothesis scoring (GNMT length and coverage penalties), the maximum
output length and the n-best lists. Does not own the model (eval mode and device are the
caller's job), tokenisation or the batching of sentences. It uses the model only through
`encode`, `init_state`, `step`, `reorder_state` and `reorder_encoder_out` (nmt.models.base), and
takes every special id as an argument.

How the search works (fairseq-style, over batch x beam at once):
- Each step takes the top 2K continuations of every hypothesis (by log-prob; only those get the
  cumulative score added), then the top 2K of the K*2K candidates of each sentence. Among the K
  best candidates, those ending in eos are finished and frozen with their final score; the live
  beam is refilled with the K best candidates that do not end in eos (there are always K of them
  in the 2K), so finished hypotheses never starve the beam.
- A sentence keeps its `beam_size` best finished hypotheses. By default it is done as soon as it
  holds `beam_size` of them (fairseq's and OpenNMT's early stop: with alpha > 0 a longer live
  hypothesis could in principle still win, but waiting for that bound runs nearly every sentence
  to its maximum length). With `exact_stop=True` it is done only when no live hypothesis can
  beat the worst finished one: the bound used is exact,
  live log-prob L <= 0 can only fall, the coverage penalty is <= 0, so the best final score a
  live hypothesis can reach is L / max(lp) over the lengths it can still reach. A sentence is
  also done at its maximum length (eos is then forced, so every live hypothesis is finalised).
  Done sentences leave the active batch: state and encoder output are shrunk to the surviving
  rows, so work shrinks as sentences end.
- Greedy search is the same loop with one hypothesis per sentence that stops at its first eos;
  `beam_search(beam_size=1)` is routed to it, so both give identical results.

Documented choices:
- Scoring (Wu et al. 2016, eq. 14): score = log P(Y|X) / lp(Y) + cp(X; Y) with
  lp = ((5 + |Y|) / 6) ** alpha and cp = beta * sum_i log(min(sum_t attn[t, i], 1.0)) over the
  real source positions i (padding masked by `src_lens`). |Y| counts the eos; the coverage sums
  the attention of every step that produced a token of Y, the eos step included. Attention sums
  are clamped below at 1e-10 so that an unattended word costs beta * log(1e-10), not -inf.
  alpha = beta = 0 gives the plain log-probability.
- Live hypotheses are ranked by their raw cumulative log-prob; lp and cp are applied when a
  hypothesis is finished (fairseq's choice; NVIDIA GNMT applies them at every step).
- Maximum output length: floor(max_len_a * src_len + max_len_b) tokens, eos NOT counted. At that
  length only eos is allowed (with the model's own eos log-prob), so a hypothesis takes at most
  max_len + 1 decoding steps.
- bos, and pad when `pad_id` is given, are never generated (unless equal to eos).
- Ties are broken by the lower (beam, token id), finished hypotheses of equal score keep the
  order in which they finished; nothing is normalised across sentences, so a sentence's result
  does not depend on the other sentences of its batch.
- If the model gives probability zero to every way of finishing a sentence (only possible with a
  model that outputs -inf log-probs), that sentence gets one empty hypothesis scored -inf rather
  than no output, so callers can always read `results[i][0]`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields, replace

import torch

from nmt.errors import UsageError

_COVERAGE_FLOOR = 1e-10


@dataclass
class Hypothesis:
    tokens: list[int]  # output ids, without bos/eos
    score: float  # the search score: log_prob / lp + cp
    log_prob: float  # plain sum of the token log-probs, eos included
    attn: torch.Tensor | None = None  # (len(tokens) + 1, src_len) on the CPU, if asked for


def max_output_lens(src_lens: torch.Tensor, max_len_a: float, max_len_b: float) -> torch.Tensor:
    """floor(a * src_len + b) per sentence, eos not counted, at least 0."""
    lens = torch.floor(src_lens.double() * max_len_a + max_len_b)  # float64: exact for a = 0.1
    return lens.long().clamp(min=0)  # (B,)


def length_penalty(length: torch.Tensor | float, alpha: float):
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha, |Y| counting the eos."""
    return ((5.0 + length) / 6.0) ** alpha


@torch.no_grad()
def greedy_search(
    model,
    src_ids: torch.Tensor,
    src_lens: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    max_len_a: float = 1.5,
    max_len_b: float = 10,
    alpha: float = 0.0,
    beta: float = 0.0,
    pad_id: int | None = None,
    return_attn: bool = False,
    run=None,
) -> list[list[Hypothesis]]:
    """Most probable token at each step. One hypothesis per sentence, in input order.

    `alpha` and `beta` only change the reported score (the choice of tokens does not depend on
    them); they are there so that `beam_search(beam_size=1, ...)` returns exactly this result.
    """
    settings = _Settings(
        beam_size=1,
        n_best=1,
        greedy=True,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        alpha=alpha,
        beta=beta,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        return_attn=return_attn,
    )
    return (run or _search)(model, src_ids, src_lens, settings)


@torch.no_grad()
def beam_search(
    model,
    src_ids: torch.Tensor,
    src_lens: torch.Tensor,
    *,
    bos_id: int,
    eos_id: int,
    beam_size: int = 5,
    n_best: int = 1,
    alpha: float = 0.6,
    beta: float = 0.0,
    max_len_a: float = 1.5,
    max_len_b: float = 10,
    pad_id: int | None = None,
    return_attn: bool = False,
    exact_stop: bool = False,
    run=None,
) -> list[list[Hypothesis]]:
    """Batched beam search. `n_best` hypotheses per sentence (best first), in input order.

    `run`: another implementation of the loop, called as run(model, src_ids, src_lens,
    settings) with the same settings and giving the same results, e.g. nmt.search_graph.search
    (static shapes, one CUDA graph per step). None: this module's loop."""
    if beam_size < 1:
        raise UsageError(f"search: beam_size must be >= 1, found {beam_size}")
    if not 1 <= n_best <= beam_size:
        raise UsageError(f"search: n_best must be in 1..beam_size ({beam_size}), found {n_best}")
    settings = _Settings(
        beam_size=beam_size,
        n_best=n_best,
        greedy=beam_size == 1,
        bos_id=bos_id,
        eos_id=eos_id,
        pad_id=pad_id,
        alpha=alpha,
        beta=beta,
        max_len_a=max_len_a,
        max_len_b=max_len_b,
        return_attn=return_attn,
        exact_stop=exact_stop,
    )
    return (run or _search)(model, src_ids, src_lens, settings)


@dataclass(frozen=True)
class _Settings:
    beam_size: int
    n_best: int
    greedy: bool  # one hypothesis per sentence, done at its first eos
    bos_id: int
    eos_id: int
    pad_id: int | None
    alpha: float
    beta: float
    max_len_a: float
    max_len_b: float
    return_attn: bool
    exact_stop: bool = False  # keep searching while a live hypothesis could still win


@dataclass
class _Active:
    """What search keeps per active sentence (n,); rows are dropped together as sentences end."""

    sent_ids: torch.Tensor  # (n,) index of the sentence in the input batch
    src_lens: torch.Tensor  # (n,)
    max_lens: torch.Tensor  # (n,) output tokens allowed, eos not counted
    lp_at_max: torch.Tensor  # (n,) float64 length penalty of the longest output
    num_finished: torch.Tensor  # (n,) finished hypotheses kept (at most beam_size)
    worst_finished: torch.Tensor  # (n,) score of the worst kept one, -inf until beam_size kept

    def select(self, keep: torch.Tensor) -> _Active:
        return replace(self, **{f.name: getattr(self, f.name)[keep] for f in fields(self)})


def _search(model, src_ids, src_lens, cfg: _Settings) -> list[list[Hypothesis]]:
    if src_ids.dim() != 2 or src_lens.shape != (src_ids.size(0),):
        raise ValueError(
            f"search: expected src_ids (B, S) and src_lens (B,), found "
            f"{tuple(src_ids.shape)} and {tuple(src_lens.shape)}"
        )
    device, num_sents, k = src_ids.device, src_ids.size(0), cfg.beam_size
    finished: list[list[Hypothesis]] = [[] for _ in range(num_sents)]
    if num_sents == 0:
        return finished
    blocked = sorted(
        {i for i in (cfg.bos_id, cfg.pad_id) if i is not None and i >= 0} - {cfg.eos_id}
    )
    blocked = torch.tensor(blocked, device=device) if blocked else None
    max_lens = max_output_lens(src_lens.to(device), cfg.max_len_a, cfg.max_len_b)
    act = _Active(
        sent_ids=torch.arange(num_sents, device=device),
        src_lens=src_lens.to(device),
        max_lens=max_lens,
        lp_at_max=length_penalty(max_lens.double() + 1.0, cfg.alpha),
        num_finished=torch.zeros(num_sents, dtype=torch.long, device=device),
        worst_finished=torch.full((num_sents,), -math.inf, device=device),
    )
    min_max_len = int(max_lens.min())  # no row needs the eos-only mask before this step
    enc = model.encode(src_ids, src_lens)
    if k > 1:
        expand = torch.arange(num_sents, device=device).repeat_interleave(k)  # (n*K,)
        enc = model.reorder_encoder_out(enc, expand)
    state = model.init_state(enc)
    # Per hypothesis row = sentence * k + beam. Beams 1..k-1 start dead, so that the first step
    # does not fill the beam with k copies of the same continuation.
    cum_log_probs = torch.full((num_sents, k), -math.inf, device=device)  # (n, K)
    cum_log_probs[:, 0] = 0.0
    tgt_ids_t = torch.full((num_sents * k,), cfg.bos_id, dtype=torch.long, device=device)
    history = torch.empty((num_sents * k, 0), dtype=torch.long, device=device)  # (n*K, t)
    coverage = None  # (n*K, S) attention summed over the steps so far, when beta != 0
    attn_history = None  # (n*K, t, S), when return_attn

    for t in itertools.count():
        log_probs, state, attn = model.step(tgt_ids_t, state, enc)
        at_max = (act.max_lens == t).repeat_interleave(k) if t >= min_max_len else None
        n = cum_log_probs.size(0)
        cand_scores, cand_beams, cand_tokens = _top_candidates(
            log_probs, cum_log_probs, n, k, blocked, cfg.eos_id, at_max
        )  # (n, 2K) each
        attn = attn.float()  # (n*K, S)
        if coverage is None and cfg.beta != 0.0:
            coverage = torch.zeros_like(attn)
        if attn_history is None and cfg.return_attn:
            attn_history = attn.new_zeros(attn.size(0), 0, attn.size(1))  # (n*K, 0, S)

        is_eos = (cand_tokens == cfg.eos_id) & torch.isfinite(cand_scores)  # (n, 2K)
        fin = is_eos[:, :k].nonzero()  # (F, 2): (sentence, rank) of the eos among the k best
        if fin.numel():
            fin_sents, fin_ranks = fin[:, 0], fin[:, 1]
            rows = fin_sents * k + cand_beams[fin_sents, fin_ranks]  # (F,)
            hyps = _finalise(
                rows,
                cand_scores[fin_sents, fin_ranks],
                act.src_lens[fin_sents],
                t,
                history,
                coverage,
                attn,
                attn_history,
                cfg,
            )
            _store(finished, hyps, fin_sents, act, k)

        # The live beam: the k best candidates that do not end in eos, in rank order.
        live = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :k]  # (n, K)
        new_scores = cand_scores.gather(1, live).masked_fill(is_eos.gather(1, live), -math.inf)
        new_tokens = cand_tokens.gather(1, live)  # (n, K)
        parents = torch.arange(n, device=device)[:, None] * k + cand_beams.gather(1, live)

        done = _done(act, new_scores, t, cfg)  # (n,)
        if bool(done.all()):
            break
        dropped = bool(done.any())
        if dropped:
            keep = (~done).nonzero().squeeze(1)  # (n',)
            parents, new_tokens, new_scores = parents[keep], new_tokens[keep], new_scores[keep]
            act = act.select(keep)
            min_max_len = int(act.max_lens.min())
            enc = model.reorder_encoder_out(enc, _rows_of(keep, k))
        parents = parents.view(-1)  # (n'*K,) row of each surviving hypothesis's parent
        if k > 1 or dropped:
            state = model.reorder_state(state, parents)
        history = torch.cat([history[parents], new_tokens.view(-1, 1)], dim=1)  # (n'*K, t+1)
        if coverage is not None:
            coverage = (coverage + attn)[parents]  # (n'*K, S)
        if attn_history is not None:
            attn_history = torch.cat([attn_history, attn.unsqueeze(1)], dim=1)[parents]
        tgt_ids_t, cum_log_probs = new_tokens.view(-1), new_scores  # (n'*K,), (n', K)

    empty = Hypothesis(tokens=[], score=-math.inf, log_prob=-math.inf)
    return [hyps[: cfg.n_best] if hyps else [empty] for hyps in finished]


def _rows_of(sents: torch.Tensor, k: int) -> torch.Tensor:
    """Hypothesis rows sentence * k + beam of the sentences `sents` (n,)."""
    return (sents[:, None] * k + torch.arange(k, device=sents.device)).view(-1)  # (n*K,)


def _top_candidates(log_probs, cum_log_probs, n, k, blocked, eos_id, at_max):
    """The 2k best (score, beam, token) of each sentence: score = cum_log_probs + log_probs.

    log_probs (n*k, V) of the next token, cum_log_probs (n, k); the `blocked` ids (a tensor, or
    None) are never chosen; on the rows `at_max` (n*k,) that reached their maximum length (None:
    no such row) only eos is. Top (2k + len(blocked)) per hypothesis first, on the log-probs
    themselves (sync-free: no data-dependent shapes, as on a GPU it must be): adding the
    row's cumulative score keeps a row's order, so the 2k best of a sentence are among them, and
    only those few get the add (no pass over (n*k, V) for it). Then an exact order over the
    n x (k * k1) survivors: by score, ties by the lower (beam, token), so the result depends on
    nothing but the sentence's own rows. The finite scores are the same floats as adding first.
    """
    vocab = log_probs.size(1)
    per_hyp = min(2 * k + (0 if blocked is None else blocked.numel()), vocab)
    top_log_probs, top_tokens = log_probs.topk(per_hyp, dim=1)  # (n*K, k1)
    cum = cum_log_probs.view(-1, 1)  # (n*K, 1)
    if at_max is not None:  # those rows offer eos, then -inf on other distinct ids
        others = torch.arange(per_hyp - 1, device=log_probs.device)  # (k1 - 1,)
        others = others + (others >= eos_id).long()  # skips eos; all < vocab
        only_eos = torch.full_like(top_log_probs, -math.inf)  # (n*K, k1)
        only_eos[:, 0] = log_probs[:, eos_id]
        only_eos_tokens = torch.cat([others.new_full((1,), eos_id), others])  # (k1,)
        top_log_probs = torch.where(at_max[:, None], only_eos, top_log_probs)
        top_tokens = torch.where(at_max[:, None], only_eos_tokens, top_tokens)
    top_scores = top_log_probs.float() + cum  # (n*K, k1)
    if blocked is not None:  # never eos
        top_scores.masked_fill_(torch.isin(top_tokens, blocked), -math.inf)
    beams = torch.arange(n * k, device=log_probs.device) % k  # (n*K,)
    flat = top_tokens + beams[:, None] * vocab  # (n*K, k1) index into the sentence's K*V
    flat, order = flat.view(n, -1).sort(dim=1)  # (n, K*k1), unique keys
    top_scores = top_scores.view(n, -1).gather(1, order)
    top_scores, order = top_scores.sort(dim=1, descending=True, stable=True)
    flat = flat.gather(1, order)[:, : min(2 * k, k * per_hyp)]  # (n, 2K)
    return top_scores[:, : flat.size(1)], flat // vocab, flat % vocab


def _finalise(rows, log_probs, src_lens, t, history, coverage, attn, attn_history, cfg):
    """Hypotheses for the rows (F,) that emit eos at step t, so |Y| = t + 1."""
    scores = log_probs / length_penalty(float(t + 1), cfg.alpha)  # (F,)
    if coverage is not None:
        total = (coverage[rows] + attn[rows]).clamp(_COVERAGE_FLOOR, 1.0)  # (F, S)
        real_mask = torch.arange(total.size(1), device=total.device) < src_lens[:, None]  # (F, S)
        scores = scores + cfg.beta * torch.where(real_mask, total.log(), 0.0).sum(dim=1)
    attns = [None] * rows.size(0)
    if attn_history is not None:
        full = torch.cat([attn_history[rows], attn[rows].unsqueeze(1)], dim=1).cpu()  # (F, t+1, S)
        attns = [a[:, :n] for a, n in zip(full, src_lens.tolist())]
    return [
        Hypothesis(tokens=tokens, score=score, log_prob=log_prob, attn=a)
        for tokens, score, log_prob, a in zip(
            history[rows].tolist(), scores.tolist(), log_probs.tolist(), attns
        )
    ]


def _store(finished, hyps, fin_sents, act: _Active, k) -> None:
    """Keep the k best finished hypotheses of each sentence and update `act`'s counters."""
    touched = {}
    for hyp, s, orig in zip(hyps, fin_sents.tolist(), act.sent_ids[fin_sents].tolist()):
        best = finished[orig]
        if len(best) >= k and not hyp.score > best[-1].score:
            continue
        best.append(hyp)
        best.sort(key=lambda h: -h.score)  # stable: equal scores keep their finishing order
        del best[k:]
        touched[s] = best
    if touched:
        device = act.num_finished.device
        index = torch.tensor(list(touched), device=device)
        kept = list(touched.values())
        act.num_finished[index] = torch.tensor([len(b) for b in kept], device=device)
        worst = [b[-1].score if len(b) >= k else -math.inf for b in kept]
        act.worst_finished[index] = torch.tensor(worst, device=device)


def _done(act: _Active, live_scores, t, cfg: _Settings) -> torch.Tensor:
    """Sentences that are done after step t, given their live hypotheses' scores (n, K).

    A live log-prob L <= 0 can only fall and cp <= 0, so L / max(lp) over the lengths it can
    still reach (t + 2 .. max_len + 1) bounds the final score it can reach.
    """
    best_live = live_scores.max(dim=1).values  # (n,)
    full = act.num_finished >= cfg.beam_size
    if not cfg.greedy and cfg.exact_stop:
        lp_max = act.lp_at_max.clamp(min=length_penalty(float(t + 2), cfg.alpha))  # (n,)
        full &= (best_live.double() / lp_max).float() <= act.worst_finished
    return (act.max_lens <= t) | ~torch.isfinite(best_live) | full  # (n,)
