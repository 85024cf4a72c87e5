"""Error types shared by every layer (layer 0: imports nothing from nmt).

A user mistake (bad config, bad file, bad flag) is a `UsageError`: the CLI prints its message
alone, with no traceback, and exits with code 2. Anything else the toolkit detects at run time
(a diverging run, a full disk) is an `NmtError` and exits with code 1.
"""


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
    """A bad input file: names the file and, where it applies, the line."""
