"""`guardd audit replay` and `learn` (guardd/replay.py) on records as the trail holds them."""

from __future__ import annotations

import re
from ipaddress import ip_address
from pathlib import Path

import pytest

from guardd.errors import PolicyError
from guardd.policy.engine import Policy
from guardd.policy.model import NETWORK_REQUEST, Request
from guardd.guard import ENDED_OUTCOMES
from guardd.replay import learn, replay
from tests.unit.test_tunnel import POLICY as TUNNEL_POLICY
from tests.unit.test_tunnel import ZONE, FakeResolver, Rig

ALLOW_ALL = 'version: "1.0"\nrules:\n  - {id: all, action: "*", domain: "*", effect: allow}\n'
NO_MULTI = ('version: "1.0"\nrules:\n  - {id: no-multi, action: "*", domain: multi.example.com, '
            'effect: deny}\n  - {id: all, action: "*", domain: "*", effect: allow}\n')
NOTHING = 'version: "1.0"\nrules:\n  - {id: none, action: "*", domain: "*", effect: deny}\n'


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


NO_DELETE = ('version: "1.0"\nrules:\n  - {id: no-delete, action: "*", domain: api.example.com, '
             'method: DELETE, effect: deny}\n  - {id: all, action: "*", domain: "*", '
             'effect: allow}\n')


def request(method: str, override: str = "") -> dict[str, object]:
    record: dict[str, object] = {
        "action": "network.request", "listener": "http", "client": "10.0.0.2",
        "target": "http://api.example.com:80/item", "domain": "api.example.com",
        "ip": "93.184.216.34", "port": 80, "method": method, "effect": "allow",
        "matchedRule": "all"}
    if override:
        record["methodOverride"] = override
    return record


@pytest.mark.parametrize("override", ["DELETE", "*"])
def test_a_request_the_server_may_serve_as_another_method_is_replayed_as_that_too(
        override: str) -> None:
    """Attack pass: a GET with `X-HTTP-Method-Override: DELETE` (or a POST whose body names
    `_method`: any method) was recorded as the GET alone, and replay under a policy that
    denies DELETE said nothing would change, though guardd would deny it live."""
    report = replay(Policy.from_text(NO_DELETE), [request("GET", override)])
    assert report.changed == 1
    assert replay(Policy.from_text(NO_DELETE), [request("GET")]).changed == 0


@pytest.mark.parametrize(("method", "override"), [
    ("#X", ""), ("GET", "*A"), ("'X", ""), ("&X", ""), ("!X", ""), ("%X", ""), ("~", ""),
    ("get", ""), ("GET", "a b"), ("*", ""), ("NO", ""), ("GET", "NULL")])
def test_learn_leaves_out_a_request_whose_method_no_rule_can_name(method: str, override: str
                                                                  ) -> None:
    """Attack pass 16: a method the agent chose (`#X`, `*A`: HTTP tokens, recorded as report
    mode let them through) went into the learned YAML as it came, a comment or an alias there,
    and the file did not load. Such a request is left out: it stays denied, and the rest is
    learned as it was."""
    learned = learn([request(method, override), request("GET")], "trail")
    policy = Policy.from_text(learned)
    if method in ("NO",) or override in ("NULL",):  # (a method a rule can name, which YAML
        assert policy.rules[0].methods == {"GET", method, override} - {""}  # reads as a bool)
        return
    assert 'method: ["GET"]' in learned and "seen 1 times" in learned
    assert policy.rules[0].methods == frozenset({"GET"})
    only = learn([request(method, override)], "trail")
    assert "api.example.com" not in only and Policy.from_text(only).rules[0].id == \
        "catch-all-deny"


def test_learn_opens_no_address_for_a_lookup_of_a_name_that_is_none() -> None:
    """Final attack: a lookup whose name is no name (`1.2.3.4`, `bad name!`) went into the
    rule for bare addresses as a connect to its answers' `ip` (several: one text, comma
    separated, and the file did not load). A lookup opens no connect."""
    records = [query("bad name!", "203.0.113.5"), query("1.2.3.4", "192.0.2.9,198.51.100.7")]
    learned = learn(records, "trail")
    assert "learned-addresses" not in learned and "203.0.113.5" not in learned
    Policy.from_text(learned)


