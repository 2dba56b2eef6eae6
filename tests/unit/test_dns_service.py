"""DNSService without sockets: query bytes in, answer bytes out, upstream faked."""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Callable

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RR, DNSQuestion, DNSRecord

from guardd.dns import wire
from guardd.dns.cache import AnswerCache
from guardd.dns.resolver import (Failure, Reason, ResolverStopped, Transport, Upstream,
                                 UpstreamFailure, Withdrawn)
from guardd.dns.server import CLIENT_MAX_FORWARDS, DNSService
from guardd.errors import DNSWireError
from guardd.guard import Guard
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.replay import replay
from tests.unit.fakes import ListAudit

POLICY = """\
version: "1.0"
rules:
  - {id: tunnels, action: network.request, domain: "*.ngrok.io", effect: deny, reason: tunnel}
  - {id: corp, action: network.request, domain: "*.corp.test", effect: allow}
  - {id: public, action: network.request, domain: "*.example.com", effect: allow}
  - {id: star, action: "*", domain: "*", effect: allow}
"""

ZONE = {
    "www.example.com": ["A 192.0.2.1", "AAAA 2001:db8::1"],
    "db.corp.test": ["A 10.0.0.5"],
    "meta.example.com": ["A 169.254.169.254"],
    "mixed.corp.test": ["A 10.0.0.6", "A 127.0.0.1"],
    "private.other.org": ["A 192.168.1.1"],
    "alias.example.com": ["CNAME x.ngrok.io"],
    "ok-alias.example.com": ["CNAME www.example.com", "www.example.com A 192.0.2.1"],
}


class FakeUpstream:
    """Answers from ZONE like an authoritative server; records what it was asked."""

    def __init__(self, fail: UpstreamFailure | None = None) -> None:
        self.asked: list[str] = []
        self.asked_for: list[str] = []  # (the clients)
        self.fail = fail

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
        request = DNSRecord.parse(query)
        name = str(request.q.qname).rstrip(".").lower()
        self.asked.append(name)
        self.asked_for.append(client)
        if self.fail:
            raise self.fail
        reply = request.reply()
        for text in ZONE.get(name, []):
            first, rest = text.split(None, 1)
            owner, record = (name, text) if first.isupper() else (first, rest)
            rr = RR.fromZone(f"{owner}. 300 IN {record}")[0]
            if rr.rtype in (request.q.qtype, QTYPE.CNAME):
                reply.add_answer(rr)
        if name not in ZONE:
            reply.header.rcode = RCODE.NXDOMAIN
        return reply.pack()


def make_service(upstream: FakeUpstream | None = None, clients_ok: bool = True
                 ) -> tuple[DNSService, FakeUpstream, ListAudit, Guard]:
    upstream = upstream or FakeUpstream()
    audit = ListAudit()
    guard = Guard(Policy.from_text(POLICY), audit, Metrics(process=False))
    service = DNSService(guard, AnswerCache(), upstream, guard.metrics, lambda c: clients_ok)
    return service, upstream, audit, guard


def ask(service: DNSService, name: str, qtype: str = "A", *, edns: bool = True,
        client: str = "10.9.9.9", tcp: bool = False, local: bool = False) -> DNSRecord | None:
    """`name` asked by `client` (`local`: on a socket bound to loopback), answered."""
    query = DNSRecord.question(name, qtype)
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    result = service.answer(bytes(query.pack()), client, tcp, local)
    if result is not None and not isinstance(result, bytes):
        result = asyncio.run(result)
    return DNSRecord.parse(result) if result is not None else None


def ede_of(reply: DNSRecord) -> tuple[int, str] | None:
    for rr in reply.ar:
        if rr.rtype == QTYPE.OPT:
            for option in rr.rdata:
                if option.code == 15:
                    return int.from_bytes(option.data[:2], "big"), option.data[2:].decode()
    return None


def addresses(reply: DNSRecord) -> list[str]:
    return [str(rr.rdata) for rr in reply.rr if rr.rtype in (QTYPE.A, QTYPE.AAAA)]


def test_denied_name_nxdomain_with_ede_and_never_forwarded() -> None:
    service, upstream, audit, _ = make_service()
    reply = ask(service, "data.x.ngrok.io")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert ede_of(reply) == (15, "tunnels: tunnel")
    assert upstream.asked == []
    assert audit.records[0]["effect"] == "deny" and audit.records[0]["matchedRule"] == "tunnels"


def test_no_ede_without_edns() -> None:
    service, *_ = make_service()
    reply = ask(service, "x.ngrok.io", edns=False)
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.ar


def test_allowed_forwarded_then_cached() -> None:
    service, upstream, audit, guard = make_service()
    first = ask(service, "www.example.com")
    second = ask(service, "www.example.com", client="10.9.9.8")
    assert addresses(first) == addresses(second) == ["192.0.2.1"]
    assert upstream.asked == ["www.example.com"]
    assert [r["effect"] for r in audit.records] == ["allow", "allow"]
    ip = ipaddress.ip_address("192.0.2.1")
    assert guard.resolved.lookup("10.9.9.9", ip) == ("www.example.com",)
    assert guard.resolved.lookup("10.9.9.8", ip) == ("www.example.com",)  # from the cache hit
    assert guard.resolved.lookup("10.9.9.7", ip) == ()


@pytest.mark.parametrize("name, reason_fragment", [
    ("meta.example.com", "metadata"),
    ("private.other.org", "private"),
    ("alias.example.com", "x.ngrok.io"),
], ids=["metadata", "private-under-star-zone", "cname-into-denied"])
def test_answers_filtered(name: str, reason_fragment: str) -> None:
    """The record of a filtered answer lacks the answer: it says the denial was guardd's own
    check, and `audit replay` under the policy that judged counts it apart, not as allowed
    now (left open by attack pass 52)."""
    service, _, audit, guard = make_service()
    reply = ask(service, name)
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.rr
    code, text = ede_of(reply)
    assert code == 17 and reason_fragment in text
    assert audit.records[-1]["effect"] == "deny" and reason_fragment in audit.records[-1]["reason"]
    assert audit.records[-1]["ownCheck"] is True
    assert (replay(guard.policy, audit.records).changed,
            replay(guard.policy, audit.records).checked) == (0, 1)


class TrailingUpstream(FakeUpstream):
    """Answers as ZONE says, then appends a record no header count covers."""

    def __init__(self, trailing: bytes) -> None:
        super().__init__()
        self.trailing = trailing

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
        return await super().resolve(query, prefer_tcp=prefer_tcp) + self.trailing


def test_bytes_past_the_counted_records_never_reach_the_client() -> None:
    """Session 53's attack (Low): an upstream answer followed by a record its header does not
    count (`A 169.254.169.254`) went to the client verbatim, as it was cached, whenever
    vetting stripped nothing: bytes no vetting read. An answer ends with its last counted
    record; what follows is dropped, before the cache too."""
    metadata = b"\x03www\x07example\x03com\x00" + struct.pack("!HHIH", 1, 1, 300, 4) + \
        bytes([169, 254, 169, 254])
    service, *_ = make_service(TrailingUpstream(metadata))
    for _ in range(2):  # (the second from the cache)
        query = DNSRecord.question("www.example.com", "A")
        reply = service.answer(bytes(query.pack()), "10.9.9.9", False, False)
        reply = reply if isinstance(reply, bytes) else asyncio.run(reply)  # type: ignore
        assert isinstance(reply, bytes) and not reply.endswith(metadata)
        assert addresses(DNSRecord.parse(reply)) == ["192.0.2.1"]
        assert b"\xa9\xfe\xa9\xfe" not in reply


