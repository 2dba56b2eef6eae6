"""The audit trail: an append-only, hash-chained JSONL file of every decision, and its readers.

Theory of operation.

Writing. `AuditWriter.write(record, client, name)` is on the hot path of every DNS query and
CONNECT: it stamps the time, splices the client (and, for a record that stands for many names,
the name: a DNS verdict) into the record's encoding (compact, ASCII-only JSON, fixed field order,
absent fields omitted, done once per `AuditRecord`) and queues the line. `flush()` is the group
commit: it numbers and chains the queued lines and hands them to the kernel with one write(2) on
an O_APPEND descriptor. Once `attach(loop)` is called, the first record of a batch schedules that
flush with `loop.call_soon`, and `after_flush()` / `flushed()` hold answers back until it ran,
so a killed daemon never answered a request it did not log; a listener that sends its answer in
its own code next calls `flush()` itself (`Guard.committed`).

Folding. A denial equal in every field but the time to one already queued in the same batch (same
client, action, target, rule, reason..., as written: a text field keeps `MAX_FIELD_CHARS`) is
not queued again: the first repeat takes a place in
the batch, later ones only count, and it is written as one record with `count` (the decisions it
stands for), `timestamp` (the first of them) and `last`. A repeat alone in its batch is written
as a plain record, the same bytes as any other. A batch ends with its flush, and the flush writes
it before the after-flush callbacks run, so the answer to every repeat still leaves only after a
record covering it is on disk. A flood of one denied query is two lines a batch, not one a query.
Allowed decisions are never folded.

The chain. Every line ends with `seq`, its number (0 for the first record ever, one more for each
record after it), and `prev`, the hex SHA-256 of the previous line as it is on disk, without its
newline (64 zeros for the first record ever). Both run on across rotation and restarts (`open()`
reads the newest record on disk; a trail from before numbering continues at 0). A write cut short
by a crash or a full disk leaves a torn line, a proper prefix of a record and so never valid JSON;
the writer never truncates what is on disk: it starts the next record on a line of its own, with
the number the torn one had, chained to the last whole record.

The trail's own records have actions under "audit.". A checkpoint (`audit.checkpoint`, `reason`
rotation, retention, interval or shutdown) is written at every rotation, before every deletion,
(once `attach`ed) at most `checkpoint_interval` seconds after any record, and by `close()`; its
number and hash are appended to the anchor file (`anchor.jsonl` in the trail directory, or
`anchor`) and logged, for an operator to ship off the host, as are those of a run's first
record (`reason` start: a run erased whole still shows). Records written after the newest
checkpoint are anchored by none yet; after a clean stop, every record is. Each load of the
policies (at start, at a reload) is an `audit.policy` record with every file's SHA-256, and so
is a reload refused, with why (`note_policies`): which policy judged is in the chain too.

Retention. `audit.jsonl` becomes `.1` (and `.1` becomes `.2`...) when a batch would take it past
`max_bytes`. The oldest rotated files are deleted while more than `keep` are left, or while the
trail is over `max_total_bytes`, but never one younger than `min_age` (by its last write). Before
anything is deleted, a checkpoint says what: `prunedThrough`, the number of the last record
deleted, and `prunedHead`, its hash, the `prev` of the first record kept (unless that record
predates numbering). When only files younger than `min_age` could make room under
`max_total_bytes`, the cap acts as a full disk (below): a flood can no longer push older evidence
out of the trail, it loses its own newest records instead, and says so. A cap the trail's
filesystem cannot hold is lowered to what it can (`DISK_SHARE`): everything below is measured
against the cap, and a disk full before it would refuse every client. Before that, past
`DENIAL_SHARE` of the cap, denials are shed: counted by client in an `audit.shed` record (one a
second at most), not written, so that a flood of denials (unique names: nothing folds) leaves
the rest of the cap to every other decision; the answers to them still leave (a denial grants
nothing; one only reported, which lets the request through, is never shed; nor is one that
something left the host for, `went_out`: guardd's own lookup of a connect's name, its
handshake, a query forwarded upstream). So are answers from guardd's cache (`went_out` False:
nothing left the host for them). And past the share the
records of one client may have taken `CLIENT_SHARE` of the room left under the cap: past
that, its decisions that must be recorded before they are carried out are refused
(`write_now`: connects, proxied requests; `room_for`: a DNS query about to go upstream),
counted in the shed notes, and no one else's. Notes come at most once a `SHED_NOTE_INTERVAL`.
Files old enough to delete go once the trail is past the share, not only at the cap; a note
waits for room under the cap (the close writes it regardless). The trail's own records
are never refused, so one can take a file past `max_bytes` or the trail past the cap by a line (a
rotation sets room for its checkpoint aside). And past `SPARE_FILL` of the cap, below the share,
what may be shed is written only while its client's budget lasts, and everyone's; and past
`SPARE_FILL` in files too young to delete, what must be written (what a client was let do) only
while its client's `KEEP_SHARE` lasts, its next such decision refused past it: one client cannot
take the trail to the share alone.

Write failures (a full disk, the cap, the file deleted or replaced under guardd: `_check_file`
before every batch) never reach the caller: they are counted in `write_errors`,
logged once per outage on the "guardd.audit" logger, and the batch is kept and retried every
`retry_interval` seconds. Past `max_pending` queued records the oldest are dropped (those nothing
went out for first, and one that comes then is dropped itself), counted in
`records_dropped` (a folded record counts what it stood for), and an `audit.dropped` record with
their `count` is written before the next batch that reaches the disk. Meanwhile the answers wait
with their records (fail closed): an after-flush callback runs only once every record queued
before it is on disk, and `flush()` says whether they are; when records are dropped, the answers
that waited are withheld for good (`answers_withheld`). `fail_open` (an explicit setting) sends
them anyway.

Verify. `verify()` walks every line, oldest file first. A line that is not a record is accepted
only as a torn write (printable ASCII, not JSON, starting as a record starts) that the next
record chains past and that says a write was cut short (`audit.torn`: the writer's first record
after one, found at open or made by a short write, holding the torn line's SHA-256). Every
record must carry the next number and the hash of the line before; the first record on disk must
be the very first (number 0, prev 64 zeros) or carry exactly the number and prev that the newest
pruning checkpoint recorded (an older number, when a deletion was cut short, is a warning; so is
a first record from before numbering); with an anchor, the newest anchored one: anyone who can
write the trail can append a checkpoint saying it pruned what was deleted. With an anchor (the
trail directory's own, or `verify(anchor=...)`), every anchored record still on disk must hash
as anchored and the trail must reach the newest anchored number, so records cut off its end
show. No check shows records cut or changed after the newest checkpoint (verify warns when the
trail does not end with a shutdown checkpoint, with an anchor one it holds), nor a trail
rewritten together with its anchor: that is what shipping the anchor elsewhere is for. Records a
killed run left unanchored lay open to change until the next start chained on from them; that
start notes it (`UNANCHORED_END`), and verify warns of them for good.

Export (`iter_records`, `format_records`) reads rotated files oldest first, then the current
one, skipping torn lines and, unless asked, the trail's own records. The agent chooses host
strings, so no text format prints a character that a terminal or spreadsheet acts on: `json` and
`jsonl` are ASCII (JSON escapes the rest), `csv` passes text through `terminal_safe` and starts no
cell with a formula character (OWASP, CSV injection). `jsonl` keeps records as stored, `prev`
included, so an exported slice can still be checked link by link.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import errno
import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import queue
import textwrap
import threading
import time
import typing
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, TypeVarTuple, Unpack, cast

from guardd.addr import counted_as
from guardd.errors import AuditError, AuditUnavailableError
from guardd.net import descriptor_limit

log = logging.getLogger("guardd.audit")

CURRENT = "audit.jsonl"
#: The file a writer holds locked (flock) while it writes the directory's trail: one writer.
LOCK = "guardd.lock"
#: Where checkpoints are anchored, in the trail directory unless configured elsewhere.
ANCHOR = "anchor.jsonl"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    """What one decision says: its fields are the trail's schema (`FIELDS` adds when and who).

    The names are the trail's (hence `matchedRule`); None and "" are omitted on disk. A record
    may stand for many requests that differ only in the client (a DNS verdict served from the
    packet memo), so the client is given to `AuditWriter.write` beside it, and the encoding is
    done once per record.
    """

    action: str
    listener: str | None = None
    #: Whose policy decided (`principals` in the daemon config); None when there are none,
    #: and for what is refused before the client is known (outside `clients`, a failed
    #: login, no principal).
    principal: str | None = None
    #: The proxy login the client made (SOCKS5 or Proxy-Authorization), if it made one: agents
    #: that share an address and log in apart are told apart by it (attack pass).
    user: str | None = None
    target: str | None = None
    domain: str | None = None
    ip: str | None = None
    port: int | None = None
    method: str | None = None
    #: Another method the request may be served as: one an override header names, or `*`
    #: (any: a request body's `_method` field). Judged as each; `audit replay` judges each too.
    methodOverride: str | None = None  # noqa: N815
    qtype: str | None = None
    effect: str
    #: False for a denial of a rule in report mode (`mode: report`): recorded, not carried out.
    enforced: bool | None = None
    matchedRule: str | None = None  # noqa: N815
    #: True for a denial by guardd's own check (the reason says which), beyond what the policy
    #: decides of the fields recorded: the rule named, if any, allowed the request, or the
    #: record lacks what decided (a DNS answer filtered). `audit replay` cannot judge it again.
    ownCheck: bool | None = None  # noqa: N815
    reason: str | None = None
    #: What ended a request after its decision, when not the request itself (an allowed connect
    #: refused by the destination, an upstream DNS failure, a connection abandoned while its
    #: first bytes were awaited); None for a decision carried out.
    outcome: str | None = None
    #: The encoded fields around the client, filled by the first `write`.
    _encoded: tuple[str, str] | None = field(default=None, init=False, compare=False, repr=False)
    #: The same around the client and a name (target and domain), for `write(..., name=)`;
    #: empty when the record cannot be split so.
    _named: tuple[str, ...] | None = field(default=None, init=False, compare=False, repr=False)


_RECORD_FIELDS = tuple(f.name for f in fields(AuditRecord) if not f.name.startswith("_"))
#: The decision fields, in the order records and CSV columns carry them.
FIELDS = ("timestamp", *_RECORD_FIELDS[:2], "client", *_RECORD_FIELDS[2:])
#: Columns of a CSV export: the decision fields, what a folded record adds, and the number.
COLUMNS = (*FIELDS, "count", "last", "seq")
#: Characters a text field of a record keeps at most (a reason, a method, a domain: client or
#: server text quoted in them is cut, with a "…": attack pass, 14 KB lines of a long Host); a
#: sixth of it when the text is not ASCII (written escaped, six bytes a character).
MAX_FIELD_CHARS = 1024
_ESCAPED_CHARS = MAX_FIELD_CHARS // 6
#: What `domain` keeps: every name a connect to an address is judged as (`hosts`: up to 8 of
#: 253 characters, comma-separated), so that no name that decided is cut from the record
#: (final attack: a name past 1,024 characters would be hidden from an operator and replay).
MAX_DOMAIN_CHARS = 2048
#: `prev` of the very first record.
GENESIS = "0" * 64
MiB = 1024 * 1024
#: Actions of the trail's own records (checkpoints, notes of dropped records, policy loads).
TRAIL_ACTIONS = "audit."
CHECKPOINT = "audit.checkpoint"
DROPPED = "audit.dropped"
#: What denials were counted, not written, while the trail was past `DENIAL_SHARE` of its cap.
SHED = "audit.shed"
#: Of a capped trail whose files are all too young to delete, the share denials may fill: past
#: it, a denial is counted (an `audit.shed` record a second says how many, from whom), not
#: written, so that one client's flood of denials leaves the rest to every other decision.
DENIAL_SHARE = 0.9
#: Seconds between `audit.shed` records while denials are shed; clients named in one at most.
SHED_NOTE_INTERVAL = 1.0
#: Of what the trail's filesystem can hold for it (what the trail takes there, and what is
#: free), the part its cap may be: a cap above it is lowered to it, and the files to a quarter
#: of it in `keep + 1` files, as the default cap leaves them (`_fit_to_disk`), so that the
#: shares and shedding start before the disk fills. Session 56's attack (High): the default
#: cap, 2.2 GiB, on a 24 MiB disk; one client's unique denied names filled it, and every client
#: was refused (fail closed) until an operator made room. Looked at when the trail opens and
#: once a `DISK_CHECK_INTERVAL` while it is written: the cap follows what else takes or frees
#: room there, the configured one at most. Files within `keep` are deleted for the configured
#: cap alone (its review: a disk full for seconds deleted a week of evidence).
DISK_SHARE = 0.9
DISK_CHECK_INTERVAL = 1.0
#: The smallest file and cap a lowered cap makes.
_LEAST_FILE = 4096
SHED_NOTE_CLIENTS = 20
#: Past `DENIAL_SHARE`, the part of the room left under the cap that one client's records may
#: have taken, at most: past it, its decisions that must be recorded first are refused
#: (`write_now` raises, `room_for` says no), no one else's. (Many clients together still
#: take the room down to less than a record: a known limit, not a bound.)
CLIENT_SHARE = 1 / 16
#: A client's share comes back after a twenty-fourth of `min_age` (an hour by default): kept for
#: as long as shedding lasts, up to `min_age`, a client refused once stayed refused, the flood
#: over or not (attack pass, 2026-12-06). The room left shrinks by each window's shares.
SHARE_WINDOWS = 24
#: Past this part of a capped trail with a minimum age, records that may be shed (denials
#: nothing left the host for, answers from guardd's cache) are written while budgets last:
#: each client's (`CLIENT_SHARE` of the cap, and that again each `min_age`) and everyone's
#: (`SPARE_ALL`); past them they are counted in `audit.shed` records. Without them one
#: client's unique denied names filled the trail to `DENIAL_SHARE` alone, in minutes, and every
#: other client's connects were refused past its share for the day `min_age` keeps files
#: (attack pass, 2026-12-06); a budget of everyone's alone, at any fill, shed an honest busy
#: fleet's records (review).
SPARE_FILL = 0.5
SPARE_ALL = 0.2
#: Past `SPARE_FILL` of the cap in files too young to delete, what one client's records that
#: must be written (what it was let do: connects, proxied requests, queries sent upstream) may
#: take: this part of the cap, and that again each `min_age`; past it, its next such decision
#: is refused before it is carried out (`write_now`, `room_for`), no one else's. So one
#: client cannot take the trail to `DENIAL_SHARE` alone with what it is allowed either
#: (session 53's attack: its allowed requests, 0.7 MB of records a second, did, and every
#: client was then rationed for the day `min_age` keeps the files). Files old enough to
#: delete do not count: a trail kept full by them (a daemon's steady state) refuses no one.
KEEP_SHARE = 0.2
#: A line's bytes beyond its body: the timestamp before it, `seq` and `prev` after it, its end.
_LINE_OVERHEAD = 140
#: Distinct clients the shed and refused counts keep apart; the rest count as one.
_SHED_KEYS = 1024
#: The first record of a file opened anew because the one written to vanished from its path.
REOPENED = "audit.reopened"
#: A load of the policies (at start, at a reload) or a reload refused (`note_policies`).
POLICY = "audit.policy"
#: The `reason` of the load at start.
LOADED_AT_START = "loaded at start"
#: Set in the records a writer from before `TORN` notes wrote first after a torn line (a
#: start's `POLICY`, `REOPENED`): this writer notes the line first, so none is before them.
NOTES_TORN = "notesTorn"
#: The first record after a line a write cut short (a crash, a full disk): `verify` takes a
#: line that looks torn only before one (attack pass, 2026-12-06: a forged line left unclosed,
#: as a torn one is, posed as a record to grep and passed).
TORN = "audit.torn"
#: The first record after a start on a trail that does not end with a shutdown checkpoint the
#: anchor's newest entry holds: the run before ended otherwise (killed, crashed, or its anchor
#: append failed), and what it wrote since its last anchored checkpoint lay open to change
#: until this start chained on from it (attack pass 49: that end rewritten, or cut back to an
#: anchored interval checkpoint, then a clean run anchored it; `verify` warned of nothing).
UNANCHORED_END = "audit.unanchored"
_UNANCHORED_REASON = ("the run before this start ended without a shutdown checkpoint the "
                      "anchor holds (killed or crashed): its records since its last anchored "
                      "checkpoint could have been changed before this start")
#: Why a checkpoint was written (its `reason`).
ROTATION, RETENTION, INTERVAL, SHUTDOWN = "rotation", "retention", "interval", "shutdown"
#: The anchor entry of a run's first record (re-attack of attack pass 49: a run killed before
#: its first checkpoint left nothing in the anchor, and its records, deleted whole, no trace).
START = "start"

Record = dict[str, object]
Ts = TypeVarTuple("Ts")

_encode = json.JSONEncoder(separators=(",", ":")).encode
#: Stands for the name in a record's encoding around one (see `_named`).
_NAME_HOLE = "\x01"
_ENCODED_NAME_HOLE = _encode(_NAME_HOLE)[1:-1]
_DENY = "deny"
_SECOND_FORMAT = "%Y-%m-%dT%H:%M:%S"
_MILLIS_ENDINGS = tuple(f'.{millis:03d}Z",' for millis in range(1000))
#: How every record starts, and where its time stamp is in what `_opening()` returns.
_RECORD_START = b'{"timestamp":"'
_STAMP = slice(len(_RECORD_START), -2)
#: Room for a checkpoint line, set aside under `max_total_bytes` when a rotation writes one.
_CHECKPOINT_ROOM = 512
_ROTATED_SUFFIX = re.compile(r"[1-9][0-9]*")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_PRINTABLE_ASCII = re.compile(rb"[ -~]+")
#: Times the trail's files are opened (and `verify` reads them) again while guardd rotates
#: them meanwhile (`_opened_trail`).
_SNAPSHOT_ATTEMPTS = 5
#: Trail files held open at once beyond which the soft limit on open files is raised first.
_FEW_FILES = 256
_DURATION = re.compile(r"(\d+)\s*([smhdw])", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
#: Bytes read per step when looking for the newest record from the end of a file.
_TAIL_BLOCK = 64 * 1024
#: Stands for the client in a prepared record; never a real client (NUL cannot be in one).
#: What a spreadsheet may take for the start of a formula (OWASP, CSV injection).
_FORMULA_LEADS = frozenset("=+-@\t\r\uff1d\uff0b\uff0d\uff20")
#: What `_load` returns for a line that is not JSON.
_NOT_JSON = object()


def _left_host(record: AuditRecord, went_out: bool | None) -> bool:
    """Whether anything left the host for `record`: as `went_out` says, else as its effect
    does (an allowed request goes out, a denied one does not)."""
    return record.effect != _DENY if went_out is None else went_out


def _json_safe(text: str) -> bool:
    """Would `_encode` write `text` as it is (between its quotes)? True for IP addresses."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def _encoded(record: AuditRecord) -> tuple[str, str]:
    """The record's fields as the rest of one JSON object after `{"timestamp":...,`, in FIELDS
    order, None and "" omitted, in two parts: before the client and after it (with the closing
    brace). Written field by field: what `_encode` would write, without its generic walk (this
    runs once for every DNS name never asked before)."""
    head = _fields_text(record, _RECORD_FIELDS[:2])
    tail = _fields_text(record, _RECORD_FIELDS[2:])
    return head, ("," + tail if tail else "") + "}"


