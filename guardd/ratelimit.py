"""Sliding-window rate limits, counted per (rule, client): every loopback address one client
(`addr.counted_as`), here and in the per-client counts.

Theory of operation: this is an *exact sliding log*, not an approximation. For each key the
limiter keeps the times of the last `max_requests` requests it allowed, in a deque whose
`maxlen` is `max_requests`. A request at time `now` passes when fewer than `max_requests` were
allowed in the half-open interval `(now - window, now]`, which is the case exactly when the log
is not full or its oldest entry (the `max_requests`-th most recent allowance) is at least
`window` seconds old. So no interval of `window` seconds ever holds more than `max_requests`
allowances, a refusal happens only when one does hold that many, each call is O(1) without
popping anything, and a key costs at most `max_requests` floats. Refused requests are not
counted: a client that keeps knocking gets in again as soon as its window has room.

Idle keys: keys are grouped by window, and each group is an `OrderedDict` in order of last
allowance, which within one window is also the order in which keys fall idle (a key whose
newest allowance is `window` old constrains nothing and is forgotten). Each call sweeps a few
idle keys from the front of every group, so memory follows the live keys without a background
task. At the hard cap, `max_keys`, a new key is refused (`allow` returns None; `counting` tells
it apart from a limit reached) until a live one falls idle: a live count is never forgotten.
Forgetting the longest idle one let an agent that used up its connect limit send as many DNS
queries from forged sources as the table held and start afresh (attack pass, 2026-12-06).
A table of counts that proven sources need not fill, DNS queries' (a UDP source is not proven,
so a forged one is a fresh count anyway), still forgets the longest idle one
(`forgets_when_full`): refusing there would let one forger shut every new client out for a
window (review of that fix). A rule whose window changes on a policy reload starts counting
afresh; its old counts expire with the old window.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable

from guardd.addr import counted_as

#: Idle keys forgotten per window group and call: more than the one key a call can add, so
#: sweeping outpaces growth while a burst of expiries never stalls one request.
SWEEP_PER_CALL = 4

Key = tuple[str, str]
Log = deque[float]


class RateLimiter:
    """Decides whether one more request fits a rule's `rateLimit` for one client."""

    __slots__ = ("clock", "max_keys", "_forgets_when_full", "_groups")

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 100_000, forgets_when_full: bool = False) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys}")
        self.clock = clock
        #: Counts kept at most (keys: a rule's and a client's).
        self.max_keys = max_keys
        #: Whether a new key, at `max_keys`, takes the place of the longest idle live one.
        self._forgets_when_full = forgets_when_full
        #: window -> key -> log of allowance times, least recently allowed key first.
        self._groups: dict[float, OrderedDict[Key, Log]] = {}

    def allow(self, rule_id: str, client: str, max_requests: int, window: float) -> float | None:
        """The time the request was counted at when it fits (give it to `refund` to take it
        back); None when it does not, or when it is a new key's and `max_keys` are live (a
        refused request is not counted)."""
        now = self.clock()
        self._sweep(now, SWEEP_PER_CALL)
        key = (rule_id, counted_as(client))
        log = self._log(key, window)
        if log is None:
            log = self._insert(key, max_requests, window, now)
            if log is None:
                return None
        elif log.maxlen != max_requests:
            # The policy was reloaded with another limit: the newest allowances are all that count.
            log = self._groups[window][key] = deque(log, maxlen=max_requests)
        if len(log) == max_requests and log[0] > now - window:
            return None
        log.append(now)
        self._groups[window].move_to_end(key)
        return now

    def refund(self, rule_id: str, client: str, window: float, at: float) -> None:
        """Take back the allowance `allow` counted at `at` (a request that did not happen):
        that one, not a newer one of another request, and nothing when it has expired or was
        forgotten already (equal times are interchangeable)."""
        key = (rule_id, counted_as(client))
        log = self._log(key, window)
        if log:
            try:
                log.remove(at)
            except ValueError:
                return
            if not log:  # an empty log constrains nothing (and the sweep reads log[-1])
                del self._groups[window][key]
                if not self._groups[window]:
                    del self._groups[window]

    def retry_after(self, rule_id: str, client: str, window: float) -> float:
        """Seconds until `allow` would pass again for this key (0 when it would pass now); for
        a key not counted, until a live key falls idle when `max_keys` are live."""
        now = self.clock()
        log = self._log((rule_id, counted_as(client)), window)
        if log is None:
            return self._until_room(now)
        if len(log) < (log.maxlen or 0):
            return 0.0
        return max(0.0, log[0] + window - now)

    def counting(self, rule_id: str, client: str, window: float) -> bool:
        """Is this key counted (so a refusal of it was its limit, not a full table)?"""
        return self._log((rule_id, counted_as(client)), window) is not None

    def __len__(self) -> int:
        """Number of live keys; forgets every idle one first, so the answer is exact."""
        self._sweep(self.clock(), None)
        return self._count()

    def _log(self, key: Key, window: float) -> Log | None:
        group = self._groups.get(window)
        return None if group is None else group.get(key)

    def _count(self) -> int:
        return sum(len(group) for group in self._groups.values())

    def _insert(self, key: Key, max_requests: int, window: float, now: float) -> Log | None:
        """Start a key's log, when there is room under `max_keys` once idle keys are forgotten
        or, `forgets_when_full`, the longest idle live one (None: there is not)."""
        if max_requests < 1 or window <= 0:
            raise ValueError(f"rate limit of rule {key[0]!r} needs max_requests >= 1 and "
                             f"window > 0, got {max_requests} per {window}s")
        if self._count() >= self.max_keys:
            self._sweep(now, None)
            if self._count() >= self.max_keys:
                if not self._forgets_when_full:
                    return None
                self._forget_longest_idle()
        log: Log = deque(maxlen=max_requests)
        self._groups.setdefault(window, OrderedDict())[key] = log
        return log

    def _sweep(self, now: float, budget: int | None) -> None:
        """Forget up to `budget` idle keys per window group (all of them when None)."""
        # One group per distinct window: a handful, one per rate-limited rule at most.
        for window, group in list(self._groups.items()):
            swept = 0
            while group and (budget is None or swept < budget):
                key, log = next(iter(group.items()))
                if log[-1] > now - window:
                    break
                del group[key]
                swept += 1
            if not group:
                del self._groups[window]

    def _forget_longest_idle(self) -> None:
        """Make room under `max_keys` by forgetting the key allowed least recently."""
        window, group = min(self._groups.items(), key=lambda item: next(iter(item[1].values()))[-1])
        group.popitem(last=False)
        if not group:
            del self._groups[window]

    def _until_room(self, now: float) -> float:
        """Seconds until a key falls idle while `max_keys` are live (0 when there is room)."""
        self._sweep(now, None)
        if self._count() < self.max_keys:
            return 0.0
        # Each group's first key falls idle first: its newest allowance is the oldest there.
        return min(next(iter(group.values()))[-1] + window - now
                   for window, group in self._groups.items())


