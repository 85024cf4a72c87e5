"""Typed settings for every part of the toolkit, YAML loading and `key.sub=value` overrides.

Owns: the dataclasses (each default lives in its field, with its help text beside it), loading,
validation that collects every problem and raises once (`ConfigError`), and rendering a
commented YAML of the defaults. Does not own: what the settings mean (the modules that read
them do). Layer 0: no torch import.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nmt.errors import ConfigError, UsageError


def opt(
    default,
    help: str,  # noqa: A002
    choices: tuple | None = None,
    min=None,  # noqa: A002
    max=None,  # noqa: A002
    load_time: bool = False,
    **kw,
):
    """A dataclass field carrying its help text and its allowed values. `load_time`: a search
    setting read once, when a model is loaded (nmt.translator), not per call (see
    `load_time_keys`)."""
    meta = {"help": help, "choices": choices, "min": min, "max": max, "load_time": load_time}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class DataConfig:
    """Where the parallel text is and how it is filtered."""

    corpus: str = opt("multi30k", "corpus name from nmt.corpora (used by recipes and `prepare`)")
    src_lang: str = opt("en", "source language code")
    tgt_lang: str = opt("de", "target language code")
    train_src: str = opt("", "training source text file (one sentence per line; .gz allowed)")
    train_tgt: str = opt("", "training target text file, line-aligned with train_src")
    valid_src: str = opt("", "validation source text file")
    valid_tgt: str = opt("", "validation target text file, line-aligned with valid_src")
    dir: str = opt("runs/data", "folder for the tokenizer models and the cached encoded datasets")
    max_len: int = opt(200, "pairs with more pieces than this on either side are dropped", min=1)
    min_len: int = opt(1, "pairs with fewer pieces than this on either side are dropped", min=0)
    num_proc: int = opt(1, "worker processes for encoding (1 = in-process)", min=1)
    sampling_alpha: float = opt(
        0.0,
        "subword regularization of the training pairs, drawn afresh for every batch: "
        "BPE-dropout probability (tokenizer.model_type bpe) or unigram sampling smoothing "
        "(the prepared train split then keeps its text); 0 = the one fixed segmentation",
        min=0.0,
        max=1.0,
    )


@dataclass
class TokenizerConfig:
    """The sentencepiece model learned from the training split."""

    model_type: str = opt("bpe", "sentencepiece algorithm", choices=("bpe", "unigram"))
    vocab_size: int = opt(8000, "pieces per model (joint: one shared model)", min=16)
    joint: bool = opt(True, "one model for both sides (also shares the embeddings)")
    character_coverage: float = opt(1.0, "share of characters covered", min=0.9, max=1.0)
    input_sentence_size: int = opt(
        2_000_000, "sentences sampled to learn the model (0 = all)", min=0
    )


@dataclass
class ModelConfig:
    """Architecture and sizes. Presets live in configs/."""

    arch: str = opt("gnmt", "model family for both sides", choices=("gnmt", "tcn"))
    encoder: str = opt("", "encoder family if it differs from arch", choices=("", "gnmt", "tcn"))
    decoder: str = opt("", "decoder family if it differs from arch", choices=("", "gnmt", "tcn"))
    cell: str = opt("lstm", "recurrent cell of the GNMT stacks", choices=("lstm", "gru", "rnn"))
    emb_dim: int = opt(256, "embedding size", min=1)
    hidden: int = opt(256, "hidden size of every unidirectional layer (and attention)", min=1)
    bi_hidden: int = opt(128, "per-direction size of the bidirectional first encoder layer", min=1)
    enc_layers: int = opt(2, "encoder layers (the first is bidirectional)", min=1)
    dec_layers: int = opt(2, "decoder layers (the first feeds attention)", min=1)
    residual_start: int = opt(3, "first layer (1-based) with a residual connection", min=2)
    attention: str = opt("bahdanau", "attention score", choices=("bahdanau", "dot", "general"))
    dropout: float = opt(0.2, "dropout between layers and on embeddings", min=0.0, max=0.9)
    word_dropout: float = opt(
        0.0,
        "training only: zero a whole token's embedding with this probability, both sides "
        "(Sennrich & Zhang 2019, low-resource NMT)",
        min=0.0,
        max=0.9,
    )
    tie_embeddings: bool = opt(False, "tie the output projection to the target embedding")
    share_embeddings: bool = opt(True, "share source and target embeddings when joint")
    init_scale: float = opt(0.1, "uniform(-s, s) initialisation of weights", min=0.0)
    bridge: bool = opt(
        False, "GNMT decoder: start every layer from tanh(W · mean encoder memory), not zeros"
    )
    input_feeding: bool = opt(
        False,
        "GNMT: feed the previous attention context to decoder layer 1 (TF GNMT, OpenNMT); "
        "off = NVIDIA GNMT v2 (no loop over time steps in training)",
    )
    positions: bool = opt(
        False, "GNMT: add sinusoidal position features to the embeddings of both sides"
    )
    emb_scale: bool = opt(
        False,
        "multiply embeddings by sqrt(emb_dim), GNMT and TCN (faster early training on small data)",
    )
    kernel_size: int = opt(3, "TCN: convolution kernel size", min=1)
    levels: int = opt(4, "TCN: temporal blocks per stack; dilation doubles per level", min=1)
    channels: int = opt(256, "TCN: channels of every temporal block", min=1)
    glu: bool = opt(
        False,
        "TCN: a gated linear unit after each convolution (ConvS2S, Gehring et al. 2017) instead "
        "of ReLU; each convolution then computes 2 x channels",
    )
    scaled_residual: bool = opt(
        False,
        "TCN: join a block and its residual as (x + f(x)) * sqrt(0.5), and the decoder's "
        "attention as (h + context) * sqrt(0.5) (ConvS2S), instead of ReLU(x + f(x)) (Bai et al.)",
    )
    conv_init: str = opt(
        "pytorch",
        "TCN: weight initialisation: pytorch (fan-in scaled uniform defaults) or convs2s "
        "(normal(0, sqrt(g * (1 - dropout) / fan_in)), g = 4 before a GLU, 2 before a ReLU, "
        "1 before no activation: keeps the variance through the stack)",
        choices=("pytorch", "convs2s"),
    )
    separable: bool = opt(
        False,
        "TCN: depthwise-separable convolutions: a dilated depthwise convolution (kernel_size "
        "weights per channel) then a 1x1 convolution (about kernel_size times fewer FLOPs)",
    )
    attention_embeddings: bool = opt(
        False,
        "TCN decoder: ConvS2S attention: each query adds the target embedding and the values "
        "add the source embeddings (each sum times sqrt(0.5)); a direct path for word choice",
    )
    attention_blocks: int = opt(
        0,
        "TCN decoder: attend to the source after the last N blocks only (0 = after every block, "
        "as ConvS2S; at most model.levels)",
        min=0,
    )


@dataclass
class TrainConfig:
    """Optimisation, validation and checkpointing."""

    out_dir: str = opt("runs/model", "run folder: checkpoints, config.yaml and log.jsonl")
    max_tokens: int = opt(3000, "padded tokens per batch (max of source and target side)", min=1)
    max_epochs: int = opt(10, "stop after this many epochs (0 = no limit)", min=0)
    max_steps: int = opt(0, "stop after this many optimizer steps (0 = no limit)", min=0)
    max_minutes: float = opt(
        0.0,
        "stop after this many minutes of training, counted across resumes (0 = no limit); "
        "validates and saves at the stop",
        min=0.0,
    )
    optimizer: str = opt("adam", "optimizer", choices=("adam", "adamw"))
    lr: float = opt(1e-3, "peak learning rate", min=0.0)
    betas: list = opt([0.9, 0.999], "Adam betas")
    weight_decay: float = opt(
        0.0,
        "weight decay: decoupled with optimizer adamw; with adam an L2 term on the gradient, "
        "which Adam's scaling makes strong (0.01 wrecks the GNMT small preset)",
        min=0.0,
    )
    schedule: str = opt(
        "gnmt",
        "lr schedule: gnmt (warmup, then halve `decay_times` times from decay_start), "
        "inverse_sqrt, constant",
        choices=("gnmt", "inverse_sqrt", "constant"),
    )
    warmup_steps: int = opt(200, "linear (gnmt: exponential) warmup steps", min=0)
    decay_start: float = opt(0.666, "gnmt: share of training before the first halving", min=0.0)
    decay_times: int = opt(4, "gnmt: how many times the lr is halved", min=0)
    label_smoothing: float = opt(0.1, "label smoothing", min=0.0, max=0.99)
    clip_norm: float = opt(5.0, "gradient clipping by global norm (0 = off)", min=0.0)
    accum_steps: int = opt(1, "batches accumulated per optimizer step", min=1)
    valid_every: int = opt(0, "validate every N steps (0 = at the end of each epoch)", min=0)
    valid_bleu: bool = opt(True, "compute greedy BLEU at validation")
    best_metric: str = opt("bleu", "metric that picks `best`", choices=("bleu", "loss"))
    patience: int = opt(0, "stop after N validations without improvement (0 = never)", min=0)
    save_every: int = opt(0, "also save a numbered checkpoint every N steps (0 = off)", min=0)
    keep_last: int = opt(2, "numbered checkpoints kept", min=1)
    average_last: int = opt(
        0,
        "when training ends, average the weights of the last N numbered checkpoints "
        "(save_every) into averaged.pt, validate it, and make it `best` when it validates "
        "better (0 = off; N <= keep_last)",
        min=0,
    )
    log_every: int = opt(50, "log every N steps", min=1)
    tensorboard: bool = opt(
        False,
        "also write the log's figures as TensorBoard event files under out_dir/tensorboard "
        "(needs pip install 'nmt[tensorboard]')",
    )
    seed: int = opt(1, "random seed (model init, batch order, dropout)")
    device: str = opt("auto", "auto (cuda if present), cpu, cuda or cuda:N")
    precision: str = opt(
        "auto",
        "auto (bf16 on cuda, fp16 on GPUs older than Ampere, fp32 on cpu), fp32, bf16, "
        "fp16 (cuda only; dynamic loss scaling)",
        choices=("auto", "fp32", "bf16", "fp16"),
    )
    threads: int = opt(0, "torch CPU threads (0 = torch default)", min=0)
    num_workers: int = opt(
        2,
        "CUDA: background processes that build batches into pinned memory "
        "(0 = in the training process); on the CPU batches are always built in-process",
        min=0,
    )
    max_bad_steps: int = opt(
        20,
        "stop after this many steps in a row with NaN/inf gradients (each is skipped; "
        "checked at every log point)",
        min=1,
    )
    min_loss_scale: float = opt(
        1e-4,
        "fp16: stop, saving `last`, when the dynamic loss scale falls below this (gradients "
        "overflow at every scale: resume with train.precision=bf16 or a lower lr)",
        min=0.0,
    )


@dataclass(frozen=True)
class SearchConfig:
    """Decoding: used by validation, `translate` and `evaluate`.

    Frozen: a search gets it (or nmt.search.SearchSettings, these fields plus the special ids)
    whole; a change is `dataclasses.replace` then `check_section`, as `override_section` does.
    Every field is also a flag of `nmt translate` and `nmt evaluate` (nmt.cli) and a keyword of
    the Translator's calls: adding a field here is all a new search option needs outside search.
    Fields marked `load_time` (dtype, threads) are read when a model is loaded
    (`Translator.from_checkpoint(..., dtype=, threads=)`, the same flags) and refused per call.
    """

    beam_size: int = opt(5, "beam size (1 = greedy)", min=1)
    n_best: int = opt(1, "hypotheses returned per sentence (<= beam_size)", min=1)
    alpha: float = opt(0.6, "GNMT length penalty ((5+|Y|)/6)^alpha (0 = off)", min=0.0)
    beta: float = opt(0.0, "GNMT coverage penalty weight (0 = off)", min=0.0)
    max_len_a: float = opt(1.5, "max output length = a * source length + b", min=0.0)
    max_len_b: int = opt(10, "max output length = a * source length + b", min=1)
    cuda_graph: bool = opt(
        True,
        "on CUDA: static shapes and one captured CUDA graph per decoding step (the same "
        "results, one launch per step); false: the batch shrinks as sentences end, as on the CPU",
    )
    batch_size: int = opt(128, "sentences per decoding batch", min=1)
    max_src_len: int = opt(250, "longer inputs are truncated with a warning", min=1)
    exact_stop: bool = opt(
        False,
        "a sentence is done only when no live hypothesis can still beat its worst finished one "
        "(exact with length penalties; most sentences then run to their maximum length); "
        "false: as soon as beam_size hypotheses have finished (fairseq, OpenNMT)",
    )
    sampling: str = opt(
        "none",
        "draw each output token at random instead of searching (one sample per sentence, "
        "beam_size 1): topk from the `topk` most probable tokens, topp from the smallest set "
        "holding `topp` of the probability (nucleus); none: beam or greedy search",
        choices=("none", "topk", "topp"),
    )
    topk: int = opt(10, "sampling topk: how many of the most probable tokens a draw is from", min=1)
    topp: float = opt(
        0.9,
        "sampling topp: the probability mass a draw is from, 0 < topp <= 1 (1: the whole "
        "distribution, i.e. unrestricted sampling)",
        min=0.0,
        max=1.0,
    )
    temperature: float = opt(
        1.0,
        "sampling: the log-probabilities are divided by this (> 0) before topk/topp truncation "
        "(< 1 sharper, > 1 flatter)",
        min=0.0,
    )
    seed: int = opt(
        1,
        "sampling: random seed; a sentence's sample depends only on the seed, its 0-based line "
        "number in the input and the model, not on its batch or the other lines",
        min=0,
        max=2**32 - 1,
    )
    shortlist: int = opt(
        0,
        "vocabulary shortlist (Marian's lexical shortlist): per batch, the output layer scores "
        "only the K best target pieces of each source piece in the checkpoint's table (learned "
        "when training starts, or added by `nmt shortlist`), the shortlist_frequent most "
        "frequent target pieces and the special ids; 0 = every piece",
        min=0,
    )
    shortlist_frequent: int = opt(
        100, "with shortlist: the N most frequent target pieces, always scored", min=0
    )
    dtype: str = opt(
        "auto",
        "inference precision, chosen when the model is loaded: auto (on a CPU the fastest of "
        "float32, bfloat16 and int8 by a timed probe at start-up, never one slower than "
        "float32; on CUDA bfloat16, or float16 before Ampere), float32, bfloat16 (a CPU with "
        "native bf16, or CUDA), int8 (CPU: dynamic quantization of the decoder), float16 "
        "(CUDA only)",
        choices=("auto", "float32", "bfloat16", "int8", "float16"),
        load_time=True,
    )
    threads: int = opt(
        0,
        "torch CPU threads, set when the model is loaded (0 = torch's default)",
        min=0,
        load_time=True,
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_TYPES = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "search": SearchConfig,
}


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def field_type(cls, f: dataclasses.Field):
    """The type of field `f` of `cls`, `X | None` read as X."""
    tp = _hints(cls)[f.name]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp, path: str, strict: bool = False) -> tuple[Any, str | None]:
    """Return (value, problem). Ints are accepted where floats are expected; nothing else, but
    for YAML input (not `strict`) a float written with an exponent and no dot."""
    if tp is bool:
        if isinstance(value, bool):
            return value, None
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value), None
        if not strict and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            return float(value), None  # PyYAML (YAML 1.1) reads 1e-3, without a dot, as a string
    elif tp is str:
        if isinstance(value, str):
            return value, None
    elif tp is list:
        if isinstance(value, list):
            return value, None
    found = "null" if value is None else type(value).__name__
    return value, f"{path}: expected {_type_name(tp)}, found {found} {value!r}"


def _check_field(f: dataclasses.Field, value, path: str) -> str | None:
    meta = f.metadata
    if meta.get("choices") and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        hint = _did_you_mean(str(value), [c for c in meta["choices"] if c])
        return f"{path}: expected one of {allowed}, found {value!r}{hint}"
    if meta.get("min") is not None and value < meta["min"]:
        return f"{path}: must be >= {meta['min']}, found {value!r}"
    if meta.get("max") is not None and value > meta["max"]:
        return f"{path}: must be <= {meta['max']}, found {value!r}"
    return None


def receptive_field(kernel_size: int, levels: int) -> int:
    """Positions one output sees through `levels` blocks of two dilated convs (dilation 2**l)."""
    return 1 + 2 * (kernel_size - 1) * (2**levels - 1)


def check_receptive_field(cfg: dict, max_len: int) -> str | None:
    """A problem message if a TCN side of `cfg` cannot see `max_len` positions, else None.

    The decoder must see its whole prefix and the encoder's (centered) window must span the
    whole sentence, so the receptive field must be at least `max_len`. Returns None when
    neither side of the model is a TCN.
    """
    families = {cfg.get("encoder") or cfg["arch"], cfg.get("decoder") or cfg["arch"]}
    if "tcn" not in families:
        return None
    k, levels = cfg["kernel_size"], cfg["levels"]
    rf = receptive_field(k, levels)
    if rf >= max_len:
        return None
    where = (
        f"model.levels: the TCN receptive field 1 + 2(k-1)(2^L - 1) = {rf} "
        f"(kernel_size {k}, levels {levels}) is shorter than the maximum length {max_len}"
    )
    if k == 1:
        return f"{where}; kernel_size 1 sees one position whatever the levels: use kernel_size >= 2"
    needed = levels
    while receptive_field(k, needed) < max_len:
        needed += 1
    return (
        f"{where}; use model.levels >= {needed} (receptive field "
        f"{receptive_field(k, needed)}) or a larger model.kernel_size"
    )


def _data_checks(d: DataConfig) -> list[str]:
    if d.min_len > d.max_len:
        return [f"data.min_len: must be <= data.max_len ({d.max_len}), found {d.min_len}"]
    return []


def _model_checks(m: ModelConfig) -> list[str]:
    problems = []
    if m.tie_embeddings and m.emb_dim != m.hidden and "gnmt" in (m.decoder or m.arch):
        problems.append(
            f"model.tie_embeddings: needs model.emb_dim == model.hidden, "
            f"found {m.emb_dim} and {m.hidden}"
        )
    if (m.decoder or m.arch) == "gnmt" and m.dec_layers < 2:
        problems.append(
            "model.dec_layers: the GNMT decoder needs >= 2 layers (attention feeds layers 2 "
            f"and up), found {m.dec_layers}"
        )
    if m.attention_blocks > m.levels and "tcn" in (m.decoder or m.arch):
        problems.append(
            f"model.attention_blocks: must be <= model.levels ({m.levels}), "
            f"found {m.attention_blocks}"
        )
    return problems


def _train_checks(t: TrainConfig) -> list[str]:
    problems = []
    if len(t.betas) != 2 or not all(isinstance(b, (int, float)) for b in t.betas):
        problems.append(f"train.betas: expected two numbers, found {t.betas!r}")
    if t.average_last and (not t.save_every or t.average_last > t.keep_last):
        problems.append(
            f"train.average_last: needs train.save_every > 0 and average_last <= train.keep_last "
            f"({t.keep_last}), found average_last {t.average_last}, save_every {t.save_every}"
        )
    return problems


def _search_checks(s: SearchConfig) -> list[str]:
    problems = []
    if s.n_best > s.beam_size:
        problems.append(
            f"search.n_best: must be <= search.beam_size ({s.beam_size}), found {s.n_best}"
        )
    if s.topp <= 0.0:
        problems.append(f"search.topp: must be in (0, 1], found {s.topp!r}")
    if s.temperature <= 0.0:
        problems.append(f"search.temperature: must be > 0, found {s.temperature!r}")
    if s.sampling != "none" and s.beam_size > 1:
        problems.append(
            f"search.sampling: {s.sampling} sampling draws one output per sentence and needs "
            f"search.beam_size 1 (--beam-size 1), found beam_size {s.beam_size}"
        )
    return problems


_SECTION_CHECKS = {
    "data": _data_checks,
    "tokenizer": lambda _: [],
    "model": _model_checks,
    "train": _train_checks,
    "search": _search_checks,
}


def check_section(section, name: str) -> list[str]:
    """Every problem of `section`, an instance of the section `name` (e.g. "search"), one message
    each: every field's type, choices and range (its `opt()` metadata), then, if those hold, the
    section's own cross checks (e.g. search.n_best <= search.beam_size). The one checker:
    `from_dict`, `override_section` and nmt.search.SearchSettings all use it. Fields a subclass
    adds (SearchSettings' special ids) are the subclass's to check."""
    cls = _SECTION_TYPES[name]
    if not isinstance(section, cls):
        raise TypeError(f"check_section: expected a {cls.__name__}, found {type(section).__name__}")
    problems = []
    for f in dataclasses.fields(cls):
        path = f"{name}.{f.name}"
        value, problem = _coerce(getattr(section, f.name), field_type(cls, f), path, strict=True)
        problem = problem or _check_field(f, value, path)
        if problem:
            problems.append(problem)
    return problems or _SECTION_CHECKS[name](section)


def override_section(section, name: str, changes: dict, source: str | None = None):
    """`section` (of the section `name`) with `changes` ({key: value}) applied and checked: one
    ConfigError listing every problem, unknown keys included. Per-call settings come from here
    (the Translator's search overrides)."""
    keys = [f.name for f in dataclasses.fields(_SECTION_TYPES[name])]
    problems = [
        f"{name}.{key}: unknown key{_did_you_mean(str(key), keys)}; the keys are {', '.join(keys)}"
        for key in changes
        if key not in keys
    ]
    section = dataclasses.replace(section, **{k: v for k, v in changes.items() if k in keys})
    problems += check_section(section, name)
    if problems:
        raise ConfigError(problems, source)
    return section


def load_time_keys(name: str = "search") -> tuple[str, ...]:
    """The fields of section `name` read once, when a model is loaded (`opt(load_time=True)`):
    a translator takes them at load time and refuses them per call."""
    return tuple(
        f.name for f in dataclasses.fields(_SECTION_TYPES[name]) if f.metadata["load_time"]
    )


def _cross_checks(cfg: Config) -> list[str]:
    """The checks that read more than one section."""
    rf_problem = check_receptive_field(dataclasses.asdict(cfg.model), cfg.data.max_len + 1)
    if rf_problem:
        return [rf_problem + " (data.max_len + 1 positions: pieces plus bos/eos)"]
    return []


def _read_section(name: str, values: dict) -> tuple[dict, list[str]]:
    """The known keys of one section as read from YAML, as their fields' types; the problems."""
    cls = _SECTION_TYPES[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    changes, problems = {}, []
    for key, value in values.items():
        path = f"{name}.{key}"
        if key not in fields:
            problems.append(f"{path}: unknown key{_did_you_mean(str(key), fields)}")
            continue
        value, problem = _coerce(value, field_type(cls, fields[key]), path)
        if problem:
            problems.append(problem)
        else:
            changes[key] = value
    return changes, problems


def from_dict(raw: dict, source: str | None = None, extra_problems=()) -> Config:
    """Build a Config from nested dicts, collecting every problem before raising once."""
    problems: list[str] = list(extra_problems)
    cfg = Config()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"expected a mapping of sections at the top level, found {type(raw).__name__}"], source
        )
    for section, values in raw.items():
        if section not in _SECTION_TYPES:
            problems.append(
                f"{section}: unknown section{_did_you_mean(str(section), SECTIONS)}"
                f"; sections are {', '.join(SECTIONS)}"
            )
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping, found {type(values).__name__}")
            continue
        changes, read_problems = _read_section(section, values)
        problems += read_problems
        setattr(cfg, section, dataclasses.replace(getattr(cfg, section), **changes))
    for section in _SECTION_TYPES:
        problems += check_section(getattr(cfg, section), section)
    if not problems:
        problems += _cross_checks(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def parse_overrides(overrides: list[str]) -> tuple[dict, list[str]]:
    """`section.key=value` strings to a nested dict; values are read as YAML scalars."""
    nested: dict = {}
    problems = []
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            problems.append(f"override {item!r}: expected section.key=value, e.g. train.lr=0.001")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        nested.setdefault(parts[0], {})[parts[1]] = value
    return nested, problems


def _merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for section, values in extra.items():
        if values is None and section in out:  # an empty section (`search:`) changes nothing
            continue
        if isinstance(out.get(section), dict) and isinstance(values, dict):
            out[section].update(values)
        else:
            out[section] = values
    return out


def _check_unique_keys(node: yaml.Node, path: str, seen_nodes: set) -> None:
    """Refuse a mapping that gives a key twice, naming the key and both lines (PyYAML would keep
    the last value silently). Merge keys (`<<`) are left to YAML: overriding them is their use."""
    if id(node) in seen_nodes:  # an alias: checked where its anchor stands
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_unique_keys(item, f"{path}[{i}]", seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    first_line: dict = {}
    for key_node, value_node in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        dotted = f"{path}.{key}" if path else str(key)
        if key is not None and key in first_line:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {dotted} (first given on line {first_line[key] + 1}; "
                f"YAML would keep only one value)",
                key_node.start_mark,
            )
        if key is not None:
            first_line[key] = key_node.start_mark.line
        _check_unique_keys(value_node, dotted, seen_nodes)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a mapping with the same key twice (`_check_unique_keys`)."""

    def construct_document(self, node):
        _check_unique_keys(node, "", set())
        return super().construct_document(node)


def read_yaml(path: str | Path) -> dict:
    """Read a YAML file; a syntax error or a key given twice names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: config file not found") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read config: {e.strerror}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader) or {}  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e)
        if "\t" in text and "tab" in str(e).lower():
            what += " (YAML does not allow tabs for indentation)"
        raise UsageError(f"{path}:{where}: invalid YAML: {what}") from None


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None
) -> Config:
    """Defaults, then `base` (nested sections, e.g. a checkpoint's config: what a fine-tuning
    run starts from), then the YAML file (if any), then `section.key=value` overrides."""
    raw = read_yaml(path) if path else {}
    extra, problems = parse_overrides(list(overrides))
    source = str(path) if path else None
    if not isinstance(raw, dict):
        raise ConfigError(
            [f"expected a mapping of sections at the top level, found {type(raw).__name__}"], source
        )
    return from_dict(_merge(_merge(base or {}, raw), extra), source, problems)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def defaults_yaml() -> str:
    """Every setting with its default and help, generated from the dataclasses."""
    lines = ["# nmt: every setting with its default. Generated by `nmt config --defaults`."]
    for section, cls in _SECTION_TYPES.items():
        lines.append("")
        lines.append(f"{section}:  # {cls.__doc__.strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            value = yaml.safe_dump(getattr(cls(), f.name), default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            help_text = f.metadata["help"]
            if f.metadata.get("choices"):
                help_text += (
                    f" [{'|'.join(repr(c) if c == '' else c for c in f.metadata['choices'])}]"
                )
            lines.append(f"  {f.name}: {value}  # {help_text}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- the server
# Not a section of Config: a server's settings are not part of a model's config or checkpoint.
@dataclass
class ServeConfig:
    """`nmt serve`: where it listens, how it batches requests, what a request may ask for."""

    host: str = opt("127.0.0.1", "address to listen on (0.0.0.0: every IPv4 interface)")
    port: int = opt(
        5000, "TCP port (0: any free port; the address is printed at start-up)", min=0, max=65535
    )
    max_batch_sentences: int = opt(
        64, "sentences gathered from concurrent requests into one search call", min=1
    )
    max_wait_ms: float = opt(
        10.0,
        "longest a request waits for others to share its search call when the model is idle",
        min=0.0,
    )
    max_request_bytes: int = opt(1_048_576, "largest request body (bytes); larger: 413", min=1)
    max_request_sentences: int = opt(1000, "most sentences in one request; more: 413", min=1)
    max_beam_size: int = opt(64, "largest beam_size a request may ask for; larger: 400", min=1)
    shutdown_timeout: float = opt(
        60.0,
        "on SIGTERM/SIGINT: seconds the requests in flight have to finish before they are "
        "cancelled",
        min=0.0,
    )


def check_fields(obj, name=lambda key: key) -> list[str]:
    """Every range or choice problem of dataclass `obj`'s fields; `name(key)` labels a field."""
    problems = []
    for f in dataclasses.fields(obj):
        problem = _check_field(f, getattr(obj, f.name), name(f.name))
        if problem:
            problems.append(problem)
    return problems
