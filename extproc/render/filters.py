"""The filters and the extension server's cluster of the Envoy bootstrap. Pure: no I/O.

Split from :mod:`extproc.render.bootstrap`, which assembles them: the ext_proc filter
(its ``processing_mode`` from the stages' :class:`~extproc.render.options.PhaseNeeds`),
the ext_authz filter (one ``Check`` with the body), the clusters that reach our
gRPC server (TCP or unix sockets, HTTP/2) and our HTTP authorization service (every
replica an endpoint: :mod:`extproc.render.replicas`), and the local replies that turn Envoy's
own upstream-failure answers, and its 413 for a body past the buffer limit, into
JSON-RPC errors.
"""

from __future__ import annotations

import json
from typing import Any, Final

from extproc.mcp.headers import TRACE_HEADERS
from extproc.mcp.spec import INTERNAL_ERROR, INVALID_REQUEST
from extproc.render.options import BootstrapOptions, PhaseNeeds
from extproc.render.replicas import UNIX_PREFIX, http2_keepalive, lb_endpoints, replica_health, retry_policy
from extproc.render.wire import (
    AUTHZ_HTTP_CLUSTER,
    CARRIED_STATUS,
    EXT_AUTHZ_FILTER,
    EXT_PROC_FILTER,
    EXTPROC_CLUSTER,
    METADATA_HEADERS,
    METADATA_NAMESPACE,
    PEER_ATTRIBUTE,
    UPSTREAM_HEADERS,
)

_T: Final = "type.googleapis.com/"


def socket_address(host: str, port: int) -> dict[str, Any]:
    """An Envoy ``socket_address``."""
    return {"socket_address": {"address": host, "port_value": port}}


_UPSTREAM_FAILURE_FLAGS: Final = ["UF", "UH", "URX", "UC", "UT", "UO", "NC", "DPE"]
_UPSTREAM_FAILURE_MESSAGE: Final = (
    "the MCP server could not be reached or failed (%RESPONSE_CODE% %RESPONSE_FLAGS%: %RESPONSE_CODE_DETAILS%)"
)
_UPSTREAM_FAILURE_BODY: Final = json.dumps(
    {"jsonrpc": "2.0", "id": None, "error": {"code": INTERNAL_ERROR, "message": _UPSTREAM_FAILURE_MESSAGE}},
    separators=(",", ":"),
)
"""A JSON-RPC error whose message Envoy fills in (its ``%...%`` operators)."""
_BACKEND_FAILURE_BODY: Final = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": INTERNAL_ERROR,
            "message": "MCP server '%DYNAMIC_METADATA(mcp_extproc:server)%' behind virtual server "
            "'%DYNAMIC_METADATA(mcp_extproc:virtual)%' could not be reached or failed "
            "(%RESPONSE_CODE% %RESPONSE_FLAGS%: %RESPONSE_CODE_DETAILS%)",
        },
    },
    separators=(",", ":"),
)
"""The same, for a call a virtual server routed: it names the backend (dynamic metadata the
``virtual`` stage published; server names are DNS labels, so they never need escaping)."""


PAYLOAD_TOO_LARGE_DETAILS: Final = "request_payload_too_large"
"""Envoy's response code details when a buffering filter (ext_proc, ext_authz) overflows the buffer limit."""


def _payload_too_large_body(max_request_bytes: int) -> str:
    message = f"request body exceeds the {max_request_bytes}-byte limit"
    error = {"jsonrpc": "2.0", "id": None, "error": {"code": INVALID_REQUEST, "message": message}}
    return json.dumps(error, separators=(",", ":"))


def local_replies(*, max_request_bytes: int, carried_statuses: bool = False) -> dict[str, Any]:
    """Envoy's own answers for an unreachable or failing MCP server or a body past the limit, as JSON-RPC errors.

    Only replies carrying an upstream-failure flag, and Envoy's own 413 (response code
    details ``request_payload_too_large``: a body without Content-Length that outgrew
    the buffer), are rewritten; the stages' own JSON-RPC answers (ext_proc immediate
    responses, the ``mcp`` stage's 413 among them) are left exactly as they are.
    With ``carried_statuses``, the HTTP authorization service's carrier statuses
    (:data:`extproc.render.wire.CARRIED_STATUS`) are turned back into the real ones.
    """
    status_back: list[dict[str, Any]] = []
    for status, carrier in CARRIED_STATUS.items() if carried_statuses else ():
        value = {"default_value": carrier, "runtime_key": f"mcp_extproc.carried_{carrier}"}
        status_filter = {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}
        status_back.append({"filter": status_filter, "status_code": status})
    return {
        "mappers": [
            *status_back,
            {
                "filter": {
                    "and_filter": {
                        "filters": [
                            {"response_flag_filter": {"flags": _UPSTREAM_FAILURE_FLAGS}},
                            {
                                "metadata_filter": {
                                    "matcher": {
                                        "filter": METADATA_NAMESPACE,
                                        "path": [{"key": "virtual"}],
                                        "value": {"present_match": True},
                                    }
                                }
                            },
                        ]
                    }
                },
                "body_format_override": {
                    "text_format_source": {"inline_string": _BACKEND_FAILURE_BODY},
                    "content_type": "application/json",
                },
            },
            {
                "filter": {"response_flag_filter": {"flags": _UPSTREAM_FAILURE_FLAGS}},
                "body_format_override": {
                    # A text template, not json_format: Envoy renders json_format numbers as
                    # strings, and a JSON-RPC error code must be a number. The operators used
                    # here never contain quotes or backslashes.
                    "text_format_source": {"inline_string": _UPSTREAM_FAILURE_BODY},
                    "content_type": "application/json",
                },
            },
            {
                "filter": {
                    "extension_filter": {
                        "name": "envoy.access_loggers.extension_filters.cel",
                        "typed_config": {
                            "@type": _T + "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                            "expression": f"response.code_details == '{PAYLOAD_TOO_LARGE_DETAILS}'",
                        },
                    }
                },
                "body_format_override": {
                    # No % in the body: nothing for Envoy's formatter to expand.
                    "text_format_source": {"inline_string": _payload_too_large_body(max_request_bytes)},
                    "content_type": "application/json",
                },
            },
        ]
    }


