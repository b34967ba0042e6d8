"""The closed catalogue of events and its single decoder.

``AnyEvent`` is the union of every event class; ``EVENT_TYPES`` maps each stored tag to
its class. Adding an event means adding it to its family module and to ``AnyEvent``
below; a test checks that every tag is unique and every class is registered, and mypy
checks (through ``assert_never`` in the folds) that every projection handles it.
"""

from __future__ import annotations

from typing import Final

from .audit import ChainErrorsIgnored
from .base import Event
from .dns import DnsExtraRecord, DnsExtraRecordsSet, DnsSet
from .key import (
    ApiKeyCreated,
    ApiKeyDeleted,
    ApiKeyExpired,
    PreAuthKeyCreated,
    PreAuthKeyExpired,
    PreAuthKeyUsed,
)
from .node import (
    NodeDeleted,
    NodeExpirySet,
    NodeHostnameChanged,
    NodeKeyRotated,
    NodeLoggedOut,
    NodeRegistered,
    NodeRegistrationRejected,
    NodeRenamed,
    NodeTagsSet,
)
from .policy import PolicyImpact, PolicySet
from .route import RoutePrimaryChanged, RoutesAdvertised, RoutesApproved
from .ssh import SshCheckApproved, SshCheckRejected
from .user import ROLES, UserCreated, UserDeleted, UserProfileUpdated, UserRenamed, UserRoleSet

__all__ = [
    "EVENT_TYPES",
    "ROLES",
    "AnyEvent",
    "ApiKeyCreated",
    "ApiKeyDeleted",
    "ApiKeyExpired",
    "ChainErrorsIgnored",
    "DnsExtraRecord",
    "DnsExtraRecordsSet",
    "DnsSet",
    "Event",
    "NodeDeleted",
    "NodeExpirySet",
    "NodeHostnameChanged",
    "NodeKeyRotated",
    "NodeLoggedOut",
    "NodeRegistered",
    "NodeRegistrationRejected",
    "NodeRenamed",
    "NodeTagsSet",
    "PolicyImpact",
    "PolicySet",
    "PreAuthKeyCreated",
    "PreAuthKeyExpired",
    "PreAuthKeyUsed",
    "RoutePrimaryChanged",
    "RoutesAdvertised",
    "RoutesApproved",
    "SshCheckApproved",
    "SshCheckRejected",
    "UserCreated",
    "UserDeleted",
    "UserProfileUpdated",
    "UserRenamed",
    "UserRoleSet",
]

AnyEvent = (
    UserCreated
    | UserRenamed
    | UserDeleted
    | UserRoleSet
    | UserProfileUpdated
    | PreAuthKeyCreated
    | PreAuthKeyUsed
    | PreAuthKeyExpired
    | ApiKeyCreated
    | ApiKeyExpired
    | ApiKeyDeleted
    | NodeRegistered
    | NodeKeyRotated
    | NodeRenamed
    | NodeHostnameChanged
    | NodeTagsSet
    | NodeExpirySet
    | NodeLoggedOut
    | NodeDeleted
    | NodeRegistrationRejected
    | RoutesAdvertised
    | RoutesApproved
    | RoutePrimaryChanged
    | PolicySet
    | ChainErrorsIgnored
    | DnsSet
    | DnsExtraRecordsSet
    | SshCheckApproved
    | SshCheckRejected
)

_CLASSES: Final[tuple[type[Event], ...]] = (
    UserCreated,
    UserRenamed,
    UserDeleted,
    UserRoleSet,
    UserProfileUpdated,
    PreAuthKeyCreated,
    PreAuthKeyUsed,
    PreAuthKeyExpired,
    ApiKeyCreated,
    ApiKeyExpired,
    ApiKeyDeleted,
    NodeRegistered,
    NodeKeyRotated,
    NodeRenamed,
    NodeHostnameChanged,
    NodeTagsSet,
    NodeExpirySet,
    NodeLoggedOut,
    NodeDeleted,
    NodeRegistrationRejected,
    RoutesAdvertised,
    RoutesApproved,
    RoutePrimaryChanged,
    PolicySet,
    ChainErrorsIgnored,
    DnsSet,
    DnsExtraRecordsSet,
    SshCheckApproved,
    SshCheckRejected,
)

EVENT_TYPES: Final[dict[str, type[Event]]] = {cls.type_name(): cls for cls in _CLASSES}
