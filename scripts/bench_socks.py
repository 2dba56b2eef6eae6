"""Benchmark body for scripts/bench-socks (see there): guardd against dante and microsocks.

Two measures (three as root), each server in turn, rounds alternating so that a drift of the
machine hits all:

* relay throughput: iperf3 through proxychains4 (both in C, so the client is not the limit),
  one TCP stream to an iperf3 server on loopback;
* connects per second: a uvloop client of this script's own, `--clients` concurrent loops each
  doing greeting, CONNECT to a loopback echo server, one byte there and back, close;
* with `--unique-names` (scripts/bench-socks gives it as root, in a namespace of its own), the
  same connects each by a name of its own (`rRUNnN.bench.test`, as `socks5h://` clients send
  names), the adversarial mix: every connect is a lookup, so nothing a server remembers of
  names helps. `resolver` answers them all with 127.0.0.1; the namespace's resolv.conf names it.

guardd runs with its audit trail and metrics on (every CONNECT is a decision written to disk);
dante logs every connect and disconnect to a file; microsocks logs nothing (it cannot).
Everything is on 127.0.0.1; the policy allows only 127.0.0.0/8 (and the unique names, which
resolve there), with DNS tunnel detection off (it would refuse those: that is its job).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import psutil
import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.harness import Guardd, free_port  # noqa: E402

#: The zone of the unique-names measures: `resolver` answers every name under it.
NAMES_ZONE = "bench.test"
UNIQUE_NAMES = ("also measure connections each to a name of its own, resolved by dnsmasq on "
                "127.0.0.1:53: only in a network namespace whose resolv.conf names it (the "
                "bench's script runs it so as root)")
#: Sets this run's names apart from an earlier run's, which a resolver may remember.
_RUN = f"r{os.getpid()}t{time.time_ns() // 1_000_000 % 10**9}"
#: Names asked so far by this process's loops: each is asked once.
_NAMES = itertools.count()
#: (`dnsTunnel: off`: the unique names are what the detector refuses past 300 a minute, as it
#: should; the benches measure the proxies, and the peers have no such detector.)
POLICY = """\
version: "1.0"
dnsTunnel: off
rules:
  - {id: loopback, action: network.request, ip: 127.0.0.0/8, effect: allow,
     reason: "benchmark servers on loopback"}
  - {id: bench-names, action: network.request, domain: "*.bench.test", ip: 127.0.0.0/8,
     effect: allow, reason: "bench-http's unique names (each 127.0.0.1) may be looked up"}
  - {id: catch-all-deny, action: "*", domain: "*", effect: deny}
"""
DANTE_CONF = """\
logoutput: {log}
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 127.0.0.0/8 to: 0.0.0.0/0
    log: connect disconnect
}}
socks pass {{
    from: 127.0.0.0/8 to: 127.0.0.0/8
    command: connect
    log: connect disconnect
}}
"""
#: Not an HTTP token character: guardd's first-bytes check decides "opaque" at once.
PING = b"\x00"


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def _serve(protocol: type[asyncio.Protocol], port: int) -> None:
    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(protocol, "127.0.0.1", port,
                                                                backlog=1024)
        await server.serve_forever()

    uvloop.run(serve())


class Served(NamedTuple):
    """A server under test: its port, and its process (whose CPU time is measured)."""

    port: int
    pid: int


class Measure(NamedTuple):
    """Operations completed per second, operations failed, and the server's CPU time per
    completed operation, in microseconds (its threads and children included)."""

    rate: float
    failed: int
    cpu_us: float

    def shown(self) -> str:
        return f"{self.rate:8,.0f}/s ({self.failed} failed, {self.cpu_us:4.0f} us CPU each)"


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid`, its threads and its children so far, those
    it reaped included (dante forks a child per client: without them, children that ended
    between two readings took their time with them)."""
    total = 0.0
    for each in [process := psutil.Process(pid), *process.children(recursive=True)]:
        try:
            times = each.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system + times.children_user + times.children_system
    return total


@contextmanager
def loopback_server(protocol: type[asyncio.Protocol], what: str) -> Iterator[Served]:
    """A destination in a process of its own: a uvloop server of `protocol`, as light as the
    proxies' own work allows (on two cores the client, the proxy and it share the CPU)."""
    port = free_port()
    process = multiprocessing.Process(target=_serve, args=(protocol, port), daemon=True)
    process.start()
    assert process.pid is not None
    try:
        wait_listening(port, what)
        yield Served(port, process.pid)
    finally:
        process.terminate()
        process.join(10)


def echo_server() -> contextlib.AbstractContextManager[Served]:
    """The connect test's destination."""
    return loopback_server(_Echo, "the echo server")


