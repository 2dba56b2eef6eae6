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
it came: a task's turn (`Share.turn`), a pump's callback (`Share.wait`). While a client has a
queue, its new work queues behind it whatever the share says, so nothing overtakes. The queue
is served in batches (`_serve`): waiters go in order for as long as the share allows, up to
`_BATCH` of loop time, each pump charging what it did before the next is asked about; a task
charges only once it runs, at the next loop turn, so a batch releases at most `_TASKS` of
them. When the share is spent, one timer waits for its refill. Invariant: a queue in
`_queues` always has exactly one `_serve` scheduled (a timer or the next loop turn), so no
waiter is left without a wake-up; an empty queue is dropped (memory: one entry per waiting
task or pump).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from guardd.shares import CpuShares

log = logging.getLogger("guardd.turns")

#: Waited past the share's refill, so that a timer's batch serves a few waiters, not one (at
#: half a core, 1 ms more is half a millisecond of work).
_SLACK = 0.001
#: The most loop time one batch takes before the next loop turn (the other clients' events).
_BATCH = 0.001
#: The most tasks one batch releases: each charges its stretch only once it ran (review: one
#: waiter a loop turn held a client whose share was whole, with 60 busy relays, to a third of
#: it, and its new connections waited 195 ms behind them).
_TASKS = 8
#: A waiter, and whether it is a task's turn (which charges only once the task runs).
_Waiter = tuple[Callable[[], None], bool]


def _release(turn: asyncio.Future[None]) -> None:
    """A task's turn came (a task cancelled meanwhile has nothing to release)."""
    if not turn.done():
        turn.set_result(None)


class Turns:
    """Every client's queue of work waiting for its CPU share (`shares`)."""

    def __init__(self, shares: CpuShares) -> None:
        self.shares = shares
        self._queues: dict[str, deque[_Waiter]] = {}

    def share(self, client: str, counted: Callable[[], None]) -> Share:
        """`client`'s handle (`addr.counted_as` its address), each wait counted by
        `counted` (a metric's counter)."""
        return Share(self, client, counted)

    def wait(self, client: str, go: Callable[[], None], task: bool = False) -> None:
        """Call `go` once every waiter queued before it went and the share allows (`task`: it
        releases a task, which charges its work only once it runs)."""
        queue = self._queues.get(client)
        if queue is None:
            self._schedule(client)  # (first: a queue is never without its `_serve`)
            queue = self._queues[client] = deque()
        queue.append((go, task))

    def _schedule(self, client: str) -> None:
        """The queue's next `_serve`: when the share has refilled, or at the next loop turn."""
        loop = asyncio.get_running_loop()
        wait = self.shares.wait(client)
        if wait > 0:
            loop.call_later(wait + _SLACK, self._serve, client)
        else:
            loop.call_soon(self._serve, client)

    def _serve(self, client: str) -> None:
        """The queue's one scheduled call: its waiters go in order while the share allows,
        up to `_BATCH` of loop time and `_TASKS` tasks (and no more than were queued when it
        began: one that queues again goes at the next)."""
        queue = self._queues[client]
        wait = self.shares.wait
        ends = time.perf_counter() + _BATCH
        tasks = 0
        try:
            for _ in range(len(queue)):
                if wait(client) > 0 or tasks == _TASKS or time.perf_counter() > ends:
                    break
                go, task = queue.popleft()
                tasks += task
                try:
                    go()
                except Exception:  # noqa: BLE001 - one waiter must never strand the others
                    log.exception("a waiter for a CPU share failed")
        finally:
            if queue:
                self._schedule(client)
            else:
                del self._queues[client]


class Share:
    """One client's CPU share as its connections and relays use it."""

    __slots__ = ("client", "counted", "_turns", "_queues", "_shares")

    def __init__(self, turns: Turns, client: str, counted: Callable[[], None]) -> None:
        self.client = client
        self.counted = counted
        self._turns = turns
        self._queues = turns._queues  # (`owed` is asked at every pump event)
        self._shares = turns.shares

    def _count(self) -> None:
        """A wait counts when the share is spent (in a queue that outlived the debt, a turn
        only keeps the order: attack pass, the metric rose 2,200 a second for a client alone)."""
        if self._shares.wait(self.client) > 0:
            self.counted()

    def charge(self, seconds: float) -> None:
        """Charge `seconds` of work to the client."""
        self._shares.charge(self.client, seconds)

    def owed(self) -> bool:
        """Whether new work must wait its turn: the share is spent, or work of the client's
        own waits already (which goes first)."""
        return self.client in self._queues or self._shares.wait(self.client) > 0

    def wait(self, go: Callable[[], None]) -> None:
        """Call `go` at its turn (`Turns.wait`)."""
        self._count()
        self._turns.wait(self.client, go)

    async def turn(self) -> None:
        """Wait for this task's turn."""
        self._count()
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._turns.wait(self.client, lambda: _release(turn), task=True)
        await turn
