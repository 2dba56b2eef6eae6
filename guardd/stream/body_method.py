"""Does a request body name the method a framework serves the request as? Sans-I/O, streaming.

Rails (Rack::MethodOverride), Laravel and Symfony, Spring's HiddenHttpMethodFilter, ASP.NET
Core's HttpMethodOverrideMiddleware and Express's method-override serve a POST as the method its
`_method` form field names (Laravel a JSON body's `_method` key too): `POST /repo` with
`_method=DELETE` in its body is a DELETE there (attack pass). Others read other names
(`OVERRIDE_FIELDS`), and from other methods' bodies (pecan: any but GET's and HEAD's; Hono:
any but GET's; CakePHP: PUT's, PATCH's, DELETE's), so every request's body is read (session
60's attack). `sniff` reads the header, query and cookie spellings; this reads the body, where
the request head alone cannot tell.

It reads the field's name the way the laxest of them does, over-approximating where they differ
(a false alarm costs a judgement as any method, a miss a method rule). The text is
percent-decoded with `+` as a space (urlencoded forms, RFC 2231 `name*=` in multipart), JSON
`\\u00XX` escapes decoded and case ignored (ASP.NET's form collection), then read several ways,
a name in any of them counting: as it is; NUL bytes dropped (UTF-16 and UTF-32 bodies, which
Java servers decode by the Content-Type's charset) or ending a name (PHP's strlen); backslash
escapes dropped (Rack and busboy unquote `name="\\_method"`; in JSON all but `\\"` and `\\\\`,
which end no key); line breaks dropped (PHP joins a multipart header line without a colon to
the one before). A name is `_method`, or `.method` or
`[method` (PHP reads `.` and `[` as `_`), after any run of brackets, spaces and control bytes
(Rack 2 and qs drop leading brackets, PHP leading spaces, Tomcat trims control bytes), where a
field name may start and end: so
`payment_method` is not one, and `_method[]`, `name="_method"`, `Content-ID:_method` (Rack's
name for a part without one) and `{"_method"` are. An RFC 2047 encoded word anywhere
(`=?charset?B?...?=`: commons-fileupload and ASP.NET decode one in a part's name, joining
adjacent ones, in their charset, dropping what follows) may name any method, as may an RFC 2231
name continued (`name*0=`: Go joins the pieces) or in a charset guardd does not read
(`name*=IBM037''...`: Tomcat decodes it), a body in such a charset (EBCDIC, UTF-7) or with a
Content-Encoding (a server may inflate it). A body of a type none of them reads fields from
(`application/octet-stream`, `image/png`; a wildcard type is read: Spring WebFlux read one as a
form) is not read. The reading is linear in the bytes (a review found a quadratic regex), and
done in C but for a step per JSON escape (a crafted body held the event loop for 27 ms per
64 KiB part; `scripts/bench-body-method` measures it).

Where the Content-Type says which, the body is read as that kind alone (fourth review: code in
an LLM request's JSON read as a form was judged as any method): JSON for a `"_method"` key
(only Laravel reads one, with json_decode: no PHP name mangling), an urlencoded form for names
where its fields start (its start, `&`, `;`); the RFC 2047 and 2231 checks apply only where
the body may be multipart (multipart, no type, a wildcard, several types).

The name is found in the part of the body that completes it (and its first character after),
and the follower tells that part to be judged before it goes: a streaming multipart parser
(commons-fileupload, Go's) acts on a field before the body ends (review), so holding back the
body's end was not enough.
"""

from __future__ import annotations

import functools
import re
import string
from itertools import repeat

#: The override headers' names (`sniff` reads them in a head).
OVERRIDE_HEADERS = (b"x-http-method-override", b"x-http-method", b"x-method-override")
#: The names besides `_method` a framework takes a request's method from in its query or body
#: (session 60: the headers' in ASP.NET MVC 5, `x-tunneled-method` in Plack and Catalyst,
#: `__method` in Masonite, `_HttpMethod` in Salesforce's API, `__METHOD_OVERRIDE__` in a
#: Flask recipe), lower-cased.
OVERRIDE_FIELDS = (*OVERRIDE_HEADERS, b"x-tunneled-method", b"__method", b"_httpmethod",
                   b"__method_override__")
