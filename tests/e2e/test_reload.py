"""Reloads under load, in-flight connections a new policy reverses, and `--watch`.

* 20 reloads alternating a good and a broken policy while DNS queries and SOCKS tunnels run:
  nothing both policies allow fails, each broken policy is refused (and counted);
* a reload that denies what an open tunnel goes to closes it, recorded; the others go on;
* `--watch` follows the policy file (an edit, a ConfigMap's symlink swap) and its domain lists.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (GUARDD, ROOT, Destination, Guardd, LoadThreads, Upstream, dig,
                               dns_query)
from tests.e2e.rawsocks import socks_request

ZONES = {"api.test": ["A 127.0.0.1"], "other.test": ["A 127.0.0.1"]}
GOOD = """\
version: "1.0"
# {n}
rules:
  - {{id: tunnels, action: "*", domain: "*.ngrok.io", effect: deny}}
  - {{id: api, action: "*", domain: [api.test, other.test], ip: 127.0.0.0/8, effect: allow}}
"""
BROKEN = "version: '1.0'\nrules:\n  - {id: oops, action: network.request, effect: maybe}\n"
WITHOUT_OTHER = GOOD.replace("[api.test, other.test]", "api.test").format(n="other.test out")
RELOADS = 'guardd_policy_reloads_total{result="%s"}'


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Guardd, Destination, Upstream, Path]]:
    upstream = Upstream(tmp_path, ZONES)
    echo = Destination(tmp_path, "echo")
    policy = tmp_path / "policy.yaml"
    policy.write_text(GOOD.format(n=0))
    daemon = Guardd.launch(tmp_path, "--policy", str(policy), "--dns", "127.0.0.1:0",
                           "--socks", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--upstream",
                           upstream.address, "--watch")
    try:
        yield daemon, echo, upstream, policy
    finally:
        daemon.stop()
        echo.stop()
        upstream.stop()


def _wait_for(daemon: Guardd, key: str, count: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while daemon.scrape().get(key, 0) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{key} did not reach {count} within {timeout}s: "
                        f"{daemon.scrape().get(key, 0)}")
        time.sleep(0.05)


#: Bytes the sniffer reads as neither TLS nor HTTP at once (no wait for more: a first word
#: with a control byte inside it; control bytes before one are skipped, as Netty skips them).
PING = b"p\x00ing"


def _ping(sock: socket.socket) -> None:
    sock.sendall(PING)
    got = b""
    while len(got) < len(PING):
        chunk = sock.recv(len(PING) - len(got))
        if not chunk:
            raise ConnectionError("the tunnel closed")
        got += chunk
    assert got == PING


class Load(LoadThreads):
    """DNS queries and SOCKS tunnels (kept ones pinging, new ones opening) in threads; every
    failure is kept."""

    def __init__(self, daemon: Guardd, echo: Destination) -> None:
        self.daemon, self.echo = daemon, echo
        self.failures: list[str] = []
        self.done = {"dns": 0, "kept": 0, "new": 0}
        super().__init__(self._dns, self._dns, self._kept, self._kept, self._new)

    def _dns(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(3)
            qid = 0
            while not self.stop.is_set():
                qid = (qid + 1) % 65536
                sock.sendto(dns_query("api.test", qid), self.daemon.dns[0])
                try:
                    answer = sock.recv(4096)
                except TimeoutError:
                    self.failures.append("dns: no answer in 3s")
                    continue
                if answer[3] & 0x0F != 0 or answer[6:8] == b"\0\0":
                    self.failures.append(f"dns: rcode {answer[3] & 0x0F}, no answer")
                self.done["dns"] += 1

    def _kept(self) -> None:
        try:
            reply, sock = socks_request(self.daemon.socks[0], "api.test", self.echo.port)
            with sock:
                assert reply == 0, reply
                while not self.stop.is_set():
                    _ping(sock)
                    self.done["kept"] += 1
                    time.sleep(0.02)
        except (OSError, AssertionError) as exc:
            self.failures.append(f"kept tunnel: {exc!r}")

    def _new(self) -> None:
        while not self.stop.is_set():
            try:
                reply, sock = socks_request(self.daemon.socks[0], "api.test", self.echo.port)
                with sock:
                    if reply != 0:
                        self.failures.append(f"new tunnel: reply {reply}")
                        continue
                    _ping(sock)
                    self.done["new"] += 1
            except OSError as exc:
                self.failures.append(f"new tunnel: {exc!r}")


def test_twenty_reloads_alternating_good_and_broken_policies_under_load(
        world: tuple[Guardd, Destination, Upstream, Path]) -> None:
    daemon, echo, _, policy = world
    with Load(daemon, echo) as load:
        time.sleep(0.5)
        for n in range(1, 21):
            policy.write_text(GOOD.format(n=n) if n % 2 else BROKEN)
            daemon.reload()
            _wait_for(daemon, RELOADS % ("ok" if n % 2 else "error"), (n + 1) // 2)
            time.sleep(0.1)
        time.sleep(0.5)
    assert load.failures == []
    assert load.done["dns"] > 100 and load.done["kept"] > 100 and load.done["new"] > 20, \
        load.done
    samples = daemon.scrape()
    # (the watcher may have reloaded a state SIGHUP had loaded already: at least 10 each)
    assert samples[RELOADS % "ok"] >= 10 and samples[RELOADS % "error"] >= 10, samples
    assert daemon.log_text().count("policy reload refused, keeping the old policy") >= 10


def test_a_reload_closes_the_tunnels_it_reverses_and_records_why(
        world: tuple[Guardd, Destination, Upstream, Path]) -> None:
    daemon, echo, _, policy = world
    kept_reply, kept = socks_request(daemon.socks[0], "api.test", echo.port)
    reversed_reply, reversed_ = socks_request(daemon.socks[0], "other.test", echo.port)
    with kept, reversed_:
        assert (kept_reply, reversed_reply) == (0, 0)
        _ping(kept)
        _ping(reversed_)
        policy.write_text(WITHOUT_OTHER)
        daemon.reload()
        _wait_for(daemon, RELOADS % "ok", 1)
        reversed_.settimeout(5)
        assert reversed_.recv(10) == b""  # closed by guardd
        _ping(kept)  # goes on
    records = daemon.audit_records("domain=other.test", "effect=deny")
    assert [r["outcome"] for r in records] == ["closed: the reloaded policy would not open it"]
    assert records[0]["matchedRule"] == "default-deny" and records[0]["port"] == echo.port


def test_every_policy_load_and_reload_is_in_the_trail_with_its_files_hashes(
        world: tuple[Guardd, Destination, Upstream, Path]) -> None:
    """Attack pass 17: no record said which policy was in force, nor when it changed: whoever
    could write the policy could open it, let traffic through, close it again, and the trail
    (rule ids alone, which may mean anything) still verified. Each load, reload and refused
    reload is a record of the trail's own, in the chain, with every file's SHA-256."""
    daemon, _, _, policy = world
    policy.write_text(BROKEN)
    daemon.reload()
    _wait_for(daemon, RELOADS % "error", 1)
    policy.write_text(WITHOUT_OTHER)
    daemon.reload()
    _wait_for(daemon, RELOADS % "ok", 1)
    loads = json.loads(daemon.cli("audit", "export", "--audit", str(daemon.audit_dir), "--all",
                                  "--format", "json", "--filter", "action=audit.policy").stdout)
    assert [record["reason"].split(":")[0] for record in loads] == [
        "loaded at start", "reload refused, the policies in force are kept", "reloaded"]
    assert loads[0]["policies"] == {"default": {str(policy): hashlib.sha256(
        GOOD.format(n=0).encode()).hexdigest()}}
    assert "effect must be allow or deny" in loads[1]["reason"] and "policies" not in loads[1]
    assert loads[2]["policies"] == {"default": {str(policy): hashlib.sha256(
        WITHOUT_OTHER.encode()).hexdigest()}} != loads[0]["policies"]
    assert "chain intact" in daemon.cli("audit", "verify", "--audit", str(daemon.audit_dir)).stdout


def test_watch_follows_an_edit_and_a_configmap_symlink_swap(tmp_path: Path) -> None:
    """The layout a Kubernetes ConfigMap volume has: policy.yaml -> ..data/policy.yaml, and an
    update points ..data at a new directory."""
    upstream = Upstream(tmp_path, ZONES)
    mount = tmp_path / "mount"
    (mount / "v1").mkdir(parents=True)
    (mount / "v1" / "policy.yaml").write_text(GOOD.format(n=1))
    (mount / "..data").symlink_to("v1")
    (mount / "policy.yaml").symlink_to("..data/policy.yaml")
    daemon = Guardd.launch(tmp_path, "--policy", str(mount / "policy.yaml"), "--dns",
                           "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--upstream",
                           upstream.address, "--watch")
    try:
        (mount / "v2").mkdir()
        (mount / "v2" / "policy.yaml").write_text(BROKEN)
        _swap(mount, "v2")
        _wait_for(daemon, RELOADS % "error", 1)
        (mount / "v3").mkdir()
        (mount / "v3" / "policy.yaml").write_text(WITHOUT_OTHER)
        _swap(mount, "v3")
        _wait_for(daemon, RELOADS % "ok", 1)
        assert "policy files changed" in daemon.log_text()
        assert daemon.scrape()[RELOADS % "error"] == 1  # a refused state is not tried again
    finally:
        daemon.stop()
        upstream.stop()


def test_watch_follows_a_domain_list_the_policy_names(tmp_path: Path) -> None:
    upstream = Upstream(tmp_path, ZONES)
    (tmp_path / "allowed.txt").write_text("api.test\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text('version: "1.0"\nrules:\n  - {id: listed, action: "*", domainList: '
                      'allowed.txt, ip: 127.0.0.0/8, effect: allow}\n')
    daemon = Guardd.launch(tmp_path, "--policy", str(policy), "--dns", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0", "--upstream", upstream.address,
                           "--watch")
    try:
        (tmp_path / "allowed.txt").write_text("api.test\nother.test\n")
        _wait_for(daemon, RELOADS % "ok", 1)
    finally:
        daemon.stop()
        upstream.stop()


@pytest.mark.parametrize("listed, tests, refused", [
    (None, "", "cannot read domainList 'later.txt'"),
    ("other.test\n", 'tests:\n  - {target: "api.test", expect: deny}\n',
     "the policy's tests fail"),
], ids=["not-there-yet", "not-synced-yet"])
def test_watch_follows_the_lists_a_refused_policy_names(tmp_path: Path, listed: str | None,
                                                        tests: str, refused: str) -> None:
    """Attack pass 24: a new policy names a list that is not there yet (another ConfigMap the
    kubelet syncs later): the reload is refused, and the list's arrival must reload it; the
    watch followed only the files of the policy in force, and the new deny never applied.
    The same when the list is there, not synced yet, and the new policy's own tests fail on
    it (review)."""
    upstream = Upstream(tmp_path, ZONES)
    policy = tmp_path / "policy.yaml"
    policy.write_text(GOOD.format(n=1))
    if listed is not None:
        (tmp_path / "later.txt").write_text(listed)
    daemon = Guardd.launch(tmp_path, "--policy", str(policy), "--dns", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0", "--upstream", upstream.address,
                           "--watch")
    try:
        policy.write_text(GOOD.format(n=2).replace(
            "rules:\n", "rules:\n  - {id: new-deny, action: \"*\", domainList: later.txt, "
            "effect: deny}\n", 1) + tests)
        _wait_for(daemon, RELOADS % "error", 1)
        assert refused in daemon.log_text()
        (tmp_path / "later.txt").write_text("other.test\napi.test\n")
        _wait_for(daemon, RELOADS % "ok", 1)
        assert dig(daemon.dns[0], "api.test").status == "NXDOMAIN"
    finally:
        daemon.stop()
        upstream.stop()


def test_a_name_a_reload_denies_while_it_is_asked_upstream_goes_out_no_more(tmp_path: Path
                                                                            ) -> None:
    """Attack pass 24: the upstream is silent, the reload denies the name after the first
    attempt went; the next attempt went all the same, and the client got SERVFAIL under an
    allow by a rule that was gone. Now nothing more goes, and the answer is the denial's."""
    upstream = Upstream(tmp_path, ZONES, {"slow.test": "silent"})
    policy = tmp_path / "policy.yaml"
    policy.write_text(GOOD.format(n=1).replace("[api.test, other.test]",
                                               "[api.test, other.test, slow.test]"))
    (tmp_path / "guardd.yaml").write_text(json.dumps(
        {"upstreamTimeout": {"attempt": 1, "total": 4}}))
    daemon = Guardd.launch(tmp_path, "--config", str(tmp_path / "guardd.yaml"), "--policy",
                           str(policy), "--dns", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                           "--upstream", upstream.address)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as asking:
            answer = asking.submit(dig, daemon.dns[0], "slow.test")
            while "slow.test" not in upstream.queries():
                time.sleep(0.02)
            policy.write_text(GOOD.format(n=2).replace(
                "rules:\n", "rules:\n  - {id: slow-shut, action: \"*\", domain: slow.test, "
                "effect: deny}\n", 1))
            daemon.reload()
            _wait_for(daemon, RELOADS % "ok", 1)
            assert answer.result().status == "NXDOMAIN"
        time.sleep(1.2)  # (past when the next attempt would have gone)
        assert upstream.queries().count("slow.test") == 1
        record = daemon.audit_records("action=dns.query")[-1]
        assert (record["domain"], record["effect"], record["matchedRule"]) == (
            "slow.test", "deny", "slow-shut")
    finally:
        daemon.stop()
        upstream.stop()


