"""Where teacher signals come from: a live frozen model, or a cache written once and read every epoch.

The cache holds, per position, the teacher's top-k token ids (int32), their log-probabilities at
the distillation temperature (float16 / bfloat16 / float32) and the log of the leftover mass, in
safetensors shards of ``shard_size`` examples, with a ``manifest.json`` that records what the
cache was made from (data and teacher fingerprints, k, temperature, dtype) and each finished
shard's sha256. Writing resumes after a kill: finished shards are kept, a shard whose checksum
does not match is rewritten, and a manifest made from other data or another teacher is refused.
Under ``accelerate launch`` / ``torchrun`` the processes split the shards between them and the
cache is the same, byte for byte, as one written by a single process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset

from .batch import Batch
from .io import atomic_path, file_sha256, write_json
from .losses.sparse import SparseTarget, top_k
from .progress import progress as bar
from .signals import LOGITS, teacher_signals

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
#: one record per shard finished since the manifest was last written (folded in at the end)
PROGRESS = ".progress"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheMismatch(ValueError):
    """The cache on disk was made from other data, another teacher or other settings."""


def _hash_tensors(tensors: Iterable[Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too
    return digest.hexdigest()


def _tensors_in(value: Any) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for key in sorted(value):
            yield from _tensors_in(value[key])
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors_in(item)


def dataset_fingerprint(dataset: Dataset) -> str:
    """sha256 of every tensor of every example, in order."""
    return _hash_tensors(t for i in range(len(dataset)) for t in _tensors_in(dataset[i]))  # type: ignore[arg-type]


def model_fingerprint(model: nn.Module) -> str:
    state = model.state_dict()
    return _hash_tensors(state[k] for k in sorted(state))


@dataclass
class CacheInfo:
    folder: Path
    manifest: dict[str, Any]

    @property
    def bytes_per_position(self) -> float:
        return self.manifest["bytes"] / max(self.manifest["positions"], 1)


class Processes(Protocol):
    """What the cache writer needs to know about the processes it runs in (an ``accelerate.Accelerator`` fits)."""

    @property
    def process_index(self) -> int: ...

    @property
    def num_processes(self) -> int: ...

    @property
    def is_main_process(self) -> bool: ...

    def wait_for_everyone(self) -> None: ...


class _OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _record_progress(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fold the shard records of an earlier (killed) run into ``manifest``; totals recomputed; main process only."""
    progress = folder / PROGRESS
    if progress.is_dir():
        for record in sorted(progress.glob("*.json")):
            manifest["shards"][record.stem] = json.loads(record.read_text())
    manifest["shards"] = dict(sorted(manifest["shards"].items()))
    manifest["positions"] = sum(s["positions"] for s in manifest["shards"].values())
    manifest["bytes"] = sum(s["bytes"] for s in manifest["shards"].values())
    return manifest


