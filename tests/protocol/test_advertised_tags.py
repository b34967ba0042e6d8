"""``tailscale up --advertise-tags``: Hostinfo.RequestTags honoured at registration and
later, as events, when the node's user owns the tags per ``tagOwners``; refused with
Tailscale's message otherwise, appending nothing. A tagged node belongs to its tags."""

from __future__ import annotations

from pathlib import Path

import msgspec

from eventlog.events import NodeTagsSet
from projections.policystate import policy_node
from projections.tailcfg import Hostinfo, NetInfo

from .control_harness import ADMIN, SimNode, make_key, running

POLICY = """{
  "groups": {"group:dba": ["bob@"]},
  "tagOwners": {"tag:web": ["alice@"], "tag:db": ["group:dba"]},
  "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}]
}"""


def _hostinfo(node: SimNode, tags: list[str]) -> Hostinfo:
    return Hostinfo(hostname=node.hostname, os="linux", net_info=NetInfo(preferred_derp=999), request_tags=tags)


async def test_owned_tags_apply_at_registration_and_later_unowned_are_refused(tmp_path: Path) -> None:
    async with running(tmp_path, derp={"server": {"enabled": False}}, node_key_expiry="90d") as server:
        await server.ops.dispatch("policy.set", {"text": POLICY}, ADMIN)
        key = await make_key(server, reusable=True)  # alice's

        # Registration asking for a tag alice does not own: refused, nothing appended.
        bad = SimNode.new("bad")
        head = server.tailnet.state.seq
        async with bad.connect(server) as client:
            resp = await client.register(
                msgspec.structs.replace(bad.register_request(key), hostinfo=_hostinfo(bad, ["tag:db"]))
            )
        assert resp.error == "requested tags [tag:db] are invalid or not permitted"
        assert server.tailnet.state.seq == head

        # One she owns: the node is tagged, belongs to its tag, and its key never expires.
        web = SimNode.new("web")
        async with web.connect(server) as client:
            resp = await client.register(
                msgspec.structs.replace(web.register_request(key), hostinfo=_hostinfo(web, ["tag:web"]))
            )
        assert resp.error == ""
        node = server.tailnet.state.node_by_key(web.node_key.removeprefix("nodekey:"))
        assert node is not None and node.tags == ("tag:web",) and node.expiry is None
        assert policy_node(node).user_id is None
        tagged = [(e.event.tags, e.actor.kind.value) for e in server.store.read() if isinstance(e.event, NodeTagsSet)]
        assert tagged == [(("tag:web",), "node")]

        # Later: an untagged node asks for tags in a map update.
        late = SimNode.new("late")
        async with late.connect(server) as client:
            await client.register(late.register_request(key))
            for tags, expected in ((["tag:db"], ()), (["tag:web"], ("tag:web",))):
                request = msgspec.structs.replace(
                    late.map_request(stream=False, omit_peers=True), hostinfo=_hostinfo(late, tags)
                )
                before = server.tailnet.state.seq
                assert (await client.post_json("/machine/map", request)).status == 200
                node = server.tailnet.state.node_by_key(late.node_key.removeprefix("nodekey:"))
                assert node is not None and node.tags == expected
                if not expected:
                    assert server.tailnet.state.seq == before  # refused: nothing appended
