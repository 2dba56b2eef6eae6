"""What every proxy listener (SOCKS5, HTTP) shares: settings, the acceptor, the tunnel per
connection, and how a connection's task ends, whatever ends it.

A listener subclasses `ProxyListener` with its protocol alone (`name`, `handle`): the handshake
or request head, the target it hands to `Tunnel.open`, and its protocol's answers. Everything
else is here: bind, caps, drain (`Acceptor`), a `SocketIO` per connection, the phase gauge, and
the ending of every connection's task: a trail that cannot be written closes the connection
unanswered, a deadline cuts it, a client that goes away ends it, and a bug costs that one
connection, never the listener.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from guardd.addr import counted_as
from guardd.errors import AuditUnavailableError
from guardd.guard import NOT_A_CLIENT, Verdict
from guardd.net import Endpoint
from guardd.principals import UNMAPPED, Principal, Principals
from guardd.ratelimit import AuthThrottle
from guardd.shares import CpuShares
from guardd.stream.acceptor import Acceptor
from guardd.stream.deadlines import Deadlines
from guardd.stream.memory import Overdrawn
from guardd.stream.reactor import Owner, Reactor
from guardd.stream.socket_io import SocketIO
from guardd.stream.tunnel import Phase, Tunnel, TunnelSettings
from guardd.turns import Turns


#: A proxy login: the user, and the password it logged in with.
Login = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ProxySettings:
    tunnel: TunnelSettings = TunnelSettings()
    max_connections: int = 1024
    #: Connections one client address may hold at once, so one client cannot take every slot.
    max_connections_per_client: int = 256
    #: Users and their passwords (none: no login asked).
    users: dict[str, str] = field(default_factory=dict)
    #: Every client's CPU share and its turns at it (`turns`): one for all listeners.
    turns: Turns = field(default_factory=lambda: Turns(CpuShares()))
    #: Failed logins and lockouts: one for all listeners, so that a user of two is guessed
    #: no faster than a user of one (attack pass: locked out on one, checked on the other).
    logins: AuthThrottle = field(default_factory=AuthThrottle)
    #: The clients found over their buffer budget lately, on probation: one for all listeners.
    overdrawn: Overdrawn = field(default_factory=Overdrawn)


class ProxyListener:
    """A proxy listener: accepts, and runs `handle` for each connection in a task."""

    #: The listener's name in records and metrics.
    name = ""
    #: What a connection refused at accept is told (why, its record's number), if anything.
    refused_answer: Callable[[str, int | None], bytes] | None = None
    #: Where a connection refused at accept was going, for its record (None: unknown).
    refused_target: Callable[[socket.socket], str | None] | None = None
    #: How its records of a refused request begin.
    refused_named = "connection refused"
    #: What the handshake reads, for the record of one cut at its deadline (a listener that
    #: reads none, the transparent one, never cuts one).
    handshake_named = "handshake"
    #: What a client whose handshake its deadline cut is told (why, the record's number), if
    #: anything (a SOCKS request has no reply before it is whole).
    timed_out_answer: Callable[[str, int | None], bytes] | None = None

    def __init__(self, principals: Principals, settings: ProxySettings,
                 client_allowed: Callable[[str], bool], deadlines: Deadlines,
                 reactor: Reactor) -> None:
        self.principals = principals
        #: What is refused before a client is known (the acceptor's refusals, a failed login,
        #: a client no principal claims) is recorded by the guard of nobody.
        guard = self.guard = principals.nobody
        self.settings = settings
        self.deadlines = deadlines
        self.reactor = reactor
        self.loop = reactor.loop
        self.log = logging.getLogger(f"guardd.{self.name}")
        self.acceptor = Acceptor(guard, self.name, self._serve, client_allowed,
                                 settings.max_connections, settings.max_connections_per_client,
                                 deadlines, type(self).refused_answer,
                                 settings.turns.shares, type(self).refused_target,
                                 settings.overdrawn)
        self._phases = guard.metrics.connections.cells(self.name,
                                                       states=[p.value for p in Phase])
        #: Each connection's task and its tunnels (the last one open), while it is served.
        self._live: dict[asyncio.Task[None], list[Tunnel]] = {}
        #: The login of each connection (None: no login), once its principal is known.
        self._logins: dict[asyncio.Task[None], Login | None] = {}
        self._count_auth_failure = guard.metrics.auth_failures.counter(self.name)
        self._count_wait = guard.metrics.cpu_share_waits.counter(self.name)

    def _login(self, client: str, user: str | None) -> str:
        """What failed logins are counted by: the address and the user tried (every name that
        is no user counts as one, so that guessing names costs as much as guessing passwords),
        so that an agent's own mistakes do not lock out the other users at its address (one
        that tries another's name still can: agents that must not, get addresses apart)."""
        return f"{counted_as(client)} {user if user in self.settings.users else ''}"

    def locked_out(self, client: str, user: str | None) -> str:
        """Why a login of `client` as `user` is not checked now, naming the user tried (attack
        pass 11: the trail could not tell which account was under attack); "" when it is."""
        locked = self.settings.logins.locked(self._login(client, user), self.loop.time())
        return f"failed logins lock this client out as {user!r} for {locked:.1f}s more" \
            if locked else ""

    def login_failed(self, client: str, user: str | None, why: str, checked: bool = True
                     ) -> str:
        """Why a login is refused (to record). A failed check (`checked`: a password was
        compared) locks the client's logins as that user out for a while that grows with
        their recent failures (`AuthThrottle`), so guessing passwords costs time however many
        connections the guesser opens."""
        self._count_auth_failure()
        why = f"authentication failed: {why}"
        if checked:
            failures, locked = self.settings.logins.failed(self._login(client, user),
                                                         self.loop.time())
            if failures in (1, 10, 100, 1000):
                self.log.warning("%s authentication failed for %s: %s (%d failures from it in "
                                 "a row, each within %.0fs of the last; its logins are refused "
                                 "for %.1fs)", self.name, client, why, failures,
                                 AuthThrottle.WINDOW, locked)
        return why

    def listen(self, endpoint: Endpoint) -> Endpoint:
        return self.acceptor.listen(endpoint)

    def close(self) -> None:
        self.acceptor.close()

    async def drain(self, timeout: float) -> None:
        await self.acceptor.drain(timeout)

    def tunnel(self, io: SocketIO, client: str, port: int, after: Tunnel | None = None
               ) -> Tunnel:
        """A tunnel for one target of the connection from `client`:`port`: nobody's until
        `act_for` says whose it is (it may only refuse, and its records name no principal),
        or for a further target the same principal's as the tunnel it comes `after`."""
        tunnel = Tunnel(self.guard, self.principals.default.dns, io, self.settings.tunnel,
                        self.deadlines, self.name, client, self._phases, port,
                        share=self.settings.turns.share(counted_as(client), self._count_wait))
        if after is not None:
            tunnel.guard, tunnel.resolver, tunnel.account, tunnel.user, tunnel.charged = (
                after.guard, after.resolver, after.account, after.user, after.charged)
        return tunnel

    async def act_for(self, tunnel: Tunnel, client: str, login: Login | None,
                      answer: Callable[[str, int | None], bytes], target: str | None = None
                      ) -> Principal | None:
        """Whose policy judges what `client` (logged in with `login`, if it did) asks (`target`,
        when the listener knows it): its tunnel is that principal's from now. None when it is
        nobody's (`unmapped: refuse`), or when a reload during the handshake took its address
        out of `clients` or changed its login: refused, recorded (with the user it logged in
        as, and `target`: attack pass, 2026-12-06), and told (`answer(why, record number)`)."""
        tunnel.handshake_over()
        user = login[0] if login is not None else None
        why = self._stale(client, login)
        by_login = self.principals.of_login(self.name, user) if user and not why else None
        principal = by_login or (None if why else self.principals.of(client))
        if principal is None:
            why = why or UNMAPPED
            tunnel.user = user
            await self.refuse(tunnel, why, client, lambda number: answer(why, number), target)
            return None
        tunnel.guard, tunnel.resolver, tunnel.user = principal.guard, principal.dns, user
        tunnel.account = self.principals.account(client, by_login, user)
        task = asyncio.current_task(self.loop)  # (given the loop: no getpid(2))
        if task in self._live:
            self._logins[task] = login
        return principal

    def _stale(self, client: str, login: Login | None) -> str:
        """Why a connection may not go on as it logged in ("": it may): since it was accepted
        (a reload), its address left `clients`, its user or password changed, or logins are
        asked where none was."""
        if not self.acceptor.client_allowed(client):
            return NOT_A_CLIENT
        users = self.settings.users
        if login is None:
            return "a login is asked now (proxy users were configured by a reload)" \
                if users else ""
        user, password = login
        if user not in users or not hmac.compare_digest(users[user].encode(),
                                                        password.encode()):
            return f"user {user!r} is no longer configured, or its password changed (reload)"
        return ""

    async def handle(self, io: SocketIO, tunnels: list[Tunnel], client: str, port: int
                     ) -> None:
        """The protocol: serve the connection, in `tunnels[-1]` (replaced by a new one for each
        further target; the last one is closed when the connection ends)."""
        raise NotImplementedError

    async def _serve(self, conn: socket.socket, client: str, port: int) -> None:
        try:
            io = SocketIO(self.reactor, conn, Owner(self.name, client))
        except OSError as exc:  # the kernel will not watch one more socket (max_user_watches)
            self.guard.commit(self.guard.refusal(
                self.name, f"connection refused: guardd cannot watch it ({exc})"), client)
            return
        tunnels = [self.tunnel(io, client, port)]
        task = asyncio.current_task(self.loop)  # (given the loop: no getpid(2))
        assert task is not None
        self._live[task] = tunnels
        ended: BaseException | None = None
        started = None
        try:
            tunnels[0].enter(Phase.HANDSHAKE)
            started = await tunnels[0].pace()
            await self.handle(io, tunnels, client, port)
        except AuditUnavailableError as exc:  # logged by the audit writer, once an outage
            ended = exc
            self.log.debug("%s connection from %s closed unanswered: %s", self.name, client,
                           exc)
        except asyncio.CancelledError as exc:
            ended = exc
            if not self.deadlines.expired():
                raise
            phase = tunnels[-1].phase
            self.log.debug("%s connection from %s cut while %s: timed out", self.name, client,
                           phase.value if phase else "closing")
            if phase is Phase.HANDSHAKE and tunnels[-1].began and \
                    self.acceptor.in_handshake(task):
                await self._handshake_timed_out(tunnels[-1], client)
        except (ConnectionError, OSError) as exc:
            ended = exc
            self.log.debug("%s connection from %s ended: %s", self.name, client, exc)
        except Exception as exc:  # noqa: BLE001 - one connection must never take the listener down
            ended = exc
            self.log.exception("%s connection from %s failed", self.name, client)
        finally:
            self._live.pop(task, None)  # (gone already when a reload closed it)
            self._logins.pop(task, None)
            tunnels[-1].close(ended)
            if started is not None:
                tunnels[-1].handled(started)

    async def _handshake_timed_out(self, tunnel: Tunnel, client: str) -> None:
        """Record a handshake begun that its deadline cut, a refusal of guardd's, and tell the
        client (`timed_out_answer`): the new user's walk-through (session 60) met an HTTP head
        too slow to come closed with no answer and no record. (One never begun asked nothing,
        a preconnect's say: closed without a word or a record.)"""
        why = (f"{self.refused_named}: timed out: the {self.handshake_named} was not read "
               f"whole within {tunnel.settings.handshake_timeout:g} s (socksTimeout.handshake)")
        told = type(self).timed_out_answer
        await self.refuse(tunnel, why, client,
                          lambda number: told(why, number) if told is not None else b"")

    def policy_changed(self) -> int:
        """After a reload: close every connection the new policy would not open, or whose
        client is now another principal (or nobody's, or logged in as a user no longer
        configured), each recorded with why; how many. The others go on (what they ask next
        is judged under the new policy)."""
        closed = 0
        for task, tunnels in list(self._live.items()):
            tunnel = tunnels[-1]
            verdict = self._moved(task, tunnel) or tunnel.rejudged()
            if verdict is not None:
                self._close(task, tunnel, verdict)
                closed += 1
        return closed

    def live(self) -> Iterator[tuple[asyncio.Task[None], Tunnel]]:
        """Each connection served now, and its tunnel open now."""
        for task, tunnels in self._live.items():
            yield task, tunnels[-1]

    def cut(self, task: asyncio.Task[None], why: str) -> None:
        """Close the connection `task` serves with a reset, recorded with `why` (`memory`)."""
        tunnel = self._live[task][-1]
        self.log.warning("client %s: a connection %s", tunnel.client, why)
        tunnel.cut()
        target = tunnel.connect.target if tunnel.connect is not None else None
        self._close(task, tunnel, tunnel.guard.refusal(self.name, why, target=target,
                                                       user=tunnel.user))

    def _close(self, task: asyncio.Task[None], tunnel: Tunnel, verdict: Verdict) -> None:
        """Record `verdict` for the connection `task` serves, and end it."""
        self.guard.commit(verdict, tunnel.client, went_out=tunnel.take_went_out())
        del self._live[task]  # (closed once, however many reloads or cuts come first)
        task.cancel()

    def _moved(self, task: asyncio.Task[None], tunnel: Tunnel) -> Verdict | None:
        """The refusal that closes a connection whose client a reload made another principal
        (or nobody), or another account of its principal's (`Principals.account`: its
        address's or its login's; review: kept open, the connection went on spending the old
        one while new ones spent the new); None when it is still the principal and account
        it acts for, or not known yet."""
        if task not in self._logins:
            return None
        login = self._logins[task]
        stale = self._stale(tunnel.client, login)
        if stale:
            why = f"closed: {stale}"
        else:
            user = login[0] if login is not None else None
            by_login = self.principals.of_login(self.name, user) if user else None
            principal = by_login or self.principals.of(tunnel.client)
            if principal is None or principal.guard is not tunnel.guard:
                why = "closed: the reload made the client " + (
                    f"principal {principal.name}" if principal else "no principal's")
            elif self.principals.account(tunnel.client, by_login, user) != tunnel.account:
                why = ("closed: the reload changed whose rate limits and tunnel budget it "
                       "spends (its address's or its login's)")
            else:
                return None
        target = tunnel.connect.target if tunnel.connect is not None else None
        return tunnel.guard.refusal(self.name, why, target=target, user=tunnel.user)

    async def refuse(self, tunnel: Tunnel, why: str, client: str,
                     answer: Callable[[int | None], bytes], target: str | None = None) -> None:
        """Record a request refused before any rule could judge it (as its principal's, once
        known; to `target`, if known), then tell the client (`answer` from the record's number;
        not when the record cannot be written)."""
        tunnel.handshake_over()
        self.deadlines.clear()
        guard = tunnel.guard
        try:
            number = guard.committed(guard.refusal(self.name, why, target=target,
                                                   user=tunnel.user), client)
        except AuditUnavailableError:
            return
        await tunnel.send_quietly(answer(number))
