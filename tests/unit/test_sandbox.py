"""`guardd sandbox`: what it would build, as text (the e2e test builds it: test_sandbox_netns)."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from collections.abc import Callable
from pathlib import Path

import pytest

from guardd import sandbox as sandbox_module
from guardd.sandbox import (BLOCKED_TABLE, DNS_QUERIES_PER_SECOND, NEW_CONNECTIONS_PER_SECOND,
                            TRACKED_FLOWS, Sandbox, SandboxError, down, exec_argv)


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
    assert rules.count("counter drop") == 10  # forged sources, DNS and connect floods, flows,
    #                                           input, forward


def test_the_agent_cannot_fill_the_hosts_connection_tracking() -> None:
    """Attack pass 16: one UDP flow a source port (kept alive past two seconds: conntrack's
    120 s "stream", assured, never dropped early) and TCP's TIME_WAITs (120 s) had 137,615
    entries in the host's table in 3 minutes. New flows past `TRACKED_FLOWS` are dropped, the
    agent's UDP flows last 30 s and its closed TCP ones 5 s."""
    rules = Sandbox(name="ci").ruleset()
    for protocol in ("udp", "tcp"):  # (apart: the agent's DNS does not take its connects')
        count = f"meta l4proto {protocol} ct state new ct count over {TRACKED_FLOWS} counter drop"
        assert count in rules
        assert rules.index("ct state established,related accept") < rules.index(count) < \
            rules.index("tcp dport { 53, 1080, 3128, 15001 } accept")
    assert "policy = { unreplied: 30, replied: 30 }" in rules
    assert "policy = { time_wait: 5, close: 5 }" in rules
    for protocol in ("tcp", "udp"):
        assert f'iifname "ci-gd" ct state new meta l4proto {protocol} ct timeout set ' \
               f'"agent_{protocol}"' in rules


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


def test_the_agents_new_connections_are_limited_before_guardd_accepts_them() -> None:
    """Attack pass 49: 26,000-43,000 connects a second, each reset, filled the listen queue
    every client shares (guardd accepts, judges and refuses each, 25-40 us): another client's
    connects were dropped and took 3 s. The agent's new TCP connections are limited where they
    come in, before guardd's queue."""
    rules = Sandbox(name="ci", dns_port=5353).ruleset()
    limit = f"meta l4proto tcp ct state new limit rate over {NEW_CONNECTIONS_PER_SECOND}" \
            f"/second burst {NEW_CONNECTIONS_PER_SECOND} packets counter drop"
    assert limit in rules
    assert rules.index(limit) < rules.index("tcp dport { 5353, 1080, 3128, 15001 } accept")


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


