"""Per-agent policies end to end: one daemon in a network namespace the test creates (only `lo`,
no route anywhere), two agents on different source addresses in a namespace of agents linked to
it alone, real `dig` and `curl`. (guardd listens on loopback, for its host's processes, and on
its end of the agents' link.)

The ci agent (10.1.2.0/24, or the proxy users alice and carol) has a policy of its own; every
other client gets the default policy. They get different answers for the same name, their rate
limits are their own (even for one address logged in as two users), every record names the
principal, and `guardd explain --config --client` says whose policy judges.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import (AGENTS_LINK, Destination, Guardd, Upstream, agents_netns,
                               agents_of, dig, dig_unanswered, loopback_netns, require, run)

CI, OTHER = "10.1.2.3", "10.9.0.1"
#: A client address a reload takes out of `clients`.
GONE = "10.5.0.1"
#: The agents' addresses, in their namespace.
AGENTS = (CI, OTHER, GONE)
#: An address of guardd's host inside ci's clients (a Docker bridge's gateway is one).
HOSTS_CI = "10.1.2.9"
#: What each listener listens on: loopback first, then guardd's end of the agents' link.
LISTEN = ["127.0.0.1:0", f"{AGENTS_LINK}:0"]
CAROL = base64.b64encode(b"carol:carol-pw").decode()
DAVE = base64.b64encode(b"dave:dave-pw").decode()
#: Two requests on one connection to the HTTP proxy (argv: its port, the web server's port,
#: each request's Proxy-Authorization); prints what came back.
PIPELINED = """\
import socket, sys
proxy, web, *logins = sys.argv[1:]
back = b""
with socket.create_connection(("127.0.0.1", int(proxy)), timeout=3) as sock:
    sock.sendall(b"".join(b"GET http://web.test:%s/ HTTP/1.1\\r\\nHost: web.test\\r\\n"
                          b"Proxy-Authorization: Basic %s\\r\\n\\r\\n"
                          % (web.encode(), login.encode()) for login in logins))
    try:
        while chunk := sock.recv(65536):
            back += chunk
    except TimeoutError:
        print("(still open)")
print(back.count(b"HTTP/1.1 200 "), "served")
"""
#: Each policy allows `shared.test` (three lookups a minute) and the web server by a rule of the
#: same id (two connects a minute): a principal's counts must not be another's.
SHARED = """\
  - {{id: shared, action: "*", domain: shared.test, effect: allow,
     rateLimit: {{maxRequests: 3, window: "1 minute"}}}}
  - {{id: web, action: network.request, domain: web.test, ip: 127.0.0.0/8, port: {port},
     effect: allow, rateLimit: {{maxRequests: 2, window: "1 minute"}}}}
"""
DEFAULT = """\
version: "1.0"
rules:
  - {{id: public, action: "*", domain: public.test, effect: allow}}
""" + SHARED
CI_POLICY = """\
version: "1.0"
rules:
  - {{id: ci-builds, action: "*", domain: ci.test, effect: allow}}
""" + SHARED
ZONES = {"ci.test": ["A 192.0.2.44"], "public.test": ["A 192.0.2.45"],
         "shared.test": ["A 192.0.2.46"], "web.test": ["A 127.0.0.1"]}


def write_config(directory: Path, web_port: int, unmapped: str) -> Path:
    (directory / "default.yaml").write_text(DEFAULT.format(port=web_port))
    (directory / "ci.yaml").write_text(CI_POLICY.format(port=web_port))
    config = directory / f"guardd-{unmapped}.yaml"
    config.write_text(f"""\
policy: default.yaml
socksUsers: {{alice: alice-pw, bob: bob-pw}}
httpUsers: {{carol: carol-pw, dave: dave-pw}}
unmapped: {unmapped}
principals:
  ci:
    policy: ci.yaml
    clients: [10.1.2.0/24]
    socksUsers: [alice]
    httpUsers: [carol]
""")
    config.chmod(0o600)  # (it holds passwords: guardd refuses it readable by all)
    return config


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    """guardd's namespace (`HOSTS_CI` on its `lo`), with its agents' beside it."""
    require("dig")
    with loopback_netns(f"{HOSTS_CI}/32") as name, agents_netns(name, *AGENTS):
        yield name


@pytest.fixture
def fleet(netns: str, tmp_path: Path) -> Iterator[tuple[Guardd, Path, int]]:
    """guardd in the namespace with the ci principal; its config and the web server's port."""
    upstream = Upstream(tmp_path, ZONES, netns=netns)
    web = Destination(tmp_path, "web", netns=netns)
    config = write_config(tmp_path, web.port, "default")
    daemon = Guardd.launch(tmp_path / "guardd", "--config", str(config), "--dns", *LISTEN,
                           "--socks", *LISTEN, "--http", *LISTEN, "--upstream",
                           upstream.address, "--metrics", "off", netns=netns)
    try:
        yield daemon, config, web.port
    finally:
        daemon.stop()
        web.stop()
        upstream.stop()


