"""`stream.memory`: which connections are cut when a client holds more than its budget of
guardd's buffers (`over_budget`), and what of a connection's queues counts (`Progress`; the
daemon's sweep: e2e `test_hardening.py`)."""

from __future__ import annotations

from guardd.stream.memory import Progress, Way, over_budget

MIB = 1 << 20


def stalled(connection: str, client: str, size: int) -> tuple[str, str, int, int]:
    """A connection whose ends took none of what it holds since the last sweep."""
    return connection, client, size, size


def test_a_client_within_its_budget_keeps_every_connection() -> None:
    held = [stalled("a1", "10.0.0.2", 3 * MIB), stalled("a2", "10.0.0.2", 5 * MIB),
            stalled("b1", "10.0.0.3", 0)]
    assert over_budget(held, 8 * MIB) == []


def test_a_client_over_its_budget_loses_its_largest_until_within_it() -> None:
    """Only as many as it takes, largest first; another client's are never cut for it."""
    held = [stalled("a1", "10.0.0.2", 2 * MIB), stalled("a2", "10.0.0.2", 7 * MIB),
            stalled("a3", "10.0.0.2", 4 * MIB), stalled("b1", "10.0.0.3", 7 * MIB)]
    cuts = over_budget(held, 8 * MIB)
    assert [(cut.connection, cut.client) for cut in cuts] == [("a2", "10.0.0.2")]
    assert cuts[0].why.startswith("cut: it held 7.0 MiB in guardd's buffers")
    assert "held 13.0 MiB that its ends did not take since the last measure, over its 8.0 MiB " \
        "budget (maxBufferedPerClient)" in cuts[0].why


def test_one_connection_over_the_budget_alone_is_cut() -> None:
    held = [stalled("a1", "10.0.0.2", 9 * MIB), stalled("a2", "10.0.0.2", 1)]
    assert [cut.connection for cut in over_budget(held, 8 * MIB)] == ["a1"]


def test_bytes_on_their_way_count_against_a_ceiling_of_several_budgets() -> None:
    """Session 54's attack: eight downloads, each read at 42 MB/s, held 23 times a 4 MiB
    budget uncut, all of it moving. What moves counts against `MOVING_BUDGETS` budgets: the
    largest go until the client is within; a client's stalled connections cut first leave
    less to cut (and are never cut twice)."""
    moving = [(f"m{n}", "10.0.0.2", 0, 6 * MIB) for n in range(6)]  # (36 MiB)
    assert over_budget(moving, 10 * MIB) == []  # (within 4 budgets: a fast link's downloads)
    cuts = over_budget(moving, 4 * MIB)
    assert len(cuts) == 4 and all(cut.client == "10.0.0.2" for cut in cuts)
    assert "held 36.0 MiB in all, moving or not, over 4 times its 4.0 MiB budget " \
        "(maxBufferedPerClient)" in cuts[0].why
    cuts = over_budget([*moving, stalled("s", "10.0.0.2", 5 * MIB)], 4 * MIB)
    assert [cut.connection for cut in cuts][:1] == ["s"] and len(cuts) == 5


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
