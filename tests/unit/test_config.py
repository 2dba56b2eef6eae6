"""Daemon configuration: file keys, flags on top, clear errors, resolv.conf without ourselves."""

from __future__ import annotations

import ipaddress
import os
import resource
import stat
from pathlib import Path

import re

import pytest

from guardd import config as config_module
from guardd.config import (Config, apply_settings, file_key, load_config_file,
                           readers_beyond_guardd, resolve_upstreams)
from guardd.dns.upstreams import Upstream
from guardd.errors import ConfigError
from guardd.net import (DESCRIPTORS_PER_CONNECTION, Endpoint, connections_within,
                        descriptor_limit)

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_config_names_every_key() -> None:
    """The README says systemd/guardd.yaml documents every key (session 60's read-through:
    `sameClient` was not there)."""
    text = (ROOT / "systemd" / "guardd.yaml").read_text()
    keys = [*config_module._FILE_KEYS, *(key for section in config_module._SECTION_KEYS.values()
                                        for key in section)]
    assert [key for key in keys if not re.search(rf"^\s*#?\s*{key}:", text, re.MULTILINE)] == []


def test_example_config_loads() -> None:
    config = load_config_file(ROOT / "systemd" / "guardd.yaml")
    assert config.dns == (Endpoint("0.0.0.0", 53),)
    assert config.metrics == Endpoint("127.0.0.1", 9477)
    assert config.audit_dir == Path("/var/log/guardd") and config.audit_keep == 10
    assert config.upstreams == () and config.upstream_total_timeout == 5
    assert config.socks == (Endpoint("0.0.0.0", 1080),) and config.socks_users == ()
    assert (config.socks_connect_timeout, config.socks_max_connections) == (10, 1024)
    assert config.audit_fail_open is False  # fail closed unless chosen
    assert config.drain_timeout == 10
    assert config.max_buffered_per_client == 64 << 20


def test_nat64_prefixes_are_read() -> None:
    config = apply_settings(Config(), {"nat64Prefixes": ["2001:db8:64::/96", "2001:db8:1::/48"]},
                            Path("/"), "cfg")
    assert config.nat64_prefixes == (ipaddress.ip_network("2001:db8:64::/96"),
                                     ipaddress.ip_network("2001:db8:1::/48"))


def test_flags_override_file_and_paths_are_relative(tmp_path: Path) -> None:
    (tmp_path / "g.yaml").write_text("policy: p.yaml\ndns: ['127.0.0.1:5353']\n"
                                     "audit: {dir: trail}\nmetrics: 'off'\n")
    config = load_config_file(tmp_path / "g.yaml")
    assert config.policy == tmp_path / "p.yaml" and config.audit_dir == tmp_path / "trail"
    assert config.metrics is None
    config = apply_settings(config, {"dns": ["[::1]:0", "127.0.0.1:0"], "upstreams": ["::1"]},
                            Path("/"), "command line")
    assert config.dns == (Endpoint("::1", 0), Endpoint("127.0.0.1", 0))
    assert config.upstreams == (Upstream("::1", 53),)