def where(daemon: Guardd, listeners: list[tuple[str, int]], source: str
          ) -> tuple[str, tuple[str, int]]:
    """The namespace `source` is in, and which of `listeners` it reaches: the one on the
    agents' link from an agent, the one on loopback from guardd's host."""
    assert daemon.netns is not None
    return (agents_of(daemon.netns), listeners[1]) if source in AGENTS else \
        (daemon.netns, listeners[0])


def ask(daemon: Guardd, source: str, name: str) -> str:
    """dig from `source`: the status, and the answer's address when there is one."""
    netns, server = where(daemon, daemon.dns, source)
    result = dig(server, name, "A", "-b", source, netns=netns)
    return " ".join([result.status, *(data for _, _, data in result.answers)])


def curl(daemon: Guardd, login: str, port: int, source: str = "127.0.0.1",
         host: str = "web.test") -> str:
    """curl through guardd's proxy to the web server (from `source`; by its name `host`),
    `login` saying which ("socks5h://user:password" or "http://user:password"): the HTTP
    status, or curl's exit code."""
    netns, (proxy_host, proxy) = where(daemon, daemon.socks if login.startswith("socks")
                                       else daemon.http, source)
    result = run(["ip", "netns", "exec", netns, require("curl"), "-s", "-o", "/dev/null",
                  "-w", "%{http_code}", "--max-time", "10", "--interface", source, "-x",
                  f"{login}@{proxy_host}:{proxy}", f"http://{host}:{port}/"])
    return result.stdout if result.returncode == 0 else f"exit {result.returncode}"


def test_two_source_addresses_get_their_principals_answers(
        fleet: tuple[Guardd, Path, int]) -> None:
    daemon, _, _ = fleet
    assert ask(daemon, CI, "ci.test") == "NOERROR 192.0.2.44"
    assert ask(daemon, OTHER, "ci.test") == "NXDOMAIN"
    assert ask(daemon, OTHER, "public.test") == "NOERROR 192.0.2.45"
    assert ask(daemon, CI, "public.test") == "NXDOMAIN"
    # Rate limits: the ci agent uses up its three lookups; the other agent still has its own.
    assert [ask(daemon, CI, "shared.test") for _ in range(4)] == ["NOERROR 192.0.2.46"] * 3 + [
        "REFUSED"]
    assert [ask(daemon, OTHER, "shared.test") for _ in range(3)] == ["NOERROR 192.0.2.46"] * 3
    records = daemon.audit_records("action=dns.query")
    assert {(r["client"], r["principal"]) for r in records} == {(CI, "ci"), (OTHER, "default")}
    denied = [r for r in records if r["domain"] == "ci.test" and r["effect"] == "deny"]
    assert [(r["client"], r["principal"], r["matchedRule"]) for r in denied] == [
        (OTHER, "default", "default-deny")]


def test_a_process_on_guardds_host_is_loopback_whichever_principals_address_it_binds(
        fleet: tuple[Guardd, Path, int]) -> None:
    """Stop 39's note (Medium): any process on guardd's host may bind any of the host's
    addresses, and one inside ci's clients (`HOSTS_CI`, as a Docker bridge's gateway is) made it
    the ci agent, with ci's policy and limits of its own. It is loopback: the default's policy,
    and loopback's counts (three lookups of shared.test a minute, between them)."""
    daemon, _, port = fleet
    assert f"{HOSTS_CI} is in the clients of principal ci, but it is an address of guardd's " \
        "own host" in daemon.log_text()  # (said at start and at each reload)
    assert ask(daemon, HOSTS_CI, "ci.test") == "NXDOMAIN"
    assert ask(daemon, CI, "ci.test") == "NOERROR 192.0.2.44"
    assert [ask(daemon, source, "shared.test") for source in ("127.0.0.1", HOSTS_CI) * 2] == [
        "NOERROR 192.0.2.46"] * 3 + ["REFUSED"]
    assert curl(daemon, "http://dave:dave-pw", port, HOSTS_CI) == "200"  # (no login of ci's)
    looked_up = [(r["client"], r["principal"]) for r in daemon.audit_records("action=dns.query")
                 if r["domain"] == "ci.test"]
    assert looked_up == [(HOSTS_CI, "default"), (CI, "ci")]
    assert {(r["client"], r["principal"]) for r in daemon.audit_records("listener=http")} == {
        (HOSTS_CI, "default")}


