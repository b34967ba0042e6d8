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


# The trio-free cores of protocol/ and relay/ (style rule 2): they parse, decide and
# build bytes, and leave sockets, tasks and clocks to the adapters.  A directory means
# every module under it.
SANS_IO = (
    "protocol/noise",
    "protocol/client_conn.py",
    "protocol/early.py",
    "protocol/errors.py",
    "protocol/h2_bridge.py",
    "protocol/h2flow.py",
    "protocol/handler.py",
    "protocol/mapframe.py",
    "protocol/ratelimit.py",
    "protocol/upgrade.py",
    "relay/auth.py",
    "relay/derp",
    "relay/errors.py",
    "relay/http_front.py",
    "relay/keys.py",
    "relay/serve/config.py",
    "relay/stun.py",
)
IO_MODULES = {"trio", "socket", "asyncio", "selectors", "select", "anyio"}
# Known exceptions, each to be removed: protocol.compat holds the h2 patches these
# cores need *and* the hypercorn trio hand-off, so importing it pulls in trio.  Splitting
# the hypercorn half out of compat removes this entry.
ALLOWED_IO_DEPENDENCIES = {
    ("protocol/h2_bridge.py", "protocol/compat.py"),
    ("protocol/h2flow.py", "protocol/compat.py"),
}


def _sans_io_files() -> set[Path]:
    files: set[Path] = set()
    for where in SANS_IO:
        target = ROOT / where
        files.update([target] if target.is_file() else target.rglob("*.py"))
    return files


def _resolve(path: Path, node: ast.ImportFrom) -> list[Path]:
    """The files of protocol/ and relay/ that a ``from ... import`` names, if any."""
    if node.level:
        base = path.parent
        for _ in range(node.level - 1):
            base = base.parent
    else:
        base = ROOT
    if node.module:
        base = base.joinpath(*node.module.split("."))
    candidates = [base.with_suffix(".py"), base / "__init__.py"]
    candidates += [base / f"{alias.name}.py" for alias in node.names]
    inside = [c for c in candidates if c.is_file()]
    return [c for c in inside if c.relative_to(ROOT).parts[0] in ("protocol", "relay")]


@pytest.mark.parametrize("where", SANS_IO)
def test_cores_are_sans_io(where: str) -> None:
    """A core imports no I/O library, and none of our modules that is not itself a core."""
    target = ROOT / where
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    if not files or not all(f.exists() for f in files):
        pytest.fail(f"{where} is missing")
    cores = _sans_io_files()
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.module and node.level == 0:
                    names = [node.module.split(".")[0]]
                for dep in _resolve(path, node):
                    if dep.name == "__init__.py" and dep.parent != path.parent:
                        continue  # a package's map; its own modules are checked by name
                    pair = (str(path.relative_to(ROOT)), str(dep.relative_to(ROOT)))
                    if pair in ALLOWED_IO_DEPENDENCIES:
                        continue
                    assert dep in cores, f"{path} imports {dep.relative_to(ROOT)}, which does I/O"
            assert not IO_MODULES & set(names), f"{path} does I/O"


def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main
    from cli.version import package_version

    try:
        expected = importlib.metadata.version("tailledger")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout
        import tomllib

        expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert package_version() == expected
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"tailledger {expected}\n"
