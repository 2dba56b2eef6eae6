"""How many connections one client may open to one destination within a TIME_WAIT.

A connection guardd closes first (its client closed first, or went idle) leaves guardd's
local port to that address and port in TIME_WAIT for 60 s (Linux's `TCP_TIMEWAIT_LEN`), and
no new connect from guardd to the same destination may use that port meanwhile, unless the
kernel reuses such ports: `net.ipv4.tcp_tw_reuse` 1 does for every destination, 2 (Linux's
default) for loopback only. A client opening and closing allowed tunnels to one destination
as fast as it can fills the ephemeral range (28,232 ports by default): every client's
connects there then fail ("Cannot assign requested address"), and before that each connect(2)
searches the range, in the loop (attack passes, 2026-12-06: 24,000 of guardd's ports to one
server in 45 s). So where the kernel does not reuse them, a client may open at most
`PER_DESTINATION` connections to one destination within `TIME_WAIT` seconds: one client
alone can take no more than a seventh of the range. The counts are `RateLimiter`'s (exact,
bounded in keys; at the bound the longest idle count is forgotten, so a full table never shuts
other clients out).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from guardd.addr import IPAddress, effective_address
from guardd.net import hostport
from guardd.ratelimit import RateLimiter

#: Connections a client may open to one destination within `TIME_WAIT` (where counted).
PER_DESTINATION = 4096
#: Seconds a port guardd closed first stays in TIME_WAIT (Linux's `TCP_TIMEWAIT_LEN`).
TIME_WAIT = 60.0
#: Where the kernel says whether it reuses ports in TIME_WAIT for new connects.
TW_REUSE = Path("/proc/sys/net/ipv4/tcp_tw_reuse")


def tw_reuse() -> int:
    """`net.ipv4.tcp_tw_reuse` in guardd's network namespace (0 when it cannot be read: every
    destination counted)."""
    try:
        return int(TW_REUSE.read_text())
    except (OSError, ValueError):
        return 0


class DestinationPorts:
    """Counts each client's connections to each destination whose ports the kernel does not
    reuse (`reuse`: `net.ipv4.tcp_tw_reuse`)."""

    def __init__(self, reuse: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.reuse = reuse
        self._counts = RateLimiter(clock, forgets_when_full=True)

    def take(self, ip: IPAddress, port: int, client: str) -> str:
        """Count one more connection of `client`'s to `ip`:`port`; why it may not be opened
        ("": it may). An address that embeds an IPv4 one counts as that one (the mapped form
        connects over IPv4, from the same ports; the others are counted with it, the safe
        side)."""
        ip = effective_address(ip)
        if self.reuse == 1 or (self.reuse == 2 and ip.is_loopback):
            return ""
        destination = hostport(str(ip), port)
        if self._counts.allow(destination, client, PER_DESTINATION, TIME_WAIT) is not None:
            return ""
        return (f"the client opened {PER_DESTINATION} connections to {destination} within "
                f"{TIME_WAIT:g}s, each of which may leave one of guardd's ports to it waiting "
                "out TCP's TIME_WAIT: more would use up the ports every client shares (reuse "
                "connections; an operator may set net.ipv4.tcp_tw_reuse=1)")