def test_an_address_of_guardds_host_is_a_client_only_if_loopback_is(netns: str,
                                                                     tmp_path: Path) -> None:
    """`clients` without loopback: a process on guardd's host is no client, whichever address
    of the host it binds (one inside `clients` included): its query over UDP, whose source
    is not proven, is recorded and never answered."""
    upstream = Upstream(tmp_path, ZONES, netns=netns)
    config = write_config(tmp_path, 9, "default")
    config.write_text(config.read_text() + "clients: [10.0.0.0/8]\n")
    daemon = Guardd.launch(tmp_path / "guardd", "--config", str(config), "--dns", *LISTEN,
                           "--upstream", upstream.address, "--metrics", "off", netns=netns)
    try:
        dig_unanswered(daemon.dns[0], "unanswered.test", "-b", HOSTS_CI, netns=netns)
        (record,) = daemon.audit_records(  # (as the alert on them says to find them)
            "reason=client is not in guardd's client networks; no answer over UDP, whose "
            "source is not proven")
        assert (record["client"], record["domain"], record["effect"]) == (
            HOSTS_CI, "unanswered.test", "deny")
        assert ask(daemon, CI, "ci.test") == "NOERROR 192.0.2.44"
    finally:
        daemon.stop()
        upstream.stop()


def test_proxy_users_are_their_principals_and_limited_apart(
        fleet: tuple[Guardd, Path, int]) -> None:
    """One address (127.0.0.1), four logins: alice and carol are ci by their logins, bob and
    dave (users of no principal) the default's by their address. The `web` rule allows two
    connects a minute in each policy: alice and carol each have their own two (a login's
    counts are its own), dave's and bob's count against their address's two."""
    daemon, _, port = fleet
    http = daemon.http[0]
    carol, dave = "http://carol:carol-pw", "http://dave:dave-pw"
    assert [curl(daemon, carol, port), curl(daemon, dave, port)] == ["200", "200"]
    alice, bob = "socks5h://alice:alice-pw", "socks5h://bob:bob-pw"
    assert [curl(daemon, alice, port) for _ in range(3)] == ["200", "200", "exit 97"]
    assert [curl(daemon, bob, port) for _ in range(2)] == ["200", "exit 97"]
    assert [curl(daemon, carol, port) for _ in range(2)] == ["200", "403"]
    connects = daemon.audit_records("action=network.request", "effect=allow")
    assert list(dict.fromkeys((r["listener"], r["principal"]) for r in connects)) == [
        ("http", "ci"), ("http", "default"), ("socks", "ci"), ("socks", "default")]
    limited = daemon.audit_records("action=network.request", "effect=deny")
    assert [(r["listener"], r["principal"], r["matchedRule"]) for r in limited] == [
        ("socks", "ci", "web"), ("socks", "default", "web"), ("http", "ci", "web")]
    # Each record names the login (attack pass: two users of one principal at one address
    # made records that could not be told apart).
    assert [r.get("user") for r in limited] == ["alice", "bob", "carol"]
    assert {r.get("user") for r in connects} == {"alice", "bob", "carol", "dave"}
    # A request refused after the login (a CONNECT without a port: 400) is carol's principal's.
    refused = run(["ip", "netns", "exec", daemon.netns or "", require("curl"), "-s", "-o",
                   "/dev/null", "-w", "%{http_code}", "--max-time", "10", "-X", "CONNECT",
                   "--request-target", "web.test", "-H",
                   f"Proxy-Authorization: Basic {CAROL}", f"http://{http[0]}:{http[1]}/"])
    assert refused.stdout == "400"
    bad = [r for r in daemon.audit_records("listener=http", "effect=deny")
           if "CONNECT needs host:port" in str(r["reason"])]
    assert [(r.get("principal"), r.get("user")) for r in bad] == [("ci", "carol")]


