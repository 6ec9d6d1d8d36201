"""One chunk of the fused loss: per-position values and the gradient of the logits, in closed form.

The fused loss (:mod:`potstill.losses.fused`) needs, for each chunk of ``C`` tokens, the loss of
every position and its gradient with respect to the chunk's ``[C, V]`` student logits. Autograd
can give both, but it keeps several ``C × V`` blocks alive for its graph and allocates new ones
every chunk. For the registered divergences the gradient has a closed form, computed here in
place on a few ``C × V`` buffers that the caller allocates once and reuses for every chunk.

Notation: ``z`` the student's logits, ``u = z / T``; ``q = softmax(u)`` (the student, ``p_S``),
``p`` the teacher's distribution at ``T``; ``⟨a, b⟩`` a sum over the vocabulary, per position.
Every gradient below is ``∂(per-position loss)/∂z = (1/T) · ∂/∂u``, and uses
``∂ log q_i / ∂u_j = δ_ij − q_j``:

* forward KL ``T²·KL(p‖q)`` and soft CE ``−T²·⟨p, log q⟩``: ``T·(q − p)``;
* reverse KL ``T²·KL(q‖p)``: ``T·q ⊙ (log q − log p − KL)``;
* skew KL ``T²·KL(p‖m)``, ``m = a·p + (1−a)·q``: ``−T(1−a)·q ⊙ (ρ − ⟨q, ρ⟩)``, ``ρ = p/m``;
* skew reverse KL ``T²·KL(q‖m)``, ``m = a·q + (1−a)·p``:
  ``T·q ⊙ (log q − log m − KL − a·(σ − ⟨q, σ⟩))``, ``σ = q/m``;
* JSD ``T²·[w_t·KL(p‖M) + w_s·KL(q‖M)]``, ``M = β·p + (1−β)·q``: the skew KL gradient with
  ``a = β`` times ``w_t`` plus the skew reverse KL one with ``a = 1 − β`` times ``w_s``;
  ``(w_t, w_s)`` are read off the registered ``jsd`` itself (:func:`jsd_weights`), so this
  follows its β convention;
* total variation ``½·Σ|p − q|`` (no T²): ``(1/2T)·q ⊙ (g − ⟨q, g⟩)``, ``g = sign(q − p)``;
* logit MSE ``mean_V (z − v)²``: ``2(z − v)/V``;
* hard-label CE at ``T = 1``: ``softmax(z) − onehot(y)``.

The KL-family losses clamp each KL at 0 against rounding; autograd then gives a zero gradient
where the clamp bites, and so do these. A sparse (top-k, :class:`SparseTarget`) teacher: the
loss depends on the student only through its log-probabilities at the teacher's ids and its
mass outside them, a ``C × (k+1)`` problem that autograd differentiates cheaply; the chain rule
through the softmax to ``z`` is then written out here. A registered loss with no closed form
falls back to autograd on the chunk.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .registry import get_loss
from .sparse import LOG_ZERO, SparseTarget

#: vocabulary columns per block where a kernel needs a temporary (it stays small and in cache)
COLUMN_BLOCK = 8192


class Buffers:
    """``C × V`` working blocks, allocated once for the largest chunk and reused (views) after."""

    def __init__(self, vocab: int, dtype: torch.dtype, device: torch.device):
        self.vocab, self.dtype, self.device = vocab, dtype, device
        self._blocks: dict[str, Tensor] = {}

    def get(self, name: str, rows: int, dtype: torch.dtype | None = None) -> Tensor:
        block = self._blocks.get(name)
        if block is None or block.shape[0] < rows:
            self._blocks.pop(name, None)  # free first: never hold two
            block = torch.empty(rows, self.vocab, dtype=dtype or self.dtype, device=self.device)
            self._blocks[name] = block
        return block[:rows]


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_v a·b`` per row without a ``C × V`` temporary."""
    if a.device.type == "cpu":
        # BLAS dot per row: a third of the time of bmm's batched gemv on CPU
        out = a.new_empty(a.shape[0])
        for i in range(a.shape[0]):
            torch.dot(a[i], b[i], out=out[i])
        return out
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def log_softmax_(x: Tensor, temperature: float, probs: Tensor) -> None:
    """In place: ``x ← log softmax(x / T)``, and ``probs ← softmax(x / T)``."""
    top = x.amax(-1, keepdim=True)
    if temperature == 1.0:
        x.sub_(top)
    else:  # (x − top) / T in one pass
        torch.add(top * (-1.0 / temperature), x, alpha=1.0 / temperature, out=x)
    torch.exp(x, out=probs)
    total = probs.sum(-1, keepdim=True)
    x.sub_(total.log())
    probs.div_(total)


