"""Which allow rules open private addresses: a glob vouches only for a zone that one owner
controls, by the Public Suffix List (issue 8, hole 6)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from publicsuffixlist import PublicSuffixList

from guardd.addr import AddrClass
from guardd.policy import zones
from guardd.policy.engine import Policy
from guardd.policy.model import NETWORK_REQUEST, Request
from guardd.policy.zones import refusal, zone_of


def allow(domain_yaml: str, tmp_path: Path | None = None, extra: str = "") -> Policy:
    return Policy.from_text('version: "1.0"\nrules:\n'
                            f"  - {{id: z, action: network.request, {domain_yaml}, "
                            f"effect: allow{extra}}}\n", "z.yaml", tmp_path)


def connect(policy: Policy, name: str, ip: str = "10.0.0.5"):
    return policy.decide(Request(NETWORK_REQUEST, name=name, ip=ipaddress.ip_address(ip),
                                 port=443))


#: (glob as written, a name it matches, whether the name may reach a private address).
VOUCHING = [
    ("*.corp.example.com", "db.corp.example.com", True),
    ("db.internal.example.com", "db.internal.example.com", True),
    ("*.example.co.uk", "svc.example.co.uk", True),
    ("api*.example.com", "api-eu.x.example.com", True),
    ("*-api.example.com", "eu-api.example.com", True),
    ("a.*.example.com", "a.b.c.example.com", True),
    ("*.Corp.Example.COM.", "db.corp.example.com", True),
    ("*.bücher.de", "shop.xn--bcher-kva.de", True),
    ("*.me.github.io", "www.me.github.io", True),
    ("*.corp.test", "db.corp.test", True),
    ("www.ck", "www.ck", True),
    ("*.internal", "db.internal", True),
    ("*.c.project.internal", "vm.c.project.internal", True),
    ("*.home.arpa", "nas.home.arpa", True),
    ("*.com", "evil.com", False),
    ("*.io", "evil.io", False),
    ("*.com.", "evil.com", False),
    ("*.co.uk", "evil.co.uk", False),
    ("*.uk", "evil.co.uk", False),
    ("*.github.io", "evil.github.io", False),
    ("github.io", "github.io", False),
    ("*.amazonaws.com", "evil.s3.amazonaws.com", False),
    ("*.x.ck", "evil.x.ck", False),
    ("*.公司.cn", "evil.xn--55qx5d.cn", False),
    ("*m", "evil.com", False),
    ("*example.com", "evilexample.com", False),
    ("*.*.com", "a.evil.com", False),
    ("*", "evil.com", False),
    ("smtp.*", "smtp.evil.com", False),
    ("*.lan", "nas.lan", False),
    ("*.corp", "db.corp", False),
    ("*.local", "printer.local", False),
    ("intranet", "intranet", False),
    ("*.arpa", "x.home.arpa", False),
]


@pytest.mark.parametrize("glob, name, vouches", VOUCHING, ids=[g for g, _, _ in VOUCHING])
def test_private_address_opened_only_under_a_zone_one_owner_controls(
        glob: str, name: str, vouches: bool) -> None:
    policy = allow(f'domain: "{glob}"')
    decision = connect(policy, name)
    assert decision.matched_rule == "z"
    assert decision.allowed is vouches, decision.reason
    assert connect(policy, name, "192.0.2.1").allowed  # the public address is not in question
    assert not connect(policy, name, "127.0.0.1").allowed  # no zone opens loopback


@pytest.mark.parametrize("glob, name, vouches", VOUCHING, ids=[g for g, _, _ in VOUCHING])
def test_dns_answers_are_vetted_alike(glob: str, name: str, vouches: bool) -> None:
    policy = allow(f'domain: "{glob}"')
    vetted = policy.vet_address(policy.resolvable(name), name, ipaddress.ip_address("10.0.0.5"))
    assert vetted.allowed is vouches


LISTABLE = [case for case in VOUCHING if case[0] != "*"]  # '*' is an error in a domainList


@pytest.mark.parametrize("glob, name, vouches", LISTABLE, ids=[g for g, _, _ in LISTABLE])
def test_domain_list_entries_vouch_alike(tmp_path: Path, glob: str, name: str,
                                         vouches: bool) -> None:
    (tmp_path / "allow.txt").write_text(f"ok.corp.example.com\n{glob}\n")
    assert connect(allow("domainList: allow.txt", tmp_path), name).allowed is vouches


def test_one_glob_that_does_not_vouch_closes_the_whole_rule() -> None:
    policy = allow('domain: ["*.corp.example.com", "*.com"]')
    assert not connect(policy, "db.corp.example.com").allowed
    assert "'*.com' spans the public suffix 'com'" in policy.rules[0].unvouched


def test_an_ip_condition_still_names_the_network() -> None:
    policy = allow('domain: "*.lan"', extra=", ip: 192.168.0.0/16")
    assert connect(policy, "nas.lan", "192.168.1.2").allowed
    assert policy.private_closed() == []
    assert [r.id for r in allow('domain: "*.lan"').private_closed()] == ["z"]


def test_deny_rules_and_rules_without_names_are_not_judged() -> None:
    policy = Policy.from_text(
        'version: "1.0"\nrules:\n'
        '  - {id: d, action: network.request, domain: "*.com", effect: deny}\n'
        '  - {id: a, action: network.request, effect: allow}\n')
    assert [rule.unvouched for rule in policy.rules] == ["", ""]
    assert policy.private_closed() == []
    decision = connect(policy, "x.org")
    assert decision.builtin is AddrClass.PRIVATE and decision.overridden
    assert policy.private_refusal(decision.rule, "x.org") == "rule 'a' names no domain"
    assert "connect by address" in policy.private_refusal(decision.rule, None)


@pytest.mark.parametrize("glob, zone", [
    ("*.corp.example.com", "corp.example.com"), ("api*.example.com", "example.com"),
    ("*example.com", "com"), ("a.*.b.example.com", "b.example.com"),
    ("x.example.com", "x.example.com"), ("*m", None), ("smtp.*", None), ("*", None), ("*.*.com", "com"),
], ids=["zone", "partial-first-label", "partial-label-spills", "middle", "exact", "suffix-only",
        "trailing-star", "universal", "two-stars"])
def test_zone_of(glob: str, zone: str | None) -> None:
    assert zone_of(glob) == zone


@pytest.mark.parametrize("glob, why", [
    ("*.com", "'*.com' spans the public suffix 'com'"),
    ("*example.com", "'*example.com' spans the public suffix 'com'"),
    ("github.io", "'github.io' is a public suffix"),
    ("*.amazonaws.com", "'*.amazonaws.com' spans the public suffix '"),
    ("*m", "'*m' names no zone"),
    ("*.lan", "'*.lan' spans the public suffix 'lan' (an unlisted top-level domain counts as "
              "one; only 'internal' and 'home.arpa' are reserved for private use)"),
], ids=["tld", "partial-label", "exact-suffix", "spans-below", "no-zone", "unlisted-tld"])
def test_refusal_says_why(glob: str, why: str) -> None:
    assert (refusal(glob) or "").startswith(why)


def private_use(name: str) -> bool:
    return name in zones.PRIVATE_USE_ZONES or name.endswith(zones._BELOW_PRIVATE_USE)


def test_the_sets_agree_with_publicsuffixlist_for_every_rule_and_its_neighbours() -> None:
    """`_SuffixList` runs the list's algorithm on sets; `publicsuffixlist`, parsing and encoding
    its file on its own, must give the same answer at, below and above every rule."""
    suffixes = zones._suffix_list()
    oracle = PublicSuffixList()
    names: set[str] = set()
    for name in suffixes.listed | suffixes.exceptions:
        names.update((name, "a." + name, "b.a." + name, name.partition(".")[2]))
    names.discard("")
    assert len(names) > 20_000
    for name in sorted(names):
        expected = None if private_use(name) or not oracle.is_public(name) else name
        assert suffixes.public_suffix_in(name, spans_below=False) == expected, name


def test_every_public_suffix_is_refused_to_a_glob_on_it_or_above_it() -> None:
    for name in filter(lambda name: not private_use(name), zones._suffix_list().listed):
        parent = name.partition(".")[2]
        assert refusal(name) is not None and refusal("*." + name) is not None, name
        assert not parent or refusal("*." + parent) is not None, name
