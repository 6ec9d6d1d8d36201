"""Divergences between a student's and a teacher's output distributions.

All functions take logits of shape ``[..., V]`` (any leading shape) and follow the conventions of
:mod:`potstill.losses._common`: ``temperature`` divides both sides' logits, the KL family is
multiplied by ``T²`` (so gradient magnitudes do not shrink as ``T`` grows, Hinton et al. 2015),
softmax is computed in float32 whatever the input dtype, and ``mask`` / ``labels`` (``-100``)
choose the positions that count.

Notation: ``p_T`` is the teacher's distribution, ``p_S`` the student's, both at temperature T.
Each loss returns a scalar for ``reduction="mean"`` / ``"sum"`` and the per-position values
``[...]`` (0 where masked) for ``"none"``, in float32 (float64 for float64 inputs). The examples
pass log-probabilities as logits (``p.log()``), so their values can be checked by hand from ``p``.
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


def _check_beta(beta: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")


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

    Args:
        student_logits: ``[..., V]``, any leading shape (``[B, V]``, ``[B, L, V]``).
        teacher_logits: ``[..., V]``, the same shape.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"`` over the positions that count, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import kl_divergence
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> # 0.25·ln(0.25/0.5) + 0.75·ln(0.75/0.5)
        >>> round(float(kl_divergence(p_s.log(), p_t.log())), 4)
        0.1308
        >>> float(kl_divergence(p_t.log(), p_t.log()))
        0.0
    """
    log_s, log_t, keep = _prepare("kl", student_logits, teacher_logits, temperature, mask, labels)
    return reduce(_kl(log_t, log_s) * temperature**2, keep, reduction)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               mask: Tensor | None = None, labels: Tensor | None = None,
               reduction: str = "mean") -> Tensor:
    """Reverse KL, ``T² · KL(p_S ‖ p_T)``: mode-seeking (MiniLLM, GKD on-policy).

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import reverse_kl
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> # 0.5·ln(0.5/0.25) + 0.5·ln(0.5/0.75)
        >>> round(float(reverse_kl(p_s.log(), p_t.log())), 4)
        0.1438
    """
    log_s, log_t, keep = _prepare("reverse_kl", student_logits, teacher_logits, temperature,
                                  mask, labels)
    return reduce(_kl(log_s, log_t) * temperature**2, keep, reduction)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
        temperature: float = 1.0, mask: Tensor | None = None, labels: Tensor | None = None,
        reduction: str = "mean") -> Tensor:
    """Generalized Jensen–Shannon divergence of GKD (Agarwal et al., ICLR 2024, eq. 1).

    ``T² · [β·KL(p_T ‖ M) + (1−β)·KL(p_S ‖ M)]`` with ``M = β·p_T + (1−β)·p_S`` — the paper's
    definition, and TRL's and Liger's, so a β from the paper's tables or a TRL ``GKDConfig``
    means the same loss here.

    The ends are forward and reverse KL, as in the paper (which puts them at the two ends of the
    JSD(β) family) and exactly as TRL's ``generalized_jsd_loss`` computes them:

    * ``β = 0``: forward KL, ``T²·KL(p_T ‖ p_S)`` (:func:`kl_divergence`);
    * ``β = 1``: reverse KL, ``T²·KL(p_S ‖ p_T)`` (:func:`reverse_kl`);
    * ``β = 0.5``: the symmetric JSD, bounded by ``T²·log 2``.

    The formula itself tends to 0 at both ends (``M`` becomes one side): near β = 0 it is about
    ``β·KL(p_T ‖ p_S)`` and near β = 1 about ``(1−β)·KL(p_S ‖ p_T)``, so the two ends are the
    limits of the loss divided by β and by 1 − β. The value therefore jumps at β = 0 and β = 1,
    and a β close to either end mostly scales the loss (and its gradient) down. For a loss that
    slides continuously from forward to reverse KL, see :func:`interpolated_jsd`.

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        beta: ``β ∈ [0, 1]``, the teacher's weight in the mixture ``M``.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import jsd
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> # M = [0.375, 0.625]; ½·(0.25·ln(0.25/M₀) + 0.75·ln(0.75/M₁)) + ½·(0.5·ln(0.5/M₀) + 0.5·ln(0.5/M₁))
        >>> round(float(jsd(p_s.log(), p_t.log(), beta=0.5)), 4)
        0.0338
        >>> round(float(jsd(p_s.log(), p_t.log(), beta=0.0)), 4)  # forward KL
        0.1308
        >>> round(float(jsd(p_s.log(), p_t.log(), beta=1.0)), 4)  # reverse KL
        0.1438
        >>> round(float(jsd(p_s.log(), p_t.log(), beta=0.1)), 4)  # ≈ 0.1 × forward KL
        0.0118
    """
    _check_beta(beta)
    log_s, log_t, keep = _prepare("jsd", student_logits, teacher_logits, temperature, mask, labels)
    if beta == 0.0:
        per_position = _kl(log_t, log_s)
    elif beta == 1.0:
        per_position = _kl(log_s, log_t)
    else:
        log_m = _mixture(log_t, log_s, beta)
        per_position = beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)
    return reduce(per_position * temperature**2, keep, reduction)


