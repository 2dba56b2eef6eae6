"""Addresses of guardd's host are loopback, but only those the kernel really delivers there: two
ways an agent on a link took one of them and completed a TCP handshake as loopback (attack pass
and final review of stop 41). guardd runs in a namespace the test creates (only `lo` and the
link to the agents' namespace, no route anywhere else), with `clients` holding loopback alone:
a connection that passes for loopback is answered, any other is refused.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import Guardd, Upstream, agents_netns, loopback_netns, run

#: guardd's address on the agents' link, and the agent's own.
GUARDD6, AGENT6 = "fd00:41::10", "fd00:41::2"
#: argv: the source, its interface, guardd's address and DNS port. One query over TCP from that
#: source: prints the answer's rcode; "closed" when guardd took the connection and closed it
#: unanswered (a source outside `clients`); "no handshake" when there was no connection.
ASK = """\
import socket, struct, sys
source, interface, guardd, port = sys.argv[1:]
sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
sock.settimeout(5)
sock.bind((source, 0, 0, socket.if_nametoindex(interface)))
try:
    sock.connect((guardd, int(port)))
except OSError as exc:
    sys.exit(print("no handshake", exc))
query = struct.pack("!6H", 9, 0x0100, 1, 0, 0, 0) + b"\\x04site\\x04test\\x00\\x00\\x01\\x00\\x01"
try:
    sock.sendall(struct.pack("!H", len(query)) + query)
    answer = sock.recv(4096)
except OSError:
    answer = b""
print(answer[5] & 0x0F if len(answer) > 5 else "closed")
"""


#: argv: the source, guardd's address and DNS port, a name. One query over UDP from that source,
#: bound without holding it (IPV6_FREEBIND: no privilege needed), as an agent forges one: prints
#: the answer's rcode, or "no answer" within 3 s.
FORGED = """\
import socket, struct, sys
source, guardd, port, name = sys.argv[1:]
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.setsockopt(socket.IPPROTO_IPV6, 78, 1)  # IPV6_FREEBIND
sock.bind((source, 0))
labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
sock.sendto(struct.pack("!6H", 7, 0x0100, 1, 0, 0, 0) + labels + b"\\0\\0\\1\\0\\1",
            (guardd, int(port)))
sock.settimeout(3)
try:
    print(sock.recv(4096)[3] & 0x0F)
except OSError:
    print("no answer")
"""


@pytest.fixture
def link() -> Iterator[tuple[str, str]]:
    """guardd's namespace and the agents', each with its IPv6 address on the link between
    them."""
    with loopback_netns() as netns, agents_netns(netns) as agents:
        ip(netns, "addr", "add", f"{GUARDD6}/64", "dev", "agents0", "nodad")
        ip(agents, "addr", "add", f"{AGENT6}/64", "dev", "eth0", "nodad")
        yield netns, agents


def ip(netns: str, *argv: str) -> None:
    run(["ip", "-n", netns, *argv]).check_returncode()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Guardd]]:
    """Starts guardd in a namespace, its DNS on the link (or at `dns`), with only loopback for
    clients (or the `clients` given, YAML list items)."""
    started: list[Guardd | Upstream] = []
    upstreams.clear()

    def start(netns: str, clients: str = '127.0.0.0/8, "::1/128"', dns: str = f"[{GUARDD6}]:0"
              ) -> Guardd:
        upstream = Upstream(tmp_path, {"site.test": ["A 192.0.2.80"]}, netns=netns)
        started.append(upstream)
        upstreams.append(upstream)
        config = tmp_path / "guardd.yaml"
        config.write_text(f'clients: [{clients}]\n')
        policy = tmp_path / "policy.yaml"
        policy.write_text('version: "1.0"\nrules:\n  - {id: site, action: "*", domain: '
                          'site.test, effect: allow}\n')
        guardd = Guardd.launch(tmp_path / "guardd", "--config", str(config), "--policy",
                               str(policy), "--dns", dns, "--upstream",
                               upstream.address, "--metrics", "off", netns=netns)
        started.append(guardd)
        return guardd

    yield start
    for child in reversed(started):
        child.stop()


#: The upstream the last `launch` started (its queries say what left).
upstreams: list[Upstream] = []


def ask(netns: str, guardd: Guardd, source: str, interface: str = "eth0") -> str:
    """One query to guardd over TCP from `source` (on `interface`) in `netns`: its rcode, or
    "closed"."""
    host, port = guardd.dns[0]
    result = run(["ip", "netns", "exec", netns, sys.executable, "-c", ASK, source, interface,
                  host, str(port)])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_an_agent_that_takes_the_hosts_link_local_address_is_no_loopback(
        link: tuple[str, str], launch: Callable[..., Guardd]) -> None:
    """Attack pass: the host's fe80:: address of another link, taken by the agent on its own
    (NET_ADMIN in its namespace), completed a TCP handshake (the kernel answers a link-local
    peer on the link it came in by) and passed for loopback. A link-local source is never the
    host's."""
    netns, agents = link
    ip(netns, "link", "add", "other0", "type", "veth", "peer", "name", "other1")
    ip(netns, "link", "set", "other0", "up")
    ip(netns, "addr", "add", "fe80::b1/64", "dev", "other0", "nodad")
    ip(agents, "addr", "add", "fe80::b1/64", "dev", "eth0", "nodad")
    guardd = launch(netns)
    assert ask(netns, guardd, GUARDD6, "agents0") == "0"  # (the host itself: loopback)
    assert ask(agents, guardd, AGENT6) == "closed"  # (not a client: only loopback is)
    assert ask(agents, guardd, "fe80::b1") == "closed"  # (it was "0": loopback's answer)


