"""DNS wire format, sans-I/O: bytes in, values or bytes out.

Theory of operation
-------------------
guardd is the agent's resolver, so every lookup crosses this module twice: the query on the way in
and the answer on the way out. The common paths are kept short and hand-written:

* `parse_query` reads the 12-byte header with one `struct` call, walks the question's labels with
  slicing, and looks for an EDNS OPT record only when the additional count says one may be there.
  Anything it does not like raises `DNSWireError` whose `rcode_hint` says what to send back:
  FORMERR or NOTIMP (build it with `formerr_from_bytes`), or `DROP` (-1) for packets that must not
  be answered at all (shorter than a header, or themselves responses: answering an answer is how
  two servers end up ping-ponging forever).
* `error_response` (NXDOMAIN, REFUSED, SERVFAIL, NODATA as NOERROR…) and `any_response` are built
  by concatenating a packed header, the question bytes exactly as the client sent them, and, iff
  the client spoke EDNS, our OPT record (optionally carrying an RFC 8914 Extended DNS Error).
* `build_query` writes the only queries guardd sends upstream: a header with RD, the question,
  and iff asked an OPT record with our UDP size and the DO bit, nothing else. A client's own
  packet is never forwarded: its other records, EDNS options, flags and trailing bytes would be a
  channel to whoever runs or watches the upstream. `as_asked` turns the answer to that query back
  into the answer to the client's: its RD and CD flags and its question as sent (0x20 case).
* `parse_response` walks an upstream answer once, recording for every resource record where its
  TTL lives, so the cache can later patch TTLs in place instead of re-encoding, and decoding only
  what the guard vets: the names CNAME, DNAME, NS, MX, SRV, SVCB and HTTPS records point at, the
  addresses of A/AAAA records and of SVCB/HTTPS `ipv4hint`/`ipv6hint`, and the SOA minimum for
  negative caching. Each decoder checks that what it decodes fills the rdata exactly, so no record
  can mean one thing here and another to the client. An answer of more than
  `MAX_RESPONSE_RECORDS` records is refused from its header, before any of them is walked; one
  of more than `MAX_RESPONSE_HINTS` address hints, of a record of more than `MAX_SVC_PARAMS`
  SvcParams or of more than `MAX_RESPONSE_SVC_PARAMS` in all, or of names holding more than
  `_MAX_ANSWER_LABELS` labels (a suffix read before is free in the same name again) or
  `_MAX_ANSWER_ESCAPED` octets needing escapes in all, as they are read; so is a name that
  follows more than `_MAX_POINTERS` compression pointers, or is read through a record's fixed
  fields (which the cache rewrites).

`strip_records` (dropping answers the guard vetoed) rebuilds the message with the names it
reads written anew, because deleting bytes in place would break compression pointers that
point into the deleted records.

Names are text: lower-case ASCII, labels joined with ".", no trailing dot, "" for the root. DNS
labels may hold any byte, so a label byte that is not printable ASCII, or is one of the master-file
specials (``. \\ " ( ) ; @ $``), is escaped as dig prints it: ``\\.`` for specials, ``\\DDD``
(decimal) for the rest. The escaping is injective, so ``a\\.b.example`` (two labels) never
collides with ``a.b.example`` (three), and a backslash can never come out of policy normalization,
so an exact policy name never matches an escaped one; only a wildcard over a real parent does,
which is right, because the name really is under that parent.

Compression pointers are followed only backwards, each one strictly before the start of the run of
labels that led to it, and never into the header. That is how every real encoder writes them, and
it makes loops impossible: the run starts strictly decrease. A question that starts right after the
header therefore can never contain a pointer, which is what we want (no client sends one).
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import functools
import ipaddress
import re
import struct
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

from guardd.errors import DNSWireError

HEADER_SIZE = 12
#: The payload size we advertise and the most we send over UDP (DNS Flag Day 2020: no IP
#: fragmentation), whatever larger size a client advertises.
MAX_UDP_PAYLOAD = 1232
#: Plain DNS over UDP (RFC 1035 4.2.1), also the floor RFC 6891 puts under advertised sizes.
CLASSIC_UDP_PAYLOAD = 512
#: `DNSWireError.rcode_hint` for packets that get no answer at all.
DROP = -1
#: Most bytes a DNS message may hold (RFC 1035 4.2.2: TCP's 2-byte length prefix).
MAX_MESSAGE_BYTES = 65_535
#: Most records (OPT included) an upstream answer may have: real answers have a few dozen at most,
#: and this bounds what one answer costs to walk, vet, cache and remember.
MAX_RESPONSE_RECORDS = 256
#: Most SVCB/HTTPS address hints an upstream answer may carry, all its records together: guardd
#: vets every one (re-attack: 14,800 hints in four records cost 20 ms to vet, and 50 such answers
#: a second took the loop); a service names a few.
MAX_RESPONSE_HINTS = 256
#: Most SvcParams one SVCB/HTTPS record may carry: RFC 9460 defines eight keys (session 58's
#: attack: 15,000 empty ones, 60 KB, cost 45 ms each time their answer was re-encoded).
MAX_SVC_PARAMS = 64
#: And all the records of an upstream answer together (session 59's DNS attack: 239 HTTPS
#: records of 64 each cost 13 ms an answer); a service's answer has a few records of a few.
MAX_RESPONSE_SVC_PARAMS = 512
#: The only class guardd serves (RFC 1035 3.2.4).
CLASS_IN = 1

_QR, _OPCODE, _TC, _RD, _RA, _CD = 0x8000, 0x7800, 0x0200, 0x0100, 0x0080, 0x0010
#: Query flags a response carries over: opcode, recursion desired, checking disabled (RFC 4035).
_ECHOED = _OPCODE | _RD | _CD
_DO = 0x8000  # EDNS "DNSSEC OK", in the OPT record's TTL field (RFC 3225)
_MAX_NAME = 255  # octets in wire form, root label included (RFC 1035 2.3.4)
#: Compression pointers one name may follow: one a label at most (127 in a name of 255 octets;
#: unbound's MAX_COMPRESS_PTRS).
_MAX_POINTERS = 127
#: And all the names of an upstream answer together: eight a record (`MAX_RESPONSE_RECORDS`),
#: where an encoder's names follow one or two each.
_MAX_ANSWER_POINTERS = 2048
#: Labels all the names of an upstream answer hold together, as read (through pointers too):
#: 16 a record, where an answer's names hold a few each (session 59's DNS attack: 229 owners
#: of 120 labels each, within every other cap, cost 24-30 ms an answer to read, vet and
#: rebuild, in one piece; at this cap about 3 ms).
_MAX_ANSWER_LABELS = 4096
#: Octets of an upstream answer's names that need escapes in their text (bytes outside
#: letters, digits and a few signs), all of them together: honest names need none (the review
#: of session 59's caps: 759 names of 255 such octets cost 14-16 ms an answer, each byte
#: escaped apart).
_MAX_ANSWER_ESCAPED = 2048
_EDE_OPTION = 15  # RFC 8914
#: Longest EDE text: with the longest question and our OPT, the answer still fits in 512 bytes.
_EDE_TEXT_MAX = 200

_HEADER = struct.Struct("!6H")
_QUESTION_TAIL = struct.Struct("!2H")
_RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, rdlength
_OPT_FIXED = struct.Struct("!xHHIH")  # root owner name, then the fixed fields
_U32 = struct.Struct("!I")
_U16 = struct.Struct("!H")
_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Rcode(enum.IntEnum):
    """Response codes (RFC 1035, 6891); values above 15 need the OPT record's extended bits."""

    NOERROR = 0
    FORMERR = 1
    SERVFAIL = 2
    NXDOMAIN = 3
    NOTIMP = 4
    REFUSED = 5
    BADVERS = 16


