"""What the relay's trio adapter is told: the listener, TLS, STUN, mesh and limit settings.

Theory of operation
-------------------
:class:`RelayConfig` is a frozen record, built once by the CLI glue from the
configuration file (or by a test) and read by every other module of
:mod:`relay.serve`; nothing changes it while the relay runs.  It holds plain
values only: the limits it carries are checked by the sans-I/O core when
:func:`relay.serve.serve_relay` builds it (an out-of-range value becomes a
:class:`relay.errors.ConfigError` there), and the key and certificate files it
names are read by :mod:`relay.serve.identity`.

:class:`MeshPeer` names one other relay of the same region; the mesh links of
:mod:`relay.serve.mesh` dial it.

This module does no I/O and imports no trio.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from ..derp import frames as f
from ..derp.server import DEFAULT_QUEUE_DEPTH
from ..stun import DEFAULT_STUN_PORT

__all__ = ["MeshPeer", "RelayConfig"]


class MeshPeer(msgspec.Struct, frozen=True, kw_only=True):
    """Another relay of the same region to mesh with.

    Attributes:
        url: its DERP URL, ``https://host:port/derp`` (or ``http://`` behind a proxy).
        cert_name: ``sha256-raw:<hex>`` pin when it uses a self-signed certificate.
        dial_host: address to connect to instead of the URL's host (e.g. a
            private VPC address), as ``derper --mesh-with host/dialhost`` does.
    """

    url: str
    cert_name: str | None = None
    dial_host: str | None = None


class RelayConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Everything :func:`serve_relay` needs.

    Attributes:
        data_dir: where the server key and the self-signed certificate live.
        listen_host: address for the DERP/HTTP(S) listener; ``None`` = all.
        listen_port: its port (443 in production; 0 picks a free one); ``None``: no
            listener of its own, connections are handed over by another server
            (:meth:`RelayServer.serve_handed_off`, the control port's ``/derp``).
        tls: ``"self-signed"`` (generated on first start, pinned via CertName),
            ``"files"`` (``cert_file`` + ``key_file``), or ``"off"`` (plain
            HTTP, for running behind a TLS-terminating proxy).
        cert_file: PEM certificate (leaf first, then chain) for ``tls="files"``.
        key_file: its PEM private key.
        hostnames: names and IP literals clients use to reach the relay; the
            self-signed certificate covers them and the first one becomes the
            DERP node's ``HostName``.
        stun: run the STUN server.
        stun_host: STUN bind address; ``None`` = all IPv4 and IPv6 addresses.
        stun_port: STUN UDP port (3478; 0 picks a free one).
        stun_required: a STUN port that cannot be bound stops the relay; when false
            the relay runs without STUN (a warning), for a default port that is taken.
        private_key: ``privkey:<hex>`` to use instead of the key file.
        mesh_key: the region's mesh key (64 hex digits); enables meshing.
        mesh_with: the other relays of the region.
        queue_depth: per-client packet queue bound.
        dup_policy: what to do when a node key is connected twice (see
            :class:`relay.derp.server.DupPolicy`).
        rate_limit: bytes per second one node key may send through the relay
            (SendPacket frames); 0 = unlimited.  Excess packets are dropped as
            ``rate_limited``.
        rate_burst: the rate bucket's size in bytes (at least one maximum-size
            frame, :data:`relay.derp.server.MIN_RATE_BURST`).
        max_conns_per_key: concurrent connections one node key may hold; 0 =
            unlimited.
        key_limit_policy: ``"close_oldest"`` (a newcomer beyond the cap closes
            the key's oldest connection) or ``"refuse_new"`` (it is refused);
            see :class:`relay.derp.server.KeyLimitPolicy`.
        write_timeout: seconds a write to one client may take before that client
            is disconnected; ``None`` disables it.
        handshake_timeout: seconds allowed for TLS + HTTP + DERP login.
        keepalive_interval: seconds between keep-alives (plus up to 5 s jitter).
        websocket: accept DERP over WebSocket.
        meta_cert: present the meta certificate that enables fast start.
        mesh_retry: seconds between mesh reconnection attempts.
    """

    data_dir: str
    listen_host: str | None = None
    listen_port: int | None = 443
    tls: Literal["self-signed", "files", "off"] = "self-signed"
    cert_file: str | None = None
    key_file: str | None = None
    hostnames: tuple[str, ...] = ()
    stun: bool = True
    stun_host: str | None = None
    stun_port: int = DEFAULT_STUN_PORT
    stun_required: bool = True
    private_key: str | None = None
    mesh_key: str | None = None
    mesh_with: tuple[MeshPeer, ...] = ()
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    dup_policy: Literal["last_writer_is_active", "disable_fighters"] = "last_writer_is_active"
    rate_limit: int = 0
    rate_burst: int = 0
    max_conns_per_key: int = 0
    key_limit_policy: Literal["close_oldest", "refuse_new"] = "close_oldest"
    write_timeout: float | None = 2.0
    handshake_timeout: float = 10.0
    keepalive_interval: float = f.KEEPALIVE_INTERVAL
    websocket: bool = True
    meta_cert: bool = True
    mesh_retry: float = 2.0
