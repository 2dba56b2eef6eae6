"""Test doubles shared by the unit tests."""

from __future__ import annotations

from collections.abc import Callable


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
