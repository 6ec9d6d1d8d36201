"""CTranslate2 (faster-whisper) Whisper folders → Hugging Face ``WhisperForConditionalGeneration`` folders.

faster-whisper ships Whisper as a CTranslate2 folder: ``model.bin`` (every weight in one binary
file), ``config.json`` (alignment heads, language ids, suppressed tokens), ``tokenizer.json`` and
``vocabulary.txt``/``.json``. :func:`convert_ct2` reads that folder without the ``ctranslate2``
package and writes a folder that loads with plain ``WhisperForConditionalGeneration.from_pretrained``
and ``AutoProcessor.from_pretrained``: ``model.safetensors``, ``config.json``,
``generation_config.json``, ``preprocessor_config.json`` and the tokenizer files.

``model.bin`` (little-endian): u32 binary version, the spec name, u32 spec revision, u32 variable
count; per variable its name, u8 rank, rank × u32 dims, u8 dtype, u32 byte count and the raw bytes;
then u32 alias count and (alias, target) name pairs. A name is a u16 length (counting a trailing
NUL) and the bytes. The Whisper layout: self-attention ``linear_0`` is q, k and v fused along the
output dimension, cross-attention ``linear_0`` is q and ``linear_1`` k and v fused, the last linear
of each is the output projection, layer norms are ``gamma``/``beta``, and the output projection is
an alias of the token embeddings.

The CTranslate2 ``tokenizer.json`` stops before the timestamp tokens (``<|0.00|>`` … ``<|30.00|>``),
which the model still has rows for; they are added back (as in the Hugging Face Whisper tokenizers,
as added tokens that are not "special") so that the tokenizer and the model agree on every id.
English-only and multilingual Whisper have different tokenizers (GPT-2's BPE with 51,864 ids, the
multilingual BPE with 51,865): every special id is read from the folder's own tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .io import atomic_path, write_json

log = logging.getLogger(__name__)

#: written last into every converted folder: what was converted, and which files potstill wrote
MARKER = "potstill-ct2.json"
#: binary versions whose layout is the one read here (type id + byte count per variable, aliases)
SUPPORTED_VERSIONS = range(4, 7)
#: CTranslate2's ActivationType enum → the Hugging Face ``activation_function`` it is
_ACTIVATIONS = {0: "relu", 1: "gelu_new", 2: "silu", 3: "gelu", 4: "quick_gelu", 5: "tanh"}
#: decoder flags whose other values Hugging Face's Whisper cannot express
_REQUIRED_FLAGS = {"decoder/alibi": 0, "decoder/pre_norm": 1, "decoder/start_from_zero_embedding": 0}
#: scalar metadata with nothing to carry over (alignment heads come from config.json)
_IGNORED_SCALARS = {"decoder/alignment_heads", "decoder/alignment_layer"}
_BF16 = 5
_NUMPY_DTYPES: dict[int, np.dtype] = {0: np.dtype("<f4"), 1: np.dtype("i1"), 2: np.dtype("<i2"),
                                       3: np.dtype("<i4"), 4: np.dtype("<f2"), _BF16: np.dtype("<u2")}
_TIMESTAMP = re.compile(r"^<\|\d+\.\d\d\|>$")
_LANGUAGE = re.compile(r"^<\|[a-z]{2,3}\|>$")
_WEIGHTS = "model.safetensors"


class CT2FormatError(ValueError):
    """A CTranslate2 model file or folder that cannot be converted; the message names the file."""


@dataclass(frozen=True)
class CT2Model:
    """The contents of a CTranslate2 ``model.bin``: its spec, every variable and the aliases."""

    spec: str
    binary_version: int
    revision: int
    variables: dict[str, npt.NDArray[Any]]
    aliases: dict[str, str]


# ----------------------------------------------------------------------------------------------
# reading model.bin


class _Stream:
    """The bytes of one file, or of several read as one (a model split into parts), in order."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)
        self.name = " + ".join(str(f) for f in self.files)
        self.size = sum(f.stat().st_size for f in self.files)
        self.position = 0
        self._index = 0
        self._handle = open(self.files[0], "rb")

    def read(self, n: int, what: str) -> bytearray:
        if n > self.size - self.position:
            raise CT2FormatError(f"{self.name} is truncated: {what} needs {n:,} bytes at byte {self.position:,}, "
                                 f"but the file ends at byte {self.size:,}")
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:  # straight into the array's buffer: the file's bytes are never held twice
            k = self._handle.readinto(view[got:])
            if not k:
                self._handle.close()
                self._index += 1
                self._handle = open(self.files[self._index], "rb")
                continue
            got += k
        self.position += n
        return buf

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.read(self.unpack("H", what), what)
        if not raw or raw[-1] != 0:
            raise CT2FormatError(f"{self.name} is corrupt: {what} at byte {self.position - len(raw):,} is not a "
                                 "NUL-terminated string")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CT2FormatError(f"{self.name} is corrupt: {what} at byte {self.position:,} is not UTF-8") from exc

    def close(self) -> None:
        self._handle.close()


