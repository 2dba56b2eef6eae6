"""`guardd audit verify` and `guardd audit export` as an operator runs them (issue 8, holes 12
and 14): on trails the writer made and then an attacker changed, and on the trail of a real daemon
flooded with one denied query over loopback."""

from __future__ import annotations

import csv
import json
import re
import shlex
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from guardd.audit import ANCHOR, CURRENT, AuditWriter
from tests.e2e.harness import GUARDD, ROOT, Guardd, Upstream, dns_query
from tests.unit.fakes import write_fields

POLICY = str(ROOT / "policies" / "default.yaml")


def guardd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDD, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def write_trail(directory: Path, hosts: list[str]) -> None:
    writer = AuditWriter(directory, max_bytes=1500, keep=2)
    writer.open()
    for n, host in enumerate(hosts):
        write_fields(writer, action="network.request", listener="socks", client="10.0.0.2",
                      target=f"{host}:443", domain=host, port=443, effect="deny",
                      matchedRule="catch-all-deny", reason=f"Unauthorized outbound domain {n}")
        writer.flush()
    writer.close()


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


@pytest.mark.parametrize(("tamper", "error"), [
    (lambda d: (d / CURRENT).write_bytes(b"\n".join(lines_of(d / CURRENT)[:-2]) + b"\n"),
     "removed from the end"),
    (lambda d: (d / f"{CURRENT}.2").unlink(), "are missing before the first record"),
    (lambda d: (d / CURRENT).write_bytes(b"[1]\n" + (d / CURRENT).read_bytes()),
     "audit.jsonl:1: JSON, but not a record"),
], ids=["tail-cut", "oldest-file-deleted", "forged-line"])
def test_verify_exits_1_and_names_the_tampering(tmp_path: Path, tamper: object, error: str
                                                ) -> None:
    write_trail(tmp_path, [f"host{n}.example.com" for n in range(40)])
    ok = guardd("audit", "verify", "--audit", str(tmp_path))
    assert ok.returncode == 0, ok.stderr
    # (session 60's read-through: "34 records ... seq 0..36" read as a gap; the checkpoints
    # between are counted apart)
    assert re.match(r"ok: \d+ records \(and \d+ of the trail's own: checkpoints, notes\) in 3 "
                    r"files, chain intact", ok.stdout), ok.stdout
    assert ok.stderr == ""
    tamper(tmp_path)  # type: ignore[operator]
    broken = guardd("audit", "verify", "--audit", str(tmp_path))
    assert broken.returncode == 1
    assert "broken: " in broken.stderr and error in broken.stderr, broken.stderr


def test_verify_checks_a_shipped_anchor(tmp_path: Path) -> None:
    trail = tmp_path / "trail"
    write_trail(trail, [f"host{n}.example.com" for n in range(10)])
    shipped = tmp_path / "shipped.anchor"
    shipped.write_bytes((trail / ANCHOR).read_bytes())
    (trail / ANCHOR).unlink()
    (trail / CURRENT).write_bytes(b"\n".join(lines_of(trail / CURRENT)[:-1]) + b"\n")
    without = guardd("audit", "verify", "--audit", str(trail))
    assert without.returncode == 0
    assert "warning: no anchor" in without.stderr
    broken = guardd("audit", "verify", "--audit", str(trail), "--anchor", str(shipped))
    assert broken.returncode == 1 and "removed from the end" in broken.stderr


def test_export_into_a_reader_that_stops_early_prints_no_traceback(tmp_path: Path) -> None:
    """Session 60's read-through: `guardd audit export ... | head` printed a BrokenPipeError
    traceback."""
    writer = AuditWriter(tmp_path / "audit")
    writer.open()
    for n in range(2000):  # (about 600 KB of export: more than a pipe holds)
        write_fields(writer, action="dns.query", listener="dns", client="10.0.0.2",
                     target=f"h{n}.example", domain=f"h{n}.example", effect="deny",
                     matchedRule="catch-all-deny", reason="Unauthorized outbound domain")
    writer.close()
    result = subprocess.run(f"{shlex.join(GUARDD)} audit export --audit {tmp_path / 'audit'} "
                            "--format jsonl | head -1", shell=True, capture_output=True,
                            text=True, timeout=60, cwd=ROOT)
    assert result.stdout.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_export_and_verify_print_no_control_characters(tmp_path: Path) -> None:
    hostile = ["evil\x1b[2J.test", "=cmd|'/C calc'!A0", "a.test\r\nforged,row", "x\u202etxt.exe"]
    write_trail(tmp_path, hostile)
    out = subprocess.run([*GUARDD, "audit", "export", "--audit", str(tmp_path), "--format",
                          "csv"], cwd=ROOT, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert all(ch.isprintable() or ch in "\r\n" for ch in text), ascii(text)
    rows = list(csv.DictReader(text.splitlines()))
    assert [row["target"] for row in rows] == [
        "evil\\x1b[2J.test:443", "'=cmd|'/C calc'!A0:443", "a.test\\r\\nforged,row:443",
        "x\\u202etxt.exe:443"]
    for fmt in ("json", "jsonl"):
        out = subprocess.run([*GUARDD, "audit", "export", "--audit", str(tmp_path), "--format",
                              fmt], cwd=ROOT, capture_output=True, timeout=60)
        assert out.returncode == 0 and out.stdout.isascii() and b"\x1b" not in out.stdout
    strange = tmp_path / "trail\x1b]0;owned\x07"
    missing = subprocess.run([*GUARDD, "audit", "verify", "--audit", str(strange)], cwd=ROOT,
                             capture_output=True, timeout=60)
    assert missing.returncode == 1
    assert b"\x1b" not in missing.stderr and b"\\x1b]0;owned\\x07" in missing.stderr


def test_a_flood_of_one_denied_query_is_folded_and_every_answer_is_covered(tmp_path: Path
                                                                           ) -> None:
    trap = Upstream(tmp_path, {})  # denied names are never forwarded: it must see nothing
    daemon = Guardd.launch(tmp_path, "--policy", POLICY, "--upstream", trap.address,
                           "--dns", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    try:
        total = 2_000
        frames = b"".join(struct.pack("!H", len(q)) + q
                          for q in (dns_query("x.ngrok.io", n) for n in range(total)))
        answers = 0
        with socket.create_connection(daemon.dns[0], timeout=10) as sock:
            sock.sendall(frames)  # pipelined: whole batches arrive in one loop turn
            buffer = b""
            while answers < total:
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed after {answers} answers"
                buffer += chunk
                while len(buffer) >= 2 and len(buffer) >= 2 + struct.unpack("!H", buffer[:2])[0]:
                    size = struct.unpack("!H", buffer[:2])[0]
                    assert buffer[2 + 3] & 0x0F == 3  # NXDOMAIN
                    buffer = buffer[2 + size:]
                    answers += 1
        samples = daemon.scrape()
        assert samples["guardd_audit_records_compacted_total"] > 0
    finally:
        assert daemon.stop() == 0, daemon.log_text()
        trap.stop()
    assert trap.queries() == []
    verified = guardd("audit", "verify", "--audit", str(daemon.audit_dir))
    assert verified.returncode == 0 and verified.stderr == "", verified.stderr
    exported = guardd("audit", "export", "--audit", str(daemon.audit_dir), "--format", "jsonl",
                      "--filter", "target=x.ngrok.io")
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert sum(int(r.get("count", 1)) for r in records) == total
    assert len(records) < total / 10, len(records)
