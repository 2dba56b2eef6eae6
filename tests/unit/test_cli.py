"""`guardd check` and `guardd explain` as a user runs them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from guardd import hosts
from guardd.addr import translate_through
from guardd.addr import counted_as, parse_target
from guardd.cli import EXIT_DENY, EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from guardd.errors import InvalidHostError
from tests.dnsupstream import DNSTestServer

ROOT = Path(__file__).resolve().parents[2]
DEFAULT = str(ROOT / "policies" / "default.yaml")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_every_shipped_policy_passes_without_warnings(capsys) -> None:
    paths = [str(p) for p in sorted((ROOT / "policies").rglob("*.yaml"))]
    code, out, err = run(capsys, "check", "--strict", *paths)
    assert code == EXIT_OK, err
    assert out.count("ok: ") == len(paths) and err == ""


def test_check_default_prints_rule_count(capsys) -> None:
    code, out, _ = run(capsys, "check", DEFAULT)
    assert code == EXIT_OK and out.startswith("ok: 19 rules")


def test_check_typo_fails_with_line_number(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text('version: "1.0"\nrules:\n  - action: network.request\n'
                   '    domain: "api.example.com"\n    efect: allow\n')
    code, out, err = run(capsys, "check", str(bad))
    assert code == EXIT_ERROR and out == ""
    assert f"{bad}:5:5: unknown key 'efect' in rule 1 (hint: did you mean 'effect'?)" in err


def test_check_warns_about_shadowed_and_tls_method_rules(tmp_path: Path, capsys) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text('version: "1.0"\nrules:\n'
                      '  - {id: all, action: network.request, domain: "*", effect: deny}\n'
                      '  - {id: dead, action: network.request, domain: x.test, effect: allow}\n'
                      '  - {id: m, action: network.request, domain: y.test, method: GET, '
                      'effect: allow}\n')
    code, out, err = run(capsys, "check", str(policy))
    assert code == EXIT_OK and out.startswith("ok: 3 rules")
    assert f"{policy}:4: warning: rule 'dead' can never match: rule 'all'" in err
    assert f"{policy}:5: warning: rule 'm' has a 'method' condition" in err
    assert "a TLS connection at any port (443, say) does not match it" in err
    assert run(capsys, "check", "--strict", str(policy))[0] == EXIT_ERROR
    # (session 60's read-through: a rule at port 64580 was warned of port 443)
    policy.write_text('version: "1.0"\nrules:\n  - {id: m, action: network.request, domain: '
                      'y.test, port: [64580, 9000-9009], method: GET, effect: allow}\n')
    _, _, err = run(capsys, "check", str(policy))
    assert "a TLS connection at port 64580 or 9000-9009 does not match it" in err, err
    assert "443" not in err


def test_check_warns_of_a_denied_name_idna_2003_clients_spell_otherwise(
        tmp_path: Path, capsys) -> None:
    """Session 56's attack (Info, the operator's intent): a deny of `faß.test` denies
    `xn--fa-hia.test`, the name guardd and browsers (UTS 46, not transitional) ask; clients of
    IDNA 2003 (Python's `idna` codec, Java's IDN) ask `fass.test`, another name, which the
    rule does not cover. `check` names the other spelling to deny too."""
    policy = tmp_path / "p.yaml"
    policy.write_text('version: "1.0"\nrules:\n'
                      '  - {id: sharp-s, action: network.request, domain: "*.faß.test", '
                      'effect: deny}\n'
                      '  - {id: sigma, action: network.request, domain: "xn--3xab.test", '
                      'effect: deny}\n'
                      '  - {id: plain, action: network.request, domain: "bücher.test", '
                      'effect: deny}\n'
                      '  - {id: open, action: network.request, domain: "*", effect: allow}\n')
    code, out, err = run(capsys, "check", str(policy))
    assert code == EXIT_OK and out.startswith("ok: 4 rules")
    assert (f"{policy}:3: warning: rule 'sharp-s' denies '*.xn--fa-hia.test', which clients of "
            "IDNA 2003 (transitional) ask as '*.fass.test'") in err
    assert f"{policy}:4: warning: rule 'sigma' denies 'xn--3xab.test'" in err and \
        "'xn--4xaa.test'" in err
    assert "'plain'" not in err


def test_check_warns_about_a_method_rule_for_loopback_that_names_no_port(
        tmp_path: Path, capsys) -> None:
    """Such a rule opens nothing there: a connect to loopback is opened to wait for its method
    only at a port the rule names (docs/policy.md; otherwise it tells which ports are open)."""
    policy = tmp_path / "p.yaml"
    policy.write_text('version: "1.0"\nrules:\n'
                      '  - {id: lo, action: network.request, ip: 127.0.0.1/32, method: GET, '
                      'effect: allow}\n'
                      '  - {id: v6, action: network.request, ip: "::1/128", method: GET, '
                      'effect: allow}\n'
                      '  - {id: lo-port, action: network.request, ip: 127.0.0.0/8, port: 80, '
                      'method: GET, effect: allow}\n'
                      '  - {id: wide, action: network.request, ip: 0.0.0.0/0, method: GET, '
                      'effect: allow}\n'
                      '  - {id: lo-deny, action: network.request, ip: 127.0.0.1/32, method: POST,'
                      ' effect: deny}\n')
    code, _, err = run(capsys, "check", str(policy))
    assert code == EXIT_OK
    warned = [line.split(": warning: ")[1] for line in err.splitlines()
              if "loopback" in line]
    assert warned == [
        f"rule {rule!r} has a 'method' condition and names loopback ({net}) with no 'port': "
        "it opens no connect there for SOCKS, CONNECT or the transparent listener (one is "
        "opened before its method is known only at a port the rule names), and every port "
        "there to the HTTP proxy's http:// requests of its methods (said before the "
        "connect): name a port"
        for rule, net in (("lo", "127.0.0.1/32"), ("v6", "::1/128"))]
    assert f"{policy}:3: warning: rule 'lo' has a 'method'" in err


def test_explain_metadata_shows_rule_line_and_builtin(capsys) -> None:
    code, out, _ = run(capsys, "explain", "--policy", DEFAULT, "169.254.169.254:80")
    assert code == EXIT_DENY
    first = out.splitlines()[0]
    assert first.startswith("deny  169.254.169.254:80  rule block-metadata-ip (")
    assert first.endswith("default.yaml:6)  built-in: metadata")


@pytest.mark.parametrize("target, effect, rule", [
    ("http://2852039166/", "deny", "block-metadata-ip"),
    ("http://[::ffff:169.254.169.254]/latest", "deny", "block-metadata-ip"),
    ("https://api.anthropic.com/v1/messages", "allow", "anthropic-rate-limited"),
    ("x.ngrok.io", "deny", "block-ngrok"),
    ("registry.npmjs.org:443", "allow", "npm-registry"),
], ids=["decimal-ip", "mapped-ip", "url", "tunnel", "host-port"])
def test_explain_json(capsys, target: str, effect: str, rule: str) -> None:
    code, out, _ = run(capsys, "explain", "--json", "--policy", DEFAULT, target)
    fields = json.loads(out)
    assert (fields["effect"], fields["matchedRule"]) == (effect, rule)
    assert code == (EXIT_OK if effect == "allow" else EXIT_DENY)


def test_explain_method_and_dns_view(capsys) -> None:
    assert run(capsys, "explain", "--policy", DEFAULT, "--method", "GET",
               "http://docs.company.com/")[0] == EXIT_OK
    code, out, _ = run(capsys, "explain", "--policy", DEFAULT, "--method", "POST",
                       "http://docs.company.com/")
    assert code == EXIT_DENY and "docs-no-post" in out and "dns: resolve" in out
    code, out, _ = run(capsys, "explain", "--dns", "--policy", DEFAULT, "x.webhook.site")
    assert code == EXIT_DENY and "block-webhook-site" in out


def test_explain_bad_target_is_a_usage_error(capsys) -> None:
    code, _, err = run(capsys, "explain", "--policy", DEFAULT, "foo.1.2.3.4")
    assert code == EXIT_USAGE and err.startswith("error: ")


@pytest.mark.parametrize("text, host, port", [
    ("example.com", "example.com", None), ("example.com:8443", "example.com", 8443),
    ("[::1]:80", "::1", 80), ("::1", "::1", None),
    ("https://u:p@Example.COM/x", "example.com", 443),
    ("http://0xa9fea9fe/", "169.254.169.254", 80),
], ids=["name", "name-port", "v6-port", "v6", "url-userinfo", "url-hex"])
def test_parse_target(text: str, host: str, port: int | None) -> None:
    target = parse_target(text)
    assert (str(target.host), target.port) == (host, port)


@pytest.mark.parametrize("text", ["a.test:" + "4" * 5000, "[::1]:" + "0" * 5000 + "1"])
def test_a_port_of_thousands_of_digits_is_refused_with_a_message(text: str) -> None:
    """(int() raises its own ValueError past 4,300 digits: a traceback, not a message)"""
    with pytest.raises(InvalidHostError, match="is not a number from 1 to 65535"):
        parse_target(text)


def test_console_script_runs() -> None:
    result = subprocess.run([sys.executable, "-m", "guardd.cli", "check", DEFAULT],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout.startswith("ok: ")


# -- private addresses: which globs vouch (issue 8, hole 6) ---------------------------------------

def write_policy(tmp_path: Path, rules: str) -> Path:
    policy = tmp_path / "p.yaml"
    policy.write_text('version: "1.0"\nrules:\n' + rules)
    return policy


def test_check_warns_once_per_allow_rule_whose_globs_open_no_private_address(
        tmp_path: Path, capsys) -> None:
    (tmp_path / "allow.txt").write_text("ok.corp.example.com\n*.github.io\n*.com\n")
    policy = write_policy(tmp_path, """\
  - {id: deny-broad, action: network.request, domain: "*.net", effect: deny}
  - {id: broad, action: network.request, domain: ["*.com", "*.io", "*m"], effect: allow}
  - {id: zone, action: network.request, domain: ["*.corp.example.com", "*.internal"],
     effect: allow}
  - {id: lan, action: network.request, domain: "*.lan", ip: 192.168.0.0/16, effect: allow}
  - {id: listed, action: network.request, domainList: allow.txt, effect: allow}
  - {id: everything, action: network.request, domain: "*", effect: allow}
