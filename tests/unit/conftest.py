"""Unit tests run on the host's own network, not in a namespace: guardd's connects in them may
reach loopback only. The fake zones answer with documentation addresses (192.0.2.0/24), which
are a real link on some machines (this one's default gateway is 192.0.2.1): a connect there is
refused before it leaves, and fails the test that made it."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from guardd.addr import IPAddress, count_as_one
from guardd.stream.socket_io import SocketIO


@pytest.fixture(autouse=True)
def loopback_connects_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    tried: list[str] = []
    connect = SocketIO.connect

    async def loopback_only(io: SocketIO, ip: IPAddress, port: int,
                            under_way: Callable[[tuple[str, int]], None]) -> object:
        if not ip.is_loopback:
            tried.append(f"{ip}:{port}")
            raise ConnectionRefusedError(f"a unit test connected to {ip}: loopback only")
        return await connect(io, ip, port, under_way)

    monkeypatch.setattr(SocketIO, "connect", loopback_only)
    yield tried
    assert not tried, f"guardd connected beyond loopback in a unit test: {tried}"


@pytest.fixture
def one_agent() -> Iterator[tuple[str, ...]]:
    """A sandbox's agent: its IPv4 and IPv6 addresses, counted as one (`--same-client`)."""
    agent = ("10.200.0.2", "fd00:6a72:6464::2")
    count_as_one([agent])
    yield agent
    count_as_one([])
