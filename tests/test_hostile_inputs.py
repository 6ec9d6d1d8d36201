"""Bad input gets a clear error that names what is wrong, and nothing is lost."""

from __future__ import annotations

import pytest
import torch

from potstill.cli import main
from potstill.config import load_recipe
from potstill.distill import distill
from tests.test_teacher_cache import TINY_LM


def error_output(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_missing_and_empty_data_files_are_named(tmp_path, capsys):
    missing = tmp_path / "nowhere.txt"
    err = error_output(capsys, ["distill", "tiny-lm", "--output-dir", str(tmp_path / "a"),
                                "--set", f"data.files=[{missing}]"])
    assert str(missing) in err
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    err = error_output(capsys, ["distill", "tiny-lm", "--output-dir", str(tmp_path / "b"),
                                "--set", f"data.files=[{empty}]"])
    assert "no text" in err and str(empty) in err
    err = error_output(capsys, ["distill", "mnist", "--output-dir", str(tmp_path / "c"),
                                "--set", f"data.path={tmp_path / 'no-mnist'}"])
    assert "no-mnist" in err


def test_recipe_typos_and_bad_values_from_the_command_line(tmp_path, capsys):
    err = error_output(capsys, ["distill", "mnist", "--set", "distillation.temprature=2"])
    assert "distillation.temprature" in err and "Did you mean 'temperature'?" in err
    err = error_output(capsys, ["distill", "mnist", "--set", "distillation.temperature=0"])
    assert "'distillation.temperature'" in err and "greater than 0" in err
    err = error_output(capsys, ["distill", "nosuchrecipe"])
    assert "built-in recipes" in err and "mnist" in err


def test_a_student_with_nothing_to_train_is_refused(tmp_path):
    from accelerate import Accelerator

    from potstill import Objective
    from potstill.config import TrainSpec
    from potstill.engine import Engine, make_loader
    from potstill.models import MLP
    from potstill.tasks import ImageClassification
    from tests.test_engine import data

    frozen = MLP(12, 3, [4]).requires_grad_(False)
    loader = make_loader(data(), 8, ImageClassification.collate)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Engine(Accelerator(cpu=True), TrainSpec(epochs=1), tmp_path, progress=False).fit(
            frozen, Objective.supervised(), loader)


def test_untrusted_code_stays_off_and_only_safetensors_load(tmp_path):
    recipe = load_recipe("tiny-lm", TINY_LM)
    assert recipe.teacher.trust_remote_code is False and recipe.student.trust_remote_code is False
    # a model folder holding only a pickle checkpoint is refused, not unpickled
    run = distill(recipe, tmp_path / "run", progress=False)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (tmp_path / "run" / "teacher" / "config.json").replace(folder / "config.json")
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    bad = load_recipe("tiny-lm", [*TINY_LM, f"teacher.model_name_or_path={folder}",
                                  f"data.tokenizer.model_name_or_path={tmp_path / 'run' / 'student'}"])
    with pytest.raises(OSError, match="safetensors"):
        distill(bad, tmp_path / "run2", progress=False)
    assert run.metrics["models"]["student"]["parameters"] > 0


def test_blocks_longer_than_the_teachers_context_are_cut_with_a_warning(tmp_path, caplog):
    from potstill.tasks import TASKS

    recipe = load_recipe("tiny-lm", [*TINY_LM, "data.block_size=16"])
    distill(recipe, tmp_path / "run", progress=False)  # a teacher whose context is 16 tokens
    teacher = tmp_path / "run" / "teacher"
    long = load_recipe("tiny-lm", [*TINY_LM, "data.block_size=64", f"teacher.model_name_or_path={teacher}"])
    with caplog.at_level("WARNING"):
        task = TASKS["causal-lm"](long, progress=False)
    assert "longer than the models' context (16 tokens)" in caplog.text
    assert task.train_set and all(len(e["ids"]) <= 17 for e in task.train_set)  # 16 input positions
    assert len(task.train_set[0]["ids"]) == 17
