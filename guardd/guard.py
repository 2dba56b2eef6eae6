"""The one place where a request becomes a decision: policy, protections, rate limits, audit.

Listeners translate wire bytes into calls here and the returned `Verdict` back into bytes; nothing
else decides. A verdict is complete: the policy's decision, the built-in protections, the check
for guardd's own sockets, the rate limit (for every action, `dns.query` included) and the audit
record it implies. `Guard.commit` is the one way a listener records a verdict, and it releases
the answer only once the record reached the disk. A connect is judged step by step as its
listener learns more (`Connect`: the target, its addresses, the one connected to, the first
bytes), and a connection opened provisionally and then abandoned is recorded with what ended it.
Decisions about a DNS answer (an alias into a denied name, protected addresses, a reload during
the forward) are made here too, over the parsed response (`Guard.vet_answer`).

The policy is swapped atomically on reload: a decision in flight keeps the `Policy` object it
started with, and a DNS answer forwarded meanwhile is judged by the policy now in force.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import itertools
import math
import re
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from guardd.addr import (UNVERIFIABLE, AddrClass, IPAddress, classify, effective_address,
                         parse_host, several_places)
from guardd.audit import AuditRecord
from guardd.dns import wire
from guardd.dns.tunnel import TunnelDetector
from guardd.errors import InvalidHostError
from guardd.hosts import HostAddresses, ResolvedNames
from guardd.metrics import Metrics
from guardd.net import hostport
from guardd.ports import DestinationPorts
from guardd.policy.engine import REACHES_LOOPBACK, Policy, names_address
from guardd.policy.model import (DNS_QUERY, NETWORK_REQUEST, Decision, Effect, Request, Rule,
                                 own_denial)
from guardd.ratelimit import RateLimiter
from guardd.stream.sessions import Resumption, TlsSessions
from guardd.stream.sniff import ANY_METHOD, Kind, Sniffed

DNS_LISTENER = "dns"
SOCKS_LISTENER = "socks"
HTTP_LISTENER = "http"
TRANSPARENT_LISTENER = "transparent"
_WILDCARDS = {"0.0.0.0", "::"}
RESOLVER_PORTS = frozenset({53, 443, 853})
#: Where an upstream on guardd's host is taken to answer at every address of the host, beside
#: its own port: DNS and DNS over TLS. (Not 443: at another address, that is as likely any web
#: server of the host's, which a rule for loopback opens on purpose; DNS over HTTPS at the
#: upstream's own address stays closed.)
_HOST_RESOLVER_PORTS = frozenset({53, 853})
#: What guardd resolved a claimed name to, or the denial that left it none; None: not resolved.
ClaimAddresses = Sequence[IPAddress] | Decision | None
#: Where an HTTP forward proxy takes a Host without port. (An SNI has no port, and a server
#: that routes on it keeps the port it was reached on.)
_HTTP_PORT = 80
#: A method no rule names (a token no client sends): what any other method is judged as.
_UNNAMED_METHOD = "GUARDD-UNNAMED-METHOD"
_ALIASES = frozenset({wire.QType.CNAME, wire.QType.DNAME})
#: The size of the address a record's data is to a client that reads its type by its low byte
#: alone (musl: `p[1]`), by that byte: A's and AAAA's.
_ADDRESS_SIZE_BY_LOW_BYTE = {int(wire.QType.A): 4, int(wire.QType.AAAA): 16}
#: Records whose target is a name the client is sent to.
_POINTERS = frozenset({wire.QType.NS, wire.QType.MX, wire.QType.SRV, wire.QType.SVCB,
                       wire.QType.HTTPS, wire.QType.PTR, wire.QType.AFSDB, wire.QType.RT,
                       wire.QType.KX})
#: Names in a CNAME/DNAME chain that link records to the question; resolvers give up sooner.
MAX_CHAIN = 16
#: The outcome of a connection opened provisionally, recorded before the client hears.
PENDING_OUTCOME = "opened provisionally: the client's first bytes decide"
#: The failure of an allowed connect to a name with no address to try (`Connect._unresolved`;
#: `stream.tunnel.Failure.NO_ADDRESS`).
UNRESOLVED = "no_address"
#: How its record's outcome starts (`audit learn` learns nothing from it: nothing was reached).
UNRESOLVED_OUTCOME = "no usable address: "
#: How an allowed followed connection ended (`Connect._ended`): its record is a note of it,
#: no decision (`audit replay` skips it).
CLOSED_BY_SERVER = "closed by the server: "
DROPPED_AFTER_LAST = "not sent: "
UNANSWERED = "not answered: "  # (a request its server sent nothing of an answer to in time)
ENDED_OUTCOMES = (CLOSED_BY_SERVER, DROPPED_AFTER_LAST, UNANSWERED)
#: The outcome of a connection a policy reload closed.
_RELOAD_CLOSED = "closed: the reloaded policy would not open it"
#: Why a connection from one of guardd's own outbound sockets is refused.
LOOP = "the connection comes from guardd's own upstream socket (a loop)"
#: Why a source outside `clients` is refused, by every listener.
NOT_A_CLIENT = "client is not in guardd's client networks"
#: Why a client's query or connect does not go out while the audit trail has no room for its
#: records (`AuditSink.room_for`).
AUDIT_SHARE_TAKEN = "the audit trail is near its size cap and this client's records took " \
    "their share of the room left: nothing of its goes out until there is room"
AUDIT_DOWN = "the audit trail cannot be written now (see guardd's log): nothing goes out " \
    "until it can"
#: DNS verdicts kept (one per decision and query type; see `Guard.judge_query`).
_MAX_QUERY_VERDICTS = 4096
#: An absolute-form request-target's start, `scheme://` (RFC 3986 3.1).
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
#: Connect decisions kept (one per names and destination; see `Guard.judge_address`).
_MAX_CONNECT_VERDICTS = 4096
#: Each guard's key, with its policy's generation, in the resolved names every principal
#: shares (`ResolvedNames.view`).
_SCOPES = itertools.count()
#: Where Linux takes a connect to the unspecified address, by IP version.
_UNSPECIFIED_REACHES: dict[int, IPAddress] = {4: ipaddress.IPv4Address("127.0.0.1"),
                                              6: ipaddress.IPv6Address("::1")}
_OWN_SOCKET = own_denial(None, "destination is guardd itself or its upstream DNS "
                         "server (a loop or a way around the DNS guard)", AddrClass.LOOPBACK,
                         overridden=True)


def methods_served(policy: Policy, method: str | None, override: str | None
                   ) -> tuple[str | None, ...]:
    """Every method a request may be served as, each to be judged: its own, and the one an
    override names (`ANY_METHOD`: every method a rule of `policy` names, and one none names)."""
    if override is None:
        return (method,)
    if override == ANY_METHOD:
        return (method, *policy.methods_named, _UNNAMED_METHOD)
    return (method, override)


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision and the audit record it implies: what a listener answers with and records."""

    decision: Decision
    record: AuditRecord
    #: The `guardd_request_failures_total` reason of an allowed request that failed after its
    #: decision ("": none; such a verdict is no policy decision and is not counted as one).
    failure: str = ""
    #: The policy it was judged under (a DNS answer forwarded across a reload is judged again).
    policy: Policy | None = field(default=None, compare=False, repr=False)
    #: May it answer the same request again (a memoized DNS answer)? Not when a rate limit
    #: took part: each request must be counted.
    reusable: bool = True
    #: Denied by a rate limit (the name is not gone: the client may ask again later).
    limited: bool = False
    #: The record of a connection opened before its decision is made (a provisional connect:
    #: the first bytes decide): recorded before the client hears, counted as nothing (the
    #: decision that follows is).
    pending: bool = False
    #: The counter it adds to, found by its first `Guard.commit` (a memoized verdict is
    #: committed again and again).
    _count: Callable[[], None] | None = field(default=None, init=False, compare=False,
                                              repr=False)

    @property
    def allowed(self) -> bool:
        return self.decision.allowed


@dataclass(frozen=True, slots=True)
class Claim:
    """A host the client's first bytes name beyond the CONNECT target (see `Guard.claim`)."""

    name: str | None
    ip: IPAddress | None
    #: The ports a server may take it to.
    ports: tuple[int, ...]
    #: Why the claimed host is neither a name nor an address ("" when it is one).
    invalid: str = ""
    #: The host is an address: it names no site (a server serves its default one), so it is
    #: judged by `ip` rules alone, at the connect's address and at its own.
    bare: bool = False


@dataclass(frozen=True, slots=True)
class Candidate:
    """An address a connect may go to, its decision, and whether the first client bytes still
    decide (provisional: a `method` rule could change it)."""

    ip: IPAddress
    decision: Decision
    provisional: bool


class AuditSink(Protocol):
    """Where verdicts are recorded (`audit.AuditWriter` in the daemon, a list in tests)."""

    def write(self, record: AuditRecord, client: str | None = None,
              name: str | None = None, went_out: bool | None = None,
              account: str | None = None) -> None: ...

    @property
    def down(self) -> bool:
        """Records wait for a write that failed (`AuditWriter.down`)."""

    def room_for(self, client: str) -> bool:
        """Whether `client`'s next record may be written (`AuditWriter.room_for`): asked before
        what cannot be taken back, a query sent upstream."""

    def after_flush(self, callback: Callable[..., object], *args: object) -> None:
        """Run `callback(*args)` once everything written so far reached the disk."""

    def flush(self) -> bool:
        """Write what was written so far now (then run the `after_flush` callbacks); whether
        answers may leave (it is all on disk, or the writer fails open by choice)."""

    def write_now(self, record: AuditRecord, client: str | None = None,
                  went_out: bool | None = None) -> int | None:
        """Write `record` now, in a batch of its own; its number in the trail (see
        `AuditWriter.write_now`)."""


def most_restrictive(decisions: Iterable[Decision]) -> Decision:
    """The first denial, a policy's before guardd's own check's (the record names the rule
    that denied, which `audit replay` judges again: review of session 53, a rate limit spent
    first hid a rule's denial of the method); else the first denial only reported (report
    mode: what an enforcing policy would do is what the record must say); else the allow
    whose rate limit is tightest; else the first allow."""
    chosen: Decision | None = None
    checked: Decision | None = None
    for decision in decisions:
        if not decision.allowed:
            if not decision.own_check:
                return decision
            checked = checked or decision
        elif chosen is None or (chosen.enforced and (not decision.enforced or
                                                     _rate(decision) < _rate(chosen))):
            chosen = decision
    result = checked or chosen
    assert result is not None, "most_restrictive() of no decision"
    return result


def _rate(decision: Decision) -> float:
    """Requests a second that `decision`'s rule lets through (inf when unlimited)."""
    rule = decision.acting_rule
    limit = rule.rate_limit if rule is not None else None
    return math.inf if limit is None else limit.max_requests / limit.window


