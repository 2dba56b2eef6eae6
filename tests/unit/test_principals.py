"""Per-agent policies (`principals:`): the config, who a client is, and that each principal's
policy, cache, rate limits and records are its own."""

from __future__ import annotations

import asyncio
import ipaddress
import re
from collections.abc import Callable, Iterator
from ipaddress import ip_address as IP
from pathlib import Path

import pytest
from dnslib import RCODE, DNSRecord

from guardd.addr import LOOPBACK_CLIENT, count_host_as_loopback, counted_as
from guardd.config import Config, apply_settings, load_config_file
from guardd.daemon import Daemon
from guardd.dns.cache import AnswerCache
from guardd.dns.server import DNSService
from guardd.errors import ConfigError
from guardd.guard import HTTP_LISTENER, NOT_A_CLIENT, SOCKS_LISTENER, Guard
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.principals import UNMAPPED, Principal, PrincipalMap, Principals
from tests.unit.fakes import ListAudit
from tests.unit.test_dns_service import FakeUpstream, addresses, ask, ede_of, packet

OPEN = """\
version: "1.0"
rules:
  - {id: public, action: "*", domain: "*.example.com", effect: allow}
  - {id: lab, action: "*", domain: "*.lab.example.org", effect: allow}
  - {id: any-test, action: "*", domain: "*.test", effect: allow}
"""
CLOSED = """\
version: "1.0"
rules:
  - {id: ci-only, action: "*", domain: "*.corp.test", effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
"""


def config_of(tmp_path: Path, text: str) -> Config:
    (tmp_path / "default.yaml").write_text(OPEN)
    (tmp_path / "ci.yaml").write_text(CLOSED)
    path = tmp_path / "guardd.yaml"
    path.write_text("policy: default.yaml\n" + text)
    path.chmod(0o600)  # (it holds passwords)
    return load_config_file(path)


FLEET = """\
socksUsers: {alice: secret-a, bob: secret-b}
httpUsers: {carol: secret-c, alice: secret-a}
principals:
  ci:
    policy: ci.yaml
    clients: [10.1.2.0/24, "fd00:1::/64"]
    socksUsers: [alice]
    httpUsers: [carol, alice]
  lab:
    policy: default.yaml
    clients: [10.1.0.0/16]
"""


def test_config_reads_principals_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = config_of(tmp_path, FLEET + "unmapped: refuse\n")
    ci, lab = config.principals
    assert (ci.name, ci.policy, [str(n) for n in ci.clients]) == (
        "ci", tmp_path / "ci.yaml", ["10.1.2.0/24", "fd00:1::/64"])
    assert (ci.socks_users, ci.http_users, lab.name) == (("alice",), ("carol", "alice"), "lab")
    assert config.unmapped == "refuse"


