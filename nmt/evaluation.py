"""Scoring translations: `nmt evaluate` (translate, then score), `nmt score` (score a file) and
`nmt score-pairs` (the model's log-probability of given translations).

Owns: reading hypothesis and reference files (by the line rule of nmt.textio, errors naming file
and line), checking that they align, the result dict
(BLEU and chrF with their sacreBLEU signatures, speed) and its human-readable report; the output
of `score-pairs`.
Does not own the metrics (nmt.metrics wraps sacreBLEU), translation and forced scoring
(nmt.translator) or test-set downloads (nmt.corpora).

`nmt score-pairs` output, one line per (source, target) pair, in input order:
    `LOG_PROB<TAB>PER_PIECE<TAB>PIECES`
LOG_PROB is log P(target | source) (natural log, the target's pieces and the final eos), PIECES
the pieces scored (eos included, so >= 1), PER_PIECE = LOG_PROB / PIECES; 4 decimals. With
`--json` one object per line, `{"log_prob": ..., "per_piece": ..., "pieces": ...}`, unrounded.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from nmt import corpora, metrics
from nmt.config import SearchConfig
from nmt.errors import UsageError
from nmt.textio import file_lines, open_output, read_lines
from nmt.translator import Translator, warn_truncated


def score(
    hyps: list[str], refs: list[list[str]], lowercase: bool = False, tokenize: str = "13a"
) -> dict:
    """BLEU (with the requested case and tokenizer) and chrF of `hyps` against reference streams.

    `refs` is a list of streams, each as long as `hyps`. Returns {"n", "bleu", "chrf"}, the
    metrics as {"name", "score", "signature", "detail"}.
    """
    if not refs:
        raise UsageError("scoring needs at least one reference stream")
    for k, stream in enumerate(refs, start=1):
        if len(stream) != len(hyps):
            raise UsageError(
                f"reference stream {k} has {len(stream)} lines, the hypotheses {len(hyps)}"
            )
    if not hyps:
        raise UsageError("nothing to score: no hypotheses")
    return {
        "n": len(hyps),
        "bleu": metrics.bleu(hyps, refs, lowercase=lowercase, tokenize=tokenize).to_dict(),
        "chrf": metrics.chrf(hyps, refs).to_dict(),
    }


def _read_refs(ref_paths: list[str], n: int, against: str) -> list[list[str]]:
    """Each reference file's lines; every file must have `n` lines, like `against`."""
    refs = []
    for path in ref_paths:
        lines = read_lines(path)
        if len(lines) != n:
            raise UsageError(
                f"{path} has {len(lines)} lines but {against} has {n}: the files are not aligned"
            )
        refs.append(lines)
    return refs


def score_files(
    hyp_path: str, ref_paths: list[str], lowercase: bool = False, tokenize: str = "13a"
) -> dict:
    """Score a hypothesis file against one or more line-aligned reference files."""
    ref_paths = [str(p) for p in ref_paths]
    if not ref_paths:
        raise UsageError("score: give at least one reference file")
    hyps = read_lines(str(hyp_path))
    if not hyps:
        raise UsageError(f"{hyp_path}: empty, nothing to score")
    refs = _read_refs(ref_paths, len(hyps), str(hyp_path))
    result = {"hyp": str(hyp_path), "refs": ref_paths}
    result.update(score(hyps, refs, lowercase=lowercase, tokenize=tokenize))
    return result


def evaluate(
    checkpoint_path: str | list[str],
    src: str | None,
    refs: list[str],
    testset: str | None,
    *,
    hyp_out: str | None = None,
    lowercase: bool = False,
    tokenize: str = "13a",
    device: str = "auto",
    dtype: str | None = None,
    threads: int | None = None,
    **search_kwargs,
) -> dict:
    """Translate a source file (or a named test set) with a checkpoint, or with several as an
    ensemble (a list of paths), and score it.

    Either `src` with `refs` (files), or `testset` (e.g. "multi30k:test_2016_flickr", resolved
    with the checkpoint's data.src_lang and data.tgt_lang). `search_kwargs`: search settings, as
    for `Translator.translate`; `dtype`, `threads`: the load-time ones (search.dtype,
    search.threads; None: the checkpoint's). `hyp_out`: also write the translations there
    (atomically). Returns the result dict: checkpoint (the path; an ensemble's joined by " + "),
    checkpoints (the list), testset, src, refs, n, bleu, chrf, lowercase, tokenize, search (every
    search setting used), precision (what the model computed in) and precision_note (how it was
    chosen), seconds, sents_per_s, hyp_out.
    """
    paths = [checkpoint_path] if isinstance(checkpoint_path, (str, Path)) else checkpoint_path
    paths = [str(p) for p in paths]
    refs = [str(r) for r in (refs or [])]
    _check_sources(src, refs, testset)
    translator = Translator.from_checkpoints(paths, device=device, dtype=dtype, threads=threads)
    settings = translator.search_settings(1, **search_kwargs)  # checked before any download
    if testset:
        src, refs = _testset_files(testset, translator.cfg.data)
    src_lines = read_lines(str(src))
    if not src_lines:
        raise UsageError(f"{src}: empty, nothing to translate")
    ref_lines = _read_refs(refs, len(src_lines), str(src))

    hyps, seconds = _translate_timed(translator, src_lines, settings, str(src))
    if hyp_out:
        with open_output(hyp_out) as write:
            write("".join(h + "\n" for h in hyps).encode("utf-8"))
    result = {"checkpoint": " + ".join(paths), "checkpoints": paths, "testset": testset}
    result.update({"src": str(src), "refs": refs})
    result.update(score(hyps, ref_lines, lowercase=lowercase, tokenize=tokenize))
    result.update(
        {
            "lowercase": lowercase,
            "tokenize": tokenize,
            "search": {f.name: getattr(settings, f.name) for f in dataclasses.fields(SearchConfig)},
            "precision": translator.precision,
            "precision_note": translator.precision_note,
            "seconds": round(seconds, 3),
            "sents_per_s": round(len(src_lines) / max(seconds, 1e-9), 2),
            "hyp_out": str(hyp_out) if hyp_out else None,
        }
    )
    return result


