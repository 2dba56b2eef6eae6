"""SOCKS5 listener: the RFC 1928/1929 handshake, then the shared connect pipeline.

`SocksListener` accepts through `stream.acceptor.Acceptor`, runs the sans-I/O
`protocol.SocksServer` until it yields a `ConnectRequest` (under the handshake deadline), hands
the target to a `stream.tunnel.Tunnel` and maps its outcome to a SOCKS reply. Everything else,
judging, recording, connecting, the first bytes and the relay, is the tunnel's and the guard's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from guardd.errors import SocksAuthError, SocksProtocolError
from guardd.guard import SOCKS_LISTENER, Guard
from guardd.ratelimit import AuthThrottle
from guardd.socks.protocol import NEED_DATA, ConnectRequest, Reply, SocksServer
from guardd.stream.deadlines import Deadlines
from guardd.stream.listener import ProxyListener, ProxySettings
from guardd.stream.reactor import Reactor
from guardd.stream.socket_io import SocketIO
from guardd.stream.tunnel import Failure, Opened, Resolver, Tunnel

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

    def __init__(self, guard: Guard, resolver: Resolver, settings: ProxySettings,
                 client_allowed: Callable[[str], bool], deadlines: Deadlines,
                 reactor: Reactor) -> None:
        super().__init__(guard, resolver, settings, client_allowed, deadlines, reactor)
        self.auth_failures = AuthThrottle()

    async def handle(self, io: SocketIO, tunnels: list[Tunnel], client: str, port: int
                     ) -> None:
        tunnel = tunnels[-1]
        protocol = SocksServer(self.settings.users or None)
        try:
            request = await self._handshake(io, protocol, client)
        except SocksAuthError as exc:
            await self.refuse(tunnel, self._authentication_failed(client, exc), client,
                              lambda _: protocol.data_to_send())
            return
        except SocksProtocolError as exc:
            log.debug("socks protocol error from %s: %s", client, exc)
            await self.refuse(tunnel, f"SOCKS request refused: {exc}", client,
                              lambda _: protocol.data_to_send())
            return
        self.acceptor.settled()
        opened = await tunnel.open(request.host, request.port, request.address)
        if not isinstance(opened, Opened):
            await tunnel.send_quietly(protocol.reply(_REPLIES[opened.failure]))
            return
        await io.send(protocol.reply(Reply.SUCCEEDED, *opened.local))
        await tunnel.run(protocol.trailing_data)

    def _authentication_failed(self, client: str, exc: SocksAuthError) -> str:
        """Why an RFC 1929 login is refused (to record); a failed check locks the client out
        for a while that grows with its recent failures (`AuthThrottle`), so guessing passwords
        costs time however many connections the guesser opens."""
        self.guard.metrics.socks_auth_failures()
        why = f"authentication failed: {exc}"
        if exc.checked:
            failures, locked = self.auth_failures.failed(client, self.loop.time())
            if failures in (1, 10, 100, 1000):
                log.warning("socks authentication failed for %s: %s (%d failures from it in "
                            "the last %.0fs; its logins are refused for %.1fs)", client, exc,
                            failures, AuthThrottle.WINDOW, locked)
        return why

    async def _handshake(self, io: SocketIO, protocol: SocksServer, client: str
                         ) -> ConnectRequest:
        while True:
            locked = self.auth_failures.locked(client, self.loop.time())
            protocol.logins_refused = f"failed logins lock this client out for {locked:.1f}s " \
                "more" if locked else ""
            event = protocol.next_event()
            pending = protocol.data_to_send()
            if pending:
                await io.send(pending)
            if event is not NEED_DATA:
                return event  # type: ignore[return-value]
            data = await io.receive()
            if not data:
                raise ConnectionResetError("client closed during the handshake")
            protocol.receive_data(data)
