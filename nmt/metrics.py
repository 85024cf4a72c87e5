"""Corpus BLEU and chrF through sacreBLEU's Python API, with their signatures.

Owns: scoring detokenized hypotheses against one or more reference streams. Layer 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sacrebleu.metrics import BLEU, CHRF


@dataclass
class Score:
    name: str
    score: float
    signature: str
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def bleu(
    hyps: list[str], refs: list[list[str]], lowercase: bool = False, tokenize: str = "13a"
) -> Score:
    """Corpus BLEU; `refs` is a list of reference streams, each as long as `hyps`."""
    metric = BLEU(lowercase=lowercase, tokenize=tokenize)
    result = metric.corpus_score(hyps, refs)
    return Score("BLEU", result.score, str(metric.get_signature()), str(result))


def chrf(hyps: list[str], refs: list[list[str]]) -> Score:
    metric = CHRF()
    result = metric.corpus_score(hyps, refs)
    return Score("chrF2", result.score, str(metric.get_signature()), str(result))
