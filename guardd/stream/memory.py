"""What a client's connections may hold in kernel memory, and which to cut when they hold more;
sans-I/O (the daemon measures and cuts: `Daemon._sweep_memory`).

Why. A proxied connection's bytes wait in the kernel while its other end does not take them.
An upload to a server that never reads waits in the client's receive buffer (2 MiB), the
relay's pipe (1 MiB) and the destination's send buffer, which the kernel's tuning grows to
`tcp_wmem`'s maximum (4 MiB): 7 MB a connection on loopback. A download the client never
reads waits in the client's send buffer, the pipe and the destination's receive buffer,
which the kernel grew while the relay read fast: 21 MB a connection (`tcp_rmem`'s maximum
was 32 MiB). The per-client connection caps (256 a listener) times that is more than the
kernel allows all TCP sockets together (`net.ipv4.tcp_mem`, 2.2 GiB on a 24 GiB host),
past which every connection on the host is starved: one agent could stall every other.
Lowering the buffers would slow every far transfer; the caps cannot tell a stalled
connection from a busy one.

So each connection is measured, what its sockets' queues hold (SO_MEMINFO, as `ss -m`) and
its pipes, every `SWEEP_INTERVAL`, and so is each socket closed with bytes still queued for
its peer (`reactor.Reactor.close`: otherwise the kernel's orphan, counted by nobody); a client
whose connections hold more than its budget has its largest cut (with a reset, which frees
their queues at once) until what is left is within it, each recorded with why. What a
connection's ends took since the last sweep does not count (`Progress`): a busy transfer's
queues are on their way, however large the kernel grew them; a stalled one's are held. (In
all, moving or not, a client's connections hold `MOVING_BUDGETS` budgets at most.) Between
two sweeps a client can fill more than its budget, at the rate its destinations send (or
take) bytes: the sweep bounds what it keeps, not a burst. So a client found over its budget is on
probation: a few new connections between two sweeps, which come five times as often
meanwhile (`Overdrawn`; session 53's attack: 256 stalled downloads, each cut one reopened at
once, held 460 to 840 MiB at every sweep for as long as the client went on, where the budget
was 64).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from guardd.addr import counted_as

#: Seconds between two measurements of every connection (two getsockopt(2) each); a fifth
#: of it while a client is on probation (`Overdrawn`).
SWEEP_INTERVAL = 0.5

Connection = TypeVar("Connection")


@dataclass(frozen=True, slots=True)
class Way:
    """One way of a connection as a sweep finds it: the bytes guardd holds on that way (its
    source's receive queue, its pipe or reading, its destination's send queue), and those its
    destination took since the connection began (written to its socket, no longer queued)."""

    held: int
    taken: int


class Progress(Generic[Connection]):
    """What each connection's destinations had taken at the last sweep. A connection counts
    against its client's budget what it holds each way less what that way's destination took
    since (session 53's fairness re-attack, Low-Medium: on a fast link the kernel's tuning gave
    each busy download 17 to 30 MiB of queues, all of it moving, and four parallel downloads
    were cut as if stalled). A stalled way takes nothing and counts whole; a busy one's
    queues go many times over between two sweeps. To hold bytes uncounted a client must keep
    taking as much again every sweep: its memory is bounded by what its link moves.
    Each way apart: an upload that stalled is not hidden by a download that moves."""

    def __init__(self) -> None:
        self._taken: dict[Connection, tuple[int, ...]] = {}
        self._found: dict[Connection, tuple[int, ...]] = {}

    def unmoved(self, connection: Connection, ways: tuple[Way, ...]) -> int:
        """What `connection` holds (`ways`) that its destinations did not take since the last
        sweep (since it began, at its first)."""
        taken = tuple(way.taken for way in ways)
        before = self._taken.get(connection, (0,) * len(ways))
        self._found[connection] = taken
        return sum(max(0, way.held - max(0, now - then))  # (a new destination took less)
                   for way, now, then in zip(ways, taken, before, strict=True))

    def swept(self) -> None:
        """The sweep is over: what it found is what the next one compares with (connections
        it did not find are forgotten)."""
        self._taken, self._found = self._found, {}


@dataclass(frozen=True, slots=True)
class Cut(Generic[Connection]):
    """A connection to cut, and why (for its record)."""

    connection: Connection
    client: str
    why: str


#: What a client's connections may hold in all, bytes on their way included, in budgets: a
#: busy transfer's queues do not count against the budget (`Progress`), but they are kernel
#: memory all the same (session 54's attack: eight downloads each read at 42 MB/s held 23
#: times a 4 MiB budget, uncut); four budgets leave a fast link's parallel downloads theirs
#: (session 53: 17 to 30 MiB each, four to eight of them, under the 64 MiB default).
MOVING_BUDGETS = 4


def over_budget(held: Iterable[tuple[Connection, str, int, int]], budget: int
                ) -> list[Cut[Connection]]:
    """Of `held` (each connection, its client, the bytes it holds that did not move on,
    `Progress`, and all it holds), those to cut so that no client holds more than `budget`
    that did not move, nor more than `MOVING_BUDGETS` times it in all: each client's largest
    first, as few as it takes."""
    by_client: dict[str, list[tuple[Connection, int, int]]] = {}
    for connection, client, unmoved, size in held:
        by_client.setdefault(client, []).append((connection, unmoved, size))
    cuts: list[Cut[Connection]] = []
    for client, connections in by_client.items():
        first = len(cuts)
        cuts += _largest(client, [(unmoved, each) for each, unmoved, _ in connections], budget,
                         f"that its ends did not take since the last measure, over its "
                         f"{_mib(budget)} budget")
        gone = {id(cut.connection) for cut in cuts[first:]}
        cuts += _largest(client, [(size, each) for each, _, size in connections
                                  if id(each) not in gone], MOVING_BUDGETS * budget,
                         f"in all, moving or not, over {MOVING_BUDGETS} times its "
                         f"{_mib(budget)} budget")
    return cuts


def _largest(client: str, sized: list[tuple[int, Connection]], limit: int, over: str
             ) -> list[Cut[Connection]]:
    """The cuts of the largest of a client's connections (`sized`), as few as it takes to
    bring their sizes' sum within `limit` (`over`: what the sum was, for the reason)."""
    total = sum(size for size, _ in sized)
    if total <= limit:
        return []
    said = (f"its client's connections held {_mib(total)} {over} (maxBufferedPerClient), and "
            "it was of the largest")
    cuts = []
    for size, connection in sorted(sized, key=lambda each: each[0], reverse=True):
        if total <= limit:
            break
        cuts.append(Cut(connection, client, f"cut: it held {_mib(size)} in guardd's buffers; "
                        f"{said}"))
        total -= size
    return cuts


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


