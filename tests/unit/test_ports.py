"""How many connections a client may open to one destination where the kernel does not reuse
guardd's ports in TIME_WAIT (`guardd.ports`), and the connects refused past it."""

from __future__ import annotations

import ipaddress
import tracemalloc

import pytest

from guardd import ports
from guardd.addr import IPAddress
from guardd.ports import DestinationPorts
from tests.unit.test_guard import Clock
from tests.unit.test_tunnel import Opened, Refused, Rig
from tests.unit.test_tunnel_limits import rig_with

SERVER = ipaddress.ip_address("192.0.2.10")
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def take(destination_ports: DestinationPorts, ip: IPAddress, port: int, client: str) -> str:
    """Ask for one more connection and count it when it may go, as `Connect.may_try` does."""
    why, counters = destination_ports.ask(ip, port, client)
    if not why:
        destination_ports.count(counters)
    return why


@pytest.mark.parametrize("reuse, counted", [(0, [True, True]), (1, [False, False]),
                                            (2, [True, False])], ids=["0", "1", "2"])
def test_only_destinations_whose_ports_the_kernel_does_not_reuse_are_counted(
        reuse: int, counted: list[bool]) -> None:
    """net.ipv4.tcp_tw_reuse: 0 never reuses a port in TIME_WAIT for a new connect, 1 always
    may, 2 (Linux's default) for loopback only."""
    clock = [0.0]
    destination_ports = DestinationPorts(reuse, ports=28, clock=lambda: clock[0])
    for ip, is_counted in zip((SERVER, LOOPBACK), counted):
        whys = [take(destination_ports, ip, 443, "10.0.0.2") for _ in range(3)]
        assert whys[:2] == ["", ""]
        assert bool(whys[2]) is is_counted


def test_a_client_past_its_connections_to_one_destination_waits_for_them_to_expire() -> None:
    clock = [0.0]
    destination_ports = DestinationPorts(0, ports=28, clock=lambda: clock[0])  # (2 each)
    assert take(destination_ports, SERVER, 443, "10.0.0.2") == ""
    clock[0] = 30.0
    assert take(destination_ports, SERVER, 443, "10.0.0.2") == ""
    why = take(destination_ports, SERVER, 443, "10.0.0.2")
    assert "2 connections to 192.0.2.10:443 within 60s" in why and "tcp_tw_reuse" in why
    assert take(destination_ports, SERVER, 80, "10.0.0.2") == ""  # (another destination)
    assert take(destination_ports, SERVER, 443, "10.0.0.3") == ""  # (another client)
    mapped = ipaddress.ip_address("::ffff:192.0.2.10")  # (the same ports: a v4 connection)
    assert "2 connections to 192.0.2.10:443" in take(destination_ports, mapped, 443, "10.0.0.2")
    clock[0] = 60.5  # (the first one's port is free again)
    assert take(destination_ports, SERVER, 443, "10.0.0.2") == ""


async def test_a_connect_past_the_clients_ports_to_its_destination_is_refused_and_recorded(
        ) -> None:
    """Attack passes (2026-12-06): one client opening and closing allowed tunnels to one
    destination left 24,000 of guardd's ports to it in TIME_WAIT within 45 s (guardd closes
    first towards the server); other clients' connects there failed ("Cannot assign
    requested address") or crawled, each connect(2) searching the range."""
    rig = Rig()
    rig.guard.ports = DestinationPorts(0, ports=42)  # (3 each)
    results = []
    for _ in range(4):
        tunnel = rig.tunnel()
        results.append(await tunnel.open("docs.test", 443))
        tunnel.close()
    assert [type(result) for result in results] == [Opened] * 3 + [Refused]
    record = rig.records[-1]
    assert record["effect"] == "deny" and "3 connections to" in str(record["reason"])
    assert len(rig.io.attempts) == 3  # (the fourth never tried)


LIMITED = """\
version: "1.0"
rules:
  - {id: site, action: network.request, ip: 192.0.2.0/24, effect: allow,
     rateLimit: {maxRequests: 1, window: "10 seconds"}}
"""


async def test_a_connect_its_rate_limit_refused_takes_no_port() -> None:
    """Re-attack (2026-12-06): the ports were counted before the rule's rate limit, so
    connects the limit refused (never tried) used up the client's ports to the destination."""
    clock = Clock()
    rig = rig_with(LIMITED, {}, clock=clock)
    rig.guard.ports = DestinationPorts(0, ports=28, clock=clock)
    results = []
    for at in (0, 1, 11):
        clock.now = at
        tunnel = rig.tunnel()
        results.append(await tunnel.open("192.0.2.10", 443, SERVER))  # type: ignore[arg-type]
        tunnel.close()
    assert [type(result) for result in results] == [Opened, Refused, Opened]
    assert "rate limit" in str(rig.records[1]["reason"])


def test_the_cap_is_a_fourteenth_of_the_ephemeral_range() -> None:
    """Re-attack (2026-12-06): a constant 4,096 was more than a narrower range held (500
    ports: one client's churn well under the cap used them all)."""
    assert DestinationPorts(0, ports=500).per_destination == 35
    assert DestinationPorts(0).per_destination == 28232 // 14
    assert ports.ephemeral_ports() > 0


def test_the_counts_take_the_same_memory_however_many_destinations() -> None:
    """Re-attack (2026-12-06): a count a destination, one client connecting once each to
    100,000 of them (a connect every 0.5 ms) held 96 MiB."""
    clock = [0.0]
    destination_ports = DestinationPorts(0, clock=lambda: clock[0])
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for number in range(100_000):
            clock[0] += 0.0005
            assert take(destination_ports, ipaddress.ip_address(0x0A000000 + number), 443,
                                          "10.0.0.2") == ""
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 4 << 20, f"{grown:,} bytes"


