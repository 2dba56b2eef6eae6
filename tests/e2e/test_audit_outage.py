"""A trail that cannot be written fails closed (issue 10): the real daemon with its audit file on
/dev/full (every write fails with ENOSPC) answers no DNS query and opens no connection, denied or
allowed, and says why in its log and metrics.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from tests.e2e.harness import LOAD_POLICY, Destination, Guardd, Upstream, dns_query

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")


@pytest.fixture(scope="module")
def guardd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Guardd, int]]:
    directory = tmp_path_factory.mktemp("outage")
    (directory / "audit").mkdir()
    (directory / "audit" / "audit.jsonl").symlink_to("/dev/full")
    policy = directory / "policy.yaml"
    policy.write_text(LOAD_POLICY)
    upstream = Upstream(directory, {"api.test": ["A 192.0.2.10"], "x.ngrok.io": ["A 192.0.2.9"]})
    echo = Destination(directory, "echo")
    daemon = Guardd.launch(directory, "--policy", str(policy), "--upstream", upstream.address,
                           "--dns", "127.0.0.1:0", "--socks", "127.0.0.1:0",
                           "--metrics", "127.0.0.1:0")
    try:
        yield daemon, echo.port
    finally:
        daemon.stop()
        echo.stop()
        upstream.stop()


@pytest.mark.parametrize("name", ["api.test", "x.ngrok.io"], ids=["allowed", "denied"])
def test_no_dns_answer_leaves_unrecorded(guardd: tuple[Guardd, int], name: str) -> None:
    daemon, _ = guardd
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.5)
        sock.sendto(dns_query(name, 7), daemon.dns[0])
        with pytest.raises(TimeoutError):
            sock.recvfrom(4096)


def test_no_connection_opens_unrecorded(guardd: tuple[Guardd, int]) -> None:
    daemon, echo = guardd
    with socket.create_connection(daemon.socks[0], timeout=5) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"  # the method choice decides nothing
        sock.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + echo.to_bytes(2, "big"))
        assert sock.recv(10) == b""  # closed without a reply: no SUCCEEDED unrecorded


def test_the_outage_is_logged_and_counted(guardd: tuple[Guardd, int]) -> None:
    daemon, _ = guardd
    samples = daemon.scrape()
    assert samples["guardd_audit_write_errors_total"] > 0
    assert samples["guardd_audit_records_total"] == 0
    assert "cannot write the audit trail" in daemon.log_text()
    assert "Traceback" not in daemon.log_text()
