"""The DNS guard end to end: the real daemon, a test upstream on loopback, and the real `dig`.

The daemon runs `policies/default.yaml`, the policy a new user starts with. The upstream knows
every name the tests ask, denied ones included, and logs what it was asked: a denied name that
shows up in its log was leaked, whatever the daemon answered.
"""

from __future__ import annotations

import csv
import json
import random
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ROOT, Child, Guardd, Upstream, dig, run

POLICY = str(ROOT / "policies" / "default.yaml")
ZONES = {
    "api.anthropic.com": ["A 192.0.2.10", "AAAA 2001:db8::10"],
    # An allowed name that aliases a denied one: the answer must not leave guardd.
    "api.openai.com": ["CNAME relay.ngrok.io"],
    "relay.ngrok.io": ["A 192.0.2.99"],
    # An allowed alias chain into the internal zone, which may use private addresses.
    "registry.npmjs.org": ["CNAME npm.internal.company.com"],
    "npm.internal.company.com": ["A 10.1.2.3"],
    "meta.internal.company.com": ["A 169.254.169.254"],
    "loop.internal.company.com": ["A 127.0.0.1"],
    "mixed.internal.company.com": ["A 192.0.2.20", "A 127.0.0.1"],
    "big.internal.company.com": ["A 192.0.2.30"],
    "slow.internal.company.com": ["A 192.0.2.31"],
    # Denied names, present upstream so that a leak would even resolve.
    "x.ngrok.io": ["A 192.0.2.98"],
    "abc.burpcollaborator.net": ["A 192.0.2.97"],
    "y.webhook.site": ["A 192.0.2.96"],
}
BEHAVIOURS = {"big.internal.company.com": "truncate", "slow.internal.company.com": "silent"}
DENIED = [("x.ngrok.io", "block-ngrok"), ("abc.burpcollaborator.net", "block-burp-collaborator"),
          ("y.webhook.site", "block-webhook-site")]
ATTEMPT_TIMEOUT, TOTAL_TIMEOUT = 0.4, 1.2
TRANSPORTS = {"udp": (), "tcp": ("+tcp",)}


def write_config(directory: Path, upstream: Upstream, **extra: str) -> Path:
    """A daemon config file, as an operator would write one (systemd/guardd.yaml shows all keys)."""
    lines = [f"policy: {POLICY}", f"upstreams: [{upstream.address}]",
             f"upstreamTimeout: {{attempt: {ATTEMPT_TIMEOUT}, total: {TOTAL_TIMEOUT}}}",
             *(f"{key}: {value}" for key, value in extra.items())]
    path = directory / "guardd.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    server = Upstream(tmp_path_factory.mktemp("upstream"), ZONES, BEHAVIOURS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def guardd(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Guardd]:
    """One daemon for the module: DNS on IPv4 and IPv6 loopback, metrics on."""
    directory = tmp_path_factory.mktemp("guardd")
    daemon = Guardd.launch(directory, "--config", str(write_config(directory, upstream)),
                           "--dns", "127.0.0.1:0", "[::1]:0", "--metrics", "127.0.0.1:0")
    yield daemon
    assert daemon.stop() == 0, daemon.log_text()


@pytest.fixture
def fresh_guardd(tmp_path: Path, upstream: Upstream) -> Iterator[Guardd]:
    """A daemon of its own, for tests that count what it did; its audit rotates at 4 KiB."""
    config = write_config(tmp_path, upstream, audit="{maxBytes: 4096, keep: 20}")
    daemon = Guardd.launch(tmp_path, "--config", str(config), "--dns", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0")
    yield daemon
    if daemon.alive():
        daemon.stop()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("listener", [0, 1], ids=["ipv4", "ipv6"])
def test_allowed_name_resolves(guardd: Guardd, transport: str, listener: int) -> None:
    server = guardd.dns[listener]
    a = dig(server, "api.anthropic.com", "A", *TRANSPORTS[transport])
    aaaa = dig(server, "API.Anthropic.com.", "AAAA", *TRANSPORTS[transport])
    assert (a.status, a.answers) == ("NOERROR", [("api.anthropic.com", "A", "192.0.2.10")])
    assert (aaaa.status, [x[2] for x in aaaa.answers]) == ("NOERROR", ["2001:db8::10"])


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("name", "rule"), DENIED, ids=[name for name, _ in DENIED])
def test_denied_name_is_nxdomain_with_ede_and_never_forwarded(
        guardd: Guardd, upstream: Upstream, transport: str, name: str, rule: str) -> None:
    result = dig(guardd.dns[0], name, "A", *TRANSPORTS[transport])
    assert result.status == "NXDOMAIN"
    assert result.answers == []
    assert result.ede.startswith(f"15 (Blocked): ({rule}: Block ")
    assert name not in upstream.queries()


