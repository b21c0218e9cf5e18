"""The controller asks a real extension server what it saw, writes MCPServer status.tools[], and the pins
the status took on first use survive a pod's restart.

    agent (the Python SDK) ──▶ Envoy (render envoy) ──▶ serve --report (the default pipeline: pins)
                                                          ──▶ tests.upstreams.rugpull (SDK server)
    Reconciler ──list Pods / GET /report (a token signed with the namespace's key Secret)──▶ serve
               ──status.tools[], ConfigMap mcp-agent-<agent> (pinnedTools from the status)──▶
                 the fake API server (tests/fakekube.py: no Kubernetes API server runs here)

A "pod" is a ``serve`` and an Envoy on loopback, each with its own ports, started from the
``MCPServer`` documents the controller rendered for the agent, as the injected sidecar is.
"""

from __future__ import annotations

import asyncio
import base64
import json
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
from kubernetes import client
from mcp.shared.exceptions import MCPError

from controller.render.meta import ControllerSettings
from controller.runtime.kube import Kube
from controller.runtime.reconcile import Reconciler
from extproc.commands.envoy import envoy_binary
from extproc.config.session_keys import new_key_set
from plugins.lib.fingerprints import fingerprint
from tests.agents import legacy_session
from tests.fakekube import FakeApiServer
from tests.integration.test_tool_pinning import direct_rug_pull, direct_tools
from tests.kubedocs import NS, agent, server
from tests.procs import Proc, admin_ready, assert_envoy_accepts, free_port, start_ready_server

pytestmark = pytest.mark.integration

SERVERS = "mcp.extproc.io/v1alpha1/mcpservers"


@dataclass
class Pod:
    serve: Proc
    envoy: Proc
    url: str
    report_port: int

    def stop(self) -> None:
        self.envoy.stop()
        self.serve.stop()


