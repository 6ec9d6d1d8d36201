"""Causal language models: next-token distillation on plain text or prompt/completion pairs.

The teacher comes from a hub name, a local folder or a GGUF file (see :mod:`potstill.pretrained`),
or is trained here; the student is cut from the teacher (``layers_from_teacher``), loaded, or
built from sizes. Teacher and student share a tokenizer (KL family; heads that differ only by
padding rows are compared on the shared range) or not (``student.tokenizer``: ULD over aligned
positions, see :mod:`.lm_data`). On-policy and sequence-level distillation: :mod:`.lm_generation`.

The metric that stays fair across tokenizers is bits per byte of held-out text; agreement
(top-1) and KL to the teacher are reported where vocabularies match.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from ..config import ModelSpec, Recipe, RecipeError, TrainSpec, _Section
from ..data import VENDORED_OUT_OF_DOMAIN, VENDORED_TEXT
from ..data.text import read_text
from ..io import write_json
from ..losses import IGNORE_INDEX, get_loss, kl_divergence
from ..models import count_parameters, evaluating
from ..pretrained import Source as ModelSource
from ..pretrained import load_causal_lm, load_tokenizer, max_context, resolve
from ..progress import progress
from ..students import LayerSelection, make_student, transfer_vocabulary
from .base import Batch, Task
from .lm_data import (
    Encoder,
    collate,
    completion_tokens,
    read_pairs,
    spread,
    teacher_view,
    text_chunks,
    train_tokenizer,
)
from .lm_generation import OnPolicy, teacher_generations

log = logging.getLogger(__name__)
GENERATIONS = "teacher-generations.json"

__all__ = ["CausalLM", "CausalLMRecipe"]


class TokenizerSpec(_Section):
    #: a tokenizer to load (hub name or folder); null = train a byte-level BPE on the training text
    model_name_or_path: str | None = None
    vocab_size: int = Field(1024, ge=260)


class _LMData(_Section):
    #: held-out files; empty = the last ``eval_fraction`` of the training examples
    eval_files: list[str] = Field(default_factory=list)
    #: more held-out text, each set scored on its own (``bits_per_byte_<name>``, …): by default a State of
    #: the Union address, text of another domain than the training text; ``{}`` for none
    extra_eval: dict[str, list[str]] = Field(default_factory=lambda: {"out_of_domain": [str(VENDORED_OUT_OF_DOMAIN)]})
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(None, ge=1)
    #: the teacher's tokenizer, and the student's unless ``student.tokenizer`` names another;
    #: null fields = the teacher's own, or a BPE trained on the text for a teacher trained here
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    #: with two tokenizers: pair the k-th completion tokens ("position", as the ULD paper), or
    #: positions at which both models have read the same text, by byte offsets ("offsets")
    alignment: Literal["position", "offsets"] = "position"


class TextData(_LMData):
    name: Literal["text"] = "text"
    #: training text files (one document each); empty = the Shakespeare sample that ships with potstill
    files: list[str] = Field(default_factory=list)
    #: tokens per example; a chunk never spans two files, so documents do not attend to each other
    block_size: int = Field(128, ge=2)


class PairsData(_LMData):
    name: Literal["pairs"] = "pairs"
    #: JSON-lines files of {"prompt", "completion"} or {"messages": [...]}; loss on completions only
    files: list[str] = Field(min_length=1)
    #: tokens per example (prompt + completion); longer ones are truncated with a warning
    max_length: int = Field(512, ge=2)


class GenerationSpec(_Section):
    """Completions written by a model during or before training (see potstill.tasks.lm_generation)."""

    #: λ: the fraction of batches whose completions the student samples itself (on-policy, GKD)
    on_policy: float = Field(0.0, ge=0, le=1)
    #: train the student on completions the teacher wrote (sequence-level KD)
    sequence_level: bool = False
    #: sampling temperature (0 = greedy)
    temperature: float = Field(1.0, ge=0)
    #: plain text: the share of each chunk given as the prompt
    prompt_fraction: float = Field(0.5, gt=0, lt=1)
    #: pairs: tokens to generate per completion (null: the data's completion length); plain text: the rest of the chunk
    max_new_tokens: int | None = Field(None, ge=1)
    #: sequences the teacher writes at once (sequence-level KD); larger is faster on a GPU
    batch_size: int = Field(16, ge=1)


class LMSpec(ModelSpec):
    """A causal LM: loaded (``model_name_or_path``, ``gguf_file``), cut from the teacher
    (``layers_from_teacher``), or a Llama-style decoder built from its sizes."""

    #: a GGUF file inside ``model_name_or_path`` (or give the ``.gguf`` path itself)
    gguf_file: str | None = None
    #: cut this student from the (pretrained) teacher, keeping these layers: "every-other", "first-last",
    #: [0, 2, 4], or "influence:N" (the N layers that change the hidden state most on the training text)
    layers_from_teacher: LayerSelection | None = None
    #: "teacher": the kept layers keep the teacher's weights; "random": same shape, fresh weights
    init: Literal["teacher", "random"] = "teacher"
    #: the student's own tokenizer when it differs from the teacher's (distil with loss: uld)
    tokenizer: TokenizerSpec | None = None
    architecture: Literal["llama"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)

    def source(self) -> ModelSource | None:
        return resolve(self.model_name_or_path, self.gguf_file) if self.model_name_or_path else None


class LMTeacherSpec(LMSpec):
    train: TrainSpec = Field(default_factory=TrainSpec)


class CausalLMRecipe(Recipe):
    task: Literal["causal-lm"] = "causal-lm"
    data: Annotated[TextData | PairsData, Field(discriminator="name")] = Field(default_factory=TextData)
    teacher: LMTeacherSpec = Field(default_factory=LMTeacherSpec)
    student: LMSpec = Field(default_factory=LMSpec)
    generation: GenerationSpec = Field(default_factory=GenerationSpec)


@dataclass
class EvalSet:
    """Held-out examples and the characters per byte of their text (for bits per character)."""

    examples: list[dict[str, Any]]
    chars_per_byte: float


def _chars_per_byte(sources: list[Any]) -> float:
    text = "".join(c for _, c in sources)
    return len(text) / max(1, len(text.encode()))


def _head_rows(model: nn.Module) -> int | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "out_features", None)


class CausalLM(Task):
    """Next-token distillation; examples are built by :class:`~.lm_data.Encoder`."""

    name = "causal-lm"
    recipe_type = CausalLMRecipe
    headline = ("bits_per_byte", "agreement")

    def __init__(self, recipe: CausalLMRecipe, progress: bool = True):
        super().__init__(recipe, progress)
        r, data = recipe, recipe.data
        self._teacher: nn.Module | None = None
        train_texts, train_sources, eval_sources = self._sources(data)
        self.teacher_tokenizer = self._tokenizer(data.tokenizer, r.teacher.source(), train_texts, r.teacher)
        self.tokenizer = self._student_tokenizer(train_texts)
        self.cross = self.tokenizer.get_vocab() != self.teacher_tokenizer.get_vocab()
        self._check_cross_tokenizer()
        self._check_generation()
        # a sequence of n tokens feeds the model n - 1 positions (the last token is only a label)
        max_length = 1 + self._fit_context(data.block_size if isinstance(data, TextData) else data.max_length - 1)
        if isinstance(data, TextData):
            train_sources = [("", c) for text in train_sources for c in text_chunks(text, self.tokenizer, max_length)]
            eval_sources = [("", c) for text in eval_sources for c in text_chunks(text, self.tokenizer, max_length)]
        if not eval_sources:
            n_eval = max(1, round(len(train_sources) * data.eval_fraction))
            train_sources, eval_sources = train_sources[:-n_eval], train_sources[-n_eval:]
        train_sources, eval_sources = spread(train_sources, data.max_train_examples), \
            spread(eval_sources, data.max_eval_examples)
        self.encode = Encoder(self.tokenizer, self.teacher_tokenizer if self.cross else None, max_length,
                              data.alignment)
        self.train_sources = train_sources
        self.train_set = self.transfer_set = self.encode.many(train_sources)
        self.eval_set = self.encode.many(eval_sources)
        if not self.train_set:
            raise ValueError("no training examples: add text, or lower data.block_size (data.max_length for pairs)")
        if not self.eval_set:
            raise ValueError("no held-out examples: add data.eval_files or raise data.eval_fraction")
        #: the held-out sets scored: "" (the eval set), then each of data.extra_eval
        self.eval_sets = {"": EvalSet(self.eval_set, _chars_per_byte(eval_sources))}
        for name, files in data.extra_eval.items():
            sources = [("", c) for f in files for c in text_chunks(read_text(f), self.tokenizer, max_length)]
            examples = self.encode.many(spread(sources, data.max_eval_examples))
            if not examples:
                raise ValueError(f"data.extra_eval.{name}: no held-out chunk of {max_length} tokens in {files}")
            self.eval_sets[name] = EvalSet(examples, _chars_per_byte(sources))
        self.headline = ("bits_per_byte", *(f"bits_per_byte_{n}" for n in data.extra_eval), "agreement")
        #: logit terms compare this many entries (heads may carry padding rows beyond the tokenizer)
        self.shared_vocab_size = None if self.cross else len(self.tokenizer)

    # ----- data and tokenizers -----------------------------------------------------------------

    def _sources(self, data: TextData | PairsData) -> tuple[list[str], list[Any], list[Any]]:
        """Texts to train a tokenizer on, and the training and held-out material (texts or pairs)."""
        if isinstance(data, TextData):
            files = data.files or [str(VENDORED_TEXT)]
            texts = [read_text(f) for f in files]
            if not any(t.strip() for t in texts):
                raise ValueError(f"data.files: no text in {files}")
            return texts, texts, [read_text(f) for f in data.eval_files]
        pairs = [s for f in data.files for s in read_pairs(f)]
        eval_pairs = [s for f in data.eval_files for s in read_pairs(f)]
        texts = [p if isinstance(p, str) else " ".join(m["content"] for m in p) for p, _ in pairs]
        return texts + [c for _, c in pairs], pairs, eval_pairs

    def _tokenizer(self, spec: TokenizerSpec, model: ModelSource | None, texts: list[str], owner: LMSpec) -> Any:
        source = resolve(spec.model_name_or_path) if spec.model_name_or_path else model
        if source is not None:
            return load_tokenizer(source, owner.trust_remote_code)
        return train_tokenizer(texts, spec.vocab_size)

    def _student_tokenizer(self, texts: list[str]) -> Any:
        student = self.recipe.student
        if student.tokenizer is not None:
            return self._tokenizer(student.tokenizer, None, texts, student)
        if student.model_name_or_path:
            try:
                return load_tokenizer(student.source(), student.trust_remote_code)
            except (OSError, ValueError):
                log.info("student %s has no tokenizer of its own: using the teacher's", student.model_name_or_path)
        return self.teacher_tokenizer

    def _check_cross_tokenizer(self) -> None:
        r = self.recipe
        if not self.cross:
            return
        loss = r.distillation.loss
        if get_loss(loss).kind != "cross-vocabulary" and r.distillation.alpha > 0:
            raise RecipeError(
                f"field 'distillation.loss': the student's tokenizer ({len(self.tokenizer):,} tokens) differs from "
                f"the teacher's ({len(self.teacher_tokenizer):,}), so {loss!r} would compare unrelated token ids. "
                "Use loss: uld (distillation across tokenizers), or give the student the teacher's tokenizer.")
        if not r.teacher.model_name_or_path:
            raise RecipeError("field 'teacher.model_name_or_path': distillation across tokenizers needs a "
                              "pretrained teacher (the teacher trained here would use the student's data tokenizer)")
        if r.generation.on_policy > 0:
            raise RecipeError("field 'generation.on_policy': on-policy distillation needs one tokenizer "
                              "(the teacher scores the student's tokens); use generation.sequence_level instead")
        if r.teacher_cache is not None:
            raise RecipeError("field 'teacher_cache': a cached teacher is not supported across tokenizers yet")

    def _check_generation(self) -> None:
        g, cached = self.recipe.generation, self.recipe.teacher_cache is not None
        if cached and (g.on_policy > 0 or g.sequence_level):
            raise RecipeError("field 'teacher_cache': on-policy and sequence-level distillation need the live "
                              "teacher (the cache holds its outputs on the data's own completions)")

    def _fit_context(self, length: int) -> int:
        """Input positions, cut to a pretrained model's context (with a warning) when longer."""
        limits = [max_context(spec.source(), spec.trust_remote_code)
                  for spec in (self.recipe.teacher, self.recipe.student) if spec.model_name_or_path]
        limits = [limit for limit in limits if limit]
        if limits and length > min(limits):
            log.warning("sequences of %d positions are longer than the models' context (%d tokens): cut to %d",
                        length, min(limits), min(limits))
            return min(limits)
        return length

    def collate(self, examples: list[dict[str, Any]]) -> Batch:
        return collate(examples)

    # ----- models ------------------------------------------------------------------------------

    def pretrained_teacher(self) -> nn.Module:
        """The recipe's pretrained teacher, loaded once."""
        spec = self.recipe.teacher
        if spec.model_name_or_path is None:
            raise RecipeError("field 'student.layers_from_teacher': needs a pretrained teacher "
                              "(teacher.model_name_or_path)")
        if self._teacher is None:
            self._teacher = load_causal_lm(spec.source(), spec.trust_remote_code)
        return self._teacher

    def build_model(self, spec: LMSpec) -> nn.Module:
        if isinstance(spec, LMTeacherSpec) and spec.model_name_or_path:
            model = self.pretrained_teacher()
        elif spec.model_name_or_path:
            model = load_causal_lm(spec.source(), spec.trust_remote_code)
        elif spec.layers_from_teacher is not None:
            model = make_student(self.pretrained_teacher(), spec.layers_from_teacher, self.calibration)
            if self.cross:  # the student reads its own tokenizer: re-key the teacher's embeddings to it
                transfer_vocabulary(model, self.teacher_tokenizer, self.tokenizer)
            if spec.init == "random":
                model.init_weights()
        else:
            model = self._llama(spec)
        self._check_vocabulary(model, teacher=isinstance(spec, LMTeacherSpec))
        return model

    def calibration(self, count: int = 16, batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
        """Training examples spread over the data, as the teacher reads them (for ``influence:N``)."""
        examples = spread(self.train_set, count)
        return [collate(examples[i:i + batch_size]).teacher_inputs for i in range(0, len(examples), batch_size)]

    def _llama(self, spec: LMSpec) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        if spec.hidden_size % spec.num_heads:
            raise ValueError(f"hidden_size {spec.hidden_size} must be a multiple of num_heads {spec.num_heads}")
        tokenizer = self.teacher_tokenizer if isinstance(spec, LMTeacherSpec) else self.tokenizer
        config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size, max_position_embeddings=self.encode.max_length - 1,
            eos_token_id=tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None, tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    def _check_vocabulary(self, model: nn.Module, teacher: bool) -> None:
        """Every token must have a head row; extra rows are padding, left out of the comparison."""
        rows, tokenizer = _head_rows(model), (self.teacher_tokenizer if teacher else self.tokenizer)
        if rows is None:
            return
        if rows < len(tokenizer):
            raise ValueError(f"the {'teacher' if teacher else 'student'}'s output head has {rows:,} rows but its "
                             f"tokenizer {len(tokenizer):,} tokens: they do not belong together")
        if rows > len(tokenizer) and not self.cross:
            log.info("the %s's head has %s rows, %s of them real tokens: logits are compared on the shared %s "
                     "(the rest is padding)", "teacher" if teacher else "student", f"{rows:,}",
                     f"{len(tokenizer):,}", f"{len(tokenizer):,}")

    def save_extras(self, folder: Path) -> None:
        """Save the tokenizer beside a model, so the folder loads with plain from_pretrained."""
        self.tokenizer.save_pretrained(folder)

    # ----- generation --------------------------------------------------------------------------

    def rollout(self, seed: int) -> OnPolicy | None:
        """The engine's on-policy hook for the distilled student (None when λ = 0)."""
        g = self.recipe.generation
        if g.on_policy == 0:
            return None
        return OnPolicy(g.on_policy, temperature=g.temperature, prompt_fraction=g.prompt_fraction,
                        max_new_tokens=g.max_new_tokens, eos_token_id=self.tokenizer.eos_token_id, seed=seed)

    def distillation_set(self, teacher: nn.Module, run_dir: Path) -> list[dict[str, Any]]:
        """The examples the student distils on: the data's, or the teacher's own completions
        (sequence-level KD, written once and kept in the run dir)."""
        g = self.recipe.generation
        if not g.sequence_level:
            return self.transfer_set
        path = run_dir / GENERATIONS
        if path.is_file():
            import json

            sources = [tuple(s) for s in json.loads(path.read_text())]
        else:
            sources = teacher_generations(
                teacher, self.teacher_tokenizer, self.train_sources, max_length=self.encode.max_length,
                temperature=g.temperature,
                prompt_fraction=g.prompt_fraction, max_new_tokens=g.max_new_tokens,
                seed=self.recipe.train.seed, batch_size=g.batch_size, progress=self.progress)
            write_json(path, sources)
        return self.encode.many(sources)

    # ----- evaluation --------------------------------------------------------------------------

    def _scores(self, models: dict[str, nn.Module], batch_size: int = 16) -> dict[str, dict[str, float]]:
        """Held-out nats, bytes, and (vs the teacher, same vocabulary) agreement and KL for each model,
        on every held-out set (the extra sets' metrics carry their name: ``bits_per_byte_<name>``)."""
        scores: dict[str, dict[str, float]] = {name: {} for name in models}
        with evaluating(*models.values()):
            for set_name, held_out in self.eval_sets.items():
                totals = self._totals(models, held_out.examples, batch_size)
                summary = self._summarise(totals, "teacher" in models and not self.cross, held_out.chars_per_byte)
                for name, entry in summary.items():
                    scores[name].update({f"{k}_{set_name}" if set_name else k: v for k, v in entry.items()})
        return scores

    def _totals(self, models: dict[str, nn.Module], eval_set: list[dict[str, Any]],
                batch_size: int) -> dict[str, dict[str, float]]:
        totals = {name: {"nats": 0.0, "bytes": 0.0, "tokens": 0, "agree": 0, "kl": 0.0} for name in models}
        bytes_of = {"student": self.encode.student_bytes, "teacher": self.encode.teacher_bytes}
        size = len(eval_set)
        for start in progress(range(0, size, batch_size), desc="evaluating", leave=False, enabled=self.progress):
            examples = eval_set[start:start + batch_size]
            batches = {"student": collate(examples)}
            batches["teacher"] = collate([teacher_view(e) for e in examples]) if self.cross else batches["student"]
            logits = {}
            for name, model in models.items():
                side = "teacher" if name == "teacher" and self.cross else "student"
                batch = batches[side].to(next(model.parameters()).device)  # scored where the model is
                keep = batch.labels != IGNORE_INDEX
                value = model(**batch.student_inputs).logits.float()[keep]
                targets = batch.labels[keep]
                logits[name] = value[:, : self.shared_vocab_size] if self.shared_vocab_size else value
                t = totals[name]
                t["nats"] += torch.nn.functional.cross_entropy(value, targets, reduction="sum").item()
                t["bytes"] += bytes_of[side][targets.cpu()].sum().item()
                t["tokens"] += len(targets)
            if "teacher" in logits and not self.cross:
                for name, value in logits.items():
                    if name != "teacher":
                        target = logits["teacher"].to(value.device)
                        totals[name]["agree"] += (value.argmax(-1) == target.argmax(-1)).sum().item()
                        totals[name]["kl"] += kl_divergence(value, target, reduction="sum").item()
        return totals

    @staticmethod
    def _summarise(totals: dict[str, dict[str, float]], vs_teacher: bool,
                   chars_per_byte: float) -> dict[str, dict[str, float]]:
        scores = {}
        for name, t in totals.items():
            bits_per_byte = t["nats"] / math.log(2) / t["bytes"]
            entry = {"eval_loss": t["nats"] / t["tokens"], "bits_per_byte": bits_per_byte,
                     "bits_per_char": bits_per_byte / chars_per_byte}
            if name != "teacher" and vs_teacher:
                entry["agreement"] = t["agree"] / t["tokens"]
                entry["kl_to_teacher"] = t["kl"] / t["tokens"]
            scores[name] = entry
        return scores

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Bits per byte on every held-out set, and (once the run has its teacher) KL to it and agreement."""
        models = {"model": model, **({"teacher": self.teacher} if self.teacher is not None else {})}
        score = self._scores(models)["model"]
        keep = ("bits_per_byte", "kl_to_teacher", "agreement")
        return {f"eval_{k}": v for k, v in score.items() if k.startswith(keep)}

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        scores = self._scores(models)
        for name, model in models.items():
            scores[name] = {"parameters": count_parameters(model), **scores[name]}
        eval_tokens = sum(completion_tokens(e) for e in self.eval_set)
        return {"models": scores, "headline": list(self.headline), "eval_tokens": eval_tokens,
                "vocab_size": len(self.tokenizer), "teacher_vocab_size": len(self.teacher_tokenizer)}
