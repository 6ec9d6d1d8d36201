"""Fused, chunked "linear + distillation loss": large vocabularies without the memory wall.

The naive way to distil a causal LM materialises the student's ``[N, V]`` logits, the
teacher's, their float32 softmaxes and the gradient of the logits — several ``N × V`` float32
tensors (N = 8,192 tokens × V = 128,256 is 4.2 GB each). Here the student's logits are computed
from its last hidden states and lm head one chunk of tokens at a time into a few ``chunk × V``
buffers reused for every chunk; the chunk's loss and the gradient of its logits are computed in
place (closed forms, :mod:`potstill.losses.chunk_grads`), and the gradients of the hidden states,
head weight and bias are accumulated at once. Peak memory holds a few ``chunk × V`` blocks
instead of ``N × V`` ones, and the time is the matmuls'.

The teacher is its logits ``[..., V]``, its own head inputs (:class:`HeadInputs`, so its logits
are computed chunk by chunk too), or a cached top-k (:class:`~potstill.losses.sparse.SparseTarget`).
The values are those of the unfused registered losses and :func:`potstill.losses.sparse_loss`.

Liger-Kernel's chunked losses (``liger_kernel.chunked_loss``) work the same way, with autograd
(``torch.func``) on each chunk and a top-k teacher not supported.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import chunk_grads as cg
from ._common import REDUCTIONS, check_temperature, position_mask
from .registry import check_params, get_loss
from .sparse import SparseTarget


class HeadInputs(NamedTuple):
    """The logits left uncomputed: the output head's input and weights (``logits = hidden @ weight.T + bias``).

    A student's (the fused loss differentiates all three) or a frozen teacher's.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


class FusedLoss(NamedTuple):
    """The fused loss and each term's value (unweighted, detached, with the same reduction)."""

    loss: Tensor
    #: the distillation term, None when ``alpha == 0``
    distillation: Tensor | None
    #: the hard-label cross-entropy, None when ``alpha == 1``
    cross_entropy: Tensor | None


#: chunk rows from which the head's matmuls run at full rate (CPU: measured, BENCHMARKS.md;
#: CUDA: Liger-Kernel's default, not measured here)
MATMUL_ROWS = {"cpu": 256, "cuda": 1024}
#: bytes of chunk × V working blocks the default chunk size may take
MEMORY_BUDGET = {"cpu": 1 << 30, "cuda": 2 << 30}
#: working blocks autograd's graph of one chunk holds at its peak, besides the logits (the fallback)
_AUTOGRAD_BLOCKS = 4


