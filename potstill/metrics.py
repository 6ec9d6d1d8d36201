"""Metrics on predictions: accuracy, teacher–student agreement, held-out KL."""

from __future__ import annotations

from torch import Tensor

from .losses import kl_divergence


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max class is the label."""
    return (logits.argmax(-1) == labels).float().mean().item()


def agreement(student_logits: Tensor, teacher_logits: Tensor) -> float:
    """Fraction of examples on which the student's top-1 class equals the teacher's."""
    return (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean().item()


def held_out_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> float:
    """Mean KL(p_teacher ‖ p_student) per example at ``temperature`` (not scaled by T²)."""
    return kl_divergence(student_logits, teacher_logits, temperature=temperature).item() / temperature**2


def per_class_accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> list[float]:
    """Accuracy within each true class (NaN for a class absent from ``labels``)."""
    hits = (logits.argmax(-1) == labels).float()
    return [hits[labels == c].mean().item() if (labels == c).any() else float("nan")
            for c in range(num_classes)]


__all__ = ["accuracy", "agreement", "held_out_kl", "per_class_accuracy"]
