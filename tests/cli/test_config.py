"""Configuration: defaults, file, environment, and clear explanations of mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli.config import ConfigError, load_config


def test_zero_configuration_defaults() -> None:
    config = load_config(None, {})
    assert config.listen == ("127.0.0.1", 8080)
    assert config.data_path == Path("./tailledger-data")
    assert config.database_path == Path("./tailledger-data/ledger.db")
    assert config.public_url == "http://127.0.0.1:8080"


def test_environment_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text('listen_addr = "127.0.0.1:9000"\n[derp.server]\nregion_id = 900\n')
    config = load_config(f, {"TAILLEDGER_DATA": "/srv/tl", "TAILLEDGER_DERP__SERVER__ENABLED": "true"})
    assert config.listen == ("127.0.0.1", 9000)
    assert config.data_dir == "/srv/tl"
    assert config.derp.server.enabled and config.derp.server.region_id == 900


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lisen_addr = '1'", "unknown field `lisen_addr`"),
        ("[derp.server]\nenabled = 'yes'", "Expected `bool`, got `str` (at derp.server.enabled)"),
        ("listen_addr = 'nowhere'", "listen_addr: 'nowhere' is not HOST:PORT"),
        ("[prefixes]\nv4 = '100.64.0.1/10'", "prefixes.v4: 100.64.0.1/10 has host bits set"),
        ("[prefixes]\nv4 = 'fd00::/8'", "is not an IPv4 prefix"),
        ("node_key_expiry = '3 days'", "node_key_expiry: malformed duration"),
        ("[policy]\nmode = 'file'", "policy.path"),
        ("this is not toml", "not valid TOML"),
        ("[tuning]\nfull_map_concurrency = 0", "tuning.full_map_concurrency: must be at least 1"),
        ("[tuning]\nmalloc_mmap_threshold = -1", "tuning.malloc_mmap_threshold: must be 0 (glibc's default) to"),
        ("[tuning]\nmalloc_mmap_threshold = 67108864", "tuning.malloc_mmap_threshold: must be 0 (glibc's default) to"),
        ("[tuning]\nfull_map_turn_timeout = '0'", "tuning.full_map_turn_timeout: must be a positive"),
        ("[tuning]\nfull_map_turn_timeout = 'soon'", "tuning.full_map_turn_timeout: malformed duration"),
        ("[limits]\nmax_hostinfo_bytes = 100", "limits.max_hostinfo_bytes: must be at least 1024"),
        ("[limits]\nmax_hostname_length = 0", "limits.max_hostname_length: must be at least 1"),
        ("[limits]\nmax_advertised_routes = -1", "limits.max_advertised_routes: must be at least 0"),
        ("[limits]\nnode_update_burst = 0", "limits.node_update_burst: must be at least 1"),
        ("[limits]\nnode_update_interval = '0'", "limits.node_update_interval: must be a positive duration"),
        ("[limits]\nnode_update_interval = 'often'", "limits.node_update_interval: malformed duration"),
        # A bare number where a duration is due: say what to write instead.
        ("[tuning]\nmap_keepalive_interval = 55", 'tuning.map_keepalive_interval: a duration is text with a unit: '
         'write "55s" for 55 seconds'),
        ("node_key_expiry = 0", 'node_key_expiry: a duration is text with a unit: write "0s"'),
        ("[limits]\nmax_connections = '10'", "Expected `int`, got `str` (at limits.max_connections)"),
        ("[derp]\nurls = 5", "Expected `array`, got `int` (at derp.urls)"),
    ],
)
def test_bad_config_is_explained(tmp_path: Path, text: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as excinfo:
        load_config(f, {})
    assert message in str(excinfo.value)


def test_config_check_command(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[prefixes]\nallocation = 'fastest'\n")
    result = subprocess.run([sys.executable, "-m", "cli", "config", "check", "-c", str(f)], capture_output=True, text=True)
    assert result.returncode == 1
    assert "prefixes.allocation: 'fastest' is not 'sequential' or 'random'" in result.stderr
    f.write_text("")
    result = subprocess.run([sys.executable, "-m", "cli", "config", "check", "-c", str(f)], capture_output=True, text=True)
    assert result.returncode == 0 and "configuration OK" in result.stdout


def test_config_check_json_redacts_secrets(tmp_path: Path) -> None:
    mesh_key = "ab" * 32
    public_key = "cd" * 32
    f = tmp_path / "t.toml"
    f.write_text(
        f'data_dir = "{tmp_path / "data"}"\n'
        f'[derp.server]\nmesh_key = "{mesh_key}"\nkey_file = "/etc/tls/derp.key"\n'
        f'[audit]\npublic_key = "{public_key}"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "cli", "config", "check", "-c", str(f), "-o", "json"],
        capture_output=True, text=True, check=True,
    )
    assert mesh_key not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["derp"]["server"]["mesh_key"] == "<redacted>"
    # Paths to secrets and public keys are not secrets.
    assert shown["derp"]["server"]["key_file"] == "/etc/tls/derp.key"
    assert shown["audit"]["public_key"] == public_key
    assert shown["derp"]["server"]["mesh_key_file"] == ""


def test_a_port_of_unicode_digits_is_a_config_error_not_a_crash() -> None:
    # "²".isdigit() is true but int("²") raises: such a port must be refused cleanly.
    from cli.config import ConfigError, split_host_port

    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        split_host_port("127.0.0.1:²", "listen_addr")
