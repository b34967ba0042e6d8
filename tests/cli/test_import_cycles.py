"""The modules of ``cli/`` import each other without a cycle.

Every import counts, wherever it stands: at the top, inside a function, or under
``if TYPE_CHECKING:``. A cycle hidden by a function-level import still ties the two
modules together (each needs the other to be understood, and to be changed); the
composition of ``tailledger serve`` reads one way, from the settings through the
network services to the server that assembles them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(name: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules: set[str]) -> Iterator[str]:
    """The modules of ``modules`` that one import statement names."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            if alias.name in modules:
                yield alias.name
        return
    if node.level:
        package = name.split(".") if is_package else name.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            yield f"{base}.{alias.name}"  # a submodule
        elif base in modules:
            yield base  # a name defined in the module


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` (a folder of ``root``) it imports, by every
    import statement in its file."""
    files = {_module_name(p, root): p for p in (root / package).rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = {
            target
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for target in _targets(name, path.name == "__init__.py", node, modules)
            if target != name
        }
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in import order, the first repeated), or ``None``."""
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(node: str) -> list[str] | None:
        path.append(node)
        on_path.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                found = visit(nxt)
                if found is not None:
                    return found
        path.pop()
        on_path.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            found = visit(start)
            if found is not None:
                return found
    return None


def test_find_cycle_sees_a_cycle_and_its_absence() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_graph_counts_every_import(tmp_path: Path) -> None:
    """Function-level, TYPE_CHECKING, relative, absolute and submodule imports all count."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from .b import g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.sub import c\n",
        "sub/__init__.py": "from . import c\n",
        "sub/c.py": "import pkg.a\nfrom .. import b\n",
        "d.py": "import os\nfrom pkg import sub\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert import_graph("pkg", tmp_path) == {
        "pkg": set(),
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": {"pkg.sub.c"},
        "pkg.sub.c": {"pkg.a", "pkg.b"},
        "pkg.d": {"pkg.sub"},
    }
    assert find_cycle(import_graph("pkg", tmp_path)) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_cli_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph("cli"))
    assert cycle is None, "cli/ imports in a circle: " + " -> ".join(cycle or [])
