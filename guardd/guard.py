"""The one place where a request becomes a decision: policy, protections, rate limits, audit.

Listeners translate wire bytes into calls here and the returned `Decision` back into bytes;
nothing else decides. Every decision is recorded (audit record and metric) right here, so no
listener can forget one. The policy is swapped atomically on reload: a decision in flight keeps
the `Policy` object it started with.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import psutil

from guardd.addr import AddrClass, IPAddress, embedded_ipv4, parse_host
from guardd.errors import InvalidHostError
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.policy.model import DNS_QUERY, NETWORK_REQUEST, Decision, Effect, Request
from guardd.ratelimit import RateLimiter
from guardd.stream.sniff import UNVERIFIABLE, Kind, Sniffed

DNS_LISTENER = "dns"
SOCKS_LISTENER = "socks"
_WILDCARDS = {"0.0.0.0", "::"}
RESOLVER_PORTS = frozenset({53, 443, 853})
#: What guardd resolved a claimed name to, or why it resolved to none; None: not resolved.
ClaimAddresses = Sequence[IPAddress] | str | None
#: Where an HTTP forward proxy takes a Host without port. (An SNI has no port, and a server
#: that routes on it keeps the port it was reached on.)
_HTTP_PORT = 80


@dataclass(frozen=True, slots=True)
class Claim:
    """A host the client's first bytes name beyond the CONNECT target (see `Guard.claim`)."""

    name: str | None
    ip: IPAddress | None
    #: The ports a server may take it to.
    ports: tuple[int, ...]
    #: Why the claimed host is neither a name nor an address ("" when it is one).
    invalid: str = ""


class AuditSink(Protocol):
    """Where decision records go (`audit.AuditWriter` in the daemon, a list in tests)."""

    def record(self, *, action: str, effect: str, listener: str | None = None,
               client: str | None = None, target: str | None = None, domain: str | None = None,
               ip: str | None = None, port: int | None = None, method: str | None = None,
               qtype: str | None = None, matchedRule: str | None = None,  # noqa: N803
               reason: str | None = None) -> None: ...

    def prepare(self, **fields: object) -> Callable[[str], None]:
        """A recorder of `fields` for any client: `prepare(**f)(c)` records like `record(client=c,
        **f)`, with the encoding done once (see `audit.AuditWriter.prepare`)."""

    async def flushed(self) -> None:
        """Return once every record so far is on disk."""


