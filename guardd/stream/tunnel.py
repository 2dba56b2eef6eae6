"""The connect pipeline every TCP proxy listener shares: target -> guard -> vetted connect ->
first bytes -> relay.

Theory of operation. A listener (SOCKS5, the HTTP proxy) turns its protocol's request into a
target (host, port) and hands it to a `Tunnel`; the tunnel asks the guard at every step
(`guard.Connect`) and does only the I/O:

1. the host goes through `addr.parse_host` (an IP in any encoding is an address, never a name);
2. a name must be resolvable under the policy (else refused, and never looked up), then guardd
   resolves it itself (`Resolver`: its own cache, upstreams and vetting) and the guard judges
   every address; the tunnel connects only to an address the guard judged, IPv6 first, each
   charged to its rule's rate limit before it is tried, never re-resolving;
3. the verdict is recorded before the listener's reply leaves (`Opened` / `Refused`); a decision
   the HTTP method could change is accepted provisionally: the connection guardd opened is
   recorded as pending before the reply, and the verdict when the first bytes decide, or, when
   the connection ends before they do, what ended it (`Connect.abandoned`);
4. the first client bytes are read under a deadline a trickle cannot extend and judged
   (`sniff`, domain fronting, method rules); nothing flows either way before a provisional
   decision is made; then `Relay` splices the bytes in the kernel, unless they are an HTTP
   request: then the connection is followed request by request (`_follow`, `follow.Follower`:
   each request judged and charged, re-serialized, one at a time), as the HTTP proxy's
   absolute-form requests are (`proxy`, a tunnel per origin).

Its phases are one table (`PHASES`), which also drives `guardd_connections{listener,state}`.
The I/O goes through `TunnelIO` (`socket_io.SocketIO` in the daemon), so the pipeline is
unit-tested with fakes and no sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import errno
import functools
import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from guardd.addr import IPAddress
from guardd.guard import AUDIT_DOWN, UNRESOLVED, Candidate, Connect, Guard, Verdict
from guardd.metrics import Metrics
from guardd.policy.model import Decision, own_denial
from guardd.stream import answers
from guardd.stream.body_method import shown
from guardd.stream.deadlines import Deadlines
from guardd.stream.follow import (PIPELINE_BUFFER, RESPONSE_EVENTS, SHOWN_LINE, BodyMethod,
                                  Broken, Follower, Head, Origin, host_field)
from guardd.stream.memory import Way
from guardd.stream.relay import CHUNK, HelloCheck, RecordCheck, Relay, Told
from guardd.stream.sessions import Resumption
from guardd.stream.sniff import (CARRY, MAX_SNIFF_BYTES, Kind, LenientReading, RecordWatch,
                                 ServerAnswer, Sniffed, hello_again, hello_length,
                                 inside_hello, sniff, sniff_head, tls_after, tls_ahead)
from guardd.turns import Share

log = logging.getLogger("guardd.tunnel")
#: The most one stretch of a connection's work is charged to its client's CPU share
#: (`Tunnel._charge_since`) when it may have waited on the way, for others' time meanwhile: a
#: judgement and its record (a lookup), a connect's wait for its handshake (its connect(2) is
#: charged whole: `Tunnel._connect`), a send (a full socket). A parse never waits:
#: all of it is charged (review: a 16 KiB read of 1-byte chunks, 14 ms, was charged 2).
_MOST_JUDGING = 0.002
_MOST_CONNECTING = 0.0005
_MOST_SENDING = 0.0002
#: What a read costs the loop before its bytes reach the tunnel (the wake-up, the reactor's
#: dispatch, the task's step, the recv and the ACK it sends), charged with the work it brings:
#: measured on this project's 2-core VM, 1-byte reads on 200 connections cost 14 us each when
#: they came a few at a time, of which the tunnel's stretches saw 8 (re-attack: so charged,
#: they were never paced); 22 us each, a stretch seeing 2, when each came alone in its own
#: packet as fast as the client could send (attack measurement, 2026-12-04).
_READ_COST = 16e-6
#: A lingering close (`Tunnel._linger`): how long, and how many of the client's bytes, guardd
#: reads and drops after its last response before it closes.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 1024 * 1024


def _first_line(data: bytes) -> bytes:
    """The first line of `data`, without its line end."""
    return data.split(b"\n", 1)[0].rstrip(b"\r")


class Phase(enum.Enum):
    """Where a connection is; the value is its `guardd_connections` state label."""

    HANDSHAKE = "handshake"
    CONNECTING = "connecting"
    FIRST_BYTES = "first_bytes"
    RELAYING = "relaying"


#: Each phase and the setting that bounds it (the first bytes have their own rule: see
#: `Tunnel._first_bytes`; the relay ends after `idle_timeout` without a byte either way).
PHASES: dict[Phase, str] = {
    Phase.HANDSHAKE: "handshake_timeout",
    Phase.CONNECTING: "connect_timeout",
    Phase.FIRST_BYTES: "first_bytes_timeout",
    Phase.RELAYING: "idle_timeout",
}


class Failure(enum.StrEnum):
    """Why a tunnel did not open; each listener maps it to its protocol's reply. The values are
    `guardd_request_failures_total` and `guardd_connect_attempts_total` reasons."""

    DENIED = "denied"
    INVALID_HOST = "invalid_host"
    NO_ADDRESS = UNRESOLVED
    NETWORK_UNREACHABLE = "network_unreachable"
    HOST_UNREACHABLE = "host_unreachable"
    CONNECTION_REFUSED = "connection_refused"
    TIMED_OUT = "timed_out"
    FAILED = "failed"


_CONNECT_ERRORS = {errno.ENETUNREACH: Failure.NETWORK_UNREACHABLE,
                   errno.EHOSTUNREACH: Failure.HOST_UNREACHABLE,
                   errno.ECONNREFUSED: Failure.CONNECTION_REFUSED,
                   errno.ETIMEDOUT: Failure.TIMED_OUT}


@dataclass(frozen=True, slots=True)
class TunnelSettings:
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    #: Once a client's first bytes start, the whole hello or head must be in within this many
    #: seconds, however it trickles; it is also how long a provisional connect (nothing flows
    #: yet) waits for them to start.
    first_bytes_timeout: float = 10.0


class Resolver(Protocol):
    """How the tunnel reaches names (`dns.server.DNSService.lookup` in the daemon)."""

    async def lookup(self, name: str, client: str, account: str | None = None
                     ) -> tuple[list[IPAddress], str, Decision | None]:
        """Vetted addresses of `name`, IPv6 first, or none, why, and the policy's denial when
        one is why (a lookup sent upstream counts against `account`'s tunnel budget:
        `Connect.account`)."""


#: Where a look for an in-band upgrade's hello goes on from (`Relay.watch_outbound_hellos`):
#: whether the client's next bytes are a first flight, and the last bytes it sent.
_Looked = tuple[bool, bytes]


class Splice(Protocol):
    """What the tunnel needs of `relay.Relay`."""

    started: float
    #: What its pumps charged to the client's CPU share so far.
    charged: float

    def start(self, inbound_only: bool = False) -> None: ...

    def stop(self) -> int: ...

    def release(self) -> None: ...

    def start_outbound(self) -> None: ...

    def inspect_inbound(self, verdict: Callable[[bytes], Told | None], otherwise: Told,
                        then: Callable[[Told], RecordCheck | None] | None = None
                        ) -> asyncio.Future[Told]: ...

    def follow_outbound(self, records: RecordCheck, left: int = 0) -> None: ...

    def watch_outbound_hellos(self, judge: HelloCheck, hold_for: float,
                              first_flight: bool = False, carry: bytes = b"") -> None: ...

    #: Why a record followed, or a hello watched, ended the relay ("": none did).
    violation: str
    #: When it last moved bytes (time.monotonic()).
    active: float

    @property
    def buffered(self) -> tuple[int, int]:
        """Bytes its pipes hold: the client's on their way out, the server's on their way in."""

    async def wait(self) -> tuple[int, int]: ...

    def close(self) -> None: ...


class Signal:
    """`asyncio.Event` of one loop, given: its wait asks nobody for the running loop, which on
    Python 3.11 costs a getpid(2) (a followed connection waits on one each request)."""

    __slots__ = ("_loop", "_set", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._set = False
        self._waiters: list[asyncio.Future[None]] = []

    def set(self) -> None:
        self._set = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)


class TunnelIO(Protocol):
    """The tunnel's I/O: the client's socket, outbound connects, the relay."""

    async def connect(self, ip: IPAddress, port: int,
                      under_way: Callable[[tuple[str, int]], None]) -> socket.socket:
        """A connected socket to `ip`:`port`; OSError when the connect fails. `under_way`
        gets the socket's local (address, port) as soon as the connect is under way."""

    async def receive(self) -> bytes:
        """The client's next bytes (b"" at its half-close)."""

    async def send(self, data: bytes) -> None:
        """Send to the client."""

    async def forward(self, upstream: socket.socket, data: bytes) -> None:
        """Send to the destination."""

    async def receive_upstream(self) -> bytes:
        """The destination's next bytes (b"" when it closed), for a followed connection."""

    async def upstream_unread(self) -> bool:
        """Whether the destination sent bytes (or its close, or a reset) not read yet; after
        it, the next `forward` sends before the loop runs anything else."""

    def close_upstream(self) -> None:
        """Close the destination's socket only (the proxy goes on to another origin)."""

    def end_sending(self) -> None:
        """guardd sends the client nothing more: its FIN follows what is queued (the client's
        bytes can still be read)."""

    def aim(self, target: str) -> None:
        """The connection asks for `target` now: what a record of its sockets' cut names
        once it ended (`reactor.Reactor.cut`)."""

    def upstream_resets(self, armed: bool) -> None:
        """Whether the destination's socket, whoever closes it, closes with a reset: while part
        of a line may have gone, a clean close would end that line (a server that reads a last
        line without its LF at the close, as Python's readline does, serves it: final attacks,
        also through the relay's own idle close)."""

    def client_resets(self) -> None:
        """The client's socket closes with a reset: the server reset its connection part-way
        through a response, which must not look whole to the client."""

    def splice(self, upstream: socket.socket, idle_timeout: float, share: Share,
               on_close: Callable[[Relay], None]) -> Splice:
        """The relay between the client and `upstream` (not started), its work charged to
        the client's `share`."""

    def ways(self) -> tuple[Way, Way]:
        """What the client's socket and the destination's hold in their queues, and what each
        end took, the client's bytes' way out and the server's in (`memory.Way`)."""

    def close(self) -> None:
        """The connection is over: close the client's socket and the destination's."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The tunnel did not open: why, and the verdict (already on disk) that says so."""

    failure: Failure
    verdict: Verdict
    #: The record's number in the audit trail (what an HTTP answer names), if known.
    decision: int | None = None


