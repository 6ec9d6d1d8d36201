"""The training loop, on Hugging Face accelerate.

The engine does not know which flavour it runs: a :class:`~potstill.tasks.Batch` says what the
student and the teacher read, an :class:`~potstill.objective.Objective` says what to compare.
Accelerate handles devices, mixed precision and processes (``accelerate launch`` for DDP/FSDP);
the engine adds gradient accumulation, checkpoints every N optimiser steps, and resume.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from .checkpoint import latest_intact, load_checkpoint, save_checkpoint
from .config import TrainSpec
from .objective import Objective
from .signals import forward_signals, output_head, teacher_signals
from .teachers import CachedTeacher

#: vocabulary size from which fused_loss "auto" computes the logits chunk by chunk
FUSE_FROM_VOCAB = 32_768


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint."""


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """Turn SIGINT/SIGTERM into a request to stop after the current optimiser step.

    A second signal while stopping restores the default behaviour (a second Ctrl-C kills).
    """
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum: int, _frame: Any) -> None:
        requested.set()
        for sig, previous in saved.items():
            signal.signal(sig, previous)
        print(f"\npotstill: {signal.Signals(signum).name} received; finishing the step and "
              "writing a checkpoint", file=sys.stderr)

    saved = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


class EpochSampler(Sampler[int]):
    """A shuffled order that depends only on (seed, epoch), so a resumed run sees the same data.

    With ``lengths``, consecutive ``batch_size`` indices have similar lengths (less padding, as
    Hugging Face's ``group_by_length``): the shuffled order is cut into pools of 50 batches, each
    pool is sorted by length and cut into batches, and the full batches are shuffled (a short
    last batch stays last, so every other batch stays whole).
    """

    POOL = 50

    def __init__(self, size: int, seed: int, shuffle: bool = True, lengths: list[int] | None = None,
                 batch_size: int = 1):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0
        if lengths is not None and len(lengths) != size:
            raise ValueError(f"{len(lengths)} lengths for {size} examples")
        self.lengths, self.batch_size = lengths, batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        if self.lengths is None:
            return iter(order)
        pool, b = self.POOL * self.batch_size, self.batch_size
        batches = []
        for start in range(0, self.size, pool):
            ranked = sorted(order[start:start + pool], key=lambda i: -self.lengths[i])
            batches += [ranked[i:i + b] for i in range(0, len(ranked), b)]
        short = [batches.pop()] if len(batches[-1]) < b else []
        shuffled = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()] + short
        return iter([i for batch in shuffled for i in batch])


def example_length(example: Any) -> int:
    """The length of one training example, for grouping by length: a text's characters, or the
    tokens of an encoded example (``ids`` / ``input_ids``); an (index, example) pair is its example's."""
    if isinstance(example, tuple) and len(example) == 2 and isinstance(example[0], int):
        return example_length(example[1])
    if isinstance(example, str):
        return len(example)
    if isinstance(example, Mapping):
        for key in ("ids", "input_ids"):
            if key in example:
                return len(example[key])
    raise ValueError(f"field 'train.group_by_length': examples of type {type(example).__name__} have no length "
                     "to group by (it works for text and token sequences)")


def make_loader(dataset: Dataset, batch_size: int, collate: Callable[[list[Any]], Any], *,
                seed: int = 0, shuffle: bool = True, group_by_length: bool = False) -> DataLoader:
    """A data loader whose order is reproducible per epoch (see :class:`EpochSampler`)."""
    lengths = [example_length(dataset[i]) for i in range(len(dataset))] if group_by_length else None  # type: ignore[arg-type]
    sampler = EpochSampler(len(dataset), seed, shuffle, lengths, batch_size)  # type: ignore[arg-type]
    # its own generator: creating an iterator must not draw from the global RNG (dropout's)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                      generator=torch.Generator().manual_seed(seed))


def make_optimizer(spec: TrainSpec, parameters: list[nn.Parameter], allow_fused: bool = True) -> torch.optim.Optimizer:
    """AdamW (or SGD) from the train spec. AdamW uses torch's fused kernel where it has one (CPU and
    CUDA floats): the same update, 4-5× faster a step than the per-tensor loop on CPU (BENCHMARKS.md).
    ``allow_fused=False`` under fp16 loss scaling: a fused step skips overflowed updates itself, so
    accelerate cannot see the skip and would advance the learning-rate schedule anyway."""
    if spec.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=spec.learning_rate, momentum=spec.momentum,
                               weight_decay=spec.weight_decay)
    fused = allow_fused and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)
    return torch.optim.AdamW(parameters, lr=spec.learning_rate, weight_decay=spec.weight_decay, fused=fused)


