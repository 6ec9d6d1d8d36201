"""End to end on real data (the vendored MNIST): artefacts, learning, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from potstill.cli import main
from potstill.distill import distill
from potstill.models import load_model
from potstill.recipes import load_recipe


def set_args(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def test_distill_writes_every_artefact_and_the_student_learns(tmp_path, tiny_overrides, capsys):
    run_dir = tmp_path / "run"
    assert main(["distill", "mnist", "--output-dir", str(run_dir), "--no-progress", *set_args(tiny_overrides)]) == 0
    table = capsys.readouterr().out
    assert "teacher" in table and "scratch" in table and "student" in table

    for name in ("teacher", "scratch", "student"):
        assert (run_dir / name / "model.safetensors").is_file()
        assert (run_dir / name / "config.json").is_file()
    for name in ("metrics.json", "recipe.yaml", "log.csv", "report.png"):
        assert (run_dir / name).stat().st_size > 0
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    models = metrics["models"]
    # ten balanced classes: chance is 0.1; a student that learned from the teacher is far above
    assert models["student"]["accuracy"] > 0.75
    assert models["student"]["agreement"] > 0.8
    assert models["teacher"]["parameters"] > 3 * models["student"]["parameters"]

    # the saved student reloads (safetensors + config) and gives the same eval accuracy
    student = load_model(run_dir / "student")
    assert set(load_file(run_dir / "student" / "model.safetensors")) == set(student.state_dict())
    recipe = load_recipe(run_dir / "recipe.yaml")
    assert recipe.student.hidden_sizes == [32]

    # a second run with the same recipe loads the finished stages instead of training again
    result = distill(recipe, run_dir, progress=False)
    assert "already trained" in capsys.readouterr().out
    assert result.metrics["models"]["student"]["accuracy"] == models["student"]["accuracy"]


def test_a_different_recipe_in_the_same_run_dir_is_refused(tmp_path, tiny_overrides):
    run_dir = tmp_path / "run"
    recipe = load_recipe("mnist", [*tiny_overrides, "train.epochs=1", "teacher.train.epochs=1", "baseline=false"])
    distill(recipe, run_dir, progress=False)
    other = load_recipe("mnist", [*tiny_overrides, "train.epochs=2", "teacher.train.epochs=1", "baseline=false"])
    with pytest.raises(ValueError, match="different recipe"):
        distill(other, run_dir, progress=False)

    # a run written before a field existed (its default left out of recipe.yaml) is still the same recipe
    saved = run_dir / "recipe.yaml"
    saved.write_text("".join(line for line in saved.read_text().splitlines(keepends=True)
                             if not line.strip().startswith(("eval_every:", "report_to:"))))
    assert "eval_every" not in saved.read_text()
    distill(recipe, run_dir, progress=False)
    assert "eval_every" in saved.read_text()

    saved.write_text("train: [unclosed\n")  # a damaged recipe.yaml is refused with the same clear error
    with pytest.raises(ValueError, match="different recipe"):
        distill(recipe, run_dir, progress=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, tiny_overrides, sig):
    """A kill (or SIGTERM) in the middle of the student stage; the same command then finishes the run."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "potstill", "distill", "mnist", "--output-dir", str(run_dir),
            "--no-progress", *set_args([*tiny_overrides, "train.epochs=40", "baseline=false"])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = run_dir / "checkpoints" / "student"
    deadline = time.time() + 120
    while time.time() < deadline and not any(checkpoints.glob("step-*")):
        assert proc.poll() is None, proc.stdout.read().decode()
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    output = proc.communicate(timeout=60)[0].decode()
    if sig == signal.SIGTERM:  # finishes the step, writes a checkpoint, exits with a message
        assert proc.returncode == 128 + sig, output  # 143 for SIGTERM: what schedulers read as terminated
        assert "checkpoint written" in output
    assert not (run_dir / "student").exists(), "the run finished before it could be killed"
    steps = sorted(checkpoints.glob("step-*"))
    assert steps, "no checkpoint was written"

    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[teacher] already trained" in done.stdout
    assert "[student] resumed from" in done.stdout
    resumed_step = int(done.stdout.split("[student] resumed from")[1].split("step ")[1].split(")")[0])
    assert resumed_step >= int(steps[0].name.split("-")[1])
    assert (run_dir / "student" / "model.safetensors").is_file()
    assert (run_dir / "report.png").is_file()
    assert not checkpoints.exists()  # cleaned up once the stage finished
    if sig == signal.SIGKILL:  # on CPU, the resumed run ends with the uninterrupted run's weights
        whole = tmp_path / "uninterrupted"
        args[args.index(str(run_dir))] = str(whole)
        assert subprocess.run(args, env=env, capture_output=True, timeout=300).returncode == 0
        resumed, reference = (load_file(d / "student" / "model.safetensors") for d in (run_dir, whole))
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_runs_of_different_precision_follow_each_other_in_one_process(tmp_path, tiny_overrides):
    # accelerate keeps one state per process: without a reset, a run after one with another
    # mixed_precision is refused (on a GPU, any bf16 run followed by a float32 one)
    from accelerate import Accelerator

    Accelerator(mixed_precision="bf16", cpu=True)
    overrides = [*tiny_overrides, "train.mixed_precision=no", "teacher.train.mixed_precision=no",
                 "baseline=false", "teacher.train.epochs=1", "train.epochs=1"]
    result = distill(load_recipe("mnist", overrides), tmp_path / "run", progress=False)
    assert result.metrics["models"]["student"]["accuracy"] > 0.5
