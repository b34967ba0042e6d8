"""The connection limits of ``[limits]`` (issue 14): parsed, checked, handed to the server."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from cli.config import ConfigError, load_config
from cli.settings import serve_options
from protocol import ServeOptions


def test_defaults_are_the_servers_defaults() -> None:
    options = serve_options(load_config(None, {}))
    defaults = ServeOptions()
    for name in (
        "head_timeout",
        "body_timeout",
        "tunnel_idle_timeout",
        "write_timeout",
        "max_outgoing_buffer",
        "max_connections",
        "max_connections_per_address",
        "cap_exempt",
        "tls_handshake_timeout",
    ):
        assert getattr(options, name) == getattr(defaults, name), name


def test_the_idle_timeout_outlasts_the_map_keepalive() -> None:
    """Healthy clients keep a long poll open; even so, an idle timer shorter than
    the keep-alive would be a trap for anyone who changes one of them."""
    config = load_config(None, {})
    assert serve_options(config).tunnel_idle_timeout > 55 * 2


def test_file_and_environment_set_the_limits(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        "[limits]\n"
        'head_timeout = "5s"\n'
        'tunnel_idle_timeout = "10m"\n'
        "max_connections_per_address = 7\n"
        'connection_cap_exempt = ["10.1.0.0/16"]\n'
    )
    config = load_config(
        f, {"TAILLEDGER_LIMITS__BODY_TIMEOUT": "1m", "TAILLEDGER_LIMITS__MAX_OUTGOING_BUFFER": "1048576"}
    )
    options = serve_options(config)
    assert options.head_timeout == 5
    assert options.body_timeout == 60
    assert options.tunnel_idle_timeout == 600
    assert options.max_connections_per_address == 7
    assert options.max_outgoing_buffer == 1 << 20
    assert options.cap_exempt == (ipaddress.ip_network("10.1.0.0/16"),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("head_timeout = '0s'", "limits.head_timeout: must be a positive duration"),
        ("body_timeout = 'soon'", "limits.body_timeout: malformed duration"),
        ("tunnel_idle_timeout = '0'", "limits.tunnel_idle_timeout: must be a positive duration"),
        ("max_connections = 0", "limits.max_connections: must be at least 1"),
        ("max_outgoing_buffer = -1", "limits.max_outgoing_buffer: must be at least 1"),
        ("connection_cap_exempt = ['localhost']", "limits.connection_cap_exempt[0]:"),
        ("max_connections = '10'", "Expected `int`, got `str` (at limits.max_connections)"),
    ],
)
def test_bad_limits_are_explained(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[limits]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(f, {})
    assert message in str(info.value)