class Guard:
    """Decides and records for one principal (`principals.py`): its policy, its rate limits
    and its DNS tunnel budgets. The principals' guards share the rest (`sibling`)."""

    def __init__(self, policy: Policy, audit: AuditSink, metrics: Metrics,
                 limiter: RateLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 principal: str | None = None, names: ResolvedNames | None = None) -> None:
        self.policy = policy
        #: Whose policy this is, in every record (None: the daemon has no principals).
        self.principal = principal
        #: What each client looked up under each registrable domain (`dns/tunnel.py`).
        self.tunnels = TunnelDetector(policy.tunnel)
        self._clock = clock
        #: Which policy this is, counted from 0: a connect judged under an older one is judged
        #: again before it opens (`Connect.generation`).
        self.generation = 0
        self.audit = audit
        self.metrics = metrics
        #: What this principal's clients resolved under this policy, in the table every
        #: principal shares (`names`, `sibling`), a side of its own (`ResolvedNames.view`).
        self._scope = next(_SCOPES)
        self.resolved = (ResolvedNames() if names is None else names).view((self._scope, 0))
        self.limiter = limiter if limiter is not None else RateLimiter(clock)  # empty is falsy
        #: DNS queries' counts, in a table of their own: a query over UDP may come from any
        #: source the agent forges, and forged ones must not take the room of connects' counts
        #: (whose sources a handshake proved), nor, filling it, shut new clients out of DNS.
        self.query_limiter = RateLimiter(self.limiter.clock, self.limiter.max_keys,
                                         forgets_when_full=True)
        #: guardd's own listening sockets (host, port): a connect to one of them is a loop.
        self.own_sockets: set[tuple[str, int]] = set()
        #: The upstream resolvers (host, port): no connect to them there, nor on the ports a
        #: resolver also answers on (`RESOLVER_PORTS`: DNS, DNS over TLS, DNS over HTTPS).
        self.upstream_hosts: set[tuple[str, int]] = set()
        #: Local (address, port) -> remote (address, port) of every outbound connection guardd
        #: holds, from the moment its connect is under way (see `comes_back`).
        self.outbound: dict[tuple[str, int], tuple[str, int]] = {}
        #: Each client's connections to each destination, where guardd's ports in TIME_WAIT
        #: are not reused (the daemon reads whether they are: `ports.tw_reuse`).
        self.ports = DestinationPorts(0, clock=clock)
        self.host_addresses = HostAddresses()
        #: The TLS 1.2 sessions made through guardd, and what each was judged for: a server
        #: resumes one under any SNI (`stream.sessions`).
        self.tls_sessions = TlsSessions(clock=clock)
        #: (id of a decision, qtype) -> its DNS verdict (see `judge_query`).
        self._query_verdicts: dict[tuple[int, str], Verdict] = {}
        #: (names, address, port, method) -> its connect decision and whether it is provisional.
        self._connect_decisions: dict[tuple[tuple[str, ...], IPAddress, int, str | None],
                                      tuple[Decision, bool]] = {}
        #: (names, address, port, method) -> its decision (see `judge_names`).
        self._request_decisions: dict[tuple[tuple[str, ...], IPAddress, int, str | None],
                                      Decision] = {}
        #: The verdicts `Connect` made (see `Connect._verdict`), by what they say.
        self._connect_verdicts: dict[tuple[object, ...], Verdict] = {}
        self._count_decision = metrics.decisions.counter
        self._count_failure = metrics.request_failures.counter

    def sibling(self, policy: Policy, principal: str | None) -> Guard:
        """The guard of another principal: its own policy, rate limits, tunnel budgets,
        memoized verdicts and side of the names its clients resolved; the trail, the metrics
        and what guardd knows of the world shared (the resolved names' table and bound,
        guardd's own sockets, upstreams and outbound connections: a loop is a loop whoever
        asks; and the TLS sessions made, each bound to its principal)."""
        guard = Guard(policy, self.audit, self.metrics, clock=self._clock, principal=principal,
                      names=self.resolved.table)
        guard.own_sockets = self.own_sockets
        guard.upstream_hosts = self.upstream_hosts
        guard.outbound = self.outbound
        guard.ports = self.ports
        guard.host_addresses = self.host_addresses
        guard.tls_sessions = self.tls_sessions
        return guard

    def name_principal(self, principal: str | None) -> bool:
        """Name this guard's principal in its records (a reload added or removed
        `principals`); whether that changed it, and then the verdicts kept, whose records name
        the one before, are forgotten (session 59's attack: the default's records went on
        without `principal` after a reload that added principals, its policy unchanged)."""
        if principal == self.principal:
            return False
        self.principal = principal
        self._query_verdicts.clear()
        self._connect_verdicts.clear()
        return True

    def replace_policy(self, policy: Policy) -> None:
        """Swap in a new policy; what was judged under the old one is forgotten, and the names
        clients resolved under it no longer allow (their vetting was the old policy's; they
        may still deny: `denied_elsewhere`). What clients looked up is not forgotten: a tunnel
        suspected stays suspected."""
        self.policy = policy
        self.generation += 1
        self.resolved = self.resolved.table.view((self._scope, self.generation))
        self.tunnels.budget = policy.tunnel
        self._query_verdicts.clear()
        self._connect_decisions.clear()
        self._request_decisions.clear()
        self._connect_verdicts.clear()

    # -- recording ------------------------------------------------------------------------------

    def commit(self, verdict: Verdict, client: str | None,
               release: Callable[..., object] | None = None, *args: object,
               name: str | None = None, went_out: bool | None = None,
               account: str | None = None) -> None:
        """Record `verdict` for `client` and count it; then `release(*args)` (send the answer)
        runs only once the record reached the disk (docs/design.md, evaluation rule 9). `name`
        is the query name of a DNS verdict from `judge_query`, which stands for every name its
        decision answers (it is the request's, like the client). `went_out`: whether anything
        left the host for it (`audit.AuditWriter._write`: a denial something went out for is
        never shed). `account`: whose shares of the trail it spends, when not the client's
        (`AuditWriter._write`)."""
        self.audit.write(verdict.record, client, name, went_out, account)
        self._count(verdict)
        if release is not None:
            self.audit.after_flush(release, *args)

    def committed(self, verdict: Verdict, client: str | None, went_out: bool | None = None
                  ) -> int | None:
        """`commit`, written at once: the record is on disk when this returns, for a listener
        that answers next in its own code. (One write(2) of its own rather than a wait for the
        loop turn's batch, which would cost a connect two more loop turns.) Returns the
        record's number in the trail, the decision id an HTTP answer names (None when a
        writer failing open could not write it). Raises AuditUnavailableError when it is not
        on disk: the listener must not answer."""
        number = self.audit.write_now(verdict.record, client, went_out)
        self._count(verdict)
        return number

    def _count(self, verdict: Verdict) -> None:
        """Count a committed verdict: a decision, or a failure after one (not a pending one)."""
        if verdict.pending:
            return
        count = verdict._count
        if count is None:
            record = verdict.record
            count = self._count_failure(record.listener or "", verdict.failure) \
                if verdict.failure else self._count_decision(
                    record.listener or "", record.action, record.effect,
                    record.matchedRule or "")
            if record.enforced is False and not verdict.failure:
                count = _both(count, self.metrics.unenforced.counter(record.listener or "",
                                                                     record.matchedRule or ""))
            object.__setattr__(verdict, "_count", count)
        count()

    def refusal(self, listener: str, reason: str, *, action: str = NETWORK_REQUEST,
                target: str | None = None, qtype: str | None = None, user: str | None = None
                ) -> Verdict:
        """A request refused before any rule could judge it (a client outside `clients`, a
        failed login, a cap, a malformed request): no rule is named. `user`: the proxy login
        the client made, once it passed."""
        return Verdict(Decision(Effect.DENY, None, reason), AuditRecord(
            action=action, listener=listener, principal=self.principal, user=user, target=target,
            domain=target if qtype else None, qtype=qtype, effect=Effect.DENY.value,
            reason=reason))

    # -- DNS ------------------------------------------------------------------------------------

    def resolvable(self, name: str) -> Decision:
        """May guardd resolve `name` (evaluation rule 3)? Not charged to a rate limit: this is
        guardd resolving for itself (a CONNECT's target, a claimed name)."""
        return self.policy.resolvable(name)

    def judge_query(self, name: str, qtype: str, client: str) -> Verdict:
        """The verdict on a client's query for `name`, its rate limit charged. It stands for
        every query of `qtype` its decision answers: commit it with the `name`. One verdict per
        decision and type is kept, so a flood of names never asked before (a DNS tunnel's)
        builds no verdict and encodes no record per name."""
        judged = self.resolvable(name)
        suspected = self.tunnel_suspected(judged, name, qtype, client)
        if suspected is not None:
            return self._query_verdict(suspected, None, qtype, reusable=False)
        rule = judged.acting_rule
        if rule is not None and rule.rate_limit is not None and DNS_QUERY in rule.actions:
            decision = self.rate_limit(judged, client, action=DNS_QUERY)
            return self._query_verdict(decision, None, qtype, reusable=False,
                                       limited=decision is not judged)
        key = (id(judged), qtype)
        verdict = self._query_verdicts.get(key)
        if verdict is None or verdict.decision is not judged:
            verdict = self._query_verdict(judged, None, qtype)
            if not _protected(judged):  # a protection's decision is built per query
                if len(self._query_verdicts) >= _MAX_QUERY_VERDICTS:
                    self._query_verdicts.clear()
                self._query_verdicts[key] = verdict
        return verdict

    def tunnel_suspected(self, judged: Decision, name: str, qtype: str, client: str
                         ) -> Decision | None:
        """The denial of a lookup the policy allows (`judged`) when `client` looks like it runs
        a DNS tunnel under `name`'s registrable domain (`dns/tunnel.py`), counted; None when
        it does not. Every name guardd would send upstream for the client is counted: its own
        queries, and the names it asks guardd to connect to."""
        if not judged.allowed:
            return None
        return self._suspected(judged, self.tunnels.observe(client, name, qtype, self._clock()))

    def suspected_now(self, client: str, name: str) -> bool:
        """Whether `client` is suspected of a DNS tunnel under `name`'s domain now, this
        lookup not counted (`TunnelDetector.suspected`)."""
        return self.tunnels.suspected(client, name, self._clock)

    def forward_suspected(self, decision: Decision, name: str, qtype: str, client: str
                          ) -> Verdict | None:
        """The denial of an allowed lookup of `name` about to go upstream for `client` (no
        cached answer) past its `maxLookups` budget (`dns/tunnel.py`), counted; None when it
        may go. A lookup answered from the cache never gets here: it leaves nothing."""
        suspected = self._suspected(decision, self.tunnels.forwarded(client, name,
                                                                     self._clock()))
        return None if suspected is None else self._query_verdict(suspected, None, qtype,
                                                                  reusable=False)

    def _suspected(self, allowed: Decision, why: str) -> Decision | None:
        """The denial, counted, of what `allowed` allowed, when the tunnel detector says
        why ("": none)."""
        if not why:
            return None
        self.metrics.dns_tunnel_suspected.labels(allowed.matched_rule).inc()
        return allowed.overruled(f"DNS tunnel suspected: {why}")

    def no_room(self, client: str) -> str:
        """Why nothing may go out for `client` now, its record not sure to be written ("":
        it may): the trail is down (`AuditSink.down`), or the client took its share of the
        room left (`AuditSink.room_for`). Asked before a query goes upstream, a connect's
        lookup or its handshake."""
        audit = self.audit
        return AUDIT_DOWN if audit.down else "" if audit.room_for(client) else AUDIT_SHARE_TAKEN

    def for_name(self, verdict: Verdict, name: str) -> Verdict:
        """`judge_query`'s verdict with the name in its own record, for a query answered again
        and again (the packet memo): its record is then encoded whole, once."""
        return dataclasses.replace(verdict, record=dataclasses.replace(
            verdict.record, target=name, domain=name))

    def lookup_verdict(self, name: str, qtype: str) -> Verdict:
        """The verdict under which guardd resolves `name` for itself (a CONNECT's target, a
        claimed name): vetted like a client's query, never charged, never recorded as one."""
        return self._query_verdict(self.resolvable(name), name, qtype)

    def query_now(self, verdict: Verdict, name: str) -> Verdict:
        """The verdict on a query for `name` that `verdict` allowed, under the policy in force
        now: `verdict` itself when none was reloaded since, else the question judged again
        (charged nothing more). Asked before each attempt upstream and when none answered
        (attack pass 24: a retry after a reload that denied the name sent it out, and its
        failure was recorded allowed, by a rule gone)."""
        if verdict.policy is self.policy:
            return verdict
        return self._query_verdict(self.resolvable(name), name, verdict.record.qtype or "A")

    def query_failed(self, verdict: Verdict, name: str, failure: str, detail: str) -> Verdict:
        """An allowed query for `name` that got no usable answer (`failure`: the counter's
        reason, `detail`: the record's outcome); or, with no `failure`, one that `verdict` now
        denies (`query_now`), counted as the denial it is."""
        return dataclasses.replace(verdict, record=dataclasses.replace(
            verdict.record, target=name, domain=name, outcome=detail), failure=failure)

    def vet_answer(self, verdict: Verdict, query: wire.Query, records: Sequence[wire.Record]
                   ) -> Vetting:
        """Judge an upstream answer to `query` (allowed by `verdict`): see `vet_records`. A
        policy reloaded during the forward judges the question again first."""
        decision = verdict.decision
        qtype = wire.qtype_name(query.qtype)
        if verdict.policy is not self.policy:
            decision = self.resolvable(query.name)
            if not decision.allowed:
                return Vetting(withheld=decision, ede=wire.EDE_BLOCKED,
                               verdict=self._query_verdict(decision, query.name, qtype))
        vetting = vet_records(self.policy, decision, query, records)
        if vetting.withheld is not None:
            vetting.verdict = self._query_verdict(vetting.withheld, query.name, qtype)
            return vetting
        if vetting.drop:
            decision = decision.because(f"{decision.reason} ({vetting.summary()})")
        vetting.verdict = self._query_verdict(decision, query.name, qtype,
                                              ",".join(map(str, vetting.addresses)) or None)
        return vetting

    def _query_verdict(self, decision: Decision, name: str | None, qtype: str,
                       ip: str | None = None, *, reusable: bool = True, limited: bool = False
                       ) -> Verdict:
        return Verdict(decision, AuditRecord(
            action=DNS_QUERY, listener=DNS_LISTENER, principal=self.principal, target=name,
            domain=name, ip=ip,
            qtype=qtype, effect=decision.effect.value, enforced=_enforced(decision),
            matchedRule=decision.matched_rule, ownCheck=_own_check(decision),
            reason=decision.reason), policy=self.policy,
            reusable=reusable, limited=limited)

    # -- connects -------------------------------------------------------------------------------

    def connect(self, listener: str, host: str, port: int, client: str,
                address: IPAddress | None = None, scheme: str | None = None,
                pinned: IPAddress | None = None, account: str | None = None,
                user: str | None = None, request: tuple[str, str] | None = None) -> Connect:
        """Start judging a connect to `host`:`port` (`address`: the host was sent as one;
        `scheme`: an HTTP proxy's, which makes the records' targets URLs; `pinned`: the one
        address a name may be reached at, see `Connect`; `user`: the client's proxy login;
        `request`: the method and path of the request it is opened for, see `Connect`)."""
        return Connect(self, listener, host, port, client, address, scheme, pinned, account,
                       user, request)

    # -- what a connect is judged by --------------------------------------------------------------

    def judge_connect(self, name: str | None, ip: IPAddress, port: int, client: str,
                      method: str | None = None) -> Decision:
        """Policy and built-in protections for one connect to (`name`, `ip`):`port`.

        A connect by bare IP is judged as every name this client resolved to that address through
        guardd, the most restrictive verdict winning (docs/design.md, evaluation rule 7).
        """
        return self.judge_names(self.known_names(name, ip, client), ip, port, client, method)

    def judge_names(self, names: Sequence[str], ip: IPAddress, port: int, client: str,
                    method: str | None = None) -> Decision:
        """`judge_connect` for a connect that stands for `names` (none: by address alone).
        Kept per policy as `judge_address`'s are: each request of a kept-alive connection is
        judged with its method, and the same one again costs a dict lookup (the own-socket
        and own-host checks are not kept)."""
        if self.is_own(ip, port):
            return _OWN_SOCKET
        key = (tuple(names), ip, port, method)
        decision = self._request_decisions.get(key)
        if decision is None:
            if len(self._request_decisions) >= _MAX_CONNECT_VERDICTS:
                self._request_decisions.clear()
            decision = self._request_decisions[key] = most_restrictive(self.policy.decide(
                Request(NETWORK_REQUEST, name=each, ip=ip, port=port, method=method,
                        client=client, listener=SOCKS_LISTENER)) for each in names or (None,))
        return self._own_host(decision, ip)

    def judge_address(self, name: str | None, ip: IPAddress, port: int, client: str,
                      method: str | None = None) -> tuple[Decision, bool]:
        """A connect to (`name`, `ip`):`port` before its method is known: `judge_connect`, and
        whether the method could change it (provisional; see `Policy.method_matters`). A
        connect by address stands for every name this client resolved to it: the method
        matters when it could change the verdict for any of them. A connect opened for a
        request whose `method` is known already (an HTTP proxy's absolute-form one) is
        judged with it: nothing is provisional.

        Both are pure over the policy, the names and the destination, so they are kept per
        policy (`_MAX_CONNECT_VERDICTS` of them): a client that connects to the same place
        again costs a dict lookup. The own-socket check is not kept: the sockets change.
        """
        if self.is_own(ip, port):
            return _OWN_SOCKET, False
        names = self.known_names(name, ip, client)
        key = (names, ip, port, method)
        judged = self._connect_decisions.get(key)
        if judged is None:
            if len(self._connect_decisions) >= _MAX_CONNECT_VERDICTS:
                self._connect_decisions.clear()
            judged = self._connect_decisions[key] = self.judge_known(names, ip, port, client,
                                                                     method)
        decision, depends = judged
        if name is None and (decision.allowed or depends):
            denial = self.denied_elsewhere(names, ip, port, client)
            if denial is not None:
                return denial, False
        if (decision.allowed or depends) and self._is_own_host(ip):
            if not decision.allowed:  # never opened to wait for first bytes (a scan of the
                # host's ports): what only a method would open stays shut
                return decision.overruled(
                    f"{effective_address(ip)} is an address of guardd's own host, where a "
                    "connect is never opened before its first bytes say its method: a rule "
                    "with a method condition cannot open it (one without, naming that very "
                    "address, can)", AddrClass.LOOPBACK, overridden=True), False
            decision = self._own_host(decision, ip)
            return decision, depends and decision.allowed
        return decision, depends

    def denied_elsewhere(self, names: Sequence[str], ip: IPAddress, port: int, client: str
                         ) -> Decision | None:
        """The denial of a connect by address, besides `names`, by a name `client` resolved to
        `ip` under another principal or an older policy, judged under this one (not kept with
        the verdicts: those names change); None when there is none. Such a name never allows,
        its vetting not this policy's (the last attack of stop 39); but it denies, as it did
        when the names were one table (final review: after a reload that denied a name, a
        connect by its address was allowed by an `ip` rule). Whatever the connect's method:
        one whose verdict a method could change denies too, as a connect by address does not
        follow that name's requests (its review: a POST the name's rule denied went by)."""
        policy = self.policy
        for other in self.resolved.elsewhere(client, ip):
            if other in names:
                continue
            request = Request(NETWORK_REQUEST, name=other, ip=ip, port=port, client=client,
                              listener=SOCKS_LISTENER)
            decision = policy.decide(request)
            why = f"{other}: a name this client resolved to the address under another " \
                  "principal or before a reload"
            if not decision.allowed:
                return decision.because(f"{decision.reason} ({why})", own_check=True)
            if policy.method_matters(request, decision):
                return own_denial(decision.rule, f"a method rule judges {why}, and "
                                  "a connect by address does not follow its requests")
        return None

    def on_own_host(self, ip: IPAddress, port: int) -> bool:
        """Would a connect to `ip`:`port` reach guardd itself (`is_own`) or its host's other
        services? No name a client's first bytes claim opens those (`_own_host`)."""
        return self.is_own(ip, port) or self._is_own_host(ip)

    def _is_own_host(self, ip: IPAddress) -> bool:
        """Is `ip`, or the IPv4 address it embeds, an address of guardd's host, not loopback
        (nor the unspecified address, which reaches it: their own protection applies)?"""
        return any(not (form.is_loopback or form.is_unspecified) and
                   str(form) in self.host_addresses for form in _both_forms(ip))

    def _own_host(self, decision: Decision, ip: IPAddress) -> Decision:
        """An allow to an address of guardd's own host (other than loopback, whose own
        protection applies) stands only when its rule names that very address: every service
        of the host answers there as on loopback (attack pass: an `ip: 10.0.0.0/8` rule let the
        sandboxed agent reach sshd at the sandbox link's address). Not kept with the verdicts:
        the host's addresses change."""
        if not decision.allowed or not self._is_own_host(ip):
            return decision
        rule = decision.acting_rule
        if rule is not None and names_address(rule, ip):
            return decision
        return own_denial(decision.rule, f"{effective_address(ip)} is an address of "
                          "guardd's own host, whose services answer there as on loopback: a rule "
                          "must name that very address", AddrClass.LOOPBACK, overridden=True)

    def judge_known(self, names: Sequence[str], ip: IPAddress, port: int, client: str,
                    method: str | None = None) -> tuple[Decision, bool]:
        """`judge_address` for a connect that stands for `names` (none: by address alone),
        uncached, without the own-socket check."""
        requests = _connect_requests(names, ip, port, client, method)
        policy = self.policy
        decisions = [policy.decide(request) for request in requests]
        decision = most_restrictive(decisions)
        if method is not None:  # (decided by it: nothing is opened before a method is read)
            return decision, False
        if len(requests) == 1:  # `decision` is that name's own verdict
            depends = policy.method_matters(requests[0], decision)
        else:
            depends = any(policy.method_matters(request, each)
                          for request, each in zip(requests, decisions))
        if depends and not decision.allowed and classify(ip) in REACHES_LOOPBACK and not any(
                allow.acting_rule is not None and allow.acting_rule.ports
                for request, each in zip(requests, decisions)
                for allow in policy.method_allows(request, each)):
            # Loopback, named by a `method` rule: opened to wait for its first bytes only at a
            # port that rule names, not at every port of the host (review: a scan of them).
            return decision.overruled(
                f"{effective_address(ip)} is a loopback address, where a connect is opened "
                "before its first bytes say its method only at a port the `method` rule names: "
                "this one names none", AddrClass.LOOPBACK, overridden=True), False
        return decision, depends

    def method_allows(self, names: Sequence[str], ip: IPAddress, port: int, client: str
                      ) -> list[Decision]:
        """The allows of the `method` rules that could open a connect denied while its method
        is unknown (`Policy.method_allows`, for each name it stands for)."""
        policy = self.policy
        return [allow for request in _connect_requests(names, ip, port, client)
                for allow in policy.method_allows(request, policy.decide(request))]

    def known_names(self, name: str | None, ip: IPAddress, client: str) -> tuple[str, ...]:
        """The names a connect stands for: the CONNECT name, or those this client resolved to
        the address."""
        return (name,) if name is not None else self.resolved.lookup(client, ip)

    def judge_first_bytes(self, first: Sniffed | None, connect: Decision, known: Sequence[str],
                          ip: IPAddress, port: int, client: str, provisional: bool,
                          cut_short: str = "", claim: Claim | None = None,
                          claim_addresses: ClaimAddresses = None,
                          charged: Collection[str] = (), account: str | None = None,
                          charge: bool = True) -> Decision | None:
        """The decision once the client's first bytes are known; None when they add nothing to
        `connect` (no claim beyond the CONNECT target, nothing left to judge).

        `known` are the names the connect was judged as (`known_names` then: the CONNECT name,
        or those the client had resolved to the address), fixed at that moment: names the client
        resolves later, or that expire, change nothing about this connection.
        `first` is what the sniffer made of them, None when it made nothing (`cut_short` says
        why: a deadline, the upstream gone, nothing sent). Whatever a peer could act on but guardd
        cannot read is denied, whichever rule allowed the connect: a name that is unverifiable,
        a ClientHello that hides its real name (ECH) unless a rule allows that, and, where a
        `method` rule could apply (`provisional`), bytes that are not TLS or an HTTP request.
        `claim` is what `claim()` made of the bytes, taken before anything was awaited (the
        client's resolved names change meanwhile, not least by resolving the claimed name); it
        is judged itself (`_judge_claim`: domain fronting, a forward proxy) and its rate limit
        charged: the name actually served is the one counted. `claim_addresses` are what guardd
        resolved a claimed name to, or the denial that left it none. `charged` are the rules the
        connect already charged: a connection is charged to a rule once, whichever way it was
        judged; `account` is whose limits are charged (default: the client's), if at all
        (`charge`). A request that may be served as any method (`ANY_METHOD`) is judged as
        each method a rule names and as one none names.
        """
        if first is None:
            return connect.overruled(f"no verdict on the client's first bytes: {cut_short}")
        claimed = first.name
        if claimed == UNVERIFIABLE:
            return connect.overruled(f"{first.problem}; guardd cannot tell which server the "
                                     "client asks for")
        if first.ech and not self.policy.allows_ech(claimed, ip, port):
            return connect.overruled("the TLS ClientHello is encrypted (ECH): its outer name "
                                     f"{claimed or '(none)'} hides the real server name, and "
                                     "no rule with `ech: true` allows that here")
        if provisional and first.kind is Kind.OTHER:
            return connect.overruled("a method rule applies to this destination, and the "
                                     "first bytes are neither TLS nor an HTTP request: the "
                                     "method cannot be read")
        judged = []
        methods = methods_served(self.policy, first.method, first.override)
        if claim is not None:
            there = self._resolved_at(claim, ip, client)
            alias = most_restrictive([self._judge_claim(claim, method, ip, client,
                                                        claim_addresses, there)
                                      for method in methods])
            if not alias.allowed:
                what = "TLS SNI" if first.kind is Kind.TLS else "HTTP Host"
                named = f"{what} {claimed} names the address, not a site" if claimed else \
                    "a TLS ClientHello without a server name names no site"
                why = (f"{named} (a server would serve its default one), so it is judged by "
                       f"the address alone, and is not allowed ({alias.reason})"
                       ) if claim.bare else (
                    f"{alias.reason} ({what} {claimed}, judged at port "
                    f"{' and '.join(map(str, claim.ports))})"
                    ) if claim.name in known else (
                    f"{what} {claimed} is not the CONNECT target and is not allowed "
                    f"({alias.reason}): domain fronting")
                return alias.because(why, own_check=claim.name is not None and not any(
                    self._denies_as_recorded(claim.name, ip, port, client, method)
                    for method in methods))
            judged.append(alias)
        as_known = [self.judge_names(known, ip, port, client, method)
                    for method in methods] if provisional else []  # (the method decides: each
        judged += as_known  #                                        it may be served as)
        counted: dict[str, Decision] = {}  # a rule once, whichever way it judged
        verdicts = []
        for decision in judged:
            key = decision.matched_rule
            if key in charged or not charge:
                verdicts.append(decision)
            else:
                if key not in counted:
                    counted[key] = self.rate_limit(decision, account or client)
                verdicts.append(counted[key] if decision.allowed else decision)
        final = most_restrictive(verdicts) if verdicts else None
        if final is None or final.effect is not Effect.DENY or claim is None:
            return final
        at = next((n for n, decision in enumerate(as_known) if decision is final), None)
        return final if at is None else self._denied_as_known(  # (a denial, if only reported,
            final, known, ip, port, client, methods[at], first)  # as the connect's target)

    def _denied_as_known(self, denial: Decision, known: Sequence[str], ip: IPAddress, port: int,
                         client: str, method: str | None, first: Sniffed) -> Decision:
        """A request its claim allows, denied as the connect's target (`known`) is with its
        `method`: named so in its record (session 58's attack: recorded as the claimed name's,
        which `audit replay` under the same policy read as allowed)."""
        name = next((each for each in known if self.judge_names(
            (each,), ip, port, client, method).effect is Effect.DENY), "")
        what = "TLS SNI" if first.kind is Kind.TLS else "HTTP Host"
        return dataclasses.replace(denial, judged_name=name, reason=(
            f"{denial.reason} ({method or 'a request'} to {name or ip}, the connection's "
            f"destination; its {what} {first.name} is judged too)"))

    @staticmethod
    def claim(first: Sniffed | None, known: Sequence[str], ip: IPAddress, port: int
              ) -> Claim | None:
        """What the SNI or Host claims beyond the CONNECT target (`ip`:`port` and the names the
        connect was judged as, `known`), or None when it claims nothing more. An HTTP claim
        without a port stands for the CONNECT port and port 80 too (a forward proxy takes
        `Host: h` to h:80 whatever port the CONNECT went to); one with another port, for that
        port and the CONNECT port (session 59's attack: `Host: api.test:443` on a connection
        to port 80 was judged at 443 alone, where a rule allowed it, and a server there served
        api.test's site, virtual hosts matching the name, not the Host's port). One of several
        names a connect by address stood for is a claim too: the name served is the one judged
        and charged (attack pass: requests to one of two rate-limited names at an address were
        charged to the other's rule, and got both limits). An address names no site at all (`bare`): a
        server serves its default one, which may be a denied name (attack pass: `Host: <its
        address>` on a connection to an allowed name; review: another address of the name);
        it claims nothing only on a connect by that address alone, judged by `ip` rules
        already. Nor does a TLS hello without a server name: a shared server serves its default
        site to it, or routes it on the Host inside the TLS (attack pass: an allowed name's
        address served a denied name on it). An HTTP request without a Host gets the name
        judged (`follow`)."""
        if first is None or first.name == UNVERIFIABLE:
            return None
        if first.name is None:
            return Claim(None, ip, (port,), bare=True) if first.kind is Kind.TLS and known \
                else None
        ports: tuple[int, ...] = (port,) if first.port in (None, port) else (first.port, port)
        if first.port is None and first.kind is not Kind.TLS and port != _HTTP_PORT:
            ports += (_HTTP_PORT,)
        try:
            host = parse_host(first.name)
        except InvalidHostError as exc:
            return Claim(None, None, ports, str(exc))
        if host.ip is not None:  # (one that may reach several places is never the same:
            same = host.ip == ip or (  # review)
                effective_address(host.ip) == effective_address(ip)
                and not several_places(host.ip) and not several_places(ip))
            return None if same and not known and ports == (port,) else \
                Claim(None, host.ip, ports, bare=True)
        same = tuple(known) == (host.name,)
        return None if same and ports == (port,) else Claim(host.name, host.ip, ports)

    def _judge_claim(self, claim: Claim, method: str | None, ip: IPAddress, client: str,
                     addresses: ClaimAddresses,
                     there: Mapping[IPAddress, tuple[str, ...]]) -> Decision:
        """The verdict on a claim. A server may act on it: a CDN routes on the name, an HTTP
        forward proxy goes to the address and port a request names, or to what it resolves the
        name to. So a claimed address (in any encoding `addr.parse_host` reads) is judged as a
        connect to that address (`_judge_claimed_address`), a claimed name as a connect to that
        name at this address and at each address guardd resolved it to (`addresses`; a name
        that resolved to none usable is denied), at every port the claim stands for, the most
        restrictive verdict winning."""
        if claim.invalid:
            return own_denial(None, f"not a valid host: {claim.invalid}")
        if claim.ip is not None:  # (bare: at this server, and where a forward proxy goes)
            return most_restrictive(self._judge_claimed_address(target, each, client, method,
                                                                there[target])
                                    for target in there for each in claim.ports)
        targets: list[IPAddress] = [ip]
        verdicts = []
        if isinstance(addresses, Decision):  # (the denial that left it none, and its rule;
            verdicts.append(Decision(                 # denied, whatever it was: review)
                Effect.DENY, addresses.rule, f"{claim.name}: {addresses.reason}, so where a "
                "server would take it cannot be judged", addresses.builtin, addresses.overridden,
                own_check=addresses.own_check or addresses.allowed))
        elif addresses is not None:
            targets += addresses
        verdicts += [self.judge_connect(claim.name, target, each, client, method)
                     for target in targets for each in claim.ports]
        return most_restrictive(verdicts)

    def _denies_as_recorded(self, name: str, ip: IPAddress, port: int, client: str,
                            method: str | None) -> bool:
        """Does the policy alone deny `name` at `ip`:`port` as `method`: the fields a claim's
        record holds, which `audit replay` judges it by? A claimed name denied only elsewhere
        (at an address it resolves to, at port 80 for a Host without a port) is denied by
        guardd's own check (review of session 53: replayed under the policy that judged, such
        a denial said "deny -> allow")."""
        return not self.policy.decide(Request(NETWORK_REQUEST, name=name, ip=ip, port=port,
                                              method=method, client=client)).allowed

    def _resolved_at(self, claim: Claim, ip: IPAddress, client: str
                     ) -> dict[IPAddress, tuple[str, ...]]:
        """For a claimed address, and the connection's (`ip`), where it is judged: the names
        this client resolved to each, in this scope or another, read once for every method
        and port it is judged at (`_judge_claimed_address`); for a claimed name, nothing."""
        if claim.ip is None:
            return {}
        resolved = self.resolved
        return {target: tuple(dict.fromkeys((*resolved.lookup(client, target),
                                             *resolved.elsewhere(client, target))))
                for target in dict.fromkeys((claim.ip, ip))}

    def _judge_claimed_address(self, ip: IPAddress, port: int, client: str,
                               method: str | None, names: tuple[str, ...]) -> Decision:
        """A claimed address names no site: it is judged by `ip` rules, and as the names this
        client resolved to it (in this scope or another) where they are the more restrictive
        (a denial, one in report mode, a tighter rate limit, which is then charged): a forward
        proxy goes there as a connect by address does, which those names judge (stop 39's
        note: `POST http://<db's address>/` behind an allowed CONNECT went through on an `ip`
        rule, where a connect to that address was refused by db's `method` rule). The names
        never allow what the `ip` rules deny. One cached judgement of them all (attack pass:
        one a name, 72 names after reloads cost 9.5 ms a request). `names` are
        `_resolved_at`'s."""
        decision = self.judge_names((), ip, port, client, method)
        if not names or not decision.allowed:
            return decision
        by_names = self.judge_names(names, ip, port, client, method)
        if most_restrictive((decision, by_names)) is decision:
            return decision
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        return by_names.because(f"{by_names.reason} (names this client resolved to the "
                                f"address: {shown})", own_check=not by_names.allowed)

    def rate_limit(self, decision: Decision, client: str, *,
                   action: str = NETWORK_REQUEST) -> Decision:
        """Count an allowed request against its rule's `rateLimit`; deny when it is exhausted.
        A rule's DNS queries and its connects are counted apart (`action`), each against the
        whole limit: a lookup's A and AAAA queries do not spend the connects it leads to."""
        return self.charge(decision, client, action)[0]

    def charge(self, decision: Decision, client: str, action: str = NETWORK_REQUEST
               ) -> tuple[Decision, float | None]:
        """`rate_limit`, and when the request was counted, the time it was counted at (what
        `refund` takes back); None when nothing was counted."""
        rule = decision.acting_rule
        if not decision.allowed or rule is None or rule.rate_limit is None:
            return decision, None
        limit = rule.rate_limit
        key = _limit_key(rule.counted_under, action)
        limiter = self.query_limiter if action == DNS_QUERY else self.limiter
        at = limiter.allow(key, client, limit.max_requests, limit.window)
        if at is not None:
            return decision, at
        return self._limited(rule, limiter, key, client), None

    def refund(self, decision: Decision, client: str, at: float | None) -> None:
        """Take back the connect `charge` counted for `decision` at `at` (no-op for None)."""
        rule = decision.acting_rule
        if at is not None and rule is not None and rule.rate_limit is not None:
            self.limiter.refund(_limit_key(rule.counted_under, NETWORK_REQUEST), client,
                                rule.rate_limit.window, at)

    def _limited(self, rule: Rule, limiter: RateLimiter, key: str, client: str) -> Decision:
        limit = rule.rate_limit
        assert limit is not None
        self.metrics.ratelimited.labels(rule.id).inc()
        wait = limiter.retry_after(key, client, limit.window)
        if limiter.counting(key, client, limit.window):
            return own_denial(rule, f"rate limit of rule {rule.id} exceeded "
                              f"({limit}); retry in {wait:.1f}s")
        return own_denial(rule, f"rate limit of rule {rule.id} ({limit}) not "
                          f"counted: guardd counts the requests of as many clients under rate "
                          f"limits as it may ({limiter.max_keys}, none idle; many sources at "
                          f"once may be forged ones), and forgets none still counted; retry in "
                          f"{wait:.1f}s")

    def comes_back(self, peer: tuple[str, int], arrived_at: Collection[tuple[str, int]]
                   ) -> bool:
        """Is a connection from `peer` one of guardd's own outbound connections come back (a
        loop through a forward or a NAT on its host)? Its source is the local end of one, and
        it arrived where that one went: at the address it was accepted on, or under DNAT at its
        original destination (`arrived_at`). A source alone says nothing: the kernel gives one
        local port to connections that go to different places, so a client on guardd's own
        host may share its address and port with an outbound connection."""
        remote = self.outbound.get(peer)
        return remote is not None and remote in arrived_at

    def is_own(self, ip: IPAddress, port: int) -> bool:
        """Would a connect to `ip`:`port` reach guardd itself, or one of its upstream resolvers
        (where the agent could resolve names that guardd denies)? A wildcard listener answers on
        every address of the host and on all of 127.0.0.0/8. So may a resolver on the host:
        one bound to 0.0.0.0 or `::` (dnsmasq, unbound) answers on all of them, and
        systemd-resolved's 127.0.0.53 on 127.0.0.54; which it is bound to, guardd cannot tell,
        so an upstream on the host is taken to answer DNS (`_HOST_RESOLVER_PORTS`) on every
        address of it (attack pass, 2026-12-06: a rule for loopback reached it at 127.0.0.2
        and [::1])."""
        forms = _both_forms(ip)
        texts = [str(form) for form in forms]
        on_host: bool | None = None  # (asked once, and only when it matters)
        for host, upstream_port in self.upstream_hosts:
            its_port = port == upstream_port
            upstream_forms, upstream_texts = _upstream_forms(host)
            if (its_port or port in RESOLVER_PORTS) and not upstream_texts.isdisjoint(texts):
                return True
            if its_port or port in _HOST_RESOLVER_PORTS:
                if on_host is None:
                    on_host = self._on_host(forms)
                if on_host and self._on_host(upstream_forms):
                    return True
        for host, own_port in self.own_sockets:
            if own_port == port and (host in texts or (host in _WILDCARDS and (
                    self._on_host(forms) if on_host is None else on_host))):
                return True
        return False

    def _on_host(self, forms: Sequence[IPAddress]) -> bool:
        """Does one of `forms` (an address's, `_both_forms`) reach guardd's host: loopback,
        the unspecified address, or an address of the host?"""
        return any(form.is_loopback or form.is_unspecified or str(form) in self.host_addresses
                   for form in forms)


