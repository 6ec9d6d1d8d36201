"""Image classification beyond the MLP: transformers image classifiers (built from a config or
loaded, with their image processor), imagefolder and image-column data sets through datasets."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from potstill.data.hf import DataError
from potstill.distill import distill
from potstill.losses import ChannelProjection
from potstill.recipes import parse_recipe
from potstill.tasks.image_classification import ImageClassification, shift_images

datasets = pytest.importorskip("datasets")
Image = pytest.importorskip("PIL.Image")

RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
          "layer_type": "basic"}
SMALL = {"model_type": "resnet", "embedding_size": 4, "hidden_sizes": [4, 8], "depths": [1, 1],
         "layer_type": "basic"}


pytestmark = pytest.mark.usefixtures("one_thread")


def blobs(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """16×16 RGB images: a bright square top-left ("left") or bottom-right ("right") on noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 80, (16, 16, 3)).astype(np.uint8)
        side = "left" if i % 2 else "right"
        low = 0 if side == "left" else 8
        y, x = rng.integers(low, low + 4, 2)
        image[y:y + 4, x:x + 4] = 255
        out.append((image, side))
    return out


def image_folder(root, splits: dict[str, int]):
    for seed, (split, n) in enumerate(splits.items()):
        for i, (pixels, side) in enumerate(blobs(n, seed)):
            folder = root / split / side
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_shift_images_keeps_each_images_shape_and_moves_its_pixels():
    flat = torch.zeros(2, 784)
    flat[:, 14 * 28 + 14] = 1.0
    out = shift_images(flat, 2, torch.Generator().manual_seed(0))
    assert out.shape == flat.shape and out.sum(-1).tolist() == [1.0, 1.0]
    grid = flat.view(2, 1, 28, 28)
    same = shift_images(grid, 2, torch.Generator().manual_seed(0))
    assert torch.equal(same.reshape(2, -1), out)  # [N, 1, 28, 28] and [N, 784] move alike
    rgb = torch.rand(2, 1, 5, 5).expand(2, 3, 5, 5)
    moved = shift_images(rgb, 1, torch.Generator().manual_seed(1))
    assert moved.shape == rgb.shape and not torch.equal(moved, rgb)
    assert torch.equal(moved[:, 0], moved[:, 1]) and torch.equal(moved[:, 1], moved[:, 2])  # one offset per image


def test_an_imagefolder_teaches_a_resnet_built_from_a_config(tmp_path):
    root = image_folder(tmp_path / "images", {"train": 48, "validation": 16})
    recipe = parse_recipe({
        "task": "image-classification",
        "data": {"dataset": "imagefolder", "data_dir": str(root), "num_proc": 2, "cache_dir": str(tmp_path / "c")},
        "teacher": {"architecture": "transformers", "config": RESNET,
                    "train": {"epochs": 6, "batch_size": 8, "learning_rate": 1e-2}},
        "student": {"architecture": "transformers", "config": SMALL},
        "distillation": {"temperature": 2.0, "alpha": 0.5, "features": [
            {"student": "resnet.encoder.stages.1", "teacher": "resnet.encoder.stages.1", "loss": "mse"}]},
        "train": {"epochs": 6, "batch_size": 8, "learning_rate": 1e-2},
    })
    task = ImageClassification(recipe, progress=False)
    assert task.labels == ["left", "right"] and len(task.train_set) == 48 and len(task.eval_set) == 16
    pixels, _ = task.train_set[0]
    assert pixels.shape == (3, 16, 16) and -1.0 <= pixels.min() and pixels.max() <= 1.0  # normalised to [-1, 1]
    result = distill(recipe, tmp_path / "run", progress=False)
    models = result.metrics["models"]
    assert models["teacher"]["accuracy"] >= 0.9  # it learned where the square is
    assert models["student"]["parameters"] < models["teacher"]["parameters"] / 2
    assert result.metrics["labels"] == ["left", "right"]
    # the saved teacher reloads with its processor, as any transformers image classifier
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    folder = tmp_path / "run" / "teacher"
    teacher = AutoModelForImageClassification.from_pretrained(folder).eval()
    processor = AutoImageProcessor.from_pretrained(folder, backend="pil")
    image, side = blobs(1, 7)[0]
    with torch.no_grad():
        logits = teacher(**processor(Image.fromarray(image), return_tensors="pt")).logits
    assert teacher.config.id2label[int(logits.argmax())] == side


