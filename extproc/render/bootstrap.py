"""Render the Envoy bootstrap for a set of MCP servers. Pure: no I/O.

Data flow::

    Catalog + BootstrapOptions + PhaseNeeds
        ──▶ plain dict (one listener, one route per MCPServer, one cluster each,
            the ext_proc filter pointing at our gRPC server, asking Envoy for the client
            certificate's SPIFFE ID when an MCPAgent declares a service account (then
            no fast routes over HTTP, which cannot carry it); the limits, timeouts,
            overload manager and private admin of :mod:`extproc.render.hardening`;
            a JSON access log line per request; with tracing on, Envoy's OpenTelemetry
            tracer and the collector's cluster, :mod:`extproc.render.tracer`)
        ──▶ json_format.ParseDict(Bootstrap)   ← typed check: a wrong field name or
                                                 type fails here, not in Envoy
        ──▶ dict (``render_bootstrap``) / YAML (``render_bootstrap_yaml``)

Envoy's typed messages come from ``xds-protos`` (generated from Envoy's
data-plane-api); the renderer imports the ones it packs into ``Any`` fields, and only
when it renders (:func:`render_bootstrap`): they are about 200 modules and 3 MB resident
that ``serve``, which imports this module, never needs.

Stream safety: MCP GET streams and SSE responses are long-lived, so routes
have no timeout (``timeout: 0s``) and the connection manager's stream idle
timeout is long (default one hour). The ext_proc filter fails closed
(``failure_mode_allow: false``): with the extension server down, Envoy answers
5xx and the upstream sees nothing.

Access log: one JSON object per request (Envoy escapes every value, so a tool name
with spaces or quotes stays one value and forges no field), the path without its
query string, the request id Envoy generated (the one in the audit line).
"""

from __future__ import annotations

import json
from typing import Any, Final

import yaml

from extproc.config.resources import Catalog
from extproc.errors import ConfigError
from extproc.render.fast_routes import call_routes, native_mcp_filter, oversized_route, unsized_route, without_authz
from extproc.render.filters import (
    authz_http_cluster,
    ext_authz_filter,
    ext_authz_http_filter,
    ext_proc_filter,
    extproc_cluster,
    local_replies,
    socket_address,
)
from extproc.render.hardening import admin, connection_limits, overload_manager
from extproc.render.options import BootstrapOptions, PhaseNeeds
from extproc.render.routes import (
    not_found_route,
    server_cluster,
    server_route,
    streams_clusters,
    virtual_routes,
    well_known_route,
)
from extproc.render.splice import splice_filter
from extproc.render.tracer import collector_cluster, hcm_tracing
from extproc.render.wire import EXT_AUTHZ_NAMESPACE, METADATA_NAMESPACE

_T: Final = "type.googleapis.com/"


def access_log_format(namespace: str) -> dict[str, str]:
    """The access log line's fields: a JSON object, each value escaped by Envoy.

    ``path`` is the path the agent sent (before the route's rewrite: Envoy's own
    ``x-envoy-original-path``, a client's is removed on arrival) without its query
    string: a query can carry a token, and it is never logged.
    """
    return {
        "time": "%START_TIME%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "method": "%REQ(:METHOD)%",
        "path": "%PATH(NQ:ORIG_OR_PATH)%",
        "status": "%RESPONSE_CODE%",
        "flags": "%RESPONSE_FLAGS%",
        "details": "%RESPONSE_CODE_DETAILS%",
        "mcp_server": f"%DYNAMIC_METADATA({namespace}:server)%",
        "mcp_method": f"%DYNAMIC_METADATA({namespace}:method)%",
        "mcp_tool": f"%DYNAMIC_METADATA({namespace}:tool)%",
        "principal": f"%DYNAMIC_METADATA({namespace}:principal)%",
        "duration_ms": "%DURATION%",
        "upstream": "%UPSTREAM_HOST%",
    }