class Connect:
    """One connect as the guard judges it, step by step as its listener learns more.

    The listener (through `stream.tunnel`) asks, in order: is the host valid (`refused`), may
    its name be resolved (`gate`), which of its addresses may be tried (`judge`), may this one
    be tried now (`may_try`: its rule charged), and then records the connect (`connected`), its
    failure (`failed`), the verdict on the first bytes (`first_bytes`) or, for a connect opened
    provisionally, what ended it before they decided (`abandoned`). Each step returns the
    `Verdict` to commit and answer with, or None when there is nothing to say yet.
    """

    def __init__(self, guard: Guard, listener: str, host: str, port: int, client: str,
                 address: IPAddress | None, scheme: str | None = None,
                 pinned: IPAddress | None = None, account: str | None = None,
                 user: str | None = None, request: tuple[str, str] | None = None) -> None:
        self.guard = guard
        #: The method and path of the request the connect is opened for, when they are known
        #: before it (an HTTP proxy's absolute-form request): judged with that method, it is
        #: refused before any connection when the method is (a `method` rule naming loopback
        #: without a port opens it; nothing is provisional), and a refusal's record names the
        #: request. Its requests are each judged as ever, this first one too.
        self.method: str | None = request[0] if request is not None and request[0] else None
        # (OPTIONS *, the asterisk-form, asks the origin itself: its URL is the origin's)
        self._path = request[1] if request is not None and request[1] != "*" else ""
        #: The proxy login the client made, if any: its records name it.
        self.user = user
        #: Whose rate limits and DNS tunnel budget it counts against (`Principals.account`):
        #: the client address, or the proxy login that chose its principal.
        self.account = account or client
        #: The policy it is judged under (`Guard.generation`).
        self.generation = guard.generation
        #: The last bytes judged on it (its first bytes, or the last request of a followed
        #: connection, as it was judged: any method once its body may name one), what they
        #: claimed beyond the target and what that name resolved to; None before any. (A kept-
        #: alive connection idle since its last request is judged by it too: a reload that
        #: denies it closes the connection, and the client's next one is judged anew.)
        self._under_way: tuple[Sniffed, Claim | None, ClaimAddresses] | None = None
        #: The decision on the request judged last (`_request_verdict`), if any.
        self._request_decision: Decision | None = None
        #: A name connect's one address (the transparent listener's: the agent chose it, and a
        #: name claimed in its first bytes names it): tried only when guardd resolves the name
        #: to it, never another.
        self.pinned = pinned
        self.listener = listener
        self.host = host
        self.port = port
        self.client = client
        #: What the records name: host:port, or for an HTTP proxy the URL asked
        #: (`https://host:port` for a CONNECT, `http://host:port` and each request's path).
        self.target = hostport(host, port) if scheme is None else \
            f"{scheme}://{hostport(host, port)}"
        #: What a plaintext request's URL starts with (a CONNECT's too: what goes through it
        #: in plain HTTP is no https://).
        self._url_base = f"http://{hostport(host, port)}" if scheme is not None else None
        self.name: str | None = None
        self.ip: IPAddress | None = address
        #: The name's DNS-view decision, under which guardd resolves it.
        self.gate_decision: Decision | None = None
        #: The addresses that may be tried, IPv6 first.
        self.candidates: list[Candidate] = []
        #: The names the connect was judged as: the CONNECT name, or those the client had
        #: resolved to the address (none: judged by address alone). Fixed when judged: the
        #: first bytes are judged against them.
        self.known: tuple[str, ...] = ()
        #: The candidate connected to.
        self.chosen: Candidate | None = None
        #: Rule id -> its decision as charged for a connect by `may_look_up` or `may_try` (each
        #: rule once per connect), and the time it was counted at (None: nothing counted, or
        #: given back).
        self._charged: dict[str, tuple[Decision, float | None]] = {}
        #: Name -> the decision its lookup was charged as a DNS query (each name once).
        self._looked_up: dict[str, Decision] = {}
        #: Candidate address -> the `method` rules charged before it was tried (`_reserve`).
        self._reserved: dict[IPAddress, set[str]] = {}
        #: Why the host is refused before anything else (an invalid host), or None.
        self.refused: Verdict | None = None
        if address is None:  # a domain may still be an address, encoded
            try:
                parsed = parse_host(host)
            except InvalidHostError as exc:
                method, target = self._asked()
                self.refused = self._verdict(own_denial(None, f"invalid host: {exc}"),
                                             kept=False, method=method, target=target)
            else:
                self.name, self.ip = parsed.name, parsed.ip

    def gate(self) -> Verdict | None:
        """A denial when the target is a name guardd must not look up (see `may_look_up`)."""
        if self.name is None:
            return None
        gate = self.gate_decision = self.may_look_up(self.name)
        if gate.allowed:
            return None
        method, target = self._asked()  # (a request's URL: its record is its own, not kept)
        return self._verdict(gate, method=method, target=target, kept=target is None)

    def may_look_up(self, name: str) -> Decision:
        """The decision under which guardd may resolve `name` for this connect (its target, or
        a name its first bytes claim), charged to its rule: a lookup sends the name upstream
        whatever comes of it, so a client over its limit sends none (a name that resolves to
        nothing, or to a denied address, would otherwise carry a DNS tunnel's payload for
        free). It is one of the rule's DNS queries when the rule has that action (the count
        the client's own queries spend), each name once and never given back (attack passes:
        a lookup charged as a connect was given back when another rule's address was
        connected to, and one charge a connection let every Host its requests claimed go
        upstream); else it is the rule's connect, once per connect (which then counts for the
        connect's own too, as the client's own queries count nothing there). A denial when it
        may not. The rule is the one that decides the name's DNS view, whatever port the
        connect is for: a DNS query has none, and a rule that counts DNS queries rations every
        lookup of its names (attack pass: charged to a port-80 connect's rule instead, every
        unique name under a rationed zone went upstream)."""
        gate = self.guard.resolvable(name)
        suspected = self.guard.tunnel_suspected(gate, name, "A", self.account)
        if suspected is not None:
            return suspected
        if not gate.allowed:
            return gate
        rule = gate.acting_rule
        if rule is None or DNS_QUERY not in rule.actions:
            return self._charge(gate)
        if name not in self._looked_up:
            self._looked_up[name] = self.guard.charge(gate, self.account, DNS_QUERY)[0]
        return self._looked_up[name]

    def _charge(self, decision: Decision) -> Decision:
        """`decision` charged as a connect to its rule, once per connect."""
        key = decision.matched_rule
        if key not in self._charged:
            self._charged[key] = self.guard.charge(decision, self.account)
        return self._charged[key][0]

    def judge(self, addresses: Sequence[IPAddress], why: str = "",
              denial: Decision | None = None) -> Verdict | None:
        """Judge every address the target may be reached at (`addresses`: what guardd resolved
        the name to, or none, `why`, and the policy's `denial` when one is why: its rule is
        the one named, not the gate's that let the name be looked up); a denial when none may
        be tried."""
        guard = self.guard
        if self.name is None:
            assert self.ip is not None, "a connect to no host"
            addresses = [self.ip]
        elif not addresses:
            return self._unresolved(f"{UNRESOLVED_OUTCOME}{why}", denial)
        elif self.pinned is not None:
            if self.pinned not in addresses:
                return self._verdict(own_denial(
                    self.gate_decision.rule if self.gate_decision else None,
                    f"{self.pinned} is not an address guardd resolves {self.name} to "
                    f"({', '.join(map(str, addresses))}): the name cannot stand for it"),
                    ip=self.pinned, kept=False)
            addresses = [self.pinned]
        verdicts = [(ip, *guard.judge_address(self.name, ip, self.port, self.client, self.method))
                    for ip in (sorted(addresses, key=lambda a: -a.version)
                               if len(addresses) > 1 else addresses)]
        for ip, decision, depends in verdicts:
            if decision.allowed or depends:
                self.candidates.append(Candidate(ip, decision, depends))
        # (before a denial too: its record names what it was judged as, attack pass 52)
        self.known = (self.name,) if self.name is not None else \
            guard.known_names(None, addresses[0], self.client)
        if not self.candidates:
            method, target = self._asked()
            return self._verdict(verdicts[0][1], ip=verdicts[0][0], method=method,
                                 target=target, kept=target is None)
        return None

    def _unresolved(self, why: str, denial: Decision | None) -> Verdict:
        """A connect to a name with no address to try: the policy's `denial` when one is why;
        else, when the policy allows the connect as asked (its name, port and method) and no
        method could change that, a failure of that allowed connect (`UNRESOLVED`: NXDOMAIN,
        no upstream answering), as a refused connection is one (session 60's read-through: it
        was a denial by the allowing rule, and the HTTP proxy's 403 told an agent "forbidden"
        for a DNS outage). Else guardd's own denial under the rule that let the name be looked
        up: a method may matter (its re-attack: a request's override is read only once it is
        connected, and a POST overriding a denied DELETE was recorded as an allowed POST), or
        guardd's own cap kept the name from going upstream (a `denial` of no rule's)."""
        method, target = self._asked()
        policy = self.guard.policy
        if denial is None:
            request = Request(NETWORK_REQUEST, name=self.name, port=self.port)
            asked = policy.decide(dataclasses.replace(request, method=method))
            if asked.allowed and not policy.method_matters(request, policy.decide(request)):
                return self._verdict(asked, outcome=why, failure=UNRESOLVED, kept=False,
                                     method=method, target=target)
        if denial is None or (denial.own_check and denial.rule is None):
            denial = own_denial(self.gate_decision.rule if self.gate_decision else None, why)
        return self._verdict(denial.because(why), kept=False, method=method, target=target)

    def _asked(self) -> tuple[str | None, str | None]:
        """The method and URL of the request the connect was opened for (an HTTP proxy's), if
        known, for a refusal before the connect to name (session 54's attack: refused for its
        name, for no address or as an invalid host, the record named neither, and `audit
        replay` judged it as any method). A record naming a URL is the request's own: never
        kept for the next (the review: a path of the agent's each, kept, they filled the
        cache of verdicts and pushed out every other client's)."""
        return self.method, (self._url_base + self._path if self.method and self._url_base
                             else None)

    @property
    def shown(self) -> str | None:
        """What the record names: the CONNECT name, or the names the client resolved there."""
        return ",".join(self.known) or None

    def may_try(self, candidate: Candidate) -> Verdict | None:
        """Charge `candidate`'s rule before its address is tried, each rule once per connect (an
        attempt reaches the destination whether or not it opens, and parallel connects must not
        all pass), provisional candidates included (`_reserve`); a denial when its limit is
        full, or (asked first, counted last) when the client opened too many connections to
        the address lately (`ports`: guardd's ports to it would run out)."""
        ports = self.guard.ports
        why, counters = ports.ask(candidate.ip, self.port, self.client)
        if why:
            return self._verdict(own_denial(None, why), ip=candidate.ip, kept=False)
        if candidate.provisional and not candidate.decision.allowed:
            refusal = self._reserve(candidate)
        else:
            limited = self._charge(candidate.decision)
            refusal = None if limited.allowed or not candidate.decision.allowed else \
                self._verdict(limited, ip=candidate.ip)
        if refusal is None:
            ports.count(counters)
        return refusal

    def _reserve(self, candidate: Candidate) -> Verdict | None:
        """A candidate only `method` rules could allow: the first of their limits with room
        charged before the attempt (its first bytes are charged to that rule no more), or the
        denial when every one is spent (attack passes: by address, then ten at once, such
        connects reached a destination allowed once a minute); nothing when one of those
        rules has no limit."""
        allows = self.guard.method_allows(self.known, candidate.ip, self.port, self.client)
        if any(allow.acting_rule is None or allow.acting_rule.rate_limit is None
               for allow in allows):
            return None
        limited: Decision | None = None
        for allow in allows:
            charged = self._charge(allow)
            if charged.allowed:
                self._reserved.setdefault(candidate.ip, set()).add(allow.matched_rule)
                return None
            limited = limited or charged
        return None if limited is None else self._verdict(limited, ip=candidate.ip)

    def connected(self, candidate: Candidate) -> Verdict:
        """The connect to `candidate` is open: its verdict (charged by `may_try`), to record
        before the client hears; for a provisional one, a pending record of the connection
        guardd opened (its first bytes decide, and are recorded then). Rules charged for
        addresses that failed before this one give their charge back: only the rule of the
        address connected to counts, and the `method` rule reserved for it (a connect that
        fails everywhere stays charged)."""
        self.chosen = candidate
        own = {candidate.decision.matched_rule, *self._reserved.get(candidate.ip, ())}
        for key, (decision, at) in self._charged.items():
            if key not in own and at is not None:
                self.guard.refund(decision, self.account, at)
                self._charged[key] = (decision, None)  # no longer paid for
        if candidate.provisional:  # guardd opened it; nothing flows before the first bytes
            return self._verdict(candidate.decision, ip=candidate.ip, outcome=PENDING_OUTCOME,
                                 pending=True)
        return self._verdict(candidate.decision, ip=candidate.ip, method=self.method)

    def failed(self, candidate: Candidate, failure: str, detail: str) -> Verdict:
        """An allowed connect to `candidate` that did not open (`failure`: the counter's reason,
        e.g. connection_refused): recorded as what happened, not as a denial."""
        return self._verdict(candidate.decision, ip=candidate.ip,
                             outcome=f"connect failed: {detail}", failure=failure)

    def rejudged(self, followed: bool) -> Verdict | None:
        """After a reload: the denial that closes this open connection when the new policy
        would not open it, judged as it was (the names it stood for, the address it went to,
        and what the bytes judged last claimed and asked, by `Guard.judge_first_bytes`
        itself); None when it would. When its requests are `followed`, what only their methods
        decide is left to the next of them, once the one under way is judged again; a
        connection whose method is never seen is judged without one (TLS), or closed where a
        method now decides (other bytes, or first bytes still to come that were to be judged
        as the old policy opened it: a new connect would wait for them)."""
        chosen = self.chosen
        if chosen is None:
            return None
        if self.guard.is_own(chosen.ip, self.port):
            return None  # (refused at open; never relayed)
        decision, depends = self.guard.judge_known(self.known, chosen.ip, self.port,
                                                   self.client, self._method_now())
        decision = self.guard._own_host(decision, chosen.ip)
        if self.name is None and (decision.allowed or depends):  # (review: it stayed open)
            denial = self.guard.denied_elsewhere(self.known, chosen.ip, self.port, self.client)
            if denial is not None:
                decision, depends = denial, False
        if not decision.allowed and not (depends and followed):
            return self._verdict(decision, ip=chosen.ip, outcome=_RELOAD_CLOSED)
        if depends and not followed and not chosen.provisional and self._under_way is None:
            return self._verdict(decision.overruled(
                "a method rule applies to this destination now, and the connection's first "
                "bytes were to go unread as to their method"),
                ip=chosen.ip, outcome=_RELOAD_CLOSED, kept=False)
        if self._under_way is not None:  # (judged provisionally where a method now decides;
            sniffed, claim, addresses = self._under_way  # a request's, as `request` judges it,
            again = self.guard.judge_first_bytes(  # every method it may be served as: review)
                sniffed, decision, self.known, chosen.ip, self.port, self.client,
                depends or self.method is not None, "", claim, addresses, charge=False)
            if again is not None and not again.allowed:
                return self._verdict(again, ip=chosen.ip, outcome=_RELOAD_CLOSED)
        return None

    def _method_now(self) -> str | None:
        """The method a connect opened for a known one (`method`) is judged with again: that
        of the request judged last on it (None for any other connect: provisional)."""
        if self.method is None:
            return None
        return (self._under_way[0].method or self.method) if self._under_way else self.method

    def claim(self, first: Sniffed | None) -> Claim | None:
        """What the first bytes claim beyond the target (see `Guard.claim`)."""
        assert self.chosen is not None
        return self.guard.claim(first, self.known, self.chosen.ip, self.port)

    def first_bytes(self, first: Sniffed | None, cut_short: str, claim: Claim | None,
                    claim_addresses: ClaimAddresses) -> Verdict | None:
        """The verdict once the client's first bytes are known (see `Guard.judge_first_bytes`);
        None when they add nothing to the connect's own, already recorded."""
        chosen = self.chosen
        assert chosen is not None
        self._seen(first, claim, claim_addresses)
        decision = self.guard.judge_first_bytes(
            first, chosen.decision, self.known, chosen.ip, self.port, self.client,
            chosen.provisional, cut_short, claim, claim_addresses, self._paid, self.account)
        if decision is None:
            return None
        return self._request_verdict(first, decision, claim)

    @property
    def _paid(self) -> list[str]:
        """The rules this connect is charged to (a rule once per connect, whichever way)."""
        return [key for key, (_, at) in self._charged.items() if at is not None]

    def _request_verdict(self, first: Sniffed | None, decision: Decision, claim: Claim | None
                         ) -> Verdict:
        """The verdict on a request the client's bytes make, naming what they claimed (the
        address, for a host that is the address: `Claim.bare`)."""
        chosen = self.chosen
        assert chosen is not None
        named = first.name if first is not None else None
        if claim is not None and claim.bare and claim.ip is not None:
            shown: str | None = str(effective_address(claim.ip))
        else:
            shown = named if named not in (None, UNVERIFIABLE, str(chosen.ip)) else self.shown
        if decision.judged_name is not None:
            shown = decision.judged_name or None
        method = first.method if first is not None else None
        path = (first.target if first is not None else None) or ""
        url = None
        if self._url_base and path[:1] == "/":
            url = self._url_base + path
        elif self._url_base and _ABSOLUTE_URI.match(path):  # (an absolute-form target in a
            url = path  # CONNECT names this origin, or its claim was judged: session 54's
            #             attacks, recorded as the CONNECT's https:// without its path)
        self._request_decision = decision
        return self._verdict(decision, ip=chosen.ip, domain=shown, method=method, target=url,
                             method_override=first.override if first is not None else None)

    def _seen(self, sniffed: Sniffed | None, claim: Claim | None,
              claim_addresses: ClaimAddresses) -> None:
        """Keep what a reload judges the connection by again (`rejudged`)."""
        if sniffed is not None:
            self._under_way = (sniffed, claim, claim_addresses)

    def request(self, sniffed: Sniffed | None, claim: Claim | None,
                claim_addresses: ClaimAddresses, first: bool = False, body_method: str = ""
                ) -> Verdict | None:
        """A request on a followed plaintext connection (`stream.follow`) after its first
        bytes, or an HTTP proxy's request (`first`: the one its connect was opened for):
        judged as first bytes are, with its own method and Host, always recorded, and charged
        to its rules anew (every request counts against a rate limit, not only the
        connection's first; the first one once, with its connect).

        Once the body of that request (judged before) may name another method (`body_method`
        says why; `stream.body_method`), it is judged again as any method, charged nothing
        more: the denial if one is denied, else None (its record stands)."""
        chosen = self.chosen
        assert chosen is not None
        if body_method and sniffed is not None:
            sniffed = dataclasses.replace(sniffed, override=ANY_METHOD)
        self._seen(sniffed, claim, claim_addresses)
        decision = self.guard.judge_first_bytes(
            sniffed, chosen.decision, self.known, chosen.ip, self.port, self.client, True, "",
            claim, claim_addresses, self._paid if first else (), self.account,
            charge=not body_method)
        assert decision is not None, "a provisional judgement always decides"
        if body_method:  # (recorded allowed too: the trail says what it may be served as)
            decision = decision.because(f"{body_method}; judged as any method: "
                                        f"{decision.reason}")
        return self._request_verdict(sniffed, decision, claim)

    def hello_again(self, first: Sniffed, again: Sniffed | None, cut_short: str
                    ) -> Verdict | None:
        """The client's TLS hello sent again after the server's HelloRetryRequest: None when it
        names what the first did (RFC 8446 4.1.2 lets it change nothing else that matters
        here; the first's verdict stands), else a denial. A server serves the name the second
        gives (OpenSSL asks its SNI callback again), so a changed one is a name unjudged."""
        chosen = self.chosen
        assert chosen is not None
        if (again is not None and again.kind is Kind.TLS and again.sni != UNVERIFIABLE
                and (again.sni, again.ech) == (first.sni, first.ech)):
            return None
        after = "the client's bytes after the server's HelloRetryRequest"
        if again is None:
            why = f"{after}: {cut_short}"
        elif again.kind is not Kind.TLS or again.sni == UNVERIFIABLE:
            why = f"{after} are not a ClientHello guardd can read ({again.problem or again.kind})"
        else:
            why = (f"the ClientHello sent again after the server's HelloRetryRequest names "
                   f"{_named(again)} where the first named {_named(first)}: a server serves "
                   "the second's")
        return self._request_verdict(again, chosen.decision.overruled(why), None)

    def resumption(self, hello: Sniffed) -> Resumption:
        """What reads the server's answer to `hello` for the TLS session it makes or resumes
        (`stream.sessions`), bound to whose connection it is, where it goes, and the name the
        hello gives."""
        chosen = self.chosen
        assert chosen is not None
        return Resumption(self.guard.tls_sessions, (self.guard.principal, self.account,
                                                    str(chosen.ip), self.port, hello.sni or ""),
                          hello)

    def resumed(self, hello: Sniffed | None) -> Verdict:
        """The server resumed a TLS 1.2 (or older) session for the `hello` that guardd did not
        see made for its key (`resumption`): a denial. OpenSSL resumes a session whatever
        name the SNI gives (RFC 6066 3 says it must not) and serves the name the session was
        made for, which may be a denied one, or one a rate limit or a reload has refused since
        (attack pass, 2026-12-06: a session renegotiated to a denied host, or granted before a
        limit, served it under an allowed SNI). TLS 1.3 reads the SNI anew."""
        chosen = self.chosen
        assert chosen is not None
        return self._request_verdict(hello, chosen.decision.overruled(
            "the server resumed a TLS 1.2 (or older) session guardd did not see made for this "
            "SNI, client and server: a server serves "
            "the name a session was made for, which the ClientHello's SNI does not prove (a "
            "new connection without the session is judged by its SNI)"),
            None)

    def _allowing(self) -> Decision:
        """What allowed the followed connection last: its last request's decision, when one
        allowed it (the connect's own may be the provisional default deny a method rule
        overrode: last reviews, a 502 blaming default-deny for a request a rule allowed)."""
        chosen = self.chosen
        assert chosen is not None
        last = self._request_decision
        return last if last is not None and last.allowed else chosen.decision

    def cut(self, problem: str) -> Verdict:
        """A followed connection cut because it stopped being HTTP/1.x that guardd can judge."""
        chosen = self.chosen
        assert chosen is not None
        return self._verdict(own_denial(self._allowing().rule, "the connection was "
                                        f"cut: {problem}"), ip=chosen.ip, kept=False)

    def upgraded(self, hello: Sniffed) -> str:
        """Why a TLS hello after other bytes (an in-band upgrade: STARTTLS, a Postgres
        SSLRequest) may not go, "" when it may: judged as a first hello is (a name it cannot
        read, ECH, a claim beyond the target: domain fronting), by what the connect knows
        already; a name the connect was not opened for, which a first hello's would be looked
        up for, is refused outright (connect to that name itself). Nothing is charged: the
        connection was."""
        chosen = self.chosen
        assert chosen is not None
        claim = self.claim(hello)
        if claim is not None and claim.name is not None:
            return (f"a TLS hello after other bytes (an in-band upgrade, as STARTTLS) names "
                    f"{hello.name}, which this connection was not opened for: connect to it "
                    "by that name")
        decision = self.guard.judge_first_bytes(
            hello, chosen.decision, self.known, chosen.ip, self.port, self.client, False,
            claim=claim, charged=self._paid, account=self.account, charge=False)
        if decision is None or decision.allowed:
            return ""
        return f"a TLS hello after other bytes (an in-band upgrade): {decision.reason}"

    def server_closed(self, detail: str) -> Verdict:
        """A followed connection whose server closed it with a request unanswered: recorded as
        what happened to an allowed connection (`_allowing`), not as a denial (final review:
        a kept-alive connection's idle end, a common race, counted among the denials)."""
        return self._ended(f"{CLOSED_BY_SERVER}{detail}", "server_closed")

    def unanswered(self, waited: str) -> Verdict:
        """A followed connection whose server sent nothing of a request's answer for `waited`
        (the idle timeout, say): recorded as what happened to an allowed connection, not as a
        denial (session 60's read-through: the client had an empty reply, and the trail
        nothing after the request's allow)."""
        return self._ended(f"{UNANSWERED}the server sent nothing for {waited}",
                           "response_timeout")

    def dropped_after_last(self, count: int, why: str, first_line: str) -> Verdict:
        """A followed connection whose last request went (`why` it was the last) and whose
        client sent `count` bytes more, read and dropped as it lingered (RFC 9112 9.6): none
        went, and the trail shows they came (review: a request pipelined behind the close
        left no record) and what the first of them asked (`first_line`, quoted), as what
        happened to an allowed connection, not as a denial (no rule refused them)."""
        return self._ended(f"{DROPPED_AFTER_LAST}{count} bytes the client sent after its "
                           f"connection's last request ({why}) were read and dropped (RFC "
                           f"9112 9.6), the first line {first_line}", "dropped_after_last")

    def _ended(self, outcome: str, failure: str) -> Verdict:
        """How an allowed followed connection ended, under the rule that allowed its last
        request (`_allowing`)."""
        chosen = self.chosen
        assert chosen is not None
        return self._verdict(self._allowing(), ip=chosen.ip, outcome=outcome, failure=failure,
                             kept=False)

    def abandoned(self, why: str) -> Verdict:
        """A connect opened provisionally (nothing flowed) that ended before its first bytes
        decided: the connection guardd opened is recorded, with what ended it."""
        chosen = self.chosen
        assert chosen is not None and chosen.provisional
        decision = chosen.decision.overruled("opened provisionally; no verdict on the client's "
                                             "first bytes")
        return self._verdict(decision, ip=chosen.ip, outcome=f"abandoned: {why}",
                             failure="abandoned", kept=False)

    def cut_looking_up(self, name: str) -> Verdict:
        """A connect, or a request on it, cut while guardd looked `name` up for it (the name
        went out, so it is recorded, with what cut it)."""
        chosen = self.chosen
        return self._verdict(own_denial(None, f"cut while guardd looked {name} up "
                                        "for it"), ip=chosen.ip if chosen else None, domain=name,
                             outcome="abandoned: cancelled", failure="abandoned", kept=False)

    def _verdict(self, decision: Decision, *, ip: IPAddress | None = None,
                 domain: str | None = None, method: str | None = None,
                 outcome: str | None = None, failure: str = "", pending: bool = False,
                 target: str | None = None, method_override: str | None = None,
                 kept: bool = True) -> Verdict:
        """The verdict and its record; one made before for the same of all this is used again
        (with its record's encoding: `Guard._connect_verdicts`), unless not `kept` (a decision
        made for one connection alone: attack pass, kept cuts held their reasons, up to
        1.3 GB)."""
        ip = ip if ip is not None else self.ip
        domain = domain or self.shown or self.name
        target = target or self.target
        verdicts = self.guard._connect_verdicts
        key = (id(decision), self.listener, target, domain, ip, self.port, method,
               method_override, outcome, failure, pending, self.user)
        found = verdicts.get(key) if kept else None
        if found is not None and found.decision is decision:
            return found
        verdict = Verdict(decision, AuditRecord(
            action=NETWORK_REQUEST, listener=self.listener, principal=self.guard.principal,
            user=self.user, target=target, domain=domain,
            ip=str(ip) if ip is not None else None, port=self.port, method=method,
            methodOverride=method_override, effect=decision.effect.value,
            enforced=_enforced(decision),
            matchedRule=decision.matched_rule, ownCheck=_own_check(decision),
            reason=decision.reason, outcome=outcome), failure,
            pending=pending)
        if not kept:
            return verdict
        if len(verdicts) >= _MAX_CONNECT_VERDICTS:
            verdicts.clear()
        verdicts[key] = verdict
        return verdict


