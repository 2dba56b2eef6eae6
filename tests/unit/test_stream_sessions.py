"""guardd.stream.sessions: TLS 1.2 sessions bound to what their handshake was judged for, with
real flights from Python's ssl (no network) and hand-made credentials for the odd cases."""

from __future__ import annotations

import pytest

from guardd.stream.sessions import SEEN_FOR, Key, Resumption, TlsSessions
from guardd.stream.sniff import Kind, RecordWatch, ServerAnswer, Sniffed, sniff
from tests.unit.test_stream_sniff import tls12_session_flights

DOCS: Key = (None, "127.0.0.1", "127.0.0.9", 443, "docs.test")
OTHER_NAME: Key = DOCS[:4] + ("evil.test",)
OTHER_CLIENT: Key = (None, "127.0.0.2") + DOCS[2:]


def hello(session: bytes = b"", ticket: bytes = b"") -> Sniffed:
    """A hello naming docs.test that offers this session id and ticket (credentials)."""
    return Sniffed(Kind.TLS, sni="docs.test", session=session, ticket=ticket)


def watched_long(clock: list[float] | None = None, **sizes: int) -> TlsSessions:
    """A table whose watch for the ids servers gave began `SEEN_FOR` ago (by `clock`, a
    fake one at 0 unless given), so it knows every one of them (see
    `test_after_a_start_only_ids_a_client_provably_chose_go_with_a_ticket`)."""
    now = clock or [0.0]
    began = now[0]
    now[0] -= SEEN_FOR
    sessions = TlsSessions(clock=lambda: now[0], **sizes)
    now[0] = began
    return sessions


@pytest.mark.parametrize("tickets", [True, False])
def test_a_session_resumes_only_under_the_key_it_was_made_for(tickets: bool) -> None:
    """Attack pass (2026-12-06): OpenSSL serves a resumed TLS 1.2 session's name whatever the
    hello's SNI. A resumption passes when guardd saw the session made (its session id, or its
    ticket) on a connection judged for the same client, server and SNI; not for another name
    (evil.test resuming docs.test's: the name served is docs.test's, unjudged), not for
    another client, and not one never seen."""
    full, again, resumed = tls12_session_flights(tickets)
    for made_for, key, vouched in ((DOCS, DOCS, True), (DOCS, OTHER_NAME, False),
                                   (DOCS, OTHER_CLIENT, False), (None, DOCS, False)):
        sessions = TlsSessions()
        if made_for is not None:
            made = Resumption(sessions, made_for, hello())
            watch = made.follow(ServerAnswer.FULL)
            assert watch is not None and watch.skip(full) == ("", 0)
        offered = sniff(again)
        assert offered is not None
        resumption = Resumption(sessions, key, offered)
        assert resumption.answer(resumed) is ServerAnswer.RESUMED
        assert resumption.vouched is vouched, (made_for, key)
        assert isinstance(resumption.follow(ServerAnswer.RESUMED), RecordWatch) is vouched
        # (a full handshake is always followed; a retry, or TLS 1.3, never)
        assert isinstance(resumption.follow(ServerAnswer.FULL), RecordWatch)
        assert resumption.follow(ServerAnswer.OTHER) is None


