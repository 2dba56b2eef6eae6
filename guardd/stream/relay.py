"""Byte pump between two connected sockets: splice(2) through a kernel pipe, both ways.

Theory of operation. Each direction is a `_Pump`: it splices up to `CHUNK` bytes from its source
socket into its pipe and from the pipe into the destination socket, all inside the kernel: the
relayed bytes are never copied into Python objects, so a relay costs a few system calls per
`CHUNK`, whatever the byte count. Readiness comes from the `reactor` (edge-triggered): a pump
reads until EAGAIN and then waits for its source's next readable event; it moves at most `CHUNK`
bytes per loop turn and goes on at the next (fair to the other connections).

Back-pressure: when the destination cannot take what the pipe holds, the pump stops reading and
waits for the destination's writable event; reading resumes only once the pipe is drained. So
at most one pipe's worth (`PIPE_SIZE` at most) is buffered per direction.

Pipes: a pump holds one only while bytes wait in it (`Pipes`): an idle relay holds none. Each
is as large as guardd's budget of pipe pages leaves room for (1 MiB, 64 KiB or a page), in all
and for the client, since Linux counts every pipe of guardd's user against one allowance.

Inspection: `Relay.inspect_inbound` holds the server's first bytes until a verdict function of
what came so far (read with MSG_PEEK, so they stay for the splice) has an answer: a TLS
tunnel learns whether the server asked for the client's hello again, or resumed a session,
before any of them go. Following: a pump given a record check (`follow`: a TLS 1.2 stream's)
moves its source's bytes a record at a time, reading each 5-byte header and splicing no
further than the record's end, so that no byte of a record its check refuses goes (the relay
ends, `violation` says why): a header's read and write more a record, up to 16 KiB each, and
`RECORD_COST` of the turn's budget at least. A record the check `reads` (a TLS 1.2 server's
handshake before its change_cipher_spec: the session it makes) goes through guardd, read and
written into the pipe, not spliced.

Pacing: a relay moves what the agent chooses, a byte a packet if it likes, to a server that may
echo each one. Every pump's work, either way, is charged to the client's CPU share (`share`,
with what the readiness event cost the loop before it), and a pump whose client owes, or has
work waiting already, moves nothing until its turn (`turns.Turns`: one queue per client, in
order, with a wake-up for each waiter).

Half-close: EOF from one side (splice returns 0) becomes `shutdown(SHUT_WR)` on the other once
the pipe is drained; the opposite direction goes on until its own EOF. The relay ends when
both directions are done, on any socket error, or after `idle_timeout` without traffic.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

from guardd.stream.reactor import Reactor, Watch
from guardd.stream.sniff import (CARRY, HELLO_WINDOW, MAX_SNIFF_BYTES, Kind, Sniffed, sniff,
                                 tls_after, tls_ahead)
from guardd.turns import Share

log = logging.getLogger("guardd.relay")
CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
#: What `Relay.inspect_inbound` looks at, at most: the verdicts need a few dozen bytes (a
#: ServerHello with what follows it, a few hundred).
_INSPECTED = 4096
#: What an inspection's verdict is.
Told = TypeVar("Told")


#: Judges a TLS hello in the middle of a stream (`Relay.watch_outbound_hellos`): why it may
#: not go ("": it may).
HelloCheck = Callable[[Sniffed], str]


class RecordCheck(Protocol):
    """Judges a followed stream's records (`sniff.RecordWatch`)."""

    #: The record judged last is read into guardd (`read`) on its way, not only spliced.
    reads: bool

    def __call__(self, header: bytes) -> str:
        """Why the record with a 5-byte header may not go ("": it may)."""

    def read(self, data: bytes) -> None:
        """Bytes of the body of a record that `reads`, as they go."""