#: A name that ends in "method" in the decoded, lower-cased text: `_method` (`.method` and
#: `[method` too: PHP reads `.` and `[` as `_`) or one of `OVERRIDE_FIELDS`. Searched in the
#: reversed text, so that the regex begins with letters and skips to them at C speed (a
#: crafted body cost 2 ms per 64 KiB per reading forwards): its end after it, the name.
_ENDS_IN_METHOD = rb"dohtem(?<=[^a-z0-9_]dohtem)(?:[_.\[]|%s)" % b"|".join(
    re.escape(name[:-len(b"method")][::-1]) for name in OVERRIDE_FIELDS
    if name.endswith(b"method"))
#: The others, which end in "override" (X-HTTP-Method-Override and the like) or in
#: "override__", the same way (searched only in a reading that has "override" in it).
_OTHER_NAMES = rb"edirrevo(?:(?<=[^a-z0-9_]edirrevo)(?:%s)|(?<=[^a-z0-9_]__edirrevo)(?:%s))" % (
    b"|".join(re.escape(name[:-8][::-1]) for name in OVERRIDE_FIELDS
              if name.endswith(b"override")),
    b"|".join(re.escape(name[:-10][::-1]) for name in OVERRIDE_FIELDS
              if name.endswith(b"override__")))
#: Then where a field name starts before it (the body's start, after `&`, `;`, a quote, `=`,
#: `:`, `{`, `,` or a control byte or space), after any run of brackets, spaces and control
#: bytes (Tomcat trims those); bytes past ASCII count in the run too (Go and Tomcat trim
#: Unicode spaces, Java's UTF-16 decoder a byte order mark). A run is entered only where it
#: begins (third review: a regex that tried every space of a long run as a start took
#: quadratic time; 64 KiB held the loop for a minute): the run, then where it began (the
#: text's start, one of those bytes, or a space or control byte with no run before it).
_FIELD_START = (rb"[\x00-\x20\[\]\x80-\xff]*"
                rb"(?:\Z|[&;\"'=:{,]|(?<=[\x00-\x20\x80-\xff])(?![\x00-\x20\[\]\x80-\xff]))")
#: The same where an urlencoded form's names start: only its start, `&` or `;`.
_FORM_START = rb"[\x00-\x20\[\]\x80-\xff]*(?:\Z|[&;])"
#: How a field's name is found, by kind of body (`BodyMethodScan`): in the reversed text, a
#: name that ends in "method", then the others; in JSON, where only Laravel and Masonite read
#: one, as a key, forwards: its colon, or only whitespace up to the end of what is read (fifth
#: review: JSON allows any whitespace before the colon, and the key had left the bytes kept
#: when it came).
_Ways = tuple[re.Pattern[bytes], ...]
_ANYWHERE: _Ways = (re.compile(_ENDS_IN_METHOD + _FIELD_START),
                    re.compile(_OTHER_NAMES + _FIELD_START))
_IN_FORM: _Ways = (re.compile(_ENDS_IN_METHOD + _FORM_START),
                   re.compile(_OTHER_NAMES + _FORM_START))
_IN_JSON: _Ways = (re.compile(rb"\"_{1,2}method\"\s*(?::|\Z)"),)
#: A percent escape's two hex digits (what `_decoded` replaces with their byte).
_PERCENT_ESCAPE = re.compile(rb"%([0-9a-fA-F]{2})")
#: The byte each two hex digits of an escape (`%XX`, JSON's `\\u00XX`) stand for, either case.
_HEX_BYTE = {(high + low).encode(): bytes([int(high + low, 16)])
             for high in string.hexdigits for low in string.hexdigits}
_BACKSLASH_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)
#: A backslash escape a lenient JSON parser reads as the byte (`_json_unescaped`).
_LENIENT_JSON_ESCAPE = re.compile(rb'\\([^"\\])', re.DOTALL)
#: IIS's `%uXXXX` (lower-cased), and the byte or bytes each reads as (`form_decoded`).
_IIS_ESCAPE = re.compile(rb"%u([0-9a-f]{4})")
_DOTLESS_I = "\u0131".encode()
#: The dotless i read as `i`: in UTF-8 anywhere; as the byte of windows-1254 (ISO-8859-9) or
#: ISO-8859-3, which System.Web decodes by the form's charset, in "override" (the one name
#: with an i; elsewhere such a byte is one past ASCII, as in any other charset).
_DOTLESS = re.compile(rb"\xc4\xb1|(?<=overr)[\xfd\xb9](?=de)")
_IIS_CHARACTER = {b"00" + hex_byte: byte for hex_byte, byte in _HEX_BYTE.items()
                  if hex_byte.islower() or hex_byte.isdigit()} | {b"0131": _DOTLESS_I}
