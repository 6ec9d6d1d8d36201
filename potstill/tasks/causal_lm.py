"""Causal language models: plain text packed into blocks, next-token distillation.

Teacher and student share one tokenizer here (a byte-level BPE trained on the training text, or
the teacher's own). The metric that stays fair across tokenizers is bits per byte of held-out
text; agreement (top-1) and KL to the teacher are reported where vocabularies match.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from ..config import ModelSpec, Recipe, TrainSpec, _Section
from ..losses import IGNORE_INDEX, kl_divergence
from ..models import count_parameters, evaluating
from .base import Batch

log = logging.getLogger(__name__)
VENDORED_TEXT = Path(__file__).parent.parent / "data" / "text" / "shakespeare-sample.txt"
EOS = "<|endoftext|>"


class TokenizerSpec(_Section):
    #: a tokenizer to load (hub name or folder); null = train a byte-level BPE on the training text
    model_name_or_path: str | None = None
    vocab_size: int = Field(1024, ge=260)


class TextData(_Section):
    name: Literal["text"] = "text"
    #: training text files; empty = the Shakespeare sample that ships with potstill
    files: list[str] = Field(default_factory=list)
    #: held-out text files; empty = the last ``eval_fraction`` of the training blocks
    eval_files: list[str] = Field(default_factory=list)
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    block_size: int = Field(128, ge=2)
    max_train_blocks: int | None = Field(None, ge=1)
    max_eval_blocks: int | None = Field(None, ge=1)
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)


class LMSpec(ModelSpec):
    """A Llama-style decoder built from its sizes, unless ``model_name_or_path`` is given."""

    architecture: Literal["llama"] = "llama"
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(256, ge=8)


class LMTeacherSpec(LMSpec):
    train: TrainSpec = Field(default_factory=TrainSpec)


class CausalLMRecipe(Recipe):
    task: Literal["causal-lm"] = "causal-lm"
    data: TextData = Field(default_factory=TextData)
    teacher: LMTeacherSpec = Field(default_factory=LMTeacherSpec)
    student: LMSpec = Field(default_factory=LMSpec)


def read_text(path: str | Path) -> str:
    """A text file as str: UTF-8, or Latin-1 for the older files that are not (with a log line)."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        log.info("%s is not UTF-8; reading it as Latin-1", path)
        return raw.decode("latin-1")


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2 style) trained on ``texts``, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS)


def token_byte_lengths(tokenizer) -> Tensor:
    """UTF-8 bytes each token id stands for (for bits per byte)."""
    from tokenizers import pre_tokenizers

    byte_level = isinstance(getattr(tokenizer.backend_tokenizer, "pre_tokenizer", None), pre_tokenizers.ByteLevel)
    lengths = torch.ones(len(tokenizer), dtype=torch.float64)
    for token, index in tokenizer.get_vocab().items():
        if token in tokenizer.all_special_tokens:
            continue
        # byte-level BPE spells each byte as one character; otherwise decode the piece
        lengths[index] = len(token) if byte_level else max(1, len(tokenizer.decode([index]).encode()))
    return lengths


def blocks(ids: list[int], size: int) -> tuple[Tensor, Tensor]:
    """Pack token ids into ``[n, size]`` inputs and their next-token labels."""
    n = (len(ids) - 1) // size
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens: too few for one block of {size}")
    data = torch.tensor(ids[: n * size + 1])
    return data[:-1].view(n, size), data[1:].view(n, size)


