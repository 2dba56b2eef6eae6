"""Command line: `guardd run | check | explain | audit | sandbox`.

Every subcommand is a function from parsed arguments to an exit code; errors that a user can fix
(`GuarddError`) are printed as one line on stderr, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from guardd import sandbox
from guardd.addr import AddrClass, IPAddress, Target, classify, parse_ip, parse_target
from guardd.audit import terminal_safe
from guardd.config import DEFAULT_AUDIT_DIR, RESOLV_CONF
from guardd.dns.upstreams import Upstream, parse_upstream, upstreams_from_resolv_conf
from guardd.errors import AuditError, DNSWireError, GuarddError, InvalidHostError
from guardd.net import hostport
from guardd.policy.engine import Policy
from guardd.policy.model import DNS_QUERY, NETWORK_REQUEST, Decision, Request, Rule

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_DENY = 3
#: A reader of the output that stopped early (as a shell reports a SIGPIPE: 128 + 13).
EXIT_BROKEN_PIPE = 141


class UnresolvedError(GuarddError):
    """`explain` needs the addresses a name resolves to, and cannot have them."""


class UnmappedClientError(GuarddError):
    """`explain --config`: the daemon would refuse the client before any policy judged it."""


class AmbiguousUserError(GuarddError):
    """`explain`: the principal asked for is not one (a user of two principals, one per
    listener; a principal named and a user of another; a login without the config)."""


def cmd_check(args: argparse.Namespace) -> int:
    """Load each policy, report errors (exit 1) and warnings (rules that cannot do their job)."""
    status = EXIT_OK
    for path in args.policy:
        try:
            policy = Policy.from_file(path)
        except GuarddError as exc:
            print(terminal_safe(f"error: {exc}", keep_backslashes=True), file=sys.stderr)
            status = EXIT_ERROR
            continue
        warnings = [
            f"{later.location}: warning: rule {later.id!r} can never match: rule "
            f"{earlier.id!r} ({earlier.location}) matches everything it does first"
            for later, earlier in policy.shadowed()
        ] + [
            f"{rule.location}: warning: rule {rule.id!r} has a 'method' condition, but the method "
            f"is only seen in plaintext HTTP: a TLS connection at {_ports_text(rule)} does not "
            "match it"
            for rule in policy.method_rules_over_tls()
        ] + [
            f"{rule.location}: warning: rule {rule.id!r} has a 'method' condition and names "
            f"loopback ({net}) with no 'port': it opens no connect there for SOCKS, CONNECT "
            "or the transparent listener (one is opened before its method is known only at a "
            "port the rule names), and every port there to the HTTP proxy's http:// requests "
            "of its methods (said before the connect): name a port"
            for rule, net in policy.method_rules_at_loopback_without_port()
        ] + [
            f"{rule.location}: warning: rule {rule.id!r}: {rule.unvouched}; it will not open "
            f"private addresses"
            for rule in policy.private_closed()
        ] + [
            f"{rule.location}: warning: rule {rule.id!r} denies {glob!r}, which clients of "
            f"IDNA 2003 (transitional) ask as {other!r}, another name: deny that too"
            for rule, glob, other in policy.denied_spelled_otherwise()
        ]
        for line in warnings:
            print(terminal_safe(line), file=sys.stderr)
        if warnings and args.strict:
            status = EXIT_ERROR
        failures = policy.failed_tests()
        for line in failures:
            print(terminal_safe(f"error: {line}"), file=sys.stderr)
        if failures:
            status = EXIT_ERROR
            continue
        entries = f", {policy.index.size} host entries" if policy.index.size > len(policy.rules) \
            else ""
        tests = f", {len(policy.tests)} tests pass" if policy.tests else ""
        print(terminal_safe(f"ok: {len(policy.rules)} rules{entries}{tests} ({path})"))
        for rule in policy.untested_rules() if policy.tests else ():
            print(terminal_safe(f"  note: no test reaches rule {rule.id!r} ({rule.location})"))
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


@dataclass(frozen=True, slots=True)
class Resolved:
    """What the upstreams answered for a name, and the verdict on a connect to each address."""

    upstreams: tuple[Upstream, ...]
    verdicts: tuple[tuple[IPAddress, Decision], ...]

    def __str__(self) -> str:
        upstreams = ", ".join(map(str, self.upstreams))
        if len(self.verdicts) == 1:
            return f"judged at the addresses {upstreams} returned: {self.verdicts[0][0]}"
        each = ", ".join(f"{ip} ({verdict.effect.value})" for ip, verdict in self.verdicts)
        return (f"judged at the addresses {upstreams} returned: {each}; the daemon connects to "
                "the first allowed one (IPv6 first), which is shown")


def explain_fields(policy: Policy, target: Target, decision: Decision, dns: Decision | None,
                   request: Request, resolved: Resolved | None) -> dict[str, object]:
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
    if resolved is not None:
        fields["resolvedBy"] = [str(upstream) for upstream in resolved.upstreams]
        fields["resolved"] = {str(ip): verdict.effect.value for ip, verdict in resolved.verdicts}
    return {key: value for key, value in fields.items() if value is not None}


def explain_address(text: str | None, target: Target) -> IPAddress | None:
    """The `--ip` a name target resolved to; InvalidHostError when unusable."""
    if text is None:
        return None
    if target.host.ip is not None:
        raise InvalidHostError("--ip gives the address a name resolved to; the target is an "
                               "address already")
    address = parse_ip(text.strip())
    if address is None:
        raise InvalidHostError(f"--ip {text!r} is not an IP address")
    return address


def resolve_addresses(name: str, upstreams: Sequence[Upstream]
                      ) -> tuple[list[IPAddress], list[Upstream]]:
    """The addresses the daemon would judge a connect to `name` at (its AAAA and A records, the
    two questions it asks itself), and the upstreams that answered; UnresolvedError when there
    are none."""
    # Loaded here, not for every command: only a lookup needs an event loop and the wire format.
    import asyncio

    from guardd.dns import wire
    from guardd.dns.resolver import UpstreamFailure, UpstreamResolver

    async def ask_both() -> list[tuple[bytes, Upstream]]:
        resolver = UpstreamResolver(upstreams)
        # Id 0: the resolver sends every attempt under a random id of its own.
        return await asyncio.gather(*(resolver.resolve_with_upstream(wire.build_query(
            name, qtype, 0)) for qtype in (wire.QType.AAAA, wire.QType.A)))

    hint = "or judge the name at an address of your choice with --ip ADDRESS"
    found: list[IPAddress] = []
    try:
        answers = asyncio.run(ask_both())
        for answer, upstream in answers:
            response = wire.parse_response(answer)
            if response.rcode == wire.Rcode.NXDOMAIN:
                raise UnresolvedError(f"{name} does not exist (NXDOMAIN from {upstream}), so a "
                                      f"connect to it goes nowhere; {hint}")
            if response.rcode != wire.Rcode.NOERROR:
                raise UnresolvedError(f"{upstream} answered rcode {response.rcode} for {name}; "
                                      f"{hint}")
            found += wire.answer_addresses(response)
    except (UpstreamFailure, DNSWireError) as exc:
        raise UnresolvedError(f"cannot resolve {name}, which a rule judges by its address: "
                              f"{exc}; {hint}") from None
    answered = list(dict.fromkeys(upstream for _, upstream in answers))
    if not found:
        raise UnresolvedError(f"{', '.join(map(str, answered))} returned no address for {name}, "
                              f"so a connect to it goes nowhere; {hint}")
    return list(dict.fromkeys(found)), answered


def judge_at(policy: Policy, request: Request, addresses: Sequence[IPAddress]
             ) -> tuple[Decision, Request, tuple[tuple[IPAddress, Decision], ...]]:
    """Judge `request`, a connect to a name, at each of the name's `addresses` as the daemon
    does: it tries the allowed addresses, IPv6 first, so the first allowed verdict in that order
    is the answer, else the first denial. Returns that verdict, the request that got it (at its
    address), and every address's verdict."""
    ordered = sorted(addresses, key=lambda ip: -ip.version)
    requests = [dataclasses.replace(request, ip=ip) for ip in ordered]
    verdicts = [policy.decide(each) for each in requests]
    index = next((i for i, verdict in enumerate(verdicts) if verdict.allowed), 0)
    return verdicts[index], requests[index], tuple(zip(ordered, verdicts, strict=True))


