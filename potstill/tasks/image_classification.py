"""Classic distillation (Hinton et al. 2015): image classifiers on MNIST."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from ..config import DataSpec, ModelSpec
from ..data.mnist import load_mnist
from ..metrics import accuracy
from ..models import MLP, load_model
from .base import Batch

NUM_CLASSES = 10
IMAGE_SIZE = 28 * 28


def shift_images(images: Tensor, pixels: int) -> Tensor:
    """Translate each flattened 28×28 image by a random offset in [−pixels, pixels]² (zero fill).

    Hinton et al. 2015 §3 trained the MNIST teacher on inputs "jittered by up to two pixels".
    """
    n = len(images)
    padded = F.pad(images.view(n, 28, 28), (pixels, pixels, pixels, pixels))
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n)).tolist()
    out = torch.stack([padded[i, y : y + 28, x : x + 28] for i, (x, y) in enumerate(zip(dx, dy, strict=True))])
    return out.reshape(n, -1)


class ImageClassification:
    """MNIST split into train / eval with a fixed seed; the student and teacher read the same image."""

    def __init__(self, data: DataSpec, progress: bool = True):
        images, labels = load_mnist(data.path)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(data.split_seed))
        n_eval = round(len(labels) * data.eval_fraction)
        eval_idx, train_idx = order[:n_eval], order[n_eval:]
        if data.train_limit:
            train_idx = train_idx[: data.train_limit]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.eval_set = TensorDataset(images[eval_idx], labels[eval_idx])
        self.eval_labels = labels[eval_idx]
        self.transfer_set: Dataset = self.train_set
        if data.exclude_from_transfer:
            bad = [c for c in data.exclude_from_transfer if not 0 <= c < NUM_CLASSES]
            if bad:
                raise ValueError(f"data.exclude_from_transfer: classes {bad} are not in 0..9")
            keep = ~torch.isin(labels[train_idx], torch.tensor(data.exclude_from_transfer))
            self.transfer_set = Subset(self.train_set, keep.nonzero().flatten().tolist())
        if len(self.transfer_set) == 0:
            raise ValueError("the transfer set is empty: check data.train_limit and data.exclude_from_transfer")
        self.progress = progress

    @staticmethod
    def collate(examples: list[tuple[Tensor, Tensor]], jitter: int = 0) -> Batch:
        """Stack images and labels; ``jitter > 0`` shifts each image by up to that many pixels."""
        images = torch.stack([x for x, _ in examples])
        labels = torch.stack([y for _, y in examples])
        if jitter:
            images = shift_images(images, jitter)
        return Batch(student_inputs=images, teacher_inputs=images, labels=labels)

    def training_collate(self, spec: ModelSpec):
        """The collate for training a model of ``spec`` (teachers may train on jittered images)."""
        jitter = getattr(spec, "jitter", 0)
        return partial(self.collate, jitter=jitter) if jitter else self.collate

    @staticmethod
    def build_model(spec: ModelSpec) -> nn.Module:
        if spec.model_name_or_path:
            return load_model(spec.model_name_or_path)
        return MLP(IMAGE_SIZE, NUM_CLASSES, spec.hidden_sizes, dropout=spec.dropout,
                   input_dropout=spec.input_dropout)

    @torch.no_grad()
    def predict(self, model: nn.Module, dataset: Dataset | None = None, batch_size: int = 1000) -> Tensor:
        """Logits of ``model`` on ``dataset`` (default: the eval set), in eval mode, on CPU."""
        dataset = self.eval_set if dataset is None else dataset
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        outputs = []
        starts = range(0, len(dataset), batch_size)  # type: ignore[arg-type]
        for start in tqdm(starts, desc="evaluating", leave=False, disable=not self.progress):
            batch = self.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])  # type: ignore[arg-type]
            outputs.append(model(batch.student_inputs.to(device)).float().cpu())
        model.train(was_training)
        return torch.cat(outputs)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        return {"eval_accuracy": accuracy(self.predict(model), self.eval_labels)}