class CausalLM:
    """Next-token distillation on packed text blocks."""

    headline = ("bits_per_byte", "agreement")

    def __init__(self, recipe: CausalLMRecipe, progress: bool = True):
        data = recipe.data
        self.recipe, self.progress = recipe, progress
        files = data.files or [str(VENDORED_TEXT)]
        texts = [read_text(f) for f in files]
        if not any(t.strip() for t in texts):
            raise ValueError(f"data.files: no text in {files}")
        source = data.tokenizer.model_name_or_path or recipe.teacher.model_name_or_path
        if source:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=recipe.teacher.trust_remote_code)
        else:
            self.tokenizer = train_tokenizer(texts, data.tokenizer.vocab_size)
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        ids = [i for t in texts for i in self.tokenizer(t)["input_ids"] + eos]
        self.block_size = self._fit_context(data.block_size)
        inputs, labels = blocks(ids, self.block_size)
        if data.eval_files:
            eval_ids = [i for f in data.eval_files for i in self.tokenizer(read_text(f))["input_ids"] + eos]
            eval_inputs, eval_labels = blocks(eval_ids, self.block_size)
        else:
            n_eval = max(1, round(len(inputs) * data.eval_fraction))
            inputs, eval_inputs = inputs[:-n_eval], inputs[-n_eval:]
            labels, eval_labels = labels[:-n_eval], labels[-n_eval:]
        if data.max_train_blocks:
            inputs, labels = inputs[: data.max_train_blocks], labels[: data.max_train_blocks]
        if data.max_eval_blocks:
            eval_inputs, eval_labels = eval_inputs[: data.max_eval_blocks], eval_labels[: data.max_eval_blocks]
        if len(inputs) == 0:
            raise ValueError("no training blocks left after the eval split: add text or lower block_size")
        self.train_set = self.transfer_set = TensorDataset(inputs, labels)
        self.eval_set: Dataset = TensorDataset(eval_inputs, eval_labels)
        self.byte_lengths = token_byte_lengths(self.tokenizer)

    def _fit_context(self, block_size: int) -> int:
        """Blocks longer than a pretrained model's context are cut to it, with a warning."""
        from transformers import AutoConfig

        limits = []
        for spec in (self.recipe.teacher, self.recipe.student):
            if spec.model_name_or_path:
                config = AutoConfig.from_pretrained(spec.model_name_or_path, trust_remote_code=spec.trust_remote_code)
                limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                if limit:
                    limits.append(int(limit))
        if limits and block_size > min(limits):
            log.warning("data.block_size %d is longer than the models' context (%d tokens): sequences are cut to %d",
                        block_size, min(limits), min(limits))
            return min(limits)
        return block_size

    @staticmethod
    def collate(examples: list[tuple[Tensor, Tensor]]) -> Batch:
        inputs = {"input_ids": torch.stack([x for x, _ in examples])}
        return Batch(student_inputs=inputs, teacher_inputs=inputs, labels=torch.stack([y for _, y in examples]))

    def training_collate(self, spec: ModelSpec):
        return self.collate

    def build_model(self, spec: LMSpec) -> nn.Module:
        from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

        if spec.model_name_or_path:
            return AutoModelForCausalLM.from_pretrained(spec.model_name_or_path, use_safetensors=True,
                                                        trust_remote_code=spec.trust_remote_code)
        if spec.hidden_size % spec.num_heads:
            raise ValueError(f"hidden_size {spec.hidden_size} must be a multiple of num_heads {spec.num_heads}")
        config = LlamaConfig(
            vocab_size=len(self.tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size, max_position_embeddings=self.block_size,
            eos_token_id=self.tokenizer.eos_token_id, bos_token_id=None, pad_token_id=None,
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(config)

    def save_extras(self, folder: Path) -> None:
        """Save the tokenizer beside a model, so the folder loads with plain from_pretrained."""
        self.tokenizer.save_pretrained(folder)

    def _scores(self, models: dict[str, nn.Module], batch_size: int = 16) -> dict[str, dict[str, float]]:
        """Held-out nats, bytes, and (vs the teacher, if present) agreement and KL for each model."""
        with evaluating(*models.values()):
            totals = self._totals(models, batch_size)
        return self._summarise(totals, "teacher" in models)

    def _totals(self, models: dict[str, nn.Module], batch_size: int) -> dict[str, dict[str, float]]:
        totals = {name: {"nats": 0.0, "bytes": 0.0, "tokens": 0, "agree": 0, "kl": 0.0} for name in models}
        size = len(self.eval_set)  # type: ignore[arg-type]
        for start in tqdm(range(0, size, batch_size), desc="evaluating", leave=False, disable=not self.progress):
            batch = self.collate([self.eval_set[i] for i in range(start, min(start + batch_size, size))])
            keep = batch.labels != IGNORE_INDEX
            targets = batch.labels[keep]
            logits = {}
            for name, model in models.items():
                device = next(model.parameters()).device
                out = model(input_ids=batch.student_inputs["input_ids"].to(device))
                logits[name] = out.logits.float().cpu()[keep]
            for name, value in logits.items():
                t = totals[name]
                t["nats"] += torch.nn.functional.cross_entropy(value, targets, reduction="sum").item()
                t["bytes"] += self.byte_lengths[targets].sum().item()
                t["tokens"] += len(targets)
                if "teacher" in logits and name != "teacher":
                    t["agree"] += (value.argmax(-1) == logits["teacher"].argmax(-1)).sum().item()
                    t["kl"] += kl_divergence(value, logits["teacher"], reduction="sum").item()
        return totals

    @staticmethod
    def _summarise(totals: dict[str, dict[str, float]], has_teacher: bool) -> dict[str, dict[str, float]]:
        scores = {}
        for name, t in totals.items():
            entry = {"eval_loss": t["nats"] / t["tokens"], "bits_per_byte": t["nats"] / math.log(2) / t["bytes"]}
            if name != "teacher" and has_teacher:
                entry["agreement"] = t["agree"] / t["tokens"]
                entry["kl_to_teacher"] = t["kl"] / t["tokens"]
            scores[name] = entry
        return scores

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        score = self._scores({"model": model})["model"]
        return {"eval_bits_per_byte": score["bits_per_byte"], "eval_loss": score["eval_loss"]}

    def compare(self, models: dict[str, nn.Module]) -> dict[str, Any]:
        scores = self._scores({name: m.cpu() for name, m in models.items()})
        for name, model in models.items():
            scores[name] = {"parameters": count_parameters(model), **scores[name]}
        eval_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in self.eval_set)  # type: ignore[attr-defined]
        return {"models": scores, "headline": list(self.headline), "eval_tokens": eval_tokens,
                "vocab_size": len(self.tokenizer)}
