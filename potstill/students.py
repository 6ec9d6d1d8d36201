"""Students cut from their teacher: keep a subset of its layers, copy everything else.

Works across architectures by *finding* the layer stacks rather than by a table per model: a
stack is an ``nn.ModuleList`` of same-class blocks whose length is one of the config's
layer-count fields (``num_hidden_layers``, ``n_layer``, ``encoder_layers``, ``decoder_layers``…).
BERT-like encoders, GPT-2/Llama-like decoders and Whisper's encoder and decoder all qualify.
Embeddings, norms and heads are copied as they are; the config's layer counts (and any
per-layer lists, such as ``layer_types``) are updated, so the saved student reloads with plain
``from_pretrained``.

Which layers to keep: a fixed pattern (every other one, first and last, a list), or the ``N``
layers that change the hidden state most on real text (``"influence:N"``, ShortGPT's Block
Influence, Men et al. 2024). On SmolLM2-135M the second keeps a far better starting point than
every other layer (BENCHMARKS.md). A student with a tokenizer of its own gets its embeddings
re-keyed by :func:`transfer_vocabulary`.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

from .data import VENDORED_TEXT
from .data.text import read_text
from .models import evaluating, load_model, save_model
from .pretrained import load_causal_lm, load_tokenizer, resolve
from .signals import first_tensor

log = logging.getLogger(__name__)

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


_INFLUENCE = re.compile(r"^influence:([1-9]\d*)$")
SELECTIONS = "every-other, first-last, influence:N (the N most influential layers), or a list such as 0,2,4"


def check_selection(selection: str | Sequence[int]) -> str | Sequence[int]:
    """``selection`` if it is a layer selection :func:`select_layers` understands, else a ValueError
    that lists the forms (recipes validate with it on load)."""
    if isinstance(selection, str) and selection not in ("every-other", "first-last") \
            and not _INFLUENCE.match(selection) and not re.fullmatch(r"\s*-?\d+(\s*,\s*-?\d+)*\s*,?\s*", selection):
        raise ValueError(f"unknown layer selection {selection!r}; use {SELECTIONS}")
    return selection


#: a recipe field holding a layer selection, checked on load
LayerSelection = Annotated[str | list[int], AfterValidator(check_selection)]


def needs_calibration(selection: Any) -> bool:
    """Whether a selection (or a dict of them) is chosen from activations on calibration data."""
    if isinstance(selection, Mapping):
        return any(needs_calibration(v) for v in selection.values())
    return isinstance(selection, str) and bool(_INFLUENCE.match(selection))


def select_layers(size: int, selection: str | Sequence[int], influence: Sequence[float] | None = None) -> list[int]:
    """Layer indices from ``"every-other"``, ``"first-last"``, ``"influence:N"`` (the ``N`` layers
    with the highest ``influence``, in order) or an explicit list (negative indices allowed)."""
    check_selection(selection)
    if selection == "every-other":
        return list(range(0, size, 2))
    if selection == "first-last":
        return [0, size - 1] if size > 1 else [0]
    if isinstance(selection, str) and (match := _INFLUENCE.match(selection)):
        count = int(match.group(1))
        if not 1 <= count <= size:
            raise ValueError(f"layers {selection!r}: keep between 1 and {size} of the {size} layers")
        if influence is None or len(influence) != size:
            raise ValueError(f"layers {selection!r} are chosen by measured influence: give calibration batches")
        return sorted(sorted(range(size), key=lambda i: -influence[i])[:count])
    if isinstance(selection, str):
        selection = [int(part) for part in selection.split(",") if part.strip()]
    layers = [i % size if -size <= i < size else i for i in selection]
    bad = [i for i in layers if not 0 <= i < size]
    if bad or not layers:
        raise ValueError(f"layers {list(selection)} are not a non-empty selection of 0..{size - 1}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers {list(selection)} repeat a layer")
    return layers


def block_influence(model: nn.Module, batches: Iterable[Mapping[str, Tensor]],
                    stacks: Sequence[str] | None = None) -> dict[str, list[float]]:
    """ShortGPT's Block Influence of every layer of the layer stacks (Men et al. 2024; all of them,
    or those whose paths are in ``stacks``): the mean of ``1 − cos(h_in, h_out)``, the hidden state
    before and after the layer, while ``model`` reads ``batches`` (its forward keyword arguments).
    Positions the batch marks as padding (``attention_mask``; ``decoder_attention_mask`` in a
    decoder stack) do not count. A layer that barely turns the hidden state scores near 0 and is
    the cheapest to drop."""

    found = [s for s in find_layer_stacks(model) if stacks is None or s.path in stacks]
    totals = {s.path: torch.zeros(s.size, dtype=torch.float64) for s in found}
    counts = {s.path: torch.zeros(s.size, dtype=torch.float64) for s in found}
    current: dict[str, Tensor] = {}

    def hook(path: str, index: int):
        key = "decoder_attention_mask" if "decoder" in path.split(".") else "attention_mask"

        def record(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            before = args[0] if args else kwargs["hidden_states"]
            change = 1.0 - nn.functional.cosine_similarity(before.double(), first_tensor(output).double(), dim=-1)
            keep = current.get(key)
            if keep is not None and keep.shape == change.shape:
                change = change[keep.bool().to(change.device)]
            totals[path][index] += change.sum().item()
            counts[path][index] += change.numel()
        return record

    handles = [model.get_submodule(s.path)[i].register_forward_hook(hook(s.path, i), with_kwargs=True)
               for s in found for i in range(s.size)]
    device = next(model.parameters()).device
    try:
        with evaluating(model):
            for batch in batches:
                current.clear()
                current.update(batch)
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        for handle in handles:
            handle.remove()
    if any((c == 0).any() for c in counts.values()):
        raise ValueError("block influence: the calibration batches reached no position of some layer")
    return {path: (totals[path] / counts[path]).tolist() for path in totals}


Calibration = Iterable[Mapping[str, Tensor]]


def make_student(teacher: nn.Module, layers: str | Sequence[int] | dict[str, str | Sequence[int]],
                 calibration: Calibration | Callable[[], Calibration] | None = None) -> nn.Module:
    """A copy of ``teacher`` keeping only the chosen layers of its stacks.

    ``layers`` applies to every stack, or is a dict from stack path (or a word in it, such as
    ``"decoder"``) to a selection; stacks not named keep all their layers. ``"influence:N"``
    selections are measured on ``calibration`` (batches of the teacher's forward arguments, see
    :func:`block_influence`), or on what it returns when it is a function: it is then called only
    when a selection needs it, so callers need not check.
    """
    stacks = find_layer_stacks(teacher)
    measured = [s.path for s in stacks if needs_calibration(_chosen(layers, s))]
    if measured and callable(calibration):
        calibration = calibration()
    influence = block_influence(teacher, calibration, measured) if measured and calibration is not None else {}
    student = copy.deepcopy(teacher)
    for stack in stacks:
        chosen = _chosen(layers, stack)
        if chosen is None:
            continue
        keep = select_layers(stack.size, chosen, influence.get(stack.path))
        if needs_calibration(chosen):
            log.info("%s: keeping layers %s, the %d of %d with the highest block influence",
                     stack.path, keep, len(keep), stack.size)
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


def _chosen(layers: Any, stack: LayerStack) -> Any:
    """The selection for one stack: ``layers`` itself, or its entry naming the stack (None: keep all)."""
    if not isinstance(layers, dict):
        return layers
    return next((v for k, v in layers.items() if k == stack.path or k in stack.path.split(".")), None)


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


def transfer_vocabulary(model: nn.Module, source_tokenizer: Any, target_tokenizer: Any) -> int:
    """Re-key ``model`` (cut from a teacher that reads ``source_tokenizer``) to ``target_tokenizer``.

    A token both vocabularies hold (the same string: a byte, a special token, a whole word) keeps
    the teacher's rows; any other gets the mean of the rows of the tokens its text becomes under
    the teacher's tokenizer (fast vocabulary transfer, Gee et al. 2022) — in the embeddings, and in
    an untied output head and its bias. So a student with a tokenizer of its own starts from the
    teacher's knowledge instead of from noise. Tokens that are neither (a part of a multi-byte
    character in another alphabet) get the mean row; returns how many did. The config's special
    token ids become the new tokenizer's.
    """
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    old = {"embeddings": embeddings.weight}
    if head is not None and not tied:
        old["head"] = head.weight
    if head is not None and getattr(head, "bias", None) is not None:
        old["bias"] = head.bias
    usable = min(len(source_tokenizer), embeddings.weight.shape[0])
    old = {name: rows.detach()[:usable].clone() for name, rows in old.items()}
    source_vocab = source_tokenizer.get_vocab()
    pieces, fallback = [], 0
    for raw in target_tokenizer.convert_ids_to_tokens(list(range(len(target_tokenizer)))):
        if source_vocab.get(raw, usable) < usable:  # the same token in both (a byte, a special token, a word)
            ids = [source_vocab[raw]]
        else:
            text = _spelling(target_tokenizer, raw)
            ids = [] if "\ufffd" in text else [i for i in source_tokenizer.encode(text, add_special_tokens=False)
                                                 if i < usable]
        fallback += not ids
        pieces.append(ids)
    model.resize_token_embeddings(len(target_tokenizer), mean_resizing=False)
    new = {"embeddings": model.get_input_embeddings().weight}
    if "head" in old:
        new["head"] = model.get_output_embeddings().weight
    if "bias" in old:
        new["bias"] = model.get_output_embeddings().bias
    with torch.no_grad():
        for name, weight in new.items():
            mean = old[name].mean(0)
            for token, ids in enumerate(pieces):
                weight[token] = old[name][ids].mean(0) if ids else mean
    for config in (model.config, getattr(model, "generation_config", None)):
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config is not None and hasattr(config, field):
                setattr(config, field, getattr(target_tokenizer, field))
    log.info("vocabulary transfer: %d tokens re-keyed from the teacher's %d (%d got the mean row)",
             len(pieces), len(source_tokenizer), fallback)
    return fallback


def _spelling(tokenizer: Any, token: str) -> str:
    """The text one token stands for, leading space included (SentencePiece's "▁" is a space;
    decoding a lone piece would strip it)."""
    from tokenizers import decoders

    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if "\u2581" in token and not isinstance(decoder, decoders.ByteLevel):
        return token.replace("\u2581", " ")
    return tokenizer.convert_tokens_to_string([token])


def text_calibration(tokenizer: Any, text: str, sequences: int = 16, length: int = 128,
                     batch_size: int = 4) -> list[dict[str, Tensor]]:
    """Calibration batches for :func:`block_influence`: ``sequences`` windows of ``length`` tokens
    spread evenly over ``text``."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < length:
        raise ValueError(f"calibration text: {len(ids)} tokens, fewer than one window of {length}")
    starts = [i * (len(ids) - length) // max(1, sequences - 1) for i in range(sequences)]
    windows = torch.tensor([ids[s : s + length] for s in dict.fromkeys(starts)])
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]