""")
    code, out, err = run(capsys, "check", str(policy))
    assert code == EXIT_OK and out.startswith("ok: 6 rules")
    assert err.splitlines() == [
        (f"{policy}:4: warning: rule 'broad': domain '*.com' spans the public suffix 'com'; "
         f"it will not open private addresses"),
        (f"{policy}:8: warning: rule 'listed': domainList {tmp_path}/allow.txt:2: '*.github.io' "
         f"spans the public suffix 'github.io'; it will not open private addresses"),
        (f"{policy}:9: warning: rule 'everything': domain '*' names no zone: its end is not a "
         f"fixed name; it will not open private addresses"),
    ]
    assert run(capsys, "check", "--strict", str(policy))[0] == EXIT_ERROR


@pytest.mark.parametrize("argv, effect, private", [
    (["--ip", "10.0.0.5", "evil.com"], "deny",
     "not opened: domain '*.com' spans the public suffix 'com'"),
    (["evil.com"], "allow", "not opened: domain '*.com' spans the public suffix 'com'"),
    (["--ip", "10.0.0.5", "db.corp.example.com"], "allow", "opened"),
    (["--dns", "--ip", "10.0.0.5", "evil.com"], "deny",
     "not opened: domain '*.com' spans the public suffix 'com'"),
    (["10.0.0.5"], "deny", ("not opened: a connect by address is opened only by a rule whose "
                            "network (no wider than /8, /16 in IPv6) holds it")),
    (["--ip", "192.0.2.1", "evil.com"], "allow", None),
], ids=["connect-private", "name-only", "zone", "dns-answer", "by-address", "public"])
def test_explain_says_which_glob_failed_to_vouch(tmp_path: Path, capsys, argv: list[str],
                                                 effect: str, private: str | None) -> None:
    policy = write_policy(tmp_path, """\
  - {id: zone, action: "*", domain: "*.corp.example.com", effect: allow}
  - {id: broad, action: "*", domain: "*.com", effect: allow}
  - {id: any, action: "*", ip: 0.0.0.0/0, effect: allow}