_RECORD_HEADER = 5
#: What a followed record counts against a turn's `CHUNK` at least: its header's read and
#: write, and its body's splices, whatever its size (review, 2026-12-06: 1 MiB of 5-byte
#: records was one turn of 210,000, and the loop waited 5 s).
RECORD_COST = 1024
#: What a look for a TLS hello at a burst's start (`watch_hellos`) counts against a turn's
#: `CHUNK`, whatever moves after it: it peeks at `HELLO_WINDOW` bytes, and at up to
#: `MAX_SNIFF_BYTES` of a hello that may begin there, and reads them (session 54's re-attack:
#: 52-byte hellos back to back, each looked at, counted as the 52 bytes each moved: 20,000
#: looks a turn, 6 s the loop did nothing else).
LOOK_COST = CHUNK // 16
#: What one recv(2) into the (empty) pipe through guardd takes at most, past a TCP urgent mark
#: (see `_Pump._read`) or of a record read on its way (`_Pump._take`): a page, what any pipe
#: holds (one over the user's fs.pipe-user-pages-soft holds two).
_PAGE = 4096
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
#: What a readiness event costs the loop before the pump it calls runs (epoll, the reactor's
#: dispatch, the ACKs), charged with the pump's own time: measured on this project's 2-core
#: VM, 200 tunnels trickling a byte a write to a server that echoed it cost 31 us a pump call,
#: of which the pumps saw 13.
WAKE_COST = 15e-6
#: What a readiness event costs the loop when it comes while its pump waits for its turn (its
#: dispatch returns at once), and what a turn the queue gives costs. Charged `WAKE_COST` each,
#: a client with 64 busy relays was charged half again what guardd spent and got 70% of its
#: share; charged 2 us, an echo trickle's 230,000 events a second while its pumps waited took
#: 0.47 of its half core, guardd spending 0.35 of a core in all (so at most 1.4 us an event,
#: its moves and the other clients' work included), and its own DNS waited seconds behind
#: them (attack passes). It assumes a loop busy enough that events come in batches, as it is
#: while a client owes or others wait.
WAITING_EVENT_COST = 1e-6
#: Errors that end a relay quietly: the peer went away, which is how connections end.
_PEER_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT,
                        errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED})


#: Empty pipes kept for the next pumps at most (a pipe costs pipe2, fcntl and two closes,
#: which for a short connection is a good part of what its relay costs), by size in pages:
#: 1 MiB, the kernel's default 64 KiB, a page. A pump gives its pipe back as soon as it is
#: empty, so a few serve a busy loop; and spare pipes count against the user's allowance,
#: which every guardd of the user shares (a node's sidecars): 1,288 pages at most.
_SPARE = {PIPE_SIZE // _PAGE: 4, 16: 16, 1: 8}
MAX_SPARE_PIPES = sum(_SPARE.values())
#: The part of the pipe budget one client's pumps may hold at once (a re-attack: six clients
#: holding a quarter each, their tunnels stalled, left a seventh 1-page pipes).
CLIENT_PART = 8


def pipe_budget() -> int:
    """Pages of pipes guardd may hold: three quarters of what Linux lets its user hold
    before every new pipe of the user's is 2 pages and none may grow (`fs.pipe-user-pages-
    soft`, 16,384 by default, for all the user's processes; 0: no limit)."""
    try:
        soft = int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text())
    except (OSError, ValueError):
        soft = 16384
    return soft * 3 // 4 if soft else 1 << 62


