"""Policy loading: every rule key of docs/design.md's table, and line-numbered errors."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from guardd import files
from guardd.errors import InvalidHostError, PolicyError
from guardd.policy import loader
from guardd.policy.engine import Policy
from guardd.policy.loader import normalize_glob, parse_window
from guardd.policy.model import DNS_QUERY, NETWORK_REQUEST, Effect, Request


def load(rules_yaml: str, tmp_path: Path | None = None) -> Policy:
    text = 'version: "1.0"\nrules:\n' + rules_yaml
    return Policy.from_text(text, "test.yaml", tmp_path)


def rule_of(rule_yaml: str):
    return load(rule_yaml).rules[0]


# -- one test per row of the rule-key table ------------------------------------------------------

def test_id_given_and_default() -> None:
    policy = load("- {id: first, action: network.request, effect: allow}\n"
                  "- {action: network.request, effect: deny}\n")
    assert [r.id for r in policy.rules] == ["first", "rule-2"]


@pytest.mark.parametrize("action, expected", [
    ("network.request", {NETWORK_REQUEST}),
    ("dns.query", {DNS_QUERY}),
    ('"*"', {NETWORK_REQUEST, DNS_QUERY}),
    ('"network.*"', {NETWORK_REQUEST}),
], ids=["network", "dns", "star", "glob"])
def test_action(action: str, expected: set[str]) -> None:
    assert rule_of(f"- {{action: {action}, effect: deny}}\n").actions == expected


def test_domain_string_list_case_trailing_dot_and_idna() -> None:
    rule = rule_of("- action: network.request\n"
                   "  domain: [API.Example.COM., '*.Bücher.de', 'smtp.*']\n"
                   "  effect: allow\n")
    assert rule.domains == ("api.example.com", "*.xn--bcher-kva.de", "smtp.*")


def test_domain_ip_literals_and_cidrs_become_networks() -> None:
    rule = rule_of("- action: network.request\n"
                   "  domain: ['169.254.169.254', '0xa9fea9fe', '10.0.0.0/8', 'fd00:ec2::254']\n"
                   "  effect: deny\n")
    assert rule.domains == ()
    assert rule.domain_networks == (
        ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("169.254.169.254/32"),
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00:ec2::254/128"))


def test_domain_list_relative_to_policy_file(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "x.txt").write_text("# tunnels\n*.ngrok.io  # ngrok\n\nEVIL.example\n")
    policy = load("- action: network.request\n  domainList: lists/x.txt\n  effect: deny\n",
                  tmp_path)
    assert policy.rules[0].listed_domains == 2
    assert policy.index.candidates("a.ngrok.io", None) == [0]
    assert policy.index.candidates("evil.example", None) == [0]


# -- normalize_glob: the fast path for canonical entries changes no result ----------------------

#: Labels near every edge the full checks test: case, numbers and `0x` (a numeric last label),
#: `*` and `**`, characters that are not allowed, non-ASCII (IDNA), 63 and 64 characters.
GLOB_LABELS = st.one_of(
    st.text(alphabet="abzAZ09x-_*", max_size=6),
    st.sampled_from(["0x", "0x1f", "123", "xn--bcher-kva", "Bücher", "\u212a", "ａ", "a b",
                     "a/b"]),
    st.builds(lambda char, size: char * size, st.sampled_from("a0-"), st.integers(60, 66)),
)
GLOB_TEXTS = st.builds(
    lambda head, labels, tail: head + ".".join(labels) + tail,
    st.sampled_from(["", "*.", " ", "*"]), st.lists(GLOB_LABELS, min_size=1, max_size=6),
    st.sampled_from(["", ".", " ", "\t"]))


def full_checks(text: str) -> str:
    """`normalize_glob` without its fast path: the result, or the error message."""
    try:
        return loader._checked_glob(text, text.strip().lower())
    except InvalidHostError as exc:
        return f"error: {exc}"


@settings(max_examples=1000, deadline=None)
@given(text=GLOB_TEXTS)
@example(text=".".join(["a" * 63] * 3) + "." + "b" * 62)  # 254 characters: one too many
@example(text="*." + ".".join(["a" * 63] * 3) + "." + "b" * 60)
def test_normalize_glob_fast_path_agrees_with_full_checks(text: str) -> None:
    try:
        fast = normalize_glob(text)
    except InvalidHostError as exc:
        fast = f"error: {exc}"
    assert fast == full_checks(text)


@pytest.mark.parametrize("text", [
    "list7.deny.test", "*.lzone8.deny.test", "_dmarc.example.com", "-x.example.com",
    "xn--bcher-kva.de", "a" * 63 + ".com", ".".join(["a" * 63] * 3) + "." + "b" * 61,
], ids=["name", "zone", "underscore", "hyphen", "a-label", "long-label", "253-chars"])
def test_normalize_glob_takes_the_fast_path_for_canonical_entries(monkeypatch, text) -> None:
    monkeypatch.setattr(loader, "_checked_glob", None)  # calling it would fail the test
    assert normalize_glob(text) == text


def test_ip_key() -> None:
    rule = rule_of("- action: network.request\n  ip: [127.0.0.0/8, '::1']\n  effect: allow\n")
    assert rule.ip_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1"))


@pytest.mark.parametrize("port, expected", [
    ("443", ((443, 443),)), ("[80, 443]", ((80, 80), (443, 443))),
    ('"8000-8999"', ((8000, 8999),)), ('"8080"', ((8080, 8080),)),
], ids=["number", "list", "range", "quoted"])
def test_port(port: str, expected: tuple) -> None:
    assert rule_of(f"- {{action: network.request, port: {port}, effect: allow}}\n").ports == expected


@pytest.mark.parametrize("port", ['"²"', '"1-²"', '"٨٠"', '"80-٨٠٨٠"'],
                         ids=["superscript", "superscript-range", "arabic-indic", "arabic-range"])
def test_a_port_in_digits_other_than_ascii_is_an_error_with_its_line(port: str) -> None:
    """Attack pass (2026-12-06): `str.isdigit` is true of them; `int` raised on a superscript
    (a traceback from `guardd check`) and read Arabic-Indic digits as a port."""
    with pytest.raises(PolicyError, match=r":3:\d+: (invalid )?port"):
        rule_of(f"- {{action: network.request, port: {port}, effect: allow}}\n")


@pytest.mark.parametrize("glob", ["127.0.0.*", "10.*", "192.168.*.*", "*.0.2.1", "10.*.",
                                  "10.0.0.1*", "127.0.0.*1", "0x7f.0.0.*", "127.0.0.*8",
                                  "213070645*", "0x7f00001*", "127.0.0.*a", "0x5db8*",
                                  "0x7f*", "017*", "0177*"])
def test_a_glob_of_numbers_is_an_error_pointing_at_a_cidr(glob: str, tmp_path: Path) -> None:
    """Attack pass (2026-12-06): `domain: "127.0.0.*"` is a name glob, which matches no
    address: a deny written so never applied (a connect to 127.0.0.3 went on to an allow).
    In a domainList too; a glob of digits that names can match (`1*`: 1password.com) is one.
    Final attack pass: `127.0.0.*8` (`*` as 0 is bad octal), `213070645*` and `0x7f00001*`
    (one number, no dot: 127.0.0.18 with a 0) loaded, and a deny of them never applied; and
    (review's attack) one hex or octal number's start, `0x5db8*` (93.184.216.5 as one number)
    or `0177*`, which no name means."""
    with pytest.raises(PolicyError, match="matches names, not addresses.*CIDR"):
        rule_of(f'- {{action: network.request, domain: "{glob}", effect: deny}}\n')
    (tmp_path / "list.txt").write_text(f"ok.example.com\n{glob}\n")
    with pytest.raises(PolicyError, match=r"list\.txt:2:1: invalid domain glob: .*matches names"):
        load("- action: network.request\n  domainList: list.txt\n  effect: deny\n", tmp_path)
    # (123rf.com: no address past 0.0.0.0/8)
    names = ("1*", "*1*", "123*", "*.cafe", "*cafe", "0day*")
    assert rule_of(f'- {{action: network.request, domain: {list(names)}, effect: allow}}\n'
                   ).domains == names


def test_method_string_and_list_upper_cased() -> None:
    assert rule_of("- {action: network.request, method: get, effect: allow}\n").methods == {"GET"}
    assert rule_of("- {action: network.request, method: [PUT, delete], effect: deny}\n"
                   ).methods == {"PUT", "DELETE"}


@pytest.mark.parametrize("window, seconds", [
    ('"1 minute"', 60), ('"30 seconds"', 30), ('"1h"', 3600), ('"500ms"', 0.5), ("90", 90),
    ('"2 hours"', 7200), ('"1d"', 86400),
], ids=["minute", "seconds", "h", "ms", "bare", "hours", "day"])
def test_rate_limit_windows(window: str, seconds: float) -> None:
    rule = rule_of("- action: network.request\n  rateLimit:\n    maxRequests: 60\n"
                   f"    window: {window}\n  effect: allow\n")
    assert rule.rate_limit is not None
    assert (rule.rate_limit.max_requests, rule.rate_limit.window) == (60, seconds)


def test_effect_and_reason() -> None:
    rule = rule_of("- {action: network.request, effect: DENY, reason: because}\n")
    assert (rule.effect, rule.reason) == (Effect.DENY, "because")


def test_a_domain_list_not_utf8_is_an_error_at_its_line(tmp_path: Path) -> None:
    """It raised UnicodeDecodeError: a traceback from `guardd check`, and at start."""
    (tmp_path / "bad.txt").write_bytes(b"a.example.com\n\xff\xfe.example.com\n")
    with pytest.raises(PolicyError, match=r"test\.yaml:4:15: domainList 'bad\.txt' line 2 "
                                          r"is not UTF-8 text"):
        load("- action: network.request\n  domainList: bad.txt\n  effect: deny\n", tmp_path)


def read_within(seconds: float, read: Callable[[], object], fifo: Path | None = None
                ) -> object:
    """What `read()` returns or raises, in a thread given `seconds` (then a FIFO it waits on
    is opened and closed by a writer, so that the thread ends: the test fails, not hangs)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(read())
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive() and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
    assert outcome and not thread.is_alive(), f"still reading after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_domain_list_that_is_no_regular_file_is_an_error_at_once(tmp_path: Path,
                                                                   kind: str) -> None:
    """Attack pass (2026-12-06): a FIFO held the reload, and every listener with it, until a
    line was written into it; /dev/zero took 4 GB in 10 s. (/dev/null stands for a device
    here: it is read at once, and was taken for an empty list.)"""
    listed = tmp_path / "list.txt"
    if kind == "fifo":
        os.mkfifo(listed)
    else:
        listed.symlink_to("/dev/null")
    error = read_within(3, lambda: load("- action: network.request\n  domainList: list.txt\n"
                                        "  effect: deny\n", tmp_path), listed)
    assert isinstance(error, PolicyError), error
    assert re.search(r"test\.yaml:4:15: cannot read domainList 'list\.txt': not a regular "
                     r"file", str(error)), error


