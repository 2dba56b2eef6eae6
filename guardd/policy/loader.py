"""YAML policy file -> validated `Rule`s, with `file:line:column` on every error.

Theory of operation. The file is *composed* (not constructed) with the C loader when available,
so every value keeps its source mark; the walker below then checks each node's shape by hand.
Unknown keys are errors, because a typo such as `efect: allow` must never silently change what
traffic passes. Each rule is compiled into the shared `HostIndex` as it is read, and `domainList`
files (which may hold a million globs) are streamed straight into the index without building a
`Rule` field for every entry. Almost every such entry is already canonical (`api.example.com`,
`*.example.com`), so `normalize_glob` recognizes those with one regex and returns them as they
are, which is what the full checks would return; only the rest pay for the label-by-label checks
and IDNA. The globs of an allow rule, listed ones included, are also judged for the built-in
private-address protection (`zones.refusal`: a dict probe or two for most, and only until the
first glob that does not vouch), so a deny list costs nothing more.
"""

from __future__ import annotations

import difflib
import hashlib
import ipaddress
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import yaml

from guardd import files
from guardd.addr import ipv4_readings, normalize_name, parse_ip, parse_target
from guardd.errors import InvalidHostError, PolicyError
from guardd.policy.index import UNIVERSAL, HostIndex, glob_regex
from guardd.policy.model import (ACTIONS, DEFAULT_DENY_ID, Effect, IPNetwork, PolicyTest,
                                 RateLimit, Rule, TunnelBudget)
from guardd.policy.zones import refusal

try:  # the C composer is ~10x faster on large policies and keeps the same marks
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # pragma: no cover - libyaml missing
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

TOP_LEVEL_KEYS = ("version", "description", "mode", "dnsTunnel", "rules", "tests")
TEST_KEYS = ("target", "expect", "method", "ip", "dns", "rule")
#: `dnsTunnel:` keys -> (TunnelBudget field, least, most).
TUNNEL_KEYS = {"maxUniqueNames": ("max_unique_names", 1, 2_000),
               # (a label has at most 63 characters: 63 would count none)
               "maxLabelLength": ("max_label_length", 1, 62),
               "maxLongLabels": ("max_long_labels", 0, 10_000),
               # (a name has at most 253 characters: fewer would suspect one honest name)
               "maxNameBytes": ("max_name_bytes", 253, 10_000_000),
               "maxClientNameBytes": ("max_client_name_bytes", 253, 100_000_000),
               "maxUnusualTypes": ("max_unusual_types", 0, 10_000),
               "maxLookups": ("max_lookups", 1, 1_000_000),
               "maxClientLookups": ("max_client_lookups", 1, 100_000_000)}
RULE_KEYS = ("id", "action", "domain", "domainList", "ip", "port", "method", "rateLimit",
             "ech", "mode", "effect", "reason")
MODES = ("enforce", "report")
RATE_LIMIT_KEYS = ("maxRequests", "window")
SUPPORTED_VERSIONS = ("1", "1.0")

