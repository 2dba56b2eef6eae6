"""Daemon configuration: a YAML file, then command-line flags on top, validated before any bind.

Everything ends up in one frozen `Config`; `daemon.py` never reads a file or a flag itself. The
defaults are those of a production install (DNS on port 53, metrics on 127.0.0.1:9477, audit in
/var/log/guardd, upstreams from /etc/resolv.conf); `scripts/run` overrides them for loopback.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from guardd import files
from guardd.addr import IPAddress, carrier_of
from guardd.audit import least_total_bytes
from guardd.dns.upstreams import Upstream, parse_upstream, upstreams_from_resolv_conf
from guardd.errors import ConfigError, InvalidHostError
from guardd.net import Endpoint, parse_endpoint
from guardd.policy.model import IPNetwork

DEFAULT_POLICY = Path("/etc/guardd/policy.yaml")
DEFAULT_AUDIT_DIR = Path("/var/log/guardd")
RESOLV_CONF = Path("/etc/resolv.conf")
#: Who may use the resolver and the proxies: loopback and the private ranges containers live in.
#: Anything else is refused (a UDP query: recorded and never answered), so guardd is never an
#: open resolver.
DEFAULT_CLIENTS = ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
                   "100.64.0.0/10", "fc00::/7")
#: The principal of the top-level `policy` (every client no principal claims, by default).
DEFAULT_PRINCIPAL = "default"
#: What a client no principal claims gets: the default policy, or a refusal.
UNMAPPED = ("default", "refuse")
_PRINCIPAL_KEYS = ("policy", "clients", "socksUsers", "httpUsers")
#: A principal's name (in every record): never an address, since `explain --client` takes both.
_PRINCIPAL_NAME = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True, slots=True)
class PrincipalConfig:
    """One agent (or fleet of agents) with a policy of its own, and how its clients are known:
    by source network, or by the user they log in to a proxy listener as."""

    name: str
    policy: Path
    clients: tuple[IPNetwork, ...] = ()
    socks_users: tuple[str, ...] = ()
    http_users: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Config:
    policy: Path = DEFAULT_POLICY
    dns: tuple[Endpoint, ...] = (Endpoint("0.0.0.0", 53),)
    #: Empty: read /etc/resolv.conf at start (see `resolve_upstreams`).
    upstreams: tuple[Upstream, ...] = ()
    metrics: Endpoint | None = Endpoint("127.0.0.1", 9477)
    audit_dir: Path = DEFAULT_AUDIT_DIR
    audit_max_bytes: int = 50 * 1024 * 1024
    audit_keep: int = 10
    #: A rotated audit file is never deleted before it is this old (seconds): a flood then meets
    #: the size cap and loses its own newest records, not older evidence.
    audit_min_age: float = 86_400.0
    #: None: `audit_size_cap`'s default.
    audit_max_total_bytes: int | None = None
    audit_checkpoint_interval: float = 60.0
    #: Where checkpoints are anchored; None: anchor.jsonl in the audit directory.
    audit_anchor: Path | None = None
    #: While the trail cannot be written, answer anyway (unrecorded) instead of holding every
    #: answer until it can: an explicit choice of availability over evidence.
    audit_fail_open: bool = False
    #: "batch": fdatasync each write batch before its answers leave; "none": leave the writeback
    #: to the kernel (a power loss may lose its last seconds of records).
    audit_sync: str = "none"
    #: Also print every record on stdout as a JSON line (for a log shipper).
    audit_stdout: bool = False
    clients: tuple[IPNetwork, ...] = field(
        default_factory=lambda: tuple(ipaddress.ip_network(c) for c in DEFAULT_CLIENTS))
    cache_entries: int = 100_000
    cache_max_ttl: int = 86_400
    cache_negative_max_ttl: int = 3_600
    upstream_attempt_timeout: float = 2.0
    upstream_total_timeout: float = 5.0
    tcp_idle_timeout: float = 10.0
    #: At SIGTERM, connections and forwards in flight get this many seconds to finish before
    #: they are cut (a request under way should end normally, not with a reset).
    drain_timeout: float = 10.0
    #: SOCKS5 listeners; none by default (the DNS guard runs alone).
    socks: tuple[Endpoint, ...] = ()
    #: RFC 1929 username -> password; empty: no authentication.
    socks_users: tuple[tuple[str, str], ...] = ()
    socks_handshake_timeout: float = 10.0
    socks_connect_timeout: float = 10.0
    socks_idle_timeout: float = 300.0
    socks_max_connections: int = 1024
    socks_first_bytes_timeout: float = 10.0
    socks_max_connections_per_client: int = 256
    #: HTTP proxy listeners (CONNECT and absolute-form, for HTTPS_PROXY / HTTP_PROXY clients);
    #: none by default. Their timeouts are `socksTimeout`'s.
    http: tuple[Endpoint, ...] = ()
    #: Proxy-Authorization Basic username -> password; empty: no login asked.
    http_users: tuple[tuple[str, str], ...] = ()
    http_max_connections: int = 1024
    http_max_connections_per_client: int = 256
    #: Transparent listeners: connections the agent sandbox's nftables redirect, judged by
    #: their original destination (docs/deploy.md); none by default. Timeouts: `socksTimeout`'s.
    transparent: tuple[Endpoint, ...] = ()
    transparent_max_connections: int = 1024
    transparent_max_connections_per_client: int = 256
    #: What one client's proxied connections may hold in guardd's buffers, bytes their other
    #: ends did not take yet; past it, its largest are cut (`stream.memory`).
    max_buffered_per_client: int = 64 << 20
    #: Per-agent policies (`principals:`), each with its own rate limits and tunnel budgets.
    principals: tuple[PrincipalConfig, ...] = ()
    #: Groups of addresses that are one agent's (`sameClient`: a sandbox's IPv4 and IPv6
    #: ones): each group is one client for every per-client limit, budget, cap and share.
    same_client: tuple[tuple[str, ...], ...] = ()
    #: NAT64 network-specific prefixes of the agent's network (`nat64Prefixes`): an address
    #: under one is judged as the IPv4 address it carries (`addr.translate_through`).
    nat64_prefixes: tuple[ipaddress.IPv6Network, ...] = ()
    #: "default": a client no principal claims gets `policy`; "refuse": it is refused.
    unmapped: str = "default"
    log_level: str = "info"
    #: Reload when the policy file or a domain list it names changes (`--watch`).
    watch: bool = False

    @property
    def audit_size_cap(self) -> int:
        """audit.maxTotalBytes; by default four times what `keep` full files and the current take
        (2.2 GiB with the default maxBytes and keep), and at least `AUDIT_LEAST_CAP`."""
        if self.audit_max_total_bytes is not None:
            return self.audit_max_total_bytes
        return max(4 * self.audit_max_bytes * (self.audit_keep + 1), AUDIT_LEAST_CAP)

    @property
    def policy_files(self) -> dict[str, Path]:
        """Each principal's policy file, by name, the default's first."""
        return {DEFAULT_PRINCIPAL: self.policy,
                **{principal.name: principal.policy for principal in self.principals}}

    def client_allowed(self, ip: IPAddress) -> bool:
        return any(ip in network for network in self.clients if network.version == ip.version)


def _networks(values: Sequence[str], what: str) -> tuple[IPNetwork, ...]:
    try:
        return tuple(_as_seen(ipaddress.ip_network(str(v), strict=True)) for v in values)
    except ValueError as exc:
        raise ConfigError(f"invalid {what}: {exc}; give CIDRs such as 10.0.0.0/8") from None


def _as_seen(network: IPNetwork) -> IPNetwork:
    """An IPv4-mapped network (`::ffff:10.1.2.0/120`, as `ss` shows a dual-stack peer) as the
    IPv4 one guardd sees its clients come from (attack pass 49: such a principal's clients never
    matched, and got the default policy)."""
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is None or network.prefixlen < 96:
        return network
    return ipaddress.IPv4Network((mapped, network.prefixlen - 96))


# File keys -> how to read them. Nested sections are flattened to Config fields.
_FILE_KEYS = ("policy", "dns", "upstreams", "metrics", "audit", "clients", "cache",
              "upstreamTimeout", "tcpIdleTimeout", "drainTimeout", "socks", "socksUsers",
              "socksTimeout", "socksMaxConnections", "socksMaxConnectionsPerClient", "http",
              "httpUsers", "httpMaxConnections", "httpMaxConnectionsPerClient", "transparent",
              "transparentMaxConnections", "transparentMaxConnectionsPerClient",
              "maxBufferedPerClient", "logLevel", "watch", "principals", "unmapped", "sameClient",
              "nat64Prefixes")
_SECTION_KEYS = {
    "audit": {"dir": "audit_dir", "maxBytes": "audit_max_bytes", "keep": "audit_keep",
              "minAge": "audit_min_age", "maxTotalBytes": "audit_max_total_bytes",
              "checkpointInterval": "audit_checkpoint_interval", "anchor": "audit_anchor",
              "failOpen": "audit_fail_open", "sync": "audit_sync",
              "stdout": "audit_stdout"},
    "cache": {"maxEntries": "cache_entries", "maxTtl": "cache_max_ttl",
              "negativeMaxTtl": "cache_negative_max_ttl"},
    "upstreamTimeout": {"attempt": "upstream_attempt_timeout", "total": "upstream_total_timeout"},
    "socksTimeout": {"handshake": "socks_handshake_timeout", "connect": "socks_connect_timeout",
                     "idle": "socks_idle_timeout", "firstBytes": "socks_first_bytes_timeout"},
}
LOG_LEVELS = ("debug", "info", "warning", "error")
#: The least audit.maxTotalBytes: past 90% of it (`audit.DENIAL_SHARE`), a tenth of the cap is
#: left, and a client's share of that (`audit.CLIENT_SHARE`, 1/16) must hold a few records
#: (about 420 bytes each): 1 MiB leaves each about 6 KB; a 60 KB cap left a client that had
#: written nothing no share at all (last stop).
AUDIT_LEAST_CAP = 1 << 20
AUDIT_SYNC = ("none", "batch")
#: The least `maxBufferedPerClient`: what one stalled connection holds in its client socket's
#: queue alone (`net.CLIENT_SOCKET_BUFFER`, doubled by the kernel).
LEAST_BUFFERED = 4 << 20


#: File keys that set one Config field as they are.
_SNAKE = {"socksUsers": "socks_users", "httpUsers": "http_users",
          "socksMaxConnections": "socks_max_connections",
          "socksMaxConnectionsPerClient": "socks_max_connections_per_client",
          "httpMaxConnections": "http_max_connections",
          "httpMaxConnectionsPerClient": "http_max_connections_per_client",
          "transparentMaxConnections": "transparent_max_connections",
          "transparentMaxConnectionsPerClient": "transparent_max_connections_per_client",
          "maxBufferedPerClient": "max_buffered_per_client"}


def file_key(field: str) -> str:
    """The key of a config file that sets Config's `field` (`socksTimeout.idle`), as an
    operator knows it."""
    for section, keys in _SECTION_KEYS.items():
        for key, name in keys.items():
            if name == field:
                return f"{section}.{key}"
    first, *rest = field.split("_")
    return first + "".join(word.capitalize() for word in rest)


def _users(value: object, key: str, source: str) -> tuple[tuple[str, str], ...]:
    """A proxy's users: names to passwords, 1-255 characters each."""
    if not isinstance(value, Mapping) or not all(
            isinstance(u, str) and isinstance(p, str) and 0 < len(u) < 256 and 0 < len(p) < 256
            and (key != "httpUsers" or ":" not in u) for u, p in value.items()):
        raise ConfigError(f"{source}: {key} must map user names to passwords (1-255 characters "
                          "each, quoted" + ("; no ':' in a name" if key == "httpUsers" else "")
                          + ")")
    return tuple(sorted(value.items()))


