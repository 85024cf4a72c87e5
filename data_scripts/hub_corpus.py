"""Write a translation dataset of the Hugging Face hub as line-aligned plain text files.

    python data_scripts/hub_corpus.py wmt16 --langs en de --splits train --out data/wmt16
    python data_scripts/hub_corpus.py iwslt14 --langs de en --splits train validation

The corpora are those of nmt.corpora.HUB_CORPORA (wmt16, wmt14, iwslt14). Needs internet access
(the hub is not mirrored). Streams each split into <out>/<split>.<lang> (line i = row i, written
under a temporary name and renamed when complete) and prints one path per line on stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nmt.corpora import HUB_CORPORA
from nmt.errors import exit_code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name", help=f"hub corpus: {', '.join(sorted(HUB_CORPORA))}")
    p.add_argument("--langs", nargs=2, default=["en", "de"], metavar=("SRC", "TGT"))
    p.add_argument("--splits", nargs="+", default=["train"], help="default: train")
    p.add_argument("--out", help="output folder (default: data/NAME)")
    args = p.parse_args(argv)
    return exit_code(lambda: _export(args))


def _export(args) -> None:
    from nmt.data import export_hub_split

    out = Path(args.out or f"data/{args.name}")
    for split in args.splits:
        paths = [out / f"{split}.{lang}" for lang in args.langs]
        export_hub_split(args.name, split, *args.langs, *paths)
        print(*paths, sep="\n")


if __name__ == "__main__":
    sys.exit(main())