def test_a_sandbox_on_the_addresses_of_another_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass 16: a second sandbox on the default link addresses came up: guardd's
    answers to one agent went to the other (its queries, its EDE texts), and guardd took
    both for one client."""
    monkeypatch.setattr(sandbox_module, "STATE_DIR", tmp_path)
    monkeypatch.setattr(sandbox_module, "NETNS_DIR", tmp_path / "netns")
    (tmp_path / "one.json").write_text(json.dumps(asdict(Sandbox(name="one"))))
    sandbox_module.addresses_free(Sandbox(name="two"))  # (its namespace is gone: not up)
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "one").touch()
    with pytest.raises(SandboxError, match=r"sandbox one uses 10\.200\.0\.0/30.*--link4"):
        sandbox_module.addresses_free(Sandbox(name="two"))
    with pytest.raises(SandboxError, match=r"sandbox one uses fd00:6a72:6464::/64.*--link6"):
        sandbox_module.addresses_free(Sandbox(name="two", link4="10.200.0.4/30"))
    sandbox_module.addresses_free(Sandbox(name="two", link4="10.200.0.4/30",
                                          link6="fd00:6a72:6464:1::/64"))
    sandbox_module.addresses_free(Sandbox(name="two", host_netns="elsewhere"))


def test_the_agent_never_runs_as_root_nor_keeps_a_capability() -> None:
    with pytest.raises(SandboxError, match="must not run as root"):
        exec_argv(Sandbox(), ["sh"], "root", proxy_env=True)
    argv = exec_argv(Sandbox(), ["curl", "x"], "nobody", proxy_env=False)
    assert argv[:4] == ["ip", "netns", "exec", "agent"]
    assert {"--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--clear-groups",
            "--pid", "--mount-proc", "--kill-child", "--pdeathsig=KILL"} <= set(argv)
    assert "-i" in argv and not any(a.startswith("HTTPS_PROXY=") for a in argv)
    assert argv[-2:] == ["curl", "x"]


@pytest.mark.parametrize("shell", ["sh", "bash"])
def test_the_namespaces_first_shell_waits_for_the_agent_whatever_sh_is(shell: str) -> None:
    """The agent runs as a child of `_HIDE_RUN`'s shell, which stays the namespace's first
    process (attack pass 18); bash, `/bin/sh` on Fedora and Arch, execs a `-c` string's last
    command instead of forking it (review): the agent must not be that command. (This host's
    `sh`, dash on Debian, and bash, which the scripts run under.)"""
    waiting = sandbox_module._HIDE_RUN.replace("mount -t tmpfs", "true")  # (no mount here)
    ran = subprocess.Popen([shell, "-c", waiting, "sh", "sh", "-c", "echo $PPID; exit 7"],
                           stdout=subprocess.PIPE, text=True)
    agent_parent, _ = ran.communicate(timeout=10)
    assert agent_parent.strip() == str(ran.pid) and ran.returncode == 7, agent_parent


def test_what_comes_in_from_the_link_is_routed_nowhere_before_the_link_exists() -> None:
    """Attack pass (2026-12-04): with the nftables table gone (`nft flush ruleset`), the
    agent's packets were routed on by a host that forwards. A rule that routes nothing comes
    first for the link, both families, from before the link is made."""
    commands = Sandbox(name="ci", host_netns="gns").up_commands()
    made = commands.index(["ip", "-n", "gns", "link", "add", "ci-gd", "type", "veth", "peer",
                           "name", "eth0", "netns", "ci"])
    for family in ([], ["-6"]):
        route = ["ip", "-n", "gns", *family, "route", "replace", "prohibit", "default",
                 "table", str(BLOCKED_TABLE)]
        rule = ["ip", "-n", "gns", *family, "rule", "add", "iif", "ci-gd", "lookup",
                str(BLOCKED_TABLE), "priority", "100"]
        assert commands.index(route) < commands.index(rule) < made


def recorded_down(monkeypatch: pytest.MonkeyPatch, failing: set[str], state: Path | None = None,
                  processes: list[list[int]] | None = None, rules_left: bool = False
                  ) -> tuple[list[list[str]], BaseException | None]:
    """`down` of a sandbox whose commands all succeed but those naming a word in `failing`:
    every command it ran, in order (and `kill PID` for each process it killed), and what it
    raised (`state`: where sandboxes and their namespaces are, none by default; `processes`:
    what each `ip netns pids` finds in turn, then none; `rules_left`: another sandbox's rules
    still look the blocked table up)."""
    ran: list[list[str]] = []
    found = list(processes or [])

    def fake(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        ran.append(argv)
        code = 1 if failing & set(argv) else 0
        listed = "".join(f"{pid}\n" for pid in found.pop(0)) if "pids" in argv and found \
            else f"100:\tfrom all iif other-gd lookup {BLOCKED_TABLE}\n" if "show" in argv \
            and rules_left else ""
        return subprocess.CompletedProcess(argv, code, listed, "busy" if code else "")

    monkeypatch.setattr(sandbox_module, "_one_at_a_time", contextlib.nullcontext)

    monkeypatch.setattr(sandbox_module, "_kill_in",
                        lambda namespace, pid: ran.append(["kill", str(pid)]))

    monkeypatch.setattr(sandbox_module, "_try", fake)
    monkeypatch.setattr(sandbox_module, "_require_root", lambda: None)
    monkeypatch.setattr(sandbox_module, "NETNS_ETC", (state or Path("/nonexistent")) / "etc")
    monkeypatch.setattr(sandbox_module, "STATE_DIR", (state or Path("/nonexistent")) / "state")
    monkeypatch.setattr(sandbox_module, "NETNS_DIR", (state or Path("/nonexistent")) / "netns")
    try:
        down(Sandbox(name="ci"))
    except SandboxError as exc:
        return ran, exc
    return ran, None


def test_down_removes_the_link_first_and_the_rules_last(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Attack pass (2026-12-04): `down` deleted the table first, and the agent's link, still
    up for a moment, was routed: 2,631 datagrams of a flooding agent reached the outside."""
    ran, raised = recorded_down(monkeypatch, set())
    assert raised is None
    assert ran[0] == ["ip", "link", "del", "ci-gd"]  # (no namespace: no process to kill)
    assert ran[-1] == ["nft", "delete", "table", "inet", "guardd_ci"]
    assert ["ip", "-6", "rule", "del", "iif", "ci-gd", "lookup", str(BLOCKED_TABLE),
            "priority", "100"] in ran


