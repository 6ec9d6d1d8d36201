"""What a forward pass exposes: logits, and activations of named modules (via forward hooks).

A *signal* is a tensor named by a string: ``"logits"`` is the model's output logits; any other
name is the dotted path of a submodule (``"encoder.layer.3.output"``, ``"layers.2"``) whose
output is captured with a forward hook for the duration of one forward pass.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

LOGITS = "logits"


def logits_of(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, a ``ModelOutput`` / dict with ``logits``, or a tuple."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and LOGITS in output:
        return output[LOGITS]
    if hasattr(output, LOGITS):
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")


def _first_tensor(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor to capture")


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``; a wrong path names the closest valid ones."""
    modules = dict(model.named_modules())
    if path in modules:
        return modules[path]
    close = difflib.get_close_matches(path, [n for n in modules if n], n=5, cutoff=0.4)
    hint = f" Closest module names: {', '.join(close)}." if close else ""
    raise ValueError(f"{type(model).__name__} has no submodule {path!r}.{hint}")


@contextmanager
def capture(model: nn.Module, paths: Iterable[str]) -> Iterator[dict[str, Tensor]]:
    """Capture the outputs of the submodules at ``paths`` during the forward passes inside."""
    captured: dict[str, Tensor] = {}
    handles = []
    try:
        for path in paths:
            module = resolve_module(model, path)

            def hook(_module: nn.Module, _inputs: Any, output: Any, path: str = path) -> None:
                captured[path] = _first_tensor(output)

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a mapping of keyword inputs (Hugging Face style) or one tensor."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


class HeadInputs(NamedTuple):
    """The logits left uncomputed: the output head's input and weights (``logits = hidden @ weight.T + bias``).

    Losses that understand it (:func:`potstill.losses.fused.fused_linear_loss`) compute the
    logits one chunk of tokens at a time instead of materialising all ``N × V`` of them.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


def output_head(model: nn.Module) -> nn.Linear | None:
    """The output projection of a Hugging Face LM whose logits are exactly ``head(last_hidden_state)``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or getattr(model, "base_model", model) is model:
        return None
    # models that post-process logits (soft-capping, scaling) cannot skip them
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    return head


def forward_signals(model: nn.Module, inputs: Any, names: Iterable[str],
                    fuse_head: bool = False) -> dict[str, Any]:
    """Run ``model`` on ``inputs`` and return the requested signals by name.

    ``fuse_head``: for a model with an :func:`output_head`, return :class:`HeadInputs` as
    ``"logits"`` and skip computing the logits.
    """
    names = set(names)
    head = output_head(model) if fuse_head else None
    with capture(model, sorted(names - {LOGITS})) as captured:
        if head is not None:
            base_inputs = inputs if isinstance(inputs, Mapping) else {"input_ids": inputs}
            hidden = model.base_model(**base_inputs).last_hidden_state
        else:
            output = call_model(model, inputs)
    signals: dict[str, Any] = dict(captured)
    signals[LOGITS] = HeadInputs(hidden, head.weight, head.bias) if head is not None else logits_of(output)
    return signals


@torch.no_grad()
def teacher_signals(teacher: nn.Module, inputs: Any, names: Iterable[str], fuse_head: bool = False) -> dict[str, Any]:
    """Signals from a frozen teacher: no gradients, eval mode, and a clear stop on NaN/Inf."""
    signals = forward_signals(teacher, inputs, names, fuse_head)
    for name, value in signals.items():
        tensor = value.hidden if isinstance(value, HeadInputs) else value
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FloatingPointError(f"teacher signal {name!r} contains NaN or Inf")
    return signals