def test_a_login_counts_against_its_limits_from_every_address(
        fleet: tuple[Guardd, Path, int]) -> None:
    """alice is ci by her login: the `web` rule's two connects a minute are hers, whichever of
    her addresses she connects from (attack pass: three addresses got two each)."""
    daemon, _, port = fleet
    got = [curl(daemon, "socks5h://alice:alice-pw", port, source)
           for source in ("127.0.0.1", OTHER, GONE)]
    assert got == ["200", "200", "exit 97"]


def test_a_login_from_an_address_of_its_own_principal_counts_as_that_address(
        fleet: tuple[Guardd, Path, int]) -> None:
    """Attack pass (2026-12-06): the ci agent (at CI) logged in as alice, ci's too: its
    connects counted against alice, its lookups (DNS has no login) against its address, so
    one agent had two of every rate limit and DNS tunnel budget. A login from an address its
    own principal holds counts as that address; `shared` allows three a minute, lookups and
    connects alike. (alice's logins from elsewhere are hers: the test above.)"""
    daemon, _, port = fleet
    assert [ask(daemon, CI, "shared.test") for _ in range(2)] == ["NOERROR 192.0.2.46"] * 2
    for _ in range(2):  # (192.0.2.46 is routed nowhere: each connect is judged, then fails)
        curl(daemon, "socks5h://alice:alice-pw", port, CI, host="shared.test")
    connects = [(r["effect"], r.get("user")) for r in daemon.audit_records(
        "action=network.request", "principal=ci") if r.get("matchedRule") == "shared"]
    assert connects == [("allow", "alice"), ("deny", "alice")]
    assert ask(daemon, CI, "shared.test") == "REFUSED"
    # Two logins of ci's from CI spend one count, the address's (`web`: two connects).
    assert [curl(daemon, login, port, CI) for login in (
        "socks5h://alice:alice-pw", "http://carol:carol-pw", "socks5h://alice:alice-pw")] == [
        "200", "200", "exit 97"]


def test_every_request_on_a_connection_is_its_logins(
        fleet: tuple[Guardd, Path, int]) -> None:
    """carol's connection carries a second request with dave's login (a pooled connection):
    it is not served as carol's, nor as dave's; the connection is cut and recorded."""
    daemon, _, port = fleet
    result = run(["ip", "netns", "exec", daemon.netns or "", sys.executable, "-c", PIPELINED,
                  str(daemon.http[0][1]), str(port), CAROL, DAVE])
    assert result.stdout == "1 served\n", result.stdout + result.stderr
    cut = [r for r in daemon.audit_records("listener=http")
           if "one login a connection" in str(r.get("reason", ""))]
    assert [r.get("principal") for r in cut] == ["ci"]


#: A SOCKS5 connection (argv: guardd's address and port, the web server's port, user, password,
#: source, now|late) that sends a GET, waits for a line on stdin, then sends another: prints
#: each outcome.
KEPT = """\
import socket, struct, sys
guardd, proxy, web, user, password, source, late = sys.argv[1:]
sock = socket.create_connection((guardd, int(proxy)), timeout=5, source_address=(source, 0))
if late == "late":  # connected; the handshake only after the go
    print("connected", flush=True)
    sys.stdin.readline()
sock.sendall(b"\\x05\\x01\\x02")
assert sock.recv(2) == b"\\x05\\x02"
sock.sendall(bytes([1, len(user)]) + user.encode() + bytes([len(password)]) + password.encode())
login = sock.recv(2)
if login != b"\\x01\\x00":
    print("login refused", flush=True)
    sys.exit()
name = b"web.test"
sock.sendall(b"\\x05\\x01\\x00\\x03" + bytes([len(name)]) + name + struct.pack("!H", int(web)))
print("socks reply", sock.recv(10)[1], flush=True)
request = b"GET / HTTP/1.1\\r\\nHost: web.test:%s\\r\\n\\r\\n" % web.encode()
for turn in ("before", "after"):
    if turn == "after":
        sys.stdin.readline()
    try:
        sock.sendall(request)
        print(turn, sock.recv(65536).split(b"\\r\\n")[0].decode() or "closed", flush=True)
    except OSError as exc:
        print(turn, "closed", flush=True)
"""


