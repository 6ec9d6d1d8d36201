"""Intermediate-layer distillation: hooks by module path, automatic projections, clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from potstill import Objective, Term
from potstill.config import TrainSpec
from potstill.engine import Engine, make_loader
from potstill.losses import ChannelProjection, Projection, attention_kl, cosine_loss, similarity_loss
from potstill.models import MLP
from potstill.signals import forward_signals, teacher_signals
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


# --- attention maps as signals ------------------------------------------------------------------


def _bert(layers: int, heads: int, seed: int, attn: str = "eager"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation=attn)
    return BertModel(config, add_pooling_layer=False)


def _token_batch(seed: int = 0, batch: int = 4, length: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 50, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 5:] = 0  # padded sequences
    mask[3, 3:] = 0
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_attention_kl_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])

    def maps() -> torch.Tensor:  # rows over valid keys sum to 1; padded keys get exactly 0, as in BERT
        scores = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64)
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
        return scores.softmax(-1)

    student, teacher = maps(), maps()
    rows = []
    for b in range(2):
        for h in range(2):
            for q in range(3):
                if mask[b, q]:
                    rows.append(sum(teacher[b, h, q, k].item() * math.log(teacher[b, h, q, k].item()
                                                                          / student[b, h, q, k].item())
                                    for k in range(3) if mask[b, k]))
    expected = sum(rows) / len(rows)
    assert len(rows) == 10  # 2 examples × 2 heads × 3 queries, less example 1's padded query in both heads
    got = attention_kl(student, teacher, mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    per_row = attention_kl(student, teacher, mask=mask, reduction="none")
    assert per_row.shape == (2, 2, 3) and (per_row[1, :, 2] == 0).all()
    assert attention_kl(student, teacher, mask=mask, reduction="sum").item() == pytest.approx(sum(rows))
    assert attention_kl(teacher, teacher, mask=mask).item() == pytest.approx(0.0, abs=1e-12)
    # garbage in the padded query row does not leak into the value or the gradient
    noisy = student.clone()
    noisy[1, :, 2] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    noisy.requires_grad_(True)
    value = attention_kl(noisy, teacher, mask=mask)
    value.backward()
    assert value.item() == pytest.approx(expected, rel=1e-12)
    assert torch.isfinite(noisy.grad).all() and (noisy.grad[1, :, 2] == 0).all()


def test_attention_maps_need_equal_head_counts():
    with pytest.raises(ValueError, match="2 attention heads and the teacher 4"):
        attention_kl(torch.full((1, 2, 3, 3), 1 / 3), torch.full((1, 4, 3, 3), 1 / 3))
    objective = Objective([Term("attention_kl", 1.0, student="attentions.0", teacher="attentions.1")])
    with pytest.raises(ValueError, match=r"2 heads, teacher 'attentions\.1' 4"):
        objective.prepare({"attentions.0": torch.zeros(1, 2, 3, 3)}, {"attentions.1": torch.zeros(1, 4, 3, 3)})


def test_attention_maps_are_captured_from_a_transformer_and_hooks_removed():
    model = _bert(layers=2, heads=2, seed=0).eval()
    batch = _token_batch()
    signals = forward_signals(model, batch, ["attentions.1", "encoder.layer.0"])
    reference = model(**batch, output_attentions=True).attentions
    torch.testing.assert_close(signals["attentions.1"], reference[1])
    assert signals["attentions.1"].shape == (4, 2, 7, 7)
    assert signals["encoder.layer.0"].shape == (4, 7, 16)
    ours = [h for m in model.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]
            if h.__module__ == "potstill.signals"]
    assert not ours
    with pytest.raises(ValueError, match=r"has 2 layers of attentions \(0 to 1\)"):
        forward_signals(model, batch, ["attentions.2"])
    with pytest.raises(ValueError, match=r"need eager attention.*'sdpa'"):
        forward_signals(_bert(layers=2, heads=2, seed=0, attn="sdpa"), batch, ["attentions.0"])


def test_a_student_trained_on_attention_maps_moves_toward_the_teachers():
    teacher, student = _bert(layers=2, heads=2, seed=0).eval(), _bert(layers=1, heads=2, seed=1)
    objective = Objective([Term("attention_kl", 1.0, student="attentions.0", teacher="attentions.1")])
    batches = [_token_batch(seed) for seed in range(2)]
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)

    def distance() -> float:
        with torch.no_grad():
            return sum(objective(forward_signals(student, b, ["attentions.0"]),
                                 forward_signals(teacher, b, ["attentions.1"]), mask=b["attention_mask"]).loss.item()
                       for b in batches)

    before = distance()
    for _ in range(20):
        for b in batches:
            targets = teacher_signals(teacher, b, ["attentions.1"])
            out = objective(forward_signals(student, b, ["attentions.0"]), targets, mask=b["attention_mask"])
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
    assert distance() < 0.3 * before


# --- 1×1-conv projections for CNN feature maps ---------------------------------------------------


class TinyCNN(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(),
                                        torch.nn.Conv2d(width, width, 3, padding=1))
        self.head = torch.nn.Linear(width, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean((2, 3)))


def test_feature_maps_with_different_channels_get_a_1x1_conv_that_learns():
    torch.manual_seed(0)
    teacher, student = TinyCNN(16).eval(), TinyCNN(4)
    images = torch.randn(32, 3, 6, 6)
    objective = Objective([Term("mse", 1.0, student="body.2", teacher="body.2")])
    s = forward_signals(student, images, ["body.2"])
    t = teacher_signals(teacher, images, ["body.2"])
    assert (s["body.2"].shape, t["body.2"].shape) == ((32, 4, 6, 6), (32, 16, 6, 6))
    objective.prepare(s, t)
    projection = objective.projections["0"]
    assert isinstance(projection, ChannelProjection) and isinstance(projection.conv, torch.nn.Conv2d)
    assert projection.conv.kernel_size == (1, 1)
    # a 1×1 conv maps each pixel's channel vector by one matrix
    w, bias = projection.conv.weight[:, :, 0, 0], projection.conv.bias
    by_hand = torch.einsum("oc,bchw->bohw", w, s["body.2"]) + bias[None, :, None, None]
    torch.testing.assert_close(projection(s["body.2"]), by_hand)
    # hidden states [B, L, D] of different widths still get a linear map of the last axis
    hidden = Objective([Term("cosine", 1.0, student="a", teacher="b")])
    hidden.prepare({"a": torch.zeros(2, 5, 8)}, {"b": torch.zeros(2, 5, 12)})
    assert isinstance(hidden.projections["0"], Projection)

    def feature_loss() -> float:
        with torch.no_grad():
            return objective(forward_signals(student, images, ["body.2"]), t).loss.item()

    before, start = feature_loss(), projection.conv.weight.detach().clone()
    optimizer = torch.optim.Adam([*student.parameters(), *objective.parameters()], lr=1e-2)
    for _ in range(100):
        out = objective(forward_signals(student, images, ["body.2"]), t)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert feature_loss() < 0.5 * before  # 4 channels cannot carry all 16, but most of them
    assert not torch.equal(projection.conv.weight, start)  # the projection is trained with the student


def test_similarity_loss_compares_cosine_matrices_by_hand():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(4, 3, generator=g, dtype=torch.float64)
    teacher = torch.randn(4, 5, generator=g, dtype=torch.float64)  # widths may differ

    def cos(a: torch.Tensor, b: torch.Tensor) -> float:
        return (a @ b / (a.norm() * b.norm())).item()

    pairs = [(i, j) for i in range(4) for j in range(4) if i != j]
    squares = {p: (cos(student[p[0]], student[p[1]]) - cos(teacher[p[0]], teacher[p[1]])) ** 2 for p in pairs}
    assert similarity_loss(student, teacher).item() == pytest.approx(sum(squares.values()) / 12, rel=1e-12)
    kept = [p for p in pairs if 2 not in p]  # example 2 masked out of every pair
    got = similarity_loss(student, teacher, mask=torch.tensor([1, 1, 0, 1]))
    assert got.item() == pytest.approx(sum(squares[p] for p in kept) / len(kept), rel=1e-12)
    assert similarity_loss(student, 3 * student).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    rotation = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))[0]
    assert similarity_loss(student, student @ rotation).item() == pytest.approx(0.0, abs=1e-12)
    assert similarity_loss(student, teacher, reduction="none").shape == (4, 4)
