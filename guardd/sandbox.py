"""`guardd sandbox up|exec|down`: a network namespace whose only way out is guardd.

What it builds (docs/deploy.md has the picture). An agent namespace `NAME` with one veth link to
guardd's side (this namespace, or `--host-netns`): the agent's end holds `.2` of a /30 and `::2`
of a /64, guardd's end `.1` and `::1`, and the agent's default routes, IPv4 and IPv6, point at
guardd's end. There, an nftables table `inet guardd_NAME` (one table for both families: an IPv6
rule cannot be forgotten) does four things to what comes in from the link:

* **sources (raw):** a packet from any source but the agent's own addresses (and, for ICMPv6
  alone, the link-local and unspecified ones neighbour discovery needs) is dropped: an
  unprivileged process may bind any IPv6 source (IPV6_FREEBIND) and IPv6 has no reverse-path
  filter, so a forged source would otherwise have guardd's answers, and the question the agent
  chose in them, sent anywhere, and pass for another client;
* **prerouting (nat):** DNS, UDP and TCP port 53 to any address, goes to guardd's resolver; every
  other TCP connection, to any address and port, goes to the transparent listener, except those
  to guardd's own SOCKS and HTTP proxy ports;
* **input:** only guardd's ports are open (and ICMPv6 neighbour discovery, without which IPv6
  has no link); everything else the agent sends to guardd's host is dropped, counted; so are
  its UDP queries past `DNS_QUERIES_PER_SECOND` (a flood guardd would have to read), its new
  TCP connections past `NEW_CONNECTIONS_PER_SECOND` (guardd's listen queue is everyone's),
  and its new UDP or TCP flows past `TRACKED_FLOWS` of each tracked at once (**tracking**, at
  prerouting, keeps its UDP flows 30 s and its closed TCP ones 5 s: the host's connection
  tracking table is not the agent's to fill; the kernel needs `ct timeout` and `ct count`,
  nft_ct and nft_connlimit, as Debian's has);
* **forward:** nothing is routed from or to the agent, whatever the host's `ip_forward`.

That table is not the only barrier: a rule that routes nothing comes first for what arrives on
the link (`ip rule iif LINK lookup BLOCKED_TABLE`, both families; the table holds `prohibit
default`), so with the nftables table gone (`nft flush ruleset`, as a restart of Debian's
nftables service does) the agent's packets are refused, not routed on (attack pass). What
guardd's side serves itself is found in the local table, looked up before it.

`/etc/netns/NAME/resolv.conf` names guardd, so `ip netns exec` gives the agent guardd as its
resolver. `exec` runs a command in the namespace as an unprivileged user (a root agent could
`setns` back into the host's namespace), in PID and IPC namespaces of its own, with the host's
/run hidden, no capabilities, groups or inherited descriptors (`exec_argv` says why), and the
proxy variables set (`--no-proxy-env`: without, to use the transparent path).

Why a subcommand and not a shell script: the ruleset and the addresses come from one place
(`Sandbox`), are unit-tested as text, and `guardd run` flags are printed from the same values.
Everything here needs root (ip netns, nft).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from guardd.errors import GuarddError

#: The only PATH the root steps (`up`, `down`, `exec` until it becomes the agent) look tools up
#: in: a directory the agent can write, early in the caller's PATH, would run its `mount` or
#: `ip` as root (attack pass, in theory).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: The routing table, and the priority of the rules (one a family and sandbox) that send what
#: comes in from an agent's link there, before the main table: `prohibit default`, nothing else.
BLOCKED_TABLE = 27250
BLOCKED_PRIORITY = 100
#: Where `up` leaves each sandbox's settings for `exec` and `down`.
STATE_DIR = Path("/run/guardd/sandbox")
#: What `up` and `down` hold, one at a time.
LOCK = Path("/run/guardd/sandbox.lock")
#: Where `ip netns` keeps the namespaces it made.
NETNS_DIR = Path("/run/netns")
NETNS_ETC = Path("/etc/netns")
_NAME = re.compile(r"[a-z][a-z0-9]{0,11}")
#: The agent's end of the link, inside its namespace.
AGENT_LINK = "eth0"
#: UDP queries a second (and a burst of as many) the agent's link passes to guardd's resolver:
#: far more than an agent asks (a cold `npm install` asks hundreds in all), far fewer than a
#: flood guardd's one core could not drain (attack pass: 270,000 a second filled its socket's
#: queue, and the kernel dropped every client's queries alike).
DNS_QUERIES_PER_SECOND = 2000
#: New TCP connections a second the agent may open to guardd (a connect to anywhere is one to
#: its transparent listener): past them, dropped before guardd's listen queue, which every
#: client shares (attack pass 49: 26,000-43,000 connects a second, each reset, filled it, and
#: another client's connects were dropped and took 3 s).
NEW_CONNECTIONS_PER_SECOND = 2000
#: Flows of the agent's link that connection tracking may hold at once, UDP and TCP each
#: (TCP until it has closed, UDP for 30 s after its last datagram: its DNS can use them all,
#: about 270 new source ports a second, and its connects still go): a new one past them is
#: dropped. Far more than an agent needs (guardd takes 256 connections a client on each
#: proxy), far fewer than fill the table of guardd's namespace, the host's by default (attack
#: pass 16: 137,615 entries in 3 minutes, a UDP flow a source port kept alive as an assured
#: stream, and TCP's TIME_WAITs).
TRACKED_FLOWS = 8192


class SandboxError(GuarddError):
    """The sandbox cannot be built, used or removed as asked."""


@dataclass(frozen=True, slots=True)
class Sandbox:
    """One agent sandbox: its namespace, link addresses and guardd's ports."""

    name: str = "agent"
    link4: str = "10.200.0.0/30"
    link6: str = "fd00:6a72:6464::/64"
    dns_port: int = 53
    socks_port: int = 1080
    http_port: int = 3128
    transparent_port: int = 15001
    #: The namespace guardd runs in (None: the one `up` runs in, the host's).
    host_netns: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise SandboxError(f"sandbox name {self.name!r}: use 1-12 lower-case letters and "
                               "digits, starting with a letter (it names interfaces)")
        for what, text, prefix in (("--link4", self.link4, 30), ("--link6", self.link6, 64)):
            try:
                network = ipaddress.ip_network(text)
            except ValueError as exc:
                raise SandboxError(f"{what} {text!r}: {exc}") from None
            if network.prefixlen != prefix or network.version != (4 if prefix == 30 else 6):
                raise SandboxError(f"{what} {text!r}: give an IPv{4 if prefix == 30 else 6} "
                                   f"/{prefix}")
        ports = (self.dns_port, self.socks_port, self.http_port, self.transparent_port)
        if len(set(ports)) != 4 or not all(0 < port < 65536 for port in ports):
            raise SandboxError(f"ports {ports}: four different ports from 1 to 65535")

    # -- addresses ---------------------------------------------------------------------------

    @property
    def guard4(self) -> str:
        return str(ipaddress.ip_network(self.link4)[1])

    @property
    def agent4(self) -> str:
        return str(ipaddress.ip_network(self.link4)[2])

    @property
    def guard6(self) -> str:
        return str(ipaddress.ip_network(self.link6)[1])

    @property
    def agent6(self) -> str:
        return str(ipaddress.ip_network(self.link6)[2])

    @property
    def host_link(self) -> str:
        """guardd's end of the link (an interface name: at most 15 characters)."""
        return f"{self.name}-gd"

    @property
    def table(self) -> str:
        return f"guardd_{self.name}"

    # -- what `up` does ----------------------------------------------------------------------

    def _host(self, *argv: str) -> list[str]:
        """An `ip` command on guardd's side."""
        return ["ip", *(["-n", self.host_netns] if self.host_netns else []), *argv]

    def blocked_routes(self, action: str) -> list[list[str]]:
        """The `ip route` commands (`action`: replace or del) of `BLOCKED_TABLE`'s one route,
        `prohibit default`, both families (one table for every sandbox on guardd's side)."""
        return [self._host(*family, "route", action, "prohibit", "default", "table",
                           str(BLOCKED_TABLE)) for family in ([], ["-6"])]

    def blocked_rules(self, action: str) -> list[list[str]]:
        """The `ip rule` commands (`action`: add or del) that look up what comes in from the
        link in `BLOCKED_TABLE` first, both families."""
        return [self._host(*family, "rule", action, "iif", self.host_link, "lookup",
                           str(BLOCKED_TABLE), "priority", str(BLOCKED_PRIORITY))
                for family in ([], ["-6"])]

    def up_commands(self) -> list[list[str]]:
        """The `ip` commands that build the namespace and its link (routed nowhere before
        it is up)."""
        agent = ["ip", "-n", self.name]
        prefix4 = ipaddress.ip_network(self.link4).prefixlen
        return [
            ["ip", "netns", "add", self.name],
            [*agent, "link", "set", "lo", "up"],
            *self.blocked_routes("replace"),
            *self.blocked_rules("add"),
            self._host("link", "add", self.host_link, "type", "veth", "peer", "name",
                       AGENT_LINK, "netns", self.name),
            self._host("addr", "add", f"{self.guard4}/{prefix4}", "dev", self.host_link),
            self._host("addr", "add", f"{self.guard6}/64", "dev", self.host_link, "nodad"),
            self._host("link", "set", self.host_link, "up"),
            [*agent, "addr", "add", f"{self.agent4}/{prefix4}", "dev", AGENT_LINK],
            [*agent, "addr", "add", f"{self.agent6}/64", "dev", AGENT_LINK, "nodad"],
            [*agent, "link", "set", AGENT_LINK, "up"],
            [*agent, "route", "add", "default", "via", self.guard4],
            [*agent, "-6", "route", "add", "default", "via", self.guard6],
        ]

    def ruleset(self) -> str:
        """The nftables table on guardd's side (see the module's docstring)."""
        link, g4, g6 = self.host_link, self.guard4, self.guard6
        proxies = f"{{ {self.socks_port}, {self.http_port} }}"
        tcp_open = f"{{ {self.dns_port}, {self.socks_port}, {self.http_port}, " \
                   f"{self.transparent_port} }}"
        return f"""\
table inet {self.table} {{
  ct timeout agent_udp {{
    protocol udp; l3proto inet
    policy = {{ unreplied: 30, replied: 30 }}
  }}
  ct timeout agent_tcp {{
    protocol tcp; l3proto inet
    policy = {{ time_wait: 5, close: 5 }}
  }}
  chain sources {{
    type filter hook prerouting priority raw; policy accept;
    iifname "{link}" ip saddr != {self.agent4} counter drop
    iifname "{link}" ip6 saddr != {{ {self.agent6}, fe80::/10, :: }} counter drop
    iifname "{link}" ip6 saddr {{ fe80::/10, :: }} meta l4proto != ipv6-icmp counter drop
  }}
  chain tracking {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "{link}" ct state new meta l4proto udp ct timeout set "agent_udp"
    iifname "{link}" ct state new meta l4proto tcp ct timeout set "agent_tcp"
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{link}" ip daddr {g4} tcp dport {proxies} return
    iifname "{link}" ip6 daddr {g6} tcp dport {proxies} return
    iifname "{link}" meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {g4}:{self.dns_port}
    iifname "{link}" meta l4proto {{ tcp, udp }} th dport 53 dnat ip6 to [{g6}]:{self.dns_port}
    iifname "{link}" meta l4proto tcp dnat ip to {g4}:{self.transparent_port}
    iifname "{link}" meta l4proto tcp dnat ip6 to [{g6}]:{self.transparent_port}
  }}
  chain input {{
    type filter hook input priority filter - 10; policy accept;
    iifname != "{link}" return
    meta l4proto udp th dport {self.dns_port} limit rate over {DNS_QUERIES_PER_SECOND}/second \
burst {DNS_QUERIES_PER_SECOND} packets counter drop
    ct state established,related accept
    meta l4proto tcp ct state new limit rate over {NEW_CONNECTIONS_PER_SECOND}/second \
burst {NEW_CONNECTIONS_PER_SECOND} packets counter drop
    meta l4proto udp ct state new ct count over {TRACKED_FLOWS} counter drop
    meta l4proto tcp ct state new ct count over {TRACKED_FLOWS} counter drop
    icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit }} accept
    ip daddr {g4} tcp dport {tcp_open} accept
    ip6 daddr {g6} tcp dport {tcp_open} accept
    ip daddr {g4} udp dport {self.dns_port} accept
    ip6 daddr {g6} udp dport {self.dns_port} accept
    counter drop
  }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    iifname "{link}" counter drop
    oifname "{link}" counter drop
  }}
}}
"""

    def resolv_conf(self) -> str:
        return f"# guardd sandbox {self.name}: guardd is the only resolver\n" \
               f"nameserver {self.guard4}\nnameserver {self.guard6}\n"

    def proxy_environment(self) -> dict[str, str]:
        """The proxy variables `exec` sets (lower case too: curl reads only `http_proxy`)."""
        socks = f"socks5h://{self.guard4}:{self.socks_port}"
        http = f"http://{self.guard4}:{self.http_port}"
        variables = {"ALL_PROXY": socks, "HTTPS_PROXY": http, "HTTP_PROXY": http}
        return {**variables, **{key.lower(): value for key, value in variables.items()}}

    def guardd_flags(self) -> list[str]:
        """`guardd run` flags that serve this sandbox (its listeners on guardd's end)."""
        def both(port: int) -> list[str]:
            return [f"{self.guard4}:{port}", f"[{self.guard6}]:{port}"]
        return ["--dns", *both(self.dns_port), "--socks", *both(self.socks_port),
                "--http", *both(self.http_port), "--transparent", *both(self.transparent_port),
                "--same-client", f"{self.agent4},{self.agent6}"]


