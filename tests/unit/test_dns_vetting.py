"""Vetting of upstream answers (issue 8, hole 7): every section, every address a record carries,
only records linked to the question, and TTLs capped on the first answer as on cached copies.

The upstream is scripted: it answers whatever records a test gives it, as a hostile or broken
upstream would, and the service's answer is read back with dnslib.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from dnslib import EDNS0, QTYPE, RCODE, RD, RR, DNSQuestion, DNSRecord

from guardd.dns import wire
from guardd.dns.cache import AnswerCache
from guardd.dns.server import DNSService
from guardd.guard import Guard, ResolvedNames
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from tests.unit.fakes import ListAudit
from tests.unit.test_dns_service import POLICY, Clock, ede_of

CLIENT = "10.9.9.9"


#: Types dnslib's zone parser does not know, written as a type whose rdata has the same format.
_STAND_INS = {"SVCB": ("HTTPS", QTYPE.SVCB), "DNAME": ("CNAME", QTYPE.DNAME)}


def records(text: str) -> list[RR]:
    """Zone-file lines as records, SVCB and DNAME included."""
    found = []
    for line in filter(None, text.splitlines()):
        fields = line.split()
        stand_in = next((s for s in _STAND_INS if s in fields[:4]), None)
        if stand_in is None:
            found += RR.fromZone(line)
            continue
        written, rtype = _STAND_INS[stand_in]
        fields[fields.index(stand_in)] = written
        (record,) = RR.fromZone(" ".join(fields))
        record.rtype = rtype
        found.append(record)
    return found


class ScriptedUpstream:
    """Answers every query with the records scripted for its name, section by section."""

    def __init__(self, answer: str = "", authority: str = "", additional: str = "",
                 rcode: int = RCODE.NOERROR) -> None:
        self.sections = (answer, authority, additional)
        self.rcode = rcode

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: object = None, client: str = "") -> bytes:
        reply = DNSRecord.parse(query).reply()
        reply.header.rcode = self.rcode
        for add, text in zip((reply.add_answer, reply.add_auth, reply.add_ar), self.sections):
            for record in records(text):
                add(record)
        return bytes(reply.pack())


def service_for(upstream: ScriptedUpstream, *, max_ttl: int = 86400, negative_max_ttl: int = 3600,
                clock: Clock | None = None, policy: str = POLICY
                ) -> tuple[DNSService, ListAudit, Guard]:
    audit = ListAudit()
    guard = Guard(Policy.from_text(policy), audit, Metrics(process=False),
                  names=ResolvedNames(clock=clock) if clock is not None else None)
    cache = AnswerCache(max_ttl=max_ttl, negative_max_ttl=negative_max_ttl,
                        **({"clock": clock} if clock is not None else {}))
    return DNSService(guard, cache, upstream, guard.metrics, lambda c: True), audit, guard


def ask(service: DNSService, name: str = "www.example.com", qtype: str = "A") -> DNSRecord:
    query = DNSRecord.question(name, qtype)
    query.add_ar(EDNS0(udp_len=1232))
    result = service.answer(bytes(query.pack()), CLIENT, True)
    if not isinstance(result, bytes):
        result = asyncio.run(result)
    return DNSRecord.parse(result)


def rdata(reply: DNSRecord, *sections: str) -> list[str]:
    """(owner TYPE rdata) of every record in `sections` (OPT aside)."""
    return [f"{str(rr.rname).rstrip('.')} {QTYPE[rr.rtype]} {rr.rdata}"
            for section in sections for rr in getattr(reply, section) if rr.rtype != QTYPE.OPT]


def remembered(guard: Guard, ip: str) -> bool:
    return bool(guard.resolved.lookup(CLIENT, ipaddress.ip_address(ip)))


def assert_filtered(reply: DNSRecord, audit: ListAudit, *fragments: str) -> None:
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert not reply.rr and not reply.auth
    code, text = ede_of(reply)
    assert code == 17
    record = audit.records[-1]
    assert record["effect"] == "deny"
    for fragment in fragments:
        assert fragment in text and fragment in str(record["reason"])


# --- SVCB and HTTPS address hints ---------------------------------------------------------------


@pytest.mark.parametrize(("qtype", "record", "address"), [
    ("HTTPS", "HTTPS 1 . alpn=h2 ipv4hint=169.254.169.254", "169.254.169.254"),
    ("HTTPS", "HTTPS 1 . ipv4hint=192.0.2.1,127.0.0.1", "127.0.0.1"),
    ("HTTPS", "HTTPS 1 . ipv6hint=2001:db8::1,::ffff:a9fe:a9fe", "::ffff:a9fe:a9fe"),
    ("HTTPS", "HTTPS 1 . ipv6hint=fe80::1", "fe80::1"),
    ("SVCB", "SVCB 1 svc.example.com. port=8443 ipv4hint=10.1.2.3", "10.1.2.3"),
], ids=["metadata-v4", "loopback-beside-public", "mapped-metadata-v6", "link-local-v6",
        "svcb-private"])
def test_a_protected_address_hint_never_reaches_the_client(qtype: str, record: str,
                                                            address: str) -> None:
    # svc.other.org is allowed by `star`, which names no zone: it vouches for no private address.
    service, audit, _ = service_for(ScriptedUpstream(f"svc.other.org 300 {record}"))
    assert_filtered(ask(service, "svc.other.org", qtype), audit,
                    str(ipaddress.ip_address(address)))


def test_only_the_record_with_a_protected_hint_is_dropped() -> None:
    service, _, _ = service_for(ScriptedUpstream(
        "www.example.com 300 HTTPS 1 . ipv4hint=192.0.2.1\n"
        "www.example.com 300 HTTPS 2 . ipv4hint=169.254.169.254"))
    reply = ask(service, qtype="HTTPS")
    assert reply.header.rcode == RCODE.NOERROR
    assert rdata(reply, "rr") == ["www.example.com HTTPS 1 . ipv4hint=192.0.2.1"]


def test_a_private_hint_in_a_zone_that_vouches_for_it_passes() -> None:
    service, _, _ = service_for(ScriptedUpstream("db.corp.test 300 HTTPS 1 . ipv4hint=10.0.0.5"))
    reply = ask(service, "db.corp.test", "HTTPS")
    assert rdata(reply, "rr") == ["db.corp.test HTTPS 1 . ipv4hint=10.0.0.5"]


def test_a_protected_hint_in_the_additional_section_is_dropped() -> None:
    service, _, _ = service_for(ScriptedUpstream(
        "www.example.com 300 A 192.0.2.1",
        additional="svc.example.com 300 HTTPS 1 . ipv4hint=169.254.169.254"))
    reply = ask(service)
    assert rdata(reply, "rr", "auth", "ar") == ["www.example.com A 192.0.2.1"]


# --- records not linked to the question ---------------------------------------------------------


@pytest.mark.parametrize(("section", "rider"), [
    ("answer", "x.ngrok.io 300 A 192.0.2.98"),
    ("answer", "other.example.com 300 A 192.0.2.7"),
    ("answer", "x.ngrok.io 300 AAAA 2001:db8::98"),
    ("authority", "x.ngrok.io 300 A 192.0.2.98"),
    ("additional", "x.ngrok.io 300 A 192.0.2.98"),
    ("additional", "x.ngrok.io 300 HTTPS 1 . ipv4hint=192.0.2.98"),
], ids=["answer-denied-owner", "answer-unlinked-allowed-owner", "answer-denied-aaaa",
        "authority-denied-owner", "additional-denied-owner", "additional-denied-https"])
def test_a_record_not_linked_to_the_question_is_stripped_and_never_remembered(
        section: str, rider: str) -> None:
    script = {"answer": "www.example.com 300 A 192.0.2.1", "authority": "", "additional": ""}
    script[section] = (script[section] + "\n" + rider).strip()
    service, audit, guard = service_for(ScriptedUpstream(**script))
    reply = ask(service)
    assert reply.header.rcode == RCODE.NOERROR
    assert rdata(reply, "rr", "auth", "ar") == ["www.example.com A 192.0.2.1"]
    assert remembered(guard, "192.0.2.1")
    rider_address = rider.split()[-1].rpartition("=")[2]
    assert not remembered(guard, rider_address)
    assert audit.records[-1]["effect"] == "allow" and audit.records[-1]["ip"] == "192.0.2.1"


def test_glue_owned_by_an_allowed_name_stays_but_is_not_remembered() -> None:
    service, _, guard = service_for(ScriptedUpstream(
        "www.example.com 300 MX 10 mail.example.com",
        additional="mail.example.com 300 A 192.0.2.25"))
    reply = ask(service, qtype="MX")
    assert rdata(reply, "ar") == ["mail.example.com A 192.0.2.25"]
    assert not remembered(guard, "192.0.2.25")


def test_records_reached_through_the_alias_chain_stay() -> None:
    service, _, guard = service_for(ScriptedUpstream(
        "www.example.com 300 CNAME edge.corp.test\n"
        "edge.corp.test 300 CNAME lb.corp.test\n"
        "lb.corp.test 300 A 192.0.2.40"))
    reply = ask(service)
    assert rdata(reply, "rr")[-1] == "lb.corp.test A 192.0.2.40"
    assert guard.resolved.lookup(CLIENT, ipaddress.ip_address("192.0.2.40")) in (
        "www.example.com", ("www.example.com",))


# --- private addresses published outside the zone that vouches for them ---------------------


@pytest.mark.parametrize("script", [
    "db.corp.test 300 CNAME pub.other.org\npub.other.org 300 A 10.0.0.5",
    "db.corp.test 300 CNAME www.example.com\nwww.example.com 300 CNAME pub.other.org\n"
    "pub.other.org 300 A 10.0.0.5",
    "sub.corp.test 300 DNAME other.org\ndb.other.org 300 A 10.0.0.5",
], ids=["cname-out-of-the-zone", "through-another-vouching-zone", "dname-out-of-the-zone"])
def test_a_private_address_an_alias_target_outside_the_zone_publishes_is_filtered(
        script: str) -> None:
    """Attack pass: `*.corp.test` vouches for private addresses because only its owner
    publishes records under it; a CNAME (or DNAME) out of it hands that to whoever holds the
    target (a dangling alias, a hostile upstream): `db.corp.test CNAME pub.other.org`,
    `pub.other.org A 10.0.0.5` was served, remembered as db.corp.test's, and connected to."""
    name = "db.sub.corp.test" if "DNAME" in script else "db.corp.test"
    service, audit, guard = service_for(ScriptedUpstream(script))
    assert_filtered(ask(service, name), audit, "10.0.0.5", "other.org")
    assert not remembered(guard, "10.0.0.5")
    service, _, _ = service_for(ScriptedUpstream(script))
    found, why, denial = asyncio.run(service.lookup(name, CLIENT))  # (guardd's own: a connect)
    assert found == [] and "10.0.0.5" in why
    assert denial is not None and not denial.allowed and denial.reason == why