def default_chunk_size(tokens: int, vocab: int, *, blocks: int = 4, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu", memory_budget: int | None = None) -> int:
    """Tokens per chunk: enough rows for the matmuls to run at full rate, no more, within a budget.

    ``blocks`` ``chunk × V`` working blocks in float32 (float64 for float64 inputs), plus one
    in ``dtype`` for low-precision logits, must fit in ``memory_budget`` bytes.
    """
    kind = torch.device(device).type
    work = 8 if dtype == torch.float64 else 4
    per_row = vocab * (blocks * work + (dtype.itemsize if dtype not in (torch.float32, torch.float64) else 0))
    budget = memory_budget if memory_budget is not None else MEMORY_BUDGET.get(kind, MEMORY_BUDGET["cpu"])
    rows = min(MATMUL_ROWS.get(kind, MATMUL_ROWS["cpu"]), budget // per_row)
    if rows > 64:
        rows -= rows % 32  # whole SIMD/tile multiples
    return max(1, min(rows, tokens))


class _Plan(NamedTuple):
    """What one call computes, fixed before the chunk loop."""

    loss: str
    alpha: float
    temperature: float
    params: dict[str, Any]
    kernel: cg.Kernel | None   # closed form on softmaxes, or None
    mode: str                  # "softmax", "sparse", "mse", "autograd" or "none" (alpha = 0)
    leftover: str
    chunk: int
    denominator: float

    @property
    def shares_softmax(self) -> bool:
        """Whether the CE term can read the distillation's softmax (it is at T = 1)."""
        return self.mode in ("softmax", "sparse") and self.temperature == 1.0


def _plan_mode(loss: str, params: dict[str, Any], teacher: Any, alpha: float, closed_form: bool) -> tuple[str, Any]:
    if alpha == 0:
        return "none", None
    if isinstance(teacher, SparseTarget):
        return "sparse", None
    if not closed_form:
        return "autograd", None
    if loss == "mse":
        return "mse", None
    kernel = cg.kernel_for(loss, params)
    return ("softmax", kernel) if kernel is not None else ("autograd", None)


def _blocks(mode: str, alpha: float, temperature: float) -> int:
    base = {"softmax": 4, "sparse": 2, "mse": 2, "autograd": 2 + _AUTOGRAD_BLOCKS, "none": 2}[mode]
    ce_block = alpha < 1 and (mode in ("mse", "autograd") or (mode != "none" and temperature != 1.0))
    return base + int(ce_block)


class _Accumulator:
    """The gradients of the student's hidden states, head weight and bias, summed chunk by chunk."""

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, needs: tuple[bool, bool, bool]):
        self.acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        # the first chunk writes, the others add: no zero-fill pass over the head-sized gradient
        self.hidden = torch.empty_like(hidden) if needs[0] else None
        self.weight = torch.empty_like(weight, dtype=self.acc) if needs[1] else None
        self.bias = torch.empty_like(bias, dtype=self.acc) if bias is not None and needs[2] else None
        self.started = False

    def add(self, rows: slice, hidden: Tensor, weight: Tensor, grad_logits: Tensor, scratch: Tensor | None) -> None:
        """``grad_logits`` [C, V] (float32/64) of the chunk ``hidden`` [C, H] (in the matmul dtype)."""
        if self.hidden is not None:
            if grad_logits.dtype == weight.dtype == self.hidden.dtype:
                torch.mm(grad_logits, weight, out=self.hidden[rows])
            else:  # low precision: the matmul in the head's dtype, as autograd's would be
                low = scratch.copy_(grad_logits) if scratch is not None else grad_logits.to(weight.dtype)
                self.hidden[rows] = (low @ weight).to(self.hidden.dtype)
        if self.weight is not None:
            if self.started:
                self.weight.addmm_(grad_logits.t().to(self.acc), hidden.to(self.acc))
            else:
                torch.mm(grad_logits.t().to(self.acc), hidden.to(self.acc), out=self.weight)
        if self.bias is not None:
            if self.started:
                self.bias += grad_logits.sum(0).to(self.acc)
            else:
                torch.sum(grad_logits, 0, dtype=self.acc, out=self.bias)
        self.started = True

    def result(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor | None, ...]:
        if not self.started:  # no tokens at all
            for grad in (self.weight, self.bias):
                if grad is not None:
                    grad.zero_()
        return (self.hidden,
                self.weight.to(weight.dtype) if self.weight is not None else None,
                self.bias.to(bias.dtype) if self.bias is not None and bias is not None else None)


def _matmul_dtype(hidden: Tensor) -> torch.dtype:
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):  # the head's matmul runs as autocast would run it
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, low: Tensor | None) -> Tensor:
    """``hidden @ weight.T + bias`` written into ``out`` (float32/64); through ``low`` (a block in the
    matmul dtype) when that dtype is lower."""
    target = out if low is None else low
    if bias is None:
        torch.mm(hidden, weight.t(), out=target)
    else:
        torch.addmm(bias, hidden, weight.t(), out=target)
    return out if low is None else out.copy_(low)


