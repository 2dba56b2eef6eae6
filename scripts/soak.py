"""Soak body for scripts/soak (see there): mixed hostile load on one guardd for a while, its
figures over time.

The load, all on loopback, each part its own asyncio task in this process:

* DNS: dnsperf over UDP at `--dns-qps`, half unique denied names (a tunnel's pattern), half
  one allowed name (cached);
* SOCKS: ordinary clients (CONNECT to a loopback echo server, one byte there and back), slow
  clients (a greeting trickled a byte a second), clients sending garbage, and `--idle` clients
  that open a tunnel and then say nothing (they hold their connections to the end);

Every `--every` seconds a line: DNS answers/s (dnsperf's own interval figure), connects/s,
refused, failed, and guardd's RSS and descriptors. At the end: dnsperf's totals (sent, completed,
lost, rcodes), the failures by kind (a failure is an ordinary client that got no echo: timed
out, reset, or cut short), and the trail verified.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.e2e.harness import (GUARDD, LOAD_POLICY, Destination, Guardd, Upstream,  # noqa: E402
                               free_port)

#: dnsperf's interval line (-S): "<unix time>: <queries per second>".
_INTERVAL = re.compile(r"^\d+\.\d+: ([\d.]+)$")
#: dnsperf's summary lines worth repeating.
_SUMMARY = re.compile(r"\s*(Queries sent|Queries completed|Queries lost|Response codes):")


class Counts:
    def __init__(self) -> None:
        self.dns_qps = 0.0
        self.connects = self.refused = 0
        self.failed: collections.Counter[str] = collections.Counter()


def write_names(path: Path, unique: int) -> None:
    """dnsperf's input: unique denied names (each asked once per pass) between allowed ones."""
    with path.open("w") as out:
        for number in range(unique):
            out.write(f"s{number:x}-{random.getrandbits(32):x}.ngrok.io A\napi.test A\n")


async def dns_load(address: tuple[str, int], names: Path, args: argparse.Namespace,
                   counts: Counts) -> str:
    """dnsperf for the whole soak; its interval figures go to `counts`, its summary is returned."""
    process = await asyncio.create_subprocess_exec(
        "stdbuf", "-oL", "dnsperf", "-s", address[0], "-p", str(address[1]), "-d", str(names),
        "-l", str(args.seconds), "-Q", str(args.dns_qps), "-S", str(args.every), "-t", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    output = []
    async for raw in process.stdout:
        line = raw.decode(errors="replace").rstrip()
        output.append(line)
        if match := _INTERVAL.match(line):
            counts.dns_qps = float(match[1])
    await process.wait()
    found = [line for line in output if _SUMMARY.match(line)]
    return "\n".join(found) or "dnsperf said:\n" + "\n".join(output[-20:])


async def socks_open(proxy: tuple[str, int], echo: int) -> tuple[asyncio.StreamReader,
                                                                   asyncio.StreamWriter] | None:
    reader, writer = await asyncio.open_connection(*proxy)
    writer.write(b"\x05\x01\x00")
    if await reader.readexactly(2) != b"\x05\x00":
        writer.close()
        return None
    writer.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.to_bytes(2, "big"))
    reply = await reader.readexactly(10)
    if reply[1] != 0:
        writer.close()
        return None
    return reader, writer


async def ordinary(proxy: tuple[str, int], echo: int, counts: Counts, stop: asyncio.Event
                   ) -> None:
    while not stop.is_set():
        try:
            opened = await asyncio.wait_for(socks_open(proxy, echo), 5)
            if opened is None:
                counts.refused += 1
                continue
            reader, writer = opened
            writer.write(b"\0")
            await asyncio.wait_for(reader.readexactly(1), 5)
            writer.close()
            counts.connects += 1
        except TimeoutError:
            counts.failed["timed out (5 s)"] += 1
        except asyncio.IncompleteReadError as exc:
            counts.failed[f"cut after {len(exc.partial)} bytes"] += 1
        except OSError as exc:
            counts.failed[os.strerror(exc.errno) if exc.errno else str(exc)] += 1
        else:
            continue
        await asyncio.sleep(0.05)