def test_private_allowed_for_specific_zone_and_loopback_stripped() -> None:
    service, *_ = make_service()
    assert addresses(ask(service, "db.corp.test")) == ["10.0.0.5"]
    ZONE["private.example.com"] = ["A 192.168.1.1"]  # `*.example.com` names a zone
    try:
        assert addresses(ask(service, "private.example.com")) == ["192.168.1.1"]
    finally:
        del ZONE["private.example.com"]
    assert addresses(ask(service, "mixed.corp.test")) == ["10.0.0.6"]


def test_cname_to_allowed_name_passes() -> None:
    service, *_ = make_service()
    assert addresses(ask(service, "ok-alias.example.com")) == ["192.0.2.1"]


def test_upstream_failure_is_servfail_and_audited() -> None:
    failure = UpstreamFailure([Failure(Upstream("127.0.0.1"), Transport.UDP, Reason.TIMEOUT)])
    service, _, audit, guard = make_service(FakeUpstream(failure))
    reply = ask(service, "www.example.com")
    assert reply.header.rcode == RCODE.SERVFAIL and ede_of(reply)[0] == 22
    record = audit.records[-1]
    assert record["effect"] == "allow" and "upstream failed" in str(record["outcome"])
    assert guard.metrics.request_failures.value("dns", "upstream_timeout") == 1
    assert guard.metrics.decisions.value("dns", "dns.query", "allow", "public") == 0


def test_an_unexpected_error_upstream_is_servfail_and_recorded_as_gone_out() -> None:
    """Session 55's attack (High, the backstop): an error the resolver did not expect (an
    OverflowError after 1,024 timeouts in a row) left the query that went upstream without a
    record and its client without an answer. Whatever fails, the name may have gone out: it is
    recorded so, and the client gets SERVFAIL; a lookup for a connect says it failed."""
    unexpected = OverflowError("int too large")
    service, _, audit, _ = make_service(FakeUpstream(unexpected))  # type: ignore[arg-type]
    reply = ask(service, "www.example.com")
    assert reply is not None and reply.header.rcode == RCODE.SERVFAIL
    assert audit.went_out == [True] and "guardd's own error" in str(audit.records[-1]["outcome"])
    found, why, denial = asyncio.run(service.lookup("www.example.com", "10.9.9.9"))
    assert found == [] and "guardd's own error" in why and denial is None


def test_a_query_asked_once_guardd_is_stopping_is_recorded_as_gone_nowhere() -> None:
    """Third review: it was recorded as an upstream failure, as if it had gone out."""
    service, _, audit, guard = make_service(FakeUpstream(ResolverStopped(())))
    reply = ask(service, "www.example.com")
    assert reply.header.rcode == RCODE.SERVFAIL
    assert "guardd is stopping" in str(audit.records[-1]["outcome"])
    assert audit.went_out == [False]
    assert guard.metrics.request_failures.value("dns", "stopping") == 1


def test_a_query_that_never_got_an_upstream_socket_is_recorded_as_gone_nowhere() -> None:
    """Fourth review: every attempt "busy" (guardd's own sockets all in use) sent nothing."""
    busy = UpstreamFailure([Failure(Upstream("127.0.0.1"), Transport.UDP, Reason.BUSY)])
    service, _, audit, _ = make_service(FakeUpstream(busy))
    assert ask(service, "www.example.com").header.rcode == RCODE.SERVFAIL
    assert audit.went_out == [False]


def refusal(name: str, qtype: str | int = "A", qclass: str = "IN", version: int = 0) -> bytes:
    query = DNSRecord.question(name, qtype, qclass) if isinstance(qtype, str) else DNSRecord(
        q=DNSQuestion(name, qtype))  # (a type dnslib has no name for)
    query.add_ar(EDNS0(udp_len=1232, version=version))
    return bytes(query.pack())


@pytest.mark.parametrize(("data", "clients_ok", "rcode", "qtype", "why"), [
    (refusal("www.example.com"), False, RCODE.REFUSED, "A", "not in guardd's client networks"),
    (refusal("example.com", "AXFR"), True, RCODE.REFUSED, "AXFR", "zone transfers"),
    (refusal("example.com", "IXFR"), True, RCODE.REFUSED, "IXFR", "zone transfers"),
    (refusal("version.bind", "TXT", "CH"), True, RCODE.REFUSED, "TXT", "class 3"),
    (refusal("www.example.com", "A", "Hesiod"), True, RCODE.REFUSED, "A", "class 4"),
    (refusal("www.example.com", "A", "*"), True, RCODE.REFUSED, "A", "class 255"),
    (refusal("www.example.com", version=1), True, 16, "A", "EDNS version 1"),
    # (attack pass, 2026-12-06: each went upstream, its type 16 bits of the agent's choosing)
    (refusal("x.example.com", "OPT"), True, RCODE.FORMERR, "OPT", "type OPT is no question"),
    (refusal("x.example.com", "TSIG"), True, RCODE.FORMERR, "TYPE250", "meta-type"),
    (refusal("x.example.com", 0), True, RCODE.FORMERR, "TYPE0", "reserved"),
    (refusal("x.example.com", 254), True, RCODE.NOTIMP, "TYPE254", "obsolete"),
    (refusal("x.example.com", 200), True, RCODE.FORMERR, "TYPE200", "meta-type"),
    (refusal("x.example.com", 65535), True, RCODE.FORMERR, "TYPE65535", "reserved"),
    (refusal("x.example.com", 65300), True, RCODE.NOTIMP, "TYPE65300", "private use"),
], ids=["not-a-client", "axfr", "ixfr", "chaos", "hesiod", "class-any", "badvers", "opt", "tsig",
        "type-0", "maila", "meta-range", "type-65535", "private-use"])
def test_every_refusal_is_audited_each_time(data: bytes, clients_ok: bool, rcode: int,
                                            qtype: str, why: str) -> None:
    service, upstream, audit, guard = make_service(clients_ok=clients_ok)
    for ident in (1, 2):  # the same packet again: recorded again, not memoized away
        reply = DNSRecord.parse(service.answer(bytes([0, ident]) + data[2:], "10.9.9.9",
                                               not clients_ok))  # (over UDP: no answer, below)
        (opt,) = reply.ar
        assert (opt.ttl >> 24) << 4 | reply.header.rcode == rcode
    assert upstream.asked == []
    assert len(audit.records) == 2
    name = str(DNSRecord.parse(data).q.qname).rstrip(".")
    for record in audit.records:
        assert (record["client"], record["target"], record["qtype"], record["effect"]) == (
            "10.9.9.9", name, qtype, "deny")
        assert why in str(record["reason"])
        assert "matchedRule" not in record  # no rule judged it
    assert guard.metrics.decisions.value("dns", "dns.query", "deny", "") == 2


