"""What a forward pass exposes: logits, and activations of named modules (via forward hooks).

A *signal* is a tensor named by a string: ``"logits"`` is the model's output logits;
``"attentions.3"`` is layer 3's attention probabilities ``[B, heads, q, k]`` from a Hugging Face
model run with ``output_attentions=True`` (``encoder_attentions.N``, ``decoder_attentions.N``,
``cross_attentions.N`` for encoder-decoders); any other name is the dotted path of a submodule
(``"encoder.layer.3.output"``, ``"layers.2"``) whose output is captured with a forward hook for the
duration of one forward pass.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .losses.fused import HeadInputs

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


def first_tensor(output: Any) -> Tensor:
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
                captured[path] = first_tensor(output)

            handles.append(module.register_forward_hook(hook))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


_ATTENTIONS = re.compile(r"^(\w*attentions)\.(\d+)$")


def attention_signal(name: str) -> tuple[str, int] | None:
    """``"attentions.3"`` → ``("attentions", 3)``; None for a name that is not an attention map."""
    match = _ATTENTIONS.match(name)
    return (match.group(1), int(match.group(2))) if match else None


def _transformers_model(model: nn.Module) -> nn.Module:
    """The outermost Hugging Face model in ``model`` (itself, or a wrapped one such as ``SentenceEncoder.model``)."""
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError(f"attention-map signals need a Hugging Face model; {type(model).__name__} holds none")


@contextmanager
def capture_attentions(model: nn.Module, names: Iterable[str]) -> Iterator[dict[str, Tensor]]:
    """Capture attention maps named like ``"attentions.3"`` during the forward passes inside.

    The model's Hugging Face core is called with ``output_attentions=True`` (a forward pre-hook
    adds it) and the requested layers are taken from its output; it must use eager attention
    (``attn_implementation="eager"``: fused kernels never form the probabilities).
    """
    wanted = {name: attention_signal(name) for name in names}
    captured: dict[str, Tensor] = {}
    if not wanted:
        yield captured
        return
    core = _transformers_model(model)
    implementation = getattr(core.config, "_attn_implementation", "eager")
    if implementation != "eager":
        raise ValueError(f"attention-map signals ({', '.join(sorted(wanted))}) need eager attention, but "
                         f"{type(core).__name__} uses {implementation!r}: load it with "
                         "from_pretrained(..., attn_implementation='eager') or call "
                         "model.set_attn_implementation('eager')")

    def ask(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, {**kwargs, "output_attentions": True}

    def take(_module: nn.Module, _args: Any, output: Any) -> None:
        for name, parsed in wanted.items():
            assert parsed is not None
            field, layer = parsed
            maps = getattr(output, field, None)
            if not maps:
                raise ValueError(f"{type(core).__name__} returned no {field!r}; attention-map signals it "
                                 "can give: " + ", ".join(k for k in ("attentions", "encoder_attentions",
                                                                      "decoder_attentions", "cross_attentions")
                                                          if getattr(output, k, None)))
            if not 0 <= layer < len(maps):
                raise ValueError(f"signal {name!r}: {type(core).__name__} has {len(maps)} layers of "
                                 f"{field} (0 to {len(maps) - 1})")
            captured[name] = maps[layer]

    handles = [core.register_forward_pre_hook(ask, with_kwargs=True), core.register_forward_hook(take)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on a mapping of keyword inputs (Hugging Face style) or one tensor."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


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
    maps = {n for n in names if attention_signal(n)}
    if maps:  # a submodule that happens to be called "attentions" keeps its path meaning
        maps -= set(dict(model.named_modules()))
    core = model.base_model if head is not None else model
    with capture(model, sorted(names - maps - {LOGITS})) as captured, capture_attentions(core, maps) as attentions:
        if head is not None:
            base_inputs = inputs if isinstance(inputs, Mapping) else {"input_ids": inputs}
            hidden = model.base_model(**base_inputs).last_hidden_state
        else:
            output = call_model(model, inputs)
    if maps - attentions.keys():
        raise ValueError(f"{type(model).__name__}: the forward pass never ran a Hugging Face model, so the "
                         f"attention maps {', '.join(sorted(maps - attentions.keys()))} were not produced")
    signals: dict[str, Any] = {**captured, **attentions}
    if head is not None:
        signals[LOGITS] = HeadInputs(hidden, head.weight, head.bias)
    elif LOGITS in names:
        signals[LOGITS] = logits_of(output)
    else:  # given when the output has them, not required (a bare encoder has only hidden states)
        try:
            signals[LOGITS] = logits_of(output)
        except TypeError:
            pass
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
