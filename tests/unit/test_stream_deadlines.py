"""Deadlines: one sweep cancels the tasks whose time is up, and only those."""

from __future__ import annotations

import asyncio

import pytest

from guardd.stream.deadlines import Deadlines


async def waits(deadlines: Deadlines, seconds: float, sleep: float) -> str:
    deadlines.set(seconds)
    try:
        await asyncio.sleep(sleep)
    except asyncio.CancelledError:
        if not deadlines.expired():
            raise
        return "timed out"
    finally:
        deadlines.clear()
    return "done"


async def test_a_passed_deadline_cancels_the_task_and_is_told_apart() -> None:
    deadlines = Deadlines(asyncio.get_running_loop(), resolution=0.01)
    late, early = await asyncio.gather(waits(deadlines, 0.02, 5), waits(deadlines, 5, 0.01))
    assert (late, early) == ("timed out", "done")
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_other_cancellations_propagate() -> None:
    deadlines = Deadlines(asyncio.get_running_loop(), resolution=0.01)
    task = asyncio.create_task(waits(deadlines, 5, 5))
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cleared_deadline_never_fires() -> None:
    deadlines = Deadlines(asyncio.get_running_loop(), resolution=0.01)

    async def clears() -> str:
        deadlines.set(0.01)
        deadlines.clear()
        await asyncio.sleep(0.05)
        return "done"

    assert await clears() == "done"


async def test_cut_ends_a_wait_at_once_and_counts_as_expired() -> None:
    deadlines = Deadlines(asyncio.get_running_loop(), resolution=10)
    task = asyncio.create_task(waits(deadlines, 60, 60))
    await asyncio.sleep(0)
    deadlines.cut(task)
    assert await asyncio.wait_for(task, 1) == "timed out"


async def test_a_watched_owner_expires_unless_watched_again_or_forgotten() -> None:
    """Connections driven by callbacks (DNS over TCP) are watched: `expire` runs once their time
    is up; activity (watching again) moves it on, and a forgotten owner never expires."""
    deadlines = Deadlines(asyncio.get_running_loop(), resolution=0.01)
    expired: list[str] = []
    for owner in ("idle", "busy", "gone"):
        deadlines.watch(owner, 0.03, lambda owner=owner: expired.append(owner))
    deadlines.forget("gone")
    for _ in range(4):
        await asyncio.sleep(0.02)
        deadlines.watch("busy", 0.03, lambda: expired.append("busy"))
    assert expired == ["idle"]
    await asyncio.sleep(0.06)
    assert expired == ["idle", "busy"]


async def test_a_cancel_that_comes_with_a_cut_is_not_lost() -> None:
    """A reload (or a shutdown) cancels a connection's task in the same loop turn as its
    deadline cuts it: the deadline's cancellation is undone, the other one ends the task
    (attack pass: a reload's close was swallowed, and the connection went on)."""
    deadlines = Deadlines(asyncio.get_running_loop(), resolution=10)
    task = asyncio.create_task(waits(deadlines, 60, 60))
    await asyncio.sleep(0)
    deadlines.cut(task)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
