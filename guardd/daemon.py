"""Wiring: build every object from a `Config`, start the listeners, handle signals.

Start-up order matters: the policy, audit trail and upstreams are checked before anything binds,
so a bad setting fails fast with one clear line. SIGHUP reloads the policy (a broken file keeps
the old one); SIGTERM and SIGINT close the listeners, let answers in flight go out, flush the
audit trail and exit.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import ipaddress
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from guardd import systemd
from guardd.addr import (count_as_one, count_host_as_loopback, counted_as, on_host,
                         translate_through)
from guardd.audit import LOADED_AT_START, AuditWriter, Mirror
from guardd.config import DEFAULT_PRINCIPAL, Config, file_key, resolve_upstreams
from guardd.dns.cache import AnswerCache
from guardd.dns.resolver import UPSTREAM_SOCKETS, Reason, UpstreamResolver
from guardd.dns.server import TCP_MAX_CONNECTIONS, DNSService, InFlight, TCPListener, UDPListener
from guardd.errors import BindError, GuarddError, PolicyError, PolicyTestsFailed
from guardd.guard import HTTP_LISTENER, SOCKS_LISTENER, Guard
from guardd.metrics import Metrics
from guardd.metrics_server import MAX_CONNECTIONS as METRICS_CONNECTIONS
from guardd.metrics_server import MetricsServer
from guardd.net import (DESCRIPTORS_PER_CONNECTION, Endpoint, bind_pair, bind_socket,
                        connections_within, descriptor_limit)
from guardd.policy.engine import Policy
from guardd.ports import ephemeral_ports, tw_reuse
from guardd.principals import Principal, PrincipalMap, Principals
from guardd.ratelimit import AuthThrottle
from guardd.shares import CpuShares
from guardd.stream.deadlines import Deadlines
from guardd.stream.memory import SWEEP_INTERVAL, Overdrawn, Progress, over_budget
from guardd.turns import Turns
from guardd.watch import READ_DIFFERENTLY, FileWatch, Stamp

if TYPE_CHECKING:
    from guardd.stream.listener import ProxyListener
    from guardd.stream.reactor import Owner, Reactor

log = logging.getLogger("guardd")
T = TypeVar("T")

#: Seconds between two looks at the policy's files (`--watch`).
WATCH_INTERVAL = 1.0
#: Client addresses whose admission is kept (see `Daemon.client_allowed`).
_MAX_CLIENTS_SEEN = 4096
#: How long what is still under way at the drain's end has to record its cut, once cancelled.
_CUT_GRACE = 1.0
#: What a reload takes from the daemon config read again (the rest needs a restart).
RELOADED = ("policy", "principals", "unmapped", "clients", "socks_users", "http_users")
_FIELDS = tuple(f.name for f in fields(Config))


class _UpstreamMetrics:
    """Feeds the resolver's observations into the metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def upstream_latency(self, seconds: float) -> None:
        self._metrics.dns_upstream_seconds.observe(seconds)

    def upstream_error(self, reason: Reason) -> None:
        self._metrics.dns_upstream_errors.labels(reason.value).inc()


