"""nmt.search_graph (static shapes, CUDA graphs on a GPU) gives nmt.search's results exactly.

On the CPU the static step runs eagerly. The search arithmetic is the same operator for
operator, but the model computes on all rows where nmt.search drops the finished sentences, and
a matrix product over another number of rows may round differently: tokens must be equal, scores
equal to float tolerance (as for nmt.search in another batch, tests/test_search.py), and exactly
equal where the model is a table (scripted). tests/test_gpu.py runs the graphs.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from test_search import (
    BOS,
    EOS,
    GREEDY_VS_BEAM,
    LATE_EOS,
    LONG_VS_SHORT,
    ONE_WAY,
    PAD,
    REFILL,
    SEARCH,
    A,
    B,
    ScriptedModel,
    _batch,
    _random_model,
    _random_sentences,
    _src,
    record_rows,
    settings,
)

from nmt import search_graph
from nmt.search import beam_search


def _search(model, src_ids, src_lens, mode=None, **kw):
    """nmt.search's beam search (beam_size 1: greedy) through its public entry point, with
    search_graph's loop in `mode` ("eager", "in_place") or, for None, nmt.search's own."""
    run = None if mode is None else functools.partial(search_graph.search, mode=mode)
    with torch.no_grad():
        return beam_search(model, src_ids, src_lens, settings(**kw), run=run)


def _both(model, src_ids, src_lens, in_place=True, **kw):
    """nmt.search's results, and search_graph's: eagerly, and (`in_place`, for models whose
    state keeps its shape) written back in place as a graph replay does, which must not depend
    on how the model's state tensors alias."""
    dynamic = _search(model, src_ids, src_lens, **kw)
    static = _search(model, src_ids, src_lens, "eager", **kw)
    if in_place:
        replayed = _search(model, src_ids, src_lens, "in_place", **kw)
        assert _as_tuples(replayed) == _as_tuples(static)
    return dynamic, static


def _as_tuples(results):
    return [[(h.tokens, h.score, h.log_prob) for h in hyps] for hyps in results]


def assert_same_results(static, dynamic):
    assert [[h.tokens for h in hyps] for hyps in static] == [
        [h.tokens for h in hyps] for hyps in dynamic
    ]
    for hyps, refs in zip(static, dynamic):
        for h, ref in zip(hyps, refs):
            assert h.score == pytest.approx(ref.score, abs=1e-5)
            assert h.log_prob == pytest.approx(ref.log_prob, abs=1e-5)


@pytest.mark.parametrize("name", ["tiny", "gnmt", "tcn"])
@pytest.mark.parametrize(
    "beam_size, n_best, alpha, beta, exact_stop",
    [(1, 1, 0.0, 0.0, False), (1, 1, 0.6, 0.2, False), (2, 2, 0.0, 0.0, True),
     (4, 2, 0.6, 0.2, False), (4, 4, 1.0, 0.0, True), (5, 3, 0.6, 0.0, False)],
)  # fmt: skip
@pytest.mark.parametrize("check_every, min_left", [(4, 16), (1, 0), (3, 2)])
def test_static_search_equals_search_on_random_models(name, beam_size, n_best, alpha, beta,
                                                      exact_stop, check_every, min_left,
                                                      monkeypatch):  # fmt: skip
    """Also with the batch shrinking at every check (min_left 0), as it does on long batches."""
    monkeypatch.setattr(search_graph, "CHECK_EVERY", check_every)
    monkeypatch.setattr(search_graph, "MIN_LEFT", min_left)
    model = _random_model(name)
    src_ids, src_lens = _batch(_random_sentences(n=9, seed=beam_size))
    kw = dict(beam_size=beam_size, n_best=n_best, alpha=alpha, beta=beta, exact_stop=exact_stop)
    dynamic, static = _both(model, src_ids, src_lens, **kw, **SEARCH)
    assert_same_results(static, dynamic)
    assert any(len(h.tokens) > 1 for hyps in dynamic for h in hyps)  # not a trivial decode


@pytest.mark.parametrize(
    "tables, spec",
    [(GREEDY_VS_BEAM, (7, 3)), (LONG_VS_SHORT, (3, 3)), (LATE_EOS, (9, 3)), (REFILL, (11, 2)),
     (ONE_WAY, (12, 2))],
)  # fmt: skip
@pytest.mark.parametrize("beam_size, alpha", [(1, 0.0), (2, 0.0), (2, 1.0), (3, 0.6)])
@pytest.mark.parametrize("exact_stop", [False, True])
def test_static_search_equals_search_on_scripted_tables(tables, spec, beam_size, alpha,
                                                        exact_stop):  # fmt: skip
    src_ids, src_lens = _src(spec, (spec[0], 1))
    kw = dict(beam_size=beam_size, n_best=beam_size, alpha=alpha, exact_stop=exact_stop)
    dynamic, static = _both(ScriptedModel(tables), src_ids, src_lens, in_place=False, **kw)
    assert _as_tuples(static) == _as_tuples(dynamic)


def test_static_search_ties_blocked_ids_and_unfinishable_sentences():
    tables = {5: {(): {BOS: 0.3, PAD: 0.3, B: 0.2, A: 0.2}}, 6: {}}
    model = ScriptedModel(tables, default={EOS: 1.0})
    src_ids, src_lens = _src((5, 2), (6, 1))
    kw = dict(beam_size=2, n_best=2, alpha=0.0)
    dynamic, static = _both(model, src_ids, src_lens, in_place=False, **kw)
    assert _as_tuples(static) == _as_tuples(dynamic)
    assert [h.tokens for h in static[0]] == [[A], [B]]
    # no way to finish (everything on the blocked BOS): one empty hypothesis scored -inf
    stuck = ScriptedModel({6: {}}, default={BOS: 1.0})
    src_ids, src_lens = _src((6, 2))
    dynamic, static = _both(stuck, src_ids, src_lens, in_place=False, beam_size=3)
    assert _as_tuples(static) == _as_tuples(dynamic) == [[([], -math.inf, -math.inf)]]


def test_static_search_of_an_empty_batch():
    model = _random_model("tiny")
    src_ids, src_lens = torch.zeros((0, 3), dtype=torch.long), torch.zeros(0, dtype=torch.long)
    assert _search(model, src_ids, src_lens, "eager") == []


def test_the_batch_shrinks_as_sentences_end(monkeypatch):
    monkeypatch.setattr(search_graph, "CHECK_EVERY", 1)
    monkeypatch.setattr(search_graph, "MIN_LEFT", 0)
    model = _random_model("gnmt")
    sentences = [[5] * n for n in (1, 1, 2, 2, 3, 9, 9, 9)]
    src_ids, src_lens = _batch(sentences)
    kw = dict(beam_size=3, max_len_a=1.0, max_len_b=3)
    dynamic, _ = _both(model, src_ids, src_lens, **kw)
    rows = record_rows(model)
    static = _search(model, src_ids, src_lens, "in_place", **kw)
    assert_same_results(static, dynamic)
    assert rows[0] == 24 and min(rows) <= 12  # 8 sentences x 3 beams, then half or fewer
