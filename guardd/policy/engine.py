"""Decisions: first matching rule wins, default deny, then the built-in protections.

Theory of operation. `Policy.decide()` asks the compiled `HostIndex` for the rules whose host
condition matches, puts them in file order and returns the first whose remaining conditions
(action, port, method, `ip` key) match too; nothing matching is a deny by `default-deny`. Rate
limits are not applied here (they need state; `guard` owns them). What does not depend on the
request is worked out once per load: per rule, the actions for which its host condition alone
decides it (all its actions when it has no port, method or `ip` condition, as most rules do:
one set membership then settles such a candidate), and the `Decision` it makes (a frozen value,
so one per rule serves every request it decides).

The built-in protections then look at the destination itself, whatever the rules said: metadata,
loopback, link-local, … are denied unless the allowing rule *names the address itself*, and
private addresses need a rule that names their network, or names a zone that one owner controls
(`guardd.policy.zones`: not `*.com`, not `*.github.io`). `resolvable()` is the DNS view of the
same policy (docs/design.md, evaluation rule 3): a name resolves when the first rule that decides
for the name as a whole would allow some request to it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from guardd.addr import (UNVERIFIABLE, AddrClass, IPAddress, classify, classify_name,
                         embedded_ipv4, isatap_ipv4, not_a_host_name, parse_ip, parse_target,
                         several_places, transitional_spelling)
from guardd.policy.index import HostIndex, glob_kind, glob_regex
from guardd.policy.loader import LoadedPolicy, load_policy_file, load_policy_text
from guardd.policy.model import (DNS_QUERY, NETWORK_REQUEST, Decision, Effect, IPNetwork,
                                 PolicyTest, Request, Rule)

DEFAULT_DENY_REASON = "no rule allows this destination (default deny)"
DEFAULT_DENY = Decision(Effect.DENY, None, DEFAULT_DENY_REASON)
#: Rules match a name's text, so text that is not the plain spelling of a name (escaped bytes:
#: `\098ad` is `bad`, `foo\.bar` one label) is no name any rule was written for; nor is one
#: whose last label makes it an address. Every caller of the policy gets this for them.
NOT_A_NAME = Decision(Effect.DENY, None, "not a valid host name (escaped bytes, a character "
                      "other than letters, digits, '-', '_', '/' and dots, or a last label "
                      "that makes it an IP address)")

#: Classes that only a rule naming the address (or a CIDR no wider than /8, /16 in IPv6) opens.
ADDRESS_VOUCHED_CLASSES = frozenset({
    AddrClass.LOOPBACK, AddrClass.UNSPECIFIED, AddrClass.LINK_LOCAL, AddrClass.MULTICAST,
    AddrClass.BROADCAST, AddrClass.PRIVATE,
})
WIDEST_VOUCHING_PREFIX = {4: 8, 6: 16}
#: Where a connect reaches the host's loopback listeners (Linux takes 0.0.0.0 and :: there).
REACHES_LOOPBACK = frozenset({AddrClass.LOOPBACK, AddrClass.UNSPECIFIED})
#: Ports where a `method` condition is meaningful: HTTP is usually plaintext only there.
PLAINTEXT_HTTP_PORTS = frozenset({80, 8080})

BUILTIN_REASONS: dict[AddrClass, str] = {
    AddrClass.METADATA: "cloud metadata endpoint (built-in protection)",
    AddrClass.LOOPBACK: "loopback destination (built-in protection)",
    AddrClass.UNSPECIFIED: "unspecified address (built-in protection)",
    AddrClass.LINK_LOCAL: "link-local destination (built-in protection)",
    AddrClass.MULTICAST: "multicast destination (built-in protection)",
    AddrClass.BROADCAST: "broadcast or reserved address (built-in protection)",
    AddrClass.PRIVATE: "private address needs a rule naming its zone or network "
                       "(built-in protection)",
}


def _matching_addresses(ip: IPAddress) -> tuple[IPAddress, ...]:
    """An IPv6 address that embeds an IPv4 one also matches rules written for the IPv4 one."""
    if ip.version == 6:
        inner = embedded_ipv4(ip)
        if inner is not None:
            return (ip, inner)
    return (ip,)


def _vouched_as(ip: IPAddress) -> tuple[IPAddress, ...]:
    """The addresses a rule vouches for `ip` by naming: those it stands for
    (`_matching_addresses`), but an ISATAP one by itself alone (final attack: under a 6to4
    prefix, a rule naming that reading's public address vouched for the metadata address its
    ISATAP reading is)."""
    return (ip,) if isatap_ipv4(ip) is not None else _matching_addresses(ip)


def names_address(rule: Rule, ip: IPAddress) -> bool:
    """Does `rule` name the very address `ip` (a /32 or /128 of it, or of the IPv4 address it
    embeds)? What opens metadata, and guardd's own host, whatever else the rule allows."""
    return any(net.prefixlen == net.max_prefixlen and address == net.network_address
               for net in rule.domain_networks + rule.ip_networks
               for address in _vouched_as(ip))


