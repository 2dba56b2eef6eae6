"""guardd.dns.cache: id and TTL patching, expiry, LRU bound, negative caching (injected clock)."""

from __future__ import annotations

import ipaddress
import struct
import tracemalloc

import pytest
from dnslib import EDNS0, RR, DNSRecord

from guardd.dns import wire
from guardd.dns.cache import AnswerCache, CacheKey, cache_key
from guardd.dns.wire import QType, Rcode

SOA = "example.com {ttl} SOA ns1.example.com hostmaster.example.com 1 7200 3600 1209600 {minimum}"


class Clock:
    """A settable stand-in for time.monotonic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(zone: str, qname: str = "www.example.com", *, rcode: int = Rcode.NOERROR,
           auth: str = "", additional: str = "", edns: bool = False) -> bytes:
    reply = DNSRecord.question(qname).reply()
    reply.header.rcode = rcode
    for section, text in ((reply.rr, zone), (reply.auth, auth), (reply.ar, additional)):
        section.extend(RR.fromZone(text) if text else [])
    if edns:
        reply.add_ar(EDNS0(udp_len=1232, flags="do"))
    return bytes(reply.pack())


def ttls(data: bytes) -> list[int]:
    """TTLs of every record but OPT, as a client would read them."""
    return [r.ttl for r in wire.parse_response(data).records]


def stored(cache: AnswerCache, data: bytes, qname: str = "www.example.com") -> CacheKey:
    key = (qname, QType.A, 1, 0)
    cache.put(key, data, wire.parse_response(data))
    return key


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(clock: Clock) -> AnswerCache:
    return AnswerCache(clock=clock)


POSITIVE = answer("www.example.com 300 CNAME lb.example.com\nlb.example.com 120 A 192.0.2.1",
                  auth="example.com 7200 NS ns.example.com",
                  additional="ns.example.com 7200 A 192.0.2.53", edns=True)


def test_hit_patches_id_and_counts_ttls_down(cache: AnswerCache, clock: Clock) -> None:
    key = stored(cache, POSITIVE)
    first = cache.get(key, 0xBEEF)
    assert first is not None and first[:2] == b"\xbe\xef" and first[2:12] == POSITIVE[2:12]
    assert ttls(first) == [120, 120, 120, 120]  # clamped to the entry's lifetime
    clock.now += 100.7
    later = cache.get(key, 0x0001)
    assert later is not None and later[:2] == b"\x00\x01"
    assert ttls(later) == [20, 20, 20, 20]
    assert DNSRecord.parse(later).ar[-1].edns_do == 1  # OPT's TTL field (flags) untouched
    assert (cache.hits, cache.misses) == (2, 0)


def test_ttl_shorter_than_the_floor_counts_down_to_zero(clock: Clock) -> None:
    cache = AnswerCache(min_ttl=60, clock=clock)
    key = stored(cache, answer("www.example.com 300 CNAME lb.example.com\n"
                               "lb.example.com 5 A 192.0.2.1"))
    clock.now += 30
    data = cache.get(key, 1)
    assert data is not None and ttls(data) == [30, 0]
    clock.now += 30
    assert cache.get(key, 1) is None


def test_expiry_drops_the_entry(cache: AnswerCache, clock: Clock) -> None:
    key = stored(cache, POSITIVE)
    clock.now += 119.9
    assert cache.get(key, 1) is not None
    clock.now += 0.1
    assert cache.get(key, 1) is None
    assert len(cache) == 0 and (cache.hits, cache.misses) == (1, 1)


def test_max_ttl_caps_entry_and_record_ttls(clock: Clock) -> None:
    cache = AnswerCache(max_ttl=60, clock=clock)
    key = stored(cache, POSITIVE)
    data = cache.get(key, 1)
    assert data is not None and ttls(data) == [60, 60, 60, 60]
    clock.now += 60
    assert cache.get(key, 1) is None


def test_lru_bound_evicts_least_recently_used(clock: Clock) -> None:
    cache = AnswerCache(max_entries=2, clock=clock)
    keys = [stored(cache, answer(f"{n}.example.com 60 A 192.0.2.1", qname=f"{n}.example.com"),
                   qname=f"{n}.example.com") for n in "ab"]
    assert cache.get(keys[0], 1) is not None  # "a" is now the most recent
    third = stored(cache, answer("c.example.com 60 A 192.0.2.3", qname="c.example.com"),
                   qname="c.example.com")
    assert len(cache) == 2
    assert cache.get(keys[1], 1) is None
    assert cache.get(keys[0], 1) is not None and cache.get(third, 1) is not None


@pytest.mark.parametrize(("rcode", "soa_ttl", "minimum", "negative_max", "lifetime"), [
    (Rcode.NXDOMAIN, 900, 600, 3600, 600),
    (Rcode.NXDOMAIN, 30, 600, 3600, 30),
    (Rcode.NOERROR, 900, 600, 3600, 600),
    (Rcode.NXDOMAIN, 86400, 86400, 3600, 3600),
    (Rcode.NXDOMAIN, 900, 600, 120, 120),
], ids=["nxdomain-minimum", "nxdomain-soa-ttl", "nodata", "capped-default", "capped"])
def test_negative_caching(clock: Clock, rcode: int, soa_ttl: int, minimum: int,
                          negative_max: int, lifetime: int) -> None:
    cache = AnswerCache(negative_max_ttl=negative_max, clock=clock)
    data = answer("", rcode=rcode, auth=SOA.format(ttl=soa_ttl, minimum=minimum))
    key = stored(cache, data)
    hit = cache.get(key, 7)
    assert hit is not None and DNSRecord.parse(hit).header.rcode == rcode
    assert ttls(hit) == [lifetime]  # the SOA's TTL is the negative TTL (RFC 2308 3)
    clock.now += lifetime - 1
    assert cache.get(key, 7) is not None
    clock.now += 1
    assert cache.get(key, 7) is None


@pytest.mark.parametrize("data", [
    answer("", rcode=Rcode.NXDOMAIN),
    answer("", rcode=Rcode.SERVFAIL, auth=SOA.format(ttl=60, minimum=60)),
    answer("www.example.com 0 A 192.0.2.1"),
], ids=["negative-without-soa", "servfail", "ttl-zero"])
def test_uncacheable_answers_are_not_stored(cache: AnswerCache, data: bytes) -> None:
    key = stored(cache, data)
    assert len(cache) == 0 and cache.get(key, 1) is None and cache.misses == 1


def test_truncated_answers_are_not_stored(cache: AnswerCache) -> None:
    data = bytearray(answer("www.example.com 60 A 192.0.2.1"))
    data[2] |= 0x02
    stored(cache, bytes(data))
    assert len(cache) == 0


def test_cache_key_separates_edns_and_dnssec_ok() -> None:
    def query(do: bool | None) -> wire.Query:
        record = DNSRecord.question("WWW.example.com", "AAAA")
        if do is not None:
            record.add_ar(EDNS0(udp_len=1232, flags="do" if do else ""))
        return wire.parse_query(bytes(record.pack()))

    assert cache_key(query(None)) == ("www.example.com", 28, 1, 0)
    assert cache_key(query(False)) == ("www.example.com", 28, 1, 1)
    assert cache_key(query(True)) == ("www.example.com", 28, 1, 2)


def test_clear_and_replace(cache: AnswerCache) -> None:
    key = stored(cache, POSITIVE)
    newer = answer("www.example.com 30 A 192.0.2.9")
    cache.put(key, newer, wire.parse_response(newer))
    data = cache.get(key, 1)
    assert data is not None and len(cache) == 1
    assert [str(r.address) for r in wire.parse_response(data).records] == ["192.0.2.9"]
    cache.clear()
    assert cache.get(key, 1) is None


def test_hit_leaves_the_stored_bytes_alone(cache: AnswerCache, clock: Clock) -> None:
    key = stored(cache, POSITIVE)
    clock.now += 50
    cache.get(key, 0xFFFF)
    clock.now += 1
    data = cache.get(key, 2)
    assert data is not None and data[:2] == b"\x00\x02" and ttls(data) == [69] * 4
    assert struct.unpack("!H", data[6:8]) == (2,)  # ancount intact


# --- what put() hands back, and the byte bound (issue 8, holes 7 and 11) --------------------------


@pytest.mark.parametrize(("data", "lifetime", "expected"), [
    (answer("www.example.com 4294967295 A 192.0.2.1"), 600, [0]),  # top bit: 0 (RFC 2181 8)
    (answer("www.example.com 2147483647 CNAME a.example.com\na.example.com 900 A 192.0.2.1"),
     600, [600, 600]),
    (answer("www.example.com 2147483647 A 192.0.2.1", rcode=Rcode.FORMERR), None, [600]),
    (answer("", rcode=Rcode.NXDOMAIN, auth=SOA.format(ttl=2**31 - 1, minimum=2**31 - 1)),
     60, [60]),
], ids=["top-bit", "capped", "uncacheable-still-capped", "negative"])
def test_put_hands_back_the_answer_with_capped_ttls(clock: Clock, data: bytes,
                                                    lifetime: int | None,
                                                    expected: list[int]) -> None:
    cache = AnswerCache(max_ttl=600, negative_max_ttl=60, clock=clock)
    key = ("www.example.com", QType.A, 1, 0)
    clamped, ttl = cache.put(key, data, wire.parse_response(data))
    assert ttl == (0 if expected == [0] else lifetime)
    assert ttls(clamped) == expected
    assert clamped[:2] == data[:2] and len(clamped) == len(data)
    if ttl:
        assert cache.get(key, int.from_bytes(data[:2], "big")) == clamped


def test_cache_is_bounded_in_bytes(clock: Clock) -> None:
    cache = AnswerCache(max_bytes=64 * 1024, clock=clock)
    records = "\n".join(f"{{n}}.example.com 60 A 192.0.2.{i}" for i in range(1, 101))
    keys = [stored(cache, answer(records.format(n=n), qname=f"{n}.example.com"),
                   qname=f"{n}.example.com") for n in range(100)]
    assert 0 < cache.stored_bytes <= 64 * 1024
    assert 2 < len(cache) < 100
    assert cache.get(keys[-1], 1) is not None and cache.get(keys[0], 1) is None
    cache.clear()
    assert cache.stored_bytes == 0


def test_the_byte_bound_holds_for_all_an_entry_keeps(clock: Clock) -> None:
    """Review: the addresses an entry keeps (for the resolved names) went uncounted: answers
    of 200 records held 1.86 times `max_bytes`."""
    records = "\n".join(f"{{n}}.example.com 60 A 192.0.2.{i}" for i in range(1, 201))
    answers = [(answer(records.format(n=n), qname=f"{n}.example.com"), f"{n}.example.com")
               for n in range(120)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        cache = AnswerCache(max_bytes=1 << 20, clock=clock)
        for data, qname in answers:
            stored(cache, data, qname=qname)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert cache.stored_bytes <= 1 << 20 and held <= 1.2 * (1 << 20), held


def test_an_answer_larger_than_the_byte_bound_is_not_stored(clock: Clock) -> None:
    cache = AnswerCache(max_bytes=4096, clock=clock)
    small = stored(cache, answer("www.example.com 60 A 192.0.2.1"))
    records = "\n".join(f"big.example.com 60 A 192.0.2.{i}" for i in range(1, 201))
    big = stored(cache, answer(records, qname="big.example.com"), qname="big.example.com")
    assert cache.get(big, 1) is None and cache.get(small, 1) is not None


def test_replacing_an_entry_does_not_count_it_twice(cache: AnswerCache) -> None:
    key = stored(cache, POSITIVE)
    once = cache.stored_bytes
    stored(cache, POSITIVE)
    assert cache.stored_bytes == once
    cache.get(key, 1)
    assert cache.stored_bytes == once


def test_an_answer_found_says_its_addresses_though_it_expired_since(clock: Clock) -> None:
    """Review: `lookup` and `addresses` each read the clock; an answer that expired between
    the two gave no addresses (guardd's own lookup said "no A record" for a name it had)."""
    key = stored(cache := AnswerCache(clock=clock), answer("www.example.com 60 A 192.0.2.1"))
    assert cache.lookup(key) is not None
    clock.now += 61
    assert cache.addresses(key) == ((ipaddress.ip_address("192.0.2.1"),), 0.0)
