"""Sampling (search.sampling topk/topp): a candidate rule of nmt.search's loop (beam_size 1).

- The draw follows the distribution it promises: on a scripted model whose first step is a
  hand-written table, the empirical frequencies of 20,000 independent draws match the tempered,
  truncated, renormalised table (worked out in the comments) within 0.015, and ids outside the
  truncation are never drawn.
- Reproducible: a sentence's sample depends on the seed, its line number and the model only:
  the same for any batch size, chunking, order of decoding or other lines; a different seed
  gives different samples; topk 1 is greedy search.
- The score of a sample is the model's plain log-probability of it (forced scoring agrees).
- N lines in, N lines out; bad values are one clear error.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from helpers_models import BOS, EOS, PAD, VOCAB, tiny_model

from nmt import forced, search_graph
from nmt.errors import ConfigError
from nmt.models.base import EncoderOut, Seq2Seq
from nmt.search import SearchSettings, beam_search, greedy_search
from nmt.translator import Translator, translate_stream

A, B, C, D = 4, 5, 6, 7  # the scripted model's tokens


def _log_probs(table: dict) -> torch.Tensor:
    out = torch.full((VOCAB,), -math.inf)
    for token, p in table.items():
        out[token] = math.log(p)
    return out  # (V,)


class FirstStepTable(Seq2Seq):
    """Step 0 gives every sentence the probabilities `table` ({token: p}, others 0); every later
    step gives those of `then` (default: eos 1, so a sentence's output is its step-0 token)."""

    def __init__(self, table: dict, then: dict | None = None):
        super().__init__()
        self.first, self.then = _log_probs(table), _log_probs(then or {EOS: 1.0})
        self.tgt_vocab_size = VOCAB

    def encode(self, src_ids, src_lens):
        mask = torch.arange(src_ids.size(1))[None, :] < src_lens[:, None]  # (B, S)
        return EncoderOut(memory=src_ids.float().unsqueeze(-1), src_mask=mask, src_lens=src_lens)

    def init_state(self, enc):
        return torch.zeros(enc.memory.size(0), dtype=torch.long)  # (B,) steps taken

    def step(self, tgt_ids_t, state, enc):
        rows = (state == 0)[:, None]  # (B, 1)
        log_probs = torch.where(rows, self.first, self.then)  # (B, V)
        attn = enc.src_mask.float() / enc.src_mask.sum(1, keepdim=True)  # (B, S)
        return log_probs, state + 1, attn


TABLE = {A: 0.5, B: 0.25, C: 0.15, D: 0.1}
N_DRAWS = 20_000
TOLERANCE = 0.015  # > 4 standard deviations of a frequency from 20,000 draws (at most 0.0035)


def _settings(**kw) -> SearchSettings:
    base = dict(beam_size=1, alpha=0.0, max_len_a=0.0, max_len_b=5)
    return SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, **{**base, **kw})


def _first_tokens(model, **kw) -> list[int]:
    src_ids = torch.full((N_DRAWS, 2), A)
    src_lens = torch.full((N_DRAWS,), 2)
    results = beam_search(model, src_ids, src_lens, _settings(**kw))  # line ids 0..N-1
    return [hyps[0].tokens[0] for hyps in results]


# Expected frequencies, from TABLE = {A .5, B .25, C .15, D .1}:
# - topk 2: A and B kept, renormalised by .75: A 2/3, B 1/3.
# - topp .8: by rank A (mass above it 0 < .8), B (.5 < .8), C (.75 < .8) kept, D (.9) not;
#   renormalised by .9: A .5/.9, B .25/.9, C .15/.9.
# - temperature 2, topp 1: p ** (1/2) renormalised: sqrt .5, .25, .15, .1 = .7071, .5, .3873,
#   .3162, sum 1.9106: A .3701, B .2617, C .2027, D .1655.
# - temperature .5, topk 3: p ** 2 = .25, .0625, .0225, .01; the 3 best renormalised by .335:
#   A .7463, B .1866, C .0672.
# - topp .45: only A (.5 >= .45 already; B has .5 above it): A 1.
CASES = [
    (dict(sampling="topk", topk=2), {A: 2 / 3, B: 1 / 3}),
    (dict(sampling="topp", topp=0.8), {A: 0.5 / 0.9, B: 0.25 / 0.9, C: 0.15 / 0.9}),
    (
        dict(sampling="topp", topp=1.0, temperature=2.0),
        {A: 0.3701, B: 0.2617, C: 0.2027, D: 0.1655},
    ),
    (dict(sampling="topk", topk=3, temperature=0.5), {A: 0.7463, B: 0.1866, C: 0.0672}),
    (dict(sampling="topp", topp=0.45), {A: 1.0}),
]