""")
    code, out, _ = run(capsys, "explain", "--policy", str(policy), *argv)
    assert code == (EXIT_OK if effect == "allow" else EXIT_DENY)
    assert out.startswith(effect)
    if private is None:
        assert "private:" not in out
    else:
        assert f"  private: {private}\n" in out
    fields = json.loads(run(capsys, "explain", "--json", "--policy", str(policy), *argv)[1])
    assert fields["effect"] == effect and fields.get("private") == private


@pytest.mark.parametrize("flag", ["--ip", "--address"])
def test_explain_ip_is_for_a_name(capsys, flag: str) -> None:
    code, _, err = run(capsys, "explain", "--policy", DEFAULT, flag, "10.0.0.1", "192.0.2.1")
    assert code == EXIT_USAGE and "--ip" in err
    code, _, err = run(capsys, "explain", "--policy", DEFAULT, flag, "nope", "x.test")
    assert code == EXIT_USAGE and err.startswith("error: ")


# -- rules that combine a name and an address (issue 9) -------------------------------------------

DOMAIN_AND_IP = """\
  - {id: api-at-home, action: network.request, domain: ["api.example.com", "mixed.example.com",
     "gone.example.com", "broken.example.com"], ip: 192.0.2.0/24, effect: allow}
  - {id: cdn, action: network.request, domain: "cdn.example.com", effect: allow}
  - {id: cdn-at-home, action: network.request, domain: "cdn.example.com", ip: 192.0.2.0/24,
     effect: deny}
  - {id: bad-at-home, action: network.request, domain: "bad.example.com", ip: 192.0.2.0/24,
     effect: deny}
