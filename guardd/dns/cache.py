"""TTL-bounded LRU cache of raw DNS answers, bounded in entries and in bytes.

Theory of operation
-------------------
An entry is the answer's bytes exactly as guardd will send them (already vetted by the guard), plus
where each record's TTL field sits in those bytes (`wire.Record.ttl_offset`). A hit is the answer
after its id with every TTL rewritten to what is left of it; that aged copy is made once per entry
and second (nothing is re-encoded), so most hits are one concatenation with the client's id.

How long an entry lives comes from `wire.min_ttl` (answer TTLs; RFC 2308 negative TTL from the SOA),
raised to `min_ttl`, then capped by `max_ttl`, or `negative_max_ttl` for NXDOMAIN/NODATA. Each
record's TTL is clamped to that lifetime, so a client never holds a record longer than guardd
would (the caps bind clients too); a record whose own TTL is shorter counts down to 0, and is
served as 0 (RFC 1035: use once, do not cache) until the entry expires. `put` does this clamping
and hands the answer back, stored or not, so the first client gets the same capped TTLs as every
later one: an upstream's 2^31 s never reaches a client.

Entries are dropped when a lookup finds them expired, and the least recently used ones are evicted
once there are more than `max_entries` or their estimated memory (`stored_bytes`, the answer twice
plus per-record bookkeeping and the addresses kept) exceeds `max_bytes` (an OrderedDict: both
are O(1) per entry). An answer that alone exceeds `max_bytes` is not stored. Expired entries
that are never asked for again sit until evicted; both bounds hold regardless.

The key is the question and the EDNS state only, and `upstream_query` builds what guardd asks the
upstream from the key alone: whatever else a client's query carried can neither reach the upstream
nor make an answer that another client with the same key would get.

The cache knows nothing of policy: after a policy reload the caller must `clear()` it, because the
vetting that shaped the stored answers may have changed.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from guardd.addr import IPAddress
from guardd.dns import wire

#: (name, qtype, qclass, EDNS state): 0 without EDNS, 1 with EDNS, 2 with EDNS and DNSSEC OK.
#: DO changes the answer (RRSIGs or not), and an OPT record may only go back to a client that
#: sent one (RFC 6891), so both are in the key.
CacheKey = tuple[str, int, int, int]

_U32 = struct.Struct("!I")
_ID = struct.Struct("!H")
#: Estimated bytes per entry besides its answer (twice) and records: the entry, its key and the
#: OrderedDict's slot.
_ENTRY_OVERHEAD = 400
#: Estimated bytes per record: its offset and TTL, each an int in a tuple.
_RECORD_OVERHEAD = 72
#: Measured bytes per address kept (`_Entry.addresses`: an `ipaddress` object in a tuple;
#: review: uncounted, answers of 200 records held 1.86 times `max_bytes`).
_ADDRESS_OVERHEAD = 104


def cache_key(query: wire.Query) -> CacheKey:
    """The cache key a query's answer is stored and looked up under."""
    edns = query.edns
    return query.name, query.qtype, query.qclass, 0 if edns is None else 1 + edns.do


def upstream_query(key: CacheKey) -> bytes:
    """What guardd asks the upstream for an answer to store under `key` (id 0: the resolver sets
    one per attempt). Built from the key alone, so every query with this key gets one answer."""
    name, qtype, qclass, edns = key
    return wire.build_query(name, qtype, 0, qclass=qclass, edns=edns > 0, do=edns == 2)


@dataclass(slots=True)
class _Entry:
    """One cached answer: bytes with TTLs already clamped, and where those TTLs are.

    `aged` is the answer after the id, its TTLs counted down by `age` whole seconds: hits within
    the same second share it, so a hit is usually one concatenation.
    """

    data: bytes
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    stored: float
    expires: float
    size: int
    age: int = 0
    aged: bytes = b""
    #: The addresses of its answer section (read once, as it is stored: `addresses`).
    addresses: tuple[IPAddress, ...] = ()
    #: What its store was told to keep with it (`note`).
    note: object = None


