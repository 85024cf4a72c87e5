"""Several training processes as one: the `torchrun` environment and the process group.

Owns: reading RANK, WORLD_SIZE and LOCAL_RANK (what `torchrun` sets for each process), the
device of each rank (cuda:LOCAL_RANK on CUDA, the CPU otherwise), the backend (nccl on CUDA,
gloo on the CPU), wrapping a model in DistributedDataParallel, the few collectives the training
loop needs, and tearing the group down. Does not own what is exchanged (nmt.training does).

Small control messages (token counts, stop decisions, RNG states, the validation verdict) go
through a gloo group on the CPU even when gradients go through NCCL: they are host values, so
exchanging them never waits for the GPU to finish its queued work.

A single process (no torchrun, or WORLD_SIZE=1) gets `Distributed.single(device)`, whose
collectives return their input: the training loop has one code path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nmt.devices import resolve_device
from nmt.errors import NmtError, UsageError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a launch: global rank, number of processes, rank on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch described by the torchrun variables; a single process when they are absent."""
    env = os.environ if environ is None else environ
    if not any(key in env for key in ENV_KEYS):
        return LaunchEnv()
    values, problems = {}, []
    for key in ENV_KEYS:
        text = env.get(key)
        if text is None:
            problems.append(f"{key} is not set")
            continue
        try:
            values[key] = int(text)
        except ValueError:
            problems.append(f"{key}={text!r} is not a whole number")
    if not problems:
        rank, world, local = values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"]
        if world < 1 or not 0 <= rank < world or local < 0:
            problems.append(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not fit")
    if problems:
        raise UsageError(
            "distributed launch: " + "; ".join(problems) + " (start several processes with "
            "`torchrun --nproc-per-node=N -m nmt train ...`, which sets RANK, WORLD_SIZE and "
            "LOCAL_RANK)"
        )
    return LaunchEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"])


def rank_device(name: str, env: LaunchEnv) -> torch.device:
    """The device of one rank of a multi-process launch, from the `train.device` setting."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if env.local_rank >= count:
            raise UsageError(
                f"distributed launch: LOCAL_RANK {env.local_rank} but this node has {count} CUDA "
                f"device(s): start at most {count} processes per node (--nproc-per-node)"
            )
        return torch.device("cuda", env.local_rank)
    device = resolve_device("cpu" if name == "auto" else name)
    if device.type == "cuda":
        raise UsageError(
            f"train.device={name!r} names one GPU, but torchrun started {env.world_size} "
            "processes and each uses cuda:LOCAL_RANK: set train.device=cuda (or auto) and choose "
            "the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return device


class Distributed:
    """This process's place in the process group, and the collectives training uses.

    Every collective must be called by every rank at the same point of the run.
    """

    def __init__(self, env: LaunchEnv, device: torch.device, control_group=None):
        self.rank, self.world_size, self.local_rank = env.rank, env.world_size, env.local_rank
        self.device = device
        self._control = control_group  # gloo group for host values (None: the default group)

    @classmethod
    def single(cls, device: torch.device) -> Distributed:
        return cls(LaunchEnv(), device)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that validates, logs and writes checkpoints."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks (float64: exact for counts below 2**53)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64)  # (n,) on the CPU
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._control)
        return t.tolist()

    def all_max(self, value: int) -> int:
        if not self.enabled:
            return int(value)
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return int(t.item())

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's `obj` in rank order on rank 0; None on the others."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self._control)
        return out

    # ------------------------------------------------------------------ models
    def wrap(self, model: nn.Module) -> nn.Module:
        """The model that training calls: DDP around `model` on several ranks, else `model`.

        DDP copies rank 0's weights to every rank here, and averages gradients over the ranks
        during backward. State dicts are always taken from the unwrapped `model`, so a
        checkpoint has the same keys whatever the number of ranks.
        """
        if not self.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    @staticmethod
    def no_sync(model: nn.Module, skip: bool):
        """Inside it, backward accumulates gradients locally without averaging them (DDP);
        used for every batch of an accumulated step but the last."""
        if skip and isinstance(model, nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()


def _start_group(env: LaunchEnv, device: torch.device):
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        # env:// rendezvous: MASTER_ADDR and MASTER_PORT, set by torchrun
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    except ValueError as e:  # a variable missing or malformed
        raise UsageError(f"distributed launch: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:  # a peer that never came, an address that cannot be reached
        raise NmtError(
            f"distributed launch: rank {env.rank} could not join the process group "
            f"({str(e).splitlines()[0][:300]})"
        ) from None
    return dist.new_group(backend="gloo") if backend == "nccl" else None


@contextlib.contextmanager
def launch(device_name: str) -> Iterator[Distributed]:
    """The process group of this launch for the duration of the block (destroyed after it).

    A single process needs no group and gets `Distributed.single`.
    """
    env = launch_env()
    if env.world_size == 1:
        yield Distributed.single(resolve_device(device_name))
        return
    device = rank_device(device_name, env)
    control = _start_group(env, device)
    try:
        yield Distributed(env, device, control)
    finally:
        dist.destroy_process_group()
