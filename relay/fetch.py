"""Fetch a DERP map over HTTP(S) (trio adapter for :mod:`projections.derpmap`).

The merge logic is pure and takes bytes (:func:`projections.derpmap.parse_derp_map`);
this is the small piece of I/O that gets those bytes from a URL such as
``https://controlplane.tailscale.com/derpmap/default``.  It is deliberately
minimal: one GET with h11, no redirects, a size cap, a deadline.
"""

from __future__ import annotations

import ssl
import urllib.parse

import h11
import trio

from .errors import RelayError

__all__ = ["DerpMapFetchError", "fetch_derp_map"]

MAX_DERP_MAP_BYTES = 5 << 20


class DerpMapFetchError(RelayError):
    """The DERP map URL could not be fetched (status, size, connection)."""


async def fetch_derp_map(
    url: str,
    *,
    ssl_context: ssl.SSLContext | None = None,
    max_bytes: int = MAX_DERP_MAP_BYTES,
) -> bytes:
    """GET ``url`` and return the body.

    There is no built-in deadline: wrap the call in ``trio.fail_after``.

    Args:
        url: ``http://`` or ``https://`` URL.
        ssl_context: TLS context (default: system CAs).
        max_bytes: refuse bodies larger than this.

    Raises:
        DerpMapFetchError: non-200 status, oversized body, or connection failure.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname is None:
        raise DerpMapFetchError(f"unsupported DERP map URL {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{port}"
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(parts.hostname, port)
    except OSError as exc:
        raise DerpMapFetchError(f"cannot connect to {url}: {exc}") from exc
    try:
        if parts.scheme == "https":
            ctx = ssl_context or ssl.create_default_context()
            stream = trio.SSLStream(stream, ctx, server_hostname=parts.hostname)
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method="GET",
            target=target,
            headers=[
                ("Host", host_header),
                ("Accept", "application/json"),
                ("User-Agent", "tailledger"),
                ("Connection", "close"),
            ],
        )
        await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        body = bytearray()
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(65536)))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise DerpMapFetchError(f"{url}: DERP map larger than {max_bytes} bytes")
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
        if status != 200:
            raise DerpMapFetchError(f"{url}: HTTP status {status}")
        return bytes(body)
    except (OSError, ssl.SSLError, h11.ProtocolError, trio.BrokenResourceError) as exc:
        raise DerpMapFetchError(f"fetching {url} failed: {exc!r}") from exc
    finally:
        await trio.aclose_forcefully(stream)