def test_a_domain_list_past_its_size_cap_is_an_error(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files, "MAX_LIST_BYTES", 64)
    (tmp_path / "big.txt").write_text("x.example.com\n" * 10)
    with pytest.raises(PolicyError, match=r"cannot read domainList 'big\.txt': it is larger "
                                          r"than 64 bytes"):
        load("- action: network.request\n  domainList: big.txt\n  effect: deny\n", tmp_path)


def test_a_policy_file_that_is_no_regular_file_is_an_error_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    error = read_within(3, lambda: loader.load_policy_file(fifo), fifo)
    assert isinstance(error, PolicyError) and "not a regular file" in str(error), error


def test_a_policy_keeps_the_hash_of_every_text_it_was_read_from(tmp_path: Path) -> None:
    """What the trail's `audit.policy` records name: the policy file's and its lists' SHA-256,
    of the very bytes read."""
    listed = b"x.example.com\r\ny.example.com\r\n"
    (tmp_path / "list.txt").write_bytes(listed)
    data = b'version: "1.0"\r\nrules:\r\n  - {action: "*", domainList: list.txt, effect: deny}\r\n'
    (tmp_path / "p.yaml").write_bytes(data)  # (CRLF lines: review, they were hashed as LF)
    policy = Policy.from_file(tmp_path / "p.yaml")
    assert dict(policy.digests) == {
        str(tmp_path / "p.yaml"): hashlib.sha256(data).hexdigest(),
        str(tmp_path / "list.txt"): hashlib.sha256(listed).hexdigest()}
    assert policy.decide(Request(NETWORK_REQUEST, name="y.example.com")).matched_rule == "rule-1"


