"""The bootstrap renderer: stream-safe, fail-closed, and the checked-in example in sync."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog, load_resources, parse_documents
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.render.bootstrap import render_bootstrap, render_bootstrap_yaml
from extproc.render.options import BootstrapOptions, PhaseNeeds

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_NEEDS = Registry().build_pipeline(DEFAULT_PIPELINE).needs


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def test_example_bootstrap_is_in_sync() -> None:
    catalog = load_resources(ROOT / "examples" / "resources.yaml")
    fast = Registry().build_pipeline(DEFAULT_PIPELINE).fast_call_eras  # `render envoy`'s default front door: auto
    rendered = render_bootstrap_yaml(catalog, DEFAULT_NEEDS, BootstrapOptions(fast_calls=fast))
    assert (ROOT / "envoy" / "example-bootstrap.yaml").read_text() == rendered, (
        "envoy/example-bootstrap.yaml is stale; regenerate it (see envoy/README.md)"
    )


def test_routes_are_stream_safe_and_fail_closed(catalog: Catalog) -> None:
    config = render_bootstrap(catalog, DEFAULT_NEEDS, BootstrapOptions(stream_idle_timeout_s=900))
    manager = hcm(config)
    assert manager["stream_idle_timeout"] == "900s"
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["match"] == {"path": "/demo/mcp"}
    assert route["route"]["timeout"] == "0s"
    assert route["route"]["prefix_rewrite"] == "/mcp"
    ext_proc = manager["http_filters"][0]["typed_config"]
    assert ext_proc.get("failure_mode_allow", False) is False
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext_proc["processing_mode"].get("response_body_mode", "NONE") == "NONE"  # switched on per exchange


def test_no_stages_means_no_ext_proc_filter(catalog: Catalog) -> None:
    config = render_bootstrap(catalog, PhaseNeeds(False, False, False, False), BootstrapOptions())
    assert [f["name"] for f in hcm(config)["http_filters"]] == ["envoy.filters.http.router"]


def test_https_upstream_gets_tls_with_sni() -> None:
    doc = {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": "remote"},
        "spec": {"url": "https://mcp.example.test/v1/mcp"},
    }
    config = render_bootstrap(parse_documents([doc], "t"), DEFAULT_NEEDS, BootstrapOptions())
    cluster = config["static_resources"]["clusters"][1]
    assert cluster["type"] == "STRICT_DNS"
    assert cluster["transport_socket"]["typed_config"]["sni"] == "mcp.example.test"
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert endpoint["socket_address"]["port_value"] == 443


def test_bad_extension_address_is_a_config_error(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match="expected host:port"):
        render_bootstrap(catalog, DEFAULT_NEEDS, BootstrapOptions(extproc_tcp="nowhere"))


def test_rendered_yaml_round_trips(catalog: Catalog) -> None:
    text = render_bootstrap_yaml(catalog, DEFAULT_NEEDS, BootstrapOptions(admin_socket="/run/admin.sock"))
    assert yaml.safe_load(text)["admin"]["address"] == {"pipe": {"path": "/run/admin.sock", "mode": 0o600}}


def test_only_get_is_retried_on_409_so_the_keeper_can_step_aside(catalog: Catalog) -> None:
    config = render_bootstrap(catalog, DEFAULT_NEEDS, BootstrapOptions())
    routes = hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    policy = next(r for r in routes if "route" in r)["route"]["retry_policy"]
    assert policy["retry_on"] == "retriable-status-codes"
    assert policy["retriable_status_codes"] == [409]
    assert policy["retriable_request_headers"] == [{"name": ":method", "string_match": {"exact": "GET"}}]


class _YamlCppLoader(yaml.SafeLoader):
    """Reads plain scalars the way Envoy's yaml-cpp does: ``y`` and ``n`` (any case) are booleans too."""


_YamlCppLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN"))


@pytest.mark.parametrize("name", ["n", "y", "on", "off", "yes"])
def test_server_named_like_a_boolean_stays_a_string_for_envoy(name: str) -> None:
    doc = {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": "http://127.0.0.1:9/mcp"},
    }
    text = render_bootstrap_yaml(parse_documents([doc], "t"), DEFAULT_NEEDS, BootstrapOptions())
    as_envoy_reads_it = yaml.load(text, Loader=_YamlCppLoader)  # noqa: S506 - a SafeLoader subclass
    assert as_envoy_reads_it == yaml.safe_load(text)
