"""Bad input gets a clear error that names what is wrong, and nothing is lost."""

from __future__ import annotations

import pytest
import torch

from potstill.cli import main
from potstill.distill import distill
from potstill.recipes import load_recipe
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


# ----- issue 25: nothing lost, every resume identical, every bad input named -------------------------


def test_overwrite_deletes_only_a_run_directory_never_a_folder_of_user_files(tmp_path, capsys, tiny_overrides):
    precious = tmp_path / "x"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("keep")
    err = error_output(capsys, ["distill", "mnist", "--output-dir", str(precious), "--overwrite"])
    assert str(precious) in err and "not a potstill run" in err
    assert (precious / "notes.txt").read_text() == "keep" and (precious / "sub").is_dir()
    # without --overwrite potstill does not write into it either (it would replace a recipe.yaml there)
    assert "not a potstill run" in error_output(capsys, ["distill", "mnist", "--output-dir", str(precious)])
    assert sorted(p.name for p in precious.iterdir()) == ["notes.txt", "sub"]
    # a run directory is potstill's: --overwrite starts it again; an empty folder is fine too
    run = tmp_path / "run"
    args = ["distill", "mnist", "--output-dir", str(run), "--no-progress",
            *[a for o in [*tiny_overrides, "baseline=false", "teacher.train.epochs=1", "train.epochs=1"]
              for a in ("--set", o)]]
    assert main(args) == 0
    (run / "student" / "stale").write_text("from the first run")
    assert main([*args, "--overwrite"]) == 0 and not (run / "student" / "stale").exists()
    (tmp_path / "empty").mkdir()
    assert main([*args[:3], str(tmp_path / "empty"), *args[4:], "--overwrite"]) == 0


def test_an_output_dir_that_is_a_file_is_named(tmp_path, capsys):
    path = tmp_path / "out"
    path.write_text("a file")
    assert "is a file, not a folder" in error_output(capsys, ["distill", "mnist", "--output-dir", str(path)])
    assert path.read_text() == "a file"


class Killed(RuntimeError):
    """Stands for a kill right after a checkpoint (the next run resumes from it)."""


def _run_killed_at(monkeypatch, recipe, run_dir, stage: str):
    """Run ``recipe``, killed just after the first mid-epoch checkpoint of ``stage``; then resume it."""
    from potstill.engine import Engine

    original = Engine._checkpoint

    def checkpoint(self, run, epoch, batch):
        original(self, run, epoch, batch)
        if self.stage == stage and batch != 0:
            raise Killed(f"{stage}, epoch {epoch + 1}, after batch {batch}")

    with monkeypatch.context() as patched:
        patched.setattr(Engine, "_checkpoint", checkpoint)
        with pytest.raises(Killed):
            distill(recipe, run_dir, progress=False)
    assert any((run_dir / "checkpoints" / stage).glob("step-*"))
    return distill(recipe, run_dir, progress=False)


def _same_weights(a, b, stages):
    from safetensors.torch import load_file

    for stage in stages:
        left, right = (load_file(d / stage / "model.safetensors") for d in (a, b))
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left), f"{stage} differs after the resume"


@pytest.mark.parametrize("stage", ["teacher", "scratch", "student"])
def test_a_mid_epoch_resume_of_any_stage_gives_the_uninterrupted_weights_mnist(tmp_path, monkeypatch, stage,
                                                                                 tiny_overrides):
    """Dropout in every stage, and image jitter in the teacher's: the resumed run draws the same."""
    recipe = load_recipe("mnist", [*tiny_overrides, "teacher.jitter=2", "teacher.input_dropout=0.1",
                                   "student.dropout=0.1", "teacher.train.checkpoint_every=7",
                                   "train.checkpoint_every=7", "teacher.train.epochs=2", "train.epochs=2"])
    distill(recipe, tmp_path / "whole", progress=False)
    _run_killed_at(monkeypatch, recipe, tmp_path / "resumed", stage)
    _same_weights(tmp_path / "whole", tmp_path / "resumed", ["teacher", "scratch", "student"])


def test_a_mid_epoch_resume_of_on_policy_distillation_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    recipe = load_recipe("tiny-lm", [*TINY_LM, "generation.on_policy=0.5", "generation.max_new_tokens=4",
                                     "train.epochs=2", "train.checkpoint_every=2", "train.batch_size=4"])
    distill(recipe, tmp_path / "whole", progress=False)
    _run_killed_at(monkeypatch, recipe, tmp_path / "resumed", "student")
    _same_weights(tmp_path / "whole", tmp_path / "resumed", ["teacher", "student"])