class Pipes:
    """The pumps' pipes, held only while bytes wait in them (`_Pump`), each as large as the
    `budget` of pages leaves room for: in all, and for one client an eighth of it (a page at
    the least: a group of clients that stall their relays can still take the budget, and
    leave the others' pipes a page). Attack pass (2026-12-06): each relay held two 1 MiB
    pipes from its start, so one client's 100 idle tunnels took the user's whole allowance,
    and from then on every relay's pipes were 8 KiB, every client's throughput a quarter,
    after it left too (the spare pipes kept counting)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        #: Pages of every pipe guardd holds (spare ones included), and of each client's.
        self.held = 0
        self.of_client: dict[str, int] = {}
        self._spare: dict[int, list[tuple[int, int]]] = {pages: [] for pages in _SPARE}

    def take(self, client: str) -> tuple[int, int, int]:
        """An empty pipe for `client`'s pump: (read end, write end, pages)."""
        mine = self.of_client.get(client, 0)
        for pages in _SPARE:
            spare = self._spare[pages]
            if pages > 1 and (mine + pages > self.budget // CLIENT_PART or
                              not spare and self.held + pages > self.budget):
                continue
            pipe = spare.pop() if spare else self._made(pages)
            self.of_client[client] = mine + pages
            return (*pipe, pages)
        raise AssertionError("a page always fits")

    def _made(self, pages: int) -> tuple[int, int]:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if pages != 16:  # (the kernel's default, under the user's allowance)
            try:
                fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, pages * _PAGE)
            except OSError:  # (over fs.pipe-max-size, or the allowance: smaller, still works)
                pass
        self.held += pages
        return read_end, write_end

    def give(self, client: str, pipe: tuple[int, int, int], empty: bool) -> None:
        """`client`'s pump is done with `pipe`: kept for the next when empty and there is
        room, else closed."""
        read_end, write_end, pages = pipe
        left = self.of_client[client] - pages
        if left:
            self.of_client[client] = left
        else:
            del self.of_client[client]
        spare = self._spare[pages]
        if empty and len(spare) < _SPARE[pages]:
            spare.append((read_end, write_end))
        else:
            os.close(read_end)
            os.close(write_end)
            self.held -= pages


_pipes = Pipes(pipe_budget())


def _nothing() -> None:
    """A readiness event no pump waits for any more."""


