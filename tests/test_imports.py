"""No import circles between the project's modules (issue 22): every ``import`` is
counted, at module level or inside a function (a lazy import is a dependency all
the same), except those under ``if TYPE_CHECKING:``, which never run."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loader", "aio", "protocol", "cli", "bench", "workloads")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name in mods)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - child.level + 1])
                    target = f"{base}.{child.module}" if child.module else base
                else:
                    target = child.module or ""
                for a in child.names:
                    if f"{target}.{a.name}" in mods:
                        out.add(f"{target}.{a.name}")
                    elif target in mods:
                        out.add(target)
            visit(child)

    visit(ast.parse(path.read_text()))
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_between_modules() -> None:
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert sum(len(deps) for deps in graph.values()) > 100  # (the scan sees the imports at all)
    assert _cycles(graph) == []


def test_the_circle_finder_finds_a_lazy_circle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def _private_names_taken(package: str) -> list[str]:
    """``module: name`` for every ``_``-prefixed name a module of ``package`` imports
    from another of its modules (a private helper shared is one that belongs in a
    module both import, under a public name)."""
    mods = _modules()
    out = []
    for name, path in mods.items():
        if not name.startswith(package + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                out += [f"{name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return sorted(out)


def test_the_bench_modules_share_no_private_helpers() -> None:
    # bench/_uffd.py and bench/_uffd_minor.py traded private helpers (issue 22, "Other
    # circles"): what they share is bench/_guest.py's, by public names
    assert _private_names_taken("bench") == []
    assert _private_names_taken("loader")  # (the scan sees such imports where they are)
