"""One batch as the engine sees it: what the student reads, what the teacher reads, and the targets."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, tuple):  # e.g. a Whisper input ``encoder_outputs=(hidden,)``
        return tuple(_to(v, device) for v in value)
    return value


@dataclass
class Batch:
    """One batch as the engine sees it.

    Student and teacher inputs are separate because they can differ (another tokenizer for
    the teacher, a transcript for a text teacher of a speech student). Each is a tensor or a
    mapping of keyword arguments for the model.
    """

    student_inputs: Any
    teacher_inputs: Any
    labels: Tensor | None = None
    mask: Tensor | None = None
    #: the examples' positions in their data set (to find them in a teacher cache)
    indices: Tensor | None = None
    #: ``[B, L_student]``: the teacher position compared with each student position (-1: none),
    #: when the two read different token sequences (different tokenizers)
    alignment: Tensor | None = None

    def to(self, device: torch.device | str, **_: Any) -> Batch:
        """The batch with every tensor on ``device`` (accelerate's ``non_blocking`` is accepted and ignored)."""
        return Batch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def __len__(self) -> int:
        """The number of examples (the leading size of the labels, or of the student's first input)."""
        if self.labels is not None:
            return len(self.labels)
        inputs = self.student_inputs
        first = next(iter(inputs.values()), None) if isinstance(inputs, dict) else inputs
        return len(first) if isinstance(first, Tensor) else 0