def _same_client(value: object, source: str) -> tuple[tuple[str, ...], ...]:
    """`sameClient`: groups of addresses and networks that are one agent's (a list each, or one
    comma-separated string each, as `--same-client` gives them): two or more addresses, or a
    network; an address in one group only, each as a socket reports a client (an IPv4-mapped
    one as IPv4); none loopback (one client already) nor link-local (a socket reports its
    zone)."""
    groups: list[tuple[str, ...]] = []
    seen: list[IPNetwork] = []  # (every group's so far, an address as a network of one)
    for item in value if isinstance(value, list) else [value]:
        texts = item if isinstance(item, list) else str(item).split(",")
        try:
            networks = [_agent_network(str(text).strip()) for text in texts]
        except ValueError as exc:
            raise ConfigError(f"{source}: sameClient: {exc}; give each agent's addresses (or "
                              "networks) as a group, such as [[10.200.0.2, "
                              "\"fd00:6a72:6464::2\"]]") from None
        odd = [_shown(network) for network in networks
               if any(network.overlaps(other) for other in _NO_AGENTS)]
        if odd:
            raise ConfigError(f"{source}: sameClient: {', '.join(odd)}: loopback addresses are "
                              "one client already, and link-local ones carry a zone")
        group = tuple(dict.fromkeys(map(_shown, networks)))
        if len(group) < 2 and all(network.num_addresses == 1 for network in networks):
            raise ConfigError(f"{source}: sameClient: {item!r} is not a group of two or more "
                              "addresses of one agent, or a network (a list of groups: "
                              "[[ADDR, ADDR]], [NETWORK])")
        for network in networks:
            for other in seen:
                if network.overlaps(other):
                    inner, outer = (network, other) if network.prefixlen >= other.prefixlen \
                        else (other, network)
                    where = "two groups" if inner == outer else f"{_shown(outer)} already"
                    raise ConfigError(f"{source}: sameClient: {_shown(inner)} is in {where}; "
                                      "an address is one agent's")
        seen.extend(networks)
        groups.append(group)
    return tuple(groups)


