"""`guardd audit replay` and `guardd audit learn` on a trail a real daemon wrote: the agent runs
under a policy in report mode (one rule enforced), does its work, and the operator learns a
policy from what went through, checks it, and replays the trail against it and a stricter one."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.harness import GUARDD, ROOT, Destination, Guardd, Upstream, dig, require, run

REPORTING = """\
version: "1.0"
mode: report
rules:
  - {id: tunnels, action: "*", domain: "*.ngrok.io", mode: enforce, effect: deny}
  - {id: api, action: "*", domain: api.test, ip: 127.0.0.0/8, effect: allow}
"""
ZONES = {"api.test": ["A 127.0.0.1"], "cdn.other.test": ["A 93.184.216.34"],
         "www.other.test": ["A 93.184.216.35"]}


def guardd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GUARDD, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trail of an agent's session under REPORTING."""
    directory = tmp_path_factory.mktemp("replay")
    upstream = Upstream(directory, ZONES)
    web = Destination(directory, "web")
    policy = directory / "reporting.yaml"
    policy.write_text(REPORTING)
    daemon = Guardd.launch(directory, "--policy", str(policy), "--dns", "127.0.0.1:0",
                           "--socks", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                           "--upstream", upstream.address)
    try:
        for name in ("api.test", "cdn.other.test", "www.other.test"):
            assert dig(daemon.dns[0], name).status == "NOERROR"  # reported, not refused
        assert dig(daemon.dns[0], "x.ngrok.io").status == "NXDOMAIN"  # enforced
        host, port = daemon.socks[0]
        for path in ("/a", "/b"):
            fetched = run([require("curl"), "-sS", "--max-time", "10", "--socks5-hostname",
                           f"{host}:{port}", f"http://api.test:{web.port}{path}"])
            assert fetched.returncode == 0, fetched.stderr
        samples = daemon.scrape()
        assert samples['guardd_unenforced_denials_total{listener="dns",rule="default-deny"}'] \
            >= 2
    finally:
        daemon.stop()
        web.stop()
        upstream.stop()
    records = daemon.audit_records("enforced=false")
    assert {r["domain"] for r in records} >= {"cdn.other.test", "www.other.test"}
    return directory / "audit"


def test_learn_proposes_a_policy_guardd_check_accepts(trail: Path, tmp_path: Path) -> None:
    learned = guardd("audit", "learn", "--audit", str(trail))
    assert learned.returncode == 0, learned.stderr
    text = learned.stdout
    assert "id: learned-api-test" in text and "id: learned-other-test" in text
    assert "ngrok" not in text  # what was refused is never proposed
    assert 'ip: ["127.0.0.1"]' in text  # loopback opens only when the rule names it
    path = tmp_path / "learned.yaml"
    path.write_text(text)
    checked = guardd("check", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "tests pass" in checked.stdout
    # the learned policy lets through everything that went through, and nothing more
    replayed = guardd("audit", "replay", "--audit", str(trail), "--policy", str(path))
    assert replayed.returncode == 0, replayed.stderr
    assert ": 0 would change" in replayed.stdout.splitlines()[0], replayed.stdout


def test_replay_counts_what_an_enforcing_policy_would_change(trail: Path, tmp_path: Path
                                                             ) -> None:
    enforcing = tmp_path / "enforcing.yaml"
    enforcing.write_text(REPORTING.replace("mode: report\n", ""))
    replayed = guardd("audit", "replay", "--audit", str(trail), "--policy", str(enforcing))
    assert replayed.returncode == 0, replayed.stderr
    lines = replayed.stdout.splitlines()
    assert "allow -> deny: " in replayed.stdout, replayed.stdout
    change = next(line for line in lines if "rule default-deny -> rule default-deny" in line)
    assert int(change.split()[0]) >= 2 and "other.test" in change
    assert "deny -> allow" not in replayed.stdout
