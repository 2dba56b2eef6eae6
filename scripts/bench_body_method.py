"""Benchmark body for scripts/bench-body-method (see there).

A followed POST body under a `method` rule is read for a `_method` field part by part, in the
event loop: what a part costs there, every other connection and the DNS listener wait. Plain
bodies take the quick test (a few `in` checks); crafted ones take every reading. Each mix is
fed as 64 KiB parts (none of them names a method, so every part is read); the slowest mix
against a plain body of the same kind is the amplification an agent gets for its bytes.

Every followed body is also read for lines that end as a request line (`sniff.BodyLines`):
its mixes are lines that end in a version, none of them a request line.
"""

from __future__ import annotations

import argparse
import time

from guardd.stream.body_method import BodyMethodScan
from guardd.stream.sniff import BodyLines

PART = 64 * 1024
KINDS = {"multipart": b"multipart/form-data; boundary=x", "json": b"application/json",
         "form": b"application/x-www-form-urlencoded"}
MIXES = {
    "plain bytes": bytes(range(256)),
    "code in JSON": b'{"code": "def f():\\n    return obj.method(x)\\n", ',
    "percent escapes": b"%41" * 7,
    "bare percents": b"%" * 64 + b"&method",
    "backslashes": b"%41m\\e\\t\\h\\o\\d\n",
    "NULs": b"%41m\x00e\x00t\x00h\x00o\x00d ",
    "JSON escapes": b"\\u0041_method ",
    "every reading": b"x_method %41\\a\x00\r\nq",
    "IIS escapes": b"%u0041%u2000",
    "override look-alikes": b"&y-http-method-override-x",
}


#: Lines that end in a version and are no request line (session 61's attack: read in Python
#: a line at a time, `/1.1` lines cost 13 ms a part).
LINES = {
    "plain lines": b"x" * 60 + b"\n",
    "version lines": b"/1.1\n",
    "a word and a version": b"a/1.1\n",
    "two words, a trimmed one": b"a b \x01/1.1\n",
    "words split by some": b"a\x85b\x85\xa0/1.1\n",
    "a word behind trimmed bytes": b"a" + b"\x01" * 100 + b"/1.1\n",
}


def per_part(content_type: bytes, pattern: bytes, parts: int) -> float:
    """Seconds of CPU a 64 KiB part of `pattern` repeated costs the reader."""
    part = (pattern * (PART // len(pattern) + 1))[:PART]
    scan = BodyMethodScan([content_type], [])
    started = time.process_time()
    for _ in range(parts):
        scan.feed(part)
    assert not scan.found, "a mix named a method: it would stop being read"
    return (time.process_time() - started) / parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", type=int, default=64, help="parts fed per mix")
    args = parser.parse_args()
    print(f"The `_method` body reader: CPU per {PART // 1024} KiB part, {args.parts} parts a mix")
    for kind, content_type in KINDS.items():
        costs = {mix: per_part(content_type, pattern, args.parts) for mix, pattern in MIXES.items()}
        plain = costs["plain bytes"]
        for mix, cost in costs.items():
            print(f"  {kind:>9}  {mix:<16} {cost * 1e3:6.2f} ms  ({cost / plain:5.1f} x plain,"
                  f" {cost * 1e3 * 16:6.1f} ms per MiB)")
    print(f"A body's lines (BodyLines): CPU per {PART // 1024} KiB part of whole lines")
    costs = {mix: lines_per_part(line, args.parts) for mix, line in LINES.items()}
    for mix, cost in costs.items():
        print(f"  {mix:<26} {cost * 1e3:6.2f} ms  ({cost / costs['plain lines']:5.1f} x plain)")


def lines_per_part(line: bytes, parts: int) -> float:
    """Seconds of CPU a 64 KiB part of `line` repeated costs `BodyLines`."""
    part = line * (PART // len(line))
    lines = BodyLines()
    started = time.process_time()
    for _ in range(parts):
        assert not lines.feed(part), "a mix ended as a request line: it would stop being read"
    return (time.process_time() - started) / parts


if __name__ == "__main__":
    main()