"""
ZONES = {"api.example.com": ["A 192.0.2.7"], "cdn.example.com": ["A 192.0.2.9"],
         "bad.example.com": ["A 192.0.2.10"],
         "mixed.example.com": ["A 192.0.2.8", "AAAA 2001:db8::8"]}


@pytest.fixture
def upstream() -> Iterator[DNSTestServer]:
    """A loopback DNS server (tests/dnsupstream.py) on a loop in a thread of its own, since
    `main` runs an event loop of its own to resolve."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = DNSTestServer(ZONES, {"broken.example.com": "servfail"})
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
        yield server
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.mark.parametrize("ip, effect", [("192.0.2.7", "allow"), ("198.51.100.1", "deny")])
def test_explain_judges_a_name_at_the_ip_given(tmp_path: Path, capsys, ip: str,
                                               effect: str) -> None:
    policy = write_policy(tmp_path, DOMAIN_AND_IP)
    code, out, _ = run(capsys, "explain", "--policy", str(policy), "--ip", ip,
                       "https://api.example.com/")
    assert code == (EXIT_OK if effect == "allow" else EXIT_DENY)
    assert out.startswith(f"{effect:<5} api.example.com:443 at {ip}  rule ")
    assert f"  judged at {ip} (given with --ip)\n" in out


def test_explain_resolves_a_name_a_rule_judges_by_address(tmp_path: Path, capsys,
                                                          upstream: DNSTestServer) -> None:
    policy = write_policy(tmp_path, DOMAIN_AND_IP)
    where = f"127.0.0.1:{upstream.port}"
    code, out, _ = run(capsys, "explain", "--policy", str(policy), "--upstream", where,
                       "https://api.example.com/")
    assert code == EXIT_OK
    assert out.startswith("allow api.example.com:443 at 192.0.2.7  rule api-at-home (")
    assert f"  judged at the addresses {where} returned: 192.0.2.7\n" in out
    fields = json.loads(run(capsys, "explain", "--json", "--policy", str(policy),
                            "--upstream", where, "api.example.com")[1])
    assert (fields["effect"], fields["address"]) == ("allow", "192.0.2.7")
    assert (fields["resolvedBy"], fields["resolved"]) == ([where], {"192.0.2.7": "allow"})


def test_explain_of_a_name_with_addresses_in_and_out_of_range_shows_where_the_daemon_goes(
        tmp_path: Path, capsys, upstream: DNSTestServer) -> None:
    """The daemon skips a denied address and connects to an allowed one: explain says so."""
    policy = write_policy(tmp_path, DOMAIN_AND_IP)
    where = f"127.0.0.1:{upstream.port}"
    code, out, _ = run(capsys, "explain", "--policy", str(policy), "--upstream", where,
                       "mixed.example.com:443")
    assert code == EXIT_OK, out
    assert out.startswith("allow mixed.example.com:443 at 192.0.2.8"), out
    assert (f"  judged at the addresses {where} returned: 2001:db8::8 (deny), 192.0.2.8 "
            "(allow); the daemon connects to the first allowed one (IPv6 first), which is "
            "shown\n") in out


@pytest.mark.parametrize("name, message", [
    ("gone.example.com", "gone.example.com does not exist (NXDOMAIN from 127.0.0.1:"),
    ("broken.example.com", "no upstream DNS server answered: 127.0.0.1:"),
])
def test_explain_says_why_a_name_cannot_be_resolved(tmp_path: Path, capsys,
                                                    upstream: DNSTestServer, name: str,
                                                    message: str) -> None:
    policy = write_policy(tmp_path, DOMAIN_AND_IP)
    code, out, err = run(capsys, "explain", "--policy", str(policy), "--upstream",
                         f"127.0.0.1:{upstream.port}", name)
    assert code == EXIT_ERROR and out == ""
    assert err.startswith("error: ") and message in err and "--ip" in err


