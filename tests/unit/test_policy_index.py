"""The compiled index must agree with a naive in-order scan of the rules (Hypothesis)."""

from __future__ import annotations

import ipaddress
import re
import time

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from guardd.addr import embedded_ipv4
from guardd.policy.engine import Policy
from guardd.policy.model import NETWORK_REQUEST, Request, Rule

LABELS = st.sampled_from(["a", "b", "c", "ab", "x-y", "_s"])
NAMES = st.lists(LABELS, min_size=1, max_size=4).map(".".join)
GLOBS = st.one_of(
    NAMES,
    NAMES.map(lambda n: "*." + n),
    st.just("*"),
    st.tuples(NAMES, NAMES).map(lambda p: f"{p[0]}*{p[1]}"),
    st.tuples(NAMES, NAMES).map(lambda p: f"{p[0]}.*.{p[1]}"),
    NAMES.map(lambda n: n + ".*"),
    NAMES.map(lambda n: "*" + n),
    NAMES.map(lambda n: "*.*." + n),
    st.lists(st.sampled_from(["a", "b", "ab", "a.b", "x-y"]), min_size=2, max_size=5).map(
        lambda parts: "*" + "*".join(parts)),  # (several `*`s and parts that repeat: where
    #                                               each goes is a choice)
)
NETWORKS = st.sampled_from(["203.0.113.0/24", "203.0.113.7", "198.51.100.0/25", "2001:db8::/32",
                            "2001:db8::7", "0.0.0.0/0", "::/0"])
ADDRESSES = st.sampled_from(["203.0.113.7", "203.0.113.200", "198.51.100.5", "192.0.2.1",
                             "2001:db8::7", "2001:db8:1::1", "::ffff:203.0.113.7"])


ACTION_TEXTS = ["network.request", "dns.query", '"*"']
PORT_TEXTS = ["80", "443", '"8000-8999"']


@st.composite
def rule_yaml(draw: st.DrawFn) -> str:
    parts = ["action: " + draw(st.sampled_from(ACTION_TEXTS))]
    hosts = draw(st.lists(st.one_of(GLOBS, NETWORKS), max_size=3))
    if hosts:
        parts.append("domain: [" + ", ".join(f'"{h}"' for h in hosts) + "]")
    if draw(st.booleans()) and draw(st.booleans()):
        parts.append(f'ip: "{draw(NETWORKS)}"')
    if draw(st.booleans()):
        parts.append("port: " + draw(st.sampled_from(PORT_TEXTS)))
    if draw(st.booleans()) and draw(st.booleans()):
        parts.append(f"method: {draw(st.sampled_from(['GET', 'POST']))}")
    parts.append(f"effect: {draw(st.sampled_from(['allow', 'deny']))}")
    return "- {" + ", ".join(parts) + "}\n"


def glob_matches(glob: str, name: str | None) -> bool:
    if glob == "*":
        return True
    if name is None:
        return False
    return re.fullmatch(".*".join(map(re.escape, glob.split("*"))), name) is not None


def naive_match(policy: Policy, request: Request) -> Rule | None:
    """The specification, literally: try every rule in file order."""
    ips = []
    if request.ip is not None:
        ips = [request.ip]
        if request.ip.version == 6 and embedded_ipv4(request.ip) is not None:
            ips.append(embedded_ipv4(request.ip))
    for rule in policy.rules:
        if request.action not in rule.actions or not rule.matches_port(request.port):
            continue
        if rule.methods and request.method not in rule.methods:
            continue
        if rule.ip_networks and not any(ip in n for ip in ips for n in rule.ip_networks
                                        if ip.version == n.version):
            continue
        if rule.domains or rule.domain_networks:
            by_name = any(glob_matches(g, request.name) for g in rule.domains)
            by_ip = any(ip in n for ip in ips for n in rule.domain_networks
                        if ip.version == n.version)
            if not (by_name or by_ip):
                continue
        return rule
    return None


@settings(max_examples=300, deadline=None)
@given(rules=st.lists(rule_yaml(), max_size=12), name=st.one_of(st.none(), NAMES),
       address=st.one_of(st.none(), ADDRESSES), port=st.sampled_from([None, 80, 443, 8500]),
       method=st.sampled_from([None, "GET", "POST"]))
def test_index_agrees_with_naive_scan(rules: list[str], name: str | None, address: str | None,
                                      port: int | None, method: str | None) -> None:
    policy = Policy.from_text('version: "1.0"\nrules:\n' + ("".join(rules) or "  []\n"), "h.yaml")
    request = Request(NETWORK_REQUEST, name=name,
                      ip=ipaddress.ip_address(address) if address else None,
                      port=port, method=method)
    assert policy.match(request) is naive_match(policy, request)


@settings(max_examples=200, deadline=None)
@given(globs=st.lists(st.tuples(st.sampled_from(["", "a", "x-"]), st.lists(st.sampled_from(
    ["a", "ab", "a.b", "x-y", "b.ab", "_s.a", "ab.x-y", "c.a"]), min_size=1, max_size=3),
    st.booleans()).map(lambda glob: glob[0] + "*" + "*".join(glob[1]) + "*" * glob[2]),
    min_size=32, max_size=48), names=st.lists(NAMES, max_size=8))
