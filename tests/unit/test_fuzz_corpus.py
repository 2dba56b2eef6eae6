"""The fuzz targets (tests/fuzz/targets.py) over their seed corpora, without atheris: every seed,
and every crash found and added since, must end in a result or its parser's documented error."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.targets import TARGETS

CORPUS = Path(__file__).resolve().parents[1] / "fuzz" / "corpus"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_of_a_target_ends_cleanly(name: str) -> None:
    seeds = sorted((CORPUS / name).iterdir())
    assert seeds, f"no seed corpus for {name}"
    for seed in seeds:
        TARGETS[name](seed.read_bytes())


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_truncations_of_every_seed_end_cleanly(name: str) -> None:
    """The cheapest mutation, everywhere: each seed cut at every length."""
    for seed in sorted((CORPUS / name).iterdir()):
        data = seed.read_bytes()
        for end in range(0, len(data), max(1, len(data) // 64)):
            TARGETS[name](data[:end])
