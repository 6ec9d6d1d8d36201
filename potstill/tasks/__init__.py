"""Tasks: how a data set becomes student and teacher inputs, and how a model is evaluated.

One module per flavour; the engine and the objective never know which one runs.
"""

from .base import Batch, Task
from .image_classification import ImageClassification

TASKS: dict[str, type[Task]] = {"image-classification": ImageClassification}

__all__ = ["TASKS", "Batch", "ImageClassification", "Task"]
