"""Render the Envoy bootstrap for a set of MCP servers. Pure: no I/O.

Data flow::

    Catalog + BootstrapOptions + PhaseNeeds
        ──▶ plain dict (one listener, one route per MCPServer, one cluster each,
            the ext_proc filter pointing at our gRPC server)
        ──▶ json_format.ParseDict(Bootstrap)   ← typed check: a wrong field name or
                                                 type fails here, not in Envoy
        ──▶ dict (``render_bootstrap``) / YAML (``render_bootstrap_yaml``)

Envoy's typed messages come from ``xds-protos`` (generated from Envoy's
data-plane-api); the renderer imports the ones it packs into ``Any`` fields.

Stream safety: MCP GET streams and SSE responses are long-lived, so routes
have no timeout (``timeout: 0s``) and the connection manager's stream idle
timeout is long (default one hour). The ext_proc filter fails closed
(``failure_mode_allow: false``): with the extension server down, Envoy answers
5xx and the upstream sees nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import yaml

# Imported for their side effect: registering the types packed into Any fields.
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.route.v3 import route_components_pb2  # noqa: F401
from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.extensions.filters.http.mcp.v3 import mcp_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from extproc.config.resources import Catalog, MCPServer
from extproc.core.pipeline import PhaseNeeds
from extproc.errors import ConfigError
from extproc.frontdoor.ext_proc import METADATA_NAMESPACE, SERVER_METADATA_KEY
from extproc.mcp.jsonrpc import DEFAULT_MAX_REQUEST_BYTES
from extproc.render.fast_routes import call_routes, native_mcp_filter, oversized_route, without_authz
from extproc.render.filters import (
    EXTPROC_CLUSTER,
    authz_http_cluster,
    ext_authz_filter,
    ext_authz_http_filter,
    ext_proc_filter,
    extproc_cluster,
    local_replies,
    socket_address,
)

_T = "type.googleapis.com/"
EXT_AUTHZ_NAMESPACE: Final = "envoy.filters.http.ext_authz"
"""Where Envoy puts the dynamic metadata an ext_authz ``Check`` answer carries."""
WELL_KNOWN_PREFIX: Final = "/.well-known/oauth-protected-resource"


def _access_log_format(namespace: str) -> str:
    return (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%" %RESPONSE_CODE% %RESPONSE_FLAGS% '
        f"mcp_server=%DYNAMIC_METADATA({namespace}:server)% "
        f"mcp_method=%DYNAMIC_METADATA({namespace}:method)% "
        f"mcp_tool=%DYNAMIC_METADATA({namespace}:tool)% "
        f"principal=%DYNAMIC_METADATA({namespace}:principal)% "
        "duration_ms=%DURATION% upstream=%UPSTREAM_HOST%\n"
    )


@dataclass(frozen=True)
class BootstrapOptions:
    """Where things listen and how long streams may stay quiet.

    Attributes:
        listen_host / listen_port: where agents connect.
        admin_port: Envoy's admin interface (always bound to 127.0.0.1; 0 = any free port).
        extproc_tcp: the gRPC server as ``host:port``, or ``None`` with ``extproc_unix``.
        extproc_unix: the gRPC server's unix socket path.
        max_request_bytes: request size limit (Envoy's buffer limit follows it).
        stream_idle_timeout_s: how long a stream (GET/SSE) may stay silent.
        message_timeout_ms: how long Envoy waits for one ext_proc answer.
        access_log: write an access log line per request to stdout.
        max_connections: Envoy's limit on open downstream connections.
        front_door: ``ext_proc`` (the full pipeline, request and response) or
            ``ext_authz`` (request-side decisions only: one ``Check`` per request).
        fast_calls: with ``ext_proc``, the eras (``"legacy"``, ``"modern"``) whose
            ``tools/call`` goes to one ext_authz ``Check`` instead (see
            :mod:`extproc.render.fast_routes`); empty: everything through ext_proc.
        authz_http_unix: with ``fast_calls``, the unix socket of our HTTP authorization
            service (:mod:`extproc.frontdoor.http_check`), which the fast routes then call instead
            of the gRPC ``Check``; ``None``: gRPC.
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 0
    extproc_tcp: str | None = "127.0.0.1:50051"
    extproc_unix: str | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    stream_idle_timeout_s: int = 3600
    message_timeout_ms: int = 2000
    access_log: bool = True
    max_connections: int = 10000
    front_door: Literal["ext_proc", "ext_authz"] = "ext_proc"
    fast_calls: frozenset[str] = frozenset()
    authz_http_unix: str | None = None


def server_cluster_name(server: MCPServer) -> str:
    """The Envoy cluster that reaches ``server``."""
    return f"mcp_server_{server.name}"


def _server_cluster(server: MCPServer, buffer_limit: int) -> dict[str, Any]:
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


def _per_route(options: BootstrapOptions, server: str | None) -> dict[str, Any]:
    """Per-route config of the front-door filter: the server name, or disabled (``None``)."""
    if options.front_door == "ext_authz":
        authz: dict[str, Any] = {"@type": _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute"}
        if server is None:
            authz["disabled"] = True
        else:
            authz["check_settings"] = {"context_extensions": {SERVER_METADATA_KEY: server}}
        return {"envoy.filters.http.ext_authz": authz}
    proc: dict[str, Any] = {"@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"}
    if server is None:
        proc["disabled"] = True
    else:
        proc["overrides"] = {"grpc_initial_metadata": [{"key": SERVER_METADATA_KEY, "value": server}]}
    return {"envoy.filters.http.ext_proc": proc}


def _well_known_route() -> dict[str, Any]:
    """RFC 9728 metadata: the ``authn`` stage answers it; without that stage, a JSON 404."""
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": -32601, "message": "no protected-resource metadata here"}}
    return {
        "name": "oauth_protected_resource",
        "match": {"prefix": WELL_KNOWN_PREFIX},
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


def _route(server: MCPServer, options: BootstrapOptions) -> dict[str, Any]:
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
        "typed_per_filter_config": _per_route(options, server.name),
    }


def _not_found_route(catalog: Catalog, options: BootstrapOptions) -> dict[str, Any]:
    paths = ", ".join(f"/{name}/mcp" for name in sorted(catalog.servers))
    body = {
        "jsonrpc": "2.0",
        "id": None,
        "error": {"code": -32601, "message": f"no MCP server at this path; this gateway serves {paths}"},
    }
    return {
        "name": "not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": json.dumps(body)}},
        "response_headers_to_add": [
            {
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }
        ],
        "typed_per_filter_config": _per_route(options, None),
    }


