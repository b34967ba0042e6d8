"""A real ``tailledger serve`` with TLS on its control port, and credentials for it."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from eventlog import SQLiteEventStore
from relay.certs import generate_self_signed
from tests.cli.server_process import RunningServer, running_server

#: The fixed host of Tailscale's API, which the test certificate names too.
TAILSCALE_API_HOST = "api.tailscale.com"


@dataclass
class ApiServer:
    srv: RunningServer
    cert: Path
    admin_key: str
    member_key: str  # bob's, a member

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.srv.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base, verify=self.ssl_context(), headers=headers, timeout=30)

    def head(self) -> int:
        store = SQLiteEventStore(self.srv.data / "ledger.db", read_only=True)
        try:
            return store.head().seq
        finally:
            store.close()

    def events(self, after: int) -> list[tuple[str, str]]:
        """(type, actor) of the events after ``after``."""
        store = SQLiteEventStore(self.srv.data / "ledger.db", read_only=True)
        try:
            return [(r.type, str(r.actor)) for r in store.read(after)]
        finally:
            store.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    root = tmp_path_factory.mktemp("api")
    cert_pem, key_pem = generate_self_signed([TAILSCALE_API_HOST])
    cert, key = root / "cert.pem", root / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    env = {"TAILLEDGER_TLS__CERT_FILE": str(cert), "TAILLEDGER_TLS__KEY_FILE": str(key)}
    with running_server(root / "data", extra_env=env) as srv:
        srv.cli("users", "create", "alice", check=True)  # the owner
        srv.cli("users", "create", "bob", check=True)  # a member
        admin_key = srv.cli("apikeys", "create", check=True).stdout.strip()
        member_key = srv.cli("apikeys", "create", "--user", "bob", "--role", "member", check=True).stdout.strip()
        yield ApiServer(srv, cert, admin_key, member_key)
