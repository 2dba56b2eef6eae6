"""The README's first command: `scripts/run` starts guardd on loopback with the default policy."""

from __future__ import annotations

import os
from pathlib import Path

from tests.e2e.harness import ROOT, Guardd, Upstream, dig, free_port, require, run


def test_scripts_run_serves_the_default_policy(tmp_path: Path) -> None:
    upstream = Upstream(tmp_path, {"api.anthropic.com": ["A 192.0.2.10"]})
    ports = {name: free_port() for name in ("DNS", "SOCKS", "HTTP", "METRICS")}
    env = dict(os.environ, GUARDD_UPSTREAM=upstream.address, GUARDD_AUDIT_DIR=str(tmp_path / "audit"),
               **{f"GUARDD_{name}_PORT": str(port) for name, port in ports.items()})
    daemon = Guardd(tmp_path, [str(ROOT / "scripts" / "run")], tmp_path / "audit", env=env).start()
    try:
        assert daemon.dns == [("127.0.0.1", ports["DNS"])]
        assert daemon.socks == [("127.0.0.1", ports["SOCKS"])]
        assert daemon.http == [("127.0.0.1", ports["HTTP"])]
        assert daemon.metrics == ("127.0.0.1", ports["METRICS"])
        hints = daemon.log_text()
        assert f"dig @127.0.0.1 -p {ports['DNS']} api.anthropic.com" in hints
        assert f"curl --socks5-hostname 127.0.0.1:{ports['SOCKS']} " in hints
        assert f"export HTTPS_PROXY=http://127.0.0.1:{ports['HTTP']} " in hints
        # (session 60's read-through: curl reads only the lower-case http_proxy, and a client
        # told only HTTP_PROXY went around guardd)
        assert f"http_proxy=http://127.0.0.1:{ports['HTTP']}" in hints
        # A denied name through the HTTP proxy: refused by name, never resolved or connected.
        refused = run([require("curl"), "-s", "-i", "-x", f"http://127.0.0.1:{ports['HTTP']}",
                       "http://x.ngrok.io/"])
        assert refused.stdout.startswith("HTTP/1.1 403 Forbidden")
        assert "X-Guardd-Rule: block-ngrok" in refused.stdout
        allowed = dig(daemon.dns[0], "api.anthropic.com")
        assert (allowed.status, allowed.answers[0][2]) == ("NOERROR", "192.0.2.10")
        assert dig(daemon.dns[0], "x.ngrok.io").status == "NXDOMAIN"
        assert daemon.scrape()['guardd_decisions_total{action="dns.query",effect="deny",'
                               'listener="dns",rule="block-ngrok"}'] == 1
    finally:
        assert daemon.stop() == 0
        upstream.stop()
    assert upstream.queries() == ["api.anthropic.com"]
