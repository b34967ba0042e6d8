"""Taildrop and the other tailnet-wide capabilities are settings (``[taildrop]``,
``[capabilities]``): what each node's own CapMap carries follows them."""

from __future__ import annotations

from pathlib import Path

import pytest

from projections.policy.capmap import ATTR_DEFAULT_AUTO_UPDATE, CAP_FILE_SHARING, CAP_SSH

from .control_harness import SimNode, make_key, running


async def _self_caps(tmp_path: Path, **config: object) -> set[str]:
    async with running(tmp_path, derp={"server": {"enabled": False}}, **config) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
            async with client.map_stream(a.map_request()) as stream:
                async for msg in stream:
                    if msg.node is not None:
                        return set(msg.node.cap_map or {})
    raise AssertionError("no map")


@pytest.mark.parametrize(
    ("config", "present", "absent"),
    [
        ({}, {CAP_FILE_SHARING, CAP_SSH}, {ATTR_DEFAULT_AUTO_UPDATE}),
        ({"taildrop": {"enabled": False}}, {CAP_SSH}, {CAP_FILE_SHARING}),
        ({"capabilities": {"ssh": False, "auto_update_default": True}}, {CAP_FILE_SHARING, ATTR_DEFAULT_AUTO_UPDATE},
         {CAP_SSH}),
    ],
)
async def test_capabilities_follow_the_settings(
    tmp_path: Path, config: dict[str, object], present: set[str], absent: set[str]
) -> None:
    caps = await _self_caps(tmp_path, **config)
    assert present <= caps and not (absent & caps)