#: The start of an RFC 2047 encoded word (`=?charset?B?`, `=?charset?Q?`), lower-cased.
_ENCODED_WORD = re.compile(rb"=\?[^?\s]{0,64}\?[bq]\?")
#: "method" with line breaks, backslashes or NULs between its letters (the quick test: a body
#: without it, or an encoding, has no name to find).
_SPREAD_METHOD = re.compile(rb"m[\r\n\\\x00]*e[\r\n\\\x00]*t[\r\n\\\x00]*h[\r\n\\\x00]*o"
                            rb"[\r\n\\\x00]*d")
#: What a window may start with that could follow a field's start in the part before it.
_RUN = bytes(range(0x21)) + b"[]" + bytes(range(0x80, 0x100))
#: RFC 2231 parameters a part's name may be given in: `name*=charset'lang'%XX` (Tomcat decodes
#: it in any Java charset) and continuations `name*0=`, `name*1*=` (Go joins them).
_EXTENDED_NAME = re.compile(rb"name\*(\d|\s*=\s*\"?([^'\";\s]{0,64})')")
#: The longest escape the text is decoded from (`\u005f`, `%u005f`): kept bytes start after
#: any.
_ESCAPE_LENGTH = 6
#: Charsets in which `_method` is the ASCII bytes, or those with NULs between (UTF-16, UTF-32).
_READABLE_CHARSET = re.compile(rb"(utf-?8|(us-)?ascii|iso[-_]?8859[-_]?\d+|latin-?\d|"
                               rb"(windows|cp)-?125\d|utf-?(16|32)(le|be)?|"
                               # (session 60's last attack: ASCII is ASCII in these; a trail
                               # byte may hide a name's byte, never make one; and none has the
                               # dotless i, which EUC-JP, EUC-KR and GB18030 have: the final
                               # attack spelled X-Method-Overr\u0131de in them)
                               rb"shift[-_]?jis|s-?jis|gbk|gb-?2312|big-?5|koi8-?[ru])")
#: A charset parameter wherever it is in the value (Tomcat looks for "charset=" anywhere).
_CHARSET = re.compile(rb"charset\s*=\s*\"?([^\";,\s]*)", re.IGNORECASE)
#: What a Content-Type the frameworks read fields from has in it, as they test it (Laravel:
#: "/json" or "+json" anywhere in the value; Rack: no type, a form, multipart/mixed too;
#: Spring WebFlux before 6.2.9: a wildcard).
_FIELDED_TYPES = (b"form", b"json", b"multipart", b"urlencoded", b"*")
#: Bytes that start an encoding of a name's characters (and `+`, a space in a form).
_ENCODED = (b"%", b"+", b"\\u")
#: Raw bytes kept from one part to the next: more than the longest encoding of a name with
#: a byte either side (each character of X-HTTP-Method-Override as `%00%00%00%5f`, UTF-32
#: percent-encoded).
_OVERLAP = 320


