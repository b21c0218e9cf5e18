"""The extension server's files the controller renders for a sidecar: valid for `serve`, secrets apart.

(That Envoy accepts the sidecar's bootstrap: tests/integration/controller/test_sidecar.py.)
"""

from __future__ import annotations

from pathlib import Path

import yaml

from extproc.config.pipeline_file import DEFAULT_PIPELINE, load_pipeline_config
from extproc.config.resources import load_resources
from tests.kubedocs import agent, rendered_objects, secret, server


def test_extension_server_files_load_with_the_local_loader(tmp_path: Path) -> None:
    out = rendered_objects(
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
    out = rendered_objects(
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
