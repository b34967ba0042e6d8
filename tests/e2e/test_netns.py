"""The private network namespace really is private, usable and torn down.

These tests pin the guarantees every other e2e test relies on: lo + veth +
default route exist, processes inside see only the namespace's interfaces,
servers inside are reachable from the test's own checks (sync and trio) and
not from the host, and nothing survives teardown.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from .harness import E2EHarness, require
from .netns import LOOPBACK, NS_ADDR, PEER_ADDR, NetNamespace, open_netns
from .processes import LogWaitTimeout, ProcessExitedError

pytestmark = pytest.mark.e2e


def _netns_inode_of(path: str) -> int:
    return os.stat(path).st_ino


def _processes_in(inode: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                    found.append(int(entry))
    return found


def test_namespace_has_loopback_veth_and_default_route(netns: NetNamespace) -> None:
    addrs = json.loads(netns.run(["ip", "-json", "addr", "show"]).stdout)
    by_name = {link["ifname"]: link for link in addrs}
    assert set(by_name) == {"lo", "tl0", "tl1"}
    for name, expected in {"lo": "127.0.0.1", "tl0": NS_ADDR, "tl1": PEER_ADDR}.items():
        link = by_name[name]
        assert "UP" in link["flags"], name
        assert expected in {a["local"] for a in link["addr_info"] if a["family"] == "inet"}, name

    routes = json.loads(netns.run(["ip", "-json", "route", "show", "default"]).stdout)
    assert [(r["dst"], r["gateway"], r["dev"]) for r in routes] == [("default", PEER_ADDR, "tl0")]


def test_process_inside_sees_only_namespace_interfaces(netns: NetNamespace) -> None:
    host_links = {
        link["ifname"]
        for link in json.loads(
            subprocess.run(
                ["ip", "-json", "link", "show"], capture_output=True, text=True, check=True
            ).stdout
        )
    }
    inside_links = {
        link["ifname"] for link in json.loads(netns.run(["ip", "-json", "link", "show"]).stdout)
    }
    assert inside_links == {"lo", "tl0", "tl1"}
    assert not (host_links - {"lo"}) & inside_links

    # The child's own namespace is ours, not the host's.
    inside = netns.run(["readlink", "/proc/self/ns/net"]).stdout.strip()
    assert inside == f"net:[{netns.inode}]"
    assert netns.inode != _netns_inode_of("/proc/self/ns/net")


def test_entered_switches_only_for_the_body(netns: NetNamespace) -> None:
    home = _netns_inode_of("/proc/thread-self/ns/net")
    with netns.entered():
        assert _netns_inode_of("/proc/thread-self/ns/net") == netns.inode
    assert _netns_inode_of("/proc/thread-self/ns/net") == home

    with pytest.raises(ZeroDivisionError), netns.entered():
        1 / 0  # noqa: B018 - the error is the point
    assert _netns_inode_of("/proc/thread-self/ns/net") == home


def test_server_inside_reachable_from_checks_inside_only(
    netns: NetNamespace, tmp_path: Path
) -> None:
    (tmp_path / "probe.txt").write_text("served from inside the namespace\n")
    # Hold a port on the *host* loopback without listening: connecting there
    # is refused, whatever else runs on this machine.
    with socket.socket() as host_sock:
        host_sock.bind((LOOPBACK, 0))
        port = host_sock.getsockname()[1]
        server = subprocess.Popen(
            netns.command(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    "--bind",
                    LOOPBACK,
                    "--directory",
                    str(tmp_path),
                    str(port),
                ]
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            netns.wait_for_port(LOOPBACK, port, timeout=20)
            resp = netns.http_request(f"http://{LOOPBACK}:{port}/probe.txt")
            assert (resp.status, resp.text) == (200, "served from inside the namespace\n")
            with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
                probe.connect((LOOPBACK, port))  # the host's loopback, not the namespace's
        finally:
            server.kill()
            server.wait()


async def test_trio_server_and_client_inside(netns: NetNamespace) -> None:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(netns.listen_socket(NS_ADDR, 0)))
    port = listener.socket.getsockname()[1]

    async def echo_once(stream: trio.SocketStream) -> None:
        async with stream:
            data = await stream.receive_some(100)
            await stream.send_all(data.upper())

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, echo_once, [listener])
        with trio.fail_after(10):
            async with await netns.open_tcp_stream(NS_ADDR, port) as client:
                await client.send_all(b"over the veth address")
                assert await client.receive_some(100) == b"OVER THE VETH ADDRESS"
            await netns.wait_for_port_async(NS_ADDR, port)
        nursery.cancel_scope.cancel()


async def test_async_http_request_inside(e2e: E2EHarness) -> None:
    server = e2e.serve_static({"/hello": ("text/plain", b"hi there")})
    with trio.fail_after(10):
        resp = await e2e.ns.http_request_async(server.url("/hello?x=1"), headers={"X-Probe": "1"})
        missing = await e2e.ns.http_request_async(server.url("/nope"))
    assert (resp.status, resp.body, resp.headers["content-type"]) == (
        200,
        b"hi there",
        "text/plain",
    )
    assert missing.status == 404
    assert [(r.method, r.target, r.header("x-probe")) for r in server.requests] == [
        ("GET", "/hello?x=1", "1"),
        ("GET", "/nope", None),
    ]


def test_teardown_kills_everything_and_releases_namespace() -> None:
    require()
    with open_netns() as ns:
        inode = ns.inode
        # A process group leader and a grandchild in a separate session:
        # teardown must find both by namespace membership alone.
        sh = subprocess.Popen(ns.command(["sh", "-c", "setsid sleep 600 & exec sleep 600"]))
        deadline = time.monotonic() + 10
        while len(ns.pids()) < 2:
            assert time.monotonic() < deadline, "processes never appeared in the namespace"
            time.sleep(0.02)
        inside = ns.pids()
    assert ns.closed
    assert sh.wait(5) == -9
    assert len(inside) == 2
    for pid in inside:  # gone, or a zombie waiting for its (new) parent to reap it
        with contextlib.suppress(FileNotFoundError):
            assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in {"Z", "X"}
    assert _processes_in(inode) == []
    held = {
        os.readlink(f"/proc/self/fd/{fd}")
        for fd in os.listdir("/proc/self/fd")
        if os.path.exists(f"/proc/self/fd/{fd}")
    }
    assert f"net:[{inode}]" not in held
    with pytest.raises(Exception, match="closed"):
        ns.command(["true"])


def test_managed_process_logs_waits_and_stops(e2e: E2EHarness) -> None:
    proc = e2e.start_process(
        "talker", ["sh", "-c", "echo starting; sleep 0.3; echo ready on 42 >&2; exec sleep 600"]
    )
    match = proc.wait_for_log(r"ready on (\d+)", timeout=10)
    assert match[1] == "42"
    assert proc.log_path == e2e.log_dir / "talker.log"
    assert proc.log_text().splitlines() == ["starting", "ready on 42"]
    # `since` skips what was already seen.
    with pytest.raises(LogWaitTimeout, match="ready on"):
        proc.wait_for_log("ready on", timeout=0.3, since=proc.log_position())
    assert proc.stop() == -15


def test_managed_process_exit_is_reported_fast(e2e: E2EHarness) -> None:
    proc = e2e.start_process("quitter", ["sh", "-c", "echo bye; exit 3"])
    started = time.monotonic()
    with pytest.raises(ProcessExitedError, match="bye"):
        proc.wait_for_log("never printed", timeout=30)
    assert time.monotonic() - started < 10
    assert proc.returncode == 3


def test_stop_escalates_to_sigkill(e2e: E2EHarness) -> None:
    proc = e2e.start_process(
        "stubborn", ["sh", "-c", "trap '' TERM; echo armed; while :; do sleep 1; done"]
    )
    proc.wait_for_log("armed", timeout=10)
    assert proc.stop(timeout=0.5) == -9


def test_wait_listening_fails_fast_when_server_dies(e2e: E2EHarness) -> None:
    proc = e2e.start_process("crasher", ["sh", "-c", "echo 'no such subcommand' >&2; exit 2"])
    with pytest.raises(ProcessExitedError, match="no such subcommand"):
        e2e.wait_listening(proc, e2e.ns.free_port(), timeout=30)


def test_require_fails_under_ci_and_skips_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import harness

    monkeypatch.setattr(harness, "missing_requirements", lambda **_: ["a unicorn"])
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match=r"a unicorn.*must not skip"):
        harness.require()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="a unicorn"):
        harness.require()


def test_failed_test_report_carries_process_logs(tmp_path: Path) -> None:
    require()
    (tmp_path / "test_inner.py").write_text(
        "def test_fails(e2e):\n"
        "    p = e2e.start_process('chatty', ['sh', '-c', 'echo marker-7f3a; exec sleep 600'])\n"
        "    p.wait_for_log('marker-7f3a', timeout=10)\n"
        "    assert False, 'deliberate'\n"
    )
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.e2e.conftest",
            "-p",
            "no:cacheprovider",
            "-q",
            str(tmp_path),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "e2e process logs (call)" in done.stdout
    assert "===== chatty" in done.stdout
    assert "marker-7f3a" in done.stdout.split("e2e process logs (call)", 1)[1]


def test_children_die_with_a_killed_pytest(tmp_path: Path) -> None:
    """The orphan guard: a SIGKILLed test process leaves no servers behind."""
    require()
    repo = Path(__file__).resolve().parents[2]
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from tests.e2e.netns import NetNamespace\n"
        "from tests.e2e.processes import start_process\n"
        "ns = NetNamespace.create()\n"
        f"p = start_process(ns, 'sleeper', ['sleep', '600'], log_dir=Path({str(tmp_path)!r}))\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(repo)},
        stdout=subprocess.PIPE,
        text=True,
    ) as driver:
        try:
            assert driver.stdout is not None
            child = int(driver.stdout.readline())
            assert Path(f"/proc/{child}").exists()
            # The death signal is armed by setpriv before it execs the rest; a
            # parent killed before that moment (a race only a test this quick can
            # hit) leaves no one to signal. Wait until the guarded program runs.
            comm = Path(f"/proc/{child}/comm")
            give_up = time.monotonic() + 10
            while comm.exists() and comm.read_text().strip() != "sleep" and time.monotonic() < give_up:
                time.sleep(0.005)
        finally:
            driver.kill()
    # Generous: the kernel delivers PDEATHSIG at once, but a loaded CI machine may
    # take a while to schedule the dying child.
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child}").exists():
        stat = (
            Path(f"/proc/{child}/stat").read_text() if Path(f"/proc/{child}/stat").exists() else ""
        )
        if stat and stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}:
            break  # dead, waiting to be reaped by init
        assert time.monotonic() < deadline, f"child {child} survived its killed parent"
        time.sleep(0.02)
