"""The DERP relay core: login, client registry, routing, bounded queues, mesh (sans-I/O).

Role in the pipeline
--------------------
The trio adapter (:mod:`relay.serve`) owns sockets, TLS, timers and tasks.  For
every accepted DERP stream it asks this core for a :class:`ServerConn`, pushes
received bytes in with :meth:`RelayCore.receive_data`, and pulls bytes to write
out with :meth:`RelayCore.take_outgoing`.  Everything DERP *means* happens
here, synchronously, without awaiting: this makes the routing decisions
testable byte for byte and keeps one slow client from ever blocking another.

Per-connection state machine (style rule 15)::

    LOGIN --client_info_ok--> ACTIVE --close/protocol_error--> CLOSED
      |                                                          ^
      +------- refused / protocol_error / close -----------------+

A missing ``(state, input)`` pair is illegal and lands in CLOSED with a
:class:`~relay.errors.LocalProtocolError` (our bug).  Ordinary frames in ACTIVE
are the hot path and do not go through the table.

Routing (a SendPacket from client A to key B)
---------------------------------------------
1. B has an *active* local connection: enqueue a RecvPacket on it.
2. Otherwise, B is known to a mesh peer (a :class:`PacketForwarder` was
   registered for it after that peer's PeerPresent): hand the packet over.
3. Otherwise drop it as ``unknown_dest`` (``dup_client`` if B is connected
   several times and none of the connections is currently active).  If the
   packet looks like disco, tell A with a rate-limited PeerGone(NOT_HERE).

Backpressure and drops (style rule 18)
--------------------------------------
Each connection has three outgoing queues, drained in this order by its own
writer task: control frames (ServerInfo, Pong, PeerGone, PeerPresent,
KeepAlive; small and bounded by the protocol), disco packets, other packets.
The two packet queues hold at most ``queue_depth`` packets each.  Enqueueing
never blocks: when a queue is full the *oldest* packet is dropped (fresher
packets are worth more to WireGuard and disco) and counted as ``queue_full``.
Every dropped packet is counted under exactly one :class:`DropReason`;
nothing is ever lost silently.  A reader that stops reading therefore costs its
own queue, never the sender's progress or anybody else's.

Abuse bounds (one authorised node against the others)
-----------------------------------------------------
A full queue drops its oldest packet, so a node that sends faster than its
victim reads would otherwise push everybody else's packets to that victim
out of the queue.  Two limits bound what one node key can do; both are off
unless configured (derper has neither by default) and both exempt mesh peers,
which carry many clients' traffic:

* **Rate** (``rate_limit`` bytes/s, ``rate_burst`` bytes): one token bucket
  per node key, shared by all of that key's connections and kept after the
  last one leaves until it would have refilled (reconnecting buys no fresh
  burst), charged the full SendPacket frame (header + key + packet, the unit
  of Tailscale's ServerInfo ``TokenBucketBytesPerSecond``).  A packet the
  bucket cannot pay for is dropped before it reaches any queue, as
  ``rate_limited``.  The limit is announced in ServerInfo, where Tailscale
  clients read it and hold their own sends to it, so what a well-behaved
  client sends is never dropped here.  Early derper versions paced instead (a
  per-client limiter waited before reading each frame, so TCP pushed back on
  the sender); dropping in the core keeps the decision sans-I/O and testable
  with the injected clock, and it takes effect within one read, whereas
  pacing a 64 KiB read still lets its whole content into the victim's queue.
* **Connections per key** (``max_conns_per_key``): derper keeps every
  duplicate (:class:`DupPolicy`); we cap them.  By default the newest
  connection wins and the oldest of the key are closed
  (:attr:`KeyLimitPolicy.CLOSE_OLDEST`, counted as ``closed_key_limit``):
  a client that reconnects faster than its dead TCP connections time out
  must always get in, and only that key's owner pays.  With
  :attr:`KeyLimitPolicy.REFUSE_NEW` a login beyond the cap is refused like an
  unauthorised one (counted as ``refused_key_limit``).

Invariants
----------
* ``_active[k]`` is set iff ``_sets[k]`` exists and has an active connection,
  and then they agree.  Lookups on the hot path read only ``_active``.
* A key is "in the region" while it has a local connection set or at least one
  forwarder.  When it leaves the region, every connection that received packets
  from it gets PeerGone(DISCONNECTED), exactly once.
* A connection in CLOSED is in no table and its queues are empty (their packets
  were counted as ``gone_disconnected``).
* With a rate limit, the SendPacket frames of one node key admitted during any
  interval of T seconds total at most ``rate_burst + rate_limit * T`` bytes.
"""

from __future__ import annotations

import enum
import hmac
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

import msgspec

from ..auth import Authorizer
from ..errors import LocalProtocolError, RemoteProtocolError
from ..keys import KEY_LEN, open_sealed, public_key_of, seal_to, short_key
from . import frames as f

__all__ = [
    "DEFAULT_QUEUE_DEPTH",
    "MIN_RATE_BURST",
    "ConnInput",
    "ConnState",
    "DropReason",
    "DupPolicy",
    "ForwardQueue",
    "KeyLimitPolicy",
    "PacketForwarder",
    "RelayCore",
    "RelayStats",
    "ServerConn",
]

DEFAULT_QUEUE_DEPTH = 32
"""Packets buffered per client and per queue (Tailscale's derper uses 32 too)."""

# Largest frame an established client may send: a ForwardPacket carrying a
# maximum-size packet.  Anything larger is a protocol error; this bounds the
# decoder's buffer per connection.
_MAX_ACTIVE_FRAME = f.MAX_PACKET_SIZE + 2 * KEY_LEN

# PeerGone(NOT_HERE) replies are rate limited per connection: a burst of 3,
# then one per second (Tailscale's peerGoneLim).
_NOT_HERE_BURST = 3.0
_NOT_HERE_PER_SECOND = 1.0

# Ints for the hot path: IntEnum comparisons are several times slower.
_SEND_PACKET = int(f.FrameType.SEND_PACKET)
_RECV_PACKET = int(f.FrameType.RECV_PACKET)
_FORWARD_PACKET = int(f.FrameType.FORWARD_PACKET)
_PING = int(f.FrameType.PING)
_PONG = int(f.FrameType.PONG)
_NOTE_PREFERRED = int(f.FrameType.NOTE_PREFERRED)
_WATCH_CONNS = int(f.FrameType.WATCH_CONNS)
_CLOSE_PEER = int(f.FrameType.CLOSE_PEER)
_CLIENT_INFO = int(f.FrameType.CLIENT_INFO)
_DISCO_MAGIC = f.DISCO_MAGIC
_DISCO_FIRST = f.DISCO_MAGIC[0]
_DISCO_MIN = len(f.DISCO_MAGIC) + KEY_LEN + 24
_HEADER = struct.Struct(">BI")
_RECV_OVERHEAD = f.FRAME_HEADER_LEN + KEY_LEN  # bytes of a RecvPacket frame that are not packet
_FRAME_HEADER_LEN = f.FRAME_HEADER_LEN
_MAX_SEND_PAYLOAD = f.MAX_PACKET_SIZE + KEY_LEN
_KEEPALIVE_FRAME = f.encode_keep_alive()
_UNLIMITED = float("inf")
#: The largest SendPacket frame; a rate bucket's burst must pay for one.
MIN_RATE_BURST = f.FRAME_HEADER_LEN + KEY_LEN + f.MAX_PACKET_SIZE