def _named(hello: Sniffed) -> str:
    """A TLS hello's server name as a denial says it."""
    name = hello.sni or "no server"
    return f"{name} (with ECH)" if hello.ech else name


def _enforced(decision: Decision) -> bool | None:
    """A record's `enforced`: False for a denial in report mode, else not written."""
    return None if decision.enforced else False


def _own_check(decision: Decision) -> bool | None:
    """A record's `ownCheck`: True for a denial by guardd's own check, else not written."""
    return True if decision.own_check and not decision.allowed else None


def _both(first: Callable[[], None], second: Callable[[], None]) -> Callable[[], None]:
    def count() -> None:
        first()
        second()
    return count


@functools.lru_cache(maxsize=64)
def _upstream_forms(text: str) -> tuple[tuple[IPAddress, ...], frozenset[str]]:
    """An upstream's address (`_both_forms`, and their texts), from its text: one written
    in a mapped form is its IPv4 address too (review, 2026-12-06). A few, read at every
    connect."""
    forms = _both_forms(ipaddress.ip_address(text))
    return forms, frozenset(str(form) for form in forms)


def _both_forms(ip: IPAddress) -> tuple[IPAddress, ...]:
    """`ip`, the IPv4 address it embeds when it embeds one (`effective_address`), and the
    loopback address an unspecified one reaches: packets go to the first, the rules read the
    second, and Linux connects 0.0.0.0 to 127.0.0.1 and :: to ::1; any may be guardd's own
    (review: a 6to4 address of a `local` route, `2002:c633:6408::5`, was taken for
    198.51.100.8 alone, and a rule for that opened the host; attack pass 28: a rule for
    0.0.0.0 reached guardd's listeners and its resolver on 127.0.0.1)."""
    target = effective_address(ip)
    forms = (target,) if target == ip else (ip, target)
    return forms + tuple(_UNSPECIFIED_REACHES[form.version] for form in forms
                         if form.is_unspecified)


