"""Universal Logit Distillation (Boizard et al., TMLR 2025): distillation across tokenizers.

When teacher and student vocabularies differ in size and content, token ``i`` of one means
nothing to the other, so KL cannot compare them. ULD compares the *shapes* of the two
distributions: the closed-form Wasserstein-1 distance between them when all tokens are a unit
apart, which is the L1 distance between the probability vectors sorted in descending order.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._common import check_temperature, log_probs, position_mask, reduce


def uld(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
        student_temperature: float | None = None, teacher_temperature: float | None = None,
        mask: Tensor | None = None, labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """``Σ_i |sort↓(p_S)_i − sort↓(p_T)_i|`` per position, the shorter vector zero-padded.

    Inputs ``[..., V_s]`` and ``[..., V_t]`` share their leading shape: position ``k`` of one
    is aligned with position ``k`` of the other (the task does the aligning). Each side is
    softened at its own temperature (both default to ``temperature``). Invariant to any
    permutation of either vocabulary and to zero-probability padding; in [0, 2]; not scaled
    by T² (it is not a KL).

    Args:
        student_logits: ``[..., V_s]``, any leading shape.
        teacher_logits: ``[..., V_t]``, the same leading shape (``V_t`` may differ from ``V_s``).
        temperature: ``T > 0`` for both sides unless one is given below.
        student_temperature: the student's own temperature (default: ``temperature``).
        teacher_temperature: the teacher's own temperature (default: ``temperature``).
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"`` over the positions that count, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import uld
        >>> p_s = torch.tensor([[0.5, 0.5]])       # 2 tokens
        >>> p_t = torch.tensor([[0.2, 0.5, 0.3]])  # 3 tokens
        >>> # sorted: [0.5, 0.5, 0] against [0.5, 0.3, 0.2] → 0 + 0.2 + 0.2
        >>> round(float(uld(p_s.log(), p_t.log())), 4)
        0.4
        >>> float(uld(torch.tensor([[0.75, 0.25]]).log(), torch.tensor([[0.25, 0.75]]).log()))  # a permutation
        0.0
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"uld: student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "must share their leading (position) shape; align the sequences first"
        )
    t_s = temperature if student_temperature is None else student_temperature
    t_t = temperature if teacher_temperature is None else teacher_temperature
    check_temperature(t_s)
    check_temperature(t_t)
    keep = position_mask(student_logits.shape[:-1], mask, labels, student_logits.device)
    p_s = log_probs(student_logits, t_s).exp().sort(dim=-1, descending=True).values
    p_t = log_probs(teacher_logits, t_t).exp().sort(dim=-1, descending=True).values
    size = max(p_s.shape[-1], p_t.shape[-1])
    p_s = F.pad(p_s, (0, size - p_s.shape[-1]))
    p_t = F.pad(p_t, (0, size - p_t.shape[-1]))
    return reduce((p_s - p_t).abs().sum(-1), keep, reduction)


__all__ = ["uld"]
