"""Intermediate-layer distillation: hooks by module path, automatic projections, clear errors."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from potstill import Objective, Term
from potstill.config import TrainSpec
from potstill.engine import Engine, make_loader
from potstill.losses import cosine_loss
from potstill.models import MLP
from potstill.signals import forward_signals
from potstill.tasks import ImageClassification
from tests.test_engine import data


def models():
    torch.manual_seed(0)
    teacher = MLP(12, 3, [32, 32]).eval()
    student = MLP(12, 3, [8])
    return teacher, student


def test_hooks_capture_named_modules_and_are_removed():
    teacher, _ = models()
    x = torch.randn(5, 12)
    signals = forward_signals(teacher, x, ["logits", "net.1", "net.3"])
    torch.testing.assert_close(signals["net.1"], torch.relu(teacher.net[0](x)))
    assert signals["net.3"].shape == (5, 32)
    assert all(not m._forward_hooks for m in teacher.modules())
    with pytest.raises(ValueError, match=r"no submodule 'net\.7'.*Closest module names: net\.\d"):
        forward_signals(teacher, x, ["net.7"])


def test_feature_term_gets_a_projection_and_learns(tmp_path):
    teacher, student = models()
    term = Term("cosine", 1.0, student="net.1", teacher="net.3")
    objective = Objective.hinton(alpha=0.5, temperature=2.0, features=[term])
    loader = make_loader(data(), 16, ImageClassification.collate)
    x = data().tensors[0]

    def feature_loss() -> float:
        with torch.no_grad():
            s = forward_signals(student, x, ["net.1"])["net.1"]
            t = forward_signals(teacher, x, ["net.3"])["net.3"]
            return cosine_loss(objective.projections["2"](s), t).item()

    spec = TrainSpec(epochs=1, batch_size=16, learning_rate=1e-9, mixed_precision="no")
    Engine(Accelerator(cpu=True), spec, tmp_path / "a", progress=False).fit(student, objective, loader, teacher)
    projection = objective.projections["2"].linear  # term 2: after the KL and CE terms
    assert (projection.in_features, projection.out_features) == (8, 32)
    before = feature_loss()
    spec = TrainSpec(epochs=20, batch_size=16, learning_rate=1e-2, mixed_precision="no")
    Engine(Accelerator(cpu=True), spec, tmp_path / "b", progress=False).fit(student, objective, loader, teacher)
    assert feature_loss() < 0.5 * before
    assert (tmp_path / "b").exists() and any((p / "extra.safetensors").is_file() for p in (tmp_path / "b").iterdir())


def test_a_bad_module_path_fails_at_set_up(tmp_path):
    teacher, student = models()
    objective = Objective.hinton(features=[Term("mse", 1.0, student="net.9", teacher="net.3")])
    loader = make_loader(data(), 16, ImageClassification.collate)
    with pytest.raises(ValueError, match=r"no submodule 'net\.9'"):
        Engine(Accelerator(cpu=True), TrainSpec(epochs=1), tmp_path, progress=False).fit(
            student, objective, loader, teacher)
