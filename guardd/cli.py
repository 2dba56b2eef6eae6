"""Command line: `guardd run | check | explain | audit`.

Every subcommand is a function from parsed arguments to an exit code; errors that a user can fix
(`GuarddError`) are printed as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from guardd.addr import (AddrClass, Host, IPAddress, classify, parse_host, parse_ip,
                         split_host_port)
from guardd.config import DEFAULT_AUDIT_DIR
from guardd.errors import AuditError, GuarddError, InvalidHostError
from guardd.policy.engine import Policy
from guardd.policy.model import DNS_QUERY, NETWORK_REQUEST, Decision, Request

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DENY = 3

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21, "ssh": 22}


def escaped(text: str) -> str:
    """One line of text output, safe for a terminal: hosts and policy text come from the agent or
    a policy file, so every character that is not printable (controls and so escape sequences,
    bidi overrides, line separators) is shown as its repr escape, e.g. `\\x1b`. Backslashes stay
    as they are, so a part that a message already quoted with repr reads the same."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


@dataclass(frozen=True, slots=True)
class Target:
    """A destination as a user typed it: `name`, `ip`, `host:port`, `[v6]:port` or a URL."""

    host: Host
    port: int | None
    text: str


def parse_target(text: str) -> Target:
    """Split a user-typed destination into host and port; InvalidHostError when unusable."""
    raw = text.strip()
    port: int | None = None
    if "://" in raw:
        parts = urlsplit(raw)
        netloc = parts.netloc.rpartition("@")[2]
        host_text, port = split_host_port(netloc)
        if port is None:
            port = DEFAULT_PORTS.get(parts.scheme.lower())
    else:
        host_text, port = split_host_port(raw)
    return Target(parse_host(host_text), port, raw)


def cmd_check(args: argparse.Namespace) -> int:
    """Load each policy, report errors (exit 1) and warnings (rules that cannot do their job)."""
    status = EXIT_OK
    for path in args.policy:
        try:
            policy = Policy.from_file(path)
        except GuarddError as exc:
            print(escaped(f"error: {exc}"), file=sys.stderr)
            status = EXIT_ERROR
            continue
        warnings = [
            f"{later.location}: warning: rule {later.id!r} can never match: rule "
            f"{earlier.id!r} ({earlier.location}) matches everything it does first"
            for later, earlier in policy.shadowed()
        ] + [
            f"{rule.location}: warning: rule {rule.id!r} has a 'method' condition, but the method "
            f"is only seen in plaintext HTTP; over TLS (port 443) this rule will not match"
            for rule in policy.method_rules_over_tls()
        ] + [
            f"{rule.location}: warning: rule {rule.id!r}: {rule.unvouched}; it will not open "
            f"private addresses"
            for rule in policy.private_closed()
        ]
        for line in warnings:
            print(escaped(line), file=sys.stderr)
        if warnings and args.strict:
            status = EXIT_ERROR
        entries = f", {policy.index.size} host entries" if policy.index.size > len(policy.rules) \
            else ""
        print(escaped(f"ok: {len(policy.rules)} rules{entries} ({path})"))
    return status


def private_note(policy: Policy, decision: Decision, request: Request) -> str | None:
    """What the private-address protection makes of the deciding rule: why it denied this
    private address, or, for an allowed name whose addresses are not given, whether private
    ones would pass. None when no private address is in question."""
    rule = decision.rule
    if rule is None:
        return None
    if decision.overridden and decision.builtin is AddrClass.PRIVATE:
        return f"not opened: {policy.private_refusal(rule, request.name)}"
    if not decision.allowed:
        return None
    if request.ip is not None:
        return "opened" if classify(request.ip) is AddrClass.PRIVATE else None
    why = policy.private_refusal(rule, request.name)
    return f"not opened: {why}" if why else "opened"