def test_learn_proposes_nothing_for_a_connect_to_a_name_with_no_address() -> None:
    """Session 60's re-attack (Medium): an allowed connect to a name with no address (a
    typo, or `<data>.evil.test`, always NXDOMAIN) is a failed allow since that session, and
    learn made it a connect rule with its port and method: it never reached anything."""
    failed = request("POST") | {"domain": "nxdel.test", "target": "http://nxdel.test:80/x",
                                "ip": None, "outcome": "no usable address: cannot resolve "
                                "nxdel.test: NXDOMAIN"}
    learned = learn([request("GET"), {k: v for k, v in failed.items() if v is not None}],
                    "trail")
    assert "nxdel.test" not in learned and "api.example.com" in learned


def test_learned_rules_have_ids_of_their_own() -> None:
    """Review of attack pass 16: ids made from domains, dots turned to dashes, could be one id
    for two domains (`a-b.com`, `x.a.b-com`), or the id of the rule for bare addresses."""
    records = [request("GET") | {"domain": domain, "target": f"http://{domain}/"}
               for domain in ("a-b.com", "x.a.b-com", "addresses")]
    records.append(request("GET") | {"domain": None, "target": "http://93.184.216.34/"})
    policy = Policy.from_text(learn(records, "trail"))
    ids = [rule.id for rule in policy.rules]
    assert len(ids) == len(set(ids)) == 5


def test_learn_allows_the_methods_a_request_may_be_served_as() -> None:
    learned = learn([request("GET", "DELETE"), request("GET")], "trail")
    assert 'method: ["DELETE", "GET"]' in learned
    learned = learn([request("POST", "*"), request("GET")], "trail")  # (any method: none
    assert "method:" not in learned                                   # can be a condition)


SLASH = ('version: "1.0"\nrules:\n  - {id: allow-test, action: "*", domain: "*.allowed.test", '
         'ip: 198.51.100.7/32, effect: allow}\n  - {id: deny-rest, action: "*", domain: "*", '
         'effect: deny}\n')


def test_names_are_replayed_as_the_daemon_judged_them_and_learned_only_when_nameable() -> None:
    """Attack pass 52: a DNS name may hold RFC 2317's '/' (`x/y.allowed.test`), which
    `*.allowed.test` matches; replay and learn read names as proxy targets are read, which
    refuse it: replay judged the connect the name allowed by its address alone ("would
    change" under the policy in force), and learn proposed a rule for the bare address, which
    opens it to any name. Replay reads a name as the daemon does; learn leaves a request for a
    name no rule can name out, not its address in."""
    lookup = query("x/y.allowed.test", "198.51.100.7", rule="allow-test")
    connect = {"action": "network.request", "listener": "socks", "client": "10.0.0.2",
               "target": "198.51.100.7:59080", "domain": "x/y.allowed.test",
               "ip": "198.51.100.7", "port": 59080, "effect": "allow",
               "matchedRule": "allow-test"}
    report = replay(Policy.from_text(SLASH), [lookup, connect])
    assert (report.changed, report.untold) == (0, 0)
    bad = query("a\\.b.allowed.test", rule="allow-test")  # (an escaped dot: no name at all)
    report = replay(Policy.from_text(SLASH), [bad])
    assert report.changed == 1 and report.untold == 0  # (the daemon denies it: NOT_A_NAME)
    learned = learn([lookup, connect], "trail")
    assert "198.51.100.7" not in learned and "learned-addresses" not in learned
    assert Policy.from_text(learned).rules[0].id == "catch-all-deny"


def test_a_name_only_looked_up_is_learned_for_lookups_alone() -> None:
    """Attack pass 52: a name the agent only looked up (a TXT query, denied in report mode)
    was learned as a rule for every action and port: connects to it on port 22 allowed. A
    rule learned from lookups alone allows lookups; one that saw a connect, what it saw."""
    looked_up = query("data-0001.c2.example", qtype="TXT", effect="deny", enforced=False)
    connected = request("GET")
    policy = Policy.from_text(learn([looked_up, connected, query("api.example.com")], "t"))
    assert policy.resolvable("data-0001.c2.example").allowed
    assert not policy.decide(Request(NETWORK_REQUEST, name="data-0001.c2.example",
                                     port=22)).allowed
    assert policy.decide(Request(NETWORK_REQUEST, name="api.example.com", port=80,
                                 method="GET")).allowed
    assert policy.failed_tests() == []


