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

Closing. A socket closed while bytes are still queued for its peer would be the kernel's
orphan, its queue kept (a 4 MiB send buffer to a server that stopped reading, for two minutes
on loopback) where nothing counts it: a client could leave orphans faster than they go
(attack pass, 2026-12-06: 769 MiB in 192 of them, its live connections within their budget).
So such a socket is shut down for writing (its FIN follows what is queued, as a close would
send it) and kept `closing`, counted against its owner's budget (`memory`), until its queue
is taken; it is reset when its peer takes nothing for `CLOSING_TIMEOUT` (a slow reader's tail
still arrives whole), or sends bytes (as a close answers them). Each holds a descriptor, so
they are few: as many as the proxies' connection slots (each slot's descriptors count one),
`MAX_CLOSING_PER_CLIENT` of one client; past either, the oldest of the client keeping the most
is reset (re-attack: 20,000 tails of one client's, a few hundred bytes each, took every
descriptor guardd had, and other clients' connects failed).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace

from guardd.addr import counted_as
from guardd.net import RESET_ON_CLOSE, socket_queues

log = logging.getLogger("guardd.reactor")
#: Seconds a closed socket may go without its peer taking any of what is still queued for it
#: (`Reactor.close`).
CLOSING_TIMEOUT = 60.0
#: Closed sockets kept at most for one client (`Reactor.close`).
MAX_CLOSING_PER_CLIENT = 64
#: What of a peer's bytes guardd did not read is read and dropped at a close, at most, and
#: a read at a time.
DROPPED_AT_CLOSE = 64 * 1024
_DROP_READ = 16 * 1024


@dataclass(slots=True)
class Owner:
    """Whose a socket is, for the budget of what it holds (`memory`) and the record of its
    cut: its listener and client, and the target the connection asked last (once asked)."""

    listener: str
    client: str
    target: str | None = None


_EDGES = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
#: Events that wake a reader (a hang-up or an error reads as EOF or as the error) and a writer.
_READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
_WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR


def _ignore() -> None:
    """An event nobody waits for (its waiter will try its call before it waits)."""


class Watch:
    """One socket in the set: what its next readable and writable events call. Its owner
    changes as the connection goes on (a listener waiting for bytes, a relay's pump)."""

    __slots__ = ("sock", "may_read", "on_readable", "on_writable", "owner", "written")

    def __init__(self, sock: socket.socket, may_read: bool, owner: Owner | None = None) -> None:
        self.sock = sock
        #: Whose it is: a socket of nobody's is closed at once, whatever it holds.
        self.owner = owner
        #: The socket may have bytes (or EOF) to read: set by every readable event, cleared
        #: by a reader that met EAGAIN.
        self.may_read = may_read
        self.on_readable: Callable[[], None] = _ignore
        self.on_writable: Callable[[], None] = _ignore
        #: Bytes guardd wrote into the socket so far: less its send queue, what the peer took
        #: (`memory.Way`).
        self.written = 0

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


@dataclass(slots=True)
class Closing:
    """A closed socket still handing its peer what was queued (`Reactor.close`)."""

    sock: socket.socket
    owner: Owner
    #: What its queue held when last looked at, and when the peer last took some of it.
    queued: int
    moved: float


class Reactor:
    """The set of one loop's proxied sockets (`max_closing`: closed ones kept at most)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_closing: int = 1024,
                 on_cut: Callable[[Owner, str], None] | None = None) -> None:
        self.loop = loop
        #: Told of each closed socket reset for their number (its owner, why), to record it.
        self.on_cut = on_cut
        self._epoll = select.epoll()
        self._watches: dict[int, Watch] = {}
        #: Closed sockets whose peers have not taken what was queued yet, by descriptor, and
        #: those of each client (`counted_as`), oldest first.
        self._closing: dict[int, Closing] = {}
        self._closing_of: dict[str, dict[int, None]] = {}
        self.max_closing = max_closing
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, sock: socket.socket, may_read: bool = True, owner: Owner | None = None
              ) -> Watch:
        """Add `sock` (non-blocking) to the set; `close` takes it out. `may_read`: whether it
        may already have bytes (not a socket still to connect); `owner`: whose it is."""
        watch = Watch(sock, may_read, owner)
        self._epoll.register(sock.fileno(), _EDGES)
        self._watches[sock.fileno()] = watch
        return watch

    def close(self, watch: Watch) -> None:
        """Close the socket, which takes it out of the set, and call nothing for it again;
        one of an owner's with bytes still queued for its peer is kept `closing` till they go.
        (The loop must never have watched it: uvloop keeps the watch of a descriptor closed
        under it, and the next socket given that number would never be reported ready.)"""
        watch.on_readable = watch.on_writable = _ignore
        sock = watch.sock
        fd = sock.fileno()
        if fd < 0:
            return
        if self._watches.get(fd) is watch:
            del self._watches[fd]
        owner = watch.owner
        queued = _still_sending(sock) if owner is not None else 0
        if owner is None or not queued:
            sock.close()
            return
        self._epoll.unregister(fd)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # (the peer is gone: the next look closes it)
            pass
        # Its descriptor is the reactor's now: the socket object its owners hold reads as
        # closed, and closing it again (as the acceptor does) closes nothing.
        kept = socket.socket(sock.family, sock.type, sock.proto, sock.detach())
        # (a copy: the connection's next origin re-aims its owner, last attack)
        self._closing[fd] = Closing(kept, replace(owner), queued, self.loop.time())
        client = counted_as(owner.client)
        mine = self._closing_of.setdefault(client, {})
        mine[fd] = None
        if len(mine) > MAX_CLOSING_PER_CLIENT:
            self._cut_for_number(next(iter(mine)), f"{MAX_CLOSING_PER_CLIENT} of the client's")
        if len(self._closing) > self.max_closing:
            busiest: dict[int, None] = max(self._closing_of.values(), key=len)
            self._cut_for_number(next(iter(busiest)), f"{self.max_closing} in all, the most "
                                 "of them this client's")

    def _cut_for_number(self, fd: int, how_many: str) -> None:
        self.cut(fd, f"cut: the oldest of the {how_many} sockets kept sending what their "
                 "peers had not taken yet (a descriptor each)")

    def cut(self, fd: int, why: str) -> None:
        """Reset the closed socket `fd`, its owner's cut told (`on_cut`) with `why`."""
        owner = self._closing[fd].owner
        self.drop(fd)
        if self.on_cut is not None:
            self.on_cut(owner, f"{why} (a connection that had ended)")

    def closing(self) -> list[tuple[int, Owner, int]]:
        """The closed sockets still sending, each with its owner and the bytes it holds; first
        those done are closed, and those whose peers took nothing for `CLOSING_TIMEOUT`, or
        sent bytes since (which a close answers with a reset), are reset."""
        now = self.loop.time()
        held = []
        for fd, closing in list(self._closing.items()):
            received, queued = socket_queues(closing.sock)
            if queued < closing.queued:
                closing.queued, closing.moved = queued, now
            if received or not queued or now - closing.moved >= CLOSING_TIMEOUT:
                self.drop(fd, reset=bool(received or queued))
            else:
                held.append((fd, closing.owner, queued))
        return held

    def drop(self, fd: int, reset: bool = True) -> None:
        """Close the closing socket `fd`, with a reset: what it still held goes nowhere."""
        closing = self._closing.pop(fd)
        client = counted_as(closing.owner.client)
        mine = self._closing_of[client]
        del mine[fd]
        if not mine:
            del self._closing_of[client]
        if reset:
            closing.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        closing.sock.close()

    def shutdown(self) -> None:
        self.loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        for closing in self._closing.values():  # (the kernel's now, as guardd ends)
            closing.sock.close()
        self._closing.clear()
        self._closing_of.clear()

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


def _drop_unread(sock: socket.socket) -> None:
    """Read and drop what the peer sent that guardd did not read (`DROPPED_AT_CLOSE` at
    most, what is there now)."""
    left = DROPPED_AT_CLOSE
    while left > 0:
        try:
            dropped = len(sock.recv(min(left, _DROP_READ)))
        except OSError:  # (nothing more now, or gone)
            return
        if not dropped:
            return
        left -= dropped


def _still_sending(sock: socket.socket) -> int:
    """The bytes a close would leave queued for `sock`'s peer in an orphan: none when it has
    bytes unread (the close resets it), or when it is set to reset at its close. What the peer
    sent and guardd did not read is dropped first: a close with bytes unread is a reset, and
    a reset may drop what guardd sent just before it, still queued (a flaky test: a hello
    refused from its first 16 KiB, 5 bytes left unread, and the client read no alert). A
    socket armed to reset (SO_LINGER 0) still does."""
    received, queued = socket_queues(sock)
    if received:
        _drop_unread(sock)
        received, queued = socket_queues(sock)
    if not queued or received or sock.getsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, len(RESET_ON_CLOSE)) == RESET_ON_CLOSE:
        return 0
    return queued