#: Hosts (domain entries, and domainList entries once for each rule that names the list) a
#: policy may name in all (attack pass 49: 1,000 rules naming one list of 2,000 were two
#: million entries, built for 14 s on the loop at a reload; a few lists of a million are fine).
MAX_HOST_ENTRIES = 5_000_000
#: The `*`s of the globs every lookup tries one by one (a `*` inside a label or more than one:
#: not a name, nor `*.zone`), as rules name them (re-attack: 999 rules naming 5,000 such globs
#: took minutes to load, and a lookup among 50,000 took 12-20 ms; among 5,000 of two `*`s,
#: 0.4 ms; the final re-attack: 5,000 of 120 `*`s, 12 ms).
MAX_PATTERNS = 10_000
_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_DIGITS = re.compile(r"[0-9]+")
#: Where a small number (`1`, `123`) lands as an address: a glob of digits alone is a name's.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
#: What a `*` is tried as in a glob that may read as an address (`_of_numbers`): `127.0.0.*8`
#: with a 0 is bad octal, `127.0.0.*a` hex with a 0x (final attack passes).
_FILLERS = ("0", "1", "", "0x")
#: What a number's label may hold (decimal, octal, hex).
_NUMBER_CHARACTERS = frozenset("0123456789abcdefx")
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_GLOB_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_*")
#: A name or `*.` zone glob that `normalize_glob` would return unchanged: lower-case ASCII
#: labels of 1-63 letters, digits, `-` and `_`, the last one starting with a letter (so it is
#: not a number), at most `_MAX_NAME` characters in all (the caller checks that, as
#: `normalize_name` does). Anything else takes the full checks.
_CANONICAL_GLOB = re.compile(r"(?:\*\.)?(?:[a-z0-9_-]{1,63}\.)*[a-z][a-z0-9_-]{0,62}")
_MAX_NAME = 253
#: A method a rule can name (upper case: HTTP methods are case-sensitive, RFC 9110 9.1).
POLICY_METHOD = re.compile(r"[A-Z][A-Z-]{0,31}")
_WINDOW = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")
WINDOW_UNITS: dict[str, float] = {
    "": 1.0, "ms": 0.001, "millisecond": 0.001, "milliseconds": 0.001,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
}


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """What the loader produces; `engine.Policy` wraps it with the decision logic."""

    rules: tuple[Rule, ...]
    index: HostIndex
    source: str
    description: str
    tunnel: TunnelBudget = TunnelBudget()
    tests: tuple[PolicyTest, ...] = ()
    #: `mode: report`: every denial of the policy's own (its rules', the default deny) is
    #: recorded and counted, and the request goes through.
    report: bool = False
    #: (path, SHA-256) of every text it was read from: the policy's, then its domain lists',
    #: as they were read (what the trail's `audit.policy` records name).
    digests: tuple[tuple[str, str], ...] = ()


def parse_window(text: str) -> float:
    """`"1 minute"`, `"30 seconds"`, `"1h"`, `"500ms"`, `"90"` -> seconds; ValueError if not."""
    match = _WINDOW.fullmatch(text.lower())
    if match is None or match.group(2) not in WINDOW_UNITS:
        raise ValueError(f"cannot read {text!r} as a time window")
    seconds = float(match.group(1)) * WINDOW_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"window {text!r} must be longer than zero")
    return seconds


def normalize_glob(text: str) -> str:
    """Validate and normalize a domain glob; InvalidHostError says what is wrong with it."""
    glob = text.strip().lower()
    if len(glob) <= _MAX_NAME and _CANONICAL_GLOB.fullmatch(glob) and not _of_numbers(glob):
        return glob
    return _checked_glob(text, glob)


def _of_numbers(glob: str) -> bool:
    """Does `glob` look like IPv4 addresses (`127.0.0.*`, `10.0.0.1*`, `127.0.0.*8`,
    `213070645*`, `127.0.0.*a`): with a `*`, an address once each `*` is one of `_FILLERS`?
    It matches names, never those. (A name's last label holds a letter past hex: a dotted
    glob is read so only when its last does not; one number alone, `1*` or `123*`, only when
    it is an address outside 0.0.0.0/8, which no name of digits means: final attack pass,
    `213070645*`; a hex or octal one, `0x5db8*` or `0177*`, with zeros up to 32 bits too.)"""
    last = glob[glob.rfind(".") + 1:]
    dotted = "." in glob
    if "*" not in glob or (dotted and not set(last.replace("*", "")) <= _NUMBER_CHARACTERS):
        return False
    # One hex or octal number's start (`0x5db8*`, `0177*`: review's attack) names nothing a
    # name would; it is read as far as a 32-bit number goes, zeros filling it.
    longer = () if dotted or not glob.startswith("0") else tuple("0" * n for n in range(2, 11))
    for filler in _FILLERS + longer:
        try:
            ip = parse_ip(glob.replace("*", filler))
        except InvalidHostError:
            continue
        if ip is not None and (dotted or ip not in _THIS_NETWORK):
            return True
    return False