def read_ct2(files: str | Path | Sequence[str | Path]) -> CT2Model:
    """Every variable of a CTranslate2 ``model.bin`` as NumPy arrays (bfloat16 as float32).

    ``files`` is the file, or its parts in order when it was split (their bytes are read as one).

    Raises:
        FileNotFoundError: a file is missing.
        CT2FormatError: the bytes are not a CTranslate2 model this reader knows, or are cut short.
    """
    paths = [Path(files)] if isinstance(files, str | Path) else [Path(f) for f in files]
    if not paths:
        raise ValueError("read_ct2 needs at least one file")
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"CTranslate2 model file {path} does not exist")
    stream = _Stream(paths)
    try:
        return _read(stream)
    except struct.error as exc:  # pragma: no cover - read() checks lengths first
        raise CT2FormatError(f"{stream.name} is corrupt: {exc}") from exc
    finally:
        stream.close()


def _read(stream: _Stream) -> CT2Model:
    version = stream.unpack("I", "the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise CT2FormatError(f"{stream.name} is not a CTranslate2 model this reader knows: binary version {version} "
                             f"(supported: {SUPPORTED_VERSIONS.start}-{SUPPORTED_VERSIONS.stop - 1})")
    spec = stream.string("the spec name")
    revision = stream.unpack("I", "the spec revision")
    count = stream.unpack("I", "the variable count")
    variables: dict[str, npt.NDArray[Any]] = {}
    for i in range(count):
        name = stream.string(f"the name of variable {i}")
        rank = stream.unpack("B", f"the rank of {name}")
        if rank > 8:
            raise CT2FormatError(f"{stream.name} is corrupt: variable {name} has rank {rank}")
        shape = tuple(stream.unpack("I", f"the shape of {name}") for _ in range(rank))
        type_id = stream.unpack("B", f"the dtype of {name}")
        if type_id not in _NUMPY_DTYPES:
            raise CT2FormatError(f"{stream.name}: variable {name} has dtype id {type_id}, which this reader "
                                 f"does not know (known: {sorted(_NUMPY_DTYPES)})")
        dtype = _NUMPY_DTYPES[type_id]
        nbytes = stream.unpack("I", f"the byte count of {name}")
        if nbytes != math.prod(shape) * dtype.itemsize:
            raise CT2FormatError(f"{stream.name} is corrupt: variable {name} of shape {list(shape)} and dtype "
                                 f"{dtype.name} declares {nbytes:,} bytes")
        array = np.frombuffer(stream.read(nbytes, f"the values of {name}"), dtype=dtype).reshape(shape)
        if type_id == _BF16:  # NumPy has no bfloat16: its bits are a float32's upper half
            array = (array.astype(np.uint32) << 16).view(np.float32)
        variables[name] = array
    aliases: dict[str, str] = {}
    for i in range(stream.unpack("I", "the alias count")):
        alias = stream.string(f"the name of alias {i}")
        aliases[alias] = stream.string(f"the target of alias {alias}")
    if stream.position != stream.size:
        raise CT2FormatError(f"{stream.name} is corrupt: {stream.size - stream.position:,} bytes follow the last "
                             "alias")
    return CT2Model(spec, version, revision, variables, aliases)


# ----------------------------------------------------------------------------------------------
# CTranslate2 variables → Hugging Face weights and config