def explain_fields(policy: Policy, target: Target, decision: Decision,
                   dns: Decision | None, request: Request) -> dict[str, object]:
    """The explanation as one flat object (also the `--json` output)."""
    rule = decision.rule
    fields: dict[str, object] = {
        "effect": decision.effect.value,
        "target": target.text,
        "host": str(target.host),
        "address": str(request.ip) if target.host.ip is None and request.ip else None,
        "port": target.port,
        "method": request.method,
        "client": request.client or None,
        "matchedRule": decision.matched_rule,
        "position": rule.position + 1 if rule else None,
        "location": rule.location if rule else None,
        "reason": decision.reason,
        "builtin": decision.builtin.value if decision.builtin else None,
        "private": private_note(policy, decision, request),
        "policy": policy.source,
    }
    if dns is not None:
        fields["dns"] = "resolve" if dns.allowed else "nxdomain"
        fields["dnsRule"] = dns.matched_rule
    return {key: value for key, value in fields.items() if value is not None}


def explain_address(text: str | None, target: Target) -> IPAddress | None:
    """The `--address` a name target resolved to; InvalidHostError when unusable."""
    if text is None:
        return None
    if target.host.ip is not None:
        raise InvalidHostError("--address gives the address a name resolved to; the target is "
                               "an address already")
    address = parse_ip(text.strip())
    if address is None:
        raise InvalidHostError(f"--address {text!r} is not an IP address")
    return address


def cmd_explain(args: argparse.Namespace) -> int:
    policy = Policy.from_file(args.policy)
    target = parse_target(args.target)
    port = args.port if args.port is not None else target.port
    target = Target(target.host, port, target.text)
    address = explain_address(args.address, target)
    name = target.host.name
    request = Request(DNS_QUERY if args.dns else NETWORK_REQUEST, name=name,
                      ip=address or target.host.ip, port=None if args.dns else port,
                      method=args.method.upper() if args.method else None,
                      client=args.client or "", listener="explain")
    dns = policy.resolvable(name) if name is not None else None
    if args.dns and dns is not None:  # a DNS answer's addresses are vetted like a connect's
        decision = dns if address is None else policy.vet_address(dns, name, address)
    else:
        decision = policy.decide(request)
    fields = explain_fields(policy, target, decision, dns, request)
    if args.json:
        print(json.dumps(fields, indent=2, ensure_ascii=True))  # escapes controls, bidi, U+2028
        return EXIT_OK if decision.allowed else EXIT_DENY
    shown = f"{target.host}:{port}" if port is not None else str(target.host)
    shown += f" at {address}" if address is not None else ""
    where = f" ({fields['location']})" if "location" in fields else ""
    builtin = f"  built-in: {fields['builtin']}" if "builtin" in fields else ""
    lines = [f"{decision.effect.value:<5} {shown}  rule {decision.matched_rule}{where}{builtin}"]
    if "position" in fields:
        lines.append(f"  position: {fields['position']} of {len(policy.rules)}")
    lines.append(f"  reason: {decision.reason}")
    if "private" in fields:
        lines.append(f"  private: {fields['private']}")
    if dns is not None:
        lines.append(f"  dns: {fields['dns']} (rule {dns.matched_rule})")
    for line in lines:
        print(escaped(line))
    return EXIT_OK if decision.allowed else EXIT_DENY


