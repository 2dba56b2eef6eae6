"""First client bytes of a proxied connection, sans-I/O: bytes in, a verdict out.

Theory of operation
-------------------
After a CONNECT is accepted, the server holds back what the client sends first and asks
`sniff(buffer)` what it is, calling it again with the grown buffer until it answers, and once more
with `eof=True` when the client half-closes before an answer (a head ended by the close is a head):

* `None`: not decidable yet (a partial TLS record, an HTTP head without its blank line);
* `Sniffed(Kind.TLS, sni=…, alpn=…, ech=…)`: a TLS ClientHello, reassembled across as many
  handshake records as it takes; the server checks the SNI against the policy (domain fronting);
* `Sniffed(Kind.HTTP, method=…, host=…, port=…, target=…)`: an HTTP request head; the server
  judges it with its method (docs/design.md, evaluation rule 6) and checks its Host;
* `Sniffed(Kind.OTHER)`: anything else: no method, no name.

Security model: the client is the adversary (a prompt-injected agent that writes raw bytes), the
upstream is whatever listens behind the vetted address: possibly a CDN that routes on the SNI or
the Host, possibly the most lenient HTTP server there is. Two rules follow.

1. *Recognise as much as the most lenient peer accepts.* Anything that starts like a TLS record
   (0x14-0x17) is TLS, whatever its record-layer version (that field is not in the handshake
   transcript: Go's crypto/tls completes a handshake whose records say 0x0000); the warning alerts
   Go skips before a ClientHello are skipped here too, any other record there is a failure. So
   is an SSLv2-compatible ClientHello offering SSL 3.0 or TLS (RFC 5246 E.2; older OpenSSL
   servers take it): TLS with no server name, which it cannot carry. A
   header name is compared without the whitespace `str.strip()` removes. Anything a
   lenient HTTP server (Python's `http.server` is the model) would serve as a request is HTTP:
   leading whitespace, every byte `str.split()` splits Latin-1 text on (SP, HTAB, VT, FF, CR, LF,
   0x1C-0x1F, 0x85, 0xA0), versions such as `HTTP/01.1` or `HTTP/0.1`, the two-word HTTP/0.9
   `GET /path`, a head ended by the client's half-close. An OTHER verdict for such bytes would
   let a `method` rule be skipped while the server acts on the method.
2. *Where a peer might read a name that cannot be pinned down, say so.* The name is then
   `UNVERIFIABLE` and `problem` says why; the server denies such a connection outright (a
   catch-all allow does not vouch for a name nobody could read). That covers: for TLS, every
   failure once the bytes start like a record (a zero-length handshake record, which RFC 8446
   5.1 forbids, a hello split into more than 64 records, another record type or one over 2^14
   bytes before the hello is complete, a first message that is not a ClientHello, lengths that
   do not add up,
   a duplicated extension (RFC 8446 4.2), a server_name with two host_names or an empty or
   non-ASCII name, a hello that does not complete within `MAX_SNIFF_BYTES`, or the client closing
   before it did); for HTTP, two different Host headers, an absolute-form or CONNECT authority that
   disagrees with Host or carries userinfo, a Host that is not a plain name, IPv4 literal or
   bracketed IPv6 literal with an optional port, any obs-fold line, a bare CR anywhere in the head
   (some servers end lines there), CRLF and bare LF mixed (servers end the head at different
   places), a method that is printable but not a token (strict servers refuse it, a toy one
   serves it), more than three words on the request line, a version that is
   not HTTP/0.x or 1.x (HTTP/2 prior knowledge carries its authority in HPACK, which guardd does
   not read), a head that does not end within `HTTP_HEAD_CAP` (or a request line: one still
   open there and no longer than Netty's default line limit, whatever its words, as Netty does
   not count what it skipped before it), an X-Forwarded-Host or
   Forwarded host that is not the Host (frameworks that trust them serve that host), method
   override headers (or a `_method` query parameter) naming two methods, and a PROXY protocol
   header (v1 or v2: a server that takes one serves the request after it).

The method is any RFC 9110 token (so "M-SEARCH" counts), reported upper-cased: strict servers
reject "delete" but some frameworks (Werkzeug) upper-case it, so a `method: DELETE` deny rule also
stops "delete". A missing or empty Host is `host=None`: nothing claimed, nothing to check (the
connection goes to the CONNECT target anyway). Host is reported lower-cased, without port, without
IPv6 brackets (compressed, as `str(ipaddress)` prints it) and without a trailing dot, like policy
names. What is OTHER: a first word (after whitespace) with a byte that is not printable ASCII, or
of over 32 bytes that is not a token (no method; a JSON object); a line holding a control byte
no client writes (an LDAP message: `0`, its length, `\x02`); a request line of one word, of
two words unless the first is GET, or of three or more whose last word does not start with
"HTTP/" (an SSH banner, SMTP, Redis, a JSON line).

Three properties hold for every input (tests/unit/test_stream_sniff.py checks them with
Hypothesis): `sniff` never raises on bytes; a verdict never changes as bytes are appended (so the
growing-buffer loop and one call on the whole buffer agree); and from `MAX_SNIFF_BYTES` bytes on
(or with `eof=True` on any non-empty input) there is always a verdict. Each call is linear in the
buffer and bounded by the caps, with slicing and `bytes` methods rather than regexes.

After a TLS hello the server's first answer is read too (`server_answer`): when it asks for
the hello again (RFC 8446 4.1.4), `hello_again` reads the second one, which must name the server
the first did (a server serves the second's name); when it resumes a session below TLS 1.3, the
name it serves is the session's, which the hello does not prove (`echoed_session` and the
hello's `session` and `ticket` say which session: `stream.sessions`); after a full handshake
below TLS 1.3, `RecordWatch` judges each record header both ways, for a renegotiation, and
reads the server's session as it goes.
`hello_length` says where the first ends.

Limits (docs/design.md, rule 6): only the first request of a connection is seen, and the name
inside an ECH-encrypted ClientHello is not (`ech=True` says the SNI is only the outer, public name;
the server decides what that means).
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from guardd.addr import UNVERIFIABLE
from guardd.stream.body_method import (OVERRIDE_FIELDS, OVERRIDE_HEADERS, BodyMethodScan,
                                       form_decoded, percent_decoded, shown)

__all__ = ["ANY_METHOD", "HTTP_HEAD_CAP", "MAX_SNIFF_BYTES", "UNVERIFIABLE", "Kind",
           "LenientReading", "LineWatch", "Sniffed",
           "RecordWatch", "ServerAnswer", "echoed_session", "hello_again", "hello_length",
           "is_session_id", "server_answer",
           "field_name", "sniff", "sniff_head"]

#: Largest TLS record plaintext (RFC 8446 5.1).
MAX_TLS_RECORD = 16 * 1024
#: Largest ClientHello body accepted. Real hellos, post-quantum key shares included, are 0.5-2 KiB
#: (Chrome and OpenSSL 3.5 with X25519MLKEM768 about 1.8 KiB), a client offering many ALPN names
#: or a long session ticket more; Go's crypto/tls accepts handshake messages of up to 64 KiB.
MAX_CLIENT_HELLO = 64 * 1024
#: The most bytes ever looked at: a maximal hello in full records (5-byte headers) with room to
#: spare. A ClientHello must be complete within them; from this length on `sniff` always answers.
MAX_SNIFF_BYTES = MAX_CLIENT_HELLO + 1024
#: An HTTP request head (request line, header lines, blank line) must end within this many bytes
#: (the per-line limit of common servers: Apache's 8190, nginx's large_client_header_buffers 8k).
HTTP_HEAD_CAP = 8 * 1024
#: `Sniffed.override` of a request that may be served as any method (a request body's `_method`
#: field: `stream.body_method`).
ANY_METHOD = "*"
#: `sniff_head` remembers the verdicts of this many heads, each of at most `_KEPT_HEAD_BYTES`
#: (with their verdicts, about half a MiB in all at most).
_KEPT_HEADS = 256
_KEPT_HEAD_BYTES = 1024
#: `Sniffed.target` is cut to this many characters, the last an ellipsis (it is for the audit
#: trail, and says that it was cut).
MAX_TARGET_CHARS = 200


class Kind(enum.Enum):
    TLS = "tls"
    HTTP = "http"
    OTHER = "other"


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What the first client bytes are. Fields that do not apply to `kind` keep their defaults."""

    kind: Kind
    #: TLS: the host_name in server_name, lower-case, trailing dot removed; None when absent;
    #: UNVERIFIABLE for a malformed or oversized hello.
    sni: str | None = None
    #: HTTP: the request method, upper-cased (see the module docstring).
    method: str | None = None
    #: HTTP: the Host header (or the absolute-form / CONNECT authority) without port, lower-case,
    #: IPv6 brackets removed; None when absent or empty; UNVERIFIABLE when ambiguous or malformed.
    host: str | None = None
    #: HTTP: the port given with the host, if any.
    port: int | None = None
    #: HTTP: the request-target as sent (bytes read as Latin-1), at most 200 characters.
    target: str | None = None
    #: TLS: the offered ALPN protocol names, in order (non-ASCII bytes backslash-escaped).
    alpn: tuple[str, ...] = ()
    #: TLS: an encrypted_client_hello (0xfe0d) or draft encrypted_server_name (0xffce) extension
    #: is present, so `sni` is at best the public outer name.
    ech: bool = False
    #: HTTP: another method an override header names (`_METHOD_OVERRIDES`), upper-cased:
    #: frameworks that honour one serve that method instead.
    override: str | None = None
    #: OTHER from the lenient reading (`sniff_request`): a line still open at the cap, which
    #: a server with a longer line limit may yet read as a request line (`LineWatch` reads on).
    line_open: bool = False
    #: Why the name is UNVERIFIABLE, for the denial's reason (not part of equality).
    problem: str = field(default="", compare=False)
    #: TLS: the session the hello offers to resume (`session_credential` of its legacy
    #: session id, `ticket_credential` of its session ticket, RFC 5077 3.4; b"": none), which
    #: a server may resume under another name than the SNI (`stream.sessions`).
    session: bytes = field(default=b"", compare=False)
    ticket: bytes = field(default=b"", compare=False)

    @property
    def name(self) -> str | None:
        """The name the bytes claim (SNI or Host), UNVERIFIABLE, or None."""
        return self.sni if self.kind is Kind.TLS else self.host


class _Unverifiable(Exception):
    """Raised inside a parse: the name cannot be pinned down; the message says why."""


_OTHER = Sniffed(Kind.OTHER)
_LINE_OPEN = Sniffed(Kind.OTHER, line_open=True)

# --- bytes classes, for bytes.translate(None, allowed) == b"" checks -----------------------------

_DIGITS = b"0123456789"
_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: RFC 9110 5.6.2 tchar.
_TOKEN = _LETTERS + _DIGITS + b"!#$%&'*+-.^_`|~"
#: Printable ASCII: what a method may be made of for a lenient server to read it at all.
_PRINTABLE = bytes(range(0x21, 0x7F))
#: Longer first words that are not tokens are not methods (a JSON line is not a request).
_MAX_METHOD = 32
#: What a name (SNI, Host, authority host; already lower-cased) may hold to be checked at all.
_NAME = b"abcdefghijklmnopqrstuvwxyz" + _DIGITS + b"-._"
#: What Python's str.split() splits Latin-1 text on: the separators of the most lenient request
#: line parser, mapped to a space before splitting.
_SPLIT = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0"
_TO_SPACE = bytes.maketrans(_SPLIT, b" " * len(_SPLIT))
#: Control bytes no client writes on a request line (those in _SPLIT separate words instead):
#: first bytes whose line holds one are other bytes at once (an LDAP message's).
_LINE_CTL = bytes(b for b in range(0x20) if b not in _SPLIT) + b"\x7f"
#: What a lenient server skips before a request line: whitespace and empty lines as every
#: server does, and control bytes as Netty does (ISO controls; 0xA0 and 0xFF it reads as a
#: method, third attack pass).
_SKIPPED = bytes(range(0x21)) + bytes(range(0x7F, 0xA0))
#: What Java's String.trim() takes off a method's ends (Netty trims it).
_TRIMMED = bytes(range(0x21))
#: A request line's last word as a lenient server reads a version: any protocol name, a slash, a
#: digit (Netty serves `GET / X/1.1` and `RTSP/1.0`, keep-alive).
_ANY_VERSION = re.compile(rb"[\x21-\x7e]+/[0-9]")
#: Where Netty splits a request line: Java's whitespace (Character.isWhitespace) in Latin-1,
#: or only SP, HT, VT, FF and CR (a patched 4.1.48: third attack pass); both are read.
_JAVA_SPACE = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "
_PATCHED_NETTY_SPACE = b"\t\x0b\x0c\r "
_JAVA_SPLITS = tuple(bytes.maketrans(spaces, b" " * len(spaces))
                     for spaces in (_JAVA_SPACE, _PATCHED_NETTY_SPACE))
#: A method and a target, then the version: Netty takes the rest of the line for it.
_TWO_WORDS = re.compile(rb" *[^ ]+ +[^ ]+ +")
#: Netty's version once trimmed: Java's `(\S+)/(\d+)\.(\d+)` (`\S`: all but six whitespace bytes).
_NETTY_VERSION = re.compile(rb"[^\t\n\x0b\x0c\r ]+/[0-9]+\.[0-9]+")
#: Netty's default limit on a request line (maxInitialLineLength): at most this many bytes
#: before its CR, the control bytes it skipped before it not counted (Netty 4.1.1xx; 4.1.48
#: counts them).
_NETTY_LINE = 4096
#: Why a request behind bytes a lenient server skips is unverifiable.
_CONTROLS_BEFORE = ("control bytes before the request line (a lenient server such as Netty "
                    "skips them and serves the request)")
#: The bytes a method may have to some server: printable ASCII, and Latin-1 letters to Netty
#: (it refuses only control bytes and whitespace).
_METHOD_BYTES = _PRINTABLE + bytes(range(0xA1, 0x100))
_SCHEME = _LETTERS + _DIGITS + b"+-."
#: WHATWG's special schemes with a default port: their URLs always have a host, found however
#: many slashes or backslashes follow the colon.
_SPECIAL_SCHEMES = {b"http": 80, b"https": 443, b"ws": 80, b"wss": 443, b"ftp": 21}

