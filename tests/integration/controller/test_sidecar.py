"""The sidecar's Envoy bootstrap as the controller renders it: ``envoy --mode validate`` accepts it; stream-safe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.kubedocs import agent, rendered_objects, server
from tests.procs import assert_envoy_accepts

pytestmark = pytest.mark.integration


def test_sidecar_bootstrap_passes_envoy_validate_and_is_stream_safe(tmp_path: Path) -> None:
    out = rendered_objects(
        server("local", "http://tools.mcp.svc.cluster.local:8080/mcp"),
        server("remote", "https://mcp.example.test/v1/mcp"),
        server("unused", "http://other.mcp.svc:80/mcp"),
        agent("assistant", ["local", "remote"]),
    )
    config_map = out[("ConfigMap", "mcp-agent-assistant")]
    assert_envoy_accepts(config_map["data"]["envoy.yaml"], tmp_path / "envoy.yaml")
    bootstrap = yaml.safe_load(config_map["data"]["envoy.yaml"])
    # Envoy's admin API: a 0600 unix socket in the sidecars' emptyDir, never a port on the pod's loopback.
    assert bootstrap["admin"]["address"] == {"pipe": {"path": "/var/run/mcp-extproc/envoy-admin.sock", "mode": 0o600}}
    listener = bootstrap["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 15001}
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["stream_idle_timeout"] == "3600s"
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    mcp_paths = [p for r in routes if (p := r["match"].get("path")) and p.endswith("/mcp")]
    # Per server: oversized and unsized bodies (Envoy's MCP filter off), the auto front
    # door's fast tools/call routes (modern, legacy), then its own.
    assert mcp_paths == ["/local/mcp"] * 5 + ["/remote/mcp"] * 5  # + the well-known and 404 routes
    names = ["local oversized", "local unsized", "local call modern", "local call legacy", "local"]
    assert [r["name"] for r in routes[:5]] == names
    assert all(r["route"]["timeout"] == "0s" for r in routes[:10])
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    pipe = clusters["mcp_extproc"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert pipe == {"pipe": {"path": "/var/run/mcp-extproc/extproc.sock"}}
    # The fast routes' check goes over HTTP to the second socket in the same emptyDir.
    authz = clusters["mcp_extproc_authz_http"]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert authz["endpoint"]["address"] == {"pipe": {"path": "/var/run/mcp-extproc/authz.sock"}}
    assert "mcp_server_unused" not in clusters