#: Sweeps in a row that must find a client within its budget before its probation ends.
PROBATION_SWEEPS = 10
#: New connections a client on probation may open between two sweeps, on every proxy
#: listener together.
PROBATION_CONNECTS = 8


class Overdrawn:
    """The clients found over their budget lately, on probation: each may open at most
    `PROBATION_CONNECTS` new connections between two sweeps, the rest refused (`Acceptor`),
    until `PROBATION_SWEEPS` sweeps in a row find it within its budget; the sweeps come five
    times as often meanwhile. A client that reopens each connection cut would otherwise hold
    as much again by the next sweep, for as long as it went on (session 53's attack); one
    refused everything until a single sweep found it within let 256 connections open and
    fill at once (its re-attack: 1.1 GiB, a 64 MiB budget), and lost a fast downloader its
    next connections for nothing."""

    #: Why a connection past the allowance is refused (its record's reason).
    REFUSAL = (f"the client's connections held more than its buffer budget "
               f"(maxBufferedPerClient) lately: it opens at most {PROBATION_CONNECTS} new ones "
               "between two measures until they hold less")

    def __init__(self) -> None:
        #: Client (as `counted_as` counts it) -> sweeps within its budget still needed.
        self._probation: dict[str, int] = {}
        #: Client -> new connections it may still open before the next sweep.
        self._allowance: dict[str, int] = {}

    def swept(self, cuts: Iterable[Cut[Connection]]) -> float:
        """A sweep's `cuts` (their clients are over their budget now); the seconds to the
        next sweep."""
        over = {cut.client for cut in cuts}
        self._probation = {client: left - 1 for client, left in self._probation.items()
                           if left > 1 and client not in over}
        self._probation.update(dict.fromkeys(over, PROBATION_SWEEPS))
        self._allowance = dict.fromkeys(self._probation, PROBATION_CONNECTS)
        return SWEEP_INTERVAL / 5 if self._probation else SWEEP_INTERVAL

    def admit(self, client: str) -> bool:
        """May `client` open a new connection now (taking one of its allowance)?"""
        if not self._allowance:
            return True
        key = counted_as(client)
        left = self._allowance.get(key)
        if left is None:
            return True
        if not left:
            return False
        self._allowance[key] = left - 1
        return True
