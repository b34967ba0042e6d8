"""Packaging guards: our six top-level names are ours, imports point one way, and the
cores (every module of eventlog, projections, protocol, relay and wire but the named
I/O adapters) do no I/O."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("wire", "eventlog", "projections", "protocol", "relay", "cli")

# Which of our packages each package may import (rule 1 of docs/style.md):
# wire <- eventlog <- projections <- protocol, relay <- cli.  wire, the stream helpers
# protocol and relay share (they are peers and may not import each other), is at the
# bottom and imports nothing of ours.
ALLOWED: dict[str, set[str]] = {
    "wire": set(),
    "eventlog": {"wire"},
    "projections": {"wire", "eventlog"},
    "protocol": {"wire", "eventlog", "projections"},
    "relay": {"wire", "eventlog", "projections"},
    "cli": {"wire", "eventlog", "projections", "protocol", "relay"},
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


# Style rule 2: the cores parse, decide, fold and build bytes, and leave sockets, tasks
# and clocks to thin trio adapters.  Every module of these packages is a core unless it
# is named below as an adapter, so a module added or split off later is guarded from
# its first commit; a package that does not exist (yet) is skipped.
CORE_PACKAGES = ("eventlog", "projections", "protocol", "relay", "wire")
# The I/O adapters, each with what it adapts.  A top-level ``__init__.py`` is the
# package's map of public names (it imports adapters and cores alike) and is neither.
IO_ADAPTERS: dict[str, str] = {
    "eventlog/log.py": "the store's trio face: the serialized writer, reads in threads, tailing",
    "eventlog/headsigner.py": "the signing task (timers, the store in threads)",
    "projections/admin.py": "admin operations: appends through the service, impact in threads",
    "projections/presence_io.py": "presence persistence through the side tables (threads, timers)",
    "projections/presence_share.py": "the replicas' presence exchange over the shared store",
    "projections/runner.py": "tailing the log, checkpoints in threads, waking subscribers",
    "projections/service.py": "running commands: append, then wait for the fold to see them",
    "protocol/client.py": "the ts2021 client's trio adapter",
    "protocol/compat.py": "the h2 patches, and the hypercorn hand-off (trio)",
    "protocol/control/__init__.py": "the control handler's package: its map names the adapters below",
    "protocol/control/dispatch.py": "the control handler and its background duties' tasks",
    "protocol/control/hostinfo.py": "Hostinfo: the per-node rate limit on trio's clock, appends",
    "protocol/control/registration.py": "registrations: appends, follow-ups waiting for a decision",
    "protocol/control/streams.py": "map streams: hub driver, keep-alive ticker, parking, full-map turns",
    "protocol/ha.py": "route HA and auto-approval tasks",
    "protocol/registrations.py": "pending registrations kept beside the log (threads, expiry)",
    "protocol/serve/__init__.py": "the control port's trio adapter package",
    "protocol/serve/accept.py": "the control port's accept loop and connection caps",
    "protocol/serve/handoff.py": "hypercorn's lifespan and driver, the replay streams",
    "protocol/serve/idle.py": "the idle-reader set (one epoll task)",
    "protocol/serve/server.py": "the control port's listeners, TLS and front door",
    "protocol/serve/session.py": "the Noise session: reader, writes, handler tasks",
    "protocol/sshcheck.py": "the SSH check hold-and-delegate waits",
    "relay/client.py": "the DERP client's trio adapter",
    "relay/fetch.py": "fetching a DERP map over HTTP(S)",
    "relay/logauth.py": "the relay's consumer of the event log",
    "relay/serve/__init__.py": "the relay's trio adapter package",
    "relay/serve/derp_io.py": "DERP connection I/O",
    "relay/serve/mesh.py": "mesh links between the relays of a region",
    "relay/serve/server.py": "the relay's listeners and handle",
    "relay/serve/stun_io.py": "the STUN UDP sockets",
    "wire/sockets.py": "the socket under a trio stream: peer address, direct writes",
    "wire/wsstream.py": "a trio byte stream over WebSocket messages",
}
IO_MODULES = {"trio", "socket", "asyncio", "selectors", "select", "anyio"}
# Known exceptions, each to be removed: protocol.compat holds the h2 patches these
# cores need *and* the hypercorn trio hand-off, so importing it pulls in trio.  Splitting
# the hypercorn half out of compat removes this entry.
ALLOWED_IO_DEPENDENCIES = {
    ("protocol/h2_bridge.py", "protocol/compat.py"),
    ("protocol/h2flow.py", "protocol/compat.py"),
}


def _modules() -> list[str]:
    """Every module of the packages that hold cores, as paths relative to the root."""
    found = []
    for package in CORE_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found.append(str(path.relative_to(ROOT)))
    return found


def _is_map(module: str) -> bool:
    return module.count("/") == 1 and module.endswith("/__init__.py")


CORES = [m for m in _modules() if m not in IO_ADAPTERS and not _is_map(m)]


def _resolve(path: Path, node: ast.ImportFrom) -> list[Path]:
    """The files of our core packages that a ``from ... import`` names, if any."""
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
    inside = [c for c in candidates if c.is_file() and c.is_relative_to(ROOT)]
    return [c for c in inside if c.relative_to(ROOT).parts[0] in CORE_PACKAGES]


def _io_imports(path: Path) -> tuple[set[str], set[str]]:
    """The I/O libraries ``path`` imports, and the adapters of ours it imports."""
    libraries: set[str] = set()
    adapters: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            libraries.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.module and node.level == 0:
                libraries.add(node.module.split(".")[0])
            for dep in _resolve(path, node):
                name = str(dep.relative_to(ROOT))
                if dep.name == "__init__.py" and dep.parent != path.parent:
                    continue  # a package's map; its own modules are checked by name
                if name in IO_ADAPTERS and (str(path.relative_to(ROOT)), name) not in ALLOWED_IO_DEPENDENCIES:
                    adapters.add(name)
    return libraries & IO_MODULES, adapters


def test_the_guard_finds_the_cores() -> None:
    """Discovery works: the model cores and every known core directory are guarded."""
    for model in ("relay/derp/server.py", "protocol/noise/messages.py", "projections/fold.py"):
        assert model in CORES
    assert any(m.startswith("protocol/noise/") for m in CORES)
    assert not [m for m in CORES if m.startswith("cli/")]


@pytest.mark.parametrize("adapter", sorted(IO_ADAPTERS))
def test_each_named_adapter_exists_and_does_io(adapter: str) -> None:
    """The list of exceptions stays honest: a moved adapter, or one that no longer does
    I/O (it became a core), is taken off it."""
    path = ROOT / adapter
    if not path.is_file():
        pytest.fail(f"{adapter} is named as an I/O adapter but does not exist: update IO_ADAPTERS")
    libraries, adapters = _io_imports(path)
    assert libraries or adapters, f"{adapter} does no I/O: it is a core, take it off IO_ADAPTERS"


@pytest.mark.parametrize("module", CORES)
def test_cores_are_sans_io(module: str) -> None:
    """A core imports no I/O library, and none of our adapters."""
    libraries, adapters = _io_imports(ROOT / module)
    assert not libraries, f"{module} imports {sorted(libraries)}: a core does no I/O (or name it in IO_ADAPTERS)"
    assert not adapters, f"{module} imports {sorted(adapters)}, which do I/O"


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
