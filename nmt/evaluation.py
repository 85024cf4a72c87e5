"""Scoring translations: `nmt evaluate` (translate, then score) and `nmt score` (score a file).

Owns: reading hypothesis and reference files (by the line rule of nmt.textio, errors naming file
and line), checking that they align, the result dict
(BLEU and chrF with their sacreBLEU signatures, speed) and its human-readable report.
Does not own the metrics (nmt.metrics wraps sacreBLEU), translation (nmt.translator) or test-set
downloads (nmt.corpora).
"""

from __future__ import annotations

import dataclasses
import time

from nmt import corpora, metrics
from nmt.config import SearchConfig
from nmt.errors import UsageError
from nmt.textio import open_output, read_lines
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
    checkpoint_path: str,
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
    """Translate a source file (or a named test set) with a checkpoint and score it.

    Either `src` with `refs` (files), or `testset` (e.g. "multi30k:test_2016_flickr", resolved
    with the checkpoint's data.src_lang and data.tgt_lang). `search_kwargs`: search settings, as
    for `Translator.translate`; `dtype`, `threads`: the load-time ones (search.dtype,
    search.threads; None: the checkpoint's). `hyp_out`: also write the translations there
    (atomically). Returns the result dict: checkpoint, testset, src, refs, n, bleu, chrf,
    lowercase, tokenize, search (every search setting used), precision (what the model
    computed in) and precision_note (how it was chosen), seconds, sents_per_s, hyp_out.
    """
    refs = [str(r) for r in (refs or [])]
    _check_sources(src, refs, testset)
    translator = Translator.from_checkpoint(
        checkpoint_path, device=device, dtype=dtype, threads=threads
    )
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
    result = {"checkpoint": str(checkpoint_path), "testset": testset, "src": str(src), "refs": refs}
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
