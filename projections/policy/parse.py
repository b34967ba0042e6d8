"""Policy text to :class:`~projections.policy.document.Policy`.

Role in the pipeline: the first stage. :func:`parse_policy` loads HuJSON
(``hujson.py``), walks the structure and converts every leaf with the small
grammars of ``syntax.py``. It enforces everything that can be decided from
the text alone -- unknown keys, wrong JSON types, malformed aliases, ports,
protocols, durations -- and leaves cross-references (does this tag exist?)
to ``validate.py``.

Every error is a :class:`~projections.policy.errors.PolicyValidationError`
whose message matches the hosted control plane where the conformance cases
show its wording, and whose line/column point at the offending key or value.

Key names are matched case-insensitively, as Go's ``encoding/json`` (which
Tailscale and headscale both use) does.

Shapes accepted (``[]`` = array, ``{}`` = object; ``null`` equals absent)::

    groups         {"group:<name>": ["<login>", ...]}
    hosts          {"<name>": "<ip or cidr>"}
    tagOwners      {"tag:<name>": ["<login>" | "group:..." | "tag:...", ...]}
    acls           [{"action": "accept", "src": [alias], "dst": ["alias:ports"],
                     "proto": "<name or number>"}]          (users/ports = src/dst)
    grants         [{"src": [alias], "dst": [alias], "ip": ["[proto:]ports" | "*"],
                     "app": {"<domain>/<path>": [json]}, "via": ["tag:..."]}]
    ssh            [{"action": "accept" | "check", "src": [alias], "dst": [alias],
                     "users": [user], "checkPeriod": "<go duration>" | "always",
                     "acceptEnv": [pattern]}]
    nodeAttrs      [{"target": [alias], "attr": [string], "ipPool": [cidr]}]
    autoApprovers  {"routes": {"<cidr>": [approver]}, "exitNode": [approver]}
    tests          [{"src": alias, "proto": ..., "accept": ["host:port"], "deny": [...]}]
    sshTests       [{"src": alias, "dst": [alias], "accept"|"deny"|"check": [user]}]
    randomizeClientPort  bool

``derpMap``, ``disableIPv4``, ``OneCGNATRoute``, ``postures``,
``defaultSrcPosture`` and ``ipsets`` are accepted and ignored: they are valid
upstream but have no effect on what this engine computes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Final, TypeVar

from .document import (
    ACL,
    ACLDestination,
    Alias,
    AliasKind,
    AutoApprovers,
    CheckPeriod,
    Grant,
    IPSpec,
    NodeAttr,
    Policy,
    PolicyTest,
    SSHRule,
    SSHTest,
)
from .errors import PolicySyntaxError, PolicyValidationError
from .hujson import JSONPath, SourceMap, load_hujson, load_legacy_hujson
from .syntax import (
    SyntaxProblem,
    format_go_duration,
    parse_alias,
    parse_go_duration,
    parse_ports,
    parse_protocol,
    split_host_port,
)

__all__ = ["parse_policy", "parse_stored_policy"]

_T = TypeVar("_T")

# Top-level sections. Values are the canonical spelling; lookup is by
# lower-cased key. Sections Tailscale accepts but this engine does not act on
# are parsed for shape only (see _IGNORED_SECTIONS).
_SECTIONS: Final = {
    name.lower(): name
    for name in (
        "acls",
        "grants",
        "groups",
        "hosts",
        "tagOwners",
        "autoApprovers",
        "ssh",
        "sshTests",
        "tests",
        "nodeAttrs",
        "randomizeClientPort",
        "derpMap",
        "disableIPv4",
        "OneCGNATRoute",
        "postures",
        "defaultSrcPosture",
        "ipsets",
    )
}
_IGNORED_SECTIONS: Final = frozenset(
    {"derpMap", "disableIPv4", "OneCGNATRoute", "postures", "defaultSrcPosture", "ipsets"}
)

#: The largest SSH check period Tailscale accepts (168h), in nanoseconds.
MAX_CHECK_PERIOD_NS: Final = 168 * 3_600_000_000_000


def parse_policy(text: str) -> Policy:
    """Parse a HuJSON policy file.

    Args:
        text: the policy as the user wrote it (HuJSON: JSON plus comments
            and trailing commas).

    Returns:
        The typed policy. It is syntactically valid but not yet checked for
        dangling references; run :func:`projections.policy.validate_policy`
        (or :func:`projections.policy.check_policy`) next.

    Raises:
        PolicySyntaxError: the text is not HuJSON.
        PolicyValidationError: a key, value or string inside is malformed.
    """
    value, source = load_hujson(text)
    return _Parser(source).policy(value)


def parse_stored_policy(text: str) -> Policy:
    """Parse a policy text taken from the log.

    Like :func:`parse_policy`, but a text that earlier versions accepted with JSON5
    extensions (before the parser became strict HuJSON) is still read, leniently:
    it is in force, and replaying history must reproduce it.

    Raises:
        PolicySyntaxError, PolicyValidationError: as :func:`parse_policy`.
    """
    try:
        return parse_policy(text)
    except PolicySyntaxError:
        return _Parser(SourceMap({}, {})).policy(load_legacy_hujson(text))


class _Parser:
    """Walks the decoded JSON; ``self.source`` locates errors."""

    def __init__(self, source: SourceMap) -> None:
        """Remember the source map used to locate every error."""
        self.source = source

    # -- error helpers ----------------------------------------------------

    def fail(self, message: str, path: JSONPath, *, at_key: bool = False) -> PolicyValidationError:
        """Build (not raise) an error located at ``path`` (its key, or its value)."""
        where = self.source.key(path) if at_key else self.source.value(path)
        line, column = where if where is not None else (None, None)
        return PolicyValidationError(message, line, column)

    def expect_object(self, value: object, path: JSONPath) -> dict[str, object]:
        """Require a JSON object; the message mimics Go's json type errors."""
        if not isinstance(value, dict):
            raise self.fail(
                f"json: cannot unmarshal {_json_kind(value)} into {_path_name(path)} of type object",
                path,
            )
        return {str(k): v for k, v in value.items()}

    def expect_list(self, value: object, path: JSONPath) -> list[object]:
        """Require a JSON array; ``null`` counts as an empty one."""
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.fail(
                f"json: cannot unmarshal {_json_kind(value)} into {_path_name(path)} of type array",
                path,
            )
        return value

    def expect_str(self, value: object, path: JSONPath) -> str:
        """Require a JSON string."""
        if not isinstance(value, str):
            raise self.fail(
                f"json: cannot unmarshal {_json_kind(value)} into {_path_name(path)} of type string",
                path,
            )
        return value

    def str_list(self, value: object, path: JSONPath) -> list[str]:
        """Require an array of strings (``null`` is empty)."""
        items = self.expect_list(value, path)
        return [self.expect_str(item, (*path, i)) for i, item in enumerate(items)]

    def fields(
        self, obj: dict[str, object], path: JSONPath, allowed: Mapping[str, str]
    ) -> dict[str, object]:
        """Map keys case-insensitively onto canonical names; reject unknown ones.

        Go's ``encoding/json`` matches field names case-insensitively, so
        ``"ACLs"`` and ``"Action"`` work upstream and here.
        """
        out: dict[str, object] = {}
        for key, value in obj.items():
            canonical = allowed.get(key.lower())
            if canonical is None:
                raise self.fail(f'json: unknown field "{key}"', (*path, key), at_key=True)
            out[canonical] = value
        return out

    def alias(self, raw: str, path: JSONPath) -> Alias:
        """Parse one alias, locating a malformed one."""
        try:
            return parse_alias(raw)
        except SyntaxProblem as exc:
            raise self.fail(str(exc), path) from None

    def aliases(self, value: object, path: JSONPath) -> tuple[Alias, ...]:
        """Parse an array of aliases."""
        return tuple(self.alias(s, (*path, i)) for i, s in enumerate(self.str_list(value, path)))

    def each(
        self, value: object, path: JSONPath, build: Callable[[dict[str, object], JSONPath], _T]
    ) -> tuple[_T, ...]:
        """Parse an array of objects with ``build`` (``null`` is empty)."""
        items = self.expect_list(value, path)
        return tuple(
            build(self.expect_object(item, (*path, i)), (*path, i)) for i, item in enumerate(items)
        )

    # -- top level --------------------------------------------------------

    def policy(self, value: object) -> Policy:
        """Parse the top-level object.

        Sections are parsed in a fixed order (groups, hosts, tagOwners, acls,
        grants, ssh, nodeAttrs, autoApprovers, tests, sshTests) so that the
        first error reported does not depend on key order in the text.
        """
        top = self.fields(self.expect_object(value, ()), (), _SECTIONS)
        for name in _IGNORED_SECTIONS & top.keys():
            # Accepted for compatibility; the engine has nothing to do with them.
            top.pop(name)
        groups = self.groups(top.get("groups"), ("groups",))
        hosts = self.hosts(top.get("hosts"), ("hosts",))
        tag_owners = self.tag_owners(top.get("tagOwners"), ("tagOwners",))
        acls = self.each(top["acls"], ("acls",), self.acl) if top.get("acls") is not None else None
        grants = (
            self.each(top["grants"], ("grants",), self.grant)
            if top.get("grants") is not None
            else None
        )
        ssh = self.each(top["ssh"], ("ssh",), self.ssh_rule) if top.get("ssh") is not None else None
        node_attrs = self.each(top.get("nodeAttrs"), ("nodeAttrs",), self.node_attr)
        auto = self.auto_approvers(top.get("autoApprovers"), ("autoApprovers",))
        tests = self.each(top.get("tests"), ("tests",), self.policy_test)
        ssh_tests = self.each(top.get("sshTests"), ("sshTests",), self.ssh_test)
        randomize = top.get("randomizeClientPort", False)
        if not isinstance(randomize, bool):
            raise self.fail(
                "json: cannot unmarshal "
                f"{_json_kind(randomize)} into randomizeClientPort of type bool",
                ("randomizeClientPort",),
            )
        return Policy(
            groups=groups,
            hosts=hosts,
            tag_owners=tag_owners,
            acls=acls,
            grants=grants,
            ssh=ssh,
            node_attrs=node_attrs,
            auto_approvers=auto,
            tests=tests,
            ssh_tests=ssh_tests,
            randomize_client_port=randomize,
            source=self.source,
        )

    # -- groups, hosts, tagOwners ----------------------------------------

    def groups(self, value: object, path: JSONPath) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``groups``: ``{"group:x": ["login", ...]}``; groups may not nest."""
        if value is None:
            return ()
        obj = self.expect_object(value, path)
        out: dict[str, tuple[str, ...]] = {}
        for name, members in obj.items():
            if not name.startswith("group:"):
                raise self.fail(
                    f'groups["{name}"]: group names must start with "group:"',
                    (*path, name),
                    at_key=True,
                )
            out[name] = tuple(m.strip() for m in self.str_list(members, (*path, name)))
        # Tailscale reports nesting for the deepest non-leaf parent first, which
        # a reverse-sorted walk reproduces (same as headscale's Groups decoder).
        for name in sorted(out, reverse=True):
            for i, member in enumerate(out[name]):
                if member.startswith("group:"):
                    raise self.fail(
                        f'groups["{name}"]: "{member}": group members cannot be recursive',
                        (*path, name, i),
                    )
        return tuple(out.items())

    def hosts(self, value: object, path: JSONPath) -> tuple[tuple[str, str], ...]:
        """``hosts``: ``{"name": "IP or CIDR"}``."""
        if value is None:
            return ()
        obj = self.expect_object(value, path)
        out: list[tuple[str, str]] = []
        for name, target in obj.items():
            text = self.expect_str(target, (*path, name)).strip()
            alias = self.alias(text, (*path, name))
            if alias.kind is not AliasKind.PREFIX:
                raise self.fail(f'hosts["{name}"]: "{text}": invalid address', (*path, name))
            out.append((name, text))
        return tuple(out)

    def tag_owners(
        self, value: object, path: JSONPath
    ) -> tuple[tuple[str, tuple[Alias, ...]], ...]:
        """``tagOwners``: ``{"tag:x": [owners]}``.

        A tag name must start with an ASCII letter after ``tag:`` (the hosted
        plane rejects ``tag:сервер`` and ``tag:1x`` with the message below).
        Owners may be users, groups or other tags; cycles are allowed.
        """
        if value is None:
            return ()
        obj = self.expect_object(value, path)
        out: list[tuple[str, tuple[Alias, ...]]] = []
        for tag, owners in obj.items():
            rest = tag[len("tag:") :] if tag.startswith("tag:") else None
            if rest is None:
                raise self.fail(
                    f'tagOwners["{tag}"]: tag names must start with "tag:"',
                    (*path, tag),
                    at_key=True,
                )
            if not rest or not (rest[0].isascii() and rest[0].isalpha()):
                raise self.fail(
                    f"tagOwners[\"{tag}\"]: tag names must start with a letter, after 'tag:'",
                    (*path, tag),
                    at_key=True,
                )
            out.append((tag, self.aliases(owners, (*path, tag))))
        return tuple(out)

    # -- acls and grants ---------------------------------------------------

    _ACL_FIELDS: Final = {
        "action": "action",
        "src": "src",
        "users": "src",
        "dst": "dst",
        "ports": "dst",
        "proto": "proto",
        "srcposture": "srcPosture",
    }

    def acl(self, obj: dict[str, object], path: JSONPath) -> ACL:
        """One ``acls`` entry.

        Tailscale's legacy names are accepted: ``users`` for ``src`` and
        ``ports`` for ``dst``. The only action is ``accept``.
        """
        entry = self.fields(obj, path, self._ACL_FIELDS)
        action = entry.get("action")
        action_text = action.strip() if isinstance(action, str) else ""
        if action_text != "accept":
            shown = action if isinstance(action, str) else ""
            raise self.fail(f'action="{shown}" is not supported', (*path, "action"))
        protocols = self.protocol(entry.get("proto"), (*path, "proto"))
        src = self.aliases(entry.get("src"), (*path, "src"))
        dst: list[ACLDestination] = []
        for i, raw in enumerate(self.str_list(entry.get("dst"), (*path, "dst"))):
            dst.append(self.acl_destination(raw, (*path, "dst", i)))
        return ACL(protocols=protocols, src=src, dst=tuple(dst), path=path)

    def acl_destination(self, raw: str, path: JSONPath) -> ACLDestination:
        """``alias:ports``; port errors come before alias errors, as upstream."""
        text = raw.strip()
        try:
            host, ports_text = split_host_port(text)
        except SyntaxProblem as exc:
            raise self.fail(f'dst="{text}": {exc}', path) from None
        try:
            ports = parse_ports(ports_text)
        except SyntaxProblem as exc:
            raise self.fail(f'dst="{text}": port range "{ports_text}": {exc}', path) from None
        return ACLDestination(alias=self.alias(host, path), ports=ports, text=text)

    def protocol(self, value: object, path: JSONPath) -> tuple[int, ...]:
        """``proto``: a name or IANA number (a JSON number is accepted too)."""
        if value is None:
            return ()
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        try:
            return parse_protocol(self.expect_str(value, path))
        except SyntaxProblem as exc:
            raise self.fail(str(exc), path) from None

    _GRANT_FIELDS: Final = {
        "src": "src",
        "dst": "dst",
        "ip": "ip",
        "app": "app",
        "via": "via",
        "srcposture": "srcPosture",
    }

    def grant(self, obj: dict[str, object], path: JSONPath) -> Grant:
        """One ``grants`` entry; ``app`` values are kept as encoded JSON."""
        entry = self.fields(obj, path, self._GRANT_FIELDS)
        src = self.aliases(entry.get("src"), (*path, "src"))
        dst = self.aliases(entry.get("dst"), (*path, "dst"))
        ip = tuple(
            self.ip_spec(raw, (*path, "ip", i))
            for i, raw in enumerate(self.str_list(entry.get("ip"), (*path, "ip")))
        )
        app: list[tuple[str, bytes]] = []
        if entry.get("app") is not None:
            for name, values in self.expect_object(entry["app"], (*path, "app")).items():
                items = self.expect_list(values, (*path, "app", name))
                app.append((name, _compact_json(items)))
        via: list[str] = []
        for i, raw in enumerate(self.expect_list(entry.get("via"), (*path, "via"))):
            if not isinstance(raw, str) or not raw.strip().startswith("tag:"):
                raise self.fail("via can only be a tag", (*path, "via", i))
            via.append(raw.strip())
        return Grant(src=src, dst=dst, ip=ip, app=tuple(app), via=tuple(via), path=path)

    def ip_spec(self, raw: str, path: JSONPath) -> IPSpec:
        """A grant ``ip`` entry: ``*``, ``ports`` or ``proto:ports``."""
        text = raw.strip()
        if text == "*":
            return IPSpec(protocols=(), ports=parse_ports("*"))
        proto_text, colon, ports_text = text.rpartition(":")
        if not colon:
            ports_text = text
        elif ":" in proto_text:
            raise self.fail(
                f'"{text}": expected only one colon in Internet protocol and port type', path
            )
        protocols = self.protocol(proto_text, path) if colon else ()
        try:
            ports = parse_ports(ports_text)
        except SyntaxProblem as exc:
            raise self.fail(f'port range "{ports_text}": {exc}', path) from None
        return IPSpec(protocols=protocols, ports=ports)

    # -- ssh ----------------------------------------------------------------

    _SSH_FIELDS: Final = {
        "action": "action",
        "src": "src",
        "dst": "dst",
        "users": "users",
        "checkperiod": "checkPeriod",
        "acceptenv": "acceptEnv",
        "srcposture": "srcPosture",
        "recorder": "recorder",
        "enforcerecorder": "enforceRecorder",
    }

    def ssh_rule(self, obj: dict[str, object], path: JSONPath) -> SSHRule:
        """One ``ssh`` rule.

        ``action`` and ``users`` entries are whitespace-trimmed (the hosted
        plane accepts ``" accept"`` and ``" root"``); an empty or ``*`` user
        is refused, and so is an empty ``acceptEnv`` pattern.
        """
        entry = self.fields(obj, path, self._SSH_FIELDS)
        raw_action = entry.get("action")
        action = raw_action.strip() if isinstance(raw_action, str) else ""
        if not action:
            raise self.fail("action must be specified", (*path, "action"))
        if action not in ("accept", "check"):
            raise self.fail(f'"{action}" is not a valid action', (*path, "action"))
        src = self.aliases(entry.get("src"), (*path, "src"))
        dst = self.aliases(entry.get("dst"), (*path, "dst"))
        users = tuple(u.strip() for u in self.str_list(entry.get("users"), (*path, "users")))
        if not users:
            raise self.fail("users must be specified", (*path, "users"))
        for i, user in enumerate(users):
            if user in ("", "*"):
                raise self.fail(f'user "{user}" is not valid', (*path, "users", i))
        accept_env = tuple(self.str_list(entry.get("acceptEnv"), (*path, "acceptEnv")))
        for i, env in enumerate(accept_env):
            if env == "":
                raise self.fail("acceptEnv values cannot be empty", (*path, "acceptEnv", i))
        period = self.check_period(entry.get("checkPeriod"), (*path, "checkPeriod"))
        return SSHRule(
            action=action,
            src=src,
            dst=dst,
            users=users,
            check_period=period,
            accept_env=accept_env,
            path=path,
        )

    def check_period(self, value: object, path: JSONPath) -> CheckPeriod | None:
        """``checkPeriod``: ``always`` or a Go duration in ``[0, 168h]``."""
        if value is None:
            return None
        text = self.expect_str(value, path).strip()
        if text == "always":
            return CheckPeriod(always=True, nanoseconds=0)
        try:
            ns = parse_go_duration(text)
        except SyntaxProblem as exc:
            raise self.fail(str(exc), path) from None
        if ns < 0:
            raise self.fail(
                f"checkPeriod {format_go_duration(ns)} must be a positive duration", path
            )
        if ns > MAX_CHECK_PERIOD_NS:
            raise self.fail(f"checkPeriod {format_go_duration(ns)} is above the max (168h)", path)
        return CheckPeriod(always=False, nanoseconds=ns)

    # -- nodeAttrs, autoApprovers -------------------------------------------

    _NODE_ATTR_FIELDS: Final = {"target": "target", "attr": "attr", "ippool": "ipPool"}

    def node_attr(self, obj: dict[str, object], path: JSONPath) -> NodeAttr:
        """One ``nodeAttrs`` entry (targets, attributes, IP pools)."""
        entry = self.fields(obj, path, self._NODE_ATTR_FIELDS)
        target = self.aliases(entry.get("target"), (*path, "target"))
        attrs = tuple(self.str_list(entry.get("attr"), (*path, "attr")))
        pools = tuple(p.strip() for p in self.str_list(entry.get("ipPool"), (*path, "ipPool")))
        return NodeAttr(target=target, attrs=attrs, ip_pool=pools, path=path)

    _AUTO_FIELDS: Final = {"routes": "routes", "exitnode": "exitNode"}

    def auto_approvers(self, value: object, path: JSONPath) -> AutoApprovers:
        """``autoApprovers``: ``routes`` (prefix -> approvers) and ``exitNode``."""
        if value is None:
            return AutoApprovers()
        entry = self.fields(self.expect_object(value, path), path, self._AUTO_FIELDS)
        routes: list[tuple[str, tuple[Alias, ...]]] = []
        if entry.get("routes") is not None:
            for prefix, approvers in self.expect_object(entry["routes"], (*path, "routes")).items():
                where = (*path, "routes", prefix)
                if self.alias(prefix, where).kind is not AliasKind.PREFIX:
                    raise self.fail(
                        f'autoApprovers: "{prefix}": invalid prefix', where, at_key=True
                    )
                routes.append((prefix.strip(), self.aliases(approvers, where)))
        exit_node = self.aliases(entry.get("exitNode"), (*path, "exitNode"))
        return AutoApprovers(routes=tuple(routes), exit_node=exit_node)

    # -- tests ----------------------------------------------------------------

    _TEST_FIELDS: Final = {
        "src": "src",
        "proto": "proto",
        "accept": "accept",
        "deny": "deny",
        "srcpostureattrs": "srcPostureAttrs",
    }

    def policy_test(self, obj: dict[str, object], path: JSONPath) -> PolicyTest:
        """One ``tests`` entry, kept raw: malformed entries fail when run."""
        entry = self.fields(obj, path, self._TEST_FIELDS)
        src = entry.get("src")
        proto = entry.get("proto")
        if isinstance(proto, int) and not isinstance(proto, bool):
            proto = str(proto)
        return PolicyTest(
            src=self.expect_str(src, (*path, "src")) if src is not None else None,
            proto=self.expect_str(proto, (*path, "proto")) if proto is not None else "",
            accept=tuple(self.str_list(entry.get("accept"), (*path, "accept"))),
            deny=tuple(self.str_list(entry.get("deny"), (*path, "deny"))),
            path=path,
        )

    _SSH_TEST_FIELDS: Final = {
        "src": "src",
        "dst": "dst",
        "accept": "accept",
        "deny": "deny",
        "check": "check",
        "srcpostureattrs": "srcPostureAttrs",
    }

    def ssh_test(self, obj: dict[str, object], path: JSONPath) -> SSHTest:
        """One ``sshTests`` entry, kept raw like ``tests``."""
        entry = self.fields(obj, path, self._SSH_TEST_FIELDS)
        src = entry.get("src")
        return SSHTest(
            src=self.expect_str(src, (*path, "src")) if src is not None else None,
            dst=tuple(self.str_list(entry.get("dst"), (*path, "dst"))),
            accept=tuple(self.str_list(entry.get("accept"), (*path, "accept"))),
            deny=tuple(self.str_list(entry.get("deny"), (*path, "deny"))),
            check=tuple(self.str_list(entry.get("check"), (*path, "check"))),
            path=path,
        )


def _compact_json(value: object) -> bytes:
    """Encode a JSON value compactly (the form tailcfg.RawMessage carries)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _json_kind(value: object) -> str:
    """Name a decoded JSON value the way Go's json errors do."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _path_name(path: JSONPath) -> str:
    """Render a JSON path as ``acls[0].dst`` for messages."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out or "policy"
