"""Sentence embeddings (DistilBERT-style): a shallower encoder cut from a pretrained one.

The signal is the mean-pooled last hidden state (the sentence-transformers embedding); hidden
states of chosen layers are matched through feature terms. There are no labels: the student
learns only from the teacher, and the comparison is about how well it reproduces the teacher's
embedding geometry on held-out sentences.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from ..config import ModelSpec, Recipe, _Section
from ..data import VENDORED_SENTENCES
from ..data.hf import DatasetSpec, data_section
from ..data.text import read_text
from ..models import count_parameters, evaluating
from ..pretrained import MINILM, resolve
from ..signals import attention_signal
from ..students import LayerSelection, make_student
from .base import Batch, Task, synchronize
from .lm_data import spread


class SentencesData(_Section):
    name: Literal["sentences"] = "sentences"
    #: text files with one sentence per line; empty = the sentence-polarity sample shipped with potstill
    files: list[str] = Field(default_factory=list)
    #: the last N sentences are held out for evaluation
    eval_size: int = Field(1000, ge=10)
    max_train: int | None = Field(None, ge=1)
    max_length: int = Field(64, ge=4)


class SentencesDatasetData(DatasetSpec):
    """Sentences from a ``datasets`` source (``text_column``); held out: ``eval_split`` or ``eval_size`` rows."""

    max_length: int = Field(64, ge=4)

    def sentences(self) -> tuple[list[str], list[str]]:
        splits = self.load(["text"])
        train, held_out = ([t.strip() for t in rows["text"] if isinstance(t, str) and t.strip()] for rows in splits)
        for split, rows in (("train", train), ("held-out", held_out)):
            if not rows:
                raise ValueError(f"data.text_column: the {split} rows of {self.source} hold no text")
        return train, held_out


class EncoderSpec(ModelSpec):
    #: cut this student from the teacher, keeping these layers ("every-other", "first-last", [0, 2, 4],
    #: or "influence:N": the N layers that change the hidden state most on the training sentences)
    layers_from_teacher: LayerSelection | None = None
    #: "teacher": the kept layers keep the teacher's weights; "random": same shape, fresh weights
    init: Literal["teacher", "random"] = "teacher"
    #: dropout probability of every dropout layer while training (null: the model's own, 0.1 for BERTs)
    dropout: float | None = Field(None, ge=0, lt=1)


class EncoderTeacherSpec(EncoderSpec):
    @model_validator(mode="after")
    def _pretrained(self) -> EncoderTeacherSpec:
        if not self.model_name_or_path:
            raise ValueError(f"a sentence-embedding teacher must be pretrained: set model_name_or_path "
                             f"(e.g. {MINILM})")
        return self


class SentenceEmbeddingRecipe(Recipe):
    task: Literal["sentence-embedding"] = "sentence-embedding"
    data: data_section({"sentences": SentencesData, "dataset": SentencesDatasetData},  # type: ignore[valid-type]
                       default="sentences") = Field(default_factory=SentencesData)
    teacher: EncoderTeacherSpec = Field(default_factory=lambda: EncoderTeacherSpec(model_name_or_path=MINILM))
    student: EncoderSpec = Field(default_factory=lambda: EncoderSpec(layers_from_teacher="every-other"))
    baseline: bool = False  # no labels to train a scratch baseline on; the truncated student is the baseline


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder whose output is the mean of its last hidden state over the attention mask."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kwargs: Any) -> Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)

    def save_pretrained(self, folder: str | Path, **kwargs: Any) -> None:
        self.model.save_pretrained(folder, **kwargs)


def rank(values: Tensor) -> Tensor:
    out = torch.empty_like(values)
    out[values.argsort()] = torch.arange(len(values), dtype=values.dtype)
    return out


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (ties are vanishingly rare for float similarities)."""
    ra, rb = rank(a.double()), rank(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return (ra @ rb / (ra.norm() * rb.norm())).item()


def geometry(student: Tensor, teacher: Tensor, k: int = 10) -> dict[str, float]:
    """How well student embeddings reproduce the teacher's: cosine, similarity ranks, neighbours."""
    s, t = nn.functional.normalize(student.double(), dim=-1), nn.functional.normalize(teacher.double(), dim=-1)
    sim_s, sim_t = s @ s.T, t @ t.T
    upper = torch.triu_indices(len(s), len(s), offset=1)
    eye = torch.eye(len(s), dtype=torch.bool)
    top_s = sim_s.masked_fill(eye, -2).topk(k, dim=-1).indices
    top_t = sim_t.masked_fill(eye, -2).topk(k, dim=-1).indices
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_s, top_t, strict=True))
    return {
        "cosine_to_teacher": (s * t).sum(-1).mean().item(),
        "spearman": spearman(sim_s[upper[0], upper[1]], sim_t[upper[0], upper[1]]),
        f"top{k}_overlap": overlap / (k * len(s)),
    }


