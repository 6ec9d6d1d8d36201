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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import nn

from .config import CacheSpec, Recipe, RecipeError, TrainSpec, dump_recipe, parse_yaml
from .engine import Engine, PrepareBatch, make_loader
from .io import atomic_path, write_json, write_text
from .model_card import write_model_card
from .models import save_model
from .objective import Objective
from .recipes import parse_recipe
from .report import write_report
from .tasks import TASKS, Task
from .tasks.base import BATCH_SEED_STRIDE, BatchTransform, Rollout
from .teachers import CachedTeacher, CacheInfo, IndexedDataset, indexed_collate, write_cache

HISTORY = "history.json"
RECIPE = "recipe.yaml"
#: the first file of every run directory: what lets ``--overwrite`` know the folder is potstill's
RUN_MARKER = ".potstill-run"
#: what a run directory holds (for run directories made before the marker existed)
RUN_ENTRIES = {RECIPE, RUN_MARKER, "teacher", "scratch", "student", "checkpoints", "teacher-cache",
               "teacher-generations.json", "log.csv", "metrics.json", "report.png", "trackers"}


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


def _accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
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
    return Accelerator(mixed_precision=precision, cpu=multi_cpu, log_with=recipe.train.report_to or None,
                       project_dir=run_dir)


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested recipe as ``section.field`` → scalar (trackers such as TensorBoard's hparams take scalars)."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _numbers(row: dict[str, Any], prefix: str) -> dict[str, float]:
    return {f"{prefix}{k}": v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` is a run directory potstill made: it holds :data:`RUN_MARKER` (or, from
    before the marker, nothing but what runs write, with a resolved ``recipe.yaml``: every section
    written out, as no hand-written recipe is)."""
    if (folder / RUN_MARKER).is_file():
        return True
    entries = {p.name for p in folder.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    if RECIPE not in entries or not entries <= RUN_ENTRIES:
        return False
    try:
        saved = parse_yaml((folder / RECIPE).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and set(Recipe.model_fields) | {"data", "teacher", "student"} <= set(saved)


def _same_recipe(saved: str, text: str) -> bool:
    """Whether a run's saved recipe is ``text``'s, read with today's defaults: a field added in a later
    version of potstill (written out with its default) does not stop an older run from resuming."""
    if saved == text:
        return True
    try:
        return dump_recipe(parse_recipe(parse_yaml(saved))) == text
    except (ValueError, yaml.YAMLError):  # unreadable: the caller's "different recipe" error says where to look
        return False


def prepare_run_dir(recipe: Recipe, run_dir: Path, overwrite: bool) -> bool:
    """Create the run dir, or check that an existing one is a run of the same recipe; True if created.

    Only a run directory (or an empty folder) is ever deleted by ``overwrite`` or written into:
    potstill never deletes or overwrites files it did not write.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"output dir {run_dir} is a file, not a folder: choose another --output-dir")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise RecipeError(
            f"output dir {run_dir} holds files that are not a potstill run (no {RUN_MARKER} in it); potstill "
            f"{'deletes' if overwrite else 'writes into'} only its own run folders: choose a new or empty --output-dir"
        )
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    saved = run_dir / RECIPE
    text = dump_recipe(recipe)
    if saved.is_file() and not _same_recipe(saved.read_text(), text):
        raise RecipeError(
            f"{run_dir} holds a run of a different recipe (see {saved}); resume it with that "
            "recipe, choose another output_dir, or pass --overwrite to start again"
        )
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / RUN_MARKER, "a potstill run directory: `potstill distill --overwrite` may delete it\n")
    write_text(saved, text)
    return created


def _batch_preparation(transform: BatchTransform | None, rollout: Rollout | None, seed: int) -> PrepareBatch | None:
    """The engine's ``prepare_batch``: the task's batch-time randomness, drawn from a generator seeded
    by (seed, batch number) so a resumed run draws the same, then the on-policy rollout."""
    if transform is None and rollout is None:
        return None

    def prepare(student: nn.Module, batch: Any, key: int) -> Any:
        if transform is not None:
            batch = transform(batch, torch.Generator().manual_seed(seed * BATCH_SEED_STRIDE + key))
        return rollout(student, batch, key) if rollout is not None else batch

    return prepare


class Run:
    """Stages of one distillation run, sharing a run dir, a task and an accelerator."""

    def __init__(self, recipe: Recipe, run_dir: Path, progress: bool = True):
        self.recipe, self.run_dir, self.progress = recipe, run_dir, progress
        self.accelerator = _accelerator(recipe, run_dir)
        self.task: Task = TASKS[recipe.task](recipe, progress=progress)
        self.history: list[dict[str, Any]] = []
        #: whether this run made its directory (a failure before anything else is written removes it)
        self.created = False

    @classmethod
    def open(cls, recipe: Recipe, output_dir: str | Path | None, overwrite: bool, progress: bool) -> Run:
        run = cls(recipe, Path(output_dir or recipe.output_dir), progress)
        if run.accelerator.is_main_process:
            run.created = prepare_run_dir(recipe, run.run_dir, overwrite)
        run.accelerator.wait_for_everyone()
        run.task.run_dir = run.run_dir
        if recipe.train.report_to:  # logs under <run dir>/trackers
            run.accelerator.init_trackers("trackers", config=_flat(recipe.model_dump(mode="json")))
        return run

    @contextmanager
    def cleaning_up(self) -> Iterator[Run]:
        """On failure, remove the run directory this run made if it still holds only its recipe."""
        try:
            yield self
        except BaseException:
            leftovers = {p.name for p in self.run_dir.iterdir()} if self.run_dir.is_dir() else set()
            if self.created and self.accelerator.is_main_process and leftovers <= {RECIPE, RUN_MARKER}:
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise

    def teacher(self) -> nn.Module:
        """The recipe's teacher: loaded as it is, or trained (or resumed, or reloaded): the task says which."""
        spec = self.recipe.teacher
        if not self.task.trains_teacher():
            return self.task.build_model(spec)
        return self.stage("teacher", spec, Objective.supervised(), spec.train, self.task.train_set)

    def cache(self, teacher: nn.Module, spec: CacheSpec) -> CacheInfo:
        """Write (or finish, or check) the teacher cache over the transfer set."""
        folder = Path(spec.path) if spec.path else self.run_dir / "teacher-cache"
        # every process writes its share of the shards, each on its own device
        info = write_cache(folder, teacher.to(self.accelerator.device), self.task.transfer_set, self.task.collate,
                           top_k_size=spec.top_k, temperature=self.recipe.distillation.temperature,
                           dtype=spec.dtype, shard_size=spec.shard_size, progress=self.progress,
                           identity={"teacher_name": self.recipe.teacher.model_name_or_path or "trained"},
                           processes=self.accelerator, vocab_size=self.task.shared_vocab_size)
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
              rollout: Rollout | None = None) -> nn.Module:
        """Train (or resume, or load if finished) one model of ``model_spec`` and save it under ``run_dir/name``."""
        folder = self.run_dir / name
        if (folder / HISTORY).is_file():
            self.history += json.loads((folder / HISTORY).read_text())
            self.accelerator.print(f"[{name}] already trained: loading {folder}")
            return self.task.load_model(folder)
        set_seed(spec.seed)  # the scratch and the distilled student start from the same weights
        build = self.task.build_model(model_spec)
        loader = make_loader(dataset, spec.batch_size, collate or self.task.collate, seed=spec.seed,
                             group_by_length=spec.group_by_length)
        engine = Engine(self.accelerator, spec, self.run_dir / "checkpoints" / name, stage=name,
                        progress=self.progress, evaluate=self.task.evaluate, on_checkpoint=self.write_log,
                        prepare_batch=_batch_preparation(self.task.batch_transform(model_spec), rollout, spec.seed))
        result = engine.fit(build, objective, loader, teacher=teacher)
        if self.accelerator.is_main_process:
            with atomic_path(folder) as tmp:
                save_model(result.model, tmp)
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
    with run.cleaning_up():
        return _distill(run)


def _distill(run: Run) -> RunResult:
    task, r = run.task, run.recipe
    # on the training device before anything uses it (the teacher's generations for sequence-level KD)
    teacher = run.teacher().to(run.accelerator.device)
    task.teacher = teacher  # the students' evaluations compare with it; students are cut from it
    models: dict[str, nn.Module] = {"teacher": teacher}
    if r.baseline:
        models["scratch"] = run.stage("scratch", r.student, Objective.supervised(), r.train, task.transfer_set)
    objective = task.objective()
    # the examples to distil on (e.g. the teacher's own generations), and an on-policy rollout
    # that lets the student write a batch's completions
    dataset = task.distillation_set(teacher, run.run_dir)
    rollout = task.rollout(r.train.seed)
    if r.teacher_cache:
        cached = CachedTeacher(run.cache(teacher, r.teacher_cache).folder)
        models["student"] = run.stage("student", r.student, objective, r.train, IndexedDataset(dataset),
                                      teacher=cached, collate=indexed_collate(task.collate))
    else:
        models["student"] = run.stage("student", r.student, objective, r.train, dataset,
                                      teacher=teacher, rollout=rollout)

    metrics = task.compare(models)
    metrics["distillation"] = r.distillation.model_dump()
    for name, values in metrics["models"].items():
        run.accelerator.log(_numbers(values, f"final/{name}/"))
    run.accelerator.end_training()
    result = RunResult(run.run_dir, metrics)
    if run.accelerator.is_main_process:
        write_json(run.run_dir / "metrics.json", metrics)
        for name in models:  # every model folder this run trained is ready for the hub
            if (run.run_dir / name).is_dir():
                write_model_card(run.run_dir / name, name=name, recipe=r, metrics=metrics, run_dir=run.run_dir)
        write_report(run.run_dir)
    return result


def cache_teacher(recipe: Recipe, output_dir: str | Path | None = None, *, overwrite: bool = False,
                  progress: bool = True) -> CacheInfo:
    """Only the teacher (loaded or trained) and its top-k cache (``recipe.teacher_cache``, or its defaults)."""
    run = Run.open(recipe, output_dir, overwrite, progress)
    with run.cleaning_up():
        return run.cache(run.teacher(), recipe.teacher_cache or CacheSpec())
