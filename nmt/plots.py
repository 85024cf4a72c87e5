"""Pictures: learning curves from training logs, and the attention of a translation (layer 6.5).

Owns: finding the runs under a folder, reading their `log.jsonl` into continuous series, and
drawing both kinds of picture with matplotlib (its object API and the Agg canvas: no display,
no global pyplot state), each written atomically as a PNG. Does not own the log format
(nmt.training writes it), the attention (nmt.translator, `return_attention`) or alignments.

Learning curves (`curves`, `nmt plot curves RUN_DIR`): four panels, training loss and validation
loss against steps and against training time, validation BLEU (the `averaged.pt` validation as
a star), and the learning rate. One curve per run: RUN_DIR is a training folder (`log.jsonl`),
a recipe's run folder (`model/log.jsonl`), or a folder holding several of either, labelled by
their folder names. A resumed run is one curve: when a resumed process logs a step again (it
restarted from an earlier checkpoint), its records replace the earlier ones from that step on;
training time is the log's `train_seconds` (counted across resumes) when every record has it,
else it is rebuilt from the `time` stamps, a pause between two records (the run was stopped)
counting as the time the steps between them took at the run's median pace.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from nmt.errors import UsageError
from nmt.textio import open_output, read_lines

LOG = "log.jsonl"
PAUSE_FACTOR, PAUSE_SLACK = 2.0, 60.0  # a gap over 2 x expected + 60 s is a pause (a resume)
MAX_INCHES = 40.0  # the attention picture of a very long sentence stays this size at most


@dataclass
class Run:
    """One run's records, steps increasing within each type; each has "wall" (seconds)."""

    label: str
    path: Path
    train: list[dict] = field(default_factory=list)
    valid: list[dict] = field(default_factory=list)
    average: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------- reading logs
def find_logs(path: str | Path) -> list[tuple[str, Path]]:
    """(label, log file) of each run under `path` (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return [(path.parent.name, path)]
    if not path.is_dir():
        raise UsageError(f"{path}: no such folder (expected a run folder holding {LOG})")
    for own in (path / LOG, path / "model" / LOG):
        if own.is_file():
            return [(path.name, own)]
    found = []
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        for log in (sub / LOG, sub / "model" / LOG):
            if log.is_file():
                found.append((sub.name, log))
                break
    if not found:
        raise UsageError(
            f"{path}: no {LOG} found (looked in it, in {path / 'model'} and in its sub-folders)"
        )
    return found


def read_run(label: str, log: Path) -> Run:
    """The records of `log` as one continuous run (see the module docstring)."""
    records = _records(log)
    if not any(r["type"] == "train" for r in records):
        raise UsageError(f"{log}: no training records yet (the first comes after train.log_every)")
    if all(isinstance(r.get("train_seconds"), (int, float)) for r in records):
        for r in records:
            r["wall"] = float(r["train_seconds"])
    else:
        _wall_from_time(records)
    run = Run(label, log)
    for r in records:
        series = getattr(run, r["type"], None)
        if not isinstance(series, list):
            continue  # bad_step, error, init: not drawn
        while series and series[-1]["step"] >= r["step"]:
            series.pop()  # logged again after a resume from an earlier checkpoint
        series.append(r)
    return run


def _records(log: Path) -> list[dict]:
    """The JSON records of `log` that have a type and a step; other lines are skipped with one
    warning (a run killed while writing leaves a cut line)."""
    records, bad = [], []
    for lineno, line in enumerate(read_lines(log), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and _is_number(record.get("step")) and "type" in record:
            records.append(record)
        else:
            bad.append(lineno)
    if bad:
        lines = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        print(f"warning: {log}: skipped {len(bad)} unreadable line(s): {lines}", file=sys.stderr)
    return records


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _wall_from_time(records: list[dict]) -> None:
    """Set each record's "wall" from the `time` stamps, pauses left out."""
    train = [r for r in records if r["type"] == "train" and _is_number(r.get("time"))]
    paces = [
        (b["time"] - a["time"]) / (b["step"] - a["step"])
        for a, b in zip(train, train[1:])
        if b["step"] > a["step"] and b["time"] >= a["time"]
    ]
    pace = statistics.median(paces) if paces else 0.0  # seconds per step
    wall, prev = 0.0, None
    for r in records:
        if not _is_number(r.get("time")):
            r["wall"] = wall
            continue
        if prev is None:
            wall = pace * r["step"]  # the steps before the first record
        else:
            steps = max(r["step"] - prev["step"], 0)
            expected = steps * pace + float(r.get("seconds", 0.0) or 0.0)
            gap = r["time"] - prev["time"]
            paused = r["step"] < prev["step"] or gap > PAUSE_FACTOR * expected + PAUSE_SLACK
            wall += expected if paused or gap < 0 else gap
        r["wall"] = wall
        prev = r


