"""`guardd audit replay` and `learn` (guardd/replay.py) on records as the trail holds them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from guardd.errors import PolicyError
from guardd.policy.engine import Policy
from guardd.replay import learn, replay

ALLOW_ALL = 'version: "1.0"\nrules:\n  - {id: all, action: "*", domain: "*", effect: allow}\n'
NO_MULTI = ('version: "1.0"\nrules:\n  - {id: no-multi, action: "*", domain: multi.example.com, '
            'effect: deny}\n  - {id: all, action: "*", domain: "*", effect: allow}\n')


def query(name: str, ip: str = "", effect: str = "allow", rule: str = "all", **extra: object
          ) -> dict[str, object]:
    record: dict[str, object] = {"action": "dns.query", "listener": "dns", "client": "10.0.0.2",
                                 "domain": name, "target": name, "qtype": "A", "effect": effect,
                                 "matchedRule": rule, **extra}
    if ip:
        record["ip"] = ip
    return record


def test_a_dns_answer_with_several_addresses_is_judged_at_each() -> None:
    """The trail lists an answer's addresses comma-separated (red team: replay counted such a
    decision as untold, learn failed on it)."""
    records = [query("multi.example.com", "93.184.216.34,93.184.216.35")]
    report = replay(Policy.from_text(NO_MULTI), records)
    assert report.untold == 0 and report.changed == 1
    assert "domain: [\"multi.example.com\"]" in learn(records, "trail")


def test_learn_never_spans_a_public_suffix_others_share() -> None:
    """Nine buckets must not become `*.amazonaws.com` (every bucket, an attacker's too)."""
    records = [query(f"bucket{n}.s3.amazonaws.com", "52.216.1.1") for n in range(9)]
    learned = learn(records, "trail")
    assert "*.amazonaws.com" not in learned and '"bucket8.s3.amazonaws.com"' in learned
    records = [query(f"h{n}.corp.example.com", "93.184.216.34") for n in range(9)]
    assert '"*.example.com"' in learn(records, "trail")  # one owner's zone: a wildcard


@pytest.mark.parametrize("asked", ["*", "*.com", "x,*.net.example.com", "a b.example.com"])
def test_learn_proposes_no_name_the_agent_made_up(asked: str, tmp_path: Path) -> None:
    learned = learn([query(asked), query("ok.example.com")], "trail")
    proposed = [name for names in re.findall(r"domain: \[(.*?)\]", learned)
                for name in names.split(", ")]
    assert f'"{asked}"' not in proposed
    assert '"ok.example.com"' in learned
    path = tmp_path / "learned.yaml"
    path.write_text(learned)
    assert Policy.from_file(path).failed_tests() == []


def test_a_test_target_urlsplit_refuses_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="test target"):
        Policy.from_text(ALLOW_ALL + 'tests:\n  - {target: "https://[::1", expect: allow}\n')
