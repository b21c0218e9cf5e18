"""Two ``serve`` replicas behind one real Envoy rendered with both addresses; one is killed.

    agent ──▶ Envoy (render envoy --grpc A --grpc B --authz-http S1 --authz-http S2)
                 ├─ ext_proc (tools/list)          ──▶ serve A (127.0.0.1:A, S1) ─┐
                 └─ ext_authz HTTP (fast tools/call) ─▶ serve B (127.0.0.1:B, S2) ─┴─▶ MCP server (2026-07-28)

Both replicas load the same resources file. Requests are stateless (2026-07-28), so any
replica may answer any of them. Both replicas get traffic; after ``SIGKILL`` of one, the
requests succeed again within a few seconds and keep succeeding, and Envoy marks the
dead replica (health check or outlier ejection). With both killed, Envoy still fails
closed: 5xx, and the MCP server sees nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from extproc.commands.envoy import envoy_binary
from tests.agents import modern_request, response_messages
from tests.integration.conftest import PY_TOOLS, resource_doc
from tests.procs import Proc, admin_get, admin_ready, assert_envoy_accepts, free_port, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

RECOVERY_DEADLINE_S = 5.0


@dataclass
class Replica:
    proc: Proc
    grpc: str
    authz_socket: Path


@dataclass
class Stack:
    url: str
    admin: Path
    replicas: list[Replica]
    record: Path


def start_serve(resources: Path, tmp: Path, index: int) -> Replica:
    """``mcp-extproc serve`` on a free TCP port and its own HTTP authorization socket."""
    grpc = f"127.0.0.1:{free_port()}"
    authz = tmp / f"authz-{index}.sock"
    argv = [sys.executable, "-m", "extproc", "serve", "-f", str(resources), "--grpc", grpc]
    argv += ["--authz-http", str(authz), "--metrics", ""]
    proc = Proc(argv, name=f"serve-{index}", log_dir=tmp)
    try:
        proc.wait_for_line(r"gRPC server listening", 30)
    except BaseException:
        proc.stop()
        raise
    return Replica(proc, grpc, authz)


def render_bootstrap(resources: Path, tmp: Path, port: int, replicas: list[Replica]) -> str:
    argv = [sys.executable, "-m", "extproc", "render", "envoy", "-f", str(resources)]
    argv += ["--listen", f"127.0.0.1:{port}", "--admin-socket", str(tmp / "admin.sock")]
    for replica in replicas:
        argv += ["--grpc", replica.grpc, "--authz-http", str(replica.authz_socket)]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    procs: list[Proc] = []
    try:
        record = tmp_path / "upstream.jsonl"
        upstream, upstream_port = start_pyserver("modern", record)
        procs.append(upstream)
        resources = tmp_path / "resources.yaml"
        resources.write_text(yaml.safe_dump(resource_doc("modern", upstream_port, PY_TOOLS)))
        replicas = [start_serve(resources, tmp_path, i) for i in (1, 2)]
        procs += [r.proc for r in replicas]
        port = free_port()
        bootstrap = tmp_path / "envoy.yaml"
        assert_envoy_accepts(render_bootstrap(resources, tmp_path, port, replicas), bootstrap)
        envoy = Proc([envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id"], name="envoy", log_dir=tmp_path)
        procs.append(envoy)
        admin = tmp_path / "admin.sock"
        deadline = time.monotonic() + 30
        while not admin_ready(admin):
            assert envoy.popen.poll() is None, envoy.output()
            assert time.monotonic() < deadline, "Envoy did not become ready"
            time.sleep(0.05)
        yield Stack(f"http://127.0.0.1:{port}/modern/mcp", admin, replicas, record)
    finally:
        for proc in reversed(procs):
            proc.stop()


def exchange(client: httpx.Client, url: str, method: str, params: dict[str, Any], id: int) -> bool:
    """One stateless 2026-07-28 request; True when it got its JSON-RPC result."""
    body, headers = modern_request(method, params, id=id)
    try:
        reply = client.post(url, content=json.dumps(body), headers=headers)
    except httpx.HTTPError:
        return False
    if reply.status_code != 200:
        return False
    messages = response_messages(reply)
    return bool(messages) and "result" in messages[-1]


def both(client: httpx.Client, url: str, id: int) -> bool:
    """A tools/list (through ext_proc) and a tools/call (the fast route's HTTP Check)."""
    listed = exchange(client, url, "tools/list", {}, id)
    called = exchange(client, url, "tools/call", {"name": "echo", "arguments": {"text": "replica"}}, id + 1)
    return listed and called


def hosts(admin: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Each host of our two clusters as Envoy's admin ``/clusters`` shows it: ``(cluster, address) → host``."""
    status, body = admin_get(admin, "/clusters?format=json")
    assert status == 200
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for cluster in json.loads(body)["cluster_statuses"]:
        if cluster["name"] not in ("mcp_extproc", "mcp_extproc_authz_http"):
            continue
        for host in cluster.get("host_statuses", []):
            address = host["address"]
            where = address.get("pipe", {}).get("path") or (
                f"{address['socket_address']['address']}:{address['socket_address']['port_value']}"
            )
            found[(cluster["name"], where)] = host
    return found


def requests_to(host: dict[str, Any]) -> int:
    return next((int(s.get("value", 0)) for s in host.get("stats", []) if s["name"] == "rq_total"), 0)


def left(host: dict[str, Any]) -> bool:
    """Envoy no longer sends to ``host``: a failed health check or an outlier ejection."""
    health = host.get("health_status", {})
    return bool(health.get("failed_active_health_check") or health.get("failed_outlier_check"))


def test_requests_are_balanced_and_survive_a_killed_replica(stack: Stack) -> None:
    first, second = stack.replicas
    keys = {r.grpc: [("mcp_extproc", r.grpc), ("mcp_extproc_authz_http", str(r.authz_socket))] for r in stack.replicas}
    with httpx.Client(timeout=10) as client:
        for i in range(10):
            assert both(client, stack.url, 100 + 2 * i), f"request pair {i} failed with both replicas up"
        before = hosts(stack.admin)
        # ext_proc streams (tools/list) and HTTP Checks (the fast tools/call) reach both replicas.
        assert all(requests_to(before[key]) > 0 for r in stack.replicas for key in keys[r.grpc]), before

        os.killpg(first.proc.popen.pid, signal.SIGKILL)
        first.proc.popen.wait(timeout=10)
        started = time.monotonic()
        failed = 0
        while not both(client, stack.url, 1000 + 2 * failed):
            failed += 1
            assert time.monotonic() - started < RECOVERY_DEADLINE_S, "requests kept failing after the kill"
            time.sleep(0.1)
        for i in range(20):
            assert both(client, stack.url, 2000 + 2 * i), f"request pair {i} failed after the replica was killed"
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while not all(left(hosts(stack.admin)[key]) for key in keys[first.grpc]):
            assert time.monotonic() < deadline, hosts(stack.admin)
            time.sleep(0.1)
        after = hosts(stack.admin)
        assert all(not left(after[key]) for key in keys[second.grpc]), after
        assert all(requests_to(after[key]) > requests_to(before[key]) for key in keys[second.grpc])

        # With every replica gone the filters still fail closed: 5xx, nothing forwarded.
        os.killpg(second.proc.popen.pid, signal.SIGKILL)
        second.proc.popen.wait(timeout=10)
        seen = len(read_records(stack.record))
        for method, params in (("tools/list", {}), ("tools/call", {"name": "echo", "arguments": {"text": "x"}})):
            body, headers = modern_request(method, params, id=9)
            assert client.post(stack.url, content=json.dumps(body), headers=headers).status_code >= 500
        assert len(read_records(stack.record)) == seen
