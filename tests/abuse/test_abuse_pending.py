"""Issue 14, security 2: unauthenticated memory exhaustion through pending
interactive registrations, tried against a real ``tailledger serve`` process.

Before the fix every register request from a fresh machine key without an auth key
kept its whole Hostinfo (up to 1 MiB) in memory, without a cap: 80 requests took the
server from 70 to 148 MB. Now the requests are capped per address and in all, only a
few trimmed fields are kept (in the log database, not in memory), and refusals are
counted in the metrics.
"""

from __future__ import annotations

import re
from pathlib import Path

import trio

from projections.tailcfg import Hostinfo, RegisterRequest, RegisterResponse
from protocol import open_control_client
from tests.cli.server_process import RunningServer, free_port, running_server
from tests.protocol.control_harness import SimNode
from tests.protocol.test_control import _http_get
from tests.support.net import wait_until_serving

#: Nearly the 1 MiB request body cap.
BIG = 900_000


def rss_kib(server: RunningServer) -> int:
    status = Path(f"/proc/{server.proc.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match is not None
    return int(match.group(1))


async def flood(port: int, machines: int, *, followup_waits: bool = False) -> list[RegisterResponse]:
    """Fresh machines asking to join with a ~1 MiB Hostinfo, one after another; with
    ``followup_waits`` each admitted one then holds a ~1 MiB follow-up open."""
    answers: list[RegisterResponse] = []
    async with trio.open_nursery() as nursery:
        for i in range(machines):
            node = SimNode.new(f"flood{i}")
            hostinfo = Hostinfo(hostname=node.hostname, os="linux", push_device_token="x" * BIG)
            async with open_control_client("127.0.0.1", port, machine_key=node.machine_private) as client:
                resp = await client.register(RegisterRequest(version=130, node_key=node.node_key, hostinfo=hostinfo))
            answers.append(resp)
            if followup_waits and resp.auth_url:
                nursery.start_soon(_hold_followup, port, node, resp.auth_url, hostinfo)
        await trio.sleep(1.0)  # let the follow-ups arrive and wait
        nursery.cancel_scope.cancel()
    return answers


async def _hold_followup(port: int, node: SimNode, url: str, hostinfo: Hostinfo) -> None:
    async with open_control_client("127.0.0.1", port, machine_key=node.machine_private) as client:
        await client.register(RegisterRequest(version=130, node_key=node.node_key, hostinfo=hostinfo, followup=url))


async def metrics(port: int) -> str:
    """``/metrics`` from ``metrics_listen_addr``."""
    status, body = await _http_get(port, "/metrics")
    assert status == 200
    return body


def test_a_flood_from_one_address_is_capped_and_holds_no_hostinfo(tmp_path: Path) -> None:
    # Hostinfo up to 1 MiB allowed (the default, 16 KiB, would refuse these requests
    # outright): the pending registrations themselves must not keep it.
    metrics_port = free_port()
    env = {
        "TAILLEDGER_LIMITS__MAX_HOSTINFO_BYTES": str(1 << 20),
        "TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}",
    }
    with running_server(tmp_path / "data", extra_env=env) as server:
        trio.run(wait_until_serving, server.port)
        trio.run(flood, server.port, 3)  # warm up allocator and caches
        before = rss_kib(server)
        answers = trio.run(lambda: flood(server.port, 60, followup_waits=True))
        grown = rss_kib(server) - before
        print(f"server RSS grew by {grown} KiB over 60 requests and 5 held follow-ups of ~1 MiB")
        admitted = [a for a in answers if a.auth_url]
        refused = [a for a in answers if not a.auth_url]
        # The 3 warm-up requests count too: 8 per address by default.
        assert len(admitted) == 5 and len(refused) == 55
        assert all("too many machines are waiting for approval from your address" in a.error for a in refused)
        # 60 requests and 5 held follow-ups of ~1 MiB each: before the fix, > 60 MB stayed.
        assert grown < 16 * 1024, f"server RSS grew by {grown} KiB"
        text = trio.run(metrics, metrics_port)
        assert 'tailledger_pending_registrations_refused_total{cap="per_source"} 55.0' in text
        assert "tailledger_pending_registrations 8.0" in text
        listed = server.cli("nodes", "pending", "-o", "json", check=True).stdout
        assert listed.count('"key"') == 8 and "xxxx" not in listed


def test_the_global_cap_holds_whatever_the_addresses(tmp_path: Path) -> None:
    metrics_port = free_port()
    env = {
        "TAILLEDGER_LIMITS__PENDING_REGISTRATIONS_MAX": "4",
        "TAILLEDGER_LIMITS__PENDING_REGISTRATIONS_PER_ADDRESS": "100",
        "TAILLEDGER_LIMITS__MAX_HOSTINFO_BYTES": str(1 << 20),
        "TAILLEDGER_METRICS_LISTEN_ADDR": f"127.0.0.1:{metrics_port}",
    }
    with running_server(tmp_path / "data", extra_env=env) as server:
        trio.run(wait_until_serving, server.port)
        answers = trio.run(flood, server.port, 10)
        assert sum(1 for a in answers if a.auth_url) == 4
        refused = [a.error for a in answers if not a.auth_url]
        assert len(refused) == 6 and all("from your address" not in e for e in refused)
        text = trio.run(metrics, metrics_port)
        assert 'tailledger_pending_registrations_refused_total{cap="global"} 6.0' in text


