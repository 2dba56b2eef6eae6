"""Values of the policy language: rules, requests and decisions.

Everything here is an immutable value. The loader builds `Rule`s from YAML, the listeners build
`Request`s from wire bytes, and the engine turns a `Request` into a `Decision`. Nothing in this
module does I/O or knows about YAML.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field, replace

from guardd.addr import AddrClass, IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NETWORK_REQUEST = "network.request"
DNS_QUERY = "dns.query"
#: The actions guardd produces; a rule's `action` glob is matched against these once, at load.
ACTIONS = (NETWORK_REQUEST, DNS_QUERY)

DEFAULT_DENY_ID = "default-deny"


class Effect(enum.Enum):
    """What a rule does with the requests it matches."""

    ALLOW = "allow"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most `max_requests` per sliding `window` seconds, counted per rule and client."""

    max_requests: int
    window: float
    window_text: str = ""

    def __str__(self) -> str:
        return f"{self.max_requests} per {self.window_text or f'{self.window:g}s'}"


@dataclass(frozen=True, slots=True)
class TunnelBudget:
    """What a client may look up under one registrable domain in `window` seconds before guardd
    suspects a DNS tunnel there (`dnsTunnel:` in the policy; `dns/tunnel.py` keeps the count).
    The defaults leave ordinary browsing, package installs and CDN names alone."""

    enabled: bool = True
    window: float = 60.0
    window_text: str = "1 minute"
    #: Different lookups (name and type) under one registrable domain.
    max_unique_names: int = 300
    #: A label longer than this marks a name.
    max_label_length: int = 52
    #: Names with such a label.
    max_long_labels: int = 10
    #: Bytes (characters) of different lookups' names below the registrable domain: what the
    #: names carry, however short their labels (four of 52 characters carry 200 each).
    max_name_bytes: int = 24_576
    #: The same under every domain together (a tunnel may spread over many).
    max_client_name_bytes: int = 65_536
    #: Different lookups of any type but A, AAAA, HTTPS and SVCB (what tunnels carry data in).
    max_unusual_types: int = 30
    #: Lookups in all, the same ones again included (an answer not cached, TTL 0 or a failure,
    #: goes upstream at every one: the order of a few names carries data).
    max_lookups: int = 3000
    #: The same under every domain together (attack pass 49: 250 domains of the agent's own,
    #: each under `max_lookups`, carried 110,000 lookups a minute).
    max_client_lookups: int = 6000


