"""What guardd knows about hosts beyond the policy: the names each client resolved to an address
through guardd, and the addresses of guardd's own host. The guard judges by both.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import logging
import os
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator

import psutil

from guardd.addr import IPAddress, counted_as, effective_address

log = logging.getLogger("guardd.hosts")

#: Whose names: (a principal's key, the generation of its policy).
Scope = tuple[Hashable, int]
#: A client as the resolved names hold it: (the scope, the client it counts as).
Held = tuple[Scope, str]
#: The scope of a table used without principals.
NO_SCOPE: Scope = (None, 0)


class ResolvedNames:
    """(client, address) -> the names that client resolved to it through guardd, for their TTL.

    SOCKS judges a connect by IP as a request to those names (docs/design.md, evaluation rule
    7). A CDN address serves many names, so every live name a client resolved there is kept
    (the newest `names_per_address`) and a connect is judged against all of them: the most
    restrictive wins, whichever the client asked for last. The name -> addresses side lets a
    cached answer refresh the map for another client without re-parsing the answer. Both tables
    are LRU-bounded, and each client's addresses are LRU-bounded apart (`per_client`, an eighth
    of the whole by default): one client's lookups push out its own entries, never another's
    (attack pass 16: one client asking a name of 32 random addresses again and again pushed out
    every client's names within a minute, and their connects by address were refused), until
    more clients than that fill their shares. An answer that expired as it came (TTL 0) is not
    kept. Addresses are keyed by their text: a str caches its hash, an `ipaddress` object does
    not; an IPv6 address that embeds an IPv4 one is kept as the latter, where its packets go, as
    the policy judges it (review: a connect to ::ffff:192.0.2.7 was not judged as the names
    resolved to 192.0.2.7). A client is one as everywhere a client is counted (`counted_as`):
    the addresses of one agent (`sameClient`) are one, and so is all of loopback (final
    attack: one process on the host flooding from eight loopback sources had eight shares, the
    whole table).

    Both sides are kept within a `scope` (`view`): one principal's, under one policy. So
    principals share the table and its bound, never what a client resolved (review of stop
    39: a lookup under one principal let an agent of the same address, logged in as another,
    connect by the address as the name); and a reload starts a new scope, as it clears the
    DNS cache: what an answer vetted under the old policy taught no longer allows, and ages
    out (the last attack of stop 39: a private address behind an alias only the old rules
    vouched for stayed a connect's name for the answer's TTL; vetting judges the alias chain
    and the zone that published each address, which the table does not keep). Another scope's
    names may still deny (`lookup_elsewhere`, `Guard.denied_elsewhere`).
    """

    def __init__(self, max_entries: int = 200_000, clock: Callable[[], float] = time.monotonic,
                 names_per_address: int = 8, addresses_per_name: int = 32,
                 per_client: int | None = None) -> None:
        #: (scope, client) -> address -> its names and when each expires; clients by their
        #: last entry.
        self._by_client: OrderedDict[Held, OrderedDict[str, dict[str, float]]] = \
            OrderedDict()
        #: Client -> the scopes it has entries in, the most recently used last: each
        #: principal's latest `SCOPES_PER_CLIENT` only (see `lookup_elsewhere`).
        self._scopes_of: dict[str, OrderedDict[Scope, None]] = {}
        #: (scope, answer: its key in the DNS cache, the name, type, class and EDNS asked) -> its
        #: addresses, when they expire, and the client that resolved it first (review: keyed
        #: by the name alone, an AAAA answer replaced the A answer there, and a cached A answer
        #: taught another client the IPv6 addresses).
        self._by_name: OrderedDict[Hashable, tuple[tuple[str, ...], float, Held]] = \
            OrderedDict()
        #: The addresses the name side holds (a name weighs one at least), in all and by the
        #: client that resolved them, and each client's names, oldest first: bounded as the
        #: client side is (attack pass 31: bounded by its count of names, one client's unique
        #: names of 32 addresses each took guardd to 910 MB).
        self.name_addresses = 0
        self._weight_of: dict[Held, int] = {}
        self._names_of: dict[Held, OrderedDict[Hashable, None]] = {}
        self._max = max_entries
        self._per_client = per_client or max(1, max_entries // 8)
        self._entries = 0  # (client, address) entries, all clients together
        self._per_address = names_per_address
        #: Addresses remembered per answer, so an answer of hundreds of records costs no more
        #: (a connect to one of the others is judged by `ip` rules alone: stricter, not looser).
        self._per_name = addresses_per_name
        self._clock = clock

    def __len__(self) -> int:
        """(client, address) entries held."""
        return self._entries

    def view(self, scope: Scope) -> ScopedNames:
        """What one principal's clients resolved under one policy (`scope`: its key)."""
        return ScopedNames(self, scope)

    def remember(self, client: str, name: str, addresses: Iterable[IPAddress], ttl: float,
                 answer: Hashable = None, *, scope: Scope = NO_SCOPE) -> None:
        """`client` resolved `name` to `addresses` for `ttl` seconds, in `answer` (its key in
        the DNS cache; the name when not given), under `scope`."""
        if ttl <= 0:
            return  # (expired already: it would stand for nothing, and push out what does)
        held = scope, counted_as(client)
        expires = self._clock() + ttl
        texts = tuple(str(effective_address(ip))
                      for ip in itertools.islice(addresses, self._per_name))
        self._name_resolved(held, (scope, name if answer is None else answer), texts, expires)
        for ip in texts:
            self._add(held, ip, name, expires)

    def remember_cached(self, client: str, name: str, answer: Hashable = None, *,
                        scope: Scope = NO_SCOPE) -> bool:
        """A cached `answer` for `name` (as `remember` names it) went to `client`: extend the
        map to it; False when the name side holds no live answer for it (pushed out: the
        caller gives its addresses itself, `remember`).

        This runs for every cache hit, so a client already mapped (the same expiry) costs one
        dict probe per address.
        """
        entry = self._by_name.get((scope, name if answer is None else answer))
        if entry is None or entry[1] <= self._clock():
            return False
        addresses, expires, _ = entry
        held = scope, counted_as(client)
        table = self._by_client.get(held)
        for ip in addresses:
            names = table.get(ip) if table is not None else None
            if names is None or names.get(name) != expires:
                self._add(held, ip, name, expires)
                table = self._by_client[held]
        return True

    def lookup(self, client: str, ip: IPAddress, *, scope: Scope = NO_SCOPE
               ) -> tuple[str, ...]:
        """The live names `client` resolved to `ip` under `scope`, newest first (empty when
        none)."""
        return self._live((scope, counted_as(client)), str(effective_address(ip)))

    def lookup_elsewhere(self, client: str, ip: IPAddress, scope: Scope) -> tuple[str, ...]:
        """The live names `client` resolved to `ip` under any scope but `scope`: another
        principal's, or an older policy's (the caller lets them deny, never allow)."""
        counted = counted_as(client)
        scopes = self._scopes_of.get(counted)
        if not scopes or len(scopes) == 1 and scope in scopes:
            return ()
        text = str(effective_address(ip))
        found: dict[str, None] = {}
        for other in scopes:
            if other != scope:
                found.update(dict.fromkeys(self._live((other, counted), text)))
        return tuple(found)

    def _live(self, held: Held, ip: str) -> tuple[str, ...]:
        """The live names `held` resolved to `ip` (as kept), newest first."""
        table = self._by_client.get(held)
        names = table.get(ip) if table is not None else None
        if not names:
            return ()
        now = self._clock()
        return tuple(name for name, expires in reversed(names.items()) if expires > now)

    def clear(self) -> None:
        self._by_client.clear()
        self._scopes_of.clear()
        self._by_name.clear()
        self._entries = self.name_addresses = 0
        self._weight_of.clear()
        self._names_of.clear()

    def _name_resolved(self, client: Held, key: Hashable, texts: tuple[str, ...],
                       expires: float) -> None:
        """Keep the addresses of the newest answer for `key`, in the share of the client that
        resolved it first (review: made the last resolver's, another client's lookups could
        push it out), within the whole (`name_addresses`)."""
        entry = self._by_name.get(key)
        owner = client if entry is None else entry[2]
        self._forget_name(key)
        self._by_name[key] = (texts, expires, owner)
        weight = max(1, len(texts))
        self.name_addresses += weight
        self._weight_of[owner] = self._weight_of.get(owner, 0) + weight
        own = self._names_of.get(owner)
        if own is None:
            own = self._names_of[owner] = OrderedDict()
        own[key] = None
        while self._weight_of.get(owner, 0) > self._per_client and len(own) > 1:
            self._forget_name(next(iter(own)))
        while self.name_addresses > self._max:
            self._forget_name(next(iter(self._by_name)))

    def _forget_name(self, key: Hashable) -> None:
        entry = self._by_name.pop(key, None)
        if entry is None:
            return
        texts, _, client = entry
        weight = max(1, len(texts))
        self.name_addresses -= weight
        self._weight_of[client] -= weight
        own = self._names_of[client]
        del own[key]
        if not own:
            del self._names_of[client], self._weight_of[client]

    def _add(self, client: Held, ip: str, name: str, expires: float) -> None:
        table = self._by_client.get(client)
        if table is None:
            table = self._by_client[client] = OrderedDict()
            scopes = self._scopes_of.setdefault(client[1], OrderedDict())
            scopes[client[0]] = None
            principal = client[0][0]  # (its older policies': never another principal's, review)
            own = [scope for scope in scopes if scope[0] == principal]
            if len(own) > SCOPES_PER_CLIENT:
                self._forget_table((own[0], client[1]))
        else:
            self._by_client.move_to_end(client)
            self._scopes_of[client[1]].move_to_end(client[0])
        names = table.get(ip)
        if names is None:
            names = table[ip] = {}
            self._entries += 1
            if len(table) > self._per_client:
                self._drop_oldest(client)
            elif self._entries > self._max:
                self._drop_oldest(next(iter(self._by_client)))
        else:
            table.move_to_end(ip)
        names.pop(name, None)
        names[name] = expires  # newest last
        if len(names) > self._per_address:
            del names[next(iter(names))]

    def _drop_oldest(self, client: Held) -> None:
        """Forget `client`'s least recently resolved address (and the client, with its last)."""
        table = self._by_client[client]
        table.popitem(last=False)
        self._entries -= 1
        if not table:
            del self._by_client[client]
            self._unindex(client)

    def _forget_table(self, client: Held) -> None:
        """Forget all `client` resolved under one scope (one of too many, `_add`)."""
        self._entries -= len(self._by_client.pop(client))
        self._unindex(client)

    def _unindex(self, client: Held) -> None:
        scopes = self._scopes_of[client[1]]
        del scopes[client[0]]
        if not scopes:
            del self._scopes_of[client[1]]


#: Scopes of one principal a client's names are kept under at once (`_scopes_of`): each a
#: connect by address reads (`lookup_elsewhere`), so many reloads cost no more than these.
SCOPES_PER_CLIENT = 8


class ScopedNames:
    """One principal's side of the `ResolvedNames` every principal shares, under the policy in
    force: what its clients resolved, read by its connects (`ResolvedNames.view`)."""

    __slots__ = ("table", "scope")

    def __init__(self, table: ResolvedNames, scope: Scope) -> None:
        self.table = table
        self.scope = scope

    def remember(self, client: str, name: str, addresses: Iterable[IPAddress], ttl: float,
                 answer: Hashable = None) -> None:
        self.table.remember(client, name, addresses, ttl, answer, scope=self.scope)

    def remember_cached(self, client: str, name: str, answer: Hashable = None) -> bool:
        return self.table.remember_cached(client, name, answer, scope=self.scope)

    def lookup(self, client: str, ip: IPAddress) -> tuple[str, ...]:
        return self.table.lookup(client, ip, scope=self.scope)

    def elsewhere(self, client: str, ip: IPAddress) -> tuple[str, ...]:
        return self.table.lookup_elsewhere(client, ip, self.scope)


class HostAddresses:
    """The addresses of guardd's own host, refreshed at most every `ttl` s: every interface's,
    and every other address the kernel delivers on the host.

    A listener on 0.0.0.0 or :: answers on each of them, so a connect to any of them at a
    listener's port reaches guardd itself (see `Guard.is_own`), and at any other port the
    host's services. psutil reads the interfaces' with getifaddrs(3). A `local` route answers
    for addresses no interface lists (AnyIP, `ip route add local 10.23.9.0/24 dev lo`; an
    address with a prefix on `lo` makes one too): for an address that is not an interface's,
    the kernel is asked where guardd's own connection would go (`delivered_here`), and the
    answer kept for the same `ttl`, `_MOST_ASKED` of them (attack pass 23: a rule for
    `10.0.0.0/8` reached a service of the host at an address of such a route). Both ask over
    netlink: the systemd unit allows AF_NETLINK for them.
    """

    def __init__(self, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._expires = -1.0
        self._addresses: frozenset[str] = frozenset()
        #: Address text -> whether the kernel delivers it here (None: it cannot say), since the
        #: last refresh.
        self._asked: dict[str, bool | None] = {}
        #: A lookup the kernel could not answer was logged since the last refresh (once: a
        #: client picks the addresses, review: a blackhole route made a warning of each).
        self._told = False

    def __contains__(self, text: str) -> bool:
        """As a destination: when the kernel cannot say, yes: an address of the host opens
        only to a rule that names it, so the doubt denies (fail closed)."""
        here = self._here(text)
        return True if here is None else here

    def holds_source(self, text: str) -> bool:
        """As a client's source address (`addr.count_host_as_loopback`): only where the kernel
        routes it as local. An address of the host is loopback, its principal and counts: not
        one the interfaces list that the kernel routes elsewhere (final review: an IPv6 address
        whose duplicate check failed, because an agent on the link held it first, passed for
        loopback over TCP), nor one it cannot say of (review: a forged datagram from a
        blackholed address)."""
        self._refresh()
        return bool(self._routed_here(text))

    def interfaces(self) -> frozenset[str]:
        """The addresses the host's interfaces hold (an AnyIP route's are not listed)."""
        self._refresh()
        return self._addresses

    def _refresh(self) -> None:
        """Every `ttl` s, read the interfaces again and forget the routes asked."""
        if self._clock() >= self._expires:
            self._addresses = frozenset(_interface_addresses())
            self._asked = {}
            self._told = False
            self._expires = self._clock() + self._ttl

    def _here(self, text: str) -> bool | None:
        """Whether `text` is an address of the host; None when the kernel cannot say."""
        if text in self.interfaces():
            return True
        return self._routed_here(text)

    def _routed_here(self, text: str) -> bool | None:
        """`_delivered_here`, kept until the next refresh."""
        if text in self._asked:
            return self._asked[text]
        if len(self._asked) >= _MOST_ASKED:
            self._asked = {}
        here = self._asked[text] = self._delivered_here(text)
        return here

    def _delivered_here(self, text: str) -> bool | None:
        """`delivered_here`; None when the kernel cannot say (logged once a refresh); no for
        what is no address (a client's source as a transport told it: never raise there)."""
        try:
            return delivered_here(ipaddress.ip_address(text))
        except ValueError:
            return False
        except OSError as exc:
            if not self._told:
                self._told = True
                log.warning("cannot ask the kernel where a connection to %s would go (%s): as "
                            "a destination it is taken for an address of guardd's own host, "
                            "as a client's source for another's, as is any other such address "
                            "for %gs", text, exc, self._ttl)
            return None


#: Addresses whose route `HostAddresses` keeps between refreshes (a client that connects to
#: many asks again past them, at its own connects' cost).
_MOST_ASKED = 4096
#: rtnetlink (linux/netlink.h, linux/rtnetlink.h): the request `ip route get` makes, and the
#: route types that deliver on the host.
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port
_ROUTE = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst_len, src_len, tos, table, protocol,
_ROUTE_TYPE = 7  #                                scope, type, flags
_ATTRIBUTE = struct.Struct("=HH")  # rtattr: length, type
_NLMSG_ERROR = 2
_RTM_NEWROUTE = 24
_RTM_GETROUTE = 26
_NLM_F_REQUEST = 1
_RTA_DST = 1
_RTN_LOCAL = 2
_RTN_ANYCAST = 4
#: What a route lookup answers for an address with no route at all: not the host's.
_NO_ROUTE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH})