# --- TLS constants -------------------------------------------------------------------------------

_HANDSHAKE = 0x16
#: Record types that open a TLS stream as guardd sees it: a ClientHello, or what comes before one
#: that some server tolerates or that cannot be told apart from TLS (change_cipher_spec, alert,
#: application data): anything that starts like a TLS record is TLS.
_RECORD_TYPES = frozenset({0x14, 0x15, _HANDSHAKE, 0x17})
_ALERT = 0x15
#: Go's crypto/tls skips up to 16 warning alerts before a handshake message (maxUselessRecords).
_MAX_WARNINGS = 16
#: Records a ClientHello may span: a maximal one needs 5; more is the splitting trick that
#: evades sniffers (and would make each look at the bytes cost more).
_MAX_RECORDS = 64
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
#: An encrypted ClientHello: ECH (0xfe0d, draft-ietf-tls-esni's final codepoint) and its
#: drafts' codepoints before it
#: (0xfe01 to 0xfe0c: attack pass 32, a server still taking a draft serves the hidden name),
#: ESNI as Cloudflare shipped it (0xffce) and an earlier draft's (0xff02).
_EXT_ECH = frozenset(range(0xFE01, 0xFE0E)) | {0xFFCE, 0xFF02}
_HOST_NAME = 0
_SERVER_HELLO = 2
#: What tells a HelloRetryRequest: a ServerHello's type, length, legacy_version and random.
_SERVER_HELLO_HEAD = 4 + 2 + 32
_CHANGE_CIPHER_SPEC = 0x14
_NEW_SESSION_TICKET = 4
_EXT_SUPPORTED_VERSIONS = 0x002B
_EXT_SESSION_TICKET = 0x0023
#: The random of a ServerHello that is a HelloRetryRequest (RFC 8446 4.1.3).
_RETRY_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
#: Records a server skips before a client's hello sent again: change_cipher_spec and early data.
_SKIPPED_BEFORE_AGAIN = frozenset({0x14, 0x17})
_SSLV2_COMPATIBLE_HELLO = b"\x01\x03"
_MAX_SESSION_ID = 32


#: What the sniffer reads: what a client sent so far, as received or grown in place.
_Received = bytes | bytearray


def sniff(data: _Received | memoryview, eof: bool = False) -> Sniffed | None:
    """Classify the first bytes a client sent; None while more bytes are needed.

    `data` is everything received so far (bytes, bytearray or memoryview); `eof` says the client
    will send nothing more, so the bytes are judged as they are. Never raises on any such input;
    TypeError for something that is not bytes-like. Once `len(data)` reaches `MAX_SNIFF_BYTES`,
    or with `eof` and any bytes at all, the answer is never None. A verdict, once given, stays
    the same however many bytes are appended.
    """
    if not isinstance(data, bytes | bytearray):  # both have every method used here
        data = bytes(memoryview(data))
    if not data:
        return None
    if data[0] in _RECORD_TYPES:
        try:
            return _sniff_tls(data, eof)
        except _Unverifiable as exc:
            return _tls_unverifiable(str(exc))
    if data[0] & 0x80:  # an SSLv2-compatible ClientHello (RFC 5246 E.2): its length, type 1,
        if len(data) < 4 and not eof:  # then the version it offers, SSL 3.0 or a TLS (3.x)
            return None
        if data[2:4] == _SSLV2_COMPATIBLE_HELLO:
            # (no extensions, so no server name: a final attack pass found it read as bytes
            # that claim nothing, and a server's default site answered it). Whole, as a TLS
            # hello is: what follows it waits for the server's answer (`hello_length`).
            if len(data) < hello_length(data) and not eof:
                return None
            try:
                _no_request_line(bytes(data[:hello_length(data)]))
            except _Unverifiable as exc:
                return _tls_unverifiable(str(exc))
            return Sniffed(Kind.TLS)
    return _sniff_http(data, eof)


def sniff_head(head: bytes) -> Sniffed | None:
    """`sniff` of a request head guardd forwards, whole (`follow.Head`: a followed request
    re-serialized), remembered for the last `_KEPT_HEADS` short heads: a client's repeated
    request (a poll, a retry, a benchmark's) is read once, not at each (the reading was a
    tenth of a kept-alive proxied request's cost). `sniff` is a function of the bytes alone,
    and its verdicts are frozen, so one shared is the same verdict."""
    return _sniffed_head(head) if len(head) <= _KEPT_HEAD_BYTES else sniff(head)


@functools.lru_cache(maxsize=_KEPT_HEADS)
def _sniffed_head(head: bytes) -> Sniffed | None:
    return sniff(head)


# --- TLS -----------------------------------------------------------------------------------------


#: What ends a request line to a lenient server: whitespace, then the version. A real hello never
#: holds it (its random would have to, by a chance of about 2^-44; ALPN's "http/1.1" follows its
#: length byte, 8): one that does was made to be read as HTTP by a server that takes any first
#: word for a method. Searched in the raw bytes, whitespace made spaces, upper-cased.
_REQUEST_LINE_VERSION = b" HTTP/"


def _sniff_tls(data: _Received, eof: bool) -> Sniffed | None:
    """Find the first handshake message across consecutive handshake records, then parse it.
    The record-layer version is not checked: servers (Go's) do not check it either. Until the
    message is whole only the record headers are walked (at most `_MAX_RECORDS` of them), and it
    is copied out once: a hello trickled in byte by byte costs O(records) a call."""
    size = len(data)
    limit = min(size, MAX_SNIFF_BYTES)
    pos = start = _after_warnings(data, limit)
    if pos < 0:
        _incomplete(size, eof)
        return None
    head = bytearray()  # the handshake message's first 4 bytes: type and length
    have = 0  # handshake bytes in the records so far
    needed = -1  # 4 + the message's body length, once `head` is whole
    for records in range(1, _MAX_RECORDS + 2):
        if pos >= limit:
            break
        if data[pos] != _HANDSHAKE:
            raise _Unverifiable(f"a record of type {data[pos]} interrupts it")
        if records > _MAX_RECORDS:
            raise _Unverifiable(f"split into more than {_MAX_RECORDS} records")
        if pos + 5 > limit:
            break
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length > MAX_TLS_RECORD:
            raise _Unverifiable(f"a record of {length} bytes (at most {MAX_TLS_RECORD})")
        if length == 0:
            raise _Unverifiable("a zero-length handshake record (RFC 8446 5.1 forbids them)")
        end = pos + 5 + length
        arrived = min(end, limit) - pos - 5
        if len(head) < 4:
            head += data[pos + 5:pos + 5 + min(arrived, 4 - len(head))]
            if len(head) == 4:
                if head[0] != _CLIENT_HELLO:
                    raise _Unverifiable(f"the first handshake message is of type {head[0]}")
                needed = 4 + int.from_bytes(head[1:4], "big")
                if needed - 4 > MAX_CLIENT_HELLO:
                    raise _Unverifiable(f"{needed - 4} bytes long (guardd reads at most "
                                        f"{MAX_CLIENT_HELLO})")
        have += arrived
        if 0 <= needed <= have:
            after = length - (needed - (have - arrived))
            if after:
                raise _Unverifiable(f"its record carries {after} more after it: a server reads "
                                    "them as the next handshake message")
            # As a lenient server reads the bytes: raw (record headers too), any whitespace
            # str.split() splits on, any case; up to the hello's last byte (so appending
            # bytes never changes the verdict).
            _no_request_line(bytes(data[:pos + 5 + needed - (have - arrived)]))
            return _parse_client_hello(_handshake_bytes(data, start, needed)[4:])
        pos = end
    _incomplete(size, eof)
    return None


#: What may begin a TLS first flight as a server takes the bytes after an in-band upgrade,
#: at any minor version (OpenSSL reads only the major one): a handshake record whose first
#: fragment, of any size, begins a ClientHello (1), or an empty handshake or change_cipher_spec
#: record before one (OpenSSL skips them). Inside a burst, behind what it pipelined first, a
#: hello is told by more of its header (a chance match is one in 2^40 a position), any size up
#: to OpenSSL's 128 KiB, or a first fragment of 1 to 5 bytes, or an empty record before it
#: (review, 2026-12-06: fragments of 1 and 4 bytes, record version 3.5, an empty CCS, a hello
#: over 64 KiB went unseen), of any legacy_version above SSL 3.0 (OpenSSL reads the version
#: from supported_versions: attack pass 48, 0x0403), or a warning alert before it (Go skips
#: them).
_HELLO_BEGINS = re.compile(rb"\x16\x03[\x00-\xff][\x00-\x48][\x00-\xff]\x01|"
                           rb"[\x14\x16]\x03[\x00-\xff]\x00\x00|\x15\x03[\x00-\xff]\x00\x02\x01")
_HELLO_INSIDE = re.compile(rb"\x16\x03[\x00-\xff](?:[\x00-\x48][\x00-\xff]\x01[\x00-\x02]"
                           rb"[\x00-\xff]{2}[\x03-\xff]|\x00[\x01-\x05]\x01)|"
                           rb"[\x14\x16]\x03[\x00-\xff]\x00\x00[\x14\x16]\x03|"
                           rb"\x15\x03[\x00-\xff]\x00\x02\x01[\x00-\xff][\x15\x16]\x03")
#: Bytes at the start of a client's burst searched for a hello, or an upgrade's request, it
#: pipelined behind a command (short), and peeked at once.
HELLO_WINDOW = 512
#: The requests of the in-band upgrades guardd knows, each where it ends: after them the
#: client's next bytes are its TLS first flight. SMTP's, LMTP's, NNTP's, ManageSieve's and
#: IMAP's (tagged) STARTTLS, POP3's STLS, FTP's AUTH TLS or SSL, XMPP's <starttls/>, a
#: Postgres SSLRequest or GSSENCRequest (whole first bytes), LDAP's StartTLS extended request
#: (its OID) and MySQL's SSLRequest (a 32-byte packet, sequence 1, CLIENT_SSL). A command's
#: line is read within itself, its blanks no LF (attack pass 50: `\s*` ran from every LF over
#: the rest of a run of them, and a search of 64 KiB held the event loop for 95 s).
_UPGRADE = re.compile(
    rb"(?:^|\n)[ \t\r\v\f]*(?:\S+[ \t\r\v\f]+)?(?:starttls|stls|auth[ \t\r\v\f]+"
    rb"(?:tls|ssl|tls-c|tls-p))[ \t\r\v\f]*\n|"
    rb"<starttls[^>]{0,200}>(?:\s*</starttls>)?|\x00\x00\x00\x08\x04\xd2\x16[\x2f\x30]|"
    rb"1\.3\.6\.1\.4\.1\.1466\.20037|\x20\x00\x00\x01[\x00-\xff][\x08-\x0f\x18-\x1f"
    rb"\x28-\x2f\x38-\x3f\x48-\x4f\x58-\x5f\x68-\x6f\x78-\x7f\x88-\x8f\x98-\x9f\xa8-\xaf"
    rb"\xb8-\xbf\xc8-\xcf\xd8-\xdf\xe8-\xef\xf8-\xff][\x00-\xff]{30}", re.IGNORECASE)
#: What every match of `_HELLO_INSIDE` begins with, and bytes every match of `_UPGRADE` holds
#: (lower-cased): where none is, neither pattern is run (they cost 11 and 35 ns a byte, and a
#: stream read while undecided is searched at every read: attack pass 51, 12 MiB/s).
_HELLO_STARTS = (b"\x14\x03", b"\x15\x03", b"\x16\x03")
_UPGRADE_HOLDS = (b"starttls", b"stls", b"auth", b"\x00\x00\x00\x08\x04\xd2\x16",
                  b"1.3.6.1.4.1.1466.20037", b"\x20\x00\x00\x01")
#: Bytes of what a client sent before a burst kept to be read with it (`_Pump`): a request
#: or a hello cut across two bursts (the third review: `START`, then `TLS\r\n`).
CARRY = 256


def hello_start(data: _Received, carried: int = 0, window: int = HELLO_WINDOW) -> int:
    """Where in `data` (the start of a client's burst, after the `carried` bytes of what it
    sent before) a TLS first flight may begin, or -1: a protocol that starts in plain text
    may upgrade to TLS in band (STARTTLS, a Postgres SSLRequest), and its hello names a
    server as a first one does (attack pass, 2026-12-06: an allowed name's address served a
    denied one, routed on the SNI). One that began in the carried bytes is found when the
    burst's bytes complete its header. Only `window` bytes of the burst are searched."""
    if _HELLO_BEGINS.match(data, carried):
        return carried
    end = carried + window
    begins = [at for at in (data.find(start, 0, end) for start in _HELLO_STARTS) if at != -1]
    if not begins:
        return -1
    return next((found.start() for found in _HELLO_INSIDE.finditer(data, min(begins), end)
                 if found.end() > carried), -1)  # (not one wholly carried: judged before)


def upgrade_end(data: _Received, carried: int = 0, window: int = HELLO_WINDOW) -> int:
    """Where in `data` (the start of a client's burst, after the `carried` bytes of what it
    sent before) the request of an in-band upgrade to TLS ends (`_UPGRADE`), -1 when it holds
    none ending in the burst: what follows is the client's TLS first flight, read whole as
    first bytes are, however the client cuts it up (the review's: a byte at a time, behind an
    empty record)."""
    end = carried + window
    searched = data[:end].lower()
    if not any(held in searched for held in _UPGRADE_HOLDS):
        return -1
    return next((found.end() for found in _UPGRADE.finditer(data, 0, end)
                 if found.end() > carried), -1)


def tls_ahead(data: _Received, carried: int = 0, window: int = HELLO_WINDOW
              ) -> tuple[int, bool]:
    """Where the next look at a client's bytes goes (`hello_start`, `upgrade_end`): where a
    hello may begin (False), or where an upgrade's request ends, its first flight next
    (True); (-1, False) when neither is in the window. A hello that begins before the request
    would end wins: the request's bytes are in it (attack pass 48: a stock hello whose ALPN
    named LDAP's StartTLS OID was cut there, its SNI going as the request's bytes)."""
    end = upgrade_end(data, carried, window)
    at = hello_start(data, carried, window)
    if at >= 0 and (end < 0 or at < end):
        return at, False
    return end, end >= 0