@pytest.mark.parametrize("argv", [
    ["other.example.com"],  # no rule with an address condition names it
    ["cdn.example.com"],  # allowed by a rule before the one with the address condition
    ["bad.example.com"],  # not resolvable: the daemon would refuse it without a lookup
    ["--dns", "api.example.com"],  # the DNS view does not depend on the address
    ["--ip", "192.0.2.7", "api.example.com"],
], ids=["unnamed", "decided-first", "not-resolvable", "dns-view", "ip-given"])
def test_explain_resolves_only_when_the_address_matters(tmp_path: Path, capsys,
                                                        upstream: DNSTestServer,
                                                        argv: list[str]) -> None:
    policy = write_policy(tmp_path, DOMAIN_AND_IP)
    _, out, _ = run(capsys, "explain", "--policy", str(policy), "--upstream",
                    f"127.0.0.1:{upstream.port}", *argv)
    assert upstream.queries == [] and "returned" not in out


def test_explain_refuses_a_bad_upstream(tmp_path: Path, capsys) -> None:
    policy = write_policy(tmp_path, DOMAIN_AND_IP)
    code, _, err = run(capsys, "explain", "--policy", str(policy), "--upstream", "dns.example",
                       "api.example.com")
    assert code == EXIT_ERROR and "invalid upstream DNS server 'dns.example'" in err


# -- terminal safety: policy and target text is printed escaped (issue 8, hole 14) ----------------

HOSTILE = "\x1b[2J\x1b]0;pwned\x07\u202e\u2028\x85"
#: HOSTILE as it must be shown: escaped repr-style, never raw.
SHOWN = "\\x1b[2J\\x1b]0;pwned\\x07\\u202e\\u2028\\x85"


def printable(text: str) -> bool:
    """No control, format or separator character in any line (`str.splitlines` would also split
    at U+2028 and U+0085, hiding them)."""
    return all(line.isprintable() for line in text.split("\n"))


def test_explain_escapes_policy_text(tmp_path: Path, capsys) -> None:
    policy = write_policy(tmp_path, '  - {id: r, action: "*", domain: x.test, '
                                    'effect: deny, reason: "why\\e[2J\\e]0;pwned\\a\\u202e'
                                    '\\u2028\\N"}\n')  # (an id is printable: session 55)
    code, out, _ = run(capsys, "explain", "--policy", str(policy), "x.test")
    assert code == EXIT_DENY
    assert printable(out) and f"reason: why{SHOWN}\n" in out
    code, out, _ = run(capsys, "explain", "--json", "--policy", str(policy), "x.test")
    assert out.isascii() and printable(out)
    assert json.loads(out)["reason"] == "why" + HOSTILE


def test_check_escapes_paths_and_entries_from_the_policy(tmp_path: Path, capsys) -> None:
    listed = f"allow{HOSTILE}.txt"
    (tmp_path / listed).write_text("*.com\n")
    policy = write_policy(tmp_path, '  - {id: l, action: network.request, domainList: '
                                    '"allow\\e[2J\\e]0;pwned\\a\\u202e\\u2028\\N.txt", '
                                    'effect: allow}\n')
    code, _, err = run(capsys, "check", str(policy))
    assert code == EXIT_OK and f"allow{SHOWN}.txt:1: '*.com'" in err and printable(err)
    (tmp_path / listed).write_text("bad..glob\n")
    code, _, err = run(capsys, "check", str(policy))
    assert code == EXIT_ERROR and err.startswith("error: ") and printable(err)
    assert f"allow{SHOWN}.txt:1:1: invalid domain glob" in err


