"""Audit trail tampering that `verify` must report (issue 8, hole 12): records cut off the end, a
truncated or deleted newest file, a deleted oldest file, the head of a never-rotated trail
removed, forged lines in the middle; and the neighbouring cases it must still accept (retention,
crashes). Files only, no sockets."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from guardd import audit
from guardd.audit import ANCHOR, CURRENT, AuditWriter, verify
from tests.unit.fakes import write_fields

Tamper = Callable[[Path], None]


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(line + b"\n" for line in lines))


def write_trail(directory: Path, count: int, *, close: bool = True, text: str = "record",
                **options: object) -> None:
    """`count` records from distinct clients, one flush each, then (`close`) a clean stop, or
    (not `close`) the end a kill leaves: no checkpoint, the lock let go."""
    writer = AuditWriter(directory, **options)  # type: ignore[arg-type]
    writer.open()
    for n in range(count):
        write_fields(writer, action="network.request", effect="allow", client=f"10.0.0.{n % 250}",
                      target=f"host{n}.example.com:443", reason=f"{text} {n}")
        writer.flush()
    if close:
        writer.close()
    else:
        writer._release_lock()  # (as the end of its process does)


@pytest.fixture
def rotated(tmp_path: Path) -> Path:
    """A closed trail that rotated often and was pruned by retention (keep=3)."""
    write_trail(tmp_path, 80, max_bytes=1500, keep=3)
    assert sorted(p.name for p in tmp_path.glob("audit.jsonl*")) == [
        CURRENT, f"{CURRENT}.1", f"{CURRENT}.2", f"{CURRENT}.3"]
    return tmp_path


@pytest.fixture
def single(tmp_path: Path) -> Path:
    """A closed trail that never rotated."""
    write_trail(tmp_path, 20)
    assert not list(tmp_path.glob("audit.jsonl.*"))
    return tmp_path


def drop_last(count: int) -> Tamper:
    def tamper(directory: Path) -> None:
        rewrite(directory / CURRENT, lines_of(directory / CURRENT)[:-count])
    return tamper


def cut_bytes(keep_fraction: float) -> Tamper:
    """Truncate the newest file, usually in the middle of a line."""
    def tamper(directory: Path) -> None:
        data = (directory / CURRENT).read_bytes()
        (directory / CURRENT).write_bytes(data[:int(len(data) * keep_fraction)])
    return tamper


def delete(name: str) -> Tamper:
    return lambda directory: (directory / name).unlink()


def drop_first(count: int, name: str = CURRENT) -> Tamper:
    def tamper(directory: Path) -> None:
        rewrite(directory / name, lines_of(directory / name)[count:])
    return tamper


def insert(at: int, line: bytes, name: str = CURRENT) -> Tamper:
    def tamper(directory: Path) -> None:
        lines = lines_of(directory / name)
        rewrite(directory / name, [*lines[:at], line, *lines[at:]])
    return tamper


def replace_line(at: int, line: bytes, name: str = CURRENT) -> Tamper:
    def tamper(directory: Path) -> None:
        lines = lines_of(directory / name)
        lines[at] = line
        rewrite(directory / name, lines)
    return tamper


def duplicate(at: int, name: str = CURRENT) -> Tamper:
    def tamper(directory: Path) -> None:
        lines = lines_of(directory / name)
        rewrite(directory / name, [*lines[:at + 1], lines[at], *lines[at + 1:]])
    return tamper


def swap(first: str, second: str) -> Tamper:
    def tamper(directory: Path) -> None:
        (directory / first).rename(directory / "swap")
        (directory / second).rename(directory / first)
        (directory / "swap").rename(directory / second)
    return tamper


def delete_rotated(directory: Path) -> None:
    for path in directory.glob("audit.jsonl.*"):
        path.unlink()


def rewrite_whole_trail(directory: Path) -> None:
    """Replace every file by a freshly written trail of different records (same anchor)."""
    anchor = (directory / ANCHOR).read_bytes()
    for path in directory.iterdir():
        path.unlink()
    write_trail(directory, 80, text="forged", max_bytes=1500, keep=3,
                anchor=directory / "other-anchor.jsonl")
    (directory / "other-anchor.jsonl").unlink()
    (directory / ANCHOR).write_bytes(anchor)


REPORTED: list[tuple[str, str, Tamper, str]] = [
    # (fixture, id, tamper, what first_error must say)
    ("rotated", "last-record-deleted", drop_last(1), r"removed from the end"),
    ("rotated", "last-records-deleted", drop_last(3), r"removed from the end"),
    ("single", "last-record-deleted-never-rotated", drop_last(1), r"removed from the end"),
    ("rotated", "newest-file-truncated-mid-line", cut_bytes(0.5), r"removed from the end"),
    ("rotated", "newest-file-truncated-to-one-byte",
     lambda d: (d / CURRENT).write_bytes((d / CURRENT).read_bytes()[:1]), r"removed from the end"),
    ("rotated", "newest-file-emptied", cut_bytes(0), r"removed from the end"),
    ("rotated", "newest-file-deleted", delete(CURRENT), r"removed from the end"),
    ("rotated", "oldest-file-deleted", delete(f"{CURRENT}.3"),
     r"^audit\.jsonl\.2:1: records \d+\.\.\d+ are missing before the first record"),
    ("rotated", "all-rotated-files-deleted", delete_rotated,
     r"^audit\.jsonl:1: records \d+\.\.\d+ are missing before the first record"),
    ("rotated", "head-of-oldest-file-removed", drop_first(2, f"{CURRENT}.3"),
     r"^audit\.jsonl\.3:1: records \d+\.\.\d+ are missing before the first record"),
    ("single", "head-of-never-rotated-trail-removed", drop_first(3),
     r"^audit\.jsonl:1: the trail starts at seq 3, but no anchored checkpoint says retention "
     r"pruned"),
    ("single", "first-record-removed", drop_first(1),
     r"^audit\.jsonl:1: the trail starts at seq 1, but no anchored checkpoint says retention "
     r"pruned"),
    ("single", "array-line-in-the-middle", insert(5, b"[1, 2, 3]"),
     r"^audit\.jsonl:6: JSON, but not a record"),
    ("single", "string-line-in-the-middle", insert(5, b'"{\\"timestamp\\":\\"x\\"}"'),
     r"^audit\.jsonl:6: JSON, but not a record"),
    ("single", "number-line-in-the-middle", insert(5, b"42"), r"^audit\.jsonl:6: JSON, but not"),
    ("single", "null-line-in-the-middle", insert(5, b"null"), r"^audit\.jsonl:6: JSON, but not"),
    ("single", "empty-line-in-the-middle", insert(5, b""),
     r"^audit\.jsonl:6: neither a record nor a torn write"),
    ("single", "garbage-line-in-the-middle", insert(5, b"hello \x1b[2J"),
     r"^audit\.jsonl:6: neither a record nor a torn write"),
    ("single", "suffix-of-a-record-in-the-middle", insert(5, b'"target":"x"}'),
     r"^audit\.jsonl:6: neither a record nor a torn write"),
    ("single", "record-replaced-by-array", replace_line(5, b"[]"),
     r"^audit\.jsonl:6: JSON, but not a record"),
    ("single", "record-replayed", duplicate(5), r"^audit\.jsonl:7: seq 5 follows seq 5"),
    ("single", "record-removed-in-the-middle", lambda d: rewrite(
        d / CURRENT, [line for n, line in enumerate(lines_of(d / CURRENT)) if n != 5]),
     r"^audit\.jsonl:6: seq 6 follows seq 4 \(audit\.jsonl:5\): record 5 is missing"),
    ("rotated", "rotated-files-swapped", swap(f"{CURRENT}.1", f"{CURRENT}.2"),
     r"^audit\.jsonl\.2:1: seq \d+ follows seq \d+"),
    ("rotated", "whole-trail-rewritten", rewrite_whole_trail,
     r"does not match the anchor \(anchor\.jsonl:\d+\): the record was changed or the trail "
     r"rewritten"),
]


@pytest.mark.parametrize(("fixture", "tamper", "error"),
                         [case[0:1] + case[2:] for case in REPORTED],
                         ids=[case[1] for case in REPORTED])
def test_verify_reports(request: pytest.FixtureRequest, fixture: str, tamper: Tamper,
                        error: str) -> None:
    directory: Path = request.getfixturevalue(fixture)
    report = verify(directory)
    assert report.ok, report
    tamper(directory)
    report = verify(directory)
    assert not report.ok
    assert report.first_error is not None
    assert re.search(error, report.first_error), report.first_error


def test_a_shipped_anchor_catches_a_tail_cut_from_trail_and_local_anchor(rotated: Path,
                                                                        tmp_path_factory:
                                                                        pytest.TempPathFactory
                                                                        ) -> None:
    shipped = tmp_path_factory.mktemp("elsewhere") / "anchor.jsonl"
    shutil.copy(rotated / ANCHOR, shipped)
    drop_last(4)(rotated)
    rewrite(rotated / ANCHOR, lines_of(rotated / ANCHOR)[:-1])  # the local copy, cut to match
    assert verify(rotated).ok  # the local anchor was cut too: only the shipped one can tell
    report = verify(rotated, anchor=shipped)
    assert not report.ok and "removed from the end" in str(report.first_error)


ACCEPTED: list[tuple[str, str, Tamper, str | None]] = [
    # (fixture, id, change, the warning verify must give, if any)
    ("single", "crash-tore-the-last-line", lambda d: (d / CURRENT).open("ab").write(
        lines_of(d / CURRENT)[0][:50]), r"audit\.jsonl:22: torn line at the end of the trail"),
    ("rotated", "pruned-by-retention", lambda d: None, None),
]


@pytest.mark.parametrize(("fixture", "change", "warning"), [c[0:1] + c[2:] for c in ACCEPTED],
                         ids=[c[1] for c in ACCEPTED])
def test_verify_accepts(request: pytest.FixtureRequest, fixture: str, change: Tamper,
                        warning: str | None) -> None:
    directory: Path = request.getfixturevalue(fixture)
    change(directory)
    report = verify(directory)
    assert report.ok, report.first_error
    if warning is None:
        assert report.warnings == ()
    else:
        assert any(re.search(warning, w) for w in report.warnings), report.warnings


def test_a_torn_line_in_the_middle_is_accepted_only_where_a_crash_leaves_one(tmp_path: Path
                                                                             ) -> None:
    write_trail(tmp_path, 5)
    path = tmp_path / CURRENT
    with path.open("ab") as file:  # the daemon died in the middle of a write...
        file.write(START_TORN)  # (its start's policy record: the first it writes)
    write_trail(tmp_path, 5)  # ...and started again
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert [w for w in report.warnings if "torn" in w] == [
        "audit.jsonl:7: torn line (a write cut short, e.g. by a crash) skipped; the chain "
        "continues past it"]


def test_every_record_has_a_sequence_number_from_genesis(single: Path) -> None:
    records = [json.loads(line) for line in lines_of(single / CURRENT)]
    assert [r["seq"] for r in records] == list(range(len(records)))
    assert records[-1]["action"] == "audit.checkpoint" and records[-1]["reason"] == "shutdown"
    anchors = [json.loads(line) for line in lines_of(single / ANCHOR)]
    assert anchors[-1]["seq"] == records[-1]["seq"]


def test_retention_writes_what_it_pruned_into_the_trail(rotated: Path) -> None:
    oldest = json.loads(lines_of(rotated / f"{CURRENT}.3")[0])
    checkpoints = [json.loads(line) for line in lines_of(rotated / CURRENT)
                   if b'"audit.checkpoint"' in line]
    pruning = [c for c in checkpoints if "prunedThrough" in c]
    assert pruning, checkpoints
    assert pruning[-1]["prunedThrough"] == oldest["seq"] - 1
    assert pruning[-1]["prunedHead"] == oldest["prev"]


def test_a_running_trail_says_that_its_newest_records_are_not_anchored_yet(tmp_path: Path
                                                                          ) -> None:
    write_trail(tmp_path, 5, close=False)
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert report.warnings == (  # (the anchor holds the run's first record)
        "audit.jsonl:5: the trail does not end with a shutdown checkpoint: guardd is running or "
        "was killed, or records after the last checkpoint were removed (5 records at the end are "
        "not anchored yet)",)


def legacy_lines(count: int) -> list[bytes]:
    """Records as a guardd before sequence numbers wrote them."""
    lines, prev = [], "0" * 64
    for n in range(count):
        line = json.dumps({"timestamp": "2026-02-13T10:15:33.221Z", "action": "dns.query",
                           "effect": "deny", "reason": f"old {n}", "prev": prev},
                          separators=(",", ":")).encode()
        prev = hashlib.sha256(line).hexdigest()
        lines.append(line)
    return lines


def test_a_trail_from_before_sequence_numbers_is_continued_and_still_verifies(tmp_path: Path
                                                                            ) -> None:
    rewrite(tmp_path / CURRENT, legacy_lines(4))
    write_trail(tmp_path, 3)
    records = [json.loads(line) for line in lines_of(tmp_path / CURRENT)]
    assert ["seq" in r for r in records] == [False] * 4 + [True] * 4
    assert records[4]["seq"] == 0 and records[4]["prev"] == hashlib.sha256(
        lines_of(tmp_path / CURRENT)[3]).hexdigest()
    report = verify(tmp_path)
    assert report.ok and report.warnings == (), report
    rewrite(tmp_path / CURRENT, lines_of(tmp_path / CURRENT)[1:])  # legacy head removed
    report = verify(tmp_path)
    assert report.ok  # as before sequence numbers: visible, not provable
    assert report.warnings == ("audit.jsonl:1: the trail starts mid-chain (older records were "
                               "rotated away before guardd numbered them), so the first "
                               "record's prev cannot be checked",)


def test_a_deletion_cut_short_after_its_checkpoint_is_accepted(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch
                                                               ) -> None:
    """Retention writes what it prunes before it deletes: a crash in between leaves a file that
    was declared pruned, which is no tampering."""
    writer = AuditWriter(tmp_path, max_bytes=1500, keep=1, retry_interval=0)
    writer.open()
    real_unlink = Path.unlink
    unlinks: list[Path] = []

    def dying_unlink(path: Path, missing_ok: bool = False) -> None:
        unlinks.append(path)
        if len(unlinks) == 2:  # the second pruning: not the genesis file
            raise OSError("the daemon died here")
        real_unlink(path, missing_ok)

    monkeypatch.setattr(Path, "unlink", dying_unlink)
    n = 0
    while len(unlinks) < 2:
        write_fields(writer, action="dns.query", effect="allow", client="10.0.0.1", reason=f"r{n}")
        writer.flush()
        n += 1
    writer.close()
    assert writer.write_errors == 1
    assert sorted(p.name for p in tmp_path.glob(f"{CURRENT}*")) == [
        CURRENT, f"{CURRENT}.1", f"{CURRENT}.2"]
    report = verify(tmp_path)
    assert report.ok, report.first_error
    through = json.loads(lines_of(tmp_path / CURRENT)[0])["prunedThrough"]
    assert [w for w in report.warnings if "cut short" in w] == [
        f"audit.jsonl.2:1: retention pruned up to seq {through} (audit.jsonl:1), but the trail "
        f"still starts at seq {report.first_seq} (a deletion was cut short)"]


def with_hash(line: bytes, sha: str) -> bytes:
    return json.dumps(json.loads(line) | {"sha256": sha}).encode()


@pytest.mark.parametrize(("change", "result"), [
    (lambda lines: [*lines[:-1], lines[-1][:20]], "warning: anchor.jsonl:{n}: torn anchor entry"),
    (lambda lines: [*lines[:-1], with_hash(lines[-1], "f" * 64)],
     "error: audit.jsonl:{n_trail}: seq \\d+ does not match the anchor \\(anchor.jsonl:{n}\\)"),
    (lambda lines: [*lines, b"[]"], "error: anchor.jsonl:{n1}: not an anchor entry"),
    (lambda lines: [*lines, with_hash(lines[0], "0" * 64)],
     "error: anchor.jsonl:{n1}: seq \\d+ was anchored before with another hash"),
], ids=["torn-last-entry", "entry-hash-changed", "forged-entry", "second-hash-for-a-seq"])
def test_a_changed_anchor_is_reported(single: Path, change: Callable[[list[bytes]], list[bytes]],
                                      result: str) -> None:
    anchor = single / ANCHOR
    lines = lines_of(anchor)
    rewrite(anchor, change(lines))
    report = verify(single)
    kind, _, pattern = result.format(n=len(lines), n1=len(lines) + 1,
                                     n_trail=len(lines_of(single / CURRENT))).partition(": ")
    if kind == "warning":
        assert report.ok and any(re.match(pattern, w) for w in report.warnings), report
    else:
        assert not report.ok and re.match(pattern, str(report.first_error)), report


def forged_checkpoint(after: bytes, through: int, head: str) -> bytes:
    """A shutdown checkpoint chained to the line `after`, saying retention pruned records up to
    `through` (whose hash is `head`): what anyone who can write the trail can append."""
    return json.dumps({"timestamp": "2026-12-06T00:00:00.000Z", "action": "audit.checkpoint",
                       "reason": "shutdown", "prunedThrough": through, "prunedHead": head,
                       "seq": json.loads(after)["seq"] + 1,
                       "prev": hashlib.sha256(after).hexdigest()},
                      separators=(",", ":")).encode()


def test_a_shipped_anchor_catches_old_files_deleted_behind_a_forged_pruning_checkpoint(
        rotated: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Attack pass (2026-12-06): the oldest files deleted, and a checkpoint appended that says
    retention pruned them, passed `verify --anchor` with the shipped anchor (the trail's start
    was taken on the word of any checkpoint); so did the whole trail erased and replaced by
    that one line. With an anchor, only an anchored checkpoint says what retention pruned."""
    shipped = tmp_path_factory.mktemp("elsewhere") / "anchor.jsonl"
    shutil.copy(rotated / ANCHOR, shipped)
    assert verify(rotated, anchor=shipped).ok
    kept = json.loads(lines_of(rotated / f"{CURRENT}.2")[0])
    (rotated / f"{CURRENT}.3").unlink()
    forged = forged_checkpoint(lines_of(rotated / CURRENT)[-1], kept["seq"] - 1, kept["prev"])
    (rotated / CURRENT).open("ab").write(forged + b"\n")
    assert not verify(rotated).ok  # (the local anchor has no entry for it)
    (rotated / ANCHOR).open("ab").write(json.dumps({  # (nor can it tell one forged with it)
        "seq": json.loads(forged)["seq"], "sha256": hashlib.sha256(forged).hexdigest()}
        ).encode() + b"\n")
    assert verify(rotated).ok
    report = verify(rotated, anchor=shipped)
    assert not report.ok and "no anchored checkpoint" in str(report.first_error), report
    newest = json.loads(lines_of(shipped)[-1])
    for path in rotated.glob(f"{CURRENT}*"):
        path.unlink()
    (rotated / CURRENT).write_bytes(json.dumps(
        {"action": "audit.checkpoint", "reason": "shutdown", "prunedThrough": newest["seq"],
         "prunedHead": newest["sha256"], "seq": newest["seq"] + 1, "prev": newest["sha256"]},
        separators=(",", ":")).encode() + b"\n")
    report = verify(rotated, anchor=shipped)
    assert not report.ok and "no anchored checkpoint" in str(report.first_error), report


