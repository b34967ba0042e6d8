"""How the real tailcat client is driven, what it asks of a relay, and our relay serving it.

First against capture servers (what tailcat requests: the DERP map we serve,
then ``GET /derp`` + ``Upgrade: DERP`` over plain HTTP), then a real tunnel
through our own relay (`relay_runner`), with and without direct UDP.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.support.waits import wait_until_sync

from .harness import E2EHarness, tailcat_binary
from .netns import LOOPBACK, RecordedRequest
from .tailcat import derp_map

pytestmark = pytest.mark.e2e


def _wait_for(
    requests: list[RecordedRequest], target: str, timeout: float = 60.0
) -> RecordedRequest:
    return wait_until_sync(
        lambda: next((req for req in list(requests) if req.target == target), None),
        what=f"a {target} request", seconds=timeout, detail=lambda: str(requests),
    )


def test_server_uses_our_derp_map_and_dials_our_relay(tailcat_e2e: E2EHarness) -> None:
    relay = tailcat_e2e.serve_static({})  # answers 404: a relay that is not there yet
    dmap = derp_map(LOOPBACK, relay.port, region_id=901, region_code="e2e")
    maps = tailcat_e2e.serve_static(
        {"/derpmap.json": ("application/json", json.dumps(dmap).encode())}
    )

    server = tailcat_e2e.start_tailcat_server(derpmap_url=maps.url("/derpmap.json"), serve=["8080"])
    address = server.wait_address(timeout=60)

    fetched = _wait_for(maps.requests, "/derpmap.json")
    assert (fetched.method, fetched.header("Tailcat-Mode")) == ("GET", "server")
    assert "# Selected bootstrap relay region 901, tailledger e2e" in server.process.log_text()

    binary = tailcat_binary()
    assert binary is not None
    parsed = json.loads(tailcat_e2e.ns.run([str(binary), "parse", address]).stdout)
    assert parsed["RegionID"] == 901
    assert parsed["ServerPublic"].startswith("nodekey:")
    assert parsed["ServerDiscoPublic"].startswith("discokey:")
    assert parsed["PresharedKey"].startswith("psk:")

    derp = _wait_for(relay.requests, "/derp")
    assert derp.method == "GET"
    assert derp.header("Upgrade") == "DERP"
    assert derp.header("Connection") == "Upgrade"
    assert derp.header("Host") == f"{LOOPBACK}:{relay.port}"


def test_forward_client_fetches_map_as_client_on_first_connection(tailcat_e2e: E2EHarness) -> None:
    relay = tailcat_e2e.serve_static({})
    maps = tailcat_e2e.serve_static(
        {"/derpmap.json": ("application/json", json.dumps(derp_map(LOOPBACK, relay.port)).encode())}
    )
    server = tailcat_e2e.start_tailcat_server(derpmap_url=maps.url("/derpmap.json"))
    address = server.wait_address(timeout=60)

    forward, local_port = tailcat_e2e.start_tailcat_forward(
        address, 8080, derpmap_url=maps.url("/derpmap.json")
    )
    # The tunnel is built lazily, on the first local connection: only then
    # does the client fetch the map to resolve the region in the address.
    with tailcat_e2e.ns.connect(LOOPBACK, local_port, timeout=5):
        wait_until_sync(
            lambda: any(r.header("Tailcat-Mode") == "client" for r in maps.requests),
            what="the client to fetch the DERP map", detail=lambda: str(maps.requests),
        )
        forward.wait_for_log(
            r"derphttp\.Client\.(Send|Recv): connecting to derp-900 \(tl\)", timeout=30
        )
    assert forward.running


@pytest.mark.parametrize("derp_only", [False, True], ids=["derp-then-direct", "derp-only"])
def test_tailcat_tunnel_through_our_relay(tailcat_e2e: E2EHarness, derp_only: bool) -> None:
    # TS_DEBUG_ALWAYS_USE_DERP keeps magicsock from upgrading to a direct
    # UDP path, so every WireGuard packet crosses our relay.
    knobs = {"TS_DEBUG_ALWAYS_USE_DERP": "1"} if derp_only else None
    relay = tailcat_e2e.start_relay()
    maps = tailcat_e2e.serve_static(
        {"/derpmap.json": ("application/json", json.dumps(relay.derp_map()).encode())}
    )
    backend_port = tailcat_e2e.ns.free_port()
    backend = tailcat_e2e.serve_static(
        {"/hello": ("text/plain", b"hello through the tunnel")}, port=backend_port
    )

    server = tailcat_e2e.start_tailcat_server(
        derpmap_url=maps.url("/derpmap.json"), serve=[str(backend_port)], env_extra=knobs
    )
    address = server.wait_address(timeout=60)
    forward, local_port = tailcat_e2e.start_tailcat_forward(
        address, backend_port, derpmap_url=maps.url("/derpmap.json"), env_extra=knobs
    )

    resp = tailcat_e2e.ns.http_request(f"http://{LOOPBACK}:{local_port}/hello", timeout=30)
    assert (resp.status, resp.body) == (200, b"hello through the tunnel")
    assert [r.target for r in backend.requests] == ["/hello"]
    assert forward.running
    assert server.process.running
    log = forward.log_text()
    assert "derp-900 connected" in log
    direct = re.search(r"disco: node \S+ \S+ now using \d", log)
    if derp_only:
        assert direct is None, direct
