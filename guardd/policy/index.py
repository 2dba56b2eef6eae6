"""Compiled host matching: which rules could match this name or address, without a rule scan.

Theory of operation. Every rule's host condition is split into parts that a dict can answer:

* exact names (`api.openai.com`) live in one dict: name -> rule positions;
* zone globs (`*.ngrok.io`) live in a second dict keyed by the zone; a query walks the label
  suffixes of its name (`a.b.ngrok.io` asks for `b.ngrok.io`, `ngrok.io`, `io`), because `*` only
  ever stands for one or more whole leading labels in such a glob;
* the universal glob `*` and rules with no host condition at all are always candidates;
* the few remaining globs (`smtp.*`, `api-*.x.com`) are regexes in a short fallback list;
* IP literals and CIDRs live in per-prefix-length dicts keyed by the masked address, so a lookup
  costs one dict probe per distinct prefix length in the policy.

`candidates()` returns the positions of every rule whose host condition matches, ascending; the
engine then checks the cheap remaining conditions (action, port, method, `ip` key) in that order,
so the first full match is the first-match-wins answer of a naive in-order scan.

To keep a million-name policy small, a dict value is a bare `int` while a name belongs to one
rule and becomes a tuple only when several rules share it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from guardd.addr import IPAddress
from guardd.policy.model import IPNetwork

Positions = int | tuple[int, ...]

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
    """`*` matches any run of characters, dots included; everything else is literal."""
    return re.compile(".*".join(re.escape(part) for part in glob.split("*")), re.DOTALL)


def names_specific_zone(glob: str) -> bool:
    """A glob names a zone when its end is fixed: `*.corp.com` does, `*` and `smtp.*` do not."""
    return glob != UNIVERSAL and not glob.endswith("*")


def _add(table: dict, key: object, position: int) -> None:
    old = table.get(key)
    if old is None:
        table[key] = position
    elif isinstance(old, int):
        if old != position:
            table[key] = (old, position)
    elif position not in old:
        table[key] = old + (position,)


class HostIndex:
    """The compiled host conditions of one policy (build once per load, then read-only)."""

    def __init__(self) -> None:
        self._exact: dict[str, Positions] = {}
        self._zones: dict[str, Positions] = {}
        self._patterns: list[tuple[int, re.Pattern[str]]] = []
        self._always: list[int] = []
        self._v4: dict[int, dict[int, Positions]] = {}
        self._v6: dict[int, dict[int, Positions]] = {}
        self._always_sorted: tuple[int, ...] = ()

    def add_glob(self, position: int, glob: str) -> None:
        kind = glob_kind(glob)
        if kind == "universal":
            self._always.append(position)
        elif kind == "exact":
            _add(self._exact, glob, position)
        elif kind == "zone":
            _add(self._zones, glob[2:], position)
        else:
            self._patterns.append((position, glob_regex(glob)))

    def add_globs(self, position: int, globs: Iterable[str]) -> None:
        for glob in globs:
            self.add_glob(position, glob)

    def add_network(self, position: int, network: IPNetwork) -> None:
        tables = self._v4 if network.version == 4 else self._v6
        bits = network.max_prefixlen - network.prefixlen
        _add(tables.setdefault(network.prefixlen, {}), int(network.network_address) >> bits, position)

    def add_hostless(self, position: int) -> None:
        """A rule without any host condition matches every destination."""
        self._always.append(position)

    def freeze(self) -> None:
        """Sort what needs sorting once, after the last rule was added."""
        self._always_sorted = tuple(sorted(set(self._always)))
        self._patterns.sort(key=lambda entry: entry[0])
        self._v4 = dict(sorted(self._v4.items(), reverse=True))
        self._v6 = dict(sorted(self._v6.items(), reverse=True))

    def candidates(self, name: str | None, ip: IPAddress | None) -> list[int]:
        """Positions of every rule whose host condition matches `name` or `ip`, ascending."""
        found: list[int] = list(self._always_sorted)
        if name is not None:
            self._collect_name(name, found)
        if ip is not None:
            self._collect_ip(ip, found)
        if len(found) > len(self._always_sorted):
            found = sorted(set(found))
        return found

    def _collect_name(self, name: str, found: list[int]) -> None:
        hit = self._exact.get(name)
        if hit is not None:
            found.extend((hit,) if isinstance(hit, int) else hit)
        if self._zones:
            dot = name.find(".")
            while dot != -1:
                hit = self._zones.get(name[dot + 1:])
                if hit is not None:
                    found.extend((hit,) if isinstance(hit, int) else hit)
                dot = name.find(".", dot + 1)
        for position, pattern in self._patterns:
            if pattern.fullmatch(name):
                found.append(position)

    def _collect_ip(self, ip: IPAddress, found: list[int]) -> None:
        tables = self._v4 if ip.version == 4 else self._v6
        value = int(ip)
        max_bits = ip.max_prefixlen
        for prefixlen, table in tables.items():
            hit = table.get(value >> (max_bits - prefixlen))
            if hit is not None:
                found.extend((hit,) if isinstance(hit, int) else hit)

    @property
    def size(self) -> int:
        """Number of distinct compiled entries (names, zones, patterns, networks)."""
        networks = sum(len(t) for t in self._v4.values()) + sum(len(t) for t in self._v6.values())
        return len(self._exact) + len(self._zones) + len(self._patterns) + networks


def network_of(ip: IPAddress) -> IPNetwork:
    """The single-address network of an IP literal given as a rule host."""
    return ipaddress.ip_network(ip)