@pytest.mark.parametrize("script", [
    "db.corp.test 300 CNAME lb.corp.test\nlb.corp.test 300 A 10.0.0.5",
    "api.example.com 300 CNAME lb.corp.test\nlb.corp.test 300 A 10.0.0.5",
], ids=["within-the-zone", "into-another-vouching-zone"])
def test_a_private_address_published_in_a_vouching_zone_stays(script: str) -> None:
    service, _, guard = service_for(ScriptedUpstream(script))
    reply = ask(service, script.split()[0])
    assert rdata(reply, "rr")[-1] == "lb.corp.test A 10.0.0.5" and remembered(guard, "10.0.0.5")


def test_a_network_a_rule_names_vouches_wherever_the_alias_leads() -> None:
    """`ip: 10.0.0.0/8` names the network itself: the operator opened it for the rule's names,
    whoever publishes the record."""
    policy = POLICY.replace('domain: "*.corp.test", effect: allow',
                            'domain: "*.corp.test", ip: 10.0.0.0/8, effect: allow')
    service, _, guard = service_for(ScriptedUpstream(
        "db.corp.test 300 CNAME pub.other.org\npub.other.org 300 A 10.0.0.5"), policy=policy)
    reply = ask(service, "db.corp.test")
    assert rdata(reply, "rr")[-1] == "pub.other.org A 10.0.0.5" and remembered(guard, "10.0.0.5")