def _clamped(value: Tensor) -> tuple[Tensor, Tensor]:
    """A KL clamped at 0 (as the registered losses) and the rows whose gradient survives the clamp."""
    return value.clamp_min(0.0), (value >= 0).to(value.dtype)


# Each dense kernel gets log q, q, log p, p (``ls, q, lt, p``) as [C, V] buffers at T, may
# overwrite any of them except q, and returns (per-position value, G, c): the gradient of the
# logits is ``c · G`` (c a number or one per row), G in one of the buffers; the caller applies c
# with its own row weights in one pass.
Coefficient = float | Tensor
Kernel = Callable[..., tuple[Tensor, Tensor, Coefficient]]


def _kl(ls: Tensor, q: Tensor, lt: Tensor, p: Tensor, t: float) -> tuple[Tensor, Tensor, Coefficient]:
    value, alive = _clamped(rowdot(p, lt.sub_(ls)))
    return value * t**2, torch.sub(q, p, out=ls), t * alive


def _soft_cross_entropy(ls: Tensor, q: Tensor, lt: Tensor, p: Tensor, t: float) -> tuple[Tensor, Tensor, Coefficient]:
    value = -rowdot(p, ls)
    return value * t**2, torch.sub(q, p, out=ls), t


def _reverse_kl(ls: Tensor, q: Tensor, lt: Tensor, p: Tensor, t: float) -> tuple[Tensor, Tensor, Coefficient]:
    diff = ls.sub_(lt)  # log q − log p
    raw = rowdot(q, diff)
    value, alive = _clamped(raw)
    return value * t**2, diff.sub_(raw[:, None]).mul_(q), t * alive


