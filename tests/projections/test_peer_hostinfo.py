"""The stored peer Hostinfo is its own slim type (issue 19, memory): only the kept
fields, with Hostinfo's names, types, defaults and order, so a node's peers get the
very bytes they got when the server kept a trimmed full Hostinfo."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from projections.tailcfg import (
    PEER_HOSTINFO_FIELDS,
    Hostinfo,
    Location,
    NetInfo,
    Node,
    PeerHostinfo,
    Service,
    TPMInfo,
    encode,
    peer_hostinfo,
)


def everything_set() -> Hostinfo:
    """A Hostinfo with no field at its default."""
    return Hostinfo(
        ipn_version="1.80.3-t1", frontend_log_id="f", backend_log_id="b", os="linux", os_version="6.8",
        container=True, env="k8s", distro="ubuntu", distro_version="24.04", distro_code_name="noble",
        app="tailscale", desktop=False, package="deb", device_model="pi", push_device_token="t",
        hostname="host", shields_up=True, sharee_node=True, no_logs_no_support=True, remote_config=True,
        wire_ingress=True, ingress_enabled=True, allows_update=True, machine="x86_64", go_arch="amd64",
        go_arch_var="v1", go_version="go1.23", routable_ips=["10.0.0.0/24"], request_tags=["tag:a"],
        wol_macs=["aa:bb:cc:dd:ee:ff"], services=[Service(proto="peerapi4", port=1)],
        net_info=NetInfo(preferred_derp=3), ssh_host_keys=["ssh-ed25519 AAAA"], cloud="aws",
        userspace=False, userspace_router=True, app_connector=False, services_hash="h", peer_relay=True,
        exit_node_id="n1", location=Location(city="Oslo"), tpm=TPMInfo(vendor="v"), state_encrypted=True,
    )


def test_peer_hostinfo_fields_are_hostinfos_own_in_the_same_order() -> None:
    full = {f.name: f for f in msgspec.structs.fields(Hostinfo)}
    slim = msgspec.structs.fields(PeerHostinfo)
    assert tuple(f.name for f in slim) == PEER_HOSTINFO_FIELDS
    assert len(slim) < len(full)
    order = [name for name in full if name in PEER_HOSTINFO_FIELDS]
    assert [f.name for f in slim] == order
    for f in slim:
        assert (f.encode_name, f.type, f.default) == (full[f.name].encode_name, full[f.name].type, full[f.name].default)


def test_the_kept_hostinfo_encodes_as_the_trimmed_full_one_did() -> None:
    for sent in (everything_set(), Hostinfo(), Hostinfo(hostname="h", routable_ips=[], services=[])):
        kept = peer_hostinfo(sent)
        assert type(kept) is PeerHostinfo
        trimmed = Hostinfo(**{name: getattr(sent, name) for name in PEER_HOSTINFO_FIELDS})
        assert encode(kept) == encode(trimmed)
        node = Node(id=1, hostinfo=kept, created=datetime(2026, 1, 1, tzinfo=UTC))
        as_before = msgspec.structs.replace(node, hostinfo=trimmed)
        assert encode(node) == encode(as_before)
        # What a peer decodes is what was kept (no field lost on the way).
        assert msgspec.json.decode(encode(node), type=Node).hostinfo == kept
    assert b"BackendLogID" not in encode(peer_hostinfo(everything_set()))