class DropReason(enum.Enum):
    """Why a packet was not delivered.  Values are the metric label names."""

    UNKNOWN_DEST = "unknown_dest"
    """No local client and no mesh peer knows the destination key."""
    UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
    """A mesh peer forwarded a packet for a key that is not connected here."""
    GONE_DISCONNECTED = "gone_disconnected"
    """The destination disconnected while the packet was still queued."""
    QUEUE_FULL = "queue_full"
    """The destination's bounded queue was full; its oldest packet was dropped."""
    WRITE_ERROR = "write_error"
    """Writing to the destination failed (broken socket, write timeout)."""
    DUP_CLIENT = "dup_client"
    """The destination key is connected more than once and none is active."""
    MESH_QUEUE_FULL = "mesh_queue_full"
    """The mesh link to the relay that has the destination was backed up."""
    RATE_LIMITED = "rate_limited"
    """The sender's node key was over its byte rate (see ``rate_limit``)."""


class ConnState(enum.Enum):
    """Lifecycle of one client connection (see the module docstring)."""

    LOGIN = "login"
    ACTIVE = "active"
    CLOSED = "closed"


class ConnInput(enum.Enum):
    """Inputs that move a connection between states."""

    CLIENT_INFO_OK = "client_info_ok"
    REFUSED = "refused"
    PROTOCOL_ERROR = "protocol_error"
    CLOSE = "close"


_TRANSITIONS: dict[tuple[ConnState, ConnInput], ConnState] = {
    (ConnState.LOGIN, ConnInput.CLIENT_INFO_OK): ConnState.ACTIVE,
    (ConnState.LOGIN, ConnInput.REFUSED): ConnState.CLOSED,
    (ConnState.LOGIN, ConnInput.PROTOCOL_ERROR): ConnState.CLOSED,
    (ConnState.LOGIN, ConnInput.CLOSE): ConnState.CLOSED,
    (ConnState.ACTIVE, ConnInput.PROTOCOL_ERROR): ConnState.CLOSED,
    (ConnState.ACTIVE, ConnInput.CLOSE): ConnState.CLOSED,
    # Closing twice is harmless: the reader and the writer may both notice.
    (ConnState.CLOSED, ConnInput.CLOSE): ConnState.CLOSED,
    (ConnState.CLOSED, ConnInput.PROTOCOL_ERROR): ConnState.CLOSED,
}


class PacketForwarder(Protocol):
    """Something that can carry a packet to a mesh peer relay (never blocks)."""

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Queue ``packet`` from ``src`` to ``dst``; return ``False`` if it was dropped."""
        ...


class RelayStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the relay's counters (``RelayCore.stats()``).

    Attributes:
        accepts: connections handed to the core so far.
        current_connections: connections currently past login.
        current_keys: distinct node keys connected locally.
        home_connections: connections that said this relay is their home.
        dup_keys: keys connected more than once right now.
        packets_received: SendPacket frames accepted from clients.
        bytes_received: packet bytes in those frames.
        packets_sent: packets handed to writers (RecvPacket frames written).
        bytes_sent: packet bytes in those.
        packets_forwarded_out: packets handed to mesh peers.
        packets_forwarded_in: ForwardPacket frames accepted from mesh peers.
        drops: dropped packets per :class:`DropReason` value (every reason present).
        bytes_dropped: dropped packet bytes per reason.
        refused_unauthorized: logins refused by the authorizer.
        refused_key_limit: logins refused because their node key already held
            ``max_conns_per_key`` connections (:attr:`KeyLimitPolicy.REFUSE_NEW`).
        closed_key_limit: older connections closed to admit a newer one of the
            same node key (:attr:`KeyLimitPolicy.CLOSE_OLDEST`).
        refused_protocol: connections closed for a protocol violation.
        revoked: connections closed because their authorization was revoked.
        peer_gone_disconnected_sent: PeerGone(DISCONNECTED) frames queued.
        peer_gone_not_here_sent: PeerGone(NOT_HERE) frames queued.
        pings_received: Ping frames from clients.
        pongs_sent: Pong frames queued.
        unknown_frames: frames of unknown type skipped.
        watchers: mesh connections currently watching.
        forwarded_keys: keys reachable through a mesh peer.
    """

    accepts: int
    current_connections: int
    current_keys: int
    home_connections: int
    dup_keys: int
    packets_received: int
    bytes_received: int
    packets_sent: int
    bytes_sent: int
    packets_forwarded_out: int
    packets_forwarded_in: int
    drops: dict[str, int]
    bytes_dropped: dict[str, int]
    refused_unauthorized: int
    refused_key_limit: int
    closed_key_limit: int
    refused_protocol: int
    revoked: int
    peer_gone_disconnected_sent: int
    peer_gone_not_here_sent: int
    pings_received: int
    pongs_sent: int
    unknown_frames: int
    watchers: int
    forwarded_keys: int


def _noop() -> None:
    return None