def _checked_glob(text: str, glob: str) -> str:
    """The full checks of `normalize_glob` on `glob`, `text` stripped and lower-cased."""
    if glob.endswith(".") and glob != ".":
        glob = glob[:-1]
    if _of_numbers(glob):  # (attack pass, 2026-12-06: a deny of "127.0.0.*" never applied)
        raise InvalidHostError(f"glob {text!r} matches names, not addresses: write a CIDR "
                               "such as 127.0.0.0/24")
    if glob == "*":
        return glob
    if "*" not in glob:
        return normalize_name(glob)
    labels = glob.split(".")
    for label in labels:
        if "**" in label:
            raise InvalidHostError(f"glob {text!r}: '**' is not a glob; use a single '*'")
        if "*" in label and not _GLOB_LABEL_CHARS.issuperset(label):
            raise InvalidHostError(f"glob {text!r}: label {label!r} may hold only ASCII letters, "
                                   f"digits, '-', '_' and '*'")
    # Validate the literal parts as one name (length, characters, numeric last label, IDNA) by
    # standing in a letter for each '*', then put the '*' labels back.
    probe = normalize_name(".".join(label.replace("*", "x") for label in labels)).split(".")
    if len(probe) != len(labels):
        raise InvalidHostError(f"glob {text!r}: IDNA mapping changed its labels; write it "
                               f"with ASCII dots")
    labels = [label if "*" in label else normal for label, normal in zip(labels, probe)]
    return ".".join(labels)