# --- aliases into denied names, in every section ------------------------------------------------


@pytest.mark.parametrize(("section", "alias"), [
    ("authority", "www.example.com 300 CNAME x.ngrok.io"),
    ("additional", "www.example.com 300 CNAME x.ngrok.io"),
    ("authority", "example.com 300 DNAME x.ngrok.io"),
    ("answer", "example.com 300 DNAME x.ngrok.io"),
    ("additional", "unrelated.example.org 300 CNAME x.ngrok.io"),
    ("answer", "www.example.com 300 CNAME x.ngrok.io"),
], ids=["cname-in-authority", "cname-in-additional", "dname-in-authority", "dname-in-answer",
        "unlinked-cname-in-additional", "cname-in-answer"])
def test_an_alias_into_a_denied_name_in_any_section_filters_the_answer(section: str,
                                                                        alias: str) -> None:
    script = {"answer": "www.example.com 300 A 192.0.2.1", "authority": "", "additional": ""}
    script[section] = (alias + "\n" + script[section]).strip()
    service, audit, guard = service_for(ScriptedUpstream(**script))
    assert_filtered(ask(service), audit, "x.ngrok.io")
    assert not remembered(guard, "192.0.2.1")


def test_an_alias_to_an_address_in_disguise_filters_the_answer() -> None:
    service, audit, _ = service_for(ScriptedUpstream(
        "www.example.com 300 CNAME a.0xa9fea9fe\na.0xa9fea9fe 300 A 192.0.2.1"))
    assert_filtered(ask(service), audit, "a.0xa9fea9fe", "not a valid host name")


