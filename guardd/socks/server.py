"""SOCKS5 listener: the RFC 1928/1929 handshake, then the shared connect pipeline.

`SocksListener` accepts through `stream.acceptor.Acceptor`, runs the sans-I/O
`protocol.SocksServer` until it yields a `ConnectRequest` (under the handshake deadline), hands
the target to a `stream.tunnel.Tunnel` and maps its outcome to a SOCKS reply. Everything else,
judging, recording, connecting, the first bytes and the relay, is the tunnel's and the guard's.
"""

from __future__ import annotations

import logging

from guardd.errors import SocksAuthError, SocksProtocolError
from guardd.guard import SOCKS_LISTENER
from guardd.net import hostport
from guardd.socks.protocol import NEED_DATA, ConnectRequest, Reply, SocksServer
from guardd.stream.listener import ProxyListener
from guardd.stream.socket_io import SocketIO
from guardd.stream.tunnel import Failure, Opened, Tunnel

log = logging.getLogger("guardd.socks")

_REPLIES = {Failure.DENIED: Reply.NOT_ALLOWED,
            Failure.INVALID_HOST: Reply.HOST_UNREACHABLE,
            Failure.NO_ADDRESS: Reply.HOST_UNREACHABLE,
            Failure.NETWORK_UNREACHABLE: Reply.NETWORK_UNREACHABLE,
            Failure.HOST_UNREACHABLE: Reply.HOST_UNREACHABLE,
            Failure.CONNECTION_REFUSED: Reply.CONNECTION_REFUSED,
            Failure.TIMED_OUT: Reply.TTL_EXPIRED,
            Failure.FAILED: Reply.GENERAL_FAILURE}


class SocksListener(ProxyListener):
    """Serves SOCKS5 clients: handshake, then a tunnel each."""

    name = SOCKS_LISTENER
    refused_named = "SOCKS request refused"
    handshake_named = "SOCKS handshake"

    async def handle(self, io: SocketIO, tunnels: list[Tunnel], client: str, port: int
                     ) -> None:
        tunnel = tunnels[-1]
        protocol = SocksServer(self.settings.users)
        try:
            request = await self._handshake(tunnel, protocol, client)
        except SocksAuthError as exc:
            await self.refuse(tunnel, self.login_failed(client, protocol.tried, str(exc),
                                                        exc.checked), client,
                              lambda _: protocol.data_to_send())
            return
        except SocksProtocolError as exc:
            log.debug("socks protocol error from %s: %s", client, exc)
            await self.refuse(tunnel, f"{self.refused_named}: {exc}", client,
                              lambda _: protocol.data_to_send(), exc.target)
            return
        self.acceptor.settled()
        login = (request.user, protocol.password or "") if request.user is not None else None
        if await self.act_for(tunnel, client, login,
                              lambda _, __: protocol.reply(Reply.NOT_ALLOWED),
                              hostport(request.host, request.port)) is None:
            return
        opened = await tunnel.open(request.host, request.port, request.address)
        if not isinstance(opened, Opened):
            await tunnel.send_quietly(protocol.reply(_REPLIES[opened.failure]))
            return
        await io.send(protocol.reply(Reply.SUCCEEDED, *opened.local))
        await tunnel.run(protocol.trailing_data)

    async def _handshake(self, tunnel: Tunnel, protocol: SocksServer, client: str
                         ) -> ConnectRequest:
        protocol.login_lock = lambda user: self.locked_out(client, user)
        while True:
            event = protocol.next_event()
            pending = protocol.data_to_send()
            if pending:
                await tunnel.io.send(pending)
            if event is not NEED_DATA:
                return event
            data = await tunnel.handshake_bytes()  # (each read charged to the client)
            if not data:
                raise ConnectionResetError("client closed during the handshake")
            protocol.receive_data(data)