def test_an_agent_that_holds_an_address_before_the_host_does_is_no_loopback(
        link: tuple[str, str], launch: Callable[..., Guardd]) -> None:
    """Final review: an address the agent held first on the link failed the host's duplicate
    check, so the kernel routes it to the agent, but the interfaces still list it: it passed
    for loopback over TCP. As a source, only the kernel's route says."""
    netns, agents = link
    taken = "fd00:41::45"
    for setting in ("accept_dad", "dad_transmits"):  # (the kernel's defaults, said)
        run(["ip", "netns", "exec", netns, "sh", "-c",
             f"echo 1 > /proc/sys/net/ipv6/conf/agents0/{setting}"]).check_returncode()
    ip(agents, "addr", "add", f"{taken}/64", "dev", "eth0", "nodad")
    ip(netns, "addr", "add", f"{taken}/64", "dev", "agents0")
    deadline = time.monotonic() + 10
    while "dadfailed" not in run(["ip", "-n", netns, "addr", "show", "dev", "agents0"]).stdout:
        assert time.monotonic() < deadline, "the host's duplicate check never failed"
        time.sleep(0.2)
    guardd = launch(netns)
    assert ask(netns, guardd, GUARDD6, "agents0") == "0"  # (the host itself: loopback)
    assert ask(agents, guardd, taken) == "closed"  # (it was "0": loopback's answer)


def test_a_datagram_a_process_on_the_host_forged_to_loopback_is_never_answered(
        link: tuple[str, str], launch: Callable[..., Guardd]) -> None:
    """Attack pass 52: on guardd's own host, a process bound an IPv6 address of `clients` that
    is none of the host's (IPV6_FREEBIND, no privilege) and asked guardd at [::1]: Linux
    delivered it with that source, which passed for an agent's (its own budgets, its
    principal; the name went upstream). Only the host reaches a socket bound to loopback, so
    there such a source is forged: recorded, never answered, nothing upstream; the host's own
    query from ::1 is answered."""
    netns, _ = link
    guardd = launch(netns, clients='127.0.0.0/8, "::1/128", "fd00:41::/64"', dns="[::1]:0")
    host, port = guardd.dns[0]

    def asked_from(source: str) -> str:
        result = run(["ip", "netns", "exec", netns, sys.executable, "-c", FORGED, source, host,
                      str(port), "site.test"])
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert asked_from("fd00:41::77") == "no answer"
    assert upstreams[0].queries() == []
    (record,) = guardd.audit_records("domain=site.test")
    assert (record["client"], record["effect"]) == ("fd00:41::77", "deny")
    assert "on a socket bound to loopback" in str(record["reason"])
    assert asked_from("::1") == "0"  # (NOERROR)
    assert upstreams[0].queries() == ["site.test"]


def test_a_datagram_forged_from_the_hosts_ipv6_address_is_no_loopback(
        link: tuple[str, str], launch: Callable[..., Guardd]) -> None:
    """Attack pass (2026-12-06): an agent with no privilege at all bound the host's IPv6 address
    (IPV6_FREEBIND) and sent a query over UDP: Linux checks no IPv6 source, the kernel routes
    the address as local, and the query was loopback's, judged by its policy and limits, and
    sent upstream (a name of the agent's choosing, past its own policy). Over UDP such a source
    proves nothing: recorded, never answered nor sent upstream. (Over TCP, whose handshake
    proves it, it is the host's: the tests above.)"""
    netns, agents = link
    guardd = launch(netns)
    host, port = guardd.dns[0]
    result = run(["ip", "netns", "exec", agents, sys.executable, "-c", FORGED, GUARDD6, host,
                  str(port), "site.test"])
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 10
    while not (records := guardd.audit_records("domain=site.test")):
        assert time.monotonic() < deadline, "the forged query was never recorded"
        time.sleep(0.2)
    (record,) = records
    assert (record["client"], record["effect"]) == (GUARDD6, "deny")
    assert "which any agent on a link may send from" in str(record["reason"])
    assert upstreams[0].queries() == []  # (it was allowed, as loopback's, and asked)

