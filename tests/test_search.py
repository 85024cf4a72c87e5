"""Greedy and beam search (nmt.search).

Scripted models replay hand-written probability tables, with the expected hypotheses and scores
worked out in comments; random tiny models check the invariants (beam 1 == greedy, batched ==
one by one, work shrinks as sentences end, maximum length).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from nmt.config import ModelConfig
from nmt.errors import UsageError
from nmt.models.base import EncoderOut, Seq2Seq
from nmt.search import Hypothesis, SearchSettings, beam_search, greedy_search, max_output_lens

PAD, BOS, EOS, A, B, C = 0, 1, 2, 3, 4, 5
VOCAB = 6
ln = math.log


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ScriptedModel(Seq2Seq):
    """Replays `tables[table][prefix] = {token: prob}`; unlisted tokens get probability 0.

    The table of a sentence is its first source id. A prefix missing from the table ends the
    sentence ({EOS: 1}). Every step returns the same attention `attn_weights` over the source
    columns, padding included (search must mask it). `rows_per_step` records the batch size of
    every `step` call.
    """

    def __init__(self, tables, attn_weights=None, default=None):
        super().__init__()
        self.tables = tables
        self.attn_weights = attn_weights
        self.default = default or {EOS: 1.0}
        self.tgt_vocab_size = VOCAB
        self.rows_per_step: list[int] = []

    def encode(self, src_ids, src_lens):
        mask = torch.arange(src_ids.size(1))[None, :] < src_lens[:, None]  # (B, S)
        return EncoderOut(memory=src_ids.float().unsqueeze(-1), src_mask=mask, src_lens=src_lens)

    def init_state(self, enc):
        return torch.zeros(enc.memory.size(0), 0, dtype=torch.long)  # (B, 0) tokens so far

    def step(self, tgt_ids_t, state, enc):
        self.rows_per_step.append(tgt_ids_t.size(0))
        state = torch.cat([state, tgt_ids_t[:, None]], dim=1)  # (B, t+1)
        assert bool((state[:, 0] == BOS).all())
        log_probs = torch.full((state.size(0), VOCAB), -math.inf)
        for row, (prefix, table) in enumerate(zip(state[:, 1:].tolist(), enc.memory[:, 0, 0])):
            probs = self.tables[int(table)].get(tuple(prefix), self.default)
            for token, p in probs.items():
                log_probs[row, token] = math.log(p)
        s = enc.memory.size(1)
        weights = self.attn_weights or [1.0 / s] * s
        attn = torch.tensor(weights[:s]).expand(state.size(0), s)  # (B, S)
        return log_probs, state, attn


def _src(*specs):
    """Source batch: each spec is (table id, length); padding after the real tokens."""
    s = max(n for _, n in specs)
    src_ids = torch.full((len(specs), s), PAD, dtype=torch.long)
    for i, (table, n) in enumerate(specs):
        src_ids[i, :n] = table
    return src_ids, torch.tensor([n for _, n in specs])


def settings(**kw) -> SearchSettings:
    """The product's search settings (the `search` config defaults: beam 5, alpha 0.6, the early
    stop) with the tables' special ids; `kw` overrides any of them."""
    return SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, **kw)


def _beam(model, src_ids, src_lens, **kw):
    return beam_search(model, src_ids, src_lens, settings(**kw))


def _greedy(model, src_ids, src_lens, **kw):
    """Greedy search; alpha 0 unless given, so that the score is the plain log-probability."""
    return greedy_search(model, src_ids, src_lens, settings(**{"alpha": 0.0, **kw}))


def _summary(hyps: list[Hypothesis]):
    return [(h.tokens, h.score) for h in hyps]


# Table 7: greedy and beam disagree.
#   ()    : A .5, B .4, EOS .1
#   (A,)  : EOS .4, B .35, C .25          (B,) : EOS .9, A .1
#   (A,B), (A,C), (B,A): EOS 1 (default)
GREEDY_VS_BEAM = {
    7: {
        (): {A: 0.5, B: 0.4, EOS: 0.1},
        (A,): {EOS: 0.4, B: 0.35, C: 0.25},
        (B,): {EOS: 0.9, A: 0.1},
    }
}


