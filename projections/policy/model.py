"""The tailnet as the policy engine sees it: users, nodes, settings.

Role in the pipeline: the projection layer folds the event log into these
frozen Structs and hands them to :func:`projections.policy.compile_policy`.
They carry only what policy evaluation needs.

Identity rules (Tailscale's, mirrored by headscale):

* A node with at least one tag is *tagged*: its identity is its tags and
  ``user_id`` is ignored for every policy purpose (users, groups,
  ``autogroup:member``, ``autogroup:self``).
* An untagged node belongs to ``user_id``.
* Node ids order registration: route failover elects the approved router
  with the lowest id, i.e. the one that registered first -- the hosted
  control plane's "first advertiser is primary".
"""

from __future__ import annotations

import msgspec

from .ipset import Prefix, addr_to_int, is_exit_route, parse_prefix

__all__ = ["PolicyNode", "PolicyUser", "TailnetSettings"]


class PolicyUser(msgspec.Struct, frozen=True, kw_only=True):
    """A tailnet user.

    Attributes:
        id: stable numeric id.
        login: login name, normally an email (``odin@example.com``). Policy
            user tokens match it exactly.
        display_name: human name (not used for matching).
        name: optional short name (``odin``); the token ``odin@`` matches it,
            as headscale allows for users without an email.
        role: tailnet role (``owner``, ``admin``, ``member``, ...), used by
            ``autogroup:admin`` and ``autogroup:owner``.
    """

    id: int
    login: str
    display_name: str = ""
    name: str = ""
    role: str = "member"

    @property
    def domain(self) -> str:
        """The part of the login after the last ``@`` ("" when none)."""
        at = self.login.rfind("@")
        return self.login[at + 1 :] if at >= 0 else ""

    @property
    def localpart(self) -> str:
        """The part of the login before the last ``@``."""
        at = self.login.rfind("@")
        return self.login[:at] if at >= 0 else self.login


class PolicyNode(msgspec.Struct, frozen=True, kw_only=True):
    """A node (device) in the tailnet.

    Attributes:
        id: stable numeric id; lower ids registered earlier.
        name: the node's (given) name.
        user_id: owning user; ignored when ``tags`` is non-empty.
        tags: ACL tags (``tag:server``).
        ipv4: Tailscale IPv4 address or None.
        ipv6: Tailscale IPv6 address or None.
        routable_ips: routes the node advertises (Hostinfo.RoutableIPs).
        approved_routes: routes an admin or auto-approver approved. A route
            is served only when it is both advertised and approved.
    """

    id: int
    name: str
    user_id: int | None = None
    tags: tuple[str, ...] = ()
    ipv4: str | None = None
    ipv6: str | None = None
    routable_ips: tuple[str, ...] = ()
    approved_routes: tuple[str, ...] = ()

    @property
    def tagged(self) -> bool:
        """True when the node is identified by tags rather than a user."""
        return bool(self.tags)

    @property
    def owner(self) -> int | None:
        """The user the node counts as for policy purposes (None if tagged)."""
        return None if self.tags else self.user_id

    def addrs(self) -> tuple[int, ...]:
        """The node's addresses on the shared integer line (v4 first)."""
        out: list[int] = []
        if self.ipv4:
            out.append(addr_to_int(self.ipv4))
        if self.ipv6:
            out.append(addr_to_int(self.ipv6))
        return tuple(out)

    def served_routes(self) -> tuple[Prefix, ...]:
        """Advertised *and* approved routes, in advertisement order."""
        approved = {parse_prefix(r) for r in self.approved_routes}
        out: list[Prefix] = []
        for text in self.routable_ips:
            prefix = parse_prefix(text)
            if prefix in approved and prefix not in out:
                out.append(prefix)
        return tuple(out)

    def subnet_routes(self) -> tuple[Prefix, ...]:
        """Served routes excluding exit routes."""
        return tuple(p for p in self.served_routes() if not is_exit_route(p))

    def exit_routes(self) -> tuple[Prefix, ...]:
        """Served exit routes (``0.0.0.0/0``, ``::/0``)."""
        return tuple(p for p in self.served_routes() if is_exit_route(p))


class TailnetSettings(msgspec.Struct, frozen=True, kw_only=True):
    """Tailnet-wide settings that shape node capabilities.

    Attributes:
        auto_update_default: when set, every node's CapMap carries
            ``default-auto-update: [value]`` (the admin console's "auto-update
            new devices" switch). None leaves the capability out.
        file_sharing: Taildrop; emits ``https://tailscale.com/cap/file-sharing``.
        ssh: Tailscale SSH; emits ``https://tailscale.com/cap/ssh``.
        suggest_exit_nodes: mark approved exit nodes ``suggest-exit-node``
            on the peer view (the hosted plane's default).
        domains: the tailnet's associated email domains, for
            ``user:*@domain`` and ``localpart:*@domain``. Empty means "the
            owner's login domain" (every user's, when no user is an owner).
    """

    auto_update_default: bool | None = None
    file_sharing: bool = True
    ssh: bool = True
    suggest_exit_nodes: bool = True
    domains: tuple[str, ...] = ()
