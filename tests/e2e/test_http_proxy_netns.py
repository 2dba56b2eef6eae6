"""The HTTP proxy listener (issue 11) with real clients, inside a network namespace the test
creates with only `lo`: every client (curl, Python, and the tools in test_http_clients_netns.py)
runs in there, so nothing it does can reach the outside, whatever proxy settings it ignores.

Behind the allowed names stand a plain HTTP server and an HTTPS one (a self-signed certificate
the clients are told to trust), and a trap at the metadata address that must never see a
connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardd.stream.sniff import ServerAnswer, server_answer
from tests.e2e.harness import (ROOT, Child, Destination, Guardd, Upstream, certificate,
                               loopback_netns, require, run)
from tests.e2e.servers import BIG_BODY, BIG_HEAD_COOKIES
from tests.unit.test_stream_sniff import tls_exchange

pytestmark = pytest.mark.e2e

METADATA = "169.254.169.254"
POLICY = """\
version: "1.0"
rules:
  - {id: deny-tunnels, action: "*", domain: ["*.ngrok.io", "*.tunnel.test"], effect: deny,
     reason: "tunnel services are not allowed"}
  - {id: docs-read-only, action: network.request, domain: docs.test, method: [POST, PUT, DELETE],
     effect: deny, reason: "docs.test is read-only"}
  - {id: registry-keeps, action: network.request, domain: registry.test, method: DELETE,
     effect: deny, reason: "nothing is deleted from the registry"}
  - {id: registry, action: network.request, domain: ["docs.test", "secure.test", "registry.test",
     "pypi.test", "npm.test", "git.test", "retry.test"], ip: 127.0.0.0/8, effect: allow}
  - {id: gone, action: network.request, domain: gone.test, effect: allow}
  - {id: local-get, action: network.request, ip: 127.0.0.2/32, method: GET, effect: allow}
  - {id: resolve, action: dns.query, domain: "*.test", effect: allow}
  - {id: loopback, action: network.request, ip: 127.0.0.0/8, port: [80, 443], effect: allow}
"""
NAMES = ("docs.test", "secure.test", "registry.test", "a.ngrok.io", "meta.test", "retry.test")
#: Names of the static file server (a package index, an npm registry, a git repository).
SITE_NAMES = ("pypi.test", "npm.test", "git.test")
SITE_ADDRESS = "127.0.0.3"


@dataclass
class World:
    netns: str
    directory: Path
    guardd: Guardd
    web: Destination
    tls: Destination
    #: secure.test's server again, taking only P-256: every client that offers X25519 (curl,
    #: Python) gets a HelloRetryRequest.
    retry: Destination
    #: secure.test's server again, TLS 1.2 at most (its sessions resume under any name).
    tls12: Destination
    trap: Destination
    ca: Path
    site: Child
    #: A web server at 127.0.0.2 and a port of its own: only `local-get` (no port) allows it.
    local: Destination

    def in_netns(self, *argv: str, env: dict[str, str] | None = None, timeout: float = 120
                 ) -> subprocess.CompletedProcess[str]:
        """A client program inside the namespace (its environment: `env` only, and PATH)."""
        environment = {"PATH": os.environ["PATH"], "HOME": str(self.directory),
                       "LANG": "C.UTF-8", **(env or {})}
        return run(["ip", "netns", "exec", self.netns, "env", "-i",
                    *(f"{k}={v}" for k, v in environment.items()), *argv],
                   timeout=timeout, cwd=self.directory)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.guardd.http[0][1]}"

    def curl(self, *args: str) -> tuple[int, dict[str, str], str]:
        """curl through the proxy inside the namespace: (status, headers, body)."""
        result = run(["ip", "netns", "exec", self.netns, require("curl"), "-sS", "-D", "-",
                      "--max-time", "10", "-x", self.proxy, *args])
        head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
        while head.startswith(("HTTP/1.1 200 Connection established", "HTTP/1.1 100")):
            head, _, body = body.partition("\n\n")  # (CONNECT's own answer, an interim one)
        lines = head.splitlines()
        if not lines:
            return 0, {}, result.stderr
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return int(lines[0].split()[1]), headers, body

    def raw(self, data: bytes) -> bytes:
        """Bytes to the proxy from inside the namespace, and everything that came back."""
        return self.raw_ending(data)[0]

    def raw_ending(self, data: bytes) -> tuple[bytes, str]:
        """`raw`, and how the connection ended: "eof", "reset" or another error's name."""
        code = ("import socket,sys\n"
                f"s=socket.create_connection(('127.0.0.1',{self.guardd.http[0][1]}),timeout=5)\n"
                "s.sendall(bytes.fromhex(sys.stdin.read()))\nout=b''\nend='eof'\n"
                "try:\n while (c:=s.recv(65536)): out+=c\n"
                "except ConnectionResetError: end='reset'\n"
                "except OSError as e: end=type(e).__name__\n"
                "print(out.hex()); print(end)")
        result = run(["ip", "netns", "exec", self.netns, sys.executable, "-c", code],
                     input=data.hex())
        assert result.returncode == 0, result.stderr
        back, end = result.stdout.split()
        return bytes.fromhex(back), end

    def records(self, **where: object) -> list[dict[str, object]]:
        return [r for r in self.guardd.audit_records("action=network.request")
                if all(r.get(k) == v for k, v in where.items())]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with loopback_netns(f"{METADATA}/32") as netns:
        directory = tmp_path_factory.mktemp("http-proxy")
        pem, ca = certificate(directory, "secure.test")
        zones = {name: ["A 127.0.0.1"] for name in NAMES}
        zones["meta.test"] = [f"A {METADATA}"]
        # Not 127.0.0.1:443: the upstream DNS server listens on 127.0.0.1, and guardd refuses
        # its DoH port there (a way around the DNS guard).
        zones["secure.test"] = zones["retry.test"] = ["A 127.0.0.2"]
        zones.update({name: [f"A {SITE_ADDRESS}"] for name in SITE_NAMES})
        upstream = Upstream(directory, zones, netns=netns)
        web = Destination(directory, "web", port=80, netns=netns)
        tls = Destination(directory, "web", host="127.0.0.2", port=443, netns=netns, tls=pem)
        retry = Destination(directory, "web", host="127.0.0.2", netns=netns,
                            tls=certificate(directory, "retry.test")[0], curve="prime256v1")
        tls12 = Destination(directory, "web", host="127.0.0.2", netns=netns, tls=pem,
                            tls12=True)
        trap = Destination(directory, "trap", host=METADATA, port=80, netns=netns)
        site = Child(["-c", _STATIC_SERVER, str(static_site(directory / "site"))],
                     directory / "site.log", "the static file server", netns)
        local = Destination(directory, "web", host="127.0.0.2", netns=netns)
        (directory / "policy.yaml").write_text(POLICY)
        guardd = Guardd.launch(directory, "--policy", str(directory / "policy.yaml"),
                               "--upstream", upstream.address, "--dns", "127.0.0.1:0",
                               "--http", "127.0.0.1:0", "--socks", "127.0.0.1:0",
                               "--metrics", "127.0.0.1:0", netns=netns)
        try:
            yield World(netns, directory, guardd, web, tls, retry, tls12, trap, ca, site, local)
            assert guardd.stop() == 0, guardd.log_text()
        finally:
            for child in (upstream, web, tls, retry, tls12, trap, site, local):
                child.stop()


