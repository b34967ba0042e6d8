"""Tailnet policy engine: HuJSON policy in, per-node packet filters out.

Pipeline (each stage its own module, all pure and deterministic):

1. :func:`parse_policy` (``parse.py``, ``syntax.py``, ``hujson.py``) -- text
   to a typed :class:`Policy`; syntax errors carry line and column.
2. :func:`check_policy` (``validate.py``, ``tests_runner.py``) -- dangling
   references, misplaced autogroups, domain checks, then the policy's own
   ``tests`` and ``sshTests`` against the tailnet.
3. :func:`compile_policy` (``compile.py``) -- grants resolved to rules over
   addresses, once per policy and tailnet; :meth:`CompiledPolicy.with_node`
   and :meth:`CompiledPolicy.without_node` update incrementally.
4. Per node (``filter.py``, ``peers.py``, ``routes.py``, ``ssh.py``,
   ``capmap.py``): :meth:`CompiledPolicy.netmap` gives the packet filter,
   visible peers with routes, SSH policy and capability maps, as Structs
   that encode to tailcfg JSON (``wire.py``).

Semantics follow Tailscale's hosted control plane as captured in the
conformance cases under ``../shared/conformance``.
"""

from __future__ import annotations

from .approvals import auto_approved_routes
from .check import check_policy, check_policy_against
from .document import Policy
from .engine import CompiledPolicy, NodeNetmap, PeerView, compile_policy
from .errors import PolicyError, PolicySyntaxError, PolicyTestFailure, PolicyValidationError
from .model import PolicyNode, PolicyUser, TailnetSettings
from .parse import parse_policy, parse_stored_policy
from .tailnet import Tailnet
from .validate import validate_policy
from .wire import (
    CapGrant,
    FilterRule,
    NetPortRange,
    PortRangeWire,
    SSHAction,
    SSHPolicy,
    SSHPrincipal,
    SSHRuleWire,
)

__all__ = [
    "CapGrant",
    "CompiledPolicy",
    "FilterRule",
    "NetPortRange",
    "NodeNetmap",
    "PeerView",
    "Policy",
    "PolicyError",
    "PolicyNode",
    "PolicySyntaxError",
    "PolicyTestFailure",
    "PolicyUser",
    "PolicyValidationError",
    "PortRangeWire",
    "SSHAction",
    "SSHPolicy",
    "SSHPrincipal",
    "SSHRuleWire",
    "Tailnet",
    "TailnetSettings",
    "auto_approved_routes",
    "check_policy",
    "check_policy_against",
    "compile_policy",
    "parse_policy",
    "parse_stored_policy",
    "validate_policy",
]
