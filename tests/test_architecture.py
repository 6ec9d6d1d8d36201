"""The layout's rule: imports run one way, from the command line down to the losses (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import potstill

ROOT = Path(potstill.__file__).parent
#: top to bottom; a module may import (anywhere in it) only modules of its own layer or below
LAYERS = [
    {"potstill", "potstill.__main__", "potstill.cli", "potstill.distill", "potstill.integrations"},
    {"potstill.recipes"},
    {"potstill.tasks"},
    {"potstill.engine", "potstill.model_card", "potstill.report"},
    {"potstill.objective", "potstill.teachers", "potstill.students", "potstill.pretrained", "potstill.whisper_ct2",
     "potstill.speech_llm"},
    {"potstill.checkpoint", "potstill.models", "potstill.signals", "potstill.progress"},
    {"potstill.config", "potstill.losses", "potstill.batch", "potstill.data", "potstill.audio", "potstill.metrics",
     "potstill.io"},
]


def layer_of(module: str) -> int:
    """The layer of a module: that of the longest layer entry it is, or is inside of."""
    best = max((entry for layer in LAYERS for entry in layer if module == entry or module.startswith(entry + ".")),
               key=len)
    return next(i for i, layer in enumerate(LAYERS) if best in layer)


def modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(module: str, path: Path) -> set[str]:
    """The potstill modules ``module`` imports, at module level or inside functions."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            found.update(names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("potstill"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("potstill"))
    return {name for name in found if name != module}


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_no_import_reaches_up_a_layer():
    upward = []
    for module, path in modules().items():
        for target in imports(module, path):
            known = [m for m in modules() if target == m or target.startswith(m + ".")]
            if known and layer_of(max(known, key=len)) < layer_of(module):
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that reach up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    graph = {m: {t for t in imports(m, p) if t in modules()} for m, p in modules().items()}
    # a package's __init__ importing its own submodules is how packages are built, not a circle
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    visiting, done, circles = set(), set(), []

    def visit(node, trail):
        if node in visiting:
            circles.append(" -> ".join([*trail[trail.index(node):], node]))
            return
        if node in done:
            return
        visiting.add(node)
        for target in sorted(graph.get(node, ())):
            visit(target, [*trail, node])
        visiting.discard(node)
        done.add(node)

    for module in sorted(graph):
        visit(module, [])
    assert not circles, "import circles:\n" + "\n".join(circles)
