"""Report mode (`mode: report`, for a policy or a rule): a denial is recorded and counted as
`effect: deny, enforced: false`, and the request goes through; the built-in protections and
guardd's own checks stay enforced."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from guardd.audit import AuditWriter, iter_records
from guardd.errors import PolicyError
from guardd.guard import Guard, most_restrictive
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.policy.model import NETWORK_REQUEST, Request
from guardd.stream.tunnel import Opened, Refused
from tests.unit.fakes import ListAudit
from tests.unit.test_stream_sniff import real_hello
from tests.unit.test_tunnel import CLIENT, IP, POST, FakeResolver, Rig

IP_10 = ipaddress.ip_address("10.1.2.3")
IP_192 = ipaddress.ip_address("192.168.1.2")

REPORTED = """\
version: "1.0"
mode: report
rules:
  - {id: tunnels, action: "*", domain: "*.tunnel.test", effect: deny}
  - {id: enforced-deny, action: "*", domain: "*.blocked.test", mode: enforce, effect: deny}
  - {id: metadata, action: network.request, ip: 169.254.169.254, effect: deny}
  - {id: api, action: "*", domain: api.test, effect: allow}
"""

#: An enforcing policy trialling a denial of the tunnels a later rule allows (a reported
#: denial falls through to it).
TRIALLING_TUNNELS = REPORTED.replace("mode: report\n", "").replace(
    'domain: "*.tunnel.test", effect: deny', 'domain: "*.tunnel.test", mode: report, '
    'effect: deny') + '  - {id: tunnels-for-now, action: "*", domain: "*.tunnel.test", ' \
    'effect: allow}\n'


def guard(text: str = REPORTED) -> Guard:
    return Guard(Policy.from_text(text), ListAudit(), Metrics(process=False))


@pytest.mark.parametrize("name, rule", [("x.tunnel.test", "tunnels"),
                                        ("other.test", "default-deny")])
def test_a_reported_denial_lets_the_lookup_through_recorded_as_a_denial(name: str, rule: str
                                                                         ) -> None:
    judge = guard()
    verdict = judge.judge_query(name, "A", CLIENT)
    assert verdict.allowed
    judge.commit(verdict, CLIENT, name=name)
    (record,) = judge.audit.records  # type: ignore[attr-defined]
    assert (record["effect"], record["enforced"], record["matchedRule"]) == ("deny", False, rule)
    assert judge.metrics.unenforced.value("dns", rule) == 1
    assert judge.metrics.decisions.value("dns", "dns.query", "deny", rule) == 1


def test_a_rule_may_enforce_inside_a_reporting_policy_and_report_inside_an_enforcing_one(
        ) -> None:
    judge = guard()
    assert not judge.judge_query("x.blocked.test", "A", CLIENT).allowed
    enforcing = guard(TRIALLING_TUNNELS)
    assert enforcing.judge_query("x.tunnel.test", "A", CLIENT).allowed
    assert not enforcing.judge_query("other.test", "A", CLIENT).allowed  # default: enforced


@pytest.mark.parametrize("host", ["169.254.169.254", "127.0.0.1", "10.1.2.3"])
async def test_report_mode_never_opens_what_the_built_in_protections_close(host: str) -> None:
    rig = Rig(policy=REPORTED)
    _, result = await rig.through(host, 80, address=IP(host))
    assert isinstance(result, Refused) and rig.io.attempts == []
    assert "enforced" not in rig.records[0] and rig.records[0]["effect"] == "deny"


async def test_a_reported_connect_goes_through_and_its_first_bytes_are_still_checked() -> None:
    rig = Rig(policy=REPORTED)
    rig.io.incoming.put_nowait(real_hello("api.test"))
    _, result = await rig.through("api.test", 443)  # allowed: not reported
    assert isinstance(result, Opened)
    rig.io.incoming.put_nowait(real_hello("multi.test"))
    _, result = await rig.through("multi.test", 443)
    assert isinstance(result, Opened)
    assert (rig.records[-1]["effect"], rig.records[-1]["enforced"]) == ("deny", False)


def test_a_mode_other_than_enforce_or_report_is_an_error_with_its_line() -> None:
    with pytest.raises(PolicyError, match="mode must be enforce or report") as raised:
        Policy.from_text('version: "1.0"\nmode: audit\nrules: []\n')
    assert raised.value.line == 2


def test_an_export_filter_reads_enforced_as_the_trail_writes_it(tmp_path: Path) -> None:
    judge = guard()
    writer = AuditWriter(tmp_path)
    writer.open()
    writer.write(judge.judge_query("other.test", "A", CLIENT).record, CLIENT, "other.test")
    writer.close()
    assert [r["domain"] for r in iter_records(tmp_path, filters={"enforced": "false"})] == \
        ["other.test"]


@pytest.mark.parametrize("order", [("api.test", "x.tunnel.test"),
                                   ("x.tunnel.test", "api.test")])
def test_a_connect_standing_for_an_allowed_and_a_reported_name_records_the_denial(
        order: tuple[str, str]) -> None:
    """A connect by address stands for every name its client resolved there; under an
    enforcing policy the denial wins, so under report mode the record must say it would."""
    policy = Policy.from_text(TRIALLING_TUNNELS)
    decisions = [policy.decide(Request(NETWORK_REQUEST, name=name, port=443)) for name in order]
    decision = most_restrictive(decisions)
    assert decision.allowed and not decision.enforced and decision.matched_rule == "tunnels"


TRIAL = """\
version: "1.0"
rules:
  - {id: api, action: "*", domain: api.example.com, effect: allow}
  - {id: trial, action: "*", domain: "*.pastebin.com", mode: report, effect: deny}
  - {id: docs, action: "*", domain: docs.pastebin.com, effect: allow}
