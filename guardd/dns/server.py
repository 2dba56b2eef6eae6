"""DNS listeners: `DNSService` turns one query into an answer; thin UDP and TCP adapters carry it.

Theory of operation. `DNSService.answer()` is called with the raw bytes of one query and returns
either the answer bytes at once (denied names, refusals, cache hits, errors: the hot path, no
task, no await), a coroutine that forwards to the upstreams and vets what comes back, or None
(drop). Every decision, each refusal included (a client outside `clients`, zone transfers, classes
other than IN, EDNS versions other than 0, too many queries in flight), is recorded through
`Guard` with its reason before the answer exists; the adapters hand every answer to
`audit.after_flush`, so it leaves only after its record reached the disk in the batched write of
this loop turn. No exception may escape an adapter callback: a bad packet costs nothing but its
own answer.

Forwarding. What goes upstream is never the client's packet but the query guardd builds from the
cache key (`cache.upstream_query`: the question, the EDNS and DO state), so no record, option,
flag or trailing byte of a client's reaches whoever runs or watches the upstream; the answer goes
back as the answer to the client's own query (`wire.as_asked`: its id, RD/CD flags and question).
Forwards in flight are bounded in total (`MAX_FORWARDS`) and per client (`CLIENT_MAX_FORWARDS`),
across every principal's service (`InFlight`), counted from the moment `answer()` hands out the
coroutine (a TCP client's pipelined burst gets all its coroutines before any runs), so a client
that floods names the upstream never answers gets SERVFAIL itself and leaves the others served.

Vetting (`vet_records`). An upstream answer of more than `wire.MAX_RESPONSE_RECORDS` records is
refused before it is walked. In any section, an alias (CNAME, DNAME) into a name the policy does
not resolve withholds the whole answer (NXDOMAIN, EDE 17). The answer section keeps only records
linked to the question: owned by the query name or a name its CNAME/DNAME chain reaches (each of
which must be resolvable too). Every address a record carries (A, AAAA, the SVCB/HTTPS hints) is
vetted like an answer: in the chain under the query's decision, elsewhere under its owner's, whose
records are dropped when the owner is denied. An NS, MX, SRV, SVCB or HTTPS answer that points at
a denied name is dropped. When no record of the asked type survives such a drop, the answer is
withheld; otherwise the dropped records are stripped and the audit reason says which and why.
Only the chain's A/AAAA addresses are remembered for connect-by-IP, for the answer's lifetime,
and TTLs are capped (`AnswerCache.put`) on the first answer as on every cached copy.

The packet memo, as in PowerDNS's packet cache: a query whose bytes after the id were seen before
is answered without parsing or deciding again. Agents ask the same few names over and over, and a
stub's packet for a name does not change between asks. Only the two outcomes that depend on nothing
but those bytes and the policy are memoized, as typed entries: a denial (`_Denied`: its verdict,
whose record is encoded once, and the NXDOMAIN answer, id aside) and a cache hit (`_Cached`: the
answer cache still decides whether the answer is fresh; an expired one sends the query down the
full path). A verdict a rate limit takes part in is never memoized: every query is charged. A
packet is memoized the second time it is seen: a tunnel's or an exfiltration's names are each
asked once, and leave nothing but their bytes behind (a set the garbage collector does not walk).
The client check runs for every query, and the memo is emptied with the cache whenever the policy
changes.

DNS over TCP (`TCPListener`, `TCPConnection`): connections are bounded in total and per client,
clients outside `clients` get none, and a connection closes after `idle_timeout` without a whole
query or an answer: a trickle of bytes that never completes a query cannot hold a slot. At most
`TCP_MAX_PENDING` answers of one connection are outstanding, `TCP_MAX_FORWARDS` of them
forwarded, and at most `TCP_MAX_OWED` bytes of them made and not yet written to the kernel;
more queries wait unread, as they do while the client does not read its answers (the
transport's write buffer is full).

CPU shares (`guardd.shares`, the same buckets the proxies' connections spend): what answering a
client's query costs the loop is charged to its client, with `QUERY_COST` for the read, the
send and the record around it, and a forwarded query's vetting of the upstream answer
(`MAX_RESPONSE_HINTS` bounds what one answer may cost); so is a TCP read that completes no
query (a frame trickled a byte a send). While a client owes, with another one
active, its datagrams wait their turn among its connections' (`guardd.turns`: up to
`UDP_HELD_PER_CLIENT` of them, the rest dropped for the cost of a lookup: its resolver asks
again) and its TCP connections read and answer nothing more until its share has refilled
(attack pass: one client's UDP flood timed out everyone's queries, and 16 pipelining TCP
connections took the loop from every listener). Datagrams from outside `clients` spend one
share of them all, a tenth of a core (`OUTSIDE_CLIENTS`). Dropped at once, as they were before the
relays were charged too, a client whose downloads spent its share lost half its own queries
(attack pass, 2026-12-04).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from guardd.addr import IPAddress, counted_as, forged_source, on_host
from guardd.dns import wire
from guardd.dns.cache import AnswerCache, CacheKey, cache_key, upstream_query
from guardd.dns.resolver import Reason, ResolverStopped, UpstreamFailure
from guardd.errors import DNSWireError
from guardd.guard import DNS_LISTENER, NOT_A_CLIENT, Guard, Verdict
from guardd.metrics import QTYPE_LABELS, Metrics
from guardd.net import RESET_ON_CLOSE, socket_queues
from guardd.policy.model import DNS_QUERY, Decision, own_denial
from guardd.ratelimit import ClientCounts
from guardd.shares import CpuShares
from guardd.stream.deadlines import Deadlines
from guardd.turns import Turns

log = logging.getLogger("guardd.dns")

Answer = bytes | Coroutine[Any, Any, bytes] | None

_REFUSED_TYPES = frozenset({wire.QType.AXFR, wire.QType.IXFR})
_ZONE_TRANSFER = "zone transfers are not served"
#: What a query or lookup that failed by an error of guardd's own says (its log has the rest).
_OWN_ERROR = "guardd's own error while the name was resolved (see its log)"
#: Query types of the meta range (RFC 6895 3.1) below IXFR: unassigned ones, TKEY, TSIG.
_META_RANGE = range(128, 251)
#: Query types for private use (RFC 6895 3.1).
_PRIVATE_RANGE = range(65280, 65535)


def _no_question(qtype: int) -> int | None:
    """The rcode for a type no question asks, as BIND answers them (None: another type):
    FORMERR for the reserved 0 and 65535 and the meta-types, which only go with a transaction
    or its EDNS (OPT, TKEY, TSIG, the unassigned ones); NOTIMP for the obsolete mailbox types
    (MAILB, MAILA) and those for private use. None goes upstream, where each was 16 bits of
    the agent's choosing more in a query (attack pass and review, 2026-12-06). (Unassigned
    data types still go, as types assigned since guardd was written would: counted by the
    tunnel detector's `maxUnusualTypes`.)"""
    if qtype in (0, 65535, wire.QType.OPT) or qtype in _META_RANGE:
        return wire.Rcode.FORMERR
    if qtype in (253, 254) or qtype in _PRIVATE_RANGE:
        return wire.Rcode.NOTIMP
    return None


#: What guardd's own lookup of one type found (`DNSService.lookup`): the vetted addresses, why
#: there are none, and the policy's denial when one is why.
_Found = tuple[list[IPAddress], str, Decision | None]


