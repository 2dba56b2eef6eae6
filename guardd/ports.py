"""How many connections one client may open to one destination within a TIME_WAIT.

A connection guardd closes first (its client closed first, or went idle) leaves guardd's
local port to that address and port in TIME_WAIT for 60 s (Linux's `TCP_TIMEWAIT_LEN`), and
no new connect from guardd to the same destination may use that port meanwhile, unless the
kernel reuses such ports: `net.ipv4.tcp_tw_reuse` 1 does for every destination, 2 (Linux's
default) for loopback only. A client opening and closing allowed tunnels to one destination
as fast as it can fills the ephemeral range (`net.ipv4.ip_local_port_range`, 28,232 ports by
default): every client's connects there then fail ("Cannot assign requested address"), and
before that each connect(2) searches the range, in the loop (attack passes, 2026-12-06:
24,000 of guardd's ports to one server in 45 s). So where the kernel does not reuse them, a
client may open a fourteenth of the range's worth of connections to one destination within
`TIME_WAIT` seconds (`DestinationPorts.per_destination`), and past a 56th (`few`) only while
all clients' connections there are fewer than a quarter of the range (`shared`): clients
together (a second re-attack: four, each within a seventh, used up the range) leave half of
it, at the worst the estimate allows, to those that opened few.

Counting. An exact count a destination costs a key each, and a client can ask for a new
destination each connect: 100,000 of them held 96 MiB (re-attack). The counts are a count-min
sketch instead, of a fixed size (`ROWS` x `WIDTH` counters, two windows: 2 MiB): each (client,
destination) adds one to a counter of each row, picked by a hash keyed at start (blake2b: a
client cannot aim at another's counters), and its count is the least of them, never less than
the truth. Over two windows, the count is the current one's plus the share of the previous one's
still within `TIME_WAIT` of now, as if spread evenly; a client that front-loads a window gets
at most about twice the cap into the ports' 60 s.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import secrets
import time
from array import array
from collections.abc import Callable
from pathlib import Path

from guardd.addr import IPAddress, counted_as, effective_address
from guardd.net import hostport

#: Seconds a port guardd closed first stays in TIME_WAIT (Linux's `TCP_TIMEWAIT_LEN`).
TIME_WAIT = 60.0
#: The parts of the ephemeral range one client may take to one destination, one may take
#: however many others took, and all clients together past those few.
CLIENT_PART, FEW_PART, SHARED_PART = 14, 56, 4
#: The sketch's rows (independent hashes) and counters a row (16 bits of a hash each).
ROWS = 4
WIDTH = 1 << 16
#: Where the kernel says whether it reuses ports in TIME_WAIT, and what the ephemeral range is.
TW_REUSE = Path("/proc/sys/net/ipv4/tcp_tw_reuse")
PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: The ephemeral range's size when it cannot be read (Linux's default: 32768-60999).
DEFAULT_RANGE = 28232


def tw_reuse() -> int:
    """`net.ipv4.tcp_tw_reuse` in guardd's network namespace (0 when it cannot be read: every
    destination counted)."""
    try:
        return int(TW_REUSE.read_text())
    except (OSError, ValueError):
        return 0


def ephemeral_ports() -> int:
    """How many ports `net.ipv4.ip_local_port_range` holds in guardd's network namespace."""
    try:
        low, high = map(int, PORT_RANGE.read_text().split())
    except (OSError, ValueError):
        return DEFAULT_RANGE
    return max(1, high - low + 1)


def _reused_as_loopback(ip: IPAddress) -> bool:
    """Does the kernel reuse ports to `ip` as loopback's (`tcp_tw_reuse` 2): one as written,
    or mapped, not one embedded otherwise (NAT64, 6to4: last attack)?"""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