class AnswerCache:
    """Raw-answer cache keyed by `CacheKey`; `hits` and `misses` feed the metrics."""

    def __init__(self, max_entries: int = 100_000, max_ttl: int = 86400, min_ttl: int = 0,
                 negative_max_ttl: int = 3600, max_bytes: int = 64 * 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.min_ttl = min_ttl
        self.negative_max_ttl = negative_max_ttl
        self.max_bytes = max_bytes
        self.stored_bytes = 0
        self.hits = 0
        self.misses = 0
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, data: bytes, parsed: wire.Response, note: object = None
            ) -> tuple[bytes, int | None]:
        """Clamp the TTLs of `data` (whose parse is `parsed`) and store it if it lives > 0 s,
        with `note` (what its hits need to know of it: `note`).

        Returns the clamped answer, which is what every client must get, and its lifetime: None
        when it is not cacheable at all (its TTLs are then capped at the maximum lifetime).
        """
        ttl = wire.min_ttl(parsed)
        cap = self.negative_max_ttl if parsed.negative else self.max_ttl
        lifetime = None if ttl is None else min(max(ttl, self.min_ttl), cap)
        limit = cap if lifetime is None else lifetime
        offsets = tuple(record.ttl_offset for record in parsed.records)
        ttls = tuple(min(record.ttl, limit) for record in parsed.records)
        buffer = bytearray(data)
        for offset, record_ttl in zip(offsets, ttls):
            _U32.pack_into(buffer, offset, record_ttl)
        data = bytes(buffer)
        addresses = tuple(record.address for record in parsed.records
                          if record.address is not None and record.section is wire.Section.ANSWER)
        size = 2 * len(data) + _RECORD_OVERHEAD * len(offsets) + _ENTRY_OVERHEAD + \
            _ADDRESS_OVERHEAD * len(addresses)
        if lifetime and size <= self.max_bytes:
            now = self._clock()
            self._drop(key)
            self._entries[key] = _Entry(data, offsets, ttls, now, now + lifetime, size, 0,
                                        data[2:], addresses, note)
            self.stored_bytes += size
            while len(self._entries) > self.max_entries or self.stored_bytes > self.max_bytes:
                self.stored_bytes -= self._entries.popitem(last=False)[1].size
        return data, lifetime

    def __contains__(self, key: object) -> bool:
        """Whether a fresh answer is stored under `key` (counts neither a hit nor a miss)."""
        entry = self._entries.get(key)  # type: ignore[call-overload]
        return entry is not None and self._clock() < entry.expires

    def lookup(self, key: CacheKey) -> bytes | None:
        """The fresh answer for `key` after its 2-byte id, TTLs counted down; or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        now = self._clock()
        if now >= entry.expires:
            self._drop(key)
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        age = int(now - entry.stored)
        if age != entry.age:
            buffer = bytearray(entry.data)
            pack_into = _U32.pack_into
            for offset, ttl in zip(entry.ttl_offsets, entry.ttls):
                pack_into(buffer, offset, ttl - age if ttl > age else 0)
            entry.age, entry.aged = age, bytes(buffer[2:])
        return entry.aged

    def addresses(self, key: CacheKey) -> tuple[tuple[IPAddress, ...], float]:
        """The addresses in the answer section of the answer stored for `key` (asked right
        after `lookup` found it: one that expired since still says, review), and the seconds
        it has left (none, 0: no answer); neither a hit nor a miss. Read once, as the answer
        was stored: a cache hit that needs them parses nothing (review: parsed at every hit,
        an answer of hundreds of records cost 600 us)."""
        entry = self._entries.get(key)
        if entry is None:
            return (), 0.0
        return entry.addresses, max(0.0, entry.expires - self._clock())

    def note(self, key: CacheKey) -> object:
        """What was stored with the answer for `key` (None: nothing, or no answer)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.note

    def get(self, key: CacheKey, query_id: int) -> bytes | None:
        """The cached answer for `key` with `query_id` and counted-down TTLs, or None."""
        tail = self.lookup(key)
        return None if tail is None else _ID.pack(query_id) + tail

    def clear(self) -> None:
        """Forget every answer (policy reload: the vetting behind them may have changed)."""
        self._entries.clear()
        self.stored_bytes = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stored_bytes -= entry.size
