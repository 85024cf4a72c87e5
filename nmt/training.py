"""The training loop: `nmt train`, in one process or on every rank of a `torchrun` launch.

Owns: the loop over epochs and steps, validation (loss, perplexity, greedy BLEU), checkpoints
(`last`, `best`, numbered), exact resume, early stopping, signals, progress and the JSONL log,
and what the ranks of a distributed run agree on. Does not own one optimizer update
(nmt.optimization), the model (nmt.models), the batches (nmt.data), the process group
(nmt.distributed) or the file format (nmt.checkpoint).

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

import dataclasses
import json
import math
import random
import signal
import sys
import time
from pathlib import Path

import torch

from nmt import batching, checkpoint, data, metrics, search, shortlist
from nmt.config import Config, from_dict, to_yaml
from nmt.devices import check_autocast, resolve_device, resolve_dtype
from nmt.distributed import Distributed, launch
from nmt.errors import NmtError, UsageError
from nmt.models import build_model_for
from nmt.optimization import StepResult, Updater, label_smoothed_loss, lr_factor
from nmt.progress import Progress
from nmt.tokenizer import Tokenizer

__all__ = ["Trainer", "label_smoothed_loss", "lr_factor", "train"]

SIGNAL_CODES = {"SIGINT": 1, "SIGTERM": 2}  # exchanged between ranks as the larger code


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


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _diff(a: dict, b: dict) -> list[str]:
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


class _Window:
    """The steps since the last log point.

    Their figures stay on the device until `drain`, which copies them all to the host in one
    transfer and folds the finite ones into the window's sums.
    """

    def __init__(self):
        self.pending: list[tuple[int, StepResult]] = []
        self.reset()

    def reset(self) -> None:
        self.loss = self.nll = self.norm = 0.0  # this rank's sums over the good steps
        self.good_steps = self.good_tgt = 0  # good_tgt: target tokens of all ranks
        self.tgt = self.src = 0  # tokens of all ranks over every step, for the throughput
        self.time = time.perf_counter()

    def add(self, step: int, result: StepResult) -> None:
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


class _NoProgress:
    """What ranks other than 0 show: nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, step: int, lr: float) -> None:
        pass