#: The lengths RFC 6052 2.2 lays a NAT64 prefix out for.
_NAT64_LENGTHS = (32, 40, 48, 56, 64, 96)


def _nat64_prefixes(value: object, source: str) -> tuple[ipaddress.IPv6Network, ...]:
    """`nat64Prefixes`: the network-specific prefixes (RFC 6052) a NAT64 translator of the
    agent's network serves, each of a length RFC 6052 lays out, none inside another."""
    prefixes: list[ipaddress.IPv6Network] = []
    for item in value if isinstance(value, list) else [value]:
        try:
            prefix = ipaddress.ip_network(str(item), strict=True)
        except ValueError as exc:
            raise ConfigError(f"{source}: nat64Prefixes: {exc}") from None
        if not isinstance(prefix, ipaddress.IPv6Network):
            raise ConfigError(f"{source}: nat64Prefixes: {prefix} is not an IPv6 prefix")
        if prefix.prefixlen not in _NAT64_LENGTHS:
            raise ConfigError(f"{source}: nat64Prefixes: {prefix}: a NAT64 prefix is /32, /40, "
                              "/48, /56, /64 or /96 (RFC 6052 2.2)")
        carried = carrier_of(prefix)
        if carried is not None:
            raise ConfigError(f"{source}: nat64Prefixes: {prefix} overlaps a range that "
                              f"carries an IPv4 address already ({carried}), read as such")
        outer = next((other for other in prefixes if prefix.overlaps(other)), None)
        if outer is not None:
            inner, outer = sorted((prefix, outer), key=lambda net: -net.prefixlen)
            raise ConfigError(f"{source}: nat64Prefixes: {inner} is in {outer}: an address is "
                              "one translator's")
        prefixes.append(prefix)
    return tuple(prefixes)


