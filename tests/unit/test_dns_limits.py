"""Resource bounds of the DNS guard (issue 8, hole 11): what one client can hold of the in-flight
forwards, of the DNS-over-TCP slots and buffers, and what one upstream answer may cost.

The TCP tests run a real `TCPListener` on 127.0.0.1 (clients bind other 127/8 addresses to be
other clients); nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from pathlib import Path
from collections.abc import AsyncIterator, Callable
from typing import Any
from unittest.mock import AsyncMock

import pytest
from dnslib import EDNS0, RCODE, RR, DNSRecord

from guardd import ratelimit
from guardd.dns import server, wire
from guardd.dns.cache import AnswerCache
from guardd.addr import count_host_as_loopback, counted_as, on_host
from guardd.dns.server import (OUTSIDE_CLIENTS, QUERY_COST, UDP_HELD_PER_CLIENT, UDP_HELD_SIZE,
                               DNSService, InFlight, TCPConnection, TCPListener, UDPListener)
from guardd.guard import Guard
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.shares import CpuShares
from guardd.turns import Turns
from tests.unit.fakes import ListAudit, OwedShares, SpentShares
from tests.unit.test_dns_service import POLICY, ede_of, packet


class HeldUpstream:
    """Answers every query with `records` (zone text per name, `{name}` filled in), but only
    once `release` is set: an upstream that never answers until the test says so."""

    def __init__(self, records: str = "{name} 60 A 192.0.2.1", held: bool = True) -> None:
        self.records = records
        self.release = asyncio.Event()
        if not held:
            self.release.set()
        self.asked: list[str] = []

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: object = None, client: str = "") -> bytes:
        request = DNSRecord.parse(query)
        name = str(request.q.qname).rstrip(".")
        self.asked.append(name)
        await self.release.wait()
        reply = request.reply()
        for record in RR.fromZone(self.records.format(name=name)):
            reply.add_answer(record)
        return bytes(reply.pack())


def make(upstream: HeldUpstream, client_allowed: Callable[[str], bool] = lambda c: True
         ) -> tuple[DNSService, ListAudit]:
    audit = ListAudit()
    guard = Guard(Policy.from_text(POLICY), audit, Metrics(process=False))
    return DNSService(guard, AnswerCache(), upstream, guard.metrics, client_allowed), audit


# --- in-flight forwards ---------------------------------------------------------------------------


@pytest.mark.parametrize("started", [False, True], ids=["burst", "started"])
async def test_one_client_cannot_take_every_forward(monkeypatch: pytest.MonkeyPatch,
                                                    started: bool) -> None:
    monkeypatch.setattr(server, "MAX_FORWARDS", 8)
    monkeypatch.setattr(server, "CLIENT_MAX_FORWARDS", 3)
    upstream = HeldUpstream()
    service, audit = make(upstream)
    tasks = []
    for index in range(3):
        pending = service.answer(packet(f"n{index}.example.com", index), "10.0.0.1", False)
        assert not isinstance(pending, bytes)
        tasks.append(asyncio.ensure_future(pending))  # type: ignore[arg-type]
        if started:
            await asyncio.sleep(0)
    over = service.answer(packet("n3.example.com", 3), "10.0.0.1", False)
    assert isinstance(over, bytes)
    reply = DNSRecord.parse(over)
    assert reply.header.rcode == RCODE.SERVFAIL
    assert ede_of(reply) == (14, "too many queries in flight from this client")
    assert (audit.records[-1]["client"], audit.records[-1]["effect"]) == ("10.0.0.1", "deny")
    assert "in flight from this client (3)" in str(audit.records[-1]["reason"])
    other = service.answer(packet("n4.example.com", 4), "10.0.0.2", False)
    assert not isinstance(other, bytes)  # another client is still served
    tasks.append(asyncio.ensure_future(other))  # type: ignore[arg-type]
    upstream.release.set()
    for reply_bytes in await asyncio.gather(*tasks):
        assert DNSRecord.parse(reply_bytes).header.rcode == RCODE.NOERROR
    assert service.forwards == 0
    again = service.answer(packet("n5.example.com", 5), "10.0.0.1", False)
    assert not isinstance(again, bytes)
    await again  # type: ignore[misc]


async def test_guardds_own_lookups_for_a_client_count_against_its_share(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass: lookups guardd makes for a client's connects took forwards past its share
    (and past the whole cap), bounded only by the client's connections."""
    monkeypatch.setattr(server, "MAX_FORWARDS", 8)
    monkeypatch.setattr(server, "CLIENT_MAX_FORWARDS", 4)
    upstream = HeldUpstream()
    service, _ = make(upstream)
    lookups = [asyncio.ensure_future(service.lookup(f"n{index}.example.com", "10.0.0.1"))
               for index in range(4)]  # (AAAA and A each: 8 queries)
    for _ in range(5):
        await asyncio.sleep(0)
    assert service.forwards == 4 and len(upstream.asked) == 4
    addresses, why, _ = await service.lookup("more.example.com", "10.0.0.1")
    assert (addresses, len(upstream.asked)) == ([], 4)
    assert "too many queries in flight from this client (4)" in why
    upstream.release.set()
    await asyncio.gather(*lookups)
    assert service.forwards == 0


