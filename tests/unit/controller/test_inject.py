"""Sidecar injection: the JSON patch gives a valid pod with both sidecars, the env and the volumes.

(That the egress init container's script is valid shell: tests/integration/controller/test_inject.py.)
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import pytest

from controller.render.inject import injection_patch, server_env_name
from controller.render.meta import ControllerSettings
from controller.render.view import build_view
from tests.kubedocs import NS, agent, server
from tests.kubeschemas import validate_core

SETTINGS = ControllerSettings()


def agents(**spec: Any) -> Any:
    view = build_view(
        NS, [server("tools", "http://tools.mcp.svc/mcp"), agent("assistant", ["tools", "web-search"], **spec)]
    )
    return list(view.catalog.agents.values())


def pod(labels: dict[str, str] | None = None, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": NS, "labels": labels or {"app": "assistant"}, **meta},
        "spec": {
            "containers": [
                {"name": "app", "image": "agent:1", "env": [{"name": "KEEP", "value": "1"}]},
                {"name": "helper", "image": "helper:1"},
            ],
            "initContainers": [{"name": "setup", "image": "setup:1"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
        },
    }


def apply(original: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    patched: dict[str, Any] = jsonpatch.apply_patch(copy.deepcopy(original), ops)
    validate_core(patched)
    return patched


def test_matching_pod_gets_sidecars_env_and_volumes() -> None:
    ops, name = injection_patch(pod(), agents(), SETTINGS)
    assert name == "assistant"
    patched = apply(pod(), ops)
    init = patched["spec"]["initContainers"]
    assert [c["name"] for c in init] == ["mcp-extproc", "mcp-envoy", "setup"]  # sidecars start first
    assert all(c.get("restartPolicy") == "Always" for c in init[:2])
    envoy = init[1]
    assert envoy["args"][:2] == ["-c", "/etc/mcp-extproc/envoy.yaml"]
    assert envoy["securityContext"]["runAsNonRoot"] is True
    args = init[0]["args"]
    assert args[args.index("--unix") + 1] == "/var/run/mcp-extproc/extproc.sock"
    assert args[args.index("--authz-http") + 1] == "/var/run/mcp-extproc/authz.sock"  # the same emptyDir
    for container in patched["spec"]["containers"]:
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["MCP_SERVER_TOOLS_URL"] == "http://127.0.0.1:15001/tools/mcp"
        assert env["MCP_SERVER_WEB_SEARCH_URL"] == "http://127.0.0.1:15001/web-search/mcp"
    assert {"name": "KEEP", "value": "1"} in patched["spec"]["containers"][0]["env"]
    volumes = {v["name"]: v for v in patched["spec"]["volumes"]}
    assert volumes["mcp-extproc-socket"]["emptyDir"]["medium"] == "Memory"
    sources = volumes["mcp-extproc-config"]["projected"]["sources"]
    assert sources == [
        {"configMap": {"name": "mcp-agent-assistant"}},
        {"secret": {"name": "mcp-agent-assistant", "optional": True}},
    ]
    assert patched["metadata"]["annotations"]["mcp.extproc.io/injected"] == "assistant"


def test_injection_is_idempotent() -> None:
    ops, _ = injection_patch(pod(), agents(), SETTINGS)
    patched = apply(pod(), ops)
    assert injection_patch(patched, agents(), SETTINGS) == ([], None)
    # Even without our annotation, an existing Envoy sidecar is never added twice.
    del patched["metadata"]["annotations"]["mcp.extproc.io/injected"]
    assert injection_patch(patched, agents(), SETTINGS) == ([], None)


@pytest.mark.parametrize(
    "candidate",
    [
        pod(annotations={"mcp.extproc.io/inject": "false"}),
        pod(labels={"app": "someone-else"}),
    ],
    ids=["opted-out", "not-selected"],
)
def test_pods_left_alone(candidate: dict[str, Any]) -> None:
    assert injection_patch(candidate, agents(), SETTINGS) == ([], None)


def test_istio_agents_are_not_injected() -> None:
    assert injection_patch(pod(), agents(attachment="Istio"), SETTINGS) == ([], None)


def test_sidecar_only_egress_adds_the_iptables_init_container_first() -> None:
    ops, _ = injection_patch(pod(), agents(egress={"sidecarOnly": True}), SETTINGS)
    patched = apply(pod(), ops)
    first = patched["spec"]["initContainers"][0]
    assert first["name"] == "mcp-egress-init"
    assert "restartPolicy" not in first  # a plain init container: runs to completion before the sidecars
    assert set(first["securityContext"]["capabilities"]["add"]) == {"NET_ADMIN", "NET_RAW"}
    script = first["command"][2]
    assert f"--uid-owner {SETTINGS.envoy_uid} -j ACCEPT" in script
    assert script.rstrip().endswith("ip6tables -w -A OUTPUT -j REJECT")
    assert all(c["securityContext"]["runAsUser"] == SETTINGS.envoy_uid for c in patched["spec"]["initContainers"][1:3])


def test_pod_without_lists_gets_them_created() -> None:
    bare = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "labels": {"app": "assistant"}},
        "spec": {"containers": [{"name": "app", "image": "a"}]},
    }
    patched = apply(bare, injection_patch(bare, agents(), SETTINGS)[0])
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["mcp-extproc", "mcp-envoy"]
    assert server_env_name("a.b-c") == "MCP_SERVER_A_B_C_URL"
