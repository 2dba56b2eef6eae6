"""A `_method` field in a request body (guardd.stream.body_method): Rails, Laravel, Symfony, Spring
and ASP.NET serve the POST as the method it names (attack pass: `_method=DELETE` in the body of
an allowed POST went past the rule that denies DELETE)."""

from __future__ import annotations

import re
import time
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.stream import body_method
from guardd.stream.body_method import BodyMethodScan

MULTIPART = (b"--b\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nx\r\n"
             b"--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--b--\r\n")
NAMING = [b"_method=DELETE", b"a=1&_method=delete", b"%5Fmethod=DELETE",
          b"%5f%6d%65%74%68%6f%64=DELETE", b"a=1&+_method=DELETE", b".method=DELETE",
          b"a=1;[method=DELETE", b"_METHOD=DELETE", b"a=1&_method[]=DELETE",
          b'{"_method":"DELETE"}', b'{"a": 1, "\\u005Fmethod": "DELETE"}', MULTIPART,
          b"--b\r\nContent-Disposition: form-data; name*=utf-8''%5Fmethod\r\n\r\nPUT\r\n",
          "_method=DELETE".encode("utf-16-le"), "_method=DELETE".encode("utf-32-be"),
          # Review: PHP ends a name at a NUL (strlen); Rack 2 and qs drop leading brackets;
          # commons-fileupload (Spring) and ASP.NET decode RFC 2047 words in a part's name.
          b"a=1&_method%00x=DELETE",
          b'--B\r\nContent-Disposition: form-data; name="_method\x00x"\r\n\r\nDELETE\r\n',
          b"a=1&[_method]=DELETE", b"a=1&]_method=DELETE",
          b'--B\r\nContent-Disposition: form-data; name="[_method]"\r\n\r\nDELETE\r\n',
          b'--B\r\nContent-Disposition: form-data; name="=?utf-8?B?X21ldGhvZA==?="\r\n\r\nPUT\r\n',
          b'--B\r\nContent-Disposition: form-data; name="=?us-ascii?Q?=5Fmethod?="\r\n\r\nPUT\r\n',
          # Second review: a look-alike encoded word around a field (read in place, it hid
          # it); PHP joins a header line without ':' to the one before; Rack drops backslash
          # escapes in a quoted name, and takes Content-ID for a name; commons-fileupload
          # joins adjacent words, decodes their charset, drops what follows `?=`.
          b"a==?x?q?&_method=DELETE&b=?=", b'{"a":"=?x?q?","_method":"DELETE","b":"?="}',
          b'--X\r\nContent-Disposition: form-data; name="_met\r\nhod"\r\n\r\nDELETE\r\n',
          b'--X\r\nContent-Disposition: form-data; name="\\_method"\r\n\r\nDELETE\r\n',
          b'--X\r\nContent-Disposition: form-data; name="_m\\ethod"\r\n\r\nDELETE\r\n',
          b"--X\r\nContent-ID:_method\r\n\r\nDELETE\r\n--X--\r\n",
          b'--X\r\nContent-Disposition: form-data; name="=?utf-8?Q?=5Fme?= =?utf-8?Q?thod?="\r\n',
          b'--X\r\nContent-Disposition: form-data; name="=?IBM037?Q?=6D=94=85=A3=88=96=84?="\r\n',
          b'--X\r\nContent-Disposition: form-data; name="=?utf-8?Q?=5Fmethod?=zz"\r\n',
          # Third review: Tomcat trims control bytes around a part's name, and decodes RFC 2231
          # `name*=` in any Java charset; Go joins RFC 2231 continuations.
          b'--X\r\nContent-Disposition: form-data; name="\x01_method"\r\n\r\nDELETE\r\n',
          b'--X\r\nContent-Disposition: form-data; name=\x1f_method\r\n\r\nDELETE\r\n',
          b"--X\r\nContent-Disposition: form-data; name*=IBM037''%6D%94%85%A3%88%96%84\r\n",
          b"--X\r\nContent-Disposition: form-data; name*=iso-2022-jp''_%1b%28Bmethod\r\n",
          b"--X\r\nContent-Disposition: form-data; name*0=_me; name*1=thod\r\n\r\nDELETE\r\n",
          b"--X\r\nContent-Disposition: form-data; NAME*0*=utf-8''%5Fme; NAME*1*=%74hod\r\n",
          # Fourth review: Go trims Unicode spaces before a parameter's value, Tomcat too (with
          # UTF-8 headers); Java's UTF-16 decoder eats a byte order mark.
          b"--B\r\nContent-Disposition: form-data; name=\xc2\xa0_method\r\n\r\nDELETE\r\n",
          b"--B\r\nContent-Disposition: form-data; name=\xe3\x80\x80_method\r\n\r\nDELETE\r\n",
          b"\xff\xfe" + "_method".encode("utf-16-le") + b"=" + "DELETE".encode("utf-16-le"),
          b"--B\r\nContent-Disposition: form-data; name*=UTF-16''%FE%FF%00_%00m%00e%00t%00h%00o%00d"
          b"\r\n",
          # Session 60: ASP.NET MVC 5 reads X-HTTP-Method-Override from a form (and the
          # query), its names compared ignoring case (the dotless i reads as I), decoded as
          # System.Web decodes them (`%uXXXX` too).
          b"X-HTTP-Method-Override=DELETE", b"a=1&x-http-method-override=PUT",
          b"X-HTTP-Method-Overrid%u0065=DELETE", b"a=1&%u005fmethod=DELETE",
          b"_metho%U0064=DELETE", "x-http-method-overr\u0131de=PUT".encode(),
          b"x-http-method-overr%u0131de=PUT", b"X-HTTP-Method=PUT", b"x-method-override=PUT",
          b'--B\r\nContent-Disposition: form-data; name="X-HTTP-Method-Override"\r\n\r\nPUT',
          "X-HTTP-Method-Override=DELETE".encode("utf-32-le"),
          # Session 60's attack: Plack and Catalyst read `x-tunneled-method`, Masonite
          # `__method` (JSON too), Salesforce `_HttpMethod`, a Flask recipe
          # `__METHOD_OVERRIDE__`; System.Web decodes a windows-1254 or iso-8859-3 dotless i.
          b"x-tunneled-method=DELETE", b"a=1&__method=DELETE", b'{"__method": "DELETE"}',
          b"_HttpMethod=DELETE", b"a=1&__METHOD_OVERRIDE__=PUT", b"x-http-method-overr\xfdde=PUT",
          b"x-http-method-overr%FDde=PUT", b"x-http-method-overr\xb9de=PUT"]
