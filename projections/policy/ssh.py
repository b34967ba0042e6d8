"""Compile the ``ssh`` section into one node's tailcfg.SSHPolicy.

Role in the pipeline: per-node stage. Only nodes that are SSH destinations
get rules. For each policy rule the node is a destination of, the rule's
sources become principals (one per source address) and ``users`` becomes
the ``sshUsers`` map:

* ``root`` maps to ``root`` when listed, else to ``""`` (explicitly denied);
* ``autogroup:nonroot`` adds ``"*": "="`` (any non-root user, as themselves);
* every other entry maps to itself;
* ``localpart:*@<domain>`` adds, per source user whose login is in that
  domain, a separate rule mapping the login's local part to itself.

Ordering is meaning -- the client takes the first matching rule -- and
follows the hosted control plane (as captured by headscale's
``compileSSHPolicy``): policy order, one rule per source user when
localpart entries are present (users by id, tagged sources last), and
finally every ``check`` rule moved before every ``accept`` rule (stable).

:func:`compile_ssh_policy` is the per-node reference. Serving thousands of streams
uses :class:`SSHTable` instead, which gives the same answer
(``tests/projections/policy/test_ssh_table.py``) at a fraction of the cost:

* each rule's sources are resolved and grouped into principals once per compile
  (:class:`SSHSources`), not once per node per rule;
* a node's answer depends only on an :meth:`SSHTable.key` -- which rules it is a
  destination of, and its owner where ``autogroup:self`` or localpart rules make
  the owner matter -- so nodes with equal keys share one answer;
* each part of a rule's output is a *token* object (the owner's principals, all
  principals of the rule, the localpart map) that the next table reuses when equal,
  so an answer stays valid exactly while the tokens it was built from are the
  same objects (:meth:`SSHTable.deps`). A node joining replaces only the tokens
  of rules whose sources gained its addresses.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Final

from .document import Alias, Policy, SSHRule
from .ipset import IPSet, format_addr
from .resolve import Resolver
from .tailnet import NodeInfo, Tailnet
from .wire import SSHAction, SSHPolicy, SSHPrincipal, SSHRuleWire

__all__ = [
    "CHECK_URL_TEMPLATE", "SSHSources", "SSHTable", "compile_ssh_policy", "holding_check_rule", "localpart_domain",
]

#: Path of the check-mode callback; the client substitutes the variables.
CHECK_URL_TEMPLATE: Final = (
    "/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?local_user=$LOCAL_USER"
)

_ACCEPT: Final = SSHAction(
    accept=True,
    allow_agent_forwarding=True,
    allow_local_port_forwarding=True,
    allow_remote_port_forwarding=True,
)


def localpart_domain(user: str) -> str | None:
    """The domain of a canonical ``localpart:*@<domain>`` entry, else None.

    Non-canonical shapes (``localpart:foo``, ``localpart:*@``) are plain
    literal user names, as the hosted plane treats them.
    """
    if not user.startswith("localpart:"):
        return None
    local, at, domain = user[len("localpart:") :].rpartition("@")
    if not at or local != "*" or not domain:
        return None
    return domain


def compile_ssh_policy(
    resolver: Resolver,
    node: NodeInfo,
    control_url: str,
) -> SSHPolicy | None:
    """Build the SSH policy ``node`` receives.

    Args:
        resolver: the validated policy and the tailnet it is evaluated against.
        node: the destination node.
        control_url: the server's URL, prefix of check-mode callbacks.

    Returns:
        The policy (possibly with no rules), or None when the policy has no
        ``ssh`` section at all.
    """
    if resolver.policy.ssh is None:
        return None
    rules: list[SSHRuleWire] = []
    for rule in resolver.policy.ssh:
        rules.extend(_rules_for(rule, resolver, node, control_url))
    checks = [r for r in rules if r.action.hold_and_delegate]
    accepts = [r for r in rules if not r.action.hold_and_delegate]
    return SSHPolicy(rules=tuple(checks + accepts))


def _rules_for(
    rule: SSHRule,
    resolver: Resolver,
    node: NodeInfo,
    control_url: str,
) -> list[SSHRuleWire]:
    tailnet = resolver.tailnet
    src_ips = resolver.union(rule.src)
    if not src_ips:
        return []
    action = (
        SSHAction(hold_and_delegate=control_url + CHECK_URL_TEMPLATE)
        if rule.action == "check"
        else _ACCEPT
    )
    env = rule.accept_env
    users = _user_map(rule.users)
    localparts = _localparts(rule.users, tailnet)
    user_ids, by_user, tagged = _group_sources(tailnet, src_ips)
    out: list[SSHRuleWire] = []

    def emit(principals: Sequence[SSHPrincipal], uid: int | None) -> None:
        out.append(
            SSHRuleWire(
                principals=tuple(principals), ssh_users=users, action=action, accept_env=env
            )
        )
        if uid is not None and uid in localparts:
            local = localparts[uid]
            out.append(
                SSHRuleWire(
                    principals=tuple(principals),
                    ssh_users={local: local},
                    action=action,
                    accept_env=env,
                )
            )

    self_dst = any(a.text == "autogroup:self" for a in rule.dst)
    others: list[Alias] = [a for a in rule.dst if a.text != "autogroup:self"]
    if self_dst and node.owner is not None and by_user.get(node.owner):
        emit(by_user[node.owner], node.owner)
    if not others:
        return out
    if resolver.union(others).contains_any(node.addrs):
        if localparts:
            for uid in user_ids:
                emit(by_user[uid], uid)
            if tagged:
                emit(tagged, None)
        else:
            merged = [p for uid in user_ids for p in by_user[uid]] + tagged
            if merged:
                emit(merged, None)
    elif localparts and src_ips.contains_any(node.addrs):
        # A source that is not a destination still gets rules scoped to
        # itself when localpart mapping is in play.
        if node.owner is None:
            emit([SSHPrincipal(node_ip=format_addr(a)) for a in sorted(node.addrs)], None)
        elif by_user.get(node.owner):
            emit(by_user[node.owner], node.owner)
    return out


def holding_check_rule(
    resolver: Resolver, src: NodeInfo, dst: NodeInfo, local_user: str
) -> SSHRule | None:
    """The ``check`` rule that holds SSH from ``src`` to ``dst`` as ``local_user``.

    The node tries its check rules first, in policy order (see
    :func:`compile_ssh_policy`), and the first rule naming one of the source's
    addresses and mapping some SSH user to ``local_user`` decides. This answers with
    that rule as compiled for ``dst`` (so ``autogroup:self``, localpart and tag forms
    mean what they mean on the wire), or None when no check rule holds the
    connection (the policy changed since the node asked).
    """
    addrs = {format_addr(a) for a in src.addrs}
    for rule in resolver.policy.ssh or ():
        if rule.action != "check":
            continue
        for wire in _rules_for(rule, resolver, dst, ""):
            if _maps_to(wire.ssh_users, local_user) and any(
                p.node_ip in addrs for p in wire.principals
            ):
                return rule
    return None


def _maps_to(users: dict[str, str], local: str) -> bool:
    """Whether some SSH user name becomes ``local`` under ``tailcfg.SSHRule.SSHUsers``:
    a name maps through its own entry, else through ``*``; ``=`` keeps the name and an
    empty value refuses it."""
    if not local:
        return False
    if users.get(local, users.get("*")) in ("=", local):
        return True
    return any(mapped == local for remote, mapped in users.items() if remote != local)


def _user_map(users: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    if "autogroup:nonroot" in users:
        out["*"] = "="
    out["root"] = "root" if "root" in users else ""
    for user in users:
        if user in ("root", "autogroup:nonroot") or localpart_domain(user) is not None:
            continue
        out[user] = user
    return out


def _localparts(users: Sequence[str], tailnet: Tailnet) -> dict[int, str]:
    """User id -> local part, for users matched by a ``localpart:*@domain`` entry."""
    out: dict[int, str] = {}
    for entry in users:
        domain = localpart_domain(entry)
        if domain is None:
            continue
        for user in tailnet.users.values():
            if user.domain and user.domain.lower() == domain.lower():
                out[user.id] = user.localpart
    return out


def _group_sources(
    tailnet: Tailnet, src_ips: IPSet
) -> tuple[list[int], dict[int, list[SSHPrincipal]], list[SSHPrincipal]]:
    """Principals per source user (ids sorted) and for tagged sources.

    A tagged node appears once per tag it carries: the hosted plane expands
    ``autogroup:tagged`` through tag membership lists, and the wire format
    shows the repetition.
    """
    per_user: dict[int, set[int]] = {}
    tagged: list[SSHPrincipal] = []
    for info in tailnet.nodes_in(src_ips):
        if info.owner is None:
            for _ in info.tags:
                tagged.extend(SSHPrincipal(node_ip=format_addr(a)) for a in info.addrs)
            continue
        per_user.setdefault(info.owner, set()).update(info.addrs)
    by_user = {
        uid: [SSHPrincipal(node_ip=format_addr(a)) for a in sorted(addrs)]
        for uid, addrs in per_user.items()
    }
    return sorted(by_user), by_user, tagged


def _tagged_sources(tailnet: Tailnet, src_ips: IPSet) -> list[SSHPrincipal]:
    """The tagged part of :func:`_group_sources` alone."""
    out: list[SSHPrincipal] = []
    for nid in sorted(tailnet.tagged_ids()):
        info = tailnet.nodes[nid]
        if src_ips.contains_any(info.addrs):
            for _ in info.tags:
                out.extend(SSHPrincipal(node_ip=format_addr(a)) for a in info.addrs)
    return out


# -- shared per compile ---------------------------------------------------------------

#: Key element kinds: the rule's ``autogroup:self`` part for the node's owner; the
#: node is one of the rule's other destinations; the node is only a source of a
#: localpart rule (owned, or tagged).
_SELF: Final = 0
_DST: Final = 1
_LP_OWNER: Final = 2
_LP_TAGGED: Final = 3

#: A node's SSH key: ``(rule index, kind, owner id or sorted addresses)`` per part.
SSHKey = tuple[tuple[int, int, Hashable], ...]


class SSHSources:
    """One SSH rule resolved against one tailnet snapshot (see :class:`SSHTable`).

    Attributes:
        rule: the policy rule.
        src_ips: the addresses its sources denote.
        dst_ips: the addresses of its destinations other than ``autogroup:self``
            (None when it has none).
        self_dst: ``autogroup:self`` is among its destinations.
        by_user: source user id -> that user's principals (a token).
        user_ids: the source users, by id.
        tagged: principals of tagged sources (once per tag).
        everyone: token of every principal of the rule (user ids, each user's
            principals and the tagged ones).
        localparts: token of the user id -> local part map (empty when the rule
            has no ``localpart:*@domain`` entry).
    """

    __slots__ = (
        "_merged", "_resolved", "action", "by_user", "dst_ips", "env", "everyone", "localparts", "rule", "self_dst",
        "src_ips", "tagged", "user_ids", "users",
    )

    def __init__(
        self,
        rule: SSHRule,
        resolver: Resolver,
        control_url: str,
        previous: SSHSources | None,
        changed: Sequence[NodeInfo] | None = None,
        shared: dict[tuple[SSHPrincipal, ...], tuple[SSHPrincipal, ...]] | None = None,
    ) -> None:
        tailnet = resolver.tailnet
        self.rule = rule
        others = [a for a in rule.dst if a.text != "autogroup:self"]
        # Resolved aliases are shared by snapshots that did not touch them: so are
        # the unions made of them.
        self._resolved = tuple(resolver.resolve(a) for a in (*rule.src, *others))
        self.src_ips: IPSet
        self.dst_ips: IPSet | None
        if previous is not None and all(
            a is b for a, b in zip(self._resolved, previous._resolved, strict=True)
        ):
            self.src_ips, self.dst_ips = previous.src_ips, previous.dst_ips
        else:
            self.src_ips = resolver.union(rule.src)
            self.dst_ips = resolver.union(others) if others else None
        self.self_dst = len(others) != len(rule.dst)
        self.action = (
            SSHAction(hold_and_delegate=control_url + CHECK_URL_TEMPLATE) if rule.action == "check" else _ACCEPT
        )
        self.env = rule.accept_env
        self.users = _user_map(rule.users)
        self._merged: tuple[SSHPrincipal, ...] | None = None
        self.by_user: dict[int, tuple[SSHPrincipal, ...]]
        self.user_ids: tuple[int, ...]
        self.tagged: tuple[SSHPrincipal, ...]
        self.everyone: tuple[object, ...]
        self.localparts: tuple[tuple[int, str], ...]
        if previous is not None and changed is not None:
            moved = [a for info in changed for a in info.addrs]
            if not self.src_ips.contains_any(moved) and previous.src_ips == self.src_ips:
                # The same sources, none of them a changed node: the same principals.
                self.by_user, self.user_ids, self.tagged = previous.by_user, previous.user_ids, previous.tagged
                self.everyone, self.localparts = previous.everyone, previous.localparts
                self._merged = previous._merged
                return
            # Only the changed nodes' owners (and the tagged nodes, when one of them is
            # or was tagged) can group differently.
            by_user: dict[int, Sequence[SSHPrincipal]] = dict(previous.by_user)
            for uid in {info.owner for info in changed if info.owner is not None}:
                addrs = sorted(
                    a
                    for nid in tailnet.node_ids_of_user(uid)
                    if self.src_ips.contains_any(tailnet.nodes[nid].addrs)
                    for a in tailnet.nodes[nid].addrs
                )
                by_user.pop(uid, None)
                if addrs:
                    by_user[uid] = [SSHPrincipal(node_ip=format_addr(a)) for a in addrs]
            tagged: Sequence[SSHPrincipal] = previous.tagged
            # Only a changed tagged node that is (or was) a source moves the tagged
            # principals: an unchanged node's addresses are in the sources as before.
            if any(
                info.owner is None
                and (self.src_ips.contains_any(info.addrs) or previous.src_ips.contains_any(info.addrs))
                for info in changed
            ):
                tagged = _tagged_sources(tailnet, self.src_ips)
            user_ids = sorted(by_user)
        elif self.src_ips:
            user_ids, grouped, tagged = _group_sources(tailnet, self.src_ips)
            by_user = dict(grouped)
        else:
            user_ids, by_user, tagged = [], {}, []
        old_by_user = previous.by_user if previous is not None else {}
        self.by_user = {}
        # Equal principal tuples are one object: the earlier table's when equal, and
        # (``shared``, across the rules of one table) a user's devices under every rule
        # whose sources hold them all (issue 19, memory).
        intern = shared.setdefault if shared is not None else _same
        for uid, principals in by_user.items():
            token = tuple(principals)
            old = old_by_user.get(uid)
            if old is not None and old == token:
                token = old
            self.by_user[uid] = intern(token, token)
        self.user_ids = tuple(user_ids)
        self.tagged = intern(tuple(tagged), tuple(tagged)) if tagged else ()
        everyone: tuple[object, ...] = (self.user_ids, tuple(self.by_user[u] for u in self.user_ids), self.tagged)
        self.everyone = previous.everyone if previous is not None and previous.everyone == everyone else everyone
        localparts = tuple(sorted(_localparts(rule.users, tailnet).items()))
        self.localparts = (
            previous.localparts if previous is not None and previous.localparts == localparts else localparts
        )

    def kept_by(self, rule: SSHRule, resolver: Resolver, moved: Sequence[int]) -> bool:
        """Whether this resolution of ``rule`` holds for ``resolver``'s snapshot too:
        its aliases resolve to the very same objects there (same sources and
        destinations) and no changed node's address (``moved``, before and after) is
        among its sources, so every principal is the same. A join then costs a rule
        that it does not touch one lookup per alias."""
        return (
            rule == self.rule
            and all(resolver.resolve(a) is b for a, b in zip((*rule.src, *self._others()), self._resolved, strict=True))
            and not self.src_ips.contains_any(moved)
        )

    def _others(self) -> list[Alias]:
        return [a for a in self.rule.dst if a.text != "autogroup:self"]

    def merged(self) -> tuple[SSHPrincipal, ...]:
        """Every principal, users by id then tagged sources."""
        if self._merged is None:
            self._merged = tuple(p for uid in self.user_ids for p in self.by_user[uid]) + self.tagged
        return self._merged

    def emit(self, out: list[SSHRuleWire], principals: tuple[SSHPrincipal, ...], uid: int | None) -> None:
        out.append(SSHRuleWire(principals=principals, ssh_users=self.users, action=self.action, accept_env=self.env))
        if uid is not None and self.localparts:
            local = dict(self.localparts).get(uid)
            if local is not None:
                out.append(
                    SSHRuleWire(
                        principals=principals, ssh_users={local: local}, action=self.action, accept_env=self.env
                    )
                )


def _same(token: tuple[SSHPrincipal, ...], _default: tuple[SSHPrincipal, ...]) -> tuple[SSHPrincipal, ...]:
    """No interning: ``token`` itself (``dict.setdefault``'s shape)."""
    return token


def _same_ssh(a: Policy, b: Policy) -> bool:
    """Whether two policies have the same ``ssh`` section (a policy change elsewhere:
    the earlier table's tokens may be reused where they are equal)."""
    return a is b or a.ssh == b.ssh


class SSHTable:
    """Every SSH rule of a policy resolved once against one tailnet snapshot.

    Build it with the previous snapshot's table, so that equal tokens stay the same
    objects; then :meth:`key` a node, and :meth:`render` the key (once per key) to
    get what :func:`compile_ssh_policy` gives that node.
    """

    __slots__ = ("policy", "rules")

    def __init__(
        self,
        resolver: Resolver,
        control_url: str,
        previous: SSHTable | None = None,
        changed: Sequence[NodeInfo] | None = None,
    ) -> None:
        """Resolve every rule. ``changed`` (with ``previous``) are the only nodes that
        changed since ``previous`` (same users), as they were and as they are: a rule
        whose aliases resolve to the same objects and none of whose sources is among
        them keeps its principals. Under the same policy the other rules regroup only
        the changed nodes' owners (and the tagged sources); after a policy change
        (the same ``ssh`` section, but a group or tag owner may have moved) they
        regroup every source."""
        self.policy = resolver.policy
        rules = resolver.policy.ssh or ()
        old: Sequence[SSHSources | None] = (
            previous.rules if previous is not None and _same_ssh(previous.policy, self.policy) else [None] * len(rules)
        )
        moved = [a for info in changed for a in info.addrs] if changed is not None else None
        # Regrouping only the changed nodes' owners holds while the policy is the one
        # ``previous`` was resolved under: a policy change may move any user in or out
        # of a rule's sources (a group's members) without any node changing.
        regroup = changed if previous is not None and previous.policy is self.policy else None
        shared: dict[tuple[SSHPrincipal, ...], tuple[SSHPrincipal, ...]] = {}
        self.rules: tuple[SSHSources, ...] = tuple(
            o if o is not None and moved is not None and o.kept_by(r, resolver, moved)
            else SSHSources(r, resolver, control_url, o, regroup, shared)
            for r, o in zip(rules, old, strict=True)
        )

    def same_keys(self, previous: SSHTable) -> bool:
        """Whether every node's :meth:`key` is what it was in ``previous`` (a table of
        the same ``ssh`` section whose rules resolve to the same addresses and local
        parts): a policy change elsewhere keeps them."""
        return _same_ssh(previous.policy, self.policy) and all(
            r.src_ips == o.src_ips and r.dst_ips == o.dst_ips and r.self_dst == o.self_dst
            and r.localparts == o.localparts
            for r, o in zip(self.rules, previous.rules, strict=True)
        )

    def key(self, node: NodeInfo) -> SSHKey:
        """What the node's SSH policy depends on about the node itself.

        It depends only on the node's addresses and owner (its membership in the
        rules' destinations and sources), never on other nodes, so it stays valid
        while the node, the users and the policy are unchanged.
        """
        out: list[tuple[int, int, Hashable]] = []
        for i, rs in enumerate(self.rules):
            if rs.self_dst and node.owner is not None:
                out.append((i, _SELF, node.owner))
            if rs.dst_ips is None:
                continue
            if rs.dst_ips.contains_any(node.addrs):
                out.append((i, _DST, None))
            elif rs.localparts and rs.src_ips.contains_any(node.addrs):
                if node.owner is None:
                    out.append((i, _LP_TAGGED, tuple(sorted(node.addrs))))
                else:
                    out.append((i, _LP_OWNER, node.owner))
        return tuple(out)

    def deps(self, key: SSHKey) -> tuple[object, ...]:
        """The tokens the answer for ``key`` is built from (compare by identity)."""
        out: list[object] = []
        for i, kind, arg in key:
            rs = self.rules[i]
            if kind == _DST:
                out.append(rs.everyone)
            elif kind in (_SELF, _LP_OWNER):
                out.append(rs.by_user.get(arg))  # type: ignore[call-overload]
            out.append(rs.localparts)
        return tuple(out)

    def render(self, key: SSHKey) -> SSHPolicy | None:
        """The SSH policy of every node with this key (None without an ``ssh`` section)."""
        if self.policy.ssh is None:
            return None
        rules: list[SSHRuleWire] = []
        for i, kind, arg in key:
            rs = self.rules[i]
            if kind == _DST:
                if rs.localparts:
                    for uid in rs.user_ids:
                        rs.emit(rules, rs.by_user[uid], uid)
                    if rs.tagged:
                        rs.emit(rules, rs.tagged, None)
                elif rs.merged():
                    rs.emit(rules, rs.merged(), None)
            elif kind == _LP_TAGGED:
                assert isinstance(arg, tuple)
                rs.emit(rules, tuple(SSHPrincipal(node_ip=format_addr(a)) for a in arg), None)
            else:
                principals = rs.by_user.get(arg)  # type: ignore[call-overload]
                if principals:
                    rs.emit(rules, principals, arg)  # type: ignore[arg-type]
        checks = [r for r in rules if r.action.hold_and_delegate]
        accepts = [r for r in rules if not r.action.hold_and_delegate]
        return SSHPolicy(rules=tuple(checks + accepts))