def _connect_requests(names: Sequence[str], ip: IPAddress, port: int, client: str,
                      method: str | None = None) -> list[Request]:
    """A connect to `ip`:`port` (for a request of `method`, when it is known) as the requests
    the policy judges: one for each name it stands for, or one by address alone."""
    return [Request(NETWORK_REQUEST, name=each, ip=ip, port=port, method=method, client=client,
                    listener=SOCKS_LISTENER) for each in names or (None,)]


def _limit_key(rule_id: str, action: str) -> str:
    """The rate limiter's key of a rule's requests of one kind (connects keep the rule's id;
    a NUL, which no id holds, keeps the others apart)."""
    return rule_id if action == NETWORK_REQUEST else f"{rule_id}\0{action}"


def _protected(decision: Decision) -> bool:
    """A decision about a protected destination, made anew for each request it judges."""
    return decision.builtin is not None


# --- vetting an upstream answer ------------------------------------------------------------------


@dataclass(slots=True)
class Vetting:
    """What `vet_records` made of an upstream answer."""

    #: Why the whole answer is withheld (NXDOMAIN, EDE 17), or None.
    withheld: Decision | None = None
    #: Indices (into `Response.records`) of the records to strip, each with why.
    drop: dict[int, str] = field(default_factory=dict)
    #: `dns_filtered_records` label of each stripped record.
    labels: list[str] = field(default_factory=list)
    #: The chain's A/AAAA addresses: what connect-by-IP may be judged by.
    addresses: list[IPAddress] = field(default_factory=list)
    #: Why the first answer record stripped for its content (an address, a target) was; it
    #: becomes `withheld` when no record of the asked type is left.
    blocked: Decision | None = None
    #: The extended error of a withheld answer: filtered, or blocked (a reload denied the name).
    ede: int = wire.EDE_FILTERED
    #: What to record and answer (set by `Guard.vet_answer`).
    verdict: Verdict | None = None

    def strip(self, index: int, label: str, why: str, blocked: Decision | None = None) -> None:
        self.drop[index] = why
        self.labels.append(label)
        if self.blocked is None:
            self.blocked = blocked

    def summary(self) -> str:
        """For the audit record of an answer that was served without some records."""
        first = next(iter(self.drop.values()))
        more = f" and {len(self.drop) - 1} more" if len(self.drop) > 1 else ""
        return f"removed from the answer: {first}{more}"


