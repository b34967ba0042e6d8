"""Benchmarks and the load generator: programs that print figures, never assertions.

Every module here measures the rest of the tree from the outside and changes nothing
in it; none of the library packages imports this one.

=================  ===========================================================
``tailledger``     module
=================  ===========================================================
``bench log``      :mod:`cli.bench.log`: event-log appends against plain inserts
``bench policy``   :mod:`cli.bench.policy`: full and incremental policy compiles
``bench relay``    :mod:`cli.bench.relay`: the DERP relay against a plain forwarder
``bench replay``   :mod:`cli.bench.replay`: the replay tool on a long synthetic log
``bench api``      :mod:`cli.bench.api`: the admin API's device list under load
``bench            :mod:`cli.bench.conn_memory`: server memory per idle connection,
conn-memory``      by allocation site
``bench hub``      :mod:`cli.bench.hub`: CPU of one change across every stream, in
                   process (the map hub and stream cursors, no network)
``loadgen``        :mod:`cli.bench.loadgen`: N simulated clients over the real
                   protocol (propagation latency, CPU, memory, reconnects)
=================  ===========================================================

:mod:`cli.bench.scenarios` holds the seeded tailnet shapes (``flat``, ``corp``) that the
load generator, ``bench hub`` and the correctness tests share, and
:class:`~cli.bench.scenarios.BenchLog`, the throw-away log the in-process benchmarks
decide a tailnet into.
"""