class QType(enum.IntEnum):
    """Record types guardd names; any other 16-bit type still flows through as a plain int."""

    A = 1
    NS = 2
    CNAME = 5
    SOA = 6
    WKS = 11
    PTR = 12
    HINFO = 13
    MX = 15
    TXT = 16
    RP = 17
    AFSDB = 18
    RT = 21
    PX = 26
    AAAA = 28
    LOC = 29
    SRV = 33
    NAPTR = 35
    KX = 36
    A6 = 38
    DNAME = 39
    OPT = 41
    APL = 42
    DS = 43
    SSHFP = 44
    IPSECKEY = 45
    RRSIG = 46
    NSEC = 47
    DNSKEY = 48
    DHCID = 49
    NSEC3 = 50
    NSEC3PARAM = 51
    TLSA = 52
    SMIMEA = 53
    HIP = 55
    CDS = 59
    CDNSKEY = 60
    OPENPGPKEY = 61
    CSYNC = 62
    ZONEMD = 63
    SVCB = 64
    HTTPS = 65
    SPF = 99
    L32 = 105
    LP = 107
    EUI48 = 108
    EUI64 = 109
    IXFR = 251
    AXFR = 252
    ANY = 255
    URI = 256
    CAA = 257
    AMTRELAY = 260


#: Types whose rdata is data no client connects by (text, keys, hashes, DNSSEC proofs, a
#: location, a MAC address): passed as they come. With the types whose addresses and names
#: the guard reads (`_RDATA_DECODERS`), the only ones an answer keeps: any other may carry an
#: address or a name in a format guardd does not read (WKS, A6, APL, L32, IPSECKEY, AMTRELAY,
#: NSAP addresses; RP, MB, NSAP-PTR, HIP names; URI and NAPTR rewrite rules; a type not yet
#: defined), and is removed (attack pass: 169.254.169.254 went out in a WKS record).
_PLAIN_DATA = frozenset({QType.HINFO, QType.TXT, QType.LOC, QType.DS, QType.SSHFP, QType.RRSIG,
                         QType.NSEC, QType.DNSKEY, QType.DHCID, QType.NSEC3, QType.NSEC3PARAM,
                         QType.TLSA, QType.SMIMEA, QType.CDS, QType.CDNSKEY, QType.OPENPGPKEY,
                         QType.CSYNC, QType.ZONEMD, QType.SPF, QType.EUI48, QType.EUI64,
                         QType.CAA})


#: Plain ints for the hot paths: each `QType.X` lookup goes through the enum metaclass (~60 ns).
_OPT = int(QType.OPT)
#: RFC 8482 answer around its class: owner = pointer to the question name, type HINFO, TTL 3600
#: (section 4.2 suggests about an hour), rdata CPU "RFC8482" and OS "".
_RFC8482_RDATA = b"\x07RFC8482\x00"
_ANY_ANSWER_HEAD = b"\xc0\x0c" + struct.pack("!H", QType.HINFO)
_ANY_ANSWER_TAIL = struct.pack("!IH", 3600, len(_RFC8482_RDATA)) + _RFC8482_RDATA


class Section(enum.IntEnum):
    """Where a resource record sits in a response."""

    ANSWER = 1
    AUTHORITY = 2
    ADDITIONAL = 3


# Extended DNS Error info-codes (RFC 8914 section 4) that guardd sends.
EDE_OTHER = 0
EDE_NOT_READY = 14  # no policy loaded yet
EDE_BLOCKED = 15  # denied by a policy rule
EDE_FILTERED = 17  # an upstream answer was vetoed (e.g. it pointed at a protected address)
EDE_PROHIBITED = 18  # this client is not allowed the query (e.g. rate limit)
EDE_NOT_SUPPORTED = 21  # zone transfers and other queries guardd does not forward
EDE_NO_REACHABLE_AUTHORITY = 22  # every upstream timed out
EDE_NETWORK_ERROR = 23  # upstream unreachable
EDE_INVALID_DATA = 24  # upstream answered garbage


_QTYPE_NAMES = {member.value: member.name for member in QType}


def rcode_name(rcode: int) -> str:
    """Mnemonic of a response code (``RCODEnn`` for one without a name)."""
    try:
        return Rcode(rcode).name
    except ValueError:
        return f"RCODE{rcode}"


def qtype_name(qtype: int) -> str:
    """Mnemonic for audit records; unknown types get RFC 3597's ``TYPEnnn`` so any int prints.
    (A dict, not `QType(qtype)`: this runs for every query, and an enum call is slow.)"""
    return _QTYPE_NAMES.get(qtype) or f"TYPE{qtype}"


@dataclass(frozen=True, slots=True)
class Edns:
    """What a client's OPT record told us (RFC 6891)."""

    udp_size: int
    do: bool
    version: int


