"""Translation with a trained checkpoint: the Python inference API and `nmt translate`.

Owns: rebuilding the model and tokenizer from one checkpoint file, or an ensemble from several
(`from_checkpoints`: one loader per file, members checked to share one tokenizer); turning raw
lines into source batches (sorted by length, over-long lines truncated with a warning, empty lines
answered without the model); greedy or beam search, or sampling, through `nmt.search` (each line
numbered for its random stream); forced scoring of given translations (`score`, through
`nmt.forced`); restoring input order; streaming a file or stdin to a file or stdout, one line out
per line in, whatever the bytes inside a line are.
Does not own the search (nmt.search), the model (nmt.models) or the file format (nmt.checkpoint).

Lines are read by the rule of nmt.textio (a line ends at "\\n" or "\\r\\n"; a lone "\\r" stays
inside its line; strict UTF-8); an output line never contains "\\n" or "\\r".

n-best output (`translate_stream(..., n_best=K)` with K > 1, `nmt translate --n-best K`), as in
fairseq and Moses: one line per hypothesis, best first,
    `INDEX ||| HYPOTHESIS ||| SCORE`
where INDEX is the 0-based input line number and SCORE is the search score (log-probability with
the GNMT length and coverage penalties) with 4 decimals. Every input line appears at least once;
an empty input line gives one entry with an empty hypothesis and score 0.0000.

Word alignments (`translate_stream(..., alignments=True)`, `nmt translate --alignments`), with
the best translation only: each output line is
    `TRANSLATION ||| ALIGNMENT`
where ALIGNMENT is the hard word alignment in the Pharaoh format that fast_align and Moses
write, `i-j` pairs of 0-based (source word, target word) indices separated by spaces, e.g.
`0-0 1-1 3-2` (words, the merging rule and the order: nmt.alignment). The separator is the last
" ||| " of the line (ALIGNMENT never holds one); an empty input line gives " ||| ". With
`alignments_out=FILE` (`--alignments-out FILE`) the translations are written as usual and FILE
gets the ALIGNMENT of each line, line for line (an empty line for an empty input line).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from nmt import alignment, checkpoint, forced, search, search_graph, shortlist
from nmt.config import Config, from_dict, load_time_keys, override_section
from nmt.devices import TORCH_DTYPES, check_autocast, inference_precision, probe, resolve_device
from nmt.errors import UsageError
from nmt.models import build_model_for
from nmt.models.ensemble import Ensemble
from nmt.models.inference import Bf16Encoder, reduce_decoder
from nmt.textio import chunks, open_input, open_output
from nmt.tokenizer import Tokenizer

MAX_WARNINGS = 10  # truncation warnings printed per call before they are only counted
_NEWLINES = str.maketrans({"\n": " ", "\r": " "})


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


# The words Translator.from_checkpoint(dtype=) took before search.dtype existed, kept as aliases.
_DTYPE_ALIASES = {
    "fp32": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float16: "float16",
}


def _load_time_search(cfg: Config, dtype, threads, source: str) -> Config:
    """`cfg` with the load-time search settings given (None: keep the checkpoint's) applied and
    checked; the old dtype words (fp32, bf16, fp16, torch dtypes) are read as their names."""
    changes = {}
    if dtype is not None:
        changes["dtype"] = _DTYPE_ALIASES.get(dtype, dtype)
    if threads is not None:
        changes["threads"] = threads
    if changes:
        cfg.search = override_section(cfg.search, "search", changes, source)
    return cfg


def prepare_model(
    model: torch.nn.Module, precision: str, device: torch.device, bf16_encoder: bool = False
):
    """A loaded `model`, in eval mode on `device`, made ready to decode in `precision`.

    CUDA bfloat16/float16: weights in that precision too (as NVIDIA's GNMT translate.py
    does), still under autocast so that softmaxes run in float32: no per-step weight casts or
    cuDNN repacking (benchmarks/README.md, "Search and translation"). CPU int8: the decoder's
    step products become int8 (nmt.models.inference), and with `bf16_encoder` the encoder runs
    under bf16 autocast. CPU bfloat16: bf16 weights, the decoder steps as bf16 cell functions,
    under autocast."""
    model = model.to(device).eval()
    if precision != "float32" and (device.type == "cuda" or precision == "bfloat16"):
        model = model.to(TORCH_DTYPES[precision])
    if device.type == "cpu" and precision in ("int8", "bfloat16"):
        reduce_decoder(model, precision)
    if device.type == "cpu" and precision == "int8" and bf16_encoder:
        model.encoder = Bf16Encoder(model.encoder)
    return model


def _bf16_encoder(precision: str, device: torch.device) -> bool:
    """int8 decoding runs the encoder in bf16 where the probe finds bf16 faster than float32
    (native bf16 and the bf16 LSTM kernel: as train.precision=auto decides)."""
    return (
        device.type == "cpu"
        and precision == "int8"
        and (probe().fastest(("float32", "bfloat16")) == "bfloat16")
    )


def search_autocast(device: torch.device, dtype: torch.dtype):
    """The autocast a search in `dtype` runs under: none for float32 (and int8, whose products
    are explicit), else `dtype` (softmaxes and log-softmaxes stay float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


@dataclass
class LoadedModel:
    """One checkpoint file read for inference (`load_model`)."""

    path: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    cfg: Config
    shortlist: dict | None  # the checkpoint's shortlist table, as stored (nmt.shortlist)


def load_model(path: str | Path) -> LoadedModel:
    """The float32 model on the CPU, tokenizer, config and shortlist table of one checkpoint
    file (`prepare_model` then readies the model for its device and precision); every way the
    file can be unusable is one UsageError naming it. Each member of an ensemble is loaded by
    this alone."""
    ckpt = checkpoint.load(path)
    cfg = from_dict(ckpt["config"], source=f"{path} (config)")
    try:
        tokenizer = Tokenizer.from_bytes(checkpoint.tokenizer_bytes(ckpt))
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise UsageError(f"{path}: cannot load its sentencepiece model ({e})") from None
    state = ckpt["model"]
    sides = (
        ("source", "encoder.embed.weight", tokenizer.src_vocab_size),
        ("target", "decoder.embed.weight", tokenizer.tgt_vocab_size),
    )
    for side, key, size in sides:
        weight = state.get(key)
        if weight is not None and weight.shape[0] != size:
            raise UsageError(
                f"{path}: the {side} sentencepiece model has {size} pieces but the model's "
                f"{side} embedding has {weight.shape[0]} rows: tokenizer and weights do not "
                f"belong together"
            )
    try:
        model = build_model_for(cfg.model, tokenizer)
        model.load_state_dict(state)
    except (RuntimeError, ValueError) as e:
        msg = str(e).strip().splitlines()
        raise UsageError(
            f"{path}: weights do not match the model its config describes "
            f"({' '.join(msg[:3])[:300]})"
        ) from None
    return LoadedModel(str(path), model, tokenizer, cfg, ckpt.get("shortlist"))


def check_members(members: list[LoadedModel]) -> None:
    """One UsageError, naming the two files, unless every member shares the first's special ids
    and sentencepiece model(s), byte for byte but for the file paths their trainer recorded
    (`Tokenizer.comparable`: two `nmt prepare` runs of the same text differ in those alone): an
    ensemble averages distributions over one vocabulary, so the same id must mean the same
    piece in every member, and the same text the same ids."""
    first = members[0]
    ids = _special_ids(first.tokenizer)
    for other in members[1:]:
        other_ids = _special_ids(other.tokenizer)
        if other_ids != ids:
            raise UsageError(
                f"{first.path} and {other.path}: different special ids (pad, unk, bos, eos): "
                f"{ids} vs {other_ids}; an ensemble's members must share one tokenizer"
            )
        if other.tokenizer.comparable() != first.tokenizer.comparable():
            raise UsageError(
                f"{first.path} and {other.path}: different sentencepiece models; an ensemble's "
                "members must share one tokenizer (train them on one prepared data.dir, on data "
                "prepared alike from the same text, or with `nmt prepare --tokenizer-from`)"
            )


def _special_ids(tok: Tokenizer) -> tuple[int, int, int, int]:
    return tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id


class PairScore(NamedTuple):
    """A target's score given its source (`Translator.score`)."""

    log_prob: float  # log P(target | source): the sum over its pieces and the final eos
    pieces: int  # the pieces scored, the eos included (>= 1)

    @property
    def per_piece(self) -> float:
        return self.log_prob / self.pieces


@dataclass
class Translation:
    """One line's best translation and the attention behind it (`Translator.translate(lines,
    return_attention=True)`). The weights are the model's `inspect_attention` over the
    hypothesis (teacher forcing: what search attended with; for a TCN decoder, its last
    block's). An empty line gives "", no pieces, a (0, 0) matrix and no links."""

    text: str
    score: float  # the search score, as `translate_nbest` gives it
    src_pieces: list[str]  # the source pieces the model read (truncated lines: those kept), "</s>"
    tgt_pieces: list[str]  # the pieces of `text`, then "</s>"
    attention: torch.Tensor  # (len(tgt_pieces), len(src_pieces)) float32 on the CPU
    alignment: list[tuple[int, int]]  # (source word, target word) links: nmt.alignment


class Translator:
    """A model, its tokenizer and its search defaults, ready to translate lists of lines.

    `translate(lines)` returns one string per line, in input order; `translate_nbest` returns the
    `n_best` best (text, score) pairs per line. Search settings default to the checkpoint's
    `search` section; any of its keys (nmt.config.SearchConfig: beam_size, alpha, ...) can be
    overridden per call as a keyword, None keeping the checkpoint's value. `n_best` is the
    exception: it is the call's own (1 unless asked), whatever the checkpoint says. Sampling is
    such a keyword too: `translate(lines, sampling="topp", topp=0.9, beam_size=1, seed=7)`, line
    i drawing from the stream (seed, i). `score(src_lines, tgt_lines)` gives each given
    target's log-probability. The model is one checkpoint's or an ensemble's
    (`from_checkpoints`).
    The load-time settings (search.dtype, search.threads) are taken by `from_checkpoints` and
    refused per call.

    `precision` names what the model computes in ("float32", "bfloat16", "int8", "float16");
    `precision_note` says how it was chosen (with the probe's figures for auto); `dtype` is
    the autocast dtype of the search (float32: no autocast).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Tokenizer,
        cfg: Config,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        precision: str | None = None,
        precision_note: str = "",
        shortlist_table: dict | None = None,
    ):
        check_autocast(model, device, dtype, "search.dtype")
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.dtype = dtype
        self.precision = precision or str(dtype).removeprefix("torch.")
        self.precision_note = precision_note or self.precision
        self.shortlist = None  # the checkpoint's shortlist tables, on `device`
        if shortlist_table is not None:
            self.shortlist = {k: v.to(device) for k, v in shortlist_table.items()}

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, device: str = "auto", dtype=None, threads: int | None = None
    ) -> Translator:
        """Load a checkpoint file; every way it can be unusable is one UsageError naming it.

        `dtype` and `threads`: search.dtype and search.threads (None: the checkpoint's). A
        thread count other than 0 is set for the whole process (torch.set_num_threads)."""
        return cls.from_checkpoints([path], device=device, dtype=dtype, threads=threads)

    @classmethod
    def from_checkpoints(
        cls, paths, device: str = "auto", dtype=None, threads: int | None = None
    ) -> Translator:
        """One checkpoint, or several decoding as an ensemble (nmt.models.ensemble: the mean of
        their log-probabilities at every step). Members may be of any families; they must share
        the special ids and the sentencepiece model(s), byte for byte but for the trainer's file
        paths (`check_members`): anything else is one UsageError naming the two files. The
        search settings, the config (`self.cfg`) and the shortlist table are the first
        checkpoint's; `dtype` and `threads` as in `from_checkpoint`, for every member."""
        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise UsageError("no checkpoint given")
        dev = resolve_device(device)
        members = [load_model(path) for path in paths]
        check_members(members)
        first = members[0]
        cfg = _load_time_search(first.cfg, dtype, threads, f"{first.path} (loading)")
        if cfg.search.threads:
            torch.set_num_threads(cfg.search.threads)
        precision, note = inference_precision(cfg.search.dtype, dev)
        bf16_encoder = _bf16_encoder(precision, dev)
        models = [prepare_model(m.model, precision, dev, bf16_encoder) for m in members]
        note += "; encoder in bfloat16" if bf16_encoder else ""
        model = models[0] if len(models) == 1 else Ensemble(models)
        table = shortlist.check(first.shortlist, first.path)
        dtype = TORCH_DTYPES[precision]
        return cls(model, first.tokenizer, cfg, dev, dtype, precision, note, table)

    # ------------------------------------------------------------------ settings
    def search_settings(self, n_best: int | None = 1, **overrides) -> search.SearchSettings:
        """The checkpoint's search settings with `overrides` (search keys; None = keep) and
        `n_best` (None = 1) applied, checked by nmt.config: one UsageError listing every
        problem. The load-time settings (search.dtype, search.threads) are refused here."""
        changes = {k: v for k, v in overrides.items() if v is not None}
        load_time = [k for k in changes if k in load_time_keys()]
        if load_time:
            keys = ", ".join(f"search.{k}" for k in load_time)
            raise UsageError(
                f"{keys}: read when the model is loaded, not per call: give "
                f"{', '.join(f'{k}=' for k in load_time)} to Translator.from_checkpoint "
                f"(the flags {', '.join('--' + k for k in load_time)} of nmt translate)"
            )
        changes["n_best"] = 1 if n_best is None else n_best
        cfg = override_section(self.cfg.search, "search", changes)
        self._check_shortlist(cfg.shortlist)
        return search.SearchSettings.from_config(cfg, self.tokenizer)

    def _check_shortlist(self, k: int) -> None:
        if k and self.shortlist is None:
            raise UsageError(
                f"search.shortlist={k}: this checkpoint has no shortlist table; add one with "
                "`nmt shortlist CKPT --data-dir DIR -o OUT` (training writes one)"
            )
        if k > (0 if self.shortlist is None else self.shortlist["table"].size(1)):
            raise UsageError(
                f"search.shortlist={k}: the checkpoint's table holds "
                f"{self.shortlist['table'].size(1)} target pieces per source piece"
            )

    # ------------------------------------------------------------------ public API
    def translate(self, lines: list[str], return_attention: bool = False, **overrides) -> list:
        """One translation per line, in input order; an empty line gives "".

        `return_attention`: a `Translation` per line instead of its text (the attention
        matrix over source and target pieces, and the word alignment).
        `overrides`: search settings for this call (see the class docstring)."""
        n_best = overrides.pop("n_best", None)  # accepted as every search key is; the best is kept
        if return_attention:
            settings = self.search_settings(1, **overrides)
            translations, truncated = self.run_attention(lines, settings)
            warn_truncated(truncated, "line", settings.max_src_len)
            return translations
        return [r[0][0] for r in self.translate_nbest(lines, n_best, **overrides)]

    def translate_nbest(
        self, lines: list[str], n_best: int, **overrides
    ) -> list[list[tuple[str, float]]]:
        """The `n_best` best (text, score) pairs per line, best first, in input order."""
        settings = self.search_settings(n_best, **overrides)
        results, truncated = self.run(lines, settings)
        warn_truncated(truncated, "line", settings.max_src_len)
        return results

    # ------------------------------------------------------------------ the work
    def encode(self, lines: list[str], max_src_len: int):
        """Piece ids per line (None for a line with nothing to translate), and the truncated lines.

        Returns (pieces, truncated) where truncated lists (0-based index, original piece count).
        """
        keep = [i for i, line in enumerate(lines) if line.strip()]
        encoded = self.tokenizer.encode_src([lines[i] for i in keep]) if keep else []
        pieces: list[list[int] | None] = [None] * len(lines)
        truncated = []
        for i, ids in zip(keep, encoded):
            if len(ids) > max_src_len:
                truncated.append((i, len(ids)))
                ids = ids[:max_src_len]
            pieces[i] = list(ids) if ids else None
        return pieces, truncated

    @torch.no_grad()
    def run(self, lines: list[str], settings: search.SearchSettings, line_ids=None):
        """Translate `lines` with checked `settings`.

        Returns (results, truncated): per line, the (text, score) pairs best first; and the
        (0-based index, piece count) of every line cut to `settings.max_src_len` pieces.
        `line_ids`: each line's number in the caller's input (default 0, 1, ...); when sampling,
        a line draws from the random stream of its number, so that its sample does not depend
        on how the input is cut into calls (a file's chunks, a server's gathered requests).
        """
        _, hyps, truncated = self.search_lines(lines, settings, line_ids)
        results: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in lines]
        found = [i for i, sent_hyps in enumerate(hyps) if sent_hyps]
        texts = iter(self.tokenizer.decode_tgt([h.tokens for i in found for h in hyps[i]]))
        for i in found:
            results[i] = [(next(texts).translate(_NEWLINES), float(h.score)) for h in hyps[i]]
        return results, truncated

    @torch.no_grad()
    def search_lines(self, lines: list[str], settings: search.SearchSettings, line_ids=None):
        """Search `lines` with checked `settings`: (pieces, hyps, truncated), where pieces[i] are
        line i's source piece ids and hyps[i] its hypotheses, best first (both None for a line
        with nothing to translate), and truncated is as `run` gives it."""
        line_ids = range(len(lines)) if line_ids is None else line_ids
        pieces, truncated = self.encode(lines, settings.max_src_len)
        hyps: list[list[search.Hypothesis] | None] = [None] * len(lines)
        todo = [i for i, p in enumerate(pieces) if p is not None]
        # Longest first: batches of similar lengths waste little padding, and an out-of-memory
        # error (if any) comes at once. Results are placed back by index.
        todo.sort(key=lambda i: len(pieces[i]), reverse=True)
        for start in range(0, len(todo), settings.batch_size):
            index = todo[start : start + settings.batch_size]
            batch_ids = [line_ids[i] for i in index]
            batch_hyps = self._search_batch([pieces[i] for i in index], settings, batch_ids)
            for i, sent_hyps in zip(index, batch_hyps):
                hyps[i] = sent_hyps
        return pieces, hyps, truncated

    def _search_batch(self, batch_pieces: list[list[int]], s: search.SearchSettings, line_ids):
        tok = self.tokenizer
        src_ids, src_lens = self._padded([p + [tok.eos_id] for p in batch_pieces])
        run = search_graph.runner(self.device, s.cuda_graph)
        model, space = self.model, None
        if s.shortlist:
            special = (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id)
            space = shortlist.select(
                self.shortlist, src_ids, src_lens, s.shortlist, s.shortlist_frequent, special
            )
            model, s = self.model.shortlisted(space.ids, space.allowed), space.settings(s)
        with self._autocast():  # beam_size 1 is greedy search
            hyps = search.beam_search(model, src_ids, src_lens, s, run=run, line_ids=line_ids)
        if space is not None:  # back from positions in the shortlist to the model's ids
            for h in (h for sent in hyps for h in sent):
                h.tokens = space.tokens(h.tokens)
        return hyps

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) right-padded with pad_id, lens (B,)) on the model's device."""
        lens = torch.tensor([len(q) for q in seqs], dtype=torch.long)  # (B,)
        ids = torch.full((len(seqs), int(lens.max())), self.tokenizer.pad_id, dtype=torch.long)
        for row, q in enumerate(seqs):
            ids[row, : len(q)] = torch.tensor(q, dtype=torch.long)  # (B, L)
        return ids.to(self.device), lens.to(self.device)

    def _autocast(self):
        return search_autocast(self.device, self.dtype)

    # ------------------------------------------------------------------ forced scoring
    def score(self, src_lines: list[str], tgt_lines: list[str], **overrides) -> list[PairScore]:
        """Per (source, target) pair, in input order, the model's log-probability of the target
        given the source (teacher forcing; for an ensemble, the mean of its members'). An empty
        target is scored as eos alone; a source without pieces as eos alone (the model's input
        for an empty line). Sources over `max_src_len` pieces are truncated with a warning;
        targets are scored whole. `overrides`: search keys; batch_size and max_src_len are read.
        """
        settings = self.search_settings(1, **overrides)
        scores, truncated = self.score_run(src_lines, tgt_lines, settings)
        warn_truncated(truncated, "line", settings.max_src_len)
        return scores

    def score_run(self, src_lines: list[str], tgt_lines: list[str], settings):
        """`score` with checked `settings`: (scores, truncated), as `run` gives them."""
        if len(src_lines) != len(tgt_lines):
            raise UsageError(
                f"score: {len(src_lines)} source lines but {len(tgt_lines)} target lines"
            )
        pieces, truncated = self.encode(src_lines, settings.max_src_len)
        src_pieces = [p or [] for p in pieces]
        tgt_pieces = self.tokenizer.encode_tgt(tgt_lines) if tgt_lines else []
        return self.score_pieces(src_pieces, tgt_pieces, settings.batch_size), truncated

    @torch.no_grad()
    def score_pieces(self, src_pieces, tgt_pieces, batch_size: int) -> list[PairScore]:
        """`score` of piece ids (no bos/eos), `batch_size` pairs at a time, longest first."""
        scores: list = [None] * len(src_pieces)
        todo = sorted(range(len(scores)), key=lambda i: -len(src_pieces[i]) - len(tgt_pieces[i]))
        tok = self.tokenizer
        for start in range(0, len(todo), batch_size):
            index = todo[start : start + batch_size]
            src_ids, src_lens = forced.source_batch(
                [src_pieces[i] for i in index], tok.eos_id, tok.pad_id
            )
            src_ids, src_lens = src_ids.to(self.device), src_lens.to(self.device)
            with self._autocast():
                totals = forced.target_scores(
                    self.model, src_ids, src_lens, [tgt_pieces[i] for i in index], tok
                )
            for i, total in zip(index, totals.tolist()):
                scores[i] = PairScore(total, len(tgt_pieces[i]) + 1)
        return scores

    # ------------------------------------------------------------------ attention
    @torch.no_grad()
    def run_attention(self, lines: list[str], settings: search.SearchSettings, line_ids=None):
        """`run`'s search, then a `Translation` of each line's best hypothesis.

        Returns (translations, truncated), truncated as `run` gives it."""
        pieces, hyps, truncated = self.search_lines(lines, settings, line_ids)
        empty = torch.zeros(0, 0)
        out = [Translation("", 0.0, [], [], empty, []) for _ in lines]
        todo = sorted((i for i, h in enumerate(hyps) if h), key=lambda i: -len(pieces[i]))
        for start in range(0, len(todo), settings.batch_size):
            index = todo[start : start + settings.batch_size]
            best = [hyps[i][0] for i in index]
            weights = self._attention_batch([pieces[i] for i in index], [h.tokens for h in best])
            for i, hyp, w in zip(index, best, weights):
                out[i] = self._translation(pieces[i], hyp, w)
        return out, truncated

    def _attention_batch(self, batch_pieces, batch_tokens) -> list[torch.Tensor]:
        """The model's `inspect_attention` of each (source, hypothesis) pair: (T_i + 1, S_i + 1)
        float32 CPU matrices, eos row and column included."""
        tok = self.tokenizer
        src_ids, src_lens = self._padded([p + [tok.eos_id] for p in batch_pieces])
        tgt_in_ids, tgt_lens = self._padded([[tok.bos_id, *t] for t in batch_tokens])
        try:
            with self._autocast():
                attn = self.model.inspect_attention(src_ids, src_lens, tgt_in_ids)  # (B, T, S)
        except NotImplementedError as e:
            raise UsageError(f"attention and alignments: {e}") from None
        attn = attn.float().cpu()
        return [a[:t, :s] for a, t, s in zip(attn, tgt_lens.tolist(), src_lens.tolist())]

    def _translation(self, src_ids: list[int], hyp: search.Hypothesis, weights) -> Translation:
        tok = self.tokenizer

        def decode_tgt(seqs):  # as `run` writes the text out
            return [text.translate(_NEWLINES) for text in tok.decode_tgt(seqs)]

        src_pieces = tok.src_sp.id_to_piece(src_ids)
        src_words = alignment.source_words(src_pieces)
        tgt_words = alignment.target_words(hyp.tokens, decode_tgt)
        links = alignment.hard_alignment(weights, [*src_words, None], [*tgt_words, None])
        eos = tok.tgt_sp.id_to_piece(tok.eos_id)
        return Translation(
            text=decode_tgt([hyp.tokens])[0],
            score=float(hyp.score),
            src_pieces=[*src_pieces, eos],
            tgt_pieces=[*tok.tgt_sp.id_to_piece(hyp.tokens), eos],
            attention=weights,
            alignment=links,
        )


