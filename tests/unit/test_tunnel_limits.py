"""Rate limits across the steps of a connect: each rule charged once per connection, before
its address is tried, and only the charge of an address not connected to given back (exactly
that one); a client over its limit sends no name upstream either. Written as attacks by an
independent review, each failed on the code before its fix."""
from __future__ import annotations

import asyncio
import errno
import ipaddress
from collections.abc import Callable

from guardd.stream.tunnel import Opened, Refused
from tests.unit.test_guard import Clock
from tests.unit.test_stream_sniff import real_hello
from tests.unit.test_tunnel import CLIENT, FakeIO, FakeResolver, FakeSocket, Rig

IP = ipaddress.ip_address


class LateFailIO(FakeIO):
    """`late` addresses wait for `gate`, then refuse (a SYN answered by RST after retries)."""

    def __init__(self, late: set[str]) -> None:
        super().__init__()
        self.late = late

    async def connect(self, ip: object, port: int,
                      under_way: Callable[[tuple[str, int]], None]) -> FakeSocket:
        if str(ip) in self.late:
            self.attempts.append(str(ip))
            await self.gate.wait()
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        return await super().connect(ip, port, under_way)


def rig_with(policy: str, zone: dict[str, list[str]], io: FakeIO | None = None,
             clock: Clock | None = None) -> Rig:
    return Rig(policy=policy, resolver=FakeResolver(zone=zone), io=io, clock=clock)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


# --- a refund takes back exactly the charge the connect made ------------------------------

SPLIT = """\
version: "1.0"
rules:
  - {id: v6, action: network.request, ip: "2001:db8::/32", effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
  - {id: v4, action: network.request, domain: multi.test, ip: "192.0.2.0/24", effect: allow}
"""


async def test_a_refund_never_erases_another_connects_charge() -> None:
    """A (multi.test) charges v6 at t=0 for 2001:db8::1, which refuses only at t=6; B (by
    address, rule v6) is charged at t=5; A then opens on v4 and gives its own v6 charge back.
    Had the newest allowance (B's, t=5) gone instead, two more v6 connects would pass at
    t=61..62: three within (2, 62], limit 2 a minute."""
    clock = Clock()
    io = LateFailIO({"2001:db8::1"})
    rig = rig_with(SPLIT, {"multi.test": ["2001:db8::1", "192.0.2.3"]}, io, clock)
    a = rig.tunnel()
    opening = asyncio.create_task(a.open("multi.test", 443))
    await settle()
    assert io.attempts == ["2001:db8::1"]
    clock.now += 5
    b = rig.tunnel()
    assert isinstance(await b.open("2001:db8::2", 443, IP("2001:db8::2")), Opened)
    clock.now += 1
    io.gate.set()
    assert isinstance(await opening, Opened)   # failed over to v4: v6 refunded
    clock.now += 55                              # t=61: A's t=0 charge is out of the window
    c, d = rig.tunnel(), rig.tunnel()
    assert isinstance(await c.open("2001:db8::2", 443, IP("2001:db8::2")), Opened)
    clock.now += 1                               # t=62: B (t=5) and C (t=61) are in the window
    result = await d.open("2001:db8::2", 443, IP("2001:db8::2"))
    for t in (a, b, c, d):
        t.close()
    assert isinstance(result, Refused), "a third v6 connect within a minute passed"


SPLIT_SHORT = SPLIT.replace('maxRequests: 2, window: "1 minute"', 'maxRequests: 1, window: "5 seconds"')


async def test_a_refund_of_an_expired_charge_never_erases_a_live_one() -> None:
    """Window 5 s (shorter than socksTimeout.connect, 10 s): A's charge (t=0) has expired when
    its attempt fails at t=7, so its refund takes nothing back; had it removed B's live charge
    (t=6), C would pass at t=7: two v6 connects within a second, limit 1 per 5 s."""
    clock = Clock()
    io = LateFailIO({"2001:db8::1"})
    rig = rig_with(SPLIT_SHORT, {"multi.test": ["2001:db8::1", "192.0.2.3"]}, io, clock)
    a = rig.tunnel()
    opening = asyncio.create_task(a.open("multi.test", 443))
    await settle()
    clock.now += 6
    b = rig.tunnel()
    assert isinstance(await b.open("2001:db8::2", 443, IP("2001:db8::2")), Opened)
    clock.now += 1
    io.gate.set()
    assert isinstance(await opening, Opened)
    c = rig.tunnel()
    result = await c.open("2001:db8::2", 443, IP("2001:db8::2"))
    for t in (a, b, c):
        t.close()
    assert isinstance(result, Refused), "B's live charge was refunded for A's expired one"


# --- a failed attempt and the provisional address opened, under one rule: one charge ------

