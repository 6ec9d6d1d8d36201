"""Every loss against an independent reference, its gradients, and its conventions."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import potstill.losses as L
from tests import reference as ref

# (potstill function, reference, extra parameters) for the losses on two logit tensors
PAIRWISE = {
    "kl": (L.kl_divergence, ref.kl, {}),
    "reverse_kl": (L.reverse_kl, ref.reverse_kl, {}),
    "jsd": (L.jsd, ref.jsd, {"beta": 0.3}),
    "jsd_half": (L.jsd, ref.jsd, {"beta": 0.5}),
    "jsd_0.9": (L.jsd, ref.jsd, {"beta": 0.9}),
    "interpolated_jsd": (L.interpolated_jsd, ref.interpolated_jsd, {"beta": 0.3}),
    "skew_kl": (L.skew_kl, ref.skew_kl, {"skew": 0.2}),
    "skew_reverse_kl": (L.skew_reverse_kl, ref.skew_reverse_kl, {"skew": 0.2}),
    "tvd": (L.total_variation, ref.tvd, {}),
    "soft_cross_entropy": (L.soft_cross_entropy, ref.soft_cross_entropy, {}),
    "uld": (L.uld, ref.uld, {}),
}


def logits(*shape: int, scale: float = 3.0, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# --- the worked example and Hinton's gradients ----------------------------------------------

def test_worked_example_soft_targets():
    z = torch.tensor([1.3, 3.1, 0.2, 1.9, -0.3])
    assert [round(x, 4) for x in L.soft_targets(z, 1.0).tolist()] == [0.1063, 0.6431, 0.0354, 0.1937, 0.0215]
    assert [round(x, 4) for x in L.soft_targets(z, 3.0).tolist()] == [0.1879, 0.3423, 0.1302, 0.2294, 0.1102]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0, 20.0])
def test_soft_cross_entropy_gradient_is_q_minus_p_over_t(temperature):
    """Hinton 2015 eq. 2: dC/dz_i = (q_i − p_i)/T for C = −Σ p log q (we scale C by T²)."""
    z = logits(4, 7, seed=1).requires_grad_()
    v = logits(4, 7, seed=2)
    L.soft_cross_entropy(z, v, temperature=temperature, reduction="sum").backward()
    q, p = ref.softmax(z.detach().numpy(), temperature), ref.softmax(v.numpy(), temperature)
    np.testing.assert_allclose(z.grad.numpy() / temperature**2, (q - p) / temperature, rtol=1e-10, atol=1e-14)


def test_high_temperature_gradient_approaches_logit_matching():
    """For zero-mean logits, (q − p)/T → (z − v)/(N T²) as T grows; the error falls like 1/T."""
    n = 10
    z = logits(1, n, seed=3)
    v = logits(1, n, seed=4)
    z, v = z - z.mean(), v - v.mean()
    errors = []
    for t in (10.0, 100.0, 1000.0):
        zz = z.clone().requires_grad_()
        L.soft_cross_entropy(zz, v, temperature=t, reduction="sum").backward()
        unscaled = zz.grad / t**2
        limit = (z - v) / (n * t**2)
        errors.append(((unscaled - limit).norm() / limit.norm()).item())
    assert errors[-1] < 2e-3
    assert errors[0] > errors[1] > errors[2]
    assert errors[1] / errors[2] == pytest.approx(10.0, rel=0.2)


# --- values and gradients against the references ---------------------------------------------

@pytest.mark.parametrize("name", list(PAIRWISE))
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_match_reference(name, temperature):
    fn, reference, params = PAIRWISE[name]
    s, t = logits(6, 11, seed=5), logits(6, 11, seed=6)
    if name == "uld":  # different vocabulary sizes
        t = logits(6, 17, seed=6)
    got = fn(s, t, temperature=temperature, reduction="none", **params)
    np.testing.assert_allclose(got.numpy(), reference(s.numpy(), t.numpy(), temperature=temperature, **params),
                               rtol=1e-9, atol=1e-12)


def test_mse_cross_entropy_cosine_attention_match_reference():
    s, t = logits(5, 8, seed=7), logits(5, 8, seed=8)
    np.testing.assert_allclose(L.logit_mse(s, t, reduction="none").numpy(), ref.mse(s.numpy(), t.numpy()))
    np.testing.assert_allclose(L.cosine_loss(s, t, reduction="none").numpy(), ref.cosine(s.numpy(), t.numpy()))
    y = torch.tensor([0, 3, 7, 1, 2])
    np.testing.assert_allclose(L.cross_entropy(s, y, reduction="none").numpy(),
                               ref.cross_entropy(s.numpy(), y.numpy()), rtol=1e-6)
    a, b = logits(3, 4, 5, 5, seed=9), logits(3, 6, 5, 5, seed=10)
    np.testing.assert_allclose(L.attention_transfer(a, b, reduction="none").numpy(),
                               ref.attention(a.numpy(), b.numpy()), rtol=1e-9)


@pytest.mark.parametrize("name", list(PAIRWISE))
def test_gradcheck_float64(name):
    fn, _, params = PAIRWISE[name]
    s = logits(3, 5, seed=11).requires_grad_()
    t = logits(3, 5 if name != "uld" else 7, seed=12).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, temperature=1.7, **params), (s, t))


@pytest.mark.parametrize("fn", [L.logit_mse, L.cosine_loss])
def test_gradcheck_feature_losses(fn):
    s, t = logits(3, 6, seed=13).requires_grad_(), logits(3, 6, seed=14).requires_grad_()
    assert torch.autograd.gradcheck(fn, (s, t))


def test_gradcheck_attention_transfer():
    s, t = logits(2, 3, 4, 4, seed=15).requires_grad_(), logits(2, 5, 4, 4, seed=16).requires_grad_()
    assert torch.autograd.gradcheck(L.attention_transfer, (s, t))


# --- conventions: masks, labels, reductions, leading shapes -----------------------------------

@pytest.mark.parametrize("name", list(PAIRWISE))
def test_mask_labels_and_reductions(name):
    fn, reference, params = PAIRWISE[name]
    s, t = logits(2, 3, 9, seed=17), logits(2, 3, 9, seed=18)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    per = reference(s.reshape(-1, 9).numpy(), t.reshape(-1, 9).numpy(), **params).reshape(2, 3)
    kept = per[mask.numpy()]
    assert fn(s, t, mask=mask, **params).item() == pytest.approx(kept.mean(), rel=1e-9)
    assert fn(s, t, mask=mask, reduction="sum", **params).item() == pytest.approx(kept.sum(), rel=1e-9)
    labels = torch.where(mask, torch.tensor(4), torch.tensor(-100))
    assert fn(s, t, labels=labels, **params).item() == pytest.approx(kept.mean(), rel=1e-9)
    none = fn(s, t, mask=mask.long(), reduction="none", **params)  # 0/1 masks work too
    assert none.shape == (2, 3) and none[~mask].abs().sum() == 0


@pytest.mark.parametrize("name", list(PAIRWISE))
def test_fully_masked_batch_gives_zero_and_zero_gradient(name):
    fn, _, params = PAIRWISE[name]
    s = logits(4, 6, seed=19).requires_grad_()
    loss = fn(s, logits(4, 6, seed=20), mask=torch.zeros(4, dtype=torch.bool), **params)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", list(PAIRWISE))
def test_large_logits_and_low_precision_stay_finite(name):
    fn, _, params = PAIRWISE[name]
    big = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, 1e4, 1e4, -5e3]])
    s = big.clone().requires_grad_()
    loss = fn(s, big.flip(-1), **params)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    for dtype in (torch.float16, torch.bfloat16):
        a, b = logits(8, 50, seed=21, dtype=dtype), logits(8, 50, seed=22, dtype=dtype)
        low = fn(a, b, **params)
        full = fn(a.double(), b.double(), **params)
        assert low.dtype == torch.float32 and low.item() >= 0
        assert low.item() == pytest.approx(full.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", list(PAIRWISE))
def test_single_token_and_vocab_of_two(name):
    fn, reference, params = PAIRWISE[name]
    s, t = logits(1, 2, seed=23), logits(1, 2, seed=24)
    assert fn(s, t, **params).item() == pytest.approx(reference(s.numpy(), t.numpy(), **params)[0], rel=1e-9)


@pytest.mark.parametrize("name", ["kl", "jsd", "reverse_kl", "uld"])
def test_vocabulary_of_256k(name):
    fn, reference, params = PAIRWISE[name]
    s, t = logits(2, 256_000, seed=25, dtype=torch.float32), logits(2, 256_000, seed=26, dtype=torch.float32)
    got = fn(s, t, **params).item()
    assert math.isfinite(got)
    if name != "uld":  # the pure-Python reference loops are too slow for 2 x 256k x sort
        s64, t64 = s.double().numpy(), t.double().numpy()
        expected = reference(s64, t64, **params).mean()
        assert got == pytest.approx(expected, rel=1e-4)


def test_vocabulary_mismatch_under_kl_says_use_uld():
    with pytest.raises(ValueError, match="uld"):
        L.kl_divergence(logits(2, 10), logits(2, 12))
    s, t = L.shared_vocabulary(logits(2, 10), logits(2, 12))
    assert s.shape == t.shape == (2, 10)


def test_bad_arguments_are_clear_errors():
    s = logits(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        L.kl_divergence(s, s, temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        L.kl_divergence(s, s, reduction="batchmean")
    with pytest.raises(ValueError, match="mask has shape"):
        L.kl_divergence(s, s, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        L.jsd(s, s, beta=1.5)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        L.jsd(s, s, beta=-0.1)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        L.interpolated_jsd(s, s, beta=1.5)


# --- JSD endpoints and the Hinton mix ---------------------------------------------------------

@pytest.mark.parametrize("fn", [L.jsd, L.interpolated_jsd])
def test_jsd_endpoints_are_exactly_the_two_kls(fn):
    s, t = logits(5, 9, seed=27), logits(5, 9, seed=28)
    torch.testing.assert_close(fn(s, t, beta=0.0, temperature=2.0), L.kl_divergence(s, t, temperature=2.0),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(fn(s, t, beta=1.0, temperature=2.0), L.reverse_kl(s, t, temperature=2.0),
                               rtol=1e-12, atol=0)
    np.testing.assert_allclose(fn(s, t, beta=0.0, reduction="none").numpy(), ref.jsd(s.numpy(), t.numpy(), beta=0.0))
    np.testing.assert_allclose(fn(s, t, beta=1.0, reduction="none").numpy(), ref.jsd(s.numpy(), t.numpy(), beta=1.0))


def test_paper_jsd_ends_are_limits_of_the_scaled_loss_and_interpolated_jsd_is_continuous():
    """GKD's JSD(β) ≈ β·KL(p_T‖p_S) near β = 0 and (1−β)·KL(p_S‖p_T) near β = 1: its ends are the
    limits of JSD(β)/β and JSD(β)/(1−β), not of JSD(β). The interpolated variant reaches them itself."""
    s, t = logits(4, 7, seed=35), logits(4, 7, seed=36)
    forward, reverse = L.kl_divergence(s, t, temperature=1.5), L.reverse_kl(s, t, temperature=1.5)
    eps = 1e-6
    assert (L.jsd(s, t, beta=eps, temperature=1.5) / eps).item() == pytest.approx(forward.item(), rel=1e-4)
    assert (L.jsd(s, t, beta=1 - eps, temperature=1.5) / eps).item() == pytest.approx(reverse.item(), rel=1e-4)
    assert L.interpolated_jsd(s, t, beta=eps, temperature=1.5).item() == pytest.approx(forward.item(), rel=1e-4)
    assert L.interpolated_jsd(s, t, beta=1 - eps, temperature=1.5).item() == pytest.approx(reverse.item(), rel=1e-4)


def test_paper_and_interpolated_jsd_agree_only_at_one_half():
    s, t = logits(6, 11, seed=37), logits(6, 11, seed=38)
    torch.testing.assert_close(L.jsd(s, t, beta=0.5), L.interpolated_jsd(s, t, beta=0.5), rtol=1e-12, atol=0)
    for beta in (0.1, 0.9):
        paper, interpolated = L.jsd(s, t, beta=beta).item(), L.interpolated_jsd(s, t, beta=beta).item()
        # the paper's β weights the teacher's KL term: near an end it is a fraction of that end's KL
        assert paper < 0.5 * interpolated


def _trl_generalized_jsd():
    trl = pytest.importorskip("trl")
    from packaging.version import Version

    if Version(trl.__version__) < Version("1.0"):
        # compared with TRL 1.16; before huggingface/trl#3043 (2025) TRL mixed the two sides the other way
        pytest.skip(f"compared with TRL >= 1.0 only, found {trl.__version__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "You are importing from 'trl.experimental'"
        try:
            from trl.experimental.gkd.gkd_trainer import GKDTrainer
        except ImportError:
            from trl import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl_generalized_jsd_loss(beta, temperature):
    """The same tensors through TRL's GKD loss (runs only where TRL is installed; not a dependency)."""
    trl_jsd = _trl_generalized_jsd()
    s, t = logits(2, 3, 13, seed=39), logits(2, 3, 13, seed=40)
    theirs = trl_jsd(s, t, beta=beta, temperature=temperature, reduction="none").sum(-1)
    ours = L.jsd(s, t, beta=beta, temperature=temperature, reduction="none") / temperature**2  # TRL has no T²
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    labels = torch.tensor([[1, -100, 2], [-100, 0, 5]])  # TRL's "batchmean": mean over the non-ignored tokens
    torch.testing.assert_close(L.jsd(s, t, beta=beta, labels=labels), trl_jsd(s, t, labels=labels, beta=beta),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(L.skew_kl(s, t, skew=0.0), L.kl_divergence(s, t), rtol=1e-12, atol=0)
    torch.testing.assert_close(L.skew_reverse_kl(s, t, skew=0.0), L.reverse_kl(s, t), rtol=1e-12, atol=0)


def test_hinton_loss_is_the_alpha_mix():
    s, t, y = logits(6, 10, seed=29), logits(6, 10, seed=30), torch.arange(6)
    expected = 0.7 * 16 * ref.kl_rows(ref.softmax(t.numpy(), 4), ref.softmax(s.numpy(), 4)).mean() \
        + 0.3 * ref.cross_entropy(s.numpy(), y.numpy()).mean()
    assert L.hinton_loss(s, t, y, alpha=0.7, temperature=4.0).item() == pytest.approx(expected, rel=1e-9)


def test_kl_and_soft_cross_entropy_differ_by_teacher_entropy_only():
    s, t = logits(4, 6, seed=31), logits(4, 6, seed=32)
    p = ref.softmax(t.numpy(), 2.0)
    entropy = -(p * np.log(p)).sum(-1).mean() * 4.0
    diff = L.soft_cross_entropy(s, t, temperature=2.0) - L.kl_divergence(s, t, temperature=2.0)
    assert diff.item() == pytest.approx(entropy, rel=1e-9)


# --- registry --------------------------------------------------------------------------------

def test_registry_names_and_parameters():
    assert {"kl", "reverse_kl", "jsd", "interpolated_jsd", "skew_kl", "tvd", "uld", "mse", "cosine",
            "attention"} <= set(L.LOSSES)
    assert "beta" in L.get_loss("jsd").parameters and "beta" in L.get_loss("interpolated_jsd").parameters
    with pytest.raises(ValueError, match="Did you mean 'jsd'"):
        L.get_loss("jds")
    with pytest.raises(ValueError, match="no parameter 'beta'"):
        L.check_params("kl", {"beta": 0.5})


def test_module_wrapper_is_the_function():
    s, t, y = logits(4, 6, seed=33), logits(4, 6, seed=34), torch.tensor([0, 1, -100, 5])
    module = L.DistillationLoss("jsd", beta=0.2, temperature=3.0)
    torch.testing.assert_close(module(s, t, labels=y), L.jsd(s, t, beta=0.2, temperature=3.0, labels=y))
    torch.testing.assert_close(L.DistillationLoss("cross_entropy")(s, y), L.cross_entropy(s, y))
    assert "beta=0.2" in repr(module)
    with pytest.raises(ValueError, match="no parameter"):
        L.DistillationLoss("kl", beta=0.5)
