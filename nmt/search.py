"""Greedy and batched beam search, and sampling, over the Seq2Seq contract (layer 4).

Owns: the decoding loop, hypothesis scoring (GNMT length and coverage penalties), the maximum
output length, the n-best lists, and the sampling rule. Does not own the model (eval mode and
device are the caller's job), tokenisation or the batching of sentences. It uses the model
only through `encode`, `init_state`, `step`, `reorder_state` and `reorder_encoder_out`
(nmt.models.base).
Everything a search reads comes in one `SearchSettings`: the `search` config fields (defaults,
help and ranges in nmt.config) plus the special ids and per-call extras. The rules that
nmt.search_graph's static loop applies too (blocked ids, the live beam, the coverage penalty,
the done rule, output limits and length penalties) are public pure functions here, one
definition each.

How the search works (fairseq-style, over batch x beam at once):
- Each step takes the top 2K continuations of every hypothesis (by log-prob; only those get the
  cumulative score added), then the top 2K of the K*2K candidates of each sentence. Among the K
  best candidates, those ending in eos are finished and frozen with their final score; the live
  beam is refilled with the K best candidates that do not end in eos (there are always K of them
  in the 2K), so finished hypotheses never starve the beam.
- A sentence keeps its `beam_size` best finished hypotheses. By default it is done as soon as it
  holds `beam_size` of them (fairseq's and OpenNMT's early stop: with alpha > 0 a longer live
  hypothesis could in principle still win, but waiting for that bound runs nearly every sentence
  to its maximum length). With `search.exact_stop` it is done only when no live hypothesis can
  beat the worst finished one: the bound used is exact,
  live log-prob L <= 0 can only fall, the coverage penalty is <= 0, so the best final score a
  live hypothesis can reach is L / max(lp) over the lengths it can still reach. A sentence is
  also done at its maximum length (eos is then forced, so every live hypothesis is finalised).
  Done sentences leave the active batch: state and encoder output are shrunk to the surviving
  rows, so work shrinks as sentences end.
- Greedy search is the same loop with one hypothesis per sentence that stops at its first eos:
  `greedy_search` is `beam_search` with beam_size 1.

Sampling (`search.sampling` topk or topp, beam_size 1): the same loop as greedy search, with one
rule changed: instead of the most probable token, each step draws one from the model's
distribution, divided by `temperature` and truncated to the `topk` most probable tokens or to
the `topp` nucleus (Holtzman et al. 2020), renormalised (`sampling_log_probs`); bos/pad are never
drawn and at the maximum length eos is forced, as in search. A sample's score is the model's own
log-probability of it (no temperature, no truncation) with the length and coverage penalties, so
`nmt score-pairs` gives the same number. Each sentence draws from its own stream: step t's
uniform number is a hash of (seed, the sentence's line id, t) (`uniforms`), so a sample depends
on the seed, the line id and the model only: not on the batch size, the other sentences or the
order they are decoded in. nmt.search_graph does not sample: this loop always runs.

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
from typing import Any

import torch

from nmt.config import SearchConfig, check_section
from nmt.errors import ConfigError

_COVERAGE_FLOOR = 1e-10


@dataclass(frozen=True, kw_only=True)
class SearchSettings(SearchConfig):
    """Everything one search reads: the `search` config fields (beam_size, alpha, ...; their
    defaults, help and ranges live in nmt.config), the target side's special ids, and the
    per-call extras. Checked when built (nmt.config.check_section): an instance is always valid.
    Build one with `from_config`; change one with `dataclasses.replace` (checked again)."""

    bos_id: int
    eos_id: int
    pad_id: int | None = None  # never generated when given (nor bos), unless equal to eos
    return_attn: bool = False  # each hypothesis keeps its attention rows (Hypothesis.attn)

    def __post_init__(self):
        problems = check_section(self, "search")
        for name in ("bos_id", "eos_id", "pad_id"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int)) and not (
                name == "pad_id" and value is None
            ):
                problems.append(f"{name}: expected an int (a special id), found {value!r}")
        if not isinstance(self.return_attn, bool):
            problems.append(f"return_attn: expected bool, found {self.return_attn!r}")
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_config(cls, cfg: SearchConfig, ids, **extras) -> SearchSettings:
        """`cfg`'s values with the special ids of `ids` (a Tokenizer, or anything with bos_id,
        eos_id and pad_id); `extras`: return_attn."""
        values = {f.name: getattr(cfg, f.name) for f in fields(SearchConfig)}
        return cls(**values, bos_id=ids.bos_id, eos_id=ids.eos_id, pad_id=ids.pad_id, **extras)

    @property
    def greedy(self) -> bool:
        """One hypothesis per sentence, done at its first eos."""
        return self.beam_size == 1


@dataclass
class Hypothesis:
    tokens: list[int]  # output ids, without bos/eos
    score: float  # the search score: log_prob / lp + cp
    log_prob: float  # plain sum of the token log-probs, eos included
    attn: torch.Tensor | None = None  # (len(tokens) + 1, src_len) on the CPU, if asked for


# ---------------------------------------------------------------------- entry points
@torch.no_grad()
def beam_search(model, src_ids, src_lens, settings: SearchSettings, *, run=None, line_ids=None):
    """Batched beam search of (src_ids (B, S), src_lens (B,)): `settings.n_best` hypotheses per
    sentence (best first), in input order; beam_size 1 is greedy search, and with
    `settings.sampling` one sample per sentence (see "Sampling" in the module docstring).

    `run`: another implementation of the loop, called as run(model, src_ids, src_lens,
    settings) and giving the same results, e.g. nmt.search_graph.search (static shapes, one
    CUDA graph per step). None: this module's loop, which sampling always uses.
    `line_ids` (B,): the number of each sentence's random stream when sampling (its 0-based
    line in the caller's input); None: 0..B-1. Read only when sampling."""
    if settings.sampling != "none":
        return _search(model, src_ids, src_lens, settings, line_ids)
    return (run or _search)(model, src_ids, src_lens, settings)