MIXED = """\
version: "1.0"
rules:
  - {id: v4-no-post, action: network.request, domain: mixed.test, ip: "192.0.2.0/24",
     method: POST, effect: deny}
  - {id: site, action: network.request, domain: mixed.test, effect: allow,
     rateLimit: {maxRequests: 2, window: "1 minute"}}
"""
GET_MIXED = b"GET / HTTP/1.1\r\nHost: mixed.test\r\n\r\n"


async def test_one_connection_is_charged_once_to_its_rule() -> None:
    rig = rig_with(MIXED, {"mixed.test": ["2001:db8::7", "192.0.2.7"]},
                   FakeIO({"2001:db8::7": OSError(errno.ECONNREFUSED, "Connection refused")}))
    rig.io.answering()
    _, result = await rig.through("mixed.test", 80, early=GET_MIXED)
    assert isinstance(result, Opened) and rig.io.attempts == ["2001:db8::7", "192.0.2.7"]
    assert rig.records[-1]["effect"] == "allow" and rig.records[-1]["matchedRule"] == "site"
    # one connection, so one of the two allowances is left
    assert rig.guard.limiter.retry_after("site", CLIENT, 60.0) == 0, "charged twice"


# --- provisional attempts are charged before they reach the destination ------------------

SITE = """\
version: "1.0"
rules:
  - {id: no-post, action: network.request, domain: "*.site.test", method: POST, effect: deny}
  - {id: site, action: network.request, domain: "*.site.test", effect: allow,
     rateLimit: {maxRequests: 1, window: "1 minute"}}
"""


async def test_parallel_provisional_connects_over_the_limit_never_reach_the_destination(
) -> None:
    rig = rig_with(SITE, {"a.site.test": ["192.0.2.9"]}, FakeIO({"192.0.2.9": "wait"}))
    tunnels = [rig.tunnel() for _ in range(5)]
    opening = [asyncio.create_task(t.open("a.site.test", 80)) for t in tunnels]
    await settle()
    rig.io.gate.set()
    await asyncio.gather(*opening)
    for t in tunnels:
        t.close()   # abandoned: recorded, never charged
    assert rig.io.attempts == ["192.0.2.9"], f"{len(rig.io.attempts)} handshakes, limit 1"


# --- a Host without port on a port other than 80 is no second charge ----------------------

LIMITED = """\
version: "1.0"
rules:
  - {id: limited, action: network.request, domain: limited.test, effect: allow,
     rateLimit: {maxRequests: 1, window: "1 minute"}}
"""


async def test_a_host_without_port_does_not_spend_a_second_allowance() -> None:
    rig = rig_with(LIMITED, {"limited.test": ["192.0.2.4"]})
    rig.io.incoming.put_nowait(b"")
    rig.io.answering()
    _, result = await rig.through("limited.test", 8080,
                                  early=b"GET / HTTP/1.1\r\nHost: limited.test\r\n\r\n")
    assert isinstance(result, Opened)
    assert rig.records[-1]["effect"] == "allow", rig.records[-1]["reason"]


# --- a CONNECT over its limit sends no name upstream ----------------------------------------

WILD = """\
version: "1.0"
rules:
  - {id: corp, action: "*", domain: "*.corp.test", effect: allow,
     rateLimit: {maxRequests: 1, window: "1 minute"}}
"""


async def test_an_exhausted_limit_refuses_before_anything_is_resolved() -> None:
    zone = {f"n{i}.corp.test": ["192.0.2.4"] for i in range(5)}
    rig = rig_with(WILD, zone)
    rig.io.incoming.put_nowait(b"")
    _, first = await rig.through("n0.corp.test")
    assert isinstance(first, Opened)
    for i in range(1, 5):   # each name (a DNS tunnel's payload) goes upstream anyway
        _, result = await rig.through(f"n{i}.corp.test")
        assert isinstance(result, Refused)
    assert rig.resolver.asked == ["n0.corp.test"], rig.resolver.asked


# --- the pending record of a connect that only a method rule could allow --------------------

GET_ONLY = """\
version: "1.0"
rules:
  - {id: reads, action: network.request, domain: ro.test, method: GET, effect: allow}
"""


async def test_a_pending_record_never_says_allow_by_a_deny() -> None:
    rig = rig_with(GET_ONLY, {"ro.test": ["192.0.2.8"]})
    rig.io.answering()
    _, result = await rig.through("ro.test", 80, early=b"GET / HTTP/1.1\r\nHost: ro.test\r\n\r\n")
    assert isinstance(result, Opened)
    pending, final = rig.records
    assert (final["effect"], final["matchedRule"]) == ("allow", "reads")
    assert (pending["effect"], pending["matchedRule"]) != ("allow", "default-deny"), pending