class Trainer:
    """Trains one run described by a Config; `run()` returns a summary dict.

    `dist` (from `distributed.launch`) places this process among the ranks of a torchrun
    launch; without it, the trainer is a single process on `train.device`.
    """

    def __init__(
        self,
        cfg: Config,
        resume: bool = False,
        reset_optimizer: bool = False,
        dist: Distributed | None = None,
    ):
        self.cfg = cfg
        t = cfg.train
        self.out_dir = Path(t.out_dir)
        self.dist = dist or Distributed.single(resolve_device(t.device))
        self.device = self.dist.device
        self.dtype = resolve_dtype(t.precision, self.device)
        if t.precision == "auto" and self.dist.enabled:  # each rank's probe: rank 0's choice
            self.dtype = self.dist.broadcast(self.dtype)
        if t.threads:
            torch.set_num_threads(t.threads)
        if not (t.max_epochs or t.max_steps or t.max_minutes):
            raise UsageError(
                "train.max_epochs, train.max_steps and train.max_minutes are all 0: "
                "the run never ends"
            )
        self._load_data()
        self.shortlist = self._learn_shortlist()
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.model = build_model_for(cfg.model, self.tokenizer).to(self.device)
        check_autocast(self.model, self.device, self.dtype, "train.precision")
        if self.dist.enabled:
            seed_rank(t.seed, self.dist.rank)
        self.total_steps = self._total_steps()
        self.updater = Updater(
            cfg, self.model, self.dist, self.dtype, self.tokenizer.pad_id, self.total_steps
        )
        self.optimizer = self.updater.optimizer
        self.step = 0
        self.epoch = 0
        self.batches_done = 0  # batches of this epoch (this rank's) that steps have used
        self.best: float | None = None
        self.bad_validations = 0
        self.bad_steps_in_row = 0
        self.bad_steps_total = 0
        self.stop_signal: str | None = None
        self.train_seconds = 0.0  # before this process; see _elapsed
        self.clock_start = time.perf_counter()
        self.log_file = None
        self.window = _Window()
        if resume:
            self._resume(reset_optimizer)
        elif (self.out_dir / "last.pt").exists():
            raise UsageError(
                f"{self.out_dir}: already holds a run (last.pt); continue it with --resume "
                "or choose another train.out_dir"
            )

    # ---------------------------------------------------------------- set-up
    def _load_data(self) -> None:
        t, data_dir = self.cfg.train, Path(self.cfg.data.dir)
        self.tokenizer = tok = Tokenizer.load(data_dir)
        self.train_set = data.load_split(data_dir, "train")
        self.valid_set = (
            data.load_split(data_dir, "valid") if (data_dir / "valid").exists() else None
        )
        self.valid_sampler = (  # one fixed, length-sorted order, reused at every validation
            batching.TokenBatchSampler(*data.lengths(self.valid_set), t.max_tokens, shuffle=False)
            if self.valid_set is not None
            else None
        )
        if len(self.train_set) == 0:
            raise UsageError(f"{data_dir}/train: no training pairs left after filtering")
        self.sampler = batching.TokenBatchSampler(
            *data.lengths(self.train_set),
            t.max_tokens,
            shuffle=True,
            seed=t.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.sampler.set_epoch(0)
        cuda = self.device.type == "cuda"
        alpha = self.cfg.data.sampling_alpha
        self.loader = batching.batch_loader(
            self.train_set,
            self.sampler,
            tok.pad_id,
            tok.bos_id,
            tok.eos_id,
            workers=t.num_workers if cuda else 0,
            pin_memory=cuda,
            sampling=batching.SubwordSampling(tok, alpha, t.seed) if alpha > 0 else None,
        )

    def _learn_shortlist(self) -> dict | None:
        """The vocabulary shortlist of the train split (nmt.shortlist), written into every
        checkpoint for `search.shortlist`. Rank 0 only: the others write no checkpoint."""
        if not self.dist.is_main:
            return None
        start, tok = time.perf_counter(), self.tokenizer
        table = shortlist.learn_from_split(self.train_set, tok.src_vocab_size, tok.tgt_vocab_size)
        self._log(f"shortlist: learned from the train split in {time.perf_counter() - start:.1f}s")
        return table

    def _total_steps(self) -> int:
        t = self.cfg.train
        per_epoch = math.ceil(len(self.sampler) / t.accum_steps)  # this rank's shard
        by_epochs = t.max_epochs * per_epoch if t.max_epochs else 0
        return min(s for s in (t.max_steps, by_epochs) if s) if (t.max_steps or by_epochs) else 0

    def _resume(self, reset_optimizer: bool) -> None:
        path = self.out_dir / "last.pt"
        ckpt = self._load_for_resume(path, reset_optimizer)
        self.model.load_state_dict(ckpt["model"])
        state = ckpt["train_state"]
        if reset_optimizer:
            self.updater.reset_schedule(state["step"], self.total_steps)
        else:
            note = self.updater.load_state_dict(state)
            if note:
                self._log(f"{path}: {note} (it was below train.min_loss_scale)")
        self.step, self.epoch = state["step"], state["epoch"]
        self.best, self.bad_validations = state["best"], state["bad_validations"]
        self.train_seconds = state.get("train_seconds", 0.0)
        self.sampler.load_state_dict(state["sampler"])
        self.batches_done = self.sampler.position
        self._restore_rng(state)
        self._log(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1})")

    def _load_for_resume(self, path: Path, reset_optimizer: bool) -> dict:
        if not path.exists():
            raise UsageError(f"{path}: nothing to resume (no `last` checkpoint in train.out_dir)")
        ckpt = checkpoint.load(path)
        if "train_state" not in ckpt:
            raise UsageError(f"{path}: holds no training state, cannot resume from it")
        old = from_dict(ckpt["config"])
        changed = _diff(dataclasses.asdict(old.model), dataclasses.asdict(self.cfg.model))
        if changed:
            raise UsageError(
                f"{path}: cannot resume with a different model shape: "
                + "; ".join(f"model.{c}" for c in changed)
            )
        if checkpoint.tokenizer_bytes(ckpt) != self.tokenizer.to_bytes():
            raise UsageError(
                f"{path}: cannot resume: the tokenizer in {self.cfg.data.dir} is not "
                "the one this run was trained with"
            )
        train_changed = _diff(dataclasses.asdict(old.train), dataclasses.asdict(self.cfg.train))
        opt_keys = ("lr", "optimizer", "betas", "weight_decay", "schedule", "warmup_steps")
        opt_changed = [c for c in train_changed if c.split(":")[0] in opt_keys]
        if opt_changed and not reset_optimizer:
            raise UsageError(
                f"{path}: optimizer settings changed ({'; '.join(opt_changed)}); "
                "pass --reset-optimizer to continue with a fresh optimizer"
            )
        return ckpt

    def _restore_rng(self, state: dict) -> None:
        """Each rank's own RNG state when the run had as many ranks; else rank 0 takes the
        saved one and the others start streams of their own (resume is then not exact)."""
        by_rank = state.get("rng_by_rank")
        if by_rank and len(by_rank) == self.dist.world_size:
            set_rng_state(by_rank[self.dist.rank])
        elif self.dist.is_main:
            set_rng_state(state["rng"])
        else:
            seed_rank(self.cfg.train.seed, self.dist.rank, self.step)

    # ---------------------------------------------------------------- checkpoints
    def _train_state(self) -> dict:
        """Every rank must call it: it gathers each rank's RNG state on rank 0."""
        by_rank = self.dist.gather(rng_state())
        state = {
            "step": self.step,
            "epoch": self.epoch,
            "best": self.best,
            "bad_validations": self.bad_validations,
            **self.updater.state_dict(),  # optimizer, scheduler, scaler
            "sampler": {**self.sampler.state_dict(), "position": self.batches_done},
            "rng": rng_state(),
            "train_seconds": self._elapsed(),
        }
        if self.dist.enabled:
            state["rng_by_rank"] = by_rank
        return state

    def save(self, name: str, with_train_state: bool = True) -> Path:
        """Write `out_dir/name.pt` (on rank 0; every rank calls it), after reading the pending
        steps: a run that must stop for non-finite steps writes nothing."""
        self._check_steps()
        return self._write(name, with_train_state)

    def _write(self, name: str, with_train_state: bool = True) -> Path:
        path = self.out_dir / f"{name}.pt"
        train_state = self._train_state() if with_train_state else None
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
        self.save(f"step_{self.step}")
        if not self.dist.is_main:
            return
        for old in checkpoint.numbered(self.out_dir)[: -self.cfg.train.keep_last]:
            old.unlink(missing_ok=True)

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        self.clock_start = time.perf_counter()
        if self.cfg.train.max_minutes:  # the next step's lr: a resumed run keeps its decay
            self._share_time()
            self.updater.reset_schedule(self.step, self.total_steps)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            stale = checkpoint.remove_stale_temps(self.out_dir)
            if stale:
                self._log(f"removed {len(stale)} unfinished checkpoint write(s) of a killed run")
            checkpoint.atomic_write_text(self.out_dir / "config.yaml", to_yaml(self.cfg))
            self.log_file = open(self.out_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        handlers = self._install_signal_handlers()
        try:
            return self._loop()
        finally:
            self._restore_signal_handlers(handlers)
            if self.log_file:
                self.log_file.close()

    def _loop(self) -> dict:
        t = self.cfg.train
        if self.dist.is_main:
            progress = Progress(total=self.total_steps, initial=self.step)
        else:
            progress = _NoProgress()
        with progress:
            while True:
                if t.max_epochs and self.epoch >= t.max_epochs:
                    stop = "max_epochs"
                    if t.valid_every and self.step % t.valid_every:
                        stop = self._validate_and_save() or stop
                    break
                stop = self._train_epoch(progress)
                if stop in ("max_steps", "max_minutes") and self.step % (
                    t.valid_every or self.step + 1
                ):
                    stop = self._validate_and_save() or stop
                if stop:
                    break
                self.epoch += 1
                self.sampler.set_epoch(self.epoch)
                self.batches_done = 0
                if not t.valid_every:
                    stop = self._validate_and_save()
                    if stop:
                        break
        if stop in SIGNAL_CODES:
            self.save("last")
            self._log(f"stopped on {stop}: saved {self.out_dir / 'last.pt'} at step {self.step}")
        elif t.average_last:
            self._average_last()
        self._check_steps()
        return {
            "step": self.step,
            "epoch": self.epoch,
            "best": self.best,
            "stop": stop,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
        }

    def _train_epoch(self, progress) -> str | None:
        t = self.cfg.train
        if self.batches_done >= len(self.sampler):  # stopped right after its last batch
            return None
        self.sampler.position = self.batches_done  # where the loader starts drawing
        self.updater.train_model.train()
        accum = []
        for batch in self.loader:
            accum.append(batch)
            if len(accum) < t.accum_steps:
                continue
            self._optimizer_step(accum, self.window)
            self.batches_done += len(accum)
            accum = []
            reason = self._after_step(progress)
            if reason:
                return reason
        if accum:  # the epoch's last, shorter group: trained on, and counted in total_steps
            self._optimizer_step(accum, self.window)
            self.batches_done += len(accum)
            return self._after_step(progress)
        return None

    def _optimizer_step(self, batches, window: _Window) -> None:
        result = self.updater.step(batches)
        self.step += 1
        window.add(self.step, result)

    def _after_step(self, progress) -> str | None:
        """Logging, saving, validation and the stop checks that follow a step."""
        t = self.cfg.train
        progress.update(self.step, self.updater.lr)
        if self.step % t.log_every == 0:
            self._log_train(progress)
        if t.save_every and self.step % t.save_every == 0:
            self._save_numbered()
            self.save("last")
        if t.valid_every and self.step % t.valid_every == 0:
            reason = self._validate_and_save()
            if reason:
                return reason
        stop = self._agreed_stop()
        if stop:
            return stop
        if t.max_steps and self.step >= t.max_steps:
            return "max_steps"
        if t.max_minutes and self.dist.all_max(int(self._elapsed() >= 60 * t.max_minutes)):
            return "max_minutes"
        return None

    def _elapsed(self) -> float:
        """Seconds of training so far, counted across resumes."""
        return self.train_seconds + time.perf_counter() - self.clock_start

    def _agreed_stop(self) -> str | None:
        """The signal if any rank received one, so that every rank stops after this step."""
        code = self.dist.all_max(SIGNAL_CODES.get(self.stop_signal, 0))
        names = {c: name for name, c in SIGNAL_CODES.items()}
        self.stop_signal = names.get(code)
        return self.stop_signal

    # ---------------------------------------------------------------- step health and logs
    def _check_steps(self) -> None:
        """Read the steps since the last check (the loop's one host-device sync): log each
        skipped one, stop after `max_bad_steps` in a row or when the fp16 scale collapsed."""
        for step, loss, norm in self.window.drain():
            if math.isfinite(norm):
                self.bad_steps_in_row = 0
            else:
                self._bad_step(step, loss, norm)
        scale = self.updater.loss_scale()
        if scale is not None and scale < self.cfg.train.min_loss_scale:
            self._loss_scale_collapsed(scale)

    def _bad_step(self, step: int, loss: float, norm: float) -> None:
        self.bad_steps_in_row += 1
        self.bad_steps_total += 1
        n = self.bad_steps_in_row
        record = {"type": "bad_step", "step": step, "loss": str(loss), "grad_norm": str(norm)}
        self._write_log({**record, "in_a_row": n})
        self._log(f"step {step}: loss {loss}, gradient norm {norm}: skipped ({n} in a row)")
        if n >= self.cfg.train.max_bad_steps:
            raise NmtError(
                f"{n} non-finite losses in a row: stopping (train.max_bad_steps). The last "
                f"good checkpoint is {self.out_dir / 'last.pt'}; try a lower train.lr"
            )

    def _loss_scale_collapsed(self, scale: float) -> None:
        # Skipped steps leave the weights alone, and fp32 master weights are sound whatever
        # fp16 could not hold: `last` is a state another precision can go on from.
        path = self._write("last")
        self._write_log({"type": "error", "step": self.step, "loss_scale": scale})
        raise NmtError(
            f"fp16 loss scale fell to {scale:.3g}, below train.min_loss_scale "
            f"({self.cfg.train.min_loss_scale:g}): the gradients overflow at every scale (a "
            f"diverging run, or values fp16 cannot hold). Saved {path} at step {self.step}; "
            "go on with `nmt train ... --resume train.precision=bf16`, or with a lower "
            "train.lr and --resume --reset-optimizer"
        )

    def _share_time(self) -> None:
        """The share of train.max_minutes spent, agreed by the ranks, for the lr schedule."""
        minutes = self.cfg.train.max_minutes
        if minutes:
            share = self.dist.all_max(int(1e6 * self._elapsed() / (60 * minutes)))
            self.updater.time_share = share / 1e6

    def _log_train(self, progress) -> None:
        self._check_steps()
        self._share_time()
        w = self.window
        loss, nll = self.dist.all_sum([w.loss, w.nll])  # every rank's good steps
        now = time.perf_counter()
        elapsed = max(now - w.time, 1e-9)
        tgt = max(w.good_tgt, 1)
        record = {
            "type": "train",
            "step": self.step,
            "epoch": self.epoch + 1,
            "loss": loss / tgt,
            "ppl": math.exp(min(nll / tgt, 50)),
            "lr": self.updater.lr,
            "grad_norm": w.norm / max(w.good_steps, 1),
            "tgt_tok_s": w.tgt / elapsed,
            "src_tgt_tok_s": (w.tgt + w.src) / elapsed,
        }
        scale = self.updater.loss_scale()
        if scale is not None:
            record["loss_scale"] = scale
        self._write_log(record)
        if self.dist.is_main:
            progress.log(record)
        w.reset()

    def _write_log(self, record: dict) -> None:
        if self.log_file:
            record = {**record, "time": round(time.time(), 3)}
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def _log(self, msg: str) -> None:
        if self.dist.is_main:
            _log(msg)

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        tok = self.tokenizer
        loss_sum = nll_sum = 0.0
        n_tokens = 0
        hyps: dict[int, str] = {}
        refs: dict[int, str] = {}
        greedy = search.SearchSettings.from_config(self.cfg.search, tok)  # greedy_search: beam 1
        for batch in batching.make_batches(
            self.valid_set, self.valid_sampler, tok.pad_id, tok.bos_id, tok.eos_id
        ):
            batch = batch.to(self.device)
            logits = self.model(batch.src_ids, batch.src_lens, batch.tgt_in_ids)
            loss, nll = label_smoothed_loss(
                logits, batch.tgt_out_ids, tok.pad_id, self.cfg.train.label_smoothing
            )
            loss_sum += float(loss)
            nll_sum += float(nll)
            n_tokens += batch.num_tgt_tokens
            if self.cfg.train.valid_bleu:
                results = search.greedy_search(self.model, batch.src_ids, batch.src_lens, greedy)
                texts = tok.decode_tgt([r[0].tokens for r in results])
                out = batch.tgt_out_ids.tolist()
                ref_ids = [row[: int(n) - 1] for row, n in zip(out, batch.tgt_lens.tolist())]
                for i, hyp, ref in zip(batch.indices.tolist(), texts, tok.decode_tgt(ref_ids)):
                    hyps[i], refs[i] = hyp, ref
        self.model.train()
        n_tokens = max(n_tokens, 1)
        result = {"loss": loss_sum / n_tokens, "ppl": math.exp(min(nll_sum / n_tokens, 50))}
        if self.cfg.train.valid_bleu and hyps:
            order = sorted(hyps)
            result["bleu"] = metrics.bleu(
                [hyps[i] for i in order], [[refs[i] for i in order]]
            ).score
        return result

    def _validate_and_save(self) -> str | None:
        """Validate on rank 0, save `best` there if it improved, save `last` (every rank), and
        return rank 0's verdict ("patience" or None) on every rank."""
        self._check_steps()
        if self.valid_set is None:  # no validation split: `last` only
            self.save("last")
            return None
        reason = self._validate_on_main() if self.dist.is_main else None
        self.save("last")  # the other ranks wait here while rank 0 validates
        return self.dist.broadcast(reason)

    def _improves(self, result: dict) -> tuple[float, bool]:
        """The validation's value of `train.best_metric`, and whether it beats `best`."""
        metric = "bleu" if self.cfg.train.best_metric == "bleu" and "bleu" in result else "loss"
        value = result[metric]
        if self.best is None:
            return value, True
        return value, value > self.best if metric == "bleu" else value < self.best

    def _validate_on_main(self) -> str | None:
        t = self.cfg.train
        start = time.perf_counter()
        result = self.validate()
        value, improved = self._improves(result)
        if improved:
            self.best = value
            self.bad_validations = 0
        else:
            self.bad_validations += 1
        record = {
            "type": "valid",
            "step": self.step,
            "epoch": self.epoch,
            **result,
            "best": self.best,
            "seconds": time.perf_counter() - start,
        }
        self._write_log(record)
        _log("valid " + " ".join(f"{k}={_fmt(v)}" for k, v in record.items() if k != "type"))
        if improved:
            self._write("best", with_train_state=False)
        if t.patience and self.bad_validations >= t.patience:
            _log(f"early stopping: no improvement of {t.best_metric} in {t.patience} validations")
            return "patience"
        return None

    def _average_last(self) -> None:
        """Average the last `train.average_last` numbered checkpoints (the final weights among
        them) into `averaged.pt`; on rank 0, validate it and make it `best` if it is better."""
        if self.step % self.cfg.train.save_every:
            self._save_numbered()  # the final weights are always part of the average
        if self.dist.is_main:
            paths = checkpoint.numbered(self.out_dir)[-self.cfg.train.average_last :]
            averaged = checkpoint.average(paths)
            checkpoint.atomic_torch_save(averaged, self.out_dir / "averaged.pt")
            self._log(f"averaged {len(paths)} checkpoints ({paths[0].name} to {paths[-1].name})")
            if self.valid_set is not None:
                self._validate_averaged(averaged["model"], [p.name for p in paths])
        self.dist.broadcast(None)  # the other ranks wait for rank 0

    def _validate_averaged(self, state: dict, names: list[str]) -> None:
        final = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(state)
        start = time.perf_counter()
        result = self.validate()
        value, improved = self._improves(result)
        record = {"type": "average", "step": self.step, "of": names, **result}
        self._write_log(
            {
                **record,
                "best_before": self.best,
                "became_best": improved,
                "seconds": time.perf_counter() - start,
            }
        )
        _log(
            "valid averaged "
            + " ".join(f"{k}={_fmt(v)}" for k, v in result.items())
            + (": new best" if improved else f": not better than best {_fmt(self.best)}")
        )
        if improved:
            self.best = value
            self._write("best", with_train_state=False)
        self.model.load_state_dict(final)

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal:
                if self.dist.enabled:  # torchrun forwards signals too, then kills after 30 s
                    return
                raise KeyboardInterrupt  # a second signal: stop now
            self.stop_signal = name
            self._log(f"{name} received: stopping after this step and saving `last`")

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return old

    @staticmethod
    def _restore_signal_handlers(old) -> None:
        for sig, h in old.items():
            signal.signal(sig, h)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(cfg: Config, resume: bool = False, reset_optimizer: bool = False) -> dict:
    """Train in this process, or as one rank of a torchrun launch (see nmt.distributed)."""
    with launch(cfg.train.device) as dist:
        return Trainer(cfg, resume=resume, reset_optimizer=reset_optimizer, dist=dist).run()
