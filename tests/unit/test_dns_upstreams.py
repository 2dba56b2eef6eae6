"""guardd.dns.upstreams: upstream DNS servers from flags and resolv.conf (nothing is sent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardd.dns.upstreams import Upstream, parse_upstream, upstreams_from_resolv_conf
from guardd.errors import ConfigError


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.53", Upstream("192.0.2.53", 53)),
    ("192.0.2.53:5353", Upstream("192.0.2.53", 5353)),
    (" 192.0.2.53 ", Upstream("192.0.2.53", 53)),
    ("::1", Upstream("::1", 53)),
    ("[::1]:5353", Upstream("::1", 5353)),
    ("[::1]", Upstream("::1", 53)),
    ("2001:DB8:0::53", Upstream("2001:db8::53", 53)),
])
def test_parse_upstream(text: str, expected: Upstream) -> None:
    assert parse_upstream(text) == expected


@pytest.mark.parametrize("text", [
    "", "dns.example", "192.0.2.53:", "192.0.2.53:0", "192.0.2.53:65536", "192.0.2.53:x",
    "[::1", "[::1]5353", "[::1]:", "256.1.1.1", "0.0.0.0", "[::]:53",
])
def test_parse_upstream_rejects(text: str) -> None:
    with pytest.raises(ConfigError, match="invalid upstream DNS server"):
        parse_upstream(text)


def test_upstreams_from_resolv_conf(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("# comment\nsearch example.com\nnameserver 127.0.0.1\nnameserver 0.0.0.0\n"
                    "nameserver bogus\nnameserver 192.0.2.53 # trailing\n; other comment\n"
                    "nameserver 2001:db8::53\noptions ndots:1\n")
    assert upstreams_from_resolv_conf(path, exclude={("127.0.0.1", 53)}) == [
        Upstream("192.0.2.53"), Upstream("2001:db8::53")]
    other_port = upstreams_from_resolv_conf(path, exclude={("127.0.0.1", 5353)})
    assert other_port[0] == Upstream("127.0.0.1")


def test_resolv_conf_without_usable_server(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 0.0.0.0\nnameserver ::1\n")
    with pytest.raises(ConfigError, match="--upstream"):
        upstreams_from_resolv_conf(path, exclude={("::1", 53)})
    with pytest.raises(ConfigError, match="--upstream"):
        upstreams_from_resolv_conf(path.with_name("missing"))


def test_an_upstream_prints_as_host_port() -> None:
    assert [str(Upstream("192.0.2.53")), str(Upstream("2001:db8::53", 5353))] == [
        "192.0.2.53:53", "[2001:db8::53]:5353"]
