"""`stream.follow.Follower`: requests out one at a time, re-serialized; responses tracked."""

from __future__ import annotations

from guardd.stream.follow import Body, Broken, Follower, Head

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def drain(follower: Follower) -> list[Head | Body | Broken]:
    out = []
    while (part := follower.next_request()) is not None:
        out.append(part)
        if isinstance(part, Broken):
            break
    return out


def sent(parts: list[Head | Body | Broken]) -> bytes:
    return b"".join(p.data for p in parts if not isinstance(p, Broken))


def test_a_request_comes_out_as_its_head_then_its_body() -> None:
    follower = Follower("api.test")
    follower.client_data(b"POST /a HTTP/1.1\r\nhost: api.test\r\nContent-Length: 3\r\n\r\nabc")
    parts = drain(follower)
    assert isinstance(parts[0], Head) and parts[0].method == "POST"
    assert parts[0].data == b"POST /a HTTP/1.1\r\nhost: api.test\r\nContent-Length: 3\r\n\r\n"
    assert sent(parts[1:]) == b"abc"
    assert follower.awaiting_response


def test_pipelined_requests_go_one_at_a_time_after_each_response() -> None:
    follower = Follower("api.test")
    follower.client_data(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\n"
                         b"Content-Length: 0\r\n\r\n")
    first = drain(follower)
    assert [p.method for p in first if isinstance(p, Head)] == ["GET"]
    assert follower.response_data(OK[:20]) is None and drain(follower) == []  # not over yet
    assert follower.response_data(OK[20:]) is None
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
    follower = Follower("docs.test")
    follower.client_data(b"GET /x HTTP/1.0\r\n\r\n")
    head = drain(follower)[0]
    assert isinstance(head, Head)
    assert head.data == b"GET /x HTTP/1.1\r\nHost: docs.test\r\nConnection: close\r\n\r\n"


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


def test_no_request_after_a_response_that_closes_the_connection() -> None:
    follower = Follower("a")
    follower.client_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
    drain(follower)
    follower.response_data(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    (broken,) = drain(follower)
    assert isinstance(broken, Broken) and "closes the connection" in broken.problem


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
