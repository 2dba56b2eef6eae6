"""DNS tunnel detection inside allowed zones: sans-I/O, bounded in memory whatever the agent sends.

A wildcard allow (`*.amazonaws.com`, `*.githubusercontent.com`) lets an agent encode data in
subdomains that no rule denies: iodine and dnscat2 send hundreds of names a minute, each with
labels of 50 and more base32 or hex characters, many asked as TXT, NULL or CNAME. guardd sends
every allowed name upstream, so it counts, per client and registrable domain (the Public Suffix
List's ICANN section, offline, through `publicsuffixlist`: `x.s3.amazonaws.com` and
`y.githubusercontent.com` count under amazonaws.com and githubusercontent.com, where one
tunnel's names would otherwise spread over many "owners"), what tunnels look like:

* **unique-names**: different lookups in the window: different names, and a name asked again
  with a type other than A, AAAA, HTTPS and SVCB (the type of a query carries 16 bits too, and
  each goes upstream);
* **long-labels**: names with a label over `maxLabelLength` characters (whatever its alphabet:
  digits carry data as well as base32);
* **name-bytes**: bytes of different lookups' names below the registrable domain, which is
  what a tunnel's names carry however it cuts them (attack pass, 2026-12-06: four labels of 52
  characters have no long label, and 300 different names carried 62,400 bytes); and under
  every domain together, where the client is then suspected under every domain (review: a
  tunnel spread over many domains);
* **record-types**: different lookups of any type but A, AAAA, HTTPS and SVCB (TXT, NULL,
  CNAME, MX: what tunnels carry data in);
* **lookups**: lookups sent upstream, repeats included (an answer that is not cached, TTL 0
  or a failure, goes upstream at every repeat, and the order of a few names carries data);
  counted by `forwarded` as the lookup leaves. One answered from guardd's cache leaves
  nothing and is no lookup: an agent that connects to its API a hundred times a second is
  no tunnel. And under every domain together, where the client is then suspected under every
  domain (attack pass 49: 250 domains of the agent's own carried 110,000 a minute);
* **zone-churn**: lookups under more than `MAX_DOMAINS_PER_CLIENT` registrable domains in the
  window, which is also how a client would push its counters out of the table: past it, the
  client is suspected under every domain.

Past any budget of the policy's `dnsTunnel` the pair is suspected for a window: every lookup
under that domain from that client is refused (NXDOMAIN, EDE 15 "tunnel suspected", recorded
with the signal), so what leaves is bounded by the budget, not by the agent's patience. Fixed
windows: a counter starts again when its window is over.

Memory: at most `MAX_ZONES` (client, domain) pairs, least recently seen first out, each holding
at most `max_unique_names + 1` hashes; a suspicion outlives its pair's eviction (`MAX_SUSPECTED`
of them, the soonest over first out); clients' domain counts, `MAX_ZONES` of them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from publicsuffixlist import PublicSuffixList

from guardd.addr import counted_as
from guardd.policy.model import TunnelBudget

#: (client, registrable domain) pairs counted at once.
MAX_ZONES = 2048
#: Suspicions kept (a suspected pair pushed out of the counted ones stays suspected).
MAX_SUSPECTED = 4096
#: Registrable domains one client may look names up under in a window (zone-churn).
MAX_DOMAINS_PER_CLIENT = 256
#: What ordinary lookups ask; every other type counts against `maxUnusualTypes`.
USUAL_TYPES = frozenset({"A", "AAAA", "HTTPS", "SVCB"})
#: The domain a client's own suspicion (zone-churn) is kept under.
_EVERY_DOMAIN = "*"


def long_label(name: str, longest: int) -> bool:
    """Has `name` a label over `longest` characters?"""
    return any(len(label) > longest for label in name.split("."))


@dataclass(slots=True)
class _Zone:
    started: float
    names: set[int] = field(default_factory=set)
    long_labels: int = 0
    name_bytes: int = 0
    unusual: int = 0
    lookups: int = 0


@dataclass(slots=True)
class _Client:
    started: float
    domains: set[str] = field(default_factory=set)
    name_bytes: int = 0
    lookups: int = 0


class _Windowed(Protocol):
    started: float


K = TypeVar("K")
C = TypeVar("C", bound=_Windowed)


class TunnelDetector:
    """Counts lookups per (client, registrable domain) against the policy's budget."""

    def __init__(self, budget: TunnelBudget) -> None:
        self.budget = budget
        self._zones: OrderedDict[tuple[str, str], _Zone] = OrderedDict()
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        #: (client, domain or `_EVERY_DOMAIN`) -> until when, and why.
        self._suspected: dict[tuple[str, str], tuple[float, str]] = {}
        self._suffixes = PublicSuffixList(only_icann=True)

    def domain(self, name: str) -> str:
        """The registrable domain `name` counts under (the name itself above any)."""
        return self._suffixes.privatesuffix(name) or name

    def observe(self, client: str, name: str, qtype: str, now: float) -> str:
        """Count a lookup of `name` by `client` at `now`; why a tunnel is suspected there ("":
        it is not)."""
        budget = self.budget
        if not budget.enabled:
            return ""
        domain = self.domain(name)
        client = counted_as(client)
        return self._suspicion(client, domain, now) or self._churn(client, domain, now) or \
            self._count(client, domain, name, qtype, now)

    def suspected(self, client: str, name: str, clock: Callable[[], float]) -> bool:
        """Whether `client` is suspected under `name`'s domain (or every domain) now, the
        lookup not counted: for an answer given again from a memo, which must not go around a
        suspicion (attack pass 30). A dict's truth when no client is suspected (a memo hit's
        path), the time read only when one is."""
        return bool(self._suspected) and bool(
            self._suspicion(counted_as(client), self.domain(name), clock()))

    def _suspicion(self, client: str, domain: str, now: float) -> str:
        """Why `client` is suspected under `domain`, or under every domain, now ("": it is
        not); a suspicion over is forgotten."""
        for key in ((client, _EVERY_DOMAIN), (client, domain)):
            suspected = self._suspected.get(key)
            if suspected is not None:
                if suspected[0] > now:
                    return suspected[1]
                del self._suspected[key]
        return ""

    def _churn(self, client: str, domain: str, now: float) -> str:
        counted = self._current(self._clients, client, now, _Client)
        counted.domains.add(domain)
        if len(counted.domains) <= MAX_DOMAINS_PER_CLIENT:
            return ""
        counted.domains = set()
        return self._suspect((client, _EVERY_DOMAIN), now, (
            f"zone-churn: names under over {MAX_DOMAINS_PER_CLIENT} registrable domains in "
            f"{self.budget.window_text}"))

    def forwarded(self, client: str, name: str, now: float) -> str:
        """Count a lookup of `name` for `client` about to go upstream (no cached answer); why a
        tunnel is suspected there, this lookup included ("": it may go)."""
        budget = self.budget
        if not budget.enabled:
            return ""
        key = (counted_as(client), self.domain(name))
        suspected = self._suspicion(*key, now)
        if suspected:
            return suspected
        counted = self._current(self._clients, key[0], now, _Client)
        counted.lookups += 1
        if counted.lookups > budget.max_client_lookups:
            counted.lookups = 0
            return self._suspect((key[0], _EVERY_DOMAIN), now, (
                f"lookups: over {budget.max_client_lookups} lookups under every domain in "
                f"{budget.window_text}"))
        zone = self._current(self._zones, key, now, _Zone)
        zone.lookups += 1
        if zone.lookups <= budget.max_lookups:
            return ""
        del self._zones[key]
        return self._suspect(key, now, f"lookups: over {budget.max_lookups} lookups under "
                                       f"{key[1]} in {budget.window_text}")

    def _current(self, table: OrderedDict[K, C], key: K, now: float,
                 start: Callable[[float], C]) -> C:
        """`key`'s counts in `table` for the current window (a new window's from `start`), made
        the most recently seen; the least recently seen go past `MAX_ZONES`."""
        counts = table.get(key)
        if counts is None or now - counts.started >= self.budget.window:
            counts = table[key] = start(now)
            if len(table) > MAX_ZONES:
                table.popitem(last=False)
        table.move_to_end(key)
        return counts

    def _count(self, client: str, domain: str, name: str, qtype: str, now: float) -> str:
        budget = self.budget
        key = (client, domain)
        zone = self._current(self._zones, key, now, _Zone)
        digest = hash((name, "" if qtype in USUAL_TYPES else qtype))  # (A and AAAA: one)
        if digest in zone.names:
            return ""
        zone.names.add(digest)
        zone.long_labels += long_label(name, budget.max_label_length)
        # (a name that is its own registrable domain carries all its bytes: under a wildcard
        # public suffix, `<data>.<data>.ck` counted none, final attack pass)
        zone.name_bytes += len(name) - len(domain) - 1 if name != domain else len(name)
        zone.unusual += qtype not in USUAL_TYPES
        window = budget.window_text
        counted = self._clients[client]  # (`_churn` made it current)
        # (all but the top-level label: below the registrable domain alone, `x.<data>.com`
        # carried its data in the domain's own labels, one zone a name, re-attack)
        counted.name_bytes += len(name) - len(name.rpartition(".")[2]) - 1 if "." in name \
            else len(name)
        if counted.name_bytes > budget.max_client_name_bytes:
            counted.name_bytes = 0
            return self._suspect((client, _EVERY_DOMAIN), now, (
                f"name-bytes: over {budget.max_client_name_bytes} bytes of different names "
                f"under every domain in {window}"))
        if len(zone.names) > budget.max_unique_names:
            why = (f"unique-names: over {budget.max_unique_names} lookups of different names or "
                   f"types under {domain} in {window}")
        elif zone.long_labels > budget.max_long_labels:
            why = (f"long-labels: over {budget.max_long_labels} names under {domain} with a "
                   f"label over {budget.max_label_length} characters in {window}")
        elif zone.name_bytes > budget.max_name_bytes:
            why = (f"name-bytes: over {budget.max_name_bytes} bytes of different names below "
                   f"{domain} in {window}")
        elif zone.unusual > budget.max_unusual_types:
            why = (f"record-types: over {budget.max_unusual_types} lookups under {domain} of "
                   f"types other than A, AAAA, HTTPS and SVCB in {window}")
        else:
            return ""
        del self._zones[key]  # (suspected: nothing more to count until it is over)
        return self._suspect(key, now, why)

    def _suspect(self, key: tuple[str, str], now: float, why: str) -> str:
        if len(self._suspected) >= MAX_SUSPECTED:
            del self._suspected[min(self._suspected, key=lambda k: self._suspected[k][0])]
        self._suspected[key] = (now + self.budget.window, why)
        return why
