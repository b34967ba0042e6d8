"""Drive real tailcat processes through our relay; run *inside* a private network namespace.

Run by ``test_tailcat_e2e.py`` as
``unshare --net ... python tailcat_driver.py <tailcat> [tls|no-meta-cert|plain-http]``;
never run it in the host namespace (tailcat would try the public DERP map).

What it does, all on the namespace's veth address 10.254.0.1:

1. starts our relay with a self-signed certificate (TLS, pinned via CertName)
   and its STUN server; with ``no-meta-cert`` the relay presents no meta
   certificate, so clients must use the HTTP 101 upgrade instead of fast start;
   with ``plain-http`` it serves DERP without TLS and the clients are told to
   dial ``http://`` (``TS_DEBUG_USE_DERP_HTTP=1``), as behind a TLS proxy;
2. serves a DERP map holding only that relay (our ``merge_derp_maps`` output)
   over plain HTTP;
3. starts ``tailcat serve --full-address`` (one connection, to stdout) using
   that map, and reads its address from ``TAILCAT_ADDR_FILE``;
4. runs ``tailcat ping`` against the address, then pipes a line through
   ``tailcat <addr>`` to the server; the clients get no DERP map URL at all,
   the full address carries the relay's host, port and CertName;
5. prints one JSON document with everything the test asserts on.

``TS_DEBUG_ALWAYS_USE_DERP=true`` keeps magicsock from upgrading to a direct
UDP path (both processes share the namespace, so a direct path would always
win), which is what makes this a DERP test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from projections.derpmap import merge_derp_maps
from projections.tailcfg import encode
from relay import AllowAll, RelayConfig, serve_relay
from tests.support.waits import wait_until

HOST = "10.254.0.1"


async def _serve_map(body: bytes, stream: trio.SocketStream) -> None:
    request = b""
    while b"\r\n\r\n" not in request:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        request += chunk
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    await stream.send_all(head % len(body) + b"Connection: close\r\n\r\n" + body)
    await stream.aclose()


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


async def main(tailcat: str, mode: str) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="tailcat-e2e-"))
    result: dict[str, object] = {}
    async with trio.open_nursery() as nursery:
        config = RelayConfig(
            data_dir=str(work / "relay"),
            listen_host=HOST,
            listen_port=0,
            hostnames=(HOST,),
            stun_host=HOST,
            stun_port=0,
            meta_cert=mode != "no-meta-cert",
            tls="off" if mode == "plain-http" else "self-signed",
        )
        relay = await nursery.start(serve_relay, config, AllowAll())
        derp_map = merge_derp_maps([], embedded=relay.derp_region(host_name=HOST, ipv4=HOST))
        body = encode(derp_map)
        result["derp_map"] = json.loads(body)
        listeners = await nursery.start(
            partial(trio.serve_tcp, partial(_serve_map, body), 0, host=HOST)
        )
        map_url = f"http://{HOST}:{listeners[0].socket.getsockname()[1]}/derpmap.json"
        env = {
            **os.environ,
            "HOME": str(work),
            "XDG_CONFIG_HOME": str(work / "config"),
            "XDG_CACHE_HOME": str(work / "cache"),
            "TS_NO_LOGS_NO_SUPPORT": "true",
            "TS_DEBUG_ALWAYS_USE_DERP": "true",
        }
        if mode == "plain-http":  # the relay sits behind a TLS proxy, in theory
            env["TS_DEBUG_USE_DERP_HTTP"] = "1"
        server_env = {**env, "TAILCAT_ADDR_FILE": str(work / "addr")}
        server = await trio.lowlevel.open_process(
            [tailcat, "--derpmap-url", map_url, "serve", "--full-address", "--key=new"],
            env=server_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:

            def address() -> str:
                path = work / "addr"
                return path.read_text().strip() if path.exists() else ""

            try:
                addr = await wait_until(address, what="tailcat's address", seconds=30)
            except AssertionError:
                addr = ""  # reported in the result: the caller judges
            result["address"] = addr
            if addr:
                ping = await trio.run_process(
                    [tailcat, "ping", "--timeout=20s", addr],
                    env=env,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                result["ping_rc"] = ping.returncode
                result["ping_stdout"] = ping.stdout.decode(errors="replace")
                result["ping_stderr"] = ping.stderr.decode(errors="replace")[-3000:]
                pipe = await trio.run_process(
                    [tailcat, addr],
                    env=env,
                    stdin=b"hello through our relay\n",
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )
                result["pipe_rc"] = pipe.returncode
                result["pipe_stderr"] = pipe.stderr.decode(errors="replace")[-3000:]
                # With no ports given, the server accepts one connection, copies
                # it to stdout and exits.
                with trio.move_on_after(15):
                    await server.wait()
        finally:
            if server.returncode is None:
                server.kill()
            await server.wait()
        assert server.stdout is not None
        assert server.stderr is not None
        result["server_stdout"] = (await _read_all(server.stdout)).decode(errors="replace")
        result["server_stderr"] = (await _read_all(server.stderr)).decode(errors="replace")[-3000:]
        stats = relay.stats()
        result["relay_stats"] = {
            "accepts": stats.accepts,
            "packets_received": stats.packets_received,
            "packets_sent": stats.packets_sent,
            "drops": stats.drops,
        }
        http = relay.http_stats()
        result["http_stats"] = {
            "connections": http.connections,
            "derp_upgrades": http.derp_upgrades,
            "derp_fast_start": http.derp_fast_start,
            "websocket_upgrades": http.websocket_upgrades,
            "tls_failures": http.tls_failures,
            "tls_abandoned": http.tls_abandoned,
        }
        assert relay.stun is not None
        result["stun_requests"] = relay.stun.stats().requests
        io = relay.io_stats()
        result["io_stats"] = {"direct_writes": io.direct_writes, "task_writes": io.task_writes}
        nursery.cancel_scope.cancel()
    return result


if __name__ == "__main__":
    print(json.dumps(trio.run(main, sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "tls")))