def chunk_loss(buffers: cg.Buffers, plan: _Plan, s: Tensor, teacher: Any, labels: Tensor | None,
               keep: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One chunk: the gradient of ``Σ (α·loss + (1−α)·CE) / denominator`` with respect to the
    chunk's logits ``s`` (overwritten; the gradient is returned in one of the buffers), and the
    per-position distillation and CE values (None for an absent term).

    ``teacher``: the chunk's teacher logits block (float32/64, overwritten) for the dense modes,
    its :class:`SparseTarget` rows for ``"sparse"``, None for ``"none"``.
    """
    rows = s.shape[0]
    weight = s.new_full((rows,), 1.0 / plan.denominator)
    if keep is not None:
        weight = weight * keep
    ce = ce_probs = None
    if plan.alpha < 1:
        assert labels is not None
        targets = labels.clamp_min(0)
        if not plan.shares_softmax:
            ce_probs = buffers.get("ce" if plan.mode == "softmax" or plan.mode == "sparse" else "q", rows)
            ce = cg.hard_cross_entropy(s, targets, ce_probs)
    value = grad = None
    coef: cg.Coefficient = 1.0
    if plan.mode in ("softmax", "sparse"):
        q = buffers.get("q", rows)
        cg.log_softmax_(s, plan.temperature, q)
        if plan.alpha < 1 and plan.shares_softmax:
            ce, ce_probs = -s.gather(1, targets[:, None]).squeeze(1), q
        if plan.mode == "sparse":
            sparse_params = {k: v for k, v in plan.params.items() if k != "temperature"}
            value, grad, coef = cg.sparse_kernel(s, q, teacher, plan.temperature, plan.loss, plan.leftover,
                                                 sparse_params)
        else:
            p = buffers.get("p", rows)
            cg.log_softmax_(teacher, plan.temperature, p)
            kernel_params = {k: v for k, v in plan.params.items() if k != "temperature"}
            value, grad, coef = plan.kernel(s, q, teacher, p, plan.temperature, **kernel_params)
    elif plan.mode == "mse":
        value, grad, coef = cg.logit_mse(s, teacher)
    elif plan.mode == "autograd":
        value, grad, coef = cg.autograd_kernel(s, teacher, plan.loss, plan.params)
    if grad is not None:  # the kernel's coefficient and the row weights in one pass
        grad.mul_((plan.alpha * weight * coef)[:, None])
    if ce_probs is not None:
        ce_weight = (1.0 - plan.alpha) * weight
        if grad is None:
            grad = ce_probs.mul_(ce_weight[:, None])
        else:
            grad.addcmul_(ce_probs, ce_weight[:, None])
        grad.scatter_add_(1, targets[:, None], -ce_weight[:, None])
    assert grad is not None
    if keep is not None and not bool(keep.all()):
        grad.masked_fill_(~keep[:, None], 0.0)  # a masked row's inf/NaN must not leak
    return grad, value, ce


def accumulate(hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: Any, labels: Tensor | None,
               keep: Tensor | None, plan: _Plan, needs: tuple[bool, bool, bool]) -> tuple[tuple, Tensor]:
    """Every chunk's loss and the gradients of (hidden, weight, bias) summed over chunks (those in
    ``needs``), and the two terms' summed values (distillation, CE)."""
    low_dtype = _matmul_dtype(hidden)
    work = torch.float64 if low_dtype == torch.float64 else torch.float32
    buffers = cg.Buffers(weight.shape[0], work, hidden.device)
    grads = _Accumulator(hidden, weight, bias, needs)
    totals = torch.zeros(2, dtype=grads.acc, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        # cast once: the matmuls run in the dtype autocast would give them
        w, b = weight.to(low_dtype), bias.to(low_dtype) if bias is not None else None
        if isinstance(teacher, HeadInputs):
            teacher = HeadInputs(teacher.hidden, teacher.weight.to(low_dtype),
                                 teacher.bias.to(low_dtype) if teacher.bias is not None else None)
        for start in range(0, hidden.shape[0], plan.chunk):
            rows = slice(start, start + plan.chunk)
            h = hidden[rows].to(low_dtype)
            n = h.shape[0]
            low = buffers.get("low", n, low_dtype) if low_dtype != work else None
            s = _logits_into(buffers.get("s", n), h, w, b, low)
            t_chunk: Any = None
            if plan.mode == "sparse":
                t_chunk = SparseTarget(*(x[rows] for x in teacher))
            elif plan.mode != "none":
                t_chunk = buffers.get("t", n)
                if isinstance(teacher, HeadInputs):
                    _logits_into(t_chunk, teacher.hidden[rows].to(low_dtype), teacher.weight, teacher.bias, low)
                else:
                    t_chunk.copy_(teacher[rows])
            m = keep[rows] if keep is not None else None
            grad, value, ce = chunk_loss(buffers, plan, s, t_chunk, labels[rows] if labels is not None else None, m)
            for i, part in enumerate((value, ce)):
                if part is not None:
                    totals[i] += (part if m is None else torch.where(m, part, 0.0)).sum().to(grads.acc)
            grads.add(rows, h, w, grad, low)
    return grads.result(weight, bias), totals


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: Any,
                labels: Tensor | None, keep: Tensor | None, plan: _Plan) -> tuple[Tensor, Tensor, Tensor]:
        needs = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
        ctx.grads, totals = accumulate(hidden, weight, bias, teacher, labels, keep, plan, needs)
        # what a second backward through a retained graph needs to compute the gradients again
        ctx.save_for_backward(hidden, weight, bias)
        ctx.rest = (teacher, labels, keep, plan, needs)
        scale = 1.0 / plan.denominator
        distillation, cross_entropy = totals[0] * scale, totals[1] * scale
        total = plan.alpha * distillation + (1.0 - plan.alpha) * cross_entropy
        ctx.mark_non_differentiable(distillation, cross_entropy)
        return total, distillation, cross_entropy

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor, *_unused: Tensor):
        # handed over, not kept: autograd can then take them as .grad without a copy of the head-sized one
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward (retain_graph=True): compute them again
            grads, _ = accumulate(*ctx.saved_tensors, *ctx.rest)
        if grad_output.item() != 1.0:  # 1.0 is the common case: no copy of the head-sized gradient
            grads = tuple(g * grad_output.to(g.dtype) if g is not None else None for g in grads)
        return (*grads, None, None, None, None)


