"""Text classification: a fine-tuned encoder classifier distilled into a smaller one (DistilBERT's
and TinyBERT's task distillation).

The teacher is any ``AutoModelForSequenceClassification``: a trained classifier used as it is, or
a plain pretrained encoder (such as the MiniLM that ships offline) given a new head and fine-tuned
on the labels first (stage ``teacher``). Students are cut from the teacher as the recipe loads it
(``layers_from_teacher``, the same starting point for the scratch baseline and the distilled
student), loaded, or built from a config. Data comes through :class:`~potstill.data.hf.DatasetSpec`
(CSV, JSON lines, Parquet, a hub set…): a text column (and optionally a second one, for sentence
pairs) and a label column. Losses: Hinton's KL at T + CE, plus hidden-state and attention terms.
Metrics: accuracy, macro-F1, agreement with the teacher, held-out KL, and examples per second.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from ..config import ModelSpec, Recipe, TrainSpec
from ..data import VENDORED_POLARITY
from ..data.hf import DataError, DatasetSpec, Splits
from ..losses import soft_targets
from ..metrics import accuracy, agreement, held_out_kl, macro_f1
from ..models import count_parameters, evaluating
from ..pretrained import MINILM, resolve
from ..signals import attention_signal
from ..students import LayerSelection, make_student
from .base import Batch, Task, synchronize
from .classifiers import classifier, has_trained_head, model_config, set_dropout, task_labels
from .lm_data import spread

log = logging.getLogger(__name__)

HEAD = "ForSequenceClassification"
SOFTENING_TEMPERATURES = (1.0, 2.0, 4.0, 8.0)

__all__ = ["TextClassification", "TextClassificationRecipe"]


class TextClassificationData(DatasetSpec):
    #: null = the 2,000 labelled sentence-polarity sentences that ship with potstill (CSV: text, label)
    dataset: str | None = None  # type: ignore[assignment]
    #: sentence pairs (NLI, paraphrase): the column of the second text (null: one text per example)
    text_pair_column: str | None = None
    #: tokens per example; longer texts are truncated
    max_length: int = Field(128, ge=4)


class ClassifierSpec(ModelSpec):
    """An ``AutoModelForSequenceClassification``: loaded, cut from the teacher, or built from a config."""

    #: build a new model from this config instead: ``{model_type: bert, hidden_size: 64, …}``
    config: dict[str, Any] | None = None
    #: cut this student from the teacher as the recipe loads it (before any fine-tuning here), keeping
    #: these layers: "every-other", "first-last", [0, 2, 4], or "influence:N"
    layers_from_teacher: LayerSelection | None = None
    #: "teacher": the kept layers keep the teacher's weights; "random": same shape, fresh weights
    init: Literal["teacher", "random"] = "teacher"
    #: cut ``layers_from_teacher`` from this model (hub name or folder) instead of the teacher, e.g. the
    #: pretrained encoder a fine-tuned teacher started from (null: the teacher as the recipe loads it)
    cut_from: str | None = None
    #: dropout probability of every dropout layer while training (null: the model's own)
    dropout: float | None = Field(None, ge=0, lt=1)


class ClassifierTeacherSpec(ClassifierSpec):
    #: the tokenizer (hub name or folder) both models read; null = the teacher's own
    tokenizer: str | None = None
    #: fine-tune the teacher on the labels first (stage ``teacher``): "auto" = when it is not a trained
    #: sequence classifier already (a plain pretrained encoder, or a model built from a config)
    fine_tune: Literal["auto"] | bool = "auto"
    train: TrainSpec = Field(default_factory=lambda: TrainSpec(epochs=3, batch_size=32, learning_rate=5e-5,
                                                               weight_decay=0.01, warmup_steps=10))


class TextClassificationRecipe(Recipe):
    task: Literal["text-classification"] = "text-classification"
    data: TextClassificationData = Field(default_factory=lambda: TextClassificationData(eval_size=400))
    teacher: ClassifierTeacherSpec = Field(default_factory=lambda: ClassifierTeacherSpec(model_name_or_path=MINILM))
    student: ClassifierSpec = Field(default_factory=lambda: ClassifierSpec(layers_from_teacher="every-other"))


class _Tokenize:
    """The map function that tokenises each row (a class, so that it pickles for num_proc workers)."""

    def __init__(self, tokenizer: Any, max_length: int, pairs: bool):
        self.tokenizer, self.max_length, self.pairs = tokenizer, max_length, pairs

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        texts = [t if isinstance(t, str) else "" for t in batch["text"]]
        second = [t if isinstance(t, str) else "" for t in batch["text_pair"]] if self.pairs else None
        encoded = self.tokenizer(texts, second, truncation=True, max_length=self.max_length)
        return {**{k: encoded[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded},
                "labels": batch["label"]}


#: what a folder with a tokenizer holds (transformers builds an empty one from a folder with none of them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                   "tokenizer.model", "sentencepiece.bpe.model")


def has_tokenizer(name_or_path: str) -> bool:
    """Whether a model folder holds tokenizer files (a hub name is taken to have them)."""
    folder = Path(resolve(name_or_path).path)
    return not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What identifies a tokenizer's output: its vocabulary and rules (a fast tokenizer's JSON)."""
    from datasets.fingerprint import Hasher

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items())
    return Hasher.hash([type(tokenizer).__name__, state, tokenizer.padding_side, tokenizer.truncation_side])