def test_an_anchor_entry_torn_by_a_full_disk_is_followed_by_whole_ones(tmp_path: Path) -> None:
    """Attack pass (2026-12-06): a checkpoint's anchor entry cut short by a full disk left the
    anchor without its newline, the next entry went on the same line, and verify said "the
    anchor was changed" from then on. The next entry starts a line of its own, and a torn entry
    anywhere is a warning."""
    write_trail(tmp_path, 5)
    anchor = tmp_path / ANCHOR
    whole = anchor.read_bytes()
    anchor.write_bytes(whole[:-10])  # (the last entry, torn)
    for _ in range(2):  # (restarts: their checkpoints append to the anchor)
        write_trail(tmp_path, 5)
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert report.anchored == 5  # (each run's first record, the restarts' shutdown checkpoints)
    torn = len(whole.splitlines())
    assert [w for w in report.warnings if "torn anchor entry" in w] == [
        f"anchor.jsonl:{torn}: torn anchor entry (a write cut short) skipped"]


def test_a_line_that_poses_as_a_torn_write_is_reported(single: Path) -> None:
    """Attack pass (2026-12-06): a forged record left unclosed, as a torn write is, in the
    middle of the trail (an allowed connect to grep and less) passed verify with a warning.
    A torn line is taken only before the record the writer writes after one."""
    lines = lines_of(single / CURRENT)
    planted = b'{"timestamp":"2026-12-06T00:00:00.000Z","action":"network.request",' \
              b'"client":"10.6.6.6","target":"planted.evil:443","effect":"allow"'
    rewrite(single / CURRENT, [*lines[:5], planted, *lines[5:]])
    report = verify(single)
    assert not report.ok and str(report.first_error).startswith(
        "audit.jsonl:6: looks like a write cut short, but the record after it (audit.jsonl:7) "
        "does not say one was"), report


