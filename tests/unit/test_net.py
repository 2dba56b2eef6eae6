"""`net`: where an accepted connection was sent."""

from __future__ import annotations

import socket

import pytest

from guardd.net import arrived_at, original_destination


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
