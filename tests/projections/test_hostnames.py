"""Host names as nodes report them and as MagicDNS names (projections.commands)."""

from __future__ import annotations

import pytest

from projections.commands import clean_hostname, sanitize_hostname


@pytest.mark.parametrize(
    ("hostname", "label"),
    [
        # Tailscale's dnsname.SanitizeHostname: common suffixes trimmed, separators
        # inside become "-", other characters go, lower case, 63 characters at most.
        ("Web 1", "web-1"),
        ("John's MacBook Pro.local", "johns-macbook-pro"),
        ("box.localdomain", "box"),
        ("nas.lan", "nas"),
        ("db.example.com", "db-example-com"),
        ("user@host", "user-host"),
        ("my_server", "my-server"),
        ("_leading_and_trailing_", "leading-and-trailing"),
        ("--dashes--", "dashes"),
        ("ÄÖ-box", "box"),
        ("a" * 100, "a" * 63),
        ("", "node"),
        ("...", "node"),
        ("already-a-label", "already-a-label"),
    ],
)
def test_magicdns_names_follow_tailscale(hostname: str, label: str) -> None:
    assert sanitize_hostname(hostname) == label


def test_reported_host_names_are_cleaned_and_cut() -> None:
    assert clean_hostname("laptop") == "laptop"
    assert clean_hostname("Jöns PC") == "Jöns PC"  # shown as sent, Unicode and all
    assert clean_hostname("evil\x1b]0;title\x07name\r\n") == "evil]0;titlename"
    assert clean_hostname("x" * 200_000) == "x" * 63
    assert clean_hostname("x" * 200, 100) == "x" * 100
    assert clean_hostname("\x1b" * 1000 + "late") == ""  # nothing sensible within reach
