"""`guardd audit replay` and `guardd audit learn`: a policy measured against the trail.

Both read past decisions (records with a `matchedRule`: refusals before any rule, pending
records and the trail's own records are no decisions) and never touch the network.

* **replay** judges each decision again under a new policy, as its request was: a connection
  by the names it stood for (`domain`, several for a connect by address), the address it went
  to, its port and method; a lookup by the DNS view of its name. It reports which would change,
  allow→deny and deny→allow, counted per (old rule, new rule), with an example of each; folded
  records count as many as they stand for. A decision the new policy would judge by an address
  the record lacks (a name refused before it was looked up, now behind an `ip` rule) cannot be
  told, and is counted as such. A denial by guardd's own check (`ownCheck`: a rate limit, a
  Host it could not verify) that the new policy's rules allow is shown apart (`OWN_CHECK`),
  with its rules and an example: whether the check would deny again is not in its record.
* **learn** proposes an allow-list from what an agent did: every request allowed, or denied
  only in report mode (`enforced: false`), grouped by registrable domain (the ICANN part of the
  Public Suffix List: `api.github.com` and `codeload.github.com` make one rule for github.com),
  with the ports seen, the methods when every request there was plaintext HTTP, the names
  only looked up in rules for lookups alone, a rule per group of bare addresses, a catch-all
  deny, and a test for every rule: a policy file `guardd check` accepts, to review before use.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from publicsuffixlist import PublicSuffixList

from guardd.addr import AddrClass, IPAddress, classify, normalize_name, parse_ip
from guardd.audit import Record
from guardd.errors import InvalidHostError
from guardd.guard import ENDED_OUTCOMES, PENDING_OUTCOME, UNRESOLVED_OUTCOME, methods_served
from guardd.policy.engine import Policy
from guardd.policy.loader import POLICY_METHOD
from guardd.policy.model import DNS_QUERY, NETWORK_REQUEST, Decision, Request
from guardd.policy.zones import refusal
from guardd.stream.sniff import ANY_METHOD

#: A denial by guardd's own check, as replay shows it (`Replay.changes`).
OWN_CHECK = "deny by guardd's own check"
#: Past this many names under one registrable domain, learn writes `*.domain` instead.
MAX_LEARNED_NAMES = 8


def decisions(records: Iterable[Record]) -> Iterator[Record]:
    """The records that are policy decisions: not a pending connect's, nor a note of how an
    allowed followed connection ended (re-attack of session 53: such a note, of no method,
    replayed as "allow -> deny" under the policy that judged)."""
    for record in records:
        outcome = str(record.get("outcome") or "")
        if record.get("matchedRule") and record.get("action") in (NETWORK_REQUEST, DNS_QUERY) \
                and outcome != PENDING_OUTCOME and not outcome.startswith(ENDED_OUTCOMES):
            yield record


def _names(record: Record) -> list[str]:
    """The names a record's request stood for, as the daemon judged them: a connect by address
    stands for several (`domain` lists them, comma-separated); a query's name is one, whatever
    it holds (the policy judges one that is no host name as the daemon did: attack pass 52,
    RFC 2317's `x/y.allowed.test`, read as a proxy target is, was none, and its connect was
    replayed by the address alone)."""
    text = str(record.get("domain") or "")
    return [name for name in (text.split(",") if record.get("action") == NETWORK_REQUEST
                              else [text]) if name]


def _learnable_names(record: Record) -> list[str] | None:
    """The names of `record` as a rule can name them (`normalize_name`), but an address a
    connect's Host named (`_claims`); None when one cannot be (`*`, a comma, what the agent
    chose to ask, RFC 2317's '/'): the request is not learned, nor its address in its place
    (attack pass 52: a connect by address that such a name allowed was learned as a rule for
    the bare address, which opens it to any name)."""
    claims = _claims(record)
    try:
        return [normalize_name(name) for name in _names(record) if name not in claims]
    except InvalidHostError:
        return None


def _claims(record: Record) -> dict[str, IPAddress]:
    """The addresses a connect's Host named, by the text its record holds them in (its
    `domain`: the request was judged by them, as `_targets` judges it again)."""
    if record.get("action") != NETWORK_REQUEST:
        return {}  # (a lookup of an address is of no name: it opens nothing)
    return {name: claimed for name in _names(record)
            if (claimed := _claimed_address(name)) is not None}


def _claimed_address(name: str) -> IPAddress | None:
    """The address a record's name is, if it is one."""
    try:
        return parse_ip(name)
    except InvalidHostError:
        return None