def test_many_globs_filed_by_a_piece_agree_with_naive_scan(globs: list[str],
                                                           names: list[str]) -> None:
    """From 32 pattern globs on, each is filed by a piece of its parts (`index._GRAM`)."""
    policy = Policy.from_text('version: "1.0"\nrules:\n' + "".join(
        f'- {{action: network.request, domain: "{glob}", effect: deny}}\n' for glob in globs),
        "many.yaml")
    assume(policy.index._grams)  # (else too few have a piece: tried in turn)
    for name in names:
        request = Request(NETWORK_REQUEST, name=name)
        assert policy.match(request) is naive_match(policy, request)


SHAPES_POLICY = """version: "1.0"
rules:
- {action: network.request, domain: "*.b.c", effect: deny}
- {action: network.request, domain: "*.x.y.z", effect: deny}
- {action: network.request, domain: ["smtp.*", "s3.*.aws.com"], effect: deny}
- {action: network.request, domain: "api-*.x.com", effect: deny}
- {action: network.request, domain: "*cdn*", effect: deny}
"""


@pytest.mark.parametrize("name, expected", [
    ("a.b.c", [0]), ("deep.er.a.b.c", [0]), ("b.c", []), ("c", []),
    ("w.x.y.z", [1]), ("v.w.x.y.z", [1]), ("x.y.z", []),
    ("smtp.gmail.com", [2]), ("smtp", []), ("smtps.gmail.com", []),
    ("s3.eu.aws.com", [2]), ("s3.aws.com", []),
    ("api-1.x.com", [3]), ("api-.x.com", [3]), ("api-1.y.com", []),
    ("mycdn.example", [4]), ("cdn", [4]), ("api-cdn.x.com", [3, 4]),
], ids=lambda value: value if isinstance(value, str) else None)
def test_zone_depths_and_pattern_buckets(name: str, expected: list[int]) -> None:
    """Zones at two depths (a name asks only at those), patterns keyed by a literal first label
    (`smtp.*`) and patterns tried in turn behind their literal tail (`api-*.x.com`, `*cdn*`)."""
    assert Policy.from_text(SHAPES_POLICY, "shapes.yaml").index.candidates(name, None) == expected


def test_a_name_against_a_glob_of_many_stars_costs_a_pass_a_part() -> None:
    """A name the agent chose (ending as the glob does, so that the glob is tried), against a
    glob of several `*`s whose parts it repeats and one part it lacks: tried as every way to
    split it, a 253-character name took 6 s with six `*`s (hours with a few more), and the
    loop stood still meanwhile (attack pass, 2026-12-06)."""
    policy = Policy.from_text('version: "1.0"\nrules:\n- {action: network.request, '
                              'domain: "*a*a*a*a*b*c", effect: deny}\n'
                              "- {action: network.request, domain: \"*\", effect: allow}\n",
                              "stars.yaml")
    lacking_b = ".".join(["a" * 63] * 4)[:252] + "c"
    started = time.process_time()
    assert policy.match(Request(NETWORK_REQUEST, name=lacking_b)) is policy.rules[1]
    assert time.process_time() - started < 0.5  # (microseconds now; 6 s before)
    assert policy.match(Request(NETWORK_REQUEST, name=lacking_b[:200] + "b" + lacking_b[201:])
                        ) is policy.rules[0]


def test_a_long_name_against_many_globs_costs_a_substring_search_of_each(tmp_path) -> None:
    """Session 61's attack (Medium, availability, with such a policy): 5,000 `*xxxxxx*` deny
    globs (within the 10,000 `*`s a policy may have), each a regex run on a 250-character name:
    10 ms a name, and an answer naming 240 such names held the loop 2.5 s. A glob is tried
    only on a name that holds its literal parts."""
    (tmp_path / "globs.txt").write_text("".join(f"*{i:06x}q*\n" for i in range(5000)))
    policy = Policy.from_text('version: "1.0"\nrules:\n'
                              '- {action: network.request, domainList: globs.txt, effect: deny}\n'
                              '- {action: network.request, domain: "*", effect: allow}\n',
                              "globs.yaml", tmp_path)
    names = [".".join([f"{n:03d}" + "a" * 59] * 4)[:250] for n in range(100)]
    started = time.process_time()
    assert all(policy.match(Request(NETWORK_REQUEST, name=name)) is policy.rules[1]
               for name in names)
    assert time.process_time() - started < 0.25  # (10 ms a name before, 1 s; 0.7 ms now)
    assert policy.match(Request(NETWORK_REQUEST, name="x.0012abq.test")) is policy.rules[0]


def test_large_domain_list_compiles_into_dicts(tmp_path) -> None:
    (tmp_path / "big.txt").write_text("".join(f"host{i}.example\n*.zone{i}.example\n"
                                              for i in range(5000)))
    policy = Policy.from_text('version: "1.0"\nrules:\n'
                              '- {action: network.request, domainList: big.txt, effect: deny}\n'
                              '- {action: network.request, domain: "*", effect: allow}\n',
                              "big.yaml", tmp_path)
    assert policy.index.size == 10000
    assert policy.match(Request(NETWORK_REQUEST, name="host4999.example")).position == 0
    assert policy.match(Request(NETWORK_REQUEST, name="a.b.zone17.example")).position == 0
    assert policy.match(Request(NETWORK_REQUEST, name="zone17.example")).position == 1