def test_no_file_is_deleted_behind_a_checkpoint_the_anchor_does_not_hold(tmp_path: Path) -> None:
    """Review (2026-12-06): retention deleted files behind a checkpoint whose anchor entry could
    not be written, and verify, which now takes only anchored checkpoints' word for what was
    pruned, said the checkpoint was forged. Without its anchor entry nothing is deleted: the
    records wait, as at a full disk, and go once the anchor can be written."""
    writer = AuditWriter(tmp_path, max_bytes=1500, keep=1, retry_interval=0)
    writer.open()
    anchor = tmp_path / ANCHOR
    saved = anchor.read_bytes()
    anchor.unlink()
    anchor.mkdir()  # (no entry can be appended to it)
    n, written = 0, True
    while written:
        write_fields(writer, action="dns.query", effect="allow", client="10.0.0.1", reason=f"r{n}")
        written = writer.flush()
        n += 1
        assert n < 100, "nothing was deleted, and nothing refused"
    assert len(list(tmp_path.glob(f"{CURRENT}.*"))) > writer.keep  # (kept, none deleted)
    anchor.rmdir()
    anchor.write_bytes(saved)
    write_fields(writer, action="dns.query", effect="allow", client="10.0.0.1", reason="after")
    assert writer.flush()
    writer.close()
    report = verify(tmp_path)
    assert report.ok, report.first_error


