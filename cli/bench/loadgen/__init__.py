"""``tailledger loadgen``: simulated tailscale clients over the real protocol.

Starts a ``tailledger serve`` process on a scratch data directory and N simulated
clients in this process. Every client speaks the real protocol: ``/key``, the
``/ts2021`` upgrade, Noise, HTTP/2, register with a pre-auth key, and a zstd map
long-poll (``KeepAlive: true``) that it reads for as long as it lives; a bounded
number of "updaters" send endpoint updates (lite map requests) while idle. For each
tailnet size it measures, in phases:

* register: every client connects and registers (no map stream is open yet, so the
            registrations do not fan out to anybody); wall time and server CPU;
* connect:  every client opens its map stream (at most ``--concurrency`` at once)
            until its full map arrived; wall time, server CPU, then server RSS once
            the server is idle again: memory per connected node and the peak (VmHWM);
* join:     one more node registers; how long the register call took, and the time
            until the last stream showed the newcomer (p50, p99) with the server CPU
            spent meanwhile;
* policy:   the policy changes every node's packet filter; time until the last
            stream got its new filter (p50, p99), and server CPU;
* restart:  the server is restarted on the same data; time until every client has
            reconnected (with Tailscale's backoff) and received a full map again.

Register and connect always run; ``--phases`` picks the others. The figures are
benchmarks, printed as a table and written as JSON, never assertions. Long phases
print their progress every 30 s. A memory guard kills the server and ends the run
(``aborted`` in the JSON, exit status 1) before the machine runs out of memory: a
5,000-client reconnect herd once took the server past 19 GiB.

Keeping the load generator cheap
--------------------------------
The clients share two cores with the server, and at 5,000 nodes a full map is
megabytes of JSON, so a load generator that decoded every message would measure
itself. The receive path therefore does the least the measurement needs
(:class:`MapFrameScanner`):

* It splits the stream into ``[u32 LE][zstd]`` frames (``protocol/mapframe.py``)
  and *skips* the payload of any frame nobody will read: no buffering, no zstd, no
  JSON. The bytes are still received, decrypted and acknowledged through HTTP/2
  flow control, so the server sees real back-pressure.
* Keep-alives are recognised by size and bytes (the server sends one constant frame).
* The first other message of a stream is its full map (control-protocol.md §8.5:
  the first non-keep-alive message carries ``Node``); that marks a client "ready"
  without decompressing megabytes.
* Only while a change is being timed (a watch is active) are frames decompressed,
  and then searched for a byte marker (the newcomer's ``nodekey:…`` or
  ``"PacketFilter``) instead of being decoded.
* One sentinel client decodes everything into small msgspec views and counts how
  often its decoded view and the byte search disagree (``marker_mismatches``; must
  be 0) and how many peers its full map listed (``full_map_peers``).

It also reports how busy the load generator itself was in each phase
(``*_loadgen_cpu_pct``, % of one core); near 100 % the phase's figures are upper
bounds, not measurements of the server.

Scenarios
---------
``--scenario`` picks the tailnet (``cli/bench/scenarios.py``): ``flat`` (one user,
allow-all: one visibility class) or ``corp`` (a segmented company tailnet: N/10 users
in 20 teams, 10 % tagged servers over 20 tags registered with tagged keys, 166 rules,
2 app grants, 22 SSH rules with ``check`` mode; its policy change widens a port range
in 70 rules). The receivers of a change are computed with the policy engine on the
same users, tags and policies before the run: the join waits only for the nodes that
can see the newcomer, the policy change only for the nodes whose packet filter
changes, and a node that gets a change it should not see is counted in
``*_unexpected`` (reported as a warning; must be 0). The report adds the number of
visibility classes, the average/median/max peers per node and the (compressed) bytes
the clients received per change.

``--scenario churn`` is the corp tailnet under steady background change for
``--duration`` seconds, in place of the join, policy and restart phases: a join or a
delete (alternately) every ``--join-delete-every`` seconds, a tagged node's tag
changes every ``--tag-every`` seconds, and the policy switches between corp's two
texts every ``--policy-every`` seconds (defaults 1, 10, 60; ``--seed`` picks the
nodes). Each change's receivers are computed with the policy engine on the live
tailnet (a join: who sees the newcomer; a delete: who saw the node; a tag change:
who sees it before or after; a policy edit: whose filter changes; the first three
from each policy compiled once on two nodes of every user-and-tags kind, which a
test checks against compiling the live tailnet), and each receiver's latency is
taken from the first update that carries it (the key in ``PeersChanged``, the id in
``PeersRemoved``, a packet filter); a node outside the receivers that gets it counts
in ``churn_unexpected``, a receiver it never reached (within 30 s) in
``churn_missing``. Changes are made one after another and their deliveries overlap,
except a policy edit's (which waits for the others and holds them back until it has
landed: joins and tag changes change filters, too); a node that changes under way
is never one a change under way still waits for. The report gives, per kind of
change, how many were made of the planned number (fewer: the run fell behind, and
says so, with how long the policy edits held the other changes back), latencies p50/p99/max over the receivers, missing and unexpected
receivers, and KiB of the updates that brought it; then the server's CPU (per
change, too) and the load generator's, and the server's RSS sampled every second:
at the start, after the first minute (or half the run, if shorter) and at the end,
with its least-squares slope after that minute (MiB/min).

Targets
-------
Under the table the run's figures are held against the targets of its scenario
(printed, never asserted): issue 19's for ``corp`` (meant for 5,000 nodes), for
``churn`` (5,000 nodes for 10 minutes) and for ``flat`` from 7,500 nodes on (meant
for 10,000), issue 7's for smaller ``flat`` runs (meant for 5,000).

Replicas
--------
``--backend postgres --dsn DSN`` puts the log in an empty PostgreSQL database (one
``--nodes`` size per run); ``--replicas N`` starts N ``tailledger serve`` replicas on
it (their own data directories and ports, one Noise key) and client *i* talks to
replica *i* mod N. The tailnet is set up through the first replica, which the others
have folded before anybody registers. Join and policy are timed at their receivers on
every replica; the ``presence`` phase (only over replicas) has node 0, on the first
replica, report a new endpoint, timed until each of its peers on the other replicas
got it through the shared presence table (its peers on its own replica are not
timed). The restart phase is skipped over replicas.

Worker processes
----------------
``--workers N`` runs the simulated clients in N worker processes (client *i* in
worker *i* mod N; the join phase's newcomer and the orchestration stay here), so that
the load generator is not the bottleneck at thousands of nodes. The workers report
registrations, readiness, hits and strays of the watched change, and their counters
over a pipe; all processes read one clock (``time.monotonic``), so latencies span
them. The ramp limits are split among the workers. On a machine with 3 or more cores
the server is pinned to the first half of them and the load generator with its
workers to the rest (``os.sched_setaffinity``); with fewer, nothing is pinned and the
report says so. Each phase then also reports the workers' CPU (``*_workers_cpu_s``,
``*_workers_cpu_pct``) beside the server's (``*_cpu_s``). With ``churn``, the
workers report who got each change and the parent, which knows its receivers, counts
them. Without ``--workers`` every client runs in this process, as before.

Large runs
----------
Each simulated client holds one connection, and the server one for each client.
The limit on open files is per process, so the load generator raises its soft
limit (which the server and the workers inherit) to the clients plus the churn
phase's newcomers plus a margin, and stops at once, naming the hard limit
(``ulimit -Hn``), when that is too low. It also lifts the server's connection cap
(``limits.max_connections``, 10,000 by default, which would refuse the newcomer of
a 10,000-node run) to the same count. Phase timeouts grow with N (``--timeout-scale``
multiplies them). From a few thousand nodes on, give the clients worker processes
(``--workers 2``): one process decrypting every stream becomes the bottleneck, and
the report warns when the load generator was more than 90 % busy in a phase.
"""

# The modules, in the order a run goes through them (the docstring above is also
# ``tailledger loadgen --help``):
#
#   main.py     the command line: options, one run per size, the printed report
#   options.py  LoadgenOptions, PHASES, CHURN_KINDS, the Results record
#   phases.py   measure(): set the tailnet up, register, connect, join, policy, restart
#   churn.py    the churn phase of --scenario churn
#   server.py   the `tailledger serve` child, its CPU and memory from /proc, the guard
#   client.py   the simulated clients and the hub they share
#   scanner.py  the sans-I/O receive path (frames read only when wanted)
#   workers.py  --workers: the clients in several processes
#   report.py   quantiles, the table, targets and warnings
#
# Scenarios (the tailnets' shapes) are in cli/bench/scenarios.py.