def test_a_reload_applies_the_principals_of_the_config_read_again(
        fleet: tuple[Guardd, Path, int]) -> None:
    """SIGHUP reads the daemon config again: the other agent's network and bob move to ci,
    carol is no longer a user, alice has a new password, 10.5.0.0/16 is no longer a client.
    bob's open connection, alice's from 10.5.0.1 and alice's with the old password are closed
    and recorded; a login under way during the reload is checked against the new password; what the other
    agent asks is ci's from then on; carol cannot log in; a change that needs a restart (the DNS
    TCP idle timeout) is logged as such, not applied."""
    daemon, config, port = fleet
    assert ask(daemon, OTHER, "ci.test") == "NXDOMAIN"
    kept, gone, rotated, late = (subprocess.Popen(
        ["ip", "netns", "exec", netns, sys.executable, "-c", KEPT, *map(str, proxy), str(port),
         user, f"{user}-pw", source, when],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for user, source, when in (("bob", "127.0.0.1", "now"), ("alice", GONE, "now"),
                                   ("alice", CI, "now"), ("alice", CI, "late"))
        for netns, proxy in [where(daemon, daemon.socks, source)])
    each: subprocess.Popen[str]
    try:
        for each in (kept, gone, rotated):
            assert each.stdout is not None and each.stdin is not None
            assert each.stdout.readline() == "socks reply 0\n"
            assert each.stdout.readline() == "before HTTP/1.1 200 OK\n"
        assert late.stdout is not None and late.stdin is not None
        assert late.stdout.readline() == "connected\n"
        text = config.read_text().replace("clients: [10.1.2.0/24]",
                                          "clients: [10.1.2.0/24, 10.9.0.0/24]")
        text = text.replace("socksUsers: [alice]", "socksUsers: [alice, bob]")
        text = text.replace("    httpUsers: [carol]\n", "").replace("carol: carol-pw, ", "")
        text = text.replace("alice: alice-pw", "alice: rotated")
        config.write_text(text + "tcpIdleTimeout: 7\n"
                          "clients: [127.0.0.0/8, 10.1.0.0/16, 10.9.0.0/16]\n")
        daemon.reload()
        deadline = time.monotonic() + 10
        while "policy reloaded" not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        for each in (kept, gone, rotated, late):
            assert each.stdin is not None and each.stdout is not None
            each.stdin.write("go\n")
            each.stdin.flush()
        for each in (kept, gone, rotated):
            assert each.stdout is not None
            assert each.stdout.readline() == "after closed\n"
        # In its handshake during the reload: checked against the new password.
        assert late.stdout.readline() == "login refused\n"
    finally:
        for each in (kept, gone, rotated, late):
            each.kill()
            each.wait()
    assert ask(daemon, OTHER, "ci.test") == "NOERROR 192.0.2.44"
    assert curl(daemon, "http://carol:carol-pw", port) == "407"
    closed = [r for r in daemon.audit_records("listener=socks", "effect=deny")
              if str(r["reason"]).startswith("closed: the reload")]
    assert sorted((r["reason"], r["principal"]) for r in closed) == [
        ("closed: the reload made the client principal ci", "default")]
    (outside,) = [r for r in daemon.audit_records("listener=socks", "client=" + GONE)
                  if str(r["reason"]).startswith("closed:")]
    assert (outside["reason"], outside["principal"]) == (
        "closed: client is not in guardd's client networks", "ci")
    rotated_closed = [r["reason"] for r in daemon.audit_records("listener=socks", "client=" + CI)
                      if str(r["reason"]).startswith("closed:")]
    assert rotated_closed == ["closed: user 'alice' is no longer configured, or its password "
                              "changed (reload)"]
    assert "changed tcpIdleTimeout: restart guardd to apply it (a reload applies policy, " \
        "principals, unmapped, clients, socksUsers, httpUsers)" in daemon.log_text()  # (the
    # file's keys: session 60's read-through found the fields' names there)
    assert daemon.log_text().count(f"{HOSTS_CI} is in the clients of principal ci") == 2


def test_watch_follows_the_daemon_config(netns: str, tmp_path: Path) -> None:
    """--watch reloads when the daemon config changes, as when a policy does: the other
    agent's network, moved to ci in the file, is ci's a moment later."""
    upstream = Upstream(tmp_path, ZONES, netns=netns)
    config = write_config(tmp_path, 9, "default")
    daemon = Guardd.launch(tmp_path / "guardd", "--config", str(config), "--dns", *LISTEN,
                           "--upstream", upstream.address, "--metrics", "off", "--watch",
                           netns=netns)
    try:
        assert ask(daemon, OTHER, "ci.test") == "NXDOMAIN"
        config.write_text(config.read_text().replace("clients: [10.1.2.0/24]",
                                                     "clients: [10.1.2.0/24, 10.9.0.0/24]"))
        deadline = time.monotonic() + 15
        while "policy reloaded" not in daemon.log_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ask(daemon, OTHER, "ci.test") == "NOERROR 192.0.2.44"
    finally:
        daemon.stop()
        upstream.stop()


def test_unmapped_clients_refused_when_the_config_says_so(netns: str, tmp_path: Path) -> None:
    upstream = Upstream(tmp_path, ZONES, netns=netns)
    config = write_config(tmp_path, 9, "refuse")
    daemon = Guardd.launch(tmp_path / "guardd", "--config", str(config), "--dns", *LISTEN,
                           "--socks", *LISTEN, "--upstream", upstream.address,
                           "--metrics", "off", netns=netns)
    try:
        agents, server = where(daemon, daemon.dns, OTHER)
        refused = dig(server, "public.test", "A", "-b", OTHER, netns=agents)
        assert refused.status == "REFUSED" and "maps to no principal" in refused.ede
        assert ask(daemon, CI, "ci.test") == "NOERROR 192.0.2.44"
        # 127.0.0.1 maps to nobody: bob is refused (SOCKS reply 2), alice is ci.
        assert curl(daemon, "socks5h://bob:bob-pw", 9) == "exit 97"
    finally:
        daemon.stop()
        upstream.stop()
    assert upstream.queries() == ["ci.test"]
    unmapped = [r for r in daemon.audit_records("effect=deny") if r["reason"] ==
                "client maps to no principal (unmapped: refuse in the daemon config)"]
    assert [(r["listener"], "principal" in r) for r in unmapped] == [("dns", False),
                                                                      ("socks", False)]


def test_explain_takes_the_client_and_names_its_principal(
        fleet: tuple[Guardd, Path, int]) -> None:
    daemon, config, _ = fleet
    for client, effect, principal in ((CI, "allow", "ci"), (OTHER, "deny", "default"),
                                      ("ci", "allow", "ci")):
        result = daemon.cli("explain", "--config", str(config), "--client", client, "--dns",
                            "--json", "ci.test", check=False)
        shown = json.loads(result.stdout)
        assert (shown["effect"], shown["principal"]) == (effect, principal), client
    by_user = daemon.cli("explain", "--config", str(config), "--user", "carol", "--dns",
                         "ci.test")
    assert "principal: ci" in by_user.stdout
    # A name that is a user of two principals, one per listener, needs --listener.
    text = config.read_text().replace("httpUsers: {carol: carol-pw,",
                                      "httpUsers: {alice: x, carol: carol-pw,")
    twice = config.with_name("twice.yaml")
    twice.write_text(text.replace("    httpUsers: [carol]", "    httpUsers: [carol]\n"
                                  "  other:\n    policy: default.yaml\n    httpUsers: [alice]"))
    twice.chmod(0o600)
    ambiguous = daemon.cli("explain", "--config", str(twice), "--user", "alice", "--dns",
                           "ci.test", check=False)
    assert ambiguous.returncode == 1 and "--listener" in ambiguous.stderr
    as_http = daemon.cli("explain", "--config", str(twice), "--user", "alice", "--listener",
                         "http", "--dns", "ci.test", check=False)
    assert as_http.returncode == 3 and "principal: other" in as_http.stdout


def test_replay_and_learn_take_one_principals_decisions(
        fleet: tuple[Guardd, Path, int]) -> None:
    """What the ci agent did, replayed under the default policy, would be denied; what the
    other agent did would not change. `learn` from ci's decisions alone proposes ci.test."""
    daemon, config, _ = fleet
    assert ask(daemon, CI, "ci.test") == "NOERROR 192.0.2.44"
    assert ask(daemon, OTHER, "public.test") == "NOERROR 192.0.2.45"
    default = str(config.parent / "default.yaml")
    audit = str(daemon.audit_dir)
    ci = daemon.cli("audit", "replay", "--audit", audit, "--principal", "ci", "--policy",
                    default).stdout
    assert ci.splitlines()[0] == "replayed 1 decisions: 1 would change"
    assert "allow -> deny: 1" in ci and "rule ci-builds -> rule default-deny" in ci
    other = daemon.cli("audit", "replay", "--audit", audit, "--principal", "default",
                       "--policy", default).stdout
    assert other.splitlines()[0] == "replayed 1 decisions: 0 would change"
    learned = daemon.cli("audit", "learn", "--audit", audit, "--principal", "ci").stdout
    assert "ci.test" in learned and "public.test" not in learned
    proposal = config.parent / "learned.yaml"
    proposal.write_text(learned)
    daemon.cli("check", str(proposal))