def test_a_udp_query_from_outside_clients_is_recorded_and_never_answered() -> None:
    """A UDP source is not proven: a REFUSED that echoes the question to it sent a name the
    agent chose to an address it chose (a forged IPv6 source where nothing filters them), past
    every rule. The query is recorded and counted, and gets no answer; over TCP, whose
    handshake proves its source, it is refused as before."""
    service, upstream, audit, guard = make_service(clients_ok=False)
    assert ask(service, "secret-data.evil.test") is None
    assert ask(service, "secret-data.evil.test", tcp=True).header.rcode == RCODE.REFUSED
    assert upstream.asked == []
    (dropped, refused) = audit.records
    for record in audit.records:
        assert (record["client"], record["target"], record["effect"]) == (
            "10.9.9.9", "secret-data.evil.test", "deny")
    assert "not in guardd's client networks" in str(dropped["reason"])
    assert "no answer over UDP" in str(dropped["reason"])
    assert "no answer" not in str(refused["reason"])
    assert guard.metrics.dns_queries_dropped.value("not_a_client") == 1
    assert guard.metrics.dns_queries.value("A", "REFUSED") == 1
    assert service.answer(b"\x12\x34\x01", "10.9.9.9", False) is None  # (no query at all)
    assert guard.metrics.dns_queries_dropped.value("not_a_client") == 2, \
        "a datagram from outside that is no query went uncounted"


def test_a_udp_query_from_an_ipv6_address_of_the_host_is_recorded_and_never_answered() -> None:
    """Attack pass (2026-12-06): forged from the host's IPv6 address (IPV6_FREEBIND), a query
    was loopback's and went upstream. Over UDP such a source proves nothing, but on a socket
    bound to loopback; over TCP it is the host's, and answered; an IPv4 address of the host
    the kernel vouches for."""
    from guardd.addr import count_host_as_loopback

    count_host_as_loopback(lambda address: address in ("fd00:41::10", "10.254.0.1",
                                                       "::ffff:0:afe:1"))
    try:
        service, upstream, audit, guard = make_service()
        for forged in ("fd00:41::10", "::ffff:0:afe:1"):  # (the second: SIIT's, not IPv4)
            assert ask(service, "www.example.com", client=forged) is None
            assert upstream.asked == []
            assert "which any agent on a link may send from" in str(audit.records[-1]["reason"])
        assert guard.metrics.dns_queries_dropped.value("not_a_client") == 2
        for client, tcp in (("fd00:41::10", True), ("10.254.0.1", False)):
            assert addresses(ask(service, "www.example.com", client=client, tcp=tcp)) == [
                "192.0.2.1"]
        # On a socket bound to loopback, which only the host reaches (a pod's sidecar: CI,
        # the first version of this fix left the pod's agent unanswered over IPv6).
        local = service.answer(packet("www.example.com", 5), "fd00:41::10", False, True)
        assert isinstance(local, bytes) and addresses(DNSRecord.parse(local)) == ["192.0.2.1"]
    finally:
        count_host_as_loopback(None)


def test_a_udp_query_on_a_loopback_socket_from_an_ipv6_address_not_the_hosts_is_never_answered(
        ) -> None:
    """Attack pass 52: a process on guardd's host bound an IPv6 address of `clients` that is
    none of the host's (IPV6_FREEBIND, no privilege) and asked [::1]: each such source was a
    client of its own, its tunnel budgets fresh, and one of another principal's `clients` got
    that principal's policy (a name the agent's own denies went upstream). Only the host
    reaches a socket bound to loopback, so there a source that is not the host's is forged:
    recorded, never answered, nothing upstream; loopback's and the host's are answered."""
    from guardd.addr import count_host_as_loopback

    count_host_as_loopback(lambda address: address in ("fd00:41::10",))
    try:
        service, upstream, audit, guard = make_service()
        for forged in ("fd00:c1::5", "fe80::1", "2001:db8::7", "::ffff:0:a63:5", "::ffff:1:2:3:4"):
            assert ask(service, "www.example.com", client=forged, local=True) is None
            assert upstream.asked == []
            assert (audit.records[-1]["client"], audit.records[-1]["effect"]) == (forged, "deny")
            assert "bound to loopback" in str(audit.records[-1]["reason"])
        assert guard.metrics.dns_queries_dropped.value("not_a_client") == 5
        for source, local in (("::1", True), ("fd00:41::10", True), ("127.0.0.2", True),
                              ("::ffff:127.0.0.1", True),
                              ("fd00:c1::5", False)):  # (elsewhere: an agent's on a link)
            reply = ask(service, "www.example.com", client=source, local=local)
            assert reply is not None and addresses(reply) == ["192.0.2.1"]
    finally:
        count_host_as_loopback(None)


def test_any_gets_rfc8482_answer() -> None:
    service, upstream, *_ = make_service()
    reply = ask(service, "www.example.com", "ANY")
    assert reply.header.rcode == RCODE.NOERROR and reply.rr[0].rtype == QTYPE.HINFO
    assert upstream.asked == []


@pytest.mark.parametrize("name", ["169.254.169.254", "2852039166", "a.0xa9fea9fe",
                                  "evil.com,x.www.example.com", "a{b}.www.example.com"],
                         ids=["dotted", "decimal", "hex-label", "comma", "braces"])
def test_ip_looking_names_are_not_names(name: str) -> None:
    """Nor is one with a character no host name holds (attack pass, 2026-12-06: a comma, which
    the records use between a connect's names, made `audit learn` propose a name of the
    agent's choosing)."""
    service, upstream, *_ = make_service()
    assert ask(service, name).header.rcode == RCODE.NXDOMAIN
    assert upstream.asked == []


def test_formerr_and_drops() -> None:
    service, _, audit, _ = make_service()
    assert service.answer(b"\x00\x01", "10.9.9.9", False) is None
    query = bytearray(DNSRecord.question("www.example.com").pack())
    query[5] = 2  # qdcount 2
    reply = DNSRecord.parse(service.answer(bytes(query), "10.9.9.9", False))
    assert reply.header.rcode == RCODE.FORMERR
    # (attack pass: a refusal like any other, recorded)
    record = audit.records[-1]
    assert (record["client"], record["effect"], record["action"]) == ("10.9.9.9", "deny",
                                                                       "dns.query")
    assert str(record["reason"]).startswith("malformed query: ")


def test_udp_answer_truncated_for_small_clients() -> None:
    ZONE["many.example.com"] = [f"A 192.0.2.{i}" for i in range(1, 60)]
    try:
        service, *_ = make_service()
        reply = ask(service, "many.example.com", edns=False)
        assert reply.header.tc and not reply.rr
        assert len(addresses(ask(service, "many.example.com", edns=False, tcp=True))) == 59
    finally:
        del ZONE["many.example.com"]


def test_tcp_framer_one_byte_at_a_time() -> None:
    messages = [bytes(DNSRecord.question(f"n{i}.example.com").pack()) for i in range(3)]
    stream = b"".join(wire.tcp_frame(m) for m in messages)
    framer = wire.TcpFramer()
    got: list[bytes] = []
    for index in range(len(stream)):
        framer.feed(stream[index:index + 1])
        while (message := framer.pop()) is not None:
            got.append(message)
    assert got == messages and framer.buffered == 0
    whole = wire.TcpFramer()
    whole.feed(stream)
    assert [whole.pop() for _ in messages] == messages and whole.pop() is None
    zero = wire.TcpFramer()
    zero.feed(b"\x00\x00")
    with pytest.raises(DNSWireError, match="zero-length"):
        zero.pop()


# --- the packet memo ------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def packet(name: str, ident: int, *, edns: bool = True) -> bytes:
    query = DNSRecord.question(name, "A")
    query.header.id = ident
    if edns:
        query.add_ar(EDNS0(udp_len=1232))
    return bytes(query.pack())


