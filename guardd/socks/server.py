"""SOCKS5 listener: the RFC 1928/1929 handshake, then the shared connect pipeline.

`SocksListener` accepts through `stream.acceptor.Acceptor`, runs the sans-I/O
`protocol.SocksServer` until it yields a `ConnectRequest` (under the handshake deadline), hands
the target to a `stream.tunnel.Tunnel` and maps its outcome to a SOCKS reply. Everything else,
judging, recording, connecting, the first bytes and the relay, is the tunnel's and the guard's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from guardd.errors import AuditUnavailableError, SocksAuthError, SocksProtocolError
from guardd.guard import SOCKS_LISTENER, Guard, Verdict
from guardd.net import Endpoint
from guardd.ratelimit import AuthThrottle
from guardd.socks.protocol import NEED_DATA, ConnectRequest, Reply, SocksServer
from guardd.stream.acceptor import Acceptor
from guardd.stream.deadlines import Deadlines
from guardd.stream.reactor import Reactor
from guardd.stream.socket_io import SocketIO
from guardd.stream.tunnel import Failure, Opened, Phase, Resolver, Tunnel, TunnelSettings

log = logging.getLogger("guardd.socks")

_REPLIES = {Failure.DENIED: Reply.NOT_ALLOWED,
            Failure.INVALID_HOST: Reply.HOST_UNREACHABLE,
            Failure.NO_ADDRESS: Reply.HOST_UNREACHABLE,
            Failure.NETWORK_UNREACHABLE: Reply.NETWORK_UNREACHABLE,
            Failure.HOST_UNREACHABLE: Reply.HOST_UNREACHABLE,
            Failure.CONNECTION_REFUSED: Reply.CONNECTION_REFUSED,
            Failure.TIMED_OUT: Reply.TTL_EXPIRED,
            Failure.FAILED: Reply.GENERAL_FAILURE}


@dataclass(frozen=True, slots=True)
class SocksSettings:
    tunnel: TunnelSettings = TunnelSettings()
    max_connections: int = 1024
    #: Connections one client address may hold at once, so one client cannot take every slot.
    max_connections_per_client: int = 256
    users: dict[str, str] = field(default_factory=dict)


class SocksListener:
    """Serves SOCKS5 clients: handshake, then a tunnel each."""

    def __init__(self, guard: Guard, resolver: Resolver, settings: SocksSettings,
                 client_allowed: Callable[[str], bool], deadlines: Deadlines,
                 reactor: Reactor) -> None:
        self.guard = guard
        self.resolver = resolver
        self.settings = settings
        self.loop = reactor.loop
        self.deadlines = deadlines
        self.reactor = reactor
        self.auth_failures = AuthThrottle()
        self.acceptor = Acceptor(guard, SOCKS_LISTENER, self._serve, client_allowed,
                                 settings.max_connections, settings.max_connections_per_client,
                                 deadlines)
        self._phases = guard.metrics.connections.cells(SOCKS_LISTENER,
                                                       states=[p.value for p in Phase])

    def listen(self, endpoint: Endpoint) -> Endpoint:
        return self.acceptor.listen(endpoint)

    def close(self) -> None:
        self.acceptor.close()

    async def drain(self, timeout: float) -> None:
        await self.acceptor.drain(timeout)

    async def _serve(self, conn: socket.socket, client: str, port: int) -> None:
        try:
            io = SocketIO(self.reactor, conn)
        except OSError as exc:  # the kernel will not watch one more socket (max_user_watches)
            self.guard.commit(self.guard.refusal(
                SOCKS_LISTENER, f"connection refused: guardd cannot watch it ({exc})"), client)
            return
        tunnel = Tunnel(self.guard, self.resolver, io, self.settings.tunnel, self.deadlines,
                        SOCKS_LISTENER, client, self._phases, port)
        protocol = SocksServer(self.settings.users or None)
        ended: BaseException | None = None
        try:
            tunnel.enter(Phase.HANDSHAKE)
            request = await self._handshake(io, protocol, client)
            self.acceptor.settled()
            opened = await tunnel.open(request.host, request.port, request.address)
            if not isinstance(opened, Opened):
                await tunnel.send_quietly(protocol.reply(_REPLIES[opened.failure]))
                return
            await io.send(protocol.reply(Reply.SUCCEEDED, *opened.local))
            await tunnel.run(protocol.trailing_data)
        except SocksAuthError as exc:
            self.deadlines.clear()
            await self._refuse(tunnel, self._authentication_failed(client, exc), client,
                               protocol.data_to_send())
        except SocksProtocolError as exc:
            self.deadlines.clear()
            log.debug("socks protocol error from %s: %s", client, exc)
            await self._refuse(tunnel, self.guard.refusal(
                SOCKS_LISTENER, f"SOCKS request refused: {exc}"), client,
                protocol.data_to_send())
        except AuditUnavailableError as exc:  # logged by the audit writer, once an outage
            ended = exc
            log.debug("socks connection from %s closed unanswered: %s", client, exc)
        except asyncio.CancelledError as exc:
            ended = exc
            if not self.deadlines.expired():
                raise
            log.debug("socks connection from %s cut while %s: timed out", client,
                      tunnel.phase.value if tunnel.phase else "closing")
        except (ConnectionError, OSError) as exc:
            ended = exc
            log.debug("socks connection from %s ended: %s", client, exc)
        except Exception as exc:  # noqa: BLE001 - one connection must never take the listener down
            ended = exc
            log.exception("socks connection from %s failed", client)
        finally:
            tunnel.close(ended)

    async def _refuse(self, tunnel: Tunnel, verdict: Verdict, client: str, reply: bytes
                      ) -> None:
        """Record a refusal, then tell the client (not when the record cannot be written)."""
        try:
            self.guard.committed(verdict, client)
        except AuditUnavailableError:
            return
        await tunnel.send_quietly(reply)

    def _authentication_failed(self, client: str, exc: SocksAuthError) -> Verdict:
        """Record a refused RFC 1929 login; a failed check locks the client out for a while
        that grows with its recent failures (`AuthThrottle`), so guessing passwords costs time
        however many connections the guesser opens."""
        self.guard.metrics.socks_auth_failures()
        verdict = self.guard.refusal(SOCKS_LISTENER, f"authentication failed: {exc}")
        if exc.checked:
            failures, locked = self.auth_failures.failed(client, self.loop.time())
            if failures in (1, 10, 100, 1000):
                log.warning("socks authentication failed for %s: %s (%d failures from it in "
                            "the last %.0fs; its logins are refused for %.1fs)", client, exc,
                            failures, AuthThrottle.WINDOW, locked)
        return verdict

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
