"""End to end: two ``tailledger serve`` replicas on one PostgreSQL log, a real client
(Caddy/tsnet) on each: they see each other and talk, and a tag set through replica A
reaches the client of replica B; a replica killed with -9, its client moves to the other;
PostgreSQL killed with -9 under connected clients: the replica says so and refuses
changes, the clients keep their maps and traffic, and nothing acknowledged is lost."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.pgserver import PgServer

from .caddy import CaddyNodeSpec
from .harness import E2EHarness, TailledgerServer
from .netns import LOOPBACK, NetNamespace
from .test_relay_e2e import relay_metrics

pytestmark = pytest.mark.e2e


def _replica_env(pg_dsn: str, tmp_path: Path) -> dict[str, str]:
    """What every replica of one deployment shares: the database and one signing key."""
    return {
        "TAILLEDGER_DATABASE__TYPE": "postgres",
        "TAILLEDGER_DATABASE__DSN": pg_dsn,
        "TAILLEDGER_AUDIT__SIGNING_KEY_FILE": str(tmp_path / "signing.key"),
    }


def test_a_client_on_each_replica_one_tailnet(caddy_e2e: E2EHarness, pg_dsn: str, tmp_path: Path) -> None:
    shared = _replica_env(pg_dsn, tmp_path)
    replica_a = caddy_e2e.start_control_server(name="replica-a", env_extra=shared)
    replica_b = caddy_e2e.start_control_server(name="replica-b", env_extra=shared)
    policy = tmp_path / "policy.hujson"
    policy.write_text(
        '{"tagOwners": {"tag:web": ["autogroup:admin"]}, '
        '"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    caddy_e2e.run_tailledger(["policy", "set", str(policy)], env=replica_a.env)
    key = caddy_e2e.preauth_key(replica_a)  # made on A, used on B too: one log
    a = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodea", control_url=replica_a.control_url, auth_key=key))
    b = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodeb", control_url=replica_b.control_url, auth_key=key))
    a.wait_running(timeout=90)
    b.wait_running(timeout=90)
    view_a = a.wait_for_peers({"nodeb"}, timeout=90)
    view_b = b.wait_for_peers({"nodea"}, timeout=90)
    assert view_a.peer("nodeb")["Key"] == (view_b.self_node or {})["Key"]

    resp = a.fetch(f"{view_a.ipv4('nodeb')}:80", timeout=60)
    assert (resp.status, resp.text) == (200, "hello from nodeb")

    caddy_e2e.run_tailledger(["nodes", "tag", "nodeb", "--tags", "tag:web"], env=replica_a.env)
    deadline = time.monotonic() + 60  # a guard against hanging, not a timing assertion
    while "tag:web" not in ((b.view().self_node or {}).get("Tags") or []):
        assert time.monotonic() < deadline, "the tag set through replica A never reached the client of B"
        time.sleep(0.2)


def test_clients_of_two_replicas_talk_through_the_meshed_relays(
    caddy_e2e: E2EHarness, pg_dsn: str, tmp_path: Path
) -> None:
    shared = _replica_env(pg_dsn, tmp_path)
    replica_a = caddy_e2e.start_control_server(name="replica-a", env_extra=shared)
    replica_b = caddy_e2e.start_control_server(name="replica-b", env_extra=shared)
    key = caddy_e2e.preauth_key(replica_a)
    # Relayed traffic only: each client homes on its own replica's relay (listed first
    # in the map that replica serves), so every packet between them crosses the mesh.
    derp_only = {"TS_DEBUG_ALWAYS_USE_DERP": "1"}
    a = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodea", control_url=replica_a.control_url, auth_key=key), env_extra=derp_only
    )
    b = caddy_e2e.start_caddy_node(
        CaddyNodeSpec("nodeb", control_url=replica_b.control_url, auth_key=key), env_extra=derp_only
    )
    view_a = a.wait_for_peers({"nodeb"}, timeout=90)
    b.wait_for_peers({"nodea"}, timeout=90)
    deadline = time.monotonic() + 60  # a guard against hanging, not a timing assertion
    while len(((a.view().derp_map or {}).get("Regions") or {}).get("999", {}).get("Nodes") or []) < 2:
        assert time.monotonic() < deadline, "the map never listed both replicas' relays"
        time.sleep(0.2)

    resp = a.fetch(f"{view_a.ipv4('nodeb')}:80", timeout=90)
    assert (resp.status, resp.text) == (200, "hello from nodeb")
    forwarded = [relay_metrics(caddy_e2e, r)["packets_forwarded_out"] for r in (replica_a, replica_b)]
    assert all(n > 0 for n in forwarded), forwarded  # each relay forwarded to the other


class _SwitchingProxy:
    """A TCP proxy inside the namespace whose backend can be switched: the one control
    URL of a deployment behind a load balancer."""

    def __init__(self, ns: NetNamespace, backend: int) -> None:
        self._ns = ns
        self.backend = backend
        self._listener = ns.listen_socket()
        self.port: int = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        # Guards _open and _closed: the accept thread may take a connection while
        # close() runs, and a socket it kept after close() would never be closed.
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def switch(self, backend: int) -> None:
        """Send new connections to ``backend`` and cut the current ones."""
        self.backend = backend
        with self._lock:
            current = list(self._open)
        for s in current:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = self._ns.connect(LOOPBACK, self.backend)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                for s in (client, upstream):
                    s.settimeout(None)  # map polls stay open for minutes
                    self._open.append(s)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._acceptor.join(timeout=5)
        self._listener.close()
        self.switch(self.backend)
        with self._lock:
            for s in self._open:
                s.close()
            self._open.clear()


def test_a_replica_killed_its_client_moves_to_another_and_keeps_its_node(
    caddy_e2e: E2EHarness, pg_dsn: str, tmp_path: Path
) -> None:
    shared = _replica_env(pg_dsn, tmp_path)
    replica_a = caddy_e2e.start_control_server(name="replica-a", env_extra=shared)
    # One Noise key for the deployment (docs/replicas.md): copy A's to B before B starts.
    b_data = Path(replica_a.env["TAILLEDGER_DATA"]).parent / "replica-b-data"
    b_data.mkdir(mode=0o700)
    shutil.copy2(Path(replica_a.env["TAILLEDGER_DATA"]) / "noise_private.key", b_data / "noise_private.key")
    replica_b = caddy_e2e.start_control_server(name="replica-b", env_extra=shared)
    proxy = _SwitchingProxy(caddy_e2e.ns, replica_a.port)
    try:
        key = caddy_e2e.preauth_key(replica_a)
        mover = caddy_e2e.start_caddy_node(CaddyNodeSpec("mover", control_url=proxy.url, auth_key=key))
        stayer = caddy_e2e.start_caddy_node(CaddyNodeSpec("stayer", control_url=replica_b.control_url, auth_key=key))
        mover.wait_running(timeout=90)
        before = mover.wait_for_peers({"stayer"}, timeout=90)
        stayer.wait_for_peers({"mover"}, timeout=90)
        assert mover.fetch(f"{before.ipv4('stayer')}:80", timeout=60).text == "hello from stayer"

        maps_before = len(mover.map_responses())
        replica_a.process.signal(signal.SIGKILL)
        replica_a.process.wait_exit(timeout=30)
        proxy.switch(replica_b.port)  # the load balancer notices A is gone

        deadline = time.monotonic() + 120  # a guard against hanging, not a timing assertion
        while True:
            assert time.monotonic() < deadline, "the client never got through to replica B\n" + mover.messages()[-3000:]
            reconnected = len(mover.map_responses()) > maps_before  # a map from replica B
            try:
                if reconnected and mover.fetch(f"{before.ipv4('stayer')}:80", timeout=10).text == "hello from stayer":
                    break
            except Exception:  # still reconnecting (timeouts, refused connections)
                pass
            time.sleep(0.5)
        after = mover.view()
        assert after.ipv4() == before.ipv4()  # the same node: same address, same key
        assert (after.self_node or {})["Key"] == (before.self_node or {})["Key"]
        listed = json.loads(caddy_e2e.run_tailledger(["nodes", "list", "-o", "json"], env=replica_b.env).stdout)
        assert sorted(n["name"] for n in listed) == ["mover", "stayer"]  # no second node
    finally:
        proxy.close()


def _health(e2e: E2EHarness, server: TailledgerServer) -> tuple[int, dict[str, object]]:
    """``GET /health`` of a replica: (status, body); (0, {}) while it does not answer."""
    try:
        resp = e2e.ns.http_request(f"http://{LOOPBACK}:{server.port}/health", timeout=10)
        body = json.loads(resp.body) if resp.body else {}
    except (OSError, ValueError):
        return 0, {}
    return resp.status, body if isinstance(body, dict) else {}


def _tags(e2e: E2EHarness, server: TailledgerServer) -> dict[str, list[str]]:
    listed = json.loads(e2e.run_tailledger(["nodes", "list", "-o", "json"], env=server.env).stdout)
    return {n["name"]: sorted(n.get("tags") or []) for n in listed}


def _until(check: Callable[[], bool], what: str, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds  # a guard against hanging, not a timing assertion
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def test_postgres_killed_under_connected_clients_loses_no_acknowledged_change(
    caddy_e2e: E2EHarness, pg_server: PgServer, pg_dsn: str, tmp_path: Path
) -> None:
    shared = _replica_env(pg_dsn, tmp_path)
    replica = caddy_e2e.start_control_server(name="replica-a", env_extra=shared)
    policy = tmp_path / "policy.hujson"
    policy.write_text(
        '{"tagOwners": {"tag:web": ["autogroup:admin"], "tag:db": ["autogroup:admin"]}, '
        '"acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]}'
    )
    caddy_e2e.run_tailledger(["policy", "set", str(policy)], env=replica.env)
    key = caddy_e2e.preauth_key(replica)
    a = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodea", control_url=replica.control_url, auth_key=key))
    b = caddy_e2e.start_caddy_node(CaddyNodeSpec("nodeb", control_url=replica.control_url, auth_key=key))
    view_a = a.wait_for_peers({"nodeb"}, timeout=90)
    b.wait_for_peers({"nodea"}, timeout=90)
    caddy_e2e.run_tailledger(["nodes", "tag", "nodeb", "--tags", "tag:web"], env=replica.env)  # acknowledged
    _until(lambda: "tag:web" in ((b.view().self_node or {}).get("Tags") or []), "the tag never reached nodeb")
    head = _health(caddy_e2e, replica)[1]["log_seq"]
    assert isinstance(head, int)

    pg_server.kill()
    try:
        _until(lambda: _health(caddy_e2e, replica)[0] == 503
               and _health(caddy_e2e, replica)[1].get("status") == "database-unavailable",
               "the replica never reported the database unavailable")
        refused = caddy_e2e.run_tailledger(["nodes", "tag", "nodea", "--tags", "tag:db"], env=replica.env,
                                           check=False)
        assert refused.returncode != 0  # not acknowledged
        # A clear error: the database, and that nothing was changed.
        assert re.search(r"the database is unavailable|cannot connect to the database", refused.stderr), refused
        assert "nothing was changed" in refused.stderr, refused
        # The clients keep their maps, and their traffic needs no control server.
        assert "nodeb" in a.view().peer_names()
        assert a.fetch(f"{view_a.ipv4('nodeb')}:80", timeout=60).text == "hello from nodeb"
    finally:
        pg_server.start()

    _until(lambda: _health(caddy_e2e, replica)[0] == 200, "the replica never recovered")
    assert replica.process.running
    after = _health(caddy_e2e, replica)[1].get("log_seq")
    assert isinstance(after, int) and after >= head  # nothing acknowledged is lost
    assert _tags(caddy_e2e, replica) == {"nodea": [], "nodeb": ["tag:web"]}  # the refused change is not there
    assert caddy_e2e.run_tailledger(["log", "verify"], env=replica.env, check=False).returncode == 0
    # The clients get their maps afterwards: a change made now reaches nodea.
    caddy_e2e.run_tailledger(["nodes", "tag", "nodea", "--tags", "tag:db"], env=replica.env)
    _until(lambda: "tag:db" in ((a.view().self_node or {}).get("Tags") or []),
           "a change after the recovery never reached nodea\n" + a.messages()[-3000:])
    assert b.fetch(f"{view_a.ipv4()}:80", timeout=60).text == "hello from nodea"
