"""DERP configuration glue: mesh keys and peers, and how the DERP map is assembled.

``relay_config`` turns ``derp.server`` into the relay's settings (for ``serve`` and
``relay`` alike); ``assemble_derp_map`` merges ``derp.paths``, ``derp.urls`` and the
embedded region. Both are pure, so these tests feed them configurations and bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
import trio

from cli.config import ConfigError, load_config
from cli.network import relay_region
from cli.settings import TAILSCALE_DEFAULT_DERP_MAP_URL, assemble_derp_map, relay_config
from projections.derpmap import embedded_region
from relay import AllowAll, MeshPeer, serve_relay

KEY = "ab" * 32


def _map(*region_ids: int, omit: bool = False, host: str = "derp.example.com") -> bytes:
    regions = {
        str(rid): {"RegionID": rid, "RegionCode": f"r{rid}", "Nodes": [{"Name": f"{rid}a", "HostName": host}]}
        for rid in region_ids
    }
    doc: dict[str, object] = {"Regions": regions}
    if omit:
        doc["omitDefaultRegions"] = True
    return json.dumps(doc).encode()


# -- mesh ---------------------------------------------------------------------


def test_mesh_peers_from_toml_skip_this_relay(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        f"""
[derp.server]
listen_addr = "10.0.0.1:443"
hostname = "derp1.example.com"
mesh_key = "{KEY}"

[[derp.server.mesh_with]]
url = "https://derp1.example.com/derp"

[[derp.server.mesh_with]]
url = "https://derp2.example.com/derp"
cert_name = "sha256-raw:{'00' * 32}"
dial_host = "10.0.0.2"

