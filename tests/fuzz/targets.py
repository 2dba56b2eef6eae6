"""Fuzz targets: each takes the bytes an attacker controls and must end in a result or in the
documented error of its parser, never in any other exception (`scripts/fuzz` runs them under
atheris, coverage-guided; `tests/unit/test_fuzz_corpus.py` runs the seed corpora in CI).

A crash is any other exception: atheris stops and writes the input to `crash-*` in the current
directory; such an input goes into the target's corpus and gets a regression test.
"""

from __future__ import annotations

from collections.abc import Callable

from guardd import addr
from guardd.dns import wire
from guardd.dns.cache import cache_key
from guardd.errors import (DNSWireError, InvalidHostError, PolicyError, SocksAuthError,
                           SocksProtocolError)
from guardd.policy.loader import load_policy_text
from guardd.socks.protocol import NEED_DATA, SocksServer
from guardd.stream.sniff import sniff


def dns_query(data: bytes) -> None:
    """A client's query: parsed, then answered as an error would be (FORMERR from the bytes)."""
    try:
        query = wire.parse_query(data)
    except DNSWireError as exc:
        wire.formerr_from_bytes(data, exc.rcode_hint)
        return
    wire.error_response(query, wire.Rcode.REFUSED)
    cache_key(query)


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
    """A client's first bytes through a tunnel: TLS hello or HTTP head, whole and cut short."""
    sniff(data)
    sniff(data, eof=True)
    if len(data) > 1:
        sniff(data[:-1])


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
}