def counting_decisions(guard: Guard) -> list[str]:
    """Replace the guard's DNS decision with one that logs each name it is asked."""
    asked: list[str] = []
    decide = guard.judge_query

    def logged(name: str, qtype: str, client: str) -> object:
        asked.append(name)
        return decide(name, qtype, client)

    guard.judge_query = logged  # type: ignore[method-assign]
    return asked


def test_repeated_denied_packet_is_answered_from_the_memo_and_recorded_each_time() -> None:
    """A packet is memoized when it is seen the second time (a name asked once leaves only its
    bytes behind); from the third on it is neither parsed nor decided again."""
    service, upstream, audit, guard = make_service()
    decided = counting_decisions(guard)
    answers = [service.answer(packet("x.ngrok.io", n), f"10.0.0.{n}", False) for n in (1, 2, 3)]
    assert all(isinstance(answer, bytes) for answer in answers)
    assert [answer[:2] for answer in answers] == [b"\x00\x01", b"\x00\x02", b"\x00\x03"]
    assert len({answer[2:] for answer in answers}) == 1
    assert decided == ["x.ngrok.io"] * 2  # the third packet was not parsed or decided again
    assert [(r["client"], r["effect"], r["matchedRule"]) for r in audit.records] == [
        (f"10.0.0.{n}", "deny", "tunnels") for n in (1, 2, 3)]
    assert guard.metrics.decisions.value("dns", "dns.query", "deny", "tunnels") == 3
    assert guard.metrics.dns_queries.value("A", "NXDOMAIN") == 3
    assert upstream.asked == []


def test_memo_keeps_the_client_check() -> None:
    service, _, audit, guard = make_service()
    service._client_allowed = lambda client: client == "10.0.0.1"  # type: ignore[method-assign]
    assert DNSRecord.parse(service.answer(packet("x.ngrok.io", 1), "10.0.0.1", False)
                           ).header.rcode == RCODE.NXDOMAIN
    refused = DNSRecord.parse(service.answer(packet("x.ngrok.io", 2), "192.0.2.5", True))
    assert refused.header.rcode == RCODE.REFUSED
    assert [(r["client"], r["reason"]) for r in audit.records] == [
        ("10.0.0.1", "tunnel"), ("192.0.2.5", "client is not in guardd's client networks")]


def test_policy_change_forgets_memoized_decisions_and_answers() -> None:
    service, upstream, _, guard = make_service()
    assert DNSRecord.parse(service.answer(packet("x.ngrok.io", 1), "10.0.0.1", False)
                           ).header.rcode == RCODE.NXDOMAIN
    ask(service, "www.example.com")
    guard.replace_policy(Policy.from_text(
        'version: "1.0"\nrules:\n  - {id: all, action: "*", domain: "*", effect: allow}\n'))
    service.policy_changed()
    reply = service.answer(packet("x.ngrok.io", 3), "10.0.0.1", False)
    assert DNSRecord.parse(asyncio.run(reply)).header.rcode == RCODE.NXDOMAIN  # upstream's
    ask(service, "www.example.com")
    assert upstream.asked == ["www.example.com", "x.ngrok.io", "www.example.com"]


def test_memoized_cache_hit_ends_when_the_cached_answer_expires() -> None:
    clock = Clock()
    upstream = FakeUpstream()
    audit = ListAudit()
    guard = Guard(Policy.from_text(POLICY), audit, Metrics(process=False))
    service = DNSService(guard, AnswerCache(clock=clock), upstream, guard.metrics,
                         lambda c: True)
    first = asyncio.run(service.answer(packet("www.example.com", 1), "10.0.0.1", False))
    hit = service.answer(packet("www.example.com", 2), "10.0.0.1", False)  # memoized now
    clock.now += 10
    aged = service.answer(packet("www.example.com", 3), "10.0.0.1", False)
    assert isinstance(hit, bytes) and isinstance(aged, bytes)
    assert DNSRecord.parse(hit).rr[0].ttl == DNSRecord.parse(first).rr[0].ttl == 300
    assert DNSRecord.parse(aged).rr[0].ttl == 290
    clock.now += 300
    expired = service.answer(packet("www.example.com", 4), "10.0.0.1", False)
    assert not isinstance(expired, bytes)  # forwarded again
    assert addresses(DNSRecord.parse(asyncio.run(expired))) == ["192.0.2.1"]
    assert upstream.asked == ["www.example.com", "www.example.com"]
    assert [r["effect"] for r in audit.records] == ["allow"] * 4
    assert guard.metrics.registry.get_sample_value("guardd_dns_cache_hits_total") == 2
    assert guard.metrics.registry.get_sample_value("guardd_dns_cache_misses_total") == 2


def test_large_packets_are_answered_but_never_memoized() -> None:
    """Padding (trailing bytes, EDNS options) would make every packet a new memo key; only
    packets of a stub's size are memoized, so the memo's memory stays bounded."""
    service, _, audit, guard = make_service()
    decided = counting_decisions(guard)
    padded = packet("x.ngrok.io", 1) + b"\0" * 600
    for ident in (1, 2):
        reply = service.answer(bytes([0, ident]) + padded[2:], "10.0.0.1", False)
        assert DNSRecord.parse(reply).header.rcode == RCODE.NXDOMAIN
    assert decided == ["x.ngrok.io", "x.ngrok.io"]
    assert len(audit.records) == 2


class ReloadingUpstream(FakeUpstream):
    """Swaps the guard's policy while a query is upstream, as a SIGHUP would."""

    def __init__(self, guard_box: list[Guard], policy: Policy) -> None:
        super().__init__()
        self.guard_box, self.policy = guard_box, policy

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
        self.guard_box[0].replace_policy(self.policy)
        return await super().resolve(query, prefer_tcp=prefer_tcp)


class WithdrawingUpstream(ReloadingUpstream):
    """A first attempt that times out, a SIGHUP meanwhile, then what the resolver does before
    its next attempt: `allowed` asked (`resolver.UpstreamResolver`)."""

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
        self.asked.append(DNSRecord.parse(query).q.qname.idna().rstrip("."))
        self.guard_box[0].replace_policy(self.policy)
        assert allowed is not None
        if not allowed():
            raise Withdrawn([Failure(Upstream("192.0.2.53"), Transport.UDP, Reason.TIMEOUT)])
        return await FakeUpstream.resolve(self, query, prefer_tcp=prefer_tcp)


def ask_while_a_reload_shuts_it(upstream: type[ReloadingUpstream]
                                ) -> tuple[DNSRecord, DNSService, FakeUpstream, ListAudit]:
    """www.example.com asked, and a policy that denies it (rule `shut`) loaded while it is
    upstream: the answer, denied as the new policy denies it."""
    closed = Policy.from_text('version: "1.0"\nrules:\n  - {id: shut, action: "*", '
                              'domain: "*.example.com", effect: deny, reason: closed}\n')
    box: list[Guard] = []
    service, reloading, audit, guard = make_service(upstream(box, closed))
    box.append(guard)
    reply = ask(service, "www.example.com")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert ede_of(reply) == (15, "shut: closed")
    assert audit.records[-1]["matchedRule"] == "shut"
    return reply, service, reloading, audit


def test_a_reload_during_a_forward_judges_the_answer_by_the_new_policy() -> None:
    _, service, _, _ = ask_while_a_reload_shuts_it(ReloadingUpstream)
    assert len(service.cache) == 0


