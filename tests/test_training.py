"""Training: the train CLI writes its run folder; resume equals an uninterrupted run."""

import json

import pytest
import torch
from helpers_training import prepare_tiny
from helpers_training import tiny as _tiny

from nmt import checkpoint
from nmt.cli import main
from nmt.config import load_config
from nmt.training import Stop, Trainer, TrainState, lr_factor


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_tiny(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared_sampling(tmp_path_factory):  # BPE-dropout: every batch segmented afresh
    return prepare_tiny(tmp_path_factory.mktemp("corpus"), "data.sampling_alpha=0.1")


def test_train_cli_writes_run_folder(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--", *_tiny(prepared, out)]) == 0
    for name in ("last.pt", "best.pt", "config.yaml", "log.jsonl"):
        assert (out / name).exists(), name
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    kinds = {r["type"] for r in records}
    assert {"train", "valid"} <= kinds
    valid = [r for r in records if r["type"] == "valid"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["stop"] == "max_epochs" and summary["epoch"] == 2
    assert [r["epoch"] for r in valid] == [1, 2] and valid[-1]["step"] == summary["step"]
    ckpt = checkpoint.load(out / "last.pt")
    # the logged figures are those of the saved weights: the final validation, redone
    assert _validate(ckpt["model"], out) == {k: pytest.approx(valid[-1][k]) for k in FIGURES}
    assert ckpt["config"]["train"]["out_dir"] == str(out)
    assert "train_state" in ckpt and "train_state" not in checkpoint.load(out / "best.pt")
    assert set(ckpt["train_state"]) == {*PREVIOUS_KEYS, "validated_step", "init_from"}


# the train_state keys of the checkpoints of the previous version (still resumed), besides
# rng_by_rank (torchrun only)
PREVIOUS_KEYS = ("step", "epoch", "best", "bad_validations", "optimizer", "scheduler", "scaler")
PREVIOUS_KEYS += ("sampler", "rng", "train_seconds")


def test_train_state_to_dict_and_from_dict_mirror_each_other():
    import numpy as np

    from nmt.batching import TokenBatchSampler

    def sampler():
        return TokenBatchSampler(np.arange(2, 60), np.arange(2, 60), 80, seed=3)

    saving = sampler()
    saving.set_epoch(2)
    state = TrainState(7, 2, 3, best=1.5, bad_validations=1, train_seconds=10.0)
    state.validated_step, state.init_from = 6, "a.pt"
    saved = state.to_dict(saving)
    assert saved["sampler"] == {"epoch": 2, "position": 3, "world_size": 1}
    loading = sampler()
    restored = TrainState.from_dict(saved, loading)
    assert restored == TrainState(7, 2, 3, 1.5, 1, saved["train_seconds"], 6, "a.pt")
    assert saved["train_seconds"] >= 10.0 and (loading.epoch, loading.position) == (2, 3)
    previous = {k: saved[k] for k in ("step", "epoch", "best", "bad_validations", "sampler")}
    assert TrainState.from_dict(previous, sampler()) == TrainState(7, 2, 3, 1.5, 1)


def _weights(path):
    return checkpoint.load(path)["model"]


FIGURES = ("loss", "ppl", "bleu")


def _validate(weights: dict, out_dir) -> dict:
    """The validation figures of `weights`, computed afresh for the run in `out_dir`."""
    trainer = Trainer(load_config(str(out_dir / "config.yaml"), [f"train.out_dir={out_dir}/x"]))
    trainer.model.load_state_dict(weights)
    return trainer.validator(trainer.model)


@pytest.mark.parametrize("data_fixture", ["prepared", "prepared_sampling"])
def test_resume_equals_uninterrupted_run(data_fixture, tmp_path, monkeypatch, request):
    prepared = request.getfixturevalue(data_fixture)
    full = tmp_path / "full"
    Trainer(load_config(None, _tiny(prepared, full))).run()

    cut = tmp_path / "cut"
    cfg = load_config(None, _tiny(prepared, cut))
    trainer = Trainer(cfg)
    steps_per_epoch = len(trainer.sampler)
    stop_at = steps_per_epoch + 2  # mid-way through the second epoch
    original = Trainer._optimizer_step

    def stop_after(self, batches):
        original(self, batches)
        if self.state.step == stop_at:
            self.signals.received = Stop.SIGTERM

    monkeypatch.setattr(Trainer, "_optimizer_step", stop_after)
    assert trainer.run()["stop"] == "SIGTERM"
    monkeypatch.setattr(Trainer, "_optimizer_step", original)
    assert checkpoint.load(cut / "last.pt")["train_state"]["step"] == stop_at

    resumed = Trainer(load_config(None, _tiny(prepared, cut)), resume=True)
    assert resumed.state.step == stop_at
    assert resumed.run()["stop"] == "max_epochs"
    a, b = _weights(full / "last.pt"), _weights(cut / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_refuses_changed_model_and_lr_without_reset(prepared, tmp_path):
    from nmt.errors import UsageError

    out = tmp_path / "run"
    Trainer(load_config(None, _tiny(prepared, out, "train.max_epochs=1"))).run()
    with pytest.raises(UsageError, match="different model shape: model.hidden"):
        Trainer(load_config(None, _tiny(prepared, out, "model.hidden=48")), resume=True)
    with pytest.raises(UsageError, match="--reset-optimizer"):
        Trainer(load_config(None, _tiny(prepared, out, "train.lr=0.5")), resume=True)
    t = Trainer(
        load_config(None, _tiny(prepared, out, "train.lr=0.5", "train.max_epochs=2")),
        resume=True,
        reset_optimizer=True,
    )
    assert t.optimizer.param_groups[0]["initial_lr"] == 0.5


def test_resume_without_checkpoint_is_a_usage_error(prepared, tmp_path, capsys):
    code = main(["train", "--resume", "--", *_tiny(prepared, tmp_path / "none")])
    assert code == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_gnmt_schedule_warmup_then_halvings():
    cfg = load_config(
        None, ["train.warmup_steps=10", "train.decay_start=0.5", "train.decay_times=2"]
    )
    assert lr_factor(cfg, 0, 100) == pytest.approx(0.01)
    assert lr_factor(cfg, 10, 100) == 1.0
    assert lr_factor(cfg, 50, 100) == 1.0
    assert lr_factor(cfg, 51, 100) == 0.5
    assert lr_factor(cfg, 100, 100) == 0.25
    inv = load_config(None, ["train.schedule=inverse_sqrt", "train.warmup_steps=4"])
    assert lr_factor(inv, 2, 0) == 0.5 and lr_factor(inv, 16, 0) == 0.5


def test_gnmt_halvings_follow_the_time_budget_when_it_runs_out_first():
    cfg = load_config(None, ["train.decay_start=0.5", "train.decay_times=2"])
    # time shares (0.5, 0.75] give one halving, (0.75, 1] two; steps alone give none yet
    assert lr_factor(cfg, 400, 1000, time_share=0.5) == 1.0
    assert lr_factor(cfg, 400, 1000, time_share=0.6) == 0.5
    assert lr_factor(cfg, 400, 1000, time_share=0.9) == 0.25
    assert lr_factor(cfg, 1000, 1000, time_share=0.1) == 0.25  # steps ran out first
    assert lr_factor(cfg, 400, 0, time_share=0.8) == 0.25  # no step budget: time alone


def test_a_run_with_a_time_budget_decays_as_the_time_is_spent(prepared, tmp_path, monkeypatch):
    extra = ["train.max_minutes=1000", "train.decay_start=0.5", "train.decay_times=2"]
    extra += ["train.warmup_steps=0", "train.max_epochs=0", "train.max_steps=8"]
    trainer = Trainer(load_config(None, _tiny(prepared, tmp_path / "run", *extra)))
    monkeypatch.setattr(TrainState, "seconds", lambda self: 0.9 * 60 * 1000)  # 90% spent
    assert trainer.run()["stop"] == "max_steps"  # 1000 minutes not reached: no time stop
    records = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if r["type"] == "train"]
    # 8 steps of a step budget of 8 would only halve from step 5; time halves twice from step 1
    assert lrs and all(lr == pytest.approx(0.01 * 0.25) for lr in lrs)


def test_non_finite_steps_are_skipped_then_stop_the_run(prepared, tmp_path, monkeypatch):
    from nmt import optimization
    from nmt.errors import NmtError

    out = tmp_path / "run"
    Trainer(load_config(None, _tiny(prepared, out, "train.max_epochs=1"))).run()
    before = (out / "last.pt").read_bytes()
    real = optimization.label_smoothed_loss
    calls = {"n": 0}

    def sometimes_nan(logits, *args):
        calls["n"] += 1
        loss, nll = real(logits, *args)
        return (loss * float("nan"), nll) if calls["n"] in (2, 4, 5, 6, 7) else (loss, nll)

    monkeypatch.setattr(optimization, "label_smoothed_loss", sometimes_nan)
    trainer = Trainer(
        load_config(None, _tiny(prepared, out, "train.max_epochs=3", "train.max_bad_steps=4")),
        resume=True,
    )
    start = trainer.state.step
    with pytest.raises(NmtError, match="4 non-finite losses in a row: stopping"):
        trainer.run()
    assert trainer.health.total == 5
    # found at the log point (every 2 steps) that follows the 4th bad step in a row
    assert start + 7 <= trainer.state.step <= start + 8
    assert (out / "last.pt").read_bytes() == before  # the last good checkpoint is intact
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    bad = [r for r in records if r["type"] == "bad_step"]
    assert [r["step"] for r in bad] == [start + s for s in (2, 4, 5, 6, 7)]
    assert [r["in_a_row"] for r in bad] == [1, 1, 2, 3, 4]


def test_a_step_with_nan_gradients_leaves_weights_and_optimizer_alone(
    prepared, tmp_path, monkeypatch
):
    from nmt import optimization

    trainer = Trainer(load_config(None, _tiny(prepared, tmp_path / "run")))
    batches = iter(trainer.loader)
    trainer.updater.step([next(batches)])  # one good step: Adam has state from here on
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    adam = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    real = optimization.label_smoothed_loss
    monkeypatch.setattr(
        optimization,
        "label_smoothed_loss",
        lambda logits, *a: (real(logits, *a)[0] * float("inf"), real(logits, *a)[1]),
    )
    result = trainer.updater.step([next(batches)])
    assert not torch.isfinite(result.figures[2])  # the norm tells the caller it was skipped
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for k, v in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(v, adam[k]), k


def test_a_collapsed_fp16_loss_scale_stops_with_a_clear_error_and_saves_last(
    prepared, tmp_path, monkeypatch
):
    from nmt.errors import NmtError

    out = tmp_path / "run"
    trainer = Trainer(load_config(None, _tiny(prepared, out, "train.max_steps=6")))
    monkeypatch.setattr(trainer.updater, "loss_scale", lambda: 3e-5)  # as an fp16 run reads it
    with pytest.raises(NmtError, match=r"fell to 3e-05, below train.min_loss_scale \(0.0001\)"):
        trainer.run()
    assert checkpoint.load(out / "last.pt")["train_state"]["step"] == 2  # the first log point
    error = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
    assert error == {**error, "type": "error", "step": 2, "loss_scale": 3e-5}


@pytest.mark.parametrize("saved, restored", [(512.0, 512.0), (1e-6, 2.0**16)])
def test_a_saved_fp16_scale_below_the_minimum_restarts_on_resume(saved, restored):
    from nmt.distributed import Distributed
    from nmt.optimization import Updater

    def updater():  # fp16 state handling needs no fp16 kernel: the CPU can test it
        cpu = Distributed.single(torch.device("cpu"))
        return Updater(load_config(None, []), torch.nn.Linear(2, 2), cpu, torch.float16, 0, 10)

    state = updater().state_dict()
    assert state["scaler"]["scale"] == 2.0**16
    fresh = updater()
    note = fresh.load_state_dict({**state, "scaler": {**state["scaler"], "scale": saved}})
    assert fresh.loss_scale() == restored
    assert (note is None) == (saved == restored)


def test_fp16_on_the_cpu_is_a_usage_error(prepared, tmp_path):
    from nmt.errors import UsageError

    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        Trainer(load_config(None, _tiny(prepared, tmp_path, "train.precision=fp16")))


def test_checkpoint_round_trip_gives_bit_identical_outputs(prepared, tmp_path):
    from nmt.translator import Translator

    out = tmp_path / "run"
    trainer = Trainer(load_config(None, _tiny(prepared, out, "train.max_epochs=1")))
    trainer.run()
    trainer.model.eval()
    translator = Translator.from_checkpoint(out / "last.pt", device="cpu", dtype="float32")
    src = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    lens = torch.tensor([4, 3])
    tgt = torch.tensor([[2, 5, 6], [2, 7, 0]])
    with torch.no_grad():
        assert torch.equal(trainer.model(src, lens, tgt), translator.model(src, lens, tgt))
    lines = ["w1 w2 w3", "w4", ""]
    in_memory = Translator(trainer.model, trainer.tokenizer, trainer.cfg, torch.device("cpu"))
    hyps = translator.translate_nbest(lines, n_best=3, beam_size=3)  # texts and exact scores
    assert hyps == in_memory.translate_nbest(lines, n_best=3, beam_size=3)
    assert len({text for text, _ in hyps[0]}) == 3


def _bf16_lstm_runs_here() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.nn.LSTM(4, 4)(torch.zeros(2, 1, 4))
        return True
    except RuntimeError:
        return False


def test_bf16_on_a_cpu_without_bf16_lstm_kernels_is_one_clear_error(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--", *_tiny(prepared, out, "train.precision=bf16", "train.max_steps=2")])
    err = capsys.readouterr().err
    if _bf16_lstm_runs_here():  # a build with oneDNN bf16 RNN kernels trains
        assert code == 0
        return
    assert code == 2 and "Traceback" not in err
    assert "train.precision=bf16: this PyTorch" in err and "no bf16 LSTM kernel" in err
    assert not (out / "last.pt").exists()


def test_auto_precision_says_what_it_chose(prepared, tmp_path, capsys):
    """train.precision=auto trains in the probe's choice between float32 and bf16, and the run
    says which (with the probe's figures), so a user can see what ran."""
    from nmt.devices import probe

    trainer = Trainer(load_config(None, _tiny(prepared, tmp_path, "train.precision=auto")))
    chosen = probe().fastest(("float32", "bfloat16"))
    assert trainer.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[chosen]
    err = capsys.readouterr().err
    assert f"training precision: {chosen} (auto; probe GFLOP/s" in err


def test_accumulation_trains_on_the_epochs_last_shorter_group(prepared, tmp_path):
    batches = len(Trainer(load_config(None, _tiny(prepared, tmp_path / "probe"))).sampler)
    assert batches >= 3
    accum = batches - 1  # one full group, then a group of one batch
    cfg = load_config(None, _tiny(prepared, tmp_path / "run", f"train.accum_steps={accum}"))
    trainer = Trainer(cfg)
    assert trainer.total_steps == 2 * 2  # 2 epochs of 2 steps each
    summary = trainer.run()
    assert summary["step"] == trainer.total_steps and summary["stop"] == "max_epochs"


def test_average_last_averages_the_final_checkpoints_and_validates_them(prepared, tmp_path, capsys):
    out = tmp_path / "run"
    extra = ("train.save_every=4", "train.keep_last=3", "train.average_last=3")
    assert main(["train", *_tiny(prepared, out, *extra)]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    (avg_record,) = [r for r in records if r["type"] == "average"]
    final_step = max(r["step"] for r in records)
    assert avg_record["of"][-1] == f"step_{final_step}.pt"  # the final weights are included
    assert len(avg_record["of"]) == 3
    figures = _validate(checkpoint.load(out / "averaged.pt")["model"], out)
    assert figures == {k: pytest.approx(avg_record[k]) for k in FIGURES}
    paths = [out / name for name in avg_record["of"]]
    expected = checkpoint.average(paths)["model"]
    averaged = checkpoint.load(out / "averaged.pt")
    best = checkpoint.load(out / "best.pt")["model"]
    last = checkpoint.load(out / "last.pt")["model"]
    final = checkpoint.load(out / f"step_{final_step}.pt")["model"]
    for name, tensor in expected.items():
        assert torch.equal(averaged["model"][name], tensor), name
        assert torch.equal(last[name], final[name]), name  # `last` keeps the unaveraged weights
        assert torch.equal(best[name], tensor) == avg_record["became_best"], name
    assert "valid averaged" in capsys.readouterr().err

    # the same average by hand, and its errors
    assert main(["average", str(out), "--last", "3", "-o", str(tmp_path / "a.pt")]) == 0
    by_hand = checkpoint.load(tmp_path / "a.pt")["model"]
    assert all(torch.equal(by_hand[k], t) for k, t in expected.items())
    assert main(["average", str(out), "--last", "9", "-o", str(tmp_path / "b.pt")]) == 2
    assert main(["average", str(out / "nope.pt"), "-o", str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert "3 numbered checkpoints" in err and "nope.pt: checkpoint not found" in err
    assert not (tmp_path / "b.pt").exists()
    from nmt.translator import Translator

    assert len(Translator.from_checkpoint(tmp_path / "a.pt").translate(["w1 w2", ""])) == 2


def test_average_last_needs_numbered_checkpoints():
    from nmt.config import ConfigError

    with pytest.raises(ConfigError, match="average_last: needs train.save_every"):
        load_config(None, ["train.average_last=3"])
    with pytest.raises(ConfigError, match="average_last <= train.keep_last"):
        load_config(None, ["train.average_last=3", "train.save_every=10", "train.keep_last=2"])


def test_validation_computes_each_weight_norm_once(prepared, tmp_path):
    """A TCN's convs are weight-normalised (a parametrization: g * v / ||v|| on every read of
    `.weight`). A validation reads them at every conv call of every greedy step; it computes
    each one once (`parametrize.cached`), and after it training reads fresh weights again."""
    from torch.nn.utils import parametrize

    from nmt import validation
    from nmt.models import build_model_for
    from nmt.tokenizer import Tokenizer

    overrides = _tiny(
        prepared, tmp_path / "run", "model.arch=tcn", "model.levels=2", "model.channels=16"
    )
    overrides.append("data.max_len=12")  # the receptive field of 2 levels covers 13
    cfg = load_config(None, overrides)
    tok = Tokenizer.load(cfg.data.dir)
    model = build_model_for(cfg.model, tok)
    validator = validation.Validator.of(cfg.data.dir, tok, cfg, torch.device("cpu"))
    calls = []
    norms = [m for m in model.modules() if parametrize.is_parametrized(m, "weight")]
    assert len(norms) == 8  # 2 convs in each of 2 blocks, encoder and decoder
    for module in norms:
        module.parametrizations.weight.register_forward_hook(lambda *_: calls.append(1))
    result = validator(model)
    assert "bleu" in result and len(calls) == len(norms)  # greedy ran; one norm each
    conv = model.decoder.blocks[0].conv1
    first, second = conv.weight, conv.weight  # outside a validation: computed at each read
    assert len(calls) == len(norms) + 2 and first is not second
