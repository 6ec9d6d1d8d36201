"""Fused, chunked "linear + distillation loss": large vocabularies without the memory wall.

The naive way to distil a causal LM materialises the student's ``[N, V]`` logits, the
teacher's, their float32 softmaxes and the gradient of the logits — several ``N × V`` float32
tensors (N = 8,192 tokens × V = 128,256 is 4.2 GB each). Here the student's logits are
computed from its last hidden states and lm-head weight one chunk of tokens at a time, the loss
and its gradients for that chunk are taken at once, and the chunk's logits are freed: peak
memory holds one ``chunk × V`` block instead of ``N × V``.

The per-position losses are the very functions of :mod:`potstill.losses` (called with
``reduction="none"``), so the numbers are the unfused ones; gradients with respect to the
hidden states, the head weight and bias are exact (autograd on each chunk).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._common import REDUCTIONS, position_mask
from .divergences import cross_entropy
from .registry import check_params, get_loss


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    # the matmul runs in the inputs' dtype (bf16 on GPU); the loss then upcasts to float32
    return torch.nn.functional.linear(hidden, weight, bias)


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: dict[str, Any],
                labels: Tensor | None, keep: Tensor | None, settings: dict[str, Any]) -> Tensor:
        spec = get_loss(settings["loss"])
        alpha, chunk, denominator = settings["alpha"], settings["chunk_size"], settings["denominator"]
        grad_hidden = torch.zeros_like(hidden) if hidden.requires_grad else None
        # accumulate the head's gradient over chunks in at least float32
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros_like(weight, dtype=acc) if weight.requires_grad else None
        grad_bias = torch.zeros_like(bias, dtype=acc) if bias is not None and bias.requires_grad else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            with torch.no_grad():
                t_logits = None
                if alpha > 0:
                    t_logits = (teacher["logits"][rows] if teacher["logits"] is not None
                                else _logits(teacher["hidden"][rows], teacher["weight"], teacher["bias"]))
                # the chunk's logits as a leaf: autograd only differentiates the loss w.r.t. them,
                # and the matmuls of the chain rule below write into the accumulators in place
                s_logits = _logits(hidden[rows], weight, bias)
            with torch.enable_grad():
                s_logits.requires_grad_(True)
                m = keep[rows] if keep is not None else None
                per_position = alpha * spec.fn(s_logits, t_logits, mask=m, reduction="none",
                                               **settings["params"]) if alpha > 0 else 0.0
                if alpha < 1:
                    per_position = per_position + (1 - alpha) * cross_entropy(
                        s_logits, labels[rows], mask=m, reduction="none")
                chunk_loss = per_position.sum() / denominator
                (grad_logits,) = torch.autograd.grad(chunk_loss, s_logits)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(acc), hidden[rows].to(acc))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0).to(acc)
            total += chunk_loss.detach()
        ctx.grads = (grad_hidden,
                     grad_weight.to(weight.dtype) if grad_weight is not None else None,
                     grad_bias.to(bias.dtype) if grad_bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor):
        if grad_output.item() == 1.0:  # the common case: no copy of the head-sized gradient
            scaled = ctx.grads
        else:
            scaled = tuple(g * grad_output.to(g.dtype) if g is not None else None for g in ctx.grads)
        return (*scaled, None, None, None, None)


def fused_linear_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None = None, *,
                      teacher_logits: Tensor | None = None, teacher_hidden: Tensor | None = None,
                      teacher_weight: Tensor | None = None, teacher_bias: Tensor | None = None,
                      labels: Tensor | None = None, mask: Tensor | None = None, loss: str = "kl",
                      alpha: float = 1.0, chunk_size: int = 1024, reduction: str = "mean",
                      **params: Any) -> Tensor:
    """``α · loss(student, teacher) + (1 − α) · CE(labels)`` from hidden states, chunk by chunk.

    Args:
        hidden: the student's last hidden states ``[..., H_s]``.
        weight, bias: the student's lm head (``[V, H_s]``, ``[V]``); student logits are
            ``hidden @ weight.T + bias``.
        teacher_logits: the teacher's logits ``[..., V]``, or give ``teacher_hidden``
            ``[..., H_t]`` with ``teacher_weight`` ``[V, H_t]`` (and ``teacher_bias``) so that
            the teacher's logits are also computed one chunk at a time.
        labels: ``[...]`` with ``-100`` for ignored positions; they mask the distillation term
            too, and are the targets of the CE term (needed when ``alpha < 1``).
        mask: optional boolean/0-1 ``[...]`` mask of positions that count.
        loss: a registered distillation loss on logits (``kl``, ``reverse_kl``, ``jsd``,
            ``skew_kl``, ``skew_reverse_kl``, ``tvd``, ``soft_cross_entropy``, ``mse``);
            ``params`` go to it (``temperature``, ``beta``, ``skew``).
        chunk_size: tokens per chunk; peak memory grows with ``chunk_size × V``.
        reduction: ``"mean"`` (per counted position, as the unfused losses) or ``"sum"``.
    """
    spec = get_loss(loss)
    if spec.kind not in ("divergence", "logits"):
        raise ValueError(f"fused_linear_loss supports the logit distillation losses, not {loss!r}")
    check_params(loss, params)
    if reduction not in REDUCTIONS[:2]:
        raise ValueError(f"fused_linear_loss supports reduction 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if alpha < 1 and labels is None:
        raise ValueError("alpha < 1 mixes in hard-label cross-entropy: labels are needed")
    if alpha > 0 and (teacher_logits is None) == (teacher_hidden is None or teacher_weight is None):
        raise ValueError("give either teacher_logits, or teacher_hidden with teacher_weight")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} does not match the head weight {tuple(weight.shape)}")
    teacher_vocab = (teacher_logits.shape[-1] if teacher_logits is not None
                     else teacher_weight.shape[0] if teacher_weight is not None else weight.shape[0])
    if teacher_vocab != weight.shape[0]:
        raise ValueError(
            f"{loss}: student vocabulary size {weight.shape[0]} differs from the teacher's {teacher_vocab}; "
            "use 'uld' for different tokenizers, or slice to the shared range if only padding differs"
        )

    leading = hidden.shape[:-1]
    keep = position_mask(leading, mask, labels, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    count = flat.shape[0] if keep is None else int(keep.sum())
    teacher = {
        "logits": teacher_logits.reshape(-1, teacher_vocab) if teacher_logits is not None else None,
        "hidden": teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None,
        "weight": teacher_weight, "bias": teacher_bias,
    }
    settings = {"loss": loss, "alpha": alpha, "chunk_size": chunk_size, "params": params,
                "denominator": max(count, 1) if reduction == "mean" else 1}
    return _FusedLinearLoss.apply(
        flat, weight, bias, teacher, labels.reshape(-1) if labels is not None else None,
        keep.reshape(-1) if keep is not None else None, settings)
