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

from guardd.addr import IPAddress
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.policy.model import DNS_QUERY, Decision

DNS_LISTENER = "dns"


class AuditSink(Protocol):
    """Where decision records go (`audit.AuditWriter` in the daemon, a list in tests)."""

    def record(self, *, action: str, effect: str, listener: str | None = None,
               client: str | None = None, target: str | None = None, domain: str | None = None,
               ip: str | None = None, port: int | None = None, method: str | None = None,
               qtype: str | None = None, matchedRule: str | None = None,  # noqa: N803
               reason: str | None = None) -> None: ...


class ResolvedNames:
    """(client, address) -> the name that client resolved to it through guardd, for its TTL.

    SOCKS judges a connect by IP as a request to that name (DESIGN.md, evaluation rule 7). The
    name -> addresses side lets a cached answer refresh the map for another client without
    re-parsing the answer. Both tables are LRU-bounded.
    """

    def __init__(self, max_entries: int = 200_000, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self._by_client: OrderedDict[tuple[str, IPAddress], tuple[str, float]] = OrderedDict()
        self._by_name: OrderedDict[str, tuple[tuple[IPAddress, ...], float]] = OrderedDict()
        self._max = max_entries
        self._clock = clock

    def remember(self, client: str, name: str, addresses: Iterable[IPAddress], ttl: float) -> None:
        expires = self._clock() + ttl
        addresses = tuple(addresses)
        self._put(self._by_name, name, (addresses, expires))
        for ip in addresses:
            self._put(self._by_client, (client, ip), (name, expires))

    def remember_cached(self, client: str, name: str) -> None:
        """A cached answer for `name` went to `client`: extend the map to that client."""
        entry = self._by_name.get(name)
        if entry is not None and entry[1] > self._clock():
            for ip in entry[0]:
                self._put(self._by_client, (client, ip), (name, entry[1]))

    def lookup(self, client: str, ip: IPAddress) -> str | None:
        entry = self._by_client.get((client, ip))
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

    def __init__(self, policy: Policy, audit: AuditSink, metrics: Metrics) -> None:
        self.policy = policy
        self.audit = audit
        self.metrics = metrics
        self.resolved = ResolvedNames()

    def replace_policy(self, policy: Policy) -> None:
        """Swap in a new policy; what was vetted under the old one is forgotten."""
        self.policy = policy
        self.resolved.clear()
        self.metrics.forget_rules()

    def dns_decision(self, name: str) -> Decision:
        """May `name` be resolved? Not recorded yet: the answer may still be filtered."""
        return self.policy.resolvable(name)

    def record_dns(self, decision: Decision, client: str, name: str, qtype: str,
                   ip: str | None = None) -> None:
        """Audit and count one answered DNS decision (written before the answer leaves)."""
        effect = decision.effect.value
        rule = decision.matched_rule
        self.audit.record(action=DNS_QUERY, listener=DNS_LISTENER, client=client, target=name,
                          domain=name, ip=ip, qtype=qtype, effect=effect, matchedRule=rule,
                          reason=decision.reason)
        self.metrics.decision(DNS_LISTENER, DNS_QUERY, effect, rule)
