"""Host parsing and address classes: what a client's host string really points at.

Theory of operation
-------------------
Every host guardd sees (a DNS question, a SOCKS CONNECT target, a policy entry) goes through
``parse_host`` once and comes out as a ``Host``: a normalized domain name or an IP address, nothing
else. A string that an operating system or a browser would treat as an address is an address here
too, so an agent cannot carry ``169.254.169.254`` past a name rule as ``0xa9fea9fe``,
``169.254.43518`` or ``１６９．２５４．１６９．２５４``.

1. **IP literals.** A host with ``:`` (or in brackets) is IPv6 and ``ipaddress`` parses it; zone
   ids (``%eth0``) are refused, because a zone names an interface of this machine, not a
   destination. IPv4 follows the WHATWG URL host parser, which accepts what ``inet_aton`` accepts:
   1 to 4 parts, each decimal, octal (leading ``0``) or hex (``0x``), the last part filling the
   remaining bytes. Its "ends in a number" rule tells address from name by the last label alone:
   when that label is numeric the host must be a valid IPv4 address or it is invalid, so
   ``foo.1.2.3.4`` and ``256.1.1.1`` are errors, never names, while ``169.254.169.254.nip.io`` is an
   ordinary name.
2. **Names.** ASCII input, the common case, is lower-cased and checked with str methods and a
   frozenset: no regex, no IDNA. Non-ASCII input is mapped with UTS 46 (non-transitional, as
   browsers do) and its non-ASCII labels become A-labels, so ``bücher.de`` and ``xn--bcher-kva.de``
   are one name. The mapping runs *before* the address check, as in a browser, so fullwidth digits
   and ideographic full stops cannot disguise an address as a name.
3. **Classes.** An address is judged by guardd's own table, ``ADDRESS_CLASSES`` (not by
   ``ipaddress``'s ``is_private``, which calls the documentation ranges private), compiled into
   sorted integer ranges searched by bisection. The metadata table is consulted first. An IPv6
   address that embeds an IPv4 one (mapped, compatible, SIIT, NAT64, 6to4, Teredo) is judged by the
   IPv4 address it embeds, because that is where a translator delivers the packets; one with an
   ISATAP interface identifier, under any prefix, by the stricter of its two readings. Where
   packets may go to more than one place (those, a local NAT64 prefix's layouts, IPv4-compatible,
   SIIT, 6to4 and Teredo forms), only a rule naming the very address opens it
   (``several_places``).

Name rules, as a resolver operator would set them: an ASCII label holds letters, digits, ``-`` and
``_`` in any position. DNS itself allows any octet, names such as ``_dmarc.example.com`` or
``-foo.example.net`` exist in the wild, and refusing them would break clients without protecting
anything; hyphen placement is IDNA's business, so it is enforced only where IDNA applies. Anything
else (spaces, ``*``, ``/``, ``:``, control characters) is refused: no client means such a host, and
refusing it keeps globs, logs and audit records unambiguous. ASCII labels that start with ``xn--``
pass through untouched: they are what goes on the wire and what policies are compared with, and
decoding them would only add a way to fail. Non-ASCII labels get IDNA 2008's full checks (hyphens,
bidi, joiners, code points) through ``idna.alabel``.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import string
from bisect import bisect_right
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeAlias
from urllib.parse import urlsplit

import idna

from guardd.errors import InvalidHostError

__all__ = [
    "ADDRESS_CLASSES", "METADATA_ADDRESSES", "METADATA_NAMES", "AddrClass", "Host", "IPAddress",
    "classify", "classify_name", "embedded_ipv4", "is_metadata_address", "isatap_ipv4",
    "translate_through",
    "normalize_name", "parse_host", "parse_ip", "DEFAULT_PORTS", "Target", "parse_target",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddrClass(enum.Enum):
    """What an address is, for the built-in protections; values are what audit and explain show."""

    METADATA = "metadata"
    LOOPBACK = "loopback"
    UNSPECIFIED = "unspecified"
    LINK_LOCAL = "link-local"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"  # 255.255.255.255, the reserved 240/4 and IPv6's reserved space
    PRIVATE = "private"
    PUBLIC = "public"


@dataclass(frozen=True, slots=True)
class Host:
    """A parsed host: exactly one of ``name`` (normalized domain) and ``ip`` (IP literal) is set."""

    name: str | None
    ip: IPAddress | None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.ip is None):
            raise ValueError(f"a Host is a name or an IP address: name={self.name!r}, "
                             f"ip={self.ip!r}")

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.ip)


# --- data tables ---------------------------------------------------------------------------------

def _ip(text: str) -> IPAddress:
    """Shorthand that keeps the tables below one row a line."""
    return ipaddress.ip_address(text)


def _net(text: str) -> IPNetwork:
    """Shorthand that keeps the tables below one row a line."""
    return ipaddress.ip_network(text)


#: Cloud instance-metadata and platform endpoints: always denied unless a rule names the address.
#: Several sit outside link-local space (Azure's is even a public address), hence an exact table.
METADATA_ADDRESSES: Final[Mapping[IPAddress, str]] = MappingProxyType({
    _ip("169.254.169.254"): "instance metadata of AWS, GCP, Azure, Oracle, DigitalOcean, "
                            "Hetzner, OpenStack, Akamai/Linode and most others",
    _ip("169.254.170.2"): "AWS ECS task metadata and task-role credentials",
    _ip("169.254.170.23"): "AWS EKS Pod Identity agent (credentials)",
    _ip("168.63.129.16"): "Azure WireServer (platform agent, a public address)",
    _ip("100.100.100.200"): "Alibaba Cloud instance metadata",
    _ip("192.0.0.192"): "Oracle Cloud (Classic) instance metadata",
    _ip("169.254.42.42"): "Scaleway instance metadata",
    _ip("169.254.0.23"): "Tencent Cloud instance metadata (metadata.tencentyun.com)",
    _ip("fd00:ec2::254"): "AWS instance metadata over IPv6",
    _ip("fd00:ec2::23"): "AWS EKS Pod Identity agent over IPv6",
    _ip("fd20:ce::254"): "GCP instance metadata on IPv6-only VMs",
    _ip("fd00:c1::a9fe:a9fe"): "Oracle Cloud instance metadata over IPv6",
    _ip("fd00:100::100:200"): "Alibaba Cloud instance metadata over IPv6",
    _ip("fd00:42::42"): "Scaleway instance metadata over IPv6",
    _ip("fd00:a9fe:a9fe::1"): "Akamai/Linode instance metadata over IPv6",
    _ip("fe80::a9fe:a9fe"): "OpenStack instance metadata over IPv6",
})

#: Names of metadata endpoints (normalized). Only names that *are* metadata endpoints belong here:
#: a name that merely leads to a private service (kubernetes.default.svc) is the policy's call.
METADATA_NAMES: Final[Mapping[str, str]] = MappingProxyType({
    "metadata.google.internal": "GCP instance metadata",
    "metadata.goog": "GCP instance metadata (newer alias)",
    "metadata": "GCP instance metadata, short name completed by the VM's search domain",
    "instance-data": "AWS instance metadata, short name completed by the search domain",
    "instance-data.ec2.internal": "AWS instance metadata (us-east-1 internal DNS)",
    "metadata.tencentyun.com": "Tencent Cloud instance metadata",
    "metadata.platformequinix.com": "Equinix Metal instance metadata (a public address)",
    "metadata.packet.net": "Equinix Metal instance metadata (its former Packet name)",
})

def _outside(network: str, *taken: str) -> list[IPNetwork]:
    """`network` without the `taken` networks inside it (judged otherwise: an IPv4-carrying
    range is judged by the address it carries), as disjoint networks."""
    pieces = [_net(network)]
    for hole in map(_net, taken):
        pieces = [piece for whole in pieces
                  for piece in (whole.address_exclude(hole)  # type: ignore[arg-type]
                                if hole.subnet_of(whole) else [whole])]  # type: ignore[arg-type]
    return sorted(pieces)


#: guardd's address classes, one row per range; everything not listed is public, including the
#: documentation ranges 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32 and 3fff::/20
#: (never routed, so harmless, and tests use them as stand-ins for public hosts). Rows may nest
#: only when they agree on the class (the test suite checks this).
ADDRESS_CLASSES: Final[tuple[tuple[IPNetwork, AddrClass, str], ...]] = (
    (_net("127.0.0.0/8"), AddrClass.LOOPBACK, "IPv4 loopback (RFC 1122)"),
    (_net("::1/128"), AddrClass.LOOPBACK, "IPv6 loopback (RFC 4291)"),
    (_net("0.0.0.0/8"), AddrClass.UNSPECIFIED, "'this network' (RFC 1122); Linux sends 0.x home"),
    (_net("::/128"), AddrClass.UNSPECIFIED, "IPv6 unspecified address (RFC 4291)"),
    (_net("169.254.0.0/16"), AddrClass.LINK_LOCAL, "IPv4 link-local (RFC 3927), AWS DNS and NTP"),
    (_net("fe80::/10"), AddrClass.LINK_LOCAL, "IPv6 link-local (RFC 4291)"),
    (_net("224.0.0.0/4"), AddrClass.MULTICAST, "IPv4 multicast (RFC 5771)"),
    (_net("ff00::/8"), AddrClass.MULTICAST, "IPv6 multicast (RFC 4291)"),
    (_net("255.255.255.255/32"), AddrClass.BROADCAST, "limited broadcast (RFC 919)"),
    (_net("240.0.0.0/4"), AddrClass.BROADCAST, "reserved for future use (RFC 1112)"),
    (_net("10.0.0.0/8"), AddrClass.PRIVATE, "private (RFC 1918)"),
    (_net("172.16.0.0/12"), AddrClass.PRIVATE, "private (RFC 1918)"),
    (_net("192.168.0.0/16"), AddrClass.PRIVATE, "private (RFC 1918)"),
    (_net("100.64.0.0/10"), AddrClass.PRIVATE, "shared address space, CGNAT (RFC 6598)"),
    (_net("192.0.0.0/24"), AddrClass.PRIVATE, "IETF protocol assignments (RFC 6890)"),
    (_net("198.18.0.0/15"), AddrClass.PRIVATE, "benchmarking (RFC 2544)"),
    (_net("fc00::/7"), AddrClass.PRIVATE, "unique local addresses, ULA (RFC 4193)"),
    (_net("fec0::/10"), AddrClass.PRIVATE, "site-local, deprecated (RFC 3879), still routable"),
    (_net("100::/64"), AddrClass.PRIVATE, "discard-only (RFC 6666)"),
    (_net("100:0:0:1::/64"), AddrClass.PRIVATE, "dummy prefix (RFC 9780)"),
    (_net("2001:2::/48"), AddrClass.PRIVATE, "benchmarking (RFC 5180), as IPv4's 198.18/15"),
    # (the last attack of session 54: public, where IPv4's 192.0.0.0/24 is private)
    *((network, AddrClass.PRIVATE, "IETF protocol assignments (RFC 2928, RFC 6890), as IPv4's "
       "192.0.0.0/24") for network in _outside("2001::/23", "2001::/32", "2001:2::/48")),
    (_net("5f00::/16"), AddrClass.PRIVATE, "SRv6 segment identifiers (RFC 9602): a segment "
                                           "routing domain takes them to its own functions"),
    # (session 53's attack and its re-attack: IPv6 space outside global unicast was public,
    # 169.254.169.254 in an RFC 6052 /64 layout under 64:ff9b::/32 too, where a translator
    # set up so would send it)
    *((network, AddrClass.BROADCAST, "reserved by the IETF (IANA's IPv6 address space: only "
       "2000::/3 is global unicast), NAT64's unassigned space (RFC 6052, RFC 8215) in it")
      for network in _outside(
          "::/0", "2000::/3", "::/96", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96",
          "64:ff9b:1::/48", "100::/64", "100:0:0:1::/64", "5f00::/16", "fc00::/7",
          "fe80::/10", "fec0::/10", "ff00::/8")),
)

#: IPv6 ranges that carry an IPv4 address: (network, shift of the IPv4 bits, XOR mask, comment).
#: IPv4-compatible ::a.b.c.d (::/96) is handled in ``embedded_ipv4``: :: and ::1 are excluded;
#: so is NAT64's local-use 64:ff9b:1::/48 (RFC 8215), whose layout varies (``_local_nat64``).
_IPV4_EMBEDDINGS: Final[tuple[tuple[IPNetwork, int, int, str], ...]] = (
    (_net("::ffff:0:0/96"), 0, 0, "IPv4-mapped (RFC 4291)"),
    (_net("::ffff:0:0:0/96"), 0, 0, "IPv4-translated, SIIT (RFC 2765)"),
    (_net("64:ff9b::/96"), 0, 0, "NAT64 well-known prefix (RFC 6052)"),
    (_net("2002::/16"), 80, 0, "6to4 (RFC 3056): the IPv4 address follows the prefix"),
    (_net("2001::/32"), 0, 0xFFFFFFFF, "Teredo (RFC 4380): the client address, inverted, last"),
)

#: IPv4-compatible (RFC 4291 2.5.5.1, deprecated), as `_IPV4_EMBEDDINGS` has it.
_IPV4_COMPATIBLE: Final[tuple[tuple[IPNetwork, int, int, str], ...]] = (
    (_net("::/96"), 0, 0, "IPv4-compatible (RFC 4291): the last 32 bits"),)


# --- compiled lookups ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Ranges:
    """One IP version's class table as sorted, disjoint integer ranges, searched by bisection."""

    starts: tuple[int, ...]
    ends: tuple[int, ...]
    classes: tuple[AddrClass, ...]
    metadata: frozenset[int]

    @classmethod
    def compile(cls, version: int) -> _Ranges:
        rows = sorted(((int(net.network_address), int(net.broadcast_address), klass)
                       for net, klass, _ in ADDRESS_CLASSES if net.version == version),
                      key=lambda row: (row[0], -row[1]))
        kept: list[tuple[int, int, AddrClass]] = []
        for row in rows:
            if not kept or row[1] > kept[-1][1]:  # a nested row (255.255.255.255 in 240/4)
                kept.append(row)                  # adds nothing to a lookup
        metadata = frozenset(int(ip) for ip in METADATA_ADDRESSES if ip.version == version)
        return cls(starts=tuple(row[0] for row in kept), ends=tuple(row[1] for row in kept),
                   classes=tuple(row[2] for row in kept), metadata=metadata)

    def classify(self, number: int) -> AddrClass:
        """Metadata first (it sits inside other ranges), then the range holding the number."""
        if number in self.metadata:
            return AddrClass.METADATA
        index = bisect_right(self.starts, number) - 1
        if index >= 0 and number <= self.ends[index]:
            return self.classes[index]
        return AddrClass.PUBLIC