WIDE_OVERRIDE = b"".join(b"%%%02X" % byte
                        for byte in "X-HTTP-Method-Override".encode("utf-32-le"))
NOT_NAMING = [b"payment_method=card&amount=3", b'{"jsonrpc": "2.0", "method": "sum"}',
              b'{"http_method": "GET"}', b"_methods=1&_method_id=3", b"use the method, please",
              b'{"code": "foo().method(); a._method_x"}', b"", b"x" * 70000,
              b"a=1&my-x-http-method-override=1", b"a=1&http_method=GET&x__method=1",
              b"overr\xfdde=1&a\xb9b=1"]


def scanned(body: bytes, *, split: int = 0, content_type: bytes = b"*/*",
            content_encoding: bytes = b"") -> str:
    scan = BodyMethodScan([content_type] if content_type else [],
                          [content_encoding] if content_encoding else [])
    for start in range(0, len(body), split or len(body) or 1):
        scan.feed(body[start:start + (split or len(body))])
    scan.feed(b"")
    return scan.found


@pytest.mark.parametrize("body", NAMING)
def test_a_method_field_is_found_in_every_spelling_a_framework_reads(body: bytes) -> None:
    assert scanned(body)
    assert scanned(body, split=1) == scanned(body)  # a byte at a time


@pytest.mark.parametrize("body", NOT_NAMING)
def test_other_fields_and_text_are_not_a_method_field(body: bytes) -> None:
    assert scanned(body) == ""
    assert scanned(body, split=7) == ""


def test_a_field_split_anywhere_across_a_long_body_is_found() -> None:
    body = b"a=" + b"%41" * 30000 + b"&%5F%6D%65%74%68%6F%64=DELETE"
    for split in (1000, 4096, 65536):
        assert scanned(body, split=split)


