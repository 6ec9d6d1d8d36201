"""The recipe schema: typed, validated on load, with errors that name the field.

A recipe is a YAML file (or a built-in name; :mod:`potstill.recipes` loads both). Every section is a
pydantic model that forbids unknown keys, so a typo is an error with a "did you mean", and a
value out of range (``temperature: 0``, ``alpha: 1.5``) names the field and the allowed range.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .losses import LOSSES, check_params


class _RecipeLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false. A bare ``no`` / ``off`` stays a string, so
    ``mixed_precision: no`` means "no"; pydantic still reads such strings as booleans where a
    field is a boolean."""


_BOOL = "tag:yaml.org,2002:bool"
_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainSpec(_Section):
    """How to train one model (the student, or a teacher trained from data)."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float | None = Field(None, gt=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    #: compute LM logits chunk by chunk inside the loss (losses.fused): true / false, or "auto" =
    #: for Hugging Face LMs with a vocabulary of 32,768 or more, trained in one process (live or cached teacher)
    fused_loss: Literal["auto"] | bool = "auto"
    #: batch examples of similar length together (text of mixed lengths pads less; same order on resume)
    group_by_length: bool = False
    #: save a checkpoint every N optimiser steps (0: only at the end of each epoch)
    checkpoint_every: int = Field(0, ge=0)
    #: also evaluate every N optimiser steps (0: only at the end of each epoch)
    eval_every: int = Field(0, ge=0)
    #: experiment trackers that receive every logged row and the final metrics, through accelerate
    #: (tensorboard, wandb, mlflow, …; their packages must be installed); logs go to the run directory.
    #: Read from the recipe's top-level ``train`` section for the whole run.
    report_to: list[str] = Field(default_factory=list)
    seed: int = 0

    @field_validator("report_to")
    @classmethod
    def _known_trackers(cls, names: list[str]) -> list[str]:
        from accelerate.utils import LoggerType

        known = [t.value for t in LoggerType if t.value != "all"]
        for name in names:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"unknown tracker {name!r}; accelerate knows: {', '.join(known)}{hint}")
        return names


class ModelSpec(_Section):
    """Where a model comes from; tasks extend it with what they can build from scratch."""

    #: a Hugging Face hub name or local folder (or a folder saved by potstill); null = build one
    model_name_or_path: str | None = None
    #: run code shipped with a hub model; off unless the recipe says so
    trust_remote_code: bool = False


class FeatureTermSpec(_Section):
    """Match an intermediate layer of the student to one of the teacher's (module paths)."""

    student: str
    teacher: str
    #: a registered loss on features: kind "features" or "attention-maps", or "logits" (mse)
    loss: str = "mse"
    weight: float = Field(1.0, ge=0)

    @field_validator("loss")
    @classmethod
    def _feature_loss(cls, name: str) -> str:
        allowed = sorted(n for n, s in LOSSES.items() if s.kind in ("logits", "features", "attention-maps"))
        if name not in allowed:
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            what = f"loss {name!r} does not compare features" if name in LOSSES else f"unknown feature loss {name!r}"
            raise ValueError(f"{what}; allowed: {', '.join(allowed)}{hint}")
        return name


class DistillationSpec(_Section):
    """Hinton's mix: ``alpha · loss(student, teacher; temperature) + (1 − alpha) · CE(labels)``."""

    loss: str = "kl"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.9, ge=0, le=1)
    #: extra parameters of the loss, e.g. ``{beta: 0.5}`` for ``jsd``
    params: dict[str, Any] = Field(default_factory=dict)
    #: intermediate-layer terms; a learned projection is added when the widths differ
    features: list[FeatureTermSpec] = Field(default_factory=list)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, name: str) -> str:
        if name not in LOSSES or LOSSES[name].target != "teacher":
            allowed = sorted(n for n, s in LOSSES.items() if s.target == "teacher")
            close = difflib.get_close_matches(name, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown distillation loss {name!r}; allowed: {', '.join(allowed)}{hint}")
        return name

    @model_validator(mode="after")
    def _known_params(self) -> DistillationSpec:
        check_params(self.loss, self.params)
        return self


class CacheSpec(_Section):
    """Run the teacher once and train from its stored top-k (see potstill.teachers)."""

    top_k: int = Field(64, ge=1)
    dtype: Literal["float16", "bfloat16", "float32"] = "bfloat16"
    #: the teacher's mass outside its top-k: a shared "rest" entry, or dropped and renormalised
    leftover: Literal["bucket", "renormalize"] = "bucket"
    #: examples per shard file
    shard_size: int = Field(256, ge=1)
    #: where the cache lives; null = <output_dir>/teacher-cache
    path: str | None = None


class Recipe(_Section):
    """What every recipe has; each task adds its ``data``, ``teacher`` and ``student`` sections
    (see ``potstill.tasks``)."""

    task: str
    distillation: DistillationSpec = Field(default_factory=DistillationSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    #: train the student from a cache of the teacher's top-k instead of a live teacher
    teacher_cache: CacheSpec | None = None
    #: also train the student from scratch on hard labels, for comparison
    baseline: bool = True
    output_dir: str = "runs/default"


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every field, defaults included)."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
