"""The task contract: what a flavour provides to a run. Subclass :class:`Task` and register it in
:data:`potstill.tasks.TASKS`; ``docs/architecture.md`` lists the contract."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from ..batch import Batch
from ..config import Recipe
from ..models import load_model
from ..objective import Objective, Term

#: batch-time randomness (augmentation, masking): ``transform(batch, generator) -> batch``, drawing
#: only from ``generator``, which the engine seeds per batch so that a resumed run draws the same
BatchTransform = Callable[[Batch, torch.Generator], Batch]
#: the generator a batch transform receives is seeded with ``seed * BATCH_SEED_STRIDE + key``: the
#: stage's train seed, and the batch's number in the stage (epoch × batches per epoch + its place)
BATCH_SEED_STRIDE = 1_000_003
#: the engine's on-policy hook: ``rollout(student, batch, key) -> batch``
Rollout = Callable[[nn.Module, Batch, int], Batch]

__all__ = ["BATCH_SEED_STRIDE", "Batch", "BatchTransform", "Rollout", "Task"]



def synchronize(device: torch.device) -> None:
    """Wait for a GPU's queued work, so that a timer stopped after it counts that work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

class Task:
    """A flavour's data, models and evaluation, built from its recipe.

    A task sets the class attributes ``name`` (the recipe's ``task`` field), ``recipe_type`` (its
    recipe schema: a :class:`~potstill.config.Recipe` with its own ``data`` / ``teacher`` /
    ``student`` sections) and ``headline`` (the metrics the table and report lead with); its
    constructor loads the data into ``train_set`` (a teacher trained here learns from it),
    ``transfer_set`` (the students learn from it) and ``eval_set``; and it implements
    :meth:`collate`, :meth:`build_model`, :meth:`evaluate` and :meth:`compare`. The other methods
    are hooks with defaults that a run calls on every task.
    """

    name: ClassVar[str]
    recipe_type: ClassVar[type[Recipe]]
    headline: ClassVar[tuple[str, ...]] = ()

    train_set: Dataset
    transfer_set: Dataset
    eval_set: Dataset
    #: logit terms compare only this many entries (heads padded beyond the tokenizer); None = all
    shared_vocab_size: int | None = None
    #: the run's teacher, set once it exists: ``evaluate`` may report KL to it and agreement
    teacher: nn.Module | None = None
    #: the run directory, set by the run before any stage: where a task keeps what it computes once
    #: (caches); None when the task is used outside a run
    run_dir: Path | None = None

    def __init__(self, recipe: Recipe, progress: bool = True):
        self.recipe, self.progress = recipe, progress

    # ----- what every task implements ----------------------------------------------------------

    def collate(self, examples: list[Any]) -> Batch:
        """Examples of the data sets → one :class:`Batch`."""
        raise NotImplementedError

    def build_model(self, spec: Any) -> nn.Module:
        """The model a teacher / student section describes (loaded, cut from the teacher, or new)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics of one model on the eval set (``eval_*`` keys), run at the end of every epoch."""
        raise NotImplementedError

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """The final comparison: ``{"models": {name: {metric: value}}, "headline": [...], ...}``."""
        raise NotImplementedError

    # ----- hooks with defaults -----------------------------------------------------------------

    def batch_transform(self, spec: Any) -> BatchTransform | None:
        """Batch-time randomness for training the model of ``spec`` (image jitter, MLM masking)."""
        return None

    def objective(self) -> Objective:
        """The distilled student's objective: Hinton's α-mix of the recipe's ``distillation``
        section, its feature terms, and the logit range both heads share."""
        d = self.recipe.distillation
        cache = self.recipe.teacher_cache
        features = [Term(f.loss, f.weight, student=f.student, teacher=f.teacher) for f in d.features]
        return Objective.hinton(d.alpha, d.temperature, d.loss, features=features,
                                sparse_leftover=cache.leftover if cache else "bucket",
                                vocab_size=self.shared_vocab_size, **d.params)

    def trains_teacher(self) -> bool:
        """Whether the run trains the teacher (stage ``teacher``, on ``train_set``, with
        ``recipe.teacher.train``) before the students; default: when the recipe loads none
        (a task may also fine-tune a loaded one, such as a pretrained encoder without a trained head)."""
        return not self.recipe.teacher.model_name_or_path  # type: ignore[attr-defined]

    def distillation_set(self, teacher: nn.Module, run_dir: Path) -> Dataset:
        """The examples the student distils on (e.g. the teacher's own completions); default the transfer set."""
        return self.transfer_set

    def rollout(self, seed: int) -> Rollout | None:
        """An on-policy hook that lets the student write a batch's completions; default none."""
        return None

    def load_model(self, folder: Path) -> nn.Module:
        """A model this task saved (a finished stage's folder)."""
        return load_model(folder)

    def save_extras(self, folder: Path) -> None:
        """Files to save beside a trained model (a tokenizer, a processor); default none."""
