"""An :class:`Objective` is a weighted sum of loss terms over student and teacher signals.

The same object serves the engine, the Hugging Face Trainer integration and the tests::

    objective = Objective.hinton(alpha=0.9, temperature=4.0)
    out = objective({"logits": s}, {"logits": t}, labels=y)
    out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from torch import Tensor, nn

from .losses import IGNORE_INDEX, ChannelProjection, Projection, SparseTarget, check_params, get_loss, sparse_loss
from .losses.fused import fused_linear_loss
from .signals import LOGITS, HeadInputs, attention_signal


@dataclass(frozen=True)
class Term:
    """One weighted loss term.

    ``student`` / ``teacher`` name the signals the loss compares (see :mod:`potstill.signals`);
    for a loss whose target is the labels (``cross_entropy``) ``teacher`` is ignored.
    """

    loss: str
    weight: float = 1.0
    student: str = LOGITS
    teacher: str = LOGITS
    params: Mapping[str, Any] = field(default_factory=dict)
    #: count every position the batch's mask keeps, whatever its labels say: DistilBERT's KL and
    #: hidden-state cosine cover every real token while the labels mark only the masked 15%
    ignore_labels: bool = False

    def __post_init__(self) -> None:
        check_params(self.loss, dict(self.params))
        if self.weight < 0:
            raise ValueError(f"term {self.loss!r}: weight must be >= 0, got {self.weight}")
        if self.ignore_labels and not self.uses_teacher:
            raise ValueError(f"term {self.loss!r} compares with the labels: it cannot ignore them")

    @property
    def uses_teacher(self) -> bool:
        return get_loss(self.loss).target == "teacher"

    @property
    def label(self) -> str:
        """A short name for logs: the loss, plus the signal when it is not the logits."""
        return self.loss if self.student == LOGITS else f"{self.loss}[{self.student}]"


class ObjectiveOutput(NamedTuple):
    loss: Tensor
    #: each term's unweighted value, detached, keyed by :attr:`Term.label`
    parts: dict[str, Tensor]
    #: (weight, value with its graph) of each term, in the order of :attr:`Objective.terms`; the
    #: fused head loss gives one pair for its terms together; ``loss`` is their weighted sum
    values: tuple[tuple[float, Tensor], ...] = ()


#: what decides which positions a term counts: the batch's labels (-100 = not), its mask, its alignment
CountFields = frozenset[str]


class Objective(nn.Module):
    """A weighted sum of :class:`Term` s. Terms with weight 0 are dropped."""

    def __init__(self, terms: Sequence[Term], sparse_leftover: str = "bucket", chunk_size: int | None = None,
                 vocab_size: int | None = None):
        super().__init__()
        #: logit terms compare only the first ``vocab_size`` entries: teacher and student heads
        #: that differ only by padding rows (49,152 vs 49,280) share this range
        self.vocab_size = vocab_size
        #: tokens per chunk when the student hands over its head inputs (see HeadInputs); None: the
        #: fused loss's default (losses.fused.default_chunk_size)
        self.chunk_size = chunk_size
        self.terms = tuple(t for t in terms if t.weight > 0)
        #: how a cached (top-k) teacher's leftover mass is treated, see losses.sparse
        self.sparse_leftover = sparse_leftover
        if not self.terms:
            raise ValueError("an objective needs at least one term with a positive weight")
        #: learned maps from the student's width to the teacher's, keyed by term index (see prepare);
        #: trained with the student, saved in checkpoints, not part of the exported student
        self.projections = nn.ModuleDict()
        #: per value of the output: the batch fields whose AND is the positions it counts (its
        #: ``"sum"`` is over them), or None for a value that stays a mean (attention rows, example
        #: pairs, unmasked features); learned by the first forward, see :meth:`counts`
        self._count_fields: tuple[CountFields | None, ...] | None = None

    @property
    def feature_terms(self) -> list[tuple[int, Term]]:
        """Terms comparing intermediate features (a projection may be needed when widths differ)."""
        return [(i, t) for i, t in enumerate(self.terms) if t.uses_teacher and t.student != LOGITS]

    def prepare(self, student: Mapping[str, Tensor], teacher: Mapping[str, Tensor]) -> None:
        """Create a learned projection for each feature term whose widths differ.

        Features ``[..., D]`` (hidden states ``[B, L, D]``, pooled ``[B, D]``) whose last axis
        differs get a :class:`Projection`; feature maps ``[B, C, H, W]`` (or ``[B, C, D, H, W]``)
        whose channel axis differs get a :class:`ChannelProjection` (a 1×1 convolution). Attention
        maps are never projected: their head counts must match. Call once with one batch's
        signals, before the optimiser is built (the engine does).
        """
        for i, term in self.feature_terms:
            s, t = student[term.student], teacher[term.teacher]
            if attention_signal(term.student) or attention_signal(term.teacher):
                if s.dim() == 4 and t.dim() == 4 and s.shape[1] != t.shape[1]:
                    raise ValueError(f"term {term.label}: student attention maps {term.student!r} have "
                                     f"{s.shape[1]} heads, teacher {term.teacher!r} {t.shape[1]}; attention "
                                     "maps are compared head by head: pair layers with equal head counts")
                continue
            if str(i) in self.projections or not get_loss(term.loss).projectable or s.shape == t.shape:
                continue
            differ = [axis for axis in range(1, min(s.dim(), t.dim())) if s.shape[axis] != t.shape[axis]]
            if s.dim() != t.dim() or not differ:
                continue  # the loss names the mismatch
            if differ == [s.dim() - 1]:
                self.projections[str(i)] = Projection(s.shape[-1], t.shape[-1])
            elif differ == [1] and s.dim() in (4, 5):
                self.projections[str(i)] = ChannelProjection(s.shape[1], t.shape[1], spatial_dims=s.dim() - 2)

    @classmethod
    def hinton(cls, alpha: float = 0.9, temperature: float = 4.0, loss: str = "kl",
               sparse_leftover: str = "bucket", features: Sequence[Term] = (), vocab_size: int | None = None,
               **params: Any) -> Objective:
        """``α · loss(student, teacher; T) + (1 − α) · CE(labels)``, plus any feature terms.

        ``α = 0`` without features is plain training.
        """
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        if get_loss(loss).uses_temperature:
            params = {"temperature": temperature, **params}
        terms = [Term(loss, alpha, params=params), Term("cross_entropy", 1.0 - alpha), *features]
        return cls(terms, sparse_leftover, vocab_size=vocab_size)

    @classmethod
    def supervised(cls) -> Objective:
        """Hard-label cross-entropy only: a teacher trained from data, or a scratch baseline."""
        return cls([Term("cross_entropy")])

    @property
    def fusable(self) -> bool:
        """Whether the fused head loss can compute this objective (one logit term plus CE)."""
        try:
            _fused_split(self.terms)
        except ValueError:
            return False
        return True

    @property
    def needs_teacher(self) -> bool:
        return any(t.uses_teacher for t in self.terms)

    @property
    def student_signals(self) -> set[str]:
        return {t.student for t in self.terms}

    @property
    def teacher_signals(self) -> set[str]:
        return {t.teacher for t in self.terms if t.uses_teacher}

    def forward(self, student: Mapping[str, Any], teacher: Mapping[str, Any] | None = None,
                *, labels: Tensor | None = None, mask: Tensor | None = None, alignment: Tensor | None = None,
                reduction: str = "mean") -> ObjectiveOutput:
        """The weighted sum of the terms at ``reduction``.

        ``reduction="sum"`` lets a caller normalise by a larger count (all micro-batches of an
        accumulated step, all processes): each term that counts positions (tokens, or examples) is
        summed over them — :meth:`counts` tells how many a batch holds — and a term whose mean is
        over something else (attention rows, pairs of examples) stays a mean.

        ``alignment`` (``[B, L_student]``, -1 for none) picks, for each student position, the
        teacher position it is compared with, when the two read different token sequences.
        """
        if isinstance(student.get(LOGITS), HeadInputs):
            if alignment is not None and self.needs_teacher:
                raise ValueError("the fused head loss needs teacher and student on the same positions: "
                                 "turn fused_loss off for aligned (cross-tokenizer) batches")
            fields = frozenset(name for name, value in (("labels", labels), ("mask", mask)) if value is not None)
            self._count_fields = (fields or None,)
            return self._fused(self._head_slice(student[LOGITS]), teacher, labels, mask,
                               _term_reduction(reduction, fields))
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        values: list[tuple[float, Tensor]] = []
        count_fields: list[CountFields | None] = []
        for index, term in enumerate(self.terms):
            spec = get_loss(term.loss)
            if spec.target == "labels":
                if labels is None:
                    raise ValueError(f"term {term.loss!r} needs labels but the batch has none")
                signal = student[term.student]
                if self.vocab_size is not None and term.student == LOGITS:
                    signal = signal[..., : self.vocab_size]  # as the fused path: padding rows never count
                term_mask = _fits(mask, signal)
                fields = {"labels", *(["mask"] if term_mask is not None else [])}
                value = spec.fn(signal, labels, mask=term_mask, reduction=_term_reduction(reduction, fields),
                                **term.params)
            else:
                if teacher is None:
                    raise ValueError(f"term {term.loss!r} needs teacher signals")
                target = teacher[term.teacher]
                signal = student[term.student]
                if str(index) in self.projections:
                    signal = self.projections[str(index)](signal)
                position_labels = labels if not term.ignore_labels and _per_position(labels, signal) else None
                term_mask = mask if spec.kind == "attention-maps" else _fits(mask, signal)
                fields = {name for name, used in (("labels", position_labels is not None),
                                                  ("mask", term_mask is not None)) if used}
                if alignment is not None and isinstance(target, Tensor) and alignment.shape == signal.shape[:-1]:
                    target, term_mask = _aligned(target, alignment, term_mask)
                    fields.add("alignment")
                if not spec.per_position:
                    fields = set()  # its mean is over attention rows or pairs of examples: it stays a mean
                term_reduction = _term_reduction(reduction, fields)
                if self.vocab_size is not None and spec.kind in ("divergence", "logits"):
                    signal = signal[..., : self.vocab_size]
                    target = target if isinstance(target, SparseTarget) else target[..., : self.vocab_size]
                if isinstance(target, SparseTarget):  # a cached teacher's top-k
                    value = sparse_loss(signal, target, loss=term.loss, mask=term_mask, labels=position_labels,
                                        leftover=self.sparse_leftover, reduction=term_reduction, **term.params)
                else:
                    value = spec.fn(signal, target, mask=term_mask, labels=position_labels, reduction=term_reduction,
                                    **term.params)
            parts[term.label] = value.detach()
            values.append((term.weight, value))
            count_fields.append(frozenset(fields) or None)
            total = term.weight * value if total is None else total + term.weight * value
        assert total is not None
        self._count_fields = tuple(count_fields)
        return ObjectiveOutput(total, parts, tuple(values))

    def counts(self, batch: Any) -> list[Tensor | None]:
        """How many positions each value of the output counts in ``batch`` (None: it stays a mean).

        The fields that decide it (labels, mask, alignment) are learned from the first forward, so a
        caller runs one batch first, then counts the others of an accumulated step before any
        backward: a value summed over micro-batches and divided by the total is the whole batch's mean.
        """
        if self._count_fields is None:
            raise RuntimeError("Objective.counts: run the objective on one batch first (it learns which "
                               "positions each term counts)")
        out: list[Tensor | None] = []
        for fields in self._count_fields:
            if fields is None:
                out.append(None)
                continue
            keep: Tensor | None = None
            for name in sorted(fields):
                value = getattr(batch, name)
                part = {"labels": lambda v: v != IGNORE_INDEX, "alignment": lambda v: v >= 0,
                        "mask": lambda v: v.bool()}[name](value)
                keep = part if keep is None else keep & part.to(keep.device)
            assert keep is not None
            out.append(keep.sum())
        return out

    def _head_slice(self, head: HeadInputs) -> HeadInputs:
        if self.vocab_size is None:
            return head
        bias = head.bias[: self.vocab_size] if head.bias is not None else None
        return HeadInputs(head.hidden, head.weight[: self.vocab_size], bias)

    def _fused(self, head: HeadInputs, teacher: Mapping[str, Any] | None, labels: Tensor | None,
               mask: Tensor | None, reduction: str) -> ObjectiveOutput:
        """``w_d · loss + w_ce · CE`` straight from the student's head inputs, chunk by chunk; the
        teacher is its logits, its head inputs, or a cached top-k (SparseTarget)."""
        soft, hard = _fused_split(self.terms)
        w_soft, w_hard = (soft.weight if soft else 0.0), (hard.weight if hard else 0.0)
        target = teacher[LOGITS] if (soft and teacher is not None) else None
        if soft and target is None:
            raise ValueError(f"term {soft.loss!r} needs teacher signals")
        if isinstance(target, HeadInputs):
            target = self._head_slice(target)
        elif isinstance(target, Tensor) and self.vocab_size is not None:
            target = target[..., : self.vocab_size]
        out = fused_linear_loss(head, target, labels=labels, mask=mask, loss=soft.loss if soft else "kl",
                                alpha=w_soft / (w_soft + w_hard), chunk_size=self.chunk_size, reduction=reduction,
                                sparse_leftover=self.sparse_leftover, **(dict(soft.params) if soft else {}))
        # each term's unweighted value under its label, as the unfused path logs them
        parts = {term.label: value for term, value in ((soft, out.distillation), (hard, out.cross_entropy))
                 if term is not None and value is not None}
        loss = out.loss * (w_soft + w_hard)
        return ObjectiveOutput(loss, parts, ((1.0, loss),))


def _term_reduction(reduction: str, fields: set[str] | frozenset[str]) -> str:
    """A term with nothing to count positions by stays a mean when the caller sums."""
    return "mean" if reduction == "sum" and not fields else reduction


def _fused_split(terms: Sequence[Term]) -> tuple[Term | None, Term | None]:
    """The (distillation, cross-entropy) terms of an objective the fused loss can compute, or raise."""
    soft = [t for t in terms if t.uses_teacher]
    hard = [t for t in terms if not t.uses_teacher]
    if len(soft) > 1 or len(hard) > 1 or any(t.student != LOGITS or t.teacher != LOGITS or t.ignore_labels
                                             for t in terms) \
            or (soft and get_loss(soft[0].loss).kind not in ("divergence", "logits")) or (hard and hard[0].params):
        raise ValueError("the fused head loss computes one logit distillation term plus cross-entropy; "
                         "this objective has other terms: turn fused_loss off")
    return (soft[0] if soft else None), (hard[0] if hard else None)


def _aligned(target: Tensor, alignment: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """The teacher's per-position signal gathered at the student's aligned positions, and the mask
    of student positions that have a teacher position."""
    index = alignment.clamp(min=0)[..., None].expand(*alignment.shape, target.shape[-1])
    keep = alignment >= 0
    return target.gather(1, index.to(target.device)), keep if mask is None else keep & mask.bool()


def _fits(mask: Tensor | None, signal: Tensor) -> Tensor | None:
    """A position mask applies to the signals laid out per position (hidden states), not to pooled ones."""
    return mask if mask is not None and mask.shape == signal.shape[:-1] else None


def _per_position(labels: Tensor | None, logits: Tensor) -> bool:
    """Labels mask a teacher term only when they have one entry per position of the logits."""
    return labels is not None and labels.shape == logits.shape[:-1] and not labels.is_floating_point()