async def test_a_client_under_several_principals_holds_one_count_in_flight(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Session 57's review of the fair upstream sockets: each principal's service counted its
    own forwards, so a client whose logins map it under several principals held each one's
    share, and the total was each service's alone. The daemon's services share one count."""
    monkeypatch.setattr(server, "CLIENT_MAX_FORWARDS", 4)
    upstream = HeldUpstream()
    in_flight = InFlight()
    services = [DNSService(Guard(Policy.from_text(POLICY), ListAudit(), Metrics(process=False)),
                           AnswerCache(), upstream, Metrics(process=False), lambda c: True,
                           in_flight=in_flight) for _ in range(2)]
    lookups = [asyncio.ensure_future(services[0].lookup(f"n{index}.example.com", "10.0.0.1"))
               for index in range(2)]  # (AAAA and A each: the client's 4)
    for _ in range(5):
        await asyncio.sleep(0)
    addresses, why, _ = await asyncio.wait_for(
        services[1].lookup("more.example.com", "10.0.0.1"), 2)  # (refused at once)
    assert addresses == [] and "too many queries in flight from this client (4)" in why
    assert services[1].forwards == 4 and len(upstream.asked) == 4
    upstream.release.set()
    await asyncio.gather(*lookups)
    assert services[0].forwards == services[1].forwards == 0


async def test_the_global_limit_still_holds_and_is_audited(monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setattr(server, "MAX_FORWARDS", 4)
    monkeypatch.setattr(server, "CLIENT_MAX_FORWARDS", 2)
    upstream = HeldUpstream()
    service, audit = make(upstream)
    tasks = [asyncio.ensure_future(service.answer(packet(f"n{i}.example.com", i),  # type: ignore
                                                  f"10.0.0.{i // 2}", False)) for i in range(4)]
    full = DNSRecord.parse(service.answer(packet("late.example.com", 9), "10.0.0.9", False))
    assert full.header.rcode == RCODE.SERVFAIL
    assert ede_of(full) == (14, "too many queries in flight")
    assert audit.records[-1]["effect"] == "deny" and audit.records[-1]["client"] == "10.0.0.9"
    upstream.release.set()
    await asyncio.gather(*tasks)
    assert service.forwards == 0


def test_per_client_limit_leaves_room_for_other_clients() -> None:
    assert server.CLIENT_MAX_FORWARDS * 8 <= server.MAX_FORWARDS


# --- what one upstream answer may cost ------------------------------------------------------------


async def test_an_answer_with_too_many_records_is_refused_before_it_is_vetted() -> None:
    many = "\n".join(f"{{name}} 60 A 10.{i >> 8}.{i & 255}.1" for i in range(4000))
    upstream = HeldUpstream(many, held=False)
    service, audit = make(upstream)
    vetted: list[object] = []
    policy = service.guard.policy
    real_vet = policy.vet_address
    policy.vet_address = lambda *args: vetted.append(args) or real_vet(*args)  # type: ignore
    query = packet("big.example.com", 1)
    built = await upstream.resolve(query)  # (the upstream's own work, before the clock: under
    upstream.resolve = AsyncMock(return_value=built)  # load it took a second by itself)
    started = time.perf_counter()
    reply = DNSRecord.parse(await service.answer(query, "10.0.0.1", True))  # type: ignore
    elapsed = time.perf_counter() - started
    assert reply.header.rcode == RCODE.SERVFAIL and ede_of(reply)[0] == 24
    assert vetted == []
    assert "4000 records" in str(audit.records[-1]["outcome"])
    assert len(service.cache) == 0
    assert elapsed < 1.0  # parsing 4,000 records took ~0.2 s; counting them takes nothing


async def test_an_answer_at_the_record_limit_is_served() -> None:
    count = server.wire.MAX_RESPONSE_RECORDS - 1  # one more for the OPT record
    records = "\n".join(f"{{name}} 60 A 192.0.2.{i % 254 + 1}" for i in range(count))
    service, _ = make(HeldUpstream(records, held=False))
    query = DNSRecord.question("big.example.com")
    query.add_ar(EDNS0(udp_len=1232))
    result = service.answer(bytes(query.pack()), "10.0.0.1", True)
    reply = DNSRecord.parse(await result)  # type: ignore[misc]
    assert len(reply.rr) == count


# --- DNS over TCP ---------------------------------------------------------------------------------


class Immediate:
    """An audit writer whose flush is instant."""

    def after_flush(self, callback: Callable[..., object], *args: object,
                    withheld: Callable[[], object] | None = None) -> None:
        callback(*args)


class AtTurnsEnd:
    """An audit writer whose flush runs once the loop turn's work is done, as the real one's
    does: what a turn answered is all sent then."""

    def after_flush(self, callback: Callable[..., object], *args: object,
                    withheld: Callable[[], object] | None = None) -> None:
        asyncio.get_running_loop().call_soon(callback, *args)


@pytest.fixture
async def tcp() -> AsyncIterator[Callable[..., Any]]:
    """start(service, idle_timeout) -> (listener, port): a listener on 127.0.0.1."""
    servers: list[asyncio.Server] = []

    async def start(service: DNSService, idle: float = 5.0, shares: CpuShares | None = None,
                    audit: Immediate | AtTurnsEnd | None = None) -> tuple[TCPListener, int]:
        listener = TCPListener(service, audit or Immediate(), idle, shares=shares)
        srv = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
        servers.append(srv)
        return listener, srv.sockets[0].getsockname()[1]

    yield start
    for srv in servers:
        srv.close()


async def connect(port: int, source: str = "127.0.0.1"
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closed the stream (EOF or reset) within `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


async def ask_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str,
                  ident: int = 1) -> DNSRecord:
    writer.write(wire.tcp_frame(packet(name, ident)))
    length = int.from_bytes(await reader.readexactly(2), "big")
    return DNSRecord.parse(await reader.readexactly(length))


async def test_one_client_cannot_take_every_tcp_slot(monkeypatch: pytest.MonkeyPatch,
                                                      tcp: Callable[..., Any]) -> None:
    monkeypatch.setattr(server, "TCP_MAX_PER_CLIENT", 2)
    # (every loopback address is one client: here, 127.0.0.2 stands for another host's)
    monkeypatch.setattr(ratelimit, "counted_as", lambda client: client)
    service, _ = make(HeldUpstream(held=False))
    listener, port = await tcp(service)
    held = [await connect(port) for _ in range(2)]
    reader, writer = await connect(port)
    assert await closed_within(reader, 2.0)
    other = await connect(port, "127.0.0.2")
    assert (await ask_tcp(*other, "x.ngrok.io")).header.rcode == RCODE.NXDOMAIN
    for connection in held:
        assert (await ask_tcp(*connection, "x.ngrok.io")).header.rcode == RCODE.NXDOMAIN
    assert service.metrics.dns_tcp_rejected.value("client_limit") == 1
    for _, w in [*held, other, (reader, writer)]:
        w.close()


def test_an_address_the_host_gives_up_is_no_dns_client_by_it_any_more() -> None:
    """Re-attack of attack pass 50: the DNS service kept whether a source was a client, so an
    address of the host (a client as loopback) that the host gave up, and an agent then took,
    still had its queries answered, where the proxy listeners refused it. Whether a source is
    the host's is asked each time."""
    held = {"10.1.2.1"}
    count_host_as_loopback(held.__contains__)
    try:
        service, _ = make(HeldUpstream(held=False), client_allowed=on_host)
        assert service.serves("10.1.2.1")
        held.clear()
        assert not service.serves("10.1.2.1")
    finally:
        count_host_as_loopback(None)


async def test_a_non_client_gets_no_tcp_slot(tcp: Callable[..., Any]) -> None:
    service, _ = make(HeldUpstream(held=False), client_allowed=lambda c: c != "127.0.0.3")
    listener, port = await tcp(service)
    reader, writer = await connect(port, "127.0.0.3")
    assert await closed_within(reader, 2.0)
    assert listener.connections == set()
    assert service.metrics.dns_tcp_rejected.value("not_a_client") == 1
    writer.close()


def _response_frame() -> bytes:
    response = DNSRecord.parse(packet("x.ngrok.io", 1))
    response.header.qr = 1
    return wire.tcp_frame(response.pack())


@pytest.mark.parametrize("sends", [
    [bytes([byte]) for byte in wire.tcp_frame(packet("x.ngrok.io", 1))[:-1] * 3],  # never whole
    # Attack pass: a response (QR set) is dropped unanswered, yet it moved the idle deadline
    # on, so one address held its slots for as long as it sent one now and then.
    [_response_frame()] * 30,
], ids=["trickle", "unanswered-messages"])
async def test_bytes_that_get_no_answer_do_not_keep_a_connection_open(
        tcp: Callable[..., Any], sends: list[bytes]) -> None:
    service, _ = make(HeldUpstream(held=False))
    listener, port = await tcp(service, idle=0.3)
    reader, writer = await connect(port)
    started = time.monotonic()
    closed = asyncio.ensure_future(closed_within(reader, 3.0))
    for data in sends:
        if closed.done():
            break
        writer.write(data)
        await asyncio.sleep(0.05)
    assert await closed
    assert time.monotonic() - started < 1.0  # the sends would go on for 1.5 s or more
    writer.close()


@pytest.mark.parametrize("junk", [b"\x00\x01\x00", _response_frame()], ids=["runt", "response"])
async def test_a_message_that_gets_no_answer_closes_the_tcp_connection_at_once(
        tcp: Callable[..., Any], junk: bytes) -> None:
    """Attack pass: messages dropped unanswered (a runt, a response) never counted against
    what one read may take: 1 MB of 3-byte frames held the loop for seconds, every client's
    answers waiting. A TCP client that sends one is broken: it is closed, the rest unread."""
    service, _ = make(HeldUpstream(held=False))
    listener, port = await tcp(service, idle=30)
    reader, writer = await connect(port)
    writer.write(junk * 50_000 + wire.tcp_frame(packet("x.ngrok.io", 1)))
    assert await closed_within(reader, 2.0)
    assert listener.connections == set()
    assert service.metrics.dns_queries.value("A", "NXDOMAIN") == 0  # (the query after: unread)
    writer.close()


@pytest.mark.parametrize("end", ["runt", "empty-frame", "half-close"])
async def test_the_answers_owed_go_out_before_the_connection_closes(
        tcp: Callable[..., Any], end: str) -> None:
    """Review: a runt after a query closed the connection at once, the forward cancelled and
    its answer lost; and a client that half-closed after asking (RFC 7766 allows it) got no
    answer either."""
    upstream = HeldUpstream()
    service, _ = make(upstream)
    listener, port = await tcp(service, idle=30)
    reader, writer = await connect(port)
    writer.write(wire.tcp_frame(packet("www.example.com", 7)) + wire.tcp_frame(
        packet("x.ngrok.io", 8)))
    if end != "half-close":
        junk = b"\x00\x01\x00" if end == "runt" else b"\x00\x00"
        writer.write(junk + wire.tcp_frame(packet("a.example.com", 9)))
    else:
        writer.write_eof()
    await asyncio.sleep(0.1)
    upstream.release.set()
    async with asyncio.timeout(2):
        idents = []
        for _ in range(2):
            length = int.from_bytes(await reader.readexactly(2), "big")
            idents.append(DNSRecord.parse(await reader.readexactly(length)).header.id)
    assert sorted(idents) == [7, 8]  # (and nothing for the query after the runt)
    assert await closed_within(reader, 2.0)
    assert listener.connections == set()
    writer.close()


@contextlib.asynccontextmanager
async def asked_and_not_read(queries: int, idle: float
                             ) -> AsyncIterator[tuple[TCPListener, socket.socket]]:
    """A listener whose socket buffers are 4 KiB, and a client that sent it `queries` blocked
    queries and reads nothing (unless the test does)."""
    service, _ = make(HeldUpstream(held=False))
    listener = TCPListener(service, Immediate(), idle)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock.bind(("127.0.0.1", 0))
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(listener, sock=sock)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    await loop.sock_connect(client, sock.getsockname())
    await loop.sock_sendall(client, b"".join(wire.tcp_frame(packet(f"n{n}.ngrok.io", n))
                                             for n in range(queries)))
    try:
        await asyncio.sleep(0.1)
        yield listener, client
    finally:
        client.close()
        srv.close()


async def gone_within(listener: TCPListener, seconds: float) -> None:
    async with asyncio.timeout(seconds):
        while listener.connections:
            await asyncio.sleep(0.1)


async def test_a_client_that_never_reads_gives_its_slot_up_after_the_close(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: a close waited for the answers in the write buffer to drain, without end: a
    client that asked and never read kept its slot (16 an address, 512 in all) for good."""
    monkeypatch.setattr(server, "TCP_CLOSE_GRACE", 0.5)
    async with asked_and_not_read(3000, 0.3) as (listener, _):
        (connection,) = listener.connections
        assert connection.transport is not None
        assert connection.transport.get_write_buffer_size() > 0  # (answers it cannot send)
        await gone_within(listener, 5)


def kernel_queued(port: int) -> int:
    """Bytes the kernel holds to send from local port `port` (/proc/net/tcp: sockets still
    open and orphans alike)."""
    held = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] != "0A":  # (not LISTEN)
            held += int(fields[4].split(":")[0], 16)
    return held


async def test_a_closed_connection_leaves_no_answers_to_an_orphan(
        tcp: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass (2026-12-06): a close left the answers the kernel still held to the closed
    socket, an orphan the client's zero-window ACKs kept for minutes, counted by nobody (192 of
    one client's held 243 MB, on the way to the host's tcp_mem). Past the grace, it is reset."""
    monkeypatch.setattr(server, "TCP_CLOSE_GRACE", 0.5)
    listener, sock, frame = await non_reader(tcp, idle=0.3)
    with sock:
        await asyncio.get_running_loop().sock_sendall(sock, frame * 3)  # (all read: no reset)
        port = sock.getpeername()[1]
        await asyncio.sleep(0.2)
        assert kernel_queued(port) > 0
        await gone_within(listener, 5)
        await asyncio.sleep(0.2)
        assert kernel_queued(port) == 0


async def test_a_client_that_half_closes_and_never_reads_gives_its_slot_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Last review: at an EOF with nothing pending, asyncio closed the transport itself, so no
    abort was armed, and answers the client never read held the close for good."""
    monkeypatch.setattr(server, "TCP_CLOSE_GRACE", 0.5)
    async with asked_and_not_read(300, 0.3) as (listener, client):
        (connection,) = listener.connections
        assert connection.transport is not None and connection._writing
        assert 0 < connection.transport.get_write_buffer_size()
        client.shutdown(socket.SHUT_WR)
        await gone_within(listener, 3)


async def test_answers_after_the_close_do_not_put_its_abort_off(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Last review: a close leaves writing on; when the client read a little, the queries still
    held were answered, and each answer moved the idle deadline over the close's abort."""
    monkeypatch.setattr(server, "TCP_CLOSE_GRACE", 1.0)
    async with asked_and_not_read(3000, 0.3) as (listener, client):
        (connection,) = listener.connections
        await asyncio.sleep(0.5)  # (the idle deadline closes it)
        assert connection.transport is not None and connection._closing
        async with asyncio.timeout(3):
            while not connection._writing:  # read until guardd writes again, then no more
                with contextlib.suppress(BlockingIOError):
                    client.recv(4096)
                await asyncio.sleep(0.01)
        await gone_within(listener, 3)


async def test_complete_queries_keep_a_connection_open(tcp: Callable[..., Any]) -> None:
    service, _ = make(HeldUpstream(held=False))
    listener, port = await tcp(service, idle=0.5)
    reader, writer = await connect(port)
    started = time.monotonic()
    for ident in range(8):
        assert (await ask_tcp(reader, writer, "x.ngrok.io", ident)).header.rcode == RCODE.NXDOMAIN
        await asyncio.sleep(0.1)
    assert time.monotonic() - started > 0.8
    assert await closed_within(reader, 1.0)  # and idle once they stop
    writer.close()


async def test_a_query_whose_answer_takes_longer_than_the_idle_timeout_is_answered(
        tcp: Callable[..., Any]) -> None:
    """The idle timeout is for a connection with nothing owed (RFC 7766 6.2.3): an answer that
    is slow to come (an upstream's retries, the vetting's wait while the client's CPU share is
    spent) is still sent, and the idle time counts from then (last review: the connection
    closed at the timeout after the query, its answer lost)."""
    upstream = HeldUpstream()
    service, _ = make(upstream)
    listener, port = await tcp(service, idle=0.3)
    reader, writer = await connect(port)
    writer.write(wire.tcp_frame(packet("www.example.com", 7)))
    await asyncio.sleep(0.6)
    upstream.release.set()
    length = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 2.0), "big")
    answer = DNSRecord.parse(await reader.readexactly(length))
    assert answer.header.id == 7 and answer.header.rcode == RCODE.NOERROR and answer.rr
    started = time.monotonic()
    assert await closed_within(reader, 2.0)  # and idle once it went
    assert time.monotonic() - started >= 0.2
    writer.close()