def init_student(teacher_path: str | Path, out: str | Path, layers: str | Sequence[int] | dict,
                 trust_remote_code: bool = False, calibration_file: str | Path | None = None) -> nn.Module:
    """Load a teacher (folder, hub name, ``.gguf`` file or offline name, see :mod:`potstill.pretrained`),
    cut it with :func:`make_student`, save the student (and the teacher's tokenizer).

    ``"influence:N"`` selections read ``calibration_file`` (text; default: the Shakespeare sample
    that ships with potstill) through the teacher's tokenizer, so they need a text model; for
    others (Whisper) call :func:`make_student` with batches of the model's own inputs."""

    source = resolve(teacher_path)
    teacher = (load_causal_lm(source, trust_remote_code) if source.gguf_file
               else load_model(source.path, trust_remote_code=trust_remote_code))
    try:
        tokenizer = load_tokenizer(source, trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None  # a teacher folder without a tokenizer: nothing to copy
    if needs_calibration(layers) and (tokenizer is None or getattr(teacher.config, "is_encoder_decoder", False)):
        raise ValueError(f"layers {layers!r} are measured while the teacher reads text: {teacher_path} is not "
                         "a text model with a tokenizer; call potstill.students.make_student with calibration "
                         "batches of its own inputs")
    student = make_student(teacher, layers,
                           lambda: text_calibration(tokenizer, read_text(calibration_file or VENDORED_TEXT)))
    save_model(student, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return student
