"""Divergences between a student's and a teacher's output distributions.

All functions take logits of shape ``[..., V]`` (any leading shape) and follow the conventions of
:mod:`potstill.losses._common`: ``temperature`` divides both sides' logits, the KL family is
multiplied by ``T²`` (so gradient magnitudes do not shrink as ``T`` grows, Hinton et al. 2015),
softmax is computed in float32 whatever the input dtype, and ``mask`` / ``labels`` (``-100``)
choose the positions that count.

Notation: ``p_T`` is the teacher's distribution, ``p_S`` the student's, both at temperature T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import as_float, check_pair, check_temperature, log_probs, position_mask, reduce


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p‖q) per position from log-probabilities; never negative (rounding clamped)."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).clamp_min(0.0)


def _prepare(name: str, student_logits: Tensor, teacher_logits: Tensor, temperature: float,
             mask: Tensor | None, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    check_pair(student_logits, teacher_logits, name)
    check_temperature(temperature)
    keep = position_mask(student_logits.shape[:-1], mask, labels, student_logits.device)
    return log_probs(student_logits, temperature), log_probs(teacher_logits, temperature), keep


def _mixture(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """log(w·p + (1−w)·q) computed in log space (exact at w = 0 and w = 1)."""
    if not 0.0 <= weight_p <= 1.0:
        raise ValueError(f"mixture weight must be in [0, 1], got {weight_p!r}")
    log_w = math.log(weight_p) if weight_p > 0 else -math.inf
    log_1mw = math.log1p(-weight_p) if weight_p < 1 else -math.inf
    return torch.logaddexp(log_p + log_w, log_q + log_1mw)


def kl_divergence(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                  mask: Tensor | None = None, labels: Tensor | None = None,
                  reduction: str = "mean") -> Tensor:
    """Forward KL, ``T² · KL(p_T ‖ p_S)``: mode-covering; Hinton's soft-target loss.

    Differs from :func:`soft_cross_entropy` only by the teacher's entropy, a constant for the
    student, so both have the same gradient.
    """
    log_s, log_t, keep = _prepare("kl", student_logits, teacher_logits, temperature, mask, labels)
    return reduce(_kl(log_t, log_s) * temperature**2, keep, reduction)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               mask: Tensor | None = None, labels: Tensor | None = None,
               reduction: str = "mean") -> Tensor:
    """Reverse KL, ``T² · KL(p_S ‖ p_T)``: mode-seeking (MiniLLM, GKD on-policy)."""
    log_s, log_t, keep = _prepare("reverse_kl", student_logits, teacher_logits, temperature,
                                  mask, labels)
    return reduce(_kl(log_s, log_t) * temperature**2, keep, reduction)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
        temperature: float = 1.0, mask: Tensor | None = None, labels: Tensor | None = None,
        reduction: str = "mean") -> Tensor:
    """Generalized Jensen–Shannon divergence, continuous in β from forward to reverse KL.

    ``T² · [(1−β)·KL(p_T ‖ M) + β·KL(p_S ‖ M)]`` with ``M = β·p_T + (1−β)·p_S``.

    * ``β = 0``: ``M = p_S`` and the loss is exactly forward KL(p_T ‖ p_S);
    * ``β = 1``: ``M = p_T`` and the loss is exactly reverse KL(p_S ‖ p_T);
    * ``β = 0.5``: the symmetric JSD, bounded by ``log 2`` (times ``T²``).

    TRL's ``generalized_jsd_loss`` uses the same mixture but weights the two KL terms the
    other way round (β on KL(p_T‖M)); its formula then tends to 0 at both ends, so it
    special-cases β = 0 and β = 1. The two agree at β = 0.5.
    """
    log_s, log_t, keep = _prepare("jsd", student_logits, teacher_logits, temperature, mask, labels)
    log_m = _mixture(log_t, log_s, beta)
    per_position = (1.0 - beta) * _kl(log_t, log_m) + beta * _kl(log_s, log_m)
    return reduce(per_position * temperature**2, keep, reduction)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1,
            temperature: float = 1.0, mask: Tensor | None = None, labels: Tensor | None = None,
            reduction: str = "mean") -> Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024): ``T² · KL(p_T ‖ skew·p_T + (1−skew)·p_S)``.

    ``skew = 0`` is forward KL; a small skew keeps the loss finite and stable where the
    student puts almost no mass on a token the teacher likes.
    """
    log_s, log_t, keep = _prepare("skew_kl", student_logits, teacher_logits, temperature,
                                  mask, labels)
    per_position = _kl(log_t, _mixture(log_t, log_s, skew))
    return reduce(per_position * temperature**2, keep, reduction)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1,
                    temperature: float = 1.0, mask: Tensor | None = None,
                    labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Skew reverse KL (DistiLLM): ``T² · KL(p_S ‖ skew·p_S + (1−skew)·p_T)``; skew = 0 is reverse KL."""
    log_s, log_t, keep = _prepare("skew_reverse_kl", student_logits, teacher_logits, temperature,
                                  mask, labels)
    per_position = _kl(log_s, _mixture(log_s, log_t, skew))
    return reduce(per_position * temperature**2, keep, reduction)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                    mask: Tensor | None = None, labels: Tensor | None = None,
                    reduction: str = "mean") -> Tensor:
    """Total variation distance ``½ Σ |p_T − p_S|``, in [0, 1]; not scaled by T² (not a KL)."""
    log_s, log_t, keep = _prepare("tvd", student_logits, teacher_logits, temperature, mask, labels)
    per_position = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    return reduce(per_position, keep, reduction)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, *,
                       temperature: float = 1.0, mask: Tensor | None = None,
                       labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Soft-target cross-entropy ``−T² · Σ p_T log p_S`` (Hinton et al. 2015, eq. 2).

    Its gradient with respect to the student logits ``z`` is ``T² · (q − p)/T = T·(q − p)``,
    with ``q = p_S``, ``p = p_T``.
    """
    log_s, log_t, keep = _prepare("soft_cross_entropy", student_logits, teacher_logits,
                                  temperature, mask, labels)
    per_position = -(log_t.exp() * log_s).sum(-1)
    return reduce(per_position * temperature**2, keep, reduction)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, mask: Tensor | None = None,
              labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mean squared error between raw logits, averaged over the last dimension per position.

    The high-temperature limit of ``T²·KL`` for zero-mean logits (Hinton et al. 2015, §2.1),
    up to a factor: ``T²·KL → Σ (z − v)² / (2V)``.
    """
    check_pair(student_logits, teacher_logits, "mse")
    keep = position_mask(student_logits.shape[:-1], mask, labels, student_logits.device)
    diff = as_float(student_logits) - as_float(teacher_logits)
    return reduce(diff.pow(2).mean(-1), keep, reduction)


def cross_entropy(student_logits: Tensor, labels: Tensor, *, mask: Tensor | None = None,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Hard-label cross-entropy on ``labels`` (``-100`` ignored), computed in float32."""
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"cross_entropy: labels {tuple(labels.shape)} must match the logits' leading shape "
            f"{tuple(student_logits.shape[:-1])}"
        )
    keep = position_mask(labels.shape, mask, labels, student_logits.device)
    per_position = F.cross_entropy(
        as_float(student_logits).reshape(-1, student_logits.shape[-1]), labels.reshape(-1),
        reduction="none", label_smoothing=label_smoothing,
    ).reshape(labels.shape)
    return reduce(per_position, keep, reduction)


def hinton_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, *,
                alpha: float = 0.9, temperature: float = 4.0, mask: Tensor | None = None,
                reduction: str = "mean") -> Tensor:
    """Hinton et al. 2015: ``α · T² · KL(p_T ‖ p_S) + (1 − α) · CE(y, p_S at T = 1)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    soft = kl_divergence(student_logits, teacher_logits, temperature=temperature, mask=mask,
                         labels=labels, reduction=reduction)
    hard = cross_entropy(student_logits, labels, mask=mask, reduction=reduction)
    return alpha * soft + (1.0 - alpha) * hard
