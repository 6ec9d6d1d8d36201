from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing them when pytest runs alongside subprocesses.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_overrides() -> list[str]:
    """A run of a few seconds on real MNIST: small models, 2,000 training images."""
    return [
        "data.train_limit=2000",
        "teacher.hidden_sizes=[128]",
        "teacher.dropout=0.2",
        "teacher.input_dropout=0.0",
        "teacher.train.epochs=3",
        "teacher.train.batch_size=64",
        "student.hidden_sizes=[32]",
        "train.epochs=3",
        "train.batch_size=64",
        "train.learning_rate=3e-3",
        "train.checkpoint_every=10",
    ]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Tests build their own Accelerator (``cpu=True``): on a GPU machine accelerate would refuse one
    after a test whose run took the GPU, as it keeps one state per process."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def one_thread():
    """Tiny models: one thread is as fast, and never waits on a busy second core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
