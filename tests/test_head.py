"""snip's loss at the head (scoring/head.py) against plain autograd over the full logits."""

from __future__ import annotations

import pytest
import torch

from spinctl.scoring import head as head_mod
from spinctl.scoring.head import head_loss
from spinctl.scoring.methods import response_loss


def batch(V=50, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 9, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (3, 9), generator=g)
    labels[0, :4] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 6:] = -100  # right padding
    labels[2, :] = -100  # no response at all: no loss, no gradient
    head = torch.nn.Linear(D, V, bias=False).double()
    head.weight.requires_grad_(False)
    return hidden, labels, head


def reference(hidden, labels, head, scale):
    h = hidden.clone().requires_grad_()
    loss = response_loss(head(h), labels) * scale
    loss.backward()
    return loss.detach(), h.grad


@pytest.mark.parametrize("chunk_rows", [1, 3, 1000])  # one row per chunk, uneven chunks, one chunk
def test_loss_and_gradient_match_full_logits(monkeypatch, chunk_rows):
    hidden, labels, head = batch()
    monkeypatch.setattr(head_mod, "CHUNK_BYTES", chunk_rows * head.weight.shape[0] * 4)
    want_loss, want_grad = reference(hidden, labels, head, 8.0)
    h = hidden.clone().requires_grad_()
    loss = head_loss(h, labels, head, 8.0)
    loss.backward()
    torch.testing.assert_close(loss.double(), want_loss.double(), rtol=1e-6, atol=0)  # both sum in fp32
    # both form the softmax in fp32 (the logits leave the model dtype there): fp32 rounding apart
    torch.testing.assert_close(h.grad, want_grad, rtol=1e-5, atol=1e-6 * float(want_grad.abs().max()))
    assert not h.grad[2].any() and not h.grad[1, 6:].any()  # no response, padding: exactly zero


def test_head_with_a_bias_takes_plain_autograd():
    hidden, labels, _ = batch()
    head = torch.nn.Linear(12, 50, bias=True).double().requires_grad_(False)
    want_loss, want_grad = reference(hidden, labels, head, 1.0)
    h = hidden.clone().requires_grad_()
    head_loss(h, labels, head).backward()
    torch.testing.assert_close(h.grad, want_grad)


def test_fp16_scale_is_applied_before_the_cast():
    """A mean loss's per-token gradient is ~1/(tokens · V): in fp16 it underflows unless the
    loss scale multiplies it before the cast to the model dtype."""
    hidden, labels, head = batch(V=50)
    big = torch.nn.Linear(12, 50, bias=False).half().requires_grad_(False)
    big.weight.copy_(head.weight * 1e-3)  # tiny logits: softmax ~ uniform, gradients ~ 1e-5 · 1e-3
    h = hidden.half().requires_grad_()
    head_loss(h, labels, big, 2.0**12).backward()
    want = reference(hidden, labels, big.double(), 2.0**12)[1]
    torch.testing.assert_close(h.grad.double(), want, rtol=2e-2, atol=1e-6 * float(want.abs().max()))


def test_confident_predictions_keep_their_gradient():
    """When the model is sure (p_target near 1) the gradient hangs on 1 - p_target: forming the
    softmax as logits - logsumexp loses it to cancellation (SmolLM2's scores moved by 5e-6
    median, 5e-4 at worst, against float64); log_softmax subtracts the max first. head_loss
    in fp32 must be as close to float64 as autograd's cross-entropy in fp32 is."""
    import torch.nn.functional as F

    V, D = 1000, 16
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (2, 6), generator=g)
    labels[:, 0] = -100
    hidden = torch.randn(2, 6, D, generator=g, dtype=torch.float64) * 0.1
    for b in range(2):  # each position points at the token it predicts: p_target near 1
        hidden[b, :-1] += 2 * weight[labels[b, 1:]]

    def grad(loss_fn, dtype):
        head = torch.nn.Linear(D, V, bias=False).to(dtype).requires_grad_(False)
        head.weight.copy_(weight)
        h = hidden.to(dtype, copy=True).requires_grad_()
        loss_fn(h, head).backward()
        return h.grad.double()

    def exact_loss(h, head):  # float64 throughout
        sel = labels[:, 1:] != -100
        ce = F.cross_entropy(head(h)[:, :-1][sel], labels[:, 1:][sel], reduction="none")
        return (ce / sel.sum(1, keepdim=True).expand_as(sel)[sel]).sum()

    exact = grad(exact_loss, torch.float64)
    err = float((grad(lambda h, head: head_loss(h, labels, head), torch.float32) - exact).norm() / exact.norm())
    plain = grad(lambda h, head: response_loss(head(h), labels), torch.float32)
    plain_err = float((plain - exact).norm() / exact.norm())
    assert err <= 2 * plain_err + 1e-9, (err, plain_err)
