"""A raw SOCKS5 client for requests no library would send (odd ATYP, BIND, literal encodings).

Used in-process, or in a network namespace as ``python -m tests.e2e.rawsocks PROXY_HOST
PROXY_PORT ATYP HOST PORT`` (ATYP 1, 3 or 4), which prints the reply code.
"""

from __future__ import annotations

import socket
import sys


def socks_request(proxy: tuple[str, int], host: str | bytes, port: int, *, command: int = 1,
                  atyp: int | None = None, timeout: float = 10, source: str | None = None
                  ) -> tuple[int, socket.socket]:
    """A raw SOCKS5 request, as no library would send it (odd ATYP, BIND, literal encodings):
    returns the reply code and the open socket (the caller closes it)."""
    families = {1: socket.AF_INET, 4: socket.AF_INET6}
    if atyp is None:  # an address literal goes as one, anything else as a domain
        atyp = next((kind for kind, family in families.items() if _packs(family, str(host))), 3)
    if atyp == 3:
        raw = host.encode() if isinstance(host, str) else host
        address = bytes([len(raw)]) + raw
    else:
        address = socket.inet_pton(families[atyp], str(host))
    sock = socket.create_connection(proxy, timeout=timeout,
                                    source_address=(source, 0) if source else None)
    try:
        sock.sendall(b"\x05\x01\x00")
        if _recv_exactly(sock, 2) != b"\x05\x00":
            raise AssertionError("the proxy refused the no-authentication method")
        sock.sendall(bytes([5, command, 0, atyp]) + address + port.to_bytes(2, "big"))
        version, reply, _, bound_type = _recv_exactly(sock, 4)
        _recv_exactly(sock, {1: 4, 4: 16}[bound_type] + 2)
    except BaseException:
        sock.close()
        raise
    assert version == 5
    return reply, sock


def _packs(family: int, text: str) -> bool:
    try:
        socket.inet_pton(family, text)
    except OSError:
        return False
    return True


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"the proxy closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def main(argv: list[str]) -> None:
    proxy_host, proxy_port, atyp, host, port = argv
    reply, sock = socks_request((proxy_host, int(proxy_port)), host, int(port), atyp=int(atyp))
    sock.close()
    print(reply)


if __name__ == "__main__":
    main(sys.argv[1:])