class _Variables:
    """Takes variables by name (following aliases) and remembers which ones were used."""

    def __init__(self, model: CT2Model, source: str) -> None:
        self.model = model
        self.source = source
        self.unused = set(model.variables)

    def target(self, name: str) -> str:
        seen = set()
        while name in self.model.aliases and name not in seen:
            seen.add(name)
            name = self.model.aliases[name]
        return name

    def has(self, name: str) -> bool:
        return self.target(name) in self.model.variables

    def take(self, name: str) -> npt.NDArray[Any]:
        target = self.target(name)
        if target not in self.model.variables:
            raise CT2FormatError(f"{self.source} has no variable {name}: not a Whisper model in the layout "
                                 "CTranslate2's Whisper converter writes")
        self.unused.discard(target)
        return self.model.variables[target]

    def scalar(self, name: str) -> int:
        return int(self.take(name).reshape(-1)[0])

    def count(self, prefix: str) -> int:
        pattern = re.compile(rf"^{re.escape(prefix)}/layer_(\d+)/")
        indices = {int(m.group(1)) for n in self.model.variables if (m := pattern.match(n))}
        if indices != set(range(len(indices))) or not indices:
            raise CT2FormatError(f"{self.source}: the {prefix} layers are {sorted(indices)}, not 0..N-1")
        return len(indices)


def _split(array: npt.NDArray[Any], parts: int, name: str, source: str) -> list[npt.NDArray[Any]]:
    if array.shape[0] % parts:
        raise CT2FormatError(f"{source}: {name} has {array.shape[0]} output rows, not {parts} equal fused parts")
    return np.split(array, parts, axis=0)


def _linear(v: _Variables, src: str, dst: str, out: dict[str, npt.NDArray[Any]], bias: bool = True) -> None:
    out[f"{dst}.weight"] = v.take(f"{src}/weight")
    if bias:
        out[f"{dst}.bias"] = v.take(f"{src}/bias")


def _norm(v: _Variables, src: str, dst: str, out: dict[str, npt.NDArray[Any]]) -> None:
    out[f"{dst}.weight"] = v.take(f"{src}/gamma")
    out[f"{dst}.bias"] = v.take(f"{src}/beta")


def _self_attention(v: _Variables, src: str, dst: str, out: dict[str, npt.NDArray[Any]]) -> None:
    q, k, v_ = _split(v.take(f"{src}/linear_0/weight"), 3, f"{src}/linear_0/weight", v.source)
    qb, _kb, vb = _split(v.take(f"{src}/linear_0/bias"), 3, f"{src}/linear_0/bias", v.source)
    # Whisper's key projection has no bias (CTranslate2 stores zeros); one would shift every score
    # of a query by the same amount, which the softmax ignores, so dropping it is exact either way
    out.update({f"{dst}.q_proj.weight": q, f"{dst}.q_proj.bias": qb, f"{dst}.k_proj.weight": k,
                f"{dst}.v_proj.weight": v_, f"{dst}.v_proj.bias": vb})
    _linear(v, f"{src}/linear_1", f"{dst}.out_proj", out)
    _norm(v, f"{src}/layer_norm", f"{dst}_layer_norm", out)


def _cross_attention(v: _Variables, src: str, dst: str, out: dict[str, npt.NDArray[Any]]) -> None:
    _linear(v, f"{src}/linear_0", f"{dst}.q_proj", out)
    k, v_ = _split(v.take(f"{src}/linear_1/weight"), 2, f"{src}/linear_1/weight", v.source)
    _kb, vb = _split(v.take(f"{src}/linear_1/bias"), 2, f"{src}/linear_1/bias", v.source)
    out.update({f"{dst}.k_proj.weight": k, f"{dst}.v_proj.weight": v_, f"{dst}.v_proj.bias": vb})
    _linear(v, f"{src}/linear_2", f"{dst}.out_proj", out)
    _norm(v, f"{src}/layer_norm", f"{dst}_layer_norm", out)


def _ffn(v: _Variables, src: str, dst: str, out: dict[str, npt.NDArray[Any]]) -> None:
    _linear(v, f"{src}/linear_0", f"{dst}.fc1", out)
    _linear(v, f"{src}/linear_1", f"{dst}.fc2", out)
    _norm(v, f"{src}/layer_norm", f"{dst}.final_layer_norm", out)


