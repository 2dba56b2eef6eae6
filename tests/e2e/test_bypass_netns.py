"""The ways around the guard that an attack pass found (issue "Close the ways around the guard"),
each tried as the agent would, inside a network namespace the test creates with only `lo`.

The policy has the deny-list layout `policies/lists/exfil.txt` recommends: tunnels denied first,
a `method` rule for one host, a catch-all allow last. Behind the allowed names stand an echo
server (it logs every chunk it receives: for the TLS cases it is the trap that must see nothing)
and Python's own lenient `http.server` (it logs every request it serves, whatever the method).
guardd listens on the wildcard address, and the namespace's `lo` carries a second address of
guardd's host, 192.0.2.10, which `self.test` resolves to. Clients of their own are agents in a
namespace beside it (`agents_netns`): every address of guardd's host is loopback, one client.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from guardd.stream.answers import TLS_ACCESS_DENIED

from tests.e2e.harness import (AGENTS_LINK, ROOT, Destination, Guardd, Upstream, agents_netns,
                               loopback_netns, run)
from tests.unit.test_stream_sniff import frame, handshake_of, real_hello

HOST_ADDRESS = "192.0.2.10"
PER_CLIENT = 8
#: Clients of their own, in the agents' namespace (not addresses of guardd's host: those are all
#: one client, loopback). Clients that resolved nothing before their tests:
FRESH_CLIENT = "10.78.0.4"
LATE_CLIENT = "10.78.0.5"
#: A client whose rate limits no other test spends.
FOLLOWED_CLIENT = "10.78.0.6"
#: A client that holds its share of the connection slots.
GREEDY_CLIENT = "10.78.0.3"
#: An address outside `clients`.
OUTSIDER = "10.78.0.2"
AGENTS = (FRESH_CLIENT, LATE_CLIENT, FOLLOWED_CLIENT, GREEDY_CLIENT, OUTSIDER)
#: A trap stands here in the namespace: nothing may ever reach it.
METADATA = "169.254.169.254"
#: The NAT64 network-specific prefix guardd is told of (`nat64Prefixes`).
NAT64_PREFIX = "2001:db8:64::/96"
POLICY = """\
version: "1.0"
rules:
  - {id: deny-tunnels, action: network.request, domain: ["*.ngrok.io", "*.tunnel.test"],
     effect: deny}
  - {id: limited, action: network.request, domain: limited.test, ip: 127.0.0.0/8, effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
  - {id: docs-no-post, action: network.request, domain: docs.test, method: POST, effect: deny}
  - {id: dual-v4-limited, action: network.request, domain: dual.test, ip: 127.0.0.0/8,
     effect: allow, rateLimit: {maxRequests: 2, window: "1 minute"}}
  - {id: dual-v6, action: network.request, domain: dual.test, ip: "::1/128", effect: allow}
  - {id: both-limited, action: network.request, domain: both.test,
     ip: [127.0.0.0/8, "::1/128"], effect: allow, rateLimit: {maxRequests: 2, window: "1 minute"}}
  - {id: no-port-80, action: network.request, ip: 127.0.0.0/8, port: 80, effect: deny}
  - {id: loopback, action: network.request, ip: [127.0.0.0/8, 192.0.2.0/24], effect: allow}
  - {id: lab, action: network.request, ip: 10.77.0.0/16, effect: allow}
  - {id: everything, action: "*", domain: "*", effect: allow}
"""
ZONES = {name: ["A 127.0.0.1"] for name in
         ("registry.test", "limited.test", "docs.test", "x.tunnel.test", "a.ngrok.io",
          "other.test")}
ZONES["self.test"] = [f"A {HOST_ADDRESS}"]
ZONES["meta.test"] = ["A 169.254.169.254"]
# IPv6 first, where nothing listens (the servers are on 127.0.0.1): the connect falls back
ZONES["dual.test"] = ZONES["both.test"] = ["AAAA ::1", "A 127.0.0.1"]


@dataclass
class World:
    netns: str
    #: The agents' namespace, beside guardd's.
    agents: str
    guardd: Guardd
    upstream: Upstream
    echo: Destination
    lenient: Destination
    web: Destination
    banner: Destination
    forward: Destination
    trap: Destination
    #: A trap on the wildcard address: a service of guardd's host, answering on every address
    #: the host has (10.77.0.0/24 on `lo` is a `local` route: all 256 of them).
    host_service: Destination

    def probe(self, host: str, port: int, send: bytes = b"", half_close: bool = False,
              source: str | None = None, hold: int = 0, resolve: str | None = None,
              reply_only: bool = False) -> tuple[int | None, bytes]:
        """A CONNECT through guardd from inside the namespace, or from `source` in the agents':
        (SOCKS reply, bytes back; none with `reply_only`, which closes at the reply rather
        than wait 5 s for bytes that will not come)."""
        proxy_host, proxy_port = self.guardd.socks[0]
        guardd = AGENTS_LINK if source else "127.0.0.1"
        argv = ["ip", "netns", "exec", self.agents if source else self.netns, sys.executable,
                "-m", "tests.e2e.probe", guardd, str(proxy_port), host, str(port), "--send",
                send.hex()]
        argv += ["--half-close"] * half_close + (["--source", source] if source else [])
        argv += ["--hold", str(hold)] + ["--reply-only"] * reply_only
        if resolve:  # a name the client resolves through guardd between reply and first bytes
            argv += ["--resolve", f"{guardd}:{self.guardd.dns[0][1]}", resolve]
        result = run(argv, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        return answer["reply"], answer["received"].encode("latin-1")

    def refused_with_403(self, server: Destination, head: bytes, why: str,
                         host: str = "registry.test") -> None:
        """`head` through a CONNECT to `host` gets guardd's 403 saying `why`; `server` saw
        nothing of it."""
        before = len(server.lines())
        reply, back = self.probe(host, server.port, head)
        assert reply == 0 and back.startswith(b"HTTP/1.1 403 Forbidden"), back
        assert why in back.decode("latin-1")
        assert server.lines()[before:] == []

    def last_record(self, **where: object) -> dict[str, object]:
        records = [r for r in self.guardd.audit_records("action=network.request")
                   if all(r.get(k) == v for k, v in where.items())]
        assert records, where
        return records[-1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with loopback_netns(f"{HOST_ADDRESS}/32", f"{METADATA}/32", "10.77.0.0/24") as netns, \
            agents_netns(netns, *AGENTS) as agents:
        directory = tmp_path_factory.mktemp("bypass")
        upstream = Upstream(directory, ZONES, netns=netns)
        servers = [Destination(directory, mode, netns=netns)
                   for mode in ("echo", "lenient", "web", "banner", "forward")]
        servers.append(Destination(directory, "trap", host=METADATA, port=80, netns=netns))
        servers.append(Destination(directory, "trap", host="0.0.0.0", netns=netns))
        policy = directory / "policy.yaml"
        policy.write_text(POLICY)
        config = directory / "guardd.yaml"
        config.write_text(json.dumps({"clients": ["127.0.0.1/32", GREEDY_CLIENT,
                                                  FRESH_CLIENT, LATE_CLIENT, FOLLOWED_CLIENT],
                                      "socksMaxConnectionsPerClient": PER_CLIENT,
                                      "nat64Prefixes": [NAT64_PREFIX]}))
        guardd = Guardd.launch(directory, "--config", str(config), "--policy", str(policy),
                               "--upstream", upstream.address, "--dns", "0.0.0.0:0",
                               "--socks", "0.0.0.0:0", "--metrics", "127.0.0.1:0", netns=netns)
        try:
            yield World(netns, agents, guardd, upstream, *servers)
            assert guardd.stop() == 0, guardd.log_text()
        finally:
            for child in (upstream, *servers):
                child.stop()


def echoed_chunks(world: World, before: int) -> list[str]:
    return [line for line in world.echo.lines()[before:] if line != "connection"]


# --- 1 and 2: TLS that guardd cannot read is denied, whatever allows the connect ---------------

def test_control_a_matching_hello_reaches_the_echo_server(world: World) -> None:
    hello = real_hello("registry.test")
    reply, back = world.probe("registry.test", world.echo.port, hello, half_close=True)
    assert (reply, back) == (0, hello)


UNREADABLE_HELLOS = [
    ("record-version-0x0000", lambda: frame(handshake_of(real_hello("x.tunnel.test")),
                                                    version=b"\x00\x00"), "domain fronting"),
    ("record-version-0x0401", lambda: frame(handshake_of(real_hello("a.ngrok.io")),
                                                    version=b"\x04\x01"), "domain fronting"),
    ("two-server-names", lambda: two_names_hello(), "two host names"),
    ("over-64-kib", lambda: b"\x16\x03\x01\x40\x00\x01\x01\x10\x00" + bytes(16_380),
     "guardd reads at most"),
    ("cut-short-by-half-close", lambda: real_hello("x.tunnel.test")[:100], "closed its side"),
    # Go's crypto/tls skips warning alerts before the hello: the SNI behind them still counts
    ("warning-alert-first", lambda: b"\x15\x03\x01\x00\x02\x01\x5a" + real_hello("x.tunnel.test"),
     "domain fronting"),
    ("fatal-alert-first", lambda: b"\x15\x03\x01\x00\x02\x02\x28" + real_hello("x.tunnel.test"),
     "comes before it"),
]


def two_names_hello() -> bytes:
    """A ClientHello whose server_name lists an allowed and a denied host name."""
    names = b"".join(b"\x00" + len(n).to_bytes(2, "big") + n
                     for n in (b"registry.test", b"x.tunnel.test"))
    extension = b"\x00\x00" + (len(names) + 2).to_bytes(2, "big") + len(names).to_bytes(2, "big")
    body = (b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
            + len(extension + names).to_bytes(2, "big") + extension + names)
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


@pytest.mark.parametrize("make, why", [c[1:] for c in UNREADABLE_HELLOS],
                         ids=[c[0] for c in UNREADABLE_HELLOS])
def test_a_hello_guardd_cannot_verify_never_reaches_the_server(world: World, make, why: str
                                                               ) -> None:
    before = len(world.echo.lines())
    reply, back = world.probe("registry.test", world.echo.port, make(), half_close=True)
    assert (reply, back) == (0, TLS_ACCESS_DENIED)  # (guardd's alert, nothing else)
    assert echoed_chunks(world, before) == []  # not one byte reached the trap
    record = world.last_record(target=f"registry.test:{world.echo.port}")
    assert record["effect"] == "deny" and why in str(record["reason"]), record
    assert "x.tunnel.test" not in world.upstream.queries()


def test_a_hello_larger_than_one_record_is_read_not_refused(world: World) -> None:
    hello = real_hello("registry.test", [f"protocol-{i:05d}-" + "x" * 40 for i in range(400)])
    assert len(hello) > 16 * 1024
    reply, back = world.probe("registry.test", world.echo.port, hello, half_close=True)
    assert (reply, back) == (0, hello)


def test_two_host_headers_get_a_403_and_reach_nobody(world: World) -> None:
    before = len(world.lenient.lines())
    reply, back = world.probe("docs.test", world.lenient.port,
                              b"GET / HTTP/1.1\r\nHost: docs.test\r\nHost: x.tunnel.test\r\n\r\n")
    assert reply == 0 and back.startswith(b"HTTP/1.1 403 Forbidden")
    assert b"two different Host headers" in back
    assert world.lenient.lines()[before:] == []


ODD_HEADS = [
    ("non-token-method", b"GET@ / HTTP/1.1\r\nHost: registry.test\r\n\r\n", "not an HTTP token"),
    ("mixed-line-ends", b"GET / HTTP/1.1\r\nX: a\n\n\r\nHost: x.tunnel.test\r\n\r\n",
     "line ends mixed"),
    ("fold-first-header", b"GET / HTTP/1.1\r\n Host: x.tunnel.test\r\n\r\n", "obs-fold"),
    ("form-feed-before-colon", b"GET / HTTP/1.1\r\nHost\x0c: x.tunnel.test\r\n\r\n",
     "domain fronting"),
    # behind the CONNECT may stand a forward proxy that goes where the request names
    ("absolute-uri-metadata", b"GET http://169.254.169.254/latest/ HTTP/1.1\r\n"
                              b"Host: 169.254.169.254\r\n\r\n", "metadata"),
    ("connect-authority-metadata", b"CONNECT 169.254.169.254:80 HTTP/1.1\r\n"
                                   b"Host: 169.254.169.254:80\r\n\r\n", "metadata"),
    ("host-hex-metadata", b"GET / HTTP/1.1\r\nHost: 0xa9fea9fe\r\n\r\n", "metadata"),
    ("host-private", b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n", "private address"),
]


@pytest.mark.parametrize("head, why", [c[1:] for c in ODD_HEADS], ids=[c[0] for c in ODD_HEADS])
def test_a_head_some_server_reads_otherwise_gets_a_403_and_reaches_nobody(world: World,
                                                                          head: bytes,
                                                                          why: str) -> None:
    world.refused_with_403(world.web, head, why)


def test_a_method_no_client_writes_is_cut_as_a_request_and_reaches_nobody(world: World) -> None:
    """Attack pass 50: first bytes whose first word is no token, nor a method to gunicorn, are
    other bytes at once (an XMPP client's opening waited for a line end), read on as lenient
    servers read them: a request line there is cut before it goes, where it was a 403."""
    before = len(world.web.lines())
    reply, back = world.probe("registry.test", world.web.port,
                              b"get@ / HTTP/1.1\r\nHost: registry.test\r\n\r\n")
    assert reply == 0 and back == b""
    assert world.web.lines()[before:] == []
    assert "a request after all" in str(world.last_record()["reason"])


def test_control_the_forward_proxy_goes_where_the_request_says(world: World) -> None:
    reply, back = world.probe("registry.test", world.forward.port,
                              f"GET http://127.0.0.1:{world.web.port}/via HTTP/1.1\r\n"
                              f"Host: 127.0.0.1:{world.web.port}\r\n\r\n".encode())
    assert reply == 0 and b"200 OK" in back
    assert world.web.lines()[-1] == f"GET /via host=127.0.0.1:{world.web.port}"


FORWARDED = [
    ("scheme-relative", b"GET //169.254.169.254/latest HTTP/1.1\r\nHost: registry.test\r\n\r\n",
     "URL parsers read as naming a host"),
    ("name-resolving-to-metadata", b"GET http://meta.test/latest HTTP/1.1\r\nHost: meta.test"
                                   b"\r\n\r\n", "HTTP Host meta.test is not the CONNECT target"),
    ("metadata-literal", b"GET http://169.254.169.254/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
     "metadata"),
]


@pytest.mark.parametrize("head, why", [c[1:] for c in FORWARDED], ids=[c[0] for c in FORWARDED])
def test_a_forward_proxy_behind_an_allowed_name_is_not_a_way_to_metadata(world: World,
                                                                         head: bytes,
                                                                         why: str) -> None:
    world.refused_with_403(world.forward, head, why)
    assert world.trap.lines() == []


def test_a_claim_over_a_connect_by_address_is_judged_as_made(world: World) -> None:
    """Resolving the claimed name (to judge where it goes) teaches guardd that this client
    resolved it to the address: the claim must be judged as it stood before."""
    before = len(world.lenient.lines())
    reply, back = world.probe("127.0.0.1", world.lenient.port,
                              b"POST /by-address HTTP/1.1\r\nHost: docs.test\r\n\r\n",
                              source=FRESH_CLIENT)
    assert reply == 0 and back.startswith(b"HTTP/1.1 403 Forbidden"), back
    assert b"docs-no-post" in back
    assert world.lenient.lines()[before:] == []


def test_a_name_resolved_after_a_connect_by_address_is_still_a_claim(world: World) -> None:
    before = len(world.lenient.lines())
    reply, back = world.probe("127.0.0.1", world.lenient.port,
                              f"POST /later HTTP/1.1\r\nHost: docs.test:{world.lenient.port}"
                              "\r\n\r\n".encode(), source=LATE_CLIENT, resolve="docs.test")
    assert reply == 0 and back.startswith(b"HTTP/1.1 403 Forbidden"), back
    assert b"docs-no-post" in back
    assert world.lenient.lines()[before:] == []


def test_a_host_without_port_is_judged_where_a_forward_proxy_takes_it(world: World) -> None:
    world.refused_with_403(world.forward, b"GET /origin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
                           "no-port-80")


def test_a_claim_allowed_by_the_same_rule_is_recorded(world: World) -> None:
    reply, back = world.probe("registry.test", world.echo.port, real_hello("other.test"),
                              half_close=True)
    assert reply == 0 and back
    record = world.last_record(target=f"registry.test:{world.echo.port}")
    assert (record["domain"], record["effect"], record["matchedRule"]) == (
        "other.test", "allow", "loopback")  # the rule that allowed registry.test too


# --- 3: request heads a lenient server serves are judged with their method ---------------------

def test_control_the_lenient_server_serves_a_get(world: World) -> None:
    reply, back = world.probe("docs.test", world.lenient.port,
                              f"GET /ok HTTP/1.1\r\nHost: docs.test:{world.lenient.port}\r\n"
                              "Connection: close\r\n\r\n".encode())
    assert reply == 0 and back.startswith(b"HTTP/1.1 200")
    assert world.lenient.lines()[-1] == "GET /ok"


def test_a_request_in_a_body_the_server_does_not_read_never_reaches_it(world: World) -> None:
    """Attack pass: the lenient server reads no body it does not expect, and served the
    DELETE inside a GET's body as the connection's next request: never judged, charged or
    recorded. The body's first bytes are read as first bytes are (a request: cut), and a
    request with a body goes with `Connection: close`."""
    host = f"docs.test:{world.lenient.port}"
    smuggled = f"DELETE /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    before = len(world.lenient.lines())
    reply, _ = world.probe("docs.test", world.lenient.port, (
        f"GET /carrier HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(smuggled)}\r\n\r\n"
        f"{smuggled}").encode())
    assert reply == 0 and world.lenient.lines()[before:] == ["GET /carrier"]
    record = world.last_record(target=f"docs.test:{world.lenient.port}")
    assert record["effect"] == "deny"
    assert "a lenient server would read as a request of its own (DELETE" in str(record["reason"])


LENIENT_POSTS = [
    ("leading-space", b" POST /x HTTP/1.1\r\nHost: docs.test\r\n\r\n", False),
    ("leading-tab", b"\tPOST /x HTTP/1.1\r\n\r\n", False),
    ("version-01.1", b"POST /x HTTP/01.1\r\n\r\n", False),
    ("version-0.1", b"POST /x HTTP/0.1\r\n\r\n", False),
    ("separator-0x1c", b"POST\x1c/x\x1cHTTP/1.1\r\n\r\n", False),
    ("separator-nbsp", b"POST\xa0/x\xa0HTTP/1.1\r\n\r\n", False),
    ("separator-nel", b"POST\x85/x\x85HTTP/1.1\r\n\r\n", False),
    ("lower-case", b"post /x HTTP/1.1\r\n\r\n", False),
    ("head-ended-by-half-close", b"POST /x HTTP/1.1\r\nHost: docs.test\r\n", True),
    ("request-line-ended-by-half-close", b"POST /x HTTP/1.1", True),
]


@pytest.mark.parametrize("data, half_close", [c[1:] for c in LENIENT_POSTS],
                         ids=[c[0] for c in LENIENT_POSTS])
def test_a_post_in_any_spelling_is_denied_by_the_method_rule(world: World, data: bytes,
                                                             half_close: bool) -> None:
    before = len(world.lenient.lines())
    reply, back = world.probe("docs.test", world.lenient.port, data, half_close=half_close)
    assert reply == 0 and back.startswith(b"HTTP/1.1 403 Forbidden"), back
    assert world.lenient.lines()[before:] == []  # the lenient server served nothing
    record = world.last_record(target=f"docs.test:{world.lenient.port}")
    assert (record["effect"], record["matchedRule"], record["method"]) == (
        "deny", "docs-no-post", "POST")


def test_a_post_after_a_get_on_one_kept_alive_connection_is_refused(world: World) -> None:
    """Issue 11, item 4: before, only the first request of a connection was judged."""
    host = f"docs.test:{world.web.port}"
    before = len(world.web.lines())
    requests = (f"GET /a HTTP/1.1\r\nHost: {host}\r\n\r\n"
                f"POST /b HTTP/1.1\r\nHost: {host}\r\nContent-Length: 2\r\n\r\nhi").encode()
    reply, back = world.probe("docs.test", world.web.port, requests)
    assert reply == 0 and back.startswith(b"HTTP/1.1 200 OK"), back
    assert b"HTTP/1.1 403 Forbidden" in back and b"docs-no-post" in back
    assert world.web.lines()[before:] == [f"GET /a host={host}"]  # the POST never arrived
    record = world.last_record(target=host)
    assert (record["effect"], record["matchedRule"], record["method"]) == (
        "deny", "docs-no-post", "POST")


def test_every_request_on_one_connection_counts_against_the_rate_limit(world: World) -> None:
    """`limited` allows 2 a minute: before, any number of requests went on one connect."""
    host = f"limited.test:{world.web.port}"
    before = len(world.web.lines())
    get = f"GET /n HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    reply, back = world.probe("limited.test", world.web.port, get * 3, source=FOLLOWED_CLIENT)
    assert reply == 0 and back.count(b"HTTP/1.1 200 OK") == 2 and b"403 Forbidden" in back
    assert len(world.web.lines()[before:]) == 2
    assert "rate limit" in str(world.last_record(client=FOLLOWED_CLIENT)["reason"])


def test_bytes_that_are_not_http_where_a_method_rule_applies_are_cut(world: World) -> None:
    before = len(world.lenient.lines())
    reply, back = world.probe("docs.test", world.lenient.port,
                              b"\x00\x01\x02P\x00OST / HTTP/1.1")  # (no method: binary)
    assert (reply, back) == (0, b"")
    assert world.lenient.lines()[before:] == []
    assert "method cannot be read" in str(world.last_record(
        target=f"docs.test:{world.lenient.port}")["reason"])


def test_a_client_that_sends_nothing_and_closes_its_side_still_hears_the_server(world: World
                                                                                ) -> None:
    """Nothing to judge is not a denial where no method rule applies: the server speaks first."""
    reply, back = world.probe("registry.test", world.banner.port, half_close=True)
    assert (reply, back) == (0, b"banner\n")


# --- 4: guardd never reaches itself or its upstream resolver ---------------------------------

def test_guardd_is_not_a_destination_on_any_of_its_hosts_addresses(world: World) -> None:
    socks_port = world.guardd.socks[0][1]
    dns_port = world.guardd.dns[0][1]
    upstream_port = int(world.upstream.address.rpartition(":")[2])
    for host, port in (("self.test", socks_port), (HOST_ADDRESS, socks_port),
                       (HOST_ADDRESS, dns_port), ("127.0.0.7", socks_port),
                       ("127.0.0.1", upstream_port), ("registry.test", upstream_port),
                       # (a resolver on the host may answer at any of its addresses: attack
                       # pass, 2026-12-06, a wildcard one reached at 127.0.0.2 and [::1])
                       ("127.0.0.7", upstream_port), (HOST_ADDRESS, upstream_port),
                       ("127.0.0.7", 53)):
        reply, _ = world.probe(host, port)
        assert reply == 2, (host, port)
        record = world.last_record(target=f"{host}:{port}")
        assert "guardd itself or its upstream DNS server" in str(record["reason"])


def test_an_address_under_the_nat64_prefix_guardd_was_told_of_is_what_it_carries(
        world: World) -> None:
    """Session 61's attack (Medium; High where such a translator runs): under a rule that
    opens every name, a SOCKS connect to `[2001:db8:64::a00:5]:80` was one to a public address,
    and tayga's translation of that prefix took it to 10.0.0.5. The prefix in `nat64Prefixes`,
    it is judged as what it carries, here the metadata address."""
    reply, _ = world.probe("2001:db8:64::a9fe:a9fe", 80, reply_only=True)
    assert reply == 2
    (record,) = [r for r in world.guardd.audit_records("action=network.request")
                 if "2001:db8:64::a9fe:a9fe" in str(r.get("target"))]
    assert record["effect"] == "deny" and "metadata" in str(record["reason"]), record


def test_no_address_the_host_answers_on_is_opened_by_a_rule_for_its_network(world: World
                                                                              ) -> None:
    """10.77.0.9 is on no interface, but the `local` route of 10.77.0.0/24 on `lo` makes the
    host answer there (attack pass 23: AnyIP); the `lab` rule names the network, not the
    address: neither guardd's own listener nor the host's service is reached."""
    for port, why in ((world.guardd.socks[0][1], "guardd itself or its upstream DNS server"),
                      (world.host_service.port, "an address of guardd's own host")):
        reply, _ = world.probe("10.77.0.9", port)
        assert reply == 2, port
        assert why in str(world.last_record(target=f"10.77.0.9:{port}")["reason"])
    assert world.host_service.lines() == []


# --- 5: clients applies to the SOCKS listener too ----------------------------------------------

def test_a_source_outside_clients_is_not_served(world: World) -> None:
    reply, _ = world.probe("registry.test", world.echo.port, source=OUTSIDER)
    assert reply is None  # closed before any SOCKS answer
    record = world.last_record(client=OUTSIDER)
    assert record["effect"] == "deny" and "not in guardd's client networks" in str(
        record["reason"])
    assert 'guardd_connections_rejected_total{listener="socks"} 1.0' in "\n".join(
        f"{k} {v}" for k, v in world.guardd.scrape().items())


# --- 11: one client cannot take every slot -------------------------------------------------------

def test_a_client_holding_its_share_of_slots_is_refused_more_but_others_are_served(
        world: World) -> None:
    reply, _ = world.probe("registry.test", world.echo.port, source=GREEDY_CLIENT,
                           hold=PER_CLIENT)
    assert reply is None  # the 9th connection from that client is closed at once
    assert f"holds {PER_CLIENT} connections" in str(world.last_record(client=GREEDY_CLIENT)["reason"])
    reply, _ = world.probe("registry.test", world.echo.port, source=GREEDY_CLIENT,
                           hold=PER_CLIENT - 1, reply_only=True)
    assert reply == 0  # within its share
    reply, _ = world.probe("registry.test", world.echo.port, reply_only=True)
    assert reply == 0


def test_the_rate_limit_of_the_address_connected_to_is_the_one_charged(world: World) -> None:
    """dual.test's IPv6 address is allowed without a limit, its IPv4 one with 2 a minute: the
    IPv6 attempt fails, so every connect lands on IPv4 and counts there."""
    replies = [world.probe("dual.test", world.echo.port, reply_only=True)[0] for _ in range(3)]
    assert replies == [0, 0, 2]
    record = world.last_record(target=f"dual.test:{world.echo.port}")
    assert "rate limit of rule dual-v4-limited exceeded" in str(record["reason"])
    assert world.last_record(target=f"dual.test:{world.echo.port}", effect="allow")[
        "matchedRule"] == "dual-v4-limited"


def test_one_connect_is_charged_once_per_rule_however_many_addresses_it_tries(world: World
                                                                            ) -> None:
    """both.test's two addresses fall under one limited rule: a connect whose IPv6 attempt
    fails and IPv4 one succeeds is one request, so two connects fit a limit of two."""
    replies = [world.probe("both.test", world.echo.port, reply_only=True)[0] for _ in range(3)]
    assert replies == [0, 0, 2]


# --- 9: the name actually served is the one rate-limited ---------------------------------------

def test_a_rate_limited_name_behind_another_allowed_name_is_counted(world: World) -> None:
    """limited.test allows 2 connections a minute; named by a Host header or an SNI over a
    CONNECT to the unlimited registry.test, each use counts, and the third is refused."""
    host = (world.web, b"GET / HTTP/1.1\r\nHost: limited.test\r\nConnection: close\r\n\r\n")
    sni = (world.echo, real_hello("limited.test"))
    served = []
    for server, request in (host, sni, host):
        reply, back = world.probe("registry.test", server.port, request,
                                  half_close=server is world.echo)
        assert reply == 0
        served.append(bool(back) and not back.startswith(b"HTTP/1.1 403"))
    assert served == [True, True, False]
    record = world.last_record(target=f"registry.test:{world.web.port}")
    assert "rate limit of rule limited exceeded" in str(record["reason"])
