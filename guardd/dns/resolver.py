"""Upstream forwarding: an allowed query is answered by the first upstream DNS server that can.

Theory of operation
-------------------
As in dnspython's ``_Resolution``, deciding and doing are kept apart. `Resolution` is a sans-I/O
state machine for one query (the one guardd built for a client's, see `dns.cache.upstream_query`,
never the client's own bytes): `next_attempt()` says which upstream to ask, over which transport,
with which timeout and which bytes; the caller does the I/O and reports the result with
`on_response()`, `on_timeout()` or `on_error()`; this repeats until `next_attempt()` returns None.
Then `answer` holds the reply (with the query's id put back), or `failures` says why there is none.

The rules of the machine:

- Upstreams are tried in the order they are given (`UpstreamHealth`'s: the fastest first, one that
  timed out or failed lately behind the others, the configured order while nothing is known). A
  timeout (perhaps one lost datagram) sends the upstream to the back of the line; any other
  failure (SERVFAIL, REFUSED, a bad answer, a transport error) takes it out of this resolution,
  as dnspython does by default: asked again within the second, it would say the same. So a
  second pass only asks upstreams that timed out.
- A truncated UDP answer is followed by the same query to the same upstream over TCP.
- Each attempt carries a fresh random id. Over UDP, a datagram that does not answer the attempt
  (not a response, wrong id, wrong question) is ignored rather than failing it, so an off-path
  forger can neither poison the answer nor force a failover; the attempt keeps waiting. Over TCP
  the stream is the upstream's own, so a mismatch is its fault: ``bad_response``.
- At most `max_attempts` attempts within `total_timeout` seconds; each attempt's timeout is cut to
  the time that remains, and the last attempt waits for all of it (a slow answer still counts). Every attempt that ends without the answer records exactly one `Failure`
  (a TC fallback included, as ``truncated``), which the caller counts per reason.
- Rcodes other than SERVFAIL and REFUSED (NOERROR, NXDOMAIN, FORMERR, NOTIMP, ...) are the
  upstream's verdict on the query and go back unchanged (to be vetted like any answer).

`UpstreamResolver` is the asyncio shell around it: one connected UDP socket per attempt (the kernel
then drops datagrams from any other address, and the OS picks a random source port), one TCP
connection per TCP attempt, and `FairSlots`, which bound the sockets in flight and, while none
is free, let the clients that wait for one take turns.

What a message's header and question say is read by `dns.wire`; which upstreams there are is
`dns.upstreams`'s business, which needs no event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import secrets
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from guardd.dns import wire
from guardd.dns.upstreams import Upstream
from guardd.errors import ConfigError, DNSWireError, GuarddError
from guardd.net import RESET_ON_CLOSE


class Reason(enum.StrEnum):
    """Why an attempt gave no answer; the values are the `dns_upstream_errors_total` labels."""

    TIMEOUT = "timeout"
    SERVFAIL = "servfail"
    REFUSED = "refused"
    TRUNCATED = "truncated"
    BAD_RESPONSE = "bad_response"
    UDP_ERROR = "udp_error"
    TCP_ERROR = "tcp_error"
    #: guardd's own limit: every upstream socket was in use for the whole attempt (a flood).
    BUSY = "busy"


#: Upstream sockets open at once, at most (each query in flight holds one).
UPSTREAM_SOCKETS = 1024
#: Connections to the upstreams over TCP one client may hold at once (session 61's attack:
#: resolvers keep few, dnsmasq 20 workers and unbound 10, and one client's 24 queries that
#: were never answered took dnsmasq's all; every other client's lookups over TCP failed).
TCP_PER_CLIENT = 4
_RCODE_FAILURES: dict[int, Reason] = {wire.Rcode.SERVFAIL: Reason.SERVFAIL, wire.Rcode.REFUSED: Reason.REFUSED}


class Transport(enum.StrEnum):
    UDP = "udp"
    TCP = "tcp"


_TRANSPORT_ERRORS = {Transport.UDP: Reason.UDP_ERROR, Transport.TCP: Reason.TCP_ERROR}


@dataclass(frozen=True, slots=True)
class Attempt:
    """One exchange to perform: send `query` (guardd's, under this attempt's random `id`)."""

    upstream: Upstream
    transport: Transport
    timeout: float
    query: bytes
    id: int


@dataclass(frozen=True, slots=True)
class Failure:
    """An attempt that ended without the answer, and why."""

    upstream: Upstream
    transport: Transport
    reason: Reason
    detail: str = ""

    def __str__(self) -> str:
        text = f"{self.upstream}/{self.transport} {self.reason}"
        return f"{text} ({self.detail})" if self.detail else text


class Outcome(enum.Enum):
    """What a response did to the attempt in flight."""

    ANSWER = "answer"  # `Resolution.answer` holds it; resolution is over
    IGNORED = "ignored"  # not an answer to this attempt: keep waiting for one
    RETRY_TCP = "retry_tcp"  # truncated over UDP: the next attempt asks again over TCP
    FAILED = "failed"  # the attempt failed (see `failures[-1]`): ask for the next one


class UpstreamFailure(GuarddError):
    """Every attempt failed or the total timeout expired; the client should get SERVFAIL."""

    def __init__(self, failures: Sequence[Failure]) -> None:
        self.failures = tuple(failures)
        tried = "; ".join(map(str, self.failures)) or "no attempt was made"
        super().__init__(
            f"no upstream DNS server answered: {tried} "
            "(check that the upstream servers are reachable, or pass others with --upstream)"
        )

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return tuple(failure.reason for failure in self.failures)


class _NoMoreAttempts(UpstreamFailure):
    """No attempt more goes upstream (`why`); `failures` are the attempts that went before
    (none: nothing left the host for the query)."""

    why = ""

    def __str__(self) -> str:
        tried = "; ".join(map(str, self.failures))
        return self.why + (f" (after {tried})" if tried else "")


class ResolverStopped(_NoMoreAttempts):
    """guardd is stopping."""

    why = "guardd is stopping: no query goes upstream any more"


class Withdrawn(_NoMoreAttempts):
    """A policy reloaded while the query was under way denies its name (attack pass 24: a
    retry sent it out after the reload), its client is no longer the service's, or the audit
    trail cannot be written now."""

    why = "the query may no longer go (a policy reloaded meanwhile denies the name, its client " \
        "is no longer served, or the audit trail cannot be written now): no attempt more goes " \
        "upstream"


#: Whether the query may still go upstream, asked before each attempt sends (None: always).
Allowed = Callable[[], bool] | None


def _random_id() -> int:
    return secrets.randbits(16)


class Resolution:
    """The decisions for one query (see the module docstring); does no I/O."""

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        query: bytes,
        *,
        prefer_tcp: bool = False,
        attempt_timeout: float,
        total_timeout: float,
        max_attempts: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        new_id: Callable[[], int] = _random_id,
    ) -> None:
        question = wire.folded_question(query)
        if question is None:
            raise DNSWireError("cannot forward a query whose header or question does not parse")
        self._query = query
        self._question = question
        self._line = deque(upstreams)
        self._transport = Transport.TCP if prefer_tcp else Transport.UDP
        self._attempt_timeout = attempt_timeout
        self._deadline = clock() + total_timeout
        self._attempts_left = 2 * len(upstreams) if max_attempts is None else max_attempts
        self._clock = clock
        self._new_id = new_id
        self._tcp_retry: Upstream | None = None
        self._current: Attempt | None = None
        self.answer: bytes | None = None
        self.failures: list[Failure] = []

    def next_attempt(self) -> Attempt | None:
        """The next exchange to perform, or None when resolution is over (answered or given up)."""
        if self._current is not None:
            raise RuntimeError("next_attempt() with an attempt in flight: report its result first")
        remaining = self._deadline - self._clock()
        if self.answer is not None or self._attempts_left <= 0 or remaining <= 0:
            return None
        if self._tcp_retry is not None:
            upstream, transport, self._tcp_retry = self._tcp_retry, Transport.TCP, None
        elif self._line:
            upstream, transport = self._line.popleft(), self._transport
        else:
            return None
        self._attempts_left -= 1
        ident = self._new_id()
        query = ident.to_bytes(2, "big") + self._query[2:]
        # An attempt after which no other would have its full time (the last one, or too little
        # left for two) waits for all the time left: a slow answer still counts.
        last = not self._attempts_left or remaining < 2 * self._attempt_timeout
        timeout = remaining if last else self._attempt_timeout
        self._current = Attempt(upstream, transport, timeout, query, ident)
        return self._current

    def on_response(self, data: bytes) -> Outcome:
        """Digest a message received for the attempt in flight."""
        attempt = self._in_flight()
        header = wire.peek_header(data)
        if header is None or not self._answers(attempt, data, header):
            if attempt.transport is Transport.UDP:
                return Outcome.IGNORED
            return self._fail(Reason.BAD_RESPONSE, "the answer does not match the query")
        _, _, truncated, rcode = header
        if truncated:
            return self._fail(Reason.TRUNCATED)
        reason = _RCODE_FAILURES.get(rcode)
        if reason is not None:
            return self._fail(reason)
        self._current = None
        self.answer = self._query[:2] + data[2:]
        return Outcome.ANSWER

    def on_timeout(self) -> None:
        """The attempt in flight got no answer within its timeout."""
        self._fail(Reason.TIMEOUT)

    def on_busy(self) -> None:
        """The attempt in flight never got a socket within its timeout: it was never sent."""
        self._fail(Reason.BUSY)

    def on_error(self, detail: str) -> None:
        """The attempt in flight failed in its transport (refused, reset, closed early)."""
        self._fail(_TRANSPORT_ERRORS[self._in_flight().transport], detail)

    def _in_flight(self) -> Attempt:
        if self._current is None:
            raise RuntimeError("no attempt in flight: call next_attempt() first")
        return self._current

    def _answers(self, attempt: Attempt, data: bytes, header: tuple[int, bool, bool, int]) -> bool:
        """Whether `data` (whose header says `header`) is a response to `attempt`: QR set, same
        id, same question (which error answers may leave out)."""
        ident, is_response, _, rcode = header
        if not is_response or ident != attempt.id:
            return False
        question = wire.folded_question(data)
        return question == self._question or (
            question == b"" and rcode in wire.QUESTIONLESS_RCODES)

    def _fail(self, reason: Reason, detail: str = "") -> Outcome:
        attempt = self._in_flight()
        self._current = None
        self.failures.append(Failure(attempt.upstream, attempt.transport, reason, detail))
        if reason is Reason.TRUNCATED and attempt.transport is Transport.UDP:
            self._tcp_retry = attempt.upstream
            return Outcome.RETRY_TCP
        if reason is Reason.TIMEOUT:
            self._line.append(attempt.upstream)
        return Outcome.FAILED


class UpstreamHealth:
    """Which upstream to ask first, from how they did (unbound's server selection, simplified):
    the fastest answering first (a smoothed round-trip time); one that timed out or failed goes
    behind the others for `PENALTY` seconds, doubled for each in a row (up to `MAX_PENALTY`), then
    takes its place again and is probed by the next query: a dead server costs its timeout once
    in a while, not on every query. With nothing known the configured order stands. No I/O."""

    PENALTY = 10.0
    MAX_PENALTY = 300.0
    #: Seconds without an answer after which an upstream's time is forgotten, so that the next
    #: query asks it again (session 56's re-attack: one slow answer put the fast upstream
    #: behind the other for good, since it was never asked again).
    REPROBE = 60.0
    #: Weight of a new round-trip time in the smoothed one.
    SMOOTHING = 0.3

    def __init__(self, upstreams: Sequence[Upstream], probe_window: float) -> None:
        self.upstreams = tuple(upstreams)
        #: While one query probes an upstream whose time behind is over, the others keep it
        #: behind this long (its attempt timeout): one probe, not one per query in flight.
        self.probe_window = probe_window
        self._rtt = dict.fromkeys(self.upstreams, 0.0)
        self._timeouts = dict.fromkeys(self.upstreams, 0)
        self._behind_until = dict.fromkeys(self.upstreams, 0.0)
        self._answered_at = dict.fromkeys(self.upstreams, -math.inf)
        self._usual_at = dict.fromkeys(self.upstreams, -math.inf)  # (`answered`)

    def order(self, now: float) -> list[Upstream]:
        """The upstreams to try, in order: those not behind first, the fastest first (one whose
        time behind is over first of all: it is probed); of those behind, one that never
        answered last (session 55's attack: both behind, a dead one's time of 0 put it first,
        and every client waited for its timeout)."""
        behind = self._behind_until
        for upstream in self.upstreams:
            if self._rtt[upstream] and now - self._answered_at[upstream] > self.REPROBE:
                self._rtt[upstream] = 0.0  # (not known any more: it is asked first, again)
        order = sorted(self.upstreams, key=lambda u: (
            behind[u] > now, self._rtt[u] or (math.inf if behind[u] > now else 0.0)))
        for upstream in order:
            if self._timeouts[upstream] and behind[upstream] <= now:  # this query probes it
                behind[upstream] = now + self.probe_window
        return order

    def answered(self, upstream: Upstream, rtt: float, now: float) -> None:
        """`upstream` answered a query after `rtt` seconds: its time, smoothed. A slow answer
        (over twice its time) counts only when no answer in its usual time came since this
        query went: else the name was slow (its zone's servers), not the upstream (session
        56's re-attack: one answer of 0.9 s, a name of the agent's own, put the fast upstream
        behind the other for every client); an upstream slow for every query still is."""
        old = self._rtt[upstream]
        usual = not old or rtt <= 2 * old
        if usual or self._usual_at[upstream] <= now - rtt:
            self._rtt[upstream] = rtt if not old else old + self.SMOOTHING * (rtt - old)
        if usual:
            self._usual_at[upstream] = now
        self._answered_at[upstream] = now
        self._timeouts[upstream] = 0
        self._behind_until[upstream] = 0.0

    def failed(self, upstream: Upstream, sent: float, now: float) -> None:
        """A query `sent` then got no answer from `upstream`: it timed out, or failed slowly
        (`SLOW_FAILURE`; session 55's re-attack: one that answered every query SERVFAIL after
        1.9 s stayed first, and every query waited for it). Put it behind, twice as long as the
        last time in a row, `MAX_PENALTY` at most (the doubling capped first: session 55's
        attack, at the 1,025th timeout in a row the float overflowed, and no query to it was
        answered or recorded again). Unless it answered another since: alive, the name was
        slow or failed (its zone's servers), not the upstream (session 55's attack: an agent's
        names of its own zone put the working upstream behind for every client)."""
        if self._answered_at[upstream] > sent:
            return
        self._timeouts[upstream] += 1
        doublings = min(self._timeouts[upstream] - 1, _MOST_DOUBLINGS)
        self._behind_until[upstream] = now + min(self.PENALTY * 2 ** doublings,
                                                 self.MAX_PENALTY)


#: Doublings of `UpstreamHealth.PENALTY` past which `MAX_PENALTY` holds anyway.
_MOST_DOUBLINGS = 32
#: The part of an attempt's timeout after which a failure (SERVFAIL, REFUSED, a bad answer, a
#: transport error) puts its upstream behind as a timeout does: one that comes sooner costs
#: little to go past, and one that comes at once may be the name's at that upstream alone
#: (session 56's review: a validating upstream's SERVFAIL of an agent's bogus DNSSEC zone put
#: it behind, and every client went to the other, a downgrade, at a query a second).
SLOW_FAILURE = 0.5


class UpstreamObserver(Protocol):
    """Where the resolver reports what the metrics count."""

    def upstream_latency(self, seconds: float) -> None:
        """A query got its answer `seconds` after `resolve()` began (failovers included)."""

    def upstream_error(self, reason: Reason) -> None:
        """An attempt ended without the answer."""


class _NoObserver:
    """The default: metrics are optional wiring, not something resolution depends on."""

    def upstream_latency(self, seconds: float) -> None:
        pass

    def upstream_error(self, reason: Reason) -> None:
        pass


def _close_made(making: asyncio.Future[tuple[asyncio.DatagramTransport, _Datagrams]]) -> None:
    """Close the endpoint an attempt given up on was making, once it is made."""
    if not making.cancelled() and making.exception() is None:
        making.result()[0].close()


class _Datagrams(asyncio.DatagramProtocol):
    """Hands the datagrams of one connected UDP socket to the attempt waiting on it."""

    def __init__(self) -> None:
        self._inbox: asyncio.Queue[bytes | Exception] = asyncio.Queue()
        self._peer: object = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._peer = transport.get_extra_info("peername")

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        # The kernel already filters a connected socket by source; this says so in the code.
        if addr == self._peer:
            self._inbox.put_nowait(data)

    def error_received(self, exc: Exception) -> None:
        # An OSError, e.g. ConnectionRefusedError from an ICMP port unreachable.
        self._inbox.put_nowait(exc)

    async def receive(self) -> bytes:
        item = await self._inbox.get()
        if isinstance(item, Exception):
            raise item
        return item


class FairSlots:
    """At most `limit` held at once (`held`). While none is free, the clients that wait take
    turns, each one's oldest waiter first, not first come first served (session 57's attack:
    five clients asking names that never answer held every upstream socket, and the others'
    lookups waited behind their queues, about a second each)."""

    def __init__(self, limit: int) -> None:
        self._free = limit
        #: Each client's waiters, oldest first; the clients in the order of their turns.
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {}

    @contextlib.asynccontextmanager
    async def held(self, client: str) -> AsyncIterator[None]:
        await self._acquire(client)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, client: str) -> None:
        if self._free and not self._waiting:
            self._free -= 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(client, deque()).append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # (handed a slot as it gave up)
                self._release()
            else:
                queue = self._waiting.get(client)
                if queue is not None and waiter in queue:
                    queue.remove(waiter)
                    if not queue:
                        del self._waiting[client]
            raise

    def _release(self) -> None:
        """A slot is free: the oldest waiter of the client whose turn it is takes it, and that
        client goes to the back."""
        while self._waiting:
            client = next(iter(self._waiting))
            queue = self._waiting.pop(client)
            waiter = queue.popleft()
            if queue:
                self._waiting[client] = queue
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1


class ClientSlots:
    """At most `limit` held at once by each client (`held`); a client at its limit waits for
    one of its own to be given back. Holds nothing for a client with none held or awaited."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        #: Each client's semaphore, and how many hold it or wait for it.
        self._clients: dict[str, tuple[asyncio.Semaphore, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def held(self, client: str) -> AsyncIterator[None]:
        held = self._clients.get(client)
        if held is None:
            held = self._clients[client] = (asyncio.Semaphore(self._limit), [0])
        semaphore, users = held
        users[0] += 1
        try:
            async with semaphore:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._clients[client]


class UpstreamResolver:
    """Forwards raw queries to the upstreams, following `Resolution`'s decisions.

    Every `Resolution` call happens in `resolve()`'s own task, never in a protocol callback, so a
    timeout can only land at an `await`, before a response was digested, never after.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        *,
        attempt_timeout: float = 2.0,
        total_timeout: float = 5.0,
        max_attempts: int | None = None,
        max_sockets: int = UPSTREAM_SOCKETS,
        observer: UpstreamObserver | None = None,
    ) -> None:
        if not upstreams:
            raise ConfigError("no upstream DNS server configured; pass --upstream ADDRESS[:PORT]")
        if not 0 < attempt_timeout <= total_timeout:
            raise ConfigError(f"upstream timeouts must satisfy 0 < attempt ({attempt_timeout}) "
                              f"<= total ({total_timeout})")
        if max_attempts is not None and max_attempts < 1:
            raise ConfigError(f"upstream attempts must be at least 1, not {max_attempts}")
        self.upstreams = tuple(upstreams)
        self.health = UpstreamHealth(self.upstreams, attempt_timeout)
        self._attempt_timeout = attempt_timeout
        self._slow_failure = SLOW_FAILURE * attempt_timeout
        self._total_timeout = total_timeout
        self._max_attempts = max_attempts
        # Bounds open sockets under a flood; time spent waiting for one counts against the
        # attempt, but an attempt that never got one is guardd's congestion, not the upstream's.
        self._sockets = FairSlots(max_sockets)
        self._tcp = ClientSlots(TCP_PER_CLIENT)
        self._observer: UpstreamObserver = observer or _NoObserver()
        self._exchanges = {Transport.UDP: self._exchange_udp, Transport.TCP: self._exchange_tcp}
        self._stopped = False

    def stop(self) -> None:
        """guardd is stopping: from now on no attempt goes upstream (`ResolverStopped`), so
        that what went out before is all that the drain must record (review: a query asked
        during the drain went out after its last look at the forwards under way)."""
        self._stopped = True

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Allowed = None, client: str = "") -> bytes:
        """The upstream answer to `query` under `query`'s own id, asked for `client` (whose
        turn it waits for a socket while none is free: `FairSlots`). Raises UpstreamFailure
        when there is none (answer SERVFAIL: `Withdrawn` once `allowed` says no) and
        DNSWireError when `query` has no parsable question."""
        return (await self.resolve_with_upstream(query, prefer_tcp=prefer_tcp,
                                                 allowed=allowed, client=client))[0]

    async def resolve_with_upstream(self, query: bytes, *, prefer_tcp: bool = False,
                                    allowed: Allowed = None, client: str = ""
                                    ) -> tuple[bytes, Upstream]:
        """`resolve`, and the upstream that answered: who said so, for `guardd explain`."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        resolution = Resolution(
            self.health.order(started), query, prefer_tcp=prefer_tcp,
            attempt_timeout=self._attempt_timeout, total_timeout=self._total_timeout,
            max_attempts=self._max_attempts, clock=loop.time)
        while (attempt := resolution.next_attempt()) is not None:
            sent = None
            try:
                async with asyncio.timeout(attempt.timeout), (
                        self._tcp.held(client) if attempt.transport is Transport.TCP
                        else contextlib.nullcontext()), self._sockets.held(client):
                    self._going(resolution, allowed)  # (after the wait for a socket too:
                    sent = loop.time()                  # third review)
                    await self._exchanges[attempt.transport](attempt, resolution, allowed)
            except TimeoutError:  # before OSError, of which it is a subclass
                if sent is None:
                    resolution.on_busy()
                else:
                    resolution.on_timeout()
            except (OSError, EOFError) as exc:
                resolution.on_error(f"{type(exc).__name__}: {exc}")
            if resolution.answer is not None and sent is not None:
                self.health.answered(attempt.upstream, loop.time() - sent, loop.time())
                self._observer.upstream_latency(loop.time() - started)
                return resolution.answer, attempt.upstream
            reason = resolution.failures[-1].reason
            if sent is not None and (reason is Reason.TIMEOUT or (
                    reason is not Reason.TRUNCATED and loop.time() - sent >= self._slow_failure)):
                self.health.failed(attempt.upstream, sent, loop.time())
            self._observer.upstream_error(reason)
        raise UpstreamFailure(resolution.failures)

    def _going(self, resolution: Resolution, allowed: Allowed) -> None:
        """Raise ResolverStopped when guardd stopped meanwhile, Withdrawn when the query may no
        longer go (`allowed`): the socket is made, nothing is sent yet (fourth review: an
        attempt that had its socket before the stop sent anyway)."""
        if self._stopped:
            raise ResolverStopped(resolution.failures)
        if allowed is not None and not allowed():
            raise Withdrawn(resolution.failures)

    async def _exchange_udp(self, attempt: Attempt, resolution: Resolution, allowed: Allowed
                            ) -> None:
        loop = asyncio.get_running_loop()
        making = asyncio.ensure_future(loop.create_datagram_endpoint(
            _Datagrams, remote_addr=(attempt.upstream.host, attempt.upstream.port)))
        try:
            transport, protocol = await asyncio.shield(making)
        except asyncio.CancelledError:
            # (re-attack: on uvloop, a timeout that fell while the socket was being made left
            # it open for good; a busy loop leaked thousands): it closes once it is made
            making.add_done_callback(_close_made)
            raise
        try:
            self._going(resolution, allowed)
            transport.sendto(attempt.query)
            while resolution.on_response(await protocol.receive()) is Outcome.IGNORED:
                pass
        finally:
            transport.close()

    async def _exchange_tcp(self, attempt: Attempt, resolution: Resolution, allowed: Allowed
                            ) -> None:
        reader, writer = await asyncio.open_connection(attempt.upstream.host, attempt.upstream.port)
        try:
            self._going(resolution, allowed)
            writer.write(len(attempt.query).to_bytes(2, "big") + attempt.query)
            length = int.from_bytes(await reader.readexactly(2), "big")
            resolution.on_response(await reader.readexactly(length))
        finally:
            # A reset, not a close: guardd would close first, and its port to the upstream
            # would wait out TIME_WAIT, 60 s; clients asking names of their own over TCP used
            # them all up (re-attack, 2026-12-06). The answer is in, or no longer wanted.
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            writer.close()