def fused_linear_loss(student: HeadInputs, teacher: Tensor | HeadInputs | SparseTarget | None = None, *,
                      labels: Tensor | None = None, mask: Tensor | None = None, loss: str = "kl",
                      alpha: float = 1.0, chunk_size: int | None = None, memory_budget: int | None = None,
                      reduction: str = "mean", sparse_leftover: str = "bucket", closed_form: bool = True,
                      **params: Any) -> FusedLoss:
    """``α · loss(student, teacher) + (1 − α) · CE(labels)`` from the student's head inputs, chunk by chunk.

    Args:
        student: the student's last hidden states ``[..., H]`` and lm head (``[V, H]``, ``[V]``).
        teacher: its logits ``[..., V]``; its :class:`HeadInputs` (hidden ``[..., H_t]``, head
            ``[V, H_t]``), whose logits are then also computed per chunk; or a cached
            :class:`SparseTarget` (``[..., k]``, at the loss's ``temperature``). Frozen: no
            gradient reaches it. Not needed when ``alpha == 0``.
        labels: ``[...]`` with ``-100`` for ignored positions; they mask the distillation term
            too, and are the targets of the CE term (needed when ``alpha < 1``).
        mask: optional boolean/0-1 ``[...]`` mask of positions that count.
        loss: a registered distillation loss on logits (``kl``, ``reverse_kl``, ``jsd``,
            ``skew_kl``, ``skew_reverse_kl``, ``tvd``, ``soft_cross_entropy``, ``mse``; a
            sparse teacher takes the divergences); ``params`` go to it (``temperature``,
            ``beta``, ``skew``).
        chunk_size: tokens per chunk; by default :func:`default_chunk_size` from the vocabulary,
            the dtype, the device and ``memory_budget`` (bytes of ``chunk × V`` working blocks).
        reduction: ``"mean"`` (per counted position, as the unfused losses) or ``"sum"``.
        sparse_leftover: a sparse teacher's leftover mass, ``"bucket"`` or ``"renormalize"``
            (see :mod:`potstill.losses.sparse`).
        closed_form: compute the gradient of the logits in closed form where the loss has one
            (False: autograd on every chunk, slower and larger; for comparison).

    Returns:
        :class:`FusedLoss`: the differentiable total and the two terms' values.
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
    if alpha > 0 and teacher is None:
        raise ValueError("alpha > 0: the distillation term needs a teacher (logits, HeadInputs or SparseTarget)")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if sparse_leftover not in ("bucket", "renormalize"):
        raise ValueError(f"sparse_leftover must be 'bucket' or 'renormalize', got {sparse_leftover!r}")
    hidden, weight, bias = student
    if weight.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} does not match the head weight {tuple(weight.shape)}")
    leading, vocab = hidden.shape[:-1], weight.shape[0]
    temperature = float(params.get("temperature", 1.0))
    check_temperature(temperature)
    if alpha > 0:
        teacher = _flat_teacher(teacher, loss, spec.kind, leading, vocab)
    mode, kernel = _plan_mode(loss, params, teacher, alpha, closed_form)
    keep = position_mask(leading, mask, labels, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    count = flat.shape[0] if keep is None else int(keep.sum())
    if chunk_size is None:
        chunk_size = default_chunk_size(flat.shape[0], vocab, blocks=_blocks(mode, alpha, temperature),
                                        dtype=_matmul_dtype(hidden), device=hidden.device,
                                        memory_budget=memory_budget)
    plan = _Plan(loss, alpha, temperature, dict(params), kernel, mode, sparse_leftover, chunk_size,
                 float(max(count, 1)) if reduction == "mean" else 1.0)
    total, distillation, cross_entropy = _FusedLinearLoss.apply(
        flat, weight, bias, teacher if alpha > 0 else None,
        labels.reshape(-1).to(hidden.device) if labels is not None else None,
        keep.reshape(-1) if keep is not None else None, plan)
    return FusedLoss(total, distillation if alpha > 0 else None, cross_entropy if alpha < 1 else None)


def _flat_teacher(teacher: Any, loss: str, kind: str, leading: torch.Size, vocab: int) -> Any:
    """The teacher with its positions flattened to one axis, checked against the student's."""
    if isinstance(teacher, SparseTarget):
        if kind != "divergence":
            raise ValueError(f"a sparse teacher supports the divergences on distributions, not {loss!r}")
        if teacher.ids.shape[:-1] != leading:
            raise ValueError(f"cached teacher positions {tuple(teacher.ids.shape[:-1])} do not match the "
                             f"student's {tuple(leading)}")
        k = teacher.ids.shape[-1]
        return SparseTarget(teacher.ids.reshape(-1, k), teacher.logprobs.reshape(-1, k), teacher.rest.reshape(-1))
    if isinstance(teacher, HeadInputs):
        t_vocab, t_leading = teacher.weight.shape[0], teacher.hidden.shape[:-1]
        flat = HeadInputs(teacher.hidden.reshape(-1, teacher.hidden.shape[-1]), teacher.weight, teacher.bias)
    elif isinstance(teacher, Tensor):
        t_vocab, t_leading = teacher.shape[-1], teacher.shape[:-1]
        flat = teacher.reshape(-1, t_vocab)
    else:
        raise TypeError(f"teacher must be logits, HeadInputs or a SparseTarget, not {type(teacher).__name__}")
    if t_vocab != vocab:
        raise ValueError(
            f"{loss}: student vocabulary size {vocab} differs from the teacher's {t_vocab}; "
            "use 'uld' for different tokenizers, or slice to the shared range if only padding differs"
        )
    if t_leading != leading:
        raise ValueError(f"teacher positions {tuple(t_leading)} do not match the student's {tuple(leading)}")
    return flat