def _access_logger(namespace: str, metadata_filter: dict[str, Any] | None = None) -> dict[str, Any]:
    logger: dict[str, Any] = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"text_format_source": {"inline_string": _access_log_format(namespace)}},
        },
    }
    if metadata_filter is not None:
        logger["filter"] = {"metadata_filter": metadata_filter}
    return logger


def bootstrap_dict(catalog: Catalog, needs: PhaseNeeds, options: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap as a plain dict, before the typed check."""
    # Request bodies are buffered for the stages; Envoy answers 413 past this limit.
    # A little headroom lets our own check answer with a JSON-RPC error first.
    listener_buffer = options.max_request_bytes + 64 * 1024
    response_buffer = max(16 * 1024 * 1024, options.max_request_bytes)
    http_filters = []
    fast_calls = options.fast_calls if options.front_door == "ext_proc" and needs.request_headers else frozenset()
    if options.front_door == "ext_authz":
        http_filters.append(ext_authz_filter(options))
    elif needs.request_headers or needs.response_headers:
        if "legacy" in fast_calls:
            http_filters.append(native_mcp_filter(options.max_request_bytes))
        if fast_calls:
            http_filters.append(
                ext_authz_http_filter(options) if options.authz_http_unix else ext_authz_filter(options)
            )
        http_filters.append(ext_proc_filter(needs, options))
    # With fast routes, ext_authz is on there only and switched off on every other route.
    not_fast = without_authz if fast_calls else (lambda route: route)
    routes = []
    for server in catalog.servers.values():
        route = _route(server, options)
        if "legacy" in fast_calls:
            routes.append(not_fast(oversized_route(route, server.name, options.max_request_bytes)))
        routes.extend(call_routes(route, server.name, fast_calls))
        routes.append(not_fast(route))
    routes += [not_fast(_well_known_route()), not_fast(_not_found_route(catalog, options))]
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    hcm: dict[str, Any] = {
        "local_reply_config": local_replies(carried_statuses=bool(fast_calls and options.authz_http_unix)),
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mcp",
        "stream_idle_timeout": f"{options.stream_idle_timeout_s}s",
        "request_timeout": "0s",
        "route_config": {
            "name": "mcp",
            "virtual_hosts": [
                {
                    "name": "mcp",
                    "domains": ["*"],
                    "routes": routes,
                }
            ],
        },
        "http_filters": http_filters,
    }
    if options.access_log:
        if options.front_door == "ext_authz":
            hcm["access_log"] = [_access_logger(EXT_AUTHZ_NAMESPACE)]
        elif fast_calls:
            # ext_authz (the fast tools/call route) and ext_proc (everything else) publish
            # into their own metadata namespaces: one logger each, exactly one of which logs.
            answered_by_check = {
                "filter": EXT_AUTHZ_NAMESPACE,
                "path": [{"key": "server"}],
                "value": {"present_match": True},
            }
            hcm["access_log"] = [
                _access_logger(EXT_AUTHZ_NAMESPACE, {"matcher": answered_by_check, "match_if_key_not_found": False}),
                _access_logger(
                    METADATA_NAMESPACE,
                    {"matcher": {**answered_by_check, "invert": True}, "match_if_key_not_found": True},
                ),
            ]
        else:
            hcm["access_log"] = [_access_logger(METADATA_NAMESPACE)]
    return {
        "node": {"id": "mcp-extproc", "cluster": "mcp-extproc"},
        "admin": {"address": socket_address("127.0.0.1", options.admin_port)},
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": _T
                        + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": options.max_connections,
                    },
                }
            ]
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "mcp",
                    "address": socket_address(options.listen_host, options.listen_port),
                    "per_connection_buffer_limit_bytes": listener_buffer,
                    "filter_chains": [
                        {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                    ],
                }
            ],
            "clusters": [extproc_cluster(options)]
            + ([authz_http_cluster(options.authz_http_unix)] if fast_calls and options.authz_http_unix else [])
            + [_server_cluster(s, response_buffer) for s in catalog.servers.values()],
        },
    }


def render_bootstrap(catalog: Catalog, needs: PhaseNeeds, options: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap, checked against Envoy's typed ``Bootstrap`` message.

    Raises:
        ConfigError: the rendered config does not fit Envoy's schema (a bug here).
    """
    raw = bootstrap_dict(catalog, needs, options)
    try:
        message = json_format.ParseDict(raw, bootstrap_pb2.Bootstrap())
    except json_format.ParseError as exc:
        raise ConfigError(f"rendered Envoy bootstrap does not match Envoy's schema: {exc}") from None
    # Through JSON so Any fields come back as plain dicts (YAML-safe).
    result: dict[str, Any] = _sorted_maps(
        json.loads(json_format.MessageToJson(message, preserving_proto_field_name=True))
    )
    return result


_MAP_FIELDS: Final = frozenset({"typed_per_filter_config", "context_extensions", "typed_extension_protocol_options"})


def _sorted_maps(value: Any, key: str = "") -> Any:
    """Protobuf map fields in a stable (sorted) order: their JSON order varies between processes."""
    if isinstance(value, dict):
        items = sorted(value.items()) if key in _MAP_FIELDS else value.items()
        return {k: _sorted_maps(v, k) for k, v in items}
    if isinstance(value, list):
        return [_sorted_maps(v, key) for v in value]
    return value


def render_bootstrap_yaml(catalog: Catalog, needs: PhaseNeeds, options: BootstrapOptions) -> str:
    """The bootstrap as YAML, for ``mcp-extproc render envoy`` and ``up``."""
    return yaml.safe_dump(render_bootstrap(catalog, needs, options), sort_keys=False)


__all__ = [
    "EXTPROC_CLUSTER",
    "BootstrapOptions",
    "bootstrap_dict",
    "render_bootstrap",
    "render_bootstrap_yaml",
    "server_cluster_name",
]