def test_an_allowed_get_goes_through_and_is_recorded_with_its_url(world: World) -> None:
    status, headers, body = world.curl("http://docs.test/readme?x=1")
    assert (status, body) == (200, "GET /readme?x=1 host=docs.test\n")
    record = world.records(listener="http", method="GET")[-1]
    assert record["target"] == "http://docs.test:80/readme?x=1" and record["effect"] == "allow"


def test_a_denied_name_gets_403_naming_the_rule_and_the_record(world: World) -> None:
    before = len(world.web.lines())
    status, headers, body = world.curl("http://x.ngrok.io/")
    assert status == 403 and headers["x-guardd-rule"] == "deny-tunnels"
    assert headers["x-guardd-reason"] == "tunnel services are not allowed"
    assert "deny-tunnels" in body and "tunnel services are not allowed" in body
    number = int(headers["x-guardd-decision"])
    (record,) = [r for r in world.guardd.audit_records() if r.get("seq") == number]
    assert (record["listener"], record["effect"], record["target"], record["method"]) == (
        "http", "deny", "http://x.ngrok.io:80/", "GET")  # (the request's: session 54)
    assert world.web.lines()[before:] == []


def test_connect_to_an_https_server_works_and_a_denied_one_gets_403(world: World) -> None:
    status, _, body = world.curl("--cacert", str(world.ca), "https://secure.test/x")
    assert (status, body) == (200, "GET /x host=secure.test\n")
    assert world.records(listener="http", target="https://secure.test:443")[-1]["effect"] == \
        "allow"
    status, headers, _ = world.curl("--cacert", str(world.ca), "https://a.ngrok.io/")
    assert status == 403 and headers["x-guardd-rule"] == "deny-tunnels"
    assert world.records(target="https://a.ngrok.io:443")[-1]["effect"] == "deny"