class Withholding:
    """An audit writer whose trail is down for good: every answer is withheld."""

    def after_flush(self, callback: Callable[..., object], *args: object,
                    withheld: Callable[[], object] | None = None) -> None:
        if withheld is not None:
            withheld()


async def test_a_withheld_answer_closes_the_tcp_connection_instead_of_wedging_it() -> None:
    """With the audit trail down an answer never leaves; the client is closed on at once (it
    retries elsewhere or later) instead of waiting for the idle timeout, and its slot is free."""
    service, _ = make(HeldUpstream(held=False))
    listener = TCPListener(service, Withholding(), 30.0)  # type: ignore[arg-type]
    srv = await asyncio.get_running_loop().create_server(listener, "127.0.0.1", 0)
    try:
        reader, writer = await connect(srv.sockets[0].getsockname()[1])
        writer.write(wire.tcp_frame(packet("x.ngrok.io", 1)))
        assert await closed_within(reader, 1.0)
        writer.close()
        for _ in range(100):
            if not listener.connections:
                break
            await asyncio.sleep(0.01)
        assert not listener.connections
    finally:
        srv.close()


def reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("before_reset", ["nothing", "partial", "queries"])
async def test_a_reset_releases_the_slot_and_the_forwards(tcp: Callable[..., Any],
                                                          before_reset: str) -> None:
    upstream = HeldUpstream()
    service, _ = make(upstream)
    listener, port = await tcp(service)
    sock = socket.create_connection(("127.0.0.1", port))
    if before_reset == "partial":
        sock.sendall(wire.tcp_frame(packet("x.ngrok.io", 1))[:7])
    elif before_reset == "queries":
        sock.sendall(b"".join(wire.tcp_frame(packet(f"n{i}.example.com", i)) for i in range(5)))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if listener.connections and (before_reset != "queries" or len(upstream.asked) == 5):
            break
    assert len(listener.connections) == 1
    reset(sock)
    for _ in range(100):
        await asyncio.sleep(0.01)
        if not listener.connections and service.forwards == 0:
            break
    assert listener.connections == set() and service.forwards == 0
    assert len(listener.per_client) == 0


