"""`guardd sandbox`: the agent's only way out is guardd, proven from inside the sandbox.

Three namespaces, all made here, none with a route to the real network:

* **guard**, which routes (ip_forward on, as on a Docker host): guardd (DNS, SOCKS5, HTTP proxy,
  transparent listener on the sandbox link) and the test's upstream DNS server on its
  loopback; the sandbox's nftables table lives here;
* **agent**: built by `guardd sandbox up --host-netns GUARD`; every command runs through
  `guardd sandbox exec` (as `nobody`, no capabilities), with its default resolver;
* **world** (`tests.e2e.world`), linked to guard only: allowed.example's servers, traps and a
  fake metadata service, each counting what arrives: nothing may.
"""

from __future__ import annotations

import fcntl
import os
import pty
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from guardd.sandbox import TRACKED_FLOWS
from guardd.sandbox import Sandbox as SandboxSettings
from tests.e2e.harness import GUARDD, ROOT, Guardd, Upstream, dns_query, require, run
from tests.e2e.world import (ALLOWED, META4, META6, TRAP4, TRAP6, WEB4, WEB6, WEB_LIMITED_PORT,
                             ZONES, World, ip, world)

NAME = f"sbx{os.getpid() % 100000}"
#: A name of the web server's too, under a rate limit at a port of its own (a connect by
#: address stands for every name the agent resolved there: the others' stay unlimited).
LIMITED = "limited.example"
POLICY = f"""\
version: "1.0"
rules:
  - {{id: tunnels, action: "*", domain: ["*.ngrok.io", "*.oast.fun"], effect: deny,
     reason: "tunnels and callback services"}}
  - {{id: limited, action: network.request, domain: {LIMITED}, port: {WEB_LIMITED_PORT},
     effect: allow, rateLimit: {{maxRequests: 2, window: "10 minutes"}}}}
  - {{id: allowed, action: "*", domain: [{ALLOWED}, {LIMITED}], effect: allow}}
  - {{id: meta-name, action: "*", domain: meta.example, effect: allow}}
"""
METADATA_HOSTS = [META4, "2852039166", "0xa9fea9fe", "0251.0376.0251.0376", "169.254.43518",
                  "[::ffff:169.254.169.254]", "[::ffff:a9fe:a9fe]", "[fd00:ec2::254]",
                  "meta.example", "169.254.169.254."]


@dataclass
class Sandbox:
    guard_netns: str
    world: World
    guardd: Guardd
    upstream: Upstream

    def agent(self, *command: str, proxy: bool = False, timeout: float = 30
              ) -> subprocess.CompletedProcess[str]:
        """`command` inside the sandbox, as the agent: its default resolver, proxy variables
        only when `proxy`."""
        return run([*GUARDD, "sandbox", "exec", "--name", NAME, "--user", "nobody",
                    *([] if proxy else ["--no-proxy-env"]), "--", *command], timeout=timeout,
                   cwd=ROOT)

    def curl(self, url: str, *options: str, proxy: bool = False) -> tuple[int, str]:
        """curl's exit code and what it printed (the body, then the status code)."""
        result = self.agent(require("curl"), "-sS", "--globoff", "--max-time", "8", "--cacert",
                            str(self.world.cert), "-w", "\n%{http_code}", *options, url, proxy=proxy)
        return result.returncode, result.stdout + result.stderr

    def arrived(self) -> list[str]:
        return self.world.arrived()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    if os.geteuid() != 0:
        pytest.skip("the sandbox needs root (ip netns, nftables)")
    for tool in ("ip", "nft", "curl", "dig", "setpriv", "openssl"):
        require(tool)
    guard = f"{NAME}-guard"
    directory = Path(tempfile.mkdtemp(prefix="guardd-sandbox-"))
    os.chmod(directory, 0o755)  # the agent (nobody) reads the certificate
    run(["ip", "netns", "add", guard]).check_returncode()
    try:
        ip(guard, "link", "set", "lo", "up")
        with world(guard, f"{NAME}-world", directory) as outside:
            result = run([*GUARDD, "sandbox", "up", "--name", NAME, "--host-netns", guard,
                          "--dns-port", "53"], cwd=ROOT)
            assert result.returncode == 0, result.stderr
            flags = re.search(r"guardd run (.*) --policy", result.stdout)
            assert flags, result.stdout
            upstream = Upstream(directory, {**ZONES, LIMITED: ZONES[ALLOWED]}, netns=guard)
            policy = directory / "policy.yaml"
            policy.write_text(POLICY)
            try:
                daemon = Guardd.launch(directory, *flags[1].split(), "--policy", str(policy),
                                       "--upstream", upstream.address, "--metrics",
                                       "127.0.0.1:0", netns=guard)
                try:
                    yield Sandbox(guard, outside, daemon, upstream)
                finally:
                    daemon.stop()
            finally:
                upstream.stop()
    finally:
        run([*GUARDD, "sandbox", "down", "--name", NAME], cwd=ROOT)
        run(["ip", "netns", "del", guard])
        shutil.rmtree(directory, ignore_errors=True)