def test_a_hello_sent_again_after_a_retry_must_name_the_same_server(world: World) -> None:
    """Final attack pass: after a HelloRetryRequest, a client's second hello named a denied
    site, which OpenSSL servers then served. curl gets its retry and its page; a raw client
    whose second hello names another server is cut before it reaches the server."""
    cacert, port = world.directory / "retry.test.crt", world.retry.port
    status, _, body = world.curl("--cacert", str(cacert), f"https://retry.test:{port}/r")
    assert (status, body) == (200, f"GET /r host=retry.test:{port}\n")
    first, _, _ = tls_exchange("retry.test")
    _, _, evil = tls_exchange("a.ngrok.io")
    connect = f"CONNECT retry.test:{port} HTTP/1.1\r\nHost: retry.test:{port}\r\n\r\n"
    code = ("import socket,sys\n"
            f"s=socket.create_connection(('127.0.0.1',{world.guardd.http[0][1]}),timeout=5)\n"
            "connect,first,evil=(bytes.fromhex(a) for a in sys.argv[1:])\n"
            "s.sendall(connect)\nhead=s.recv(4096)\n"
            "assert head.startswith(b'HTTP/1.1 200'), head\n"
            "s.sendall(first)\nanswer=s.recv(65536)\ns.sendall(evil)\nout=b''\n"
            "try:\n while (c:=s.recv(65536)): out+=c\nexcept OSError: pass\n"
            "print(answer.hex(), out.hex())")
    result = world.in_netns(sys.executable, "-c", code, connect.encode().hex(), first.hex(),
                            evil.hex())
    assert result.returncode == 0, result.stderr
    answer, after = (bytes.fromhex(part) for part in result.stdout.rstrip("\n").split(" "))
    assert server_answer(answer) is ServerAnswer.RETRY  # the real server asked again
    assert after == b""  # and heard nothing more: it never had the second hello
    record = world.records(target=f"https://retry.test:{port}")[-1]
    assert record["effect"] == "deny" and record["domain"] == "a.ngrok.io"
    assert "HelloRetryRequest" in str(record["reason"])


def test_curl_resumes_a_tls_1_2_session_for_its_next_url(world: World) -> None:
    """Review of the resumption cut (2026-12-06): curl resumes its TLS session for the next
    URL of one run, and against a TLS 1.2-only server that resumption was cut (every other
    connection failed). A session guardd saw made for the name resumes for it."""
    port = world.tls12.port
    result = run(["ip", "netns", "exec", world.netns, require("curl"), "-sSv", "--max-time",
                  "10", "-x", world.proxy, "--cacert", str(world.ca), "-H", "Connection: close",
                  "-w", "%{http_code} %{num_connects}\n",
                  *(part for n in ("one", "two", "three")
                    for part in ("-o", "/dev/null", f"https://secure.test:{port}/{n}"))])
    assert result.stdout == "200 1\n" * 3, result.stderr
    assert result.stderr.count("TLSv1.2 (IN), TLS handshake, Certificate") == 1, result.stderr
    records = world.records(target=f"https://secure.test:{port}")
    assert [r["effect"] for r in records] == ["allow"] * 3


def test_a_method_rule_lets_get_through_and_refuses_post(world: World) -> None:
    before = len(world.web.lines())
    assert world.curl("http://docs.test/a")[0] == 200
    attempts = 'guardd_connect_attempts_total{result="ok"}'
    opened = world.guardd.scrape()[attempts]
    status, headers, _ = world.curl("-X", "POST", "-d", "x=1", "http://docs.test/a")
    assert status == 403 and headers["x-guardd-rule"] == "docs-read-only"
    assert world.web.lines()[before:] == ["GET /a host=docs.test"]
    # (its method said first, the POST is refused before any connection to the server)
    assert world.guardd.scrape()[attempts] == opened
    record = world.records(listener="http", method="POST")[-1]
    assert (record["effect"], record["target"]) == ("deny", "http://docs.test:80/a")


def test_a_method_rule_applies_inside_a_connect_tunnel_too(world: World) -> None:
    """curl -p tunnels plain HTTP through CONNECT: the tunnel's requests are judged as SOCKS's
    are, the POST refused by the same rule."""
    before = len(world.web.lines())
    assert world.curl("-p", "http://docs.test/t")[0] == 200
    status, headers, body = world.curl("-p", "-X", "POST", "-d", "x=1", "http://docs.test/t")
    assert status == 403 and "docs-read-only" in body
    assert world.web.lines()[before:] == ["GET /t host=docs.test"]
    # (plain HTTP inside the CONNECT: its records say http://, with the path; attack pass)
    assert world.records(listener="http", method="GET")[-1]["target"] == \
        "http://docs.test:80/t"
    # The kept-alive server never closes; the clients did: no connection is left relaying.
    gauge = 'guardd_connections{listener="http",state="relaying"}'
    for _ in range(40):
        if world.guardd.scrape().get(gauge) == 0:
            break
        time.sleep(0.05)
    assert world.guardd.scrape()[gauge] == 0


