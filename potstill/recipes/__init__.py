"""Recipes: the built-in ones by name (``potstill distill mnist``) or any YAML file, loaded,
overridden (``--set section.field=value``) and validated against their task's schema.

Recipe loading sits above the tasks (it asks :data:`potstill.tasks.TASKS` for a task's schema);
the schema's shared sections live below them, in :mod:`potstill.config`.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..config import Recipe, RecipeError, parse_yaml
from ..tasks import TASKS

HERE = Path(__file__).parent

__all__ = ["apply_overrides", "builtin_recipes", "describe", "load_recipe", "parse_recipe", "resolve_recipe_path"]


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe names and their files."""
    return {p.stem: p for p in sorted(HERE.glob("*.yaml"))}


def describe(path: Path) -> str:
    """The first comment line of a recipe file: what it runs."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def resolve_recipe_path(source: str | Path) -> Path:
    """A path to an existing file, or the file of a built-in recipe name."""
    path = Path(source)
    if path.is_file():
        return path
    if path.is_dir():
        raise RecipeError(f"recipe {str(source)!r} is a directory; give a recipe file (YAML) or a built-in name")
    builtins = builtin_recipes()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if str(source) == name and name in builtins:
        return builtins[name]
    raise RecipeError(
        f"no recipe file {str(source)!r} and no built-in recipe of that name; "
        f"built-in recipes: {', '.join(builtins) or '(none)'}.{_did_you_mean(name, builtins)}"
    )


def _field_names(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc`` (for "did you mean"); a section that is one of several
    kinds (``data: {name: pairs}``) appears in ``loc`` with its kind after its name."""
    parts = [str(p) for p in loc[:-1]]
    while parts:
        annotation = getattr(model.model_fields.get(parts.pop(0)), "annotation", None)
        kinds = {m.model_fields["name"].default: m for m in typing.get_args(annotation)
                 if isinstance(m, type) and issubclass(m, BaseModel) and "name" in m.model_fields}
        if kinds and parts and parts[0] in kinds:
            annotation = kinds[parts.pop(0)]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe(error: dict[str, Any], recipe_type: type[Recipe]) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "(recipe)"
    if error["type"] == "extra_forbidden":
        allowed = _field_names(recipe_type, loc)
        return f"unknown field {where!r}; allowed here: {', '.join(allowed)}.{_did_you_mean(str(loc[-1]), allowed)}"
    message = error["msg"].removeprefix("Value error, ")
    return f"field {where!r}: {message} (got {error.get('input')!r})"


def _not_a_recipe(data: Any) -> str | None:
    """What is wrong with ``data`` as the top level of a recipe, or None."""
    needs = f"a recipe needs at least `task:` (one of: {', '.join(TASKS)}); see `potstill recipes` for examples"
    if not data:
        return f"the recipe is empty: {needs}"
    if not isinstance(data, dict):
        return f"a recipe must be a mapping of sections, got {type(data).__name__}: {needs}"
    return None if "task" in data else f"field 'task' is missing: {needs}"


def parse_recipe(data: Any) -> Recipe:
    """Validate a recipe given as a dict; raises :class:`RecipeError` naming each bad field."""
    if problem := _not_a_recipe(data):
        raise RecipeError(problem)
    task = data["task"]
    if task not in TASKS:
        raise RecipeError(f"field 'task': unknown task {task!r}; known tasks: {', '.join(TASKS)}."
                          f"{_did_you_mean(str(task), TASKS)}")
    recipe_type = TASKS[task].recipe_type
    try:
        return recipe_type.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(e, recipe_type) for e in exc.errors()]
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(lines)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` overrides (values parsed as YAML) to a recipe dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like section.field=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
        node[leaf] = parse_yaml(raw)
    return data


def load_recipe(source: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe from a YAML path or a built-in recipe name, then apply overrides."""
    path = resolve_recipe_path(source)
    try:
        data = parse_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(f"recipe {path} is not UTF-8 text (byte {exc.start}): is it a recipe?") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) and (problem := _not_a_recipe(data)):
        raise RecipeError(f"{path}: {problem}")
    return parse_recipe(apply_overrides(data, overrides or []))
