"""`daemon._in_a_thread`: how a reload reads its files off the loop."""

from __future__ import annotations

import asyncio
import gc
import threading

import pytest

from guardd import daemon


async def test_the_collector_waits_while_a_reload_reads() -> None:
    """Session 55's attack (Low): a reload of a 60,000-rule policy stalled every listener for
    up to 1.3 s, read off the loop or not: the read's allocations ran the cyclic collector
    over everything it had built, again and again, holding the interpreter (and a refused
    reload the same). A policy makes no cycles, so the collector waits until the read ends:
    half the time, and the new objects walked a few times after it, not at each growth."""
    seen: list[bool] = []
    assert gc.isenabled()
    assert await daemon._in_a_thread(lambda: seen.append(gc.isenabled()) or "read") == "read"
    assert seen == [False] and gc.isenabled()

    def fails() -> None:
        raise ValueError("a policy refused")

    try:
        await daemon._in_a_thread(fails)
    except ValueError:
        pass
    assert gc.isenabled()
    gc.disable()  # (whoever turned it off keeps it off)
    try:
        await daemon._in_a_thread(lambda: None)
        assert not gc.isenabled()
    finally:
        gc.enable()


async def test_a_read_that_hangs_keeps_the_collector_waiting_only_so_long(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The review: a read that never returns (a policy on a stuck mount) kept the collector
    off for the whole process, the reload cancelled or not. It waits `_READ_PATIENCE` at most,
    and not after the reload is cancelled."""
    monkeypatch.setattr(daemon, "_READ_PATIENCE", 0.05)
    released = threading.Event()
    reading = asyncio.ensure_future(daemon._in_a_thread(released.wait))
    try:
        await asyncio.sleep(0.01)
        assert not gc.isenabled()
        await asyncio.sleep(0.1)
        assert gc.isenabled()  # (past its patience)
        monkeypatch.setattr(daemon, "_READ_PATIENCE", 60.0)
        again = asyncio.ensure_future(daemon._in_a_thread(released.wait))
        await asyncio.sleep(0.01)
        assert not gc.isenabled()
        again.cancel()
        await asyncio.sleep(0)
        assert gc.isenabled()  # (cancelled: on again at once)
    finally:
        released.set()
        await reading
        gc.enable()