def test_dname_substitution_into_a_denied_name_filters_the_answer() -> None:
    # ngrok.io itself is allowed (by `star`), www.ngrok.io is not: the DNAME's target passes,
    # the name it makes of the question does not, with or without a synthesized CNAME.
    service, audit, guard = service_for(ScriptedUpstream(
        "sub.example.com 300 DNAME ngrok.io\nwww.ngrok.io 300 A 192.0.2.98"))
    assert_filtered(ask(service, "www.sub.example.com"), audit, "www.ngrok.io")
    assert not remembered(guard, "192.0.2.98")


def test_dname_substitution_into_an_allowed_name_resolves() -> None:
    service, _, guard = service_for(ScriptedUpstream(
        "sub.example.com 300 DNAME corp.test\nwww.corp.test 300 A 192.0.2.50"))
    reply = ask(service, "www.sub.example.com")
    assert [QTYPE[rr.rtype] for rr in reply.rr] == ["DNAME", "A"]  # dnslib prints no DNAME
    assert rdata(reply, "rr")[1] == "www.corp.test A 192.0.2.50"
    assert remembered(guard, "192.0.2.50")


def test_a_classless_reverse_delegation_resolves() -> None:
    """RFC 2317: a reverse name in a block smaller than /24 is an alias of a name with a '/'
    (the review of 2026-12-06: taking every character but letters, digits, '-', '_' and dots
    for no name filtered these answers)."""
    policy = POLICY + '  - {id: reverse, action: dns.query, domain: "*.in-addr.arpa", ' \
        'effect: allow}\n'
    service, _, _ = service_for(ScriptedUpstream(
        "5.2.0.192.in-addr.arpa 300 CNAME 5.0/25.2.0.192.in-addr.arpa\n"
        "5.0/25.2.0.192.in-addr.arpa 300 PTR www.example.com"), policy=policy)
    reply = ask(service, "5.2.0.192.in-addr.arpa", "PTR")
    assert reply.header.rcode == RCODE.NOERROR
    assert [QTYPE[rr.rtype] for rr in reply.rr] == ["CNAME", "PTR"]


# --- names a record points the client at ---------------------------------------------------------


@pytest.mark.parametrize(("qtype", "record"), [
    ("MX", "MX 10 mail.x.ngrok.io"),
    ("SRV", "SRV 0 0 443 x.ngrok.io"),
    ("NS", "NS ns.x.ngrok.io"),
    ("HTTPS", "HTTPS 1 x.ngrok.io. alpn=h2"),
    ("HTTPS", "HTTPS 1 x.ngrok.io. ipv4hint=192.0.2.1"),
    ("SVCB", "SVCB 0 x.ngrok.io."),
])
def test_a_record_pointing_at_a_denied_name_is_filtered(qtype: str, record: str) -> None:
    service, audit, _ = service_for(ScriptedUpstream(f"www.example.com 300 {record}"))
    assert_filtered(ask(service, qtype=qtype), audit, "x.ngrok.io")