def test_greedy_and_beam_differ_scripted():
    src_ids, src_lens = _src((7, 3))
    # Greedy: A (.5), then EOS (.4): [A], log P = ln .2.
    (greedy,) = _greedy(ScriptedModel(GREEDY_VS_BEAM), src_ids, src_lens)
    assert _summary(greedy) == [([A], pytest.approx(ln(0.2), abs=1e-6))]
    assert greedy[0].log_prob == pytest.approx(ln(0.2), abs=1e-6)
    # Beam 2, alpha 0. Step 0: A ln .5, B ln .4 (EOS ln .1 ranks 3rd: outside the beam, dropped).
    # Step 1: [B]+EOS ln .36 = -1.022, [A]+EOS ln .2 = -1.609, [A,B] ln .175 = -1.743,
    # [A,C] ln .125, [B,A] ln .04. The 2 best end in EOS: finished [B] and [A]; two finished
    # hypotheses fill the beam: done.
    (beam,) = _beam(
        ScriptedModel(GREEDY_VS_BEAM), src_ids, src_lens, beam_size=2, n_best=2, alpha=0.0
    )
    assert _summary(beam) == [
        ([B], pytest.approx(ln(0.36), abs=1e-6)),
        ([A], pytest.approx(ln(0.2), abs=1e-6)),
    ]
    # n_best 1 keeps the best one only.
    (beam1,) = _beam(ScriptedModel(GREEDY_VS_BEAM), src_ids, src_lens, beam_size=2, alpha=0.0)
    assert _summary(beam1) == _summary(beam)[:1]


# Table 9: a short hypothesis against longer ones, EOS late enough for beam 2 to reach them.
#   ()      : A .6, EOS .4
#   (A,)    : B .6, C .3, EOS .1
#   (A,B), (A,C): EOS 1 (default)
# Complete hypotheses (|Y| counts the EOS):
#   []       log P = ln .4  = -0.9163  |Y| = 1
#   [A,B]    log P = ln .36 = -1.0217  |Y| = 3
#   [A,C]    log P = ln .18 = -1.7148  |Y| = 3
# Beam 2: step 0 finishes [] (EOS ranks 2nd), [A] lives; step 1: [A,B] and [A,C] live, [A]+EOS
# (ln .06) ranks 3rd and is dropped; step 2 finishes both: three finished, the best two kept.
LATE_EOS = {
    9: {
        (): {A: 0.6, EOS: 0.4},
        (A,): {B: 0.6, C: 0.3, EOS: 0.1},
    }
}


def test_length_penalty_changes_the_winner():
    src_ids, src_lens = _src((9, 3))
    # alpha = 0: [] (-0.9163) beats [A,B] (-1.0217).
    (plain,) = _beam(ScriptedModel(LATE_EOS), src_ids, src_lens, beam_size=2, n_best=2, alpha=0.0)
    assert _summary(plain) == [
        ([], pytest.approx(ln(0.4), abs=1e-6)),
        ([A, B], pytest.approx(ln(0.36), abs=1e-6)),
    ]
    # alpha = 1: lp = (5 + |Y|) / 6. [] scores -0.9163 / 1, [A,B] -1.0217 / (8/6) = -0.7662,
    # which now wins; [A,C] -1.7148 / (8/6) = -1.2861 stays third. log_prob stays the plain sum.
    (penalised,) = _beam(
        ScriptedModel(LATE_EOS), src_ids, src_lens, beam_size=2, n_best=2, alpha=1.0
    )
    assert _summary(penalised) == [
        ([A, B], pytest.approx(ln(0.36) * 6 / 8, abs=1e-6)),
        ([], pytest.approx(ln(0.4), abs=1e-6)),
    ]
    assert penalised[0].log_prob == pytest.approx(ln(0.36), abs=1e-6)
    # alpha = 0.6 (the default): lp(3) = (8/6)^0.6 = 1.1884, -1.0217 / 1.1884 = -0.8597 > -0.9163.
    (default,) = _beam(ScriptedModel(LATE_EOS), src_ids, src_lens, beam_size=2)
    assert _summary(default) == [([A, B], pytest.approx(ln(0.36) / (8 / 6) ** 0.6, abs=1e-6))]


