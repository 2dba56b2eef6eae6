"""The metrics endpoint: bounded in connections, per client and in time."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry, Counter

from guardd import metrics_server, ratelimit
from guardd.metrics_server import MAX_PER_CLIENT, MetricsServer
from guardd.net import Endpoint, bind_socket


@pytest.fixture
async def served() -> AsyncIterator[tuple[MetricsServer, int]]:
    registry = CollectorRegistry()
    Counter("guardd_test_things", "Things", registry=registry).inc(3)
    server = MetricsServer(registry)
    sock = bind_socket(Endpoint("127.0.0.1", 0), socket.SOCK_STREAM)
    listening = await server.start(sock)
    yield server, sock.getsockname()[1]
    listening.close()


async def ask(port: int, request: bytes, source: str = "127.0.0.1") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    writer.write(request)
    try:
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


async def closed_unanswered(reader: asyncio.StreamReader) -> bool:
    """Whether the server ended the connection (closed or reset) within 2 s, saying nothing."""
    try:
        async with asyncio.timeout(2):
            return await reader.read() == b""
    except ConnectionResetError:
        return True


async def test_it_serves_the_registry_and_refuses_the_rest(
        served: tuple[MetricsServer, int]) -> None:
    _, port = served
    answer = await ask(port, b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"guardd_test_things_total 3.0" in answer
    head = await ask(port, b"HEAD /metrics HTTP/1.1\r\nHost: g\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n")
    assert (await ask(port, b"GET /x HTTP/1.1\r\nHost: g\r\n\r\n")).startswith(b"HTTP/1.1 404")
    assert (await ask(port, b"POST /metrics HTTP/1.1\r\nHost: g\r\nContent-Length: 0\r\n\r\n")
            ).startswith(b"HTTP/1.1 405")
    assert (await ask(port, b"\x16\x03\x01junk\r\n\r\n")).startswith(b"HTTP/1.1 400")


async def test_half_requests_hold_their_places_only_until_someone_asks(
        served: tuple[MetricsServer, int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Attack pass: prometheus_client's server gave each connection a thread and waited for
    its request without end: 4,080 connections with half a request each took every file
    descriptor guardd had. Review: with caps alone, four half-requests from an agent on
    loopback then kept a loopback scraper out, and 64 from 16 addresses every scraper."""
    monkeypatch.setattr(metrics_server, "HEAD_TIMEOUT", 0.5)
    server, port = served
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_PER_CLIENT)]
    for _, writer in held:
        writer.write(b"GET /metrics HTTP/1.1\r\n")
    await asyncio.sleep(0.05)
    answer = await ask(port, b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n", "127.0.0.2")
    assert b"guardd_test_things_total" in answer  # (127.0.0.2 is loopback kin: at the cap)
    assert await closed_unanswered(held[0][0])  # the oldest half-request gave its place up
    for reader, _ in held[1:]:
        assert await closed_unanswered(reader)  # and the head timeout ends the rest
    assert len(server.open) == 0 and not server._waiting
    assert "Exception" not in caplog.text
    for _, writer in held:
        writer.close()


async def test_every_place_taken_by_half_requests_is_given_up_to_a_newcomer(
        served: tuple[MetricsServer, int], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_server, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(ratelimit, "counted_as", lambda client: client)
    monkeypatch.setattr(metrics_server, "counted_as", lambda client: client)
    _, port = served
    held = [await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{n}", 0))
            for n in (3, 4, 5)]
    await asyncio.sleep(0.05)
    answer = await ask(port, b"GET /metrics HTTP/1.1\r\nHost: g\r\n\r\n", "127.0.0.6")
    assert b"guardd_test_things_total" in answer
    assert await closed_unanswered(held[0][0])
    for _, writer in held:
        writer.close()


async def test_a_place_is_handed_over_at_once(
        served: tuple[MetricsServer, int], caplog: pytest.LogCaptureFixture) -> None:
    """Review: an eviction waited for its victim to end, so newcomers in the same loop turn
    picked the same one, and all but the first were refused with places still to give (36 of
    94 scrapes under a flood). The place is now free before `_room_for` returns, and the next
    newcomer of that turn finds the next victim."""
    server, port = served
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_PER_CLIENT)]
    await asyncio.sleep(0.05)
    victims = list(server._waiting)
    for n in range(MAX_PER_CLIENT):
        assert server._room_for("127.0.0.1") is True
        assert victims[n] not in server._waiting  # (its place is free already)
        server._total += 1  # (what `_serve` does next for the newcomer, in the same turn)
        server.open.add("127.0.0.1")
    await asyncio.sleep(0.05)
    assert all(task.done() and not task.cancelled() for task in victims)
    assert (server._total, server.open["127.0.0.1"]) == (MAX_PER_CLIENT, MAX_PER_CLIENT)
    assert "Exception" not in caplog.text
    for _, writer in held:
        writer.close()