def _names_exactly(rule: Rule | None, ip: IPAddress) -> bool:
    """Does `rule` name `ip` itself (its /32 or /128), not an address it embeds?"""
    return rule is not None and any(net.prefixlen == net.max_prefixlen
                                    and net.network_address == ip
                                    for net in rule.domain_networks + rule.ip_networks)


def _names_network(rule: Rule | None, ip: IPAddress) -> bool:
    """Does `rule` name a network that holds `ip` (`_vouching_network`)?"""
    return rule is not None and any(_vouching_network(net, ip)
                                    for net in rule.domain_networks + rule.ip_networks)


def _vouching_network(net: IPNetwork, ip: IPAddress) -> bool:
    """Does `net` name the protected address `ip` (a CIDR no wider than /8, /16 in IPv6)?

    An IPv6 address that embeds an IPv4 one is the IPv4 address: an IPv6 network around it
    (`::ffff:0:0/96`, `2002::/16`) spans as much of IPv4 as its prefix leaves, all of it for
    those two, so only the IPv4 address's own networks or the exact IPv6 address can vouch.
    """
    addresses = _vouched_as(ip)
    for address in addresses:
        if address.version == net.version and address in net:
            embedded = address.version == 6 and (len(addresses) > 1
                                                 or isatap_ipv4(address) is not None)
            widest = net.max_prefixlen if embedded else WIDEST_VOUCHING_PREFIX[net.version]
            if net.prefixlen >= widest:
                return True
    return False


def _ip_key_vouches(rule: Rule) -> bool:
    """Does the rule's `ip` condition confine it to networks that vouch for their private
    addresses (none wider than /8, /16 in IPv6, none around embedded IPv4)?"""
    return bool(rule.ip_networks) and all(
        net.prefixlen >= WIDEST_VOUCHING_PREFIX[net.version] and len(
            _matching_addresses(net.network_address)) == 1 for net in rule.ip_networks)


def _rule_decision(rule: Rule) -> Decision:
    """The Decision a matching `rule` makes, built once per load: it depends on the rule only.
    A denial in report mode is not enforced."""
    return Decision(rule.effect, rule, rule.reason or f"{rule.effect.value} by rule {rule.id}",
                    enforced=not (rule.report and rule.effect is Effect.DENY))


def _decided_by_host(rule: Rule) -> frozenset[str]:
    """The actions for which `rule` matches every request its host condition matches."""
    return frozenset() if rule.ports or rule.methods or rule.ip_networks else rule.actions