# Table 3: a long hypothesis against a short one, EOS early.
#   ()      : A .55, EOS .45
#   (A,)    : B .8, EOS .2
#   (A,B)   : C .8, EOS .2
#   (A,B,C) : EOS 1
# Complete hypotheses (|Y| counts the EOS):
#   []       log P = ln .45  = -0.7985  |Y| = 1
#   [A]      log P = ln .11  = -2.2073  |Y| = 2
#   [A,B]    log P = ln .088 = -2.4304  |Y| = 3
#   [A,B,C]  log P = ln .352 = -1.0441  |Y| = 4
LONG_VS_SHORT = {
    3: {
        (): {A: 0.55, EOS: 0.45},
        (A,): {B: 0.8, EOS: 0.2},
        (A, B): {C: 0.8, EOS: 0.2},
        (A, B, C): {EOS: 1.0},
    }
}


def test_early_stop_and_exact_stop():
    src_ids, src_lens = _src((3, 3))
    model = ScriptedModel(LONG_VS_SHORT)
    # The default (fairseq/OpenNMT early stop), beam 2, alpha 1: step 0 finishes [] (-0.7985),
    # step 1 finishes [A] (-2.2073 / (7/6) = -1.892): two finished, so the sentence is done
    # before [A,B,C] (-1.0441 / (9/6) = -0.6961) is reached.
    (early,) = _beam(model, src_ids, src_lens, beam_size=2, n_best=2, alpha=1.0)
    assert _summary(early) == [
        ([], pytest.approx(ln(0.45), abs=1e-6)),
        ([A], pytest.approx(ln(0.11) / (7 / 6), abs=1e-6)),
    ]
    # exact_stop: a live log-prob L can reach at best L / lp(max_len + 1), the largest length
    # penalty left (max_len = floor(1.5 * 3 + 10) = 14: lp(15) = 20/6). After step 1 the live
    # [A,B] (ln .44 = -0.821) could reach -0.246 > -1.892: go on. Step 2 finishes [A,B]
    # (-2.4304 / (8/6) = -1.823, replaces [A]); the live [A,B,C] (-1.0441) could reach -0.313 >
    # -1.823: go on. Step 3 finishes [A,B,C] (-1.0441 / (9/6) = -0.6961): the best.
    (exact,) = _beam(model, src_ids, src_lens, beam_size=2, n_best=2, alpha=1.0, exact_stop=True)
    assert _summary(exact) == [
        ([A, B, C], pytest.approx(ln(0.352) / 1.5, abs=1e-6)),
        ([], pytest.approx(ln(0.45), abs=1e-6)),
    ]
    # exact_stop, alpha = 0: after step 1 the live [A,B] (-0.821) can still beat [A] (-2.207);
    # step 2: [A,B] (-2.430) is worse than the worst finished, dropped; step 3 finishes [A,B,C]
    # (-1.044), which replaces [A]. Best: [].
    (plain,) = _beam(model, src_ids, src_lens, beam_size=2, n_best=2, alpha=0.0, exact_stop=True)
    assert _summary(plain) == [
        ([], pytest.approx(ln(0.45), abs=1e-6)),
        ([A, B, C], pytest.approx(ln(0.352), abs=1e-6)),
    ]


