"""The audit trail: an append-only, hash-chained JSONL file of every decision, and its readers.

Theory of operation. `AuditWriter.record()` is on the hot path of every DNS query and CONNECT:
it stamps the time, serialises the fields (fixed order, absent ones omitted) to compact JSON and
queues the line. `prepare()` does the serialising once for records that differ only in the client
(a name asked again and again), so such a record costs a time stamp and a concatenation. `flush()` is the group commit: it chains the queued lines and hands them to the
kernel with one write(2) on an O_APPEND descriptor. Once `attach(loop)` is called, the first
record of a batch schedules that flush with `loop.call_soon`, and `after_flush()` / `flushed()`
hold answers back until it ran, so a killed daemon never answered a request it did not log.

The chain: each line ends with `prev`, the hex SHA-256 of the previous record's line as it is on
disk, without its newline; the first record ever has 64 zeros. The chain runs on across
rotation (the first record of a fresh `audit.jsonl` chains to the last line of `audit.jsonl.1`)
and across restarts (`open()` reads the newest record on disk). A write cut short by a crash or a
full disk leaves a torn line, a proper prefix of a record and so never valid JSON. The writer
never truncates what is on disk: it starts the next record on a line of its own and chains it to
the last whole record, and `verify()` accepts a torn line only where the next record chains past
it. The chain proves that no record inside the trail was changed, removed or inserted; it cannot
show that the newest records were cut off, or that the whole trail was rewritten: ship the trail
off the host when that matters.

Write failures (disk full) never reach the caller: they are counted in `write_errors`, logged
once per outage on the "guardd.audit" logger, and the batch is kept and retried every
`retry_interval` seconds, up to `max_pending` records (older ones are then dropped and counted in
`records_dropped`).

Export (`iter_records`, `format_records`) reads rotated files oldest first, then the current
one, skipping torn lines. `json` and `csv` print the decision fields only; `jsonl` prints the
records as stored, `prev` included, so an exported slice can still be checked link by link.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import os
import re
import textwrap
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVarTuple, Unpack

from guardd.errors import AuditError

log = logging.getLogger("guardd.audit")

CURRENT = "audit.jsonl"
#: The decision fields, in the order records and CSV columns carry them; `prev` follows them.
FIELDS = ("timestamp", "action", "listener", "client", "target", "domain", "ip", "port", "method",
          "qtype", "effect", "matchedRule", "reason")
#: `prev` of the very first record.
GENESIS = "0" * 64
MiB = 1024 * 1024

Record = dict[str, object]
Ts = TypeVarTuple("Ts")

_encode = json.JSONEncoder(separators=(",", ":")).encode
_SECOND_FORMAT = "%Y-%m-%dT%H:%M:%S"
_MILLIS_ENDINGS = tuple(f'.{millis:03d}Z",' for millis in range(1000))
_ROTATED_SUFFIX = re.compile(r"[1-9][0-9]*")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_DURATION = re.compile(r"(\d+)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
#: Bytes read per step when looking for the newest record from the end of a file.
_TAIL_BLOCK = 64 * 1024
#: Stands for the client in a prepared record; never a real client (NUL cannot be in one).
_CLIENT_HOLE = "\0"
_ENCODED_HOLE = _encode(_CLIENT_HOLE)[1:-1]


def _json_safe(text: str) -> bool:
    """Would `_encode` write `text` as it is (between its quotes)? True for IP addresses."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _body(fields: Mapping[str, object]) -> str:
    """The fields after the timestamp, in FIELDS order, as the rest of one JSON object (without
    its opening brace). None and "" are omitted."""
    return _encode({name: fields[name] for name in FIELDS[1:]
                    if fields.get(name) is not None and fields[name] != ""})[1:]


