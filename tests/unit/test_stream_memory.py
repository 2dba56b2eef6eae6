"""`stream.memory.over_budget`: which connections are cut when a client holds more than its
budget of guardd's buffers (the daemon's sweep: e2e `test_hardening.py`)."""

from __future__ import annotations

from guardd.stream.memory import over_budget

MIB = 1 << 20


def test_a_client_within_its_budget_keeps_every_connection() -> None:
    held = [("a1", "10.0.0.2", 3 * MIB), ("a2", "10.0.0.2", 5 * MIB), ("b1", "10.0.0.3", 0)]
    assert over_budget(held, 8 * MIB) == []


def test_a_client_over_its_budget_loses_its_largest_until_within_it() -> None:
    """Only as many as it takes, largest first; another client's are never cut for it."""
    held = [("a1", "10.0.0.2", 2 * MIB), ("a2", "10.0.0.2", 7 * MIB),
            ("a3", "10.0.0.2", 4 * MIB), ("b1", "10.0.0.3", 7 * MIB)]
    cuts = over_budget(held, 8 * MIB)
    assert [(cut.connection, cut.client) for cut in cuts] == [("a2", "10.0.0.2")]
    assert cuts[0].why.startswith("cut: it held 7.0 MiB in guardd's buffers")
    assert "held 13.0 MiB, over its 8.0 MiB budget (maxBufferedPerClient)" in cuts[0].why


def test_one_connection_over_the_budget_alone_is_cut() -> None:
    held = [("a1", "10.0.0.2", 9 * MIB), ("a2", "10.0.0.2", 1)]
    assert [cut.connection for cut in over_budget(held, 8 * MIB)] == ["a1"]