class ServerConn:
    """The core's view of one client connection.  Created by :meth:`RelayCore.accept`.

    The adapter reads ``key``, ``state``, ``close_reason`` and sets ``waker``;
    everything else belongs to the core.

    Attributes:
        conn_id: process-unique connection number (1, 2, ...).
        key: the client's node public key, ``None`` until login completes.
        info: the client's decoded ClientInfo, ``None`` until login completes.
        remote: ``(ip, port)`` of the peer as seen by the adapter, if known.
        state: current :class:`ConnState`.
        close_reason: why the core closed the connection (``None`` while open or
            when the adapter closed it).
        waker: called (with no arguments) whenever the connection gains bytes to
            write or is closed; the adapter points it at its writer's wake-up.
    """

    __slots__ = (
        "_ctrl",
        "_data",
        "_disco",
        "_not_here_tokens",
        "_not_here_updated",
        "_pong_queued",
        "bucket",
        "can_mesh",
        "close_reason",
        "conn_id",
        "connected_at",
        "decoder",
        "ideal_node",
        "info",
        "is_dup",
        "key",
        "preferred",
        "remote",
        "saw_src",
        "state",
        "wake_pending",
        "waker",
        "watching",
    )

    def __init__(
        self,
        conn_id: int,
        remote: tuple[str, int] | None,
        ideal_node: str | None,
        now: float,
    ) -> None:
        self.conn_id = conn_id
        self.remote = remote
        self.ideal_node = ideal_node
        self.connected_at = now
        self.key: bytes | None = None
        self.info: f.ClientInfo | None = None
        self.state = ConnState.LOGIN
        self.close_reason: str | None = None
        self.waker: Callable[[], None] = _noop
        self.wake_pending = False
        self.decoder = f.FrameDecoder(f.MAX_CLIENT_INFO_LEN)
        self.can_mesh = False
        # The node key's rate bucket (shared by its connections); None = unlimited.
        self.bucket: RateBucket | None = None
        self.preferred = False
        self.is_dup = False
        self.watching = False
        # Source keys this client has been sent packets from: it wants a
        # PeerGone when any of them leaves the region.
        self.saw_src: set[bytes] = set()
        self._ctrl: deque[bytes] = deque()
        self._disco: deque[bytes] = deque()
        self._data: deque[bytes] = deque()
        self._pong_queued = False
        self._not_here_tokens = _NOT_HERE_BURST
        self._not_here_updated = now

    @property
    def closed(self) -> bool:
        """Whether the connection is in :attr:`ConnState.CLOSED`."""
        return self.state is ConnState.CLOSED

    @property
    def queued_packets(self) -> int:
        """Packets (disco + other) waiting to be written."""
        return len(self._disco) + len(self._data)

    def __repr__(self) -> str:
        who = short_key(self.key) if self.key else "?"
        return f"<ServerConn #{self.conn_id} {who} {self.state.value}>"


class DupPolicy(enum.Enum):
    """What to do when one key is connected more than once (Tailscale's ``dupPolicy``)."""

    LAST_WRITER_IS_ACTIVE = "last_writer_is_active"
    """The newest connection, then whichever connection last sent a frame, gets
    the key's packets.  Right for a client that reconnected before its old TCP
    connection timed out (the default)."""
    DISABLE_FIGHTERS = "disable_fighters"
    """Like the above until two connections take turns sending ("fighting",
    the signature of a cloned node key); then nobody gets packets for the key
    (dropped as ``dup_client``) until a new connection arrives."""


class KeyLimitPolicy(enum.Enum):
    """What a login does when its node key already holds ``max_conns_per_key`` connections."""

    CLOSE_OLDEST = "close_oldest"
    """Admit the newcomer and close the key's oldest connections (the default).
    A client that reconnects while its dead TCP connections linger (a dead peer
    is only noticed when the kernel gives up retransmitting) always gets in."""
    REFUSE_NEW = "refuse_new"
    """Refuse the newcomer like an unauthorised login; the existing ones stay."""


class RateBucket:
    """A token bucket of bytes for one node key (see "Abuse bounds" above).

    ``tokens`` may be fractional; it is refilled lazily (once per received
    chunk) from ``updated``, capped at the core's burst.
    """

    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.updated = now

    def __repr__(self) -> str:
        return f"<RateBucket {self.tokens:.0f} bytes>"


class _ClientSet:
    """All local connections for one key (usually exactly one).

    With several (a reconnecting client, or a cloned key) the set remembers the
    order in which its members spoke (``send_history``, adjacent repeats
    collapsed, seeded with the older connection when the set became a
    duplicate) and picks the active one according to the :class:`DupPolicy`.
    When the active connection leaves, the most recent remaining speaker takes
    over; if none has spoken, nobody is active (packets are dropped as
    ``dup_client``) until one does.
    """

    __slots__ = ("active", "bucket", "conns", "fighting", "send_history")

    def __init__(self) -> None:
        # The key's rate bucket, shared by its connections (mesh peers have none).
        self.bucket: RateBucket | None = None
        self.conns: list[ServerConn] = []
        self.active: ServerConn | None = None
        self.send_history: list[ServerConn] = []
        self.fighting = False


