"""The control logic behind the tunnel: ``/machine/register`` and ``/machine/map``.

This package is the :class:`~protocol.handler.ControlHandler` the transport calls for
every request inside a Noise tunnel. It decides registrations against the current
projection and appends what happened to the log (with the node, identified by its
machine key, or the approving admin as the actor); it serves map long-polls from the
projection and the presence table, and it never changes state any other way.

Modules, in the order a request meets them:

* :mod:`.dispatch` -- :class:`Control`: routes a request, composes the parts below,
  runs their background duties.
* :mod:`.messages` -- request decoding and the answers (JSON and HTTP errors).
* :mod:`.registration` -- which registration decision applies (logout, restart,
  follow-up, auth key, interactive), and admin approval.
* :mod:`.hostinfo` -- every Hostinfo passes one gate: ignored, refused, rate-limited,
  kept in the presence table, recorded in the log.
* :mod:`.decisions` -- decisions of :mod:`projections.commands` become one transaction.
* :mod:`.streams` -- map streams and their fan-out: the hub driver, wake groups,
  parking, keep-alive ticker, full-map turns.
* :mod:`.settings` -- :class:`ControlSettings`, :class:`ControlLimits`,
  :class:`ControlStats`.

**One registration, from the socket to every peer's stream** (a node logging in with
an auth key; each step calls the next):

1. ``protocol.serve`` accepts the connection and terminates the Noise tunnel and
   HTTP/2; ``NoiseSession._serve_request`` (:mod:`protocol.serve.session`) calls
   :meth:`Control.__call__ <protocol.control.dispatch.Control.__call__>` with a
   :class:`~protocol.handler.NoiseRequest`;
2. :meth:`Registration.handle <protocol.control.registration.Registration.handle>`:
   :func:`~protocol.control.messages.decode_keyed`, then
   :meth:`HostinfoGate.check <protocol.control.hostinfo.HostinfoGate.check>`;
3. ``Registration._decide`` (Headscale's order) picks step 4:
   ``Registration._register_with_key``, whose decision is
   :func:`projections.commands.decide_login_with_key`;
4. :meth:`Decisions.append <protocol.control.decisions.Decisions.append>` ->
   :meth:`Tailnet.execute <projections.service.Tailnet.execute>` ->
   ``Tailnet._attempt``: the decision against the current state, the log append
   (:meth:`EventLog.append <eventlog.log.EventLog.append>`), then the wait until the
   runner folded it (``ProjectionRunner._apply``, which offers the change to every
   subscription: ``Subscription._offer``); the answer goes back to the client;
5. the map streams' subscription calls ``MapStreams._on_log_change``, which wakes
   ``MapStreams._drive_hub``: after ``coalesce`` seconds ``MapStreams._publish``
   advances the hub (:meth:`MapHub.advance <projections.mapviews.hub.MapHub.advance>`:
   new peer sets) and ``MapStreams._wake_streams`` resumes the parked streams group by
   group (``MapStreams._wake_group`` calls each transport's ``resume``, which is
   ``NoiseSession._resume``: a new task drives the stream again, ``NoiseSession._drive``);
6. each peer's :meth:`MapStreams.stream <protocol.control.streams.MapStreams.stream>`
   goes on after its ``yield Park``: :meth:`StreamCursor.update
   <projections.mapviews.cursor.StreamCursor.update>` gives the new node as a delta,
   encoded and framed once for all streams (:meth:`MapWire.frame
   <protocol.mapwire.MapWire.frame>`), and the transport sends it.

What a node can make the server keep or write is bounded (:class:`ControlLimits`), and
every refusal is counted in :class:`ControlStats`. Every lookup by node key checks the
Noise peer's machine key (pitfall 9).
"""

from .dispatch import Control
from .messages import MIN_CAPABILITY_VERSION
from .settings import ControlLimits, ControlSettings, ControlStats

__all__ = ["MIN_CAPABILITY_VERSION", "Control", "ControlLimits", "ControlSettings", "ControlStats"]
