"""Built-in recipes, addressable by name (``potstill distill mnist``) or by path."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe names and their files."""
    return {p.stem: p for p in sorted(HERE.glob("*.yaml"))}


def describe(path: Path) -> str:
    """The first comment line of a recipe file: what it runs."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_recipe_path(source: str | Path) -> Path:
    """A path to an existing file, or the file of a built-in recipe name."""
    path = Path(source)
    if path.is_file():
        return path
    builtins = builtin_recipes()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if str(source) == name and name in builtins:
        return builtins[name]
    from .. import config

    raise config.RecipeError(
        f"no recipe file {str(source)!r} and no built-in recipe of that name; "
        f"built-in recipes: {', '.join(builtins) or '(none)'}"
    )
