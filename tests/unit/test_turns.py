"""Turns at a client's CPU share (`turns`): one queue per client that owes, served in
order, never leaving a waiter without a wake-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from guardd.shares import CpuShares
from guardd import turns as turns_module
from guardd.turns import _TASKS, Turns

#: Half a core, 10 ms at once: a charge of 30 ms owes 20 ms, waited 40 ms.
RATE, BURST = 0.5, 0.01


def owing(client: str = "agent", seconds: float = 0.03) -> Turns:
    """Turns over shares where another client is active and `client` spent `seconds`."""
    shares = CpuShares(rate=RATE, burst=BURST)
    shares.charge("other", 0.0)  # (another client is active: the share holds)
    shares.charge(client, seconds)
    return Turns(shares)


async def test_waiters_go_in_the_order_they_came_once_the_share_refilled() -> None:
    turns = owing()
    loop = asyncio.get_running_loop()
    went: list[tuple[int, float]] = []
    started = loop.time()
    assert turns.share("agent", lambda: None).owed()
    for number in range(5):
        turns.wait("agent", lambda number=number: went.append((number, loop.time())))
    await asyncio.sleep(0.02)
    assert went == []  # (20 ms owed: 40 ms at half a core)
    await asyncio.sleep(0.1)
    assert [number for number, _ in went] == [0, 1, 2, 3, 4]
    assert went[0][1] - started >= 0.04


async def test_new_work_waits_behind_the_queue_even_once_the_share_allows() -> None:
    """Work that came later never overtakes: with waiters queued, a client's new work waits
    whatever its share says (attack pass: exact waits let whoever checked first after a
    refill take the share, and the client's new connections waited seconds)."""
    turns = owing(seconds=0.0)
    counted: list[None] = []
    share = turns.share("agent", lambda: counted.append(None))
    assert not share.owed()
    went: list[str] = []
    share.wait(lambda: went.append("first"))
    assert share.owed()  # (its share is whole, and yet)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert went == ["first"]
    assert not share.owed()
    assert counted == []  # (it kept the order, and waited for no share: no wait counted)


async def test_a_waiter_is_woken_even_when_the_share_refilled_before_it_queued() -> None:
    """Re-attack (2026-12-04, High): a pump whose share refilled between its check and its
    charge got no wake-up and its connection stalled for good. A waiter is always served,
    whenever the share refills."""
    turns = owing(seconds=BURST + 0.0001)
    assert turns.share("agent", lambda: None).owed()
    await asyncio.sleep(0.01)  # (refilled meanwhile: nothing is owed any more)
    assert turns.shares.wait("agent") == 0
    went = asyncio.Event()
    turns.wait("agent", went.set)
    await asyncio.wait_for(went.wait(), 1.0)


async def test_each_waiter_is_asked_about_after_the_one_before_it_charged() -> None:
    """A waiter that spends the share makes the next one wait for the refill, not go with it
    (200 trickling connections woke together and each did a read's work)."""
    turns = owing()
    loop = asyncio.get_running_loop()
    went: list[float] = []

    def spend() -> None:
        went.append(loop.time())
        turns.shares.charge("agent", 0.02)  # (owes 20 ms again: 40 ms to wait)

    for _ in range(3):
        turns.wait("agent", spend)
    await asyncio.wait_for(_until(lambda: len(went) == 3), 2.0)
    assert went[1] - went[0] >= 0.035 and went[2] - went[1] >= 0.035


async def test_other_clients_never_wait_for_one_that_owes() -> None:
    turns = owing()
    turns.wait("agent", lambda: None)
    assert turns.share("agent", lambda: None).owed()
    assert not turns.share("neighbour", lambda: None).owed()


async def test_a_waiter_that_fails_does_not_strand_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    turns = owing(seconds=0.0)
    went = asyncio.Event()

    def fail() -> None:
        raise RuntimeError("a bug in one connection")

    turns.wait("agent", fail)
    turns.wait("agent", went.set)
    await asyncio.wait_for(went.wait(), 1.0)
    assert "a waiter for a CPU share failed" in caplog.text


async def test_a_task_cancelled_while_it_waits_leaves_nothing_behind() -> None:
    turns = owing()
    share = turns.share("agent", lambda: None)
    waiting = asyncio.create_task(share.turn())
    after = asyncio.create_task(share.turn())
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.wait_for(after, 1.0)
    assert waiting.cancelled()
    assert not share.owed() and turns._queues == {}  # (memory: no queue kept)


async def test_each_wait_is_counted() -> None:
    turns = owing()
    counted: list[None] = []
    share = turns.share("agent", lambda: counted.append(None))
    await asyncio.wait_for(asyncio.gather(share.turn(), share.turn()), 1.0)
    assert len(counted) == 2


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await asyncio.sleep(0.005)


async def test_waiters_go_together_while_the_share_allows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (2026-12-04): served one a loop turn, a client with 60 busy relays got a third
    of its share once it had a queue, and its new connections waited 195 ms behind them. While
    the share allows, a batch serves many: each pump charges before the next is asked about."""
    monkeypatch.setattr(turns_module, "_BATCH", 10.0)  # (a loaded machine's preemption)
    turns = owing(seconds=0.0)
    went: list[int] = []
    for number in range(50):
        turns.wait("agent", lambda number=number: went.append(number))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert went == list(range(50))


async def test_a_batch_releases_a_few_tasks_at_a_time() -> None:
    """A released task charges its work only once it runs: a batch that released every
    waiting task would let them all go on one refill (200 trickling connections did)."""
    turns = owing(seconds=0.0)
    share = turns.share("agent", lambda: None)
    ran: list[int] = []

    async def turn(number: int) -> None:
        await share.turn()
        ran.append(number)
        turns.shares.charge("agent", 0.02)  # (each spends the share: the next waits 40 ms)

    running = [asyncio.create_task(turn(number)) for number in range(20)]
    await asyncio.wait_for(_until(lambda: bool(ran)), 1.0)
    await asyncio.sleep(0.01)  # (the batch's tasks ran; the next waits 0.3 s for the share)
    assert 1 <= len(ran) <= _TASKS
    await asyncio.wait_for(asyncio.gather(*running), 3.0)
    assert ran == list(range(20))


async def test_a_waiter_that_queues_again_goes_at_the_next_batch() -> None:
    """No batch runs for ever: one that queues again inside its own turn goes after the
    others, at the next."""
    turns = owing(seconds=0.0)
    went: list[str] = []

    def again() -> None:
        went.append("again")
        if went.count("again") < 3:
            turns.wait("agent", again)

    turns.wait("agent", again)
    turns.wait("agent", lambda: went.append("other"))
    await asyncio.wait_for(_until(lambda: went.count("again") == 3), 1.0)
    assert went == ["again", "other", "again", "again"]
