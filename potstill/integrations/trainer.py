"""A Hugging Face ``Trainer`` that distils: a frozen teacher, an Objective, and everything else
(logging, evaluation, checkpoints, DeepSpeed/FSDP) from ``TrainingArguments``.

    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                  train_dataset=ds, loss="kl", alpha=0.5, temperature=2.0)
    trainer.train()

Columns named ``teacher_*`` go to the teacher with the prefix removed (e.g. ``teacher_input_ids``
for a teacher with another tokenizer); without them the teacher reads the student's inputs.
They and ``labels`` are kept even with ``remove_unused_columns=True``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..objective import Objective
from ..signals import LOGITS, logits_of

TEACHER_PREFIX = "teacher_"


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is an :class:`~potstill.objective.Objective` between student and teacher.

    Under gradient accumulation the loss is summed over positions and divided by the number of
    labelled positions in the *whole* accumulated batch (``num_items_in_batch``, across
    processes), not averaged per micro-batch, so a step's gradient does not depend on how the
    batch was split.
    """

    #: compute_loss normalises by num_items_in_batch itself
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, teacher_model: nn.Module, objective: Objective | None = None,
                 loss: str = "kl", alpha: float = 0.5, temperature: float = 1.0,
                 loss_params: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.objective = objective or Objective.hinton(alpha, temperature, loss, **(loss_params or {}))
        self.teacher = teacher_model.requires_grad_(False).eval().to(self.args.device)
        # count labelled positions over the accumulated batch even if the model takes no loss kwargs
        self.model_accepts_loss_kwargs = True

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        columns = self.train_dataset.column_names if hasattr(self.train_dataset, "column_names") else []
        keep = ["labels", "label", "label_ids", *(c for c in columns if c.startswith(TEACHER_PREFIX))]
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *keep]))

    def _shifts_labels(self, labels: torch.Tensor | None) -> bool:
        return labels is not None and labels.dim() >= 2 and self._loss_shifts_labels

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        teacher_inputs = {k[len(TEACHER_PREFIX):]: inputs.pop(k) for k in list(inputs) if k.startswith(TEACHER_PREFIX)}
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = logits_of(self.teacher(**(teacher_inputs or inputs)))
        student_logits = logits_of(outputs)
        if self._shifts_labels(labels):  # a causal LM: position t predicts token t + 1
            student_logits, teacher_logits = student_logits[..., :-1, :], teacher_logits[..., :-1, :]
            labels = labels[..., 1:]
        if num_items_in_batch is None:
            out = self.objective({LOGITS: student_logits}, {LOGITS: teacher_logits}, labels=labels)
            loss = out.loss
        else:
            out = self.objective({LOGITS: student_logits}, {LOGITS: teacher_logits}, labels=labels, reduction="sum")
            loss = out.loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # DDP averages the gradients again
        return (loss, outputs) if return_outputs else loss
