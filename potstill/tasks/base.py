"""What every task provides to the engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset


def _to(value: Any, device: torch.device | str, **kwargs: Any) -> Any:
    if isinstance(value, Tensor):
        return value.to(device, **kwargs)
    if isinstance(value, dict):
        return {k: _to(v, device, **kwargs) for k, v in value.items()}
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

    def to(self, device: torch.device | str, **kwargs: Any) -> Batch:
        kwargs.pop("non_blocking", None)
        return Batch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})

    def __len__(self) -> int:
        return len(self.labels) if self.labels is not None else 0


class Task(Protocol):
    """A flavour's data and models, built from its recipe. See :class:`~potstill.tasks.ImageClassification`."""

    headline: tuple[str, ...]

    train_set: Dataset
    eval_set: Dataset
    transfer_set: Dataset

    def collate(self, examples: list[Any]) -> Batch: ...

    def training_collate(self, spec: Any) -> Callable[[list[Any]], Batch]: ...

    def build_model(self, spec: Any) -> nn.Module: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of one model on the eval set, run at the end of every epoch."""
        ...

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """The final comparison: ``{"models": {name: {metric: value}}, "headline": [...], ...}``."""
        ...