def explain_upstreams(texts: Sequence[str] | None) -> list[Upstream]:
    """`--upstream` servers, or else resolv.conf's nameservers (as the daemon's default)."""
    if texts:
        return [parse_upstream(text) for text in texts]
    return upstreams_from_resolv_conf(RESOLV_CONF)


def _counted_here(client: str) -> str:
    """`client` as a daemon on this host counts it (`addr.counted_as`): an address of this
    host is loopback."""
    from guardd.addr import count_host_as_loopback, counted_as
    from guardd.hosts import HostAddresses

    count_host_as_loopback(HostAddresses().holds_source)
    try:
        return counted_as(client)
    finally:
        count_host_as_loopback(None)


def _ports_text(rule: Rule) -> str:
    """The ports a rule names, for a warning ("any port" when it names none)."""
    if not rule.ports:
        return "any port (443, say)"
    return "port " + " or ".join(str(low) if low == high else f"{low}-{high}"
                                 for low, high in rule.ports)


def explain_policy(args: argparse.Namespace) -> tuple[Path, str | None]:
    """The policy file `explain` asks and whose it is: `--policy`, or with `--config` that of the
    principal `--client` (a principal's name or an address) and `--user` map to, as the daemon
    maps them, whose `nat64Prefixes` read addresses from now on as the daemon reads them
    (session 61's final attack: explained as public). UnmappedClientError when the daemon
    would refuse the client."""
    if args.config is None:
        if args.user or args.listener:
            raise AmbiguousUserError("--user and --listener need --config (the daemon config "
                                     "maps logins to principals)")
        return Path(args.policy), None
    from guardd.addr import translate_through
    from guardd.config import DEFAULT_PRINCIPAL, load_config_file
    from guardd.guard import HTTP_LISTENER, SOCKS_LISTENER
    from guardd.principals import PrincipalMap

    config = load_config_file(Path(args.config))
    translate_through(config.nat64_prefixes)
    files = config.policy_files
    mapping = PrincipalMap.from_config(config)
    client = args.client or ""
    listeners = [args.listener] if args.listener else [SOCKS_LISTENER, HTTP_LISTENER]
    by_user = {found for listener in listeners
               if (found := mapping.by_user(listener, args.user)) is not None}
    if len(by_user) > 1:
        raise AmbiguousUserError(f"user {args.user!r} is a SOCKS user of one principal and "
                                 "an HTTP user of another: say which with --listener")
    logins = {SOCKS_LISTENER: ("socksUsers", {user for user, _ in config.socks_users}),
              HTTP_LISTENER: ("httpUsers", {user for user, _ in config.http_users})}
    if (args.user or args.listener) and not any(  # (session 60's read-through: explained
            not logins[listener][1] or args.user in logins[listener][1]  # as allowed)
            for listener in listeners):
        asking = " and ".join(f"{listener} ({logins[listener][0]})" for listener in listeners)
        raise UnmappedClientError(
            f"the {asking} listener{'s ask' if len(listeners) > 1 else ' asks'} for a login, "
            + (f"and {args.user!r} is none" if args.user else "and no --user is given")
            + ": the daemon refuses the client before any policy judges it")
    if client in files and by_user and by_user != {client}:
        raise AmbiguousUserError(f"--client {client} names a principal and --user "
                                 f"{args.user!r} another: give one of them")
    name = client if client in files else next(iter(by_user), None)
    if name is None:
        name = mapping.by_address(_counted_here(client)) if client else DEFAULT_PRINCIPAL
    if name is None:
        raise UnmappedClientError(f"{client} maps to no principal and {args.config} says "
                                  "unmapped: refuse, so the daemon refuses all it asks")
    return files[name], name