def test_the_agent_resolves_through_guardd_with_its_default_resolver(sandbox: Sandbox) -> None:
    answer = sandbox.agent(require("dig"), "+short", "+tries=1", "+time=5", ALLOWED)
    assert answer.stdout.split() == [WEB4], answer
    answer = sandbox.agent(require("dig"), "+short", "+tries=1", "+time=5", ALLOWED, "AAAA")
    assert answer.stdout.split() == [WEB6], answer


@pytest.mark.parametrize("name", ["x.ngrok.io", "abc123.oast.fun"])
def test_tunnel_and_callback_names_are_nxdomain_and_never_asked_upstream(
        sandbox: Sandbox, name: str) -> None:
    answer = sandbox.agent(require("dig"), "+tries=1", "+time=5", name)
    assert "status: NXDOMAIN" in answer.stdout, answer.stdout
    assert name not in sandbox.upstream.queries()


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_allowed_names_reached_without_proxy_variables_through_the_transparent_listener(
        sandbox: Sandbox, family: str) -> None:
    code, out = sandbox.curl(f"https://{ALLOWED}/tls", family)
    assert code == 0 and out.endswith("\n200"), out
    assert f"GET /tls host={ALLOWED}" in out
    code, out = sandbox.curl(f"http://{ALLOWED}/plain", family)
    assert code == 0 and out.endswith("\n200"), out
    records = sandbox.guardd.audit_records("listener=transparent", "effect=allow")
    assert any(r["domain"] == ALLOWED and r["ip"] == (WEB4 if family == "-4" else WEB6)
               for r in records), records


@pytest.mark.parametrize("proxy", ["socks5h", "http"])
def test_allowed_names_reached_through_the_proxy_variables(sandbox: Sandbox, proxy: str) -> None:
    option = "--socks5-hostname" if proxy == "socks5h" else "--proxy"
    address = f"{'socks5h' if proxy == 'socks5h' else 'http'}://10.200.0.1:" \
              f"{1080 if proxy == 'socks5h' else 3128}"
    code, out = sandbox.curl(f"https://{ALLOWED}/proxied", option, address, proxy=True)
    assert code == 0 and out.endswith("\n200"), out
    code, out = sandbox.curl(f"https://{ALLOWED}/env", proxy=True)  # HTTPS_PROXY from exec
    assert code == 0 and out.endswith("\n200"), out


def test_the_agents_two_addresses_are_one_client(sandbox: Sandbox) -> None:
    """Attack pass: the agent's IPv4 and IPv6 addresses were two clients, so every per-client
    budget was doubled: a rule's rate limit of 2 let 4 requests through, 2 over each."""
    answered = [sandbox.curl(f"http://{LIMITED}:{WEB_LIMITED_PORT}/{n}", family)
                for n, family in enumerate(["-4", "-6", "-6", "-4"])]
    assert [code == 0 and out.endswith("\n200") for code, out in answered] == [
        True, True, False, False], answered
    records = sandbox.guardd.audit_records("listener=transparent", "matchedRule=limited")
    requests = [r["effect"] for r in records if r.get("method")]
    denied = [r for r in records if r["effect"] == "deny"]
    assert requests == ["allow", "allow"] and len(denied) == 2, records
    assert all("rate limit" in str(r["reason"]) for r in denied), denied
    assert {r["client"] for r in denied} == {"10.200.0.2", "fd00:6a72:6464::2"}, denied


