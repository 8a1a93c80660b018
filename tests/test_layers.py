"""The house: tdask's packages are layers, each module imports only from layers below it (or its own package),
and no module imports one that imports it back. Read from the source, imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import tdask

PACKAGE = Path(tdask.__file__).resolve().parent

# bottom to top; a module may import from its own layer's package or from a lower layer
LAYERS = [
    {"tdask.config", "tdask.errors", "tdask.compat"},
    {"tdask.operator", "tdask.tensors", "tdask.registry"},
    {"tdask.shm"},
    {"tdask.comm", "tdask.triton"},
    {"tdask.session"},
    {"tdask.worker"},
    {"tdask.deploy", "tdask.observe", "tdask.frontdoor"},
    {"tdask.cli"},
    {"tdask", "tdask.client"},
]


def _module(path: Path) -> str:
    parts = ("tdask", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def _unit(module: str) -> str:
    """The layer member a module belongs to: its package under tdask, or the top-level module itself."""
    for layer in LAYERS:
        for unit in sorted(layer, key=len, reverse=True):
            if module == unit or (unit != "tdask" and module.startswith(unit + ".")):
                return unit
    return "tdask"


def _rank(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = _module(path)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("tdask")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tdask"):
                for alias in node.names:  # "from tdask.comm import protocol" imports tdask.comm.protocol
                    candidate = f"{node.module}.{alias.name}"
                    found.add(candidate if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists()
                              else node.module)
        graph[module] = found - {module}
    return graph


def test_every_import_goes_down_the_layers() -> None:
    upward = []
    for module, imported in _imports().items():
        unit = _unit(module)
        for other in imported:
            other_unit = _unit(other)
            if other_unit != unit and _rank(other_unit) >= _rank(unit):
                upward.append(f"{module} -> {other}")
    assert upward == [], upward


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _imports()
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        for other in graph.get(module, ()):
            if other in trail:
                cycles.append(trail[trail.index(other):] + [other])
            elif other in graph and other not in done:
                visit(other, [*trail, other])
        done.add(module)

    done: set[str] = set()
    for module in graph:
        visit(module, [module])
    assert cycles == [], cycles
