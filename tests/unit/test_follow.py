"""`stream.follow.Follower`: requests out one at a time, re-serialized; responses tracked."""

from __future__ import annotations

import h11
import pytest
from h11._receivebuffer import ReceiveBuffer

from guardd.http11 import MAX_FIELD_LINES
from guardd.stream.body_method import BodyMethodScan
from guardd.stream.follow import (BODY_EVENTS, MAX_HEADERS, MAX_INTERIM, RESPONSE_EVENTS,
                                  RESPONSE_HEAD_CAP, Body, BodyMethod, Broken, Follower, Head,
                                  Origin)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def drain(follower: Follower) -> list[Head | Body | BodyMethod | Broken]:
    """Every part that can go now, each sent as the tunnel sends it."""
    out = []
    while (part := follower.next_request()) is not None:
        out.append(part)
        if isinstance(part, Broken):
            break
        follower.sent()
    return out


def sent(parts: list[Head | Body | BodyMethod | Broken]) -> bytes:
    return b"".join(p.data for p in parts if not isinstance(p, Broken))


def answered(follower: Follower, data: bytes) -> bytes | Broken:
    """What goes to the client of `data` from the server, every step of it (`response_more`),
    as the tunnel sends it; or what broke the stream."""
    gone = b""
    step = follower.response_data(data)
    while not isinstance(step, Broken):
        gone += step
        if not follower.response_continues:
            return gone
        step = follower.response_more()
    return step


def test_a_request_comes_out_as_its_head_then_its_body() -> None:
    follower = Follower("api.test")
    follower.client_data(b"POST /a HTTP/1.1\r\nhost: api.test\r\nContent-Length: 3\r\n\r\nabc")
    parts = drain(follower)
    assert isinstance(parts[0], Head) and parts[0].method == "POST"
    assert parts[0].data == b"POST /a HTTP/1.1\r\nhost: api.test\r\nContent-Length: 3\r\n" \
        b"Connection: close\r\n\r\n"  # (a request with a body is the connection's last)
    assert sent(parts[1:]) == b"abc"
    assert follower.awaiting_response


@pytest.mark.parametrize("body", [b"PROXY_URL=http://x.test&a=1", b"PROXYING=1&a=b"])
def test_a_body_that_begins_proxy_goes(body: bytes) -> None:
    """Review of attack pass 51: a first line that starts `PROXY` is a PROXY header to gunicorn
    (as a connection's first bytes); a form body that begins so was cut as one."""
    follower = Follower("api.test")
    follower.client_data(b"POST /a HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body)
    parts = drain(follower)
    assert not any(isinstance(part, Broken) for part in parts), parts
    assert sent(parts[1:]) == body


def test_pipelined_requests_go_one_at_a_time_after_each_response() -> None:
    follower = Follower("api.test")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\n"
                         b"Content-Length: 0\r\n\r\n")
    first = drain(follower)
    assert [p.method for p in first if isinstance(p, Head)] == ["GET"]
    assert follower.response_data(OK[:-1]) == OK[:-1] and drain(follower) == []  # not over yet
    assert follower.response_data(OK[-1:]) == OK[-1:]
    second = drain(follower)
    assert [p.method for p in second if isinstance(p, Head)] == ["POST"]