_V4: Final = _Ranges.compile(4)
_V6: Final = _Ranges.compile(6)
#: (prefix value, host bits, shift, xor): a row matches when ``n >> host_bits == prefix``.
_EMBEDDINGS: Final = tuple(
    (int(net.network_address) >> (128 - net.prefixlen), 128 - net.prefixlen, shift, xor)
    for net, shift, xor, _ in _IPV4_EMBEDDINGS)

_OCT: Final = frozenset(string.octdigits)
_HEX: Final = frozenset(string.hexdigits)
_HEX_PREFIXES: Final = ("0x", "0X")
_NAME_CHARS: Final = frozenset(string.ascii_lowercase + string.digits + "-_.")
_MAX_NAME, _MAX_LABEL = 253, 63


# --- parsing -------------------------------------------------------------------------------------

def parse_host(text: str) -> Host:
    """Parse a host as a client or a policy gave it: an IP literal in any encoding, or a name."""
    ip = parse_ip(text)
    return Host(None, ip) if ip is not None else Host(normalize_name(text), None)


def parse_ip(text: str) -> IPAddress | None:
    """The address ``text`` encodes, or None when it is a name; raises when it is neither.

    Raises InvalidHostError for a malformed IPv6 literal, a zone id, or a host whose last label is
    numeric but which is not a valid IPv4 address (the WHATWG rule: such a host is never a name).
    """
    host = text if text.isascii() else _uts46_map(text)
    if ":" in host or host[:1] == "[":
        return _parse_ipv6(host, text)
    if host[-1:] == ".":
        host = host[:-1]
    if not _ends_in_number(host.rpartition(".")[2]):
        return None
    return _parse_ipv4(host, text)