@pytest.mark.parametrize("data, fragment", [
    ({"dnss": ["127.0.0.1:53"]}, "unknown key 'dnss'"),
    ({"dns": ["localhost:53"]}, "invalid dns listen address"),
    # (session 60's read-through: an HTTP address's error gave DNS's port as its example)
    ({"http": ["localhost:3128"]}, r"invalid http listen address .*e\.g\. 127\.0\.0\.1:3128"),
    ({"dns": ["127.0.0.1:99999"]}, "invalid dns listen address"),
    ({"audit": {"keep": -1}}, "audit.keep"),
    ({"audit": {"kept": 3}}, "unknown key audit.kept"),
    ({"upstreamTimeout": {"attempt": 5, "total": 1}}, "must not exceed"),
    ({"clients": ["10.0.0.1/8"]}, "invalid clients"),
    ({"logLevel": "loud"}, "logLevel"),
    ({"upstreams": ["dns.example"]}, "invalid upstream"),
    ({"audit": {"failOpen": "yes"}}, "audit.failOpen must be true or false"),
    ({"drainTimeout": -1}, "drainTimeout must be a number of at least 0"),
    ({"audit": {"sync": "always"}}, "audit.sync must be one of none, batch"),
    ({"sameClient": ["10.0.0.2,agent.example"]}, "sameClient: .*agent.example"),
    ({"sameClient": [["10.0.0.2"]]}, "not a group of two or more"),
    ({"sameClient": [[]]}, "not a group of two or more"),
    ({"sameClient": ["10.0.0.2,::2", ["10.0.0.3", "10.0.0.2"]]}, "10.0.0.2 is in two groups"),
    ({"sameClient": ["10.0.0.2,::ffff:10.0.0.2"]}, "not a group of two or more"),
    ({"sameClient": [["127.0.0.2", "10.0.0.5"]]}, "127.0.0.2: loopback"),
    ({"sameClient": [["fe80::7", "10.0.0.5"]]}, "fe80::7: .*link-local"),
    ({"sameClient": ["fd00::1/64"]}, "sameClient: fd00::1/64 has host bits set"),
    ({"sameClient": [["10.0.0.0/24"], ["10.0.0.5", "fd00::5"]]},
     "10.0.0.5 is in 10.0.0.0/24 already"),
    ({"sameClient": [["fd00::/48"], ["fd00:0:0:7::/64"]]}, "fd00:0:0:7::/64 is in fd00::/48"),
    ({"sameClient": ["10.0.0.5,126.0.0.0/7"]}, "126.0.0.0/7: loopback"),
    ({"sameClient": ["fe80::/10"]}, "fe80::/10: .*link-local"),
    ({"sameClient": ["::ff00:0:0/88"]}, "holds IPv4-mapped addresses"),
    ({"maxBufferedPerClient": 1 << 20}, "maxBufferedPerClient must be a number of at least"),
    ({"nat64Prefixes": ["10.0.0.0/8"]}, "nat64Prefixes: 10.0.0.0/8 is not an IPv6 prefix"),
    ({"nat64Prefixes": ["2001:db8:64::/80"]}, "nat64Prefixes: .*/32, /40, /48, /56, /64 or /96"),
    ({"nat64Prefixes": ["2001:db8:64::1/96"]}, "nat64Prefixes: .*host bits set"),
    ({"nat64Prefixes": ["2001:db8::/32", "2001:db8:64::/96"]}, "2001:db8:64::/96 is in"),
    ({"nat64Prefixes": ["64:ff9b::/96"]}, "64:ff9b::/96 overlaps .*NAT64 well-known"),
    ({"nat64Prefixes": ["64:ff9b:1::/56"]}, "overlaps .*NAT64 local-use"),
    # (review: Teredo's and 6to4's addresses read as a translator's)
    ({"nat64Prefixes": ["2001::/32"]}, "2001::/32 overlaps .*Teredo"),
    ({"nat64Prefixes": ["2002:a00::/32"]}, "overlaps .*6to4"),
    ({"nat64Prefixes": ["::ffff:0:0/96"]}, "overlaps .*IPv4-mapped"),
], ids=["typo", "name", "http-name", "port", "keep", "sub-typo", "timeouts", "cidr", "log",
        "upstream-name", "fail-open", "drain", "sync", "same-client-name", "same-client-alone",
        "same-client-empty",
        "same-client-twice", "same-client-mapped", "same-client-loopback",
        "same-client-link-local", "same-client-host-bits", "same-client-in-a-network",
        "same-client-nested", "same-client-holds-loopback", "same-client-link-local-net",
        "same-client-mapped-net",
        "buffered", "nat64-v4", "nat64-length", "nat64-host-bits", "nat64-nested", "nat64-wkp",
        "nat64-local-use", "nat64-teredo", "nat64-6to4", "nat64-mapped"])
