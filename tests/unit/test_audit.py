"""Audit trail: record layout, hash chain (flushes, rotation, restarts, torn lines), write
failures, export and verify. Files only, no sockets."""

from __future__ import annotations

import asyncio
import csv
import errno
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guardd import audit
from guardd.audit import (FIELDS, GENESIS, MAX_DOMAIN_CHARS, MAX_FIELD_CHARS, AuditRecord,
                          AuditWriter, Mirror, format_records, iter_records, parse_since, verify)
from guardd.errors import AuditError
from tests.unit.fakes import fail_writes, prepared, write_fields

T0 = datetime(2026, 2, 13, 10, 15, 33, 221000, tzinfo=UTC)


class FakeClock:
    """Wall clock for the writer: starts at T0, moved by hand."""

    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now


def opened(directory: Path, **options: object) -> AuditWriter:
    writer = AuditWriter(directory, **options)  # type: ignore[arg-type]
    writer.open()
    return writer


def record(writer: AuditWriter, n: int = 0, **fields: object) -> None:
    values: dict[str, object] = {"action": "network.request", "effect": "allow",
                                 "target": f"host{n}.example.com:443", "reason": f"record {n}"}
    values.update(fields)
    write_fields(writer, **values)  # type: ignore[arg-type]


def write_records(directory: Path, count: int, *, start: int = 0, **options: object) -> None:
    """`count` records, one flush each, then close."""
    writer = opened(directory, **options)
    for n in range(start, start + count):
        record(writer, n)
        writer.flush()
    writer.close()


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def sha(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def all_lines(directory: Path) -> list[bytes]:
    """Every line of the trail, oldest file first."""
    rotated = sorted(directory.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    return [line for path in [*rotated, directory / "audit.jsonl"] for line in lines_of(path)]


def decision_lines(path: Path) -> list[bytes]:
    """The lines of a file that are decisions, not the trail's own checkpoints."""
    return [line for line in lines_of(path) if b'"action":"audit.' not in line]


def trail_names(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.glob("audit.jsonl*"))


def summary(report: audit.VerifyReport) -> tuple[bool, int, int, tuple[str, ...]]:
    return report.ok, report.records, report.files, report.warnings


def assert_chained(lines: list[bytes], first_prev: str = GENESIS) -> None:
    """Each line's prev is the hash of the line before, and its seq one more."""
    prev, seq = first_prev, json.loads(lines[0])["seq"]
    for line in lines:
        assert (json.loads(line)["prev"], json.loads(line)["seq"]) == (prev, seq)
        prev, seq = sha(line), seq + 1


# --- record layout -----------------------------------------------------------------------------

def test_fields_in_order_absent_ones_omitted(tmp_path: Path) -> None:
    writer = opened(tmp_path, clock=FakeClock())
    write_fields(writer, reason="Unauthorized outbound domain", matchedRule="catch-all-deny",
                  effect="deny", port=443, domain="evil.example.com", target="evil.example.com:443",
                  client="10.0.0.2", listener="socks", action="network.request", method=None,
                  ip="", qtype=None)
    write_fields(writer, action="dns.query", effect="allow", listener="dns", client="10.0.0.2",
                  target="api.example.com", domain="api.example.com", qtype="AAAA",
                  matchedRule="api", ip="2001:db8::1", method="GET")
    writer.close()
    first, second = (json.loads(line) for line in decision_lines(tmp_path / "audit.jsonl"))
    assert list(first) == ["timestamp", "action", "listener", "client", "target", "domain", "port",
                           "effect", "matchedRule", "reason", "seq", "prev"]
    assert first["timestamp"] == "2026-02-13T10:15:33.221Z"
    assert first["port"] == 443
    assert list(second) == [name for name in FIELDS
                            if name not in ("principal", "user", "port", "reason", "outcome",
                                            "enforced", "methodOverride", "ownCheck")] + [
        "seq", "prev"]
    assert b" " not in lines_of(tmp_path / "audit.jsonl")[1].split(b'"reason"')[0]


def test_a_field_of_client_text_is_cut_short_in_the_record(tmp_path: Path) -> None:
    """Attack pass (2026-12-05): a 7,000-character Host, method or override header went into
    the domain, the reason, `method` and `methodOverride` whole: 14 KB audit lines."""
    writer = opened(tmp_path, clock=FakeClock())
    long = "A" * 7000
    write_fields(writer, action="network.request", listener="socks", client="10.0.0.2",
                 target="x.test:80", domain=long, method=long, methodOverride=long,
                 effect="deny", matchedRule="r", reason=f"HTTP Host {long} is not allowed")
    writer.close()
    (line,) = decision_lines(tmp_path / "audit.jsonl")
    record = json.loads(line)
    assert len(line) < 3 * MAX_FIELD_CHARS + MAX_DOMAIN_CHARS + 400  # (and the other fields)
    assert all(len(record[name]) == MAX_FIELD_CHARS and record[name].endswith("\u2026")
               for name in ("method", "methodOverride", "reason"))
    assert len(record["domain"]) == MAX_DOMAIN_CHARS and record["domain"].endswith("\u2026")


def test_every_name_a_connect_was_judged_as_stays_in_the_record(tmp_path: Path) -> None:
    """Final attack (2026-12-05): a connect to an address is judged as every name the client
    resolved to it (up to 8), and `domain` lists them: cut at 1,024 characters, the last
    names, one of them perhaps the one that denied, were hidden from an operator and replay."""
    writer = opened(tmp_path, clock=FakeClock())
    names = ",".join(f"{i}{'a' * 60}.{'b' * 60}.{'c' * 60}.{'d' * 60}.test" for i in range(8))
    write_fields(writer, action="network.request", listener="socks", client="10.0.0.2",
                 target="192.0.2.7:80", domain=names, effect="deny", matchedRule="r")
    writer.close()
    (line,) = decision_lines(tmp_path / "audit.jsonl")
    assert json.loads(line)["domain"] == names


def test_a_field_of_text_written_escaped_is_cut_shorter(tmp_path: Path) -> None:
    """Review: non-ASCII text is written escaped, six bytes a character: 1,024 of them made
    an 8 KB line."""
    writer = opened(tmp_path, clock=FakeClock())
    write_fields(writer, action="network.request", listener="socks", client="10.0.0.2",
                 effect="deny", reason="\xe9" * 3000)
    writer.close()
    (line,) = decision_lines(tmp_path / "audit.jsonl")
    assert len(line) < 1.5 * MAX_FIELD_CHARS and json.loads(line)["reason"].endswith("\u2026")


@pytest.mark.parametrize(("offset", "stamp"), [
    (0.0, "2026-02-13T10:15:33.221Z"),
    (0.7789, "2026-02-13T10:15:34.000Z"),
    (86_400 * 365, "2027-02-13T10:15:33.221Z"),
], ids=["ms", "rounds-into-next-second", "next-year"])
def test_timestamp_is_rfc3339_utc_milliseconds(tmp_path: Path, offset: float, stamp: str) -> None:
    clock = FakeClock()
    writer = opened(tmp_path, clock=clock)
    record(writer)  # fills the per-second cache with T0's second
    clock.now += offset
    record(writer)
    writer.close()
    assert json.loads(lines_of(tmp_path / "audit.jsonl")[1])["timestamp"] == stamp


@pytest.mark.parametrize("options", [{"max_bytes": 0}, {"keep": -1}, {"max_pending": 0},
                                     {"retry_interval": -1}],
                         ids=["max_bytes", "keep", "max_pending", "retry_interval"])
def test_rejects_nonsense_limits(tmp_path: Path, options: dict[str, int]) -> None:
    with pytest.raises(AuditError, match=f"audit {next(iter(options))} must be at least"):
        AuditWriter(tmp_path, **options)  # type: ignore[arg-type]


def test_open_creates_directory_and_file_with_tight_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        opened(tmp_path / "var" / "audit").close()
    finally:
        os.umask(old)
    assert (tmp_path / "var" / "audit").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "var" / "audit" / "audit.jsonl").stat().st_mode & 0o777 == 0o640


def test_open_failure_is_an_actionable_audit_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(AuditError, match="cannot open the audit trail in .*file/audit"):
        opened(tmp_path / "file" / "audit")


def test_flush_before_open_is_a_programming_error(tmp_path: Path) -> None:
    writer = AuditWriter(tmp_path)
    record(writer)
    with pytest.raises(AuditError, match=r"open\(\) must be called"):
        writer.flush()


# --- the chain ---------------------------------------------------------------------------------

def test_chain_across_many_flushes_and_one_write_per_flush(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    writes: list[int] = []
    real_write = os.write

    def counting_write(fd: int, data: bytes) -> int:
        writes.append(len(data))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    writer = opened(tmp_path)
    for batch in range(20):
        for n in range(batch % 4 + 1):
            record(writer, n)
        writer.flush()
    writer.flush()  # nothing queued: no write
    assert len(writes) == 20 + 1  # (and the anchor entry of the run's first record)
    writer.close()  # the shutdown checkpoint, and its anchor entry
    assert len(writes) == 23
    lines = lines_of(tmp_path / "audit.jsonl")
    assert len(lines) - 1 == writer.records_written == sum(b % 4 + 1 for b in range(20))
    assert_chained(lines)
    assert summary(verify(tmp_path)) == (True, len(lines) - 1, 1, ())


def test_rotation_keeps_the_chain_and_at_most_keep_files(tmp_path: Path) -> None:
    write_records(tmp_path, 200, max_bytes=2000, keep=3)
    assert trail_names(tmp_path) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2",
                                     "audit.jsonl.3"]
    shutdown = lines_of(tmp_path / "audit.jsonl")[-1]  # written at close, whatever the size
    assert all(path.stat().st_size <= 2000 for path in tmp_path.glob("audit.jsonl.*"))
    assert (tmp_path / "audit.jsonl").stat().st_size <= 2000 + len(shutdown) + 1
    lines = all_lines(tmp_path)
    assert_chained(lines, first_prev=json.loads(lines[0])["prev"])
    assert json.loads(lines_of(tmp_path / "audit.jsonl")[0])["prev"] == sha(
        lines_of(tmp_path / "audit.jsonl.1")[-1])
    # Each file starts with the checkpoint of the rotation that opened it; what retention
    # deleted is said in the trail, so the first record on disk is accounted for.
    assert [json.loads(lines_of(path)[0])["reason"] for path in tmp_path.glob("audit.jsonl*")] \
        == ["rotation"] * 4
    decisions = [line for line in lines if b'"action":"audit.' not in line]
    assert summary(verify(tmp_path)) == (True, len(decisions), 4, ())


@pytest.mark.parametrize("rotated_at_open, rotated_at_line", [(1, 0), (3, 0), (0, 20)])
def test_a_live_trail_is_verified_and_read_as_one_snapshot_while_it_rotates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rotated_at_open: int,
        rotated_at_line: int) -> None:
    """Attack pass, 2026-12-06: `audit verify` during a flood read the files by name one after
    the other while guardd rotated and pruned them: a file read twice under two names made a
    false break ("records ... are missing"), and a file pruned after the listing a traceback.
    Here the trail rotates (and prunes) as its first, or third, file is opened, or as the
    walk reads its 20th line."""
    writer = opened(tmp_path, max_bytes=2000, keep=3)
    written = 0

    def write(count: int) -> None:
        nonlocal written
        for n in range(written, written + count):
            record(writer, n)
            writer.flush()
        written += count

    write(100)
    real_open = Path.open
    opens = 0

    def rotating_open(path: Path, *args: object, **kwargs: object) -> object:
        nonlocal opens
        if path.name.startswith("audit.jsonl") and args[:1] == ("rb",):
            opens += 1
            if opens == rotated_at_open:
                write(40)  # (several files' worth: the oldest are pruned)
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    real_line = audit._Walk.line
    lines = 0

    def rotating_line(walk: audit._Walk, at: str, line: bytes) -> str | None:
        nonlocal lines
        lines += 1
        if lines == rotated_at_line:
            write(40)
        return real_line(walk, at, line)

    monkeypatch.setattr(Path, "open", rotating_open)
    monkeypatch.setattr(audit._Walk, "line", rotating_line)
    report = verify(tmp_path)
    assert report.ok, report.first_error
    opens = 0
    reasons = [r["reason"] for r in iter_records(tmp_path)]
    first = int(reasons[0].split()[1])
    assert reasons == [f"record {n}" for n in range(first, written)] and written == 140 + 40 * (
        rotated_at_open > 0)
    writer.close()


