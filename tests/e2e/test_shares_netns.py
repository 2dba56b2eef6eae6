"""Clients' CPU shares end to end: a daemon in a network namespace the test creates (only `lo`,
no route anywhere), two clients on their own source addresses. One floods the DNS listener,
over UDP and then over TCP, while the other asks now and then: the flood is held back
(counted in `guardd_cpu_share_waits_total{listener="dns"}`), the other is answered.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Guardd, Upstream, dig, loopback_netns, run

FLOODER, ASKER = "10.61.0.1", "10.61.0.2"
#: argv: the source, guardd's DNS port, udp|tcp, seconds. Asks for a denied name as fast as it
#: can for that long (over TCP, 64 queries pipelined on one connection at a time).
FLOOD = """\
import socket, struct, sys, time
source, port, how, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
query = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\\x05flood\\x05ngrok\\x02io\\x00\\x00\\x01\\x00\\x01"
end = time.monotonic() + seconds
if how == "udp":
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    while time.monotonic() < end:
        try:
            sock.sendto(query, ("127.0.0.1", port))
        except BlockingIOError:
            pass
else:
    sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
    burst = (struct.pack("!H", len(query)) + query) * 64
    while time.monotonic() < end:
        sock.sendall(burst)
        answered = 0
        while answered < 64 * (2 + 28):  # (each answer at least its header and question)
            answered += len(sock.recv(65536))
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Guardd]:
    with loopback_netns(f"{FLOODER}/32", f"{ASKER}/32") as netns:
        upstream = Upstream(tmp_path, {}, netns=netns)
        policy = tmp_path / "policy.yaml"
        policy.write_text('version: "1.0"\nrules:\n  - {id: tunnels, action: "*", '
                          'domain: "*.ngrok.io", effect: deny}\n')
        config = tmp_path / "guardd.yaml"
        config.write_text("clients: [10.61.0.0/24]\n")
        guardd = Guardd.launch(tmp_path / "guardd", "--config", str(config), "--policy",
                               str(policy), "--dns", "127.0.0.1:0", "--upstream",
                               upstream.address, "--metrics", "127.0.0.1:0", netns=netns)
        try:
            yield guardd
        finally:
            guardd.stop()
            upstream.stop()


def waits(daemon: Guardd) -> float:
    return daemon.scrape().get('guardd_cpu_share_waits_total{listener="dns"}', 0.0)


@pytest.mark.parametrize("how", ["udp", "tcp"])
def test_a_clients_dns_flood_is_held_back_while_another_asks(daemon: Guardd, how: str) -> None:
    """Attack pass (2026-12-04): one client's flood, over UDP or pipelined over TCP, took the
    loop, and every other client's queries timed out. The daemon charges every query to its
    client's share: with another client active, the flood is dropped (UDP) or paced (TCP)."""
    assert dig(daemon.dns[0], "x.ngrok.io", "A", "-b", ASKER, netns=daemon.netns
               ).status == "NXDOMAIN"  # (the asker is active: the flooder's share holds)
    assert waits(daemon) == 0
    flood = run(["ip", "netns", "exec", daemon.netns or "", sys.executable, "-c", FLOOD,
                 FLOODER, str(daemon.dns[0][1]), how, "3"], timeout=30)
    assert flood.returncode == 0, flood.stderr
    assert waits(daemon) > 0
    assert dig(daemon.dns[0], "y.ngrok.io", "A", "-b", ASKER, netns=daemon.netns
               ).status == "NXDOMAIN"
