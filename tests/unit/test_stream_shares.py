"""Per-client CPU shares for parsing followed HTTP (`stream.shares`)."""

from __future__ import annotations

import pytest

from guardd.stream.shares import CpuShares


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
    assert shares.charge("a", 0.5) == 0.0
    assert shares.charge("a", 0.25) == pytest.approx(0.5)  # (0.25 s owed at half a core)
    assert shares.charge("a", 0.25) == pytest.approx(1.0)  # its other connections owe too
    clock.now += 1.0
    assert shares.charge("a", 0.0) == 0.0  # (paid back)


def test_one_clients_debt_costs_no_other_client_anything() -> None:
    shares = CpuShares(rate=0.5, burst=0.5, clock=Clock())
    shares.charge("greedy", 5.0)
    assert shares.charge("greedy", 0.01) > 9.0
    assert shares.charge("other", 0.2) == 0.0


def test_over_time_a_client_gets_its_rate_of_a_core() -> None:
    clock = Clock()
    shares = CpuShares(rate=0.5, burst=0.5, clock=clock)
    spent = 0.0
    while clock.now < 110.0:  # parse 10 ms, then wait as told
        spent += 0.01
        clock.now += 0.01 + shares.charge("a", 0.01)
    assert spent == pytest.approx(0.5 + 0.5 * 10, rel=0.05)


def test_buckets_that_refilled_are_forgotten() -> None:
    clock = Clock()
    shares = CpuShares(rate=1.0, burst=1.0, clock=clock)
    for client in range(5000):
        shares.charge(str(client), 0.5)
        clock.now += 0.01
    assert len(shares._buckets) <= 1100  # (those of the last second, at most)
