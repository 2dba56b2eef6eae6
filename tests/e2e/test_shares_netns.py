"""Clients' CPU shares end to end: a daemon in a network namespace the test creates (only `lo`,
no route anywhere), two clients on their own source addresses in a namespace of agents linked
to it alone. One floods the DNS listener,
over UDP and then over TCP, while the other asks now and then: the flood is held back
(counted in `guardd_cpu_share_waits_total{listener="dns"}`), the other is answered while it
goes on. The flood runs until the share holds it, not for a fixed time: how long a client
takes to spend its share depends on the machine (CI: a 3-second flood on a loaded machine
spent less than its burst and refill, and nothing was held).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import AGENTS_LINK, Guardd, Upstream, agents_netns, dig, loopback_netns

FLOODER, ASKER = "10.61.0.1", "10.61.0.2"
#: A source outside `clients` (10.61.0.0/24).
OUTSIDER = "10.62.0.1"
#: argv: the source, guardd's DNS address and port, udp|tcp, seconds. Asks for a denied name as
#: fast as it can for that long; over TCP on 4 connections, each with 64 queries pipelined and
#: 64 more sent ahead while their answers are read: guardd is never left waiting for it.
FLOOD = """\
import selectors, socket, struct, sys, time
source, guardd, port, how, seconds = sys.argv[1:]
port, seconds = int(port), float(seconds)
query = struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + b"\\x05flood\\x05ngrok\\x02io\\x00\\x00\\x01\\x00\\x01"
end = time.monotonic() + seconds
if how == "udp":
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    while time.monotonic() < end:
        try:
            sock.sendto(query, (guardd, port))
        except BlockingIOError:
            pass
else:
    burst = (struct.pack("!H", len(query)) + query) * 64
    selector = selectors.DefaultSelector()
    for _ in range(4):
        sock = socket.create_connection((guardd, port), source_address=(source, 0))
        sock.sendall(burst + burst)
        selector.register(sock, selectors.EVENT_READ, [b"", 0])  # (unread bytes, answers)
    while time.monotonic() < end:
        for key, _ in selector.select(1):
            state = key.data
            state[0] += key.fileobj.recv(65536)
            while len(state[0]) >= 2 and len(state[0]) >= 2 + int.from_bytes(state[0][:2]):
                state[0] = state[0][2 + int.from_bytes(state[0][:2]):]
                state[1] += 1
                if state[1] == 64:
                    state[1] = 0
                    key.fileobj.sendall(burst)
"""


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[tuple[Guardd, str]]:
    """guardd, and the namespace of the flooder and the asker."""
    with loopback_netns() as netns, agents_netns(netns, FLOODER, ASKER, OUTSIDER) as agents:
        upstream = Upstream(tmp_path, {}, netns=netns)
        policy = tmp_path / "policy.yaml"
        policy.write_text('version: "1.0"\nrules:\n  - {id: tunnels, action: "*", '
                          'domain: "*.ngrok.io", effect: deny}\n')
        config = tmp_path / "guardd.yaml"
        config.write_text("clients: [10.61.0.0/24]\n")
        guardd = Guardd.launch(tmp_path / "guardd", "--config", str(config), "--policy",
                               str(policy), "--dns", f"{AGENTS_LINK}:0", "--upstream",
                               upstream.address, "--metrics", "127.0.0.1:0", netns=netns)
        try:
            yield guardd, agents
        finally:
            guardd.stop()
            upstream.stop()


def waits(daemon: Guardd) -> float:
    return daemon.scrape().get('guardd_cpu_share_waits_total{listener="dns"}', 0.0)


#: How long a flood may take to spend its share before the test fails (a few seconds on an
#: idle machine: the burst and what refills meanwhile).
FLOOD_SECONDS = 60


@pytest.mark.parametrize(("how", "flooder"), [("udp", FLOODER), ("tcp", FLOODER),
                                               ("udp", OUTSIDER)],
                         ids=["udp", "tcp", "udp-from-outside-clients"])
def test_a_clients_dns_flood_is_held_back_while_another_asks(agents: tuple[Guardd, str],
                                                             how: str, flooder: str) -> None:
    """Attack pass (2026-12-04): one client's flood, over UDP or pipelined over TCP, took the
    loop, and every other client's queries timed out. The daemon charges every query to its
    client's share: with another client active, the flood is dropped (UDP) or paced (TCP),
    and the other client is answered while it goes on. A flood of datagrams from outside
    `clients` (each recorded, never answered) is charged to one share that all of them
    spend: it was no one's, and took the loop as a client's had (2026-12-06)."""
    daemon, netns = agents
    assert dig(daemon.dns[0], "x.ngrok.io", "A", "-b", ASKER, netns=netns
               ).status == "NXDOMAIN"  # (the asker is active: the flooder's share holds)
    assert waits(daemon) == 0
    flood = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", FLOOD,
                              flooder, *map(str, daemon.dns[0]), how, str(FLOOD_SECONDS)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + FLOOD_SECONDS
        while not waits(daemon) and flood.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if flood.poll() not in (None, 0):
            pytest.fail(f"the flood failed: {flood.communicate()[1]}")
        assert waits(daemon) > 0, f"{FLOOD_SECONDS} s of flood, none of it held back"
        assert flood.poll() is None, flood.communicate()[1]
        # (Retried as a stub resolver does: over UDP, the flood fills the socket's receive
        # buffer, and the kernel drops a datagram that finds it full before guardd sees it.)
        assert dig(daemon.dns[0], "y.ngrok.io", "A", "-b", ASKER, "+tries=3", "+time=2",
                   netns=netns).status == "NXDOMAIN"
    finally:
        flood.kill()
        flood.wait()
