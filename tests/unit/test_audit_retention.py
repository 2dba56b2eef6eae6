"""Audit retention under a flood (issue 8, hole 12): repeated denials folded into counted records
whose answers still wait for the disk, rotated files younger than the minimum age kept up to a
hard cap, records dropped at the cap counted and noted in the trail, checkpoints and their anchor.
Files only, no sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from guardd import audit
from guardd.audit import ANCHOR, CURRENT, AuditRecord, AuditWriter, iter_records, verify
from guardd.config import Config
from guardd.dns.cache import AnswerCache
from guardd.dns.server import DNSService
from guardd.errors import AuditError, AuditUnavailableError
from guardd.guard import Guard
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from tests.unit.fakes import fail_writes, prepared, write_fields
from tests.unit.test_audit import FakeClock, opened
from tests.unit.test_dns_service import POLICY, FakeUpstream, packet

def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def trail_records(directory: Path) -> list[dict[str, object]]:
    return list(iter_records(directory, include_trail=True))


def denial(writer: AuditWriter, name: str = "x.ngrok.io", **fields: object
           ) -> Callable[[str], None]:
    values: dict[str, object] = {"action": "dns.query", "listener": "dns", "target": name,
                                 "domain": name, "qtype": "A", "effect": "deny",
                                 "matchedRule": "block-ngrok", "reason": "Block ngrok"}
    values.update(fields)
    return prepared(writer, **values)


def decision_fields(line: bytes) -> bytes:
    """A line without its timestamp, sequence number and prev."""
    return line[len(b'{"timestamp":"2026-02-13T10:15:33.221Z",'):].rpartition(b',"seq"')[0]


def covered(records: list[dict[str, object]], **where: object) -> int:
    """Decisions the records stand for: a folded record counts `count`."""
    return sum(int(r.get("count", 1)) for r in records  # type: ignore[call-overload]
               if all(r.get(k) == v for k, v in where.items()))


# --- folding repeated denials ------------------------------------------------------------------

def test_repeats_in_a_batch_are_one_counted_record_after_the_first(tmp_path: Path) -> None:
    clock = FakeClock()
    writer = opened(tmp_path, clock=clock)
    deny = denial(writer)
    allow = prepared(writer, action="dns.query", listener="dns", target="a.test", qtype="A",
                           effect="allow", matchedRule="a", reason="ok")
    for client in ["10.0.0.1", "10.0.0.1", "10.0.0.2", "ALLOW", "10.0.0.1", "10.0.0.2",
                   "ALLOW"]:
        if client == "ALLOW":
            allow("10.0.0.1")
        else:
            deny(client)
        clock.now += 0.001
    writer.flush()
    lines = lines_of(tmp_path / CURRENT)
    records = [json.loads(line) for line in lines]
    assert [(r["client"], r["effect"], r.get("count")) for r in records] == [
        ("10.0.0.1", "deny", None), ("10.0.0.1", "deny", 2), ("10.0.0.2", "deny", None),
        ("10.0.0.1", "allow", None), ("10.0.0.2", "deny", None), ("10.0.0.1", "allow", None)]
    folded = records[1]
    assert (folded["timestamp"], folded["last"]) == ("2026-02-13T10:15:33.222Z",
                                                     "2026-02-13T10:15:33.225Z")
    assert list(folded)[-4:] == ["count", "last", "seq", "prev"]
    # A repeat that stays alone in its batch is written exactly as the record it repeats.
    assert decision_fields(lines[4]) == decision_fields(lines[2])
    assert (writer.records_written, writer.records_compacted) == (6, 1)
    writer.close()
    assert verify(tmp_path).ok


def test_a_flood_of_one_denial_is_two_lines_a_batch(tmp_path: Path) -> None:
    writer = opened(tmp_path)
    deny = denial(writer)
    for batch in range(3):
        for _ in range(10_000):
            deny("10.0.0.9")
        writer.flush()
    records = [json.loads(line) for line in lines_of(tmp_path / CURRENT)]
    assert [r.get("count") for r in records] == [None, 9_999] * 3
    assert covered(records, client="10.0.0.9") == 30_000
    assert (writer.records_written, writer.records_compacted) == (6, 29_994)
    writer.close()


@pytest.mark.parametrize("field", ["client", "target", "matchedRule", "reason", "qtype", "action",
                                   "listener", "port", "method", "ip"])
def test_denials_that_differ_in_any_field_are_not_folded(tmp_path: Path, field: str) -> None:
    writer = opened(tmp_path)
    base: dict[str, object] = {"action": "network.request", "listener": "socks",
                               "client": "10.0.0.1", "target": "x.test:443", "domain": "x.test",
                               "ip": "192.0.2.1", "port": 443, "method": "GET", "qtype": "A",
                               "effect": "deny", "matchedRule": "r", "reason": "no"}
    write_fields(writer, **base)  # type: ignore[arg-type]
    write_fields(writer, **base | {field: 444 if field == "port" else "other"})  # type: ignore[arg-type]
    writer.flush()
    assert [json.loads(line).get("count") for line in lines_of(tmp_path / CURRENT)] == [None, None]
    writer.close()


def test_allowed_repeats_are_not_folded(tmp_path: Path) -> None:
    writer = opened(tmp_path)
    for _ in range(3):
        write_fields(writer, action="dns.query", effect="allow", client="10.0.0.1", target="a.test")
    writer.flush()
    assert len(lines_of(tmp_path / CURRENT)) == 3
    writer.close()


async def test_every_answer_leaves_after_the_record_that_covers_it(tmp_path: Path) -> None:
    writer = opened(tmp_path)
    writer.attach(asyncio.get_running_loop())
    deny = denial(writer)
    answered = 0
    seen_on_disk: list[tuple[int, int]] = []

    def send() -> None:
        nonlocal answered
        answered += 1
        records = [json.loads(line) for line in lines_of(tmp_path / CURRENT)]
        seen_on_disk.append((answered, covered(records, client="10.0.0.1")))

    for turn in range(3):
        for _ in range(turn * 50 + 1):  # 1, 51 and 101 repeats in one loop turn
            deny("10.0.0.1")
            writer.after_flush(send)
        await asyncio.sleep(0)
    await writer.flushed()
    assert len(seen_on_disk) == 153
    assert all(on_disk >= sent for sent, on_disk in seen_on_disk), seen_on_disk
    assert writer.records_written == 5
    writer.close()


def test_a_dropped_fold_counts_every_decision_it_stood_for(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    writer = opened(tmp_path, max_pending=1, retry_interval=0)
    fail_writes(monkeypatch)
    deny = denial(writer)
    for _ in range(5):
        deny("10.0.0.1")
    writer.flush()  # [first, fold of 4]: the first is dropped
    assert writer.records_dropped == 1
    write_fields(writer, action="dns.query", effect="allow", client="10.0.0.2")
    writer.flush()  # the fold goes (for a record of what went out)
    assert writer.records_dropped == 5
    writer.close()


def test_past_max_pending_a_record_nothing_went_out_for_never_pushes_out_another(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review of attack pass 31: past `max_pending` in an outage, the oldest records were
    dropped whatever they were, so an agent that had filled the disk then sent refusals
    (nothing leaves for them while the trail is down) pushed out the records of what had
    gone out as the outage began (an answer from upstream, a connect under way). Once the
    backlog is full, a record nothing went out for is the one dropped, counted."""
    writer = opened(tmp_path, max_pending=2, retry_interval=0)
    fail_writes(monkeypatch, 6)
    write_fields(writer, action="dns.query", effect="allow", client="10.0.0.1", reason="out")
    writer.flush()
    deny = denial(writer)
    for n in range(5):
        deny(f"10.0.0.{n + 2}")
        writer.flush()
    assert writer.records_dropped == 4
    writer.close()
    assert [(r["action"], r.get("count"), r.get("client")) for r in trail_records(tmp_path)
            ][:3] == [("audit.dropped", 4, None), ("dns.query", None, "10.0.0.1"),
                      ("dns.query", None, "10.0.0.2")]


