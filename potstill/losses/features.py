"""Losses on intermediate features: hidden states, feature maps, attention maps.

Inputs are ``[..., D]`` (hidden states: one vector per position) for :func:`cosine_loss` and
the MSE (:func:`potstill.losses.divergences.logit_mse` serves both logits and features), and
``[B, C, *spatial]`` for :func:`attention_transfer`. When the student's width differs from the
teacher's, map the student through a :class:`Projection` first (it is trained with the student).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import as_float, position_mask, reduce


def _check_same(student: Tensor, teacher: Tensor, name: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student features {tuple(student.shape)} and teacher features "
            f"{tuple(teacher.shape)} differ in shape; when only the width differs, add a "
            "Projection (recipes: projection: auto)"
        )


def cosine_loss(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None,
                labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """``1 − cos(student, teacher)`` per position (DistilBERT's hidden-state loss), in [0, 2]."""
    _check_same(student, teacher, "cosine")
    keep = position_mask(student.shape[:-1], mask, labels, student.device)
    cos = F.cosine_similarity(as_float(student), as_float(teacher), dim=-1, eps=1e-8)
    return reduce(1.0 - cos, keep, reduction)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis' spatial attention: ``normalize(mean_c |A_c|^p)`` flattened, ``[B, S]``."""
    if features.dim() < 3:
        raise ValueError(f"attention transfer needs [B, C, *spatial] features, got {tuple(features.shape)}")
    q = as_float(features).abs().pow(p).mean(dim=1).flatten(1)
    return F.normalize(q, dim=1, eps=1e-12)


def attention_transfer(student: Tensor, teacher: Tensor, *, p: float = 2.0,
                       mask: Tensor | None = None, labels: Tensor | None = None,
                       reduction: str = "mean") -> Tensor:
    """Attention transfer: ``‖Q_S − Q_T‖²`` per example, ``Q`` = :func:`attention_map`.

    Channel counts may differ (the map averages them out); the spatial shapes must match.
    Works on CNN feature maps ``[B, C, H, W]`` and transformer attention probabilities
    ``[B, heads, L, L]`` (heads act as channels).
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"attention: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
            "share batch and spatial dimensions (channels may differ)"
        )
    keep = position_mask(student.shape[:1], mask, labels, student.device)
    per_example = (attention_map(student, p) - attention_map(teacher, p)).pow(2).sum(-1)
    return reduce(per_example, keep, reduction)


class Projection(nn.Module):
    """A learned linear map from the student's width to the teacher's (FitNets' regressor).

    ``init``: ``"xavier"`` (default), ``"orthogonal"``, or ``"identity"`` (the leading
    ``min(d_s, d_t)`` coordinates copied, the rest zero: a projection that starts as a no-op
    when the student was cut from the teacher).
    """

    def __init__(self, student_dim: int, teacher_dim: int,
                 init: Literal["xavier", "orthogonal", "identity"] = "xavier", bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim, bias=bias)
        with torch.no_grad():
            if init == "xavier":
                nn.init.xavier_uniform_(self.linear.weight)
            elif init == "orthogonal":
                nn.init.orthogonal_(self.linear.weight)
            elif init == "identity":
                self.linear.weight.zero_()
                n = min(student_dim, teacher_dim)
                self.linear.weight[:n, :n] = torch.eye(n)
            else:
                raise ValueError(f"unknown projection init {init!r}; use xavier, orthogonal or identity")
            if bias:
                self.linear.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features.to(self.linear.weight.dtype))
