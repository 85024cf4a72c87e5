"""The analytic FLOP counts that benchmarks/train_speed.py and decode_speed.py turn into MFU."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
from helpers_models import BOS, EOS, PAD, tiny_model
from torch.utils.flop_counter import FlopCounterMode

from nmt import metrics
from nmt.search import SearchSettings, beam_search
from nmt.translator import Translator

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flops = _load("flops")
decode_speed = _load("decode_speed")
train_speed = _load("train_speed")
attention_widths, forward_flops = flops.attention_widths, flops.forward_flops
weights_per_token, decode_flops = flops.weights_per_token, flops.decode_flops


def test_gnmt_count_worked_out_by_hand():
    model = tiny_model("gnmt", emb_dim=8, hidden=8, bi_hidden=4, enc_layers=2, dec_layers=2)
    model.decoder.out = torch.nn.Linear(8, 20)
    # encoder: 2 directions x (ih 16x8 + hh 16x4) + layer 2 (ih 32x8 + hh 32x8) = 384 + 512;
    # plus the attention key projection 8x8, run over the source
    # decoder: layer 1 (ih 32x8 + hh 32x8) + layer 2 (ih 32x16 + hh 32x8) + query 8x8 + out 20x8
    assert weights_per_token(model) == (384 + 512 + 64, 512 + 768 + 64 + 160)
    assert attention_widths(model) == (1, 8, 8)
    # sources of 3 and 2 tokens, targets of 4 and 1: 2*(960*5 + 1504*5) + 2*(8+8)*(3*4 + 2*1)
    assert forward_flops(model, [3, 2], [4, 1]) == 24640 + 448


@pytest.mark.parametrize("src_len, tgt_len", [(7, 5), (2, 3)])
def test_tcn_count_equals_torch_flop_counter_on_an_unpadded_sentence(src_len, tgt_len):
    # every TCN product is a conv, linear or bmm, which torch's counter sees; with one sentence
    # nothing is padding, so the two counts must agree exactly; 3 levels read up to 8 back, so
    # the short sentence leaves taps out, which must not be counted
    model = tiny_model("tcn", emb_dim=12, channels=16, levels=3)
    src = torch.randint(4, 23, (1, src_len))
    tgt = torch.randint(4, 23, (1, tgt_len))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(src, torch.tensor([src_len]), tgt)
    assert forward_flops(model, [src_len], [tgt_len]) == counter.get_total_flops()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_tcn_decode_count_equals_torch_flop_counter_over_a_search(beam_size):
    # the cached TCN step computes one column per layer, so its products are exactly the
    # decoder's weights per row-step plus attention over the real source: for one unpadded
    # sentence the count from the search's own work must equal torch's count of the search
    model = tiny_model("tcn", emb_dim=12, channels=16, levels=2)
    counted = decode_speed.WorkCounter(model)
    src = torch.randint(4, 23, (1, 7))
    counter = FlopCounterMode(display=False)
    with counter:
        s = SearchSettings(
            bos_id=BOS, eos_id=EOS, pad_id=PAD, beam_size=beam_size, max_len_a=0.0, max_len_b=6
        )
        beam_search(counted, src, torch.tensor([7]), s)
    assert counted.src_tokens == 7
    assert counted.row_steps >= beam_size * 2  # the beam ran a few steps
    assert decode_flops(model, *counted.work()) == counter.get_total_flops()


def test_decode_speed_times_settings_side_by_side_with_bleu_and_the_peer(tiny_checkpoint, tmp_path):
    import json

    src, ref = tmp_path / "src.txt", tmp_path / "ref.txt"
    src.write_text("the cat sat\nw1 w2 w3\n\na dog\n", encoding="utf-8")
    ref.write_text("THE CAT\nW3 W2 W1\n\nA DOG\n", encoding="utf-8")
    peer = tmp_path / "onmt.json"
    peer.write_text(json.dumps({"beam5_sents_per_s_median": 2.0, "greedy_sents_per_s_median": 4.0}))
    out = tmp_path / "figures.json"
    args = [str(tiny_checkpoint), "--src", str(src), "--ref", str(ref), "--peer", str(peer)]
    args += ["--dtype", "int8", "--shortlist", "0", "3", "--beam-sizes", "1", "5"]
    decode_speed.main([*args, "--repeats", "2", "--latency", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["results"]
    timed = [r for r in rows if r["path"] == "cached"]
    assert [(r["beam"], r["setting"]) for r in timed] == [
        (1, "int8"),
        (1, "int8 shortlist 3"),
        (5, "int8"),
        (5, "int8 shortlist 3"),
    ]
    translator = Translator.from_checkpoint(tiny_checkpoint, device="cpu", dtype="int8")
    lines, refs = src.read_text().splitlines(), ref.read_text().splitlines()
    for r in timed:
        hyps = translator.translate(lines, beam_size=r["beam"], shortlist=r.get("shortlist", 0))
        assert r["bleu"] == round(metrics.bleu(hyps, [refs]).score, 2)
        assert r["sentences"] == 4 and r["precision"] == "int8"
        first = next(f for f in timed if f["beam"] == r["beam"])
        assert r["speedup_vs_first"] == round(r["sents_per_s"] / first["sents_per_s"], 3)
        rate = 4.0 if r["beam"] == 1 else 2.0
        assert r["ratio_to_peer"] == round(r["sents_per_s"] / rate, 3)
    latency = [r for r in rows if r["path"] == "batch 1"]
    assert len(latency) == 4 and all(r["latency_ms_p95"] >= r["latency_ms_median"] for r in latency)


def test_cpu_precision_times_every_offered_precision():
    from nmt.devices import cpu_offers

    cpu_precision = _load("cpu_precision")
    figures = cpu_precision.main(["--rows", "3"])["ms_per_call"][3]
    offered = [n for n, why in cpu_offers().items() if not why and n != "float32"]
    layer = {"nn.LSTM float32", *(f"CellStep {n}" for n in offered)}
    layer |= {"nn.LSTM bf16 autocast"} if "bfloat16" in offered else set()
    assert set(figures["decoder layer step"]) == layer
    assert set(figures["output projection 256 -> 8000"]) == {"float32", *offered}


def test_tcn_parts_times_each_part_against_what_it_replaces(tmp_path):
    """The script checks each pair computes alike before timing, and writes every row."""
    import json

    out = tmp_path / "parts.json"
    _load("tcn_parts").main(["--repeats", "1", "--batch", "8", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    parts = [r["part"] for r in rows]
    assert parts[:4] == [
        "dropout p=0.2 float32 (nn.Dropout)",
        "dropout p=0.2 float32 (torch.rand)",
        "dropout p=0.2 float32 (15 bits)",
        "dropout p=0.2 bfloat16 (nn.Dropout)",
    ]
    assert parts[6] == "depthwise conv k=3 d=1"
    assert len(rows) == 11 and all(r["ours_ms"] > 0 and r["torch_ms"] > 0 for r in rows)


def test_train_parts_times_each_part_against_what_it_replaced(tmp_path):
    """The script checks each pair computes alike before timing, and writes every row."""
    import json

    out = tmp_path / "parts.json"
    _load("train_parts").main(["--repeats", "1", "--threads", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["part"].split(",")[0] for r in rows] == [
        "loss target scatter",
        "Adam step",
        "Adam step",
    ]
    assert all(r["ours_ms"] > 0 and r["before_ms"] > 0 for r in rows)


_TINY_TRAIN = ["model.channels=16", "model.emb_dim=16", "model.hidden=16", "model.bi_hidden=8"]
_TINY_TRAIN += ["model.levels=2", "data.max_len=12", "train.max_tokens=200"]
_TINY_TRAIN += ["tokenizer.vocab_size=300"]


def test_train_speed_against_steps_both_models_on_each_batch_in_turn(tmp_path, monkeypatch):
    """--against: every batch is one step of each model, the first model first on even batches
    and second on odd ones, so the machine's drift falls on both alike."""
    from nmt.optimization import Updater

    order, step = [], Updater.step

    def recorded(self, batches):
        order.append((self.cfg.model.arch, id(batches[0])))
        return step(self, batches)

    monkeypatch.setattr(Updater, "step", recorded)
    out = tmp_path / "paired.json"
    args = ["configs/tcn_small.yaml", "--against", "configs/gnmt_small.yaml", "--synthetic"]
    args += ["--threads", "1", "--windows", "2", "--steps", "2", "--warmup", "1"]
    assert train_speed.main([*args, "--json", str(out), *_TINY_TRAIN]) == 0
    batches = [order[i][1] for i in range(0, len(order), 2)]
    assert len(order) == 2 * 5 and len(set(batches)) == 5
    assert [b for _, b in order] == [b for b in batches for _ in (0, 1)]  # each batch twice
    timed = [arch for arch, _ in order[2:]]
    assert timed == ["tcn", "gnmt", "gnmt", "tcn", "tcn", "gnmt", "gnmt", "tcn"]
    result = json.loads(out.read_text())
    tcn, gnmt = result["results"]
    assert (tcn["config"], gnmt["config"]) == ("configs/tcn_small.yaml", "configs/gnmt_small.yaml")
    paired = tcn["paired"]
    assert len(paired["window_ratios"]) == 2
    ratios = paired["window_ratios"]
    assert paired["window_ratio_median"] == pytest.approx(statistics.median(ratios))
    assert paired["window_ratio_spread"] == [min(ratios), max(ratios)]