def test_feature_maps_of_different_widths_get_a_channel_projection(tmp_path):
    from potstill.objective import Objective, Term
    from potstill.signals import forward_signals

    recipe = parse_recipe({"task": "image-classification", "data": {"train_limit": 64},
                           "teacher": {"architecture": "transformers", "config": RESNET},
                           "student": {"architecture": "transformers", "config": SMALL}})
    task = ImageClassification(recipe, progress=False)
    teacher, student = task.build_model(recipe.teacher), task.build_model(recipe.student)
    assert teacher.config.num_channels == 1 and teacher.config.num_labels == 10  # MNIST's
    batch = task.collate([task.train_set[i] for i in range(4)])
    path = "resnet.encoder.stages.1"
    s = forward_signals(student, batch.student_inputs, [path, "logits"])
    t = forward_signals(teacher, batch.teacher_inputs, [path, "logits"])
    assert s[path].shape[1] == 8 and t[path].shape[1] == 16 and s[path].shape[2:] == t[path].shape[2:]
    objective = Objective.hinton(0.5, 2.0, features=[Term("mse", 1.0, student=path, teacher=path)])
    objective.prepare(s, t)
    assert isinstance(objective.projections["2"], ChannelProjection)
    out = objective(s, t, labels=batch.labels)
    assert torch.isfinite(out.loss) and out.parts[f"mse[{path}]"] > 0


def test_an_image_column_of_bytes_and_a_loaded_classifier_used_as_it_is(tmp_path):
    from transformers import AutoModelForImageClassification, ResNetConfig

    def png(pixels):
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return buffer.getvalue()

    def save(rows, path):
        features = datasets.Features({"picture": datasets.Image(), "side": datasets.Value("string")})
        datasets.Dataset.from_dict({"picture": [{"bytes": png(p), "path": None} for p, _ in rows],
                                    "side": [s for _, s in rows]}, features=features).to_parquet(str(path))

    rows = [(pixels, "right" if i < 16 else "left") for i, (pixels, _) in enumerate(blobs(24, 3))]
    save(rows, tmp_path / "i.parquet")
    # a trained classifier whose classes are named in the other order than sorted names would give
    config = ResNetConfig(**{k: v for k, v in RESNET.items() if k != "model_type"}, num_channels=3,
                          id2label={0: "right", 1: "left"}, label2id={"right": 0, "left": 1})
    AutoModelForImageClassification.from_config(config).save_pretrained(tmp_path / "classifier")
    data = {"dataset": str(tmp_path / "i.parquet"), "image_column": "picture", "label_column": "side",
            "eval_size": 8, "cache_dir": str(tmp_path / "c")}
    teacher = {"architecture": "transformers", "model_name_or_path": str(tmp_path / "classifier")}
    recipe = parse_recipe({"task": "image-classification", "data": data, "teacher": teacher,
                           "student": {"hidden_sizes": [8]}})
    task = ImageClassification(recipe, progress=False)
    assert task.labels == ["right", "left"] and not task.trains_teacher()
    ids = torch.cat([task.train_labels, task.eval_labels])
    assert (ids == 0).sum() == 16 and (ids == 1).sum() == 8  # ids in the teacher's order: 0 = right
    assert task.build_model(recipe.student).net[0].in_features == 3 * 16 * 16  # an MLP on the same pixels
    # a label the loaded teacher does not know
    rows[0] = (rows[0][0], "middle")
    save(rows, tmp_path / "j.parquet")
    recipe.data.dataset = str(tmp_path / "j.parquet")
    with pytest.raises(DataError, match=r"label 'middle' .* is not one of the model's labels: right, left"):
        ImageClassification(recipe, progress=False)
    recipe.data.image_column = "pic"
    with pytest.raises(DataError, match=r"data.image_column: column 'pic' .* its columns: picture, side"):
        ImageClassification(recipe, progress=False)
