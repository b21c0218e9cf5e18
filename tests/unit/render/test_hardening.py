"""The rendered bootstrap's defences: slow clients, chunked bodies past the limit, request ids, the access log, admin.

Each test reads the bootstrap the renderer produces (checked against Envoy's typed
``Bootstrap`` message); real Envoy runs them in tests/integration (test_slow_clients,
test_local_replies, test_access_log, test_lifecycle).
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from controller.render.meta import ControllerSettings
from controller.render.sidecar import sidecar_options
from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.render.bootstrap import render_bootstrap
from extproc.render.options import BootstrapOptions

PIPELINE = Registry().build_pipeline(DEFAULT_PIPELINE)
NEEDS = PIPELINE.needs
AUTO = BootstrapOptions(fast_calls=PIPELINE.fast_call_eras)
"""What ``up`` renders on its default front door ``auto``."""


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = hcm(config)["route_config"]["virtual_hosts"][0]["routes"]
    return found


# -- slow clients ----------------------------------------------------------------------------


def test_request_headers_must_arrive_within_ten_seconds_and_streams_stay_long(catalog: Catalog) -> None:
    manager = hcm(render_bootstrap(catalog, NEEDS, AUTO))
    assert manager["request_headers_timeout"] == "10s"
    assert manager["stream_idle_timeout"] == "3600s"  # GET/SSE streams: unchanged
    assert manager["request_timeout"] == "0s"
    assert all(r["route"]["timeout"] == "0s" for r in routes(render_bootstrap(catalog, NEEDS, AUTO)) if "route" in r)
    assert manager["http2_protocol_options"]["max_concurrent_streams"] == 100


def test_idle_connections_are_shed_as_connections_near_the_limit(catalog: Catalog) -> None:
    overload = render_bootstrap(catalog, NEEDS, BootstrapOptions(max_connections=500))["overload_manager"]
    monitors = {m["name"]: m["typed_config"] for m in overload["resource_monitors"]}
    connections = "envoy.resource_monitors.global_downstream_max_connections"
    assert int(monitors[connections]["max_active_downstream_connections"]) == 500  # int64: a JSON string
    # Without a reactive monitor Envoy never runs its refresh loop, and no action would move.
    assert "envoy.resource_monitors.cgroup_memory" in monitors
    [reduce] = [a for a in overload["actions"] if a["name"] == "envoy.overload_actions.reduce_timeouts"]
    assert reduce["triggers"] == [
        {"name": connections, "scaled": {"scaling_threshold": 0.8, "saturation_threshold": 0.95}}
    ]
    # Only connections without a stream: never a GET/SSE stream or a call awaiting a slow tool.
    assert reduce["typed_config"]["timer_scale_factors"] == [
        {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": "1s"}
    ]
    assert overload["refresh_interval"] == "0.250s"


# -- chunked bodies over the limit -----------------------------------------------------------


def test_a_post_without_content_length_never_meets_envoys_mcp_filter(catalog: Catalog) -> None:
    found = routes(render_bootstrap(catalog, NEEDS, AUTO))
    names = [r.get("name") for r in found]
    assert names[:3] == ["demo oversized", "demo unsized", "demo call modern"]
    unsized = found[1]
    assert unsized["match"] == {
        "path": "/demo/mcp",
        "headers": [
            {"name": ":method", "string_match": {"exact": "POST"}},
            {"name": "content-length", "present_match": False},
        ],
    }
    per_filter = unsized["typed_per_filter_config"]
    assert per_filter["envoy.filters.http.mcp"]["disabled"] is True
    assert per_filter["envoy.filters.http.ext_authz"]["disabled"] is True
    assert "disabled" not in per_filter["envoy.filters.http.ext_proc"]  # the stages still judge it
    assert unsized["route"]["timeout"] == "0s"


def test_no_unsized_route_without_envoys_mcp_filter(catalog: Catalog) -> None:
    names = [r.get("name") for r in routes(render_bootstrap(catalog, NEEDS, BootstrapOptions()))]
    assert not [n for n in names if n and n.endswith(("unsized", "oversized"))]


@pytest.mark.parametrize("options", [AUTO, BootstrapOptions(), BootstrapOptions(front_door="ext_authz")])
def test_envoys_own_413_becomes_a_json_rpc_invalid_request(catalog: Catalog, options: BootstrapOptions) -> None:
    mappers = hcm(render_bootstrap(catalog, NEEDS, options))["local_reply_config"]["mappers"]
    [mapper] = [m for m in mappers if "extension_filter" in m["filter"]]
    expression = mapper["filter"]["extension_filter"]["typed_config"]["expression"]
    assert expression == "response.code_details == 'request_payload_too_large'"  # not the mcp stage's own 413
    assert "status_code" not in mapper  # stays 413
    override = mapper["body_format_override"]
    assert override["content_type"] == "application/json"
    body = json.loads(override["text_format_source"]["inline_string"])
    assert body["error"]["code"] == -32600
    assert "4194304-byte limit" in body["error"]["message"]


# -- request ids and the access log ------------------------------------------------------------


def test_the_request_id_and_original_path_are_always_envoys(catalog: Catalog) -> None:
    manager = hcm(render_bootstrap(catalog, NEEDS, AUTO))
    [early] = manager["early_header_mutation_extensions"]
    assert early["name"] == "envoy.http.early_header_mutation.header_mutation"
    mutations = early["typed_config"]["mutations"]
    removed = [m["remove"] for m in mutations if "remove" in m]
    assert removed[:2] == ["x-request-id", "x-envoy-original-path"]
    # The headers our own routes are chosen by, so no client can pick a backend route or forge a splice.
    assert set(removed[2:]) == {"x-mcp-backend", "x-mcp-splice", "x-mcp-stream"}
    # And every other x-envoy-* a client sends (tests/integration/test_header_allowlist.py).
    assert {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}} in mutations
    assert not manager.get("preserve_external_request_id", False)
    assert manager.get("generate_request_id", True)


FIELDS = {
    "time",
    "request_id",
    "method",
    "path",
    "status",
    "flags",
    "details",
    "mcp_server",
    "mcp_method",
    "mcp_tool",
    "principal",
    "duration_ms",
    "upstream",
}


@pytest.mark.parametrize("options", [AUTO, BootstrapOptions(), BootstrapOptions(front_door="ext_authz")])
def test_the_access_log_is_json_without_query_strings(catalog: Catalog, options: BootstrapOptions) -> None:
    loggers = hcm(render_bootstrap(catalog, NEEDS, options))["access_log"]
    assert loggers
    for logger in loggers:
        log_format = logger["typed_config"]["log_format"]
        assert set(log_format) == {"json_format"}  # no text line whose fields a value could forge
        fields = log_format["json_format"]
        assert set(fields) == FIELDS
        assert fields["path"] == "%PATH(NQ:ORIG_OR_PATH)%"
        assert fields["request_id"] == "%REQ(X-REQUEST-ID)%"
        namespace = re.fullmatch(r"%DYNAMIC_METADATA\((.+):tool\)%", fields["mcp_tool"])
        assert namespace is not None
        assert fields["principal"] == f"%DYNAMIC_METADATA({namespace.group(1)}:principal)%"
        assert not [v for v in fields.values() if ":PATH)" in v or "WQ" in v]  # no path with its query


# -- the admin interface -----------------------------------------------------------------------


def _addresses(value: Any) -> list[Any]:
    """Every ``socket_address`` anywhere in ``value``."""
    if isinstance(value, dict):
        here = [value["socket_address"]] if "socket_address" in value else []
        return here + [a for v in value.values() for a in _addresses(v)]
    if isinstance(value, list):
        return [a for v in value for a in _addresses(v)]
    return []


def test_admin_is_a_private_unix_socket_outside_the_connection_limit(catalog: Catalog) -> None:
    config = render_bootstrap(catalog, NEEDS, BootstrapOptions(admin_socket="/run/x/admin.sock"))
    assert config["admin"] == {
        "address": {"pipe": {"path": "/run/x/admin.sock", "mode": 0o600}},
        "ignore_global_conn_limit": True,
    }
    # The only TCP addresses: the agents' listener, the extension server's and the MCP servers'.
    listener = config["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert listener in _addresses(config)
    assert not _addresses(config["admin"])


def test_no_admin_interface_unless_asked(catalog: Catalog) -> None:
    assert "admin" not in render_bootstrap(catalog, NEEDS, BootstrapOptions())


def test_the_sidecars_admin_socket_is_in_the_shared_empty_dir() -> None:
    settings = ControllerSettings(socket_dir="/var/run/mcp-extproc")
    options = sidecar_options(settings, 4 << 20, PIPELINE.fast_call_eras)
    assert options.admin_socket == "/var/run/mcp-extproc/envoy-admin.sock"
    assert not hasattr(settings, "admin_port")
