"""Translation with a trained checkpoint: the Python inference API and `nmt translate`.

Owns: rebuilding the model and tokenizer from one checkpoint file; turning raw lines into source
batches (sorted by length, over-long lines truncated with a warning, empty lines answered without
the model); greedy or beam search through `nmt.search`; restoring input order; streaming a file or
stdin to a file or stdout, one line out per line in, whatever the bytes inside a line are.
Does not own the search (nmt.search), the model (nmt.models) or the file format (nmt.checkpoint).

Lines are read by the rule of nmt.textio (a line ends at "\\n" or "\\r\\n"; a lone "\\r" stays
inside its line; strict UTF-8); an output line never contains "\\n" or "\\r".

n-best output (`translate_stream(..., n_best=K)` with K > 1, `nmt translate --n-best K`), as in
fairseq and Moses: one line per hypothesis, best first,
    `INDEX ||| HYPOTHESIS ||| SCORE`
where INDEX is the 0-based input line number and SCORE is the search score (log-probability with
the GNMT length and coverage penalties) with 4 decimals. Every input line appears at least once;
an empty input line gives one entry with an empty hypothesis and score 0.0000.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nmt import checkpoint, search, search_graph, shortlist
from nmt.config import Config, from_dict, load_time_keys, override_section
from nmt.devices import TORCH_DTYPES, check_autocast, inference_precision, probe, resolve_device
from nmt.errors import UsageError
from nmt.models import build_model_for
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


class Translator:
    """A model, its tokenizer and its search defaults, ready to translate lists of lines.

    `translate(lines)` returns one string per line, in input order; `translate_nbest` returns the
    `n_best` best (text, score) pairs per line. Search settings default to the checkpoint's
    `search` section; any of its keys (nmt.config.SearchConfig: beam_size, alpha, ...) can be
    overridden per call as a keyword, None keeping the checkpoint's value. `n_best` is the
    exception: it is the call's own (1 unless asked), whatever the checkpoint says. The
    load-time settings (search.dtype, search.threads) are taken by `from_checkpoint` and
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
        dev = resolve_device(device)
        ckpt = checkpoint.load(path)
        cfg = from_dict(ckpt["config"], source=f"{path} (config)")
        cfg = _load_time_search(cfg, dtype, threads, f"{path} (loading)")
        if cfg.search.threads:
            torch.set_num_threads(cfg.search.threads)
        precision, note = inference_precision(cfg.search.dtype, dev)
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
        dtype, bf16_encoder = TORCH_DTYPES[precision], _bf16_encoder(precision, dev)
        model = prepare_model(model, precision, dev, bf16_encoder)
        note += "; encoder in bfloat16" if bf16_encoder else ""
        table = shortlist.check(ckpt.get("shortlist"), str(path))
        return cls(model, tokenizer, cfg, dev, dtype, precision, note, table)

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
    def translate(self, lines: list[str], **overrides) -> list[str]:
        """One translation per line, in input order; an empty line gives "".

        `overrides`: search settings for this call (see the class docstring)."""
        n_best = overrides.pop("n_best", None)  # accepted as every search key is; the best is kept
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
    def run(self, lines: list[str], settings: search.SearchSettings):
        """Translate `lines` with checked `settings`.

        Returns (results, truncated): per line, the (text, score) pairs best first; and the
        (0-based index, piece count) of every line cut to `settings.max_src_len` pieces.
        """
        pieces, truncated = self.encode(lines, settings.max_src_len)
        results: list[list[tuple[str, float]]] = [[("", 0.0)] for _ in lines]
        todo = [i for i, p in enumerate(pieces) if p is not None]
        # Longest first: batches of similar lengths waste little padding, and an out-of-memory
        # error (if any) comes at once. Results are placed back by index.
        todo.sort(key=lambda i: len(pieces[i]), reverse=True)
        for start in range(0, len(todo), settings.batch_size):
            index = todo[start : start + settings.batch_size]
            hyps = self._search_batch([pieces[i] for i in index], settings)
            texts = iter(self.tokenizer.decode_tgt([h.tokens for sent in hyps for h in sent]))
            for i, sent_hyps in zip(index, hyps):
                results[i] = [
                    (next(texts).translate(_NEWLINES), float(h.score)) for h in sent_hyps
                ] or [("", 0.0)]
        return results, truncated

    def _search_batch(self, batch_pieces: list[list[int]], s: search.SearchSettings):
        tok = self.tokenizer
        seqs = [p + [tok.eos_id] for p in batch_pieces]
        src_lens = torch.tensor([len(q) for q in seqs], dtype=torch.long)  # (B,)
        src_ids = torch.full((len(seqs), int(src_lens.max())), tok.pad_id, dtype=torch.long)
        for row, q in enumerate(seqs):
            src_ids[row, : len(q)] = torch.tensor(q, dtype=torch.long)  # (B, S)
        src_ids, src_lens = src_ids.to(self.device), src_lens.to(self.device)
        run = search_graph.runner(self.device, s.cuda_graph)
        model, space = self.model, None
        if s.shortlist:
            special = (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id)
            space = shortlist.select(
                self.shortlist, src_ids, src_lens, s.shortlist, s.shortlist_frequent, special
            )
            model, s = self.model.shortlisted(space.ids, space.allowed), space.settings(s)
        with search_autocast(self.device, self.dtype):  # beam_size 1 is greedy search
            hyps = search.beam_search(model, src_ids, src_lens, s, run=run)
        if space is not None:  # back from positions in the shortlist to the model's ids
            for h in (h for sent in hyps for h in sent):
                h.tokens = space.tokens(h.tokens)
        return hyps


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


def _format(results: list[list[tuple[str, float]]], first_index: int, n_best: int) -> bytes:
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
    **search_kwargs,
) -> int:
    """Translate a file (stdin for None or "-") into a file (stdout for None or "-").

    Reads `chunk_lines` lines at a time (one from a terminal), so memory does not grow with the
    input; each chunk is sorted by length inside and written in input order. One output line per
    input line (n-best format: see the module docstring). `search_kwargs`: search settings, as
    for `Translator.translate`.
    An output file is written atomically (see `open_output`). Returns the number of input lines.
    """
    if isinstance(chunk_lines, bool) or not isinstance(chunk_lines, int) or chunk_lines < 1:
        raise UsageError(f"chunk_lines must be an integer >= 1, found {chunk_lines!r}")
    settings = translator.search_settings(n_best, **search_kwargs)
    n_lines = n_warned = 0
    with open_input(in_path) as (fin, name), open_output(out_path) as write:
        if fin.isatty():  # someone typing: answer each line as it comes
            chunk_lines = 1
        for first, lines in chunks(fin, name, chunk_lines):
            results, truncated = translator.run(lines, settings)
            n_warned = warn_truncated(truncated, name, settings.max_src_len, first, n_warned)
            write(_format(results, first - 1, n_best))
            if out_path is None or str(out_path) == "-":
                sys.stdout.flush()
            n_lines += len(lines)
    return n_lines