def tls_after(data: _Received, went: int) -> tuple[int, bool]:
    """`tls_ahead` in the whole of a first flight `sniff` read as no hello (`went`: its bytes
    that went before), from its second byte: behind what it is, a hello may still come
    (attack pass 48: the rest of a request `_UPGRADE` ends early, XMPP's `</starttls >`, an
    LDAP request's controls, held as a first flight, then let go with the hello after it)."""
    at, flight = tls_ahead(data[1:], max(went - 1, 0), len(data))
    return (at + 1, flight) if at >= 0 else (-1, False)


def inside_hello(data: _Received) -> int:
    """Where in a first hello `sniff` read whole (`data`: its records, and the warning alerts
    before it) an upgrade's request ends or another hello begins, -1 when nowhere: a server
    that reads the hello as lines (SMTP) would upgrade on it (last re-attack of attack pass
    48: an extension's data held a STARTTLS and a hello naming a denied server)."""
    start = 0 if data[0] & 0x80 else _after_warnings(data, len(data))
    at, _ = tls_after(data[start:], 0)
    return start + at if at >= 0 else -1


def hello_length(data: _Received) -> int:
    """How many bytes of `data` the ClientHello `sniff` read in them takes: its records, the
    warning alerts before it included (an SSLv2-compatible hello: its one record). What follows
    it is held until the server's answer says whether it may go (`server_answer`)."""
    if data[0] & 0x80:
        return 2 + (((data[0] & 0x7F) << 8) | data[1])
    pos = start = _after_warnings(data, len(data))
    needed = 4 + int.from_bytes(_handshake_bytes(data, start, 4)[1:], "big")
    while needed > 0:
        length = (data[pos + 3] << 8) | data[pos + 4]
        needed -= length
        pos += 5 + length
    return pos


class ServerAnswer(enum.Enum):
    """What a server's first answer to a TLS ClientHello means for what follows it."""

    #: A HelloRetryRequest (RFC 8446 4.1.4): the client's hello again must be judged.
    RETRY = "retry"
    #: A TLS 1.2 (or older) session resumed: OpenSSL serves the name the session was made
    #: for, not the hello's SNI (attack pass, 2026-12-06), so the name is unverifiable.
    RESUMED = "resumed"
    #: A full TLS 1.2 (or older) handshake: the stream is followed record by record both
    #: ways, for a renegotiation, which may name another server (`RecordWatch`).
    FULL = "full"
    #: TLS 1.3, or an alert: nothing more to look at.
    OTHER = "other"
    #: Bytes that are no TLS server's answer (a plaintext server's, which read the hello as
    #: lines: SMTP's `250`; an echo): the stream may still upgrade in band (last re-attack of
    #: attack pass 48: STARTTLS, then a hello naming a denied server).
    PLAIN = "plain"


def server_answer(data: _Received) -> ServerAnswer | None:
    """What a server's first bytes answer a TLS hello with, however its records split them;
    None until that is known. A HelloRetryRequest is told by its random (RFC 8446 4.1.3); a
    resumption below TLS 1.3 by what follows its ServerHello: a change_cipher_spec or a
    NewSessionTicket where a full handshake sends the server's certificate and keys (RFC 5246
    7.3, RFC 5077 3.1)."""
    handshake = bytearray()  # the handshake messages of the records so far
    pos, size, warnings, whole = 0, len(data), 0, -1
    while whole < 0 or len(handshake) < whole:
        if not handshake and pos < size and data[pos] == _ALERT and warnings < _MAX_WARNINGS:
            # (a warning alert before it, as a client's before a hello: read past)
            if size < pos + 7:
                return None
            if data[pos + 3:pos + 6] != b"\x00\x02\x01":
                return ServerAnswer.OTHER
            pos, warnings = pos + 7, warnings + 1
            continue
        if pos < size and data[pos] != _HANDSHAKE:
            return ServerAnswer.OTHER if warnings else ServerAnswer.PLAIN
        if pos + 5 > size:
            return None
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length == 0:
            return ServerAnswer.OTHER  # (RFC 8446 5.1 forbids it: whatever this is, it is over)
        handshake += data[pos + 5:pos + 5 + length]
        pos += 5 + length
        if whole < 0 and len(handshake) >= 4:
            if handshake[0] != _SERVER_HELLO:
                return ServerAnswer.PLAIN
            whole = 4 + int.from_bytes(handshake[1:4], "big")
        if len(handshake) >= _SERVER_HELLO_HEAD and handshake[6:38] == _RETRY_RANDOM:
            return ServerAnswer.RETRY
        if pos > size and (whole < 0 or len(handshake) < whole):
            return None
    if _selects_tls13(bytes(handshake[4:whole])):
        return ServerAnswer.OTHER
    if len(handshake) > whole:  # (more messages in the ServerHello's records)
        following = handshake[whole]
    elif pos >= size:
        return None  # (the rest of its record, or the next record, is to come)
    elif data[pos] == _CHANGE_CIPHER_SPEC:
        return ServerAnswer.RESUMED
    elif data[pos] != _HANDSHAKE:
        return ServerAnswer.OTHER
    elif pos + 6 > size:
        return None
    else:
        following = data[pos + 5]
    return ServerAnswer.RESUMED if following == _NEW_SESSION_TICKET else ServerAnswer.FULL


class RecordWatch:
    """One direction of a TLS 1.2 (or older) stream, record header by record header from its
    first byte: its handshake records after its change_cipher_spec are its Finished, then
    none. One more is a renegotiation (a client's hello, a server's HelloRequest, encrypted),
    in which OpenSSL asks its SNI callback again and a server may serve another virtual host
    on the connection judged by its first hello (attack pass, 2026-12-06); TLS 1.3 has none.

    A server's watch given `bind` reads its handshake records before its change_cipher_spec
    too (`reads`, then `read`: they are in clear) and hands `bind` what would resume the
    session made: the ServerHello's session id and each NewSessionTicket's ticket
    (`session_credential`, `ticket_credential`; `stream.sessions`)."""

    __slots__ = ("_finished", "_bind", "reads", "_header", "_left", "_body")

    def __init__(self, bind: Callable[[bytes], None] | None = None) -> None:
        #: Handshake records since the change_cipher_spec (-1: none came yet).
        self._finished = -1
        self._bind = bind
        #: The record judged last is read (`read`), not only forwarded.
        self.reads = False
        #: The handshake message under way in what was read: its header so far, the bytes of
        #: its body still to come, and what of its body is kept (a ServerHello's or a ticket's).
        self._header = bytearray()
        self._left = 0
        self._body = bytearray()

    def __call__(self, header: bytes | bytearray) -> str:
        """Why the record with this 5-byte `header` must not go ("": it may)."""
        kind = header[0]
        self.reads = False
        if kind not in _RECORD_TYPES:
            return "bytes that are not a TLS record in a TLS 1.2 stream guardd follows"
        if kind == _CHANGE_CIPHER_SPEC:
            if self._finished > 0:
                return _RENEGOTIATION
            self._finished = 0
        elif kind == _HANDSHAKE and self._finished >= 0:
            if self._finished > 0:
                return _RENEGOTIATION
            self._finished = 1
        elif kind == _HANDSHAKE:
            self.reads = self._bind is not None
        return ""

    def read(self, data: bytes | bytearray) -> None:
        """Bytes of the body of a record `reads` said is read: its handshake messages, however
        records split them (a ServerHello's first bytes, to its session id, kept; a ticket's
        message whole: at most 64 KiB, RFC 5077 3.3)."""
        assert self._bind is not None
        pos = 0
        while pos < len(data):
            if not self._left and len(self._header) < 4:
                taken = data[pos:pos + 4 - len(self._header)]
                self._header += taken
                pos += len(taken)
                if len(self._header) == 4:
                    self._left = int.from_bytes(self._header[1:4], "big")
                    self._body.clear()
                    if not self._left:
                        self._message_ended()
                continue
            taken = data[pos:pos + self._left]
            kept = _KEPT_OF.get(self._header[0], 0) - len(self._body)
            if kept > 0:
                self._body += taken[:kept]
            pos += len(taken)
            self._left -= len(taken)
            if not self._left:
                self._message_ended()

    def _message_ended(self) -> None:
        assert self._bind is not None
        kind, body = self._header[0], self._body
        self._header = bytearray()
        if kind == _SERVER_HELLO and len(body) > _SESSION_ID_AT:
            session_id = body[_SESSION_ID_AT + 1:_SESSION_ID_AT + 1 + body[_SESSION_ID_AT]]
            if session_id and len(session_id) == body[_SESSION_ID_AT]:
                self._bind(session_credential(session_id))
        elif kind == _NEW_SESSION_TICKET and len(body) >= 6:
            ticket = body[6:6 + int.from_bytes(body[4:6], "big")]
            if len(ticket) == int.from_bytes(body[4:6], "big") == len(body) - 6 and ticket:
                self._bind(ticket_credential(ticket))

    def skip(self, data: bytes | bytearray) -> tuple[str, int]:
        """Watch the records `data` starts with (forwarded apart): why one must not go, and how
        many bytes of the last one are still to come (-1: `data` ends inside a header)."""
        pos = 0
        while pos < len(data):
            if pos + 5 > len(data):
                return "", -1
            why = self(data[pos:pos + 5])
            if why:
                return why, 0
            end = pos + 5 + ((data[pos + 3] << 8) | data[pos + 4])
            if self.reads:
                self.read(data[pos + 5:end])
            pos = end
        return "", pos - len(data)


#: Where a ServerHello's body has its session id's length (after legacy_version and random).
_SESSION_ID_AT = 2 + 32
#: What of a handshake message's body a server's `RecordWatch` keeps, by type.
_KEPT_OF = {_SERVER_HELLO: _SESSION_ID_AT + 1 + _MAX_SESSION_ID,
            _NEW_SESSION_TICKET: 4 + 2 + 0xFFFF}


def echoed_session(data: _Received) -> bytes:
    """The session a server's first answer (its ServerHello, `server_answer` read whole)
    resumes, as `session_credential` (b"": none)."""
    found = [b""]

    def bind(credential: bytes) -> None:
        if is_session_id(credential):
            found[0] = credential

    RecordWatch(bind).skip(data)
    return found[0]


_RENEGOTIATION = ("a TLS handshake after the handshake (a renegotiation, in which the server may "
                  "serve another name than the hello's)")


def _selects_tls13(hello: bytes) -> bool:
    """Does a ServerHello's body select TLS 1.3 (its supported_versions extension, RFC 8446
    4.2.1)? A body cut short or malformed selects nothing newer than its legacy version."""
    pos = 2 + 32
    if pos >= len(hello):
        return False
    pos += 1 + hello[pos] + 2 + 1  # session id, cipher suite, compression method
    end = min(len(hello), pos + 2 + int.from_bytes(hello[pos:pos + 2], "big"))
    pos += 2
    while pos + 4 <= end:
        kind, length = int.from_bytes(hello[pos:pos + 2], "big"), \
            int.from_bytes(hello[pos + 2:pos + 4], "big")
        if kind == _EXT_SUPPORTED_VERSIONS:
            return hello[pos + 4:pos + 4 + length] == b"\x03\x04"
        pos += 4 + length
    return False


def hello_again(data: _Received, eof: bool = False) -> Sniffed | None:
    """The client's bytes after the server's HelloRetryRequest: its ClientHello again (RFC 8446
    4.1.4), read as `sniff` reads a first one, past the change_cipher_spec (D.4) and the early
    data a server skips before it (4.2.10; at most `_MAX_RECORDS` records, ending within
    `MAX_SNIFF_BYTES`); None until it is whole. Bytes that are not a hello are what `sniff`
    says they are."""
    pos, size = 0, len(data)
    for _ in range(_MAX_RECORDS + 1):
        if pos < size and data[pos] not in _SKIPPED_BEFORE_AGAIN:
            return sniff(data[pos:], eof)
        end = pos + 5 + ((data[pos + 3] << 8) | data[pos + 4]) if pos + 5 <= size else -1
        if end > MAX_SNIFF_BYTES:
            return _tls_unverifiable(f"more than {MAX_SNIFF_BYTES} bytes come before it again")
        if end < 0 or end > size:
            if eof:
                return _tls_unverifiable("the client closed its side before it came again")
            return None
        pos = end
    return _tls_unverifiable(f"more than {_MAX_RECORDS} records come before it again")


def _no_request_line(raw: bytes) -> None:
    """Raise _Unverifiable when a hello's bytes (record headers too) read as a request to a
    lenient HTTP server: one that takes any first word for a method (' HTTP/' anywhere, any
    whitespace, any case), or one that skips the control bytes before its first line, which
    is then a request line (Netty: attack pass, a random that read `DELETE /x X/1.1`)."""
    if _REQUEST_LINE_VERSION in raw.translate(_TO_SPACE).upper():
        raise _Unverifiable("it holds an HTTP request line (' HTTP/'): a lenient HTTP "
                            "server would serve it as a request, and what follows")
    first = raw.lstrip(_SKIPPED)
    end = first.find(b"\n")
    if end != -1 and _request_line(first[:end], first[:end].translate(_TO_SPACE).split()):
        raise _Unverifiable("its first line, past the control bytes a lenient HTTP server "
                            "skips, is a request line: such a server would serve it")


def _tls_unverifiable(problem: str) -> Sniffed:
    return Sniffed(Kind.TLS, sni=UNVERIFIABLE, problem=f"TLS ClientHello: {problem}")


def _handshake_bytes(data: _Received, pos: int, needed: int) -> bytes:
    """The first `needed` handshake bytes of the records from `pos` on (all known present)."""
    parts = []
    while needed > 0:
        length = (data[pos + 3] << 8) | data[pos + 4]
        parts.append(data[pos + 5:pos + 5 + min(length, needed)])
        needed -= length
        pos += 5 + length
    return b"".join(parts)