def test_a_reload_that_denies_a_name_being_resolved_stops_it_and_answers_as_denied() -> None:
    """Attack pass 24: a retry went upstream after the reload had denied the name, and the
    query's failure was recorded allowed, by a rule gone, and answered SERVFAIL."""
    _, _, upstream, audit = ask_while_a_reload_shuts_it(WithdrawingUpstream)
    record = audit.records[-1]
    assert (record["effect"], record["matchedRule"]) == ("deny", "shut")
    assert "a policy reloaded meanwhile denies the name" in record["outcome"]
    assert audit.went_out[-1] is True  # (a denial something went out for: never shed, review)
    assert upstream.asked == ["www.example.com"]


class LeavingUpstream(FakeUpstream):
    """A first attempt that times out, and a reload meanwhile that takes the client out of
    `clients`; then what the resolver does before its next attempt."""

    def __init__(self, served: list[bool], service: list[DNSService]) -> None:
        super().__init__()
        self.served, self.service = served, service

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
        self.asked.append(DNSRecord.parse(query).q.qname.idna().rstrip("."))
        self.served[0] = False
        self.service[0].policy_changed()  # (what a reload does: `clients` asked again)
        assert allowed is not None
        if not allowed():
            raise Withdrawn([Failure(Upstream("192.0.2.53"), Transport.UDP, Reason.TIMEOUT)])
        return await FakeUpstream.resolve(self, query, prefer_tcp=prefer_tcp)


def test_a_query_under_way_when_a_reload_takes_its_client_out_of_clients_is_refused() -> None:
    """Attack pass 26: its next attempt went upstream after the reload, and the answer was
    served (NOERROR, recorded allowed), while the client's next query was REFUSED."""
    served, box = [True], []
    upstream = LeavingUpstream(served, box)
    audit = ListAudit()
    guard = Guard(Policy.from_text(POLICY), audit, Metrics(process=False))
    service = DNSService(guard, AnswerCache(), upstream, guard.metrics, lambda c: served[0])
    box.append(service)
    reply = ask(service, "www.example.com")
    assert reply.header.rcode == RCODE.REFUSED and not reply.rr
    assert upstream.asked == ["www.example.com"]
    record = audit.records[-1]
    assert record["effect"] == "deny" and "no client of guardd's" in str(record["reason"])
    assert audit.went_out[-1] is True
    assert guard.metrics.dns_queries.value("A", "REFUSED") == 1  # (once: review)


RATE_LIMITED = """\
version: "1.0"
rules:
  - {id: limited, action: dns.query, domain: "*.example.com", effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
"""


def test_a_rate_limit_on_a_dns_query_rule_is_applied_to_every_query() -> None:
    """Issue 9: five queries under a dns.query rule limited to two a minute were all answered
    NOERROR and audited allow. The third and later are refused (REFUSED, EDE 18: the name is
    not gone), audited as denials that name the limit, cached answers and memo included; each
    client has its own budget."""
    upstream = FakeUpstream()
    audit = ListAudit()
    guard = Guard(Policy.from_text(RATE_LIMITED), audit, Metrics(process=False))
    service = DNSService(guard, AnswerCache(), upstream, guard.metrics, lambda c: True)
    rcodes = [ask(service, "www.example.com").header.rcode for _ in range(5)]
    assert rcodes == [RCODE.NOERROR] * 2 + [RCODE.REFUSED] * 3
    assert [r["effect"] for r in audit.records] == ["allow"] * 2 + ["deny"] * 3
    assert all("rate limit of rule limited exceeded" in str(r["reason"])
               for r in audit.records[2:])
    assert ede_of(ask(service, "www.example.com"))[0] == wire.EDE_PROHIBITED
    assert ask(service, "www.example.com", client="10.9.9.8").header.rcode == RCODE.NOERROR
    assert guard.metrics.ratelimited.labels("limited")._value.get() == 4


NETWORK_ONLY = """\
version: "1.0"
rules:
  - {id: api, action: network.request, domain: "www.example.com", effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
  - {id: both, action: "*", domain: "*.corp.test", effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
"""


def test_dns_queries_do_not_spend_the_connects_of_a_rule() -> None:
    """A network.request rule's limit is not spent by DNS queries; a rule for every action
    counts its queries and its connects apart, each against the whole limit."""
    audit = ListAudit()
    guard = Guard(Policy.from_text(NETWORK_ONLY), audit, Metrics(process=False))
    service = DNSService(guard, AnswerCache(), FakeUpstream(), guard.metrics, lambda c: True)
    for qtype in ("A", "AAAA", "A", "AAAA"):
        ask(service, "www.example.com", qtype)
    assert all(r["effect"] == "allow" for r in audit.records)
    rcodes = [ask(service, "db.corp.test").header.rcode for _ in range(3)]
    assert rcodes == [RCODE.NOERROR, RCODE.NOERROR, RCODE.REFUSED]
    ip = ipaddress.ip_address("10.0.0.5")
    assert guard.rate_limit(guard.judge_connect("db.corp.test", ip, 443, "10.9.9.9"),
                            "10.9.9.9").allowed  # the connects' budget is untouched


ALLOW_ALL = 'version: "1.0"\nrules:\n  - {id: all, action: "*", domain: "*", effect: allow}\n'


def test_a_protected_name_is_nxdomain_blocked_not_refused() -> None:
    guard = Guard(Policy.from_text(ALLOW_ALL), ListAudit(), Metrics(process=False))
    service = DNSService(guard, AnswerCache(), FakeUpstream(), guard.metrics, lambda c: True)
    for name in ("metadata.google.internal", "localhost", "x.localhost", "x.localhost"):
        reply = ask(service, name)
        assert reply.header.rcode == RCODE.NXDOMAIN and ede_of(reply)[0] == wire.EDE_BLOCKED


def test_a_malformed_packet_from_outside_clients_gets_no_answer() -> None:
    """guardd answers no one outside `clients` but with REFUSED to a query it can read (and
    records it); bytes that are no query get nothing, not a FORMERR."""
    service, _, audit, _ = make_service(clients_ok=False)
    assert service.answer(b"\x12\x34\x01\x00\x00\x02" + bytes(6), "192.0.2.9", False) is None
    allowed, *_ = make_service()
    reply = allowed.answer(b"\x12\x34\x01\x00\x00\x02" + bytes(6), "10.9.9.9", False)
    assert isinstance(reply, bytes) and reply[3] & 0xF == RCODE.FORMERR


BUDGETED = POLICY + "dnsTunnel: {maxLookups: 50}\n"


def test_only_lookups_sent_upstream_count_against_the_lookup_budget() -> None:
    """A connect's name answered from the cache sends nothing upstream and is no lookup: two
    hundred connects to one API pass a budget of fifty. Lookups that fail (never cached) go
    upstream at every repeat and are stopped at the budget, by the connect's own lookups too."""
    upstream = FakeUpstream()
    guard = Guard(Policy.from_text(BUDGETED), ListAudit(), Metrics(process=False))
    service = DNSService(guard, AnswerCache(), upstream, guard.metrics, lambda c: True)
    allowed = guard.resolvable("www.example.com")
    for _ in range(200):  # what each connect to it asks: may it look up, then the lookup
        assert guard.tunnel_suspected(allowed, "www.example.com", "A", "10.9.9.9") is None
        assert asyncio.run(service.lookup("www.example.com", "10.9.9.9"))[0]
    assert upstream.asked == ["www.example.com"] * 2  # AAAA and A, once
    upstream.fail = UpstreamFailure([Failure(Upstream("127.0.0.1"), Transport.UDP,
                                             Reason.TIMEOUT)])
    whys = [asyncio.run(service.lookup("down.example.com", "10.9.9.9"))[1] for _ in range(60)]
    assert len(upstream.asked) == 50  # (the two of www.example.com count too)
    assert "DNS tunnel suspected: lookups: over 50 lookups under example.com" in whys[-1]
    assert guard.tunnel_suspected(allowed, "www.example.com", "A", "10.9.9.9") is not None