class FakeTransport:
    def __init__(self, peername: object) -> None:
        self.peername = peername
        self.closed = False

    def get_extra_info(self, name: str) -> object:
        return self.peername if name == "peername" else None

    def close(self) -> None:
        self.closed = True

    abort = close


def test_a_connection_reset_before_it_was_accepted_takes_no_slot() -> None:
    service, _ = make(HeldUpstream(held=False))
    listener = TCPListener(service, Immediate(), 5.0)
    connection = TCPConnection(listener)
    transport = FakeTransport(None)  # getpeername() failed: the peer is already gone
    connection.connection_made(transport)  # type: ignore[arg-type]
    assert transport.closed and listener.connections == set()
    connection.connection_lost(None)
    assert len(listener.per_client) == 0


async def non_reader(tcp: Callable[..., Any], audit: Immediate | AtTurnsEnd | None = None,
                     idle: float = 5.0) -> tuple[TCPListener, socket.socket, bytes]:
    """A client with a small receive buffer that never reads, its listener, and the frame of
    a query for a 45 KB answer, cached already."""
    big = "\n".join(f'{{name}} 60 TXT "{i:03d}{"x" * 200}"' for i in range(200))
    service, _ = make(HeldUpstream(big, held=False))
    listener, port = await tcp(service, idle, audit=audit)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    query = DNSRecord.question("big.example.com", "TXT")
    query.add_ar(EDNS0(udp_len=1232))
    frame = wire.tcp_frame(bytes(query.pack()))
    await asyncio.get_running_loop().sock_sendall(sock, frame)
    await asyncio.sleep(0.1)  # the answer is cached now
    return listener, sock, frame