def whisper_weights(model: CT2Model, source: str = "model.bin") -> tuple[dict[str, npt.NDArray[Any]], dict[str, Any]]:
    """The Hugging Face state dict and the ``WhisperConfig`` fields a CTranslate2 Whisper's variables imply.

    Every variable must be used: one that this mapping does not know is an error (a different or
    newer layout would otherwise be converted into a model that silently lacks it).
    """
    if model.spec != "WhisperSpec":
        raise CT2FormatError(f"{source} is a CTranslate2 {model.spec or 'unnamed'} model, not Whisper (WhisperSpec)")
    if any(n.endswith("_scale") for n in model.variables):
        raise CT2FormatError(f"{source} is quantised (it has *_scale variables): convert the model with "
                             "CTranslate2's quantization float16 or float32 to import it")
    v = _Variables(model, source)
    out: dict[str, npt.NDArray[Any]] = {}
    for flag, expected in _REQUIRED_FLAGS.items():
        if v.has(flag) and v.scalar(flag) != expected:
            raise CT2FormatError(f"{source}: {flag} = {v.scalar(flag)}; Hugging Face's Whisper needs {expected}")
    activation = v.scalar("decoder/activation") if v.has("decoder/activation") else 3
    if activation not in _ACTIVATIONS:
        raise CT2FormatError(f"{source}: decoder/activation {activation} is not an activation this converter knows")
    scale_embedding = bool(v.scalar("decoder/scale_embeddings")) if v.has("decoder/scale_embeddings") else False
    for name in _IGNORED_SCALARS:
        if v.has(name):
            v.take(name)

    for name in ("conv1", "conv2"):
        _linear(v, f"encoder/{name}", f"model.encoder.{name}", out)
    out["model.encoder.embed_positions.weight"] = v.take("encoder/position_encodings/encodings")
    encoder_layers = v.count("encoder")
    for i in range(encoder_layers):
        src, dst = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        _self_attention(v, f"{src}/self_attention", f"{dst}.self_attn", out)
        _ffn(v, f"{src}/ffn", dst, out)
    _norm(v, "encoder/layer_norm", "model.encoder.layer_norm", out)

    embeddings = v.take("decoder/embeddings/weight")
    out["model.decoder.embed_tokens.weight"] = embeddings
    out["model.decoder.embed_positions.weight"] = v.take("decoder/position_encodings/encodings")
    decoder_layers = v.count("decoder")
    for i in range(decoder_layers):
        src, dst = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        _self_attention(v, f"{src}/self_attention", f"{dst}.self_attn", out)
        _cross_attention(v, f"{src}/attention", f"{dst}.encoder_attn", out)
        _ffn(v, f"{src}/ffn", dst, out)
    _norm(v, "decoder/layer_norm", "model.decoder.layer_norm", out)
    tied = True
    if v.has("decoder/projection/weight"):
        projection = v.take("decoder/projection/weight")
        if projection is not embeddings and not np.array_equal(projection, embeddings):
            tied = False
            out["proj_out.weight"] = projection

    encoder_heads, decoder_heads = v.scalar("encoder/num_heads"), v.scalar("decoder/num_heads")
    leftover = sorted(v.unused)
    scalars = [n for n in leftover if model.variables[n].ndim == 0]
    if scalars:
        log.warning("%s: ignoring scalar settings this converter does not know: %s", source, ", ".join(scalars))
    tensors = [n for n in leftover if model.variables[n].ndim > 0]
    if tensors:
        raise CT2FormatError(f"{source} has variables a Hugging Face Whisper has no place for: "
                             f"{', '.join(tensors[:5])}{' …' if len(tensors) > 5 else ''}")

    d_model = embeddings.shape[1]
    config = {
        "vocab_size": embeddings.shape[0],
        "d_model": d_model,
        "num_mel_bins": out["model.encoder.conv1.weight"].shape[1],
        "encoder_layers": encoder_layers,
        "decoder_layers": decoder_layers,
        "encoder_attention_heads": encoder_heads,
        "decoder_attention_heads": decoder_heads,
        "encoder_ffn_dim": out["model.encoder.layers.0.fc1.weight"].shape[0],
        "decoder_ffn_dim": out["model.decoder.layers.0.fc1.weight"].shape[0],
        "max_source_positions": out["model.encoder.embed_positions.weight"].shape[0],
        "max_target_positions": out["model.decoder.embed_positions.weight"].shape[0],
        "activation_function": _ACTIVATIONS[activation],
        "scale_embedding": scale_embedding,
        "tie_word_embeddings": tied,
    }
    for heads, which in ((encoder_heads, "encoder"), (decoder_heads, "decoder")):
        if heads <= 0 or d_model % heads:
            raise CT2FormatError(f"{source}: {which}/num_heads = {heads} does not divide d_model = {d_model}")
    return out, config