def test_a_torn_line_a_writer_before_torn_notes_left_is_still_accepted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Review (2026-12-06): the writer before `audit.torn` notes went on after a crash with its
    start's `audit.policy` record; verify called the torn line an insertion, a false alarm on
    every trail it wrote until pruned."""
    write_trail(tmp_path, 5)
    path = tmp_path / CURRENT
    with path.open("ab") as file:  # the daemon died in the middle of a write...
        file.write(START_TORN)
    writer = AuditWriter(tmp_path)
    writer.open()
    writer._torn = False  # (...and that writer, started again, wrote no note, and its
    with monkeypatch.context() as old:  # records do not say it notes them)
        old.setattr(audit, "NOTES_TORN", "unknown")
        writer.note_policies("loaded at start", {"default": {"policy.yaml": "0" * 64}})
    writer.close()
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert [w for w in report.warnings if "torn" in w] == [
        "audit.jsonl:7: torn line (a write cut short, e.g. by a crash) skipped; the chain "
        "continues past it"]


PLANTED = b'{"timestamp":"2026-12-06T00:00:00.000Z","action":"network.request",' \
          b'"client":"10.6.6.6","target":"planted.evil:443","effect":"allow"'


def trail_with_policy_note(directory: Path, count: int, reason: str
                           ) -> tuple[Path, list[bytes], int]:
    """`count` records, then a writer's `audit.policy` note for `reason`: the trail's file,
    its lines, and where the note is among them."""
    write_trail(directory, count)
    writer = AuditWriter(directory)
    writer.open()
    writer.note_policies(reason, {"default": {"policy.yaml": "0" * 64}})
    writer.close()
    path = directory / CURRENT
    lines = lines_of(path)
    return path, lines, next(n for n, line in enumerate(lines) if reason.encode() in line)


def test_torn_lines_are_taken_only_as_the_writer_leaves_them(tmp_path: Path) -> None:
    """Attack pass 48: only the last of several torn-looking lines was held against
    the record after them, so a forged one followed by a lone `{` (which any record starts
    with) passed verify, anywhere; as did any number before a reload's `audit.policy` record.
    One torn line goes before the writer's note of it, or before a start's `audit.policy` (a
    writer from before the notes); more only when each is the next record, written again."""
    path, lines, reload = trail_with_policy_note(tmp_path, 4, "reloaded")
    for planted in ([PLANTED, b"{"], [PLANTED, lines[3][:50]]):
        rewrite(path, [*lines[:3], *planted, *lines[3:]])
        report = verify(tmp_path)
        assert not report.ok and "the line was inserted" in str(report.first_error), report
    rewrite(path, [*lines[:reload], PLANTED, *lines[reload:]])
    report = verify(tmp_path)
    assert not report.ok and str(report.first_error).startswith(
        f"audit.jsonl:{reload + 1}: looks like a write cut short"), report
    rewrite(path, [*lines[:3], lines[3][:20], lines[3][:50], *lines[3:]])  # (a retry's)
    report = verify(tmp_path)
    assert report.ok, report.first_error


def test_torn_notes_torn_again_by_a_full_disk_are_accepted(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """A full disk may cut the writer's note of a torn line short too, more than once: each
    such line is that note, at another time."""
    now = [1_800_000_000.0]
    writer = AuditWriter(tmp_path, retry_interval=0)
    writer._clock = lambda: now[0]  # type: ignore[method-assign]
    writer.open()
    real_write = os.write
    cuts = iter([60, 70, 45])

    def short_write(fd: int, data: bytes) -> int:
        cut = next(cuts, None)
        if cut is None:
            monkeypatch.setattr(os, "write", real_write)
            return real_write(fd, data)
        return real_write(fd, data[:cut])

    write_fields(writer, action="network.request", effect="allow", client="10.0.0.1",
                 reason="before")
    writer.flush()
    monkeypatch.setattr(os, "write", short_write)
    for n in range(4):
        write_fields(writer, action="network.request", effect="allow", client="10.0.0.1",
                     reason=f"record {n}")
        writer.flush()
        now[0] += 1.5  # (each note written again later)
    writer.close()
    torn = [line for line in lines_of(tmp_path / CURRENT) if not line.endswith(b"}")]
    assert len(torn) == 3, torn
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert len([w for w in report.warnings if "torn line" in w]) == 3
    rewrite(tmp_path / CURRENT, [PLANTED if line == torn[1] else line
                                 for line in lines_of(tmp_path / CURRENT)])
    report = verify(tmp_path)
    assert not report.ok and "the line was inserted" in str(report.first_error), report


def test_a_torn_line_before_a_start_of_this_writer_is_reported(tmp_path: Path) -> None:
    """Re-attack of attack pass 48: a torn line before any "loaded at start" record passed,
    and every trail has one at each start. This writer notes a torn line (`audit.torn`)
    before its start's record, which says so (`notesTorn`): only a writer from before the
    notes, whose records do not say so, leaves one there."""
    path, lines, start = trail_with_policy_note(tmp_path, 3, "loaded at start")
    rewrite(path, [*lines[:start], PLANTED, *lines[start:]])
    report = verify(tmp_path)
    assert not report.ok and "the line was inserted" in str(report.first_error), report


START_TORN = b'{"timestamp":"2026-12-06T00:00:00.000Z","action":"audit.policy","reason":"loaded ' \
             b'at start","notesTorn":tr'


def test_nothing_looks_torn_after_a_clean_stop_but_a_start_cut_short(tmp_path: Path) -> None:
    """Final re-attack of attack pass 48: forged lines left unclosed after the last record
    passed with a warning each, even after a clean stop's anchored checkpoint; and guardd's
    next start, finding the file ending inside a line, noted the forged one as torn. After a
    shutdown checkpoint a writer writes first its start's `audit.policy`: only that, cut
    short, may look torn there (a crash at the start). Past one torn line at the end, only
    the writer's note of it, cut short again, may follow."""
    write_trail(tmp_path, 3)
    path, anchor = tmp_path / CURRENT, tmp_path / ANCHOR
    stopped, anchored = path.read_bytes(), anchor.read_bytes()
    for appended in (PLANTED, START_TORN + b"\n" + PLANTED):
        path.write_bytes(stopped + appended)
        anchor.write_bytes(anchored)
        report = verify(tmp_path)
        assert not report.ok and "the line was inserted" in str(report.first_error), report
        write_trail(tmp_path, 1)  # (a start notes it as torn: still an insertion)
        report = verify(tmp_path)
        assert not report.ok and "the line was inserted" in str(report.first_error), report
    path.write_bytes(stopped + START_TORN)  # (a start cut short by a crash, then a start)
    anchor.write_bytes(anchored)
    write_trail(tmp_path, 1)
    report = verify(tmp_path)
    assert report.ok, report.first_error