def test_a_post_after_a_get_on_one_kept_alive_proxy_connection_is_refused(world: World) -> None:
    before = len(world.web.lines())
    back = world.raw(b"GET http://docs.test/1 HTTP/1.1\r\nHost: docs.test\r\n\r\n"
                     b"POST http://docs.test/2 HTTP/1.1\r\nHost: docs.test\r\n"
                     b"Content-Length: 2\r\n\r\nhi")
    assert back.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 403 Forbidden" in back
    assert world.web.lines()[before:] == ["GET /1 host=docs.test"]


def test_a_method_rule_at_loopback_without_a_port_judges_each_request_by_its_method(
        world: World) -> None:
    """An absolute-form request says its method before guardd connects: a `method` rule
    naming a loopback address without a port opens it for that method (it was refused: such a
    rule opens nothing there before the first bytes say the method, SOCKS's and CONNECT's);
    another method is refused before any connection, and one after a GET on the connection
    gets its 403 there. (A CONNECT there is still refused: `test_guard.py`.)"""
    url = f"http://127.0.0.2:{world.local.port}"
    before = len(world.local.lines())
    status, _, body = world.curl(f"{url}/a")
    assert (status, body) == (200, f"GET /a host=127.0.0.2:{world.local.port}\n")
    assert world.curl("-X", "POST", "-d", "x=1", f"{url}/b")[0] == 403
    record = world.records(listener="http", method="POST")[-1]
    assert (record["effect"], record["target"]) == ("deny", f"{url}/b")
    host = f"127.0.0.2:{world.local.port}".encode()
    back = world.raw(b"GET %s/c HTTP/1.1\r\nHost: %s\r\n\r\n"
                     b"DELETE %s/d HTTP/1.1\r\nHost: %s\r\n\r\n" % (url.encode(), host,
                                                                        url.encode(), host))
    assert back.startswith(b"HTTP/1.1 200 OK") and b"HTTP/1.1 403 Forbidden" in back
    assert [line.split(" host=")[0] for line in world.local.lines()[before:]] == [
        "GET /a", "GET /c"]


@pytest.mark.parametrize("request_, served", [
    (b"GET http://docs.test/c HTTP/1.1\r\nHost: docs.test\r\nConnection: close\r\n\r\n",
     ["/c"]),
    (b"GET http://docs.test/c HTTP/1.0\r\nHost: docs.test\r\n\r\n", ["/c"]),
    (b"GET http://docs.test/c HTTP/1.0\r\nHost: docs.test\r\nConnection: keep-alive\r\n\r\n",
     ["/c"]),
], ids=["connection-close", "http-1.0", "http-1.0-keep-alive"])
def test_a_client_that_asks_to_close_has_its_connection_closed_after_the_response(
        world: World, request_: bytes, served: list[str]) -> None:
    """Attack pass 25: the client's `Connection: close` (a hop-by-hop field, not forwarded)
    and HTTP/1.0's close were not acted on: a client reading to the end of the connection
    waited for the idle timeout (300 s) each time, holding a slot (RFC 9112 9.6). A request
    pipelined after it never goes. An HTTP/1.0 request is the connection's last, keep-alive
    or not (9.3: no proxy keeps a connection with an HTTP/1.0 client; the server is asked to
    close, and says so to the client)."""
    before = len(world.web.lines())
    started = time.monotonic()
    back = world.raw(request_ + b"GET http://docs.test/after HTTP/1.1\r\nHost: docs.test\r\n"
                     b"Connection: close\r\n\r\n")
    assert time.monotonic() - started < 3  # (raw() reads until the close, or 5 s of silence)
    assert back.startswith(b"HTTP/1.1 200 OK") and back.count(b"HTTP/1.1 ") == len(served)
    assert world.web.lines()[before:] == [f"GET {path} host=docs.test" for path in served]


def test_an_http_1_0_request_goes_as_one_and_its_client_gets_no_chunks(world: World) -> None:
    """Attack pass 27: an HTTP/1.0 request went out as HTTP/1.1 (h11 writes 1.1), so a server
    streaming its answer chunked it, and the 1.0 client, which cannot read chunks, got their
    framing as its body. It goes as HTTP/1.0: no server chunks an answer to it."""
    back = world.raw(b"GET http://docs.test/chunked HTTP/1.0\r\nHost: docs.test\r\n\r\n")
    head, _, body = back.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"chunked" not in head.lower()
    assert body == b"GET /chunked host=docs.test\n"
    assert world.curl("http://docs.test/chunked")[2] == "GET /chunked host=docs.test\n"  # (1.1)


def test_bytes_after_a_close_request_do_not_cut_its_response_short(world: World) -> None:
    """Review: a client that sends more after `Connection: close` (pipelined requests, 128 KiB
    of them) left bytes unread at the close, and the kernel reset the connection, dropping
    what of a 4 MiB response it still held. The close lingers: guardd's side ends, the
    client's bytes are read and dropped until it closes (RFC 9112 9.6)."""
    before = len(world.web.lines())
    pipelined = b"GET http://docs.test/x HTTP/1.1\r\nHost: docs.test\r\n\r\n" * 2600
    back = world.raw(b"GET http://docs.test/big HTTP/1.1\r\nHost: docs.test\r\n"
                     b"Connection: close\r\n\r\n" + pipelined)
    head, _, body = back.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert len(body) == len(b"GET /big host=docs.test\n") + BIG_BODY
    assert world.web.lines()[before:] == ["GET /big host=docs.test"]