# --- every name guardd looks up for a client is charged ---------------------------------------

async def test_names_that_resolve_to_nothing_are_charged_too() -> None:
    """A CONNECT to a name that does not exist sends it upstream all the same (a DNS tunnel's
    payload): the lookup is charged to the rule that let guardd resolve it, so a client over
    the limit sends no more names."""
    rig = rig_with(WILD, {})
    for i in range(5):
        _, result = await rig.through(f"chunk{i}.corp.test")
        assert isinstance(result, Refused)
    assert rig.resolver.asked == ["chunk0.corp.test"]
    assert "rate limit of rule corp exceeded" in str(rig.records[-1]["reason"])


CLAIMS = """\
version: "1.0"
rules:
  - {id: corp, action: "*", domain: "*.corp.test", effect: allow,
     rateLimit: {maxRequests: 1, window: "1 minute"}}
  - {id: open, action: network.request, domain: open.test, effect: allow}
"""


async def test_a_claimed_name_over_its_limit_is_never_looked_up() -> None:
    """An SNI under a limited rule, behind a CONNECT to an unlimited name: each claim's lookup
    is charged, so fronting unique names cannot carry them upstream past the limit."""
    zone = {"open.test": ["192.0.2.5"], **{f"s{i}.corp.test": ["127.0.0.1"] for i in range(4)}}
    rig = rig_with(CLAIMS, zone)
    for i in range(4):
        _, result = await rig.through("open.test", 443, early=real_hello(f"s{i}.corp.test"))
        assert isinstance(result, Opened) and rig.records[-1]["effect"] == "deny"
    assert rig.resolver.asked == ["open.test", "s0.corp.test"] + ["open.test"] * 3


# --- a rule given back is no longer paid for -----------------------------------------------

MULTI = """\
version: "1.0"
rules:
  - {id: v6, action: network.request, domain: "*.multi.test", ip: "2001:db8::/32", effect: allow,
     rateLimit: {maxRequests: 1, window: "1 minute"}}
  - {id: v4, action: network.request, domain: "*.multi.test", ip: "192.0.2.0/24", effect: allow}
"""


async def test_a_claim_under_a_refunded_rule_is_charged() -> None:
    """The IPv6 address (rule v6) fails, the IPv4 one (v4) is connected and v6 given back; an
    SNI judged under v6 is then charged like any claim: one a minute, not one a connect."""
    zone = {"a.multi.test": ["2001:db8::1", "192.0.2.3"], "b.multi.test": ["2001:db8::2"]}
    rig = rig_with(MULTI, zone, FakeIO({"2001:db8::1": OSError(errno.ENETUNREACH,
                                                                "Network is unreachable")}))
    hello = real_hello("b.multi.test")
    effects = []
    for _ in range(3):
        rig.io.incoming.put_nowait(b"")
        await rig.through("a.multi.test", 443, early=hello)
        effects.append((rig.records[-1]["effect"], rig.records[-1]["matchedRule"]))
    assert effects == [("allow", "v6"), ("deny", "v6"), ("deny", "v6")]


# --- a lookup's charge is the rule's DNS query, and never given back -----------------------

PORT_LIMITED = """\
version: "1.0"
rules:
  - {id: limited, action: "*", domain: ["lim.test", "*.lim.test"], port: 443, effect: allow,
     rateLimit: {maxRequests: 3, window: "1 minute"}}
  - {id: tests, action: "*", domain: "*.test", effect: allow}
"""


async def test_a_lookup_under_one_rule_stays_charged_when_another_rule_connects() -> None:
    """Attack pass: the lookup is allowed by `limited` (its DNS view), the connect to port 80
    by `tests`; giving back the charges of rules other than the one connected to gave back the
    lookup's too, and every unique name went upstream (a DNS tunnel past the limit of 3)."""
    zone = {f"q{i}.lim.test": ["192.0.2.11"] for i in range(8)}
    rig = rig_with(PORT_LIMITED, zone)
    results = []
    for i in range(8):
        rig.io.incoming.put_nowait(b"")
        results.append(isinstance((await rig.through(f"q{i}.lim.test", 80))[1], Opened))
    assert rig.resolver.asked == [f"q{i}.lim.test" for i in range(3)], rig.resolver.asked
    assert results == [True] * 3 + [False] * 5
    assert "rate limit of rule limited exceeded" in str(rig.records[-1]["reason"])


SPLIT_ACTIONS = """\
version: "1.0"
rules:
  - {id: lim-dns, action: dns.query, domain: "*.lim.test", effect: allow,
     rateLimit: {maxRequests: 3, window: "1 minute"}}
  - {id: lim-net, action: network.request, domain: "*.lim.test", effect: allow}
"""