def _after_warnings(data: _Received, limit: int) -> int:
    """Where the handshake records start, past the warning alerts Go's crypto/tls skips before a
    ClientHello (up to `_MAX_WARNINGS` of them); -1 while an alert is still arriving. Any other
    record before the hello (a fatal alert, change_cipher_spec, application data) raises."""
    pos = 0
    for _ in range(_MAX_WARNINGS + 1):
        if pos >= limit or data[pos] == _HANDSHAKE:
            return pos
        if data[pos] != _ALERT:
            raise _Unverifiable(f"a record of type {data[pos]} comes before it")
        if pos + 7 > limit:
            if pos + 5 <= limit and data[pos + 3:pos + 5] != b"\x00\x02":
                raise _Unverifiable("an alert record of another length than 2 comes before it")
            return -1
        if data[pos + 3:pos + 6] != b"\x00\x02\x01":
            raise _Unverifiable("a fatal or malformed alert comes before it")
        pos += 7
    raise _Unverifiable(f"more than {_MAX_WARNINGS} alerts come before it")


def _incomplete(size: int, eof: bool) -> None:
    """No hello yet: returns while more bytes may complete it, else raises why it never will."""
    if size >= MAX_SNIFF_BYTES:
        raise _Unverifiable(f"not complete within {MAX_SNIFF_BYTES} bytes (split into too many "
                            "records)")
    if eof:
        raise _Unverifiable("the client closed its side before the hello was complete")


def _parse_client_hello(body: bytes) -> Sniffed:
    """ClientHello (RFC 8446 4.1.2) body: skip to the extensions, read SNI, ALPN and ECH."""
    size = len(body)
    pos = 2 + 32  # legacy_version, random
    if pos >= size:
        raise _Unverifiable("it ends inside its random")
    session_id = body[pos]
    if session_id > _MAX_SESSION_ID:
        raise _Unverifiable(f"a session id of {session_id} bytes")
    session = session_credential(body[pos + 1:pos + 1 + session_id])
    pos += 1 + session_id
    if pos + 2 > size:
        raise _Unverifiable("it ends before its cipher suites")
    suites = (body[pos] << 8) | body[pos + 1]
    if suites == 0 or suites & 1:
        raise _Unverifiable(f"a cipher suite list of {suites} bytes")
    pos += 2 + suites
    if pos >= size:
        raise _Unverifiable("it ends before its compression methods")
    compressions = body[pos]
    if compressions == 0:
        raise _Unverifiable("no compression method")
    pos += 1 + compressions
    if pos == size:
        return Sniffed(Kind.TLS, session=session)  # no extensions (SSL 3.0 style): no SNI
    if pos + 2 > size or pos + 2 + ((body[pos] << 8) | body[pos + 1]) != size:
        raise _Unverifiable("its extensions do not end with the message")
    pos += 2
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ech = False
    ticket = b""
    while pos < size:
        if pos + 4 > size:
            raise _Unverifiable("a truncated extension header")
        kind = (body[pos] << 8) | body[pos + 1]
        end = pos + 4 + ((body[pos + 2] << 8) | body[pos + 3])
        if end > size:
            raise _Unverifiable(f"extension {kind:#06x} overruns the message")
        if kind in seen:
            raise _Unverifiable(f"extension {kind:#06x} appears twice")
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            sni = _server_name(body[pos + 4:end])
        elif kind == _EXT_ALPN:
            alpn = _alpn(body[pos + 4:end])
        elif kind in _EXT_ECH:
            ech = True
        elif kind == _EXT_SESSION_TICKET and end > pos + 4:
            ticket = ticket_credential(body[pos + 4:end])
        pos = end
    return Sniffed(Kind.TLS, sni=sni, alpn=alpn, ech=ech, session=session, ticket=ticket)


def session_credential(session_id: bytes | bytearray) -> bytes:
    """What stands for a TLS session id in `stream.sessions` (b"" for an empty one)."""
    return b"s" + session_id if session_id else b""


def is_session_id(credential: bytes) -> bool:
    """Whether a credential stands for a session id (`session_credential`), not a ticket."""
    return credential.startswith(b"s")


def ticket_credential(ticket: bytes | bytearray) -> bytes:
    """What stands for a TLS 1.2 session ticket in `stream.sessions`: its SHA-256 (a ticket
    may be 64 KiB)."""
    return b"t" + hashlib.sha256(ticket).digest()


def _server_name(ext: bytes) -> str | None:
    """server_name (RFC 6066 3): the one host_name, or None if only other name types."""
    size = len(ext)
    if size < 2 or ((ext[0] << 8) | ext[1]) != size - 2 or size == 2:
        raise _Unverifiable("a server_name list whose length is wrong or zero")
    pos = 2
    found: bytes | None = None
    while pos < size:
        if pos + 3 > size:
            raise _Unverifiable("a truncated server_name entry")
        name_type = ext[pos]
        end = pos + 3 + ((ext[pos + 1] << 8) | ext[pos + 2])
        if end > size:
            raise _Unverifiable("a server_name entry overruns its list")
        if name_type == _HOST_NAME:
            if found is not None:  # "MUST NOT contain more than one name of the same type"
                raise _Unverifiable("two host names in server_name")
            found = ext[pos + 3:end]
        pos = end
    if found is None:
        return None
    if found != found.lower():  # (attack pass, 2026-12-06: a hello cannot be rewritten)
        raise _Unverifiable(f"server name {shown(found)} has upper-case letters, and a "
                            "server matching names exactly may not match it to the site of "
                            "the name in lower case (send it in lower case)")
    return _plain_name(found, "server name")


def _alpn(ext: bytes) -> tuple[str, ...]:
    """application_layer_protocol_negotiation (RFC 7301 3.1)."""
    size = len(ext)
    if size < 3 or ((ext[0] << 8) | ext[1]) != size - 2:
        raise _Unverifiable("an ALPN list whose length is wrong or zero")
    names: list[str] = []
    pos = 2
    while pos < size:
        end = pos + 1 + ext[pos]
        if end == pos + 1 or end > size:
            raise _Unverifiable("an empty or overrunning ALPN name")
        names.append(ext[pos + 1:end].decode("ascii", "backslashreplace"))
        pos = end
    return tuple(names)


def _plain_name(raw: bytes, what: str) -> str:
    """A DNS-ish name or IPv4 literal (letters, digits, '-', '_', non-empty labels), lower-case;
    anything else (userinfo, a bare IPv6, non-ASCII, a trailing dot) is unverifiable."""
    name = raw.lower()
    if name.endswith(b"."):
        # (RFC 6066 3 allows none in an SNI; re-attacks: read without it, an SNI or a Host was
        # the connect target's name, and a server matching names exactly, Go's ServeMux, served
        # its default site, which may be another one at the address)
        raise _Unverifiable(f"{what} {shown(raw)} ends in a dot, which a server may not "
                            "match to the site of the name without it (leave the dot out)")
    if not name or name.translate(None, _NAME) or name.startswith(b".") or b".." in name:
        raise _Unverifiable(f"{what} {shown(raw)} is not a plain host name")
    return name.decode("ascii")


# --- HTTP ----------------------------------------------------------------------------------------


def _sniff_http(data: _Received, eof: bool, body: bool = False) -> Sniffed | None:
    """A request head as the most lenient server would read it (see the module docstring);
    `body`: the bytes are a request body's, where a line still open at the cap is said to be
    (`Sniffed.line_open`, for `LineWatch`), and a request line decides at its end.

    A body is read as Netty reads a request, whatever it costs to wait: control bytes before
    the request line skipped, a method trimmed of control bytes, Latin-1 letters in it. A
    connection's first bytes are not: read so, the first message of many protocols (AMQP's
    header, SQL Server's prelogin, Cassandra's OPTIONS, an RDP or SOCKS5 greeting) is the
    start of a request that may yet come, and its client, waiting for the server, would be cut
    at the deadline (an XMPP client's stream opening was, attack pass 50; an LDAP client's
    StartTLS, left open then). There a first word that is no method (`_method_begun`), or a
    line holding a control byte no client writes (`_LINE_CTL`), is other bytes at once
    (hardening.md: what that leaves to a Netty server where no `method` rule applies; and
    `sniff_request`, which reads on the stream after them as other servers read it too)."""
    size = len(data)
    limit = min(size, HTTP_HEAD_CAP)
    window = bytes(data[:limit])  # at most HTTP_HEAD_CAP bytes, as bytes (hashable slices)
    capped = size >= HTTP_HEAD_CAP
    done = capped or eof  # no more bytes will be looked at
    signature = window[:len(_PROXY_V2)]
    if signature and signature == _PROXY_V2[:len(signature)]:
        if len(signature) == len(_PROXY_V2):
            return _proxy_protocol()
        if not done:
            return None  # (its start: more bytes say)
    start = limit - len(window.lstrip(_SKIPPED if body else _SPLIT))  # (empty lines too)
    if start == limit:
        if capped:  # (final attack pass: servers that skip them serve what comes after)
            return _http_unverifiable(None, "", f"nothing but empty lines or control bytes "
                                                f"within {HTTP_HEAD_CAP} bytes")
        return _OTHER if eof else None
    skipped_controls = bool(window[:start].translate(None, _SPLIT))
    if window.startswith(b"PROXY ", start) or not body and window.startswith(b"PROXY", start):
        return _proxy_protocol()  # (gunicorn's: any first line that starts so, attack pass 51)
    line_end = window.find(b"\n", start)  # the request line ends at LF, as readline() ends it
    line = window[start:line_end] if line_end != -1 else window[start:]
    words = line.translate(_TO_SPACE).split()
    if not words:  # (only NBSPs so far: a method to Netty, a space to Python)
        if line_end == -1 and not done:
            return None
        return _LINE_OPEN if body and line_end == -1 and capped else _OTHER  # (re-attack:
        #      8 KiB of NBSPs, then `DELETE /nb HTTP/1.1` and a denied Host: Netty served it)
    method_word = words[0].rstrip(_TRIMMED) if body else words[0]
    if method_word.translate(None, _METHOD_BYTES if body else _PRINTABLE) or not body and (
            not _method_begun(words[0]) or line.translate(None, _LINE_CTL) != line):
        return _OTHER  # no method any server reads, or no line a client writes: binary, or
        #              not one word of text (a body: Netty takes a method of any length)
    if line_end == -1 and capped:
        if body:  # its end decides (`LineWatch`): cut here, a JSON line as `requests` writes
            return _LINE_OPEN  # one was; judged other bytes, a long method Go serves went
        # First bytes, held until judged: Netty does not count the bytes it skipped against
        # its line limit (a line behind 8 KiB of NULs is short), and a longer line is one to a
        # server with a longer limit, where it has a target.
        if len(line.rstrip(b"\r")) <= _NETTY_LINE or len(words) >= 2:
            return _http_unverifiable(words[0].decode("latin-1").upper(), "", "the request "
                                      f"line does not end within {HTTP_HEAD_CAP} bytes")
        return _OTHER  # (one word: the stream read on after other bytes watches its end)
    if line_end == -1 and not done:
        at_cr = _line_to_cr(line) if body else None  # (a body: decided at the line's end)
        if at_cr is None:
            return None
        words = at_cr
    elif body and (at_cr := _line_to_cr(line)) is not None:  # (what a prefix of it read: a
        words = at_cr  # line to a bare CR, as some servers end it; hypothesis found the shown
        #               target of the whole line's reading differ)
    elif (at_cr := _line_to_cr(line)) is not None:  # servers that end lines at a bare CR see
        words = at_cr  #                                 a shorter line (shown: a request there)
    elif not _request_line(line, words):
        return _OTHER
    method = words[0].decode("latin-1").upper()
    if len(words) < 2:  # (final review: one word here, a request line to Netty's splitting;
        #                  the target was read past the end, and the tunnel failed unrecorded)
        return _http_unverifiable(method, "", "a request line only some server reads as one "
                                              "(Netty splits it on other bytes)")
    version = words[-1] if len(words) >= 3 else b""
    target = b" ".join(words[1:-1]) if version else words[1]
    shown = target.decode("latin-1") if len(target) <= MAX_TARGET_CHARS else \
        target[:MAX_TARGET_CHARS - 1].decode("latin-1") + "\u2026"  # (cut: the record says so)
    if body:  # Netty makes a request of the line as soon as it ends: a close before the head's
        #       end hands the application that request, marked failed (what follows must not go)
        return _http_unverifiable(method, shown, _CONTROLS_BEFORE if skipped_controls else
                                  "a request line (a lenient server acts on it before its "
                                  "head ends)")
    head_end = _head_end(window, line_end, eof and not capped)
    if head_end == -1:
        if not capped:
            return None
        return _http_unverifiable(method, shown, f"the head does not end within {HTTP_HEAD_CAP} "
                                                 "bytes")
    try:
        if skipped_controls:
            raise _Unverifiable(_CONTROLS_BEFORE)
        if not _request_words(words):
            raise _Unverifiable("a request line to Netty, whose words Python's http.server "
                                "splits otherwise")
        if words[0].translate(None, _TOKEN):
            raise _Unverifiable(f"the method {method!r} is not an HTTP token")
        _check_request_line(words, version)
        crlf = window.count(b"\r\n", start, head_end)
        if window.count(b"\r", start, head_end) != crlf:
            raise _Unverifiable("a bare CR in the head (some servers end lines there)")
        if crlf and window.count(b"\n", start, head_end) != crlf:
            raise _Unverifiable("CRLF and bare LF line ends mixed (servers end the head at "
                                "different places)")
        block = window[line_end + 1:head_end] if line_end != -1 else b""
        host, port, override = _head_host(block, target, method)
    except _Unverifiable as exc:
        return _http_unverifiable(method, shown, str(exc))
    return Sniffed(Kind.HTTP, method=method, host=host, port=port, target=shown,
                   override=override)