def test_coverage_penalty_counts_real_source_positions_only():
    # Attention .3, .2, .1 on columns 0, 1, 2 at every step. Sentence 0 has 3 real tokens;
    # sentence 1 has 2, its column 2 is padding and must not count.
    # cp = beta * sum_i ln min(n * w_i, 1) after n steps (|Y| = n, the EOS step included), beta 1:
    #   sentence 1: n=1 ln.3+ln.2 = -2.8134   n=3 ln.9+ln.6 = -0.6162
    #   sentence 0 adds ln min(.1n, 1): -2.3026, -1.2040.
    # Scores on table 9 (alpha 0) = log P + cp:
    #   sentence 1: [] -0.9163-2.8134 = -3.7297, [A,B] -1.0217-0.6162 = -1.6379,
    #               [A,C] -1.7148-0.6162 = -2.3310
    #   sentence 0: [] -6.0323, [A,B] -2.8419, [A,C] -3.5350
    # Beam 2 keeps [A,B] and [A,C]: coverage turns the alpha-0 winner [] into the one dropped.
    src_ids, src_lens = _src((9, 3), (9, 2))
    model = ScriptedModel(LATE_EOS, attn_weights=[0.3, 0.2, 0.1])
    cov1 = {1: ln(0.3) + ln(0.2), 3: ln(0.9) + ln(0.6)}
    cov0 = {n: c + ln(min(0.1 * n, 1.0)) for n, c in cov1.items()}
    ab, ac = ln(0.36), ln(0.18)
    results = _beam(model, src_ids, src_lens, beam_size=2, n_best=2, alpha=0.0, beta=1.0)
    assert _summary(results[0]) == [
        ([A, B], pytest.approx(ab + cov0[3], abs=1e-5)),
        ([A, C], pytest.approx(ac + cov0[3], abs=1e-5)),
    ]
    assert _summary(results[1]) == [
        ([A, B], pytest.approx(ab + cov1[3], abs=1e-5)),
        ([A, C], pytest.approx(ac + cov1[3], abs=1e-5)),
    ]
    assert results[1][0].log_prob == pytest.approx(ab, abs=1e-6)
    # With alpha 1 too: [A,B] = -1.0217 / (8/6) - 0.6162 = -1.3824 for sentence 1.
    results = _beam(model, src_ids, src_lens, beam_size=2, alpha=1.0, beta=1.0)
    assert results[1][0].score == pytest.approx(ab * 6 / 8 + cov1[3], abs=1e-5)
    # Greedy (A .6 > EOS .4, then B, EOS) reports the penalised score of its choice too.
    greedy = _greedy(model, src_ids, src_lens, beta=1.0)
    assert _summary(greedy[1]) == [([A, B], pytest.approx(ab + cov1[3], abs=1e-5))]
    # A source word never attended costs beta * ln 1e-10 = -23.03 (the floor), not -inf: all
    # attention on column 0 of sentence (9, 2), so every hypothesis pays it once; [] wins.
    model = ScriptedModel(LATE_EOS, attn_weights=[1.0, 0.0])
    (results,) = _beam(model, *_src((9, 2)), beam_size=2, n_best=2, alpha=0.0, beta=1.0)
    assert _summary(results) == [
        ([], pytest.approx(ln(0.4) + ln(1e-10), abs=1e-4)),
        ([A, B], pytest.approx(ab + ln(1e-10), abs=1e-4)),
    ]


def test_nbest_is_sorted_and_of_size_n_best():
    src_ids, src_lens = _src((3, 3), (7, 2))
    tables = {**LONG_VS_SHORT, **GREEDY_VS_BEAM}
    for n_best in (1, 2, 3):
        results = _beam(ScriptedModel(tables), src_ids, src_lens, beam_size=3, n_best=n_best)
        for hyps in results:
            assert len(hyps) == n_best
            scores = [h.score for h in hyps]
            assert scores == sorted(scores, reverse=True)
    with pytest.raises(UsageError, match="n_best"):
        _beam(ScriptedModel(tables), src_ids, src_lens, beam_size=2, n_best=3)
    with pytest.raises(UsageError, match="beam_size"):
        _beam(ScriptedModel(tables), src_ids, src_lens, beam_size=0)


# Table 11: EOS among the k best at step 0, a finite candidate behind it.
#   ()   : A .5, EOS .3, B .2
#   (A,) : C .9, EOS .1
#   (B,), (A,C): EOS 1 (default)
REFILL = {11: {(): {A: 0.5, EOS: 0.3, B: 0.2}, (A,): {C: 0.9, EOS: 0.1}}}


def test_finished_hypotheses_never_starve_the_beam():
    # Beam 2, alpha 0. Step 0: A ln .5 and EOS ln .3 are the 2 best: [] finishes (-1.204), and
    # the live beam is refilled with A and B (ranked 3rd, ln .2 = -1.609), not left one short.
    # Step 1: [A,C] ln .45 = -0.799, [B]+EOS -1.609, [A]+EOS ln .05 = -2.996: [B] finishes, two
    # finished: done. Had B been lost at step 0, [A] (-2.996) would be the second.
    src_ids, src_lens = _src((11, 2))
    (beam,) = _beam(ScriptedModel(REFILL), src_ids, src_lens, beam_size=2, n_best=2, alpha=0.0)
    assert _summary(beam) == [
        ([], pytest.approx(ln(0.3), abs=1e-6)),
        ([B], pytest.approx(ln(0.2), abs=1e-6)),
    ]