class AuthThrottle:
    """Failed logins per client, and how long the client is then locked out.

    After a failure no login of that client is checked for a while (`locked`), doubling with
    each failure (0.5 s, 1 s, 2 s, ... up to `MAX_DELAY`) until a `WINDOW` passes without one:
    however many connections it opens in parallel, a client guessing passwords gets at most
    60 / `MAX_DELAY` checked tries a minute (attack pass 11: counted in fixed windows, the
    delays started again at half a second each minute) instead of thousands a second, while a
    user who mistyped once waits half a second. At most `max_clients` clients are tracked, the
    least recently failed forgotten first.
    """

    WINDOW = 60.0
    BASE_DELAY = 0.5
    MAX_DELAY = 8.0

    def __init__(self, max_clients: int = 10_000) -> None:
        #: client -> (its last failure, failures since it last went a window without one,
        #: locked until)
        self._clients: OrderedDict[str, tuple[float, int, float]] = OrderedDict()
        self._max = max_clients

    def failed(self, client: str, now: float) -> tuple[int, float]:
        """Count a failure of `client` at `now`; (its failures in a row, each within a
        `WINDOW` of the one before; seconds it is now locked out for)."""
        last, count, _ = self._clients.pop(client, (now, 0, now))
        if now - last >= self.WINDOW:
            count = 0
        count += 1
        delay = min(self.MAX_DELAY, self.BASE_DELAY * 2.0 ** min(count - 1, 16))
        self._clients[client] = (now, count, now + delay)
        if len(self._clients) > self._max:
            self._clients.popitem(last=False)
        return count, delay

    def locked(self, client: str, now: float) -> float:
        """Seconds left before a login of `client` is checked again (0.0: it is now)."""
        entry = self._clients.get(client)
        return max(0.0, entry[2] - now) if entry is not None else 0.0


class ClientCounts:
    """How many of something (connections, queries in flight) each client holds right now, for
    per-client caps. Only clients that hold some are kept, so memory follows what is open."""

    __slots__ = ("_counts",)

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def __getitem__(self, client: str) -> int:
        return self._counts.get(counted_as(client), 0)

    def __len__(self) -> int:
        """Clients that hold some."""
        return len(self._counts)

    def add(self, client: str) -> None:
        client = counted_as(client)
        self._counts[client] = self._counts.get(client, 0) + 1

    def remove(self, client: str) -> None:
        client = counted_as(client)
        left = self._counts[client] - 1
        if left:
            self._counts[client] = left
        else:
            del self._counts[client]
