"""Two CPU processes (gloo through accelerate launch) follow the one-process loss curve and write its teacher cache."""

from __future__ import annotations

import csv
import json
import os
import shutil
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


def potstill(processes: int, args: list[str], port: int = 29533, config_file=None) -> subprocess.CompletedProcess:
    """``potstill ARGS`` in one process, or under ``accelerate launch`` in several (gloo on CPU)."""
    if processes == 1:
        cmd = [sys.executable, "-m", "potstill", *args]
    else:
        launch = ["--config_file", str(config_file)] if config_file else ["--multi_gpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "potstill", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def run(tmp_path, processes: int, per_process_batch: int) -> list[dict[str, str]]:
    out = tmp_path / f"p{processes}"
    args = ["distill", "mnist", "--output-dir", str(out), "--no-progress",
            *[a for o in [*OVERRIDES, f"train.batch_size={per_process_batch}",
                          f"teacher.train.batch_size={per_process_batch}"] for a in ("--set", o)]]
    done = potstill(processes, args)
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


@pytest.mark.slow
def test_two_processes_write_the_one_process_teacher_cache_and_resume_it(tmp_path):
    overrides = ["data.train_limit=1000", "teacher.hidden_sizes=[32]", "teacher.train.epochs=1",
                 "teacher_cache={top_k: 4, shard_size: 200}"]  # 5 shards: 0, 2, 4 for process 0; 1, 3 for process 1
    cache = lambda out, processes: potstill(processes, ["cache-teacher", "mnist", "--output-dir", str(out),  # noqa: E731
                                                        "--no-progress", *[a for o in overrides for a in ("--set", o)]],
                                            port=29534)
    one, two = tmp_path / "one", tmp_path / "two"
    cache(one, 1)  # trains the teacher and writes the reference cache
    shutil.copytree(one, two, ignore=shutil.ignore_patterns("teacher-cache"))  # the same trained teacher
    done = cache(two, 2)
    assert done.stdout.count("teacher cache:") == 1  # printed by the main process only

    def files(out):
        return {p.name: p.read_bytes() for p in (out / "teacher-cache").iterdir()}

    reference = files(one)
    assert sorted(reference) == ["manifest.json", *(f"shard-0000{i}.safetensors" for i in range(5))]
    assert files(two) == reference  # manifest and shards byte for byte
    # a torn shard of each process and a lost one: rewritten by two processes, the rest kept
    folder = two / "teacher-cache"
    for name in ("shard-00000.safetensors", "shard-00003.safetensors"):
        (folder / name).write_bytes((folder / name).read_bytes()[:100])
    (folder / "shard-00004.safetensors").unlink()
    kept = {n: (folder / n).stat().st_mtime_ns for n in ("shard-00001.safetensors", "shard-00002.safetensors")}
    cache(two, 2)
    assert files(two) == reference
    assert {n: (folder / n).stat().st_mtime_ns for n in kept} == kept


FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
mixed_precision: 'no'
use_cpu: true
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: NO_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


@pytest.mark.slow
def test_an_fsdp_config_on_cpu_processes_says_it_trains_with_ddp(tmp_path):
    """accelerate (1.15) makes FSDP only on accelerators; on CPUs the run is DDP, and potstill says so."""
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    overrides = ["data.train_limit=640", "teacher.hidden_sizes=[16]", "teacher.train.epochs=1",
                 "student.hidden_sizes=[8]", "train.epochs=1", "train.batch_size=64", "baseline=false",
                 "train.mixed_precision=no", "teacher.train.mixed_precision=no"]
    done = potstill(2, ["distill", "mnist", "--output-dir", str(tmp_path / "run"), "--no-progress",
                        *[a for o in overrides for a in ("--set", o)]], port=29535, config_file=config)
    assert ("accelerate runs FSDP on GPUs (or other accelerators) only: these CPU processes train with DDP"
            in done.stderr)
    # both processes trained together: 640 images in global batches of 2 x 64 are 5 optimiser steps
    history = json.loads((tmp_path / "run" / "student" / "history.json").read_text())
    assert history[-1]["step"] == 5


@pytest.mark.slow
def test_two_processes_accumulating_unequal_lengths_follow_the_one_batch_curve(tmp_path):
    """Prompt/completion pairs of unequal lengths: one process with batches of 8, or two processes
    with micro-batches of 2 accumulated twice (the same global batch of 8). Each term is normalised
    by the completion tokens of the whole global batch, so the two curves are the same."""
    import random

    rng = random.Random(0)
    words = "the king speaks and all the lords of the court listen to his words in silence".split()

    def pairs(path, n):
        lines = [json.dumps({"prompt": " ".join(rng.choices(words, k=rng.randint(1, 6))),
                             "completion": " ".join(rng.choices(words, k=rng.randint(1, 14)))}) for _ in range(n)]
        path.write_text("\n".join(lines) + "\n")
        return path

    train, held_out = pairs(tmp_path / "train.jsonl", 96), pairs(tmp_path / "eval.jsonl", 8)
    overrides = [
        f"data={{name: pairs, files: [{train}], eval_files: [{held_out}], extra_eval: {{}}, "
        "tokenizer: {vocab_size: 300}}",
        "teacher.hidden_size=32", "teacher.num_layers=1",
        "teacher.intermediate_size=64", "teacher.train.epochs=2", "student.hidden_size=16", "student.num_layers=1",
        "student.intermediate_size=32", "train.epochs=2", "baseline=false", "train.mixed_precision=no",
        "teacher.train.mixed_precision=no", "train.learning_rate=3e-3", "teacher.train.learning_rate=3e-3",
    ]

    def curve(processes, batch_size, accumulation):
        out = tmp_path / f"p{processes}"
        settings = [*overrides, f"train.batch_size={batch_size}", f"teacher.train.batch_size={batch_size}",
                    f"train.gradient_accumulation_steps={accumulation}",
                    f"teacher.train.gradient_accumulation_steps={accumulation}"]
        potstill(processes, ["distill", "tiny-lm", "--output-dir", str(out), "--no-progress",
                             *[a for o in settings for a in ("--set", o)]], port=29536)
        return [(r["stage"], r["step"], float(r[key])) for r in csv.DictReader((out / "log.csv").open())
                for key in ("loss", "train_loss") if r.get(key)]  # logged steps, and each epoch's mean

    one, two = curve(1, 8, 1), curve(2, 2, 2)
    assert len(one) == len(two) >= 8
    for (stage_a, step_a, loss_a), (stage_b, step_b, loss_b) in zip(one, two, strict=True):
        assert (stage_a, step_a) == (stage_b, step_b)
        assert loss_b == pytest.approx(loss_a, rel=1e-4, abs=1e-5)