@pytest.mark.parametrize("kw, expected", CASES, ids=lambda x: str(x))
def test_one_step_draws_follow_the_tempered_truncated_distribution(kw, expected):
    tokens = _first_tokens(FirstStepTable(TABLE), **kw)
    counts = {t: tokens.count(t) / N_DRAWS for t in set(tokens)}
    assert set(counts) == set(expected), counts  # nothing outside the truncation is ever drawn
    for token, p in expected.items():
        assert counts[token] == pytest.approx(p, abs=TOLERANCE), (token, counts)


def test_blocked_ids_are_never_drawn_and_the_maximum_length_forces_eos():
    # bos and pad hold most of the probability, but are never drawn: only A and B remain,
    # renormalised by .3
    table = {BOS: 0.4, PAD: 0.3, A: 0.2, B: 0.1}
    tokens = _first_tokens(FirstStepTable(table), sampling="topp", topp=1.0)
    assert set(tokens) == {A, B}
    assert tokens.count(A) / N_DRAWS == pytest.approx(2 / 3, abs=TOLERANCE)
    # a maximum length of 1 token: after A, eos is drawn whatever its probability, and scored
    # with the model's eos log-prob: log 1 + log .1
    model = FirstStepTable({A: 1.0}, then={B: 0.9, EOS: 0.1})
    src_ids, src_lens = torch.full((50, 2), A), torch.full((50,), 2)
    results = beam_search(model, src_ids, src_lens, _settings(sampling="topk", max_len_b=1))
    assert all(h[0].tokens == [A] for h in results)
    assert all(h[0].log_prob == pytest.approx(math.log(0.1)) for h in results)


# ---------------------------------------------------------------------- a real model
def _sentences(n: int = 40, seed: int = 0):
    rng = random.Random(seed)
    return [[rng.randrange(4, VOCAB) for _ in range(rng.randint(1, 9))] for _ in range(n)]


def _batch(sentences):
    src_ids = torch.full((len(sentences), max(map(len, sentences)) + 1), PAD, dtype=torch.long)
    for i, s in enumerate(sentences):
        src_ids[i, : len(s) + 1] = torch.tensor(s + [EOS])
    return src_ids, torch.tensor([len(s) + 1 for s in sentences])


def _sample(model, sentences, line_ids=None, **kw):
    kw = {"sampling": "topp", "topp": 1.0, "max_len_a": 1.0, "max_len_b": 4, "seed": 7, **kw}
    results = beam_search(model, *_batch(sentences), _settings(**kw), line_ids=line_ids)
    return [(h[0].tokens, h[0].log_prob) for h in results]


@pytest.mark.parametrize("family", ["gnmt", "tcn"])
def test_a_sample_depends_on_seed_line_and_model_only(family):
    model = tiny_model(family, init_scale=1.0)
    sentences = _sentences()
    whole = _sample(model, sentences)
    # batch size: one by one, each keeping its line number
    alone = [_sample(model, [s], line_ids=[i])[0] for i, s in enumerate(sentences)]
    # another order of decoding: reversed, each line keeping its number
    order = list(range(len(sentences)))[::-1]
    reordered = _sample(model, [sentences[i] for i in order], line_ids=order)
    # other lines around it: line 5 among different batch-mates
    others = _sentences(seed=9)
    others[5] = sentences[5]
    for i in range(len(sentences)):
        assert alone[i][0] == whole[i][0]
        assert alone[i][1] == pytest.approx(whole[i][1], abs=1e-5)
        assert reordered[order.index(i)][0] == whole[i][0]
    assert _sample(model, others)[5][0] == whole[5][0]
    # not trivial: the samples differ from line to line, and from seed to seed
    assert len({tuple(t) for t, _ in whole}) > len(sentences) // 2
    other_seed = _sample(model, sentences, seed=8)
    assert sum(a[0] != b[0] for a, b in zip(whole, other_seed)) > len(sentences) // 2
    # the same source on another line number is another draw
    assert _sample(model, [sentences[0]] * 20) != [whole[0]] * 20


