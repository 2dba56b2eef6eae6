"""Compiled host matching: which rules could match this name or address, without a rule scan.

Theory of operation. Every rule's host condition is split into parts that a dict can answer:

* exact names (`api.openai.com`) live in one dict: name -> rule positions;
* zone globs (`*.ngrok.io`) live in a second dict keyed by the zone; a query walks the label
  suffixes of its name (`a.b.ngrok.io` asks for `b.ngrok.io`, `ngrok.io`, `io`), because `*`
  only ever stands for one or more whole leading labels in such a glob. It asks only at the
  label counts some zone has: a list of `*.x.y` zones costs one probe, not one per label;
* the universal glob `*` and rules with no host condition at all are always candidates;
* the remaining globs are regexes. One whose first label is literal (`smtp.*`, `s3.*.aws.com`)
  sits in a dict keyed by that label, so a name meets only the regexes of its own first label;
  the others (`api-*.x.com`, `*cdn*`) are tried in turn while there are few, and from 32 on are
  filed by a piece of 3 characters of their literal parts, the rarest, so that a name meets only
  those filed under a piece it holds. Either way a regex runs only when the name starts with the
  glob's literal head, ends in its tail (`.x.com`) and holds its longest part between `*`s,
  tests in C that reject most names;
* IP literals and CIDRs live in per-prefix-length dicts keyed by the masked address, so a lookup
  costs one dict probe per distinct prefix length in the policy.

`matching()` returns the positions of every rule whose host condition matches, in no order and
perhaps repeated (one rule can match through several entries); the engine sorts them, which is
cheaper than building a set on every request, and checks the cheap remaining conditions (action,
port, method, `ip` key) in that order, so the first full match is the first-match-wins answer of
a naive in-order scan. `candidates()` is the same, ascending and each once, for the callers that
walk them all (`Policy.method_matters`, `Policy.shadowed`).

To keep a million-name policy small, a dict value is a bare `int` while a name belongs to one
rule and becomes a tuple only when several rules share it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from guardd.addr import IPAddress
from guardd.policy.model import IPNetwork

Positions = int | list[int]
#: How many characters of a glob's literal parts file it (`HostIndex._grams`).
_GRAM = 3
#: From how many pattern globs on they are filed by a piece of their parts: fewer are tried
#: in turn, which costs a short name less than cutting it into pieces.
_FILED_FROM = 32
#: A pattern glob as a lookup tries it: its rule's position, what a name must start and end
#: with, the longest of its parts between `*`s (which a name must hold), and its regex.
Pattern = tuple[int, str, str, str, re.Pattern[str]]

UNIVERSAL = "*"


def glob_kind(glob: str) -> str:
    """Classify a normalized glob: `universal`, `exact`, `zone` (`*.x.y`) or `pattern`."""
    if glob == UNIVERSAL:
        return "universal"
    if "*" not in glob:
        return "exact"
    if glob.startswith("*.") and "*" not in glob[2:]:
        return "zone"
    return "pattern"


def glob_regex(glob: str) -> re.Pattern[str]:
    """`*` matches any run of characters, dots included; everything else is literal.

    Each part between two `*`s is taken where it first occurs after the part before it, and
    kept there (an atomic group): a later place would only leave less of the name for the
    parts after it, so this never misses a match, and a name costs one pass a part. As plain
    `.*`s, a name the agent chose cost a try of every way to split it (attack pass,
    2026-12-06: a 191-character name took 1.6 s against `*a*a*a*a*b`, 63 s against a glob of
    six `*`s, the loop held all the while)."""
    if "*" not in glob:
        return re.compile(re.escape(glob), re.DOTALL)
    first, *middle, last = [re.escape(part) for part in glob.split("*")]
    return re.compile(first + "".join(f"(?>.*?{part})" for part in middle if part) +
                      ".*" + last, re.DOTALL)


def _literal_first_label(glob: str) -> str | None:
    """The first label of a pattern glob when it holds no `*` (`smtp` for `smtp.*`), else None.

    Every name the glob matches then has exactly that first label, since `*` comes after its dot.
    """
    label, dot, _ = glob.partition(".")
    return label if dot and "*" not in label else None


def _add(table: dict, key: object, position: int) -> None:
    """Add `position` to `key`'s: rules come in order, so a list grows at its end (attack pass
    49: a tuple made again at each rule, and searched, was quadratic in the rules)."""
    old = table.setdefault(key, position)  # one probe for the common case, a new key
    if old == position:
        return
    if isinstance(old, int):
        table[key] = [old, position]
    elif old[-1] != position:
        old.append(position)


def _extend(found: list[int], hit: Positions) -> None:
    """Add a dict value's positions: a bare int, or a tuple when several rules share the key."""
    if isinstance(hit, int):
        found.append(hit)
    else:
        found.extend(hit)


