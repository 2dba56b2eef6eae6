"""Benchmark body for scripts/bench-dns (see there): guardd against dnsmasq, under dnsperf.

Both servers do the same work: the deny list of policies/lists/exfil.txt answered NXDOMAIN
without asking upstream, every other name forwarded to the same local test upstream and cached,
and every decision recorded (guardd: audit trail and metrics on; dnsmasq: `log-queries=extra` to a
file). Three workloads: (a) denied names, 5,000 of them asked over and over (guardd answers
repeats from its packet memo), (b) allowed names already in both caches, (c) unique denied names:
`--unique` names (150,000 by default: a pass of seconds, not a blip) asked once each, a fresh
set for every run, so nothing a server remembers of one name helps with the next (a DNS tunnel
or exfiltration flood looks like this).
Runs alternate between the servers, so a drift of the machine affects both; the best run of each
is reported. (a) and (b) run for `--seconds`, (c) for one pass over its names.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.harness import Guardd, Upstream, free_port  # noqa: E402

EXFIL = ROOT / "policies" / "lists" / "exfil.txt"
ALLOWED_ZONE = "bench.test"
ALLOWED_NAMES = 200
DENIED_NAMES = 5000
UNIQUE_NAMES = 150_000
_QPS = re.compile(r"Queries per second:\s+([\d.]+)")
_LOST = re.compile(r"Queries lost:\s+(\d+)")


def deny_zones() -> list[str]:
    """The zones of the exfil list ("*.zone" and "zone" lines both deny the zone's names)."""
    zones = []
    for line in EXFIL.read_text().splitlines():
        glob = line.partition("#")[0].strip()
        if glob:
            zones.append(glob.removeprefix("*."))
    return sorted(set(zones))


def write_workloads(directory: Path, zones: list[str]) -> dict[str, Path]:
    denied = directory / "denied.txt"
    denied.write_text("".join(f"h{i}.{zones[i % len(zones)]} A\n" for i in range(DENIED_NAMES)))
    allowed = directory / "allowed.txt"
    allowed.write_text("".join(f"h{i}.{ALLOWED_ZONE} A\n" for i in range(ALLOWED_NAMES)))
    return {"denied": denied, "cached-allowed": allowed}


def write_unique(directory: Path, zones: list[str], run: int, count: int) -> Path:
    """`count` denied names no earlier run asked (`u<run>-<i>.<zone>`), each once."""
    path = directory / f"unique-{run}.txt"
    path.write_text("".join(f"u{run}-{i}.{zones[i % len(zones)]} A\n" for i in range(count)))
    return path


def write_policy(directory: Path) -> Path:
    path = directory / "policy.yaml"
    path.write_text(f"""version: "1.0"
rules:
  - {{id: deny-exfil, action: network.request, domainList: {EXFIL}, effect: deny,
     reason: "exfiltration service"}}
  - {{id: bench-allowed, action: network.request, domain: "*.{ALLOWED_ZONE}", effect: allow}}
  - {{id: catch-all-deny, action: network.request, domain: "*", effect: deny}}
""")
    return path


@contextmanager
def dnsmasq(directory: Path, upstream: Upstream, zones: list[str]) -> Iterator[tuple[str, int]]:
    """dnsmasq on loopback: same deny list, same upstream, cache on, every query logged."""
    port = free_port()
    config = directory / "dnsmasq.conf"
    config.write_text("\n".join([
        f"port={port}", "listen-address=127.0.0.1", "bind-interfaces", "no-resolv", "no-hosts",
        "no-poll", f"server=127.0.0.1#{upstream.port}", "cache-size=10000",
        "log-queries=extra", f"log-facility={directory / 'dnsmasq-queries.log'}", "user=root",
        *(f"address=/{zone}/" for zone in zones)]) + "\n")
    process = subprocess.Popen(["dnsmasq", "--keep-in-foreground", f"--conf-file={config}"])
    time.sleep(0.5)
    if process.poll() is not None:
        raise SystemExit(f"dnsmasq did not start (exit {process.returncode})")
    try:
        yield ("127.0.0.1", port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(10)


def dnsperf(server: tuple[str, int], queries: Path, seconds: float | None) -> tuple[float, int]:
    """(queries per second, queries lost) of one dnsperf run: for `seconds`, cycling through the
    names, or (None) one pass over them."""
    length = ["-l", str(seconds)] if seconds is not None else ["-n", "1"]
    result = subprocess.run(
        ["dnsperf", "-s", server[0], "-p", str(server[1]), "-d", str(queries), *length,
         "-c", "1", "-T", "1", "-q", "200", "-t", "2"],
        capture_output=True, text=True, check=True, timeout=600)
    qps, lost = _QPS.search(result.stdout), _LOST.search(result.stdout)
    if qps is None or lost is None:
        raise SystemExit(f"cannot read dnsperf's output:\n{result.stdout}{result.stderr}")
    return float(qps[1]), int(lost[1])


def warm(server: tuple[str, int], queries: Path) -> None:
    """One pass over the names, so the cached workload measures cache hits."""
    subprocess.run(["dnsperf", "-s", server[0], "-p", str(server[1]), "-d", str(queries),
                    "-n", "1", "-q", "20"], capture_output=True, check=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-dns", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and workload")
    parser.add_argument("--unique", type=int, default=UNIQUE_NAMES,
                        help="names of each unique-denied run (0: skip that workload)")
    args = parser.parse_args(argv)
    for tool in ("dnsperf", "dnsmasq"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (scripts/bench-dns installs it as root)")
    zones = deny_zones()
    with tempfile.TemporaryDirectory(prefix="guardd-bench-dns-") as tmp:
        directory = Path(tmp)
        workloads = write_workloads(directory, zones)
        upstream = Upstream(directory, {f"h{i}.{ALLOWED_ZONE}": ["3600 A 192.0.2.1"]
                                        for i in range(ALLOWED_NAMES)})
        guardd = Guardd.launch(directory, "--policy", str(write_policy(directory)),
                               "--dns", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                               "--upstream", upstream.address)
        try:
            with dnsmasq(directory, upstream, zones) as dnsmasq_server:
                servers = {"guardd": guardd.dns[0], "dnsmasq": dnsmasq_server}
                for server in servers.values():
                    warm(server, workloads["cached-allowed"])
                print(f"dnsperf, {args.rounds} alternating runs per server and workload "
                      f"({args.seconds:g}s each; unique-denied: one pass over {args.unique:,} "
                      f"names never asked before); best run shown. guardd: audit and metrics "
                      f"on; dnsmasq: log-queries=extra to a file. Deny list: {len(zones)} zones.",
                      flush=True)
                runs: dict[str, tuple[Callable[[int], Path], float | None]] = {
                    workload: (lambda _, path=path: path, args.seconds)
                    for workload, path in workloads.items()}
                if args.unique > 0:  # both servers get a round's names; no round repeats one
                    runs["unique-denied"] = (
                        lambda run: write_unique(directory, zones, run, args.unique), None)
                for workload, (names, seconds) in runs.items():
                    best = {name: (0.0, 0) for name in servers}
                    for run in range(args.rounds):
                        queries = names(run)
                        for name, server in servers.items():
                            qps, lost = dnsperf(server, queries, seconds)
                            best[name] = max(best[name], (qps, lost))
                    ratio = best["guardd"][0] / best["dnsmasq"][0]
                    print(f"{workload:>15}: guardd {best['guardd'][0]:>9,.0f} qps "
                          f"(lost {best['guardd'][1]}), dnsmasq {best['dnsmasq'][0]:>9,.0f} qps "
                          f"(lost {best['dnsmasq'][1]}), guardd/dnsmasq {ratio:.2f}", flush=True)
            audited = sum(1 for path in guardd.audit_dir.glob("audit.jsonl*")
                          for _ in path.open("rb"))
            print(f"guardd audit records written: {audited:,}")
        finally:
            guardd.stop()
            upstream.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