class Policy:
    """A loaded, compiled policy: immutable, safe to share between listeners."""

    def __init__(self, loaded: LoadedPolicy) -> None:
        self.rules: tuple[Rule, ...] = loaded.rules
        self.index: HostIndex = loaded.index
        self.source = loaded.source
        self.description = loaded.description
        self.tunnel = loaded.tunnel
        self.tests = loaded.tests
        #: {path: SHA-256} of every text it was read from (`LoadedPolicy.digests`).
        self.digests: dict[str, str] = dict(loaded.digests)
        #: What no rule matching decides: the default deny, only reported in report mode.
        self._default = replace(DEFAULT_DENY, enforced=False) if loaded.report else DEFAULT_DENY
        self._decisions: tuple[Decision, ...] = tuple(_rule_decision(rule) for rule in self.rules)
        #: (reported rule, allowing rule) -> the reported denial over that allow.
        self._fell_throughs: dict[tuple[int, int], Decision] = {}
        self._decided_by_host: tuple[frozenset[str], ...] = tuple(
            _decided_by_host(rule) for rule in self.rules)
        #: Every method a rule names, in rule order: where a request may be served as any
        #: method, these (and one no rule names) are what it is judged as.
        self.methods_named: tuple[str, ...] = tuple(dict.fromkeys(
            method for rule in self.rules for method in sorted(rule.methods)))

    @property
    def files(self) -> tuple[str, ...]:
        """The files the policy was read from: itself and every domain list it names (what
        `--watch` follows)."""
        return tuple(dict.fromkeys((self.source, *(path for rule in self.rules
                                                   for path in rule.domain_lists))))

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        return cls(load_policy_file(path))

    @classmethod
    def from_text(cls, text: str, source: str = "<policy>", base_dir: Path | None = None) -> Policy:
        return cls(load_policy_text(text, source, base_dir))

    # -- rules -------------------------------------------------------------------------------

    def match(self, request: Request, after: int = -1) -> Rule | None:
        """The first rule (past position `after`) whose every condition matches, or None
        (default deny)."""
        found, addresses = self._candidates(request)
        for position in found:
            if position <= after:
                continue
            rule = self.rules[position]
            if request.action in self._decided_by_host[position] or (
                    request.action in rule.actions and rule.matches_port(request.port)
                    and rule.matches_method(request.method)
                    and any(rule.matches_ip_key(ip) for ip in addresses)):
                return rule
        return None

    def method_matters(self, request: Request, decision: Decision) -> bool:
        """Could the HTTP method change `decision`, made for `request` with the method unknown?

        An allow can turn into a deny when a `method` rule comes before the rule that allowed;
        a deny can turn into an allow only when an allowing `method` rule comes first and its
        allow survives the built-in protections for this very destination (no method opens a
        protected address that the rules do not name). Such connects are accepted
        provisionally and the first client bytes decide (docs/design.md, evaluation rule 6).
        """
        return next(self._method_rules(request, decision), None) is not None

    def method_allows(self, request: Request, decision: Decision) -> list[Decision]:
        """The allows of the `method` rules that could turn `decision` (a denial, made for
        `request` with the method unknown) into an allow: what a connect opened for its first
        bytes to decide may end up charged to."""
        return [self._decisions[position] for position in self._method_rules(request, decision)]

    def _method_rules(self, request: Request, decision: Decision) -> Iterator[int]:
        """Positions of the `method` rules that could change `decision` (`method_matters`).
        A denial by a protection is no exception: a rule before it may name the address for
        its method, and a denial yields only the allows that survive the protections."""
        acting = decision.acting_rule
        limit = acting.position if acting is not None else len(self.rules)
        found, addresses = self._candidates(request)
        for position in found:
            if position >= limit:
                break
            rule = self.rules[position]
            if (rule.methods and request.action in rule.actions
                    and rule.matches_port(request.port)
                    and any(rule.matches_ip_key(ip) for ip in addresses)
                    and (decision.allowed or (rule.effect is Effect.ALLOW and self.protect(
                        self._decisions[position], request).allowed))):
                yield position

    def _candidates(self, request: Request) -> tuple[list[int], tuple[IPAddress | None, ...]]:
        """Positions of the rules whose host condition matches, ascending (repeats allowed), and
        the addresses the request's address stands for (an embedded IPv4 one too)."""
        addresses = _matching_addresses(request.ip) if request.ip is not None else (None,)
        found = self.index.matching(request.name, addresses[0])
        if len(addresses) > 1:
            found += self.index.matching(None, addresses[1])
        found.sort()
        return found, addresses

    def decide(self, request: Request) -> Decision:
        """Rules, then built-in protections on the destination (name and/or address).

        A denial only reported (`mode: report`) falls through: what the rules after it decide
        stands when it is an enforced denial (a rule trialled in report mode never opens what
        the policy without it closes); otherwise the request goes through, recorded as the
        reported denial."""
        if request.name is not None and request.name != UNVERIFIABLE and \
                not_a_host_name(request.name):
            return NOT_A_NAME
        reported: Decision | None = None
        after = -1
        while True:
            rule = self.match(request, after)
            decision = self._decision_of(rule)
            if rule is not None and not decision.enforced:  # (the protections judge what
                reported = reported or decision             # it falls through to)
                after = rule.position
                continue
            decision = self.protect(decision, request)
            if reported is None or not decision.allowed:
                return decision
            # (onto an allow, or report mode's default deny, where none protects: what acts is
            # that, and the method rules after the trial still judge: final attack)
            return self._fell_through(reported, decision)

    # -- the policy's own tests ------------------------------------------------------------

    def test_decision(self, test: PolicyTest) -> Decision | str:
        """The verdict `test`'s request gets, or why it cannot be judged without the network
        (a name whose verdict depends on the address it resolves to, and no `ip:`)."""
        target = parse_target(test.target)
        name = target.host.name
        ip = parse_ip(test.ip) if test.ip else target.host.ip
        if test.dns:
            assert name is not None, "the loader refuses a DNS test of an address"
            decision = self.resolvable(name)
            return self.vet_address(decision, name, ip) if ip is not None else decision
        decision = self.decide(Request(NETWORK_REQUEST, name=name, ip=ip, port=target.port,
                                       method=test.method, listener="test"))
        if name is not None and ip is None and self.depends_on_address(name, decision):
            return "its verdict depends on the address the name resolves to: give ip:"
        return decision

    def failed_tests(self) -> list[str]:
        """What each failing test of the policy's `tests:` got, and where it is."""
        failures = []
        for test in self.tests:
            what = f"{test.location}: test {test.target!r}" + \
                (f" {test.method}" if test.method else "") + (" (dns)" if test.dns else "")
            decision = self.test_decision(test)
            if isinstance(decision, str):
                failures.append(f"{what}: {decision}")
            elif decision.allowed is not (test.expect is Effect.ALLOW) or \
                    test.rule not in (None, decision.matched_rule):
                wanted = test.expect.value + (f" by rule {test.rule}" if test.rule else "")
                got = "allow" if decision.allowed else "deny"
                if not decision.enforced:
                    got += " (a denial only reported)"
                failures.append(f"{what}: expected {wanted}, got {got} by rule "
                                f"{decision.matched_rule} ({decision.reason})")
        return failures

    def untested_rules(self) -> list[Rule]:
        """The rules no test of the policy reaches (each test counts for the rule it got)."""
        reached = {decision.matched_rule for decision in map(self.test_decision, self.tests)
                   if not isinstance(decision, str)}
        return [rule for rule in self.rules if rule.id not in reached]

    def depends_on_address(self, name: str, decision: Decision) -> bool:
        """Could a connect to `name` be judged otherwise at some address than by `decision`,
        made without one? Yes when a rule that names it with an `ip` condition comes before the
        rule that decided: such a rule matches only once the address is known, as it is to the
        daemon, which resolves a name before it judges a connect to it."""
        acting = decision.acting_rule
        limit = acting.position if acting is not None else len(self.rules)
        return any(position < limit and self.rules[position].ip_networks
                   and NETWORK_REQUEST in self.rules[position].actions
                   for position in self.index.matching(name, None))

    def resolvable(self, name: str) -> Decision:
        """DNS view: may `name` be resolved at all? (docs/design.md evaluation rule 3.)

        A deny rule with conditions DNS cannot see (method, port, `ip`) does not decide for the
        name as a whole, because other requests to the name may still be allowed; an allow rule
        with such conditions does, because some request to it is allowed.
        """
        if not_a_host_name(name):
            return NOT_A_NAME
        decided: Rule | None = None
        reported: Rule | None = None  # (falls through, as in `decide`)
        for position in sorted(self.index.matching(name, None)):
            rule = self.rules[position]
            if DNS_QUERY not in rule.actions and NETWORK_REQUEST not in rule.actions:
                continue
            conditional = bool(rule.ports or rule.methods or rule.ip_networks)
            if conditional and rule.effect is Effect.DENY:
                continue
            if not self._decisions[position].enforced:
                reported = reported or rule
                continue
            decided = rule
            break
        request = Request(DNS_QUERY, name=name)
        decision = self.protect(self._decision_of(decided), request)
        if reported is not None and decision.allowed:
            return self._fell_through(self._decisions[reported.position], decision)
        return decision

    def _fell_through(self, reported: Decision, allowed: Decision) -> Decision:
        """`reported`, recorded, over `allowed` that lets the request go and whose rule acts
        (`Decision.allowed_by`): an enforced allow, or report mode's default deny (no rule
        acts). Kept per pair of rules when both are the rules' own decisions (no protection
        made them anew): verdicts are memoized by decision."""
        stable = reported.rule is not None and reported is self._decision_of(reported.rule) \
            and allowed is self._decision_of(allowed.rule)
        if not stable:
            return replace(reported, allowed_by=allowed)
        key = (reported.rule.position,  # type: ignore[union-attr]
               allowed.rule.position if allowed.rule is not None else -1)
        found = self._fell_throughs.get(key)
        if found is None:
            found = self._fell_throughs[key] = replace(reported, allowed_by=allowed)
        return found

    def allows_ech(self, outer_name: str | None, ip: IPAddress, port: int) -> bool:
        """May a ClientHello with Encrypted Client Hello go to `ip`:`port`? Only when the rule
        that allows its outer (public) name there says `ech: true`: the inner name, the real
        destination, is hidden from guardd, so the operator must have chosen to trust that
        front (a CDN's ECH endpoint) with every name behind it."""
        decision = self.decide(Request(NETWORK_REQUEST, name=outer_name, ip=ip, port=port))
        acting = decision.acting_rule
        return decision.allowed and acting is not None and acting.allows_ech

    def _decision_of(self, rule: Rule | None) -> Decision:
        return self._default if rule is None else self._decisions[rule.position]

    # -- built-in protections ----------------------------------------------------------------

    def protect(self, decision: Decision, request: Request) -> Decision:
        """Apply the built-in protections to a rule decision for `request`'s destination."""
        if request.name is not None:  # most names have no class and need no more
            klass = classify_name(request.name)
            if klass is not None:
                decision = self._protect_one(decision, klass, request.name, None)
        if request.ip is not None and not decision.overridden:
            decision = self._one_place(self._protect_one(
                decision, classify(request.ip), request.name, request.ip), request.ip)
        return decision

    @staticmethod
    def _one_place(decision: Decision, ip: IPAddress) -> Decision:
        """An allow to an address packets may take to several places (`several_places`)
        stands only when its rule names that very address: a rule that names one of the
        places, or a network around the address, says nothing of the others (attack pass 20:
        `64:ff9b:1:cb00:71:500:808:808` is 8.8.8.8 to a /96 translator and 203.0.113.5 to a /48
        one; a deny for 203.0.113.0/24 did not apply, an allow for 8.8.8.0/24 opened it). First
        match stands: an exact rule after the broader one that matched is not read, and the
        denial names the rule it must come before (reading on past that allow, tried, let
        three review rounds through)."""
        if not decision.allowed or ip.version == 4:
            return decision
        places = several_places(ip)
        acting = decision.acting_rule
        if not places or _names_exactly(acting, ip):
            return decision
        before = f", before rule {acting.id}," if acting is not None else ""
        return Decision(Effect.DENY, decision.rule, f"{ip} may reach {' or '.join(places)} "
                        "(as the network's translators and tunnels decide): only a rule naming "
                        f"this very address{before} opens it", overridden=True)

    def vet_address(self, decision: Decision, name: str | None, ip: IPAddress,
                    publisher: tuple[str, Decision] | None = None) -> Decision:
        """Judge one resolved address of an allowed name (DNS answers, SOCKS lookups).

        The built-in protections judge it under the rule that allowed the name; when they deny
        it, the rule that matches the name *with this address* may still name the address (an
        `ip: 10.0.0.0/8` allow, say), exactly as it would for a connect to it: what DNS hands
        out and what SOCKS connects to are judged alike.

        `publisher`: the name whose record carries the address, where an alias (CNAME, DNAME)
        led there from `name`, and its `resolvable` decision. A zone vouches for private
        addresses because only its owner publishes records in it; an alias out of it hands that
        to whoever holds the target (a dangling CNAME, a hostile upstream). So the address must
        be published in a zone that vouches too, unless a network the rule names holds it
        (attack pass: `db.corp.test CNAME pub.other.org`, `pub.other.org A 10.0.0.5` passed
        under `*.corp.test`).
        """
        klass = classify(ip)
        vetted = self._one_place(self._protect_one(decision, klass, name, ip), ip)
        if not vetted.allowed and vetted.overridden:
            connect = self.decide(Request(NETWORK_REQUEST, name=name, ip=ip))
            if not connect.allowed:
                return vetted
            vetted = connect
        if publisher is None or klass is not AddrClass.PRIVATE or \
                _names_network(vetted.acting_rule, ip):  # (a trial's: the rule it fell to)
            return vetted
        owner, published = publisher
        acting = published.acting_rule
        if published.allowed and acting is not None and \
                self._vouches(acting, klass, owner, ip):
            return vetted
        return Decision(Effect.DENY, vetted.rule, f"published by {owner}, an alias target that no "
                        "rule naming its zone or network vouches for (a zone vouches only for "
                        "the addresses published in it)", klass, overridden=True)

    def _protect_one(self, decision: Decision, klass: AddrClass | None, name: str | None,
                     ip: IPAddress | None) -> Decision:
        if klass is None or klass is AddrClass.PUBLIC:
            return decision
        if not decision.enforced:  # report mode never opens what the protections close
            return Decision(Effect.DENY, decision.rule, BUILTIN_REASONS[klass], builtin=klass,
                            overridden=True)
        if not decision.allowed:
            return decision if decision.builtin else Decision(
                decision.effect, decision.rule, decision.reason, klass, decision.overridden)
        if decision.rule is not None and self._vouches(decision.rule, klass, name, ip):
            return decision
        return Decision(Effect.DENY, decision.rule, BUILTIN_REASONS[klass], builtin=klass,
                        overridden=True)

    def _vouches(self, rule: Rule, klass: AddrClass, name: str | None, ip: IPAddress | None
                 ) -> bool:
        """Does the allowing rule name this protected destination itself?"""
        if klass is AddrClass.METADATA:
            if name is not None and name in rule.domains and classify_name(name) is klass:
                return True
            return ip is not None and names_address(rule, ip)
        if ip is not None and _names_network(rule, ip):
            return True
        return klass is AddrClass.PRIVATE and name is not None and self._in_zone(rule, name)

    def _in_zone(self, rule: Rule, name: str) -> bool:
        """Is `name` in a zone `rule` vouches by: one of its own names matches it? (A rule that
        matched it by its `domain` network borrows nothing of its zones: attack pass,
        2026-12-06, `["*.corp.example.com", "fc00::/7"]` opened any name's ULA address.)"""
        return rule.names_specific_zone and rule.position in self.index.matching(name, None)

    def private_refusal(self, rule: Rule, name: str | None) -> str:
        """Why `rule`'s allow does not vouch for a private address of `name` by the name ("" when
        it does): what `guardd explain` says when the protection denies one."""
        if name is None:
            return ("a connect by address is opened only by a rule whose network (no wider than "
                    "/8, /16 in IPv6) holds it")
        if self._in_zone(rule, name):
            return ""
        if rule.names_specific_zone:
            return (f"rule {rule.id!r} matched {name} by its network, not by a name it names: "
                    "only its zones vouch, for their own names")
        return rule.unvouched or f"rule {rule.id!r} names no domain"

    # -- static checks for `guardd check` ----------------------------------------------------

    def private_closed(self) -> list[Rule]:
        """Allow rules with a name glob that names no zone one owner controls (`*.com`, `*`):
        they open no private address, unless their `ip` condition names its network."""
        return [rule for rule in self.rules if rule.unvouched and not _ip_key_vouches(rule)]

    def shadowed(self) -> list[tuple[Rule, Rule]]:
        """(rule, earlier rule) pairs where the earlier rule matches everything the later does."""
        found: list[tuple[Rule, Rule]] = []
        for later in self.rules:
            for earlier in self._possible_covers(later):
                if _covers(earlier, later):
                    found.append((later, earlier))
                    break
        return found

    def _possible_covers(self, later: Rule) -> list[Rule]:
        """Earlier rules worth a full coverage check, found through the index (no O(n²) scan)."""
        positions: set[int] = set(self.index.candidates(None, None))
        for glob in later.domains:
            kind = glob_kind(glob)
            if kind == "exact":
                positions.update(self.index.candidates(glob, None))
            elif kind == "zone":
                positions.update(self.index.candidates(glob.replace("*", "shadow-probe", 1), None))
        for network in later.domain_networks + later.ip_networks:
            positions.update(self.index.candidates(None, network.network_address))
        return [self.rules[p] for p in sorted(positions) if p < later.position]

    def method_rules_at_loopback_without_port(self) -> list[tuple[Rule, IPNetwork]]:
        """Allowing `method` rules with no `port` and the loopback (or unspecified) network
        each names: they open nothing there but the HTTP proxy's absolute-form requests (whose
        method is known first), as a connect to loopback is opened before its method is known
        only at a port the rule names (`Guard.judge_known`)."""
        return [(rule, net) for rule in self.rules
                if rule.methods and not rule.ports and rule.effect is Effect.ALLOW
                for net in rule.domain_networks + rule.ip_networks
                if classify(net.network_address) in REACHES_LOOPBACK
                and _vouching_network(net, net.network_address)]

    def denied_spelled_otherwise(self) -> list[tuple[Rule, str, str]]:
        """(deny rule, a name glob of it, that glob as clients of IDNA 2003 spell it) where the
        two differ (`addr.transitional_spelling`: `faß.test` is `fass.test` to them, another
        name, which the rule does not deny)."""
        return [(rule, glob, other) for rule in self.rules if rule.effect is Effect.DENY
                for glob in rule.domains
                if (other := transitional_spelling(glob)) is not None]

    def method_rules_over_tls(self) -> list[Rule]:
        """`method` rules that do not restrict the port to plaintext HTTP: over TLS (443 and
        most other ports) the method is unknown, so such a rule will mostly not match."""
        return [rule for rule in self.rules if rule.methods
                and not (rule.ports and all(low == high and low in PLAINTEXT_HTTP_PORTS
                                            for low, high in rule.ports))]


