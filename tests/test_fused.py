"""The fused chunked linear + loss gives the unfused numbers and gradients."""

from __future__ import annotations

import pytest
import torch

import potstill.losses as L
from potstill.losses.fused import fused_linear_loss


def problem(dtype=torch.float64, n=(3, 7), h=16, v=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.3).requires_grad_()
    bias = (torch.randn(v, generator=g, dtype=dtype) * 0.1).requires_grad_()
    t_hidden = torch.randn(*n, 24, generator=g, dtype=dtype)
    t_weight = torch.randn(v, 24, generator=g, dtype=dtype) * 0.3
    labels = torch.randint(0, v, n, generator=g)
    labels[0, :2] = -100
    labels[-1, -1] = -100
    return hidden, weight, bias, t_hidden, t_weight, labels


def unfused(hidden, weight, bias, t_logits, labels, loss, alpha, reduction="mean", **params):
    s_logits = hidden @ weight.T + bias
    value = alpha * L.get_loss(loss).fn(s_logits, t_logits, labels=labels, reduction=reduction, **params)
    if alpha < 1:
        value = value + (1 - alpha) * L.cross_entropy(s_logits, labels, reduction=reduction)
    return value


CASES = [
    ("kl", 1.0, {"temperature": 2.0}),
    ("kl", 0.7, {"temperature": 4.0}),
    ("reverse_kl", 0.5, {}),
    ("jsd", 0.9, {"beta": 0.3, "temperature": 1.5}),
    ("skew_kl", 1.0, {"skew": 0.1}),
    ("skew_reverse_kl", 1.0, {"skew": 0.2}),
    ("tvd", 0.8, {}),
    ("soft_cross_entropy", 1.0, {"temperature": 3.0}),
    ("mse", 0.5, {}),
]


@pytest.mark.parametrize(("loss", "alpha", "params", "chunk_size", "reduction"), [
    *[(*case, 4, "mean") for case in CASES],
    ("kl", 0.7, {"temperature": 4.0}, 1, "sum"),
    ("jsd", 0.9, {"beta": 0.3}, 1000, "sum"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_equals_unfused_values_and_gradients(loss, alpha, params, dtype, chunk_size, reduction):
    hidden, weight, bias, t_hidden, t_weight, labels = problem(dtype)
    t_logits = t_hidden @ t_weight.T
    expected = unfused(hidden, weight, bias, t_logits, labels, loss, alpha, reduction, **params)
    want = torch.autograd.grad(expected, (hidden, weight, bias))
    for teacher in ({"teacher_logits": t_logits}, {"teacher_hidden": t_hidden, "teacher_weight": t_weight}):
        got = fused_linear_loss(hidden, weight, bias, labels=labels, loss=loss, alpha=alpha,
                                chunk_size=chunk_size, reduction=reduction, **teacher, **params)
        grads = torch.autograd.grad(got * 2.5, (hidden, weight, bias))  # the upstream gradient is applied
        tol = {"rtol": 1e-5, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
        torch.testing.assert_close(got, expected.to(got.dtype), **tol)
        for g, w in zip(grads, want, strict=True):
            # float32 sums chunk by chunk in another order: compare to the gradient's scale
            scale = 2.5 * w.abs().max().item()
            torch.testing.assert_close(g, 2.5 * w, rtol=tol["rtol"], atol=tol["rtol"] * scale)


def test_fused_gradcheck_and_no_bias():
    hidden, weight, _, t_hidden, t_weight, labels = problem(n=(2, 3), h=5, v=7)
    t_logits = (t_hidden @ t_weight.T).detach()
    assert torch.autograd.gradcheck(
        lambda h, w: fused_linear_loss(h, w, teacher_logits=t_logits, labels=labels, alpha=0.6,
                                       temperature=2.0, chunk_size=2), (hidden, weight))


def test_fused_fully_masked_and_errors():
    hidden, weight, bias, t_hidden, t_weight, _ = problem()
    t_logits = t_hidden @ t_weight.T
    value = fused_linear_loss(hidden, weight, bias, teacher_logits=t_logits, mask=torch.zeros(3, 7))
    value.backward()
    assert value.item() == 0 and hidden.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="uld"):
        fused_linear_loss(hidden, weight, teacher_logits=t_logits[..., :40])
    with pytest.raises(ValueError, match="labels are needed"):
        fused_linear_loss(hidden, weight, teacher_logits=t_logits, alpha=0.5)
    with pytest.raises(ValueError, match="either teacher_logits"):
        fused_linear_loss(hidden, weight)
