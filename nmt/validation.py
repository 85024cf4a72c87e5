"""Validation during training: loss, perplexity and greedy BLEU over the validation split.

Owns: the validation batches (one fixed, length-sorted order, reused at every validation), the
figures (`Validator`), which result beats the best so far (`improves`), and validating other
weights in the same model (`validate_weights`, for the average of the last checkpoints). Does
not own when to validate or what follows (nmt.training), the loss (nmt.optimization) or the
search (nmt.search).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.nn.utils import parametrize

from nmt import batching, data, metrics, search
from nmt.config import Config
from nmt.optimization import label_smoothed_loss
from nmt.tokenizer import Tokenizer


class Validator:
    """`validator(model)` -> {"loss", "ppl"[, "bleu"]} on the validation split.

    loss: label-smoothed (train.label_smoothing), per target token, as in training; ppl: exp of
    the NLL per target token; bleu (train.valid_bleu): sacreBLEU of greedy translations against
    the detokenized references, in the split's order.
    """

    def __init__(self, dataset, tokenizer: Tokenizer, cfg: Config, device: torch.device):
        self.dataset, self.tokenizer, self.cfg, self.device = dataset, tokenizer, cfg, device
        self.sampler = batching.TokenBatchSampler(
            *data.lengths(dataset), cfg.train.max_tokens, shuffle=False
        )
        self.greedy = search.SearchSettings.from_config(cfg.search, tokenizer)  # greedy: beam 1

    @classmethod
    def of(cls, data_dir: Path, tokenizer: Tokenizer, cfg: Config, device) -> Validator | None:
        """The validator of `data_dir`'s valid split, or None when it has none."""
        if not (Path(data_dir) / "valid").exists():
            return None
        return cls(data.load_split(data_dir, "valid"), tokenizer, cfg, device)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict:
        # weights behind a parametrization (the TCN's weight norm) computed once for the whole
        # validation, not at every conv call of every greedy step
        with parametrize.cached():
            return self._validate(model)

    def _validate(self, model: torch.nn.Module) -> dict:
        model.eval()
        tok = self.tokenizer
        sums = [0.0, 0.0, 0]  # summed loss, summed NLL, target tokens
        hyps: dict[int, str] = {}
        refs: dict[int, str] = {}
        for batch in batching.make_batches(
            self.dataset, self.sampler, tok.pad_id, tok.bos_id, tok.eos_id
        ):
            batch = batch.to(self.device)
            logits = model(batch.src_ids, batch.src_lens, batch.tgt_in_ids)  # (B, T, V)
            loss, nll = label_smoothed_loss(
                logits, batch.tgt_out_ids, tok.pad_id, self.cfg.train.label_smoothing
            )
            sums = [sums[0] + float(loss), sums[1] + float(nll), sums[2] + batch.num_tgt_tokens]
            if self.cfg.train.valid_bleu:
                self._translate(model, batch, hyps, refs)
        model.train()
        n_tokens = max(sums[2], 1)
        result = {"loss": sums[0] / n_tokens, "ppl": math.exp(min(sums[1] / n_tokens, 50))}
        if hyps:
            order = sorted(hyps)
            hyp_lines, ref_lines = [hyps[i] for i in order], [refs[i] for i in order]
            result["bleu"] = metrics.bleu(hyp_lines, [ref_lines]).score
        return result

    def _translate(self, model, batch, hyps: dict, refs: dict) -> None:
        """Greedy translations and detokenized references of `batch`, by example index."""
        tok = self.tokenizer
        results = search.greedy_search(model, batch.src_ids, batch.src_lens, self.greedy)
        texts = tok.decode_tgt([r[0].tokens for r in results])
        out = batch.tgt_out_ids.tolist()
        ref_ids = [row[: int(n) - 1] for row, n in zip(out, batch.tgt_lens.tolist())]  # no eos
        for i, hyp, ref in zip(batch.indices.tolist(), texts, tok.decode_tgt(ref_ids)):
            hyps[i], refs[i] = hyp, ref


def improves(result: dict, best: float | None, best_metric: str) -> tuple[float, bool]:
    """The result's value of `best_metric` (bleu, or loss when there is no bleu), and whether
    it beats `best` (higher bleu, lower loss; anything beats None)."""
    metric = "bleu" if best_metric == "bleu" and "bleu" in result else "loss"
    value = result[metric]
    if best is None:
        return value, True
    return value, value > best if metric == "bleu" else value < best


def validate_weights(validator: Validator, model: torch.nn.Module, weights: dict) -> dict:
    """`validator`'s figures for `weights` (e.g. an average of checkpoints) in `model`, which
    holds its own weights again afterwards."""
    own = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    try:
        return validator(model)
    finally:
        model.load_state_dict(own)
