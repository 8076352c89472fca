"""The package's import graph: data flows one way (headers -> plan -> stream -> engine), so a module
imports only from its own layer or lower ones, and nothing imports in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import lazyxform

PACKAGE = Path(lazyxform.__file__).parent
# Lowest first. Within a layer, modules may import each other (without a circle).
LAYERS: list[set[str]] = [
    {"errors", "checks", "profile"},
    {"shards", "modelopt", "topology", "ops", "routing"},
    {"plan"},
    {"recipes"},
    {"fallback", "prequant", "emulate"},
    {"planner"},
    {"reader", "stream"},
    {"checkpoint"},
    {"cli", "__init__"},
]


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__") or "__init__"


def imports_of(path: Path) -> set[str]:
    """The lazyxform modules `path` imports anywhere in its text (function-level imports included)."""
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" and here != ["__init__"] else here[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif node.module and node.module.split(".")[0] == "lazyxform":
                base, node.module = [], node.module.removeprefix("lazyxform").lstrip(".") or None
            else:
                continue
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}".lstrip(".") for a in node.names} if not node.module else {target}
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("lazyxform.") for a in node.names if a.name.startswith("lazyxform.")}
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    resolved = set()
    for name in found:  # `from . import profile` names a module; `from .plan import Rule` names a symbol
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name:
            resolved.add(name)
    return resolved - {module_name(path)}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"lazyxform.{module} is in no layer of {__file__}: place it")


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_has_a_layer():
    for module in GRAPH:
        layer_of(module)


def test_no_module_imports_from_a_higher_layer():
    upward = [f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets if layer_of(t) > layer_of(m)]
    assert not upward, upward


def test_no_import_circle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(GRAPH.get(module, ())):
            assert state.get(target) != 1, " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


def test_the_checks_see_real_imports():
    """The graph is not empty by mistake: known edges are found."""
    assert {"plan", "planner", "reader", "stream"} <= GRAPH["checkpoint"]
    assert "recipes.base" in GRAPH["recipes.fp8"] and "plan" in GRAPH["recipes.base"]
    assert "profile" in GRAPH["reader"]


def test_the_core_tests_import_no_vllm():
    """Only tests/vllm imports vLLM or the plugin (its conftest needs vLLM): the core suite runs
    where vLLM is not installed."""
    tests = Path(__file__).parent
    found = []
    for path in sorted(tests.rglob("*.py")):
        if "vllm" in path.relative_to(tests).parts[:-1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            found += [f"{path.relative_to(tests)}: {n}" for n in names if n.split(".")[0] in ("vllm", "lazyxform_vllm")]
    assert not found, found