def test_tls_without_a_server_name_is_judged_by_the_address(sandbox: Sandbox) -> None:
    """Attack pass: TLS with no SNI to an allowed name's address was judged as that name, and
    a shared server routed the Host inside it to a name the policy denies. It names no site:
    judged by `ip` rules at the address, which allow nothing here."""
    probe = ("import socket,ssl,sys; a=socket.getaddrinfo(sys.argv[1], 443, socket.AF_INET, "
             "socket.SOCK_STREAM)[0][4]; c=ssl.create_default_context(); c.check_hostname=False; "
             "c.verify_mode=ssl.CERT_NONE\ntry:\n s=c.wrap_socket(socket.create_connection(a, 8),"
             " server_hostname=None); s.sendall(b'GET /nosni HTTP/1.1\\r\\nHost: '+"
             "sys.argv[1].encode()+b'\\r\\nConnection: close\\r\\n\\r\\n'); "
             "print('reached', s.recv(4096))\nexcept OSError as e:\n print('refused', e)")
    result = sandbox.agent("python3", "-c", probe, ALLOWED)
    assert "refused" in result.stdout and "/nosni" not in result.stdout, result
    records = sandbox.guardd.audit_records("listener=transparent", "effect=deny")
    assert any("without a server name" in str(r["reason"]) for r in records), records


def test_a_connection_reset_before_its_first_bytes_named_a_server_is_recorded(
        sandbox: Sandbox) -> None:
    """Attack pass (2026-12-06): to an address no rule allows, part of a TLS hello, then a
    reset: the read's error ended the connection unrecorded (closed cleanly, it was recorded),
    so an agent probed denied destinations without a trace in the trail."""
    probe = ("import socket,struct,sys\nfor _ in range(3):\n s=socket.create_connection("
             "(sys.argv[1], 443), 8); s.sendall(bytes.fromhex('16030100050100'))\n "
             "s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0)); "
             "s.close()\nprint('sent')")
    assert "sent" in sandbox.agent("python3", "-c", probe, TRAP4).stdout
    deadline = time.monotonic() + 10
    while True:
        reset = [r for r in sandbox.guardd.audit_records("listener=transparent",
                                                         "effect=deny", f"target={TRAP4}:443")
                 if "the client reset the connection" in str(r["reason"])]
        if len(reset) == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(reset) == 3, reset
    assert sandbox.arrived() == []


@pytest.mark.parametrize("host", METADATA_HOSTS)
def test_the_metadata_service_is_unreachable_by_name_by_any_encoding_and_directly(
        sandbox: Sandbox, host: str) -> None:
    for options, proxy in (((), False), (("--proxy", "http://10.200.0.1:3128"), True),
                           (("--socks5-hostname", "10.200.0.1:1080"), True)):
        code, out = sandbox.curl(f"http://{host}/latest/meta-data/", *options, proxy=proxy)
        assert not out.endswith("\n200"), (options, out)
    assert sandbox.arrived() == []


@pytest.mark.parametrize("address", [TRAP4, TRAP6])
def test_nothing_else_leaves_tcp_udp_or_dns_to_any_address(sandbox: Sandbox,
                                                           address: str) -> None:
    url_host = f"[{address}]" if ":" in address else address
    for port in (80, 443, 22):
        code, out = sandbox.curl(f"http://{url_host}:{port}/")
        assert code != 0, out
    probe = ("import socket,sys; a=sys.argv[1]; s=socket.socket(socket.AF_INET6 if ':' in a "
             "else socket.AF_INET, socket.SOCK_DGRAM); [s.sendto(b'x', (a, p)) for p in "
             "(9999, 53)]")
    sent = sandbox.agent("python3", "-c", probe, address)
    assert sent.returncode == 0, sent.stderr
    answer = sandbox.agent(require("dig"), f"@{address}", "+tries=1", "+time=5", ALLOWED)
    assert "status: NOERROR" in answer.stdout, answer.stdout  # guardd answered it
    answer = sandbox.agent(require("dig"), f"@{address}", "+tcp", "+tries=1", "+time=5",
                           "x.ngrok.io")
    assert "status: NXDOMAIN" in answer.stdout, answer.stdout
    assert sandbox.arrived() == []