@dataclass(frozen=True, slots=True)
class Query:
    """One parsed client query.

    `name` is normalized text (see the module docstring), `flags` the raw header flags, and
    `question` the question section exactly as sent, echoed in every answer.
    """

    id: int
    flags: int
    opcode: int
    name: str
    qtype: int
    qclass: int
    question: bytes
    edns: Edns | None

    @property
    def rd(self) -> bool:
        """Recursion desired; echoed into answers."""
        return bool(self.flags & _RD)

    @property
    def udp_limit(self) -> int:
        """Largest UDP answer this client may get before it must be truncated (TC) to force TCP."""
        if self.edns is None:
            return CLASSIC_UDP_PAYLOAD
        return min(max(self.edns.udp_size, CLASSIC_UDP_PAYLOAD), MAX_UDP_PAYLOAD)


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record of an upstream response, located so its TTL can be patched in place.

    Only what the guard vets is decoded: `target`, the name a CNAME, DNAME, NS, MX, SRV, SVCB or
    HTTPS record points at ("" for the root, which for SVCB/HTTPS means the owner itself);
    `address` for A/AAAA; `hints`, the `ipv4hint` and `ipv6hint` addresses of SVCB/HTTPS; and
    `soa_minimum` for SOA (negative caching).
    """

    section: Section
    name: str
    rtype: int
    rclass: int
    ttl: int
    ttl_offset: int
    rdata_offset: int
    rdlength: int
    target: str | None = None
    address: _Address | None = None
    soa_minimum: int | None = None
    hints: tuple[_Address, ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    """An upstream answer: header, question, and every record except the OPT pseudo-record.

    `records` holds the answer, authority and additional sections in wire order (the additional
    section too, because glue addresses deserve vetting as much as answers do); `rcode` includes
    the extended bits from OPT.
    """

    id: int
    flags: int
    rcode: int
    qname: str
    qtype: int
    qclass: int
    records: tuple[Record, ...]
    #: Where its last counted record ends: bytes past it are none of its records, never
    #: vetted, and never passed on (session 53's attack: a record past the counts went to the
    #: client as the upstream sent it).
    size: int

    @property
    def tc(self) -> bool:
        """Truncated: retry over TCP, never cache."""
        return bool(self.flags & _TC)

    @property
    def negative(self) -> bool:
        """NXDOMAIN, or NODATA (NOERROR without answers): cached per RFC 2308."""
        if self.rcode == Rcode.NXDOMAIN:
            return True
        return self.rcode == Rcode.NOERROR and not any(
            record.section is Section.ANSWER for record in self.records)


# --- names ---------------------------------------------------------------------------------------

_SPECIAL = b'."()\\;@$'
_SPECIAL_TEXT = _SPECIAL.decode()
#: Label byte -> its text as dig prints it, lower-cased.
_ESCAPES = tuple(
    "\\" + chr(byte) if byte in _SPECIAL
    else chr(byte).lower() if 0x21 <= byte <= 0x7E
    else f"\\{byte:03d}"
    for byte in range(256)
)
#: Fast path: lower-case ASCII letters, turn every byte that needs escaping into NUL ("." stays,
#: so labels that contain one are caught by counting dots instead).
_PLAIN = bytes(
    0x2E if byte == 0x2E else ord(_ESCAPES[byte]) if len(_ESCAPES[byte]) == 1 else 0
    for byte in range(256)
)


class _Walk:
    """What the names of one upstream answer may do: reach none of its records' fixed fields
    (`fields`: where each starts, in order), follow `_MAX_ANSWER_POINTERS` compression
    pointers, hold `_MAX_ANSWER_LABELS` labels (those walked, and a suffix read before in
    each name of its own) and `_MAX_ANSWER_ESCAPED` octets needing escapes in all
    (`pointers`, `labels`, `escaped`: how many are left); what its records may hold:
    `MAX_RESPONSE_SVC_PARAMS` SvcParams in all. The suffixes its pointers led to are read once
    (`suffixes`), and an honest answer's owners, a pointer to the question's name again and
    again, count it once (`names`; the review: an IPv6 reverse answer of 150 PTR records was
    refused), while names of their own that share a long suffix count it each (its
    re-attack: 759 of them cost 16-43 ms)."""

    __slots__ = ("fields", "pointers", "labels", "escaped", "svc_params", "suffixes", "names")

    def __init__(self, fields: Sequence[int]) -> None:
        self.fields = fields
        self.pointers = _MAX_ANSWER_POINTERS
        self.labels = _MAX_ANSWER_LABELS
        self.escaped = _MAX_ANSWER_ESCAPED
        self.svc_params = MAX_RESPONSE_SVC_PARAMS
        #: Each target's suffix: its labels' bytes, and the pointers and labels in it.
        self.suffixes: dict[int, tuple[bytes, int, int]] = {}
        #: The names read so far (their labels counted).
        self.names: set[bytes] = set()


def _read_name(data: bytes, pos: int, walk: _Walk | None = None) -> tuple[str, int]:
    """The text of the name at `pos` (`_name_labels`), and the offset just past it."""
    labels, end = _name_labels(data, pos, walk)
    text = _name_text(labels)
    if walk is not None and len(text) >= len(labels):  # (plain, it is one octet shorter)
        walk.escaped -= len(labels)
        if walk.escaped < 0:
            raise DNSWireError(f"the names hold more than {_MAX_ANSWER_ESCAPED} octets that "
                               "need escapes in all", Rcode.FORMERR)
    return text, end


def _name_labels(data: bytes, pos: int, walk: _Walk | None = None) -> tuple[bytes, int]:
    """Decode the name at `pos`: its labels, uncompressed, without the root label; and the
    offset just past it in the message.

    The name is gathered as runs of labels (the stretches between compression pointers) whose
    concatenation is the uncompressed wire form, and that is turned into text by `_name_text`.
    Raises IndexError when the message ends inside the name; callers turn that into
    DNSWireError. The 255-octet limit is checked once, at the end: each pointer must land before
    the run that led to it, so runs are disjoint and the walk is linear in the message size even
    for hostile input; and a name follows `_MAX_POINTERS` at most, so it is linear in the
    name's own limit too (session 58's attack: 255 owners of 30,000 pointers each, every one
    to the root, made an answer cost 0.3 s), and an answer's names `_MAX_ANSWER_POINTERS` in
    all (`walk`: 255 names of 126 pointers each still cost 23 ms). No stretch reached by a
    pointer may hold any of the fixed fields (type, class, TTL, length: ten bytes) of the
    answer's records (`walk.fields`): no encoder points there, and the cache rewrites TTLs in
    place (session 58's attack: a CNAME's target ran into a TTL, and read as a denied name
    once that changed).
    """
    runs: list[bytes] = []
    end = 0
    run_start = start = pos
    pointers = labels = remembered = 0  # (`remembered`: labels of a suffix read before)
    #: Each pointer's target, the run it starts, and the pointers and labels before it.
    targets: list[tuple[int, int, int, int]] = []
    while True:
        length = data[pos]
        while length and length < 0x40:
            pos += 1 + length
            length = data[pos]
            labels += 1
        runs.append(data[run_start:pos])
        if pointers and walk is not None and _in_fixed_fields(walk.fields, run_start,
                                                              pos + (2 if length else 1)):
            raise DNSWireError(f"name at offset {start} is read through a record's type, "
                               "class, TTL or length", Rcode.FORMERR)
        if not length:
            break
        if length < 0xC0:
            raise DNSWireError(f"unsupported label type {length >> 6:#x} at offset {pos}",
                               Rcode.FORMERR)
        target = (length & 0x3F) << 8 | data[pos + 1]
        if not HEADER_SIZE <= target < run_start:
            raise DNSWireError(f"compression pointer at offset {pos} to {target} does not "
                               "point back before its name", Rcode.FORMERR)
        # (a suffix read before: its labels, checked, and the pointers in it)
        known = walk.suffixes.get(target) if walk is not None else None
        pointers += 1 + (known[1] if known is not None else 0)
        if pointers > _MAX_POINTERS:
            raise DNSWireError(f"name at offset {start} follows more than {_MAX_POINTERS} "
                               "compression pointers", Rcode.FORMERR)
        end = end or pos + 2
        if walk is not None:
            walk.pointers -= 1
            if walk.pointers < 0:
                raise DNSWireError(f"the names follow more than {_MAX_ANSWER_POINTERS} "
                                   "compression pointers in all", Rcode.FORMERR)
            if known is not None:
                runs.append(known[0])
                labels += known[2]
                remembered = known[2]
                break
            targets.append((target, len(runs), pointers, labels))
        pos = run_start = target
    name = b"".join(runs)
    if walk is not None:
        for target, run, pointers_before, labels_before in targets:
            walk.suffixes[target] = (b"".join(runs[run:]), pointers - pointers_before,
                                     labels - labels_before)
        # The labels walked count, always (the last attack: a name written whole again and
        # again); a suffix read before counts again only in a name of its own (re-attack:
        # names sharing one long suffix), not in the same name again (the question's, say).
        if name in walk.names:
            labels -= remembered
        walk.names.add(name)
        walk.labels -= labels
        if walk.labels < 0:
            raise DNSWireError(f"the names hold more than {_MAX_ANSWER_LABELS} labels in all",
                               Rcode.FORMERR)
    if len(name) >= _MAX_NAME:  # the root label makes one more octet
        raise DNSWireError(f"name of {len(name) + 1} octets exceeds 255", Rcode.FORMERR)
    return name, end or pos + 1


def _in_fixed_fields(fields: Sequence[int], start: int, end: int) -> bool:
    """Whether bytes `start` to `end` hold any of the ten-byte fixed fields that start at
    `fields` (in order)."""
    before = bisect.bisect_left(fields, end) - 1
    return before >= 0 and fields[before] + _RR_FIXED.size > start


@functools.lru_cache(maxsize=4096)
def _name_text(labels: bytes) -> str:
    """Text of an uncompressed wire name without its root label (see the module docstring).

    Memoized because agents ask for the same few names over and over: with repeated names this
    makes `parse_query` ~35% cheaper, while a flood of unique names (DNS exfiltration, say) pays
    ~8% more for the misses.
    """
    parts = []
    pos = 0
    while pos < len(labels):
        length = labels[pos]
        pos += 1 + length
        parts.append(labels[pos - length:pos])
    text = b".".join(parts).translate(_PLAIN)
    if b"\0" in text or text.count(b".") != len(parts) - 1:
        return ".".join("".join(_ESCAPES[byte] for byte in part) for part in parts)
    return text.decode("ascii")


#: One piece of a name's text: `\\DDD`, `\\` and a special, a label's end, or plain text.
_NAME_PIECE = re.compile(r"\\([0-9]{3})|\\([^0-9])|(\.)|([^.\\]+)", re.ASCII | re.DOTALL)
#: What `_name_text` never writes unescaped: bytes outside 0x21-0x7E, specials, upper case.
_NOT_PLAIN = re.compile(r'[^\x21-\x7e]|["()\\;@$A-Z]')
_MAX_LABEL = 63


def _name_wire(name: str) -> bytes:
    """The wire form of a name's text (`_name_text`'s inverse), root label included: the very
    bytes that were read (split on every dot and sent as text, an escaped byte would go as its
    escape, and 63 escaped NULs as 252 bytes under a length byte that an upstream reads as a
    compression pointer). ValueError for text that is no name."""
    if "\\" not in name:  # (the usual: LDH text, each byte itself)
        if _NOT_PLAIN.search(name):
            raise ValueError(f"{name!r}: a character a name's text holds only escaped")
        labels = name.encode("ascii").split(b".") if name else []
    else:
        labels, label, pos = [], bytearray(), 0
        for piece in _NAME_PIECE.finditer(name):
            if piece.start() != pos:
                break
            pos = piece.end()
            code, special, dot, plain = piece.groups()
            if (plain and _NOT_PLAIN.search(plain)) or (special and special not in _SPECIAL_TEXT):
                raise ValueError(f"{name!r}: not a name's text at {piece.start()}")
            if dot:
                labels.append(bytes(label))
                label.clear()
            elif code is not None and int(code) > 255:
                raise ValueError(f"{name!r}: \\{code} is no byte")
            else:
                label += bytes([int(code)]) if code is not None else \
                    (special or plain).encode("ascii")
        if pos != len(name):
            raise ValueError(f"{name!r}: a backslash that escapes nothing at {pos}")
        labels.append(bytes(label))
    if any(not 0 < len(label) <= _MAX_LABEL for label in labels):
        raise ValueError(f"{name!r}: a label empty or over {_MAX_LABEL} bytes")
    encoded = b"".join(len(label).to_bytes(1, "big") + label for label in labels) + b"\0"
    if len(encoded) > _MAX_NAME:
        raise ValueError(f"{name!r}: over {_MAX_NAME} bytes")
    return encoded


def _skip_name(data: bytes, pos: int) -> int:
    """Offset just past the name at `pos`, without decoding it (IndexError if cut short)."""
    while length := data[pos]:
        if length >= 0xC0:
            return pos + 2
        if length >= 0x40:
            raise DNSWireError(f"unsupported label type {length >> 6:#x} at offset {pos}",
                               Rcode.FORMERR)
        pos += 1 + length
    return pos + 1


def _records(data: bytes, pos: int, count: int) -> list[tuple[int, int, int, int, int, int]]:
    """``(start, rtype, rclass, ttl, rdata_offset, rdlength)`` of `count` records from `pos`.

    A list, not a generator: for the one OPT record of a typical query that is measurably cheaper.
    """
    size = len(data)
    found = []
    for _ in range(count):
        start = pos
        pos = _skip_name(data, pos) + 10
        if pos > size:
            raise IndexError
        rtype, rclass, ttl, rdlength = _RR_FIXED.unpack_from(data, pos - 10)
        if pos + rdlength > size:
            raise DNSWireError(f"record at offset {start} overruns the message", Rcode.FORMERR)
        found.append((start, rtype, rclass, ttl, pos, rdlength))
        pos += rdlength
    return found


# --- queries -------------------------------------------------------------------------------------


def header_id(data: bytes) -> int | None:
    """The message id, or None when there is no complete header (such packets get no answer)."""
    return int.from_bytes(data[:2], "big") if len(data) >= HEADER_SIZE else None


def parse_query(data: bytes) -> Query:
    """Parse a client query, or raise DNSWireError saying how to answer (see module docstring).

    EDNS versions above 0 are parsed, not refused: the caller answers them with
    ``error_response(query, Rcode.BADVERS)`` (RFC 6891 6.1.3) when ``query.edns.version`` is set.
    Bytes after the last counted record are ignored.
    """
    if len(data) < HEADER_SIZE:
        raise DNSWireError(f"{len(data)}-byte packet is shorter than a DNS header", DROP)
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & _QR:
        raise DNSWireError("packet is a response, not a query", DROP)
    opcode = (flags & _OPCODE) >> 11
    if opcode:
        raise DNSWireError(f"opcode {opcode} is not QUERY", Rcode.NOTIMP)
    if qdcount != 1:
        raise DNSWireError(f"query has {qdcount} questions, expected exactly 1", Rcode.FORMERR)
    try:
        name, pos = _read_name(data, HEADER_SIZE)
        qtype, qclass = _QUESTION_TAIL.unpack_from(data, pos)
        end = pos + 4
        edns = _client_edns(data, end, ancount + nscount, arcount) if arcount else None
    except (IndexError, struct.error):
        raise DNSWireError("query ends inside its question or records", Rcode.FORMERR) from None
    return Query(ident, flags, opcode, name, qtype, qclass, data[HEADER_SIZE:end], edns)


def _client_edns(data: bytes, pos: int, skip: int, arcount: int) -> Edns | None:
    """Find the OPT record among the additional records (after skipping `skip` others)."""
    edns = None
    for start, rtype, rclass, ttl, _, _ in _records(data, pos, skip + arcount)[skip:]:
        if rtype != _OPT:
            continue
        if edns is not None:
            raise DNSWireError("query has more than one OPT record", Rcode.FORMERR)
        if data[start]:
            raise DNSWireError("OPT record owner is not the root", Rcode.FORMERR)
        edns = _edns(rclass, ttl)
    return edns


@functools.lru_cache(maxsize=64)
def _edns(udp_size: int, flags: int) -> Edns:
    """A shared `Edns` value: building a frozen dataclass per query costs ~0.3 µs, and clients
    send only a handful of distinct OPT headers.
    """
    return Edns(udp_size, bool(flags & _DO), flags >> 16 & 0xFF)


# --- answers we build ----------------------------------------------------------------------------


def error_response(query: Query, rcode: int, ede: tuple[int, str] | None = None) -> bytes:
    """An answer with no records: NXDOMAIN, REFUSED, SERVFAIL, or NODATA (``Rcode.NOERROR``).

    `ede` (info-code, text) becomes an Extended DNS Error option when the client sent EDNS;
    clients without EDNS cannot receive options, so it is silently left out for them.
    """
    return _reply(query, rcode, 0, b"", ede)


def any_response(query: Query) -> bytes:
    """RFC 8482's minimal answer to ANY (class IN): one synthesized HINFO "RFC8482" "" record.

    Hand-built (a pointer to the question name plus fixed bytes) because ANY is the
    amplification query of choice and should cost no more than an NXDOMAIN.
    """
    answer = _ANY_ANSWER_HEAD + query.qclass.to_bytes(2, "big") + _ANY_ANSWER_TAIL
    return _reply(query, 0, 1, answer, None)


def formerr_from_bytes(data: bytes, rcode: int = Rcode.FORMERR) -> bytes | None:
    """Header-only answer (no question) to a packet `parse_query` rejected; `rcode` < 16.

    Used with the rejection's `rcode_hint` (FORMERR or NOTIMP). None when there is nothing to
    answer: no complete header, or the packet is itself a response.
    """
    ident = header_id(data)
    if ident is None or data[2] & 0x80:
        return None
    flags = _QR | _RA | int.from_bytes(data[2:4], "big") & _ECHOED | rcode
    return _HEADER.pack(ident, flags, 0, 0, 0, 0)


def _reply(query: Query, rcode: int, ancount: int, answers: bytes,
           ede: tuple[int, str] | None) -> bytes:
    """Header + echoed question + `answers` + our OPT record iff the client sent one."""
    flags = _QR | _RA | query.flags & _ECHOED | rcode & 0xF
    edns = query.edns
    if edns is None:
        return _HEADER.pack(query.id, flags, 1, ancount, 0, 0) + query.question + answers
    options = b""
    if ede is not None:
        text = ede[1].encode()
        if len(text) > _EDE_TEXT_MAX:
            text = text[:_EDE_TEXT_MAX].decode(errors="ignore").encode()  # whole characters only
        options = struct.pack("!HHH", _EDE_OPTION, 2 + len(text), ede[0]) + text
    opt_ttl = (rcode >> 4) << 24 | (_DO if edns.do else 0)  # DO echoed per RFC 3225 3
    return (_HEADER.pack(query.id, flags, 1, ancount, 0, 1) + query.question + answers
            + _OPT_FIXED.pack(_OPT, MAX_UDP_PAYLOAD, opt_ttl, len(options)) + options)


# --- upstream responses --------------------------------------------------------------------------


@contextlib.contextmanager
def _upstream_errors(what: str) -> Iterator[None]:
    """Turn any parse failure in the block into DNSWireError hinting SERVFAIL: upstream's fault."""
    try:
        yield
    except (IndexError, struct.error):
        raise DNSWireError(f"{what}: message is truncated", Rcode.SERVFAIL) from None
    except DNSWireError as exc:
        raise DNSWireError(f"{what}: {exc}", Rcode.SERVFAIL) from None


