"""Image classifiers: Hinton et al. 2015 on MNIST, and any ``AutoModelForImageClassification``.

Data: the MNIST copy that ships with potstill (``data: {name: mnist}``, the default), or any image
data set ``datasets`` reads (``data: {dataset: imagefolder, data_dir: …}``, a hub set, Parquet with
an image column…; see :class:`~potstill.data.hf.DatasetSpec`), preprocessed once by an image
processor (``Dataset.map``, cached). Models: the built-in MLP (``architecture: mlp``), or any
transformers image classifier (``architecture: transformers``: ResNet, ViT, ConvNeXt…) loaded
from a folder or hub name, or built from a config (``config: {model_type: resnet, …}``). Teacher
and student read the same pixel values; feature terms between CNN stages get a 1×1-conv
projection when the channel counts differ.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import torch
import torch.nn.functional as F
from pydantic import Discriminator, Field, Tag, field_validator
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset, TensorDataset

from ..config import ModelSpec, Recipe, TrainSpec, _Section
from ..data.hf import DataError, DatasetSpec, Splits, data_section
from ..data.mnist import load_mnist
from ..losses import soft_targets
from ..metrics import accuracy, agreement, held_out_kl, per_class_accuracy
from ..models import MLP, count_parameters, evaluating, load_model
from ..pretrained import resolve
from ..progress import progress
from .base import Batch, BatchTransform, Task
from .classifiers import classifier, has_trained_head, model_config, set_dropout, task_labels

NUM_CLASSES = 10
IMAGE_SIZE = 28 * 28
SOFTENING_TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0)
HEAD = "ForImageClassification"


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


class ImageDatasetData(DatasetSpec):
    """Images and labels from a ``datasets`` source (``image_column``, ``label_column``)."""

    #: resize every image to this square size (null: the teacher's config ``image_size`` if it has one,
    #: else the images' own size, which must then be the same for all)
    image_size: int | None = Field(None, ge=1)
    #: class ids left out of the distillation transfer set
    exclude_from_transfer: list[int] = Field(default_factory=list)


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


class TransformersImageSpec(ModelSpec):
    """An ``AutoModelForImageClassification``: loaded (``model_name_or_path``) or built from ``config``."""

    architecture: Literal["transformers"] = "transformers"
    #: build a new model from this config: ``{model_type: resnet, hidden_sizes: [32, 64], depths: [1, 1], …}``
    #: (``num_channels``, ``image_size`` and the labels are set from the data)
    config: dict[str, Any] | None = None
    #: dropout probability of every dropout layer while training (null: the model's own)
    dropout: float | None = Field(None, ge=0, lt=1)


class TransformersImageTeacherSpec(TransformersImageSpec):
    train: TrainSpec = Field(default_factory=TrainSpec)
    jitter: int = Field(0, ge=0, le=4)
    #: train a loaded classifier further on the data (its head is replaced when its classes differ);
    #: a teacher built from a config is always trained
    fine_tune: bool = False
    #: the image processor (hub name or folder) that prepares dataset images for both models; null = the
    #: loaded teacher's own, else resize + scale to [0, 1] + normalise to [-1, 1]
    image_processor: str | None = None


def _architecture(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("architecture", "mlp"))
    return str(getattr(value, "architecture", "mlp"))


ImageTeacher = Annotated[Union[Annotated[MLPTeacherSpec, Tag("mlp")],  # noqa: UP007 - tagged union
                               Annotated[TransformersImageTeacherSpec, Tag("transformers")]],
                         Discriminator(_architecture)]
ImageStudent = Annotated[Union[Annotated[MLPSpec, Tag("mlp")],  # noqa: UP007 - tagged union
                               Annotated[TransformersImageSpec, Tag("transformers")]],
                         Discriminator(_architecture)]


class ImageClassificationRecipe(Recipe):
    task: Literal["image-classification"] = "image-classification"
    data: data_section({"mnist": MnistData, "dataset": ImageDatasetData}, default="mnist") = Field(  # type: ignore[valid-type]
        default_factory=MnistData)
    teacher: ImageTeacher = Field(default_factory=MLPTeacherSpec)
    student: ImageStudent = Field(default_factory=MLPSpec)


def shift_images(images: Tensor, pixels: int, generator: torch.Generator | None = None) -> Tensor:
    """Translate each image by a random offset in [−pixels, pixels]² (zero fill); any shape
    ``[N, …, H, W]``, or flattened 28×28 MNIST images ``[N, 784]``.

    Hinton et al. 2015 §3 trained the MNIST teacher on inputs "jittered by up to two pixels".
    """
    n, shape = len(images), images.shape
    grid = images.view(n, 1, 28, 28) if images.dim() == 2 else images.reshape(n, -1, *shape[-2:])
    height, width = grid.shape[-2:]
    padded = F.pad(grid, (pixels, pixels, pixels, pixels))
    dx, dy = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator).tolist()
    out = torch.stack([padded[i, :, y : y + height, x : x + width]
                       for i, (x, y) in enumerate(zip(dx, dy, strict=True))])
    return out.reshape(shape)


def _jittered(batch: Batch, generator: torch.Generator, pixels: int) -> Batch:
    images = shift_images(batch.student_inputs, pixels, generator)
    return Batch(student_inputs=images, teacher_inputs=images, labels=batch.labels)


class _Preprocess:
    """The map function that turns images into pixel values (a class, so that it pickles for workers)."""

    def __init__(self, processor: Any, mode: str):
        self.processor, self.mode = processor, mode

    def __call__(self, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        images = []
        for index, image in zip(indices, batch["image"], strict=True):
            if image is None or not hasattr(image, "convert"):
                raise DataError(f"data.image_column: row {index} holds {type(image).__name__}, not an image")
            images.append(image.convert(self.mode))
        pixels = self.processor(images, return_tensors="np")["pixel_values"]
        return {"pixel_values": list(pixels), "label": batch["label"]}


class ImageRows(Dataset):
    """Preprocessed rows of a ``datasets.Dataset`` as (pixel values, label) tensors, read on demand."""

    def __init__(self, rows: Any):
        self.rows = rows.with_format("torch")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        row = self.rows[index]
        return row["pixel_values"].float(), row["label"].long()


def default_processor(size: tuple[int, int] | None, channels: int) -> Any:
    """Resize (if ``size``), scale to [0, 1] and normalise to [-1, 1]; PIL only (no torchvision)."""
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    return cls(do_resize=size is not None, size={"height": size[0], "width": size[1]} if size else None,
               image_mean=[0.5] * channels, image_std=[0.5] * channels)


def load_image_processor(path: str) -> Any:
    """A model's ``AutoImageProcessor``, with the PIL backend (torchvision is not needed)."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(resolve(path).path, backend="pil")
    except TypeError:  # transformers before the backend option: the slow processor is the PIL one
        return AutoImageProcessor.from_pretrained(resolve(path).path, use_fast=False)


