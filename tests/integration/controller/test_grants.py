"""`mcp-extproc controller` as a process with grants and consents (fake API server): a new grant
reaches the sidecar's resources through the watch, and a consent's expiry shows in its status
at that time, with no change to any object and an hour-long resync."""

from __future__ import annotations

import datetime
import math
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakekube import FakeApiServer
from tests.kubedocs import NS, agent, server

pytestmark = pytest.mark.integration

API = "mcp.extproc.io/v1alpha1"
ALICE = {"user": "alice", "agent": "assistant"}
CONSENTS = f"{API}/mcpconsents"
GRANTS = f"{API}/mcpaccessgrants"


def _put(api: FakeApiServer, doc: dict[str, Any]) -> None:
    plural = {"MCPServer": "mcpservers", "MCPAgent": "mcpagents", "MCPAccessGrant": "mcpaccessgrants"}
    collection = CONSENTS if doc["kind"] == "MCPConsent" else f"{API}/{plural[doc['kind']]}"
    api.put(collection, {**doc, "metadata": {"name": doc["metadata"]["name"], "namespace": NS}})


def _grant(name: str) -> dict[str, Any]:
    spec = {"targetRefs": [{"name": "tools"}], "subject": ALICE, "maxTrust": "high"}
    return {"apiVersion": API, "kind": "MCPAccessGrant", "metadata": {"name": name}, "spec": spec}


def _consent(expires_at: str) -> dict[str, Any]:
    spec = {"serverRef": {"name": "tools"}, "subject": ALICE, "consentedTrust": "medium", "expiresAt": expires_at}
    return {"apiVersion": API, "kind": "MCPConsent", "metadata": {"name": "alice"}, "spec": spec}


def _expired(api: FakeApiServer) -> dict[str, Any] | None:
    obj = api.get(CONSENTS, NS, "alice") or {}
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == "Expired"), None)


def _resources(api: FakeApiServer) -> list[tuple[str, str]]:
    config_map = api.get("v1/configmaps", NS, "mcp-agent-assistant")
    if config_map is None:
        return []
    return [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(config_map["data"]["resources.yaml"])]


@pytest.fixture
def controller(api: FakeApiServer, tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
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
    args = ["--kubeconfig", str(kubeconfig), "--namespace", "mcp-system", "--probe", "", "--webhook", ""]
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc", "controller", *args, "--resync", "3600", "--no-leader-election"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
        assert proc.returncode == 0, output
        assert "Traceback" not in output, output


def _until(proc: subprocess.Popen[str], check: Callable[[], bool], deadline: float, what: str) -> None:
    while not check():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, f"{what}: not before the deadline"
        time.sleep(0.05)


def test_grants_arrive_by_watch_and_an_expiry_shows_at_its_time(
    api: FakeApiServer, controller: subprocess.Popen[str]
) -> None:
    # Whole seconds, some way ahead: the first passes must see the consent live.
    lapse = datetime.datetime.fromtimestamp(math.ceil(time.time()) + 8, datetime.UTC)
    stamp = lapse.strftime("%Y-%m-%dT%H:%M:%SZ")
    for doc in (
        server("tools", "http://tools.mcp.svc:8080/mcp"),
        agent("assistant", ["tools"]),
        _grant("first"),
        _consent(stamp),
    ):
        _put(api, doc)
    start = time.monotonic()
    _until(controller, lambda: ("MCPAccessGrant", "first") in _resources(api), start + 30, "the first grant")
    assert ("MCPConsent", "alice") in _resources(api)
    _until(controller, lambda: _expired(api) is not None, start + 30, "the consent's status")
    live = _expired(api)
    assert live is not None and (live["status"], live["reason"]) == ("False", "NotExpired"), live
    # A grant made now reaches the sidecar's resources through the watch (the resync is an hour off).
    _put(api, _grant("second"))
    _until(controller, lambda: ("MCPAccessGrant", "second") in _resources(api), time.monotonic() + 15, "the watch")
    assert datetime.datetime.now(datetime.UTC) < lapse, "too slow to see the consent live first"
    # Nothing changes from here on: only the time passes.
    _until(controller, lambda: (_expired(api) or {}).get("status") == "True", time.monotonic() + 20, "the expiry")
    seen = datetime.datetime.now(datetime.UTC)
    assert seen >= lapse
    assert (seen - lapse).total_seconds() < 5  # the loop came back at expiresAt (+0.5 s), not at the resync
    expired = _expired(api)
    assert expired is not None and expired["reason"] == "Expired" and stamp in expired["message"]
    assert expired["lastTransitionTime"] >= stamp
