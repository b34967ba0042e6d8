"""Full policy check against a tailnet: validation, domains, tests.

Role in the pipeline: the write boundary. A new policy is accepted only when
:func:`check_policy` returns; the server then compiles it. Steps, in order:

1. :func:`~projections.policy.validate.validate_policy` -- internal
   consistency (needs no tailnet);
2. domain association -- ``user:*@<domain>`` and ``localpart:*@<domain>``
   may only name domains associated with the tailnet (configured, else the
   owner's login domain: see :meth:`Tailnet.domains`);
3. the policy's ``tests`` block, then its ``sshTests`` block, evaluated
   against the tailnet (``tests_runner.py``).
"""

from __future__ import annotations

from collections.abc import Iterable

from .document import AliasKind, Policy
from .errors import PolicyValidationError
from .hujson import JSONPath
from .model import PolicyNode, PolicyUser, TailnetSettings
from .ssh import localpart_domain
from .tailnet import Tailnet
from .tests_runner import run_ssh_tests, run_tests
from .validate import validate_policy

__all__ = ["check_policy", "check_policy_against"]


def check_policy(
    policy: Policy,
    users: Iterable[PolicyUser],
    nodes: Iterable[PolicyNode],
    settings: TailnetSettings | None = None,
) -> None:
    """Validate ``policy`` and run its tests against a tailnet.

    Args:
        policy: output of :func:`projections.policy.parse_policy`.
        users: the tailnet's users.
        nodes: the tailnet's nodes.
        settings: tailnet settings (associated domains).

    Raises:
        PolicyValidationError: the policy is inconsistent.
        PolicyTestFailure: an entry of ``tests`` or ``sshTests`` failed.
    """
    check_policy_against(policy, Tailnet(users, nodes, settings))


def check_policy_against(policy: Policy, tailnet: Tailnet) -> None:
    """:func:`check_policy` for an already built :class:`Tailnet`."""
    validate_policy(policy)
    _check_domains(policy, tailnet)
    run_tests(policy, tailnet)
    run_ssh_tests(policy, tailnet)


def _check_domains(policy: Policy, tailnet: Tailnet) -> None:
    domains = tailnet.domains()

    def fail(domain: str, path: JSONPath) -> PolicyValidationError:
        where = policy.source.value(path) if policy.source is not None else None
        line, column = where if where is not None else (None, None)
        return PolicyValidationError(
            f"{domain} is not associated with this Tailnet and cannot be used in "
            "user:*@<domain> expressions",
            line,
            column,
        )

    for rule in policy.ssh or ():
        for i, user in enumerate(rule.users):
            domain = localpart_domain(user)
            if domain is not None and domain not in domains:
                raise fail(domain, (*rule.path, "users", i))
        for side, aliases in (("src", rule.src), ("dst", rule.dst)):
            for i, alias in enumerate(aliases):
                if alias.kind is AliasKind.USER_DOMAIN and alias.text not in domains:
                    raise fail(alias.text, (*rule.path, side, i))
    for acl in policy.acls or ():
        for i, alias in enumerate(acl.src):
            if alias.kind is AliasKind.USER_DOMAIN and alias.text not in domains:
                raise fail(alias.text, (*acl.path, "src", i))
        for i, dst in enumerate(acl.dst):
            if dst.alias.kind is AliasKind.USER_DOMAIN and dst.alias.text not in domains:
                raise fail(dst.alias.text, (*acl.path, "dst", i))
    for grant in policy.grants or ():
        for side, aliases in (("src", grant.src), ("dst", grant.dst)):
            for i, alias in enumerate(aliases):
                if alias.kind is AliasKind.USER_DOMAIN and alias.text not in domains:
                    raise fail(alias.text, (*grant.path, side, i))
