"""The routes and clusters of the Envoy bootstrap, one set per MCPServer. Pure: no I/O.

Each ``MCPServer`` named N gets a cluster (its URL's host, TLS for https) and a route
``/N/mcp`` that rewrites the path and host to the upstream's, has no timeout (GET
streams and SSE responses stay open) and names the server to the front-door filter.
Each ``MCPVirtualServer`` named V gets routes ``/V/mcp``: one per backend, taken once the
``virtual`` stage named that backend in ``x-mcp-backend`` (the route is chosen again after
the request body), sending to the backend's cluster with that header removed and the backend's
``Mcp-Session-Id`` removed from its answers; and one for everything else, which the stage
answers itself (should anything get past it, a JSON-RPC 500). Two more routes end the list:
RFC 9728 metadata (answered by the ``authn`` stage, a JSON 404 without it) and a JSON-RPC
404 for every other path.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Final
from urllib.parse import urlsplit

from extproc.config.resources import Catalog, MCPServer, MCPVirtualServer
from extproc.mcp.spec import INTERNAL_ERROR, METHOD_NOT_FOUND
from extproc.render.fast_routes import fast_per_filter, modern_call_match, oversized_route
from extproc.render.filters import socket_address
from extproc.render.options import BootstrapOptions
from extproc.render.splice import splice_per_route
from extproc.render.wire import (
    BACKEND_HEADER,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    MCP_FILTER,
    SERVER_METADATA_KEY,
    SPLICE_HEADER,
    STREAMS_CLUSTER,
)
from extproc.streams import STREAM_HEADER, replica_tag

_T: Final = "type.googleapis.com/"
WELL_KNOWN_PREFIX: Final = "/.well-known/oauth-protected-resource"


def server_cluster_name(server: MCPServer) -> str:
    """The Envoy cluster that reaches ``server``."""
    return f"mcp_server_{server.name}"


def server_cluster(server: MCPServer, buffer_limit: int) -> dict[str, Any]:
    url = urlsplit(server.spec.url)
    tls = url.scheme == "https"
    host = url.hostname or ""
    port = url.port or (443 if tls else 80)
    is_ip = host.replace(".", "").isdigit() or ":" in host
    cluster: dict[str, Any] = {
        "name": server_cluster_name(server),
        "type": "STATIC" if is_ip else "STRICT_DNS",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": buffer_limit,
        "load_assignment": {
            "cluster_name": server_cluster_name(server),
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(host, port)}}]}],
        },
    }
    if tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
            },
        }
    return cluster


def stream_sockets(options: BootstrapOptions) -> list[tuple[str, str]]:
    """(cluster name, unix socket) of every replica's stream service; the first is :data:`STREAMS_CLUSTER`."""
    if options.streams_unix is None:
        return []
    paths = [options.streams_unix, *options.streams_replicas]
    return [(STREAMS_CLUSTER if i == 0 else f"{STREAMS_CLUSTER}_{i}", path) for i, path in enumerate(paths)]


def streams_clusters(options: BootstrapOptions) -> list[dict[str, Any]]:
    """HTTP/1.1 over a unix socket to each stream service (:mod:`extproc.frontdoor.stream_service`)."""
    return [
        {
            "name": name,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"pipe": {"path": path}}}}]}],
            },
        }
        for name, path in stream_sockets(options)
    ]


