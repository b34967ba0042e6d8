"""The fold: how each recorded event changes the tailnet state.

``apply(state, recorded) -> (state, delta)`` is pure and total. It never raises for a
recorded event, because every event was validated (by :mod:`projections.commands`)
before it was appended, and it is replayed over history: an ``apply`` that could fail
would make the log unreadable. It reads time only from the envelope. The ``match`` ends
in ``assert_never``, so adding an event class without teaching the fold about it is a
type error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import assert_never

from immutables import Map
from msgspec.structs import replace

from eventlog import RecordedEvent
from eventlog.events import (
    ApiKeyCreated,
    ApiKeyDeleted,
    ApiKeyExpired,
    ChainErrorsIgnored,
    DnsExtraRecordsSet,
    DnsSet,
    NodeDeleted,
    NodeExpirySet,
    NodeHostnameChanged,
    NodeKeyRotated,
    NodeLoggedOut,
    NodeRegistered,
    NodeRegistrationRejected,
    NodeRenamed,
    NodeTagsSet,
    PolicySet,
    PreAuthKeyCreated,
    PreAuthKeyExpired,
    PreAuthKeyUsed,
    RoutePrimaryChanged,
    RoutesAdvertised,
    RoutesApproved,
    SshCheckApproved,
    SshCheckRejected,
    UserCreated,
    UserDeleted,
    UserProfileUpdated,
    UserRenamed,
    UserRoleSet,
)

from .delta import Delta
from .state import (
    ApiKey,
    Node,
    PreAuthKey,
    SshApproval,
    TailnetState,
    User,
    shared_str,
    shared_strs,
    shared_with,
)

__all__ = ["apply", "fold"]


def _node_changed(state: TailnetState, node: Node, seq: int) -> tuple[TailnetState, Delta]:
    node = replace(node, updated_seq=seq)
    return replace(state, nodes=state.nodes.set(node.id, node)), Delta(
        nodes_changed=frozenset((node.id,))
    )


def _name_added(names: Map[str, int], name: str) -> Map[str, int]:
    return names.set(name, names.get(name, 0) + 1)


def _name_removed(names: Map[str, int], name: str) -> Map[str, int]:
    left = names.get(name, 0) - 1
    if left > 0:
        return names.set(name, left)
    return names.delete(name) if name in names else names


def _update_node(
    state: TailnetState, node_id: int, seq: int, **changes: object
) -> tuple[TailnetState, Delta]:
    """Replace fields of one node; an unknown node (deleted earlier) changes nothing."""
    node = state.nodes.get(node_id)
    if node is None:
        return state, Delta()
    return _node_changed(state, replace(node, **changes), seq)


def _update_preauth_key(state: TailnetState, key_id: int, **changes: object) -> tuple[TailnetState, Delta]:
    """Replace fields of one pre-auth key; an unknown key changes nothing."""
    key = state.preauth_keys.get(key_id)
    if key is None:
        return state, Delta()
    return replace(state, preauth_keys=state.preauth_keys.set(key_id, replace(key, **changes))), Delta(keys=True)


def _update_user(state: TailnetState, user_id: int, seq: int, **changes: object) -> tuple[TailnetState, Delta]:
    """Replace fields of one user; an unknown user (deleted earlier) changes nothing."""
    user = state.users.get(user_id)
    if user is None:
        return state, Delta()
    return replace(state, users=state.users.set(user_id, replace(user, updated_seq=seq, **changes))), Delta(
        users_changed=frozenset((user_id,))
    )


def apply(state: TailnetState, recorded: RecordedEvent) -> tuple[TailnetState, Delta]:
    """Fold one recorded event into ``state``; return the new state and what changed."""
    state = replace(state, seq=recorded.seq, last_event_at=recorded.recorded_at)
    at = recorded.recorded_at
    event = recorded.event
    match event:
        case UserCreated():
            user = User(
                id=event.user_id,
                name=event.name,
                display_name=event.display_name,
                email=event.email,
                provider=event.provider,
                provider_id=event.provider_id,
                profile_pic_url=event.profile_pic_url,
                created_at=at,
                role=event.role,
                updated_seq=recorded.seq,
            )
            return replace(
                state,
                users=state.users.set(user.id, user),
                user_by_name=state.user_by_name.set(user.name, user.id),
                next_user_id=max(state.next_user_id, user.id + 1),
            ), Delta(users_changed=frozenset((user.id,)))
        case UserRenamed():
            old = state.users.get(event.user_id)
            if old is None:
                return state, Delta()
            user = replace(old, name=event.name, updated_seq=recorded.seq)
            return replace(
                state,
                users=state.users.set(user.id, user),
                user_by_name=state.user_by_name.delete(old.name).set(user.name, user.id),
            ), Delta(users_changed=frozenset((user.id,)))
        case UserRoleSet():
            return _update_user(state, event.user_id, recorded.seq, role=event.role)
        case UserProfileUpdated():
            return _update_user(
                state,
                event.user_id,
                recorded.seq,
                display_name=event.display_name,
                email=event.email,
                provider=event.provider,
                provider_id=event.provider_id,
                profile_pic_url=event.profile_pic_url,
            )
        case UserDeleted():
            old = state.users.get(event.user_id)
            if old is None:
                return state, Delta()
            return replace(
                state,
                users=state.users.delete(old.id),
                user_by_name=state.user_by_name.delete(old.name),
            ), Delta(users_removed=frozenset((old.id,)))
        case PreAuthKeyCreated():
            key = PreAuthKey(
                id=event.key_id,
                prefix=event.prefix,
                secret_sha256=event.secret_sha256,
                user_id=event.user_id,
                reusable=event.reusable,
                ephemeral=event.ephemeral,
                tags=shared_strs(event.tags),
                expires_at=event.expires_at,
                created_at=at,
            )
            return replace(
                state,
                preauth_keys=state.preauth_keys.set(key.id, key),
                next_preauth_key_id=max(state.next_preauth_key_id, key.id + 1),
            ), Delta(keys=True)
        case PreAuthKeyUsed():
            key_used = state.preauth_keys.get(event.key_id)
            if key_used is None:
                return state, Delta()
            return _update_preauth_key(state, event.key_id, used_by=(*key_used.used_by, event.node_id))
        case PreAuthKeyExpired():
            return _update_preauth_key(state, event.key_id, revoked=True)
        case ApiKeyCreated():
            api = ApiKey(
                id=event.key_id,
                prefix=event.prefix,
                secret_sha256=event.secret_sha256,
                expires_at=event.expires_at,
                created_at=at,
                kind=event.kind,
                user_id=event.user_id,
                role=event.role,
                scopes=event.scopes,
                description=event.description,
            )
            return replace(
                state,
                api_keys=state.api_keys.set(api.id, api),
                next_api_key_id=max(state.next_api_key_id, api.id + 1),
            ), Delta(keys=True)
        case ApiKeyExpired():
            api_old = state.api_keys.get(event.key_id)
            if api_old is None:
                return state, Delta()
            return replace(
                state, api_keys=state.api_keys.set(api_old.id, replace(api_old, revoked=True))
            ), Delta(keys=True)
        case ApiKeyDeleted():
            if event.key_id not in state.api_keys:
                return state, Delta()
            return replace(state, api_keys=state.api_keys.delete(event.key_id)), Delta(keys=True)
        case NodeRegistered():
            # Repeated values are shared, not kept once per node (see shared_str); a
            # node registered with its key's tags keeps the key's tuple.
            reg_key = state.preauth_keys.get(event.preauthkey_id) if event.preauthkey_id is not None else None
            node = Node(
                id=event.node_id,
                machine_key=event.machine_key,
                node_key=event.node_key,
                user_id=event.user_id,
                hostname=event.hostname,
                given_name=shared_with(event.given_name, event.hostname),
                ipv4=event.ipv4,
                ipv6=event.ipv6,
                tags=reg_key.tags if reg_key is not None and reg_key.tags == event.tags else shared_strs(event.tags),
                ephemeral=event.ephemeral,
                expiry=event.expiry,
                created_at=at,
                auth=shared_str(event.auth),
                preauthkey_id=event.preauthkey_id,
                os=shared_str(event.os),
                updated_seq=recorded.seq,
            )
            by_ip = state.node_by_ip
            for ip in (node.ipv4, node.ipv6):
                if ip is not None:
                    by_ip = by_ip.set(ip, node.id)
            return replace(
                state,
                nodes=state.nodes.set(node.id, node),
                node_by_node_key=state.node_by_node_key.set(node.node_key, node.id),
                node_by_machine_key=state.node_by_machine_key.set(node.machine_key, node.id),
                node_by_ip=by_ip,
                node_names=_name_added(state.node_names, node.given_name),
                next_node_id=max(state.next_node_id, node.id + 1),
                last_ipv4=node.ipv4 or state.last_ipv4,
                last_ipv6=node.ipv6 or state.last_ipv6,
            ), Delta(nodes_changed=frozenset((node.id,)))
        case NodeKeyRotated():
            node_old = state.nodes.get(event.node_id)
            if node_old is None:
                return state, Delta()
            by_key = state.node_by_node_key
            if by_key.get(node_old.node_key) == node_old.id:
                by_key = by_key.delete(node_old.node_key)
            state = replace(state, node_by_node_key=by_key.set(event.node_key, node_old.id))
            return _node_changed(
                state,
                replace(node_old, node_key=event.node_key, expiry=event.expiry, logged_out=False),
                recorded.seq,
            )
        case NodeRenamed():
            node_old = state.nodes.get(event.node_id)
            if node_old is None:
                return state, Delta()
            names = _name_added(_name_removed(state.node_names, node_old.given_name), event.given_name)
            return _node_changed(
                replace(state, node_names=names),
                replace(node_old, given_name=shared_with(event.given_name, node_old.hostname)),
                recorded.seq,
            )
        case NodeHostnameChanged():
            node_old = state.nodes.get(event.node_id)
            if node_old is None:
                return state, Delta()
            hostname = shared_with(event.hostname, node_old.given_name)
            return _node_changed(state, replace(node_old, hostname=hostname), recorded.seq)
        case NodeTagsSet():
            if event.user_id is not None:
                return _update_node(state, event.node_id, recorded.seq, tags=shared_strs(event.tags), user_id=event.user_id)
            return _update_node(state, event.node_id, recorded.seq, tags=shared_strs(event.tags))
        case NodeExpirySet():
            return _update_node(state, event.node_id, recorded.seq, expiry=event.expiry)
        case NodeLoggedOut():
            return _update_node(state, event.node_id, recorded.seq, expiry=event.at, logged_out=True)
        case NodeDeleted():
            node_old = state.nodes.get(event.node_id)
            if node_old is None:
                return state, Delta()
            by_ip = state.node_by_ip
            for ip in (node_old.ipv4, node_old.ipv6):
                if ip is not None and by_ip.get(ip) == node_old.id:
                    by_ip = by_ip.delete(ip)
            by_key = state.node_by_node_key
            if by_key.get(node_old.node_key) == node_old.id:
                by_key = by_key.delete(node_old.node_key)
            by_machine = state.node_by_machine_key
            if by_machine.get(node_old.machine_key) == node_old.id:
                by_machine = by_machine.delete(node_old.machine_key)
            return replace(
                state,
                nodes=state.nodes.delete(node_old.id),
                node_by_node_key=by_key,
                node_by_machine_key=by_machine,
                node_by_ip=by_ip,
                node_names=_name_removed(state.node_names, node_old.given_name),
            ), Delta(nodes_removed=frozenset((node_old.id,)))
        case NodeRegistrationRejected():
            # Audit only: the request was never part of the state (it lives in a side
            # table until approved, rejected or expired).
            return state, Delta()
        case RoutesAdvertised():
            return _update_node(state, event.node_id, recorded.seq, advertised_routes=event.routes)
        case RoutesApproved():
            return _update_node(state, event.node_id, recorded.seq, approved_routes=event.routes)
        case RoutePrimaryChanged():
            primaries = state.route_primaries
            if event.node_id is not None:
                primaries = primaries.set(event.prefix, event.node_id)
            elif event.prefix in primaries:
                primaries = primaries.delete(event.prefix)
            moved = frozenset(n for n in (event.node_id, event.previous_node_id) if n is not None and n in state.nodes)
            return replace(state, route_primaries=primaries), Delta(nodes_changed=moved)
        case PolicySet():
            return replace(
                state,
                policy_text=event.text,
                policy_sha256=event.sha256,
                policy_source=event.source,
                policy_set_at=at,
            ), Delta(policy=True)
        case ChainErrorsIgnored():
            return state, Delta()
        case DnsSet():
            return replace(
                state,
                dns_nameservers=event.nameservers,
                dns_search_paths=event.search_paths,
                dns_magic_dns=event.magic_dns,
            ), Delta(dns=True)
        case DnsExtraRecordsSet():
            return replace(state, dns_extra_records=event.records), Delta(dns=True)
        case SshCheckApproved():
            approval = SshApproval(event.approved_at, event.until)
            who = f"{event.src_node_id}/{event.local_user}"
            return replace(state, ssh_checks=state.ssh_checks.set(who, approval)), Delta()
        case SshCheckRejected():
            return state, Delta()  # audit only: the held connection is refused
        case _:
            assert_never(event)


def fold(state: TailnetState, events: Iterable[RecordedEvent]) -> tuple[TailnetState, Delta]:
    """Fold many events; the delta is the merge of every step's delta."""
    delta = Delta()
    for recorded in events:
        state, step = apply(state, recorded)
        delta = delta.merge(step)
    return state, delta