@pytest.mark.parametrize("first, then", [
    (b"a=1&" + b"[" * 300, b"_method]=DELETE"),  # (Rack 2 drops any run of leading brackets)
    # (third review: the kept bytes began inside an escape, and the run read as no run)
    (b"a=1&" + b"%5b" * 100, b"_method=DELETE&pad=" + b"p" * 400),
    (b'--X\r\nContent-Disposition: form-data; name="' + b"\\[" * 200,
     b'_method"\r\n\r\nDELETE\r\n--X\r\n' + b"p" * 400),
    (b'--X\r\nContent-Disposition: form-data; name="=?utf-8?B?X21l' + b"." * 300,
     b'dGhvZA==?="\r\n\r\nDELETE'),  # (commons-fileupload skips what is not base64)
    # (session 60: the longest name, UTF-32 and percent-encoded, its last character cut off)
    (b"a=1&" + WIDE_OVERRIDE[:-12], WIDE_OVERRIDE[-12:] + b"=DELETE&pad=" + b"p" * 400),
])
def test_a_field_whose_spelling_outgrows_the_window_is_found(first: bytes, then: bytes) -> None:
    """Second review: the run before the name was longer than the bytes kept between parts."""
    scan = BodyMethodScan([b"*/*"], [])
    for part in (first, then, b""):
        scan.feed(part)
    assert scan.found


@pytest.mark.parametrize(("content_type", "content_encoding", "named"), [
    (b"application/x-www-form-urlencoded; charset=IBM037", b"", "charset 'IBM037'"),
    (b"application/x-www-form-urlencoded; Charset=\"utf-7\"", b"", "charset 'utf-7'"),
    (b"application/x-www-form-urlencoded", b"gzip", "Content-Encoding 'gzip'"),
    # (the final attack of session 60: charsets that have the dotless i, X-Method-Overr\u0131de)
    (b"application/x-www-form-urlencoded; charset=EUC-KR", b"", "charset 'EUC-KR'"),
    (b"application/x-www-form-urlencoded; charset=gb18030", b"", "charset 'gb18030'"),
    (b"application/x-www-form-urlencoded; charset=euc-jp", b"", "charset 'euc-jp'"),
    # (review: Tomcat finds "charset=" anywhere in the value)
    (b"application/x-www-form-urlencoded; xcharset=IBM037", b"", "charset 'IBM037'"),
])
def test_a_body_guardd_cannot_read_may_name_any_method(
        content_type: bytes, content_encoding: bytes, named: str) -> None:
    assert named in scanned(b"a=1", content_type=content_type,
                            content_encoding=content_encoding)


@pytest.mark.parametrize(("content_type", "read"), [
    (b"", True), (b"application/x-www-form-urlencoded", True), (b"multipart/mixed; boundary=b", True),
    (b"*/*", True), (b"application/*", True),  # (Spring WebFlux read a form under a wildcard)
    (b"application/octet-stream", False), (b"image/png", False)])
def test_a_body_is_read_unless_no_framework_reads_fields_from_its_type(content_type: bytes,
                                                                       read: bool) -> None:
    assert bool(scanned(b"_method=DELETE", content_type=content_type)) is read
    assert bool(scanned(b"_method=DELETE", content_type=content_type,
                        content_encoding=b"gzip")) is read


@pytest.mark.parametrize("content_type", [
    b"application/x-www-form-urlencoded; charset=UTF-8", b"text/plain; charset=iso-8859-1",
    b"application/json; charset=utf-16le", b"multipart/form-data; boundary=b",
    # (session 60's last attack: charsets in which ASCII is ASCII)
    b"application/x-www-form-urlencoded; charset=Shift_JIS", b"application/json; charset=GBK",
    b"text/plain; charset=big5", b"text/plain; charset=koi8-r"])
def test_charsets_it_reads_are_read(content_type: bytes) -> None:
    assert scanned(b"a=1", content_type=content_type) == ""
    assert scanned(b"a=1", content_type=content_type, content_encoding=b"identity") == ""


@given(st.binary(max_size=400), st.integers(min_value=1, max_value=50))
def test_the_verdict_does_not_depend_on_how_the_body_is_split(body: bytes, split: int) -> None:
    assert bool(scanned(body, split=split)) == bool(scanned(body))


@pytest.mark.parametrize("body", [b"a=" + b" " * 65536 + b"xmethod=1", b"name*=" * 10922,
                                  b"a=" + b"%20" * 21000 + b"xmethod=1",
                                  b"&" + b"[" * 65536 + b"xmethod=1",
                                  b"_method=" * 8000 + b"x"])
def test_no_body_makes_the_reader_slow(body: bytes) -> None:
    """Third review: a run of spaces before a near-name cost the regex quadratic time; 64 KiB
    held the event loop for a minute. Each of these takes milliseconds now (a second is
    slack for a loaded machine; quadratic would be a minute)."""
    started = time.process_time()
    scanned(body, content_type=b"application/x-www-form-urlencoded")
    assert time.process_time() - started < 1.0


JSON = b"application/json"


