"""Processes for the end-to-end tests: the real daemon, its test upstream, and real clients.

Everything binds loopback on ports the kernel picks (port 0); the daemon reports what it bound in
its "guardd ready:" log line, which `Guardd.start` waits for and parses. Each helper can run inside
a network namespace (`netns`), where the test, not the host, decides what is reachable.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import re
import selectors
import socket
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Self

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUARDD = [sys.executable, "-m", "guardd.cli"]
START_TIMEOUT = 20.0
_READY = re.compile(r"guardd ready: dns=(?P<dns>\S+) socks=(?P<socks>\S+) metrics=(?P<metrics>\S+)"
                    r" http=(?P<http>\S+) transparent=(?P<transparent>\S+)")


#: The policy of the load and fault tests: a tunnel's names denied, api.test allowed (answered
#: by the test's upstream), connects to the loopback servers allowed.
LOAD_POLICY = """\
version: "1.0"
rules:
  - {id: tunnels, action: "*", domain: "*.ngrok.io", effect: deny}
  - {id: api, action: "*", domain: api.test, effect: allow}
  - {id: loopback, action: network.request, ip: 127.0.0.0/8, effect: allow}
"""


def require(tool: str) -> str:
    """Path of a client program, or skip: scripts/test installs them when it runs as root."""
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (scripts/test installs it with apt when run as root)")
    return path


def in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def parse_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _first_line(stream: IO[str], what: str) -> str:
    """The first line a child prints, or a failure when it prints nothing in time."""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        if not selector.select(START_TIMEOUT):
            pytest.fail(f"{what} printed nothing within {START_TIMEOUT:.0f}s")
    return stream.readline()


class Child:
    """A helper process that prints the port it bound on its first line and logs to a file.
    Every one started is stopped at the session's end at the latest (`stop_leftovers`): a
    fixture that fails after starting some (a daemon that did not start) leaves none running."""

    def __init__(self, argv: list[str], log: Path, what: str, netns: str | None = None) -> None:
        self.log = log
        self.process = subprocess.Popen(in_netns(netns, [sys.executable, *argv, "--log", str(log)]),
                                        cwd=ROOT, stdout=subprocess.PIPE, text=True)
        _RUNNING.add(self)
        line = _first_line(self.process.stdout, what)  # type: ignore[arg-type]
        if not line.strip().isdigit():
            self.stop()
            pytest.fail(f"{what} did not start: {line!r}")
        self.port = int(line)

    def lines(self) -> list[str]:
        """What it logged so far, one entry a line."""
        return self.log.read_text().splitlines() if self.log.exists() else []

    def stop(self) -> None:
        _RUNNING.discard(self)
        self.process.terminate()
        self.process.wait(10)


#: The helper processes started and not stopped yet.
_RUNNING: set[Child] = set()


def stop_leftovers() -> None:
    """Stop every helper process still running (tests/e2e/conftest.py, at the session's end)."""
    for child in list(_RUNNING):
        child.stop()


class Upstream(Child):
    """`tests.dnsupstream`: the only DNS server guardd may ask in a test."""

    def __init__(self, directory: Path, zones: dict[str, list[str]],
                 behaviours: dict[str, str] | None = None, netns: str | None = None) -> None:
        spec = directory / "upstream-zones.json"
        spec.write_text(json.dumps({"zones": zones, "behaviours": behaviours or {}}))
        super().__init__(["-m", "tests.dnsupstream", "--zone-file", str(spec)],
                         directory / "upstream-queries.log", "the test upstream", netns)
        self.address = f"127.0.0.1:{self.port}"

    def queries(self) -> list[str]:
        """Every name the upstream was asked, in order (lower-case, no trailing dot)."""
        return self.lines()


class Destination(Child):
    """A `tests.e2e.servers` server: `web`, `echo` or `trap` (see there)."""

    def __init__(self, directory: Path, mode: str, host: str = "127.0.0.1", port: int = 0,
                 netns: str | None = None, tls: Path | None = None, curve: str | None = None,
                 tls12: bool = False) -> None:
        name = f"{mode}-{host.replace(':', '_')}-{port}" + ("-tls" if tls else "")
        super().__init__(["-m", "tests.e2e.servers", mode, "--host", host, "--port", str(port),
                          *(["--tls", str(tls)] if tls else []),
                          *(["--curve", curve] if curve else []),
                          *(["--tls12"] if tls12 else [])],
                         directory / f"{name}.log", f"the {mode} server", netns)
        self.host = host


def certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (openssl): (its key and certificate in one PEM for
    a server, the certificate alone for a client to trust)."""
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    run([require("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}", "-keyout", str(key), "-out", str(cert)]
        ).check_returncode()
    both = directory / f"{name}.pem"
    both.write_text(key.read_text() + cert.read_text())
    return both, cert


@dataclass
class Guardd:
    """The daemon in a subprocess, its stderr in `log_path`; `launch()` builds a `guardd run`."""

    directory: Path
    argv: list[str]
    audit_dir: Path
    env: dict[str, str] | None = None
    netns: str | None = None
    process: subprocess.Popen[bytes] | None = None
    dns: list[tuple[str, int]] = field(default_factory=list)
    socks: list[tuple[str, int]] = field(default_factory=list)
    http: list[tuple[str, int]] = field(default_factory=list)
    transparent: list[tuple[str, int]] = field(default_factory=list)
    metrics: tuple[str, int] | None = None

    @classmethod
    def launch(cls, directory: Path, *args: str, netns: str | None = None) -> Guardd:
        """Start `guardd run ARGS` with its audit trail in `directory`/audit."""
        audit = directory / "audit"
        return cls(directory, [*GUARDD, "run", "--audit", str(audit), *args], audit,
                   netns=netns).start()

    @property
    def log_path(self) -> Path:
        return self.directory / "guardd.log"

    def start(self) -> Guardd:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            offset = log.tell()  # a restart appends: only this run's "ready" line counts
            self.process = subprocess.Popen(in_netns(self.netns, self.argv), cwd=ROOT,
                                            stdout=log, stderr=log, env=self.env)
        deadline = time.monotonic() + START_TIMEOUT
        match = None
        while match is None:
            if self.process.poll() is not None:
                pytest.fail(f"guardd exited ({self.process.returncode}) before it was ready:\n"
                            f"{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"guardd was not ready within {START_TIMEOUT:.0f}s:\n{self.log_text()}")
            time.sleep(0.05)
            match = _READY.search(self.log_path.read_bytes()[offset:].decode(errors="replace"))
        self.dns = [parse_endpoint(e) for e in match["dns"].split(",")]
        if match["socks"] != "off":
            self.socks = [parse_endpoint(e) for e in match["socks"].split(",")]
        if match["http"] != "off":
            self.http = [parse_endpoint(e) for e in match["http"].split(",")]
        if match["transparent"] != "off":
            self.transparent = [parse_endpoint(e) for e in match["transparent"].split(",")]
        if match["metrics"] != "off":
            self.metrics = parse_endpoint(match["metrics"])
        return self

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int:
        """SIGTERM, as systemd stops it; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"guardd did not stop within 15s of SIGTERM:\n{self.log_text()}")

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`guardd ARGS` (audit export, verify, …) against this daemon's files."""
        result = subprocess.run([*GUARDD, *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        if check and result.returncode != 0:
            pytest.fail(f"guardd {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
        return result

    def audit_records(self, *filters: str) -> list[dict[str, object]]:
        args = ["audit", "export", "--audit", str(self.audit_dir), "--format", "json"]
        for item in filters:
            args += ["--filter", item]
        return json.loads(self.cli(*args).stdout)

    def scrape(self) -> dict[str, float]:
        """The metrics page as {'name{labels}': value}, through curl like an operator would."""
        assert self.metrics is not None
        host, port = self.metrics
        page = run(in_netns(self.netns, [require("curl"), "-sf", f"http://{host}:{port}/metrics"])
                   ).stdout
        samples: dict[str, float] = {}
        for line in page.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                samples[key] = float(value)
        return samples


class LoadThreads:
    """Client threads, started by `with`, that run until its block ends (`stop` is set then)."""

    def __init__(self, *targets: Callable[[], None]) -> None:
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=target, daemon=True) for target in targets]

    def __enter__(self) -> Self:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


@contextlib.contextmanager
def loopback_netns(*addresses: str) -> Iterator[str]:
    """A network namespace with only `lo` (up, with `addresses` on it): no route anywhere else.
    Skips when not root."""
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace (ip netns add) needs root")
    require("ip")
    name = f"guardd-e2e-{os.getpid()}-{next(_NETNS_IDS)}"
    run(["ip", "netns", "add", name]).check_returncode()
    try:
        run(["ip", "-n", name, "link", "set", "lo", "up"]).check_returncode()
        for address in addresses:
            run(["ip", "-n", name, "addr", "add", address, "dev", "lo"]).check_returncode()
        links = run(["ip", "-n", name, "-o", "link", "show"]).stdout.splitlines()
        assert [line.split(":")[1].strip() for line in links] == ["lo"], links
        yield name
    finally:
        run(["ip", "netns", "del", name])


#: guardd's address on the link to `agents_netns`.
AGENTS_LINK = "10.254.0.1"


@contextlib.contextmanager
def agents_netns(guard_netns: str, *addresses: str) -> Iterator[str]:
    """A namespace of agents beside `guard_netns`, linked to it alone: each of `addresses` is
    an agent's (a client of its own), and reaches guardd at `AGENTS_LINK`; no route anywhere
    else. (An address on guardd's side, even on `lo`, is guardd's host's: any process there
    may bind it, and guardd counts it as loopback.)"""
    name = agents_of(guard_netns)
    run(["ip", "netns", "add", name]).check_returncode()
    try:
        for argv in (["-n", guard_netns, "link", "add", "agents0", "type", "veth", "peer",
                      "name", "eth0", "netns", name],
                     ["-n", guard_netns, "addr", "add", f"{AGENTS_LINK}/32", "dev", "agents0"],
                     ["-n", guard_netns, "link", "set", "agents0", "up"],
                     ["-n", name, "link", "set", "lo", "up"],
                     ["-n", name, "link", "set", "eth0", "up"],
                     ["-n", name, "route", "add", f"{AGENTS_LINK}/32", "dev", "eth0"],
                     *(step for address in addresses for step in (
                         ["-n", name, "addr", "add", f"{address}/32", "dev", "eth0"],
                         ["-n", guard_netns, "route", "add", f"{address}/32", "dev",
                          "agents0"]))):
            run(["ip", *argv]).check_returncode()
        yield name
    finally:
        run(["ip", "netns", "del", name])


def agents_of(guard_netns: str) -> str:
    """The name of `guard_netns`'s `agents_netns`."""
    return f"{guard_netns}-agents"


_NETNS_IDS = itertools.count()
_CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def netns_thread(netns: str) -> Iterator[ThreadPoolExecutor]:
    """A thread inside `netns` (setns(2) moves only the thread that calls it): what it is given
    to run makes the namespace's sockets, which then work from any thread."""
    def enter() -> None:
        with open(f"/run/netns/{netns}") as handle:
            if ctypes.CDLL(None, use_errno=True).setns(handle.fileno(), _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns into {netns}")

    with ThreadPoolExecutor(1, initializer=enter) as executor:
        yield executor


def run(argv: list[str], timeout: float = 30, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,  # type: ignore[call-overload]
                          **kwargs)


@dataclass(frozen=True)
class DigResult:
    status: str
    answers: list[tuple[str, str, str]]  # (name, type, data)
    ede: str
    raw: str


def dig(server: tuple[str, int], name: str, qtype: str = "A", *options: str,
        netns: str | None = None, timeout: float = 20) -> DigResult:
    """Ask with the real `dig`; one try, so a lost answer is a failure, not a retry."""
    result = _dig(server, name, qtype, "+time=5", *options, netns=netns, timeout=timeout)
    status = re.search(r"status: (\w+)", result.stdout)
    if status is None:
        pytest.fail(f"dig {name} {qtype} got no answer:\n{result.stdout}{result.stderr}")
    ede = re.search(r"; EDE: (.*)", result.stdout)
    section = result.stdout.partition(";; ANSWER SECTION:\n")[2].partition("\n\n")[0]
    answers = [(parts[0].rstrip("."), parts[3], parts[4])
               for parts in (line.split(None, 4) for line in section.splitlines()) if parts]
    return DigResult(status[1], answers, ede[1] if ede else "", result.stdout)


def dig_unanswered(server: tuple[str, int], name: str, *options: str,
                   netns: str | None = None) -> None:
    """Ask with the real `dig` and get no answer at all (one try of 2 s)."""
    result = _dig(server, name, "A", "+time=2", *options, netns=netns, timeout=20)
    assert "status:" not in result.stdout, result.stdout
    assert "timed out" in result.stdout, result.stdout + result.stderr


def _dig(server: tuple[str, int], name: str, qtype: str, *options: str, netns: str | None,
         timeout: float) -> subprocess.CompletedProcess[str]:
    host, port = server
    return run(in_netns(netns, [require("dig"), f"@{host}", "-p", str(port), name, qtype,
                                "+tries=1", *options]), timeout=timeout)


def dns_query(name: str, qid: int) -> bytes:
    """A plain recursive A query for `name`, as raw bytes."""
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!6H", qid, 0x0100, 1, 0, 0, 0) + labels + b"\0\0\1\0\1"


def free_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 right now (for scripts that take ports)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port