def _swap(mount: Path, version: str) -> None:
    """Point ..data at `version` atomically, as the kubelet does (a new link renamed over)."""
    (mount / "..data_tmp").symlink_to(version)
    os.rename(mount / "..data_tmp", mount / "..data")


def test_a_policy_whose_tests_fail_is_refused_at_start_and_at_a_reload(
        world: tuple[Guardd, Destination, Upstream, Path], tmp_path: Path) -> None:
    daemon, _, _, policy = world
    failing = GOOD.format(n="tests") + 'tests:\n  - {target: "x.ngrok.io", expect: allow}\n'
    policy.write_text(failing)
    daemon.reload()
    _wait_for(daemon, RELOADS % "error", 1)
    assert "the policy's tests fail: " in daemon.log_text()
    assert "test 'x.ngrok.io': expected allow, got deny by rule tunnels" in daemon.log_text()
    started = subprocess.run([*GUARDD, "run", "--policy", str(policy), "--dns", "127.0.0.1:0",
                              "--metrics", "off", "--audit", str(tmp_path / "audit"),
                              "--upstream", "127.0.0.1:9"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    assert started.returncode == 1
    assert "error: the policy's tests fail: " in started.stderr and "Traceback" not in \
        started.stderr


def test_a_config_that_splits_one_client_between_principals_is_refused_before_the_trail(
        tmp_path: Path) -> None:
    """Review: such a config (attack pass 35) was refused only after the trail had recorded
    its policies as "loaded at start", for a guardd that never served."""
    (tmp_path / "default.yaml").write_text(GOOD.format(n="default"))
    config = tmp_path / "guardd.yaml"
    config.write_text("policy: default.yaml\nprincipals:\n  ci:\n    policy: default.yaml\n"
                      "    clients: [10.1.2.0/24]\nsameClient: [[10.1.2.3, \"fd00:2::3\"]]\n")
    started = subprocess.run([*GUARDD, "run", "--config", str(config), "--dns", "127.0.0.1:0",
                              "--metrics", "off", "--audit", str(tmp_path / "audit"),
                              "--upstream", "127.0.0.1:9"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30)
    assert started.returncode == 1
    assert "error: sameClient: 10.1.2.3, fd00:2::3 are one client" in started.stderr
    assert "Traceback" not in started.stderr
    assert not (tmp_path / "audit").exists()


def test_the_rules_metric_stays_with_the_policy_in_force_when_a_reload_is_refused(
        tmp_path: Path) -> None:
    """Re-attack of attack pass 49: the rules metric was set when a policy had been read, so a
    reload refused after its read (here the config's principals, the last step that may
    fail) showed the refused policy's rule count beside the old policy in force."""
    (tmp_path / "default.yaml").write_text(GOOD.format(n="default"))
    config = tmp_path / "guardd.yaml"
    config.write_text("policy: default.yaml\n")
    daemon = Guardd.launch(tmp_path, "--config", str(config), "--dns", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0", "--upstream", "127.0.0.1:9")
    try:
        assert daemon.scrape()["guardd_policy_rules"] == 2
        (tmp_path / "default.yaml").write_text(GOOD.format(n="more") + "".join(
            f"  - {{id: more{n}, action: '*', domain: m{n}.test, effect: deny}}\n"
            for n in range(5)))
        config.write_text("policy: default.yaml\nprincipals:\n  ci:\n    policy: default.yaml"
                          "\n    clients: [127.0.0.0/9]\n")
        daemon.reload()
        _wait_for(daemon, RELOADS % "error", 1)
        assert "127.0.0.0/9 holds part of loopback" in daemon.log_text()
        assert daemon.scrape()["guardd_policy_rules"] == 2
        config.write_text("policy: default.yaml\n")
        daemon.reload()
        _wait_for(daemon, RELOADS % "ok", 1)
        assert daemon.scrape()["guardd_policy_rules"] == 7
    finally:
        daemon.stop()


def big_policy(policy: Path, rules: int) -> None:
    """Write a policy of `rules` rules naming one list of 2,000 names (each about 1.3 ms to
    read) beside GOOD's."""
    names = policy.parent / "names.txt"
    names.write_text("".join(f"n{n}.blocked.test\n" for n in range(2_000)))
    policy.write_text(GOOD.format(n="big") + "".join(
        f"  - {{id: list{n}, action: '*', domainList: names.txt, effect: deny}}\n"
        for n in range(rules)))


def test_queries_are_answered_while_a_big_policy_is_read_again(
        world: tuple[Guardd, Destination, Upstream, Path]) -> None:
    """Attack pass 49: a reload read the policy on the loop, so a big one (here 800 rules
    naming one list of 2,000 names, about a second to read) stalled every listener until it
    was in force. It is read off the loop: a query asked after the SIGHUP is answered before
    the reload ends."""
    daemon, _, _, policy = world
    big_policy(policy, 800)
    daemon.reload()
    time.sleep(0.05)  # (the signal delivered, the reading begun)
    assert dig(daemon.dns[0], "api.test", "A").status == "NOERROR"
    assert daemon.scrape().get(RELOADS % "ok", 0) == 0, "the reload ended before the answer"
    _wait_for(daemon, RELOADS % "ok", 1, timeout=60)


def test_a_stop_during_a_reload_ends_the_process_and_puts_nothing_in_force(
        world: tuple[Guardd, Destination, Upstream, Path]) -> None:
    """Re-attack of attack pass 49: a SIGTERM while a big policy was read did not end the
    process (the exit waited for the reading thread, and the drain for the reload), and a
    reload asked meanwhile was put in force after the stop began. A stop drops the reload."""
    daemon, _, _, policy = world
    big_policy(policy, 2_500)
    daemon.reload()
    time.sleep(0.3)
    assert daemon.process is not None
    stopping = time.monotonic()
    daemon.reload()  # (another, asked meanwhile)
    assert daemon.stop() == 0
    assert time.monotonic() - stopping < 5, "the stop waited for the reload"
    assert "policy reloaded" not in daemon.log_text()