class _Walker:
    """Reads one composed policy document; every check raises PolicyError at the node's mark."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.index = HostIndex()
        self.seen_ids: dict[str, int] = {}
        #: The policy's `mode: report` (its rules' default).
        self.report = False
        #: (path, SHA-256) of each domain list read.
        self.digests: list[tuple[str, str]] = []
        #: Each domain list read (by its real path: `a/../b.txt` or a symlink is `b.txt`, the
        #: review), its SHA-256 as the first rule naming it read it.
        self.read_lists: dict[str, str] = {}
        #: Every domain list it names, read or not (the last may be why it is refused).
        self.lists: list[str] = []
        self.hosts = 0  # what the rules name in all (`MAX_HOST_ENTRIES`)

    def error(self, node: yaml.Node, message: str, hint: str = "") -> PolicyError:
        mark = node.start_mark
        return PolicyError(message, file=self.source, line=mark.line + 1, column=mark.column + 1,
                           hint=hint)

    def named(self, node: yaml.Node, hosts: int) -> None:
        """Count `hosts` more that the rules name, at `node`; an error past `MAX_HOST_ENTRIES`,
        or past `MAX_PATTERNS` globs a lookup tries one by one."""
        self.hosts += hosts
        if self.hosts > MAX_HOST_ENTRIES:
            raise self.error(node, f"the rules name over {MAX_HOST_ENTRIES} hosts in all (each "
                             "domainList counted once for each rule that names it)",
                             "name a long list in one rule, or split the policy")
        if self.index.patterns > MAX_PATTERNS:
            raise self.error(node, f"the rules' globs with a * inside a label or more than one, "
                             f"which every lookup tries one by one, hold over {MAX_PATTERNS} *s "
                             "(each domainList counted once for each rule that names it)",
                             "use names and *.zone globs, or name such a list in one rule")

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...]
                ) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, f"{what} must be a mapping of keys to values")
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str) or key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(allowed)}"
                raise self.error(key_node, f"unknown key {key!r} in {what}", hint)
            if key in result:
                raise self.error(key_node, f"duplicate key {key!r} in {what}")
            result[key] = (key_node, value_node)
        return result

    def string(self, node: yaml.Node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_STR, _INT, _FLOAT):
            raise self.error(node, f"{what} must be a string")
        return str(node.value)

    def integer(self, node: yaml.Node, what: str, low: int, high: int) -> int:
        """A whole number written in decimal. YAML 1.1 also reads 034 (octal), 0x1bb and 1:00
        (sexagesimal) as numbers; a policy that says 034 may mean 34 or 28, so such a number is
        refused rather than guessed."""
        if not isinstance(node, yaml.ScalarNode) or node.tag != _INT:
            raise self.error(node, f"{what} must be a whole number")
        text = node.value
        if not _DECIMAL.fullmatch(text):
            raise self.error(node, f"{what} {text} is not a whole number in decimal",
                             "write it in plain digits, e.g. 443")
        value = int(text)
        if not low <= value <= high:
            raise self.error(node, f"{what} {value} is out of range {low}-{high}")
        return value

    def items(self, node: yaml.Node) -> list[yaml.Node]:
        """A scalar or a list of scalars (`domain: x` and `domain: [x, y]` are both accepted)."""
        if isinstance(node, yaml.SequenceNode):
            if not node.value:
                raise self.error(node, "empty list", "remove the key or give at least one value")
            return list(node.value)
        return [node]

    def document(self, root: yaml.Node | None
                 ) -> tuple[list[Rule], str, TunnelBudget, list[PolicyTest]]:
        if root is None:
            raise PolicyError("policy file is empty", file=self.source, line=1, column=1,
                              hint='start with: version: "1.0" and rules:')
        top = self.mapping(root, "the policy", TOP_LEVEL_KEYS)
        if "version" not in top:
            raise self.error(root, "missing key 'version'", 'add version: "1.0"')
        version_node = top["version"][1]
        if self.string(version_node, "version") not in SUPPORTED_VERSIONS:
            raise self.error(version_node, f"unsupported policy version {version_node.value!r}",
                             'use version: "1.0"')
        description = self.string(top["description"][1], "description") \
            if "description" in top else ""
        if "rules" not in top:
            raise self.error(root, "missing key 'rules'", "add a list of rules")
        self.report = self.mode(top["mode"][1]) if "mode" in top else False
        rules_node = top["rules"][1]
        if not isinstance(rules_node, yaml.SequenceNode):
            raise self.error(rules_node, "'rules' must be a list of rules (each starts with '-')")
        rules = [self.rule(position, node) for position, node in enumerate(rules_node.value)]
        self.index.freeze()
        tunnel = self.tunnel_budget(top["dnsTunnel"][1]) if "dnsTunnel" in top else TunnelBudget()
        tests = [self.test(node) for node in self.items(top["tests"][1])] if "tests" in top \
            else []
        return rules, description, tunnel, tests

    def test(self, node: yaml.Node) -> PolicyTest:
        """One of `tests:`, checked as far as it can be without the rules' verdicts."""
        keys = self.mapping(node, "a test", TEST_KEYS)
        for required in ("target", "expect"):
            if required not in keys:
                raise self.error(node, f"a test needs {required!r}",
                                 '- {target: "https://api.example.com", expect: allow}')
        target_node = keys["target"][1]
        target = self.string(target_node, "target")
        try:
            parsed = parse_target(target)
        except InvalidHostError as exc:
            raise self.error(target_node, f"test target: {exc}") from None
        expect = self.string(keys["expect"][1], "expect").lower()
        if expect not in ("allow", "deny"):
            raise self.error(keys["expect"][1], f"expect must be allow or deny, not {expect!r}")
        values: dict[str, object] = {}
        if "method" in keys:
            values["method"] = self.string(keys["method"][1], "method").upper()
        if "ip" in keys:
            ip_node = keys["ip"][1]
            values["ip"] = self.string(ip_node, "ip")
            try:
                address = parse_ip(str(values["ip"]))
            except InvalidHostError:
                address = None
            if address is None or parsed.host.ip is not None:
                raise self.error(ip_node, "ip: the address a name target resolved to",
                                 "give an IP address, and a name as the target")
        if "dns" in keys:
            dns_node = keys["dns"][1]
            values["dns"] = self.boolean(dns_node, "dns")
            if values["dns"] and parsed.host.name is None:
                raise self.error(dns_node, "a DNS test needs a name as its target")
        if "rule" in keys:
            rule = values["rule"] = self.string(keys["rule"][1], "rule")
            if rule not in self.seen_ids and rule != DEFAULT_DENY_ID:
                raise self.error(keys["rule"][1], f"no rule has the id {rule!r}")
        return PolicyTest(target, Effect(expect), location=f"{self.source}:"
                          f"{node.start_mark.line + 1}", **values)  # type: ignore[arg-type]

    def mode(self, node: yaml.Node) -> bool:
        """`mode: report` (True) or `mode: enforce`."""
        mode = self.string(node, "mode").lower()
        if mode not in MODES:
            raise self.error(node, f"mode must be enforce or report, not {mode!r}",
                             "report: denials are recorded and the requests go through")
        return mode == "report"

    def tunnel_budget(self, node: yaml.Node) -> TunnelBudget:
        """`dnsTunnel: off`, or a mapping of `TUNNEL_KEYS` and `window` over the defaults."""
        if isinstance(node, yaml.ScalarNode) and node.value.lower() in ("off", "false"):
            return TunnelBudget(enabled=False)
        keys = self.mapping(node, "dnsTunnel", (*TUNNEL_KEYS, "window"))
        values: dict[str, object] = {}
        for key, (field_name, least, most) in TUNNEL_KEYS.items():
            if key in keys:
                values[field_name] = self.integer(keys[key][1], key, least, most)
        if "window" in keys:
            window_node = keys["window"][1]
            values["window_text"] = self.string(window_node, "window")
            try:
                values["window"] = parse_window(values["window_text"])  # type: ignore[arg-type]
            except ValueError as exc:
                raise self.error(window_node, str(exc), 'use e.g. "1 minute"') from None
            if values["window"] < 1.0:  # type: ignore[operator]
                raise self.error(window_node, "dnsTunnel window must be at least 1 second",
                                 "a shorter one would count next to nothing")
        return TunnelBudget(**values)  # type: ignore[arg-type]

    def rule(self, position: int, node: yaml.Node) -> Rule:
        keys = self.mapping(node, f"rule {position + 1}", RULE_KEYS)
        rule_id = self.string(keys["id"][1], "id") if "id" in keys else f"rule-{position + 1}"
        if not rule_id.isprintable():  # (a NUL keeps the rate limiter's keys apart; a CR or LF
            #                              would go into headers and labels: session 55's attack)
            raise self.error(keys["id"][1], f"rule id {rule_id!r} holds a character that is "
                             "not printable (a control, format or separator character)",
                             "write an id of printable characters, e.g. allow-github")
        if rule_id in self.seen_ids:
            raise self.error(keys["id"][1] if "id" in keys else node,
                             f"duplicate rule id {rule_id!r}",
                             f"rule {self.seen_ids[rule_id]} already uses it")
        self.seen_ids[rule_id] = position + 1
        if "action" not in keys:
            raise self.error(node, "rule has no 'action'",
                             "use action: network.request, dns.query or \"*\"")
        if "effect" not in keys:
            raise self.error(node, "rule has no 'effect'", "add effect: allow or effect: deny")
        effect_node = keys["effect"][1]
        effect_text = self.string(effect_node, "effect").lower()
        if effect_text not in ("allow", "deny"):
            raise self.error(effect_node, f"effect must be allow or deny, not {effect_text!r}")
        effect = Effect(effect_text)
        judged = effect is Effect.ALLOW  # only an allow is ever vouched for
        domains, domain_networks = self.domains(keys["domain"][1]) if "domain" in keys else ((), ())
        lists, listed, unvouched = self.domain_lists(position, keys["domainList"][1], judged) \
            if "domainList" in keys else ((), 0, "")
        if judged:
            unvouched = next((f"domain {why}" for why in map(refusal, domains) if why), unvouched)
        ip_networks = tuple(self.network(item, "ip") for item in self.items(keys["ip"][1])) \
            if "ip" in keys else ()
        if effect is Effect.DENY:  # (an allow opens only what it names)
            domain_networks, ip_networks = ipv4_readings(domain_networks), \
                ipv4_readings(ip_networks)
        rule = Rule(
            position=position,
            id=rule_id,
            effect=effect,
            reason=self.string(keys["reason"][1], "reason") if "reason" in keys else "",
            actions=self.actions(keys["action"][1]),
            domains=domains,
            domain_networks=domain_networks,
            ip_networks=ip_networks,
            ports=tuple(self.ports(item) for item in self.items(keys["port"][1]))
            if "port" in keys else (),
            methods=frozenset(self.method(item) for item in self.items(keys["method"][1]))
            if "method" in keys else frozenset(),
            rate_limit=self.rate_limit(keys["rateLimit"][1]) if "rateLimit" in keys else None,
            allows_ech=self.ech(keys["ech"][1], effect) if "ech" in keys else False,
            report=self.mode(keys["mode"][1]) if "mode" in keys else self.report,
            domain_lists=lists,
            listed_domains=listed,
            names_specific_zone=judged and bool(domains or listed) and not unvouched,
            unvouched=unvouched,
            source=self.source,
            line=node.start_mark.line + 1,
        )
        if "id" not in keys and rule.rate_limit is not None:
            rule = replace(rule, unnamed_key=_unnamed_key(rule))
        self.compile(rule)
        if "domain" in keys:
            self.named(keys["domain"][1], len(domains) + len(domain_networks))
        return rule

    def compile(self, rule: Rule) -> None:
        self.index.add_globs(rule.position, rule.domains)
        for network in rule.domain_networks:
            self.index.add_network(rule.position, network)
        if not (rule.domains or rule.domain_networks or rule.listed_domains):
            if rule.ip_networks:
                for network in rule.ip_networks:
                    self.index.add_network(rule.position, network)
            else:
                self.index.add_hostless(rule.position)

    def actions(self, node: yaml.Node) -> frozenset[str]:
        text = self.string(node, "action")
        if "*" in text:
            pattern = glob_regex(text)
            matched = frozenset(action for action in ACTIONS if pattern.fullmatch(action))
            if not matched:
                raise self.error(node, f"action glob {text!r} matches none of {', '.join(ACTIONS)}")
            return matched
        if text not in ACTIONS:
            close = difflib.get_close_matches(text, ACTIONS, n=1)
            raise self.error(node, f"unknown action {text!r}",
                             f"did you mean {close[0]!r}?" if close
                             else f"guardd decides {' and '.join(ACTIONS)}; \"*\" means both")
        return frozenset((text,))

    def domains(self, node: yaml.Node) -> tuple[tuple[str, ...], tuple[IPNetwork, ...]]:
        globs: list[str] = []
        networks: list[IPNetwork] = []
        for item in self.items(node):
            text = self.string(item, "domain")
            network = self.host_network(item, text)
            if network is not None:
                networks.append(network)
            else:
                globs.append(self.glob(item, text))
        return tuple(dict.fromkeys(globs)), tuple(networks)

    def glob(self, node: yaml.Node, text: str) -> str:
        try:
            return normalize_glob(text)
        except InvalidHostError as exc:
            raise self.error(node, f"invalid domain glob: {exc}",
                             "use a name such as api.example.com, *.example.com or *") from None

    def host_network(self, node: yaml.Node, text: str) -> IPNetwork | None:
        """An IP literal (any encoding) or CIDR given as a domain; None when it is a name."""
        if "/" in text:
            return self.network(node, "domain")
        if "*" in text:
            return None
        try:
            ip = parse_ip(text.strip())
        except InvalidHostError as exc:
            raise self.error(node, str(exc), "a name must not end in a number") from None
        return None if ip is None else ipaddress.ip_network(ip)

    def network(self, node: yaml.Node, what: str) -> IPNetwork:
        text = self.string(node, what).strip()
        try:
            if "/" not in text:
                ip = parse_ip(text)
                if ip is None:
                    raise ValueError(f"{text!r} is not an IP address")
                return ipaddress.ip_network(ip)
            return ipaddress.ip_network(text, strict=True)
        except (ValueError, InvalidHostError) as exc:
            hint = "give an address or CIDR such as 10.0.0.0/8 or fd00::/8"
            if "host bits set" in str(exc):
                hint = f"did you mean {ipaddress.ip_network(text, strict=False)}?"
            raise self.error(node, f"invalid {what} {text!r}: {exc}", hint) from None

    def ports(self, node: yaml.Node) -> tuple[int, int]:
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR and "-" in node.value:
            low_text, _, high_text = node.value.partition("-")
            # (ASCII digits: `isdigit` takes a superscript, `int` an Arabic-Indic digit)
            if not (_DIGITS.fullmatch(low_text.strip()) and _DIGITS.fullmatch(high_text.strip())):
                raise self.error(node, f"invalid port range {node.value!r}", 'use "8000-8999"')
            low, high = int(low_text), int(high_text)
            if not 1 <= low <= high <= 65535:
                raise self.error(node, f"invalid port range {node.value!r}",
                                 "ports run from 1 to 65535, low end first")
            return low, high
        if isinstance(node, yaml.ScalarNode) and node.tag == _STR and _DIGITS.fullmatch(node.value):
            port = int(node.value)
        else:
            port = self.integer(node, "port", 1, 65535)
        if not 1 <= port <= 65535:
            raise self.error(node, f"port {port} is out of range 1-65535")
        return port, port

    def method(self, node: yaml.Node) -> str:
        text = self.string(node, "method").strip().upper()
        if not POLICY_METHOD.fullmatch(text):
            raise self.error(node, f"invalid HTTP method {node.value!r}", "e.g. GET, POST, PUT")
        return text

    def boolean(self, node: yaml.Node, what: str) -> bool:
        """`true` or `false`, spelled so (YAML 1.1 also reads yes, on and y as true)."""
        if not isinstance(node, yaml.ScalarNode) or node.value not in ("true", "false"):
            raise self.error(node, f"{what} must be true or false")
        return node.value == "true"

    def ech(self, node: yaml.Node, effect: Effect) -> bool:
        """`ech: true` on an allow rule: a ClientHello with Encrypted Client Hello may go to the
        names it allows, although its real server name is then hidden (its outer SNI is judged)."""
        allows = self.boolean(node, "ech")
        if allows and effect is not Effect.ALLOW:
            raise self.error(node, "ech: true only means something on an allow rule")
        return allows

    def rate_limit(self, node: yaml.Node) -> RateLimit:
        keys = self.mapping(node, "rateLimit", RATE_LIMIT_KEYS)
        for required in RATE_LIMIT_KEYS:
            if required not in keys:
                raise self.error(node, f"rateLimit needs {required!r}",
                                 'e.g. rateLimit: {maxRequests: 60, window: "1 minute"}')
        max_requests = self.integer(keys["maxRequests"][1], "maxRequests", 1, 10**9)
        window_node = keys["window"][1]
        window_text = self.string(window_node, "window")
        try:
            window = parse_window(window_text)
        except ValueError as exc:
            raise self.error(window_node, str(exc),
                             'use e.g. "1 minute", "30 seconds", "1h", "500ms" or seconds') from None
        return RateLimit(max_requests, window, window_text)

    def domain_lists(self, position: int, node: yaml.Node, judged: bool
                     ) -> tuple[tuple[str, ...], int, str]:
        """Compile the lists; with `judged`, also say why the first entry that does not vouch
        for private addresses does not ("" when every entry does)."""
        paths: list[str] = []
        count = 0
        unvouched = ""
        for item in self.items(node):
            relative = self.string(item, "domainList")
            path = (self.base_dir / relative)
            if os.path.realpath(path) == os.path.realpath(self.source):  # (read twice, as
                #   text and as a list, a change between escaped `read_lists`: the last attack)
                raise self.error(item, f"domainList {relative!r} is the policy file itself",
                                 "name a list file of its own")
            self.lists.append(str(path))
            digest = hashlib.sha256()
            try:
                with files.open_bounded(path, files.MAX_LIST_BYTES) as handle:
                    added, why = self._compile_list(position, str(path), self._list_lines(
                        item, relative, handle, digest.update), judged and not unvouched)
                    count += added
                    unvouched = unvouched or why
                self.named(item, added)
            except OSError as exc:
                raise self.error(item, f"cannot read domainList {relative!r}: {exc.strerror}",
                                 f"paths are relative to the policy file ({self.base_dir})") from None
            read = self.read_lists.setdefault(os.path.realpath(path), digest.hexdigest())
            if read != digest.hexdigest():  # (session 55's last re-attack: renamed over
                #   between two rules' reads, each had other names, and the policy's digests
                #   were a whole read's, which later reloads took for the same policy)
                raise self.error(item, f"domainList {relative!r} changed while the policy was "
                                       "read: its rules read it with other contents",
                                 "load it again (SIGHUP; --watch does once the change settles)")
            self.digests.append((str(path), read))
            paths.append(str(path))
        return tuple(paths), count, unvouched

    def _list_lines(self, item: yaml.Node, relative: str, handle: BinaryIO,
                    hashed: Callable[[bytes], object]) -> Iterator[str]:
        """A domain list's lines as read, one at a time (lists may be long), each `hashed`;
        its line ends those of Python's text files (LF, CRLF, CR), nothing else; a line that
        is not UTF-8 is an error that names it. Past `files.MAX_LIST_BYTES` (it grew while
        read: checked at each line's end), an OSError."""
        left = files.MAX_LIST_BYTES
        for number, raw in enumerate(handle, 1):
            left -= len(raw)
            if left < 0:
                raise files.too_large(files.MAX_LIST_BYTES)
            hashed(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.error(item, f"domainList {relative!r} line {number} is not UTF-8 "
                                 f"text ({exc.reason})") from None
            yield from text.replace("\r\n", "\n").split("\r") if "\r" in text else (text,)

    def _compile_list(self, position: int, path: str, lines: Iterator[str], judged: bool
                      ) -> tuple[int, str]:
        count = 0
        unvouched = ""
        add = self.index.add_glob
        for number, raw in enumerate(lines, 1):
            entry = raw.split("#", 1)[0].strip()
            if not entry:
                continue
            try:
                glob = normalize_glob(entry)
            except InvalidHostError as exc:
                raise PolicyError(f"invalid domain glob: {exc}", file=path, line=number,
                                  column=raw.find(entry) + 1,
                                  hint="one glob a line, such as *.example.com") from None
            if glob == UNIVERSAL:
                raise PolicyError("'*' in a domainList would match everything", file=path,
                                  line=number, column=raw.find(entry) + 1,
                                  hint="use domain: \"*\" in the policy instead")
            add(position, glob)
            count += 1
            if judged:
                why = refusal(glob)
                if why:
                    unvouched = f"domainList {path}:{number}: {why}"
                    judged = False
        return count, unvouched


def _refuse_aliases(root: yaml.Node | None, walker: _Walker) -> None:
    """A PolicyError at the first value that is a YAML alias (composed, the anchored node
    again): a policy reads as it looks (attack pass 49: 999 rules of `domain: *d` were two
    million entries from 100 KB)."""
    if root is None:
        return
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, yaml.Node]] = [(root, root)]
    while stack:
        node, at = stack.pop()
        if id(node) in seen:
            raise walker.error(at, "a YAML alias is not allowed in a policy: it repeats what "
                               "an anchor (&) holds", "write the list out, or put it in a "
                               "domainList file that both rules name")
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):  # (in the file's order: the anchor first)
            stack.extend(reversed([pair for key, value in node.value
                                   for pair in ((key, key), (value, key))]))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(reversed([(item, node) for item in node.value]))