async def test_a_client_that_does_not_read_cannot_grow_the_write_buffer(
        tcp: Callable[..., Any]) -> None:
    listener, sock, frame = await non_reader(tcp)
    for _ in range(400):  # ~18 MB of answers asked for, none read
        try:
            sock.send(frame)
        except BlockingIOError:
            break
        await asyncio.sleep(0)
    await asyncio.sleep(0.2)
    (connection,) = listener.connections
    assert connection.transport is not None
    assert connection.transport.get_write_buffer_size() < 256 * 1024  # 14 MB before
    reset(sock)


async def test_answers_owed_to_a_client_that_does_not_read_are_bounded_in_bytes(
        tcp: Callable[..., Any]) -> None:
    """Attack pass 20: 64 pipelined queries for a cached 45 KB answer, sent at once and never
    read, were all answered in one turn, before the write buffer could say it was full:
    3 MB held per connection, 51 MB per client. The bytes owed stop the reading."""
    listener, sock, frame = await non_reader(tcp, AtTurnsEnd())
    for _ in range(4):  # (the kernel's buffers fill first)
        try:
            sock.send(frame * server.TCP_MAX_PENDING)
        except BlockingIOError:
            break
        await asyncio.sleep(0.2)
    (connection,) = listener.connections
    assert connection.transport is not None
    assert connection.transport.get_write_buffer_size() <= server.TCP_MAX_OWED + 65536 + 2
    reset(sock)