def sniff_request(data: _Received, eof: bool = False, any_method: bool = False
                  ) -> Sniffed | None:
    """`data` read as a request head only, as the most lenient server would read it (what
    `sniff` does with bytes that are no TLS record): for bytes that must not be one (a request
    body's first bytes, `follow`). Kind.OTHER when no server would read a request there; an
    unverifiable Kind.HTTP as soon as a request line ends (at LF, or at a bare CR), not at the
    head's end: Netty acts on the line then. A line still open at the cap is OTHER with
    `line_open`: its end decides (`LineWatch`). With `any_method` (the stream after other
    bytes), a line that is none to Netty is read as gunicorn and cheroot read it too
    (`_any_method_request`: re-attacks of attack pass 49)."""
    verdict = _sniff_http(data, eof, body=True)
    if verdict is not _OTHER or not any_method:
        return verdict
    return _any_method_request(bytes(data[:HTTP_HEAD_CAP]), eof, len(data) >= HTTP_HEAD_CAP)


#: The bytes of a watched line's end kept (its version, if it ends as a request line).
_WATCHED_TAIL = 64
#: What servers take off a request line's end before its version (Netty trims control bytes,
#: Python's split takes 0x85 and 0xA0 for spaces).
_LINE_TRAILER = _SKIPPED + b"\xa0"
#: What some server splits a request line on besides spaces (Netty: HT, VT, FF, CR, and
#: 0x1c-0x1f to its older reading; Python's str.split: 0x85 and 0xA0 too). Taken out, the
#: words left between spaces are words to every server (last re-attack: a VT between spaces,
#: a word split on spaces alone, was none to Netty).
_SOME_SERVERS_SPLIT = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f\x85\xa0"
#: How every server's version ends: `/1.1` (Netty: `\S+/\d+\.\d+`; Python and Go: HTTP/d.d).
_VERSION_END = re.compile(rb"/[0-9]+\.[0-9]+\Z")


#: What bytes.split() splits on and bytes.strip() takes off (gunicorn splits its request line,
#: waitress strips its head and first line).
_BLANKS = b" \t\n\r\x0b\x0c"


def _first_of(part: bytes, at: int, wanted: bytes) -> int:
    """Where the first of the `wanted` bytes is in `part` from `at`, -1 where none is: a scan
    in C for each (a regex's class costs 6 ns a byte; a stream read on is searched at every
    read)."""
    return min((found for found in (part.find(byte, at) for byte in wanted) if found != -1),
               default=-1)


class _LineToCrlf:
    """A line read on to its first CRLF, past the blanks before it (empty lines among them),
    as the servers that end a line there alone read it (`_take`, in the subclasses), keeping
    a few bytes; a bare LF or CR in it is not its end."""

    def __init__(self) -> None:
        self._begun = False  # past the blanks before it
        self._cr = False  # the last byte fed was a CR
        self.ended = False  # its CRLF came

    def feed(self, data: bytes) -> None:
        if self.ended or not self.may():
            return
        if not self._begun:
            data = data.lstrip(_BLANKS)
            self._begun = bool(data)
        end = 0 if self._cr and data[:1] == b"\n" else data.find(b"\r\n")
        self._cr = data[-1:] == b"\r"
        self.ended = end != -1
        self._take(data[:end] if self.ended else data)

    def _take(self, part: bytes) -> None:
        raise NotImplementedError

    def may(self) -> bool:
        """Could the line still be a request line, or is it one, ended?"""
        raise NotImplementedError

    def request(self) -> bool:
        """Did the line end as a request line?"""
        raise NotImplementedError


class _GunicornLine(_LineToCrlf):
    """A line read on as gunicorn 21 reads a request line with its limit off (0: of any
    length, `_any_method_request` within the window): to its CRLF, a bare LF or CR in it
    whitespace, split in three on ASCII whitespace, the method its first three bytes, a
    request when the rest starts `HTTP/` (final attack of attack pass 50: `GET\\x01\\t/`,
    9,000 bytes, `\\tHTTP/1.1\\tx` and a denied Host)."""

    def __init__(self) -> None:
        super().__init__()
        self._pieces = 0  # pieces begun (up to 3: the third is the rest of the line)
        self._in_piece = False
        self._method = b""  # the line's first 3 bytes (a blank in them: a shorter method)
        self._rest = b""  # the third's first 5

    def _take(self, part: bytes) -> None:
        at = 0
        while at < len(part):
            if self._pieces == 3:
                self._rest = (self._rest + part[at:at + 5])[:5]
                return
            if self._in_piece:  # (its end)
                end = _first_of(part, at, _BLANKS)
            else:  # (the next piece's first byte)
                begun = len(part) - len(part[at:].lstrip(_BLANKS))
                end = begun if begun < len(part) else -1
            if self._in_piece and self._pieces == 1:
                self._method = (self._method + part[at:at + 3])[:3]
            if end == -1:
                return
            self._pieces += not self._in_piece
            self._in_piece, at = not self._in_piece, end

    def may(self) -> bool:
        return not self._method.translate(None, _GUNICORN_BYTES) and (
            len(self._method) == 3 or self._pieces < 2 and self._in_piece or
            self._pieces == 0) and b"HTTP/"[:len(self._rest)] == self._rest.upper()

    def request(self) -> bool:
        return self.ended and self._pieces == 3 and _starts_as_version(self._rest) and \
            self.may()


#: A method to waitress: a token without lower case.
_WAITRESS_METHOD = bytes(byte for byte in _TOKEN if not chr(byte).islower())
#: What ends a waitress target's run: a space (a third word) or a CR or LF (the line's end,
#: or inside it), unless only blanks follow to the CRLF.
_WAITRESS_BREAK = b" \r\n"


class _WaitressLine(_LineToCrlf):
    """A first line read on as waitress 3 reads one (`_waitress_request` within the window):
    past the head's leading blanks, to its first CRLF, stripped of blanks at its end (bare LFs
    and CRs too), then an upper-case token method, one space and a target of no space, CR or
    LF (attack pass 51: `G /wg`, a LF, 9,000 more, then the CRLF and a denied Host, was
    served). Keeps a few flags."""

    def __init__(self) -> None:
        super().__init__()
        self._phase = 0  # 0: the method, 1: the target, 2: blanks after it (its end, or none)
        self._target = False  # a byte of the target that is no blank came
        self._may = True

    def _take(self, part: bytes) -> None:
        at = 0
        while at < len(part):
            if self._phase == 0:
                space = part.find(b" ", at)
                if part[at:space if space != -1 else len(part)].translate(None,
                                                                           _WAITRESS_METHOD):
                    self._may = False
                if space == -1 or not self._may:
                    return
                self._phase, at = 1, space + 1
            elif self._phase == 1:
                found = _first_of(part, at, _WAITRESS_BREAK)
                stop = found if found != -1 else len(part)
                self._target = self._target or bool(part[at:stop].translate(None, _BLANKS))
                if found == -1:
                    return
                self._phase, at = 2, stop
            else:  # (anything but blanks now: a third word, or a CR or LF inside the line)
                self._may = not part[at:].translate(None, _BLANKS)
                return

    def may(self) -> bool:
        return self._may

    def request(self) -> bool:
        return self.ended and self._may and self._target


class LineWatch:
    """The rest of a line the lenient reading left open at its cap (`Sniffed.line_open`),
    read as it streams, in C, keeping a few bytes: servers with longer line limits than
    guardd's window (Go's is 1 MiB, Netty's may be set to any) serve it when it ends as a
    request line (re-attacks: a method of 9,000 token bytes, then ` /x HTTP/1.1` and a denied
    Host, served by a default Go server). Its bytes may go meanwhile: no server acts on a line
    before its end (a cut then resets the server's side: a clean close ends a line to
    Python's readline). Words are counted between spaces, of bytes no server splits on (so at
    most as many as any server sees): a fourth is past every server's method, target and
    version (Netty's is the rest of the line, and would have a space in it), so the line is
    none. At its end (LF, the first
    bare CR, or the close), it is one when it ends in a version, or is a two-word `GET`
    (HTTP/0.9). With `any_method` (the stream after other bytes) it is read as cheroot reads
    one too, of any length: stripped, split on its first two spaces, a request when the rest
    starts `HTTP/` (last re-attack of attack pass 49: `int()` takes `HTTP/1.\x0b1`, `1.+1`,
    `1. 1`, which ended no version and had four words here), and as gunicorn and waitress
    read one, on past the others' end to its CRLF (`_GunicornLine`, `_WaitressLine`)."""

    def __init__(self, any_method: bool = False) -> None:
        #: cheroot's reading: spaces past the line's leading whitespace (counted to 2), then
        #: the rest's first bytes (None: not read so).
        self._cheroot: tuple[int, bytes] | None = (-1, b"") if any_method else None
        self._begun = False  # the line's first byte (past what a server skips) came
        self._words = 0  # words begun, as every server sees at least (counted up to 4)
        self._in_word = False
        self._first = b""  # the line's first 4 bytes
        self._tail = b""  # its last `_WATCHED_TAIL` bytes
        self._cr_seen = False
        #: gunicorn's and waitress's readings (their lines go on past a bare LF to a CRLF),
        #: and whether the others' ended.
        self._to_crlf: tuple[_GunicornLine | _WaitressLine, ...] = (
            (_GunicornLine(), _WaitressLine()) if any_method else ())
        self._others_ended = False

    def feed(self, data: bytes | bytearray, end: bool = False) -> bool | None:
        """The line's next bytes (the first call: all of them from where the lenient reading
        began); `end`: the client closed, or the body ended. True: the line ended as a request
        line (none of `data` may go); False: it never can be one (stop watching); None: open."""
        others = False if self._others_ended else self._others(data, end)
        self._others_ended = others is not None
        if others or not self._to_crlf:
            return others
        part = bytes(data)
        still = False  # (neither reads a line the close ends)
        for view in self._to_crlf:
            view.feed(part)
            if view.request():
                return True
            still = still or view.may() and not view.ended and not end
        return None if still else others

    def _others(self, data: bytes | bytearray, end: bool) -> bool | None:
        """`feed`, as the servers but gunicorn and waitress read the line."""
        if self._cheroot is not None:
            line = bytes(data)
            if self._cheroot[0] < 0 and line.startswith(b"\r\n"):  # (the one empty line
                line = line[2:]  #                                     cheroot skips)
            lf = line.find(b"\n")
            self._cheroot_take(line[:lf] if lf != -1 else line)
        if not self._begun:
            data = bytes(data).lstrip(_SKIPPED)
            self._begun = bool(data)
        at = data.find(b"\n")
        if not self._cr_seen and b"\r" in data[:at if at != -1 else len(data)]:
            self._cr_seen = True  # (a server that ends lines at a bare CR ends this one there)
            cr = data.find(b"\r")
            if self._take(data[:cr]) and self._request():
                return True
            data, at = data[cr:], (at - cr if at != -1 else -1)
        if not self._take(data[:at] if at != -1 else data) and not self._cheroot_may():
            return False
        if at != -1 or end:
            return self._request()
        return None

    def _cheroot_take(self, part: bytes) -> None:
        """Read `part` of the line as cheroot splits it (`_cheroot`)."""
        assert self._cheroot is not None
        spaces, rest = self._cheroot
        if spaces < 0:  # (its leading whitespace, stripped)
            part = part.lstrip(_BLANKS)
            if not part:
                return
            spaces = 0
        at = 0
        while spaces < 2:
            found = part.find(b" ", at)
            if found == -1:
                self._cheroot = (spaces, rest)
                return
            spaces, at = spaces + 1, found + 1
        self._cheroot = (spaces, (rest + part[at:at + 5])[:5])

    def _cheroot_may(self) -> bool:
        """Could the line still be a request to cheroot?"""
        return self._cheroot is not None and (
            self._cheroot[0] < 2 or self._cheroot[1].upper() == b"HTTP/"[:len(self._cheroot[1])])

    def _take(self, part: bytes | bytearray) -> bool:
        """Count `part`'s words; False once they are more than a request line has."""
        if part:
            part = bytes(part)
            if len(self._first) < 4:  # (past what Python splits on: its HTTP/0.9)
                self._first = (self._first + (part if self._first else
                                              part.lstrip(_SPLIT))[:4])[:4]
            spaced = part.translate(None, _SOME_SERVERS_SPLIT)  # (at most 5 pieces: a run
            words = spaced.split(None, 4)  # of spaces costs no list of them)
            if spaced:
                self._words += len(words) - (self._in_word and spaced[:1] != b" ")
                self._in_word = spaced[-1:] != b" "
            self._tail = (self._tail + part[-_WATCHED_TAIL:])[-_WATCHED_TAIL:]
        return self._words <= 3

    def _request(self) -> bool:
        """Is the line, ended, a request line to some server?"""
        if self._cheroot is not None and self._cheroot[0] == 2 and \
                self._cheroot[1].upper() == b"HTTP/":
            return True
        end = self._tail.rstrip(_LINE_TRAILER)
        if _VERSION_END.search(end) or (len(self._tail) == _WATCHED_TAIL and  # (digits past
                                        not end.strip(b"0123456789.")):      # the tail)
            return True
        return self._words <= 2 and self._first[:3] == b"GET" and self._first[3:4] in _SPLIT


