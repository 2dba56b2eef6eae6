"""Fuzz targets: each takes the bytes an attacker controls and must end in a result or in the
documented error of its parser, never in any other exception (`scripts/fuzz` runs them under
atheris, coverage-guided; `tests/unit/test_fuzz_corpus.py` runs the seed corpora in CI).

A crash is any other exception: atheris stops and writes the input to `crash-*` in the current
directory; such an input goes into the target's corpus and gets a regression test.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import dnslib
import h11

from guardd import addr
from guardd.dns import wire
from guardd.dns.cache import cache_key
from guardd.errors import (DNSWireError, InvalidHostError, PolicyError, SocksAuthError,
                           SocksProtocolError)
from guardd.policy.loader import load_policy_text
from guardd.socks.protocol import NEED_DATA, SocksServer
from guardd.stream.follow import Body, BodyMethod, Broken, Follower, Head, Origin
from guardd.stream.sniff import HTTP_HEAD_CAP, UNVERIFIABLE, Kind, sniff, sniff_request


class Disagreement(AssertionError):
    """Two parsers read the same bytes differently, where guardd's reading must be the other's
    (or stricter): a crash for atheris, and a finding."""


def dns_query(data: bytes) -> None:
    """A client's query: parsed, then answered as an error would be (FORMERR from the bytes);
    the query guardd would send for its name asks that very name."""
    try:
        query = wire.parse_query(data)
    except DNSWireError as exc:
        wire.formerr_from_bytes(data, exc.rcode_hint)
        return
    wire.error_response(query, wire.Rcode.REFUSED)
    cache_key(query)
    assert wire.parse_query(wire.build_query(query.name, query.qtype, 0)).name == query.name


def dns_response(data: bytes) -> None:
    """An upstream's answer: walked, its addresses and TTL read, records stripped (which may
    refuse, as SERVFAIL, a message dnslib will not re-encode: a parser differential the DNS
    listener answers with SERVFAIL), and the stripped answer walked again."""
    try:
        response = wire.parse_response(data)
        wire.answer_addresses(response)
        wire.min_ttl(response)
        wire.parse_response(wire.strip_records(data, range(0, len(response.records), 2)))
    except DNSWireError:
        return


def socks(data: bytes) -> None:
    """A SOCKS5 client's bytes, fed in two pieces (with and without a user to log in as)."""
    for users in (None, {"agent": "secret"}):
        server = SocksServer(users)
        middle = len(data) // 2
        try:
            for piece in (data[:middle], data[middle:]):
                server.receive_data(piece)
                if server.next_event() is not NEED_DATA:
                    break  # a request (or a failed login): the handshake is over
                server.data_to_send()
        except (SocksProtocolError, SocksAuthError):
            pass


def first_bytes(data: bytes) -> None:
    """A client's first bytes through a tunnel: TLS hello or HTTP head, whole and cut short;
    and the same bytes as a request body's opening, read as the most lenient server would
    (final review, 2026-12-05: a line only Netty reads as a request crashed that reading)."""
    for read in (sniff, sniff_request):
        read(data)
        read(data, eof=True)
        if len(data) > 1:
            read(data[:-1])


def first_bytes_vs_h11(data: bytes) -> None:
    """Differential: a request head that h11 (a strict HTTP/1.1 server parser) reads must be read
    by the sniffer as HTTP with the same method and, unless it refuses to vouch for the name
    (UNVERIFIABLE, then denied), the same host. The reverse need not hold: the sniffer also reads
    what lenient servers serve and h11 refuses, and may name a host where h11 reads none (a
    target such as `2ttp://host/`, which lenient URL parsers read as absolute): a name more to
    judge, never one less."""
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=HTTP_HEAD_CAP)
    try:
        server.receive_data(data)
        request = server.next_event()
    except h11.RemoteProtocolError:
        return
    if not isinstance(request, h11.Request):
        return
    verdict = sniff(data) or sniff(data, eof=True)
    if verdict is None or verdict.kind is not Kind.HTTP:
        raise Disagreement(f"h11 reads a {request.method!r} request, the sniffer {verdict}")
    if verdict.method != request.method.decode("ascii").upper():
        raise Disagreement(f"method: h11 {request.method!r}, sniffer {verdict.method!r}")
    served = _h11_host(request)
    if served is not None and verdict.host not in (served, UNVERIFIABLE):
        raise Disagreement(f"host: h11 {served!r}, sniffer {verdict.host!r}")


