"""Tasks: how a data set becomes student and teacher inputs, and how a model is evaluated.

One module per flavour; the engine and the objective never know which one runs.
"""

from ..config import Recipe
from .base import Batch, Task
from .causal_lm import CausalLM, CausalLMRecipe
from .image_classification import ImageClassification, ImageClassificationRecipe
from .sentence_embedding import SentenceEmbedding, SentenceEmbeddingRecipe

#: task name → the task, and its recipe schema
TASKS: dict[str, type[Task]] = {"image-classification": ImageClassification, "causal-lm": CausalLM,
                                "sentence-embedding": SentenceEmbedding}
RECIPES: dict[str, type[Recipe]] = {"image-classification": ImageClassificationRecipe,
                                    "causal-lm": CausalLMRecipe, "sentence-embedding": SentenceEmbeddingRecipe}

__all__ = ["RECIPES", "TASKS", "Batch", "CausalLM", "ImageClassification", "SentenceEmbedding", "Task"]