def _addresses(record: Record) -> list[IPAddress] | None:
    """The record's addresses (a DNS answer's, comma-separated), or None when one is not an
    address."""
    found = []
    for text in str(record.get("ip") or "").split(","):
        try:
            address = parse_ip(text) if text else None
        except InvalidHostError:
            return None
        if text and address is None:
            return None
        if address is not None:
            found.append(address)
    return found


def rejudge(policy: Policy, record: Record) -> Decision | None:
    """What `policy` decides for `record`'s request; None when it cannot be told from it."""
    names = _names(record)
    addresses = _addresses(record)
    if addresses is None:
        return None
    if record.get("action") == DNS_QUERY:
        if not names:
            return None
        decision = policy.resolvable(names[0])
        return _most_restrictive([policy.vet_address(decision, names[0], ip)
                                  for ip in addresses] or [decision])
    ip = addresses[0] if addresses else None
    port = record.get("port")
    method, override = record.get("method"), record.get("methodOverride")
    verdicts = []
    for name, at in _targets(names, ip):
        if name is None and at is None:
            return None
        for served in methods_served(policy, str(method) if method else None,
                                     str(override) if override else None):
            decision = policy.decide(Request(NETWORK_REQUEST, name=name, ip=at,
                                             port=port if isinstance(port, int) else None,
                                             method=served,
                                             client=str(record.get("client") or "")))
            if name is not None and at is None and policy.depends_on_address(name, decision):
                return None
            verdicts.append(decision)
    return _most_restrictive(verdicts)


def _targets(names: list[str], ip: IPAddress | None
             ) -> list[tuple[str | None, IPAddress | None]]:
    """What a connect's record is judged as: each name at its address, and an address a Host
    named (a claim names no site: judged by the address alone, at its own and at the
    connection's, as the daemon judged it; final attack of session 53: judged as a name, it
    was none, and denied under any policy)."""
    targets: list[tuple[str | None, IPAddress | None]] = []
    for name in names:
        claimed = _claimed_address(name)
        if claimed is None:
            targets.append((name, ip))
        else:
            targets += [(None, claimed), (None, ip)] if ip is not None else [(None, claimed)]
    return list(dict.fromkeys(targets)) or [(None, ip)]


def _most_restrictive(decisions: list[Decision]) -> Decision:
    return min(decisions, key=lambda each: each.allowed)


@dataclass
class Change:
    """Decisions that one (old rule, new rule) pair turns the same way."""

    count: int = 0
    example: str = ""


@dataclass
class Replay:
    """What a new policy would change in the trail."""

    decisions: int = 0
    untold: int = 0
    #: (old effect, new effect) -> (old rule, new rule) -> the change. A denial by guardd's
    #: own check (`ownCheck`: a rate limit, a Host it could not verify) that the new policy's
    #: rules allow has `OWN_CHECK` for its old effect: whether the check would deny again is
    #: not in its record, so it is shown apart, not counted as a change (left open by attack
    #: pass 52: under the very policy that judged, each was a "deny -> allow"), with its rules
    #: and an example as any (re-attack of session 53: a count alone hid what was in it).
    changes: dict[tuple[str, str], dict[tuple[str, str], Change]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Change)))

    @property
    def changed(self) -> int:
        return sum(change.count for (old, _), group in self.changes.items() if old != OWN_CHECK
                   for change in group.values())

    @property
    def checked(self) -> int:
        """Denials by guardd's own checks that the new policy's rules allow."""
        return sum(change.count for change in self.changes.get((OWN_CHECK, "allow"), {}).values())

    def lines(self) -> list[str]:
        lines = [f"replayed {self.decisions} decisions: {self.changed} would change"
                 + (f", {self.untold} cannot be told without the addresses their names "
                    "resolve to" if self.untold else "")
                 + (f", {self.checked} were denied by guardd's own checks (the record's reason "
                    "says which), which replay cannot repeat, where the new policy's rules "
                    "allow them" if self.checked else "")]
        for (old, new), group in sorted(self.changes.items()):
            lines.append(f"{old} -> {new}: {sum(c.count for c in group.values())}")
            for (old_rule, new_rule), change in sorted(group.items(),
                                                       key=lambda item: -item[1].count):
                lines.append(f"  {change.count:>7}  rule {old_rule} -> rule {new_rule}   "
                             f"e.g. {change.example}")
        return lines


