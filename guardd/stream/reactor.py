"""Readiness of proxied sockets: an edge-triggered epoll set of guardd's own, one descriptor for
the loop to watch.

Why not the loop's `add_reader`/`add_writer`: uvloop watches a descriptor through a libuv poll
handle, and making one (an ioctl and two epoll_ctl checks) and closing one (three epoll_ctl)
costs about eight system calls. A proxied connection needed three of them (the client's waits,
the connect, the relay), and every change between watching for reading and for writing cost two
more. Here a socket is added once, for both, and closing it takes it out (the kernel drops a
closed descriptor from an epoll set): one system call per socket for its whole life.

Edge-triggered: an event says that something changed, not that something is there. Whoever
reads or writes a socket goes on until EAGAIN and waits for the next event only then; an event
nobody waits for is dropped, so a waiter always tries its call first (`Watch`).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable

log = logging.getLogger("guardd.reactor")

_EDGES = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
#: Events that wake a reader (a hang-up or an error reads as EOF or as the error) and a writer.
_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


def _ignore() -> None:
    """An event nobody waits for (its waiter will try its call before it waits)."""


class Watch:
    """One socket in the set: what its next readable and writable events call. Its owner
    changes as the connection goes on (a listener waiting for bytes, a relay's pump)."""

    __slots__ = ("sock", "may_read", "on_readable", "on_writable")

    def __init__(self, sock: socket.socket, may_read: bool) -> None:
        self.sock = sock
        #: The socket may have bytes (or EOF) to read: set by every readable event, cleared
        #: by a reader that met EAGAIN.
        self.may_read = may_read
        self.on_readable: Callable[[], None] = _ignore
        self.on_writable: Callable[[], None] = _ignore

    async def readable(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for the next readable event (the caller met EAGAIN)."""
        await self._next(loop, "on_readable")

    async def writable(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wait for the next writable event (a connect in progress, a full send buffer)."""
        await self._next(loop, "on_writable")

    async def _next(self, loop: asyncio.AbstractEventLoop, which: str) -> None:
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        setattr(self, which, wake)
        try:
            await waiter
        finally:
            setattr(self, which, _ignore)


class Reactor:
    """The set of one loop's proxied sockets."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._epoll = select.epoll()
        self._watches: dict[int, Watch] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, sock: socket.socket, may_read: bool = True) -> Watch:
        """Add `sock` (non-blocking) to the set; `close` takes it out. `may_read`: whether it
        may already have bytes (not a socket still to connect)."""
        watch = Watch(sock, may_read)
        self._epoll.register(sock.fileno(), _EDGES)
        self._watches[sock.fileno()] = watch
        return watch

    def close(self, watch: Watch) -> None:
        """Close the socket, which takes it out of the set, and call nothing for it again. (The
        loop must never have watched it: uvloop keeps the watch of a descriptor closed under
        it, and the next socket given that number would never be reported ready.)"""
        watch.on_readable = watch.on_writable = _ignore
        fd = watch.sock.fileno()
        if fd >= 0:
            if self._watches.get(fd) is watch:
                del self._watches[fd]
            watch.sock.close()

    def shutdown(self) -> None:
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()

    def _dispatch(self) -> None:
        """Hand each event to its socket's watch. A callback that fails costs its connection,
        never the other events of the batch (an edge-triggered event is not delivered again)."""
        watches = self._watches
        for fd, events in self._epoll.poll(0):
            watch = watches.get(fd)
            if watch is None:
                continue
            try:
                if events & _READ:
                    watch.may_read = True
                    watch.on_readable()
                if events & _WRITE:
                    watch.on_writable()  # (a no-op when the reader closed it)
            except Exception:  # noqa: BLE001 - one connection must never take the others down
                log.exception("a readiness callback failed; its connection is closed")
                self.close(watch)