def test_a_reload_asks_again_which_clients_are_served() -> None:
    """`clients` may change at a reload: the memo of who is served is forgotten with it."""
    served = {"10.9.9.9"}
    guard = Guard(Policy.from_text(POLICY), ListAudit(), Metrics(process=False))
    service = DNSService(guard, AnswerCache(), FakeUpstream(), guard.metrics,
                         lambda client: client in served)
    assert ask(service, "www.example.com").header.rcode == RCODE.NOERROR
    served.clear()
    service.policy_changed()
    assert ask(service, "www.example.com", tcp=True).header.rcode == RCODE.REFUSED
    assert not service.serves("10.9.9.9")


def test_a_clients_queries_stop_at_the_lookup_budget_and_refusals_are_not_lookups() -> None:
    """The client's own queries that go upstream (never cached: the upstream fails) stop at
    `maxLookups`; a query refused for too many in flight never went upstream and is none."""
    upstream = FakeUpstream(fail=UpstreamFailure([Failure(Upstream("127.0.0.1"), Transport.UDP,
                                                          Reason.TIMEOUT)]))
    guard = Guard(Policy.from_text(BUDGETED), ListAudit(), Metrics(process=False))
    service = DNSService(guard, AnswerCache(), upstream, guard.metrics, lambda c: True)
    service.max_forwards = 0  # every forward refused: SERVFAIL, nothing sent
    assert {ask(service, f"n{n}.example.com").header.rcode for n in range(60)} == {
        RCODE.SERVFAIL}
    service.max_forwards = 100
    replies = [ask(service, f"m{n}.example.com") for n in range(60)]
    assert len(upstream.asked) == 50
    assert replies[-1].header.rcode == RCODE.NXDOMAIN
    assert "DNS tunnel suspected: lookups: over 50" in ede_of(replies[-1])[1]


def test_only_answers_nothing_left_for_may_be_shed() -> None:
    """Review: past the audit's denial share, answers from guardd's cache filled the rest of
    the trail; nothing leaves the host for them (or for ANY, answered here), so they may be
    shed as denials are, and an answer that went upstream may not, a withheld one neither
    (attack pass: the name went out; a denial shed would leave no trace of it)."""
    service, upstream, audit, _ = make_service()
    ask(service, "www.example.com")  # upstream
    ask(service, "www.example.com")  # the cache
    ask(service, "www.example.com", "ANY")
    ask(service, "meta.example.com")  # upstream, its answer withheld
    assert len(upstream.asked) == 2 and audit.records[-1]["effect"] == "deny"
    assert audit.went_out == [True, False, False, True]


def test_no_query_goes_upstream_for_a_client_without_room_in_the_trail() -> None:
    """Review: near the audit cap an answer from upstream must still be recorded, and one
    client's filled the rest; a client past its share is refused before its query goes."""
    service, upstream, audit, _ = make_service()
    audit.room = False
    reply = ask(service, "www.example.com")
    assert reply.header.rcode == RCODE.REFUSED and upstream.asked == []
    assert "share of the room left" in str(audit.records[-1]["reason"])
    audit.room = True
    assert ask(service, "www.example.com").header.rcode == RCODE.NOERROR


def test_rare_query_types_take_no_memory_of_their_own() -> None:
    """Attack pass: the counters' memos were keyed by the raw type, before rare ones were
    counted as "other": one query of each of the 65,536 types grew guardd by 24 MB for good."""
    service, _, _, guard = make_service()
    for qtype in range(300, 1300):
        query = DNSRecord.question("x.ngrok.io", "A")
        query.q.qtype = qtype
        assert service.answer(bytes(query.pack()), "10.9.9.9", False) is not None
    assert guard.metrics.dns_queries.value("other", "NXDOMAIN") == 1000
    assert len(service._counters) < 300
    assert len(guard.metrics._query_counters) < 300


class StalledUpstream(FakeUpstream):
    """Takes the query (it has gone out) and never answers."""

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
        self.asked.append(str(DNSRecord.parse(query).q.qname).rstrip(".").lower())
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def test_a_forward_cut_short_is_recorded_as_gone_out() -> None:
    """Attack pass 20: a TCP client that reset before the upstream answered cancelled the
    forward, and the name that went out left no record (20 unique names under an allowed
    wildcard, none in the trail). The cut (a client gone, a shutdown) is recorded and
    counted, and the forward's place in flight given back."""
    service, upstream, audit, guard = make_service(StalledUpstream())

    async def cut() -> None:
        query = DNSRecord.question("x1.example.com", "A")
        forward = asyncio.ensure_future(service.answer(bytes(query.pack()), "10.9.9.9", True))
        await asyncio.sleep(0)
        assert upstream.asked == ["x1.example.com"] and service.forwards == 1
        forward.cancel()
        with pytest.raises(asyncio.CancelledError):
            await forward

    asyncio.run(cut())
    assert service.forwards == 0
    [record] = audit.records
    assert record["target"] == "x1.example.com" and record["matchedRule"] == "public"
    assert "before the upstream answered" in str(record["outcome"])
    assert audit.went_out == [True]
    assert guard.metrics.request_failures.value("dns", "abandoned") == 1


def test_a_memoized_answer_does_not_go_around_a_tunnel_suspicion() -> None:
    """Attack pass 30: a packet asked three times was memoized with its cached answer, and
    answered from the memo, allowed and recorded so, after the client came under a tunnel
    suspicion for its domain (other spellings of the name got NXDOMAIN): the memo never asked
    the detector. Under a suspicion every lookup there is refused, the memo's too."""
    guard = Guard(Policy.from_text(POLICY + "dnsTunnel: {maxUniqueNames: 5}\n"), ListAudit(),
                  Metrics(process=False))
    service = DNSService(guard, AnswerCache(), FakeUpstream(), guard.metrics, lambda c: True)
    audit = guard.audit
    for ident in (1, 2, 3):  # (the third from the memo)
        reply = service.answer(packet("www.example.com", ident), "10.0.0.1", False)
        reply = reply if isinstance(reply, bytes) else asyncio.run(reply)  # type: ignore
        assert DNSRecord.parse(reply).header.rcode == RCODE.NOERROR
    for n in range(6):  # (different names under example.com: the budget is 5)
        ask(service, f"n{n}.example.com", client="10.0.0.1")
    memoized = service.answer(packet("www.example.com", 4), "10.0.0.1", False)
    assert isinstance(memoized, bytes) and DNSRecord.parse(memoized).header.rcode == RCODE.NXDOMAIN
    assert "DNS tunnel suspected" in ede_of(DNSRecord.parse(memoized))[1]
    last = audit.records[-1]  # type: ignore[attr-defined]
    assert last["effect"] == "deny" and "DNS tunnel suspected" in str(last["reason"])
    assert last["ownCheck"] is True  # (the budget is guardd's own check: replay cannot repeat it)
    other = service.answer(packet("www.example.com", 5), "10.0.0.2", False)  # (not suspected)
    assert isinstance(other, bytes) and DNSRecord.parse(other).header.rcode == RCODE.NOERROR