def name_wire(name: str) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"


class OneRecordUpstream(ScriptedUpstream):
    """Answers with one record of any type, its rdata as given (types dnslib cannot write)."""

    def __init__(self, rtype: int, data: bytes) -> None:
        super().__init__()
        self.record = RR("www.example.com", rtype, ttl=300, rdata=RD(data))

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: object = None, client: str = "") -> bytes:
        reply = DNSRecord.parse(query).reply()
        reply.add_answer(self.record)
        return bytes(reply.pack())


METADATA = bytes([169, 254, 169, 254])


def ask_type(service: DNSService, rtype: int) -> DNSRecord:
    """`ask` for www.example.com in a type dnslib may not name."""
    query = DNSRecord(q=DNSQuestion("www.example.com", rtype))
    query.add_ar(EDNS0(udp_len=1232))
    result = service.answer(bytes(query.pack()), CLIENT, True)
    if not isinstance(result, bytes):
        result = asyncio.run(result)
    return DNSRecord.parse(result)


@pytest.mark.parametrize(("qtype", "rtype", "data"), [
    ("PTR", 12, name_wire("x.ngrok.io")),
    ("AFSDB", 18, b"\x00\x01" + name_wire("x.ngrok.io")),
    ("RT", 21, b"\x00\x0a" + name_wire("x.ngrok.io")),
    ("KX", 36, b"\x00\x0a" + name_wire("x.ngrok.io")),
])
def test_a_rarer_record_pointing_at_a_denied_name_is_filtered(qtype: str, rtype: int,
                                                               data: bytes) -> None:
    """Attack pass: only A, AAAA, the aliases, NS, MX, SRV, SVCB and HTTPS were read; a PTR
    naming a denied name was served as it came."""
    service, audit, _ = service_for(OneRecordUpstream(rtype, data))
    assert_filtered(ask_type(service, rtype), audit, "x.ngrok.io")


@pytest.mark.parametrize(("qtype", "rtype", "data"), [
    ("WKS", 11, METADATA + b"\x06\x00\x00\x01"),
    ("A6", 38, b"\x00" + ipaddress.IPv6Address("::ffff:169.254.169.254").packed),
    ("APL", 42, b"\x00\x01\x20\x04" + METADATA),
    ("L32", 105, b"\x00\x0a" + METADATA),
    ("IPSECKEY", 45, b"\x0a\x01\x02" + METADATA + b"key"),
    ("AMTRELAY", 260, b"\x0a\x01" + METADATA),
    ("RP", 17, name_wire("x.ngrok.io") + name_wire("x.ngrok.io")),
    # (review: a list of what to strip missed these; now only listed types are kept)
    ("NAPTR", 35, b"\x00\x64\x00\x0a\x01U\x07E2U+sip\x1e!^.*$!http://169.254.169.254/!\x00"),
    ("URI", 256, b"\x00\x0a\x00\x01http://169.254.169.254/"),
    ("TYPE22", 22, b"\x47\x00\x05" + METADATA),  # NSAP
    ("TYPE7", 7, name_wire("x.ngrok.io")),  # MB
    ("TYPE4000", 4000, METADATA),
])
def test_a_record_that_carries_what_guardd_does_not_read_is_filtered(qtype: str, rtype: int,
                                                                     data: bytes) -> None:
    """Attack pass: WKS, A6, APL, L32, IPSECKEY and AMTRELAY carry addresses, RP names, in
    formats guardd does not read: 169.254.169.254 and x.ngrok.io were served in them. No
    client connects by them; an answer keeps only the types guardd reads or knows to be plain
    data, whatever the others carry."""
    service, audit, _ = service_for(OneRecordUpstream(rtype, data))
    reply = ask_type(service, rtype)
    # (review: NXDOMAIN would say the name has no records of any type; it has these)
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr
    assert qtype in str(audit.records[-1]["reason"])


