"""The analytic FLOP count that benchmarks/train_speed.py turns into MFU."""

import importlib.util
from pathlib import Path

import torch
from test_models import tiny_model
from torch.utils.flop_counter import FlopCounterMode

_SPEC = importlib.util.spec_from_file_location(
    "flops", Path(__file__).resolve().parents[1] / "benchmarks" / "flops.py"
)
flops = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(flops)
attention_widths, forward_flops = flops.attention_widths, flops.forward_flops
weights_per_token = flops.weights_per_token


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


def test_tcn_count_equals_torch_flop_counter_on_an_unpadded_sentence():
    # every TCN product is a conv, linear or bmm, which torch's counter sees; with one sentence
    # nothing is padding, so the two counts must agree exactly
    model = tiny_model("tcn", emb_dim=12, channels=16, levels=2)
    src = torch.randint(4, 23, (1, 7))
    tgt = torch.randint(4, 23, (1, 5))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(src, torch.tensor([7]), tgt)
    assert forward_flops(model, [7], [5]) == counter.get_total_flops()
