"""CPU shares: what a client's bytes may cost the loop, across all its connections and queries.

What a client's bytes cost guardd is the client's to choose: a body of 1-byte chunks costs
about a microsecond of parsing a byte (attack pass: 50 connections of them, 300 MB, held the
loop for four minutes, DNS answers took seconds and guardd's own lookups timed out), and a
stream of small pipelined requests costs a judgement, a record and two sends each (re-attack:
200 connections of them took the loop as well). Yielding the loop between parts
(`Tunnel._paced`) keeps a connection from holding it; it does not stop a client with many
connections from taking nearly all of it. So each client (`addr.counted_as`: every loopback
address one) has a token bucket of CPU seconds: the work its connections do (a connect, the
first bytes' reads, the stream after other bytes, a followed connection's every part and
response read, each with its judgement, record and sends; and answering each of its DNS
queries: a UDP flood took every other client's answers too) is charged to it, and once it is
spent they wait until it has refilled, while every other client goes on: half a core over
time, while another client was active within `WINDOW` (work of its own was charged, a DNS
query's included). A client alone takes what it needs, and owes nothing for it: the share
holds back only what another client may want.
Sans-I/O: `charge` and `wait` say how long to wait; a proxy connection, a relay and a UDP query
wait their turn (`turns.py`; a UDP query past what is held is dropped), a DNS-over-TCP
connection stops reading.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: The share of one core a client's parsing may take over time, and what it may take at once
#: (session 56's re-attack: at half a second, 200 connections of heavy responses held another
#: client's DNS answers 680 ms before the share caught up; its last attack: at 50 ms, heavy
#: responses timed to land together each time the bucket had refilled held them 100 ms at
#: every pulse, a DNS answer taking two turns of the loop, a proxied GET five).
RATE = 0.5
BURST = 0.01
#: Seconds since another client was last active within which a client's share holds it back
#: (re-attack: at 1 s, a client that asked once every 1.5 s found the loop taken each time,
#: its query behind 200 connections' turns, up to 1.4 s).
WINDOW = 30.0
#: Buckets kept before the full ones are dropped (a full bucket is the same as none).
_KEPT = 1024
#: Who was active when: the client, and its time.
_Activity = tuple[str, float]
_NOBODY: _Activity = ("", float("-inf"))


class CpuShares:
    """Every client's bucket of CPU seconds (`RATE` a second, up to `BURST`), and who was
    active lately."""

    def __init__(self, rate: float = RATE, burst: float = BURST,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        #: client -> (seconds left, which may be below zero: owed; when last charged).
        self._buckets: dict[str, tuple[float, float]] = {}
        #: The client active last, and the one active last before it of any other client:
        #: whether another client than one is active, in constant time.
        self._latest = self._before = _NOBODY

    def _alone(self, client: str, now: float) -> bool:
        """No other client was active within `WINDOW`."""
        other = self._before if self._latest[0] == client else self._latest
        return other[1] < now - WINDOW

    def charge(self, client: str, seconds: float, active: bool = True) -> float:
        """Charge `seconds` of CPU to `client`, which is `active`: how long its connections
        must wait before they go on (0: they need not), so that over time, while others are
        active, it gets `rate` of a core. Not `active`: its charges hold no one else back (the
        share of the datagrams from outside `clients`: review, a stray one a second held a lone
        agent to half a core; a metrics scrape), and are owed only while another client is
        active. (Inlined: every DNS query is charged.)"""
        now = self._clock()
        if active:
            latest = self._latest
            if latest[0] != client:
                self._before = latest
            self._latest = (client, now)
            other = self._before
        else:  # (its own activity is no other client's: re-attack of attack pass 51)
            other = self._before if self._latest[0] == client else self._latest
        burst = self.burst
        bucket = self._buckets.get(client)
        left = (burst if bucket is None else
                min(burst, bucket[0] + (now - bucket[1]) * self.rate)) - seconds
        if left < 0 and other[1] < now - WINDOW:
            left = 0.0  # (nobody else wants the loop: nothing is owed for it)
        if left >= burst:
            self._buckets.pop(client, None)
            return 0.0
        if len(self._buckets) >= _KEPT and bucket is None:
            self._forget_full(now)
        self._buckets[client] = (left, now)
        return 0.0 if left >= 0 else -left / self.rate

    def wait(self, client: str) -> float:
        """How long `client`'s connections must wait before they go on (0: they need not), as
        `charge` of nothing says, without marking it active (a connection asks this at every
        turn: it must cost next to nothing when nothing is owed)."""
        bucket = self._buckets.get(client)
        if bucket is None or bucket[0] >= 0:
            return 0.0  # (nothing owed: no refill can make it owe)
        now = self._clock()
        left = bucket[0] + (now - bucket[1]) * self.rate
        return 0.0 if left >= 0 or self._alone(client, now) else -left / self.rate

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (bounded memory: one per client that worked
        lately, however many clients come and go)."""
        self._buckets = {client: (left, then) for client, (left, then) in self._buckets.items()
                         if left + (now - then) * self.rate < self.burst}
