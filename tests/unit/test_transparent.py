"""The transparent listener's refusals before any rule judged: each names the destination the
agent's connection was redirected from (its original destination)."""

from __future__ import annotations

import asyncio
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


def refused(monkeypatch: pytest.MonkeyPatch, client_allowed: bool = True,
            unmapped: bool = False) -> list[dict[str, Any]]:
    """The records of one connection redirected from the metadata address, from a client
    refused at accept (not `client_allowed`) or that maps to no principal (`unmapped`)."""
    monkeypatch.setattr(transparent_server, "original_destination", lambda sock: METADATA)
    audit = ListAudit()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        guard = Guard(Policy.from_text(POLICY), audit, Metrics(process=False))
        principals = single(guard, FakeResolver())  # type: ignore[arg-type]
        if unmapped:
            monkeypatch.setattr(principals, "of", lambda *_, **__: None)
        listener = TransparentListener(principals, ProxySettings(
            TunnelSettings(handshake_timeout=2), 8, 8, turns=Turns(CpuShares())),
            lambda _: client_allowed, Deadlines(loop, resolution=0.01), Reactor(loop))
        bound = listener.listen(Endpoint("127.0.0.1", 0))
        try:
            reader, writer = await asyncio.open_connection(bound.host, bound.port)
            try:
                await asyncio.wait_for(reader.read(), 5)
            except ConnectionError:
                pass
            writer.close()
        finally:
            listener.close()
            await listener.drain(1)

    on_uvloop(scenario)
    return audit.records


@pytest.mark.parametrize("case", ["not-a-client", "unmapped"])
def test_a_refusal_before_any_rule_names_the_redirected_destination(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Attack pass (2026-12-06): a client outside `clients` (refused at accept), or one that
    maps to no principal, probed the metadata address through the redirect, and the trail
    never named it: those refusals were recorded without a target."""
    records = refused(monkeypatch, client_allowed=case != "not-a-client",
                      unmapped=case == "unmapped")
    assert [(r["effect"], r.get("target")) for r in records] == [
        ("deny", "169.254.169.254:80")], records


def test_a_connection_evicted_in_its_handshake_is_recorded_with_its_destination(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every slot taken, the oldest connection still in its handshake (here: silent, to an
    address no rule allows, its first bytes awaited) gives its slot up; its record named no
    destination either (the last note's open item)."""
    monkeypatch.setattr(transparent_server, "original_destination", lambda sock: METADATA)
    audit = ListAudit()

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        guard = Guard(Policy.from_text(POLICY), audit, Metrics(process=False))
        principals = single(guard, FakeResolver())  # type: ignore[arg-type]
        listener = TransparentListener(principals, ProxySettings(  # (one slot in all)
            TunnelSettings(handshake_timeout=2), 1, 2, turns=Turns(CpuShares())),
            lambda _: True, Deadlines(loop, resolution=0.01), Reactor(loop))
        bound = listener.listen(Endpoint("127.0.0.1", 0))
        try:
            first = await asyncio.open_connection(bound.host, bound.port)
            await asyncio.sleep(0.1)  # (waiting for its first bytes)
            second = await asyncio.open_connection(bound.host, bound.port)
            await asyncio.sleep(0.1)
            for _, writer in (first, second):
                writer.close()
        finally:
            listener.close()
            await listener.drain(1)

    on_uvloop(scenario)
    evicted = [r for r in audit.records if "evicted" in str(r["reason"])]
    assert [r.get("target") for r in evicted] == ["169.254.169.254:80"], [
        r["reason"] for r in audit.records]
