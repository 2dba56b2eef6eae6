"""SOCKS5 listener: handshake -> guard -> vetted connect -> first-bytes check -> relay.

Theory of operation. Connections are plain non-blocking sockets driven with the loop's `sock_*`
calls, so that once a connection is judged, `relay.Relay` can splice its bytes in the kernel.
For each connection `_serve` runs the sans-I/O `protocol.SocksServer` until it yields a
`ConnectRequest`, then:

1. the host goes through `addr.parse_host`: an IP literal in any encoding is an address, never a
   name to resolve;
2. a name must be resolvable under the policy (else 0x02, and it is never looked up), then guardd
   resolves it itself (`DNSService.lookup`: own cache and upstreams, answers vetted) and judges
   every address; it connects only to an address it judged, IPv6 first, never re-resolving;
3. a decision that the HTTP method could change is accepted provisionally; the first bytes the
   client sends then decide (`sniff`): TLS SNI must be the CONNECT name or another allowed name,
   plaintext HTTP is judged with its method and Host;
4. every decision is recorded before the reply that carries it leaves.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from dataclasses import dataclass, field
from collections.abc import Callable
from typing import Protocol

from guardd.addr import Host, IPAddress, parse_host
from guardd.net import Endpoint, bind_socket
from guardd.dns.server import DNSService
from guardd.errors import InvalidHostError, SocksAuthError, SocksProtocolError
from guardd.guard import SOCKS_LISTENER, Guard
from guardd.metrics import Metrics
from guardd.policy.model import Decision, Effect
from guardd.stream.deadlines import Deadlines
from guardd.socks.protocol import NEED_DATA, ConnectRequest, Reply, SocksServer
from guardd.ratelimit import AuthThrottle, ClientCounts
from guardd.stream.relay import Relay
from guardd.stream.sniff import UNVERIFIABLE, Kind, Sniffed, sniff

log = logging.getLogger("guardd.socks")

READ_SIZE = 16 * 1024
_CONNECT_ERRORS = {errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
                   errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
                   errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
                   errno.ETIMEDOUT: Reply.TTL_EXPIRED}
_FORBIDDEN = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
              b"Content-Length: %d\r\n\r\n%s")


class _Flushable(Protocol):
    async def flushed(self) -> None: ...

    def after_flush(self, callback: Callable[..., object], *args: object) -> None: ...


@dataclass(frozen=True, slots=True)
class SocksSettings:
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    max_connections: int = 1024
    users: dict[str, str] = field(default_factory=dict)
    #: Once a client's first bytes start, the whole hello or head must be in within this many
    #: seconds, however it trickles; it is also how long a provisional connect (nothing flows
    #: yet) waits for them to start.
    first_bytes_timeout: float = 10.0
    #: Connections one client address may hold at once, so one client cannot take every slot.
    max_connections_per_client: int = 256


@dataclass(slots=True)
class _Judged:
    """A CONNECT's verdicts: for each address it may go to (IPv6 first), the decision and
    whether the first client bytes still decide (provisional). Once connected, `decision` and
    `provisional` are those of the address connected to."""

    #: (address, decision, provisional) for every address a connect may be tried to.
    candidates: list[tuple[IPAddress, Decision, bool]]
    #: The names the connect was judged as: the CONNECT name, or those the client had resolved
    #: to the address (none: judged by address alone). The first bytes are judged against them.
    known: tuple[str, ...]
    #: What the audit record names: the CONNECT name, or the names the client resolved there.
    shown: str | None
    decision: Decision
    provisional: bool = False


class SocksListener:
    """Accepts SOCKS5 clients on one or more sockets and serves each in its own task."""

    def __init__(self, guard: Guard, dns: DNSService, metrics: Metrics, audit: _Flushable,
                 settings: SocksSettings, client_allowed: Callable[[str], bool]) -> None:
        self.guard = guard
        self.dns = dns
        self.metrics = metrics
        self.audit = audit
        self.settings = settings
        self.client_allowed = client_allowed
        self.loop = asyncio.get_running_loop()
        self.deadlines = Deadlines(self.loop)
        self.auth_failures = AuthThrottle()
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._per_client = ClientCounts()
        #: Local (address, port) of every upstream connection guardd holds: a client connecting
        #: from one of them is guardd itself, come back through some route (a NAT, a forward).
        self._outbound: set[tuple[str, int]] = set()

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
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)
        for task in list(self._tasks):
            task.cancel()

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(64):  # a bounded batch per readiness: fair to the rest of the loop
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep serving the others
                log.warning("accept failed: %s", exc)
                return
            client = addr[0]
            refusal = self._refusal(client, addr[1])
            if refusal:
                self.metrics.socks_rejected()
                self.guard.record_refusal(SOCKS_LISTENER, client, refusal)
                self.audit.after_flush(conn.close)
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._per_client.add(client)
            task = self.loop.create_task(self._serve(conn, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _refusal(self, client: str, port: int) -> str:
        """Why a new connection from `client` is refused at once ("" when it is not)."""
        if (client, port) in self._outbound:
            return "the connection comes from guardd's own upstream socket (a loop)"
        if not self.client_allowed(client):
            return "client is not in guardd's client networks"
        if len(self._tasks) >= self.settings.max_connections:
            return f"every connection slot is taken ({self.settings.max_connections})"
        if self._per_client[client] >= self.settings.max_connections_per_client:
            return (f"client holds {self.settings.max_connections_per_client} connections, "
                    "its limit")
        return ""

    async def _serve(self, conn: socket.socket, client: str) -> None:
        states = self.metrics.socks_connections
        state = "handshake"
        states.enter(state)
        upstream: socket.socket | None = None
        outbound: tuple[str, int] | None = None
        try:
            protocol = SocksServer(self.settings.users or None)
            self.deadlines.set(self.settings.handshake_timeout)
            request = await self._handshake(conn, protocol, client)
            self.deadlines.clear()
            states.leave(state)
            state = "connecting"
            states.enter(state)
            opened = await self._judge_and_connect(conn, protocol, request, client)
            if opened is None:
                return
            upstream, judged, ip = opened
            outbound = upstream.getsockname()[:2]
            self._outbound.add(outbound)
            states.leave(state)
            state = "relaying"
            states.enter(state)
            await self._relay(conn, upstream, request, judged, ip, client,
                              protocol.trailing_data)
            upstream = None  # the relay closed it
        except SocksAuthError as exc:
            self.deadlines.clear()
            await self._authentication_failed(client, exc)
            await self._send_quietly(conn, protocol.data_to_send())
        except SocksProtocolError as exc:
            self.deadlines.clear()  # _send_quietly has a timeout of its own
            log.debug("socks protocol error from %s: %s", client, exc)
            self.guard.record_refusal(SOCKS_LISTENER, client, f"SOCKS request refused: {exc}")
            await self.audit.flushed()
            await self._send_quietly(conn, protocol.data_to_send())
        except asyncio.CancelledError:
            if not self.deadlines.expired():
                raise
            log.debug("socks connection from %s cut while %s: timed out, or the upstream went "
                      "away", client, state)
        except (ConnectionError, OSError) as exc:
            log.debug("socks connection from %s ended: %s", client, exc)
        except Exception:  # noqa: BLE001 - one connection must never take the listener down
            log.exception("socks connection from %s failed", client)
        finally:
            self.deadlines.clear()
            states.leave(state)
            conn.close()
            if upstream is not None:
                upstream.close()
            if outbound is not None:
                self._outbound.discard(outbound)
            self._per_client.remove(client)

    async def _authentication_failed(self, client: str, exc: SocksAuthError) -> None:
        """Record a refused RFC 1929 login; a failed check locks the client out for a while
        that grows with its recent failures (`AuthThrottle`), so guessing passwords costs time
        however many connections the guesser opens."""
        self.metrics.socks_auth_failures()
        self.guard.record_refusal(SOCKS_LISTENER, client, f"authentication failed: {exc}")
        if exc.checked:
            failures, locked = self.auth_failures.failed(client, self.loop.time())
            if failures in (1, 10, 100, 1000):
                log.warning("socks authentication failed for %s: %s (%d failures from it in "
                            "the last %.0fs; its logins are refused for %.1fs)", client, exc,
                            failures, AuthThrottle.WINDOW, locked)
        await self.audit.flushed()

    async def _handshake(self, conn: socket.socket, protocol: SocksServer, client: str
                         ) -> ConnectRequest:
        while True:
            locked = self.auth_failures.locked(client, self.loop.time())
            protocol.logins_refused = f"failed logins lock this client out for {locked:.1f}s " \
                "more" if locked else ""
            event = protocol.next_event()
            pending = protocol.data_to_send()
            if pending:
                await self.loop.sock_sendall(conn, pending)
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self._receive(conn)
            if not data:
                raise ConnectionResetError("client closed during the handshake")
            protocol.receive_data(data)

    async def _receive(self, conn: socket.socket) -> bytes:
        """The client's next bytes: at once when they are already there (uvloop's sock_recv
        always watches the socket and waits for the next loop turn first), else when they come."""
        try:
            return conn.recv(READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return await self.loop.sock_recv(conn, READ_SIZE)

    async def _send_quietly(self, conn: socket.socket, data: bytes) -> None:
        if data:
            try:
                async with asyncio.timeout(1.0):
                    await self.loop.sock_sendall(conn, data)
            except (OSError, TimeoutError):
                pass

    async def _refuse(self, conn: socket.socket, protocol: SocksServer, reply: Reply,
                      decision: Decision, request: ConnectRequest, client: str,
                      name: str | None, ip: IPAddress | None) -> None:
        """Record the denial, then tell the client (the record is on disk first)."""
        self.guard.record_connect(decision, client, _target(request), name, ip, request.port)
        await self.audit.flushed()
        await self._send_quietly(conn, protocol.reply(reply))

    async def _judge_and_connect(self, conn: socket.socket, protocol: SocksServer,
                                 request: ConnectRequest, client: str
                                 ) -> tuple[socket.socket, _Judged, IPAddress] | None:
        try:  # an address sent as one needs no parsing; a domain may still be one, encoded
            host = Host(None, request.address) if request.address is not None \
                else parse_host(request.host)
        except InvalidHostError as exc:
            await self._refuse(conn, protocol, Reply.HOST_UNREACHABLE,
                               Decision(Effect.DENY, None, f"invalid host: {exc}"), request,
                               client, None, None)
            return None
        judged = await self._judge(host.name, host.ip, request.port, client)
        if isinstance(judged, tuple):
            reply, decision = judged
            await self._refuse(conn, protocol, reply, decision, request, client, host.name,
                               host.ip)
            return None
        opened = await self._connect(judged, request.port, client)
        if isinstance(opened[0], Reply):
            reply, decision, address = opened
            await self._refuse(conn, protocol, reply, decision, request, client, judged.shown,
                               address)
            return None
        upstream, ip = opened[0], opened[2]
        try:
            if not judged.provisional:
                self.guard.record_connect(judged.decision, client, _target(request),
                                          judged.shown, ip, request.port)
                await self.audit.flushed()
            bound = upstream.getsockname()
            await self.loop.sock_sendall(conn, protocol.reply(Reply.SUCCEEDED, bound[0],
                                                              bound[1]))
        except BaseException:
            upstream.close()
            raise
        return upstream, judged, ip

    async def _judge(self, name: str | None, ip: IPAddress | None, port: int, client: str
                     ) -> _Judged | tuple[Reply, Decision]:
        """The decision for a CONNECT, or the reply and decision that refuse it."""
        guard = self.guard
        if name is not None:
            gate = guard.policy.resolvable(name)
            if not gate.allowed:
                return Reply.NOT_ALLOWED, gate  # denied names are never looked up
            addresses, why = await self.dns.lookup(name, gate, client)
            if not addresses:
                return Reply.HOST_UNREACHABLE, Decision(Effect.DENY, gate.rule,
                                                        f"no usable address: {why}")
        else:
            assert ip is not None
            addresses = [ip]
        verdicts = [(address, guard.judge_connect(name, address, port, client))
                    for address in sorted(addresses, key=lambda a: -a.version)]
        candidates = []
        for address, verdict in verdicts:
            depends = guard.depends_on_method(name, address, port, client, verdict)
            if verdict.allowed or depends:
                candidates.append((address, verdict, depends))
        if not candidates:
            return Reply.NOT_ALLOWED, verdicts[0][1]
        known = guard.known_names(name, addresses[0], client)  # as judged, now
        return _Judged(candidates, known, ",".join(known) or None, candidates[0][1])

    async def _connect(self, judged: _Judged, port: int, client: str
                       ) -> tuple[socket.socket, Decision, IPAddress] | tuple[Reply, Decision,
                                                                              IPAddress]:
        """Connect to the first vetted address that answers, in `judged`'s order (IPv6 first):
        (socket, decision, address), with `judged` set to that address's verdict; or why none
        (reply, decision, address: a rate limit's refusal before a failed connect). Each
        address is charged to its own rule's rate limit before it is tried (a rule once per
        connect, however many of its addresses are tried): the rule of the address connected to
        is the one counted."""
        denied: tuple[Reply, Decision, IPAddress] | None = None
        failed: tuple[Reply, Decision, IPAddress] | None = None
        charged: dict[str, Decision] = {}
        started = time.monotonic()
        self.deadlines.set(self.settings.connect_timeout)  # for all the attempts together
        try:
            for ip, verdict, provisional in judged.candidates:
                if not provisional:
                    key = verdict.matched_rule
                    verdict = charged[key] if key in charged else charged.setdefault(
                        key, self.guard.rate_limit(verdict, client))
                    if not verdict.allowed:
                        denied = denied or (Reply.NOT_ALLOWED, verdict, ip)
                        continue
                sock = socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                                     socket.SOCK_STREAM)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    await self.loop.sock_connect(sock, (str(ip), port))
                except asyncio.CancelledError:
                    sock.close()
                    if not self.deadlines.expired():
                        raise
                    self.metrics.socks_connect_attempts.counter("ttl_expired")()
                    return Reply.TTL_EXPIRED, _connect_failed(Reply.TTL_EXPIRED, verdict), ip
                except OSError as exc:
                    reply = _CONNECT_ERRORS.get(exc.errno or 0, Reply.GENERAL_FAILURE)
                    self.metrics.socks_connect_attempts.counter(reply.name.lower())()
                    sock.close()
                    failed = (reply, _connect_failed(reply, verdict), ip)
                    continue
                self.metrics.socks_connect_attempts.counter("ok")()
                self.metrics.socks_connect_seconds.observe(time.monotonic() - started)
                judged.decision, judged.provisional = verdict, provisional
                return sock, verdict, ip
        finally:
            self.deadlines.clear()
        refusal = denied or failed
        assert refusal is not None, "a _Judged has at least one candidate"
        return refusal

    async def _relay(self, conn: socket.socket, upstream: socket.socket,
                     request: ConnectRequest, judged: _Judged, ip: IPAddress,
                     client: str, early: bytes) -> None:
        """Relay, after the first client bytes (`early`: those sent before the reply) passed.

        A server that speaks first (SMTP, SSH) is heard at once, unless the decision itself waits
        for the first bytes (provisional): then nothing flows either way before it is made.
        """
        task = asyncio.current_task()
        ended = ""  # what cut the wait for the first bytes short, if anything did

        def closed_early(_: Relay) -> None:  # the upstream went away while we wait for the client
            nonlocal ended
            if waiting and task is not None:
                ended = "the destination closed the connection first"
                self.deadlines.cut(task)

        relay = Relay(conn, upstream, self.settings.idle_timeout, on_close=closed_early)
        waiting, passed = True, False
        if not judged.provisional:
            relay.start(inbound_only=True)
        try:
            first, verdict, cut_short = await self._first_bytes(conn, early, judged.provisional)
            cut_short = ended or cut_short  # the upstream's close explains a cut best
            if first or judged.provisional:
                if not await self._check_first(conn, first, verdict, request, judged, ip, client,
                                               cut_short or "the client sent nothing"):
                    return
                if first:
                    await self.loop.sock_sendall(upstream, first)
            elif cut_short:
                return  # an allowed connect that never spoke before its deadline or upstream
            passed = True  # (a client that closed its side at once still hears the server)
        finally:
            waiting = False
            if not passed:
                relay.close()
        if judged.provisional:
            relay.start()
        else:
            relay.start_outbound()
        try:
            sent, received = await relay.wait()
        finally:
            relay.close()  # a shutdown cancels the wait: the relay must not outlive its task
        self.metrics.relay_bytes_outbound(sent + len(first))
        self.metrics.relay_bytes_inbound(received)
        log.debug("socks %s -> %s closed: %d bytes out, %d in, %.1fs", client, _target(request),
                  sent + len(first), received, time.monotonic() - relay.started)

    async def _first_bytes(self, conn: socket.socket, buffer: bytes, provisional: bool
                           ) -> tuple[bytes, Sniffed | None, str]:
        """Read until the sniffer has a verdict: (bytes, verdict, why there is none).

        Waiting for the first byte is bounded by the idle timeout, or by `first_bytes_timeout`
        when nothing flows meanwhile (provisional); from the first byte on, the whole hello or
        head must be in within `first_bytes_timeout`, however slowly it trickles. At the client's
        half-close the bytes so far are judged as they are. The verdict is None when the client
        sent nothing before closing its side (why: "") or when a deadline (or the upstream's
        close) came first.
        """
        settings = self.settings
        verdict = sniff(buffer) if buffer else None
        if verdict is not None:
            return buffer, verdict, ""
        limit = settings.first_bytes_timeout if provisional or buffer else settings.idle_timeout
        self.deadlines.set(limit)
        received = bytearray(buffer)  # grown in place: a trickle costs no copy per byte
        try:
            while True:
                # Always through the loop (never `_receive`'s shortcut): a client that keeps
                # bytes queued would otherwise hold the loop, its deadline and everyone else.
                data = await self.loop.sock_recv(conn, READ_SIZE)
                if not data:
                    return bytes(received), sniff(received, eof=True) if received else None, ""
                if not received:
                    limit = settings.first_bytes_timeout  # set once: a trickle of bytes does
                    self.deadlines.set(limit)  # not extend it
                received += data
                verdict = sniff(received)
                if verdict is not None:
                    return bytes(received), verdict, ""
        except asyncio.CancelledError:
            if not self.deadlines.expired():
                raise
            return bytes(received), None, (f"they were not complete within {limit:g}s"
                                           if received else f"none came within {limit:g}s")
        finally:
            self.deadlines.clear()

    async def _resolve_claim(self, name: str, client: str) -> list[IPAddress] | str:
        """What guardd resolves a name claimed by the first bytes to (through its own cache,
        upstreams and vetting, as for a CONNECT to it), or why nothing usable (a name the policy
        does not resolve is never looked up)."""
        gate = self.guard.policy.resolvable(name)
        if not gate.allowed:
            return f"guardd does not resolve it ({gate.matched_rule}: {gate.reason})"
        addresses, why = await self.dns.lookup(name, gate, client)
        return addresses or why

    async def _check_first(self, conn: socket.socket, first: bytes, verdict: Sniffed | None,
                           request: ConnectRequest, judged: _Judged, ip: IPAddress, client: str,
                           ended: str) -> bool:
        """Judge the first client bytes (`verdict`: what the sniffer made of them); False
        (recorded, connection to be cut) on a denial."""
        guard = self.guard
        claim = guard.claim(verdict, judged.known, ip, request.port)
        addresses = await self._resolve_claim(claim.name, client) \
            if claim is not None and claim.name is not None else None
        decision = guard.judge_first_bytes(verdict, judged.decision, judged.known, ip,
                                           request.port, client, judged.provisional, ended,
                                           claim, addresses)
        if decision is None:
            return True  # nothing new: the connect's record stands
        method = verdict.method if verdict is not None else None
        named = verdict.name if verdict is not None else None
        guard.record_connect(decision, client, _target(request),
                             named if named not in (None, UNVERIFIABLE, str(ip)) else judged.shown,
                             ip, request.port, method)
        await self.audit.flushed()
        if decision.allowed:
            return True
        if verdict is not None and verdict.kind is Kind.HTTP:
            body = f"guardd: {decision.matched_rule}: {decision.reason}\n".encode()
            await self._send_quietly(conn, _FORBIDDEN % (len(body), body))
        return False


def _connect_failed(reply: Reply, verdict: Decision) -> Decision:
    return Decision(Effect.DENY, verdict.rule,
                    f"connect failed: {reply.name.lower().replace('_', ' ')}")


def _target(request: ConnectRequest) -> str:
    host = f"[{request.host}]" if ":" in request.host else request.host
    return f"{host}:{request.port}"
