"""TTL-bounded LRU cache of raw DNS answers.

Theory of operation
-------------------
An entry is the answer's bytes exactly as guardd will send them (already vetted by the guard), plus
where each record's TTL field sits in those bytes (`wire.Record.ttl_offset`). A hit prepends the
client's query id to the answer with every TTL rewritten to what is left of it; that aged copy is
made once per entry and second (nothing is re-encoded), so most hits are one concatenation.

How long an entry lives comes from `wire.min_ttl` (answer TTLs; RFC 2308 negative TTL from the SOA),
raised to `min_ttl`, then capped by `max_ttl`, or `negative_max_ttl` for NXDOMAIN/NODATA. Each
record's TTL is clamped to that lifetime when stored, so a client never holds a record longer than
guardd would (the caps bind clients too); a record whose own TTL is shorter counts down to 0, and is
served as 0 (RFC 1035: use once, do not cache) until the entry expires.

Entries are dropped when a lookup finds them expired, and the least recently used entry is evicted
once `max_entries` is exceeded (an OrderedDict: both are O(1)). Expired entries that are never asked
for again sit until evicted; that bounds memory by `max_entries`, which is all we need.

The cache knows nothing of policy: after a policy reload the caller must `clear()` it, because the
vetting that shaped the stored answers may have changed.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from guardd.dns import wire

#: (name, qtype, qclass, EDNS state): 0 without EDNS, 1 with EDNS, 2 with EDNS and DNSSEC OK.
#: DO changes the answer (RRSIGs or not), and an OPT record may only go back to a client that
#: sent one (RFC 6891), so both are in the key.
CacheKey = tuple[str, int, int, int]

_U32 = struct.Struct("!I")
_ID = struct.Struct("!H")


def cache_key(query: wire.Query) -> CacheKey:
    """The cache key a query's answer is stored and looked up under."""
    edns = query.edns
    return query.name, query.qtype, query.qclass, 0 if edns is None else 1 + edns.do


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
    age: int = 0
    aged: bytes = b""


class AnswerCache:
    """Raw-answer cache keyed by `CacheKey`; `hits` and `misses` feed the metrics."""

    def __init__(self, max_entries: int = 100_000, max_ttl: int = 86400, min_ttl: int = 0,
                 negative_max_ttl: int = 3600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.min_ttl = min_ttl
        self.negative_max_ttl = negative_max_ttl
        self.hits = 0
        self.misses = 0
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: CacheKey, data: bytes, parsed: wire.Response) -> None:
        """Store `data` (whose parse is `parsed`) unless it is uncacheable or its TTL is 0."""
        ttl = wire.min_ttl(parsed)
        if ttl is None:
            return
        cap = self.negative_max_ttl if parsed.negative else self.max_ttl
        ttl = min(max(ttl, self.min_ttl), cap)
        if ttl <= 0:
            return
        offsets = tuple(record.ttl_offset for record in parsed.records)
        ttls = tuple(min(record.ttl, ttl) for record in parsed.records)
        buffer = bytearray(data)
        for offset, record_ttl in zip(offsets, ttls):
            _U32.pack_into(buffer, offset, record_ttl)
        now = self._clock()
        data = bytes(buffer)
        self._entries[key] = _Entry(data, offsets, ttls, now, now + ttl, 0, data[2:])
        self._entries.move_to_end(key)
        if len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        """Whether a fresh answer is stored under `key` (counts neither a hit nor a miss)."""
        entry = self._entries.get(key)  # type: ignore[call-overload]
        return entry is not None and self._clock() < entry.expires

    def get(self, key: CacheKey, query_id: int) -> bytes | None:
        """The cached answer for `key` with `query_id` and counted-down TTLs, or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        now = self._clock()
        if now >= entry.expires:
            del self._entries[key]
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
        return _ID.pack(query_id) + entry.aged

    def clear(self) -> None:
        """Forget every answer (policy reload: the vetting behind them may have changed)."""
        self._entries.clear()
