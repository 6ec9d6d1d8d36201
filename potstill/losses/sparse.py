"""Distillation from a sparse teacher: the top-k log-probabilities read from a teacher cache.

A cached teacher gives, per position, the ids of its top-k tokens, their log-probabilities at
temperature T, and the log of the mass left over (``log(1 − Σ top-k)``). The student's
full-vocabulary log-softmax at T is gathered at those ids, and the chosen loss compares two
small distributions built from them. What happens to the leftover mass is an explicit choice:

* ``"bucket"`` — both sides get a (k+1)-th "rest" entry holding their mass outside the teacher's
  top-k; with k = V this is exactly the dense loss.
* ``"renormalize"`` — the leftover is dropped and both sides are renormalised over the top-k.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ._common import as_float, check_temperature, position_mask
from .registry import get_loss

LOG_ZERO = -1e4


class SparseTarget(NamedTuple):
    """A teacher distribution kept as its top-k: ``[..., k]`` ids and log-probs, ``[...]`` rest."""

    ids: Tensor
    logprobs: Tensor
    #: log of the probability mass outside the top-k (−inf when there is none)
    rest: Tensor


def _log1mexp(log_mass: Tensor) -> Tensor:
    """log(1 − exp(x)) for x ≤ 0, accurate at both ends; −inf when the mass is (rounds to) 1."""
    x = log_mass.clamp(max=0.0)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_distributions(student_logits: Tensor, target: SparseTarget, temperature: float,
                         leftover: Literal["bucket", "renormalize"]) -> tuple[Tensor, Tensor]:
    """The (student, teacher) log-distributions over the teacher's top-k (+ rest)."""
    check_temperature(temperature)
    log_s = torch.log_softmax(as_float(student_logits) / temperature, dim=-1)
    s_k = log_s.gather(-1, target.ids.long())
    t_k = as_float(target.logprobs).to(s_k.dtype)
    if leftover == "renormalize":
        return s_k - torch.logsumexp(s_k, -1, keepdim=True), t_k - torch.logsumexp(t_k, -1, keepdim=True)
    if leftover != "bucket":
        raise ValueError(f"leftover must be 'bucket' or 'renormalize', got {leftover!r}")
    # the student's mass outside the teacher's top-k, summed directly (exact, and a smooth
    # gradient even when nothing is left); floors instead of −inf so that an empty rest on both
    # sides gives 0·(finite) rather than 0·(−inf − (−inf)) = NaN
    outside = torch.ones_like(log_s, dtype=torch.bool).scatter(-1, target.ids.long(), False)
    s_rest = log_s.exp().masked_fill(~outside, 0.0).sum(-1).clamp_min(1e-30).log()
    t_rest = as_float(target.rest).to(s_k.dtype).clamp_min(LOG_ZERO)
    return torch.cat([s_k, s_rest.unsqueeze(-1)], -1), torch.cat([t_k, t_rest.unsqueeze(-1)], -1)


def sparse_loss(student_logits: Tensor, target: SparseTarget, *, loss: str = "kl", temperature: float = 1.0,
                leftover: Literal["bucket", "renormalize"] = "bucket", mask: Tensor | None = None,
                labels: Tensor | None = None, reduction: str = "mean", **params) -> Tensor:
    """A registered divergence (``kl``, ``reverse_kl``, ``jsd``, ``skew_kl``, ``tvd``, …) against a sparse teacher.

    ``target.logprobs`` must have been computed at the same ``temperature``. The KL family is
    scaled by T² as in the dense losses.

    Args:
        student_logits: ``[..., V]``, the student's full-vocabulary logits.
        target: the teacher's top-k, ``ids`` and ``logprobs`` ``[..., k]``, ``rest`` ``[...]``
            (see :func:`top_k`).
        loss: the name of a registered divergence (kind ``"divergence"``).
        temperature: ``T > 0``; the temperature the target was stored at.
        leftover: ``"bucket"`` or ``"renormalize"`` (see the module's docstring).
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"`` over the positions that count, ``"sum"`` or ``"none"``.
        **params: the loss's own parameters (``beta``, ``skew``).

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import sparse_loss, top_k
        >>> p_t = torch.tensor([[0.5, 0.3, 0.2]])
        >>> student = torch.zeros(1, 3)  # uniform: 1/3 each
        >>> # k = 1, bucket: [0.5, rest 0.5] against [1/3, rest 2/3]
        >>> round(float(sparse_loss(student, top_k(p_t.log(), 1))), 4)  # 0.5·ln(1.5) + 0.5·ln(0.75)
        0.0589
        >>> float(sparse_loss(student, top_k(p_t.log(), 1), leftover="renormalize"))  # [1] against [1]
        0.0
    """
    spec = get_loss(loss)
    if spec.kind != "divergence":
        raise ValueError(f"a sparse teacher supports the divergences on distributions, not {loss!r}")
    if target.ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(f"cached teacher positions {tuple(target.ids.shape[:-1])} do not match the student's "
                         f"{tuple(student_logits.shape[:-1])}")
    log_s, log_t = sparse_distributions(student_logits, target, temperature, leftover)
    keep = position_mask(student_logits.shape[:-1], mask, labels, student_logits.device)
    # log-probabilities are their own logits at T = 1; the T² factor is applied here instead
    value = spec.fn(log_s, log_t, mask=keep, reduction=reduction, **params)
    return value * temperature**2 if spec.scaled_by_t2 else value


def top_k(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> SparseTarget:
    """The top-k of a dense teacher at ``temperature`` (what the cache stores).

    Args:
        teacher_logits: ``[..., V]``.
        k: how many tokens to keep per position (at most ``V``).
        temperature: ``T > 0``; the log-probabilities are those of ``softmax(logits / T)``.

    Returns:
        A :class:`SparseTarget`: ``ids`` ``[..., k]`` (int32), ``logprobs`` ``[..., k]`` and
        ``rest`` ``[...]``, the log of the mass outside the top-k.

    Example:
        >>> import torch
        >>> from potstill.losses import top_k
        >>> target = top_k(torch.tensor([[0.2, 0.5, 0.3]]).log(), 2)
        >>> target.ids.tolist(), [round(p, 4) for p in target.logprobs.exp()[0].tolist()]
        ([[1, 2]], [0.5, 0.3])
        >>> round(float(target.rest.exp()), 4)
        0.2
    """
    log_t = torch.log_softmax(as_float(teacher_logits) / temperature, dim=-1)
    values, ids = log_t.topk(min(k, log_t.shape[-1]), dim=-1)
    return SparseTarget(ids.to(torch.int32), values, _log1mexp(torch.logsumexp(values, -1)))
