"""The audit retention and anchor settings of the daemon config (issue 8, hole 12)."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardd.config import Config, apply_settings, load_config_file
from guardd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_keep_a_day_and_cap_at_four_times_keep() -> None:
    config = Config()
    assert (config.audit_min_age, config.audit_checkpoint_interval, config.audit_anchor) == (
        86_400, 60, None)
    assert config.audit_size_cap == 4 * config.audit_max_bytes * (config.audit_keep + 1)
    small = apply_settings(Config(), {"audit": {"maxBytes": 4096, "keep": 1}}, Path("."), "test")
    assert small.audit_size_cap == 1 << 20  # (never below the least a cap may be)


def test_file_keys_and_an_anchor_relative_to_the_file(tmp_path: Path) -> None:
    config = apply_settings(Config(), {"audit": {
        "dir": "trail", "maxBytes": 4096, "keep": 2, "minAge": 3600, "maxTotalBytes": 1 << 20,
        "checkpointInterval": 5, "anchor": "../shipped/anchor.jsonl"}}, tmp_path / "etc", "test")
    assert (config.audit_min_age, config.audit_size_cap, config.audit_checkpoint_interval) == (
        3600, 1 << 20, 5)
    assert config.audit_anchor == tmp_path / "etc" / "../shipped/anchor.jsonl"


def test_the_example_config_documents_every_audit_key() -> None:
    config = load_config_file(ROOT / "systemd" / "guardd.yaml")
    assert config.audit_min_age == Config().audit_min_age
    text = (ROOT / "systemd" / "guardd.yaml").read_text()
    for key in ("minAge", "maxTotalBytes", "checkpointInterval", "anchor"):
        assert f"{key}:" in text


@pytest.mark.parametrize(("audit", "message"), [
    ({"minAge": -1}, "audit.minAge must be a number of at least 0"),
    ({"checkpointInterval": "soon"}, "audit.checkpointInterval must be a number"),
    ({"maxBytes": 4096, "keep": 3, "maxTotalBytes": 20479},
     r"audit.maxTotalBytes must be a number of at least audit.maxBytes times \(audit.keep \+ 2\), "
     "20480, not 20479"),
    ({"maxBytes": 4096, "keep": 0, "maxTotalBytes": 4096},  # (review: it stopped the trail
     r"at least audit.maxBytes times \(audit.keep \+ 2\), 8192, not 4096"),  # at a rotation)
    ({"maxTotalBytes": True}, "audit.maxTotalBytes must be a number"),
    ({"keep": "ten", "maxTotalBytes": 1 << 40}, "audit.keep must be a number"),
    # (last stop: past 90% of a 60 KB cap, a client with no record yet had no share either)
    ({"maxBytes": 4096, "keep": 2, "maxTotalBytes": 65536},
     r"audit.maxTotalBytes must be at least 1048576 \(1 MiB\).*less than a record"),
], ids=["negative-age", "interval-text", "cap-below-keep", "cap-of-one-file", "cap-bool",
        "keep-text-with-cap", "cap-too-small-to-share"])
def test_rejects(tmp_path: Path, audit: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_settings(Config(), {"audit": audit}, tmp_path, "test")