def test_requests_one_after_another_on_a_kept_alive_connection(world: World) -> None:
    """curl reuses its connection to the proxy for the second URL: each request is judged,
    and the second goes out after the first one's response, on the same connection."""
    before = len(world.web.lines())
    result = run(["ip", "netns", "exec", world.netns, require("curl"), "-sS", "-v", "-x",
                  world.proxy, "http://docs.test/1", "http://docs.test/2"])
    assert result.stdout == "GET /1 host=docs.test\nGET /2 host=docs.test\n", result.stderr
    assert "Re-using existing connection" in result.stderr
    assert world.web.lines()[before:] == ["GET /1 host=docs.test", "GET /2 host=docs.test"]


def test_requests_for_two_origins_share_one_client_connection(world: World) -> None:
    back = world.raw(b"GET http://docs.test/1 HTTP/1.1\r\nHost: docs.test\r\n\r\n"
                     b"GET http://registry.test/2 HTTP/1.1\r\nHost: registry.test\r\n"
                     b"Connection: close\r\n\r\n")
    assert back.count(b"HTTP/1.1 200 OK") == 2
    assert b"GET /1 host=docs.test" in back and b"GET /2 host=registry.test" in back


def test_hop_by_hop_headers_and_proxy_credentials_are_not_forwarded(world: World) -> None:
    back = world.raw(b"GET http://docs.test/h HTTP/1.1\r\nHost: evil.test\r\n"
                     b"Proxy-Authorization: Basic c2VjcmV0\r\nConnection: close, X-Secret\r\n"
                     b"X-Secret: 1\r\n\r\n")
    assert b"GET /h host=docs.test" in back  # Host is the URI's authority (RFC 9112 3.2.2)


def test_a_large_json_post_goes_through(world: World) -> None:
    """Third attack pass: a JSON body whose first line ran past 8 KiB (json.dumps, as
    `requests` sends json=) was refused as a request line that did not end."""
    body = json.dumps({"messages": [{"role": "user", "content": "hello world " * 5}] * 150})
    (world.directory / "big.json").write_text(body)
    before = len(world.web.lines())
    status, _, _ = world.curl("-H", "Content-Type: application/json", "--data-binary",
                              f"@{world.directory / 'big.json'}", "http://registry.test/api")
    assert status == 200 and world.web.lines()[before:] == ["POST /api host=registry.test"]


def test_a_client_waiting_for_100_continue_is_told_to_send_its_body(world: World) -> None:
    """guardd forwards no expectation (Netty read a body it refused one for as a request), so
    no server says 100 Continue: curl waited out its timeout (1 s by default, 30 s here, past
    the 10 s curl is given), and Java's HttpClient, which has none, for good."""
    (world.directory / "upload.bin").write_bytes(b"x" * 5000)
    before = len(world.web.lines())
    status, _, _ = world.curl("-H", "Expect: 100-continue", "--expect100-timeout", "30",
                              "--data-binary", f"@{world.directory / 'upload.bin'}",
                              "http://registry.test/api")
    assert status == 200 and world.web.lines()[before:] == ["POST /api host=registry.test"]


def test_a_post_whose_form_names_a_denied_method_never_reaches_the_server_whole(
        world: World) -> None:
    """Rails, Laravel, Symfony, Spring and ASP.NET serve a POST with `_method=DELETE` in its
    form body as a DELETE: guardd holds the body's last byte and refuses it (the web server,
    which logs a request once its body is in, logs nothing)."""
    before = len(world.web.lines())
    status, headers, body = world.curl("-d", "title=x&%5Fmethod=DELETE",
                                       "http://registry.test/items/1")
    assert status == 403 and headers["x-guardd-rule"] == "registry-keeps"
    assert "`_method` field" in body
    assert world.curl("-d", "title=x&payment_method=card", "http://registry.test/items")[0] == 200
    assert world.web.lines()[before:] == ["POST /items host=registry.test"]


METADATA_URLS = ["http://169.254.169.254/latest/meta-data/", "http://2852039166/",
                 "http://0xa9fea9fe/", "http://0251.0376.0251.0376/", "http://169.254.43518/",
                 "http://[::ffff:169.254.169.254]/", "http://[::ffff:a9fe:a9fe]/",
                 "http://meta.test/", "http://169.254.169.254./"]


