"""The layout's rules: imports run one way, flags only in programs, modules stay small.

common <- models <- export <- app libraries <- app programs (and bench on top of all).
Read from the source (every import statement, function-level ones included), and checked
once in a fresh process for what importing the lower layers really loads.
"""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

from tests.helpers import REPO

PACKAGES = ("common", "models", "export", "app", "bench", "tests")
# The command-line layer: the only modules that may use absl.flags / absl.app.
PROGRAMS = {
    "app.cli",
    "app.data_flags",
    "app.train",
    "app.evaluate",
    "app.predict",
    "app.export",
    "app.visualize",
    "app.make_shards",
}
# What each layer may import from this repository.
ALLOWED = {
    "common": {"common"},
    "models": {"common", "models"},
    "export": {"common", "models", "export"},
    "app": {"common", "models", "export", "app"},
}
MAX_LINES = 400


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _imported_modules(path: pathlib.Path) -> set[str]:
    """The project modules `path` imports anywhere (in functions and under `TYPE_CHECKING`
    too): `from a.b import c` names the module `a.b.c` when there is one, else `a.b`. Parent
    packages of an imported module are not counted: Python initialises them first."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in MODULES else node.module)
    return found & set(MODULES)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of more than one
    module (Tarjan's algorithm, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def _imports(path: pathlib.Path, anywhere: bool = True) -> set[str]:
    """Absolute module names `path` imports (at module level only, unless `anywhere`)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = ast.walk(tree) if anywhere else _module_level(tree.body)
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _module_level(body: list[ast.stmt]):
    """Statements that run on import: the body, and inside if/try/with, not in functions."""
    for node in body:
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            inner = getattr(node, field, None)
            if isinstance(inner, list) and not isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
            ):
                yield from _module_level(inner)


def _layer(module: str) -> str:
    if module.startswith("app.") and module in PROGRAMS:
        return "program"
    return module.split(".")[0]


MODULES = _modules()


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) in ALLOWED))
def test_imports_run_one_way(module):
    """A library imports only its own layer and those below; never a program or absl.flags."""
    allowed = ALLOWED[_layer(module)]
    ours = {name for name in _imports(MODULES[module]) if name.split(".")[0] in PACKAGES}
    upward = sorted(
        name for name in ours if name.split(".")[0] not in allowed or _layer(name) == "program"
    )
    assert not upward, f"{module} imports {upward}: against the layering"
    flags = {"absl.flags", "absl.app"} & _imports(MODULES[module])
    assert not flags, f"{module} is a library but uses {flags}: flags belong to app programs"


def test_no_import_cycles_anywhere():
    """No two modules of the project (bench and tests included) import each other, directly
    or through others, counting imports inside functions and under `TYPE_CHECKING`."""
    graph = {module: _imported_modules(path) - {module} for module, path in MODULES.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e", "f"}, "f": {"e"}}
    assert sorted(_cycles(graph)) == [["a", "b", "c"], ["e", "f"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


# The one module of `common/` that may use TensorFlow: the file layer, inside its functions,
# for remote paths only (`tf.io.gfile`), so local work needs no TensorFlow.
TENSORFLOW_IN_COMMON = {"common.files"}


def test_models_and_common_import_no_tensorflow_at_module_level():
    for module, path in MODULES.items():
        if _layer(module) in ("models", "common"):
            top = {name.split(".")[0] for name in _imports(path, anywhere=False)}
            assert "tensorflow" not in top, f"{module} imports tensorflow at module level"
        if _layer(module) == "common":
            anywhere = {name.split(".")[0] for name in _imports(path)}
            assert not anywhere & {"keras", "models", "export", "app"}, module
            if module not in TENSORFLOW_IN_COMMON:
                assert "tensorflow" not in anywhere, module


def test_importing_export_and_models_loads_no_app_module():
    lower = sorted(m for m in MODULES if _layer(m) in ("common", "models", "export"))
    script = (
        "import importlib, json, sys\n"
        f"for name in {lower!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'app' or m.startswith('app.'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_no_module_is_over_the_size_limit():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    too_long = {m: n for m, n in sizes.items() if n > MAX_LINES}
    assert not too_long, f"split these by job (lines): {too_long}"


def test_nothing_points_outside_the_repository():
    """Code and docs stand alone: no paths into the workspace around the repository."""
    shipped = [p for m, p in MODULES.items() if _layer(m) not in ("tests",)]
    shipped += [REPO / "README.md", REPO / "BUILD.md", REPO / "Makefile"]
    shipped += sorted((REPO / "app" / "configs").glob("*.flags"))
    for path in shipped:
        text = path.read_text()
        for needle in ("../shared", "DESIGN.md", "PITFALLS.md"):
            assert needle not in text, f"{path.relative_to(REPO)} mentions {needle}"