class InFlight:
    """Forwards in flight, in total and per client (only clients with one in flight), shared by
    every principal's service (session 57's review: each counted its own, and a client whose
    logins map it under several principals held each one's `CLIENT_MAX_FORWARDS`)."""

    __slots__ = ("total", "by_client")

    def __init__(self) -> None:
        self.total = 0
        self.by_client = ClientCounts()


@dataclass(slots=True)
class _Joined:
    """A lookup of guardd's own under way (`DNSService._lookup_type`), and how many connects
    wait for it."""
    lookup: asyncio.Future[_Found]
    waiting: int = 0


_MAX_CLIENT_MEMO = 65_536
MAX_FORWARDS = 10_000
#: One client's share of MAX_FORWARDS: far more than a stub has in flight, and a small part.
CLIENT_MAX_FORWARDS = 256
TCP_MAX_CONNECTIONS = 512
#: RFC 7766 clients use one connection; a few more for several stubs behind one address.
TCP_MAX_PER_CLIENT = 16
TCP_MAX_PENDING = 64
#: Bytes of answers one TCP connection may owe (made and not yet written to the kernel): past
#: them its queries wait unread (attack pass 20: 64 pipelined queries for a cached 45 KB
#: answer, never read, held 3 MB a connection). Forwards in flight count once they are back.
TCP_MAX_OWED = 256 * 1024
#: Forwards of one TCP connection in flight at once: each answer may bring 64 KiB when it is
#: back (review: 64 of them on one connection owed 1.3 MB).
TCP_MAX_FORWARDS = 8
#: Source addresses a UDP listener keeps the client of (started over when full).
_KEPT_SOURCES = 65_536
#: Datagrams of a client that owes held for its turn (a stub asks A and AAAA for a few names
#: at once), of all clients together on one socket, and the largest held (a query with EDNS
#: takes a few hundred bytes; a larger one is dropped): about 1.2 MB a socket at most.
UDP_HELD_PER_CLIENT = 32
UDP_HELD = 1024
UDP_HELD_SIZE = 1232
#: What a query costs the loop beyond its answer's own work (charged with it to the client's
#: CPU share): the read and its callback, the answer's send, its record's hash at the flush.
#: Measured on this project's 2-core VM: under a flood of unique denied names a query cost
#: about 20 us over UDP and 24 over TCP all told, of which the answer's own work was 13 and 16.
QUERY_COST = 8e-6
#: The CPU share every UDP source outside `clients` spends, as one client (no address is
#: spelled so) that is never active (`CpuShares.charge`): held back while a client is, it
#: holds no one back. Their datagrams are recorded and never answered, and were no one's to
#: charge, so a flood of them took the loop from every client (2026-12-06). Their work is
#: charged `OUTSIDE_CLIENTS_WEIGHT` times over: their share is a fifth of a client's (review:
#: an agent that also flooded from forged outside sources took a second client's share).
OUTSIDE_CLIENTS = "outside clients"
OUTSIDE_CLIENTS_WEIGHT = 5
#: `guardd_dns_queries_dropped_total`'s reason for a UDP query from outside `clients` (or from
#: an IPv6 address of guardd's host: `FORGEABLE`).
NOT_A_CLIENT_DROP = "not_a_client"
#: Why a UDP query from an IPv6 address of guardd's host is not loopback's (`forgeable_on_host`).
FORGEABLE = ("an IPv6 address of guardd's own host, which any agent on a link may send from "
             "(ask over ::1 or TCP)")
#: Why a UDP query on a socket bound to loopback from an IPv6 address that is not the host's is
#: never answered (`forged_on_loopback`).
FORGED_ON_LOOPBACK = ("an IPv6 source that is none of guardd's host's, on a socket bound to "
                      "loopback, which only the host reaches: a process there chose it (ask "
                      "from ::1, or over TCP)")
#: Seconds a closing connection has to take the answers it was written: a close waits for
#: the write buffer to drain, and a client that never reads held its slot for good (review).
TCP_CLOSE_GRACE = 5.0
#: Seconds between two looks at what a closing connection still has to send.
TCP_CLOSE_LOOK = 0.25
#: Answers guardd did not get from upstream are never cached; remembered addresses need a TTL.
DEFAULT_REMEMBER_TTL = 60
#: Distinct query packets memoized; the memo starts over when full (it refills in one pass).
PACKET_MEMO_ENTRIES = 16_384
#: Larger packets are never memoized (a stub's query is far smaller), which bounds the memo's
#: keys at 8 MiB whatever a client pads its queries with.
PACKET_MEMO_MAX_BYTES = 512


@dataclass(frozen=True, slots=True)
class _Denied:
    """Memo of a denied query: its verdict (for its name: `Guard.for_name`) and its answer
    after the id."""

    verdict: Verdict
    tail: bytes
    count: Callable[[], None]


@dataclass(frozen=True, slots=True)
class _Cached:
    """Memo of an allowed query with a cached answer (under `key`, as built: `wire.as_built`)."""

    verdict: Verdict
    #: The name to commit the verdict with (None: the verdict's record has it, as in the memo).
    name: str | None
    query: wire.Query
    key: CacheKey
    #: The cached answer fits the query as it is (no `wire.as_asked` needed).
    plain: bool
    #: The cached answer's own verdict `verdict` was made from (the packet memo's), if any.
    answered: Verdict | None = None


#: Why a query is refused whose client changed under it (`DNSService._left`).
_LEFT = ("a reload changed whose the client is (another principal's, no principal's, or no "
         "client of guardd's) while its query was under way: ask again")


class Upstreams(Protocol):
    """What the service needs of `resolver.UpstreamResolver` (a fake in tests)."""

    async def resolve(self, query: bytes, *, prefer_tcp: bool = False,
                      allowed: Callable[[], bool] | None = None, client: str = "") -> bytes: ...


class QueryService(Protocol):
    """What the UDP and TCP adapters ask: a `DNSService`, or `principals.Principals`, which
    hands each query to its client's principal's."""

    metrics: Metrics

    def serves(self, client: str) -> bool: ...

    def answer(self, data: bytes, client: str, tcp: bool, local: bool = False) -> Answer: ...