def test_a_write_read_half_way_is_the_end_of_what_verify_and_queries_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review, 2026-12-06: a reader may see a write's first page before the rest; read on, the
    rest came as a line of its own, which `verify` called inserted (a false break) and queries
    dropped with the half before it. The half is the end of what is read (a torn line)."""
    writer = opened(tmp_path)  # (open: its last record is no anchored checkpoint)
    for n in range(5):
        record(writer, n)
        writer.flush()
    current = tmp_path / "audit.jsonl"
    data = current.read_bytes()
    last = data.rstrip(b"\n").rpartition(b"\n")[2]
    half, rest = last[:len(last) // 2], last[len(last) // 2:] + b"\n"
    current.write_bytes(data[:len(data) - len(last) - 1] + half)
    real_line = audit._Walk.line

    def the_rest_lands(walk: audit._Walk, at: str, line: bytes) -> str | None:
        if line == half:
            with current.open("ab") as file:
                file.write(rest)
        return real_line(walk, at, line)

    monkeypatch.setattr(audit._Walk, "line", the_rest_lands)
    report = verify(str(tmp_path))  # (a str too: review, the snapshot wanted a Path)
    assert report.ok, report.first_error
    assert any("torn line" in warning for warning in report.warnings)
    current.write_bytes(data[:len(data) - len(last) - 1] + half)
    real_parse = audit._parse

    def the_rest_and_more_land(line: bytes) -> object:
        if line == half:
            with current.open("ab") as file:
                file.write(rest + data.rstrip(b"\n").rpartition(b"\n")[2] + b"\n")
        return real_parse(line)

    monkeypatch.setattr(audit, "_parse", the_rest_and_more_land)
    reasons = [found["reason"] for found in iter_records(tmp_path)]
    # (what was whole when read, in order: not a record after a gap of one dropped)
    assert reasons == [f"record {n}" for n in range(4)]
    writer.close()


def test_a_trail_that_chains_is_verified_once_however_fast_it_rotates(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review, 2026-12-06: read again whenever a rotation came during the walk, a flood of
    decisions kept `verify` from ever finishing ("rotated each of the 5 times"). What was read
    chains: it holds, whatever came since."""
    writer = opened(tmp_path, max_bytes=2000, keep=3)
    written = 0
    for written in range(60):
        record(writer, written)
        writer.flush()
    real_line = audit._Walk.line
    lines = 0

    def rotating_line(walk: audit._Walk, at: str, line: bytes) -> str | None:
        nonlocal lines, written
        lines += 1
        if lines % 5 == 0:  # (several rotations in every walk)
            for _ in range(10):
                written += 1
                record(writer, written)
                writer.flush()
        return real_line(walk, at, line)

    monkeypatch.setattr(audit._Walk, "line", rotating_line)
    assert verify(tmp_path).ok
    writer.close()