def test_names_only_looked_up_learn_no_connect_beside_one_connected_to() -> None:
    """Final attack of attack pass 52: lookups were learned apart from connects per
    registrable domain, not per name: a connect to www.example.com made every name only looked
    up under example.com a connect rule at its port (past eight, `*.example.com`), where the
    daemon had allowed none of those connects. What was connected to and what was only looked
    up are learned apart."""
    lookups = [query(name, "127.0.0.1", rule="lookups-only")
               for name in ["exfil.example.com"] + [f"n{n}.example.com" for n in range(9)]]
    connect = request("GET") | {"domain": "www.example.com", "ip": "127.0.0.1", "port": 62104,
                                "target": "http://www.example.com:62104/"}
    for records in (lookups + [connect], lookups[:3] + [connect]):
        policy = Policy.from_text(learn(records, "trail"))
        assert policy.failed_tests() == []
        loopback = ip_address("127.0.0.1")
        assert policy.decide(Request(NETWORK_REQUEST, name="www.example.com", ip=loopback,
                                     port=62104, method="GET")).allowed
        for name in ("exfil.example.com", "anything.example.com"):
            assert not policy.decide(Request(NETWORK_REQUEST, name=name, ip=loopback,
                                             port=62104, method="GET")).allowed, name
        assert policy.resolvable("exfil.example.com").allowed


async def test_replay_under_the_judging_policy_changes_none_of_guardds_own_denials() -> None:
    """Left open by attack pass 52 (helper E, Low-Medium): a denial guardd made by its own
    reading, not by its rule's effect (a rate limit spent, a Host it cannot verify), was
    recorded with the rule that allowed the request. Replayed under the very policy that
    judged, the rule allowed each again: "deny -> allow", a bucket an agent could fill and
    choose the example of, hiding a real change of the same rule pair. Such a record says so
    (`ownCheck`), and replay counts it apart unless the new policy's rules deny it too. A
    denial by a rule of the name the client's bytes claimed (domain fronting) is the rule's
    effect where the record says (the name, the connection's address and port): replayed as
    any; one made elsewhere (review of session 53: at the private address the claimed name
    resolves to, which the record does not hold) is guardd's own."""
    rig = Rig(resolver=FakeResolver(zone={**ZONE, "private.test": ["10.0.0.7"]}))
    rig.io.incoming.put_nowait(b"")
    await rig.through("limited.test")
    await rig.through("limited.test")  # (the rate limit: one a minute)
    for early in (b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n",
                  b"GET / HTTP/1.1\r\nHost: private.test\r\n\r\n",
                  b"GET / HTTP/1.1\r\nHost: x.tunnel.test\r\n\r\n"):
        rig.io.incoming.put_nowait(early)
        await rig.through("api.test", 80)
    *checked, fronted = [record for record in rig.records if record["effect"] == "deny"]
    assert len(checked) == 3 and all(record.get("ownCheck") is True for record in checked)
    assert checked[2]["domain"] == "private.test"
    assert fronted["domain"] == "x.tunnel.test" and "ownCheck" not in fronted
    report = replay(Policy.from_text(TUNNEL_POLICY), rig.records)
    assert (report.decisions, report.changed, report.checked) == (len(rig.records), 0, 3)
    assert "3 were denied by guardd's own checks" in report.lines()[0]
    assert "deny by guardd's own check -> allow: 3" in report.lines()  # (with an example of
    assert sum("e.g. network.request" in line for line in report.lines()) == 2  # each rule pair)
    report = replay(Policy.from_text(NOTHING), rig.records)  # (denied by a rule now too)
    assert (report.changed, report.checked) == (len(rig.records) - 4, 0)
    report = replay(Policy.from_text(ALLOW_ALL), rig.records)
    assert (report.changed, report.checked) == (1, 3)  # (the fronted name is allowed now)
    allowed = dict(rig.records[0], ownCheck=True)  # (an allow never says so; were it to,
    assert replay(Policy.from_text(ALLOW_ALL), [allowed]).checked == 0  # it is no denial)


