"""Cloud metadata through SOCKS, inside a network namespace the test creates with only `lo` in it.

Everything runs in the namespace: the test upstream, guardd, the servers and curl. The metadata
addresses 169.254.169.254 and fd00:ec2::254 are put on the namespace's `lo`, with a trap server
behind them that logs any connection, so a guardd bug would show up as a line in the trap's log
(and could not reach anything real: the namespace has no other interface and no route out).

The policy allows every name and, by `ip` rule, loopback: the built-in metadata protection must
hold whatever the rules say, for every spelling of the address an attacker may try.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.e2e.harness import ROOT, Destination, Guardd, Upstream, loopback_netns, require, run

POLICY = """\
version: "1.0"
rules:
  - id: loopback-tests
    action: network.request
    ip: 127.0.0.0/8
    effect: allow
    reason: "The test explicitly allows 127.0.0.0/8"
  - id: allow-everything
    action: "*"
    domain: "*"
    effect: allow
    reason: "A careless policy: every name allowed"
"""
TRAPS = ("169.254.169.254", "fd00:ec2::254")
ZONES = {
    # What real DNS would answer: a leak through the resolver would land in the trap.
    "metadata.google.internal": ["A 169.254.169.254"],
    "metadata.goog": ["A 169.254.169.254"],
    "169.254.169.254.nip.io": ["A 169.254.169.254"],
    "rebind.allowed.test": ["A 169.254.169.254", "AAAA fd00:ec2::254"],
    "web.allowed.test": ["A 127.0.0.1"],
}
CURL_URLS = [
    "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://2852039166/",
    "http://[::ffff:169.254.169.254]/",
    "http://0xa9fea9fe/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://0251.0376.0251.0376/",
    "http://169.254.43518/",
    "http://0xa9.0xfe.0xa9.0xfe/",
    "http://[fd00:ec2::254]/",
    "http://[64:ff9b::a9fe:a9fe]/",
    "http://[2002:a9fe:a9fe::1]/",
    "http://metadata.goog/",
    "http://169.254.170.2/v2/credentials",
]
#: (how the host goes into the CONNECT, host): encodings curl would normalize before sending.
RAW_HOSTS = [
    ("domain", "2852039166"), ("domain", "0xa9fea9fe"), ("domain", "0XA9FEA9FE"),
    ("domain", "0251.0376.0251.0376"), ("domain", "169.254.43518"), ("domain", "169.254.169.254."),
    ("domain", "0xa9.0xfe.0xa9.0xfe"), ("domain", "[::ffff:169.254.169.254]"),
    ("domain", "::ffff:a9fe:a9fe"), ("domain", "METADATA.GOOGLE.INTERNAL."),
    ("domain", "fd00:ec2:0::254"), ("ipv4", "169.254.169.254"), ("ipv6", "fd00:ec2::254"),
    ("ipv6", "::ffff:169.254.169.254"), ("ipv6", "::169.254.169.254"),
]


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with loopback_netns("169.254.169.254/32", "fd00:ec2::254/128") as name:
        yield name


@pytest.fixture(scope="module")
def world(netns: str, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[tuple[Guardd, Upstream, Destination, list[Destination]]]:
    directory = tmp_path_factory.mktemp("netns")
    upstream = Upstream(directory, ZONES, netns=netns)
    web = Destination(directory, "web", netns=netns)
    traps = [Destination(directory, "trap", host=host, port=80, netns=netns) for host in TRAPS]
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    daemon = Guardd.launch(directory, "--policy", str(policy), "--upstream", upstream.address,
                           "--dns", "127.0.0.1:0", "--socks", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0", netns=netns)
    yield daemon, upstream, web, traps
    assert daemon.stop() == 0, daemon.log_text()
    for child in (upstream, web, *traps):
        child.stop()


def curl_in(netns: str, proxy: tuple[str, int], url: str) -> subprocess.CompletedProcess[str]:
    return run(["ip", "netns", "exec", netns, require("curl"), "-sS", "--max-time", "10",
                "--socks5-hostname", f"{proxy[0]}:{proxy[1]}", url])


def connect_attempts(guardd: Guardd) -> float:
    return sum(value for key, value in guardd.scrape().items()
               if key.startswith("guardd_connect_attempts_total"))


def test_the_setup_reaches_loopback(netns: str, world: tuple) -> None:
    guardd, _, web, _ = world
    result = curl_in(netns, guardd.socks[0], f"http://web.allowed.test:{web.port}/")
    assert result.stdout == f"GET / host=web.allowed.test:{web.port}\n", result.stderr
    assert connect_attempts(guardd) == 1


@pytest.mark.parametrize("url", CURL_URLS)
def test_metadata_urls_are_denied_before_any_connection(netns: str, world: tuple, url: str
                                                        ) -> None:
    guardd, _, _, traps = world
    before = connect_attempts(guardd)
    result = curl_in(netns, guardd.socks[0], url)
    assert result.returncode == 97, result.stderr  # CURLE_PROXY: the proxy refused
    assert "SOCKS5 connection to" in result.stderr and "(2)" in result.stderr
    assert connect_attempts(guardd) == before
    assert [trap.lines() for trap in traps] == [[], []]
    record = guardd.audit_records("action=network.request", "listener=socks")[-1]
    assert record["effect"] == "deny"
    assert "metadata" in str(record["reason"])


@pytest.mark.parametrize(("atyp", "host"), RAW_HOSTS, ids=[f"{a}-{h}" for a, h in RAW_HOSTS])
def test_metadata_encodings_in_raw_requests_are_denied(netns: str, world: tuple, atyp: str,
                                                       host: str) -> None:
    guardd, upstream, _, traps = world
    kind = {"domain": 3, "ipv4": 1, "ipv6": 4}[atyp]
    proxy_host, proxy_port = guardd.socks[0]
    probe = run(["ip", "netns", "exec", netns, sys.executable, "-m", "tests.e2e.rawsocks",
                 proxy_host, str(proxy_port), str(kind), host, "80"], cwd=ROOT)
    assert probe.stdout == "2\n", probe.stderr
    assert [trap.lines() for trap in traps] == [[], []]
    assert "metadata.google.internal" not in upstream.queries()


@pytest.mark.parametrize("name", ["169.254.169.254.nip.io", "rebind.allowed.test"])
def test_names_that_resolve_to_metadata_are_refused(netns: str, world: tuple, name: str) -> None:
    """A look-alike name is a name (resolved, not parsed as an address), and what it resolves to
    is vetted: no address survives, so the host is unreachable (reply 4)."""
    guardd, upstream, _, traps = world
    result = curl_in(netns, guardd.socks[0], f"http://{name}/")
    assert "SOCKS5 connection to" in result.stderr and "(4)" in result.stderr
    assert name in upstream.queries()
    assert [trap.lines() for trap in traps] == [[], []]
    record = guardd.audit_records(f"target={name}:80")[-1]
    assert record["effect"] == "deny" and "metadata" in str(record["reason"])


def test_no_outbound_connect_was_attempted_and_the_trap_works(netns: str, world: tuple) -> None:
    guardd, upstream, _, traps = world
    assert connect_attempts(guardd) == 1  # the loopback control only
    assert not {"metadata.google.internal", "metadata.goog"} & set(upstream.queries())
    denied = guardd.audit_records("action=network.request", "effect=deny")
    assert len(denied) == len(CURL_URLS) + len(RAW_HOSTS) + 2
    # The trap does catch a direct connection, so its silence above means something.
    direct = run(["ip", "netns", "exec", netns, require("curl"), "-s", "--max-time", "5",
                  "http://169.254.169.254/"])
    assert direct.returncode != 0
    assert traps[0].lines() == ["connection"]
