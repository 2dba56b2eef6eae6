"""The one place where a request becomes a decision: policy, protections, rate limits, audit.

Listeners translate wire bytes into calls here and the returned `Decision` back into bytes;
nothing else decides. Every decision is recorded (audit record and metric) right here, so no
listener can forget one. The policy is swapped atomically on reload: a decision in flight keeps
the `Policy` object it started with.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Protocol

from guardd.addr import AddrClass, IPAddress, embedded_ipv4
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.policy.model import DNS_QUERY, NETWORK_REQUEST, Decision, Effect, Request
from guardd.ratelimit import RateLimiter

DNS_LISTENER = "dns"
SOCKS_LISTENER = "socks"
_WILDCARDS = {"0.0.0.0", "::"}


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
    """(client, address) -> the name that client resolved to it through guardd, for its TTL.

    SOCKS judges a connect by IP as a request to that name (DESIGN.md, evaluation rule 7). The
    name -> addresses side lets a cached answer refresh the map for another client without
    re-parsing the answer. Both tables are LRU-bounded. Addresses are keyed by their text:
    a str caches its hash, an `ipaddress` object computes it anew in Python on every probe.
    """

    def __init__(self, max_entries: int = 200_000, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._by_client: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._by_name: OrderedDict[str, tuple[tuple[str, ...], float, tuple[str, float]]] = \
            OrderedDict()
        self._max = max_entries
        self._clock = clock

    def remember(self, client: str, name: str, addresses: Iterable[IPAddress], ttl: float) -> None:
        expires = self._clock() + ttl
        texts = tuple(map(str, addresses))
        mapped = (name, expires)
        self._put(self._by_name, name, (texts, expires, mapped))
        for ip in texts:
            self._put(self._by_client, (client, ip), mapped)

    def remember_cached(self, client: str, name: str) -> None:
        """A cached answer for `name` went to `client`: extend the map to that client.

        This runs for every cache hit, so a client already mapped (the same `mapped` tuple, by
        identity) costs one dict probe per address.
        """
        entry = self._by_name.get(name)
        if entry is None or entry[1] <= self._clock():
            return
        addresses, _, mapped = entry
        by_client = self._by_client
        for ip in addresses:
            key = (client, ip)
            if by_client.get(key) is not mapped:
                self._put(by_client, key, mapped)

    def lookup(self, client: str, ip: IPAddress) -> str | None:
        entry = self._by_client.get((client, str(ip)))
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def clear(self) -> None:
        self._by_client.clear()
        self._by_name.clear()

    def _put(self, table: OrderedDict, key: object, value: object) -> None:
        table[key] = value
        table.move_to_end(key)
        if len(table) > self._max:
            table.popitem(last=False)


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

        A connect by bare IP is judged as the name this client resolved to that address through
        guardd, when there is one (DESIGN.md, evaluation rule 7).
        """
        if name is None:
            name = self.resolved.lookup(client, ip)
        if self._is_own_socket(ip, port):
            return Decision(Effect.DENY, None, "destination is guardd's own listener (a loop)",
                            AddrClass.LOOPBACK, overridden=True)
        return self.policy.decide(Request(NETWORK_REQUEST, name=name, ip=ip, port=port,
                                          method=method, client=client,
                                          listener=SOCKS_LISTENER))

    def depends_on_method(self, name: str | None, ip: IPAddress, port: int, client: str,
                          decision: Decision) -> bool:
        """Could the HTTP method change `decision` (see `Policy.method_matters`)? A connect by
        address is asked about as the name this client resolved to it, as it was judged."""
        name = name if name is not None else self.resolved.lookup(client, ip)
        return self.policy.method_matters(Request(NETWORK_REQUEST, name=name, ip=ip, port=port,
                                                  client=client, listener=SOCKS_LISTENER),
                                          decision)

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

    def _is_own_socket(self, ip: IPAddress, port: int) -> bool:
        if not self.own_sockets:
            return False
        inner = embedded_ipv4(ip) if ip.version == 6 else None  # type: ignore[arg-type]
        text = str(inner or ip)
        for host, own_port in self.own_sockets:
            if own_port == port and (host == text or (
                    host in _WILDCARDS and (inner or ip).is_loopback)):
                return True
        return False
