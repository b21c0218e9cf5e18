"""The session key Secret: every extension server mounts it; the runtime creates it once, never overwrites it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.render.inject import EXTPROC_CONTAINER, injection_patch
from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from controller.render.view import build_view
from controller.runtime.kube import Kube, KubeError
from controller.runtime.reconcile import Reconciler
from controller.runtime.session_keys import ensure_session_keys
from extproc.config.session_keys import new_key_set, parse_key_set
from tests.fakekube import FakeApiServer
from tests.kubedocs import NS, agent, rendered_objects, server
from tests.kubeschemas import validate_any

SETTINGS = ControllerSettings()
SECRETS = "v1/secrets"
KEYS = "mcp-extproc-session-keys"
KEY_DIR = "/var/run/mcp-extproc/session-keys"
SERVERS = "mcp.extproc.io/v1alpha1/mcpservers"
AGENTS = "mcp.extproc.io/v1alpha1/mcpagents"
VOLUME = {"name": KEYS, "secret": {"secretName": KEYS, "items": [{"key": "jwks.json", "path": "jwks.json"}]}}
MOUNT = {"name": KEYS, "mountPath": KEY_DIR, "readOnly": True}


def key_file_arg(args: list[str]) -> str:
    assert args.count("--session-key-file") == 1, args
    return args[args.index("--session-key-file") + 1]


def test_the_injected_extension_server_mounts_the_secret_read_only_and_envoy_does_not() -> None:
    docs = [server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"])]
    view = build_view(NS, docs)
    app: dict[str, Any] = {"name": "app", "image": "a"}
    pod: dict[str, Any] = {"metadata": {"labels": {"app": "assistant"}}, "spec": {"containers": [app]}}
    ops, _ = injection_patch(pod, list(view.catalog.agents.values()), SETTINGS)
    added = {op["path"]: op["value"] for op in ops}
    assert VOLUME in added["/spec/volumes"]
    containers = {c["name"]: c for c in added["/spec/initContainers"]}
    extproc = containers[EXTPROC_CONTAINER]
    assert key_file_arg(extproc["args"]) == f"{KEY_DIR}/jwks.json"
    assert MOUNT in extproc["volumeMounts"]
    assert all(m["name"] != KEYS for m in containers["mcp-envoy"]["volumeMounts"])  # Envoy needs no keys
    assert not any(op["path"].startswith("/spec/containers/0/volumeMounts") for op in ops)  # nor the agent's
    spec = {"containers": [app], "volumes": added["/spec/volumes"], "initContainers": list(containers.values())}
    patched = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": NS}, "spec": spec}
    validate_any(patched)


@pytest.mark.parametrize("mode", ["gateway", "istio"])
def test_every_replica_of_the_shared_extension_server_mounts_the_secret(mode: str) -> None:
    if mode == "gateway":
        docs = [server("tools", "http://tools.mcp.svc:8080/mcp", gateway={"parentRefs": [{"name": "gw"}]})]
    else:
        docs = [server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"], attachment="Istio")]
    deployment = rendered_objects(*docs)[("Deployment", "mcp-extproc")]  # validated against the schemas
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod = spec["template"]["spec"]
    assert VOLUME in pod["volumes"]
    [container] = pod["containers"]
    assert key_file_arg(container["args"]) == f"{KEY_DIR}/jwks.json"
    assert MOUNT in container["volumeMounts"]
    [spread] = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_render_k8s_refers_to_the_secret_and_never_makes_key_material() -> None:
    docs = [server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"], attachment="Istio")]
    [(_view, first)] = render_documents(docs, SETTINGS).values()
    [(_view, again)] = render_documents(docs, SETTINGS).values()
    assert first.objects == again.objects  # deterministic
    assert first.session_keys
    assert not any(o["kind"] == "Secret" and o["metadata"]["name"] == KEYS for o in first.objects)
    [(_view, none)] = render_documents([server("tools", "http://tools.mcp.svc:8080/mcp")], SETTINGS).values()
    assert not none.session_keys  # no extension server in that namespace: no Secret needed


def _stored(api: FakeApiServer) -> dict[str, Any]:
    found = api.get(SECRETS, NS, KEYS)
    assert found is not None
    return found


def _seed(api: FakeApiServer, *docs: dict[str, Any]) -> None:
    for doc in docs:
        meta = {k: v for k, v in doc["metadata"].items() if k not in ("uid", "generation")}
        api.put(SERVERS if doc["kind"] == "MCPServer" else AGENTS, {**doc, "metadata": meta})


def test_the_runtime_creates_the_secret_once_and_never_overwrites_it(api: FakeApiServer, kube: Kube) -> None:
    _seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"), agent("assistant", ["tools"]))
    reconciler = Reconciler(kube, SETTINGS)
    reconciler.reconcile(NS)
    created = _stored(api)
    validate_any({k: v for k, v in created.items() if k in ("apiVersion", "kind", "metadata", "type", "stringData")})
    keys = parse_key_set(json.loads(created["stringData"]["jwks.json"]), "the Secret")  # what serve will load
    assert len(keys.by_kid) == 1
    assert "ownerReferences" not in created["metadata"]  # outlives the resources
    assert "app.kubernetes.io/managed-by" not in created["metadata"]["labels"]  # never pruned

    reconciler.reconcile(NS)
    assert _stored(api)["stringData"] == created["stringData"]
    posts = [r for r in api.state.requests if r.method == "POST" and r.path.endswith("/secrets")]
    assert len(posts) == 1

    mine = {"jwks.json": json.dumps(new_key_set())}  # made by hand, or rotated
    api.put(SECRETS, {**_stored(api), "stringData": mine})
    reconciler.reconcile(NS)
    assert _stored(api)["stringData"] == mine
    writes = [r for r in api.state.requests if KEYS in r.path and r.method in ("PUT", "PATCH", "DELETE")]
    assert writes == []

    api.remove(AGENTS, NS, "assistant")  # nothing left to serve: the keys stay for when it comes back
    reconciler.reconcile(NS)
    assert _stored(api)["stringData"] == mine


def test_no_secret_where_no_extension_server_runs(api: FakeApiServer, kube: Kube) -> None:
    _seed(api, server("tools", "http://tools.mcp.svc:8080/mcp"))
    Reconciler(kube, SETTINGS).reconcile(NS)
    assert api.get(SECRETS, NS, KEYS) is None


class _Racing(Kube):
    """Someone creates the Secret between our get and our create."""

    def __init__(self, status: int) -> None:
        self.status = status

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return None

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        raise KubeError("POST secrets", self.status)


def test_a_secret_created_meanwhile_is_kept_and_other_errors_surface() -> None:
    assert ensure_session_keys(_Racing(409), NS) is False
    with pytest.raises(KubeError):
        ensure_session_keys(_Racing(403), NS)