def test_past_max_pending_the_oldest_record_nothing_went_out_for_goes_first(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: a record of what went out that came when the backlog was full pushed out the
    oldest record, though it too was of what went out, and newer refusals stayed. The oldest
    record nothing went out for goes first; one of what went out only when there is none."""
    writer = opened(tmp_path, max_pending=3, retry_interval=0)
    fail_writes(monkeypatch, 3)
    went = lambda client: write_fields(writer, action="dns.query", effect="allow",  # noqa: E731
                                       client=client, reason="out")
    went("10.0.0.1")
    writer.flush()
    deny = denial(writer)
    deny("10.0.0.2")
    deny("10.0.0.3")
    writer.flush()
    went("10.0.0.4")  # (past max_pending: 10.0.0.2's refusal goes)
    writer.flush()
    assert writer.records_dropped == 1
    writer.close()
    assert [r.get("client") for r in trail_records(tmp_path) if r["action"] == "dns.query"
            ] == ["10.0.0.1", "10.0.0.3", "10.0.0.4"]


def test_a_fold_of_refusals_goes_before_a_record_of_what_went_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: past `max_pending`, a fold of refusals (nothing went out for them) was kept as
    if something had, and an older record of what went out was dropped before it."""
    writer = opened(tmp_path, max_pending=4, retry_interval=0)
    fail_writes(monkeypatch, 5)
    went = lambda reason: write_fields(writer, action="dns.query", effect="allow",  # noqa: E731
                                       client="10.0.0.1", reason=reason)
    went("out-1")
    writer.flush()
    deny = denial(writer)
    for _ in range(50):  # (a line and a fold of 49, in one batch)
        deny("10.0.0.9")
    writer.flush()
    for reason in ("out-2", "out-3", "out-4"):  # (each past the backlog's room, the last two)
        went(reason)
        writer.flush()
    writer.close()
    assert [r.get("reason") for r in trail_records(tmp_path) if r["action"] == "dns.query"
            ] == ["out-1", "out-2", "out-3", "out-4"]
    assert writer.records_dropped == 50


def test_an_answer_after_the_trail_recovered_is_not_withheld(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the mark that withholds the answer of a record dropped as it came outlived the
    outage: the next answer waited for with no record of its own (`flushed`, a shed denial's)
    was withheld though the trail was written."""
    writer = opened(tmp_path, max_pending=1, retry_interval=0)
    fail_writes(monkeypatch, 2)
    for reason in ("a", "b"):  # (b: dropped as it came)
        writer.write(AuditRecord(action="dns.query", effect="allow", reason=reason),
                     "10.0.0.1", went_out=False)
        writer.flush()
    assert writer.records_dropped == 1 and writer.flush()  # (written again)
    sent: list[int] = []
    writer.after_flush(sent.append, 1)
    writer.flush()
    assert sent == [1]
    writer.close()


def test_the_answer_of_a_record_dropped_as_it_came_never_leaves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: a record dropped as it came (the backlog full) left its answer waiting with the
    rest, and the answer went when the trail was written again: an answer from guardd's
    cache (nothing goes out for it) reached its client unrecorded. It is withheld for good, as
    the answers of records dropped from the backlog are; the others still leave."""
    writer = opened(tmp_path, max_pending=2, retry_interval=0)
    fail_writes(monkeypatch, 2)
    sent: list[str] = []
    told: list[str] = []
    for name, went_out in (("upstream", True), ("upstream too", True), ("cached", False)):
        writer.write(AuditRecord(action="dns.query", effect="allow", reason=name), "10.0.0.1",
                     went_out=went_out)
        writer.after_flush(sent.append, name, withheld=lambda name=name: told.append(name))
        writer.flush()  # (fails twice, then writes)
    assert writer.records_dropped == 1
    assert sent == ["upstream", "upstream too"] and told == ["cached"]
    writer.close()


def test_records_lost_to_an_outage_are_noted_in_the_trail(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    writer = opened(tmp_path, max_pending=2, retry_interval=0)
    fail_writes(monkeypatch, 5)
    for n in range(5):
        write_fields(writer, action="dns.query", effect="allow", client="10.0.0.1", reason=f"r{n}")
        writer.flush()
    assert writer.records_dropped == 3
    writer.close()
    records = trail_records(tmp_path)
    assert [(r["action"], r.get("count"), r.get("reason")) for r in records[:3]] == [
        ("audit.dropped", 3, "records lost: the trail could not be written, and more than "
                             "max_pending records were waiting or nothing went out for them"),
        ("dns.query", None, "r3"), ("dns.query", None, "r4")]
    report = verify(tmp_path)
    assert report.ok
    assert "audit.jsonl:1: 3 records were lost before this point" in " ".join(report.warnings)


# --- minimum age and the hard cap ---------------------------------------------------------------

def flood(writer: AuditWriter, start: int, count: int, effect: str = "deny") -> None:
    """Unique denials (nothing to fold), or decisions of another `effect`, a flush every 5."""
    for n in range(start, start + count):
        denial(writer, f"n{n}.x.ngrok.io", effect=effect)("10.0.0.66")
        if n % 5 == 4:
            writer.flush()
    writer.flush()


def age(directory: Path, seconds: float) -> None:
    """Make every rotated file look `seconds` older than now."""
    for path in directory.glob(f"{CURRENT}.*"):
        stamp = time.time() - seconds
        os.utime(path, (stamp, stamp))


def test_the_default_minimum_age_keeps_a_flooded_trail(tmp_path: Path) -> None:
    """The issue's flood: at 67,000 records a second the default keep=10 rotated a metadata
    attempt away within seconds; files younger than the default minimum age now stay."""
    config = Config()
    writer = opened(tmp_path, max_bytes=2000, keep=config.audit_keep,
                    min_age=config.audit_min_age, max_total_bytes=config.audit_size_cap,
                    retry_interval=0)
    write_fields(writer, action="network.request", effect="deny", client="10.0.0.66",
                  target="169.254.169.254:80", reason="metadata endpoint")
    flood(writer, 0, 300)
    writer.close()
    assert len(list(tmp_path.glob(f"{CURRENT}.*"))) > config.audit_keep
    assert [r["target"] for r in iter_records(tmp_path, filters={"client": "10.0.0.66"})][:2] == [
        "169.254.169.254:80", "n0.x.ngrok.io"]
    assert verify(tmp_path).ok


def test_files_older_than_the_minimum_age_are_pruned_down_to_keep(tmp_path: Path) -> None:
    writer = opened(tmp_path, max_bytes=2000, keep=2, min_age=3600, retry_interval=0)
    flood(writer, 0, 300)
    assert len(list(tmp_path.glob(f"{CURRENT}.*"))) > 2
    age(tmp_path, 7200)
    aged = len(list(tmp_path.glob(f"{CURRENT}.*")))
    flood(writer, 300, 40)  # the next rotation prunes the old files past keep, not the new ones
    writer.close()
    rotated = {int(p.suffix[1:]): p.stat().st_mtime for p in tmp_path.glob(f"{CURRENT}.*")}
    assert all(mtime > time.time() - 3600 for index, mtime in rotated.items() if index > 2)
    assert len(rotated) < aged
    assert next(iter(iter_records(tmp_path)))["target"] != "n0.x.ngrok.io"
    report = verify(tmp_path)
    assert report.ok and report.warnings == (), report


def test_a_flood_of_denials_at_the_cap_leaves_the_rest_to_everyone_else(tmp_path: Path) -> None:
    """Attack pass: one client's unique denied names filled the trail to its cap in minutes
    (files younger than the minimum age stay), and from then on every client's answers waited
    and were withheld, allowed ones too, for up to a day. Past `DENIAL_SHARE` of the cap,
    denials are now counted in `audit.shed` records instead of written one by one."""
    writer = opened(tmp_path, max_bytes=4000, keep=1, min_age=3600, max_total_bytes=40000,
                    max_pending=10, retry_interval=0)
    flood(writer, 0, 400)
    assert writer.write_errors == 0 and writer.records_dropped == 0
    assert writer.records_shed > 0
    allow = prepared(writer, action="dns.query", listener="dns", target="a.test", qtype="A",
                     effect="allow", matchedRule="a", reason="ok")
    for _ in range(5):
        allow("10.0.0.7")
        assert writer.flush()  # (its answer may leave: the record is on disk)
    shed = writer.records_shed
    writer.close()
    assert sum(p.stat().st_size for p in tmp_path.glob(f"{CURRENT}*")) <= 40000
    records = trail_records(tmp_path)
    assert covered(records, client="10.0.0.7") == 5
    notes = [r for r in records if r["action"] == "audit.shed"]
    assert sum(int(r["count"]) for r in notes) == shed  # type: ignore[call-overload]
    assert all(r["clients"] == {"10.0.0.66": r["count"]} for r in notes)
    assert covered(records, client="10.0.0.66") + shed == 400
    assert verify(tmp_path).ok


def test_without_a_minimum_age_old_files_make_room_before_anything_is_shed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Last stop: with `min_age` 0 and `keep` files taking most of the cap, the trail began
    shedding within the second between its looks for files to delete (1,460 of 1,500 denials
    went uncounted one by one), and its warning said no file was older than 0s."""
    writer = opened(tmp_path, max_bytes=2000, keep=4, min_age=0, max_total_bytes=12000,
                    max_pending=10, retry_interval=0)
    with caplog.at_level(logging.WARNING, logger="guardd.audit"):
        flood(writer, 0, 1500)
    writer.close()
    assert writer.records_shed == 0 and writer.write_errors == 0
    assert not [r for r in caplog.records if "minimum age" in r.getMessage()]
    assert covered(trail_records(tmp_path), client="10.0.0.66") > 0
    assert sum(p.stat().st_size for p in tmp_path.glob(f"{CURRENT}*")) <= 12000


def test_shedding_spares_what_went_through_and_names_no_other_record(tmp_path: Path) -> None:
    """Review: a denial only reported (report mode) lets the request through, and was shed
    like any other: no record of where it went; and `write_now` of a shed denial returned the
    number of the record before it, another client's, for the 403 to name."""
    writer = shedding(tmp_path, max_bytes=4000, max_total_bytes=40000)
    flood(writer, 0, 50)
    shed = writer.records_shed
    assert shed == 50
    went_through = prepared(writer, action="network.request", listener="socks",
                            target="exfil.test:443", effect="deny", enforced=False,
                            matchedRule="default", reason="report mode: would deny")
    for _ in range(3):
        went_through("10.0.0.7")
        assert writer.flush()
    assert writer.records_shed == shed
    assert writer.write_now(AuditRecord(action="network.request", listener="http",
                                        target="http://x.test/", effect="deny",
                                        matchedRule="d", reason="denied"), "10.0.0.8") is None
    writer.close()
    assert covered(trail_records(tmp_path), client="10.0.0.7") == 3


BIG = {"max_bytes": 40000, "keep": 1, "min_age": 3600, "max_total_bytes": 400000,
       "retry_interval": 0, "max_pending": 10}
CONNECT = AuditRecord(action="network.request", listener="socks", target="pypi.org:443",
                      effect="allow", matchedRule="pypi", reason="ok")
ALLOW = AuditRecord(action="dns.query", listener="dns", target="a.test", qtype="A",
                    effect="allow", matchedRule="a", reason="ok")


def shedding(tmp_path: Path, **options: object) -> AuditWriter:
    """A writer past its denial share (a flood of allowed decisions took it there: denials
    alone no longer can, `SPARE_SHARE`)."""
    writer = opened(tmp_path, **{**BIG, **options})  # type: ignore[arg-type]
    n = 0
    while not writer._shedding:
        flood(writer, n, 5, effect="allow")
        n += 5
    return writer


def test_one_clients_denials_never_take_the_trail_past_the_share_alone(tmp_path: Path) -> None:
    """Attack pass (2026-12-06): one client's unique denied names, written one by one below
    `DENIAL_SHARE`, took the trail there alone in minutes; then every other client's connects
    were refused past its share of the room left, for the day `min_age` keeps the files, the
    flood over or not. Past `SPARE_FILL`, what may be shed spends a budget of its client's."""
    writer = opened(tmp_path, **BIG)  # type: ignore[arg-type]
    flood(writer, 0, 5000)
    assert not writer._shedding and writer.records_shed > 3000
    assert writer.trail_bytes < 400000 * (audit.SPARE_FILL + audit.CLIENT_SHARE) + 1000
    for _ in range(100):
        assert writer.write_now(CONNECT, "10.0.0.7") is not None
    shed = writer.records_shed
    writer.close()
    notes = [r for r in trail_records(tmp_path) if r["action"] == "audit.shed"]
    assert sum(int(r["count"]) for r in notes) == shed  # type: ignore[call-overload]
    assert covered(trail_records(tmp_path), client="10.0.0.66") + shed == 5000


class _SmallDisk:
    """`os.statvfs` of a filesystem of `size` bytes that the trail in `directory` alone fills."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self.others = 0  # bytes other writers take there

    def __call__(self, path: object) -> os.statvfs_result:
        used = sum(file.stat().st_size for file in self.directory.glob(f"{CURRENT}*"))
        free = max(0, self.size - self.others - used)
        return os.statvfs_result((4096, 1, self.size, free, free, 1000, 1000, 1000, 0, 255))


def test_a_cap_the_disk_cannot_hold_is_lowered_to_what_it_can(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """Session 56's attack (High, availability): the default cap (2.2 GiB) on a trail whose
    disk holds 24 MiB: one client's unique denied names, 2 to 6 MB a second, were written one
    by one (the shares and shedding are measured against the cap, never reached), the disk
    filled, and every client was refused (fail closed) until an operator made room: no file
    was old enough to delete. The cap is lowered to what the trail's filesystem holds, at the
    start and as it fills (`DISK_SHARE`), and files to a part of it; the same flood is shed
    past its share, and another client goes on."""
    disk = 400_000
    monkeypatch.setattr(audit.os, "statvfs", _SmallDisk(tmp_path, disk))
    config = Config()
    with caplog.at_level(logging.WARNING, logger="guardd.audit"):
        writer = opened(tmp_path, max_bytes=config.audit_max_bytes, keep=config.audit_keep,
                        min_age=config.audit_min_age, max_total_bytes=config.audit_size_cap,
                        retry_interval=0, max_pending=10)
    assert writer.max_total_bytes is not None and \
        writer.max_total_bytes <= disk * audit.DISK_SHARE
    assert "does not fit" in caplog.text and "audit.maxTotalBytes" in caplog.text
    flood(writer, 0, 5000)
    assert writer.write_errors == 0 and writer.records_shed > 3000
    for _ in range(100):
        assert writer.write_now(CONNECT, "10.0.0.7") is not None
    writer.close()
    assert sum(file.stat().st_size for file in tmp_path.glob(f"{CURRENT}*")) < disk
    assert verify(tmp_path).ok


def test_a_disk_that_others_fill_lowers_the_cap_as_it_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, when something else fills the trail's disk after the start: the cap goes down
    with what the disk can hold, looked at once a `DISK_CHECK_INTERVAL` as records are
    written."""
    disk = _SmallDisk(tmp_path, 4_000_000)
    monkeypatch.setattr(audit.os, "statvfs", disk)
    monkeypatch.setattr(audit, "DISK_CHECK_INTERVAL", 0.0)
    writer = opened(tmp_path, **{**BIG, "max_total_bytes": 3_000_000})  # type: ignore[arg-type]
    assert writer.max_total_bytes == 3_000_000  # (it fits)
    disk.others = 3_600_000
    flood(writer, 0, 5000)
    assert writer.max_total_bytes is not None and writer.max_total_bytes <= 400_000
    assert writer.write_errors == 0 and writer.records_shed > 3000
    for _ in range(100):
        assert writer.write_now(CONNECT, "10.0.0.7") is not None
    writer.close()
    assert sum(file.stat().st_size for file in tmp_path.glob(f"{CURRENT}*")) < 400_000


def test_a_disk_full_for_a_while_neither_refuses_for_good_nor_deletes_what_keep_keeps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review of the row above (High): the cap only went down, so a disk full for a second
    (a log burst, a backup) left it below what the trail held, and every record was refused
    for the rest of the run, the disk freed or not; and each look while it stayed full took
    another tenth off and deleted aged files that `keep` and the configured cap keep (a week of
    evidence in seven seconds). The cap follows the disk back up, and a file within `keep` goes
    only for the configured cap."""
    disk = _SmallDisk(tmp_path, 4_000_000)
    monkeypatch.setattr(audit.os, "statvfs", disk)
    monkeypatch.setattr(audit, "DISK_CHECK_INTERVAL", 0.0)
    writer = opened(tmp_path, max_bytes=20_000, keep=10, min_age=3600,
                    max_total_bytes=3_000_000, retry_interval=0)
    flood(writer, 0, 600, effect="allow")
    age(tmp_path, 7 * 86_400)
    kept = sorted(tmp_path.glob(f"{CURRENT}.*"))
    assert 3 < len(kept) <= 10
    disk.others = disk.size  # (full)
    for n in range(5):
        allowed = prepared(writer, action="network.request", listener="socks",
                           target=f"full{n}.test:443", effect="allow", matchedRule="a",
                           reason="ok")
        allowed("10.0.0.7")
        writer.flush()
    assert sorted(tmp_path.glob(f"{CURRENT}.*")) == kept  # (none deleted for the full disk)
    disk.others = 0  # (room again)
    writer.flush()
    assert writer.max_total_bytes == 3_000_000 and writer.write_now(CONNECT, "10.0.0.7")
    writer.close()
    assert verify(tmp_path).ok


@pytest.mark.parametrize("filled, tight_at_open", [(False, False), (True, False), (True, True)],
                         ids=["control", "filled", "tight-at-open"])
def test_files_a_disk_full_for_a_while_made_small_push_none_out_of_keep(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, filled: bool,
        tight_at_open: bool) -> None:
    """Session 56's re-attack (Medium): with the disk filled from outside for seconds, the
    lowered cap made the files small, and the ones rotated meanwhile pushed the full files of
    before past `keep` by count: two files of records that `keep` and the configured settings
    keep were deleted. A file is within `keep` while the files newer than it hold no more than
    `keep` files of the configured size (the last attack: of the size the trail opened with,
    the disk nearly full at that moment, the same went)."""
    disk = _SmallDisk(tmp_path, 4_000_000)
    monkeypatch.setattr(audit.os, "statvfs", disk)
    monkeypatch.setattr(audit, "DISK_CHECK_INTERVAL", 0.0)
    disk.others = disk.size - 200_000 if tight_at_open else 0
    writer = opened(tmp_path, max_bytes=20_000, keep=4, min_age=2, max_total_bytes=2_600_000,
                    retry_interval=0)
    disk.others = 0
    flood(writer, 0, 1, effect="allow")  # (the cap back up)
    while len(list(tmp_path.glob(f"{CURRENT}.*"))) < 3 or writer.max_bytes < 20_000:
        flood(writer, 0, 10, effect="allow")
    age(tmp_path, 60)
    first = next(iter(iter_records(tmp_path)))["seq"]
    if filled:
        disk.others = disk.size - 50_000 - writer.trail_bytes  # (50 KB left)
    flood(writer, 1000, 40, effect="allow")
    disk.others = 0
    flood(writer, 2000, 5, effect="allow")
    writer.close()
    assert next(iter(iter_records(tmp_path)))["seq"] == first
    assert verify(tmp_path).ok


def test_a_filesystem_that_tells_no_size_leaves_the_cap_as_it_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The review (Medium): ramfs, a tmpfs of size 0 and some FUSE filesystems say 0 blocks,
    0 free: the cap went to 0 at start and every record was refused, where they had worked."""
    monkeypatch.setattr(audit.os, "statvfs", lambda path: os.statvfs_result(
        (4096, 4096, 0, 0, 0, 0, 0, 0, 0, 255)))
    writer = opened(tmp_path, **BIG)  # type: ignore[arg-type]
    assert writer.max_total_bytes == BIG["max_total_bytes"] and \
        writer.max_bytes == BIG["max_bytes"]
    assert writer.write_now(CONNECT, "10.0.0.7") is not None
    writer.close()


def test_one_clients_allowed_requests_never_take_the_trail_past_the_share_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Session 53's attack (Medium): the budgets past `SPARE_FILL` held only what may be shed;
    one client's allowed requests (0.7 MB of records a second) took the trail to
    `DENIAL_SHARE` alone, and every client was then rationed for the day `min_age` keeps the
    files. Past `SPARE_FILL` in files too young to delete, a client's records that must be
    written spend a budget of its own (`KEEP_SHARE` of the cap): past it, its decisions are
    refused before they are carried out, its lookups too; another client's go on, and what
    went out is written regardless. Once files come of age (a daemon's steady state: a trail
    kept full by old files), no one is refused."""
    monkeypatch.setattr(audit, "SHED_NOTE_INTERVAL", 0.0)  # (files' ages looked at each time)
    writer = opened(tmp_path, **BIG)  # type: ignore[arg-type]
    with pytest.raises(AuditUnavailableError):
        for _ in range(100_000):
            writer.write_now(CONNECT, "10.0.0.66")
    assert not writer._shedding
    assert writer.trail_bytes < 400000 * (audit.SPARE_FILL + audit.KEEP_SHARE) + 1000
    assert not writer.room_for("10.0.0.66")  # (no query of its goes upstream either)
    for _ in range(100):
        assert writer.write_now(CONNECT, "10.0.0.7") is not None
    assert writer.room_for("10.0.0.7")
    refused = writer.records_refused
    writer.write(CONNECT, "10.0.0.66", went_out=True)  # (it went: written all the same)
    assert writer.flush() and writer.records_refused == refused
    notes = [r for r in trail_records(tmp_path) if r["action"] == "audit.shed"]
    assert sum(int(r.get("refused", 0)) for r in notes) == refused  # type: ignore
    age(tmp_path, 7200)
    for _ in range(300):  # (the old files make room, and hold none of the young ones' fill)
        assert writer.write_now(CONNECT, "10.0.0.66") is not None
    writer.close()


def test_an_honest_fleet_below_the_fill_sheds_nothing(tmp_path: Path) -> None:
    """Review (2026-12-06): a budget of everyone's for what may be shed, at any fill, shed 32,218
    of 60,000 answers from the cache of 20 agents with the trail at 0.35% of its cap."""
    writer = opened(tmp_path, **BIG)  # type: ignore[arg-type]
    for n in range(600):
        writer.write(ALLOW, f"10.0.1.{n % 20}", went_out=False)
        if n % 20 == 19:
            assert writer.flush()
    assert writer.records_shed == 0 and writer.trail_bytes < 400000 * audit.SPARE_FILL
    writer.close()


def test_a_folded_denials_repeats_spend_no_budget(tmp_path: Path) -> None:
    """Review (2026-12-06): each repeat of a folded denial was charged a line, so an agent
    retrying one blocked name drained the budget while writing next to nothing."""
    writer = opened(tmp_path, **BIG)  # type: ignore[arg-type]
    n = 0
    while writer.trail_bytes <= 400000 * audit.SPARE_FILL:
        flood(writer, n, 5, effect="allow")
        n += 5
    retry = denial(writer, "telemetry.x.ngrok.io")
    for _ in range(20):  # (20 lines, one a batch; 1,000 decisions)
        for _ in range(50):
            retry("10.0.0.7")
        assert writer.flush()
    assert writer.records_shed == 0
    writer.close()


def test_a_denial_something_went_out_for_is_written_not_shed(tmp_path: Path) -> None:
    """Attack pass: past the share, a connect denied after guardd had looked its name up (at
    a port no rule allows) was shed: the name went upstream, and the trail held none of it."""
    writer = shedding(tmp_path)
    shed = writer.records_shed
    denied = AuditRecord(action="network.request", listener="socks", target="s1.api.test:1",
                         effect="deny", matchedRule="default", reason="no rule allows it")
    writer.write(denied, "10.0.0.7", went_out=True)
    assert writer.write_now(replace(denied, target="s2.api.test:1"), "10.0.0.7",
                            went_out=True) is not None
    writer.write(replace(denied, target="s3.api.test:1"), "10.0.0.7")  # (nothing went out)
    assert writer.flush()
    assert writer.records_shed == shed + 1
    writer.close()
    targets = {r.get("target") for r in trail_records(tmp_path)}
    assert {"s1.api.test:1", "s2.api.test:1"} <= targets and "s3.api.test:1" not in targets


def test_a_record_something_went_out_for_waits_with_the_rest_while_the_trail_is_down(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Final attack of the last stop: with the trail already failing (a full disk), `write_now`
    raised before it queued the record of a name guardd had looked up: the name went out, and
    the trail held none of it once it came back. It now waits with the records before it (the
    answer still does not go: fail closed); one for which nothing went out is not kept, but
    counted as lost (session 56's attack, Low: SOCKS and HTTP refusals in an outage left no
    record, no count and no `audit.dropped` note)."""
    writer = opened(tmp_path, retry_interval=3600)
    real_write = os.write
    fail_writes(monkeypatch)
    writer.write(AuditRecord(action="network.request", target="first.test:443", effect="allow",
                             reason="queued before the outage"), "10.0.0.7")
    assert not writer.flush()  # the trail is down
    looked_up = AuditRecord(action="network.request", listener="socks", target="s1.api.test:1",
                            effect="deny", matchedRule="default", reason="no rule allows it")
    with pytest.raises(AuditUnavailableError):
        writer.write_now(looked_up, "10.0.0.7", went_out=True)
    with pytest.raises(AuditUnavailableError):
        writer.write_now(replace(looked_up, target="s2.api.test:1"), "10.0.0.7")
    monkeypatch.setattr(os, "write", real_write)
    writer._retry_at = 0.0  # the retry interval has passed, the disk has room again
    assert writer.flush()
    writer.close()
    targets = [r.get("target") for r in trail_records(tmp_path)]
    assert "first.test:443" in targets and "s1.api.test:1" in targets
    assert "s2.api.test:1" not in targets and writer.records_dropped == 1
    assert [r["count"] for r in trail_records(tmp_path) if r["action"] == "audit.dropped"] == [1]


def test_past_the_share_no_client_fills_the_rest_alone(tmp_path: Path) -> None:
    """Review: shedding covered denials only. Answers from guardd's cache (nothing left the
    host for them) and allowed connects, as fast as one client makes them, filled the last
    tenth, and every client stalled again. Past the share, answers from the cache are shed
    too, and a client's records may take 1/16 of the room left: past that, its own
    decisions are refused (AuditUnavailableError), no one else's."""
    writer = shedding(tmp_path)
    shed = writer.records_shed
    for _ in range(50):
        writer.write(ALLOW, "10.0.0.66", went_out=False)
        assert writer.flush()
    assert writer.records_shed == shed + 50
    start = writer.trail_bytes
    with pytest.raises(AuditUnavailableError):
        for _ in range(1000):
            writer.write_now(CONNECT, "10.0.0.66")
    took = writer.trail_bytes - start
    assert took <= (400000 - start) / 16 + 200  # (its share of the room, its notes aside)
    assert writer.write_now(CONNECT, "10.0.0.7") is not None  # (another client's share)
    assert writer.records_refused > 0
    writer.close()
    notes = [r for r in trail_records(tmp_path) if r["action"] == "audit.shed"]
    assert sum(int(r.get("refused", 0)) for r in notes) == writer.records_refused  # type: ignore


def test_queries_never_answered_spend_one_budget_however_many_their_sources(
        tmp_path: Path) -> None:
    """Re-attack of attack pass 52: each source of a query never answered (a forged one, or
    one from outside `clients`) had a budget of its own in the trail past `SPARE_FILL`: eight
    forged sources spent everyone's, and every other client's denials were counted in
    `audit.shed` notes, not written, for up to `min_age`. Those sources are no one proven:
    their records spend one budget (`dns.server.OUTSIDE_CLIENTS`'s), as their CPU does."""
    writer = opened(tmp_path, **BIG)  # type: ignore[arg-type]
    n = 0
    while writer.trail_bytes < 400000 * audit.SPARE_FILL:
        flood(writer, n, 5, effect="allow")
        n += 5
    guard = Guard(Policy.from_text(POLICY), writer, Metrics(process=False))
    service = DNSService(guard, AnswerCache(), FakeUpstream(), guard.metrics, lambda c: True)
    for n in range(1600):
        assert service.answer(packet(f"f{n}.x.ngrok.io", n), f"fd00:c1::{n % 8}", False,
                              True) is None  # (forged: a socket bound to loopback)
        if n % 5 == 4:
            writer.flush()
    shed = writer.records_shed
    for n in range(50):
        assert service.answer(packet(f"h{n}.x.ngrok.io", n), "10.0.0.7", False) is not None
        writer.flush()
    assert writer.records_shed == shed  # (the honest client's 50 denials: each written)
    writer.close()
    assert covered(trail_records(tmp_path), client="10.0.0.7") == 50


def test_the_shares_leave_room_however_many_clients(tmp_path: Path) -> None:
    """Review: a fixed share each, 17 clients (or one with 17 addresses) filled the rest; a
    share of the room left never runs it out."""
    writer = shedding(tmp_path)
    for client in range(60):
        for _ in range(200):
            try:
                writer.write_now(CONNECT, f"10.3.0.{client}")
            except AuditUnavailableError:
                assert not writer._pending, "the cap itself, not the client's share"
                break
    assert writer.write_errors == 0
    writer.close()


def test_a_client_past_its_share_sends_no_query_upstream(tmp_path: Path) -> None:
    """Review: an answer that came from upstream must be recorded, and one client's filled
    the rest; now the question is asked before the query goes."""
    writer = shedding(tmp_path)
    while writer.room_for("10.0.0.66"):
        writer.write(ALLOW, "10.0.0.66")
        assert writer.flush()
    assert writer.room_for("10.0.0.7")
    writer.close()


def test_a_clients_share_comes_back_each_window(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass (2026-12-06): past the share, a client's part of the room left never came
    back while shedding lasted (up to `min_age`, a day): a client refused once stayed refused,
    the flood over or not. A share is a window's, a twenty-fourth of `min_age`."""
    writer = shedding(tmp_path)
    while writer.room_for("10.0.0.7"):
        writer.write(ALLOW, "10.0.0.7")
        assert writer.flush()
    later = time.monotonic() + 3600 / 24
    monkeypatch.setattr(time, "monotonic", lambda: later - 1)
    assert not writer.room_for("10.0.0.7")
    monkeypatch.setattr(time, "monotonic", lambda: later)
    assert writer.room_for("10.0.0.7")
    writer.close()


def test_every_query_in_flight_takes_its_room_when_it_is_let_go(tmp_path: Path) -> None:
    """Review: `room_for` took no room, so 250 queries in flight all passed it, and their
    answers, one batch too large for what was left, stalled everyone at the cap."""
    writer = shedding(tmp_path)
    let_go = 0
    while let_go < 250 and writer.room_for("10.0.0.66"):
        let_go += 1
    assert let_go < 250
    assert writer.room_for("10.0.0.7")
    writer.close()
    failing_open = shedding(tmp_path / "open", fail_open=True)  # (availability chosen)
    assert all(failing_open.room_for("10.0.0.66") for _ in range(300))
    failing_open.close()


def test_shed_notes_come_once_an_interval_and_keep_within_the_cap(tmp_path: Path) -> None:
    """Review: every batch after a shed denial wrote a note of its own (hundreds of bytes for
    a denial of tens), and a note written with a batch could take the trail past its cap."""
    writer = shedding(tmp_path)
    writer.flush()
    before = sum(r["action"] == "audit.shed" for r in trail_records(tmp_path))
    for n in range(20):  # a shed denial and an allowed record a batch, within milliseconds
        denial(writer, f"z{n}.x.ngrok.io")("10.0.0.66")
        writer.write(ALLOW, "10.0.0.7")
        writer.flush()
    assert sum(r["action"] == "audit.shed" for r in trail_records(tmp_path)) - before <= 1
    writer.close()
    assert verify(tmp_path).ok


def test_what_only_reports_a_denial_is_never_shed_nor_refused(tmp_path: Path) -> None:
    """Review: a denial only reported lets the request through; from guardd's cache, or by
    a writer failing open, it was shed or refused all the same."""
    writer = shedding(tmp_path)
    shed = writer.records_shed
    reported = AuditRecord(action="dns.query", listener="dns", target="exfil.test", qtype="A",
                           effect="deny", enforced=False, matchedRule="d",
                           reason="report mode: would deny")
    writer.write(reported, "10.0.0.7", went_out=False)
    assert writer.records_shed == shed
    writer.close()
    failing_open = shedding(tmp_path / "open", fail_open=True)
    for _ in range(1000):
        failing_open.write_now(CONNECT, "10.0.0.66")  # (availability chosen: never refused)
    failing_open.close()


async def test_the_shed_timer_goes_not_first_in_a_new_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the timer wrote its note ahead of `audit.reopened` in a file opened anew."""
    monkeypatch.setattr(audit, "SHED_NOTE_INTERVAL", 0.01)
    writer = shedding(tmp_path, retry_interval=5)
    writer.attach(asyncio.get_running_loop())
    os.unlink(tmp_path / CURRENT)
    writer.write(ALLOW, "10.0.0.7")
    writer.flush()  # notices the file vanished; retried in 5 s
    denial(writer, "late.x.ngrok.io")("10.0.0.66")  # shed: the note's timer
    await asyncio.sleep(0.05)
    writer.close()
    assert '"audit.reopened"' in (tmp_path / CURRENT).read_text().splitlines()[0]


async def test_a_file_opened_anew_starts_with_its_reopened_record_whoever_opens_it(
        tmp_path: Path) -> None:
    """Review: an interval checkpoint (or a retention one) opened the new file itself, ahead
    of `audit.reopened`."""
    writer = opened(tmp_path, retry_interval=5)
    writer.attach(asyncio.get_running_loop())
    writer.write(ALLOW, "10.0.0.7")
    writer.flush()
    os.unlink(tmp_path / CURRENT)
    writer.write(ALLOW, "10.0.0.7")
    writer.flush()  # notices the file vanished; retried in 5 s
    writer._interval_checkpoint()
    writer.close()
    assert '"audit.reopened"' in (tmp_path / CURRENT).read_text().splitlines()[0]


def test_a_client_refused_is_served_once_files_come_of_age(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "SHED_NOTE_INTERVAL", 0.0)  # (the look for them, each time)
    writer = shedding(tmp_path)
    with pytest.raises(AuditUnavailableError):
        for _ in range(1000):
            writer.write_now(CONNECT, "10.0.0.66")
    age(tmp_path, 7200)
    assert writer.write_now(CONNECT, "10.0.0.66") is not None
    writer.close()


async def test_shed_notes_keep_to_the_cap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """Review: at the cap itself, where every record waits, a shed note went to the disk
    every second all the same (the trail's own records are never refused), past the cap."""
    monkeypatch.setattr(audit, "SHED_NOTE_INTERVAL", 0.01)
    writer = opened(tmp_path, max_bytes=4000, keep=1, min_age=3600, max_total_bytes=40000,
                    max_pending=10, retry_interval=0)
    writer.attach(asyncio.get_running_loop())
    flood(writer, 0, 400)
    flood(writer, 400, 200, effect="allow")  # to the cap: writes fail now
    for n in range(30):
        for client in range(20):
            denial(writer, f"d{n}-{client}.x.ngrok.io")(f"10.1.{client}.{n}")
        await asyncio.sleep(0.012)
    shed = writer.records_shed
    assert sum(p.stat().st_size for p in tmp_path.glob(f"{CURRENT}*")) <= 40000
    writer.close()  # (what no note had room for is noted then, past the cap by that line)
    notes = [r for r in trail_records(tmp_path) if r["action"] == "audit.shed"]
    assert sum(int(r["count"]) for r in notes) == shed  # type: ignore[call-overload]


async def test_shedding_is_noted_each_second_and_ends_when_files_come_of_age(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audit, "SHED_NOTE_INTERVAL", 0.05)
    writer = opened(tmp_path, max_bytes=4000, keep=1, min_age=3600, max_total_bytes=40000,
                    retry_interval=0)
    writer.attach(asyncio.get_running_loop())
    n = 0
    while not writer._shedding:  # (allowed decisions take it past the share: denials are
        flood(writer, n, 5, effect="allow")  # shed first, `SPARE_SHARE`)
        n += 5
    flood(writer, 0, 50)
    shed = writer.records_shed
    assert shed == 50
    await asyncio.sleep(0.2)
    notes = [r for r in trail_records(tmp_path) if r["action"] == "audit.shed"]
    assert sum(int(r["count"]) for r in notes) == shed  # type: ignore[call-overload]
    age(tmp_path, 7200)
    denial(writer, "late.x.ngrok.io")("10.0.0.66")  # shed, and the timer looks again
    await asyncio.sleep(0.2)
    denial(writer, "after.x.ngrok.io")("10.0.0.66")
    writer.flush()
    writer.close()
    assert writer.records_shed == shed + 1
    assert [r["target"] for r in iter_records(tmp_path) if r.get("target")][-1:] == [
        "after.x.ngrok.io"]
    assert verify(tmp_path).ok


def test_at_the_cap_new_records_are_dropped_not_young_files(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="guardd.audit")
    writer = opened(tmp_path, max_bytes=2000, keep=1, min_age=3600, max_total_bytes=8000,
                    max_pending=10, retry_interval=0)
    write_fields(writer, action="network.request", effect="deny", client="10.0.0.66",
                  target="169.254.169.254:80", reason="metadata endpoint")
    flood(writer, 0, 400, effect="allow")  # (denials would be shed: see above)
    total = sum(p.stat().st_size for p in tmp_path.glob(f"{CURRENT}*"))
    assert total <= 8000
    assert writer.records_dropped > 0 and writer.write_errors > 0
    assert "size cap of 8000 bytes (audit.maxTotalBytes)" in caplog.text
    assert "the minimum age of 3600s (audit.minAge)" in caplog.text
    first = next(iter(iter_records(tmp_path)))
    assert first["target"] == "169.254.169.254:80"  # the evidence stays
    dropped = writer.records_dropped

    age(tmp_path, 7200)  # time passes: the oldest files may go now
    flood(writer, 400, 5, effect="allow")
    writer.close()
    records = trail_records(tmp_path)
    notes = [r for r in records if r["action"] == "audit.dropped"]
    assert covered(notes) == dropped
    assert [r["target"] for r in records if r.get("target")][-5:] == [
        f"n{n}.x.ngrok.io" for n in range(400, 405)]
    report = verify(tmp_path)
    assert report.ok, report.first_error


@pytest.mark.parametrize(("options", "message"), [
    ({"min_age": -1}, "audit min_age must be at least 0"),
    ({"checkpoint_interval": -1}, "audit checkpoint_interval must be at least 0"),
    ({"max_bytes": 1000, "keep": 3, "max_total_bytes": 4999},
     "audit max_total_bytes must be at least 5000 .max_bytes times .keep \\+ 2.."),
], ids=["min_age", "checkpoint_interval", "cap-below-keep"])
def test_rejects_nonsense_retention(tmp_path: Path, options: dict[str, int], message: str) -> None:
    with pytest.raises(AuditError, match=message):
        AuditWriter(tmp_path, **options)  # type: ignore[arg-type]


# --- checkpoints and the anchor -----------------------------------------------------------------

async def test_checkpoints_every_interval_while_records_are_written(tmp_path: Path) -> None:
    writer = opened(tmp_path, checkpoint_interval=0.05)
    writer.attach(asyncio.get_running_loop())
    write_fields(writer, action="dns.query", effect="allow", client="10.0.0.1")
    await writer.flushed()
    await asyncio.sleep(0.15)
    checkpoints = [r for r in trail_records(tmp_path) if r["action"] == "audit.checkpoint"]
    assert [r["reason"] for r in checkpoints] == ["interval"]  # idle: no more
    anchors = [json.loads(line) for line in lines_of(tmp_path / ANCHOR)]
    assert [(a["seq"], a["reason"]) for a in anchors] == [(0, "start"), (1, "interval")]
    writer.close()
    assert [json.loads(line)["reason"] for line in lines_of(tmp_path / ANCHOR)] == [
        "start", "interval", "shutdown"]


def test_the_anchor_can_live_elsewhere(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped" / "guardd.anchor"
    shipped.parent.mkdir()
    writer = opened(tmp_path / "trail", anchor=shipped)
    write_fields(writer, action="dns.query", effect="allow")
    writer.close()
    assert not (tmp_path / "trail" / ANCHOR).exists()
    assert len(lines_of(shipped)) == 2  # (the run's first record, its shutdown checkpoint)
    report = verify(tmp_path / "trail", anchor=shipped)
    assert report.ok and report.anchored == 2


def test_metrics_show_compaction_and_the_trail_size(tmp_path: Path) -> None:
    writer = opened(tmp_path)
    metrics = Metrics(process=False)
    metrics.watch_audit(writer)
    deny = denial(writer)
    for _ in range(4):
        deny("10.0.0.1")
    writer.flush()
    value = metrics.registry.get_sample_value
    assert value("guardd_audit_records_total") == 2
    assert value("guardd_audit_records_compacted_total") == 2
    assert value("guardd_audit_trail_bytes") == (tmp_path / CURRENT).stat().st_size
    writer.close()