def test_a_chunked_request_with_a_content_length_goes_chunked_without_it() -> None:
    follower = Follower("a")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    out = sent(drain(follower))
    assert b"Content-Length" not in out and b"Transfer-Encoding: chunked" in out
    assert out.endswith(b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n")


def test_an_http10_request_gets_a_host_and_keeps_its_meaning() -> None:
    """It goes as HTTP/1.0 (attack pass 27: as 1.1, a server answered it chunked), unless
    its body is chunked (invalid in 1.0, framed by h11 for 1.1 as it was read)."""
    follower = Follower("docs.test")
    follower.client_data(b"GET /x HTTP/1.0\r\n\r\n")
    head = drain(follower)[0]
    assert isinstance(head, Head)
    assert head.data == b"GET /x HTTP/1.0\r\nHost: docs.test\r\nConnection: close\r\n\r\n"
    follower = Follower("docs.test")
    follower.client_data(b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    head = drain(follower)[0]
    assert isinstance(head, Head) and head.data.startswith(b"POST /x HTTP/1.1\r\n")


def test_an_http10_client_asking_keep_alive_is_answered_close() -> None:
    """Review: sent as HTTP/1.0, a request that asks keep-alive gets `HTTP/1.0 200 OK` with
    `Connection: keep-alive` from Go's server, which h11 does not read as kept alive (1.0):
    the client's next request was cut, recorded as a denial, though the server had not
    closed. Every 1.0 request asks the server to close, and the response says so to the
    client, which asks its next on a new connection."""
    follower = Follower("docs.test")
    follower.client_data(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    head = drain(follower)[0]
    assert isinstance(head, Head)
    assert head.data == b"GET /x HTTP/1.0\r\nHost: docs.test\r\nConnection: close\r\n\r\n"


def test_bytes_that_are_not_http_break_the_stream() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    follower.response_data(OK)
    follower.client_data(b"\x16\x03\x01garbage\r\n\r\n")
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and "not an HTTP/1.x request" in broken.problem
    assert follower.next_request() is broken  # for good


def test_connect_and_upgrade_requests_break_the_stream() -> None:
    for head in (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n",
                 b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"):
        follower = Follower("a")
        follower.client_data(head)
        (broken,) = drain(follower)
        assert isinstance(broken, Broken)


def test_a_response_that_is_not_http_breaks_the_stream() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    broken = follower.response_data(b"SSH-2.0-OpenSSH\r\n\r\n")
    assert isinstance(broken, Broken) and "server" in broken.problem


@pytest.mark.parametrize("before", [b"", b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"])
def test_a_response_no_request_went_for_breaks_the_stream(before: bytes) -> None:
    """Attack pass (2026-12-04): a server that sent three responses as it accepted, before
    any request, was not cut when its connect waited for the first request (a method rule),
    nor through the HTTP proxy: the early responses were taken for the answers, and the next
    request went before the server had answered anything. Response bytes with no request out
    (none yet, or the last one answered) are no responses to the requests."""
    follower = Follower("a")
    follower.client_data(before + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    if before:
        drain(follower)
        assert follower.response_data(OK) == OK  # the answer to /1; /2 has not gone
    broken = follower.response_data(OK)
    assert isinstance(broken, Broken) and "no request went" in broken.problem, broken
    assert follower.next_request() is broken


@pytest.mark.parametrize("extra", [OK, b"\r\n"])
def test_bytes_after_a_whole_response_in_the_same_read_break_the_stream(extra: bytes) -> None:
    """The response they follow is whole and answers the request: it goes to the client
    before the cut (review: a stray CRLF after it, or a 204's body, cost the client it)."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    broken = follower.response_data(OK + extra)
    assert isinstance(broken, Broken) and "no request went" in broken.problem, broken
    assert broken.answered == OK


@pytest.mark.parametrize("after, interim", [(b"", 0), (OK, 0), (b"", 64), (b"", 100)],
                         ids=["alone", "then-unasked-bytes", "after-64-interim",
                              "after-100-interim"])
def test_a_read_dense_with_events_is_read_a_bounded_step_at_a_time(after: bytes,
                                                                    interim: int) -> None:
    """Session 55's attack (Medium): a chunked response of 1-byte chunks was read whole at
    each read, 2,700 events in 12 ms for 16 KiB (48 ms for 64 KiB), and eight such
    connections held the loop, every other client's DNS included, about 100 ms at a time. A
    read is taken `RESPONSE_EVENTS` events a step (`response_more` takes the next); what goes
    is what was read, and bytes after the response still break the stream before they go.
    (The review: after 64 interim responses the count had passed the cap, and the rest of
    the read was read whole again.)"""
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    head = b"HTTP/1.1 102 Processing\r\n\r\n" * interim + \
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"1\r\nx\r\n" * 3000 + b"0\r\n\r\n"
    events = follower.response_events
    out = follower.response_data(head + body + after)
    steps = [out]
    limit = max(interim, RESPONSE_EVENTS) + 1  # (interim heads: MAX_INTERIM at most)
    while follower.response_continues:
        assert follower.response_events - events <= limit
        assert sum(follower.held) >= 2 * len(follower._unread)  # (held, and counted)
        events, limit = follower.response_events, RESPONSE_EVENTS + 1
        steps.append(follower.response_more())
    assert follower.response_events - events <= limit  # (the last step too)
    assert len(steps) >= 3000 // RESPONSE_EVENTS  # (a 1-byte chunk is one event)
    if after:
        assert isinstance(steps[-1], Broken) and "no request went" in steps[-1].problem
        gone = b"".join(step for step in steps[:-1] if isinstance(step, bytes))
        assert gone + steps[-1].answered == head + body
    else:
        assert b"".join(steps) == head + body and not follower.awaiting_response  # type: ignore


def test_a_pipelined_request_waits_until_the_read_before_it_is_read_to_its_end() -> None:
    """Session 55's last attack (Medium): a response that ended exactly at a step's end, an
    unasked response behind it in the same read, and a pipelined request: the request was
    handed out (judged, sent) before the rest of the read was, and the unasked bytes went to
    the client as its answer. The next request waits for the read's last step, which breaks
    the stream on them."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                         b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = head + b"1\r\nx\r\n" * (RESPONSE_EVENTS - 2) + b"0\r\n\r\n"
    out = follower.response_data(first + OK)
    assert out == first and follower.response_continues  # (it ended at the step's end)
    assert follower.awaiting_response and follower.next_request() is None
    broken = follower.response_more()
    assert isinstance(broken, Broken) and "no request went" in broken.problem, broken
    assert follower.next_request() is broken


@pytest.mark.parametrize("final", [OK, b"HTTP/1.1 204 No Content\r\n\r\n"], ids=["200", "204"])
def test_a_step_that_ends_where_only_the_responses_end_is_left_still_reads_it(
        final: bytes) -> None:
    """Session 55's re-attack (Low): 62 or 63 interim heads and a whole response in one read:
    the step ended with every byte read but the response's end not yet taken from h11, nothing
    was left unread, and no step more came: the next request never went (the client waited for
    the idle timeout). A step is due until h11 has nothing more to say of the read."""
    interim = b"HTTP/1.1 102 Processing\r\n\r\n"
    for count in (RESPONSE_EVENTS - 2, RESPONSE_EVENTS - 1):
        follower = Follower("a")
        follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                             b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        drain(follower)
        out = [follower.response_data(interim * count + final)]
        while follower.response_continues:
            out.append(follower.response_more())
        assert b"".join(out) == interim * count + final  # type: ignore[arg-type]
        assert not follower.awaiting_response and isinstance(follower.next_request(), Head)


@pytest.mark.parametrize("interim", [False, True], ids=["final", "interim"])
def test_a_response_head_of_too_many_fields_breaks_the_stream_before_h11_reads_it(
        interim: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Session 55's re-attack (Medium): a head (or an interim one) of 80 KB of `a: b` fields
    is one h11 event, 12 to 28 ms of parsing in one step, whatever the step's count of events:
    eight connections held every other client 60 to 100 ms. A head of more than
    `MAX_FIELD_LINES` lines breaks the stream before h11 reads it, guardd's answer due: not
    even split into lines (session 56's review: h11's own count comes after its split, 4 to 6
    ms for 80 KB of lines, where the follower's count of them takes 0.1)."""
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    fields = b"a: b\r\n" * (MAX_FIELD_LINES + 1)
    head = (b"HTTP/1.1 103 Early Hints\r\n" if interim else b"HTTP/1.1 200 OK\r\n") + fields
    events = follower.response_events
    splits: list[int] = []
    split = ReceiveBuffer.maybe_extract_lines
    monkeypatch.setattr(ReceiveBuffer, "maybe_extract_lines",
                        lambda buffer: splits.append(1) or split(buffer))
    broken = follower.response_data(head + b"\r\n" + OK)
    assert isinstance(broken, Broken) and broken.server and f"{MAX_FIELD_LINES}" in \
        broken.problem and follower.answer_due, broken
    assert follower.response_events == events and not splits  # (h11 read none of it)
    monkeypatch.undo()
    fine = Follower("a")
    fine.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(fine)
    whole = b"HTTP/1.1 200 OK\r\n" + b"a: b\r\n" * MAX_FIELD_LINES + b"\r\n"
    assert fine.response_data(whole[:100]) == b""  # (a head under way, split anywhere)
    assert fine.response_data(whole[100:]) == whole


def test_a_trailer_of_too_many_fields_breaks_the_stream() -> None:
    """The same re-attack: a chunked body's trailer is read with the last chunk, in one event
    (21 to 30 ms for 80 KB of fields), which cannot be told apart before; it breaks the stream
    before h11 reads its lines (`http11.MAX_FIELD_LINES`; session 55 read it whole first)."""
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert answered(follower, head) == head
    broken = answered(follower, b"1\r\nx\r\n0\r\n" + b"a: b\r\n" * (MAX_FIELD_LINES + 1)
                      + b"\r\n")
    assert isinstance(broken, Broken) and broken.server and \
        f"more than {MAX_FIELD_LINES} header lines" in broken.problem, broken


@pytest.mark.parametrize("fields", [b"link: </s>\r\n" * 200,
                                    b"link: </s>" + b"\r\n </t>" * 200 + b"\r\n"],
                         ids=["many-fields", "one-folded-field"])
def test_interim_heads_of_many_lines_are_read_a_bounded_step_at_a_time(fields: bytes) -> None:
    """The same re-attack: 100 interim heads of 200 fields each were 64 events in a step, each
    a head's parsing. A head weighs its fields in the step's count; its lines since session 56
    (the last review of 55, Low: a field folded over many lines, obs-fold, which h11 unfolds,
    is one field, and 64 interim heads of one field folded over 200 lines each were one step,
    about 2.6 ms of parsing where a step is meant to be about 0.7)."""
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    interim = b"HTTP/1.1 103 Early Hints\r\n" + fields + b"\r\n"
    response = interim * MAX_INTERIM + OK
    events = follower.response_events
    out = [follower.response_data(response)]
    steps = [follower.response_events - events]
    while follower.response_continues:
        events = follower.response_events
        out.append(follower.response_more())
        steps.append(follower.response_events - events)
    assert b"".join(out) == response  # type: ignore[arg-type]
    assert max(steps) <= RESPONSE_EVENTS + 1 + 202 // 8 and len(steps) > 20, steps


def test_an_interim_response_and_the_final_one_in_one_read_are_the_answer() -> None:
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    assert follower.response_data(b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n" + OK) \
        == b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n" + OK
    assert not follower.awaiting_response


def big_head(size: int) -> bytes:
    """A 200 whose head is about `size` bytes (cookies), then its 2-byte body."""
    cookies = b"".join(b"Set-Cookie: c%d=%s; Path=/\r\n" % (i, b"v" * 90)
                       for i in range(size // 110))
    return b"HTTP/1.1 200 OK\r\n" + cookies + b"Content-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("size", [17_000, 60_000])
def test_a_response_head_goes_whole_however_it_is_split(size: int) -> None:
    """Attack pass (2026-12-05): a response head over 16 KiB (h11's default cap) that came in
    more than one read was cut part-way, after its first reads had gone to the client: curl
    took the truncated head for the response, its last cookies and the body lost. A head up
    to `RESPONSE_HEAD_CAP` waits in guardd until it is whole, then goes with what followed."""
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    response = big_head(size)
    cut = response.index(b"\r\n\r\n") - 5
    assert follower.response_data(response[:1460]) == b""
    assert follower.unanswered  # (nothing went: guardd's answer could still go instead)
    assert follower.response_data(response[1460:cut]) == b""
    assert answered(follower, response[cut:]) == response
    assert not follower.awaiting_response and not follower.unanswered


def test_a_response_head_waiting_whole_counts_against_the_clients_memory() -> None:
    """Attack pass 49 (a hostile origin): 500 connections whose server sent 65,000 bytes of a
    head that never ended held 80 MB in guardd, outside `maxBufferedPerClient`: the head
    waits in the follower, and again in h11's buffer, and the memory sweep counted neither."""
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /next")
    drain(follower)
    assert follower.held == (len(b"GET /next"), 0)
    assert follower.response_data(big_head(RESPONSE_HEAD_CAP)[:60_000]) == b""
    assert follower.held == (len(b"GET /next"), 2 * 60_000)


def test_a_response_head_over_the_cap_breaks_the_stream_before_any_of_it_went() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    response = big_head(RESPONSE_HEAD_CAP + 5000)
    assert follower.response_data(response[:30_000]) == b""
    broken = follower.response_data(response[30_000:RESPONSE_HEAD_CAP + 1000])
    assert isinstance(broken, Broken) and broken.answered == b""
    assert f"over {RESPONSE_HEAD_CAP} bytes" in broken.problem
    assert follower.answer_due  # (guardd's 502 goes in its place)


def test_an_interim_response_goes_at_once_and_the_final_head_waits_whole() -> None:
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
    assert follower.response_data(hints + OK[:10]) == hints
    assert follower.answer_due  # (an interim response is no answer: a 502 may still follow)
    assert follower.response_data(OK[10:]) == OK[:10] + OK[10:]
    assert not follower.answer_due


def test_a_head_that_breaks_after_an_interim_response_went_leaves_guardds_answer_due() -> None:
    """Review: after a 103 had gone, an oversized final head was cut without a word."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
    response = big_head(RESPONSE_HEAD_CAP + 5000)
    assert follower.response_data(hints + response[:30_000]) == hints
    broken = follower.response_data(response[30_000:RESPONSE_HEAD_CAP + 1000])
    assert isinstance(broken, Broken) and broken.server and follower.answer_due


@pytest.mark.parametrize("reads", [1, MAX_INTERIM + 1], ids=["one-read", "a-read-each"])
def test_interim_responses_past_the_cap_break_the_stream(reads: int) -> None:
    """Session 53's attack (Low): a server sending `100 Continue` forever kept the response's
    head phase open (43 MB of them in 40 s, 43% of a core for one connection; the idle timer
    never fired, bytes moving). A request gets at most `MAX_INTERIM` interim responses; the
    next breaks the stream, guardd's answer (a 502) still due."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    interim = b"HTTP/1.1 102 Processing\r\n\r\n"
    many = [interim * (MAX_INTERIM + 1)] if reads == 1 else [interim] * (MAX_INTERIM + 1)
    out = [answered(follower, data) for data in many]
    assert isinstance(out[-1], Broken) and out[-1].server and follower.answer_due
    assert "interim" in out[-1].problem
    follower = Follower("a")  # (the cap is a request's: the next one's count starts again)
    for path in (b"/1", b"/2"):
        follower.client_data(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % path)
        drain(follower)
        assert answered(follower, interim * MAX_INTERIM + OK) == interim * MAX_INTERIM + OK


def test_what_h11_says_of_a_response_is_cut_short_in_the_reason() -> None:
    """Attack pass (2026-12-05): a header line of 65,000 control bytes made h11's message
    (its repr) a 240 KB reason: the 502's body, a 300 KB audit line, and a verdict kept in
    memory, 1.3 GB for 4,096 of them."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    broken = follower.response_data(b"HTTP/1.1 200 OK\r\n" + b"\x01" * 65_000 + b"\r\n\r\n")
    assert isinstance(broken, Broken) and "illegal header line" in broken.problem
    assert len(broken.problem) < 400


def test_server_bytes_before_the_head_handed_out_went_answer_nothing() -> None:
    """Attack pass (2026-12-05): a head is handed out, then judged, then sent (`sent`); a
    server that answered it meanwhile answered a request it never got."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(follower.next_request(), Head)  # (being judged: not sent)
    broken = follower.response_data(OK)
    assert isinstance(broken, Broken) and broken.server and "no request went" in broken.problem


def test_a_server_that_closes_part_way_through_a_head_breaks_the_stream() -> None:
    """Review: the held part was dropped without a record, the client told nothing."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    assert follower.response_data(OK[:10]) == b"" and follower.head_held
    broken = follower.response_data(b"")
    assert isinstance(broken, Broken) and broken.server and broken.answered == b""
    assert "closed part-way through a response head" in broken.problem
    assert follower.answer_due


def test_a_server_that_closes_a_new_connection_without_answering_breaks_the_stream() -> None:
    """The client got a bare close, no 502 and no record: nothing else answers it (a request
    that went first on its connection gets the same close again if retried)."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    broken = follower.response_data(b"")
    assert isinstance(broken, Broken) and broken.server and broken.answered == b""
    assert broken.closed and not broken.quiet and "without answering" in broken.problem
    assert follower.answer_due


def test_a_server_that_closes_a_kept_alive_connection_as_a_request_goes_closes_it_quietly(
        ) -> None:
    """A server may close an idle kept-alive connection just as the next request goes: the
    client sees the close and may send it again on a new connection (RFC 9112 9.3.1); a 502
    would stop it. The cut is the server's all the same (review: it left no record)."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    assert follower.response_data(OK) == OK
    assert [p.method for p in drain(follower) if isinstance(p, Head)] == ["GET"]
    broken = follower.response_data(b"")
    assert isinstance(broken, Broken) and broken.server and broken.closed and broken.quiet
    assert "kept alive" in broken.problem and follower.server_broke


@pytest.mark.parametrize("second", [b"GET http://b.test/2 HTTP/1.1\r\nHost: b.test\r\n\r\n",
                                    b"GET http://a.test/2 HTTP/1.1\r\nHost: a.test\r\n\r\n"])
def test_a_proxied_request_on_a_new_connection_is_answered_when_the_server_hangs_up(
        second: bytes) -> None:
    """Review: after another origin, or a response that closed its connection, the request
    goes on a new one: a close without an answer there is the server's failure (502), not a
    kept-alive connection's idle end."""
    follower = Follower(proxy=True)
    follower.client_data(b"GET http://a.test/1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    origin = follower.next_request()
    assert isinstance(origin, Origin)
    follower.switch(origin)
    drain(follower)
    close = b"Connection: close\r\n" if b"a.test/2" in second else b""
    response = OK.replace(b"Content-Length", close + b"Content-Length")
    assert follower.response_data(response) == response
    follower.client_data(second)
    if close:
        follower.response_data(b"")  # (the close it announced: the end of that connection)
    origin = follower.next_request()
    assert isinstance(origin, Origin)
    follower.switch(origin)
    drain(follower)
    broken = follower.response_data(b"")
    assert isinstance(broken, Broken) and not broken.quiet


def test_a_server_that_closes_before_the_request_went_says_so() -> None:
    """Review: the head handed out was still being judged, and the 502 said the server did
    not answer it."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(follower.next_request(), Head)  # (being judged: not sent)
    broken = follower.response_data(b"")
    assert isinstance(broken, Broken) and "before the request went" in broken.problem


def test_a_head_trickled_a_byte_a_read_is_not_copied_whole_at_each(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: each read of a trickled head copied all of it held so far, twice (a 64 KiB
    head a byte a read: 8 GB copied). h11's buffer is copied only once the head has ended."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    copies = []
    trailing = h11.Connection.trailing_data
    monkeypatch.setattr(h11.Connection, "trailing_data", property(
        lambda connection: copies.append(1) or trailing.__get__(connection)))
    response = big_head(20_000)
    out = b"".join(follower.response_data(response[at:at + 1])  # type: ignore[misc]
                   for at in range(len(response)))
    assert out == response and len(copies) <= 2


def test_no_request_after_a_response_that_closes_the_connection() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    follower.response_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and "closes the connection" in broken.problem


def test_a_connection_that_must_close_breaks_only_when_a_request_comes() -> None:
    """Attack pass: every request with a body (which guardd sends with Connection: close) left
    a denial in the trail once its response was over, the client asking nothing more. (Such a
    request is its tunnel's last now: `test_a_request_with_a_body_is_the_last_on_its_
    connection`; a server's own close is what this is about.)"""
    follower = Follower("api.test")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
    drain(follower)
    follower.response_data(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert follower.next_request() is None and not follower.awaiting_response
    follower.client_data(b"G")  # (a request begins: it cannot go)
    broken = follower.next_request()
    assert isinstance(broken, Broken) and "no further request" in broken.problem


def test_an_oversized_head_breaks_the_stream() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 9000)
    (broken,) = drain(follower)
    assert isinstance(broken, Broken)


def test_the_client_closing_after_its_requests_is_told() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    follower.client_data(b"")
    drain(follower)
    follower.response_data(OK)
    assert drain(follower) == [] and follower.client_closed


def test_a_request_that_comes_after_the_response_is_followed_too() -> None:
    """The next cycle starts with no bytes left over: that is not the client's close."""
    follower = Follower("a")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    follower.response_data(OK)
    assert drain(follower) == [] and not follower.client_closed
    follower.client_data(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    (head, _) = drain(follower)
    assert isinstance(head, Head) and head.data.startswith(b"GET /2 ")


@pytest.mark.parametrize("blank", [[b"\r\n"], [b"\n"], [b"\r", b"\n\r\n"]],
                         ids=["crlf", "lf", "split"])
def test_empty_lines_before_a_request_line_are_skipped_and_begin_its_head(
        blank: list[bytes]) -> None:
    """Session 53's attack (Low: a valid request refused): RFC 9112 2.2 asks a server to skip
    at least one empty line before a request line (a client may send one after a body), as
    nginx does and the sniffer did; h11 refused it, so the request was cut. Empty lines are
    dropped (never sent: the request goes re-written) and begin a head, whose deadline runs:
    a client sending only them cannot hold the connection past it."""
    follower = Follower("a")
    for data in blank:
        follower.client_data(data)
    assert follower.head_begun and drain(follower) == []
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n")
    (head, _) = drain(follower)
    assert isinstance(head, Head) and head.data.startswith(b"GET /1 ")
    assert not follower.head_begun
    follower.client_data(b"".join(blank) + b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    follower.response_data(OK)  # (the next request's empty lines came in the same read)
    (head, _) = drain(follower)
    assert isinstance(head, Head) and head.data.startswith(b"GET /2 ")
    follower.response_data(OK)
    for data in blank:  # (after the response, alone)
        follower.client_data(data)
    assert drain(follower) == [] and follower.head_begun and not follower.client_closed
    follower.client_data(b" GET /3 HTTP/1.1\r\nHost: a\r\n\r\n")  # (not an empty line)
    assert isinstance(follower.next_request(), Broken)


# --- a body a lenient server may read as requests ----------------------------------------------

SMUGGLED = b"DELETE /secret HTTP/1.1\r\nHost: evil.test\r\n\r\n"


def body_cut(method: bytes, body: bytes) -> Broken:
    """A `method` request whose Content-Length body is `body`: its head goes, and the stream
    breaks at its body (what it breaks with)."""
    follower = Follower("api.test")
    follower.client_data(b"%s /x HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n%s"
                         % (method, len(body), body))
    head, broken = drain(follower)
    assert isinstance(head, Head) and isinstance(broken, Broken)
    assert follower.next_request() is broken
    return broken


def test_a_body_that_is_a_request_never_leaves() -> None:
    """Attack pass: a server that does not read a GET's body (Python's http.server) served
    the DELETE inside it, unjudged and unrecorded."""
    assert "lenient server would read as a request of its own (DELETE" in body_cut(
        b"GET", SMUGGLED).problem


def test_a_body_is_held_until_its_first_line_is_known() -> None:
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 40\r\n\r\nGET ")
    head = drain(follower)
    assert len(head) == 1 and isinstance(head[0], Head)  # "GET " might begin a request
    follower.client_data(b"/x")
    assert follower.next_request() is None
    follower.client_data(b" HTTP/1.1\r\n")  # (Netty makes a request of the line at once)
    assert isinstance(follower.next_request(), Broken)


def test_a_request_line_the_body_ends_with_is_one_too() -> None:
    """A server reads a last line without its LF when the connection closes."""
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 6\r\n\r\nGET /x")
    assert isinstance(drain(follower)[-1], Broken)


def test_ordinary_bodies_go_whole_however_they_come() -> None:
    body = b'{"query": "GET / HTTP/1.1 is how it starts", "n": 1}\n' + bytes(range(256)) * 40
    for split in (1, 7, len(body)):
        follower = Follower("api.test")
        follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n"
                             % len(body))
        parts = drain(follower)
        for at in range(0, len(body), split * 997):
            follower.client_data(body[at:at + split * 997])
            parts += drain(follower)
        assert not any(isinstance(p, Broken) for p in parts)
        assert sent(parts).endswith(b"\r\n\r\n" + body) and follower.awaiting_response


def test_a_request_with_a_body_is_the_last_on_its_connection() -> None:
    """The server that skipped the body would read the rest of it and the next head as one."""
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nConnection: keep-alive\r\n"
                         b"Content-Length: 2\r\n\r\nhiGET / HTTP/1.1\r\nHost: api.test\r\n\r\n")
    parts = drain(follower)
    assert b"Connection: close\r\n" in parts[0].data and b"keep-alive" not in parts[0].data
    follower.response_data(OK)
    # (the connection's last: it ends after the response, the next request never handed out;
    # the tunnel records its bytes as dropped)
    assert follower.next_request() is None and follower.finished
    assert follower.last_because == "a request with a body, sent with Connection: close"
    assert follower.buffered == len(b"GET / HTTP/1.1\r\nHost: api.test\r\n\r\n")


def test_a_proxied_request_with_a_content_length_out_of_bounds_is_refused_before_its_origin(
        ) -> None:
    """Session 61's attack (Info): the proxy refused it only once its origin's connect was
    judged, recorded as an allow, opened and charged to the rule's rate limit (two such POSTs
    spent a limit of 2, and the GET after them got 403)."""
    for target in (b"http://a.test/up", b"http://b.test/up"):  # (a new origin, and after one)
        follower = Follower(proxy=True)
        if target.startswith(b"http://b"):
            follower.client_data(b"GET http://b.test/ HTTP/1.1\r\nHost: b.test\r\n\r\n")
            origin = follower.next_request()
            assert isinstance(origin, Origin)
            follower.switch(origin)
            drain(follower)
            follower.response_data(OK)
        follower.client_data(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: 3000000000"
                             b"\r\n\r\n" % (target, target[7:13]))
        broken = follower.next_request()
        assert isinstance(broken, Broken) and "Content-Length over" in broken.problem, broken


def test_a_content_length_goes_in_plain_decimal_and_within_bounds() -> None:
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 0010\r\n\r\n")
    assert b"Content-Length: 10\r\n" in drain(follower)[0].data  # (never read as octal)
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\n"
                         b"Content-Length: 18446744073709551621\r\n\r\n")
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and "Content-Length over" in broken.problem
    # A server that keeps it in 32 bits reads 4294967297 as 1 and the body's rest as requests
    # (which guardd never judged): such a body goes chunked, re-framed in small chunks.
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 4294967297\r\n\r\n")
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and "chunked" in broken.problem
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 2147483647\r\n\r\n")
    assert b"Content-Length: 2147483647\r\n" in drain(follower)[0].data


@pytest.mark.parametrize("body", [
    b'{"messages": [' + b'{"role": "user", "content": "hello world"}, ' * 400 + b"{}]}",
    b'{"image": "' + b"QUJD" * 3000 + b'"}\n',
], ids=["many-words", "two-words"])
def test_a_long_json_or_text_line_is_no_request(body: bytes) -> None:
    """Third attack pass: a JSON body whose first line ran past 8 KiB (Python's json.dumps,
    what `requests` sends for json=) was refused as a request line that does not end; a
    re-attack's fix cut `{"image": "<base64>"}` at the window again."""
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
    parts = drain(follower)
    assert not any(isinstance(p, Broken) for p in parts) and sent(parts).endswith(body)


def test_a_long_line_that_ends_as_a_request_line_never_leaves() -> None:
    """A method-like word and a line open past the window: its end decides (`LineWatch`)."""
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: 20000\r\n\r\n"
                         + b"DELETE /" + b"x" * 9000 + b" ")
    assert not any(isinstance(p, Broken) for p in drain(follower))
    follower.client_data(b"HTTP/1.1\r\nHost: evil.test\r\n\r\n")
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and "ends as a request line" in broken.problem


def test_a_body_of_empty_lines_before_a_request_never_leaves() -> None:
    """Final attack pass: 4,200 CRLFs then a DELETE passed as other bytes."""
    body = b"\r\n" * 4200 + SMUGGLED
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
    parts = drain(follower)
    assert isinstance(parts[-1], Broken) and sent(parts[:-1]).endswith(b"\r\n\r\n")


@pytest.mark.parametrize("opening", [b"\xa0\x1c\xa0\x0b8080/1.1\nX",
                                     b"\xa0  \x0c\x85 \rDELETE8080HTTP/1.1\n"])
def test_a_body_only_netty_reads_a_request_line_in_is_cut_not_a_crash(opening: bytes) -> None:
    """Final review (2026-12-05): one word to guardd's splitting, a request line to Netty's:
    reading its target raised IndexError, and the connection closed with a traceback and no
    record of the cut."""
    assert "Netty splits it on other bytes" in body_cut(b"POST", opening).problem


@pytest.mark.parametrize("opening", [b"\x00" + SMUGGLED, SMUGGLED.replace(b"HTTP/", b"X/"),
                                     b"\x1b\x7f\x9f" + SMUGGLED.replace(b"HTTP/", b"RTSP/")],
                         ids=["behind-a-nul", "any-version", "both"])
def test_a_body_netty_reads_as_a_request_never_leaves(opening: bytes) -> None:
    """Attack pass: Netty, answering an `Expect: 100-continue` it refuses (413), reads the body
    as the next request whatever `Connection: close` says, skipping control bytes before its
    request line and taking any PROTOCOL/x.y for a version: a GET-only rule's connection served
    `DELETE` to a denied Host, unjudged."""
    follower = Follower("api.test")
    follower.client_data(b"GET /big HTTP/1.1\r\nHost: api.test\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 2000000\r\n\r\n" + opening)
    head, broken = drain(follower)
    assert isinstance(head, Head) and isinstance(broken, Broken)
    assert "lenient server would read as a request of its own (DELETE" in broken.problem


def chunked(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"


@pytest.mark.parametrize("smuggled", [b"\x00" * 12000 + SMUGGLED,
                                      b"words before it " + SMUGGLED,
                                      b"\n" + b"x" * 3000 + b" DELETE /secret X/1.1\r\n\r\n"],
                         ids=["behind-nuls", "behind-words", "behind-a-long-word"])
@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_a_request_line_deep_in_a_body_never_leaves(smuggled: bytes, framing: str) -> None:
    """Attack pass 48: Netty's HttpObjectAggregator, its size limit passed in the middle of a
    body, answers 413, resets its decoder and reads the bytes it holds after that part as the
    next request (skipping control bytes): a GET-only tunnel's allowed GET carried DELETEs to a
    denied Host past its 16 KiB limit, and a rate limit of 3 let 12 through. Where the part ends
    is the attacker's to choose, so no line of a body may end as a request line does."""
    body = b"A" * 16384 + smuggled + b"B" * 100
    framed = chunked(body[:16384], body[16384:]) if framing == "chunked" else body
    length = b"Transfer-Encoding: chunked" if framing == "chunked" else \
        b"Content-Length: %d" % len(body)
    follower = Follower("api.test")
    follower.client_data(b"GET /upload HTTP/1.1\r\nHost: api.test\r\n%s\r\n\r\n" % length)
    parts = drain(follower)
    for at in range(0, len(framed), 4096):  # (as it comes, in parts)
        follower.client_data(framed[at:at + 4096])
        parts += drain(follower)
        if parts and isinstance(parts[-1], Broken):
            break
    assert isinstance(parts[-1], Broken), parts[-1]
    assert "ends as a request line" in parts[-1].problem
    went = sent(parts)
    assert b"/secret" not in went.split(b"\n")[-1] or not went.endswith(b"\n")
    assert b"/secret HTTP/1.1\r\n" not in went and b"/secret X/1.1\r\n" not in went


@pytest.mark.parametrize("line", [
    *(b"DELETE /admin X%c/1.1\n" % c for c in b"\x1c\x1d\x1e\x1f\x85\xa0"),
    b"M /" + b"a" * 4087 + b" X/1.1\n",  # (4,096 bytes before its LF: Netty's limit)
    b"MK /" + b"a" * 4086 + b" X/1.1\r\n",
], ids=["fs", "gs", "rs", "us", "nel", "nbsp", "4096-lf", "4096-crlf"])
def test_a_body_line_only_netty_reads_as_a_request_line_never_leaves(line: bytes) -> None:
    """Re-attack of attack pass 48: a version with a byte Python splits on and Java's `\\S`
    takes (0xA0, 0x85, 0x1c-0x1f) before its slash was two words to guardd; a line of 4,096
    bytes (Netty's limit, its line end not counted) lost its method to guardd's 4 KiB tail."""
    body = b"a" * 8191 + b"\n" + line
    follower = Follower("api.test")
    follower.client_data(b"POST /up HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
    parts = drain(follower)
    assert isinstance(parts[-1], Broken) and "ends as a request line" in parts[-1].problem


@pytest.mark.parametrize("text", [
    b'{"request": "GET /x HTTP/1.1", "n": 1}\n',  # (a JSON string: not at the line's end)
    b"see RFC 9112/3.2 for details\nGET /x\nHTTP/1.1 is a version\n",
    b"two words/1.1\nversion/1.1 alone\n" + bytes(range(256)) * 64,
], ids=["json", "prose", "binary"])
def test_a_body_whose_lines_end_as_no_request_line_goes(text: bytes) -> None:
    follower = Follower("api.test")
    follower.client_data(b"POST /up HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(text), text))
    parts = drain(follower)
    assert not any(isinstance(p, Broken) for p in parts), parts
    assert sent(parts).endswith(text)


def test_an_expectation_is_not_forwarded() -> None:
    """A server answers an expectation it refuses without reading the body, and Netty then
    reads the body as the next request (attack pass): guardd sends the body at once, so the
    server is asked no expectation; the client hears 100 Continue from guardd (`continues`)."""
    follower = Follower("api.test")
    follower.client_data(b"POST /up HTTP/1.1\r\nHost: api.test\r\nExpect: 100-continue\r\n"
                         b"Content-Length: 5\r\n\r\nhello")
    head, body = drain(follower)
    assert isinstance(head, Head) and b"expect" not in head.data.lower() and head.continues
    assert isinstance(body, Body) and body.data == b"hello"


@pytest.mark.parametrize("head", [
    b"POST /up HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: api.test\r\nExpect: 100-continue\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: api.test\r\nContent-Length: 5\r\n\r\n",
], ids=["http-1.0", "no-body", "no-expectation"])
def test_only_a_client_waiting_with_a_body_is_told_to_continue(head: bytes) -> None:
    """RFC 9110 10.1.1: an HTTP/1.0 request's expectation is ignored; a request without a body
    waits for nothing."""
    follower = Follower("api.test")
    follower.client_data(head)
    told = follower.next_request()
    assert isinstance(told, Head) and not told.continues


def test_a_header_value_with_control_bytes_never_leaves() -> None:
    """Attack pass: h11 reads control bytes in a field value as part of it and writes them
    on; RFC 9110 5.5 calls them invalid, and servers differ on them (0x1c-0x1f are whitespace
    to Python's str.strip() and line breaks to its str.splitlines()): what one reads as a
    value another may read as another field."""
    for byte in (b"\x01", b"\x1c", b"\x1d", b"\x1e", b"\x1f", b"\x7f"):
        follower = Follower("a")
        follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a" + byte +
                             b"Transfer-Encoding: chunked\r\n\r\n")
        (broken,) = drain(follower)
        assert isinstance(broken, Broken) and "control byte" in broken.problem, byte
    follower = Follower("a")  # (a tab inside a value, and bytes over 0x7f, are field content)
    follower.client_data("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\tb é\r\n\r\n".encode())
    head = drain(follower)[0]
    assert isinstance(head, Head) and "X-A: a\tb é".encode() in head.data


@pytest.mark.parametrize("name", [b"Content_Length", b"Content.Length", b"Transfer_Encoding",
                                  b"transfer.encoding"])
@pytest.mark.parametrize("proxy", [False, True])
def test_a_framing_header_in_another_spelling_never_leaves(name: bytes, proxy: bool) -> None:
    """Attack pass: `Content_Length` went on as it came, a field h11 (and guardd) frame
    nothing by, while servers with Mongrel's parser (Puma, Thin, Unicorn) read `_` as `-`:
    such a server would take the bytes after the head for a body guardd never saw."""
    follower = Follower("a", proxy=proxy)
    target = b"http://a/" if proxy else b"/"
    follower.client_data(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n" + name +
                         (b": 5\r\n\r\n" if b"ength" in name else b": chunked\r\n\r\n"))
    (broken,) = drain(follower)  # (in proxy mode, before any connection is opened)
    assert isinstance(broken, Broken) and "spelling" in broken.problem
    assert name.decode() in broken.problem


def test_every_request_on_a_connection_has_the_header_cap() -> None:
    """Attack pass: the HTTP proxy counted the first request's fields only."""
    follower = Follower("a")
    many = b"".join(b"X-%d: v\r\n" % n for n in range(MAX_HEADERS))
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n" +
                         many + b"\r\n")
    assert isinstance(drain(follower)[0], Head)
    follower.response_data(OK)
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and f"more than {MAX_HEADERS} header fields" in \
        broken.problem


def test_a_proxied_head_of_more_lines_than_h11_reads_is_431() -> None:
    """A later request's head of more lines than guardd's h11 reads (`MAX_FIELD_LINES`, within
    the head's 8 KiB) was a 400, h11's hint dropped, where more than `MAX_HEADERS` fields are a
    431 (the review of the line count: those lines had been read, and counted as fields)."""
    follower = Follower("a", proxy=True)
    follower.client_data(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")
    follower.switch(Origin("a", 80))
    assert isinstance(drain(follower)[0], Head)
    follower.response_data(OK)
    follower.client_data(b"GET http://a/ HTTP/1.1\r\nHost: a\r\n" + b"a:\r\n" * MAX_FIELD_LINES +
                         b"\r\n")
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and broken.status == 431, broken


def test_a_post_body_naming_a_method_is_told_before_the_bytes_completing_the_name() -> None:
    """Attack pass: Rails, Laravel, Symfony, Spring and ASP.NET serve a POST whose form body has
    `_method=DELETE` as a DELETE. The part that completes the field's name is told as
    `BodyMethod`, to be judged before it goes (review: a streaming multipart parser acts on a
    field before the body ends)."""
    follower = Follower("api.test")
    # (its first line ends: the lenient reading of the opening decides there, other bytes)
    body = b"title=" + b"x" * 40 + b"\n&_method=DELETE"
    follower.client_data(b"POST /r HTTP/1.1\r\nHost: api.test\r\nContent-Length: %d\r\n\r\n"
                         % len(body) + body[:51])
    parts = drain(follower)
    assert isinstance(parts[0], Head) and sent(parts[1:]) == body[:51]
    assert not any(isinstance(part, BodyMethod) for part in parts)  # (`_me`: not yet a name)
    follower.client_data(body[51:])
    parts = drain(follower)
    assert isinstance(parts[0], BodyMethod) and parts[0].data == body[51:]
    assert "`_method` field" in parts[0].reason and sent(parts) == body[51:]


def test_a_chunked_post_body_naming_a_method_is_told_before_its_last_chunk() -> None:
    follower = Follower("api.test")
    follower.client_data(b"POST /r HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n"
                         b"\r\n4\r\n_met\r\n")
    parts = drain(follower)
    assert sent(parts).endswith(b"\r\n\r\n4\r\n_met\r\n")
    follower.client_data(b"a\r\nhod=DELETE\r\n0\r\n\r\n")
    (told,) = drain(follower)  # (the body's end came with it)
    assert isinstance(told, BodyMethod) and told.data == b"a\r\nhod=DELETE\r\n0\r\n\r\n"


def test_every_request_body_is_read_for_a_method() -> None:
    """Session 60's attack (High): pecan (WebOb parses a form body for every method but GET and
    HEAD) served `OPTIONS` with `_method=delete` in its body as a DELETE, and Hono's
    method-override and CakePHP read one from other methods' bodies too; only a POST's body
    was read."""
    for method in (b"POST", b"PUT", b"post", b"OPTIONS", b"PATCH", b"FROB", b"GET", b"DELETE"):
        follower = Follower("api.test")
        follower.client_data(method + b" / HTTP/1.1\r\nHost: a\r\nContent-Length: 14\r\n\r\n"
                             b"_method=DELETE")
        parts = drain(follower)
        assert type(parts[-1]) is BodyMethod, method
        assert sent(parts).endswith(b"\r\n\r\n_method=DELETE")
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello")
    parts = drain(follower)
    assert type(parts[-1]) is Body and sent(parts).endswith(b"\r\n\r\nhello")


def test_a_body_of_tiny_chunks_is_read_for_a_method_a_part_at_a_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Third review: read chunk by chunk, each 1-byte chunk cost a decoding of the bytes kept
    from the part before (32 KB/s of CPU); now each outgoing part is read once."""
    reads: list[bytes] = []
    real = BodyMethodScan.feed
    monkeypatch.setattr(BodyMethodScan, "feed", lambda scan, data: (reads.append(data),
                                                                   real(scan, data))[1])
    follower = Follower("api.test")
    follower.client_data(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"1\r\nx\r\n" * 1000 + b"0\r\n\r\n")
    parts = drain(follower)
    assert sent(parts[1:]).endswith(b"0\r\n\r\n") and not any(isinstance(part, BodyMethod)
                                                             for part in parts)
    assert len(reads) <= 1000 // BODY_EVENTS + 2


@pytest.mark.parametrize("proxy", [False, True])
def test_a_response_the_servers_close_ends_ends_the_connection_with_it(proxy: bool) -> None:
    """The last review: a response with no length ends at the server's close, which never
    reached the follower, so the response was never over; the connection closed without its
    lingering close (and a pipelined request's bytes went unrecorded). The close ends it, and
    the connection with it: its client knows the response's end only by that close."""
    follower = Follower("a", proxy=proxy)
    target = b"http://a/" if proxy else b"/"
    follower.client_data(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\nGET /2")
    if proxy:
        follower.switch(Origin("a", 80))
    drain(follower)
    assert follower.response_data(b"HTTP/1.1 200 OK\r\n\r\nsome") == b"HTTP/1.1 200 OK\r\n\r\nsome"
    assert follower.awaiting_response and not follower.finished
    assert follower.response_data(b"") == b""
    assert follower.finished and follower.next_request() is None


def test_a_server_that_closes_part_way_through_a_body_is_said_to_have_closed() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    follower.response_data(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsome")
    broken = follower.response_data(b"")
    assert isinstance(broken, Broken) and broken.server and broken.closed
    assert "part-way through the response's body" in broken.problem


@pytest.mark.parametrize("request_, forwarded", [
    (b"GET /Path HTTP/1.1\r\nHost: DOCS.Example.test\r\n\r\n",
     b"GET /Path HTTP/1.1\r\nHost: docs.example.test\r\n\r\n"),
    (b"GET HTTP://DOCS.Example.test:80/Path?Q=A HTTP/1.1\r\nHost: docs.example.test:80\r\n\r\n",
     b"GET http://docs.example.test:80/Path?Q=A HTTP/1.1\r\nHost: docs.example.test:80\r\n\r\n"),
], ids=["host", "absolute-form"])
def test_a_host_goes_out_in_the_lower_case_it_was_judged_in(request_: bytes, forwarded: bytes
                                                             ) -> None:
    """Attack pass (2026-12-06): `Host: DOCS.corp.test` was judged as docs.corp.test and went
    as sent; a server matching names exactly (Go's ServeMux, HAProxy's `hdr(host)` without
    -i) served its default site for it, which may be another one at the address. Names are
    case-insensitive (RFC 9110 4.2.3): the server gets the one judged."""
    follower = Follower("docs.example.test")
    follower.client_data(request_)
    assert sent(drain(follower)) == forwarded


@pytest.mark.parametrize("proxy", [False, True], ids=["tunnel", "proxy"])
def test_a_method_goes_out_in_the_upper_case_it_was_judged_in(proxy: bool) -> None:
    """Session 59's attack: `gEt` was judged (and recorded) as GET, the sniffer reading
    methods in upper case, and went as sent; Python's http.server, Go and Netty read it as a
    method of its own, which a handler's `if method == "GET" ... else` treats as a write, under
    a `method: [GET, HEAD]` rule. The server gets the method judged; a `head` is then read
    back as a HEAD's response (it waited for the body its Content-Length announced)."""
    follower = Follower(proxy=proxy) if proxy else Follower("a.test")
    target = b"http://a.test/x" if proxy else b"/x"
    follower.client_data(b"gEt " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    if proxy:
        origin = follower.next_request()
        assert isinstance(origin, Origin) and origin.method == "GET"
        follower.switch(origin)
    assert sent(drain(follower)).startswith(b"GET /x HTTP/1.1\r\n")
    follower.response_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    follower.answered()
    follower.client_data(b"head " + target + b" HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert sent(drain(follower)).startswith(b"HEAD /x HTTP/1.1\r\n")
    assert follower.response_data(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n") == \
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
    follower.answered()
    assert not follower.awaiting_response  # (a HEAD's response has no body)


def test_a_proxied_request_s_origin_and_host_go_in_lower_case() -> None:
    follower = Follower(proxy=True)
    follower.client_data(b"GET http://DOCS.Example.test:8080/Path HTTP/1.1\r\n"
                         b"Host: DOCS.Example.test:8080\r\n\r\n")
    origin = follower.next_request()
    assert isinstance(origin, Origin) and (origin.host, origin.port) == ("docs.example.test",
                                                                         8080)
    follower.switch(origin)
    assert sent(drain(follower)) == b"GET /Path HTTP/1.1\r\nHost: docs.example.test:8080\r\n\r\n"
