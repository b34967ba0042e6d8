"""The interface between the Noise/HTTP2 transport and the control logic.

Role in the pipeline: :func:`protocol.serve.serve_control` terminates the
ts2021 upgrade, the Noise handshake and HTTP/2, and calls one
:class:`ControlHandler` per HTTP/2 request that arrives inside the tunnel. The
handler (``protocol/control/``: register, map, ...) sees only
:class:`NoiseRequest` values and returns :class:`NoiseResponse` values; it
never touches sockets, records or frames.

Contract for handlers:

* Route on ``request.path`` only. ``:authority`` inside the tunnel is the
  control host or the literal ``unused`` (docs/control-protocol.md §1, pitfall 22).
* ``request.machine_key`` is the Noise peer's static key, authenticated by the
  handshake. Every lookup by NodeKey must check it (pitfall 9).
* A handler may block as long as it likes (``Followup`` register long-polls,
  map streams). When the client resets the HTTP/2 stream or the connection
  dies, the task running the handler is **cancelled**. For a streaming
  response: if the iterator is parked at ``yield`` (e.g. waiting for flow
  control) it is closed with ``aclose()`` (it sees ``GeneratorExit``); if it
  is inside an ``await`` it sees ``trio.Cancelled`` there. Either way its
  ``finally`` blocks run; cleanup that must ``await`` there has to shield
  itself (``with trio.CancelScope(shield=True):``), as usual in trio.
* A streaming response that has nothing to send for a while yields a
  :class:`Park` instead of blocking: the transport ends the task that drove it
  and keeps only the suspended iterator, until the stream's owner calls the
  ``resume`` it was handed. An idle long poll then costs no task.
* An exception escaping the handler is logged and answered with a 500 (if the
  headers were not sent yet) or a stream reset; the connection survives.
* Never answer a failed map poll with an empty 200 (pitfall 5): return an
  explicit error status.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["ControlHandler", "NoiseRequest", "NoiseResponse", "Park"]

Headers = tuple[tuple[str, str], ...]


class Park:
    """Yielded by a long-poll stream that has nothing to send for now.

    The transport then calls :meth:`register` once with a ``resume`` callable and
    lets the task that drove the stream end, keeping only the suspended iterator.
    Calling ``resume()`` (at most once; it does nothing if the stream ended
    meanwhile) makes the transport drive the stream again from a new task: the
    ``yield`` returns and the stream goes on.

    ``register`` hands the park itself and ``resume`` to ``owner``, the stream's
    owner, which decides where ``resume`` waits; what the owner needs to know about
    this wait travels in the park (the transport reads none of it; an owner may
    subclass it to carry more). A new park is yielded for each wait.

    A transport that can write without a task may also hand over ``send_now``: it
    sends bytes on the parked stream at once, as if the stream had yielded them, and
    the stream stays parked. It does so only when that needs no wait (nobody else
    writing, flow-control window open) and returns ``False`` otherwise, having sent
    nothing; it is for small frames such as keep-alives and the updates of a
    publication, which then cost no task and no resumption of the stream.

    Attributes:
        due: when (trio's clock) the stream wants to run again even if nothing
            happens, e.g. its keep-alive falls due; ``math.inf``: only when woken.
        resume: the transport's ``resume``, once registered.
        send_now: the transport's ``send_now``, if it has one (see above).
    """

    __slots__ = ("_owner", "due", "resume", "send_now")

    def __init__(self, owner: Callable[[Park, Callable[[], None]], None], due: float = math.inf) -> None:
        self._owner = owner
        self.due = due
        self.resume: Callable[[], None] | None = None
        self.send_now: Callable[[bytes], bool] | None = None

    def register(self, resume: Callable[[], None], send_now: Callable[[bytes], bool] | None = None) -> None:
        """Hand the stream's ``resume`` (and ``send_now``, if the transport has one)
        to its owner (the transport calls it once)."""
        self.resume = resume
        self.send_now = send_now
        self._owner(self, resume)


@dataclass(frozen=True, slots=True)
class NoiseRequest:
    """One complete HTTP/2 request received inside the Noise tunnel.

    Attributes:
        machine_key: The client's machine public key (32 raw bytes), as
            proven in the Noise handshake.
        method: ``"POST"``, ``"GET"``, ``"PATCH"`` ... (upper case, as sent).
        path: The ``:path`` pseudo-header, query string included.
        headers: Regular headers, names lower-case (HTTP/2 requires it),
            pseudo-headers removed; values decoded as Latin-1.
        body: The full request body (capped by the server, 1 MiB by default).
        protocol_version: The client's capability version from the Noise
            header (130 for v1.90); the JSON bodies carry it too.
        cancel: Ends this request's response from the handler's side (e.g. a
            long poll superseded by a newer one): the transport cancels the
            task serving it (or closes its parked iterator) and resets the
            stream with ``CANCEL``. Does nothing once the stream ended;
            ``None`` when the transport offers no such thing.
        remote_addr: The client's IP address as the server's socket saw it
            (empty when unknown); limits per source address count by it.
    """

    machine_key: bytes
    method: str
    path: str
    headers: Headers
    body: bytes
    protocol_version: int = 0
    cancel: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    remote_addr: str = ""

    def header(self, name: str) -> str | None:
        """Return the first value of header ``name`` (case-insensitive), if any."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class NoiseResponse:
    """The handler's answer.

    Exactly one of ``body`` and ``stream`` is normally set (both ``None``
    means an empty body). ``content-length`` is added for ``body`` responses
    when absent.

    Attributes:
        status: HTTP status code.
        headers: Extra response headers; names are lower-cased on the wire.
            Connection-specific headers (``connection``, ``transfer-encoding``
            ...) are illegal in HTTP/2 and are dropped with a log line.
        body: A complete body, sent respecting HTTP/2 flow control.
        stream: A long-poll body. Each yielded chunk is sent as DATA as soon
            as flow control allows (for ``/machine/map``: one framed message
            per chunk, see :func:`protocol.mapframe.frame_map_response`). The
            stream ends when the iterator is exhausted. If the client resets
            the stream or disconnects, the iterator is closed (``aclose()``)
            and the task is cancelled. It may yield :class:`Park` to wait
            without a task.
    """

    status: int
    headers: Headers = ()
    body: bytes | None = None
    stream: AsyncIterator[bytes | Park] | None = field(default=None, compare=False)


class ControlHandler(Protocol):
    """What :func:`protocol.serve.serve_control` calls for every tunnel request."""

    async def __call__(self, request: NoiseRequest, /) -> NoiseResponse:
        """Answer ``request``; see the module docstring for the contract.

        Cancellation: the call is cancelled when the client resets the
        stream or the connection closes; clean up in ``finally`` blocks.
        """
        ...
