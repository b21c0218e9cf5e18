"""An ``MCPVirtualServer`` in the bootstrap and in `mcp-extproc check`: its routes, and what a pipeline needs.

(That Envoy accepts the bootstrap, ``envoy --mode validate``: tests/integration/test_virtual_bootstrap.py.)
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig, StageSpec
from extproc.config.resources import Catalog, parse_documents
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.render.bootstrap import render_bootstrap
from extproc.render.options import BootstrapOptions

API = "mcp.extproc.io/v1alpha1"
DEFAULT = Registry().build_pipeline(DEFAULT_PIPELINE)
OPTIONS = {
    "ext_proc": BootstrapOptions(),
    # `render envoy`'s default front door: fast tool-call routes in front of each server's own.
    "auto": BootstrapOptions(fast_calls=DEFAULT.fast_call_eras),
}


def server(name: str, port: int, tools: list[str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": f"http://127.0.0.1:{port}/upstream/mcp"}
    if tools is not None:
        spec["allowedTools"] = tools
    return {"apiVersion": API, "kind": "MCPServer", "metadata": {"name": name}, "spec": spec}


def virtual(servers: list[dict[str, str]], name: str = "tools") -> dict[str, Any]:
    return {"apiVersion": API, "kind": "MCPVirtualServer", "metadata": {"name": name}, "spec": {"servers": servers}}


def catalog_of(*docs: dict[str, Any]) -> Catalog:
    return parse_documents(list(docs), "resources.yaml")


TOOLS = catalog_of(server("a", 8101), server("b", 8102), virtual([{"name": "a", "prefix": "a_"}, {"name": "b"}]))


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    found: list[dict[str, Any]] = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return found


def ext_proc_server(route: dict[str, Any]) -> str:
    """The server name ext_proc's per-route gRPC metadata gives our stages."""
    proc = route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
    assert not proc.get("disabled", False)
    [entry] = [m for m in proc["overrides"]["grpc_initial_metadata"] if m["key"] == "x-mcp-server"]
    value: str = entry["value"]
    return value


def on_path(config: dict[str, Any], path: str) -> list[dict[str, Any]]:
    return [r for r in routes(config) if r["match"].get("path") == path]


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_each_backend_has_a_route_chosen_by_the_backend_header(options: BootstrapOptions) -> None:
    config = render_bootstrap(TOOLS, DEFAULT.needs, options)
    clusters = {c["name"] for c in config["static_resources"]["clusters"]}
    on_virtual = on_path(config, "/tools/mcp")
    by_backend = [r for r in on_virtual if r["name"].startswith("tools via ")]
    assert len(by_backend) == 2
    last = on_virtual[-1]
    for route, name in zip(by_backend, ["a", "b"], strict=True):
        assert route["match"]["headers"] == [{"name": "x-mcp-backend", "string_match": {"exact": name}}]
        assert route["route"]["cluster"] == f"mcp_server_{name}"
        assert route["route"]["cluster"] in clusters
        assert route["route"]["prefix_rewrite"] == "/upstream/mcp"  # the backend's own path
        assert route["route"]["timeout"] == "0s"  # SSE answers stay open
        assert route["request_headers_to_remove"] == ["x-mcp-backend"]
        assert route["response_headers_to_remove"] == ["mcp-session-id"]
        # The stages see the virtual server, not the backend, as the route's server.
        assert ext_proc_server(route) == "tools"
    assert "headers" not in last["match"]


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_the_last_route_of_the_virtual_server_answers_a_json_rpc_500(options: BootstrapOptions) -> None:
    config = render_bootstrap(TOOLS, DEFAULT.needs, options)
    last = on_path(config, "/tools/mcp")[-1]
    assert "route" not in last
    assert last["direct_response"]["status"] == 500
    body = json.loads(last["direct_response"]["body"]["inline_string"])
    assert body["jsonrpc"] == "2.0"
    assert body["id"] is None
    assert body["error"]["code"] == INTERNAL_ERROR
    assert "'tools'" in body["error"]["message"]
    headers = {h["header"]["key"]: h["header"]["value"] for h in last["response_headers_to_add"]}
    assert headers["content-type"] == "application/json"
    assert ext_proc_server(last) == "tools"  # the stage answers before Envoy ever gets here
    # Envoy takes the first route that matches: the header routes must come first.
    names = [r["name"] for r in routes(config)]
    assert names.index(last["name"]) > max(names.index("tools via a"), names.index("tools via b"))