def test_a_client_that_front_loads_a_window_gets_at_most_twice_the_cap_in_any_minute() -> None:
    clock = [0.0]
    destination_ports = DestinationPorts(0, ports=1400, clock=lambda: clock[0])  # (100 each)
    opened = []
    for tick in range(3000):  # (a try every 0.1 s for 300 s)
        clock[0] = tick / 10
        if take(destination_ports, SERVER, 443, "10.0.0.2") == "":
            opened.append(clock[0])
    most = max(sum(1 for at in opened if start <= at < start + 60) for start in opened)
    assert 100 <= most <= 200, most


def test_the_sketchs_rows_are_independent() -> None:
    """Re-attack (2026-12-06): with Python's `hash` salted per row, 29% of the key pairs that
    met in one row's counter met in all four: one heavy client's counts denied innocent
    clients' first connects elsewhere. Pairs meeting in all four rows are now as rare as four
    independent 16-bit hashes make them (none in this many)."""
    destination_ports = DestinationPorts(0)
    slots = [tuple(destination_ports._slots(f"10.0.0.{n % 200}", f"10.{n >> 8 & 255}."
                                            f"{n & 255}.1:443")) for n in range(50_000)]
    by_first: dict[int, list[tuple[int, ...]]] = {}
    for each in slots:
        by_first.setdefault(each[0], []).append(each)
    met_in_one = sum(len(group) * (len(group) - 1) // 2 for group in by_first.values())
    met_in_all = sum(len(group) - len(set(group)) for group in by_first.values())
    assert met_in_one > 10_000 and met_in_all == 0, (met_in_one, met_in_all)


def test_clients_together_leave_half_the_range_to_those_that_opened_few() -> None:
    """Second re-attack (2026-12-06): four clients, each within its cap (and a front-loaded
    window gives one about twice it), used up every port to one server, and a fifth client
    opening one connection every 7 s found none for 28 s. Past a few each, clients' further
    connections stop once the destination's count is at a quarter of the range (half at
    worst, by the estimate): a client that opened few still finds ports."""
    clock = [0.0]
    destination_ports = DestinationPorts(0, ports=5600, clock=lambda: clock[0])
    per_client, few = destination_ports.per_destination, destination_ports.few
    assert (per_client, few) == (400, 100)
    opened = {}
    for heavy in (f"10.0.0.{n}" for n in range(2, 12)):  # (ten of them, each up to its cap)
        opened[heavy] = 0
        while take(destination_ports, SERVER, 443, heavy) == "":
            opened[heavy] += 1
    assert sum(opened.values()) <= 5600 // 4 + 10 * few
    assert max(opened.values()) == per_client
    assert all(take(destination_ports, SERVER, 443, "10.0.0.99") == "" for _ in range(few))
    why = take(destination_ports, SERVER, 443, "10.0.0.99")
    assert "a quarter of guardd's ports" in why


async def test_a_connect_the_ports_refused_takes_nothing_from_its_rate_limit() -> None:
    """Last review (2026-12-06): counted after the rule's charge, a connect the ports refused
    had spent its rule's rate limit, and the client's connects elsewhere under that rule were
    refused too."""
    clock = Clock()
    rig = rig_with(LIMITED.replace("maxRequests: 1", "maxRequests: 3"), {}, clock=clock)
    rig.guard.ports = DestinationPorts(0, ports=28, clock=clock)  # (2 each)
    other = ipaddress.ip_address("192.0.2.11")
    results = []
    for ip in (SERVER, SERVER, SERVER, other):
        tunnel = rig.tunnel()
        results.append(await tunnel.open(str(ip), 443, ip))  # type: ignore[arg-type]
        tunnel.close()
    assert [type(result) for result in results] == [Opened, Opened, Refused, Opened]


def test_the_kernels_settings_are_taken_again_when_configured() -> None:
    """Last review: read once at the start, a `tcp_tw_reuse` the denial told the operator to
    set took effect only at a restart (the daemon configures them at each reload)."""
    destination_ports = DestinationPorts(0, ports=28)
    assert take(destination_ports, SERVER, 443, "10.0.0.2") == ""
    assert take(destination_ports, SERVER, 443, "10.0.0.2") == ""
    assert take(destination_ports, SERVER, 443, "10.0.0.2")
    destination_ports.configure(1, 28)
    assert take(destination_ports, SERVER, 443, "10.0.0.2") == ""
    destination_ports.configure(0, 28232)
    assert destination_ports.per_destination == 2016


def test_only_a_loopback_address_as_written_is_exempt_under_the_default() -> None:
    """Last attack (2026-12-06): under `tcp_tw_reuse` 2 an IPv6 address embedding 127.0.0.1
    (NAT64, IPv4-compatible, 6to4) went uncounted, but the kernel reuses ports only to one
    loopback as written (or mapped)."""
    destination_ports = DestinationPorts(2, ports=28)  # (2 each)
    for text in ("64:ff9b::7f00:1", "::7f00:1", "2002:7f00:1::1"):
        address = ipaddress.ip_address(text)
        assert [take(destination_ports, address, 8080, text) for _ in range(3)][2], text
    for text in ("::ffff:127.0.0.1", "::1"):
        address = ipaddress.ip_address(text)
        assert [take(destination_ports, address, 8080, text) for _ in range(3)] == [""] * 3