_ADDRESS_TYPES: dict[int, tuple[int, type[_Address]]] = {QType.A: (4, ipaddress.IPv4Address), QType.AAAA: (16, ipaddress.IPv6Address)}
#: SvcParamKey -> (address size, type) for the address hints of SVCB/HTTPS (RFC 9460 14.3.2).
_HINT_TYPES: dict[int, tuple[int, type[_Address]]] = {4: (4, ipaddress.IPv4Address), 6: (16, ipaddress.IPv6Address)}
_SVC_PARAM = struct.Struct("!HH")
#: What a decoder fills in of a `Record`: target, address, soa_minimum, hints.
_Vetted = tuple[str | None, _Address | None, int | None, tuple[_Address, ...]]
_NOTHING_VETTED: _Vetted = (None, None, None, ())
#: A decoder of rdata: the message, the record's type, its rdata's offset and length, and
#: what its names may do (`_Walk`).
_Decoder = Callable[[bytes, int, int, int, _Walk], _Vetted]


def _address(data: bytes, rtype: int, rdata: int, rdlength: int, walk: _Walk) -> _Vetted:
    size, address_type = _ADDRESS_TYPES[rtype]
    if rdlength != size:
        raise DNSWireError(f"{QType(rtype).name} record at offset {rdata} has {rdlength} bytes "
                           "of address", Rcode.FORMERR)
    return None, address_type(int.from_bytes(data[rdata:rdata + size], "big")), None, ()