def test_a_torn_note_that_runs_on_past_its_fields_is_an_insertion(tmp_path: Path) -> None:
    """Netns attack after the read-through: lines that began as the writer's `audit.torn`
    note (or as the note itself) and ran on with an allowed connect's fields passed, at the
    end of a trail and before a real note. Only the note cut short is taken."""
    write_trail(tmp_path, 3, close=False)
    path = tmp_path / CURRENT
    running = path.read_bytes()
    note = b'{"timestamp":"2026-12-06T19:30:01.000Z","action":"audit.torn"'
    forged = note + b',"target":"exfil.ngrok.io:443","effect":"allow"'
    path.write_bytes(running + PLANTED + b"\n" + forged)
    report = verify(tmp_path)
    assert not report.ok and "the line was inserted" in str(report.first_error), report
    stopped = tmp_path / "stopped"
    write_trail(stopped, 3)
    path = stopped / CURRENT
    path.write_bytes(path.read_bytes() + START_TORN)  # (a crash, then a start's note of it)
    write_trail(stopped, 1)
    lines = lines_of(path)
    at = next(n for n, line in enumerate(lines) if b'"audit.torn"' in line)
    rewrite(path, [*lines[:at], lines[at] + b',"effect":"allow"', *lines[at:]])
    report = verify(stopped)
    assert not report.ok and "the line was inserted" in str(report.first_error), report


