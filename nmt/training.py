"""The training loop: `nmt train`.

Owns: device and precision set-up, the optimizer and learning-rate schedule, the label-smoothed
loss, validation (loss, perplexity, greedy BLEU), checkpoints (`last`, `best`, numbered), exact
resume, early stopping, progress and the JSONL log. Does not own the model (nmt.models), the
batches (nmt.data) or the file format (nmt.checkpoint).
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
import torch.nn.functional as F

from nmt import checkpoint, data, metrics, search
from nmt.config import Config, from_dict, to_yaml
from nmt.devices import resolve_device, resolve_dtype
from nmt.errors import NmtError, UsageError
from nmt.models import build_model_for
from nmt.progress import Progress
from nmt.tokenizer import Tokenizer


def lr_factor(cfg, step: int, total_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (1-based)."""
    t = cfg.train
    if t.schedule == "inverse_sqrt":
        warm = max(t.warmup_steps, 1)
        return min(step / warm, math.sqrt(warm / max(step, 1)))
    warm = 1.0
    if t.warmup_steps and step < t.warmup_steps:
        if t.schedule == "constant":
            return step / t.warmup_steps
        # NVIDIA GNMT v2: exponential warmup from 1% of the peak rate
        warm = math.exp(math.log(0.01) * (t.warmup_steps - step) / t.warmup_steps)
    if t.schedule == "constant" or not t.decay_times or not total_steps:
        return warm
    start = int(t.decay_start * total_steps)
    if step <= start:
        return warm
    interval = max(1, (total_steps - start) // t.decay_times)
    halvings = min(t.decay_times, 1 + (step - start - 1) // interval)
    return warm * 0.5**halvings


def label_smoothed_loss(logits, tgt_out_ids, pad_id: int, smoothing: float):
    """Summed loss and summed NLL over real target tokens; no one-hot is built."""
    flat = logits.reshape(-1, logits.size(-1)).float()  # (B*T, V)
    target = tgt_out_ids.reshape(-1)  # (B*T,)
    loss = F.cross_entropy(
        flat, target, ignore_index=pad_id, label_smoothing=smoothing, reduction="sum"
    )
    if smoothing == 0.0:
        return loss, loss.detach()
    with torch.no_grad():
        nll = F.cross_entropy(flat, target, ignore_index=pad_id, reduction="sum")
    return loss, nll


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _diff(a: dict, b: dict) -> list[str]:
    return [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


class Trainer:
    """Trains one run described by a Config; `run()` returns a summary dict."""

    def __init__(self, cfg: Config, resume: bool = False, reset_optimizer: bool = False):
        self.cfg = cfg
        self.out_dir = Path(cfg.train.out_dir)
        self.device = resolve_device(cfg.train.device)
        self.dtype = resolve_dtype(cfg.train.precision, self.device)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if not (cfg.train.max_epochs or cfg.train.max_steps or cfg.train.max_minutes):
            raise UsageError(
                "train.max_epochs, train.max_steps and train.max_minutes are all 0: "
                "the run never ends"
            )
        data_dir = Path(cfg.data.dir)
        self.tokenizer = Tokenizer.load(data_dir)
        self.train_set = data.load_split(data_dir, "train")
        self.valid_set = (
            data.load_split(data_dir, "valid") if (data_dir / "valid").exists() else None
        )
        self.valid_sampler = (  # one fixed, length-sorted order, reused at every validation
            data.TokenBatchSampler(
                *data.lengths(self.valid_set), cfg.train.max_tokens, shuffle=False
            )
            if self.valid_set is not None
            else None
        )
        if len(self.train_set) == 0:
            raise UsageError(f"{data_dir}/train: no training pairs left after filtering")
        src_lens, tgt_lens = data.lengths(self.train_set)
        self.sampler = data.TokenBatchSampler(
            src_lens, tgt_lens, cfg.train.max_tokens, shuffle=True, seed=cfg.train.seed
        )
        self.sampler.set_epoch(0)
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        tok = self.tokenizer
        self.model = build_model_for(cfg.model, tok).to(self.device)
        self.optimizer = self._make_optimizer()
        self.total_steps = self._total_steps()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s + 1, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.best: float | None = None
        self.bad_validations = 0
        self.stop_signal: str | None = None
        self.train_seconds = 0.0  # before this process; see _elapsed
        self.clock_start = time.perf_counter()
        self.log_file = None
        if resume:
            self._resume(reset_optimizer)
        elif (self.out_dir / "last.pt").exists():
            raise UsageError(
                f"{self.out_dir}: already holds a run (last.pt); continue it with --resume "
                "or choose another train.out_dir"
            )

    # ---------------------------------------------------------------- set-up
    def _make_optimizer(self):
        t = self.cfg.train
        cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
        kwargs = {"lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay}
        if self.device.type == "cuda":
            kwargs["fused"] = True
        return cls(self.model.parameters(), **kwargs)

    def _total_steps(self) -> int:
        t = self.cfg.train
        per_epoch = math.ceil(len(self.sampler) / t.accum_steps)
        by_epochs = t.max_epochs * per_epoch if t.max_epochs else 0
        return min(s for s in (t.max_steps, by_epochs) if s) if (t.max_steps or by_epochs) else 0

    def _resume(self, reset_optimizer: bool) -> None:
        path = self.out_dir / "last.pt"
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
        self.model.load_state_dict(ckpt["model"])
        state = ckpt["train_state"]
        if not reset_optimizer:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        else:
            self.scheduler.last_epoch = state["step"]
            factor = lr_factor(self.cfg, state["step"] + 1, self.total_steps)
            for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
                group["lr"] = base * factor
        self.step, self.epoch = state["step"], state["epoch"]
        self.best, self.bad_validations = state["best"], state["bad_validations"]
        self.sampler.load_state_dict(state["sampler"])
        self.train_seconds = state.get("train_seconds", 0.0)
        set_rng_state(state["rng"])
        _log(f"resumed from {path} at step {self.step} (epoch {self.epoch + 1})")

    # ---------------------------------------------------------------- checkpoints
    def _train_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "best": self.best,
            "bad_validations": self.bad_validations,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "train_seconds": self._elapsed(),
        }

    def save(self, name: str, with_train_state: bool = True) -> Path:
        path = self.out_dir / f"{name}.pt"
        checkpoint.save(
            path,
            config=self.cfg.to_dict(),
            model_state=self.model.state_dict(),
            tokenizer_bytes=self.tokenizer.to_bytes(),
            train_state=self._train_state() if with_train_state else None,
        )
        return path

    def _save_numbered(self) -> None:
        self.save(f"step_{self.step}")
        numbered = sorted(self.out_dir.glob("step_*.pt"), key=lambda p: int(p.stem[5:]))
        for old in numbered[: -self.cfg.train.keep_last]:
            old.unlink(missing_ok=True)

    # ---------------------------------------------------------------- loop
    def run(self) -> dict:
        self.clock_start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        stale = checkpoint.remove_stale_temps(self.out_dir)
        if stale:
            _log(f"removed {len(stale)} unfinished checkpoint write(s) of an interrupted run")
        checkpoint.atomic_write_text(self.out_dir / "config.yaml", to_yaml(self.cfg))
        self.log_file = open(self.out_dir / "log.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        handlers = self._install_signal_handlers()
        try:
            return self._loop()
        finally:
            self._restore_signal_handlers(handlers)
            self.log_file.close()

    def _loop(self) -> dict:
        t = self.cfg.train
        progress = Progress(total=self.total_steps, initial=self.step)
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
                if not t.valid_every:
                    stop = self._validate_and_save()
                    if stop:
                        break
        if stop in ("SIGINT", "SIGTERM"):
            self.save("last")
            _log(f"stopped on {stop}: saved {self.out_dir / 'last.pt'} at step {self.step}")
        return {"step": self.step, "epoch": self.epoch, "best": self.best, "stop": stop}

    def _train_epoch(self, progress) -> str | None:
        t = self.cfg.train
        if self.sampler.position >= len(self.sampler):  # stopped right after its last batch
            return None
        self.model.train()
        window = {"loss": 0.0, "nll": 0.0, "tgt": 0, "src": 0, "time": time.perf_counter()}
        accum = []
        for batch in data.make_batches(
            self.train_set,
            self.sampler,
            self.tokenizer.pad_id,
            self.tokenizer.bos_id,
            self.tokenizer.eos_id,
        ):
            accum.append(batch)
            if len(accum) < t.accum_steps:
                continue
            self._optimizer_step(accum, window)
            accum = []
            progress.update(self.step, self._lr())
            if self.step % t.log_every == 0:
                self._log_train(window, progress)
            if t.save_every and self.step % t.save_every == 0:
                self._save_numbered()
                self.save("last")
            if t.valid_every and self.step % t.valid_every == 0:
                reason = self._validate_and_save()
                if reason:
                    return reason
            if self.stop_signal:
                return self.stop_signal
            if t.max_steps and self.step >= t.max_steps:
                return "max_steps"
            if t.max_minutes and self._elapsed() >= 60 * t.max_minutes:
                return "max_minutes"
        return None

    def _elapsed(self) -> float:
        """Seconds of training so far, counted across resumes."""
        return self.train_seconds + time.perf_counter() - self.clock_start

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _optimizer_step(self, batches, window) -> None:
        t = self.cfg.train
        n_tokens = sum(b.num_tgt_tokens for b in batches)
        autocast = torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
        total_loss = total_nll = 0.0
        for batch in batches:
            batch = batch.to(self.device)
            with autocast:
                logits = self.model(batch.src_ids, batch.src_lens, batch.tgt_in_ids)
            loss, nll = label_smoothed_loss(
                logits, batch.tgt_out_ids, self.tokenizer.pad_id, t.label_smoothing
            )
            self.scaler.scale(loss / n_tokens).backward()
            total_loss += loss.detach()
            total_nll += nll
        total_loss = float(total_loss)
        if not math.isfinite(total_loss):
            self.optimizer.zero_grad(set_to_none=True)
            self._bad_step(total_loss)
            return
        self.bad_steps_in_row = 0
        if t.clip_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        window["loss"] += total_loss
        window["nll"] += float(total_nll)
        window["tgt"] += n_tokens
        window["src"] += sum(b.num_src_tokens for b in batches)

    bad_steps_in_row = 0
    bad_steps_total = 0

    def _bad_step(self, value: float) -> None:
        self.bad_steps_in_row += 1
        self.bad_steps_total += 1
        self._write_log(
            {
                "type": "bad_step",
                "step": self.step,
                "loss": str(value),
                "in_a_row": self.bad_steps_in_row,
            }
        )
        _log(f"step {self.step + 1}: loss is {value}; skipped ({self.bad_steps_in_row} in a row)")
        if self.bad_steps_in_row >= self.cfg.train.max_bad_steps:
            raise NmtError(
                f"{self.bad_steps_in_row} non-finite losses in a row: stopping. The last good "
                f"checkpoint is {self.out_dir / 'last.pt'}; try a lower train.lr"
            )

    def _log_train(self, window, progress) -> None:
        now = time.perf_counter()
        elapsed = max(now - window["time"], 1e-9)
        tgt = max(window["tgt"], 1)
        record = {
            "type": "train",
            "step": self.step,
            "epoch": self.epoch + 1,
            "loss": window["loss"] / tgt,
            "ppl": math.exp(min(window["nll"] / tgt, 50)),
            "lr": self._lr(),
            "tgt_tok_s": window["tgt"] / elapsed,
            "src_tgt_tok_s": (window["tgt"] + window["src"]) / elapsed,
        }
        self._write_log(record)
        progress.log(record)
        window.update(loss=0.0, nll=0.0, tgt=0, src=0, time=now)

    def _write_log(self, record: dict) -> None:
        if self.log_file:
            record = {**record, "time": round(time.time(), 3)}
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    # ---------------------------------------------------------------- validation
    @torch.no_grad()
    def validate(self) -> dict:
        self.model.eval()
        tok = self.tokenizer
        loss_sum = nll_sum = 0.0
        n_tokens = 0
        hyps: dict[int, str] = {}
        refs: dict[int, str] = {}
        for batch in data.make_batches(
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
                results = search.greedy_search(
                    self.model,
                    batch.src_ids,
                    batch.src_lens,
                    bos_id=tok.bos_id,
                    eos_id=tok.eos_id,
                    max_len_a=self.cfg.search.max_len_a,
                    max_len_b=self.cfg.search.max_len_b,
                )
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
        t = self.cfg.train
        if self.valid_set is None:  # no validation split: `last` only
            self.save("last")
            return None
        start = time.perf_counter()
        result = self.validate()
        metric = "bleu" if t.best_metric == "bleu" and "bleu" in result else "loss"
        value = result[metric]
        improved = self.best is None or (
            value > self.best if metric == "bleu" else value < self.best
        )
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
            self.save("best", with_train_state=False)
        self.save("last")
        if t.patience and self.bad_validations >= t.patience:
            _log(f"early stopping: no improvement of {metric} in {t.patience} validations")
            return "patience"
        return None

    # ---------------------------------------------------------------- signals
    def _install_signal_handlers(self):
        def handler(signum, frame):
            name = signal.Signals(signum).name
            if self.stop_signal:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stop_signal = name
            _log(f"{name} received: stopping after this step and saving `last`")

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
    return Trainer(cfg, resume=resume, reset_optimizer=reset_optimizer).run()