def write_cache(folder: str | Path, teacher: nn.Module, dataset: Dataset, collate: Callable[[list[Any]], Batch], *,
                top_k_size: int, temperature: float, dtype: str = "bfloat16", shard_size: int = 256,
                vocab_size: int | None = None,
                identity: dict[str, Any] | None = None, progress: bool = True,
                processes: Processes | None = None) -> CacheInfo:
    """Run ``teacher`` once over ``dataset`` and store its top-k; resumes a partial cache.

    With ``processes`` (the run's ``Accelerator``) of N processes, process r writes shards
    r, r + N, r + 2N, …; each finished shard is recorded in ``.progress/`` (so a kill loses at most
    the shards in flight), and after all processes finish the main process folds the records into
    ``manifest.json``. The files are the same, byte for byte, whatever N is.
    """
    procs: Processes = processes or _OneProcess()
    folder = Path(folder)
    expected = {
        "data": dataset_fingerprint(dataset), "teacher": model_fingerprint(teacher), "examples": len(dataset),  # type: ignore[arg-type]
        "top_k": top_k_size, "temperature": temperature, "dtype": dtype, "shard_size": shard_size,
        **({"vocab_size": vocab_size} if vocab_size else {}),
        **(identity or {}),
    }
    manifest: dict[str, Any] = {"identity": expected, "shards": {}, "positions": 0, "bytes": 0}
    found = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else None
    if found is not None:
        changed = sorted(k for k in set(expected) | set(found["identity"])
                         if expected.get(k) != found["identity"].get(k))
        if changed:
            raise CacheMismatch(
                f"the teacher cache in {folder} was made from different {', '.join(changed)}; "
                "delete it (or use another cache path) to write a new one"
            )
        manifest = found
    procs.wait_for_everyone()  # every process has read the manifest before the main process rewrites it
    if procs.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if found is None:  # shard records without a manifest (made from who knows what) are not trusted
            shutil.rmtree(folder / PROGRESS, ignore_errors=True)
        # the identity goes to disk before any shard, so a killed run's shards are never reused for other data
        write_json(folder / MANIFEST, _record_progress(folder, manifest))
        shutil.rmtree(folder / PROGRESS, ignore_errors=True)
    procs.wait_for_everyone()
    manifest = json.loads((folder / MANIFEST).read_text())
    teacher.eval()
    device = next(teacher.parameters()).device
    n = len(dataset)  # type: ignore[arg-type]
    mine = range(-(-n // shard_size))[procs.process_index::procs.num_processes]
    for index in bar(mine, desc="caching teacher", enabled=progress and procs.is_main_process):
        name, start = _shard_name(index), index * shard_size
        path = folder / name
        if name in manifest["shards"]:  # finished earlier: kept if intact, else said and rewritten
            if path.is_file() and file_sha256(path) == manifest["shards"][name]["sha256"]:
                continue
            log.warning("teacher cache %s: shard %s %s; writing it again", folder, name,
                        "does not match its recorded checksum (damaged)" if path.is_file() else "is missing")
        stop = min(start + shard_size, n)
        parts: list[SparseTarget] = []
        for sub in range(start, stop, 64):
            batch = collate([dataset[i] for i in range(sub, min(sub + 64, stop))]).to(device)
            logits = teacher_signals(teacher, batch.teacher_inputs, [LOGITS])[LOGITS]
            # a head padded beyond the tokenizer: only real tokens, as the live loss sees them
            parts.append(top_k(logits[..., :vocab_size].float(), top_k_size, temperature))
        tensors = {
            "ids": torch.cat([p.ids for p in parts]).to(torch.int32).cpu().contiguous(),
            "logprobs": torch.cat([p.logprobs for p in parts]).to(DTYPES[dtype]).cpu().contiguous(),
            "rest": torch.cat([p.rest for p in parts]).to(DTYPES[dtype]).cpu().contiguous(),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
        write_json(folder / PROGRESS / f"{name}.json", {
            "start": start, "stop": stop, "sha256": file_sha256(path), "positions": tensors["rest"].numel(),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        })
    procs.wait_for_everyone()
    if procs.is_main_process:
        write_json(folder / MANIFEST, _record_progress(folder, manifest))
        shutil.rmtree(folder / PROGRESS, ignore_errors=True)
    procs.wait_for_everyone()
    return CacheInfo(folder, json.loads((folder / MANIFEST).read_text()))


class CachedTeacher:
    """Teacher signals read from a cache: ``{"logits": SparseTarget}`` for a batch's example indices."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        identity = self.manifest["identity"]
        self.shard_size, self.examples = identity["shard_size"], identity["examples"]
        self.temperature = identity["temperature"]
        expected_shards = -(-self.examples // self.shard_size)
        if len(self.manifest["shards"]) != expected_shards:
            raise CacheMismatch(f"the teacher cache in {self.folder} is incomplete "
                                f"({len(self.manifest['shards'])} of {expected_shards} shards); "
                                "run `potstill cache-teacher` again to finish it")
        self._shards: dict[int, dict[str, Tensor]] = {}

    def _shard(self, index: int) -> dict[str, Tensor]:
        if index not in self._shards:
            self._shards[index] = load_file(self.folder / _shard_name(index))
        return self._shards[index]

    def lookup(self, indices: Tensor) -> SparseTarget:
        rows = [self._shard(i // self.shard_size) for i in indices.tolist()]
        offsets = [i % self.shard_size for i in indices.tolist()]
        return SparseTarget(*(torch.stack([row[key][o] for row, o in zip(rows, offsets, strict=True)])
                              for key in ("ids", "logprobs", "rest")))

    def signals(self, batch: Batch) -> dict[str, SparseTarget]:
        if batch.indices is None:
            raise ValueError("a cached teacher needs the batch's example indices (use indexed_collate)")
        target = self.lookup(batch.indices)
        # the indices travel with the batch (a task without labels too): the targets go where they are
        return {LOGITS: SparseTarget(*(t.to(batch.indices.device) for t in target))}


class IndexedDataset(Dataset):
    """A dataset whose items carry their index, so a batch can find its rows in a cache."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]


def indexed_collate(collate: Callable[[list[Any]], Batch]) -> Callable[[list[tuple[int, Any]]], Batch]:
    def wrapped(items: list[tuple[int, Any]]) -> Batch:
        batch = collate([example for _, example in items])
        batch.indices = torch.tensor([index for index, _ in items])
        return batch

    return wrapped
