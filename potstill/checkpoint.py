"""Checkpoints that survive a kill at any moment.

A checkpoint is a folder ``step-NNNNNNNN`` holding the student's weights (safetensors), the
optimiser, scheduler and RNG states (``torch.save`` of plain tensors and numbers, read back
with ``weights_only=True``) and ``trainer_state.json`` (epoch, position in the epoch, history).
It is written to a temporary folder and renamed into place, so a folder with the final name is
always complete; leftovers of a torn write are ignored and cleaned up. Each checkpoint records
the sha256 of its files, and a checkpoint whose files changed afterwards (a disk error, a copy cut
short) is skipped in favour of the previous one.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_path, file_sha256, write_json

STATE = "trainer_state.json"
CHECKSUMS = "checksums.json"
_NAME = re.compile(r"^step-(\d{8})$")


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """random.setstate needs tuples; a weights-only load may hand back lists."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(v) for v in value)
    return value


def save_checkpoint(folder: Path, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], extra: nn.Module | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``folder`` atomically and keep only the newest ``keep``."""
    path = folder / f"step-{step:08d}"
    with atomic_path(path) as tmp:
        tmp.mkdir(parents=True)
        save_file(_tensors(model), tmp / "model.safetensors")
        if extra is not None and list(extra.state_dict()):
            save_file(_tensors(extra), tmp / "extra.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        write_json(tmp / CHECKSUMS, {f.name: file_sha256(f) for f in sorted(tmp.iterdir())})
        write_json(tmp / STATE, state)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return path


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory (tied weights)
    return {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}


def is_intact(path: Path) -> bool:
    """Every file the checkpoint recorded is there with the bytes it had when written."""
    try:
        expected = json.loads((path / CHECKSUMS).read_text())
        return all(file_sha256(path / name) == digest for name, digest in expected.items())
    except (OSError, ValueError):
        return False


def latest_intact(folder: Path) -> tuple[Path | None, list[Path]]:
    """The newest checkpoint that passes :func:`is_intact`, and the newer ones that did not."""
    skipped = []
    for path in reversed(list_checkpoints(folder)):
        if is_intact(path):
            return path, skipped
        skipped.append(path)
    return None, skipped


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints under ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def load_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, extra: nn.Module | None = None) -> dict[str, Any]:
    """Restore everything :func:`save_checkpoint` wrote; returns the trainer state."""
    model.load_state_dict(load_file(path / "model.safetensors"))
    if extra is not None and (path / "extra.safetensors").is_file():
        extra.load_state_dict(load_file(path / "extra.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(path / "rng.pt", weights_only=True))
    return json.loads((path / STATE).read_text())
