"""``POST /verify`` answers Tailscale's derper (``--verify-client-url``): a registered
node's key is allowed, an unknown or expired one is not, bad input is a 400."""

from __future__ import annotations

from pathlib import Path

import httpx

from .control_harness import ADMIN, SimNode, make_key, running


async def test_verify_admits_registered_unexpired_node_keys(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}) as server:
        key = await make_key(server)
        a = SimNode.new("alpha")
        async with a.connect(server) as client:
            await client.register(a.register_request(key))
        url = f"http://127.0.0.1:{server.port}/verify"
        head = server.tailnet.state.seq
        async with httpx.AsyncClient() as http:

            async def ask(node_key: str) -> object:
                resp = await http.post(url, json={"NodePublic": node_key, "Source": "192.0.2.7"})
                assert resp.status_code == 200, resp.text
                return resp.json()

            assert await ask(a.node_key) == {"Allow": True}
            assert await ask(SimNode.new("stranger").node_key) == {"Allow": False}
            for body in (b"{", b'{"Source": "192.0.2.7"}', b'{"NodePublic": "mkey:00"}'):
                resp = await http.post(url, content=body)
                assert resp.status_code == 400 and "bad request" in resp.text
            await server.ops.dispatch("nodes.expire", {"node": "alpha"}, ADMIN)
            assert await ask(a.node_key) == {"Allow": False}
        assert server.tailnet.state.seq == head + 1  # only the expiry: /verify appends nothing
