"""The engine: learning, gradient accumulation, and resume that reproduces an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import TensorDataset

from potstill import Objective
from potstill.config import TrainSpec
from potstill.engine import Engine, make_loader
from potstill.models import MLP
from potstill.tasks import ImageClassification


def data(n: int = 96) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 12, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    return TensorDataset(x, y)


def model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(12, 3, [16], dropout=0.3)


class Crash(RuntimeError):
    pass


def fit(tmp, spec: TrainSpec, *, crash_after: int | None = None, teacher=None, objective=None):
    objective = objective or Objective.supervised()
    if crash_after is not None:
        calls = {"n": 0}
        original = objective.forward

        def forward(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > crash_after:
                raise Crash
            return original(*args, **kwargs)

        objective.forward = forward
    loader = make_loader(data(), spec.batch_size, ImageClassification.collate, seed=spec.seed)
    engine = Engine(Accelerator(cpu=True), spec, tmp, progress=False, log_every=1)
    torch.manual_seed(1234)  # the global RNG (dropout) starts the same in every run
    return engine.fit(model(), objective, loader, teacher=teacher)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_resume_after_a_crash_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, accumulation):
    spec = TrainSpec(epochs=3, batch_size=8, learning_rate=1e-2, checkpoint_every=2,
                     gradient_accumulation_steps=accumulation, mixed_precision="no")
    reference = fit(tmp_path / "a", spec)
    with pytest.raises(Crash):
        fit(tmp_path / "b", spec, crash_after=17)  # in epoch 2, between checkpoints
    resumed = fit(tmp_path / "b", spec)
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    losses = [r["loss"] for r in reference.history if "loss" in r]
    assert [r["loss"] for r in resumed.history if "loss" in r] == pytest.approx(losses)


def test_engine_trains_and_distills(tmp_path):
    spec = TrainSpec(epochs=15, batch_size=16, learning_rate=1e-2, mixed_precision="no")
    teacher = fit(tmp_path / "t", spec).model
    x, y = data().tensors
    teacher.eval()
    teacher_acc = (teacher(x).argmax(-1) == y).float().mean().item()
    assert teacher_acc > 0.8  # learns from chance (~0.4 for the majority class)
    student = fit(tmp_path / "s", spec, teacher=teacher, objective=Objective.hinton(alpha=1.0, temperature=2.0))
    student.model.eval()
    agreement = (student.model(x).argmax(-1) == teacher(x).argmax(-1)).float().mean().item()
    assert agreement > 0.85  # trained on the teacher's soft targets alone


def test_engine_refuses_a_distillation_objective_without_teacher(tmp_path):
    with pytest.raises(ValueError, match="none was given"):
        fit(tmp_path, TrainSpec(epochs=1), objective=Objective.hinton(alpha=0.5))


def test_nan_in_teacher_outputs_stops_with_the_batch_index(tmp_path):
    class Broken(torch.nn.Module):
        def forward(self, x):
            out = torch.zeros(len(x), 3)
            out[0, 1] = float("nan")
            return out

    spec = TrainSpec(epochs=1, batch_size=8, mixed_precision="no")
    with pytest.raises(FloatingPointError, match=r"epoch 1, batch 0: teacher signal 'logits' contains NaN"):
        fit(tmp_path, spec, teacher=Broken(), objective=Objective.hinton(alpha=0.5))


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, capsys):
    spec = TrainSpec(epochs=3, batch_size=8, learning_rate=1e-2, checkpoint_every=2, mixed_precision="no")
    reference = fit(tmp_path / "a", spec)
    with pytest.raises(Crash):
        fit(tmp_path / "b", spec, crash_after=17)
    newest = sorted((tmp_path / "b").glob("step-*"))[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # a few bytes rotted
    resumed = fit(tmp_path / "b", spec)
    out = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged" in out and "resumed from" in out
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


def test_grouping_by_length_batches_similar_lengths_in_a_reproducible_order():
    rng = torch.Generator().manual_seed(0)
    texts = ["x" * int(n) for n in torch.randint(1, 200, (1000,), generator=rng)]
    loader = make_loader(texts, 16, list, seed=3, group_by_length=True)
    plain = make_loader(texts, 16, list, seed=3)

    def epoch(loader, number):
        loader.sampler.set_epoch(number)
        return list(loader)

    grouped = epoch(loader, 0)
    assert sorted(t for batch in grouped for t in batch) == sorted(texts)  # every example once
    assert [len(b) for b in grouped] == [16] * 62 + [8]  # whole batches, the short one last

    def padding(batches):  # characters a collate would pad
        return sum(max(map(len, b)) * len(b) - sum(map(len, b)) for b in batches)

    assert padding(grouped) < 0.1 * padding(epoch(plain, 0))
    assert epoch(loader, 1) != grouped
    # a resumed run builds a new loader: the same (seed, epoch) gives the same batches
    assert epoch(make_loader(texts, 16, list, seed=3, group_by_length=True), 0) == grouped
    with pytest.raises(ValueError, match=r"group_by_length.*have no length"):
        make_loader(data(), 8, list, group_by_length=True)
