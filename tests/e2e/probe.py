"""A SOCKS5 client that sends chosen bytes through a CONNECT and reports what came back.

    python -m tests.e2e.probe PROXY_HOST PROXY_PORT HOST PORT [--send HEX] [--half-close]
                              [--source ADDRESS] [--hold N] [--resolve DNS NAME] [--reply-only]

prints one JSON object: {"reply": the SOCKS reply code, or null when the proxy closed before
replying, "received": the bytes that came back (Latin-1 text) until the connection ended or 5 s
passed; with --reply-only, none: the connection closes at the reply}. With --hold N it first
opens N connections to the proxy that send nothing, and keeps them open meanwhile (a
slow-loris client). Run inside the test's network namespace with
`ip netns exec`.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Sequence

from dnslib import DNSRecord

from tests.e2e.rawsocks import socks_request


def probe(proxy: tuple[str, int], host: str, port: int, send: bytes, half_close: bool,
          source: str | None, resolve: tuple[tuple[str, int], str] | None = None,
          reply_only: bool = False) -> dict[str, object]:
    try:
        reply, sock = socks_request(proxy, host, port, source=source, timeout=5)
    except ConnectionError:
        return {"reply": None, "received": ""}
    received = b""
    with sock:
        if resolve is not None:
            ask(*resolve, source)
        if reply == 0 and not reply_only:
            try:
                sock.sendall(send)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    received += chunk
            except OSError:  # a timeout, a reset, a shutdown after guardd closed: the end
                pass
    return {"reply": reply, "received": received.decode("latin-1")}


def ask(server: tuple[str, int], name: str, source: str | None) -> None:
    """One A query for `name` to guardd's DNS listener, from `source`; waits for the answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.settimeout(5)
        udp.bind((source or "127.0.0.1", 0))
        udp.sendto(DNSRecord.question(name).pack(), server)
        udp.recvfrom(4096)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.e2e.probe", description=__doc__)
    parser.add_argument("proxy_host")
    parser.add_argument("proxy_port", type=int)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--send", default="", help="hex of the bytes to send after the reply")
    parser.add_argument("--half-close", action="store_true")
    parser.add_argument("--source", help="local address to connect from")
    parser.add_argument("--hold", type=int, default=0, metavar="N")
    parser.add_argument("--resolve", nargs=2, metavar=("DNS_HOST:PORT", "NAME"),
                        help="after the SOCKS reply, ask guardd's DNS for NAME")
    parser.add_argument("--reply-only", action="store_true",
                        help="close at the SOCKS reply (its code is all that is asked)")
    args = parser.parse_args(argv)
    proxy = (args.proxy_host, args.proxy_port)
    source = (args.source, 0) if args.source else None
    held = [socket.create_connection(proxy, source_address=source) for _ in range(args.hold)]
    try:
        resolve = None
        if args.resolve:
            dns_host, _, dns_port = args.resolve[0].rpartition(":")
            resolve = ((dns_host, int(dns_port)), args.resolve[1])
        print(json.dumps(probe(proxy, args.host, args.port, bytes.fromhex(args.send),
                               args.half_close, args.source, resolve, args.reply_only)))
    finally:
        for sock in held:
            sock.close()


if __name__ == "__main__":
    main()
