"""The `nmt` command: one entry point, a small function per subcommand.

Owns: argument parsing and exit codes only; every subcommand calls one function of a lower
layer. A user mistake prints one `error:` line (no traceback) and exits 2; a runtime failure
exits 1; an interrupt exits 130 (SIGTERM: 143). Results go to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

from nmt import __version__
from nmt.errors import UsageError, exit_code

_OVERRIDE = re.compile(r"[A-Za-z_]\w*\.[A-Za-z_]\w*=")


class Parser(argparse.ArgumentParser):
    """argparse, with its usage errors exiting 2 as ours do, and, in a parser given
    `add_overrides`, `section.key=value` arguments taken in any position: they are pulled out
    before parsing, so that an option taking a value or a list (`--beam-sizes 1 5`) does not
    swallow them and one standing after an option is not refused."""

    takes_overrides = False

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")

    def parse_known_args(self, args=None, namespace=None):
        if not self.takes_overrides:
            return super().parse_known_args(args, namespace)
        args = sys.argv[1:] if args is None else list(args)
        overrides = [a for a in args if _OVERRIDE.match(a)]
        rest = [a for a in args if not _OVERRIDE.match(a)]
        parsed, extra = super().parse_known_args(rest, namespace)
        parsed.overrides = [*overrides, *parsed.overrides]  # malformed ones too: config names them
        return parsed, extra


def add_overrides(p: Parser) -> None:
    """The `section.key=value` config overrides, in any position (see `Parser`)."""
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    p.takes_overrides = True


def _config_args(p: Parser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    add_overrides(p)


def _load_config(args):
    from nmt import config

    overrides = list(args.overrides)
    path = args.config
    if path and "=" in path and not path.endswith((".yaml", ".yml")):
        overrides.insert(0, path)
        path = None
    return config.load_config(path, overrides)


def _download_args(p: Parser) -> None:
    p.add_argument("name", help="corpus name, e.g. multi30k or wmt")
    p.add_argument("--langs", nargs="+", required=True, help="languages, e.g. en de")
    p.add_argument("--out", required=True, help="output folder for the plain-text files")
    p.add_argument("--splits", nargs="+", help="splits to fetch (default: all)")


def cmd_download(args) -> int:
    from nmt import corpora

    files = corpora.download(args.name, args.langs, args.out, splits=args.splits)
    for split, by_lang in files.items():
        for lang, path in by_lang.items():
            print(f"{split}\t{lang}\t{path}")
    return 0


def cmd_config(args) -> int:
    from nmt import config

    if args.defaults:
        sys.stdout.write(config.defaults_yaml())
        return 0
    sys.stdout.write(config.to_yaml(_load_config(args)))
    return 0


def _prepare_args(p: Parser) -> None:
    _config_args(p)
    p.add_argument(
        "--tokenizer-from",
        metavar="CKPT",
        help="encode with this checkpoint's sentencepiece model, written into data.dir byte for "
        "byte (nothing learned): data to fine-tune that checkpoint on",
    )


def cmd_prepare(args) -> int:
    from nmt import data

    cfg = _load_config(args)
    if not args.tokenizer_from:
        print(data.prepare(cfg))
        return 0
    from nmt import checkpoint

    tokenizer = checkpoint.load_tokenizer(args.tokenizer_from)
    origin = str(Path(args.tokenizer_from).resolve())
    print(data.prepare(cfg, tokenizer, tokenizer_origin=origin))
    return 0


def cmd_train(args) -> int:
    from nmt import training

    cfg = _load_config(args)
    summary = training.train(cfg, args.resume, args.reset_optimizer, init_from=args.init_from)
    if summary["rank"] == 0:  # one summary for a torchrun launch
        print(json.dumps(summary))
    return summary["stop"].exit_code  # a signal: the shell's 128 + signal number (130, 143)


def _train_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from train.out_dir/last.pt")
    p.add_argument(
        "--reset-optimizer",
        action="store_true",
        help="with --resume: fresh optimizer and schedule state (e.g. a new lr)",
    )
    p.add_argument(
        "--init-from",
        metavar="CKPT",
        help="start a new run (new optimizer, step 0) from this checkpoint's weights; data.dir "
        "must hold its tokenizer (nmt prepare ... --tokenizer-from CKPT)",
    )


_CALL_OWN = ("n_best",)  # search keys with a flag of their own (`nmt translate --n-best`)


def _search_keys() -> list:
    """The search settings that get a generated flag: every nmt.config.SearchConfig field."""
    from nmt import config

    return [f for f in dataclasses.fields(config.SearchConfig) if f.name not in _CALL_OWN]


def _search_args(p: argparse.ArgumentParser, only: tuple = ()) -> None:
    """A flag per search setting (those named in `only`, if given), generated from its config
    field as `nmt config --defaults` is: --beam-size for beam_size, the field's type (bool:
    --x/--no-x), help and choices; unset (None) keeps the checkpoint's value."""
    from nmt import config

    for f in _search_keys():
        if only and f.name not in only:
            continue
        kind = config.field_type(config.SearchConfig, f)
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: the checkpoint's search.{f.name})"
        kw = {"default": None, "help": help_text.replace("%", "%%")}
        if kind is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif kind in (int, float, str):
            p.add_argument(flag, type=kind, choices=f.metadata["choices"], **kw)
        else:  # a new field of a type the command line cannot take: fail at once, not later
            raise TypeError(f"search.{f.name}: no command-line flag for type {kind}")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _search_kwargs(args) -> dict:
    """The search settings given on the command line, {key: value}, load-time ones included
    (`_load_kwargs` splits them off)."""
    values = {f.name: getattr(args, f.name, None) for f in _search_keys()}
    return {k: v for k, v in values.items() if v is not None}