class BodyMethodScan:
    """One request body, fed as it goes; `found` says why it may name another method."""

    def __init__(self, content_types: list[bytes], content_encodings: list[bytes]) -> None:
        #: Why the body may name a method other than POST ("" while nothing says so).
        self.found = ""
        self._tail = b""
        self._truncated = False  # the tail is not the body's start
        #: No framework reads fields from a body of this type (an image, a tarball).
        self._opaque = len(content_types) == 1 and content_types[0].strip() != b"" and \
            not any(kind in content_types[0].lower() for kind in _FIELDED_TYPES)
        if self._opaque:
            return
        kind = content_types[0].lower() if len(content_types) == 1 else b"*"
        #: How a field's name is found: as JSON's key, an urlencoded form's field (a body of
        #: no type too: Rack and WebOb read a form, and no multipart is one without a
        #: boundary; session 60's last attack, a source file `curl -T` sent was read as
        #: multipart), or (a multipart body, or a type that could be either) anywhere a name
        #: could start, with the multipart header encodings (fourth review: code in an LLM
        #: request's JSON was read as a form and judged as any method).
        self._fields, self._multipart = (
            (_IN_FORM, False) if not content_types or _only(kind, b"urlencoded") else
            (_IN_JSON, False) if _only(kind, b"json") else (_ANYWHERE, True))
        self._reversed = self._fields is not _IN_JSON  # (how `_fields` read the text)
        #: How a reading drops backslash escapes: as Rack and busboy unquote a multipart
        #: name; in JSON, as a lenient parser reads `"\_method"` (Jackson's
        #: ALLOW_BACKSLASH_ESCAPING_ANY_CHARACTER: the review), but not `\"` nor `\\`, which
        #: end no key (session 60's last attack: an LLM prompt quoting
        #: `{\"_method\": \"DELETE\"}` was judged as any method).
        self._unescaped = _unescaped if self._fields is not _IN_JSON else _json_unescaped
        encodings = {value.strip().lower() for value in content_encodings} - {b"identity"}
        if encodings:  # (a JSON body's too: Express's body-parser inflates one, and Apache can
            #          for PHP; the final attack of session 60 had a gzipped `_method` served)
            self.found = (f"a request body with Content-Encoding {shown(b', '.join(encodings))} "
                          "(a server may decode it and read a `_method` field in it)")
        for value in content_types:
            for charset in _CHARSET.finditer(value):
                if not _readable(charset.group(1).lower()):
                    self.found = (f"a request body in charset {shown(charset.group(1))}, which "
                                  "guardd does not read (a `_method` field in it may name any "
                                  "method)")

    def feed(self, data: bytes) -> None:
        """The body's next bytes, as the client sent them (chunked framing removed); b"" at
        its end."""
        if self.found or self._opaque:
            return
        window = self._tail + (data or b"\n")  # (a line end ends the name a body ends with)
        truncated = self._truncated  # what starts the window was read with what came before
        self._truncated = truncated or len(window) > _OVERLAP
        self._tail = _kept(window)
        text = window.lower()
        self.found = _unreadable(text) if self._multipart else ""
        if self.found:
            return
        if not any(marker in text for marker in _ENCODED) and not _SPREAD_METHOD.search(text):
            return  # (the common case, read at C speed)
        wide = text.replace(b"\x00", b"")  # (a UTF-16 or UTF-32 body, its escapes read after)
        text = _decoded(text)
        if not _SPREAD_METHOD.search(text):
            return  # (no reading below makes the name out of less)
        readings = dict.fromkeys(reading for decoded in {text, _decoded(wide)} for reading in (
            decoded, decoded.replace(b"\x00", b""), decoded.replace(b"\x00", b"\n"),
            self._unescaped(decoded),
            decoded.replace(b"\r", b"").replace(b"\n", b"")))
        for reading in readings:  # (each once, and only one with "method" in a row: a crafted
            if b"method" not in reading:  # body held the loop for 25 ms per 64 KiB part)
                continue
            fields = self._fields if b"override" in reading else self._fields[:1]
            if truncated:  # a run may go on from a field's start in the part before
                reading = (b"&" if reading[:1] in _RUN else b"x") + reading
            if self._reversed:
                reading = reading[::-1]
            if any(field.search(reading) for field in fields):
                self.found = ("the request body has a `_method` field, or another a framework "
                              "takes the method from (Rails, Laravel, Symfony, Spring, ASP.NET "
                              "and others serve the request as the method it names)")
                return


def _only(content_type: bytes, kind: bytes) -> bool:
    """Is `content_type` (lower-cased) `kind` and no other type a framework reads fields from?
    (`form` is in the urlencoded type's name. A byte past ASCII may be read as another letter:
    Go lower-cases `multİpart` to `multipart`.)"""
    others = [other for other in _FIELDED_TYPES if other != kind]
    if kind == b"urlencoded":
        others.remove(b"form")
    return kind in content_type and content_type.isascii() and \
        not any(other in content_type for other in others)


def percent_decoded(text: bytes) -> bytes:
    """`text` with its percent escapes decoded, as `urllib.parse.unquote_to_bytes` does it, but
    in C: that loops in Python over each `%` (a body of bare ones held the loop for 23 ms per
    64 KiB part; an 8 KiB request path, 11 ms a reading: session 58's review)."""
    if b"%" not in text:
        return text
    pieces = _PERCENT_ESCAPE.split(text)
    pieces[1::2] = map(_HEX_BYTE.__getitem__, pieces[1::2])
    return b"".join(pieces)


