"""The sidecar's Envoy bootstrap and the extension server's files: valid for Envoy and for `serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from extproc.config.pipeline_file import DEFAULT_PIPELINE, load_pipeline_config
from extproc.config.resources import load_resources
from tests.procs import assert_envoy_accepts
from tests.unit.controller.fixtures import agent, secret, server
from tests.unit.controller.schemas import validate_any

SETTINGS = ControllerSettings()


def objects(*docs: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    [(_view, rendered)] = render_documents(list(docs), SETTINGS).values()
    for obj in rendered.objects:
        validate_any(obj)
    return {(o["kind"], o["metadata"]["name"]): o for o in rendered.objects}


def test_sidecar_bootstrap_passes_envoy_validate_and_is_stream_safe(tmp_path: Path) -> None:
    out = objects(
        server("local", "http://tools.mcp.svc.cluster.local:8080/mcp"),
        server("remote", "https://mcp.example.test/v1/mcp"),
        server("unused", "http://other.mcp.svc:80/mcp"),
        agent("assistant", ["local", "remote"]),
    )
    config_map = out[("ConfigMap", "mcp-agent-assistant")]
    assert_envoy_accepts(config_map["data"]["envoy.yaml"], tmp_path / "envoy.yaml")
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    assert bootstrap["admin"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15000}
    listener = bootstrap["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15001}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["stream_idle_timeout"] == "3600s"
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    mcp_paths = [p for r in routes if (p := r["match"].get("path")) and p.endswith("/mcp")]
    # Per server: oversized bodies (Envoy's MCP filter off), the auto front door's fast
    # tools/call routes (modern, legacy), then its own.
    assert mcp_paths == ["/local/mcp"] * 4 + ["/remote/mcp"] * 4  # + the well-known and 404 routes
    names = ["local oversized", "local call modern", "local call legacy", "local"]
    assert [r["name"] for r in routes[:4]] == names
    assert all(r["route"]["timeout"] == "0s" for r in routes[:8])
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    pipe = clusters["mcp_extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert pipe == {"pipe": {"path": "/var/run/mcp-extproc/extproc.sock"}}
    # The fast routes' check goes over HTTP to the second socket in the same emptyDir.
    authz = clusters["mcp_extproc_authz_http"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert authz["endpoint"]["address"] == {"pipe": {"path": "/var/run/mcp-extproc/authz.sock"}}
    assert "mcp_server_unused" not in clusters


def test_extension_server_files_load_with_the_local_loader(tmp_path: Path) -> None:
    out = objects(
        server("local", "http://tools.mcp.svc.cluster.local:8080/mcp", deniedTools=["rm*"]),
        server("other", "http://other.mcp.svc:80/mcp"),
        agent("assistant", ["local", "missing"]),
    )
    data = out[("ConfigMap", "mcp-agent-assistant")]["data"]
    (tmp_path / "resources.yaml").write_text(data["resources.yaml"])
    (tmp_path / "pipeline.yaml").write_text(data["pipeline.yaml"])
    catalog = load_resources(tmp_path / "resources.yaml")
    assert sorted(catalog.servers) == ["local"]
    assert catalog.servers["local"].spec.denied_tools == ["rm*"]
    assert [r.name for r in catalog.agents["assistant"].spec.mcp_server_refs] == ["local"]
    names = [s.name for s in load_pipeline_config(tmp_path / "pipeline.yaml").stages]
    assert names == [s.name for s in DEFAULT_PIPELINE.stages]


def test_credentials_go_in_a_secret_not_the_config_map(tmp_path: Path) -> None:
    auth = {"bearer": {"secretRef": {"name": "upstream-token", "key": "token"}}}
    out = objects(
        server("local", "http://tools.mcp.svc:8080/mcp", upstreamAuth=auth),
        agent("assistant", ["local"]),
        secret("upstream-token", token="s3cr3t-value"),
    )
    config_map = out[("ConfigMap", "mcp-agent-assistant")]
    assert "resources.yaml" not in config_map["data"]
    assert "s3cr3t-value" not in yaml.safe_dump(config_map)
    stored = out[("Secret", "mcp-agent-assistant")]["stringData"]["resources.yaml"]
    (tmp_path / "resources.yaml").write_text(stored)
    catalog = load_resources(tmp_path / "resources.yaml")
    upstream = catalog.servers["local"].spec.upstream_auth
    assert upstream is not None and upstream.bearer is not None and upstream.bearer.secret_ref is not None
    assert catalog.secret_value(upstream.bearer.secret_ref) == "s3cr3t-value"
