"""Gateway API + Envoy Gateway and Istio attachment, validated against the upstream CRDs."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from google.protobuf import json_format

from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from extproc.render.bootstrap import load_envoy_types
from tests.kubedocs import agent, server
from tests.kubeschemas import validate_any

GW = {
    "parentRefs": [{"name": "mcp-gateway", "namespace": "gateways", "sectionName": "https"}],
    "hostnames": ["mcp.test"],
}


def render(*docs: dict[str, Any]) -> Any:
    [(_view, rendered)] = render_documents(list(docs), ControllerSettings()).values()
    for obj in rendered.objects:
        validate_any(obj)
    return rendered, {(o["kind"], o["metadata"]["name"]): o for o in rendered.objects}


def test_gateway_mode_renders_routes_policy_and_the_shared_server() -> None:
    rendered, out = render(
        server("tools", "http://tools.mcp.svc.cluster.local:8080/v1/mcp", gateway=GW),
        server("local", "http://local.agents.svc/mcp", gateway={"parentRefs": [{"name": "gw"}]}),
        server("external", "https://mcp.example.test/mcp", gateway=GW),
    )
    route = out[("HTTPRoute", "mcp-tools")]["spec"]
    assert route["parentRefs"] == [
        {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "mcp-gateway",
            "namespace": "gateways",
            "sectionName": "https",
        }
    ]
    assert route["hostnames"] == ["mcp.test"]
    [rule] = route["rules"]
    assert rule["matches"] == [{"path": {"type": "Exact", "value": "/tools/mcp"}}]
    assert rule["filters"][0]["urlRewrite"]["path"] == {"type": "ReplaceFullPath", "replaceFullPath": "/v1/mcp"}
    assert rule["backendRefs"] == [{"group": "", "kind": "Service", "name": "tools", "namespace": "mcp", "port": 8080}]
    assert rule["timeouts"] == {"request": "0s"}
    assert "namespace" not in out[("HTTPRoute", "mcp-local")]["spec"]["rules"][0]["backendRefs"][0]
    policy = out[("EnvoyExtensionPolicy", "mcp-extproc")]["spec"]
    assert [t["name"] for t in policy["targetRefs"]] == ["mcp-local", "mcp-tools"]
    [ext] = policy["extProc"]
    assert ext["backendRefs"][0]["name"] == "mcp-extproc"
    assert ext["failOpen"] is False
    assert ext["processingMode"]["request"] == {"body": "Buffered"}
    assert ("Deployment", "mcp-extproc") in out and ("Service", "mcp-extproc") in out
    assert "not an in-cluster Service" in rendered.problems[("MCPServer", "external")][0]
    assert ("HTTPRoute", "mcp-external") not in out


def test_upstream_crd_schema_catches_a_wrong_route() -> None:
    _rendered, out = render(server("tools", "http://tools.mcp.svc:8080/mcp", gateway=GW))
    route = out[("HTTPRoute", "mcp-tools")]
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Glob"
    with pytest.raises(jsonschema.ValidationError):
        validate_any(route)


def test_istio_envoy_filter_inserts_ext_proc_for_the_agent_workloads() -> None:
    rendered, out = render(
        server("tools", "http://tools.mcp.svc:8080/mcp"),
        server("remote", "https://mcp.example.test/mcp"),
        agent("assistant", ["tools", "remote"], attachment="Istio"),
    )
    spec = out[("EnvoyFilter", "mcp-agent-assistant")]["spec"]
    assert spec["workloadSelector"] == {"labels": {"app": "assistant"}}
    insert, *vhosts = spec["configPatches"]
    assert insert["applyTo"] == "HTTP_FILTER" and insert["match"]["context"] == "SIDECAR_OUTBOUND"
    assert insert["patch"]["operation"] == "INSERT_BEFORE"
    http_filter = insert["patch"]["value"]
    # The patch values are real Envoy config: they parse into Envoy's own messages.
    load_envoy_types()
    parsed = json_format.ParseDict(http_filter, http_connection_manager_pb2.HttpFilter())
    assert parsed.disabled  # other outbound traffic of the pod never reaches ext_proc
    config = http_filter["typed_config"]
    assert (
        config["grpc_service"]["envoy_grpc"]["cluster_name"] == "outbound|50051||mcp-extproc.agents.svc.cluster.local"
    )
    assert config["failure_mode_allow"] is False
    assert [v["match"]["routeConfiguration"]["vhost"]["name"] for v in vhosts] == [
        "tools.mcp.svc.cluster.local:8080",
        "mcp.example.test:443",
    ]
    for vhost in vhosts:
        json_format.ParseDict(vhost["patch"]["value"], route_components_pb2.VirtualHost())
    assert ("Deployment", "mcp-extproc") in out
    assert ("ConfigMap", "mcp-agent-assistant") not in out  # no injected sidecar in Istio mode
    assert rendered.problems == {}


def test_istio_needs_match_labels() -> None:
    doc = agent("assistant", ["tools"], attachment="Istio")
    doc["spec"]["selector"] = {"matchExpressions": [{"key": "app", "operator": "Exists"}]}
    rendered, out = render(server("tools", "http://tools.mcp.svc:8080/mcp"), doc)
    assert ("EnvoyFilter", "mcp-agent-assistant") not in out
    assert "matchLabels only" in rendered.problems[("MCPAgent", "assistant")][0]
