"""End-to-end tests: each runs the real daemon in a subprocess (tests/e2e/harness.py), marked
`e2e` so that `scripts/test -m "not e2e"` runs the fast unit tests alone."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType

import pytest

from tests.e2e.harness import stop_leftovers

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


def pytest_sessionfinish() -> None:
    """No helper process outlives the run, whatever failed (a fixture whose daemon did not
    start left its upstream and servers running)."""
    stop_leftovers()


def pytest_configure() -> None:
    """A run stopped with SIGTERM (a CI timeout, `kill`) tears down as one interrupted from
    the keyboard: its network namespaces deleted and its helpers stopped, not left behind."""
    signal.signal(signal.SIGTERM, _interrupted)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")