def load_policy_text(text: str, source: str = "<policy>", base_dir: Path | None = None
                     ) -> LoadedPolicy:
    """Parse policy YAML text; raises PolicyError with file:line:column."""
    try:
        root = yaml.compose(text, Loader=_YamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        raise PolicyError(f"not valid YAML: {exc.problem or exc.context}", file=source,
                          line=line, column=column,
                          hint="check the indentation and quoting of this line") from None
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, raw
        before = text[:exc.position]
        raise PolicyError(f"not valid YAML: control character U+{exc.character:04X} is not "
                          "allowed", file=source, line=before.count("\n") + 1,
                          column=exc.position - (before.rfind("\n") + 1) + 1,
                          hint='write it escaped in a double-quoted string ("\\x01"), or '
                          "remove it") from None
    walker = _Walker(source, base_dir or Path("."))
    try:
        _refuse_aliases(root, walker)
        rules, description, tunnel, tests = walker.document(root)
    except PolicyError as exc:
        exc.files = tuple(dict.fromkeys((source, *exc.files, *walker.lists)))
        raise
    return LoadedPolicy(tuple(rules), walker.index, source, description, tunnel, tuple(tests),
                        walker.report, ((source, hashlib.sha256(text.encode()).hexdigest()),
                                        *walker.digests))


def load_policy_file(path: str | Path) -> LoadedPolicy:
    """Read and parse a policy file; unreadable files are PolicyErrors too."""
    path = Path(path)
    try:
        text = files.read_bounded(path).decode("utf-8")
    except OSError as exc:
        raise PolicyError(f"cannot read policy: {exc.strerror}", file=str(path), line=0,
                          column=0) from None
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy is not UTF-8 text ({exc.reason})", file=str(path)) from None
    # (decoded as it is, CRLF lines too: its text's hash is the file's, as `sha256sum` reads
    # it; review)
    return load_policy_text(text, str(path), path.parent)


def _unnamed_key(rule: Rule) -> str:
    """What a rule without an id counts its rate limit under, after a NUL (which no id holds):
    a digest of what it matches and allows, each list in order, not of where it stands nor how
    it is worded (its reason, its window's words, its lists' contents: a list edited is the
    same rule's, as a rule with an id keeps its counts)."""
    limit = rule.rate_limit
    said = repr((rule.effect.value, sorted(rule.actions), sorted(rule.domains),
                 sorted(map(str, rule.domain_networks)), sorted(map(str, rule.ip_networks)),
                 sorted(rule.ports), sorted(rule.methods), sorted(rule.domain_lists),
                 rule.allows_ech, rule.report,
                 None if limit is None else (limit.max_requests, limit.window)))
    return "\0" + hashlib.blake2b(said.encode(), digest_size=16).hexdigest()