class DNSService:
    """Query bytes -> answer bytes, with policy, cache, upstream forwarding and answer vetting.

    `answer` is the whole path, top to bottom: the memo, then parse, decide (`Guard`), record and
    answer. Every answer it returns as bytes leaves only through `Guard.commit`'s release (the
    adapters pass `send`), so it is on its way only after its record reached the disk.
    """

    def __init__(self, guard: Guard, cache: AnswerCache, upstreams: Upstreams, metrics: Metrics,
                 client_allowed: Callable[[str], bool], refusal: str = NOT_A_CLIENT,
                 shares: CpuShares | None = None, in_flight: InFlight | None = None) -> None:
        self.guard = guard
        #: The clients' CPU shares, charged what vetting an upstream answer for them costs.
        self.shares = shares
        #: Why a client `client_allowed` does not allow is refused (`NOT_A_CLIENT`: it is
        #: outside `clients`, and its UDP query is recorded and never answered, `_unanswered`).
        self.refusal = refusal
        self.cache = cache
        self.upstreams = upstreams
        self.metrics = metrics
        self.max_forwards = MAX_FORWARDS
        self.client_max_forwards = CLIENT_MAX_FORWARDS
        self._client_allowed = client_allowed
        self._client_memo: dict[str, bool] = {}
        #: Whether a client it serves is still its own (`principals.Principals` says: after a
        #: reload, it may be another principal's): a query under way for one that is not goes
        #: no further, and its answer is refused.
        self.owns: Callable[[str], bool] = _everyone
        self._packets: dict[bytes, _Denied | _Cached] = {}
        #: Packets seen once: memoized only when seen again (see `_seen_before`).
        self._seen: set[bytes] = set()
        #: Forwards in flight, in total and per client: every principal's service's.
        self._in_flight = in_flight or InFlight()
        #: guardd's own lookups under way (`lookup`), by client, account and question: a
        #: connect that asks what one under way asks joins it.
        self._lookups: dict[tuple[str, str, CacheKey], _Joined] = {}
        self._counters: dict[tuple[int, int], Callable[[], None]] = {}

    @property
    def forwards(self) -> int:
        """Forwards in flight, of every service that shares this one's count."""
        return self._in_flight.total

    def policy_changed(self) -> None:
        """Forget answers, memoized decisions and who is served: the vetting behind them, and
        `clients`, may have changed (a reload)."""
        self.cache.clear()
        self._packets.clear()
        self._seen.clear()
        self.clients_changed()
        self._lookups.clear()  # (what is under way was asked under the policy before)

    def clients_changed(self) -> None:
        """Forget who is served: every reload may change `clients`, whatever it does to the
        policy (session 59's attack: a reload that took an agent's network out of `clients`,
        its policy unchanged, left its DNS queries answered, names of its own sent upstream)."""
        self._client_memo.clear()

    def serves(self, client: str) -> bool:
        """Whether `client` is in guardd's client networks."""
        allowed = self._client_memo.get(client)
        return self._remember_client(client) if allowed is None else allowed

    def _still_its(self, client: str) -> bool:
        """Whether a query this service took from `client` is still its to answer: the
        client is still a client, and its (attack pass 26: a reload that took it out of
        `clients`, or gave it to another principal, let its query go on upstream and be
        served)."""
        return self.serves(client) and self.owns(client)

    def _left(self, query: wire.Query, client: str, went_out: bool) -> bytes:
        """REFUSED for a query whose client a reload made another's while it was under way
        (asked again, it is answered as the client now is)."""
        return self._refuse(query, client, wire.Rcode.REFUSED, _LEFT, wire.EDE_PROHIBITED,
                            went_out=went_out)

    def answer(self, data: bytes, client: str, tcp: bool, local: bool = False) -> Answer:
        """The answer to one query from `client` (`local`: a datagram on a socket bound to
        loopback, which only guardd's own host reaches): bytes (recorded: send them through
        `Guard.commit`'s release, as the adapters do, via `audit.after_flush`), a coroutine
        that forwards and vets, or None (drop)."""
        allowed = self._client_memo.get(client)
        if allowed is None:
            allowed = self._remember_client(client)
        # (whether allowed or not: the refusal of a client no principal claims echoes the
        # question too, to the address forged: review of attack pass 52)
        forged = "" if tcp else _forged_reason(client, local)
        if forged:
            allowed = False
        if allowed:
            memo = self._packets.get(data[2:])
            if memo is not None and (isinstance(memo, _Denied) or not self.guard.suspected_now(
                    client, memo.query.name)):  # (a suspected client's: judged, below)
                reply = self._from_memo(memo, data, client, tcp)
                if reply is not None:
                    return reply
        try:
            query = wire.parse_query(data)
        except DNSWireError as exc:
            if not allowed:  # (no query to record: counted among the datagrams from outside)
                self.metrics.dns_queries_dropped.counter(NOT_A_CLIENT_DROP)()
                return None
            if exc.rcode_hint == wire.DROP:
                return None
            reply = wire.formerr_from_bytes(data, exc.rcode_hint)
            if reply is not None:
                self._count(0, exc.rcode_hint)
                self.guard.commit(self.guard.refusal(DNS_LISTENER, f"malformed query: {exc}",
                                                     action=DNS_QUERY), client)
            return reply
        if forged or not (allowed or tcp) and self.refusal == NOT_A_CLIENT:
            self._unanswered(query, client, forged or self.refusal)
            return None
        refusal = self._refusal(query, allowed)
        if refusal is not None:
            rcode, reason, ede = refusal
            return self._refuse(query, client, rcode, reason, ede)
        verdict = self.guard.judge_query(query.name, wire.qtype_name(query.qtype), client)
        if not verdict.allowed:
            return self._denial(query, verdict, client, data)
        if query.qtype == wire.QType.ANY:  # (answered here: nothing leaves for it)
            self.guard.commit(verdict, client, name=query.name, went_out=False)
            self._count(query.qtype, wire.Rcode.NOERROR)
            return wire.any_response(query)
        key = cache_key(query)
        if key in self.cache:
            memo = _Cached(verdict, query.name, query, key, wire.asked_as_built(query))
            cached = self._from_memo(memo, data, client, tcp)
            if cached is not None:
                if verdict.reusable and self._seen_before(data):
                    answered = self._answered(memo)
                    self._packets[data[2:]] = _Cached(self.guard.for_name(
                        answered or verdict, query.name), None, query, key, memo.plain, answered)
                return cached
        self.metrics.dns_cache_miss()
        return self._forward(query, key, verdict, client, tcp)

    def _denial(self, query: wire.Query, verdict: Verdict, client: str, data: bytes = b""
                ) -> bytes:
        """Answer a denied `query` (NXDOMAIN or REFUSED, with its EDE), recorded; memoized for
        the packet `data` when it is worth it."""
        rcode = _denied_rcode(verdict)
        answer = _blocked(query, verdict, rcode)
        count = self._counter(query.qtype, rcode)
        if data and verdict.reusable and self._seen_before(data):
            self._packets[data[2:]] = _Denied(self.guard.for_name(verdict, query.name),
                                              answer[2:], count)
        self.guard.commit(verdict, client, name=query.name)
        count()
        return answer

    def _from_memo(self, memo: _Denied | _Cached, data: bytes, client: str, tcp: bool
                   ) -> bytes | None:
        """Record `memo`'s verdict for `client` and readdress its answer to `data`'s id; None
        when a cached answer has expired (the query then takes the full path)."""
        if type(memo) is _Denied:
            self.guard.commit(memo.verdict, client)
            memo.count()
            return data[:2] + memo.tail
        tail = self.cache.lookup(memo.key)  # type: ignore[union-attr]
        if tail is None:
            return None
        self.metrics.dns_cache_hit()
        query = memo.query  # type: ignore[union-attr]
        answered = self._answered(memo)  # type: ignore[arg-type]
        if answered is memo.answered:  # type: ignore[union-attr]
            self.guard.commit(memo.verdict, client, name=memo.name,  # type: ignore[union-attr]
                              went_out=False)  # (from the cache: nothing leaves for it)
        else:  # (the packet memo's answer expired and another came since: as it is now)
            self.guard.commit(answered or memo.verdict, client, name=query.name, went_out=False)
        self._remember_cached(client, query.name, memo.key)  # type: ignore[union-attr]
        self._count(query.qtype, wire.rcode_of(tail, without_id=True))
        reply = data[:2] + (tail if memo.plain else wire.as_asked(tail, query))  # type: ignore
        return reply if tcp else wire.set_tc_for_udp(reply, query.udp_limit)

    def _answered(self, memo: _Cached) -> Verdict | None:
        """The verdict the answer cached for `memo` was recorded with when it came, its
        addresses and what was filtered from it in its record, for each hit to be recorded as
        that answer (session 61's DNS attack: each hit's record had neither); None when it was
        vetted under another policy than `memo`'s verdict."""
        answered = self.cache.note(memo.key)
        return answered if isinstance(answered, Verdict) and \
            answered.policy is memo.verdict.policy else None

    def _remember_cached(self, client: str, name: str, key: CacheKey
                         ) -> tuple[IPAddress, ...]:
        """The cached answer for `key` (to `name`) went to `client`: the names it resolved
        learn its addresses, given by the cache when the resolved names no longer hold them
        (attack pass 33: another client's lookups pushed them out there, and this client's
        connects by address were judged without the name). Only what the cached answer
        holds: one without an address teaches nothing (review: after a reload, the old
        policy's addresses were taught at a hit of a new answer that had none), for the time
        the answer has left. The addresses."""
        found, left = self.cache.addresses(key)
        if found:  # (the resolved names keep each principal's answers, and a reload's, apart)
            resolved = self.guard.resolved
            if not resolved.remember_cached(client, name, key):
                resolved.remember(client, name, found, left, key)
        return found

    def _unanswered(self, query: wire.Query, client: str, why: str) -> None:
        """Record a UDP query from outside `clients`, or from a forged source
        (`addr.forged_source`: an IPv6 address of guardd's host, or, on a socket bound to
        loopback, one none of the host's), saying `why`, and drop it; the record spends the
        one share of the trail of all such sources (`OUTSIDE_CLIENTS`). Its source is not
        proven: a REFUSED, which echoes the question, sent a name the sender chose to an
        address it chose, from guardd's host and past every rule (attack pass: a forged IPv6
        source, where nothing filters them, made guardd a courier). TCP's handshake proves
        its source: there, it is refused (or, the host's, loopback's)."""
        self._record_refusal(query, client,
                             f"{why}; no answer over UDP, whose source is not proven",
                             account=OUTSIDE_CLIENTS)  # (no one's: one share of the trail)
        self.metrics.dns_queries_dropped.counter(NOT_A_CLIENT_DROP)()

    def _refusal(self, query: wire.Query, client_allowed: bool
                 ) -> tuple[int, str, int | None] | None:
        """Why `query` is refused before any rule judges it: (rcode, reason, EDE), or None."""
        if not client_allowed:
            return wire.Rcode.REFUSED, self.refusal, wire.EDE_PROHIBITED
        if query.edns is not None and query.edns.version:
            return (wire.Rcode.BADVERS, f"EDNS version {query.edns.version} is not supported "
                    "(only 0)", None)
        if query.qtype in _REFUSED_TYPES:
            return wire.Rcode.REFUSED, _ZONE_TRANSFER, wire.EDE_NOT_SUPPORTED
        meta = _no_question(query.qtype)
        if meta is not None:
            return (meta, f"type {wire.qtype_name(query.qtype)} is no question's (a meta-type, "
                    "reserved, obsolete or for private use)", wire.EDE_NOT_SUPPORTED)
        if query.qclass != wire.CLASS_IN:
            return (wire.Rcode.REFUSED, f"query class {query.qclass} is not served (only IN, 1)",
                    wire.EDE_NOT_SUPPORTED)
        return None

    def _seen_before(self, data: bytes) -> bool:
        """Is this the second time the packet is seen, so that it is worth memoizing (and there
        is room)? A name asked once (a tunnel's or an exfiltration's unique names) leaves
        nothing behind but its bytes in `_seen`, which the garbage collector never walks; memo
        entries it would walk."""
        if len(data) > PACKET_MEMO_MAX_BYTES:
            return False
        key = data[2:]
        if key not in self._seen:
            if len(self._seen) >= PACKET_MEMO_ENTRIES:
                self._seen.clear()
            self._seen.add(key)
            return False
        if len(self._packets) >= PACKET_MEMO_ENTRIES:
            self._packets.clear()
        return True

    def _remember_client(self, client: str) -> bool:
        """Whether `client` is a client, kept unless it is an address of guardd's host, whose
        addresses change (re-attack of attack pass 50: one the host gave up, that an agent
        took, stayed a client as loopback)."""
        allowed = self._client_allowed(client)
        if not on_host(client):
            if len(self._client_memo) >= _MAX_CLIENT_MEMO:
                self._client_memo.clear()
            self._client_memo[client] = allowed
        return allowed

    def _counter(self, qtype: int, rcode: int) -> Callable[[], None]:
        """The counter of answered queries of this type and rcode."""
        count = self._counters.get((qtype, rcode))
        if count is None:
            name = wire.qtype_name(qtype)
            count = self.metrics.dns_query_counter(name, wire.rcode_name(rcode))
            if name in QTYPE_LABELS:  # (a rare type is looked up each time: 65,536 of them
                self._counters[qtype, rcode] = count  # kept grew guardd by 24 MB, attack pass)
        return count

    def _count(self, qtype: int, rcode: int) -> None:
        self._counter(qtype, rcode)()

    def _reply(self, query: wire.Query, rcode: int, ede: tuple[int, str] | None) -> bytes:
        self._count(query.qtype, rcode)
        return wire.error_response(query, rcode, ede)

    def _refuse(self, query: wire.Query, client: str, rcode: int, reason: str,
                ede: int | None = None, ede_text: str | None = None,
                went_out: bool | None = None) -> bytes:
        """Answer `rcode` (with EDE `ede`, its text `reason` unless given), recording why
        (`went_out`: whether the name left the host for it)."""
        self._record_refusal(query, client, reason, went_out)
        return self._reply(query, rcode, None if ede is None else (ede, ede_text or reason))

    def _record_refusal(self, query: wire.Query, client: str, reason: str,
                        went_out: bool | None = None, account: str | None = None) -> None:
        self.guard.commit(self.guard.refusal(DNS_LISTENER, reason, action=DNS_QUERY,
                                             target=query.name,
                                             qtype=wire.qtype_name(query.qtype)), client,
                          went_out=went_out, account=account)

    def _forward(self, query: wire.Query, key: CacheKey, verdict: Verdict, client: str,
                 tcp: bool) -> Answer:
        """The forward of `query`, counted in flight from now; or SERVFAIL when there are too
        many in flight, in total or from this client; or NXDOMAIN when the client is past its
        budget of lookups sent upstream (a DNS tunnel suspected)."""
        crowded = self._crowded(client)
        if crowded:
            return self._refuse(query, client, wire.Rcode.SERVFAIL, crowded, wire.EDE_NOT_READY,
                                crowded.partition(" (")[0])
        no_room = self.guard.no_room(client)  # (its answer would have to be recorded)
        if no_room:
            return self._refuse(query, client, wire.Rcode.REFUSED, no_room, wire.EDE_PROHIBITED)
        suspected = self.guard.forward_suspected(verdict.decision, query.name,
                                                 wire.qtype_name(query.qtype), client)
        if suspected is not None:
            return self._denial(query, suspected, client)
        self._enter(client)
        return self._forwarded(query, key, verdict, client, tcp)

    def _crowded(self, client: str) -> str:
        """Why no more may go upstream now, for `client` or anyone ("": some may): the caps
        of queries in flight, in total and per client, which guardd's own lookups for a
        client's connects count against too."""
        if self._in_flight.total >= self.max_forwards:
            return f"too many queries in flight ({self.max_forwards})"
        if self._in_flight.by_client[client] >= self.client_max_forwards:
            return f"too many queries in flight from this client ({self.client_max_forwards})"
        return ""

    def _enter(self, client: str) -> None:
        self._in_flight.total += 1
        self._in_flight.by_client.add(client)

    def _leave(self, client: str) -> None:
        self._in_flight.total -= 1
        self._in_flight.by_client.remove(client)

    async def _forwarded(self, query: wire.Query, key: CacheKey, verdict: Verdict, client: str,
                         tcp: bool) -> bytes:
        """Forward, record and answer; the count `_forward` took is given back however it ends
        (the adapters run it in a task at once, so it always starts)."""
        try:
            try:
                answer, final, addresses, ttl = await self._resolve(query, key, verdict, tcp,
                                                                    client,
                                                                    client_query=True)
            except (UpstreamFailure, DNSWireError) as exc:
                # (said, not left to the effect: a denial that went out is never shed, review)
                went_out = isinstance(exc, DNSWireError) or any(  # (BUSY: never sent)
                    failure.reason is not Reason.BUSY for failure in exc.failures)
                now = self.guard.query_now(verdict, query.name)
                if not now.allowed:  # (a reload denied the name meanwhile: answered as denied)
                    self.guard.commit(self.guard.query_failed(now, query.name, "", str(exc)),
                                      client, went_out=went_out)
                    rcode = _denied_rcode(now)
                    self._count(query.qtype, rcode)
                    return _blocked(query, now, rcode)
                if not self._still_its(client):
                    return self._left(query, client, went_out)
                if isinstance(exc, DNSWireError):
                    self.guard.commit(self.guard.query_failed(
                        now, query.name, "bad_upstream_answer", f"bad upstream answer: {exc}"),
                        client)
                    return self._reply(query, wire.Rcode.SERVFAIL, (
                        wire.EDE_INVALID_DATA, "upstream answer could not be used"))
                timeout = Reason.TIMEOUT in exc.reasons
                stopped = isinstance(exc, ResolverStopped)
                self.guard.commit(self.guard.query_failed(
                    now, query.name, "stopping" if stopped else "upstream_timeout"
                    if timeout else "upstream_failed", f"upstream failed: {exc}"), client,
                    went_out=went_out)
                ede = wire.EDE_NO_REACHABLE_AUTHORITY if timeout else wire.EDE_NETWORK_ERROR
                return self._reply(query, wire.Rcode.SERVFAIL, (ede, "no upstream answered"))
            except asyncio.CancelledError:
                # The name went out: recorded (attack pass 20: a TCP client that reset before
                # the answer came left no record of it).
                self.guard.commit(self.guard.query_failed(
                    self.guard.query_now(verdict, query.name), query.name, "abandoned",
                    "abandoned: the client went away, or guardd stopped, before the upstream "
                    "answered"), client, went_out=True)
                raise
            except Exception as exc:  # (a backstop: the name may have gone out, session 55's
                #                        attack, an OverflowError left it unrecorded)
                log.exception("resolving %s failed", query.name)
                self.guard.commit(self.guard.query_failed(
                    self.guard.query_now(verdict, query.name), query.name, "upstream_failed",
                    f"{_OWN_ERROR}: {exc!r}"), client, went_out=True)
                return self._reply(query, wire.Rcode.SERVFAIL, (wire.EDE_OTHER, _OWN_ERROR))
            if final.allowed and not self._still_its(client):
                return self._left(query, client, True)
            self.guard.commit(final, client, went_out=True)  # (a withheld answer's too)
            if addresses:
                self.guard.resolved.remember(client, query.name, addresses, ttl, key)
            self._count(query.qtype, wire.rcode_of(answer))
            return answer if tcp else wire.set_tc_for_udp(answer, query.udp_limit)
        finally:
            self._leave(client)

    async def _resolve(self, query: wire.Query, key: CacheKey, verdict: Verdict, tcp: bool,
                       client: str, *, client_query: bool
                       ) -> tuple[bytes, Verdict, list[IPAddress], int]:
        """Ask the upstreams guardd's own query for `key`, then vet (and cache) the answer,
        charged to `client`'s CPU share (re-attack: an answer of thousands of address hints cost
        20 ms to vet, uncharged), once the share allows; upstream errors propagate. Each
        attempt goes only while the policy in force allows the name and, for the client's own
        query (`client_query`; not a lookup for its connect, whose principal may be its
        login's), while the client is this service's, and while the trail can be written
        (review: a retry went out during an outage that began after the forward)."""
        counted = counted_as(client)
        raw = await self.upstreams.resolve(
            upstream_query(key), prefer_tcp=tcp,
            allowed=lambda: not self.guard.audit.down and (
                not client_query or self._still_its(client)) and
            self.guard.query_now(verdict, query.name).allowed, client=counted)
        if self.shares is not None:  # (its turn: an agent's answers that came at once were
            while (wait := self.shares.wait(counted)) > 0:  # vetted back to back, each
                await asyncio.sleep(wait)  # charged once it had run: session 58's attack)
        started = time.perf_counter()
        try:
            return self._vet(query, key, raw, verdict)
        finally:
            if self.shares is not None:
                self.shares.charge(counted, time.perf_counter() - started)

    async def lookup(self, name: str, client: str, account: str | None = None) -> _Found:
        """guardd's own resolution of a name it may resolve (`Guard.resolvable`): vetted AAAA and
        A addresses (IPv6 first, through the same cache, upstreams and vetting as the agent's
        queries) and, when there are none, why, and the policy's denial when one is why (a
        reload's rule that now denies the name, a protection its answer met: the decision a
        connect refused for it names). Never getaddrinfo: the addresses connected to are the
        ones vetted."""
        results = await asyncio.gather(*(self._lookup_type(name, qtype, client,
                                                           account or client)
                                         for qtype in (wire.QType.AAAA, wire.QType.A)))
        found = [ip for ips, _, _ in results for ip in ips]
        if found:
            return found, "", None
        return found, "; ".join(dict.fromkeys(why for _, why, _ in results if why)), next(
            (denial for _, _, denial in results if denial is not None), None)

    async def _lookup_type(self, name: str, qtype: int, client: str, account: str) -> _Found:
        """One type of `lookup`: from the cache, else joining the same lookup under way for the
        client (session 56's last attack: 150 connects at once to a name not cached made 300
        lookups, past the client's cap in flight, and 22 of them were refused), else its own
        (`_look_up`)."""
        query = wire.parse_query(wire.build_query(name, qtype, secrets.randbits(16)))
        key = cache_key(query)
        if self.cache.lookup(key) is not None:
            self.metrics.dns_cache_hit()
            # A cached answer was vetted: every answer address is on the question's chain.
            found = list(self._remember_cached(client, name, key))
            return found, "" if found else f"{name} has no {wire.qtype_name(qtype)} record", None
        self.metrics.dns_cache_miss()
        joined = (client, account, key)
        under_way = self._lookups.get(joined)
        if under_way is None:
            lookup = asyncio.ensure_future(
                self._look_up(query, key, name, qtype, client, account))
            under_way = self._lookups[joined] = _Joined(lookup)
            lookup.add_done_callback(functools.partial(self._looked_up, joined, under_way))
        under_way.waiting += 1
        try:
            return await asyncio.shield(under_way.lookup)  # (a connect that gives up ends no
        finally:                                           # other's)
            under_way.waiting -= 1
            if not under_way.waiting:  # (every connect gave up: the name goes on upstream for
                self._looked_up(joined, under_way)  # none, session 57's attack; and no later
                under_way.lookup.cancel()           # one joins it as it ends)

    def _looked_up(self, joined: tuple[str, str, CacheKey], under_way: _Joined,
                   _: object = None) -> None:
        if self._lookups.get(joined) is under_way:
            del self._lookups[joined]

    async def _look_up(self, query: wire.Query, key: CacheKey, name: str, qtype: int,
                       client: str, account: str) -> _Found:
        """`_lookup_type`'s lookup of a name not cached: upstream, counted in flight."""
        verdict: Verdict | None = None
        try:
            crowded = self._crowded(client)  # (first: what never leaves is no lookup)
            if crowded:  # (guardd's own word, no rule's: session 60's re-attack)
                return [], crowded, own_denial(None, crowded)
            verdict = self.guard.lookup_verdict(name, wire.qtype_name(qtype))
            suspected = self.guard.forward_suspected(verdict.decision, name,
                                                     wire.qtype_name(qtype), account)
            if suspected is not None:
                return [], suspected.decision.reason, suspected.decision
            self._enter(client)
            try:
                _, final, found, ttl = await self._resolve(query, key, verdict, False, client,
                                                           client_query=False)
            finally:
                self._leave(client)
        except (UpstreamFailure, DNSWireError) as exc:
            now = self.guard.query_now(verdict, name) if verdict is not None else None
            return [], f"cannot resolve {name}: {exc}", \
                None if now is None or now.allowed else now.decision
        except Exception as exc:  # (a backstop, as `_forwarded`'s: the connect says why)
            log.exception("resolving %s failed", name)
            return [], f"cannot resolve {name}: {_OWN_ERROR}: {exc!r}", None
        if not final.allowed:
            return [], final.decision.reason, final.decision
        if found:
            self.guard.resolved.remember(client, name, found, ttl, key)
        return found, "" if found else f"{name} has no {wire.qtype_name(qtype)} record", None

    def _vet(self, query: wire.Query, key: CacheKey, raw: bytes, verdict: Verdict
             ) -> tuple[bytes, Verdict, list[IPAddress], int]:
        """Vet an upstream answer (`Guard.vet_answer`), cache it, and readdress it to `query`.

        Returns (answer, verdict, addresses to remember, their TTL). A withheld answer becomes
        NXDOMAIN with the extended error the guard gives and its reason; any other is cached as
        guardd's own query would get it (`wire.as_built`) and returned as the client asked.
        """
        response = wire.parse_response(raw)
        raw = raw[:response.size]  # (what follows its records is no record: never passed on)
        if (response.qname, response.qtype, response.qclass) != (
                query.name, query.qtype, query.qclass):
            raise DNSWireError(f"upstream answered a question for {response.qname!r} type "
                               f"{response.qtype} class {response.qclass}", wire.Rcode.SERVFAIL)
        vetting = self.guard.vet_answer(verdict, query, response.records)
        final = vetting.verdict
        assert final is not None
        for label in vetting.labels:
            self.metrics.dns_filtered_records.labels(label).inc()
        if vetting.withheld is not None:
            decision = final.decision
            text = decision.reason if vetting.ede == wire.EDE_FILTERED else \
                f"{decision.matched_rule}: {decision.reason}"
            return (wire.error_response(query, wire.Rcode.NXDOMAIN, (vetting.ede, text)), final,
                    [], 0)
        if vetting.drop:
            kept = [r for i, r in enumerate(response.records) if i not in vetting.drop]
            raw = wire.strip_records(raw, vetting.drop)
            response = wire.parse_response(raw)
            if list(map(_vetted_part, response.records)) != list(map(_vetted_part, kept)):
                raise DNSWireError("re-encoding the vetted answer changed it",
                                   wire.Rcode.SERVFAIL)
        answer, lifetime = self.cache.put(key, raw[:2] + wire.as_built(raw[2:], query), response,
                                          final)  # (each hit is recorded as this answer)
        ttl = min(DEFAULT_REMEMBER_TTL, self.cache.max_ttl) if lifetime is None else lifetime
        return (query.id.to_bytes(2, "big") + wire.as_asked(answer[2:], query),
                final, vetting.addresses, ttl)


