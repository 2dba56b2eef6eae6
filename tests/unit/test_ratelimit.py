"""RateLimiter: exact sliding log per (rule, client), bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guardd.addr import count_as_one
from guardd.ratelimit import AuthThrottle, ClientCounts, RateLimiter


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_61st_request_in_a_minute_is_refused(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(60):
        assert limiter.allow("api", "10.0.0.2", 60, 60.0)
        clock.now += 0.5
    assert not limiter.allow("api", "10.0.0.2", 60, 60.0)
    # The first request was at 1000.0; the window slides past it at 1060.0.
    assert limiter.retry_after("api", "10.0.0.2", 60.0) == pytest.approx(30.0)


def test_passes_again_once_the_window_slides(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(3):
        assert limiter.allow("api", "c", 3, 10.0)
        clock.now += 1.0
    assert not limiter.allow("api", "c", 3, 10.0)  # at 1003: 1000, 1001, 1002 in the window
    clock.now = 1009.999
    assert not limiter.allow("api", "c", 3, 10.0)
    clock.now = 1010.0  # 1000 leaves the window (now - window, now]
    assert limiter.retry_after("api", "c", 10.0) == 0.0
    assert limiter.allow("api", "c", 3, 10.0)
    assert not limiter.allow("api", "c", 3, 10.0)  # 1001, 1002, 1010


def test_refused_requests_are_not_counted(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    assert limiter.allow("r", "c", 1, 10.0)
    for _ in range(100):
        clock.now += 0.05
        assert not limiter.allow("r", "c", 1, 10.0)
    clock.now = 1010.0
    assert limiter.allow("r", "c", 1, 10.0)


@pytest.mark.parametrize(("rule", "client"), [("api", "10.0.0.3"), ("other", "10.0.0.2")],
                         ids=["other-client", "other-rule"])
def test_keys_are_independent(clock: FakeClock, rule: str, client: str) -> None:
    limiter = RateLimiter(clock)
    for _ in range(5):
        assert limiter.allow("api", "10.0.0.2", 5, 60.0)
    assert not limiter.allow("api", "10.0.0.2", 5, 60.0)
    assert limiter.allow(rule, client, 5, 60.0)
    assert limiter.retry_after(rule, client, 60.0) == 0.0


def test_retry_after_for_an_unknown_key_is_zero(clock: FakeClock) -> None:
    assert RateLimiter(clock).retry_after("r", "c", 60.0) == 0.0


def test_idle_keys_expire(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    for client in range(1000):
        limiter.allow("r", f"c{client}", 5, 10.0)
    assert len(limiter) == 1000
    clock.now += 10.0
    assert len(limiter) == 0


def test_sweep_keeps_memory_bounded_by_live_keys(clock: FakeClock) -> None:
    """A stream of new clients never holds more than the keys of one window (plus the slack)."""
    limiter = RateLimiter(clock)
    for client in range(5000):
        limiter.allow("r", f"c{client}", 5, 1.0)
        clock.now += 0.01  # 100 new keys per window
        assert sum(len(group) for group in limiter._groups.values()) <= 101
    assert len(limiter) == 100


def test_idle_expiry_follows_each_window(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    limiter.allow("slow", "c", 5, 3600.0)
    limiter.allow("fast", "c", 5, 1.0)
    clock.now += 1.0
    assert len(limiter) == 1


def test_at_max_keys_idle_keys_make_room(clock: FakeClock) -> None:
    limiter = RateLimiter(clock, max_keys=3)
    for client in ("a", "b", "c"):
        assert limiter.allow("r", client, 2, 60.0)
        clock.now += 20.0
    assert limiter.allow("r", "d", 2, 60.0)  # "a" (allowed 60 s ago) is idle: it made room
    assert len(limiter) == 3


def test_at_max_keys_a_new_client_is_refused_and_no_live_count_forgotten(
        clock: FakeClock) -> None:
    """Attack pass (2026-12-06): the longest idle key was forgotten, window or not, so an agent
    that used up its limit sent queries from as many forged sources as the table held and had
    its count forgotten. A full table refuses the newcomer instead (and says when room comes)."""
    limiter = RateLimiter(clock, max_keys=3)
    for client in ("a", "a", "b", "c"):
        assert limiter.allow("r", client, 2, 60.0)
        clock.now += 1.0
    assert not limiter.allow("r", "a", 2, 60.0)
    for forged in range(10):
        assert limiter.allow("r", f"fd77::{forged}", 2, 60.0) is None
    assert not limiter.allow("r", "a", 2, 60.0), "a live count was forgotten"
    assert not limiter.counting("r", "fd77::0", 60.0) and limiter.counting("r", "a", 60.0)
    assert limiter.retry_after("r", "fd77::0", 60.0) == pytest.approx(57.0)  # "a" idle at 1061
    clock.now += 57.0
    assert limiter.allow("r", "fd77::0", 2, 60.0)


def test_a_table_that_forgets_when_full_forgets_the_longest_idle(clock: FakeClock) -> None:
    limiter = RateLimiter(clock, max_keys=3, forgets_when_full=True)
    for client in ("a", "b", "c", "a"):  # "b" is now the one allowed least recently
        assert limiter.allow("r", client, 2, 60.0)
        clock.now += 1.0
    assert limiter.allow("r", "d", 2, 60.0)
    assert len(limiter) == 3
    assert limiter.allow("r", "b", 2, 60.0)  # forgotten, so counted afresh:
    assert limiter.allow("r", "b", 2, 60.0)  # two more pass
    assert not limiter.allow("r", "a", 2, 60.0)  # still remembered


def test_a_lower_limit_after_reload_counts_the_newest(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    for _ in range(5):
        assert limiter.allow("r", "c", 10, 60.0)
        clock.now += 1.0
    assert not limiter.allow("r", "c", 3, 60.0)
    # The third newest allowance (at 1002) leaves the window at 1062.
    assert limiter.retry_after("r", "c", 60.0) == pytest.approx(57.0)


@pytest.mark.parametrize(("max_requests", "window"), [(0, 60.0), (5, 0.0)],
                         ids=["zero-max", "zero-window"])
def test_rejects_a_limit_that_admits_nothing_sensible(max_requests: int, window: float) -> None:
    with pytest.raises(ValueError, match="max_requests >= 1 and window > 0"):
        RateLimiter().allow("r", "c", max_requests, window)


@given(max_requests=st.integers(1, 5), window=st.integers(1, 20),
       steps=st.lists(st.tuples(st.integers(0, 7), st.sampled_from(["a", "b"])), max_size=150))
def test_exactly_max_requests_in_any_window(max_requests: int, window: int,
                                           steps: list[tuple[int, str]]) -> None:
    """Never more than N allowed in any window, and a refusal only when N already were."""
    clock = FakeClock(0.0)
    limiter = RateLimiter(clock)
    allowed: dict[str, list[float]] = {"a": [], "b": []}
    for advance, client in steps:
        clock.now += advance / 4  # integer quarters: exact floats, many ties at window edges
        in_window = [t for t in allowed[client] if t > clock.now - window]
        if limiter.allow("r", client, max_requests, float(window)) is not None:
            assert len(in_window) < max_requests
            allowed[client].append(clock.now)
        else:
            assert len(in_window) == max_requests
    for times in allowed.values():
        for start in times:
            assert sum(start <= t < start + window for t in times) <= max_requests


def test_auth_throttle_doubles_the_delay_and_forgets_after_a_window_without_failures(
        ) -> None:
    throttle = AuthThrottle()
    delays = [throttle.failed("10.0.0.2", 100.0 + i) for i in range(6)]
    assert delays == [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0)]
    assert throttle.failed("10.0.0.3", 105.0) == (1, 0.5)  # per client
    assert throttle.failed("10.0.0.2", 105.0 + AuthThrottle.WINDOW) == (1, 0.5)


def test_a_guesser_that_keeps_failing_stays_at_the_longest_delay() -> None:
    """Attack pass 11: the count started again each minute, so the delays went back to half
    a second: about ten checked guesses a minute, not the 7.5 the longest delay allows."""
    throttle = AuthThrottle()
    now, checked = 0.0, 0
    while now < 600.0:
        checked += 1
        now += throttle.failed("g", now)[1]  # (the next guess comes as the lock ends)
    assert checked <= 600.0 / AuthThrottle.MAX_DELAY + 5


def test_auth_throttle_tracks_a_bounded_number_of_clients() -> None:
    throttle = AuthThrottle(max_clients=2)
    for client in ("a", "b", "a", "c"):
        throttle.failed(client, 1.0)
    assert throttle.failed("a", 2.0) == (3, 2.0)
    assert throttle.failed("b", 2.0) == (1, 0.5)  # b was the least recently failed: forgotten


def test_client_counts_keep_only_clients_that_hold_some() -> None:
    counts = ClientCounts()
    counts.add("a")
    counts.add("a")
    counts.add("b")
    assert (counts["a"], counts["b"], counts["c"], len(counts)) == (2, 1, 0, 2)
    counts.remove("a")
    counts.remove("b")
    assert (counts["a"], counts["b"], len(counts)) == (1, 0, 1)


def test_auth_throttle_locks_the_client_out_for_the_delay() -> None:
    throttle = AuthThrottle()
    assert throttle.locked("c", 10.0) == 0.0
    throttle.failed("c", 10.0)
    assert throttle.locked("c", 10.2) == pytest.approx(0.3)
    assert throttle.locked("c", 10.5) == 0.0
    throttle.failed("c", 11.0)
    assert throttle.locked("c", 11.0) == 1.0
    assert throttle.locked("other", 11.0) == 0.0


def test_a_refund_takes_back_exactly_the_allowance_it_names(clock: FakeClock) -> None:
    """A connect charged to a rule whose address was not the one connected to takes its own
    charge back: not a newer one of another connect, and nothing once it has expired."""
    limiter = RateLimiter(clock)
    first = limiter.allow("api", "c", 2, 60.0)
    clock.now += 5
    second = limiter.allow("api", "c", 2, 60.0)
    assert first is not None and second is not None
    assert limiter.allow("api", "c", 2, 60.0) is None
    limiter.refund("api", "c", 60.0, first)
    assert limiter.retry_after("api", "c", 60.0) == 0  # the older one went: room again
    again = limiter.allow("api", "c", 2, 60.0)
    assert again is not None
    clock.now += 56  # `second` (at 1005) is 56 s old, `again` (at 1005) too: both live
    assert limiter.allow("api", "c", 2, 60.0) is None
    clock.now += 4  # both expired
    limiter.refund("api", "c", 60.0, first)  # long gone: nothing to take back
    assert limiter.allow("api", "c", 2, 60.0) is not None
    assert limiter.allow("api", "c", 2, 60.0) is not None
    limiter.refund("other", "c", 5.0, 1.0)  # an unknown key: no error


def test_refunding_every_allowance_forgets_the_key(clock: FakeClock) -> None:
    limiter = RateLimiter(clock)
    at = limiter.allow("api", "c", 2, 60.0)
    assert at is not None
    limiter.refund("api", "c", 60.0, at)
    assert len(limiter) == 0


# --- every loopback address is one client --------------------------------------------------

LOOPBACKS = ["127.0.0.1", "127.0.0.7", "127.8.9.10", "::ffff:127.0.0.9", "::1"]


def test_every_loopback_source_spends_one_limit(clock: FakeClock) -> None:
    """Attack pass: an agent on the host picked a new 127/8 source for each batch of requests
    and got a fresh limit each time (any process may bind any of 127.0.0.0/8)."""
    limiter = RateLimiter(clock)
    assert [limiter.allow("api", source, 2, 60.0) is not None for source in LOOPBACKS] == [
        True, True, False, False, False]
    assert limiter.retry_after("api", "127.1.1.1", 60.0) > 0
    assert limiter.allow("api", "bot user 127.0.0.5", 1, 60.0)  # (a login's account)


def test_every_loopback_source_holds_one_share_of_a_cap() -> None:
    counts = ClientCounts()
    for source in LOOPBACKS:
        counts.add(source)
    assert counts["127.0.0.1"] == 5 and counts["127.200.0.1"] == 5 and len(counts) == 1
    for source in LOOPBACKS:
        counts.remove(source)
    assert len(counts) == 0


def test_the_addresses_of_one_agent_spend_one_limit_and_one_share(
        clock: FakeClock, one_agent: tuple[str, ...]) -> None:
    """Attack pass: a sandbox's agent alternated its IPv4 and IPv6 addresses and got every
    per-client limit twice (a rate limit of 2 let 4 through)."""
    limiter = RateLimiter(clock)
    sources = [*one_agent, "::ffff:10.200.0.2", one_agent[1], "10.200.0.3"]
    assert [limiter.allow("api", source, 2, 60.0) is not None for source in sources] == [
        True, True, False, False, True]  # (another address, another client)
    counts = ClientCounts()
    for source in sources:
        counts.add(source)
    assert counts[one_agent[1]] == 4 and len(counts) == 2


def test_the_addresses_of_one_agents_network_spend_one_limit_and_one_share(
        clock: FakeClock) -> None:
    """Session 57's re-attack (Low): an agent with a /64 routed to it sent from a new address
    each time, a client each. Its network named (`sameClient`), they are one."""
    count_as_one([("10.200.0.2", "fd00:6a72::/64")])
    try:
        limiter = RateLimiter(clock)
        sources = [f"fd00:6a72::{n:x}" for n in range(1, 4)] + ["10.200.0.2", "fd00:6a73::1"]
        assert [limiter.allow("api", source, 2, 60.0) is not None for source in sources] == [
            True, True, False, False, True]  # (another network, another client)
        counts = ClientCounts()
        for source in sources:
            counts.add(source)
        assert counts["fd00:6a72::99"] == 4 and len(counts) == 2
    finally:
        count_as_one([])
