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

**What an idle node costs here** (``tailledger bench hub --memory``, corp at 5,000
nodes: 520 classes, 416 peers per node on average). Nothing per node grows with its
peers: a stream keeps a cursor (a peer-set reference and three digests), the
compiled policy its packet filter (reduced rules that share the merged rules'
entries), and a node is one shared :class:`~.peersets.Peer` (its wire node, and its
JSON in the transport). What grows with the peers is per peer set, and classes that
see the same peers share one (520 classes, 41 peer sets): the set's map, its diffs,
and the transport's full-map pieces with their compressed frames. The compiled
policy's per-class folds (an address set and a peer-id set each, about as large as
the class's peers) are dropped once a rebuild has read them, and the shared update
messages of a change once every stream has sent them.

Nothing here reads a clock or does I/O: time and state are arguments.
"""
