"""Per-client CPU shares (`shares`): what a client's connections and queries may cost."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from types import SimpleNamespace

import pytest

from guardd.dns.server import UDPListener
from guardd.metrics import Metrics
from guardd.shares import WINDOW, CpuShares
from guardd.turns import Turns


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_client_within_its_burst_never_waits() -> None:
    shares = CpuShares(rate=0.5, burst=0.5, clock=Clock())
    assert [shares.charge("a", 0.1) for _ in range(5)] == [0.0] * 5


def test_a_client_past_its_share_waits_until_what_it_owes_has_refilled() -> None:
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    shares.charge("other", 0.0)  # (another client is active: the share holds)
    assert shares.charge("a", 0.5) == 0.0
    assert shares.charge("a", 0.25) == pytest.approx(0.5)  # (0.25 s owed at half a core)
    assert shares.charge("a", 0.25) == pytest.approx(1.0)  # its other connections owe too
    clock.now += 0.9
    shares.charge("other", 0.0)
    clock.now += 0.1
    assert shares.charge("a", 0.0) == 0.0  # (paid back)


def test_what_a_client_may_take_at_once_holds_another_no_longer_than_a_glance() -> None:
    """Session 56's re-attack (Medium): half a second of CPU a client could take at once, while
    another was active: 200 connections of heavy responses held the other's DNS answers 680
    ms before the share caught up; and at 50 ms, responses timed to land together once the
    bucket had refilled held them 100 ms at every pulse. A client takes `BURST`, 10 ms, at
    once."""
    shares = CpuShares(clock=Clock())
    shares.charge("other", 0.0)
    assert shares.charge("a", 0.008) == 0.0
    assert shares.charge("a", 0.004) > 0.0


def test_one_clients_debt_costs_no_other_client_anything() -> None:
    shares = CpuShares(rate=0.5, burst=0.5, clock=Clock())
    shares.charge("other", 0.0)
    shares.charge("greedy", 5.0)
    assert shares.charge("greedy", 0.01) > 9.0
    assert shares.charge("other", 0.2) == 0.0


def test_over_time_a_client_gets_its_rate_of_a_core() -> None:
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    spent = 0.0
    while clock.now < 110.0:  # work 10 ms, then wait as told, while another client asks
        shares.charge("other", 0.0)  # something now and then
        spent += 0.01
        clock.now += 0.01 + shares.charge("a", 0.01)
    assert spent == pytest.approx(0.5 + 0.5 * 10, rel=0.05)


def test_a_client_alone_takes_what_it_needs_and_owes_nothing_for_it() -> None:
    """The share holds a client back only for another: a lone agent (its bench, say) is not
    held to half a core of an idle loop."""
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    for _ in range(200):
        assert shares.charge("a", 0.01) == 0.0  # (2 s of work in 2 s)
        clock.now += 0.01
    shares.charge("b", 0.0)  # another client asks: from now on the share holds
    waits = [shares.charge("a", 0.01) for _ in range(3)]
    assert 0 < waits[0] < waits[1] < waits[2] < 0.1  # (what it owes from now, not before)


def test_another_client_counts_as_active_for_the_window_only() -> None:
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    shares.charge("b", 0.0)
    assert shares.charge("a", 1.0) == pytest.approx(1.0)
    clock.now += WINDOW + 0.01
    assert shares.charge("a", 1.0) == 0.0  # (b has been quiet: a is alone again)


def test_buckets_that_refilled_are_forgotten() -> None:
    clock = Clock()
    shares = CpuShares(rate=1.0, burst=1.0, clock=clock)
    for client in range(5000):
        shares.charge(str(client), 0.5)
        clock.now += 0.01
    assert len(shares._buckets) <= 1100  # (those of the last second, at most)


class DnsService:
    metrics = Metrics(process=False)

    def serves(self, client: str) -> bool:
        return client != "192.0.2.66"  # (not a client: `clients` leaves it out)

    def answer(self, data: bytes, client: str, tcp: bool, local: bool = False) -> bytes:
        return b"answer"


class Flushed:
    def after_flush(self, callback: Callable[..., object], *args: object) -> None:
        callback(*args)


def udp(shares: CpuShares) -> tuple[UDPListener, list[object]]:
    """A UDP listener of `shares` that answers every query, and what it sent."""
    listener = UDPListener(DnsService(), Flushed(), Turns(shares))  # type: ignore[arg-type]
    sent: list[object] = []
    transport = SimpleNamespace(sendto=lambda *args: sent.append(args), is_closing=lambda: False,
                                get_extra_info=lambda name: ("0.0.0.0", 53))
    listener.connection_made(transport)  # type: ignore[arg-type]
    return listener, sent


async def test_a_client_that_only_asks_dns_holds_another_back() -> None:
    """Its queries are charged to it, which marks it active: the attack pass's victims were
    other clients' DNS answers."""
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    listener, sent = udp(shares)
    assert shares.charge("10.0.0.1", 1.0) == 0.0  # (alone)
    listener.datagram_received(b"query", ("10.0.0.2", 53))
    await asyncio.sleep(0)  # (a loop turn's queries are charged once it is over)
    assert sent and shares.charge("10.0.0.1", 1.0) > 0.0