@pytest.mark.parametrize(("text", "says"), [
    ("principals:\n  default: {policy: ci.yaml, clients: [10.0.0.0/8]}\n", "top-level policy"),
    ("principals:\n  ci: {policy: ci.yaml}\n", "nothing would ever be this principal"),
    ("principals:\n  ci: {clients: [10.0.0.0/8]}\n", "with a policy file"),
    ("principals:\n  ci: {policy: ci.yaml, client: [10.0.0.0/8]}\n", "unknown key 'client'"),
    ("principals:\n  'c i': {policy: ci.yaml, clients: [10.0.0.0/8]}\n", "principal name"),
    ("principals:\n  10.9.0.1: {policy: ci.yaml, clients: [10.0.0.0/8]}\n", "not an address"),
    ("principals:\n  a: {policy: ci.yaml, clients: [10.1.0.0/16]}\n"
     "  b: {policy: ci.yaml, clients: [10.1.0.0/16]}\n", "both claim 10.1.0.0/16"),
    ("principals:\n  a: {policy: ci.yaml, clients: [10.1.0.1/16]}\n", "invalid"),
    ("principals:\n  a: {policy: ci.yaml, clients: [203.0.113.0/24]}\n", "not inside clients"),
    ("principals:\n  a: {policy: ci.yaml, socksUsers: [mallory]}\n",
     "'mallory' is not a user of the top-level socksUsers"),
    ("socksUsers: {alice: x}\nprincipals:\n  a: {policy: ci.yaml, socksUsers: [alice]}\n"
     "  b: {policy: ci.yaml, socksUsers: [alice]}\n", "both claim socksUsers 'alice'"),
    ("unmapped: drop\n", "unmapped must be one of default, refuse"),
    ("principals: [ci]\n", "principals must map names"),
    ("unmapped: refuse\n", "would refuse every client"),
])
def test_config_errors_name_the_setting(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        config_of(tmp_path, text)


def test_map_takes_the_login_then_the_most_specific_network(tmp_path: Path) -> None:
    mapping = PrincipalMap.from_config(config_of(tmp_path, FLEET))
    assert mapping.by_address("10.1.2.7") == "ci"  # /24 beats /16
    assert mapping.by_address("10.1.9.7") == "lab"
    assert mapping.by_address("fd00:1::5%eth0") == "ci"
    assert mapping.by_address("10.2.0.1") == "default"
    assert mapping.by_user(SOCKS_LISTENER, "alice") == "ci"
    assert mapping.by_user(HTTP_LISTENER, "bob") is None  # bob is a SOCKS user
    assert mapping.by_user(SOCKS_LISTENER, "bob") is None
    refusing = PrincipalMap.from_config(apply_settings(
        config_of(tmp_path, FLEET), {"unmapped": "refuse"}, tmp_path, "test"))
    assert refusing.by_address("10.2.0.1") is None


def fleet(tmp_path: Path, unmapped: str = "default",
          served: Callable[[str], bool] = lambda client: client.startswith("10.")
          ) -> tuple[object, ListAudit, FakeUpstream]:
    """The principals of FLEET over a fake upstream, as the daemon builds them (`served`: the
    sources `clients` holds)."""
    config = config_of(tmp_path, FLEET + f"unmapped: {unmapped}\n")
    audit, upstream = ListAudit(), FakeUpstream()
    guard = Guard(Policy.from_text(OPEN), audit, Metrics(process=False), principal="default")

    def service(guard: Guard, refusing: str | None) -> DNSService:
        return DNSService(guard, AnswerCache(), upstream, guard.metrics,
                          lambda client: refusing is None and served(client),
                          refusing or NOT_A_CLIENT)

    policies = {"ci": Policy.from_text(CLOSED + '  - {id: mixed, action: "*", domain: '
                                       'mixed.corp.test, effect: allow}\n'),
                "lab": Policy.from_text(CLOSED)}
    principals = Principals(Principal("default", guard, service(guard, None)), service)
    principals.configure(config, {"default": guard.policy, **policies})
    return principals, audit, upstream


def test_two_clients_get_their_own_principals_answers_and_records(tmp_path: Path) -> None:
    principals, audit, upstream = fleet(tmp_path)
    service = principals.dns_service
    assert service is principals  # more than one principal: queries are routed
    assert addresses(ask(service, "www.example.com", client="10.9.0.1")) == ["192.0.2.1"]
    denied = ask(service, "www.example.com", client="10.1.2.3")
    assert denied.header.rcode == RCODE.NXDOMAIN  # ci's policy allows only *.corp.test
    assert upstream.asked == ["www.example.com"]  # ci's denial never went upstream
    assert addresses(ask(service, "db.corp.test", client="10.1.2.3")) == ["10.0.0.5"]
    assert ask(service, "x.lab.example.org", client="10.1.2.3").header.rcode == RCODE.NXDOMAIN
    assert [(r["principal"], r["client"], r["effect"]) for r in audit.records] == [
        ("default", "10.9.0.1", "allow"), ("ci", "10.1.2.3", "deny"),
        ("ci", "10.1.2.3", "allow"), ("ci", "10.1.2.3", "deny")]


def test_one_agents_addresses_must_be_one_principals(tmp_path: Path) -> None:
    """Attack pass 35 (Low, an operator's slip): a `sameClient` group (one agent's IPv4 and
    IPv6 addresses) whose addresses principals map apart let the agent choose its policy by
    the address it sends from (IPv4: ci; IPv6: the default). Refused, saying which, at start
    and at a reload (which keeps what is in force)."""
    spanning = 'sameClient: [[10.1.2.3, "fd00:2::3"]]\n'
    with pytest.raises(ConfigError, match=r"sameClient: 10\.1\.2\.3, fd00:2::3 are one "
                       r"client, but 10\.1\.2\.3 is ci's and fd00:2::3 is default's: the "
                       r"agent would "):
        PrincipalMap.from_config(config_of(tmp_path, FLEET + spanning))
    PrincipalMap.from_config(config_of(tmp_path, FLEET + spanning.replace("fd00:2", "fd00:1")))
    principals, _, _ = fleet(tmp_path)
    policies = {"default": Policy.from_text(OPEN), "ci": Policy.from_text(CLOSED),
                "lab": Policy.from_text(OPEN)}
    with pytest.raises(ConfigError, match="sameClient"):
        principals.configure(config_of(tmp_path, FLEET.replace("10.1.2.0/24", "10.1.3.0/24")
                                       + spanning.replace("10.1.2.3", "10.1.3.3")), policies)
    ci = principals.of("10.1.2.3")
    assert ci is not None and ci.name == "ci" and ci.guard.policy is not policies["ci"]


@pytest.mark.parametrize("group, says", [
    ('["10.1.0.0/16"]', "10.1.0.0/16 is lab's and ci's"),
    ('["10.1.2.0/23"]', "10.1.2.0/23 is lab's and ci's"),
    ('["10.1.2.128/25", "fd00:1::7"]', ""),
    ('["10.1.2.0/24", "fd00:9::/64"]', "10.1.2.0/24 is ci's and fd00:9::/64 is default's"),
    ('["10.1.4.0/24"]', ""),
    ('["10.1.6.0/23"]', "10.1.6.0/23 is ci's and lab's"),
], ids=["holds-a-principals-network", "holds-part-of-one", "inside-one", "beside-another",
        "covered-by-one-principals-networks", "covered-by-two-principals"])
def test_an_agents_network_must_be_one_principals(tmp_path: Path, group: str, says: str
                                                  ) -> None:
    """A `sameClient` network is one client, so all of it must be one principal's: a network
    that holds a principal's network and addresses outside it would let the agent choose its
    policy by the address it sends from, as two addresses mapped apart did (attack pass 35).
    One that networks of one principal's cover whole is that one's (its review)."""
    halves = FLEET.replace("[10.1.2.0/24,", "[10.1.2.0/24, 10.1.4.0/25, 10.1.4.128/25, "
                           "10.1.6.0/24,").replace("[10.1.0.0/16]", "[10.1.0.0/16, 10.1.7.0/24]")
    config = config_of(tmp_path, halves + f"sameClient: [{group}]\n")
    if not says:
        PrincipalMap.from_config(config)
        return
    with pytest.raises(ConfigError, match=re.escape(says) + ": the agent would choose"):
        PrincipalMap.from_config(config)


@pytest.mark.parametrize("clients, says", [
    ("[127.0.0.2/32]", "127.0.0.2/32 holds part of loopback"),
    ("[127.0.0.0/8]", "127.0.0.1 is ci's and ::1 is default's"),
], ids=["part-of-127/8", "ipv4-loopback-only"])
def test_loopback_is_one_principals_or_none(tmp_path: Path, clients: str, says: str) -> None:
    """Review of attack pass 35: every loopback address is one client (any process on the
    host may bind any of them), yet a principal could hold part of it, and a process on the
    host chose its policy by the source address it bound. A principal holds all of loopback
    (127.0.0.0/8 and ::1) or none of it."""
    text = f"principals:\n  ci:\n    policy: ci.yaml\n    clients: {clients}\n"
    with pytest.raises(ConfigError, match=re.escape(says)):
        PrincipalMap.from_config(config_of(tmp_path, text))
    whole = text.replace(clients, '[127.0.0.0/8, "::1/128", 10.1.0.0/16]')
    assert PrincipalMap.from_config(config_of(tmp_path, whole)).by_address("::1") == "ci"


@pytest.fixture
def host_holds() -> Iterator[set[str]]:
    """The addresses of guardd's own host, as the daemon tells `counted_as` (none before)."""
    held: set[str] = set()
    count_host_as_loopback(lambda address: address in held or address.startswith("127.") or
                           address == "::1")  # (loopback is the host's, as the kernel says)
    yield held
    count_host_as_loopback(None)


def test_an_address_of_guardds_host_is_loopback_whichever_principal_holds_it(
        tmp_path: Path, host_holds: set[str]) -> None:
    """Stop 39's note (Medium): any process on guardd's host may bind any of the host's
    addresses (a Docker bridge's gateway, an AnyIP route's), not only loopback's. One inside a
    principal's clients made a process on the host that principal, with its policy and limits
    of its own. Every address of the host is loopback: loopback's principal and counts."""
    host_holds.update(["10.1.2.1", "fd00:1::1"])
    principals, _, _ = fleet(tmp_path)
    for address in ("10.1.2.1", "fd00:1::1", "fd00:1::1%eth0"):
        assert counted_as(address) == LOOPBACK_CLIENT
        principal = principals.of(address)
        assert principal is not None and principal.name == "default", address
    agent = principals.of("10.1.2.3")
    assert agent is not None and agent.name == "ci" and counted_as("10.1.2.3") == "10.1.2.3"
    # Attack pass: a link-local address of the host is on every link, and the kernel answers a
    # connection from one on the link it came in by: an agent on another link that took the
    # host's fe80:: address completed its TCP handshake and was loopback. It is not the host's.
    host_holds.add("fe80::b1")
    assert counted_as("fe80::b1%eth1") == "fe80::b1%eth1" and counted_as("fe80::b1") == "fe80::b1"
    assert [counted_as(text) for text in ("", "fe", "c")] == ["", "fe", "c"]  # (no raise)
    service = principals.dns_service
    assert addresses(ask(service, "www.example.com", client="10.1.2.1")) == ["192.0.2.1"]
    assert ask(service, "www.example.com", client="10.1.2.3").header.rcode == RCODE.NXDOMAIN


def test_the_map_says_which_host_addresses_another_principal_than_loopbacks_holds(
        tmp_path: Path) -> None:
    """What the daemon warns of at start and at a reload: a principal's network holding an
    address of guardd's host (a sidecar's pod address, a Docker bridge's gateway) no longer
    makes a process there that principal."""
    mapping = PrincipalMap.from_config(config_of(tmp_path, FLEET))
    held = ["127.0.0.1", "::1", "10.1.2.1", "10.1.9.1", "192.0.2.2", "fe80::1", "fd00:1::1"]
    assert mapping.apart_from_loopback(held) == [("10.1.2.1", "ci"), ("10.1.9.1", "lab"),
                                                 ("fd00:1::1", "ci")]
    # Final review: with loopback a principal's, an address no network holds was said to be
    # the default's "by its network". Only what a principal's network holds is told of.
    ops = PrincipalMap.from_config(config_of(tmp_path, FLEET + "  ops:\n    policy: default"
                                             '.yaml\n    clients: [127.0.0.0/8, "::1/128"]\n'))
    assert ops.apart_from_loopback(held) == [("10.1.2.1", "ci"), ("10.1.9.1", "lab"),
                                             ("fd00:1::1", "ci")]


@pytest.mark.parametrize("clients, admitted, refused", [
    ("[::1/128]", ["::1", "fd00:1::1"], ["127.0.0.1", "10.1.2.1"]),
    ("[127.0.0.1/32]", ["127.0.0.1", "10.1.2.1", "::ffff:10.1.2.1"], ["127.0.0.5", "::1"]),
    ("[10.0.0.0/8]", ["10.1.2.3"], ["10.1.2.1", "127.0.0.1"]),
])
def test_an_address_of_guardds_host_is_a_client_when_its_familys_loopback_is(
        host_holds: set[str], clients: str, admitted: list[str], refused: list[str]) -> None:
    """Review of the host-as-loopback change: `clients` admitted every address that counts as
    loopback by 127.0.0.1 alone: `[::1/128]` refused ::1, `[127.0.0.1/32]` admitted 127.0.0.5.
    Loopback addresses are admitted as they are; another address of the host as its family's
    loopback address (a process there may bind either)."""
    host_holds.update(["10.1.2.1", "fd00:1::1"])
    daemon = Daemon(Config(clients=tuple(map(ipaddress.ip_network, clients[1:-1].split(",")))),
                    metrics=Metrics(process=False))
    assert [daemon.client_allowed(client) for client in admitted + refused] == \
        [True] * len(admitted) + [False] * len(refused)


def test_an_address_the_host_gives_up_is_no_client_by_it_any_more(host_holds: set[str]
                                                                   ) -> None:
    """Attack pass 50: whether a source was an address of guardd's host was kept with the
    answer until a reload, so an address the host gave up (a bridge removed, a lease ended)
    and an agent on the link then took stayed a client, as loopback. It is asked each time."""
    host_holds.add("10.1.2.1")
    daemon = Daemon(Config(clients=(ipaddress.ip_network("127.0.0.0/8"),)),
                    metrics=Metrics(process=False))
    assert daemon.client_allowed("10.1.2.1")
    host_holds.discard("10.1.2.1")
    assert not daemon.client_allowed("10.1.2.1")
    host_holds.add("10.1.2.1")  # (and one it takes is at once)
    assert daemon.client_allowed("10.1.2.1")


def test_an_address_the_host_gives_up_is_its_networks_principals_at_once(
        tmp_path: Path, host_holds: set[str]) -> None:
    """Attack pass 52: the principal of a source was kept with whether it was the host's until
    a reload: an address a process on the host had asked from (loopback's principal) that the
    host then gave up and an agent on the link took kept loopback's policy, and the agent's
    POST to a name its own policy denied went out; the other way, a host process on an
    address an agent had held was that agent's principal. Whose an address is goes by
    whether it is the host's now."""
    principals, _, _ = fleet(tmp_path)
    host_holds.add("10.1.2.1")
    assert principals.of("10.1.2.1").name == "default"  # type: ignore[union-attr]
    host_holds.discard("10.1.2.1")  # (an agent on ci's link takes it)
    assert principals.of("10.1.2.1").name == "ci"  # type: ignore[union-attr]
    assert principals.of("10.1.2.7").name == "ci"  # type: ignore[union-attr]
    host_holds.add("10.1.2.7")  # (the host takes an address an agent held)
    assert principals.of("10.1.2.7").name == "default"  # type: ignore[union-attr]


@pytest.mark.parametrize("unmapped", ["default", "refuse"])
def test_a_forged_source_is_no_principals_and_never_answered(tmp_path: Path,
                                                             unmapped: str) -> None:
    """Review of attack pass 52: a source forged on a socket bound to loopback in ci's
    network was dropped by ci's service and recorded as ci's; one no principal claims, under
    `unmapped: refuse`, got that service's REFUSED, which echoes the name asked, sent to the
    address forged. A forged source is no one's: recorded under no principal, never
    answered."""
    principals, audit, upstream = fleet(tmp_path, unmapped, lambda client: True)
    for forged in ("fd00:1::5", "fd00:77::5"):  # (ci's network, and no principal's)
        assert principals.answer(packet("www.example.com", 7), forged, False, True) is None
        assert "principal" not in audit.records[-1]
        assert "bound to loopback" in str(audit.records[-1]["reason"])
    assert upstream.asked == []


def test_what_a_login_principal_resolved_names_no_address_for_another(tmp_path: Path
                                                                     ) -> None:
    """Review of stop 39: guardd's lookup for a socks5h connect under the principal a login
    chose (ci) taught the client's address, and the principal of that address (default)
    then judged a connect by it as the name: one principal's vetting stood for another's.
    Each principal reads only what was resolved under it."""
    principals, _, _ = fleet(tmp_path)
    ci = principals.of("10.9.0.1", SOCKS_LISTENER, "alice")
    default = principals.of("10.9.0.1")
    assert ci is not None and default is not None and default.name == "default"
    found, _, _ = asyncio.run(ci.dns.lookup("db.corp.test", "10.9.0.1"))
    assert found == [IP("10.0.0.5")]
    assert ci.guard.known_names(None, found[0], "10.9.0.1") == ("db.corp.test",)
    assert default.guard.known_names(None, found[0], "10.9.0.1") == ()


def test_an_answer_vetted_under_one_principal_is_not_served_to_another(tmp_path: Path
                                                                         ) -> None:
    """ci's `*.corp.test` names a zone, so its answers may hold the zone's private addresses;
    the default policy's `*.test` names none, so its clients must never get one, however
    often ci's answer was cached and memoized."""
    principals, _, upstream = fleet(tmp_path)
    for _ in range(2):  # (ci's rate limit: two a minute)
        assert addresses(ask(principals, "mixed.corp.test", client="10.1.2.3")) == [
            "10.0.0.6"]  # (its 127.0.0.1 stripped: loopback)
    for _ in range(3):
        assert addresses(ask(principals, "mixed.corp.test", client="10.9.0.1")) == []
    assert upstream.asked[:2] == ["mixed.corp.test", "mixed.corp.test"]  # a cache each


def test_rate_limits_are_each_principals_own(tmp_path: Path) -> None:
    """ci's rule allows two lookups a minute per client. One address is limited under ci
    (logged in as alice) and, at the same time, not under another principal whose policy has
    a rule of the same id."""
    principals, _, _ = fleet(tmp_path)
    ci = principals.of("10.9.0.1", SOCKS_LISTENER, "alice")
    lab = principals.of("10.1.9.9")
    assert ci is not None and lab is not None and (ci.name, lab.name) == ("ci", "lab")
    verdicts = [ci.guard.judge_query("db.corp.test", "A", "10.9.0.1") for _ in range(3)]
    assert [v.allowed for v in verdicts] == [True, True, False] and verdicts[2].limited
    assert lab.guard.judge_query("db.corp.test", "A", "10.9.0.1").allowed  # same rule id
    assert lab.guard.outbound is ci.guard.outbound
    assert lab.guard.resolved.table is ci.guard.resolved.table  # (each its own side of it)


def test_unmapped_clients_are_refused_when_so_configured(tmp_path: Path) -> None:
    principals, audit, upstream = fleet(tmp_path, "refuse")
    assert principals.of("10.9.0.1") is None
    assert principals.of("10.9.0.1", SOCKS_LISTENER, "alice").name == "ci"  # a login names one
    reply = ask(principals, "www.example.com", client="10.9.0.1")
    assert reply.header.rcode == RCODE.REFUSED and ede_of(reply) == (18, UNMAPPED)
    outside = ask(principals, "www.example.com", client="192.0.2.9", tcp=True)  # not a client
    assert outside.header.rcode == RCODE.REFUSED and ede_of(outside) == (18, NOT_A_CLIENT)
    assert ask(principals, "www.example.com", client="192.0.2.9") is None  # (over UDP)
    assert [(r["reason"], r.get("principal")) for r in audit.records] == [
        (UNMAPPED, None), (NOT_A_CLIENT, None),  # refused before anyone's policy judged
        (f"{NOT_A_CLIENT}; no answer over UDP, whose source is not proven", None)]
    assert upstream.asked == []
    assert addresses(ask(principals, "db.corp.test", client="10.1.2.3")) == ["10.0.0.5"]


def test_a_daemon_without_principals_routes_nothing(tmp_path: Path) -> None:
    (tmp_path / "default.yaml").write_text(OPEN)
    config = Config(policy=tmp_path / "default.yaml")
    guard = Guard(Policy.from_text(OPEN), ListAudit(), Metrics(process=False))
    default = Principal("default", guard, DNSService(guard, AnswerCache(), FakeUpstream(),
                                                      guard.metrics, lambda _: True))
    principals = Principals(default, service=lambda g, s: None)  # type: ignore[arg-type,return-value]
    principals.configure(config, {"default": guard.policy})
    assert principals.dns_service is default.dns
    assert principals.of("10.1.2.3") is default and guard.principal is None


def test_a_reload_keeps_a_principals_counts_and_applies_the_new_mapping(tmp_path: Path) -> None:
    """configure() again, as a reload does: ci stays (its rate limit goes on counting, under
    its new policy), lab is gone, its network is now ci's, and a new principal comes."""
    principals, _, _ = fleet(tmp_path)
    ci = principals.of("10.1.2.3")
    assert [ci.guard.judge_query("db.corp.test", "A", "10.1.2.3").allowed
            for _ in range(2)] == [True, True]
    (tmp_path / "ci.yaml").write_text(CLOSED)
    config = load_config_file(tmp_path / "guardd.yaml")
    moved = apply_settings(config, {"principals": {
        "ci": {"policy": "ci.yaml", "clients": ["10.1.0.0/16"]},
        "new": {"policy": "default.yaml", "httpUsers": ["carol"]}}}, tmp_path, "test")
    policies = {"default": Policy.from_text(OPEN), "ci": Policy.from_text(CLOSED),
                "new": Policy.from_text(OPEN)}
    principals.configure(moved, policies)
    assert principals.of("10.1.2.3") is ci and ci.guard.policy is policies["ci"]
    assert not ci.guard.judge_query("db.corp.test", "A", "10.1.2.3").allowed  # (2 a minute)
    assert principals.of("10.1.9.9") is ci  # lab's network, now ci's
    assert principals.of("10.9.0.1", SOCKS_LISTENER, "alice").name == "default"  # alice: none
    assert principals.of("10.9.0.1", HTTP_LISTENER, "carol").name == "new"
    assert [p.name for p in principals] == ["default", "ci", "new"]


def test_a_reload_of_the_same_files_keeps_the_policies_and_what_clients_resolved(
        tmp_path: Path) -> None:
    """Session 55's review: a reload forgets the names clients resolved under the policy it
    replaces (connects by address refused until they look them up again), and one whose files
    had not changed (a SIGHUP from configuration management, a `chmod` under `--watch`)
    replaced every policy all the same. A policy read from the same files with the same
    content stays in force, and what was resolved under it with it."""
    principals, _, _ = fleet(tmp_path)
    ci = principals.of("10.1.2.3")
    kept = ci.guard.policy
    ci.guard.resolved.remember("10.1.2.3", "db.corp.test", [ipaddress.ip_address("10.0.0.5")],
                               ttl=60)
    config = load_config_file(tmp_path / "guardd.yaml")
    again = {"default": Policy.from_text(OPEN), "lab": Policy.from_text(CLOSED),
             "ci": Policy.from_text(CLOSED + '  - {id: mixed, action: "*", domain: '
                                    'mixed.corp.test, effect: allow}\n')}
    principals.configure(config, again)
    assert ci.guard.policy is kept
    assert ci.guard.resolved.lookup("10.1.2.3", ipaddress.ip_address("10.0.0.5")) == \
        ("db.corp.test",)
    principals.configure(config, {**again, "ci": Policy.from_text(CLOSED)})
    assert ci.guard.policy is not kept
    assert ci.guard.resolved.lookup("10.1.2.3", ipaddress.ip_address("10.0.0.5")) == ()


def test_a_reload_of_the_same_files_asks_again_who_is_a_client(tmp_path: Path) -> None:
    """Session 59's attack (Medium): a reload that took an agent's network out of `clients`,
    its policy files unchanged, left every DNS service's memo of who is a client as it was:
    the proxies refused the agent, and its DNS queries for names of its own went on upstream
    (and one that added a network had its queries refused). Every reload asks again."""
    clients = {"10.1.2.3", "10.1.9.9"}
    principals, _, _ = fleet(tmp_path, served=clients.__contains__)
    for address in sorted(clients):
        assert principals.of(address).dns.serves(address)
    clients.clear()
    config = load_config_file(tmp_path / "guardd.yaml")
    principals.configure(config, {principal.name: principal.guard.policy
                                  for principal in principals})
    for address in ("10.1.2.3", "10.1.9.9"):
        assert not principals.of(address).dns.serves(address)


def test_a_reload_that_adds_principals_names_the_default_in_every_record(tmp_path: Path
                                                                        ) -> None:
    """Session 59's attack (Low; the trail): after a reload that added `principals`, its
    default policy unchanged, the default's DNS and connect records still came out without
    `principal` (its memoized verdicts were the old ones), and a filter on principal=default
    missed them; and the other way round."""
    audit, upstream = ListAudit(), FakeUpstream()
    guard = Guard(Policy.from_text(OPEN), audit, Metrics(process=False))

    def service(guard: Guard, refusing: str | None) -> DNSService:
        return DNSService(guard, AnswerCache(), upstream, guard.metrics, lambda client: True,
                          refusing or NOT_A_CLIENT)

    principals = Principals(Principal("default", guard, service(guard, None)), service)
    principals.configure(config_of(tmp_path, ""), {"default": guard.policy})
    fleet_policies = {"default": guard.policy, "ci": Policy.from_text(CLOSED),
                      "lab": Policy.from_text(CLOSED)}
    for config, policies, named in ((None, None, None),
                                    (config_of(tmp_path, FLEET), fleet_policies, "default"),
                                    (config_of(tmp_path, ""), {"default": guard.policy}, None)):
        if config is not None:
            principals.configure(config, policies)
        ask(principals.dns_service, "www.example.com", client="10.9.0.1")
        assert audit.records[-1].get("principal") == named, audit.records[-1]


async def answer_across_a_reload(tmp_path: Path, principals_then: dict[str, object],
                                 policies_then: set[str]) -> tuple[DNSRecord, ListAudit]:
    """10.1.9.9 (lab's, which allows private.other.org) asks it; while it is upstream, a
    reload configures `principals_then`, with the policies of `policies_then`: the answer."""
    principals, audit, upstream = fleet(tmp_path)
    config = load_config_file(tmp_path / "guardd.yaml")
    policies = {"default": Policy.from_text(OPEN), "ci": Policy.from_text(CLOSED),
                "lab": Policy.from_text(CLOSED + '  - {id: other, action: "*", domain: '
                                        'private.other.org, effect: allow}\n')}
    principals.configure(config, policies)
    asked, released = asyncio.Event(), asyncio.Event()
    resolve = upstream.resolve

    async def slow(query: bytes, *, prefer_tcp: bool = False, allowed: object = None,
                   client: str = "") -> bytes:
        asked.set()
        await released.wait()
        return await resolve(query, prefer_tcp=prefer_tcp)

    upstream.resolve = slow  # type: ignore[method-assign]
    query = DNSRecord.question("private.other.org", "A")
    answering = asyncio.ensure_future(principals.answer(bytes(query.pack()), "10.1.9.9",
                                                        False))  # type: ignore[arg-type]
    await asyncio.wait_for(asked.wait(), 5)  # (the question went upstream)
    principals.configure(apply_settings(config, {"principals": principals_then}, tmp_path,
                                        "test"),
                         {name: policies[name] for name in policies_then})
    released.set()
    return DNSRecord.parse(await answering), audit


async def test_an_answer_under_way_when_its_principal_goes_is_not_served(tmp_path: Path
                                                                          ) -> None:
    """Attack pass 17: an answer upstream when a reload dropped its principal was vetted under
    that principal's policy, never replaced, and served (its next query was NXDOMAIN). A
    principal that goes takes nobody's policy with it: what it has under way is denied."""
    reply, audit = await answer_across_a_reload(
        tmp_path, {"ci": {"policy": "ci.yaml", "clients": ["10.1.2.0/24"]}}, {"default", "ci"})
    assert reply.header.rcode == RCODE.NXDOMAIN and not reply.rr
    assert (audit.records[-1]["principal"], audit.records[-1]["effect"]) == ("lab", "deny")


async def test_an_answer_under_way_when_its_client_moves_to_another_principal_is_refused(
        tmp_path: Path) -> None:
    """Attack pass 26: a reload gave the client to another principal (its own still there,
    its policy the same) while its query was upstream: the answer was served under the
    principal the client no longer is. It is refused (REFUSED: asked again, the client's
    principal now answers), recorded; the name went out, so the record is never shed."""
    reply, audit = await answer_across_a_reload(
        tmp_path, {"ci": {"policy": "ci.yaml", "clients": ["10.1.9.0/24"]},
                   "lab": {"policy": "default.yaml", "clients": ["10.1.0.0/16"]}},
        {"default", "ci", "lab"})
    assert reply.header.rcode == RCODE.REFUSED and not reply.rr
    assert audit.records[-1]["effect"] == "deny"
    assert "another principal's" in str(audit.records[-1]["reason"])
    assert audit.went_out[-1] is True


def test_a_reload_that_changes_a_logins_account_closes_its_connection(tmp_path: Path) -> None:
    """Review (2026-12-06): alice, logged in from 10.1.2.3 (an address of ci's own), counts as
    that address; a reload that gives 10.1.2.0/24 to lab (alice stays ci's) makes her count as
    her login: her open connection, kept, went on spending the address's limits while her new
    ones spent the login's. It is closed, saying why."""
    from types import SimpleNamespace

    from guardd.http.server import HttpListener
    from guardd.stream.deadlines import Deadlines
    from guardd.stream.listener import ProxySettings
    from guardd.stream.reactor import Reactor
    from tests.unit.test_socket_io import on_uvloop

    principals, _, _ = fleet(tmp_path)
    seen: dict[str, object] = {}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        http = HttpListener(principals, ProxySettings(users={"alice": "secret-a"}),
                            lambda c: True, Deadlines(loop), Reactor(loop))
        tunnel = SimpleNamespace(guard=None, resolver=None, account="10.1.2.3",
                                 client="10.1.2.3", connect=None, user=None,
                                 handshake_over=lambda: None)
        task = asyncio.current_task()
        http._live[task] = [tunnel]  # type: ignore[index,list-item]
        await http.act_for(tunnel, "10.1.2.3", ("alice", "secret-a"),  # type: ignore[arg-type]
                           lambda why, number: b"")
        seen["acted"] = tunnel.account
        seen["unchanged"] = http._moved(task, tunnel)  # type: ignore[arg-type]
        config = apply_settings(load_config_file(tmp_path / "guardd.yaml"), {"principals": {
            "ci": {"policy": "ci.yaml", "clients": ["fd00:1::/64"], "httpUsers": ["alice"]},
            "lab": {"policy": "default.yaml", "clients": ["10.1.0.0/16"]}}}, tmp_path, "test")
        principals.configure(config, {"default": Policy.from_text(OPEN),
                                      "ci": Policy.from_text(CLOSED),
                                      "lab": Policy.from_text(CLOSED)})
        moved = http._moved(task, tunnel)  # type: ignore[arg-type]
        seen["moved"] = None if moved is None else moved.record.reason

    on_uvloop(run)
    assert seen == {"acted": "10.1.2.3", "unchanged": None, "moved": (
        "closed: the reload changed whose rate limits and tunnel budget it spends (its "
        "address's or its login's)")}


def test_act_for_and_a_reload_that_moves_the_login(tmp_path: Path) -> None:
    """act_for gives the tunnel its login's principal, guard and account; a reload that takes
    alice out of ci closes her connection (`_moved`), and a tunnel no principal took judges
    nothing open (nobody's policy denies everything)."""
    from types import SimpleNamespace

    from guardd.http.server import HttpListener
    from guardd.socks.server import SocksListener
    from guardd.stream.deadlines import Deadlines
    from guardd.stream.listener import ProxySettings
    from guardd.stream.reactor import Reactor
    from tests.unit.test_socket_io import on_uvloop

    principals, _, _ = fleet(tmp_path)
    seen: dict[str, object] = {}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        listener = SocksListener(principals, ProxySettings(users={
            "alice": "secret-a", "bob": "secret-b"}), lambda c: True, Deadlines(loop),
            Reactor(loop))
        tunnel = SimpleNamespace(guard=None, resolver=None, account="10.9.0.1",
                                 client="10.9.0.1", connect=None, handshake_over=lambda: None)
        task = asyncio.current_task()
        listener._live[task] = [tunnel]  # type: ignore[index,list-item]
        principal = await listener.act_for(tunnel, "10.9.0.1", ("alice", "secret-a"),  # type: ignore[arg-type]
                                           lambda why, number: b"")
        seen["acted"] = (principal.name, tunnel.account, tunnel.guard is principal.guard)
        http = HttpListener(principals, ProxySettings(users={"alice": "secret-a"}),
                            lambda c: True, Deadlines(loop), Reactor(loop))
        other = SimpleNamespace(guard=None, resolver=None, account="10.9.0.7",
                                handshake_over=lambda: None)
        await http.act_for(other, "10.9.0.7", ("alice", "secret-a"),  # type: ignore[arg-type]
                           lambda why, number: b"")
        seen["same login, other listener"] = other.account == tunnel.account
        # From an address ci holds: counted as the address, as its lookups are (attack pass,
        # 2026-12-06: a login and its address had two of every limit).
        own = SimpleNamespace(guard=None, resolver=None, account="10.1.2.3",
                              handshake_over=lambda: None)
        await http.act_for(own, "10.1.2.3", ("alice", "secret-a"),  # type: ignore[arg-type]
                           lambda why, number: b"")
        seen["from ci's own address"] = (own.guard is principal.guard, own.account)
        seen["unchanged"] = listener._moved(task, tunnel)  # type: ignore[arg-type]
        config = apply_settings(load_config_file(tmp_path / "guardd.yaml"), {"principals": {
            "ci": {"policy": "ci.yaml", "clients": ["10.1.2.0/24"]}}}, tmp_path, "test")
        principals.configure(config, {"default": Policy.from_text(OPEN),
                                      "ci": Policy.from_text(CLOSED)})
        moved = listener._moved(task, tunnel)  # type: ignore[arg-type]
        seen["moved"] = (moved.record.reason, moved.record.principal)
        fresh = listener.tunnel(None, "10.9.0.1", 1)  # type: ignore[arg-type]
        seen["nobody"] = fresh.guard.judge_address("www.example.com", IP("192.0.2.1"), 443,
                                                   "10.9.0.1")[0].allowed

    on_uvloop(run)
    assert seen == {"acted": ("ci", "ci user alice", True), "unchanged": None,
                    "same login, other listener": True,
                    "from ci's own address": (True, "10.1.2.3"),
                    "moved": ("closed: the reload made the client principal default", "ci"),
                    "nobody": False}


def test_a_refusal_at_act_for_tells_the_client_why(tmp_path: Path) -> None:
    """A client a reload took out of `clients` while its head was read is refused at act_for,
    and its 403 says that, not that it maps to no principal."""
    from types import SimpleNamespace

    from guardd.http.server import HttpListener
    from guardd.stream.deadlines import Deadlines
    from guardd.stream.listener import ProxySettings
    from guardd.stream.reactor import Reactor
    from tests.unit.test_socket_io import on_uvloop

    principals, _, _ = fleet(tmp_path)
    sent: list[bytes] = []

    async def send_quietly(data: bytes) -> None:
        sent.append(data)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        listener = HttpListener(principals, ProxySettings(), lambda c: False, Deadlines(loop),
                                Reactor(loop))
        tunnel = SimpleNamespace(guard=principals.nobody, send_quietly=send_quietly, user=None,
                                 handshake_over=lambda: None)
        assert await listener.act_for(tunnel, "10.1.2.3", None,  # type: ignore[arg-type]
                                      lambda why, number: why.encode()) is None

    on_uvloop(run)
    assert sent == [NOT_A_CLIENT.encode()]


def test_a_login_no_principal_takes_is_refused_naming_its_user_and_target(
        tmp_path: Path) -> None:
    """Attack pass (2026-12-06): under `unmapped: refuse`, a login that passed but that no
    principal takes, from an address no principal holds, was recorded with neither the user
    nor what it asked."""
    from types import SimpleNamespace

    from guardd.http.server import HttpListener
    from guardd.stream.deadlines import Deadlines
    from guardd.stream.listener import ProxySettings
    from guardd.stream.reactor import Reactor
    from tests.unit.test_socket_io import on_uvloop

    principals, audit, _ = fleet(tmp_path, "refuse")
    sent: list[bytes] = []

    async def send_quietly(data: bytes) -> None:
        sent.append(data)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        listener = HttpListener(principals, ProxySettings(users={"erin": "secret-e"}),
                                lambda c: True, Deadlines(loop), Reactor(loop))
        tunnel = SimpleNamespace(guard=principals.nobody, send_quietly=send_quietly, user=None,
                                 handshake_over=lambda: None)
        login = ("erin", "secret-e")
        assert await listener.act_for(tunnel, "10.9.0.1", login,  # type: ignore[arg-type]
                                      lambda why, number: why.encode(),
                                      target="http://web.test/x") is None

    on_uvloop(run)
    assert sent == [UNMAPPED.encode()]
    record = audit.records[-1]
    assert (record["reason"], record.get("user"), record.get("target")) == (
        UNMAPPED, "erin", "http://web.test/x")
