"""TLS 1.2 sessions guardd saw made, each bound to what its handshake was judged for.

Below TLS 1.3 a server resumes a session whatever name the resuming hello's SNI gives, and
OpenSSL serves the name the session was made for (attack pass, 2026-12-06: a session made for a
name before a rate limit or a reload refused it, or for another name, was served under an
allowed SNI). A connection is judged by its hello's SNI, so a resumption passes only when what
it resumes was made through guardd on a connection judged for the same SNI, by the same client,
to the same server address and port (`Key`): the session id of a full handshake's ServerHello
(the server's own: not one the hello offered), and each ticket a server sent before its
change_cipher_spec (RFC 5077 3.3), in clear; both read as they go (`sniff.RecordWatch` with
`bind`). A resumption binds the tickets it brings, never the session id its ServerHello
echoes: the client chose that one. The connection is still judged by its SNI now (its rule,
rate limit and reload), as every connection is; the binding only says the session serves that
name. Anything else a server resumes is cut before the client's bytes go
(`Connect.resumed`), the server's flight with it.

What a server resumes by: the hello's ticket when it offers one (RFC 5077 3.4; OpenSSL and
BoringSSL then never look the session id up), else its session id, which the ServerHello
echoes. But GnuTLS looks the session id up first (second attack pass), and a server may fall
back to its cache for a ticket it cannot read. So a ticket's resumption needs the ticket bound
to the key, and the session id it came with bound to the same key, unless the client chose it:
the ticket's SHA-256 (what OpenSSL and BoringSSL clients send), or an id no server gave through
guardd lately (`SEEN_FOR`: Go's and Java's random ones) and none still bound, once guardd has
watched that long (review: a restart forgot every id, and the second attack's resumption
passed again).

The table is bounded: `MOST_SESSIONS` in all, the oldest forgotten first, and
`MOST_PER_CLIENT` for one client's (its oldest forgotten first), so one client's handshakes
push out at most that many of another's. A session forgotten is cut when resumed, as one never
seen: the client's next connection makes a new one. The ids servers gave are kept apart, in a
fixed room (`_Given`), where a flood of handshakes can only make more of them look given: a
ticket's resumption with a client's own id cut, never one with a server's passed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from functools import partial

from guardd.stream.sniff import (RecordWatch, ServerAnswer, Sniffed, echoed_session,
                                 is_session_id, server_answer)

#: (principal, client account, server address, server port, SNI or ""): what a session is
#: bound to.
Key = tuple[str | None, str, str, int, str]
MOST_SESSIONS = 32_768
MOST_PER_CLIENT = 2_048
#: How long a session id a server gave is kept in each of `_Given`'s two generations (so two to
#: four days in all): RFC 5246 F.1.4 suggests a day at most for a session id's life.
SEEN_FOR = 2 * 24 * 3600.0


class _Given:
    """The session ids servers gave, in a fixed room: two Bloom filters of `_BITS` bits (4 MiB
    each, `_HASHES` bits an id), the older dropped each `SEEN_FOR`, so an id is kept two to
    four days. It may take an id it never saw for given (0.6% of ids once three million came
    in each generation, 1.2% with both full: more only cuts)."""

    _BITS = 1 << 25
    _HASHES = 5

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._started = self._since = clock()
        #: The generations' bits (None: no id came in it, and no room is taken).
        self._new: bytearray | None = None
        self._old: bytearray | None = None

    def add(self, credential: bytes) -> None:
        self._age()
        if self._new is None:
            self._new = bytearray(self._BITS // 8)
        for bit in self._bits(credential):
            self._new[bit >> 3] |= 1 << (bit & 7)

    def __contains__(self, credential: bytes) -> bool:
        self._age()
        return any(all(bits[bit >> 3] & 1 << (bit & 7) for bit in self._bits(credential))
                   for bits in (self._new, self._old) if bits is not None)

    @property
    def complete(self) -> bool:
        """Whether every id a server gave in the last `SEEN_FOR` is here: guardd has watched
        that long (since its start, it knows none from before)."""
        return self._clock() - self._started >= SEEN_FOR

    def _bits(self, credential: bytes) -> list[int]:
        digest = hashlib.sha256(credential).digest()
        return [int.from_bytes(digest[4 * n:4 * n + 4], "big") % self._BITS
                for n in range(self._HASHES)]

    def _age(self) -> None:
        """Drop the generations older than `SEEN_FOR` (both, after an idle stretch)."""
        now = self._clock()
        if now - self._since >= 2 * SEEN_FOR:
            self._since, self._old, self._new = now, None, None
        elif now - self._since >= SEEN_FOR:
            self._since, self._old, self._new = self._since + SEEN_FOR, self._new, None


class TlsSessions:
    """The credentials (`sniff.session_credential`, `sniff.ticket_credential`) of sessions
    made through guardd, each with its `Key`."""

    def __init__(self, most: int = MOST_SESSIONS, per_client: int = MOST_PER_CLIENT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.most = most
        self.per_client = per_client
        #: The session ids servers gave, whether still bound or not.
        self._given = _Given(clock)
        #: Credential -> its key, oldest first.
        self._bound: dict[bytes, Key] = {}
        #: (principal, account) -> its credentials, oldest first.
        self._by_client: dict[tuple[str | None, str], dict[bytes, None]] = {}

    def __len__(self) -> int:
        return len(self._bound)

    def bind(self, credential: bytes, key: Key) -> None:
        """`credential` resumes a session made on a connection judged for `key`."""
        self._forget(credential)
        held = self._by_client.setdefault(key[:2], {})
        if len(held) >= self.per_client:
            self._forget(next(iter(held)))
        elif len(self._bound) >= self.most:
            self._forget(next(iter(self._bound)))
        self._bound[credential] = key
        self._by_client.setdefault(key[:2], held)[credential] = None
        if is_session_id(credential):
            self._given.add(credential)

    def vouches(self, key: Key, hello: Sniffed, echoed: bytes) -> bool:
        """Whether the session a server resumed for `hello` (its ServerHello echoing the
        session id `echoed`) was made for `key`."""
        if echoed != hello.session:
            return False  # (a server echoes what the hello offered: RFC 5246 7.4.1.3)
        if hello.ticket:
            return self._bound.get(hello.ticket) == key and (
                self._bound.get(echoed) == key or self._chosen_by_client(echoed, hello.ticket))
        return bool(echoed) and self._bound.get(echoed) == key

    def _chosen_by_client(self, session: bytes, ticket: bytes) -> bool:
        """Whether a session id that came with a ticket is the client's own: none, the
        ticket's SHA-256 (OpenSSL's and BoringSSL's), or one no server gave lately and none
        still bound (final attack pass: one bound to another key, older than `SEEN_FOR`,
        passed for the client's)."""
        return session not in self._bound and (not session or session[1:] == ticket[1:] or (
            self._given.complete and session not in self._given))

    def _forget(self, credential: bytes) -> None:
        key = self._bound.pop(credential, None)
        if key is not None:
            held = self._by_client[key[:2]]
            del held[credential]
            if not held:
                del self._by_client[key[:2]]


class Resumption:
    """A TLS hello's answer from the server, for `relay.Relay.inspect_inbound`: `answer` tells
    it (`sniff.server_answer`), with whether a session it resumes was made for `key`
    (`vouched`); `follow` says how its records are followed: after a full handshake or a
    vouched resumption each header is judged for a renegotiation, and the session they make
    is bound to `key` (`_bind`); after a resumption not vouched for, none of them goes."""

    def __init__(self, sessions: TlsSessions, key: Key, hello: Sniffed) -> None:
        self.sessions = sessions
        self.key = key
        self.hello = hello
        self.vouched = False

    def answer(self, seen: bytes) -> ServerAnswer | None:
        """What the server's bytes so far answer (None: not known yet)."""
        told = server_answer(seen)
        if told is ServerAnswer.RESUMED:
            self.vouched = self.sessions.vouches(self.key, self.hello, echoed_session(seen))
        return told

    def follow(self, told: ServerAnswer) -> RecordWatch | _NotVouched | None:
        """How the server's records are followed from the answer's first byte on."""
        resumed = told is ServerAnswer.RESUMED
        if told is ServerAnswer.FULL or (resumed and self.vouched):
            return RecordWatch(partial(self._bind, resumed))
        return _NOT_VOUCHED if resumed else None

    def _bind(self, resumed: bool, credential: bytes) -> None:
        """Bind what the server's records say resumes the session made, but a session id the
        client chose: the one a resumption echoes (attack pass, 2026-12-06: a ticket's
        resumption echoing the id of a session made for a name denied since, which guardd
        had forgotten, bound that session to an allowed name), or one a full handshake echoes
        back."""
        if is_session_id(credential) and (resumed or credential == self.hello.session):
            return
        self.sessions.bind(credential, self.key)


class _NotVouched:
    """The server's records after a resumption not vouched for: none goes (the client would
    take the server's flight for a session resumed; guardd cuts the connection)."""

    reads = False

    def __call__(self, header: bytes) -> str:
        return "a TLS 1.2 session resumed that guardd did not see made for this name"

    def read(self, data: bytes) -> None:
        raise AssertionError("no record of a resumption not vouched for is read")


_NOT_VOUCHED = _NotVouched()