def _load_kwargs(kwargs: dict) -> dict:
    """Take the load-time settings (search.dtype, search.threads) out of `kwargs`: they go to
    `Translator.from_checkpoint`, the rest to each call."""
    from nmt.config import load_time_keys

    return {k: kwargs.pop(k) for k in load_time_keys() if k in kwargs}


def _load_time_args(p: argparse.ArgumentParser) -> None:
    """The load-time search flags alone (--dtype, --threads), generated as `_search_args`'."""
    from nmt import config

    for f in dataclasses.fields(config.SearchConfig):
        if f.metadata["load_time"]:
            kind = config.field_type(config.SearchConfig, f)
            help_text = f"{f.metadata['help']} (default: the checkpoint's search.{f.name})"
            flag = "--" + f.name.replace("_", "-")
            p.add_argument(flag, type=kind, choices=f.metadata["choices"], help=help_text)


def _print_precision(translator) -> None:
    print(f"precision: {translator.precision_note}", file=sys.stderr, flush=True)


def _add_translate(sub) -> None:
    p = sub.add_parser("translate", help="translate a file or stdin, one line in, one line out")
    p.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="checkpoint file (e.g. runs/model/best.pt); several: an ensemble",
    )
    p.add_argument("-i", "--input", help="input file (default: stdin)")
    p.add_argument("-o", "--output", help="output file, written atomically (default: stdout)")
    p.add_argument("--n-best", type=int, default=1, help="hypotheses per line (<= beam size)")
    p.add_argument(
        "--alignments",
        action="store_true",
        help="write 'TRANSLATION ||| ALIGNMENT' lines: word alignments, Pharaoh i-j pairs",
    )
    p.add_argument(
        "--alignments-out",
        metavar="FILE",
        help="write the alignments to FILE, line for line, and the translations as usual",
    )
    _search_args(p)
    p.set_defaults(func=cmd_translate)