# Table 12: one way to finish. ()  : A 1;  (A,): EOS 1.
ONE_WAY = {12: {(): {A: 1.0}, (A,): {EOS: 1.0}}}


def test_impossible_hypotheses_are_never_kept_and_a_sentence_without_live_ones_ends():
    # Beam 4. Step 0: A (ln 1 = 0), then candidates of probability 0 (-inf): PAD, BOS, EOS of
    # beam 0 (ties: the lower (beam, token) first), so an EOS scored -inf is among the 4 best;
    # it is not a finished hypothesis. Step 1 finishes [A] (0); nothing finite is left alive,
    # so the sentence ends there, one hypothesis short of n_best, after 2 steps.
    model = ScriptedModel(ONE_WAY)
    src_ids, src_lens = _src((12, 2))
    (beam,) = _beam(model, src_ids, src_lens, beam_size=4, n_best=4)
    assert _summary(beam) == [([A], 0.0)]
    assert model.rows_per_step == [4, 4]


def test_ties_go_to_the_lower_token_id_and_bos_pad_are_never_generated():
    # (): BOS .3, PAD .3, B .2, A .2 -> BOS and PAD are blocked; A and B tie, A (lower id) first.
    tables = {5: {(): {BOS: 0.3, PAD: 0.3, B: 0.2, A: 0.2}}}
    src_ids, src_lens = _src((5, 2))
    (greedy,) = _greedy(ScriptedModel(tables), src_ids, src_lens)
    assert greedy[0].tokens == [A]
    (beam,) = _beam(ScriptedModel(tables), src_ids, src_lens, beam_size=2, n_best=2, alpha=0.0)
    assert [h.tokens for h in beam] == [[A], [B]]
    assert [h.score for h in beam] == [pytest.approx(ln(0.2))] * 2


def test_finished_sentences_leave_the_batch():
    # Sentence 0 (table 7) is done after step 1 (see test_greedy_and_beam_differ_scripted);
    # sentence 1 (table 9) runs 3 steps, so the last step sees its beam alone.
    src_ids, src_lens = _src((7, 3), (9, 3))
    model = ScriptedModel({**GREEDY_VS_BEAM, **LATE_EOS})
    results = _beam(model, src_ids, src_lens, beam_size=2, alpha=0.0)
    assert model.rows_per_step == [4, 4, 2]
    assert [r[0].tokens for r in results] == [[B], []]
    # Greedy, order swapped: table 9 gives [A,B] (3 steps), table 7 gives [A] (2 steps).
    model.rows_per_step.clear()
    results = _greedy(model, src_ids.flip(0), src_lens)
    assert model.rows_per_step == [2, 2, 1]
    assert [r[0].tokens for r in results] == [[A, B], [A]]


