"""What a speech run computes once and keeps in its run directory: the teacher's encoder outputs
and its transcripts of the training audio (pseudo-labels).

**Encoder outputs.** A student cut from its teacher with the encoder frozen (distil-whisper's
recipe) has the teacher's encoder, so both models' decoders read the same encoder outputs: they
are computed once per clip and training runs the decoders only. Whisper's cross-attention reads
all 1,500 frames of the 30 s window, the padding's too, so the outputs are stored whole (cutting
them to the audio's frames would change what the decoder computes). They are
``[frames, width]`` per clip — 1,500 × 512 for Whisper base, 1.5 MB in float16 — written as
safetensors shards of ``shard_size`` clips, each shard whole or absent (a killed run keeps the
finished shards and computes the rest on resume). ``manifest.json`` says which teacher and which
clips they belong to; a cache of other clips or another encoder is refused, never overwritten.
Without a folder (a task used outside a run) the outputs stay in memory.

**Pseudo-labels.** The teacher transcribes every training clip greedily, once;
``pseudo-labels.json`` maps each clip's position to its id, the teacher's tokens and whether the
transcription ended within its budget. It is rewritten (atomically) after every batch, so a kill
loses at most one batch, and a rerun transcribes only the clips still missing.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..io import atomic_path, write_json, write_text
from ..progress import progress as progress_bar
from .transcription import Transcripts, encode

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

__all__ = ["EncoderCache", "clips_fingerprint", "encoder_fingerprint", "pseudo_labels"]


def _processes() -> tuple[int, int, Callable[[], None]]:
    """(this process's index, number of processes, a barrier): one process unless launched by accelerate."""
    from accelerate import PartialState

    state = PartialState()
    return state.process_index, state.num_processes, state.wait_for_everyone


def encoder_fingerprint(model: nn.Module) -> str:
    """A short digest of the encoder's weights (two models with equal digests encode alike)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.get_encoder().state_dict().items()):
        flat = tensor.detach().float().flatten()
        digest.update(name.encode())
        digest.update(repr((tuple(tensor.shape), round(flat.double().sum().item(), 6),
                            round(flat.double().abs().sum().item(), 6))).encode())
    return digest.hexdigest()[:16]


def clips_fingerprint(ids: Sequence[str], durations: Sequence[float]) -> str:
    """A digest of a list of clips (their ids and durations, in order)."""
    return hashlib.sha256(json.dumps([[str(i), round(float(d), 4)] for i, d in zip(ids, durations,
                                                                                  strict=True)]).encode()
                          ).hexdigest()[:16]


class EncoderCache:
    """A model's encoder outputs for a fixed list of ``count`` clips, in ``folder`` (or in memory)."""

    def __init__(self, folder: Path | None, identity: dict[str, Any], count: int, *, dtype: str = "float16",
                 shard_size: int = 64):
        if dtype not in DTYPES:
            raise ValueError(f"encoder cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.folder, self.count, self.shard_size = folder, count, shard_size
        self.dtype = DTYPES[dtype]
        self.manifest = {"identity": identity, "clips": count, "shard_size": shard_size, "dtype": dtype}
        self._memory: dict[int, Tensor] = {}
        self._handles: dict[int, Any] = {}

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)

    def _shard_path(self, shard: int) -> Path:
        assert self.folder is not None
        return self.folder / f"shard-{shard:05d}.safetensors"

    def _check_manifest(self) -> None:
        assert self.folder is not None
        path = self.folder / MANIFEST
        if path.is_file():
            found = json.loads(path.read_text())
            if found != self.manifest:
                differ = sorted(k for k in set(found) | set(self.manifest) if found.get(k) != self.manifest.get(k))
                raise ValueError(f"the encoder cache {self.folder} holds the outputs of other clips or another "
                                 f"encoder (its manifest differs in: {', '.join(differ)}); potstill does not "
                                 "overwrite it: point encoder_cache.path elsewhere, or delete the folder")
        elif self.folder.is_dir() and any(self.folder.iterdir()):
            raise ValueError(f"{self.folder} holds files but no encoder-cache {MANIFEST}: potstill writes its cache "
                             "only into a new or empty folder (or its own cache)")

    def fill(self, model: nn.Module, features: Callable[[list[int]], Tensor], *, batch_size: int = 8,
             progress: bool = True, desc: str = "encoder outputs") -> EncoderCache:
        """Compute what is missing with ``model``'s encoder; ``features(indices)`` gives the clips'
        log-mel input features. Under several processes each computes its share of the shards."""
        if self.folder is None:
            missing = [i for i in range(self.count) if i not in self._memory]
            self._compute(model, features, missing, batch_size, progress, desc, self._memory.update)
            return self
        rank, world, barrier = _processes()
        if rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._check_manifest()
            write_json(self.folder / MANIFEST, self.manifest)
        barrier()
        todo = [s for s in range(self.shards) if s % world == rank and not self._shard_path(s).is_file()]
        if todo:
            log.info("computing the encoder outputs of %d clips once (%s, %s): %s", self.count, desc,
                     str(self.dtype).removeprefix("torch."), self.folder)
        for shard in progress_bar(todo, desc=desc, enabled=progress and len(todo) > 1, leave=False):
            indices = list(range(shard * self.shard_size, min(self.count, (shard + 1) * self.shard_size)))
            rows: dict[int, Tensor] = {}
            self._compute(model, features, indices, batch_size, False, desc, rows.update)
            with atomic_path(self._shard_path(shard)) as tmp:
                save_file({"hidden": torch.stack([rows[i] for i in indices]).contiguous(),
                           "index": torch.tensor(indices, dtype=torch.long)}, str(tmp))
        barrier()
        return self

    def _compute(self, model: nn.Module, features: Callable[[list[int]], Tensor], indices: list[int],
                 batch_size: int, progress: bool, desc: str, store: Callable[[dict[int, Tensor]], None]) -> None:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            for start in progress_bar(range(0, len(indices), batch_size), desc=desc, leave=False,
                                      enabled=progress and len(indices) > batch_size):
                chunk = indices[start:start + batch_size]
                with torch.no_grad():
                    hidden = encode(model, features(chunk).to(device)).to("cpu", self.dtype)
                store(dict(zip(chunk, hidden, strict=True)))
        finally:
            model.train(was_training)

    def get(self, indices: Sequence[int]) -> Tensor:
        """The encoder outputs of these clips, ``[B, frames, width]`` float32."""
        if self.folder is None:
            return torch.stack([self._memory[i] for i in indices]).float()
        rows = []
        for i in indices:
            if not 0 <= i < self.count:
                raise IndexError(f"clip {i} is not in the encoder cache of {self.count} clips")
            shard = i // self.shard_size
            if shard not in self._handles:
                path = self._shard_path(shard)
                if not path.is_file():
                    raise FileNotFoundError(f"{path} is missing: the encoder cache is incomplete (fill it first)")
                self._handles[shard] = safe_open(str(path), framework="pt")
            rows.append(self._handles[shard].get_slice("hidden")[i - shard * self.shard_size])
        return torch.stack(rows).float()


def pseudo_labels(path: Path | None, ids: Sequence[str], transcribe: Callable[[list[int]], Transcripts], *,
                  identity: dict[str, Any], decode: Callable[[list[int]], str] = str, batch_size: int = 16,
                  progress: bool = True) -> dict[int, dict[str, Any]]:
    """The teacher's transcript of every clip: ``{position: {"id", "text", "tokens", "finished"}}``.

    ``transcribe(indices)`` transcribes the clips at these positions and ``decode(tokens)`` makes
    the text. With a ``path`` the result is kept there and rewritten after every batch (a rerun
    continues where a kill stopped); a file made for another teacher, prompt or budget
    (``identity``) or for other clips is refused.
    """
    done = _read_pseudo_labels(path, ids, identity) if path is not None and path.is_file() else {}
    missing = [i for i in range(len(ids)) if i not in done]
    if done and missing:
        log.info("pseudo-labels: %d of %d clips transcribed before (%s); transcribing the other %d",
                 len(done), len(ids), path, len(missing))
    rank, world, barrier = _processes()
    if rank == 0:  # one process transcribes; the others read its file
        for start in progress_bar(range(0, len(missing), batch_size), desc="teacher transcribing", leave=False,
                                  enabled=progress):
            chunk = missing[start:start + batch_size]
            out = transcribe(chunk)
            for position, tokens, finished in zip(chunk, out.tokens, out.finished, strict=True):
                done[position] = {"id": ids[position], "text": decode(tokens), "tokens": tokens, "finished": finished}
            if path is not None:
                _write_pseudo_labels(path, identity, done)
    if path is not None and world > 1 and missing:
        barrier()
        if rank != 0:
            done = _read_pseudo_labels(path, ids, identity)
    return done


def _write_pseudo_labels(path: Path, identity: dict[str, Any], done: dict[int, dict[str, Any]]) -> None:
    """One clip per line, so that the file reads (and diffs) well."""
    lines = [f"  {json.dumps(str(k))}: {json.dumps(done[k], ensure_ascii=False)}" for k in sorted(done)]
    write_text(path, '{\n  "identity": ' + json.dumps(identity) + ',\n  "clips": {\n'
               + ",\n".join("  " + line for line in lines) + "\n  }\n}\n")


def _read_pseudo_labels(path: Path, ids: Sequence[str], identity: dict[str, Any]) -> dict[int, dict[str, Any]]:
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("identity") != identity:
        raise ValueError(f"{path} holds pseudo-labels of another teacher or prompt ({saved.get('identity')}, "
                         f"this run: {identity}); potstill does not overwrite it: move it away to transcribe again")
    done = {}
    for key, entry in saved.get("clips", {}).items():
        position = int(key)
        if position >= len(ids) or entry.get("id") != ids[position]:
            raise ValueError(f"{path}: clip {position} is {entry.get('id')!r}, but this run's clip {position} "
                             f"is {ids[position] if position < len(ids) else 'absent'!r}: the file belongs to other "
                             "training data; move it away to transcribe again")
        done[position] = entry
    return done
