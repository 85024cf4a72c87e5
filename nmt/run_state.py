"""Where a training run stands, why it stopped, and what it may go on from.

Owns: `TrainState` (the checkpoint's `train_state` besides the optimizer's: `to_dict` and
`from_dict` mirror each other, and checkpoints of earlier versions load), `Stop` (why a run
stopped, and the exit code that follows), the RNG states of the ranks, and the checks that
refuse a resume or an `--init-from` that cannot work (one UsageError each). Does not own the
loop (nmt.training), the optimizer's state (nmt.optimization) or the file (nmt.checkpoint).
"""

from __future__ import annotations

import dataclasses
import enum
import random
import signal
import time
from pathlib import Path

import torch

from nmt import batching, checkpoint
from nmt.config import Config, from_dict
from nmt.distributed import Distributed
from nmt.errors import UsageError


class Stop(str, enum.Enum):
    """Why a run stopped: the summary's `stop`, and the exit code of `nmt train`."""

    MAX_EPOCHS = "max_epochs"
    MAX_STEPS = "max_steps"
    MAX_MINUTES = "max_minutes"
    PATIENCE = "patience"  # train.patience validations without improvement
    SIGINT = "SIGINT"
    SIGTERM = "SIGTERM"

    def __str__(self) -> str:
        return self.value

    @property
    def by_signal(self) -> bool:
        return self in (Stop.SIGINT, Stop.SIGTERM)

    @property
    def by_budget(self) -> bool:
        return self in (Stop.MAX_EPOCHS, Stop.MAX_STEPS, Stop.MAX_MINUTES)

    @property
    def exit_code(self) -> int:
        """0, or the shell's 128 + signal number (130, 143) when a signal stopped the run."""
        return 128 + signal.Signals[self.value].value if self.by_signal else 0


@dataclasses.dataclass
class TrainState:
    """Where a run stands: the checkpoint's `train_state` besides the optimizer, lr schedule,
    fp16 scale (nmt.optimization) and RNG states. `to_dict` and `from_dict` mirror each other;
    checkpoints written before `validated_step` and `init_from` existed resume too."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epochs done: the 0-based index of the current one
    batches_done: int = 0  # this rank's batches of the current epoch that steps have used
    best: float | None = None  # the best validation value of train.best_metric so far
    bad_validations: int = 0  # validations in a row that did not beat `best`
    train_seconds: float = 0.0  # training seconds before `started` (earlier processes)
    validated_step: int | None = None  # the step of the last validation
    init_from: str | None = None  # the checkpoint whose weights started the run
    started: float = dataclasses.field(default_factory=time.perf_counter, compare=False)

    def seconds(self) -> float:
        """Seconds of training so far, counted across resumes."""
        return self.train_seconds + time.perf_counter() - self.started

    def to_dict(self, sampler: batching.TokenBatchSampler) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "best": self.best,
            "bad_validations": self.bad_validations,
            "train_seconds": self.seconds(),
            "validated_step": self.validated_step,
            "init_from": self.init_from,
            "sampler": {**sampler.state_dict(), "position": self.batches_done},
        }

    @classmethod
    def from_dict(cls, state: dict, sampler: batching.TokenBatchSampler) -> TrainState:
        """The state `to_dict` saved; moves `sampler` to the saved epoch and position (mapped
        onto this run's number of ranks, which gives `batches_done`)."""
        sampler.load_state_dict(state["sampler"])
        return cls(
            step=state["step"],
            epoch=state["epoch"],
            batches_done=sampler.position,
            best=state["best"],
            bad_validations=state["bad_validations"],
            train_seconds=state.get("train_seconds", 0.0),
            validated_step=state.get("validated_step"),
            init_from=state.get("init_from"),
        )


def save_train_state(state: TrainState, sampler, updater, dist: Distributed) -> dict:
    """A checkpoint's whole `train_state`: `state`, the sampler's position, the optimizer, lr
    schedule and fp16 scale of `updater`, and the RNG states. Every rank must call it: rank 0
    gathers each rank's RNG state."""
    by_rank = dist.gather(rng_state())
    saved = {**state.to_dict(sampler), **updater.state_dict(), "rng": rng_state()}
    if dist.enabled:
        saved["rng_by_rank"] = by_rank
    return saved


def load_train_state(
    saved: dict, sampler, updater, dist: Distributed, seed: int
) -> tuple[TrainState, str | None]:
    """The mirror of `save_train_state`: the state, with the sampler, `updater` (None: a fresh
    optimizer, see --reset-optimizer) and the RNG states restored; and a note for the log when
    the fp16 scale restarts (see `Updater.load_state_dict`)."""
    state = TrainState.from_dict(saved, sampler)
    note = updater.load_state_dict(saved) if updater is not None else None
    restore_rng(saved, dist, seed, state.step)
    return state, note


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        for i, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, i)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Seed this rank's dropout streams from (seed, rank, step): ranks do not share masks."""
    value = random.Random(f"{seed}/{rank}/{step}").getrandbits(63)
    torch.manual_seed(value)
    random.seed(value)