#: Types whose rdata is a name after a fixed part of so many bytes: CNAME, DNAME, NS and PTR
#: (0), MX, AFSDB, RT and KX (a preference or subtype, 2), SRV (priority, weight, port: 6).
_NAME_AT: dict[int, int] = {QType.CNAME: 0, QType.DNAME: 0, QType.NS: 0, QType.PTR: 0,
                            QType.MX: 2, QType.AFSDB: 2, QType.RT: 2, QType.KX: 2, QType.SRV: 6}


def _named(fixed: int) -> _Decoder:
    """The decoder of rdata that is `fixed` bytes and then a name: CNAME, DNAME, NS and PTR
    (0), MX, AFSDB, RT and KX (a preference or subtype, 2), SRV (priority, weight, port: 6)."""

    def target(data: bytes, rtype: int, rdata: int, rdlength: int, walk: _Walk) -> _Vetted:
        name, after = _read_name(data, rdata + fixed, walk)
        if after != rdata + rdlength:
            raise DNSWireError(f"{QType(rtype).name} target at offset {rdata} does not fill its "
                               "rdata", Rcode.FORMERR)
        return name, None, None, ()

    return target


def _service_binding(data: bytes, rtype: int, rdata: int, rdlength: int, walk: _Walk
                     ) -> _Vetted:
    """SVCB and HTTPS (RFC 9460 2.2): priority, an uncompressed target name, then SvcParams, whose
    keys must strictly increase; the address hints are decoded, every other value is skipped."""
    end = rdata + rdlength
    pos = rdata + 2
    while (length := data[pos] if pos < end else -1) != 0:
        if not 0 < length < 0x40:
            raise DNSWireError(f"{QType(rtype).name} target at offset {rdata + 2} is compressed "
                               "or runs past its rdata", Rcode.FORMERR)
        pos += 1 + length
    target, pos = _read_name(data, rdata + 2, walk)  # (its labels count: session 59's attack)
    hints: list[_Address] = []
    last_key = -1
    params = 0
    while pos < end:
        params += 1
        walk.svc_params -= 1
        if params > MAX_SVC_PARAMS:
            raise DNSWireError(f"{QType(rtype).name} record at offset {rdata} has more than "
                               f"{MAX_SVC_PARAMS} SvcParams, more than guardd accepts",
                               Rcode.FORMERR)
        if walk.svc_params < 0:
            raise DNSWireError(f"the records hold more than {MAX_RESPONSE_SVC_PARAMS} "
                               "SvcParams in all", Rcode.FORMERR)
        if pos + 4 > end:
            raise DNSWireError(f"{QType(rtype).name} SvcParam at offset {pos} is cut short",
                               Rcode.FORMERR)
        key, length = _SVC_PARAM.unpack_from(data, pos)
        pos += 4
        if key <= last_key or pos + length > end:
            raise DNSWireError(f"{QType(rtype).name} SvcParam {key} at offset {pos - 4} is out of "
                               "order or overruns the rdata", Rcode.FORMERR)
        last_key = key
        if key in _HINT_TYPES:
            size, address_type = _HINT_TYPES[key]
            if not length or length % size:
                raise DNSWireError(f"{QType(rtype).name} address hint at offset {pos} has "
                                   f"{length} bytes", Rcode.FORMERR)
            hints += (address_type(int.from_bytes(data[at:at + size], "big"))
                      for at in range(pos, pos + length, size))
        pos += length
    return target, None, None, tuple(hints)