def test_denied_name_without_edns_gets_plain_nxdomain(guardd: Guardd, upstream: Upstream
                                                      ) -> None:
    result = dig(guardd.dns[0], "deep.sub.x.ngrok.io", "TXT", "+noedns")
    assert (result.status, result.ede) == ("NXDOMAIN", "")
    assert "OPT PSEUDOSECTION" not in result.raw
    assert not [q for q in upstream.queries() if q.endswith("ngrok.io") and q != "relay.ngrok.io"]


def test_cname_into_denied_name_is_filtered(guardd: Guardd) -> None:
    result = dig(guardd.dns[0], "api.openai.com")
    assert result.status == "NXDOMAIN"
    assert result.answers == []
    assert result.ede.startswith("17 (Filtered): (answer filtered: api.openai.com is an alias "
                                 "of relay.ngrok.io, which is denied (block-ngrok")


def test_allowed_cname_chain_resolves(guardd: Guardd) -> None:
    result = dig(guardd.dns[0], "registry.npmjs.org")
    assert result.status == "NOERROR"
    assert result.answers == [("registry.npmjs.org", "CNAME", "npm.internal.company.com."),
                              ("npm.internal.company.com", "A", "10.1.2.3")]


@pytest.mark.parametrize(("name", "what"), [("meta.internal.company.com", "169.254.169.254 is a metadata address"),
                                            ("loop.internal.company.com", "127.0.0.1 is a loopback address")])
def test_answer_with_only_protected_addresses_is_filtered(guardd: Guardd, name: str, what: str
                                                          ) -> None:
    for attempt in ("upstream", "cache"):
        result = dig(guardd.dns[0], name)
        assert result.status == "NXDOMAIN", attempt
        assert result.answers == [], attempt
        assert result.ede.startswith("17 (Filtered): (answer filtered: "), attempt
        assert what in result.ede, attempt


def test_protected_address_is_removed_beside_usable_ones(guardd: Guardd) -> None:
    result = dig(guardd.dns[0], "mixed.internal.company.com")
    assert result.status == "NOERROR"
    assert result.answers == [("mixed.internal.company.com", "A", "192.0.2.20")]


def test_truncated_upstream_answer_is_retried_over_tcp(guardd: Guardd, upstream: Upstream
                                                       ) -> None:
    # Over UDP the upstream answers TC=1 with no records: the address can only come over TCP.
    result = dig(guardd.dns[0], "big.internal.company.com")
    assert result.status == "NOERROR"
    assert result.answers == [("big.internal.company.com", "A", "192.0.2.30")]
    assert upstream.queries().count("big.internal.company.com") == 2  # UDP, then TCP


def test_silent_upstream_gives_servfail_within_the_total_timeout(guardd: Guardd) -> None:
    started = time.monotonic()
    result = dig(guardd.dns[0], "slow.internal.company.com")
    elapsed = time.monotonic() - started
    assert result.status == "SERVFAIL"
    assert result.ede.startswith("22 (No Reachable Authority)")
    # guardd waited for the upstream at least one attempt, and answered by the configured total
    # timeout (dig itself would wait 5 s); the slack covers starting dig, not another round.
    assert ATTEMPT_TIMEOUT <= elapsed < TOTAL_TIMEOUT + 1.0