def greedy_search(model, src_ids, src_lens, settings: SearchSettings, *, run=None):
    """The most probable token at each step: `beam_search` with beam_size = n_best = 1 and no
    sampling.

    alpha and beta only change the reported score (the choice of tokens does not depend on
    them)."""
    greedy = replace(settings, beam_size=1, n_best=1, sampling="none")
    return beam_search(model, src_ids, src_lens, greedy, run=run)


# ---------------------------------------------------------------------- shared pure functions
# nmt.search_graph's static loop calls these too: one definition of each rule.


def max_output_lens(src_lens: torch.Tensor, max_len_a: float, max_len_b: float) -> torch.Tensor:
    """floor(a * src_len + b) per sentence, eos not counted, at least 0."""
    lens = torch.floor(src_lens.double() * max_len_a + max_len_b)  # float64: exact for a = 0.1
    return lens.long().clamp(min=0)  # (B,)


def length_penalty(length: torch.Tensor | float, alpha: float):
    """GNMT length penalty ((5 + |Y|) / 6) ** alpha, |Y| counting the eos."""
    return ((5.0 + length) / 6.0) ** alpha


def output_limits(src_lens: torch.Tensor, s: SearchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sentence (n,): the output tokens allowed (eos not counted), and the float64 length
    penalty of an output of that length (the largest a hypothesis can reach)."""
    max_lens = max_output_lens(src_lens, s.max_len_a, s.max_len_b)  # (n,)
    return max_lens, length_penalty(max_lens.double() + 1.0, s.alpha)  # (n,), (n,)


def length_penalty_table(steps: int, alpha: float, device) -> torch.Tensor:
    """(steps,) float64: entry t = lp(t + 1), the length penalty of a hypothesis that ends at step
    t (eos counted), for a loop that reads it with a device step index (nmt.search_graph)."""
    lps = [length_penalty(float(t + 1), alpha) for t in range(steps)]
    return torch.tensor(lps, dtype=torch.float64, device=device)  # (steps,)


def blocked_ids(s: SearchSettings, device) -> torch.Tensor | None:
    """The ids search never generates: bos, and pad when given, unless equal to eos; None if
    there are none."""
    blocked = sorted({i for i in (s.bos_id, s.pad_id) if i is not None and i >= 0} - {s.eos_id})
    return torch.tensor(blocked, dtype=torch.long, device=device) if blocked else None


def ends_in_eos(cand_scores: torch.Tensor, cand_tokens: torch.Tensor, eos_id: int):
    """(n, 2K) the candidates that finish a hypothesis: eos with a finite score."""
    return (cand_tokens == eos_id) & torch.isfinite(cand_scores)  # (n, 2K)


def live_beam(cand_scores, cand_beams, cand_tokens, is_eos, k: int):
    """The live beam: the k best candidates (n, 2K) that do not end in eos, in rank order (there
    are always k in the 2k, so finished hypotheses never starve the beam).

    Returns (scores, tokens, parents), each (n, K): the cumulative log-prob (-inf for a dead
    row), the new token, and the row (sentence * k + beam) of the hypothesis it extends."""
    live = torch.sort(is_eos.int(), dim=1, stable=True).indices[:, :k]  # (n, K)
    scores = cand_scores.gather(1, live).masked_fill(is_eos.gather(1, live), -math.inf)
    tokens = cand_tokens.gather(1, live)  # (n, K)
    sent_rows = torch.arange(cand_scores.size(0), device=cand_scores.device)[:, None] * k
    return scores, tokens, sent_rows + cand_beams.gather(1, live)  # (n, K) each


def coverage_penalty(attn_sums: torch.Tensor, src_lens: torch.Tensor, beta: float):
    """GNMT coverage penalty (F,): beta * sum_i log(min(attn_sums[:, i], 1)) over the real source
    positions i < src_lens (F,), sums clamped below at 1e-10 (an unattended word costs
    beta * log(1e-10), not -inf). attn_sums (F, S): each hypothesis's attention summed over
    the steps that produced its tokens, the eos step included."""
    total = attn_sums.clamp(_COVERAGE_FLOOR, 1.0)  # (F, S)
    real_mask = torch.arange(total.size(1), device=total.device) < src_lens[:, None]  # (F, S)
    return beta * torch.where(real_mask, total.log(), 0.0).sum(dim=1)  # (F,)


def sentences_done(
    live_scores, num_finished, worst_finished, limits, t, s: SearchSettings, lp_next
):
    """(n,) the sentences that are done after step t: at their maximum length, with no live
    hypothesis (`live_scores` (n, K), raw cumulative log-probs), or with beam_size finished
    ones (`num_finished` (n,)). `limits`: `output_limits` of the sentences.

    With s.exact_stop (beam > 1) a full sentence is done only when its best live hypothesis
    cannot beat its worst finished one (`worst_finished` (n,), -inf until beam_size are kept):
    a live log-prob L <= 0 can only fall and cp <= 0, so L over the largest length penalty it
    can still get (lengths t + 2 .. max_len + 1) bounds the score it can reach. `lp_next`:
    lp(t + 2), a float or a (1,) float64 tensor; read only with exact_stop (else None will do).
    """
    max_lens, lp_at_max = limits
    best_live = live_scores.max(dim=1).values  # (n,)
    full = num_finished >= s.beam_size  # (n,)
    if s.exact_stop and not s.greedy:
        lp_bound = lp_at_max.clamp(min=lp_next)  # (n,) float64
        full &= (best_live.double() / lp_bound).float() <= worst_finished
    return (max_lens <= t) | ~torch.isfinite(best_live) | full  # (n,)


# ---------------------------------------------------------------------- sampling
# A candidate rule of the same loop (beam_size 1): the draw replaces the top-k. Each sentence has
# its own random stream: a counter-based generator hashes (seed, line id, step) into one
# uniform number, so a draw depends on nothing else (not the batch, not the other lines, not the
# device's generator state), and nothing is kept between steps.
_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 0 <= x < 2**32 and a 32-bit constant c, in two 16-bit halves
    so that no product overflows int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (Appleby): every input bit flips each output bit with
    probability ~1/2."""
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def uniforms(seed: int, line_ids: torch.Tensor, t: int) -> torch.Tensor:
    """One uniform number in [0, 1) (float64, 53 random bits) per line id (n,) for step t: a
    pure function of (seed, line id, t)."""
    h = _mix32(torch.full_like(line_ids, seed & _M32) ^ 0x9E3779B9)  # (n,)
    for word in (line_ids & _M32, (line_ids >> 32) & _M32, torch.full_like(line_ids, t & _M32)):
        h = _mix32(h ^ word)
    low = _mix32(h ^ 0x7F4A7C15)  # a second word for the low bits
    bits = (h << 21) | (low >> 11)  # (n,) 53 bits
    return bits.double() / float(2**53)


def sampling_log_probs(log_probs: torch.Tensor, s: SearchSettings) -> torch.Tensor:
    """The distribution a draw is from (n, V), as float32 log-probs with -inf outside it: the
    model's `log_probs` divided by s.temperature and renormalised, then truncated to the
    s.topk most probable ids (sampling "topk") or to the smallest set of most probable ids
    holding s.topp of the tempered probability (sampling "topp"; the most probable id is always
    in it), and renormalised. Ids that are -inf in `log_probs` stay out."""
    tempered = torch.log_softmax(log_probs.float() / s.temperature, dim=-1)  # (n, V)
    if s.sampling == "topk":
        k = min(s.topk, tempered.size(-1))
        kth = tempered.topk(k, dim=-1).values[:, -1:]  # (n, 1)
        keep = tempered >= kth  # ties at the k-th value all stay
    elif s.topp < 1.0:
        sorted_lp, order = tempered.sort(dim=-1, descending=True)  # (n, V)
        probs = sorted_lp.double().exp()  # (n, V)
        before = probs.cumsum(dim=-1) - probs  # the mass of the ids ranked above each
        keep = torch.empty_like(order, dtype=torch.bool).scatter_(1, order, before < s.topp)
    else:  # topp 1: the whole distribution
        return tempered
    return torch.log_softmax(tempered.masked_fill(~keep, -math.inf), dim=-1)  # (n, V)


def draw(dist_log_probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The id (n,) each row's uniform number u (n,) selects from its distribution (n, V) by the
    inverse of its cumulative distribution (in id order, float64): id i is drawn with
    probability p_i, an id of probability 0 never (a row without any gives an arbitrary id)."""
    probs = torch.nan_to_num(dist_log_probs.double().exp(), nan=0.0)  # (n, V)
    cdf = probs.cumsum(dim=-1)  # (n, V)
    target = (u * cdf[:, -1]).unsqueeze(1)  # (n, 1), below the row's total
    ids = torch.searchsorted(cdf, target, right=True).squeeze(1)  # first id with cdf > target
    return ids.clamp(max=probs.size(1) - 1)  # (n,)


def sampled_candidates(log_probs, cum_log_probs, blocked, at_max, u, s: SearchSettings):
    """The sampling rule of the loop, for one row per sentence (n, V): the drawn id as the one
    candidate, scored with the model's own log-prob (the plain one: temperature and truncation
    shape the draw, not the score), beside a dead second candidate, in `_top_candidates`' form
    ((n, 2) scores, beams, ids). `blocked` ids are never drawn; rows `at_max` (n,) draw eos."""
    allowed = log_probs.float()  # (n, V)
    if blocked is not None:
        allowed = allowed.index_fill(1, blocked, -math.inf)
    if at_max is not None:
        only_eos = torch.full_like(allowed, -math.inf)
        only_eos[:, s.eos_id] = allowed[:, s.eos_id]
        allowed = torch.where(at_max[:, None], only_eos, allowed)  # (n, V)
    dist = sampling_log_probs(allowed, s)  # (n, V)
    ids = draw(dist, u)[:, None]  # (n, 1)
    drawable = torch.isfinite(dist.gather(1, ids)).squeeze(1)  # (n,) False: nothing to draw
    scores = allowed.gather(1, ids).squeeze(1) + cum_log_probs.view(-1)  # (n,)
    scores, ids = scores.masked_fill(~drawable, -math.inf), ids.squeeze(1)  # (n,), (n,)
    dead = torch.full_like(scores, -math.inf)
    cand_scores = torch.stack([scores, dead], dim=1)  # (n, 2)
    cand_tokens = torch.stack([ids, torch.zeros_like(ids)], dim=1)  # (n, 2)
    return cand_scores, torch.zeros_like(cand_tokens), cand_tokens


def _streams(line_ids, n: int, device) -> torch.Tensor:
    """Each sentence's stream number (n,) int64: `line_ids`, or 0..n-1."""
    if line_ids is None:
        return torch.arange(n, device=device)
    line_ids = torch.as_tensor(line_ids, dtype=torch.long, device=device)
    if line_ids.shape != (n,) or bool((line_ids < 0).any()):
        raise ValueError(f"search: expected {n} line ids >= 0, found {line_ids.tolist()}")
    return line_ids


# ---------------------------------------------------------------------- the loop
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


@dataclass
class _Rows:
    """What search keeps per hypothesis row (sentence * K + beam) of the active sentences."""

    enc: Any  # the encoder output, one copy per row
    state: Any  # the decoder state
    tgt_ids_t: torch.Tensor  # (n*K,) the token each row reads next
    cum_log_probs: torch.Tensor  # (n, K) raw cumulative log-prob; -inf: a dead row
    history: torch.Tensor  # (n*K, t) tokens so far
    coverage: torch.Tensor | None = None  # (n*K, S) attention summed so far, when beta != 0
    attn_history: torch.Tensor | None = None  # (n*K, t, S), when return_attn


def _search(model, src_ids, src_lens, s: SearchSettings, line_ids=None):
    if src_ids.dim() != 2 or src_lens.shape != (src_ids.size(0),):
        raise ValueError(
            f"search: expected src_ids (B, S) and src_lens (B,), found "
            f"{tuple(src_ids.shape)} and {tuple(src_lens.shape)}"
        )
    k = s.beam_size
    finished: list[list[Hypothesis]] = [[] for _ in range(src_ids.size(0))]
    if not finished:
        return finished
    blocked = blocked_ids(s, src_ids.device)
    streams = _streams(line_ids, src_ids.size(0), src_ids.device)  # (B,)
    act, rows = _start(model, src_ids, src_lens, s)
    min_max_len = int(act.max_lens.min())  # no row needs the eos-only mask before this step
    for t in itertools.count():
        log_probs, state, attn = model.step(rows.tgt_ids_t, rows.state, rows.enc)
        at_max = (act.max_lens == t).repeat_interleave(k) if t >= min_max_len else None
        n = rows.cum_log_probs.size(0)
        if s.sampling == "none":
            cand_scores, cand_beams, cand_tokens = _top_candidates(
                log_probs, rows.cum_log_probs, n, k, blocked, s.eos_id, at_max
            )  # (n, 2K) each
        else:  # one row per sentence (beam_size 1); its own stream's draw for step t
            u = uniforms(s.seed, streams[act.sent_ids], t)  # (n,)
            cand_scores, cand_beams, cand_tokens = sampled_candidates(
                log_probs, rows.cum_log_probs, blocked, at_max, u, s
            )  # (n, 2) each
        attn = _track_attention(rows, attn, s)  # (n*K, S)
        is_eos = ends_in_eos(cand_scores, cand_tokens, s.eos_id)  # (n, 2K)
        _finish(finished, act, rows, (cand_scores, cand_beams, is_eos), attn, t, s)
        live = live_beam(cand_scores, cand_beams, cand_tokens, is_eos, k)  # (n, K) each
        done = _done(act, live[0], t, s)  # (n,)
        if bool(done.all()):
            break
        dropped = bool(done.any())
        if dropped:
            keep = (~done).nonzero().squeeze(1)  # (n',)
            act, live = act.select(keep), tuple(x[keep] for x in live)  # (n', K) each
            min_max_len = int(act.max_lens.min())
            rows.enc = model.reorder_encoder_out(rows.enc, _rows_of(keep, k))
        _advance(model, rows, state, attn, live, reorder=k > 1 or dropped)
    empty = Hypothesis(tokens=[], score=-math.inf, log_prob=-math.inf)
    return [hyps[: s.n_best] if hyps else [empty] for hyps in finished]


def _start(model, src_ids, src_lens, s: SearchSettings) -> tuple[_Active, _Rows]:
    """The sentences and hypothesis rows before step 0. Beams 1..k-1 start dead, so that the
    first step does not fill the beam with k copies of the same continuation."""
    device, n, k = src_ids.device, src_ids.size(0), s.beam_size
    max_lens, lp_at_max = output_limits(src_lens.to(device), s)  # (n,), (n,)
    act = _Active(
        sent_ids=torch.arange(n, device=device),
        src_lens=src_lens.to(device),
        max_lens=max_lens,
        lp_at_max=lp_at_max,
        num_finished=torch.zeros(n, dtype=torch.long, device=device),
        worst_finished=torch.full((n,), -math.inf, device=device),
    )
    enc = model.encode(src_ids, src_lens)
    if k > 1:
        enc = model.reorder_encoder_out(enc, torch.arange(n, device=device).repeat_interleave(k))
    cum_log_probs = torch.full((n, k), -math.inf, device=device)  # (n, K)
    cum_log_probs[:, 0] = 0.0
    rows = _Rows(
        enc=enc,
        state=model.init_state(enc),
        tgt_ids_t=torch.full((n * k,), s.bos_id, dtype=torch.long, device=device),  # (n*K,)
        cum_log_probs=cum_log_probs,
        history=torch.empty((n * k, 0), dtype=torch.long, device=device),  # (n*K, 0)
    )
    return act, rows


def _track_attention(rows: _Rows, attn: torch.Tensor, s: SearchSettings) -> torch.Tensor:
    """The step's attention in float32 (n*K, S); the first step starts the coverage sums (beta
    != 0) and the attention history (return_attn)."""
    attn = attn.float()  # (n*K, S)
    if rows.coverage is None and s.beta != 0.0:
        rows.coverage = torch.zeros_like(attn)  # (n*K, S)
    if rows.attn_history is None and s.return_attn:
        rows.attn_history = attn.new_zeros(attn.size(0), 0, attn.size(1))  # (n*K, 0, S)
    return attn


def _finish(finished, act: _Active, rows: _Rows, cands, attn, t: int, s: SearchSettings):
    """Finalise the candidates (n, 2K) that end in eos among the k best of their sentence, and
    keep the best of them in `finished`."""
    cand_scores, cand_beams, is_eos = cands
    k = s.beam_size
    fin = is_eos[:, :k].nonzero()  # (F, 2): (sentence, rank) of the eos among the k best
    if not fin.numel():
        return
    fin_sents, fin_ranks = fin[:, 0], fin[:, 1]
    fin_rows = fin_sents * k + cand_beams[fin_sents, fin_ranks]  # (F,)
    log_probs = cand_scores[fin_sents, fin_ranks]  # (F,)
    hyps = _finalise(fin_rows, log_probs, act.src_lens[fin_sents], t, rows, attn, s)
    _store(finished, hyps, fin_sents, act, k)


def _done(act: _Active, live_scores, t: int, s: SearchSettings) -> torch.Tensor:
    """`sentences_done` for the active sentences (n,) after step t."""
    lp_next = length_penalty(float(t + 2), s.alpha) if s.exact_stop else None
    limits = (act.max_lens, act.lp_at_max)
    return sentences_done(live_scores, act.num_finished, act.worst_finished, limits, t, s, lp_next)


def _advance(model, rows: _Rows, state, attn, live, reorder: bool) -> None:
    """Each live hypothesis (n', K) extends its parent row: the rows for the next step."""
    scores, tokens, parents = live
    parents = parents.view(-1)  # (n'*K,) row of each surviving hypothesis's parent
    rows.state = model.reorder_state(state, parents) if reorder else state
    rows.history = torch.cat([rows.history[parents], tokens.view(-1, 1)], dim=1)  # (n'*K, t+1)
    if rows.coverage is not None:
        rows.coverage = (rows.coverage + attn)[parents]  # (n'*K, S)
    if rows.attn_history is not None:
        history = torch.cat([rows.attn_history, attn.unsqueeze(1)], dim=1)  # (n*K, t+1, S)
        rows.attn_history = history[parents]  # (n'*K, t+1, S)
    rows.tgt_ids_t, rows.cum_log_probs = tokens.view(-1), scores  # (n'*K,), (n', K)


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


def _finalise(fin_rows, log_probs, src_lens, t: int, rows: _Rows, attn, s: SearchSettings):
    """Hypotheses for the rows (F,) that emit eos at step t, so |Y| = t + 1."""
    scores = log_probs / length_penalty(float(t + 1), s.alpha)  # (F,)
    if rows.coverage is not None:
        attn_sums = rows.coverage[fin_rows] + attn[fin_rows]  # (F, S)
        scores = scores + coverage_penalty(attn_sums, src_lens, s.beta)  # (F,)
    attns = [None] * fin_rows.size(0)
    if rows.attn_history is not None:
        full = torch.cat([rows.attn_history[fin_rows], attn[fin_rows].unsqueeze(1)], dim=1)
        attns = [a[:, :n] for a, n in zip(full.cpu(), src_lens.tolist())]  # (t+1, S_i) each
    return [
        Hypothesis(tokens=tokens, score=score, log_prob=log_prob, attn=a)
        for tokens, score, log_prob, a in zip(
            rows.history[fin_rows].tolist(), scores.tolist(), log_probs.tolist(), attns
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