def rechained(before: bytes, records: list[dict[str, object]]) -> list[bytes]:
    """`records` as lines chained after the line `before`, numbered on from it: what anyone who
    can write the trail can make of its unanchored end (SHA-256 takes no key)."""
    lines, seq, prev = [], json.loads(before)["seq"], before
    for record in records:
        seq += 1
        line = json.dumps({**record, "seq": seq, "prev": hashlib.sha256(prev).hexdigest()},
                          separators=(",", ":")).encode()
        lines.append(line)
        prev = line
    return lines


def killed_after_a_clean_run(directory: Path) -> tuple[Path, list[bytes], int]:
    """A trail: a run stopped cleanly (its shutdown checkpoint anchored), then a run of three
    records killed; its file, lines, and the index of the first line the kill left unanchored."""
    write_trail(directory, 2)
    path = directory / CURRENT
    anchored = len(lines_of(path))
    write_trail(directory, 3, close=False, text="killed")
    return path, lines_of(path), anchored


def test_a_forged_shutdown_checkpoint_does_not_hide_an_unanchored_end(tmp_path: Path) -> None:
    """Attack pass 49: after a kill, the end of the trail no checkpoint anchored was rewritten
    (a denial removed) and a shutdown checkpoint appended, chained: verify said the trail was
    intact with no warning, as after a clean stop. With an anchor, only a shutdown checkpoint
    the anchor holds says the run stopped cleanly."""
    path, lines, _ = killed_after_a_clean_run(tmp_path)
    kept = [json.loads(line) for line in lines[-3:] if b"killed 1" not in line]
    forged = rechained(lines[-4], [*kept, {"action": "audit.checkpoint", "reason": "shutdown"}])
    rewrite(path, [*lines[:-3], *forged])
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert any("the anchor does not hold the one there" in warning and "2 records at the end "
               "are not anchored" in warning for warning in report.warnings), report.warnings