def _everyone(client: str) -> bool:
    """Every client a service serves is its own (a service of no principal's)."""
    return True


def _vetted_part(record: wire.Record) -> tuple[object, ...]:
    """What vetting judged of a record: re-encoding must not change it."""
    return (record.section, record.name, record.rtype, record.target, record.address,
            record.hints)


def _forged_reason(source: str, local: bool) -> str:
    """Why a datagram's `source` proves nothing (`addr.forged_source`), "" when it may be
    whose it says. Such a datagram is no one's: recorded, never answered
    (`DNSService._unanswered`), its CPU and its records the outsiders' share."""
    if not forged_source(source, local):
        return ""
    return FORGED_ON_LOOPBACK if local else FORGEABLE


def _denied_rcode(verdict: Verdict) -> int:
    """NXDOMAIN for a denied name; REFUSED for one over its rate limit (it is not gone, the
    client may ask again later)."""
    return wire.Rcode.REFUSED if verdict.limited else wire.Rcode.NXDOMAIN


def _blocked(query: wire.Query, verdict: Verdict, rcode: int) -> bytes:
    """The answer to a denied query (`rcode`: see `_denied_rcode`): NXDOMAIN with EDE 15
    (blocked), or REFUSED with EDE 18 (prohibited) over a rate limit; the text is the rule and
    reason."""
    decision = verdict.decision
    ede = wire.EDE_BLOCKED if rcode == wire.Rcode.NXDOMAIN else wire.EDE_PROHIBITED
    return wire.error_response(query, rcode, (ede, f"{decision.matched_rule}: {decision.reason}"))


