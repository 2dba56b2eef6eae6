"""The world a guardd of the namespace tests routes to: a network namespace of its own, linked
only to guardd's, holding servers on documentation addresses and traps.

* an HTTPS and HTTP server on 192.0.2.10 and 2001:db8::10 (`allowed.example`, a certificate
  for it in `World.cert`);
* traps on 198.51.100.7 and 2001:db8:1::7 (TCP 22, 80 and 443; UDP 53 and 9999, DNS included)
  and a fake metadata service on 169.254.169.254 and fd00:ec2::254: `World.arrived()` lists
  what reached any of them, and nothing may.

No namespace has a route to the real network: the world's only link goes to guardd's namespace.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.harness import Destination, certificate, run

ALLOWED = "allowed.example"
WEB4, WEB6 = "192.0.2.10", "2001:db8::10"
#: A port of the web server's that tests may put under a rule of its own (a rate limit).
WEB_LIMITED_PORT = 8080
TRAP4, TRAP6 = "198.51.100.7", "2001:db8:1::7"
META4, META6 = "169.254.169.254", "fd00:ec2::254"
#: guardd's end of the link to the world, and the world's end.
LINK = {"guard": ["192.0.2.1/24", "198.51.100.1/24", "169.254.0.1/16", "2001:db8::1/64",
                  "2001:db8:1::1/64", "fd00:ec2::1/64"],
        "world": [f"{WEB4}/24", f"{TRAP4}/24", f"{META4}/16", f"{WEB6}/64", f"{TRAP6}/64",
                  f"{META6}/64"]}
#: What the test's upstream answers for the world's names.
ZONES = {ALLOWED: [f"A {WEB4}", f"AAAA {WEB6}"], "meta.example": [f"A {META4}"],
         "trap.example": [f"A {TRAP4}", f"AAAA {TRAP6}"]}


@dataclass
class World:
    netns: str
    cert: Path
    traps: list[Destination]

    def arrived(self) -> list[str]:
        """What reached a trap: nothing may."""
        return [f"{trap.log.name}: {line}" for trap in self.traps for line in trap.lines()]


def ip(netns: str, *argv: str) -> None:
    run(["ip", "-n", netns, *argv]).check_returncode()


@contextlib.contextmanager
def world(guard_netns: str, name: str, directory: Path) -> Iterator[World]:
    """The world namespace `name`, linked to `guard_netns` (which routes, as a Docker host
    does: what stops the agent must be guardd's rules, not the sysctl), its servers running;
    `directory` (readable by every user) holds their logs and the certificate."""
    children: list[Destination] = []
    run(["ip", "netns", "add", name]).check_returncode()
    try:
        ip(name, "link", "set", "lo", "up")
        run(["ip", "netns", "exec", guard_netns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
             "net.ipv6.conf.all.forwarding=1"]).check_returncode()
        ip(guard_netns, "link", "add", "world0", "type", "veth", "peer", "name", "eth0",
           "netns", name)
        for netns, side, addresses in ((guard_netns, "world0", LINK["guard"]),
                                       (name, "eth0", LINK["world"])):
            for address in addresses:
                ip(netns, "addr", "add", address, "dev", side, *(["nodad"] if ":" in address
                                                                 else []))
            ip(netns, "link", "set", side, "up")
        pem, cert = certificate(directory, ALLOWED)
        os.chmod(cert, 0o644)
        children += [Destination(directory, "web", host, 443, netns=name, tls=pem)
                     for host in (WEB4, WEB6)]
        children += [Destination(directory, "web", host, port, netns=name)
                     for host in (WEB4, WEB6) for port in (80, WEB_LIMITED_PORT)]
        traps = [Destination(directory, "trap", host, port, netns=name)
                 for host in (TRAP4, TRAP6, META4, META6) for port in (80, 443)]
        traps += [Destination(directory, "trap", host, 22, netns=name) for host in (TRAP4, TRAP6)]
        traps += [Destination(directory, "udptrap", host, port, netns=name)
                  for host in (TRAP4, TRAP6, META6) for port in (53, 9999)]
        children += traps
        yield World(name, cert, traps)
    finally:
        for child in children:
            child.stop()
        run(["ip", "netns", "del", name])