#: The server's answer to each request a followed connection forwards.
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def follow(data: bytes) -> None:
    """Differential over a followed connection (`stream.follow`): what the follower forwards,
    read by a strict server (h11), is exactly the requests it handed out to be judged: as many,
    in order, each with the method the judge reads from its head (the sniffer's; a head it
    cannot vouch for is denied, and nothing goes after it). Nothing else
    may reach a server: no request inside a body, none split in two, no malformed bytes (which
    a lenient server reads its own way). The first byte picks the mode (a tunnel's or the HTTP
    proxy's) and the size of the pieces the client's bytes come in."""
    if not data:
        return
    proxy, piece = bool(data[0] & 0x80), (data[0] & 0x7F) + 1
    stream = data[1:]
    follower = Follower("allowed.test", proxy=proxy)
    if proxy:
        follower.switch(Origin("allowed.test", 80))
    judged: list[str] = []
    forwarded = bytearray()
    head = b""  # the request under way's, as forwarded
    for at in range(0, len(stream) + 1, piece):
        follower.client_data(stream[at:at + piece])  # (b"" last: the client's close)
        while (part := follower.next_request()) is not None:
            if isinstance(part, Broken):
                return _server_reads(bytes(forwarded), judged)
            if isinstance(part, Origin):  # (another connection, to another server)
                _server_reads(bytes(forwarded), judged)
                judged, forwarded = [], bytearray()
                follower.switch(part)
                continue
            if isinstance(part, Head):
                verdict = sniff(part.data, eof=True)
                if verdict is None or verdict.kind is not Kind.HTTP:
                    raise Disagreement(f"a head handed out is no request to the sniffer: "
                                       f"{verdict}")
                if verdict.problem:  # denied: it, and all after it, never go
                    return _server_reads(bytes(forwarded), judged)
                judged.append(verdict.method or "")
            assert isinstance(part, (Head, Body, BodyMethod))
            follower.sent()
            forwarded += part.data
            if isinstance(part, Head):
                head = part.data
            answer = _OK.partition(b"\r\n\r\n")[0] + b"\r\n\r\n" if \
                head.startswith(b"HEAD ") else _OK  # (no body, whatever its length says)
            if follower.awaiting_response and follower.response_data(answer) != answer:
                raise Disagreement("the follower refused or held back a whole response")
    _server_reads(bytes(forwarded), judged)


def _server_reads(forwarded: bytes, judged: list[str]) -> None:
    """A strict server reads `forwarded` as exactly the `judged` requests (the last may be
    cut short: the client stopped in its body)."""
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=HTTP_HEAD_CAP)
    read: list[str] = []
    try:
        server.receive_data(forwarded)
        while True:
            event = server.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED or \
                    isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Request):
                read.append(event.method.decode("ascii"))  # (as sent: the case judged)
            elif isinstance(event, h11.EndOfMessage):
                server.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                server.send(h11.EndOfMessage())
                if server.our_state is not h11.DONE:
                    break  # (the connection closes after it: guardd sent nothing more)
                server.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        raise Disagreement(f"guardd forwarded what a strict server refuses ({exc}): "
                           f"{forwarded[:200]!r}") from None
    if read != judged:
        raise Disagreement(f"a server reads {read}, guardd judged {judged}: "
                           f"{forwarded[:200]!r}")


#: RFC 3986 3.1: a scheme, then "//" and an authority. Anything else is not absolute-form.
_ABSOLUTE_FORM = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://")


def _h11_host(request: h11.Request) -> str | None:
    """The host a server acting on h11's parse would serve: the absolute-form authority, else
    the Host header (RFC 9112 3.2.2), normalized as policy names are."""
    target = request.target
    if request.method == b"CONNECT":
        authority = target
    elif _ABSOLUTE_FORM.match(target):
        authority = re.split(rb"[/?#]", target.split(b"://", 1)[1], maxsplit=1)[0]
    else:
        hosts = [value for name, value in request.headers if name == b"host"]
        authority = hosts[0] if hosts else b""
    text = authority.decode("latin-1").lower()
    if text.startswith("["):
        try:
            text = str(ipaddress.IPv6Address(text[1:text.index("]")]))
        except ValueError:
            return UNVERIFIABLE  # a server reads a host nobody can check: so must the sniffer
    elif ":" in text:
        text = text.rpartition(":")[0]
    return text.rstrip(".") or None