def _shrunk(room: int, total: int, want: int, per_client: int) -> tuple[int, int]:
    """A listener's cap of `want` connections and a client's of `per_client`, each shrunk to
    its share of `room` for all `total` (never below one, a client's never above its
    listener's)."""
    most = max(1, room * want // total)
    return most, min(most, max(1, room * per_client // total))


@dataclass
class Daemon:
    config: Config
    #: The daemon config file (None: flags alone), and how to build the config again from it
    #: and the flags at a reload.
    config_file: Path | None = None
    reread: Callable[[], Config] | None = None
    #: The config file's stamp taken before it was read (`--watch` starts from it: session
    #: 57's last attack, an edit between the read and the watch's start was never loaded).
    config_seen: Stamp = None
    metrics: Metrics = field(default_factory=Metrics)
    _servers: list[asyncio.AbstractServer] = field(default_factory=list)
    _udp: list[asyncio.DatagramTransport] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    #: The proxy listeners (SOCKS5, HTTP): bound, closed and drained alike.
    _proxies: list[ProxyListener] = field(default_factory=list)
    _reactor: Reactor | None = None
    #: The clients found over their buffer budget lately (`_sweep_memory`), on probation on
    #: every proxy listener.
    _overdrawn: Overdrawn = field(default_factory=Overdrawn)
    #: What each proxied connection's ends had taken at the last sweep (`_sweep_memory`), by
    #: the task that serves it.
    _progress: Progress[asyncio.Task[None]] = field(default_factory=Progress)
    #: Every client's CPU share, whichever listener it works through, and its turns at it.
    _shares: CpuShares = field(default_factory=CpuShares)
    #: Every principal's DNS service's forwards in flight, one count (`dns.server.InFlight`).
    _in_flight: InFlight = field(default_factory=InFlight)
    _turns: Turns = field(init=False)
    #: Whether the client networks hold an address (`client_allowed`), until a reload.
    _clients_seen: dict[str, bool] = field(default_factory=dict)
    _file_watch: FileWatch | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    #: The DNS adapters (UDP per socket, TCP): a reload may give them another service.
    _dns_listeners: list[UDPListener | TCPListener] = field(default_factory=list)
    #: The reload under way (`reload`), and whether another was asked for meanwhile.
    _reloading: asyncio.Task[None] | None = None
    _reload_again: bool = False

    def _load_policies(self, config: Config) -> dict[str, Policy]:
        """Every principal's policy file (the default's first), loaded, its own tests passed: a
        policy whose tests fail is refused at start as at a reload, and one refused keeps them
        all as they were."""
        policies = {}
        for name, path in config.policy_files.items():
            policy = policies[name] = Policy.from_file(path)
            failures = policy.failed_tests()
            if failures:
                raise PolicyTestsFailed(failures, policy.files)
        return policies

    def _in_force(self, policies: dict[str, Policy]) -> None:
        """The metrics of the policies put in force (not of a reload refused after its read:
        re-attack of attack pass 49)."""
        self.metrics.policy_rules.set(len(policies[DEFAULT_PRINCIPAL].rules))
        self.metrics.policy_loaded.set(time.time())

    async def start(self) -> None:
        config = self.config
        count_as_one(config.same_client)
        translate_through(config.nat64_prefixes)
        loop = asyncio.get_running_loop()
        policies = self._load_policies(config)
        self._in_force(policies)
        policy = policies[DEFAULT_PRINCIPAL]
        PrincipalMap.from_config(config)  # (it may refuse the config: before the trail opens)
        upstreams = resolve_upstreams(config)
        self.audit = AuditWriter(config.audit_dir, max_bytes=config.audit_max_bytes,
                                 keep=config.audit_keep, min_age=config.audit_min_age,
                                 max_total_bytes=config.audit_size_cap,
                                 checkpoint_interval=config.audit_checkpoint_interval,
                                 anchor=config.audit_anchor,
                                 fail_open=config.audit_fail_open,
                                 sync=config.audit_sync == "batch",
                                 mirror=Mirror(sys.stdout.buffer) if config.audit_stdout
                                 else None)
        self.audit.open()
        self.audit.attach(loop)
        audit = self.audit
        audit.note_policies(LOADED_AT_START, _digests(policies))
        self.metrics.watch_audit(audit)
        self.guard = Guard(policy, self.audit, self.metrics)
        self._read_port_settings()
        count_host_as_loopback(self.guard.host_addresses.holds_source)
        self.guard.upstream_hosts.update((upstream.host, upstream.port) for upstream in upstreams)
        self._resolver = UpstreamResolver(
            upstreams, attempt_timeout=config.upstream_attempt_timeout,
            total_timeout=config.upstream_total_timeout, observer=_UpstreamMetrics(self.metrics))
        self.principals = principals = Principals(
            Principal(DEFAULT_PRINCIPAL, self.guard, self._dns_service(self.guard, None)),
            self._dns_service)
        principals.configure(config, policies)
        self._warn_of_logins_only(config)
        self._warn_of_host_addresses()
        service = principals.dns_service
        shares = self._shares  # (a client's, whichever listener it works through)
        turns = self._turns = Turns(shares)
        deadlines = Deadlines(loop)  # every connection's, one sweep
        tcp_listener = TCPListener(service, self.audit, config.tcp_idle_timeout, deadlines,
                                   shares)
        self._dns_listeners.append(tcp_listener)
        bound: list[str] = []
        for endpoint in config.dns:
            udp_sock, tcp_sock = bind_as(bind_pair, "dns", endpoint)
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: UDPListener(service, audit, turns), sock=udp_sock)
            self._dns_listeners.append(protocol)
            self._udp.append(transport)
            self._servers.append(await loop.create_server(tcp_listener, sock=tcp_sock))
            bound.append(str(Endpoint(endpoint.host, udp_sock.getsockname()[1])))
            self.guard.own_sockets.add((endpoint.host, udp_sock.getsockname()[1]))
        socks_bound, http_bound, transparent_bound = self._start_proxies(deadlines)
        metrics_text = "off"
        if config.metrics is not None:
            sock = bind_as(lambda e: bind_socket(e, socket.SOCK_STREAM, dual_stack=True),
                           "metrics", config.metrics)
            self._servers.append(await MetricsServer(self.metrics.registry, shares).start(sock))
            port = sock.getsockname()[1]
            self.guard.own_sockets.add((config.metrics.host, port))
            metrics_text = str(Endpoint(config.metrics.host, port))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("guardd ready: dns=%s socks=%s metrics=%s http=%s transparent=%s policy=%s "
                 "(%d rules)%s upstreams=%s audit=%s", ",".join(bound),
                 ",".join(socks_bound) or "off", metrics_text, ",".join(http_bound) or "off",
                 ",".join(transparent_bound) or "off", config.policy, len(policy.rules),
                 "".join(f" principal {p.name}={p.policy}" for p in config.principals),
                 ",".join(map(str, upstreams)), config.audit_dir)
        if config.watch:
            self._file_watch = self.file_watch(policies)
            self._tasks.append(loop.create_task(self._watch(self._file_watch)))
        systemd.notify("READY=1", f"STATUS=serving with {len(policy.rules)} rules")
        interval = systemd.watchdog_interval()
        if interval is not None:
            self._watchdog(loop, interval)
        if self._proxies:
            loop.call_later(SWEEP_INTERVAL, self._sweep_memory, loop)

    def _dns_service(self, guard: Guard, refusing: str | None) -> DNSService:
        """A principal's DNS service, with its own cache (answers vetted under its policy); or
        one that refuses every query, saying why (`refusing`)."""
        config = self.config
        if refusing is not None:
            return DNSService(guard, AnswerCache(max_entries=0), self._resolver, self.metrics,
                              _nobody, refusing, in_flight=self._in_flight)
        cache = AnswerCache(max_entries=config.cache_entries, max_ttl=config.cache_max_ttl,
                            negative_max_ttl=config.cache_negative_max_ttl)
        return DNSService(guard, cache, self._resolver, self.metrics, self.client_allowed,
                          shares=self._shares, in_flight=self._in_flight)

    def file_watch(self, policies: dict[str, Policy]) -> FileWatch:
        """`--watch`'s follow of the files the start read, from their state as read: the
        config file's stamp from before its read, the policies' files by what was read."""
        seen = {str(self.config_file): self.config_seen} if self.config_file is not None else {}
        return FileWatch(self._files(policies), _read_digests(policies), seen)

    def _files(self, policies: dict[str, Policy]) -> list[str]:
        """Every file a reload reads: the daemon config's and the policies' (`--watch`)."""
        files = [str(self.config_file)] if self.config_file is not None else []
        files += (path for policy in policies.values() for path in policy.files)
        return list(dict.fromkeys(files))

    def _watchdog(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        """Ping systemd's watchdog from the event loop itself: a loop that stops turning stops
        the pings, and systemd restarts the service."""
        systemd.notify("WATCHDOG=1")
        loop.call_later(interval, self._watchdog, loop, interval)

    def _sweep_memory(self, loop: asyncio.AbstractEventLoop) -> None:
        """Cut the connections that take a client past what it may hold in guardd's buffers
        (`stream.memory`), every `SWEEP_INTERVAL` for as long as guardd runs."""
        reactor = self._reactor
        assert reactor is not None, "proxies run"
        try:
            progress = self._progress
            held: list[tuple[Callable[[str], None], str, int, int]] = []
            for proxy in self._proxies:
                for task, tunnel in proxy.live():
                    ways = tunnel.ways()  # (by task: its tunnels, one after another)
                    held.append((functools.partial(proxy.cut, task), counted_as(tunnel.client),
                                 progress.unmoved(task, ways), sum(way.held for way in ways)))
            progress.swept()
            held += [(functools.partial(reactor.cut, fd), counted_as(owner.client), size, size)
                     for fd, owner, size in reactor.closing()]
            cuts = over_budget(held, self.config.max_buffered_per_client)
            for cut in cuts:
                cut.connection(cut.why)
            due = self._overdrawn.swept(cuts)
        except Exception:  # noqa: BLE001 - a failed sweep must not end the sweeps for good
            log.exception("measuring what the proxied connections hold failed")
            due = SWEEP_INTERVAL
        finally:
            loop.call_later(due, self._sweep_memory, loop)

    def _read_port_settings(self) -> None:
        """What the kernel says of guardd's ports (`ports`), at the start and each reload."""
        ports = self.guard.ports
        ports.configure(tw_reuse(), ephemeral_ports())
        config = self.config
        if ports.reuse != 1 and (config.socks or config.http or config.transparent):
            log.info("net.ipv4.tcp_tw_reuse is %d: a client may open %d connections a minute "
                     "to one destination%s (its ports wait out TIME_WAIT; 1 lifts that)",
                     ports.reuse, ports.per_destination,
                     " other than loopback" if ports.reuse == 2 else "")

    def _closing_cut(self, owner: Owner, why: str) -> None:
        """Record and log the reset of a closed connection's socket (`owner`'s) that was still
        sending (`stream.reactor`)."""
        nobody = self.principals.nobody
        nobody.commit(nobody.refusal(owner.listener, why, target=owner.target), owner.client)
        log.warning("client %s: %s (to %s)", owner.client, why, owner.target)

    def _start_proxies(self, deadlines: Deadlines) -> tuple[list[str], list[str], list[str]]:
        """Bind the SOCKS5, HTTP proxy and transparent listeners; what each is bound to."""
        config = self.config
        if not config.socks and not config.http and not config.transparent:
            return [], [], []
        # Imported here: a DNS-only daemon never loads the proxy code.
        from guardd.http.server import HttpListener
        from guardd.socks.server import SocksListener
        from guardd.stream.listener import ProxySettings
        from guardd.stream.reactor import Reactor
        from guardd.stream.tunnel import TunnelSettings
        from guardd.transparent.server import TransparentListener

        tunnel = TunnelSettings(config.socks_handshake_timeout, config.socks_connect_timeout,
                                config.socks_idle_timeout, config.socks_first_bytes_timeout)
        listeners = (
            (SocksListener, config.socks, config.socks_max_connections,
             config.socks_max_connections_per_client, config.socks_users),
            (HttpListener, config.http, config.http_max_connections,
             config.http_max_connections_per_client, config.http_users),
            (TransparentListener, config.transparent, config.transparent_max_connections,
             config.transparent_max_connections_per_client, ()))
        caps = self._connection_caps({kind.name: (most if endpoints else 0, per_client)
                                      for kind, endpoints, most, per_client, _ in listeners})
        # Every proxied socket's readiness; a socket closed with bytes still going for each
        # connection slot (`net.DESCRIPTORS_PER_CONNECTION` counts its descriptor).
        self._reactor = Reactor(asyncio.get_running_loop(),
                                max_closing=sum(most for most, _ in caps.values()),
                                on_cut=self._closing_cut)
        bound: tuple[list[str], list[str], list[str]] = ([], [], [])
        logins = AuthThrottle()  # (one for all: `ProxySettings.logins`)
        for (kind, endpoints, _, _, users), names in zip(listeners, bound):
            if endpoints:
                most, per_client = caps[kind.name]
                proxy = kind(self.principals, ProxySettings(
                    tunnel, most, per_client, dict(users), self._turns, logins,
                    self._overdrawn),
                    self.client_allowed, deadlines, self._reactor)
                self._proxies.append(proxy)
                names.extend(str(bind_as(proxy.listen, proxy.name, endpoint))
                             for endpoint in endpoints)
        self._warn_if_open(config)
        return bound

    def _warn_of_host_addresses(self) -> None:
        """Say so when a principal's network holds an address of guardd's host: a process on
        the host that sends from it is loopback's principal (`addr.on_host`), not that one (a
        sidecar's pod address, a Docker bridge's gateway)."""
        mapping = self.principals.mapping
        loopback = mapping.by_address("127.0.0.1") or "none (refused)"
        try:
            addresses = self.guard.host_addresses.interfaces()
        except OSError as exc:  # (a warning only: it never fails a start or a reload)
            log.warning("cannot list the addresses of guardd's host (%s): principals' networks "
                        "holding one are not told of", exc)
            return
        for address, owner in mapping.apart_from_loopback(addresses):
            log.warning("%s is in the clients of principal %s, but it is an address of guardd's "
                        "own host, which any process there may bind: what comes from it is "
                        "loopback's, principal %s", address, owner, loopback)

    @staticmethod
    def _warn_of_logins_only(config: Config) -> None:
        """Say so when a principal is chosen by proxy login alone: DNS has no login, so its
        agents' own queries are judged by their network's principal."""
        for principal in config.principals:
            if not principal.clients:
                log.warning("principal %s has no client networks, only users: its agents' own "
                            "DNS queries are judged by the principal of their address (%s); "
                            "give it their network too, or have them use socks5h:// (guardd then "
                            "resolves under %s)", principal.name,
                            "or the default's" if config.unmapped == "default" else
                            "or refused", principal.name)

    @staticmethod
    def _connection_caps(wanted: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
        """Each proxy listener's connection cap and a client's (`wanted`, by listener), or
        their share of what the descriptor limit allows beside DNS over TCP, the upstream
        queries, the relays' spare pipes and the metrics endpoint: refused cleanly at accept,
        never a connection that fails halfway for want of a descriptor. A client's cap shrinks
        with its listener's (attack pass, 2026-12-06: left at 256 of a listener cut to 40, one
        agent held every slot)."""
        from guardd.stream.relay import MAX_SPARE_PIPES

        limit = descriptor_limit()
        reserved = TCP_MAX_CONNECTIONS + UPSTREAM_SOCKETS + 2 * MAX_SPARE_PIPES + \
            METRICS_CONNECTIONS + 64
        total = sum(want for want, _ in wanted.values())
        most = connections_within(limit, reserved, total)
        if most >= total:
            caps = {name: (want, min(want, per_client)) for name, (want, per_client)
                    in wanted.items()}
        else:
            caps = {name: _shrunk(most, total, want, per_client) if want else (0, 0)
                    for name, (want, per_client) in wanted.items()}
            Daemon._warn_of_shrunk_caps(wanted, caps, limit, most, total)
        for name, (cap, per_client) in caps.items():
            if 1 < cap <= per_client:  # (attack pass, 2026-12-06: one agent held every slot)
                log.warning("the %s listener lets one client hold all %d of its connections "
                            "(%sMaxConnectionsPerClient: %d): one agent can shut the others "
                            "out; set it below %sMaxConnections", name, cap, name,
                            wanted[name][1], name)
        return caps

    @staticmethod
    def _warn_of_shrunk_caps(wanted: dict[str, tuple[int, int]],
                             caps: dict[str, tuple[int, int]], limit: int, most: int,
                             total: int) -> None:
        """Say what the descriptor limit shrank the caps `wanted` (`total` connections) to
        (`caps`: `most` in all), and why."""
        log.warning("the proxy listeners (%s) are set for %d connections, but the descriptor "
                    "limit (%d) leaves room for %d (%d descriptors each); serving %s: raise "
                    "the limit (LimitNOFILE= in the systemd unit) to serve more",
                    ", ".join(name for name, (want, _) in wanted.items() if want), total,
                    limit, most, DESCRIPTORS_PER_CONNECTION,
                    ", ".join(f"{caps[name][0]} {name} ({caps[name][1]} a client)"
                              for name, (want, _) in wanted.items() if want))

    @staticmethod
    def _warn_if_open(config: Config) -> None:
        """Say so when a proxy listener serves every address that can reach it, without users."""
        world = any(net.prefixlen == 0 for net in config.clients)
        for kind, endpoints, users in (("socks", config.socks, config.socks_users),
                                       ("http", config.http, config.http_users)):
            for endpoint in () if users else endpoints:
                if not ipaddress.ip_address(endpoint.host).is_loopback:
                    log.warning("%s listener %s has no %sUsers: %s who can reach it can use it "
                                "to reach whatever the policy allows (clients: %s); set "
                                "%sUsers or narrow clients", kind, endpoint, kind,
                                "anyone" if world else "every client",
                                ", ".join(map(str, config.clients)), kind)

    def client_allowed(self, client: str) -> bool:
        """Is `client` in the configured client networks? Another address of guardd's host
        than loopback is when its family's loopback address is (`addr.on_host`: a process there
        may bind either), as the host's addresses are now (attack pass 50: kept with the
        answer until a reload, an address the host gave up, and an agent took, stayed a
        client). Asked for every query and connect, so the networks' answers are kept."""
        address = client.partition("%")[0]
        if on_host(client):
            address = "127.0.0.1" if "." in address else "::1"
        allowed = self._clients_seen.get(address)
        if allowed is None:
            try:
                allowed = self.config.client_allowed(ipaddress.ip_address(address))
            except ValueError:
                allowed = False
            if len(self._clients_seen) >= _MAX_CLIENTS_SEEN:
                self._clients_seen.clear()
            self._clients_seen[address] = allowed
        return allowed

    def reload(self) -> asyncio.Task[None]:
        """SIGHUP, `--watch`: a reload (`_reload`) in a task of its own, one at a time; asked
        for during one, another follows it (what changed meanwhile is read)."""
        if self._reloading is None:
            self._reloading = asyncio.get_running_loop().create_task(self._reloads())
        else:
            self._reload_again = True
        return self._reloading

    async def _reloads(self) -> None:
        try:
            self._reload_again = True
            while self._reload_again and not self._stop.is_set():
                self._reload_again = False
                await self._reload()
        finally:
            self._reloading = None

    def _read_again(self) -> tuple[Config, dict[str, Policy]]:
        """The daemon config and every policy, read again (off the loop: attack pass 49, a big
        policy's reading stalled every listener for seconds)."""
        config = self._reloaded(self.reread() if self.reread is not None else self.config)
        return config, self._load_policies(config)

    async def _reload(self) -> None:
        """Read the daemon config and every policy file again; on any error keep serving as
        before. The principals, `unmapped`, `clients` and the proxies' users take effect (what
        else changed is logged: it needs a restart). Open connections the new policies would
        not open, or whose client is now another principal, are closed (and recorded). systemd
        hears READY=1 after it, whatever happened."""
        systemd.reloading()
        watch = self._file_watch
        seen = watch.now() if watch is not None else {}  # (before the read: a later edit counts)
        status = "STATUS=reload failed, old policy kept"
        try:
            config, policies = await _in_a_thread(self._read_again)
            if self._stop.is_set():  # (stopping meanwhile: nothing more is put in force)
                status = "STATUS=stopping, the reload dropped"
                return
            self.principals.configure(config, policies)  # (the last step that may fail)
        except Exception as exc:  # noqa: BLE001 - whatever fails, the old policy stays
            self.metrics.policy_reloads.labels("error").inc()
            if isinstance(exc, GuarddError):
                log.error("policy reload refused, keeping the old policy: %s", exc)
            else:
                log.exception("policy reload refused, keeping the old policy: %s", exc)
            status = f"STATUS=reload refused, old policy kept: {exc}"
            self.audit.note_policies(f"reload refused, the policies in force are kept: {exc}",
                                     None)
            if watch is not None:
                watch.refused(seen, exc.files if isinstance(exc, (PolicyError, PolicyTestsFailed))
                              else ())
        else:
            self._in_force(policies)
            self.audit.note_policies("reloaded", _digests(policies))
            self._reconfigure(config)
            for listener in self._dns_listeners:
                listener.service = self.principals.dns_service
            closed = sum(proxy.policy_changed() for proxy in self._proxies)
            self.metrics.policy_reloads.labels("ok").inc()
            rules = len(policies[DEFAULT_PRINCIPAL].rules)
            log.info("policy reloaded: %s (%d rules)%s; %d open connections were closed (the new "
                     "policies would not open them, or their client is now another principal, "
                     "or not a client)", self.config.policy, rules,
                     f" and {len(policies) - 1} principals' policies" if len(policies) > 1
                     else "", closed)
            if watch is not None:
                watch.follow(self._files(policies), seen, _read_digests(policies))
            status = f"STATUS=serving with {rules} rules"
            self._warn_of_host_addresses()
            self._read_port_settings()
        finally:
            systemd.notify("READY=1", status)

    def _reloaded(self, config: Config) -> Config:
        """The config in force with what a reload applies taken from `config`, read again
        (`RELOADED`); the rest that changed is logged: it needs a restart."""
        old = self.config
        later = [name for name in _FIELDS if name not in RELOADED
                 and getattr(old, name) != getattr(config, name)]
        if later:
            log.warning("%s changed %s: restart guardd to apply %s (a reload applies %s)",
                        self.config_file, ", ".join(map(file_key, later)),
                        "them" if len(later) > 1 else "it", ", ".join(map(file_key, RELOADED)))
        return replace(old, **{name: getattr(config, name) for name in RELOADED})

    def _reconfigure(self, config: Config) -> None:
        """Put the config a reload made (`_reloaded`) in force: who is a client, the users."""
        self.config = config
        self._clients_seen.clear()
        users = {SOCKS_LISTENER: self.config.socks_users, HTTP_LISTENER: self.config.http_users}
        for proxy in self._proxies:
            if proxy.name in users:
                proxy.settings.users.clear()
                proxy.settings.users.update(users[proxy.name])

    async def _watch(self, watch: FileWatch) -> None:
        """`--watch`: reload when the policy's files change (see `watch`)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                if watch.changed():
                    log.info("policy files changed (%s): reloading", ", ".join(watch.paths))
                    await asyncio.shield(self.reload())
            except Exception:  # noqa: BLE001 - a bug must not end the following for good
                log.exception("--watch: reloading failed")

    async def run(self) -> None:
        await self.start()
        # What start-up made (the policy's tables, the modules) lives as long as the process:
        # frozen, the collector stops walking it again and again under load.
        gc.freeze()
        try:
            await self._stop.wait()
        finally:
            await self.stop()

    async def stop(self) -> None:
        systemd.notify("STOPPING=1", "STATUS=draining")
        if self._reloading is not None:  # (its read goes on in its thread, not waited for)
            self._reloading.cancel()
        self._resolver.stop()  # (what the drain cuts is then all that went out)
        for task in self._tasks:
            task.cancel()
        for server in self._servers:
            server.close()
        for proxy in self._proxies:
            proxy.close()
        in_flight = sum(len(proxy.acceptor.tasks) for proxy in self._proxies)
        log.info("stopping: listeners closed; draining %d proxy connections for up to %gs "
                 "(drainTimeout)", in_flight, self.config.drain_timeout)
        await asyncio.gather(*(proxy.drain(self.config.drain_timeout)
                               for proxy in self._proxies))
        for server in self._servers:
            await server.wait_closed()
        await asyncio.sleep(0)  # let this turn's flush send the answers it holds
        deadline = time.monotonic() + self.config.drain_timeout
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            for task in tasks:  # what is left is cut while the trail is open, to record what
                task.cancel()   # went out for it (a DNS forward's name)
            await asyncio.wait(tasks, timeout=_CUT_GRACE)
        for transport in self._udp:
            transport.close()
        if self._reactor is not None:
            self._reactor.shutdown()
        self.audit.close()
        log.info("stopped; audit trail flushed (%d records written)", self.audit.records_written)


def _nobody(_: str) -> bool:
    """The clients a refusing DNS service serves (`unmapped: refuse`)."""
    return False


def bind_as(bind: Callable[[Endpoint], T], listener: str, endpoint: Endpoint) -> T:
    """`bind(endpoint)`, a failure named by its listener and address (`BindError`)."""
    try:
        return bind(endpoint)
    except OSError as exc:
        raise BindError(listener, str(endpoint), endpoint.port, exc) from None


def run(config: Config, config_file: Path | None = None,
        reread: Callable[[], Config] | None = None, config_seen: Stamp = None) -> None:
    """Run the daemon until SIGTERM/SIGINT, on uvloop; `reread` builds the config again (from
    `config_file` and the flags) at each reload; `config_seen`: the file's stamp before the
    first read."""
    import uvloop

    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(Daemon(config, config_file=config_file, reread=reread,
                      config_seen=config_seen).run())


#: Seconds a reload's read may keep the cyclic collector waiting (`_in_a_thread`): several
#: times what the largest policy the size caps allow takes to read.
_READ_PATIENCE = 30.0


async def _in_a_thread(read: Callable[[], T]) -> T:
    """`read()` in a daemon thread of its own: the loop goes on meanwhile, and a stop does not
    wait for it (the default executor's threads are waited for at the exit: re-attack of
    attack pass 49, a SIGTERM during a big policy's read did not end the process). The cyclic
    collector waits until it ends (session 55's attack: a 60,000-rule policy's allocations ran
    it over all the read had built, again at each growth, holding the interpreter up to 1.3 s
    at a time; a policy makes no cycles, and the read is bounded by the files' size caps)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            settle = functools.partial(_settle, done, read(), None)
        except BaseException as exc:  # noqa: BLE001 - raised in the awaiting task
            settle = functools.partial(_settle, done, None, exc)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # (the loop closed meanwhile: nobody waits)

    # (not longer than a read may take: one that hangs, a stuck mount's, must not keep it off
    # for good, the review; and whoever turned it off keeps it off)
    again = loop.call_later(_READ_PATIENCE, gc.enable) if gc.isenabled() else None
    gc.disable()
    try:
        threading.Thread(target=run, name="guardd-reload", daemon=True).start()
        return await done
    finally:
        if again is not None:
            again.cancel()
            gc.enable()


def _settle(done: asyncio.Future[T], result: T | None, error: BaseException | None) -> None:
    """Hand a thread's outcome to the task awaiting `done`, unless it gave up (cancelled)."""
    if done.done():
        return
    if error is not None:
        done.set_exception(error)
    else:
        done.set_result(result)  # type: ignore[arg-type]


def _read_digests(policies: Mapping[str, Policy]) -> dict[str, str]:
    """The SHA-256 of each file the policies were read from, by its path (`FileWatch`); a
    file two policies read with different content (each principal's is read on its own, and
    it changed between: the review of session 57) gets `READ_DIFFERENTLY`, which no content
    matches."""
    digests: dict[str, str] = {}
    for policy in policies.values():
        for path, digest in policy.digests.items():
            digests[path] = digest if digests.get(path, digest) == digest else READ_DIFFERENTLY
    return digests


def _digests(policies: Mapping[str, Policy]) -> dict[str, dict[str, str]]:
    """Each principal's policy files and their SHA-256 (`AuditWriter.note_policies`)."""
    return {name: policy.digests for name, policy in policies.items()}
