"""`stream.memory`: which connections are cut when a client holds more than its budget of
guardd's buffers (`over_budget`), and what of a connection's queues counts (`Progress`; the
daemon's sweep: e2e `test_hardening.py`)."""

from __future__ import annotations

from guardd.stream.memory import Progress, Way, over_budget

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


def test_what_a_connection_s_ends_took_since_the_last_sweep_does_not_count() -> None:
    """Session 53's fairness re-attack: busy downloads, their queues full and moving, were cut
    as if stalled. Each way counts what it holds less what its destination took since."""
    progress: Progress[str] = Progress()
    assert progress.unmoved("a", (Way(MIB, 0), Way(20 * MIB, 200 * MIB))) == MIB
    progress.swept()
    # (the download moved 300 MiB more: its 25 MiB are on their way; the upload stalled)
    assert progress.unmoved("a", (Way(2 * MIB, 0), Way(25 * MIB, 500 * MIB))) == 2 * MIB
    progress.swept()
    # (the download stalled too: all of it counts)
    assert progress.unmoved("a", (Way(2 * MIB, 0), Way(25 * MIB, 500 * MIB))) == 27 * MIB


def test_a_stalled_way_is_not_hidden_by_the_other_way_moving() -> None:
    """An upload to a server that never reads beside a download that streams: each way on its
    own, or the download's progress would cover the upload's queues."""
    progress: Progress[str] = Progress()
    progress.unmoved("a", (Way(7 * MIB, 100), Way(MIB, 0)))
    progress.swept()
    assert progress.unmoved("a", (Way(7 * MIB, 100), Way(MIB, 900 * MIB))) == 7 * MIB


def test_a_new_destination_takes_from_nothing_and_forgotten_connections_start_again() -> None:
    """A proxy connection that went on to another origin has a new destination socket, which
    took less than the last one: no progress until the next sweep, never a negative one; a
    connection a sweep did not find is forgotten, and found again counts from its start."""
    progress: Progress[str] = Progress()
    progress.unmoved("a", (Way(0, 50 * MIB), Way(0, 0)))
    progress.unmoved("b", (Way(0, 0), Way(0, 10 * MIB)))
    progress.swept()
    assert progress.unmoved("a", (Way(4 * MIB, MIB), Way(0, 0))) == 4 * MIB
    progress.swept()
    assert progress.unmoved("b", (Way(0, 0), Way(4 * MIB, 10 * MIB))) == 0
