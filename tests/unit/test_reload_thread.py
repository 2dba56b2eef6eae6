"""`daemon._in_a_thread`: how a reload reads its files off the loop."""

from __future__ import annotations

import gc

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
