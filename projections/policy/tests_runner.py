"""Run a policy's own ``tests`` and ``sshTests`` blocks.

Role in the pipeline: last step of :func:`projections.policy.check_policy`.
Tailscale rejects a policy whose assertions fail with the single message
``test(s) failed``; :class:`~projections.policy.errors.PolicyTestFailure`
carries that message plus one line of detail per failed assertion.

``tests`` (network reachability). Each entry names one ``src`` alias and
``accept``/``deny`` lists of ``host:port`` destinations. An entry fails when:

* it is malformed: no ``src``, neither ``accept`` nor ``deny``, a
  destination that is not one host and one port (ranges, lists, ``*``,
  CIDRs and CIDR host aliases are refused), ``autogroup:internet``, or an
  IPv6 address without brackets (``fd7a::1:22``; ``[fd7a::1]:22`` is the
  address form, as in URLs -- the same reason a bare IPv6 ``sshTests``
  destination names no node);
* ``src`` or a destination resolves to no address;
* for ``accept``: some source address cannot reach the destination; for
  ``deny``: some source address can.

Reachability is decided on the compiled (unreduced) rules: a rule matches
when its ``SrcIPs`` contain the source address, its protocol set intersects
the test's (empty ``proto`` means TCP, UDP, ICMP and ICMPv6), and one
``DstPorts`` entry overlaps the destination and covers the port.

``sshTests`` (SSH login). Each entry names a ``src``, destination hosts and
``accept``/``deny``/``check`` user lists; every user is evaluated on every
destination node's compiled SSH policy for every source address, exactly as
the client would (first match, principal by address, ``sshUsers`` map).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .document import Alias, AliasKind, Policy, PolicyTest, SSHTest
from .engine import CompiledPolicy, compile_policy
from .errors import PolicyTestFailure
from .ipset import IPSet, Prefix, format_addr, parse_prefix
from .resolve import Resolved, Resolver
from .rules import Rule
from .ssh import compile_ssh_policy
from .syntax import SyntaxProblem, parse_alias, parse_ports, parse_protocol, split_host_port
from .tailnet import NodeInfo, Tailnet
from .wire import SSHPolicy

__all__ = ["run_ssh_tests", "run_tests"]

#: Protocols a test without ``proto`` exercises.
_DEFAULT_PROTOCOLS: Final = (6, 17, 1, 58)


class _Broken(Exception):
    """A test entry cannot be evaluated; the text says why."""


def run_tests(policy: Policy, tailnet: Tailnet) -> None:
    """Evaluate the ``tests`` block.

    Raises:
        PolicyTestFailure: when any entry fails (message ``test(s) failed``).
    """
    if not policy.tests:
        return
    compiled = compile_policy(policy, tailnet)
    rules = _all_rules(compiled)
    failures: list[str] = []
    for test in policy.tests:
        failures.extend(_run_test(test, compiled.resolver, rules))
    if failures:
        raise PolicyTestFailure(tuple(failures), *_where(policy, policy.tests[0].path))


def _where(policy: Policy, path: tuple[str | int, ...]) -> tuple[int | None, int | None]:
    """Line and column of ``path`` in the policy text, when known."""
    hit = policy.source.value(path) if policy.source is not None else None
    return hit if hit is not None else (None, None)


def _all_rules(compiled: CompiledPolicy) -> list[Rule]:
    """Global rules plus every node's self/via expansions."""
    rules = list(compiled.global_rules)
    if compiled.per_node:
        for node_id in compiled.tailnet.nodes:
            rules.extend(compiled.unreduced_rules(node_id))
    return rules


