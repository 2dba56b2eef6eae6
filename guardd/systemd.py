"""The sd_notify protocol (sd_notify(3)), without libsystemd: `Type=notify` and `WatchdogSec=`.

systemd passes a datagram socket in `NOTIFY_SOCKET` (a path, or an abstract name after `@`);
the service sends it newline-separated `KEY=VALUE` states. Outside systemd (no variable) every
call is a no-op, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("guardd.systemd")


def notify(*states: str) -> bool:
    """Send `states` (e.g. "READY=1", "STATUS=...") to systemd; False when not under it or
    when the socket cannot be reached (logged: systemd would then time the start out)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode())
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address.lstrip("\0"), exc)
        return False
    return True


def reloading() -> bool:
    """RELOADING=1 with the monotonic time systemd asks of it (systemd >= 253 checks it)."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now}")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of `WatchdogSec=`), when systemd asks this process
    for them; None otherwise."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
