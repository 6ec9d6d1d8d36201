"""Atomic writes: every file potstill writes appears whole or not at all (temp file + rename)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Works for files and for folders (a folder that already exists at ``path`` is replaced).
    On error the temporary is removed and ``path`` is left as it was. What appears gets the
    user's usual permissions (as by ``umask``), even from writers that create private files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        _usual_permissions(target)
        if path.is_dir() and not path.is_symlink():
            old = tmp / ".old"
            os.replace(path, old)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _usual_permissions(path: Path) -> None:
    """Files 0666 and folders 0777, less the umask: as ``open`` / ``mkdir`` would have made them
    (safetensors, for one, writes its files 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not item.is_symlink():
            item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