class LenientReading:
    """Bytes that must not be a request to a lenient server (a request body's opening, the
    client's stream after other bytes), fed as they come: read as `sniff_request` reads them
    until it decides, and a line still open at its cap read on to its end (`LineWatch`).
    `feed` says True when they are a request after all (`why` says how; none of the bytes
    just fed may go), False when they never can be one (stop reading), None while undecided;
    `line_open`: undecided, but what came so far may go (no server acts on a line before its
    end). A line that is no request line ends it: no server reads a request after one (an
    attack pass modelled Netty as skipping a line of one or two words, `x\r\nDELETE ...`; its
    `initialLine.length < 3` skip never runs, since its split always gives three strings, so
    the empty version fails the message and Netty discards what follows; the others answer
    400)."""

    def __init__(self, any_method: bool = False) -> None:
        self.why = ""
        #: The client's stream after other bytes: read as servers that take any method read
        #: it too (`sniff_request`); not a body, which only Netty reads as a request.
        self.any_method = any_method
        self._seen = bytearray()  # (until a line is watched)
        self._line: LineWatch | None = None
        #: No verdict yet: the bytes may still make a request.
        self.undecided = True

    @property
    def line_open(self) -> bool:
        return self._line is not None

    def feed(self, data: bytes | bytearray, end: bool = False) -> bool | None:
        """The next bytes; `end`: there are no more (the client closed, the body ended)."""
        verdict = self._read(data, end)
        self.undecided = verdict is None
        return verdict

    def _read(self, data: bytes | bytearray, end: bool) -> bool | None:
        if self._line is None:
            self._seen += data
            verdict = sniff_request(self._seen, eof=end, any_method=self.any_method)
            if verdict is None:
                return None
            if not verdict.line_open:
                if verdict.kind is Kind.HTTP or verdict.problem:
                    self.why = (f"{verdict.method or 'unreadable'} {verdict.target or ''}: "
                                f"{verdict.problem}")
                    return True
                return False
            self._line, data, self._seen = LineWatch(self.any_method), self._seen, bytearray()
        ended = self._line.feed(data, end=end)
        if ended:
            self.why = ("a line longer than guardd's window that ends as a request line: "
                        "servers with longer line limits (Go's, waitress's, a Netty's, a "
                        "gunicorn's without one) serve it")
        return ended


#: The bytes of a body's open line kept to read its last words at its end (`BodyLines`):
#: Netty's default limit on a request line, and room for its end. A longer line is read as
#: though words came before.
_BODY_LINE_TAIL = 4096 + 64


def _byte_class(members: bytes, negated: bool = False) -> bytes:
    """A regex character class of the bytes `members` (or of every other byte)."""
    return b"[" + (b"^" if negated else b"") + b"".join(b"\\x%02x" % byte for byte in members) \
        + b"]"


#: What a server trims after a request line's version, but its LF.
_TRAILER = _byte_class(_LINE_TRAILER.replace(b"\n", b""))
#: Where a body line may end as a request line: a version, what a server trims, the LF.
_VERSION_THEN_LF = re.compile(rb"/[0-9]+\.[0-9]+%s*\n" % _TRAILER)


def _request_line_ends(splits: tuple[bytes, ...]) -> re.Pattern[bytes]:
    """Where, in a body's text reversed, a line ends that `_ends_as_request_line` may read as a
    request line split on the bytes of one of `splits` (each with LF): a line over
    `_BODY_LINE_TAIL` bytes (read as cut, its words not counted), or one that ends in a version
    (`_VERSION_THEN_LF`, reversed) with a byte before the slash that the trim leaves (a word to
    `_NETTY_VERSION`) and two more words. Linear, a C loop a byte for the most part: every
    quantifier is possessive (the re-attack: a lazy one cost 7 steps a byte, 4.8 ms a part of
    `a\\x01...\\x01/1.1` lines)."""
    words = []
    for separators in splits:
        word = _byte_class(separators, negated=True)
        trimmed = _byte_class(bytes(byte for byte in _TRIMMED if byte not in separators))
        kept = _byte_class(separators + _TRIMMED, negated=True)
        between = _byte_class(separators.replace(b"\n", b""))
        words.append(rb"(?=%s*+%s)%s*+(?:%s++%s++){2}" % (trimmed, kept, word, between, word))
    return re.compile(rb"\n(?:(?=[^\n]{%d})|%s*+[0-9]++\.[0-9]++/(?:%s))"
                      % (_BODY_LINE_TAIL + 1, _TRAILER, b"|".join(words)))


#: `_request_line_ends` of `_ends_as_request_line`'s splits (session 61's attack: each line
#: that ended in a version was read in Python, 1 us a line; 64 KiB of `/1.1\n` held the loop
#: for 13 ms a part, and 8 uploads of them took another client's GET to 566 ms).
_REQUEST_LINE_END = _request_line_ends(tuple(separators + b"\n" for separators in (
    _SPLIT, _JAVA_SPACE, _PATCHED_NETTY_SPACE)))


class BodyLines:
    """A request body's lines as the bytes that go to the server carry them (framing and all),
    fed as they go: none may end as a request line does (`<method> <target> <version>`, the
    method any word's end). Netty's HttpObjectAggregator, its size limit passed in the middle
    of a body, answers 413, resets its decoder and reads the bytes it holds after the part
    that passed it as the next request, skipping control bytes (attack pass 48: DELETEs behind
    12,000 NULs in an allowed GET's chunked body, to a denied Host). Where that part ends is
    the attacker's to arrange (its size, its chunks, guardd's sends), so any line's end counts.
    Keeps the open line's last `_BODY_LINE_TAIL` bytes."""

    def __init__(self) -> None:
        self._open = b""  # the open line (its end)
        self._cut = False  # bytes of it before `_open` were let go

    def feed(self, data: bytes, end: bool = False) -> bool:
        """The body's next bytes (`end`: its last); True when a line of them ends as a
        request line (none of `data` may go)."""
        text = self._open + data
        first = text.find(b"\n") + 1  # (the first line may be cut: read whole, as it was)
        if first and _VERSION_THEN_LF.search(text, 0, first) and \
                _ends_as_request_line(text[:first], self._cut):
            return True
        for found in _REQUEST_LINE_END.finditer(text[first:][::-1]):  # (each a line that may
            after = len(text) - found.start()                           # be one, read whole)
            if _ends_as_request_line(text[text.rfind(b"\n", 0, after - 1) + 1:after], False):
                return True
        start = text.rfind(b"\n") + 1
        self._cut = (self._cut and start == 0) or len(text) - start > _BODY_LINE_TAIL
        self._open = text[max(start, len(text) - _BODY_LINE_TAIL):]
        return end and _ends_as_request_line(self._open, self._cut)


def _ends_as_request_line(line: bytes, cut: bool) -> bool:
    """Could a server that began to read anywhere in `line` (`cut`: its start is gone, and may
    have held words) read a request line: two words, then a version (Netty's `\\S+/d+.d+`, once
    trimmed; Python's and Go's too), split as any server splits?"""
    line = line.rstrip(_LINE_TRAILER)
    cut = cut or len(line) > _BODY_LINE_TAIL
    line = line[-_BODY_LINE_TAIL:]
    for split in (_TO_SPACE, *_JAVA_SPLITS):  # (Python's, and both of Netty's: re-attack,
        words = line.translate(split).split()  # `X\xa0/1.1` is a version to Java's \S)
        if words and (len(words) >= 3 or cut) and \
                _NETTY_VERSION.fullmatch(words[-1].strip(_TRIMMED)) is not None:
            return True
    return False


def _request_line(line: bytes, words: list[bytes]) -> bool:
    """Could a server take `line` (split into `words`) for a request line: as `_request_words`
    says, or as Netty 4.1 reads one (a method, a target, and the rest of the line a version as
    Java's `(\\S+)/(\\d+)\\.(\\d+)` reads one, once trimmed: second attack pass, `\x80/1.1`)?"""
    if _request_words(words):
        return True
    for split in _JAVA_SPLITS:
        two = _TWO_WORDS.match(line.translate(split))
        if two is not None and _NETTY_VERSION.fullmatch(
                line[two.end():].rstrip(_JAVA_SPACE).strip(_TRIMMED)) is not None:
            return True
    return False


def _line_to_cr(line: bytes) -> list[bytes] | None:
    """The words of `line` to a server that ends lines at a bare CR, when they are a request
    line there."""
    if b"\r" not in line:
        return None
    cut = line[:line.find(b"\r")]
    words = cut.translate(_TO_SPACE).split()
    return words if words and _request_line(cut, words) else None


def _any_method_request(window: bytes, eof: bool, capped: bool) -> Sniffed | None:
    """The first line of the client's stream after other bytes, read as servers that take
    what Netty refuses read one: gunicorn 21 (past empty CRLF lines, to its CRLF, a bare LF in
    it a space, split on ASCII whitespace, a method its first three bytes) and cheroot (past
    one empty line, to an LF a CR must precede, stripped of ASCII whitespace, split on spaces,
    any method). A request when the rest after the target starts as a version (re-attacks of
    attack pass 49: `GET\x80 /x HTTP/1.1`, `GET\x80 /x\nHTTP/1.1`, `GET /d\x1cy HTTP/1.1 x`,
    `\x00 /x HTTP/1.1`). Decided once neither can still make one (or the line ends): its bytes
    may go meanwhile, no server acts on a line before it ends."""
    undecided = False
    for empty_lines, line_end, split in ((_HTTP_HEAD_LINES, b"\r\n", None), (1, b"\n", b" ")):
        start = 0
        while empty_lines > start // 2 and window.startswith(b"\r\n", start):
            start += 2
        end = window.find(line_end, start)
        if split is not None and end != -1 and window[end - 1:end] != b"\r":
            continue  # (cheroot refuses a line a bare LF ends)
        ended = end != -1 or eof
        line = window[start:end] if end != -1 else window[start:]
        pieces = line.strip().split(split, 2)
        if split is None and pieces and _GUNICORN_METHOD.match(pieces[0]) is None:
            continue  # (no method to gunicorn)
        if len(pieces) == 3 and _starts_as_version(pieces[2]):
            return _http_unverifiable(
                pieces[0].decode("latin-1").upper(), pieces[1][:MAX_TARGET_CHARS].decode(
                    "latin-1"), "a request line to a server that takes a method or separators "
                "Netty does not (gunicorn 21, cheroot)")
        undecided = undecided or not ended and (
            len(pieces) < 3 or b"HTTP/".startswith(pieces[2][:5].upper()))
    waitress = _waitress_request(window, eof, capped)
    if waitress is not None and waitress.kind is Kind.HTTP:
        return waitress
    return (_LINE_OPEN if capped else None) if undecided or waitress is None else _OTHER


def _waitress_request(window: bytes, eof: bool, capped: bool) -> Sniffed | None:
    """The stream read as waitress 3 reads a request: a head to the first empty line (CRLFs),
    stripped of whitespace (a head of none is skipped), its first line, stripped, a token
    method without lower case, one space and a target, no version (HTTP/1.0 to it), then
    header lines (token names; a line that begins with a blank folds into the one before);
    at the head's end it serves the request (re-attacks of attack pass 50: `DELETE /x` and a
    denied Host through an allowed tunnel, then with a blank after the target, before the
    method, or a folded header line). Decided when a line is no such line or the head ends
    (a request); a head past the window is one (waitress reads 256 KiB of it)."""
    head_end = window.find(b"\r\n\r\n")
    head = (window[:head_end] if head_end != -1 else window).lstrip()
    while not head and head_end != -1:  # (an empty head: waitress skips it)
        window = window[head_end + 4:]
        head_end = window.find(b"\r\n\r\n")
        head = (window[:head_end] if head_end != -1 else window).lstrip()
    first_end = head.find(b"\r\n")
    more = first_end != -1  # (header lines follow, or begin)
    first = (head[:first_end] if more else head).rstrip()  # (stripped first: a bare LF at its
    words = first.split(b" ")  #                              end is a blank, re-attack)
    if words[0].translate(None, _WAITRESS_METHOD) or len(words) > 2 or (
            more or head_end != -1) and not (len(words) == 2 and all(words)) or \
            b"\r" in first or b"\n" in first:
        return _OTHER
    if more and not _waitress_fields(head, first_end, ended=head_end != -1):
        return _OTHER  # (no header line: waitress answers 400)
    if head_end != -1:
        return _http_unverifiable(words[0].decode("latin-1"), words[1][:MAX_TARGET_CHARS]
                                  .decode("latin-1"), "a request line without a version, "
                                  "which waitress serves with the head after it")
    if capped and more:
        return _http_unverifiable(words[0].decode("latin-1"), "", "a request line without a "
                                  f"version whose head does not end within {HTTP_HEAD_CAP} "
                                  "bytes (waitress reads more)")
    return _OTHER if eof else None  # (the first line open at the cap: `LineWatch` reads it on)


#: A header line to waitress, each after its CRLF: a token name and a colon, or a blank first
#: (folded into the one before); and the start of one, its end still to come.
_WAITRESS_FIELD = rb"[ \t][^\r\n]*|[%s]+:[^\r\n]*" % re.escape(_TOKEN)
_WAITRESS_FIELDS = re.compile(rb"(?:\r\n(?:%s))*" % _WAITRESS_FIELD)
_WAITRESS_FIELD_BEGUN = re.compile(rb"[ \t][^\r\n]*|[%s]*(?::[^\r\n]*)?" % re.escape(_TOKEN))


def _waitress_fields(head: bytes, first_end: int, ended: bool) -> bool:
    """Are the lines of `head` after its first (which ends at `first_end`) header lines to
    waitress (`ended`: the head ended; else its last line may still be one, a CR at its end
    its end's)? Matched in C: a Python loop over the lines ran again at every read (attack
    pass 51: 2,700 folded lines sent a byte at a time cost 6.8 s of CPU)."""
    if head[first_end + 2:first_end + 3] in (b" ", b"\t"):
        return False  # (the first header line cannot fold)
    fields = _WAITRESS_FIELDS.match(head, first_end)
    assert fields is not None  # (it matches none of them, at least)
    matched = fields.end()
    if ended:
        return matched == len(head)
    last = head.rfind(b"\r\n") + 2  # (where the line still open begins)
    return matched >= last - 2 and _WAITRESS_FIELD_BEGUN.fullmatch(
        head, last, len(head) - head.endswith(b"\r")) is not None


#: Empty lines gunicorn skips before a request line (all, in a head's room); cheroot skips one.
_HTTP_HEAD_LINES = HTTP_HEAD_CAP // 2
#: What gunicorn 21 takes for a method: its first three bytes (`METH_RE`, `[A-Z0-9$-_.]`,
#: whose `$-_` is a range).
_GUNICORN_BYTES = bytes(range(0x24, 0x60))
_GUNICORN_METHOD = re.compile(b"[%s]{3}" % re.escape(_GUNICORN_BYTES))


