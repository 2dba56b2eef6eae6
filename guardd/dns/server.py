"""DNS listeners: `DNSService` turns one query into an answer; thin UDP and TCP adapters carry it.

Theory of operation. `DNSService.answer()` is called with the raw bytes of one query and returns
either the answer bytes at once (denied names, cache hits, errors: the hot path, no task, no
await), a coroutine that forwards to the upstreams and vets what comes back, or None (drop). The
policy decision is recorded through `Guard` before the answer exists; the adapters hand every
answer to `audit.after_flush`, so it leaves only after its record reached the disk in the batched
write of this loop turn. No exception may escape an adapter callback: a bad packet costs nothing
but its own answer.

The packet memo, as in PowerDNS's packet cache: a query whose bytes after the id were seen before
is answered without parsing or deciding again. Agents ask the same few names over and over, and a
stub's packet for a name does not change between asks. Only the two outcomes that depend on nothing
but those bytes and the policy are memoized: a denial (the NXDOMAIN answer, id aside, and its
prepared audit record) and a cache hit (the answer cache still decides whether the answer is
fresh; an expired one sends the query down the full path). The client check runs for every query,
and the memo is emptied with the cache whenever the policy changes.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from guardd.addr import AddrClass, IPAddress
from guardd.config import Endpoint
from guardd.dns import wire
from guardd.dns.cache import AnswerCache, CacheKey, cache_key
from guardd.dns.resolver import Reason, UpstreamFailure
from guardd.errors import DNSWireError
from guardd.guard import Guard
from guardd.metrics import Metrics
from guardd.policy.model import Decision, Effect

log = logging.getLogger("guardd.dns")

Answer = bytes | Coroutine[Any, Any, bytes] | None

_REFUSED_TYPES = frozenset({wire.QType.AXFR, wire.QType.IXFR})
_SERVED_CLASSES = frozenset({1, 255})  # IN and ANY; CHAOS and friends are not forwarded
_NOT_A_NAME = Decision(Effect.DENY, None, "query name is not a valid host name")
_MAX_CLIENT_MEMO = 65_536
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
MAX_FORWARDS = 10_000
TCP_MAX_CONNECTIONS = 512
TCP_MAX_PENDING = 64
#: Answers guardd did not get from upstream are never cached; remembered addresses need a TTL.
DEFAULT_REMEMBER_TTL = 60
#: Distinct query packets memoized; the memo starts over when full (it refills in one pass).
PACKET_MEMO_ENTRIES = 16_384
#: Larger packets are never memoized (a stub's query is far smaller), which bounds the memo's
#: keys at 8 MiB whatever a client pads its queries with.
PACKET_MEMO_MAX_BYTES = 512

#: A memoized answer: (query bytes, client, tcp) -> answer bytes, or None when it is stale.
MemoAnswer = Callable[[bytes, str, bool], bytes | None]


class Upstreams(Protocol):
    """What the service needs of `resolver.UpstreamResolver` (a fake in tests)."""

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False) -> bytes: ...


class DNSService:
    """Query bytes -> answer bytes, with policy, cache, upstream forwarding and answer vetting."""

    def __init__(self, guard: Guard, cache: AnswerCache, upstreams: Upstreams, metrics: Metrics,
                 client_allowed: Callable[[str], bool]) -> None:
        self.guard = guard
        self.cache = cache
        self.upstreams = upstreams
        self.metrics = metrics
        self._client_allowed = client_allowed
        self._client_memo: dict[str, bool] = {}
        self._packets: dict[bytes, MemoAnswer] = {}
        self.forwards = 0

    def policy_changed(self) -> None:
        """Forget answers and memoized decisions: the vetting behind them may have changed."""
        self.cache.clear()
        self._packets.clear()

    def answer(self, data: bytes, client: str, tcp: bool) -> Answer:
        allowed = self._client_memo.get(client)
        if allowed is None:
            allowed = self._remember_client(client)
        if allowed:
            memo = self._packets.get(data[2:])
            if memo is not None:
                reply = memo(data, client, tcp)
                if reply is not None:
                    return reply
        try:
            query = wire.parse_query(data)
        except DNSWireError as exc:
            if exc.rcode_hint == wire.DROP:
                return None
            reply = wire.formerr_from_bytes(data, exc.rcode_hint)
            if reply is not None:
                self.metrics.dns_query(0, exc.rcode_hint)
            return reply
        if not allowed:
            return self._reply(query, wire.Rcode.REFUSED,
                               (wire.EDE_PROHIBITED, "client is not in guardd's client networks"))
        if query.edns is not None and query.edns.version:
            return self._reply(query, wire.Rcode.BADVERS, None)
        if query.qtype in _REFUSED_TYPES or query.qclass not in _SERVED_CLASSES:
            return self._reply(query, wire.Rcode.REFUSED,
                               (wire.EDE_NOT_SUPPORTED, "guardd does not serve this query type"))
        name = query.name
        decision = _NOT_A_NAME if _not_a_name(name) else self.guard.dns_decision(name)
        qtype = wire.qtype_name(query.qtype)
        if not decision.allowed:
            return self._memoize(data, self._denied(query, decision))(data, client, tcp)
        if query.qtype == wire.QType.ANY:
            self.guard.record_dns(decision, client, name, qtype)
            self.metrics.dns_query(query.qtype, wire.Rcode.NOERROR)
            return wire.any_response(query)
        key = cache_key(query)
        if key in self.cache:  # the memo (and its prepared record) only for a hit
            memo = self._cached(query, key, decision)
            cached = memo(data, client, tcp)
            if cached is not None:
                self._memoize(data, memo)
                return cached
        self.metrics.dns_cache_miss()
        if self.forwards >= MAX_FORWARDS:
            return self._reply(query, wire.Rcode.SERVFAIL,
                               (wire.EDE_NOT_READY, "too many queries in flight"))
        return self._forward(query, data, decision, client, tcp)

    def _memoize(self, data: bytes, answer: MemoAnswer) -> MemoAnswer:
        if len(data) <= PACKET_MEMO_MAX_BYTES:
            if len(self._packets) >= PACKET_MEMO_ENTRIES:
                self._packets.clear()
            self._packets[data[2:]] = answer
        return answer

    def _denied(self, query: wire.Query, decision: Decision) -> MemoAnswer:
        """The memo of a denied query: its answer (the id aside), recorded for each client."""
        record = self.guard.dns_recorder(decision, query.name, wire.qtype_name(query.qtype))
        count = self.metrics.dns_query_counter(query.qtype, wire.Rcode.NXDOMAIN)
        tail = _blocked(query, decision)[2:]

        def answer(data: bytes, client: str, tcp: bool) -> bytes:
            record(client)
            count()
            return data[:2] + tail

        return answer

    def _cached(self, query: wire.Query, key: CacheKey, decision: Decision) -> MemoAnswer:
        """The memo of an allowed query: its answer while the cache holds one (under `key`)."""
        limit, name, qtype = query.udp_limit, query.name, query.qtype
        record = self.guard.dns_recorder(decision, name, wire.qtype_name(qtype))
        get, remember, hits = self.cache.get, self.guard.resolved.remember_cached, \
            self.metrics.dns_cache_hit
        counted = self.metrics.dns_query

        def answer(data: bytes, client: str, tcp: bool) -> bytes | None:
            cached = get(key, (data[0] << 8) | data[1])
            if cached is None:
                return None
            hits()
            record(client)
            remember(client, name)
            counted(qtype, cached[3] & 0xF)
            return cached if tcp else wire.set_tc_for_udp(cached, limit)

        return answer

    def _remember_client(self, client: str) -> bool:
        if len(self._client_memo) >= _MAX_CLIENT_MEMO:
            self._client_memo.clear()
        allowed = self._client_memo[client] = self._client_allowed(client)
        return allowed

    def _reply(self, query: wire.Query, rcode: int, ede: tuple[int, str] | None) -> bytes:
        self.metrics.dns_query(query.qtype, rcode)
        return wire.error_response(query, rcode, ede)

    async def _forward(self, query: wire.Query, data: bytes, decision: Decision, client: str,
                       tcp: bool) -> bytes:
        name, qtype = query.name, wire.qtype_name(query.qtype)
        try:
            answer, final, addresses, ttl = await self._resolve(query, data, decision, tcp)
        except UpstreamFailure as exc:
            ede = wire.EDE_NO_REACHABLE_AUTHORITY if Reason.TIMEOUT in exc.reasons \
                else wire.EDE_NETWORK_ERROR
            self.guard.record_dns(_with_reason(decision, f"upstream failed: {exc}"), client,
                                  name, qtype)
            return self._reply(query, wire.Rcode.SERVFAIL, (ede, "no upstream answered"))
        except DNSWireError as exc:
            self.guard.record_dns(_with_reason(decision, f"bad upstream answer: {exc}"), client,
                                  name, qtype)
            return self._reply(query, wire.Rcode.SERVFAIL,
                               (wire.EDE_INVALID_DATA, "upstream answer could not be used"))
        self.guard.record_dns(final, client, name, qtype,
                              ip=",".join(map(str, addresses)) or None)
        if addresses:
            self.guard.resolved.remember(client, name, addresses, ttl)
        self.metrics.dns_query(query.qtype, answer[3] & 0xF)
        return answer if tcp else wire.set_tc_for_udp(answer, query.udp_limit)

    async def _resolve(self, query: wire.Query, data: bytes, decision: Decision, tcp: bool
                       ) -> tuple[bytes, Decision, list[IPAddress], int]:
        """Forward, then vet (and cache) the answer; upstream errors propagate."""
        policy = self.guard.policy
        self.forwards += 1
        try:
            raw = await self.upstreams.resolve(data, prefer_tcp=tcp)
        finally:
            self.forwards -= 1
        if self.guard.policy is not policy:  # reloaded meanwhile: the policy now in force judges
            decision = self.guard.dns_decision(query.name)
            if not decision.allowed:
                return _blocked(query, decision), decision, [], 0
        return self._vet(query, raw, decision)

    async def lookup(self, name: str, decision: Decision, client: str
                     ) -> tuple[list[IPAddress], str]:
        """guardd's own resolution of a SOCKS target: vetted AAAA and A addresses (IPv6 first,
        through the same cache, upstreams and vetting as the agent's queries) and, when there
        are none, why. Never getaddrinfo: the addresses connected to are the ones vetted."""
        results = await asyncio.gather(*(self._lookup_type(name, qtype, decision, client)
                                         for qtype in (wire.QType.AAAA, wire.QType.A)))
        found = [ip for ips, _ in results for ip in ips]
        return found, "" if found else "; ".join(dict.fromkeys(why for _, why in results if why))

    async def _lookup_type(self, name: str, qtype: int, decision: Decision, client: str
                           ) -> tuple[list[IPAddress], str]:
        data = wire.build_query(name, qtype, secrets.randbits(16))
        query = wire.parse_query(data)
        cached = self.cache.get(cache_key(query), query.id)
        try:
            if cached is not None:
                self.metrics.dns_cache_hit()
                found = [r.address for r in wire.parse_response(cached).records
                         if r.address is not None and r.section is wire.Section.ANSWER]
                self.guard.resolved.remember_cached(client, name)
                return found, "" if found else f"{name} has no {wire.qtype_name(qtype)} record"
            self.metrics.dns_cache_miss()
            _, final, found, ttl = await self._resolve(query, data, decision, False)
        except (UpstreamFailure, DNSWireError) as exc:
            return [], f"cannot resolve {name}: {exc}"
        if not final.allowed:
            return [], final.reason
        if found:
            self.guard.resolved.remember(client, name, found, ttl)
        return found, "" if found else f"{name} has no {wire.qtype_name(qtype)} record"

    def _vet(self, query: wire.Query, raw: bytes, decision: Decision
             ) -> tuple[bytes, Decision, list[IPAddress], int]:
        """Check an upstream answer; returns (answer, decision, vetted addresses, TTL).

        A CNAME/DNAME into a name the policy does not resolve, or an answer whose every address
        is protected, becomes NXDOMAIN with EDE 17; protected addresses next to usable ones are
        removed. What is returned is what gets cached.
        """
        policy = self.guard.policy
        response = wire.parse_response(raw)
        drop: list[int] = []
        addresses: list[IPAddress] = []
        blocked: Decision | None = None
        for index, record in enumerate(response.records):
            if record.target is not None and record.section is wire.Section.ANSWER:
                target = policy.resolvable(record.target)
                if not target.allowed:
                    return self._filtered(query, Decision(
                        Effect.DENY, target.rule,
                        f"answer filtered: {record.name} is an alias of {record.target}, which "
                        f"is denied ({target.matched_rule}: {target.reason})", target.builtin,
                        overridden=True))
            elif record.address is not None:
                vetted = policy.vet_address(decision, query.name, record.address)
                if vetted.allowed:
                    if record.section is wire.Section.ANSWER:
                        addresses.append(record.address)
                    continue
                drop.append(index)
                self.metrics.dns_filtered_records.labels(
                    vetted.builtin.value if vetted.builtin else "rule").inc()
                if record.section is wire.Section.ANSWER and blocked is None:
                    blocked = Decision(Effect.DENY, decision.rule,
                                       f"answer filtered: {record.address} is a "
                                       f"{_class_text(vetted.builtin)} address ({vetted.reason})",
                                       vetted.builtin, overridden=True)
        if blocked is not None and not addresses:
            return self._filtered(query, blocked)
        if drop:
            raw = wire.strip_records(raw, drop)
            response = wire.parse_response(raw)
        self.cache.put(cache_key(query), raw, response)
        ttl = wire.min_ttl(response)
        return raw, decision, addresses, DEFAULT_REMEMBER_TTL if ttl is None else ttl

    def _filtered(self, query: wire.Query, decision: Decision
                  ) -> tuple[bytes, Decision, list[IPAddress], int]:
        return (wire.error_response(query, wire.Rcode.NXDOMAIN,
                                    (wire.EDE_FILTERED, decision.reason)), decision, [], 0)


def _blocked(query: wire.Query, decision: Decision) -> bytes:
    """The answer to a query for a name the policy denies: NXDOMAIN, EDE 15 with rule and reason."""
    return wire.error_response(query, wire.Rcode.NXDOMAIN,
                               (wire.EDE_BLOCKED, f"{decision.matched_rule}: {decision.reason}"))


def _with_reason(decision: Decision, reason: str) -> Decision:
    return Decision(decision.effect, decision.rule, reason, decision.builtin, decision.overridden)


def _class_text(klass: AddrClass | None) -> str:
    return klass.value if klass is not None else "denied"


def _not_a_name(name: str) -> bool:
    """Escaped bytes (see wire) or a numeric last label: an IP in disguise, never a name."""
    if "\\" in name:
        return True
    last = name[name.rfind(".") + 1:]
    return last.isdigit() or last.startswith("0x")


# --- asyncio adapters ----------------------------------------------------------------------------


class _Flusher(Protocol):
    def after_flush(self, callback: Callable[..., object], *args: object) -> None: ...


class UDPListener(asyncio.DatagramProtocol):
    """One UDP socket: every datagram is one query."""

    def __init__(self, service: DNSService, audit: _Flusher) -> None:
        self.service = service
        self.audit = audit
        self.transport: asyncio.DatagramTransport | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            result = self.service.answer(data, addr[0], False)
        except Exception:  # noqa: BLE001 - one query must never take the listener down
            log.exception("failed to answer a query from %s", addr[0])
            return
        if result is None:
            return
        if type(result) is bytes:
            self.audit.after_flush(self.transport.sendto, result, addr)  # type: ignore[union-attr]
            return
        task = asyncio.get_running_loop().create_task(self._finish(result, addr))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _finish(self, pending: Coroutine[Any, Any, bytes], addr: tuple[Any, ...]) -> None:
        try:
            reply = await pending
        except Exception:  # noqa: BLE001
            log.exception("failed to forward a query from %s", addr[0])
            return
        if self.transport is not None and not self.transport.is_closing():
            self.audit.after_flush(self.transport.sendto, reply, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("udp error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for task in self._tasks:
            task.cancel()


class TCPListener:
    """Accepts DNS-over-TCP connections; `connections` is shared state for the cap."""

    def __init__(self, service: DNSService, audit: _Flusher, idle_timeout: float) -> None:
        self.service = service
        self.audit = audit
        self.idle_timeout = idle_timeout
        self.connections: set[TCPConnection] = set()

    def __call__(self) -> TCPConnection:
        return TCPConnection(self)


class TCPConnection(asyncio.Protocol):
    """One client stream: length-prefixed queries in, answers out as they are ready (RFC 7766)."""

    def __init__(self, listener: TCPListener) -> None:
        self.listener = listener
        self.framer = wire.TcpFramer()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.pending = 0
        self._idle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.listener.connections) >= TCP_MAX_CONNECTIONS:
            transport.close()
            return
        self.listener.connections.add(self)
        self.peer = transport.get_extra_info("peername")[0]
        self._touch()

    def data_received(self, data: bytes) -> None:
        self._touch()
        try:
            messages = self.framer.feed(data)
        except DNSWireError:
            self._close()
            return
        for message in messages:
            try:
                result = self.listener.service.answer(message, self.peer, True)
            except Exception:  # noqa: BLE001
                log.exception("failed to answer a TCP query from %s", self.peer)
                continue
            if result is None:
                continue
            self.pending += 1
            if type(result) is bytes:
                self.listener.audit.after_flush(self._send, result)
            else:
                task = asyncio.get_running_loop().create_task(self._finish(result))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        if self.pending >= TCP_MAX_PENDING and self.transport is not None:
            self.transport.pause_reading()

    async def _finish(self, pending: Coroutine[Any, Any, bytes]) -> None:
        try:
            reply = await pending
        except Exception:  # noqa: BLE001
            log.exception("failed to forward a TCP query from %s", self.peer)
            self._send(None)
            return
        self.listener.audit.after_flush(self._send, reply)

    def _send(self, reply: bytes | None) -> None:
        self.pending -= 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply is not None:
            transport.write(wire.tcp_frame(reply))
        if self.pending < TCP_MAX_PENDING // 2:
            transport.resume_reading()

    def _touch(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(self.listener.idle_timeout,
                                                            self._close)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too once answers are written

    def connection_lost(self, exc: Exception | None) -> None:
        self.listener.connections.discard(self)
        self.transport = None
        if self._idle is not None:
            self._idle.cancel()
        for task in self._tasks:
            task.cancel()


def bind_socket(endpoint: Endpoint, kind: int) -> socket.socket:
    """A bound, non-blocking socket; IPv6 sockets are v6-only so 0.0.0.0 and :: can coexist."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        sock.bind((endpoint.host, endpoint.port))
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_pair(endpoint: Endpoint, attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on the same port (port 0: the kernel picks one free for both)."""
    for _ in range(attempts):
        tcp = bind_socket(endpoint, socket.SOCK_STREAM)
        port = tcp.getsockname()[1]
        try:
            udp = bind_socket(Endpoint(endpoint.host, port), socket.SOCK_DGRAM)
        except OSError:
            tcp.close()
            if endpoint.port:
                raise
            continue
        return udp, tcp
    raise OSError(f"no port free for both UDP and TCP on {endpoint.host}")
