"""The engine: learning, gradient accumulation, and resume that reproduces an uninterrupted run."""

from __future__ import annotations

import math

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


class TinyLM(torch.nn.Module):
    """Embedding → tanh → head: logits per position, enough to test how positions are counted."""

    def __init__(self, seed: int, vocab: int = 11, width: int = 6):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids, attention_mask):
        return self.head(torch.tanh(self.embed(input_ids)))


def sequences(n: int = 8):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 11, (int(length),), generator=g) for length in torch.randint(2, 9, (n,), generator=g)]


def collate_sequences(rows):
    from potstill.tasks.base import Batch

    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
    labels = torch.where(mask.bool(), (ids + 1) % 11, -100)
    # a few masked positions that are not padding, so labels and mask count differently
    labels[:, 0] = torch.where(ids[:, 0] % 2 == 0, -100, labels[:, 0])
    inputs = {"input_ids": ids, "attention_mask": mask}
    return Batch(student_inputs=inputs, teacher_inputs=inputs, labels=labels, mask=mask)


@pytest.mark.parametrize("per_step", [(8, 1), (2, 4), (3, 3)])
def test_accumulated_micro_batches_of_unequal_lengths_give_the_one_batch_update(tmp_path, per_step):
    """8 sequences of 2-8 tokens in one batch, or in micro-batches: the same SGD update (float64).
    KL and CE count labelled positions, the cosine term the attention mask's: each is normalised by
    its own count over the whole step."""
    from potstill.objective import Term

    batch_size, accumulation = per_step
    objective = Objective.hinton(alpha=0.5, temperature=2.0,
                                 features=[Term("cosine", 0.7, student="embed", teacher="embed")])
    spec = TrainSpec(epochs=1, batch_size=batch_size, gradient_accumulation_steps=accumulation, optimizer="sgd",
                     momentum=0.0, learning_rate=0.5, scheduler="constant", mixed_precision="no")
    loader = make_loader(sequences(), batch_size, collate_sequences, seed=0)
    engine = Engine(Accelerator(cpu=True), spec, tmp_path / str(per_step), progress=False, log_every=1)
    result = engine.fit(TinyLM(0).double(), objective, loader, teacher=TinyLM(1).double())
    weights = torch.cat([p.detach().flatten() for p in result.model.parameters()])
    # the reference: the whole batch through the objective at its per-token mean, one SGD step by hand
    student, teacher = TinyLM(0).double(), TinyLM(1).double()
    batch = collate_sequences([sequences()[i] for i in loader.sampler])
    from potstill.signals import forward_signals

    s = forward_signals(student, batch.student_inputs, {"logits", "embed"})
    with torch.no_grad():
        t = forward_signals(teacher, batch.teacher_inputs, {"logits", "embed"})
    reference = objective(s, t, labels=batch.labels, mask=batch.mask)
    reference.loss.backward()
    expected = torch.cat([(p - 0.5 * p.grad).detach().flatten() for p in student.parameters()])
    steps = math.ceil(8 / batch_size / accumulation)
    assert steps == 1
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    row = next(r for r in result.history if "loss" in r)
    assert row["loss"] == pytest.approx(reference.loss.item(), rel=1e-12)
    assert row["kl"] == pytest.approx(reference.parts["kl"].item(), rel=1e-12)
    assert row["cosine[embed]"] == pytest.approx(reference.parts["cosine[embed]"].item(), rel=1e-12)