def _soa_minimum(data: bytes, rtype: int, rdata: int, rdlength: int, walk: _Walk) -> _Vetted:
    """SOA: its MNAME and RNAME, each read as a name (within the answer's pointers: session
    58's re-attack, 250 SOA records of names of 950 pointers each), and five 32-bit fields,
    the last the minimum."""
    end = rdata + rdlength  # (their ends alone: no text is made of them)
    if _name_labels(data, _name_labels(data, rdata, walk)[1], walk)[1] + 20 != end:
        raise DNSWireError(f"SOA rdata at offset {rdata} is malformed", Rcode.FORMERR)
    return None, None, _U32.unpack_from(data, end - 4)[0], ()


def _uncompressed(data: bytes, rtype: int, rdata: int, rdlength: int, walk: _Walk) -> _Vetted:
    """NSEC and RRSIG: the name in their data (NSEC's next name, first; RRSIG's signer, after
    18 bytes) is never compressed (RFC 4034 3.1.7, 4.1.1), so the data goes as it came when
    the records around it move (`strip_records`)."""
    pos = rdata + (18 if rtype == QType.RRSIG else 0)
    end = rdata + rdlength
    while pos < end and 0 < data[pos] < 0x40:
        pos += 1 + data[pos]
    if pos >= end or data[pos]:
        raise DNSWireError(f"{QType(rtype).name} name in the rdata at offset {rdata} is "
                           "compressed or runs past it", Rcode.FORMERR)
    return _NOTHING_VETTED


#: rtype -> decoder of the `Record` fields the guard vets (see `_Vetted`); each checks that what
#: it decodes fills the rdata exactly.
_RDATA_DECODERS: dict[int, _Decoder] = {
    QType.A: _address, QType.AAAA: _address, QType.SVCB: _service_binding,
    QType.HTTPS: _service_binding, QType.SOA: _soa_minimum,
    **{rtype: _named(at) for rtype, at in _NAME_AT.items()}}
#: Types of plain data with a name in it (`_uncompressed`), checked but not decoded.
_CHECKED_DATA: dict[int, _Decoder] = {QType.NSEC: _uncompressed, QType.RRSIG: _uncompressed}
#: The types an answer may keep (see `_PLAIN_DATA`).
READ_TYPES = frozenset(_RDATA_DECODERS) | _PLAIN_DATA


def parse_response(data: bytes) -> Response:
    """Walk an upstream response; DNSWireError (hint SERVFAIL) if it is not a sane answer.

    Exactly one question is required: without it the answer cannot be matched to our query
    (RFC 5452). TTLs with the top bit set count as 0 (RFC 2181 8). When there are several OPT
    records the first one wins; the rest are ignored. More than `MAX_RESPONSE_RECORDS` records
    are refused as the header announces them, before any is walked.
    """
    with _upstream_errors("malformed upstream response"):
        ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        if not flags & _QR:
            raise DNSWireError("QR bit is clear", Rcode.FORMERR)
        if ancount + nscount + arcount > MAX_RESPONSE_RECORDS:
            raise DNSWireError(f"{ancount + nscount + arcount} records, more than guardd accepts "
                               f"({MAX_RESPONSE_RECORDS})", Rcode.FORMERR)
        if qdcount != 1:
            raise DNSWireError(f"{qdcount} questions, expected exactly 1", Rcode.FORMERR)
        qname, pos = _read_name(data, HEADER_SIZE)
        qtype, qclass = _QUESTION_TAIL.unpack_from(data, pos)
        authority_end = ancount + nscount
        records: list[Record] = []
        extended = None
        hints = 0
        walked = _records(data, pos + 4, authority_end + arcount)
        size = walked[-1][4] + walked[-1][5] if walked else pos + 4
        walk = _Walk([rdata - _RR_FIXED.size for _, _, _, _, rdata, _ in walked])
        for index, (start, rtype, rclass, ttl, rdata, rdlength) in enumerate(walked):
            if rtype == _OPT and index >= authority_end:
                if data[start]:  # (RFC 6891 6.1.2: written as it came when rebuilt)
                    raise DNSWireError(f"OPT record at offset {start} is not owned by the "
                                       "root", Rcode.FORMERR)
                extended = ttl >> 24 if extended is None else extended
                continue
            section = (Section.ANSWER if index < ancount else
                       Section.AUTHORITY if index < authority_end else Section.ADDITIONAL)
            name, _ = _read_name(data, start, walk)
            decode = _RDATA_DECODERS.get(rtype) or _CHECKED_DATA.get(rtype)
            vetted = decode(data, rtype, rdata, rdlength, walk) if decode else _NOTHING_VETTED
            hints += len(vetted[3])
            if hints > MAX_RESPONSE_HINTS:
                raise DNSWireError(f"more than {MAX_RESPONSE_HINTS} SVCB/HTTPS address hints, "
                                   "more than guardd accepts", Rcode.FORMERR)
            records.append(Record(section, name, rtype, rclass, ttl if ttl < 0x80000000 else 0,
                                  rdata - 6, rdata, rdlength, *vetted))
    rcode = flags & 0xF | (extended or 0) << 4
    return Response(ident, flags, rcode, qname, qtype, qclass, tuple(records), size)