def test_max_length_is_respected():
    # A .95 and EOS .05 after every prefix. Greedy never picks EOS by itself: it stops at the
    # limit, where EOS is forced and its log-prob counted: log P = n ln .95 + ln .05.
    model = ScriptedModel({4: {}}, default={A: 0.95, EOS: 0.05})
    src_ids, src_lens = _src((4, 1), (4, 2), (4, 4))
    max_lens = max_output_lens(src_lens, 1.5, 1)
    assert max_lens.tolist() == [2, 4, 7]  # floor(2.5), floor(4), floor(7)
    results = _greedy(model, src_ids, src_lens, max_len_a=1.5, max_len_b=1)
    for (hyp,), n in zip(results, max_lens.tolist()):
        assert hyp.tokens == [A] * n
        assert hyp.log_prob == pytest.approx(n * ln(0.95) + ln(0.05), abs=1e-5)
    assert model.rows_per_step == [3, 3, 3, 2, 2, 1, 1, 1]  # steps 0..max_len per sentence
    # Beam 2 (the default stop) with A .6, B .35, EOS .05: EOS never ranks among the 2 best, so
    # both hypotheses run to the limit, where EOS is forced. The best is all A; the second has
    # one B, and of the equally likely places for it the tie rule (lower beam first) keeps the
    # extension of the all-A prefix: A..AB. Scores: (n ln .6 + ln .05) and
    # ((n-1) ln .6 + ln .35 + ln .05), both over lp(n + 1).
    model = ScriptedModel({4: {}}, default={A: 0.6, B: 0.35, EOS: 0.05})
    results = _beam(model, src_ids, src_lens, beam_size=2, n_best=2, max_len_a=1.5, max_len_b=1)
    for hyps, n in zip(results, max_lens.tolist()):
        assert [h.tokens for h in hyps] == [[A] * n, [A] * (n - 1) + [B]]
        log_probs = [n * ln(0.6) + ln(0.05), (n - 1) * ln(0.6) + ln(0.35) + ln(0.05)]
        assert [h.log_prob for h in hyps] == pytest.approx(log_probs, abs=1e-5)
    # exact_stop, beam 3, a strong length penalty (alpha 30): the longest hypotheses win, cut at
    # the limit: n ln .95 + ln .05 over lp(n + 1) grows with n.
    model = ScriptedModel({4: {}}, default={A: 0.95, EOS: 0.05})
    kw = dict(beam_size=3, n_best=3, alpha=30.0, max_len_a=1.5, max_len_b=1, exact_stop=True)
    results = _beam(model, src_ids, src_lens, **kw)
    for hyps, n in zip(results, max_lens.tolist()):
        assert [h.tokens for h in hyps] == [[A] * n, [A] * (n - 1), [A] * (n - 2)]
    # The smallest limit the settings allow, 1 token (max_len_b >= 1): greedy writes A, then
    # EOS is forced; beam 3 also keeps [] (EOS ranks 2nd at step 0), scored below [A] by alpha
    # 0.6: (ln .95 + ln .05) / (7/6)^0.6 = -2.778 > ln .05 = -2.996.
    results = _greedy(model, src_ids, src_lens, max_len_a=0.0, max_len_b=1)
    assert [r[0].tokens for r in results] == [[A], [A], [A]]
    results = _beam(model, src_ids, src_lens, beam_size=3, n_best=3, max_len_a=0.0, max_len_b=1)
    for hyps in results:
        assert _summary(hyps) == [
            ([A], pytest.approx((ln(0.95) + ln(0.05)) / (7 / 6) ** 0.6, abs=1e-5)),
            ([], pytest.approx(ln(0.05), abs=1e-5)),
        ]


def test_return_attn_gives_one_row_per_output_token_over_the_real_source():
    src_ids, src_lens = _src((3, 3), (3, 2))
    model = ScriptedModel(LONG_VS_SHORT, attn_weights=[0.3, 0.2, 0.1])
    results = _beam(model, src_ids, src_lens, beam_size=2, n_best=2, return_attn=True)
    for hyps, n in zip(results, src_lens.tolist()):
        for h in hyps:
            assert h.attn.shape == (len(h.tokens) + 1, n)
            assert torch.allclose(h.attn, torch.tensor([0.3, 0.2, 0.1])[:n].expand_as(h.attn))
    assert _beam(model, src_ids, src_lens, beam_size=2)[0][0].attn is None


# --- random tiny models --------------------------------------------------------------------------