def test_a_resumption_binds_the_tickets_it_brings_never_the_session_id_it_echoes() -> None:
    """Attack pass (2026-12-06): a ticket's resumption echoes the session id the client chose.
    Bound, it let a client name the id of a session made for a name denied since (once guardd
    forgot it: 2,100 handshakes, a server of its own sending 2,100 tickets, or a restart) on a
    ticket resumption under an allowed name, then resume that session by its id there: the
    denied name was served. Only the server's own ids are bound: a full handshake's (not one
    the hello offered), and tickets. A resumption not vouched for is not heard at all."""
    full, again, resumed = tls12_session_flights(tickets=True)
    sessions = TlsSessions()
    watch = Resumption(sessions, DOCS, hello()).follow(ServerAnswer.FULL)
    assert watch is not None and watch.skip(full) == ("", 0) and len(sessions) == 1
    offered = sniff(again)
    assert offered is not None and offered.session and offered.ticket
    resumption = Resumption(sessions, DOCS, offered)
    assert resumption.answer(resumed) is ServerAnswer.RESUMED and resumption.vouched
    watch = resumption.follow(ServerAnswer.RESUMED)
    assert isinstance(watch, RecordWatch) and watch.skip(resumed) == ("", 0)
    assert not sessions.vouches(DOCS, hello(offered.session), offered.session)
    echoing = Resumption(sessions, DOCS, hello(b"s" + bytes(32)))
    bound = echoing.follow(ServerAnswer.FULL)
    assert isinstance(bound, RecordWatch)
    server_hello = b"\x02\x00\x00\x46\x03\x03" + bytes(32) + b"\x20" + bytes(32) + bytes(3)
    assert bound.skip(b"\x16\x03\x03\x00\x4a" + server_hello) == ("", 0)
    assert not sessions.vouches(DOCS, hello(b"s" + bytes(32)), b"s" + bytes(32))
    cut = Resumption(sessions, OTHER_NAME, offered)
    assert cut.answer(resumed) is ServerAnswer.RESUMED and not cut.vouched
    check = cut.follow(ServerAnswer.RESUMED)
    assert check is not None and "did not see made" in check(resumed[:5]) and not check.reads


def test_what_a_server_resumes_by_must_be_bound_to_the_key() -> None:
    """A ticket's resumption needs the ticket bound to the key, and the session id it came
    with, if guardd saw it made, bound to the same (a server that cannot read the ticket may
    fall back to its cache); without a ticket, the session id echoed, bound to the key; a
    server that echoes what the hello did not offer resumes nothing guardd can vouch for."""
    sessions = watched_long()
    sessions.bind(b"tdocs", DOCS)
    sessions.bind(b"sdocs", DOCS)
    sessions.bind(b"sevil", OTHER_NAME)
    assert sessions.vouches(DOCS, hello(b"sclient", b"tdocs"), b"sclient")
    assert sessions.vouches(DOCS, hello(b"", b"tdocs"), b"")
    assert sessions.vouches(DOCS, hello(b"sdocs", b"tdocs"), b"sdocs")
    assert not sessions.vouches(DOCS, hello(b"sevil", b"tdocs"), b"sevil")
    assert not sessions.vouches(DOCS, hello(b"sdocs", b"tnever"), b"sdocs")
    assert not sessions.vouches(OTHER_NAME, hello(b"sclient", b"tdocs"), b"sclient")
    assert sessions.vouches(DOCS, hello(b"sdocs"), b"sdocs")
    assert not sessions.vouches(DOCS, hello(b"sevil"), b"sevil")
    assert not sessions.vouches(DOCS, hello(b"snever"), b"snever")
    assert not sessions.vouches(DOCS, hello(), b"")
    assert not sessions.vouches(DOCS, hello(b"sclient"), b"sdocs")
    assert not sessions.vouches(DOCS, hello(b"sclient", b"tdocs"), b"sdocs")


