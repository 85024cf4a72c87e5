"""Progress display for long work: a rich bar on a terminal, plain log lines otherwise.

Owns: presentation only (stderr). Layer 0: imports rich, nothing from nmt.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress


def _fmt(record: dict) -> str:
    parts = []
    for key, value in record.items():
        if key == "type":
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


class Progress:
    """`update(step, lr)` after each step, `log(record)` at logging points; `show=False`: nothing
    (ranks other than 0)."""

    def __init__(self, total: int, initial: int = 0, stream=None, show: bool = True):
        self.stream = stream or sys.stderr
        self.total = total or None
        self.show = show
        self.fancy = show and self.stream.isatty()
        self._bar = None
        if self.fancy:
            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._task = self._bar.add_task("train", total=self.total, completed=initial, info="")

    def __enter__(self):
        if self._bar:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar:
            self._bar.__exit__(*exc)

    def update(self, step: int, lr: float) -> None:
        if self._bar:
            self._bar.update(self._task, completed=step)

    def log(self, record: dict) -> None:
        if self._bar:
            info = f"loss {record['loss']:.3f} ppl {record['ppl']:.1f} "
            info += f"{record['tgt_tok_s']:.0f} tgt tok/s lr {record['lr']:.2e}"
            self._bar.update(self._task, info=info)
        elif self.show:
            print(_fmt(record), file=self.stream, flush=True)