def make_scheduler(spec: TrainSpec, optimizer: torch.optim.Optimizer,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup, kind = spec.warmup_steps, spec.scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class FitResult:
    model: nn.Module
    #: one row per logged step and per epoch: {"stage", "epoch", "step", name: value, ...}
    history: list[dict[str, Any]] = field(default_factory=list)


class Engine:
    """Trains one model with one objective; checkpoints under ``checkpoint_dir``.

    ``evaluate(model) -> dict`` runs at the end of each epoch; ``on_checkpoint(history)`` lets
    the caller persist its logs whenever a checkpoint is written.
    """

    def __init__(self, accelerator: Accelerator, spec: TrainSpec, checkpoint_dir: Path, *,
                 stage: str = "train", log_every: int = 10, progress: bool = True,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 on_checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
                 rollout: Callable[[nn.Module, Any, int], Any] | None = None):
        self.accelerator, self.spec, self.checkpoint_dir = accelerator, spec, Path(checkpoint_dir)
        self.stage, self.log_every, self.progress = stage, log_every, progress
        self.evaluate, self.on_checkpoint = evaluate, on_checkpoint
        #: ``rollout(student, batch, key) -> batch`` may replace a batch's completions with the
        #: student's own generations (on-policy distillation); ``key`` numbers the batch, so a
        #: resumed run draws the same
        self.rollout = rollout

    def fit(self, student: nn.Module, objective: Objective, loader: DataLoader,
            teacher: nn.Module | CachedTeacher | None = None) -> FitResult:
        acc, spec = self.accelerator, self.spec
        if objective.needs_teacher and teacher is None:
            raise ValueError(f"stage {self.stage!r}: the objective compares with a teacher, but none was given")
        if objective.feature_terms and isinstance(teacher, nn.Module):
            self._prepare_projections(student, objective, teacher, loader)
        trainable = [p for p in list(student.parameters()) + list(objective.parameters()) if p.requires_grad]
        if not trainable:
            raise ValueError(f"stage {self.stage!r}: the student has no trainable parameters")
        accum = spec.gradient_accumulation_steps
        steps_per_epoch = math.ceil(len(loader) / accum)
        total_steps = spec.epochs * steps_per_epoch
        optimizer = make_optimizer(spec, trainable, allow_fused=acc.mixed_precision != "fp16")
        scheduler = make_scheduler(spec, optimizer, total_steps)
        sampler = loader.sampler
        # the objective is not wrapped for DDP (it usually has no parameters); its projections'
        # gradients are averaged across processes by hand before each step
        objective = objective.to(acc.device)
        objective_parameters = [p for p in objective.parameters() if p.requires_grad]
        student, optimizer, loader, scheduler = acc.prepare(student, optimizer, loader, scheduler)
        if isinstance(teacher, nn.Module):
            teacher = acc.prepare_model(teacher.requires_grad_(False).eval(), evaluation_mode=True)

        self.fuse = self._fuse(acc.unwrap_model(student) if acc.num_processes == 1 else student, objective, teacher)
        state: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "history": []}
        latest, damaged = latest_intact(self.checkpoint_dir)
        for path in damaged:
            acc.print(f"[{self.stage}] checkpoint {path} is damaged (checksum mismatch): skipped")
        if latest is not None:
            state = load_checkpoint(latest, model=acc.unwrap_model(student), optimizer=optimizer,
                                    scheduler=scheduler, extra=objective)
            acc.print(f"[{self.stage}] resumed from {latest} (epoch {state['epoch'] + 1}, step {state['step']})")
        history: list[dict[str, Any]] = state["history"]

        def checkpoint(epoch: int, batch: int) -> None:
            state.update(epoch=epoch, batch=batch)
            if acc.is_main_process:
                save_checkpoint(self.checkpoint_dir, state["step"], model=acc.unwrap_model(student),
                                optimizer=optimizer, scheduler=scheduler, state=state,
                                extra=objective)
                if self.on_checkpoint:
                    self.on_checkpoint(history)
            acc.wait_for_everyone()

        with stop_on_signals() as stop_requested:
            for epoch in range(state["epoch"], spec.epochs):
                skip = state["batch"] if epoch == state["epoch"] else 0
                batches = acc.skip_first_batches(loader, skip) if skip else loader
                # accelerate's loaders reset the sampler's epoch from their own counter on iteration
                for epoch_aware in (sampler, batches):
                    if hasattr(epoch_aware, "set_epoch"):
                        epoch_aware.set_epoch(epoch)
                student.train()
                started = time.perf_counter()
                running, seen = state.get("running", (0.0, 0)) if skip else (0.0, 0)
                bar = tqdm(total=len(loader), initial=skip, desc=f"{self.stage} epoch {epoch + 1}/{spec.epochs}",
                           disable=not (self.progress and acc.is_local_main_process), leave=False)
                for index, batch in enumerate(batches, start=skip):
                    if self.rollout is not None:
                        batch = self.rollout(acc.unwrap_model(student), batch, epoch * len(loader) + index)
                    out = self._loss(student, objective, teacher, batch, f"epoch {epoch + 1}, batch {index}")
                    acc.backward(out.loss / accum)
                    running, seen = running + out.loss.item(), seen + 1
                    bar.update(1)
                    if (index + 1) % accum and index + 1 != len(loader):
                        continue
                    if acc.num_processes > 1:
                        for p in objective_parameters:
                            if p.grad is not None:
                                p.grad = acc.reduce(p.grad, reduction="mean")
                    if spec.max_grad_norm:
                        acc.clip_grad_norm_(trainable, spec.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    state["step"] += 1
                    if state["step"] % self.log_every == 0:
                        # averaged over processes: the curve of the global batch, the same in every process
                        row = {"stage": self.stage, "epoch": epoch + 1, "step": state["step"],
                               "loss": acc.reduce(out.loss.detach(), "mean").item(),
                               "lr": scheduler.get_last_lr()[0]}
                        row.update({k: acc.reduce(v, "mean").item() for k, v in out.parts.items()})
                        history.append(row)
                        bar.set_postfix(loss=f"{out.loss.item():.4f}")
                    stop = stop_requested.is_set()
                    if acc.num_processes > 1:  # a signal to any process stops all of them after the same step
                        flag = torch.tensor(float(stop), device=acc.device)
                        stop = acc.reduce(flag, reduction="sum").item() > 0
                    if stop or (spec.checkpoint_every and state["step"] % spec.checkpoint_every == 0
                                and index + 1 != len(loader)):
                        state["running"] = (running, seen)
                        checkpoint(epoch, index + 1)
                    if stop:
                        raise Interrupted(f"[{self.stage}] stopped by a signal after step {state['step']}; "
                                          "checkpoint written: rerun the same command to resume")
                bar.close()
                summary = {"stage": self.stage, "epoch": epoch + 1, "step": state["step"],
                           "train_loss": running / max(seen, 1), "seconds": time.perf_counter() - started}
                if self.evaluate:
                    summary.update(self.evaluate(acc.unwrap_model(student)))
                history.append(summary)
                acc.print(f"[{self.stage}] epoch {epoch + 1}/{spec.epochs}  "
                          + "  ".join(f"{k} {_fmt(v)}" for k, v in summary.items()
                                      if k not in ("stage", "epoch")))
                checkpoint(epoch + 1, 0)
        # accelerate's mixed-precision forward off again: after training, both models run as built
        # (float32 evaluation, saving, generation)
        if isinstance(teacher, nn.Module):
            acc.unwrap_model(teacher, keep_fp32_wrapper=False)
        return FitResult(acc.unwrap_model(student, keep_fp32_wrapper=False), history)

    @staticmethod
    def _prepare_projections(student: nn.Module, objective: Objective, teacher: nn.Module,
                             loader: DataLoader) -> None:
        """One batch through both models to size the feature projections (a bad module path fails here)."""
        batch = next(iter(loader))  # the loader's own batch, on the CPU: moved to each model's device
        s_device, t_device = (next(m.parameters()).device for m in (student, teacher))
        # leaves the RNG as it was (the CPU's and the models' GPUs'): resume stays exact
        with torch.random.fork_rng(devices=[d for d in {s_device, t_device} if d.type == "cuda"]), torch.no_grad():
            s = forward_signals(student, batch.to(s_device).student_inputs, objective.student_signals)
            t = teacher_signals(teacher, batch.to(t_device).teacher_inputs, objective.teacher_signals)
        objective.prepare(s, t)

    def _fuse(self, student: nn.Module, objective: Objective, teacher: nn.Module | CachedTeacher | None) -> bool:
        """Whether to hand the loss the student's head inputs instead of its logits (see TrainSpec.fused_loss)."""
        mode = self.spec.fused_loss
        head = output_head(student)
        if mode is False or (mode == "auto" and (head is None or head.out_features < FUSE_FROM_VOCAB
                                                  or not objective.fusable)):
            return False
        if head is None:  # a live or a cached (top-k) teacher both fuse
            raise ValueError(f"[{self.stage}] fused_loss: true needs a Hugging Face LM student trained in one process")
        return True

    def _loss(self, student: nn.Module, objective: Objective, teacher: nn.Module | CachedTeacher | None, batch: Any,
              where: str = ""):
        with self.accelerator.autocast():
            targets = None
            if objective.needs_teacher:
                assert teacher is not None
                try:
                    targets = (teacher.signals(batch) if isinstance(teacher, CachedTeacher)
                               else teacher_signals(teacher, batch.teacher_inputs, objective.teacher_signals,
                                                    fuse_head=self.fuse))
                except FloatingPointError as exc:
                    raise FloatingPointError(f"[{self.stage}] {where}: {exc}; stopping rather than "
                                             "training on it") from None
            signals = forward_signals(student, batch.student_inputs, objective.student_signals, fuse_head=self.fuse)
            return objective(signals, targets, labels=batch.labels, mask=batch.mask, alignment=batch.alignment)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
