"""MNIST in idx format (the 10,000-image test set ships with potstill; see mnist/ATTRIBUTION.md)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import torch
from torch import Tensor

VENDORED = Path(__file__).parent / "mnist"
IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"


def read_idx(path: Path) -> Tensor:
    """Read one idx file (optionally gzipped) into a uint8 tensor of its stored shape."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise OSError(f"cannot read idx file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte idx file")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    expected = 1
    for size in shape:
        expected *= size
    if len(body) != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes), file has {len(body)}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def load_mnist(folder: str | Path | None = None) -> tuple[Tensor, Tensor]:
    """Images as float32 ``[N, 784]`` in [0, 1] and labels as int64 ``[N]``."""
    root = Path(folder) if folder else VENDORED
    images = read_idx(root / IMAGES).reshape(-1, 28 * 28).float() / 255.0
    labels = read_idx(root / LABELS).long()
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels")
    return images, labels
