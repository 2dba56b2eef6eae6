"""Benchmark body for scripts/bench-http (see there): guardd's HTTP proxy against tinyproxy and
squid.

Three measures (four as root), each proxy in turn, rounds alternating so that a drift of the
machine hits all:

* CONNECT relay throughput: iperf3 through proxychains4's `http` proxy type (CONNECT), one TCP
  stream to an iperf3 server on loopback;
* CONNECT connects per second: `--clients` concurrent uvloop loops, each doing CONNECT to a
  loopback echo server, one byte there and back, close;
* absolute-form requests per second: `--clients` concurrent loops, each sending
  `GET http://127.0.0.1:PORT/` and reading the whole response, on a kept-alive connection for
  as long as the proxy keeps it (a new one when it closes), to a loopback HTTP server;
* with `--unique-names` (scripts/bench-http gives it as root), the same requests each to a
  name of its own (`GET http://rRUNnN.bench.test:PORT/`), the adversarial mix: every request is
  a name to resolve and a new origin, so nothing a proxy remembers of names or connections
  helps. dnsmasq on 127.0.0.1:53 answers every name under bench.test with 127.0.0.1 (and AAAA
  with no address): it is guardd's upstream, squid's `dns_nameservers` and, through the
  namespace's own resolv.conf, tinyproxy's resolver.

Every proxy records every request: guardd its audit trail (every decision on disk), tinyproxy
`LogLevel Info` to a file, squid its access.log. The policy allows only 127.0.0.0/8 (and the
unique names, which resolve there), with DNS tunnel detection off (it would refuse those).

For scale, the requests measure also runs against `_ForwardOnly`: a uvloop proxy in Python that
only forwards (it finds the head's end and rewrites the request line; it parses, judges and
records nothing): what any Python proxy of this shape can do on this machine at most.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_socks import (PING, UNIQUE_NAMES, Measure, Served, arguments, child,  # noqa: E402
                         connects_per_second, echo_server, guardd, loopback_server, read_exactly,
                         relay_gbits, resolver, unique_name)

from tests.e2e.harness import free_port  # noqa: E402

TINYPROXY_CONF = """\
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 4096
LogFile "{log}"
LogLevel Info
PidFile "{pid}"
Allow 127.0.0.1
DisableViaHeader Yes
"""
SQUID_CONF = """\
http_port 127.0.0.1:{port}
acl localnet src 127.0.0.0/8
http_access allow localnet
http_access deny all
cache deny all
access_log stdio:{directory}/squid-access.log
cache_log {directory}/squid-cache.log
pid_filename {directory}/squid.pid
coredump_dir {directory}
dns_nameservers 127.0.0.1
max_filedescriptors 16384
"""
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"


class _Web(asyncio.Protocol):
    """Answers every request head with RESPONSE, keeping the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) != -1:
            self.buffer = self.buffer[end + 4:]
            self.transport.write(RESPONSE)  # type: ignore[attr-defined]


class _ForwardOnly(asyncio.Protocol):
    """The requests measure's ceiling for a Python proxy: absolute-form requests forwarded in
    origin form over one connection to the first request's origin, responses as they come."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""
        self.upstream: asyncio.Transport | None = None
        self.waiting: list[bytes] = []

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) != -1:
            head, self.buffer = self.buffer[:end + 4], self.buffer[end + 4:]
            line, rest = head.split(b"\r\n", 1)
            method, url, version = line.split(b" ")
            authority, _, path = url.removeprefix(b"http://").partition(b"/")
            request = b"%s /%s %s\r\n%s" % (method, path, version, rest)
            if self.upstream is not None:
                self.upstream.write(request)
                continue
            self.waiting.append(request)
            if len(self.waiting) == 1:
                host, _, port = authority.partition(b":")
                asyncio.ensure_future(self._connect(host.decode(), int(port)))

    async def _connect(self, host: str, port: int) -> None:
        client = self.transport
        self.upstream, _ = await asyncio.get_running_loop().create_connection(
            lambda: _Back(client), host, port)  # type: ignore[arg-type]
        self.upstream.write(b"".join(self.waiting))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


class _Back(asyncio.Protocol):
    """`_ForwardOnly`'s upstream side: every byte back to the client."""

    def __init__(self, client: asyncio.Transport) -> None:
        self.client = client

    def data_received(self, data: bytes) -> None:
        self.client.write(data)


