"""The import graph of `hamjax` runs downward only: every module sits in a declared layer and
imports only from its own layer or below, no files import each other in a loop, and no module
re-exports through a module-level `__getattr__`.

Read with `ast`, never by importing, so imports inside functions count too. Importing
`a.b.c` from outside package `a.b` also runs `a/b/__init__.py`, so that import counts as an
import of the package as well (a light module under a heavy `__init__` drags it in).
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hamjax"

# Bottom to top. A module belongs to the layer of the longest prefix listed (the root package
# `hamjax` names only its own `__init__`); it may import from its own layer and those below it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("hamjax", "hamjax.errors", "hamjax.paths", "hamjax.validation",
     "hamjax.cpu_devices", "hamjax.backends", "hamjax.sharding", "hamjax.metrics",
     "hamjax.checkpoint", "hamjax.runlog", "hamjax.workdir_lock", "hamjax.flops",
     "hamjax.accelerators"),
    ("hamjax.attacks",),
    ("hamjax.data",),
    ("hamjax.models",),
    ("hamjax.methods",),
    ("hamjax.analysis",),
    ("hamjax.optim", "hamjax.state", "hamjax.averaging"),
    ("hamjax.config",),
    ("hamjax.evaluation",),
    ("hamjax.run",),
    ("hamjax.train", "hamjax.evaluation.workdir", "hamjax.evaluation.cli", "hamjax.evaluate"),
    ("hamjax.launch",),
)

# Pairs (importer prefix, imported prefix) that must not meet even through a chain of imports:
# evaluators are configured from a config and never pull in the trainer.
NEVER_REACHES = (("hamjax.evaluation", "hamjax.train"), ("hamjax.evaluate", "hamjax.train"))


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every hamjax module `module` imports, at top level or inside functions; `from P import
    x` names module `P.x` when that is a module, else `P`."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            target = _absolute(module, path.name == "__init__.py", node)
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.add(sub if sub in known else target)
    return {name for name in out if name == "hamjax" or name.startswith("hamjax.")}


def _packages_run(importer: str, imported: str, known: set[str]) -> set[str]:
    """The packages whose `__init__` an import of `imported` runs: its enclosing packages
    that do not also enclose the importer (those are already being imported), and never the
    root `hamjax` package."""
    parts = imported.split(".")
    out = set()
    for i in range(2, len(parts)):
        package = ".".join(parts[:i])
        if package in known and not (importer + ".").startswith(package + "."):
            out.add(package)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for imported in imported_names(name, path, known):
            assert imported in known, f"{name} imports {imported}, which is not a module"
            edges.add(imported)
            edges |= _packages_run(name, imported, known)
        edges.discard(name)
        graph[name] = edges
    return graph


def layer_of(module: str) -> int:
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "hamjax"
            if (module == prefix or inside) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"{module} is in no layer: add it to LAYERS"
    return layer


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# --------------------------------------------------------------------------- the checker itself


def test_checker_sees_cycles_upward_imports_and_packages():
    """The helpers on a hand-made graph: a cycle is found, a clean DAG has none, and a package
    `__init__` counts for imports from outside the package only."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    known = {"hamjax.train", "hamjax.train.state", "hamjax.run"}
    assert _packages_run("hamjax.run", "hamjax.train.state", known) == {"hamjax.train"}
    assert _packages_run("hamjax.train.loop", "hamjax.train.state", known) == set()
    assert layer_of("hamjax.evaluation.workdir") > layer_of("hamjax.evaluation.stages")
    assert upward_imports({"hamjax.attacks.pgd_attack": {"hamjax.train"}})


def test_checker_reads_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "mod.py"
    source.write_text("import os\nfrom hamjax.data import splits\n"
                      "def f():\n    from hamjax.train.loop import Trainer\n")
    known = {"hamjax.data", "hamjax.data.splits", "hamjax.train", "hamjax.train.loop"}
    assert imported_names("hamjax.x", source, known) == {"hamjax.data.splits",
                                                         "hamjax.train.loop"}


# --------------------------------------------------------------------------- the package


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_module_imports_a_layer_above_it(graph):
    assert upward_imports(graph) == []


def test_no_import_cycle_between_files(graph):
    assert find_cycle(graph) is None


def test_evaluators_never_reach_the_trainer(graph):
    for module in graph:
        for source, forbidden in NEVER_REACHES:
            if module == source or module.startswith(source + "."):
                bad = sorted(m for m in reachable(graph, module)
                             if m == forbidden or m.startswith(forbidden + "."))
                assert not bad, f"{module} reaches {bad}"


def test_no_module_level_getattr():
    for name, path in all_modules().items():
        tree = ast.parse(path.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert "__getattr__" not in defined, f"{name} defines a module-level __getattr__"
