"""Settings from the configuration (:mod:`cli.settings`): durations are parsed once,
by the configuration, and every settings object is built from those values."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

import cli.config
from cli.config import Config, ConfigError, load_config
from cli.durations import parse_duration
from cli.settings import control_settings, pending_limits, serve_options
from projections.tailcfg import DERPMap


def test_durations_are_parsed_once_when_the_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counting(text: str) -> timedelta | None:
        calls.append(text)
        return parse_duration(text)

    monkeypatch.setattr(cli.config, "parse_duration", counting)
    config = load_config(
        None,
        {
            "TAILLEDGER_NODE_KEY_EXPIRY": "90d",
            "TAILLEDGER_TUNING__FULL_MAP_TURN_TIMEOUT": "7s",
            "TAILLEDGER_OIDC__EXPIRY": "12h",
        },
    )
    parsed = len(calls)
    assert parsed > 0
    settings = control_settings(config, DERPMap())
    options = serve_options(config)
    limits = pending_limits(config)
    assert len(calls) == parsed  # nothing parsed again
    assert config.durations is config.durations
    assert settings.node_key_expiry == timedelta(days=90)
    assert settings.full_map_turn == 7.0
    assert settings.keepalive_interval == 55.0
    assert options.head_timeout == 10.0
    assert limits.ttl == timedelta(minutes=30)
    assert config.durations.oidc_expiry == timedelta(hours=12)


def test_a_configuration_not_loaded_through_load_config_is_checked_on_first_use() -> None:
    """A bad duration is a ConfigError naming the key wherever it is first needed."""
    config = msgspec.convert({"limits": {"write_timeout": "0"}}, type=Config)
    with pytest.raises(ConfigError, match=r"^limits\.write_timeout: must be a positive duration$"):
        serve_options(config)
    config = msgspec.convert({"tuning": {"route_failover_grace": "soon"}}, type=Config)
    with pytest.raises(ConfigError, match=r"^tuning\.route_failover_grace: malformed duration"):
        control_settings(config, DERPMap())


def test_changing_a_duration_gives_a_configuration_with_its_own_durations() -> None:
    config = load_config(None, {})
    changed = msgspec.structs.replace(config, node_key_expiry="1h")
    assert config.durations.node_key_expiry is None
    assert changed.durations.node_key_expiry == timedelta(hours=1)
    assert changed == msgspec.convert(msgspec.to_builtins(changed), type=Config)  # still plain data