def replay(policy: Policy, records: Iterable[Record]) -> Replay:
    """Judge every decision in `records` again under `policy`."""
    report = Replay()
    for record in decisions(records):
        count = record.get("count")
        weight = count if isinstance(count, int) and count > 0 else 1
        report.decisions += weight
        decision = rejudge(policy, record)
        if decision is None:
            report.untold += weight
            continue
        old = "allow" if record.get("effect") == "allow" or record.get("enforced") is False \
            else "deny"  # (a denial only reported went through)
        new = "allow" if decision.allowed else "deny"
        if record.get("ownCheck") is True and old == "deny" and decision.allowed:
            old = OWN_CHECK
        if old == new:
            continue
        change = report.changes[(old, new)][(str(record["matchedRule"]), decision.matched_rule)]
        change.count += weight
        change.example = change.example or _shown(record)
    return report


def _shown(record: Record) -> str:
    what = record.get("target") or record.get("domain") or record.get("ip")
    extra = " ".join(str(record[key]) for key in ("method", "qtype") if record.get(key))
    return f"{record.get('action')} {what}{' ' + extra if extra else ''} " \
           f"(client {record.get('client')}, {record.get('timestamp')})"


# -- learn ---------------------------------------------------------------------------------------


@dataclass
class _Seen:
    names: set[str] = field(default_factory=set)
    #: The addresses connected to, when each is one a built-in protection closes (loopback,
    #: private): the learned rule must name them to open them.
    protected: set[str] = field(default_factory=set)
    public: bool = False
    ports: set[int] = field(default_factory=set)
    methods: set[str] = field(default_factory=set)
    #: Requests there without a method (TLS, or other bytes): methods cannot be a condition.
    opaque: bool = False
    requests: int = 0
    #: Connects were seen there (else the group is of lookups alone, and its rule allows
    #: lookups: attack pass 52, a name only looked up, one TXT query, was learned as a rule
    #: for every action and port).
    connects: bool = False


def learn(records: Iterable[Record], source: str) -> str:
    """A proposed allow-list policy (YAML text) from what went through in `records`."""
    suffixes = PublicSuffixList(only_icann=True)
    #: By registrable domain, and whether only looked up there: what was connected to and
    #: what was only looked up are learned apart (review of attack pass 52: one name
    #: connected to made every name only looked up there a connect rule, at its ports).
    domains: dict[tuple[str, bool], _Seen] = defaultdict(_Seen)
    addresses: dict[str, _Seen] = defaultdict(_Seen)
    total = 0
    for record in decisions(records):
        learnable = _learnable_names(record)
        if record.get("effect") != "allow" and record.get("enforced") is not False or \
                not _nameable(record) or learnable is None or \
                str(record.get("outcome") or "").startswith(UNRESOLVED_OUTCOME):
            continue  # (a name with no address reached nothing: session 60's re-attack)
        total += 1
        claims = _claims(record)
        # (an address a Host named was judged with the connection's: both, by address)
        names: list[str | None] = [*learnable, *([None] if claims or not learnable else [])]
        port = record.get("port")
        looked_up = record.get("action") != NETWORK_REQUEST
        for name in names:
            if name is not None:
                seen = domains[suffixes.privatesuffix(name) or name, looked_up]
                seen.names.add(name)
            elif record.get("ip") and record.get("action") == NETWORK_REQUEST:  # (a lookup
                seen = addresses["addresses"]  # of no name opens no connect: final attack)
                seen.names.update([str(record["ip"]), *map(str, claims.values())])
            else:
                continue
            seen.requests += 1
            if isinstance(port, int):
                seen.ports.add(port)
            address = parse_ip(str(record["ip"])) if record.get("ip") and name and \
                record.get("action") == NETWORK_REQUEST else None
            if address is not None:
                if classify(address) is AddrClass.PUBLIC:
                    seen.public = True
                else:
                    seen.protected.add(str(address))
            if record.get("action") == NETWORK_REQUEST:
                seen.connects = True
                override = record.get("methodOverride")
                if record.get("method") and override != ANY_METHOD:
                    seen.methods.update(str(served) for served in (record["method"], override)
                                        if served)
                else:  # (no method, or any: none can be a condition)
                    seen.opaque = True
    lines = ["version: \"1.0\"",
             f"description: \"Learned by guardd audit learn from {total} decisions in {source}: "
             "review every rule before use\"",
             "rules:"]
    tests = []
    ids = _RuleIds()
    for (domain, looked_up), seen in sorted(domains.items()):  # (connects first)
        connected = domains.get((domain, False)) if looked_up else None
        if connected is not None:  # (its rule allows the lookups of its names, or all)
            if _globs(domain, connected.names)[0] == domain:
                continue
            seen.names -= connected.names
            if not seen.names:
                continue
        rule_id = ids.new("learned-" + domain.replace(".", "-") +
                          ("-lookups" if connected is not None else ""))
        lines.append(_rule(rule_id, "domain", _globs(domain, seen.names), seen))
        tests += [_test(name, seen, rule_id) for name in sorted(seen.names)[:3]]
    for _, seen in addresses.items():
        networks = sorted(seen.names, key=lambda text: (":" in text, text))
        rule_id = ids.new("learned-addresses")
        lines.append(_rule(rule_id, "ip", networks, seen))
        tests += [_test(address, seen, rule_id) for address in networks[:3]]
    lines.append('  - {id: catch-all-deny, action: "*", domain: "*", effect: deny, '
                 'reason: "not seen while learning"}')
    lines.append("tests:")
    lines += tests or ['  - {target: "unseen.invalid", expect: deny, rule: catch-all-deny}']
    return "\n".join(lines) + "\n"


