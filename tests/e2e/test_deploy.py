"""The deployment files: what this machine can test of them.

* The Kubernetes sidecar's nftables table (deploy/kubernetes/guardd-sidecar.yaml) is loaded in a
  network namespace standing for the pod, guardd runs there as the image's user with the
  ConfigMap's config, and an agent of another user finds guardd its only way out (root only).
* The Compose file, the manifests and the Dockerfile are read as the tools would: the agent has
  no network but the internal one, every guardd command line parses, the ConfigMap's policy and
  config load (no Docker daemon or cluster here: nothing is built or applied).
* The alerting rules pass `promtool check rules` and their tests (`promtool test rules`), and
  the dashboard asks only for metrics guardd exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from guardd.cli import build_parser
from guardd.config import load_config_file
from guardd.metrics import Metrics
from guardd.policy.engine import Policy
from tests.e2e.harness import GUARDD, ROOT, Guardd, Upstream, dns_query, require, run
from tests.e2e.world import ALLOWED, TRAP4, TRAP6, ZONES, World, ip, world

DEPLOY = ROOT / "deploy"
SIDECAR = DEPLOY / "kubernetes" / "guardd-sidecar.yaml"
GUARDD_UID, AGENT_UID = 10001, 20001
POD = f"pod{os.getpid() % 100000}"


def _manifests() -> dict[str, dict]:  # type: ignore[type-arg]
    return {f"{doc['kind']}/{doc['metadata']['name']}": doc
            for doc in yaml.safe_load_all(SIDECAR.read_text())}


# -- the pod ---------------------------------------------------------------------------------------


@dataclass
class Pod:
    netns: str
    world: World
    guardd: Guardd

    def agent(self, *command: str, **env: str) -> subprocess.CompletedProcess[str]:
        """`command` as the agent container's user, in the pod."""
        return run(["ip", "netns", "exec", self.netns, "setpriv", f"--reuid={AGENT_UID}",
                    f"--regid={AGENT_UID}", "--clear-groups", "env", "-i", "PATH=/usr/bin:/bin",
                    *(f"{key}={value}" for key, value in env.items()), *command])

    def curl(self, url: str, *options: str, **env: str) -> tuple[int, str]:
        result = self.agent(require("curl"), "-sS", "--max-time", "8", "--cacert",
                            str(self.world.cert), "-w", "\n%{http_code}", *options, url, **env)
        return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def pod() -> Iterator[Pod]:
    if os.geteuid() != 0:
        pytest.skip("the pod's namespace and nftables table need root")
    for tool in ("ip", "nft", "curl", "dig", "setpriv", "openssl"):
        require(tool)
    manifests = _manifests()
    directory = Path(tempfile.mkdtemp(prefix="guardd-pod-"))
    os.chmod(directory, 0o777)  # guardd (10001) writes its trail here, the agent reads the cert
    etc = Path("/etc/netns") / POD
    run(["ip", "netns", "add", POD]).check_returncode()
    try:
        ip(POD, "link", "set", "lo", "up")
        # The pod's resolv.conf names a world address, where the DNS trap stands: only the
        # table's redirect brings a query to guardd.
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {TRAP4}\n")
        with world(POD, f"{POD}-world", directory) as outside:
            nft = manifests["ConfigMap/guardd-pod-nft"]["data"]["pod.nft"]
            run(["ip", "netns", "exec", POD, "nft", "-f", "-"], input=nft).check_returncode()
            upstream = Upstream(directory, ZONES, netns=POD)
            data = manifests["ConfigMap/guardd-policy"]["data"]
            config = yaml.safe_load(data["guardd.yaml"])
            config.update({"upstreams": [upstream.address], "metrics": "127.0.0.1:0",
                           "audit": {"dir": str(directory / "audit"), "stdout": False}})
            (directory / "guardd.yaml").write_text(yaml.safe_dump(config))
            (directory / "policy.yaml").write_text(data["policy.yaml"] + (
                f'  - {{id: test-site, action: "*", domain: {ALLOWED}, effect: allow}}\n'))
            daemon = Guardd(directory, ["setpriv", f"--reuid={GUARDD_UID}",
                                        f"--regid={GUARDD_UID}", "--clear-groups", *GUARDD,
                                        "run", "--config", str(directory / "guardd.yaml")],
                            directory / "audit", netns=POD).start()
            try:
                yield Pod(POD, outside, daemon)
            finally:
                daemon.stop()
                upstream.stop()
    finally:
        run(["ip", "netns", "del", POD])
        shutil.rmtree(etc, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("family", ["-4", "-6"])
def test_in_the_pod_an_allowed_name_is_reached_without_proxy_variables(pod: Pod, family: str
                                                                       ) -> None:
    code, out = pod.curl(f"https://{ALLOWED}/pod", family)
    assert code == 0 and out.endswith("\n200"), out
    records = pod.guardd.audit_records("listener=transparent", "effect=allow")
    assert any(r["domain"] == ALLOWED for r in records), records


def test_in_the_pod_the_proxy_variables_work_too(pod: Pod) -> None:
    code, out = pod.curl(f"https://{ALLOWED}/proxied", HTTPS_PROXY="http://127.0.0.1:3128")
    assert code == 0 and out.endswith("\n200"), out
    code, out = pod.curl(f"https://{ALLOWED}/socks", ALL_PROXY="socks5h://127.0.0.1:1080")
    assert code == 0 and out.endswith("\n200"), out


def test_in_the_pod_nothing_else_leaves(pod: Pod) -> None:
    for address in (TRAP4, f"[{TRAP6}]"):
        code, out = pod.curl(f"http://{address}/")
        assert code != 0, out
    for address in (TRAP4, TRAP6):
        sent = pod.agent("python3", "-c", "import socket,sys; a=sys.argv[1]; s=socket.socket("
                         "socket.AF_INET6 if ':' in a else socket.AF_INET, socket.SOCK_DGRAM); "
                         "s.sendto(b'x', (a, 9999))", address)
        assert "Traceback" not in sent.stderr or "Operation not permitted" in sent.stderr
        answer = pod.agent(require("dig"), f"@{address}", "+tries=1", "+time=5", "x.ngrok.io")
        assert "status: NXDOMAIN" in answer.stdout, answer.stdout  # guardd's answer
    answer = pod.agent(require("dig"), "+short", "+tries=1", "+time=5", ALLOWED)
    assert answer.stdout.split() == ["192.0.2.10"], answer  # resolv.conf names the trap
    assert pod.world.arrived() == []


def test_in_the_pod_a_forged_source_is_no_client_of_its_own(pod: Pod) -> None:
    """Attack pass: the agent bound any IPv6 source it liked (IPV6_FREEBIND needs no privilege)
    and sent its queries to [::1]:5353 from each: every source a client of its own, with a
    fresh tunnel budget, rate limits and in-flight cap (1,200 unique names upstream where one
    client's budget stops at 300). The pod's table lets in through `lo` only what comes from
    one of the pod's own addresses."""
    forge = ("import socket,sys; q=bytes.fromhex(sys.argv[1])\n"
             "for n in range(1, 4):\n"
             "    s=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
             "    s.setsockopt(socket.IPPROTO_IPV6, 78, 1); s.bind((f'fd77::{n}', 9999))\n"
             "    s.sendto(q, ('::1', 5353))")
    sent = pod.agent("python3", "-c", forge, dns_query("forged.x.ngrok.io", 9).hex())
    assert sent.returncode == 0, sent.stderr  # the kernel lets the agent send them
    answer = pod.agent(require("dig"), "@::1", "-p", "5353", "+tries=1", "+time=5",
                       "ordinary.x.ngrok.io")
    assert "status: NXDOMAIN" in answer.stdout, answer.stdout  # (and after the forged ones)
    records = pod.guardd.audit_records("action=dns.query")
    assert any(r.get("target") == "ordinary.x.ngrok.io" for r in records), records
    assert not any(str(r.get("client", "")).startswith("fd77:") for r in records), records


@pytest.mark.parametrize("address, port", [("192.0.2.1", 8080), ("192.0.2.1", 9477),
                                           ("2001:db8::1", 9477)])
def test_in_the_pod_nothing_comes_in_for_the_agent_to_answer(pod: Pod, address: str, port: int
                                                             ) -> None:
    """A connection from outside to a port the agent listens on would carry its data out over
    a connection guardd never saw (found by review): only guardd's metrics port is open, and
    only guardd answers there (attack pass 31: the agent bound `[::]:9477` IPv6-only beside
    guardd's IPv4 listener, or 9477 before guardd started, and a peer outside talked to it)."""
    family = "AF_INET6" if ":" in address else "AF_INET"
    server = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, "setpriv", f"--reuid={AGENT_UID}",
         f"--regid={AGENT_UID}", "--clear-groups", "/usr/bin/python3", "-c",
         f"import socket; s=socket.socket(socket.{family}); "
         "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1) if s.family == "
         f"socket.AF_INET6 else None; s.bind(('{address}', {port})); s.listen(); "
         "s.settimeout(8); c, _ = s.accept(); c.sendall(b'SECRET')"])
    try:
        time.sleep(0.5)
        probe = run(["ip", "netns", "exec", pod.world.netns, "/usr/bin/python3", "-c",
                     f"import socket; s=socket.create_connection(('{address}', {port}), "
                     "timeout=3); print(s.recv(10))"])
        assert b"SECRET" not in probe.stdout.encode() and probe.returncode != 0, probe.stdout
    finally:
        server.kill()
        server.wait()