def interpolated_jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5,
                     temperature: float = 1.0, mask: Tensor | None = None,
                     labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """A JSD that slides continuously from forward (β = 0) to reverse (β = 1) KL.

    ``T² · [(1−β)·KL(p_T ‖ M) + β·KL(p_S ‖ M)]`` with ``M = β·p_T + (1−β)·p_S``: the same
    mixture as :func:`jsd` with the two weights swapped. Not the GKD paper's loss (it equals
    :func:`jsd` only at β = 0.5, and at β = 0 and β = 1): its β = 0.1 is close to forward KL,
    where the paper's β = 0.1 is about a tenth of it. This was potstill's ``jsd`` before it
    took the paper's definition.

    * ``β = 0``: ``M = p_S`` and the loss is exactly forward ``T²·KL(p_T ‖ p_S)``;
    * ``β = 1``: ``M = p_T`` and the loss is exactly reverse ``T²·KL(p_S ‖ p_T)``;
    * ``β = 0.5``: the symmetric JSD, bounded by ``T²·log 2``.

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        beta: ``β ∈ [0, 1]``, the teacher's weight in the mixture ``M``.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import interpolated_jsd
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> [round(float(interpolated_jsd(p_s.log(), p_t.log(), beta=b)), 4) for b in (0.0, 0.1, 0.5, 1.0)]
        [0.1308, 0.0965, 0.0338, 0.1438]
    """
    _check_beta(beta)
    log_s, log_t, keep = _prepare("interpolated_jsd", student_logits, teacher_logits, temperature,
                                  mask, labels)
    log_m = _mixture(log_t, log_s, beta)
    per_position = (1.0 - beta) * _kl(log_t, log_m) + beta * _kl(log_s, log_m)
    return reduce(per_position * temperature**2, keep, reduction)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1,
            temperature: float = 1.0, mask: Tensor | None = None, labels: Tensor | None = None,
            reduction: str = "mean") -> Tensor:
    """Skew KL (DistiLLM, Ko et al. 2024): ``T² · KL(p_T ‖ skew·p_T + (1−skew)·p_S)``.

    ``skew = 0`` is forward KL; a small skew keeps the loss finite and stable where the
    student puts almost no mass on a token the teacher likes.

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        skew: in ``[0, 1]``, the teacher's weight in the mixture the student side becomes.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import skew_kl
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> # KL(p_T ‖ [0.375, 0.625]) = 0.25·ln(0.25/0.375) + 0.75·ln(0.75/0.625)
        >>> round(float(skew_kl(p_s.log(), p_t.log(), skew=0.5)), 4)
        0.0354
        >>> round(float(skew_kl(p_s.log(), p_t.log(), skew=0.0)), 4)  # forward KL
        0.1308
    """
    log_s, log_t, keep = _prepare("skew_kl", student_logits, teacher_logits, temperature,
                                  mask, labels)
    per_position = _kl(log_t, _mixture(log_t, log_s, skew))
    return reduce(per_position * temperature**2, keep, reduction)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, skew: float = 0.1,
                    temperature: float = 1.0, mask: Tensor | None = None,
                    labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Skew reverse KL (DistiLLM): ``T² · KL(p_S ‖ skew·p_S + (1−skew)·p_T)``; skew = 0 is reverse KL.

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        skew: in ``[0, 1]``, the student's weight in the mixture the teacher side becomes.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import skew_reverse_kl
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> # KL(p_S ‖ [0.375, 0.625]) = 0.5·ln(0.5/0.375) + 0.5·ln(0.5/0.625)
        >>> round(float(skew_reverse_kl(p_s.log(), p_t.log(), skew=0.5)), 4)
        0.0323
    """
    log_s, log_t, keep = _prepare("skew_reverse_kl", student_logits, teacher_logits, temperature,
                                  mask, labels)
    per_position = _kl(log_s, _mixture(log_s, log_t, skew))
    return reduce(per_position * temperature**2, keep, reduction)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                    mask: Tensor | None = None, labels: Tensor | None = None,
                    reduction: str = "mean") -> Tensor:
    """Total variation distance ``½ Σ |p_T − p_S|``, in [0, 1]; not scaled by T² (not a KL).

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import total_variation
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> round(float(total_variation(p_s.log(), p_t.log())), 4)  # ½·(0.25 + 0.25)
        0.25
    """
    log_s, log_t, keep = _prepare("tvd", student_logits, teacher_logits, temperature, mask, labels)
    per_position = 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)
    return reduce(per_position, keep, reduction)


def soft_cross_entropy(student_logits: Tensor, teacher_logits: Tensor, *,
                       temperature: float = 1.0, mask: Tensor | None = None,
                       labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Soft-target cross-entropy ``−T² · Σ p_T log p_S`` (Hinton et al. 2015, eq. 2).

    Its gradient with respect to the student logits ``z`` is ``T² · (q − p)/T = T·(q − p)``,
    with ``q = p_S``, ``p = p_T``.

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        temperature: ``T > 0``; divides both sides' logits.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import soft_cross_entropy
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> round(float(soft_cross_entropy(p_s.log(), p_t.log())), 4)  # −(0.25 + 0.75)·ln 0.5 = ln 2
        0.6931
    """
    log_s, log_t, keep = _prepare("soft_cross_entropy", student_logits, teacher_logits,
                                  temperature, mask, labels)
    per_position = -(log_t.exp() * log_s).sum(-1)
    return reduce(per_position * temperature**2, keep, reduction)


