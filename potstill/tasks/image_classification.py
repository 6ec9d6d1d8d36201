"""Classic distillation (Hinton et al. 2015): image classifiers on MNIST."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ..config import ModelSpec, Recipe, TrainSpec, _Section
from ..data.mnist import load_mnist
from ..losses import soft_targets
from ..metrics import accuracy, agreement, held_out_kl, per_class_accuracy
from ..models import MLP, count_parameters, evaluating, load_model
from ..progress import progress
from .base import Batch, BatchTransform, Task

NUM_CLASSES = 10
IMAGE_SIZE = 28 * 28
SOFTENING_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0)


class MnistData(_Section):
    name: Literal["mnist"] = "mnist"
    #: folder holding the idx ``.gz`` files; null = the copy that ships with potstill
    path: str | None = None
    eval_fraction: float = Field(0.2, gt=0, lt=1)
    #: use only the first N training examples (null = all)
    train_limit: int | None = Field(None, ge=1)
    #: classes left out of the distillation transfer set (Hinton's "dark knowledge" experiment)
    exclude_from_transfer: list[int] = Field(default_factory=list)
    split_seed: int = 0


class MLPSpec(ModelSpec):
    architecture: Literal["mlp"] = "mlp"
    hidden_sizes: list[int] = Field(default_factory=lambda: [800, 800])
    dropout: float = Field(0.0, ge=0, lt=1)
    input_dropout: float = Field(0.0, ge=0, lt=1)

    @field_validator("hidden_sizes")
    @classmethod
    def _positive(cls, sizes: list[int]) -> list[int]:
        if any(s < 1 for s in sizes):
            raise ValueError(f"every hidden size must be >= 1, got {sizes}")
        return sizes


class MLPTeacherSpec(MLPSpec):
    #: how to train the teacher when ``model_name_or_path`` is not given
    train: TrainSpec = Field(default_factory=TrainSpec)
    #: train the teacher on images shifted by up to this many pixels (Hinton 2015 used 2)
    jitter: int = Field(0, ge=0, le=4)


class ImageClassificationRecipe(Recipe):
    task: Literal["image-classification"] = "image-classification"
    data: MnistData = Field(default_factory=MnistData)
    teacher: MLPTeacherSpec = Field(default_factory=MLPTeacherSpec)
    student: MLPSpec = Field(default_factory=MLPSpec)


def shift_images(images: Tensor, pixels: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each flattened 28×28 image by a random offset in [−pixels, pixels]² (zero fill).

    Hinton et al. 2015 §3 trained the MNIST teacher on inputs "jittered by up to two pixels".
    """
    n = len(images)
    padded = F.pad(images.view(n, 28, 28), (pixels, pixels, pixels, pixels))
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator).tolist()
    out = torch.stack([padded[i, y : y + 28, x : x + 28] for i, (x, y) in enumerate(zip(dx, dy, strict=True))])
    return out.reshape(n, -1)


def _jittered(batch: Batch, generator: torch.Generator, pixels: int) -> Batch:
    images = shift_images(batch.student_inputs, pixels, generator)
    return Batch(student_inputs=images, teacher_inputs=images, labels=batch.labels)