def warn_truncated(
    truncated, where: str, max_src_len: int, first_line: int = 1, already: int = 0
) -> int:
    """Print one warning per truncated line (at most MAX_WARNINGS in all); returns the count.

    `truncated` holds (0-based index in the chunk, piece count); `first_line` is the 1-based line
    number of index 0; `where` prefixes the line number (a file name, or "line").
    """
    for i, n_pieces in truncated:
        if already < MAX_WARNINGS:
            sep = " " if where == "line" else ":"
            _warn(
                f"{where}{sep}{first_line + i}: {n_pieces} pieces, truncated to the first "
                f"{max_src_len} (search.max_src_len)"
            )
        elif already == MAX_WARNINGS:
            _warn("more over-long lines were truncated; their warnings are not shown")
        already += 1
    return already


def _format(
    results: list[list[tuple[str, float]]], first_index: int, n_best: int, links=None
) -> bytes:
    if links is not None:  # n_best is 1
        return "".join(f"{r[0][0]} ||| {a}\n" for r, a in zip(results, links)).encode("utf-8")
    if n_best == 1:
        return "".join(r[0][0] + "\n" for r in results).encode("utf-8")
    lines = [
        f"{first_index + i} ||| {text} ||| {score:.4f}\n"
        for i, hyps in enumerate(results)
        for text, score in hyps
    ]
    return "".join(lines).encode("utf-8")