def cmd_translate(args) -> int:
    from nmt.translator import Translator, translate_stream

    kwargs = _search_kwargs(args)
    translator = Translator.from_checkpoints(
        args.checkpoints, device=args.device, **_load_kwargs(kwargs)
    )
    translator.search_settings(args.n_best, **kwargs)  # a bad setting: its error comes first
    _print_precision(translator)
    translate_stream(
        translator,
        args.input,
        args.output,
        n_best=args.n_best,
        alignments=args.alignments,
        alignments_out=args.alignments_out,
        **kwargs,
    )
    return 0


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="pictures: learning curves, attention")
    plots = p.add_subparsers(dest="picture", metavar="PICTURE", parser_class=Parser)
    plots.required = True
    q = plots.add_parser("curves", help="learning curves of a run (or of several) from log.jsonl")
    q.add_argument("run_dir", help="training folder (log.jsonl), recipe run folder, or parent")
    q.add_argument("-o", "--output", help="PNG file (default: RUN_DIR/curves.png)")
    q.set_defaults(func=cmd_plot_curves)
    q = plots.add_parser("attention", help="attention of a translation over its pieces")
    q.add_argument("checkpoint", help="checkpoint file")
    q.add_argument("sentence", nargs="?", help="the sentence to translate (or -i and --line)")
    q.add_argument("-i", "--input", help="a file to take the sentence from (with --line)")
    q.add_argument("--line", type=int, help="1-based line number of the sentence in --input")
    q.add_argument("-o", "--output", default="attention.png", help="PNG file (%(default)s)")
    _search_args(q)
    q.set_defaults(func=cmd_plot_attention)


def cmd_plot_curves(args) -> int:
    from nmt import plots

    print(plots.curves(args.run_dir, args.output))
    return 0


def cmd_plot_attention(args) -> int:
    from nmt import plots

    text = plots.attention_line(args.sentence, args.input, args.line)
    kwargs = _search_kwargs(args)
    print(plots.attention(args.checkpoint, text, args.output, device=args.device, **kwargs))
    return 0


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="translate a test set and print BLEU and chrF")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file(s)")
    p.add_argument("--src", help="source file")
    p.add_argument("--ref", action="append", help="reference file (repeat for several)")
    p.add_argument("--testset", help="test set by name, e.g. multi30k:test_2016_flickr")
    p.add_argument("-o", "--output", help="also write the translations here")
    _search_args(p)
    _score_args(p)
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args) -> int:
    from nmt import evaluation

    if not args.testset and not (args.src and args.ref):
        raise UsageError("evaluate: give --testset NAME, or --src FILE and --ref FILE")
    result = evaluation.evaluate(
        args.checkpoints,
        args.src,
        args.ref or [],
        args.testset,
        hyp_out=args.output,
        lowercase=args.lowercase,
        tokenize=args.tokenize,
        device=args.device,
        **_search_kwargs(args),
    )
    print(f"precision: {result['precision_note']}", file=sys.stderr, flush=True)
    print(json.dumps(result) if args.json else evaluation.format_report(result))
    return 0


def cmd_score(args) -> int:
    from nmt import evaluation

    result = evaluation.score_files(
        args.hyp, args.ref, lowercase=args.lowercase, tokenize=args.tokenize
    )
    print(json.dumps(result) if args.json else evaluation.format_report(result))
    return 0


def _add_score_pairs(sub) -> None:
    help_text = "the log-probability of given translations (forced decoding), one line per pair"
    p = sub.add_parser("score-pairs", help=help_text)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file(s)")
    p.add_argument("--src", required=True, help="source file")
    p.add_argument("--tgt", required=True, help="target file, line-aligned with --src")
    p.add_argument("-o", "--output", help="output file, written atomically (default: stdout)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _search_args(p, only=("batch_size", "max_src_len"))
    p.set_defaults(func=cmd_score_pairs)


def cmd_score_pairs(args) -> int:
    from nmt import evaluation

    evaluation.score_pairs(
        args.checkpoints,
        args.src,
        args.tgt,
        args.output,
        as_json=args.json,
        device=args.device,
        **_search_kwargs(args),
    )
    return 0


def _add_average(sub) -> None:
    p = sub.add_parser("average", help="average the weights of checkpoints into one file")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files, or a run folder with --last")
    p.add_argument("--last", type=int, help="the run folder's last N numbered checkpoints")
    p.add_argument("-o", "--output", required=True, help="averaged checkpoint (written atomically)")
    p.set_defaults(func=cmd_average)


def cmd_average(args) -> int:
    from pathlib import Path

    from nmt import checkpoint

    paths = [Path(p) for p in args.checkpoints]
    if args.last is not None:
        if args.last < 1:
            raise UsageError(f"average --last: expected a number >= 1, found {args.last}")
        if len(paths) != 1 or not paths[0].is_dir():
            raise UsageError("average --last N: give one run folder (e.g. runs/model)")
        found = checkpoint.numbered(paths[0])
        if len(found) < args.last:
            raise UsageError(
                f"{paths[0]}: {len(found)} numbered checkpoints (step_N.pt), --last asks for "
                f"{args.last}: train with train.save_every and train.keep_last >= {args.last}"
            )
        paths = found[-args.last :]
    averaged = checkpoint.average(paths)
    checkpoint.atomic_torch_save(averaged, args.output)
    print(f"averaged {len(paths)} checkpoints into {args.output}: " + " ".join(map(str, paths)))
    return 0


def _add_serve(sub) -> None:
    import dataclasses

    from nmt.config import ServeConfig

    help_text = "translation server: JSON over HTTP, concurrent requests batched"
    p = sub.add_parser("serve", help=help_text)
    p.set_defaults(func=cmd_serve)
    p.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoint file(s)")
    for f in dataclasses.fields(ServeConfig):  # the defaults and help live in the config field
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(f.type), str)
        help_text = f"{f.metadata['help']} (default: {f.default})"
        p.add_argument(flag, type=kind, default=f.default, help=help_text)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _load_time_args(p)