def test_check_of_a_missing_file_and_explain_of_an_ipv6_target_read_plainly(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Session 60's read-through: `path:0:0: cannot read policy` (no line or column to
    give), and `deny  ::ffff:a9fe:a9fe:80` (an IPv6 address and a port, run together)."""
    code, _, err = run(capsys, "check", str(tmp_path / "missing.yaml"))
    assert code == EXIT_ERROR and f"{tmp_path / 'missing.yaml'}: cannot read policy" in err, err
    code, out, _ = run(capsys, "explain", "--policy", str(ROOT / "policies" / "default.yaml"),
                       "http://[::ffff:169.254.169.254]/")
    assert code == EXIT_DENY and out.startswith("deny  [::ffff:a9fe:a9fe]:80  "), out


def test_explain_refuses_a_login_it_cannot_map(capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    """`--user` needs the daemon config, and must not contradict a principal named with
    `--client`: explain never answers for another principal than the daemon would."""
    (tmp_path / "p.yaml").write_text('version: "1.0"\nrules: []\n')
    (tmp_path / "g.yaml").write_text("policy: p.yaml\nsocksUsers: {alice: x}\nprincipals:\n"
                                     "  ci: {policy: p.yaml, socksUsers: [alice]}\n"
                                     "  lab: {policy: p.yaml, clients: [10.9.0.0/16]}\n")
    (tmp_path / "g.yaml").chmod(0o600)
    code, _, err = run(capsys, "explain", "--policy", str(tmp_path / "p.yaml"), "--user",
                       "alice", "x.test")
    assert code == EXIT_ERROR and "need --config" in err
    code, _, err = run(capsys, "explain", "--config", str(tmp_path / "g.yaml"), "--client",
                       "lab", "--user", "alice", "x.test")
    assert code == EXIT_ERROR and "give one of them" in err
    code, out, _ = run(capsys, "explain", "--config", str(tmp_path / "g.yaml"), "--client",
                       "ci", "--user", "alice", "--dns", "x.test")
    assert code == EXIT_DENY and "principal: ci" in out


def test_explain_reads_an_address_under_the_configs_nat64_prefix_as_the_daemon_does(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Session 61's final attack (Low): `explain --config` ignored `nat64Prefixes`, and said
    allow for `[2001:db8:64::a9fe:a9fe]`, which the daemon judges as the metadata address."""
    (tmp_path / "p.yaml").write_text('version: "1.0"\nrules:\n  - {id: any-web, action: '
                                     '"*", domain: "*", port: [80, 443], effect: allow}\n')
    (tmp_path / "g.yaml").write_text('policy: p.yaml\nnat64Prefixes: ["2001:db8:64::/96"]\n')
    try:
        code, out, _ = run(capsys, "explain", "--config", str(tmp_path / "g.yaml"),
                           "http://[2001:db8:64::a9fe:a9fe]/")
    finally:
        translate_through([])
    assert code == EXIT_DENY and "metadata" in out, out


def test_explain_refuses_a_client_the_daemon_asks_a_login_of(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Session 60's read-through: with `httpUsers` and `socksUsers`, `--user nobody` (or no
    login at a listener named) was explained as the default principal's allow, where the
    daemon answers 407. (With neither, explain says what a client that logs in gets.)"""
    (tmp_path / "p.yaml").write_text('version: "1.0"\nrules:\n  - {action: "*", domain: "*", '
                                     'effect: allow}\n')
    (tmp_path / "g.yaml").write_text("policy: p.yaml\nsocksUsers: {alice: x}\n"
                                     "httpUsers: {bob: y}\n")
    (tmp_path / "g.yaml").chmod(0o600)
    config = ["explain", "--config", str(tmp_path / "g.yaml"), "--dns", "x.test"]
    for extra in (["--user", "nobody"], ["--listener", "http"],
                  ["--listener", "http", "--user", "alice"]):
        code, out, err = run(capsys, *config, *extra)
        assert code == EXIT_DENY and "login" in err and out == "", (extra, out, err)
    for extra in (["--user", "alice"], ["--listener", "http", "--user", "bob"], []):
        code, out, _ = run(capsys, *config, *extra)
        assert code == EXIT_OK and "principal: default" in out, extra


def test_explain_takes_an_address_of_this_host_for_loopback(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
        ) -> None:
    """As the daemon on this host maps it (`addr.on_host`): an address of the host in a
    principal's network is loopback's principal, not that one (review: explain said lab's)."""
    monkeypatch.setattr(hosts, "_interface_addresses", lambda: iter(["10.9.0.1"]))
    monkeypatch.setattr(hosts, "delivered_here", lambda ip: str(ip) == "10.9.0.1")
    (tmp_path / "p.yaml").write_text('version: "1.0"\nrules: []\n')
    (tmp_path / "g.yaml").write_text("policy: p.yaml\nprincipals:\n"
                                     "  lab: {policy: p.yaml, clients: [10.9.0.0/16]}\n")
    for client, principal in (("10.9.0.1", "default"), ("10.9.0.2", "lab")):
        code, out, _ = run(capsys, "explain", "--config", str(tmp_path / "g.yaml"),
                           "--client", client, "--dns", "x.test")
        assert code == EXIT_DENY and f"principal: {principal}" in out, client
    assert counted_as("10.9.0.1") == "10.9.0.1"  # (the lookup's alone: nothing is left set)