# -- the files as the tools read them --------------------------------------------------------------


def _parses(argv: list[str]) -> None:
    """A guardd command line the CLI accepts (argparse exits on one it does not)."""
    build_parser().parse_args(argv)


def test_the_compose_agent_has_no_way_out_but_guardd() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services, networks = compose["services"], compose["networks"]
    agent, guard = services["agent"], services["guardd"]
    assert agent["networks"] == ["agents"] and networks["agents"]["internal"] is True
    assert "NET_RAW" in agent["cap_drop"]  # (attack pass: a forged source, a fresh client)
    address = guard["networks"]["agents"]["ipv4_address"]
    assert agent["dns"] == [address]
    assert {agent["environment"][key] for key in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy",
                                                  "http_proxy")} == {f"http://{address}:3128"}
    assert agent["environment"]["ALL_PROXY"] == f"socks5h://{address}:1080"
    assert "egress" in guard["networks"] and not networks["egress"].get("internal")


def test_the_dockerfile_copies_what_exists_and_runs_a_valid_command() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    command = json.loads(re.search(r"^CMD (.+)$", text, re.M)[1])  # type: ignore[index]
    _parses(command)
    config = load_config_file(DEPLOY / "container.yaml")
    assert config.audit_stdout and str(config.audit_dir) == "/var/log/guardd"