@pytest.mark.parametrize("body", [b"def _method(self):\n    return 1\n",
                                  b"Subject: =?UTF-8?B?SGk=?=\r\n\r\nsee X-HTTP-Method-Override",
                                  b"const [method, path] = route; a._method = 1"])
def test_a_body_with_no_type_is_read_as_a_form(body: bytes) -> None:
    """Session 60's last attack (Medium; a regression of that session's reading of every
    method's body): `curl -T file` and `requests.put(data=...)` send no Content-Type, and a
    source file or an email in one was read as multipart, any space a name's start. With no
    type, Rack and WebOb read a form (no multipart without a boundary)."""
    assert scanned(body, content_type=b"") == ""
    assert scanned(b"a=1&" + body + b"&_method=DELETE", content_type=b"")


def test_a_json_body_with_a_content_encoding_may_name_any_method() -> None:
    """Session 60 exempted a JSON body's Content-Encoding (npm's audit posts gzipped JSON),
    and its final attack had Express (body-parser inflates by default, method-override reading
    `req.body._method`) serve a gzipped `{"_method":"DELETE"}` as a DELETE: it fails closed
    again."""
    for encoding in (b"gzip", b"deflate"):
        for kind in (JSON, b"application/vnd.api+json"):
            assert "Content-Encoding" in scanned(b"\x1f\x8b", content_type=kind,
                                                 content_encoding=encoding)


@pytest.mark.parametrize(("content_type", "body"), [
    # Fourth review: code in a JSON body to an LLM API, a subject line, a file name: only
    # Laravel reads `_method` from JSON, as a key; RFC 2047 and 2231 live in multipart headers.
    (JSON, b'{"messages": [{"content": "fetch(url)\\n  .method(\\"GET\\")"}]}'),
    (JSON, b'{"content": "for (const [method, path] of routes) {}; def _method(self): pass"}'),
    (JSON, b'{"subject": "=?UTF-8?B?SGVsbG8=?=", "filename": "report name*1.txt"}'),
    # Session 60's last attack (Low): an LLM prompt quoting Laravel. A backslash in JSON only
    # escapes within a string (`"\_method"` is no JSON: json_decode refuses it), and an escaped
    # quote ends none: such text is never a key.
    (JSON, b'{"prompt": "spoof it with {\\"_method\\": \\"DELETE\\"} in Laravel"}'),
    (JSON, b'{"code": "$data = [\\"__method\\" : 1];"}'),
    (b"application/x-www-form-urlencoded", b"code=def+_method%28self%29%3A&subject=%3D%3Futf-8%3F"
                                          b"q%3Fhi%3F%3D"),
])
def test_code_and_text_in_json_and_form_values_are_not_a_method_field(content_type: bytes,
                                                                      body: bytes) -> None:
    assert scanned(body, content_type=content_type) == ""
    assert scanned(body, split=5, content_type=content_type) == ""


@pytest.mark.parametrize(("content_type", "body"), [
    (JSON, b'{"a": 1, "_method": "DELETE"}'), (JSON, b'{"a": 1, "\\u005fmethod" : "DELETE"}'),
    # (the review: Jackson with ALLOW_BACKSLASH_ESCAPING_ANY_CHARACTER reads `\_` as `_`)
    (JSON, b'{"a": 1, "\\_method": "DELETE"}'), (JSON, b'{"\\_\\_method": "DELETE"}'),
    (b"text/plain; x=/json", b'{"_method": "DELETE"}'),  # (Laravel: "/json" anywhere in it)
    (JSON, '{"_method": "DELETE"}'.encode("utf-16-le")),
    (b"application/x-www-form-urlencoded", b"a=1&_method=DELETE"),
    (b"application/x-www-form-urlencoded", b"a=1;%5B_method%5D=DELETE"),
])
def test_json_keys_and_form_fields_are_read(content_type: bytes, body: bytes) -> None:
    assert scanned(body, content_type=content_type)


@pytest.mark.parametrize(("content_type", "parts"), [
    # Fifth review: JSON allows any whitespace before a key's colon, past the bytes kept.
    (JSON, [b'{"a":1,"_method"', b" " * 1000, b':"DELETE"}']),
    # ASP.NET and Spring WebFlux decode a form's charset first, then its percent escapes;
    # body-parser decodes UTF-16 JSON, then its escapes.
    (b"application/x-www-form-urlencoded; charset=utf-16",
     ["a=1&%5Fmethod=DELETE".encode("utf-16-le")]),
    (b"application/x-www-form-urlencoded; charset=utf-16le",
     ["a=1&%5F%00method=DELETE".encode("utf-16-le")]),
    (b"application/json; charset=utf-16le", ['{"\\u005fmethod":"DELETE"}'.encode("utf-16-le")]),
    # Go lower-cases Unicode in a media type: this is multipart to it.
    (b"mult\xc4\xb0part/form-data; boundary=urlencoded",
     [b'--urlencoded\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n']),
])
def test_a_field_read_in_another_order_or_type_is_found(content_type: bytes,
                                                        parts: list[bytes]) -> None:
    scan = BodyMethodScan([content_type], [])
    for part in (*parts, b""):
        scan.feed(part)
    assert scan.found


