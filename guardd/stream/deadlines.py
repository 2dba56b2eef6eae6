"""Timeouts for many connections with one periodic sweep instead of a timer each: the one
mechanism every connection of every listener uses (a proxy's phases, a DNS-over-TCP client's
idle time).

`asyncio.timeout()` builds an object and schedules (and on exit cancels) a loop timer for every
phase it guards; a proxy that accepts thousands of connections a second, each through a
handshake, a connect and a wait for its first bytes, pays that thousands of times a second.
Here a task has at most one deadline, an entry in a dict; a sweep every `resolution` seconds
cancels the tasks whose deadline has passed, and `expired()` tells such a cancellation from any
other (a shutdown's). Deadlines fire up to `resolution` late, which timeouts of seconds allow.
`cut()` ends a task's wait at once the same way, for an event that makes waiting pointless (the
upstream of a relay went away while the client's first bytes were awaited). A connection driven
by callbacks rather than a task (`asyncio.Protocol`) is `watch`ed instead: its `expire` runs.

(The upstream resolver's attempts keep `asyncio.timeout`: their timeouts are the sans-I/O
`Resolution`'s decisions, cut to the time that remains, and need no sweep's slack.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadlines:
    """Deadlines of the tasks of one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.25) -> None:
        self.loop = loop
        self._resolution = resolution
        self._due: dict[asyncio.Task[object], float] = {}
        #: Watched owners (not tasks): owner -> (when, what to call then).
        self._watched: dict[object, tuple[float, Callable[[], object]]] = {}
        self._expired: set[asyncio.Task[object]] = set()
        self._sweep_scheduled = False

    def set(self, seconds: float) -> None:
        """The current task is cancelled once `seconds` have passed (replacing its deadline)."""
        # (Given the loop, `current_task` does not look it up: a getpid(2) each time in 3.11.)
        task = asyncio.current_task(self.loop)
        self._due[task] = self.loop.time() + seconds  # type: ignore[index]
        self._schedule()

    def watch(self, owner: object, seconds: float, expire: Callable[[], object]) -> None:
        """`expire()` runs once `seconds` have passed, unless `owner` is watched again first
        (which replaces its deadline) or `forget`-ten."""
        self._watched[owner] = (self.loop.time() + seconds, expire)
        self._schedule()

    def forget(self, owner: object) -> None:
        self._watched.pop(owner, None)

    def _schedule(self) -> None:
        if not self._sweep_scheduled:
            self._sweep_scheduled = True
            self.loop.call_later(self._resolution, self._sweep)

    def clear(self) -> None:
        """The current task has no deadline any more."""
        self._due.pop(asyncio.current_task(self.loop), None)  # type: ignore[arg-type]

    def cut(self, task: asyncio.Task[object]) -> None:
        """Cancel `task` now, as if its deadline had passed (`expired()` is then True)."""
        self._due.pop(task, None)
        if not task.done():
            self._expired.add(task)
            task.cancel()

    def expired(self) -> bool:
        """In an `except CancelledError`: True, with the cancellation undone, when the current
        task's deadline alone cancelled it; False when a cancellation came from elsewhere
        (also in the same turn as the deadline's, which is then undone: the other one, a
        reload's or a shutdown's, must end the task)."""
        task = asyncio.current_task(self.loop)
        if task not in self._expired:
            return False
        self._expired.discard(task)
        return task.uncancel() == 0

    def _sweep(self) -> None:
        now = self.loop.time()
        for task, due in list(self._due.items()):
            if due <= now:
                self.cut(task)
        for owner, (due, expire) in list(self._watched.items()):
            if due <= now:
                del self._watched[owner]
                expire()
        self._expired = {task for task in self._expired if not task.done()}
        self._sweep_scheduled = bool(self._due or self._watched)
        if self._sweep_scheduled:
            self.loop.call_later(self._resolution, self._sweep)