def min_ttl(response: Response) -> int | None:
    """How long `response` may be cached, or None when it must not be.

    The minimum TTL of the answer records, and, when the authority section has an SOA (a negative
    answer, or a CNAME chain ending in one), its RFC 2308 negative TTL min(SOA TTL, MINIMUM).
    Truncated answers, rcodes other than NOERROR/NXDOMAIN, and negative answers without an SOA
    (RFC 2308 5: such answers SHOULD NOT be cached) get None.
    """
    if response.tc or response.rcode not in (Rcode.NOERROR, Rcode.NXDOMAIN):
        return None
    ttls = [record.ttl for record in response.records if record.section is Section.ANSWER]
    soa = next((record for record in response.records
                if record.section is Section.AUTHORITY and record.rtype == QType.SOA), None)
    if soa is not None and soa.soa_minimum is not None:
        ttls.append(min(soa.ttl, soa.soa_minimum))
    elif response.negative:
        return None
    return min(ttls)


def strip_records(data: bytes, drop_indices: Collection[int]) -> bytes:
    """`data` without the records at `drop_indices` (indices into `Response.records`).

    Header (its counts), question and OPT record go as they are; every other record kept goes
    with the names guardd reads written anew (its owner, the name in the data of the types of
    `_NAME_AT`, SOA's two), compressed against the names written so far alone (`_Names`), as
    a pointer of the answer's could land in a record dropped, and the rest as it came
    (RRSIG's and NSEC's names are never compressed: `_uncompressed`). `data` must have passed
    `parse_response`; the result has new offsets: parse it again before caching it. It may be
    longer than `data`, and is refused past what a DNS message may hold. (Not with a library:
    dnslib decoded every name and NSEC type bitmap again, unbounded, 1 to 2.5 s for an answer
    a hostile upstream built: session 58's re-attack.)
    """
    with _upstream_errors("cannot re-encode upstream response"):
        ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        pos = _skip_name(data, HEADER_SIZE) + _QUESTION_TAIL.size
        authority_end = ancount + nscount
        walked = _records(data, pos, authority_end + arcount)
        walk = _Walk([rdata - _RR_FIXED.size for _, _, _, _, rdata, _ in walked])
        out = bytearray(data[:pos])
        names = _Names()
        names.write(_name_labels(data, HEADER_SIZE)[0], HEADER_SIZE)  # (the question's, there)
        counts = [0, 0, 0]
        number = 0  # (of `Response.records`: every record but the additional OPT)
        for index, (start, rtype, _, _, rdata, rdlength) in enumerate(walked):
            section = 0 if index < ancount else 1 if index < authority_end else 2
            if rtype == _OPT and section == 2:
                out += data[start:rdata + rdlength]
            else:
                number += 1
                if number - 1 in drop_indices:
                    continue
                out += names.write(_name_labels(data, start, walk)[0], len(out))
                out += data[rdata - _RR_FIXED.size:rdata - 2]
                at = len(out) + 2
                rest = _written(data, rtype, rdata, rdlength, walk, names, at)
                out += _U16.pack(len(rest)) + rest
            counts[section] += 1
        _HEADER.pack_into(out, 0, ident, flags, qdcount, *counts)
    if len(out) > MAX_MESSAGE_BYTES:  # (attack pass, 2026-12-06: 254 SRV targets, 5 -> 67 KB)
        raise DNSWireError(f"the upstream response re-encoded without the records vetting "
                           f"dropped is {len(out):,} bytes, over the {MAX_MESSAGE_BYTES:,} a "
                           f"DNS message may hold", Rcode.SERVFAIL)
    return bytes(out)


class _Names:
    """The names written so far into a message `strip_records` rebuilds, by each suffix (as
    its labels' bytes): a name written next ends in a pointer to the longest of them it ends
    in (RFC 1035 4.1.4), as an encoder's do (its review: written whole, a CDN's answer of two
    aliases and nine addresses went from 296 to 568 bytes, past what a client without EDNS
    takes over UDP)."""

    __slots__ = ("_at",)

    def __init__(self) -> None:
        self._at: dict[bytes, int] = {}

    def write(self, labels: bytes, offset: int) -> bytes:
        """`labels` (a name's, uncompressed, without its root) as written at `offset`."""
        pos = 0
        while pos < len(labels):
            found = self._at.get(labels[pos:])
            if found is not None:
                return labels[:pos] + _U16.pack(0xC000 | found)
            if offset + pos < 0x4000:  # (a pointer's reach)
                self._at[labels[pos:]] = offset + pos
            pos += 1 + labels[pos]
        return labels + b"\0"


def _written(data: bytes, rtype: int, rdata: int, rdlength: int, walk: _Walk, names: _Names,
             at: int) -> bytes:
    """A record's data, to be written at `at`, with the names guardd reads in it written anew
    (`strip_records`)."""
    end = rdata + rdlength
    if rtype in _NAME_AT:
        fixed = _NAME_AT[rtype]
        return data[rdata:rdata + fixed] + names.write(
            _name_labels(data, rdata + fixed, walk)[0], at + fixed)
    if rtype == QType.SOA:
        mname_labels, after = _name_labels(data, rdata, walk)
        mname = names.write(mname_labels, at)
        rname = names.write(_name_labels(data, after, walk)[0], at + len(mname))
        return mname + rname + data[end - 20:end]
    return data[rdata:end]


def as_asked(tail: bytes, query: Query) -> bytes:
    """`tail`, an answer after its 2-byte id, as the answer to `query` itself: with the RD and CD
    flags and the question (its 0x20 case) exactly as the client sent them.

    The answer must be to guardd's own query for `query` (see `build_query`), whose question
    differs from the client's only in case, as `parse_response` and the cache key ensure.
    """
    return _echo(tail, query.flags & _ECHOED, query.question)