GET_ONLY = """\
version: "1.0"
rules:
  - {id: api-get, action: network.request, ip: 192.0.2.9/32, port: 8022, method: GET,
     effect: allow}
  - {id: catch-all, action: "*", domain: "*", effect: deny}
"""
ANY_METHOD_NOW = GET_ONLY.replace(", method: GET", "")


async def test_a_denial_the_rules_made_is_no_own_check_whatever_guardd_read() -> None:
    """Re-attack of session 53 (Low-Medium): a connect a `method` rule alone could open, whose
    first bytes were no HTTP request (SSH), was denied by the rules (the method cannot be
    read) and recorded `ownCheck`: replay under a policy that opens the address to any method
    counted it apart, where the live daemon now relays it. A denial of what the rules already
    denied is theirs: replayed as any."""
    rig = Rig(policy=GET_ONLY)
    rig.io.incoming.put_nowait(b"SSH-2.0-x\r\n")
    await rig.through("192.0.2.9", 8022)
    denied = rig.records[-1]
    assert denied["effect"] == "deny" and "ownCheck" not in denied, denied
    report = replay(Policy.from_text(ANY_METHOD_NOW), rig.records)
    assert (report.changed, report.checked) == (1, 0)
    assert replay(Policy.from_text(GET_ONLY), rig.records).changed == 0


def test_a_note_of_how_an_allowed_connection_ended_is_no_decision() -> None:
    """Re-attack of session 53 (Info): the note of bytes read and dropped after a connection's
    last request (no method: no request was read) replayed as "allow -> deny" under the
    `method` rule that judged, noise an agent could make at will. Such notes, and those of a
    server's close, are no decisions."""
    get_only = ('version: "1.0"\nrules:\n  - {id: get-only, action: network.request, '
                'domain: "*", method: GET, effect: allow}\n')
    ended = [request("GET") | {"method": None, "outcome": f"{outcome}..."}
             for outcome in ENDED_OUTCOMES]
    assert replay(Policy.from_text(get_only), [request("GET"), *ended]).decisions == 1
    # (session 60: the note of a request its server never answered is one too)
    silent = request("GET") | {"method": None, "outcome": "not answered: the server sent "
                               "nothing for 300s (the idle timeout) after the request went"}
    assert replay(Policy.from_text(get_only), [request("GET"), silent]).decisions == 1


def test_an_address_a_record_names_is_replayed_as_an_address() -> None:
    """Final attack of session 53 (Low-Medium; the operator's tools): a Host naming an address
    is recorded with it as the `domain`, and replay judged that text as a name, which is none
    (`NOT_A_NAME`): denied under any policy. A request the daemon denied by the address was
    "0 would change" under a policy allowing every address (the live daemon let it through),
    and one it allowed there was "allow -> deny" under the policy that judged. An address is
    judged as one, as the daemon judged the claim."""
    denied = request("GET") | {"target": "pub.test:64581", "domain": "192.0.2.80",
                               "ip": "192.0.2.80", "port": 64581, "effect": "deny",
                               "matchedRule": "default-deny"}
    any_address = ('version: "1.0"\nrules:\n  - {id: any, action: "*", ip: "0.0.0.0/0", '
                   'effect: allow}\n')
    report = replay(Policy.from_text(any_address), [denied])
    assert report.changed == 1, report.lines()
    allowed = denied | {"effect": "allow", "matchedRule": "any"}
    assert replay(Policy.from_text(any_address), [allowed]).changed == 0


@pytest.mark.parametrize("host", ["93.184.216.34", "192.0.2.80"])
def test_learn_allows_a_request_whose_host_named_an_address_by_its_addresses(host: str
                                                                            ) -> None:
    """Session 53's final attack (Low): a Host naming an address is recorded with it as the
    `domain`, which is no name a rule can hold, so learn left the request out and its
    learned policy denied it. Such a claim was judged by the addresses alone (its own and the
    connection's, as replay judges it): learned, they are the bare addresses' rule, and the
    learned policy allows the request again."""
    record = request("GET") | {"domain": host, "target": f"http://{host}/item"}
    learned = learn([record], "trail")
    [rule] = [line for line in learned.splitlines() if "id: learned-addresses" in line]
    assert '"93.184.216.34"' in rule and f'"{host}"' in rule and "port: [80]" in rule
    report = replay(Policy.from_text(learned), [record])
    assert (report.changed, report.untold) == (0, 0)
