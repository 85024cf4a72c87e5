"""The training loop: `nmt train`, in one process or on every rank of a `torchrun` launch.

Owns: the loop over epochs and steps, when to validate and save (`Trainer._validation_due`,
the one rule), checkpoints (`last`, `best`, numbered, averaged), resume, starting from another
run's weights (`init_from`), signals, skipped steps, and what the ranks of a distributed run
agree on. Does not own where a run stands (nmt.run_state), one optimizer update
(nmt.optimization), the validation figures (nmt.validation), the run log (nmt.runlog), the
model (nmt.models), the batches (nmt.data), the process group (nmt.distributed) or the file
format (nmt.checkpoint).

Several ranks: each trains on its shard of every epoch's batches (DDP averages the gradients);
rank 0 alone validates, logs and writes checkpoints, and the others wait for its verdict (early
stopping) before they go on. A signal received by any rank stops every rank after the same step.
Checkpoints hold the unwrapped model and every rank's RNG state; a resume with as many ranks is
exact, one with another number continues the epoch through the global count of batches
consumed (see `TokenBatchSampler.load_state_dict`) and reseeds the ranks it did not have.

Host-device syncs: one per log point (and before each checkpoint), where the figures of the
steps since the last one are read from the device; skipped steps (NaN/inf gradients) are found
and counted there.
"""

from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path

import torch

from nmt import batching, checkpoint, data, runlog, shortlist, validation
from nmt.config import Config, to_yaml
from nmt.devices import check_autocast, probe, resolve_device, resolve_dtype
from nmt.distributed import Distributed, launch
from nmt.errors import NmtError, UsageError
from nmt.models import build_model_for
from nmt.optimization import Updater, label_smoothed_loss, lr_factor
from nmt.progress import Progress
from nmt.run_state import (
    Stop,
    TrainState,
    check_init_from,
    load_resumable,
    load_train_state,
    save_train_state,
    seed_rank,
)
from nmt.tokenizer import Tokenizer

__all__ = ["Stop", "TrainState", "Trainer", "label_smoothed_loss", "lr_factor", "train"]

SIGNAL_STOPS = (Stop.SIGINT, Stop.SIGTERM)  # ranks exchange 1 + index; the larger wins


def check_request(cfg: Config, resume: bool, init_from) -> None:
    """One UsageError for a run that cannot start, before any data is read."""
    t, out_dir = cfg.train, Path(cfg.train.out_dir)
    if not (t.max_epochs or t.max_steps or t.max_minutes):
        raise UsageError(
            "train.max_epochs, train.max_steps and train.max_minutes are all 0: the run never ends"
        )
    if resume and init_from is not None:
        raise UsageError("--init-from starts a new run and --resume continues one: give one")
    if t.tensorboard:
        runlog.check_tensorboard()
    if not resume and (out_dir / "last.pt").exists():
        raise UsageError(
            f"{out_dir}: already holds a run (last.pt); continue it with --resume "
            "or choose another train.out_dir"
        )


def total_steps(cfg: Config, batches_per_epoch: int) -> int:
    """Optimizer steps the run will take by its step and epoch budgets (0: time alone)."""
    t = cfg.train
    per_epoch = math.ceil(batches_per_epoch / t.accum_steps)
    budgets = [s for s in (t.max_steps, t.max_epochs * per_epoch) if s]
    return min(budgets) if budgets else 0


def train_batches(cfg: Config, dist: Distributed, tok: Tokenizer, train_set):
    """This rank's sampler of the training split and the loader of its batches."""
    t = cfg.train
    lens = data.lengths(train_set)
    sampler = batching.TokenBatchSampler(
        *lens, t.max_tokens, shuffle=True, seed=t.seed, rank=dist.rank, world_size=dist.world_size
    )
    sampler.set_epoch(0)
    cuda, alpha = dist.device.type == "cuda", cfg.data.sampling_alpha
    loader = batching.batch_loader(
        train_set,
        sampler,
        tok.pad_id,
        tok.bos_id,
        tok.eos_id,
        workers=t.num_workers if cuda else 0,
        pin_memory=cuda,
        sampling=batching.SubwordSampling(tok, alpha, t.seed) if alpha > 0 else None,
    )
    return sampler, loader