def _method_begun(word: bytes) -> bool:
    """Could first bytes' first word (printable, so far) be a method: a token, which a client
    library may write, or, of at most `_MAX_METHOD` bytes, one gunicorn 21 takes (by its first
    three bytes)? Only then do the bytes wait for more; else they are other bytes at once, and
    the stream's reading after other bytes (`LenientReading`) reads them on, as the lenient
    servers read them, to cut a request (attack pass 50: an XMPP client's stream opening,
    `<?xml version='1.0'?><stream:stream ...>`, waited for a line end that never came while
    the client waited for its server, and was cut at the deadline). gunicorn's are held, so
    that a request line in them is judged, a 403 that says why, not a cut (its re-attack:
    `GET@\t/`, 9,000 bytes, `\tHTTP/1.1\tx` and a denied Host were served by a gunicorn
    whose line limit is off, which that reading models since: `_GunicornLine`)."""
    return not word.translate(None, _TOKEN) or len(word) <= _MAX_METHOD and \
        not word[:3].translate(None, _GUNICORN_BYTES)


def _starts_as_version(word: bytes) -> bool:
    """Does `word` start as an HTTP version does (`HTTP/`, any case)?"""
    return word[:5].upper() == b"HTTP/"


def _request_words(words: list[bytes]) -> bool:
    """Could a server take these words for a request line: METHOD TARGET... HTTP/x (any
    PROTOCOL/digit to Netty), or the HTTP/0.9 `GET /path`? A third word `HTTP/...` makes one,
    whatever follows it (attack pass 49: gunicorn 21 and cheroot take the rest of the line
    after the target for the version, and serve `GET / HTTP/1.1 x`, `GET / HTTP/1. 1`)."""
    return (len(words) >= 3 and (_starts_as_version(words[2]) or _starts_as_version(words[-1]) or
                                 _ANY_VERSION.match(words[-1]) is not None)) or (
        len(words) == 2 and words[0] == b"GET")  # (Python's, its case exact: memcached's `get`)


def _head_end(window: bytes, line_end: int, eof: bool) -> int:
    """Where the head ends (just past its empty line), the end of the bytes when the client
    closed (`eof`), or -1 while it may still go on."""
    if line_end != -1:
        crlf = window.find(b"\n\r\n", line_end)
        bare = window.find(b"\n\n", line_end)
        if crlf != -1 and (bare == -1 or crlf < bare):
            return crlf + 3
        if bare != -1:
            return bare + 2
    return len(window) if eof else -1


#: What a PROXY protocol version 2 header starts with (v1's: "PROXY ", and to gunicorn 21 any line
#: that starts "PROXY", split as Python splits: attack pass 51, `PROXY\tTCP4 ...`).
_PROXY_V2 = b"\r\n\r\n\x00\r\nQUIT\n"


def _proxy_protocol() -> Sniffed:
    """A PROXY protocol header: a server that takes one would tell itself another client's
    address and serve what follows it, which guardd does not read as the request (attack
    pass): unverifiable."""
    return _http_unverifiable("PROXY", "", "a PROXY protocol header (it tells the server "
                                           "another client's address, and the request after it "
                                           "goes unread)")


def _http_unverifiable(method: str | None, target: str, problem: str) -> Sniffed:
    return Sniffed(Kind.HTTP, method=method, host=UNVERIFIABLE, target=target,
                   problem=f"HTTP request: {problem}")


def _check_request_line(words: list[bytes], version: bytes) -> None:
    """A request line whose Host strict and lenient servers would read alike: three words, an
    HTTP/0.x or 1.x version (one with control bytes never gets here: other bytes). Raises
    _Unverifiable otherwise."""
    if len(words) > 3:
        raise _Unverifiable("words after the version (a server may take the rest of the line "
                            "for it)" if _starts_as_version(words[2]) else
                            "whitespace inside the request-target")
    if not version:
        return  # HTTP/0.9 "GET /path": no version, the head still follows
    major, dot, minor = version[5:].partition(b".")
    if version[:5].upper() != b"HTTP/" or not (
            dot and major and minor and not (major + minor).translate(None, _DIGITS)):
        raise _Unverifiable(f"version {version[:16].decode('latin-1')!r} is not HTTP/x.y")
    if major.lstrip(b"0") not in (b"", b"1"):  # (not int(): over 4,300 digits it raises)
        raise _Unverifiable(f"{version[:16].decode('latin-1')} without TLS: its authority is "
                            "inside frames guardd does not read")


#: Headers that web frameworks (Express's method-override, Symfony, Rails' Rack, Google's APIs)
#: take for the method, over the request line's.
_METHOD_OVERRIDES = frozenset(OVERRIDE_HEADERS)
#: Header name bytes read as "-" (every one that is no letter or digit).
_NAME_SEPARATORS = bytes(byte if bytes([byte]).isalnum() else ord("-") for byte in range(256))
#: The query parameters frameworks take for the method (Symfony, Laravel, Express's
#: method-override: `_method`; the others `body_method.OVERRIDE_FIELDS` lists), decoded.
_QUERY_METHODS = frozenset({b"_method", *OVERRIDE_FIELDS})
#: A plain `method` parameter counts as Restlet's tunnel service reads it: in a POST's query,
#: or OPTIONS in any's (session 60's last attack: `GET ?method=search` read as a SEARCH), when
#: it names one of these (the IANA registry's methods): else it is an API's own word
#: (`method=flickr.photos.search`).
_QUERY_METHOD_WORD = b"method"
_REGISTERED_METHODS = frozenset(
    b"ACL BASELINE-CONTROL BIND CHECKIN CHECKOUT CONNECT COPY DELETE GET HEAD LABEL LINK LOCK "
    b"MERGE MKACTIVITY MKCALENDAR MKCOL MKREDIRECTREF MKWORKSPACE MOVE OPTIONS ORDERPATCH PATCH "
    b"POST PRI PROPFIND PROPPATCH PUT QUERY REBIND REPORT SEARCH TRACE UNBIND UNCHECKOUT UNLINK "
    b"UNLOCK UPDATE UPDATEREDIRECTREF VERSION-CONTROL".split())
#: How a query parameter's name that is one of them once decoded ends (`_methods_in_query`;
#: one that ends in another escape is read as a form body is).
_METHOD_ENDS = (b"d", b"D", b"%64", b"%44", b"e", b"E", b"%65", b"%45", b"_", b"%5f", b"%5F")
#: What PHP reads as "_" in a parameter's name.
_PHP_NAME = bytes.maketrans(b" .[", b"___")
#: Headers that frameworks take for the host, over Host, when they trust a proxy (X-Forwarded-Host:
#: Express, Django; X-Original-Host: IIS and ASP.NET; the others, as lists of hosts too).
_HOST_OVERRIDES = frozenset({b"x-forwarded-host", b"x-host", b"x-original-host",
                             b"x-forwarded-server", b"x-http-host-override"})
#: The host parameter of a `Forwarded` header (RFC 7239), quoted or not, as the laxest
#: framework finds it: anywhere in the value (attack pass 29: Spring, Reactor Netty and Vert.x
#: search for `host="?([^;,"]+)`, so `xhost=` and `"host=` name a host to them), up to `;`, `,`
#: or a quote, spaces and all (stripped at the ends by `_head_host`).
_FORWARDED_HOST = re.compile(rb'(?i)host\s*=\s*"?([^";,]*)')


def _head_host(block: bytes, target: bytes, method: str
               ) -> tuple[str | None, int | None, str | None]:
    """(host, port) the request names, from Host header lines and the request-target, and the
    other method an override header names (None: none)."""
    values: set[bytes] = set()
    overrides: set[bytes] = set()
    forwarded: set[bytes] = set()  # hosts that `_HOST_OVERRIDES` and Forwarded name
    cookies: list[bytes] = []  # (read at once: read a line at a time, 800 lines of `Cookie:%`
    #                           cost 18 ms a head, session 60's last attack)
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue  # only the terminator's empty line can be empty here
        if line[0] in b" \t":  # obs-fold (RFC 9112 5.2): servers join, drop or reject it
            raise _Unverifiable("a header line starts with whitespace (obs-fold)")
        colon = line.find(b":")
        if colon == -1:
            continue
        # (CGI and WSGI servers read "_" in a name as "-", PHP "." too: X_HTTP_Method_Override
        # and X.HTTP.Method.Override are X-HTTP-Method-Override)
        name = field_name(line[:colon])
        if name == b"host":
            values.add(line[colon + 1:].strip(b" \t"))
        elif name in _METHOD_OVERRIDES:
            overrides.add(line[colon + 1:].strip(_SPLIT).upper())
        elif name == b"cookie":  # (PHP's `$_REQUEST` holds cookies, over the query and the
            cookies.append(line[colon + 1:])  # form: session 60's attack)
        elif name in _HOST_OVERRIDES:
            forwarded.update(value.strip(b" \t") for value in line[colon + 1:].split(b","))
        elif name == b"forwarded":
            forwarded.update(found.group(1).strip(b" \t") for found in
                             _FORWARDED_HOST.finditer(line[colon + 1:]))
    if len(values) > 1:
        raise _Unverifiable("two different Host headers")
    overrides.update(_query_methods(target, method))
    if cookies:
        overrides.update(_methods_in_query(b";".join(cookies)))
    overrides -= {method.encode(), b""}
    if len(overrides) > 1 or (overrides and next(iter(overrides)).translate(None, _TOKEN)):
        raise _Unverifiable("method override headers that name more than one method, or not a "
                            "method")
    override = overrides.pop().decode("ascii") if overrides else None
    header = _authority(next(iter(values)), "Host") if values else (None, None)
    named = _target_authority(target, method)
    if named is None:
        host, port = header
    else:
        host, given, default = named
        port = given if given is not None else default
        if values and (header[0] != host or (header[1] if header[1] is not None else
                                             default or port) != port):
            # (a Host without port stands for the scheme's default)
            raise _Unverifiable("the request-target names another host or port than the Host "
                                "header")
    if any(_authority(value, "X-Forwarded-Host")[0] != host for value in forwarded):
        raise _Unverifiable("X-Forwarded-Host, Forwarded or another host override header names "
                            "another host than Host (frameworks that trust them serve that host)")
    return host, port, override


def field_name(raw: bytes) -> bytes:
    """A header field's name as the laxest server reads it: trimmed, any case, every byte but
    a letter or digit as `-` (CGI, WSGI and Rack servers read `_` as `-`, nginx and PHP `.`)."""
    return raw.strip(_SPLIT).lower().translate(_NAME_SEPARATORS)


def _query_methods(target: bytes, method: str) -> set[bytes]:
    """The methods a `_method` query parameter of `target` names, upper-cased, and
    `ANY_METHOD` when another parameter may name one in a spelling the body's reader reads
    (review: PHP ends a name at a NUL, qs drops leading brackets: `?_method%00=DELETE`,
    `?[_method]=DELETE`). Read with any `#` and what follows it, as Go keeps them in the query,
    and without, as Node's url.parse drops them (attack pass 48: `?_method=DELETE#x` was
    judged as `DELETE#X`, and Express's method-override served a DELETE)."""
    query = target.partition(b"?")[2]
    cut = query.partition(b"#")[0]
    return _methods_in_query(query, method) | (
        _methods_in_query(cut, method) if cut != query else set())


def _methods_in_query(query: bytes, method: str | None = None) -> set[bytes]:
    """`_query_methods` of one reading of a query (of a request of `method`; None: a cookie's
    pairs, which no one reads a plain `method` from)."""
    if b"method" not in query.lower() and b"%" not in query:
        return set()
    named: set[bytes] = set()
    rest = []  # the pairs that are not a plain `_method`, read as a form body is
    for pair in query.replace(b";", b"&").split(b"&"):
        name, _, value = pair.partition(b"=")
        # (decoding never makes a name longer, nor changes what it ends in but by an escape:
        # another is never `_method`, and is not read, a function's call each: session 58's
        # re-attack, a query of 3,800 `%&` pairs cost 8 ms a head)
        decoded = _query_name(name) if len(name) >= len(_QUERY_METHOD_WORD) and \
            name.endswith(_METHOD_ENDS) else b""
        if decoded in _QUERY_METHODS:
            named.add(_method_named(value))
            continue
        if decoded == _QUERY_METHOD_WORD and method is not None:
            word = _method_named(value)
            if word in _REGISTERED_METHODS and (method == "POST" or word == b"OPTIONS"):
                named.add(word)
        rest.append(pair)
    scan = BodyMethodScan([b"application/x-www-form-urlencoded"], [])
    scan.feed(b"&".join(rest))  # (fourth review: a plain one first hid `_method%00=DELETE`)
    scan.feed(b"")
    if scan.found:
        named.add(ANY_METHOD.encode())
    return named


def _method_named(value: bytes) -> bytes:
    """The method a query parameter's `value` names, decoded (`form_decoded`), upper-cased."""
    return form_decoded(value.lower()).strip(_SPLIT).upper()


def _query_name(raw: bytes) -> bytes:
    """A query parameter's name as PHP reads it (the laxest): decoded (`form_decoded`),
    leading spaces dropped, spaces, dots and an opening bracket read as `_`, lower-cased."""
    name = form_decoded(raw.lower()).lstrip(b" ")
    return name.translate(_PHP_NAME).lower()


#: IIS's `%uXXXX` spelling of a character.
_IIS_PERCENT_U = re.compile(rb"%u([0-9a-f]{4})", re.IGNORECASE)
#: Overlong UTF-8 for an ASCII character (two to six bytes for one, a two-byte one whatever its
#: second byte's top bits, as old IIS read it), which a lenient decoder reads as the character.
_OVERLONG = re.compile(rb"([\xc0\xc1][\x00-\xff]|\xe0[\x80\x81][\x80-\xbf]"
                       rb"|\xf0\x80[\x80\x81][\x80-\xbf]|\xf8\x80\x80[\x80\x81][\x80-\xbf]"
                       rb"|\xfc\x80\x80\x80[\x80\x81][\x80-\xbf])", re.DOTALL)
#: The encoded separators a parser that splits a path before it decodes its segments leaves
#: as they are: a slash and a backslash, a slash, or a backslash (`_readings`).
_KEPT_SEPARATORS = (re.compile(rb"(%2[fF]|%5[cC])"), re.compile(rb"(%2[fF])"),
                    re.compile(rb"(%5[cC])"))
