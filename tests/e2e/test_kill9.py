"""`kill -9` under mixed load (issue 10): five times, the daemon is killed while DNS queries and
SOCKS connects stream in, and restarted on the same trail. Every answer a client got must have
its record in the trail afterwards (records reach the disk before answers leave), and the trail
must verify (a torn last line is a warning, not a break).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import time
from pathlib import Path

from tests.e2e.harness import Destination, Guardd, LoadThreads, Upstream, dns_query, free_port

POLICY = """\
version: "1.0"
rules:
  - {id: tunnels, action: "*", domain: "*.ngrok.io", effect: deny}
  - {id: loopback, action: network.request, ip: 127.0.0.0/8, effect: allow}
"""
KILLS = 5


class Load(LoadThreads):
    """Clients that keep asking until stopped, and what they were answered."""

    def __init__(self, dns: tuple[str, int], socks: tuple[str, int], echo: int) -> None:
        self.dns, self.socks, self.echo = dns, socks, echo
        self.answered_names: list[str] = []
        self.opened = 0
        super().__init__(self._ask, self._connect)

    def _ask(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.3)
            while not self.stop.is_set():
                name = f"k{random.getrandbits(48):x}.ngrok.io"
                try:
                    sock.sendto(dns_query(name, 7), self.dns)
                    if sock.recvfrom(4096)[0][3] & 0x0F == 3:  # NXDOMAIN: answered
                        self.answered_names.append(name)
                except OSError:
                    time.sleep(0.01)  # the daemon is down: ask again soon

    def _connect(self) -> None:
        request = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + self.echo.to_bytes(2, "big")
        while not self.stop.is_set():
            try:
                with socket.create_connection(self.socks, timeout=0.5) as sock:
                    sock.sendall(b"\x05\x01\x00")
                    if sock.recv(2) != b"\x05\x00":
                        continue
                    sock.sendall(request)
                    if sock.recv(10)[1:2] == b"\x00":  # SUCCEEDED
                        self.opened += 1
            except OSError:
                time.sleep(0.01)


def test_kill_9_under_load_loses_no_answered_decision(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    upstream = Upstream(tmp_path, {})
    echo = Destination(tmp_path, "echo")
    dns, socks = ("127.0.0.1", free_port()), ("127.0.0.1", free_port())
    args = ("--policy", str(policy), "--upstream", upstream.address,
            "--dns", f"127.0.0.1:{dns[1]}", "--socks", f"127.0.0.1:{socks[1]}",
            "--metrics", "off")  # (not the default port: another guardd may have it)
    try:
        with Load(dns, socks, echo.port) as load:
            for _ in range(KILLS):
                daemon = Guardd.launch(tmp_path, *args)
                time.sleep(random.uniform(0.5, 1.5))
                assert daemon.process is not None
                daemon.process.send_signal(signal.SIGKILL)
                daemon.process.wait(10)
        daemon = Guardd.launch(tmp_path, *args)
        assert daemon.stop() == 0
    finally:
        echo.stop()
        upstream.stop()
    records = json.loads(daemon.cli("audit", "export", "--audit", str(daemon.audit_dir),
                                    "--format", "json").stdout)
    recorded_names = {r.get("domain") for r in records if r.get("action") == "dns.query"}
    opened = sum(1 for r in records if r.get("action") == "network.request"
                 and r.get("effect") == "allow")
    assert load.answered_names and load.opened, "the load never got an answer"
    missing = [name for name in load.answered_names if name not in recorded_names]
    assert missing == [], f"{len(missing)} answered queries have no record"
    assert opened >= load.opened
    verify = daemon.cli("audit", "verify", "--audit", str(daemon.audit_dir), check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"{KILLS} kills: {len(load.answered_names)} DNS answers and {load.opened} connects, "
          "0 without a record")
