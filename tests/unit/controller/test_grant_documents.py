"""Grants and consents in the extension servers' resources.yaml: those of the servers (and virtual
servers) each one serves, and no other; loadable by ``serve``; the deploy manifests list the kinds."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import yaml

from controller.render.crds import CRD_KINDS
from controller.render.view import CUSTOM_KINDS
from controller.runtime.kube import KINDS
from extproc.config.resources import Catalog, load_resources
from tests.kubedocs import DEPLOY, agent, kustomize_objects, rendered_objects, server

API = "mcp.extproc.io/v1alpha1"
ALICE = {"user": "alice", "agent": "assistant"}
GW = {"parentRefs": [{"name": "gw"}]}


def grant(name: str, *targets: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPAccessGrant",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {"targetRefs": list(targets), "subject": ALICE, "maxTrust": "high"},
    }


def consent(name: str, ref: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPConsent",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {"serverRef": ref, "subject": ALICE, "consentedTrust": "medium", **spec},
    }


def virtual(name: str, *backends: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPVirtualServer",
        "metadata": {"name": name, "namespace": "agents"},
        "spec": {"servers": [{"name": b, "prefix": f"{b}_"} for b in backends]},
    }


DEMO = {"name": "demo"}
OTHER = {"name": "other"}
TOOLS = {"kind": "MCPVirtualServer", "name": "tools"}
DOCS = [
    server("demo", "http://demo.mcp.svc:8080/mcp"),
    server("other", "http://other.mcp.svc:8080/mcp"),
    server("backend", "http://backend.mcp.svc:8080/mcp"),
    virtual("tools", "backend"),
    agent("assistant", ["demo"], mcpServerRefs=[DEMO, TOOLS]),
    agent("helper", ["other"]),
    grant("demo-only", DEMO),
    grant("both", DEMO, OTHER),
    grant("other-only", OTHER),
    grant("through-tools", TOOLS),
    grant("ghost", {"name": "ghost"}),
    consent("on-demo", DEMO, expiresAt="2026-12-31T00:00:00Z", revoked=True),
    consent("on-other", OTHER),
    consent("on-tools", TOOLS),
]


def _loaded(data: dict[str, str], tmp_path: Path, name: str) -> Catalog:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data["resources.yaml"])
    return load_resources(path)  # what `serve -f` loads: the reference checks pass


def test_a_sidecar_carries_the_grants_and_consents_of_its_agents_servers_only(tmp_path: Path) -> None:
    out = rendered_objects(*DOCS)
    assistant = _loaded(out[("ConfigMap", "mcp-agent-assistant")]["data"], tmp_path, "assistant")
    assert sorted(assistant.grants) == ["both", "demo-only", "through-tools"]
    assert [r.name for r in assistant.grants["both"].spec.target_refs] == ["demo"]  # trimmed to what it serves
    assert sorted(assistant.consents) == ["on-demo", "on-tools"]
    on_demo = assistant.consents["on-demo"].spec
    assert on_demo.expires_at == datetime.datetime(2026, 12, 31, tzinfo=datetime.UTC) and on_demo.revoked
    assert [g.name for g in assistant.grants_for("backend", "tools")] == ["through-tools"]
    helper = _loaded(out[("ConfigMap", "mcp-agent-helper")]["data"], tmp_path, "helper")
    assert sorted(helper.grants) == ["both", "other-only"]
    assert [r.name for r in helper.grants["both"].spec.target_refs] == ["other"]
    assert sorted(helper.consents) == ["on-other"]


def test_the_shared_extension_server_carries_those_of_the_routed_servers(tmp_path: Path) -> None:
    docs = [
        server("demo", "http://demo.mcp.svc:8080/mcp", gateway=GW),
        server("other", "http://other.mcp.svc:8080/mcp"),
        grant("demo-only", DEMO),
        grant("other-only", OTHER),
        consent("on-demo", DEMO),
        consent("on-other", OTHER),
    ]
    out = rendered_objects(*docs)
    shared = _loaded(out[("ConfigMap", "mcp-extproc")]["data"], tmp_path, "shared")
    assert sorted(shared.grants) == ["demo-only"] and sorted(shared.consents) == ["on-demo"]


def test_a_ref_of_the_wrong_kind_stays_out_of_the_sidecar(tmp_path: Path) -> None:
    # The namespace reports it (ResolvedRefs=False); the sidecar must still load its file.
    wrong = {"kind": "MCPVirtualServer", "name": "demo"}
    out = rendered_objects(*DOCS, grant("wrong-kind", wrong), consent("wrong-kind", wrong))
    assistant = _loaded(out[("ConfigMap", "mcp-agent-assistant")]["data"], tmp_path, "assistant")
    assert "wrong-kind" not in assistant.grants and "wrong-kind" not in assistant.consents


def test_a_change_to_a_grant_changes_the_sidecars_configuration() -> None:
    # What the watch delivers is re-rendered and applied: the ConfigMap's content changes, and
    # the extension server reloads resources.yaml when it changes (no pod restart).
    before = rendered_objects(*DOCS)[("ConfigMap", "mcp-agent-assistant")]["data"]["resources.yaml"]
    changed = [d for d in DOCS if d["metadata"]["name"] != "demo-only"]
    after = rendered_objects(*changed)[("ConfigMap", "mcp-agent-assistant")]["data"]["resources.yaml"]
    kinds = [(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(after)]
    assert ("MCPAccessGrant", "demo-only") not in kinds and ("MCPAccessGrant", "both") in kinds
    assert before != after


def test_every_custom_kind_is_watched_generated_installed_and_permitted() -> None:
    plurals = {k.kind: k.plural for k in CRD_KINDS}
    assert set(CUSTOM_KINDS) == set(plurals)
    assert all(KINDS[k].plural == plurals[k] for k in CUSTOM_KINDS)
    objects = kustomize_objects(DEPLOY)
    installed = {o["spec"]["names"]["kind"] for o in objects if o["kind"] == "CustomResourceDefinition"}
    assert installed == set(CUSTOM_KINDS)
    [role] = [o for o in objects if o["kind"] == "ClusterRole"]
    verbs = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for kind in CUSTOM_KINDS:
        assert verbs[("mcp.extproc.io", plurals[kind])] == {"get", "list", "watch"}, kind
        assert verbs[("mcp.extproc.io", f"{plurals[kind]}/status")] >= {"patch"}, kind
