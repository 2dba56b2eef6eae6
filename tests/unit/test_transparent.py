"""The transparent listener's refusals before any rule judged: each names the destination the
agent's connection was redirected from (its original destination)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from guardd.guard import Guard
from guardd.metrics import Metrics
from guardd.net import Endpoint
from guardd.policy.engine import Policy
from guardd.principals import single
from guardd.shares import CpuShares
from guardd.stream.deadlines import Deadlines
from guardd.stream.listener import ProxySettings
from guardd.stream.reactor import Reactor
from guardd.stream.tunnel import TunnelSettings
from guardd.transparent import server as transparent_server
from guardd.transparent.server import TransparentListener
from guardd.turns import Turns
from tests.unit.fakes import ListAudit
from tests.unit.test_socket_io import on_uvloop
from tests.unit.test_tunnel import FakeResolver

POLICY = 'version: "1.0"\nrules:\n  - {id: all, action: "*", domain: "*", effect: allow}\n'
METADATA = ("169.254.169.254", 80)


def records_of(monkeypatch: pytest.MonkeyPatch,
               clients: Callable[[Endpoint], Awaitable[None]], client_allowed: bool = True,
               unmapped: bool = False, slots: int = 8) -> list[dict[str, Any]]:
    """The records of what `clients` do against a transparent listener with `slots` connection
    slots, every connection redirected from the metadata address; its client refused at
    accept (not `client_allowed`) or mapping to no principal (`unmapped`)."""
    monkeypatch.setattr(transparent_server, "original_destination", lambda sock: METADATA)
    audit = ListAudit()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        guard = Guard(Policy.from_text(POLICY), audit, Metrics(process=False))
        principals = single(guard, FakeResolver())  # type: ignore[arg-type]
        if unmapped:
            monkeypatch.setattr(principals, "of", lambda *_, **__: None)
        listener = TransparentListener(principals, ProxySettings(
            TunnelSettings(handshake_timeout=2), slots, 8, turns=Turns(CpuShares())),
            lambda _: client_allowed, Deadlines(loop, resolution=0.01), Reactor(loop))
        try:
            await clients(listener.listen(Endpoint("127.0.0.1", 0)))
        finally:
            listener.close()
            await listener.drain(1)

    on_uvloop(scenario)
    return audit.records


async def one_to_its_end(bound: Endpoint) -> None:
    reader, writer = await asyncio.open_connection(bound.host, bound.port)
    try:
        await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        pass
    writer.close()


@pytest.mark.parametrize("case", ["not-a-client", "unmapped"])
def test_a_refusal_before_any_rule_names_the_redirected_destination(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass (2026-12-06): a client outside `clients` (refused at accept), or one that
    maps to no principal, probed the metadata address through the redirect, and the trail
    never named it: those refusals were recorded without a target."""
    records = records_of(monkeypatch, one_to_its_end, client_allowed=case != "not-a-client",
                         unmapped=case == "unmapped")
    assert [(r["effect"], r.get("target")) for r in records] == [
        ("deny", "169.254.169.254:80")], records


def test_a_connection_evicted_in_its_handshake_is_recorded_with_its_destination(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slot taken, the oldest connection still in its handshake (here: silent, to an
    address no rule allows, its first bytes awaited) gives its slot up; its record named no
    destination either (the last note's open item)."""
    async def two(bound: Endpoint) -> None:
        first = await asyncio.open_connection(bound.host, bound.port)
        await asyncio.sleep(0.1)  # (waiting for its first bytes)
        second = await asyncio.open_connection(bound.host, bound.port)
        await asyncio.sleep(0.1)
        for _, writer in (first, second):
            writer.close()

    records = records_of(monkeypatch, two, slots=1)
    evicted = [r for r in records if "evicted" in str(r["reason"])]
    assert [r.get("target") for r in evicted] == ["169.254.169.254:80"], [
        r["reason"] for r in records]


def test_a_silent_connection_to_an_address_no_rule_allows_says_it_sent_nothing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Session 55's transparent attack (Info): a client that sent nothing and half-closed its
    side was refused rightly, its reason ending at a colon ("... named no server: "): the trail
    did not say why. It says the client sent nothing, as a tunnel's refusal does."""
    async def silent(bound: Endpoint) -> None:
        reader, writer = await asyncio.open_connection(bound.host, bound.port)
        writer.write_eof()
        try:
            await asyncio.wait_for(reader.read(), 5)
        except ConnectionError:
            pass
        writer.close()

    records = records_of(monkeypatch, silent)
    assert [r["reason"] for r in records if r.get("target") == "169.254.169.254:80"][-1] \
        .endswith("named no server: the client sent nothing"), [r["reason"] for r in records]
