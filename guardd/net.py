"""Where guardd listens: endpoints, host:port text, and bound sockets. Every layer may import it.

`config` parses endpoints, the listeners bind them; neither imports the other for it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import resource
import socket
import struct
from dataclasses import dataclass

from guardd.addr import split_host_port
from guardd.errors import ConfigError

#: Room for a burst of DNS queries while the loop is busy with others.
UDP_RECEIVE_BUFFER = 4 * 1024 * 1024
#: Each way's socket buffer on a client's connection (the kernel doubles it), inherited from
#: the listening socket: a client that never reads held about 4 MiB of its download in
#: guardd's send buffer, 256 connections of it a GiB (attack pass). Clients are near: 1 MiB
#: fills a link of 1 ms round trip at 1 GB/s (256 KiB cost loopback relays a fifth of their
#: rate). Destinations' buffers keep the kernel's tuning, which far servers need.
CLIENT_SOCKET_BUFFER = 1 << 20
LISTEN_BACKLOG = 1024
#: SO_LINGER on, 0 s: a close sends a RST, which no peer takes for the end of what it got.
RESET_ON_CLOSE = struct.pack("ii", 1, 0)
#: getsockopt(SO_MEMINFO) (linux/sock_diag.h: what `ss -m` shows): nine counters, of which
#: what the receive queue holds (0), what the send queue holds, unsent or unacknowledged (5),
#: and the backlog (7), each in bytes of kernel memory (their buffers' overhead included).
_SO_MEMINFO = 55
_MEMINFO = struct.Struct("9I")


def hostport(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets (once: a client may have sent them)."""
    return f"[{host}]:{port}" if ":" in host and host[:1] != "[" else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A listening address; `port` 0 asks the kernel for a free one (tests)."""

    host: str
    port: int

    def __str__(self) -> str:
        return hostport(self.host, self.port)


def socket_queues(sock: socket.socket) -> tuple[int, int]:
    """Kernel memory `sock`'s queues hold: what came and guardd did not read yet, and what
    guardd wrote and the peer did not take yet ((0, 0) for a closed socket)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, _SO_MEMINFO, _MEMINFO.size)
    except OSError:
        return 0, 0
    counters = _MEMINFO.unpack(raw.ljust(_MEMINFO.size, b"\0"))
    return counters[0] + counters[7], counters[5]


def close_watched(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Close `sock`, first removing whatever the loop watches on it: uvloop keeps the watch of a
    descriptor closed under it, and the next socket given that number is never reported ready."""
    fd = sock.fileno()
    if fd >= 0:
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        sock.close()


#: getsockopt option of netfilter's original destination (linux/netfilter_ipv4.h and
#: netfilter_ipv6/ip6_tables.h both number it 80).
_SO_ORIGINAL_DST = 80


def arrived_at(sock: socket.socket) -> tuple[tuple[str, int], ...]:
    """Where an accepted connection was sent: the address it was accepted on and, when a NAT
    on this host redirected it, its original destination."""
    local = sock.getsockname()[:2]
    original = original_destination(sock)
    return (local,) if original is None else (local, original)


def original_destination(sock: socket.socket) -> tuple[str, int] | None:
    """The destination an accepted connection was sent to before a NAT on this host (nftables
    `dnat`/`redirect`) sent it here, from connection tracking; None when it has no such entry
    (it came here directly, or connection tracking is off)."""
    try:
        if sock.family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, _SO_ORIGINAL_DST, 28)  # (SOL_IPV6)
            return (socket.inet_ntop(socket.AF_INET6, raw[8:24]),
                    int.from_bytes(raw[2:4], "big"))
        raw = sock.getsockopt(socket.SOL_IP, _SO_ORIGINAL_DST, 16)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), int.from_bytes(raw[2:4], "big")
    except OSError:
        return None


#: Descriptors one proxied connection holds: the client's, the destination's, two pipes; and
#: one socket it may leave closing, its bytes still going (`stream.reactor.Reactor.close`).
DESCRIPTORS_PER_CONNECTION = 7


def descriptor_limit() -> int:
    """RLIMIT_NOFILE, its soft limit raised to the hard one first (a common default soft limit,
    1024, is far below what the connection caps need)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # an unlimited hard limit is above the kernel's nr_open
            return soft
        return hard
    return soft


def connections_within(limit: int, reserved: int, wanted: int) -> int:
    """How many proxied connections fit in `limit` descriptors beside `reserved` others: at most
    `wanted`, at least 1 (so a tiny limit refuses cleanly rather than never accepting)."""
    return max(1, min(wanted, (limit - reserved) // DESCRIPTORS_PER_CONNECTION))


def parse_endpoint(text: str, what: str, default_port: int) -> Endpoint:
    """`ADDR:PORT`, `[V6]:PORT` or a bare address; the host must be an IP address."""
    try:
        host, port = split_host_port(str(text), allow_zero=True)
        address = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ConfigError(f"invalid {what} address {text!r}: {exc}; use e.g. "
                          f"127.0.0.1:{default_port} or [::1]:{default_port}") from None
    return Endpoint(str(address), default_port if port is None else port)


def bind_socket(endpoint: Endpoint, kind: int, dual_stack: bool = False) -> socket.socket:
    """A bound, non-blocking socket (a TCP one listening); IPv6 sockets are v6-only so 0.0.0.0
    and :: can coexist, unless `dual_stack` (a listener that takes one address, the metrics'
    `[::]`, then serves IPv4 too)."""
    family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, not dual_stack)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_SOCKET_BUFFER)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RECEIVE_BUFFER)
        sock.bind((endpoint.host, endpoint.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_pair(endpoint: Endpoint, attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on the same port (port 0: the kernel picks one free for both)."""
    for _ in range(attempts):
        tcp = bind_socket(endpoint, socket.SOCK_STREAM)
        port = tcp.getsockname()[1]
        try:
            udp = bind_socket(Endpoint(endpoint.host, port), socket.SOCK_DGRAM)
        except OSError:
            tcp.close()
            if endpoint.port:
                raise
            continue
        return udp, tcp
    raise OSError(f"no port free for both UDP and TCP on {endpoint.host}")
