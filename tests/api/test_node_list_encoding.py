"""Node lists on the wire: gzip for clients that accept it (``Vary: Accept-Encoding``),
the JSON as it is for those that do not, and ``304 Not Modified`` for a list the client
has (``ETag``/``If-None-Match``). Read raw, so that what is checked is what was sent."""

from __future__ import annotations

import gzip
import json

import httpx
import pytest

from cli.api.core import accepts_gzip, etag_matches

from .conftest import ApiServer

LISTS = ("/api/v2/tailnet/-/devices", "/api/v1/node")


@pytest.fixture(scope="module")
def nodes(api: ApiServer) -> None:
    """Three nodes, so that the lists are worth compressing."""
    key = api.srv.cli("preauthkeys", "create", "-u", "alice", "--reusable", check=True).stdout.strip()
    for name in ("enc-a", "enc-b", "enc-c"):
        api.register(name, key)


def _raw(api: ApiServer, path: str, **headers: str) -> tuple[httpx.Response, bytes]:
    """GET ``path`` as the admin with ``headers``: the response and its body as sent
    (not decoded)."""
    with (
        httpx.Client(base_url=api.base, verify=api.ssl_context(), timeout=30,
                     headers={"Authorization": f"Bearer {api.admin_key}"}) as http,
        http.stream("GET", path, headers=headers) as response,
    ):
        return response, b"".join(response.iter_raw())


@pytest.mark.parametrize("path", LISTS)
def test_a_list_is_gzip_when_the_client_accepts_it_and_json_otherwise(api: ApiServer, nodes: None, path: str) -> None:
    plain, body = _raw(api, path, **{"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "content-encoding" not in plain.headers
    assert plain.headers["vary"] == "Accept-Encoding" and plain.headers["content-type"] == "application/json"
    assert int(plain.headers["content-length"]) == len(body)
    listed = json.loads(body)
    assert {"enc-a", "enc-b", "enc-c"} <= {n.get("hostname", n.get("givenName")) for n in next(iter(listed.values()))}

    # What aiohttp (the tailscale client) and curl --compressed send.
    packed, wire = _raw(api, path, **{"Accept-Encoding": "gzip, deflate"})
    assert packed.status_code == 200 and packed.headers["content-encoding"] == "gzip"
    assert packed.headers["vary"] == "Accept-Encoding" and packed.headers["content-type"] == "application/json"
    assert int(packed.headers["content-length"]) == len(wire) < len(body)
    assert gzip.decompress(wire) == body  # the same JSON, byte for byte
    assert packed.headers["etag"] != plain.headers["etag"]  # two representations, two tags

    # gzip refused explicitly, though "*" would allow it: the JSON as it is.
    refused, again = _raw(api, path, **{"Accept-Encoding": "gzip;q=0, *"})
    assert "content-encoding" not in refused.headers and again == body


@pytest.mark.parametrize("path", LISTS)
def test_an_unchanged_list_is_304_and_a_changed_one_is_sent(api: ApiServer, nodes: None, path: str) -> None:
    first, body = _raw(api, path, **{"Accept-Encoding": "gzip"})
    etag = first.headers["etag"]
    same, nothing = _raw(api, path, **{"Accept-Encoding": "gzip", "If-None-Match": etag})
    assert same.status_code == 304 and nothing == b"" and same.headers["etag"] == etag
    assert same.headers["vary"] == "Accept-Encoding" and "content-length" not in same.headers
    # The JSON's tag is good for the gzip of that JSON (a weak comparison), and back.
    plain, _ = _raw(api, path, **{"Accept-Encoding": "identity"})
    assert _raw(api, path, **{"Accept-Encoding": "gzip", "If-None-Match": f'"x", W/{plain.headers["etag"]}'}
                )[0].status_code == 304
    assert _raw(api, path, **{"Accept-Encoding": "identity", "If-None-Match": etag})[0].status_code == 304

    # A change in the log: the kept list is gone, the old tag no longer matches.
    with api.client(api.admin_key) as http:
        device = next(d for d in http.get("/api/v2/tailnet/-/devices").json()["devices"] if d["hostname"] == "enc-a")
        new_name = "renamed-v2" if "v2" in path else "renamed-v1"
        assert http.post(f"/api/v2/device/{device['id']}/name", json={"name": new_name}).status_code == 200
    changed, wire = _raw(api, path, **{"Accept-Encoding": "gzip", "If-None-Match": etag})
    assert changed.status_code == 200 and changed.headers["etag"] != etag
    assert new_name.encode() in gzip.decompress(wire) and wire != body


def test_the_bytes_sent_are_counted_by_encoding(api: ApiServer, nodes: None) -> None:
    def sent(encoding: str) -> float:
        prefix = f'tailledger_api_node_list_bytes_total{{encoding="{encoding}"}} '
        return sum(float(line[len(prefix):]) for line in api.metrics().splitlines() if line.startswith(prefix))

    before = {e: sent(e) for e in ("gzip", "identity")}
    _, wire = _raw(api, LISTS[0], **{"Accept-Encoding": "gzip"})
    _, body = _raw(api, LISTS[0], **{"Accept-Encoding": "identity"})
    assert sent("gzip") - before["gzip"] == len(wire)
    assert sent("identity") - before["identity"] == len(body)


@pytest.mark.parametrize(("header", "accepted"), [
    (None, False),
    ("", False),
    ("gzip", True),
    ("GZIP", True),
    ("x-gzip", True),
    ("gzip, deflate", True),  # aiohttp, curl --compressed
    ("gzip, deflate, br, zstd", True),  # httpx with brotli and zstandard, browsers
    ("deflate, br", False),
    ("identity", False),
    ("*", True),
    ("*;q=0", False),
    ("gzip;q=0", False),
    ("gzip; q=0.000", False),
    ("gzip;q=0, *", False),  # an explicit entry wins over "*", before or after it
    ("*, gzip;q=0", False),
    ("br;q=1.0, gzip;q=0.5", True),
    ("gzip;q=bogus", False),
])
def test_accept_encoding(header: str | None, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


def test_if_none_match() -> None:
    assert etag_matches('"a"', '"a"', '"a-gzip"')
    assert etag_matches('"b", W/"a-gzip"', '"a"', '"a-gzip"')
    assert etag_matches("*", '"a"')
    assert not etag_matches('"b"', '"a"', '"a-gzip"')
    assert not etag_matches("a", '"a"')  # not quoted: not the tag