# -- running it ---------------------------------------------------------------------------------


def _try(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a root step, its tools found in `SYSTEM_PATH` only."""
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PATH": SYSTEM_PATH})


def _run(argv: Sequence[str], stdin: str | None = None) -> None:
    result = _try(argv, stdin)
    if result.returncode != 0:
        raise SandboxError(f"{' '.join(argv)} failed: {result.stderr.strip() or result.returncode}")


def _require_root() -> None:
    if os.geteuid() != 0:
        raise SandboxError("the sandbox needs root (ip netns, nftables)")
    for tool in ("ip", "nft"):
        if shutil.which(tool, path=SYSTEM_PATH) is None:
            raise SandboxError(f"{tool} is not installed (Debian: apt install "
                               f"{'iproute2' if tool == 'ip' else 'nftables'})")


def _state(name: str) -> Path:
    return STATE_DIR / f"{name}.json"


@contextlib.contextmanager
def _one_at_a_time() -> Iterator[None]:
    """Hold the sandboxes' lock: one `up` or `down` at a time on this host (review: a `down`
    beside an `up` under way took the routes it had just made, and `up` read a state file
    being written)."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)


def up(sandbox: Sandbox) -> None:
    """Build the sandbox; on any failure, remove what was built."""
    _require_root()
    with _one_at_a_time():
        _up(sandbox)