def _run_test(test: PolicyTest, resolver: Resolver, rules: Sequence[Rule]) -> list[str]:
    """Evaluate one ``tests`` entry; returns one line per failure (empty: passed)."""
    label = test.src or "<missing src>"
    if test.src is None or not test.src.strip():
        return [f"{label}: test has no src"]
    if not test.accept and not test.deny:
        return [f'{label}: test must have at least one of "accept" or "deny"']
    try:
        protocols = parse_protocol(test.proto) or _DEFAULT_PROTOCOLS
        if protocols[0] not in (6, 17, 132):
            raise _Broken(f'test protocol must be tcp, udp, sctp, or empty, got "{test.proto}"')
        src_alias = parse_alias(test.src)
        src = _resolve_source(src_alias, resolver)
    except (SyntaxProblem, _Broken) as exc:
        return [f"{label}: {exc}"]
    if not src.addresses:
        return [f"{label}: source resolved to no addresses"]
    src_users = resolver.tailnet.user_ids_for_alias(src_alias, resolver.groups)
    failures: list[str] = []
    for want, dsts in ((True, test.accept), (False, test.deny)):
        for dst in dsts:
            try:
                allowed = _reachable(src, dst, protocols, resolver, rules, src_users)
            except (SyntaxProblem, _Broken) as exc:
                failures.append(f"{label} -> {dst}: {exc}")
                continue
            if allowed != want:
                verdict = "expected ALLOWED, got DENIED" if want else "expected DENIED, got ALLOWED"
                failures.append(f"{label} -> {dst}: {verdict}")
    return failures


def _resolve_source(alias: Alias, resolver: Resolver) -> Resolved:
    """Resolve a test's ``src`` (``autogroup:self`` has no meaning there)."""
    if alias.text == "autogroup:self":
        raise _Broken('"autogroup:self" is not a valid test source')
    return resolver.resolve(alias)


def _reachable(
    src: Resolved,
    dst: str,
    protocols: tuple[int, ...],
    resolver: Resolver,
    rules: Sequence[Rule],
    src_users: set[int],
) -> bool:
    """Whether every source address (or CIDR) reaches ``dst`` on its port."""
    tailnet = resolver.tailnet
    host, port_text = split_host_port(dst)
    if not dst.strip().startswith("[") and _is_ipv6_literal(host):
        raise _Broken(f'IPv6 address needs brackets: "[{host}]:{port_text}"')
    ports = parse_ports(port_text)
    if len(ports) != 1 or ports[0].first != ports[0].last:
        raise _Broken("test destination port must be a single port")
    port = ports[0].first
    alias = parse_alias(host)
    if alias.text == "autogroup:internet":
        raise _Broken("autogroup:internet not valid as a test destination")
    if alias.kind is AliasKind.PREFIX and "/" in host:
        raise _Broken("test destination must be a single host, not a CIDR range")
    if alias.kind is AliasKind.HOST:
        target = resolver.hosts.get(alias.text)
        if target is not None and not parse_prefix(target).is_single():
            raise _Broken("test destination must be a single host, not a CIDR range")
    if alias.text == "autogroup:self":
        ids = {i for uid in src_users for i in tailnet.node_ids_of_user(uid)}
        targets = tailnet.addresses_of(ids)
    else:
        targets = resolver.addresses(alias)
    if not targets:
        raise _Broken("destination resolved to no addresses")
    return all(_one_reaches(p, targets, port, protocols, rules) for p in src.prefixes())


def _is_ipv6_literal(host: str) -> bool:
    """Whether ``host`` is an IPv6 address or prefix (it has colons; aliases do not)."""
    if ":" not in host or host.startswith(("tag:", "group:", "autogroup:", "user:")):
        return False
    try:
        return not parse_prefix(host).v4
    except ValueError:
        return False


def _one_reaches(
    src: Prefix, targets: IPSet, port: int, protocols: tuple[int, ...], rules: Sequence[Rule]
) -> bool:
    """Whether one source block may reach ``targets`` on ``port``."""
    for rule in rules:
        if rule.caps or not rule.src_set.overlaps_prefix(src):
            continue
        if rule.protocols and not set(rule.protocols) & set(protocols):
            continue
        for entry in rule.dst:
            if entry.first <= port <= entry.last and entry.addresses.overlaps(targets):
                return True
    return False


# ---------------------------------------------------------------------------
# sshTests


def run_ssh_tests(policy: Policy, tailnet: Tailnet) -> None:
    """Evaluate the ``sshTests`` block.

    Raises:
        PolicyTestFailure: when any entry fails.
    """
    if not policy.ssh_tests:
        return
    cache: dict[int, SSHPolicy | None] = {}
    resolver = Resolver(policy, tailnet)
    failures: list[str] = []
    for test in policy.ssh_tests:
        failures.extend(_run_ssh_test(test, resolver, cache))
    if failures:
        raise PolicyTestFailure(tuple(failures), *_where(policy, policy.ssh_tests[0].path))


