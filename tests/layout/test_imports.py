"""The package's shape, read from its source with `ast`: no import cycle between bpfm's modules,
and only the Ray glue imports Ray (the library runs, and is tested, without a cluster)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "bpfm"
RAY_GLUE = {"bpfm.orchestration.ray_grid", "bpfm.orchestration.ray_search"}


def module_files() -> dict[str, Path]:
    files = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING",
                                                                    "typing.TYPE_CHECKING"}:
            return True
    return False


def imports_of(name: str, path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(bpfm modules `name` imports, top-level packages it imports), at any depth of the file
    (an import inside a function is still a dependency), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text(), str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                       for a in node.names]
        for target in targets:
            external.add(target.split(".")[0])
            if target in modules and target != name:
                internal.add(target)
    return internal, external


@pytest.fixture(scope="module")
def graph() -> dict[str, tuple[set[str], set[str]]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in edges.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_the_walk_sees_the_package(graph):
    assert {"bpfm.training.loop", "bpfm.orchestration.ray_grid", "bpfm.data.loader"} <= set(graph)
    assert "bpfm.training.config" in graph["bpfm.training.loop"][0]


def test_no_import_cycle(graph):
    assert cycles({name: internal for name, (internal, _) in graph.items()}) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_ray_glue_imports_ray(graph):
    importers = {name for name, (_, external) in graph.items() if "ray" in external}
    assert importers == RAY_GLUE
