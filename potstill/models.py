"""Models potstill can build, save and load.

Small built-in architectures (an MLP for the classic flavour) are saved as ``model.safetensors``
plus a ``config.json`` naming the architecture; Hugging Face models use their own
``save_pretrained`` / ``from_pretrained``. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_path, write_json

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
ARCHITECTURE_KEY = "potstill_architecture"


class MLP(nn.Module):
    """A fully connected classifier (Hinton et al. 2015 §3 uses 784-1200-1200-10 with dropout)."""

    def __init__(self, in_features: int, num_classes: int, hidden_sizes: list[int],
                 dropout: float = 0.0, input_dropout: float = 0.0):
        super().__init__()
        self.config = {
            ARCHITECTURE_KEY: "mlp", "in_features": in_features, "num_classes": num_classes,
            "hidden_sizes": list(hidden_sizes), "dropout": dropout, "input_dropout": input_dropout,
        }
        layers: list[nn.Module] = [nn.Dropout(input_dropout)] if input_dropout else []
        width = in_features
        for size in hidden_sizes:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


BUILDERS = {"mlp": MLP}


@contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no gradients inside; each model's training mode restored after."""
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_model(model: nn.Module, folder: str | Path) -> Path:
    """Save ``model`` to ``folder`` atomically: safetensors weights plus config."""
    folder = Path(folder)
    with atomic_path(folder) as tmp:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            config = getattr(model, "config", None)
            if not isinstance(config, dict) or ARCHITECTURE_KEY not in config:
                raise TypeError(
                    f"cannot save a {type(model).__name__}: it is neither a Hugging Face model "
                    "nor a potstill architecture"
                )
            tmp.mkdir()
            state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
            save_file(state, tmp / WEIGHTS)
            write_json(tmp / CONFIG, config)
    return folder


def load_model(folder: str | Path, **hf_kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_model`, or any Hugging Face model folder / hub name."""
    folder = Path(folder)
    config_path = folder / CONFIG
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        if ARCHITECTURE_KEY in config:
            if config[ARCHITECTURE_KEY] not in BUILDERS:  # e.g. "speech-llm": its own module loads it
                raise ValueError(f"{config_path} describes a potstill {config[ARCHITECTURE_KEY]!r} model, which "
                                 f"load_model does not build; built here: {', '.join(BUILDERS)} (a speech-llm "
                                 "loads with potstill.speech_llm.SpeechLLM.from_pretrained)")
            kwargs = {k: v for k, v in config.items() if k != ARCHITECTURE_KEY}
            model = BUILDERS[config[ARCHITECTURE_KEY]](**kwargs)
            model.load_state_dict(load_file(folder / WEIGHTS))
            return model
    import transformers

    # load the class that was saved (e.g. LlamaForCausalLM), not a headless AutoModel
    config = transformers.AutoConfig.from_pretrained(str(folder), **hf_kwargs)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture, None) if architecture else None
    model_class = model_class or transformers.AutoModel
    return model_class.from_pretrained(str(folder), use_safetensors=True, **hf_kwargs)