def test_a_session_id_a_server_gave_stays_known_when_its_binding_is_forgotten() -> None:
    """Second attack pass (2026-12-06): GnuTLS looks a hello's session id up in its cache
    before its ticket. A client made guardd forget the id of a session made for a name (2,100
    handshakes in 7 s), spent that name's rate limit, and offered the id with a ticket bound to
    another name: vouched, and the server resumed the first name's session. The ids servers
    gave stay known (`SEEN_FOR`, two to four days, in little room): offered with a ticket, one
    is vouched for only where it is bound; a client's own (Go's, Java's: random) still goes."""
    clock = [0.0]
    sessions = watched_long(clock, most=4, per_client=2)
    sessions.bind(b"sratelimited", OTHER_NAME)
    for number in range(10):
        sessions.bind(b"s%d" % number, OTHER_NAME)
    sessions.bind(b"tdocs", DOCS)
    assert len(sessions) == 2
    assert not sessions.vouches(DOCS, hello(b"sratelimited", b"tdocs"), b"sratelimited")
    assert sessions.vouches(DOCS, hello(b"sclient", b"tdocs"), b"sclient")
    assert not sessions.vouches(DOCS, hello(b"s3", b"tdocs"), b"s3")
    for later, known in ((SEEN_FOR - 1, True), (1.5 * SEEN_FOR, True), (2 * SEEN_FOR, False)):
        clock[0] = later  # (kept two to four days: long past any server's session cache,
        #                    RFC 5246 F.1.4 says a day)
        assert sessions.vouches(DOCS, hello(b"sratelimited", b"tdocs"), b"sratelimited") \
            is not known, later
    sessions.bind(b"sfresh", OTHER_NAME)
    clock[0] = 10 * SEEN_FOR  # (an idle stretch: what came before it is all gone)
    assert sessions.vouches(DOCS, hello(b"s3", b"tdocs"), b"s3")
    # (final attack pass: an id still bound to another key is a server's, however old)
    assert not sessions.vouches(DOCS, hello(b"sfresh", b"tdocs"), b"sfresh")


def test_after_a_start_only_ids_a_client_provably_chose_go_with_a_ticket() -> None:
    """Review: the ids servers gave are kept in memory, so a restart forgot them all, and the
    second attack pass's resumption passed again. Until guardd has watched for `SEEN_FOR`
    (two days: longer than servers keep a session id), a ticket's resumption passes with an
    id bound to its key, none, or the ticket's
    SHA-256 (what OpenSSL and BoringSSL clients send: curl, Node, Python); another (Go's,
    Java's random ones) is cut, as one a server may have given before the start."""
    clock = [0.0]
    sessions = TlsSessions(clock=lambda: clock[0])
    sessions.bind(b"tdocs", DOCS)
    assert not sessions.vouches(DOCS, hello(b"sratelimited", b"tdocs"), b"sratelimited")
    assert sessions.vouches(DOCS, hello(b"sdocs", b"tdocs"), b"sdocs")  # (the ticket's own)
    assert sessions.vouches(DOCS, hello(b"", b"tdocs"), b"")
    clock[0] = SEEN_FOR - 1
    assert not sessions.vouches(DOCS, hello(b"sratelimited", b"tdocs"), b"sratelimited")
    clock[0] = SEEN_FOR
    assert sessions.vouches(DOCS, hello(b"sratelimited", b"tdocs"), b"sratelimited")


def test_the_table_is_bounded_in_all_and_for_each_client() -> None:
    """Memory bounded: past its share, one client's handshakes push out its own oldest
    sessions; below it, past the whole table's size, the oldest of all go (so at most its
    share of another's). A session forgotten is
    cut when resumed, as one never seen (the client makes a new one)."""
    sessions = TlsSessions(most=6, per_client=3)
    sessions.bind(b"sother", OTHER_CLIENT)
    for number in range(10):
        sessions.bind(b"s%d" % number, DOCS)
    assert len(sessions) == 4
    assert sessions.vouches(OTHER_CLIENT, hello(b"sother"), b"sother")
    assert [sessions.vouches(DOCS, hello(b"s%d" % n), b"s%d" % n) for n in range(10)] == \
        [False] * 7 + [True] * 3
    for number in range(4):
        sessions.bind(b"o%d" % number, (None, f"10.0.0.{number}") + DOCS[2:])
    assert len(sessions) == 6
    assert not sessions.vouches(OTHER_CLIENT, hello(b"sother"), b"sother")
    sessions.bind(b"s9", OTHER_NAME)  # (bound again: the last binding holds, counted once)
    assert not sessions.vouches(DOCS, hello(b"s9"), b"s9") and len(sessions) == 6