"""


def test_a_rule_trialled_in_report_mode_never_opens_what_the_policy_without_it_closes(
        ) -> None:
    """A reported denial falls through: dump.pastebin.com stays denied by the default deny
    (it went through, as the rule matched first: attack pass); docs.pastebin.com, allowed by
    a later rule, goes through recorded as the trial's denial."""
    policy = Policy.from_text(TRIAL)
    dump = policy.decide(Request(NETWORK_REQUEST, name="dump.pastebin.com", port=443))
    assert not dump.allowed and dump.enforced and dump.matched_rule == "default-deny"
    docs = policy.decide(Request(NETWORK_REQUEST, name="docs.pastebin.com", port=443))
    assert docs.allowed and not docs.enforced and docs.matched_rule == "trial"
    assert not policy.resolvable("dump.pastebin.com").allowed
    docs_dns = policy.resolvable("docs.pastebin.com")
    assert docs_dns.allowed and docs_dns.matched_rule == "trial"


def test_a_test_expecting_a_denial_fails_when_the_request_would_go_through() -> None:
    policy = Policy.from_text(TRIAL + 'tests:\n  - {target: "https://docs.pastebin.com", '
                              'expect: deny}\n')
    (failure,) = policy.failed_tests()
    assert "expected deny, got allow (a denial only reported) by rule trial" in failure


#: A rule trialled in report mode in front of what the policy enforces: a method rule and a
#: rate-limited allow.
TRIAL_IN_FRONT = """\
version: "1.0"
rules:
  - {id: trial, action: "*", domain: "*.test", mode: report, effect: deny}
  - {id: docs-post, action: network.request, domain: docs.test, method: POST, effect: deny}
  - {id: docs, action: "*", domain: docs.test, effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
"""


async def test_a_reported_denial_in_front_changes_nothing_the_rules_behind_it_enforce() -> None:
    """A reported denial falls through to the rule that lets the request go: that rule acts.
    Its rate limit counts (connects and lookups), and the method rule before it still denies
    a POST (attack pass: a trial rule in front turned both off: a POST reached the server)."""
    rig = Rig(policy=TRIAL_IN_FRONT)
    _, result = await rig.through("docs.test", 80, early=POST)
    assert (rig.records[-1]["effect"], rig.records[-1]["matchedRule"]) == ("deny", "docs-post")
    assert "enforced" not in rig.records[-1] and rig.io.forwarded == []
    # (guardd's lookup for the connect was one of the rule's two DNS queries)
    verdicts = [rig.guard.judge_query("docs.test", "A", CLIENT) for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, False, False]
    assert verdicts[0].record.matchedRule == "trial" and verdicts[0].record.enforced is False
    assert verdicts[2].limited and verdicts[2].decision.matched_rule == "docs"
    policy = rig.guard.policy
    decision = policy.decide(Request(NETWORK_REQUEST, name="docs.test", port=443))
    assert decision.matched_rule == "trial" and decision.acting_rule is not None
    charged = [rig.guard.rate_limit(decision, "10.0.0.9").allowed for _ in range(3)]
    assert charged == [True, True, False]


#: Allows that name a private network and a metadata name, and a rule trialled in front of
#: them.
PROTECTED_ALLOWS = """\
version: "1.0"
rules:
  - {id: corp, action: "*", domain: "*.corp.test", ip: 10.0.0.0/8, effect: allow}
  - {id: gcp, action: "*", domain: metadata.google.internal, effect: allow}
"""
TRIAL_OVER_PROTECTED = PROTECTED_ALLOWS.replace("rules:\n", """rules:
  - {id: trial, action: "*", domain: [db.corp.test, metadata.google.internal], mode: report,
     effect: deny}
""")


