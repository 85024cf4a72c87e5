"""What a training run records: `log.jsonl`, TensorBoard event files, and its lines on stderr.

Owns: the window of steps since the last log point (`Window`: their figures stay on the device
until one transfer), the JSONL records and the fields every record carries, the TensorBoard
scalars (`train.tensorboard`), and the log lines of rank 0. Does not own what is measured
(nmt.training, nmt.validation) or the progress bar (nmt.progress). Layer 0: imports torch and
nmt.errors only.

`log.jsonl` holds one JSON object per line, appended across resumes. Every record has `type`
(`train`, `valid`, `average`, `init`, `bad_step`, `error`), `step` (optimizer steps done),
`time` (unix seconds) and `train_seconds` (seconds of training, counted across resumes), so a
reader draws one continuous curve of a stopped and resumed run against steps or against time.
`train`: loss (label-smoothed, per target token), ppl, lr, grad_norm, tgt_tok_s,
src_tgt_tok_s (tokens per second of training: the time of validations and checkpoint writes in
the window is left out, so the figure does not depend on where they fall), epoch (1-based),
loss_scale (fp16). `valid`: loss, ppl, bleu (greedy), best,
seconds, epoch (epochs done). `average`: the same figures for `averaged.pt`, with `of`,
`best_before`, `became_best`. `init`: where a fine-tuned run's weights came from.
TensorBoard gets every number of the `train`, `valid` and `average` records as the scalar
`TYPE/KEY` at the record's step and time.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from nmt.errors import UsageError

TENSORBOARD_DIR = "tensorboard"  # under train.out_dir
SCALAR_TYPES = ("train", "valid", "average")


class Window:
    """The steps since the last log point.

    `add(step, result)` takes a step's result (`figures`: a (3,) device tensor of summed loss,
    summed NLL and gradient norm; `tgt_tokens`, `src_tokens`: counts of all ranks). The figures
    stay on the device until `drain`, which copies them all to the host in one transfer and
    folds the finite ones into the window's sums. Time spent inside `paused()` (validations,
    checkpoint writes) does not count towards the throughput. `clock` is for tests.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self._pausing = False
        self.pending: list[tuple[int, object]] = []
        self.reset()

    def reset(self) -> None:
        self.loss = self.nll = self.norm = 0.0  # this rank's sums over the good steps
        self.good_steps = self.good_tgt = 0  # good_tgt: target tokens of all ranks
        self.tgt = self.src = 0  # tokens of all ranks over every step, for the throughput
        self.time = self.clock()
        self.paused_seconds = 0.0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time of the `with` body out of the throughput (nested use counts once)."""
        if self._pausing:
            yield
            return
        self._pausing, start = True, self.clock()
        try:
            yield
        finally:
            self.paused_seconds += self.clock() - start
            self._pausing = False

    def add(self, step: int, result) -> None:
        self.pending.append((step, result))
        self.tgt += result.tgt_tokens
        self.src += result.src_tokens

    def drain(self) -> list[tuple[int, float, float]]:
        """(step, this rank's loss, gradient norm) of every pending step, oldest first."""
        if not self.pending:
            return []
        figures = torch.stack([r.figures for _, r in self.pending]).tolist()  # (n, 3): a sync
        out = []
        for (step, result), (loss, nll, norm) in zip(self.pending, figures):
            if math.isfinite(norm):
                self.loss, self.nll, self.norm = self.loss + loss, self.nll + nll, self.norm + norm
                self.good_steps += 1
                self.good_tgt += result.tgt_tokens
            out.append((step, loss, norm))
        self.pending = []
        return out

    def record(self, step: int, epoch: int, loss: float, nll: float, lr: float, scale) -> dict:
        """The window's `train` record, from the loss and NLL sums of every rank (`scale`: the
        fp16 loss scale, or None)."""
        elapsed = max(self.clock() - self.time - self.paused_seconds, 1e-9)
        tgt = max(self.good_tgt, 1)
        record = {
            "type": "train",
            "step": step,
            "epoch": epoch,
            "loss": loss / tgt,
            "ppl": math.exp(min(nll / tgt, 50)),
            "lr": lr,
            "grad_norm": self.norm / max(self.good_steps, 1),
            "tgt_tok_s": self.tgt / elapsed,
            "src_tgt_tok_s": (self.tgt + self.src) / elapsed,
        }
        if scale is not None:
            record["loss_scale"] = scale
        return record


def check_tensorboard() -> None:
    """Fail now, before any training, when TensorBoard is asked for and not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError(
            "train.tensorboard=true needs the tensorboard package: "
            "pip install 'nmt[tensorboard]' (or pip install tensorboard)"
        ) from None


class RunLog:
    """The record of one run in `folder` (None: a rank other than 0, which records nothing).

    Use it as a context manager around the run: it opens `log.jsonl` for appending (and the
    TensorBoard writer) on entry and closes them on exit. `seconds()` gives the training seconds
    so far, written into every record.
    """

    def __init__(
        self, folder: Path | None, seconds: Callable[[], float], tensorboard: bool = False
    ):
        self.folder, self.seconds, self.tensorboard = folder, seconds, tensorboard
        self.main = folder is not None
        self._file = None
        self._writer = None

    def __enter__(self) -> RunLog:
        if self.main:
            self._file = open(self.folder / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
            if self.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(str(self.folder / TENSORBOARD_DIR))
        return self

    def __exit__(self, *exc) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None

    def write(self, record: dict) -> None:
        """Append `record` (with `time` and `train_seconds`) to log.jsonl and TensorBoard."""
        if self._file is None:
            return
        record = {**record, "time": round(time.time(), 3), "train_seconds": self.seconds()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None and record["type"] in SCALAR_TYPES:
            self._scalars(record)

    def _scalars(self, record: dict) -> None:
        for key, value in record.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and key not in ("step", "time"):
                self._writer.add_scalar(
                    f"{record['type']}/{key}", value, record["step"], walltime=record["time"]
                )
        self._writer.flush()

    def say(self, msg: str) -> None:
        """A log line on stderr (rank 0 only)."""
        if self.main:
            print(msg, file=sys.stderr, flush=True)

    def say_record(self, prefix: str, record: dict, suffix: str = "") -> None:
        """`record` but its type as one line of `key=value` (floats to 4 significant digits)."""
        fields = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()]
        self.say(" ".join([prefix, *(f for f in fields if not f.startswith("type="))]) + suffix)
