"""`guardd.http11`: h11 with its header-line pattern made linear."""

from __future__ import annotations

import random
import re
import time

import h11
import pytest
from h11 import _abnf

from guardd import http11

#: h11's own patterns, as it compiles them (`h11._readers.header_field_re`, `chunk_header_re`).
ORIGINAL = re.compile(_abnf.header_field.encode("ascii"))
ORIGINAL_CHUNK = re.compile(_abnf.chunk_header.encode("ascii"))


def refused_at_once(*reads: bytes) -> None:
    """guardd's h11, reading a response in `reads`, refuses the last within a second."""
    parser = http11.h11.Connection(h11.CLIENT, max_incomplete_event_size=128 * 1024)
    parser.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    for data in reads[:-1]:
        parser.receive_data(data)
        assert parser.next_event() is not h11.NEED_DATA
    parser.receive_data(reads[-1])
    started = time.perf_counter()
    with pytest.raises(h11.RemoteProtocolError):
        parser.next_event()
    assert time.perf_counter() - started < 1.0


def test_a_long_run_of_spaces_before_a_refused_byte_is_refused_at_once() -> None:
    """Session 55's last re-attack (High): h11's header-line pattern backtracks over two runs
    of optional whitespace, quadratic in their length: `X:` and 60,000 spaces before a byte it
    refuses (VT, FF, a bare CR, NUL) held the loop 7 s in a response head, 1.5 s in a request
    head to the proxy listener, before its login. guardd's h11 reads such a line in linear
    time, and refuses it as h11 does."""
    for refused in (b"\x0b", b"\x0c", b"\r", b"\x00"):
        line = b"X:" + b" " * 60_000 + refused
        started = time.perf_counter()
        assert http11.h11._readers.header_field_re.fullmatch(line) is None
        assert time.perf_counter() - started < 1.0  # (7 s before; well under 10 ms now)
    refused_at_once(b"HTTP/1.1 200 OK\r\nX:" + b" " * 60_000 + b"\x0b\r\n\r\n")


def test_the_linear_pattern_reads_every_line_as_h11s_own_does() -> None:
    """The same matches, the same name and value, on lines made of the bytes that matter
    (a differential: the linear pattern is h11's, only its quantifiers possessive)."""
    pieces = [b"X", b"a-b", b":", b" ", b"\t", b"v", b"\x0b", b"\x0c", b"\r", b"\x00",
              b"\x80", b"\xff", b"(", b"\"", b",", b";", b"=", b"  ", b"\t ", b"x y"]
    linear = http11.h11._readers.header_field_re
    generator = random.Random(55)
    for _ in range(50_000):
        line = b"".join(generator.choice(pieces) for _ in range(generator.randrange(1, 12)))
        theirs, ours = ORIGINAL.fullmatch(line), linear.fullmatch(line)
        assert (theirs is None) == (ours is None), line
        if theirs is not None and ours is not None:
            assert theirs.groupdict() == ours.groupdict(), line


def test_a_chunk_line_of_many_spaces_before_a_bare_lf_is_refused_at_once() -> None:
    """Session 55's regex hunt (High): h11's chunk-size line, `size (";" ext)? OWS CRLF`, lets
    the extension's `.*` and the whitespace before the CRLF share a run of spaces: `1;`, 60,000
    spaces, a bare LF, then CRLF held every listener 1.9 s in a response (four connections at
    a time: another client's DNS waited 7.4 s), 0.13 s in a request body. guardd's h11 reads
    such a line in linear time, and refuses it as h11 does."""
    for run in (b" ", b"\t"):
        line = b"1;" + run * 60_000 + b"\n\r\n"
        started = time.perf_counter()
        assert http11.h11._readers.chunk_header_re.fullmatch(line) is None
        assert time.perf_counter() - started < 1.0  # (about 2 s before)
    refused_at_once(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                    b"1;" + b" " * 60_000 + b"\n\r\n")


def test_the_linear_chunk_pattern_reads_every_line_as_h11s_own_does() -> None:
    """The same lines match, with the same chunk size (h11 drops the extension)."""
    pieces = [b"0", b"1", b"a", b"F", b"12345", b";", b"x=y", b"=", b" ", b"\t", b"\r",
              b"\n", b"\r\n", b"\"", b"\x00", b"\x80", b"g", b"  ", b"\t "]
    linear = http11.h11._readers.chunk_header_re
    generator = random.Random(55)
    for _ in range(50_000):
        line = b"".join(generator.choice(pieces) for _ in range(generator.randrange(1, 10)))
        line += generator.choice([b"\r\n", b""])
        theirs, ours = ORIGINAL_CHUNK.fullmatch(line), linear.fullmatch(line)
        assert (theirs is None) == (ours is None), line
        if theirs is not None and ours is not None:
            assert theirs["chunk_size"] == ours["chunk_size"], line


class _Counted:
    """A header-line pattern that counts the lines it is asked to read."""

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.lines = 0

    def fullmatch(self, line: bytes) -> re.Match[bytes] | None:
        self.lines += 1
        return self.pattern.fullmatch(line)


@pytest.mark.parametrize("where", ["request", "response", "trailer"])
def test_a_head_or_trailer_of_too_many_lines_is_refused_before_a_line_is_read(
        where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Session 55 left open (Medium as its attack measured it: 28 to 34 ms once a connection,
    another client's max while one reconnected 18,000 times): h11 reads a chunked body's
    trailer with its last chunk, in one event, about 2 us a field, and the follower could
    refuse one of too many fields only once it was read; a request head was read whole before
    its fields were counted (3.8 ms for 16 KiB). guardd's h11 refuses a head or trailer of
    more than `MAX_FIELD_LINES` lines (folded ones counted) before it reads one, 431."""
    counted = _Counted(http11.h11._readers.header_field_re)
    monkeypatch.setattr(http11.h11._readers, "header_field_re", counted)
    fields = b"a: b\r\n" * http11.MAX_FIELD_LINES
    role = h11.SERVER if where == "request" else h11.CLIENT
    parser = http11.h11.Connection(role, max_incomplete_event_size=128 * 1024)
    start = b"GET / HTTP/1.1\r\nHost: a\r\n"
    if where == "request":
        parser.receive_data(start + fields + b"\r\n")
    else:
        parser.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
        parser.receive_data(b"HTTP/1.1 200 OK\r\n" + (
            fields + b"x: y\r\n\r\n" if where == "response" else
            b"Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n" + fields + b"x: y\r\n\r\n"))
        if where == "trailer":
            assert isinstance(parser.next_event(), h11.Response)
            assert isinstance(parser.next_event(), h11.Data)
    read = counted.lines
    with pytest.raises(h11.RemoteProtocolError) as refused:
        parser.next_event()
    assert counted.lines == read and refused.value.error_status_hint == 431
    assert f"more than {http11.MAX_FIELD_LINES} header lines" in str(refused.value)
    fine = http11.h11.Connection(h11.SERVER)
    fine.receive_data(start + b"a: b\r\n" * (http11.MAX_FIELD_LINES - 1) + b"\r\n")
    assert len(fine.next_event().headers) == http11.MAX_FIELD_LINES  # type: ignore[union-attr]