@dataclass(frozen=True, slots=True)
class PolicyTest:
    """One entry of a policy's `tests:`: a request, and the verdict (and rule) it must get.
    `guardd check` and every load of the policy run them (`Policy.failed_tests`)."""

    target: str
    expect: Effect
    method: str | None = None
    #: The address a name target resolved to (needed where an `ip` rule decides).
    ip: str | None = None
    #: A lookup (dns.query) rather than a connection.
    dns: bool = False
    rule: str | None = None
    location: str = ""


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled policy rule; `position` (0-based) is its rank in first-match order."""

    position: int
    id: str
    effect: Effect
    reason: str
    actions: frozenset[str]
    #: Name globs (normalized); `*` alone is the universal glob.
    domains: tuple[str, ...] = ()
    #: IP literals and CIDRs given under `domain` (they match the destination address).
    domain_networks: tuple[IPNetwork, ...] = ()
    #: The `ip` key: a separate condition on the destination address.
    ip_networks: tuple[IPNetwork, ...] = ()
    #: Inclusive port ranges; empty means any port.
    ports: tuple[tuple[int, int], ...] = ()
    #: Upper-case HTTP methods; empty means any method.
    methods: frozenset[str] = frozenset()
    rate_limit: RateLimit | None = None
    #: `ech: true`: TLS hellos with Encrypted Client Hello may pass (see `Policy.allows_ech`).
    allows_ech: bool = False
    #: `mode: report` (its own, or the policy's): a denial it makes is recorded, not enforced.
    report: bool = False
    #: `domainList` files; their globs live only in the compiled index (they can be millions).
    domain_lists: tuple[str, ...] = ()
    listed_domains: int = 0
    #: True for an allow rule whose every name glob, listed ones included, names a zone that one
    #: owner controls (`guardd.policy.zones`): it vouches for private addresses of its names.
    names_specific_zone: bool = False
    #: Why an allow rule with name globs does not: its first glob that names no such zone.
    unvouched: str = ""
    source: str = "<policy>"
    line: int = 0
    #: What a rule the policy gave no `id` counts its rate limit under (`counted_under`).
    unnamed_key: str = ""

    @property
    def counted_under(self) -> str:
        """The key its rate limit's counts are kept under: its id; for a rule the policy gave
        no id, whose id (`rule-N`) is its place, what it says (session 55's attack: a reload
        that put a rule above one started its counts anew, and gave them to the rule that took
        its place)."""
        return self.unnamed_key or self.id

    @property
    def has_host_condition(self) -> bool:
        """Whether the rule restricts the destination at all (by name, list or address)."""
        return bool(self.domains or self.domain_networks or self.ip_networks or self.listed_domains)

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"

    def matches_port(self, port: int | None) -> bool:
        if not self.ports:
            return True
        if port is None:
            return False
        return any(low <= port <= high for low, high in self.ports)

    def matches_method(self, method: str | None) -> bool:
        """A `method` condition never matches a request whose method is unknown (TLS, opaque)."""
        if not self.methods:
            return True
        return method is not None and method in self.methods

    def matches_ip_key(self, ip: IPAddress | None) -> bool:
        if not self.ip_networks:
            return True
        return ip is not None and any(ip in net for net in self.ip_networks)


@dataclass(frozen=True, slots=True)
class Request:
    """One thing a client asked for, as the listeners understood it."""

    action: str
    name: str | None = None
    ip: IPAddress | None = None
    port: int | None = None
    method: str | None = None
    client: str = ""
    listener: str = ""

    @property
    def host(self) -> str:
        if self.name is not None:
            return self.name
        return str(self.ip) if self.ip is not None else ""


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to a `Request`: effect, the rule that decided, and why."""

    effect: Effect
    rule: Rule | None
    reason: str
    #: The built-in protection that applies to the destination (e.g. metadata), if any.
    builtin: AddrClass | None = None
    #: True when the built-in protection turned the rule's allow into a deny.
    overridden: bool = field(default=False)
    #: False for a denial in report mode: recorded as a deny, and the request goes through.
    enforced: bool = True
    #: A denial only reported: the enforced allow it fell through to, which lets the request
    #: go (`Policy.decide`). Its rule acts (`acting_rule`); the reported one is recorded.
    allowed_by: Decision | None = field(default=None, compare=False, repr=False)
    #: A denial by guardd's own reading of the request, beyond what the policy decides of what
    #: a record holds (a rate limit spent, a Host it cannot verify, a filtered DNS answer):
    #: its record says so (`ownCheck`), as `audit replay` cannot judge it again.
    own_check: bool = False
    #: The name a denial judged the request as when not the one the request names (a
    #: provisional connect's target, whose method rule denied it; "": its address alone): its
    #: record names that one, which `audit replay` judges again.
    judged_name: str | None = field(default=None, compare=False)

    @property
    def allowed(self) -> bool:
        """Does the request go through (an allow, or a denial only reported)?"""
        return self.effect is Effect.ALLOW or not self.enforced

    @property
    def acting_rule(self) -> Rule | None:
        """The rule whose conditions act on the request (its rate limit, its place among the
        method rules, its `ech`): the decision's own, or for a reported denial the rule of the
        allow it fell through to."""
        return self.allowed_by.rule if self.allowed_by is not None else self.rule

    def because(self, reason: str, *, own_check: bool = False) -> Decision:
        """The same decision, told with another reason (a filtered answer, a failure); by
        guardd's `own_check` if it was, or if the reason adds one."""
        return replace(self, reason=reason, own_check=self.own_check or own_check)

    def overruled(self, reason: str, builtin: AddrClass | None = None,
                  overridden: bool = False) -> Decision:
        """A denial of this decision's request, for `reason`: by guardd's own check
        (`own_check`) when this decision let it go; when it denied it already, the rules did,
        on the fields a record holds (re-attack of session 53: a connect only a `method` rule
        could open, its first bytes no HTTP request, was recorded as an own check, and
        `audit replay` under a policy opening it to any method counted it apart)."""
        return Decision(Effect.DENY, self.rule, reason, builtin, overridden,
                        own_check=self.allowed)

    @property
    def matched_rule(self) -> str:
        return self.rule.id if self.rule is not None else DEFAULT_DENY_ID


def own_denial(rule: Rule | None, reason: str, builtin: AddrClass | None = None,
               overridden: bool = False) -> Decision:
    """A denial by guardd's own check (`Decision.own_check`), naming the rule whose allow it
    overrides (None: no rule's)."""
    return Decision(Effect.DENY, rule, reason, builtin, overridden, own_check=True)