def _up(sandbox: Sandbox) -> None:
    if (NETNS_DIR / sandbox.name).exists():
        raise SandboxError(f"network namespace {sandbox.name} exists already (guardd sandbox "
                           f"down --name {sandbox.name} removes a sandbox)")
    addresses_free(sandbox)
    try:
        for argv in sandbox.up_commands():
            _run(argv)
        nft = ["nft", "-f", "-"]
        _run(["ip", "netns", "exec", sandbox.host_netns, *nft] if sandbox.host_netns else nft,
             sandbox.ruleset())
        etc = NETNS_ETC / sandbox.name
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(sandbox.resolv_conf())
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        written = _state(sandbox.name).with_suffix(".new")
        written.write_text(json.dumps(asdict(sandbox)))
        written.replace(_state(sandbox.name))
    except BaseException:
        _down(sandbox)
        raise


def up_beside(sandbox: Sandbox) -> Iterator[Sandbox]:
    """The other sandboxes up on `sandbox`'s host namespace (one whose namespace is gone is
    not up)."""
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else ():
        try:
            other = Sandbox(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise SandboxError(f"cannot read {path} ({exc}): remove it if no sandbox "
                               f"{path.stem} is up") from None
        if other.name != sandbox.name and other.host_netns == sandbox.host_netns and \
                (NETNS_DIR / other.name).exists():
            yield other


def addresses_free(sandbox: Sandbox) -> None:
    """Refuse `sandbox` when another one up beside it holds its link addresses (attack pass
    16: a second sandbox on the defaults came up, and guardd's answers to one agent went to
    the other, its queries and their reasons with them)."""
    for other in up_beside(sandbox):
        for flag, mine, theirs in (("--link4", sandbox.link4, other.link4),
                                   ("--link6", sandbox.link6, other.link6)):
            if ipaddress.ip_network(mine).overlaps(ipaddress.ip_network(theirs)):
                raise SandboxError(f"sandbox {other.name} uses {theirs}: give this one "
                                   f"addresses of its own ({flag})")


def load(name: str) -> Sandbox:
    """The settings `up` left for sandbox `name`."""
    try:
        return Sandbox(**json.loads(_state(name).read_text()))
    except FileNotFoundError:
        raise SandboxError(f"no sandbox {name!r} is up (guardd sandbox up --name {name})"
                           ) from None


#: The longest `down` goes on killing what the agent forks.
_ENDING_WAIT = 2.0


def _end_agent(sandbox: Sandbox) -> None:
    """Kill every process in the agent's namespace while its link is there, so that their
    sockets close towards guardd (attack pass 17: taken from under a running agent, the link
    left it alive, and its connections, never closed, held the client's slots in guardd: the
    agent of the next sandbox on those addresses was refused). Each exec's first process is
    among them, and takes its PID namespace with it: what the agent moved to a namespace of
    its own too. Again until none is left, for `_ENDING_WAIT` seconds at most; what is left
    then is said."""
    try:
        namespace = os.stat(NETNS_DIR / sandbox.name)
    except OSError:
        return  # (no namespace: nothing runs in it)
    deadline = time.monotonic() + _ENDING_WAIT
    while True:
        listed = _try(["ip", "netns", "pids", sandbox.name])
        pids = [int(pid) for pid in listed.stdout.split()] if listed.returncode == 0 else []
        if not pids:
            return
        if time.monotonic() > deadline:
            print(f"guardd sandbox down: processes {' '.join(map(str, pids))} of {sandbox.name} "
                  "did not end", file=sys.stderr)
            return
        for pid in pids:
            _kill_in(namespace, pid)
        time.sleep(0.05)


def _kill_in(namespace: os.stat_result, pid: int) -> None:
    """SIGKILL process `pid` if it is in `namespace` (a network namespace's file): held by a
    pidfd first, so that a number reused since it was listed kills no one else (review)."""
    try:
        handle = os.pidfd_open(pid)
    except OSError:
        return  # (gone)
    try:
        found = os.stat(f"/proc/{pid}/ns/net")
        if (found.st_dev, found.st_ino) == (namespace.st_dev, namespace.st_ino):
            signal.pidfd_send_signal(handle, signal.SIGKILL)
    except OSError:
        pass  # (gone meanwhile)
    finally:
        os.close(handle)


def down(sandbox: Sandbox) -> None:
    """Remove the sandbox (`_down`)."""
    _require_root()
    with _one_at_a_time():
        _down(sandbox)


def _reset_connections(sandbox: Sandbox) -> None:
    """Reset the TCP connections the killed agent left, while the link is there: one whose
    data guardd had stopped reading keeps its FIN queued behind that data, and guardd's side
    stayed open past the link (attack pass 19). What is left (a kernel without
    CONFIG_INET_DIAG_DESTROY resets nothing) is said."""
    if not (NETNS_DIR / sandbox.name).exists():
        return
    inside = ["ip", "netns", "exec", sandbox.name, "ss"]
    _try([*inside, "-K", "-t", "-a"])
    left = _try([*inside, "-H", "-t", "-a"]).stdout.strip()
    if left:
        print(f"guardd sandbox down: connections of {sandbox.name} were not reset (guardd "
              f"keeps them until they idle out):\n{left}", file=sys.stderr)


def _down(sandbox: Sandbox) -> None:
    """Remove the sandbox: the agent's processes first (`_end_agent`), its link, its
    namespace, its routing rules, its nftables table last, its files. The other way round,
    the agent's packets were routed for as long as the link outlived the table (attack pass:
    2,631 datagrams reached the outside while a flooding agent's sandbox went down). Each
    step runs whatever the others did, so a half-built sandbox is removed too; but a link that
    stays keeps its rules. The last sandbox on its host namespace (no rule looks
    `BLOCKED_TABLE` up any more, as the kernel says) takes the table's routes with it, and the
    state directory, once empty."""
    _end_agent(sandbox)
    _reset_connections(sandbox)
    link = sandbox._host("link", "del", sandbox.host_link)
    deleted = _try(link)
    if deleted.returncode != 0 and _try(sandbox._host("link", "show", "dev", sandbox.host_link)
                                        ).returncode == 0:
        raise SandboxError(f"{' '.join(link)} failed ({deleted.stderr.strip()}): the agent's "
                           "link is still there, so its rules are left in place")
    for argv in (["ip", "netns", "del", sandbox.name], *sandbox.blocked_rules("del")):
        _try(argv)
    for family, route in zip(([], ["-6"]), sandbox.blocked_routes("del")):
        rules = _try(sandbox._host(*family, "rule", "show", "lookup", str(BLOCKED_TABLE)))
        if rules.returncode == 0 and not rules.stdout.strip():
            _try(route)
    nft = ["nft", "delete", "table", "inet", sandbox.table]
    _try(["ip", "netns", "exec", sandbox.host_netns, *nft] if sandbox.host_netns else nft)
    shutil.rmtree(NETNS_ETC / sandbox.name, ignore_errors=True)
    _state(sandbox.name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # (not empty, or not there)
        STATE_DIR.rmdir()


#: The caller's environment variables the agent gets (never its tokens and credentials).
_PASSED = ("PATH", "LANG", "LC_ALL", "TERM", "TZ")
#: Run inside the agent's new PID and mount namespaces, as root still: hide the host's /run
#: (docker.sock, the D-Bus system bus, systemd-resolved's and nscd's sockets, each another way
#: out or a resolver that is not guardd), then run the agent and wait for it. This shell stays
#: the namespace's first process, root, out of the agent's reach: killed with `unshare`
#: (`--kill-child`), it takes every process of the namespace with it. Were the agent that
#: process, it could ask the kernel not to be killed with its parent (attack pass 18:
#: `prctl(PR_SET_PDEATHSIG, 0)`, and it outlived its exec).
_HIDE_RUN = ('{ [ ! -d /etc/guardd ] || mount -t tmpfs -o mode=0755,nosuid,nodev '
             'guardd-sandbox-config /etc/guardd; } && '  # (before /run: mount writes there)
             'mount -t tmpfs -o mode=0755,nosuid,nodev guardd-sandbox-run /run'
             ' && "$@"; exit "$?"')  # (not last: bash would exec it, not wait: review)


def exec_argv(sandbox: Sandbox, command: Sequence[str], user: str, proxy_env: bool
              ) -> list[str]:
    """The command line that runs `command` in the sandbox as `user`.

    Only the network is guardd's to guard, but nothing else may hand the agent a way around it:
    it gets PID and IPC namespaces of its own (no host process of the same user to take a
    socket from with pidfd_getfd or ptrace), a session of its own (no controlling terminal to
    push commands into the caller's shell with TIOCSTI), an empty /run and /etc/guardd (the
    daemon's config may hold other principals' proxy passwords: attack pass), no
    supplementary groups (a `docker` group is root), no capabilities and none to gain
    (no_new_privs, an empty bounding set), none of its caller's environment but `_PASSED` (no
    tokens), and the proxy variables unless not wanted. It ends when the exec does, killed or
    not: its namespace's first process, a root shell that waits for it (`_HIDE_RUN`), is
    killed with `unshare`, and takes every other with it.
    """
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise SandboxError(f"no user {user!r} on this host (--user)") from None
    if entry.pw_uid == 0:
        raise SandboxError("the agent must not run as root: with CAP_SYS_ADMIN it could enter "
                           "the host's network namespace again (--user)")
    variables = sandbox.proxy_environment() if proxy_env else {}
    return ["ip", "netns", "exec", sandbox.name,
            "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "--ipc", "--",
            "sh", "-c", _HIDE_RUN, "sh",
            "setsid", "--wait",  # no controlling terminal: TIOCSTI would type into the caller's
            "setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
            # Killed with `unshare`, so with the exec: `--kill-child` asks the kernel for that,
            # which forgets it when the user changes (attack pass 16: a killed exec left the
            # agent running, its network through guardd still there); set again after it.
            "--pdeathsig=KILL",
            "env", "-i", *(f"{key}={os.environ[key]}" for key in _PASSED if key in os.environ),
            f"HOME={entry.pw_dir}", f"USER={user}", f"LOGNAME={user}",
            *(f"{key}={value}" for key, value in variables.items()), *command]


def main(args: argparse.Namespace) -> int:
    """`guardd sandbox ACTION` (see `add_parser`)."""
    if args.action == "up":
        sandbox = Sandbox(args.name, args.link4, args.link6, args.dns_port, args.socks_port,
                          args.http_port, args.transparent_port, args.host_netns)
        up(sandbox)
        flags = " ".join(sandbox.guardd_flags())
        print(f"sandbox {sandbox.name} is up: the agent is {sandbox.agent4} and "
              f"{sandbox.agent6}, guardd {sandbox.guard4} and {sandbox.guard6}\n"
              f"serve it with: guardd run {flags} --policy POLICY\n"
              f"run the agent with: guardd sandbox exec --name {sandbox.name} -- COMMAND")
        return 0
    sandbox = load(args.name)
    if args.action == "down":
        down(sandbox)
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SandboxError("guardd sandbox exec: give the command after --")
    _require_root()
    return run_exec(exec_argv(sandbox, command, args.user, not args.no_proxy_env))


#: What ends an exec as its caller asks: each is answered with the agent's end.
_ENDING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def run_exec(argv: Sequence[str]) -> int:
    """Run `argv` (`exec_argv`) to its end: the agent's exit status, or 128 + the signal that
    ended the exec.

    Not an `exec` of it: `unshare --fork` blocks SIGTERM and SIGINT while it waits (util-linux
    2.38), and the agent has a session of its own, so `kill`, `timeout` and Ctrl-C reached
    neither and the agent ran on, its network through guardd still there (attack pass 17). So
    this process stays the agent's parent: each of `_ENDING_SIGNALS` is answered with SIGKILL to
    `unshare`, whose `--kill-child` ends the agent's PID namespace; and killed itself, it takes
    `unshare` along by the parent-death signal `setpriv` sets in front of `ip netns exec`.
    Nothing the caller left open but stdin, stdout and stderr goes to the agent."""
    ended: list[int] = []
    child: subprocess.Popen[bytes] | None = None

    def end(signum: int, _frame: object) -> None:
        ended.append(signum)
        if child is not None:
            child.kill()

    before = {each: signal.signal(each, end) for each in _ENDING_SIGNALS}
    try:
        sys.stdout.flush()
        child = subprocess.Popen(["setpriv", "--pdeathsig=KILL", "--", *argv],
                                 env={**os.environ, "PATH": SYSTEM_PATH})
        if ended:  # (a signal before `child` was known)
            child.kill()
        status = child.wait()
    finally:
        for each, handler in before.items():
            signal.signal(each, handler)
    return 128 + ended[0] if ended else status if status >= 0 else 128 - status


def add_parser(commands: argparse._SubParsersAction) -> None:
    defaults = Sandbox()
    parser = commands.add_parser(
        "sandbox", help="an agent network namespace whose only way out is guardd (root)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    named = argparse.ArgumentParser(add_help=False)
    named.add_argument("--name", default=defaults.name, help="the agent namespace's name "
                       f"(default {defaults.name})")
    build = actions.add_parser("up", parents=[named], help="build the sandbox")
    build.add_argument("--link4", default=defaults.link4, metavar="CIDR",
                       help=f"the link's IPv4 /30 (default {defaults.link4})")
    build.add_argument("--link6", default=defaults.link6, metavar="CIDR",
                       help=f"the link's IPv6 /64 (default {defaults.link6})")
    for port, what in (("dns", "DNS"), ("socks", "SOCKS5"), ("http", "HTTP proxy"),
                       ("transparent", "transparent")):
        default = getattr(defaults, f"{port}_port")
        build.add_argument(f"--{port}-port", type=int, default=default,
                           help=f"guardd's {what} port on the link (default {default})")
    build.add_argument("--host-netns", metavar="NS",
                       help="the namespace guardd runs in (default: this one)")
    run = actions.add_parser("exec", parents=[named],
                             help="run a command in the sandbox as the agent")
    run.add_argument("--user", default="nobody",
                     help="the user the agent runs as: never root, and best an account of its "
                          "own that no host process uses (default nobody)")
    run.add_argument("--no-proxy-env", action="store_true",
                     help="no proxy variables (the agent goes through the transparent "
                          "listener)")
    run.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    actions.add_parser("down", parents=[named], help="remove the sandbox")
    parser.set_defaults(handler=main)
