"""`guardd sandbox`: what it would build, as text (the e2e test builds it: test_sandbox_netns)."""

from __future__ import annotations

import pytest

from guardd.sandbox import DNS_QUERIES_PER_SECOND, Sandbox, SandboxError, exec_argv


def test_the_ruleset_covers_both_families_for_every_redirect_and_port() -> None:
    rules = Sandbox(name="ci").ruleset()
    for family, guard in (("ip", "10.200.0.1"), ("ip6", "fd00:6a72:6464::1")):
        host = f"[{guard}]" if family == "ip6" else guard
        assert f"th dport 53 dnat {family} to {host}:53" in rules
        assert f"meta l4proto tcp dnat {family} to {host}:15001" in rules
        assert f"{family} daddr {guard} tcp dport {{ 53, 1080, 3128, 15001 }} accept" in rules
        assert f"{family} daddr {guard} udp dport 53 accept" in rules
    assert 'iifname "ci-gd" counter drop' in rules and 'oifname "ci-gd" counter drop' in rules
    assert 'ip saddr != 10.200.0.2 counter drop' in rules
    assert 'ip6 saddr != { fd00:6a72:6464::2, fe80::/10, :: } counter drop' in rules
    assert 'ip6 saddr { fe80::/10, :: } meta l4proto != ipv6-icmp counter drop' in rules
    assert rules.count("counter drop") == 7  # forged sources, DNS flood, input, forward


def test_the_agents_dns_queries_are_limited_before_guardd_sees_them() -> None:
    """Attack pass (2026-12-04): a UDP flood of 270,000 queries a second, each dropped by
    guardd's CPU share for a lookup, still filled its socket's queue past what one core drains,
    and the kernel dropped every client's queries alike. The agent's queries are limited where
    they come in (before conntrack's "established" lets a one-socket flood by)."""
    rules = Sandbox(name="ci", dns_port=5353).ruleset()
    limit = f"meta l4proto udp th dport 5353 limit rate over {DNS_QUERIES_PER_SECOND}/second " \
            f"burst {DNS_QUERIES_PER_SECOND} packets counter drop"
    assert limit in rules
    assert rules.index(limit) < rules.index("ct state established,related accept")


def test_the_proxy_ports_are_not_redirected_and_the_flags_serve_every_listener() -> None:
    sandbox = Sandbox(name="ci", dns_port=5353, socks_port=1081, http_port=3129,
                      transparent_port=15002)
    assert "tcp dport { 1081, 3129 } return" in sandbox.ruleset()
    assert sandbox.guardd_flags() == [
        "--dns", "10.200.0.1:5353", "[fd00:6a72:6464::1]:5353",
        "--socks", "10.200.0.1:1081", "[fd00:6a72:6464::1]:1081",
        "--http", "10.200.0.1:3129", "[fd00:6a72:6464::1]:3129",
        "--transparent", "10.200.0.1:15002", "[fd00:6a72:6464::1]:15002",
        "--same-client", "10.200.0.2,fd00:6a72:6464::2"]  # (one agent: one client)
    assert sandbox.proxy_environment()["http_proxy"] == "http://10.200.0.1:3129"


@pytest.mark.parametrize("settings, problem", [
    ({"name": "Agent"}, "lower-case"), ({"name": "averyverylongname"}, "1-12"),
    ({"link4": "10.0.0.0/24"}, "/30"), ({"link6": "10.0.0.0/30"}, "IPv6 /64"),
    ({"dns_port": 1080}, "four different ports"), ({"http_port": 0}, "four different ports"),
])
def test_bad_settings_are_refused_with_what_to_do(settings: dict[str, object], problem: str
                                                  ) -> None:
    with pytest.raises(SandboxError, match=problem):
        Sandbox(**settings)  # type: ignore[arg-type]


def test_the_agent_never_runs_as_root_nor_keeps_a_capability() -> None:
    with pytest.raises(SandboxError, match="must not run as root"):
        exec_argv(Sandbox(), ["sh"], "root", proxy_env=True)
    argv = exec_argv(Sandbox(), ["curl", "x"], "nobody", proxy_env=False)
    assert argv[:4] == ["ip", "netns", "exec", "agent"]
    assert {"--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--clear-groups",
            "--pid", "--mount-proc"} <= set(argv)
    assert "-i" in argv and not any(a.startswith("HTTPS_PROXY=") for a in argv)
    assert argv[-2:] == ["curl", "x"]