def test_a_domain_list_is_read_by_its_lines_ends_alone(tmp_path: Path) -> None:
    """LF, CRLF and CR end a line, as in any text file; a form feed does not (review:
    `str.splitlines` made two globs of it)."""
    (tmp_path / "ends.txt").write_bytes(b"a.example.com\rb.example.com\r\nc.example.com")
    policy = load("- {action: network.request, domainList: ends.txt, effect: deny}\n", tmp_path)
    for name in ("a.example.com", "b.example.com", "c.example.com"):
        assert policy.match(Request(NETWORK_REQUEST, name=name)) is not None, name
    (tmp_path / "ff.txt").write_bytes(b"a.example.com\x0cb.example.com\n")
    with pytest.raises(PolicyError, match="domain glob"):
        load("- action: network.request\n  domainList: ff.txt\n  effect: deny\n", tmp_path)


# -- errors: file:line:column and a hint ---------------------------------------------------------

@pytest.mark.parametrize("rules_yaml, line, column, fragment", [
    ("- action: network.request\n  domain: x.com\n  efect: allow\n", 5, 3, "did you mean 'effect'"),
    ("- action: network.request\n  effect: permit\n", 4, 11, "allow or deny"),
    ("- action: network.request\n  domain: x.com\n", 3, 3, "no 'effect'"),
    ("- domain: x.com\n  effect: allow\n", 3, 3, "no 'action'"),
    ("- action: network.requset\n  effect: allow\n", 3, 11, "did you mean 'network.request'"),
    ("- action: network.request\n  domain: 'a..b.com'\n  effect: allow\n", 4, 11, "empty label"),
    ("- action: network.request\n  domain: 'a b.com'\n  effect: allow\n", 4, 11, "domain glob"),
    ("- action: network.request\n  domain: 'foo.1.2.3.4'\n  effect: allow\n", 4, 11, ""),
    ("- action: network.request\n  domain: '**.x.com'\n  effect: allow\n", 4, 11, "'**'"),
    ("- action: network.request\n  ip: 10.0.0.1/8\n  effect: allow\n", 4, 7, "10.0.0.0/8"),
    ("- action: network.request\n  ip: 300.1.1.1\n  effect: allow\n", 4, 7, "invalid ip"),
    ("- action: network.request\n  port: 70000\n  effect: allow\n", 4, 9, "out of range"),
    ("- action: network.request\n  port: '9-1'\n  effect: allow\n", 4, 9, "port range"),
    ("- action: network.request\n  method: 'GE T'\n  effect: allow\n", 4, 11, "HTTP method"),
    ("- action: network.request\n  rateLimit: {maxRequests: 0, window: 1m}\n  effect: allow\n",
     4, 28, "out of range"),
    ("- action: network.request\n  rateLimit: {maxRequests: 5, window: 'fortnight'}\n"
     "  effect: allow\n", 4, 39, "time window"),
    ("- action: network.request\n  rateLimit: {maxRequests: 5}\n  effect: allow\n", 4, 14,
     "needs 'window'"),
    ("- {id: a, action: network.request, effect: allow}\n"
     "- {id: a, action: network.request, effect: deny}\n", 4, 8, "duplicate rule id"),
    ("- action: network.request\n  domainList: nope.txt\n  effect: deny\n", 4, 15,
     "cannot read domainList"),
    ("- action: network.request\n  domain: []\n  effect: deny\n", 4, 11, "empty list"),
    ("- action: network.request\n   effect: deny\n", 4, 10, "not valid YAML"),
    ("- action: network.request\n  reason: a\x01b\n  effect: deny\n", 4, 12,
     "control character U+0001"),
    ("- action: network.request\n  port: 034\n  effect: allow\n", 4, 9, "not a whole number"),
    ("- action: network.request\n  port: 0x1bb\n  effect: allow\n", 4, 9,
     "not a whole number"),
    ("- action: network.request\n  port: 1:00\n  effect: allow\n", 4, 9, "not a whole number"),
], ids=["typo-key", "bad-effect", "no-effect", "no-action", "typo-action", "empty-label",
        "space", "numeric-tld", "double-star", "host-bits", "bad-ip", "port-range",
        "reversed-range", "bad-method", "zero-max", "bad-window", "no-window", "dup-id",
        "missing-list", "empty-domain-list", "bad-yaml", "control-character", "octal-port",
        "hex-port", "sexagesimal-port"])