# --- the readings in C: each the same as the regex it replaced (crafted bodies cost up to 27 ms
# of the event loop per 64 KiB part: a review measured 0.3-0.4 s of CPU per MB) ---------------

#: The forward spellings of `_ANYWHERE` and `_IN_FORM` (searched reversed now) and of the
#: substitutions `_unescaped` and `_decoded` make in C: the oracle each must agree with.
FORWARD_FIELD = re.compile(rb"(?:^|[&;\"'=:{,]|(?<![\x00-\x20\[\]\x80-\xff])[\x00-\x20\x80-\xff])"
                           rb"[\x00-\x20\[\]\x80-\xff]*[_.\[]method[^a-z0-9_]")
FORWARD_FORM_FIELD = re.compile(rb"(?:^|[&;])[\x00-\x20\[\]\x80-\xff]*[_.\[]method[^a-z0-9_]")
ENDS_IN_METHOD = rb"(?:[_.\[]|x-http-|x-tunneled-|__|_http)method[^a-z0-9_]"
OTHERS = rb"(?:x-http-method-override|x-method-override|__method_override__)[^a-z0-9_]"
FORWARD_OVERRIDE = re.compile(FORWARD_FIELD.pattern.replace(rb"[_.\[]method[^a-z0-9_]", OTHERS))
FORWARD_FORM_OVERRIDE = re.compile(FORWARD_FORM_FIELD.pattern.replace(
    rb"[_.\[]method[^a-z0-9_]", OTHERS))
FORWARD_FIELD = re.compile(FORWARD_FIELD.pattern.replace(rb"[_.\[]method[^a-z0-9_]",
                                                         ENDS_IN_METHOD))
FORWARD_FORM_FIELD = re.compile(FORWARD_FORM_FIELD.pattern.replace(rb"[_.\[]method[^a-z0-9_]",
                                                                   ENDS_IN_METHOD))
BACKSLASH_ESCAPE = re.compile(rb"\\(.)", re.DOTALL)
JSON_ESCAPE = re.compile(rb"\\u00([0-9a-fA-F]{2})")
PIECES = st.sampled_from([b"_method", b".method", b"[method", b"method", b"_", b"[", b"]", b"&",
                          b";", b"=", b":", b"{", b",", b'"', b" ", b"\x00", b"\r", b"\n",
                          b"\x80", b"\xff", b"x", b"1", b"\\", b"\\\\", b"\\u00", b"5f", b"4A",
                          b"%", b"%2", b"%5F", b"%zz", b"+", b"A", b"x-http-method", b"-",
                          b"-override", b"x-method-override", b"x-tunneled", b"_http",
                          b"__method", b"__method_override__"])


@given(st.lists(PIECES, max_size=24))
def test_a_field_is_found_in_the_reversed_text_where_the_forward_regex_finds_it(
        pieces: list[bytes]) -> None:
    text = b"".join(pieces).lower()
    for reversed_field, forward_field in zip(
            body_method._ANYWHERE + body_method._IN_FORM,
            (FORWARD_FIELD, FORWARD_OVERRIDE, FORWARD_FORM_FIELD, FORWARD_FORM_OVERRIDE)):
        assert bool(reversed_field.search(text[::-1])) == bool(forward_field.search(text))


@given(st.lists(PIECES, max_size=24), st.booleans())
def test_escapes_are_dropped_and_decoded_as_the_substitutions_did(pieces: list[bytes],
                                                                  lower: bool) -> None:
    text = b"".join(pieces)
    text = text.lower() if lower else text
    assert body_method._unescaped(text) == BACKSLASH_ESCAPE.sub(rb"\1", text)
    expected = urllib.parse.unquote_to_bytes(text.replace(b"+", b" ")).lower() \
        if b"%" in text or b"+" in text else text
    if b"\\u00" in expected:
        expected = JSON_ESCAPE.sub(lambda found: bytes([int(found.group(1), 16)]),
                                   expected).lower()
    assert body_method._decoded(text) == expected