@pytest.mark.parametrize("family", ["gnmt", "tcn"])
def test_topk_one_is_greedy_search(family):
    model = tiny_model(family, init_scale=1.0)
    src_ids, src_lens = _batch(_sentences())
    greedy = greedy_search(model, src_ids, src_lens, _settings(max_len_a=1.0, max_len_b=4))
    for temperature in (0.5, 3.0):  # never changes the argmax
        kw = dict(sampling="topk", topk=1, temperature=temperature, max_len_a=1.0, max_len_b=4)
        sampled = beam_search(model, src_ids, src_lens, _settings(**kw))
        assert [(h[0].tokens, h[0].score) for h in sampled] == [
            (h[0].tokens, h[0].score) for h in greedy
        ]


@pytest.mark.parametrize("family", ["gnmt", "tcn"])
def test_a_samples_score_is_its_plain_log_probability(family):
    # temperature and truncation shape the draw, not the score: forced scoring agrees
    model = tiny_model(family, init_scale=1.0)
    sentences = _sentences(12)
    samples = _sample(model, sentences, sampling="topk", topk=3, temperature=0.7)
    src_ids, src_lens = _batch(sentences)
    totals = forced.target_scores(model, src_ids, src_lens, [t for t, _ in samples], _settings())
    for (_, log_prob), total in zip(samples, totals.tolist()):
        assert total == pytest.approx(log_prob, abs=1e-4)


def test_the_graph_search_leaves_sampling_to_the_loop():
    model = tiny_model("gnmt", init_scale=1.0)
    src_ids, src_lens = _batch(_sentences(8))
    s = _settings(sampling="topp", topp=0.9, max_len_a=1.0, max_len_b=4)
    graph = search_graph.search(model, src_ids, src_lens, s, mode="eager")
    loop = beam_search(model, src_ids, src_lens, s)
    assert [h[0].tokens for h in graph] == [h[0].tokens for h in loop]


# ---------------------------------------------------------------------- through the Translator
@pytest.fixture(scope="module")
def translator(tiny_checkpoint):
    return Translator.from_checkpoint(tiny_checkpoint, device="cpu")


SAMPLING = dict(sampling="topp", topp=1.0, beam_size=1, seed=3)


def test_translator_samples_keep_line_alignment_and_do_not_depend_on_batching(
    translator, synthetic_words, tmp_path
):
    rng = random.Random(0)
    lines = [" ".join(rng.choices(synthetic_words, k=rng.randint(1, 8))) for _ in range(60)]
    lines[7] = lines[30] = ""
    big = translator.translate(lines, batch_size=64, **SAMPLING)
    small = translator.translate(lines, batch_size=5, **SAMPLING)
    assert big == small and len(big) == 60 and big[7] == big[30] == ""
    # a file, cut into chunks of 7 lines: line i still draws from stream i
    src = tmp_path / "in.txt"
    src.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    out = tmp_path / "out.txt"
    assert translate_stream(translator, str(src), str(out), chunk_lines=7, **SAMPLING) == 60
    assert out.read_text(encoding="utf-8").split("\n")[:-1] == big
    other_seed = translator.translate(lines, batch_size=64, **{**SAMPLING, "seed": 4})
    assert sum(a != b for a, b in zip(big, other_seed)) > 30


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sampling="topk"), "search.sampling: topk sampling draws one output per sentence"),
        (dict(sampling="topp", beam_size=1, topp=0.0), r"search.topp: must be in \(0, 1\]"),
        (dict(topp=1.5), "search.topp: must be <= 1.0"),
        (dict(temperature=0.0), "search.temperature: must be > 0, found 0.0"),
        (dict(topk=0), "search.topk: must be >= 1, found 0"),
        (dict(sampling="greedy"), "search.sampling: expected one of 'none', 'topk', 'topp'"),
    ],
)
def test_bad_sampling_values_are_one_clear_error(translator, kw, message):
    with pytest.raises(ConfigError, match=message):
        translator.translate(["w1"], **kw)
