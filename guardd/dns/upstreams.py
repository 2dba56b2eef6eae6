"""Which upstream DNS servers to ask: their addresses, from flags or resolv.conf. No I/O on the
network and no asyncio, so the configuration and the command line can use it without the
forwarder (`dns.resolver`), which uses it too."""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from guardd.addr import split_host_port
from guardd.errors import ConfigError
from guardd.net import hostport

DNS_PORT = 53
_UPSTREAM_EXAMPLES = "such as 192.0.2.53, 192.0.2.53:5353, 2001:db8::53 or [2001:db8::53]:5353"


@dataclass(frozen=True, slots=True)
class Upstream:
    """An upstream DNS server; `host` is always a canonical IP literal, never a name."""

    host: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        return hostport(self.host, self.port)


def parse_upstream(text: str) -> Upstream:
    """Parse ``ADDRESS[:PORT]`` (IPv6 with a port in brackets). Names are refused: resolving the
    resolver's own address would need a resolver."""
    try:
        host, port = split_host_port(text)
        address = _server_address(host)
    except ValueError as exc:  # InvalidHostError is a ValueError too
        raise ConfigError(f"invalid upstream DNS server {text!r}: {exc}; give an IP address "
                          f"with an optional port, {_UPSTREAM_EXAMPLES}") from None
    return Upstream(address) if port is None else Upstream(address, port)


def upstreams_from_resolv_conf(
    path: str | PathLike[str] = "/etc/resolv.conf",
    exclude: Collection[tuple[str, int]] = (),
) -> list[Upstream]:
    """The ``nameserver`` lines of resolv.conf, without guardd's own listeners (`exclude`, as
    (address, port)): forwarding to ourselves would loop. Lines glibc would not use are skipped."""
    own = {(str(ipaddress.ip_address(host)), port) for host, port in exclude}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc.strerror}) to find upstream DNS servers; "
                          "pass --upstream ADDRESS[:PORT]") from None
    upstreams = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            upstream = Upstream(_server_address(fields[1]))
        except ValueError:
            continue
        if (upstream.host, upstream.port) not in own:
            upstreams.append(upstream)
    if not upstreams:
        raise ConfigError(f"{path} names no usable upstream DNS server (guardd's own listeners "
                          "and 0.0.0.0 do not count); pass --upstream ADDRESS[:PORT]")
    return upstreams


def _server_address(host: str) -> str:
    """The canonical text of an IP address one can send to; ValueError otherwise."""
    address = ipaddress.ip_address(host)
    if address.is_unspecified:
        raise ValueError(f"{host} means 'this host', not a server")
    return str(address)