@pytest.mark.parametrize("url", METADATA_URLS)
def test_metadata_in_every_encoding_is_refused_before_any_connection(world: World, url: str
                                                                     ) -> None:
    status, _, _ = world.curl("--globoff", url)
    assert status in (400, 403)
    status, _, _ = world.curl("--globoff", "-p", url)  # as a CONNECT
    assert status in (400, 403)
    assert world.trap.lines() == []


@pytest.mark.parametrize("data, status", [
    (b"GET /not-absolute HTTP/1.1\r\nHost: docs.test\r\n\r\n", 400),
    (b"CONNECT docs.test HTTP/1.1\r\nHost: docs.test\r\n\r\n", 400),
    (b"GET http://docs.test/ HTTP/1.1\r\nHost: docs.test\r\nX: " + b"a" * 9000 + b"\r\n\r\n",
     431),
    (b"GET http://docs.test/ HTTP/1.1\r\nHost: docs.test\r\n" + b"".join(
        b"X-%d: 1\r\n" % n for n in range(101)) + b"\r\n", 431),
    (b"\x16\x03\x01\x00\x05hello", 400),
    (b"GET https://docs.test/ HTTP/1.1\r\nHost: docs.test\r\n\r\n", 400),
], ids=["origin-form", "connect-without-port", "huge-header", "too-many-headers", "tls-bytes",
        "https-absolute"])
def test_malformed_requests_get_a_clear_status_and_never_a_traceback(world: World, data: bytes,
                                                                     status: int) -> None:
    back = world.raw(data)
    assert back.startswith(b"HTTP/1.1 %d " % status), back[:200]
    assert b"guardd:" in back and b"Traceback" not in world.guardd.log_path.read_bytes()


def test_listener_metrics_count_the_http_decisions(world: World) -> None:
    assert world.curl("http://docs.test/metrics-check")[0] == 200  # (one of its own: run alone,
    samples = world.guardd.scrape()                               # it saw none)
    assert any(key.startswith("guardd_decisions_total{") and 'listener="http"' in key
               for key in samples), sorted(samples)[:20]


@pytest.mark.parametrize("through", ["http", "socks5h"])
def test_a_response_head_over_16_kib_in_segments_comes_whole(world: World, through: str) -> None:
    """Attack pass (2026-12-05): a 19 KB head in 1,460-byte segments was cut at 16 KiB (h11's
    default cap), its first part already gone: curl took it for the whole head, and lost the
    last cookies and the body without an error."""
    port = world.guardd.http[0][1] if through == "http" else world.guardd.socks[0][1]
    result = run(["ip", "netns", "exec", world.netns, require("curl"), "-sS", "-D", "-",
                  "--max-time", "10", "-x", f"{through}://127.0.0.1:{port}",
                  "http://docs.test/big-head"])
    assert result.returncode == 0, result.stderr
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    assert head.count("\nSet-Cookie: ") == BIG_HEAD_COOKIES and len(head) > 16 * 1024
    assert body == "GET /big-head host=docs.test\n"


def test_a_server_that_closes_without_answering_gets_the_client_a_502(world: World) -> None:
    """curl said only "Empty reply from server", and no record said what happened."""
    status, headers, body = world.curl("http://docs.test/hang-up")
    assert status == 502 and "closed by the server: without answering the request" in body
    number = int(headers["x-guardd-decision"])
    (record,) = [r for r in world.guardd.audit_records() if r.get("seq") == number]
    assert record["target"] == "http://docs.test:80"  # (the connection; its request's own
    # record, just before, has the URL)
    assert (record["effect"], record["outcome"]) == (  # (what happened: not a denial)
        "allow", "closed by the server: without answering the request")


def test_an_allowed_name_with_no_address_gets_a_502_not_a_403(world: World) -> None:
    """Session 60's read-through (Medium): an allowed name the upstream has no record of got
    403 Forbidden naming the allowing rule, and was recorded and counted as its denial: a DNS
    outage looked like the policy's word, and an agent told "forbidden" stops retrying."""
    status, headers, body = world.curl("http://gone.test/x")
    assert status == 502 and headers["x-guardd-rule"] == "gone", (status, headers, body)
    assert "no usable address" in body and "gone.test" in body
    number = int(headers["x-guardd-decision"])
    (record,) = [r for r in world.guardd.audit_records() if r.get("seq") == number]
    assert (record["effect"], record["target"], record["method"]) == (
        "allow", "http://gone.test:80/x", "GET"), record
    assert str(record["outcome"]).startswith("no usable address"), record


def test_a_socks_client_gets_the_same_decisions(world: World) -> None:
    """The SOCKS listener beside it: the same rule refuses the same POST."""
    code = ("import json,sys\nfrom tests.e2e.probe import probe\n"
            f"print(json.dumps(probe(('127.0.0.1',{world.guardd.socks[0][1]}),'docs.test',80,"
            "b'POST /s HTTP/1.1\\r\\nHost: docs.test\\r\\nContent-Length: 0\\r\\n\\r\\n',"
            "False,None)))")
    result = run(["ip", "netns", "exec", world.netns, sys.executable, "-c", code], cwd=ROOT)
    answer = json.loads(result.stdout)
    assert answer["reply"] == 0 and "docs-read-only" in answer["received"]