def train_dtype(precision: str, dist: Distributed, log: runlog.RunLog) -> torch.dtype:
    """train.precision as a dtype, said in the log; `auto` on a CPU asks the probe
    (nmt.devices), and under torchrun every rank takes rank 0's answer, so that all ranks
    compute alike."""
    dtype = resolve_dtype(precision, dist.device)
    if precision == "auto" and dist.enabled:
        dtype = dist.broadcast(dtype)
    how = ""
    if precision == "auto":
        how = " (auto" + (f"; {probe().describe()})" if dist.device.type == "cpu" else ")")
    log.say(f"training precision: {str(dtype).removeprefix('torch.')}{how}")
    return dtype


def learn_shortlist(train_set, tok: Tokenizer, dist: Distributed, log: runlog.RunLog):
    """The vocabulary shortlist of the train split (nmt.shortlist), written into every
    checkpoint for `search.shortlist`. Rank 0 only: the others write no checkpoint."""
    if not dist.is_main:
        return None
    start = time.perf_counter()
    table = shortlist.learn_from_split(train_set, tok.src_vocab_size, tok.tgt_vocab_size)
    log.say(f"shortlist: learned from the train split in {time.perf_counter() - start:.1f}s")
    return table


class _Signals:
    """SIGINT/SIGTERM, while installed: the first asks the run to stop after its step (`received`),
    a second stops a single process at once (KeyboardInterrupt)."""

    def __init__(self, dist: Distributed, log: runlog.RunLog):
        self.dist, self.log = dist, log
        self.received: Stop | None = None
        self._old = {}

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received:
            if self.dist.enabled:  # torchrun forwards signals too, then kills after 30 s
                return
            raise KeyboardInterrupt
        self.received = Stop(name)
        self.log.say(f"{name} received: stopping after this step and saving `last`")

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def agreed(self) -> Stop | None:
        """The signal if any rank received one, so that every rank stops after this step."""
        mine = SIGNAL_STOPS.index(Stop(self.received)) + 1 if self.received else 0
        code = self.dist.all_max(mine)
        self.received = SIGNAL_STOPS[code - 1] if code else None
        return self.received


class _StepHealth:
    """Steps whose gradients were not finite (skipped: each is logged; `train.max_bad_steps` in
    a row stop the run) and the fp16 loss scale (below `train.min_loss_scale`: stop, saving
    `last` by `save_last()` first)."""

    def __init__(self, cfg: Config, log: runlog.RunLog, save_last):
        self.limit, self.min_scale = cfg.train.max_bad_steps, cfg.train.min_loss_scale
        self.log, self.save_last = log, save_last
        self.last = Path(cfg.train.out_dir) / "last.pt"
        self.in_a_row = self.total = 0

    def check(self, drained: list[tuple[int, float, float]], scale: float | None) -> None:
        for step, loss, norm in drained:
            if math.isfinite(norm):
                self.in_a_row = 0
            else:
                self._skipped(step, loss, norm)
        if scale is not None and scale < self.min_scale:
            self._scale_collapsed(scale)

    def _skipped(self, step: int, loss: float, norm: float) -> None:
        self.in_a_row += 1
        self.total += 1
        n = self.in_a_row
        record = {"type": "bad_step", "step": step, "loss": str(loss), "grad_norm": str(norm)}
        self.log.write({**record, "in_a_row": n})
        self.log.say(f"step {step}: loss {loss}, gradient norm {norm}: skipped ({n} in a row)")
        if n >= self.limit:
            raise NmtError(
                f"{n} non-finite losses in a row: stopping (train.max_bad_steps). The last "
                f"good checkpoint is {self.last}; try a lower train.lr"
            )

    def _scale_collapsed(self, scale: float) -> None:
        # Skipped steps leave the weights alone, and fp32 master weights are sound whatever
        # fp16 could not hold: `last` is a state another precision can go on from.
        path, step = self.save_last()
        self.log.write({"type": "error", "step": step, "loss_scale": scale})
        raise NmtError(
            f"fp16 loss scale fell to {scale:.3g}, below train.min_loss_scale "
            f"({self.min_scale:g}): the gradients overflow at every scale (a diverging run, or "
            f"values fp16 cannot hold). Saved {path} at step {step}; go on with "
            "`nmt train ... --resume train.precision=bf16`, or with a lower train.lr and "
            "--resume --reset-optimizer"
        )


