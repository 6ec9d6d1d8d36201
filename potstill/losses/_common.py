"""Conventions shared by every loss: masks, reductions, temperature and shape checks.

Every loss computes one value per position (the *leading* shape of its inputs, i.e. everything
but the last dimension) and then reduces with :func:`reduce`:

* ``"mean"`` — average over the positions that count (the per-token convention); a fully
  masked batch gives 0 with a zero gradient, never NaN;
* ``"sum"`` — sum over the positions that count;
* ``"none"`` — the per-position values, zero where masked.

Which positions count comes from ``mask`` (a boolean or 0/1 tensor of the leading shape,
``True``/1 = counts, e.g. an ``attention_mask``) and/or ``labels`` (integer tensor of the
leading shape, ``-100`` = ignored, Hugging Face's convention). Both may be given: a position
counts only if both say so.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "none")
IGNORE_INDEX = -100


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def position_mask(
    leading_shape: torch.Size, mask: Tensor | None, labels: Tensor | None, device: torch.device
) -> Tensor | None:
    """Combine ``mask`` and ``labels`` into one boolean mask of ``leading_shape`` (or None)."""
    combined: Tensor | None = None
    for name, value in (("mask", mask), ("labels", labels)):
        if value is None:
            continue
        if value.shape != leading_shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but the logits' leading shape is "
                f"{tuple(leading_shape)}: it must have one entry per position"
            )
        counts = value != IGNORE_INDEX if name == "labels" else value.bool()
        counts = counts.to(device)
        combined = counts if combined is None else combined & counts
    return combined


def reduce(per_position: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Reduce per-position values under ``mask`` with ``reduction`` (see module doc)."""
    check_reduction(reduction)
    if mask is not None:
        # where, not multiply: a masked inf/NaN must not leak into the result.
        per_position = torch.where(mask, per_position, per_position.new_zeros(()))
    if reduction == "none":
        return per_position
    total = per_position.sum()
    if reduction == "sum":
        return total
    count = per_position.numel() if mask is None else mask.sum()
    if isinstance(count, Tensor):
        return total / count.clamp(min=1).to(total.dtype)
    return total / max(count, 1)


def check_pair(student: Tensor, teacher: Tensor, loss: str) -> None:
    """Both sides must be distributions over the same vocabulary at the same positions."""
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"{loss}: student vocabulary size {student.shape[-1]} differs from the teacher's "
            f"{teacher.shape[-1]}. The KL family compares distributions over one shared "
            "vocabulary: for different tokenizers use the 'uld' loss; if the two differ only "
            "by padding rows, slice both to the shared range first "
            "(potstill.losses.shared_vocabulary)."
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"{loss}: student logits {tuple(student.shape)} and teacher logits "
            f"{tuple(teacher.shape)} must have the same shape"
        )


def shared_vocabulary(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Slice both logit tensors to the vocabulary range they share.

    For models whose vocabularies differ only by padding rows at the end (e.g. 151,936 vs
    152,064), the first ``min(V_s, V_t)`` entries are the same tokens.
    """
    size = min(student.shape[-1], teacher.shape[-1])
    return student[..., :size], teacher[..., :size]


def as_float(x: Tensor) -> Tensor:
    """float32 for any lower precision (fp16, bf16); float64 stays float64 (for gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """Log-softmax at ``temperature`` in float32 (or float64 if given), whatever the input dtype."""
    return torch.log_softmax(as_float(logits) / temperature, dim=-1)


def soft_targets(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Probabilities ``softmax(logits / T)`` (Hinton's soft targets), in float32."""
    check_temperature(temperature)
    return log_probs(logits, temperature).exp()
