"""Projections: pure folds of the event log into the tailnet's current state.

``fold.apply(state, event) -> (state, delta)`` is the heart; ``commands`` decides new
events against a state; ``runner`` keeps the state current by tailing the log;
``service.Tailnet`` runs commands; ``checkpoint`` saves folded states; ``ipam``
allocates addresses; ``netmap`` builds one node's map; ``presence`` holds the
fast-changing facts kept beside the log; ``tailcfg`` has the wire types of the netmaps
these projections produce and ``derpmap`` the DERP map. Subpackages: ``policy`` (the
policy engine), ``mapviews`` (peer views shared by the map streams of nodes that see
the tailnet alike) and ``replay`` (answers about the past, from the log alone).

Layering: imports ``eventlog`` only; ``protocol``, ``relay`` and ``cli`` import this.
"""

from .checkpoint import SNAPSHOT_SCHEMA, CheckpointStore, decode_state, encode_state
from .commands import AddressPlan, Decision
from .delta import EMPTY, Delta
from .errors import (
    CheckpointError,
    CommandError,
    ConflictError,
    NotFoundError,
    ProjectionError,
    UnavailableError,
)
from .fold import apply, fold
from .ipam import DEFAULT_V4, DEFAULT_V6, AllocationMode, allocate
from .runner import ProjectionRunner, Subscription
from .service import Tailnet
from .state import ApiKey, Node, PreAuthKey, TailnetState, User, rebuild_indexes

__all__ = [
    "DEFAULT_V4",
    "DEFAULT_V6",
    "EMPTY",
    "SNAPSHOT_SCHEMA",
    "AddressPlan",
    "AllocationMode",
    "ApiKey",
    "CheckpointError",
    "CheckpointStore",
    "CommandError",
    "ConflictError",
    "Decision",
    "Delta",
    "Node",
    "NotFoundError",
    "PreAuthKey",
    "ProjectionError",
    "ProjectionRunner",
    "Subscription",
    "Tailnet",
    "TailnetState",
    "UnavailableError",
    "User",
    "allocate",
    "apply",
    "decode_state",
    "encode_state",
    "fold",
    "rebuild_indexes",
]
