"""Which name globs may open private addresses: zones that one owner controls, by the Public
Suffix List.

Theory of operation. A private address (10/8, 192.168/16, fd00::/8, ...) is opened for a name
only by an allow rule whose every name glob names a zone that the operator, or one registrant the
operator chose, controls: nobody else can then publish an address record under it, so the agent
cannot point a name of its own at the inside network (DNS rebinding). A glob names the zone that
every name it matches lies in: the literal end after its last `*`, from its first whole label.
`*.corp.example.com` and `api-*.corp.example.com` name corp.example.com; `*example.com` also
matches evilexample.com, so it names only com; `smtp.*`, `*m` and `*` name none. An exact name
names itself. That zone qualifies when it is

* strictly below a public suffix of the list bundled with `publicsuffixlist` (read from the
  installed package, never fetched), private section included: anyone can register under
  github.io as under com. A glob with a `*` must not reach below the zone into another public
  suffix either: `*.amazonaws.com` matches names under s3.amazonaws.com, where anyone has one; or
* at or below a zone reserved for private use, which the public DNS never delegates: `internal`
  (ICANN, 2024) and `home.arpa` (RFC 8375; the list names it a public suffix so that browsers
  keep home networks' cookies apart, but nobody can register under it). Names there exist only
  in the operator's own resolvers, guardd's upstreams, and the agent reaches DNS only through
  guardd: it can make none of them point anywhere.

Every other top-level domain is a public suffix, as by the list's default rule: `lan`, `corp` or
`home` are not reserved (one could be delegated without this copy of the list knowing), and
`local` is multicast DNS, answered by whichever host on the link speaks first. So `*.lan` and a
single-label `intranet` open no private address; a rule names such a network with `ip:` instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from publicsuffixlist import PSLFILE

from guardd.addr import normalize_name
from guardd.errors import InvalidHostError

#: Zones reserved for private use that the public DNS never delegates (see the module docstring).
PRIVATE_USE_ZONES = ("internal", "home.arpa")
_BELOW_PRIVATE_USE = tuple("." + zone for zone in PRIVATE_USE_ZONES)


@dataclass(frozen=True, slots=True)
class _SuffixList:
    """The bundled list as sets of names, in A-labels as guardd normalizes names, so that one
    name costs a few set probes: a list of a million allowed globs is judged in about a second.
    `publicsuffixlist`'s own lookup, which walks every suffix of a name, costs three times that;
    the unit tests hold the two to the same answers for every rule of the list."""

    #: Public suffixes the list names: its rules, and the parent of each wildcard (`ck`, for
    #: `*.ck`), which the list's linter requires to be public too.
    listed: frozenset[str]
    #: Zones whose every child is a public suffix (`ck`), save the exceptions (`www.ck`).
    wildcards: frozenset[str]
    exceptions: frozenset[str]
    #: Each zone with a public suffix below it -> the shortest such (a glob on it would span it).
    spanned: dict[str, str]

    def public_suffix_in(self, zone: str, spans_below: bool) -> str | None:
        """The public suffix that `zone` is, or (when `spans_below`) reaches into; None when one
        owner controls every name in it.

        `zone` is one by the list's algorithm: the default rule (every top-level domain), an
        exact rule, or a wildcard that no exception carves it out of. A zone reserved for
        private use is none, whatever the list says (`home.arpa` is listed).
        """
        if zone.endswith(_BELOW_PRIVATE_USE) or zone in PRIVATE_USE_ZONES:
            return None
        parent = zone.partition(".")[2]
        if not parent or zone in self.listed or (
                parent in self.wildcards and zone not in self.exceptions):
            return zone
        return self.spanned.get(zone) if spans_below else None


def _a_labels(name: str) -> str:
    """A rule's name as guardd writes names; the encoding `publicsuffixlist` itself would use
    for a name that guardd's stricter IDNA 2008 refuses."""
    if name.isascii():
        return name
    try:
        return normalize_name(name)
    except InvalidHostError:
        return name.encode("idna").decode("ascii")


@cache
def _suffix_list() -> _SuffixList:
    """Read once, on the first allow rule, so that other commands and policies without allow
    rules do not pay the ~40 ms."""
    listed: set[str] = set()
    wildcards: set[str] = set()
    exceptions: set[str] = set()
    spanned: dict[str, str] = {}
    with open(PSLFILE, encoding="utf-8") as handle:
        for line in handle:
            fields = line.split(maxsplit=1)  # a rule is read up to the first whitespace
            if not fields or fields[0].startswith("//"):
                continue
            rule = fields[0].lower()
            if rule.startswith("!"):
                exceptions.add(_a_labels(rule[1:]))
                continue
            wildcard = rule.startswith("*.")
            name = _a_labels(rule[2:] if wildcard else rule)
            listed.add(name)
            if wildcard:
                wildcards.add(name)
            suffix = f"*.{name}" if wildcard else name
            labels = suffix.split(".")
            for start in range(1, len(labels)):
                zone = ".".join(labels[start:])
                if len(suffix) < len(spanned.get(zone, suffix + ".")):
                    spanned[zone] = suffix
    return _SuffixList(frozenset(listed), frozenset(wildcards), frozenset(exceptions), spanned)


def zone_of(glob: str) -> str | None:
    """The zone every name that `glob` (normalized) matches lies in, or None when it has none."""
    if "*" not in glob:
        return glob
    tail = glob.rpartition("*")[2]
    zone = tail[1:] if tail.startswith(".") else tail.partition(".")[2]
    return zone or None


def refusal(glob: str) -> str | None:
    """Why `glob` (normalized) does not vouch for private addresses, or None when it does."""
    zone = zone_of(glob)
    if zone is None:
        return f"{glob!r} names no zone: its end is not a fixed name"
    suffixes = _suffix_list()
    suffix = suffixes.public_suffix_in(zone, spans_below=zone != glob)
    if suffix is None:
        return None
    what = f"{glob!r} is a public suffix" if suffix == glob else \
        f"{glob!r} spans the public suffix {suffix!r}"
    if "." not in suffix and suffix not in suffixes.listed:
        what += (" (an unlisted top-level domain counts as one; only "
                 f"{' and '.join(map(repr, PRIVATE_USE_ZONES))} are reserved for private use)")
    return what