def _named(record: AuditRecord) -> tuple[str, ...]:
    """`_encoded` of `record` standing for a name (its target and domain), in four parts: before
    the client, then around the two places of the name; () when another field holds the
    placeholder's character too."""
    head, tail = _encoded(replace(record, target=_NAME_HOLE, domain=_NAME_HOLE))
    pieces = tail.split(_ENCODED_NAME_HOLE)
    return (head, *pieces) if len(pieces) == 3 else ()


def _fields_text(record: AuditRecord, names: Iterable[str]) -> str:
    parts = []
    for name in names:
        value = getattr(record, name)
        if value is None or value == "":
            continue
        if type(value) is str and len(value) > _ESCAPED_CHARS:
            value = _capped(name, value)
        if type(value) is str and _json_safe(value):
            parts.append(f'"{name}":"{value}"')
        else:
            parts.append(f'"{name}":{_encode(value)}')
    return ",".join(parts)


def _capped(name: str, value: str) -> str:
    """`value` of field `name` cut to what a record keeps of it (`MAX_FIELD_CHARS`)."""
    kept = MAX_DOMAIN_CHARS if name == "domain" else MAX_FIELD_CHARS
    if not value.isascii():
        kept //= 6  # (written escaped: six bytes a character)
    return value if len(value) <= kept else value[:kept - 1] + "\u2026"


def _is_seq(value: object) -> bool:
    return type(value) is int and value >= 0


class _Fold:
    """Repeats of one queued denial within one batch, written as one record (see "Folding")."""

    __slots__ = ("body", "first", "last", "count", "out")

    def __init__(self, body: str, opening: str, out: bool) -> None:
        self.body = body
        self.first = self.last = opening
        self.count = 1
        #: Something went out for one of the decisions it stands for (see `_Unsent`).
        self.out = out

    def add(self, opening: str, out: bool) -> None:
        self.last = opening
        self.count += 1
        self.out = self.out or out

    def line(self) -> str:
        if self.count == 1:
            return self.first + self.body
        return f'{self.first}{self.body[:-1]},"count":{self.count},"last":"{self.last[_STAMP]}"}}'


class _Unsent(str):
    """A line queued during an outage of a record nothing went out for (`_left_host`): past
    `max_pending`, the first dropped (`_drop_excess`). Only then: a plain line costs nothing
    more, and one queued before the outage counts as of what went out (kept the longer)."""

    __slots__ = ()


class _Note:
    """A record of the trail's own queued among the decisions (`note_policies`): written in
    its place, counted as none of them."""

    __slots__ = ("text",)
    count = 0

    def __init__(self, text: str) -> None:
        self.text = text

    def line(self) -> str:
        return self.text


class Mirror:
    """A copy of the trail as JSON lines on a stream (stdout, for a log shipper such as Fluent
    Bit or Vector), written by a thread of its own: a shipper that stops reading never stalls
    the daemon. What waits for it is bounded in bytes (`capacity`); a batch that would go past
    is dropped and counted. The trail on disk stays the record."""

    def __init__(self, stream: typing.BinaryIO, capacity: int = 8 * MiB) -> None:
        self.stream = stream
        self.capacity = capacity
        self.dropped = 0
        self._waiting = 0  # bytes queued and not yet written
        self._lock = threading.Lock()
        self._batches: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="audit-mirror", daemon=True)
        self._thread.start()

    def put(self, batch: bytes, records: int) -> None:
        with self._lock:
            if self._waiting + len(batch) > self.capacity:
                self.dropped += records
                return
            self._waiting += len(batch)
        self._batches.put(batch)

    def close(self, timeout: float = 2.0) -> None:
        """Let what waits reach the stream (the shutdown checkpoint with it), for at most
        `timeout` seconds: a reader that stopped does not hold the exit."""
        self._batches.put(None)
        self._thread.join(timeout)

    def _write(self) -> None:
        while (batch := self._batches.get()) is not None:
            try:
                self.stream.write(batch)
                self.stream.flush()
            except (OSError, ValueError):  # the reader went away: nothing more to copy
                return
            finally:
                with self._lock:
                    self._waiting -= len(batch)


def least_total_bytes(max_bytes: int, keep: int) -> int:
    """The smallest cap on the whole trail: the kept files, the current one and room for the
    next (at a cap of only keep + 1 files and keep 0, the cap stopped the trail at its first
    rotation, before the old file went)."""
    return max_bytes * (keep + 2)


