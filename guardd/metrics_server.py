"""The metrics endpoint: Prometheus's text format over HTTP/1.1, served on the loop, bounded.

prometheus_client's own server took a thread per connection and waited for a request without
end: an agent that could reach the port held 4,000 connections open with half a request each,
took every file descriptor guardd had, and its SOCKS listener stopped accepting (attack pass).
This one holds at most `MAX_CONNECTIONS` connections, `MAX_PER_CLIENT` of them from one client
(its loopback kin together, as everywhere); one more is closed unanswered. Each connection gets
`TIMEOUT` seconds for its request head (`HEAD_CAP` bytes at most, read by h11) and for taking
its answer, and one answer: `GET /metrics` (or `/`, HEAD too) the registry's text, another path
404, another method 405, anything h11 refuses 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from guardd.ratelimit import ClientCounts
from guardd.stream import answers

MAX_CONNECTIONS = 64
MAX_PER_CLIENT = 4
TIMEOUT = 10.0
HEAD_CAP = 8192
#: The paths the text is served at (the sidecar's probe asks for /metrics).
_PATHS = frozenset({b"/metrics", b"/"})


class MetricsServer:
    """Serves `registry` on a listening socket."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.open = ClientCounts()
        self._total = 0

    async def start(self, sock: socket.socket) -> asyncio.Server:
        return await asyncio.start_server(self._serve, sock=sock, limit=HEAD_CAP)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else ""
        if self._total >= MAX_CONNECTIONS or self.open[client] >= MAX_PER_CLIENT:
            writer.transport.abort()
            return
        self._total += 1
        self.open.add(client)
        try:
            async with asyncio.timeout(TIMEOUT):
                writer.write(await self._answer(reader))
                await writer.drain()
            writer.close()
        except (TimeoutError, OSError):
            writer.transport.abort()
        finally:
            self._total -= 1
            self.open.remove(client)

    async def _answer(self, reader: asyncio.StreamReader) -> bytes:
        """The response to the connection's first request."""
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_CAP)
        event: object = h11.NEED_DATA
        with contextlib.suppress(h11.RemoteProtocolError):
            while event is h11.NEED_DATA:
                parser.receive_data(await reader.read(HEAD_CAP))
                event = parser.next_event()
        if not isinstance(event, h11.Request):
            return answers.answer(400, "a malformed request")
        if event.method not in (b"GET", b"HEAD"):
            return answers.answer(405, "only GET and HEAD", extra=(("Allow", "GET, HEAD"),))
        if event.target.partition(b"?")[0] not in _PATHS:
            return answers.answer(404, "the metrics are at /metrics")
        body = generate_latest(self.registry)
        head = (f"HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE_LATEST}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        return head if event.method == b"HEAD" else head + body
