"""The label-smoothed loss against F.cross_entropy: values, gradients, padding, chunking."""

import pytest
import torch
import torch.nn.functional as F

from nmt import optimization
from nmt.optimization import label_smoothed_loss

PAD = 0


def reference(logits, tgt_out_ids, smoothing):
    flat = logits.reshape(-1, logits.size(-1)).float()
    target = tgt_out_ids.reshape(-1)
    kw = dict(ignore_index=PAD, reduction="sum")
    loss = F.cross_entropy(flat, target, label_smoothing=smoothing, **kw)
    return loss, F.cross_entropy(flat, target, **kw)


def batch(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(4, 7, 50, generator=g)).to(dtype)  # (B, T, V)
    tgt_out_ids = torch.randint(1, 50, (4, 7), generator=g)  # (B, T)
    tgt_out_ids[1, 4:] = PAD  # padded tails: no loss, no gradient
    tgt_out_ids[3, 1:] = PAD
    return logits, tgt_out_ids


@pytest.mark.parametrize("chunk", [2**18, 50 * 3])  # one chunk; chunks of 3 rows, the last short
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradient_equal_cross_entropy(monkeypatch, chunk, smoothing):
    monkeypatch.setattr(optimization, "LOSS_CHUNK_ELEMENTS_CPU", chunk)
    logits, tgt = batch(torch.float32)
    mine = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    loss, nll = label_smoothed_loss(mine, tgt, PAD, smoothing)
    ref_loss, ref_nll = reference(theirs, tgt, smoothing)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(nll, ref_nll, rtol=1e-6, atol=1e-5)
    assert not nll.requires_grad
    (2.5 * loss).backward()
    (2.5 * ref_loss).backward()
    torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-6)
    assert mine.grad[3, 1:].abs().max() == 0  # padding rows get nothing


@pytest.mark.parametrize("chunk", [2**18, 50 * 3])  # chunks share one float32 buffer
def test_bf16_logits_give_a_bf16_gradient_of_the_float32_loss(monkeypatch, chunk):
    monkeypatch.setattr(optimization, "LOSS_CHUNK_ELEMENTS_CPU", chunk)
    logits, tgt = batch(torch.bfloat16, seed=1)
    mine = logits.clone().requires_grad_()
    theirs = logits.clone().requires_grad_()
    loss, _ = label_smoothed_loss(mine, tgt, PAD, 0.1)
    ref_loss, _ = reference(theirs, tgt, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-4)
    loss.backward()
    ref_loss.backward()
    assert mine.grad.dtype == torch.bfloat16
    torch.testing.assert_close(mine.grad.float(), theirs.grad.float(), rtol=1e-2, atol=1e-3)


def test_no_grad_validation_gives_the_same_sums():
    logits, tgt = batch(torch.float32, seed=2)
    with torch.no_grad():
        loss, nll = label_smoothed_loss(logits, tgt, PAD, 0.1)
    ref_loss, ref_nll = reference(logits, tgt, 0.1)
    torch.testing.assert_close((loss, nll), (ref_loss, ref_nll), rtol=1e-6, atol=1e-5)