def start_pod(tmp: Path, name: str, resources: Path, keys: Path) -> Pod:
    grpc, report, listen = free_port(), free_port(), free_port()
    argv = [sys.executable, "-m", "extproc", "serve", "-f", str(resources), "--grpc", f"127.0.0.1:{grpc}"]
    argv += ["--metrics", "", "--report", f"127.0.0.1:{report}", "--session-key-file", str(keys)]
    serve = Proc(argv, name=f"{name}-serve", log_dir=tmp)
    serve.wait_for_line(r"gRPC server listening", 30)
    admin = tmp / f"{name}-admin.sock"
    render = [sys.executable, "-m", "extproc", "render", "envoy", "-f", str(resources)]
    render += ["--listen", f"127.0.0.1:{listen}", "--admin-socket", str(admin), "--grpc", f"127.0.0.1:{grpc}"]
    bootstrap = tmp / f"{name}-envoy.yaml"
    assert_envoy_accepts(subprocess.run(render, capture_output=True, text=True, check=True).stdout, bootstrap)
    envoy = Proc([envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id"], name=f"{name}-envoy", log_dir=tmp)
    deadline = time.monotonic() + 30
    while not admin_ready(admin):
        assert envoy.popen.poll() is None, envoy.output()
        assert time.monotonic() < deadline, "Envoy did not become ready"
        time.sleep(0.05)
    return Pod(serve, envoy, f"http://127.0.0.1:{listen}/tools/mcp", report)


@pytest.fixture
def kube(api: FakeApiServer) -> Iterator[Kube]:
    with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield Kube(api_client, timeout_s=10)


async def listed(url: str) -> set[str]:
    async with legacy_session(url, timeout_s=10) as session:
        return {t.name for t in (await session.list_tools()).tools}


async def refused(url: str) -> str:
    async with legacy_session(url, timeout_s=10) as session:
        await session.list_tools()
        with pytest.raises(MCPError) as caught:
            await session.call_tool("echo", {"text": "x"})
    assert caught.value.error.code == -32003
    return caught.value.error.message


def status_tools(api: FakeApiServer) -> dict[str, dict[str, Any]]:
    obj = api.get(SERVERS, NS, "tools") or {}
    return {t["name"]: t for t in (obj.get("status") or {}).get("tools", [])}


def rendered_server(api: FakeApiServer, path: Path) -> dict[str, Any]:
    """The MCPServer as the controller gave it to the agent's sidecar, written to ``path`` alone."""
    config_map = api.get("v1/configmaps", NS, "mcp-agent-assistant")
    assert config_map is not None
    docs = list(yaml.safe_load_all(config_map["data"]["resources.yaml"]))
    [doc] = [d for d in docs if d and d["kind"] == "MCPServer"]
    path.write_text(yaml.safe_dump(doc))
    return dict(doc)


def test_status_tools_record_first_use_pins_changes_and_approvals_across_a_pod_restart(
    tmp_path: Path, api: FakeApiServer, kube: Kube
) -> None:
    upstream, port = start_ready_server("tests.upstreams.rugpull", name="rugpull", log_dir=tmp_path)
    pods: list[Pod] = []
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        original = {t["name"]: fingerprint(t) for t in asyncio.run(direct_tools(url))}
        keys = tmp_path / "keys.json"
        key_set = json.dumps(new_key_set())
        keys.write_text(key_set)
        keys.chmod(0o600)
        spec = {"toolPinning": "Enforce"}
        first = tmp_path / "first.yaml"
        first.write_text(yaml.safe_dump({**server("tools", url, **spec), "metadata": {"name": "tools"}}))
        pods.append(start_pod(tmp_path, "pod1", first, keys))
        assert asyncio.run(listed(pods[0].url)) == set(original)

        api.put(SERVERS, server("tools", url, **spec))
        api.put("mcp.extproc.io/v1alpha1/mcpagents", agent("assistant", ["tools"]))
        secret_data = {"jwks.json": base64.b64encode(key_set.encode()).decode()}
        api.put(
            "v1/secrets",
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "mcp-extproc-session-keys", "namespace": NS},
                "data": secret_data,
            },
        )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": "assistant-1",
                "namespace": NS,
                "annotations": {"mcp.extproc.io/injected": "assistant"},
            },
            "status": {"phase": "Running", "podIP": "127.0.0.1"},
        }
        api.put("v1/pods", pod)

        def reconcile(report_port: int) -> None:
            reconciler = Reconciler(kube, ControllerSettings(namespace="mcp-system", report_port=report_port))
            # Twice, as the loop does: the status written by the first pass is a watch event,
            # and the second renders the agent's ConfigMap from it.
            reconciler.reconcile(NS)
            reconciler.reconcile(NS)

        # 1. First sight: every tool pinned in the status as the upstream defines it.
        reconcile(pods[0].report_port)
        tools = status_tools(api)
        assert {n: t["digest"] for n, t in tools.items()} == original
        assert all(t["source"] == "first-use" and t["changed"] is False and t["firstSeen"] for t in tools.values())
        assert rendered_server(api, tmp_path / "second.yaml")["spec"]["pinnedTools"] == original

        # 2. The upstream changes echo and add: the pod hides them, the status says so.
        asyncio.run(direct_rug_pull(url, "changed"))
        assert asyncio.run(listed(pods[0].url)) == {"rug_pull"}
        changed = {t["name"]: fingerprint(t) for t in asyncio.run(direct_tools(url))}
        reconcile(pods[0].report_port)
        tools = status_tools(api)
        assert tools["echo"]["changed"] is True and tools["echo"]["digest"] == original["echo"]
        assert tools["echo"]["current"] == changed["echo"] and tools["echo"]["changes"] == ["description"]
        assert tools["add"]["changed"] is True and tools["rug_pull"]["changed"] is False

        # 3. The pod restarts from what the controller rendered: the namespace's pins hold, so the
        #    changed echo is refused, where a pod trusting what it sees first would take it.
        pods.pop().stop()
        pods.append(start_pod(tmp_path, "pod2", tmp_path / "second.yaml", keys))
        assert asyncio.run(listed(pods[0].url)) == {"rug_pull"}
        assert "changed since it was pinned" in asyncio.run(refused(pods[0].url))
        naive = start_pod(tmp_path, "naive", first, keys)
        pods.append(naive)
        assert asyncio.run(listed(naive.url)) == set(original)  # what the status pins prevent
        pods.pop().stop()

        # 4. The operator approves echo's new definition by writing it into spec.pinnedTools.
        api.put(SERVERS, server("tools", url, **spec, pinnedTools={"echo": changed["echo"]}))
        reconcile(pods[0].report_port)
        tools = status_tools(api)
        assert (tools["echo"]["digest"], tools["echo"]["source"]) == (changed["echo"], "declared")
        pinned = rendered_server(api, tmp_path / "second.yaml")["spec"]["pinnedTools"]  # the pod reloads it
        assert pinned == {**original, "echo": changed["echo"]}
        deadline = time.monotonic() + 15
        while asyncio.run(listed(pods[0].url)) != {"echo", "rug_pull"}:
            assert time.monotonic() < deadline, "the approved echo did not come back"
            time.sleep(0.5)
        reconcile(pods[0].report_port)
        tools = status_tools(api)
        assert tools["echo"]["changed"] is False and tools["add"]["changed"] is True

        # The report is for the controller only.
        assert httpx.get(f"http://127.0.0.1:{pods[0].report_port}/report", timeout=5).status_code == 401
    finally:
        for running in pods:
            running.stop()
        upstream.stop()