def _match_patterns(patterns: Iterable[Pattern], name: str, found: list[int]) -> None:
    """Add the positions of the patterns `name` matches. Tests in C spare most regexes: its
    head, its tail, and a part it must hold (session 61's attack: 5,000 `*xxxxxx*` globs cost
    10 ms a 250-character name as regexes, and an answer naming 240 of them 2.5 s)."""
    for position, head, tail, inner, regex in patterns:
        if name.startswith(head) and name.endswith(tail) and inner in name and \
                regex.fullmatch(name):
            found.append(position)


class HostIndex:
    """The compiled host conditions of one policy (build once per load, then read-only)."""

    def __init__(self) -> None:
        self._exact: dict[str, Positions] = {}
        self._zones: dict[str, Positions] = {}
        self._zone_depths: frozenset[int] = frozenset()
        self._shallowest_zone = 1
        self._labelled: dict[str, list[Pattern]] = {}
        self._patterns: list[Pattern] = []
        self._always: list[int] = []
        self._v4: dict[int, dict[int, Positions]] = {}
        self._v6: dict[int, dict[int, Positions]] = {}
        self._always_sorted: tuple[int, ...] = ()
        #: The `*`s of the globs a lookup tries one by one (a `*` inside a label, or several), as
        #: rules name them; each glob compiled once.
        self.patterns = 0
        self._regexes: dict[str, re.Pattern[str]] = {}
        #: Pattern globs by a piece of `_GRAM` characters of their parts, the rarest among
        #: them (a name holds each of its parts: a glob is tried only on a name that holds
        #: its piece), once there are `_FILED_FROM` of them (`freeze`); and meanwhile each with
        #: its pieces.
        self._grams: dict[str, list[Pattern]] = {}
        self._to_file: list[tuple[Pattern, list[str]]] = []

    def add_glob(self, position: int, glob: str) -> None:
        kind = glob_kind(glob)
        if kind == "universal":
            self._always.append(position)
        elif kind == "exact":
            _add(self._exact, glob, position)
        elif kind == "zone":
            _add(self._zones, glob[2:], position)
        else:
            self._add_pattern(position, glob)

    def add_globs(self, position: int, globs: Iterable[str]) -> None:
        for glob in globs:
            self.add_glob(position, glob)

    def _add_pattern(self, position: int, glob: str) -> None:
        self.patterns += glob.count("*")  # (what a lookup's match of it costs, roughly)
        regex = self._regexes.get(glob)
        if regex is None:  # (compiled once, however many rules name it: re-attack of pass 49)
            regex = self._regexes[glob] = glob_regex(glob)
        parts = glob.split("*")
        pattern = (position, parts[0], parts[-1], max(parts[1:-1], key=len, default=""), regex)
        label = _literal_first_label(glob)
        if label is not None:
            self._labelled.setdefault(label, []).append(pattern)
            return
        pieces = [part[at:at + _GRAM] for part in parts for at in range(len(part) - _GRAM + 1)]
        if pieces:
            self._to_file.append((pattern, pieces))
        else:
            self._patterns.append(pattern)

    def add_network(self, position: int, network: IPNetwork) -> None:
        tables = self._v4 if network.version == 4 else self._v6
        bits = network.max_prefixlen - network.prefixlen
        _add(tables.setdefault(network.prefixlen, {}), int(network.network_address) >> bits, position)

    def add_hostless(self, position: int) -> None:
        """A rule without any host condition matches every destination."""
        self._always.append(position)

    def freeze(self) -> None:
        """Sort and summarize what needs it once, after the last rule was added."""
        self._always_sorted = tuple(sorted(set(self._always)))
        self._zone_depths = frozenset(zone.count(".") + 1 for zone in self._zones)
        self._shallowest_zone = min(self._zone_depths, default=1)
        self._v4 = dict(sorted(self._v4.items(), reverse=True))
        self._v6 = dict(sorted(self._v6.items(), reverse=True))
        if len(self._to_file) < _FILED_FROM:
            self._patterns += [pattern for pattern, _ in self._to_file]
        else:
            counts = Counter(piece for _, pieces in self._to_file for piece in set(pieces))
            for pattern, pieces in self._to_file:
                self._grams.setdefault(min(pieces, key=counts.__getitem__), []).append(pattern)
        self._to_file = []

    def candidates(self, name: str | None, ip: IPAddress | None) -> list[int]:
        """Positions of every rule whose host condition matches `name` or `ip`, ascending."""
        return sorted(set(self.matching(name, ip)))

    def matching(self, name: str | None, ip: IPAddress | None) -> list[int]:
        """The positions of `candidates()` in no order, perhaps repeated: for a first-match
        caller, which sorts them itself (sorting two or three ints costs less than a set)."""
        found = list(self._always_sorted)
        if name is not None:
            self._collect_name(name, found)
        if ip is not None:
            self._collect_ip(ip, found)
        return found

    def _collect_name(self, name: str, found: list[int]) -> None:
        hit = self._exact.get(name)
        if hit is not None:
            _extend(found, hit)
        first_label, _, parent = name.partition(".")
        if self._labelled:
            labelled = self._labelled.get(first_label)
            if labelled is not None:
                _match_patterns(labelled, name, found)
        if self._patterns:
            _match_patterns(self._patterns, name, found)
        if self._grams:
            grams = self._grams
            for piece in {name[at:at + _GRAM] for at in range(len(name) - _GRAM + 1)}:
                filed = grams.get(piece)
                if filed is not None:
                    _match_patterns(filed, name, found)
        if self._zones:
            self._collect_zones(parent, name.count("."), found)

    def _collect_zones(self, suffix: str, labels: int, found: list[int]) -> None:
        """Probe `suffix` (of `labels` labels) and its shorter suffixes as zones, but only at
        the label counts some zone has: a probe costs a hash and a dict lookup (a cache miss in a
        million-zone dict), a skipped suffix only the `partition` that shortens it."""
        zones, depths, shallowest = self._zones, self._zone_depths, self._shallowest_zone
        while labels >= shallowest:
            if labels in depths:
                hit = zones.get(suffix)
                if hit is not None:
                    _extend(found, hit)
            suffix = suffix.partition(".")[2]
            labels -= 1

    def _collect_ip(self, ip: IPAddress, found: list[int]) -> None:
        tables = self._v4 if ip.version == 4 else self._v6
        value = int(ip)
        max_bits = ip.max_prefixlen
        for prefixlen, table in tables.items():
            hit = table.get(value >> (max_bits - prefixlen))
            if hit is not None:
                _extend(found, hit)

    @property
    def size(self) -> int:
        """Number of distinct compiled entries (names, zones, patterns, networks)."""
        networks = sum(len(t) for t in self._v4.values()) + sum(len(t) for t in self._v6.values())
        patterns = sum(len(filed) for table in (self._labelled, self._grams)
                       for filed in table.values())
        return len(self._exact) + len(self._zones) + patterns + len(self._patterns) + networks