async def test_forwards_in_flight_on_one_tcp_connection_are_few(
        tcp: Callable[..., Any]) -> None:
    """Review: forwarded answers counted only once back, so 64 pipelined queries for names not
    cached each brought up to 64 KiB at once (1.3 MB owed on one connection). At most
    `TCP_MAX_FORWARDS` forwards of a connection are in flight (far fewer than the answers it
    may have pending: a burst starts no more); its other queries wait unread, and are all
    answered in turn."""
    upstream = HeldUpstream()
    service, _ = make(upstream)
    listener, port = await tcp(service)
    reader, writer = await connect(port)
    count = server.TCP_MAX_FORWARDS * 3
    writer.write(b"".join(wire.tcp_frame(packet(f"n{i}.example.com", i)) for i in range(count)))
    await asyncio.sleep(0.2)
    assert len(upstream.asked) == service.forwards == server.TCP_MAX_FORWARDS
    upstream.release.set()
    idents = set()
    for _ in range(count):
        length = int.from_bytes(await reader.readexactly(2), "big")
        idents.add(DNSRecord.parse(await reader.readexactly(length)).header.id)
    assert idents == set(range(count)) and service.forwards == 0
    writer.close()


# --- the clients' CPU shares ----------------------------------------------------------------------


class SentTransport:
    """A datagram transport (bound to `bound`) that keeps what is sent."""

    def __init__(self, bound: tuple[object, ...] = ("0.0.0.0", 53)) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.bound = bound

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str) -> object:
        return self.bound if name == "sockname" else None


async def test_forged_sources_on_a_loopback_socket_spend_the_outsiders_share() -> None:
    """Attack pass 52: on a socket bound to ::1, each IPv6 source a process on the host chose
    (none of the host's) was a client of its own, with a CPU share of its own. Such datagrams
    spend the one share of those never answered (`OUTSIDE_CLIENTS`), as from outside."""
    service, audit = make(HeldUpstream(held=False))
    shares = SpentShares(0.0)
    listener = UDPListener(service, Immediate(), Turns(shares))
    transport = SentTransport(("::1", 53, 0, 0))
    listener.connection_made(transport)  # type: ignore[arg-type]
    for ident in range(1, 4):
        listener.datagram_received(packet("x.ngrok.io", ident), (f"fd00:c1::{ident}", 53, 0, 0))
    listener.datagram_received(packet("x.ngrok.io", 9), ("::1", 5353, 0, 0))
    await asyncio.sleep(0.05)
    assert [DNSRecord.parse(data).header.id for data, _ in transport.sent] == [9]
    assert {client for client, _ in shares.charged} == {OUTSIDE_CLIENTS, counted_as("::1")}
    assert [record["client"] for record in audit.records] == [
        "fd00:c1::1", "fd00:c1::2", "fd00:c1::3", "::1"]


async def test_a_source_forged_until_the_host_took_it_spends_loopbacks_share_since() -> None:
    """Review of attack pass 52: the share of a source forged on a socket bound to loopback
    was kept, so once the host took the address its datagrams still spent the outsiders'
    share (charged five times over, and every forger's). Whether a source is forged is asked
    each time, as whether it is the host's is."""
    held: set[str] = set()
    count_host_as_loopback(held.__contains__)
    try:
        service, _ = make(HeldUpstream(held=False))
        shares = SpentShares(0.0)
        listener = UDPListener(service, Immediate(), Turns(shares))
        listener.connection_made(SentTransport(("::1", 53, 0, 0)))  # type: ignore[arg-type]
        listener.datagram_received(packet("a.example.com", 1), ("fd00:c1::1", 53, 0, 0))
        await asyncio.sleep(0.01)
        held.add("fd00:c1::1")
        listener.datagram_received(packet("b.example.com", 2), ("fd00:c1::1", 53, 0, 0))
        await asyncio.sleep(0.01)
        assert [client for client, _ in shares.charged] == [OUTSIDE_CLIENTS,
                                                            counted_as("fd00:c1::1")]
    finally:
        count_host_as_loopback(None)