def _globs(domain: str, names: set[str]) -> list[str]:
    """What a learned rule names under `domain`: the names seen, or, past
    `MAX_LEARNED_NAMES`, the domain and `*.domain`; a wildcard only over a zone one owner
    controls: never over a public suffix that others' names share (`*.s3.amazonaws.com`,
    `*.github.io`)."""
    if len(names) > MAX_LEARNED_NAMES and refusal(f"*.{domain}") is None:
        return [domain, f"*.{domain}"]
    return sorted(names)


class _RuleIds:
    """Ids for learned rules, each its own: an id made from a domain, dots turned to dashes,
    can be another domain's (`a-b.com`, `x.a.b-com`) or the bare addresses' rule's (review of
    attack pass 16: a duplicate id, and the learned file did not load)."""

    def __init__(self) -> None:
        self._taken = {"catch-all-deny"}

    def new(self, wanted: str) -> str:
        rule_id = wanted
        number = 1
        while rule_id in self._taken:
            number += 1
            rule_id = f"{wanted}-{number}"
        self._taken.add(rule_id)
        return rule_id


def _nameable(record: Record) -> bool:
    """Can a rule name the methods `record`'s request may be served as? One the agent chose
    that no rule can (`#X`, `*A`: HTTP tokens, which report mode lets through) is not learned
    from, and stays denied (attack pass 16: written into the YAML as it came, a comment or an
    alias there, it made the learned file fail to load)."""
    method, override = record.get("method"), record.get("methodOverride")
    return all(POLICY_METHOD.fullmatch(str(served)) is not None
               for served in (method, None if override == ANY_METHOD else override) if served)


def _rule(rule_id: str, key: str, values: list[str], seen: _Seen) -> str:
    conditions = [f"{key}: [{', '.join(_quoted(value) for value in values)}]"]
    if seen.protected and not seen.public:
        conditions.append(f"ip: [{', '.join(_quoted(ip) for ip in sorted(seen.protected))}]")
    if seen.ports:
        conditions.append(f"port: [{', '.join(map(str, sorted(seen.ports)))}]")
    if seen.methods and not seen.opaque:
        conditions.append(f"method: [{', '.join(map(_quoted, sorted(seen.methods)))}]")
    action = '"*"' if seen.connects else DNS_QUERY
    return (f"  - {{id: {rule_id}, action: {action}, {', '.join(conditions)}, effect: allow, "
            f"reason: \"seen {seen.requests} times while learning\"}}")


def _test(host: str, seen: _Seen, rule_id: str) -> str:
    port = min(seen.ports) if seen.ports else None
    shown = f"[{host}]" if ":" in host else host
    target = f"{shown}:{port}" if port is not None else host
    method = f", method: {_quoted(sorted(seen.methods)[0])}" if seen.methods and \
        not seen.opaque else ""
    address = f", ip: {_quoted(min(seen.protected))}" if seen.protected and not seen.public \
        and parse_ip(host) is None else ""
    dns = ", dns: true" if not seen.ports else ""
    return f"  - {{target: {_quoted(target)}{method}{address}{dns}, expect: allow, " \
           f"rule: {rule_id}}}"


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