def _log_mixture_(into: Tensor, log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``into ← log(w·a + (1−w)·b)`` for 0 < w < 1, in log space, one column block at a time."""
    shift, base = math.log(weight_a) - math.log1p(-weight_a), math.log1p(-weight_a)
    for start in range(0, into.shape[1], COLUMN_BLOCK):
        cols = slice(start, start + COLUMN_BLOCK)
        torch.logaddexp(log_a[:, cols] + shift, log_b[:, cols], out=into[:, cols]).add_(base)
    return into


def _skew_kl(ls: Tensor, q: Tensor, lt: Tensor, p: Tensor, t: float, skew: float = 0.1):
    if skew == 0.0:
        return _kl(ls, q, lt, p, t)
    if skew == 1.0:  # KL(p‖p)
        return ls.new_zeros(ls.shape[0]), ls.zero_(), 0.0
    log_m = _log_mixture_(ls, lt, ls, skew)  # log m, m = a·p + (1−a)·q (ls is read block by block first)
    diff = lt.sub_(log_m)                      # log p − log m  ≤ −log a
    value, alive = _clamped(rowdot(p, diff))
    ratio = diff.exp_()                        # ρ = p / m
    centred = ratio.sub_(rowdot(q, ratio)[:, None])
    return value * t**2, centred.mul_(q), -(1.0 - skew) * t * alive


def _skew_reverse_kl(ls: Tensor, q: Tensor, lt: Tensor, p: Tensor, t: float, skew: float = 0.1):
    if skew == 0.0:
        return _reverse_kl(ls, q, lt, p, t)
    if skew == 1.0:  # KL(q‖q)
        return ls.new_zeros(ls.shape[0]), ls.zero_(), 0.0
    log_m = _log_mixture_(lt, ls, lt, skew)   # m = a·q + (1−a)·p
    diff = ls.sub_(log_m)                     # log q − log m
    raw = rowdot(q, diff)
    value, alive = _clamped(raw)
    ratio = torch.exp(diff, out=p)            # σ = q / m
    grad = diff.add_(ratio, alpha=-skew).sub_((raw - skew * rowdot(q, ratio))[:, None])
    return value * t**2, grad.mul_(q), t * alive


@functools.lru_cache(maxsize=64)
def jsd_weights(beta: float) -> tuple[float, float] | None:
    """``(w_t, w_s)`` with ``jsd(β) = T²·[w_t·KL(p_T‖M) + w_s·KL(p_S‖M)]``, ``M = β·p_T + (1−β)·p_S``.

    Read off the registered ``jsd`` on a few fixed distributions, so that the closed-form
    gradient follows whatever β convention that function has; None when it is not of this form
    (the fused loss then uses autograd).
    """
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64) * 2
    log_s, log_t = student.log_softmax(-1), teacher.log_softmax(-1)
    log_m = torch.logaddexp(log_t + math.log(beta) if beta > 0 else torch.full_like(log_t, -math.inf),
                            log_s + math.log1p(-beta) if beta < 1 else torch.full_like(log_s, -math.inf))
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    value = get_loss("jsd").fn(student, teacher, beta=beta, reduction="none")
    basis = torch.stack([kl_t, kl_s], -1)
    weights = torch.linalg.lstsq(basis, value[:, None], driver="gelsd").solution[:, 0]
    if not torch.allclose(basis @ weights, value, rtol=1e-9, atol=1e-12):
        return None
    return float(weights[0]), float(weights[1])


def _jsd(ls: Tensor, q: Tensor, lt: Tensor, p: Tensor, t: float, beta: float = 0.5):
    weights = jsd_weights(beta)
    assert weights is not None  # kernel_for checks
    w_t, w_s = weights
    if beta == 0.0:  # M = q: only the teacher's term, forward KL
        value, grad, coef = _kl(ls, q, lt, p, t)
        return w_t * value, grad, w_t * coef
    if beta == 1.0:  # M = p: only the student's term, reverse KL
        value, grad, coef = _reverse_kl(ls, q, lt, p, t)
        return w_s * value, grad, w_s * coef
    for start in range(0, ls.shape[1], COLUMN_BLOCK):
        cols = slice(start, start + COLUMN_BLOCK)
        log_m = torch.logaddexp(lt[:, cols] + (math.log(beta) - math.log1p(-beta)), ls[:, cols])
        log_m.add_(math.log1p(-beta))
        lt[:, cols].sub_(log_m)  # log p − log M
        ls[:, cols].sub_(log_m)  # log q − log M
    kl_t, alive_t = _clamped(rowdot(p, lt))
    raw_s = rowdot(q, ls)
    kl_s, alive_s = _clamped(raw_s)
    rho = lt.exp_()                        # p / M
    sigma = torch.exp(ls, out=p)           # q / M
    c_t, c_s = w_t * alive_t, w_s * alive_s
    # q ⊙ [−c_t(1−β)(ρ − ⟨q,ρ⟩) + c_s(log q − log M − KL_s − (1−β)(σ − ⟨q,σ⟩))]: the teacher's term
    # is skew KL with a = β, the student's skew reverse KL with a = 1 − β
    grad = ls.mul_(c_s[:, None])
    grad.addcmul_(rho, (-(1.0 - beta) * c_t)[:, None]).addcmul_(sigma, (-(1.0 - beta) * c_s)[:, None])
    const = (1.0 - beta) * (c_t * rowdot(q, rho) + c_s * rowdot(q, sigma)) - c_s * raw_s
    grad.add_(const[:, None]).mul_(q)
    return (w_t * kl_t + w_s * kl_s) * t**2, grad, t


def _total_variation(ls: Tensor, q: Tensor, lt: Tensor, p: Tensor, t: float):
    diff = torch.sub(q, p, out=lt)
    sign = torch.sign(diff, out=ls)
    value = 0.5 * rowdot(diff, sign)
    return value, sign.sub_(rowdot(q, sign)[:, None]).mul_(q), 0.5 / t


#: closed-form kernels of the registered divergences (logits at T → value, gradient)
KERNELS: dict[str, Kernel] = {
    "kl": _kl,
    "reverse_kl": _reverse_kl,
    "soft_cross_entropy": _soft_cross_entropy,
    "skew_kl": _skew_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "jsd": _jsd,
    "tvd": _total_variation,
}


def kernel_for(loss: str, params: dict[str, Any]) -> Kernel | None:
    """The closed-form kernel of ``loss`` with these parameters, or None (use autograd)."""
    if loss == "jsd" and jsd_weights(float(params.get("beta", 0.5))) is None:
        return None
    return KERNELS.get(loss)


def logit_mse(s: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Coefficient]:
    """Raw logits in ``s``, ``t``: ``mean_V (s − t)²`` per position, its gradient ``c · G`` (G in ``s``)."""
    diff = s.sub_(t)
    return rowdot(diff, diff) / s.shape[1], diff, 2.0 / s.shape[1]


def sparse_kernel(ls: Tensor, q: Tensor, target: SparseTarget, t: float, loss: str, leftover: str,
                  params: dict[str, Any]) -> tuple[Tensor, Tensor, Coefficient]:
    """A registered divergence against a top-k teacher, as :func:`potstill.losses.sparse_loss`.

    ``ls``, ``q``: the student's log-probabilities and probabilities at T (``q`` is restored
    before returning). Returns the per-position value and the gradient of the logits as ``c · G``
    (G in ``ls``).
    """
    spec = get_loss(loss)
    ids = target.ids.long()
    s_k = ls.gather(1, ids)
    q_k = q.gather(1, ids)
    q.scatter_(1, ids, 0.0)
    outside = q.sum(1)  # the student's mass outside the teacher's top-k, summed directly
    t_k = target.logprobs.to(ls.dtype)
    with torch.enable_grad():
        s_k_leaf, outside_leaf = s_k.requires_grad_(), outside.requires_grad_()
        if leftover == "renormalize":
            log_s = s_k_leaf - torch.logsumexp(s_k_leaf, -1, keepdim=True)
            log_t = t_k - torch.logsumexp(t_k, -1, keepdim=True)
        else:  # "bucket": the same floors as losses.sparse
            log_s = torch.cat([s_k_leaf, outside_leaf.clamp_min(1e-30).log()[:, None]], -1)
            log_t = torch.cat([t_k, target.rest.to(ls.dtype).clamp_min(LOG_ZERO)[:, None]], -1)
        value = spec.fn(log_s, log_t, reduction="none", **params)
        value = value * t**2 if spec.scaled_by_t2 else value
        g_k, g_out = torch.autograd.grad(value.sum(), (s_k_leaf, outside_leaf), allow_unused=True)
    g_out = torch.zeros_like(outside) if g_out is None else g_out
    # ∂/∂u_j = q_j·(g_out·[j ∉ K] − Σg_k − g_out·outside) + g_j·[j ∈ K]; q is 0 on K here
    common = -g_k.sum(1) - g_out * outside.detach()
    grad = torch.mul(q, (g_out + common)[:, None], out=ls)
    grad.scatter_(1, ids, q_k * common[:, None] + g_k)
    q.scatter_(1, ids, q_k)
    return value.detach(), grad, 1.0 / t


def autograd_kernel(s: Tensor, teacher: Tensor, loss: str, params: dict[str, Any]) -> tuple[Tensor, Tensor, float]:
    """Any registered logit loss on raw logits, differentiated by autograd (the fallback)."""
    with torch.enable_grad():
        leaf = s.detach().requires_grad_()
        value = get_loss(loss).fn(leaf, teacher, reduction="none", **params)
        (grad,) = torch.autograd.grad(value.sum(), leaf)
    return value.detach(), grad, 1.0


def hard_cross_entropy(s: Tensor, labels: Tensor, probs: Tensor) -> Tensor:
    """Raw logits ``s`` (left intact) → CE per position; ``probs ← softmax(s)`` (the gradient is
    ``probs − onehot``). ``labels`` of ignored positions may be anything in range."""
    top = s.amax(-1, keepdim=True)
    torch.sub(s, top, out=probs).exp_()
    total = probs.sum(-1, keepdim=True)
    probs.div_(total)
    return (total.log() + top).squeeze(1) - s.gather(1, labels[:, None]).squeeze(1)
