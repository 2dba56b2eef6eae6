"""Byte-level tests of guardd.socks.protocol: handshakes built by hand, fed whole, trickled a byte
at a time and cut anywhere (Hypothesis); no sockets."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guardd.errors import SocksAuthError, SocksProtocolError
from guardd.socks.protocol import (NEED_DATA, AddressType, ConnectRequest, Event, Reply,
                                   SocksServer, State, encode_reply)

USERS = {"agent": "s3cret", "bob": "hunter2"}
Outcome = Event | SocksProtocolError

# --- helpers -------------------------------------------------------------------------------------


def greeting(*methods: int) -> bytes:
    return bytes((5, len(methods), *methods))


def auth(user: bytes = b"agent", password: bytes = b"s3cret", version: int = 1) -> bytes:
    return bytes((version, len(user))) + user + bytes((len(password),)) + password


def request(atyp: int, address: bytes, port: int = 443, cmd: int = 1, version: int = 5,
            rsv: int = 0) -> bytes:
    return bytes((version, cmd, rsv, atyp)) + address + struct.pack("!H", port)


def domain(name: bytes, port: int = 443, **kwargs: int) -> bytes:
    return request(3, bytes((len(name),)) + name, port, **kwargs)


def ipv4(text: str, port: int = 443) -> bytes:
    return request(1, ipaddress.IPv4Address(text).packed, port)


def ipv6(text: str, port: int = 443) -> bytes:
    return request(4, ipaddress.IPv6Address(text).packed, port)


def reply_bytes(code: int) -> bytes:
    return bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0))


NOAUTH = greeting(0)  # and the server's answer to it is 05 00
LOGIN = greeting(2) + auth()  # answered 05 02 01 00
OK_NOAUTH, OK_LOGIN = b"\x05\x00", b"\x05\x02\x01\x00"


def feed(chunks: list[bytes], users: dict[str, str] | None = None
         ) -> tuple[Outcome, bytes, SocksServer]:
    """Drive the machine as server.py does; what it ended with, everything it sent, the machine.
    Chunks after the request are still fed (not read by next_event): they are trailing data."""
    protocol = SocksServer(users)
    sent = b""
    pending = list(chunks)
    while True:
        try:
            event: Outcome = protocol.next_event()
        except SocksProtocolError as exc:
            event = exc
        assert event is NEED_DATA or isinstance(event, ConnectRequest | SocksProtocolError)
        sent += protocol.data_to_send()
        if event is not NEED_DATA or not pending:
            break
        protocol.receive_data(pending.pop(0))
    for chunk in pending if isinstance(event, ConnectRequest) else []:
        protocol.receive_data(chunk)
    return event, sent, protocol


def key(outcome: Outcome) -> object:
    """Comparable form of an outcome (exceptions compare by identity)."""
    if isinstance(outcome, SocksProtocolError):
        return ("error", str(outcome), outcome.reply_hint)
    return outcome


def bytewise(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


# --- successful handshakes -----------------------------------------------------------------------

SUCCESS_CASES = [
    ("ipv4", None, NOAUTH + ipv4("192.0.2.1", 80), OK_NOAUTH,
     ConnectRequest("192.0.2.1", 80, AddressType.IPV4)),
    ("ipv6-compressed", None, NOAUTH + ipv6("2001:db8:0:0:0:0:0:1"), OK_NOAUTH,
     ConnectRequest("2001:db8::1", 443, AddressType.IPV6)),
    ("ipv6-mapped-ipv4", None, NOAUTH + ipv6("::ffff:169.254.169.254", 80), OK_NOAUTH,
     ConnectRequest("::ffff:a9fe:a9fe", 80, AddressType.IPV6)),
    ("domain", None, NOAUTH + domain(b"api.example.com"), OK_NOAUTH,
     ConnectRequest("api.example.com", 443, AddressType.DOMAIN)),
    ("domain-as-sent", None, NOAUTH + domain(b"API.Example.COM."), OK_NOAUTH,
     ConnectRequest("API.Example.COM.", 443, AddressType.DOMAIN)),
    ("domain-utf8", None, NOAUTH + domain("bücher.example".encode()), OK_NOAUTH,
     ConnectRequest("bücher.example", 443, AddressType.DOMAIN)),
    ("domain-nul-left-to-parse-host", None, NOAUTH + domain(b"a.example\x00.evil"), OK_NOAUTH,
     ConnectRequest("a.example\x00.evil", 443, AddressType.DOMAIN)),
    ("domain-ip-text", None, NOAUTH + domain(b"0xa9fea9fe"), OK_NOAUTH,
     ConnectRequest("0xa9fea9fe", 443, AddressType.DOMAIN)),
    ("domain-255", None, NOAUTH + domain(b"a" * 255), OK_NOAUTH,
     ConnectRequest("a" * 255, 443, AddressType.DOMAIN)),
    ("port-65535", None, NOAUTH + ipv4("192.0.2.1", 65535), OK_NOAUTH,
     ConnectRequest("192.0.2.1", 65535, AddressType.IPV4)),
    ("rsv-nonzero-tolerated", None, NOAUTH + domain(b"a.example", rsv=0xFF), OK_NOAUTH,
     ConnectRequest("a.example", 443, AddressType.DOMAIN)),
    ("offers-both-no-users", None, greeting(2, 0) + ipv4("192.0.2.1"), OK_NOAUTH,
     ConnectRequest("192.0.2.1", 443, AddressType.IPV4)),
    ("empty-users-is-no-auth", {}, NOAUTH + ipv4("192.0.2.1"), OK_NOAUTH,
     ConnectRequest("192.0.2.1", 443, AddressType.IPV4)),
    ("offers-many-methods", None, greeting(*range(255)) + ipv4("192.0.2.1"), OK_NOAUTH,
     ConnectRequest("192.0.2.1", 443, AddressType.IPV4)),
    ("login", USERS, LOGIN + domain(b"a.example"), OK_LOGIN,
     ConnectRequest("a.example", 443, AddressType.DOMAIN, user="agent")),
    ("login-offers-both", USERS, greeting(0, 2) + auth(b"bob", b"hunter2") + ipv4("192.0.2.1"),
     OK_LOGIN, ConnectRequest("192.0.2.1", 443, AddressType.IPV4, user="bob")),
    ("login-utf8-user", {"agënt": "pässwörd"},
     greeting(2) + auth("agënt".encode(), "pässwörd".encode()) + ipv4("192.0.2.1"), OK_LOGIN,
     ConnectRequest("192.0.2.1", 443, AddressType.IPV4, user="agënt")),
]


@pytest.mark.parametrize("users, data, sent, expected", [c[1:] for c in SUCCESS_CASES],
                         ids=[c[0] for c in SUCCESS_CASES])
def test_handshake(users: dict[str, str] | None, data: bytes, sent: bytes,
                   expected: ConnectRequest) -> None:
    whole = feed([data], users)
    assert whole[:2] == (expected, sent)
    trickled = feed(bytewise(data), users)
    assert trickled[:2] == (expected, sent)
    assert whole[2].state is trickled[2].state is State.CONNECTING
    assert whole[2].trailing_data == trickled[2].trailing_data == b""


def test_trickled_handshake_answers_each_step_as_soon_as_it_is_complete() -> None:
    protocol = SocksServer(USERS)
    steps = [(greeting(2), b"\x05\x02"), (auth(), b"\x01\x00"), (domain(b"a.example"), b"")]
    for message, answer in steps:
        for i, byte in enumerate(bytewise(message)):
            protocol.receive_data(byte)
            event = protocol.next_event()
            if message is steps[-1][0] and i == len(message) - 1:
                assert event == ConnectRequest("a.example", 443, AddressType.DOMAIN, "agent")
            else:
                assert event is NEED_DATA
            assert protocol.data_to_send() == (answer if i == len(message) - 1 else b"")


def test_whole_handshake_with_auth_and_first_data_in_one_chunk() -> None:
    first = b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n"
    event, sent, protocol = feed([LOGIN + domain(b"a.example", 80) + first], USERS)
    assert event == ConnectRequest("a.example", 80, AddressType.DOMAIN, "agent")
    assert sent == OK_LOGIN  # both answers at once, for the server to send in one write
    assert protocol.trailing_data == first


def test_trailing_data_fed_after_the_request_is_kept() -> None:
    event, _, protocol = feed([NOAUTH + ipv4("192.0.2.1") + b"\x16\x03", b"\x01", b"\x00"])
    assert isinstance(event, ConnectRequest)
    assert protocol.trailing_data == b"\x16\x03\x01\x00"
    protocol.receive_data(b"more")
    assert protocol.reply(Reply.SUCCEEDED) == reply_bytes(0)
    assert protocol.trailing_data == b"\x16\x03\x01\x00more"  # the reply loses nothing


def test_no_trailing_data_before_the_request() -> None:
    protocol = SocksServer()
    protocol.receive_data(NOAUTH + b"\x05\x01")
    assert protocol.next_event() is NEED_DATA
    assert protocol.trailing_data == b""


# --- protocol errors -----------------------------------------------------------------------------
# Each input is minimal: the error shows at its last byte, and every shorter prefix needs data.

ERROR_CASES = [
    # not SOCKS5 at all: close without a word (a SOCKS4 client would misread a SOCKS5 answer)
    ("socks4-connect", None, b"\x04", b"", Reply.GENERAL_FAILURE),
    ("socks4-with-users", USERS, b"\x04", b"", Reply.GENERAL_FAILURE),
    ("http", None, b"G", b"", Reply.GENERAL_FAILURE),
    ("tls", None, b"\x16", b"", Reply.GENERAL_FAILURE),
    ("nul", None, b"\x00", b"", Reply.GENERAL_FAILURE),
    ("high-byte", None, b"\xff", b"", Reply.GENERAL_FAILURE),
    # greeting
    ("no-methods", None, b"\x05\x00", b"\x05\xff", Reply.GENERAL_FAILURE),
    ("no-methods-with-users", USERS, b"\x05\x00", b"\x05\xff", Reply.GENERAL_FAILURE),
    ("only-login-offered-without-users", None, greeting(2), b"\x05\xff", Reply.NOT_ALLOWED),
    ("only-unknown-methods", None, greeting(1, 3, 0x80), b"\x05\xff", Reply.NOT_ALLOWED),
    ("anonymous-refused", USERS, greeting(0), b"\x05\xff", Reply.NOT_ALLOWED),
    ("gssapi-refused", USERS, greeting(0, 1), b"\x05\xff", Reply.NOT_ALLOWED),
    # RFC 1929
    ("wrong-password", USERS, greeting(2) + auth(password=b"s3creT"), b"\x05\x02\x01\x01",
     Reply.NOT_ALLOWED),
    ("password-prefix", USERS, greeting(2) + auth(password=b"s3cre"), b"\x05\x02\x01\x01",
     Reply.NOT_ALLOWED),
    ("unknown-user", USERS, greeting(2) + auth(b"mallory"), b"\x05\x02\x01\x01",
     Reply.NOT_ALLOWED),
    ("other-users-password", USERS, greeting(2) + auth(b"bob", b"s3cret"), b"\x05\x02\x01\x01",
     Reply.NOT_ALLOWED),
    ("auth-version-5", USERS, greeting(2) + b"\x05", b"\x05\x02\x01\x01",
     Reply.GENERAL_FAILURE),
    ("auth-version-0", USERS, greeting(2) + b"\x00", b"\x05\x02\x01\x01",
     Reply.GENERAL_FAILURE),
    ("empty-username", USERS, greeting(2) + b"\x01\x00", b"\x05\x02\x01\x01",
     Reply.GENERAL_FAILURE),
    ("empty-password", USERS, greeting(2) + b"\x01\x05agent\x00", b"\x05\x02\x01\x01",
     Reply.GENERAL_FAILURE),
    # request: the reply that says why, 0.0.0.0:0 bound
    ("request-version-4", None, NOAUTH + b"\x04", OK_NOAUTH + reply_bytes(1),
     Reply.GENERAL_FAILURE),
    ("request-version-after-login", USERS, LOGIN + b"\x01", OK_LOGIN + reply_bytes(1),
     Reply.GENERAL_FAILURE),
    ("bind", None, NOAUTH + b"\x05\x02", OK_NOAUTH + reply_bytes(7), Reply.COMMAND_NOT_SUPPORTED),
    ("udp-associate", None, NOAUTH + b"\x05\x03", OK_NOAUTH + reply_bytes(7),
     Reply.COMMAND_NOT_SUPPORTED),
    ("command-0", None, NOAUTH + b"\x05\x00", OK_NOAUTH + reply_bytes(7),
     Reply.COMMAND_NOT_SUPPORTED),
    ("command-tor-resolve", None, NOAUTH + b"\x05\xf0", OK_NOAUTH + reply_bytes(7),
     Reply.COMMAND_NOT_SUPPORTED),
    ("udp-after-login", USERS, LOGIN + b"\x05\x03", OK_LOGIN + reply_bytes(7),
     Reply.COMMAND_NOT_SUPPORTED),
    ("atyp-0", None, NOAUTH + b"\x05\x01\x00\x00", OK_NOAUTH + reply_bytes(8),
     Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    ("atyp-2", None, NOAUTH + b"\x05\x01\x00\x02", OK_NOAUTH + reply_bytes(8),
     Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    ("atyp-5", None, NOAUTH + b"\x05\x01\x00\x05", OK_NOAUTH + reply_bytes(8),
     Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    ("atyp-255-nonzero-rsv", None, NOAUTH + b"\x05\x01\x07\xff", OK_NOAUTH + reply_bytes(8),
     Reply.ADDRESS_TYPE_NOT_SUPPORTED),
    ("empty-domain", None, NOAUTH + b"\x05\x01\x00\x03\x00", OK_NOAUTH + reply_bytes(4),
     Reply.HOST_UNREACHABLE),
    ("domain-not-utf8", None, NOAUTH + domain(b"\xff.example"), OK_NOAUTH + reply_bytes(4),
     Reply.HOST_UNREACHABLE),
    ("domain-lone-surrogate", None, NOAUTH + domain(b"\xed\xa0\x80.example"),
     OK_NOAUTH + reply_bytes(4), Reply.HOST_UNREACHABLE),
    ("domain-truncated-utf8", None, NOAUTH + domain("bü".encode()[:-1]),
     OK_NOAUTH + reply_bytes(4), Reply.HOST_UNREACHABLE),
    ("port-0-ipv4", None, NOAUTH + ipv4("192.0.2.1", 0), OK_NOAUTH + reply_bytes(1),
     Reply.GENERAL_FAILURE),
    ("port-0-domain", None, NOAUTH + domain(b"a.example", 0), OK_NOAUTH + reply_bytes(1),
     Reply.GENERAL_FAILURE),
    ("port-0-ipv6", USERS, LOGIN + ipv6("2001:db8::1", 0), OK_LOGIN + reply_bytes(1),
     Reply.GENERAL_FAILURE),
]


@pytest.mark.parametrize("users, data, sent, hint", [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_protocol_error(users: dict[str, str] | None, data: bytes, sent: bytes,
                        hint: Reply) -> None:
    event, got, protocol = feed([data], users)
    assert isinstance(event, SocksProtocolError)
    assert (got, event.reply_hint) == (sent, hint)
    assert protocol.state is State.ERROR
    assert key(feed(bytewise(data), users)[0]) == key(event)
    for end in range(len(data)):  # fails at the first byte that shows the error, not later
        assert feed([data[:end]], users)[0] is NEED_DATA


def test_error_names_the_state_and_says_what_to_do() -> None:
    event, _, _ = feed([b"\x04\x01\x00\x50"])
    assert str(event).startswith("greeting: SOCKS4/4a is not SOCKS5")
    event, _, _ = feed([greeting(0)], USERS)
    assert "offers methods 00" in str(event) and "username_password (0x02)" in str(event)
    event, _, _ = feed([NOAUTH + b"\x05\x02"])
    assert str(event) == "request: command BIND is not supported, only CONNECT"


def test_error_state_is_sticky() -> None:
    protocol = SocksServer(USERS)
    protocol.receive_data(greeting(2) + auth(password=b"wrong"))
    with pytest.raises(SocksProtocolError) as first:
        protocol.next_event()
    assert protocol.data_to_send() == b"\x05\x02\x01\x01"
    protocol.receive_data(auth() + domain(b"a.example"))  # a retry on the same connection
    for _ in range(2):
        with pytest.raises(SocksProtocolError) as again:
            protocol.next_event()
        assert again.value.reply_hint == first.value.reply_hint == Reply.NOT_ALLOWED
        assert "ERROR state" in str(again.value) and str(first.value) in str(again.value)
        assert protocol.data_to_send() == b""  # the refusal went out once
    assert protocol.state is State.ERROR and protocol.trailing_data == b""
    with pytest.raises(RuntimeError):
        protocol.reply(Reply.SUCCEEDED)


def test_reply_only_once_and_only_after_the_request() -> None:
    protocol = SocksServer()
    with pytest.raises(RuntimeError, match="GREETING"):
        protocol.reply(Reply.SUCCEEDED)
    protocol.receive_data(NOAUTH + ipv4("192.0.2.1"))
    assert isinstance(protocol.next_event(), ConnectRequest)
    with pytest.raises(RuntimeError, match="CONNECTING"):
        protocol.next_event()
    assert protocol.reply(Reply.NOT_ALLOWED) == reply_bytes(2)
    assert protocol.state is State.DONE
    with pytest.raises(RuntimeError, match="DONE"):
        protocol.reply(Reply.SUCCEEDED)
    with pytest.raises(RuntimeError, match="DONE"):
        protocol.next_event()


# --- replies -------------------------------------------------------------------------------------

REPLY_CASES = [
    ("unbound", Reply.SUCCEEDED, None, 0, "05 00 00 01 00 00 00 00 00 00"),
    ("ipv4", Reply.SUCCEEDED, "192.0.2.1", 1080, "05 00 00 01 c0 00 02 01 04 38"),
    ("ipv4-port-max", Reply.SUCCEEDED, "203.0.113.9", 65535, "05 00 00 01 cb 00 71 09 ff ff"),
    ("ipv6", Reply.SUCCEEDED, "2001:db8::1", 443,
     "05 00 00 04 20 01 0d b8 00 00 00 00 00 00 00 00 00 00 00 01 01 bb"),
    ("ipv6-scoped", Reply.SUCCEEDED, "fe80::1%eth0", 80,
     "05 00 00 04 fe 80 00 00 00 00 00 00 00 00 00 00 00 00 00 01 00 50"),
    ("ipv4-mapped-stays-ipv6", Reply.SUCCEEDED, "::ffff:192.0.2.1", 1,
     "05 00 00 04 00 00 00 00 00 00 00 00 00 00 ff ff c0 00 02 01 00 01"),
    ("refused", Reply.CONNECTION_REFUSED, None, 0, "05 05 00 01 00 00 00 00 00 00"),
    ("not-allowed", Reply.NOT_ALLOWED, None, 0, "05 02 00 01 00 00 00 00 00 00"),
]


@pytest.mark.parametrize("code, host, port, expected", [c[1:] for c in REPLY_CASES],
                         ids=[c[0] for c in REPLY_CASES])
def test_reply_encoding(code: Reply, host: str | None, port: int, expected: str) -> None:
    assert encode_reply(code, host, port) == bytes.fromhex(expected)
    protocol = SocksServer()
    protocol.receive_data(NOAUTH + domain(b"a.example"))
    assert isinstance(protocol.next_event(), ConnectRequest)
    assert protocol.reply(code, host, port) == bytes.fromhex(expected)


def test_reply_rejects_a_bound_name() -> None:
    with pytest.raises(ValueError):
        encode_reply(Reply.SUCCEEDED, "proxy.example", 1)


def test_reply_codes_are_the_rfc_1928_values() -> None:
    assert [(r.name.lower(), int(r)) for r in Reply] == [
        ("succeeded", 0), ("general_failure", 1), ("not_allowed", 2), ("network_unreachable", 3),
        ("host_unreachable", 4), ("connection_refused", 5), ("ttl_expired", 6),
        ("command_not_supported", 7), ("address_type_not_supported", 8)]
    assert [int(a) for a in AddressType] == [1, 3, 4]


def test_connect_request_is_a_frozen_slotted_value() -> None:
    request_ = ConnectRequest("a.example", 443, AddressType.DOMAIN)
    with pytest.raises(AttributeError):
        request_.port = 80  # type: ignore[misc]
    assert not hasattr(request_, "__dict__") and request_.user is None


# --- properties ----------------------------------------------------------------------------------

FAST = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def chunked(data: st.DataObject, blob: bytes) -> list[bytes]:
    cuts = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=12)))
    return [blob[a:b] for a, b in zip([0, *cuts], [*cuts, len(blob)])]


def assert_chunking_does_not_matter(data: st.DataObject, blob: bytes,
                                    users: dict[str, str] | None) -> Outcome:
    """feed() asserts each outcome is NEED_DATA, a ConnectRequest or a SocksProtocolError (any
    other exception fails the test); every chunking must give the one-chunk result."""
    event, sent, protocol = feed([blob], users)
    other_event, other_sent, other = feed(chunked(data, blob), users)
    assert (key(other_event), other_sent, other.trailing_data) == \
        (key(event), sent, protocol.trailing_data)
    if isinstance(event, SocksProtocolError):
        with pytest.raises(SocksProtocolError):
            other.next_event()
    return event


@FAST
@given(st.binary(max_size=120), st.sampled_from([None, USERS]), st.data())
def test_arbitrary_bytes_in_arbitrary_chunks(blob: bytes, users: dict[str, str] | None,
                                             data: st.DataObject) -> None:
    assert_chunking_does_not_matter(data, blob, users)


_VALID = [NOAUTH + domain(b"api.example.com") + b"GET /",
          NOAUTH + ipv6("2001:db8::1", 8443),
          LOGIN + ipv4("192.0.2.1", 22) + b"SSH-2.0-x\r\n"]


@FAST
@given(st.sampled_from(range(len(_VALID))), st.data())
def test_mutated_handshakes_in_arbitrary_chunks(which: int, data: st.DataObject) -> None:
    blob = bytearray(_VALID[which])
    for _ in range(data.draw(st.integers(0, 3))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    blob = blob[:data.draw(st.integers(0, len(blob)))] + data.draw(st.binary(max_size=8))
    event = assert_chunking_does_not_matter(data, bytes(blob), USERS if which == 2 else None)
    if isinstance(event, ConnectRequest):
        assert 0 < event.port < 65536 and event.host


@FAST
@given(st.one_of(
    st.ip_addresses().map(lambda ip: (str(ip), AddressType.IPV4 if ip.version == 4
                                      else AddressType.IPV6, ip.packed)),
    st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) < 256).map(
        lambda s: (s, AddressType.DOMAIN, bytes((len(s.encode()),)) + s.encode()))),
    st.integers(1, 65535), st.binary(max_size=20), st.booleans(), st.data())
def test_any_valid_request_round_trips(target: tuple[str, AddressType, bytes], port: int,
                                       tail: bytes, login: bool, data: st.DataObject) -> None:
    host, atyp, address = target
    blob = (LOGIN if login else NOAUTH) + request(atyp, address, port) + tail
    event = assert_chunking_does_not_matter(data, blob, USERS if login else None)
    assert event == ConnectRequest(host, port, atyp, "agent" if login else None)


@pytest.mark.parametrize(("request_bytes", "address"), [
    (b"\x05\x01\x00\x01\xc0\x00\x02\x01\x00\x50", ipaddress.ip_address("192.0.2.1")),
    (b"\x05\x01\x00\x04" + ipaddress.ip_address("2001:db8::1").packed + b"\x01\xbb",
     ipaddress.ip_address("2001:db8::1")),
    (b"\x05\x01\x00\x03\x0a2852039166\x00\x50", None),
], ids=["ipv4", "ipv6", "domain-that-looks-like-an-address"])
def test_address_types_carry_the_address(request_bytes: bytes, address: object) -> None:
    server = SocksServer()
    server.receive_data(b"\x05\x01\x00" + request_bytes)
    event = server.next_event()
    assert isinstance(event, ConnectRequest)
    assert event.address == address


def test_a_locked_out_client_is_refused_like_a_wrong_password_without_a_check() -> None:
    protocol = SocksServer(USERS)
    asked: list[str] = []
    protocol.login_lock = lambda user: asked.append(user) or "locked for 2.0s more"
    protocol.receive_data(LOGIN)
    with pytest.raises(SocksAuthError) as caught:
        protocol.next_event()
    assert not caught.value.checked and "without checking the password" in str(caught.value)
    assert protocol.data_to_send() == b"\x05\x02\x01\x01"  # the same bytes as a wrong password
    assert asked == [protocol.tried] and protocol.tried  # the lock of the user tried
