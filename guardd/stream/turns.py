"""Turns at a client's CPU share: the asyncio side of `guardd.shares`.

A client whose share is spent must wait, and so must every connection of its own: a stream a
tunnel follows, a new connection before its handshake, and a relay's pumps (each readiness
event a splice or two, charged to nobody until 2026-12-04: 200 tunnels trickling a byte a
write to a server that echoed it held another client's connects at 12 ms). Timers of their
own did not work (three tries, each taken out after an attack pass): waits that doubled
stalled an honest client's downloads for seconds; exact waits let whoever checked first after
a refill take the share, so the client's new connections waited seconds behind its pumps; and
a pump whose share refilled between its check and its charge was left with no wake-up at all.

So each client that owes has one queue (`Turns`), and its waiting work joins it in the order
it came: a task's turn (`Share.turn`), a pump's callback (`Share.wait`). One timer serves the
queue: when the share has refilled, the oldest waiter goes, one a loop turn (a released task
does its stretch, and is charged for it, before the next is asked about), until the share is
spent again or the queue is empty. While a client has a queue, its new work queues behind it
whatever the share says, so nothing overtakes. Invariant: a queue in `_queues` always has
exactly one `_serve` scheduled (a timer or the next loop turn), so no waiter is left without a
wake-up; an empty queue is dropped (memory: one entry per waiting task or pump).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from guardd.shares import CpuShares

log = logging.getLogger("guardd.turns")

#: Waited past the share's refill, so that a turn of the timer serves a few waiters, not one
#: (at half a core, 1 ms more is half a millisecond of work).
_SLACK = 0.001


def _release(turn: asyncio.Future[None]) -> None:
    """A task's turn came (a task cancelled meanwhile has nothing to release)."""
    if not turn.done():
        turn.set_result(None)


class Turns:
    """Every client's queue of work waiting for its CPU share (`shares`)."""

    def __init__(self, shares: CpuShares) -> None:
        self.shares = shares
        self._queues: dict[str, deque[Callable[[], None]]] = {}

    def share(self, client: str, counted: Callable[[], None] = lambda: None) -> Share:
        """`client`'s handle (`addr.counted_as` its address), each wait counted by
        `counted` (a metric's counter)."""
        return Share(self, client, counted)

    def owed(self, client: str) -> bool:
        """Whether new work of `client` must wait its turn: its share is spent, or work of its
        own waits already (which goes first)."""
        return client in self._queues or self.shares.wait(client) > 0

    def wait(self, client: str, go: Callable[[], None]) -> None:
        """Call `go` once every waiter queued before it went and the share allows."""
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
            self._schedule(client)
        queue.append(go)

    def _schedule(self, client: str) -> None:
        loop = asyncio.get_running_loop()
        wait = self.shares.wait(client)
        if wait > 0:
            loop.call_later(wait + _SLACK, self._serve, client)
        else:
            loop.call_soon(self._serve, client)

    def _serve(self, client: str) -> None:
        """The queue's one scheduled call: its oldest waiter goes, if the share allows."""
        queue = self._queues[client]
        if self.shares.wait(client) > 0:
            self._schedule(client)  # (others charged it meanwhile: its DNS queries, say)
            return
        go = queue.popleft()
        try:
            go()
        except Exception:  # noqa: BLE001 - one waiter must never strand the others
            log.exception("a waiter for a CPU share failed")
        finally:
            if queue:
                asyncio.get_running_loop().call_soon(self._serve, client)
            else:
                del self._queues[client]


class Share:
    """One client's CPU share as its connections and relays use it."""

    __slots__ = ("turns", "client", "counted")

    def __init__(self, turns: Turns, client: str, counted: Callable[[], None]) -> None:
        self.turns = turns
        self.client = client
        self.counted = counted

    def charge(self, seconds: float) -> None:
        self.turns.shares.charge(self.client, seconds)

    def owed(self) -> bool:
        """Whether new work must wait its turn (`Turns.owed`)."""
        return self.turns.owed(self.client)

    def wait(self, go: Callable[[], None]) -> None:
        """Call `go` at its turn (`Turns.wait`)."""
        self.counted()
        self.turns.wait(self.client, go)

    async def turn(self) -> None:
        """Wait for this task's turn."""
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.wait(lambda: _release(turn))
        await turn