def test_a_trail_of_more_files_than_may_be_open_is_an_error_that_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review, 2026-12-06: the snapshot holds every file open; past the open-files limit,
    a traceback (EMFILE). Now a message saying which limit to raise."""
    write_records(tmp_path, 40, max_bytes=1000, keep=20)
    real_open = Path.open
    opens = 0

    def limited_open(path: Path, *args: object, **kwargs: object) -> object:
        nonlocal opens
        if path.name.startswith("audit.jsonl"):
            opens += 1
            if opens > 3:
                raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(Path, "open", limited_open)
    with pytest.raises(AuditError, match="open-files limit"):
        verify(tmp_path)


def test_rotation_with_keep_zero_keeps_only_the_current_file(tmp_path: Path) -> None:
    write_records(tmp_path, 50, max_bytes=1000, keep=0)
    assert trail_names(tmp_path) == ["audit.jsonl"]
    report = verify(tmp_path)
    assert report.ok and report.warnings == (), report


def test_lowering_keep_deletes_the_surplus_at_the_next_rotation(tmp_path: Path) -> None:
    write_records(tmp_path, 100, max_bytes=1000, keep=5)
    write_records(tmp_path, 10, start=100, max_bytes=1000, keep=2)
    assert trail_names(tmp_path) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    report = verify(tmp_path)
    assert report.ok and report.warnings == (), report


@pytest.mark.parametrize("block", [7, 64 * 1024], ids=["tiny-tail-blocks", "default-blocks"])
def test_restart_continues_the_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     block: int) -> None:
    monkeypatch.setattr(audit, "_TAIL_BLOCK", block)
    write_records(tmp_path, 5)
    write_records(tmp_path, 5, start=5)
    lines = lines_of(tmp_path / "audit.jsonl")
    assert len(lines) == 12  # each run ends with its shutdown checkpoint
    assert_chained(lines)
    report = verify(tmp_path)
    assert summary(report) == (True, 10, 1, ())
    assert (report.checkpoints, report.first_seq, report.last_seq, report.anchored) == (
        2, 0, 11, 4)  # (each run's shutdown checkpoint, and its first record)


def test_restart_with_an_empty_current_file_chains_to_the_rotated_one(tmp_path: Path) -> None:
    write_records(tmp_path, 30)
    (tmp_path / "audit.jsonl").rename(tmp_path / "audit.jsonl.1")  # as a rotation would,
    (tmp_path / "audit.jsonl").touch()  # then the daemon died before writing
    write_records(tmp_path, 1, start=30)
    assert json.loads(lines_of(tmp_path / "audit.jsonl")[0])["prev"] == sha(
        lines_of(tmp_path / "audit.jsonl.1")[-1])
    assert verify(tmp_path).ok


# --- tampering ---------------------------------------------------------------------------------

def tamper(path: Path, line: int, change: str) -> None:
    """Edit 1-based `line` of `path`: flip a byte in a value, break its JSON, cut its end (so it
    looks torn), drop it, or change its prev."""
    lines = lines_of(path)
    old = lines[line - 1]
    if change == "value":
        lines[line - 1] = old.replace(b"record ", b"recorD ")
    elif change == "json":
        lines[line - 1] = b"[" + old[1:]
    elif change == "cut":
        lines[line - 1] = old[:-1]
    elif change == "prev":
        lines[line - 1] = old[:-3] + (b"0" if old[-3:-2] != b"0" else b"1") + old[-2:]
    else:
        del lines[line - 1]
    assert lines != lines_of(path)
    path.write_bytes(b"".join(line + b"\n" for line in lines))


@pytest.mark.parametrize(("change", "line", "first_error"), [
    ("value", 3, "audit.jsonl.2:4: prev does not match the SHA-256 of the record before it "
                 "(audit.jsonl.2:3): that record was changed"),
    ("json", 3, "audit.jsonl.2:3: neither a record nor a torn write (a prefix of one): the line "
                "was changed or inserted"),
    ("cut", 3, "audit.jsonl.2:3: not a JSON record, and the next record does not chain past it "
               "(the line was changed)"),
    ("prev", 3, "audit.jsonl.2:3: prev does not match the SHA-256 of the record before it "
                "(audit.jsonl.2:2): that record was changed"),
    ("delete", 3, "audit.jsonl.2:3: seq {next} follows seq {before} (audit.jsonl.2:2): record "
                  "{seq} is missing (removed)"),
    ("value", -1, "audit.jsonl.1:1: prev does not match the SHA-256 of the record before it "
                  "(audit.jsonl.2:{last}): that record was changed"),
], ids=["value-changed", "json-broken", "cut-to-look-torn", "prev-changed", "record-removed",
        "last-line-of-a-file"])
def test_verify_names_the_first_broken_link(tmp_path: Path, change: str, line: int,
                                            first_error: str) -> None:
    write_records(tmp_path, 60, max_bytes=1500, keep=3)
    assert verify(tmp_path).ok
    old_file = tmp_path / "audit.jsonl.2"
    last = len(lines_of(old_file))
    seq = json.loads(lines_of(old_file)[2])["seq"]
    tamper(old_file, last if line == -1 else line, change)
    report = verify(tmp_path)
    assert not report.ok
    assert report.first_error == first_error.format(last=last, seq=seq, before=seq - 1,
                                                    next=seq + 1)


def test_verify_rejects_a_record_without_prev(tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    path = tmp_path / "audit.jsonl"
    lines = lines_of(path)
    lines[1] = json.dumps({k: v for k, v in json.loads(lines[1]).items() if k != "prev"}).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert verify(tmp_path).first_error == (
        "audit.jsonl:2: no prev of 64 hex digits (the record was changed)")


def test_verify_and_export_need_a_trail(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit trail in .*: audit.jsonl not found"):
        verify(tmp_path / "nowhere")
    with pytest.raises(AuditError, match="no audit trail"):
        iter_records(tmp_path)


# --- torn lines and write failures -------------------------------------------------------------

def test_torn_last_line_is_a_warning_and_the_writer_continues_after_it(tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    path = tmp_path / "audit.jsonl"
    whole = lines_of(path)
    with path.open("ab") as file:  # a crash in the middle of a write
        file.write(whole[0][:40])
    report = verify(tmp_path)
    assert report.ok and report.records == 3
    assert report.warnings == ("audit.jsonl:5: torn line at the end of the trail (a write cut "
                               "short, e.g. by a crash)",)

    write_records(tmp_path, 2, start=3)
    lines = lines_of(path)
    assert lines[4] == whole[0][:40]  # never destroyed
    assert json.loads(lines[5])["prev"] == sha(whole[3])  # the shutdown checkpoint
    assert json.loads(lines[5])["seq"] == json.loads(whole[3])["seq"] + 1
    report = verify(tmp_path)
    assert report.ok and report.records == 5
    assert report.warnings == ("audit.jsonl:5: torn line (a write cut short, e.g. by a crash) "
                               "skipped; the chain continues past it",)
    assert [r["reason"] for r in iter_records(tmp_path)] == [f"record {n}" for n in range(5)]


def test_a_whole_record_missing_its_newline_is_chained_to(tmp_path: Path) -> None:
    write_records(tmp_path, 3)
    path = tmp_path / "audit.jsonl"
    path.write_bytes(path.read_bytes()[:-1])
    write_records(tmp_path, 1, start=3)
    assert_chained(lines_of(path))
    assert summary(verify(tmp_path)) == (True, 4, 1, ())


@pytest.mark.parametrize(("cut", "torn"), [(30, True), (-1, False), (0, False)],
                         ids=["inside-a-record", "before-its-newline", "after-its-newline"])
def test_short_write_keeps_the_rest_and_the_chain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  cut: int, torn: bool) -> None:
    writer = opened(tmp_path, retry_interval=0)
    for n in range(3):
        record(writer, n)
    first_line_length = len(audit._encode(json.loads(writer._pending[0])  # type: ignore[arg-type]
                                          | {"seq": 0, "prev": GENESIS}))
    real_write = os.write

    def short_write(fd: int, data: bytes) -> int:
        monkeypatch.setattr(os, "write", real_write)
        # The first line and its newline, then `cut` more bytes (-1: the newline is missing).
        return real_write(fd, data[:first_line_length + 1 + cut])

    monkeypatch.setattr(os, "write", short_write)
    writer.flush()
    assert (writer.records_written, writer.write_errors) == (1, 1)
    writer.flush()
    writer.close()
    assert (writer.records_written, writer.write_errors) == (3, 1)
    report = verify(tmp_path)
    assert report.ok and report.records == 3
    assert bool(report.warnings) is torn
    assert [r["reason"] for r in iter_records(tmp_path)] == ["record 0", "record 1", "record 2"]


def test_write_errors_are_counted_logged_once_and_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    writer = opened(tmp_path, retry_interval=0)
    fail_writes(monkeypatch, 3)
    caplog.set_level(logging.WARNING, logger="guardd.audit")
    for n in range(4):
        record(writer, n)
        writer.flush()  # never raises
    assert (writer.records_written, writer.write_errors) == (4, 3)
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert "No space left on device" in caplog.records[0].getMessage()
    assert "after 3 failed flushes" in caplog.records[1].getMessage()
    writer.close()
    assert summary(verify(tmp_path)) == (True, 4, 1, ())


def full_once(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """os.write fails once with ENOSPC, then works; returns the sizes of the attempts."""
    real_write = os.write
    attempts: list[int] = []

    def write(fd: int, data: bytes) -> int:
        attempts.append(len(data))
        if len(attempts) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return attempts


@pytest.mark.parametrize("fail_open", [False, True])
def test_answers_wait_for_their_records_while_the_trail_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_open: bool) -> None:
    """Issue 10: a full disk failed open (answers went out unrecorded). Now they wait for their
    records, and retries wait for the interval; failing open is an explicit setting."""
    writer = opened(tmp_path, retry_interval=3600, fail_open=fail_open)
    attempts = full_once(monkeypatch)
    sent: list[int] = []
    for n in range(3):
        record(writer, n)
        writer.after_flush(sent.append, n)
        assert writer.flush() is fail_open  # may answers leave?
    assert (len(attempts), writer.write_errors, writer.records_written) == (1, 1, 0)
    assert sent == ([0, 1, 2] if fail_open else [])
    writer._retry_at = 0.0  # the interval has passed
    assert writer.flush() is True
    assert sent == [0, 1, 2] and writer.records_written == 3
    writer.close()
    assert summary(verify(tmp_path)) == (True, 3, 1, ())


@pytest.mark.parametrize("fail_open", [False, True])
def test_the_writer_says_it_is_down_while_records_wait_for_a_write_that_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_open: bool) -> None:
    """Attack pass 31: what must not go out unrecorded (a query upstream, a connect's lookup)
    asks `down`, not only the size cap's share (`room_for`), which said yes throughout."""
    writer = opened(tmp_path, retry_interval=3600, fail_open=fail_open)
    assert not writer.down
    full_once(monkeypatch)
    record(writer, 0)
    writer.flush()
    assert writer.down is not fail_open
    writer._retry_at = 0.0
    writer.flush()
    assert not writer.down
    writer.close()


async def test_held_answers_leave_when_a_retry_writes_their_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No new request is needed to release them: the retry comes by itself."""
    writer = opened(tmp_path, retry_interval=0.05)
    writer.attach(asyncio.get_running_loop())
    full_once(monkeypatch)
    sent: list[int] = []
    record(writer, 0)
    writer.after_flush(sent.append, 0)
    await asyncio.sleep(0)
    assert sent == [] and writer.write_errors == 1
    await asyncio.sleep(0.2)
    assert sent == [0] and writer.records_written == 1
    writer.close()


@pytest.mark.parametrize("sync", [False, True])
def test_sync_flushes_each_batch_to_the_disk_before_its_answers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool) -> None:
    writer = opened(tmp_path, sync=sync)
    events: list[str] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: events.append("sync") or real_fdatasync(fd))
    record(writer, 0)
    writer.after_flush(events.append, "answer")
    assert writer.flush()
    assert events == (["sync", "answer"] if sync else ["answer"])
    writer.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_trail_file_that_vanishes_is_a_write_failure_and_a_gap_verify_sees(
        tmp_path: Path, how: str, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 10: deleted while guardd ran, the file took every later record with it, silently,
    and `verify` then said "chain intact". Now the write fails (answers wait), the next attempt
    opens a new file that says why, and `verify` reports the records that are gone."""
    writer = opened(tmp_path, retry_interval=0)
    record(writer, 0)
    assert writer.flush()
    current = tmp_path / "audit.jsonl"
    current.unlink()
    if how == "replaced":
        current.write_text("")
    sent: list[int] = []
    record(writer, 1)
    writer.after_flush(sent.append, 1)
    assert writer.flush() is False and sent == [] and writer.write_errors == 1
    assert "deleted or replaced" in caplog.text
    assert writer.flush() is True and sent == [1]
    reopened, written = [json.loads(line) for line in lines_of(current)]
    assert reopened["action"] == audit.REOPENED and written["reason"] == "record 1"
    assert (reopened["seq"], written["seq"]) == (1, 2)
    writer.close()
    assert not verify(tmp_path).ok  # record 0 is gone, and the chain says so


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_the_trails_own_records_after_its_file_vanished_go_to_a_new_one(
        tmp_path: Path, how: str) -> None:
    """Session 55's attack (Low): a copy of the trail moved over it while guardd ran, then a
    stop: the shutdown checkpoint went into the deleted file, its hash into the anchor, and no
    `audit.reopened` record was ever written (a shed note the same, unseen for 20 s). The
    trail's own records check the file as the others do."""
    writer = opened(tmp_path, retry_interval=0)
    record(writer, 0)
    assert writer.flush()
    current = tmp_path / "audit.jsonl"
    copy = current.read_bytes()
    current.unlink()
    if how == "replaced":
        current.write_bytes(copy)
    writer.close()  # (its shutdown checkpoint)
    written = [json.loads(line) for line in lines_of(current)]
    assert [line["action"] for line in written[-2:]] == [audit.REOPENED, audit.CHECKPOINT]


def test_the_reopened_record_is_written_even_when_its_first_attempt_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = opened(tmp_path, retry_interval=0)
    record(writer, 0)
    assert writer.flush()
    (tmp_path / "audit.jsonl").unlink()
    record(writer, 1)
    assert writer.flush() is False  # the file vanished
    full_once(monkeypatch)
    assert writer.flush() is False  # the new file's first record did not reach the disk
    assert writer.flush() is True
    actions = [json.loads(line)["action"] for line in lines_of(tmp_path / "audit.jsonl")]
    assert actions == [audit.REOPENED, "network.request"]
    writer.close()


async def test_no_retry_is_scheduled_once_the_writer_is_closed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = opened(tmp_path, retry_interval=0.01)
    writer.attach(asyncio.get_running_loop())

    def full(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    record(writer, 0)
    writer.close()  # its shutdown checkpoint fails too
    assert writer._retry_timer is None
    await asyncio.sleep(0.05)  # nothing fires on the closed writer


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_answers_of_dropped_records_are_withheld_for_good(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    writer = opened(tmp_path, max_pending=2, retry_interval=0)
    sent: list[int] = []
    for n in range(4):
        record(writer, n)
        writer.after_flush(sent.append, n)
        writer.flush()
    assert sent == [] and writer.records_dropped == 2 and writer.answers_withheld >= 2
    writer.close()
    assert sent == [] and writer.answers_withheld == 4


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_whoever_waits_for_a_withheld_answer_is_told(tmp_path: Path) -> None:
    """A withheld answer's `withheld` callback runs (a TCP client is then closed on, not left
    waiting), and `flushed()` raises instead of waiting for good."""
    from guardd.errors import AuditUnavailableError
    (tmp_path / "audit.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    writer = opened(tmp_path, max_pending=1, retry_interval=0)
    writer.attach(asyncio.get_running_loop())
    sent: list[int] = []
    told: list[int] = []
    record(writer, 0)
    waiter = asyncio.ensure_future(writer.flushed())
    await asyncio.sleep(0)  # it waits for record 0
    for n in range(3):
        record(writer, n + 1)  # each one drops the record before it, withholding its answers
        writer.after_flush(sent.append, n, withheld=lambda n=n: told.append(n))
    writer.flush()
    assert sent == [] and sorted(told) == [0, 1, 2]
    with pytest.raises(AuditUnavailableError):
        await asyncio.wait_for(waiter, 1)
    writer.close()
    assert sorted(told) == [0, 1, 2]  # told once


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_full_disk_bounds_the_backlog_and_counts_drops(tmp_path: Path) -> None:
    (tmp_path / "audit.jsonl").symlink_to("/dev/full")  # every write fails with ENOSPC
    writer = opened(tmp_path, max_pending=3, retry_interval=0)
    for n in range(5):
        record(writer, n)
        writer.flush()
    assert (writer.records_written, writer.write_errors, writer.records_dropped) == (0, 5, 2)
    assert [json.loads(line)["reason"] for line in writer._pending] == [
        "record 2", "record 3", "record 4"]
    writer.close()


def test_rotation_failure_is_counted_and_retried(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    writer = opened(tmp_path, max_bytes=300, retry_interval=0)
    record(writer, 0)
    writer.flush()
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        monkeypatch.setattr(os, "replace", real_replace)
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", failing_replace)
    record(writer, 1)
    writer.flush()
    assert (writer.records_written, writer.write_errors) == (1, 1)
    writer.flush()
    writer.close()
    assert (writer.records_written, writer.write_errors) == (2, 1)
    assert trail_names(tmp_path) == ["audit.jsonl", "audit.jsonl.1"]
    assert summary(verify(tmp_path)) == (True, 2, 2, ())


# --- the event loop ----------------------------------------------------------------------------

async def test_one_flush_per_loop_turn_before_the_answers(tmp_path: Path) -> None:
    writer = opened(tmp_path)
    writer.attach(asyncio.get_running_loop())
    on_disk_when_sent: list[int] = []

    def send(n: int) -> None:
        on_disk_when_sent.append(len(lines_of(tmp_path / "audit.jsonl")))

    for n in range(3):
        record(writer, n)
        writer.after_flush(send, n)
    assert writer.records_written == 0  # nothing written yet: the flush waits for the turn's end
    await asyncio.sleep(0)
    assert on_disk_when_sent == [3, 3, 3]
    record(writer, 3)
    await writer.flushed()
    assert writer.records_written == 4
    writer.close()


async def test_a_failing_callback_does_not_stop_the_others(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    writer = opened(tmp_path)
    writer.attach(asyncio.get_running_loop())
    sent: list[str] = []
    writer.after_flush(lambda: 1 / 0)
    writer.after_flush(sent.append, "answer")
    await writer.flushed()
    assert sent == ["answer"]
    assert "after an audit flush failed" in caplog.text
    writer.close()


async def test_flushed_needs_attach(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match=r"call attach\(loop\)"):
        await opened(tmp_path).flushed()


# --- export ------------------------------------------------------------------------------------

@pytest.fixture
def trail(tmp_path: Path) -> Path:
    """Six records a minute apart across a rotation; odd ones are DNS queries on port 53."""
    clock = FakeClock()
    writer = opened(tmp_path, clock=clock, max_bytes=800)
    for n in range(6):
        if n % 2:
            record(writer, n, action="dns.query", listener="dns", port=53, effect="deny")
        else:
            record(writer, n, listener="socks", port=443, client="10.0.0.2")
        writer.flush()
        clock.now += 60
    writer.close()
    assert (tmp_path / "audit.jsonl.1").exists()
    return tmp_path


def reasons(records: object) -> list[int]:
    return [int(r["reason"].split()[1]) for r in records]  # type: ignore[attr-defined, index]


@pytest.mark.parametrize(("since", "until", "filters", "expected"), [
    (None, None, {}, [0, 1, 2, 3, 4, 5]),
    (T0 + timedelta(minutes=2), None, {}, [2, 3, 4, 5]),
    (None, T0 + timedelta(minutes=2), {}, [0, 1]),
    (T0 + timedelta(minutes=1), T0 + timedelta(minutes=4), {}, [1, 2, 3]),
    (None, None, {"port": "443"}, [0, 2, 4]),
    (None, None, {"action": "dns.query", "effect": "deny"}, [1, 3, 5]),
    (None, None, {"client": "10.0.0.2", "port": "53"}, []),
    (None, None, {"method": "None"}, []),
    (T0 + timedelta(minutes=3), None, {"listener": "socks"}, [4]),
], ids=["all", "since", "until", "since-until-half-open", "port-as-text", "two-filters",
        "no-match", "absent-field-never-matches", "since-and-filter"])
def test_iter_records_selects(trail: Path, since: datetime | None, until: datetime | None,
                              filters: dict[str, str], expected: list[int]) -> None:
    assert reasons(iter_records(trail, since=since, until=until, filters=filters)) == expected


def test_iter_records_rejects_unknown_filter_and_naive_bounds(trail: Path) -> None:
    with pytest.raises(AuditError, match="cannot filter on domian: not an audit field"):
        iter_records(trail, filters={"domian": "x"})
    with pytest.raises(AuditError, match="has no time zone"):
        iter_records(trail, since=datetime(2026, 2, 13))


def test_export_json_is_a_pretty_array_without_prev(trail: Path) -> None:
    records = list(iter_records(trail))
    text = "".join(format_records(records, "json"))
    decisions = [{k: v for k, v in r.items() if k != "prev"} for r in records]
    assert json.loads(text) == decisions
    assert text == json.dumps(decisions, indent=2) + "\n"
    assert "".join(format_records([], "json")) == "[]\n"


def test_export_jsonl_is_as_stored(trail: Path) -> None:
    text = "".join(format_records(iter_records(trail, include_trail=True), "jsonl"))
    assert text.encode().split(b"\n")[:-1] == all_lines(trail)
    decisions = "".join(format_records(iter_records(trail), "jsonl")).encode().split(b"\n")[:-1]
    assert decisions == [line for line in all_lines(trail) if b'"action":"audit.' not in line]


def test_export_csv_parses_back(trail: Path) -> None:
    text = "".join(format_records(iter_records(trail, filters={"port": "53"}), "csv"))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == [*FIELDS, "count", "last", "seq"]
    assert [row["port"] for row in rows] == ["53"] * 3
    assert [row["client"] for row in rows] == [""] * 3
    assert rows[0]["timestamp"] == "2026-02-13T10:16:33.221Z"
    assert "".join(format_records([], "csv")).strip() == ",".join(audit.COLUMNS)


def test_export_rejects_unknown_format() -> None:
    with pytest.raises(AuditError, match="unknown export format 'xml'; use one of json, jsonl"):
        format_records([], "xml")


NOW = datetime(2026, 2, 13, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("text", "expected"), [
    ("24h", NOW - timedelta(hours=24)),
    ("30m", NOW - timedelta(minutes=30)),
    ("7d", NOW - timedelta(days=7)),
    ("90s", NOW - timedelta(seconds=90)),
    ("1w", NOW - timedelta(weeks=1)),
    (" 2H ", NOW - timedelta(hours=2)),
    ("2026-02-13T10:15:33.221Z", T0),
    ("2026-02-13T11:15:33.221+01:00", T0),
    ("2026-02-13t10:15:33.221z", T0),
], ids=["24h", "30m", "7d", "90s", "1w", "spaces-upper", "zulu", "offset", "lower-case"])
def test_parse_since(text: str, expected: datetime) -> None:
    parsed = parse_since(text, NOW)
    assert parsed == expected and parsed.tzinfo is UTC


@pytest.mark.parametrize(("text", "message"), [
    ("yesterday", "cannot read 'yesterday' as a time: give a duration"),
    ("24", "cannot read '24' as a time"),
    ("-5m", "cannot read '-5m' as a time"),
    ("1.5h", "cannot read '1.5h' as a time"),
    ("", "cannot read '' as a time"),
    ("2026-02-13T10:15:33", "has no time zone: add Z for UTC"),
    ("99999999999w", "reaches back too far"),
], ids=["word", "no-unit", "negative", "fraction", "empty", "naive", "overflow"])
def test_parse_since_errors(text: str, message: str) -> None:
    with pytest.raises(AuditError, match=message):
        parse_since(text, NOW)


@settings(max_examples=200, deadline=None)
@given(client=st.text(max_size=40), reason=st.text(max_size=40),
       effect=st.sampled_from(["deny", "allow"]), flush_between=st.booleans())
def test_prepared_record_is_the_same_line_as_record(client: str, reason: str, effect: str,
                                                    flush_between: bool) -> None:
    """The DNS hot path's prepared records must be byte for byte what `record` writes, whatever
    the client text (quotes, backslashes, control characters, non-ASCII); a denial repeated in
    one batch, alone, is folded into a record that is the same line again."""
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        writer = opened(directory, clock=FakeClock())
        fields = {"action": "dns.query", "listener": "dns", "target": "a.test", "domain": "a.test",
                  "qtype": "A", "effect": effect, "matchedRule": "r", "reason": reason}
        prepared(writer, **fields)(client)
        if flush_between:
            writer.flush()
        write_fields(writer, client=client, **fields)  # type: ignore[arg-type]
        writer.close()
        first, second = decision_lines(directory / "audit.jsonl")
    assert json.loads(first).get("client", "") == client
    assert first.rpartition(b',"seq"')[0] == second.rpartition(b',"seq"')[0]


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(st.one_of(st.none(), st.text(max_size=12)), min_size=9, max_size=9),
       port=st.one_of(st.none(), st.integers(0, 65535)), client=st.one_of(st.none(), st.text()))
def test_a_record_is_written_as_json_would_write_it(texts: list[str | None], port: int | None,
                                                    client: str | None) -> None:
    """The field-by-field encoder writes byte for byte what `json` writes for the same fields,
    in FIELDS order with None and "" omitted, whatever the text (quotes, escapes, non-ASCII)."""
    names = ("listener", "target", "domain", "ip", "method", "qtype", "matchedRule", "reason",
             "outcome")
    fields = dict(zip(names, texts, strict=True))
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        writer = opened(directory, clock=FakeClock())
        write_fields(writer, client=client, action="dns.query", effect="allow", port=port,
                     **fields)
        writer.close()
        (line,) = decision_lines(directory / "audit.jsonl")
    values = {"action": "dns.query", "client": client, "port": port, "effect": "allow", **fields}
    expected = {name: values[name] for name in FIELDS[1:]
                if values.get(name) is not None and values.get(name) != ""}
    body = json.dumps(expected, separators=(",", ":"))[1:-1]
    assert line.decode().split(",", 1)[1].rpartition(',"seq"')[0] == body


@settings(max_examples=200, deadline=None)
@given(names=st.lists(st.text(max_size=12), min_size=2, max_size=3),
       reason=st.one_of(st.none(), st.text(max_size=12)), client=st.text(max_size=8))
def test_a_record_for_many_names_is_written_as_json_would_write_each(
        names: list[str], reason: str | None, client: str) -> None:
    """A DNS verdict is one record for every name its decision answers (`write(..., name=)`):
    its encoding is spliced around the name, and must still be what `json` writes for each,
    whatever the name or the other fields hold (the splice's placeholder character included)."""
    template = AuditRecord(action="dns.query", listener="dns", qtype="A", effect="allow",
                           reason=reason)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        writer = opened(directory, clock=FakeClock())
        for name in names:
            writer.write(template, client, name)
        writer.close()
        lines = decision_lines(directory / "audit.jsonl")
    for name, line in zip(names, lines, strict=True):
        values = {"action": "dns.query", "listener": "dns", "client": client, "target": name,
                  "domain": name, "qtype": "A", "effect": "allow", "reason": reason}
        expected = {key: values[key] for key in FIELDS[1:]
                    if values.get(key) is not None and values.get(key) != ""}
        body = json.dumps(expected, separators=(",", ":"))[1:-1]
        assert line.decode().split(",", 1)[1].rpartition(',"seq"')[0] == body


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("fail_open", [False, True])
def test_a_connect_is_answered_unrecorded_only_when_failing_open(tmp_path: Path,
                                                                 fail_open: bool) -> None:
    """Review: `audit.failOpen` did not apply to SOCKS (`Guard.committed` raised anyway)."""
    from guardd.errors import AuditUnavailableError
    from guardd.guard import Guard
    from guardd.metrics import Metrics
    from guardd.policy.engine import Policy

    (tmp_path / "audit.jsonl").symlink_to("/dev/full")
    writer = opened(tmp_path, fail_open=fail_open)
    guard = Guard(Policy.from_text('version: "1.0"\nrules: []\n'), writer, Metrics(process=False))
    verdict = guard.refusal("socks", "a refusal")
    if fail_open:
        guard.committed(verdict, "10.0.0.2")
    else:
        with pytest.raises(AuditUnavailableError):
            guard.committed(verdict, "10.0.0.2")
    writer.close()


class _Stream:
    """A log shipper's end of stdout: keeps what it reads, or never reads (`stuck`)."""

    def __init__(self, stuck: bool = False) -> None:
        self.data = bytearray()
        self.stuck = threading.Event() if stuck else None

    def write(self, data: bytes) -> int:
        if self.stuck is not None:
            self.stuck.wait()
        self.data += data
        return len(data)

    def flush(self) -> None:
        pass


def test_the_stdout_mirror_carries_the_trail_line_for_line(tmp_path: Path) -> None:
    stream = _Stream()
    writer = opened(tmp_path, mirror=Mirror(stream))  # type: ignore[arg-type]
    for n in range(3):
        record(writer, n)
        writer.flush()
    writer.close()  # (waits for the copy, the shutdown checkpoint with it)
    assert bytes(stream.data) == (tmp_path / "audit.jsonl").read_bytes()
    assert b'"audit.checkpoint"' in bytes(stream.data)


def test_a_mirror_nobody_reads_drops_and_counts_but_never_blocks_the_trail(tmp_path: Path
                                                                          ) -> None:
    stream = _Stream(stuck=True)
    writer = opened(tmp_path, mirror=Mirror(stream, capacity=1000))  # type: ignore[arg-type]
    started = time.monotonic()
    for n in range(10):
        record(writer, n)
        writer.flush()
    assert time.monotonic() - started < 2
    assert writer.records_written == 10 and writer.mirror_dropped >= 3  # ~200 bytes a record
    assert stream.stuck is not None
    stream.stuck.set()


@pytest.mark.parametrize("outage", [False, True], ids=["trail-up", "trail-down"])
def test_a_policy_load_is_in_the_chain_after_what_the_policy_before_it_judged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outage: bool) -> None:
    """Review: written at once, the `audit.policy` record went before records still queued,
    which the policy before it had judged; so it did, again, while the trail could not be
    written. It waits in the queue with them."""
    writer = opened(tmp_path, retry_interval=0.0)
    record(writer, 1)  # (queued, not flushed)
    if outage:
        fail_writes(monkeypatch, 1)
    writer.note_policies("reloaded", {"default": {"/etc/guardd/policy.yaml": "ab" * 32}})
    record(writer, 2)
    writer.close()
    assert writer.records_written == 2  # (decisions: the final run, a metric counted it)
    kept = [json.loads(line) for line in lines_of(tmp_path / "audit.jsonl")]
    assert [(each["action"], each.get("reason")) for each in kept[:3]] == [
        ("network.request", "record 1"), ("audit.policy", "reloaded"),
        ("network.request", "record 2")]
    assert kept[1]["policies"] == {"default": {"/etc/guardd/policy.yaml": "ab" * 32}}
    assert audit.verify(tmp_path).ok


def test_a_policy_load_outlives_the_records_an_outage_drops(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """Review: queued, the `audit.policy` record could be the oldest past `max_pending`, and
    went without a trace. The decisions after it go first; it stays, in its place before those
    kept, and the drop is noted."""
    writer = opened(tmp_path, retry_interval=0.0, max_pending=2)
    fail_writes(monkeypatch)
    writer.note_policies("reloaded", {"default": {"/p.yaml": "cd" * 32}})
    for n in range(3):
        record(writer, n)
        writer.flush()
    monkeypatch.undo()
    writer.close()
    kept = [json.loads(line) for line in lines_of(tmp_path / "audit.jsonl")]
    assert [(each["action"], each.get("reason", "")[:8], each.get("count")) for each in kept] \
        == [("audit.dropped", "records ", 2), ("audit.policy", "reloaded", None),
            ("network.request", "record 2", None), ("audit.checkpoint", "shutdown", None)]
    assert writer.records_dropped == 2 and audit.verify(tmp_path).ok


def test_a_policy_load_after_the_trail_closed_is_logged_not_raised(tmp_path: Path) -> None:
    """Review: a SIGHUP as guardd stops reloads after the trail closed; the record raised out
    of the signal's callback."""
    writer = opened(tmp_path)
    writer.close()
    writer.note_policies("reloaded", {})
    assert b"audit.policy" not in (tmp_path / "audit.jsonl").read_bytes()


def test_a_second_writer_of_the_same_trail_is_refused_saying_why(tmp_path: Path) -> None:
    """Attack pass 31: two guardd with one audit directory both started and both wrote; the
    chain forked (`verify`: "two trails share this anchor"). One trail has one writer: the
    second is refused at its start, until the first closes."""
    first = opened(tmp_path)
    with pytest.raises(AuditError, match="another guardd writes the audit trail in"):
        opened(tmp_path)
    record(first, 0)
    first.close()
    second = opened(tmp_path)  # (the first is gone: its lock with it)
    record(second, 1)
    second.close()
    assert summary(verify(tmp_path))[:2] == (True, 2)


def test_two_trails_never_share_an_anchor_file(tmp_path: Path) -> None:
    """Last note of stop 39: the lock kept one directory to one writer, not an anchor file
    configured elsewhere (`audit.anchor`): two guardd with trails of their own and one anchor
    both appended their checkpoints to it, and neither trail verified against it. An anchor
    has one writer too."""
    shared = tmp_path / "anchor.jsonl"
    first = opened(tmp_path / "one", anchor=shared)
    with pytest.raises(AuditError, match="another guardd anchors its audit trail in"):
        opened(tmp_path / "two", anchor=shared)
    first.close()
    opened(tmp_path / "two", anchor=shared).close()  # (the first is gone: its lock with it)
    own = opened(tmp_path / "three")  # (review: a trail's own anchor, named by another)
    with pytest.raises(AuditError, match="another guardd anchors its audit trail in"):
        opened(tmp_path / "four", anchor=tmp_path / "three" / "anchor.jsonl")
    own.close()


def test_an_anchor_that_cannot_be_opened_is_named_and_holds_nothing(tmp_path: Path) -> None:
    """Review: an anchor in a directory that is not there failed the start as "cannot open
    the audit trail in DIR ... set another audit directory", naming the wrong setting."""
    writer = AuditWriter(tmp_path / "trail", anchor=tmp_path / "nowhere" / "anchor.jsonl")
    with pytest.raises(AuditError, match=r"cannot open the audit anchor .*nowhere/anchor\.jsonl"
                       r": No such file or directory; .*\(audit\.anchor\)"):
        writer.open()
    opened(tmp_path / "trail").close()  # (its directory's lock was let go)