def vet_records(policy: Policy, decision: Decision, query: wire.Query,
                records: Sequence[wire.Record]) -> Vetting:
    """Judge every record of an upstream answer to `query` (allowed by `decision`); see the
    module docstring for the rules. Sans-I/O, like the policy it asks."""
    judged: dict[str, Decision] = {}

    def resolvable(name: str) -> Decision:
        """As a query for `name` would be judged (an IP in disguise is no name here either)."""
        verdict = judged.get(name)
        if verdict is None:
            verdict = judged[name] = policy.resolvable(name)
        return verdict

    for record in records:
        if record.rtype in _ALIASES and record.target is not None:
            target = resolvable(record.target)
            if not target.allowed:
                return Vetting(withheld=_alias_denied(record.name, record.target, target))
    chain = _chain(query.name, records, resolvable)
    if isinstance(chain, Decision):
        return Vetting(withheld=chain)
    names, linked = chain
    vetting = Vetting()
    for index, record in enumerate(records):
        in_answer = record.section is wire.Section.ANSWER
        if in_answer and record.name not in names and index not in linked:
            vetting.strip(index, "unlinked", f"{record.name} {wire.qtype_name(record.rtype)} "
                                             "is not linked to the question")
            continue
        low = record.rtype & 0xFF
        if low != record.rtype and _ADDRESS_SIZE_BY_LOW_BYTE.get(low) == record.rdlength:
            vetting.strip(index, "unread", f"{record.name} {wire.qtype_name(record.rtype)} "
                          f"is {wire.qtype_name(low)} to resolvers that read a type's low byte "
                          f"alone (musl), its {record.rdlength} bytes an address")
            continue
        if record.rtype not in wire.READ_TYPES:  # (the name exists: no data, not NXDOMAIN)
            vetting.strip(index, "unread", f"{record.name} {wire.qtype_name(record.rtype)} is "
                          "of a type guardd does not read, which may carry an address or a name")
            continue
        carried = record.hints if record.address is None else (record.address,)
        if carried and not _vet_addresses(policy, vetting, index, record, carried, resolvable,
                                          (decision, query.name) if in_answer else None):
            continue
        if in_answer and record.rtype in _POINTERS and record.target:
            target = resolvable(record.target)
            if not target.allowed:
                why = (f"{record.name} {wire.qtype_name(record.rtype)} points at "
                       f"{record.target}, which is denied ({target.matched_rule}: "
                       f"{target.reason})")
                vetting.strip(index, "denied_target", why, own_denial(
                    target.rule, f"answer filtered: {why}", target.builtin,
                    overridden=True))
    if vetting.blocked is not None and not any(
            record.section is wire.Section.ANSWER and record.rtype == query.qtype
            and index not in vetting.drop for index, record in enumerate(records)):
        vetting.withheld = vetting.blocked
    return vetting