class _Pump:
    """One direction of a relay: `source` -> pipe -> `destination`."""

    def __init__(self, relay: Relay, source: Watch, destination: Watch) -> None:
        self.relay = relay  # (dropped at the close: see `close`)
        self.loop = relay.loop
        self.source = source
        self.destination = destination
        self.source_fd = source.sock.fileno()
        self.destination_fd = destination.sock.fileno()
        self.client = relay.share.client
        #: Its pipe (`Pipes.take`), held only while bytes wait in it: -1 ends meanwhile.
        self.pipe_read = self.pipe_write = -1
        self.pipe_pages = 0
        self.buffered = 0
        self.bytes = 0
        self.eof = False
        self.done = False
        self.closed = False
        self._again_scheduled = False
        #: Waiting for its turn at the client's share (`pump` moves nothing meanwhile), and the
        #: readiness events that came meanwhile (each cost the loop a wake-up: attack pass).
        self._queued = False
        self._woken = 0
        #: A verdict on the first bytes still to come, what it is when they end first, and who
        #: waits for it (`inspect`).
        self._verdict: Callable[[bytes], object] | None = None
        self._otherwise: object = None
        self._told: asyncio.Future[Any] | None = None
        self._then: Callable[[Any], RecordCheck | None] | None = None
        #: Following records (`follow`): what judges each one's header ("": it may go), and
        #: the bytes of the one under way still to move.
        self._records: RecordCheck | None = None
        self._record_left = 0
        self._header = bytearray()  # (the next record's, read so far)
        #: Watching for a TLS hello at the start of each turn and burst (`watch_hellos`): what
        #: judges one (None: not watching), the peer's bytes moved when the source's were last
        #: looked at, whether they were since its last wait for bytes, and the bytes that may
        #: move before the next look (those before a hello, or the hello that passed).
        self._hellos: HelloCheck | None = None
        self._turn_seen = -1
        self._burst_seen = False
        self._unlooked = 0
        #: A hello held until it can be told: for at most this long, since when, and the
        #: timer that looks at it then (a client that stops sending part-way).
        self._hold_for = 0.0
        self._held_since: float | None = None
        self._hold_timer: asyncio.TimerHandle | None = None
        #: An upgrade's request went (`sniff.tls_ahead`): the source's next bytes are its TLS
        #: first flight, held whatever they begin with.
        self._first_flight = False
        #: The last `CARRY` bytes the source sent, while its looks saw all it sent (b"" else),
        #: and what the last look saw.
        self._carry = b""
        self._seen = b""
        #: Looks at the source's bytes so far (`_looked`): each counts `LOOK_COST`.
        self._looks = 0

    def start(self) -> None:
        self.source.on_readable = self.pump  # (the event set `may_read`)
        self.destination.on_writable = self.pump  # resumes a drain the destination stopped
        self.pump()

    def pump(self) -> None:
        """A readiness event (or the rest of a turn's `CHUNK`): `_paced`, now, or at its turn
        when the client owes or has work waiting (which goes first)."""
        if self._queued:
            self._woken += 1  # (its turn moves what came meanwhile, and charges them)
            return
        if self.closed:
            return
        relay = self.relay
        if relay.share.owed():
            relay.share.wait(self._turn)
            self._queued = True  # (once it is queued: a failed wait never strands it)
        else:
            self._paced(WAKE_COST)

    @property
    def waiting(self) -> bool:
        """Whether it waits for its turn (with work to do: not silence)."""
        return self._queued

    def _turn(self) -> None:
        self._queued = False
        if self.closed:
            return
        relay = self.relay
        try:
            self._paced(WAITING_EVENT_COST * (1 + self._woken))
        except Exception:  # (as a failing readiness callback: it costs its connection)
            log.exception("a relay's turn failed; its connection is closed")
            relay.close()

    def _paced(self, woken: float) -> None:
        """`_move`, its work and what waking for it cost (`woken`) charged to the client."""
        relay = self.relay  # (a move that ends the relay drops it: its charge is made)
        self._woken = 0
        started = time.perf_counter()
        self._move()
        if self.pipe_read >= 0 and not self.buffered:
            self._give_pipe()  # (none waits in it: an idle pump holds no pipe)
        seconds = time.perf_counter() - started + woken
        relay.charged += seconds
        relay.share.charge(seconds)

    def _move(self) -> None:
        """Move bytes until the source has none (EAGAIN), the destination takes no more, or
        `CHUNK` moved this turn (then the rest at the next)."""
        budget = CHUNK
        while not (self.closed or self.done):
            if self.buffered:  # drain first: reading waits for an empty pipe
                try:
                    spliced = os.splice(self.pipe_read, self.destination_fd, self.buffered,
                                        flags=_FLAGS)
                except BlockingIOError:
                    return  # destination full: its writable event calls again
                except OSError as exc:
                    self.relay.fail(exc)
                    return
                self.buffered -= spliced
                self.destination.written += spliced
                continue
            if self.eof:
                self._finish()
                return
            if not self.source.may_read:
                return
            if budget <= 0:
                self._again()
                return
            if self._verdict is not None and not self._inspected():
                return
            if self._hellos is not None and not self._unlooked:
                looks = self._looks
                if not self._looked():
                    return
                budget -= LOOK_COST * (self._looks - looks)
                if budget <= 0:  # (what it lets go moves at the next turn)
                    self._again()
                    return
            if self.pipe_read < 0:
                try:
                    self.pipe_read, self.pipe_write, self.pipe_pages = _pipes.take(self.client)
                except OSError as exc:  # out of descriptors
                    self.relay.fail(exc)
                    return
            limit = min(budget, self._unlooked) if self._unlooked else budget
            if self._records is not None:
                if not self._record_left:
                    if not self._next_record():
                        return
                    budget -= RECORD_COST  # (a record costs its reads whatever its size)
                    continue  # (its header, in the pipe, goes first; its body next)
                limit = min(budget, self._record_left)
            try:
                moved = self._take(limit) if self._records is not None and \
                    self._records.reads else self._read(limit)
            except OSError as exc:
                self.relay.fail(exc)
                return
            if moved is None:
                self.source.may_read = False  # until its next readable event
                self._burst_seen = False  # (what comes then is looked at again)
                return
            if moved == 0:
                self.eof = True
            else:
                budget -= moved
                self.buffered += moved
                self.bytes += moved
                self.relay.active = time.monotonic()
                if self._records is not None:
                    self._record_left -= moved
                if self._unlooked:
                    self._unlooked -= moved
                if self._hellos is not None:  # (what moved, when the last look saw it all)
                    seen, self._seen = self._seen, b""
                    self._carry = (self._carry + seen[:moved])[-CARRY:] \
                        if moved <= len(seen) else b""

    def watch_hellos(self, judge: HelloCheck, hold_for: float, first_flight: bool,
                     carry: bytes) -> None:
        """Look at the start of each of the source's turns (its first bytes after the peer
        spoke) and bursts (after it had none to read) for a TLS hello, or an upgrade's request
        (`sniff.tls_ahead`), after which the next bytes are the first flight whatever they
        begin with (so from the start with `first_flight`); a hello is held until `sniff`
        reads it whole (`hold_for` seconds at most: then as it is), judged by `judge` before
        it goes ("": it may; else why the relay ends), and looked into and past
        (`sniff.tls_after`). (Its bursts too: a hello sent before the server's answer came is
        of the same turn, review.) `carry`: the last bytes the source sent before (read with
        its next ones)."""
        self._hellos, self._hold_for, self._first_flight = judge, hold_for, first_flight
        self._carry = carry[-CARRY:]

    def _looked(self) -> bool:
        """Whether the bytes waiting may move (`_unlooked` of them, or all when neither a turn
        nor a burst begins here); False while a hello in them is held, or when it may not go
        (the relay is cut). What the source sent before the burst (`_carry`, when the looks
        saw all of it) is read with it: a request or a hello cut across bursts (review)."""
        assert self._hellos is not None
        turn = self.relay.inbound.bytes if self is self.relay.outbound else \
            self.relay.outbound.bytes
        if turn == self._turn_seen and self._burst_seen:
            return True  # (one look at a turn's or a burst's start)
        self._looks += 1
        seen = self._receive(HELLO_WINDOW, socket.MSG_PEEK)
        if seen is None:
            self._burst_seen = False
            return False
        self._seen = seen
        if self._first_flight:
            return self._held(turn, b"")
        carry = self._carry
        data = carry + seen
        at, flight = tls_ahead(data, len(carry))
        if at < 0:
            self._turn_seen, self._burst_seen = turn, True
            return True
        return self._ahead(turn, data, at, flight, len(carry))

    def _ahead(self, turn: int, data: bytes, at: int, flight: bool, went: int) -> bool:
        """`_looked`'s move once `tls_ahead` found, at `at` in `data` (whose first `went` bytes
        went before): what comes before it goes, then a look at it; an upgrade's request
        goes, what follows it looked at as a first flight; or a hello here is held."""
        if flight:
            self._unlooked, self._first_flight = at - went, True
            return True
        if at > went:
            self._unlooked = at - went
            return True
        return self._held(turn, data[at:went])

    def _held(self, turn: int, went: bytes) -> bool:
        """A hello that may begin here (`went`: its bytes that went before the burst), read as
        `sniff` reads first bytes: whether it may go (or was none); False while it cannot be
        told yet, or when it may not go. A first flight that is no hello may be the request
        of another upgrade (Postgres's GSSENCRequest refused, then its SSLRequest: review)."""
        assert self._hellos is not None
        now = self.loop.time()
        if self._held_since is None:
            self._held_since = now
        waiting = self._receive(MAX_SNIFF_BYTES, socket.MSG_PEEK)
        if waiting is None:
            return False
        hello = went + waiting
        sniffed = sniff(hello, eof=not waiting or now - self._held_since >= self._hold_for)
        if sniffed is None:  # (not whole: its next bytes, or the time held, look again)
            self.source.may_read = False
            if self._hold_timer is None:
                self._hold_timer = self.loop.call_later(self._hold_for, self._held_long)
            return False
        self._held_since, self._first_flight = None, False
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        if sniffed.kind is Kind.TLS:
            why = self._hellos(sniffed)
            if why:
                self.relay.violate(why)
                return False
        # Looked into, hello or not, and past it: another upgrade's request, or a hello, in it
        # or behind it. A server that never upgraded reads a hello as lines (re-attacks: a
        # hello of the allowed name inside a line took a STARTTLS and a fronted hello with it,
        # after it or in one of its extensions).
        at, flight = tls_after(hello, len(went))
        if at >= 0:
            return self._ahead(turn, hello, at, flight, len(went))
        self._turn_seen, self._burst_seen = turn, True
        return True

    def _held_long(self) -> None:
        """A hello held `hold_for`: read as it is."""
        self._hold_timer = None
        if not self.closed:
            self.source.may_read = True  # (its peek says what is there)
            self.pump()

    def follow(self, records: RecordCheck, left: int = 0) -> None:
        """Move the source's bytes a record at a time from now on, each header judged by
        `records` first (`left`: the bytes of a record's body under way still to come)."""
        self._records, self._record_left = records, left

    def _next_record(self) -> bool:
        """Read the next record's header (kept until it is whole) and judge it: True when it
        may go (it waits in the pipe, its body is to move) or the source ended; False while it
        is not all here, or when it may not go (the relay is cut). Read, not peeked: a read
        ends where a TCP segment ends, and bytes left unread there may hold back the rest
        (review: a peek showed 2 bytes of a header and the stream stalled for good)."""
        while len(self._header) < _RECORD_HEADER:
            data = self._receive(_RECORD_HEADER - len(self._header))
            if data is None:
                return False
            if not data:  # (its end: what came of a header goes, then the close)
                self.eof = True
                break
            self._header += data
        header, self._header = bytes(self._header), bytearray()
        assert self._records is not None
        why = self._records(header) if len(header) == _RECORD_HEADER else ""
        if why:
            self.relay.violate(why)
            return False
        if header:
            os.write(self.pipe_write, header)  # (an empty pipe: room for a header)
            self.buffered += len(header)
            self.bytes += len(header)
            self.relay.active = time.monotonic()
        if len(header) == _RECORD_HEADER:
            self._record_left = int.from_bytes(header[3:5], "big")
        return True

    def inspect(self, verdict: Callable[[bytes], Told | None], otherwise: Told,
                then: Callable[[Told], RecordCheck | None] | None = None
                ) -> asyncio.Future[Told]:
        """Move nothing until `verdict` of the source's bytes so far answers; the future holds
        the answer (`otherwise` when the source ends first, the relay closes, or the bytes a
        verdict may read have none). `then` of a verdict that came: what to `follow` the
        source's records with from its first byte, if anything (none moved before it)."""
        self._verdict, self._otherwise, self._then = verdict, otherwise, then
        self._told = self.loop.create_future()
        if self.eof or self.done or self.closed:
            self._tell(otherwise)  # (attack pass: the source had closed, no event would come)
        return self._told

    def _inspected(self) -> bool:
        """Whether the verdict is given, the bytes it read left for the splice; False while
        it waits for more."""
        assert self._verdict is not None
        seen = self._receive(_INSPECTED, socket.MSG_PEEK)
        if seen is None:
            return False
        told = self._verdict(seen)
        if told is None and seen and len(seen) < _INSPECTED and not self._source_ended():
            self.source.may_read = False  # until more come (or the end: its event comes too)
            return False
        told = self._otherwise if told is None else told
        if self._then is not None:
            records = self._then(told)
            if records is not None:
                self.follow(records)
        self._tell(told)
        return True

    def _receive(self, size: int, flags: int = 0) -> bytes | None:
        """Up to `size` of the source's bytes (b"": its end); None when none came yet (reading
        waits for its next event) or the read failed (the relay ends)."""
        try:
            return self.source.sock.recv(size, flags)
        except BlockingIOError:
            self.source.may_read = False
        except OSError as exc:
            self.relay.fail(exc)
        return None

    def _source_ended(self) -> bool:
        """Whether the source sent its end (or failed) behind the bytes a look sees: no event
        would say so when both came before the look (attack pass)."""
        poll = select.poll()
        poll.register(self.source_fd, select.POLLRDHUP)
        return bool(poll.poll(0))

    def _tell(self, told: object) -> None:
        self._verdict = None
        if self._told is not None and not self._told.done():
            self._told.set_result(told)

    def _read(self, budget: int) -> int | None:
        """Move up to `budget` bytes from the source into the (empty) pipe; None when it has
        none (EAGAIN), 0 at its EOF.

        splice(2) stops for good at TCP urgent data (MSG_OOB), answering EAGAIN while bytes
        wait behind it: a sender could stall its own relay (or make a level-triggered one
        spin). So an EAGAIN is checked with recv(2), which reads past the mark, leaving the
        urgent byte out as it does for any reader: urgent data means nothing through a proxy.
        """
        try:
            return os.splice(self.source_fd, self.pipe_write, budget, flags=_FLAGS)
        except BlockingIOError:
            pass
        try:
            data = self.source.sock.recv(min(_PAGE, budget))
        except BlockingIOError:
            return None
        if data:
            os.write(self.pipe_write, data)  # an empty pipe takes a page at least
        return len(data)

    def _take(self, budget: int) -> int | None:
        """As `_read`, through guardd: up to `budget` bytes of a record's body its check reads
        (`RecordCheck.reads`), a page at most, then into the (empty) pipe."""
        data = self._receive(min(_PAGE, budget))
        if data is None:
            return None
        assert self._records is not None
        self._records.read(data)
        os.write(self.pipe_write, data)
        return len(data)

    def _again(self) -> None:
        if not self._again_scheduled:
            self._again_scheduled = True
            self.loop.call_soon(self._resume)

    def _resume(self) -> None:
        self._again_scheduled = False
        self.pump()

    def _finish(self) -> None:
        self.done = True
        try:
            self.destination.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already; the other direction will notice
        self.relay.direction_done()

    def _give_pipe(self) -> None:
        _pipes.give(self.client, (self.pipe_read, self.pipe_write, self.pipe_pages),
                    empty=not self.buffered)
        self.pipe_read = self.pipe_write = -1

    def close(self) -> None:
        self.closed = True
        self._tell(self._otherwise)
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        if self.pipe_read >= 0:
            self._give_pipe()
        # A closed pump moves nothing and calls its relay no more: without this reference
        # back, a relay and its pumps are freed when the connection ends, not left for the
        # cyclic garbage collector (whose collections each connection made costlier).
        del self.relay


