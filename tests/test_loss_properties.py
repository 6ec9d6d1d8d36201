"""Properties every divergence must have, checked on generated inputs (hypothesis)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import potstill.losses as L

DIVERGENCES = {
    "kl": L.kl_divergence,
    "reverse_kl": L.reverse_kl,
    "jsd": L.jsd,
    "interpolated_jsd": L.interpolated_jsd,
    "skew_kl": L.skew_kl,
    "skew_reverse_kl": L.skew_reverse_kl,
    "tvd": L.total_variation,
    "uld": L.uld,
}

finite = st.floats(min_value=-30, max_value=30, allow_nan=False, width=64)


@st.composite
def logit_pairs(draw, same_vocab: bool = True):
    rows = draw(st.integers(1, 4))
    v_s = draw(st.integers(2, 12))
    v_t = v_s if same_vocab else draw(st.integers(2, 12))
    s = draw(arrays("float64", (rows, v_s), elements=finite))
    t = draw(arrays("float64", (rows, v_t), elements=finite))
    return torch.from_numpy(s), torch.from_numpy(t)


temperatures = st.sampled_from([0.5, 1.0, 2.0, 7.0])
config = settings(max_examples=60, deadline=None)


@config
@given(pair=logit_pairs(), temperature=temperatures, name=st.sampled_from(sorted(DIVERGENCES)))
def test_non_negative(pair, temperature, name):
    s, t = pair
    assert DIVERGENCES[name](s, t, temperature=temperature, reduction="none").min().item() >= 0.0


@config
@given(pair=logit_pairs(), temperature=temperatures, name=st.sampled_from(sorted(DIVERGENCES)),
       shift=st.floats(-5, 5))
def test_zero_iff_equal(pair, temperature, name, shift):
    s, t = pair
    fn = DIVERGENCES[name]
    # equal distributions (logits equal up to a constant shift) give 0
    assert fn(s, s + shift, temperature=temperature).item() < 1e-10
    ps, pt = L.soft_targets(s, temperature), L.soft_targets(t, temperature)
    if name == "uld":  # ULD compares sorted probabilities: zero iff the sorted vectors are equal
        ps, pt = ps.sort(-1).values, pt.sort(-1).values
    if (ps - pt).abs().max() > 1e-3:
        assert fn(s, t, temperature=temperature).item() > 0


@config
@given(pair=logit_pairs(), temperature=temperatures, name=st.sampled_from(["jsd", "interpolated_jsd"]))
def test_jsd_half_is_symmetric_and_bounded_by_log2(pair, temperature, name):
    s, t = pair
    a = DIVERGENCES[name](s, t, beta=0.5, temperature=temperature, reduction="none")
    b = DIVERGENCES[name](t, s, beta=0.5, temperature=temperature, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert a.max().item() <= math.log(2) * temperature**2 + 1e-12


@config
@given(pair=logit_pairs(), temperature=temperatures, name=st.sampled_from(["jsd", "interpolated_jsd"]),
       # not a β so close to an end that 1 − β rounds to 1: GKD's JSD jumps to the KL there
       beta=st.one_of(st.sampled_from([0.0, 1.0]), st.floats(1e-6, 1 - 1e-6)))
def test_jsd_swapping_the_two_sides_mirrors_beta(pair, temperature, name, beta):
    """Both weightings share the mixture M = β·p_T + (1−β)·p_S, so D(β; s, t) = D(1−β; t, s)."""
    s, t = pair
    a = DIVERGENCES[name](s, t, beta=beta, temperature=temperature, reduction="none")
    b = DIVERGENCES[name](t, s, beta=1.0 - beta, temperature=temperature, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@config
@given(pair=logit_pairs(same_vocab=False), temperature=temperatures, seed=st.integers(0, 2**16),
       pad_s=st.integers(0, 5), pad_t=st.integers(0, 5))
def test_uld_invariant_to_permutation_and_zero_padding(pair, temperature, seed, pad_s, pad_t):
    s, t = pair
    g = torch.Generator().manual_seed(seed)
    base = L.uld(s, t, temperature=temperature)
    permuted = L.uld(s[:, torch.randperm(s.shape[1], generator=g)],
                     t[:, torch.randperm(t.shape[1], generator=g)], temperature=temperature)
    torch.testing.assert_close(permuted, base, rtol=1e-9, atol=1e-12)
    # a token with logit -inf has probability exactly 0: padding the vocabulary with it changes nothing
    padded = L.uld(torch.cat([s, torch.full((s.shape[0], pad_s), -math.inf, dtype=s.dtype)], 1),
                   torch.cat([t, torch.full((t.shape[0], pad_t), -math.inf, dtype=t.dtype)], 1),
                   temperature=temperature)
    torch.testing.assert_close(padded, base, rtol=1e-9, atol=1e-12)


@config
@given(pair=logit_pairs(), name=st.sampled_from(["kl", "reverse_kl", "jsd", "interpolated_jsd", "skew_kl",
                                                        "skew_reverse_kl"]))
def test_kl_times_t_squared_stays_finite_as_t_grows(pair, name):
    s, t = pair
    values = [DIVERGENCES[name](s, t, temperature=temp).item() for temp in (1.0, 10.0, 100.0, 1e4)]
    assert all(math.isfinite(v) for v in values)
    # T²·KL tends to a finite limit (logit matching, Hinton §2.1): bounded by Σ(z−v)²-scale terms
    spread = ((s - s.mean(-1, keepdim=True)) - (t - t.mean(-1, keepdim=True))).pow(2).sum(-1).max().item()
    assert values[-1] <= spread + 1e-6
