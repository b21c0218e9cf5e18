"""`mcp-extproc controller` as a process, from a kubeconfig, against the fake API server."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.fakekube import FakeApiServer
from tests.kubedocs import NS, agent, server
from tests.procs import free_port

pytestmark = pytest.mark.integration


def test_controller_command_reconciles_and_stops_on_sigterm(api: FakeApiServer, tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": api.url}}],
                "users": [{"name": "u", "user": {"token": "test-token"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u"}}],
                "current-context": "fake",
            }
        )
    )
    for doc in (server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"])):
        collection = "mcp.extproc.io/v1alpha1/" + ("mcpservers" if doc["kind"] == "MCPServer" else "mcpagents")
        api.put(collection, {**doc, "metadata": {"name": doc["metadata"]["name"], "namespace": NS}})
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "extproc",
            "controller",
            "--kubeconfig",
            str(kubeconfig),
            "--namespace",
            "mcp-system",
            "--probe",
            f"127.0.0.1:{port}",
            "--webhook",
            "",
            "--resync",
            "3600",
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while api.get("v1/configmaps", NS, "mcp-agent-assistant") is None:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the controller did not reconcile in time"
            time.sleep(0.05)
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as reply:
                    assert reply.status == 200
                    break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        lease = api.get("coordination.k8s.io/v1/leases", "mcp-system", "mcp-extproc-controller")
        assert lease is not None and lease["spec"]["holderIdentity"]
        assert any(r.path.startswith("/apis/mcp.extproc.io") for r in api.state.requests)
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
    assert "Traceback" not in output