# ----------------------------------------------------------------------------------------------
# tokenizer and generation settings


@dataclass(frozen=True)
class _Tokens:
    """Whisper's special ids as this model's own tokenizer numbers them."""

    ids: dict[str, int]
    tokenizer: dict[str, Any]  # tokenizer.json with the timestamp tokens added back

    def __getitem__(self, token: str) -> int:
        return self.ids[token]


def _vocabulary(folder: Path) -> list[str] | None:
    """The full id → token list CTranslate2 keeps beside the model (timestamps included), if any."""
    if (folder / "vocabulary.json").is_file():
        return list(json.loads((folder / "vocabulary.json").read_text(encoding="utf-8")))
    if (folder / "vocabulary.txt").is_file():
        text = (folder / "vocabulary.txt").read_text(encoding="utf-8")
        return text[:-1].split("\n") if text.endswith("\n") else text.split("\n")
    return None


def _tokens(folder: Path, vocab_size: int) -> _Tokens:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the converter needs the tokenizer that faster-whisper "
                                "folders carry (the model's BPE merges are not in model.bin)")
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
        vocab: dict[str, int] = tokenizer["model"]["vocab"]
        added: list[dict[str, Any]] = tokenizer["added_tokens"]
        tokens = {**vocab, **{a["content"]: int(a["id"]) for a in added}}
    except (ValueError, KeyError, TypeError) as exc:
        raise CT2FormatError(f"{path} is not a Hugging Face tokenizers file with a BPE vocabulary: {exc}") from exc
    for needed in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if needed not in tokens:
            raise CT2FormatError(f"{path} has no {needed} token: not a Whisper tokenizer")
    size = max(tokens.values()) + 1
    if size > vocab_size:
        raise CT2FormatError(f"{path} has {size:,} tokens but the model only {vocab_size:,} embedding rows")
    # the timestamp tokens: named by the vocabulary file when there is one, else by their times
    full = _vocabulary(folder)
    if full is not None and len(full) != vocab_size:
        raise CT2FormatError(f"the vocabulary beside {path} has {len(full):,} tokens, the model {vocab_size:,}")
    first = tokens["<|notimestamps|>"] + 1
    if bad := [t for t, i in tokens.items() if i >= first and not _TIMESTAMP.match(t)][:3]:
        raise CT2FormatError(f"{path}: tokens after <|notimestamps|> should be timestamp tokens, found {bad}")
    extra = [full[i] if full else f"<|{(i - first) * 0.02:.2f}|>" for i in range(size, vocab_size)]
    if bad := [t for t in extra if not _TIMESTAMP.match(t)][:3]:
        raise CT2FormatError(f"ids {size:,}-{vocab_size - 1:,} of {folder} should be timestamp tokens, found {bad}")
    tokenizer = dict(tokenizer)
    tokenizer["added_tokens"] = [*added, *({"id": i, "content": t, "single_word": False, "lstrip": False,
                                            "rstrip": False, "normalized": False, "special": False}
                                           for i, t in enumerate(extra, start=size))]
    return _Tokens({k: v for k, v in tokens.items() if k.startswith("<|")}, tokenizer)


def _specials(tokens: _Tokens) -> list[str]:
    """The special tokens after ``<|endoftext|>``, in id order (transformers finds the first
    timestamp id as "the last special id + 1")."""
    start, end = tokens["<|startoftranscript|>"], tokens["<|notimestamps|>"]
    return [t for t, i in sorted(tokens.ids.items(), key=lambda kv: kv[1]) if start <= i <= end]