@pytest.mark.parametrize("forged", [TRAP6, META6])
def test_a_forged_source_address_never_turns_guardds_answers_into_a_way_out(
        sandbox: Sandbox, forged: str) -> None:
    """An unprivileged agent may bind any IPv6 source (IPV6_FREEBIND) and has no reverse-path
    filter to stop it: a query to guardd from a trap's address would have its answer, the
    question the agent chose included, sent to the trap (found by the red-team pass)."""
    forge = ("import socket,sys; s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); "
             "s.setsockopt(socket.IPPROTO_IPV6, 78, 1); s.bind((sys.argv[1], 9999)); "
             "q=bytes.fromhex(sys.argv[2]); [s.sendto(q, (sys.argv[3], 53)) for _ in range(3)]")
    sent = sandbox.agent("python3", "-c", forge, forged,
                         dns_query("secret-data.example", 7).hex(), "fd00:6a72:6464::1")
    assert sent.returncode == 0, sent.stderr  # the kernel lets the agent send it
    time.sleep(0.5)
    assert sandbox.arrived() == []
    assert not any(r.get("client") == forged for r in sandbox.guardd.audit_records())


def test_a_dns_flood_from_the_agent_is_dropped_before_guardd_reads_it(sandbox: Sandbox
                                                                      ) -> None:
    """Attack pass (2026-12-04): a flood from one socket (which conntrack soon calls
    established) filled guardd's socket queue past what its one core drains. The link drops
    what is over `DNS_QUERIES_PER_SECOND`; the agent's resolver is answered again after."""
    flood = ("import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             "q=bytes.fromhex(sys.argv[1]); [s.sendto(q, (sys.argv[2], 53)) for _ in "
             "range(20000)]")
    sent = sandbox.agent("python3", "-c", flood, dns_query("flood.ngrok.io", 9).hex(),
                         "10.200.0.1")
    assert sent.returncode == 0, sent.stderr
    table = run(["ip", "netns", "exec", sandbox.guard_netns, "nft", "list", "chain", "inet",
                 f"guardd_{NAME}", "input"])
    dropped = re.search(r"limit rate over \d+/second burst \d+ packets counter packets (\d+)",
                        table.stdout)
    assert dropped and int(dropped[1]) >= 10000, table.stdout
    time.sleep(1.5)  # (the limit's bucket refills)
    test_the_agent_resolves_through_guardd_with_its_default_resolver(sandbox)


def test_the_agent_sees_no_process_socket_or_descriptor_of_the_host(sandbox: Sandbox) -> None:
    """Only the network is guardd's to guard, but `exec` must not hand the agent another way
    out: a host process of the same user (pidfd_getfd takes its sockets), a socket under /run
    (docker, D-Bus, systemd-resolved, which resolves names without guardd), a descriptor its
    caller left open (found by the red-team pass), or its caller's tokens (found by review)."""
    config = Path("/etc/guardd")
    made = not config.exists()
    if made:  # (attack pass: the daemon's config there held other principals' passwords)
        config.mkdir()
        (config / "guardd.yaml").write_text("socksUsers: {ci-bot: s3cret}\n")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as leaked:
            result = subprocess.run(
                [*GUARDD, "sandbox", "exec", "--name", NAME, "--", "sh", "-c",
                 "ls /proc | grep -c '^[0-9]'; ls -A /run | wc -l; echo $(ls /proc/self/fd); "
                 "id -G; env | grep -c GUARDD_TEST_TOKEN; ls -A /etc/guardd | wc -l"],
                env={**os.environ, "GUARDD_TEST_TOKEN": "secret"},
                cwd=ROOT, capture_output=True, text=True, timeout=30, pass_fds=(leaked.fileno(),))
    finally:
        if made:
            shutil.rmtree(config)
    processes, run_entries, descriptors, groups, token, config_entries = (
        result.stdout.splitlines() + [""] * 6)[:6]
    assert config_entries.strip() == "0", result.stdout
    assert int(processes) <= 4, result.stdout  # sh, ls, grep (and the init of its namespace)
    assert run_entries.strip() == "0", result.stdout
    assert set(descriptors.split()) <= {"0", "1", "2", "3"}, descriptors  # 3: ls's own
    assert groups.split() == [str(nobody_gid())], groups
    assert token == "0", result.stdout  # the caller's environment stays with the caller


#: An agent that asks the kernel not to end it with its parent (prctl PR_SET_PDEATHSIG 0),
#: then writes to `sys.argv[1]` every 0.1 s.
LINGERING = ("import ctypes,sys,time; ctypes.CDLL(None).prctl(1, 0, 0, 0, 0)\n"
             "open(sys.argv[1], 'w').write('started')\n"
             "while True: open(sys.argv[1], 'a').write(' alive'); time.sleep(0.1)")


def _kill_what_runs_in_the_sandbox() -> None:
    """What a test left running in the agent's namespace (on the code before a fix)."""
    for pid in run(["ip", "netns", "pids", NAME]).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("ending", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT,
                                    signal.SIGHUP, signal.SIGQUIT], ids=lambda ending: ending.name)