# --- asyncio adapters ----------------------------------------------------------------------------


class _Flusher(Protocol):
    def after_flush(self, callback: Callable[..., object], *args: object,
                    withheld: Callable[[], object] | None = None) -> None: ...


class UDPListener(asyncio.DatagramProtocol):
    """One UDP socket: every datagram is one query, charged to its client's CPU share (through
    `turns`, if given)."""

    def __init__(self, service: QueryService, audit: _Flusher, turns: Turns | None = None
                 ) -> None:
        self._service = service
        self.audit = audit
        self.turns = turns
        self.shares = turns.shares if turns is not None else None
        self._share_waits = service.metrics.cpu_share_waits.counter(DNS_LISTENER)
        self._outsiders_dropped = service.metrics.dns_queries_dropped.counter(NOT_A_CLIENT_DROP)
        self.transport: asyncio.DatagramTransport | None = None
        self.local = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Source address -> the client it counts as (`addr.counted_as`, or `OUTSIDE_CLIENTS`),
        #: kept: asked afresh, the two cost a cached answer's fifth.
        self._clients: dict[str, str] = {}
        #: What this loop turn's queries cost, per client, charged together once it is over
        #: (a charge costs a cached answer's tenth: one per query slowed a flood of them).
        self._spent: dict[str, float] = {}
        #: Datagrams waiting for their turn, per client and in all (`_hold`).
        self._held: dict[str, int] = {}
        self._held_in_all = 0

    @property
    def service(self) -> QueryService:
        return self._service

    @service.setter
    def service(self, service: QueryService) -> None:
        """A reload's service, whose `clients` may be others."""
        self._service = service
        self._clients = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        bound = transport.get_extra_info("sockname")
        #: Bound to loopback: Linux drops a packet for a loopback address that comes in on any
        #: other interface, so only guardd's own host reaches it, and a source of the host's
        #: is the host's (a pod's sidecar, its DNS on [::1], `DNSService.answer`).
        self.local = bool(bound) and ipaddress.ip_address(bound[0].partition("%")[0]).is_loopback

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        shares = self.shares
        if shares is None:
            self._answer(data, addr)
            return
        client = self._clients.get(addr[0])
        if client is None:
            client = self._client_of(addr[0])
        if client in self._held or shares.wait(client):
            self._hold(data, addr, client)
            return
        started = time.perf_counter() - QUERY_COST
        self._answer(data, addr)
        spent = self._spent
        if not spent:
            self._loop.call_soon(self._charge)  # type: ignore[union-attr]
        spent[client] = spent.get(client, 0.0) + (time.perf_counter() - started)

    def _client_of(self, source: str) -> str:
        """Whose share `source`'s datagrams spend (a forged one's: `OUTSIDE_CLIENTS`,
        `addr.forged_source`): kept, unless it is an address of guardd's host or forged, which
        change as the host's addresses do (`DNSService._remember_client`). (On a socket not
        bound to loopback, a source kept before the host took its address spends the share it
        had until a reload; its queries are judged forged each time all the same.)"""
        forged = forged_source(source, self.local)
        client = counted_as(source) if self._service.serves(source) and not forged \
            else OUTSIDE_CLIENTS
        if not (forged or on_host(source)):
            if len(self._clients) >= _KEPT_SOURCES:
                self._clients = {}
            self._clients[source] = client
        return client

    def _hold(self, data: bytes, addr: tuple[Any, ...], client: str) -> None:
        """A datagram of a client that owes: answered at its turn (`turns`), or dropped when
        too many wait already or it is too big to keep (its resolver asks again)."""
        held = self._held.get(client, 0)
        if held >= UDP_HELD_PER_CLIENT or self._held_in_all >= UDP_HELD or \
                len(data) > UDP_HELD_SIZE:
            self._share_waits()
            if client == OUTSIDE_CLIENTS:  # (dropped unread: counted, not recorded)
                self._outsiders_dropped()
            return
        self._held[client] = held + 1
        self._held_in_all += 1
        assert self.turns is not None
        self.turns.share(client, self._share_waits).wait(
            lambda: self._in_turn(data, addr, client))

    def _in_turn(self, data: bytes, addr: tuple[Any, ...], client: str) -> None:
        held = self._held[client] - 1
        if held:
            self._held[client] = held
        else:
            del self._held[client]
        self._held_in_all -= 1
        assert self.shares is not None
        if self.transport is None or self.transport.is_closing():
            return  # (guardd is stopping)
        started = time.perf_counter() - QUERY_COST
        self._answer(data, addr)
        self._charge_to(client, time.perf_counter() - started)

    def _charge(self) -> None:
        spent, self._spent = self._spent, {}
        assert self.shares is not None
        for client, seconds in spent.items():
            self._charge_to(client, seconds)

    def _charge_to(self, client: str, seconds: float) -> None:
        assert self.shares is not None
        if client == OUTSIDE_CLIENTS:
            self.shares.charge(client, seconds * OUTSIDE_CLIENTS_WEIGHT, active=False)
        else:
            self.shares.charge(client, seconds)

    def _answer(self, data: bytes, addr: tuple[Any, ...]) -> None:
        try:
            result = self.service.answer(data, addr[0], False, self.local)
        except Exception:  # noqa: BLE001 - one query must never take the listener down
            log.exception("failed to answer a query from %s", addr[0])
            return
        if result is None:
            return
        if isinstance(result, bytes):
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
    """Accepts DNS-over-TCP connections and keeps what they share: the slots, in total
    (`TCP_MAX_CONNECTIONS`) and per client (`TCP_MAX_PER_CLIENT`)."""

    def __init__(self, service: QueryService, audit: _Flusher, idle_timeout: float,
                 deadlines: Deadlines | None = None, shares: CpuShares | None = None) -> None:
        self.service = service
        self.audit = audit
        self.idle_timeout = idle_timeout
        #: The clients' CPU shares, each query answered charged to its client's.
        self.shares = shares
        self.share_waits = service.metrics.cpu_share_waits.counter(DNS_LISTENER)
        self._deadlines = deadlines
        self.max_connections = TCP_MAX_CONNECTIONS
        self.max_per_client = TCP_MAX_PER_CLIENT
        self.connections: set[TCPConnection] = set()
        #: Connections per client address (only clients with one open).
        self.per_client = ClientCounts()
        self._rejected = service.metrics.dns_tcp_rejected.counter

    def __call__(self) -> TCPConnection:
        return TCPConnection(self)

    @property
    def deadlines(self) -> Deadlines:
        """The connections' idle deadlines (the daemon's, or one of its own on the loop)."""
        if self._deadlines is None:
            self._deadlines = Deadlines(asyncio.get_running_loop())
        return self._deadlines

    def admit(self, connection: TCPConnection, client: str) -> bool:
        """Give `connection` from `client` a slot, or count why it gets none."""
        if not self.service.serves(client):
            reason = "not_a_client"
        elif len(self.connections) >= self.max_connections:
            reason = "limit"
        elif self.per_client[client] >= self.max_per_client:
            reason = "client_limit"
        else:
            self.connections.add(connection)
            self.per_client.add(client)
            return True
        self._rejected(reason)()
        return False

    def release(self, connection: TCPConnection, client: str) -> None:
        self.connections.discard(connection)
        self.per_client.remove(client)


