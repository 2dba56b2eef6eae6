"""A SOCKS5 client that sends chosen bytes through a CONNECT and reports what came back.

    python -m tests.e2e.probe PROXY_HOST PROXY_PORT HOST PORT [--send HEX] [--half-close]
                              [--source ADDRESS] [--hold N]

prints one JSON object: {"reply": the SOCKS reply code, or null when the proxy closed before
replying, "received": the bytes that came back (Latin-1 text) until the connection ended or 5 s
passed}. With --hold N it first opens N connections to the proxy that send nothing, and keeps
them open meanwhile (a slow-loris client). Run inside the test's network namespace with
`ip netns exec`.
"""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Sequence

from tests.e2e.rawsocks import socks_request


def probe(proxy: tuple[str, int], host: str, port: int, send: bytes, half_close: bool,
          source: str | None) -> dict[str, object]:
    try:
        reply, sock = socks_request(proxy, host, port, source=source, timeout=5)
    except ConnectionError:
        return {"reply": None, "received": ""}
    received = b""
    with sock:
        if reply == 0:
            try:
                sock.sendall(send)
                if half_close:
                    sock.shutdown(socket.SHUT_WR)
                while chunk := sock.recv(65536):
                    received += chunk
            except OSError:  # a timeout, a reset, a shutdown after guardd closed: the end
                pass
    return {"reply": reply, "received": received.decode("latin-1")}


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
    args = parser.parse_args(argv)
    proxy = (args.proxy_host, args.proxy_port)
    source = (args.source, 0) if args.source else None
    held = [socket.create_connection(proxy, source_address=source) for _ in range(args.hold)]
    try:
        print(json.dumps(probe(proxy, args.host, args.port, bytes.fromhex(args.send),
                               args.half_close, args.source)))
    finally:
        for sock in held:
            sock.close()


if __name__ == "__main__":
    main()