# --- real clients: pip, npm, Node, httpx, git -----------------------------------------------------

_STATIC_SERVER = (
    "import functools, http.server, sys\n"
    "handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=sys.argv[1])\n"
    f"server = http.server.ThreadingHTTPServer(({SITE_ADDRESS!r}, 80), handler)\n"
    "print(server.server_address[1], flush=True)\n"
    "server.serve_forever()\n")


def static_site(site: Path) -> Path:
    """A PEP 503 index with one wheel, an npm packument, and a git repository served the dumb
    HTTP way, all under `site`."""
    wheel = site / "packages" / "tinypkg-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    files = {"tinypkg/__init__.py": b"VALUE = 1\n",
             "tinypkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\n"
                                              b"Version: 1.0\n",
             "tinypkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: guardd-tests\n"
                                           b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={_b64(hashlib.sha256(data).digest())},{len(data)}\n"
                     for name, data in files.items()) + "tinypkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("tinypkg-1.0.dist-info/RECORD", record)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    index = site / "simple" / "tinypkg"
    index.mkdir(parents=True)
    (index / "index.html").write_text(
        f'<html><body><a href="/packages/{wheel.name}#sha256={digest}">{wheel.name}</a>'
        "</body></html>\n")
    tarball = "http://npm.test/tinypkg/-/tinypkg-1.0.0.tgz"
    (site / "tinypkg").write_text(json.dumps({
        "name": "tinypkg", "dist-tags": {"latest": "1.0.0"},
        "versions": {"1.0.0": {"name": "tinypkg", "version": "1.0.0",
                               "dist": {"tarball": tarball}}}}))
    work = site.parent / "git-work"
    git = require("git")
    for argv in (["init", "-q", str(work)], ["-C", str(work), "commit", "-q", "--allow-empty",
                 "-m", "guarded"], ["clone", "-q", "--bare", str(work), str(site / "repo.git")],
                 ["--git-dir", str(site / "repo.git"), "update-server-info"]):
        run([git, "-c", "user.name=t", "-c", "user.email=t@t", *argv]).check_returncode()
    return site


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def test_pip_downloads_from_a_local_index_in_a_fresh_venv_without_pysocks(world: World) -> None:
    venv = world.directory / "fresh-venv"
    assert world.in_netns(sys.executable, "-m", "venv", str(venv)).returncode == 0
    pip = str(venv / "bin" / "pip")
    assert world.in_netns(pip, "show", "pysocks").returncode != 0  # no SOCKS support at all
    # (ALL_PROXY=socks5h://... fails in such a venv: "Missing dependencies for SOCKS support")
    result = world.in_netns(pip, "download", "--no-deps", "--disable-pip-version-check",
                            "--proxy", world.proxy, "--index-url", "http://pypi.test/simple/",
                            "--trusted-host", "pypi.test",  # (plain HTTP: a local index)
                            "-d", str(world.directory / "downloads"), "tinypkg",
                            env={"PIP_CONFIG_FILE": os.devnull})
    assert result.returncode == 0, result.stdout + result.stderr
    assert (world.directory / "downloads" / "tinypkg-1.0-py3-none-any.whl").exists()
    urls = [r["target"] for r in world.records(listener="http", domain="pypi.test")]
    assert "http://pypi.test:80/simple/tinypkg/" in urls


def test_npm_reads_a_local_registry_through_the_proxy(world: World) -> None:
    result = world.in_netns(require("npm"), "view", "tinypkg", "version",
                            "--registry", "http://npm.test/", "--cache",
                            str(world.directory / "npm-cache"), "--no-update-notifier",
                            env={"npm_config_proxy": world.proxy})
    assert result.returncode == 0 and result.stdout.strip() == "1.0.0", result.stderr
    assert world.records(listener="http", domain="npm.test")


def test_node_http_through_the_proxy(world: World) -> None:
    port = world.guardd.http[0][1]
    script = ("const http = require('http');"
              f"http.get({{host: '127.0.0.1', port: {port}, path: 'http://docs.test/node',"
              "headers: {Host: 'docs.test'}}, (res) => { let body = '';"
              "res.on('data', (c) => body += c);"
              "res.on('end', () => console.log(res.statusCode, body.trim())); })"
              ".on('error', (e) => { console.log('error', e.message); process.exit(1); });")
    result = world.in_netns(require("node"), "-e", script)
    assert result.stdout.strip() == "200 GET /node host=docs.test", result.stderr
    script = script.replace("http://docs.test/node", "http://a.ngrok.io/").replace(
        "'docs.test'", "'a.ngrok.io'")
    result = world.in_netns(require("node"), "-e", script)
    assert result.stdout.startswith("403 guardd: 403 Forbidden: rule deny-tunnels")