#: IPv4-mapped IPv6 addresses (a dual-stack socket's IPv4 clients, counted as IPv4).
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
#: What no `sameClient` group may hold: loopback, and link-local addresses.
_NO_AGENTS = tuple(ipaddress.ip_network(text) for text in
                   ("127.0.0.0/8", "::1/128", "169.254.0.0/16", "fe80::/10"))


def _agent_network(text: str) -> IPNetwork:
    """A `sameClient` address or network, as a network (an address: of one); an IPv4-mapped
    one as IPv4, as a dual-stack socket's client is counted."""
    network = ipaddress.ip_network(text)
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.ip_network((mapped, network.prefixlen - 96))
    if network.version == 6 and network.overlaps(_MAPPED):  # (loopback's among them: review)
        raise ValueError(f"{text} holds IPv4-mapped addresses; name IPv4 ones as IPv4")
    return network


def _shown(network: IPNetwork) -> str:
    """A `sameClient` network as given: an address when it holds one."""
    return str(network.network_address) if network.num_addresses == 1 else str(network)


def _principals(value: object, base: Path, source: str) -> tuple[PrincipalConfig, ...]:
    """`principals:`: a mapping of names to {policy, clients, socksUsers, httpUsers}."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: principals must map names to {{policy: FILE, clients: "
                          "[CIDR...], socksUsers: [USER...], httpUsers: [USER...]}")
    found = []
    for name, entry in value.items():
        where = f"{source}: principals.{name}"
        if not isinstance(name, str) or not _PRINCIPAL_NAME.fullmatch(name):
            raise ConfigError(f"{source}: principal name {name!r} must be 1-64 letters, digits, "
                              "'.', '-' or '_', starting with a letter (not an address)")
        if name == DEFAULT_PRINCIPAL:
            raise ConfigError(f"{where}: {DEFAULT_PRINCIPAL!r} is the top-level policy's "
                              "principal; name this one otherwise")
        if not isinstance(entry, Mapping) or "policy" not in entry:
            raise ConfigError(f"{where} must be a mapping with a policy file and at least one "
                              "of clients, socksUsers, httpUsers")
        unknown = sorted(set(entry) - set(_PRINCIPAL_KEYS))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r}; known: "
                              f"{', '.join(_PRINCIPAL_KEYS)}")
        users = {key: tuple(_list(entry.get(key, []))) for key in ("socksUsers", "httpUsers")}
        principal = PrincipalConfig(name, base / str(entry["policy"]),
                                    _networks(_list(entry.get("clients", [])), f"{where}.clients"),
                                    users["socksUsers"], users["httpUsers"])
        if not (principal.clients or principal.socks_users or principal.http_users):
            raise ConfigError(f"{where}: give clients, socksUsers or httpUsers: nothing would "
                              "ever be this principal")
        found.append(principal)
    return tuple(found)


def _check_principals(config: Config, source: str) -> None:
    """Every network and user belongs to one principal at most, every user is a configured
    one, and every network is inside `clients` (else no client of it is ever served)."""
    networks: dict[IPNetwork, str] = {}
    users: dict[tuple[str, str], str] = {}
    known = {"socksUsers": {user for user, _ in config.socks_users},
             "httpUsers": {user for user, _ in config.http_users}}
    for principal in config.principals:
        for network in principal.clients:
            if network in networks:
                raise ConfigError(f"{source}: principals {networks[network]} and "
                                  f"{principal.name} both claim {network}")
            networks[network] = principal.name
            if not any(network.version == outer.version and network.subnet_of(outer)  # type: ignore[arg-type]
                       for outer in config.clients):
                raise ConfigError(f"{source}: principals.{principal.name}.clients: {network} is "
                                  "not inside clients, so guardd would refuse it; add it to "
                                  "clients")
        for key, names in (("socksUsers", principal.socks_users),
                           ("httpUsers", principal.http_users)):
            for user in names:
                if user not in known[key]:
                    raise ConfigError(f"{source}: principals.{principal.name}.{key}: {user!r} "
                                      f"is not a user of the top-level {key}")
                if (key, user) in users:
                    raise ConfigError(f"{source}: principals {users[key, user]} and "
                                      f"{principal.name} both claim {key} {user!r}")
                users[key, user] = principal.name


def _list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a config reads as it looks: no alias (attack pass 49: nested ones in 429 bytes
    expanded to 5 GB), no key given twice (the last one won, unseen), no merge key."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"{self.name}:{event.start_mark.line + 1}: a YAML alias "
                              f"(*{event.anchor}) is not allowed in a config: write the value "
                              "out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False
                          ) -> dict[object, object]:
        seen: set[object] = set()
        for key, _ in node.value:
            if key.tag == "tag:yaml.org,2002:merge":  # (re-attack: what it brings in went
                raise ConfigError(f"{self.name}:{key.start_mark.line + 1}: a YAML merge key "
                                  "(<<) is not allowed in a config: write the keys out")
            if isinstance(key, yaml.ScalarNode):  #     unchecked, given twice)
                if key.value in seen:
                    raise ConfigError(f"{self.name}:{key.start_mark.line + 1}: {key.value} is "
                                      "given twice: give each key once")
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def load_config_file(path: Path) -> Config:
    """Read a daemon config file; relative paths in it are relative to the file."""
    try:
        loader = _ConfigLoader(files.read_bounded(path).decode("utf-8"))
        loader.name = str(path)
        try:
            data = loader.get_single_data() or {}
        finally:
            loader.dispose()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: the config is not UTF-8 text ({exc.reason})") from None
    except RecursionError:
        raise ConfigError(f"{path}: the config is nested too deeply to read") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the config must be a mapping of keys to values")
    _check_secrets_private(path, data)
    return apply_settings(Config(), data, path.parent, str(path))


def _check_secrets_private(path: Path, data: Mapping[str, object]) -> None:
    """Refuse a config with proxy passwords that any user of the host may read: an agent that
    runs as one (`guardd sandbox exec`) would log in as another user, and another principal
    (attack pass), as sshd refuses a private key others can read."""
    if not any(data.get(key) for key in ("socksUsers", "httpUsers")):
        return
    who = readers_beyond_guardd(path.stat(), os.geteuid(), {os.getegid(), *os.getgroups()})
    if who:
        raise ConfigError(
            f"{path}: holds proxy passwords (socksUsers, httpUsers) and {who}, an agent's "
            f"too, which could then log in as another user and principal: make it readable by "
            f"guardd alone (root's or guardd's, chmod o-r, a group of guardd's; scripts/install "
            f"makes it root's, 0640, group guardd)")


def readers_beyond_guardd(status: os.stat_result, uid: int, groups: set[int]) -> str:
    """Who other than guardd (running as `uid` in `groups`) or root may read a file with this
    `status` ("" when nobody): every user, its owner, or its group's members (final attack
    pass: a config owned by, or in the group of, the agent's user passed the mode check)."""
    mode = stat.S_IMODE(status.st_mode)
    if mode & stat.S_IROTH:
        return f"every user of this host may read it (mode {mode:04o})"
    if status.st_uid not in (0, uid):
        return f"its owner (uid {status.st_uid}) may read it"
    if mode & stat.S_IRGRP and status.st_gid not in groups:
        return f"its group (gid {status.st_gid}), not guardd's, may read it (mode {mode:04o})"
    return ""