def test_train_speed_against_needs_the_same_batches(tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  arch: gnmt\ntrain:\n  max_tokens: 150\n")
    args = ["configs/tcn_small.yaml", "--against", str(other), "--synthetic"]
    args += ["--threads", "1", "--windows", "1", "--steps", "1", "--warmup", "0", *_TINY_TRAIN]
    args.remove("train.max_tokens=200")
    with pytest.raises(SystemExit, match="different batches"):
        train_speed.main(args)


def test_decode_speed_shortlist_0_is_off_even_when_the_checkpoint_has_one(tmp_path):
    """--shortlist 0 times the full output layer (and counts its work), not the checkpoint's
    search.shortlist: the presets store 20, and `0` used to fall back to it."""
    import json

    from conftest import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path, shortlist=3)
    src = tmp_path / "src.txt"
    src.write_text("the cat sat\nw1 w2 w3\na dog\n", encoding="utf-8")
    out = tmp_path / "figures.json"
    args = [
        str(ckpt),
        "--src",
        str(src),
        "--ref",
        str(src),
        "--dtype",
        "float32",
        "--shortlist",
        "0",
    ]
    decode_speed.main([*args, "--beam-sizes", "2", "--repeats", "1", "--json", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    assert row["shortlist"] == 0 and row["model_gflop"] > 0
    full = Translator.from_checkpoint(ckpt, device="cpu", dtype="float32")
    lines = src.read_text().splitlines()
    hyps = full.translate(lines, beam_size=2, shortlist=0)
    assert row["bleu"] == round(metrics.bleu(hyps, [lines]).score, 2)
