"""Netmaps for many map streams at once: shared peer views per visibility class (pure).

A tailnet of *n* nodes whose streams each keep "what I sent about every peer" holds
n² peer records, and a change that every node must hear about (a node joining an
allow-all tailnet, a policy change) costs n² comparisons. Most nodes, though, see the
world identically: two laptops of the same user, or every node of an allow-all
tailnet, differ only in which of them is "self". This package exploits that, in
three modules that depend on each other in this order:

1. :mod:`.peersets` -- what one class of viewers is shown: immutable
   :class:`~.peersets.PeerSet` versions of shared :class:`~.peersets.Peer` objects,
   linked by a change journal, and the diff between two versions.
2. :mod:`.hub` -- the visibility classes (:func:`~.hub.class_key`) and the
   :class:`~.hub.MapHub`, which folds (state, presence) changes into a new peer set
   per class, and keeps per-node dirtiness and the shared SSH policies.
3. :mod:`.cursor` -- the :class:`~.cursor.StreamCursor`: all one stream keeps (the
   peer set it last sent and a few digests), and the messages that bring its client
   to the hub's state.

Everything here is values (wire nodes, diffs, ``MapResponse`` structs); the transport
(``protocol.mapwire``) turns them into bytes, encoding and framing each value that
many streams share once, keyed by identities these modules keep stable for it. The
live server drives a hub from ``protocol.control.streams``; :func:`projections.netmap.full_map`
is the per-node reference the tests compare every stream against.

Nothing here reads a clock or does I/O: time and state are arguments.
"""
