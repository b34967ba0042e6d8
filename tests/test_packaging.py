"""Packaging guards: our five top-level names are ours, and imports point one way."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("eventlog", "projections", "protocol", "relay", "cli")

# Which of our packages each package may import (rule 1 of docs/style.md).
ALLOWED: dict[str, set[str]] = {
    "eventlog": set(),
    "projections": {"eventlog"},
    "protocol": {"eventlog", "projections"},
    "relay": {"eventlog", "projections"},
    "cli": {"eventlog", "projections", "protocol", "relay"},
}


@pytest.mark.parametrize("name", PACKAGES)
def test_top_level_package_is_ours(name: str) -> None:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None
    assert Path(spec.origin).resolve().is_relative_to(ROOT), f"{name} resolves outside the repo"
    owners = importlib.metadata.packages_distributions().get(name)
    assert owners in (None, ["tailledger"]), f"another distribution claims {name!r}: {owners}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(PACKAGES)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_one_way(package: str) -> None:
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for imported in _imports(path) - ALLOWED[package] - {package}:
            bad.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not bad, "\n".join(bad)


SANS_IO = ("protocol/noise", "relay/derp/frames.py", "relay/stun.py")


@pytest.mark.parametrize("where", SANS_IO)
def test_cores_are_sans_io(where: str) -> None:
    target = ROOT / where
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    if not files or not all(f.exists() for f in files):
        pytest.fail(f"{where} is missing")
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module.split(".")[0]]
            assert not {"trio", "socket", "asyncio"} & set(names), f"{path} does I/O"