def test_no_query_goes_upstream_while_the_audit_trail_cannot_be_written() -> None:
    """Attack pass 31: the agent filled the trail's disk with its own denials, then asked 50
    allowed names made of data: every one went upstream, none answered, and their records
    were lost at the close (`verify` saw nothing amiss): an exfiltration channel while the
    trail is down. Nothing goes upstream then; what is cached still answers (nothing leaves)."""
    service, upstream, audit, _ = make_service()
    ask(service, "www.example.com")  # (cached now)
    audit.down = True  # type: ignore[attr-defined]
    reply = ask(service, "exfil-secret-1.example.com")
    assert reply.header.rcode == RCODE.REFUSED and upstream.asked == ["www.example.com"]
    assert "the audit trail cannot be written" in str(audit.records[-1]["reason"])
    assert ask(service, "www.example.com").header.rcode == RCODE.NOERROR


def test_no_later_attempt_goes_upstream_once_the_trail_went_down() -> None:
    """Review: the trail was asked once, before the forward; a query whose first upstream timed
    out went on to the next after the trail went down (the name out during the outage)."""

    class DownAfterTheFirstAttempt(FakeUpstream):
        async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                          allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
            audit.down = True  # type: ignore[attr-defined]  # (meanwhile, the trail went down)
            if allowed is not None and not allowed():
                raise Withdrawn([Failure(Upstream("127.0.0.1"), Transport.UDP, Reason.TIMEOUT)])
            return await super().resolve(query, prefer_tcp=prefer_tcp, allowed=allowed)

    upstream = DownAfterTheFirstAttempt()
    service, _, audit, _ = make_service(upstream)
    assert ask(service, "secret-data.example.com").header.rcode == RCODE.SERVFAIL
    assert upstream.asked == []


def test_a_cached_answer_teaches_another_client_the_addresses_of_its_own_type() -> None:
    """Review: the resolved names' name side was keyed by the name alone, so a client's AAAA
    answer replaced its A answer there, and a second client's cached A answer taught it the
    IPv6 addresses, not the IPv4 one (its connects by that address then judged without the
    name: refused where the name is allowed)."""
    service, _, _, guard = make_service()
    ask(service, "www.example.com", "A", client="10.0.0.1")
    ask(service, "www.example.com", "AAAA", client="10.0.0.1")  # (as getaddrinfo asks both)
    ask(service, "www.example.com", "A", client="10.0.0.2")  # (from the cache)
    assert guard.resolved.lookup("10.0.0.2", ipaddress.ip_address("192.0.2.1")) == (
        "www.example.com",)
    assert guard.resolved.lookup("10.0.0.2", ipaddress.ip_address("2001:db8::1")) == ()



def test_a_cached_answer_teaches_a_client_its_addresses_though_the_name_side_lost_them(
        ) -> None:
    """Attack pass 33: another client's lookups pushed a name out of the resolved names' name
    side, and a client answered from the cache (the packet memo too) then learned nothing: its
    connects by address were judged without the name, and refused. The cached answer itself
    says."""
    service, _, _, guard = make_service()
    ask(service, "www.example.com", client="10.0.0.1")
    for n in range(800):  # (its own later names push it out of its share of the name side)
        guard.resolved.remember("10.0.0.1", f"n{n}.flood.test",
                                [ipaddress.ip_address(f"2001:db8:{n:x}::{i:x}") for i in range(32)],
                                ttl=3600)
    for ident in (1, 2, 3):  # (the third from the packet memo)
        reply = service.answer(packet("www.example.com", ident), f"10.0.0.{ident + 1}", False)
        assert isinstance(reply, bytes)
        assert guard.resolved.lookup(f"10.0.0.{ident + 1}",
                                     ipaddress.ip_address("192.0.2.1")) == ("www.example.com",)


def test_a_cache_hit_parses_no_answer_to_teach_a_client_its_addresses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the answer was read again at every cache hit whose name the resolved names did
    not hold, which is every answer without an address (NXDOMAIN, NODATA, TXT, a CNAME to
    nothing): 2.5 times the cost of a hit, 150 times for an answer of hundreds of records. The
    cache reads them once, as it stores the answer."""
    monkeypatch.setitem(ZONE, "nothing.example.com", ["CNAME nowhere.example.com"])
    service, _, _, guard = make_service()
    ask(service, "nothing.example.com")  # (an answer without an address, cached)
    ask(service, "www.example.com")
    parsed: list[bytes] = []
    parse = wire.parse_response
    monkeypatch.setattr(wire, "parse_response", lambda data: parsed.append(data) or parse(data))
    for n in range(5):
        for name in ("nothing.example.com", "www.example.com"):
            reply = service.answer(packet(name, n), f"10.0.1.{n}", False)
            assert isinstance(reply, bytes)
    assert parsed == []
    assert guard.resolved.lookup("10.0.1.4", ipaddress.ip_address("192.0.2.1")) == (
        "www.example.com",)


def test_a_cached_answer_teaches_a_client_the_addresses_it_holds() -> None:
    """Review: the resolved names' name side was keyed by name and type, the cache by what was
    asked (EDNS or not too): with a server that answers each query otherwise (a CDN), a client
    served one cached answer was taught the addresses of the other."""

    class Rotating(FakeUpstream):
        async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                          allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
            reply = DNSRecord.parse(await super().resolve(query, prefer_tcp=prefer_tcp))
            reply.rr = [RR.fromZone(f"www.example.com. 300 IN A 192.0.2.{len(self.asked)}")[0]]
            return bytes(reply.pack())

    service, _, _, guard = make_service(Rotating())
    ask(service, "www.example.com", client="10.0.0.1")  # (EDNS: 192.0.2.1)
    ask(service, "www.example.com", client="10.0.0.2", edns=False)  # (another: 192.0.2.2)
    ask(service, "www.example.com", client="10.0.0.3")  # (EDNS, cached: 192.0.2.1)
    assert guard.resolved.lookup("10.0.0.3", ipaddress.ip_address("192.0.2.1")) == (
        "www.example.com",)


def vouching_guard() -> Guard:
    """A guard whose rules also vouch for `*.other.org`, where aliases in ZONE lead."""
    return Guard(Policy.from_text(POLICY.replace(
        '  - {id: public,', '  - {id: other, action: network.request, domain: "*.other.org", '
        'effect: allow}\n  - {id: public,')), ListAudit(), Metrics(process=False))


def test_one_principals_answer_teaches_another_principals_client_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: each principal has its own cache, vetted under its own policy, but the resolved
    names are one table: a cache hit under one principal taught its client the addresses
    another principal's vetting kept for the same question, one its own had stripped (a
    private address behind an alias only the other's rules vouch for), and a connect by that
    address was then allowed as the name."""
    monkeypatch.setitem(ZONE, "db2.corp.test", ["CNAME pub.other.org",
                                                "pub.other.org A 10.0.0.5",
                                                "pub.other.org A 192.0.2.7"])
    first = vouching_guard()
    second = first.sibling(Policy.from_text(POLICY), "second")
    upstream = FakeUpstream()
    one = DNSService(first, AnswerCache(), upstream, first.metrics, lambda c: True)
    two = DNSService(second, AnswerCache(), upstream, first.metrics, lambda c: True)
    private = ipaddress.ip_address("10.0.0.5")
    assert addresses(ask(two, "db2.corp.test", client="10.0.2.1")) == ["192.0.2.7"]
    assert "10.0.0.5" in addresses(ask(one, "db2.corp.test", client="10.0.1.1"))
    ask(two, "db2.corp.test", client="10.0.2.3")  # (the second's cache)
    assert second.resolved.lookup("10.0.2.3", private) == ()
    assert second.resolved.lookup("10.0.2.3", ipaddress.ip_address("192.0.2.7")) == (
        "db2.corp.test",)