def test_binary_files_are_refused_as_text_and_latin1_is_said(tmp_path, capsys):
    binary = tmp_path / "ls.bin"
    binary.write_bytes(bytes(range(256)) * 40)
    err = error_output(capsys, ["distill", "tiny-lm", "--output-dir", str(tmp_path / "a"),
                                "--set", f"data.files=[{binary}]"])
    assert str(binary) in err and "not a text file" in err
    controls = tmp_path / "controls.txt"  # no NUL, but mostly control bytes
    controls.write_bytes(b"\x01\x02\x03\x04abc" * 100)
    assert "control characters" in error_output(capsys, ["distill", "tiny-lm", "--set", f"data.files=[{controls}]"])
    old = tmp_path / "old.txt"
    old.write_bytes("Café, naïve résumé. ".encode("latin-1") * 50)
    # the run stops at the (missing) teacher, after the text was read: the Latin-1 line reached the console
    err = error_output(capsys, ["distill", "tiny-lm", "--output-dir", str(tmp_path / "b"), "--set",
                                f"data.files=[{old}]", "--set", f"teacher.model_name_or_path={tmp_path / 'none'}"])
    assert f"potstill: {old} is not UTF-8; reading it as Latin-1" in err


@pytest.mark.parametrize(("content", "expected"), [
    ("", "is empty"), ("# only a comment\n", "is empty"), ("train: {epochs: 2}\n", "field 'task' is missing"),
    ("- a\n- list\n", "must be a mapping"),
])
def test_an_empty_recipe_or_one_without_task_says_what_a_recipe_needs(tmp_path, capsys, content, expected):
    path = tmp_path / "recipe.yaml"
    path.write_text(content)
    err = error_output(capsys, ["distill", str(path), "--output-dir", str(tmp_path / "run")])
    assert expected in err and "task" in err and "image-classification" in err
    assert not (tmp_path / "run").exists()


def test_recipe_paths_that_are_folders_misspelt_names_or_not_utf8_are_named(tmp_path, capsys):
    assert "is a directory" in error_output(capsys, ["distill", str(tmp_path)])
    assert "Did you mean 'mnist'?" in error_output(capsys, ["distill", "minst"])
    bad = tmp_path / "r.yaml"
    bad.write_bytes(b"task: image-classification\n# caf\xe9\n")
    err = error_output(capsys, ["distill", str(bad)])
    assert str(bad) in err and "not UTF-8" in err


def test_a_teacher_that_is_no_folder_fails_at_once_with_what_was_tried(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    from potstill.pretrained import resolve

    def unreachable(*args, **kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "model_info", unreachable)
    with pytest.raises(OSError, match="no local folder 'someorg/no-model' exists, and the Hugging Face hub could not "
                                      "be reached"):
        resolve("someorg/no-model")
    with pytest.raises(OSError, match=r"no local folder '\./runs/none' exists"):
        resolve("./runs/none")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="hub lookups are off"):
        resolve("someorg/no-model")
    # the MNIST MLP teacher is a potstill folder or nothing: never looked up on the hub
    monkeypatch.setattr(huggingface_hub, "model_info", lambda *a, **k: pytest.fail("looked up on the hub"))
    err = error_output(capsys, ["distill", "mnist", "--output-dir", str(tmp_path / "run"),
                                "--set", "teacher.model_name_or_path=someorg/mlp"])
    assert "'teacher.model_name_or_path': someorg/mlp is not a model folder" in err
    # the run failed before writing anything but its recipe: its folder is gone again
    assert not (tmp_path / "run").exists()


def test_a_damaged_cache_shard_is_named_when_it_is_written_again(tmp_path, caplog):
    from potstill.distill import cache_teacher

    recipe = load_recipe("tiny-lm", [*TINY_LM, "teacher_cache={top_k: 4, shard_size: 16}"])
    folder = cache_teacher(recipe, tmp_path / "run", progress=False).folder
    shard = folder / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    (folder / "shard-00002.safetensors").unlink()
    with caplog.at_level("WARNING", logger="potstill"):
        cache_teacher(recipe, tmp_path / "run", progress=False)
    assert "shard-00001.safetensors does not match its recorded checksum (damaged); writing it again" in caplog.text
    assert "shard-00002.safetensors is missing; writing it again" in caplog.text


def test_exported_models_have_the_users_usual_permissions(tmp_path):
    import os

    from potstill.models import MLP, save_model

    mask = os.umask(0o022)
    try:
        save_model(MLP(4, 2, [3]), tmp_path / "m")
    finally:
        os.umask(mask)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "m").iterdir()} == {
        "model.safetensors": "0o644", "config.json": "0o644"}
    assert oct((tmp_path / "m").stat().st_mode & 0o777) == "0o755"