def per_route(options: BootstrapOptions, server: str | None) -> dict[str, Any]:
    """Per-route config of the front-door filter: the server name, or disabled (``None``)."""
    if options.front_door == "ext_authz":
        authz: dict[str, Any] = {"@type": _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"}
        if server is None:
            authz["disabled"] = True
        else:
            authz["check_settings"] = {"context_extensions": {SERVER_METADATA_KEY: server}}
        return {EXT_AUTHZ_FILTER: authz}
    proc: dict[str, Any] = {"@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"}
    if server is None:
        proc["disabled"] = True
    else:
        proc["overrides"] = {"grpc_initial_metadata": [{"key": SERVER_METADATA_KEY, "value": server}]}
    return {EXT_PROC_FILTER: proc}


def well_known_route() -> dict[str, Any]:
    """RFC 9728 metadata: the ``authn`` stage answers it; without that stage, a JSON 404."""
    return _jsonrpc_404("oauth_protected_resource", WELL_KNOWN_PREFIX, "no protected-resource metadata here")


def _jsonrpc_404(name: str, prefix: str, message: str) -> dict[str, Any]:
    """A route answering everything under ``prefix`` with a 404 and a JSON-RPC ``METHOD_NOT_FOUND`` error."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": METHOD_NOT_FOUND, "message": message}}
    return {
        "name": name,
        "match": {"prefix": prefix},
        "direct_response": {"status": 404, "body": {"inline_string": json.dumps(body)}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
    }


_GET_CONFLICT_RETRY: Final[dict[str, Any]] = {
    # A server allows one GET stream per session and answers a second with 409. When an
    # agent opens its GET stream, the session keeper closes its own first; should the
    # server not have noticed yet, Envoy retries the agent's GET shortly (GETs only:
    # they carry no call, so nothing is ever replayed).
    "retry_on": "retriable-status-codes",
    "retriable_status_codes": [409],
    "num_retries": 3,
    "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
    "retriable_request_headers": [{"name": ":method", "string_match": {"exact": "GET"}}],
}


def server_route(server: MCPServer, options: BootstrapOptions) -> dict[str, Any]:
    url = urlsplit(server.spec.url)
    upstream_path = url.path or "/"
    return {
        "name": server.name,
        "match": {"path": f"/{server.name}/mcp"},
        "route": {
            "cluster": server_cluster_name(server),
            "prefix_rewrite": upstream_path,
            "host_rewrite_literal": url.netloc.rsplit("@", 1)[-1],
            # No route timeout: GET streams and SSE responses stay open.
            "timeout": "0s",
            "retry_policy": _GET_CONFLICT_RETRY,
        },
        "typed_per_filter_config": per_route(options, server.name),
    }


def virtual_routes(
    virtual: MCPVirtualServer, catalog: Catalog, options: BootstrapOptions, *, fast_modern: bool = False
) -> list[dict[str, Any]]:
    """The routes of ``virtual``: its GET stream (to our stream service, chosen by ``x-mcp-stream``),
    one per backend (chosen by ``x-mcp-backend``), then its own.

    ``fast_modern``: a 2026-07-28 ``tools/call`` takes one ext_authz Check (route ``V call
    modern``) instead of ext_proc; the Check sets ``x-mcp-backend`` and ``x-mcp-splice``,
    which pick the backend's fast route (``V call via B``: no ext_proc, the Lua filter
    applies the splice). An announced body over the limit goes to ext_proc first (``V
    oversized``: the ``mcp`` stage answers 413 from the headers).
    """
    path = f"/{virtual.name}/mcp"
    per_filter = {
        **per_route(options, virtual.name),
        # Envoy's MCP parser would only pick a route; the virtual stage picks it here.
        MCP_FILTER: {"@type": _T + "envoy.config.route.v3.FilterConfig", "disabled": True},
    }
    routes: list[dict[str, Any]] = []
    sockets = stream_sockets(options)
    for index, (cluster, socket_path) in enumerate(sockets):
        # One replica: any ticket is its own. Several: each goes where its tag says.
        ticket: dict[str, Any] = (
            {"present_match": True}
            if len(sockets) == 1
            else {"string_match": {"prefix": f"{replica_tag(socket_path)}."}}
        )
        routes.append(
            {
                "name": f"{virtual.name} stream" + (f" {index}" if len(sockets) > 1 else ""),
                "match": {"path": path, "headers": [{"name": STREAM_HEADER, **ticket}]},
                # A stream stays open as long as the agent holds it: no response timeout.
                "route": {"cluster": cluster, "timeout": "0s"},
                "typed_per_filter_config": dict(per_filter),
            }
        )
    backends = [catalog.servers[b.name] for b in virtual.spec.servers if b.name in catalog.servers]
    if fast_modern:
        # Before the ordinary backend routes: a request the Check allowed carries both headers.
        for server in backends:
            route = _backend_route(virtual, server, options, fast=True)
            route["typed_per_filter_config"] = {**fast_per_filter(virtual.name, "modern"), **splice_per_route()}
            routes.append(route)
    for server in backends:
        route = _backend_route(virtual, server, options, fast=False)
        route["typed_per_filter_config"] = dict(per_filter)
        routes.append(route)
    body = {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": INTERNAL_ERROR, "message": f"virtual server {virtual.name!r} did not route this request"},
    }
    own = {
        "name": virtual.name,
        "match": {"path": path},
        "direct_response": {"status": 500, "body": {"inline_string": json.dumps(body)}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "typed_per_filter_config": dict(per_filter),
    }
    if fast_modern:
        routes.append(oversized_route(own, virtual.name, options.max_request_bytes))
        call = copy.deepcopy(own)
        call["name"] = f"{virtual.name} call modern"
        call["match"] = modern_call_match(path)
        call["typed_per_filter_config"] = fast_per_filter(virtual.name, "modern")
        routes.append(call)
    routes.append(own)
    return routes


def _backend_route(
    virtual: MCPVirtualServer, server: MCPServer, options: BootstrapOptions, *, fast: bool
) -> dict[str, Any]:
    """``server``'s route behind ``virtual``: taken on ``x-mcp-backend`` (and, ``fast``, ``x-mcp-splice``)."""
    route = server_route(server, options)
    headers: list[dict[str, Any]] = [{"name": BACKEND_HEADER, "string_match": {"exact": server.name}}]
    if fast:
        headers.append({"name": SPLICE_HEADER, "present_match": True})
    route["name"] = f"{virtual.name} {'call via' if fast else 'via'} {server.name}"
    route["match"] = {"path": f"/{virtual.name}/mcp", "headers": headers}
    route["route"].pop("retry_policy", None)  # no GET reaches a backend through a virtual server
    route["request_headers_to_remove"] = [BACKEND_HEADER, SPLICE_HEADER] if fast else [BACKEND_HEADER]
    # The backend's session id never reaches the agent, whose id is the virtual server's.
    route["response_headers_to_remove"] = ["mcp-session-id"]
    return route


def not_found_route(catalog: Catalog, options: BootstrapOptions) -> dict[str, Any]:
    paths = ", ".join(f"/{name}/mcp" for name in sorted([*catalog.servers, *catalog.virtual_servers]))
    route = _jsonrpc_404("not_found", "/", f"no MCP server at this path; this gateway serves {paths}")
    return {**route, "typed_per_filter_config": per_route(options, None)}