async def test_a_udp_query_is_charged_to_its_client_and_waits_its_turn_while_it_owes() -> None:
    """Attack pass (2026-12-04): one client's flood of UDP queries (115,000 a second, unique
    denied names) took the loop, and every other client's queries timed out. What answering a
    query costs is charged to its client's CPU share (the one its proxy connections spend);
    while it owes, its queries wait their turn with its connections' work, up to
    `UDP_HELD_PER_CLIENT`, and the rest are dropped at the cost of a lookup (its resolver asks
    again). (Attack pass: dropped at once, a client whose downloads spent its share lost half
    of its own queries.) Datagrams from outside `clients` (recorded, never answered) spend
    one share, `OUTSIDE_CLIENTS`, and wait their turn as a client's do: no one's to charge
    before, a flood of them took the loop from every client (2026-12-06)."""
    service, audit = make(HeldUpstream(held=False), client_allowed=lambda c: c != "192.0.2.9")
    shares = SpentShares(0.5)
    listener = UDPListener(service, Immediate(), Turns(shares))
    transport = SentTransport()
    listener.connection_made(transport)  # type: ignore[arg-type]
    asked = UDP_HELD_PER_CLIENT + 2
    for ident in range(1, asked + 1):
        listener.datagram_received(packet("x.ngrok.io", ident), ("127.0.0.5", 5353))
    listener.datagram_received(packet("x.ngrok.io", 999), ("192.0.2.9", 5353))
    await asyncio.sleep(0)

    def answered() -> list[int]:
        return [DNSRecord.parse(data).header.id for data, _ in transport.sent]

    assert answered() == [] and audit.records == []  # (every one waits its turn)
    while len(answered()) < UDP_HELD_PER_CLIENT:
        await asyncio.sleep(0.01)
    assert time.monotonic() >= shares.until
    assert answered() == list(range(1, UDP_HELD_PER_CLIENT + 1))  # (in the order they came)
    await asyncio.sleep(0.05)
    assert len(answered()) == UDP_HELD_PER_CLIENT  # (the two past the cap: dropped)
    assert [r["client"] for r in audit.records].count("192.0.2.9") == 1  # (never answered)
    assert {client for client, _ in shares.charged} == {counted_as("127.0.0.5"),
                                                         OUTSIDE_CLIENTS}
    assert shares.inactive == {OUTSIDE_CLIENTS}  # (it holds no one back)
    assert min(seconds for _, seconds in shares.charged) >= QUERY_COST
    assert service.metrics.cpu_share_waits.value("dns") == asked + 1


def _owing_udp(service: DNSService) -> tuple[UDPListener, SentTransport]:
    """A UDP listener whose clients' shares are spent for half a second."""
    listener = UDPListener(service, Immediate(), Turns(SpentShares(0.5)))
    transport = SentTransport()
    listener.connection_made(transport)  # type: ignore[arg-type]
    return listener, transport


async def test_a_udp_query_too_big_to_keep_is_dropped_not_held() -> None:
    """Held datagrams are bounded in bytes too: a query takes a few hundred."""
    service, _ = make(HeldUpstream(held=False))
    listener, _ = _owing_udp(service)
    listener.datagram_received(b"x" * (UDP_HELD_SIZE + 1), ("127.0.0.5", 5353))
    assert listener._held == {}
    assert service.metrics.cpu_share_waits.value("dns") == 1


async def test_held_udp_queries_go_unanswered_once_the_socket_is_gone(
        caplog: pytest.LogCaptureFixture) -> None:
    """Review: a held datagram whose turn came after its socket closed failed (a traceback in
    the log)."""
    service, _ = make(HeldUpstream(held=False))
    listener, transport = _owing_udp(service)
    listener.datagram_received(packet("x.ngrok.io", 1), ("127.0.0.5", 5353))
    listener.connection_lost(None)
    while listener._held:
        await asyncio.sleep(0.01)
    assert transport.sent == [] and "failed" not in caplog.text


