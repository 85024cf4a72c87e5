"""Download the WMT news test sets (newstest2008-2020, checksummed, idempotent).

    python data_scripts/wmt_testsets.py --langs en de --out data/wmt --splits newstest2014
    NMT_MIRROR=../shared/corpora python data_scripts/wmt_testsets.py   # offline, from the mirror

The language order is the direction: from 2019 on the test sets differ by direction, so
`--langs en de` reads the OPUS-MT `en-de` folder. Writes <out>/<src>-<tgt>/<name>.<lang> for
every test set (or --splits) and prints one path per line on stdout.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "multi30k_script", Path(__file__).with_name("multi30k.py")
)
_multi30k = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_multi30k)


def main(argv: list[str] | None = None) -> int:
    """The same entry point as data_scripts/multi30k.py, for the `wmt` corpus."""
    return _multi30k.main(argv, corpus="wmt", out="data/wmt", langs=("en", "de"))


if __name__ == "__main__":
    sys.exit(main())
