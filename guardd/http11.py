"""h11 (guardd's HTTP/1.1 parser), its header-line and chunk-line patterns made linear and the
lines of its heads counted before they are read: import it from here.

h11 reads a header line with `field-name ":" OWS field-value OWS` (RFC 9110 5.5), two runs of
optional whitespace around an optional value. Where the line ends in a byte the value may not
hold (VT, FF, a bare CR, NUL), the regex engine tries every split of the spaces between the two
runs: quadratic in their number. `X:` and 60,000 spaces then VT held guardd's loop 7 s in a
response head, and 1.5 s in a request head to the proxy listener before its login (session
55's last re-attack). The same pattern with possessive quantifiers (Python 3.11) matches the
same lines with the same groups (a space is never a value's byte, so no split of a run can
help) in linear time; `tests/unit/test_http11.py` holds the differential.

h11 reads a head, or a chunked body's trailer, as one event: about 2 us a field, and a trailer
comes with the body's last chunk, so nothing before h11 can tell it apart. A head or trailer
of more than `MAX_FIELD_LINES` lines is refused (431) once h11 split it into lines, before it
reads one of them (the follower counts a response head's lines before even that).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import h11
from h11 import _abnf, _readers

#: Header lines h11 reads in one head or trailer, folded lines counted (obs-fold, RFC 9112
#: 5.2): about 2 ms of reading. A real head is well within (130 cookies: attack pass 49); the
#: listeners' own caps (a request's fields, `follow.MAX_HEADERS`) are below it.
MAX_FIELD_LINES = 1000

#: `h11._abnf.header_field`, its quantifiers possessive.
_HEADER_FIELD = (
    rf"(?P<field_name>{_abnf.field_name}):[ \t]*+"
    rf"(?P<field_value>(?:{_abnf.field_vchar}++(?:[ \t]++{_abnf.field_vchar}++)*+)?+)"
    r"[ \t]*+")

#: `h11._abnf.chunk_header`, `size (";" ext)? OWS CRLF`, where the extension's `.*` and the
#: whitespace before the CRLF shared a run of spaces: `1;`, 60,000 spaces, a bare LF and CRLF
#: held the loop 1.9 s (session 55's regex hunt). The extension now runs to the line's LF,
#: possessively, a CR before it; h11 keeps only the size.
_CHUNK_HEADER = (
    rf"(?P<chunk_size>{_abnf.chunk_size})"
    r"(?:(?P<chunk_ext>;[^\n]*+)(?<=\r)\n|[ \t]*+\r\n)")

#: The patterns of h11's these replace, as h11 0.16 writes them: another h11 may have changed
#: them (tightened, say), and its change must not be undone unseen (the review).
_REPLACED = {
    "header_field": "(?P<field_name>[-!#$%&'*+.^_`|~0-9a-zA-Z]+):[ \\t]*(?P<field_value>("
                    "[^\\x00\\s]+(?:[ \\t]+[^\\x00\\s]+)*)?)[ \\t]*",
    "chunk_header": "(?P<chunk_size>([0-9A-Fa-f]){1,20})(?P<chunk_ext>;.*)?[ \\t]*\\r\\n"}
if {name: getattr(_abnf, name) for name in _REPLACED} != _REPLACED:
    raise ImportError("this h11 reads header or chunk lines with other patterns than h11 0.16, "
                      "whose guardd/http11.py replaces: review it against this h11 before use")

_decode_header_lines = _readers._decode_header_lines


def _counted_header_lines(lines: Iterable[bytes]) -> Iterable[tuple[bytes, bytes]]:
    """h11's `_decode_header_lines`, once `lines` (a list h11 split) are counted (session 55
    left open: a trailer of 64 KiB of fields was read, 28 to 34 ms, before the follower could
    refuse it)."""
    lines = list(lines)
    if len(lines) > MAX_FIELD_LINES:
        raise h11.LocalProtocolError(f"more than {MAX_FIELD_LINES} header lines", 431)
    return _decode_header_lines(lines)


_readers.header_field_re = re.compile(_HEADER_FIELD.encode("ascii"))
_readers.chunk_header_re = re.compile(_CHUNK_HEADER.encode("ascii"))
_readers._decode_header_lines = _counted_header_lines

__all__ = ["MAX_FIELD_LINES", "h11"]