def test_a_start_after_a_kill_says_the_killed_runs_unanchored_end_could_be_changed(
        tmp_path: Path) -> None:
    """Attack pass 49: after a kill, the unanchored end of the trail was rewritten, then guardd
    started again on it and stopped cleanly: its checkpoints anchor the chain through the
    rewritten records, and verify warned of nothing. Nothing can tell such records from real
    ones; verify says, for good, which records a killed run left for the next start to anchor."""
    path, lines, unanchored = killed_after_a_clean_run(tmp_path)
    rewrite(path, [*lines[:-3], *rechained(lines[-4], [
        json.loads(line) for line in lines[-3:] if b"killed 1" not in line])])
    write_trail(tmp_path, 1, text="next run")
    report = verify(tmp_path)
    assert report.ok, report.first_error
    first = json.loads(lines[unanchored])["seq"]
    exposed = [warning for warning in report.warnings if "ended without" in warning]
    assert len(exposed) == 1 and f"records {first}..{first + 1} are" in exposed[0], \
        report.warnings
    assert not any("does not end with a shutdown" in warning for warning in report.warnings)


def test_the_torn_line_a_note_vouches_for_cannot_be_swapped(tmp_path: Path) -> None:
    """Left open by attack pass 48, closed in 49: the torn line before the writer's note of it
    could be swapped for another that looks torn (a forged allowed connect left unclosed),
    the note holding nothing of it. The note holds the torn line's SHA-256."""
    write_trail(tmp_path, 3, close=False)
    path = tmp_path / CURRENT
    path.write_bytes(path.read_bytes() + lines_of(path)[-1][:70])  # (a crash mid-write)
    write_trail(tmp_path, 1, text="next run")
    lines = lines_of(path)
    at = next(n for n, line in enumerate(lines) if b'"audit.torn"' in line)
    note = json.loads(lines[at])
    assert note["tornSha256"] == hashlib.sha256(lines[at - 1]).hexdigest(), note
    assert verify(tmp_path).ok
    rewrite(path, [*lines[:at - 1], PLANTED, *lines[at:]])
    report = verify(tmp_path)
    assert not report.ok and "SHA-256" in str(report.first_error), report


def test_a_note_cut_short_at_the_end_is_taken_at_every_cut(tmp_path: Path) -> None:
    """Past a torn line at the end of the trail, the writer's note of it cut short anywhere
    (a full disk) is taken; its hash of the torn line included."""
    write_trail(tmp_path, 2, close=False)
    path = tmp_path / CURRENT
    running = path.read_bytes() + lines_of(path)[-1][:70]
    path.write_bytes(running)
    anchor = tmp_path / ANCHOR
    anchored = anchor.read_bytes()
    write_trail(tmp_path, 1, text="next run")
    note = next(line for line in lines_of(path) if b'"audit.torn"' in line)
    anchor.write_bytes(anchored)
    for cut in range(len(b'{"timestamp":"'), len(note)):
        path.write_bytes(running + b"\n" + note[:cut])
        report = verify(tmp_path)
        assert report.ok, (cut, note[:cut], report.first_error)