def cmd_run(args: argparse.Namespace) -> int:
    """Build the config (file, then flags on top) and run the daemon until it is stopped."""
    from guardd import daemon
    from guardd.config import Config, apply_settings, load_config_file

    config = load_config_file(Path(args.config)) if args.config else Config()
    flags: dict[str, object] = {}
    for flag, key in (("policy", "policy"), ("dns", "dns"), ("socks", "socks"),
                      ("upstream", "upstreams"),
                      ("metrics", "metrics"), ("audit", "audit"), ("log_level", "logLevel")):
        value = getattr(args, flag)
        if value is not None:
            flags[key] = {"dir": value} if key == "audit" else value
    config = apply_settings(config, flags, Path.cwd(), "command line")
    try:
        daemon.run(config)
    except OSError as exc:
        print(f"error: cannot start guardd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from guardd.audit import format_records, iter_records, parse_since

    now = datetime.now(timezone.utc)
    filters: dict[str, str] = {}
    for item in args.filter or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise AuditError(f"--filter {item!r}: write KEY=VALUE, e.g. action=network.request")
        filters[key] = value
    records = iter_records(Path(args.audit), filters=filters,
                          since=parse_since(args.since, now) if args.since else None,
                          until=parse_since(args.until, now) if args.until else None,
                          include_trail=args.all)
    out = sys.stdout
    for chunk in format_records(records, args.format):
        out.write(chunk)
    out.flush()
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check the chain (and the anchor); every line is terminal-safe, whatever is in the files."""
    from guardd.audit import terminal_safe, verify

    report = verify(Path(args.audit), Path(args.anchor) if args.anchor else None)
    for warning in report.warnings:
        print(terminal_safe(f"warning: {warning}"), file=sys.stderr)
    if not report.ok:
        print(terminal_safe(f"broken: {report.first_error}"), file=sys.stderr)
        return EXIT_ERROR
    line = f"ok: {report.records} records in {report.files} files, chain intact"
    if report.last_seq is not None:
        line += f", seq {report.first_seq}..{report.last_seq}"
    if report.anchor is not None:
        line += f", {report.anchored} anchored checkpoints match {report.anchor}"
    print(terminal_safe(line))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardd", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate policy files and warn about dead rules")
    check.add_argument("policy", nargs="+", metavar="POLICY")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.set_defaults(handler=cmd_check)

    explain = commands.add_parser("explain", help="show how a policy decides one destination")
    explain.add_argument("--policy", required=True, metavar="P")
    explain.add_argument("--client", metavar="C", help="client address (for the record)")
    explain.add_argument("--method", metavar="M", help="HTTP method, e.g. GET")
    explain.add_argument("--port", type=int, metavar="N", help="destination port")
    explain.add_argument("--dns", action="store_true",
                         help="explain a DNS lookup (dns.query) instead of a connection")
    explain.add_argument("--address", metavar="IP",
                         help="the address the name resolved to (judged as a connect to it, or "
                              "with --dns as an address in the answer)")
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.add_argument("target", metavar="TARGET", help="domain, IP, host:port or URL")
    explain.set_defaults(handler=cmd_explain)

    run = commands.add_parser("run", help="run the daemon (DNS and SOCKS5 guard, audit, metrics)")
    run.add_argument("--config", metavar="FILE", help="daemon config (see systemd/guardd.yaml)")
    run.add_argument("--policy", metavar="P", help="policy file (default /etc/guardd/policy.yaml)")
    run.add_argument("--dns", action="extend", nargs="+", metavar="ADDR:PORT",
                     help="DNS listen addresses, UDP and TCP (default 0.0.0.0:53)")
    run.add_argument("--socks", action="extend", nargs="+", metavar="ADDR:PORT",
                     help="SOCKS5 listen addresses (default: none)")
    run.add_argument("--upstream", action="extend", nargs="+", metavar="ADDR[:PORT]",
                     help="upstream DNS servers (default: nameservers of /etc/resolv.conf)")
    run.add_argument("--metrics", metavar="ADDR:PORT",
                     help="Prometheus endpoint (default 127.0.0.1:9477; 'off' disables it)")
    run.add_argument("--audit", metavar="DIR", help="audit trail directory (default /var/log/guardd)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run.set_defaults(handler=cmd_run)

    audit = commands.add_parser("audit", help="read the audit trail")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    export = audit_commands.add_parser("export", help="print matching records in time order")
    export.add_argument("--audit", default=str(DEFAULT_AUDIT_DIR), metavar="DIR")
    export.add_argument("--filter", action="append", metavar="KEY=VALUE",
                        help="keep records whose field equals VALUE (repeatable)")
    export.add_argument("--since", metavar="24h|RFC3339")
    export.add_argument("--until", metavar="24h|RFC3339")
    export.add_argument("--format", choices=("json", "jsonl", "csv"), default="json")
    export.add_argument("--all", action="store_true",
                        help="also the trail's own records (checkpoints, notes of dropped ones)")
    export.set_defaults(handler=cmd_audit_export)
    check_chain = audit_commands.add_parser(
        "verify", help="check the trail's hash chain, its start and, against an anchor, its end")
    check_chain.add_argument("--audit", default=str(DEFAULT_AUDIT_DIR), metavar="DIR")
    check_chain.add_argument("--anchor", metavar="FILE",
                             help="a copy of the anchor file kept off the host (default: "
                                  "anchor.jsonl in DIR, when there is one)")
    check_chain.set_defaults(handler=cmd_audit_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except GuarddError as exc:
        print(escaped(f"error: {exc}"), file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidHostError) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