def cmd_explain(args: argparse.Namespace) -> int:
    path, principal = explain_policy(args)
    policy = Policy.from_file(path)
    target = parse_target(args.target)
    port = args.port if args.port is not None else target.port
    target = Target(target.host, port, target.text)
    address = explain_address(args.ip, target)
    name = target.host.name
    request = Request(DNS_QUERY if args.dns else NETWORK_REQUEST, name=name,
                      ip=address or target.host.ip, port=None if args.dns else port,
                      method=args.method.upper() if args.method else None,
                      client=args.client or "", listener="explain")
    dns = policy.resolvable(name) if name is not None else None
    resolved = None
    if args.dns and dns is not None:  # a DNS answer's addresses are vetted like a connect's
        decision = dns if address is None else policy.vet_address(dns, name, address)
    else:
        decision = policy.decide(request)
        # A name the daemon would look up (its DNS view allows it) is judged where it points.
        if (name is not None and address is None and dns is not None and dns.allowed
                and policy.depends_on_address(name, decision)):
            addresses, answered = resolve_addresses(name, explain_upstreams(args.upstream))
            decision, request, verdicts = judge_at(policy, request, addresses)
            resolved = Resolved(tuple(answered), verdicts)
    fields = explain_fields(policy, target, decision, dns, request, resolved)
    if principal is not None:
        fields["principal"] = principal
    if args.json:
        print(json.dumps(fields, indent=2, ensure_ascii=True))  # escapes controls, bidi, U+2028
        return EXIT_OK if decision.allowed else EXIT_DENY
    shown = hostport(str(target.host), port) if port is not None else str(target.host)
    shown += f" at {fields['address']}" if "address" in fields else ""
    where = f" ({fields['location']})" if "location" in fields else ""
    builtin = f"  built-in: {fields['builtin']}" if "builtin" in fields else ""
    lines = [f"{decision.effect.value:<5} {shown}  rule {decision.matched_rule}{where}{builtin}"]
    if address is not None:
        lines.append(f"  judged at {address} (given with --ip)")
    elif resolved is not None:
        lines.append(f"  {resolved}")
    if principal is not None:
        lines.append(f"  principal: {principal} ({policy.source})")
    if "position" in fields:
        lines.append(f"  position: {fields['position']} of {len(policy.rules)}")
    lines.append(f"  reason: {decision.reason}")
    if "private" in fields:
        lines.append(f"  private: {fields['private']}")
    if dns is not None:
        lines.append(f"  dns: {fields['dns']} (rule {dns.matched_rule})")
    for line in lines:
        print(terminal_safe(line))
    return EXIT_OK if decision.allowed else EXIT_DENY