def wait_listening(port: int, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on 127.0.0.1:{port}")


@contextmanager
def child(argv: list[str], port: int, what: str) -> Iterator[Served]:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_listening(port, what)
        if process.poll() is not None:  # (and something else listens there)
            raise SystemExit(f"{what} exited ({process.returncode}); port {port} is another's")
        yield Served(port, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


@contextmanager
def resolver() -> Iterator[Served]:
    """dnsmasq on 127.0.0.1:53, answering every name under `NAMES_ZONE` with 127.0.0.1 (AAAA
    with no address) and asking nobody anything; only where nothing can leave (`isolated`:
    `run_bench` names it as the namespace's resolver)."""
    why = isolated()
    if why:
        raise SystemExit(f"--unique-names needs a network namespace of its own: {why} "
                         "(scripts/bench-* run it so as root)")
    with child(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=53",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                "--no-poll", "--user=root", "--pid-file=",
                f"--address=/{NAMES_ZONE}/127.0.0.1", f"--local=/{NAMES_ZONE}/"],
               53, "dnsmasq") as bound:
        yield bound


def isolated() -> str:
    """Why the proxies' lookups could leave here (an interface besides `lo`: in a namespace
    with `lo` alone no packet leaves, whatever resolver a proxy asks); "" when they cannot."""
    others = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    return f"interfaces besides lo: {', '.join(others)}" if others else ""


def unique_name() -> str:
    """A name under `NAMES_ZONE` that no loop of this run asked before."""
    return f"{_RUN}n{next(_NAMES)}.{NAMES_ZONE}"


@contextmanager
def dante(directory: Path) -> Iterator[Served]:
    port = free_port()
    config = directory / "danted.conf"
    config.write_text(DANTE_CONF.format(log=directory / "danted.log", port=port))
    with child(["danted", "-f", str(config)], port, "danted") as bound:
        yield bound


@contextmanager
def microsocks() -> Iterator[Served]:
    port = free_port()
    with child(["microsocks", "-i", "127.0.0.1", "-p", str(port)], port,
               "microsocks") as bound:
        yield bound


@contextmanager
def guardd(directory: Path, listener: str = "socks", upstream: str = "127.0.0.1:9"
           ) -> Iterator[Served]:
    """guardd with its `listener` (socks or http) on loopback, asking `upstream` for names (by
    default nothing listens there: the targets are addresses)."""
    policy = directory / "policy.yaml"
    policy.write_text(POLICY)
    daemon = Guardd.launch(directory, "--policy", str(policy), "--dns", "127.0.0.1:0",
                           f"--{listener}", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                           "--upstream", upstream)
    assert daemon.process is not None, "launched"
    try:
        yield Served(getattr(daemon, listener)[0][1], daemon.process.pid)
    finally:
        daemon.stop()


def relay_gbits(directory: Path, proxy_port: int, seconds: float, kind: str = "socks5"
                ) -> float:
    """iperf3's received rate through the proxy (`kind`: proxychains4's socks5, or http for
    CONNECT), in Gbit/s (a fresh iperf3 server each time: one that saw a client fail may stop
    listening)."""
    for attempt in range(3):  # iperf3's control connection now and then fails on its own
        iperf_port = free_port()
        with child(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(iperf_port)], iperf_port,
                   "iperf3"):
            try:
                return _iperf_through(directory, proxy_port, iperf_port, seconds, kind)
            except SystemExit as exc:
                print(f"  (relay through port {proxy_port}, attempt {attempt + 1}: "
                      f"{str(exc).splitlines()[0]} {str(exc)[-80:].strip()!r})", file=sys.stderr)
    raise SystemExit(f"iperf3 through port {proxy_port} failed three times")


def _iperf_through(directory: Path, proxy_port: int, iperf_port: int, seconds: float,
                   kind: str) -> float:
    config = directory / f"proxychains-{proxy_port}.conf"
    config.write_text(f"strict_chain\nquiet_mode\ntcp_read_time_out 15000\n"
                      f"tcp_connect_time_out 8000\n[ProxyList]\n{kind} 127.0.0.1 {proxy_port}\n")
    result = subprocess.run(["proxychains4", "-q", "-f", str(config), "iperf3", "-c", "127.0.0.1",
                             "-p", str(iperf_port), "-t", str(seconds), "-J"],
                            capture_output=True, text=True, timeout=seconds + 30)
    try:
        report = json.loads(result.stdout)
        return report["end"]["sum_received"]["bits_per_second"] / 1e9
    except (ValueError, KeyError):
        raise SystemExit(f"iperf3 through port {proxy_port} failed:\n{result.stdout[-2000:]}"
                         f"{result.stderr[-2000:]}") from None