def as_built(tail: bytes, query: Query) -> bytes:
    """`tail` as the answer to guardd's own query for `query`: RD alone, the name in lower case.
    The cache keeps answers so; for a client that asks the same way (`asked_as_built`), that is
    its answer as it is."""
    question = query.question
    return _echo(tail, _RD, question[:-4].lower() + question[-4:])  # type and class are binary


def asked_as_built(query: Query) -> bool:
    """Whether `query` has guardd's own flags (RD alone) and a lower-case name (most stubs)."""
    name = query.question[:-4]
    return query.flags & _ECHOED == _RD and name == name.lower()


def _echo(tail: bytes, echoed: int, question: bytes) -> bytes:
    flags = tail[0] << 8 | tail[1]
    if flags & _ECHOED == echoed and tail.startswith(question, HEADER_SIZE - 2):
        return tail
    return (_U16.pack(flags & ~_ECHOED | echoed) + tail[2:HEADER_SIZE - 2] + question
            + tail[HEADER_SIZE - 2 + len(question):])


def set_tc_for_udp(data: bytes, limit: int) -> bytes:
    """`data` if it fits in `limit` bytes (see `Query.udp_limit`), else a truncated answer.

    The truncated answer keeps the header (with TC set), the question and the OPT record and
    drops every other record, which tells the client to retry over TCP (RFC 7766).
    """
    if len(data) <= limit:
        return data
    with _upstream_errors("cannot truncate response"):
        ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
        pos = HEADER_SIZE
        for _ in range(qdcount):
            pos = _skip_name(data, pos) + 4
        if pos > len(data):
            raise IndexError
        skip = ancount + nscount
        opt = b""
        for start, rtype, _, _, rdata, rdlength in _records(data, pos, skip + arcount)[skip:]:
            if rtype == _OPT:
                opt = data[start:rdata + rdlength]
                break
    return (_HEADER.pack(ident, flags | _TC, qdcount, 0, 0, 1 if opt else 0)
            + data[HEADER_SIZE:pos] + opt)


# --- DNS over TCP framing ------------------------------------------------------------------------


class TcpFramer:
    """Splits a DNS-over-TCP byte stream into messages (RFC 1035 4.2.2: 2-byte length prefix).

    `feed` it whatever the socket delivered, one byte or many messages at a time (RFC 7766
    pipelining); `pop` hands out the complete messages one by one, so the caller takes only as
    many as it has room for and the rest wait here. A zero length is a protocol error: nothing can
    be answered and the stream must be closed.
    """

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def pop(self) -> bytes | None:
        """The next complete message, or None while it has not all arrived."""
        buffer = self._buffer
        if len(buffer) < 2:
            return None
        length = buffer[0] << 8 | buffer[1]
        if length == 0:
            raise DNSWireError("DNS over TCP: zero-length message", DROP)
        end = 2 + length
        if end > len(buffer):
            return None
        message = bytes(buffer[2:end])
        del buffer[:end]  # cheap: a bytearray drops its head without moving the rest
        return message

    @property
    def buffered(self) -> int:
        """Bytes not handed out yet."""
        return len(self._buffer)


def tcp_frame(message: bytes) -> bytes:
    """`message` with its 2-byte length prefix."""
    return len(message).to_bytes(2, "big") + message


# --- queries guardd sends itself -----------------------------------------------------------------


def build_query(name: str, qtype: int, ident: int, *, qclass: int = CLASS_IN, edns: bool = True,
                do: bool = False) -> bytes:
    """The recursive query guardd sends for `name` (normalized LDH text, as `parse_query` and
    `addr.normalize_name` return it): header with RD alone, the question, and iff `edns` an OPT
    record with our UDP payload size, the DO bit iff `do`, version 0 and no options.

    Nothing a client chose but the question and the EDNS and DO state goes into it: those are the
    cache key (see `cache.upstream_query`). CD is never set, so the upstream validates if it can.
    """
    labels = _name_wire(name)
    opt = _OPT_FIXED.pack(_OPT, MAX_UDP_PAYLOAD, _DO if do else 0, 0) if edns else b""
    return (_HEADER.pack(ident, _RD, 1, 0, 0, 1 if edns else 0) + labels
            + _QUESTION_TAIL.pack(qtype, qclass) + opt)


# --- answers to queries guardd sent --------------------------------------------------------------

#: Error answers that may leave the question out, the server having failed to read or serve it
#: (dnspython's `is_response` allows the same).
QUESTIONLESS_RCODES = frozenset(map(int, (Rcode.FORMERR, Rcode.SERVFAIL, Rcode.NOTIMP,
                                          Rcode.REFUSED)))
_ID_FLAGS = struct.Struct("!HH")


def rcode_of(message: bytes, *, without_id: bool = False) -> int:
    """The header's rcode (4 bits) of a whole message, or of one whose id was cut off (a cached
    answer, kept without its id)."""
    return message[1 if without_id else 3] & 0xF


def peek_header(message: bytes) -> tuple[int, bool, bool, int] | None:
    """(id, is a response, truncated, rcode) from the header alone: enough to match an upstream's
    message to the attempt it claims to answer, and to see whether it failed, without walking
    it. The rcode is the header's 4 bits (extended ones live in the OPT record: see
    `parse_response`). None when `message` is shorter than a header."""
    if len(message) < HEADER_SIZE:
        return None
    ident, flags = _ID_FLAGS.unpack_from(message)
    return ident, bool(flags & _QR), bool(flags & _TC), flags & 0xF


def folded_question(message: bytes) -> bytes | None:
    """The raw question section with its names lower-cased, so that an answer's compares equal
    to its query's whatever case the upstream echoed (0x20); b"" when there is no question, None
    when the header or a question does not parse. The first name of a message has nothing before
    it to point to, so a compression pointer here is junk too. Length octets are at most 63,
    which `lower()` leaves alone."""
    if len(message) < HEADER_SIZE:
        return None
    parts: list[bytes] = []
    pos = HEADER_SIZE
    for _ in range(message[4] << 8 | message[5]):
        start = pos
        while pos < len(message) and 0 < message[pos] <= 63:
            pos += message[pos] + 1
        if pos >= len(message) or message[pos] != 0 or pos + 5 > len(message):
            return None
        parts += (message[start:pos + 1].lower(), message[pos + 1:pos + 5])
        pos += 5
    return b"".join(parts)


def answer_addresses(response: Response) -> list[_Address]:
    """The addresses (A, AAAA) `response` gives for its question, in answer order: those of answer
    records owned by the question name or a name its CNAME chain reaches, not records for other
    names that an upstream put beside them."""
    owners = {response.qname}
    found = []
    for record in response.records:
        if record.section is not Section.ANSWER or record.name not in owners:
            continue
        if record.rtype == QType.CNAME and record.target is not None:
            owners.add(record.target)
        elif record.address is not None:
            found.append(record.address)
    return found