def test_the_last_sandbox_down_leaves_no_route_nor_directory_behind(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Its `prohibit` routes go with the last sandbox of its host namespace (left behind, they
    were the table of no rule), as the kernel says: no rule looks the table up any more, not
    even one of a sandbox still coming up, which has no state file yet (review). And the
    state directory when empty."""
    routes = [["ip", *family, "route", "del", "prohibit", "default", "table", str(BLOCKED_TABLE)]
              for family in ([], ["-6"])]
    for path in ("state", "etc/ci"):
        (tmp_path / path).mkdir(parents=True)
    (tmp_path / "state" / "ci.json").write_text("{}")
    ran, raised = recorded_down(monkeypatch, set(), tmp_path, rules_left=True)
    assert raised is None and not any(route in ran for route in routes)  # (the other's)
    assert not (tmp_path / "etc" / "ci").exists() and not (tmp_path / "state").exists()
    ran, raised = recorded_down(monkeypatch, set(), tmp_path)
    assert raised is None and all(route in ran for route in routes)
    assert ran.index(["ip", "rule", "del", "iif", "ci-gd", "lookup", str(BLOCKED_TABLE),
                      "priority", "100"]) < ran.index(routes[0])
    assert ran[-1] == ["nft", "delete", "table", "inet", "guardd_ci"]


def test_up_and_down_go_one_at_a_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each holds the lock while it works (review: a `down` beside an `up` under way)."""
    lock = tmp_path / "run" / "sandbox.lock"
    monkeypatch.setattr(sandbox_module, "LOCK", lock)
    monkeypatch.setattr(sandbox_module, "_require_root", lambda: None)
    held: list[str] = []

    def working(step: str) -> Callable[[Sandbox], None]:
        def work(sandbox: Sandbox) -> None:
            handle = os.open(lock, os.O_RDWR)
            try:
                with pytest.raises(BlockingIOError):
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held.append(step)
            finally:
                os.close(handle)
        return work

    monkeypatch.setattr(sandbox_module, "_up", working("up"))
    monkeypatch.setattr(sandbox_module, "_down", working("down"))
    sandbox_module.up(Sandbox(name="ci"))
    sandbox_module.down(Sandbox(name="ci"))
    assert held == ["up", "down"]


def test_a_state_file_that_cannot_be_read_is_an_error_that_says_what_to_do(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sandbox_module, "STATE_DIR", tmp_path)
    monkeypatch.setattr(sandbox_module, "NETNS_DIR", tmp_path)
    (tmp_path / "half.json").write_text('{"name": "ha')
    with pytest.raises(SandboxError, match=r"half\.json .*remove it if no sandbox half is up"):
        sandbox_module.addresses_free(Sandbox(name="two"))


def test_down_kills_the_agents_processes_before_its_link_goes(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """Attack pass 17: `down` took the link away under a running agent, which lived on in its
    namespace; its connections to guardd, never closed, held the client's slots, and the
    agent of the next sandbox on those addresses was refused. Killed while the link is there,
    the agent's sockets close towards guardd; those it forked meanwhile are killed too."""
    (tmp_path / "netns").mkdir()
    (tmp_path / "netns" / "ci").touch()
    ran, raised = recorded_down(monkeypatch, set(), tmp_path, processes=[[41, 42], [43], []])
    assert raised is None
    link = ran.index(["ip", "link", "del", "ci-gd"])
    assert [argv for argv in ran[:link] if argv[0] == "kill"] == [
        ["kill", "41"], ["kill", "42"], ["kill", "43"]]
    assert ran[link - 3:link] == [["ip", "netns", "pids", "ci"],  # (none left, then their
                                  ["ip", "netns", "exec", "ci", "ss", "-K", "-t", "-a"],
                                  ["ip", "netns", "exec", "ci", "ss", "-H", "-t", "-a"]]
    # sockets reset: attack pass 19, a FIN queued behind data guardd did not read kept the
    # connection in guardd past the link)


def test_down_kills_a_process_only_in_the_agents_namespace() -> None:
    """By pidfd, its namespace checked: a listed number that another process has since taken
    kills no one (review)."""
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        sandbox_module._kill_in(os.stat("/proc/self/ns/user"), sleeper.pid)  # (another one)
        time.sleep(0.1)
        assert sleeper.poll() is None
        sandbox_module._kill_in(os.stat("/proc/self/ns/net"), sleeper.pid)
        assert sleeper.wait(5) == -signal.SIGKILL
        sandbox_module._kill_in(os.stat("/proc/self/ns/net"), sleeper.pid)  # (gone: nothing)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_link_that_cannot_be_removed_keeps_its_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    ran, raised = recorded_down(monkeypatch, {"del"})  # (and `link show` finds it there)
    assert isinstance(raised, SandboxError) and "left in place" in str(raised)
    assert not any("nft" in argv or "rule" in argv for argv in ran), ran


def test_root_steps_find_their_tools_in_the_system_path_only(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A directory the agent can write, early in the caller's PATH, must not hand it root
    (attack pass, in theory: `exec` runs `mount` as root)."""
    planted = tmp_path / "ip"
    planted.write_text("#!/bin/sh\necho planted\n")
    planted.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert shutil.which("ip") == str(planted)
    result = sandbox_module._try(["ip", "-V"])
    assert "planted" not in result.stdout and "iproute2" in result.stdout, result


def test_exec_runs_its_root_steps_with_the_system_path_and_the_agent_with_its_callers(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Review: only `_try` was shown to use `SYSTEM_PATH`; `exec`'s `mount` and `setpriv` run
    as root too."""
    executed: list[tuple[list[str], dict[str, str]]] = []

    class Ran:
        def __init__(self, argv: list[str], env: dict[str, str]) -> None:
            executed.append((argv, env))

        def wait(self) -> int:
            return 3

    monkeypatch.setattr(sandbox_module, "_require_root", lambda: None)
    monkeypatch.setattr(sandbox_module, "load", lambda name: Sandbox(name=name))
    monkeypatch.setattr(sandbox_module.subprocess, "Popen", Ran)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert sandbox_module.main(argparse.Namespace(action="exec", name="ci", command=["--", "true"],
                                                  user="nobody", no_proxy_env=True)) == 3
    ((argv, env),) = executed
    assert argv[:4] == ["setpriv", "--pdeathsig=KILL", "--", "ip"]
    assert env["PATH"] == sandbox_module.SYSTEM_PATH
    assert f"PATH={tmp_path}:/usr/bin:/bin" in argv  # (the agent's own, after `env -i`)
