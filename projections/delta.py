"""What a fold step changed, as data with an algebra.

A :class:`Delta` names the users and nodes an event touched and whether the policy
changed. Deltas merge associatively, so a stream that falls behind can fold many of them
into one and still send the smallest correct update; consumers read the delta instead of
re-diffing the world (headscale's ``change.Change`` plays the same role).
"""

from __future__ import annotations

import msgspec

__all__ = ["EMPTY", "Delta"]


class Delta(msgspec.Struct, frozen=True, kw_only=True):
    """The change one or more events made to the tailnet state.

    A node id in both ``nodes_changed`` and ``nodes_removed`` cannot happen after a
    merge: removal wins, because node ids are never reused.
    """

    nodes_changed: frozenset[int] = frozenset()
    nodes_removed: frozenset[int] = frozenset()
    users_changed: frozenset[int] = frozenset()
    users_removed: frozenset[int] = frozenset()
    policy: bool = False
    keys: bool = False  # pre-auth or API keys: no netmap cares, the admin views do
    dns: bool = False  # the tailnet's DNS settings

    def merge(self, later: Delta) -> Delta:
        """The delta of applying ``self`` and then ``later`` (associative)."""
        removed = self.nodes_removed | later.nodes_removed
        users_removed = self.users_removed | later.users_removed
        return Delta(
            nodes_changed=(self.nodes_changed | later.nodes_changed) - removed,
            nodes_removed=removed,
            users_changed=(self.users_changed | later.users_changed) - users_removed,
            users_removed=users_removed,
            policy=self.policy or later.policy,
            keys=self.keys or later.keys,
            dns=self.dns or later.dns,
        )

    def is_empty(self) -> bool:
        return not (
            self.nodes_changed
            or self.nodes_removed
            or self.users_changed
            or self.users_removed
            or self.policy
            or self.keys
            or self.dns
        )


EMPTY = Delta()
