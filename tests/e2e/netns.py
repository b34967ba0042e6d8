"""Private network namespaces for end-to-end tests.

Role in the pipeline: this is the floor the end-to-end tests stand on. Every
process an e2e test starts (our control server, Caddy/tsnet nodes, tailcat) and
every socket the test itself opens lives in one private network namespace that
the test created and that disappears when the test ends. Nothing can reach the
host's network, and nothing on the host can reach the test's servers.

Design (why not a dedicated thread, `ip netns add` or `unshare` re-exec):

* The namespace is created with ``unshare(CLONE_NEWNET)`` on the *calling*
  thread, which immediately opens ``/proc/thread-self/ns/net`` (a file
  descriptor that keeps the namespace alive) and switches back with
  ``setns()``. The whole switch is synchronous, so no trio task can observe
  the thread in the wrong namespace. No mount, no name in ``/run/netns``:
  if pytest is killed, the kernel frees the namespace once its last process
  exits; nothing is left behind to clean up by name.
* Child processes enter it through ``nsenter --net=/proc/<pytest>/fd/<fd>``
  prefixed to their argv (`NetNamespace.command`). That works from any
  thread and any spawner: ``subprocess``, ``trio.run_process``, a shell.
  A dedicated "namespace thread" (option a) forces every spawn and every
  socket through one thread and breaks ``trio.run_process``, which forks from
  a worker thread. ``ip netns exec`` (option b) needs a named mount that leaks
  when pytest dies. Re-running a driver under ``unshare --net`` (option c)
  loses pytest's in-process fixtures and reporting.
* The test's own sockets are created *inside* the namespace by a short
  ``setns`` round trip on the current thread (`NetNamespace.socket`). A socket
  stays bound to the namespace it was created in, so it can then be connected,
  awaited with trio, or handed to another thread from the host namespace.
* Like `/work/shared/tools/netns-run.sh`, the namespace gets loopback plus a
  veth pair (``tl0`` 10.254.0.1 <-> ``tl1`` 10.254.0.2, both ends inside) and
  a default route: a tailscale client on a loopback-only host believes it is
  offline and never dials control.

Invariants:

* After `NetNamespace.close` no process remains in the namespace (they are
  SIGKILLed by namespace membership, which only ever contains processes this
  test started) and the namespace file descriptor is closed.
* A thread that entered the namespace through `NetNamespace.entered` is
  always switched back, or the process aborts the test loudly
  (`NamespaceError`), never silently staying inside.

Requires Linux, root (CAP_SYS_ADMIN), ``ip`` (iproute2) and ``nsenter``
(util-linux). `missing_tools` reports what is absent.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import http.client
import http.server
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import h11
import trio

__all__ = [
    "LOOPBACK",
    "NS_ADDR",
    "PEER_ADDR",
    "HttpResponse",
    "NamespaceError",
    "NetNamespace",
    "RecordedRequest",
    "StaticHttpServer",
    "missing_tools",
    "open_netns",
]

# The socket type, for annotations inside NetNamespace (whose method named
# `socket` shadows the module there).
_Socket = socket.socket

#: Address of ``tl0``, the namespace's "uplink" interface (default route).
NS_ADDR = "10.254.0.1"
#: Address of ``tl1``, the other end of the veth pair (the default gateway).
PEER_ADDR = "10.254.0.2"
#: Loopback inside the namespace (not the host's loopback!).
LOOPBACK = "127.0.0.1"

# From <sched.h>. Python 3.11 has neither os.unshare nor os.setns (3.12+).
_CLONE_NEWNET = 0x40000000

# `ip -batch` script for the interfaces; the same layout as netns-run.sh.
_SETUP_BATCH = f"""\
link set lo up
link add tl0 type veth peer name tl1
addr add {NS_ADDR}/24 dev tl0
addr add {PEER_ADDR}/24 dev tl1
link set tl0 up
link set tl1 up
route add default via {PEER_ADDR} dev tl0
"""


class NamespaceError(RuntimeError):
    """Creating, entering or leaving a network namespace failed."""


def missing_tools() -> list[str]:
    """Return what this machine lacks for private network namespaces.

    Returns:
        Human-readable reasons, empty when namespaces can be made.
    """
    missing: list[str] = []
    if not os.path.exists("/proc/thread-self/ns/net"):
        missing.append("Linux network namespaces (/proc/thread-self/ns/net)")
    if os.geteuid() != 0:
        missing.append("root (CAP_SYS_ADMIN) to unshare a network namespace")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            missing.append(f"`{tool}` on PATH")
    return missing


@functools.cache
def _libc() -> ctypes.CDLL:
    name = ctypes.util.find_library("c") or "libc.so.6"
    return ctypes.CDLL(name, use_errno=True)


def _call(func_name: str, *args: int) -> None:
    func = getattr(_libc(), func_name)
    if func(*args) != 0:
        err = ctypes.get_errno()
        raise NamespaceError(f"{func_name}{args}: {os.strerror(err)}")


def _open_current_netns() -> int:
    # thread-self, not self: namespaces are per thread, and /proc/self/ns is
    # the main thread's view.
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


@dataclass(frozen=True)
class HttpResponse:
    """A complete HTTP response read by `NetNamespace.http_request`.

    Attributes:
        status: The status code.
        headers: Header names lower-cased; repeated headers joined by ", ".
        body: The whole body.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def text(self) -> str:
        """The body decoded as UTF-8 (replacing undecodable bytes)."""
        return self.body.decode("utf-8", errors="replace")