def _run_ssh_test(
    test: SSHTest, resolver: Resolver, cache: dict[int, SSHPolicy | None]
) -> list[str]:
    """Evaluate one ``sshTests`` entry; returns one line per failure.

    ``accept``: every source address logs in as the user on every
    destination (through an accept or a check rule); ``deny``: no source
    address does; ``check``: every one does through a check rule.
    """
    tailnet = resolver.tailnet
    label = test.src or "<missing src>"
    if test.src is None or not test.src.strip():
        return [f"{label}: sshTests entry must have a non-empty src"]
    if not test.dst:
        return [f"{label}: sshTests entry must have at least one dst"]
    if not (test.accept or test.deny or test.check):
        return [f"{label}: no accept, deny, or check assertions specified"]
    try:
        src_alias = parse_alias(test.src)
        src = _resolve_source(src_alias, resolver)
        dst_nodes = _ssh_destinations(test, resolver, src_alias)
    except (SyntaxProblem, _Broken) as exc:
        return [f"{label}: {exc}"]
    # Principals are node addresses: a CIDR source stands for its nodes.
    addrs = (
        list(src.hosts)
        if src.hosts is not None
        else [a for n in tailnet.nodes_in(src.addresses) for a in n.addrs]
    )
    if not addrs:
        return [f"{label}: source resolved to no addresses"]
    failures: list[str] = []
    for node in dst_nodes:
        ssh = cache.get(node.id)
        if node.id not in cache:
            ssh = cache[node.id] = compile_ssh_policy(resolver, node, "")
        for kind, users in (("accept", test.accept), ("deny", test.deny), ("check", test.check)):
            for user in users:
                hits = [_ssh_allows(ssh, addr, user) for addr in addrs]
                ok = {
                    "accept": all(a for a, _ in hits),
                    "deny": not any(a for a, _ in hits),
                    "check": all(c for _, c in hits),
                }[kind]
                if not ok:
                    shown = user or '""'
                    failures.append(f"{label}/{shown} -> {node.node.name}: {kind} failed")
    return failures


def _ssh_destinations(test: SSHTest, resolver: Resolver, src: Alias) -> list[NodeInfo]:
    """The nodes an entry's ``dst`` names; a destination naming none fails.

    ``autogroup:self`` means the source user's own devices. A bare IPv6
    literal never names a node upstream (the hosted plane splits
    ``host:port`` at the last colon), while a bare IPv4 one does.
    """
    tailnet = resolver.tailnet
    out: dict[int, NodeInfo] = {}
    src_users = tailnet.user_ids_for_alias(src, resolver.groups)
    for raw in test.dst:
        alias = parse_alias(raw)
        if alias.kind is AliasKind.PREFIX and not parse_prefix(alias.text).v4:
            # The hosted plane splits "host:port" at the last colon, so a bare
            # IPv6 literal never names a host.
            raise _Broken(f'dst "{raw}" resolved to no nodes')
        if alias.text == "autogroup:self":
            matched = [tailnet.nodes[i] for uid in src_users for i in tailnet.node_ids_of_user(uid)]
        else:
            matched = tailnet.nodes_in(resolver.addresses(alias))
        if not matched:
            raise _Broken(f'dst "{raw}" resolved to no nodes')
        for node in matched:
            out.setdefault(node.id, node)
    return list(out.values())


def _ssh_allows(policy: SSHPolicy | None, addr: int, user: str) -> tuple[bool, bool]:
    """(any matching rule, a matching check rule) for one source address."""
    if policy is None or not user:
        return False, False
    ip = format_addr(addr)
    accept = check = False
    for rule in policy.rules:
        if not any(p.node_ip == ip for p in rule.principals):
            continue
        mapped = rule.ssh_users.get(user)
        if mapped is None and user != "root":
            mapped = rule.ssh_users.get("*")
        if not mapped:
            continue
        accept = True
        if rule.action.hold_and_delegate:
            check = True
    return accept, check