#: How many times over a path is decoded (`%252e` is `%2e` to a server that decodes twice, a
#: dot to one that decodes again); a path that still decodes further is unverifiable.
_MOST_DECODINGS = 4
#: Bytes of readings of a path (decoded, its dot segments removed, both, each way a parser
#: splits it) before it is unverifiable: what no honest path comes near, and a bound on what
#: an adversarial one costs (review: 32 readings of an 8 KiB path took 60 ms).
_MOST_READ_BYTES = 256 * 1024
#: What decoding one piece between kept separators costs besides its bytes, in bytes of
#: readings (`_decoded_but`: a call's own cost, about 150 bytes' worth; session 58's attack:
#: an 8 KiB path of `%u25%2525%2f%u` made 4,585 of them, 15 to 29 ms a head, when only bytes
#: were counted).
_DECODE_COST = 150
#: And of each segment of a reading, its dot segments removed (`_dots_removed`: a step of a
#: loop in Python each; session 58's review: 34,000 of them in one 8 KiB path, 12 ms).
_SEGMENT_COST = 8
#: And of each piece looked up again (`_Budget.decoded`: its review, 4.9 ms for an 8 KiB path
#: of `%2525%2f`, the same pieces again and again, read in full).
_PIECE_COST = 16
#: And of each IIS `%uXXXX` a decoding reads (`_iis_character`, a function's call each).
_IIS_COST = 40


class _Budget:
    """What is left of `_MOST_READ_BYTES` for one path's readings, spent as they are made; and
    what was decoded of it so far: a piece is decoded, and paid for, once (its re-attack: a
    401-byte path of a Windows and a POSIX path, encoded, read too many ways as each of its
    readings decoded the same pieces again)."""

    __slots__ = ("left", "_decoded")

    def __init__(self) -> None:
        self.left = _MOST_READ_BYTES
        self._decoded: dict[bytes, bytes] = {}

    def decoded(self, piece: bytes) -> bytes:
        """`piece` decoded once (`_decoded_once`), paid for the first time it is asked."""
        found = self._decoded.get(piece)
        if found is None:
            self.spend(_DECODE_COST + _decoding_cost(piece))
            found = self._decoded[piece] = _decoded_once(piece)
        return found

    def spend(self, cost: int) -> None:
        self.left -= cost
        if self.left < 0:
            raise _Unverifiable("a request-target whose path reads too many ways, decoded and "
                                f"its dot segments removed ({_MOST_READ_BYTES} bytes of "
                                "readings)")


def _target_authority(target: bytes, method: str
                      ) -> tuple[str | None, int | None, int | None] | None:
    """(host, port given, the scheme's default port) that an absolute-form
    (`scheme://authority/...`) or CONNECT authority-form request-target names; None for
    origin-form (`/...`) and asterisk-form (`*`). Any other target is unverifiable: one a
    URL parser reads a host from in another way (`//host`, `/\\host`, `http:/host`,
    `http:host`: WHATWG parsers, Node's `new URL(target, base)`, `urljoin`), and one that is
    none of these forms (`host:port` outside a CONNECT, which a lenient server or proxy may
    take for the host: attack pass; `host/x`, `?x`; no client sends them)."""
    if target == b"*":  # (OPTIONS's, and SSDP's M-SEARCH)
        return None
    if target.startswith((b"//", b"/\\", b"\\")):
        raise _Unverifiable("a request-target that URL parsers read as naming a host (//host)")
    if target.startswith(b"/"):
        _refuse_host_after_dots(target)
        return None
    if method == "CONNECT":
        return (*_authority(target, "request-target authority"), None)
    scheme, colon, rest = target.partition(b":")
    scheme = scheme.lower()
    if scheme in _SPECIAL_SCHEMES and not rest.startswith(b"//"):
        raise _Unverifiable(f"a {scheme.decode()}: URI without '//' (URL parsers read a host "
                            "from it)")
    if not (scheme and colon and rest.startswith(b"//")) or scheme.translate(None, _SCHEME):
        raise _Unverifiable("a request-target that is no path (/...), no URI with a host "
                            "(scheme://host/...) and not *")
    rest = rest[2:]
    end = len(rest)
    for stop in b"/?#":  # not a backslash: parsers differ on it, and `_authority` refuses it
        found = rest.find(stop)
        if found != -1 and found < end:
            end = found
    if not rest[:end]:
        raise _Unverifiable("an absolute URI without a host")  # "http:///x": sent where?
    _refuse_host_after_dots(rest[end:])
    return (*_authority(rest[:end], "request-target authority"), _SPECIAL_SCHEMES.get(scheme))


def _refuse_host_after_dots(path: bytes) -> None:
    """Raise _Unverifiable for a path that starts with `//`, or does once its dot segments
    are removed (RFC 3986 5.2.4), as it is or decoded up to `_MOST_DECODINGS` times over
    (`_decoded_once`), in any parser's reading (`_readings`: a backslash a slash or not, a
    segment's `;parameters` dropped, as Tomcat drops them, or not, encoded separators split
    on or not; tabs and line breaks dropped). An application that normalizes the path and
    then reads it as a URL (a redirect, a fetch of it) goes to that host (attack pass 17:
    `/.//denied.test/x` was forwarded as a path; later passes and reviews: `%2e`, `%2f`,
    `%5c`, `%09`, each encoded again, `%u002e`, overlong UTF-8, fullwidth forms)."""
    path = path.partition(b"?")[0]
    # (without a `#` and what follows, and with them, as Go's server and Node keep them in the
    # path: session 58's last attack, `/x#/../..//evil.test/p`)
    texts = dict.fromkeys((path.partition(b"#")[0], path))
    if any(text.startswith((b"//", b"/\\")) for text in texts):  # (an absolute URI's: review)
        raise _Unverifiable("a request-target whose path names a host (//host)")
    if path.isascii() and b"/." not in path and b"%" not in path and b"\\" not in path \
            and b";" not in path:
        return  # (nearly every path: a dot segment starts with one of these)
    # Each text is read every way, and what its dot segments leave is read on too, then
    # decoded once more: an application may normalize before it decodes (attack pass 22:
    # `/../%2fhost%2f..` is `/%2fhost%2f..` normalized, `//host/..` decoded).
    seen: set[bytes] = set()
    todo = [(text, 0) for text in texts]
    budget = _Budget()
    while todo:
        text, decodings = todo.pop()
        if text in seen:
            continue
        seen.add(text)
        for reading in _readings(text, budget):
            budget.spend(len(reading[0]) + _SEGMENT_COST * (  # (`_dots_removed`: a step a
                reading[0].count(b"/") + (reading[0].count(b"\\") if reading[1] else 0)))
            left = _dots_removed(reading)
            if left is None:
                raise _Unverifiable("a request-target whose path, decoded or its dot "
                                    "segments removed, names a host (//host)")
            todo.append((left, decodings))
        decoded = budget.decoded(text)
        if decoded != text:
            if decodings == _MOST_DECODINGS:
                raise _Unverifiable(f"a request-target whose path is percent-encoded more "
                                    f"than {_MOST_DECODINGS} times over")
            todo.append((decoded, decodings + 1))


def _readings(path: bytes, budget: _Budget) -> Iterator[tuple[bytes, bool, bool]]:
    """`path` as each kind of parser may split it (`_dots_removed`'s arguments):
    on `/` and `\\` with `;params` dropped, as the laxest servers do, or on `/` alone with them
    kept, as RFC 3986 and Node's and Python's URL parsers do, or either way mixed; and the same
    with `%2f` or `%5c` or both left encoded while the rest is decoded, as often over as it
    decodes, as a server that decodes a segment after splitting reads it (second review:
    `/a%2fb/%2e%2e//host`; third: `/a%2fb/%252e%252e//host`)."""
    texts = [path]
    if (b"%2" in path or b"%5" in path) and _KEPT_SEPARATORS[0].search(path):
        texts += (text for kept in _KEPT_SEPARATORS
                  for text in _decoded_but(path, kept, budget))
    for text in dict.fromkeys(texts):
        for backslash in (True, False) if b"\\" in text else (True,):
            for params in (True, False) if b";" in text else (True,):
                yield text, backslash, params


def _decoded_but(path: bytes, kept: re.Pattern[bytes], budget: _Budget) -> list[bytes]:
    """`path` with what lies between the separators `kept` finds decoded (`_Budget.decoded`),
    and those left as they are, as often over as it decodes further (up to `_MOST_DECODINGS`
    times): as a parser that split it first reads its segments. A separator a decoding makes
    is decoded on in one reading, left as it is in another, when there is one (final
    reviews: `/a%2fb%252fc/..//host`, `/a%2fb/..%252f%252fhost`)."""
    readings = []
    made = False  # (a decoding made a separator: the second reading differs)
    for again in (False, True):
        pieces = kept.split(path)  # (the separators at the odd places)
        for _ in range(_MOST_DECODINGS):
            budget.spend(len(path) + _PIECE_COST * (len(pieces) // 2 + 1))  # (its split, the
            # look up of each piece, the join; each piece's decoding, once: `decoded`)
            decoded = list(map(budget.decoded, pieces[::2]))
            if decoded == pieces[::2]:
                break
            made = made or any(kept.search(piece) for piece in decoded)
            pieces[::2] = decoded
            if again:
                pieces = kept.split(b"".join(pieces))
        readings.append(b"".join(pieces))
        if not made:
            break
    return readings


def _dots_removed(reading: tuple[bytes, bool, bool]) -> bytes | None:
    """A path split on `\\` too or not, its segments' `;params` dropped or not (a `_readings`
    reading), its dot segments removed; None when it names a host (starts with `//`) as it
    is or so (a URL parser reads the authority of `//host/..` before it removes them:
    attack pass 21)."""
    path, backslash, params = reading
    path = path.translate(None, b"\t\n\r")
    segments = (path.replace(b"\\", b"/") if backslash else path).split(b"/")[1:]
    if params:
        segments = [segment.partition(b";")[0] for segment in segments]
    if len(segments) > 1 and segments[0] == b"":
        return None
    kept: list[bytes] = []
    for segment in segments:
        if segment == b"..":
            if kept:
                kept.pop()
        elif segment != b".":
            kept.append(segment)
    return None if len(kept) > 1 and kept[0] == b"" else b"/" + b"/".join(kept)


def _decoding_cost(path: bytes) -> int:
    """What decoding `path` once costs (`_decoded_once`), in bytes of readings: its bytes, and
    a function's call for each `%uXXXX` (`_IIS_COST`)."""
    return len(path) + _IIS_COST * (path.count(b"%u") + path.count(b"%U"))


def _decoded_once(path: bytes) -> bytes:
    """`path` percent-decoded once, as the laxest decoder does it: IIS's `%uXXXX` too,
    overlong UTF-8 read as the ASCII character it spells, and compatibility forms (a
    fullwidth dot, slash or backslash) made what NFKC makes them."""
    decoded = percent_decoded(_IIS_PERCENT_U.sub(_iis_character, path))
    if decoded.isascii():
        return decoded
    pieces = _OVERLONG.split(decoded)  # (a table, not a function a match: session 58's review,
    pieces[1::2] = map(_OVERLONG_CHARACTER.__getitem__, pieces[1::2])  # 4,725 in one path)
    decoded = b"".join(pieces)
    if decoded.isascii():
        return decoded
    return unicodedata.normalize("NFKC", decoded.decode("utf-8", "surrogateescape")).encode(
        "utf-8", "surrogateescape")


def _iis_character(found: re.Match[bytes]) -> bytes:
    """The character `%uXXXX` spells, in UTF-8 (a lone surrogate as it is)."""
    return chr(int(found[1], 16)).encode("utf-8", "surrogatepass")


def _overlong_character(sequence: bytes) -> bytes:
    """The ASCII character an overlong UTF-8 sequence spells: its lead byte's low bits, then
    each continuation byte's six."""
    lead, *rest = sequence
    value = lead & (0x3F >> len(rest))
    for byte in rest:
        value = value << 6 | byte & 0x3F
    return bytes((value,))


#: Each sequence `_OVERLONG` finds (1,024 of them), and the character it spells.
_OVERLONG_CHARACTER = {sequence: _overlong_character(sequence) for sequence in (
    *(bytes((lead, second)) for lead in (0xC0, 0xC1) for second in range(256)),
    *(prefix + bytes((last_but_one, last))
      for prefix in (b"\xe0", b"\xf0\x80", b"\xf8\x80\x80", b"\xfc\x80\x80\x80")
      for last_but_one in (0x80, 0x81) for last in range(0x80, 0xC0)))}


def _authority(value: bytes, what: str) -> tuple[str | None, int | None]:
    """`host[:port]` or `[v6][:port]` -> (host, port); empty -> (None, None); anything else,
    userinfo included, raises _Unverifiable."""
    if not value:
        return None, None
    port: int | None = None
    if value.startswith(b"["):
        close = value.find(b"]")
        rest = value[close + 1:]
        if close == -1 or (rest and not rest.startswith(b":")):
            raise _Unverifiable(f"{what} has a malformed IPv6 literal")
        if rest:
            port = _port(rest[1:], what)
        try:
            return str(ipaddress.IPv6Address(value[1:close].decode("ascii"))), port
        except (ValueError, UnicodeDecodeError):
            raise _Unverifiable(f"{what} has a malformed IPv6 literal") from None
    colon = value.rfind(b":")
    if colon != -1:
        port = _port(value[colon + 1:], what)
        value = value[:colon]
    return _plain_name(value, what), port  # a second ':' (bare IPv6) or '@' (userinfo) fails


def _port(text: bytes, what: str) -> int | None:
    """'' -> None (RFC 3986 allows an empty port); 1-65535 -> int; anything else raises, a
    leading zero too (attack pass 11: read as decimal, a server that reads it as octal goes
    to another port than the one judged)."""
    if not text:
        return None
    if len(text) > 5 or text.translate(None, _DIGITS) or text[0] == 0x30 or \
            not 0 < int(text) < 65536:
        raise _Unverifiable(f"{what} has a port that is not 1-65535 without a leading zero")
    return int(text)