@dataclass
class NetNamespace:
    """A private network namespace held open by a file descriptor.

    Create one with `open_netns` (or `NetNamespace.create` plus `close`).
    All methods are safe to call from any thread.

    Attributes:
        fd: The namespace file descriptor (O_CLOEXEC; never inherited).
        inode: The namespace's nsfs inode number (its identity).
        dev: The nsfs device number (pairs with `inode`).
    """

    fd: int
    inode: int
    dev: int
    _closed: bool = field(default=False, repr=False)

    # -- lifecycle -------------------------------------------------------

    @classmethod
    def create(cls, *, veth: bool = True) -> NetNamespace:
        """Create a fresh network namespace and configure its interfaces.

        The calling thread unshares, captures the new namespace and switches
        back before returning; it ends up where it started.

        Args:
            veth: Set up loopback plus the veth pair and default route (the
                normal case). False leaves only a *down* loopback device.

        Returns:
            The namespace; the caller must `close` it.

        Raises:
            NamespaceError: If unsharing, switching back or configuring the
                interfaces fails. If switching back fails, the calling thread
                is left inside the new namespace, so the error says so loudly.
        """
        home = _open_current_netns()
        try:
            _call("unshare", _CLONE_NEWNET)
            try:
                fd = _open_current_netns()
            finally:
                try:
                    _call("setns", home, _CLONE_NEWNET)
                except NamespaceError as exc:  # pragma: no cover - kernel failure
                    raise NamespaceError(
                        f"thread {threading.get_native_id()} is stuck inside a new "
                        f"network namespace: {exc}"
                    ) from exc
        finally:
            os.close(home)
        st = os.fstat(fd)
        ns = cls(fd=fd, inode=st.st_ino, dev=st.st_dev)
        if veth:
            try:
                ns.run(["ip", "-batch", "-"], input=_SETUP_BATCH)
            except BaseException:
                ns.close()
                raise
        return ns

    def close(self, *, timeout: float = 10.0) -> None:
        """Kill every process left in the namespace and release it.

        Idempotent. After this the namespace is unreachable: the kernel frees
        it once sockets that a test leaked are closed.

        Args:
            timeout: How long to wait for killed processes to disappear.

        Raises:
            NamespaceError: If processes survive SIGKILL for `timeout` seconds.
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        while pids := self.pids():
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                raise NamespaceError(f"processes {pids} survive in the test namespace")
            time.sleep(0.02)
        os.close(self.fd)
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether `close` has run."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise NamespaceError("the network namespace is closed")

    # -- processes -------------------------------------------------------

    @property
    def path(self) -> str:
        """A path that names this namespace for ``nsenter --net=``.

        It is valid for any process as long as this pytest process holds
        `fd` open (root can open another process's fd links).
        """
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """Prefix `argv` so that it runs inside the namespace.

        Use it with any spawner (``subprocess``, ``trio.run_process``).
        ``nsenter`` only joins the network namespace and then execs `argv`,
        so the pid, signals and exit status are the target's own.

        Args:
            argv: The command and its arguments.

        Returns:
            The new argv.
        """
        self._check_open()
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the namespace and capture its output.

        Args:
            argv: The command.
            input: Text for its stdin.
            check: Raise `NamespaceError` on a non-zero exit.
            timeout: Seconds before it is killed.
            env: Environment (default: inherited).

        Returns:
            The completed process with text stdout/stderr.

        Raises:
            NamespaceError: On non-zero exit when `check` is set.
            subprocess.TimeoutExpired: After `timeout`.
        """
        done = subprocess.run(
            self.command(argv),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else dict(env),
            check=False,
        )
        if check and done.returncode != 0:
            raise NamespaceError(f"{list(argv)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def pids(self) -> list[int]:
        """Return the pids of all processes inside this namespace.

        The pytest process itself is never listed, even while one of its
        threads is temporarily inside.
        """
        me = os.getpid()
        found: list[int] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:  # gone, or a kernel thread
                continue
            if st.st_ino == self.inode and st.st_dev == self.dev:
                found.append(int(entry))
        return found

    # -- sockets ---------------------------------------------------------

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Run the body with the *current thread* inside the namespace.

        Everything the thread creates meanwhile (sockets, child processes
        forked by this thread) belongs to the namespace. Do not ``await``
        inside: another trio task would run in the wrong namespace. Prefer
        `socket`, which keeps the window as small as possible.

        Raises:
            NamespaceError: If entering or leaving fails.
        """
        self._check_open()
        home = _open_current_netns()
        try:
            _call("setns", self.fd, _CLONE_NEWNET)
            try:
                yield
            finally:
                _call("setns", home, _CLONE_NEWNET)
        finally:
            os.close(home)

    def socket(
        self,
        family: socket.AddressFamily = socket.AF_INET,
        type: socket.SocketKind = socket.SOCK_STREAM,
    ) -> _Socket:
        """Create a socket that lives in the namespace.

        Args:
            family: Address family.
            type: Socket type.

        Returns:
            A new blocking socket (set a timeout, or use trio).
        """
        with self.entered():
            return socket.socket(family, type)

    def listen_socket(self, host: str = LOOPBACK, port: int = 0, backlog: int = 64) -> _Socket:
        """Create a listening TCP socket inside the namespace.

        Useful to run a server in-process (``trio.SocketListener``) or to
        capture what a client sends.

        Args:
            host: Address to bind, one of the namespace's own.
            port: Port; 0 picks a free one.
            backlog: Listen backlog.

        Returns:
            The bound, listening socket.
        """
        sock = self.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def free_ports(self, count: int, host: str = LOOPBACK) -> list[int]:
        """Return `count` distinct TCP ports that are currently free on `host`.

        All are held open until every one is chosen, so they differ. Inside a
        private namespace nothing else races for them.
        """
        with contextlib.ExitStack() as stack:
            socks = [
                stack.enter_context(contextlib.closing(self.listen_socket(host, 0)))
                for _ in range(count)
            ]
            return [int(s.getsockname()[1]) for s in socks]

    def free_port(self, host: str = LOOPBACK) -> int:
        """Return a TCP port that is currently free on `host` in the namespace."""
        return self.free_ports(1, host)[0]

    def connect(self, host: str, port: int, *, timeout: float = 10.0) -> _Socket:
        """Open a TCP connection from inside the namespace (blocking).

        Args:
            host: Target address (an address of this namespace).
            port: Target port.
            timeout: Connect and I/O timeout of the returned socket.

        Returns:
            The connected socket.
        """
        sock = self.socket()
        try:
            sock.settimeout(timeout)
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return sock

    async def open_tcp_stream(self, host: str, port: int) -> trio.SocketStream:
        """Open a trio TCP stream from inside the namespace.

        Cancellation: cancelling while connecting closes the socket.

        Args:
            host: Target address (an address of this namespace).
            port: Target port.

        Returns:
            The connected stream.
        """
        sock = trio.socket.from_stdlib_socket(self.socket())
        try:
            await sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    def port_open(self, host: str, port: int) -> bool:
        """Whether a TCP connect to ``host:port`` in the namespace succeeds now."""
        try:
            self.connect(host, port, timeout=1.0).close()
        except OSError:
            return False
        return True

    def wait_for_port(self, host: str, port: int, *, timeout: float = 30.0) -> None:
        """Block until something accepts TCP connections on ``host:port``.

        Raises:
            TimeoutError: If nothing listens within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while not self.port_open(host, port):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")
            time.sleep(0.05)

    async def wait_for_port_async(self, host: str, port: int) -> None:
        """Async `wait_for_port`: wait until ``host:port`` accepts connections.

        Waits forever; bound it with ``trio.fail_after``. Cancellable.
        """
        while True:
            try:
                stream = await self.open_tcp_stream(host, port)
            except OSError:
                await trio.sleep(0.05)
                continue
            await stream.aclose()
            return

    # -- HTTP ------------------------------------------------------------

    def http_request(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
        timeout: float = 10.0,
    ) -> HttpResponse:
        """Make one HTTP/1.1 request from inside the namespace (blocking).

        Only ``http://`` URLs with literal addresses: there is no DNS in the
        namespace, and hostnames would be resolved by the host anyway.

        Args:
            url: ``http://addr:port/path?query``.
            method: Request method.
            headers: Extra request headers.
            body: Request body.
            timeout: Connect and read timeout in seconds.

        Returns:
            The response.

        Raises:
            OSError: Connection failures and timeouts.
            ValueError: For a non-http URL.
        """
        host, port, path = _split_http_url(url)
        ns = self

        class _Conn(http.client.HTTPConnection):
            def connect(self) -> None:
                self.sock = ns.connect(host, port, timeout=timeout)

        conn = _Conn(host, port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=dict(headers or {}))
            resp = conn.getresponse()
            data = resp.read()
            merged: dict[str, str] = {}
            for name, value in resp.getheaders():
                key = name.lower()
                merged[key] = f"{merged[key]}, {value}" if key in merged else value
            return HttpResponse(status=resp.status, headers=merged, body=data)
        finally:
            conn.close()

    async def http_request_async(
        self,
        url: str,
        *,
        method: str = "GET",
        headers: Mapping[str, str] | None = None,
        body: bytes | None = None,
    ) -> HttpResponse:
        """Async `http_request` (trio + h11, ``Connection: close``).

        Waits as long as the server takes; bound it with ``trio.fail_after``.
        Cancellation closes the connection.

        Raises:
            OSError: Connection failures.
            h11.ProtocolError: A malformed response.
            ValueError: For a non-http URL.
        """
        host, port, target = _split_http_url(url)
        payload = body or b""
        request_headers = [
            ("Host", f"{host}:{port}"),
            ("Connection", "close"),
            *(headers or {}).items(),
        ]
        if payload or method in {"POST", "PUT", "PATCH"}:
            request_headers.append(("Content-Length", str(len(payload))))
        conn = h11.Connection(h11.CLIENT)
        out = _sent(conn, h11.Request(method=method, target=target, headers=request_headers))
        if payload:
            out += _sent(conn, h11.Data(data=payload))
        out += _sent(conn, h11.EndOfMessage())
        status = 0
        merged: dict[str, str] = {}
        chunks: list[bytes] = []
        async with await self.open_tcp_stream(host, port) as stream:
            await stream.send_all(out)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    for raw_name, raw_value in event.headers:
                        key, value = raw_name.decode().lower(), raw_value.decode()
                        merged[key] = f"{merged[key]}, {value}" if key in merged else value
                elif isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        return HttpResponse(status=status, headers=merged, body=b"".join(chunks))


def _split_http_url(url: str) -> tuple[str, int, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None:
        raise ValueError(f"only http://addr:port URLs are supported, not {url!r}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.hostname, parts.port or 80, target


def _sent(conn: h11.Connection, event: h11.Event) -> bytes:
    return conn.send(event) or b""


@dataclass(frozen=True)
class RecordedRequest:
    """One request received by a `StaticHttpServer`.

    Attributes:
        method: Request method.
        target: Request target as sent (path and query).
        headers: Headers in the order and case they were sent.
        body: The body (read per Content-Length).
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


class StaticHttpServer:
    """A tiny threaded HTTP/1.1 server inside a namespace, for fixtures and captures.

    It serves fixed bodies by path (query ignored), answers 404 otherwise,
    and records every request. Typical uses: serving a DERP map to tailcat,
    or standing in for a control server to see what a client sends first.

    Attributes:
        requests: Every request received, in order (appended from the
            server thread; read it after the client had time to send).
    """

    def __init__(
        self,
        ns: NetNamespace,
        routes: Mapping[str, tuple[str, bytes]],
        *,
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        """Start serving.

        Args:
            ns: The namespace to listen in.
            routes: Path -> (content type, body).
            host: Address to bind.
            port: Port; 0 picks one.
        """
        self.requests: list[RecordedRequest] = []
        self.host = host
        recorded = self.requests
        table = dict(routes)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                recorded.append(
                    RecordedRequest(self.command, self.path, tuple(self.headers.items()), body)
                )
                route = table.get(urllib.parse.urlsplit(self.path).path)
                status, ctype, payload = (
                    (200, *route) if route else (404, "text/plain", b"not found\n")
                )
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                # Clients hang up mid-request (tailcat retries DERP dials in
                # a loop); that is expected here, not worth a traceback.
                pass

        server = Server((host, port), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = ns.listen_socket(host, port)
        server.server_address = server.socket.getsockname()
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        """``http://host:port<path>`` for this server."""
        return f"http://{self.host}:{self.port}{path}"

    def close(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()

    def __enter__(self) -> StaticHttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def open_netns(*, veth: bool = True) -> Iterator[NetNamespace]:
    """Create a private network namespace for the body, then destroy it.

    Args:
        veth: See `NetNamespace.create`.

    Yields:
        The namespace. On exit every process in it is killed and it is closed.
    """
    ns = NetNamespace.create(veth=veth)
    try:
        yield ns
    finally:
        ns.close()
