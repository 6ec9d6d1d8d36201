"""Losses by name, so a recipe can say ``loss: jsd`` with its parameters.

Adding a loss is one function in this package and one line in ``LOSSES``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from . import divergences as d
from .features import attention_kl, attention_transfer, cosine_loss, similarity_loss
from .uld import uld


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: the function and what it compares.

    ``kind``: ``"divergence"`` (two distributions over one vocabulary: the KL family, TV),
    ``"logits"`` (raw logits of one vocabulary: MSE), ``"cross-vocabulary"`` (ULD),
    ``"features"`` (hidden states, feature maps), ``"attention-maps"`` (attention probabilities
    ``[B, heads, q, k]``, masked by the ``[B, k]`` attention mask) or ``"labels"`` (hard-label CE).
    """

    fn: Callable[..., Tensor]
    kind: Literal["divergence", "logits", "cross-vocabulary", "features", "attention-maps", "labels"]
    #: whether the loss is multiplied by T² (the KL family)
    scaled_by_t2: bool = False
    #: whether a feature term with this loss gets a learned projection when the widths differ
    #: (losses that compare maps whose channel counts may differ, or head by head, do not)
    projectable: bool = True
    #: whether its ``"mean"`` is over the positions of the leading shape (so ``"sum"`` / count is the
    #: same mean); not for attention maps (rows of heads) or batch similarity (pairs of examples)
    per_position: bool = True

    @property
    def target(self) -> Literal["teacher", "labels"]:
        return "labels" if self.kind == "labels" else "teacher"

    @property
    def uses_temperature(self) -> bool:
        return self.kind in ("divergence", "cross-vocabulary")

    @property
    def parameters(self) -> tuple[str, ...]:
        """Keyword parameters a recipe may set (everything but tensors and reduction)."""
        skip = {"mask", "labels", "reduction"}
        sig = inspect.signature(self.fn)
        return tuple(
            name for name, p in sig.parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in skip
        )


LOSSES: dict[str, LossSpec] = {
    "kl": LossSpec(d.kl_divergence, "divergence", scaled_by_t2=True),
    "reverse_kl": LossSpec(d.reverse_kl, "divergence", scaled_by_t2=True),
    "jsd": LossSpec(d.jsd, "divergence", scaled_by_t2=True),
    "interpolated_jsd": LossSpec(d.interpolated_jsd, "divergence", scaled_by_t2=True),
    "skew_kl": LossSpec(d.skew_kl, "divergence", scaled_by_t2=True),
    "skew_reverse_kl": LossSpec(d.skew_reverse_kl, "divergence", scaled_by_t2=True),
    "tvd": LossSpec(d.total_variation, "divergence"),
    "soft_cross_entropy": LossSpec(d.soft_cross_entropy, "divergence", scaled_by_t2=True),
    "mse": LossSpec(d.logit_mse, "logits"),
    "cross_entropy": LossSpec(d.cross_entropy, "labels"),
    "uld": LossSpec(uld, "cross-vocabulary"),
    "cosine": LossSpec(cosine_loss, "features"),
    "attention": LossSpec(attention_transfer, "features", projectable=False),
    "attention_kl": LossSpec(attention_kl, "attention-maps", projectable=False, per_position=False),
    "similarity": LossSpec(similarity_loss, "features", projectable=False, per_position=False),
}


def get_loss(name: str) -> LossSpec:
    """The registered loss called ``name``; an unknown name lists the known ones."""
    try:
        return LOSSES[name]
    except KeyError:
        close = difflib.get_close_matches(name, LOSSES, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}.{hint}"
        ) from None


def check_params(name: str, params: dict[str, Any]) -> None:
    """Raise if ``params`` holds a parameter the loss ``name`` does not take."""
    allowed = get_loss(name).parameters
    for key in params:
        if key not in allowed:
            raise ValueError(
                f"loss {name!r} has no parameter {key!r}; its parameters: "
                f"{', '.join(allowed) or '(none)'}"
            )


class DistillationLoss(nn.Module):
    """A registered loss as an ``nn.Module``: ``DistillationLoss("jsd", beta=0.5, temperature=2.0)``.

    ``forward(student, target, mask=None, labels=None)``: ``target`` is the teacher's tensor, or
    the labels for ``cross_entropy``.
    """

    def __init__(self, name: str, reduction: str = "mean", **params: Any):
        super().__init__()
        check_params(name, params)
        self.name, self.reduction, self.params = name, reduction, params
        self.spec = get_loss(name)

    def forward(self, student: Tensor, target: Tensor, mask: Tensor | None = None,
                labels: Tensor | None = None) -> Tensor:
        if self.spec.target == "labels":
            return self.spec.fn(student, target, mask=mask, reduction=self.reduction, **self.params)
        return self.spec.fn(student, target, mask=mask, labels=labels, reduction=self.reduction, **self.params)

    def extra_repr(self) -> str:
        return ", ".join([repr(self.name), *(f"{k}={v!r}" for k, v in self.params.items())])
