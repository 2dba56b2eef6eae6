"""What guardd sends upstream (issue 8, hole 8): a query it built from the question, never the
client's bytes; and what the client gets back: its own id, flags and question."""

from __future__ import annotations

import asyncio
import struct

import pytest
from dnslib import EDNS0, QTYPE, RR, DNSRecord, EDNSOption

from guardd.dns import wire
from tests.unit.test_dns_service import FakeUpstream, make_service

CLIENT = "10.9.9.9"
RD, CD, AA, TC, Z, AD = 0x0100, 0x0010, 0x0400, 0x0200, 0x0040, 0x0020
SECRET = b"SECRET-PAYLOAD"


class RecordingUpstream(FakeUpstream):
    """FakeUpstream that also keeps the bytes of every query it got."""

    def __init__(self) -> None:
        super().__init__()
        self.packets: list[bytes] = []

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: object = None, client: str = "") -> bytes:
        self.packets.append(query)
        return await super().resolve(query, prefer_tcp=prefer_tcp)


def wire_name(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


def opt(udp_size: int = 1232, do: bool = False, options: bytes = b"", version: int = 0) -> bytes:
    return b"\0" + struct.pack("!HHIH", QTYPE.OPT, udp_size, version << 16 | (0x8000 if do else 0),
                               len(options)) + options


def option(code: int, data: bytes) -> bytes:
    return struct.pack("!HH", code, len(data)) + data


def record(name: str, rtype: int, rdata: bytes) -> bytes:
    return wire_name(name) + struct.pack("!HHIH", rtype, 1, 300, len(rdata)) + rdata


TXT_SECRET = bytes([len(SECRET)]) + SECRET


def query(name: str = "www.example.com", *, ident: int = 0xBEEF, flags: int = RD,
          answers: bytes = b"", an: int = 0, authority: bytes = b"", ns: int = 0,
          additional: bytes = b"", ar: int = 0, edns: bytes | None = None,
          trailing: bytes = b"") -> bytes:
    """A hand-made client query; `edns` is an OPT record put last in the additional section."""
    if edns is not None:
        additional, ar = additional + edns, ar + 1
    return (struct.pack("!6H", ident, flags, 1, an, ns, ar) + wire_name(name)
            + struct.pack("!HH", QTYPE.A, 1) + answers + authority + additional + trailing)


def expected_upstream_query(name: str, *, edns: bool, do: bool) -> bytes:
    """What guardd may send for `name` A, id aside: RD, the question, and a bare OPT iff EDNS."""
    return (struct.pack("!5H", RD, 1, 0, 0, 1 if edns else 0) + wire_name(name)
            + struct.pack("!HH", QTYPE.A, 1) + (opt(do=do) if edns else b""))


def answer(service: object, data: bytes, tcp: bool = False, client: str = CLIENT) -> bytes:
    result = service.answer(data, client, tcp)  # type: ignore[attr-defined]
    return result if isinstance(result, bytes) else asyncio.run(result)


SMUGGLERS = {
    "answer-record": dict(answers=record("www.example.com", QTYPE.TXT, TXT_SECRET), an=1),
    "authority-record": dict(authority=record("example.com", QTYPE.TXT, TXT_SECRET), ns=1),
    "additional-record": dict(additional=record("x.example.com", QTYPE.TXT, TXT_SECRET), ar=1),
    "edns-options": dict(edns=opt(options=option(65001, SECRET) + option(10, SECRET[:8])
                                  + option(8, b"\x00\x01\x18\x00\xc0\x00\x02")
                                  + option(12, bytes(64)))),
    "edns-udp-size": dict(edns=opt(udp_size=0xFFFF)),
    "edns-flags": dict(edns=opt()[:7] + b"\xff\xff" + opt()[9:]),  # DO and every Z bit
    "trailing-bytes": dict(trailing=SECRET * 100),
    "header-flags": dict(flags=RD | AA | TC | Z | AD),
    "no-recursion-desired": dict(flags=0),
    "large-tcp-query": dict(edns=opt(options=option(65001, SECRET * 4000))),
}


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("smuggler", SMUGGLERS)
def test_upstream_gets_a_query_built_from_the_question_only(smuggler: str, tcp: bool) -> None:
    upstream = RecordingUpstream()
    service, *_ = make_service(upstream)
    fields = SMUGGLERS[smuggler]
    data = query(**fields)  # type: ignore[arg-type]
    reply = DNSRecord.parse(answer(service, data, tcp))
    assert [str(rr.rdata) for rr in reply.rr] == ["192.0.2.1"]
    (sent,) = upstream.packets
    edns = "edns" in fields
    do = smuggler == "edns-flags"
    assert sent[2:] == expected_upstream_query("www.example.com", edns=edns, do=do)
    assert SECRET not in sent


def test_the_answer_keeps_the_clients_id_flags_and_question_as_sent() -> None:
    upstream = RecordingUpstream()
    service, *_ = make_service(upstream)
    data = query("WwW.ExAmPlE.CoM", ident=0x0A0B, flags=RD | CD, edns=opt())
    reply = answer(service, data)
    question = data[12:12 + len(wire_name("www.example.com")) + 4]
    assert reply[:2] == b"\x0a\x0b"
    assert reply[12:12 + len(question)] == question  # the client's 0x20 case, echoed
    flags = reply[2] << 8 | reply[3]
    assert flags & (RD | CD) == RD | CD and flags & 0x8000
    assert wire.parse_query(upstream.packets[0]).name == "www.example.com"
    assert upstream.packets[0][12:12 + len(question)] == question.lower()


def test_a_cached_answer_is_readdressed_to_each_client() -> None:
    upstream = RecordingUpstream()
    service, *_ = make_service(upstream)
    answer(service, query("www.example.com", ident=1, edns=opt()))
    for case, flags in (("WWW.EXAMPLE.COM", 0), ("www.Example.com", RD | CD)):
        for ident in (2, 3):  # the second one comes from the packet memo
            data = query(case, ident=ident, flags=flags, edns=opt())
            reply = answer(service, data, client="10.9.9.8")
            assert reply[:2] == data[:2]
            assert reply[12:12 + 21] == data[12:12 + 21]
            assert (reply[2] << 8 | reply[3]) & (RD | CD) == flags
            assert [str(rr.rdata) for rr in DNSRecord.parse(reply).rr] == ["192.0.2.1"]
    assert len(upstream.packets) == 1


def test_options_cannot_split_or_poison_the_cache() -> None:
    """Queries that differ only in what guardd does not forward share one upstream query."""
    upstream = RecordingUpstream()
    service, *_ = make_service(upstream)
    answer(service, query(edns=opt(options=option(65001, SECRET))))
    answer(service, query(edns=opt(options=option(8, b"\x00\x01\x18\x00\xc0\x00\x02"))))
    answer(service, query(edns=opt(udp_size=512), trailing=b"x"))
    assert [p[2:] for p in upstream.packets] == [
        expected_upstream_query("www.example.com", edns=True, do=False)]
    answer(service, query(edns=opt(do=True)))  # DO changes the answer: a query of its own
    answer(service, query())  # so does EDNS itself (no OPT may go back to this client)
    assert [p[2:] for p in upstream.packets[1:]] == [
        expected_upstream_query("www.example.com", edns=True, do=True),
        expected_upstream_query("www.example.com", edns=False, do=False)]


def test_dnslib_agrees_the_forwarded_query_is_minimal() -> None:
    upstream = RecordingUpstream()
    service, *_ = make_service(upstream)
    client = DNSRecord.question("www.example.com", "A")
    client.add_answer(*RR.fromZone('www.example.com. 60 TXT "leak"'))
    client.add_ar(EDNS0(udp_len=4096, flags="do", opts=[EDNSOption(65001, SECRET)]))
    answer(service, bytes(client.pack()))
    sent = DNSRecord.parse(upstream.packets[0])
    assert (len(sent.rr), len(sent.auth), len(sent.ar)) == (0, 0, 1)
    assert sent.ar[0].rdata == [] and sent.ar[0].edns_do and sent.ar[0].edns_len == 1232
