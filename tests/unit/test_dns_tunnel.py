"""`dns/tunnel.py`: what a DNS tunnel looks like, counted per client and registrable domain."""

from __future__ import annotations

import base64
import os
import sys

import pytest

from guardd.dns import tunnel
from guardd.dns.tunnel import MAX_DOMAINS_PER_CLIENT, TunnelDetector, long_label
from guardd.errors import PolicyError
from guardd.policy.engine import Policy
from guardd.policy.model import TunnelBudget

A = "10.0.0.2"


def b32(size: int) -> str:
    return base64.b32encode(os.urandom(size)).decode().rstrip("=").lower()


def test_a_long_label_is_long_whatever_its_alphabet() -> None:
    """Digits carry data as well as base32 (an entropy floor let them through: red team)."""
    assert long_label(f"{b32(35)}.x.amazonaws.com", 52)
    assert long_label("7" * 60 + ".example.com", 52)
    assert not long_label(f"{b32(30)}.x.amazonaws.com", 52)  # 48 characters
    assert not long_label("internal-app1-prod-1234567890.us-east-1.elb.amazonaws.com", 52)


def test_names_count_under_their_icann_registrable_domain() -> None:
    detector = TunnelDetector(TunnelBudget())
    assert detector.domain("x.y.s3.amazonaws.com") == "amazonaws.com"
    assert detector.domain("a.b.githubusercontent.com") == "githubusercontent.com"
    assert detector.domain("www.example.co.uk") == "example.co.uk"
    assert detector.domain("com") == "com"


def test_unique_names_over_the_budget_suspect_the_domain_for_a_window() -> None:
    detector = TunnelDetector(TunnelBudget(max_unique_names=5, window=60))
    for n in range(5):
        assert detector.observe(A, f"n{n}.amazonaws.com", "A", 0.0) == ""
    assert detector.observe(A, "n0.amazonaws.com", "A", 1.0) == ""  # the same name again
    why = detector.observe(A, "n5.amazonaws.com", "A", 2.0)
    assert why.startswith("unique-names: over 5 lookups of different names or types under "
                          "amazonaws.com")
    assert detector.observe(A, "n0.amazonaws.com", "A", 30.0) == why  # every name, now
    assert detector.observe("10.0.0.3", "n6.amazonaws.com", "A", 30.0) == ""  # not another client
    assert detector.observe(A, "www.example.com", "A", 30.0) == ""  # nor another domain
    assert detector.observe(A, "n7.amazonaws.com", "A", 62.0) == ""  # the window is over


def test_long_labels_and_unusual_types_have_budgets_of_their_own() -> None:
    detector = TunnelDetector(TunnelBudget(max_long_labels=2, max_unusual_types=3))
    for _ in range(2):
        assert detector.observe(A, f"{b32(35)}.t.example.com", "A", 0.0) == ""
    assert detector.observe(A, f"{b32(35)}.t.example.com", "A", 0.0).startswith("long-labels")
    for n in range(3):
        assert detector.observe(A, f"q{n}.example.net", "TXT", 0.0) == ""
    assert detector.observe(A, "q3.example.net", "TYPE4000", 0.0).startswith("record-types")


def test_names_just_short_of_long_labels_are_stopped_by_the_bytes_they_carry() -> None:
    """Attack pass (2026-12-06): names of four 52-character labels have no long label, so
    each counted once among 300 different names: 62,400 characters of chosen data a minute
    under one domain. The characters of different names below their domain have a budget."""
    detector = TunnelDetector(TunnelBudget(max_name_bytes=2_000))
    carried = 0
    for _ in range(300):
        name = ".".join(b32(32)[:52] for _ in range(4)) + ".x.evil.example.com"
        why = detector.observe(A, name, "A", 0.0)
        if why:
            break
        carried += len(name) - len("example.com") - 1
    assert 2_000 - 218 < carried <= 2_000
    assert why.startswith("name-bytes: over 2000 bytes of different names below "
                          "example.com in 1 minute")
    assert detector.observe(A, "www.example.com", "A", 1.0) == why  # the domain is suspected
    assert detector.observe(A, "www.example.com", "A", 1.0) == why
    again = TunnelDetector(TunnelBudget(max_name_bytes=20))
    assert [again.observe(A, "a" * 10 + ".example.com", "A", 0.0) for _ in range(5)] == [""] * 5


