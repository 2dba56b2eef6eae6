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
from urllib.parse import urlsplit

from guardd.addr import Host, parse_host
from guardd.errors import GuarddError, InvalidHostError
from guardd.policy.engine import Policy
from guardd.policy.model import DNS_QUERY, NETWORK_REQUEST, Decision, Request

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DENY = 3

DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443, "ftp": 21, "ssh": 22}


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
        host_text, port = _split_host_port(netloc)
        if port is None:
            port = DEFAULT_PORTS.get(parts.scheme.lower())
    else:
        host_text, port = _split_host_port(raw)
    return Target(parse_host(host_text), port, raw)


def _split_host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise InvalidHostError(f"unexpected {rest!r} after ']' in {text!r}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidHostError(f"invalid port {port_text!r} in {text!r}")
    return host, int(port_text)


def _load_policies(paths: Sequence[str]) -> list[Policy]:
    return [Policy.from_file(path) for path in paths]


def cmd_check(args: argparse.Namespace) -> int:
    """Load each policy, report errors (exit 1) and warnings (rules that cannot do their job)."""
    status = EXIT_OK
    for path in args.policy:
        try:
            policy = Policy.from_file(path)
        except GuarddError as exc:
            print(f"error: {exc}", file=sys.stderr)
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
        ]
        for line in warnings:
            print(line, file=sys.stderr)
        if warnings and args.strict:
            status = EXIT_ERROR
        entries = f", {policy.index.size} host entries" if policy.index.size > len(policy.rules) \
            else ""
        print(f"ok: {len(policy.rules)} rules{entries} ({path})")
    return status


def explain_fields(policy: Policy, target: Target, decision: Decision,
                   dns: Decision | None, request: Request) -> dict[str, object]:
    """The explanation as one flat object (also the `--json` output)."""
    rule = decision.rule
    fields: dict[str, object] = {
        "effect": decision.effect.value,
        "target": target.text,
        "host": str(target.host),
        "port": target.port,
        "method": request.method,
        "client": request.client or None,
        "matchedRule": decision.matched_rule,
        "position": rule.position + 1 if rule else None,
        "location": rule.location if rule else None,
        "reason": decision.reason,
        "builtin": decision.builtin.value if decision.builtin else None,
        "policy": policy.source,
    }
    if dns is not None:
        fields["dns"] = "resolve" if dns.allowed else "nxdomain"
        fields["dnsRule"] = dns.matched_rule
    return {key: value for key, value in fields.items() if value is not None}


def cmd_explain(args: argparse.Namespace) -> int:
    policy = Policy.from_file(args.policy)
    target = parse_target(args.target)
    port = args.port if args.port is not None else target.port
    target = Target(target.host, port, target.text)
    request = Request(DNS_QUERY if args.dns else NETWORK_REQUEST, name=target.host.name,
                      ip=target.host.ip, port=None if args.dns else port,
                      method=args.method.upper() if args.method else None,
                      client=args.client or "", listener="explain")
    decision = policy.resolvable(target.host.name) if args.dns and target.host.name is not None \
        else policy.decide(request)
    dns = policy.resolvable(target.host.name) if target.host.name is not None else None
    fields = explain_fields(policy, target, decision, dns, request)
    if args.json:
        print(json.dumps(fields, indent=2))
    else:
        shown = f"{target.host}:{port}" if port is not None else str(target.host)
        where = f" ({fields['location']})" if "location" in fields else ""
        builtin = f"  built-in: {fields['builtin']}" if "builtin" in fields else ""
        print(f"{decision.effect.value:<5} {shown}  rule {decision.matched_rule}{where}{builtin}")
        if "position" in fields:
            print(f"  position: {fields['position']} of {len(policy.rules)}")
        print(f"  reason: {decision.reason}")
        if dns is not None:
            print(f"  dns: {fields['dns']} (rule {dns.matched_rule})")
    return EXIT_OK if decision.allowed else EXIT_DENY


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
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.add_argument("target", metavar="TARGET", help="domain, IP, host:port or URL")
    explain.set_defaults(handler=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except GuarddError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, InvalidHostError) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
