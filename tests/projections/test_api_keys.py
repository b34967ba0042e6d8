"""API keys and OAuth clients: decided like every other change, only hashes stored."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from eventlog.codec import decode_event
from eventlog.events import ApiKeyCreated, ApiKeyDeleted, ApiKeyExpired
from projections import CommandError
from projections import commands as c
from tests.support.builders import Recorder


def _create(r: Recorder, prefix: str, **kw: object) -> str:
    return r.run(lambda s: c.decide_create_api_key(
        s, expires_at=None, now=r.now, prefix=prefix, secret="s3cret" + prefix, **kw  # type: ignore[arg-type]
    ))


def test_a_key_is_shown_once_and_only_its_hash_is_recorded() -> None:
    r = Recorder()
    r.user("alice")
    full = _create(r, "abc123", user="alice", role="member", description="ci")
    assert full == "tlkey-api-abc123-s3cretabc123"
    assert c.parse_api_key(full) == ("apikey", "abc123", "s3cretabc123")
    [recorded] = [e for e in r.events if isinstance(e.event, ApiKeyCreated)]
    raw = msgspec.json.encode(recorded.event)
    assert b"s3cret" not in raw
    key = c.find_api_key(r.state, full)
    assert key.secret_sha256 == c.hash_secret("s3cretabc123")
    assert (key.user_id, key.role, key.kind, key.description) == (1, "member", "apikey", "ci")


def test_expire_and_delete() -> None:
    r = Recorder()
    _create(r, "k1")
    key = c.find_api_key(r.state, "k1")
    assert key.usable_at(r.now) is None
    r.run(lambda s: c.decide_expire_api_key(s, "k1"))
    assert isinstance(r.events[-1].event, ApiKeyExpired)
    assert c.find_api_key(r.state, "k1").usable_at(r.now) == "the key has been expired"
    with pytest.raises(CommandError, match="already expired"):
        r.run(lambda s: c.decide_expire_api_key(s, "k1"))
    r.run(lambda s: c.decide_delete_api_key(s, str(key.id)))
    assert isinstance(r.events[-1].event, ApiKeyDeleted)
    assert not r.state.api_keys
    with pytest.raises(CommandError, match="not found"):
        r.run(lambda s: c.decide_delete_api_key(s, "k1"))


def test_a_key_past_its_expiration_is_unusable() -> None:
    r = Recorder()
    r.run(lambda s: c.decide_create_api_key(
        s, expires_at=r.now + timedelta(hours=1), now=r.now, prefix="k2", secret="x"
    ))
    key = c.find_api_key(r.state, "k2")
    assert key.usable_at(r.now) is None
    assert key.usable_at(r.now + timedelta(hours=2)) == "the key has expired"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"role": "member"}, "acts for a user"),
        ({"role": "root"}, "invalid key role"),
        ({"user": "bob"}, "an admin key needs an admin or owner"),
        ({"user": "ghost"}, "not found"),
        ({"kind": "oauth_client"}, "needs scopes"),
        ({"kind": "oauth_client", "scopes": ("devices:everything",)}, "unknown scope"),
        ({"scopes": ("all",)}, "scopes apply to OAuth clients"),
    ],
)
def test_bad_keys_are_refused(kw: dict[str, object], message: str) -> None:
    r = Recorder()
    r.user("alice")
    r.user("bob")  # a member
    seq = r.state.seq
    with pytest.raises(CommandError, match=message):
        _create(r, "p", **kw)
    assert r.state.seq == seq


def test_oauth_clients_have_scopes_and_their_own_secret_form() -> None:
    r = Recorder()
    secret = _create(r, "cid1", kind="oauth_client", scopes=("devices:core", "auth_keys"))
    assert secret.startswith("tlkey-client-cid1-")
    assert c.parse_api_key(secret) == ("oauth_client", "cid1", "s3cretcid1")
    client = c.find_api_key(r.state, "cid1", kind="oauth_client")
    assert client.scopes == ("auth_keys", "devices:core")
    with pytest.raises(CommandError, match="not found"):
        c.find_api_key(r.state, "cid1")  # not an API key


@pytest.mark.parametrize(
    ("held", "needed", "ok"),
    [
        (("devices:core",), "devices:core", True),
        (("devices:core",), "devices:core:read", True),
        (("devices:core:read",), "devices:core", False),
        (("all:read",), "policy_file:read", True),
        (("all:read",), "policy_file", False),
        (("all",), "dns", True),
        (("auth_keys",), "devices:core:read", False),
    ],
)
def test_scope_grants(held: tuple[str, ...], needed: str, ok: bool) -> None:
    assert c.scope_grants(held, needed) is ok


def test_keys_recorded_before_owners_are_tailnet_admin_keys() -> None:
    old = b'{"type":"apikey.created","key_id":1,"prefix":"p","secret_sha256":"00"}'
    event = decode_event("apikey.created", 1, old)
    assert isinstance(event, ApiKeyCreated)
    assert (event.kind, event.user_id, event.role, event.scopes) == ("apikey", None, "admin", ())
