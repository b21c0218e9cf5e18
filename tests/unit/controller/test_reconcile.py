"""The reconcile loop against the fake API server: apply, owner references, prune, status, backoff, Lease."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest

from controller.render.meta import MANAGER, ControllerSettings
from controller.runtime.kube import Kube, KubeError
from controller.runtime.lease import LeaseElector
from controller.runtime.loop import (
    Controller,
    ControllerOptions,
    Metrics,
    ProbeServer,
    backoff,
    run_until,
    serve_in_thread,
)
from controller.runtime.reconcile import Reconciler
from tests.fakekube import FakeApiServer
from tests.kubedocs import NS, agent, secret, server

SERVERS = "mcp.extproc.io/v1alpha1/mcpservers"
AGENTS = "mcp.extproc.io/v1alpha1/mcpagents"
CONFIGMAPS = "v1/configmaps"
NETPOLS = "networking.k8s.io/v1/networkpolicies"
FILTERS = "networking.istio.io/v1alpha3/envoyfilters"
SETTINGS = ControllerSettings(namespace="mcp-system")
KEYS = "mcp-extproc-session-keys"


def seed(api: FakeApiServer, *docs: dict[str, Any]) -> None:
    for doc in docs:
        doc = {**doc, "metadata": {k: v for k, v in doc["metadata"].items() if k not in ("uid", "generation")}}
        collection = {"MCPServer": SERVERS, "MCPAgent": AGENTS, "Secret": "v1/secrets"}[doc["kind"]]
        api.put(collection, doc)


def conditions(api: FakeApiServer, collection: str, name: str) -> dict[str, dict[str, Any]]:
    obj = api.get(collection, NS, name) or {}
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def eventually(check: Callable[[], bool], deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while not check():
        assert time.monotonic() < end, "condition not reached before the deadline"
        time.sleep(0.05)


def test_reconcile_applies_with_owner_refs_and_writes_status(api: FakeApiServer, kube: Kube) -> None:
    seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
    Reconciler(kube, SETTINGS).reconcile(NS)
    config_map = api.get(CONFIGMAPS, NS, "mcp-agent-assistant")
    assert config_map is not None and "envoy.yaml" in config_map["data"]
    owner_uid = api.get(AGENTS, NS, "assistant")["metadata"]["uid"]  # type: ignore[index]
    assert config_map["metadata"]["ownerReferences"][0]["uid"] == owner_uid  # deletions cascade
    assert config_map["metadata"]["managedFields"] == [{"manager": MANAGER, "operation": "Apply"}]
    applies = [r for r in api.state.requests if r.method == "PATCH" and "status" not in r.path]
    assert applies and all(
        r.content_type == "application/apply-patch+yaml" and r.query["force"] == ["true"] for r in applies
    )
    assert api.names(NETPOLS, NS) == ["mcp-agent-assistant-default-deny", "mcp-agent-assistant-egress"]
    ready = conditions(api, AGENTS, "assistant")
    assert {t: c["status"] for t, c in ready.items()} == {"Accepted": "True", "ResolvedRefs": "True", "Ready": "True"}
    assert ready["Ready"]["observedGeneration"] == 1
    assert api.get(AGENTS, NS, "assistant")["status"]["observedGeneration"] == 1  # type: ignore[index]
    assert conditions(api, SERVERS, "tools")["Ready"]["status"] == "True"


def test_missing_refs_and_invalid_specs_are_reported_in_status(api: FakeApiServer, kube: Kube) -> None:
    seed(
        api,
        server("tools", "http://tools.mcp.svc:8080/mcp"),
        server("broken", "gopher://old/mcp"),  # a spec the CRD would refuse, stored anyway
        agent("assistant", ["tools", "ghost"]),
    )
    Reconciler(kube, SETTINGS).reconcile(NS)
    broken = conditions(api, SERVERS, "broken")
    assert broken["Accepted"]["status"] == "False" and broken["Accepted"]["reason"] == "Invalid"
    assert "spec.url" in broken["Accepted"]["message"]
    status = conditions(api, AGENTS, "assistant")
    assert status["Accepted"]["status"] == "True"
    assert status["ResolvedRefs"]["reason"] == "RefNotResolved"
    assert "no MCPServer named 'ghost'" in status["ResolvedRefs"]["message"]
    assert status["Ready"]["status"] == "False"
    assert api.get(CONFIGMAPS, NS, "mcp-agent-assistant") is not None  # the resolvable part still works


def test_unchanged_status_is_not_rewritten_and_transition_time_is_kept(api: FakeApiServer, kube: Kube) -> None:
    seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
    reconciler = Reconciler(kube, SETTINGS)
    reconciler.reconcile(NS)
    first = conditions(api, AGENTS, "assistant")["Ready"]["lastTransitionTime"]
    before = len([r for r in api.state.requests if r.path.endswith("/status")])
    reconciler.reconcile(NS)
    assert len([r for r in api.state.requests if r.path.endswith("/status")]) == before
    assert conditions(api, AGENTS, "assistant")["Ready"]["lastTransitionTime"] == first


def test_objects_no_longer_rendered_are_pruned(api: FakeApiServer, kube: Kube) -> None:
    seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
    reconciler = Reconciler(kube, SETTINGS)
    reconciler.reconcile(NS)
    seed(api, agent("assistant", ["tools"], attachment="Istio"))
    reconciler.reconcile(NS)
    assert api.get(CONFIGMAPS, NS, "mcp-agent-assistant") is None
    assert api.names(FILTERS, NS) == ["mcp-agent-assistant"]
    assert api.get("apps/v1/deployments", NS, "mcp-extproc") is not None
    api.remove(AGENTS, NS, "assistant")
    reconciler.reconcile(NS)
    assert api.names(FILTERS, NS) == [] and api.names(NETPOLS, NS) == []
    assert api.get("apps/v1/deployments", NS, "mcp-extproc") is None


def test_referenced_secret_is_read_by_name(api: FakeApiServer, kube: Kube) -> None:
    auth = {"bearer": {"secretRef": {"name": "token", "key": "t"}}}
    seed(
        api,
        server("tools", "http://tools.mcp.svc:8080/mcp", upstreamAuth=auth),
        agent("assistant", ["tools"]),
        secret("token", t="v"),
    )
    seed(api, secret("unrelated", x="y"))
    Reconciler(kube, SETTINGS).reconcile(NS)
    assert api.get("v1/secrets", NS, "mcp-agent-assistant") is not None
    reads = [
        r.path
        for r in api.state.requests
        if r.method == "GET" and "/secrets" in r.path and "labelSelector" not in r.query
    ]
    # Never lists or reads other Secrets: the referenced one, and the session key set it keeps.
    assert reads == [f"/api/v1/namespaces/{NS}/secrets/token", f"/api/v1/namespaces/{NS}/secrets/{KEYS}"]


def test_transient_errors_raise_for_retry(api: FakeApiServer, kube: Kube) -> None:
    seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
    api.state.fail.append(503)
    with pytest.raises(KubeError) as caught:
        Reconciler(kube, SETTINGS).reconcile(NS)
    assert caught.value.status == 503


def test_backoff_grows_and_is_capped() -> None:
    delays = [backoff(n, 0.5, 8.0) for n in range(1, 8)]
    assert 0.4 <= delays[0] <= 0.5
    assert 3.2 <= delays[3] <= 4.0
    assert all(d <= 8.0 for d in delays) and delays[-1] >= 6.4


def test_loop_watches_retries_with_backoff_and_converges(api: FakeApiServer, kube: Kube) -> None:
    options = ControllerOptions(
        leader_election=False, resync_s=3600, watch_timeout_s=1, backoff_base_s=0.05, backoff_cap_s=0.2
    )
    metrics = Metrics()
    stop = threading.Event()
    api.state.fail += [500, 500]  # the first calls fail: the loop must retry
    controller = run_until(kube, SETTINGS, options, stop, metrics)
    try:
        seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
        eventually(lambda: api.get(CONFIGMAPS, NS, "mcp-agent-assistant") is not None)
        # A change arrives through the watch, not the (hour-long) resync.
        seed(api, agent("assistant", ["tools"], attachment="Istio"))
        eventually(lambda: api.names(FILTERS, NS) == ["mcp-agent-assistant"])
        eventually(lambda: api.get(CONFIGMAPS, NS, "mcp-agent-assistant") is None)
        assert controller.healthy()
        probe = ProbeServer(("127.0.0.1", 0), controller.healthy, metrics)
        serve_in_thread(probe)
        base = f"http://127.0.0.1:{probe.server_address[1]}"
        with urllib.request.urlopen(base + "/healthz", timeout=5) as reply:  # noqa: S310 - loopback
            assert reply.status == 200
        with urllib.request.urlopen(base + "/metrics", timeout=5) as reply:  # noqa: S310
            text = reply.read().decode()
        assert 'mcp_extproc_controller_reconciles_total{result="ok"}' in text
        assert "mcp_extproc_controller_leader 1.0" in text
        probe.shutdown()
        probe.server_close()
    finally:
        stop.set()
        for thread in controller.threads:
            thread.join(timeout=10)
    assert api.state.fail == []  # both injected failures were met, retried, and the loop converged


def test_lease_leader_election(api: FakeApiServer, kube: Kube) -> None:
    first = LeaseElector(kube, "ctl", "mcp-system", "replica-a", duration_s=30)
    second = LeaseElector(kube, "ctl", "mcp-system", "replica-b", duration_s=30)
    assert first.try_acquire() is True
    assert second.try_acquire() is False
    assert first.try_acquire() is True  # renewal
    lease = api.get("coordination.k8s.io/v1/leases", "mcp-system", "ctl")
    assert lease is not None and lease["spec"]["holderIdentity"] == "replica-a"
    # The holder stopped renewing long ago: the other replica takes over.
    lease["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"
    api.put("coordination.k8s.io/v1/leases", lease)
    assert second.try_acquire() is True
    taken = api.get("coordination.k8s.io/v1/leases", "mcp-system", "ctl")
    assert taken is not None and taken["spec"]["holderIdentity"] == "replica-b"
    assert taken["spec"]["leaseTransitions"] == 1
    assert first.try_acquire() is False


def test_only_the_leader_reconciles(api: FakeApiServer, kube: Kube) -> None:
    seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
    api.put(
        "coordination.k8s.io/v1/leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "mcp-extproc-controller", "namespace": "mcp-system"},
            "spec": {
                "holderIdentity": "someone-else",
                "leaseDurationSeconds": 3600,
                "renewTime": "2999-01-01T00:00:00.000000Z",
            },
        },
    )
    stop = threading.Event()
    options = ControllerOptions(resync_s=3600, watch_timeout_s=1, renew_s=0.05)
    controller: Controller = run_until(kube, SETTINGS, options, stop, Metrics())
    try:
        eventually(lambda: len([r for r in api.state.requests if "/leases/" in r.path]) >= 3)
        assert api.get(CONFIGMAPS, NS, "mcp-agent-assistant") is None
        assert controller.threads == []
        lease = api.get("coordination.k8s.io/v1/leases", "mcp-system", "mcp-extproc-controller")
        assert lease is not None
        lease["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"  # the other leader went away
        api.put("coordination.k8s.io/v1/leases", lease)
        eventually(lambda: api.get(CONFIGMAPS, NS, "mcp-agent-assistant") is not None)
    finally:
        stop.set()
        for thread in controller.threads:
            thread.join(timeout=10)
