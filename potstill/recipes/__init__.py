"""Recipes: the built-in ones by name (``potstill distill mnist``) or any YAML file, loaded,
overridden (``--set section.field=value``) and validated against their task's schema.

Recipe loading sits above the tasks (it asks :data:`potstill.tasks.TASKS` for a task's schema);
the schema's shared sections live below them, in :mod:`potstill.config`.
"""

from __future__ import annotations

import difflib
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


def _variants(annotation: Any) -> dict[str, type[BaseModel]]:
    """The sections a field may hold, by the tag pydantic puts in an error's location (a tagged union's
    ``Tag``, or a variant's literal ``name`` / ``architecture``); a plain section under ``""``."""
    from typing import Annotated, Literal, Union, get_args, get_origin

    from pydantic import Tag

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return {"": annotation}
    if get_origin(annotation) is Annotated:
        inner, *metadata = get_args(annotation)
        tags = [m.tag for m in metadata if isinstance(m, Tag)]
        found = _variants(inner)
        return {tags[0]: next(iter(found.values()))} if tags and len(found) == 1 else found
    out: dict[str, type[BaseModel]] = {}
    if get_origin(annotation) is list:  # a list of sections: its items are addressed by index
        return {f"[{tag}]": cls for tag, cls in _variants(get_args(annotation)[0]).items()}
    if get_origin(annotation) is Union or type(annotation).__name__ == "UnionType":
        for member in get_args(annotation):
            for tag, cls in _variants(member).items():
                if tag:
                    out[tag] = cls
                    continue
                for field in cls.model_fields.values():  # a discriminator field: a literal default
                    if get_origin(field.annotation) is Literal and isinstance(field.default, str):
                        out[field.default] = cls
    return out


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], type[BaseModel] | None]:
    """The parts of an error location as the recipe spells them (union tags left out), and the
    section that holds its last part (None when it is not a section)."""
    shown: list[str] = []
    section: type[BaseModel] | None = model
    parts = [str(p) for p in loc]
    i = 0
    while i < len(parts):
        shown.append(parts[i])
        if i == len(parts) - 1:
            break
        field = section.model_fields.get(parts[i]) if section is not None else None
        variants = _variants(field.annotation) if field is not None else {}
        if "" in variants and len(variants) == 1:
            section = variants[""]
        elif "[]" in variants and parts[i + 1].isdigit():
            section = variants["[]"]
            shown.append(parts[i + 1])
            i += 1
        elif parts[i + 1] in variants:
            section = variants[parts[i + 1]]
            i += 1  # the tag pydantic adds is not a field of the recipe
        else:
            section = None
        i += 1
    return shown, section


def _describe(error: dict[str, Any], recipe_type: type[Recipe]) -> str:
    shown, section = _walk(recipe_type, tuple(error["loc"]))
    where = ".".join(shown) or "(recipe)"
    if error["type"] == "extra_forbidden":
        allowed = list(section.model_fields) if section is not None else []
        return f"unknown field {where!r}; allowed here: {', '.join(allowed)}.{_did_you_mean(shown[-1], allowed)}"
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