def normalize_name(text: str) -> str:
    """The canonical form of a domain name: lower-case ASCII (A-labels), no trailing dot.

    Idempotent. Raises InvalidHostError, quoting the input and saying what is wrong, for an empty
    name or label, a character other than letters, digits, ``-``, ``_`` and dots, an over-long
    label or name, an invalid internationalized label, or a last label that is a number (such a
    host is an IP address or invalid, see ``parse_ip``).
    """
    name = text.lower() if text.isascii() else _idna_to_ascii(text)
    if name[-1:] == ".":
        name = name[:-1]
    if not name:
        raise InvalidHostError(f"invalid name {_quote(text)}: it is empty")
    if not _NAME_CHARS.issuperset(name):
        bad = next(char for char in name if char not in _NAME_CHARS)
        raise InvalidHostError(f"invalid name {_quote(text)}: character {bad!r} is not allowed; "
                               f"a name holds only letters, digits, '-', '_' and dots")
    if len(name) > _MAX_NAME:
        raise InvalidHostError(f"invalid name {_quote(text)}: it is {len(name)} characters long, "
                               f"at most {_MAX_NAME} are allowed")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise InvalidHostError(f"invalid name {_quote(text)}: it has an empty label "
                                   f"(a leading dot or two dots in a row)")
        if len(label) > _MAX_LABEL:
            raise InvalidHostError(f"invalid name {_quote(text)}: label {label[:20]!r}... is "
                                   f"{len(label)} characters long, at most {_MAX_LABEL} allowed")
    if _ends_in_number(labels[-1]):
        raise InvalidHostError(f"invalid name {_quote(text)}: its last label {labels[-1]!r} is a "
                               f"number, so it is an IP address or invalid, never a name")
    return name