def test_errors_name_line_and_column(tmp_path: Path, rules_yaml: str, line: int, column: int,
                                     fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        load(rules_yaml, tmp_path)
    assert (info.value.file, info.value.line, info.value.column) == ("test.yaml", line, column)
    assert str(info.value).startswith(f"test.yaml:{line}:{column}: ")
    assert fragment in str(info.value)


@pytest.mark.parametrize("text, fragment", [
    ("", "empty"),
    ("rules: []\n", "missing key 'version'"),
    ('version: "2.0"\nrules: []\n', "unsupported policy version"),
    ('version: "1.0"\n', "missing key 'rules'"),
    ('version: "1.0"\nrules: {a: 1}\n', "must be a list"),
    ('version: "1.0"\nrulez: []\n', "did you mean 'rules'"),
    ('version: "1.0"\nrules:\n- just-a-string\n', "must be a mapping"),
], ids=["empty", "no-version", "bad-version", "no-rules", "rules-mapping", "typo-rules",
        "rule-scalar"])
def test_document_errors(text: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment):
        Policy.from_text(text, "doc.yaml")


def test_error_in_domain_list_names_list_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.txt").write_text("good.example\n  bad..example  # oops\n")
    with pytest.raises(PolicyError) as info:
        load("- action: network.request\n  domainList: bad.txt\n  effect: deny\n", tmp_path)
    assert info.value.file == str(tmp_path / "bad.txt")
    assert (info.value.line, info.value.column) == (2, 3)


def test_missing_policy_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read policy"):
        Policy.from_file(tmp_path / "absent.yaml")


def test_parse_window_rejects_zero_and_junk() -> None:
    for text in ("0s", "-1m", "1 fortnight", "", "m1"):
        with pytest.raises(ValueError):
            parse_window(text)


def test_shipped_policies_load() -> None:
    root = Path(__file__).resolve().parents[2] / "policies"
    paths = sorted(root.rglob("*.yaml"))
    assert root / "default.yaml" in paths
    for path in paths:
        assert Policy.from_file(path).rules


def test_an_unnamed_rule_whose_default_id_is_taken_is_a_policy_error() -> None:
    """A rule without `id` is `rule-N`; when an earlier rule took that id, the error names the
    line (it was a KeyError, which a reload does not catch)."""
    text = ('version: "1.0"\nrules:\n  - {id: rule-2, action: "*", effect: deny}\n'
            '  - {action: "*", effect: deny}\n')
    with pytest.raises(PolicyError, match="duplicate rule id 'rule-2'") as error:
        Policy.from_text(text)
    assert ":4:" in str(error.value)


@pytest.mark.parametrize("escaped", ["\\0", "\\r\\nX-Injected: 1", "\\x1b[31m"],
                         ids=["nul", "crlf", "escape"])
def test_a_rule_id_with_a_control_character_is_refused_at_its_line(escaped: str) -> None:
    """Session 55's attack (Info): YAML's escapes put a NUL, a CR or LF into an `id`, which
    `guardd check` passed: a raw CR reached a metric's label, and a NUL broke what the rate
    limiter's keys take for granted (no id holds one: `a\\0dns.query` counted as rule a's
    lookups). An id is printable."""
    text = f'version: "1.0"\nrules:\n  - {{id: "a{escaped}", action: "*", effect: deny}}\n'
    with pytest.raises(PolicyError, match=r":3:\d+: rule id .* holds a character that is "
                                          "not printable"):
        Policy.from_text(text)


def test_a_rule_without_an_id_counts_under_what_it_says() -> None:
    """Session 55's attack: its counts were kept under its place (`rule-N`). Written again
    elsewhere, its sets in another order, it counts under the same key; changed, under another;
    a rule with an id, under its id."""
    def key(rules: str, at: int) -> str:
        return Policy.from_text(f'version: "1.0"\nrules:\n{rules}').rules[at].counted_under

    limited = '  - {{action: network.request, domain: a.test, method: [{}], effect: allow, ' \
        'rateLimit: {{maxRequests: {}, window: "1 minute"}}}}\n'
    first = key(limited.format("GET, POST", 3), 0)
    moved = key('  - {action: "*", domain: b.test, effect: deny}\n' +
                limited.format("POST, GET", 3), 1)
    assert first == moved and first.startswith("\0")
    assert key(limited.format("GET, POST", 4), 0) != first
    assert key(limited.format("GET, POST", 3).replace("1 minute", "60 seconds").replace(
        "effect", 'reason: "worded otherwise", effect'), 0) == first
    assert key(limited.format("GET, POST", 3).replace("{action", "{id: mine, action"), 0) \
        == "mine"


@pytest.mark.parametrize("second", ["blocked.txt", "sub/../blocked.txt"],
                         ids=["same-path", "another-spelling"])
def test_a_list_that_changed_between_two_rules_reading_it_refuses_the_policy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, second: str) -> None:
    """Session 55's last re-attack (Medium): a list two rules name is read once for each; renamed
    over between the two reads, the first rule had the old names and the second the new, and
    the policy's digests were those of a whole read of the new files, so every later reload of
    them kept the half-read policy in force (a name the new list denies resolved). A list read
    with two contents in one load refuses the policy: read again, it is whole."""
    listed = tmp_path / "blocked.txt"
    listed.write_text("old.test\n")
    (tmp_path / "sub").mkdir()
    policy = tmp_path / "policy.yaml"
    policy.write_text('version: "1.0"\nrules:\n'
                      '  - {id: block-dns, action: dns.query, domainList: blocked.txt, '
                      'effect: deny}\n'
                      f'  - {{id: block-web, action: network.request, domainList: "{second}", '
                      'effect: deny}\n')
    opened = files.open_bounded

    def renamed_between(path: Path, cap: int) -> object:
        handle = opened(path, cap)
        if Path(path).resolve() == listed and "evil" not in listed.read_text():
            (tmp_path / "new.txt").write_text("evil.test\n")  # (the first read has the old
            os.replace(tmp_path / "new.txt", listed)           # list, the next the new one)
        return handle

    monkeypatch.setattr(files, "open_bounded", renamed_between)
    with pytest.raises(PolicyError, match=r"blocked\.txt'? changed while the policy was read"):
        Policy.from_file(policy)


