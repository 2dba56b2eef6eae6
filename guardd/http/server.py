"""HTTP proxy listener (`HTTPS_PROXY` / `HTTP_PROXY` clients): CONNECT and absolute-form
requests, on the shared connect pipeline.

`HttpListener` accepts through `stream.acceptor.Acceptor` and reads the first request head with
h11 under the handshake deadline (heads over `sniff.HTTP_HEAD_CAP` or with over `MAX_HEADERS`
fields get 431, anything h11 refuses 400, never a traceback). One shape alone skips h11: a first
read that holds a whole `CONNECT host:port HTTP/1.1` head whose only field is a `Host` equal to
the target, in exactly the bytes a client library sends (`_canonical_connect`); h11 would read
it the same, and anything else, however close, is h11's to judge. Then:

* `CONNECT host:port` (RFC 9110 9.3.6) hands the target to a `stream.tunnel.Tunnel`, exactly
  as a SOCKS request does: `200 Connection established`, the first bytes judged, the relay.
* An absolute-form request (`GET http://host/path`) is followed (`stream.follow.Follower` in
  proxy mode): each request goes out in origin form, re-serialized, without hop-by-hop headers
  or Proxy-Authorization, judged with its real method, host and port; the client connection is
  kept alive across requests, and a request for another origin gets a tunnel of its own; a
  CONNECT after them makes the rest of the connection its tunnel (Node's keep-alive agent
  sends it on the socket its GET used).

A refusal answers with `stream.answers`: 403 for a denial, 502 when the destination could not
be reached, 504 when it did not answer in time, each naming the rule, the reason and the
decision's record number. Optional `Proxy-Authorization: Basic` users (`httpUsers`) get 407
until they log in; a source outside `clients` is refused by the acceptor before any byte.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Sequence
from typing import NamedTuple

from guardd.guard import HTTP_LISTENER, NOT_A_CLIENT
from guardd.http11 import h11
from guardd.stream import answers
from guardd.stream.follow import (MAX_HEADERS, Broken, Follower, Origin, connect_authority,
                                  parser_said, proxy_login)
from guardd.stream.listener import Login, ProxyListener
from guardd.stream.sniff import HTTP_HEAD_CAP
from guardd.stream.socket_io import SocketIO
from guardd.stream.tunnel import Failure, Opened, Refused, Tunnel

_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: The status of each way a tunnel does not open.
_STATUS = {Failure.DENIED: 403, Failure.INVALID_HOST: 400, Failure.NO_ADDRESS: 502,
           Failure.NETWORK_UNREACHABLE: 502, Failure.HOST_UNREACHABLE: 502,
           Failure.CONNECTION_REFUSED: 502, Failure.TIMED_OUT: 504, Failure.FAILED: 502}


#: The one head read without h11: `CONNECT <host>:<port> HTTP/1.1`, then `Host: ` the same
#: authority, then the blank line, CRLFs, nothing else. A host of letters, digits, dots and
#: hyphens, or an IPv6 literal in brackets; a port of 1 to 5 digits without a leading zero.
#: A strict subset of what h11 accepts (and of what `_authority` reads), so it reads the same.
_CANONICAL_CONNECT = re.compile(
    rb"CONNECT (([A-Za-z0-9.-]{1,253}|\[([0-9A-Fa-f:.]{2,45})\]):([1-9][0-9]{0,4}))"
    rb" HTTP/1\.1\r\nHost: \1\r\n\r\n")


class _Request(NamedTuple):
    """A request head as the listener uses it, from h11 or `_canonical_connect`."""

    method: bytes
    target: bytes
    headers: Sequence[tuple[bytes, bytes]]
    #: The bytes after the head (a CONNECT's client may send before the reply).
    early: bytes
    #: A CONNECT's host and port, when `_canonical_connect` read them already.
    authority: tuple[str, int] | None = None


def _canonical_connect(data: bytes) -> _Request | None:
    """`data` as a request, when it starts with a whole canonical CONNECT head
    (`_CANONICAL_CONNECT`); None for anything else, which h11 reads."""
    found = _CANONICAL_CONNECT.match(data)
    if found is None:
        return None
    target, name, v6, port = found.groups()
    if int(port) > 65535:
        return None
    return _Request(b"CONNECT", target, ((b"host", target),), data[found.end():],
                    ((name if v6 is None else v6).decode("ascii"), int(port)))


class HttpRefusal(Exception):
    """A request refused before any rule could judge it: its status, and why."""

    def __init__(self, status: int, why: str,
                 extra: tuple[tuple[str, str], ...] = (), told: str = "") -> None:
        super().__init__(why)
        self.status = status
        self.why = why
        self.extra = extra
        #: What the client is told, when not `why` (which the record keeps).
        self.told = told

    def answer(self, decision: int | None) -> bytes:
        return answers.answer(self.status, self.told or self.why, decision=decision,
                              extra=self.extra)


def _refused_at_accept(why: str, decision: int | None) -> bytes:
    """403 for a source outside `clients`; 503 when every slot (or the client's share) is
    taken."""
    return answers.answer(403 if why == NOT_A_CLIENT else 503, why, decision=decision)


async def _past_empty_lines(tunnel: Tunnel) -> tuple[bytes, int]:
    """The client's first bytes past the empty lines before its request line (RFC 9112 2.2:
    skipped, as the follower skips them after a request), and how many were skipped: within
    the head's cap (431 past it)."""
    skipped = 0
    while True:
        data = await tunnel.handshake_bytes()
        kept = data.lstrip(b"\r\n")
        tunnel.began = bool(kept)  # (empty lines begin no head: the re-attack of session 61)
        skipped += len(data) - len(kept)
        if skipped > HTTP_HEAD_CAP:
            raise HttpRefusal(431, f"the request head is over {HTTP_HEAD_CAP} bytes")
        if kept or not data:
            return kept, skipped


