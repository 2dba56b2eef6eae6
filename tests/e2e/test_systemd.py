"""guardd under systemd: the sd_notify protocol as a `Type=notify` unit sees it, a bind failure
that names its listener, and the shipped unit checked by `systemd-analyze` (when installed)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardd import systemd
from guardd.config import load_config_file
from guardd.errors import BindError
from tests.e2e.harness import GUARDD, LOAD_POLICY, ROOT, Guardd, dig, free_port, run

UNIT = ROOT / "systemd" / "guardd.service"


class NotifySocket:
    """What systemd listens on: a datagram socket, each datagram a list of states."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def next(self, want: str, timeout: float = 10.0) -> list[str]:
        """States of the datagrams received until one has `want` (that one last)."""
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                states = self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                break
            seen += states
            if want in states:
                return seen
        pytest.fail(f"no {want} within {timeout}s; got {seen}")


@pytest.fixture
def notified(tmp_path: Path) -> Iterator[tuple[Guardd, NotifySocket, Path]]:
    notify = NotifySocket(tmp_path / "notify")
    policy = tmp_path / "policy.yaml"
    policy.write_text(LOAD_POLICY)
    daemon = Guardd(tmp_path, [*GUARDD, "run", "--audit", str(tmp_path / "audit"), "--policy",
                               str(policy), "--dns", "127.0.0.1:0", "--socks", "127.0.0.1:0",
                               "--metrics", "127.0.0.1:0", "--upstream", "127.0.0.1:9"],
                    tmp_path / "audit",
                    env={**os.environ, "NOTIFY_SOCKET": str(notify.path),
                         "WATCHDOG_USEC": "200000"})
    daemon.start()
    try:
        yield daemon, notify, policy
    finally:
        daemon.stop()
        notify.sock.close()


def test_ready_reloading_watchdog_and_stopping_are_told_to_systemd(
        notified: tuple[Guardd, NotifySocket, Path]) -> None:
    daemon, notify, policy = notified
    assert "READY=1" in notify.next("READY=1")
    assert dig(daemon.dns[0], "x.ngrok.io").status == "NXDOMAIN"  # bound before READY=1
    pings = [state for state in notify.next("WATCHDOG=1") if state == "WATCHDOG=1"]
    time.sleep(0.5)
    pings += [s for s in notify.next("WATCHDOG=1") if s == "WATCHDOG=1"]
    assert len(pings) >= 2  # every 0.1 s (half of WATCHDOG_USEC)
    daemon.reload()
    states = notify.next("RELOADING=1")  # (one datagram: RELOADING=1 and the time)
    assert any(re.fullmatch(r"MONOTONIC_USEC=\d+", state) for state in states), states
    notify.next("READY=1")
    policy.write_text("version: 1.0\nrules: [oops\n")
    daemon.reload()
    notify.next("RELOADING=1")
    refused = notify.next("READY=1")
    assert any(s.startswith("STATUS=reload refused") for s in refused), refused
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in notify.next("STOPPING=1")


def test_without_notify_socket_nothing_is_sent_and_guardd_runs(tmp_path: Path) -> None:
    os.environ.pop("NOTIFY_SOCKET", None)
    assert systemd.notify("READY=1") is False and systemd.watchdog_interval() is None


def test_a_bind_failure_names_the_listener_and_address(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        result = subprocess.run([*GUARDD, "run", "--audit", str(tmp_path / "audit"),
                                 "--policy", str(ROOT / "policies" / "default.yaml"), "--dns",
                                 "127.0.0.1:0", "--socks", f"127.0.0.1:{port}", "--metrics",
                                 "off", "--upstream", "127.0.0.1:9"], cwd=ROOT,
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"error: socks 127.0.0.1:{port}: address already in use — another process serves " \
           "it" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_bind_failure_on_port_53_asks_about_systemd_resolved() -> None:
    message = str(BindError("dns", "0.0.0.0:53", 53, OSError(98, "Address already in use")))
    assert message == "dns 0.0.0.0:53: address already in use — is systemd-resolved's stub " \
                      "listening? (ss -lnp 'sport = :53' says who is)"


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: the systemd package)")
    return run([tool, *args], timeout=60)


def test_the_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` checks that ExecStart's program exists: the unit is verified
    as installed, /opt/guardd/bin standing for this checkout's virtual environment."""
    unit = tmp_path / "guardd.service"
    unit.write_text(UNIT.read_text().replace("/opt/guardd/bin/", f"{Path(sys.prefix)}/bin/"))
    result = _analyze("verify", str(unit))
    # (what it says of the host's other units, which it reads too, is not this unit's)
    ours = [line for line in result.stderr.splitlines()
            if line.strip() and not line.startswith(("/lib/systemd/", "/usr/lib/systemd/",
                                                      "/etc/systemd/"))]
    assert result.returncode == 0 and ours == [], result.stderr


def test_the_unit_scores_2_or_lower_in_systemd_analyze_security() -> None:
    result = _analyze("security", "--offline=true", str(UNIT))
    found = re.search(r"Overall exposure level for guardd.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found[1]) <= 2.0, result.stdout


def test_the_install_procedure_puts_what_the_unit_runs_where_it_runs_it(tmp_path: Path) -> None:
    """scripts/install under a root of its own: the venv under /opt/guardd that ExecStart
    names (Debian 12's Python refuses a system-wide pip install, PEP 668), the config and
    policy it reads, both valid."""
    root = tmp_path / "root"
    result = run([str(ROOT / "scripts" / "install"), "--root", str(root)], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    unit = (root / "etc/systemd/system/guardd.service").read_text()
    programs = set(re.findall(r"^Exec\w+=(\S+)", unit, re.M)) - {"/bin/kill"}
    assert programs == {"/opt/guardd/bin/guardd"}
    guardd = root / "opt/guardd/bin/guardd"
    config = re.search(r"--config (\S+)", unit)[1]  # type: ignore[index]
    for argv in (["check", str(root / "etc/guardd/policy.yaml")], ["run", "--help"]):
        checked = run([str(guardd), *argv])
        assert checked.returncode == 0, checked.stderr
    assert load_config_file(root / config.lstrip("/")).policy == Path("/etc/guardd/policy.yaml")
    # It may hold proxy passwords: not for every user of the host (attack pass: an agent read
    # it); the unit's group reads it.
    assert (root / config.lstrip("/")).stat().st_mode & 0o777 == 0o640
    assert "\nSupplementaryGroups=guardd\n" in unit