[[derp.server.mesh_with]]
url = "https://derp3.example.com:8443/derp"
"""
    )
    rc = relay_config(load_config(f, {"TAILLEDGER_DATA": str(tmp_path)}))
    assert rc.mesh_key == KEY
    # derp1 is this relay (same host name, port 443): one shared list serves the whole region.
    assert rc.mesh_with == (
        MeshPeer(url="https://derp2.example.com/derp", cert_name=f"sha256-raw:{'00' * 32}", dial_host="10.0.0.2"),
        MeshPeer(url="https://derp3.example.com:8443/derp"),
    )


def test_mesh_from_environment_with_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_text(KEY.upper() + "\n")
    env = {
        "TAILLEDGER_DATA": str(tmp_path),
        "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": "127.0.0.1:3340",
        "TAILLEDGER_DERP__SERVER__MESH_KEY_FILE": str(key_file),
        "TAILLEDGER_DERP__SERVER__MESH_WITH": (
            '[{url = "http://127.0.0.1:3340/derp"}, {url = "http://127.0.0.1:3341/derp"}]'
        ),
    }
    rc = relay_config(load_config(None, env))
    assert rc.mesh_key == KEY.upper()
    assert rc.mesh_with == (MeshPeer(url="http://127.0.0.1:3341/derp"),)
    assert rc.tls == "self-signed"
    assert rc.data_dir == str(tmp_path / "relay")


def test_no_mesh_by_default(tmp_path: Path) -> None:
    rc = relay_config(load_config(None, {"TAILLEDGER_DATA": str(tmp_path)}))
    assert (rc.mesh_key, rc.mesh_with) == (None, ())


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('mesh_key = "abc"', "derp.server.mesh_key: must be 64 hexadecimal digits"),
        (f'mesh_key = "{KEY}"\nmesh_key_file = "/k"', "give mesh_key or mesh_key_file, not both"),
        ('mesh_with = [{url = "https://d/derp"}]', "meshing needs mesh_key or mesh_key_file"),
        (f'mesh_key = "{KEY}"\nmesh_with = [{{url = "d:443"}}]', "mesh_with[0].url: 'd:443' is not an http(s)://"),
        (
            f'mesh_key = "{KEY}"\nmesh_with = [{{url = "https://d/derp", cert_name = "d"}}]',
            "only sha256-raw:<hex> pins",
        ),
        ('mesh_with = [{adress = "x"}]', "unknown field `adress`"),
    ],
)
def test_bad_mesh_settings_are_explained(tmp_path: Path, toml: str, message: str) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[derp.server]\n{toml}\n")
    with pytest.raises(ConfigError) as excinfo:
        load_config(f, {})
    assert message in str(excinfo.value)


def test_unreadable_mesh_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    for path, message in ((tmp_path / "missing.key", "cannot read"), (bad, "does not hold 64 hexadecimal digits")):
        config = load_config(None, {"TAILLEDGER_DATA": str(tmp_path), "TAILLEDGER_DERP__SERVER__MESH_KEY_FILE": str(path)})
        with pytest.raises(ConfigError, match=message):
            relay_config(config)


# -- abuse bounds: rate and connections per node key ----------------------------------


def test_relay_limits_are_on_by_default_and_reach_the_relay(tmp_path: Path) -> None:
    rc = relay_config(load_config(None, {"TAILLEDGER_DATA": str(tmp_path)}))
    assert (rc.rate_limit, rc.rate_burst) == (8 << 20, 1 << 20)
    assert (rc.max_conns_per_key, rc.key_limit_policy) == (4, "close_oldest")
    f = tmp_path / "c.toml"
    f.write_text(
        "[derp.server]\nrate_limit = 0\nmax_conns_per_key = 1\nkey_limit_policy = \"refuse_new\"\n"
    )
    rc = relay_config(load_config(f, {"TAILLEDGER_DATA": str(tmp_path)}))
    assert (rc.rate_limit, rc.max_conns_per_key, rc.key_limit_policy) == (0, 1, "refuse_new")


async def test_default_relay_limits_are_accepted_by_the_relay(tmp_path: Path) -> None:
    config = relay_config(load_config(None, {"TAILLEDGER_DATA": str(tmp_path)}))
    config = msgspec.structs.replace(config, listen_host="127.0.0.1", listen_port=0, tls="off", stun=False)
    async with trio.open_nursery() as nursery:
        relay = await nursery.start(serve_relay, config, AllowAll())
        assert (relay.core.rate_limit, relay.core.max_conns_per_key) == (8 << 20, 4)
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("rate_limit = -1", "derp.server.rate_limit: must be 0 (unlimited)"),
        ("rate_burst = 1500", "derp.server.rate_burst: 1500 is less than one maximum-size packet (65573 bytes)"),
        ("rate_limit = 0\nrate_burst = 1500", None),  # no rate, no bucket to size
        ("max_conns_per_key = -2", "derp.server.max_conns_per_key: must be 0 (unlimited)"),
        ('key_limit_policy = "kick"', "derp.server.key_limit_policy: 'kick' is not 'close_oldest' or 'refuse_new'"),
        ('rate_limit = "fast"', "Expected `int`, got `str`"),
    ],
)
def test_bad_relay_limits_are_explained(tmp_path: Path, toml: str, message: str | None) -> None:
    f = tmp_path / "c.toml"
    f.write_text(f"[derp.server]\n{toml}\n")
    if message is None:
        load_config(f, {})
        return
    with pytest.raises(ConfigError) as excinfo:
        load_config(f, {})
    assert message in str(excinfo.value)


# -- DERP map sources ------------------------------------------------------------


def test_files_then_urls_then_embedded(tmp_path: Path) -> None:
    config = load_config(None, {
        "TAILLEDGER_DATA": str(tmp_path),
        "TAILLEDGER_DERP__PATHS": '["/etc/a.json"]',
        "TAILLEDGER_DERP__URLS": '["https://maps.example/b.json"]',
    })
    embedded = embedded_region(host_name="relay.internal", derp_port=443, region_id=999)
    derp = assemble_derp_map(
        config,
        files={"/etc/a.json": _map(900, 901, host="from-file")},
        urls={"https://maps.example/b.json": _map(901, 999, host="from-url")},
        embedded=embedded,
    )
    regions = derp.regions or {}
    assert sorted(regions) == [900, 901, 999]
    hosts = {rid: [n.host_name for n in r.nodes or []] for rid, r in regions.items()}
    # A later source replaces a region with the same ID; the embedded relay comes last.
    assert hosts == {900: ["from-file"], 901: ["from-url"], 999: ["relay.internal"]}


def test_tailscale_default_map_sits_below_and_can_be_omitted(tmp_path: Path) -> None:
    env = {
        "TAILLEDGER_DATA": str(tmp_path),
        "TAILLEDGER_DERP__URLS": f'["https://maps.example/ours.json", "{TAILSCALE_DEFAULT_DERP_MAP_URL}"]',
    }
    urls = {
        TAILSCALE_DEFAULT_DERP_MAP_URL: _map(1, 2, 900, host="tailscale"),
        "https://maps.example/ours.json": _map(900, host="ours"),
    }
    kept = assemble_derp_map(load_config(None, env), files={}, urls=urls, embedded=None)
    regions = kept.regions or {}
    assert sorted(regions) == [1, 2, 900]
    # Listed last, yet below every other source: our 900 wins.
    assert [n.host_name for n in regions[900].nodes or []] == ["ours"]

    omitted = assemble_derp_map(
        load_config(None, {**env, "TAILLEDGER_DERP__OMIT_DEFAULT_REGIONS": "true"}),
        files={},
        urls=urls,
        embedded=None,
    )
    assert sorted(omitted.regions or {}) == [900]

    # A source can ask for the same (Tailscale's policy-file derpMap semantics).
    by_source = assemble_derp_map(
        load_config(None, env),
        files={},
        urls={**urls, "https://maps.example/ours.json": _map(900, omit=True)},
        embedded=None,
    )
    assert sorted(by_source.regions or {}) == [900]


def test_without_sources_only_the_embedded_region(tmp_path: Path) -> None:
    config = load_config(None, {"TAILLEDGER_DATA": str(tmp_path)})
    embedded = embedded_region(host_name="127.0.0.1", derp_port=3340, region_id=999)
    assert list(assemble_derp_map(config, files={}, urls={}, embedded=embedded).regions or {}) == [999]
    assert assemble_derp_map(config, files={}, urls={}, embedded=None).regions == {}


def test_a_broken_source_is_named(tmp_path: Path) -> None:
    config = load_config(None, {"TAILLEDGER_DATA": str(tmp_path), "TAILLEDGER_DERP__PATHS": '["/etc/bad.json"]'})
    with pytest.raises(ConfigError, match=r"derp: /etc/bad.json: .*RegionID"):
        assemble_derp_map(
            config,
            files={"/etc/bad.json": b'{"Regions": {"900": {"RegionID": 901}}}'},
            urls={},
            embedded=None,
        )


# -- the relay's own region ------------------------------------------------------------


async def test_relay_region_names_public_ports_and_the_pin(tmp_path: Path) -> None:
    env = {
        "TAILLEDGER_DATA": str(tmp_path),
        "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": "127.0.0.1:0",
        "TAILLEDGER_DERP__SERVER__STUN_LISTEN_ADDR": "127.0.0.1:0",
        "TAILLEDGER_DERP__SERVER__HOSTNAME": "localhost",
        "TAILLEDGER_DERP__SERVER__REGION_ID": "905",
        "TAILLEDGER_DERP__SERVER__NODE_NAME": "905b",
    }
    for extra, ports in (
        ({}, None),
        ({"TAILLEDGER_DERP__SERVER__PUBLIC_DERP_PORT": "443", "TAILLEDGER_DERP__SERVER__PUBLIC_STUN_PORT": "3479"}, (0, 3479)),
    ):
        config = load_config(None, {**env, **extra})
        async with trio.open_nursery() as nursery:
            relay = await nursery.start(serve_relay, relay_config(config), AllowAll())
            region = relay_region(config, relay)
            nursery.cancel_scope.cancel()
        assert (region.region_id, region.region_code) == (905, "tailledger")
        (node,) = region.nodes or []
        assert (node.name, node.host_name, node.region_id) == ("905b", "localhost", 905)
        assert node.cert_name == relay.cert_name and node.cert_name.startswith("sha256-raw:")
        assert relay.stun is not None
        # 443 is written as 0 (the default) in a DERP map.
        assert (node.derp_port, node.stun_port) == (ports or (relay.derp_port, relay.stun.port))


@pytest.mark.parametrize("value", ["-1", "70000"])
def test_public_ports_are_checked(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"derp\.server\.public_derp_port"):
        load_config(None, {"TAILLEDGER_DATA": str(tmp_path), "TAILLEDGER_DERP__SERVER__PUBLIC_DERP_PORT": value})


def test_behind_a_proxy_the_public_url_is_recognised_as_this_relay(tmp_path: Path) -> None:
    env = {
        "TAILLEDGER_DATA": str(tmp_path),
        "TAILLEDGER_DERP__SERVER__LISTEN_ADDR": "127.0.0.1:3340",
        "TAILLEDGER_DERP__SERVER__TLS": "false",
        "TAILLEDGER_DERP__SERVER__HOSTNAME": "derp1.example.com",
        "TAILLEDGER_DERP__SERVER__PUBLIC_DERP_PORT": "443",
        "TAILLEDGER_DERP__SERVER__MESH_KEY": KEY,
        "TAILLEDGER_DERP__SERVER__MESH_WITH": (
            '[{url = "https://derp1.example.com/derp"}, {url = "https://derp2.example.com/derp"}]'
        ),
    }
    rc = relay_config(load_config(None, env))
    assert [p.url for p in rc.mesh_with] == ["https://derp2.example.com/derp"]
    assert rc.tls == "off"
