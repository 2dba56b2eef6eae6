"""A policy's own `tests:`: checked at load, run by `guardd check` and by every load."""

from __future__ import annotations

from pathlib import Path

import pytest

from guardd.cli import EXIT_ERROR, EXIT_OK, main
from guardd.errors import PolicyError
from guardd.policy.engine import Policy

ROOT = Path(__file__).resolve().parents[2]
RULES = """\
version: "1.0"
rules:
  - {id: tunnels, action: "*", domain: "*.ngrok.io", effect: deny}
  - {id: docs, action: network.request, domain: docs.example.com, method: GET, port: 80,
     effect: allow}
  - {id: corp, action: "*", domain: "*.corp.example.com", ip: 10.0.0.0/8, effect: allow}
"""


def policy(tests: str) -> Policy:
    return Policy.from_text(RULES + "tests:\n" + tests, "p.yaml")


def test_passing_tests_pass_and_cover_the_rules_they_reach() -> None:
    loaded = policy('  - {target: "x.ngrok.io", dns: true, expect: deny, rule: tunnels}\n'
                    '  - {target: "http://docs.example.com/", method: GET, expect: allow}\n'
                    '  - {target: "http://docs.example.com/", method: POST, expect: deny}\n'
                    '  - {target: "https://git.corp.example.com", ip: 10.1.2.3, expect: allow}\n')
    assert loaded.failed_tests() == [] and loaded.untested_rules() == []


def test_a_failing_test_says_where_what_was_expected_and_what_came() -> None:
    loaded = policy('  - {target: "http://docs.example.com/", method: POST, expect: allow}\n'
                    '  - {target: "http://169.254.169.254/", expect: allow}\n'
                    '  - {target: "x.ngrok.io", expect: deny, rule: docs}\n')
    assert loaded.failed_tests() == [
        "p.yaml:8: test 'http://docs.example.com/' POST: expected allow, got deny by rule "
        "default-deny (no rule allows this destination (default deny))",
        "p.yaml:9: test 'http://169.254.169.254/': expected allow, got deny by rule "
        "default-deny (no rule allows this destination (default deny))",
        "p.yaml:10: test 'x.ngrok.io': expected deny by rule docs, got deny by rule tunnels "
        "(deny by rule tunnels)"]
    assert [rule.id for rule in loaded.untested_rules()] == ["docs", "corp"]


def test_a_name_an_ip_rule_judges_needs_the_address() -> None:
    failures = policy('  - {target: "https://git.corp.example.com", expect: allow}\n'
                      ).failed_tests()
    assert failures == ["p.yaml:8: test 'https://git.corp.example.com': its verdict depends on "
                        "the address the name resolves to: give ip:"]


@pytest.mark.parametrize("entry, problem", [
    ('{expect: allow}', "a test needs 'target'"),
    ('{target: "a b c", expect: allow}', "test target"),
    ('{target: x.com, expect: maybe}', "expect must be allow or deny"),
    ('{target: x.com, expect: deny, rule: nope}', "no rule has the id 'nope'"),
    ('{target: x.com, ip: not-an-ip, expect: deny}', "ip:"),
    ('{target: 10.0.0.1, dns: true, expect: deny}', "a DNS test needs a name"),
    ('{target: x.com, expect: deny, color: red}', "color"),
])
def test_a_malformed_test_is_a_policy_error_with_its_line(entry: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem) as raised:
        policy(f"  - {entry}\n")
    assert raised.value.line == 8


def test_guardd_check_runs_the_tests(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                     ) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(RULES + 'tests:\n  - {target: "http://docs.example.com/", method: GET, '
                    'expect: deny}\n')
    assert main(["check", str(path)]) == EXIT_ERROR
    assert "expected deny, got allow by rule docs" in capsys.readouterr().err
    path.write_text(RULES + 'tests:\n  - {target: "http://docs.example.com/", method: GET, '
                    'expect: allow}\n')
    assert main(["check", str(path)]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "1 tests pass" in out and "note: no test reaches rule 'tunnels'" in out and err == ""


@pytest.mark.parametrize("shipped", ["policies/default.yaml", "policies/examples/coding-agent.yaml"])
def test_the_shipped_policies_test_every_rule_a_request_can_reach(shipped: str) -> None:
    loaded = Policy.from_file(ROOT / shipped)
    assert loaded.tests and loaded.failed_tests() == []
    # default-deny-all (action "*") comes after a network.request rule for "*", and guardd's
    # DNS view is decided by that one: no request reaches it.
    assert [rule.id for rule in loaded.untested_rules()] == ["default-deny-all"]