def cmd_run(args: argparse.Namespace) -> int:
    """Build the config (file, then flags on top) and run the daemon until it is stopped."""
    from guardd import daemon
    from guardd.config import Config, apply_settings, load_config_file
    from guardd.watch import stamp

    config_file = Path(args.config) if args.config else None
    flags: dict[str, object] = {}
    for flag, key in (("policy", "policy"), ("dns", "dns"), ("socks", "socks"),
                      ("http", "http"), ("transparent", "transparent"),
                      ("upstream", "upstreams"),
                      ("metrics", "metrics"), ("audit", "audit"), ("log_level", "logLevel"),
                      ("watch", "watch"), ("same_client", "sameClient")):
        value = getattr(args, flag)
        if value is not None:
            flags[key] = {"dir": value} if key == "audit" else value
    def read() -> Config:
        """The config file (or the defaults), then the flags on top: at start and at each
        reload."""
        base = load_config_file(config_file) if config_file is not None else Config()
        return apply_settings(base, flags, Path.cwd(), "command line")

    seen = stamp(str(config_file)) if config_file is not None else None  # (before the read:
    config = read()                                                      # `--watch`)
    try:
        daemon.run(config, config_file, read, seen)
    except OSError as exc:
        print(f"error: cannot start guardd: {exc}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from guardd.audit import format_records, iter_records, parse_since

    now = datetime.now(UTC)
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
    from guardd.audit import verify

    report = verify(Path(args.audit), Path(args.anchor) if args.anchor else None)
    for warning in report.warnings:
        print(terminal_safe(f"warning: {warning}"), file=sys.stderr)
    if not report.ok:
        print(terminal_safe(f"broken: {report.first_error}"), file=sys.stderr)
        return EXIT_ERROR
    own = f" (and {report.checkpoints} of the trail's own: checkpoints, notes)" \
        if report.checkpoints else ""
    line = f"ok: {report.records} records{own} in {report.files} files, chain intact"
    if report.last_seq is not None:
        line += f", seq {report.first_seq}..{report.last_seq}"
    if report.anchor is not None:
        line += f", {report.anchored} anchored checkpoints match {report.anchor}"
    print(terminal_safe(line))
    return EXIT_OK


def cmd_audit_replay(args: argparse.Namespace) -> int:
    """Which past decisions a new policy would change."""
    from guardd.replay import replay

    policy = Policy.from_file(args.policy)
    report = replay(policy, _past_records(args))
    for line in report.lines():
        print(terminal_safe(line))
    return EXIT_OK


def cmd_audit_learn(args: argparse.Namespace) -> int:
    """An allow-list policy proposed from what went through (report mode's denials too)."""
    from guardd.replay import learn

    sys.stdout.write(learn(_past_records(args), args.audit))
    return EXIT_OK


def _past_records(args: argparse.Namespace) -> Iterator[dict[str, object]]:
    """The trail's records for `audit replay` and `learn`: `--since` then, of `--principal`
    (a record naming none counts as the default's: a daemon without principals; with them,
    such records are refusals before the client was known, which name no rule, and replay
    and learn pass them by)."""
    from guardd.audit import iter_records, parse_since
    from guardd.config import DEFAULT_PRINCIPAL

    since = parse_since(args.since, datetime.now(UTC)) if args.since else None
    records = iter_records(Path(args.audit), since=since)
    if args.principal is None:
        return records
    return (record for record in records
            if record.get("principal", DEFAULT_PRINCIPAL) == args.principal)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guardd", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate policy files and warn about dead rules")
    check.add_argument("policy", nargs="+", metavar="POLICY")
    check.add_argument("--strict", action="store_true", help="treat warnings as errors")
    check.set_defaults(handler=cmd_check)

    explain = commands.add_parser("explain", help="show how a policy decides one destination")
    whose = explain.add_mutually_exclusive_group(required=True)
    whose.add_argument("--policy", metavar="P", help="the policy file to ask")
    whose.add_argument("--config", metavar="FILE",
                       help="the daemon config: ask the policy of the principal --client (and "
                            "--user) map to, as the daemon would")
    explain.add_argument("--client", metavar="C",
                         help="client address (one of this host's is loopback, as the daemon "
                              "here takes it), or with --config a principal's name")
    explain.add_argument("--user", metavar="U",
                         help="with --config: the SOCKS5 or HTTP proxy user the client logs in "
                              "as")
    explain.add_argument("--listener", choices=("socks", "http"),
                         help="with --user: the listener it logs in to")
    explain.add_argument("--method", metavar="M", help="HTTP method, e.g. GET")
    explain.add_argument("--port", type=int, metavar="N", help="destination port")
    explain.add_argument("--dns", action="store_true",
                         help="explain a DNS lookup (dns.query) instead of a connection")
    explain.add_argument("--ip", "--address", metavar="IP",
                         help="the address the name resolved to (judged as a connect to it, or "
                              "with --dns as an address in the answer); without it, a name that "
                              "a rule judges by address is resolved and judged at each address")
    explain.add_argument("--upstream", action="append", metavar="ADDR[:PORT]",
                         help="DNS server to resolve such a name with (repeatable; default: "
                              "nameservers of /etc/resolv.conf)")
    explain.add_argument("--json", action="store_true", help="print one JSON object")
    explain.add_argument("target", metavar="TARGET", help="domain, IP, host:port or URL")
    explain.set_defaults(handler=cmd_explain)

    run = commands.add_parser("run", help="run the daemon (DNS, SOCKS5 and HTTP proxy guard, "
                              "audit, metrics)")
    run.add_argument("--config", metavar="FILE", help="daemon config (see systemd/guardd.yaml)")
    run.add_argument("--policy", metavar="P", help="policy file (default /etc/guardd/policy.yaml)")
    run.add_argument("--dns", action="extend", nargs="+", metavar="ADDR:PORT",
                     help="DNS listen addresses, UDP and TCP (default 0.0.0.0:53)")
    run.add_argument("--socks", action="extend", nargs="+", metavar="ADDR:PORT",
                     help="SOCKS5 listen addresses (default: none)")
    run.add_argument("--http", action="extend", nargs="+", metavar="ADDR:PORT",
                     help="HTTP proxy listen addresses, CONNECT and absolute-form, for "
                          "HTTPS_PROXY/HTTP_PROXY clients (default: none)")
    run.add_argument("--transparent", action="extend", nargs="+", metavar="ADDR:PORT",
                     help="transparent listen addresses: connections the agent sandbox's "
                          "nftables redirect, judged by their original destination (default: "
                          "none; see docs/deploy.md)")
    run.add_argument("--upstream", action="extend", nargs="+", metavar="ADDR[:PORT]",
                     help="upstream DNS servers (default: nameservers of /etc/resolv.conf)")
    run.add_argument("--same-client", action="append", metavar="ADDR,ADDR",
                     help="addresses (or networks, such as an IPv6 /64 routed to one agent) "
                          "of one agent, counted as one client by every per-client limit "
                          "(repeatable: a group each; `guardd sandbox up` prints its agent's)")
    run.add_argument("--metrics", metavar="ADDR:PORT",
                     help="Prometheus endpoint (default 127.0.0.1:9477; 'off' disables it)")
    run.add_argument("--audit", metavar="DIR",
                     help="audit trail directory (default /var/log/guardd)")
    run.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                     help="what guardd logs (default info; `logLevel` in the config file)")
    run.add_argument("--watch", action="store_true", default=None,
                     help="reload when a policy file, a domain list it names or the daemon "
                          "config (--config) changes (a ConfigMap update, an edit), as SIGHUP "
                          "does")
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
                        help="also the trail's own records (checkpoints, notes of dropped ones, "
                             "policy loads)")
    export.set_defaults(handler=cmd_audit_export)
    check_chain = audit_commands.add_parser(
        "verify", help="check the trail's hash chain, its start and, against an anchor, its end")
    check_chain.add_argument("--audit", default=str(DEFAULT_AUDIT_DIR), metavar="DIR")
    check_chain.add_argument("--anchor", metavar="FILE",
                             help="a copy of the anchor file kept off the host (default: "
                                  "anchor.jsonl in DIR, when there is one)")
    check_chain.set_defaults(handler=cmd_audit_verify)
    for name, handler, help_text in (
            ("replay", cmd_audit_replay, "which past decisions a new policy would change "
             "(allow->deny, deny->allow), counted per rule"),
            ("learn", cmd_audit_learn, "propose an allow-list policy from what went through "
             "(run the agent with mode: report first)")):
        command = audit_commands.add_parser(name, help=help_text)
        command.add_argument("--audit", default=str(DEFAULT_AUDIT_DIR), metavar="DIR")
        command.add_argument("--since", metavar="WHEN",
                             help="only decisions since then (24h, 2026-11-29T00:00:00Z)")
        command.add_argument("--principal", metavar="NAME",
                             help="only the decisions of this principal (per-agent policies)")
        if name == "replay":
            command.add_argument("--policy", required=True, metavar="NEW",
                                 help="the policy to judge the past decisions with")
        command.set_defaults(handler=handler)
    sandbox.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except GuarddError as exc:
        print(terminal_safe(f"error: {exc}", keep_backslashes=True), file=sys.stderr)
        if isinstance(exc, UnmappedClientError):
            return EXIT_DENY
        return EXIT_USAGE if isinstance(exc, InvalidHostError) else EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # (a reader that stopped early, `| head`: no traceback, and none
        # at the exit's flush either: session 60's read-through)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
