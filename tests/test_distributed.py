"""Two CPU processes (gloo DDP through accelerate launch) follow the one-process loss curve."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

OVERRIDES = [
    "data.train_limit=1920",  # a multiple of the global batch: no uneven last batch
    "teacher.hidden_sizes=[64]", "teacher.dropout=0", "teacher.input_dropout=0", "teacher.jitter=0",
    "teacher.train.epochs=2", "teacher.train.batch_size=64", "teacher.train.checkpoint_every=5",
    "student.hidden_sizes=[32]", "train.epochs=2", "baseline=false", "train.checkpoint_every=5",
    "train.mixed_precision=no", "teacher.train.mixed_precision=no",
]


def run(tmp_path, processes: int, per_process_batch: int) -> list[dict[str, str]]:
    out = tmp_path / f"p{processes}"
    args = ["distill", "mnist", "--output-dir", str(out), "--no-progress",
            *[a for o in [*OVERRIDES, f"train.batch_size={per_process_batch}",
                          f"teacher.train.batch_size={per_process_batch}"] for a in ("--set", o)]]
    if processes == 1:
        cmd = [sys.executable, "-m", "potstill", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29533", "-m", "potstill", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # printed by the main process only
    return list(csv.DictReader((out / "log.csv").open()))


@pytest.mark.slow
def test_two_processes_follow_the_one_process_curve(tmp_path):
    one = run(tmp_path, 1, 64)
    two = run(tmp_path, 2, 32)  # the same global batch of 64
    curve = lambda rows: [(r["stage"], r["step"], float(r["loss"])) for r in rows if r.get("loss")]  # noqa: E731
    a, b = curve(one), curve(two)
    assert len(a) == len(b) > 10
    # one writer: every logged step appears once
    assert len({(s, step) for s, step, _ in b}) == len(b)
    for (stage_a, step_a, loss_a), (stage_b, step_b, loss_b) in zip(a, b, strict=True):
        assert (stage_a, step_a) == (stage_b, step_b)
        assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-5)
