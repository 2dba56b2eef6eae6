"""`net`: where an accepted connection was sent."""

from __future__ import annotations

import socket

import pytest

from guardd.net import (CLIENT_SOCKET_BUFFER, Endpoint, arrived_at, bind_socket, hostport,
                        original_destination)


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"),
                                          (socket.AF_INET6, "::1")])
def test_a_connection_no_nat_redirected_has_no_original_destination(family: int, host: str
                                                                    ) -> None:
    """Both families: IPv6 asks at IPPROTO_IPV6 (Python's socket module has no SOL_IPV6, and
    asking there raised AttributeError for every IPv6 connection)."""
    with socket.socket(family) as listening:
        listening.bind((host, 0))
        listening.listen()
        with socket.create_connection(listening.getsockname()[:2]):
            accepted, _ = listening.accept()
            with accepted:
                assert original_destination(accepted) is None
                assert arrived_at(accepted) == (accepted.getsockname()[:2],)


def test_a_host_given_in_brackets_is_bracketed_once() -> None:
    """Attack pass: a SOCKS domain target `[::ffff:a9fe:a9fe]` was recorded as
    `[[::ffff:a9fe:a9fe]]:80`."""
    assert hostport("[::ffff:a9fe:a9fe]", 80) == "[::ffff:a9fe:a9fe]:80"
    assert hostport("::1", 80) == "[::1]:80" and hostport("a.test", 80) == "a.test:80"


def test_a_client_that_never_reads_pins_a_bounded_send_buffer() -> None:
    """Attack pass: with the kernel's own tuning, guardd's send buffer to a client that never
    read grew past 4 MiB (3.9 MB here), 256 connections of it a GiB of kernel memory."""
    listening = bind_socket(Endpoint("127.0.0.1", 0), socket.SOCK_STREAM)
    client = socket.create_connection(listening.getsockname())
    listening.setblocking(True)
    conn, _ = listening.accept()
    conn.setblocking(False)
    sent = 0
    with listening, client, conn:
        while True:
            try:
                sent += conn.send(bytes(65536))
            except BlockingIOError:
                break
    assert sent <= 2 * CLIENT_SOCKET_BUFFER + (1 << 20)


def test_a_dual_stack_socket_on_the_ipv6_wildcard_takes_ipv4_too() -> None:
    """Review: the metrics on `[::]` (prometheus_client's server took IPv4 there) refused
    IPv4 scrapers once it was bound v6-only as the proxies' sockets are."""
    listening = bind_socket(Endpoint("::", 0), socket.SOCK_STREAM, dual_stack=True)
    with listening, socket.create_connection(("127.0.0.1", listening.getsockname()[1]), 2):
        pass
    v6_only = bind_socket(Endpoint("::", 0), socket.SOCK_STREAM)
    with v6_only, pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", v6_only.getsockname()[1]), 2)