async def slow(proxy: tuple[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            _, writer = await asyncio.open_connection(*proxy)
            for byte in b"\x05\x01\x00\x05\x01\x00":
                if writer.is_closing():
                    break
                writer.write(bytes([byte]))
                await asyncio.sleep(1)
            writer.close()
        except OSError:
            await asyncio.sleep(0.5)


async def garbage(proxy: tuple[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(*proxy)
            writer.write(os.urandom(random.randint(1, 600)))
            await asyncio.wait_for(reader.read(100), 2)
            writer.close()
        except (OSError, TimeoutError):
            pass
        await asyncio.sleep(0.05)


async def idle(proxy: tuple[str, int], echo: int, held: list[object], stop: asyncio.Event
               ) -> None:
    try:
        opened = await socks_open(proxy, echo)
    except OSError:
        return
    if opened is not None:
        held.append(opened)
    await stop.wait()


def sample(pid: int) -> tuple[float, int]:
    """guardd's RSS (MiB) and open descriptors."""
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return rss / 2**20, len(os.listdir(f"/proc/{pid}/fd"))


async def soak(args: argparse.Namespace, daemon: Guardd, echo: int, names: Path) -> None:
    counts, stop = Counts(), asyncio.Event()
    assert daemon.process is not None
    dns, proxy = daemon.dns[0], daemon.socks[0]
    held: list[object] = []
    dnsperf = asyncio.create_task(dns_load(dns, names, args, counts))
    tasks = [asyncio.create_task(ordinary(proxy, echo, counts, stop)) for _ in range(4)]
    tasks += [asyncio.create_task(slow(proxy, stop)) for _ in range(args.slow)]
    tasks += [asyncio.create_task(garbage(proxy, stop)) for _ in range(2)]
    tasks += [asyncio.create_task(idle(proxy, echo, held, stop)) for _ in range(args.idle)]
    print(f"{'t (s)':>6} {'dns/s':>8} {'conn/s':>8} {'refused':>8} {'failed':>7} "
          f"{'idle held':>9} {'RSS MiB':>8} {'fds':>6}", flush=True)
    started = last = time.monotonic()
    seen = 0
    while time.monotonic() - started < args.seconds:
        await asyncio.sleep(args.every)
        now = time.monotonic()
        rss, fds = sample(daemon.process.pid)
        rate = (counts.connects - seen) / (now - last)
        print(f"{now - started:6.0f} {counts.dns_qps:8.0f} {rate:8.0f} {counts.refused:8d} "
              f"{counts.failed.total():7d} {len(held):9d} {rss:8.1f} {fds:6d}", flush=True)
        seen, last = counts.connects, now
    stop.set()
    print(await dnsperf)
    await asyncio.gather(*tasks, return_exceptions=True)
    for _, writer in held:  # type: ignore[misc]
        writer.close()
    failures = ", ".join(f"{kind}: {count}" for kind, count in counts.failed.most_common())
    print(f"ordinary clients: {counts.connects} echoed, {counts.refused} refused, failed: "
          f"{failures or 'none'}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__)
    parser.add_argument("--seconds", type=float, default=600, help="length of the soak")
    parser.add_argument("--every", type=float, default=30, help="seconds between samples")
    parser.add_argument("--idle", type=int, default=1000, help="idle tunnels held open")
    parser.add_argument("--slow", type=int, default=50, help="clients trickling a greeting")
    parser.add_argument("--dns-qps", type=int, default=5000, help="dnsperf's query rate")
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the clients
    with tempfile.TemporaryDirectory(prefix="guardd-soak-") as tmp:
        directory = Path(tmp)
        policy = directory / "policy.yaml"
        policy.write_text(LOAD_POLICY)
        upstream = Upstream(directory, {"api.test": ["A 192.0.2.10"]})
        echo = Destination(directory, "echo")
        names = directory / "names.txt"
        write_names(names, 200_000)
        config = directory / "guardd.yaml"
        config.write_text(f"socksMaxConnections: {args.idle + 500}\n"
                          f"socksMaxConnectionsPerClient: {args.idle + 500}\n"
                          "socksTimeout: {idle: 3600}\n")
        daemon = Guardd.launch(directory, "--config", str(config), "--policy", str(policy),
                               "--upstream", upstream.address, "--dns", f"127.0.0.1:{free_port()}",
                               "--socks", f"127.0.0.1:{free_port()}")
        try:
            asyncio.run(soak(args, daemon, echo.port, names))
        finally:
            code = daemon.stop()
            echo.stop()
            upstream.stop()
        verify = subprocess.run([*GUARDD, "audit", "verify", "--audit", str(daemon.audit_dir)],
                                cwd=ROOT, capture_output=True, text=True)
        print(f"guardd exited {code}; audit verify: {verify.stdout.strip().splitlines()[-1:]}")
        return 0 if code == 0 and verify.returncode == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