class TinyAttnLSTM(Seq2Seq):
    """A small LSTM encoder-decoder with dot attention that follows the contract exactly."""

    def __init__(self, vocab_size: int = 12, hidden: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.src_vocab_size = self.tgt_vocab_size = vocab_size
        self.embed = nn.Embedding(vocab_size, hidden, padding_idx=PAD)
        self.encoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.cell = nn.LSTMCell(hidden, hidden)
        self.out = nn.Linear(2 * hidden, vocab_size)
        for p in self.parameters():
            nn.init.uniform_(p, -1.0, 1.0)  # peaky distributions: no near-ties in the search

    def encode(self, src_ids, src_lens):
        packed = pack_padded_sequence(
            self.embed(src_ids), src_lens, batch_first=True, enforce_sorted=False
        )
        memory, _ = pad_packed_sequence(
            self.encoder(packed)[0], batch_first=True, total_length=src_ids.size(1)
        )  # (B, S, H)
        mask = torch.arange(src_ids.size(1))[None, :] < src_lens[:, None]  # (B, S)
        return EncoderOut(memory=memory, src_mask=mask, src_lens=src_lens)

    def init_state(self, enc):
        zeros = enc.memory.new_zeros(enc.memory.size(0), enc.memory.size(2))  # (B, H)
        return (zeros, zeros)

    def step(self, tgt_ids_t, state, enc):
        h, c = self.cell(self.embed(tgt_ids_t), state)  # (B, H)
        scores = torch.bmm(enc.memory, h.unsqueeze(2)).squeeze(2)  # (B, S)
        attn = torch.softmax(scores.masked_fill(~enc.src_mask, -math.inf), dim=1)  # (B, S)
        context = torch.bmm(attn.unsqueeze(1), enc.memory).squeeze(1)  # (B, H)
        logits = self.out(torch.cat([h, context], dim=1))  # (B, V)
        return torch.log_softmax(logits, dim=-1), (h, c), attn


def _real_model(arch: str):
    """A tiny random model of the toolkit's own families (nmt.models.build_model)."""
    from nmt.models import build_model

    cfg = ModelConfig(
        arch=arch,
        emb_dim=16,
        hidden=16,
        bi_hidden=8,
        channels=16,
        levels=2,
        dropout=0.0,
        init_scale=0.5,
    )
    torch.manual_seed(0)
    return build_model(cfg, 12, 12, PAD, joint_vocab=True).eval()


class EosDamped(Seq2Seq):
    """Wraps a model and lowers its eos log-prob, so that random models write longer outputs."""

    def __init__(self, model: Seq2Seq, penalty: float = 1.0):
        super().__init__()
        self.model, self.penalty = model, penalty

    def encode(self, src_ids, src_lens):
        return self.model.encode(src_ids, src_lens)

    def init_state(self, enc):
        return self.model.init_state(enc)

    def step(self, tgt_ids_t, state, enc):
        log_probs, state, attn = self.model.step(tgt_ids_t, state, enc)
        return log_probs - self.penalty * (torch.arange(log_probs.size(1)) == EOS), state, attn

    def reorder_state(self, state, index):
        return self.model.reorder_state(state, index)

    def compact_state(self, state):
        return self.model.compact_state(state)

    def reorder_encoder_out(self, enc, index):
        return self.model.reorder_encoder_out(enc, index)


def _random_model(name: str):
    if name == "tiny":
        return EosDamped(TinyAttnLSTM(), penalty=1.0).eval()
    return EosDamped(_real_model(name), penalty=0.5).eval()


def _random_sentences(n: int = 8, vocab: int = 12, seed: int = 0):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def _batch(sentences):
    src_ids = torch.full((len(sentences), max(map(len, sentences))), PAD, dtype=torch.long)
    for i, s in enumerate(sentences):
        src_ids[i, : len(s)] = torch.tensor(s)
    return src_ids, torch.tensor([len(s) for s in sentences])


SEARCH = dict(max_len_a=1.0, max_len_b=3)


@torch.no_grad()
def _reference_greedy(model, src, max_len):
    """Argmax decoding of one sentence, one step at a time, written plainly."""
    src_ids, src_lens = _batch([src])
    enc = model.encode(src_ids, src_lens)
    state, tokens, log_prob = model.init_state(enc), [BOS], 0.0
    while True:
        log_probs, state, _ = model.step(torch.tensor(tokens[-1:]), state, enc)
        log_probs = log_probs[0].clone()
        log_probs[[PAD, BOS]] = -math.inf
        token = EOS if len(tokens) - 1 == max_len else int(log_probs.argmax())
        log_prob += float(log_probs[token])
        if token == EOS:
            return tokens[1:], log_prob
        tokens.append(token)


def test_greedy_matches_a_plain_argmax_loop():
    model = _random_model("tiny")
    sentences = _random_sentences()
    results = _greedy(model, *_batch(sentences), **SEARCH)
    for src, (hyp,) in zip(sentences, results):
        tokens, log_prob = _reference_greedy(model, src, int(1.0 * len(src) + 3))
        assert hyp.tokens == tokens
        assert hyp.log_prob == pytest.approx(log_prob, abs=1e-5)
        assert hyp.score == hyp.log_prob  # alpha = beta = 0


def test_a_sentence_the_model_cannot_finish_gets_one_empty_hypothesis():
    # Probability 1 on BOS (blocked) and 0 on everything else, EOS included: no hypothesis can
    # end with a finite score, so the search returns an empty one scored -inf.
    model = ScriptedModel({6: {}}, default={BOS: 1.0})
    src_ids, src_lens = _src((6, 2))
    for results in (_greedy(model, src_ids, src_lens), _beam(model, src_ids, src_lens)):
        assert _summary(results[0]) == [([], -math.inf)]


@pytest.mark.parametrize("name", ["tiny", "gnmt", "tcn"])
def test_beam_size_one_equals_greedy(name):
    model = _random_model(name)
    src_ids, src_lens = _batch(_random_sentences())
    for alpha, beta in ((0.0, 0.0), (0.6, 0.2)):
        greedy = _greedy(model, src_ids, src_lens, alpha=alpha, beta=beta, **SEARCH)
        beam = _beam(model, src_ids, src_lens, beam_size=1, alpha=alpha, beta=beta, **SEARCH)
        assert [_summary(h) for h in beam] == [_summary(h) for h in greedy]


@pytest.mark.parametrize("name", ["tiny", "gnmt", "tcn"])
@pytest.mark.parametrize(
    "alpha, beta, exact_stop", [(0.6, 0.2, False), (1.0, 0.0, False), (1.0, 0.0, True)]
)
def test_batched_beam_equals_one_by_one(name, alpha, beta, exact_stop):
    model = _random_model(name)
    sentences = _random_sentences()
    kw = dict(beam_size=4, n_best=2, alpha=alpha, beta=beta, exact_stop=exact_stop, **SEARCH)
    alone = [_beam(model, *_batch([s]), **kw)[0] for s in sentences]
    rng = random.Random(1)
    orders = [list(range(8)), list(range(8))[::-1], rng.sample(range(8), 8)]
    for order in orders:
        for size in (8, 3):
            for start in range(0, 8, size):
                chunk = order[start : start + size]
                results = _beam(model, *_batch([sentences[i] for i in chunk]), **kw)
                for i, hyps in zip(chunk, results):
                    assert [h.tokens for h in hyps] == [h.tokens for h in alone[i]]
                    for h, ref in zip(hyps, alone[i]):
                        assert h.score == pytest.approx(ref.score, abs=1e-5)
                        assert h.log_prob == pytest.approx(ref.log_prob, abs=1e-5)


def record_rows(model) -> list[int]:
    """From now on, the number of rows of every `model.step` call is appended to the list."""
    rows: list[int] = []
    step = model.step

    def recording_step(tgt_ids_t, state, enc):
        rows.append(tgt_ids_t.size(0))
        return step(tgt_ids_t, state, enc)

    model.step = recording_step
    return rows


def test_beam_beats_or_matches_greedy_and_work_shrinks_on_a_random_model():
    model = _random_model("tiny")
    sentences = _random_sentences()
    src_ids, src_lens = _batch(sentences)
    rows = record_rows(model)
    beam = _beam(model, src_ids, src_lens, beam_size=4, alpha=0.0, **SEARCH)
    batched, steps_alone = list(rows), []
    for sentence in sentences:
        rows.clear()
        _beam(model, *_batch([sentence]), beam_size=4, alpha=0.0, **SEARCH)
        steps_alone.append(len(rows))
    # Each sentence leaves the batch right after its last step: step t runs the 4 beams of the
    # sentences that, decoded alone, need more than t steps.
    assert batched == [4 * sum(n > t for n in steps_alone) for t in range(max(steps_alone))]
    assert len(set(steps_alone)) > 1  # not trivial: the sentences end at different steps
    greedy = _greedy(model, src_ids, src_lens, **SEARCH)
    for b, g in zip(beam, greedy):
        assert b[0].score >= g[0].score - 1e-5  # alpha 0: beam search never does worse here