class TCPConnection(asyncio.Protocol):
    """One client stream: length-prefixed queries in, answers out as they are ready (RFC 7766).

    Flow control: queries are taken from the framer only while there is room (`_room`: fewer
    than `TCP_MAX_PENDING` answers outstanding, `TCP_MAX_FORWARDS` of them forwarded and not
    back, `TCP_MAX_OWED` bytes of them unwritten, the transport's write buffer below its
    high-water mark, `pause_writing`) and the client's CPU share is not spent (`_pace`);
    otherwise reading pauses and the rest waits. The idle deadline is `idle_timeout` after the
    last query answered or answer sent (a `Deadlines` entry, moved on by each), and closes only
    a connection owed no answer (`_idle`). A message that gets no answer (a runt, a response)
    ends the reading, and the connection closes once the answers owed before it are out; so
    does the client's EOF, once its queries are answered.
    """

    def __init__(self, listener: TCPListener) -> None:
        self.listener = listener
        self.framer = wire.TcpFramer()
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        #: Whose CPU share its queries spend (`addr.counted_as`).
        self._client = ""
        self.pending = 0
        self._admitted = False
        self._reading = True
        self._writing = True
        self._serving = False
        #: A message that got no answer came (see `_end_after_answers`), or the client's EOF.
        self._broken = False
        self._eof = False
        #: guardd closed it: the abort after `TCP_CLOSE_GRACE` stands, nothing more is served.
        self._closing = False
        self._closes_by = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: Bytes of the answers owed not yet written (`TCP_MAX_OWED`).
        self._owed = 0
        #: Its forwards in flight (`TCP_MAX_FORWARDS`).
        self._forwarding = 0
        #: The client's CPU share is spent: nothing is read or answered until this fires.
        self._pacing: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")  # None: the client is gone already
        if not peer or not self.listener.admit(self, peer[0]):
            transport.close()
            return
        self._admitted = True
        self.peer = peer[0]
        self._client = counted_as(self.peer)
        self._loop = asyncio.get_running_loop()
        self._active()

    def data_received(self, data: bytes) -> None:
        started = time.perf_counter() - QUERY_COST
        self.framer.feed(data)
        shares = self.listener.shares
        if not self._serve() and self._pacing is None and shares is not None and \
                self._admitted:  # (a query held for its turn is charged once answered)
            # A read that answered nothing is charged its own cost (attack pass: 16
            # connections sending a 64 KiB frame a byte a send took 60% of a core, uncharged).
            shares.charge(self._client, time.perf_counter() - started)

    def _serve(self) -> bool:
        """Answer the whole queries that have arrived, while there is room for their answers
        and the client's CPU share lasts (each charged to it); whether any was answered."""
        if self._serving or not self._admitted or self.transport is None or self._broken or \
                self._closing or self._pacing is not None:
            return False
        self._serving = True
        shares = self.listener.shares
        spent = 0.0  # (charged at the end: a charge costs a cached answer's tenth)
        try:
            while self._room() and self.framer.buffered:
                if shares is not None and not spent:
                    wait = shares.wait(self._client)
                    if wait:
                        self._pace(wait)
                        break
                message = self.framer.pop()
                if message is None:
                    break
                started = time.perf_counter() - QUERY_COST
                answered = self._answer(message)
                spent += time.perf_counter() - started
                if not answered:
                    self._end_after_answers()
                    return True
        except DNSWireError:  # (a frame of length 0)
            self._end_after_answers()
            return bool(spent)
        finally:
            self._serving = False
            if spent and shares is not None:
                shares.charge(self._client, spent)
        self._flow()
        return bool(spent)

    def _answer(self, message: bytes) -> bool:
        """Answer one message; False when it gets none (a runt, a response): the client is
        broken, and the rest of its stream goes unread (attack pass: a read of dropped
        messages took no room, and 1 MB of them held the loop for seconds)."""
        try:
            result = self.listener.service.answer(message, self.peer, True)
        except Exception:  # noqa: BLE001
            log.exception("failed to answer a TCP query from %s", self.peer)
            return True
        if result is None:
            return False
        self._active()
        self.pending += 1
        if isinstance(result, bytes):
            self._owed += len(result) + 2
            self.listener.audit.after_flush(self._send, result, withheld=self._withheld)
        else:
            self._forwarding += 1
            task = self._loop.create_task(self._finish(result))  # type: ignore[union-attr]
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    def _end_after_answers(self) -> None:
        """A broken client (a message that gets no answer): read nothing more, and close once
        the answers owed for the queries before it are written (review: closing at once lost
        them)."""
        self._broken = True
        self.framer = wire.TcpFramer()
        if self._reading and self.transport is not None:
            self._reading = False
            self.transport.pause_reading()
        self._close_when_answered()

    def _close_when_answered(self) -> None:
        if (self._broken or self._eof) and not self.pending and self._pacing is None:
            self._close()

    def _pace(self, seconds: float) -> None:
        """The client spent its CPU share: read and answer nothing for `seconds` (its queries
        wait, unread beyond what came). The idle deadline waits too: the wait is guardd's,
        not the client's (review: a wait past it closed the connection, queries unanswered)."""
        assert self._loop is not None
        self.listener.share_waits()
        self._pacing = self._loop.call_later(seconds, self._paced)
        self.listener.deadlines.watch(self, seconds + self.listener.idle_timeout, self._idle)

    def _paced(self) -> None:
        self._pacing = None
        self._serve()
        self._close_when_answered()

    def _flow(self) -> None:
        """Pause reading when answers back up or the client's share is spent; resume once
        below half of each cap (`_room`)."""
        transport = self.transport
        if transport is None:
            return
        if self._reading:
            if not self._room() or self._pacing is not None:
                self._reading = False
                transport.pause_reading()
        elif self._room(half=True) and self._pacing is None:
            self._reading = True
            transport.resume_reading()

    def _room(self, half: bool = False) -> bool:
        """May another query be answered: the transport's write buffer below its high-water
        mark, fewer answers outstanding than `TCP_MAX_PENDING`, forwards in flight than
        `TCP_MAX_FORWARDS`, bytes owed (the transport's unsent ones with them) than
        `TCP_MAX_OWED`? With `half`, below half of each cap (reading resumes there)."""
        transport = self.transport
        if transport is None or not self._writing:
            return False
        if half:
            return self.pending <= TCP_MAX_PENDING // 2 and \
                self._forwarding <= TCP_MAX_FORWARDS // 2 and \
                self._owed + transport.get_write_buffer_size() < TCP_MAX_OWED // 2
        return self.pending < TCP_MAX_PENDING and self._forwarding < TCP_MAX_FORWARDS and \
            self._owed + transport.get_write_buffer_size() < TCP_MAX_OWED

    async def _finish(self, pending: Coroutine[Any, Any, bytes]) -> None:
        reply: bytes | None = None
        try:
            reply = await pending
        except Exception:  # noqa: BLE001
            log.exception("failed to forward a TCP query from %s", self.peer)
        finally:
            self._forwarding -= 1  # (before `_send` asks whether there is room)
        if reply is None:
            self._send(None)
            return
        self._owed += len(reply) + 2
        self.listener.audit.after_flush(self._send, reply, withheld=self._withheld)

    def _send(self, reply: bytes | None) -> None:
        """An answer whose record is on disk goes; the write is charged to the client (session
        54's attack: a thousand at a flush, charged to nobody, and a client pipelining
        cached queries on 16 connections took 60% of a core where its share is half)."""
        started = time.perf_counter()
        self.pending -= 1
        if reply is not None:
            self._owed -= len(reply) + 2
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if reply is not None:
            self._active()
            transport.write(wire.tcp_frame(reply))
            shares = self.listener.shares
            if shares is not None:
                shares.charge(self._client, time.perf_counter() - started)
        if not self._reading:
            self._serve()
        self._close_when_answered()

    def _withheld(self) -> None:
        """The answer will never leave (the audit trail is down): close, rather than leave the
        client waiting for it until the idle timeout (it asks again, elsewhere or later)."""
        self.pending -= 1
        self._close()

    def pause_writing(self) -> None:
        self._writing = False
        self._flow()

    def resume_writing(self) -> None:
        self._writing = True
        self._serve()

    def _active(self) -> None:
        """A whole query or answer: the idle deadline starts again (not once closing: an
        answer written then moved it over the close's abort, last review)."""
        if not self._closing:
            self.listener.deadlines.watch(self, self.listener.idle_timeout, self._idle)

    def _idle(self) -> None:
        """The idle deadline: the close, unless answers are still owed (RFC 7766 6.2.3: idle
        is a connection with no query outstanding). An answer slow to come, its upstream's
        retries or its vetting's wait for the client's CPU share, is sent, and the idle time
        counts again from it (review: the connection closed, the answer lost)."""
        if self.pending:
            self.listener.deadlines.watch(self, self.listener.idle_timeout, self._idle)
        else:
            self._close()

    def _close(self) -> None:
        """Close once the answers owed are out of asyncio's buffer and the kernel's too: a
        socket closed with the kernel's queue full is an orphan, counted by nobody, that a
        client which never reads keeps for minutes with its zero-window ACKs (attack pass,
        2026-12-06: 192 of one client's held 243 MB). Past `TCP_CLOSE_GRACE`, what is left
        goes with a reset."""
        if self.transport is not None and not self._closing:
            self._closing = True
            self.transport.pause_reading()
            self._closes_by = self.listener.deadlines.loop.time() + TCP_CLOSE_GRACE
            self._close_when_sent()

    def _close_when_sent(self) -> None:
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if not transport.get_write_buffer_size() and (sock is None or not socket_queues(sock)[1]):
            transport.close()
        elif self.listener.deadlines.loop.time() >= self._closes_by:
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            transport.abort()
        else:
            self.listener.deadlines.watch(self, TCP_CLOSE_LOOK, self._close_when_sent)

    def eof_received(self) -> bool | None:
        """The client asked all it will (RFC 7766 lets it half-close): the rest of its queries
        are answered, then the connection closes (review: it closed at once, answers unsent)."""
        self._eof = True
        self._serve()
        self._close_when_answered()  # (guardd's close, with its abort; asyncio's has none)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self.listener.release(self, self.peer)
            self.listener.deadlines.forget(self)
        if self._pacing is not None:
            self._pacing.cancel()
            self._pacing = None
        self.transport = None
        for task in self._tasks:
            task.cancel()
