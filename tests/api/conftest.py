"""A real ``tailledger serve`` with TLS on its control port, and credentials for it."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from projections.tailcfg import RegisterResponse
from protocol import RemoteProtocolError, open_control_client
from relay.certs import generate_self_signed
from tests.cli.server_process import RunningServer, running_server
from tests.protocol.control_harness import SimNode
from tests.support.ledger import log_head, recorded
from tests.support.waits import wait_until

#: The fixed host of Tailscale's API, which the test certificate names too.
TAILSCALE_API_HOST = "api.tailscale.com"


@dataclass
class ApiServer:
    srv: RunningServer
    cert: Path
    admin_key: str
    member_key: str  # bob's, a member
    #: Every response the test clients saw: (method, path, status, content type, body).
    seen: list[tuple[str, str, int, str, bytes]] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.srv.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}

        def record(response: httpx.Response) -> None:
            response.read()
            self.seen.append((
                response.request.method, response.request.url.path, response.status_code,
                response.headers.get("content-type", ""), response.content,
            ))

        return httpx.Client(
            base_url=self.base, verify=self.ssl_context(), headers=headers, timeout=30,
            event_hooks={"response": [record]},
        )

    def register(self, hostname: str, auth_key: str | None = None) -> tuple[SimNode, RegisterResponse]:
        """A machine registers over the real control protocol (over TLS)."""
        node = SimNode.new(hostname)

        async def attempt() -> RegisterResponse | None:
            try:
                async with open_control_client(
                    "127.0.0.1", self.srv.port, machine_key=node.machine_private,
                    ssl_context=self.ssl_context(), server_hostname="localhost",
                ) as client:
                    return await client.register(node.register_request(auth_key))
            except (OSError, RemoteProtocolError):
                return None  # not serving yet

        async def go() -> RegisterResponse:
            return await wait_until(attempt, what=f"{hostname} to register", seconds=30)

        return node, trio.run(go)

    def head(self) -> int:
        return log_head(self.srv.data)

    def metrics(self) -> str:
        """The server's ``/metrics`` page (on the metrics address it logged)."""
        for line in self.srv.log_text().splitlines():
            if "metrics" in line and "127.0.0.1:" in line:
                digits = "".join(ch for ch in line.rsplit("127.0.0.1:", 1)[1] if ch.isdigit())
                if digits:
                    return httpx.get(f"http://127.0.0.1:{digits}/metrics", timeout=10).text
        raise AssertionError("the server did not log its metrics address:\n" + self.srv.log_text())

    def events(self, after: int) -> list[tuple[str, str]]:
        """(type, actor) of the events after ``after``."""
        return [(r.type, str(r.actor)) for r in recorded(self.srv.data, after)]


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


def check_against_openapi(api: ApiServer, operations: list[tuple[str, str, Any]]) -> int:
    """Every operation is in the server's OpenAPI document, and every JSON response the
    test clients received validates against the schema the document gives for its
    route and status. Returns how many responses were checked."""
    from jsonschema import Draft202012Validator

    with api.client() as http:
        doc = http.get("/api/v1/openapi.json").json()
        page = http.get("/api/v1/docs")
    assert page.status_code == 200 and "/api/v1/node/{nodeId}" in page.text
    templated = [(method.upper(), path) for path, ops in doc["paths"].items() for method in ops]
    for method, path, _ in operations:
        assert any(m == method and _matches(t, path) for m, t in templated), (method, path)
    checked = 0
    for method, path, status, ctype, body in api.seen:
        template = next((t for m, t in templated if m == method and _matches(t, path)), None)
        if template is None:
            continue
        responses = doc["paths"][template][method.lower()]["responses"]
        spec = responses.get(str(status)) or responses["default"]
        content = spec.get("content", {})
        media = ctype.split(";")[0]
        if media not in content or not media.endswith("json"):
            assert media not in ("application/json", "application/problem+json") or not content, (
                method, path, status, ctype,
            )
            continue
        schema = {**content[media]["schema"], "components": doc["components"]}
        errors = list(Draft202012Validator(schema).iter_errors(json.loads(body)))
        assert not errors, (method, path, status, errors[0].message)
        checked += 1
    return checked


def _matches(template: str, path: str) -> bool:
    path = path.split("?", 1)[0]
    t, p = template.strip("/").split("/"), path.strip("/").split("/")
    return len(t) == len(p) and all(a == b or a.startswith("{") for a, b in zip(t, p, strict=True))