def _check_sources(src: str | None, refs: list[str], testset: str | None) -> None:
    """Either a test set name, or a source file with at least one reference file."""
    if testset and (src or refs):
        raise UsageError(
            "evaluate: give either a test set name, or a source and reference files, not both"
        )
    if not testset and not (src and refs):
        raise UsageError(
            "evaluate: give a test set name, or a source file and at least one reference file"
        )


def _testset_files(testset: str, data_cfg) -> tuple[str, list[str]]:
    """The source file and the reference files of a named test set, in the languages of the
    checkpoint's data section."""
    src_path, ref_path = corpora.resolve_testset(testset, data_cfg.src_lang, data_cfg.tgt_lang)
    return str(src_path), [str(ref_path)]


def _translate_timed(translator, src_lines: list[str], settings, where: str):
    """The best translation of each line, and the seconds that translating them took."""
    start = time.perf_counter()
    results, truncated = translator.run(src_lines, settings)
    warn_truncated(truncated, where, settings.max_src_len)
    hyps = [r[0][0] for r in results]
    return hyps, time.perf_counter() - start


def format_report(result: dict) -> str:
    """Human-readable lines for a result of `evaluate` or `score_files`."""
    lines = []
    if "hyp" in result:
        what = result["hyp"]
    else:
        what = result.get("testset") or result.get("src")
    head = f"{what}: {result['n']} sentences"
    if "seconds" in result:
        head += f", translated in {result['seconds']:.1f} s ({result['sents_per_s']:.1f} sent/s)"
    if "search" in result:
        s = result["search"]
        mode = "greedy" if s["beam_size"] == 1 else f"beam {s['beam_size']}"
        head += f"; {mode}, alpha {s['alpha']:g}, beta {s['beta']:g}"
    lines.append(head)
    for key in ("bleu", "chrf"):
        m = result[key]
        lines.append(f"{m['name']} = {m['score']:.2f}  {m['signature']}")
        detail = m["detail"].split(" = ", 1)[-1]  # sacreBLEU's "BLEU = 36.12 68.1/44.0/..."
        extra = detail.partition(" ")[2]
        if extra:
            lines.append(f"  {extra}")
    if result.get("hyp_out"):
        lines.append(f"translations written to {result['hyp_out']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- score-pairs
def score_pairs(
    checkpoint_paths: list[str],
    src: str,
    tgt: str,
    out: str | None = None,
    *,
    as_json: bool = False,
    device: str = "auto",
    chunk_lines: int = 2000,
    **search_kwargs,
) -> int:
    """Write the score of every (source line, target line) pair of the files `src` and `tgt` to
    `out` (stdout for None or "-"; a file atomically), in the format of the module docstring.
    The files must have the same number of lines (checked before any output); `chunk_lines`
    pairs are read and scored at a time. `search_kwargs`: batch_size, max_src_len. Returns the
    number of pairs."""
    for flag, path in (("--src", src), ("--tgt", tgt)):
        if path is None or str(path) == "-":
            raise UsageError(
                f"score-pairs {flag}: give a file (both are read twice: counted first)"
            )
    n_src, n_tgt = _count_lines(src), _count_lines(tgt)
    if n_src != n_tgt:
        raise UsageError(
            f"{src} has {n_src} lines but {tgt} has {n_tgt}: score-pairs needs line-aligned "
            "source and target files"
        )
    translator = Translator.from_checkpoints(checkpoint_paths, device=device)
    settings = translator.search_settings(1, **search_kwargs)
    pairs = zip(file_lines(src), file_lines(tgt))
    n_warned = 0
    with open_output(out) as write:
        for first in range(1, n_src + 1, chunk_lines):
            chunk = [pair for _, pair in zip(range(chunk_lines), pairs)]
            src_lines, tgt_lines = [s for s, _ in chunk], [t for _, t in chunk]
            scores, truncated = translator.score_run(src_lines, tgt_lines, settings)
            n_warned = warn_truncated(truncated, str(src), settings.max_src_len, first, n_warned)
            write("".join(_pair_line(score, as_json) for score in scores).encode("utf-8"))
    return n_src


def _count_lines(path: str) -> int:
    return sum(1 for _ in file_lines(path))


def _pair_line(score, as_json: bool) -> str:
    if as_json:
        fields = {"log_prob": score.log_prob, "per_piece": score.per_piece, "pieces": score.pieces}
        return json.dumps(fields) + "\n"
    return f"{score.log_prob:.4f}\t{score.per_piece:.4f}\t{score.pieces}\n"