def test_the_kubernetes_sidecar_is_complete_and_loads(tmp_path: Path) -> None:
    manifests = _manifests()
    assert {"ConfigMap/guardd-policy", "ConfigMap/guardd-pod-nft", "Deployment/agent",
            "Service/guardd-metrics", "ServiceMonitor/guardd"} <= set(manifests)
    pod_spec = manifests["Deployment/agent"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod_spec["containers"]}
    _parses(containers["guardd"]["args"])
    assert containers["guardd"]["securityContext"]["runAsUser"] == GUARDD_UID
    assert containers["agent"]["securityContext"]["runAsUser"] != GUARDD_UID
    mounts = containers["guardd"]["volumeMounts"]
    assert not any("subPath" in mount for mount in mounts)  # a subPath never updates
    data = manifests["ConfigMap/guardd-policy"]["data"]
    for name, text in data.items():
        (tmp_path / name).write_text(text)
    config = load_config_file(tmp_path / "guardd.yaml")
    assert config.watch and config.transparent and config.audit_stdout
    Policy.from_file(tmp_path / "policy.yaml")
    nft = manifests["ConfigMap/guardd-pod-nft"]["data"]["pod.nft"]
    assert f"meta skuid {GUARDD_UID} return" in nft and f"meta skuid {GUARDD_UID} accept" in nft
    service = manifests["Service/guardd-metrics"]
    selector = manifests["ServiceMonitor/guardd"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.skip("promtool is not installed (Debian: the prometheus package; scripts/test "
                    "installs it as root)")
    return run([tool, *args], cwd=DEPLOY / "prometheus", timeout=60)


def test_the_alerting_rules_pass_promtool() -> None:
    checked = _promtool("check", "rules", "guardd-alerts.yml")
    assert checked.returncode == 0 and "SUCCESS" in checked.stdout, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", "guardd-alerts.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def _exported() -> set[str]:
    """Every series name guardd's registry exports (counters with _total, histograms' parts)."""
    names = set()
    metrics = Metrics()
    metrics.watch_audit(SimpleNamespace(records_written=0, records_compacted=0, write_errors=0,
                                        records_dropped=0, records_shed=0, records_refused=0,
                                        answers_withheld=0,
                                        trail_bytes=0,
                                        mirror_dropped=0))
    for family in metrics.registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{part}" for part in ("bucket", "sum", "count"))
    return names


def test_the_dashboard_and_the_alerts_ask_only_for_exported_metrics() -> None:
    exported = _exported() | {"up"}
    dashboard = json.loads((DEPLOY / "grafana" / "guardd-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "guardd-alerts.yml").read_text())
    expressions += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    asked = {name for expr in expressions for name in re.findall(r"\b(guardd_\w+|up)\{", expr)}
    assert asked and asked <= exported, asked - exported
