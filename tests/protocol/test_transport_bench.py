"""Benchmarks of the transport: they print figures and assert only correctness.

Run with ``python -m pytest -m slow tests/protocol/test_transport_bench.py -q -s``
(``--bench-smoke``: a tenth of the work, as CI runs them).
"""

from __future__ import annotations

import time

import pytest
import trio

from protocol import generate_private_key, open_control_client
from protocol.noise.handshake import SessionKeys
from protocol.noise.transport import NoiseTransport

from .transport_harness import RunningServer, pattern, start_server

pytestmark = pytest.mark.slow


def test_bench_noise_records(capsys: pytest.CaptureFixture[str], bench_smoke: bool) -> None:
    a = NoiseTransport(SessionKeys(b"k" * 32, b"q" * 32, b"", b"", 130))
    b = NoiseTransport(SessionKeys(b"q" * 32, b"k" * 32, b"", b"", 130))
    payload = pattern(1 << 20)
    rounds = 2 if bench_smoke else 20
    start = time.perf_counter()
    for _ in range(rounds):
        assert b.receive_data(a.send(payload)) == payload
    elapsed = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nnoise seal+open: {rounds / elapsed:.1f} MiB/s (4077-byte records)")


@pytest.fixture
async def server(nursery: trio.Nursery) -> RunningServer:
    return await start_server(nursery)


async def test_bench_requests_over_one_tunnel(
    server: RunningServer, capsys: pytest.CaptureFixture[str], bench_smoke: bool
) -> None:
    total, concurrency = (200, 10) if bench_smoke else (2000, 50)
    done = 0
    async with open_control_client("127.0.0.1", server.port, machine_key=b"\x11" * 32) as client:

        async def worker() -> None:
            nonlocal done
            while done < total:
                done += 1
                response = await client.request("POST", "/echo", body=b"{}")
                assert response.status == 200

        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(concurrency):
                nursery.start_soon(worker)
        elapsed = trio.current_time() - start
    with capsys.disabled():
        print(f"\nrequests over one tunnel: {done / elapsed:.0f} req/s ({concurrency} concurrent)")


async def test_bench_connect_and_register(
    server: RunningServer, capsys: pytest.CaptureFixture[str], bench_smoke: bool
) -> None:
    count = 10 if bench_smoke else 100
    start = trio.current_time()
    for _ in range(count):
        async with open_control_client(
            "127.0.0.1",
            server.port,
            machine_key=generate_private_key(),
            server_public=server.server_public,
        ) as client:
            assert (await client.request("POST", "/echo")).status == 200
    elapsed = trio.current_time() - start
    with capsys.disabled():
        print(f"\nupgrade+handshake+request+close: {count / elapsed:.0f} connections/s")