def _covers(earlier: Rule, later: Rule) -> bool:
    """True when every request `later` matches is matched by `earlier` first."""
    if not later.actions <= earlier.actions:
        return False
    if earlier.ports and (not later.ports or not all(
            any(a <= low and high <= b for a, b in earlier.ports) for low, high in later.ports)):
        return False
    if earlier.methods and (not later.methods or not later.methods <= earlier.methods):
        return False
    if earlier.ip_networks and (not later.ip_networks or not all(
            _network_covered(net, earlier.ip_networks) for net in later.ip_networks)):
        return False
    if not earlier.has_host_condition or (earlier.ip_networks and not (
            earlier.domains or earlier.domain_networks or earlier.listed_domains)):
        return True
    if "*" in earlier.domains:
        return True
    if later.listed_domains or not (later.domains or later.domain_networks):
        return False
    patterns = [glob_regex(glob) for glob in earlier.domains]
    return (all(any(p.fullmatch(glob) for p in patterns) for glob in later.domains)
            and all(_network_covered(net, earlier.domain_networks)
                    for net in later.domain_networks))


def _network_covered(network: IPNetwork, by: tuple[IPNetwork, ...]) -> bool:
    return any(network.version == outer.version and network.subnet_of(outer)  # type: ignore[arg-type]
               for outer in by)