def killed_past_an_interval_checkpoint(directory: Path) -> tuple[Path, list[bytes], int]:
    """A clean run, then a run that wrote a record, an anchored interval checkpoint and two
    records more, and was killed: its file, its lines, and where that checkpoint is."""
    write_trail(directory, 2)
    writer = AuditWriter(directory)
    writer.open()
    for n in range(3):
        write_fields(writer, action="network.request", effect="deny" if n == 1 else "allow",
                     client="10.0.0.9", target=f"host{n}.example.com:443", reason=f"killed {n}")
        writer.flush()
        if n == 0:
            writer._checkpoint(audit.INTERVAL)  # (what its timer does)
    writer._release_lock()
    path = directory / CURRENT
    lines = lines_of(path)
    return path, lines, max(n for n, line in enumerate(lines) if b'"interval"' in line)


def test_a_killed_runs_end_cut_back_to_its_last_anchored_checkpoint_is_noted(
        tmp_path: Path) -> None:
    """Re-attack of attack pass 49: after a kill, the records past the run's last anchored
    checkpoint (an interval one) were deleted; the start after it found the trail ending at
    the anchor's newest entry and noted nothing, and verify warned of nothing. Only an anchored
    shutdown checkpoint is a clean end: any other is noted, and the note always warned of."""
    path, lines, checkpoint = killed_past_an_interval_checkpoint(tmp_path)
    rewrite(path, lines[:checkpoint + 1])
    write_trail(tmp_path, 1, text="next run")
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert any("ended without a shutdown checkpoint" in warning and "removed" in warning
               for warning in report.warnings), report.warnings


def test_a_killed_runs_unanchored_end_retyped_as_trail_records_is_warned_of(
        tmp_path: Path) -> None:
    """Re-attack of attack pass 49: the killed run's unanchored decisions rechained as the
    trail's own records (which export leaves out): the note's warning counted decisions
    only, found none, and said nothing. It names every record since the last anchored
    checkpoint."""
    path, lines, checkpoint = killed_past_an_interval_checkpoint(tmp_path)
    first = json.loads(lines[checkpoint])["seq"] + 1
    rewrite(path, [*lines[:checkpoint + 1], *rechained(lines[checkpoint], [
        {"action": "audit.policy", "reason": "reload refused: nothing changed"}] * 2)])
    write_trail(tmp_path, 1, text="next run")
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert any("ended without a shutdown checkpoint" in warning and
               f"records {first}..{first + 1} are" in warning
               for warning in report.warnings), report.warnings


@pytest.mark.parametrize("earlier_run", [True, False], ids=["after-a-clean-run", "first-run"])
def test_a_killed_run_erased_whole_is_reported(tmp_path: Path, earlier_run: bool) -> None:
    """Re-attack of attack pass 49: a run killed before its first interval checkpoint left
    nothing in the anchor, so its records, deleted whole (the trail cut back to the clean
    run before it, or every file deleted when it was the first), left no trace once guardd
    started again. A run's first write anchors a checkpoint ("start")."""
    if earlier_run:
        write_trail(tmp_path, 2)
    path = tmp_path / CURRENT
    kept = path.read_bytes() if earlier_run else b""
    write_trail(tmp_path, 3, close=False, text="killed")
    path.write_bytes(kept)
    write_trail(tmp_path, 1, text="next run")
    report = verify(tmp_path)
    assert not report.ok and "anchor" in str(report.first_error), report


@pytest.mark.parametrize("cut", [0, 90], ids=["full-disk", "torn"])
def test_the_note_of_an_unanchored_end_is_written_after_a_full_disk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: int) -> None:
    """Re-attack of attack pass 49: the start's `audit.unanchored` note, its first write
    refused by a full disk (or cut short), was never written again, so a killed run's end
    rewritten before it verified clean. And a note cut short after a shutdown checkpoint the
    anchor does not hold (its append failed) was taken for an inserted line. The note waits,
    as the torn line's does, and may be what a start cut short left."""
    write_trail(tmp_path, 2)
    anchor = tmp_path / ANCHOR
    rewrite(anchor, lines_of(anchor)[:-1])  # (the shutdown checkpoint's append failed)
    writer = AuditWriter(tmp_path, retry_interval=0)
    writer.open()
    real_write = os.write
    calls = [0]

    def full_disk(fd: int, data: bytes) -> int:
        calls[0] += 1
        if calls[0] > 1:
            return real_write(fd, data)
        if cut:
            return real_write(fd, data[:cut])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full_disk)
    for n in range(2):
        write_fields(writer, action="network.request", effect="allow", client="10.0.0.1",
                     reason=f"after {n}")
        writer.flush()
    writer.close()
    report = verify(tmp_path)
    assert report.ok, report.first_error
    assert any("ended without a shutdown checkpoint" in warning for warning in report.warnings), \
        report.warnings
