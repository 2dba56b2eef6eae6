"""A small authoritative DNS server on loopback: the upstream for guardd's whole test suite.

It answers fixed names over UDP and TCP on one port of 127.0.0.1 (or ::1), and nothing else:
binding any other address is refused, so a test can never reach out. Names not in `zones` get
NXDOMAIN, and known names without the asked type get NOERROR/NODATA, both with an SOA (the nearest
one in `zones`, else a default one). A UDP answer larger than 512 bytes, or than the query's EDNS
payload size, goes out truncated (TC=1, no records) as a real server's would. Every query name is
recorded, lower-case without the trailing dot, in `queries` and, given `log`, one a line in a file;
given `raw_log`, the bytes of every query are written there too, in hex, one a line, so a test can
check what exactly a resolver sent.

`extras` make a hostile upstream: for a name, records (full zone-file lines, owner included) that
every answer for that name carries besides the real ones, per section (``answer``, ``authority``,
``additional``), such as an address of some other name, or an alias in the authority section.

Per-name behaviours (`Behaviour`) make the failures a resolver must handle:
``truncate`` (UDP answer with TC=1 and no records, TCP the full answer), ``silent`` (no answer),
``servfail``, ``slow-servfail`` (SERVFAIL `SLOW_SECONDS` late over UDP, as a resolver whose own
upstream is gone answers), ``refused``, ``large`` (an A query gets `LARGE_COUNT` records:
truncated over UDP unless EDNS allows it), ``spoof`` (over UDP, three forged answers carrying `FORGED_ADDRESS` come
first: right id from another port, wrong id, wrong question; then the real answer).

In-process::

    async with DNSTestServer({"example.com": ["A 192.0.2.1", "300 TXT hello"]},
                             {"slow.example.com": "silent"}) as server:
        ...  # server.port, server.queries

As a subprocess (prints the bound port on stdout, serves until SIGTERM or SIGINT)::

    python -m tests.dnsupstream --port 0 --zone-file zones.json --log queries.log

where zones.json is ``{"zones": {NAME: [RECORD, ...]}, "behaviours": {NAME: BEHAVIOUR},
"extras": {NAME: {SECTION: [LINE, ...]}}}`` and a RECORD is zone-file text after the owner name:
``[TTL] [IN] TYPE RDATA``, TTL 60 by default. ``--raw-log PATH`` writes the raw queries.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO

from dnslib import EDNS0, QTYPE, RCODE, RR, A, DNSError, DNSRecord

LOOPBACK = ("127.0.0.1", "::1")
DEFAULT_TTL = 60
LARGE_COUNT = 100
#: How late a `slow-servfail` name's answer comes.
SLOW_SECONDS = 0.3
FORGED_ADDRESS = "192.0.2.66"
_UDP_LIMIT = 512  # RFC 1035 4.2.1, without EDNS
_CNAME_HOPS = 8
#: `extras` section -> the dnslib `DNSRecord` attribute holding it.
_SECTIONS = {"answer": "rr", "authority": "auth", "additional": "ar"}
_RECEIVE_BUFFER = 4 << 20
_DEFAULT_SOA = RR.fromZone(
    f". {DEFAULT_TTL} IN SOA ns.test. hostmaster.test. 1 3600 600 86400 {DEFAULT_TTL}")[0]


class Behaviour(enum.StrEnum):
    TRUNCATE = "truncate"
    SILENT = "silent"
    SERVFAIL = "servfail"
    SLOW_SERVFAIL = "slow-servfail"
    REFUSED = "refused"
    LARGE = "large"
    SPOOF = "spoof"


def _name(text: str) -> str:
    return text.lower().rstrip(".")


class DNSTestServer(asyncio.DatagramProtocol):
    """The server; it is also its own UDP protocol."""

    def __init__(
        self,
        zones: Mapping[str, Sequence[str]] | None = None,
        behaviours: Mapping[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        log: str | Path | None = None,
        raw_log: str | Path | None = None,
        extras: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> None:
        if host not in LOOPBACK:
            raise ValueError(f"the test server binds loopback only ({' or '.join(LOOPBACK)})")
        self.host = host
        self.port = 0
        self.queries: list[str] = []
        self._records = {
            _name(name): [rr for text in texts
                          for rr in RR.fromZone(f"$TTL {DEFAULT_TTL}\n{_name(name)}. {text}")]
            for name, texts in (zones or {}).items()
        }
        self._behaviours = {_name(name): Behaviour(b) for name, b in (behaviours or {}).items()}
        self._extras = {
            _name(name): {section: [rr for line in lines for rr in RR.fromZone(line)]
                          for section, lines in sections.items()}
            for name, sections in (extras or {}).items()
        }
        unknown = {s for sections in self._extras.values() for s in sections} - set(_SECTIONS)
        if unknown:
            raise ValueError(f"unknown extras sections {sorted(unknown)}; use {list(_SECTIONS)}")
        self._log_path = log
        self._log: IO[str] | None = None
        self._raw_log_path = raw_log
        self._raw_log: IO[str] | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, port: int = 0) -> int:
        """Bind UDP and TCP on the same port (`port` 0: a free one) and return it."""
        loop = asyncio.get_running_loop()
        if self._log_path is not None:
            self._log = open(self._log_path, "a", buffering=1)
        if self._raw_log_path is not None:
            self._raw_log = open(self._raw_log_path, "a", buffering=1)
        for _ in range(20):  # port 0: the port free for UDP may be taken for TCP; try another
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: self, local_addr=(self.host, port))
            # Room for a burst of queries (the kernel caps this at net.core.rmem_max): the plain
            # asyncio loop reads one datagram per turn and would drop some of a 500-query burst.
            self._udp.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, _RECEIVE_BUFFER)
            self.port = self._udp.get_extra_info("sockname")[1]
            try:
                self._tcp = await asyncio.start_server(self._serve_tcp, self.host, self.port)
                return self.port
            except OSError:
                self._udp.close()
                if port:
                    raise
        raise OSError(f"no port free for both UDP and TCP on {self.host}")

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            for writer in list(self._connections):
                writer.close()
            await self._tcp.wait_closed()
        for log in (self._log, self._raw_log):
            if log is not None:
                log.close()

    async def __aenter__(self) -> DNSTestServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        assert self._udp is not None
        reply = self._reply(data, udp=True)
        if reply is None:
            return
        behaviour = self._behaviour(reply)
        if behaviour is Behaviour.SPOOF:
            self._send_forgeries(reply, addr)
        if behaviour is Behaviour.SLOW_SERVFAIL:
            asyncio.get_running_loop().call_later(SLOW_SECONDS, self._udp.sendto, reply.pack(),
                                                  addr)
            return
        self._udp.sendto(reply.pack(), addr)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                length = int.from_bytes(await reader.readexactly(2), "big")
                reply = self._reply(await reader.readexactly(length), udp=False)
                if reply is not None:
                    packed = reply.pack()
                    writer.write(len(packed).to_bytes(2, "big") + packed)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    def _behaviour(self, message: DNSRecord) -> Behaviour | None:
        return self._behaviours.get(_name(str(message.q.qname)))

    def _reply(self, data: bytes, *, udp: bool) -> DNSRecord | None:
        """The reply to one query (truncated to fit, over UDP), or None for no reply (unparsable,
        or `silent`)."""
        if self._raw_log is not None:
            self._raw_log.write(data.hex() + "\n")
        try:
            request = DNSRecord.parse(data)
        except DNSError:
            return None
        name = _name(str(request.q.qname))
        self.queries.append(name)
        if self._log is not None:
            self._log.write(name + "\n")
        behaviour = self._behaviour(request)
        if behaviour is Behaviour.SILENT:
            return None
        reply = request.reply()
        if behaviour in (Behaviour.SERVFAIL, Behaviour.SLOW_SERVFAIL):
            reply.header.rcode = RCODE.SERVFAIL
        elif behaviour is Behaviour.REFUSED:
            reply.header.rcode = RCODE.REFUSED
        elif behaviour is Behaviour.TRUNCATE and udp:
            reply.header.tc = 1
        elif behaviour is Behaviour.LARGE:
            if request.q.qtype == QTYPE.A:
                reply.add_answer(*(RR(name, QTYPE.A, rdata=A(f"192.0.2.{i}"), ttl=DEFAULT_TTL)
                                   for i in range(1, LARGE_COUNT + 1)))
        else:
            self._answer(reply, name, request.q.qtype)
        for section, records in self._extras.get(name, {}).items():
            getattr(reply, _SECTIONS[section]).extend(records)
        edns_size = next((rr.rclass for rr in request.ar if rr.rtype == QTYPE.OPT), 0)
        if edns_size:
            reply.add_ar(EDNS0(udp_len=1232))
        if udp and len(reply.pack()) > max(_UDP_LIMIT, edns_size):
            reply.rr, reply.auth = [], []
            reply.header.tc = 1
        return reply

    def _answer(self, reply: DNSRecord, name: str, qtype: int) -> None:
        """Fill in the records for `name`, following CNAMEs within the zones."""
        for _ in range(_CNAME_HOPS):
            records = self._records.get(name)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                break
            cnames = [rr for rr in records if rr.rtype == QTYPE.CNAME]
            if cnames and qtype != QTYPE.CNAME:
                reply.add_answer(cnames[0])
                name = _name(str(cnames[0].rdata.label))
                continue
            matches = [rr for rr in records if qtype in (rr.rtype, QTYPE.ANY)]
            reply.add_answer(*matches)
            if matches:
                return
            break
        reply.add_auth(self._soa(name))

    def _soa(self, name: str) -> RR:
        """The SOA of the nearest enclosing name that has one, for negative answers."""
        labels = name.split(".")
        for i in range(len(labels)):
            for rr in self._records.get(".".join(labels[i:]), ()):
                if rr.rtype == QTYPE.SOA:
                    return rr
        return _DEFAULT_SOA

    def _send_forgeries(self, reply: DNSRecord, addr: tuple[str | int, ...]) -> None:
        """What an off-path attacker would try; a careful resolver ignores all three."""
        assert self._udp is not None
        forged = DNSRecord.parse(reply.pack())
        forged.rr = [RR(reply.q.qname, QTYPE.A, rdata=A(FORGED_ADDRESS), ttl=DEFAULT_TTL)]
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as other:  # right id, wrong source port
            other.bind((self.host, 0))
            other.sendto(forged.pack(), addr)
        wrong_id = forged.pack()
        self._udp.sendto(bytes([wrong_id[0] ^ 0xFF, wrong_id[1] ^ 0xFF]) + wrong_id[2:], addr)
        forged.q.qname = "forged.invalid"
        self._udp.sendto(forged.pack(), addr)


async def _serve(server: DNSTestServer, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await server.start(port)
    print(server.port, flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.dnsupstream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", choices=LOOPBACK)
    parser.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    parser.add_argument("--zone-file", type=Path, help="JSON: {zones: {...}, behaviours: {...}}")
    parser.add_argument("--log", type=Path, help="append each query name to this file")
    parser.add_argument("--raw-log", type=Path, help="append each query's bytes (hex) to this file")
    args = parser.parse_args(argv)
    spec = json.loads(args.zone_file.read_text()) if args.zone_file else {}
    server = DNSTestServer(spec.get("zones"), spec.get("behaviours"), host=args.host, log=args.log,
                           raw_log=args.raw_log, extras=spec.get("extras"))
    asyncio.run(_serve(server, args.port))


if __name__ == "__main__":
    main()