def test_errors(data: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        apply_settings(Config(), data, Path("/"), "cfg")


def test_the_addresses_of_one_agent_are_given_as_lists_or_as_the_flag_gives_them() -> None:
    config = apply_settings(Config(), {"sameClient": [["10.200.0.2", "FD00::2"],
                                                      "::ffff:10.201.0.2, fd01::2"]},
                            Path("/"), "cfg")
    assert config.same_client == (("10.200.0.2", "fd00::2"), ("10.201.0.2", "fd01::2"))


def test_an_agents_network_is_one_client() -> None:
    """Left open by session 57's re-attack (Low, availability): an agent with an IPv6 /64
    routed to it was a client per address. A group may hold networks, alone or beside
    addresses (an IPv4-mapped one as IPv4)."""
    config = apply_settings(Config(), {"sameClient": [["10.200.0.2", "FD00:6A72::/64"],
                                                      "fd01::/64", "::ffff:10.9.0.0/120"]},
                            Path("/"), "cfg")
    assert config.same_client == (("10.200.0.2", "fd00:6a72::/64"), ("fd01::/64",),
                                  ("10.9.0.0/24",))


def test_failing_open_is_an_explicit_setting() -> None:
    assert Config().audit_fail_open is False
    config = apply_settings(Config(), {"audit": {"failOpen": True}}, Path("/"), "cfg")
    assert config.audit_fail_open is True


def test_clients_default_refuses_public() -> None:
    config = Config()
    assert config.client_allowed(ipaddress.ip_address("172.17.0.2"))
    assert not config.client_allowed(ipaddress.ip_address("203.0.113.5"))


def test_resolv_conf_upstreams_exclude_guardd_itself(tmp_path: Path) -> None:
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\nnameserver 192.0.2.53\n")
    config = Config(dns=(Endpoint("0.0.0.0", 53),))
    assert resolve_upstreams(config, resolv) == (Upstream("192.0.2.53"),)
    resolv.write_text("nameserver 127.0.0.1\n")
    with pytest.raises(ConfigError, match="--upstream"):
        resolve_upstreams(config, resolv)


def test_proxied_connections_fit_the_descriptor_limit() -> None:
    """Issue 10: 10,000 clients got SUCCEEDED while only 3,330 relays existed. The cap now
    leaves every connection its descriptors (client, destination, two pipes)."""
    assert connections_within(65536, 2000, 1024) == 1024
    assert connections_within(4096, 2000, 1024) == (4096 - 2000) // DESCRIPTORS_PER_CONNECTION
    assert connections_within(1024, 2000, 1024) == 1  # refuses cleanly, still serves one


def test_a_cap_the_descriptor_limit_shrinks_shrinks_each_clients_share_with_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass (2026-12-06): under a hard limit of 2,400 descriptors the SOCKS and HTTP
    listeners served 40 connections each, but a client's cap stayed 256 of them: one agent
    held all 40, and every other was refused ("every connection slot is taken"). A client's
    share shrinks as the listener's does (a quarter, here), never below one."""
    from guardd import daemon

    monkeypatch.setattr(daemon, "descriptor_limit", lambda: 2400)
    caps = daemon.Daemon._connection_caps({"socks": (1024, 256), "http": (1024, 256),
                                           "transparent": (0, 256)})
    most, per_client = caps["socks"]
    assert most < 256 and caps["http"] == caps["socks"] and caps["transparent"] == (0, 0)
    assert per_client == max(1, most // 4)
    monkeypatch.setattr(daemon, "descriptor_limit", lambda: 1 << 20)
    assert daemon.Daemon._connection_caps({"socks": (1024, 256), "http": (0, 256),
                                           "transparent": (0, 256)})["socks"] == (1024, 256)


def test_a_client_cap_that_lets_one_client_take_every_slot_is_warned_of(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """socksMaxConnections set below the per-client cap (256 by default), left as it was: one
    agent could hold every connection and shut the others out, and nothing said so."""
    from guardd import daemon

    monkeypatch.setattr(daemon, "descriptor_limit", lambda: 1 << 20)
    assert daemon.Daemon._connection_caps({"socks": (100, 256), "http": (1024, 256),
                                           "transparent": (1, 1)}) == {
        "socks": (100, 100), "http": (1024, 256), "transparent": (1, 1)}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == ["the socks listener lets one client hold all 100 of its connections "
                      "(socksMaxConnectionsPerClient: 256): one agent can shut the others "
                      "out; set it below socksMaxConnections"]


def test_the_descriptor_limit_is_raised_to_the_hard_one() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        assert descriptor_limit() == hard == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("users", ["socksUsers: {ci-bot: s3cret}", "httpUsers: {ci-bot: s3cret}"])
def test_a_config_with_proxy_passwords_others_can_read_is_refused(tmp_path: Path,
                                                                   users: str) -> None:
    """Attack pass: scripts/install left guardd.yaml 0644, and an agent in `guardd sandbox
    exec` (another user of the same host) read the CI principal's password and logged in as
    it. Like sshd with a private key, guardd refuses it, saying what to do."""
    path = tmp_path / "g.yaml"
    path.write_text(f"policy: p.yaml\n{users}\n")
    path.chmod(0o644)
    with pytest.raises(ConfigError, match=r"every user of this host may read it \(mode 0644\).*"
                                          r"chmod o-r"):
        load_config_file(path)
    path.chmod(0o640)
    assert load_config_file(path).policy == tmp_path / "p.yaml"
    path.write_text("policy: p.yaml\nsocksUsers: {}\n")
    path.chmod(0o644)  # (no password in it: nothing to keep)
    assert load_config_file(path).socks_users == ()


@pytest.mark.parametrize(("uid", "gid", "mode", "who"), [
    (0, 0, 0o644, "every user of this host"),
    (65534, 0, 0o600, "its owner (uid 65534)"),  # (the agent's own user)
    (0, 65534, 0o640, "its group (gid 65534), not guardd's"),  # (the agent's group)
    (0, 0, 0o640, ""), (0, 990, 0o640, ""), (990, 0, 0o600, ""), (0, 65534, 0o600, ""),
])
def test_only_root_and_guardd_may_read_a_config_with_passwords(uid: int, gid: int, mode: int,
                                                                 who: str) -> None:
    """Final attack pass: a config with passwords owned by the agent's user, or readable by
    its group, passed the check on the bits for every user. (guardd: uid 990, groups 0, 990.)"""
    status = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))
    found = readers_beyond_guardd(status, 990, {0, 990})
    assert (found.startswith(who) and who != "") if who else found == ""


def test_a_config_that_is_no_regular_file_is_an_error_at_once(tmp_path: Path) -> None:
    """Attack pass (2026-12-06): a FIFO, or a device, held a reload (and every listener with
    it) until a writer came, or filled memory (`guardd.files`)."""
    from tests.unit.test_policy_loader import read_within

    fifo = tmp_path / "guardd.yaml"
    os.mkfifo(fifo)
    error = read_within(3, lambda: load_config_file(fifo), fifo)
    assert isinstance(error, ConfigError), error
    assert str(error) == f"cannot read config {fifo}: not a regular file"


@pytest.mark.parametrize(("text", "fragment"), [
    ("clients: &all [10.0.0.0/8]\nprincipals:\n  ci:\n    policy: p.yaml\n    clients: *all\n",
     r"cfg.yaml:5: a YAML alias \(\*all\)"),
    ("a: &l0 [x, x]\nb: &l1 [*l0, *l0]\nclients: [*l1, *l1]\n", r"cfg.yaml:2: a YAML alias"),
    ("policy: a.yaml\nlogLevel: info\npolicy: b.yaml\n", r"cfg.yaml:3: policy is given twice"),
    ("principals:\n  ci: {policy: a.yaml}\n  ci: {policy: b.yaml}\n",
     r"cfg.yaml:3: ci is given twice"),
    ("clients: " + "[" * 5000 + "]" * 5000 + "\n", "nested"),
    ("policy: a.yaml\n<<: {policy: b.yaml, logLevel: debug}\n", r"cfg.yaml:2: a YAML merge"),
], ids=["alias", "alias-bomb", "duplicate-key", "duplicate-principal", "deep", "merge-key"])
def test_a_config_file_that_reads_otherwise_than_it_looks_is_refused(
        tmp_path: Path, text: str, fragment: str) -> None:
    """Attack pass 49: nested aliases in a 429-byte config were expanded in full by `str()`
    (16.9 s at a reload, a level more 5 GB); a key given twice took the last value (a
    principal's policy swapped by a line added at the end); a file nested 5,000 deep raised
    RecursionError. Each is a config error with its line."""
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config_file(path)


def test_a_config_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(b"logLevel: info\n# caf\xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config_file(path)


def test_client_networks_written_ipv4_mapped_are_read_as_ipv4() -> None:
    """Attack pass 49: a principal's `clients: [::ffff:10.1.2.0/120]` (as `ss` shows a
    dual-stack peer) never matched: guardd sees IPv4 sources as IPv4, and the agent got the
    default principal's policy, silently."""
    config = apply_settings(Config(), {
        "clients": ["::ffff:10.1.2.0/120", "::ffff:10.9.9.9"],
        "principals": {"ci": {"policy": "strict.yaml", "clients": ["::ffff:10.1.2.0/120"]}}},
        Path("/"), "cfg")
    assert config.clients == (ipaddress.ip_network("10.1.2.0/24"),
                              ipaddress.ip_network("10.9.9.9/32"))
    assert config.principals[0].clients == (ipaddress.ip_network("10.1.2.0/24"),)
    with pytest.raises(ConfigError, match="/90 has host bits set"):
        apply_settings(Config(), {"clients": ["::ffff:10.0.0.0/90"]}, Path("/"), "cfg")


@pytest.mark.parametrize("field, key", [
    ("tcp_idle_timeout", "tcpIdleTimeout"), ("socks_users", "socksUsers"),
    ("http_max_connections_per_client", "httpMaxConnectionsPerClient"),
    ("socks_idle_timeout", "socksTimeout.idle"), ("audit_dir", "audit.dir"),
    ("cache_entries", "cache.maxEntries"), ("same_client", "sameClient"),
    ("upstreams", "upstreams"), ("policy", "policy")])
def test_a_field_is_named_by_its_key_in_the_file(field: str, key: str) -> None:
    """Session 60's read-through: the reload's warning named fields (`socks_users`)."""
    assert file_key(field) == key