class ResolvedNames:
    """(client, address) -> the names that client resolved to it through guardd, for their TTL.

    SOCKS judges a connect by IP as a request to those names (docs/design.md, evaluation rule
    7). A CDN address serves many names, so every live name a client resolved there is kept
    (the newest `names_per_address`) and a connect is judged against all of them: the most
    restrictive wins, whichever the client asked for last. The name -> addresses side lets a
    cached answer refresh the map for another client without re-parsing the answer. Both tables
    are LRU-bounded. Addresses are keyed by their text: a str caches its hash, an `ipaddress`
    object does not.
    """

    def __init__(self, max_entries: int = 200_000, clock: Callable[[], float] = time.monotonic,
                 names_per_address: int = 8, addresses_per_name: int = 32) -> None:
        self._by_client: OrderedDict[tuple[str, str], dict[str, float]] = OrderedDict()
        self._by_name: OrderedDict[str, tuple[tuple[str, ...], float]] = OrderedDict()
        self._max = max_entries
        self._per_address = names_per_address
        #: Addresses remembered per answer, so an answer of hundreds of records costs no more
        #: (a connect to one of the others is judged by `ip` rules alone: stricter, not looser).
        self._per_name = addresses_per_name
        self._clock = clock

    def remember(self, client: str, name: str, addresses: Iterable[IPAddress], ttl: float) -> None:
        expires = self._clock() + ttl
        texts = tuple(map(str, itertools.islice(addresses, self._per_name)))
        self._put(self._by_name, name, (texts, expires))
        for ip in texts:
            self._add(client, ip, name, expires)

    def remember_cached(self, client: str, name: str) -> None:
        """A cached answer for `name` went to `client`: extend the map to that client.

        This runs for every cache hit, so a client already mapped (the same expiry) costs one
        dict probe per address.
        """
        entry = self._by_name.get(name)
        if entry is None or entry[1] <= self._clock():
            return
        addresses, expires = entry
        by_client = self._by_client
        for ip in addresses:
            names = by_client.get((client, ip))
            if names is None or names.get(name) != expires:
                self._add(client, ip, name, expires)

    def lookup(self, client: str, ip: IPAddress) -> tuple[str, ...]:
        """The live names `client` resolved to `ip`, newest first (empty when none)."""
        names = self._by_client.get((client, str(ip)))
        if not names:
            return ()
        now = self._clock()
        return tuple(name for name, expires in reversed(names.items()) if expires > now)

    def clear(self) -> None:
        self._by_client.clear()
        self._by_name.clear()

    def _add(self, client: str, ip: str, name: str, expires: float) -> None:
        key = (client, ip)
        names = self._by_client.get(key)
        if names is None:
            names = {}
            self._put(self._by_client, key, names)
        else:
            self._by_client.move_to_end(key)
        names.pop(name, None)
        names[name] = expires  # newest last
        if len(names) > self._per_address:
            del names[next(iter(names))]

    def _put(self, table: OrderedDict, key: object, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self._max:
            table.popitem(last=False)


class HostAddresses:
    """The addresses of guardd's own host (every interface), refreshed at most every `ttl` s.

    A listener on 0.0.0.0 or :: answers on each of them, so a connect to any of them at a
    listener's port reaches guardd itself (see `Guard.is_own`). psutil reads them with
    getifaddrs(3) (netlink: the systemd unit allows AF_NETLINK for it).
    """

    def __init__(self, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._expires = -1.0
        self._addresses: frozenset[str] = frozenset()

    def __contains__(self, text: str) -> bool:
        if self._clock() >= self._expires:
            self._addresses = frozenset(_interface_addresses())
            self._expires = self._clock() + self._ttl
        return text in self._addresses


def _interface_addresses() -> Iterator[str]:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                yield str(ipaddress.ip_address(address.address.partition("%")[0]))


def most_restrictive(decisions: Iterable[Decision]) -> Decision:
    """The first denial; else the allow whose rate limit is tightest; else the first allow."""
    chosen: Decision | None = None
    for decision in decisions:
        if not decision.allowed:
            return decision
        if chosen is None or _rate(decision) < _rate(chosen):
            chosen = decision
    assert chosen is not None, "most_restrictive() of no decision"
    return chosen


def _rate(decision: Decision) -> float:
    """Requests a second that `decision`'s rule lets through (inf when unlimited)."""
    limit = decision.rule.rate_limit if decision.rule is not None else None
    return math.inf if limit is None else limit.max_requests / limit.window


class Guard:
    """Decides and records. One per daemon; shared by every listener."""

    def __init__(self, policy: Policy, audit: AuditSink, metrics: Metrics,
                 limiter: RateLimiter | None = None) -> None:
        self.policy = policy
        self.audit = audit
        self.metrics = metrics
        self.resolved = ResolvedNames()
        self.limiter = limiter if limiter is not None else RateLimiter()  # empty is falsy
        #: guardd's own listening sockets (host, port): a connect to one of them is a loop.
        self.own_sockets: set[tuple[str, int]] = set()
        #: The upstream resolvers (host, port): no connect to them there, nor on the ports a
        #: resolver also answers on (`RESOLVER_PORTS`: DNS, DNS over TLS, DNS over HTTPS).
        self.upstream_hosts: set[tuple[str, int]] = set()
        self.host_addresses = HostAddresses()

    def replace_policy(self, policy: Policy) -> None:
        """Swap in a new policy; what was vetted under the old one is forgotten."""
        self.policy = policy
        self.resolved.clear()

    def dns_decision(self, name: str) -> Decision:
        """May `name` be resolved? Not recorded yet: the answer may still be filtered."""
        return self.policy.resolvable(name)

    def dns_recorder(self, decision: Decision, name: str, qtype: str, ip: str | None = None
                     ) -> Callable[[str], None]:
        """Audit and count one DNS decision, for whichever client gets it: prepared once, so a
        repeated query (see `dns.server`'s packet memo) costs a call, not an encoding."""
        effect = decision.effect.value
        rule = decision.matched_rule
        write = self.audit.prepare(action=DNS_QUERY, listener=DNS_LISTENER, target=name,
                                   domain=name, ip=ip, qtype=qtype, effect=effect,
                                   matchedRule=rule, reason=decision.reason)
        count = self.metrics.decision_counter(DNS_LISTENER, DNS_QUERY, effect, rule)

        def record(client: str) -> None:
            write(client)
            count()

        return record

    def record_dns(self, decision: Decision, client: str, name: str, qtype: str,
                   ip: str | None = None) -> None:
        """Audit and count one answered DNS decision (written before the answer leaves)."""
        self.dns_recorder(decision, name, qtype, ip)(client)

    # -- SOCKS connects ---------------------------------------------------------------------------

    def judge_connect(self, name: str | None, ip: IPAddress, port: int, client: str,
                      method: str | None = None) -> Decision:
        """Policy and built-in protections for one connect to (`name`, `ip`):`port`.

        A connect by bare IP is judged as every name this client resolved to that address through
        guardd, the most restrictive verdict winning (docs/design.md, evaluation rule 7).
        """
        return self.judge_names(self.known_names(name, ip, client), ip, port, client, method)

    def judge_names(self, names: Sequence[str], ip: IPAddress, port: int, client: str,
                    method: str | None = None) -> Decision:
        """`judge_connect` for a connect that stands for `names` (none: by address alone)."""
        if self.is_own(ip, port):
            return Decision(Effect.DENY, None, "destination is guardd itself or its upstream DNS "
                            "server (a loop or a way around the DNS guard)", AddrClass.LOOPBACK,
                            overridden=True)
        return most_restrictive(self.policy.decide(Request(
            NETWORK_REQUEST, name=each, ip=ip, port=port, method=method, client=client,
            listener=SOCKS_LISTENER)) for each in names or (None,))

    def depends_on_method(self, name: str | None, ip: IPAddress, port: int, client: str,
                          decision: Decision) -> bool:
        """Could the HTTP method change `decision` (see `Policy.method_matters`)? A connect by
        address stands for every name this client resolved to it: the method matters when it
        could change the verdict for any of them."""
        if decision.overridden and decision.builtin is not None:
            return False  # a protection (or a loop) denies whatever the method
        names = self.known_names(name, ip, client)
        if len(names) <= 1:  # `decision` is that name's own verdict
            return self.policy.method_matters(Request(
                NETWORK_REQUEST, name=name or next(iter(names), None), ip=ip, port=port,
                client=client, listener=SOCKS_LISTENER), decision)
        requests = [Request(NETWORK_REQUEST, name=each, ip=ip, port=port, client=client,
                            listener=SOCKS_LISTENER) for each in names]
        return any(self.policy.method_matters(request, self.policy.decide(request))
                   for request in requests)

    def known_names(self, name: str | None, ip: IPAddress, client: str) -> tuple[str, ...]:
        """The names a connect stands for: the CONNECT name, or those this client resolved to
        the address."""
        return (name,) if name is not None else self.resolved.lookup(client, ip)

    def judge_first_bytes(self, first: Sniffed | None, connect: Decision, known: Sequence[str],
                          ip: IPAddress, port: int, client: str, provisional: bool,
                          cut_short: str = "", claim: Claim | None = None,
                          claim_addresses: ClaimAddresses = None) -> Decision | None:
        """The decision once the client's first bytes are known; None when they add nothing to
        `connect` (no claim beyond the CONNECT target, nothing left to judge).

        `known` are the names the connect was judged as (`known_names` then: the CONNECT name,
        or those the client had resolved to the address), fixed at that moment: names the client
        resolves later, or a reload that forgets them, change nothing about this connection.
        `first` is what the sniffer made of them, None when it made nothing (`cut_short` says
        why: a deadline, the upstream gone, nothing sent). Whatever a peer could act on but guardd
        cannot read is denied, whichever rule allowed the connect: a name that is unverifiable,
        a ClientHello that hides its real name (ECH) unless a rule allows that, and, where a
        `method` rule could apply (`provisional`), bytes that are not TLS or an HTTP request.
        `claim` is what `claim()` made of the bytes, taken before anything was awaited (the
        client's resolved names change meanwhile, not least by resolving the claimed name); it
        is judged itself (`_judge_claim`: domain fronting, a forward proxy) and its rate limit
        charged: the name actually served is the one counted. `claim_addresses` are what guardd
        resolved a claimed name to, or why it resolved to none.
        """
        if first is None:
            return Decision(Effect.DENY, connect.rule, f"no verdict on the client's first bytes: "
                            f"{cut_short}")
        claimed = first.name
        if claimed == UNVERIFIABLE:
            return Decision(Effect.DENY, connect.rule, f"{first.problem}; guardd cannot tell "
                            "which server the client asks for")
        if first.ech and not self.policy.allows_ech(claimed, ip, port):
            return Decision(Effect.DENY, connect.rule, "the TLS ClientHello is encrypted (ECH): "
                            f"its outer name {claimed or '(none)'} hides the real server name, and "
                            "no rule with `ech: true` allows that here")
        if provisional and first.kind is Kind.OTHER:
            return Decision(Effect.DENY, connect.rule, "a method rule applies to this destination, "
                            "and the first bytes are neither TLS nor an HTTP request: the method "
                            "cannot be read")
        decisions = []
        if claim is not None:
            alias = self._judge_claim(claim, first.method, ip, client, claim_addresses)
            if not alias.allowed:
                what = "TLS SNI" if first.kind is Kind.TLS else "HTTP Host"
                return Decision(Effect.DENY, alias.rule, f"{what} {claimed} is not the CONNECT "
                                f"target and is not allowed ({alias.reason}): domain fronting",
                                alias.builtin, alias.overridden)
            decisions.append(self.rate_limit(alias, client))
        if provisional:  # the method decides
            decisions.append(self.rate_limit(
                self.judge_names(known, ip, port, client, first.method), client))
        return most_restrictive(decisions) if decisions else None

    @staticmethod
    def claim(first: Sniffed | None, known: Sequence[str], ip: IPAddress, port: int
              ) -> Claim | None:
        """What the SNI or Host claims beyond the CONNECT target (`ip`:`port` and the names the
        connect was judged as, `known`), or None when it claims nothing more. An HTTP claim
        without a port stands for the CONNECT port and port 80 too (a forward proxy takes
        `Host: h` to h:80 whatever port the CONNECT went to)."""
        if first is None or first.name is None or first.name == UNVERIFIABLE:
            return None
        ports = (first.port,) if first.port else (port,) if first.kind is Kind.TLS or \
            port == _HTTP_PORT else (port, _HTTP_PORT)
        try:
            host = parse_host(first.name)
        except InvalidHostError as exc:
            return Claim(None, None, ports, str(exc))
        same = host.ip == ip if host.ip is not None else host.name in known
        return None if same and ports == (port,) else Claim(host.name, host.ip, ports)

    def _judge_claim(self, claim: Claim, method: str | None, ip: IPAddress, client: str,
                     addresses: ClaimAddresses) -> Decision:
        """The verdict on a claim. A server may act on it: a CDN routes on the name, an HTTP
        forward proxy goes to the address and port a request names, or to what it resolves the
        name to. So a claimed address (in any encoding `addr.parse_host` reads) is judged as a
        connect to that address, a claimed name as a connect to that name at this address and
        at each address guardd resolved it to (`addresses`; a name that resolved to none usable
        is denied), at every port the claim stands for, the most restrictive verdict winning."""
        if claim.invalid:
            return Decision(Effect.DENY, None, f"not a valid host: {claim.invalid}")
        if claim.ip is not None:
            return most_restrictive(self.judge_connect(None, claim.ip, each, client, method)
                                    for each in claim.ports)
        targets: list[IPAddress] = [ip]
        verdicts = []
        if isinstance(addresses, str):
            verdicts.append(Decision(Effect.DENY, None, f"{claim.name}: {addresses}, so where "
                                     "a server would take it cannot be judged"))
        elif addresses is not None:
            targets += addresses
        verdicts += [self.judge_connect(claim.name, target, each, client, method)
                     for target in targets for each in claim.ports]
        return most_restrictive(verdicts)

    def rate_limit(self, decision: Decision, client: str) -> Decision:
        """Count an allowed request against its rule's `rateLimit`; deny when it is exhausted."""
        rule = decision.rule
        if not decision.allowed or rule is None or rule.rate_limit is None:
            return decision
        limit = rule.rate_limit
        if self.limiter.allow(rule.id, client, limit.max_requests, limit.window):
            return decision
        self.metrics.ratelimited.labels(rule.id).inc()
        wait = self.limiter.retry_after(rule.id, client, limit.window)
        return Decision(Effect.DENY, rule, f"rate limit of rule {rule.id} exceeded ({limit}); "
                        f"retry in {wait:.1f}s")

    def record_connect(self, decision: Decision, client: str, target: str, name: str | None,
                       ip: IPAddress | None, port: int, method: str | None = None) -> None:
        """Audit and count one SOCKS decision."""
        effect = decision.effect.value
        rule = decision.matched_rule
        self.audit.record(action=NETWORK_REQUEST, listener=SOCKS_LISTENER, client=client,
                          target=target, domain=name, ip=str(ip) if ip is not None else None,
                          port=port, method=method, effect=effect, matchedRule=rule,
                          reason=decision.reason)
        self.metrics.decision(SOCKS_LISTENER, NETWORK_REQUEST, effect, rule)

    def record_refusal(self, listener: str, client: str, reason: str) -> None:
        """Audit and count a connection refused before it named a destination (a client outside
        `clients`, failed authentication, a per-client cap)."""
        self.audit.record(action=NETWORK_REQUEST, listener=listener, client=client,
                          effect=Effect.DENY.value, reason=reason)
        self.metrics.decision(listener, NETWORK_REQUEST, Effect.DENY.value, "")

    def is_own(self, ip: IPAddress, port: int) -> bool:
        """Would a connect to `ip`:`port` reach guardd itself, or one of its upstream resolvers
        (where the agent could resolve names that guardd denies)? A wildcard listener answers on
        every address of the host and on all of 127.0.0.0/8."""
        inner = embedded_ipv4(ip) if ip.version == 6 else None  # type: ignore[arg-type]
        target = inner or ip
        text = str(target)
        if (text, port) in self.upstream_hosts or (port in RESOLVER_PORTS and any(
                host == text for host, _ in self.upstream_hosts)):
            return True
        for host, own_port in self.own_sockets:
            if own_port == port and (host == text or (host in _WILDCARDS and (
                    target.is_loopback or target.is_unspecified or text in self.host_addresses))):
                return True
        return False