def _vet_addresses(policy: Policy, vetting: Vetting, index: int, record: wire.Record,
                   carried: Sequence[IPAddress], resolvable: Callable[[str], Decision],
                   chain: tuple[Decision, str] | None) -> bool:
    """Vet the addresses `record` carries: as the question's (`chain`: its decision and name) or
    else as its owner's, which must be resolvable itself. False when the record is stripped."""
    if chain is None:
        owner = resolvable(record.name)
        if not owner.allowed:
            vetting.strip(index, "denied_owner", f"{record.name} {wire.qtype_name(record.rtype)} "
                          f"is owned by a denied name ({owner.matched_rule}: {owner.reason})")
            return False
        chain = owner, record.name
    judge, name = chain
    publisher = None if record.name == name else (record.name, resolvable(record.name))
    for ip in carried:
        vetted = policy.vet_address(judge, name, ip, publisher)
        if not vetted.allowed:
            why = f"{ip} is a {_class_text(vetted.builtin)} address ({vetted.reason})"
            vetting.strip(index, vetted.builtin.value if vetted.builtin else "rule", why,
                          own_denial(judge.rule, f"answer filtered: {why}",
                                     vetted.builtin, overridden=True)
                          if record.section is wire.Section.ANSWER else None)
            return False
    if record.address is not None and record.section is wire.Section.ANSWER:
        vetting.addresses.append(record.address)
    return True