def translate_stream(
    translator: Translator,
    in_path: str | None,
    out_path: str | None,
    *,
    n_best: int = 1,
    chunk_lines: int = 2000,
    alignments: bool = False,
    alignments_out: str | None = None,
    **search_kwargs,
) -> int:
    """Translate a file (stdin for None or "-") into a file (stdout for None or "-").

    Reads `chunk_lines` lines at a time (one from a terminal), so memory does not grow with the
    input; each chunk is sorted by length inside and written in input order. One output line per
    input line (n-best format: see the module docstring). `search_kwargs`: search settings, as
    for `Translator.translate`. `alignments`: each output line is `TRANSLATION ||| ALIGNMENT`;
    `alignments_out`: the alignments go, line for line, to this file (stdout for "-") instead
    (see the module docstring).
    An output file is written atomically (see `open_output`). Returns the number of input lines.
    """
    if isinstance(chunk_lines, bool) or not isinstance(chunk_lines, int) or chunk_lines < 1:
        raise UsageError(f"chunk_lines must be an integer >= 1, found {chunk_lines!r}")
    aligned = alignments or alignments_out is not None
    if aligned and n_best != 1:
        raise UsageError("alignments are the best translation's: ask for them with n_best 1")
    if alignments_out is not None and _same_output(out_path, alignments_out):
        raise UsageError(f"alignments_out {alignments_out}: the translations go there already")
    settings = translator.search_settings(n_best, **search_kwargs)
    n_lines = n_warned = 0
    with contextlib.ExitStack() as stack:
        fin, name = stack.enter_context(open_input(in_path))
        write = stack.enter_context(open_output(out_path))
        write_links = stack.enter_context(open_output(alignments_out)) if alignments_out else None
        if fin.isatty():  # someone typing: answer each line as it comes
            chunk_lines = 1
        for first, lines in chunks(fin, name, chunk_lines):
            line_ids = range(first - 1, first - 1 + len(lines))  # 0-based lines of the input
            results, truncated, links = _run_chunk(translator, lines, settings, aligned, line_ids)
            n_warned = warn_truncated(truncated, name, settings.max_src_len, first, n_warned)
            write(_format(results, first - 1, n_best, None if write_links else links))
            if write_links:
                write_links("".join(a + "\n" for a in links).encode("utf-8"))
            if out_path is None or str(out_path) == "-":
                sys.stdout.flush()
            n_lines += len(lines)
    return n_lines


def _same_output(a: str | None, b: str | None) -> bool:
    """Whether outputs `a` and `b` are one (stdout: None or "-")."""
    std_a, std_b = a is None or str(a) == "-", b is None or str(b) == "-"
    if std_a or std_b:
        return std_a and std_b
    return Path(a).resolve() == Path(b).resolve()


def _run_chunk(translator: Translator, lines, settings, aligned: bool, line_ids):
    """(results, truncated) as `Translator.run` gives them, and the alignment text of each line
    (None unless `aligned`)."""
    if not aligned:
        return (*translator.run(lines, settings, line_ids), None)
    translations, truncated = translator.run_attention(lines, settings, line_ids)
    results = [[(t.text, t.score)] for t in translations]
    return results, truncated, [alignment.to_text(t.alignment) for t in translations]