def test_a_reported_denial_over_a_protected_destination_falls_through_to_the_allow(
        ) -> None:
    """The protections judge what the rule that lets the request go decides, not the trial
    in front of it (attack pass: a trial rule in front cut a private address, and a name the
    allow names, that the policy without it opens)."""
    policy, without = Policy.from_text(TRIAL_OVER_PROTECTED), Policy.from_text(PROTECTED_ALLOWS)
    request = Request(NETWORK_REQUEST, name="db.corp.test", ip=IP_10, port=5432)
    assert without.decide(request).allowed
    decision = policy.decide(request)
    assert decision.allowed and not decision.enforced and decision.matched_rule == "trial"
    assert decision.acting_rule is not None and decision.acting_rule.id == "corp"
    elsewhere = Request(NETWORK_REQUEST, name="db.corp.test", ip=IP_192, port=5432)
    assert not policy.decide(elsewhere).allowed and policy.decide(elsewhere).enforced
    assert without.resolvable("metadata.google.internal").allowed
    lookup = policy.resolvable("metadata.google.internal")
    assert lookup.allowed and not lookup.enforced and lookup.matched_rule == "trial"


@pytest.mark.parametrize("mode, behind", [
    ("enforce", '  - {id: anything, action: network.request, domain: "*", effect: allow}\n'),
    ("report", "")], ids=["an-allow-the-protection-overrides", "report-mode-default-deny"])
@pytest.mark.parametrize("method, goes", [(b"GET", True), (b"POST", False)])
async def test_a_method_rule_naming_a_private_address_lets_its_method_through(
        mode: str, behind: str, method: bytes, goes: bool) -> None:
    """Through a tunnel: the connect waits for its first bytes, a GET reaches the server and
    a POST does not (review: both were refused before any byte, in report mode too)."""
    rig = Rig(policy=f"""\
version: "1.0"
mode: {mode}
rules:
  - {{id: db-get, action: network.request, domain: db.test, ip: 10.0.0.5, method: GET,
     effect: allow}}
{behind}""", resolver=FakeResolver(zone={"db.test": ["10.0.0.5"]}))
    request = method + b" / HTTP/1.1\r\nHost: db.test\r\nContent-Length: 0\r\n\r\n"
    _, result = await rig.through("db.test", 80, early=request)
    assert isinstance(result, Opened)
    assert bool(rig.io.forwarded) is goes
    last = rig.records[-1]
    assert (last["effect"], last["matchedRule"]) == ("allow", "db-get") if goes else \
        last["effect"] == "deny"


def test_an_alias_answer_a_trial_rule_falls_through_is_vetted_by_the_rule_that_acts() -> None:
    """Review: vetted by the trial rule's networks (none), the address an alias led to was
    withheld behind the trial where the policy without it serves it."""
    allows = PROTECTED_ALLOWS + '  - {id: org, action: "*", domain: "*.org", effect: allow}\n'
    trial = TRIAL_OVER_PROTECTED + '  - {id: org, action: "*", domain: "*.org", effect: allow}\n'
    for text, rule in ((allows, "corp"), (trial, "trial")):
        policy = Policy.from_text(text)
        vetted = policy.vet_address(policy.resolvable("db.corp.test"), "db.corp.test", IP_10,
                                    ("pub.other.org", policy.resolvable("pub.other.org")))
        assert vetted.allowed and vetted.matched_rule == rule, text


#: A reporting policy: a trial rule in front of an enforced `method` rule for the same name.
TRIAL_BEFORE_ENFORCED_METHOD = """\
version: "1.0"
mode: report
rules:
  - {id: trial, action: "*", domain: x.test, effect: deny}
  - {id: no-post, action: network.request, domain: x.test, method: POST, mode: enforce,
     effect: deny}
"""


@pytest.mark.parametrize("early", [b"\x00\x00\x00\x07binary\n",
                                   b"POST /x HTTP/1.1\r\nHost: x.test\r\n\r\n"],
                         ids=["other-bytes", "post"])
async def test_a_trial_rule_leaves_the_enforced_method_rule_after_it_to_judge(early: bytes
                                                                              ) -> None:
    """Final attack: falling through to report mode's default deny, the trial's denial stood
    alone, and the method rules after it were never asked: the connect waited for no first
    bytes, and bytes that were not HTTP, then a POST, reached the server."""
    policy = Policy.from_text(TRIAL_BEFORE_ENFORCED_METHOD)
    request = Request(NETWORK_REQUEST, name="x.test", ip=IP("192.0.2.20"), port=80)
    assert policy.method_matters(request, policy.decide(request))
    rig = Rig(policy=TRIAL_BEFORE_ENFORCED_METHOD,
              resolver=FakeResolver(zone={"x.test": ["192.0.2.20"]}))
    _, result = await rig.through("x.test", 80, early=early)
    assert isinstance(result, Opened) and rig.io.forwarded == []
    assert rig.records[-1]["effect"] == "deny" and "enforced" not in rig.records[-1]
