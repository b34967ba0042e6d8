"""What one load-generator run is asked to do, and the shape of what it returns.

:class:`LoadgenOptions` is the command line's options as one frozen record
(:mod:`cli.bench.loadgen.main` builds it), :data:`PHASES` the phases ``--phases`` may
name, :data:`CHURN_KINDS` the kinds of change of the churn phase, and
:data:`Results` the flat dictionary of figures one tailnet size produces (written
as JSON; :mod:`cli.bench.loadgen.report` prints it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = ["BACKENDS", "CHURN_KINDS", "PHASES", "LoadgenOptions", "Results"]


#: Phases ``--phases`` may name; ``register`` and ``connect`` always run.
#: ``presence`` runs only with ``--replicas`` (more than one), ``restart`` only without.
PHASES: Final = ("join", "presence", "policy", "restart")
#: The stores ``--backend`` may name.
BACKENDS: Final = ("sqlite", "postgres")
#: The kinds of change of the churn phase, in the order the report lists them.
CHURN_KINDS: Final = ("join", "delete", "tag", "policy")


@dataclass(frozen=True)
class LoadgenOptions:
    """How to run one measurement (see ``tailledger loadgen --help``).

    Attributes:
        phases: which of :data:`PHASES` to run after register and connect.
        updaters: clients that send lite endpoint updates; ``None`` = min(N/10, 20).
        update_interval: each updater waits uniformly this long between updates (s).
        concurrency: stream openings in flight at once during the ramp (the
            reconnect after a restart is not limited, like real clients).
        register_concurrency: registrations in flight at once (split among the
            workers). The log's writer commits concurrent appends together and a
            registration that lost a sequence race retries once under the tailnet's
            lock, so a wider window costs the server no extra CPU; with 4 (2 per
            worker) each registration's handshake and round trips left it idle.
        timeout_scale: multiplies every phase timeout (they grow with N).
        max_server_rss: bytes of server RSS at which the run is aborted (0: only
            the machine-wide guard, see ``memory_guard``).
        scenario: the tailnet's shape, a name in :data:`cli.bench.scenarios.SCENARIOS`.
        duration: how long the ``churn`` scenario's churn phase runs (s).
        join_delete_every, tag_every, policy_every: the churn phase's rates: a join
            or a delete (alternately), a tag change, a policy edit every so many
            seconds (0 = never).
        seed: seeds the churn phase's choices.
        workers: run the simulated clients in this many worker processes (0: in
            this process, as always).
        backend: the log's store, ``sqlite`` (each server's own file) or ``postgres``
            (the database of ``dsn``, which must be empty).
        dsn: the PostgreSQL connection string (``backend = "postgres"``).
        replicas: ``tailledger serve`` replicas on the one PostgreSQL log; client *i*
            talks to replica *i* mod ``replicas`` (more than one needs postgres).
        server_settings: environment variables (``TAILLEDGER_<SECTION>__<KEY>``,
            value) set for every server over the load generator's own (``--server-setting``).
    """

    phases: frozenset[str] = frozenset(PHASES)
    updaters: int | None = None
    update_interval: tuple[float, float] = (20.0, 40.0)
    concurrency: int = 64
    register_concurrency: int = 16
    timeout_scale: float = 1.0
    max_server_rss: int = 0
    scenario: str = "flat"
    duration: float = 30.0
    join_delete_every: float = 1.0
    tag_every: float = 10.0
    policy_every: float = 60.0
    seed: int = 19
    workers: int = 0
    backend: str = "sqlite"
    dsn: str = ""
    replicas: int = 1
    server_settings: tuple[tuple[str, str], ...] = ()

    def timeout(self, base: float, per_node: float, n: int) -> float:
        return (base + per_node * n) * self.timeout_scale

    def sockets(self, n: int) -> int:
        """The most connections one process holds in a run of ``n`` nodes: the server
        holds one per client, and so does the load generator when the clients run in
        it (its workers hold fewer each). Besides the ``n`` clients: the join phase's
        newcomer, or every newcomer of the churn phase (a join every other
        ``join_delete_every`` seconds, none of them deleted at worst)."""
        joins = 1
        if self.scenario == "churn" and self.join_delete_every > 0:
            joins = math.ceil(self.duration / self.join_delete_every / 2)
        return n + joins


Results = dict[str, object]