def _timed_out(why: str, decision: int | None) -> bytes:
    """408 for a request head begun and not ended within the handshake deadline."""
    return answers.answer(408, why, decision=decision)


class HttpListener(ProxyListener):
    """Serves HTTP proxy clients: CONNECT tunnels and absolute-form requests."""

    name = HTTP_LISTENER
    refused_answer = staticmethod(_refused_at_accept)
    refused_named = "HTTP request refused"
    handshake_named = "request head"
    timed_out_answer = staticmethod(_timed_out)

    async def handle(self, io: SocketIO, tunnels: list[Tunnel], client: str, port: int
                     ) -> None:
        try:
            request, raw = await self._head(tunnels[-1])
            self.acceptor.settled()
            login, header = self._log_in(request, client) or (None, None)
            asked = request.target.decode("latin-1")
            if await self.act_for(tunnels[-1], client, login, lambda why, number: HttpRefusal(
                    403, why).answer(number), f"https://{asked}" if request.method == b"CONNECT"
                    else asked) is None:
                return
            if request.method == b"CONNECT":
                await self._connect(tunnels[-1], io, request)
            else:
                await self._proxy(tunnels, io, client, port, raw, header)
        except HttpRefusal as exc:
            await self.refuse(tunnels[-1], f"{self.refused_named}: {exc.why}", client,
                              exc.answer)

    async def _head(self, tunnel: Tunnel) -> tuple[_Request, bytes]:
        """The first request head (with the bytes after it), and every byte read (what each
        read brought charged to the client, `Tunnel.handshake_bytes`)."""
        data, skipped = await _past_empty_lines(tunnel)
        if not data:
            raise ConnectionResetError("client closed before its request head ended")
        canonical = _canonical_connect(data)
        if canonical is not None:
            return canonical, data
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HTTP_HEAD_CAP)
        raw = bytearray(data)
        parser.receive_data(data)
        while True:
            try:
                event = parser.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
                raise HttpRefusal(status, f"malformed request: {parser_said(exc)}") from None
            if event is h11.NEED_DATA:
                data = await tunnel.handshake_bytes()
                if not data:
                    raise ConnectionResetError("client closed before its request head ended")
                raw += data
                parser.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                raise HttpRefusal(400, "malformed request")
            if skipped + len(raw) - len(parser.trailing_data[0]) > HTTP_HEAD_CAP:  # (h11 caps a
                # head still incomplete; the sniffer's cap is the head's whole size)
                raise HttpRefusal(431, f"the request head is over {HTTP_HEAD_CAP} bytes")
            if len(event.headers) > MAX_HEADERS:
                raise HttpRefusal(431, f"more than {MAX_HEADERS} header fields")
            return _Request(event.method, event.target, event.headers,
                            parser.trailing_data[0]), bytes(raw)

    def _log_in(self, request: _Request, client: str) -> tuple[Login, bytes] | None:
        """Check `Proxy-Authorization: Basic` when users are configured (407 until it passes;
        failed logins lock the client out as the SOCKS listener's do); the login and the
        header's value (every later request on the connection must carry it), None when no
        login is asked."""
        users = self.settings.users
        if not users:
            return None
        challenge = answers.PROXY_CHALLENGE
        given = [value for name, value in request.headers if name == b"proxy-authorization"]
        if len(given) != 1:  # (none, or several: no guess is checked, none counted)
            raise HttpRefusal(407, "proxy authentication required (Proxy-Authorization: Basic)"
                              if not given else f"{len(given)} Proxy-Authorization fields: "
                              "a request logs in once", challenge)
        scheme, user, password = proxy_login(given[0])
        # Told alike, locked out or not: what is locked would tell which names are users.
        failed = "proxy authentication failed (a wrong user or password, or one tried too " \
            "often: wait a few seconds)"
        locked = self.locked_out(client, user)
        if locked:
            raise HttpRefusal(407, self.login_failed(client, user, locked, False), challenge,
                              failed)
        wanted = users.get(user)
        if scheme.lower() != b"basic" or wanted is None or not hmac.compare_digest(
                wanted.encode(), password.encode()):
            raise HttpRefusal(407, self.login_failed(client, user, f"user {user!r} with a "
                                                                   "wrong password, or not "
                                                                   "Basic"), challenge, failed)
        return (user, password), given[0]

    async def _connect(self, tunnel: Tunnel, io: SocketIO, request: _Request) -> None:
        host, port = request.authority or _authority(request.target)
        tunnel.scheme = "https"  # what a CONNECT through an HTTPS_PROXY is for, mostly
        opened = await tunnel.open(host, port)
        if isinstance(opened, Refused):
            await tunnel.send_quietly(_refused(opened))
            return
        await io.send(_ESTABLISHED)
        await tunnel.run(request.early)

    async def _proxy(self, tunnels: list[Tunnel], io: SocketIO, client: str, port: int,
                     raw: bytes, login: bytes | None) -> None:
        """Absolute-form requests, origin by origin, on one kept-alive client connection: a
        tunnel for each origin in turn, in `tunnels[-1]` (the open one, closed at the end);
        every request with the connection's `login` (its Proxy-Authorization), if any."""
        follower = Follower(proxy=True, login=login)
        follower.client_data(raw)
        origin = follower.next_request()
        if isinstance(origin, Broken):
            raise HttpRefusal(400, origin.problem)
        while isinstance(origin, Origin):
            tunnel = tunnels[-1]
            if origin.connect:  # (the rest of the connection is a tunnel there)
                await self._connect(tunnel, io, _Request(
                    b"CONNECT", b"", (), follower.rest, (origin.host, origin.port)))
                return
            tunnel.scheme = "http"
            opened = await tunnel.open(origin.host, origin.port,
                                       request=(origin.method, origin.path))
            if not isinstance(opened, Opened):
                await tunnel.send_quietly(_refused(opened))
                return
            origin = await tunnel.proxy(follower)
            if origin is not None:  # the next request goes elsewhere: a tunnel there
                tunnel.release()
                tunnels[-1] = self.tunnel(io, client, port, tunnel)  # (released: done)


def _authority(target: bytes) -> tuple[str, int]:
    """A CONNECT request-target's host and port (`connect_authority`), or its 400."""
    found = connect_authority(target)
    if isinstance(found, str):
        raise HttpRefusal(400, found)
    return found


def _refused(refused: Refused) -> bytes:
    """A denial's 403, or what kept an allowed connect from the destination (502, 504)."""
    verdict = refused.verdict
    # A denial is a 403 however it came (no usable address because the policy filtered them,
    # say); an invalid host a 400; an allowed connect that failed says how.
    status = 403 if not verdict.decision.allowed and refused.failure is not Failure.INVALID_HOST \
        else _STATUS[refused.failure]
    return answers.for_verdict(status, verdict, refused.decision)
