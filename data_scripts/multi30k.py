"""Download Multi30k task 1 (checksummed, idempotent) into a folder of plain-text files.

    python data_scripts/multi30k.py --langs en de --out data/multi30k
    NMT_MIRROR=../shared/corpora python data_scripts/multi30k.py   # offline, from the mirror

Writes <out>/<split>.<lang> for train, val, test_2016_flickr, test_2017_flickr and
test_2017_mscoco (or --splits), and prints one path per line on stdout.
"""

from __future__ import annotations

import argparse
import sys

from nmt.corpora import download, get_corpus
from nmt.errors import exit_code


def main(
    argv: list[str] | None = None,
    corpus: str = "multi30k",
    out: str = "data/multi30k",
    langs: tuple[str, ...] = ("en", "de"),
) -> int:
    spec = get_corpus(corpus)
    parser = argparse.ArgumentParser(description=f"Download {spec.description or corpus}.")
    parser.add_argument(
        "--langs",
        nargs="+",
        default=list(langs),
        help=f"languages, source first (default: {' '.join(langs)})",
    )
    parser.add_argument("--out", default=out, help=f"output folder (default: {out})")
    parser.add_argument(
        "--splits",
        nargs="+",
        default=None,
        help="splits to fetch (default: the corpus's standard splits)",
    )
    parser.add_argument("--retries", type=int, default=3, help="tries per file (default: 3)")
    parser.add_argument("--timeout", type=float, default=30, help="seconds (default: 30)")
    args = parser.parse_args(argv)
    return exit_code(lambda: _download(corpus, args))


def _download(corpus: str, args) -> None:
    files = download(
        corpus, args.langs, args.out, splits=args.splits, retries=args.retries, timeout=args.timeout
    )
    for by_lang in files.values():
        for path in by_lang.values():
            print(path)


if __name__ == "__main__":
    sys.exit(main())