def cmd_serve(args) -> int:
    import dataclasses

    from nmt import serve
    from nmt.config import ServeConfig, check_fields

    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    problems = check_fields(cfg, name=lambda key: "--" + key.replace("_", "-"))
    if problems:
        raise UsageError("; ".join(problems))
    return serve.serve(args.checkpoints, cfg, args.device, args.dtype, args.threads)


def _add_shortlist(sub) -> None:
    p = sub.add_parser(
        "shortlist",
        help="learn the vocabulary shortlist table (search.shortlist) into a checkpoint",
    )
    p.set_defaults(func=cmd_shortlist)
    p.add_argument("checkpoint", help="checkpoint file")
    p.add_argument("--data-dir", help="a prepared data folder with the checkpoint's tokenizer")
    p.add_argument("--src", help="or: a source text file (encoded with the checkpoint's pieces)")
    p.add_argument("--tgt", help="and its line-aligned target text file")
    p.add_argument("-o", "--output", required=True, help="checkpoint written (atomically)")


def cmd_shortlist(args) -> int:
    from nmt import shortlist

    if bool(args.data_dir) == bool(args.src or args.tgt) or bool(args.src) != bool(args.tgt):
        raise UsageError("shortlist: give --data-dir DIR, or --src FILE and --tgt FILE")
    info = shortlist.add_to_checkpoint(
        args.checkpoint, args.output, data_dir=args.data_dir, src=args.src, tgt=args.tgt
    )
    print(
        f"shortlist learned from {info['pairs']} pairs ({info['table_width']} target pieces "
        f"per source piece) -> {args.output}"
    )
    return 0


def _score_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lowercase", action="store_true", help="case-insensitive BLEU (-lc)")
    p.add_argument(
        "--tokenize",
        default="13a",
        choices=("13a", "intl", "none", "char"),
        help="sacreBLEU tokenizer (GNMT/MLPerf quote -lc -tok intl)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nmt", description="Neural machine translation: GNMT and TCN models.")
    parser.add_argument("--version", action="version", version=f"nmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    p = sub.add_parser("download", help="download a public corpus (NMT_MIRROR for a local copy)")
    _download_args(p)
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("config", help="validate and print a resolved config")
    _config_args(p)
    p.add_argument("--defaults", action="store_true", help="print every setting with its help")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare", help="learn sentencepiece and encode train/valid into datasets")
    _prepare_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    _add_translate(sub)
    _add_evaluate(sub)
    _add_score_pairs(sub)

    _add_average(sub)
    p = sub.add_parser("score", help="score an existing hypothesis file (no model)")
    p.add_argument("hyp", help="hypothesis file")
    p.add_argument("--ref", action="append", required=True, help="reference file (repeatable)")
    _score_args(p)
    p.set_defaults(func=cmd_score)

    _add_serve(sub)
    _add_plot(sub)
    _add_shortlist(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(lambda: args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