async def test_a_datagram_from_outside_the_clients_marks_nobody_active() -> None:
    """Review: any datagram counted, so a stray one a second held a lone agent to half a
    core."""
    shares = CpuShares(rate=0.5, burst=0.5, clock=Clock())
    listener, _ = udp(shares)
    listener.datagram_received(b"garbage", ("192.0.2.66", 53))
    await asyncio.sleep(0)
    assert shares.charge("10.0.0.1", 1.0) == 0.0


def test_a_share_never_active_owes_while_a_client_is_and_holds_no_one_back() -> None:
    """The share of the datagrams from outside `clients` (`active=False`): nothing is owed
    while no client wants the loop; once one does, it is held to its share; its own charges
    never make a client share the loop with it."""
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    assert shares.charge("outside", 1.0, active=False) == 0.0  # (no client: nobody waits)
    shares.charge("10.0.0.1", 0.0)
    assert shares.charge("outside", 1.0, active=False) == pytest.approx(2.0)
    assert shares.wait("outside") == pytest.approx(2.0)
    assert shares.charge("10.0.0.1", 1.0) == 0.0  # (alone: "outside" is nobody)
    clock.now += WINDOW + 1
    assert shares.wait("outside") == 0.0  # (the client has been quiet)


def test_a_clients_own_work_that_holds_no_one_back_is_owed_nothing_while_it_is_alone() -> None:
    """Re-attack of attack pass 51: a client's work charged as holding no one back (its
    scrapes of the metrics) was held against its own last activity, so a client alone ran up
    a debt (25 s of scrapes: 23 s to wait) that fell due once another client came (a DNS
    query), and a scraper on loopback waited its turn past its timeout."""
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    shares.charge("127.0.0.1", 0.001)  # (active: a DNS query)
    for _ in range(25):
        clock.now += 1.0
        assert shares.charge("127.0.0.1", 1.0, active=False) == 0.0
    shares.charge("10.0.0.1", 0.001)  # (another client comes)
    assert shares.wait("127.0.0.1") == 0.0


def test_waiting_says_what_charging_nothing_says() -> None:
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    assert shares.wait("a") == 0.0  # (never charged)
    shares.charge("b", 0.0)
    shares.charge("a", 1.0)
    assert shares.wait("a") == pytest.approx(1.0)
    clock.now += 0.5
    assert shares.wait("a") == pytest.approx(0.5)
    clock.now += WINDOW
    assert shares.wait("a") == 0.0  # (b has been quiet: a is alone)


class NoClients(DnsService):
    def serves(self, client: str) -> bool:
        return False


async def test_a_reloads_clients_decide_whose_queries_are_charged() -> None:
    """The listener keeps each source's client; a reload's service (`clients` changed) starts
    that over."""
    shares = CpuShares(rate=0.5, burst=0.5, clock=Clock())
    listener, _ = udp(shares)
    listener.service = NoClients()  # type: ignore[assignment]
    listener.datagram_received(b"query", ("10.0.0.2", 53))
    await asyncio.sleep(0)
    assert shares.charge("10.0.0.1", 1.0) == 0.0  # (10.0.0.2 is no client: nobody else)
    listener.service = DnsService()  # type: ignore[assignment]
    listener.datagram_received(b"query", ("10.0.0.2", 53))
    await asyncio.sleep(0)
    assert shares.charge("10.0.0.1", 1.0) > 0.0