def delivered_here(ip: IPAddress) -> bool:
    """Would the kernel deliver guardd's own connection to `ip` on this host (its route is
    `local` or `anycast`, policy routing included, as `ip route get` says)? Asked without a
    mark, protocol or port, as guardd's connects carry none of their own (an `ip rule` that
    selects by port, or a firewall mark set on output, is not seen). OSError when the kernel
    cannot say (a blackhole or prohibit route answers so too)."""
    packed = ip.packed
    request = (_HEADER.pack(_HEADER.size + _ROUTE.size + _ATTRIBUTE.size + len(packed),
                            _RTM_GETROUTE, _NLM_F_REQUEST, 1, 0) +
               _ROUTE.pack(socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                           8 * len(packed), 0, 0, 0, 0, 0, 0, 0) +
               _ATTRIBUTE.pack(_ATTRIBUTE.size + len(packed), _RTA_DST) + packed)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.sendto(request, (0, 0))  # (the kernel answers before the send returns)
        answer = sock.recv(65536, socket.MSG_DONTWAIT)
    try:
        kind = _HEADER.unpack_from(answer)[1]
        if kind == _NLMSG_ERROR:
            failed = -struct.unpack_from("=i", answer, _HEADER.size)[0]
            if failed in _NO_ROUTE:
                return False
            raise OSError(failed, os.strerror(failed))
        if kind != _RTM_NEWROUTE:
            raise OSError(f"an answer of type {kind} to a route lookup")
        return _ROUTE.unpack_from(answer, _HEADER.size)[_ROUTE_TYPE] in (_RTN_LOCAL,
                                                                          _RTN_ANYCAST)
    except struct.error as exc:
        raise OSError(f"a route lookup's answer of {len(answer)} bytes: {exc}") from None


def _interface_addresses() -> Iterator[str]:
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                yield str(ipaddress.ip_address(address.address.partition("%")[0]))