def test_a_policy_that_names_itself_as_a_domain_list_is_refused(tmp_path: Path) -> None:
    """Session 55's last attack (Info): a file that is a policy and a domain list at once (YAML
    reads U+2028 as a line's end, the list reader does not) is read twice; replaced between the
    two reads, the policy in force had the old text's rules and the new file's digest, which
    later reloads took for the same policy."""
    policy = tmp_path / "policy.yaml"
    policy.write_text('version: "1.0"\nrules:\n  - {id: lists, action: "*", '
                      'domainList: policy.yaml, effect: deny}\n')
    with pytest.raises(PolicyError, match=r":3:\d+: domainList 'policy.yaml' is the policy "
                                          "file itself"):
        Policy.from_file(policy)


def test_a_yaml_alias_is_refused_at_its_line() -> None:
    """Attack pass 49: 999 rules each `domain: *d`, a 2,000-name list under an anchor (a file
    of 100 KB), were 2 million entries: a reload stalled every listener 13.9 s, a 1 MB file
    ran for hours. A policy reads as it looks: no aliases."""
    with pytest.raises(PolicyError, match=r"test\.yaml:6:.*YAML alias") as raised:
        load("- {action: network.request, domain: &d [a.example, b.example], effect: deny}\n"
             "- action: network.request\n"
             "  effect: deny\n"
             "  domain: *d\n")
    assert "write the list out" in str(raised.value) or "domainList" in str(raised.value)


