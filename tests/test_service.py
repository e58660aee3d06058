"""The seam above the loader (issue 22): front ends see only the PageService.

How it is checked:
- the front-end modules (the socket server, the loaded map, the userfaultfd handler and
  the zero-copy mode) never name ``Loader``: they are typed against ``PageService``,
  and mypy (``make lint``, strict) refuses any attribute of the loader the protocol
  does not have; the daemon hands its ``Loader`` to them, so mypy also checks that the
  loader implements the protocol;
- no module outside the loader's core reads or writes a private attribute of a loader
  (``something.loader._x``) or imports a private name from the core (this file, over
  the syntax trees of every production module).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("loader", "aio", "protocol", "workloads", "bench", "cli")


def _core(path: Path) -> bool:
    rel = path.relative_to(ROOT).as_posix()
    return rel == "loader/_loader.py" or rel.startswith("loader/core/")


def _front_ends() -> list[Path]:
    loader = ROOT / "loader"
    found = [loader / "socket" / "_server.py", loader / "socket" / "_session.py", loader / "_loadmap.py",
             *sorted((loader / "uffd").glob("*.py"))]
    assert all(p.exists() for p in found) and len(found) > 5
    return found


def test_front_ends_never_name_the_loader_class():
    offenders = []
    for path in _front_ends():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [node.id] if isinstance(node, ast.Name) else [node.attr] if isinstance(node, ast.Attribute)
                     else [])
            if "Loader" in names:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def _private_uses(path: Path, root: Path = ROOT) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base.rsplit(".", 1)[-1] in ("loader", "service"):
                out.append(f"{path.relative_to(root)}:{node.lineno}: {base}.{node.attr}")
        if isinstance(node, ast.ImportFrom) and node.module and (
                node.module.rsplit(".", 1)[-1] == "_loader" or "core" in node.module.split(".")):
            out += [f"{path.relative_to(root)}:{node.lineno}: import {a.name}" for a in node.names
                    if a.name.startswith("_")]
    return out


def test_nothing_outside_the_core_touches_the_loaders_private_state():
    offenders = [use for top in PRODUCTION for path in sorted((ROOT / top).rglob("*.py")) if not _core(path)
                 for use in _private_uses(path)]
    assert offenders == []


def test_the_check_sees_a_private_use(tmp_path):
    """The scan is not vacuous: it finds both kinds of use in a module that has them."""
    bad = tmp_path / "bad.py"
    bad.write_text("from loader.core._chunks import _Chunks\n\ndef f(state):\n    return state.loader._reads\n")
    assert len(_private_uses(bad, tmp_path)) == 2
