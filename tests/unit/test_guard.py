"""Guard: connects judged as resolved names, own-socket loops, method dependence, rate limits."""

from __future__ import annotations

import ipaddress

from guardd.guard import Guard, ResolvedNames
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.ratelimit import RateLimiter
from tests.unit.fakes import ListAudit

POLICY = """\
version: "1.0"
rules:
  - {id: docs-get, action: network.request, domain: docs.test, method: GET, effect: allow}
  - {id: docs-post, action: network.request, domain: docs.test, method: POST, effect: deny}
  - {id: api, action: network.request, domain: api.test, effect: allow,
     rateLimit: {maxRequests: 3, window: "1 minute"}}
  - {id: loopback, action: network.request, ip: 127.0.0.0/8, effect: allow}
  - {id: catch-all, action: "*", effect: deny}
"""

IP = ipaddress.ip_address


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_guard(clock: Clock | None = None) -> Guard:
    return Guard(Policy.from_text(POLICY), ListAudit(), Metrics(process=False),
                 RateLimiter(clock or Clock()))


def test_resolved_names_are_per_client_and_expire() -> None:
    clock = Clock()
    names = ResolvedNames(clock=clock)
    names.remember("10.0.0.2", "api.test", [IP("192.0.2.7")], ttl=30)
    assert names.lookup("10.0.0.2", IP("192.0.2.7")) == "api.test"
    assert names.lookup("10.0.0.3", IP("192.0.2.7")) is None
    names.remember_cached("10.0.0.3", "api.test")
    assert names.lookup("10.0.0.3", IP("192.0.2.7")) == "api.test"
    clock.now += 31
    assert names.lookup("10.0.0.2", IP("192.0.2.7")) is None


def test_connect_by_ip_judged_as_the_resolved_name() -> None:
    guard = make_guard()
    assert guard.judge_connect(None, IP("192.0.2.7"), 443, "10.0.0.2").matched_rule == "catch-all"
    guard.resolved.remember("10.0.0.2", "api.test", [IP("192.0.2.7")], ttl=30)
    assert guard.judge_connect(None, IP("192.0.2.7"), 443, "10.0.0.2").matched_rule == "api"
    assert guard.judge_connect(None, IP("192.0.2.7"), 443, "10.0.0.9").matched_rule == "catch-all"


def test_own_listener_is_a_loop_even_when_loopback_is_allowed() -> None:
    guard = make_guard()
    guard.own_sockets.add(("127.0.0.1", 1080))
    guard.own_sockets.add(("0.0.0.0", 5353))
    assert guard.judge_connect(None, IP("127.0.0.1"), 8080, "c").allowed
    for ip, port in (("127.0.0.1", 1080), ("127.0.0.5", 5353), ("::ffff:127.0.0.1", 1080)):
        decision = guard.judge_connect(None, IP(ip), port, "c")
        assert not decision.allowed and "own listener" in decision.reason


def test_depends_on_method() -> None:
    guard = make_guard()
    ip = IP("192.0.2.9")
    unknown = guard.judge_connect("docs.test", ip, 80, "c")
    assert not unknown.allowed and unknown.matched_rule == "catch-all"
    assert guard.depends_on_method("docs.test", ip, 80, "c", unknown)
    assert guard.judge_connect("docs.test", ip, 80, "c", "GET").allowed
    assert not guard.judge_connect("docs.test", ip, 80, "c", "POST").allowed
    other = guard.judge_connect("other.test", ip, 80, "c")
    assert not guard.depends_on_method("other.test", ip, 80, "c", other)


def test_depends_on_method_sees_ipv4_rules_through_a_mapped_address() -> None:
    guard = Guard(Policy.from_text("""\
version: "1.0"
rules:
  - {id: lab-get, action: network.request, ip: 192.0.2.0/24, method: GET, effect: allow}
  - {id: catch-all, action: "*", effect: deny}
"""), ListAudit(), Metrics(process=False))
    for ip in (IP("192.0.2.9"), IP("::ffff:192.0.2.9")):
        unknown = guard.judge_connect(None, ip, 80, "c")
        assert not unknown.allowed
        assert guard.depends_on_method(None, ip, 80, "c", unknown), ip
        assert guard.judge_connect(None, ip, 80, "c", "GET").allowed, ip


def test_rate_limit_denies_the_fourth_and_recovers() -> None:
    clock = Clock()
    guard = make_guard(clock)
    ip = IP("192.0.2.7")
    results = [guard.rate_limit(guard.judge_connect("api.test", ip, 443, "c1"), "c1")
               for _ in range(4)]
    assert [d.allowed for d in results] == [True, True, True, False]
    assert "rate limit of rule api exceeded (3 per 1 minute)" in results[3].reason
    other_client = guard.rate_limit(guard.judge_connect("api.test", ip, 443, "c2"), "c2")
    assert other_client.allowed
    clock.now += 61
    assert guard.rate_limit(guard.judge_connect("api.test", ip, 443, "c1"), "c1").allowed


def test_record_connect_fields() -> None:
    guard = make_guard()
    decision = guard.judge_connect("api.test", IP("192.0.2.7"), 443, "c1")
    guard.record_connect(decision, "c1", "api.test:443", "api.test", IP("192.0.2.7"), 443)
    record = guard.audit.records[0]  # type: ignore[attr-defined]
    assert record["action"] == "network.request" and record["listener"] == "socks"
    assert (record["target"], record["ip"], record["port"]) == ("api.test:443", "192.0.2.7", 443)
    assert (record["effect"], record["matchedRule"]) == ("allow", "api")