def test_the_backends_keep_their_own_routes_and_the_404_lists_the_virtual_server() -> None:
    config = render_bootstrap(TOOLS, DEFAULT.needs, OPTIONS["ext_proc"])
    for name in ("a", "b"):
        [own] = on_path(config, f"/{name}/mcp")
        assert ext_proc_server(own) == name
        assert "headers" not in own["match"]
    [not_found] = [r for r in routes(config) if r["name"] == "not_found"]
    message = json.loads(not_found["direct_response"]["body"]["inline_string"])["error"]["message"]
    assert "/tools/mcp" in message


def test_a_backend_missing_from_the_catalog_gets_no_route() -> None:
    catalog = catalog_of(server("a", 8101), virtual([{"name": "a"}, {"name": "ghost"}]))
    config = render_bootstrap(catalog, DEFAULT.needs, OPTIONS["ext_proc"])
    headers = [r["match"].get("headers") for r in on_path(config, "/tools/mcp")]
    assert headers == [[{"name": "x-mcp-backend", "string_match": {"exact": "a"}}], None]


def test_the_ext_authz_front_door_refuses_a_virtual_server_by_name() -> None:
    with pytest.raises(ConfigError, match=r"MCPVirtualServer tools: a virtual server needs ext_proc") as refused:
        render_bootstrap(TOOLS, DEFAULT.needs, BootstrapOptions(front_door="ext_authz"))
    assert "--front-door" in str(refused.value)
    # Without a virtual server, ext_authz renders.
    plain = catalog_of(server("a", 8101))
    assert on_path(render_bootstrap(plain, DEFAULT.needs, BootstrapOptions(front_door="ext_authz")), "/a/mcp")


# -- mcp-extproc check --------------------------------------------------------------------------


def test_a_pipeline_without_the_virtual_stage_is_an_error_for_a_virtual_server() -> None:
    config = PipelineConfig(stages=[StageSpec(name=n) for n in ("authn", "mcp", "allowlist", "session")])
    pipeline = Registry().build_pipeline(config)
    errors, _ = pipeline.check_split(TOOLS)
    [problem] = [e for e in errors if "virtual" in e]
    assert problem.startswith("pipeline: MCPVirtualServer tools needs the 'virtual' stage")
    assert "'allowlist'" in problem  # it shows the pipeline as it is
    # The same pipeline is fine without a virtual server ...
    plain = catalog_of(server("a", 8101), server("b", 8102))
    assert not [e for e in pipeline.check_split(plain)[0] if "virtual" in e]
    # ... and the default pipeline has the stage.
    assert not [e for e in DEFAULT.check_split(TOOLS)[0] if "virtual" in e]


def _virtual_warnings(catalog: Catalog) -> list[str]:
    errors, warnings = DEFAULT.check_split(catalog)
    assert not [e for e in errors if "'virtual'" in e]
    return [w for w in warnings if w.startswith("stage 'virtual'")]


def test_the_virtual_stage_warns_of_a_tool_two_unprefixed_backends_declare() -> None:
    catalog = catalog_of(
        server("a", 8101, ["echo", "add", "get_*"]),
        server("b", 8102, ["echo", "sub", "get_*"]),
        virtual([{"name": "a"}, {"name": "b"}]),
    )
    [warning] = _virtual_warnings(catalog)  # the glob get_* is no declared name
    assert warning.startswith("stage 'virtual': warning: MCPVirtualServer 'tools': 'echo'")
    assert "'a' and 'b'" in warning
    assert "prefix" in warning


