"""`net`: where an accepted connection was sent."""

from __future__ import annotations

import socket

import pytest

from guardd.net import arrived_at, hostport, original_destination


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