def logit_mse(student_logits: Tensor, teacher_logits: Tensor, *, mask: Tensor | None = None,
              labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Mean squared error between raw logits, averaged over the last dimension per position.

    The high-temperature limit of ``T²·KL`` for zero-mean logits (Hinton et al. 2015, §2.1),
    up to a factor: ``T²·KL → Σ (z − v)² / (2V)``. Also the ``mse`` feature loss on hidden
    states ``[..., D]``.

    Args:
        student_logits: ``[..., V]`` (or hidden states ``[..., D]``), any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import logit_mse
        >>> float(logit_mse(torch.tensor([[1.0, 3.0]]), torch.tensor([[0.0, 0.0]])))  # (1 + 9) / 2
        5.0
    """
    check_pair(student_logits, teacher_logits, "mse")
    keep = position_mask(student_logits.shape[:-1], mask, labels, student_logits.device)
    diff = as_float(student_logits) - as_float(teacher_logits)
    return reduce(diff.pow(2).mean(-1), keep, reduction)


def cross_entropy(student_logits: Tensor, labels: Tensor, *, mask: Tensor | None = None,
                  label_smoothing: float = 0.0, reduction: str = "mean") -> Tensor:
    """Hard-label cross-entropy on ``labels`` (``-100`` ignored), computed in float32.

    Args:
        student_logits: ``[..., V]``, any leading shape.
        labels: ``[...]`` integer class ids in ``[0, V)``, ``-100`` where a position is ignored.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        label_smoothing: in ``[0, 1]``, as :func:`torch.nn.functional.cross_entropy`.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import cross_entropy
        >>> logits = torch.zeros(2, 4)  # uniform over 4 classes
        >>> round(float(cross_entropy(logits, torch.tensor([3, -100]))), 4)  # ln 4, one position counts
        1.3863
    """
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
    """Hinton et al. 2015: ``α · T² · KL(p_T ‖ p_S) + (1 − α) · CE(y, p_S at T = 1)``.

    Args:
        student_logits: ``[..., V]``, any leading shape.
        teacher_logits: ``[..., V]``, the same shape.
        labels: ``[...]`` integer class ids, ``-100`` where a position is ignored (both terms).
        alpha: in ``[0, 1]``, the weight of the distillation term.
        temperature: ``T > 0`` of the distillation term; the CE term is at T = 1.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import hinton_loss
        >>> p_s, p_t = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.75]])
        >>> # ½·KL (0.1308) + ½·CE (ln 2 = 0.6931)
        >>> round(float(hinton_loss(p_s.log(), p_t.log(), torch.tensor([1]), alpha=0.5, temperature=1.0)), 4)
        0.412
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    soft = kl_divergence(student_logits, teacher_logits, temperature=temperature, mask=mask,
                         labels=labels, reduction=reduction)
    hard = cross_entropy(student_logits, labels, mask=mask, reduction=reduction)
    return alpha * soft + (1.0 - alpha) * hard