@pytest.mark.parametrize("qtype", [1, 257])
@pytest.mark.parametrize("address", [METADATA, bytes([10, 0, 0, 5]), bytes([127, 0, 0, 1])])
def test_a_record_a_client_reads_as_an_address_by_its_types_low_byte_is_filtered(
        qtype: int, address: bytes) -> None:
    """Session 61's attack (Medium): musl's resolver reads a record's type by its low byte
    alone (`p[1]`, class unchecked), so a CAA record (257, 0x0101) of 4 bytes in an allowed
    name's A answer was an A record to every Alpine client: 169.254.169.254 served, the
    record an allow. No CAA is 4 bytes (a flag, a tag's length, a tag, a value)."""
    service, audit, _ = service_for(OneRecordUpstream(257, address))
    reply = ask_type(service, qtype)
    assert reply.header.rcode == RCODE.NOERROR and not reply.rr
    assert "low byte" in str(audit.records[-1]["reason"])


@pytest.mark.parametrize(("rtype", "data"), [
    (16, b"\x05hello"),  # TXT
    (257, b"\x00\x05issueca.test"),  # CAA
    (43, b"\x00\x01\x08\x02" + bytes(32)),  # DS
    (47, name_wire("x.ngrok.io") + b"\x00\x01\x40"),  # NSEC: a proof, not a pointer
])
def test_plain_data_types_are_served(rtype: int, data: bytes) -> None:
    service, _, _ = service_for(OneRecordUpstream(rtype, data))
    reply = ask_type(service, rtype)
    assert reply.header.rcode == RCODE.NOERROR and [rr.rtype for rr in reply.rr] == [rtype]


def test_only_the_target_that_is_denied_is_dropped() -> None:
    service, _, _ = service_for(ScriptedUpstream(
        "www.example.com 300 MX 10 mail.x.ngrok.io\nwww.example.com 300 MX 20 mail.example.com"))
    assert rdata(ask(service, qtype="MX"), "rr") == ["www.example.com MX 20 mail.example.com."]


def test_an_answer_from_the_cache_is_recorded_as_the_answer_it_is() -> None:
    """Session 61's DNS attack (Low; the trail): only the answer that came from upstream was
    recorded with the addresses it gave and what was filtered from it; each answer served
    from the cache after it was recorded with neither, so the trail showed the client given
    the addresses once. (Asked three times: the third is the packet memo's.)"""
    service, audit, _ = service_for(ScriptedUpstream(
        "www.example.com 300 A 192.0.2.7\nwww.example.com 300 A 169.254.169.254"))
    for _ in range(3):
        assert rdata(ask(service), "rr") == ["www.example.com A 192.0.2.7"]
    records = [record for record in audit.records if record.get("action") == "dns.query"]
    assert len(records) == 3
    for record in records:
        assert record["ip"] == "192.0.2.7" and "removed from the answer" in str(
            record["reason"]), record


# --- TTLs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ttl", "capped"), [(2**31 - 1, 600), (86401, 600), (2**31, 0),
                                             (2**32 - 1, 0)],
                         ids=["2^31-1", "a-day-and-a-second", "top-bit", "all-ones"])
def test_first_answer_ttls_are_capped_for_the_client_and_the_address_map(ttl: int,
                                                                         capped: int) -> None:
    """The cache's max TTL caps what the first client gets and how long the address is
    remembered; a TTL with the top bit set is 0 (RFC 2181 8)."""
    clock = Clock()
    service, _, guard = service_for(ScriptedUpstream(
        f"www.example.com {ttl} CNAME lb.example.com\nlb.example.com {ttl} A 192.0.2.1"),
        max_ttl=600, clock=clock)
    reply = ask(service)
    assert [rr.ttl for rr in reply.rr] == [capped, capped]
    if capped:
        clock.now += capped - 1
        assert remembered(guard, "192.0.2.1")
        clock.now += 1
    assert not remembered(guard, "192.0.2.1")


def test_negative_answer_ttl_is_capped_on_the_first_answer() -> None:
    soa = "example.com 2147483647 SOA ns.example.com h.example.com 1 7200 3600 1209600 2147483647"
    service, _, _ = service_for(ScriptedUpstream(authority=soa, rcode=RCODE.NXDOMAIN),
                                negative_max_ttl=300)
    reply = ask(service, "gone.example.com")
    assert reply.header.rcode == RCODE.NXDOMAIN
    assert [rr.ttl for rr in reply.auth] == [300]


