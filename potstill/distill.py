"""A whole run from a recipe: teacher (loaded or trained), scratch baseline, distilled student.

The run directory holds everything a person or a later run needs::

    recipe.yaml          the resolved recipe (a rerun with another recipe is refused)
    teacher/ scratch/ student/   models (safetensors + config) and their training history
    checkpoints/<stage>/step-N   resumable state of the stage in progress
    log.csv  metrics.json  report.png

Rerunning the same command after a kill resumes: finished stages are loaded, the stage in
progress continues from its last checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn

from .config import CacheSpec, Recipe, RecipeError, TrainSpec, dump_recipe
from .engine import Engine, make_loader
from .io import atomic_path, write_json, write_text
from .models import load_model, save_model
from .objective import Objective, Term
from .tasks import TASKS, Task
from .teachers import CachedTeacher, CacheInfo, IndexedDataset, indexed_collate, write_cache

HISTORY = "history.json"


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]

    def table(self) -> str:
        """The comparison table printed at the end of a run: parameters, then the task's headline metrics."""
        models = self.metrics["models"]
        columns = ["parameters", *self.metrics.get("headline", [])]
        columns += [k for k in dict.fromkeys(k for m in models.values() for k in m)
                    if k not in columns and not isinstance(next(iter(models.values())).get(k), dict)]
        rows = [["model", *columns]]
        for name, m in models.items():
            rows.append([name, *(_cell(m.get(c)) for c in columns)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _accelerator(recipe: Recipe) -> Accelerator:
    precision = recipe.train.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # several processes and no GPU (torchrun / accelerate launch on CPUs): accelerate's gloo DDP
    # needs to be told it is on CPU, or each process would train alone
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes == 1:
        # accelerate keeps one state per process and refuses a second Accelerator with another precision
        # or device (on a GPU: any run after one with another mixed_precision); in one process each run
        # may set its own
        AcceleratorState._reset_state(reset_partial_state=True)
    multi_cpu = not torch.cuda.is_available() and processes > 1
    if multi_cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        # accelerate (1.15) turns an FSDP config into FSDP only on GPUs and other accelerators; on CPU
        # processes it silently runs DDP (docs/scaling.md): say so, rather than let "FSDP" mislead
        warnings.warn("accelerate runs FSDP on GPUs (or other accelerators) only: these CPU processes train with "
                      "DDP, each holding the whole student and teacher", stacklevel=2)
    return Accelerator(mixed_precision=precision, cpu=multi_cpu)


def prepare_run_dir(recipe: Recipe, run_dir: Path, overwrite: bool) -> None:
    """Create the run dir, or check that an existing one was made by the same recipe."""
    saved = run_dir / "recipe.yaml"
    text = dump_recipe(recipe)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if saved.is_file() and saved.read_text() != text:
        raise RecipeError(
            f"{run_dir} holds a run of a different recipe (see {saved}); resume it with that "
            "recipe, choose another output_dir, or pass --overwrite to start again"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(saved, text)


class Run:
    """Stages of one distillation run, sharing a run dir, a task and an accelerator."""

    def __init__(self, recipe: Recipe, run_dir: Path, progress: bool = True):
        self.recipe, self.run_dir, self.progress = recipe, run_dir, progress
        self.accelerator = _accelerator(recipe)
        self.task: Task = TASKS[recipe.task](recipe, progress=progress)
        self.history: list[dict[str, Any]] = []

    @classmethod
    def open(cls, recipe: Recipe, output_dir: str | Path | None, overwrite: bool, progress: bool) -> Run:
        run = cls(recipe, Path(output_dir or recipe.output_dir), progress)
        if run.accelerator.is_main_process:
            prepare_run_dir(recipe, run.run_dir, overwrite)
        run.accelerator.wait_for_everyone()
        return run

    def teacher(self) -> nn.Module:
        """The recipe's teacher: loaded if it names one, else trained (or resumed, or reloaded)."""
        spec = self.recipe.teacher
        if spec.model_name_or_path:
            return self.task.build_model(spec)
        return self.stage("teacher", spec, Objective.supervised(), spec.train, self.task.train_set,
                          collate=self.task.training_collate(spec))

    def cache(self, teacher: nn.Module, spec: CacheSpec) -> CacheInfo:
        """Write (or finish, or check) the teacher cache over the transfer set."""
        folder = Path(spec.path) if spec.path else self.run_dir / "teacher-cache"
        # every process writes its share of the shards, each on its own device
        info = write_cache(folder, teacher.to(self.accelerator.device), self.task.transfer_set, self.task.collate,
                           top_k_size=spec.top_k, temperature=self.recipe.distillation.temperature,
                           dtype=spec.dtype, shard_size=spec.shard_size, progress=self.progress,
                           identity={"teacher_name": self.recipe.teacher.model_name_or_path or "trained"},
                           processes=self.accelerator, vocab_size=getattr(self.task, "shared_vocab_size", None))
        self.accelerator.print(f"[cache] {folder}: {info.manifest['positions']:,} positions, "
                               f"{info.bytes_per_position:.0f} bytes per position (top-{spec.top_k}, {spec.dtype})")
        return info

    def write_log(self, current: Sequence[dict[str, Any]] = ()) -> None:
        if not self.accelerator.is_main_process:
            return
        rows = self.history + list(current)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
        write_text(self.run_dir / "log.csv", buffer.getvalue())

    def stage(self, name: str, model_spec: Any, objective: Objective, spec: TrainSpec, dataset: Any,
              teacher: nn.Module | CachedTeacher | None = None, collate: Any = None,
              rollout: Any = None) -> nn.Module:
        """Train (or resume, or load if finished) one model of ``model_spec`` and save it under ``run_dir/name``."""
        folder = self.run_dir / name
        if (folder / HISTORY).is_file():
            self.history += json.loads((folder / HISTORY).read_text())
            self.accelerator.print(f"[{name}] already trained: loading {folder}")
            return self.task.load_model(folder) if hasattr(self.task, "load_model") else load_model(folder)
        set_seed(spec.seed)  # the scratch and the distilled student start from the same weights
        build = self.task.build_model(model_spec)
        loader = make_loader(dataset, spec.batch_size, collate or self.task.collate, seed=spec.seed,
                             group_by_length=spec.group_by_length)
        engine = Engine(self.accelerator, spec, self.run_dir / "checkpoints" / name, stage=name,
                        progress=self.progress, evaluate=self.task.evaluate,
                        on_checkpoint=self.write_log, rollout=rollout)
        result = engine.fit(build, objective, loader, teacher=teacher)
        if self.accelerator.is_main_process:
            with atomic_path(folder) as tmp:
                save_model(result.model, tmp)
                if hasattr(self.task, "save_extras"):
                    self.task.save_extras(tmp)
                write_json(tmp / HISTORY, result.history)
            shutil.rmtree(self.run_dir / "checkpoints" / name, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.history += result.history
        self.write_log()
        return result.model


def distill(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool = False,
            progress: bool = True) -> RunResult:
    """Run ``recipe``: teacher, scratch student (if ``baseline``), distilled student, report."""
    run = Run.open(recipe, output_dir, overwrite, progress)
    task, r = run.task, recipe
    # on the training device before anything uses it (the teacher's generations for sequence-level KD)
    teacher = run.teacher().to(run.accelerator.device)
    models: dict[str, nn.Module] = {"teacher": teacher}
    if r.baseline:
        models["scratch"] = run.stage("scratch", r.student, Objective.supervised(), r.train, task.transfer_set)
    features = [Term(f.loss, f.weight, student=f.student, teacher=f.teacher) for f in r.distillation.features]
    objective = Objective.hinton(r.distillation.alpha, r.distillation.temperature, r.distillation.loss,
                                 sparse_leftover=r.teacher_cache.leftover if r.teacher_cache else "bucket",
                                 features=features, vocab_size=getattr(task, "shared_vocab_size", None),
                                 **r.distillation.params)
    # optional task hooks: the examples to distil on (e.g. the teacher's own generations), and an
    # on-policy rollout that lets the student write a batch's completions
    dataset = task.distillation_set(teacher, run.run_dir) if hasattr(task, "distillation_set") else task.transfer_set
    rollout = task.rollout(r.train.seed) if hasattr(task, "rollout") else None
    if r.teacher_cache:
        cached = CachedTeacher(run.cache(teacher, r.teacher_cache).folder)
        models["student"] = run.stage("student", r.student, objective, r.train, IndexedDataset(dataset),
                                      teacher=cached, collate=indexed_collate(task.collate))
    else:
        models["student"] = run.stage("student", r.student, objective, r.train, dataset,
                                      teacher=teacher, rollout=rollout)

    metrics = task.compare(models)
    metrics["distillation"] = r.distillation.model_dump()
    result = RunResult(run.run_dir, metrics)
    if run.accelerator.is_main_process:
        write_json(run.run_dir / "metrics.json", metrics)
        from .report import write_report

        write_report(run.run_dir)
    return result


def cache_teacher(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool = False,
                  progress: bool = True) -> CacheInfo:
    """Only the teacher (loaded or trained) and its top-k cache (``recipe.teacher_cache``, or its defaults)."""
    run = Run.open(recipe, output_dir, overwrite, progress)
    return run.cache(run.teacher(), recipe.teacher_cache or CacheSpec())