def restore_rng(state: dict, dist: Distributed, seed: int, step: int) -> None:
    """Each rank's own RNG state when the run had as many ranks; else rank 0 takes the saved
    one and the others start streams of their own (resume is then not exact)."""
    by_rank = state.get("rng_by_rank")
    if by_rank and len(by_rank) == dist.world_size:
        set_rng_state(by_rank[dist.rank])
    elif dist.is_main:
        set_rng_state(state["rng"])
    else:
        seed_rank(seed, dist.rank, step)


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _diff(a: dict, b: dict) -> list[str]:
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


OPTIMIZER_KEYS = ("lr", "optimizer", "betas", "weight_decay", "schedule", "warmup_steps")


def load_resumable(path: Path, cfg: Config, tokenizer, reset_optimizer: bool) -> dict:
    """The checkpoint at `path`, or one UsageError if the run in it cannot go on under `cfg`
    and `tokenizer`."""
    if not path.exists():
        raise UsageError(f"{path}: nothing to resume (no `last` checkpoint in train.out_dir)")
    ckpt = checkpoint.load(path)
    if "train_state" not in ckpt:
        raise UsageError(f"{path}: holds no training state, cannot resume from it")
    old = from_dict(ckpt["config"])
    changed = _diff(dataclasses.asdict(old.model), dataclasses.asdict(cfg.model))
    if changed:
        raise UsageError(
            f"{path}: cannot resume with a different model shape: "
            + "; ".join(f"model.{c}" for c in changed)
        )
    if checkpoint.tokenizer_bytes(ckpt) != tokenizer.to_bytes():
        raise UsageError(
            f"{path}: cannot resume: the tokenizer in {cfg.data.dir} is not "
            "the one this run was trained with"
        )
    train_changed = _diff(dataclasses.asdict(old.train), dataclasses.asdict(cfg.train))
    opt_changed = [c for c in train_changed if c.split(":")[0] in OPTIMIZER_KEYS]
    if opt_changed and not reset_optimizer:
        raise UsageError(
            f"{path}: optimizer settings changed ({'; '.join(opt_changed)}); "
            "pass --reset-optimizer to continue with a fresh optimizer"
        )
    return ckpt


def check_init_from(path: Path, ckpt: dict, cfg: Config, model, tokenizer) -> list[str]:
    """One UsageError if `model` (built from `cfg`) cannot start from the weights in `ckpt`:
    another tokenizer, or a weight of another name or shape. Returns the model settings that
    differ without changing a shape (e.g. dropout), for the log."""
    if checkpoint.tokenizer_bytes(ckpt) != tokenizer.to_bytes():
        raise UsageError(
            f"{path}: its tokenizer is not the one in data.dir ({cfg.data.dir}); encode the new "
            f"data with the checkpoint's own: nmt prepare CONFIG --tokenizer-from {path}"
        )
    ours = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    theirs = {k: tuple(t.shape) for k, t in ckpt["model"].items()}
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            raise UsageError(
                f"{path}: the model config changes weight {key} from shape "
                f"{theirs.get(key, 'absent')} (checkpoint) to {ours.get(key, 'absent')} "
                "(config); the model settings must keep every weight's shape"
            )
    old = from_dict(ckpt["config"], source=f"{path} (config)")
    return [
        f"model.{c}" for c in _diff(dataclasses.asdict(old.model), dataclasses.asdict(cfg.model))
    ]