async def test_a_tcp_clients_queries_are_charged_and_wait_while_it_owes(
        tcp: Callable[..., Any]) -> None:
    """Attack pass (2026-12-04): 16 connections each keeping 64 queries in flight took the
    loop (another client's SOCKS connects took 2 s, some 5). Each query answered is charged to
    the client's share, and while it owes, its connections read and answer nothing more."""
    service, _ = make(HeldUpstream(held=False))
    shares = OwedShares(owed=1)
    _, port = await tcp(service, shares=shares)
    reader, writer = await connect(port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    first = await ask_tcp(reader, writer, "x.ngrok.io", 1)
    assert loop.time() - started >= 0.1  # (until its share refilled)
    assert (await ask_tcp(reader, writer, "x.ngrok.io", 2)).header.id == 2
    assert first.header.id == 1 and service.metrics.cpu_share_waits.value("dns") == 1
    # (each query's answering, and each answer's write: session 54)
    assert [client for client, _ in shares.charged] == [counted_as("127.0.0.1")] * 4
    assert sum(seconds >= QUERY_COST for _, seconds in shares.charged) >= 2
    writer.close()


async def test_every_read_of_a_trickled_tcp_query_is_charged(tcp: Callable[..., Any]) -> None:
    """Attack pass (2026-12-05): 16 connections sending a 64 KiB frame a byte a send took 60%
    of a core, charged nothing until a query was whole (other clients' queries took three
    times as long). Each read is charged, and asks whether the client's share is spent."""
    service, _ = make(HeldUpstream(held=False))
    shares = OwedShares(owed=0)
    _, port = await tcp(service, shares=shares)
    _, writer = await connect(port)
    frame = wire.tcp_frame(packet("x.ngrok.io", 1))
    for at in range(len(frame) - 1):
        writer.write(frame[at:at + 1])
        await asyncio.sleep(0.002)  # (each a read of guardd's own)
    reads = (len(frame) - 1) // 2  # (at least: a few sends may come in one read)
    assert len(shares.charged) >= reads and shares.asked >= reads
    assert min(seconds for _, seconds in shares.charged) >= QUERY_COST
    writer.close()


async def test_writing_each_tcp_answer_is_charged_to_its_client(tcp: Callable[..., Any]
                                                               ) -> None:
    """Session 54's attack: 16 connections pipelining cached queries; each answer's write,
    made once its record was on disk (a thousand at a flush), was charged to nobody: the
    client took 60% of a core where its share is half, and another client's connects waited
    up to 0.56 s. Each write is charged, with the query's own answer."""
    service, _ = make(HeldUpstream(held=False))
    shares = OwedShares(owed=0)
    _, port = await tcp(service, shares=shares)
    reader, writer = await connect(port)
    await ask_tcp(reader, writer, "a.test", 1)  # (forwarded once, then answered from cache)
    before = len(shares.charged)
    writer.write(b"".join(wire.tcp_frame(packet("a.test", n)) for n in range(2, 12)))
    for _ in range(10):
        length = int.from_bytes(await reader.readexactly(2), "big")
        await reader.readexactly(length)
    await asyncio.sleep(0.01)
    charged = shares.charged[before:]
    assert len(charged) >= 10 + 1, charged  # (each answer's write, and the queries' answering)
    writer.close()


class OwedOnce(CpuShares):
    """Tells the first ask to wait `seconds`, every later one not to; keeps the charges."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds
        self.asked = 0

    def wait(self, client: str) -> float:
        self.asked += 1
        return self.seconds if self.asked == 1 else 0.0


async def test_a_paced_tcp_connection_reads_and_answers_nothing_until_its_wait_is_over(
        tcp: Callable[..., Any]) -> None:
    """Review: what it sends meanwhile stays unread in the kernel (guardd buffers none of it)
    and unanswered; then every query is answered. Nor is it closed as idle meanwhile: the
    wait is guardd's, not the client's."""
    flood = b"".join(wire.tcp_frame(packet(f"q{n}.ngrok.io", n)) for n in range(2, 40000))
    service, _ = make(HeldUpstream(held=False))
    listener, port = await tcp(service, idle=0.2, shares=OwedOnce(0.6))
    reader, writer = await connect(port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(wire.tcp_frame(packet("x.ngrok.io", 1)))
    await asyncio.sleep(0.1)
    (connection,) = listener.connections
    assert connection._pacing is not None and not connection.transport.is_reading()
    writer.write(flood)  # (over a megabyte: more than the kernel's buffers take at once)
    await asyncio.sleep(0.2)
    assert connection.framer.buffered < 256 * 1024  # (what one read or two brought at most)
    idents = []
    for _ in range(40000 - 1):
        length = int.from_bytes(await reader.readexactly(2), "big")
        idents.append(DNSRecord.parse(await reader.readexactly(length)).header.id)
        if len(idents) == 1:
            assert loop.time() - started >= 0.6
    assert idents == list(range(1, 40000))
    writer.close()


@pytest.mark.parametrize("ending", ["eof", "abort"])
async def test_a_tcp_connection_ended_while_paced_is_answered_or_let_go(
        tcp: Callable[..., Any], ending: str) -> None:
    """At its EOF, what it asked is answered once the wait is over, then it closes; aborted,
    its wait's timer goes with it."""
    service, _ = make(HeldUpstream(held=False))
    listener, port = await tcp(service, shares=OwedOnce(0.3))
    reader, writer = await connect(port)
    writer.write(b"".join(wire.tcp_frame(packet("x.ngrok.io", n)) for n in (1, 2, 3)))
    await asyncio.sleep(0.1)
    (connection,) = listener.connections
    assert connection._pacing is not None
    if ending == "eof":
        writer.write_eof()
        for ident in (1, 2, 3):
            length = int.from_bytes(await reader.readexactly(2), "big")
            assert DNSRecord.parse(await reader.readexactly(length)).header.id == ident
        assert await closed_within(reader, 2)
    else:  # (a shutdown's, say)
        connection.transport.abort()
        await asyncio.sleep(0.05)
        assert connection._pacing is None and not listener.connections
        assert await closed_within(reader, 1)



async def test_vetting_waits_while_its_clients_share_is_spent() -> None:
    """Session 58's DNS attack (with a hostile upstream): 250 of an agent's queries answered
    at once were vetted back to back, each charged after it ran, so the share bounded none of
    the burst (30 to 70 s with answers that cost 0.3 s each; a few ms each since). An
    answer's vetting waits while its client's share is spent, and the loop serves others."""
    service, _ = make(HeldUpstream("{name} 60 A 192.0.2.1\n", held=False))
    shares = service.shares = OwedShares(owed=2)  # (spent: twice told to wait 0.1 s)
    loop = asyncio.get_running_loop()
    started = loop.time()
    pending = service.answer(packet("www.example.com", 1), "10.0.0.7", False)
    assert asyncio.iscoroutine(pending)
    await pending
    assert shares.asked >= 3 and loop.time() - started >= 0.2, (shares.asked, shares.charged)

async def test_vetting_an_upstream_answer_is_charged_to_the_client_it_is_for() -> None:
    """Re-attack (2026-12-04): the answers of an upstream the agent controls (thousands of
    address hints) cost 20 ms each to vet, and only the query's own judgement was charged:
    50 such queries a second took the loop. Whoever the answer is for pays for its vetting,
    the agent's query and guardd's own lookup for a connect alike."""
    service, _ = make(HeldUpstream("{name} 60 A 192.0.2.1\n" * 200, held=False))
    shares = service.shares = OwedShares(owed=0)
    slow = service._vet

    def vet(*args: Any) -> Any:
        time.sleep(0.002)  # (as long as a big answer's vetting takes)
        return slow(*args)

    service._vet = vet  # type: ignore[method-assign]
    pending = service.answer(packet("www.example.com", 1), "10.0.0.7", False)
    assert asyncio.iscoroutine(pending)
    await pending
    addresses, _, _ = await service.lookup("api.example.com", "10.0.0.8")
    assert addresses
    charged = {client: seconds for client, seconds in shares.charged}
    assert charged[counted_as("10.0.0.7")] >= 0.002 and charged[counted_as("10.0.0.8")] >= 0.002
