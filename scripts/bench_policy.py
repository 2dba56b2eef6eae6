"""Benchmark body for scripts/bench-policy (see there).

Up to 10,000 rules are written as YAML rules (half exact names, half `*.zone` globs, a few
`smtp.*`-style patterns); the rest of each size goes into `domainList` files, as a real deny list
would. Decisions are timed over a fixed mix, a fifth each, of exact and zone hits among the YAML
rules, exact and zone hits in the lists, and misses; each is a full `Policy.decide(Request(...))`.
The mix is timed in rounds of 5,000 decisions; the fastest and slowest round show how much a busy
machine disturbed the mean.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

from guardd.policy.engine import Policy
from guardd.policy.model import NETWORK_REQUEST, Request

YAML_RULES = 10_000
LIST_FILE_ENTRIES = 250_000
DECISIONS = 200_000


def write_policy(directory: Path, size: int) -> Path:
    yaml_rules = min(size, YAML_RULES)
    lines = ['version: "1.0"', "rules:"]
    for i in range(yaml_rules):
        domain = f"host{i}.bench.test" if i % 2 else f"*.zone{i}.bench.test"
        if i % 1000 == 999:
            domain = f"svc{i}.*"
        effect = "deny" if i % 3 else "allow"
        lines.append(f'  - {{id: r{i}, action: network.request, domain: "{domain}", '
                     f"effect: {effect}}}")
    remaining = size - yaml_rules
    for chunk in range(0, remaining, LIST_FILE_ENTRIES):
        name = f"list{chunk // LIST_FILE_ENTRIES}.txt"
        count = min(LIST_FILE_ENTRIES, remaining - chunk)
        with open(directory / name, "w") as handle:
            for j in range(chunk, chunk + count):
                handle.write(f"list{j}.deny.test\n" if j % 2 else f"*.lzone{j}.deny.test\n")
        lines.append(f"  - {{id: list-{chunk // LIST_FILE_ENTRIES}, action: network.request, "
                     f"domainList: {name}, effect: deny}}")
    lines.append('  - {id: catch-all-deny, action: network.request, domain: "*", effect: deny}')
    path = directory / "policy.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def requests(size: int) -> list[Request]:
    rng = random.Random(size)
    names: list[str] = []
    for _ in range(1000):
        i = rng.randrange(min(size, YAML_RULES))
        j = rng.randrange(max(size - YAML_RULES, 1))
        names += [f"host{i | 1}.bench.test", f"a.b.zone{i & ~1}.bench.test",
                  f"list{j | 1}.deny.test", f"x.lzone{j & ~1}.deny.test",
                  f"miss{i}.example.org"]
    return [Request(NETWORK_REQUEST, name=name, port=443) for name in names]


def bench(size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_policy(Path(tmp), size)
        start = time.perf_counter()
        policy = Policy.from_file(path)
        load = time.perf_counter() - start
    batch = requests(size)
    decide = policy.decide
    rounds: list[float] = []
    for _ in range(DECISIONS // len(batch)):
        start = time.perf_counter()
        for request in batch:
            decide(request)
        rounds.append((time.perf_counter() - start) / len(batch) * 1e6)
    mean = sum(rounds) / len(rounds)
    print(f"{size:>9,} domain rules ({len(policy.rules):>6,} rules, {policy.index.size:>9,} "
          f"entries): load {load:6.2f} s, {1e6 / mean:>10,.0f} decisions/s "
          f"({mean:.2f} µs each; rounds {min(rounds):.2f}-{max(rounds):.2f})", flush=True)


def main(argv: list[str]) -> int:
    sizes = [int(arg) for arg in argv] or [1_000, 100_000, 1_000_000]
    for size in sizes:
        bench(size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