def apply_settings(config: Config, data: Mapping[str, object], base: Path, source: str) -> Config:
    """Validate `data` (file keys) and return `config` with them applied."""
    changes: dict[str, object] = {}
    for key, value in data.items():
        if key not in _FILE_KEYS:
            raise ConfigError(f"{source}: unknown key {key!r}; known keys: {', '.join(_FILE_KEYS)}")
        if key in _SECTION_KEYS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {key!r} must be a mapping of "
                                  f"{', '.join(_SECTION_KEYS[key])}")
            for sub, sub_value in value.items():
                if sub not in _SECTION_KEYS[key]:
                    raise ConfigError(f"{source}: unknown key {key}.{sub}; known: "
                                      f"{', '.join(_SECTION_KEYS[key])}")
                changes[_SECTION_KEYS[key][sub]] = sub_value
        elif key == "policy":
            changes["policy"] = base / str(value)
        elif key == "dns":
            changes["dns"] = tuple(parse_endpoint(v, "dns listen", 53) for v in _list(value))
        elif key == "upstreams":
            changes["upstreams"] = tuple(parse_upstream(v) for v in _list(value))
        elif key == "metrics":
            changes["metrics"] = None if value in (None, False, "off") else \
                parse_endpoint(str(value), "metrics", 9477)
        elif key == "socks":
            changes["socks"] = tuple(parse_endpoint(v, "socks listen", 1080) for v in _list(value))
        elif key == "http":
            changes["http"] = tuple(parse_endpoint(v, "http listen", 3128) for v in _list(value))
        elif key == "transparent":
            changes["transparent"] = tuple(parse_endpoint(v, "transparent listen", 15001)
                                           for v in _list(value))
        elif key in ("socksUsers", "httpUsers"):
            changes[_SNAKE[key]] = _users(value, key, source)
        elif key in _SNAKE:
            changes[_SNAKE[key]] = value
        elif key == "clients":
            changes["clients"] = _networks(_list(value), "clients")
        elif key == "tcpIdleTimeout":
            changes["tcp_idle_timeout"] = value
        elif key == "drainTimeout":
            changes["drain_timeout"] = value
        elif key == "principals":
            changes["principals"] = _principals(value, base, source)
        elif key == "unmapped":
            changes["unmapped"] = value
        elif key == "sameClient":
            changes["same_client"] = _same_client(value, source)
        elif key == "nat64Prefixes":
            changes["nat64_prefixes"] = _nat64_prefixes(value, source)
        elif key == "logLevel":
            changes["log_level"] = value
        elif key == "watch":
            changes["watch"] = value
    for key in ("audit_dir", "audit_anchor"):
        if key in changes:
            changes[key] = base / str(changes[key])
    return validate(replace(config, **changes), source)  # type: ignore[arg-type]


