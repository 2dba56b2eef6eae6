"""`SocketIO`: the tunnel's I/O (`tunnel.TunnelIO`) over real sockets, watched by the reactor.

Every socket of a proxied connection is watched by `reactor.Reactor` alone, from its first wait
to its close: the client's from the listener's first read, the destination's from its connect,
both handed to the relay's pumps when it starts. The loop never watches them (not its
`sock_connect`, which passes the address through getaddrinfo on uvloop's thread pool, nor its
`sock_sendall`), so no watch of the loop's outlives a socket.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

from guardd.addr import IPAddress
from guardd.net import RESET_ON_CLOSE, socket_queues
from guardd.stream.memory import Way
from guardd.stream.reactor import Owner, Reactor, Watch
from guardd.stream.relay import Relay
from guardd.stream.tunnel import Splice
from guardd.turns import Share

#: SO_LINGER off: a close sends the bytes still queued, then a FIN (the default).
_CLOSE_CLEANLY = struct.pack("ii", 0, 0)

#: Bytes read from a client at once.
READ_SIZE = 16 * 1024
#: Reads and sends in a row that met no wait, after which a connection lets the loop run
#: before its next, however its caller paces itself (`Tunnel._paced`): a backstop (session
#: 54's attacks: three loops of the tunnel's moved a client's bytes to a server that read
#: fast, never paced, and on loopback nothing ever waited: the loop ran nothing else).
_UNWAITED = 64


class SocketIO:
    """`TunnelIO` over non-blocking sockets, each watched through the `reactor` for its whole
    life: the client's from its first wait, the destination's from its connect, both handed to
    the relay's pumps when it starts."""

    def __init__(self, reactor: Reactor, conn: socket.socket, owner: Owner | None = None
                 ) -> None:
        self.reactor = reactor
        self.loop = reactor.loop
        self.owner = owner
        self.client = reactor.watch(conn, owner=owner)
        self.upstream: Watch | None = None
        #: The destination's error a look (`upstream_unread`) took off its socket.
        self._upstream_error: OSError | None = None
        self._unwaited = 0

    async def connect(self, ip: IPAddress, port: int,
                      under_way: Callable[[tuple[str, int]], None]) -> socket.socket:
        # Non-blocking from its creation: no ioctl for it. (Not the loop's `sock_connect`:
        # uvloop's passes the address through getaddrinfo on its thread pool.)
        sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                             socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:  # (not readable yet: its events will say)
            watch = self.reactor.watch(sock, may_read=False, owner=self.owner)
        except BaseException:
            sock.close()
            raise
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                sock.connect((str(ip), port))
            except (BlockingIOError, InterruptedError):  # in progress
                under_way(sock.getsockname()[:2])
                await watch.writable(self.loop)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, os.strerror(error))
            else:
                under_way(sock.getsockname()[:2])
        except BaseException:
            self.reactor.close(watch)
            raise
        self.upstream = watch
        return sock

    async def receive(self) -> bytes:
        """The client's bytes at once when some are queued, else when they come."""
        return await self._receive(self.client)

    async def receive_upstream(self) -> bytes:
        assert self.upstream is not None
        error, self._upstream_error = self._upstream_error, None
        if error is not None:
            raise error
        return await self._receive(self.upstream)

    async def upstream_unread(self) -> bool:
        assert self.upstream is not None
        if self._unwaited >= _UNWAITED:  # (the yield the next send would take, taken before
            await self._let_run()        # the look: none between it and the send, review)
        try:
            self.upstream.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:  # (a reset, which the look takes off the socket: the next
            self._upstream_error = exc  # read is told, not left to read a clean close)
        return True  # (a byte, the close, or the reset)

    async def _receive(self, watch: Watch) -> bytes:
        self._unwaited += 1
        if self._unwaited > _UNWAITED:
            await self._let_run()
        while True:
            try:
                return watch.sock.recv(READ_SIZE)
            except (BlockingIOError, InterruptedError):
                self._unwaited = 0
                await watch.readable(self.loop)

    async def _let_run(self) -> None:
        """Before a read or a send past `_UNWAITED` of them that met no wait: let the loop run
        (not after one: a deadline that cancels the caller then would lose what it read)."""
        self._unwaited = 0
        await asyncio.sleep(0)

    async def send(self, data: bytes) -> None:
        await self._send_all(self.client, data)

    async def forward(self, upstream: socket.socket, data: bytes) -> None:
        assert self.upstream is not None and self.upstream.sock is upstream
        await self._send_all(self.upstream, data)

    async def _send_all(self, watch: Watch, data: bytes) -> None:
        """Send all of `data`, waiting for the socket's writable events when it is full (not
        the loop's `sock_sendall`: the reactor alone watches these sockets)."""
        self._unwaited += 1
        if self._unwaited > _UNWAITED:
            await self._let_run()
        view = memoryview(data)
        while view:
            try:
                sent = watch.sock.send(view)
            except (BlockingIOError, InterruptedError):
                self._unwaited = 0
                await watch.writable(self.loop)
                continue
            watch.written += sent
            view = view[sent:]

    def splice(self, upstream: socket.socket, idle_timeout: float, share: Share,
               on_close: Callable[[Relay], None]) -> Splice:
        assert self.upstream is not None and self.upstream.sock is upstream
        return Relay(self.reactor, self.client, self.upstream, idle_timeout, share, on_close)

    def close_upstream(self) -> None:
        self._upstream_error = None
        if self.upstream is not None:
            self.reactor.close(self.upstream)
            self.upstream = None

    def end_sending(self) -> None:
        try:
            self.client.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # (the client is gone: nothing to end)

    def aim(self, target: str) -> None:
        if self.owner is not None:
            self.owner.target = target

    def upstream_resets(self, armed: bool) -> None:
        if self.upstream is not None and self.upstream.sock.fileno() != -1:
            self.upstream.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                          RESET_ON_CLOSE if armed else _CLOSE_CLEANLY)

    def client_resets(self) -> None:
        """Reset the client's connection at its close, not end it cleanly: what the server's
        reset cut short must not look whole to it."""
        if self.client.sock.fileno() != -1:
            self.client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)

    def ways(self) -> tuple[Way, Way]:
        client_received, client_queued = socket_queues(self.client.sock)
        upstream = self.upstream
        received, queued = (0, 0) if upstream is None else socket_queues(upstream.sock)
        # (a queue's memory counts its buffers' overhead too: what was taken, less, if anything)
        return (Way(client_received + queued,
                    max(0, upstream.written - queued) if upstream is not None else 0),
                Way(received + client_queued, max(0, self.client.written - client_queued)))

    def close(self) -> None:
        self.close_upstream()
        self.reactor.close(self.client)
