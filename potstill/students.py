"""Students cut from their teacher: keep a subset of its layers, copy everything else.

Works across architectures by *finding* the layer stacks rather than by a table per model: a
stack is an ``nn.ModuleList`` of same-class blocks whose length is one of the config's
layer-count fields (``num_hidden_layers``, ``n_layer``, ``encoder_layers``, ``decoder_layers``…).
BERT-like encoders, GPT-2/Llama-like decoders and Whisper's encoder and decoder all qualify.
Embeddings, norms and heads are copied as they are; the config's layer counts (and any
per-layer lists, such as ``layer_types``) are updated, so the saved student reloads with plain
``from_pretrained``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import nn

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")


@dataclass(frozen=True)
class LayerStack:
    path: str
    config_field: str
    size: int


def find_layer_stacks(model: nn.Module) -> list[LayerStack]:
    """Every stack of transformer blocks in ``model`` with the config field that counts it."""
    config = getattr(model, "config", None)
    counts = {f: getattr(config, f) for f in LAYER_COUNT_FIELDS if isinstance(getattr(config, f, None), int)}
    stacks = []
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        fields = [f for f, n in counts.items() if n == len(module)]
        # an encoder-decoder names its stacks: match encoder_layers to the encoder's list
        named = [f for f in fields if f.split("_")[0] in ("encoder", "decoder") and f.split("_")[0] in path]
        field = (named or [f for f in fields if not f.startswith(("encoder", "decoder"))] or [None])[0]
        if field:
            stacks.append(LayerStack(path, field, len(module)))
    if not stacks:
        raise ValueError(f"found no layer stack in {type(model).__name__}: no ModuleList matches a config "
                         f"layer count ({', '.join(LAYER_COUNT_FIELDS)})")
    return stacks


def select_layers(size: int, selection: str | Sequence[int]) -> list[int]:
    """Layer indices from ``"every-other"``, ``"first-last"`` or an explicit list (negative indices allowed)."""
    if selection == "every-other":
        return list(range(0, size, 2))
    if selection == "first-last":
        return [0, size - 1] if size > 1 else [0]
    if isinstance(selection, str):
        selection = [int(part) for part in selection.split(",") if part.strip()]
    layers = [i % size if -size <= i < size else i for i in selection]
    bad = [i for i in layers if not 0 <= i < size]
    if bad or not layers:
        raise ValueError(f"layers {list(selection)} are not a non-empty selection of 0..{size - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(selection)} repeat a layer")
    return layers


def make_student(teacher: nn.Module, layers: str | Sequence[int] | dict[str, str | Sequence[int]]) -> nn.Module:
    """A copy of ``teacher`` keeping only the chosen layers of its stacks.

    ``layers`` applies to every stack, or is a dict from stack path (or a word in it, such as
    ``"decoder"``) to a selection; stacks not named keep all their layers.
    """
    student = copy.deepcopy(teacher)
    stacks = find_layer_stacks(student)
    for stack in stacks:
        if isinstance(layers, dict):
            chosen = next((v for k, v in layers.items() if k == stack.path or k in stack.path.split(".")), None)
            if chosen is None:
                continue
        else:
            chosen = layers
        keep = select_layers(stack.size, chosen)
        parent_path, _, name = stack.path.rpartition(".")
        parent = student.get_submodule(parent_path) if parent_path else student
        old = getattr(parent, name)
        setattr(parent, name, nn.ModuleList(old[i] for i in keep))
        _renumber(getattr(parent, name))
        _update_config(student.config, stack, keep)
    if isinstance(layers, dict):
        unknown = [k for k in layers if not any(k == s.path or k in s.path.split(".") for s in stacks)]
        if unknown:
            raise ValueError(f"no layer stack named {unknown}; stacks: {', '.join(s.path for s in stacks)}")
    return student


def _renumber(stack: nn.ModuleList) -> None:
    """Blocks that know their index (for the KV cache) get their new one."""
    for index, block in enumerate(stack):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index


def _update_config(config, stack: LayerStack, keep: list[int]) -> None:
    setattr(config, stack.config_field, len(keep))
    # per-layer lists in the config (layer_types, ...) follow the kept layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == stack.size and key != stack.config_field:
            setattr(config, key, [value[i] for i in keep])


def init_student(teacher_path: str | Path, out: str | Path, layers: str | Sequence[int] | dict,
                 trust_remote_code: bool = False) -> nn.Module:
    """Load a teacher (folder, hub name, ``.gguf`` file or offline name, see :mod:`potstill.pretrained`),
    cut it with :func:`make_student`, save the student (and the teacher's tokenizer)."""
    from .models import load_model, save_model
    from .pretrained import load_causal_lm, load_tokenizer, resolve

    source = resolve(teacher_path)
    teacher = (load_causal_lm(source, trust_remote_code) if source.gguf_file
               else load_model(source.path, trust_remote_code=trust_remote_code))
    student = make_student(teacher, layers)
    save_model(student, out)
    try:
        load_tokenizer(source, trust_remote_code).save_pretrained(str(out))
    except (OSError, ValueError):
        pass  # a teacher folder without a tokenizer: nothing to copy
    return student
