"""First client bytes of a SOCKS connection, sans-I/O: bytes in, a verdict out.

Theory of operation
-------------------
After a CONNECT is accepted, the SOCKS server holds back what the client sends first and asks
`sniff(buffer)` what it is, calling it again with the grown buffer until it answers:

* `None`: not decidable yet (a partial TLS record, an HTTP head without its blank line);
* `Sniffed(Kind.TLS, sni=…, alpn=…, ech=…)`: a TLS ClientHello, reassembled across as many
  handshake records as it takes; the server checks the SNI against the policy (domain fronting);
* `Sniffed(Kind.HTTP, method=…, host=…, port=…, target=…)`: a plaintext HTTP/1.x request head; the
  server judges it with its method (DESIGN.md, evaluation rule 6) and checks its Host;
* `Sniffed(Kind.OTHER)`: anything else, relayed as is and judged with the method unknown.

The first byte picks the parser: 0x16 (TLS handshake record) or an HTTP token character (a method
may follow, after any empty lines RFC 9112 2.2 lets a server skip); anything else is OTHER at once,
so b"\\x00" or an SSLv2-style hello (high bit set) never waits.

Three properties hold for every input (tests/unit/test_socks_sniff.py checks them with
Hypothesis): `sniff` never raises on bytes; a verdict never changes as bytes are appended (it
depends only on the bytes up to where it was decided, so the growing-buffer loop and one call on
the whole buffer agree); and from `MAX_SNIFF_BYTES` bytes on there is always a verdict. Each call
is linear in the buffer and bounded by the caps, with slicing and `bytes` methods (`find`, `split`,
`translate`) rather than regexes.

Security model: the client is the adversary (a prompt-injected agent that can write raw bytes),
the upstream server is whatever is behind the vetted address, possibly a CDN that routes on the
SNI or the Host. So where a real server might read a name we cannot verify, the sniffer does not
guess and does not give up (an OTHER verdict would skip the name check); it reports the name as
`UNVERIFIABLE`, a string no domain glob except the catch-all `*` can match, so the server's
"another name must be allowed too" check denies the connection unless everything is allowed
anyway. That covers:

* TLS: once the bytes start 0x16 0x03 (a handshake record), every failure is TLS + UNVERIFIABLE:
  a record of another type or over 2^14 bytes before the hello is complete, a handshake message
  that is not a ClientHello, any length that does not add up, a duplicated extension (RFC 8446
  4.2), an SNI list with two host_name entries or an empty or non-ASCII name, and a hello that does
  not complete within `MAX_SNIFF_BYTES` (one maximal record; legitimate hellos, post-quantum key
  shares included, are a few KiB; splitting one into many tiny records to outgrow the cap is an
  evasion trick). The brief asked for OTHER here; OTHER would let a hello our parser rejects but a
  more lenient server accepts carry any SNI unchecked.
* HTTP: two different Host headers (RFC 9112 3.2 wants a 400, but servers differ on which one
  wins), an absolute-form or CONNECT authority that disagrees with Host or carries userinfo, a
  Host that is not a plain name, IPv4 literal or bracketed IPv6 literal with an optional port, a
  folded line (obs-fold) continuing Host, a bare CR anywhere in the head (some servers end lines
  there), a request-target with whitespace in it, and a head that does not end within
  `HTTP_HEAD_CAP`. In all these the request line was read, so the verdict is still HTTP with the
  method known; only the Host is UNVERIFIABLE.

Decisions on HTTP, each leaning the way that cannot open a bypass:

* Lenient where a lenient server could act on the request: empty lines before the request line
  are skipped; the request line is split on runs of whitespace (SP, HTAB, VT, FF, bare CR: RFC 9112
  3); bare LF ends lines; "http/1.1" counts as HTTP/1.1; whitespace between a header name and its
  colon (RFC 9112 5.1 wants a 400) still makes a Host header. Otherwise "DELETE  /x" (two spaces)
  could pass as an opaque stream, slip past a `method: DELETE` deny rule, and be served as DELETE.
* The method is any RFC 9110 token (so "M-SEARCH" and "VERSION-CONTROL" count; "SSH-2.0-…" is
  therefore decided at the end of its banner line, not at the "-") and is reported upper-cased.
  Methods are case-sensitive (RFC 9110 9.1) and strict servers reject "delete", but some
  frameworks (Werkzeug) upper-case it; upper-casing here means a `method: DELETE` deny rule also
  stops "delete", and a `method: GET` allow rule lets "get" through to a server that either
  serves it as GET (which the rule allowed) or rejects it.
* A missing or empty Host (HTTP/1.0, or a client that omits it) is `host=None`: nothing claimed,
  nothing to check; the connection goes to the CONNECT target anyway.
* Host is reported lower-cased, without port, without IPv6 brackets (the IPv6 address itself in
  compressed form, as `str(ipaddress)` prints it) and without a trailing dot, like policy names.
* Anything that cannot be an HTTP/1.x request line is OTHER: a byte that is not a token character
  in the method, a control character in the request line, fewer than three words, a version that
  is not HTTP/1.x (so the HTTP/2 prior-knowledge preface "PRI * HTTP/2.0" is OTHER and judged with
  the method unknown: guardd does not parse HTTP/2 frames), or a request line with no end within
  `HTTP_HEAD_CAP`.

Limits, by design of DESIGN.md rule 6 ("the first client bytes decide"): only the first request of
a connection is seen; later requests on a kept-alive or pipelined connection, HTTP/2 streams, and
the name inside an ECH-encrypted ClientHello are not. `ech=True` tells the server that the SNI is
only the outer, public name.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

__all__ = ["HTTP_HEAD_CAP", "MAX_SNIFF_BYTES", "UNVERIFIABLE", "Kind", "Sniffed", "sniff"]

#: Largest TLS record plaintext (RFC 8446 5.1).
MAX_TLS_RECORD = 16 * 1024
#: The most bytes ever looked at: one maximal TLS record with its 5-byte header. A ClientHello
#: must be complete within them (across any number of records). From this length on, `sniff`
#: always has a verdict.
MAX_SNIFF_BYTES = MAX_TLS_RECORD + 5
#: An HTTP request head (request line, header lines, blank line) must end within this many bytes
#: (the per-line limit of common servers: Apache's 8190, nginx's large_client_header_buffers 8k).
HTTP_HEAD_CAP = 8 * 1024
#: Stands for a name a server might act on but the sniffer cannot pin down (see the module
#: docstring). No domain glob but `*` matches it: a glob may hold only letters, digits, '-', '_',
#: '.' and '*' (policy/loader.py), and this holds none of the first five.
UNVERIFIABLE = "<?>"
#: `Sniffed.target` is truncated to this many characters (it is for the audit trail).
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


_OTHER = Sniffed(Kind.OTHER)
_TLS_UNVERIFIABLE = Sniffed(Kind.TLS, sni=UNVERIFIABLE)

# --- bytes classes, for bytes.translate(None, allowed) == b"" checks -----------------------------

_DIGITS = b"0123456789"
_LETTERS = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
#: RFC 9110 5.6.2 tchar.
_TOKEN = _LETTERS + _DIGITS + b"!#$%&'*+-.^_`|~"
_TOKEN_SET = frozenset(_TOKEN)
#: What a name (SNI, Host, authority host; already lower-cased) may hold to be checked at all.
_NAME = b"abcdefghijklmnopqrstuvwxyz" + _DIGITS + b"-._"
#: Control characters that make a request line not HTTP (whitespace ones separate words).
_LINE_CTL = bytes(b for b in range(0x20) if b not in b"\t\r\x0b\x0c") + b"\x7f"
_SCHEME = _LETTERS + _DIGITS + b"+-."

# --- TLS constants -------------------------------------------------------------------------------

_HANDSHAKE = 0x16
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_EXT_ECH = 0xFE0D
_EXT_ESNI = 0xFFCE  # draft-ietf-tls-esni before ECH; Cloudflare shipped it
_HOST_NAME = 0
_MAX_SESSION_ID = 32


def sniff(data: bytes) -> Sniffed | None:
    """Classify the first bytes a client sent; None while more bytes are needed.

    `data` is everything received so far (bytes, bytearray or memoryview). Never raises on any
    such input; TypeError for something that is not bytes-like. Once `len(data)` reaches
    `MAX_SNIFF_BYTES` the answer is never None. A verdict, once given, stays the same however many
    bytes are appended.
    """
    if not isinstance(data, bytes):
        data = bytes(memoryview(data))
    if not data:
        return None
    first = data[0]
    if first == _HANDSHAKE:
        return _sniff_tls(data)
    if first in _TOKEN_SET or first == 0x0D or first == 0x0A:
        return _sniff_http(data)
    return _OTHER


# --- TLS -----------------------------------------------------------------------------------------


def _sniff_tls(data: bytes) -> Sniffed | None:
    """Reassemble the first handshake message from consecutive handshake records, then parse it."""
    size = len(data)
    if size < 2:
        return None
    if data[1] != 3:
        return _OTHER  # 0x16 but not TLS/SSL3 record framing
    limit = min(size, MAX_SNIFF_BYTES)
    message = bytearray()
    needed = -1  # 4 + handshake body length, once the handshake header is in
    pos = 0
    while pos < limit:
        if data[pos] != _HANDSHAKE or (pos + 1 < limit and data[pos + 1] != 3):
            return _TLS_UNVERIFIABLE  # the hello is interrupted by another record type
        if pos + 5 > limit:
            break
        length = (data[pos + 3] << 8) | data[pos + 4]
        if length > MAX_TLS_RECORD:
            return _TLS_UNVERIFIABLE
        end = pos + 5 + length
        message += data[pos + 5:min(end, limit)]  # zero-length records carry nothing: skipped
        if needed < 0 and len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                return _TLS_UNVERIFIABLE
            needed = 4 + int.from_bytes(message[1:4], "big")
            if needed > MAX_TLS_RECORD:
                return _TLS_UNVERIFIABLE  # cannot complete within MAX_SNIFF_BYTES
        if 0 <= needed <= len(message):
            return _parse_client_hello(bytes(message[4:needed]))
        pos = end
    return _TLS_UNVERIFIABLE if size >= MAX_SNIFF_BYTES else None


def _parse_client_hello(body: bytes) -> Sniffed:
    """ClientHello (RFC 8446 4.1.2) body: skip to the extensions, read SNI, ALPN and ECH."""
    size = len(body)
    pos = 2 + 32  # legacy_version, random
    if pos >= size:
        return _TLS_UNVERIFIABLE
    session_id = body[pos]
    if session_id > _MAX_SESSION_ID:
        return _TLS_UNVERIFIABLE
    pos += 1 + session_id
    if pos + 2 > size:
        return _TLS_UNVERIFIABLE
    suites = (body[pos] << 8) | body[pos + 1]
    if suites == 0 or suites & 1:
        return _TLS_UNVERIFIABLE
    pos += 2 + suites
    if pos >= size:
        return _TLS_UNVERIFIABLE
    compressions = body[pos]
    if compressions == 0:
        return _TLS_UNVERIFIABLE
    pos += 1 + compressions
    if pos == size:
        return Sniffed(Kind.TLS)  # no extensions at all (SSL 3.0 style): no SNI
    if pos + 2 > size or pos + 2 + ((body[pos] << 8) | body[pos + 1]) != size:
        return _TLS_UNVERIFIABLE  # the extensions block must end exactly with the message
    pos += 2
    seen: set[int] = set()
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    ech = False
    while pos < size:
        if pos + 4 > size:
            return _TLS_UNVERIFIABLE
        kind = (body[pos] << 8) | body[pos + 1]
        end = pos + 4 + ((body[pos + 2] << 8) | body[pos + 3])
        if end > size or kind in seen:
            return _TLS_UNVERIFIABLE
        seen.add(kind)
        if kind == _EXT_SERVER_NAME:
            sni = _server_name(body[pos + 4:end])
            if sni == UNVERIFIABLE:
                return _TLS_UNVERIFIABLE
        elif kind == _EXT_ALPN:
            offered = _alpn(body[pos + 4:end])
            if offered is None:
                return _TLS_UNVERIFIABLE
            alpn = offered
        elif kind == _EXT_ECH or kind == _EXT_ESNI:
            ech = True
        pos = end
    return Sniffed(Kind.TLS, sni=sni, alpn=alpn, ech=ech)


def _server_name(ext: bytes) -> str | None:
    """server_name (RFC 6066 3): the one host_name, None if only other name types, or
    UNVERIFIABLE (bad lengths, empty list, two host_names, a name that is not a plain name)."""
    size = len(ext)
    if size < 2 or ((ext[0] << 8) | ext[1]) != size - 2 or size == 2:
        return UNVERIFIABLE
    pos = 2
    found: bytes | None = None
    while pos < size:
        if pos + 3 > size:
            return UNVERIFIABLE
        name_type = ext[pos]
        end = pos + 3 + ((ext[pos + 1] << 8) | ext[pos + 2])
        if end > size:
            return UNVERIFIABLE
        if name_type == _HOST_NAME:
            if found is not None:
                return UNVERIFIABLE  # "MUST NOT contain more than one name of the same type"
            found = ext[pos + 3:end]
        pos = end
    if found is None:
        return None
    return _plain_name(found)


def _alpn(ext: bytes) -> tuple[str, ...] | None:
    """application_layer_protocol_negotiation (RFC 7301 3.1); None when malformed."""
    size = len(ext)
    if size < 3 or ((ext[0] << 8) | ext[1]) != size - 2:
        return None
    names: list[str] = []
    pos = 2
    while pos < size:
        end = pos + 1 + ext[pos]
        if end == pos + 1 or end > size:
            return None
        names.append(ext[pos + 1:end].decode("ascii", "backslashreplace"))
        pos = end
    return tuple(names)


def _plain_name(raw: bytes) -> str:
    """A DNS-ish name or IPv4 literal (letters, digits, '-', '_', non-empty labels): lower-case,
    trailing dot removed; anything else (userinfo, a bare IPv6, non-ASCII) is UNVERIFIABLE."""
    name = raw.lower()
    if name.endswith(b"."):
        name = name[:-1]
    if not name or name.translate(None, _NAME) or name.startswith(b".") or b".." in name:
        return UNVERIFIABLE
    return name.decode("ascii")


# --- HTTP ----------------------------------------------------------------------------------------


def _sniff_http(data: bytes) -> Sniffed | None:
    """An HTTP/1.x request head: the request line, then Host (see the module docstring)."""
    size = len(data)
    limit = min(size, HTTP_HEAD_CAP)
    window = data[:limit] if size > limit else data
    start = limit - len(window.lstrip(b"\r\n"))  # empty lines before the request line
    if start == limit:
        return _OTHER if size >= HTTP_HEAD_CAP else None
    if data[start] not in _TOKEN_SET:
        return _OTHER
    cr = window.find(b"\r", start)
    lf = window.find(b"\n", start)
    line_end = lf if cr == -1 else cr if lf == -1 else min(cr, lf)
    line = window[start:line_end] if line_end != -1 else window[start:]
    if line.translate(None, _LINE_CTL) != line:
        return _OTHER
    words = line.split()
    if words[0].translate(None, _TOKEN):
        return _OTHER  # a non-token byte in the method
    if line_end == -1:
        return _OTHER if size >= HTTP_HEAD_CAP else None
    if len(words) < 3 or not _is_http1(words[-1]):
        return _OTHER
    method = words[0].decode("ascii").upper()
    target = b" ".join(words[1:-1])
    shown = target[:MAX_TARGET_CHARS].decode("latin-1")

    # The head ends with the first empty line; the request line's own LF may be the first LF.
    lf = window.find(b"\n", line_end)
    head_end = -1
    if lf != -1:
        crlf = window.find(b"\n\r\n", lf)
        bare = window.find(b"\n\n", lf)
        if crlf != -1 and (bare == -1 or crlf < bare):
            head_end = crlf + 3
        elif bare != -1:
            head_end = bare + 2
    if head_end == -1:
        if size < HTTP_HEAD_CAP:
            return None
        return Sniffed(Kind.HTTP, method=method, host=UNVERIFIABLE, target=shown)
    head = window[start:head_end]
    if len(words) > 3 or head.count(b"\r") != head.count(b"\r\n"):
        return Sniffed(Kind.HTTP, method=method, host=UNVERIFIABLE, target=shown)
    host, port = _head_host(window[lf + 1:head_end], target, method)
    return Sniffed(Kind.HTTP, method=method, host=host, port=port, target=shown)


def _is_http1(version: bytes) -> bool:
    """HTTP/1.<digits>, the "HTTP" in any case."""
    return (len(version) > 7 and version[:7].upper() == b"HTTP/1."
            and not version[7:].translate(None, _DIGITS))


def _head_host(block: bytes, target: bytes, method: str) -> tuple[str | None, int | None]:
    """(host, port) the request names, from Host header lines and the request-target."""
    values: set[bytes] = set()
    folded = False
    in_host = False
    for line in block.split(b"\n"):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            continue  # only the terminator's empty line can be empty here
        if line[0] in b" \t":
            folded = folded or in_host  # obs-fold: continues the previous field
            continue
        colon = line.find(b":")
        in_host = colon != -1 and line[:colon].rstrip(b" \t").lower() == b"host"
        if in_host:
            values.add(line[colon + 1:].strip(b" \t"))
    if folded or len(values) > 1:
        return UNVERIFIABLE, None
    header = _authority(next(iter(values))) if values else (None, None)
    named = _target_authority(target, method)
    if named is None:
        return header
    if named[0] == UNVERIFIABLE or (values and header[0] != named[0]):
        return UNVERIFIABLE, None
    return named


def _target_authority(target: bytes, method: str) -> tuple[str | None, int | None] | None:
    """The authority an absolute-form (`scheme://authority/...`) or CONNECT authority-form
    request-target names, or None for origin-form and asterisk-form."""
    if target.startswith(b"/") or target == b"*":
        return None
    scheme_end = target.find(b"://")
    if scheme_end > 0 and not target[:scheme_end].translate(None, _SCHEME):
        rest = target[scheme_end + 3:]
        end = len(rest)
        for stop in b"/?#":
            found = rest.find(stop)
            if found != -1 and found < end:
                end = found
        authority = rest[:end]
    elif method == "CONNECT":
        authority = target
    else:
        return None
    if not authority:
        return UNVERIFIABLE, None  # "http:///x": where would a server send that?
    return _authority(authority)


def _authority(value: bytes) -> tuple[str | None, int | None]:
    """`host[:port]` or `[v6][:port]` -> (host, port); empty -> (None, None); anything else,
    userinfo included, -> (UNVERIFIABLE, None)."""
    if not value:
        return None, None
    port: int | None = None
    if value.startswith(b"["):
        close = value.find(b"]")
        if close == -1:
            return UNVERIFIABLE, None
        rest = value[close + 1:]
        if rest:
            if not rest.startswith(b":"):
                return UNVERIFIABLE, None
            port = _port(rest[1:])
            if port == -1:
                return UNVERIFIABLE, None
        try:
            return str(ipaddress.IPv6Address(value[1:close].decode("ascii"))), port
        except (ValueError, UnicodeDecodeError):
            return UNVERIFIABLE, None
    colon = value.rfind(b":")
    if colon != -1:
        port = _port(value[colon + 1:])
        if port == -1:
            return UNVERIFIABLE, None
        value = value[:colon]
    host = _plain_name(value)  # a second ':' (bare IPv6) or '@' (userinfo) makes it UNVERIFIABLE
    return host, port if host != UNVERIFIABLE else None


def _port(text: bytes) -> int | None:
    """'' -> None (RFC 3986 allows an empty port); 1-65535 -> int; anything else -> -1."""
    if not text:
        return None
    if len(text) > 5 or text.translate(None, _DIGITS):
        return -1
    port = int(text)
    return port if 0 < port < 65536 else -1
