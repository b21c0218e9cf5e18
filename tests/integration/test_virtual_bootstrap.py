"""The bootstrap of an ``MCPVirtualServer``: ``envoy --mode validate`` accepts it.

(Its routes, without Envoy: tests/unit/render/test_virtual_routes.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import parse_documents
from extproc.core.registry import Registry
from extproc.render.bootstrap import render_bootstrap_yaml
from extproc.render.options import BootstrapOptions
from tests.procs import assert_envoy_accepts

pytestmark = pytest.mark.integration

API = "mcp.extproc.io/v1alpha1"
DEFAULT = Registry().build_pipeline(DEFAULT_PIPELINE)
OPTIONS = {
    "ext_proc": BootstrapOptions(),
    "auto": BootstrapOptions(fast_calls=DEFAULT.fast_call_eras),
}


def server(name: str, url: str) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "MCPServer", "metadata": {"name": name}, "spec": {"url": url}}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_envoy_accepts_a_virtual_server_s_bootstrap(options: BootstrapOptions, tmp_path: Path) -> None:
    catalog = parse_documents(
        [
            server("a", "http://127.0.0.1:8101/mcp"),
            server("b", "https://mcp.example.test/v1/mcp"),
            {
                "apiVersion": API,
                "kind": "MCPVirtualServer",
                "metadata": {"name": "tools"},
                "spec": {"servers": [{"name": "a", "prefix": "a_"}, {"name": "b"}]},
            },
        ],
        "resources.yaml",
    )
    rendered = render_bootstrap_yaml(catalog, DEFAULT.needs, options)
    routes = yaml.safe_load(rendered)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    fast = ["tools call via a", "tools call via b"] if options.fast_calls else []
    after = ["tools oversized", "tools call modern"] if options.fast_calls else []
    assert [r["name"] for r in routes if r["match"].get("path") == "/tools/mcp"] == [
        *fast,
        "tools via a",
        "tools via b",
        *after,
        "tools",
    ]
    assert_envoy_accepts(rendered, tmp_path / "envoy.yaml")
