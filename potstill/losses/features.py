"""Losses on intermediate features: hidden states, feature maps, attention maps.

Inputs are ``[..., D]`` (hidden states: one vector per position) for :func:`cosine_loss` and
the MSE (:func:`potstill.losses.divergences.logit_mse` serves both logits and features),
``[B, C, *spatial]`` for :func:`attention_transfer`, and transformer attention probabilities
``[B, heads, q, k]`` for :func:`attention_kl`. When the student's width differs from the
teacher's, map the student through a :class:`Projection` (last axis) or a
:class:`ChannelProjection` (1×1 convolution over the channels of a feature map) first; either is
trained with the student.
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
    """``1 − cos(student, teacher)`` per position (DistilBERT's hidden-state loss), in [0, 2].

    Args:
        student: ``[..., D]`` features (hidden states ``[B, L, D]``, pooled ``[B, D]``); map a
            narrower student through a :class:`Projection` first.
        teacher: ``[..., D]``, the same shape.
        mask: ``[...]`` bool or 0/1, true where a position counts.
        labels: ``[...]`` integers, ``-100`` where a position is ignored.
        reduction: ``"mean"`` over the positions that count, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[...]`` per position for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import cosine_loss
        >>> s = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> t = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # same direction, then orthogonal
        >>> [round(v, 4) for v in cosine_loss(s, t, reduction="none").tolist()]
        [0.0, 1.0]
    """
    _check_same(student, teacher, "cosine")
    keep = position_mask(student.shape[:-1], mask, labels, student.device)
    cos = F.cosine_similarity(as_float(student), as_float(teacher), dim=-1, eps=1e-8)
    return reduce(1.0 - cos, keep, reduction)


def similarity_loss(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None,
                    labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """Relational: ``(cos(s_i, s_j) − cos(t_i, t_j))²`` over the pairs ``i ≠ j`` of a batch of embeddings.

    ``student`` ``[B, D_s]``, ``teacher`` ``[B, D_t]`` (widths may differ: only the B × B cosine
    matrices are compared). It asks the student for the teacher's similarity *structure* — what
    retrieval and the Spearman / neighbour metrics measure — rather than the vectors themselves
    (in the spirit of Tung & Mori's similarity-preserving KD, 2019, on cosines). ``mask`` ``[B]``:
    examples left out of every pair. ``"mean"`` averages over the counted pairs; ``"none"`` gives
    the ``[B, B]`` matrix of squared differences (diagonal 0). ``labels`` are ignored.

    Args:
        student: ``[B, D_s]`` embeddings.
        teacher: ``[B, D_t]`` embeddings of the same B examples (``D_t`` may differ from ``D_s``).
        mask: ``[B]`` bool or 0/1, true for the examples that take part.
        labels: accepted for the common signature; ignored.
        reduction: ``"mean"`` over the counted pairs, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or the ``[B, B]`` squared differences for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import similarity_loss
        >>> s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])            # the student's two are orthogonal (cos 0)
        >>> t = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # the teacher's are parallel (cos 1)
        >>> float(similarity_loss(s, t))  # (0 − 1)² for each of the pairs (0, 1) and (1, 0)
        1.0
    """
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"similarity: needs embeddings [B, D] for the same B examples, got student "
                         f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    s = F.normalize(as_float(student), dim=-1, eps=1e-8)
    t = F.normalize(as_float(teacher), dim=-1, eps=1e-8)
    per_pair = (s @ s.T - t @ t.T).pow(2)
    b = student.shape[0]
    keep = ~torch.eye(b, dtype=torch.bool, device=student.device)
    examples = position_mask(student.shape[:1], mask, None, student.device)
    if examples is not None:
        keep = keep & examples[:, None] & examples[None, :]
    return reduce(per_pair, keep, reduction)


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Zagoruyko & Komodakis' spatial attention: ``normalize(mean_c |A_c|^p)`` flattened, ``[B, S]``.

    Args:
        features: ``[B, C, *spatial]`` (a CNN's ``[B, C, H, W]``, or attention ``[B, heads, q, k]``).
        p: the power applied to each activation's magnitude.

    Returns:
        ``[B, S]`` with ``S`` the product of the spatial sizes; each row has unit L2 norm.

    Example:
        >>> import torch
        >>> from potstill.losses import attention_map
        >>> a = torch.tensor([[[[3.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]]])  # [1, 2, 2, 2]
        >>> attention_map(a).tolist()  # all the energy at the top-left position
        [[1.0, 0.0, 0.0, 0.0]]
    """
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

    Args:
        student: ``[B, C_s, *spatial]``.
        teacher: ``[B, C_t, *spatial]``, the same batch and spatial shape.
        p: the power of :func:`attention_map`.
        mask: ``[B]`` bool or 0/1, true where an example counts.
        labels: ``[B]`` integers, ``-100`` where an example is ignored.
        reduction: ``"mean"`` over the examples that count, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[B]`` per example for ``reduction="none"``; in ``[0, 2]``.

    Example:
        >>> import torch
        >>> from potstill.losses import attention_transfer
        >>> s = torch.zeros(1, 3, 2, 2); s[0, :, 0, 0] = 1.0  # 3 channels, all at the top left
        >>> t = torch.zeros(1, 5, 2, 2); t[0, :, 1, 1] = 2.0  # 5 channels, all at the bottom right
        >>> float(attention_transfer(s, t))  # ‖[1, 0, 0, 0] − [0, 0, 0, 1]‖²
        2.0
        >>> float(attention_transfer(s, 7 * s))  # the same map at another scale
        0.0
    """
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"attention: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must "
            "share batch and spatial dimensions (channels may differ)"
        )
    keep = position_mask(student.shape[:1], mask, labels, student.device)
    per_example = (attention_map(student, p) - attention_map(teacher, p)).pow(2).sum(-1)
    return reduce(per_example, keep, reduction)


def attention_kl(student: Tensor, teacher: Tensor, *, mask: Tensor | None = None,
                 labels: Tensor | None = None, reduction: str = "mean") -> Tensor:
    """MiniLM's self-attention transfer: ``KL(A_T ‖ A_S)`` over the key axis, one row per (head, query).

    ``student`` / ``teacher``: attention probabilities ``[B, heads, q, k]`` (rows sum to 1; a
    Hugging Face model's ``attentions``). ``mask``: the attention mask ``[B, k]`` (``q = k``, self-
    attention): padded queries are left out of the mean and padded keys out of each row's sum.
    ``"mean"`` averages over heads and valid queries; ``"none"`` gives ``[B, heads, q]``.
    ``labels`` are accepted for the common signature and ignored (they do not mask attention rows).

    Args:
        student: ``[B, heads, q, k]`` attention probabilities (each row sums to 1).
        teacher: ``[B, heads, q, k]``, the same shape (head counts must match).
        mask: the attention mask ``[B, k]`` (self-attention, ``q = k``); 1 = a real token.
        labels: accepted for the common signature; ignored.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        A scalar, or ``[B, heads, q]`` per row for ``reduction="none"``.

    Example:
        >>> import torch
        >>> from potstill.losses import attention_kl
        >>> a_s = torch.tensor([0.5, 0.5]).expand(1, 1, 2, 2)   # [B=1, heads=1, q=2, k=2]
        >>> a_t = torch.tensor([0.25, 0.75]).expand(1, 1, 2, 2)
        >>> # each row: 0.25·ln(0.25/0.5) + 0.75·ln(0.75/0.5)
        >>> round(float(attention_kl(a_s, a_t)), 4)
        0.1308
        >>> # a third, padded token: its query row (which disagrees) is left out of the mean
        >>> a_s = torch.tensor([[[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]])
        >>> a_t = torch.tensor([[[[0.25, 0.75, 0.0], [0.25, 0.75, 0.0], [0.0, 1.0, 0.0]]]])
        >>> round(float(attention_kl(a_s, a_t, mask=torch.tensor([[1, 1, 0]]))), 4)
        0.1308
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(f"attention_kl: needs attention maps [B, heads, q, k], got student "
                         f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(f"attention_kl: the student has {student.shape[1]} attention heads and the teacher "
                         f"{teacher.shape[1]}; attention maps are compared head by head, so the counts "
                         "must match (pair layers with equal head counts)")
    if student.shape != teacher.shape:
        raise ValueError(f"attention_kl: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         "attention maps differ in shape")
    p_s, p_t = as_float(student), as_float(teacher)
    tiny = torch.finfo(p_s.dtype).tiny
    # xlogy: a key the teacher ignores (p_T = 0) contributes exactly 0
    per_key = torch.xlogy(p_t, p_t) - p_t * p_s.clamp_min(tiny).log()
    keep = None
    if mask is not None:
        b, heads, q, k = student.shape
        if mask.shape != (b, k) or q != k:
            raise ValueError(f"attention_kl: mask has shape {tuple(mask.shape)}; for self-attention maps "
                             f"{tuple(student.shape)} it must be the attention mask [B, k] = {(b, k)}")
        valid = mask.bool().to(student.device)
        per_key = torch.where(valid[:, None, None, :], per_key, per_key.new_zeros(()))
        keep = valid[:, None, :].expand(b, heads, q)
    per_row = per_key.sum(-1)
    return reduce(per_row, keep, reduction)


class ChannelProjection(nn.Module):
    """A learned 1×1 convolution from the student's channels to the teacher's, for feature maps
    ``[B, C, *spatial]`` (1, 2 or 3 spatial axes) whose channel counts differ (FitNets' regressor).

    Args:
        student_channels: ``C_s``, the student map's channels.
        teacher_channels: ``C_t``, the teacher map's channels.
        spatial_dims: 1, 2 or 3 spatial axes after the channels.
        init: as for :class:`Projection`.
        bias: whether the convolution has a bias (initialised to 0).

    Example:
        >>> import torch
        >>> from potstill.losses import ChannelProjection
        >>> ChannelProjection(16, 64)(torch.ones(2, 16, 7, 7)).shape
        torch.Size([2, 64, 7, 7])
    """

    def __init__(self, student_channels: int, teacher_channels: int, spatial_dims: int = 2,
                 init: Literal["xavier", "orthogonal", "identity"] = "xavier", bias: bool = True):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}.get(spatial_dims)
        if conv is None:
            raise ValueError(f"a 1×1 convolution needs 1, 2 or 3 spatial axes, got {spatial_dims}")
        self.conv = conv(student_channels, teacher_channels, kernel_size=1, bias=bias)
        with torch.no_grad():
            weight = self.conv.weight.view(teacher_channels, student_channels)  # a 1×1 kernel is a matrix
            _init_matrix(weight, init)
            if bias:
                self.conv.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return self.conv(features.to(self.conv.weight.dtype))


def _init_matrix(weight: Tensor, init: str) -> None:
    if init == "xavier":
        nn.init.xavier_uniform_(weight)
    elif init == "orthogonal":
        nn.init.orthogonal_(weight)
    elif init == "identity":
        weight.zero_()
        n = min(weight.shape)
        weight[:n, :n] = torch.eye(n)
    else:
        raise ValueError(f"unknown projection init {init!r}; use xavier, orthogonal or identity")


class Projection(nn.Module):
    """A learned linear map from the student's width to the teacher's (FitNets' regressor).

    ``init``: ``"xavier"`` (default), ``"orthogonal"``, or ``"identity"`` (the leading
    ``min(d_s, d_t)`` coordinates copied, the rest zero: a projection that starts as a no-op
    when the student was cut from the teacher).

    Args:
        student_dim: ``D_s``, the student's width (the last axis).
        teacher_dim: ``D_t``, the teacher's width.
        init: ``"xavier"``, ``"orthogonal"`` or ``"identity"``.
        bias: whether the map has a bias (initialised to 0).

    Example:
        >>> import torch
        >>> from potstill.losses import Projection
        >>> Projection(2, 3, init="identity")(torch.tensor([[[1.0, 2.0]]])).tolist()  # [B, L, D_s] → [B, L, D_t]
        [[[1.0, 2.0, 0.0]]]
    """

    def __init__(self, student_dim: int, teacher_dim: int,
                 init: Literal["xavier", "orthogonal", "identity"] = "xavier", bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(student_dim, teacher_dim, bias=bias)
        with torch.no_grad():
            _init_matrix(self.linear.weight, init)
            if bias:
                self.linear.bias.zero_()

    def forward(self, features: Tensor) -> Tensor:
        return self.linear(features.to(self.linear.weight.dtype))
