"""Error types shared by every layer, and the one place they become exit codes (layer -1:
imports nothing from nmt).

A user mistake (bad config, bad file, bad flag) is a `UsageError`: the command prints its message
alone, with no traceback, and exits with code 2. Anything else the toolkit detects at run time
(a diverging run, a full disk, a failed download) is an `NmtError` and exits with code 1.
`exit_code` is that rule for every entry point: the `nmt` command, the recipes, the data scripts.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class NmtError(Exception):
    """A runtime failure with a message meant for the user. Exit code 1."""

    exit_code = 1


class UsageError(NmtError):
    """A user mistake: bad flag, config, file or checkpoint. Exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more config problems; the message lists every one of them."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        head = (
            f"{len(self.problems)} config problem{'s' if len(self.problems) != 1 else ''}{where}:"
        )
        super().__init__("\n".join([head, *(f"  - {p}" for p in self.problems)]))


class DataError(UsageError):
    """A bad input file of the user's: names the file and, where it applies, the line."""


class DownloadError(NmtError):
    """A download whose source failed: a file missing there (HTTP 404, absent from NMT_MIRROR),
    a checksum mismatch, a corrupt archive. Not the user's mistake: exit code 1."""


def exit_code(run: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run a command's body, `run()`, and return the process's exit code.

    The body's own code (None = 0); for an NmtError its message as one `error:` line on stderr
    (no traceback) and its `exit_code`; for Ctrl-C the line `interrupted` and 130; for a closed
    stdout (`nmt translate ... | head`) 0.
    """
    try:
        return run() or 0
    except NmtError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
