"""Tasks: how a data set becomes student and teacher inputs, and how a model is evaluated.

One module per flavour, each a :class:`Task` subclass registered here under its ``name``; the
engine and the objective never know which one runs.
"""

from .base import Batch, Task
from .causal_lm import CausalLM
from .image_classification import ImageClassification
from .masked_lm import MaskedLM
from .sentence_embedding import SentenceEmbedding
from .speech_llm import SpeechLLMTask
from .speech_recognition import SpeechRecognition
from .text_classification import TextClassification

#: task name (a recipe's ``task`` field) → the task; each task names its recipe schema (``recipe_type``)
TASKS: dict[str, type[Task]] = {task.name: task for task in (
    ImageClassification, CausalLM, SentenceEmbedding, TextClassification, MaskedLM, SpeechRecognition, SpeechLLMTask)}

__all__ = ["TASKS", "Batch", "CausalLM", "ImageClassification", "MaskedLM", "SentenceEmbedding", "SpeechLLMTask",
           "SpeechRecognition", "Task", "TextClassification"]
