"""SOCKS5 server handshake (RFC 1928, RFC 1929), sans-I/O: bytes in, events and replies out.

Theory of operation
-------------------
One `SocksServer` per client connection. The adapter feeds it whatever it reads with
`receive_data()`, then calls `next_event()`, which returns `NEED_DATA` until the bytes so far hold a
whole CONNECT request, and then the `ConnectRequest`. Bytes for the client (method selection,
authentication status, error replies) pile up meanwhile; `data_to_send()` hands them over. Once the
request is judged, `reply()` builds the one reply that ends the handshake:

    GREETING -> AUTH (iff users are configured) -> REQUEST -> CONNECTING -> reply() -> DONE
    a protocol error in any of the first three -> ERROR (sticky)

`next_event()` runs the step for the current state (`_STEPS`) until one needs more bytes or yields
the request, so input can arrive a byte at a time or all at once (greeting, credentials and
request in one segment, as pipelining clients send them). Every step returns early on short input
and fails as soon as the byte that shows the error arrives, never waiting for bytes that cannot
make a bad message good: a first byte other than 5 (SOCKS4, TLS, HTTP, noise) fails at once.

A protocol error raises `SocksProtocolError` after queueing what the client should be told (05 FF,
01 01, or a reply with the code the error's `reply_hint` carries; nothing at all for a client that
is not speaking SOCKS5, which would misread a SOCKS5 answer). The machine then stays in ERROR:
every later `next_event()` raises again, as in h11. Calling `next_event()` after the request or
`reply()` at any other time than once after it is a bug in the caller: RuntimeError.

Decisions on what RFC 1928 leaves open, each taking the way that cannot widen what gets through:

* No users: method 0x00 only; with users: 0x02 only, so anonymous clients are refused (05 FF).
* RSV in the request is ignored, as most servers do: it carries nothing a decision depends on.
* CMD other than CONNECT gets 0x07 and ATYP other than 1, 3, 4 gets 0x08 as soon as the byte
  arrives (an unknown ATYP leaves the rest of the request unframeable anyway).
* A domain is passed on as sent, decoded as strict UTF-8; `addr.parse_host` then validates it (and
  denies it on the record). A domain that is empty or not UTF-8 cannot name any host: reply 0x04
  (host unreachable, what the server answers for invalid names) here, so no undecodable text or
  lone surrogate escapes into the policy or the audit log.
* Port 0 gets 0x01 here: no server listens there, and the SYN, often dropped on the way, would
  hold the connection for the whole connect timeout.
* Bytes after the request (a client sending its first data before the reply, optimistically)
  are kept, as is anything fed later: `trailing_data` holds them for the relay.
"""

from __future__ import annotations

import enum
import functools
import hmac
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NoReturn

from guardd.errors import SocksAuthError, SocksProtocolError
from guardd.net import hostport

VERSION = 5
AUTH_VERSION = 1  # RFC 1929 sub-negotiation
AUTH_OK, AUTH_FAILED = b"\x01\x00", b"\x01\x01"


class Method(enum.IntEnum):
    """Authentication methods (RFC 1928 3); the values are the wire bytes."""

    NO_AUTHENTICATION = 0x00
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class AddressType(enum.IntEnum):
    """ATYP: how the client gave the host, so audit can tell a name from an address."""

    IPV4 = 1
    DOMAIN = 3
    IPV6 = 4


class Reply(enum.IntEnum):
    """REP codes (RFC 1928 6); a member drops straight into a reply."""

    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2  # connection not allowed by ruleset
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class State(enum.Enum):
    GREETING = "greeting"
    AUTH = "auth"
    REQUEST = "request"
    CONNECTING = "connecting"  # the request was returned; waiting for reply()
    DONE = "done"
    ERROR = "error"


class _Sentinel(enum.Enum):
    NEED_DATA = "NEED_DATA"


#: `next_event()` needs more bytes; an enum member so that `is not NEED_DATA` narrows the type.
NEED_DATA: Literal[_Sentinel.NEED_DATA] = _Sentinel.NEED_DATA


@dataclass(frozen=True, slots=True)
class ConnectRequest:
    """A CONNECT: host as sent (a domain) or IP text (IPv6 compressed), and who asked."""

    host: str
    port: int
    atyp: AddressType
    user: str | None = None  # the RFC 1929 username, when authentication is configured
    #: The address itself for ATYP IPv4/IPv6 (None for a domain, which `addr.parse_host` reads);
    #: `host` in another form, so not compared.
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = field(default=None,
                                                                           compare=False)