@contextmanager
def tinyproxy(directory: Path) -> Iterator[Served]:
    port = free_port()
    config = directory / "tinyproxy.conf"
    config.write_text(TINYPROXY_CONF.format(port=port, log=directory / "tinyproxy.log",
                                            pid=directory / "tinyproxy.pid"))
    with child(["tinyproxy", "-d", "-c", str(config)], port, "tinyproxy") as bound:
        yield bound


@contextmanager
def squid(directory: Path) -> Iterator[Served]:
    port = free_port()
    config = directory / "squid.conf"
    config.write_text(SQUID_CONF.format(port=port, directory=directory))
    with child(["squid", "-N", "-f", str(config)], port, "squid") as bound:
        yield bound


async def _connect_loop(proxy_port: int, echo_port: int, deadline: float, counts: list[int]
                        ) -> None:
    """CONNECT, one byte there and back, close; until `deadline`."""
    loop = asyncio.get_running_loop()
    request = (f"CONNECT 127.0.0.1:{echo_port} HTTP/1.1\r\n"
               f"Host: 127.0.0.1:{echo_port}\r\n\r\n").encode()
    while time.monotonic() < deadline:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", proxy_port))
            await loop.sock_sendall(sock, request)
            head, rest = await _head(loop, sock)
            if b" 200 " not in head.split(b"\r\n", 1)[0] or rest:
                raise ConnectionError(f"CONNECT refused: {head[:60]!r}")
            await loop.sock_sendall(sock, PING)
            if await read_exactly(loop, sock, 1) != PING:
                raise ConnectionError("no echo")
            counts[0] += 1
        except OSError as exc:
            _failed(counts, exc)
        finally:
            sock.close()


async def _request_loop(proxy_port: int, web_port: int, deadline: float, counts: list[int],
                        unique_names: bool = False) -> None:
    """Absolute-form GETs, kept alive as long as the proxy keeps the connection; with
    `unique_names`, each to a name of its own (`unique_name`)."""
    loop = asyncio.get_running_loop()
    origin = f"127.0.0.1:{web_port}"
    sock: socket.socket | None = None
    reused = False
    while time.monotonic() < deadline:
        if unique_names:
            origin = f"{unique_name()}:{web_port}"
        request = f"GET http://{origin}/ HTTP/1.1\r\nHost: {origin}\r\n\r\n".encode()
        try:
            if sock is None:
                sock = socket.socket()
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", proxy_port))
                reused = False
            await loop.sock_sendall(sock, request)
            head, body = await _head(loop, sock)
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) < length:
                body += await read_exactly(loop, sock, length - len(body))
            if body != b"ok" or b" 200 " not in head[:16]:
                raise ConnectionError(f"not the server's answer: {head[:60]!r}")
            counts[0] += 1
            reused = True
            if b"connection: close" in head.lower():
                sock.close()
                sock = None
        except (OSError, IndexError, ValueError) as exc:
            if not (reused and isinstance(exc, ConnectionError)):
                _failed(counts, exc)  # (a kept connection the proxy closed: as clients do,
            if sock is not None:      # ask again on a new one)
                sock.close()
                sock = None
    if sock is not None:
        sock.close()