class SentenceEmbedding(Task):
    """DistilBERT-style: an encoder student cut from a pretrained encoder, matched on pooled embeddings."""

    name = "sentence-embedding"
    recipe_type = SentenceEmbeddingRecipe
    headline = ("spearman", "top10_overlap", "cosine_to_teacher")

    def __init__(self, recipe: SentenceEmbeddingRecipe, progress: bool = True):
        from transformers import AutoTokenizer

        super().__init__(recipe, progress)
        data = recipe.data
        self.teacher_path = resolve(recipe.teacher.model_name_or_path or MINILM).path
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_path)
        if isinstance(data, SentencesDatasetData):  # max_train rows are spread over the split already
            self.train_set, self.eval_set = data.sentences()
        else:
            files = data.files or [str(VENDORED_SENTENCES)]
            sentences = [line.strip() for f in files for line in read_text(f).splitlines() if line.strip()]
            if len(sentences) <= data.eval_size:
                raise ValueError(f"data.files: {len(sentences)} sentences, but eval_size is {data.eval_size}")
            train = sentences[: -data.eval_size]
            self.train_set = train[: data.max_train] if data.max_train else train
            self.eval_set = sentences[-data.eval_size :]
        self.transfer_set = self.train_set
        self._teacher_embeddings: Tensor | None = None

    def collate(self, sentences: list[str]) -> Batch:
        enc = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.recipe.data.max_length,
                             return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return Batch(student_inputs=inputs, teacher_inputs=inputs, mask=enc["attention_mask"])

    def _pretrained(self, path: str, trust_remote_code: bool = False) -> nn.Module:
        from transformers import AutoModel

        return AutoModel.from_pretrained(resolve(path).path, use_safetensors=True,
                                         trust_remote_code=trust_remote_code)

    def build_model(self, spec: EncoderSpec) -> nn.Module:
        if spec.layers_from_teacher is not None:
            model = make_student(self._pretrained(self.teacher_path), spec.layers_from_teacher, self.calibration)
            if spec.init == "random":
                model = type(model)(model.config)
        elif spec.model_name_or_path:
            model = self._pretrained(spec.model_name_or_path, spec.trust_remote_code)
        else:
            raise ValueError("student: set layers_from_teacher (e.g. every-other) or model_name_or_path")
        if spec.dropout is not None:
            for module in model.modules():
                if isinstance(module, nn.Dropout):
                    module.p = spec.dropout
            for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
                if hasattr(model.config, name):
                    setattr(model.config, name, spec.dropout)
        features = self.recipe.distillation.features
        if any(attention_signal(name) for f in features for name in (f.student, f.teacher)):
            model.set_attn_implementation("eager")  # attention maps as signals: fused kernels never form them
        return SentenceEncoder(model)

    def calibration(self, count: int = 64, batch_size: int = 32) -> list[dict[str, Tensor]]:
        """Training sentences spread over the data, as the teacher reads them (for ``influence:N``)."""
        sentences = spread(self.train_set, count)
        return [self.collate(sentences[i:i + batch_size]).teacher_inputs for i in range(0, len(sentences), batch_size)]

    def load_model(self, folder: Path) -> nn.Module:
        return SentenceEncoder(self._pretrained(str(folder)))

    def save_extras(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(folder)

    def embed(self, model: nn.Module, sentences: list[str], batch_size: int = 64) -> tuple[Tensor, float]:
        """Embeddings of ``sentences`` and the forward speed in sentences/s (tokenisation excluded)."""
        device = next(model.parameters()).device
        batches = [self.collate(sentences[i : i + batch_size]).student_inputs
                   for i in range(0, len(sentences), batch_size)]
        outputs = []
        with evaluating(model):
            synchronize(device)
            start = time.perf_counter()
            for inputs in batches:
                outputs.append(model(**{k: v.to(device) for k, v in inputs.items()}).float().cpu())
            synchronize(device)  # a GPU's queued work is done before the clock stops
            seconds = time.perf_counter() - start
        return torch.cat(outputs), len(sentences) / seconds

    def teacher_embeddings(self) -> Tensor:
        if self._teacher_embeddings is None:
            self._teacher_embeddings = self.embed(self.build_model(self.recipe.teacher), self.eval_set)[0]
        return self._teacher_embeddings

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        embeddings = self.embed(model, self.eval_set)[0]
        return {"eval_spearman": geometry(embeddings, self.teacher_embeddings())["spearman"]}

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        models = dict(models)
        if self.recipe.student.layers_from_teacher is not None:
            models["truncated, not distilled"] = self.build_model(self.recipe.student)
        out: dict[str, Any] = {"models": {}, "headline": list(self.headline), "eval_sentences": len(self.eval_set)}
        teacher, _ = self.embed(models["teacher"].cpu(), self.eval_set)
        self._teacher_embeddings = teacher
        for name, model in models.items():
            embeddings, speed = self.embed(model.cpu(), self.eval_set)
            out["models"][name] = {"parameters": count_parameters(model), **geometry(embeddings, teacher),
                                   "sentences_per_second": speed}
        return out
