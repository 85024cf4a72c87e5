"""Test helper, not a test: `python tests/slow_writes.py ARGS` runs `nmt ARGS` with every
checkpoint write held open for a moment after its temporary file is written and before it is
renamed, announced on stderr by a line starting with `PAUSED_WRITE`, so that a test can kill the
process in the middle of a write (tests/test_reliability.py). Nothing else changes: the same
bytes are written, the same code renames them.
"""

import sys
import time

import torch

from nmt.cli import main

PAUSE_SECONDS = 0.3
_save = torch.save


def _paused_save(obj, f, *args, **kwargs):
    _save(obj, f, *args, **kwargs)
    if hasattr(f, "fileno"):  # an open file: the temporary file of an atomic checkpoint write
        f.flush()
        print("PAUSED_WRITE before the rename", file=sys.stderr, flush=True)
        time.sleep(PAUSE_SECONDS)


torch.save = _paused_save
sys.exit(main(sys.argv[1:]))
