"""Test doubles shared by the unit tests."""

from __future__ import annotations

import errno
import itertools
import os
import time
from collections.abc import Callable

import pytest

from guardd.audit import FIELDS, AuditRecord, AuditWriter
from guardd.shares import CpuShares


class ListAudit:
    """An audit sink that keeps records in a list (None fields dropped, as the writer does)."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []
        #: Whether something left the host for each record (`AuditWriter.write`).
        self.went_out: list[bool | None] = []
        #: What `room_for` says, and `down`.
        self.room = True
        self.down = False

    def write(self, record: AuditRecord, client: str | None = None,
              name: str | None = None, went_out: bool | None = None,
              account: str | None = None) -> None:
        self.went_out.append(went_out)
        fields = {field: getattr(record, field) for field in FIELDS if hasattr(record, field)}
        named = {"target": name, "domain": name} if name is not None else {}
        self.records.append({k: v for k, v in {**fields, "client": client, **named}.items()
                             if v is not None})

    def room_for(self, client: str) -> bool:
        return self.room

    def after_flush(self, callback: Callable[..., object], *args: object,
                    withheld: Callable[[], object] | None = None) -> None:
        callback(*args)

    def flush(self) -> bool:
        return True

    def write_now(self, record: AuditRecord, client: str | None = None,
                  went_out: bool | None = None) -> int | None:
        self.write(record, client, went_out=went_out)
        return len(self.records) - 1


def write_fields(writer: AuditWriter, client: str | None = None, **fields: object) -> None:
    """Write a record given as the trail's fields (what tests read back)."""
    writer.write(AuditRecord(**fields), client)  # type: ignore[arg-type]


def prepared(writer: AuditWriter, **fields: object) -> Callable[[str], None]:
    """A writer of one record for any client (as a memoized DNS verdict is written)."""
    record = AuditRecord(**fields)  # type: ignore[arg-type]
    return lambda client: writer.write(record, client)


def fail_writes(monkeypatch: pytest.MonkeyPatch, times: int | None = None) -> None:
    """Make os.write fail with ENOSPC (a full disk), `times` times or (None) for good."""
    real_write = os.write
    failures = itertools.count() if times is None else iter(range(times))

    def full_disk(fd: int, data: bytes) -> int:
        if next(failures, None) is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)


class OwedShares(CpuShares):
    """Records every charge (`charged`, and who was charged as not active: `inactive`) and
    counts every ask whether to wait (`asked`); the first `owed` asks are told to wait 0.1 s
    each."""

    def __init__(self, owed: int) -> None:
        super().__init__()
        self.charged: list[tuple[str, float]] = []
        self.inactive: set[str] = set()
        self.asked = 0
        self.owed = owed

    def charge(self, client: str, seconds: float, active: bool = True) -> float:
        self.charged.append((client, seconds))
        if not active:
            self.inactive.add(client)
        return 0.0

    def wait(self, client: str) -> float:
        self.asked += 1
        return 0.1 if self.asked <= self.owed else 0.0


class SpentShares(OwedShares):
    """Records every charge (`charged`); every client's share is spent for the first `spent`
    seconds from now."""

    def __init__(self, spent: float) -> None:
        super().__init__(owed=0)
        self.until = time.monotonic() + spent

    def wait(self, client: str) -> float:
        return max(0.0, self.until - time.monotonic())