def ext_proc_filter(needs: PhaseNeeds, options: BootstrapOptions, *, peer_identity: bool = False) -> dict[str, Any]:
    """The ext_proc filter; ``peer_identity``: Envoy sends the verified client certificate's
    URI SAN with the request headers (:data:`~extproc.render.wire.PEER_ATTRIBUTE`)."""
    attributes = {"request_attributes": [PEER_ATTRIBUTE]} if peer_identity else {}
    return {
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
            "grpc_service": _grpc_service(options, "30s"),
            "failure_mode_allow": False,
            "message_timeout": f"{options.message_timeout_ms / 1000:.3f}s",
            "allow_mode_override": True,
            "processing_mode": {
                "request_header_mode": "SEND" if needs.request_headers else "SKIP",
                "request_body_mode": "BUFFERED" if needs.request_body else "NONE",
                "response_header_mode": "SEND" if needs.response_headers else "SKIP",
                # Response bodies are switched on per exchange (mode_override) by the
                # stages that ask for them, so nothing is buffered that nobody reads.
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
            "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
            **attributes,
        },
    }


def ext_authz_filter(options: BootstrapOptions) -> dict[str, Any]:
    return {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": _grpc_service(options, f"{options.message_timeout_ms / 1000:.3f}s"),
            "transport_api_version": "V3",
            # Every header line, so a routing header sent twice is still seen twice.
            "encode_raw_headers": True,
            **_authz_common(options),
        },
    }


def _authz_common(options: BootstrapOptions) -> dict[str, Any]:
    """What both ext_authz transports share: fail closed, with the body."""
    return {
        "failure_mode_allow": False,
        # The body goes along so the stages can parse the JSON-RPC request.
        "with_request_body": {"max_request_bytes": options.max_request_bytes, "pack_as_bytes": True},
        "status_on_error": {"code": "ServiceUnavailable"},
        "clear_route_cache": True,
    }


def extproc_cluster(options: BootstrapOptions) -> dict[str, Any]:
    """HTTP/2 to our gRPC server: every replica an endpoint (health-checked when there are several)."""
    addresses = options.extproc_endpoints
    http2: dict[str, Any] = {}
    cluster: dict[str, Any] = {
        "name": EXTPROC_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": http2},
            }
        },
        "load_assignment": lb_endpoints(EXTPROC_CLUSTER, addresses),
    }
    if len(addresses) > 1:
        http2.update(http2_keepalive())
        cluster.update(replica_health(grpc=True))
    return cluster


def _grpc_service(options: BootstrapOptions, timeout: str) -> dict[str, Any]:
    """Our gRPC server as ext_proc and ext_authz reach it; with replicas, a failed connection is retried on another."""
    service: dict[str, Any] = {"envoy_grpc": {"cluster_name": EXTPROC_CLUSTER}, "timeout": timeout}
    if len(options.extproc_endpoints) > 1:
        service["retry_policy"] = retry_policy(grpc=True)
    return service


def ext_authz_http_filter(options: BootstrapOptions) -> dict[str, Any]:
    """ext_authz calling our HTTP authorization service (:mod:`extproc.frontdoor.http_check`), for the fast routes.

    The trace context headers go upstream too: the service sets them only while it traces (its
    span is then the upstream's parent, unless Envoy traces and sets its own).
    """
    upstream = [{"safe_regex": {"regex": UPSTREAM_HEADERS}}, *({"exact": name} for name in TRACE_HEADERS)]
    service: dict[str, Any] = {
        "server_uri": {
            "uri": "http://mcp-extproc-authz",
            "cluster": AUTHZ_HTTP_CLUSTER,
            "timeout": f"{options.message_timeout_ms / 1000:.3f}s",
        },
        "authorization_request": {"allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]}},
        "authorization_response": {
            # Never ".*": that would copy this answer's own content-length upstream.
            "allowed_upstream_headers": {"patterns": upstream},
            "allowed_client_headers": {
                "patterns": [
                    {"exact": "content-type"},
                    {"exact": "www-authenticate"},
                    {"exact": "retry-after"},
                    {"safe_regex": {"regex": UPSTREAM_HEADERS}},
                ]
            },
            "dynamic_metadata_from_headers": {"patterns": [{"exact": name} for name in METADATA_HEADERS]},
        },
    }
    if len(options.authz_http_endpoints) > 1:
        service["retry_policy"] = retry_policy(grpc=False)
    return {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": {
            "@type": _T + "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "http_service": service,
            **_authz_common(options),
        },
    }


def authz_http_cluster(options: BootstrapOptions) -> dict[str, Any]:
    """HTTP/1.1 over unix sockets to our HTTP authorization service, one endpoint per replica."""
    paths = options.authz_http_endpoints
    cluster: dict[str, Any] = {
        "name": AUTHZ_HTTP_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": lb_endpoints(AUTHZ_HTTP_CLUSTER, [f"{UNIX_PREFIX}{path}" for path in paths]),
    }
    if len(paths) > 1:
        cluster.update(replica_health(grpc=False))
    return cluster
