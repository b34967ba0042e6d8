"""``[oidc]`` configuration, and who may sign in as which user (no provider needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from cli.config import ConfigError, OIDCConfig, load_config
from cli.oidc import (
    Identity,
    LoginRefused,
    check_access,
    decide_login_user,
    identity_from_claims,
    user_name_for,
)
from eventlog import Actor, ActorKind
from eventlog.envelope import RecordedEvent
from projections import TailnetState
from projections import commands as c
from projections.fold import apply

SECRET = "s3cret-value-that-must-not-leak"
ISSUER = "https://id.example.com"


def _env(**oidc: str) -> dict[str, str]:
    env = {"TAILLEDGER_OIDC__ISSUER": ISSUER, "TAILLEDGER_OIDC__CLIENT_ID": "tailledger"}
    env.update({f"TAILLEDGER_OIDC__{k.upper()}": v for k, v in oidc.items()})
    return env


def test_config_check_never_shows_the_client_secret(tmp_path: Path) -> None:
    conf = tmp_path / "tailledger.toml"
    conf.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[oidc]\nissuer = "{ISSUER}"\nclient_id = "x"\nclient_secret = "{SECRET}"\n'
        '[audit]\nsigning_key_file = "/nonexistent/key"\n'
    )
    for output in ([], ["-o", "json"]):
        done = subprocess.run(
            [sys.executable, "-m", "cli", "config", "check", "-c", str(conf), *output],
            capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2],
        )
        assert SECRET not in done.stdout + done.stderr
    assert json.loads(done.stdout)["oidc"]["client_secret"] == "<redacted>"
    assert json.loads(done.stdout)["oidc"]["use_expiry_from_token"] is False  # a flag, not a secret


def test_a_secret_file_is_read_and_its_problems_explained(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(SECRET + "\n")
    load_config(env=_env(client_secret_path=str(secret)))
    with pytest.raises(ConfigError, match="cannot read") as missing:
        load_config(env=_env(client_secret_path=str(tmp_path / "nope")))
    secret.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_config(env=_env(client_secret_path=str(secret)))
    with pytest.raises(ConfigError, match="one of them"):
        load_config(env=_env(client_secret=SECRET, client_secret_path=str(secret)))
    assert SECRET not in str(missing.value)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"issuer": "http://id.example.com"}, "is not an https:// URL"),
        ({"client_id": '""'}, "client_id: needed"),
        ({"pkce__method": "S512"}, "is not S256 or plain"),
        ({"scope": '["profile"]'}, 'must include "openid"'),
        ({"expiry": "forever"}, "oidc.expiry"),
        ({"allowed_domains": '["@example.com"]'}, "is not a domain"),
    ],
)
def test_bad_oidc_settings_are_explained(change: dict[str, str], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        load_config(env=_env(client_secret=SECRET, **change))


def test_loopback_http_issuer_and_defaults() -> None:
    config = load_config(env=_env(client_secret=SECRET, issuer="http://127.0.0.1:9000")).oidc
    assert config.pkce.enabled and config.pkce.method == "S256"
    assert config.email_verified_required and config.groups_claim == "groups"


def _who(**kw: object) -> Identity:
    base: dict[str, object] = {"issuer": ISSUER, "subject": "sub-1", "email": "alice@example.com", "email_verified": True}
    base.update(kw)
    return Identity(**base)  # type: ignore[arg-type]


def _oidc(**kw: object) -> OIDCConfig:
    return msgspec.convert({"issuer": ISSUER, "client_id": "x", "client_secret": "y", **kw}, type=OIDCConfig)


@pytest.mark.parametrize(
    ("config", "who", "refused"),
    [
        ({}, {}, None),
        ({}, {"email_verified": False}, "not verified"),
        ({"email_verified_required": False}, {"email_verified": False}, None),
        ({"allowed_domains": ["Example.com"]}, {}, None),
        ({"allowed_domains": ["example.org"]}, {}, "domain example.com"),
        ({"allowed_users": ["alice@example.com"]}, {}, None),
        ({"allowed_users": ["bob@example.com"]}, {}, "allowed_users"),
        ({"allowed_groups": ["eng"]}, {"groups": ("eng", "ops")}, None),
        ({"allowed_groups": ["eng"]}, {"groups": ("ops",)}, "allowed_groups"),
    ],
)
def test_who_may_sign_in(config: dict[str, object], who: dict[str, object], refused: str | None) -> None:
    if refused is None:
        check_access(_oidc(**config), _who(**who))
    else:
        with pytest.raises(LoginRefused, match=refused):
            check_access(_oidc(**config), _who(**who))


def test_claims_to_identity_with_a_custom_groups_claim() -> None:
    who = identity_from_claims(
        ISSUER,
        {"sub": "u1", "email": "a@b.c", "email_verified": "true", "roles": "eng", "exp": 1_800_000_000, "name": "A"},
        "roles",
    )
    assert who.groups == ("eng",) and who.email_verified and who.name == "A"
    assert who.expires == datetime.fromtimestamp(1_800_000_000, UTC)
    assert str(who.actor) == f"oidc:{ISSUER}#u1"
    with pytest.raises(LoginRefused):
        identity_from_claims(ISSUER, {"email": "a@b.c"}, "groups")


def test_user_names() -> None:
    assert user_name_for(_oidc(), _who()) == "alice@example.com"
    assert user_name_for(_oidc(strip_email_domain=True), _who()) == "alice"
    assert user_name_for(_oidc(), _who(email="", preferred_username="al")) == "al"


def _fold(state: TailnetState, decision: c.Decision[int]) -> TailnetState:
    for i, event in enumerate(decision.events):
        recorded = RecordedEvent(
            seq=state.seq + 1 + i, recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
            actor=Actor(kind=ActorKind.OIDC, id="x"), type=event.type_name(), schema=1, event=event,
            prev_hash="", hash="",
        )
        state, _ = apply(state, recorded)
    return state


def test_login_creates_then_updates_only_what_changed() -> None:
    config = _oidc(admin_groups=["admins"])
    state = TailnetState()
    first = decide_login_user(state, config, _who(name="Alice", picture="https://p/a.png"))
    assert [e.type_name() for e in first.events] == ["user.created"]
    state = _fold(state, first)
    user = state.users[first.result]
    assert (user.name, user.provider, user.provider_id, user.profile_pic_url) == (
        "alice@example.com", "oidc", "sub-1", "https://p/a.png",
    )
    assert not decide_login_user(state, config, _who(name="Alice", picture="https://p/a.png")).events
    renamed = decide_login_user(state, config, _who(name="Alice B.", picture="https://p/a.png"))
    assert [e.type_name() for e in renamed.events] == ["user.profile_updated"]
    # A second person in the admin groups is created an admin; a member who joins them is made one.
    bob = decide_login_user(state, config, _who(subject="sub-2", email="bob@example.com", groups=("admins",)))
    assert bob.events[0].role == "admin"  # type: ignore[union-attr]
    carol = decide_login_user(state, config, _who(subject="sub-3", email="carol@example.com"))
    state = _fold(state, carol)
    assert state.users[carol.result].role == "member"
    promoted = decide_login_user(state, config, _who(subject="sub-3", email="carol@example.com", groups=("admins",)))
    assert [e.type_name() for e in promoted.events] == ["user.role_set"]


def test_a_user_made_by_an_admin_is_linked_only_with_a_verified_email() -> None:
    config = _oidc(email_verified_required=False)
    state = TailnetState()
    made = c.decide_create_user(state, "alice@example.com")
    state = _fold(state, made)
    with pytest.raises(LoginRefused, match="taken"):
        decide_login_user(state, config, _who(email_verified=False))
    linked = decide_login_user(state, config, _who())
    assert linked.result == made.result and [e.type_name() for e in linked.events] == ["user.profile_updated"]
    state = _fold(state, linked)
    with pytest.raises(LoginRefused, match="taken"):  # another subject, same e-mail
        decide_login_user(state, config, _who(subject="sub-other"))