def test_the_bytes_names_carry_under_every_domain_together_have_a_budget() -> None:
    """Review: the bytes were counted per domain alone, so names spread over the 256 domains
    zone-churn allows carried 256 times the budget."""
    detector = TunnelDetector(TunnelBudget(max_name_bytes=1_000, max_client_name_bytes=3_000))
    carried = 0
    for n in range(100):
        name = f"{b32(40)[:50]}.{b32(40)[:50]}.d{n}.com"  # 101 characters below d{n}.com
        why = detector.observe(A, name, "A", 0.0)
        if why:
            break
        carried += len(name) - len(".com")  # (all but the top-level label: below)
    assert 3_000 - len(name) < carried <= 3_000
    assert why == ("name-bytes: over 3000 bytes of different names under every domain in "
                   "1 minute")
    assert detector.observe(A, "www.elsewhere.org", "A", 1.0) == why
    assert detector.observe("10.0.0.3", "www.elsewhere.org", "A", 1.0) == ""


def test_names_that_are_their_own_registrable_domain_carry_bytes_too() -> None:
    """Final attack pass: under a wildcard public suffix (`*.ck`: `x.y.ck` is registrable
    itself) or as a domain of their own (`<data>.com`), names carried nothing below their
    registrable domain, so 60 of 101 characters went upstream past a client budget of 2,000
    bytes. Nor did the registrable domain's own labels below a label more (`x.<data>.com`:
    256 names, 16,896 bytes, the re-attack). A client's names carry all their bytes but
    their top-level label's."""
    for shape, suffix in (("{}.{}.ck", 3), ("{}{}.com", 4), ("x.{}.{}.ck", 3),
                          ("x.{}{}.com", 4)):
        detector = TunnelDetector(TunnelBudget(max_name_bytes=1_000, max_client_name_bytes=2_000))
        answers = [detector.observe(A, shape.format(b32(40)[:50], b32(40)[:50]), "A", 0.0)
                   for _ in range(60)]
        stopped = next(n for n, why in enumerate(answers) if why)
        assert stopped == 2_000 // (len(shape.format("x" * 50, "x" * 50)) - suffix), shape
        assert answers[stopped].startswith("name-bytes: over 2000 bytes of different names "
                                           "under every domain")


def test_the_type_of_a_lookup_carries_no_data_past_the_budget() -> None:
    """One name asked as type after type: each went upstream uncounted (red team)."""
    detector = TunnelDetector(TunnelBudget(max_unique_names=50, max_unusual_types=1000))
    answers = [detector.observe(A, "payload.evil.example.com", f"TYPE{n}", 0.0)
               for n in range(1, 200)]
    assert answers[:50] == [""] * 50 and all(answers[50:])


