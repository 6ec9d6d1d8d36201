"""Hugging Face classifiers (``AutoModelFor…Classification``): loaded, or built from a config, with
the task's labels; shared by the text- and image-classification tasks."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..data.hf import DataError, Splits, encode_labels
from ..pretrained import resolve

#: id2label names transformers gives a head nobody named ("LABEL_0", …): they say nothing about the classes
_GENERIC_LABEL = re.compile(r"^LABEL_\d+$")


def model_config(model_name_or_path: str | None, config: dict[str, Any] | None,
                 trust_remote_code: bool = False) -> Any:
    """The model's transformers config: from its folder or hub name, or built from ``config``
    (``{model_type: bert, hidden_size: 64, …}``, every other key a field of that config)."""
    from transformers import AutoConfig

    if model_name_or_path:
        return AutoConfig.from_pretrained(resolve(model_name_or_path).path, trust_remote_code=trust_remote_code)
    if not config or "model_type" not in config:
        raise ValueError("a model needs model_name_or_path, or a config with its model_type "
                         "(e.g. {model_type: bert, hidden_size: 64, num_hidden_layers: 2})")
    fields = dict(config)
    try:
        return AutoConfig.for_model(fields.pop("model_type"), **fields)
    except ValueError as exc:
        raise ValueError(f"config: {exc}") from None


def has_trained_head(config: Any, head: str) -> bool:
    """Whether a saved model is a classifier of this kind (``head``: "ForSequenceClassification",
    "ForImageClassification"), rather than a bare encoder or a model trained for something else."""
    return any(name.endswith(head) for name in getattr(config, "architectures", None) or [])


def named_labels(config: Any) -> list[str] | None:
    """The label names a trained classifier's config gives, in id order (None: unnamed or absent)."""
    id2label = getattr(config, "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    return None if not names or all(_GENERIC_LABEL.match(n) for n in names) else names


def classifier(auto_class: Any, model_name_or_path: str | None, config: dict[str, Any] | None,
               labels: Sequence[str], *, trust_remote_code: bool = False, **overrides: Any) -> nn.Module:
    """A classifier for ``labels``: loaded (a head of another size is replaced by a new one), or
    built from ``config`` with new weights. ``overrides`` set config fields (e.g. ``num_channels``)."""
    mapping = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
               "label2id": {name: i for i, name in enumerate(labels)}}
    if model_name_or_path:
        path = resolve(model_name_or_path).path
        loaded = model_config(model_name_or_path, None, trust_remote_code)
        new_head = getattr(loaded, "num_labels", None) != len(labels)
        return auto_class.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code,
                                          ignore_mismatched_sizes=new_head, **mapping, **overrides)
    built = model_config(None, config)
    for key, value in {**mapping, **overrides}.items():
        setattr(built, key, value)
    return auto_class.from_config(built)


def set_dropout(model: nn.Module, p: float) -> None:
    """Every dropout layer's probability, and the config fields that name it (so the saved model keeps it)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    config = getattr(model, "config", None)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                 "attention_dropout", "drop_path_rate"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, p)


def task_labels(splits: Splits, data_labels: Sequence[str] | None, teacher_config: Any,
                used_as_is: bool) -> tuple[Splits, list[str]]:
    """The label column as class ids, and the classes: ``data.labels``; a teacher used as it is
    fixes them (its named labels, or its class count); one trained here takes the data's."""
    from datasets import Value

    known = data_labels or (named_labels(teacher_config) if used_as_is else None)
    feature = splits.train.features["label"]
    if used_as_is and known is None and isinstance(feature, Value) and feature.dtype in ("string", "large_string"):
        raise DataError("data.labels: the teacher's classes have no names (LABEL_0, …) and the data's labels are "
                        "names: give data.labels in the order of the teacher's classes")
    splits, names = encode_labels(splits, known)
    if used_as_is and len(names) != teacher_config.num_labels:
        raise DataError(f"data.label_column: the data has {len(names)} classes ({', '.join(names[:10])}), the "
                        f"teacher {teacher_config.num_labels}: give data.labels in the teacher's order, or fine-tune "
                        "it (teacher.fine_tune: true)")
    return splits, names