class RawUpstream:
    """Answers every query with `tail`: the records after the question, as raw bytes."""

    def __init__(self, counts: tuple[int, int, int], tail: bytes) -> None:
        self.counts = counts
        self.tail = tail

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: object = None, client: str = "") -> bytes:
        question = wire.parse_query(query).question
        header = query[:2] + b"\x81\x80\x00\x01" + b"".join(
            count.to_bytes(2, "big") for count in self.counts)
        return header + question + self.tail


def test_an_answer_is_rebuilt_as_it_was_read_where_dnslib_misread_it() -> None:
    """Found by the dns_response_vs_dnslib fuzz target: dnslib reads a NAPTR's fields past its
    rdlength, so everything after it meant something else to dnslib, which re-encoded answers
    then (the client got SERVFAIL, never dnslib's reading). guardd rebuilds an answer itself
    since session 58 (dnslib's reading cost seconds): from its own reading, the NAPTR (a type
    it does not read) and the denied owner dropped, the A record it vetted kept."""
    a_record = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04\xc0\x00\x02\x01"
    naptr = b"\xc0\x0c\x00\x23\x00\x01\x00\x00\x01\x2c\x00\x02\x00\x01"
    rider = (b"\x01x\x05ngrok\x02io\x00\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04"
             b"\xc0\x00\x02\x62")  # a denied owner in the additional section: stripped
    upstream = RawUpstream((2, 0, 1), a_record + naptr + rider)
    service, audit, _ = service_for(upstream)  # type: ignore[arg-type]
    reply = ask(service)
    assert reply.header.rcode == RCODE.NOERROR
    assert [(str(rr.rname), rr.rtype, str(rr.rdata)) for rr in reply.rr + reply.ar
            if rr.rtype != QTYPE.OPT] == [("www.example.com.", QTYPE.A, "192.0.2.1")]


def target_text(name: bytes) -> str:
    """A wire name's text with its root dot, as dnslib shows it."""
    parts, pos = [], 0
    while name[pos]:
        parts.append(name[pos + 1:pos + 1 + name[pos]].decode())
        pos += 1 + name[pos]
    return ".".join(parts) + "."


def test_an_answer_of_one_long_target_again_and_again_is_rebuilt_as_small() -> None:
    """Attack pass (2026-12-06): dnslib wrote SRV targets whole, so a 5 KB answer of 254 SRV
    records pointing at one long target re-encoded (a record not linked to the question
    stripped) to 67 KB, more than a DNS message may hold: cached, and every answer of it over
    TCP raised in its length prefix and left the client's connection paused for good; it was
    refused since (`wire.MAX_MESSAGE_BYTES`). guardd's own rebuild (session 58) points each
    target at the first: the answer is served, as small as it came."""
    target = name_wire(".".join(["a" * 63] * 3 + ["b" * 40, "example", "com"]))
    at = 12 + len(name_wire("www.example.com")) + 4 + 12 + 6  # the first SRV's target
    first = b"\xc0\x0c\x00\x21\x00\x01\x00\x00\x01\x2c" + (6 + len(target)).to_bytes(2, "big")
    pointer = (0xC000 | at).to_bytes(2, "big")
    others = (b"\xc0\x0c\x00\x21\x00\x01\x00\x00\x01\x2c\x00\x08" + b"\x00\x00\x00\x00\x01\xbb"
              + pointer) * 253
    unlinked = name_wire("other.example.com") + b"\x00\x01\x00\x01\x00\x00\x01\x2c\x00\x04" \
        + bytes([192, 0, 2, 9])
    upstream = RawUpstream((255, 0, 0), first + b"\x00\x00\x00\x00\x01\xbb" + target + others
                           + unlinked)
    service, audit, _ = service_for(upstream)  # type: ignore[arg-type]
    query = DNSRecord.question("www.example.com", "SRV")
    raw = service.answer(bytes(query.pack()), CLIENT, True)
    raw = raw if isinstance(raw, bytes) else asyncio.run(raw)
    reply = DNSRecord.parse(raw)
    assert reply.header.rcode == RCODE.NOERROR and len(reply.rr) == 254
    assert {str(rr.rdata.target) for rr in reply.rr} == {target_text(target)}
    assert len(raw) < 8192 and len(service.cache) == 1, len(raw)  # (as it came: 5 KB)
