"""The TCP acceptor every proxy listener shares: bind, accept, connection caps, tasks, drain.

A connection is refused at accept, recorded with why, and closed, when its source is
not in `clients`, when it is one of guardd's own outbound connections come back (a loop through
a NAT or a forward: `Guard.comes_back`), when its client, found over its buffer budget lately,
opened its few new connections since the last measure (`memory.Overdrawn`), or when every
slot, or its client's share of them, is taken. A listener whose protocol can say why before
any request (HTTP: a 403 or 503) gives `refused_answer`; it is sent once the refusal's record
is on disk, never to a loop. A refusal's
work is charged to its client's CPU share (`shares`), and a client that owes is refused without
a word, its record folded with the flush's others (attack pass 20: connecting and resetting past
its cap, a client cost 45 us a refusal, uncharged, and a write of its own each). The others
are served each in a task of their own by the listener's `serve`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from guardd.addr import counted_as
from guardd.errors import AuditUnavailableError
from guardd.guard import LOOP, NOT_A_CLIENT, Guard, Verdict
from guardd.net import Endpoint, arrived_at, bind_socket, close_watched
from guardd.ratelimit import ClientCounts
from guardd.shares import CpuShares
from guardd.stream.deadlines import Deadlines
from guardd.stream.memory import Overdrawn

log = logging.getLogger("guardd.acceptor")

#: Connections accepted per readiness of a listening socket: fair to the rest of the loop.
ACCEPT_BATCH = 64
#: Seconds accepting pauses when the process is out of descriptors (as asyncio's servers do):
#: the listening socket stays readable, and accepting at once would spin.
ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: What a refused connection costs besides the code timed: its accept and its close.
REFUSAL_COST = 20e-6


class Acceptor:
    """Accepts one listener's connections on one or more sockets."""

    def __init__(self, guard: Guard, listener: str,
                 serve: Callable[[socket.socket, str, int], Coroutine[Any, Any, None]],
                 client_allowed: Callable[[str], bool], max_connections: int,
                 max_per_client: int, deadlines: Deadlines,
                 refused_answer: Callable[[str, int | None], bytes] | None = None,
                 shares: CpuShares | None = None,
                 refused_target: Callable[[socket.socket], str | None] | None = None,
                 overdrawn: Overdrawn | None = None) -> None:
        self.guard = guard
        #: The clients over their buffer budget, refused until they are within it.
        self.overdrawn = overdrawn
        #: The clients' CPU shares, charged what refusing them costs.
        self.shares = shares
        #: What a refused connection is told (from why, and the record's number), if anything.
        self.refused_answer = refused_answer
        #: Where a refused connection was going, for its record, when the listener knows.
        self.refused_target = refused_target
        self.listener = listener
        self.serve = serve
        self.client_allowed = client_allowed
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        self.per_client = ClientCounts()
        self._sockets: list[socket.socket] = []
        self._rejected = guard.metrics.connections_rejected.counter(listener)
        self.deadlines = deadlines
        #: Connections not yet past their handshake (oldest first) -> their client and socket:
        #: when every slot is taken, the oldest of them gives its slot up (see `_evict`).
        self._unsettled: dict[asyncio.Task[None], tuple[str, socket.socket]] = {}
        #: Accepting is paused (out of descriptors), and whether that was logged this episode.
        self._paused = False
        self._pause_logged = False

    def listen(self, endpoint: Endpoint) -> Endpoint:
        """Bind and start accepting; returns the bound endpoint (port 0 picks a free one)."""
        sock = bind_socket(endpoint, socket.SOCK_STREAM)
        self._sockets.append(sock)
        self.loop.add_reader(sock.fileno(), self._accept, sock)
        bound = Endpoint(endpoint.host, sock.getsockname()[1])
        self.guard.own_sockets.add((bound.host, bound.port))
        return bound

    def close(self) -> None:
        """Stop accepting; connections in flight are cancelled by `drain`."""
        for sock in self._sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

    async def drain(self, timeout: float) -> None:
        """Give the connections in flight `timeout` seconds, then cancel the rest."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout)
        for task in list(self.tasks):
            task.cancel()

    def _accept(self, listening: socket.socket) -> None:
        if self._paused:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = listening.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._pause(listening, exc)
                else:
                    log.warning("%s: accept failed: %s", self.listener, exc)
                return
            self._pause_logged = False  # the episode is over
            self.admit(conn, addr[0], addr[1])

    def _pause(self, listening: socket.socket, exc: OSError) -> None:
        """Out of descriptors: the connections waiting in the backlog wait on (they are not
        refused); accepting resumes after `ACCEPT_RETRY_DELAY`, once a descriptor may be free.
        Logged once an episode, not once an attempt."""
        if not self._pause_logged:
            self._pause_logged = True
            log.warning("%s: out of file descriptors (%s): accepting pauses %gs at a time until "
                        "connections close", self.listener, exc.strerror, ACCEPT_RETRY_DELAY)
        self._paused = True
        self.loop.remove_reader(listening.fileno())
        self.loop.call_later(ACCEPT_RETRY_DELAY, self._resume, listening)

    def _resume(self, listening: socket.socket) -> None:
        self._paused = False
        if listening in self._sockets:  # not closed meanwhile
            self.loop.add_reader(listening.fileno(), self._accept, listening)

    def admit(self, conn: socket.socket, client: str, port: int) -> None:
        """Serve `conn` from `client`:`port` in a task, or record why not and close it."""
        started = time.perf_counter()
        refusal = self._refusal(conn, client, port)
        if refusal:
            self._rejected()
            verdict = self.guard.refusal(self.listener, refusal, target=self._target(conn))
            shares = self.shares if refusal not in (LOOP, NOT_A_CLIENT) else None
            owes = shares is not None and shares.wait(counted_as(client)) > 0
            if self.refused_answer is None or refusal == LOOP or owes:
                # Closed at once, not after the flush: a close tells nothing and grants
                # nothing, and held while the trail is down it would hold a descriptor.
                self.guard.commit(verdict, client)
            else:
                self._answer_refused(conn, client, refusal, verdict)
            conn.close()
            if shares is not None:
                shares.charge(counted_as(client), time.perf_counter() - started + REFUSAL_COST)
            return
        conn.setblocking(False)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.per_client.add(client)
        task = self.loop.create_task(self.serve(conn, client, port))
        self.tasks.add(task)
        self._unsettled[task] = (client, conn)
        task.add_done_callback(functools.partial(self._done, conn, client))

    def _answer_refused(self, conn: socket.socket, client: str, refusal: str,
                        verdict: Verdict) -> None:
        """Record the refusal at once, then tell the client why in one non-blocking send (a
        short answer fits any socket buffer; one that does not is not waited for)."""
        assert self.refused_answer is not None
        try:
            number = self.guard.committed(verdict, client)
        except AuditUnavailableError:
            return  # no answer leaves unrecorded
        try:
            conn.setblocking(False)
            conn.send(self.refused_answer(refusal, number))
        except OSError:
            pass

    def _done(self, conn: socket.socket, client: str, task: asyncio.Task[None]) -> None:
        """The connection is over, however it ended (a task evicted before it ever ran
        included): its socket closes and its slots are given back, once."""
        self.tasks.discard(task)
        self._unsettled.pop(task, None)
        close_watched(self.loop, conn)
        self.per_client.remove(client)

    def settled(self) -> None:
        """The current connection finished its handshake: it is no longer the first to give
        its slot up when every slot is taken."""
        self._unsettled.pop(asyncio.current_task(self.loop), None)  # type: ignore[arg-type]

    def in_handshake(self, task: asyncio.Task[None]) -> bool:
        """Whether `task`'s connection is still in its handshake (not evicted, which records
        it)."""
        return task in self._unsettled

    def _evict(self) -> bool:
        """Every slot is taken: cut the oldest connection still in its handshake (it was given
        nothing yet), so that connections that trickle their handshake from many addresses
        cannot keep everyone else out; False when every connection is past its handshake."""
        if not self._unsettled:
            return False
        task = next(iter(self._unsettled))
        client, conn = self._unsettled.pop(task)
        self.deadlines.cut(task)
        self.guard.commit(self.guard.refusal(
            self.listener, "evicted: every connection slot was taken and it had not finished "
            "its handshake", target=self._target(conn)), client)
        self._rejected()
        return True

    def _target(self, conn: socket.socket) -> str | None:
        """Where a connection refused before its handshake ended was going, when the listener
        can tell (`refused_target`)."""
        return self.refused_target(conn) if self.refused_target is not None else None

    def _refusal(self, conn: socket.socket, client: str, port: int) -> str:
        """Why a new connection from `client` is refused at once ("" when it is not). (An
        outbound connection is registered as soon as its connect is under way, before its own
        loop back could be accepted.)"""
        if (client, port) in self.guard.outbound and self.guard.comes_back(
                (client, port), arrived_at(conn)):
            return LOOP
        if not self.client_allowed(client):
            return NOT_A_CLIENT
        if self.overdrawn is not None and not self.overdrawn.admit(client):
            return Overdrawn.REFUSAL
        if self.per_client[client] >= self.max_per_client:  # before any eviction for it
            return f"client holds {self.max_per_client} connections, its limit"
        if len(self.tasks) >= self.max_connections and not self._evict():
            return f"every connection slot is taken ({self.max_connections})"
        return ""