class AuditWriter:
    """Appends decision records to the trail in `directory`, one write(2) per batch."""

    def __init__(self, directory: Path, *, max_bytes: int = 50 * MiB, keep: int = 10,
                 clock: Callable[[], float] = time.time, max_pending: int = 100_000,
                 retry_interval: float = 1.0) -> None:
        for name, value, least in (("max_bytes", max_bytes, 1), ("keep", keep, 0),
                                   ("max_pending", max_pending, 1),
                                   ("retry_interval", retry_interval, 0)):
            if value < least:
                raise AuditError(f"audit {name} must be at least {least}, got {value}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.keep = keep
        #: After a failed write, flushes only queue until this many seconds have passed: each
        #: attempt chains the whole backlog again, which must not happen every loop turn.
        self.retry_interval = retry_interval
        #: Counters for metrics: records on disk, failed flushes, records lost to a long outage.
        self.records_written = 0
        self.write_errors = 0
        self.records_dropped = 0
        self._clock = clock
        self._pending: deque[str] = deque(maxlen=max_pending)
        self._after: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._fd: int | None = None
        self._size = 0
        #: The current file ends inside a line (a torn write): the next write starts a new one.
        self._needs_newline = False
        #: `prev` of the next record; None until `open()` has read the chain head from disk.
        self._prev: str | None = None
        self._failed_flushes = 0
        self._retry_at = 0.0  # time.monotonic(), immune to wall-clock jumps
        self._stamp_second = -1
        self._stamp_prefix = ""

    def open(self) -> None:
        """Create the directory and file if needed and continue the chain found on disk."""
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._prev = _chain_head(self.directory)
            self._open_file()
        except OSError as exc:
            raise AuditError(f"cannot open the audit trail in {self.directory}: "
                             f"{exc.strerror or exc}; check that guardd may create and write "
                             "that directory, or set another audit directory") from exc

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Flush once per loop turn from now on: the first record of a batch schedules it."""
        self._loop = loop

    def record(self, *, action: str, effect: str, listener: str | None = None,
               client: str | None = None, target: str | None = None, domain: str | None = None,
               ip: str | None = None, port: int | None = None, method: str | None = None,
               qtype: str | None = None, matchedRule: str | None = None,  # noqa: N803
               reason: str | None = None) -> None:
        """Queue one decision; it reaches the disk with the next flush. None and "" are omitted.

        The keywords are the trail's field names (hence `matchedRule`), so `record(**fields)` works.
        """
        self._queue(_body({"action": action, "listener": listener, "client": client,
                           "target": target, "domain": domain, "ip": ip, "port": port,
                           "method": method, "qtype": qtype, "effect": effect,
                           "matchedRule": matchedRule, "reason": reason}))

    def prepare(self, **fields: object) -> Callable[[str], None]:
        """A recorder for records that differ only in `client` (the DNS hot path: the same denied
        or cached name, asked again): the fields are encoded once, each call only stamps the time
        and splices in the client. `record(client=c, **fields)` queues the same line."""
        # The hole is the first NUL in the line: only `action` and `listener` come before client.
        head, _, tail = _body({**fields, "client": _CLIENT_HOLE}).partition(_ENCODED_HOLE)
        queue = self._queue

        def record_for(client: str) -> None:
            if client and _json_safe(client):
                queue(head + client + tail)
            else:  # needs escaping, or is omitted: the general path
                self.record(client=client, **fields)  # type: ignore[arg-type]

        return record_for

    def _queue(self, body: str) -> None:
        """Stamp `body` (the encoded fields after the timestamp) and queue it for the flush."""
        if len(self._pending) == self._pending.maxlen:
            self.records_dropped += 1  # the deque lets go of the oldest
        self._pending.append(self._opening() + body)
        self._schedule()

    def after_flush(self, callback: Callable[[Unpack[Ts]], object], *args: Unpack[Ts]) -> None:
        """Run `callback(*args)` right after the next flush, e.g. send the answer to a logged query.

        It runs even when the write failed: a full disk is counted and logged, not an outage.
        """
        self._after.append((callback, args))
        self._schedule()

    async def flushed(self) -> None:
        """Wait until everything recorded so far was flushed (needs `attach`)."""
        if self._loop is None:
            raise AuditError("AuditWriter.flushed() waits for a scheduled flush: call attach(loop)")
        done = self._loop.create_future()
        self.after_flush(_resolve, done)
        await done

    def flush(self) -> None:
        """Write the queued records with one write(2), then run the after-flush callbacks."""
        self._flush_scheduled = False
        if self._pending and time.monotonic() >= self._retry_at:
            self._write_pending()
        callbacks, self._after = self._after, []
        for callback, args in callbacks:
            try:
                callback(*args)
            except Exception:
                log.exception("callback %r after an audit flush failed", callback)

    def close(self) -> None:
        """Flush, then close the file; records that still cannot be written are lost (logged)."""
        self._retry_at = 0.0  # one last attempt, whenever the previous one failed
        self.flush()
        if self._pending:
            log.error("%d audit records could not be written before close and are lost",
                      len(self._pending))
            self._pending.clear()
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._prev = None
        self._loop = None

    def _schedule(self) -> None:
        if self._loop is not None and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def _opening(self) -> str:
        """A record's start, `{"timestamp":"<RFC 3339 UTC to the nearest ms>",`; the part up to
        the second is formatted once a second (this runs for every query)."""
        millis = int(self._clock() * 1000 + 0.5)
        seconds = millis // 1000
        if seconds != self._stamp_second:
            self._stamp_second = seconds
            self._stamp_prefix = '{"timestamp":"' + time.strftime(_SECOND_FORMAT,
                                                                  time.gmtime(seconds))
        return self._stamp_prefix + _MILLIS_ENDINGS[millis - seconds * 1000]

    def _write_pending(self) -> None:
        """Write the batch; on failure count and log (once per outage) and keep it."""
        try:
            self._write_batch()
        except OSError as exc:
            self.write_errors += 1
            self._retry_at = time.monotonic() + self.retry_interval
            if not self._failed_flushes:
                log.error("cannot write the audit trail in %s: %s; %d records kept, retried "
                          "every %gs (until a write succeeds, failures are only counted)",
                          self.directory, exc, len(self._pending), self.retry_interval)
            self._failed_flushes += 1
            return
        if self._failed_flushes:
            log.warning("audit trail written again after %d failed flushes; %d records dropped "
                        "since start", self._failed_flushes, self.records_dropped)
            self._failed_flushes = 0

    def _write_batch(self) -> None:
        if self._prev is None:
            raise AuditError("AuditWriter.open() must be called before records are flushed")
        fd = self._fd if self._fd is not None else self._open_file()  # a failed rotation closed it
        lines: list[bytes] = []
        heads: list[str] = []
        prev = self._prev
        for body in self._pending:
            line = f'{body[:-1]},"prev":"{prev}"}}'.encode()
            prev = _digest(line)
            lines.append(line)
            heads.append(prev)
        batch = b"\n".join(lines) + b"\n"
        if self._size and self._size + len(batch) > self.max_bytes:
            fd = self._rotate()
        lead = b"\n" if self._needs_newline else b""
        data = lead + batch
        written = os.write(fd, data)
        self._size += written
        self._settle(lines, heads, written - len(lead))
        if written < len(data):
            raise OSError(f"short write: {written} of {len(data)} bytes reached the disk")

    def _settle(self, lines: list[bytes], heads: list[str], written: int) -> None:
        """Advance the chain past the records wholly on disk (`written` bytes of `lines`)."""
        self._needs_newline = False
        done = 0
        for line, head in zip(lines, heads):
            if written < len(line):
                # Torn: never valid JSON; the next write starts after it and chains past it.
                self._needs_newline = written > 0
                break
            self._prev = head
            done += 1
            if written == len(line):  # whole record, its newline missing
                self._needs_newline = True
                break
            written -= len(line) + 1
        for _ in range(done):
            self._pending.popleft()
        self.records_written += done

    def _rotate(self) -> int:
        """audit.jsonl -> .1 -> .2 ...; files past `keep` are deleted. Returns the new file's fd."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        for index, path in reversed(_rotated(self.directory)):
            if index >= self.keep:
                path.unlink()
            else:
                os.replace(path, self.directory / f"{CURRENT}.{index + 1}")
        current = self.directory / CURRENT
        if self.keep:
            os.replace(current, self.directory / f"{CURRENT}.1")
        else:
            current.unlink()
        return self._open_file()

    def _open_file(self) -> int:
        fd = os.open(self.directory / CURRENT,
                     os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        self._size = os.fstat(fd).st_size
        self._needs_newline = self._size > 0 and os.pread(fd, 1, self._size - 1) != b"\n"
        self._fd = fd
        return fd


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the waiter may have been cancelled
        future.set_result(None)


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _parse(line: bytes) -> Record | None:
    """The record on a line, or None for a line that is not one (torn, or changed)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _rotated(directory: Path) -> list[tuple[int, Path]]:
    """Rotated files as (index, path), newest (.1) first."""
    found = []
    for path in directory.glob(f"{CURRENT}.*"):
        suffix = path.name[len(CURRENT) + 1:]
        if _ROTATED_SUFFIX.fullmatch(suffix):
            found.append((int(suffix), path))
    return sorted(found)


def _trail_files(directory: Path) -> list[Path]:
    """Every file of the trail, oldest first: the order the records were written in."""
    files = [path for _, path in reversed(_rotated(directory))]
    current = directory / CURRENT
    if current.exists():
        files.append(current)
    return files


def _existing_trail(directory: Path) -> list[Path]:
    files = _trail_files(Path(directory))
    if not files:
        raise AuditError(f"no audit trail in {directory}: {CURRENT} not found; give the "
                         "directory set as the audit directory in the daemon configuration")
    return files


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) for each line of a file."""
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            yield number, line.removesuffix(b"\n")


def _lines_backwards(path: Path) -> Iterator[bytes]:
    """A file's lines, last first, without newlines (one empty line after a final newline)."""
    with path.open("rb") as file:
        position = file.seek(0, os.SEEK_END)
        rest = b""
        while position > 0:
            step = min(_TAIL_BLOCK, position)
            position -= step
            file.seek(position)
            lines = (file.read(step) + rest).split(b"\n")
            rest = lines[0]
            yield from reversed(lines[1:])
        yield rest


def _chain_head(directory: Path) -> str:
    """`prev` of the next record: the hash of the newest record on disk, past any torn lines."""
    for path in reversed(_trail_files(directory)):
        for line in _lines_backwards(path):
            if _parse(line) is not None:
                return _digest(line)
    return GENESIS


def iter_records(directory: Path, *, since: datetime | None = None,
                 until: datetime | None = None,
                 filters: Mapping[str, str] | None = None) -> Iterator[Record]:
    """Records in write order with `since <= timestamp < until`, whose fields equal every filter.

    Filters compare the field's text, so `port=443` matches the number 443.
    """
    wanted = dict(filters or {})
    unknown = sorted(wanted.keys() - set(FIELDS))
    if unknown:
        raise AuditError(f"cannot filter on {', '.join(unknown)}: not an audit field; the "
                         f"fields are {', '.join(FIELDS)}")
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise AuditError(f"time bound {bound.isoformat()} has no time zone; give it in UTC")
    return _select(_existing_trail(directory), since, until, wanted)


def _select(files: list[Path], since: datetime | None, until: datetime | None,
            wanted: dict[str, str]) -> Iterator[Record]:
    timed = since is not None or until is not None
    for path in files:
        for _, line in _numbered_lines(path):
            record = _parse(line)
            if record is None:  # a torn line; verify() reports it
                continue
            if timed and not _within(record, since, until):
                continue
            if all(name in record and str(record[name]) == value
                   for name, value in wanted.items()):
                yield record


def _within(record: Record, since: datetime | None, until: datetime | None) -> bool:
    stamp = record.get("timestamp")
    try:
        when = datetime.fromisoformat(stamp) if isinstance(stamp, str) else None
    except ValueError:
        when = None
    return (when is not None and (since is None or when >= since)
            and (until is None or when < until))


def parse_since(text: str, now: datetime) -> datetime:
    """A `--since`/`--until` value: a duration back from `now` (24h, 30m, 7d, 90s, 1w) or an
    RFC 3339 timestamp with Z or an offset; returned in UTC."""
    match = _DURATION.fullmatch(text.strip())
    if match:
        try:
            return (now - timedelta(seconds=int(match[1]) * _UNIT_SECONDS[match[2].lower()])
                    ).astimezone(UTC)
        except OverflowError:
            raise AuditError(f"duration {text!r} reaches back too far; "
                             "give a shorter one or a timestamp") from None
    try:
        when = datetime.fromisoformat(text.strip().upper())
    except ValueError:
        raise AuditError(f"cannot read {text!r} as a time: give a duration back from now "
                         "(90s, 30m, 24h, 7d, 1w) or an RFC 3339 timestamp such as "
                         "2026-02-13T10:15:33Z") from None
    if when.tzinfo is None:
        raise AuditError(f"timestamp {text!r} has no time zone: add Z for UTC "
                         "or an offset such as +01:00")
    return when.astimezone(UTC)


def format_records(records: Iterable[Record], fmt: str) -> Iterator[str]:
    """Render records for `audit export`; the pieces, joined, are the whole document.

    `json` and `csv` leave `prev` out (readers want the decisions); `jsonl` keeps records as
    stored. CSV columns are always every field of FIELDS, so every export has the same header.
    """
    try:
        formatter = _FORMATTERS[fmt]
    except KeyError:
        raise AuditError(f"unknown export format {fmt!r}; use one of "
                         f"{', '.join(_FORMATTERS)}") from None
    return formatter(records)


def _decision(record: Record) -> Record:
    return {name: value for name, value in record.items() if name != "prev"}


def _format_json(records: Iterable[Record]) -> Iterator[str]:
    """One JSON array, pretty-printed as in SafeClaw's sample output, streamed record by record."""
    opener = "[\n"
    for record in records:
        yield opener + textwrap.indent(json.dumps(_decision(record), indent=2), "  ")
        opener = ",\n"
    yield "[]\n" if opener == "[\n" else "\n]\n"


def _format_jsonl(records: Iterable[Record]) -> Iterator[str]:
    for record in records:
        yield _encode(record) + "\n"


def _format_csv(records: Iterable[Record]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow(record)
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()  # the header alone when there was no record


_FORMATTERS: dict[str, Callable[[Iterable[Record]], Iterator[str]]] = {
    "json": _format_json, "jsonl": _format_jsonl, "csv": _format_csv}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify` found: counts, the first broken link if any, and what it accepted."""

    records: int
    files: int
    #: "file:line: what is wrong" for the first broken link; None when the chain holds.
    first_error: str | None = None
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.first_error is None


def verify(directory: Path) -> VerifyReport:
    """Walk the chain from the oldest file to the current one and name the first broken link."""
    files = _existing_trail(directory)
    warnings: list[str] = []
    records = 0
    expected: str | None = None  # hash of the last record; None before the first
    expected_at = ""
    unchained: list[str] = []  # lines that are not records, until a record chains past them
    for path in files:
        for number, line in _numbered_lines(path):
            at = f"{path.name}:{number}"
            record = _parse(line)
            if record is None:
                unchained.append(at)
                continue
            prev = record.get("prev")
            error = None
            if not isinstance(prev, str) or not _HEX_DIGEST.fullmatch(prev):
                error = f"{at}: no prev of 64 hex digits (the record was changed)"
            elif expected is None:
                if prev != GENESIS:
                    warnings.append(f"{at}: the trail starts mid-chain (older files were rotated "
                                    "away), so the first record's prev cannot be checked")
            elif prev != expected:
                error = (f"{unchained[0]}: not a JSON record, and the next record does not chain "
                         "past it (the line was changed)" if unchained else
                         f"{at}: prev does not match the SHA-256 of the record before it "
                         f"({expected_at}): that record was changed, or records after it removed")
            if error is not None:
                return VerifyReport(records, len(files), error, tuple(warnings))
            warnings.extend(f"{torn}: torn line (a write cut short, e.g. by a crash) skipped; "
                            "the chain continues past it" for torn in unchained)
            unchained.clear()
            expected, expected_at = _digest(line), at
            records += 1
    warnings.extend(f"{torn}: torn line at the end of the trail (a write cut short, e.g. by a "
                    "crash)" for torn in unchained)
    return VerifyReport(records, len(files), None, tuple(warnings))
