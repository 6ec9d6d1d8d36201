"""Distillation from a top-k teacher: exact at k = V, and the leftover-mass choices."""

from __future__ import annotations

import pytest
import torch

import potstill.losses as L

DIVERGENCES = [("kl", {}), ("reverse_kl", {}), ("jsd", {"beta": 0.3}), ("interpolated_jsd", {"beta": 0.3}),
               ("skew_kl", {"skew": 0.1}), ("tvd", {})]


@pytest.mark.parametrize(("loss", "params"), DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_k_equal_to_vocab_gives_the_dense_loss(loss, params, temperature):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 5, 40, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 40, (3, 5), generator=g)
    labels[0, 0] = -100
    dense = L.get_loss(loss).fn(s, t, temperature=temperature, labels=labels, **params)
    sparse = L.sparse_loss(s, L.top_k(t, 40, temperature), loss=loss, temperature=temperature, labels=labels, **params)
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    (g_dense,) = torch.autograd.grad(dense, s)
    (g_sparse,) = torch.autograd.grad(sparse, s)
    torch.testing.assert_close(g_sparse, g_dense, rtol=1e-8, atol=1e-10)


def test_bucket_and_renormalize_by_hand():
    """V = 4, k = 2: both leftover choices against distributions written out by hand."""
    s = torch.tensor([[1.0, 0.0, -1.0, 0.5]], dtype=torch.float64)
    t = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    p_t, p_s = torch.softmax(t, -1)[0], torch.softmax(s, -1)[0]
    target = L.top_k(t, 2)
    assert target.ids.tolist() == [[0, 1]]
    # bucket: [p0, p1, rest] on both sides
    pt_b = torch.stack([p_t[0], p_t[1], p_t[2] + p_t[3]])
    ps_b = torch.stack([p_s[0], p_s[1], p_s[2] + p_s[3]])
    expected = (pt_b * (pt_b.log() - ps_b.log())).sum()
    assert L.sparse_loss(s, target, leftover="bucket").item() == pytest.approx(expected.item(), rel=1e-12)
    # renormalize: [p0, p1] / (p0 + p1) on both sides
    pt_r, ps_r = p_t[:2] / p_t[:2].sum(), p_s[:2] / p_s[:2].sum()
    expected = (pt_r * (pt_r.log() - ps_r.log())).sum()
    assert L.sparse_loss(s, target, leftover="renormalize").item() == pytest.approx(expected.item(), rel=1e-12)


def test_low_precision_cache_and_errors():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 100, generator=g), torch.randn(6, 100, generator=g) * 3
    exact = L.top_k(t, 16)
    half = L.SparseTarget(exact.ids, exact.logprobs.to(torch.bfloat16), exact.rest.to(torch.bfloat16))
    a, b = L.sparse_loss(s, exact), L.sparse_loss(s, half)
    assert torch.isfinite(b) and b.item() == pytest.approx(a.item(), rel=2e-2)
    with pytest.raises(ValueError, match="not 'uld'"):
        L.sparse_loss(s, exact, loss="uld")
    with pytest.raises(ValueError, match="leftover"):
        L.sparse_loss(s, exact, leftover="drop")