def test_zone_transfer_is_refused_and_any_is_minimal(guardd: Guardd) -> None:
    axfr = run(["dig", f"@{guardd.dns[0][0]}", "-p", str(guardd.dns[0][1]), "company.com",
                "AXFR", "+tries=1", "+time=5"])
    assert "Transfer failed" in axfr.stdout
    any_answer = dig(guardd.dns[0], "api.anthropic.com", "ANY")
    assert any_answer.status == "NOERROR"
    assert [(t, data) for _, t, data in any_answer.answers] == [("HINFO", '"RFC8482" ""')]


def test_malformed_query_with_a_header_gets_formerr(guardd: Guardd) -> None:
    header = struct.pack("!HHHHHH", 0xBEEF, 0x0100, 1, 0, 0, 0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(header + b"\x07example", guardd.dns[0])  # question cut short
        reply = sock.recv(512)
    ident, flags = struct.unpack("!HH", reply[:4])
    assert ident == 0xBEEF
    assert flags & 0x8000 and flags & 0xF == 1  # a response, FORMERR


def test_random_bytes_leave_the_daemon_answering(guardd: Guardd) -> None:
    rng = random.Random(1928)
    payloads = [rng.randbytes(rng.randrange(0, 600)) for _ in range(1000)]
    # Half of them start like a query, so they get past the header and into the parser.
    for index in range(0, len(payloads), 2):
        payloads[index] = struct.pack("!HHHHHH", index, 0x0100, 1, 0, 0, 1) + payloads[index]
    host, port = guardd.dns[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for payload in payloads:
            sock.sendto(payload, (host, port))
    for start in range(0, len(payloads), 100):  # ten TCP connections, framed and unframed
        with socket.create_connection((host, port), timeout=5) as sock:
            for payload in payloads[start:start + 100]:
                framed = start % 200 == 0
                try:
                    sock.sendall(struct.pack("!H", len(payload)) + payload if framed else payload)
                except (ConnectionResetError, BrokenPipeError):
                    break  # (guardd ends a connection at a message it does not answer)
    assert guardd.alive()
    for transport in TRANSPORTS.values():
        assert dig(guardd.dns[0], "api.anthropic.com", "A", *transport).status == "NOERROR"


def test_metrics_show_decisions_by_rule_and_effect(fresh_guardd: Guardd) -> None:
    for name in ("x.ngrok.io", "a.x.ngrok.io", "y.webhook.site", "api.anthropic.com"):
        dig(fresh_guardd.dns[0], name)
    samples = fresh_guardd.scrape()
    prefix = 'guardd_decisions_total{action="dns.query",'
    assert samples[prefix + 'effect="deny",listener="dns",rule="block-ngrok"}'] == 2
    assert samples[prefix + 'effect="deny",listener="dns",rule="block-webhook-site"}'] == 1
    assert samples[prefix + 'effect="allow",listener="dns",rule="anthropic-rate-limited"}'] == 1
    assert samples['guardd_dns_queries_total{qtype="A",rcode="NXDOMAIN"}'] == 3
    assert samples["guardd_dns_cache_misses_total"] == 1
    assert samples["guardd_audit_records_total"] == 4
    assert samples["process_open_fds"] > 0


def test_audit_export_returns_exactly_the_decisions_in_order(fresh_guardd: Guardd) -> None:
    asked = [("api.anthropic.com", "A", "allow", "anthropic-rate-limited"),
             ("x.ngrok.io", "A", "deny", "block-ngrok"),
             ("api.anthropic.com", "AAAA", "allow", "anthropic-rate-limited"),
             ("meta.internal.company.com", "A", "deny", "internal-services"),
             ("abc.burpcollaborator.net", "TXT", "deny", "block-burp-collaborator"),
             ("unknown.example", "A", "deny", "catch-all-deny")]
    for name, qtype, _, _ in asked:
        dig(fresh_guardd.dns[0], name, qtype)
    expected = [{"action": "dns.query", "listener": "dns", "client": "127.0.0.1", "target": name,
                 "domain": name, "qtype": qtype, "effect": effect, "matchedRule": rule}
                for name, qtype, effect, rule in asked]

    def decisions(records: list[dict[str, object]]) -> list[dict[str, object]]:
        return [{key: record[key] for key in expected[0]} for record in records]

    json_records = fresh_guardd.audit_records("action=dns.query")
    assert decisions(json_records) == expected
    assert json_records[0]["ip"] == "192.0.2.10"
    assert "169.254.169.254" in str(json_records[3]["reason"])
    jsonl = fresh_guardd.cli("audit", "export", "--audit", str(fresh_guardd.audit_dir),
                             "--since", "24h", "--format", "jsonl").stdout
    jsonl_records = [json.loads(line) for line in jsonl.splitlines()]
    assert decisions(jsonl_records) == expected
    assert all(len(str(record["prev"])) == 64 for record in jsonl_records)
    csv_text = fresh_guardd.cli("audit", "export", "--audit", str(fresh_guardd.audit_dir),
                                "--format", "csv").stdout
    rows = list(csv.DictReader(csv_text.splitlines()))
    assert [{key: row[key] for key in expected[0]} for row in rows] == expected
    denied = fresh_guardd.audit_records("effect=deny", "qtype=TXT")
    assert [r["target"] for r in denied] == ["abc.burpcollaborator.net"]


def test_audit_verify_names_the_changed_line(fresh_guardd: Guardd) -> None:
    for index in range(40):  # enough to rotate the 4 KiB files several times
        dig(fresh_guardd.dns[0], f"n{index}.x.ngrok.io")
    assert fresh_guardd.stop() == 0
    audit = fresh_guardd.audit_dir
    ok = fresh_guardd.cli("audit", "verify", "--audit", str(audit))
    assert ok.stdout.startswith("ok: 40 records (and ")  # (checkpoints apart: session 60)
    oldest = max(audit.glob("audit.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    lines = oldest.read_bytes().split(b"\n")
    at = lines[1].index(b"tunnel")
    lines[1] = lines[1][:at] + b"T" + lines[1][at + 1:]
    oldest.write_bytes(b"\n".join(lines))
    broken = fresh_guardd.cli("audit", "verify", "--audit", str(audit), check=False)
    assert broken.returncode == 1
    assert f"{oldest.name}:2" in broken.stderr


def test_sighup_reloads_the_policy_and_a_broken_one_is_refused(tmp_path: Path,
                                                               upstream: Upstream) -> None:
    policy = tmp_path / "policy.yaml"
    # (without its tests, one of which says ngrok is denied: a reload that opens it would be
    # refused for that, test_reload.py shows)
    policy.write_text(Path(POLICY).read_text().partition("\ntests:")[0] + "\n")
    config = write_config(tmp_path, upstream)
    config.write_text(config.read_text().replace(f"policy: {POLICY}", f"policy: {policy}"))
    daemon = Guardd.launch(tmp_path, "--config", str(config), "--dns", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0")
    try:
        assert dig(daemon.dns[0], "x.ngrok.io").status == "NXDOMAIN"
        # The operator opens ngrok: the memoized denial must not outlive the old policy.
        opened = policy.read_text().replace('domain: "*.ngrok.io"\n    effect: deny',
                                            'domain: "*.ngrok.io"\n    effect: allow')
        policy.write_text(opened)
        reloads = 'guardd_policy_reloads_total{result="%s"}'
        daemon.reload()
        deadline = time.monotonic() + 10
        while daemon.scrape().get(reloads % "ok", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert dig(daemon.dns[0], "x.ngrok.io").answers == [("x.ngrok.io", "A", "192.0.2.98")]
        policy.write_text(policy.read_text() + "  - efect: deny\n")  # a typo: refused
        daemon.reload()
        while daemon.scrape().get(reloads % "error", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.scrape()[reloads % "error"] == 1
        assert dig(daemon.dns[0], "x.ngrok.io").status == "NOERROR"  # still the reloaded policy
        assert dig(daemon.dns[0], "y.webhook.site").status == "NXDOMAIN"
        assert "policy reload refused, keeping the old policy" in daemon.log_text()
        assert "efect" in daemon.log_text()
    finally:
        assert daemon.stop() == 0


# --- a hostile client and a hostile upstream (issue 8, holes 7, 8 and 13) -----------------------

HOSTILE_ZONES = {
    "hint.internal.company.com": ["HTTPS 1 . alpn=h2 ipv4hint=169.254.169.254"],
    "rider.internal.company.com": ["A 192.0.2.60"],
    "authalias.internal.company.com": ["A 192.0.2.61"],
    "longttl.internal.company.com": ["2147483647 A 192.0.2.62"],
    "plain.internal.company.com": ["A 192.0.2.63"],
}
HOSTILE_EXTRAS = {
    "rider.internal.company.com": {"answer": ["x.ngrok.io. 60 IN A 192.0.2.98"],
                                   "additional": ["y.webhook.site. 60 IN A 192.0.2.96"]},
    "authalias.internal.company.com": {
        "authority": ["authalias.internal.company.com. 60 IN CNAME relay.ngrok.io."]},
}
SECRET = b"exfiltrated-by-edns"


class RawUpstream(Child):
    """`tests.dnsupstream` with `extras`, logging the raw bytes of every query it is sent."""

    def __init__(self, directory: Path) -> None:
        spec = directory / "hostile-zones.json"
        spec.write_text(json.dumps({"zones": HOSTILE_ZONES, "extras": HOSTILE_EXTRAS}))
        self.raw_log = directory / "raw-queries.log"
        super().__init__(["-m", "tests.dnsupstream", "--zone-file", str(spec),
                          "--raw-log", str(self.raw_log)],
                         directory / "hostile-queries.log", "the hostile upstream")
        self.address = f"127.0.0.1:{self.port}"

    def packets(self) -> list[bytes]:
        return [bytes.fromhex(line) for line in self.raw_log.read_text().split()]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Guardd, RawUpstream]]:
    directory = tmp_path_factory.mktemp("hostile")
    server = RawUpstream(directory)
    config = write_config(directory, server)  # type: ignore[arg-type]
    daemon = Guardd.launch(directory, "--config", str(config), "--dns", "127.0.0.1:0",
                           "--metrics", "off")  # (not the default port: another guardd may have it)
    yield daemon, server
    assert daemon.stop() == 0, daemon.log_text()
    server.stop()


def minimal_query(packet: bytes) -> tuple[str, bool]:
    """Check `packet` is a query guardd built: RD only, one question, at most a bare OPT, nothing
    after it. Returns (question name, EDNS sent)."""
    ident, flags, qd, an, ns, ar = struct.unpack_from("!6H", packet)
    assert (flags, qd, an, ns) == (0x0100, 1, 0, 0) and ar in (0, 1), packet.hex()
    pos = 12
    labels = []
    while packet[pos]:
        labels.append(packet[pos + 1:pos + 1 + packet[pos]].decode())
        pos += 1 + packet[pos]
    pos += 5  # root label, QTYPE, QCLASS
    if ar:
        root, rtype, udp_size, ttl, rdlength = struct.unpack_from("!BHHIH", packet, pos)
        assert (root, rtype, udp_size, ttl & ~0x8000, rdlength) == (0, 41, 1232, 0, 0), \
            packet.hex()
        pos += 11
    assert pos == len(packet), f"{len(packet) - pos} bytes after the question: {packet.hex()}"
    return ".".join(labels), bool(ar)


def test_the_upstream_sees_only_questions_guardd_built(hostile: tuple[Guardd, RawUpstream]
                                                       ) -> None:
    daemon, upstream = hostile
    name = "plain.internal.company.com"
    secret = SECRET.hex()
    for transport in TRANSPORTS.values():
        result = dig(daemon.dns[0], name.upper(), "A", *transport, f"+ednsopt=65001:{secret}",
                     "+subnet=198.51.100.0/24", "+cookie=0102030405060708", "+nsid",
                     "+padding=256", "+adflag", "+cdflag")
        assert result.answers == [(name.upper(), "A", "192.0.2.63")] or \
            result.answers == [(name, "A", "192.0.2.63")]
    # A query with records in every section and trailing bytes, then a 60 KB one over TCP.
    question = b"".join(bytes([len(p)]) + p.encode() for p in "other.internal.company.com".split(
        ".")) + b"\0\x00\x01\x00\x01"
    record = b"\xc0\x0c\x00\x10\x00\x01\x00\x00\x00\x3c" + struct.pack("!H", len(SECRET) + 1) \
        + bytes([len(SECRET)]) + SECRET
    stuffed = (struct.pack("!6H", 0x5151, 0x0100, 1, 1, 1, 2) + question + record * 3
               + b"\0\x00\x29\x10\x00\x00\x00\x00\x00" + struct.pack("!H", len(SECRET) + 4)
               + b"\xfd\xe9" + struct.pack("!H", len(SECRET)) + SECRET + SECRET * 4)
    huge = (struct.pack("!6H", 0x5252, 0x0100, 1, 0, 0, 1) + question.replace(b"other", b"hugeq")
            + b"\0\x00\x29\x10\x00\x00\x00\x00\x00" + struct.pack("!H", 60_000 + 4)
            + b"\xfd\xe9" + struct.pack("!H", 60_000) + SECRET * (60_000 // len(SECRET))
            + b"\0" * (60_000 % len(SECRET)))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(5)
        sock.sendto(stuffed, daemon.dns[0])
        reply = sock.recv(4096)
        assert reply[:2] == b"\x51\x51" and reply[12:12 + len(question)] == question
    with socket.create_connection(daemon.dns[0], timeout=5) as sock:
        sock.sendall(struct.pack("!H", len(huge)) + huge)
        length = struct.unpack("!H", sock.recv(2))[0]
        assert length > 12
    packets = upstream.packets()
    names = [minimal_query(packet) for packet in packets]
    assert {n for n, _ in names} == {name, "other.internal.company.com",
                                     "hugeq.internal.company.com"}
    assert all(SECRET not in packet for packet in packets)


def test_hostile_answers_are_vetted_end_to_end(hostile: tuple[Guardd, RawUpstream]) -> None:
    daemon, _ = hostile
    for transport in TRANSPORTS.values():
        hint = dig(daemon.dns[0], "hint.internal.company.com", "HTTPS", *transport)
        assert (hint.status, hint.answers) == ("NXDOMAIN", [])
        assert hint.ede.startswith("17 (Filtered)") and "169.254.169.254" in hint.ede
        rider = dig(daemon.dns[0], "rider.internal.company.com", "A", *transport)
        assert rider.answers == [("rider.internal.company.com", "A", "192.0.2.60")]
        assert "192.0.2.98" not in rider.raw and "192.0.2.96" not in rider.raw
        alias = dig(daemon.dns[0], "authalias.internal.company.com", "A", *transport)
        assert (alias.status, alias.answers) == ("NXDOMAIN", [])
        assert "relay.ngrok.io" in alias.ede
        long = dig(daemon.dns[0], "longttl.internal.company.com", "A", *transport)
        (line,) = [line for line in long.raw.splitlines()
                   if line.startswith("longttl.internal.company.com.")]
        assert 0 < int(line.split()[1]) <= 86400


def test_refusals_are_audited(fresh_guardd: Guardd) -> None:
    server = fresh_guardd.dns[0]
    run(["dig", f"@{server[0]}", "-p", str(server[1]), "company.com", "AXFR", "+tries=1",
         "+time=5"])
    assert dig(server, "version.bind", "TXT", "-c", "CH").status == "REFUSED"
    assert dig(server, "api.anthropic.com", "A", "+edns=1", "+noednsnegotiation").status == \
        "BADVERS"
    records = fresh_guardd.audit_records("effect=deny")
    reasons = {(r["target"], r["qtype"]): str(r["reason"]) for r in records}
    assert "zone transfers" in reasons["company.com", "AXFR"]
    assert "class 3" in reasons["version.bind", "TXT"]
    assert "EDNS version 1" in reasons["api.anthropic.com", "A"]
