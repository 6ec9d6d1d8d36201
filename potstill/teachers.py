"""Where teacher signals come from: a live frozen model, or a cache written once and read every epoch.

The cache holds, per position, the teacher's top-k token ids (int32), their log-probabilities at
the distillation temperature (float16 / bfloat16 / float32) and the log of the leftover mass, in
safetensors shards of ``shard_size`` examples, with a ``manifest.json`` that records what the
cache was made from (data and teacher fingerprints, k, temperature, dtype) and each finished
shard's sha256. Writing resumes after a kill: finished shards are kept, a shard whose checksum
does not match is rewritten, and a manifest made from other data or another teacher is refused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .io import atomic_path, file_sha256, write_json
from .losses.sparse import SparseTarget, top_k
from .signals import LOGITS, teacher_signals
from .tasks.base import Batch

MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class CacheMismatch(ValueError):
    """The cache on disk was made from other data, another teacher or other settings."""


def _hash_tensors(tensors: Iterable[Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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


def write_cache(folder: str | Path, teacher: nn.Module, dataset: Dataset, collate: Callable[[list[Any]], Batch], *,
                top_k_size: int, temperature: float, dtype: str = "bfloat16", shard_size: int = 256,
                identity: dict[str, Any] | None = None, progress: bool = True) -> CacheInfo:
    """Run ``teacher`` once over ``dataset`` and store its top-k; resumes a partial cache."""
    folder = Path(folder)
    expected = {
        "data": dataset_fingerprint(dataset), "teacher": model_fingerprint(teacher), "examples": len(dataset),  # type: ignore[arg-type]
        "top_k": top_k_size, "temperature": temperature, "dtype": dtype, "shard_size": shard_size,
        **(identity or {}),
    }
    manifest = {"identity": expected, "shards": {}, "positions": 0, "bytes": 0}
    if (folder / MANIFEST).is_file():
        found = json.loads((folder / MANIFEST).read_text())
        changed = sorted(k for k in set(expected) | set(found["identity"])
                         if expected.get(k) != found["identity"].get(k))
        if changed:
            raise CacheMismatch(
                f"the teacher cache in {folder} was made from different {', '.join(changed)}; "
                "delete it (or use another cache path) to write a new one"
            )
        manifest = found
    folder.mkdir(parents=True, exist_ok=True)
    teacher.eval()
    device = next(teacher.parameters()).device
    n = len(dataset)  # type: ignore[arg-type]
    starts = range(0, n, shard_size)
    for index, start in enumerate(tqdm(starts, desc="caching teacher", disable=not progress)):
        name = f"shard-{index:05d}.safetensors"
        path = folder / name
        if name in manifest["shards"] and path.is_file() and file_sha256(path) == manifest["shards"][name]["sha256"]:
            continue  # finished earlier
        stop = min(start + shard_size, n)
        parts: list[SparseTarget] = []
        for sub in range(start, stop, 64):
            batch = collate([dataset[i] for i in range(sub, min(sub + 64, stop))]).to(device)
            logits = teacher_signals(teacher, batch.teacher_inputs, [LOGITS])[LOGITS]
            parts.append(top_k(logits.float(), top_k_size, temperature))
        tensors = {
            "ids": torch.cat([p.ids for p in parts]).to(torch.int32).cpu().contiguous(),
            "logprobs": torch.cat([p.logprobs for p in parts]).to(DTYPES[dtype]).cpu().contiguous(),
            "rest": torch.cat([p.rest for p in parts]).to(DTYPES[dtype]).cpu().contiguous(),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)
        old = manifest["shards"].get(name)
        if old:  # a torn or changed shard rewritten: do not count it twice
            manifest["positions"] -= old["positions"]
            manifest["bytes"] -= old["bytes"]
        positions = tensors["rest"].numel()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        manifest["shards"][name] = {"start": start, "stop": stop, "sha256": file_sha256(path),
                                    "positions": positions, "bytes": size}
        manifest["positions"] += positions
        manifest["bytes"] += size
        write_json(folder / MANIFEST, manifest)
    return CacheInfo(folder, manifest)


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
            self._shards[index] = load_file(self.folder / f"shard-{index:05d}.safetensors")
        return self._shards[index]

    def lookup(self, indices: Tensor) -> SparseTarget:
        rows = [self._shard(i // self.shard_size) for i in indices.tolist()]
        offsets = [i % self.shard_size for i in indices.tolist()]
        return SparseTarget(*(torch.stack([row[key][o] for row, o in zip(rows, offsets, strict=True)])
                              for key in ("ids", "logprobs", "rest")))

    def signals(self, batch: Batch) -> dict[str, SparseTarget]:
        if batch.indices is None:
            raise ValueError("a cached teacher needs the batch's example indices (use indexed_collate)")
        device = batch.labels.device if batch.labels is not None else torch.device("cpu")
        target = self.lookup(batch.indices)
        return {LOGITS: SparseTarget(*(t.to(device) for t in target))}


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