class AuditWriter:
    """Appends decision records to the trail in `directory`, one write(2) per batch."""

    def __init__(self, directory: Path, *, max_bytes: int = 50 * MiB, keep: int = 10,
                 clock: Callable[[], float] = time.time, max_pending: int = 100_000,
                 retry_interval: float = 1.0, min_age: float = 0.0,
                 max_total_bytes: int | None = None, checkpoint_interval: float = 60.0,
                 anchor: Path | None = None, fail_open: bool = False,
                 sync: bool = False, mirror: Mirror | None = None) -> None:
        for name, value, least in (("max_bytes", max_bytes, 1), ("keep", keep, 0),
                                   ("max_pending", max_pending, 1),
                                   ("retry_interval", retry_interval, 0), ("min_age", min_age, 0),
                                   ("checkpoint_interval", checkpoint_interval, 0),
                                   ("max_total_bytes", max_total_bytes,
                                    least_total_bytes(max_bytes, keep))):
            if value is not None and value < least:
                why = " (max_bytes times (keep + 2))" if name == "max_total_bytes" else ""
                raise AuditError(f"audit {name} must be at least {least}{why}, got {value}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.keep = keep
        #: Rotated files younger than this many seconds are never deleted, `keep` or not.
        self.min_age = min_age
        #: The whole trail may take this many bytes (None: no cap); see "Retention".
        self.max_total_bytes = max_total_bytes
        #: What was configured: `max_total_bytes` and `max_bytes` are lowered from them where
        #: the trail's filesystem cannot hold them (`_fit_to_disk`), and come back up.
        self.configured_total_bytes, self.configured_bytes = max_total_bytes, max_bytes
        #: Seconds after written records until a checkpoint anchors them (0: only at rotation
        #: and close). Needs `attach`.
        self.checkpoint_interval = checkpoint_interval
        self.anchor = anchor if anchor is not None else self.directory / ANCHOR
        self._current_path = str(self.directory / CURRENT)  # stat-ed before every batch
        self.max_pending = max_pending
        #: After a failed write, flushes only queue until this many seconds have passed: each
        #: attempt chains the whole backlog again, which must not happen every loop turn.
        self.retry_interval = retry_interval
        #: Release answers whose records could not be written (the trail is down) rather than
        #: hold them until it is back: an explicit choice, never the default.
        self.fail_open = fail_open
        #: fdatasync(2) each batch before its answers leave: a power loss then loses no record
        #: of an answered request. Without it, what the kernel had not written back yet (up to
        #: its dirty-page writeback interval, 30 s by default) goes with the power.
        self.sync = sync
        #: Where the records on disk are copied too, if anywhere (`audit.stdout`).
        self.mirror = mirror
        #: Counters for metrics: decision records on disk (a folded record is one), the decisions
        #: folded into another record's count, failed writes, decisions lost to a long outage.
        self.records_written = 0
        self.records_compacted = 0
        self.write_errors = 0
        self.records_dropped = 0
        #: Denials counted in `audit.shed` records instead of written (see `DENIAL_SHARE`).
        self.records_shed = 0
        #: Decisions refused, past the share, for a client past its own (`CLIENT_SHARE`).
        self.records_refused = 0
        #: Answers never sent because their records could not be written (fail closed).
        self.answers_withheld = 0
        #: Bytes the trail takes on disk, as this writer last counted them.
        self.trail_bytes = 0
        self._clock = clock
        self._pending: deque[str | _Fold | _Note] = deque()
        self._folded = False  # a fold or a note is pending (else every item is a str)
        #: This batch's denials: body -> its line while it was queued once, then its fold.
        self._folds: dict[str, str | _Fold] = {}
        self._unnoted_drops = 0
        #: Denials are shed (the trail is past `DENIAL_SHARE` of its cap), and how many were
        #: since the last `audit.shed` record, by client.
        self._shedding = False
        self._shed: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        #: Bytes each client's records took since the trail went past the share, or since the
        #: window began (time.monotonic()) that a share lasts (`SHARE_WINDOWS`).
        self._past_share: Counter[str] = Counter()
        self._share_since = -math.inf
        self._share_window = min_age / SHARE_WINDOWS if min_age else math.inf
        #: Past `SPARE_FILL`, what records that may be shed may take: everyone's budget, and
        #: each client's (past `_SHED_KEYS` clients, the rest's together).
        self._spare_all = _Budget.of(max_total_bytes or 0, SPARE_ALL, min_age)
        #: Past how many bytes they spend those budgets: never without a cap or a minimum
        #: age, when nothing keeps files from making room.
        self._spare_from = SPARE_FILL * max_total_bytes \
            if max_total_bytes is not None and min_age else math.inf
        self._spares: dict[str, _Budget] = {}
        self._disk_checked = -math.inf  # time.monotonic() of the last `_fit_to_disk`
        self._cap_told: int | None = None  # the cap the last warning of a lowering gave
        #: Past `SPARE_FILL` in young files, what each client's records that must be written
        #: may take (`KEEP_SHARE`; past `_SHED_KEYS` clients, the rest's together).
        self._keeps: dict[str, _Budget] = {}
        #: What of the trail is in files older than `min_age` (pruning may free it), as
        #: measured (time.monotonic()) at the last rotation, or since (`_stuck`).
        self._aged = 0
        self._aged_at = -math.inf
        self._shed_timer: asyncio.TimerHandle | None = None
        self._share_pruned = -math.inf  # time.monotonic() of the last look past the share
        self._shed_noted = -math.inf  # and of the last `audit.shed` record
        #: (callback, its arguments, what to call instead when the answer is withheld)
        self._after: list[tuple[Callable[..., object], tuple[object, ...],
                                Callable[[], object] | None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_scheduled = False
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._retry_timer: asyncio.TimerHandle | None = None
        self._fd: int | None = None
        self._locks: list[int] = []  # (`LOCK`, and an anchor elsewhere: held while open)
        #: (device, inode) of the file written to, and whether it vanished from its path.
        self._file_id = (0, 0)
        self._vanished = False
        self._size = 0
        #: The current file ends inside a line (a torn write): the next write starts a new one.
        self._needs_newline = False
        #: A write was cut short inside a record (or, at open, the file ends inside a line):
        #: the next record written is a `TORN` note.
        self._torn = False
        #: The SHA-256 of the first line cut short since the last `TORN` note, which the next
        #: note holds (None: none known).
        self._torn_sha256: str | None = None
        #: At open, the trail did not end cleanly: the next record written, after any `TORN`
        #: note, is an `UNANCHORED_END` note.
        self._unanchored_end = False
        #: No record written since open: the first is anchored (`START`).
        self._start_due = False
        #: `prev` and `seq` of the next record; `_prev` is None until `open()` read the chain.
        self._prev: str | None = None
        self._seq = 0
        self._holding = False  # rotated files are kept past `keep` for their age (logged once)
        self._failed_flushes = 0
        #: The last record was dropped as it came, the backlog full (see `_write`).
        self._dropped_last = False
        self._retry_at = 0.0  # time.monotonic(), immune to wall-clock jumps
        self._stamp_second = -1
        self._stamp_prefix = ""

    def open(self) -> None:
        """Create the directory and file if needed and continue the chain found on disk."""
        try:
            self.directory.mkdir(mode=0o750, parents=True, exist_ok=True)
            self._take_lock()
            self._prev, self._seq, stopped = _chain_head(self.directory)
            self._unanchored_end = self._seq > 0 and not (
                stopped and _newest_anchored(self.anchor) == (self._seq - 1, self._prev))
            self._start_due = True
            self._open_file()
            self.trail_bytes = sum(path.stat().st_size for path in _trail_files(self.directory))
            self._aged = _aged_bytes(_rotated_stats(self.directory), self.min_age)
            self._fit_to_disk()
        except OSError as exc:
            self._release_lock()
            raise AuditError(f"cannot open the audit trail in {self.directory}: "
                             f"{exc.strerror or exc}; check that guardd may create and write "
                             "that directory, or set another audit directory") from exc

    def _take_lock(self) -> None:
        """Hold `LOCK` in the directory (attack pass 31: two guardd with one directory both
        wrote, and the chain forked), and the anchor file when it is elsewhere (two trails
        appended to one, and neither verified against it); AuditError when another writer
        holds either."""
        self._lock_one(self.directory / LOCK, f"writes the audit trail in {self.directory} "
                       f"(it holds {LOCK}): a trail has one writer; give each guardd an audit "
                       "directory of its own")
        try:  # (its own directory's too: another guardd's audit.anchor may name it, review)
            self._lock_one(self.anchor, f"anchors its audit trail in {self.anchor}: an anchor "
                           "has one trail; give each guardd an anchor file of its own "
                           "(audit.anchor)")
        except OSError as exc:
            self._release_lock()
            raise AuditError(f"cannot open the audit anchor {self.anchor}: "
                             f"{exc.strerror or exc}; its directory must exist and guardd "
                             "must be able to write there (audit.anchor)") from exc
        except AuditError:
            self._release_lock()  # (the directory's, when the anchor's was refused)
            raise

    def _lock_one(self, path: Path, held: str) -> None:
        lock = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock)
            raise AuditError(f"another guardd {held}") from None
        except BaseException:
            os.close(lock)
            raise
        self._locks.append(lock)

    def _release_lock(self) -> None:
        locks, self._locks = self._locks, []
        for lock in locks:
            os.close(lock)  # (its flock with it)

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Flush once per loop turn from now on: the first record of a batch schedules it."""
        self._loop = loop

    def write(self, record: AuditRecord, client: str | None = None,
              name: str | None = None, went_out: bool | None = None,
              account: str | None = None) -> None:
        """Queue one decision by `client`; it reaches the disk with the next flush (see
        `_write`)."""
        self._write(record, client, name, went_out, account=account)

    def _write(self, record: AuditRecord, client: str | None = None,
               name: str | None = None, went_out: bool | None = None,
               budgeted: bool = False, account: str | None = None) -> bool | None:
        """Queue one decision by `client`: True; None when it is shed instead (an enforced
        decision nothing left the host for, see `DENIAL_SHARE`); False when it is refused
        (`budgeted`, and the client is past its `CLIENT_SHARE`).

        `went_out`: whether anything left the host for it (guardd's lookup of a connect's name,
        its handshake, a query forwarded upstream: a name an agent could carry out that way);
        None when its effect says (an allowed request goes out, a denied one does not).

        `name`, when given, is the host the record stands for this time (its target and
        domain): a DNS verdict is one record for every name its decision answers. The record is
        encoded once, around the client (and the name): writing it again only stamps the time
        and splices them in.

        `account`, when given, is whose shares of the trail the record spends, when not
        `client`'s (`counted_as`): a source that proves no one, a datagram's forged or from
        outside `clients`, spends the one share of all such (re-attack of attack pass 52).
        """
        self._dropped_last = False
        whose = account or client or ""
        if self._shedding and record.enforced is not False and not _left_host(record, went_out):
            self._shed_denial(whose)  # (one only reported went through: never shed)
            return None
        if self._failed_flushes and len(self._pending) >= self.max_pending and \
                not _left_host(record, went_out):
            self._lost(1)  # (not the oldest, which may be of what went out: review, pass 31)
            self._dropped_last = True  # (its answer, `after_flush` next, never leaves)
            return None
        if not name:
            encoded = record._encoded
            if encoded is None:
                encoded = _encoded(record)
                object.__setattr__(record, "_encoded", encoded)
            head, tail = encoded
        else:
            named = record._named
            if named is None:
                named = _named(record)
                object.__setattr__(record, "_named", named)
            if named and _json_safe(name):
                head, before, between, after = named
                tail = before + name + between + name + after
            else:  # the name needs escaping, or another field holds the hole's character
                head, tail = _encoded(replace(record, target=name, domain=name))
        if not client:
            body = head + tail
        elif _json_safe(client):
            body = head + ',"client":"' + client + '"' + tail
        else:
            body = head + ',"client":' + _encode(client) + tail
        if self.trail_bytes > self._spare_from and record.enforced is not False and \
                not _left_host(record, went_out) and body not in self._folds and \
                not self._spare_for(whose, len(body) + _LINE_OVERHEAD):
            self._shed_denial(whose)  # (a fold's repeats cost nothing: not charged)
            return None
        size = len(body) + _LINE_OVERHEAD
        if self.trail_bytes > self._spare_from and (
                record.enforced is False or _left_host(record, went_out)) and \
                self._stuck() and not self._kept(whose, size, refusable=budgeted):
            return self._refuse(whose)
        if self._shedding:
            if not budgeted:
                self._past_share[counted_as(whose)] += size
            elif not self._share_room(whose, size):  # (which takes the room)
                return self._refuse(whose)
        unsent = not _left_host(record, went_out) if self._failed_flushes else False
        if record.effect == _DENY:
            self._queue_denial(body, unsent)
        else:
            self._queue(body, unsent)
        return True

    def _queue(self, body: str, unsent: bool) -> None:
        """Stamp `body` (the encoded fields after the timestamp) and queue it for the flush
        (`unsent`: see `_Unsent`)."""
        line = self._opening() + body
        self._pending.append(_Unsent(line) if unsent else line)
        self._schedule()

    def _queue_denial(self, body: str, unsent: bool) -> None:
        """Queue a denial, or count it into this batch's fold of the same one (see "Folding")."""
        opening = self._opening()
        line = opening + body
        if unsent:
            line = _Unsent(line)
        seen = self._folds.setdefault(body, line)  # one hash of `body`: the common case's cost
        if seen is line:  # the first in this batch
            self._pending.append(line)
            self._schedule()
        elif type(seen) is not _Fold:  # the first repeat
            fold = self._folds[body] = _Fold(body, opening, not unsent)
            self._pending.append(fold)
            self._folded = True
        else:
            seen.add(opening, not unsent)

    @property
    def down(self) -> bool:
        """Records wait for a write that failed (a full disk, the size cap, a vanished file),
        unless the writer fails open: nothing that cannot be taken back (a query upstream, a
        connect's lookup) may go meanwhile, its record likely lost (attack pass 31: the agent
        filled the disk with its own denials, then sent data upstream in names)."""
        return bool(self._pending) and self._failed_flushes > 0 and not self.fail_open

    def room_for(self, client: str, size: int = _LINE_OVERHEAD * 3) -> bool:
        """Whether a record of `client`'s, of `size` bytes, may be written, the room taken
        when it may: always, unless the writer fails open, or the trail is past `SPARE_FILL`
        in young files and `client` spent its `KEEP_SHARE` (`_kept`), or past `DENIAL_SHARE`
        and it took its share of the room left (`_share_room`). The DNS listener asks before
        it sends a query upstream (whose answer must be recorded): a client past its share is
        refused there, not after, and every query in flight has taken its room (its answer is
        charged again when written: the share errs short, never long)."""
        if self.fail_open:
            return True
        return (not self._stuck() or self._kept(client, size)) and \
            self._share_room(client, size)

    def _share_room(self, client: str, size: int) -> bool:
        """Past `DENIAL_SHARE` (files come of age are looked for first, at most once a
        `SHED_NOTE_INTERVAL`): whether `client`'s records since, in this window
        (`SHARE_WINDOWS`), leave room for `size` bytes in its `CLIENT_SHARE` of the room left,
        taken when they do."""
        if not self._shedding:
            return True
        now = time.monotonic()
        if now >= self._share_pruned + SHED_NOTE_INTERVAL:
            try:
                self._make_room(0)
            except OSError:
                pass  # (at the cap itself: the share says no all the more)
        cap = self.max_total_bytes
        if not self._shedding or cap is None:
            return True
        if now >= self._share_since + self._share_window:
            self._past_share.clear()
            self._share_since = now
        left = cap - self.trail_bytes - _CHECKPOINT_ROOM
        key = counted_as(client)
        if self._past_share[key] + size > left * CLIENT_SHARE:
            return False
        self._past_share[key] += size
        return True

    def _refuse(self, client: str) -> Literal[False]:
        """A record of `client`'s refused, not written: counted, noted soon."""
        self.records_refused += 1
        self._count_shed(self._refused, client)
        return False

    def _spare_for(self, client: str, size: int) -> bool:
        """Whether a record that may be shed, of `size` bytes, fits `client`'s budget and
        everyone's now (taken from both when it does)."""
        mine = self._budget(self._spares, client, CLIENT_SHARE)
        now = time.monotonic()
        if not (mine.has(size, now) and self._spare_all.has(size, now)):
            return False
        mine.left -= size
        self._spare_all.left -= size
        return True

    def _budget(self, budgets: dict[str, _Budget], client: str, share: float) -> _Budget:
        """`client`'s budget in `budgets` (`share` of the cap each `min_age`; past `_SHED_KEYS`
        clients, the rest's together)."""
        key = counted_as(client)
        if key not in budgets and len(budgets) >= _SHED_KEYS:
            key = "others"
        budget = budgets.get(key)
        if budget is None:
            budget = budgets[key] = _Budget.of(cast(int, self.max_total_bytes), share,
                                               self.min_age)
        return budget

    def _stuck(self) -> bool:
        """Is the trail past `SPARE_FILL` of its cap in files too young to delete (what no
        pruning frees)? Measured again at most once a `SHED_NOTE_INTERVAL` while it is (files
        come of age)."""
        if self.trail_bytes - self._aged <= self._spare_from:
            return False
        now = time.monotonic()
        if now >= self._aged_at + SHED_NOTE_INTERVAL:
            self._aged_at = now
            self._aged = _aged_bytes(_rotated_stats(self.directory), self.min_age)
        return self.trail_bytes - self._aged > self._spare_from

    def _kept(self, client: str, size: int, refusable: bool = True) -> bool:
        """Whether a record that must be written, of `size` bytes, fits `client`'s budget of
        them (`KEEP_SHARE`), taken from it when it does; one that cannot be refused (what
        went out for it went) is taken past it."""
        budget = self._budget(self._keeps, client, KEEP_SHARE)
        if refusable and not budget.has(size, time.monotonic()):
            return False
        budget.left -= size
        return True

    def _shed_denial(self, client: str) -> None:
        """Count a denial instead of writing it; an `audit.shed` record says so within
        `SHED_NOTE_INTERVAL` (or with the next batch, or at the close)."""
        self.records_shed += 1
        self._count_shed(self._shed, client)

    def _count_shed(self, counts: Counter[str], client: str) -> None:
        """One more shed or refused for `client` (its loopback kin together; past
        `_SHED_KEYS` clients, the rest as one), noted soon."""
        key = counted_as(client)
        if key not in counts and len(counts) >= _SHED_KEYS:
            key = "others"
        counts[key] += 1
        self._shed_note_due()

    def _shed_note_due(self) -> None:
        if self._loop is not None and self._shed_timer is None:
            self._shed_timer = self._loop.call_later(SHED_NOTE_INTERVAL, self._note_shed)

    def _note_shed(self) -> None:
        """The timer's turn: note what was shed, and look again whether denials still must be
        (files may have come of age)."""
        self._shed_timer = None
        if self._prev is None or self._fd is None or self._vanished:
            return  # closed, or the file is to be opened anew by a batch, REOPENED first
        try:
            self._make_room(0)
        except OSError:
            return  # at the cap: nothing is written, and nothing failed
        try:
            self._write_shed_note()
        except OSError as exc:
            self._failed(exc)

    def _write_shed_note(self, need: int = 0, anyway: bool = False) -> None:
        """Write the `audit.shed` record of what was shed since the last, at most once a
        `SHED_NOTE_INTERVAL` (the timer comes back for the rest), if there is room under the
        cap for it beside `need` bytes more (else it keeps counting); `anyway` at the close."""
        if not self._shed and not self._refused:
            return
        now = time.monotonic()
        if not anyway and now < self._shed_noted + SHED_NOTE_INTERVAL:
            self._shed_note_due()
            return
        named = self._shed.most_common(SHED_NOTE_CLIENTS)
        fields: Record = {
            "action": SHED, "reason": "denials and answers from guardd's cache counted here, "
            f"not written one by one: past {SPARE_FILL:.0%} of the size cap "
            "(audit.maxTotalBytes), those of a client past its budget or of all past theirs; "
            f"past {DENIAL_SHARE:.0%} of the cap while no file was older than audit.minAge, "
            "all of them; `refused`: decisions refused for clients past their share of the "
            "room left",
            "count": sum(self._shed.values()), "clients": dict(named)}
        if len(self._shed) > len(named):
            fields["otherClients"] = len(self._shed) - len(named)
        if self._refused:
            fields["refused"] = sum(self._refused.values())
            fields["refusedClients"] = dict(self._refused.most_common(SHED_NOTE_CLIENTS))
        cap = self.max_total_bytes
        if not anyway and cap is not None and \
                self.trail_bytes + need + len(_encode(fields)) + _CHECKPOINT_ROOM > cap:
            return
        self._write_meta(fields)
        self._shed_noted = now
        self._shed.clear()
        self._refused.clear()

    def note_policies(self, reason: str, policies: Mapping[str, Mapping[str, str]] | None
                      ) -> None:
        """Add an `audit.policy` record to the chain: `reason` (a load, a reload, or
        why one was refused) and, for a load, each principal's files and their SHA-256
        (attack pass 17: rule ids alone may mean anything, and no record said which policy
        was in force, nor when it changed). The records queued go first; while the trail cannot
        be written, it waits with them."""
        if self._prev is None:  # (closed: a reload as guardd stops)
            log.warning("policies %s after the audit trail closed: not recorded", reason)
            return
        fields: Record = {"action": POLICY, "reason": reason, NOTES_TORN: True}
        if policies is not None:
            fields["policies"] = {name: dict(files) for name, files in policies.items()}
        # Queued behind the records the policies before it judged, and written with them, now
        # or when the trail can be written again (review: written apart, it went first).
        self._pending.append(_Note(self._opening() + _encode(fields)[1:]))
        self._folded = True  # (not a line alone: `_write_batch` tells it apart)
        self.flush()

    def write_now(self, record: AuditRecord, client: str | None = None,
                  went_out: bool | None = None) -> int | None:
        """`write` and `flush` at once, `record` in a batch of its own after the records queued
        before it (never folded into one of them), so that its number is known: returned (the
        decision id an answer can name), or None when a failing-open writer did not get it on
        disk. Raises AuditUnavailableError when answers may not leave (fail closed). A record
        something `went_out` for is written past the client's share too (it asked `room_for`
        before it sent anything): refusing it would leave what went out unrecorded; while the
        trail is down, it waits with the records before it (final attack: it was lost)."""
        if self._pending and not self.flush():
            if went_out:
                self._write(record, client, went_out=True, budgeted=False)
            else:  # (not kept: it would push out a record of what went out; lost, and said so:
                self._lost(1)  # session 56's attack, such refusals left no trace at all)
            raise AuditUnavailableError(_UNAVAILABLE)
        written = self._write(record, client, went_out=went_out,
                              budgeted=not (self.fail_open or went_out))  # (see `room_for`)
        if written is None:
            return None  # shed: no record of its own to name
        if written is False:
            raise AuditUnavailableError(
                "the audit trail is near its size cap with every file too young to delete, and "
                "this client's records took their share of the room left (or none is left): "
                "its decisions wait for room (audit.minAge, audit.maxTotalBytes)")
        if not self.flush():
            raise AuditUnavailableError(_UNAVAILABLE)
        return None if self._pending else self._seq - 1

    def after_flush(self, callback: Callable[[Unpack[Ts]], object], *args: Unpack[Ts],
                    withheld: Callable[[], object] | None = None) -> None:
        """Run `callback(*args)` right after the next flush that put every record queued so far
        on disk, e.g. send the answer to a logged query; or, if the answer is withheld for good
        (see `flush`), `withheld()`, so that whoever waits for it is not left waiting. At
        once when the last record was dropped as it came (review: the answer of a cached
        name, waiting with the rest, left unrecorded when the trail was written again).
        """
        if self._dropped_last:
            self.answers_withheld += 1
            if withheld is not None:
                _call(withheld)
            return
        self._after.append((callback, args, withheld))
        self._schedule()

    async def flushed(self) -> None:
        """Wait until everything recorded so far was flushed (needs `attach`); raises
        AuditUnavailableError when that will not happen (the trail is down, answers withheld)."""
        if self._loop is None:
            raise AuditError("AuditWriter.flushed() waits for a scheduled flush: call attach(loop)")
        done = self._loop.create_future()
        self.after_flush(_resolve, done, withheld=functools.partial(_withheld, done))
        await done

    def flush(self) -> bool:
        """Write the queued records with one write(2), then run the after-flush callbacks;
        True when answers may leave: every record queued is on disk (or `fail_open`).

        While the trail cannot be written (a full disk, the size cap, a vanished file), the
        callbacks wait with the records before them, retried every `retry_interval` seconds:
        fail closed, no answer leaves unrecorded (unless `fail_open`). Past `max_pending`,
        the answers that waited are withheld for good (counted in `answers_withheld`).
        """
        self._flush_scheduled = False
        self._folds.clear()  # the batch ends here: its folds are final
        if self._pending and time.monotonic() >= self._retry_at:
            self._write_pending()
        if self._pending and not self.fail_open:
            if len(self._after) > self.max_pending:
                self._withhold()
            return False
        callbacks, self._after = self._after, []
        for callback, args, _ in callbacks:
            _call(callback, *args)
        return True

    def _withhold(self) -> None:
        """Give up the answers held for records that cannot be written (their clients will
        ask again, or time out): the memory of an outage stays bounded."""
        callbacks, self._after = self._after, []
        self.answers_withheld += len(callbacks)
        for _, _, withheld in callbacks:
            if withheld is not None:
                _call(withheld)

    def _retry(self) -> None:
        self._retry_timer = None
        if self._prev is not None:  # not closed meanwhile
            self.flush()

    def close(self) -> None:
        """Flush, write the shutdown checkpoint, close the file; records that still cannot be
        written are lost (logged)."""
        self._retry_at = 0.0  # one last attempt, whenever the previous one failed
        self.flush()
        if self._pending:
            log.error("%d audit records could not be written before close and are lost",
                      len(self._pending))
            self._pending.clear()
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._shed_timer is not None:
            self._shed_timer.cancel()
            self._shed_timer = None
        self._withhold()
        self._loop = None  # a failed shutdown checkpoint schedules no retry
        if self._prev is not None:
            try:
                self._write_shed_note(anyway=True)
                self._checkpoint(SHUTDOWN)
            except OSError as exc:
                self._failed(exc)
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)
        self._release_lock()
        self._prev = None
        if self.mirror is not None:
            self.mirror.close()
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
        """Write the batch; on failure count and log (once per outage), keep it, and drop what
        is past `max_pending`."""
        try:
            self._write_batch()
        except OSError as exc:
            self._failed(exc)
            self._drop_excess()
            return
        if self._failed_flushes:
            log.warning("audit trail written again after %d failed flushes; %d records dropped "
                        "since start", self._failed_flushes, self.records_dropped)
            self._failed_flushes = 0
            self._dropped_last = False  # (its answer was withheld: the next is another's)

    def _failed(self, exc: OSError) -> None:
        self.write_errors += 1
        self._retry_at = time.monotonic() + self.retry_interval
        if self._loop is not None and self._retry_timer is None:  # held answers wait for it
            self._retry_timer = self._loop.call_later(self.retry_interval, self._retry)
        if not self._failed_flushes:
            log.error("cannot write the audit trail in %s: %s; %d records kept, retried "
                      "every %gs (until a write succeeds, failures are only counted)",
                      self.directory, exc, len(self._pending), self.retry_interval)
        self._failed_flushes += 1

    def _drop_excess(self) -> None:
        """Drop records past `max_pending`, the oldest of those nothing went out for first,
        counted (an `audit.dropped` record says how many); once it is full, a record nothing
        went out for is dropped as it comes (`_write`). Never a policy load (`_Note`): which
        policy judged outlives what it judged, in its place before the records kept (review:
        it went without a trace)."""
        pending = self._pending
        excess = len(pending) - self.max_pending
        if excess <= 0:
            return
        self._withhold()  # some waited for the records dropped now
        # (the oldest records nothing went out for first: review, a record of what went out
        # was pushed out while newer refusals stayed; then the oldest others)
        unsent: list[int] = []
        others: list[int] = []
        for at, item in enumerate(pending):
            if not isinstance(item, _Note):
                (unsent if type(item) is _Unsent or type(item) is _Fold and not item.out
                 else others).append(at)
        dropped = set((unsent + others)[:excess])
        kept: list[str | _Fold | _Note] = []
        for at, item in enumerate(pending):
            if at not in dropped:
                kept.append(item)
            else:
                self._lost(1 if isinstance(item, str) else item.count)
        pending.clear()
        pending.extend(kept)

    def _lost(self, count: int) -> None:
        """`count` records dropped in an outage, counted and said in the trail when it is
        written again."""
        self.records_dropped += count
        self._unnoted_drops += count

    @property
    def mirror_dropped(self) -> int:
        """Records the mirror (stdout) could not take, if there is one."""
        return self.mirror.dropped if self.mirror is not None else 0

    def _write_batch(self) -> None:
        if self._prev is None:
            raise AuditError("AuditWriter.open() must be called before records are flushed")
        if self._fd is None:  # a failed rotation (or a vanished file) closed it
            self._open_file()
        else:
            self._check_file()
        self._reopened_first()
        self._torn_first()
        pending = self._pending
        bodies = [item if isinstance(item, str) else item.line() for item in pending] \
            if self._folded else cast("deque[str]", pending)  # (nothing folded: lines only)
        head = self._seq
        lines, heads, batch = self._chain(bodies)
        size = len(batch)
        rotate = self._size > 0 and self._size + size > self.max_bytes
        need = size + _CHECKPOINT_ROOM if rotate else size
        self._make_room(need)
        self._write_shed_note(need)
        if rotate:
            self._rotate(need)
        if self._unnoted_drops:
            self._write_meta({"action": DROPPED, "reason": "records lost: the trail could not be "
                              "written, and more than max_pending records were waiting or "
                              "nothing went out for them",
                              "count": self._unnoted_drops})
            self._unnoted_drops = 0
        if self._seq != head:  # checkpoints went first: chain the batch to them
            lines, heads, batch = self._chain(bodies)
        done = self._append(lines, heads, batch)
        notes = 0
        if not self._folded:
            for _ in range(done):
                pending.popleft()
        else:
            for _ in range(done):
                item = pending.popleft()
                if isinstance(item, _Note):
                    notes += 1
                elif not isinstance(item, str):
                    self.records_compacted += item.count - 1
            self._folded = any(not isinstance(item, str) for item in pending)
        self.records_written += done - notes
        if done and self._loop is not None and self.checkpoint_interval and \
                self._checkpoint_timer is None:
            self._checkpoint_timer = self._loop.call_later(self.checkpoint_interval,
                                                           self._interval_checkpoint)
        if done < len(lines) or self._needs_newline:
            raise OSError(f"short write: {done} of {len(lines)} records reached the disk whole")

    def _check_file(self) -> None:
        """Fail the write when the file at the trail's path is no longer the one written to
        (deleted or replaced under guardd): what is written on would go with it, unseen. The
        next attempt opens a new file there, and its first record (`REOPENED`) says why."""
        if self._gone():
            raise OSError(errno.ENOENT,
                          f"{CURRENT} was deleted or replaced while guardd wrote it")

    def _gone(self) -> bool:
        """Whether the file at the trail's path is no longer the one written to; if so it is
        closed, and the next file opened there begins with `REOPENED`."""
        try:
            stat = os.stat(self._current_path)
            if (stat.st_dev, stat.st_ino) == self._file_id:
                return False
        except FileNotFoundError:
            pass
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        self._vanished = True
        self.trail_bytes = sum(path.stat().st_size for path in _trail_files(self.directory))
        return True

    def _make_room(self, need: int) -> None:
        """Under a size cap: delete the oldest files old enough to go while the trail, with
        `need` bytes more, is past `DENIAL_SHARE` of the cap; shed denials while it still is;
        raise OSError when it would be past the cap itself."""
        if self.max_total_bytes is None:
            return
        now = time.monotonic()
        if now >= self._disk_checked + DISK_CHECK_INTERVAL:
            self._fit_to_disk()
        cap = self.max_total_bytes
        reserve = cap - int(cap * DENIAL_SHARE)  # the room left to all but denials
        if self.trail_bytes + need > cap or (self.trail_bytes + need + reserve > cap and (
                not self._shedding or now >= self._share_pruned + SHED_NOTE_INTERVAL)):
            # (on the way past the share at once; once past it, files coming of age are
            # looked for once a second, not a batch)
            self._share_pruned = now
            self._prune(RETENTION, need + reserve + _CHECKPOINT_ROOM)  # (and its checkpoint)
        shedding = self.trail_bytes + need + reserve > cap
        if shedding and not self._shedding:
            log.warning("the audit trail is past %.0f%% of its size cap of %d bytes "
                        "(audit.maxTotalBytes) even without the rotated files older than the "
                        "minimum age of %gs (audit.minAge): denials are counted in %s records, "
                        "not written one by one, until there is room", DENIAL_SHARE * 100, cap,
                        self.min_age, SHED)
        if not shedding:
            self._past_share.clear()
        elif not self._shedding:
            self._share_since = now
        self._shedding = shedding
        if self.trail_bytes + need > cap:
            raise OSError(errno.EDQUOT, (
                f"the trail is at its size cap of {cap} bytes (audit.maxTotalBytes) even "
                f"without the rotated files older than the minimum age of {self.min_age:g}s "
                "(audit.minAge): new records wait, then are dropped, rather than delete "
                "younger files"))

    def _fit_to_disk(self) -> None:
        """The cap: the configured one, or `DISK_SHARE` of what the trail's filesystem can hold
        when that is less; the budgets measured against it scaled with it, and the files to a
        quarter of it in `keep + 1` (a file of the configured size might never rotate under
        it, and one never rotated is never deleted). A filesystem that tells no size (ramfs,
        some FUSE ones: 0 blocks) leaves them as they are (the review: the cap went to 0)."""
        self._disk_checked = time.monotonic()
        configured, cap = self.configured_total_bytes, self.max_total_bytes
        if configured is None or cap is None:
            return
        try:
            disk = os.statvfs(self.directory)
        except OSError:
            return  # (what the disk holds is then found out by a write)
        if not disk.f_blocks:
            return
        room = self.trail_bytes + disk.f_bavail * disk.f_frsize
        fits = min(configured, max(int(room * DISK_SHARE), _LEAST_FILE))
        if fits == cap:
            return
        self.max_total_bytes = fits
        self.max_bytes = min(self.configured_bytes,
                             max(fits // (4 * (self.keep + 1)), _LEAST_FILE))
        if self._spare_from != math.inf:
            self._spare_from = SPARE_FILL * fits
        for budget in (self._spare_all, *self._spares.values(), *self._keeps.values()):
            budget.scale(fits / cap)
        if fits == configured:
            log.warning("the audit trail's size cap is audit.maxTotalBytes again, %d bytes: "
                        "its filesystem can hold it", fits)
            self._cap_told = None
        elif self._cap_told is None or fits < self._cap_told * DISK_SHARE:
            self._cap_told = fits
            log.warning("the audit trail's size cap (audit.maxTotalBytes) does not fit in "
                        "what its filesystem can hold, %d bytes (what it takes there and what "
                        "is free): it is now %d bytes, and its files %d bytes (audit.maxBytes), "
                        "so that shedding and each client's share start before the disk fills "
                        "(files within audit.keep are deleted for the configured cap alone); "
                        "give the trail a filesystem of its own, or a cap that fits", room,
                        fits, self.max_bytes)

    def _chain(self, bodies: Iterable[str]) -> tuple[list[bytes], list[str], bytes]:
        """The lines for `bodies`, numbered and chained from the current head, their hashes, and
        the batch to write."""
        lines: list[bytes] = []
        heads: list[str] = []
        prev, seq = self._prev, self._seq
        for body in bodies:
            line = f'{body[:-1]},"seq":{seq},"prev":"{prev}"}}'.encode()
            prev = _digest(line)
            seq += 1
            lines.append(line)
            heads.append(prev)
        return lines, heads, b"\n".join(lines) + b"\n"

    def _append(self, lines: list[bytes], heads: list[str], batch: bytes) -> int:
        """Write a chained batch with one write(2); advance the chain past the records wholly on
        disk and return how many."""
        lead = b"\n" if self._needs_newline else b""
        written = os.write(self._fd, lead + batch)  # type: ignore[arg-type]
        if self.sync:
            os.fdatasync(self._fd)  # type: ignore[arg-type]
        self._size += written
        self.trail_bytes += written
        written -= len(lead)
        if written >= 0:
            self._needs_newline = False
        done = 0
        for line in lines:
            if written < len(line):
                # Torn: never valid JSON; the next write starts after it and chains past it.
                if written > 0:
                    self._needs_newline = self._torn = True
                    if self._torn_sha256 is None:
                        self._torn_sha256 = _digest(line[:written])
                break
            done += 1
            if written == len(line):  # whole record, its newline missing
                self._needs_newline = True
                break
            written -= len(line) + 1
        if done:
            if self._start_due:
                self._start_due = False
                self._anchor(START, self._seq, heads[0])
            self._prev = heads[done - 1]
            self._seq += done
            if self.mirror is not None:
                self.mirror.put(batch if done == len(lines) else
                                b"".join(line + b"\n" for line in lines[:done]), done)
        return done

    def _write_meta(self, fields: Record) -> tuple[int, str]:
        """Write one of the trail's own records now, on its own; returns its number and hash.
        Raises OSError unless it reached the disk whole. A file deleted or replaced under
        guardd gets none (session 55's attack: a shutdown checkpoint went into the deleted
        one, its hash into the anchor): a new one, its `REOPENED` first."""
        if self._fd is None or self._gone():
            self._open_file()
        if fields["action"] not in (REOPENED, TORN, UNANCHORED_END):
            self._reopened_first()
            self._torn_first()
        lines, heads, batch = self._chain([self._opening() + _encode(fields)[1:]])
        if not self._append(lines, heads, batch):
            raise OSError(f"the {fields['action']} record did not reach the disk whole")
        return self._seq - 1, heads[0]

    def _reopened_first(self) -> None:
        """A file opened anew after the one written to vanished: its first record says so,
        whatever record (a batch, a checkpoint, a note) opened it."""
        if self._vanished:  # until it is on disk, before any other record of the new file
            self._write_meta({"action": REOPENED, "reason": (
                f"{CURRENT} was deleted or replaced while guardd wrote it: the records it "
                "held are gone, and the chain from them to this one cannot be checked"),
                NOTES_TORN: True})
            self._vanished = False

    def _torn_first(self) -> None:
        """After a write cut short, the next record says so (`TORN`), before any other; then,
        at a start on an unanchored end, the next says that (`UNANCHORED_END`)."""
        if self._torn:
            fields: Record = {"action": TORN, "reason": _TORN_REASON}
            if self._torn_sha256 is not None:
                fields[TORN_SHA256] = self._torn_sha256
            self._write_meta(fields)
            self._torn, self._torn_sha256 = False, None
        if self._unanchored_end:  # (until it is on disk: re-attack, a full disk lost it)
            self._write_meta({"action": UNANCHORED_END, "reason": _UNANCHORED_REASON})
            self._unanchored_end = False

    def _checkpoint(self, reason: str, **pruned: object) -> bool:
        """Write a checkpoint, then append its number and hash to the anchor and the log;
        whether the anchor got it."""
        return self._anchor(reason, *self._write_meta(
            {"action": CHECKPOINT, "reason": reason, **pruned}))

    def _anchor(self, reason: str, seq: int, head: str) -> bool:
        """Append record `seq`'s number and hash to the anchor and the log; whether the anchor
        got it."""
        log.info("audit anchor entry (%s): seq %d sha256 %s", reason, seq, head)
        entry = _encode({"timestamp": self._opening()[_STAMP], "reason": reason, "seq": seq,
                         "sha256": head}) + "\n"
        if not _ends_line(self.anchor):  # (after an entry a full disk tore: attack pass,
            entry = "\n" + entry  #          2026-12-06, the next went on its line)
        try:
            fd = os.open(self.anchor, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o640)
            try:
                if os.write(fd, entry.encode()) != len(entry):
                    raise OSError(errno.ENOSPC, "the entry was cut short (a full disk?)")
            finally:
                os.close(fd)
        except OSError as exc:
            self.write_errors += 1
            log.error("cannot append to the audit anchor %s: %s; the entry is only in the log",
                      self.anchor, exc.strerror or exc)
            return False
        return True

    def _interval_checkpoint(self) -> None:
        self._checkpoint_timer = None
        try:
            self._checkpoint(INTERVAL)
        except OSError as exc:
            self._failed(exc)

    def _rotate(self, need: int) -> None:
        """audit.jsonl -> .1 -> .2 ...; then retention, which writes the rotation checkpoint."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        for index, path in reversed(_rotated(self.directory)):
            os.replace(path, self.directory / f"{CURRENT}.{index + 1}")
        os.replace(self.directory / CURRENT, self.directory / f"{CURRENT}.1")
        self._open_file()
        self._prune(ROTATION, need)

    def _prune(self, reason: str, need: int) -> None:
        """Delete the oldest rotated files while more than `keep` are left or the trail, with
        `need` bytes more, is over `max_total_bytes`; never one younger than `min_age`. A
        checkpoint naming what goes is written first (for a rotation, always)."""
        oldest_first = [(index, path, path.stat())
                        for index, path in reversed(_rotated(self.directory))]
        total = self.trail_bytes = self._size + sum(st.st_size for _, _, st in oldest_first)
        cap = self.configured_total_bytes  # (not a cap the disk lowered: the review, a disk
        #   full for seconds deleted files within `keep`)
        young = time.time() - self.min_age
        doomed: list[tuple[Path, int]] = []
        holding = False
        # A file is within `keep` while the files newer than it hold no more than `keep` files of
        # the configured size, when the cap holds that many (session 56's re-attack: files a
        # disk full for seconds made small pushed full ones past `keep` by count; its last
        # attack: so did a size measured when the trail opened on a disk nearly full); of the
        # size the disk made them otherwise (a disk too small for the configured files).
        keep_bytes = self.keep * self.configured_bytes
        if self.max_total_bytes is not None and keep_bytes > self.max_total_bytes:
            keep_bytes = self.keep * self.max_bytes
        newer = total - self._size  # (the rotated files' bytes, this one's and newer ones')
        for index, path, stat in oldest_first:
            if (index <= self.keep or newer <= keep_bytes) and (
                    cap is None or total + need <= cap):
                break
            newer -= stat.st_size
            if self.min_age and stat.st_mtime > young:
                holding = index > self.keep
                break
            doomed.append((path, stat.st_size))
            total -= stat.st_size
        if holding and not self._holding:
            log.warning("keeping rotated audit files beyond keep=%d: they are younger than the "
                        "minimum age of %gs (audit.minAge); the trail grows up to %s bytes "
                        "(audit.maxTotalBytes), then new records are dropped", self.keep,
                        self.min_age, cap if cap is not None else "unlimited")
        self._holding = holding
        self._aged = _aged_bytes((stat for _, _, stat in oldest_first[len(doomed):]),
                                 self.min_age)
        self._aged_at = time.monotonic()
        if not doomed and reason != ROTATION:
            return
        pruned: Record = {}
        if doomed:
            kept = [path for _, path, _ in oldest_first[len(doomed):]]
            first = _first_record([*kept, self.directory / CURRENT])
            # No record kept: the checkpoint itself comes first.
            seq, prev = (self._seq, self._prev) if first is None else (first.get("seq"),
                                                                       first.get("prev"))
            if _is_seq(seq):  # else the first record kept predates numbering
                pruned = {"prunedThrough": seq - 1, "prunedHead": prev}  # type: ignore[operator]
        if not self._checkpoint(reason, **pruned) and doomed:  # (review, 2026-12-06: verify
            #   takes an unanchored checkpoint's word for nothing, so the deletion looked forged)
            raise OSError(errno.EIO, f"the audit anchor {self.anchor} cannot be written: no "
                          "file is deleted behind a checkpoint it does not hold")
        for path, size in doomed:
            path.unlink()
            self.trail_bytes -= size

    def _open_file(self) -> int:
        fd = os.open(self.directory / CURRENT,
                     os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        stat = os.fstat(fd)
        self._file_id = (stat.st_dev, stat.st_ino)
        self._size = stat.st_size
        self._needs_newline = self._size > 0 and os.pread(fd, 1, self._size - 1) != b"\n"
        if self._needs_newline and self._torn_sha256 is None:  # (a crash's)
            self._torn_sha256 = _torn_tail_digest(self.directory / CURRENT)
        self._torn = self._torn or self._needs_newline  # (kept past a rotation)
        self._fd = fd
        return fd


@dataclass(slots=True)
class _Budget:
    """Bytes that may be written now (`left`): `depth` at most, refilled at `rate` a second
    since `at` (time.monotonic())."""

    depth: float
    rate: float
    left: float
    at: float

    @classmethod
    def of(cls, cap: int, share: float, min_age: float) -> _Budget:
        """`share` of `cap`, full, and that again each `min_age`."""
        depth = share * cap
        return cls(depth, depth / min_age if min_age else math.inf, depth, time.monotonic())

    def scale(self, factor: float) -> None:
        """The cap it is a share of is now `factor` of what it was."""
        self.depth *= factor
        self.rate *= factor
        self.left *= factor

    def has(self, size: float, now: float) -> bool:
        """Refilled to `now`: are `size` bytes left?"""
        self.left = min(self.depth, self.left + (now - self.at) * self.rate)
        self.at = now
        return self.left >= size


#: What a writer from before `TORN` notes wrote first after a torn line: at its start, or in
#: a file opened anew (review; and before them, the same record again after a short write).
_STARTED = {REOPENED: None, POLICY: LOADED_AT_START}
#: A record's time stamp as `_opening()` writes it (a digit for each 0).
_STAMP_SHAPE = b"0000-00-00T00:00:00.000Z"
_STAMPED = len(_RECORD_START) + len(_STAMP_SHAPE)
_DIGITS = frozenset(b"0123456789")
#: How what a start may write first after a shutdown checkpoint goes on after its time stamp:
#: its policy record, a checkpoint, or (that checkpoint not anchored) its `UNANCHORED_END` note.
_STARTS_BEGIN = (f'","action":"{POLICY}","reason":"{LOADED_AT_START}"'.encode(),
                 f'","action":"{CHECKPOINT}"'.encode(),
                 f'","action":"{UNANCHORED_END}","reason":{json.dumps(_UNANCHORED_REASON)}'
                 .encode())
#: A note of a torn line's reason; the field that holds the torn line's SHA-256 (attack pass
#: 48 left open, 49 closed: without it, the line before a note could be swapped for another).
_TORN_REASON = ("the line before this record's is what a write cut short left (a crash or a "
                "full disk); the chain goes on from the last whole record")
TORN_SHA256 = "tornSha256"
#: How a note of a torn line goes on after its time stamp to its reason's end; then, cut
#: anywhere, its hash of the torn line (none from a writer before 49), number and prev.
_TORN_NOTE = f'","action":"{TORN}","reason":{json.dumps(_TORN_REASON)}'.encode()


def _cut_anywhere(*parts: str) -> str:
    """A pattern for any start of `parts` in turn: each a text, or `HEX` (64 hex digits) or
    `DIGITS` (a number), which may be cut too."""
    if not parts:
        return ""
    first, *rest = parts
    whole, cut = _FIELD_VALUES.get(first, (None, None))
    if whole is None:
        after = _cut_anywhere(first[1:], *rest) if first[1:] else _cut_anywhere(*rest)
        return f"(?:{re.escape(first[0])}{after})?"
    return f"(?:{cut}|{whole}{_cut_anywhere(*rest)})"


_FIELD_VALUES = {"HEX": ("[0-9a-f]{64}", "[0-9a-f]{0,63}"),
                 "DIGITS": ("[0-9]{1,20}", "[0-9]{0,20}")}
_TORN_NOTE_END = re.compile(_cut_anywhere(
    f',"{TORN_SHA256}":"', "HEX", '","seq":', "DIGITS", ',"prev":"', "HEX", '"').encode() + b"|" +
    _cut_anywhere(',"seq":', "DIGITS", ',"prev":"', "HEX", '"').encode())


def _ends_line(path: Path) -> bool:
    """Does the file at `path` end a line (or hold nothing, or not exist, or not let itself be
    read: then nothing can be told, and a line is taken as ended)?"""
    try:
        with path.open("rb") as file:
            if file.seek(0, os.SEEK_END) == 0:
                return True
            file.seek(-1, os.SEEK_END)
            return file.read(1) == b"\n"
    except OSError:
        return True


def _call(callback: Callable[..., object], *args: object) -> None:
    """One answer's callback: its failure is logged, and the other answers still go."""
    try:
        callback(*args)
    except Exception:
        log.exception("callback %r after an audit flush failed", callback)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the waiter may have been cancelled
        future.set_result(None)


_UNAVAILABLE = "the audit trail cannot be written; no answer leaves unrecorded"


def _withheld(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(AuditUnavailableError(_UNAVAILABLE))


def _digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def _load(line: bytes) -> object:
    """The JSON value on a line, or _NOT_JSON."""
    try:
        return json.loads(line)
    except ValueError:
        return _NOT_JSON


def _parse(line: bytes) -> Record | None:
    """The record on a line, or None for a line that is not one (torn, or changed)."""
    value = _load(line)
    return value if isinstance(value, dict) else None


def _begins(torn: bytes, start: bytes, runs_on: bool = False) -> bool:
    """Is `torn` a record that goes on as `start` after its time stamp (one as `_opening()`
    writes it), cut anywhere in it (or, `runs_on`, past it)? (With the rest of a whole line
    for `start`: that line written again at another time, after a short write.)"""
    stamp, rest = torn[len(_RECORD_START):_STAMPED], torn[_STAMPED:]
    return all(byte in _DIGITS if shape == 0x30 else byte == shape
               for byte, shape in zip(stamp, _STAMP_SHAPE)) and \
        (start.startswith(rest) or runs_on and rest.startswith(start))


def _a_torn_note(torn: bytes) -> bool:
    """Is `torn` the writer's note of a torn line, cut anywhere: its text, then at most its
    number and hash (netns attack: `"action":"audit.torn"` and an allowed connect's fields
    after it passed)?"""
    return _begins(torn, _TORN_NOTE) or (
        _begins(torn, _TORN_NOTE, runs_on=True)
        and _TORN_NOTE_END.fullmatch(torn, _STAMPED + len(_TORN_NOTE)) is not None)


def _torn(line: bytes) -> bool:
    """Could `line` (not JSON) be what a crash left of a record: its start, cut anywhere?"""
    return (line[:len(_RECORD_START)] == _RECORD_START[:len(line)]
            and _PRINTABLE_ASCII.fullmatch(line) is not None)


def _rotated(directory: Path) -> list[tuple[int, Path]]:
    """Rotated files as (index, path), newest (.1) first."""
    found = []
    for path in directory.glob(f"{CURRENT}.*"):
        suffix = path.name[len(CURRENT) + 1:]
        if _ROTATED_SUFFIX.fullmatch(suffix):
            found.append((int(suffix), path))
    return sorted(found)


def _rotated_stats(directory: Path) -> Iterator[os.stat_result]:
    """The rotated files' stats (one gone meanwhile left out)."""
    for _, path in _rotated(directory):
        with contextlib.suppress(OSError):
            yield path.stat()


def _aged_bytes(stats: Iterable[os.stat_result], min_age: float) -> int:
    """What the rotated files of `stats` older than `min_age` (by their last write) hold: what
    pruning may free."""
    if not min_age:
        return 0
    young = time.time() - min_age
    return sum(stat.st_size for stat in stats if stat.st_mtime <= young)


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
        raise AuditError(f"no audit trail in {terminal_safe(str(directory))}: {CURRENT} not "
                         "found; give the directory set as the audit directory in the daemon "
                         "configuration")
    return files


@contextlib.contextmanager
def _opened_trail(directory: Path) -> Iterator[list[tuple[Path, typing.BinaryIO]]]:
    """The trail's files (`_existing_trail`), each opened, as one snapshot: a live trail
    rotates and prunes as it is read, and files read by name one after the other were then
    others than those listed (attack pass, 2026-12-06: `audit verify` during a flood said
    records were missing, and failed with a traceback on a file pruned meanwhile). Opened,
    a file stays the one listed; they are opened again while a rotation came between the
    listing and the opening."""
    directory = Path(directory)
    for _ in range(_SNAPSHOT_ATTEMPTS):
        files = _existing_trail(directory)
        if len(files) > _FEW_FILES:
            descriptor_limit()  # (the soft limit up to the hard one, as the daemon's is)
        opened: list[tuple[Path, typing.BinaryIO]] = []
        try:
            try:
                for path in files:
                    opened.append((path, path.open("rb")))
            except FileNotFoundError:
                continue  # (pruned after the listing: list again)
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                raise AuditError(f"the trail has {len(files)} files, more than this process "
                                 "may hold open at once: raise its open-files limit (ulimit -n)"
                                 ) from None
            if _still_the_trail(directory, opened):
                yield opened
                return
        finally:
            for _, file in opened:
                file.close()
    raise _rotating(directory)


def _rotating(directory: Path) -> AuditError:
    return AuditError(f"the trail in {terminal_safe(str(directory))} kept rotating as it was "
                      "read (guardd writing fast), and what was read of it did not chain: "
                      "run this again when guardd writes less")


def _still_the_trail(directory: Path, opened: list[tuple[Path, typing.BinaryIO]]) -> bool:
    """Are the `opened` files still the trail, under the same names (none rotated or pruned
    since; the current one may have grown)?"""
    if _trail_files(directory) != [path for path, _ in opened]:
        return False
    for path, file in opened:
        try:
            named = os.stat(path)
        except FileNotFoundError:
            return False
        held = os.fstat(file.fileno())
        if (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            return False
    return True


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its newline) for each line of a file."""
    with path.open("rb") as file:
        yield from _numbered(file)


def _numbered(file: typing.BinaryIO) -> Iterator[tuple[int, bytes]]:
    """`_numbered_lines` of a file opened already, up to a line without its newline, the last:
    the file's end, or a write still under way whose rest would be read as another line
    (review, 2026-12-06: a reader may see a write's first page before the rest, and
    `verify` took the rest for an inserted line)."""
    for number, line in enumerate(file, 1):
        if not line.endswith(b"\n"):
            yield number, line
            return
        yield number, line[:-1]


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


def _torn_tail_digest(path: Path) -> str:
    """The SHA-256 of a file's last line, which does not end (read back in blocks to its
    start, then hashed forward: bounded memory, however long)."""
    with path.open("rb") as file:
        end = position = file.seek(0, os.SEEK_END)
        while position > 0:
            step = min(_TAIL_BLOCK, position)
            file.seek(position - step)
            newline = file.read(step).rfind(b"\n")
            position -= step
            if newline != -1:
                position += newline + 1
                break
        digest = hashlib.sha256()
        file.seek(position)
        while position < end:
            block = file.read(min(_TAIL_BLOCK, end - position))
            if not block:
                break
            digest.update(block)
            position += len(block)
        return digest.hexdigest()


def _newest_anchored(anchor: Path) -> tuple[int, str] | None:
    """The number and hash of the newest entry in an anchor file (None: it has none, or it
    cannot be read: then the start notes its end as unanchored)."""
    try:
        for line in _lines_backwards(anchor):
            entry = _parse(line)
            if entry is not None and _is_seq(entry.get("seq")):
                return entry["seq"], entry.get("sha256")  # type: ignore[return-value]
    except OSError:
        pass
    return None


def _chain_head(directory: Path) -> tuple[str, int, bool]:
    """`prev` and `seq` of the next record: the newest record on disk, past any torn lines,
    hashed and counted on (0 after a record from before numbering); and whether that record
    is a shutdown checkpoint."""
    for path in reversed(_trail_files(directory)):
        for line in _lines_backwards(path):
            record = _parse(line)
            if record is not None:
                seq = record.get("seq")
                return (_digest(line), seq + 1 if _is_seq(seq) else 0,  # type: ignore[operator]
                        record.get("action") == CHECKPOINT and record.get("reason") == SHUTDOWN)
    return GENESIS, 0, False


def _first_record(files: list[Path]) -> Record | None:
    for path in files:
        if path.exists():
            for _, line in _numbered_lines(path):
                record = _parse(line)
                if record is not None:
                    return record
    return None


def _text(value: object) -> str:
    """A field as a filter compares it: as the trail writes it (`enforced=false`)."""
    return json.dumps(value) if isinstance(value, bool) else str(value)


def iter_records(directory: Path, *, since: datetime | None = None,
                 until: datetime | None = None, filters: Mapping[str, str] | None = None,
                 include_trail: bool = False) -> Iterator[Record]:
    """Records in write order with `since <= timestamp < until`, whose fields equal every filter;
    the trail's own records (checkpoints, notes of dropped records) only with `include_trail`.

    Filters compare the field's text, so `port=443` matches the number 443.
    """
    wanted = dict(filters or {})
    unknown = sorted(wanted.keys() - set(COLUMNS))
    if unknown:
        raise AuditError(f"cannot filter on {', '.join(map(terminal_safe, unknown))}: not an "
                         f"audit field; the fields are {', '.join(COLUMNS)}")
    for bound in (since, until):
        if bound is not None and bound.tzinfo is None:
            raise AuditError(f"time bound {bound.isoformat()} has no time zone; give it in UTC")
    _existing_trail(directory)  # (its error now, not at the first record)
    return _select(directory, since, until, wanted, include_trail)


def _select(directory: Path, since: datetime | None, until: datetime | None,
            wanted: dict[str, str], include_trail: bool) -> Iterator[Record]:
    timed = since is not None or until is not None
    with _opened_trail(directory) as opened:
        for _, file in opened:
            for _, line in _numbered(file):
                record = _parse(line)
                if record is None:  # a torn line; verify() reports it
                    continue
                if not include_trail and str(record.get("action")).startswith(TRAIL_ACTIONS):
                    continue
                if timed and not _within(record, since, until):
                    continue
                if all(name in record and _text(record[name]) == value
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


def terminal_safe(text: str, *, keep_backslashes: bool = False) -> str:
    """`text` with every character a terminal or spreadsheet could act on, or that could be taken
    for another (controls and so escape sequences, bidi and other format characters, line
    separators, lone surrogates, any non-printable), and the backslash, written as its Python
    escape (`\\x1b`, `\\u202e`, `\\\\`); printable text, non-ASCII letters included, stays.
    `keep_backslashes` leaves backslashes as they are, for messages whose parts were already
    escaped (a repr-quoted host, a path from `AuditError`): they read the same, not doubled."""
    escape = "" if keep_backslashes else "\\"
    if text.isprintable() and (not escape or escape not in text):
        return text
    return "".join(char if char.isprintable() and (not escape or char != escape)
                   else repr(char)[1:-1] for char in text)


def format_records(records: Iterable[Record], fmt: str) -> Iterator[str]:
    """Render records for `audit export`; the pieces, joined, are the whole document.

    `json` and `csv` leave `prev` out (readers want the decisions); `jsonl` keeps records as
    stored. CSV columns are always COLUMNS, so every export has the same header.
    """
    try:
        formatter = _FORMATTERS[fmt]
    except KeyError:
        raise AuditError(f"unknown export format {terminal_safe(repr(fmt))}; use one of "
                         f"{', '.join(_FORMATTERS)}") from None
    return formatter(records)


def _decision(record: Record) -> Record:
    return {name: value for name, value in record.items() if name != "prev"}


def _format_json(records: Iterable[Record]) -> Iterator[str]:
    """One JSON array, pretty-printed as in SafeClaw's sample output, streamed record by record.
    ASCII only: json.dumps escapes everything else."""
    opener = "[\n"
    for record in records:
        yield opener + textwrap.indent(json.dumps(_decision(record), indent=2), "  ")
        opener = ",\n"
    yield "[]\n" if opener == "[\n" else "\n]\n"


def _format_jsonl(records: Iterable[Record]) -> Iterator[str]:
    for record in records:
        yield _encode(record) + "\n"


def _cell(value: object) -> object:
    """A CSV cell: text made terminal-safe and never the start of a formula."""
    if not isinstance(value, str):
        return value
    text = terminal_safe(value)
    return "'" + text if text.lstrip(" ")[:1] in _FORMULA_LEADS else text


def _format_csv(records: Iterable[Record]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({name: _cell(value) for name, value in record.items()})
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()  # the header alone when there was no record


_FORMATTERS: dict[str, Callable[[Iterable[Record]], Iterator[str]]] = {
    "json": _format_json, "jsonl": _format_jsonl, "csv": _format_csv}


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What `verify` found: counts, the first broken link if any, and what it accepted."""

    #: Decision records on disk (a folded record is one) and the files holding them.
    records: int
    files: int
    #: "file:line: what is wrong" for the first broken link; None when the chain holds.
    first_error: str | None = None
    warnings: tuple[str, ...] = ()
    #: The trail's own records: checkpoints and notes of dropped records.
    checkpoints: int = 0
    #: Numbers of the first and last record on disk (None: none is numbered).
    first_seq: int | None = None
    last_seq: int | None = None
    #: The anchor file checked (None: none), and its entries that matched a record on disk.
    anchor: str | None = None
    anchored: int = 0

    @property
    def ok(self) -> bool:
        return self.first_error is None


def verify(directory: Path, anchor: Path | None = None) -> VerifyReport:
    """Walk the chain from the oldest file to the current one and name the first broken link.

    `anchor` is a copy of the anchor file (see "Checkpoints"); by default the trail directory's
    own, when there is one. The report holds file names as they are: print it through
    `terminal_safe`.
    """
    directory = Path(directory)
    _existing_trail(directory)  # (no trail: its error before the anchor's)
    if anchor is None:
        local = directory / ANCHOR
        anchor = local if local.exists() else None
    elif not anchor.is_file():
        raise AuditError(f"anchor file {terminal_safe(str(anchor))} not found; give a copy of "
                         "the file guardd appends its checkpoints to (audit.anchor)")
    # A snapshot that chains holds, whatever came since (the anchor, read after it, can only
    # vouch for more); one that does not may be a rotation's doing while it was read: again.
    # (Review: also read again when it chained, a flood's rotations kept it from ever
    # finishing.)
    for _ in range(_SNAPSHOT_ATTEMPTS):
        with _opened_trail(directory) as opened:
            report = _verify_files(opened, anchor)
            if report.ok or _still_the_trail(directory, opened):
                return report
    raise _rotating(directory)


def _verify_files(opened: list[tuple[Path, typing.BinaryIO]], anchor: Path | None
                  ) -> VerifyReport:
    """`verify` of the trail's files, opened (`_opened_trail`)."""
    walk = _Walk()
    error = walk.read_anchor(anchor) if anchor is not None else None
    if anchor is None:
        walk.warnings.append(f"no anchor: no {ANCHOR} in the trail directory and none given, so "
                             "records cut off the end of the trail cannot be detected")
    elif error is None and not walk.anchors:  # (guardd makes it at its start, to lock it)
        walk.warnings.append(f"no anchor yet: {terminal_safe(anchor.name)} holds no checkpoint, "
                             "so records cut off the end of the trail cannot be detected")
    for path, file in opened:
        if error is not None:
            break
        for number, line in _numbered(file):
            error = walk.line(f"{path.name}:{number}", line)
            if error is not None:
                break
    if error is None:
        error = walk.finish()
    return VerifyReport(walk.records, len(opened), error, tuple(walk.warnings), walk.checkpoints,
                        walk.first[1] if walk.first is not None else None, walk.seq,
                        str(anchor) if anchor is not None else None, walk.anchored)


class _Walk:
    """`verify()`'s state while it reads the trail line by line, oldest first."""

    def __init__(self) -> None:
        self.records = self.checkpoints = self.anchored = 0
        self.warnings: list[str] = []
        #: Anchored number -> (hash, where in the anchor file).
        self.anchors: dict[int, tuple[str, str]] = {}
        self.head: str | None = None  # hash of the last record; None before the first
        self.head_at = ""
        self.seq: int | None = None  # number of the last record; None before a numbered one
        #: The first record on disk: where, its seq (None: from before numbering), its prev.
        self.first: tuple[str, int | None, str] | None = None
        #: The newest pruning checkpoint (with an anchor, the newest anchored one):
        #: (prunedThrough, prunedHead, where).
        self.pruned: tuple[int, str, str] | None = None
        #: With an anchor, the newest pruning checkpoint no anchor entry vouches for:
        #: (prunedThrough, where).
        self.unvouched: tuple[int, str] | None = None
        #: Torn lines (where, and the line), until a record chains past them.
        self.unchained: list[tuple[str, bytes]] = []
        self.unanchored = 0  # records after the last checkpoint that vouches (`vouched`)
        #: The last checkpoint that vouches for what came before it (with an anchor, one the
        #: anchor holds): its seq and where (None: none, or one from before numbering).
        self.vouched: tuple[int, str] | None = None
        self.stopped = False  # the last record is a shutdown checkpoint
        self.clean = False  # and it vouches (`vouched`): the trail ends with a clean stop

    def read_anchor(self, path: Path) -> str | None:
        """Load an anchor file; the error if a line is neither an entry nor a torn one (a write
        cut short: the writer starts the next entry on a line of its own)."""
        for number, line in _numbered_lines(path):
            where = f"{path.name}:{number}"
            entry = _load(line)
            if isinstance(entry, dict) and _is_seq(entry.get("seq")) and \
                    isinstance(entry.get("sha256"), str) and _HEX_DIGEST.fullmatch(entry["sha256"]):
                seq, sha = entry["seq"], entry["sha256"]
                if self.anchors.get(seq, (sha,))[0] != sha:
                    return (f"{where}: seq {seq} was anchored before with another hash "
                            f"({self.anchors[seq][1]}): the trail was rewritten, or two trails "
                            "share this anchor")
                self.anchors[seq] = (sha, where)
            elif entry is _NOT_JSON and _torn(line):
                self.warnings.append(f"{where}: torn anchor entry (a write cut short) skipped")
            else:
                return (f"{where}: not an anchor entry (an object with seq and sha256): the "
                        "anchor was changed")
        return None

    def line(self, at: str, line: bytes) -> str | None:
        """Check one line; the error, when it breaks the trail."""
        record = _load(line)
        if record is _NOT_JSON:
            if not _torn(line):
                return (f"{at}: neither a record nor a torn write (a prefix of one): the line "
                        "was changed or inserted")
            if self.stopped and not self.unchained and not any(
                    _begins(line, start, runs_on=True) for start in _STARTS_BEGIN):
                return (f"{at}: looks like a write cut short after a shutdown checkpoint, where "
                        "a writer writes first its start's policy record, a checkpoint or its "
                        f"{UNANCHORED_END} note, and this is none: the line was inserted")
            self.unchained.append((at, line))
            return None
        if not isinstance(record, dict):
            return f"{at}: JSON, but not a record (an object): the line was changed or inserted"
        prev = record.get("prev")
        if not isinstance(prev, str) or not _HEX_DIGEST.fullmatch(prev):
            return f"{at}: no prev of 64 hex digits (the record was changed)"
        if "seq" in record and not _is_seq(record["seq"]):
            return f"{at}: seq is not a whole number (the record was changed)"
        seq = cast("int | None", record.get("seq"))
        digest = _digest(line)
        error = self._link(at, seq, prev) or self._anchored(at, seq, digest)
        if error is not None:
            return error
        if self.unchained:
            error = self._torn_before(at, record, line)
            if error is not None:
                return error
        self.warnings.extend(f"{torn}: torn line (a write cut short, e.g. by a crash) skipped; "
                             "the chain continues past it" for torn, _ in self.unchained)
        self.unchained.clear()
        self.head, self.head_at = digest, at
        if seq is not None:
            self.seq = seq
        self._count(at, record)
        return None

    def _torn_before(self, at: str, record: Record, line: bytes) -> str | None:
        """The error, unless the torn lines before `record` (`line`, at `at`) are what a writer
        leaves: each this very record cut short (a retry of a short write); or one, and then
        the record that notes it (`TORN`), each line more that same note cut short again at
        another time (a full disk); or one, and then what a writer from before the notes
        wrote first (`_STARTED`, unless its record says it notes them: `NOTES_TORN`).
        Attack pass 48: only the last line was held against the record, so a forged one and
        a lone `{` passed, as did any before a reload (and, the re-attack, before a start)."""
        (first, _), *again = self.unchained
        if all(line.startswith(torn) for _, torn in self.unchained):
            return None
        action = record.get("action")
        if action == TORN and all(_begins(torn, line[_STAMPED:]) for _, torn in again):
            held = record.get(TORN_SHA256)
            if held is None or held == _digest(self.unchained[0][1]):
                return None
            return (f"{first}: looks like a write cut short, but its SHA-256 is not the one the "
                    f"{TORN} note after it ({at}) holds for the line cut short: the line was "
                    "swapped")
        if action in _STARTED and _STARTED[action] in (None, record.get("reason")) and \
                record.get(NOTES_TORN) is not True and not again:
            return None
        return (f"{first}: looks like a write cut short, but the record after it ({at}) does "
                f"not say one was (an {TORN} record, the one line before it): the line was "
                "inserted")

    def _link(self, at: str, seq: int | None, prev: str) -> str | None:
        """Is this record the one after the last: its number, and the hash of the line before?"""
        if self.head is None:  # the first record on disk: see _start()
            self.first = (at, seq, prev)
            return None
        if seq is None and self.seq is not None:
            return f"{at}: no seq after numbered records (the record was changed or inserted)"
        expected = 0 if self.seq is None else self.seq + 1
        if seq in (None, expected) and prev == self.head:
            return None
        if self.unchained:
            return (f"{self.unchained[0][0]}: not a JSON record, and the next record does not "
                    "chain past it (the line was changed)")
        if seq is None or seq == expected:
            return (f"{at}: prev does not match the SHA-256 of the record before it "
                    f"({self.head_at}): that record was changed")
        after = f"follows seq {self.seq} ({self.head_at})" if self.seq is not None else \
            f"is the first numbered record ({self.head_at} has none)"
        if seq < expected:
            return f"{at}: seq {seq} {after}: the record was inserted, replayed or moved"
        return f"{at}: seq {seq} {after}: {_span(expected, seq - 1)} missing (removed)"

    def _anchored(self, at: str, seq: int | None, digest: str) -> str | None:
        anchored = self.anchors.get(seq) if seq is not None else None
        if anchored is None:
            return None
        if anchored[0] != digest:
            return (f"{at}: seq {seq} does not match the anchor ({anchored[1]}): the record was "
                    "changed or the trail rewritten")
        self.anchored += 1
        return None

    def _count(self, at: str, record: Record) -> None:
        action = record.get("action")
        self.stopped = action == CHECKPOINT and record.get("reason") == SHUTDOWN
        self.clean = False
        if not str(action).startswith(TRAIL_ACTIONS):
            self.records += 1
            self.unanchored += 1
            return
        self.checkpoints += 1
        if action == DROPPED:
            self.warnings.append(f"{at}: {record.get('count')} records were lost before this "
                                 "point (the trail could not be written; see guardd's log)")
        elif action == UNANCHORED_END and _is_seq(record.get("seq")):
            self.warnings.append(f"{at}: guardd started on a trail whose last run had ended "
                                 "without a shutdown checkpoint the anchor holds (killed, "
                                 "crashed, or the anchor could not be written): " +
                                 self._exposed(cast(int, record["seq"])))
        elif action == CHECKPOINT:
            # With an anchor, only a checkpoint it holds vouches for what came before, or says
            # what retention pruned: anyone who can write the trail can append one (attack
            # passes, 2026-12-06: files deleted, or the whole trail, behind a forged one; 49:
            # a forged shutdown checkpoint after a rewritten end).
            vouched = not self.anchors or record.get("seq") in self.anchors
            if vouched:
                self.unanchored = 0
                self.clean = self.stopped
                number = record.get("seq")
                self.vouched = (cast(int, number), at) if _is_seq(number) else None
            through, head = record.get("prunedThrough"), record.get("prunedHead")
            if type(through) is int and isinstance(head, str):
                if vouched:
                    self.pruned = (through, head, at)
                else:
                    self.unvouched = (through, at)

    def _exposed(self, note: int) -> str:
        """What lay open to change before the start noted at seq `note`: every record since
        the last checkpoint that vouches (re-attack: decisions alone were counted, so those
        rechained as the trail's own records went unwarned)."""
        since = "on disk" if self.vouched is None else \
            f"after the last anchored checkpoint ({self.vouched[1]})"
        first = (self.first[1] if self.first is not None else None) if self.vouched is None \
            else self.vouched[0] + 1
        if first is None or first >= note:
            return (f"no record {since} is before this start, and any the run wrote could have "
                    "been removed before it, which no check can tell")
        return (f"{_span(first, note - 1)} {since}, anchored by none before this start, so "
                "they could have been changed or removed before it, and no check can tell")

    def finish(self) -> str | None:
        """After the last line: the end of the trail against the anchor, then its start."""
        for at, torn in self.unchained[1:]:  # (past one, the writer's note of it, again)
            if not _a_torn_note(torn):
                return (f"{at}: looks like a write cut short after another at the end of the "
                        f"trail, and is no {TORN} note: the line was inserted")
        self.warnings.extend(f"{torn}: torn line at the end of the trail (a write cut short, "
                             "e.g. by a crash)" for torn, _ in self.unchained)
        error = self._end() or self._start()
        if error is None and self.head is not None and not self.clean:
            forged = " the anchor holds (the anchor does not hold the one there: it was forged, " \
                "or the anchor given predates it)" if self.stopped else ""
            self.warnings.append(
                f"{self.head_at}: the trail does not end with a shutdown checkpoint{forged}: "
                "guardd is running or was killed, or records after the last checkpoint were "
                f"removed ({self.unanchored} records at the end are not anchored yet)")
        return error

    def _start(self) -> str | None:
        """Is the first record on disk the very first, or where retention said it pruned to?"""
        if self.first is None:
            return None
        at, seq, prev = self.first
        if prev == GENESIS and seq in (0, None):
            return None
        if seq is None:
            self.warnings.append(f"{at}: the trail starts mid-chain (older records were rotated "
                                 "away before guardd numbered them), so the first record's prev "
                                 "cannot be checked")
            return None
        if self.pruned is None:
            return (f"{at}: the trail starts at seq {seq}, but no "
                    f"{'anchored ' if self.anchors else ''}checkpoint says retention pruned the "
                    f"records before it{self._unvouched()}: the oldest file or the first records "
                    "were deleted")
        through, head, where = self.pruned
        if seq > through + 1:
            return (f"{at}: {_span(through + 1, seq - 1)} missing before the first record on "
                    f"disk: retention pruned only up to seq {through} ({where})"
                    f"{self._unvouched()}; the oldest file or the first records were deleted")
        if seq == through + 1 and prev != head:
            return (f"{at}: prev is not the hash retention recorded for the last record it "
                    f"pruned ({where}): the record was changed")
        if seq != through + 1:
            self.warnings.append(f"{at}: retention pruned up to seq {through} ({where}), but "
                                 f"the trail still starts at seq {seq} (a deletion was cut "
                                 "short)")
        return None

    def _unvouched(self) -> str:
        """What an unanchored pruning checkpoint claims, for an error ("" when none does)."""
        if self.unvouched is None:
            return ""
        through, where = self.unvouched
        return (f" ({where} says it pruned up to seq {through}, but no anchored checkpoint "
                "does: that checkpoint was forged, or the anchor given predates it)")

    def _end(self) -> str | None:
        """Does the trail reach the newest anchored record?"""
        if not self.anchors:
            return None
        newest = max(self.anchors)
        if self.seq is not None and self.seq >= newest:
            return None
        ends = f"ends at seq {self.seq} ({self.head_at})" if self.seq is not None else \
            "has no numbered record"
        start = 0 if self.seq is None else self.seq + 1
        return (f"the trail {ends}, but the anchor ({self.anchors[newest][1]}) vouches for seq "
                f"{newest}: {_span(start, newest)} missing: removed from the end, or the newest "
                "file truncated or deleted")


def _span(first: int, last: int) -> str:
    """'record 5 is' or 'records 5..9 are'."""
    return f"record {first} is" if first == last else f"records {first}..{last} are"