class ImageClassification(Task):
    """MNIST split into train / eval with a fixed seed; the student and teacher read the same image."""

    name = "image-classification"
    recipe_type = ImageClassificationRecipe
    #: metrics.json keys the table and the report lead with
    headline = ("accuracy", "agreement")

    def __init__(self, recipe: ImageClassificationRecipe, progress: bool = True):
        super().__init__(recipe, progress)
        data = recipe.data
        images, labels = load_mnist(data.path)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(data.split_seed))
        n_eval = round(len(labels) * data.eval_fraction)
        eval_idx, train_idx = order[:n_eval], order[n_eval:]
        if data.train_limit:
            train_idx = train_idx[: data.train_limit]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.eval_set = TensorDataset(images[eval_idx], labels[eval_idx])
        self.eval_labels = labels[eval_idx]
        self.excluded = data.exclude_from_transfer
        self.transfer_set: Dataset = self.train_set
        if self.excluded:
            bad = [c for c in self.excluded if not 0 <= c < NUM_CLASSES]
            if bad:
                raise ValueError(f"data.exclude_from_transfer: classes {bad} are not in 0..9")
            keep = ~torch.isin(labels[train_idx], torch.tensor(self.excluded))
            self.transfer_set = Subset(self.train_set, keep.nonzero().flatten().tolist())
        if len(self.transfer_set) == 0:
            raise ValueError("the transfer set is empty: check data.train_limit and data.exclude_from_transfer")

    @staticmethod
    def collate(examples: list[tuple[Tensor, Tensor]]) -> Batch:
        """Stack images and labels."""
        images = torch.stack([x for x, _ in examples])
        labels = torch.stack([y for _, y in examples])
        return Batch(student_inputs=images, teacher_inputs=images, labels=labels)

    def batch_transform(self, spec: ModelSpec) -> BatchTransform | None:
        """Teachers may train on jittered images (each shifted by up to ``spec.jitter`` pixels)."""
        jitter = getattr(spec, "jitter", 0)
        return partial(_jittered, pixels=jitter) if jitter else None

    @staticmethod
    def build_model(spec: MLPSpec) -> nn.Module:
        if spec.model_name_or_path:
            if not Path(spec.model_name_or_path, "config.json").is_file():
                raise FileNotFoundError(f"field 'teacher.model_name_or_path': {spec.model_name_or_path} is not a model "
                                        "folder saved by potstill (no config.json there)")
            return load_model(spec.model_name_or_path)
        return MLP(IMAGE_SIZE, NUM_CLASSES, spec.hidden_sizes, dropout=spec.dropout,
                   input_dropout=spec.input_dropout)

    def predict(self, model: nn.Module, dataset: Dataset | None = None, batch_size: int = 1000) -> Tensor:
        """Logits of ``model`` on ``dataset`` (default: the eval set), in eval mode, on CPU."""
        dataset = self.eval_set if dataset is None else dataset
        device = next(model.parameters()).device
        outputs = []
        size = len(dataset)  # type: ignore[arg-type]
        with evaluating(model):
            for start in progress(range(0, size, batch_size), desc="evaluating", leave=False, enabled=self.progress):
                batch = self.collate([dataset[i] for i in range(start, min(start + batch_size, size))])
                outputs.append(model(batch.student_inputs.to(device)).float().cpu())
        return torch.cat(outputs)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"eval_accuracy": accuracy(self.predict(model), self.eval_labels)}

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """Accuracy, agreement and KL to the teacher on the eval set, plus what the report plots."""
        labels = self.eval_labels
        logits = {name: self.predict(model.cpu()) for name, model in models.items()}
        teacher = logits["teacher"]
        out: dict[str, Any] = {"models": {}, "eval_examples": len(labels), "headline": list(self.headline)}
        for name, value in logits.items():
            entry = {"parameters": count_parameters(models[name]), "accuracy": accuracy(value, labels),
                     "errors": int((value.argmax(-1) != labels).sum())}
            if name != "teacher":
                entry["agreement"] = agreement(value, teacher)
                entry["kl_to_teacher"] = held_out_kl(value, teacher)
            if self.excluded:
                per_class = per_class_accuracy(value, labels, NUM_CLASSES)
                entry["accuracy_on_excluded_classes"] = {str(c): per_class[c] for c in self.excluded}
            out["models"][name] = entry
        # one example's teacher soft targets at several temperatures: what distillation at T transfers
        z = teacher[0].double()
        out["panels"] = [{"title": f"teacher soft targets, one example (label {int(labels[0])})", "xlabel": "class",
                          "ylabel": "probability", "kind": "line", "yscale": "log",
                          "series": {f"T = {t:g}": {"x": list(range(NUM_CLASSES)), "y": soft_targets(z, t).tolist()}
                                     for t in SOFTENING_TEMPERATURES}}]
        return out
