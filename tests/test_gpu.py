"""The CUDA paths: bf16 autocast, fp16 with a dynamic loss scale, no host syncs in the training
step, pinned batches from background workers, the Seq2Seq contract on cuDNN, NCCL with 2 GPUs.

Marked `gpu` (run with `pytest -m gpu`) and skipped without CUDA.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from helpers_models import BOS, EOS, PAD, VOCAB, random_batch, run_steps, tiny_model
from helpers_training import prepare_tiny, tiny, torchrun
from test_models import CASES

from nmt import checkpoint
from nmt.config import load_config
from nmt.errors import NmtError
from nmt.training import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("corpus"))


def _cuda(prepared, out_dir, *extra) -> list[str]:
    return tiny(prepared, out_dir, "train.device=cuda", *extra)


def _train_records(out_dir) -> list[dict]:
    records = [json.loads(x) for x in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "train"]


def test_bf16_training_runs_under_autocast_with_fp32_weights(prepared, tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(load_config(None, _cuda(prepared, out, "train.precision=bf16")))
    assert trainer.dtype == torch.bfloat16
    assert trainer.optimizer.defaults["fused"] is True
    dtypes = []
    hook = trainer.model.decoder.out.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    summary = trainer.run()
    hook.remove()
    assert summary["stop"] == "max_epochs"
    assert torch.bfloat16 in dtypes  # the training forward ran in bf16
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    records = _train_records(out)
    assert records and all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]  # it learns


def test_fp16_trains_with_a_dynamic_loss_scale_kept_in_the_checkpoint(prepared, tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(None, _cuda(prepared, out, "train.precision=fp16"))).run()
    records = _train_records(out)
    assert records and all(math.isfinite(r["loss"]) and r["loss_scale"] > 1 for r in records)
    scaler = checkpoint.load(out / "last.pt")["train_state"]["scaler"]
    assert scaler["scale"] == records[-1]["loss_scale"]


def test_fp16_scale_below_the_minimum_stops_then_resumes_in_bf16(prepared, tmp_path):
    out = tmp_path / "run"
    fp16 = ("train.precision=fp16", "train.min_loss_scale=1e9")
    cfg = load_config(None, _cuda(prepared, out, *fp16))
    with pytest.raises(NmtError, match=r"fp16 loss scale fell to .* train\.precision=bf16"):
        Trainer(cfg).run()  # 2**16 < 1e9: "collapsed" at the first log point
    assert checkpoint.load(out / "last.pt")["train_state"]["step"] == 2
    resumed = Trainer(load_config(None, _cuda(prepared, out, "train.precision=bf16")), resume=True)
    assert resumed.run()["stop"] == "max_epochs"


def test_training_steps_do_not_wait_for_the_gpu(prepared, tmp_path):
    trainer = Trainer(load_config(None, _cuda(prepared, tmp_path / "run")))
    batches = [batch for _, batch in zip(range(6), trainer.loader)]
    assert all(b.src_ids.is_pinned() and b.tgt_out_ids.is_pinned() for b in batches)
    trainer._optimizer_step(batches[:1])  # lazy set-up: scaler, Adam state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host-device sync raises
    try:
        for batch in batches[1:]:
            trainer._optimizer_step([batch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    trainer._check_steps()  # the one sync, at a log point
    assert trainer.window.good_steps == 6 and trainer.health.total == 0


@pytest.mark.parametrize("family, variant", CASES)
@torch.no_grad()
def test_step_equals_forward_on_cuda(family, variant, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 sums on both paths
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = tiny_model(family, **variant).cuda()
    src_ids, src_lens, tgt_in_ids = (
        t.cuda() for t in random_batch([7, 4, 9, 1], [6, 8, 3, 5], VOCAB)
    )
    expected = torch.log_softmax(model(src_ids, src_lens, tgt_in_ids).float(), -1)  # (B, T, V)
    log_probs, _ = run_steps(model, src_ids, src_lens, tgt_in_ids)
    torch.testing.assert_close(log_probs, expected, atol=1e-4, rtol=0)


def test_bf16_translation_on_cuda_keeps_one_line_per_input(tiny_checkpoint):
    from nmt.translator import Translator

    translator = Translator.from_checkpoint(tiny_checkpoint, device="cuda", dtype="bf16")
    assert {p.dtype for p in translator.model.parameters()} == {torch.bfloat16}
    lines = ["w1 w2 w3", "", "the cat sat on the mat"]
    assert len(translator.translate(lines, beam_size=5)) == 3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_on_two_gpus_with_nccl(prepared, tmp_path):
    out = tmp_path / "run"
    result = torchrun(2, "--", *_cuda(prepared, out, "train.max_steps=6"))
    summaries = [json.loads(x) for x in result.stdout.splitlines() if x.startswith("{")]
    assert [(s["world_size"], s["stop"]) for s in summaries] == [(2, "max_steps")]
    state = checkpoint.load(out / "last.pt")
    assert len(state["train_state"]["rng_by_rank"]) == 2


@pytest.mark.parametrize("family, variant", CASES)
@pytest.mark.parametrize("beam_size, beta", [(1, 0.0), (5, 0.0), (4, 0.2)])
@pytest.mark.parametrize("min_left", [16, 0])
@torch.no_grad()
def test_cuda_graph_search_equals_the_eager_searches(
    family, variant, beam_size, beta, min_left, monkeypatch
):
    """The captured graphs replay exactly the eager static steps (same kernels, same shapes),
    also when the batch shrinks (min_left 0: at every check), and find nmt.search's hypotheses:
    tokens equal, scores to float tolerance."""
    from test_search_graph import assert_same_results

    from nmt import search, search_graph

    monkeypatch.setattr(search_graph, "CHECK_EVERY", 2)
    monkeypatch.setattr(search_graph, "MIN_LEFT", min_left)

    torch.manual_seed(0)
    model = tiny_model(family, **variant).cuda().eval()
    src_ids, src_lens = (t.cuda() for t in random_batch([7, 4, 9, 1, 6], [1] * 5, VOCAB)[:2])
    s = search.SearchSettings(bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=beam_size, beta=beta,
                              alpha=0.6, max_len_a=1.5, max_len_b=5)  # fmt: skip
    # the Translator's way on CUDA: search_graph.runner, graphs (beam_size 1: greedy search)
    graphed = search.beam_search(model, src_ids, src_lens, s, run=search_graph.runner("cuda"))
    in_place = functools.partial(search_graph.search, mode="in_place")
    eager = search.beam_search(model, src_ids, src_lens, s, run=in_place)
    assert [[(h.tokens, h.score) for h in r] for r in graphed] == [
        [(h.tokens, h.score) for h in r] for r in eager
    ]
    assert_same_results(graphed, search.beam_search(model, src_ids, src_lens, s))