def test_a_prefix_on_one_backend_settles_the_conflict() -> None:
    catalog = catalog_of(
        server("a", 8101, ["echo"]),
        server("b", 8102, ["echo"]),
        virtual([{"name": "a"}, {"name": "b", "prefix": "b_"}]),
    )
    assert _virtual_warnings(catalog) == []


def test_each_replicas_stream_tickets_go_to_its_own_stream_socket() -> None:
    from extproc.streams import StreamOffers, replica_tag

    sockets = ("/run/a/streams.sock", "/run/b/streams.sock")
    one = render_bootstrap(TOOLS, DEFAULT.needs, BootstrapOptions(streams_unix=sockets[0]))
    [stream] = [r for r in on_path(one, "/tools/mcp") if r["name"] == "tools stream"]
    assert stream["match"]["headers"] == [{"name": "x-mcp-stream", "present_match": True}]  # one replica: any ticket
    both = render_bootstrap(
        TOOLS, DEFAULT.needs, BootstrapOptions(streams_unix=sockets[0], streams_replicas=sockets[1:])
    )
    streams = [r for r in on_path(both, "/tools/mcp") if r["name"].startswith("tools stream")]
    clusters = {c["name"]: c for c in both["static_resources"]["clusters"]}
    offers = StreamOffers()
    for route, socket_path in zip(streams, sockets, strict=True):
        offers.tag = replica_tag(socket_path)
        ticket = offers.offer(lambda: None)  # type: ignore[arg-type,return-value]
        [header] = route["match"]["headers"]
        assert header["name"] == "x-mcp-stream" and ticket.startswith(header["string_match"]["prefix"])
        endpoint = clusters[route["route"]["cluster"]]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
        assert endpoint["endpoint"]["address"]["pipe"]["path"] == socket_path
    assert len({r["route"]["cluster"] for r in streams}) == 2


def test_a_modern_call_through_the_virtual_server_takes_the_check_and_a_fast_backend_route() -> None:
    config = render_bootstrap(TOOLS, DEFAULT.needs, OPTIONS["auto"])
    names = [r["name"] for r in on_path(config, "/tools/mcp")]
    # Envoy takes the first match: the fast backend routes (both headers) before the ordinary
    # ones (x-mcp-backend only); the Check's own route after them, before the 500.
    assert names == [
        "tools call via a",
        "tools call via b",
        "tools via a",
        "tools via b",
        "tools oversized",
        "tools call modern",
        "tools",
    ]
    by_name = {r["name"]: r for r in on_path(config, "/tools/mcp")}
    call = by_name["tools call modern"]
    assert {h["name"] for h in call["match"]["headers"]} == {":method", "mcp-method", "mcp-protocol-version"}
    per_filter = call["typed_per_filter_config"]
    assert per_filter["envoy.filters.http.ext_proc"]["disabled"] is True
    extensions = per_filter["envoy.filters.http.ext_authz"]["check_settings"]["context_extensions"]
    assert extensions == {"x-mcp-server": "tools", "x-mcp-call": "modern"}
    assert call["direct_response"]["status"] == 500  # reached only if the Check routed nothing

    fast = by_name["tools call via a"]
    assert fast["match"]["headers"] == [
        {"name": "x-mcp-backend", "string_match": {"exact": "a"}},
        {"name": "x-mcp-splice", "present_match": True},
    ]
    assert fast["route"]["cluster"] == "mcp_server_a"
    assert fast["request_headers_to_remove"] == ["x-mcp-backend", "x-mcp-splice"]
    assert fast["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True
    assert fast["typed_per_filter_config"]["envoy.filters.http.lua"]["name"] == "splice"
    filters = [
        f["name"]
        for f in config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
            "http_filters"
        ]
    ]
    assert filters.index("envoy.filters.http.lua") == filters.index("envoy.filters.http.router") - 1


def test_without_fast_calls_there_is_no_splice() -> None:
    config = render_bootstrap(TOOLS, DEFAULT.needs, OPTIONS["ext_proc"])
    assert not [r for r in on_path(config, "/tools/mcp") if "call" in r["name"]]
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert "envoy.filters.http.lua" not in [f["name"] for f in filters["http_filters"]]
