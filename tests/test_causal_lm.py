"""The causal-LM task: bits per byte, the fused head path in training, saved students that reload."""

from __future__ import annotations

import math

import pytest
import torch

from potstill.distill import distill
from potstill.recipes import load_recipe
from potstill.tasks import TASKS
from tests.test_teacher_cache import TINY_LM


def test_token_byte_lengths_add_up_to_the_text_bytes():
    recipe = load_recipe("tiny-lm", TINY_LM)
    task = TASKS["causal-lm"](recipe, progress=False)
    text = "To be, or not to be: that is the question — naïve café.\n"
    ids = task.tokenizer(text)["input_ids"]
    assert task.encode.student_bytes[ids].sum().item() == len(text.encode("utf-8"))


def test_fused_head_training_follows_the_plain_one(tmp_path):
    base = [*TINY_LM, "train.epochs=2", "train.learning_rate=1e-2", "distillation.alpha=0.6",
            "distillation.temperature=2.0"]
    plain = distill(load_recipe("tiny-lm", [*base, "train.fused_loss=false"]), tmp_path / "plain", progress=False)
    fused = distill(load_recipe("tiny-lm", [*base, "train.fused_loss=true"]), tmp_path / "fused", progress=False)
    a, b = plain.metrics["models"]["student"], fused.metrics["models"]["student"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4)
    assert b["kl_to_teacher"] == pytest.approx(a["kl_to_teacher"], rel=1e-3)


def test_lm_run_learns_and_saves_a_loadable_student(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = load_recipe("tiny-lm", [*TINY_LM, "baseline=true", "teacher.train.epochs=8",
                                     "teacher.train.learning_rate=1e-2", "train.epochs=8", "train.learning_rate=1e-2"])
    result = distill(recipe, tmp_path / "run", progress=False)
    models = result.metrics["models"]
    uniform_bits = math.log2(result.metrics["vocab_size"])
    for name in ("teacher", "scratch", "student"):
        assert models[name]["eval_loss"] / math.log(2) < uniform_bits - 1.0  # far better than guessing
        assert 0 < models[name]["bits_per_byte"] < 8
    # the student folder is an ordinary Hugging Face model + tokenizer
    folder = tmp_path / "run" / "student"
    student = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("ROMEO:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(student(input_ids=ids).logits).all()
