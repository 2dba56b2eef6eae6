"""Every Prometheus metric guardd exports, defined once (the README lists them).

Label values come from enums and rule ids, never from free text, domains or clients, so the
number of series is bounded by the policy.

The counters every DNS query touches (decisions, answered queries, cache hits and misses) are
`LoopCounters`: plain ints that only the event loop adds to and the scrape thread reads (an int
read is atomic under the GIL). prometheus_client's own `Counter.inc()` takes a lock per call,
which three times per query is a measurable share of a cached answer.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram,
                               PlatformCollector, ProcessCollector, disable_created_metrics)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: Query types that get their own label value; everything else is counted as "other".
QTYPE_LABELS = frozenset({"A", "AAAA", "CNAME", "MX", "NS", "PTR", "SOA", "SRV", "TXT", "HTTPS",
                          "SVCB", "ANY", "AXFR", "IXFR", "CAA", "DS", "DNSKEY"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


# `*_created` series double every counter's output and nobody alerts on them.
disable_created_metrics()


class _Recent(Collector):
    """Another collector's metrics, read again only once they are `every` seconds old:
    prometheus_client's process collector lists /proc/self/fd at every scrape (18 ms at 16,900
    descriptors, one stretch of the loop; attack pass 51 scraped 1,000 times a second)."""

    def __init__(self, collector: Collector, every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._collector = collector
        self._every = every
        self._clock = clock
        self._kept: list[Metric] = []
        self._read = float("-inf")

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        if now - self._read >= self._every:
            self._kept, self._read = list(self._collector.collect()), now
        return iter(self._kept)

    def describe(self) -> Iterator[Metric]:
        return self.collect()


class _CallbackCounters(Collector):
    """Counters that live elsewhere (the audit writer's), read at scrape time."""

    family: type[CounterMetricFamily | GaugeMetricFamily] = CounterMetricFamily

    def __init__(self, counters: dict[str, tuple[str, Callable[[], float]]]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        for name, (documentation, read) in self._counters.items():
            family = self.family(name, documentation)
            family.add_metric([], read())
            yield family


class _CallbackGauges(_CallbackCounters):
    family = GaugeMetricFamily


class AuditCounters(Protocol):
    """What the metrics read from the audit writer (`audit.AuditWriter`)."""

    records_written: int
    records_compacted: int
    write_errors: int
    records_dropped: int
    records_shed: int
    records_refused: int
    answers_withheld: int
    trail_bytes: int

    @property
    def mirror_dropped(self) -> int: ...


class LoopCounters(Collector):
    """One counter family, counted on the event loop without locks (see the module docstring)."""

    family: type[CounterMetricFamily | GaugeMetricFamily] = CounterMetricFamily

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...],
                 registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self._cells: dict[tuple[str, ...], list[int]] = {}
        self._counters: dict[tuple[str, ...], Callable[..., None]] = {}
        #: Held while a series is added and while a scrape copies the table: a copy must not see
        #: the dict change size. Counting itself never changes the table, so it takes no lock.
        self._lock = threading.Lock()
        registry.register(self)

    def counter(self, *labels: str) -> Callable[..., None]:
        """The function that adds to the series of `labels`, one by default (keep it: it is the
        fast path)."""
        inc = self._counters.get(labels)
        if inc is None:
            cell = self._cell(*labels)

            def inc(amount: int = 1) -> None:
                cell[0] += amount

            self._counters[labels] = inc
        return inc

    def _cell(self, *labels: str) -> list[int]:
        cell = self._cells.get(labels)
        if cell is None:
            with self._lock:
                cell = self._cells[labels] = [0]
        return cell

    def value(self, *labels: str) -> int:
        cell = self._cells.get(labels)
        return cell[0] if cell is not None else 0

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        family = self.family(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            series = list(self._cells.items())
        for labels, cell in series:
            family.add_metric(labels, cell[0])
        yield family


class LoopStates(LoopCounters):
    """A gauge of how many things are in each state, kept on the event loop like LoopCounters:
    a proxied connection moves through several phases, two lock-taking Gauge calls each
    otherwise."""

    family = GaugeMetricFamily

    def cells(self, *labels: str, states: Iterable[str]) -> dict[str, list[int]]:
        """The cells of `labels` + each state: `cells[state][0] += 1` enters it."""
        return {state: self._cell(*labels, state) for state in states}


class Metrics:
    """The metric set of one daemon, on its own registry (tests may build several)."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process:
            self.registry.register(_Recent(ProcessCollector(registry=None)))
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        r = self.registry
        self.decisions = LoopCounters("guardd_decisions", "Policy decisions",
                                      ("listener", "action", "effect", "rule"), r)
        self.unenforced = LoopCounters(
            "guardd_unenforced_denials", "Denials in report mode (mode: report): recorded and "
            "counted as denials in guardd_decisions_total, not carried out",
            ("listener", "rule"), r)
        self.dns_queries = LoopCounters("guardd_dns_queries", "DNS queries answered",
                                        ("qtype", "rcode"), r)
        self.dns_upstream_seconds = Histogram("guardd_dns_upstream_seconds",
                                              "Time to get an answer from the upstreams",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.dns_upstream_errors = Counter("guardd_dns_upstream_errors",
                                           "Failed upstream attempts (reason \"busy\": never sent, every "
                                           "upstream socket was in use)", ["reason"], registry=r)
        self.dns_cache_hit = LoopCounters("guardd_dns_cache_hits", "DNS answers served from cache",
                                          (), r).counter()
        self.dns_cache_miss = LoopCounters("guardd_dns_cache_misses",
                                           "DNS queries not answered from cache", (), r).counter()
        self.dns_filtered_records = Counter("guardd_dns_filtered_records",
                                            "Records removed from upstream answers, by why "
                                            "(an address class, rule, unlinked, denied_owner, "
                                            "denied_target, unread)", ["builtin"], registry=r)
        self.dns_tcp_rejected = LoopCounters("guardd_dns_tcp_rejected",
                                             "DNS-over-TCP connections closed at once, by why "
                                             "(not_a_client, limit, client_limit)", ("reason",), r)
        self.dns_queries_dropped = LoopCounters(
            "guardd_dns_queries_dropped", "DNS queries never answered, by why (not_a_client: "
            "over UDP from outside clients, whose source is not proven: recorded, but for a "
            "flood of them past their CPU share, dropped unread, and datagrams that are no "
            "query)",
            ("reason",), r)
        self.dns_tunnel_suspected = Counter(
            "guardd_dns_tunnel_suspected", "Lookups refused because their client looks like it "
            "runs a DNS tunnel under an allowed domain, by the rule that allowed it", ["rule"],
            registry=r)
        self.ratelimited = Counter("guardd_ratelimited", "Requests denied by a rate limit",
                                   ["rule"], registry=r)
        self.policy_rules = Gauge("guardd_policy_rules", "Rules in the loaded policy", registry=r)
        self.policy_reloads = Counter("guardd_policy_reloads", "Policy reloads", ["result"],
                                      registry=r)
        self.policy_loaded = Gauge("guardd_policy_loaded_timestamp_seconds",
                                   "When the current policy was loaded", registry=r)
        self.request_failures = LoopCounters(
            "guardd_request_failures", "Allowed requests that failed after their decision, by "
            "listener and why (a connect error, an upstream DNS failure, a connection opened "
            "provisionally and abandoned before its first bytes decided)",
            ("listener", "reason"), r)
        self.connections = LoopStates("guardd_connections",
                                      "Proxied TCP connections by listener and phase",
                                      ("listener", "state"), r)
        self.connect_seconds = Histogram("guardd_connect_seconds",
                                         "Time to connect to a vetted destination",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.connect_attempts = LoopCounters("guardd_connect_attempts",
                                             "Outbound connect attempts by result", ("result",), r)
        self.connections_rejected = LoopCounters(
            "guardd_connections_rejected", "Proxy connections closed at once: not a client, "
            "too many open, or a loop", ("listener",), r)
        self.auth_failures = LoopCounters("guardd_auth_failures", "Failed proxy logins (SOCKS5 "
                                          "RFC 1929, HTTP Proxy-Authorization)", ("listener",), r)
        self.cpu_share_waits = LoopCounters(
            "guardd_cpu_share_waits", "Waits of a connection or relay whose client had spent its "
            "CPU share (shares.py), and DNS queries held or dropped for it (listener dns), by "
            "listener",
            ("listener",), r)
        relay_bytes = LoopCounters("guardd_relay_bytes", "Bytes relayed", ("direction",), r)
        self.relay_bytes_outbound = relay_bytes.counter("outbound")
        self.relay_bytes_inbound = relay_bytes.counter("inbound")
        self._query_counters: dict[tuple[str, str], Callable[[], None]] = {}

    def watch_audit(self, audit: AuditCounters) -> None:
        """Export the audit writer's own counters."""
        self.registry.register(_CallbackCounters({
            "guardd_audit_records": ("Audit records written", lambda: audit.records_written),
            "guardd_audit_records_compacted": (
                "Repeated denials counted in another record instead of a line of their own",
                lambda: audit.records_compacted),
            "guardd_audit_write_errors": ("Failed audit writes (the size cap included)",
                                          lambda: audit.write_errors),
            "guardd_audit_records_dropped": (
                "Audit records lost: past the queue in a write outage, a decision nothing "
                "went out for during one, or the size cap",
                lambda: audit.records_dropped),
            "guardd_audit_records_shed": (
                "Denials counted in audit.shed records, not written one by one: the trail was "
                "near its size cap with every file younger than audit.minAge",
                lambda: audit.records_shed),
            "guardd_audit_records_refused": (
                "Decisions refused for want of room for their records: the trail was near its "
                "size cap and the client's records had taken their share of the rest",
                lambda: audit.records_refused),
            "guardd_audit_answers_withheld": (
                "Answers never sent because their records could not be written (fail closed)",
                lambda: audit.answers_withheld),
            "guardd_audit_mirror_dropped": (
                "Audit records the stdout copy (audit.stdout) dropped: its reader fell behind",
                lambda: audit.mirror_dropped),
        }))
        self.registry.register(_CallbackGauges({
            "guardd_audit_trail_bytes": ("Bytes the audit trail takes on disk",
                                         lambda: audit.trail_bytes)}))

    def dns_query_counter(self, qtype: str, rcode: str) -> Callable[[], None]:
        """The function that counts one answered query of this type and rcode (the names;
        rarer ones are counted as "other")."""
        labels = (qtype if qtype in QTYPE_LABELS else "other",
                  rcode if rcode in RCODE_LABELS else "other")
        inc = self._query_counters.get(labels)
        if inc is None:
            inc = self._query_counters[labels] = self.dns_queries.counter(*labels)
        return inc


RCODE_LABELS = frozenset({"NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED",
                          "BADVERS"})
