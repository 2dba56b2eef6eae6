"""The metrics endpoint: Prometheus's text format over HTTP/1.1, served on the loop, bounded.

prometheus_client's own server took a thread per connection and waited for a request without
end: an agent that could reach the port held 4,000 connections open with half a request each,
took every file descriptor guardd had, and its SOCKS listener stopped accepting (attack pass).
This one holds at most `MAX_CONNECTIONS` connections, `MAX_PER_CLIENT` of them from one client
(its loopback kin together, as everywhere). A connection gets `HEAD_TIMEOUT` seconds for its
request head (`HEAD_CAP` bytes at most, read by h11), `TIMEOUT` more to take its answer, and
one answer: `GET /metrics` (or `/`, HEAD too) the registry's text, another path 404, another
method 405, anything h11 refuses 400. When a cap is reached, a newcomer takes the place of the
oldest connection (of the client's own, at its cap) still waiting for its head or its turn
(below); with none waiting, it is closed unanswered (review: four half-requests from an agent
on loopback kept a loopback scraper out, and the caps alone any scraper). A scraper asks at
once: it loses its place only to newcomers that come faster than its head, from its own client
(an agent beside it on loopback) or, with all `MAX_CONNECTIONS` places taken, from anyone. The
answer's work (a scrape lists every open descriptor: 10 ms at 10,000) is charged to the
client's CPU share, and its turn waits while that is spent, as every listener's work does
(`guardd.shares`; attack pass 51: 1,000 scrapes a second on 4 connections took the loop,
charged to no one). A scrape holds no other client back: it does not make its client one that
is active. The text is rendered at most once a `RENDER_INTERVAL` (a scrape within it gets the
last one), and each connection's own work (its accept, its streams, its task: `CONNECTION_COST`)
is charged too (session 53's attack: 3,500 connections a second, each asking once, took a
core, a scrape rendered for each and the rest charged to no one).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from guardd.addr import counted_as
from guardd.http11 import h11
from guardd.ratelimit import ClientCounts
from guardd.shares import CpuShares
from guardd.stream import answers

MAX_CONNECTIONS = 64
MAX_PER_CLIENT = 4
HEAD_TIMEOUT = 2.0
TIMEOUT = 10.0
HEAD_CAP = 8192
#: Seconds a rendered text is served again: Prometheus scrapes every 15 s, a probe every 10.
RENDER_INTERVAL = 1.0
#: What a connection costs besides the code timed (its accept, transport, streams and task,
#: their teardown: about 250 us on the 2-core VM of 2026-12-07).
CONNECTION_COST = 250e-6
#: The paths the text is served at (the sidecar's probe asks for /metrics).
_PATHS = frozenset({b"/metrics", b"/"})


class MetricsServer:
    """Serves `registry` on a listening socket, each answer at its client's CPU share."""

    def __init__(self, registry: CollectorRegistry, shares: CpuShares | None = None) -> None:
        self.registry = registry
        self.shares = shares or CpuShares()
        self.open = ClientCounts()
        self._total = 0
        #: The connections still waiting for their request heads or their turns, oldest first,
        #: by client (as `counted_as` counts it).
        self._waiting: dict[asyncio.Task[None], str] = {}
        self._evicted: set[asyncio.Task[None]] = set()
        #: The text rendered last, and when (time.monotonic()).
        self._rendered: tuple[float, bytes] = (-math.inf, b"")

    async def start(self, sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(self._serve, sock=sock, limit=HEAD_CAP)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else ""
        self.shares.charge(counted_as(client), CONNECTION_COST, active=False)
        if not self._room_for(client):
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._total += 1
        self.open.add(client)
        self._waiting[task] = counted_as(client)
        answered = False
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                request = await _request(reader)
            async with asyncio.timeout(TIMEOUT):
                key = self._waiting[task]
                await self._turn(key)
                del self._waiting[task]  # (its place no longer given up: it is answered)
                writer.write(self._answer_charged(request, key))
                await writer.drain()
            answered = True
        except (TimeoutError, OSError):
            pass
        except asyncio.CancelledError:
            if task not in self._evicted:  # (a stop: not ours to swallow)
                raise
        finally:
            if task in self._evicted:  # (its place went to the newcomer: nothing to release)
                self._evicted.discard(task)
            else:
                self._release(task, client)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    def _release(self, task: asyncio.Task[None], client: str) -> None:
        self._waiting.pop(task, None)
        self._total -= 1
        self.open.remove(client)

    def _room_for(self, client: str) -> bool:
        """Whether a connection from `client` may be served: there is room, or the place of
        the oldest connection still waiting for its head or turn (its client's own, at the
        client's cap) is handed over to it at once (review: an eviction that waited for its
        victim to end let several newcomers pick the same one, all but one refused)."""
        if self.open[client] >= MAX_PER_CLIENT:
            key = counted_as(client)
            found = next(((task, whose) for task, whose in self._waiting.items()
                          if whose == key), None)
        elif self._total >= MAX_CONNECTIONS:
            found = next(iter(self._waiting.items()), None)
        else:
            return True
        if found is None:
            return False
        victim, whose = found
        self._release(victim, whose)
        self._evicted.add(victim)
        victim.cancel()
        return True

    async def _turn(self, client: str) -> None:
        """Once `client`'s share allows an answer (meanwhile, as while it waits for its head,
        the connection gives its place up to a newcomer: review, four whole requests waiting
        kept a scraper on loopback out)."""
        while (wait := self.shares.wait(client)) > 0:
            await asyncio.sleep(wait)

    def _answer_charged(self, event: h11.Request | None, client: str) -> bytes:
        """`_answer`, charged to `client`'s share, which holds no one else back (review: a
        scrape every 15 s held a lone agent to half a core)."""
        started = time.perf_counter()
        try:
            return self._answer(event)
        finally:
            self.shares.charge(client, time.perf_counter() - started, active=False)

    def _answer(self, event: h11.Request | None) -> bytes:
        """The response to the connection's request (None: a malformed one)."""
        if event is None:
            return answers.answer(400, "a malformed request")
        if event.method not in (b"GET", b"HEAD"):
            return answers.answer(405, "only GET and HEAD", extra=(("Allow", "GET, HEAD"),))
        if event.target.partition(b"?")[0] not in _PATHS:
            return answers.answer(404, "the metrics are at /metrics")
        body = self._text()
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head if event.method == b"HEAD" else head + body


    def _text(self) -> bytes:
        """The registry's text, rendered again once the last is `RENDER_INTERVAL` old."""
        now = time.monotonic()
        at, text = self._rendered
        if now - at >= RENDER_INTERVAL:
            text = generate_latest(self.registry)
            self._rendered = (now, text)
        return text


async def _request(reader: asyncio.StreamReader) -> h11.Request | None:
    """The connection's first request head; None when it is malformed or the client closed."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_CAP)
    event: object = h11.NEED_DATA
    with contextlib.suppress(h11.RemoteProtocolError):
        while event is h11.NEED_DATA:
            parser.receive_data(await reader.read(HEAD_CAP))
            event = parser.next_event()
    return event if isinstance(event, h11.Request) else None