Event = ConnectRequest | Literal[_Sentinel.NEED_DATA]
_Step = Callable[["SocksServer"], "Event | None"]  # None: state changed, run the next step


def encode_reply(reply: Reply, bound_host: str | None = None, bound_port: int = 0) -> bytes:
    """VER REP RSV ATYP BND.ADDR BND.PORT; 0.0.0.0:0 when there is no bound address."""
    return bytes((VERSION, reply, 0)) + _bound_address(bound_host) + bound_port.to_bytes(2, "big")


@functools.lru_cache(maxsize=256)
def _bound_address(host: str | None) -> bytes:
    """ATYP and BND.ADDR of `host`; cached, as a proxy binds from few addresses."""
    ip = ipaddress.ip_address(host) if host is not None else ipaddress.IPv4Address(0)
    return bytes((AddressType.IPV6 if ip.version == 6 else AddressType.IPV4,)) + ip.packed


_ADDRESS_TYPES = {atyp.value: atyp for atyp in AddressType}
_ADDRESS_LENGTHS = {AddressType.IPV4: 4, AddressType.IPV6: 16}
_COMMAND_NAMES = {command.value: command.name for command in Command}


class SocksServer:
    """The server side of one SOCKS5 handshake."""

    def __init__(self, users: Mapping[str, str] | None = None) -> None:
        """`users` maps RFC 1929 usernames to passwords; None or empty: no authentication. It
        is read as the handshake goes (a reload may change it meanwhile)."""
        self._users: Mapping[str, str] = users if users is not None else {}
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._user: str | None = None
        self._error: SocksProtocolError | None = None
        self.state = State.GREETING
        #: Set by the server: why a login as this user is refused now, without checking it
        #: (failed logins lock it out for a while; "": it is checked), with the same reply as a
        #: wrong password.
        self.login_lock: Callable[[str], str] | None = None
        #: The username the client tried to log in as (once it did), and the password it
        #: logged in with (a reload that changes it closes the connection).
        self.tried: str | None = None
        self.password: str | None = None

    @property
    def trailing_data(self) -> bytes:
        """Bytes the client sent after its request: the start of the stream to relay."""
        return bytes(self._buffer) if self.state in (State.CONNECTING, State.DONE) else b""

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def data_to_send(self) -> bytes:
        out = bytes(self._outgoing)
        self._outgoing.clear()
        return out

    def next_event(self) -> Event:
        """NEED_DATA or the ConnectRequest; raises SocksProtocolError, then stays in ERROR."""
        if self._error is not None:
            raise SocksProtocolError(f"connection is in the ERROR state after: {self._error}",
                                     self._error.reply_hint)
        try:
            while True:
                step = _STEPS.get(self.state)
                if step is None:
                    raise RuntimeError(f"next_event() in state {self.state.name}: the handshake "
                                       "is over, read trailing_data instead")
                event = step(self)
                if event is not None:
                    return event
        except SocksProtocolError as exc:
            self.state, self._error = State.ERROR, exc
            raise

    def reply(self, reply: Reply, bound_host: str | None = None, bound_port: int = 0) -> bytes:
        """The reply that ends the handshake (once, after the request); bound_host is an IP."""
        if self.state is not State.CONNECTING:
            raise RuntimeError(f"reply() in state {self.state.name}: only one reply, and only "
                               "after next_event() returned the ConnectRequest")
        self.state = State.DONE
        return encode_reply(reply, bound_host, bound_port)

    # --- steps: each returns NEED_DATA on short input, None after moving to the next state ------

    def _fail(self, message: str, hint: Reply = Reply.GENERAL_FAILURE,
              send: bytes = b"", target: str | None = None) -> NoReturn:
        """Queue what the client is told (maybe nothing), then raise."""
        self._outgoing += send
        raise SocksProtocolError(f"{self.state.value}: {message}", hint, target)

    def _fail_request(self, message: str, reply: Reply, target: str | None = None) -> NoReturn:
        self._fail(message, reply, encode_reply(reply), target)

    def _greeting(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:  # never answer SOCKS4 or anything else in SOCKS5: just close
            what = "SOCKS4/4a" if buf[0] == 4 else f"first byte {buf[0]:#04x}"
            self._fail(f"{what} is not SOCKS5; point the client at guardd with socks5h://")
        if len(buf) < 2:
            return NEED_DATA
        refuse = bytes((VERSION, Method.NO_ACCEPTABLE_METHODS))
        if buf[1] == 0:
            self._fail("greeting offers no authentication method", send=refuse)
        end = 2 + buf[1]
        if len(buf) < end:
            return NEED_DATA
        offered = bytes(buf[2:end])
        del buf[:end]
        method = Method.USERNAME_PASSWORD if self._users else Method.NO_AUTHENTICATION
        if method not in offered:
            self._fail(f"client offers methods {offered.hex(' ')} but guardd requires "
                       f"{method.name.lower()} ({method:#04x}): configure the client for it",
                       Reply.NOT_ALLOWED, refuse)
        self._outgoing += bytes((VERSION, method))
        self.state = State.AUTH if self._users else State.REQUEST
        return None

    def _auth(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        if buf[0] != AUTH_VERSION:
            self._fail(f"username/password version {buf[0]:#04x}, expected 0x01", send=AUTH_FAILED)
        if len(buf) < 2:
            return NEED_DATA
        if buf[1] == 0:
            self._fail("empty username", send=AUTH_FAILED)
        name_end = 2 + buf[1]
        if len(buf) < name_end + 1:
            return NEED_DATA
        if buf[name_end] == 0:
            self._fail("empty password", send=AUTH_FAILED)
        end = name_end + 1 + buf[name_end]
        if len(buf) < end:
            return NEED_DATA
        name, password = bytes(buf[2:name_end]), bytes(buf[name_end + 1:end])
        del buf[:end]
        self.tried = name.decode(errors="backslashreplace")
        refused = self.login_lock(self.tried) if self.login_lock is not None else ""
        if refused:
            self._outgoing += AUTH_FAILED
            raise SocksAuthError(f"{self.state.value}: login refused without checking the "
                                 f"password: {refused}", Reply.NOT_ALLOWED, checked=False)
        try:
            expected = self._users.get(name.decode())
        except UnicodeDecodeError:
            expected = None
        # compare_digest: the time taken does not tell how much of a password matched
        if expected is None or not hmac.compare_digest(password, expected.encode()):
            self._outgoing += AUTH_FAILED
            raise SocksAuthError(f"{self.state.value}: bad username or password for "
                                 f"{name.decode(errors='backslashreplace')!r}", Reply.NOT_ALLOWED)
        self._outgoing += AUTH_OK
        self._user = name.decode()  # a configured username: valid UTF-8
        self.password = password.decode()
        self.state = State.REQUEST
        return None

    def _request(self) -> Event | None:
        buf = self._buffer
        if not buf:
            return NEED_DATA
        if buf[0] != VERSION:
            self._fail_request(f"request version {buf[0]:#04x}, expected 0x05",
                               Reply.GENERAL_FAILURE)
        if len(buf) < 2:
            return NEED_DATA
        if buf[1] != Command.CONNECT:
            command = _COMMAND_NAMES.get(buf[1], f"{buf[1]:#04x}")
            self._fail_request(f"command {command} is not supported, only CONNECT",
                               Reply.COMMAND_NOT_SUPPORTED)
        if len(buf) < 4:
            return NEED_DATA
        atyp = _ADDRESS_TYPES.get(buf[3])
        if atyp is None:
            self._fail_request(f"address type {buf[3]:#04x} is not 1, 3 or 4",
                               Reply.ADDRESS_TYPE_NOT_SUPPORTED)
        start = 4
        if atyp is AddressType.DOMAIN:
            if len(buf) < 5:
                return NEED_DATA
            if buf[4] == 0:
                self._fail_request("empty domain name", Reply.HOST_UNREACHABLE)
            start, length = 5, buf[4]
        else:
            length = _ADDRESS_LENGTHS[atyp]
        end = start + length + 2
        if len(buf) < end:
            return NEED_DATA
        raw, port = bytes(buf[start:end - 2]), int.from_bytes(buf[end - 2:end], "big")
        del buf[:end]
        address = None
        if atyp is AddressType.DOMAIN:
            try:
                host = raw.decode("utf-8")
            except UnicodeDecodeError:
                self._fail_request(f"domain name {raw!r} is not UTF-8", Reply.HOST_UNREACHABLE,
                                   hostport(raw.decode(errors="backslashreplace"), port))
        else:
            address = ipaddress.ip_address(raw)
            host = str(address)
        if port == 0:
            self._fail_request(f"port 0 for {host!r} cannot be connected to",
                               Reply.GENERAL_FAILURE, hostport(host, port))
        self.state = State.CONNECTING
        return ConnectRequest(host, port, atyp, self._user, address)


_STEPS: dict[State, _Step] = {State.GREETING: SocksServer._greeting, State.AUTH: SocksServer._auth,
                              State.REQUEST: SocksServer._request}