class TextClassification(Task):
    """Sequence classification: teacher (fine-tuned here if it is a plain encoder) → smaller classifier."""

    name = "text-classification"
    recipe_type = TextClassificationRecipe
    headline = ("accuracy", "macro_f1", "agreement")

    def __init__(self, recipe: TextClassificationRecipe, progress: bool = True):
        from transformers import AutoTokenizer

        super().__init__(recipe, progress)
        data, teacher = recipe.data, recipe.teacher
        self.teacher_config = model_config(teacher.model_name_or_path, teacher.config, teacher.trust_remote_code)
        trained = bool(teacher.model_name_or_path) and has_trained_head(self.teacher_config, HEAD)
        self.fine_tune = (not trained) if teacher.fine_tune == "auto" else teacher.fine_tune
        if not teacher.model_name_or_path and not self.fine_tune:
            raise ValueError("teacher.fine_tune is false, but a teacher built from a config has to be trained")
        tokenizer_source = teacher.tokenizer or teacher.model_name_or_path
        if not tokenizer_source:
            raise ValueError("teacher.tokenizer: a teacher built from a config needs a tokenizer "
                             "(a hub name or folder)")
        if not has_tokenizer(tokenizer_source):
            raise ValueError(f"teacher: {tokenizer_source} holds no tokenizer files: set teacher.tokenizer "
                             "(a hub name or folder)")
        self.tokenizer = AutoTokenizer.from_pretrained(resolve(tokenizer_source).path,
                                                       trust_remote_code=teacher.trust_remote_code)
        self._check_student_tokenizer()

        spec = data if data.dataset else data.model_copy(update={"dataset": str(VENDORED_POLARITY)})
        roles = ["text", "label"] + (["text_pair"] if data.text_pair_column else [])
        if data.text_pair_column:
            spec = spec.model_copy(update={"columns": {**spec.columns, "text_pair": data.text_pair_column}})
        splits = spec.load(roles)
        self._check_text(splits, roles)
        splits, self.labels = task_labels(splits, data.labels, self.teacher_config, used_as_is=not self.fine_tune)
        tokenize = _Tokenize(self.tokenizer, data.max_length, bool(data.text_pair_column))
        fingerprint = [tokenizer_fingerprint(self.tokenizer), data.max_length, bool(data.text_pair_column)]
        encoded = Splits(*(spec.map(rows, tokenize, fingerprint=fingerprint, desc=f"Tokenizing ({name})",
                                    progress=progress)
                           for name, rows in (("train", splits.train), ("eval", splits.eval))))
        self.train_set = self.transfer_set = encoded.train.to_list()
        self.eval_set = encoded.eval.to_list()
        self.eval_labels = torch.tensor([e["labels"] for e in self.eval_set])
        self._teacher_logits: Tensor | None = None

    # ----- data --------------------------------------------------------------------------------

    def _check_student_tokenizer(self) -> None:
        """Teacher and student read the same token ids: a loaded student with another vocabulary cannot."""
        from transformers import AutoTokenizer

        student = self.recipe.student
        for field, path in (("model_name_or_path", student.model_name_or_path), ("cut_from", student.cut_from)):
            if not path or not has_tokenizer(path):
                continue  # no tokenizer of its own: it reads the teacher's
            try:
                own = AutoTokenizer.from_pretrained(resolve(path).path)
            except (OSError, ValueError):
                continue  # no tokenizer of its own: it reads the teacher's
            if own.get_vocab() != self.tokenizer.get_vocab():
                raise ValueError(f"student.{field}: {path} reads another tokenizer than the teacher; "
                                 "text-classification feeds both models the same token ids")

    @staticmethod
    def _check_text(splits: Splits, roles: list[str]) -> None:
        from datasets import Value

        for role in (r for r in roles if r != "label"):
            feature = splits.train.features[role]
            if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
                raise DataError(f"data.{role}_column: the column holds {feature}, not text")

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        """Pad token ids (with the tokenizer's pad id) into a batch; labels are the class ids."""
        length = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id or 0
        right = self.tokenizer.padding_side == "right"
        inputs: dict[str, Tensor] = {}
        for key, fill in (("input_ids", pad), ("attention_mask", 0), ("token_type_ids", 0)):
            if key not in examples[0]:
                continue
            rows = torch.full((len(examples), length), fill, dtype=torch.long)
            for row, e in zip(rows, examples, strict=True):
                values = torch.tensor(e[key], dtype=torch.long)
                if right:
                    row[: len(values)] = values
                else:
                    row[length - len(values):] = values
            inputs[key] = rows
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
        return Batch(student_inputs=inputs, teacher_inputs=inputs, labels=labels, mask=inputs["attention_mask"])

    # ----- models ------------------------------------------------------------------------------

    def trains_teacher(self) -> bool:
        return self.fine_tune

    def _auto_class(self) -> Any:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def teacher_as_loaded(self) -> nn.Module:
        """The teacher before any training here (a new head, if it had none, drawn from the global RNG)."""
        t = self.recipe.teacher
        return classifier(self._auto_class(), t.model_name_or_path, t.config, self.labels,
                          trust_remote_code=t.trust_remote_code)

    def build_model(self, spec: ClassifierSpec) -> nn.Module:
        if isinstance(spec, ClassifierTeacherSpec):
            model = self.teacher_as_loaded()
        elif spec.layers_from_teacher is not None:
            start = self.teacher_as_loaded() if spec.cut_from is None else classifier(
                self._auto_class(), spec.cut_from, None, self.labels, trust_remote_code=spec.trust_remote_code)
            model = make_student(start, spec.layers_from_teacher, self.calibration)
            if spec.init == "random":
                model = type(model)(model.config)
        elif spec.model_name_or_path or spec.config:
            model = classifier(self._auto_class(), spec.model_name_or_path, spec.config, self.labels,
                               trust_remote_code=spec.trust_remote_code)
        else:
            raise ValueError("student: set layers_from_teacher (e.g. every-other), model_name_or_path or config")
        vocabulary = model.get_input_embeddings().num_embeddings
        if vocabulary < len(self.tokenizer):
            raise ValueError(f"the model's embeddings have {vocabulary:,} rows but the tokenizer has "
                             f"{len(self.tokenizer):,} tokens: they do not belong together")
        if spec.dropout is not None:
            set_dropout(model, spec.dropout)
        features = self.recipe.distillation.features
        if any(attention_signal(name) for f in features for name in (f.student, f.teacher)):
            model.set_attn_implementation("eager")  # attention maps as signals: fused kernels never form them
        return model

    def calibration(self, count: int = 64, batch_size: int = 32) -> list[dict[str, Tensor]]:
        """Training examples spread over the data, as the teacher reads them (for ``influence:N``)."""
        examples = spread(self.train_set, count)
        return [self.collate(examples[i:i + batch_size]).teacher_inputs for i in range(0, len(examples), batch_size)]

    def save_extras(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    # ----- evaluation --------------------------------------------------------------------------

    def predict(self, model: nn.Module, batch_size: int = 64) -> tuple[Tensor, float]:
        """Logits on the eval set and the forward speed in examples/s (tokenisation excluded)."""
        device = next(model.parameters()).device
        batches = [self.collate(self.eval_set[i:i + batch_size]).student_inputs
                   for i in range(0, len(self.eval_set), batch_size)]
        outputs = []
        with evaluating(model):
            synchronize(device)
            start = time.perf_counter()
            for inputs in batches:
                outputs.append(model(**{k: v.to(device) for k, v in inputs.items()}).logits.float().cpu())
            synchronize(device)  # a GPU's queued work is done before the clock stops
            seconds = time.perf_counter() - start
        return torch.cat(outputs), len(self.eval_set) / seconds

    def teacher_logits(self) -> Tensor | None:
        """The run's teacher's logits on the eval set, once the run has its teacher (computed once)."""
        if self.teacher is not None and self._teacher_logits is None:
            self._teacher_logits = self.predict(self.teacher)[0]
        return self._teacher_logits

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Accuracy and macro-F1 on the eval set; agreement and KL with the teacher once there is one."""
        logits, _ = self.predict(model)
        out = {"eval_accuracy": accuracy(logits, self.eval_labels),
               "eval_macro_f1": macro_f1(logits, self.eval_labels, len(self.labels))}
        teacher = self.teacher_logits() if model is not self.teacher else None
        if teacher is not None:
            out["eval_agreement"] = agreement(logits, teacher)
            out["eval_kl_to_teacher"] = held_out_kl(logits, teacher)
        return out

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        """Accuracy, macro-F1, agreement and KL with the teacher, and speed, on the eval set."""
        labels = self.eval_labels
        predictions = {name: self.predict(model.cpu()) for name, model in models.items()}
        teacher = predictions["teacher"][0]
        out: dict[str, Any] = {"models": {}, "headline": list(self.headline), "eval_examples": len(labels),
                               "labels": list(self.labels)}
        for name, (logits, speed) in predictions.items():
            entry: dict[str, Any] = {"parameters": count_parameters(models[name]), "accuracy": accuracy(logits, labels),
                                     "macro_f1": macro_f1(logits, labels, len(self.labels)),
                                     "errors": int((logits.argmax(-1) != labels).sum())}
            if name != "teacher":
                entry["agreement"] = agreement(logits, teacher)
                entry["kl_to_teacher"] = held_out_kl(logits, teacher)
            entry["examples_per_second"] = speed
            out["models"][name] = entry
        # one example's teacher soft targets at several temperatures: what distillation at T transfers
        z = teacher[0].double()
        out["panels"] = [{"title": f"teacher soft targets, one example (label {self.labels[int(labels[0])]})",
                          "xlabel": "class", "ylabel": "probability", "kind": "line",
                          "series": {f"T = {t:g}": {"x": list(range(len(self.labels))),
                                                    "y": soft_targets(z, t).tolist()}
                                     for t in SOFTENING_TEMPERATURES}}]
        return out
