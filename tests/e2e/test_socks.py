"""The SOCKS5 guard end to end on loopback: the real daemon, real `curl`, python-socks, raw bytes.

Every name the test upstream knows resolves to 127.0.0.1, where the test's own servers listen, so
nothing here can reach past loopback even if guardd were wrong. What must never be connected to at
all (cloud metadata in its many spellings) is tested in test_socks_netns.py, inside a namespace.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from python_socks.sync import Proxy

from guardd.stream.answers import TLS_ACCESS_DENIED

from tests.e2e.harness import (ROOT, Destination, Guardd, Upstream, certificate, require,
                               run)
from tests.e2e.rawsocks import socks_request

EXFIL = ROOT / "policies" / "lists" / "exfil.txt"
POLICY = f"""\
version: "1.0"
rules:
  - id: deny-exfil
    action: network.request
    domainList: {EXFIL}
    effect: deny
    reason: "Exfiltration service"
  - id: docs-read-only
    action: network.request
    domain: "docs.test"
    method: GET
    ip: 127.0.0.0/8
    effect: allow
    reason: "Read-only documentation access"
  - id: docs-no-writes
    action: network.request
    domain: "docs.test"
    effect: deny
    reason: "No write access to documentation service"
  - id: api-rate-limited
    action: network.request
    domain: "api.test"
    ip: 127.0.0.0/8
    rateLimit: {{maxRequests: 60, window: "1 minute"}}
    effect: allow
    reason: "Rate-limited API"
  - id: web
    action: network.request
    domain: ["web.test", "*.web.test"]
    ip: 127.0.0.0/8
    effect: allow
    reason: "Test web servers on loopback"
  - id: other-zone
    action: network.request
    domain: "*.other.test"
    effect: allow
    reason: "Allowed, but may not reach loopback (no ip rule names it)"
  - id: loopback-by-address
    action: network.request
    ip: 127.0.0.0/8
    effect: allow
    reason: "The test explicitly allows 127.0.0.0/8"
  - id: catch-all-deny
    action: "*"
    domain: "*"
    effect: deny
    reason: "Unauthorized outbound domain"
