"""Per-agent policies: who a client is, and that principal's guard and DNS service.

A principal is an agent, or a fleet of alike agents, with a policy of its own (`principals:` in
the daemon config). A client is the principal of the user it logged in to a proxy listener as
(an RFC 1929 SOCKS5 user, a `Proxy-Authorization` user), else of the most specific network of
a principal that holds its address, else `unmapped`: the default principal (the top-level
`policy`) or nobody, and it is refused. DNS has no login, so a query is its source network's.

Each principal has its own `Guard` (its policy, rate limits, DNS tunnel budgets and memoized
verdicts; the trail, metrics and what guardd knows of the world are shared) and its own
`DNSService` (answers are vetted under one policy, so they are cached under it). `PrincipalMap`
is the mapping alone, without I/O: `guardd explain --config` uses it too.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from guardd.addr import IPAddress, counted_as, forged_source
from guardd.config import DEFAULT_PRINCIPAL, Config
from guardd.dns.server import Answer, DNSService
from guardd.errors import ConfigError
from guardd.guard import HTTP_LISTENER, NOT_A_CLIENT, SOCKS_LISTENER, Guard
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from guardd.policy.model import IPNetwork

#: Why a client no principal claims is refused (`unmapped: refuse`).
UNMAPPED = "client maps to no principal (unmapped: refuse in the daemon config)"
#: Client addresses whose principal is kept.
_MAX_CLIENTS_KEPT = 4096
#: The policy of nobody's guard.
_NOBODY = 'version: "1.0"\nrules: []\n'


@dataclass(frozen=True, slots=True)
class PrincipalMap:
    """Which principal a client is: by its proxy login, else its address."""

    #: (network, principal), the most specific network first.
    networks: tuple[tuple[IPNetwork, str], ...] = ()
    #: (listener, user) -> principal.
    users: Mapping[tuple[str, str], str] = field(default_factory=dict)
    #: The principal of a client no one claims; None: refused.
    unmapped: str | None = DEFAULT_PRINCIPAL

    @classmethod
    def from_config(cls, config: Config) -> PrincipalMap:
        networks = sorted(((network, principal.name) for principal in config.principals
                           for network in principal.clients),
                          key=lambda pair: -pair[0].prefixlen)
        users = {(listener, user): principal.name for principal in config.principals
                 for listener, names in ((SOCKS_LISTENER, principal.socks_users),
                                         (HTTP_LISTENER, principal.http_users))
                 for user in names}
        mapping = cls(tuple(networks), users,
                      DEFAULT_PRINCIPAL if config.unmapped == "default" else None)
        for network, _ in networks:  # (review of attack pass 35: a process on the host chose)
            if network.version == 4 and network.overlaps(_LOOPBACK) and \
                    not _LOOPBACK.subnet_of(network):  # type: ignore[arg-type]
                raise ConfigError(f"principals: {network} holds part of loopback ({_LOOPBACK}): "
                                  "every loopback address is one client, which any process on "
                                  "the host may be; a principal holds all of loopback "
                                  "(127.0.0.0/8 and ::1) or none")
        groups = [("sameClient: ", group) for group in config.same_client]
        for setting, group in (*groups, ("", _LOOPBACK_FORMS)):
            owners = {item: mapping._owners(item) for item in group}
            if len({owner for held in owners.values() for owner in held}) > 1:  # (attack pass
                whose = " and ".join(  # 35: the agent chose its policy by its address)
                    f"{item} is " + " and ".join(f"{owner or 'no principal'}'s"
                                                 for owner in held)
                    for item, held in owners.items())
                raise ConfigError(f"{setting}{', '.join(group)} are one client, but {whose}: the "
                                  "agent would choose its policy by the address it sends from; "
                                  "put every address of a group in one principal's clients")
        return mapping

    def _owners(self, item: str) -> tuple[str | None, ...]:
        """The principals of a `sameClient` address, or of a network's addresses: the one of
        the most specific network holding all of it (else `unmapped`), unless the networks
        inside it cover it whole, and each one of those."""
        held = ipaddress.ip_network(item)
        inside = [(network, name) for network, name in self.networks
                  if network.version == held.version and network != held and
                  network.subnet_of(held)]  # type: ignore[arg-type]
        covered = list(ipaddress.collapse_addresses(  # type: ignore[type-var]
            network for network, _ in inside)) == [held]
        outer = next((name for network, name in self.networks if network.version ==
                      held.version and held.subnet_of(network)),  # type: ignore[arg-type]
                     self.unmapped)
        return tuple(dict.fromkeys(([] if covered else [outer]) + [name for _, name in inside]))

    def by_address(self, client: str) -> str | None:
        """The principal of the most specific network holding `client` (an address, perhaps
        with a %zone), else `unmapped`."""
        try:
            ip = ipaddress.ip_address(client.partition("%")[0])
        except ValueError:
            return self.unmapped
        held = self._by_network(ip)
        return self.unmapped if held is None else held

    def _by_network(self, ip: IPAddress) -> str | None:
        """The principal of the most specific network holding `ip`; None when none does."""
        return next((name for network, name in self.networks
                     if network.version == ip.version and ip in network), None)

    def apart_from_loopback(self, host_addresses: Iterable[str]) -> list[tuple[str, str]]:
        """Which of guardd's host's addresses (other than loopback and link-local ones) a
        principal's network holds, when that is not loopback's principal, and whose: a process
        on the host that sends from one is loopback's (`addr.counted_as`), not that one's."""
        loopback = self.by_address(_LOOPBACK_FORMS[0])
        return [(address, owner) for address in sorted(host_addresses)
                if not (ip := ipaddress.ip_address(address)).is_loopback and
                not ip.is_link_local and (owner := self._by_network(ip)) is not None and
                owner != loopback]

    def by_user(self, listener: str, user: str | None) -> str | None:
        """The principal a proxy login names; None when it names none."""
        return None if user is None else self.users.get((listener, user))


#: Loopback, one client (`addr.counted_as`): its IPv4 network, and an address of each family
#: (the listeners' IPv6 sockets are v6-only: no client comes as ::ffff:127.0.0.1).
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_LOOPBACK_FORMS = ("127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    guard: Guard
    #: Its DNS answers, and the resolver of its connects' names (vetted under its policy).
    dns: DNSService


class Principals:
    """Every principal, and who a client is (each address's principal kept). Also the DNS
    listeners' service when there are principals: a query goes to its principal's.

    `nobody` records what is refused before a client is known (outside `clients`, a failed
    login, unmapped): such records name no principal. `configure` sets the principals of a
    config, at start and at each reload."""

    def __init__(self, default: Principal,
                 service: Callable[[Guard, str | None], DNSService] | None = None) -> None:
        self.default = default
        #: Its policy denies everything: a tunnel no principal took (a bug) opens nothing.
        self.nobody = default.guard.sibling(Policy.from_text(_NOBODY, "<nobody>"), None)
        self.metrics: Metrics = default.guard.metrics
        #: A principal's DNS service (`service(guard, None)`), or one that refuses every query
        #: with why (`service(guard, why)`).
        self._service = service
        self._by_name = {default.name: default}
        self._map = PrincipalMap()
        self._of_address: dict[str, Principal | None] = {}
        #: What answers the queries of a client outside `clients`, and of one no principal
        #: claims (`unmapped: refuse`): services that refuse every query, saying why.
        self._outsiders = default.dns
        self._unmapped: DNSService | None = None

    def configure(self, config: Config, policies: Mapping[str, Policy]) -> None:
        """The principals of `config`, each under its policy in `policies` (by name). One that
        was there already keeps its guard and DNS service, so its rate limits and tunnel
        budgets go on counting; a new one gets its own; one no longer configured is gone, and
        denies what it still has under way (a DNS answer upstream). A policy that replaces
        another forgets what was judged and cached under the old one; one read from the same
        files with the same content does not replace it (session 55's review: a reload of
        unchanged files made every client resolve its names again before it could connect to
        their addresses)."""
        service = self._service
        assert service is not None, "configure() needs a service factory"
        mapping = PrincipalMap.from_config(config)  # (first: it may refuse the config)
        if self.default.guard.name_principal(DEFAULT_PRINCIPAL if config.principals else None):
            self.default.dns.policy_changed()  # (its memos hold records naming the one before)
        by_name = {self.default.name: self.default}
        for entry in config.principals:
            known = self._by_name.get(entry.name)
            if known is None:
                guard = self.default.guard.sibling(policies[entry.name], entry.name)
                known = Principal(entry.name, guard, service(guard, None))
            by_name[entry.name] = known
        for name, principal in by_name.items():
            if not _same(principal.guard.policy, policies[name]):
                principal.guard.replace_policy(policies[name])
                principal.dns.policy_changed()
        for name, gone in self._by_name.items():
            if name not in by_name:  # what it has under way is judged by nobody's policy
                gone.guard.replace_policy(self.nobody.policy)  # (attack pass 17: an answer
                gone.dns.policy_changed()                      # upstream was served)
        self._by_name = by_name
        self._map = mapping
        self._of_address = {}
        for principal in by_name.values():  # (one gone keeps its `owns`: no client is its now)
            principal.dns.owns = functools.partial(self._owns, principal)
        if config.principals and self._outsiders is self.default.dns:
            self._outsiders = service(self.nobody, NOT_A_CLIENT)
        self._unmapped = (self._unmapped or service(self.nobody, UNMAPPED)) \
            if self._map.unmapped is None else None
        for each in (*(principal.dns for principal in by_name.values()), self._outsiders,
                     self._unmapped):  # (`clients` may have changed, whatever the policies did)
            if each is not None:
                each.clients_changed()

    @property
    def mapping(self) -> PrincipalMap:
        """The mapping of the config in force."""
        return self._map

    def __iter__(self) -> Iterator[Principal]:
        return iter(self._by_name.values())

    @property
    def dns_service(self) -> DNSService | Principals:
        """What the DNS listeners ask: the default's service itself when it is the only one."""
        return self if len(self._by_name) > 1 or self._unmapped is not None \
            else self.default.dns

    def of(self, client: str, listener: str | None = None, user: str | None = None
           ) -> Principal | None:
        """Who `client` is (logged in as `user` to `listener`, if it did); None: nobody, and it
        is refused (`UNMAPPED`)."""
        if user is not None and listener is not None:
            by_login = self.of_login(listener, user)
            if by_login is not None:
                return by_login
        # Kept by whom it counts as, asked each time: whether an address is the host's (then
        # loopback's) changes as the host takes or gives up addresses (attack pass 52: kept
        # with the source, an address the host gave up kept loopback's policy for the agent
        # that took it).
        counted = counted_as(client)
        found = self._of_address.get(counted, self)
        if found is self:
            name = self._map.by_address(counted)
            if len(self._of_address) >= _MAX_CLIENTS_KEPT:
                self._of_address.clear()
            found = self._of_address[counted] = None if name is None else self._by_name[name]
        return found  # type: ignore[return-value]

    def account(self, client: str, by_login: Principal | None, user: str | None) -> str:
        """Whose rate limits and DNS tunnel budgets the connections of `client` (logged in as
        `user`, choosing `by_login`, if it did) spend: its address, as its DNS queries (DNS
        has no login) and unauthenticated connections do; its login's (`login_account`) only
        where the login chose a principal that does not hold the address: agents that share
        an address and log in to be counted apart, each counted as its user from whatever
        address (attack pass: three addresses got two each). (Attack pass, 2026-12-06:
        counted as the user from an address its own principal held, an agent had two of
        every limit and tunnel budget.)"""
        if by_login is None or not user or self.of(client) is by_login:
            return client
        return login_account(by_login, user)

    def _owns(self, principal: Principal, client: str) -> bool:
        """Whether `client` is `principal`'s now (by its address: DNS has no login)."""
        return self.of(client) is principal

    def of_login(self, listener: str, user: str) -> Principal | None:
        """The principal a proxy login names, if any."""
        name = self._map.by_user(listener, user)
        return None if name is None else self._by_name[name]

    # -- as the DNS listeners' service ----------------------------------------------------------

    def answer(self, data: bytes, client: str, tcp: bool, local: bool = False) -> Answer:
        if not self.default.dns.serves(client) or (not tcp and forged_source(client, local)):
            # (a forged source is no principal's, whichever one's network holds it: review)
            return self._outsiders.answer(data, client, tcp, local)
        principal = self.of(client)
        if principal is None:
            assert self._unmapped is not None
            return self._unmapped.answer(data, client, tcp, local)
        return principal.dns.answer(data, client, tcp, local)

    def serves(self, client: str) -> bool:
        return self.default.dns.serves(client)


def login_account(principal: Principal, user: str) -> str:
    """The account of a login that chose `principal` (`Principals.account`): the user,
    whatever address and listener (SOCKS or HTTP) it comes through (never an address: it has
    a space)."""
    return f"{principal.name} user {user}"


def single(guard: Guard, dns: DNSService) -> Principals:
    """The principals of tests without any: the default alone."""
    return Principals(Principal(DEFAULT_PRINCIPAL, guard, dns))


def _same(policy: Policy, read: Policy) -> bool:
    """Whether `read` is `policy`, or was read from the same files with the same content."""
    return read is policy or read.digests == policy.digests