def test_pushing_a_zone_out_of_the_table_neither_resets_its_count_nor_its_suspicion(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Lookups under thousands of throwaway domains evicted a client's counters and
    suspicion (red team): now they make the client itself suspect."""
    monkeypatch.setattr(tunnel, "MAX_ZONES", 100)
    detector = TunnelDetector(TunnelBudget(max_unique_names=5))
    for n in range(6):
        detector.observe(A, f"n{n}.evil.example.com", "A", 0.0)
    assert detector.observe(A, "n6.evil.example.com", "A", 1.0)  # suspected
    for n in range(MAX_DOMAINS_PER_CLIENT - 1):
        assert detector.observe(A, f"x.d{n}.com", "A", 2.0) == ""
    assert detector.observe(A, "n7.evil.example.com", "A", 3.0)  # still
    assert detector.observe(A, "x.one-too-many.com", "A", 3.0).startswith("zone-churn")
    assert detector.observe(A, "x.d0.com", "A", 4.0).startswith("zone-churn")
    assert detector.observe("10.0.0.9", "x.d0.com", "A", 4.0) == ""  # another client


def test_detection_can_be_turned_off_and_is_set_in_the_policy() -> None:
    assert TunnelDetector(TunnelBudget(enabled=False)).observe(A, "x.com", "TXT", 0) == ""
    policy = Policy.from_text('version: "1.0"\ndnsTunnel: {maxUniqueNames: 50, window: '
                              '"30 seconds", maxLabelLength: 40, maxNameBytes: 900, '
                              'maxClientNameBytes: 5000, maxClientLookups: 700}\nrules: []\n')
    assert (policy.tunnel.max_unique_names, policy.tunnel.window,
            policy.tunnel.max_label_length, policy.tunnel.max_name_bytes,
            policy.tunnel.max_client_name_bytes, policy.tunnel.max_client_lookups) == (
        50, 30.0, 40, 900, 5000, 700)
    assert not Policy.from_text('version: "1.0"\ndnsTunnel: off\nrules: []\n').tunnel.enabled
    assert Policy.from_text('version: "1.0"\nrules: []\n').tunnel == TunnelBudget()


@pytest.mark.parametrize("text, problem", [
    ("dnsTunnel: {maxUniqueNames: 0}", "maxUniqueNames"),
    ("dnsTunnel: {window: soon}", "window"),
    ("dnsTunnel: {window: 1ms}", "at least 1 second"),
    ("dnsTunnel: {maxLabelLength: 63}", "maxLabelLength"),
    ("dnsTunnel: {maxNameBytes: 100}", "maxNameBytes"),
    ("dnsTunnel: {maxClientNameBytes: 100}", "maxClientNameBytes"),
    ("dnsTunnel: {maxClientLookups: 0}", "maxClientLookups"),
    ("dnsTunnel: {entropy: 3}", "entropy"),
])
def test_a_bad_budget_is_an_error_with_its_line(text: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem) as raised:
        Policy.from_text(f'version: "1.0"\n{text}\nrules: []\n')
    assert ":2:" in str(raised.value)


def test_memory_is_bounded_whatever_the_agent_sends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel, "MAX_ZONES", 50)
    detector = TunnelDetector(TunnelBudget(max_unique_names=20))
    for n in range(5000):  # names under 500 domains, from 10 clients
        detector.observe(f"10.0.0.{n % 10}", f"{b32(20)}.d{n % 500}.com", "A", 0.0)
    zones = detector._zones
    assert len(zones) <= 50 and len(detector._clients) <= 50
    assert all(len(zone.names) <= 21 for zone in zones.values())
    assert sys.getsizeof(zones) < 10_000


def test_repeating_a_few_names_carries_no_data_past_the_budget() -> None:
    """Names answered with TTL 0 (or failing) go upstream at every repeat: sixteen names
    carry four bits a lookup in their order (attack pass), so every lookup sent upstream
    counts; past the budget the domain is suspected for its next lookups too."""
    detector = TunnelDetector(TunnelBudget(max_lookups=50))
    answers = []
    for n in range(200):
        name = f"{n % 16:x}.x.attacker.example"
        answers.append(detector.observe(A, name, "A", 0.0) or detector.forwarded(A, name, 0.0))
    assert answers[:50] == [""] * 50
    assert all(answer.startswith("lookups: over 50 lookups") for answer in answers[50:])


def test_lookups_spread_over_many_domains_have_a_budget_together() -> None:
    """Attack pass 49: `maxLookups` was per domain alone, so an agent that answers names under
    250 domains of its own with TTL 0 sent 110,000 lookups a minute upstream, carrying data in
    which of 16 names (and which domain) it asked, no budget tripped. Past
    `maxClientLookups` under every domain together, the client is suspected under all."""
    detector = TunnelDetector(TunnelBudget(max_lookups=50, max_client_lookups=200))
    answers = []
    for n in range(400):
        name = f"{n % 16:x}.z{n % 40}.com"  # (ten lookups a domain: far under 50)
        answers.append(detector.observe(A, name, "A", 0.0) or detector.forwarded(A, name, 0.0))
    assert answers[:200] == [""] * 200
    assert all(answer == "lookups: over 200 lookups under every domain in 1 minute"
               for answer in answers[200:]), set(answers[200:])
    assert detector.observe(A, "www.elsewhere.org", "A", 1.0)
    assert detector.observe("10.0.0.3", "www.elsewhere.org", "A", 1.0) == ""


def test_repeats_answered_from_the_cache_are_not_lookups() -> None:
    """A name answered from guardd's cache leaves nothing upstream: an agent that connects to
    its API a hundred times a second is no tunnel (a load test was refused as one)."""
    detector = TunnelDetector(TunnelBudget(max_lookups=50))
    assert detector.forwarded(A, "api.example.com", 0.0) == ""
    assert {detector.observe(A, "api.example.com", "A", 0.0) for _ in range(5000)} == {""}


def test_every_loopback_source_spends_one_tunnel_budget() -> None:
    """Attack pass: one budget per 127/8 source would be millions for an agent on the host."""
    detector = TunnelDetector(TunnelBudget(max_unique_names=5, window=60))
    verdicts = [detector.observe(f"127.0.0.{i}", f"n{i}.example.com", "A", 0.0)
                for i in range(1, 8)]
    assert verdicts[:5] == [""] * 5 and all(verdicts[5:])