def _generation_config(tokens: _Tokens, config: dict[str, Any], ct2_config: dict[str, Any],
                       multilingual: bool) -> dict[str, Any]:
    eot = tokens["<|endoftext|>"]
    fields: dict[str, Any] = {
        "decoder_start_token_id": tokens["<|startoftranscript|>"],
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "max_length": config["max_target_positions"],
        "is_multilingual": multilingual,
        "no_timestamps_token_id": tokens["<|notimestamps|>"],
        "return_timestamps": False,
        "max_initial_timestamp_index": 50,
        "suppress_tokens": [int(t) for t in ct2_config.get("suppress_ids", [])],
        "begin_suppress_tokens": [int(t) for t in ct2_config.get("suppress_ids_begin", [220, eot])],
    }
    if "<|startofprev|>" in tokens.ids:
        fields["prev_sot_token_id"] = tokens["<|startofprev|>"]
    if heads := ct2_config.get("alignment_heads"):
        fields["alignment_heads"] = [[int(a), int(b)] for a, b in heads]
    if multilingual:
        start, end = tokens["<|startoftranscript|>"], tokens.ids.get("<|translate|>", tokens["<|notimestamps|>"])
        fields["lang_to_id"] = {t: i for t, i in tokens.ids.items() if start < i < end and _LANGUAGE.match(t)}
        fields["task_to_id"] = {task: tokens[f"<|{task}|>"] for task in ("translate", "transcribe")
                                if f"<|{task}|>" in tokens.ids}
        if "transcribe" in fields["task_to_id"]:
            # generate() then detects the language and transcribes (rather than translates) by default
            fields["task"] = "transcribe"
    return fields


# ----------------------------------------------------------------------------------------------
# the converted folder


def _check_out(out: Path) -> None:
    """Refuse to replace anything potstill did not write."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    present = {p.name for p in out.iterdir()}
    if not present:
        return
    marker = out / MARKER
    if not marker.is_file():
        raise FileExistsError(f"{out} is not empty and is not a folder potstill converted "
                              f"(no {MARKER}); choose another --out")
    try:
        written = set(json.loads(marker.read_text())["files"])
    except (ValueError, KeyError, TypeError) as exc:
        raise FileExistsError(f"{marker} is unreadable, so {out} may hold files potstill did not write") from exc
    if extra := sorted(present - written - {MARKER}):
        raise FileExistsError(f"{out} holds files potstill did not write ({', '.join(extra[:5])}); "
                              "choose another --out")


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """What an earlier :func:`convert_ct2` recorded in ``folder``, or None if it did not convert there."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def source_fingerprint(folder: Path, model_files: Sequence[Path]) -> dict[str, Any]:
    """Names and sizes of the files a conversion reads (a changed source means a new conversion)."""
    files = [*model_files, *(folder / n for n in ("config.json", "tokenizer.json", "vocabulary.txt",
                                                   "vocabulary.json") if (folder / n).is_file())]
    return {"files": [{"path": str(f.resolve()), "bytes": f.stat().st_size} for f in files]}