# ---------------------------------------------------------------------- learning curves
def curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the learning curves of the runs under `run_dir` into `out` (default:
    RUN_DIR/curves.png); returns the path written."""
    logs = find_logs(run_dir)
    runs = [read_run(label, log) for label, log in logs]
    out = Path(out) if out else _default_curves_path(Path(run_dir))
    fig = _curves_figure(runs)
    _save(fig, out)
    return out


def _default_curves_path(run_dir: Path) -> Path:
    return (run_dir.parent if run_dir.is_file() else run_dir) / "curves.png"


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds < 120:
        return "seconds", 1.0
    return ("minutes", 60.0) if seconds < 2 * 3600 else ("hours", 3600.0)


def _curves_figure(runs: list[Run]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 7.5), layout="constrained")
    (loss_steps, loss_time), (bleu, lr) = fig.subplots(2, 2)
    longest = max(r["wall"] for run in runs for r in run.train + run.valid)
    unit, scale = _time_unit(longest)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, color in zip(runs, colors):
        name = f"{run.label}: " if len(runs) > 1 else ""
        for ax, x in ((loss_steps, "step"), (loss_time, "wall")):
            div = scale if x == "wall" else 1.0
            ax.plot(*_xy(run.train, x, "loss", div), color=color, label=f"{name}train")
            ax.plot(*_xy(run.valid, x, "loss", div), "o--", color=color, ms=3, label=f"{name}valid")
        bleu.plot(*_xy(run.valid, "step", "bleu"), "o-", color=color, ms=3, label=run.label)
        bleu.plot(*_xy(run.average, "step", "bleu"), "*", color=color, ms=12)
        lr.plot(*_xy(run.train, "step", "lr"), color=color, label=run.label)
    loss_steps.set(title="loss per target token (label-smoothed)", xlabel="step", ylabel="loss")
    loss_time.set(title="loss against training time", xlabel=f"training time ({unit})")
    bleu.set(title="validation BLEU (greedy; * averaged checkpoints)", xlabel="step")
    lr.set(title="learning rate", xlabel="step")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if not any(_xy(run.valid, "step", "bleu")[0] for run in runs):
        bleu.text(0.5, 0.5, "no validation BLEU in the log", ha="center", transform=bleu.transAxes)
        bleu.set(xticks=[], yticks=[])
    for ax in (loss_steps, loss_time, bleu, lr):
        ax.grid(alpha=0.3)
    loss_steps.legend(fontsize="small")
    return fig


def _xy(records: list[dict], x: str, y: str, x_scale: float = 1.0):
    """The (x, y) values of the records that have a finite y."""
    points = [
        (r[x] / x_scale, r[y]) for r in records if _is_number(r.get(y)) and math.isfinite(r[y])
    ]
    return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------------- attention
def attention_line(text: str | None, in_path: str | None, line: int | None) -> str:
    """The sentence to draw: `text`, or line `line` (1-based) of the file `in_path`."""
    if text is not None and (in_path or line is not None):
        raise UsageError("plot attention: give a sentence, or -i FILE --line N, not both")
    if text is not None:
        if not text.strip():
            raise UsageError("plot attention: the sentence is empty: no attention to draw")
        return text
    if not in_path or line is None:
        raise UsageError('plot attention: give a sentence ("A man ...") or -i FILE --line N')
    lines = read_lines(in_path)
    if not 1 <= line <= len(lines):
        raise UsageError(f"{in_path}: --line {line}: the file has {len(lines)} lines")
    if not lines[line - 1].strip():
        raise UsageError(f"{in_path}: line {line} is empty: no attention to draw")
    return lines[line - 1]


def attention(
    checkpoint: str | Path, text: str, out: str | Path, device: str = "auto", **search_kwargs
) -> Path:
    """Translate `text` with the checkpoint and draw its best hypothesis's attention into `out`
    (see nmt.translator.Translation); `search_kwargs`: search settings. Returns `out`."""
    from nmt.config import load_time_keys
    from nmt.translator import Translator

    load = {key: search_kwargs.pop(key) for key in load_time_keys() if key in search_kwargs}
    translator = Translator.from_checkpoint(checkpoint, device=device, **load)
    (translation,) = translator.translate([text], return_attention=True, **search_kwargs)
    title = f"{text.strip()}\n→ {translation.text}"
    _save(attention_figure(translation, title), Path(out))
    return Path(out)


def attention_figure(translation, title: str = ""):
    """A matplotlib Figure of `translation.attention` (a nmt.translator.Translation): target
    pieces down, source pieces across, one cell per weight."""
    from matplotlib.figure import Figure

    weights = translation.attention.float().numpy()  # (T, S)
    n_tgt, n_src = weights.shape
    if not n_tgt:
        raise UsageError("an empty translation has no attention to draw")
    width = min(MAX_INCHES, 2.5 + 0.32 * n_src)
    height = min(MAX_INCHES, 2.0 + 0.28 * n_tgt + 0.08 * max(map(len, translation.src_pieces)))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(n_src), labels=translation.src_pieces, rotation=90)
    ax.set_yticks(range(n_tgt), labels=translation.tgt_pieces)
    ax.xaxis.tick_top()
    ax.xaxis.set_label_position("top")
    ax.set(xlabel="source pieces", ylabel="target pieces")
    fig.colorbar(image, ax=ax, shrink=0.8, label="attention weight")
    if title:
        wrap = max(30, int(width * 9))
        text = "\n".join(textwrap.fill(part, wrap) for part in title.splitlines())
        fig.suptitle(text, fontsize="medium")
    return fig


# ---------------------------------------------------------------------- output
def _save(fig, out: Path) -> None:
    """The figure as a PNG in `out`, written atomically."""
    if out.suffix.lower() != ".png":
        raise UsageError(f"{out}: pictures are written as PNG: give a file name ending in .png")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    with open_output(out) as write:
        write(buffer.getvalue())