def test_node_sends_its_connect_on_the_socket_its_get_used(world: World) -> None:
    """Attack pass (2026-12-05): Node's keep-alive agent sends a CONNECT on the socket of
    its absolute-form GET (once that is back in the pool); guardd cut it, and Node said
    "socket hang up"."""
    port = world.guardd.http[0][1]
    script = (
        "const http = require('http'), tls = require('tls'), fs = require('fs');"
        "const agent = new http.Agent({keepAlive: true, maxSockets: 1});"
        f"const proxy = {{host: '127.0.0.1', port: {port}, agent}};"
        "const fail = (e) => { console.log('error', e.message); process.exit(1); };"
        "http.get({...proxy, path: 'http://docs.test/first', headers: {Host: 'docs.test'}},"
        " (first) => { first.resume(); first.on('end', () => setTimeout(() => {"
        "  const req = http.request({...proxy, method: 'CONNECT', path: 'secure.test:443',"
        "                            headers: {Host: 'secure.test:443'}});"
        "  req.on('connect', (res, socket) => {"
        "    const t = tls.connect({socket, servername: 'secure.test',"
        f"                          ca: fs.readFileSync({str(world.ca)!r})}}, () =>"
        "      t.write('GET /tunnel HTTP/1.1\\r\\nHost: secure.test\\r\\n"
        "Connection: close\\r\\n\\r\\n'));"
        "    let out = ''; t.on('data', (c) => out += c); t.on('error', fail);"
        "    t.on('end', () => console.log(req.reusedSocket, res.statusCode,"
        "                                  out.split('\\r\\n\\r\\n')[1].trim()));"
        "  }); req.on('error', fail); req.end(); }, 50)); }).on('error', fail);")
    result = world.in_netns(require("node"), "-e", script)
    assert result.stdout.strip() == "true 200 GET /tunnel host=secure.test", result
    (record,) = world.records(listener="http", target="https://secure.test:443")[-1:]
    assert record["effect"] == "allow"


def test_a_denied_connect_after_a_get_on_one_connection_gets_its_403_after_the_response(
        world: World) -> None:
    back = world.raw(b"GET http://docs.test/c HTTP/1.1\r\nHost: docs.test\r\n\r\n"
                     b"CONNECT x.ngrok.io:443 HTTP/1.1\r\nHost: x.ngrok.io:443\r\n\r\n")
    first, _, second = back.partition(b"GET /c host=docs.test\n")
    assert first.startswith(b"HTTP/1.1 200 OK") and second.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"X-Guardd-Rule: deny-tunnels" in second


def test_httpx_with_proxy_for_http_and_https(world: World) -> None:
    code = ("import httpx, sys\n"
            "with httpx.Client(proxy=sys.argv[1], verify=sys.argv[2]) as client:\n"
            "    for url in ('http://docs.test/httpx', 'https://secure.test/httpx',"
            " 'http://a.ngrok.io/'):\n"
            "        try:\n"
            "            r = client.get(url)\n"
            "            print(r.status_code, r.headers.get('x-guardd-rule', '-'), r.text.strip())\n"
            "        except httpx.ProxyError as exc:\n"
            "            print('proxy-error', exc)\n")
    result = world.in_netns(sys.executable, "-c", code, world.proxy, str(world.ca),
                            env={"PYTHONPATH": os.pathsep.join(sys.path)})
    lines = result.stdout.splitlines()
    assert lines[:2] == ["200 - GET /httpx host=docs.test", "200 - GET /httpx host=secure.test"], \
        result.stdout + result.stderr
    assert lines[2].startswith("403 deny-tunnels")


def test_git_clones_over_http_through_the_proxy(world: World) -> None:
    clone = world.directory / "cloned"
    result = world.in_netns(require("git"), "-c", f"http.proxy={world.proxy}", "clone", "-q",
                            "http://git.test/repo.git", str(clone))
    assert result.returncode == 0, result.stderr
    assert (clone / ".git").is_dir()
    assert world.records(listener="http", domain="git.test")


def test_a_servers_reset_part_way_through_a_response_reaches_the_client_as_one(
        world: World) -> None:
    """Review: guardd read the server's reset as its close, which ends a body without a
    length: the client got a clean end and took the body cut short for whole, and nothing was
    recorded. It gets the reset, as it would without guardd, and the trail says so."""
    back, end = world.raw_ending(b"GET http://docs.test/reset HTTP/1.1\r\nHost: docs.test\r\n\r\n")
    assert back.startswith(b"HTTP/1.1 200 OK\r\n") and end == "reset"
    assert world.records(target="http://docs.test:80")[-1]["outcome"] == \
        "closed by the server: reset part-way through the response"
