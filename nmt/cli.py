"""The `nmt` command: one entry point, a small function per subcommand.

Owns: argument parsing and exit codes only; every subcommand calls one function of a lower
layer. A user mistake prints one `error:` line (no traceback) and exits 2; a runtime failure
exits 1; an interrupt exits 130 (SIGTERM: 143). Results go to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from nmt import __version__
from nmt.errors import NmtError, UsageError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors: exit 2, as ours
        self.print_usage(sys.stderr)
        self.exit(2, f"error: {message}\n")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")


def _load_config(args):
    from nmt import config

    overrides = list(args.overrides)
    path = args.config
    if path and "=" in path and not path.endswith((".yaml", ".yml")):
        overrides.insert(0, path)
        path = None
    return config.load_config(path, overrides)


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


def cmd_prepare(args) -> int:
    from nmt import data

    cfg = _load_config(args)
    print(data.prepare(cfg))
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


def _search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--beam-size", type=int, help="beam size (1 = greedy; default from checkpoint)")
    p.add_argument("--alpha", type=float, help="length penalty ((5+|Y|)/6)^alpha")
    p.add_argument("--beta", type=float, help="coverage penalty weight")
    p.add_argument("--batch-size", type=int, help="sentences per decoding batch")
    p.add_argument("--max-len-a", type=float, help="max output length = a * source length + b")
    p.add_argument("--max-len-b", type=int, help="max output length = a * source length + b")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _search_kwargs(args) -> dict:
    keys = ("beam_size", "alpha", "beta", "batch_size", "max_len_a", "max_len_b")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def cmd_translate(args) -> int:
    from nmt.translator import Translator, translate_stream

    translator = Translator.from_checkpoint(args.checkpoint, device=args.device)
    translate_stream(
        translator, args.input, args.output, n_best=args.n_best, **_search_kwargs(args)
    )
    return 0


def cmd_evaluate(args) -> int:
    from nmt import evaluation

    if not args.testset and not (args.src and args.ref):
        raise UsageError("evaluate: give --testset NAME, or --src FILE and --ref FILE")
    result = evaluation.evaluate(
        args.checkpoint,
        args.src,
        args.ref or [],
        args.testset,
        hyp_out=args.output,
        lowercase=args.lowercase,
        tokenize=args.tokenize,
        device=args.device,
        **_search_kwargs(args),
    )
    print(json.dumps(result) if args.json else evaluation.format_report(result))
    return 0


def cmd_score(args) -> int:
    from nmt import evaluation

    result = evaluation.score_files(
        args.hyp, args.ref, lowercase=args.lowercase, tokenize=args.tokenize
    )
    print(json.dumps(result) if args.json else evaluation.format_report(result))
    return 0


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
    parser = _Parser(prog="nmt", description="Neural machine translation: GNMT and TCN models.")
    parser.add_argument("--version", action="version", version=f"nmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("download", help="download a public corpus (NMT_MIRROR for a local copy)")
    p.add_argument("name", help="corpus name, e.g. multi30k or wmt")
    p.add_argument("--langs", nargs="+", required=True, help="languages, e.g. en de")
    p.add_argument("--out", required=True, help="output folder for the plain-text files")
    p.add_argument("--splits", nargs="+", help="splits to fetch (default: all)")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("config", help="validate and print a resolved config")
    _config_args(p)
    p.add_argument("--defaults", action="store_true", help="print every setting with its help")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare", help="learn sentencepiece and encode train/valid into datasets")
    _config_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train a model")
    _train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("translate", help="translate a file or stdin, one line in, one line out")
    p.add_argument("checkpoint", help="checkpoint file (e.g. runs/model/best.pt)")
    p.add_argument("-i", "--input", help="input file (default: stdin)")
    p.add_argument("-o", "--output", help="output file, written atomically (default: stdout)")
    p.add_argument("--n-best", type=int, default=1, help="hypotheses per line (<= beam size)")
    _search_args(p)
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("evaluate", help="translate a test set and print BLEU and chrF")
    p.add_argument("checkpoint", help="checkpoint file")
    p.add_argument("--src", help="source file")
    p.add_argument("--ref", action="append", help="reference file (repeat for several)")
    p.add_argument("--testset", help="test set by name, e.g. multi30k:test_2016_flickr")
    p.add_argument("-o", "--output", help="also write the translations here")
    _search_args(p)
    _score_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("average", help="average the weights of checkpoints into one file")
    p.add_argument("checkpoints", nargs="+", help="checkpoint files, or a run folder with --last")
    p.add_argument("--last", type=int, help="the run folder's last N numbered checkpoints")
    p.add_argument("-o", "--output", required=True, help="averaged checkpoint (written atomically)")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("score", help="score an existing hypothesis file (no model)")
    p.add_argument("hyp", help="hypothesis file")
    p.add_argument("--ref", action="append", required=True, help="reference file (repeatable)")
    _score_args(p)
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NmtError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `nmt translate ... | head`
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