def _chain(qname: str, records: Sequence[wire.Record], resolvable: Callable[[str], Decision]
           ) -> tuple[set[str], set[int]] | Decision:
    """The names the answer section's CNAMEs and DNAMEs lead to from `qname` (at most
    `MAX_CHAIN`), and the indices of the DNAME records applied on the way; or why the answer is
    withheld (a name a DNAME makes is denied)."""
    cnames: dict[str, list[str]] = {}
    dnames: dict[str, list[tuple[int, str]]] = {}
    for index, record in enumerate(records):
        if record.section is not wire.Section.ANSWER or record.target is None:
            continue
        if record.rtype == wire.QType.CNAME:
            cnames.setdefault(record.name, []).append(record.target)
        elif record.rtype == wire.QType.DNAME:
            dnames.setdefault(record.name, []).append((index, record.target))
    chain, names, linked = [qname], {qname}, set()
    for name in chain:  # grows as it goes
        successors = list(cnames.get(name, ()))
        if dnames and "\\" not in name:  # an escaped dot is no label boundary
            for at in range(len(name)):
                if name[at] == ".":
                    for index, target in dnames.get(name[at + 1:], ()):
                        linked.add(index)
                        successors.append(f"{name[:at]}.{target}" if target else name[:at])
        for successor in successors:
            if successor in names or len(chain) >= MAX_CHAIN or len(successor) > 253:
                continue
            verdict = resolvable(successor)
            if not verdict.allowed:
                return _alias_denied(name, successor, verdict)
            names.add(successor)
            chain.append(successor)
    return names, linked


def _alias_denied(name: str, target: str, verdict: Decision) -> Decision:
    return own_denial(verdict.rule,
                      f"answer filtered: {name} is an alias of {target}, which is denied "
                      f"({verdict.matched_rule}: {verdict.reason})", verdict.builtin,
                      overridden=True)


def _class_text(klass: AddrClass | None) -> str:
    return klass.value if klass is not None else "denied"