async def test_a_lookup_for_a_connect_spends_the_rules_dns_queries() -> None:
    """Attack pass: a client whose queries `lim-dns` refuses (3 a minute, spent) went on
    sending unique names upstream through CONNECTs: guardd's lookup for it was counted apart
    from the client's own queries, under the rule's connects. It is the rule's DNS query."""
    zone = {f"s{i}.lim.test": ["192.0.2.11"] for i in range(6)}
    rig = rig_with(SPLIT_ACTIONS, zone)
    queried = [rig.guard.judge_query(f"d{i}.lim.test", "A", CLIENT).decision.allowed
               for i in range(4)]
    assert queried == [True] * 3 + [False]
    for i in range(6):
        _, result = await rig.through(f"s{i}.lim.test", 80)
        assert isinstance(result, Refused)
        assert "rate limit of rule lim-dns exceeded" in str(rig.records[-1]["reason"])
    assert rig.resolver.asked == []


CLAIMED_SPLIT = SPLIT_ACTIONS + \
    "  - {id: docs, action: network.request, domain: docs.test, effect: allow}\n"


async def test_each_name_claimed_on_one_connection_is_a_lookup_of_its_own() -> None:
    """Second attack pass: a lookup's charge was made once per connection, so every Host a
    followed connection's requests claimed after the first went upstream free: 25 unique
    names past a limit of 3."""
    zone = {"docs.test": ["192.0.2.5"], **{f"f{i}.lim.test": ["192.0.2.5"] for i in range(8)}}
    rig = rig_with(CLAIMED_SPLIT, zone)
    rig.io.responses_scripted = True
    heads = b"".join(b"GET /%d HTTP/1.1\r\nHost: f%d.lim.test\r\n\r\n" % (i, i)
                     for i in range(8))
    for chunk in (heads, b""):
        rig.io.incoming.put_nowait(chunk)
    running = asyncio.ensure_future(rig.through("docs.test", 80))
    answered = 0
    for _ in range(50):  # the server answers each request that reached it
        await asyncio.sleep(0.01)
        if len(rig.io.forwarded) > answered:
            answered += 1
            rig.io.responses.put_nowait(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    rig.io.responses.put_nowait(b"")
    await asyncio.wait_for(running, 2)
    assert rig.resolver.asked == ["docs.test"] + [f"f{i}.lim.test" for i in range(3)]
    assert len(rig.io.forwarded) == 3


READS_LIMITED = """\
version: "1.0"
rules:
  - {id: reads, action: network.request, domain: ro.test, method: GET, effect: allow,
     rateLimit: {maxRequests: 1, window: "1 minute"}}
"""


async def test_a_connect_only_a_spent_method_rule_could_allow_never_reaches_the_destination(
) -> None:
    """Attack pass: a connect that only a `method` rule could allow opened before its first
    bytes decided and charged nothing, so a client past that rule's limit still got every
    TCP connection it asked for to the destination (each refused only at its first bytes)."""
    rig = rig_with(READS_LIMITED, {})
    rig.guard.resolved.remember(CLIENT, "ro.test", [IP("192.0.2.8")], 60)  # (its own lookup)
    rig.io.answering()
    _, first = await rig.through("192.0.2.8", 80,
                                 early=b"GET / HTTP/1.1\r\nHost: ro.test\r\n\r\n")
    assert isinstance(first, Opened) and rig.records[-1]["effect"] == "allow"
    for _ in range(3):  # by address: no lookup of guardd's to charge
        _, result = await rig.through("192.0.2.8", 80)
        assert isinstance(result, Refused)
        assert "rate limit of rule reads exceeded" in str(rig.records[-1]["reason"])
    assert rig.io.attempts == ["192.0.2.8"]


async def test_parallel_connects_only_a_spent_method_rule_could_allow_reach_it_once() -> None:
    """Final attack pass: ten connects at once, each sending nothing yet, all reached the
    destination of a rule allowing one a minute (nothing was charged before first bytes)."""
    rig = rig_with(READS_LIMITED, {}, FakeIO({"192.0.2.8": "wait"}))
    rig.guard.resolved.remember(CLIENT, "ro.test", [IP("192.0.2.8")], 60)
    tunnels = [rig.tunnel() for _ in range(5)]
    opening = [asyncio.create_task(t.open("192.0.2.8", 80)) for t in tunnels]
    await settle()
    rig.io.gate.set()
    results = await asyncio.gather(*opening)
    for t in tunnels:
        t.close()
    assert rig.io.attempts == ["192.0.2.8"], f"{len(rig.io.attempts)} handshakes, limit 1"
    assert sum(isinstance(r, Refused) for r in results) == 4
