"""Transparent listener: connections the agent sandbox's nftables redirect here, whatever
address and port the agent asked for, on the shared connect pipeline.

The agent did not name a proxy; it resolved a name (through guardd, its only resolver) and
connected to an address. `TransparentListener` takes that destination from connection tracking
(`net.original_destination`: SO_ORIGINAL_DST, and its IPv6 counterpart) and judges a connect to
it as the SOCKS listener judges a connect by address: as every name this client resolved to the
address through guardd, else by `ip` rules alone. When that would deny, the client's first bytes
may still name the server (the TLS SNI, the HTTP Host: an agent that resolved over IPv4 and
connects over IPv6 has no name on record for its IPv6 address): the connect is then judged as
a connect to that name, pinned to the address the agent chose, which guardd must itself resolve
the name to (`guard.Connect.pinned`); anything else is judged by address and refused. Nothing
reaches the destination before the verdict, and a refusal resets the connection (there is no
protocol here to say why: the audit record does).

A connection that did not come through a redirect (no original destination) is refused: the
listener serves only what the sandbox sends it.
"""

from __future__ import annotations

import socket

from guardd.addr import UNVERIFIABLE, IPAddress, parse_host, parse_ip
from guardd.errors import InvalidHostError
from guardd.guard import TRANSPARENT_LISTENER
from guardd.net import RESET_ON_CLOSE, hostport, original_destination
from guardd.stream.listener import ProxyListener
from guardd.stream.socket_io import SocketIO
from guardd.stream.tunnel import SENT_NOTHING, Opened, Tunnel


def _redirected(sock: socket.socket) -> tuple[IPAddress, int] | None:
    """The address and port the connection was redirected from (None: it was not)."""
    destination = original_destination(sock)
    if destination is None or destination == sock.getsockname()[:2]:
        return None
    ip = parse_ip(destination[0])
    assert ip is not None, "connection tracking gives an address"
    return ip, destination[1]


def _redirected_target(sock: socket.socket) -> str | None:
    """Where a connection refused at accept was going (a record's target), if redirected."""
    destination = _redirected(sock)
    return None if destination is None else hostport(str(destination[0]), destination[1])


class TransparentListener(ProxyListener):
    """Serves connections redirected to it: a tunnel each, to their original destination."""

    name = TRANSPARENT_LISTENER
    refused_target = staticmethod(_redirected_target)

    async def handle(self, io: SocketIO, tunnels: list[Tunnel], client: str, port: int
                     ) -> None:
        tunnel = tunnels[-1]
        sock = io.client.sock
        destination = _redirected(sock)
        target = None if destination is None else hostport(str(destination[0]), destination[1])
        principal = await self.act_for(tunnel, client, None, lambda _, __: b"", target)
        if principal is None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            return
        if destination is None:
            await self._refused(tunnel, sock, client, "it was not redirected here (no original "
                                "destination), and the transparent listener serves only what "
                                "the sandbox's nftables rules send it")
            return
        ip = destination[0]
        host, early = str(ip), b""
        address: IPAddress | None = ip
        pinned: IPAddress | None = None
        guard = principal.guard
        if not guard.judge_address(None, ip, destination[1], client)[0].allowed and \
                not guard.on_own_host(ip, destination[1]):  # (judged by its address alone)
            early, sniffed, cut_short = await tunnel.peek()
            if sniffed is None:  # silent, cut short or evicted: nothing to judge it by
                await self._refused(tunnel, sock, client, f"no rule allows {target} by address, "
                                    "and the client's first bytes named no server: "
                                    f"{cut_short or SENT_NOTHING}", target)
                return
            if sniffed.name and _is_name(sniffed.name):
                host, address, pinned = sniffed.name, None, ip
        self.acceptor.settled()  # (not before the peek: a silent client stays evictable)
        opened = await tunnel.open(host, destination[1], address, pinned)
        if not isinstance(opened, Opened):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
            return
        await tunnel.run(early)

    async def _refused(self, tunnel: Tunnel, sock: socket.socket, client: str, why: str,
                       target: str | None = None) -> None:
        """Record a connection (to `target`, when it was redirected) refused before any rule
        could judge it, and reset it."""
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET_ON_CLOSE)
        await self.refuse(tunnel, f"{self.refused_named}: {why}", client, lambda _: b"", target)


def _is_name(claimed: str) -> bool:
    """Is the SNI or Host a name (not an address in some encoding, nor unreadable)? Only a
    name can stand for the address the agent chose; anything else is judged by address."""
    if claimed == UNVERIFIABLE:
        return False
    try:
        return parse_host(claimed).name is not None
    except InvalidHostError:
        return False
