"""potstill inside other training stacks."""

from .trainer import DistillationTrainer

__all__ = ["DistillationTrainer"]
