"""Test doubles shared by the unit tests."""

from __future__ import annotations

import errno
import itertools
import os
from collections.abc import Callable

import pytest


class ListAudit:
    """An audit sink that keeps records in a list (None fields dropped, as the writer does)."""

    def __init__(self) -> None:
        self.records: list[dict[str, object]] = []

    def record(self, **fields: object) -> None:
        self.records.append({k: v for k, v in fields.items() if v is not None})

    def prepare(self, **fields: object) -> Callable[[str], None]:
        return lambda client: self.record(client=client, **fields)

    async def flushed(self) -> None:
        return None


def fail_writes(monkeypatch: pytest.MonkeyPatch, times: int | None = None) -> None:
    """Make os.write fail with ENOSPC (a full disk), `times` times or (None) for good."""
    real_write = os.write
    failures = itertools.count() if times is None else iter(range(times))

    def full_disk(fd: int, data: bytes) -> int:
        if next(failures, None) is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