def validate(config: Config, source: str = "config") -> Config:
    """Check value ranges; every message names the setting."""
    numbers = {
        "audit.maxBytes": (config.audit_max_bytes, 4096), "audit.keep": (config.audit_keep, 0),
        "audit.minAge": (config.audit_min_age, 0),
        "audit.checkpointInterval": (config.audit_checkpoint_interval, 0),
        "cache.maxEntries": (config.cache_entries, 0), "cache.maxTtl": (config.cache_max_ttl, 0),
        "cache.negativeMaxTtl": (config.cache_negative_max_ttl, 0),
        "upstreamTimeout.attempt": (config.upstream_attempt_timeout, 0.01),
        "upstreamTimeout.total": (config.upstream_total_timeout, 0.01),
        "tcpIdleTimeout": (config.tcp_idle_timeout, 0.1),
        "drainTimeout": (config.drain_timeout, 0),
        "socksTimeout.handshake": (config.socks_handshake_timeout, 0.1),
        "socksTimeout.connect": (config.socks_connect_timeout, 0.1),
        "socksTimeout.idle": (config.socks_idle_timeout, 0.1),
        "socksTimeout.firstBytes": (config.socks_first_bytes_timeout, 0.1),
        "socksMaxConnections": (config.socks_max_connections, 1),
        "socksMaxConnectionsPerClient": (config.socks_max_connections_per_client, 1),
        "httpMaxConnections": (config.http_max_connections, 1),
        "httpMaxConnectionsPerClient": (config.http_max_connections_per_client, 1),
        "transparentMaxConnections": (config.transparent_max_connections, 1),
        "transparentMaxConnectionsPerClient": (config.transparent_max_connections_per_client,
                                               1),
        "maxBufferedPerClient": (config.max_buffered_per_client, LEAST_BUFFERED),
    }
    for name, (value, least) in numbers.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or value < least:
            raise ConfigError(f"{source}: {name} must be a number of at least {least}, "
                              f"not {value!r}")
    if config.audit_sync not in AUDIT_SYNC:
        raise ConfigError(f"{source}: audit.sync must be one of {', '.join(AUDIT_SYNC)}, not "
                          f"{config.audit_sync!r}")
    if not isinstance(config.audit_fail_open, bool):
        raise ConfigError(f"{source}: audit.failOpen must be true or false, not "
                          f"{config.audit_fail_open!r}")
    cap = config.audit_max_total_bytes
    floor = least_total_bytes(config.audit_max_bytes, config.audit_keep)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < floor):
        raise ConfigError(f"{source}: audit.maxTotalBytes must be a number of at least "
                          f"audit.maxBytes times (audit.keep + 2), {floor}, not {cap!r}")
    if cap is not None and cap < AUDIT_LEAST_CAP:
        raise ConfigError(f"{source}: audit.maxTotalBytes must be at least {AUDIT_LEAST_CAP} "
                          f"(1 MiB), not {cap}: past 90% of a smaller cap, before any file may "
                          "go, the room left gives each client's share less than a record")
    if config.upstream_attempt_timeout > config.upstream_total_timeout:
        raise ConfigError(f"{source}: upstreamTimeout.attempt must not exceed "
                          f"upstreamTimeout.total")
    if not isinstance(config.audit_stdout, bool):
        raise ConfigError(f"{source}: audit.stdout must be true or false, not "
                          f"{config.audit_stdout!r}")
    if not isinstance(config.watch, bool):
        raise ConfigError(f"{source}: watch must be true or false, not {config.watch!r}")
    if config.unmapped not in UNMAPPED:
        raise ConfigError(f"{source}: unmapped must be one of {', '.join(UNMAPPED)}, not "
                          f"{config.unmapped!r}")
    if config.unmapped == "refuse" and not config.principals:
        raise ConfigError(f"{source}: unmapped: refuse without principals would refuse every "
                          "client; add principals, or leave unmapped: default")
    _check_principals(config, source)
    if config.log_level not in LOG_LEVELS:
        raise ConfigError(f"{source}: logLevel must be one of {', '.join(LOG_LEVELS)}")
    if not config.dns:
        raise ConfigError(f"{source}: at least one dns listen address is needed")
    return config


_WILDCARD_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}


def resolve_upstreams(config: Config, resolv_conf: Path = RESOLV_CONF) -> tuple[Upstream, ...]:
    """The configured upstreams, or resolv.conf's nameservers without guardd's own listeners."""
    if config.upstreams:
        return config.upstreams
    own = [(endpoint.host, endpoint.port) for endpoint in config.dns]
    # A wildcard listener is also reachable as loopback: resolv.conf's 127.0.0.1 would be us.
    own += [(_WILDCARD_LOOPBACK[host], port) for host, port in own if host in _WILDCARD_LOOPBACK]
    try:
        return tuple(upstreams_from_resolv_conf(resolv_conf, exclude=own))
    except InvalidHostError as exc:
        raise ConfigError(str(exc)) from None