class ForwardQueue:
    """A bounded, non-blocking outbound queue of ForwardPacket frames for one mesh link.

    The mesh adapter creates one per outbound mesh connection, registers it
    with :meth:`RelayCore.add_forwarder` for every key the peer announces, and
    drains it with :meth:`take` from its writer task.  When full, the packet is
    refused (``forward_packet`` returns ``False``) and the core counts it as
    :attr:`DropReason.MESH_QUEUE_FULL`.

    Args:
        name: label for logs (usually the peer's URL).
        depth: maximum queued packets.
    """

    def __init__(self, name: str, depth: int = 4 * DEFAULT_QUEUE_DEPTH) -> None:
        self.name = name
        self.depth = depth
        self.waker: Callable[[], None] = _noop
        self._queue: deque[bytes] = deque()
        self.closed = False

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Queue a ForwardPacket frame; ``False`` if the link is closed or full."""
        if self.closed or len(self._queue) >= self.depth:
            return False
        was_empty = not self._queue
        self._queue.append(f.encode_forward_packet(src, dst, packet))
        if was_empty:
            self.waker()
        return True

    def take(self) -> bytes:
        """Return (and forget) everything queued, as one byte string."""
        data = b"".join(self._queue)
        self._queue.clear()
        return data

    def close(self) -> int:
        """Refuse further packets; return how many queued packets were discarded."""
        self.closed = True
        n = len(self._queue)
        self._queue.clear()
        return n

    def __repr__(self) -> str:
        return f"<ForwardQueue {self.name}>"


class RelayCore:
    """All DERP server logic for one relay process.

    Args:
        private_key: the relay's 32-byte Curve25519 private key.
        authorizer: decides which node keys may log in (see :mod:`relay.auth`).
        mesh_key: the region's 32-byte mesh key, or ``None`` to disable meshing.
            Clients presenting it skip authorization and may watch, forward
            and close peers.
        queue_depth: per-client packet queue bound (each of disco and other).
        dup_policy: how to treat a key connected more than once.
        rate_limit: bytes per second each node key may send (SendPacket frames,
            header included); 0 = unlimited.  Announced in ServerInfo.
        rate_burst: bytes a node key may send at once (the bucket's size); at
            least :data:`MIN_RATE_BURST` when ``rate_limit`` is set.
        max_conns_per_key: concurrent connections one node key may hold; 0 =
            unlimited (derper's behaviour).  Mesh peers are exempt.
        key_limit_policy: what a login beyond ``max_conns_per_key`` does.
        clock: monotonic seconds; injected so tests can control time.
        log: called with one human-readable line per notable event
            (refusals, protocol errors, revocations).
    """

    def __init__(
        self,
        private_key: bytes,
        authorizer: Authorizer,
        *,
        mesh_key: bytes | None = None,
        queue_depth: int = DEFAULT_QUEUE_DEPTH,
        dup_policy: DupPolicy = DupPolicy.LAST_WRITER_IS_ACTIVE,
        rate_limit: int = 0,
        rate_burst: int = 0,
        max_conns_per_key: int = 0,
        key_limit_policy: KeyLimitPolicy = KeyLimitPolicy.CLOSE_OLDEST,
        clock: Callable[[], float] = time.monotonic,
        log: Callable[[str], None] = lambda line: None,
    ) -> None:
        if mesh_key is not None and len(mesh_key) != KEY_LEN:
            raise ValueError("mesh key must be 32 bytes")
        if queue_depth < 1:
            raise ValueError("queue_depth must be at least 1")
        if rate_limit < 0 or max_conns_per_key < 0:
            raise ValueError("rate_limit and max_conns_per_key must not be negative (0 = off)")
        if rate_limit and rate_burst < MIN_RATE_BURST:
            # A smaller bucket could never pay for a maximum-size packet.
            raise ValueError(f"rate_burst must be at least {MIN_RATE_BURST} bytes")
        self.private_key = private_key
        self.public_key = public_key_of(private_key)
        self.authorizer = authorizer
        self.mesh_key = mesh_key
        self.queue_depth = queue_depth
        self.dup_policy = dup_policy
        self.rate_limit = rate_limit
        self.rate_burst = rate_burst if rate_limit else 0
        self.max_conns_per_key = max_conns_per_key
        self.key_limit_policy = key_limit_policy
        self._clock = clock
        self._log = log
        self._server_key_frame = f.encode_server_key(self.public_key)
        # What every admitted client is told, sealed per client at login.
        self._server_info_json = f.encode_server_info_json(
            f.ServerInfo(
                token_bucket_bytes_per_second=self.rate_limit,
                token_bucket_bytes_burst=self.rate_burst,
            )
        )
        self._next_id = 0
        self._conns: dict[int, ServerConn] = {}
        self._sets: dict[bytes, _ClientSet] = {}
        self._active: dict[bytes, ServerConn] = {}
        self._forwarders: dict[bytes, list[PacketForwarder]] = {}
        self._watchers: set[ServerConn] = set()
        self._peer_gone_watchers: dict[bytes, set[ServerConn]] = {}
        # Rate buckets of keys that left before their bucket refilled (see _register).
        self._left_buckets: dict[bytes, RateBucket] = {}
        # counters
        self._drops: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self._drop_bytes: dict[DropReason, int] = dict.fromkeys(DropReason, 0)
        self._accepts = 0
        self._packets_received = 0
        self._bytes_received = 0
        self._packets_sent = 0
        self._bytes_sent = 0
        self._fwd_out = 0
        self._fwd_in = 0
        self._refused_unauthorized = 0
        self._refused_key_limit = 0
        self._closed_key_limit = 0
        self._refused_protocol = 0
        self._revoked = 0
        self._gone_disconnected_sent = 0
        self._gone_not_here_sent = 0
        self._pings = 0
        self._pongs = 0
        self._unknown_frames = 0
        self._home = 0

    # ------------------------------------------------------------------
    # Connection lifecycle (called by the adapter)
    # ------------------------------------------------------------------

    def accept(
        self,
        remote: tuple[str, int] | None = None,
        *,
        ideal_node: str | None = None,
    ) -> ServerConn:
        """Start serving a new DERP stream; the ServerKey frame is queued at once.

        Args:
            remote: the peer's ``(ip, port)``, reported to mesh watchers.
            ideal_node: value of the ``Ideal-Node`` HTTP header, if the client
                said it would rather be on another node of the region.

        Returns:
            The connection handle to pass to the other methods.  It already
            has the ServerKey frame queued: start its writer awake.
        """
        self._next_id += 1
        self._accepts += 1
        conn = ServerConn(self._next_id, remote, ideal_node, self._clock())
        self._conns[conn.conn_id] = conn
        conn._ctrl.append(self._server_key_frame)
        return conn

    def receive_data(self, conn: ServerConn, data: bytes | bytearray) -> None:
        """Process bytes received from ``conn``.

        Never raises for anything the peer sends: protocol violations close
        ``conn`` (``conn.closed`` becomes true, ``close_reason`` says why) and
        leave every other connection untouched.  Data for a closed connection
        is ignored.
        """
        state = conn.state
        if state is ConnState.CLOSED:
            return
        try:
            if state is ConnState.ACTIVE:
                self._receive_active_chunk(conn, data if type(data) is bytes else bytes(data))
            else:
                self._receive_login(conn, conn.decoder.feed(data))
        except RemoteProtocolError as exc:
            self._refuse_protocol(conn, str(exc))

    def take_outgoing(self, conn: ServerConn) -> tuple[bytes, int]:
        """Return everything queued for ``conn`` and how many packets it contains.

        Control frames come first, then disco packets, then other packets.
        The packets are counted as sent; if the write then fails, report it
        with :meth:`write_failed` so they are re-counted as dropped.

        Returns:
            ``(data, packets)``; ``data`` is empty when nothing is queued.
        """
        conn.wake_pending = False
        conn._pong_queued = False
        ctrl, disco, data = conn._ctrl, conn._disco, conn._data
        npkts = len(disco) + len(data)
        if not ctrl and npkts == 0:
            return b"", 0
        parts: list[bytes] = []
        if ctrl:
            parts.extend(ctrl)
            ctrl.clear()
        if npkts:
            nbytes = 0
            for q in (disco, data):
                if q:
                    for frame in q:
                        nbytes += len(frame)
                    parts.extend(q)
                    q.clear()
            self._packets_sent += npkts
            # Frame overhead (5-byte header + 32-byte key) is not packet bytes.
            self._bytes_sent += nbytes - npkts * (f.FRAME_HEADER_LEN + KEY_LEN)
        return b"".join(parts), npkts

    def write_failed(self, conn: ServerConn, packets: int, nbytes: int = 0) -> None:
        """Record that writing ``packets`` packets taken from ``conn`` failed, and close it."""
        if packets:
            self._packets_sent -= packets
            self._drops[DropReason.WRITE_ERROR] += packets
            self._drop_bytes[DropReason.WRITE_ERROR] += nbytes
        self._close(conn, ConnInput.CLOSE, "write failed")

    def connection_lost(self, conn: ServerConn, reason: str | None = None) -> None:
        """The adapter's stream is gone (EOF, error, or shutdown); forget ``conn``.

        Queued packets are counted as :attr:`DropReason.GONE_DISCONNECTED`.
        Idempotent.
        """
        self._close(conn, ConnInput.CLOSE, reason)

    def close(self, conn: ServerConn, reason: str) -> None:
        """Close ``conn`` on the core's initiative (e.g. handshake timeout)."""
        self._close(conn, ConnInput.CLOSE, reason)

    def transport_violation(self, conn: ServerConn, reason: str) -> None:
        """The stream under ``conn`` broke its own protocol (a text message on DERP
        over WebSocket): closed and counted as a DERP protocol violation."""
        self._refuse_protocol(conn, reason)

    def keepalive(self) -> int:
        """Queue a KeepAlive frame on every established connection.

        Returns:
            How many connections got one.
        """
        n = 0
        for conn in self._conns.values():
            if conn.state is ConnState.ACTIVE:
                self._queue_ctrl(conn, _KEEPALIVE_FRAME)
                n += 1
        return n

    # ------------------------------------------------------------------
    # Authorization changes (called by the adapter on behalf of the log)
    # ------------------------------------------------------------------

    def revoke(self, node_key: bytes) -> list[ServerConn]:
        """Close every local connection of ``node_key``; return the closed ones.

        Mesh peers are not subject to revocation (they never were authorized
        by node key).
        """
        cs = self._sets.get(node_key)
        if cs is None:
            return []
        closed = [c for c in list(cs.conns) if not c.can_mesh]
        for conn in closed:
            self._revoked += 1
            self._log(f"derp: {conn!r}: authorization revoked; closing")
            self._close(conn, ConnInput.CLOSE, "authorization revoked")
        return closed

    def reauthorize(self) -> list[ServerConn]:
        """Ask the authorizer about every connected client; close the refused ones."""
        refused = [
            conn
            for conn in self._conns.values()
            if conn.state is ConnState.ACTIVE
            and not conn.can_mesh
            and conn.key is not None
            and not self.authorizer.is_authorized(conn.key)
        ]
        for conn in refused:
            self._revoked += 1
            self._log(f"derp: {conn!r}: no longer authorized; closing")
            self._close(conn, ConnInput.CLOSE, "authorization revoked")
        return refused

    # ------------------------------------------------------------------
    # Mesh forwarding registry (called by the mesh adapter)
    # ------------------------------------------------------------------

    def add_forwarder(self, key: bytes, fwd: PacketForwarder) -> None:
        """Note that mesh link ``fwd`` can reach ``key`` (after a PeerPresent).

        The first forwarder registered for a key stays preferred, so packets
        take a consistent path while a client briefly appears on two relays.
        """
        if key == self.public_key:
            return
        fwds = self._forwarders.setdefault(key, [])
        if not any(x is fwd for x in fwds):
            fwds.append(fwd)

    def remove_forwarder(self, key: bytes, fwd: PacketForwarder) -> None:
        """Undo :meth:`add_forwarder` (after a PeerGone or when the link breaks)."""
        fwds = self._forwarders.get(key)
        if fwds is None:
            return
        fwds[:] = [x for x in fwds if x is not fwd]
        if not fwds:
            del self._forwarders[key]
            if key not in self._sets:
                self._note_gone_from_region(key)

    def remove_forwarder_everywhere(self, fwd: PacketForwarder) -> int:
        """Remove ``fwd`` for every key (its mesh link broke); return how many keys."""
        keys = [k for k, fwds in self._forwarders.items() if any(x is fwd for x in fwds)]
        for key in keys:
            self.remove_forwarder(key, fwd)
        return len(keys)

    # ------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------

    def connections(self) -> list[ServerConn]:
        """All connections not yet closed (login and active)."""
        return list(self._conns.values())

    def is_connected(self, node_key: bytes) -> bool:
        """Whether ``node_key`` has at least one local connection past login."""
        return node_key in self._sets

    def stats(self) -> RelayStats:
        """A consistent snapshot of all counters."""
        active = [c for c in self._conns.values() if c.state is ConnState.ACTIVE]
        return RelayStats(
            accepts=self._accepts,
            current_connections=len(active),
            current_keys=len(self._sets),
            home_connections=self._home,
            dup_keys=sum(1 for cs in self._sets.values() if len(cs.conns) > 1),
            packets_received=self._packets_received,
            bytes_received=self._bytes_received,
            packets_sent=self._packets_sent,
            bytes_sent=self._bytes_sent,
            packets_forwarded_out=self._fwd_out,
            packets_forwarded_in=self._fwd_in,
            drops={r.value: n for r, n in self._drops.items()},
            bytes_dropped={r.value: n for r, n in self._drop_bytes.items()},
            refused_unauthorized=self._refused_unauthorized,
            refused_key_limit=self._refused_key_limit,
            closed_key_limit=self._closed_key_limit,
            refused_protocol=self._refused_protocol,
            revoked=self._revoked,
            peer_gone_disconnected_sent=self._gone_disconnected_sent,
            peer_gone_not_here_sent=self._gone_not_here_sent,
            pings_received=self._pings,
            pongs_sent=self._pongs,
            unknown_frames=self._unknown_frames,
            watchers=len(self._watchers),
            forwarded_keys=len(self._forwarders),
        )

    # ------------------------------------------------------------------
    # Login
    # ------------------------------------------------------------------

    def _receive_login(self, conn: ServerConn, frames: list[tuple[int, bytes]]) -> None:
        if not frames:
            return
        ftype, payload = frames[0]
        if ftype != _CLIENT_INFO:
            raise RemoteProtocolError(f"expected ClientInfo frame, got type 0x{ftype:02x}")
        client_key, sealed = f.parse_client_info(payload)
        if client_key == self.public_key:
            raise RemoteProtocolError("client claims the server's own key")
        info = f.decode_client_info_json(open_sealed(self.private_key, client_key, sealed))
        can_mesh = (
            self.mesh_key is not None
            and info.mesh_key is not None
            and hmac.compare_digest(self.mesh_key, info.mesh_key)
        )
        if not can_mesh and not self.authorizer.is_authorized(client_key):
            self._refused_unauthorized += 1
            self._log(f"derp: #{conn.conn_id} {short_key(client_key)}: not authorized; closing")
            conn.key = client_key
            self._close(conn, ConnInput.REFUSED, "not authorized")
            return
        over_cap = not can_mesh and self._key_at_cap(client_key)
        if over_cap and self.key_limit_policy is KeyLimitPolicy.REFUSE_NEW:
            self._refused_key_limit += 1
            self._log(f"derp: #{conn.conn_id} {short_key(client_key)}: too many connections")
            conn.key = client_key
            self._close(conn, ConnInput.REFUSED, "too many connections for this node key")
            return
        self._transition(conn, ConnInput.CLIENT_INFO_OK)
        conn.key = client_key
        conn.info = info
        conn.can_mesh = can_mesh
        conn.decoder.max_frame_len = _MAX_ACTIVE_FRAME
        self._register(conn)
        if over_cap:
            # Registered first, so the key never leaves the region (no PeerGone).
            self._close_oldest(client_key)
        sealed_info = seal_to(self.private_key, client_key, self._server_info_json)
        self._queue_ctrl(conn, f.encode_server_info(sealed_info))
        if len(frames) > 1:
            self._receive_active(conn, frames[1:])

    # ------------------------------------------------------------------
    # Steady state
    # ------------------------------------------------------------------

    def _receive_active(self, conn: ServerConn, frames: list[tuple[int, bytes]]) -> None:
        """Handle already-split frames (pipelined after login, or straddling chunks).

        The common case never comes here: see :meth:`_receive_active_chunk`.
        """
        src = conn.key
        assert src is not None  # Invariant: ACTIVE implies a key.
        if conn.is_dup:
            self._note_dup_activity(conn)
        bucket = conn.bucket
        if bucket is not None:
            self._refill(bucket)
        for ftype, payload in frames:
            if ftype == _SEND_PACKET:
                plen = len(payload)
                if plen < KEY_LEN or plen > _MAX_SEND_PAYLOAD:
                    raise RemoteProtocolError(f"SendPacket payload of {plen} bytes")
                self._packets_received += 1
                self._bytes_received += plen - KEY_LEN
                if bucket is not None:
                    if plen + _FRAME_HEADER_LEN > bucket.tokens:
                        self._drop(DropReason.RATE_LIMITED, plen - KEY_LEN)
                        continue
                    bucket.tokens -= plen + _FRAME_HEADER_LEN
                dconn = self._active.get(payload[:KEY_LEN])
                if dconn is None:
                    self._route_slow(conn, src, payload[:KEY_LEN], payload[KEY_LEN:])
                else:
                    self._deliver(dconn, src, payload, plen)
            else:
                self._handle_frame(conn, ftype, payload)
            if conn.state is not ConnState.ACTIVE:
                return  # closed by that frame (e.g. ClosePeer on itself)

    def _receive_active_chunk(self, conn: ServerConn, data: bytes) -> None:
        """Handle a chunk from an established connection: the relay's hot path.

        Complete frames are parsed *in place*: no intermediate payload copies,
        no list of tuples.  A SendPacket to an active local destination is
        handled inline (look up, build the RecvPacket, enqueue, wake) with
        counters kept in locals and written back once per chunk.  The frame
        decoder is used only for the two edges of the chunk: finishing a frame
        that began in an earlier chunk, and keeping the start of one that
        continues in the next.  Framing rules (header, length limit) are the
        decoder's; ``test_chunking_never_changes_what_is_delivered`` checks
        that both paths agree for every way of cutting a stream.
        """
        decoder = conn.decoder
        pos = 0
        if decoder.buffered:
            straddler, pos = decoder.complete(data)
            if straddler is None:
                return
            self._receive_active(conn, [straddler])
            if conn.state is not ConnState.ACTIVE:
                return
        elif conn.is_dup:
            self._note_dup_activity(conn)
        src = conn.key
        assert src is not None  # Invariant: ACTIVE implies a key.
        # The sender's rate bucket, in a local for the loop (inf = unlimited,
        # so the unlimited case costs one comparison per packet).
        bucket = conn.bucket
        tokens = _UNLIMITED if bucket is None else self._refill(bucket)
        limited = limited_bytes = 0
        n = len(data)
        limit = decoder.max_frame_len
        unpack_from = _HEADER.unpack_from
        pack_header = _HEADER.pack
        active_get = self._active.get
        depth = self.queue_depth
        received = received_bytes = dropped = dropped_bytes = 0
        try:
            while pos + _FRAME_HEADER_LEN <= n:
                ftype, length = unpack_from(data, pos)
                if length > limit:
                    raise RemoteProtocolError(f"frame of {length} bytes exceeds limit {limit}")
                body = pos + _FRAME_HEADER_LEN
                end = body + length
                if end > n:
                    break
                pos = end
                if ftype != _SEND_PACKET:
                    self._handle_frame(conn, ftype, data[body:end])
                    if conn.state is not ConnState.ACTIVE:
                        return  # closed by that frame (e.g. ClosePeer on itself)
                    continue
                if length < KEY_LEN or length > _MAX_SEND_PAYLOAD:
                    raise RemoteProtocolError(f"SendPacket payload of {length} bytes")
                received += 1
                received_bytes += length - KEY_LEN
                if length + _FRAME_HEADER_LEN > tokens:
                    limited += 1
                    limited_bytes += length - KEY_LEN
                    continue
                tokens -= length + _FRAME_HEADER_LEN
                dst = data[body : body + KEY_LEN]
                dconn = active_get(dst)
                if dconn is None:
                    self._route_slow(conn, src, dst, data[body + KEY_LEN : end])
                    continue
                # A SendPacket payload (dst key + packet) and the RecvPacket
                # payload (src key + packet) have the same length, so the new
                # header carries the incoming length: header + src + packet.
                frame = pack_header(_RECV_PACKET, length) + src + data[body + KEY_LEN : end]
                if src not in dconn.saw_src:
                    self._note_saw_src(dconn, src)
                # Most packets are WireGuard (first byte 1..4): test one byte
                # before the full magic comparison.
                if (
                    length >= _DISCO_MIN
                    and data[body + KEY_LEN] == _DISCO_FIRST
                    and data.startswith(_DISCO_MAGIC, body + KEY_LEN)
                ):
                    q = dconn._disco
                else:
                    q = dconn._data
                if len(q) >= depth:
                    dropped += 1
                    dropped_bytes += len(q.popleft()) - _RECV_OVERHEAD
                q.append(frame)
                if not dconn.wake_pending:
                    dconn.wake_pending = True
                    dconn.waker()
            if pos < n:
                decoder.feed(data[pos:])  # an incomplete frame: buffered, never returned
        finally:
            self._packets_received += received
            self._bytes_received += received_bytes
            if dropped:
                self._drops[DropReason.QUEUE_FULL] += dropped
                self._drop_bytes[DropReason.QUEUE_FULL] += dropped_bytes
            if bucket is not None:
                bucket.tokens = tokens
                if limited:
                    self._drops[DropReason.RATE_LIMITED] += limited
                    self._drop_bytes[DropReason.RATE_LIMITED] += limited_bytes

    def _refill(self, bucket: RateBucket) -> float:
        """Add the tokens earned since the bucket was last looked at; return the balance."""
        now = self._clock()
        elapsed = now - bucket.updated
        if elapsed > 0:
            bucket.tokens = min(float(self.rate_burst), bucket.tokens + elapsed * self.rate_limit)
            bucket.updated = now
        return bucket.tokens

    def _handle_frame(self, conn: ServerConn, ftype: int, payload: bytes) -> None:
        """Everything but SendPacket, for an established connection."""
        if ftype == _PING:
            self._pings += 1
            data = f.parse_ping(payload)
            if not conn._pong_queued:  # pinging too fast: ignore extras
                conn._pong_queued = True
                self._pongs += 1
                self._queue_ctrl(conn, f.encode_pong(data))
        elif ftype == _NOTE_PREFERRED:
            preferred = f.parse_note_preferred(payload)
            if preferred != conn.preferred:
                conn.preferred = preferred
                self._home += 1 if preferred else -1
        elif ftype == _FORWARD_PACKET:
            self._require_mesh(conn, "ForwardPacket")
            fsrc, fdst, packet = f.parse_forward_packet(payload)
            self._fwd_in += 1
            self._deliver_forwarded(conn, fsrc, fdst, packet)
        elif ftype == _WATCH_CONNS:
            if payload:
                raise RemoteProtocolError("WatchConns frame has a payload")
            self._require_mesh(conn, "WatchConns")
            self._add_watcher(conn)
        elif ftype == _CLOSE_PEER:
            self._require_mesh(conn, "ClosePeer")
            target = f.parse_close_peer(payload)
            cs = self._sets.get(target)
            if cs is None:
                self._log(f"derp: {conn!r}: ClosePeer for unknown {short_key(target)}")
            else:
                for victim in list(cs.conns):
                    self._close(victim, ConnInput.CLOSE, "closed by mesh peer")
        elif ftype == _PONG:
            f.parse_ping(payload)  # validates; we send no pings that need answers
        else:
            self._unknown_frames += 1

    def _note_saw_src(self, dconn: ServerConn, src: bytes) -> None:
        """``dconn`` is about to receive its first packet from ``src``: watch ``src`` for it."""
        dconn.saw_src.add(src)
        self._peer_gone_watchers.setdefault(src, set()).add(dconn)

    def _deliver(self, dconn: ServerConn, src: bytes, payload: bytes, plen: int) -> None:
        """Queue a RecvPacket from ``src`` for ``dconn`` (slow paths; the hot one is inlined).

        ``payload`` is ``key + packet`` (the key is replaced by ``src``) and
        ``plen`` its length.
        """
        frame = _HEADER.pack(_RECV_PACKET, plen) + src + payload[KEY_LEN:]
        if src not in dconn.saw_src:
            self._note_saw_src(dconn, src)
        disco = plen >= _DISCO_MIN and payload.startswith(_DISCO_MAGIC, KEY_LEN)
        q = dconn._disco if disco else dconn._data
        if len(q) >= self.queue_depth:
            self._drop(DropReason.QUEUE_FULL, len(q.popleft()) - _RECV_OVERHEAD)
        q.append(frame)
        if not dconn.wake_pending:
            dconn.wake_pending = True
            dconn.waker()

    def _route_slow(self, conn: ServerConn, src: bytes, dst: bytes, packet: bytes) -> None:
        """No active local connection for ``dst``: try the mesh, else drop."""
        fwds = self._forwarders.get(dst)
        cs = self._sets.get(dst)
        if cs is None and fwds:
            self._fwd_out += 1
            if not fwds[0].forward_packet(src, dst, packet):
                self._drop(DropReason.MESH_QUEUE_FULL, len(packet))
            return
        if cs is not None and len(cs.conns) > 1:
            self._drop(DropReason.DUP_CLIENT, len(packet))
            return
        self._drop(DropReason.UNKNOWN_DEST, len(packet))
        self._maybe_not_here(conn, dst, packet)

    def _deliver_forwarded(self, conn: ServerConn, src: bytes, dst: bytes, packet: bytes) -> None:
        dconn = self._active.get(dst)
        if dconn is None:
            cs = self._sets.get(dst)
            if cs is not None and len(cs.conns) > 1:
                self._drop(DropReason.DUP_CLIENT, len(packet))
            else:
                self._drop(DropReason.UNKNOWN_DEST_ON_FWD, len(packet))
            return
        self._deliver(dconn, src, dst + packet, KEY_LEN + len(packet))

    def _maybe_not_here(self, conn: ServerConn, dst: bytes, packet: bytes) -> None:
        # Only disco packets get an answer: they are the ones a client uses to
        # find a path, and telling it "not here" lets it stop trying this relay.
        if not f.looks_like_disco(packet):
            return
        now = self._clock()
        tokens = min(
            _NOT_HERE_BURST,
            conn._not_here_tokens + (now - conn._not_here_updated) * _NOT_HERE_PER_SECOND,
        )
        conn._not_here_updated = now
        if tokens < 1.0:
            conn._not_here_tokens = tokens
            return
        conn._not_here_tokens = tokens - 1.0
        self._gone_not_here_sent += 1
        self._queue_ctrl(conn, f.encode_peer_gone(dst, f.PeerGoneReason.NOT_HERE))

    def _require_mesh(self, conn: ServerConn, what: str) -> None:
        if not conn.can_mesh:
            raise RemoteProtocolError(f"{what} requires the mesh key: insufficient permissions")

    # ------------------------------------------------------------------
    # Registry
    # ------------------------------------------------------------------

    def _register(self, conn: ServerConn) -> None:
        key = conn.key
        assert key is not None
        cs = self._sets.get(key)
        if cs is None:
            cs = self._sets[key] = _ClientSet()
        cs.conns.append(conn)
        if self.rate_limit and not conn.can_mesh:
            if cs.bucket is None:
                # The key's first limited connection: the bucket it left with, if
                # it still is not full, so reconnecting never buys a fresh burst.
                cs.bucket = self._left_buckets.pop(key, None) or RateBucket(
                    float(self.rate_burst), self._clock()
                )
            conn.bucket = cs.bucket
        if len(cs.conns) == 2:
            cs.send_history = [cs.conns[0]]
        if len(cs.conns) > 1:
            for c in cs.conns:
                c.is_dup = True
        cs.active = conn
        cs.fighting = False
        self._active[key] = conn
        self._broadcast_present(conn)

    def _unregister(self, conn: ServerConn) -> None:
        key = conn.key
        if key is None:
            return
        cs = self._sets.get(key)
        if cs is None or conn not in cs.conns:
            return
        cs.conns.remove(conn)
        history: list[ServerConn] = []
        for c in cs.send_history:
            if c is not conn and (not history or history[-1] is not c):
                history.append(c)
        cs.send_history = history
        if not cs.conns:
            del self._sets[key]
            if cs.bucket is not None:
                self._keep_left_bucket(key, cs.bucket)
            self._active.pop(key, None)
            self._broadcast_gone(key)
            if key not in self._forwarders:
                self._note_gone_from_region(key)
        else:
            if len(cs.conns) == 1:
                only = cs.conns[0]
                only.is_dup = False
                cs.active = only
                cs.send_history = []
                cs.fighting = False
            elif cs.active is conn or cs.active is None:
                fallback = cs.send_history[-1] if cs.send_history else None
                cs.active = None if cs.fighting else fallback
            if cs.active is None:
                self._active.pop(key, None)
            else:
                self._active[key] = cs.active

    def _keep_left_bucket(self, key: bytes, bucket: RateBucket) -> None:
        """Remember the bucket of a key that left, until it would have refilled.

        At most one entry per node key that connected (only authorised keys
        do); the oldest entries are dropped once they are full again.
        """
        left = self._left_buckets
        while left:
            oldest = next(iter(left))
            if self._refill(left[oldest]) < self.rate_burst:
                break
            del left[oldest]
        if self._refill(bucket) < self.rate_burst:
            left[key] = bucket

    def _key_at_cap(self, key: bytes) -> bool:
        """Whether ``key`` already holds ``max_conns_per_key`` client connections."""
        cap = self.max_conns_per_key
        cs = self._sets.get(key)
        if not cap or cs is None:
            return False
        return sum(1 for c in cs.conns if not c.can_mesh) >= cap

    def _close_oldest(self, key: bytes) -> None:
        """Close ``key``'s oldest client connections until it is back at its cap."""
        cs = self._sets[key]
        clients = [c for c in cs.conns if not c.can_mesh]  # join order: oldest first
        for victim in clients[: len(clients) - self.max_conns_per_key]:
            self._closed_key_limit += 1
            self._log(f"derp: {victim!r}: replaced by a newer connection (connection cap)")
            self._close(victim, ConnInput.CLOSE, "replaced: too many connections for this node key")

    def _note_dup_activity(self, conn: ServerConn) -> None:
        key = conn.key
        assert key is not None
        cs = self._sets.get(key)
        if cs is None or len(cs.conns) < 2 or cs.fighting:
            return
        if self.dup_policy is DupPolicy.LAST_WRITER_IS_ACTIVE or cs.active is None:
            cs.active = conn
        history = cs.send_history
        if not history or history[-1] is not conn:
            if self.dup_policy is DupPolicy.DISABLE_FIGHTERS and conn in history:
                # It spoke, someone else spoke, now it speaks again: two
                # machines share this key.  Nobody gets its packets.
                cs.fighting = True
                cs.active = None
                self._log(f"derp: {short_key(key)}: connections fighting; disabled")
            history.append(conn)
            if len(history) > 4 * len(cs.conns):  # bound the history
                del history[: -len(cs.conns)]
        if cs.active is None:
            self._active.pop(key, None)
        else:
            self._active[key] = cs.active

    def _note_gone_from_region(self, key: bytes) -> None:
        """``key`` has no local connection and no forwarder: tell whoever heard from it."""
        watchers = self._peer_gone_watchers.pop(key, None)
        if not watchers:
            return
        frame = f.encode_peer_gone(key, f.PeerGoneReason.DISCONNECTED)
        for w in watchers:
            w.saw_src.discard(key)
            if w.state is ConnState.ACTIVE:
                self._gone_disconnected_sent += 1
                self._queue_ctrl(w, frame)

    def _present_flags(self, conn: ServerConn) -> f.PeerPresentFlags:
        flags = f.PeerPresentFlags(0)
        if conn.info is not None and conn.info.is_prober:
            flags |= f.PeerPresentFlags.IS_PROBER
        if conn.can_mesh:
            flags |= f.PeerPresentFlags.IS_MESH_PEER
        if conn.ideal_node:
            flags |= f.PeerPresentFlags.NOT_IDEAL
        return flags or f.PeerPresentFlags.IS_REGULAR

    def _present_frame(self, conn: ServerConn) -> bytes:
        assert conn.key is not None
        ip, port = conn.remote if conn.remote is not None else (None, 0)
        return f.encode_peer_present(conn.key, ip, port, self._present_flags(conn))

    def _broadcast_present(self, conn: ServerConn) -> None:
        if not self._watchers:
            return
        frame = self._present_frame(conn)
        for w in self._watchers:
            if w is not conn:
                self._queue_ctrl(w, frame)

    def _broadcast_gone(self, key: bytes) -> None:
        if not self._watchers:
            return
        frame = f.encode_peer_gone(key, f.PeerGoneReason.DISCONNECTED)
        for w in self._watchers:
            self._queue_ctrl(w, frame)

    def _add_watcher(self, conn: ServerConn) -> None:
        if conn in self._watchers:
            return
        for key, cs in self._sets.items():
            if cs.active is not None and key != conn.key:
                self._queue_ctrl(conn, self._present_frame(cs.active))
        self._watchers.add(conn)
        conn.watching = True

    # ------------------------------------------------------------------
    # Queues, drops, closing
    # ------------------------------------------------------------------

    def _queue_ctrl(self, conn: ServerConn, frame: bytes) -> None:
        conn._ctrl.append(frame)
        if not conn.wake_pending:
            conn.wake_pending = True
            conn.waker()

    def _drop(self, reason: DropReason, nbytes: int) -> None:
        self._drops[reason] += 1
        self._drop_bytes[reason] += nbytes

    def _transition(self, conn: ServerConn, event: ConnInput) -> None:
        was = conn.state
        nxt = _TRANSITIONS.get((was, event))
        if nxt is None:
            conn.state = ConnState.CLOSED
            raise LocalProtocolError(f"illegal input {event.value} in state {was.value}")
        conn.state = nxt

    def _refuse_protocol(self, conn: ServerConn, reason: str) -> None:
        self._refused_protocol += 1
        self._log(f"derp: {conn!r}: protocol error: {reason}; closing")
        self._close(conn, ConnInput.PROTOCOL_ERROR, reason)

    def _close(self, conn: ServerConn, event: ConnInput, reason: str | None) -> None:
        was = conn.state
        self._transition(conn, event)
        if was is ConnState.CLOSED:
            return
        if conn.close_reason is None:
            conn.close_reason = reason
        self._conns.pop(conn.conn_id, None)
        if conn.preferred:
            self._home -= 1
            conn.preferred = False
        self._watchers.discard(conn)
        if was is ConnState.ACTIVE:
            self._unregister(conn)
        for src in conn.saw_src:
            ws = self._peer_gone_watchers.get(src)
            if ws is not None:
                ws.discard(conn)
                if not ws:
                    del self._peer_gone_watchers[src]
        conn.saw_src.clear()
        for q in (conn._disco, conn._data):
            for frame in q:
                self._drop(DropReason.GONE_DISCONNECTED, len(frame) - f.FRAME_HEADER_LEN - KEY_LEN)
            q.clear()
        conn._ctrl.clear()
        conn.waker()