def test_the_agent_ends_with_the_exec_that_runs_it(sandbox: Sandbox, ending: signal.Signals
                                                   ) -> None:
    """Attack pass 16: `unshare --kill-child` had the kernel kill the agent when `exec` ended,
    but the kernel forgets that at the agent's change of user: a `guardd sandbox exec` killed
    (by `timeout`, a supervisor, a harness) left the agent running, its network through
    guardd still there. Attack pass 17: SIGTERM and SIGINT (`kill`, `timeout`, Ctrl-C) did
    not end it at all, `unshare --fork` blocks them. Attack pass 18: an agent that cleared its
    own parent-death signal outlived its exec, whatever ended it: it was its namespace's first
    process. Each signal goes to the exec alone."""
    shared = Path(tempfile.mkdtemp(prefix="guardd-sandbox-exec-"))  # (the agent writes there)
    shared.chmod(0o777)
    marker = shared / "alive"
    marker.touch()
    marker.chmod(0o666)
    running = subprocess.Popen(
        [*GUARDD, "sandbox", "exec", "--name", NAME, "--", "python3", "-c", LINGERING,
         str(marker)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while "alive" not in marker.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "alive" in marker.read_text(), "the agent did not start"
    finally:
        os.kill(running.pid, ending)
        try:
            status = running.wait(10)
        finally:
            if running.poll() is None:  # (what it runs, in the host's view, goes too)
                os.killpg(running.pid, signal.SIGKILL)
        assert status == (-ending if ending is signal.SIGKILL else 128 + ending)
    time.sleep(0.5)
    size = marker.stat().st_size
    time.sleep(1)
    ran_on = marker.stat().st_size != size
    shutil.rmtree(shared)
    _kill_what_runs_in_the_sandbox()
    assert not ran_on, "the agent runs on after its exec was killed"


def test_the_agent_cannot_type_into_its_callers_terminal(sandbox: Sandbox) -> None:
    """TIOCSTI pushes bytes into a terminal's input: on the caller's controlling terminal, they
    are run by the caller's shell, in the host's namespace, when the agent exits (red team).
    The agent runs in a session of its own, without a controlling terminal."""
    controller, terminal = pty.openpty()

    def take_terminal() -> None:  # the caller, as a root shell on a terminal would be
        os.setsid()
        fcntl.ioctl(terminal, termios.TIOCSCTTY, 0)

    inject = ("import fcntl, termios\ntry:\n    fcntl.ioctl(0, termios.TIOCSTI, b'x')\n"
              "    print('injected')\nexcept OSError as exc:\n    print('refused', exc.errno)")
    try:
        result = subprocess.run([*GUARDD, "sandbox", "exec", "--name", NAME, "--", "python3",
                                 "-c", inject], stdin=terminal, capture_output=True, text=True,
                                cwd=ROOT, timeout=30, preexec_fn=take_terminal)
    finally:
        os.close(controller)
        os.close(terminal)
    assert result.stdout.strip() == "refused 1", result.stdout + result.stderr


def nobody_gid() -> int:
    return pwd.getpwnam("nobody").pw_gid


def test_guardds_host_is_closed_but_for_its_ports(sandbox: Sandbox) -> None:
    """The agent reaches guardd's listeners and nothing else of its host: another TCP port is
    judged as a connect (and refused: a private address), UDP is dropped."""
    code, out = sandbox.curl("http://10.200.0.1:9477/metrics")
    assert code != 0 and "guardd_" not in out, out
    # (attack pass: a Host naming a site made it judged as that name, recorded without the
    # address, after waiting for the first bytes: no name opens guardd's host)
    code, out = sandbox.curl("http://10.200.0.1:9477/metrics", "-H", f"Host: {ALLOWED}")
    assert code != 0 and "guardd_" not in out, out
    records = sandbox.guardd.audit_records("listener=transparent", "effect=deny")
    assert [(r["ip"], r.get("domain"), r["reason"]) for r in records if r.get("port") == 9477] == [
        ("10.200.0.1", None, "no rule allows this destination (default deny)")] * 2, records


def test_the_trail_and_the_metrics_count_every_decision(sandbox: Sandbox) -> None:
    sandbox.curl(f"https://{ALLOWED}/counted")
    sandbox.curl(f"http://{TRAP4}/")
    samples = sandbox.guardd.scrape()
    transparent = {key: value for key, value in samples.items()
                   if key.startswith("guardd_decisions_total{") and 'listener="transparent"' in key}
    assert any('effect="allow"' in key and value >= 1 for key, value in transparent.items()), \
        transparent
    assert any('effect="deny"' in key and value >= 1 for key, value in transparent.items()), \
        transparent
    verify = sandbox.guardd.cli("audit", "verify", "--audit", str(sandbox.guardd.audit_dir))
    assert "chain intact" in verify.stdout


def test_the_agent_cannot_fill_the_hosts_connection_tracking(sandbox: Sandbox) -> None:
    """Attack pass 16: a flow a source port, and TCP's TIME_WAITs, put 137,615 entries in the
    connection tracking table of guardd's namespace (the host's, by default) in 3 minutes;
    a smaller host would have dropped every new flow, its own too. New flows past
    `TRACKED_FLOWS` are dropped (a UDP socket a query, paced under the DNS limit), and a
    closed TCP connection leaves its entry 5 s, not 120."""
    conntrack = ["ip", "netns", "exec", sandbox.guard_netns, require("conntrack")]
    sandbox.curl(f"http://{ALLOWED}/unruled")  # (a TCP connection, closed)
    waits = [int(found) for found in re.findall(
        r"^tcp +6 (\d+) TIME_WAIT src=10\.200\.0\.2 ", run([*conntrack, "-L"]).stdout,
        re.MULTILINE)]
    assert waits and max(waits) <= 5, waits
    flows = TRACKED_FLOWS + 1000
    flood = ("import socket,sys,time; q=bytes.fromhex(sys.argv[1])\n"
             "for i in range(int(sys.argv[3])):\n"
             " s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', 20000 + i))\n"
             " s.sendto(q, (sys.argv[2], 53)); s.close()\n"
             # (a port of its own each: random ones meet again, and are one flow)
             " if i % 180 == 179: time.sleep(0.1)")  # (under the DNS limit, 2,000 a second)
    table = f"guardd_{NAME}"
    nft = ["ip", "netns", "exec", sandbox.guard_netns, "nft"]
    try:
        sent = sandbox.agent("python3", "-c", flood, dns_query("flood.ngrok.io", 9).hex(),
                             "10.200.0.1", str(flows), timeout=60)
        assert sent.returncode == 0, sent.stderr
        chain = run([*nft, "list", "chain", "inet", table, "input"]).stdout
        dropped = re.search(r"udp ct state new ct count over \d+ counter packets (\d+)", chain)
        assert dropped and int(dropped[1]) >= 900, chain
        code, out = sandbox.curl(f"https://{ALLOWED}/unruled", proxy=True)  # (its DNS spent)
        assert code == 0 and out.endswith("\n200"), out
        tracked = int(run([*conntrack, "-C"]).stdout)
        assert tracked < TRACKED_FLOWS + 500, tracked
    finally:  # (a table anew counts anew: the agent's DNS goes on for the tests after)
        run([*nft, "delete", "table", "inet", table]).check_returncode()
        rules = SandboxSettings(name=NAME, host_netns=sandbox.guard_netns, dns_port=53).ruleset()
        run([*nft, "-f", "-"], input=rules).check_returncode()
    test_the_agent_resolves_through_guardd_with_its_default_resolver(sandbox)


def test_without_its_nftables_table_the_link_routes_nothing(sandbox: Sandbox) -> None:
    """Attack pass (2026-12-04): `nft flush ruleset` in guardd's namespace (as a restart of
    Debian's nftables service does) left the agent's link routed: its packets reached the
    world directly, judged by nobody. The link's routing rule refuses them still; guardd's
    own ports still answer. (The table is put back after.)"""
    table = f"guardd_{NAME}"
    nft = ["ip", "netns", "exec", sandbox.guard_netns, "nft"]
    run([*nft, "delete", "table", "inet", table]).check_returncode()
    try:
        probe = ("import socket,sys; a=sys.argv[1]; s=socket.socket(socket.AF_INET6 if ':' in a "
                 "else socket.AF_INET, socket.SOCK_DGRAM)\ntry: s.sendto(b'x', (a, 9999))\n"
                 "except OSError as e: print(e.errno)")
        for address in (TRAP4, TRAP6):
            sent = sandbox.agent("python3", "-c", probe, address)
            assert sent.returncode == 0, sent.stderr
            url_host = f"[{address}]" if ":" in address else address
            code, out = sandbox.curl(f"http://{url_host}:80/")
            assert code != 0, out
        code, out = sandbox.curl(f"https://{ALLOWED}/unruled", proxy=True)
        assert code == 0 and out.endswith("\n200"), out
        time.sleep(0.5)
        assert sandbox.arrived() == []
    finally:
        rules = SandboxSettings(name=NAME, host_netns=sandbox.guard_netns, dns_port=53).ruleset()
        run([*nft, "-f", "-"], input=rules).check_returncode()


def test_down_ends_the_agent_and_its_connections_to_guardd(sandbox: Sandbox) -> None:
    """Attack pass 17: `down` took the link from under a running agent, which lived on in its
    namespace, and its connections to guardd, never closed, held the client's slots (the
    agent of the next sandbox on those addresses was refused). Attack pass 18: an agent that
    had gone into a network namespace of its own (a user namespace's) was not among those
    `down` killed. (Last in this module: the sandbox is down after it.)"""
    hold = ("import ctypes,socket,time; s=socket.create_connection(('10.200.0.1', 1080)); "
            "s.sendall(b'\\x05\\x01\\x00'); s.recv(2); libc=ctypes.CDLL(None); "
            "libc.prctl(1, 0, 0, 0, 0); "  # (no parent-death signal, and off the namespace:)
            "assert libc.unshare(0x10000000 | 0x40000000) == 0; print('held', flush=True); "
            f"time.sleep(600)  # {NAME} holder")
    holder = subprocess.Popen([*GUARDD, "sandbox", "exec", "--name", NAME, "--", "python3",
                               "-c", hold], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    established = ["ip", "netns", "exec", sandbox.guard_netns, "ss", "-Htn", "state",
                   "established", "dst", "10.200.0.2"]
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert run(established).stdout.strip(), "the agent's connection is not there"
        result = run([*GUARDD, "sandbox", "down", "--name", NAME], cwd=ROOT)
        assert result.returncode == 0, result.stderr
        assert holder.wait(10) == 137  # (its agent killed)
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
        deadline = time.monotonic() + 2
        while run(established).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [proc.parent.name for proc in Path("/proc").glob("*/cmdline")
                if f"{NAME} holder".encode() in _read(proc)]
        for pid in left:  # (what the code before the fix left running: killed, then failed)
            os.kill(int(pid), signal.SIGKILL)
    assert not left, "the agent outlived its sandbox"
    assert not run(established).stdout.strip(), "guardd still holds the agent's connection"


def _read(path: Path) -> bytes:
    """A file of /proc, or nothing when its process is gone."""
    try:
        return path.read_bytes()
    except OSError:
        return b""