async def _connect_loop(proxy_port: int, echo_port: int, deadline: float, counts: list[int],
                        unique_names: bool = False) -> None:
    """Greeting, CONNECT to 127.0.0.1 (with `unique_names`, to a name of its own each time),
    one byte there and back, close; until `deadline`."""
    loop = asyncio.get_running_loop()
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo_port.to_bytes(2, "big")
    while time.monotonic() < deadline:
        if unique_names:
            name = unique_name().encode()
            request = b"\x05\x01\x00\x03%c%s%s" % (len(name), name, echo_port.to_bytes(2, "big"))
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", proxy_port))
            await loop.sock_sendall(sock, b"\x05\x01\x00")
            if await read_exactly(loop, sock, 2) != b"\x05\x00":
                raise ConnectionError("method refused")
            await loop.sock_sendall(sock, request)
            reply = await read_exactly(loop, sock, 10)
            if reply[1] != 0:
                raise ConnectionError(f"CONNECT refused: reply {reply[1]}")
            await loop.sock_sendall(sock, PING)
            if await read_exactly(loop, sock, 1) != PING:
                raise ConnectionError("no echo")
            counts[0] += 1
        except OSError as exc:
            counts[1] += 1
            if counts[1] == 1:
                print(f"  (connect error: {exc})", file=sys.stderr)
        finally:
            sock.close()


async def read_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def connects_per_second(proxy: Served, echo_port: int, seconds: float, clients: int,
                        loop_body: Callable[..., Awaitable[None]] | None = None) -> Measure:
    """Connects through `proxy` over `seconds`, each of `clients` running `loop_body` (a SOCKS5
    connect loop by default)."""
    counts = [0, 0]
    body = loop_body or _connect_loop

    async def run() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(body(proxy.port, echo_port, deadline, counts)
                               for _ in range(clients)))

    started, cpu = time.monotonic(), cpu_seconds(proxy.pid)
    uvloop.run(run())
    elapsed, cpu = time.monotonic() - started, cpu_seconds(proxy.pid) - cpu
    return Measure(counts[0] / elapsed, counts[1], cpu * 1e6 / max(counts[0], 1))


def arguments(prog: str, description: str | None, tools: tuple[str, ...], argv: list[str],
              flags: dict[str, str] | None = None) -> argparse.Namespace:
    """A benchmark's options (--seconds, --rounds, --clients, and its own on/off `flags`, by
    name and help), once its `tools` are there (and dnsmasq, for --unique-names)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and measure")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client loops")
    for flag, help_text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=help_text)
    args = parser.parse_args(argv)
    for tool in (*tools, *(("dnsmasq",) if getattr(args, "unique_names", False) else ())):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed ({prog} installs it as root)")
    return args


def main(argv: list[str]) -> int:
    args = arguments("scripts/bench-socks", __doc__, ("danted", "microsocks", "iperf3",
                                                      "proxychains4"), argv,
                     {"--unique-names": UNIQUE_NAMES})
    with tempfile.TemporaryDirectory(prefix="guardd-bench-socks-") as tmp:
        directory = Path(tmp)
        upstream = "127.0.0.1:53" if args.unique_names else "127.0.0.1:9"
        servers: dict[str, Callable[[], object]] = {
            "guardd": lambda: guardd(directory, upstream=upstream),
            "dante": lambda: dante(directory), "microsocks": microsocks}
        relay = {name: 0.0 for name in servers}
        connects = {name: Measure(0.0, 0, 0.0) for name in servers}
        names = {name: Measure(0.0, 0, 0.0) for name in servers}
        with echo_server() as echo, resolver() if args.unique_names else nullcontext():
            for _ in range(args.rounds):
                for name, start in servers.items():
                    with start() as served:  # type: ignore[attr-defined]
                        relay[name] = max(relay[name], relay_gbits(directory, served.port,
                                                                   args.seconds))
                        connects[name] = max(connects[name], connects_per_second(
                            served, echo.port, args.seconds, args.clients))
                        if args.unique_names:
                            names[name] = max(names[name], connects_per_second(
                                served, echo.port, args.seconds, args.clients,
                                functools.partial(_connect_loop, unique_names=True)))
        audited = sum(1 for path in directory.glob("audit/audit.jsonl*") for _ in path.open("rb"))
        dante_lines = sum(1 for _ in (directory / "danted.log").open("rb"))
    print(f"SOCKS5 on loopback, best of {args.rounds} alternating rounds of {args.seconds:g}s. "
          f"Relay: iperf3 through proxychains4, one stream. Connects: {args.clients} concurrent "
          f"uvloop clients, CONNECT + 1-byte echo + close" +
          ("; by unique names: the same, each to a name of its own (resolved)"
           if args.unique_names else "") +
          ". CPU: the server's user and system time per connect (its kernel work included).")
    for name in servers:
        print(f"{name:>11}: relay {relay[name]:6.2f} Gbit/s   connects {connects[name].shown()}"
              + (f"   by unique names {names[name].shown()}" if args.unique_names else ""))
    for peer in ("dante", "microsocks"):
        print(f"guardd/{peer}: relay {relay['guardd'] / relay[peer]:.2f}, connects "
              f"{connects['guardd'].rate / connects[peer].rate:.2f}" +
              (f", connects by unique names {names['guardd'].rate / names[peer].rate:.2f}"
               if args.unique_names else ""))
    print(f"guardd audit records: {audited:,}; dante log lines: {dante_lines:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
