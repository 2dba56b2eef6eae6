"""DNS tunnels inside allowed zones, against the real daemon: iodine- and dnscat2-style traffic
under `*.amazonaws.com` is stopped within the budget, a benign trace is never stopped.

Each scenario has a daemon of its own (every loopback address is one client, with one budget);
what counts is what reached the test's upstream (what a tunnel's server would have received),
from its query log.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
from collections.abc import Iterator

import pytest

from guardd.policy.model import TunnelBudget
from tests.e2e.harness import ROOT, Guardd, Upstream

POLICY = """\
version: "1.0"
rules:
  - {id: tunnels, action: "*", domain: "*.ngrok.io", effect: deny}
  - {id: aws, action: "*", domain: "*.amazonaws.com", effect: allow}
  - {id: everything-else, action: "*", domain: "*", effect: allow}
"""
QTYPES = {"A": 1, "CNAME": 5, "NULL": 10, "MX": 15, "TXT": 16, "AAAA": 28}
BUDGET = TunnelBudget()
BENIGN = [line for line in (ROOT / "tests/data/benign-trace.txt").read_text().splitlines()
          if line and not line.startswith("#")]


def b32(size: int) -> str:
    return base64.b32encode(os.urandom(size)).decode().rstrip("=").lower()


def query(name: str, qtype: str, qid: int) -> bytes:
    """A recursive query with EDNS (as dig sends it: an answer can then carry its EDE)."""
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 1) + labels + b"\0" + \
        struct.pack("!2H", QTYPES[qtype], 1) + b"\0" + struct.pack("!HHIH", 41, 1232, 0, 0)


@pytest.fixture
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Guardd, Upstream]]:
    directory = tmp_path_factory.mktemp("tunnel")
    zones = {name: ["A 93.184.216.34"] for name in BENIGN}
    zones.update({f"{n:x}.r.amazonaws.com": ["0 A 93.184.216.34"] for n in range(16)})  # TTL 0
    upstream = Upstream(directory, zones)
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    guardd = Guardd.launch(directory, "--policy", str(policy), "--dns", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0", "--upstream", upstream.address)
    try:
        yield guardd, upstream
    finally:
        guardd.stop()
        upstream.stop()


def ask(guardd: Guardd, names: list[tuple[str, str]]) -> list[bytes]:
    """Each (name, qtype), one after the other; the answers."""
    answers = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        for qid, (name, qtype) in enumerate(names):
            sock.sendto(query(name, qtype, qid), guardd.dns[0])
            answers.append(sock.recv(4096))
    return answers


def reached(upstream: Upstream, names: list[tuple[str, str]]) -> int:
    asked = set(upstream.queries())
    return sum(name.lower() in asked for name, _ in names)


def test_iodine_style_long_base32_labels_are_stopped_within_the_budget(
        daemon: tuple[Guardd, Upstream]) -> None:
    guardd, upstream = daemon
    names = [(f"{b32(35)}.{b32(25)}.t.exfil-bucket.s3.amazonaws.com", qtype)
             for qtype in ["NULL", "TXT", "CNAME", "A"] * 150]
    answers = ask(guardd, names)
    leaked = reached(upstream, names)
    print(f"iodine-style: {len(names)} names, {leaked} reached the upstream")
    assert leaked <= BUDGET.max_long_labels
    assert all(b"tunnel suspected" in answer and answer[3] & 0x0F == 3
               for answer in answers[leaked + 1:])
    samples = guardd.scrape()
    assert samples['guardd_dns_tunnel_suspected_total{rule="aws"}'] >= len(names) - leaked - 1
    records = guardd.audit_records("action=dns.query", "effect=deny", "matchedRule=aws")
    assert records and "long-labels" in str(records[0]["reason"])


def test_dnscat2_style_txt_and_cname_lookups_are_stopped_within_the_budget(
        daemon: tuple[Guardd, Upstream]) -> None:
    guardd, upstream = daemon
    names = [(f"{os.urandom(15).hex()}.{os.urandom(12).hex()}.c2.amazonaws.com", qtype)
             for qtype in ["TXT", "CNAME", "MX"] * 100]
    ask(guardd, names)
    leaked = reached(upstream, names)
    print(f"dnscat2-style: {len(names)} names, {leaked} reached the upstream")
    assert leaked <= BUDGET.max_unusual_types


def test_many_short_names_are_stopped_at_the_unique_name_budget(
        daemon: tuple[Guardd, Upstream]) -> None:
    guardd, upstream = daemon
    names = [(f"{b32(10)}.d.amazonaws.com", "A") for _ in range(600)]
    ask(guardd, names)
    leaked = reached(upstream, names)
    print(f"short names: {len(names)} names, {leaked} reached the upstream")
    assert leaked <= BUDGET.max_unique_names


def test_labels_just_short_of_long_are_stopped_by_the_bytes_their_names_carry(
        daemon: tuple[Guardd, Upstream]) -> None:
    """Attack pass (2026-12-06): four labels of 52 characters, none long, in 300 different
    names: 62,400 characters of data reached the upstream in a minute."""
    guardd, upstream = daemon
    names = [(".".join(b32(32)[:52] for _ in range(4)) + ".t.amazonaws.com", "A")
             for _ in range(300)]
    ask(guardd, names)
    carried = sum(len(name) - len(".amazonaws.com") for name, _ in names[:reached(upstream, names)])
    print(f"52-character labels: {len(names)} names, {carried} characters reached the upstream")
    assert carried <= BUDGET.max_name_bytes
    records = guardd.audit_records("action=dns.query", "effect=deny", "matchedRule=aws")
    assert records and "name-bytes" in str(records[0]["reason"])


def test_repeating_a_few_uncached_names_is_stopped_at_the_lookup_budget(
        daemon: tuple[Guardd, Upstream]) -> None:
    """Sixteen names answered with TTL 0 (never cached: each repeat goes upstream) carry four
    bits a lookup in their order (attack pass)."""
    guardd, upstream = daemon
    before = len(upstream.queries())
    names = [(f"{byte % 16:x}.r.amazonaws.com", "A") for byte in os.urandom(3300)]
    ask(guardd, names)
    leaked = len(upstream.queries()) - before
    print(f"repeated names: {len(names)} lookups of 16 names, {leaked} reached the upstream")
    assert leaked <= BUDGET.max_lookups


def test_a_benign_trace_is_never_stopped(daemon: tuple[Guardd, Upstream]) -> None:
    guardd, upstream = daemon
    names = [(name, qtype) for name in BENIGN for qtype in ("A", "AAAA")]
    answers = ask(guardd, names)
    stopped = sum(b"tunnel suspected" in answer for answer in answers)
    print(f"benign: {len(BENIGN)} names ({len(names)} lookups), {stopped} stopped")
    assert stopped == 0 and all(answer[3] & 0x0F == 0 for answer in answers)
    assert reached(upstream, names) == len(names)
    assert len(BENIGN) >= 300