def _access_logger(namespace: str, metadata_filter: dict[str, Any] | None = None) -> dict[str, Any]:
    logger: dict[str, Any] = {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": _T + "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": access_log_format(namespace)},
        },
    }
    if metadata_filter is not None:
        logger["filter"] = {"metadata_filter": metadata_filter}
    return logger


def _listener(options: BootstrapOptions, buffer_limit: int, hcm: dict[str, Any]) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": "mcp",
        "address": socket_address(options.listen_host, options.listen_port),
        "per_connection_buffer_limit_bytes": buffer_limit,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    if not options.listen_reuse_port:
        # Without SO_REUSEPORT a second Envoy on this port fails to bind instead of sharing it.
        listener["enable_reuse_port"] = False
    return listener


def bootstrap_dict(catalog: Catalog, needs: PhaseNeeds, options: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap as a plain dict, before the typed check.

    Raises:
        ConfigError: a virtual server with the ``ext_authz`` front door (it needs ext_proc).
    """
    if catalog.virtual_servers and options.front_door == "ext_authz":
        names = ", ".join(sorted(catalog.virtual_servers))
        raise ConfigError(
            f"MCPVirtualServer {names}: a virtual server needs ext_proc (it answers lists and rewrites calls); "
            "use --front-door auto or ext_proc"
        )
    # Request bodies are buffered for the stages; Envoy answers 413 past this limit.
    # A little headroom lets our own check answer with a JSON-RPC error first.
    listener_buffer = options.max_request_bytes + 64 * 1024
    response_buffer = max(16 * 1024 * 1024, options.max_request_bytes)
    http_filters = []
    fast_calls = options.fast_calls if options.front_door == "ext_proc" and needs.request_headers else frozenset()
    # An agent known by its mTLS service account: Envoy must tell us the client certificate's
    # SPIFFE ID, which ext_proc and the gRPC Check carry and the HTTP authorization service does not.
    peer_identity = any(agent.spiffe_id for agent in catalog.agents.values())
    if peer_identity and options.authz_http_unix:
        fast_calls = frozenset()
    if options.front_door == "ext_authz":
        http_filters.append(ext_authz_filter(options))
    elif needs.request_headers or needs.response_headers:
        if "legacy" in fast_calls:
            http_filters.append(native_mcp_filter(options.max_request_bytes))
        if fast_calls:
            http_filters.append(
                ext_authz_http_filter(options) if options.authz_http_unix else ext_authz_filter(options)
            )
        http_filters.append(ext_proc_filter(needs, options, peer_identity=peer_identity))
        if "modern" in fast_calls and catalog.virtual_servers:
            http_filters.append(splice_filter())
    # With fast routes, ext_authz is on there only and switched off on every other route.
    not_fast = without_authz if fast_calls else (lambda route: route)
    routes = []
    for server in catalog.servers.values():
        route = server_route(server, options)
        if "legacy" in fast_calls:
            routes.append(not_fast(oversized_route(route, server.name, options.max_request_bytes)))
            routes.append(not_fast(unsized_route(route, server.name)))
        routes.extend(call_routes(route, server.name, fast_calls))
        routes.append(not_fast(route))
    if options.front_door != "ext_authz":  # a virtual server needs ext_proc (mcp-extproc check says so)
        for virtual in catalog.virtual_servers.values():
            fast_modern = "modern" in fast_calls
            routes.extend(not_fast(r) for r in virtual_routes(virtual, catalog, options, fast_modern=fast_modern))
    routes += [not_fast(well_known_route()), not_fast(not_found_route(catalog, options))]
    http_filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _T + "envoy.extensions.filters.http.router.v3.Router"},
        }
    )
    hcm: dict[str, Any] = {
        "local_reply_config": local_replies(
            max_request_bytes=options.max_request_bytes,
            carried_statuses=bool(fast_calls and options.authz_http_unix),
        ),
        "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "mcp",
        "stream_idle_timeout": f"{options.stream_idle_timeout_s}s",
        "request_timeout": "0s",
        **connection_limits(options),
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
    if options.tracing is not None:
        hcm["tracing"] = hcm_tracing(options.tracing)
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
    bootstrap: dict[str, Any] = {"node": {"id": "mcp-extproc", "cluster": "mcp-extproc"}}
    admin_interface = admin(options)
    if admin_interface is not None:
        bootstrap["admin"] = admin_interface
    return {
        **bootstrap,
        "overload_manager": overload_manager(options),
        "static_resources": {
            "listeners": [_listener(options, listener_buffer, hcm)],
            "clusters": [extproc_cluster(options)]
            + ([authz_http_cluster(options)] if fast_calls and options.authz_http_unix else [])
            + [server_cluster(s, response_buffer) for s in catalog.servers.values()]
            + (streams_clusters(options) if catalog.virtual_servers else [])
            + ([collector_cluster(options.tracing)] if options.tracing is not None else []),
        },
    }


def load_envoy_types() -> None:
    """Register the Envoy message types the renderers pack into ``Any`` fields (for ``json_format``).

    Only when something is rendered or checked against Envoy's schema (see the module
    docstring): ``serve`` imports this module and never needs them.
    """
    from envoy.config.overload.v3 import overload_pb2  # noqa: F401
    from envoy.config.route.v3 import route_components_pb2  # noqa: F401
    from envoy.config.trace.v3 import opentelemetry_pb2  # noqa: F401
    from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401
    from envoy.extensions.access_loggers.stream.v3 import stream_pb2  # noqa: F401
    from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
    from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401
    from envoy.extensions.filters.http.mcp.v3 import mcp_pb2  # noqa: F401
    from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
    from envoy.extensions.http.early_header_mutation.header_mutation.v3 import header_mutation_pb2  # noqa: F401
    from envoy.extensions.resource_monitors.cgroup_memory.v3 import cgroup_memory_pb2  # noqa: F401
    from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2  # noqa: F401
    from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
    from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401


def render_bootstrap(catalog: Catalog, needs: PhaseNeeds, options: BootstrapOptions) -> dict[str, Any]:
    """The bootstrap, checked against Envoy's typed ``Bootstrap`` message.

    Raises:
        ConfigError: the rendered config does not fit Envoy's schema (a bug here).
    """
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    from google.protobuf import json_format

    load_envoy_types()

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


_MAP_FIELDS: Final = frozenset(
    {"typed_per_filter_config", "context_extensions", "typed_extension_protocol_options", "json_format"}
)


def _sorted_maps(value: Any, key: str = "") -> Any:
    """Protobuf map fields in a stable (sorted) order: their JSON order varies between processes."""
    if isinstance(value, dict):
        items = sorted(value.items()) if key in _MAP_FIELDS else value.items()
        return {k: _sorted_maps(v, k) for k, v in items}
    if isinstance(value, list):
        return [_sorted_maps(v, key) for v in value]
    return value


# Envoy reads YAML with yaml-cpp, which takes these words (any case) as booleans where PyYAML's
# YAML 1.1 resolver leaves ``y`` and ``n`` plain: a server named ``n`` would reach Envoy as ``false``.
_BOOLEAN_WORDS: Final = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off"})


class _EnvoyDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, quoting every string yaml-cpp could read as something else."""


def _envoy_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = '"' if value.lower() in _BOOLEAN_WORDS else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_EnvoyDumper.add_representer(str, _envoy_str)


def render_bootstrap_yaml(catalog: Catalog, needs: PhaseNeeds, options: BootstrapOptions) -> str:
    """The bootstrap as YAML, for ``mcp-extproc render envoy`` and ``up``."""
    document = render_bootstrap(catalog, needs, options)
    return yaml.dump(document, Dumper=_EnvoyDumper, sort_keys=False)


__all__ = [
    "BootstrapOptions",
    "PhaseNeeds",
    "access_log_format",
    "bootstrap_dict",
    "render_bootstrap",
    "render_bootstrap_yaml",
]