class Relay:
    """Relays between `client` and `upstream` until both sides are done; `wait()` returns the
    byte counts (client->upstream, upstream->client). It closes both sockets when it ends."""

    def __init__(self, reactor: Reactor, client: Watch, upstream: Watch, idle_timeout: float,
                 share: Share, on_close: Callable[[Relay], None] | None = None) -> None:
        self.reactor = reactor
        self.loop = reactor.loop
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.started = time.monotonic()
        self.active = self.started
        self.error: OSError | None = None
        #: Why a record followed (`follow_outbound`, `inspect_inbound`'s `then`) ended it.
        self.violation = ""
        self._ended = False
        #: Done when the relay ends (cancelled with a task that gave up waiting for it).
        self._closed = self.loop.create_future()
        self._on_close = on_close
        #: The client's CPU share, and what the pumps charged to it so far.
        self.share = share
        self.charged = 0.0
        self.outbound = _Pump(self, client, upstream)
        try:
            self.inbound = _Pump(self, upstream, client)
        except BaseException:  # out of descriptors: give the first pump's pipe back
            self.outbound.close()
            raise
        self._idle = self.loop.call_later(idle_timeout, self._check_idle)

    def start(self, inbound_only: bool = False) -> None:
        """Start pumping; `inbound_only` holds the client's bytes back (first bytes still to be
        inspected) while a server that speaks first is already heard."""
        self.inbound.start()
        if not inbound_only:
            self.start_outbound()

    def start_outbound(self) -> None:
        if not self._ended:
            self.outbound.start()

    def inspect_inbound(self, verdict: Callable[[bytes], Told | None], otherwise: Told,
                        then: Callable[[Told], RecordCheck | None] | None = None
                        ) -> asyncio.Future[Told]:
        """Hold the server's bytes from now on until `verdict` of those that came has an
        answer (the future's; `otherwise` when the relay ends first); then they go as they
        came, record by record when `then` of the answer says how to judge them."""
        return self.inbound.inspect(verdict, otherwise, then)

    def watch_outbound_hellos(self, judge: HelloCheck, hold_for: float,
                              first_flight: bool = False, carry: bytes = b"") -> None:
        """Judge each TLS hello the client sends at a turn's or a burst's start, or after an
        upgrade's request (`_Pump.watch_hellos`)."""
        self.outbound.watch_hellos(judge, hold_for, first_flight, carry)

    def follow_outbound(self, records: RecordCheck, left: int = 0) -> None:
        """Move the client's bytes a record at a time, each header judged by `records`
        (`left`: the bytes of a record under way, forwarded in part already, still to come)."""
        self.outbound.follow(records, left)

    def violate(self, why: str) -> None:
        """End the relay because a record may not go (`why`, for its owner to record)."""
        self.violation = why
        self.close()

    def stop(self) -> int:
        """Stop pumping, sockets left open (their watches' events call nothing): the
        connection's bytes are now moved by whoever stopped it. Returns the bytes already
        moved (a server that spoke first, say), or one that waited for its turn to be
        (review: a client that owed its share hid its server's first words from the check)."""
        self._idle.cancel()  # (the new mover keeps its own)
        waited = self.inbound.waiting and self._upstream_sent()
        for pump in (self.outbound, self.inbound):
            pump.closed = True
            pump.source.on_readable = pump.destination.on_writable = _nothing
        return self.outbound.bytes + self.inbound.bytes + int(waited)

    def _upstream_sent(self) -> bool:
        """Whether the upstream's socket holds a byte nobody read yet."""
        try:
            return bool(self.upstream.sock.recv(1, socket.MSG_PEEK))
        except OSError:  # (BlockingIOError: none; a failed socket says no more)
            return False

    def release(self) -> None:
        """Give the pipes back, sockets left open (to whoever stopped the relay), and its
        owner's method (a tunnel's, which keeps its relay: no cycle left for the collector)."""
        self.stop()
        if not self._ended:
            self._ended = True
            self.outbound.close()
            self.inbound.close()
            self._on_close = None

    @property
    def buffered(self) -> tuple[int, int]:
        """Bytes its pipes hold, out and in (`memory`)."""
        return self.outbound.buffered, self.inbound.buffered

    async def wait(self) -> tuple[int, int]:
        await self._closed
        return self.outbound.bytes, self.inbound.bytes

    def direction_done(self) -> None:
        if self.outbound.done and self.inbound.done:
            self.close()

    def fail(self, exc: OSError) -> None:
        if exc.errno not in _PEER_GONE:
            self.error = exc
        self.close()

    def _check_idle(self) -> None:
        if (self.outbound.waiting or self.inbound.waiting) and self.share.owed():
            self.active = time.monotonic()  # (waiting for the share is not silence)
        idle = time.monotonic() - self.active
        if idle >= self.idle_timeout:
            self.close()
        else:
            self._idle = self.loop.call_later(self.idle_timeout - idle, self._check_idle)

    def close(self) -> None:
        if self._ended:
            return
        self._ended = True
        self._idle.cancel()
        self.outbound.close()
        self.inbound.close()
        self.reactor.close(self.client)
        self.reactor.close(self.upstream)
        if not self._closed.done():
            self._closed.set_result(None)
        on_close, self._on_close = self._on_close, None  # (a tunnel's method: no cycle left)
        if on_close is not None:
            on_close(self)