@dataclass(frozen=True, slots=True)
class Opened:
    """The tunnel is open to `ip` (its verdict, unless provisional, already on disk) from
    `local`, the upstream socket's own address (what a SOCKS reply tells the client)."""

    upstream: socket.socket
    ip: IPAddress
    local: tuple[str, int]


class Tunnel:
    """One client's connection through a listener: `open` a target, then `run` the relay."""

    def __init__(self, guard: Guard, resolver: Resolver, io: TunnelIO, settings: TunnelSettings,
                 deadlines: Deadlines, listener: str, client: str,
                 phases: dict[str, list[int]], client_port: int = 0, *,
                 share: Share) -> None:
        self.guard = guard
        self.resolver = resolver
        self.io = io
        self.settings = settings
        self.deadlines = deadlines
        self.listener = listener
        self.client = client
        #: Whose rate limits and tunnel budget its connects count against (`Connect.account`,
        #: `Principals.account`): the client address, or the proxy login that chose its
        #: principal.
        self.account = client
        #: The proxy login the client made (None: none), named in its records.
        self.user: str | None = None
        self.client_port = client_port
        #: An HTTP proxy's scheme ("https" for a CONNECT, "http"): records name URLs.
        self.scheme: str | None = None
        self.metrics: Metrics = guard.metrics
        self._phases = phases
        self.phase: Phase | None = None
        self.connect: Connect | None = None
        self._opened: Opened | None = None
        self._relay: Splice | None = None
        #: A TLS 1.2 stream's client records (`_after_hello`): what follows them from the first
        #: after its hello, and the bytes of one under way there.
        self._client_records: tuple[RecordWatch, int] | None = None
        #: The task waiting for the first bytes (while it waits), and why the wait was cut.
        self._waiting: asyncio.Task[object] | None = None
        self._ended_early = ""
        self._settled = False  # the connection's verdict is on disk
        #: A followed connection's request, allowed (the first as first bytes): recorded once
        #: the follower hands it out to go (`_follow`), never when it cannot (attack pass 30:
        #: an HTTP/0.9 line, which h11 refuses, was recorded as an allowed GET before its
        #: cut), and after its 100 Continue (attack pass 49: the stream broke meanwhile).
        self._going: Verdict | None = None
        #: A followed connection's server reset it, as a send to it found.
        self._server_reset = False
        #: Something left the host since its last record: guardd's lookup of a name (which
        #: may go upstream) or its handshake. The next record is then never shed nor refused,
        #: even a denial (`Guard.committed`): an agent could carry a name out that way,
        #: unrecorded. (Room in the trail was asked before: `AuditWriter.room_for`.)
        self._went_out = False
        #: When a followed connection last moved bytes (its idle timeout counts from there).
        self._moved = 0.0
        #: Its requests are followed, each judged (a reload leaves the method to them).
        self._followed = False
        #: Followed: held while bytes go to the client, a response's or guardd's answer (one
        #: never lands inside the other).
        self._to_client: asyncio.Lock | None = None
        #: Followed: what says whether the request under way has its answer yet.
        self._follower: Follower | None = None
        #: Followed: the server's last read is not handed to the follower yet (`_responses`
        #: waits its turn first).
        self._server_bytes_in_hand = False
        #: The client's CPU share (`_charge_since`, `_paced`), its relay's too.
        self.share = share
        #: What the connection moved, its reads and parts weighed, since it last let the loop
        #: run (`_paced`).
        self._unyielded = 0
        #: What the connection's stretches charged so far (`handled` charges the rest).
        self.charged = 0.0
        #: When the work the last handshake read brought started (`handshake_bytes`).
        self._handshake_read: float | None = None
        #: Whether the client began its handshake (sent a byte of it; a listener may count
        #: fewer: the HTTP one, no empty line before a request line).
        self.began = False

    def enter(self, phase: Phase) -> None:
        """Move to `phase` (the gauge follows); its deadline, if it has one here, is set."""
        cells = self._phases
        if self.phase is not None:
            cells[self.phase._value_][0] -= 1  # (`_value_`: no descriptor call per phase)
        self.phase = phase
        cells[phase._value_][0] += 1
        if phase is Phase.HANDSHAKE or phase is Phase.CONNECTING:
            self.deadlines.set(getattr(self.settings, PHASES[phase]))

    def leave(self) -> None:
        """The connection is over: out of every phase, no deadline."""
        self.deadlines.clear()
        if self.phase is not None:
            self._phases[self.phase._value_][0] -= 1
            self.phase = None

    async def open(self, host: str, port: int, address: IPAddress | None = None,
                   pinned: IPAddress | None = None, request: tuple[str, str] | None = None
                   ) -> Opened | Refused:
        """Judge and connect to `host`:`port` (`address`: the host was sent as an address;
        `pinned`: the only address the name may be reached at, `Connect.pinned`; `request`:
        the method and path of the request it is for, when known, `Connect.method`)."""
        started, charged = time.perf_counter(), self.charged
        self.enter(Phase.CONNECTING)
        connect = self.connect = self.guard.connect(self.listener, host, port, self.client,
                                                    address, self.scheme, pinned, self.account,
                                                    self.user, request)
        self.io.aim(connect.target)
        try:
            if connect.refused is not None:
                return self._refused(Failure.INVALID_HOST, connect.refused)
            no_room = self.guard.no_room(self.client)  # (before any lookup or handshake)
            if no_room:
                return self._refused(Failure.DENIED, self.guard.refusal(
                    self.listener, no_room, target=connect.target, user=self.user))
            denied = connect.gate()
            if denied is not None:
                return self._refused(Failure.DENIED, denied)  # never looked up
            addresses: Sequence[IPAddress] = ()
            why = ""
            denial: Decision | None = None
            if connect.name is not None:
                self._went_out = True
                try:
                    addresses, why, denial = await self.resolver.lookup(
                        connect.name, self.client, self.account)
                except asyncio.CancelledError:
                    if not self.deadlines.expired():
                        self._cut_looking_up(connect, connect.name)
                        raise
                    why = f"resolving it took over {self.settings.connect_timeout:g}s"
            denied = connect.judge(addresses, why, denial)
            if denied is not None:
                failure = Failure.NO_ADDRESS if connect.name is not None and not addresses \
                    else Failure.DENIED
                return self._refused(failure, denied)
            return await self._connect(connect, port)
        finally:
            self.deadlines.clear()
            connects = self.charged - charged  # (charged as they went: `_connect`)
            self._charge(max(0.0, min(time.perf_counter() - started - connects,
                                      _MOST_CONNECTING)))

    async def _connect(self, connect: Connect, port: int) -> Opened | Refused:
        """Connect to the first candidate that answers, in order (IPv6 first); else the first
        rate-limit refusal, or the last failure. Each candidate's rule is charged before its
        address is tried (`Connect.may_try`); `Connect.connected` gives back the charges of the
        rules whose addresses failed."""
        denied: Verdict | None = None
        failed: tuple[Failure, Verdict] | None = None
        started = time.monotonic()
        for candidate in connect.candidates:
            if self.guard.audit.down:  # (it went down while the name was looked up, or the
                return self._refused(Failure.DENIED, self.guard.refusal(  # last one tried)
                    self.listener, AUDIT_DOWN, target=connect.target, user=self.user))
            refusal = connect.may_try(candidate)
            if refusal is not None:
                denied = denied or refusal
                continue
            remote = (str(candidate.ip), port)
            local: list[tuple[str, int]] = []

            def under_way(address: tuple[str, int]) -> None:
                """Registered before its own loop back could be accepted (`Guard.comes_back`).
                The connect's work so far is the loop's, charged whole (attack passes: with
                thousands of guardd's ports to one destination in TIME_WAIT, the kernel's
                search for a free one took 5 ms a connect(2), charged 0.5)."""
                local.append(address)
                self.guard.outbound[address] = remote
                self._charge_since(connecting)

            upstream: socket.socket | None = None
            self._went_out = True
            connecting = time.perf_counter()
            try:
                upstream = await self.io.connect(candidate.ip, port, under_way)
            except asyncio.CancelledError:
                if not self.deadlines.expired():
                    raise
                failed = self._failed(connect, candidate, Failure.TIMED_OUT, "timed out")
                break
            except OSError as exc:
                if not local:  # (it failed before it was under way: all of it the loop's)
                    self._charge_since(connecting)
                failure = _CONNECT_ERRORS.get(exc.errno or 0, Failure.FAILED)
                failed = self._failed(connect, candidate, failure,
                                      exc.strerror or str(exc) or failure.value)
                continue
            finally:
                if upstream is None and local:  # it did not open: nothing to come back
                    self.guard.outbound.pop(local[0], None)
            try:  # the relay's pipes, before any reply: never a SUCCEEDED without a relay
                self._relay = self.io.splice(upstream, self.settings.idle_timeout, self.share,
                                             self._upstream_closed)
            except OSError as exc:  # out of descriptors
                self.guard.outbound.pop(local[0], None)
                failed = self._failed(connect, candidate, Failure.FAILED,
                                      f"guardd cannot relay it ({exc.strerror or exc})")
                break
            self.metrics.connect_attempts.counter("ok")()
            self.metrics.connect_seconds.observe(time.monotonic() - started)
            return self._opened_to(connect, candidate, upstream, local[0])
        if denied is not None:
            return self._refused(Failure.DENIED, denied)
        assert failed is not None, "a judged connect has a candidate"
        return self._refused(*failed)

    def _failed(self, connect: Connect, candidate: Candidate, failure: Failure, detail: str
                ) -> tuple[Failure, Verdict]:
        self.metrics.connect_attempts.counter(failure.value)()
        return failure, connect.failed(candidate, failure.value, detail)

    def _opened_to(self, connect: Connect, candidate: Candidate, upstream: socket.socket,
                   local: tuple[str, int]) -> Opened | Refused:
        opened = self._opened = Opened(upstream, candidate.ip, local)
        verdict = connect.connected(candidate)
        if connect.generation != self.guard.generation:  # a reload came while it connected
            reversed_ = connect.rejudged(followed=candidate.provisional)
            if reversed_ is not None:
                assert self._relay is not None
                self._relay.close()
                self._relay = self._opened = None
                self.io.close_upstream()
                self.guard.outbound.pop(local, None)
                return self._refused(Failure.DENIED, reversed_)
        # Never SUCCEEDED under a denial: `may_try` let only an allowed (or pending) one here.
        assert verdict.allowed or verdict.pending, "a connect opened under a denial"
        self._record(verdict)  # (a pending one is settled by its first bytes)
        return opened

    def close(self, ended: BaseException | None = None) -> None:
        """The connection is over (`ended`: the exception that ended it, if one did): close
        both sockets, and record a connect opened provisionally that never got its verdict."""
        self.leave()
        if self._relay is not None:
            self._relay.close()  # its pipes, when it never ran
        self.io.close()
        opened = self._opened
        if opened is None:
            return
        self.guard.outbound.pop(opened.local, None)
        if not self._settled:
            self._settled = True
            assert self.connect is not None
            self.guard.commit(self.connect.abandoned(_ending(ended)), self.client,
                              went_out=self.take_went_out())

    def _refused(self, failure: Failure, verdict: Verdict) -> Refused:
        return Refused(failure, verdict, self._record(verdict))

    def _record(self, verdict: Verdict) -> int | None:
        """`Guard.committed`, never shed nor refused when something left the host for it. A
        record that is not pending settles the connection: it says what became of a connect
        opened provisionally, and nothing more is recorded for it at the close (a followed
        connection's first request may be cut before any is judged: attack pass 30)."""
        if not verdict.pending:
            self._settled = True
        return self.guard.committed(verdict, self.client, self.take_went_out())

    def take_went_out(self) -> bool | None:
        """Whether something left the host since the last record (None: nothing), for the
        record about to be made, which accounts for it from now on (`Guard.commit`)."""
        went_out, self._went_out = self._went_out, False
        return went_out or None

    def _cut_looking_up(self, connect: Connect, name: str) -> None:
        """Record a lookup of `name` that a cancellation cut (a shutdown, a reload that closed
        the tunnel): the name went out, and no other record names it."""
        self._went_out = False
        self.guard.commit(connect.cut_looking_up(name), self.client, went_out=True)

    async def peek(self) -> tuple[bytes, Sniffed | None, str]:
        """The client's first bytes before any connect, what the sniffer made of them (None:
        nothing it could read before the deadline or the client's half-close), and why it made
        nothing: a redirected connection names its server only there. Bounded as a provisional
        connect's are. A reset is one more way to name none (attack pass, 2026-12-06: it ended
        the connection unrecorded, so an agent probed denied destinations without a trace)."""
        self.enter(Phase.FIRST_BYTES)
        try:
            return await self._first_bytes(b"", provisional=True)
        except ConnectionError as exc:
            return b"", None, f"the client reset the connection ({exc.strerror or exc})"

    async def run(self, early: bytes) -> None:
        """After the listener told the client the tunnel is open: judge the first bytes
        (`early`: those sent before the reply) and relay. A server that speaks first (SMTP,
        SSH) is heard at once, unless the decision itself waits for the first bytes
        (provisional): then nothing flows either way before it is made. The upstream socket
        is closed however this ends."""
        opened, connect, relay = self._opened, self.connect, self._relay
        assert opened is not None and connect is not None and connect.chosen is not None
        assert relay is not None
        provisional = connect.chosen.provisional
        self.enter(Phase.FIRST_BYTES)
        self._waiting = asyncio.current_task(self.deadlines.loop)  # (no getpid(2): loop given)
        passed = follow = False
        first = b""
        held = bytearray()  # the client's bytes after a TLS hello, until the server answered
        answered: asyncio.Future[ServerAnswer] | None = None
        resumption: Resumption | None = None
        if not provisional:
            relay.start(inbound_only=True)
        try:
            first, sniffed, cut_short = await self._first_bytes(early, provisional)
            cut_short = self._ended_early or cut_short  # the upstream's close explains it best
            if first or provisional:
                if not await self._judge(connect, sniffed,
                                         cut_short or SENT_NOTHING, request=0):
                    return
                if sniffed is not None and sniffed.kind is Kind.HTTP:
                    follow = self._followed = True  # its requests go out one by one, judged
                elif sniffed is not None and sniffed.kind is Kind.TLS:
                    # What follows the hello waits for the server's answer (`_after_hello`).
                    end = hello_length(first)
                    if inside_hello(first[:end]) >= 0:
                        self._record(connect.cut(_UPGRADE_IN_HELLO))
                        return
                    resumption = connect.resumption(sniffed)
                    answered = relay.inspect_inbound(resumption.answer, ServerAnswer.OTHER,
                                                     resumption.follow)
                    if provisional:
                        relay.start(inbound_only=True)
                    first, held[:] = first[:end], first[end:]
                    await self.io.forward(opened.upstream, first)
                elif first:
                    other = await self._other_bytes(connect, opened, first)
                    if other is None:
                        return
                    relay.watch_outbound_hellos(  # (STARTTLS and its kin)
                        connect.upgraded, self.settings.first_bytes_timeout, *other)
            elif cut_short:
                return  # an allowed connect that never spoke before its deadline or upstream
            passed = True  # (a client that closed its side at once still hears the server)
        finally:
            self._waiting = None
            if not passed:
                relay.close()
        self.enter(Phase.RELAYING)
        if follow:
            known = connect.known
            follower = Follower(host_field(known[0] if known else str(opened.ip), connect.port))
            follower.client_data(first)
            try:
                await self._follow(connect, opened, relay, follower, judged=1)
            finally:
                relay.close()
            return
        try:
            if answered is not None:
                assert resumption is not None
                after = await self._after_hello(connect, opened, resumption, answered, held)
                if after is None:
                    return
                first += after  # (counted as what went before the relay)
                if self._client_records is not None:
                    relay.follow_outbound(*self._client_records)
                relay.start_outbound()
            elif provisional:
                relay.start()
            else:
                relay.start_outbound()
            sent, received = await relay.wait()
            if relay.violation:
                self._record(connect.cut(relay.violation))
        finally:
            relay.close()  # a shutdown cancels the wait: the relay must not outlive its task
        self.metrics.relay_bytes_outbound(sent + len(first))
        self.metrics.relay_bytes_inbound(received)
        log.debug("%s %s -> %s closed: %d bytes out, %d in, %.1fs", self.listener, self.client,
                  connect.target, sent + len(first), received, time.monotonic() - relay.started)

    async def _other_bytes(self, connect: Connect, opened: Opened, first: bytes
                           ) -> _Looked | None:
        """Forward first bytes that are neither TLS nor HTTP (as `sniff` reads first bytes),
        then the client's next ones, until the reading of them as Netty reads a request
        (`LenientReading`) decides; None (recorded) when they make a request after all: the
        bytes that do never go. First bytes are not read that way themselves (it would stall
        protocols whose first message it leaves undecided, AMQP's or RDP's), but a request
        line sent after them reached Netty unjudged (third Netty pass). The reading decides
        at a request line's end; a client silent for the idle timeout meanwhile is cut
        (re-attack: left to the relay, which a server sending bytes of its own kept up, its
        stream went on unread, and a request line ended after the pause was served).
        Returns None then; else what the relay's look at the client's bytes goes on from
        (`_Looked`). A hello found in them, or begun in the bytes before them (a request or a
        hello cut across reads: final attack, an SSLRequest in two), goes only once judged
        (`_upgraded`)."""
        reading = LenientReading(any_method=True)
        data = first
        carry = b""  # (the last `CARRY` bytes that went, read with the next ones)
        flight = False  # (an upgrade's request went: these bytes are its first flight)
        started = time.perf_counter()  # (its read was charged with the first bytes')
        while True:
            joined = carry + data
            at, upgrade = (len(carry), True) if flight else tls_ahead(  # (each read whole:
                joined, len(carry), len(data))  # first bytes may be several, final re-attack)
            flight = upgrade and at == len(joined)  # (its first flight in the next read)
            if at >= 0 and not flight:  # (an in-band upgrade to TLS: `Relay.watch_outbound_...`)
                split = max(at, len(carry))
                looked = await self._upgraded(connect, opened, joined[len(carry):split],
                                              joined[split:], joined[at:len(carry)], reading)
                if isinstance(looked, bytes):  # (no TLS came: read on, from what has not gone)
                    carry, data = b"", looked
                elif looked is None or not reading.undecided:
                    return looked
                else:  # (all went, the reading still undecided: read on after them)
                    flight, carry = looked
                    if (read := await self._read_on(connect)) is None:
                        return None
                    data = read
                started = _read_started()
                continue
            carry = joined[-CARRY:]
            passed = self._let_through(connect, reading, data, end=not data)
            sending = self._charge_since(started)
            if not passed:
                return None
            if data:
                await self.io.forward(opened.upstream, data)
            if not reading.undecided or not data:  # (a close decides it)
                return flight, carry
            self._charge_since(sending, _MOST_SENDING)
            if (read := await self._read_on(connect)) is None:
                return None
            data = read
            started = _read_started()

    async def _read_on(self, connect: Connect) -> bytes | None:
        """The client's next bytes while its stream is read (`_other_bytes`), in its turn; None
        (recorded) when neither side moved any for the idle timeout, or the server closed."""
        await self._paced()
        received: list[bytes] = []
        if not await self._next_while_active(received):
            why = f"{self._ended_early} while" if self._ended_early else \
                f"it sent nothing more for {self.settings.idle_timeout:g}s (the idle " \
                "timeout) and"  # (re-attack: the record said so when the server had closed)
            self._record(connect.cut(
                f"{why} the client's bytes after other bytes might still become a request "
                "to a lenient server (Netty)"))
            return None
        return received[0]

    def _let_through(self, connect: Connect, reading: LenientReading, data: bytes,
                     end: bool = False) -> bool:
        """May `data` (`end`: the client's last) go, as `reading` reads them while it is
        undecided? False (recorded) when they make a request after all: none of them goes.
        Until it decides, the server's connection is reset at a cut (a clean close would
        end a line to Python's readline)."""
        if reading.undecided:
            if reading.feed(data, end=end):
                self._cut_as_request(connect, reading)
                return False
            self.io.upstream_resets(reading.undecided)
        return True

    def _cut_as_request(self, connect: Connect, reading: LenientReading) -> None:
        self._record(connect.cut("the client's bytes are a request after all, as a lenient "
                                 f"server (Netty, gunicorn, cheroot, waitress) reads them "
                                 f"({reading.why})"))

    async def _next_while_active(self, received: list[bytes]) -> bool:
        """The client's next bytes (into `received`), waited for while either side moves some:
        False once neither did for the idle timeout (final re-attack of attack pass 49: a
        Postgres LISTEN or an MQTT subscriber, its stream still undecided, received and said
        nothing, and was cut)."""
        relay = self._relay
        while not await self._within(self.settings.idle_timeout,
                                     _into(received, self.io.receive())):
            if self._ended_early or relay is None or \
                    time.monotonic() - relay.active >= self.settings.idle_timeout:
                return False
        return True

    async def _upgraded(self, connect: Connect, opened: Opened, before: bytes, hello: bytes,
                        went: bytes, reading: LenientReading) -> _Looked | bytes | None:
        """A TLS hello in the bytes after other first bytes (`before` it: a STARTTLS, a
        Postgres SSLRequest, sent with it; `went`: its own bytes that went before them), read
        whole within the first bytes' timeout and judged (`Connect.upgraded`) before it goes.
        Every part goes once `reading` lets it, while it is undecided: a server that never
        upgraded reads the hello, and what follows, as more of the stream (re-attack of attack
        pass 49: a hello of the allowed name in a line's method or target, then the line's
        rest and a denied Host, served by gunicorn 21 and cheroot). None (recorded) when
        something may not go; else what the look at the client's bytes goes on from (a first
        flight again: bytes that were no hello but another upgrade's request); or, no hello
        coming (the upgrade refused: Postgres's `N`, a 454), the bytes not gone, for the
        reading to go on with (review's attack: a request after a marker went unread).
        Each pass's looks are charged, and paced (session 54's re-attack: hellos back to
        back, each looked for in all that came, held the loop for seconds)."""
        looking = time.perf_counter()
        while True:
            self._charge_since(looking)
            await self._paced(len(before) + len(hello))
            looking = time.perf_counter()
            if before:
                if not self._let_through(connect, reading, before):
                    return None
                await self.io.forward(opened.upstream, before)
            if not hello:
                return b""
            deadline = time.monotonic() + self.settings.first_bytes_timeout
            sniffed = sniff(went + hello)
            while sniffed is None:  # (all of it within the timeout: re-attack, one byte at
                received: list[bytes] = []  # a time held the phase, and 64 KiB, for good)
                left = deadline - time.monotonic()
                self._charge_since(looking)  # (before it waits)
                if left <= 0 or not await self._within(left, _into(received, self.io.receive())):
                    self._record(connect.cut("a TLS hello after other bytes did not end "
                                             f"within {self.settings.first_bytes_timeout:g}s"))
                    return None
                started = _read_started()
                hello += received[0]
                sniffed = sniff(went + hello, eof=not received[0])
                self._charge_since(started)
                await self._paced(len(received[0]))
                looking = time.perf_counter()
            tls = sniffed.kind is Kind.TLS
            if tls and (why := connect.upgraded(sniffed)):
                self._record(connect.cut(why))
                return None
            # Looked into, hello or not, and past it: another upgrade's request (Postgres's
            # GSSENCRequest refused, then its SSLRequest), or a hello, in it or behind it. A
            # server that never upgraded reads a hello as lines (re-attacks: a hello of the
            # allowed name in a line took a STARTTLS and a fronted hello with it, after it or
            # in one of its extensions).
            joined = went + hello
            at, upgrade = tls_after(joined, len(went))
            if at < 0 and not tls:
                return joined[len(went):]
            if at < 0 or upgrade and at == len(joined):
                if not self._let_through(connect, reading, joined[len(went):]):
                    return None
                await self.io.forward(opened.upstream, joined[len(went):])
                return at >= 0, joined[-CARRY:]
            split = max(at, len(went))
            before, hello, went = joined[len(went):split], joined[split:], joined[at:len(went)]

    async def _after_hello(self, connect: Connect, opened: Opened, resumption: Resumption,
                           answered: asyncio.Future[ServerAnswer], held: bytearray
                           ) -> bytes | None:
        """Once the server answered a TLS hello (or the relay ended): the client's bytes since
        (`held`, read while it waits, up to `MAX_SNIFF_BYTES`) forwarded and returned, or None
        when the connection is over: the client reset, its hello sent again is denied
        (`_hello_again`), or the server resumed a session below TLS 1.3 guardd did not see
        made for the hello's name (`stream.sessions`, `Connect.resumed`). A client that closed
        its side meanwhile still hears the server, as in any relay."""
        hello = resumption.hello
        holding = asyncio.ensure_future(self._hold(held))
        try:
            await asyncio.wait((answered, holding), return_when=asyncio.FIRST_COMPLETED)
            if not answered.done():
                if isinstance(holding.exception(), OSError):
                    return None  # the client reset (second review: unseen, it held its slot)
                if holding.result() and not held:
                    self._finish_upstream()  # its close, with nothing held back, goes on now
            answer = await answered
        finally:
            holding.cancel()
            # (its wait for the client's next event must be over before the relay's begins)
            await asyncio.wait((holding,))
        ended = not holding.cancelled() and holding.exception() is None and holding.result()
        if answer is ServerAnswer.RETRY:
            return await self._hello_again(connect, opened, hello, held, ended)
        if answer is ServerAnswer.RESUMED and not resumption.vouched:  # (the client's bytes
            self._record(connect.resumed(hello))  #                        since never go)
            return None
        if answer is ServerAnswer.PLAIN:  # (no TLS to the server, which read the hello as
            data = bytes(held)  # it may, lines to SMTP: what follows may upgrade in band yet)
            if tls_ahead(data, 0, len(data))[0] >= 0:
                self._record(connect.cut(_UPGRADE_AFTER_HELLO))
                return None
            assert self._relay is not None
            self._relay.watch_outbound_hellos(connect.upgraded, self.settings.first_bytes_timeout,
                                              False, data[-CARRY:])
        if answer in (ServerAnswer.FULL, ServerAnswer.RESUMED):  # (the client's records from
            #                                                       there are followed)
            watch = RecordWatch()
            why, left = watch.skip(held)
            if why or left < 0:
                self._record(connect.cut(why or "a TLS record header split where guardd "
                                         "cannot follow it, before the server's answer"))
                return None
            self._client_records = (watch, left)
        if held:
            await self.io.forward(opened.upstream, bytes(held))
        return bytes(held)

    def _finish_upstream(self) -> None:
        """The client closed its side: so does guardd towards the server (second review: a
        server that answers once the client has finished waited out the idle timeout)."""
        assert self._opened is not None
        try:
            self._opened.upstream.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # gone already: the relay will say so

    async def _hold(self, held: bytearray) -> bool:
        """Read the client into `held` until its close (True) or `MAX_SNIFF_BYTES` (False;
        the rest waits in its socket), each read charged (attack measurement: 200 tunnels
        trickling a byte a write to a server that never answered kept the loop busy)."""
        while len(held) < MAX_SNIFF_BYTES:
            data = await self.io.receive()
            if not data:
                return True
            started = _read_started()
            held += data
            self._charge_since(started)
            await self._paced()
        return False

    async def _hello_again(self, connect: Connect, opened: Opened, first: Sniffed | None,
                           received: bytearray, ended: bool) -> bytes | None:
        """After the server's HelloRetryRequest: the client's hello again, read as first bytes
        are (`received`: what came after the first hello so far; `ended`: the client closed its
        side after it), forwarded and returned when it names what the first did; None
        (recorded) when not. A server serves the name the second one gives (OpenSSL asks its
        SNI callback again), and nothing else judges it."""
        assert first is not None
        if ended and not received:
            return b""  # it gave up: its close goes to the server
        data, again, cut_short = await self._first_bytes(bytes(received), True, hello_again)
        if not data:
            return b""
        verdict = connect.hello_again(first, again, cut_short)
        if verdict is not None:
            self._record(verdict)
            return None
        await self.io.forward(opened.upstream, data)
        return data

    def _upstream_closed(self, _: object) -> None:
        """The relay ended (the destination went away): a wait for the first bytes ends too."""
        task = self._waiting
        if task is not None:
            self._ended_early = "the destination closed the connection first"
            self.deadlines.cut(task)

    async def _first_bytes(self, buffer: bytes, provisional: bool,
                           read: Callable[[bytes | bytearray, bool], Sniffed | None] = sniff
                           ) -> tuple[bytes, Sniffed | None, str]:
        """Read until the sniffer (`read`: `sniff`, or `hello_again` after a retry) has a
        verdict: (bytes, verdict, why there is none).

        Waiting for the first byte is bounded by the idle timeout, or by `first_bytes_timeout`
        when nothing flows meanwhile (provisional); from the first byte on, the whole hello or
        head must be in within `first_bytes_timeout`, however slowly it trickles. At the client's
        half-close the bytes so far are judged as they are. The verdict is None when the client
        sent nothing before closing its side (why: "") or when a deadline (or the upstream's
        close) came first.
        """
        settings = self.settings
        verdict = self._read_charged(read, buffer, False) if buffer else None
        if verdict is not None:
            return buffer, verdict, ""
        limit = settings.first_bytes_timeout if provisional or buffer else settings.idle_timeout
        self.deadlines.set(limit)
        received = bytearray(buffer)  # grown in place: a trickle costs no copy per byte
        try:
            while True:
                data = await self.io.receive()
                if not data:
                    return (bytes(received), self._read_charged(read, received, True)
                            if received else None, "")
                if not received:
                    limit = settings.first_bytes_timeout  # set once: a trickle of bytes does
                    self.deadlines.set(limit)  # not extend it
                received += data
                verdict = self._read_charged(read, received, False, _read_started())
                if verdict is not None:
                    return bytes(received), verdict, ""
                await self._paced()  # (its wait is within the deadline)
        except asyncio.CancelledError:
            if not self.deadlines.expired():
                raise
            return bytes(received), None, (f"they were not complete within {limit:g}s"
                                           if received else f"none came within {limit:g}s")
        finally:
            self.deadlines.clear()

    def _read_charged(self, read: Callable[[bytes | bytearray, bool], Sniffed | None],
                      data: bytes | bytearray, ended: bool, started: float | None = None
                      ) -> Sniffed | None:
        """`read(data, ended)`, charged whole to the client from `started` (by default now):
        a read never waits (session 58's attack: a head costly to read, 15 to 29 ms, came
        with the CONNECT's, and was read uncharged)."""
        started = time.perf_counter() if started is None else started
        try:
            return read(data, ended)
        finally:
            self._charge_since(started)

    async def _judge(self, connect: Connect, sniffed: Sniffed | None, cut_short: str,
                     request: int, body_method: str = "", answer: bool = True,
                     hold: bool = False) -> bool:
        """Judge the client's first bytes (`request` 0), or the `request`-th request of a
        followed connection (`Connect.request`; the first of an HTTP proxy's is what its
        connect was opened for), or once its body may name another method (`body_method`
        says why: judged as any method); False (recorded, a 403 sent to HTTP if it may still
        `answer`) on a denial. An allowed request's verdict, with `hold`, waits in `_going`
        for the caller to record once it knows whether the request went."""
        claim = connect.claim(sniffed)
        addresses: list[IPAddress] | Decision | None = None
        if claim is not None and claim.name is not None:
            addresses = await self._resolve_claim(connect, claim.name)
        # An HTTP request, the first of a followed connection too, is judged and recorded as
        # every later one is, with its method and URL, the first under the connect's charge
        # (attack pass: a lone `POST /upload` left only the connect's record).
        if request or (sniffed is not None and sniffed.kind is Kind.HTTP):
            verdict: Verdict | None = connect.request(sniffed, claim, addresses,
                                                      first=request <= 1,
                                                      body_method=body_method)
        else:
            verdict = connect.first_bytes(sniffed, cut_short, claim, addresses)
        if verdict is None:
            return True  # nothing new: the connect's record stands
        if verdict.allowed and (hold or not request and sniffed is not None and
                                sniffed.kind is Kind.HTTP):  # (followed: recorded as it goes)
            self._going = verdict
            return True
        number = self._record_request(verdict)
        if verdict.allowed:
            return True
        if answer and sniffed is not None and sniffed.kind is Kind.HTTP:
            decision = verdict.decision
            await self._answer(answers.answer(403, decision.reason, decision.matched_rule,
                                              number))
        elif answer and sniffed is not None and sniffed.kind is Kind.TLS and not request:
            await self._answer(answers.TLS_ACCESS_DENIED)
        return False

    def _record_request(self, verdict: Verdict) -> int | None:
        """Record a request's verdict: an allowed one as not sent once the server broke the
        stream (last attack pass: it read as gone)."""
        follower = self._follower
        if verdict.allowed and follower is not None and follower.server_broke:
            verdict = _unsent(verdict, _UNSENT)
        return self._record(verdict)

    def _record_held_unsent(self, why: str) -> None:
        """Record the allowed request held for its send (`_going`), if one is, as never sent
        (`why`): its rules were charged (the reviews of session 57: it went unrecorded)."""
        going, self._going = self._going, None
        if going is not None:
            self._record(_unsent(going, why))

    async def _answer(self, data: bytes, silence: asyncio.Task[None] | None = None,
                      interim: bool = False) -> None:
        """guardd's own answer to the client, once the response bytes going out have gone
        (third attack pass: a 403 sent meanwhile cut a response short), and, on a followed
        connection, while the request has no answer yet (attack pass: the server's answer to a
        request still being judged, then the 403), which it then has unless `interim` (a 100
        Continue); `silence` (the task relaying responses) is cancelled first."""
        if self._to_client is None:
            await self.send_quietly(data)
            return
        if not await self._client_turn():
            return
        follower = self._follower
        try:
            if follower is not None and not follower.unanswered:
                return
            if silence is not None:
                silence.cancel()
            await self.send_quietly(data)
            if follower is not None and not interim:
                follower.answered()
        finally:
            self._to_client.release()

    async def _client_turn(self) -> bool:
        """Take the client's side (`_to_client`) once the response going out has gone; False
        when it has not within the idle timeout since bytes last moved (attack pass: behind a
        response stuck going to a client that stopped reading, this wait had no end, and the
        connection, its slot and its upstream stayed as long as the client's socket did)."""
        assert self._to_client is not None
        return await self._within(
            max(0.0, self._moved + self.settings.idle_timeout - time.monotonic()),
            self._to_client.acquire())

    async def proxy(self, follower: Follower) -> Origin | None:
        """The HTTP proxy's absolute-form requests, once `open` went to the origin the
        follower's next request names: followed as a tunnel's are, the first one judged as
        first bytes are, until the end, or until a request for another origin (returned: the
        listener opens a tunnel there, after `release`-ing this one)."""
        opened, connect, relay = self._opened, self.connect, self._relay
        assert opened is not None and connect is not None and relay is not None
        follower.switch(Origin(connect.host, connect.port))
        self._followed = True
        self.enter(Phase.RELAYING)
        return await self._follow(connect, opened, relay, follower, judged=0)

    def rejudged(self) -> Verdict | None:
        """After a reload: the denial that closes this connection, when it is open and the new
        policy would not open it (`Connect.rejudged`); the connection is settled by it (the
        caller records it, and nothing is recorded at the close)."""
        if self._opened is None or self.connect is None or self.phase is None:
            return None
        verdict = self.connect.rejudged(self._followed)
        if verdict is not None:
            self._settled = True
        return verdict

    def ways(self) -> tuple[Way, Way]:
        """What the connection holds in guardd each way, waiting for one end to take it (in its
        sockets' queues, its relay's pipes and its follower's reading), and what each end
        took (`memory`)."""
        out, back = self.io.ways()
        relay, follower = self._relay, self._follower
        piped = relay.buffered if relay is not None else (0, 0)
        read = follower.held if follower is not None else (0, 0)
        return (Way(out.held + piped[0] + read[0], out.taken),
                Way(back.held + piped[1] + read[1], back.taken))

    def cut(self) -> None:
        """The connection is cut, its record made by the caller (nothing is recorded at the
        close): its sockets close with a reset, which frees their queues at once (`memory`)."""
        self._settled = True
        self.io.client_resets()
        self.io.upstream_resets(True)

    def release(self) -> None:
        """The proxy's connection goes on elsewhere: close this tunnel's destination side only
        (its relay's pipes, its socket), never the client's."""
        self.leave()
        if self._relay is not None:
            self._relay.release()
            self.charged += self._relay.charged
            self._relay = None
        self.io.close_upstream()
        if self._opened is not None:
            self.guard.outbound.pop(self._opened.local, None)

    async def _follow(self, connect: Connect, opened: Opened, relay: Splice, follower: Follower,
                      judged: int) -> Origin | None:
        """Relay a plaintext HTTP/1.x connection request by request (`follow.Follower`): each
        request not `judged` already (as first bytes) is judged the same way, with its own
        method and Host, and charged to its rules, before any of it leaves; the first denied
        one gets its 403 and the connection is cut, as is a stream that stops being HTTP/1.x.
        Responses go back as they come (a head once it has ended), each request only after the
        previous response. (The relay's pipes stay unused.) Left part-way through a request,
        the server's side is reset, not closed. Returns the origin of a proxied request for
        elsewhere."""
        if relay.stop():  # the server spoke before the request: not an HTTP server
            self._record(connect.cut("the server sent bytes before the client's request"))
            self._record_held_unsent(_UNSENT)  # (its first request, judged and charged)
            return None
        self._moved = time.monotonic()
        self._to_client = asyncio.Lock()
        self._follower = follower
        loop = self.deadlines.loop
        wake = Signal(loop)  # the server or the client sent something, or went away
        room = Signal(loop)  # the follower's client bytes were read: it may take more
        responses = asyncio.create_task(self._responses(connect, follower, wake))
        client = asyncio.create_task(self._client_bytes(follower, wake, room))
        requests = 0
        head = Head("", b"")  # the request under way
        handed = False  # the follower handed out a request whose verdict `_going` holds
        sent = 0
        part_way = False  # some of a request went, and the part that ends it has not
        head_due: float | None = None  # when the head under way must have ended
        try:
            # (the server's close with the last response ends `responses`: the connection
            # still lingers when the client asked it closed, review)
            while not responses.done() or follower.reconnects or follower.finished:
                started = time.perf_counter()
                part = follower.next_request()
                judging = self._charge_since(started)
                if part is None:
                    if follower.finished:  # (the client asked it closed: once the response
                        if await self._client_turn():  # went out whole, the end)
                            self._to_client.release()
                            dropped, first_line = await self._linger(client, follower)
                            if dropped:
                                self._record(connect.dropped_after_last(
                                    dropped, follower.last_because,
                                    shown(first_line, SHOWN_LINE)))
                        return None
                    if client.done() and not follower.awaiting_response:
                        return None  # the client closed and nothing is owed to it: the end
                    if not follower.head_begun:
                        head_due = None
                    elif head_due is None:
                        head_due = time.monotonic() + self.settings.first_bytes_timeout
                    room.set()
                    wake.clear()
                    if not await self._woken(wake, client.done(), head_due):
                        if head_due is not None and time.monotonic() >= head_due:
                            self._record(connect.cut(
                                "a request head did not end within "
                                f"{self.settings.first_bytes_timeout:g}s"))
                        elif follower.head_held:  # (attack pass: cut without a word)
                            await self._head_unended(connect, client.done(), responses)
                        elif follower.awaiting_response and follower.answer_due:
                            await self._unanswered(connect, client.done(), responses)
                        return None  # else nothing either way for the idle timeout
                    continue
                if isinstance(part, Origin):  # (once the response before it went out whole)
                    if not await self._client_turn():
                        return None
                    self._to_client.release()
                    return part
                if isinstance(part, Broken):
                    if part.server:  # (review: a 403 and a second record followed)
                        await self._server_ended()
                        return None
                    # A proxy's request it cannot forward is refused as a first one is (no
                    # rule judged it: final review), a tunnel's stream cut under its rule; so
                    # is a proxy's once its head went (session 54's attack: a body that broke
                    # it was recorded as a refusal, as if nothing had gone).
                    refused = part.status != 403 and not follower.request_open
                    verdict = self.guard.refusal(
                        self.listener, f"HTTP request refused: {part.problem}",
                        target=part.target or connect.target, user=self.user) if refused else \
                        connect.cut(part.problem)
                    number = self._record(verdict)
                    if follower.unanswered:  # (no response is part-way back: the answer can go)
                        await self._answer(answers.answer(
                            part.status, verdict.decision.reason,
                            None if refused else verdict.decision.matched_rule, number,
                            answers.PROXY_CHALLENGE if part.status == 407 else ()),
                            silence=responses)
                    return None
                if isinstance(part, Head):
                    requests += 1
                    head = part
                    handed = True
                    # (a first request was judged as the first bytes: `judged`)
                    if requests > judged:
                        sniffed = sniff_head(part.data)
                        judging = self._charge_since(judging)  # (a read: charged whole)
                        if not await self._judge(connect, sniffed, "", request=requests,
                                                 hold=True):
                            return None
                    if part.continues:  # (allowed: the body may come, before the head goes)
                        await self._answer(answers.CONTINUE, interim=True)
                    if not await self._server_bytes_read(connect, follower, wake, responses,
                                                         client):
                        return None
                    going, self._going = self._going, None
                    assert going is not None or requests > judged  # (judged as first bytes)
                    if going is not None:
                        self._record_request(going)
                elif isinstance(part, BodyMethod):
                    sniffed = sniff_head(head.data)
                    judging = self._charge_since(judging)
                    if not await self._judge(connect, sniffed, "", request=requests,
                                             body_method=part.reason,
                                             answer=follower.unanswered):
                        return None
                if follower.server_broke:  # (while it was judged or waited: `_responses`
                    await self._server_ended()  # answered)
                    return None
                sending = self._charge_since(judging, _MOST_JUDGING)
                follower.sent()
                if part.data:
                    part_way = True  # (until all of this part went)
                    try:
                        forwarded = await self._forward(opened.upstream, part.data)
                    except OSError as exc:  # (the server reset, or went: its side says)
                        # (a reset the send met first reads as a close: review)
                        self._server_reset = isinstance(exc, ConnectionResetError)
                        await self._server_gone(connect, follower, responses)
                        return None
                    if not forwarded:
                        self._record(connect.cut(
                            "the server stopped reading the request: none of it went for "
                            f"{self.settings.idle_timeout:g}s (the idle timeout)"))
                        return None
                    sent += len(part.data)
                part_way = follower.request_open
                self._charge_since(sending, _MOST_SENDING)
                await self._paced(len(part.data))
        finally:
            client.cancel()
            responses.cancel()
            self.metrics.relay_bytes_outbound(sent)
            if handed:  # (judged, its rules charged, and the connection ended before it went)
                self._record_held_unsent(_ENDED_UNSENT)
            self._going = None  # (else first bytes h11 never read as a request: the cut says)
            if part_way:  # what went of a request ends no line, nor its body: a clean close
                self.io.upstream_resets(True)  # would end both for some servers
        return None

    async def _server_bytes_read(self, connect: Connect, follower: Follower, wake: Signal,
                                 responses: asyncio.Task[None], client: asyncio.Task[None]
                                 ) -> bool:
        """Before a request goes: wait until what the server sent is read (`_responses`), so
        bytes it sent before the request are not read as its answer (left open by session 56:
        when the response reading gave the loop up between a response's end and its next read,
        the next pipelined request went first, and the server's unasked bytes answered it).
        False (recorded) once nothing moved for the idle timeout (`first_bytes_timeout` once
        the client closed: the review), or the idle timeout since it began (session 57's
        attack: a client that read nothing and dripped bytes held it for as long as it
        dripped)."""
        due = time.monotonic() + self.settings.idle_timeout
        while (self._server_bytes_in_hand or await self.io.upstream_unread()) and \
                not responses.done() and not follower.server_broke:
            wake.clear()
            if not await self._woken(wake, client.done(), due):
                if not client.done():  # (else the client went: the request's record says)
                    self._record(connect.cut(
                        "the server's bytes sent before the next request were not read "
                        "within the idle timeout: the response before it had not gone out to "
                        "the client whole"))
                return False
        return True

    async def _server_gone(self, connect: Connect, follower: Follower,
                           responses: asyncio.Task[None]) -> None:
        """A request could not be sent: the server reset or went. Its side, read to its end,
        says what happened (`_responses`: the record, and the client's 502 when it has no
        answer yet); when it says nothing in time, the record says the request never went
        (attack pass 33: a bare close, and an allowed GET in the trail as if it had)."""
        await asyncio.wait([responses], timeout=self.settings.first_bytes_timeout)
        if not follower.server_broke:
            verdict = connect.server_closed("the request could not be sent")
            number = self._record(verdict)
            if follower.answer_due:
                await self._answer(answers.for_verdict(502, verdict, number),
                                   silence=responses)

    async def _linger(self, reading: asyncio.Task[None], follower: Follower
                      ) -> tuple[int, bytes]:
        """Close as RFC 9112 9.6 says, the response whole: guardd's side ends first, then what
        the client still sends is read and dropped until it closes, `_LINGER_SECONDS` and
        `_LINGER_BYTES` at most, each read charged and paced as any (review: closed with
        pipelined bytes unread, the kernel reset the connection and dropped what of a 4 MiB
        response it still held, 1.5 MiB). (`reading`: the task that read for the follower.)
        The client's bytes after its close, those the follower held and those dropped, and
        the first line of them (what a request dropped asked: session 59's attack)."""
        gone = reading.done()  # (the client's side ended, or failed: nothing more comes)
        reading.cancel()
        await asyncio.wait([reading])
        self.io.end_sending()
        dropped, opening = follower.left_unread, follower.unread_start
        if gone:
            return dropped, _first_line(opening)

        async def drop() -> None:
            nonlocal dropped, opening
            while dropped < _LINGER_BYTES:
                await self._paced()  # (its turn, once the client's share is spent)
                data = await self.io.receive()
                self._charge_since(_read_started())
                if not data:
                    return
                if not dropped:
                    data = data.lstrip(b"\r\n")
                if len(opening) < SHOWN_LINE and b"\n" not in opening:  # (a line cut
                    opening += data[:SHOWN_LINE]  # across reads is shown whole: review)
                dropped += len(data)

        try:
            await self._within(_LINGER_SECONDS, drop())
        except OSError:
            pass  # (reset: gone)
        return dropped, _first_line(opening)

    async def _head_unended(self, connect: Connect, client_closed: bool,
                            responses: asyncio.Task[None]) -> None:
        """A response head begun and not ended when the connection timed out: the cut is
        recorded, and the client told so (504) in its place."""
        verdict = connect.cut("the server's response head did not end within "
                              f"{self._waited(client_closed)}")
        number = self._record(verdict)
        await self._answer(answers.for_verdict(504, verdict, number), silence=responses)

    async def _unanswered(self, connect: Connect, client_closed: bool,
                          responses: asyncio.Task[None]) -> None:
        """A request that went whole, and nothing of its answer came back when the connection
        timed out: recorded, and the client told so (504) in its place."""
        verdict = connect.unanswered(f"{self._waited(client_closed)} after the request went")
        number = self._record(verdict)
        await self._answer(answers.for_verdict(504, verdict, number), silence=responses)

    def _waited(self, client_closed: bool) -> str:
        """How long `_woken` waited for the server before it gave up, and why that long."""
        settings = self.settings
        return (f"{settings.first_bytes_timeout if client_closed else settings.idle_timeout:g}s "
                f"({'the client had closed' if client_closed else 'the idle timeout'})")

    async def _server_ended(self) -> None:
        """The server's bytes broke the stream, or it closed: `_responses` recorded it and
        answers the client; once that went, the end."""
        if await self._client_turn():
            assert self._to_client is not None
            self._to_client.release()

    def _charge_since(self, started: float, most: float = math.inf) -> float:
        """Charge the work done since `started` (a `time.perf_counter()`), at most `most`, to
        the client's CPU share (`shares`); the time now, where the next stretch starts."""
        now = time.perf_counter()
        self._charge(min(now - started, most))
        return now

    def _charge(self, seconds: float) -> None:
        """Charge `seconds` of the connection's work to its client."""
        self.charged += seconds
        self.share.charge(seconds)

    async def pace(self) -> float:
        """Wait while the client's CPU share is spent (a listener, before a new connection's
        handshake: a client in debt opens no more meanwhile, denied ones included); when it
        went on (`handled`)."""
        await self._paced()
        return time.perf_counter()

    async def handshake_bytes(self) -> bytes:
        """The client's next bytes of its handshake (a SOCKS greeting or request, an HTTP
        proxy's request head). What the bytes before them brought is charged first, and a
        client whose share is spent waits its turn to be read (attack pass: a connection was
        charged 0.5 ms at most for it, however many reads; 250 connections sending heads a
        byte a send took a core, and other clients' requests and queries waited 7 to 20
        times as long)."""
        if self._handshake_read is not None:
            self.handshake_over()
            await self._paced()
        data = await self.io.receive()
        self._handshake_read = _read_started()
        self.began = self.began or bool(data)
        return data

    def handshake_over(self) -> None:
        """The handshake read so far is over: the work its last read brought is charged (the
        listener says so once it has read it all, whatever comes next)."""
        if self._handshake_read is not None:
            self._charge_since(self._handshake_read)
            self._handshake_read = None

    def handled(self, started: float) -> None:
        """A connection that went on at `started` (`pace`) is over: what its tunnels' stretches
        did not charge (its handshake, its answer) is charged, up to as much as a connect in
        all (re-attack: 8,000 denied connects a second were never charged enough to be paced;
        charged the open twice, a client of short connections got a quarter core, not half)."""
        relayed = self._relay.charged if self._relay is not None else 0.0
        seconds = min(time.perf_counter() - started, _MOST_CONNECTING) - self.charged - relayed
        if seconds > 0:
            self._charge(seconds)

    async def _paced(self, part: int = 0) -> None:
        """A `part` of that many bytes (a read, a part sent: `_PART_WEIGHT` at least) moved:
        once the connection moved `CHUNK` since it last let the loop run, it yields (a fast
        client and server on loopback never make a socket wait, and one upload must not hold
        every other connection and the DNS listener for seconds; session 54's attack: a
        stream read on as other bytes counted nothing it forwarded, and held the loop, the
        memory sweep and every other client's connects for as long as it went on). Unless
        the client spent its CPU share or has work waiting for it: then it waits its turn,
        behind every connection and relay of its own that waited before it (`turns`; attack
        pass: bodies of 1-byte chunks on 50 connections held the loop for minutes;
        re-attack: pipelined requests, whose judgement, record and sends were not charged,
        took it all the same; and 200 trickling connections that waited on timers of their
        own woke together and each did a read's work, at every refill)."""
        if await self._owed_turn():
            return
        self._unyielded += max(part, _PART_WEIGHT)
        if self._unyielded >= CHUNK:
            self._unyielded = 0
            await asyncio.sleep(0)
            await self._owed_turn()  # (its other connections may have spent it meanwhile)

    async def _owed_turn(self) -> bool:
        """Wait the client's turn when its CPU share is spent (True: it waited): before a read's
        work, and after `_paced` let the loop run (session 56's re-attack: 200 connections each
        read a step of a server's heavy heads before any found the share spent, 200 ms)."""
        if not self.share.owed():
            return False
        await self.share.turn()
        self._unyielded = 0
        return True

    async def _forward(self, upstream: socket.socket, data: bytes) -> bool:
        """Send a part of a request on to the server; False when it did not go within the idle
        timeout (attack pass: a server that stopped reading an upload held both sockets, the
        slot and megabytes of kernel buffers for as long as it kept its side open)."""
        return await self._within(self.settings.idle_timeout, self.io.forward(upstream, data))

    async def _within(self, seconds: float, step: Awaitable[object]) -> bool:
        """Await `step` for at most `seconds` (the tunnel's deadline); False when they ran
        out first."""
        self.deadlines.set(seconds)
        try:
            await step
            return True
        except asyncio.CancelledError:
            if not self.deadlines.expired():
                raise
            return False
        finally:
            self.deadlines.clear()

    async def _client_bytes(self, follower: Follower, wake: Signal, room: Signal) -> None:
        """The client's bytes into `follower` as they come (while it holds less than
        `PIPELINE_BUFFER` unread: pipelined requests wait in the kernel beyond that), until
        the client closes or goes away. Watching the client while a response is awaited is
        how a client that gives up is noticed at once. Once the client's CPU share is spent,
        each read waits its turn, as a first head's do (attack pass 25: a later head trickled
        on 240 connections was read and parsed at once, charged and never paced)."""
        try:
            while True:
                while follower.buffered >= PIPELINE_BUFFER:
                    room.clear()
                    await room.wait()
                await self._paced()  # (its turn, once the client's share is spent)
                data = await self.io.receive()
                started = _read_started()
                follower.client_data(data)
                self._charge_since(started)
                if not follower.awaiting_response:  # (behind a response that cannot go to
                    self._moved = time.monotonic()  # it, a client's bytes move nothing: a
                wake.set()                          # final attack pass dripped them)
                if not data:
                    return
        except OSError:
            return  # reset: gone
        finally:
            wake.set()

    async def _responses(self, connect: Connect, follower: Follower, wake: Signal) -> None:
        """The server's bytes back to the client as they come, through `follower` (which says
        where each response ends, and holds a head until it has) until the server closes."""
        received = 0
        reset = False
        to_client = self._to_client
        assert to_client is not None
        try:
            while True:
                try:
                    data = await self.io.receive_upstream()
                except OSError:  # (reset: the server's, as its close, unless part-way)
                    reset = True
                    break
                if not data:
                    reset = self._server_reset  # (met by the send first, it reads as a close)
                    break
                self._server_bytes_in_hand = True
                # A read dense with events goes a step at a time, each charged and paced
                # (session 55's attack: one of 1-byte chunks held the loop 48 ms).
                step: Callable[[], bytes | Broken] = functools.partial(
                    follower.response_data, data)
                await self._owed_turn()  # (before a read's work, as `_paced` after each step)
                while True:
                    started = _read_started()
                    events = follower.response_events
                    out = step()
                    self._server_bytes_in_hand = False
                    sending = self._charge_since(started)
                    if isinstance(out, Broken):
                        received += await self._server_broke(connect, follower, out)
                        return
                    if out:  # (else all of it is a head held: no byte moved, nor any the
                        #      client could see: attack pass, a head trickled for hours held
                        #      a gone client's slot)
                        async with to_client:
                            await self.io.send(out)
                        self._moved = time.monotonic()
                    received += len(out)
                    if not follower.awaiting_response:
                        wake.set()  # the response is over: the next request may go
                    self._charge_since(sending, _MOST_SENDING)
                    await self._paced(max(len(out) or len(data), _EVENT_WEIGHT *
                                           (follower.response_events - events)))
                    if not follower.response_continues:
                        break
                    step = follower.response_more
            if follower.response_pending:  # (it closed before the answer, part-way through
                # its head or body, or to end a body without a length)
                cut = reset and not follower.answer_due  # (a response that went in part)
                closed = follower.server_reset() if reset else follower.response_data(b"")
                if cut:
                    self.io.client_resets()
                if isinstance(closed, Broken):
                    await self._server_broke(connect, follower, closed)
        except OSError:
            return  # either side gone: the connection is over
        finally:
            wake.set()
            self.metrics.relay_bytes_inbound(received)

    async def _server_broke(self, connect: Connect, follower: Follower, broken: Broken) -> int:
        """The server's bytes broke the stream, or it closed (`Broken.server`): record the cut,
        or the close (`Broken.closed`: what happened, no denial), and send the client what of
        its bytes answers the request whole, else guardd's 502 in place of a response none of
        which went (unless `Broken.quiet`: the close alone). The server's bytes that went."""
        verdict = connect.server_closed(broken.problem) if broken.closed else \
            connect.cut(broken.problem)
        number = self._record(verdict)
        assert self._to_client is not None
        async with self._to_client:
            last = b"" if follower.settled or broken.quiet else broken.answered or (
                answers.for_verdict(502, verdict, number) if follower.answer_due else b"")
            follower.answered()
            if last:
                await self.io.send(last)
        return len(last) if last is broken.answered else 0

    async def _woken(self, wake: Signal, client_closed: bool,
                     head_due: float | None = None) -> bool:
        """Wait for `wake`; False once no byte moved either way for the idle timeout, or, once
        the client has closed its side, for `first_bytes_timeout` (a client that gave up on a
        response, or went away, no longer holds its slot for the idle timeout; one that only
        half-closed still gets a response that comes in that time), or at `head_due` (a
        request head under way: however it trickles). A response streaming back moves bytes
        without waking this wait: `_moved` says when they last did."""
        settings = self.settings
        limit = settings.first_bytes_timeout if client_closed else settings.idle_timeout
        def due() -> float:  # (bytes may move while it waits)
            idle = self._moved + limit
            return idle if head_due is None else min(idle, head_due)

        while True:
            self.deadlines.set(max(0.0, due() - time.monotonic()))
            try:
                await wake.wait()
                return True
            except asyncio.CancelledError:
                if not self.deadlines.expired():
                    raise
                if time.monotonic() >= due():
                    return False
            finally:
                self.deadlines.clear()

    async def _resolve_claim(self, connect: Connect, name: str) -> list[IPAddress] | Decision:
        """What guardd resolves a name claimed by the first bytes to (as for a CONNECT to it),
        or the denial that leaves it nothing usable, with its rule when a rule denied (a name
        it may not look up, `Connect.may_look_up`, never is)."""
        gate = connect.may_look_up(name)
        if not gate.allowed:
            return gate.because(f"guardd does not resolve it ({gate.reason})")
        no_room = self.guard.no_room(self.client)  # (its record must have room)
        if no_room:
            return own_denial(None, f"guardd does not resolve it: {no_room}")
        self._went_out = True
        try:
            addresses, why, denial = await self.resolver.lookup(name, self.client, self.account)
        except asyncio.CancelledError:
            self._cut_looking_up(connect, name)
            raise
        return addresses or (denial.because(why) if denial is not None else
                             own_denial(None, why))

    async def send_quietly(self, data: bytes) -> None:
        """Send a last word to the client, giving up after a second (it may not read)."""
        if data:
            try:
                await self._within(1.0, self.io.send(data))
            except OSError:
                pass


