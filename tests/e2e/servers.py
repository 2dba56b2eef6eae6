"""Destinations for the SOCKS tests, run as subprocesses (so they can live in a network namespace).

    python -m tests.e2e.servers MODE --host H --port P --log FILE [--tls PEM]

prints the bound port and serves until SIGTERM. Every connection is logged, one line each, so a
test can prove what reached a destination and, as important, what never did. Modes:

* ``web``: HTTP/1.1; answers every request ``200`` with the body ``METHOD PATH host=HOST`` and logs
  that same line; for ``/big-head``, with `BIG_HEAD_COOKIES` cookies too (a head of about 25 KB)
  written `SEGMENT` bytes at a time, as a network delivers it; for ``/big``, that line and
  `BIG_BODY` bytes more; for ``/chunked``, that line chunked when the request is HTTP/1.1 (as
  a server streaming what it makes does; to HTTP/1.0, which cannot read chunks, it sends a
  length); for ``/hang-up``, nothing: it closes the connection without an answer; for
  ``/reset``, a head without a length and that line, then it resets the connection (a body
  ended by the close would look whole);
* ``echo``: sends back whatever it receives, logs ``connection`` and then each chunk's length;
* ``trap``: logs ``connection`` and closes: it stands where no connection may ever arrive (a cloud
  metadata address inside the test's namespace);
* ``udptrap``: the same for UDP: logs ``datagram`` and the length of each one that arrives;
* ``banner``: speaks first (``banner`` and a newline, as SMTP or SSH servers do), logs
  ``connection``, then each chunk's length until the client closes;
* ``forward``: a toy HTTP forward proxy that goes where the request says, as apps built on
  `new URL(req.url, "http://" + host)` do (`urljoin` here): logs ``forward HOST:PORT``, then
  relays to an IP literal (it resolves no name: the test namespace has no resolver to ask);
* ``lenient``: Python's own `http.server`, the most lenient HTTP/1.x parser a test can stand
  behind guardd, keeping connections (HTTP/1.1) and reading no body; logs ``METHOD PATH`` for
  every request it serves, whatever the method.

With ``--tls PEM`` (a certificate and its key) the server speaks TLS first (``web`` as HTTPS);
with ``--curve NAME`` too it takes only that key exchange group, so a client that offers a key
for another gets a HelloRetryRequest (RFC 8446 4.1.4) and sends its hello again; with
``--tls12`` it speaks TLS 1.2 at most.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import ipaddress
import signal
import socket
import ssl
import struct
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from typing import IO

#: The bytes `/big` sends after its line: more than a socket's buffers hold.
BIG_BODY = 4 * 1024 * 1024
#: `/big-head`'s Set-Cookie fields, and the bytes written at a time (an Ethernet segment's).
BIG_HEAD_COOKIES = 200
SEGMENT = 1460
LOOPBACK_AND_TRAPS = ("127.0.0.1", "127.0.0.2", "::1", "169.254.169.254", "fd00:ec2::254")
#: The sandbox test's world namespace (tests/e2e/test_sandbox_netns.py): documentation addresses
#: that exist only there.
WORLD = ("192.0.2.10", "2001:db8::10", "198.51.100.7", "2001:db8:1::7")
#: Every address of a test's namespace of only `lo`: a service of guardd's host (a trap).
WILDCARD = ("0.0.0.0",)


class Server:
    def __init__(self, mode: str, log: IO[str]) -> None:
        self.mode = mode
        self.log = log

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await getattr(self, f"_{self.mode}")(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _web(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, version = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(":") for line in lines[1:] if line)}
            length = int(headers.get("content-length", "0"))
            if length:
                await reader.readexactly(length)
            body = f"{method} {path} host={headers.get('host', '')}"
            self.log.write(body + "\n")
            if path == "/hang-up":
                return
            if path == "/reset":
                writer.write(b"HTTP/1.1 200 OK\r\n\r\n" + body.encode() + b"\n")
                await writer.drain()
                await asyncio.sleep(0.2)  # (the bytes go before the reset)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            data = (body + "\n").encode() + (b"x" * BIG_BODY if path == "/big" else b"")
            cookies = b"".join(b"Set-Cookie: c%d=%s; Path=/\r\n" % (i, b"v" * 100)
                               for i in range(BIG_HEAD_COOKIES if path == "/big-head" else 0))
            response = b"HTTP/1.1 200 OK\r\n%sContent-Type: text/plain\r\n" \
                b"Content-Length: %d\r\n\r\n%s" % (cookies, len(data), data)
            if path == "/chunked" and version == "HTTP/1.1":
                response = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" \
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
            for at in range(0, len(response), SEGMENT if cookies else len(response)):
                writer.write(response[at:at + SEGMENT if cookies else None])
                await writer.drain()
                if cookies:
                    await asyncio.sleep(0.002)  # (each segment a read of its own)
            if headers.get("connection", "").lower() == "close":
                return

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.log.write("connection\n")
        while data := await reader.read(65536):
            self.log.write(f"{len(data)}\n")
            writer.write(data)
            await writer.drain()

    async def _banner(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.log.write("connection\n")
        writer.write(b"banner\n")
        await writer.drain()
        while data := await reader.read(65536):
            self.log.write(f"{len(data)}\n")

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                       ) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        lines = head.split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        host = next((v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
                     if k.strip().lower() == "host"), "")
        url = urllib.parse.urlsplit(urllib.parse.urljoin(f"http://{host}", target))
        port = url.port or 80
        self.log.write(f"forward {url.hostname}:{port}\n")
        try:
            ipaddress.ip_address(url.hostname or "")
        except ValueError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        upstream_reader, upstream_writer = await asyncio.open_connection(url.hostname, port)
        upstream_writer.write(f"{method} {url.path or '/'} HTTP/1.1\r\nHost: {url.netloc}\r\n"
                              "Connection: close\r\n\r\n".encode())
        writer.write(await upstream_reader.read())
        upstream_writer.close()

    async def _trap(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.log.write("connection\n")


def serve_lenient(host: str, port: int, log_path: str) -> None:
    """`http.server` in a thread until SIGTERM, answering every method it is asked."""
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - open for the process's life

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps connections: reads what follows a request too

        def __getattr__(self, name: str) -> Callable[[], None]:
            if not name.startswith("do_"):
                raise AttributeError(name)
            return self._serve

        def _serve(self) -> None:
            log.write(f"{self.command} {self.path}\n")
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (http.server.ThreadingHTTPServer,), {"address_family": family})
    server = server_class((host, port), Handler)
    print(server.server_address[1], flush=True)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


class _UdpTrap(asyncio.DatagramProtocol):
    def __init__(self, log: IO[str]) -> None:
        self.log = log

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.log.write(f"datagram {len(data)}\n")


async def udp_trap(host: str, port: int, log_path: str) -> None:
    with open(log_path, "a", buffering=1) as log:
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: _UdpTrap(log), local_addr=(host, port))
        print(transport.get_extra_info("sockname")[1], flush=True)
        await _until_stopped()


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def main_async(mode: str, host: str, port: int, log_path: str, tls: str | None,
                     curve: str | None, tls12: bool = False) -> None:
    context = None
    if tls:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls)
        if curve:
            context.set_ecdh_curve(curve)
        if tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
    with open(log_path, "a", buffering=1) as log:
        server = await asyncio.start_server(Server(mode, log).serve, host, port, ssl=context)
        print(server.sockets[0].getsockname()[1], flush=True)
        async with server:
            await _until_stopped()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.servers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("web", "echo", "trap", "udptrap", "banner", "forward",
                                         "lenient"))
    parser.add_argument("--host", default="127.0.0.1", choices=LOOPBACK_AND_TRAPS + WORLD +
                        WILDCARD)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True)
    parser.add_argument("--tls", metavar="PEM", help="serve TLS with this certificate and key")
    parser.add_argument("--curve", help="take only this key exchange group (a client that "
                        "offers a key for another gets a HelloRetryRequest)")
    parser.add_argument("--tls12", action="store_true", help="speak TLS 1.2 at most (its "
                        "sessions resume under any name: stream.sessions)")
    args = parser.parse_args(argv)
    if args.mode == "lenient":
        serve_lenient(args.host, args.port, args.log)
    elif args.mode == "udptrap":
        asyncio.run(udp_trap(args.host, args.port, args.log))
    else:
        asyncio.run(main_async(args.mode, args.host, args.port, args.log, args.tls,
                               args.curve, args.tls12))


if __name__ == "__main__":
    main()