def _dnslib_name(label: dnslib.DNSLabel) -> str:
    """dnslib's labels in guardd's name text: lower case, dig's escapes, no trailing dot."""
    return ".".join("".join(_escaped(byte) for byte in part) for part in label.label)


def _escaped(byte: int) -> str:
    if byte in b'."()\\;@$':
        return "\\" + chr(byte)
    return chr(byte).lower() if 0x21 <= byte <= 0x7E else f"\\{byte:03d}"


def dns_query_vs_dnslib(data: bytes) -> None:
    """Differential: a query both read must have the same id, name, type and class to both
    (guardd judges that name; the upstream is asked it). dnslib refuses labels that are not
    UTF-8, which DNS allows (RFC 2181 11) and guardd reads, escaped."""
    try:
        query = wire.parse_query(data)
    except DNSWireError:
        return
    buffer = dnslib.DNSBuffer(data)
    try:
        header = dnslib.DNSHeader.parse(buffer)
        question = dnslib.DNSQuestion.parse(buffer)
    except Exception:  # noqa: BLE001 - as in dns_response_vs_dnslib
        return
    theirs = (header.id, _dnslib_name(question.qname), question.qtype, question.qclass)
    ours = (query.id, query.name, query.qtype, query.qclass)
    if ours != theirs:
        raise Disagreement(f"guardd reads {ours}, dnslib {theirs}")


def dns_response_vs_dnslib(data: bytes) -> None:
    """Differential: for an answer both read, every record guardd vets is the record dnslib (as
    a client's resolver would) reads: owner, type, class, TTL, and the address or target name."""
    try:
        response = wire.parse_response(data)
    except DNSWireError:
        return
    try:
        theirs = dnslib.DNSRecord.parse(data)
    except Exception:  # noqa: BLE001 - dnslib refuses some rdata with other errors than its own
        return
    records = _records(theirs)
    if len(records) != len(response.records) and all(
            record.rtype in wire._RDATA_DECODERS for record in response.records):
        raise Disagreement(f"guardd reads {len(response.records)} records, dnslib {len(records)}")
    for ours, rr in zip(response.records, records):
        ttl = rr.ttl if rr.ttl < 2**31 else 0  # RFC 2181 8: the high bit set means zero
        fields = (_dnslib_name(rr.rname), rr.rtype, rr.rclass, ttl)
        if (ours.name, ours.rtype, ours.rclass, ours.ttl) != fields:
            raise Disagreement(f"record {ours} is {fields} to dnslib")
        if ours.address is not None and ours.address != ipaddress.ip_address(str(rr.rdata)):
            raise Disagreement(f"address {ours.address}, dnslib {rr.rdata}")
        if ours.target is not None and hasattr(rr.rdata, "label"):
            if ours.target != _dnslib_name(rr.rdata.label):
                raise Disagreement(f"target {ours.target!r}, dnslib {rr.rdata.label}")
        if ours.rtype not in wire._RDATA_DECODERS:
            # guardd skips this rdata by its length; dnslib's parsers of some types (NAPTR)
            # read past it, and from there on the two walk different bytes. Where that matters,
            # re-encoding with dnslib, the answer is checked against guardd's reading
            # (test_dns_vetting.py::test_an_answer_dnslib_misreads_is_refused_when_...).
            break


def _records(record: dnslib.DNSRecord) -> list[dnslib.RR]:
    """Every record but EDNS's OPT pseudo-record, which counts only in the additional section
    (RFC 6891 6.1.1): an OPT type elsewhere is a record like any other, to guardd too."""
    return [*record.rr, *record.auth, *(rr for rr in record.ar if rr.rtype != wire.QType.OPT)]


def host(data: bytes) -> None:
    """A host as a SOCKS request or a claim carries it (any text, any encoding)."""
    try:
        addr.parse_host(data.decode("utf-8", "surrogateescape"))
    except InvalidHostError:
        pass


def policy(data: bytes) -> None:
    """A policy file, as an operator (or a compromised config) writes it."""
    try:
        load_policy_text(data.decode("utf-8", "replace"), "fuzz.yaml")
    except PolicyError:
        pass


TARGETS: dict[str, Callable[[bytes], None]] = {
    "dns_query": dns_query, "dns_response": dns_response, "socks": socks,
    "first_bytes": first_bytes, "host": host, "policy": policy,
    "first_bytes_vs_h11": first_bytes_vs_h11, "dns_query_vs_dnslib": dns_query_vs_dnslib,
    "dns_response_vs_dnslib": dns_response_vs_dnslib, "follow": follow,
}