def test_the_hosts_a_policy_names_in_all_are_bounded(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass 49: rules naming one domainList each stream it again into the index, so a
    small policy could make millions of entries (and each name's rules grew a tuple at every
    rule: quadratic). Past `MAX_HOST_ENTRIES` in all, a policy error at the rule that went
    past."""
    monkeypatch.setattr(loader, "MAX_HOST_ENTRIES", 1_000)
    (tmp_path / "list.txt").write_text("".join(f"n{n}.example.com\n" for n in range(300)))
    rule = "- {action: network.request, domainList: list.txt, effect: deny}\n"
    assert len(load(rule * 3, tmp_path).rules) == 3
    with pytest.raises(PolicyError, match=r"test\.yaml:6:.*over 1000 hosts") as raised:
        load(rule * 4, tmp_path)
    assert "domainList" in str(raised.value)


def test_globs_every_lookup_tries_are_bounded(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-attack of attack pass 49: 999 rules naming a list of 5,000 `*.g1*.x26.example`
    globs (just under the hosts cap) took over five minutes and 838 MB to load, each a regex
    compiled again for each rule, and every lookup tries each: a name took 12-20 ms with
    50,000 (final re-attack: 12 ms with 5,000 of 120 `*`s). Past `MAX_PATTERNS` `*`s in such
    globs in all (not names, nor `*.zone`), a policy error."""
    monkeypatch.setattr(loader, "MAX_PATTERNS", 500)
    (tmp_path / "globs.txt").write_text("".join(f"*.g{n}*.x.example\n" for n in range(100)))
    (tmp_path / "names.txt").write_text("".join(f"*.n{n}.example\n" for n in range(500)))
    globs = "- {action: network.request, domainList: globs.txt, effect: deny}\n"
    names = "- {action: network.request, domainList: names.txt, effect: deny}\n"
    assert len(load(names * 3 + globs * 2, tmp_path).rules) == 5
    with pytest.raises(PolicyError, match=r"test\.yaml:5:.*over 500 \*s"):
        load(globs * 3, tmp_path)
    with pytest.raises(PolicyError, match=r"test\.yaml:3:.*over 500 \*s"):
        load("- {action: network.request, effect: deny, domain: [%s]}\n" % ", ".join(
            f"'a{n}*.example'" for n in range(501)), tmp_path)
    with pytest.raises(PolicyError, match=r"test\.yaml:3:.*over 500 \*s"):
        load("- {action: network.request, effect: deny, domain: [%s]}\n" % ", ".join(
            f"'{'*a' * 30}.{'*a' * 30}.{'*a' * 29}*{n}.example'" for n in range(6)),
            tmp_path)  # (six globs of 90 `*`s: what a lookup costs)