#: Stands for a name a server might act on but the sniffer cannot pin down (`stream.sniff`'s
#: docstring). No domain glob matches it but `*`: a glob may hold only letters, digits, '-',
#: '_', '.' and '*' (policy/loader.py), and this holds none of them but one '?'. Not a host
#: name (`not_a_host_name`), yet a policy judges a request for it by its rules.
UNVERIFIABLE: Final = "<?>"


#: What a DNS name guardd judges may hold: a host name's characters, and the '/' of RFC 2317's
#: classless reverse delegation (`5.0/25.2.0.192.in-addr.arpa`, which a PTR lookup's alias
#: leads to). No proxy target may hold one (`normalize_name`), nor a domain glob.
_DNS_NAME_CHARS: Final = _NAME_CHARS | {"/"}


def not_a_host_name(name: str) -> bool:
    """Is `name` (a DNS name in presentation form, lower-cased) no host name: escaped bytes, a
    character no host name holds, or a last label that makes it an IP address (WHATWG)? The
    one test every listener and the policy share. (Attack pass, 2026-12-06: dig prints a
    comma as it is, and the records list a connect's names comma-separated, so `audit learn`
    read `evil.com,x.allowed.test` as two names and proposed allowing evil.com.)"""
    return not _DNS_NAME_CHARS.issuperset(name) or \
        _ends_in_number(name[name.rfind(".") + 1:])


def _ends_in_number(label: str) -> bool:
    """WHATWG's test on the last label: ASCII digits, or ``0x`` and hex digits, mean an address."""
    return (label.isdigit() and label.isascii()) or (
        label[:2] in _HEX_PREFIXES and _HEX.issuperset(label[2:]))


def _parse_ipv4(host: str, text: str) -> ipaddress.IPv4Address:
    """WHATWG IPv4 parsing of a host that ends in a number (its trailing dot already removed)."""
    *leading, last = host.split(".")
    if len(leading) > 3:
        raise _not_ipv4(text, f"it has {len(leading) + 1} parts and an address has at most 4")
    value = 0
    for part in leading:
        number = _ipv4_number(part, text)
        if number > 255:
            raise _not_ipv4(text, f"part {_quote(part)} is greater than 255")
        value = value << 8 | number
    number = _ipv4_number(last, text)
    free_bits = 8 * (4 - len(leading))  # the last part fills every byte the others left
    if number >> free_bits:
        raise _not_ipv4(text, f"its last part {_quote(last)} is greater than "
                              f"{(1 << free_bits) - 1}, the most {len(leading) + 1} part(s) allow")
    return ipaddress.IPv4Address(value << free_bits | number)


def _ipv4_number(part: str, text: str) -> int:
    """One part as WHATWG (and inet_aton) reads it: ``0x`` hex, leading-0 octal, else decimal."""
    if part.isdigit() and part.isascii() and (part[0] != "0" or part == "0"):  # the common case
        # int() refuses decimal strings over 4,300 digits; 11 (no leading 0) already exceed 2**32.
        return int(part[:11])
    if part[:2] in _HEX_PREFIXES:
        digits, radix, allowed, kind = part[2:], 16, _HEX, "a valid hex (0x) number"
    elif part[:1] == "0":
        digits, radix, allowed, kind = part[1:], 8, _OCT, "a valid octal (leading 0) number"
    else:
        raise _not_ipv4(text, f"part {_quote(part)} is not a number" if part else
                        "it has an empty part")
    if not allowed.issuperset(digits):
        raise _not_ipv4(text, f"part {_quote(part)} is not {kind}")
    return int(digits, radix) if digits else 0  # a bare "0x" is zero


def _not_ipv4(text: str, why: str) -> InvalidHostError:
    """One wording for every IPv4 failure, so users learn the rule, not just the symptom."""
    return InvalidHostError(f"invalid host {_quote(text)}: its last label is a number, so it must "
                            f"be an IPv4 address, but {why}")


def _parse_ipv6(host: str, text: str) -> ipaddress.IPv6Address:
    """An IPv6 literal, bare or in brackets; zone ids are refused."""
    inner = host[1:-1] if host[:1] == "[" and host[-1:] == "]" else host
    if "%" in inner:
        raise InvalidHostError(f"invalid host {_quote(text)}: IPv6 zone ids ('%eth0') are not "
                               f"allowed, a zone names an interface of this machine, not a "
                               f"destination")
    try:
        return ipaddress.IPv6Address(inner)
    except ValueError as exc:
        raise InvalidHostError(f"invalid host {_quote(text)}: a host with ':' or '[' must be an "
                               f"IPv6 address ({exc}); give a port separately") from None


