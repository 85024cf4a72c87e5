"""Distributed training on the CPU: 2 ranks over gloo on 127.0.0.1.

The in-process tests fork two ranks with the variables torchrun would set; the slow test
runs the real `torchrun ... -m nmt train` command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers_training import prepare_tiny, torchrun
from helpers_training import tiny as _tiny

from nmt import batching, checkpoint
from nmt.config import load_config
from nmt.distributed import LaunchEnv, launch_env, rank_device
from nmt.errors import UsageError
from nmt.training import Trainer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("corpus"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -------------------------------------------------------------------- the launch environment
def test_no_torchrun_variables_is_a_single_process():
    assert launch_env({}) == LaunchEnv(rank=0, world_size=1, local_rank=0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}
    assert launch_env(env) == LaunchEnv(rank=3, world_size=4, local_rank=1)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0", "WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
        ({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK='x' is not a whole number"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "do not fit"),
    ],
)
def test_a_broken_launch_environment_is_one_usage_error(env, message):
    with pytest.raises(UsageError, match=message):
        launch_env(env)


def test_one_gpu_named_for_several_ranks_is_a_usage_error():
    env = LaunchEnv(rank=1, world_size=2, local_rank=1)
    assert rank_device("cpu", env) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert rank_device("auto", env) == torch.device("cpu")
        with pytest.raises(UsageError, match="CUDA is not available"):
            rank_device("cuda", env)
    else:
        assert rank_device("auto", env) == torch.device("cuda", 1)
        with pytest.raises(UsageError, match="CUDA_VISIBLE_DEVICES"):
            rank_device("cuda:0", env)


# -------------------------------------------------------------------- sampler positions
def test_sampler_position_maps_through_the_global_count_when_ranks_change():
    lens = torch.randint(2, 30, (500,), generator=torch.Generator().manual_seed(0)).numpy()
    two = [batching.TokenBatchSampler(lens, lens, 300, rank=r, world_size=2) for r in (0, 1)]
    for s in two:
        s.load_state_dict({"epoch": 1, "position": 5, "world_size": 2})
        assert s.position == 5  # same number of ranks: exact
    one = batching.TokenBatchSampler(lens, lens, 300)
    one.load_state_dict(two[0].state_dict())
    assert (one.epoch, one.position) == (1, 10)  # 2 ranks x 5 batches consumed
    three = batching.TokenBatchSampler(lens, lens, 300, rank=2, world_size=3)
    three.load_state_dict({"epoch": 1, "position": 5, "world_size": 2})
    assert three.position == 3  # 10 // 3: one batch is seen again, none is skipped
    old = batching.TokenBatchSampler(lens, lens, 300, rank=1, world_size=2)
    old.load_state_dict({"epoch": 0, "position": 8})  # a single-process state, before ranks
    assert old.position == 4


# -------------------------------------------------------------------- one step, 2 ranks vs 1
def _split_batches(trainer) -> tuple[list, list[list]]:
    """The whole batch (examples 0..15) for one process, and each rank's share of it as two
    micro-batches. The ranks get 6 and 10 examples: different numbers of target tokens, so a
    per-rank normalisation of the loss would give a different gradient."""
    tok = trainer.tokenizer

    def batch(indices):
        return batching.collate(
            trainer.train_set[indices], indices, tok.pad_id, tok.bos_id, tok.eos_id
        )

    whole = [batch(list(range(16)))]
    shares = [
        [batch([0, 1, 2]), batch([3, 4, 5])],
        [batch(list(range(6, 11))), batch([*range(11, 16)])],
    ]
    return whole, shares


def _one_step(trainer, batches) -> dict:
    trainer.updater.backward(batches)
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
    trainer.updater.update()
    return {"grads": grads, "weights": trainer.model.state_dict()}


def _join(rank: int, port: int) -> None:
    """This process as rank `rank` of 2 on 127.0.0.1:`port`, one torch thread."""
    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def _rank_worker(rank: int, port: int, overrides: list[str], out_dir: str) -> None:
    from nmt.distributed import launch

    _join(rank, port)
    with launch("cpu") as dist:
        trainer = Trainer(load_config(None, overrides), dist=dist)
        result = _one_step(trainer, _split_batches(trainer)[1][rank])
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def test_two_ranks_on_two_shares_step_like_one_process_on_the_whole_batch(prepared, tmp_path):
    overrides = _tiny(prepared, tmp_path / "run", "model.dropout=0", "train.clip_norm=0")
    trainer = Trainer(load_config(None, overrides))
    whole, shares = _split_batches(trainer)
    tokens = [sum(b.num_tgt_tokens for b in share) for share in shares]
    assert tokens[0] != tokens[1] and sum(tokens) == whole[0].num_tgt_tokens
    expected = _one_step(trainer, whole)

    # fork: the children start with everything imported (torch threads are 1: fork-safe)
    args = (_free_port(), overrides, str(tmp_path))
    mp.start_processes(_rank_worker, args=args, nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, grad in expected["grads"].items():
        for r in ranks:  # float sums in another order: close, not equal
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-5, atol=1e-7)
    for name, weight in expected["weights"].items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], weight, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------- stopping together
def _train_worker(rank, port, overrides, out_dir, signal_rank, signal_step) -> None:
    """One rank of a full run; rank `signal_rank` sends itself SIGTERM after `signal_step`."""
    from nmt.distributed import launch

    _join(rank, port)
    with launch("cpu") as dist:
        trainer = Trainer(load_config(None, overrides), dist=dist)
        step = trainer._optimizer_step

        def step_then_signal(batches):
            step(batches)
            if rank == signal_rank and trainer.state.step == signal_step:
                os.kill(os.getpid(), signal.SIGTERM)

        trainer._optimizer_step = step_then_signal
        summary = trainer.run()
    Path(out_dir, f"summary{rank}.json").write_text(json.dumps(summary))


def _run_two_ranks(overrides, out_dir, signal_rank=-1, signal_step=0) -> list[dict]:
    args = (_free_port(), overrides, str(out_dir), signal_rank, signal_step)
    mp.start_processes(_train_worker, args=args, nprocs=2, start_method="fork")
    return [json.loads(Path(out_dir, f"summary{r}.json").read_text()) for r in (0, 1)]


def test_a_signal_on_one_rank_stops_every_rank_after_the_same_step(prepared, tmp_path):
    out = tmp_path / "run"
    summaries = _run_two_ranks(_tiny(prepared, out), tmp_path, signal_rank=1, signal_step=3)
    assert [(s["stop"], s["step"]) for s in summaries] == [("SIGTERM", 3)] * 2
    assert checkpoint.load(out / "last.pt")["train_state"]["step"] == 3  # written by rank 0


def test_early_stopping_on_rank_0_stops_every_rank(prepared, tmp_path):
    overrides = _tiny(
        prepared, tmp_path / "run", "train.lr=0", "train.valid_every=2", "train.patience=1"
    )  # nothing learns: the second validation does not improve on the first
    summaries = _run_two_ranks(overrides, tmp_path)
    assert [(s["stop"], s["step"]) for s in summaries] == [("patience", 4)] * 2


# -------------------------------------------------------------------- torchrun, end to end
def _weights(path: Path) -> dict:
    return checkpoint.load(path)["model"]


@pytest.mark.slow
def test_torchrun_two_ranks_train_save_once_and_resume_exactly(prepared, tmp_path):
    constant = ("train.schedule=constant",)  # the lr does not depend on the run's length
    full = tmp_path / "full"
    result = torchrun(2, "--", *_tiny(prepared, full, *constant))
    summaries = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["world_size"] == 2  # rank 0 alone prints
    assert summaries[0]["stop"] == "max_epochs"
    assert sorted(p.name for p in full.iterdir()) == [
        "best.pt",
        "config.yaml",
        "last.pt",
        "log.jsonl",
    ]
    records = [json.loads(line) for line in (full / "log.jsonl").read_text().splitlines()]
    assert sum(r["type"] == "valid" for r in records) == 2  # once per epoch, not per rank
    steps = [r["step"] for r in records if r["type"] == "train"]
    assert steps == sorted(set(steps)) and steps
    state = checkpoint.load(full / "last.pt")
    assert state["model"].keys() == _weights(full / "best.pt").keys()
    assert not any(k.startswith("module.") for k in state["model"])
    assert len(state["train_state"]["rng_by_rank"]) == 2
    per_epoch = summaries[0]["step"] // 2

    cut = tmp_path / "cut"
    stop_at = per_epoch + 2  # mid-way through the second epoch
    torchrun(2, "--", *_tiny(prepared, cut, *constant, f"train.max_steps={stop_at}"))
    saved = checkpoint.load(cut / "last.pt")["train_state"]
    assert saved["step"] == stop_at
    assert saved["sampler"] == {"epoch": 1, "position": 2, "world_size": 2}
    one_rank = tmp_path / "one_rank"
    shutil.copytree(cut, one_rank)

    torchrun(2, "--resume", "--", *_tiny(prepared, cut, *constant))
    a, b = _weights(full / "last.pt"), _weights(cut / "last.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # the same checkpoint, resumed by one process: the epoch goes on after 2 x 2 batches
    trainer = Trainer(load_config(None, _tiny(prepared, one_rank, *constant)), resume=True)
    state = trainer.state
    assert (state.step, state.epoch, state.batches_done) == (stop_at, 1, 4)
    summary = trainer.run()
    assert summary["stop"] == "max_epochs"
    assert summary["step"] == stop_at + len(trainer.sampler) - 4