def convert_ct2(folder: str | Path, out: str | Path, *, model_files: Sequence[str | Path] | None = None,
                dtype: torch.dtype = torch.float32, info: dict[str, Any] | None = None) -> Path:
    """Convert the CTranslate2 Whisper in ``folder`` into a Hugging Face folder at ``out``.

    Args:
        folder: the CTranslate2 folder (``model.bin``, ``tokenizer.json``, and as present
            ``config.json`` and ``vocabulary.txt``/``.json``).
        out: the new folder; it appears complete or not at all. An existing ``out`` must be empty
            or an earlier conversion holding only files potstill wrote.
        model_files: the model's bytes when they are not ``folder/model.bin`` — e.g. the parts of
            a model split across packages, in order.
        dtype: the weights' dtype in the new folder (float32 by default; the source is often float16).
        info: extra facts recorded in the folder's ``potstill-ct2.json``.

    Returns:
        ``out`` as a Path.
    """
    from safetensors.numpy import save_file
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise FileNotFoundError(f"CTranslate2 folder {folder} does not exist")
    files = [Path(f) for f in model_files] if model_files else [folder / "model.bin"]
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
    _check_out(out)

    model = read_ct2(files)
    source = " + ".join(str(f) for f in files)
    weights, fields = whisper_weights(model, source)
    tokens = _tokens(folder, fields["vocab_size"])
    ct2_config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            ct2_config = json.loads((folder / "config.json").read_text())
        except ValueError as exc:
            raise CT2FormatError(f"{folder / 'config.json'} is not valid JSON: {exc}") from exc
    # OpenAI's rule: the multilingual vocabulary is the one with 51,865 or more ids
    multilingual = fields["vocab_size"] >= 51865
    eot = tokens["<|endoftext|>"]
    config = WhisperConfig(**fields, decoder_start_token_id=tokens["<|startoftranscript|>"], bos_token_id=eot,
                           eos_token_id=eot, pad_token_id=eot, dtype=str(dtype).removeprefix("torch."),
                           # generation settings live in generation_config.json only (transformers
                           # warns when the model config carries them too)
                           suppress_tokens=None, begin_suppress_tokens=None)
    config.architectures = ["WhisperForConditionalGeneration"]  # the class generic loaders pick
    _check_keys(WhisperForConditionalGeneration, config, weights, source)

    torch_dtype = torch.zeros((), dtype=dtype).numpy().dtype if dtype != torch.bfloat16 else None
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if torch_dtype is None:  # NumPy cannot hold bfloat16: write through torch
            from safetensors.torch import save_file as save_torch

            save_torch({k: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(dtype)
                        for k, a in weights.items()}, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        else:
            save_file({k: np.ascontiguousarray(a, dtype=torch_dtype) for k, a in weights.items()},
                      str(tmp / _WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        GenerationConfig(**_generation_config(tokens, fields, ct2_config, multilingual)).save_pretrained(tmp)

        # the tokenizer: the folder's own, timestamps added back; transformers then writes it in its form
        staging = tmp / ".tokenizer"
        staging.mkdir()
        (staging / "tokenizer.json").write_text(json.dumps(tokens.tokenizer, ensure_ascii=False), encoding="utf-8")
        (staging / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "WhisperTokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "add_prefix_space": False,
            "errors": "replace", "model_max_length": fields["max_target_positions"],
            "additional_special_tokens": _specials(tokens)}))
        tokenizer = WhisperTokenizer.from_pretrained(staging)
        if len(tokenizer) != fields["vocab_size"]:
            raise CT2FormatError(f"the tokenizer of {folder} has {len(tokenizer):,} tokens after conversion, "
                                 f"the model {fields['vocab_size']:,}")
        feature_extractor = WhisperFeatureExtractor(feature_size=fields["num_mel_bins"])
        WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(tmp)
        feature_extractor.save_pretrained(tmp)  # preprocessor_config.json, for loaders that look for it
        shutil.copymode(tmp / "config.json", tmp / _WEIGHTS)  # safetensors writes it owner-only
        for f in staging.iterdir():
            f.unlink()
        staging.rmdir()
        # transformers' English normaliser needs a spelling map; the CTranslate2 folder has none
        (tmp / "normalizer.json").write_text("{}\n")

        record = {"format": "potstill CTranslate2 Whisper conversion", "spec": model.spec,
                  "binary_version": model.binary_version, "multilingual": multilingual,
                  "vocab_size": fields["vocab_size"], "dtype": str(dtype).removeprefix("torch."),
                  "source": source_fingerprint(folder, files), **(info or {}),
                  "files": sorted(p.name for p in tmp.iterdir())}
        write_json(tmp / MARKER, record)
    log.info("converted CTranslate2 Whisper %s → %s (%d encoder + %d decoder layers, vocabulary %d)",
             source, out, fields["encoder_layers"], fields["decoder_layers"], fields["vocab_size"])
    return out


def _check_keys(model_class: Any, config: Any, weights: dict[str, npt.NDArray[Any]], source: str) -> None:
    """Every weight the Hugging Face model has, at its shape, and no other (checked without allocating it)."""
    with torch.device("meta"):
        expected = {k: tuple(t.shape) for k, t in model_class(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("proj_out.weight", None)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in set(expected) & set(weights) if tuple(weights[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise CT2FormatError(f"{source} does not map onto WhisperForConditionalGeneration: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}, wrong shapes {sorted(wrong)[:5]}")


def is_conversion(folder: str | Path) -> bool:
    """Whether ``folder`` is a complete folder written by :func:`convert_ct2`."""
    record = read_marker(folder)
    return bool(record) and all((Path(folder) / f).exists() for f in record.get("files", []))