async def _head(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> tuple[bytes, bytes]:
    """A response head, and the bytes that came after it (a response comes whole: nothing
    else is asked meanwhile)."""
    data = b""
    while (end := data.find(b"\r\n\r\n")) == -1:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectionError("closed before the head ended")
        data += chunk
    return data[:end + 4], data[end + 4:]


def _failed(counts: list[int], exc: BaseException) -> None:
    counts[1] += 1
    if counts[1] == 1:
        print(f"  (error: {exc})", file=sys.stderr)


def main(argv: list[str]) -> int:
    args = arguments("scripts/bench-http", __doc__, ("tinyproxy", "squid", "iperf3",
                                                     "proxychains4"), argv,
                     {"--unique-names": UNIQUE_NAMES})
    with tempfile.TemporaryDirectory(prefix="guardd-bench-http-") as tmp:
        directory = Path(tmp)
        os.chmod(directory, 0o777)  # squid drops to its own user, and logs here
        upstream = "127.0.0.1:53" if args.unique_names else "127.0.0.1:9"
        proxies: dict[str, Callable[[], object]] = {
            "guardd": lambda: guardd(directory, "http", upstream),
            "tinyproxy": lambda: tinyproxy(directory), "squid": lambda: squid(directory)}
        relay = {name: 0.0 for name in proxies}
        connects = {name: Measure(0.0, 0, 0.0) for name in proxies}
        requests = {name: Measure(0.0, 0, 0.0) for name in proxies}
        names = {name: Measure(0.0, 0, 0.0) for name in proxies}
        forward_only = Measure(0.0, 0, 0.0)
        with echo_server() as echo, loopback_server(_Web, "the web server") as web, \
                loopback_server(_ForwardOnly, "the forward-only proxy") as forwarder, \
                resolver() if args.unique_names else nullcontext():
            for _ in range(args.rounds):
                for name, start in proxies.items():
                    with start() as served:  # type: ignore[attr-defined]
                        relay[name] = max(relay[name], relay_gbits(directory, served.port,
                                                                   args.seconds, "http"))
                        connects[name] = max(connects[name], connects_per_second(
                            served, echo.port, args.seconds, args.clients, _connect_loop))
                        requests[name] = max(requests[name], connects_per_second(
                            served, web.port, args.seconds, args.clients, _request_loop))
                        if args.unique_names:
                            names[name] = max(names[name], connects_per_second(
                                served, web.port, args.seconds, args.clients,
                                functools.partial(_request_loop, unique_names=True)))
                forward_only = max(forward_only, connects_per_second(
                    forwarder, web.port, args.seconds, args.clients, _request_loop))
        logged = {"guardd": sum(1 for path in directory.glob("audit/audit.jsonl*")
                                for _ in path.open("rb")),
                  "tinyproxy": sum(1 for _ in (directory / "tinyproxy.log").open("rb")),
                  "squid": sum(1 for _ in (directory / "squid-access.log").open("rb"))}
    print(f"HTTP proxies on loopback, best of {args.rounds} alternating rounds of "
          f"{args.seconds:g}s. Relay: iperf3 through proxychains4 (CONNECT), one stream. "
          f"Connects: {args.clients} concurrent uvloop clients, CONNECT + 1-byte echo + close. "
          f"Requests: {args.clients} clients, absolute-form GET, kept alive while the proxy "
          "keeps it" + ("; to unique names: the same, each to a name of its own (resolved, "
                        "and a new origin)" if args.unique_names else "") +
          ". CPU: the proxy's user and system time per operation (its kernel work included).")
    for name in proxies:
        print(f"{name:>10}: relay {relay[name]:6.2f} Gbit/s   connects {connects[name].shown()}"
              f"   requests {requests[name].shown()}" +
              (f"   to unique names {names[name].shown()}" if args.unique_names else "") +
              f"   log lines {logged[name]:,}")
    peers = ("tinyproxy", "squid")
    fastest = {"relay": max(relay[name] for name in peers),
               "connects": max(connects[name].rate for name in peers),
               "requests": max(requests[name].rate for name in peers),
               "names": max(names[name].rate for name in peers)}
    print(f"For scale, a Python proxy that only forwards (parses, judges and records nothing): "
          f"requests {forward_only.shown()}, "
          f"{forward_only.rate / fastest['requests']:.2f} x the faster of tinyproxy and squid")
    print(f"guardd / the faster of tinyproxy and squid: relay "
          f"{relay['guardd'] / fastest['relay']:.2f} (goal 1.2), connects "
          f"{connects['guardd'].rate / fastest['connects']:.2f} (goal 1.0), requests "
          f"{requests['guardd'].rate / fastest['requests']:.2f} (goal 1.0)" +
          (f", requests to unique names {names['guardd'].rate / fastest['names']:.2f}"
           if args.unique_names else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