@pytest.mark.parametrize("zone, tightened", [
    (["CNAME pub4.other.org", "pub4.other.org A 10.0.0.9"], "the-alias-target"),
    (["CNAME edge.bad.org", "edge.bad.org A 192.0.2.9"], "the-alias"),
], ids=["private-address-vouched-by-the-alias-target", "public-address-behind-a-denied-alias"])
def test_a_reload_forgets_what_the_old_policys_vetting_taught(
        monkeypatch: pytest.MonkeyPatch, zone: list[str], tightened: str) -> None:
    """The last attack of stop 39, and its review: the names a client resolved outlived a
    reload, so its connects by address were still judged as the name where the new policy's
    vetting would refuse the answer, for the old answer's TTL: a private address that only
    the old rules vouched for (its alias target's zone), or any address behind an alias the
    new policy denies (a connect's judgement of the name never sees the alias). A reload
    starts the resolved names afresh, as it does the cache: the client's connect by that
    address is judged by address alone until it resolves the name again, under the new
    policy."""
    monkeypatch.setitem(ZONE, "db4.corp.test", zone)
    guard = vouching_guard()
    service = DNSService(guard, AnswerCache(), FakeUpstream(), guard.metrics, lambda c: True)
    found = addresses(ask(service, "db4.corp.test", client="10.0.1.1"))
    assert len(found) == 1
    ip = ipaddress.ip_address(found[0])
    assert guard.judge_connect(None, ip, 5432, "10.0.1.1").matched_rule == "corp"
    guard.replace_policy(Policy.from_text(POLICY if tightened == "the-alias-target" else
                                          POLICY.replace("rules:\n", 'rules:\n  - {id: bad, '
                                                         'action: "*", domain: "*.bad.org", '
                                                         'effect: deny}\n')))
    service.policy_changed()
    assert guard.resolved.lookup("10.0.1.1", ip) == ()
    assert guard.judge_connect(None, ip, 5432, "10.0.1.1").matched_rule != "corp"
    assert addresses(ask(service, "db4.corp.test", client="10.0.1.1")) == []  # (vetted anew)
    assert guard.resolved.lookup("10.0.1.1", ip) == ()


def test_a_reload_leaves_no_old_answer_to_teach_a_client(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    """Review: a reload cleared the cache, not the resolved names: when the fresh answer, under
    the new policy, had no address (the alias's target emptied), the old policy's addresses
    for the same question were still taught at the next cache hit, and a connect by one (a
    private address the new policy no longer vouches for) was allowed as the name."""
    monkeypatch.setitem(ZONE, "db3.corp.test", ["CNAME pub3.other.org",
                                                "pub3.other.org A 10.0.0.9"])
    guard = vouching_guard()
    service = DNSService(guard, AnswerCache(), FakeUpstream(), guard.metrics, lambda c: True)
    assert addresses(ask(service, "db3.corp.test", client="10.0.1.1")) == ["10.0.0.9"]
    guard.replace_policy(Policy.from_text(POLICY))
    service.policy_changed()
    monkeypatch.setitem(ZONE, "db3.corp.test", ["CNAME pub3.other.org"])
    ask(service, "db3.corp.test", client="10.0.1.2")  # (fresh: no address, cached)
    assert addresses(ask(service, "db3.corp.test", client="10.0.1.3")) == []  # (the cache's)
    assert guard.resolved.lookup("10.0.1.3", ipaddress.ip_address("10.0.0.9")) == ()


class HeldUpstream(FakeUpstream):
    """Answers from ZONE once `release` is set; counts the queries given up on meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.given_up = 0

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes:
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.given_up += 1
            raise
        return await super().resolve(query, prefer_tcp=prefer_tcp, allowed=allowed)


def test_a_burst_of_connects_to_one_name_asks_it_upstream_once() -> None:
    """Session 56's last attack (Info): 150 connections at once to a name not cached made 300
    lookups against the client's 256 in flight, and 22 connects were refused "too many
    queries in flight". Lookups of one name for one client under way at once are one lookup,
    as a resolver joins queries it has in flight (unbound's mesh)."""
    service, upstream, _, guard = make_service(HeldUpstream())
    connects = 2 * CLIENT_MAX_FORWARDS

    async def burst() -> list[tuple[list[object], str, object]]:
        asked = [asyncio.ensure_future(service.lookup("www.example.com", "10.9.9.9"))
                 for _ in range(connects)]
        await asyncio.sleep(0.01)
        upstream.release.set()
        return await asyncio.gather(*asked)

    results = asyncio.run(burst())
    assert all(found for found, _, _ in results), {why for _, why, _ in results}
    assert sorted(upstream.asked) == ["www.example.com"] * 2  # (AAAA and A)
    assert service.forwards == 0
    assert guard.resolved.lookup("10.9.9.9", ipaddress.ip_address("192.0.2.1")) == (
        "www.example.com",)


def test_a_connect_that_gives_up_ends_no_other_connects_lookup() -> None:
    """Review of session 57: a connect that gives up (its deadline, its client gone) while
    others joined its lookup must not end theirs."""
    service, upstream, _, _ = make_service(HeldUpstream())

    async def run() -> tuple[list[object], str, object]:
        first = asyncio.ensure_future(service.lookup("www.example.com", "10.9.9.9"))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(service.lookup("www.example.com", "10.9.9.9"))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        upstream.release.set()
        return await asyncio.wait_for(second, 2)

    found, why, _ = asyncio.run(run())
    assert found, why
    assert sorted(upstream.asked) == ["www.example.com"] * 2
    assert service.forwards == 0


def test_a_lookup_every_connect_gave_up_on_is_given_up() -> None:
    """Session 57's attack (Low): a connect cut while its lookup was under way (a reload that
    moved its client to a principal that denies the name) no longer ended the lookup, shared
    since connects join it, and its attempts went on asking the name upstream. A lookup ends
    once no connect waits for it."""
    service, upstream, _, _ = make_service(HeldUpstream())

    async def run() -> None:
        connects = [asyncio.ensure_future(service.lookup("www.example.com", "10.9.9.9"))
                    for _ in range(2)]
        await asyncio.sleep(0.01)
        connects[0].cancel()
        await asyncio.sleep(0.01)
        assert upstream.given_up == 0  # (another still waits)
        connects[1].cancel()
        later = asyncio.ensure_future(service.lookup("www.example.com", "10.9.9.9"))
        await asyncio.sleep(0.01)
        assert upstream.given_up == 2  # (AAAA and A)
        assert upstream.asked == [] and service.forwards == 2  # (the later connect's own)
        upstream.release.set()
        assert (await later)[0]  # (not the lookup given up)

    asyncio.run(run())


def test_what_goes_upstream_goes_for_its_client() -> None:
    """Session 57's attack (Low): the upstream sockets, while none is free, go to the
    clients that wait in turn (`resolver.FairSlots`), so each query says whose it is: the
    client's own, and a lookup for its connect (loopback addresses count as one client)."""
    service, upstream, _, _ = make_service()
    ask(service, "www.example.com", client="10.9.9.9")
    asyncio.run(service.lookup("db.corp.test", "127.0.0.7"))
    assert upstream.asked_for == ["10.9.9.9", "127.0.0.1", "127.0.0.1"]