def form_decoded(text: bytes) -> bytes:
    """`text` (lower-cased) as the laxest server decodes a form's or a query's name or value:
    `+` a space, `%XX` a byte, and IIS's `%uXXXX` a character (System.Web decodes it: session
    60), in C. An ASCII character is its byte; the dotless i, `i` (.NET's ignoring of case
    reads it as I, in a name too); any other, a byte past ASCII (no name guardd reads has it,
    but it may be in a run around one)."""
    if b"%u" in text:
        pieces = _IIS_ESCAPE.split(text)
        pieces[1::2] = map(_IIS_CHARACTER.get, pieces[1::2], repeat(b"\x80", len(pieces) // 2))
        text = b"".join(pieces)
    text = percent_decoded(text.replace(b"+", b" "))
    return _DOTLESS.sub(b"i", text) if _may_hold_a_dotless_i(text) else text


def _may_hold_a_dotless_i(text: bytes) -> bool:
    """Has `text` a byte `_DOTLESS` reads (one byte at a time: memchr's speed, where two took
    58 us per 64 KiB part)?"""
    return b"\xc4" in text or b"\xfd" in text or b"\xb9" in text


def _decoded(text: bytes) -> bytes:
    """`text` (lower-cased) with its form escapes (`form_decoded`) and JSON `\\u00XX` escapes
    decoded, lower-cased."""
    if b"%" in text or b"+" in text or _may_hold_a_dotless_i(text):
        text = form_decoded(text).lower()
    if b"\\u00" in text:  # (split, not a regex substitution: a function call per escape held
        first, *escaped = text.split(b"\\u00")  # the loop for 7 ms per 64 KiB part)
        text = first + b"".join(_HEX_BYTE[part[:2]] + part[2:] if part[:2] in _HEX_BYTE else
                                b"\\u00" + part for part in escaped)
        text = text.lower()
    return text


def _json_unescaped(text: bytes) -> bytes:
    """`text` (decoded) with the backslash escapes a lenient JSON parser drops dropped: each
    backslash before a byte but a quote or a backslash (those escape within a string)."""
    return _LENIENT_JSON_ESCAPE.sub(rb"\1", text) if b"\\" in text else text


def _unescaped(text: bytes) -> bytes:
    """`text` (decoded, so lower-case) with its backslash escapes dropped as Rack and busboy
    drop them: each backslash and the byte after it read as that byte, a last lone one kept.
    In C: a regex substitution per escape cost Python code per match (a body of backslashes
    held the loop for 18 ms per 64 KiB part). An escaped backslash is held as `A` meanwhile,
    a byte lower-case text has not."""
    if b"A" in text:  # (not lower-case after all: the substitution is exact anyway)
        return _BACKSLASH_ESCAPE.sub(rb"\1", text)
    paired = text.replace(b"\\\\", b"A")  # (left to right, as the escapes pair)
    lone = paired.endswith(b"\\")
    unescaped = (paired[:-1] if lone else paired).replace(b"\\", b"").replace(b"A", b"\\")
    return unescaped + b"\\" if lone else unescaped


def _kept(window: bytes) -> bytes:
    """The bytes kept for the next part: the last `_OVERLAP`, starting after any escape the
    cut would split (third review: kept bytes that began inside `%5b` read as `5b[`, and the
    bracket run after them as no run)."""
    start = max(0, len(window) - _OVERLAP)
    before = window[max(0, start - _ESCAPE_LENGTH):start].lower()
    for marker, length in ((b"\\u", 6), (b"%u", 6), (b"%", 3), (b"\\", 2)):
        at = before.rfind(marker)
        if at != -1 and len(before) - at < length:
            start += length - (len(before) - at)
            break
    return window[start:]


@functools.lru_cache(maxsize=256)
def _readable(charset: bytes) -> bool:
    """Does guardd read a body in `charset` (lower-cased)? Kept: a crafted multipart body
    names one in each of thousands of parts (session 60's last attack: 8.4 ms a 64 KiB part)."""
    return _READABLE_CHARSET.fullmatch(charset) is not None


def _unreadable(text: bytes) -> str:
    """Why a lower-cased body part may name any method in a way guardd does not read ("" when
    it does not): an RFC 2047 encoded word, an RFC 2231 name continued or in a charset guardd
    does not read."""
    if _ENCODED_WORD.search(text):
        return ("the request body has an RFC 2047 encoded word (=?charset?B?...?=), which "
                "commons-fileupload and ASP.NET decode in a field's name: it may name any method")
    for extended in _EXTENDED_NAME.finditer(text):
        charset = extended.group(2)
        if charset is None or (charset and not _readable(charset)):
            return ("the request body has a part name in RFC 2231 form (`name*0=` continued, or "
                    "`name*=` in a charset guardd does not read), which Go and Tomcat decode: "
                    "it may name any method")
    return ""


def shown(raw: bytes, limit: int = 64) -> str:
    """The start of `raw` (`limit` bytes) quoted for a reason or a record, each non-printable
    byte escaped once (`sniff`'s too)."""
    return repr(raw[:limit])[1:]
