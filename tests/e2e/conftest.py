"""Fixtures for the end-to-end tests: every test here runs the real daemon in a subprocess."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