class ImageClassification(Task):
    """Images split into train / eval; the student and teacher read the same pixel values."""

    name = "image-classification"
    recipe_type = ImageClassificationRecipe
    #: metrics.json keys the table and the report lead with
    headline = ("accuracy", "agreement")

    def __init__(self, recipe: ImageClassificationRecipe, progress: bool = True):
        super().__init__(recipe, progress)
        data, teacher = recipe.data, recipe.teacher
        self.processor: Any = None
        self.teacher_config = None
        if isinstance(teacher, TransformersImageTeacherSpec):
            self.teacher_config = model_config(teacher.model_name_or_path, teacher.config, teacher.trust_remote_code)
        if isinstance(data, MnistData):
            self._mnist(data)
        else:
            self._dataset(data)
        self.num_classes = len(self.labels)
        self.excluded = data.exclude_from_transfer
        self.transfer_set: Dataset = self.train_set
        if self.excluded:
            bad = [c for c in self.excluded if not 0 <= c < self.num_classes]
            if bad:
                raise ValueError(f"data.exclude_from_transfer: classes {bad} are not in 0..{self.num_classes - 1}")
            keep = ~torch.isin(self.train_labels, torch.tensor(self.excluded))
            self.transfer_set = Subset(self.train_set, keep.nonzero().flatten().tolist())
        if len(self.transfer_set) == 0:
            raise ValueError("the transfer set is empty: check data.train_limit and data.exclude_from_transfer")

    # ----- data --------------------------------------------------------------------------------

    def _mnist(self, data: MnistData) -> None:
        """MNIST as ``[N, 1, 28, 28]`` pixel values in [0, 1], split with a fixed seed."""
        images, labels = load_mnist(data.path)
        images = images.view(-1, 1, 28, 28)
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(data.split_seed))
        n_eval = round(len(labels) * data.eval_fraction)
        eval_idx, train_idx = order[:n_eval], order[n_eval:]
        if data.train_limit:
            train_idx = train_idx[: data.train_limit]
        self.labels = [str(c) for c in range(NUM_CLASSES)]
        self.train_set = TensorDataset(images[train_idx], labels[train_idx])
        self.eval_set = TensorDataset(images[eval_idx], labels[eval_idx])
        self.train_labels, self.eval_labels = labels[train_idx], labels[eval_idx]
        self.image_shape = (1, 28, 28)

    def _dataset(self, data: ImageDatasetData) -> None:
        """A ``datasets`` source: labels checked against the teacher's, images through the processor (cached)."""
        splits = data.load(["image", "label"])
        splits = Splits(*(None if rows is None else self._as_images(rows) for rows in splits))
        used_as_is = isinstance(self.recipe.teacher, TransformersImageTeacherSpec) and not self.trains_teacher()
        splits, self.labels = task_labels(splits, data.labels, self.teacher_config, used_as_is)
        self.processor, mode = self._processor(data, splits.train)
        preprocess = _Preprocess(self.processor, mode)
        fingerprint = [type(self.processor).__name__, self.processor.to_json_string(), mode]
        train, held_out = (data.map(rows, preprocess, with_indices=True, fingerprint=fingerprint,
                                    desc=f"Preparing images ({name})", progress=self.progress, batch_size=64)
                           for name, rows in (("train", splits.train), ("eval", splits.eval)))
        self.train_set, self.eval_set = ImageRows(train), ImageRows(held_out)
        self.train_labels = torch.tensor(train["label"])
        self.eval_labels = torch.tensor(held_out["label"])
        self.image_shape = tuple(self.train_set[0][0].shape)

    @staticmethod
    def _as_images(rows: Any) -> Any:
        """The image column as decoded images: an Image feature, or paths / bytes cast to one."""
        from datasets import Image, Value

        feature = rows.features["image"]
        if isinstance(feature, Image):
            return rows if feature.decode else rows.cast_column("image", Image())
        if (isinstance(feature, Value) and feature.dtype in ("string", "large_string", "binary", "large_binary")) \
                or (isinstance(feature, dict) and {"bytes", "path"} >= set(feature)):
            return rows.cast_column("image", Image())
        raise DataError(f"data.image_column: the column holds {feature}; expected images (an Image column, "
                        "image files' paths or bytes)")

    def _processor(self, data: ImageDatasetData, train: Any) -> tuple[Any, str]:
        """The image processor both models read through, and the PIL mode images are converted to."""
        teacher = self.recipe.teacher
        config = self.teacher_config
        channels = getattr(config, "num_channels", None)
        if channels is None:  # an MLP teacher: the images' own colours
            first = train[0]["image"]
            channels = 1 if first.mode in ("1", "L", "I", "I;16", "F") else 3
        mode = {1: "L", 3: "RGB"}.get(channels)
        if mode is None:
            raise DataError(f"the teacher reads {channels}-channel images; potstill converts images to 1 (L) or 3 "
                            "(RGB) channels")
        if isinstance(teacher, TransformersImageTeacherSpec) and teacher.image_processor:
            return load_image_processor(teacher.image_processor), mode
        if isinstance(teacher, TransformersImageTeacherSpec) and teacher.model_name_or_path:
            try:
                return load_image_processor(teacher.model_name_or_path), mode
            except (OSError, ValueError):
                pass  # a folder without a processor: the default below
        size = data.image_size or getattr(config, "image_size", None)
        if size is None:
            sizes = {image.size for image in train.select(range(min(len(train), 256)))["image"]}
            if len(sizes) > 1:
                raise DataError(f"the images differ in size ({', '.join(f'{w}×{h}' for w, h in sorted(sizes)[:4])}…): "
                                "set data.image_size to resize them")
            width, height = sizes.pop()
            return default_processor((height, width), channels), mode
        return default_processor((int(size), int(size)), channels), mode

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

    # ----- models ------------------------------------------------------------------------------

    def trains_teacher(self) -> bool:
        teacher = self.recipe.teacher
        return not teacher.model_name_or_path or bool(getattr(teacher, "fine_tune", False))

    def build_model(self, spec: MLPSpec | TransformersImageSpec) -> nn.Module:
        if isinstance(spec, TransformersImageSpec):
            return self._transformers(spec)
        if spec.model_name_or_path:
            if not Path(spec.model_name_or_path, "config.json").is_file():
                raise FileNotFoundError(f"field 'teacher.model_name_or_path': {spec.model_name_or_path} is not a model "
                                        "folder saved by potstill (no config.json there)")
            return load_model(spec.model_name_or_path)
        in_features = 1
        for size in self.image_shape:
            in_features *= size
        return MLP(in_features, self.num_classes, spec.hidden_sizes, dropout=spec.dropout,
                   input_dropout=spec.input_dropout)

    def _transformers(self, spec: TransformersImageSpec) -> nn.Module:
        """An image classifier for the task's classes, reading images of the task's shape."""
        from transformers import AutoModelForImageClassification

        channels, height, width = self.image_shape
        overrides: dict[str, Any] = {}
        if not spec.model_name_or_path:
            config = model_config(None, spec.config)
            if hasattr(config, "num_channels"):
                overrides["num_channels"] = channels
            if hasattr(config, "image_size") and height == width:
                overrides["image_size"] = height
        else:
            config = model_config(spec.model_name_or_path, None, spec.trust_remote_code)
            if not has_trained_head(config, HEAD) and not self.trains_teacher():
                raise ValueError(f"{spec.model_name_or_path} is not a trained image classifier: fine-tune it "
                                 "(teacher.fine_tune: true)")
            if getattr(config, "num_channels", channels) != channels:
                raise DataError(f"{spec.model_name_or_path} reads {config.num_channels}-channel images, the data "
                                f"gives {channels}")
        model = classifier(AutoModelForImageClassification, spec.model_name_or_path, spec.config, self.labels,
                           trust_remote_code=spec.trust_remote_code, **overrides)
        if spec.dropout is not None:
            set_dropout(model, spec.dropout)
        return model

    def save_extras(self, folder: Path) -> None:
        if self.processor is not None:
            self.processor.save_pretrained(folder)

    # ----- evaluation --------------------------------------------------------------------------

    def predict(self, model: nn.Module, dataset: Dataset | None = None, batch_size: int = 1000) -> Tensor:
        """Logits of ``model`` on ``dataset`` (default: the eval set), in eval mode."""
        from ..signals import logits_of

        dataset = self.eval_set if dataset is None else dataset
        device = next(model.parameters()).device
        outputs = []
        size = len(dataset)  # type: ignore[arg-type]
        with evaluating(model):
            for start in progress(range(0, size, batch_size), desc="evaluating", leave=False, enabled=self.progress):
                batch = self.collate([dataset[i] for i in range(start, min(start + batch_size, size))])
                outputs.append(logits_of(model(batch.student_inputs.to(device))).float().cpu())
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
                per_class = per_class_accuracy(value, labels, self.num_classes)
                entry["accuracy_on_excluded_classes"] = {str(c): per_class[c] for c in self.excluded}
            out["models"][name] = entry
        # one example's teacher soft targets at several temperatures: what distillation at T transfers
        z = teacher[0].double()
        out["panels"] = [{"title": f"teacher soft targets, one example (label {self.labels[int(labels[0])]})",
                          "xlabel": "class", "ylabel": "probability", "kind": "line", "yscale": "log",
                          "series": {f"T = {t:g}": {"x": list(range(self.num_classes)),
                                                    "y": soft_targets(z, t).tolist()}
                                     for t in SOFTENING_TEMPERATURES}}]
        if self.labels != [str(c) for c in range(self.num_classes)]:
            out["labels"] = list(self.labels)
        return out