def _uts46_map(text: str) -> str:
    """UTS 46 mapping (case, width, compatibility forms), as a browser applies it to a host."""
    try:
        return idna.uts46_remap(text, std3_rules=False, transitional=False)
    except UnicodeError as exc:  # idna.IDNAError is a UnicodeError
        raise InvalidHostError(f"invalid host {_quote(text)}: {exc}") from None


def _idna_to_ascii(text: str) -> str:
    """UTS 46 map, then A-labels for non-ASCII labels; ASCII labels get the common checks."""
    mapped = _uts46_map(text)
    try:
        return ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                        for label in mapped.split("."))
    except UnicodeError as exc:
        raise InvalidHostError(f"invalid internationalized name {_quote(text)}: {exc}") from None


def transitional_spelling(name: str) -> str | None:
    """The name (normalized, A-labels) as a client of IDNA 2003 asks it (UTS 46 transitional:
    Python's `idna` codec, Java's IDN, older libidn map `ß` to `ss`, `ς` to `σ`, and drop ZWJ
    and ZWNJ), where that is another name than guardd's (non-transitional, as browsers); None
    when it is the same, or cannot be read."""
    try:
        mapped = ".".join(idna.ulabel(label) if label.startswith("xn--") else label
                          for label in name.split(".")).translate(_DEVIATIONS)
        other = ".".join(label if label.isascii() else idna.alabel(label).decode("ascii")
                         for label in mapped.split("."))
    except UnicodeError:
        return None
    return other if other != name else None


#: UTS 46's deviations, which transitional processing maps (the `idna` package no longer
#: does: its `transitional` flag has no effect since 3.11).
_DEVIATIONS = str.maketrans({"\u00df": "ss", "\u03c2": "\u03c3", "\u200c": None,
                             "\u200d": None})


def _quote(text: str) -> str:
    """Input as messages quote it: repr, cut short so a hostile megabyte stays out of the logs."""
    return repr(text) if len(text) <= 80 else f"{text[:60]!r}... ({len(text)} characters)"


# --- classification ------------------------------------------------------------------------------

#: The client every loopback source address counts as (`counted_as`).
LOOPBACK_CLIENT = "127.0.0.1"
#: Addresses of one agent (`count_as_one`): each counts as the first of its group.
_ONE_AGENT: dict[str, str] = {}
#: Networks of one agent (`count_as_one`), each with the address its group counts as.
_AGENT_NETWORKS: list[tuple[IPNetwork, str]] = []
#: Whether an address is one of guardd's own host's (`count_host_as_loopback`): [] until set.
_ON_HOST: list[Callable[[str], bool]] = []


def count_as_one(groups: Iterable[Sequence[str]]) -> None:
    """From now on, count each group of addresses and networks (`sameClient`: one agent's,
    such as a sandbox's IPv4 and IPv6 addresses, or the IPv6 /64 routed to it) as one client
    in `counted_as`, the first address of its first (attack pass: an agent with two addresses
    had every per-client limit twice; session 57's re-attack: one sending from 1,000 addresses
    of its /64 was 1,000 clients taking turns for upstream sockets). Set at the daemon's
    start."""
    _ONE_AGENT.clear()
    _AGENT_NETWORKS.clear()
    _in_agent_network.cache_clear()
    for group in groups:
        first = group[0].partition("/")[0]
        for item in group:
            if "/" in item:
                _AGENT_NETWORKS.append((ipaddress.ip_network(item), first))
                continue
            _ONE_AGENT[item] = first
            if ":" not in item:  # (as a dual-stack socket sees it)
                _ONE_AGENT["::ffff:" + item] = first


def count_host_as_loopback(on_host: Callable[[str], bool] | None) -> None:
    """From now on, count every address `on_host` holds (guardd's own host's: `HostAddresses`)
    as loopback in `counted_as`; None: none. Set at the daemon's start (and for its lookup
    alone by `guardd explain`)."""
    _ON_HOST[:] = [] if on_host is None else [on_host]


def counted_as(client: str) -> str:
    """Whose limits, budgets and caps `client` (a source address, or a login's account, which
    has a space) spends, and so which principal it is: its own, but one for every loopback
    address: any process on the host may bind any of 127.0.0.0/8 (and ::1), and a client per
    address would multiply every per-client limit by millions (attack pass: a new source, a new
    rate limit); the same for every other address of guardd's host (`count_host_as_loopback`):
    any process there may bind those too (a Docker bridge's, an AnyIP route's), and one of a
    principal's `clients` made a process on the host that principal; and one for each group of
    addresses `count_as_one` was given."""
    if " " in client:
        return client
    if _loopback(client) or _on_host_beside_loopback(client):
        return LOOPBACK_CLIENT
    return agent_of(client)


def _loopback(client: str) -> bool:
    return client.startswith(("127.", "::ffff:127.")) or client == "::1"


def on_host(client: str) -> bool:
    """Whether the source address `client` is one of guardd's own host's other than loopback
    (`count_host_as_loopback`; an IPv4 one as a dual-stack socket sees it too). Never an IPv6
    link-local one: the host's fe80:: address is on every link, and the kernel answers a
    connection from it on the link it came in by (attack pass: an agent on another link that
    took it completed its TCP handshake, and was loopback)."""
    return not _loopback(client) and _on_host_beside_loopback(client)