def open_run_folder(out_dir: Path, cfg: Config, log: runlog.RunLog) -> None:
    """Create `out_dir`, remove what killed checkpoint writes left there, write config.yaml."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if stale := checkpoint.remove_stale_temps(out_dir):
        log.say(f"removed {len(stale)} unfinished checkpoint write(s) of a killed run")
    checkpoint.atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))


class Trainer:
    """Trains one run described by a Config; `run()` returns a summary dict.

    `dist` (from `distributed.launch`) places this process among the ranks of a torchrun
    launch; without it, the trainer is a single process on `train.device`. `resume` goes on
    from `train.out_dir/last.pt`; `init_from` starts a new run (a new optimizer, step 0, the
    config's schedule) from the weights of another run's checkpoint.
    """

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        reset_optimizer: bool = False,
        dist: Distributed | None = None,
        init_from: str | Path | None = None,
    ):
        check_request(cfg, resume, init_from)
        self.cfg, t = cfg, cfg.train
        self.out_dir = Path(t.out_dir)
        self.dist = dist or Distributed.single(resolve_device(t.device))
        self.device = self.dist.device
        if t.threads:
            torch.set_num_threads(t.threads)
        self.state = TrainState()
        main_dir = self.out_dir if self.dist.is_main else None
        self.log = runlog.RunLog(main_dir, lambda: self.state.seconds(), t.tensorboard)
        self.dtype = train_dtype(t.precision, self.dist, self.log)
        self.window = runlog.Window()
        self.health = _StepHealth(cfg, self.log, lambda: (self._write("last"), self.state.step))
        self.signals = _Signals(self.dist, self.log)
        self._load_data()
        self._build_model()
        if resume:
            self._resume(reset_optimizer)
        elif init_from is not None:
            self._init_from(Path(init_from))

    # ---------------------------------------------------------------- set-up
    def _load_data(self) -> None:
        data_dir = Path(self.cfg.data.dir)
        self.tokenizer = Tokenizer.load(data_dir)
        self.train_set = data.load_split(data_dir, "train")
        if len(self.train_set) == 0:
            raise UsageError(f"{data_dir}/train: no training pairs left after filtering")
        self.validator = validation.Validator.of(data_dir, self.tokenizer, self.cfg, self.device)
        self.sampler, self.loader = train_batches(
            self.cfg, self.dist, self.tokenizer, self.train_set
        )
        self.shortlist = learn_shortlist(self.train_set, self.tokenizer, self.dist, self.log)

    def _build_model(self) -> None:
        t = self.cfg.train
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.model = build_model_for(self.cfg.model, self.tokenizer).to(self.device)
        check_autocast(self.model, self.device, self.dtype, "train.precision")
        if self.dist.enabled:
            seed_rank(t.seed, self.dist.rank)
        self.total_steps = total_steps(self.cfg, len(self.sampler))  # this rank's shard
        self.updater = Updater(
            self.cfg, self.model, self.dist, self.dtype, self.tokenizer.pad_id, self.total_steps
        )
        self.optimizer = self.updater.optimizer

    def _resume(self, reset_optimizer: bool) -> None:
        path = self.out_dir / "last.pt"
        ckpt = load_resumable(path, self.cfg, self.tokenizer, reset_optimizer)
        self.model.load_state_dict(ckpt["model"])
        updater = None if reset_optimizer else self.updater
        saved, seed = ckpt["train_state"], self.cfg.train.seed
        self.state, note = load_train_state(saved, self.sampler, updater, self.dist, seed)
        if reset_optimizer:
            self.updater.reset_schedule(self.state.step, self.total_steps)
        elif note:
            self.log.say(f"{path}: {note} (it was below train.min_loss_scale)")
        self.log.say(
            f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch + 1})"
        )

    def _init_from(self, path: Path) -> None:
        ckpt = checkpoint.load(path)
        changed = check_init_from(path, ckpt, self.cfg, self.model, self.tokenizer)
        self.model.load_state_dict(ckpt["model"])
        self.state.init_from = str(path)
        if changed:
            self.log.say(f"{path}: fine-tuning with other model settings: {'; '.join(changed)}")
        self.log.say(f"a new run from the weights of {path}")

    # ---------------------------------------------------------------- checkpoints
    def save(self, name: str, with_train_state: bool = True) -> Path:
        """Write `out_dir/name.pt` (on rank 0; every rank calls it), after reading the pending
        steps: a run that must stop for non-finite steps writes nothing."""
        self._check_steps()
        return self._write(name, with_train_state)

    def _write(self, name: str, with_train_state: bool = True) -> Path:
        path = self.out_dir / f"{name}.pt"
        train_state = None
        if with_train_state:  # every rank: rank 0 gathers each rank's RNG state
            train_state = save_train_state(self.state, self.sampler, self.updater, self.dist)
        if self.dist.is_main:
            checkpoint.save(
                path,
                config=self.cfg.to_dict(),
                model_state=self.model.state_dict(),  # the unwrapped model: no DDP prefix
                shortlist=self.shortlist,
                tokenizer_bytes=self.tokenizer.to_bytes(),
                train_state=train_state,
            )
        return path

    def _save_numbered(self) -> None:
        self.save(f"step_{self.state.step}")
        if self.dist.is_main:
            for old in checkpoint.numbered(self.out_dir)[: -self.cfg.train.keep_last]:
                old.unlink(missing_ok=True)

    # ---------------------------------------------------------------- the loop
    def run(self) -> dict:
        """Train until a `Stop`; returns {step, epoch, best, stop, rank, world_size}."""
        self.state.started = time.perf_counter()
        if self.cfg.train.max_minutes:  # the next step's lr: a resumed run keeps its decay
            self._share_time()
            self.updater.reset_schedule(self.state.step, self.total_steps)
        if self.dist.is_main:
            open_run_folder(self.out_dir, self.cfg, self.log)
        with self.log, self.signals:
            if self.state.init_from and self.state.step == 0:
                self.log.write({"type": "init", "step": 0, "from": self.state.init_from})
            with Progress(self.total_steps, self.state.step, show=self.dist.is_main) as progress:
                stop = self._loop(progress)
            self._finish(stop)
        summary = {"step": self.state.step, "epoch": self.state.epoch, "best": self.state.best}
        return {**summary, "stop": stop, "rank": self.dist.rank, "world_size": self.dist.world_size}

    def _loop(self, progress) -> Stop:
        """Epochs of steps until a stop; what is due after a step or an epoch follows it."""
        t = self.cfg.train
        while not (t.max_epochs and self.state.epoch >= t.max_epochs):
            for batches in self._groups():
                self._optimizer_step(batches)
                if stop := self._after_step(progress):
                    return self._stopping(stop)
            if stop := self._after_epoch():
                return stop
        return self._stopping(Stop.MAX_EPOCHS)

    def _groups(self):
        """The rest of this epoch's batches in groups of train.accum_steps; the epoch's last
        group may be shorter (it is trained on, and counted in total_steps)."""
        if self.state.batches_done >= len(self.sampler):  # stopped right after its last batch
            return
        self.sampler.position = self.state.batches_done  # where the loader starts drawing
        self.updater.train_model.train()
        group = []
        for batch in self.loader:
            group.append(batch)
            if len(group) == self.cfg.train.accum_steps:
                yield group
                group = []
        if group:
            yield group

    def _optimizer_step(self, batches) -> None:
        result = self.updater.step(batches)
        self.state.step += 1
        self.state.batches_done += len(batches)
        self.window.add(self.state.step, result)

    def _validation_due(self, moment: str, stop: Stop | None = None) -> bool:
        """The one rule for when to validate (and save `last`): after every
        train.valid_every-th step, else (valid_every 0) at the end of every epoch; and at a stop
        by a budget (epochs, steps, minutes) whose last step was not validated."""
        every, s = self.cfg.train.valid_every, self.state
        if moment == "step":
            return bool(every) and s.step % every == 0
        if moment == "epoch":
            return not every
        return stop.by_budget and s.validated_step != s.step  # moment "stop"

    def _after_step(self, progress) -> Stop | None:
        """Log, save and validate when due after a step; the stop it calls for, if any."""
        t, step = self.cfg.train, self.state.step
        progress.update(step, self.updater.lr)
        if step % t.log_every == 0:
            self._log_train(progress)
        if t.save_every and step % t.save_every == 0:
            with self.window.paused():
                self._save_numbered()
                self.save("last")
        stop = self._validate_and_save() if self._validation_due("step") else None
        return stop or self.signals.agreed() or self._budget_stop()

    def _after_epoch(self) -> Stop | None:
        self.state.epoch += 1
        self.state.batches_done = 0
        self.sampler.set_epoch(self.state.epoch)
        return self._validate_and_save() if self._validation_due("epoch") else None

    def _stopping(self, stop: Stop) -> Stop:
        if self._validation_due("stop", stop):
            return self._validate_and_save() or stop
        return stop

    def _budget_stop(self) -> Stop | None:
        t = self.cfg.train
        if t.max_steps and self.state.step >= t.max_steps:
            return Stop.MAX_STEPS
        if t.max_minutes and self.dist.all_max(int(self.state.seconds() >= 60 * t.max_minutes)):
            return Stop.MAX_MINUTES
        return None

    def _finish(self, stop: Stop) -> None:
        if stop.by_signal:
            path = self.save("last")
            self.log.say(f"stopped on {stop}: saved {path} at step {self.state.step}")
        elif self.cfg.train.average_last:
            self._average_last()
        self._check_steps()

    # ---------------------------------------------------------------- step health and logs
    def _check_steps(self) -> None:
        """Read the steps since the last check (the loop's one host-device sync) and the fp16
        scale: a run that must stop for them stops here (`_StepHealth`)."""
        self.health.check(self.window.drain(), self.updater.loss_scale())

    def _share_time(self) -> None:
        """The share of train.max_minutes spent, agreed by the ranks, for the lr schedule."""
        if minutes := self.cfg.train.max_minutes:
            share = self.dist.all_max(int(1e6 * self.state.seconds() / (60 * minutes)))
            self.updater.time_share = share / 1e6

    def _log_train(self, progress) -> None:
        self._check_steps()
        self._share_time()
        loss, nll = self.dist.all_sum([self.window.loss, self.window.nll])  # every rank's
        s, lr, scale = self.state, self.updater.lr, self.updater.loss_scale()
        record = self.window.record(s.step, s.epoch + 1, loss, nll, lr, scale)
        self.log.write(record)
        progress.log(record)
        self.window.reset()

    # ---------------------------------------------------------------- validation
    def _validate_and_save(self) -> Stop | None:
        """Validate on rank 0, save `best` there if it improved, save `last` (every rank), and
        return rank 0's verdict (Stop.PATIENCE or None) on every rank."""
        self._check_steps()
        self.state.validated_step = self.state.step
        with self.window.paused():
            if self.validator is None:  # no validation split: `last` only
                self.save("last")
                return None
            stop = self._validate_on_main() if self.dist.is_main else None
            self.save("last")  # the other ranks wait here while rank 0 validates
            return self.dist.broadcast(stop)

    def _validate_on_main(self) -> Stop | None:
        t, s = self.cfg.train, self.state
        start = time.perf_counter()
        result = self.validator(self.model)
        value, improved = validation.improves(result, s.best, t.best_metric)
        s.best, s.bad_validations = (value, 0) if improved else (s.best, s.bad_validations + 1)
        record = {"type": "valid", "step": s.step, "epoch": s.epoch, **result, "best": s.best}
        record["seconds"] = time.perf_counter() - start
        self.log.write(record)
        self.log.say_record("valid", record)
        if improved:
            self._write("best", with_train_state=False)
        if t.patience and s.bad_validations >= t.patience:
            self.log.say(
                f"early stopping: no improvement of {t.best_metric} in {t.patience} validations"
            )
            return Stop.PATIENCE
        return None

    def _average_last(self) -> None:
        """Average the last `train.average_last` numbered checkpoints (the final weights among
        them) into `averaged.pt`; on rank 0, validate it and make it `best` if it is better."""
        if self.state.step % self.cfg.train.save_every:
            self._save_numbered()  # the final weights are always part of the average
        if self.dist.is_main:
            paths = checkpoint.numbered(self.out_dir)[-self.cfg.train.average_last :]
            averaged = checkpoint.average(paths)
            checkpoint.atomic_torch_save(averaged, self.out_dir / "averaged.pt")
            self.log.say(f"averaged {len(paths)} checkpoints ({paths[0].name} to {paths[-1].name})")
            if self.validator is not None:
                self._validate_average(averaged, [p.name for p in paths])
        self.dist.broadcast(None)  # the other ranks wait for rank 0

    def _validate_average(self, averaged: dict, names: list[str]) -> None:
        best, start = self.state.best, time.perf_counter()
        result = validation.validate_weights(self.validator, self.model, averaged["model"])
        value, improved = validation.improves(result, best, self.cfg.train.best_metric)
        record = {"type": "average", "step": self.state.step, "of": names, **result}
        record.update(best_before=best, became_best=improved)
        self.log.write({**record, "seconds": time.perf_counter() - start})
        verdict = ": new best" if improved else f": not better than best {best:.4g}"
        self.log.say_record("valid averaged", result, verdict)
        if improved:
            self.state.best = value
            checkpoint.atomic_torch_save(averaged, self.out_dir / "best.pt")


def train(
    cfg: Config,
    resume: bool = False,
    reset_optimizer: bool = False,
    init_from: str | Path | None = None,
) -> dict:
    """Train in this process, or as one rank of a torchrun launch (see nmt.distributed)."""
    with launch(cfg.train.device) as dist:
        return Trainer(cfg, resume, reset_optimizer, dist=dist, init_from=init_from).run()