"""
ZONES = {name: ["A 127.0.0.1"] for name in (
    "web.test", "www.web.test", "docs.test", "api.test", "loop.other.test", "x.ngrok.io",
    "evil.burpcollaborator.net")}
NOT_ALLOWED, HOST_UNREACHABLE = 2, 4  # RFC 1928 reply codes


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("socks")


@pytest.fixture(scope="module")
def upstream(directory: Path) -> Iterator[Upstream]:
    server = Upstream(directory, ZONES)
    yield server
    server.stop()


def running(server: Destination) -> Iterator[Destination]:
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web(directory: Path) -> Iterator[Destination]:
    yield from running(Destination(directory, "web"))


@pytest.fixture(scope="module")
def second_web(directory: Path) -> Iterator[Destination]:
    """On 127.0.0.2, an address no name of the upstream resolves to."""
    yield from running(Destination(directory, "web", host="127.0.0.2"))


@pytest.fixture(scope="module")
def echo(directory: Path) -> Iterator[Destination]:
    yield from running(Destination(directory, "echo"))


@pytest.fixture(scope="module")
def banner(directory: Path) -> Iterator[Destination]:
    """Says "banner" first, then reads (logging each read's size) and never answers."""
    yield from running(Destination(directory, "banner"))


@pytest.fixture(scope="module")
def policy(directory: Path, web: Destination) -> Path:
    """POLICY, its `method` rule for loopback at the web server's port (at no port named, a
    connect there never waits for its first bytes: it would open every port of the host)."""
    path = directory / "policy.yaml"
    path.write_text(POLICY.replace("    method: GET\n", f"    method: GET\n    port: {web.port}\n"))
    return path


@pytest.fixture(scope="module")
def guardd(directory: Path, upstream: Upstream, policy: Path) -> Iterator[Guardd]:
    daemon = Guardd.launch(directory, "--policy", str(policy), "--upstream", upstream.address,
                           "--dns", "127.0.0.1:0", "--socks", "127.0.0.1:0", "[::1]:0",
                           "--metrics", "127.0.0.1:0")
    yield daemon
    assert daemon.stop() == 0, daemon.log_text()


def curl(guardd: Guardd, url: str, *options: str, hostname: bool = True, proxy: int = 0
         ) -> subprocess.CompletedProcess[str]:
    host, port = guardd.socks[proxy]
    proxy_text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    flag = "--socks5-hostname" if hostname else "--socks5"
    return run([require("curl"), "-sS", "--max-time", "10", flag, proxy_text, *options, url])


def socks_reply(result: subprocess.CompletedProcess[str]) -> int:
    """The SOCKS reply code curl failed with: "Can't complete SOCKS5 connection to H. (2)" (curl
    7.x and 8.x); newer curls add the RFC's words, "connection not allowed by ruleset"."""
    found = re.search(r"Can't complete SOCKS5 connection to \S+\. \((\d+)\)", result.stderr)
    assert result.returncode == 97 and found, result.stderr  # 97: CURLE_PROXY
    return int(found[1])


def decisions(guardd: Guardd, **where: object) -> list[dict[str, object]]:
    records = guardd.audit_records("action=network.request")
    return [r for r in records if all(r.get(k) == v for k, v in where.items())]


@pytest.mark.parametrize("proxy", [0, 1], ids=["ipv4-listener", "ipv6-listener"])
def test_allowed_name_is_resolved_by_guardd_and_reached(guardd: Guardd, web: Destination,
                                                        proxy: int) -> None:
    result = curl(guardd, f"http://web.test:{web.port}/hello", proxy=proxy)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"GET /hello host=web.test:{web.port}\n"
    record = decisions(guardd, target=f"web.test:{web.port}")[-1]
    assert record["effect"] == "allow" and record["matchedRule"] == "web"
    assert (record["listener"], record["domain"], record["ip"], record["port"]) == (
        "socks", "web.test", "127.0.0.1", web.port)


def test_client_resolved_connect_by_address(guardd: Guardd, web: Destination,
                                            second_web: Destination) -> None:
    """socks5:// (the client resolves): the CONNECT carries an address. One this client got for a
    name through guardd is judged as that name (docs/design.md rule 7); any other only by `ip`
    rules. A Host naming a name guardd does not resolve is refused: a server behind the address
    might resolve and go there itself (a forward proxy), and where that is cannot be judged."""
    assert curl(guardd, f"http://www.web.test:{web.port}/").returncode == 0
    for server, name, expected in ((web, "www.web.test", ("web", "www.web.test")),
                                   (second_web, second_web.host, ("loopback-by-address", None))):
        result = curl(guardd, f"http://{name}:{server.port}/", "--resolve",
                      f"{name}:{server.port}:{server.host}", hostname=False)
        assert result.stdout == f"GET / host={name}:{server.port}\n", result.stderr
        record = decisions(guardd, target=f"{server.host}:{server.port}")[-1]
        # a connect by address names every name the client resolved there, newest first
        assert (record["matchedRule"], str(record.get("domain")).split(",")[0]
                if "domain" in record else None) == expected
    result = curl(guardd, f"http://site.example:{web.port}/", "--resolve",
                  f"site.example:{web.port}:{web.host}", hostname=False)
    assert "rule catch-all-deny: " in result.stdout and \
        "site.example: guardd does not resolve it (Unauthorized outbound domain)" in result.stdout
    record = decisions(guardd, target=f"{web.host}:{web.port}")[-1]
    assert (record["effect"], record["domain"], record["method"]) == ("deny", "site.example",
                                                                      "GET")
    assert "guardd does not resolve it" in str(record["reason"])


@pytest.mark.parametrize(("name", "rule"), [("x.ngrok.io", "deny-exfil"),
                                            ("evil.burpcollaborator.net", "deny-exfil"),
                                            ("unknown.example", "catch-all-deny")])
def test_denied_name_is_refused_and_never_resolved(guardd: Guardd, upstream: Upstream,
                                                   web: Destination, name: str, rule: str) -> None:
    result = curl(guardd, f"http://{name}:{web.port}/")
    assert socks_reply(result) == NOT_ALLOWED
    assert name not in upstream.queries()
    assert f"host={name}" not in "\n".join(web.lines())
    record = decisions(guardd, target=f"{name}:{web.port}")[-1]
    assert (record["effect"], record["matchedRule"]) == ("deny", rule)


def test_name_resolving_to_unvouched_loopback_is_refused(guardd: Guardd, web: Destination
                                                         ) -> None:
    result = curl(guardd, f"http://loop.other.test:{web.port}/")
    assert socks_reply(result) == HOST_UNREACHABLE  # no address survived vetting
    record = decisions(guardd, target=f"loop.other.test:{web.port}")[-1]
    assert record["effect"] == "deny" and "loopback" in str(record["reason"])
    assert "host=loop.other.test" not in "\n".join(web.lines())


def test_method_rule_lets_get_through_and_refuses_post(guardd: Guardd, web: Destination) -> None:
    url = f"http://docs.test:{web.port}/page"
    get = curl(guardd, url)
    post = curl(guardd, url, "-X", "POST", "-d", "secret=1", "-i")
    assert get.stdout == f"GET /page host=docs.test:{web.port}\n"
    assert post.stdout.startswith("HTTP/1.1 403 Forbidden")
    assert "docs-no-writes" in post.stdout
    assert not [line for line in web.lines() if line.startswith("POST")]
    records = decisions(guardd, domain="docs.test")
    methods = [(r.get("method"), r.get("outcome")) for r in records]
    pending = (None, "opened provisionally: the client's first bytes decide")
    # Each connect is recorded as opened before curl hears, then decided by its method.
    assert methods[-4:] == [pending, ("GET", None), pending, ("POST", None)]
    assert [r["effect"] for r in records[-3::2]] == ["allow", "deny"]


def test_rate_limit_refuses_the_61st_request_in_a_minute(guardd: Guardd, web: Destination
                                                         ) -> None:
    for _ in range(60):
        reply, sock = socks_request(guardd.socks[0], "api.test", web.port)
        sock.close()
        assert reply == 0
    result = curl(guardd, f"http://api.test:{web.port}/")
    assert socks_reply(result) == NOT_ALLOWED
    record = decisions(guardd, domain="api.test")[-1]
    assert record["effect"] == "deny" and "rate limit of rule api-rate-limited" in \
        str(record["reason"])
    samples = guardd.scrape()
    assert samples['guardd_ratelimited_total{rule="api-rate-limited"}'] == 1


def client_hello(server_name: str) -> bytes:
    """The first flight of a real TLS client (Python's ssl) for `server_name`."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_tls_sni_must_match_the_connect_name(guardd: Guardd, echo: Destination) -> None:
    matching = client_hello("www.web.test")
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        sock.sendall(matching)
        echoed = b""
        while len(echoed) < len(matching):
            echoed += sock.recv(65536)
    assert echoed == matching  # relayed to the server and back

    before = len(echo.lines())
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        sock.sendall(client_hello("exfil.ngrok.io"))  # domain fronting
        sock.settimeout(10)
        assert sock.recv(65536) == TLS_ACCESS_DENIED  # told, and cut
    assert echo.lines()[before:] in ([], ["connection"])  # the hello never reached it
    record = decisions(guardd, target=f"www.web.test:{echo.port}")[-1]
    assert record["effect"] == "deny" and "domain fronting" in str(record["reason"])
    assert record["domain"] == "exfil.ngrok.io"


def test_a_refused_hello_s_alert_is_followed_by_a_close_not_a_reset(guardd: Guardd,
                                                                    echo: Destination) -> None:
    """A flaky test (bypass, `over-64-kib`), under load: a hello refused from its first 16 KiB
    left the rest of what the client sent unread, and a close with bytes unread is a reset,
    which may drop the alert still queued before it (the client read nothing). What the client
    sent is read and dropped before the close, so the alert is followed by a FIN."""
    oversized = b"\x16\x03\x01\x40\x00\x01\x01\x10\x00" + bytes(16_380)
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        sock.sendall(oversized)
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(10)
        back = b""
        while chunk := sock.recv(65536):  # (a reset raises here)
            back += chunk
    assert back == TLS_ACCESS_DENIED


POSTGRES_SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def echoed(sock: socket.socket, size: int) -> bytes:
    """What the echo server sends back of `size` bytes, or less when the connection ends."""
    back = b""
    sock.settimeout(10)
    while len(back) < size:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        back += chunk
    return back


@pytest.mark.parametrize("opening", [b"STARTTLS\r\n", POSTGRES_SSL_REQUEST])
def test_a_hello_after_an_in_band_upgrade_must_name_the_connect_name(
        guardd: Guardd, echo: Destination, opening: bytes) -> None:
    """Attack pass, 2026-12-06: a protocol that starts in plain text and upgrades to TLS in
    band (SMTP's STARTTLS, a Postgres SSLRequest) sent its hello unread, and a server that
    routes on the SNI served a denied name at an allowed one's address. Its hello is judged
    as a first one is: after the server's answer, or sent at once with the opening."""
    allowed, fronted = client_hello("www.web.test"), client_hello("exfil.ngrok.io")
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        sock.sendall(opening)
        assert echoed(sock, len(opening)) == opening  # (the server's answer: a new turn)
        sock.sendall(allowed)
        assert echoed(sock, len(allowed)) == allowed  # the connect's own name goes
    for at_once in (False, True):
        before = len(echo.lines())
        reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
        with sock:
            assert reply == 0
            if at_once:
                sock.sendall(opening + fronted)
                assert fronted not in echoed(sock, len(opening) + len(fronted))
            else:
                sock.sendall(opening)
                assert echoed(sock, len(opening)) == opening
                sock.sendall(fronted)
                assert echoed(sock, len(fronted)) == b""  # cut, the hello never went
        record = decisions(guardd, target=f"www.web.test:{echo.port}")[-1]
        assert record["effect"] == "deny" and "in-band upgrade" in str(record["reason"]) and \
            "exfil.ngrok.io" in str(record["reason"]), (at_once, record)
        assert not any("ngrok" in line for line in echo.lines()[before:])


def _reshaped(hello: bytes, shape: str) -> list[bytes]:
    """A hello's bytes as sends, reshaped as a client may (reviews, 2026-12-06): a byte, or 5,
    alone first; its first record fragment 1 byte long; record version 3.5; hello version
    3.255; an empty change_cipher_spec record and its first byte alone first."""
    message = hello[5:]
    if shape.startswith("seg"):
        cut = int(shape[3:])
        return [hello[:cut], hello[cut:]]
    if shape == "frag1":
        rest = message[1:]
        return [b"\x16\x03\x01\x00\x01" + message[:1] + b"\x16\x03\x01" +
                len(rest).to_bytes(2, "big") + rest]
    if shape == "recver":
        return [hello[:1] + b"\x03\x05" + hello[3:]]
    if shape == "ccs1":
        return [b"\x14\x03\x03\x00\x00" + hello[:1], hello[1:]]
    assert shape == "legacy"
    return [hello[:9] + b"\x03\xff" + hello[11:]]


@pytest.mark.parametrize("opening", ["sslrequest", "starttls"])
@pytest.mark.parametrize("shape", ["seg1", "seg5", "frag1", "recver", "legacy", "ccs1", "big"])
def test_a_fronted_hello_after_an_upgrade_is_judged_however_it_is_cut_up(
        guardd: Guardd, echo: Destination, opening: str, shape: str) -> None:
    """Reviews of the in-band upgrade's fix: a hello sent a byte (or 5) at a time, fragmented,
    of other version bytes, behind an empty record, or over 64 KiB was not recognized as one,
    and OpenSSL served its name. After an upgrade's request (a Postgres SSLRequest as first
    bytes, a STARTTLS relayed later), the next bytes are read as a first hello is."""
    if shape == "big":  # (257 ALPN names: a hello over 64 KiB, which OpenSSL takes)
        context = ssl.create_default_context()
        context.set_alpn_protocols([f"{n:03}" + "p" * 250 for n in range(257)])
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="exfil.ngrok.io")
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sends = [outgoing.read()]
        assert len(sends[0]) > 65536
    else:
        sends = _reshaped(client_hello("exfil.ngrok.io"), shape)
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        steps = [POSTGRES_SSL_REQUEST] if opening == "sslrequest" else \
            [b"EHLO agent\r\n", b"STARTTLS\r\n"]
        for step in steps:
            sock.sendall(step)
            assert echoed(sock, len(step)) == step
        with contextlib.suppress(ConnectionError):  # (cut part-way: the rest fails)
            for data in sends:
                sock.sendall(data)
                time.sleep(0.2)
        assert len(echoed(sock, sum(map(len, sends)))) < 64  # cut before it went
    record = decisions(guardd, target=f"www.web.test:{echo.port}")[-1]
    why = str(record["reason"])
    assert record["effect"] == "deny" and ("in-band upgrade" in why or "TLS" in why), record


@pytest.mark.parametrize("steps", [
    [POSTGRES_SSL_REQUEST[:7] + b"\x30", POSTGRES_SSL_REQUEST],  # (GSSENC refused, then SSL)
    [b"EHLO agent\r\n", b"STARTTLS \r\n"], [b"EHLO agent\r\n", b" starttls\t\r\n"],
    [b"EHLO agent\r\n", b"a" * 70 + b" STARTTLS\r\n"],
    [b"EHLO agent\r\n", b"START", b"TLS\r\n"],
    [b"EHLO agent\r\nSTART", b"TLS\r\n"],  # (first bytes, then the relay: final attack's kin)
], ids=["gssenc-then-ssl", "trailing-space", "spaces-and-case", "long-tag", "split",
        "split-after-first-bytes"])
def test_an_upgrade_request_as_servers_read_it_makes_the_next_bytes_a_first_flight(
        guardd: Guardd, echo: Destination, steps: list[bytes]) -> None:
    """The third review of the in-band upgrade's fix: libpq's GSSENCRequest, refused, then its
    SSLRequest; a STARTTLS with spaces around it or a long tag, as Postfix reads one; one cut
    across two bursts. Each made no first flight, and a hello sent a byte first then went."""
    sends = _reshaped(client_hello("exfil.ngrok.io"), "seg1")
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        for step in steps:
            sock.sendall(step)
            assert echoed(sock, len(step)) == step
        with contextlib.suppress(ConnectionError):
            for data in sends:
                sock.sendall(data)
                time.sleep(0.2)
        assert len(echoed(sock, sum(map(len, sends)))) < 64  # cut before it went
    assert decisions(guardd, target=f"www.web.test:{echo.port}")[-1]["effect"] == "deny"


LDAP_START_TLS = b"0\x1d\x02\x01\x01w\x18\x80\x161.3.6.1.4.1.1466.20037"


def _with_extension(hello: bytes, data: bytes) -> bytes:
    """`hello` (one record) with an extension of unknown type 0x7a7a holding `data` last."""
    at = 5 + 4 + 2 + 32
    at += 1 + hello[at]  # (the session id)
    at += 2 + int.from_bytes(hello[at:at + 2], "big")  # (the cipher suites)
    at += 1 + hello[at]  # (the compression methods)
    extension = b"\x7a\x7a" + len(data).to_bytes(2, "big") + data
    extensions = hello[at + 2:] + extension
    body = hello[9:at] + len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return hello[:3] + len(message).to_bytes(2, "big") + message


def _alpn_hello(server_name: str, protocol: str) -> bytes:
    """A stock hello (Python's ssl) offering ALPN `protocol`."""
    context = ssl.create_default_context()
    context.set_alpn_protocols([protocol])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("case", ["xmpp-end-tag", "ldap-controls", "legacy-0x0403",
                                  "alpn-names-an-upgrade", "alpn-after-a-long-burst",
                                  "decoy-in-first-bytes", "decoy-in-the-relay",
                                  "inside-a-decoy-first-bytes", "inside-a-decoy-in-the-relay",
                                  "request-past-an-open-first-line"])
def test_a_hello_the_upgrade_reading_once_missed_is_judged(guardd: Guardd, echo: Destination,
                                                            case: str) -> None:
    """Attack pass 48 against OpenSSL servers: (1) the rest of a request guardd's pattern ends
    early (XMPP's `</starttls >`, an LDAP StartTLS with controls) was taken for the first
    flight, no hello, and the hello behind it went unread; (2) a hello of legacy_version
    0x0403 (OpenSSL takes any above SSL 3.0) inside a burst was not one to the pattern; (3)
    a stock hello whose ALPN names LDAP's StartTLS OID was cut there as an upgrade's request,
    its SNI going as the request's bytes, its rest as a first flight of no hello. The
    re-attack: (4) a hello naming the allowed name inside a line, judged and let go, took the
    rest of its read with it: a STARTTLS, then the hello naming a denied one. The final
    re-attack: (5) the STARTTLS and the fronted hello inside such a hello, an extension's data,
    which a server that never upgraded reads as lines; (6) a STARTTLS 600 bytes into first
    bytes read as one (a line left open, then its end and the request in a send of their own)."""
    fronted = client_hello("exfil.ngrok.io")
    decoy = b"NOOP " + client_hello("www.web.test") + b"\r\nSTARTTLS\r\n" + fronted
    inside = b"NOOP " + _with_extension(client_hello("www.web.test"),
                                        b"\r\nSTARTTLS\r\n" + fronted)
    steps = {"xmpp-end-tag": [b"<?xml version='1.0'?>\n",
                              b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'>"
                              b"</starttls >" + fronted],
             "ldap-controls": [b"\x30\x03\x02\x01\x00",
                               LDAP_START_TLS[:1] + b"\x1f" + LDAP_START_TLS[2:] + b"\xa0\x00"
                               + fronted],
             "legacy-0x0403": [b"EHLO agent\r\n",
                               b"NOOP\r\n" + fronted[:9] + b"\x04\x03" + fronted[11:]],
             "alpn-names-an-upgrade": [b"EHLO agent\r\n",
                                       _alpn_hello("exfil.ngrok.io", "1.3.6.1.4.1.1466.20037")],
             "alpn-after-a-long-burst": [b"EHLO agent\r\n", b"NOOP\r\n" * 90 + b"STARTTLS\r\n",
                                         _alpn_hello("exfil.ngrok.io",
                                                     "1.3.6.1.4.1.1466.20037")],
             "decoy-in-first-bytes": [decoy],
             "decoy-in-the-relay": [b"EHLO agent\r\n", decoy],
             "inside-a-decoy-first-bytes": [inside],
             "inside-a-decoy-in-the-relay": [b"EHLO agent\r\n", inside],
             "request-past-an-open-first-line": [b"NOOP " + b"A" * 600,
                                                 b"A\r\nSTARTTLS\r\n" + fronted]}[case]
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        with contextlib.suppress(ConnectionError):
            for step in steps[:-1]:
                sock.sendall(step)
                if step.endswith(b"A"):  # (a line left open: first bytes not yet decided)
                    time.sleep(0.3)
                else:
                    assert echoed(sock, len(step)) == step
            sock.sendall(steps[-1])
        back = echoed(sock, len(steps[-1]))
        assert b"exfil" not in back and len(back) < len(steps[-1]) - 200, back[:80]
    record = decisions(guardd, target=f"www.web.test:{echo.port}")[-1]
    assert record["effect"] == "deny" and "exfil.ngrok.io" in str(record["reason"]), record


@pytest.mark.parametrize("case", ["after-it", "inside-it"])
def test_a_first_hello_a_server_reads_as_lines_hides_no_upgrade(guardd: Guardd,
                                                                 echo: Destination,
                                                                 case: str) -> None:
    """Last re-attack of attack pass 48: first bytes that are a hello of the allowed name, to
    a server that answers it with no TLS (SMTP reads it as lines), then a STARTTLS and a hello
    of a denied name: nothing looked at the stream after the server's answer; nor inside the
    hello, where an extension's data held the STARTTLS and the fronted hello."""
    fronted = client_hello("exfil.ngrok.io")
    allowed = client_hello("www.web.test")
    steps = [allowed + b"\r\n", b"STARTTLS\r\n", fronted] if case == "after-it" else \
        [_with_extension(allowed, b"\r\nSTARTTLS\r\n" + fronted)]
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        back = b""
        with contextlib.suppress(ConnectionError):
            for step in steps:
                sock.sendall(step)
                back += echoed(sock, len(step))
        assert fronted not in back and b"exfil" not in back
    record = decisions(guardd, target=f"www.web.test:{echo.port}")[-1]
    assert record["effect"] == "deny" and "exfil.ngrok.io" in str(record["reason"]) or \
        "upgrade" in str(record["reason"]), record


@pytest.mark.parametrize("cut, hello_cut", [(5, 3), (7, 1)])
def test_an_ssl_request_cut_across_reads_still_makes_a_first_flight(
        guardd: Guardd, echo: Destination, cut: int, hello_cut: int) -> None:
    """Final attack, 2026-12-06: an SSLRequest sent in two parts (the first bytes, then the
    rest with the hello's first bytes) was read a part at a time, matched by neither, and the
    hello's rest went unjudged. What went before is read with what comes next."""
    fronted = client_hello("exfil.ngrok.io")
    sends = [POSTGRES_SSL_REQUEST[:cut], POSTGRES_SSL_REQUEST[cut:] + fronted[:hello_cut],
             fronted[hello_cut:]]
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        with contextlib.suppress(ConnectionError):
            for data in sends:
                sock.sendall(data)
                time.sleep(0.3)
        assert fronted[hello_cut:] not in echoed(sock, sum(map(len, sends)))  # cut before
    assert decisions(guardd, target=f"www.web.test:{echo.port}")[-1]["effect"] == "deny"


def test_a_binary_stream_s_byte_that_could_begin_a_record_is_not_held(
        guardd: Guardd, echo: Destination) -> None:
    """The second review: a lone 0x16 in a binary stream was held for the first-bytes timeout
    as a hello's start, then cut (one round trip in 10,758 of random short messages). Only
    after an upgrade's request is a hello's first byte held."""
    reply, sock = socks_request(guardd.socks[0], "www.web.test", echo.port)
    with sock:
        assert reply == 0
        for data in (b"HELO binary\n", b"\x16", b"\x16\x03", b"\x16\x03\x01\x00\x05"):
            started = time.monotonic()
            sock.sendall(data)
            assert echoed(sock, len(data)) == data and time.monotonic() - started < 2


def test_a_hello_sent_in_a_burst_of_its_own_before_the_server_answers_is_judged(
        guardd: Guardd, banner: Destination) -> None:
    """Review of the in-band upgrade's fix: looked for at the start of each turn alone (the
    client's first bytes after the server spoke), a hello sent apart, after the opening but
    before the server's answer, went unread: the same turn. Each burst is looked at too."""
    fronted = client_hello("exfil.ngrok.io")
    before = len(banner.lines())
    reply, sock = socks_request(guardd.socks[0], "www.web.test", banner.port)
    with sock:
        assert reply == 0
        sock.settimeout(10)
        assert sock.recv(64) == b"banner\n"
        sock.sendall(POSTGRES_SSL_REQUEST)  # (other bytes at once: relayed from here)
        for burst in (b"\x00" * 8, fronted):  # (each a burst of its own, in one turn: the
            time.sleep(0.3)                    # server never answers)
            sock.sendall(burst)
        assert echoed(sock, 1) == b""  # cut
    assert str(len(fronted)) not in banner.lines()[before:]  # the hello never reached it
    record = decisions(guardd, target=f"www.web.test:{banner.port}")[-1]
    assert record["effect"] == "deny" and "in-band upgrade" in str(record["reason"]), record


class Tls12Server:
    """A TLS 1.2-only server on loopback, in the test's own threads: each connection's first
    bytes echoed, with whether it resumed a session (`resumed`), then closed cleanly (a session
    survives only a clean close in OpenSSL's cache). With `tickets=False` it keeps sessions by
    id (RFC 5246), else it issues tickets (RFC 5077)."""

    def __init__(self, directory: Path, tickets: bool) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(certificate(directory, "web.test")[0])
        if not tickets:
            self.context.options |= ssl.OP_NO_TICKET
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.resumed: list[bool] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock:
                sock.settimeout(10)
                try:
                    with self.context.wrap_socket(sock, server_side=True) as tls:
                        self.resumed.append(tls.session_reused)
                        tls.sendall(tls.recv(100))
                        tls.unwrap()
                except OSError:
                    pass  # (a connection guardd cut)

    def stop(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("tickets", [True, False], ids=["tickets", "session-ids"])
def test_a_tls_1_2_session_resumes_only_for_the_name_it_was_made_for(
        guardd: Guardd, directory: Path, tickets: bool) -> None:
    """Attack pass (2026-12-06): OpenSSL serves a resumed TLS 1.2 session's name whatever the
    resuming hello's SNI; the first fix cut every resumption, and clients that keep sessions
    (Node's agent, curl) failed every other connection to a TLS 1.2-only server. Now a session
    guardd saw made (its session id or ticket, read as they went) resumes on a connection judged
    for the same name, client and server; offered under another name, it is cut before the
    client's bytes go, and recorded."""
    server = Tls12Server(directory, tickets)
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE

    def through(name: str, session: ssl.SSLSession | None) -> ssl.SSLSocket:
        reply, sock = socks_request(guardd.socks[0], name, server.port)
        assert reply == 0
        sock.settimeout(10)
        tls = client.wrap_socket(sock, server_hostname=name, session=session)
        tls.sendall(b"ping")
        assert tls.recv(100) == b"ping"
        return tls

    try:
        with through("www.web.test", None) as made:
            session = made.session
        assert session is not None and not made.session_reused
        for _ in range(2):
            with through("www.web.test", session) as again:
                assert again.session_reused
        with pytest.raises((ssl.SSLError, OSError)):
            through("web.test", session).close()  # (made for www.web.test)
        assert server.resumed == [False, True, True]
    finally:
        server.stop()
    record = decisions(guardd, target=f"web.test:{server.port}")[-1]
    assert record["effect"] == "deny" and "resumed a TLS 1.2" in str(record["reason"])
    assert record["domain"] == "web.test"


@pytest.mark.parametrize("command", [2, 3], ids=["BIND", "UDP-ASSOCIATE"])
def test_bind_and_udp_associate_are_not_supported(guardd: Guardd, web: Destination,
                                                  command: int) -> None:
    reply, sock = socks_request(guardd.socks[0], "127.0.0.1", web.port, command=command)
    sock.close()
    assert reply == 7
    record = guardd.audit_records("effect=deny", "listener=socks")[-1]  # recorded, as any refusal
    name = {2: "BIND", 3: "UDP_ASSOCIATE"}[command]
    assert f"command {name} is not supported" in str(record["reason"])


def test_a_request_that_is_not_socks5_is_recorded(guardd: Guardd) -> None:
    with socket.create_connection(guardd.socks[0], timeout=5) as sock:
        sock.sendall(b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00")  # SOCKS4
        assert sock.recv(16) == b""
    record = guardd.audit_records("effect=deny", "listener=socks")[-1]
    assert "SOCKS4/4a is not SOCKS5" in str(record["reason"])


def test_python_socks_client(guardd: Guardd, web: Destination) -> None:
    """A second real client: python-socks, with remote DNS (socks5h)."""
    host, port = guardd.socks[0]
    proxy = Proxy.from_url(f"socks5://{host}:{port}", rdns=True)
    with proxy.connect(dest_host="www.web.test", dest_port=web.port, timeout=10) as sock:
        sock.sendall(b"GET /lib HTTP/1.1\r\nHost: www.web.test\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert response.endswith(b"GET /lib host=www.web.test\n")
    from python_socks import ProxyError
    with pytest.raises(ProxyError, match="not allowed by ruleset"):
        proxy.connect(dest_host="a.ngrok.io", dest_port=web.port, timeout=10)


def test_random_handshakes_leave_the_daemon_serving(guardd: Guardd, web: Destination) -> None:
    rng = random.Random(1929)
    host, port = guardd.socks[0]
    for index in range(1000):
        payload = rng.randbytes(rng.randrange(1, 80))
        if index % 2:  # half start like SOCKS5, to get past the first byte
            payload = b"\x05" + payload
        with socket.create_connection((host, port), timeout=5) as sock:
            try:
                sock.sendall(payload)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(4096):
                    pass
            except (ConnectionResetError, TimeoutError):
                pass
    assert guardd.alive()
    assert curl(guardd, f"http://web.test:{web.port}/after").stdout == \
        f"GET /after host=web.test:{web.port}\n"


def test_audit_export_as_in_the_product_document(guardd: Guardd, web: Destination) -> None:
    curl(guardd, f"http://web.test:{web.port}/audited")
    curl(guardd, f"http://x.ngrok.io:{web.port}/")
    exported = guardd.cli("audit", "export", "--audit", str(guardd.audit_dir), "--filter",
                          "action=network.request", "--format", "json", "--since", "24h").stdout
    records = json.loads(exported)
    assert {r["action"] for r in records} == {"network.request"}
    assert [(r["target"], r["effect"]) for r in records[-2:]] == [
        (f"web.test:{web.port}", "allow"), (f"x.ngrok.io:{web.port}", "deny")]
    samples = guardd.scrape()
    prefix = 'guardd_decisions_total{action="network.request",'
    assert samples[prefix + 'effect="allow",listener="socks",rule="web"}'] >= 2
    assert samples[prefix + 'effect="deny",listener="socks",rule="deny-exfil"}'] >= 1


def test_username_password_when_users_are_configured(directory: Path, upstream: Upstream,
                                                     policy: Path, web: Destination) -> None:
    """RFC 1929: with socksUsers set, the right password passes, a wrong one and an anonymous
    client are refused before any request is read, and a failed login locks the client out for
    a while (so parallel connections cannot guess passwords fast)."""
    config = directory / "auth.yaml"
    config.write_text(f"policy: {policy}\nsocksUsers: {{agent: \"s3cret\"}}\n")
    config.chmod(0o600)
    daemon = Guardd.launch(directory / "auth", "--config", str(config), "--upstream",
                           upstream.address, "--dns", "127.0.0.1:0", "--socks", "127.0.0.1:0",
                           "--metrics", "off")
    try:
        url = f"http://web.test:{web.port}/auth"
        ok = curl(daemon, url, "--proxy-user", "agent:s3cret")
        assert ok.stdout == f"GET /auth host=web.test:{web.port}\n", ok.stderr
        anonymous = curl(daemon, url)
        assert anonymous.returncode == 97 and "no authentication method was acceptable" in \
            anonymous.stderr.lower()
        wrong = curl(daemon, url, "--proxy-user", "agent:guess")
        failed_at = time.monotonic()
        assert wrong.returncode == 97 and "rejected by the socks5 server (1 1)" in \
            wrong.stderr.lower()  # RFC 1929 status 1: failure
        # a failed login locks the client out for 0.5 s: not even the right password is checked
        locked = curl(daemon, url, "--proxy-user", "agent:s3cret")
        assert time.monotonic() - failed_at < 0.5, "the machine is too slow for this check"
        assert locked.returncode == 97 and "(1 1)" in locked.stderr
        time.sleep(0.5)
        after = curl(daemon, url, "--proxy-user", "agent:s3cret")
        assert after.stdout == f"GET /auth host=web.test:{web.port}\n", after.stderr
        reasons = [str(r["reason"]) for r in daemon.audit_records("effect=deny", "listener=socks")
                   if "authentication" in str(r["reason"])]
        assert reasons[-2] == "authentication failed: auth: bad username or password for 'agent'"
        assert reasons[-1].startswith("authentication failed: auth: login refused without "
                                      "checking the password: failed logins lock this client "
                                      "out as 'agent' for 0.")
        assert "socks authentication failed for 127.0.0.1" in daemon.log_text()
    finally:
        assert daemon.stop() == 0


def test_a_method_rule_does_not_open_loopback(directory: Path, upstream: Upstream,
                                              web: Destination) -> None:
    """`domain: "*"` with `method: GET` names no address: a CONNECT to loopback is refused at
    once (0x02), not accepted provisionally to wait for a GET that could never be allowed."""
    policy = directory / "get-anything.yaml"
    policy.write_text('version: "1.0"\nrules:\n  - {id: get-anything, action: network.request, '
                      'domain: "*", method: [GET, HEAD], effect: allow}\n')
    daemon = Guardd.launch(directory / "get-anything", "--policy", str(policy), "--upstream",
                           upstream.address, "--dns", "127.0.0.1:0", "--socks", "127.0.0.1:0",
                           "--metrics", "off")
    try:
        before = len(web.lines())
        for host in ("127.0.0.1", "::ffff:127.0.0.1"):
            reply, sock = socks_request(daemon.socks[0], host, web.port)
            sock.close()
            assert reply == NOT_ALLOWED, host
        assert socks_reply(curl(daemon, f"http://web.test:{web.port}/")) == HOST_UNREACHABLE
        assert len(web.lines()) == before
    finally:
        assert daemon.stop() == 0