def forgeable_on_host(client: str) -> bool:
    """Whether the source address `client` of a datagram is an IPv6 address of guardd's host
    other than loopback (`on_host`): Linux checks no IPv6 source, and any process may send
    from any IPv6 address (IPV6_FREEBIND, no privilege), so over UDP it proves nothing (attack
    pass, 2026-12-06: an agent on a link sent a query from the host's address, and it was
    loopback's, its policy and limits). An IPv4 one the kernel drops when it comes from
    outside; over TCP the handshake proves it."""
    return _over_ipv6(client) and on_host(client)


def _over_ipv6(client: str) -> bool:
    """Whether the source address `client` came over IPv6: not IPv4 as a dual-stack socket
    shows it, `::ffff:a.b.c.d`, dotted (re-attack of attack pass 52: `::ffff:0:a63:5`, SIIT's
    form, is an IPv6 address any process may bind, and passed for IPv4 by its prefix)."""
    return ":" in client and not (client.startswith("::ffff:") and "." in client)


def forged_on_loopback(client: str) -> bool:
    """Whether the source address `client` of a datagram on a socket bound to loopback is
    forged: only guardd's own host reaches such a socket (Linux drops a packet for a loopback
    address that comes in on any other interface), so an IPv6 source that is neither
    loopback's nor the host's (`on_host`) is one a process on the host chose (IPV6_FREEBIND,
    no privilege; attack pass 52: each was a client of its own, with fresh budgets, or
    another principal). An IPv4 one the kernel would not have sent."""
    return _over_ipv6(client) and not (_loopback(client) or on_host(client))


def forged_source(source: str, local: bool) -> bool:
    """Whether a datagram's `source` proves nothing: on a socket bound to loopback (`local`),
    an IPv6 address none of the host's; on any other, an IPv6 address of the host."""
    return forged_on_loopback(source) if local else forgeable_on_host(source)


def _on_host_beside_loopback(client: str) -> bool:
    """`on_host` of a source already known not to be loopback (`counted_as`: asked once)."""
    address = client.partition("%")[0]
    if not _ON_HOST or address.startswith("fe") and _link_local(address):
        return False
    if address.startswith("::ffff:") and "." in address:
        address = address[7:]
    return _ON_HOST[0](address)


