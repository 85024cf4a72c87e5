"""One optimizer update over one or more batches, on one or more ranks, on a CPU or a GPU.

Owns: the label-smoothed loss, the learning-rate schedule, Adam(W) (fused on CUDA), autocast
(bf16/fp16) with a GradScaler, gradient accumulation (`no_sync` under DDP until the last batch),
the loss normalisation by the global number of target tokens of the step, clipping, and skipping
updates whose gradients are not finite. Does not own the data, the loop, logging, validation or
checkpoints (nmt.training).

No host-device sync: `step` returns the step's loss sums and gradient norm as a tensor on the
device. A step whose gradients hold an inf or a NaN is skipped on the device by the GradScaler
(weights and optimizer state untouched), and still counts as a step, as overflowing fp16 steps
do in NVIDIA's GNMT; the caller learns of it when it reads the norm (non-finite = skipped).
Outside fp16 the scaler's scale stays at 1: it is used only for that skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from nmt.batching import Batch
from nmt.config import Config
from nmt.distributed import Distributed

FP16_INIT_SCALE = 2.0**16


def lr_factor(cfg: Config, step: int, total_steps: int, time_share: float = 0.0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (1-based).

    gnmt: the halvings follow whichever budget runs out first: steps (`total_steps`, from
    max_epochs/max_steps) or time (`time_share`, the share of train.max_minutes spent), so a
    run stopped by its time budget has decayed by then.
    """
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
    if t.schedule == "constant" or not t.decay_times:
        return warm
    halvings = 0
    if total_steps:
        start = int(t.decay_start * total_steps)
        if step > start:
            interval = max(1, (total_steps - start) // t.decay_times)
            halvings = min(t.decay_times, 1 + (step - start - 1) // interval)
    if time_share > t.decay_start:
        interval = max(1e-9, (1.0 - t.decay_start) / t.decay_times)
        by_time = min(t.decay_times, 1 + int((time_share - t.decay_start) / interval))
        halvings = max(halvings, by_time)
    return warm * 0.5**halvings


# The loss visits the (N, V) logits in chunks of rows of at most this many elements (4 MiB of
# float32 on a CPU), each chunk finished while it sits in the cache: as separate full passes over
# memory (F.cross_entropy with label smoothing, then again for the NLL), log_softmax, its backward
# and the smoothing term took a quarter of a GNMT-small step on the 2-core CPU. A GPU gets
# chunks large enough to keep its kernels big.
LOSS_CHUNK_ELEMENTS_CPU = 2**20
LOSS_CHUNK_ELEMENTS_GPU = 2**26


def _row_chunks(flat: torch.Tensor):
    budget = LOSS_CHUNK_ELEMENTS_CPU if flat.device.type == "cpu" else LOSS_CHUNK_ELEMENTS_GPU
    rows = max(1, budget // max(1, flat.size(1)))
    return [(r0, min(r0 + rows, flat.size(0))) for r0 in range(0, flat.size(0), rows)]


def _chunk_buffer(flat: torch.Tensor, chunks) -> torch.Tensor | None:
    """One float32 buffer for every chunk of a call (None for float32 logits: their chunks are
    read, and their gradient written, in place). A fresh (n, V) tensor per chunk is a fresh
    multi-MB allocation that glibc can map from the kernel and fault in page by page: profiled
    in a bf16 TCN-small step, a 131 x 8000 chunk's `.float()` took 0.9 ms on average, where a
    copy into memory in use takes 0.07 ms. The buffer made the TCN-small step 2-3% faster."""
    if flat.dtype == torch.float32:
        return None
    rows = max(r1 - r0 for r0, r1 in chunks)
    return torch.empty(rows, flat.size(1), dtype=torch.float32, device=flat.device)


class _LabelSmoothedNLL(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of logits (N, V) and, not differentiable, the summed
    NLL, over the rows `keep` (N,); the same values as F.cross_entropy(label_smoothing=eps):

        loss_row = (1 - eps) * (lse - x[y]) + eps * (lse - mean(x)),  lse = logsumexp(x)
        d loss_row / dx = softmax(x) - (1 - eps) * onehot(y) - eps / V

    Forward reads the logits once per chunk (logsumexp and mean) and keeps only lse (N,); backward
    writes the gradient chunk by chunk from lse. No (N, V) log-probabilities, one-hot or mask."""

    @staticmethod
    def forward(ctx, flat, target, keep, smoothing: float):
        n, v = flat.shape
        lse = torch.empty(n, dtype=torch.float32, device=flat.device)  # (N,)
        mean = torch.empty(n, dtype=torch.float32, device=flat.device)  # (N,)
        chunks = _row_chunks(flat)
        buf = _chunk_buffer(flat, chunks)
        for r0, r1 in chunks:
            x = flat[r0:r1] if buf is None else buf[: r1 - r0].copy_(flat[r0:r1])  # (n, V) fp32
            torch.logsumexp(x, dim=1, out=lse[r0:r1])
            torch.mean(x, dim=1, out=mean[r0:r1])
        picked = flat.gather(1, target[:, None]).squeeze(1).float()  # (N,)
        nll = (lse - picked).masked_fill(~keep, 0.0)  # (N,)
        smooth = (lse - mean).masked_fill(~keep, 0.0)  # (N,)
        ctx.save_for_backward(flat, target, keep, lse)
        ctx.smoothing = smoothing
        nll_sum = nll.sum()
        ctx.mark_non_differentiable(nll_sum)
        return (1.0 - smoothing) * nll_sum + smoothing * smooth.sum(), nll_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_nll):
        flat, target, keep, lse = ctx.saved_tensors
        eps, v = ctx.smoothing, flat.size(1)
        scale = keep.float() * grad_loss  # (N,) 0 on padding rows
        picked = (-(1.0 - eps) * scale)[:, None]  # (N, 1)
        grad = torch.empty_like(flat)  # (N, V)
        chunks = _row_chunks(flat)
        buf = _chunk_buffer(flat, chunks)
        for r0, r1 in chunks:
            # float32 logits: the gradient is computed in its own rows, no copy
            out = grad[r0:r1] if buf is None else buf[: r1 - r0]
            chunk = torch.sub(flat[r0:r1], lse[r0:r1, None], out=out).exp_()  # (n, V)
            if eps:
                chunk.sub_(eps / v)
            chunk.mul_(scale[r0:r1, None])  # softmax - eps / V, scaled; 0 on padding rows
            # in float32 and in the chunk: a CPU's scatter_add_ into bf16 converts the whole
            # (N, V) tensor to float32 and back (30 ms of a 3,000-token GNMT-small step)
            chunk.scatter_add_(1, target[r0:r1, None], picked[r0:r1])
            if buf is not None:
                grad[r0:r1] = chunk
        return grad, None, None, None


def label_smoothed_loss(logits, tgt_out_ids, pad_id: int, smoothing: float):
    """Summed loss and summed NLL over real target tokens (`_LabelSmoothedNLL`)."""
    flat = logits.reshape(-1, logits.size(-1))  # (B*T, V)
    target = tgt_out_ids.reshape(-1)  # (B*T,)
    return _LabelSmoothedNLL.apply(flat, target, target != pad_id, float(smoothing))


def make_optimizer(cfg: Config, model: torch.nn.Module, device: torch.device):
    t = cfg.train
    cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.Adam
    kwargs = {"lr": t.lr, "betas": tuple(t.betas), "weight_decay": t.weight_decay}
    if device.type in ("cuda", "cpu"):
        # one kernel for all parameters; on CUDA it skips on the device (GradScaler). On a CPU it
        # took a third of the foreach step's time (TCN small, 90 tensors: 3.5 ms against 12.6)
        kwargs["fused"] = True
    return cls(model.parameters(), **kwargs)


@dataclass
class StepResult:
    """What one step did: figures on the device, token counts (all ranks) on the host."""

    figures: torch.Tensor  # (3,) this rank's summed loss, summed NLL, and the gradient norm
    tgt_tokens: int  # target tokens of the step over all ranks
    src_tokens: int


class Updater:
    """The optimizer, its schedule and the scaler of one model; `step(batches)` is one update.

    `model` is the unwrapped module (its state dict is the checkpoint's); `dist.wrap(model)` is
    what forward and backward run through.
    """

    def __init__(
        self,
        cfg: Config,
        model: torch.nn.Module,
        dist: Distributed,
        dtype: torch.dtype,
        pad_id: int,
        total_steps: int,
    ):
        self.cfg, self.model, self.dist, self.dtype = cfg, model, dist, dtype
        self.device, self.pad_id = dist.device, pad_id
        self.train_model = dist.wrap(model)
        self.optimizer = make_optimizer(cfg, model, self.device)
        self.time_share = 0.0  # of train.max_minutes spent; set by the trainer, same on all ranks
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(cfg, s + 1, total_steps, self.time_share)
        )
        self.dynamic_scale = dtype == torch.float16
        self.scaler = torch.amp.GradScaler(
            self.device.type, init_scale=FP16_INIT_SCALE if self.dynamic_scale else 1.0
        )

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )

    def backward(self, batches: list[Batch]) -> StepResult:
        """Forward and backward over `batches` (on the CPU, pinned on CUDA); gradients are left
        in `.grad`, averaged over the ranks."""
        local = [sum(b.num_tgt_tokens for b in batches), sum(b.num_src_tokens for b in batches)]
        tgt_tokens, src_tokens = (int(n) for n in self.dist.all_sum(local))
        # DDP averages the ranks' gradients: scaling each rank's summed loss by
        # world_size / (target tokens of all ranks) makes that average the gradient of the
        # union batch's summed loss over its target tokens, as one process would compute it.
        weight = self.dist.world_size / max(tgt_tokens, 1)
        sums = torch.zeros(2, device=self.device)  # (2,) summed loss, summed NLL
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            with self.dist.no_sync(self.train_model, skip=i < len(batches) - 1):
                with self._autocast():
                    logits = self.train_model(batch.src_ids, batch.src_lens, batch.tgt_in_ids)
                loss, nll = label_smoothed_loss(
                    logits, batch.tgt_out_ids, self.pad_id, self.cfg.train.label_smoothing
                )
                self.scaler.scale(loss * weight).backward()
            sums += torch.stack((loss.detach(), nll))  # (2,)
        return StepResult(sums, tgt_tokens, src_tokens)

    def update(self) -> torch.Tensor:
        """Clip, then apply the gradients unless one of them is inf/NaN; returns their norm
        before clipping (0-d, on the device; non-finite = the update was skipped)."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.train.clip_norm or math.inf  # inf: only measure the norm
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)  # skipped when unscale_ found an inf/NaN gradient
        self.scaler.update(None if self.dynamic_scale else 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm.detach().float()

    def step(self, batches: list[Batch]) -> StepResult:
        """One optimizer update: `figures` = (summed loss, summed NLL, gradient norm)."""
        result = self.backward(batches)
        norm = self.update()
        result.figures = torch.cat((result.figures, norm.reshape(1)))  # (3,)
        return result

    def loss_scale(self) -> float | None:
        """The fp16 loss scale (reads the device: call it at logging points), else None."""
        return self.scaler.get_scale() if self.dynamic_scale else None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.dynamic_scale else {},
        }

    def load_state_dict(self, state: dict) -> str | None:
        """Restore the optimizer, schedule and fp16 scale; returns a note for the log when a
        saved fp16 scale is below `train.min_loss_scale` and restarts from its initial value
        (so that resuming a run stopped for it does not stop again at once)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        saved = state.get("scaler") or {}
        if not (self.dynamic_scale and saved):
            return None
        if saved["scale"] < self.cfg.train.min_loss_scale:
            return f"fp16 loss scale {saved['scale']:g} restarts at {FP16_INIT_SCALE:g}"
        self.scaler.load_state_dict(saved)
        return None

    def reset_schedule(self, step: int, total_steps: int) -> None:
        """A fresh optimizer that continues the lr schedule at `step` (--reset-optimizer)."""
        self.scheduler.last_epoch = step
        factor = lr_factor(self.cfg, step + 1, total_steps, self.time_share)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * factor
