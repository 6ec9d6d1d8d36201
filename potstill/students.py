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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import AfterValidator
from torch import Tensor, nn

log = logging.getLogger(__name__)

SHAKESPEARE_SAMPLE = Path(__file__).parent / "data" / "text" / "shakespeare-sample.txt"
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


_INFLUENCE = re.compile(r"^influence:(\d+)$")
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


def block_influence(model: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> dict[str, list[float]]:
    """ShortGPT's Block Influence of every layer of every stack (Men et al. 2024): the mean over
    real (unpadded) positions of ``1 − cos(h_in, h_out)``, the hidden state before and after the
    layer, while ``model`` reads ``batches`` (its forward keyword arguments). A layer that barely
    turns the hidden state scores near 0 and is the cheapest to drop."""
    stacks = find_layer_stacks(model)
    totals = {s.path: torch.zeros(s.size, dtype=torch.float64) for s in stacks}
    counts = {s.path: torch.zeros(s.size, dtype=torch.float64) for s in stacks}
    mask: list[Tensor | None] = [None]

    def hook(path: str, index: int):
        def record(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, (tuple, list)) else output
            change = 1.0 - nn.functional.cosine_similarity(before.double(), after.double(), dim=-1)
            keep = mask[0]
            if keep is not None and keep.shape == change.shape:
                change = change[keep.bool().to(change.device)]
            totals[path][index] += change.sum().item()
            counts[path][index] += change.numel()
        return record

    handles = [model.get_submodule(s.path)[i].register_forward_hook(hook(s.path, i), with_kwargs=True)
               for s in stacks for i in range(s.size)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                mask[0] = batch.get("attention_mask")
                device = next(model.parameters()).device
                model(**{k: v.to(device) for k, v in batch.items()})
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    if any((c == 0).any() for c in counts.values()):
        raise ValueError("block influence: the calibration batches reached no position of some layer")
    return {path: (totals[path] / counts[path]).tolist() for path in totals}


def make_student(teacher: nn.Module, layers: str | Sequence[int] | dict[str, str | Sequence[int]],
                 calibration: Iterable[Mapping[str, Tensor]] | None = None) -> nn.Module:
    """A copy of ``teacher`` keeping only the chosen layers of its stacks.

    ``layers`` applies to every stack, or is a dict from stack path (or a word in it, such as
    ``"decoder"``) to a selection; stacks not named keep all their layers. ``"influence:N"``
    selections are measured on ``calibration`` (batches of the teacher's forward arguments, see
    :func:`block_influence`).
    """
    influence = block_influence(teacher, calibration) if needs_calibration(layers) and calibration else {}
    student = copy.deepcopy(teacher)
    stacks = find_layer_stacks(student)
    for stack in stacks:
        if isinstance(layers, dict):
            chosen = next((v for k, v in layers.items() if k == stack.path or k in stack.path.split(".")), None)
            if chosen is None:
                continue
        else:
            chosen = layers
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
    the teacher's row; any other gets the mean of the embedding rows (and of the output-head rows,
    when the head is not tied) of the tokens its text becomes under the teacher's tokenizer (fast
    vocabulary transfer, Gee et al. 2022). So a student with a tokenizer of its own starts from the
    teacher's knowledge instead of from noise. Tokens that are neither (a part of a multi-byte
    character in another alphabet) get the mean row; returns how many did.
    """
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embeddings.weight.data_ptr()
    old_rows = {"embeddings": embeddings.weight.detach().clone()}
    if head is not None and not tied:
        old_rows["head"] = head.weight.detach().clone()
    usable = min(len(source_tokenizer), embeddings.weight.shape[0])
    source_vocab = source_tokenizer.get_vocab()
    pieces, fallback = [], 0
    for token, raw in enumerate(target_tokenizer.convert_ids_to_tokens(list(range(len(target_tokenizer))))):
        if source_vocab.get(raw, usable) < usable:  # the same token in both (a byte, a special token, a word)
            ids = [source_vocab[raw]]
        else:
            text = target_tokenizer.decode([token])
            ids = [] if "\ufffd" in text else [i for i in source_tokenizer.encode(text, add_special_tokens=False)
                                                 if i < usable]
        fallback += not ids
        pieces.append(ids)
    model.resize_token_embeddings(len(target_tokenizer))
    targets = {"embeddings": model.get_input_embeddings().weight}
    if "head" in old_rows:
        targets["head"] = model.get_output_embeddings().weight
    with torch.no_grad():
        for name, weight in targets.items():
            rows = old_rows[name][:usable]
            mean = rows.mean(0)
            for token, ids in enumerate(pieces):
                weight[token] = rows[ids].mean(0) if ids else mean
    log.info("vocabulary transfer: %d tokens re-keyed from the teacher's %d (%d got the mean row)",
             len(pieces), len(source_tokenizer), fallback)
    return fallback


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
                 trust_remote_code: bool = False, calibration_text: str | Path | None = None) -> nn.Module:
    """Load a teacher (folder, hub name, ``.gguf`` file or offline name, see :mod:`potstill.pretrained`),
    cut it with :func:`make_student`, save the student (and the teacher's tokenizer).

    ``"influence:N"`` selections read ``calibration_text`` (a text file; default: the Shakespeare
    sample that ships with potstill) through the teacher's tokenizer."""
    from .models import load_model, save_model
    from .pretrained import load_causal_lm, load_tokenizer, resolve
    from .tasks.lm_data import read_text

    source = resolve(teacher_path)
    teacher = (load_causal_lm(source, trust_remote_code) if source.gguf_file
               else load_model(source.path, trust_remote_code=trust_remote_code))
    try:
        tokenizer = load_tokenizer(source, trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None  # a teacher folder without a tokenizer: nothing to copy
    calibration = None
    if needs_calibration(layers):
        if tokenizer is None:
            raise ValueError(f"layers {layers!r} are measured on text, but {teacher_path} has no tokenizer")
        text = read_text(calibration_text or SHAKESPEARE_SAMPLE)
        calibration = text_calibration(tokenizer, text)
    student = make_student(teacher, layers, calibration)
    save_model(student, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return student