#: What one part or read of a connection weighs toward `CHUNK` at least (`Tunnel._paced`):
#: each costs a parse and a send whatever its size (attack pass: a body of 1-byte chunks moved
#: too few bytes for the loop to run between thousands of them).
_PART_WEIGHT = CHUNK // 16
#: Why a first hello that would upgrade a plaintext server in band is cut.
_UPGRADE_IN_HELLO = ("the TLS hello holds an in-band upgrade's request or another hello: a "
                     "server that reads it as lines (SMTP) would upgrade on it, unjudged")
_UPGRADE_AFTER_HELLO = ("the server did not answer the TLS hello with TLS, and the client sent "
                        "an in-band upgrade's request or another hello with it")
#: Why first bytes said nothing, when the client closed its side before any came.
SENT_NOTHING = "the client sent nothing"
#: The outcome of a request allowed while the server broke the stream or closed it: it never went.
_UNSENT = "not sent: the server broke the stream, or closed it, while it was judged"
#: The outcome of a request allowed and held for its send when the connection ended first.
_ENDED_UNSENT = "not sent: the connection ended before it went"
#: What each h11 event a server's read makes weighs (review: a 16 KiB read of 1-byte chunks is
#: 2,700 of them, 10 ms of parsing; counted by its bytes, the loop ran only every 16 reads): a
#: step of a full count of them (`follow.RESPONSE_EVENTS`, a head by its lines) is a `CHUNK`,
#: after which the loop runs (session 56's re-attack: at 1 KiB an event, eight heads of 990
#: lines, 6.5 ms, went at a time, and an agent's 32 connections held every other client 200 ms).
_EVENT_WEIGHT = CHUNK // RESPONSE_EVENTS


def _unsent(verdict: Verdict, why: str) -> Verdict:
    """An allowed request's verdict, recorded as never sent (`why`)."""
    return dataclasses.replace(verdict, record=dataclasses.replace(verdict.record, outcome=why))


def _read_started() -> float:
    """When the work a read brings started, for its charge (`Tunnel._charge_since`): now, less
    what the read cost the loop before (`_READ_COST`)."""
    return time.perf_counter() - _READ_COST


async def _into(found: list[bytes], step: Awaitable[bytes]) -> None:
    """Await `step` and keep what it gave in `found` (for `Tunnel._within`)."""
    found.append(await step)


def _ending(exc: BaseException | None) -> str:
    """What ended a connection while its first bytes were awaited, for the record."""
    if exc is None:
        return "the connection ended before the client's first bytes"
    if isinstance(exc, asyncio.CancelledError):
        return "guardd is shutting down"
    if isinstance(exc, (ConnectionError, OSError)):
        return f"the client's connection failed ({exc.strerror or exc})"
    return f"an error in guardd ({type(exc).__name__})"
