"""The training loop, on Hugging Face accelerate.

The engine does not know which flavour it runs: a :class:`~potstill.tasks.Batch` says what the
student and the teacher read, an :class:`~potstill.objective.Objective` says what to compare.
Accelerate handles devices, mixed precision and processes (``accelerate launch`` for DDP/FSDP);
the engine adds gradient accumulation (each term normalised by what it counts in the whole
accumulated batch), checkpoints every N optimiser steps, and resume.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from .checkpoint import latest_intact, load_checkpoint, save_checkpoint
from .config import TrainSpec
from .objective import Objective, ObjectiveOutput
from .progress import progress
from .signals import forward_signals, output_head, teacher_signals
from .teachers import CachedTeacher

#: vocabulary size from which fused_loss "auto" computes the logits chunk by chunk
FUSE_FROM_VOCAB = 32_768


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = signum


class StopRequest(threading.Event):
    """Set by a signal; ``signum`` says which."""

    signum: int = signal.SIGINT


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turn SIGINT/SIGTERM into a request to stop after the current optimiser step.

    A second signal while stopping restores the default behaviour (a second Ctrl-C kills).
    """
    requested = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum: int, _frame: Any) -> None:
        requested.signum = signum
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


def make_scheduler(spec: TrainSpec, optimizer: torch.optim.Optimizer, total_steps: int,
                   calls_per_step: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up then constant / linear / cosine decay, in optimiser steps (``warmup_steps``, ``total_steps``).

    ``calls_per_step``: how many times the schedule is stepped per optimiser step — accelerate steps a
    prepared schedule once per process, so under N processes the same schedule stays one of optimiser
    steps (and a run's learning rates do not depend on how many processes share its batches).
    """
    warmup, kind = spec.warmup_steps, spec.scheduler

    def factor(call: int) -> float:
        step = call // calls_per_step
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


#: a hook that may replace a training batch before the loss: ``prepare_batch(student, batch, key)``
#: (batch-time augmentation or masking, an on-policy rollout); ``key`` numbers the batch in the run,
#: so a resumed run prepares the same
PrepareBatch = Callable[[nn.Module, Any, int], Any]


@dataclass
class _Fit:
    """One ``fit()`` call: its prepared models, optimiser and schedule, and the trainer state that
    checkpoints carry (epoch, batch within it, optimiser step, history)."""

    student: nn.Module
    objective: Objective
    loader: DataLoader
    sampler: Any
    teacher: nn.Module | CachedTeacher | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    trainable: list[nn.Parameter]
    fuse: bool
    state: dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "batch": 0, "step": 0, "history": []})


class Engine:
    """Trains one model with one objective; checkpoints under ``checkpoint_dir``.

    ``evaluate(model) -> dict`` runs at the end of each epoch; ``on_checkpoint(history)`` lets
    the caller persist its logs whenever a checkpoint is written; ``prepare_batch`` (see
    :data:`PrepareBatch`) may replace each training batch before the loss.
    """

    def __init__(self, accelerator: Accelerator, spec: TrainSpec, checkpoint_dir: Path, *,
                 stage: str = "train", log_every: int = 10, progress: bool = True,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 on_checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
                 prepare_batch: PrepareBatch | None = None):
        self.accelerator, self.spec, self.checkpoint_dir = accelerator, spec, Path(checkpoint_dir)
        self.stage, self.log_every, self.progress = stage, log_every, progress
        self.evaluate, self.on_checkpoint, self.prepare_batch = evaluate, on_checkpoint, prepare_batch

    def fit(self, student: nn.Module, objective: Objective, loader: DataLoader,
            teacher: nn.Module | CachedTeacher | None = None) -> FitResult:
        """Train ``student`` with ``objective`` (against ``teacher``) for the spec's epochs, resuming
        from the newest intact checkpoint; SIGINT/SIGTERM stop after a step with a checkpoint."""
        run = self._set_up(student, objective, loader, teacher)
        self._restore(run)
        with stop_on_signals() as stop_requested:
            for epoch in range(run.state["epoch"], self.spec.epochs):
                self._train_epoch(run, epoch, stop_requested)
        # accelerate's mixed-precision forward off again: after training, both models run as built
        # (float32 evaluation, saving, generation)
        if isinstance(run.teacher, nn.Module):
            self.accelerator.unwrap_model(run.teacher, keep_fp32_wrapper=False)
        return FitResult(self.accelerator.unwrap_model(run.student, keep_fp32_wrapper=False), run.state["history"])

    # ----- set-up and restore ------------------------------------------------------------------

    def _set_up(self, student: nn.Module, objective: Objective, loader: DataLoader,
                teacher: nn.Module | CachedTeacher | None) -> _Fit:
        """Check the pieces, size the feature projections, build the optimiser and schedule, and
        hand everything to accelerate (devices, mixed precision, DDP)."""
        acc, spec = self.accelerator, self.spec
        if objective.needs_teacher and teacher is None:
            raise ValueError(f"stage {self.stage!r}: the objective compares with a teacher, but none was given")
        if objective.feature_terms and isinstance(teacher, nn.Module):
            self._prepare_projections(student, objective, teacher, loader)
        trainable = [p for p in list(student.parameters()) + list(objective.parameters()) if p.requires_grad]
        if not trainable:
            raise ValueError(f"stage {self.stage!r}: the student has no trainable parameters")
        # each process reads every num_processes-th batch; a step accumulates gradient_accumulation_steps of them
        batches = math.ceil(len(loader) / acc.num_processes)
        total_steps = spec.epochs * math.ceil(batches / spec.gradient_accumulation_steps)
        optimizer = make_optimizer(spec, trainable, allow_fused=acc.mixed_precision != "fp16")
        scheduler = make_scheduler(spec, optimizer, total_steps, calls_per_step=acc.num_processes)
        sampler = loader.sampler
        # the objective is not wrapped for DDP (it usually has no parameters); its projections'
        # gradients are averaged across processes by hand before each step
        objective = objective.to(acc.device)
        student, optimizer, loader, scheduler = acc.prepare(student, optimizer, loader, scheduler)
        if isinstance(teacher, nn.Module):
            teacher = acc.prepare_model(teacher.requires_grad_(False).eval(), evaluation_mode=True)
        fuse = self._fuse(acc.unwrap_model(student) if acc.num_processes == 1 else student, objective, teacher)
        return _Fit(student, objective, loader, sampler, teacher, optimizer, scheduler, trainable, fuse)

    def _restore(self, run: _Fit) -> None:
        """Continue from the newest intact checkpoint, if any (damaged newer ones are skipped, and said so)."""
        latest, damaged = latest_intact(self.checkpoint_dir)
        for path in damaged:
            self.accelerator.print(f"[{self.stage}] checkpoint {path} is damaged (checksum mismatch): skipped")
        if latest is not None:
            run.state = load_checkpoint(latest, model=self.accelerator.unwrap_model(run.student),
                                        optimizer=run.optimizer, scheduler=run.scheduler, extra=run.objective)
            self.accelerator.print(f"[{self.stage}] resumed from {latest} "
                                   f"(epoch {run.state['epoch'] + 1}, step {run.state['step']})")

    # ----- one epoch ---------------------------------------------------------------------------

    def _train_epoch(self, run: _Fit, epoch: int, stop_requested: StopRequest) -> None:
        """The optimiser steps of one epoch (from where a resumed run stopped), then its summary."""
        acc, state, size = self.accelerator, run.state, len(run.loader)
        skip = state["batch"] if epoch == state["epoch"] else 0
        batches = acc.skip_first_batches(run.loader, skip) if skip else run.loader
        # accelerate's loaders reset the sampler's epoch from their own counter on iteration
        for epoch_aware in (run.sampler, batches):
            if hasattr(epoch_aware, "set_epoch"):
                epoch_aware.set_epoch(epoch)
        run.student.train()
        started = time.perf_counter()
        running, seen = state.get("running", (0.0, 0)) if skip else (0.0, 0)
        bar = progress(total=size, initial=skip, desc=f"{self.stage} epoch {epoch + 1}/{self.spec.epochs}",
                       enabled=self.progress and acc.is_local_main_process, leave=False)
        for group in _micro_batches(batches, skip, self.spec.gradient_accumulation_steps, size):
            loss, parts = self._optimizer_step(run, epoch, group)
            running, seen = running + loss.item(), seen + 1
            bar.update(len(group))
            if state["step"] % self.log_every == 0:
                self._log(run, epoch, loss, parts)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if self.evaluate and self.spec.eval_every and state["step"] % self.spec.eval_every == 0:
                self._record(run, {"stage": self.stage, "epoch": epoch + 1, "step": state["step"],
                                   **self.evaluate(self.accelerator.unwrap_model(run.student))})
            end = group[-1][0] + 1
            stop = self._stop_everywhere(stop_requested)
            if stop or (self.spec.checkpoint_every and state["step"] % self.spec.checkpoint_every == 0 and end != size):
                state["running"] = (running, seen)
                self._checkpoint(run, epoch, end)
            if stop:
                raise Interrupted(f"[{self.stage}] stopped by a signal after step {state['step']}; "
                                  "checkpoint written: rerun the same command to resume", stop_requested.signum)
        bar.close()
        self._end_epoch(run, epoch, running / max(seen, 1), time.perf_counter() - started)

    def _end_epoch(self, run: _Fit, epoch: int, train_loss: float, seconds: float) -> None:
        """The epoch's summary row (with the task's evaluation), printed, and a checkpoint."""
        summary = {"stage": self.stage, "epoch": epoch + 1, "step": run.state["step"],
                   "train_loss": train_loss, "seconds": seconds}
        if self.evaluate:
            summary.update(self.evaluate(self.accelerator.unwrap_model(run.student)))
        self._record(run, summary)
        self.accelerator.print(f"[{self.stage}] epoch {epoch + 1}/{self.spec.epochs}  " + "  ".join(
            f"{k} {_fmt(v)}" for k, v in summary.items() if k not in ("stage", "epoch")))
        self._checkpoint(run, epoch + 1, 0)

    # ----- one optimiser step ------------------------------------------------------------------

    def _optimizer_step(self, run: _Fit, epoch: int, group: list[tuple[int, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        """Forward and backward each micro-batch of one step, then step the optimiser.

        Each term is normalised by what it counts in the *whole* step (all micro-batches, all
        processes: :meth:`Objective.counts`), so accumulating micro-batches of unequal token counts
        gives the gradient of one large batch; DDP all-reduces once, after the last micro-batch.
        Returns the step's loss and each term's value, the same in every process.
        """
        acc, size = self.accelerator, len(run.loader)
        batches = [self._prepared(run, batch, epoch * size + index) for index, batch in group]
        scales: list[float] | None = None
        loss = torch.zeros((), device=acc.device)
        parts: dict[str, Tensor] = {}
        for position, (index, batch) in enumerate(zip((i for i, _ in group), batches, strict=True)):
            last = position == len(batches) - 1
            with nullcontext() if last else acc.no_sync(run.student):
                out = self._loss(run, batch, f"epoch {epoch + 1}, batch {index}")
                scales = scales or self._scales(run.objective, batches)
                micro = sum(weight * value * scale for (weight, value), scale in zip(out.values, scales, strict=True))
                acc.backward(micro)
            loss = loss + micro.detach()
            part_scales = scales if len(scales) == len(out.parts) else scales[:1] * len(out.parts)
            for (name, value), scale in zip(out.parts.items(), part_scales, strict=True):
                parts[name] = parts.get(name, 0.0) + value * scale
        if acc.num_processes > 1:
            for p in run.objective.parameters():
                if p.requires_grad and p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        if self.spec.max_grad_norm:
            acc.clip_grad_norm_(run.trainable, self.spec.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.state["step"] += 1
        return acc.reduce(loss, "mean"), parts

    def _scales(self, objective: Objective, batches: list[Any]) -> list[float]:
        """What multiplies each summed term of a micro-batch: processes / its count in the whole
        step (DDP then averages over processes); a term that stays a mean: 1 / micro-batches."""
        counts = [objective.counts(batch.to(self.accelerator.device)) for batch in batches]
        scales: list[float] = []
        for per_batch in zip(*counts, strict=True):
            if per_batch[0] is None:
                scales.append(1.0 / len(batches))
            else:
                total = self.accelerator.reduce(torch.stack(per_batch).sum(), reduction="sum").item()
                scales.append(self.accelerator.num_processes / max(total, 1))
        return scales

    def _prepared(self, run: _Fit, batch: Any, key: int) -> Any:
        return batch if self.prepare_batch is None else self.prepare_batch(
            self.accelerator.unwrap_model(run.student), batch, key)

    def _log(self, run: _Fit, epoch: int, loss: Tensor, parts: dict[str, Tensor]) -> None:
        """A row of the training log: the step's loss and terms, averaged over processes (the same row everywhere)."""
        row = {"stage": self.stage, "epoch": epoch + 1, "step": run.state["step"], "loss": loss.item(),
               "lr": run.scheduler.get_last_lr()[0]}
        row.update({k: self.accelerator.reduce(torch.as_tensor(v, device=self.accelerator.device), "mean").item()
                    for k, v in parts.items()})
        self._record(run, row)

    def _record(self, run: _Fit, row: dict[str, Any]) -> None:
        """Keep a row in the history (log.csv) and send its numbers to the run's trackers, as ``stage/name``."""
        run.state["history"].append(row)
        self.accelerator.log({f"{self.stage}/{k}": v for k, v in row.items() if k not in ("stage", "step")
                              and isinstance(v, (int, float))}, step=row["step"])

    def _stop_everywhere(self, stop_requested: StopRequest) -> bool:
        """Whether a signal reached any process: all of them stop after the same step."""
        stop = stop_requested.is_set()
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(float(stop), device=self.accelerator.device)
            stop = self.accelerator.reduce(flag, reduction="sum").item() > 0
        return stop

    def _checkpoint(self, run: _Fit, epoch: int, batch: int) -> None:
        """Write the state (model, optimiser, schedule, RNG, position) on the main process; all wait."""
        acc = self.accelerator
        run.state.update(epoch=epoch, batch=batch)
        if acc.is_main_process:
            save_checkpoint(self.checkpoint_dir, run.state["step"], model=acc.unwrap_model(run.student),
                            optimizer=run.optimizer, scheduler=run.scheduler, state=run.state, extra=run.objective)
            if self.on_checkpoint:
                self.on_checkpoint(run.state["history"])
        acc.wait_for_everyone()

    # ----- the loss ----------------------------------------------------------------------------

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

    def _loss(self, run: _Fit, batch: Any, where: str = "") -> ObjectiveOutput:
        """The objective on one batch: the teacher's signals (live or cached), the student's, summed terms."""
        objective, teacher = run.objective, run.teacher
        with self.accelerator.autocast():
            targets = None
            if objective.needs_teacher:
                assert teacher is not None
                try:
                    targets = (teacher.signals(batch) if isinstance(teacher, CachedTeacher)
                               else teacher_signals(teacher, batch.teacher_inputs, objective.teacher_signals,
                                                    fuse_head=run.fuse))
                except FloatingPointError as exc:
                    raise FloatingPointError(f"[{self.stage}] {where}: {exc}; stopping rather than "
                                             "training on it") from None
            signals = forward_signals(run.student, batch.student_inputs, objective.student_signals,
                                      fuse_head=run.fuse)
            return objective(signals, targets, labels=batch.labels, mask=batch.mask, alignment=batch.alignment,
                             reduction="sum")


def _micro_batches(batches: Any, start: int, accumulation: int, size: int) -> Iterator[list[tuple[int, Any]]]:
    """The loader's batches (numbered from ``start``) grouped into optimiser steps of ``accumulation``
    micro-batches; the epoch's last step takes what is left."""
    group: list[tuple[int, Any]] = []
    for index, batch in enumerate(batches, start=start):
        group.append((index, batch))
        if (index + 1) % accumulation == 0 or index + 1 == size:
            yield group
            group = []


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