class DestinationPorts:
    """Counts each client's connections to each destination whose ports the kernel does not
    reuse (`reuse`: `net.ipv4.tcp_tw_reuse`), out of `ports` ephemeral ones."""

    def __init__(self, reuse: int, ports: int = DEFAULT_RANGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.configure(reuse, ports)
        self._clock = clock
        self._salt = secrets.token_bytes(16)
        self._started = clock()
        self._current = self._empty()
        self._previous = self._empty()

    def configure(self, reuse: int, ports: int) -> None:
        """The kernel's settings, read at guardd's start and at each reload (`tw_reuse`,
        `ephemeral_ports`)."""
        self.reuse = reuse
        self.per_destination = max(1, ports // CLIENT_PART)
        self.few = max(1, ports // FEW_PART)
        self.shared = max(1, ports // SHARED_PART)

    @staticmethod
    def _empty() -> list[array[int]]:
        return [array("I", bytes(4 * WIDTH)) for _ in range(ROWS)]

    def ask(self, ip: IPAddress, port: int, client: str) -> tuple[str, list[list[int]]]:
        """Why one more connection of `client`'s to `ip`:`port` may not be opened ("": it
        may), and the counters that `count` then adds it to (none when it is not counted). An
        address that embeds an IPv4 one counts as that one (the mapped form connects over
        IPv4, from the same ports; the others are counted with it, the safe side). Asked
        before the connect's rule is charged, counted after (neither refusal takes from the
        other: re-attacks)."""
        if self.reuse == 1 or (self.reuse == 2 and _reused_as_loopback(ip)):
            return "", []
        ip = effective_address(ip)
        now = self._clock()
        self._roll(now)
        left = 1.0 - (now - self._started) / TIME_WAIT  # (of the previous window, still in)
        destination = hostport(str(ip), port)
        mine, everyone = self._slots(counted_as(client), destination), self._slots("", destination)
        count = self._count(mine, left)
        if count >= self.per_destination:
            why = f"the client opened {self.per_destination} connections to {destination}"
        elif count >= self.few and self._count(everyone, left) >= self.shared:
            why = (f"the client opened {self.few} connections to {destination}, and all "
                   "clients' connections there hold a quarter of guardd's ports to it")
        else:
            return "", [mine, everyone]
        return (f"{why} within {TIME_WAIT:g}s, each of which may leave one of guardd's ports "
                "to it waiting out TCP's TIME_WAIT: more would use up the ports every client "
                "shares (reuse connections; an operator may set net.ipv4.tcp_tw_reuse=1, read "
                "at guardd's start and reload)"), []

    def count(self, counters: list[list[int]]) -> None:
        """Count the connection `ask` let go (its `counters`)."""
        for slots in counters:
            for current, slot in zip(self._current, slots):
                current[slot] += 1

    def _count(self, slots: list[int], left: float) -> float:
        """The least of the counters `slots` names: the current window's, and the part of the
        previous one's still within `TIME_WAIT` of now (`left`)."""
        return min(previous[slot] * left + current[slot] for previous, current, slot
                   in zip(self._previous, self._current, slots))

    def _slots(self, client: str, destination: str) -> list[int]:
        """The (client, destination)'s counter in each row (client "": every client's), 16
        bits each of one keyed hash (not Python's `hash` with a salt per row: its rows
        collided together, 29% of the pairs that met in one met in all four, re-attack)."""
        digest = hashlib.blake2b(f"{client} {destination}".encode(), key=self._salt,
                                 digest_size=2 * ROWS).digest()
        return [int.from_bytes(digest[2 * row:2 * row + 2], "big") for row in range(ROWS)]

    def _roll(self, now: float) -> None:
        """Start a new window when the current one is `TIME_WAIT` old (two new ones when the
        previous is too: its counts are all past)."""
        windows = math.floor((now - self._started) / TIME_WAIT)
        if windows <= 0:
            return
        self._previous = self._current if windows == 1 else self._empty()
        self._current = self._empty()
        self._started += windows * TIME_WAIT