def _link_local(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_link_local
    except ValueError:
        return False


def agent_of(client: str) -> str:
    """The address that stands for `client`'s agent: the first of its `count_as_one` group, or
    itself (an agent's IPv6 connect by address is judged by the names it resolved over IPv4)."""
    agent = _ONE_AGENT.get(client)
    if agent is not None:
        return agent
    return _in_agent_network(client) if _AGENT_NETWORKS else client


@functools.lru_cache(maxsize=4096)
def _in_agent_network(client: str) -> str:
    """The address that stands for the `count_as_one` network holding `client`, else `client`
    (kept for the clients seen lately: a parse and a scan, for every connect and query)."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:  # (a link-local address with its zone: no agent's network holds one)
        return client
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return next((first for network, first in _AGENT_NETWORKS
                 if network.version == ip.version and ip in network), client)


def classify(ip: IPAddress) -> AddrClass:
    """The class of an address; an IPv6 address that embeds an IPv4 one is judged by the latter
    (an ISATAP one by the stricter reading: `isatap_ipv4`)."""
    table, number = _effective(ip)
    klass = table.classify(number)
    isatap = isatap_ipv4(ip)  # (under any prefix, 6to4's too)
    if isatap is not None:
        return min(klass, _V4.classify(int(isatap)), key=_STRICTNESS.__getitem__)
    return klass


def is_metadata_address(ip: IPAddress) -> bool:
    """Whether the address (after unwrapping an embedded IPv4) is exactly a metadata endpoint."""
    return classify(ip) is AddrClass.METADATA


#: An ISATAP interface identifier (RFC 5214 6.1): 0000:5efe or 0200:5efe (the u bit), read as
#: Linux's sit driver reads it, the u bit ignored.
_ISATAP: Final = 0x02005EFE


def isatap_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an ISATAP identifier carries, under any /64 prefix (None for an
    address without one). A host with an ISATAP tunnel sends the packets there, one without
    to the IPv6 address itself: guardd cannot know which, so `classify` takes the stricter of
    the two (attack pass: `2001:db8::5efe:a9fe:a9fe` passed as public), and only a rule
    naming the exact address opens one (`several_places`; attack pass 18: a rule for a public
    IPv6 block vouched for every private IPv4 reading under it; attack pass 20: a deny for
    the IPv4 reading's network did not apply)."""
    if ip.version != 6:  # (every IPv4 address classified asks: no int of it)
        return None
    number = int(ip)
    if number >> 32 & 0xFFFFFFFF | 0x02000000 != _ISATAP:
        return None
    return ipaddress.IPv4Address(number & 0xFFFFFFFF)


#: 64:ff9b:1::/48, as the top 48 bits of an address.
_LOCAL_NAT64: Final = int(ipaddress.IPv6Address("64:ff9b:1::")) >> 80
#: The rank of each class, most restrictive first (`_local_nat64` picks the first).
_STRICTNESS: Final = {klass: rank for rank, klass in enumerate(AddrClass)}


def _local_nat64(number: int) -> int:
    """The IPv4 address an address under 64:ff9b:1::/48 carries. That prefix is for local use
    (RFC 8215): a translator may take it at /48, /56, /64 or /96, and each layout (RFC 6052 2.2,
    the u octet at bits 64-71 skipped) reads other bits as the address. guardd cannot know which
    one is in use, so it takes the most restrictive reading (attack pass: read as /96 alone,
    64:ff9b:1:a9fe:a9:fe00:808:808 was 8.8.8.8, and 169.254.169.254 to a /48 translator).
    The shorter layouts count whatever the u octet holds (translators skip it unread: Jool
    does; a final attack pass hid 169.254.169.254 behind a u octet of 1); no reading in
    0.0.0.0/8 counts while another does: those are the zeros of another layout's address
    (64:ff9b:1::1.2.3.4 at /64; 192.0.2.1 at /48 read as /96), and no translator sends there.
    Of readings alike, the first in /96, /48, /56, /64 order is taken."""
    return min(_local_nat64_readings(number),
               key=lambda reading: _STRICTNESS[_V4.classify(reading)])


def _local_nat64_readings(number: int) -> list[int]:
    """Each layout's reading of a 64:ff9b:1::/48 address that counts (`_local_nat64`)."""
    readings = [_nat64_reading(number, length) for length in (96, 48, 56, 64)]
    return [reading for reading in readings if reading >> 24] or readings[:1]


def _nat64_reading(number: int, length: int) -> int:
    """The IPv4 address an IPv6 one (as its integer) carries under a NAT64 prefix of `length`
    bits, as RFC 6052 2.2 lays it out: right after the prefix, the u octet (bits 64-71)
    skipped."""
    if length >= 64:  # (/64: after the u octet; /96: the last 32 bits)
        return number >> (24 if length == 64 else 0) & 0xFFFFFFFF
    before = 64 - length  # (bits of it before the u octet)
    return (number >> 64 & (1 << before) - 1) << (32 - before) | \
        number >> (24 + before) & (1 << (32 - before)) - 1


#: NAT64 network-specific prefixes (`nat64Prefixes`, RFC 6052 2.2: an operator's own), as
#: (the prefix's bits, their count): an address under one is the IPv4 address it carries.
_NAT64_PREFIXES: list[tuple[int, int]] = []


def carrier_of(network: IPNetwork) -> str | None:
    """What a range of `network` already carries an IPv4 address as (IPv4-mapped, SIIT, NAT64's
    well-known or local-use prefix, 6to4, Teredo, IPv4-compatible), if it overlaps one: no
    `nat64Prefixes` prefix may read it otherwise (review: `2001::/32` read Teredo's addresses
    as a translator's, and a private client address as a public one)."""
    return next((comment for outer, _, _, comment in (
        *_IPV4_EMBEDDINGS, *_IPV4_COMPATIBLE,
        (_net("64:ff9b:1::/48"), 0, 0, "NAT64 local-use prefix (RFC 8215)"))
        if outer.version == network.version and outer.overlaps(network)), None)


def translate_through(prefixes: Iterable[IPNetwork]) -> None:
    """From now on, read an address under each of `prefixes` (`nat64Prefixes`: the prefixes a
    NAT64 translator of the agent's network serves, besides the well-known ones) as the IPv4
    address it carries, judged as that one (session 61's attack: under tayga's
    2001:db8:64::/96, `[2001:db8:64::a00:5]` was a public address, and reached 10.0.0.5). Set
    at the daemon's start."""
    _NAT64_PREFIXES[:] = [(int(prefix.network_address) >> (128 - prefix.prefixlen),
                           prefix.prefixlen) for prefix in prefixes]


def several_places(ip: IPAddress) -> tuple[str, ...]:
    """Where packets to `ip` may go, when that is more than one place (empty when it is one):
    each counting layout's reading of a local NAT64 address (`_local_nat64`: guardd cannot
    know the translator's), an ISATAP identifier's IPv4 address beside the address itself, or
    the one it embeds (`isatap_ipv4`: the host may have an ISATAP tunnel or not), and an
    IPv4-compatible, SIIT, 6to4 or Teredo address's IPv4 address beside the address itself
    (`_tunnelled`).
    A rule that names one of them says nothing of the others (attack pass 20)."""
    if ip.version != 6:
        return ()
    number = int(ip)
    local_nat64 = number >> 80 == _LOCAL_NAT64
    isatap = isatap_ipv4(ip)
    tunnelled = _tunnelled(number)
    if not local_nat64 and isatap is None and not tunnelled:
        return ()  # (nearly every address: one place, and no text made to say so)
    found = [str(ipaddress.IPv4Address(reading)) for reading in _local_nat64_readings(number)] \
        if local_nat64 else [str(effective_address(ip))]
    if isatap is not None:
        found.append(str(isatap))
    if tunnelled:
        found.append(str(ip))
    places = tuple(dict.fromkeys(found))
    return places if len(places) > 1 else ()


def _tunnelled(number: int) -> bool:
    """Whether an IPv6 address (as its integer) carries an IPv4 address a.b.c.d and may go as
    itself, elsewhere: IPv4-compatible (`::a.b.c.d`, but :: and ::1) and SIIT's
    (`::ffff:0:a.b.c.d`) reach a.b.c.d through a tunnel or translator set up for them, and
    without one go out as IPv6, wherever the host routes them (session 54's last attack: a
    rule for 8.8.8.0/24 opened `[::808:808]` to a host of the namespace's own); 6to4's reaches
    any host of the site whose router a.b.c.d is (RFC 3056), Teredo's a client behind the NAT
    at a.b.c.d (RFC 4380), each an IPv6 host of its own where the host routes them so (session
    55's attack). Not NAT64's well-known prefix, the translator's, where DNS64 answers, unless
    a.b.c.d is not global: no translator delivers that (RFC 6052 3.1; session 55's re-attack);
    nor IPv4-mapped, which Linux connects to over IPv4."""
    return number >> 32 == 0xFFFF0000 or (number >> 32 == 0 and number > 1) or \
        number >> 112 == 0x2002 or number >> 96 == 0x20010000 or (
            number >> 32 == _NAT64_WELL_KNOWN and
            _V4.classify(number & 0xFFFFFFFF) is not AddrClass.PUBLIC)


#: 64:ff9b::/96, as the top 96 bits of an address.
_NAT64_WELL_KNOWN: Final = int(ipaddress.IPv6Address("64:ff9b::")) >> 32


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, compatible, SIIT, NAT64's prefixes,
    `nat64Prefixes` too, 6to4, Teredo)."""
    number = int(ip)
    if number >> 32 == 0:  # IPv4-compatible ::a.b.c.d, except :: and ::1, which are IPv6's own
        return ipaddress.IPv4Address(number) if number > 1 else None
    if number >> 80 == _LOCAL_NAT64:
        return ipaddress.IPv4Address(_local_nat64(number))
    for prefix, length in _NAT64_PREFIXES:
        if number >> (128 - length) == prefix:
            return ipaddress.IPv4Address(_nat64_reading(number, length))
    for prefix, host_bits, shift, xor in _EMBEDDINGS:
        if number >> host_bits == prefix:
            return ipaddress.IPv4Address((number >> shift & 0xFFFFFFFF) ^ xor)
    return None


def ipv4_readings(networks: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """`networks`, and the IPv4 network each IPv6 one stands for inside a prefix that carries
    one IPv4 address (`_IPV4_EMBEDDINGS`: IPv4-mapped, SIIT and NAT64's well-known as their
    last 32 bits, 6to4 after its prefix, Teredo's client inverted, last; and IPv4-compatible
    `::a.b.c.d`), as much of IPv4 as its prefix names: what a deny written in such a form must
    deny too (attack pass, 2026-12-06: a deny of `::ffff:127.0.0.2/128` let a connect to
    127.0.0.2 through; the last note: so did one of `2002:a00:5::/48`, 6to4's 10.0.0.5). Not
    read: forms with several readings or none (ISATAP, NAT64's local-use prefix)."""
    found: list[IPNetwork] = []
    for network in networks:
        for outer, shift, xor, _ in _IPV4_EMBEDDINGS + _IPV4_COMPATIBLE:
            # (the IPv4 bits start where the embedding's prefix ends, or 32 bits before `shift`)
            start = 128 - 32 - shift
            if network.version == 6 and network.prefixlen > max(outer.prefixlen, start) and \
                    network.subnet_of(outer):  # type: ignore[arg-type]
                bits = (int(network.network_address) >> shift & 0xFFFFFFFF) ^ xor
                found.append(ipaddress.ip_network(
                    (bits, min(network.prefixlen - start, 32)), strict=False))
    return networks + tuple(reading for reading in dict.fromkeys(found) if reading not in networks)


def classify_name(name: str) -> AddrClass | None:
    """METADATA for a metadata name, LOOPBACK for ``localhost`` and ``*.localhost`` (RFC 6761).

    ``name`` must be normalized (``normalize_name``, ``Host.name``); other names give None.
    """
    if name in METADATA_NAMES:
        return AddrClass.METADATA
    # Every decision asks: the `in` operator, far cheaper than a method call, rules out nearly
    # every name before `endswith` runs.
    if "localhost" in name and (name == "localhost" or name.endswith(".localhost")):
        return AddrClass.LOOPBACK
    return None


def effective_address(ip: IPAddress) -> IPAddress:
    """The address packets to `ip` really go to: the IPv4 address an IPv6 one embeds, else
    `ip` itself."""
    return (embedded_ipv4(ip) if isinstance(ip, ipaddress.IPv6Address) else None) or ip


def _effective(ip: IPAddress) -> tuple[_Ranges, int]:
    """The class table and integer of the address packets really go to (an embedded IPv4)."""
    ip = effective_address(ip)
    return (_V4 if ip.version == 4 else _V6), int(ip)


def split_host_port(text: str, *, allow_zero: bool = False) -> tuple[str, int | None]:
    """Split `host`, `host:port`, `[v6]`, `[v6]:port` or a bare IPv6 address; the port is
    checked (1-65535, or 0 for a listener that lets the kernel pick), the host is not.
    InvalidHostError says what is wrong."""
    spec = text.strip()
    if spec.startswith("["):
        host, bracket, rest = spec[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise InvalidHostError(f"{_quote(text)}: write an IPv6 address with a port as "
                                   f"[ADDRESS]:PORT")
        port_text = rest[1:] if rest else None
    elif spec.count(":") == 1:
        host, _, port_text = spec.partition(":")
    else:
        host, port_text = spec, None
    if port_text is None:
        return host, None
    lowest = 0 if allow_zero else 1
    if not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5
            and lowest <= int(port_text) <= 65535):
        raise InvalidHostError(f"{_quote(text)}: port {port_text!r} is not a number from "
                               f"{lowest} to 65535")
    return host, int(port_text)


#: The port a URL's scheme implies when it names none.
DEFAULT_PORTS: Final[Mapping[str, int]] = MappingProxyType(
    {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21, "ssh": 22})


@dataclass(frozen=True, slots=True)
class Target:
    """A destination as a user typed it: `name`, `ip`, `host:port`, `[v6]:port` or a URL."""

    host: Host
    port: int | None
    text: str


def parse_target(text: str) -> Target:
    """Split a user-typed destination (`guardd explain`, a policy's `tests:`) into host and
    port; InvalidHostError when unusable."""
    raw = text.strip()
    port: int | None = None
    if "://" in raw:
        try:
            parts = urlsplit(raw)
        except ValueError as exc:  # "Invalid IPv6 URL"
            raise InvalidHostError(f"{_quote(raw)}: {exc}") from None
        netloc = parts.netloc.rpartition("@")[2]
        host_text, port = split_host_port(netloc)
        if port is None:
            port = DEFAULT_PORTS.get(parts.scheme.lower())
    else:
        host_text, port = split_host_port(raw)
    return Target(parse_host(host_text), port, raw)
