"""What keeps the listener serving under abuse, and Envoy's admin private. Pure: no I/O.

Split from :mod:`extproc.render.bootstrap`, which assembles it::

    BootstrapOptions
        ──admin()──────────▶ admin on a unix socket (mode 0600), outside the connection limit
        ──overload_manager()─▶ the connection limit, a memory monitor, and idle connections
                               closed within a second once connections near the limit
        ──connection_limits()─▶ HttpConnectionManager fields: request headers within
                               10 s, 100 streams per HTTP/2 connection, the request id
                               always Envoy's own

Slow clients. A client that opens connections and never finishes its request headers
holds one connection each; at the connection limit nobody else is accepted. Two
timers free them: ``request_headers_timeout`` (from the first byte of the headers: a
stalled request is answered 408 and its connection closed) and the connection idle
timeout, which the overload manager shortens to one second while connections are
above 95 % of the limit (scaled from 80 %), so a connection that sends nothing at all
is shed too. Both leave GET/SSE streams alone: those have sent their headers and are
streams, not idle connections; their ``stream_idle_timeout`` and the routes'
``timeout: 0s`` stay as they are.

Envoy runs its overload refresh loop only when at least one *reactive* resource
monitor is configured: the connection monitor is proactive (counted on accept) and
alone would never move an action. The cgroup memory monitor is that reactive monitor
(pressure 0 without a cgroup memory limit), and releases free heap at 95 %.

Request ids. Envoy keeps a client's ``x-request-id`` for requests it considers internal
(with ``use_remote_address`` off, or from loopback or private addresses), and the id
ends up in the audit line. The header is removed before Envoy looks at it (an early
header mutation), so Envoy always generates the id, whoever the client is. So is
``x-envoy-original-path``, which Envoy sets when a route rewrites the path and the
access log's ``path`` reads: a client's own would otherwise be logged as its path. And
so is every other ``x-envoy-*`` a client sends: Envoy's router takes some of them as
orders from internal clients (``x-envoy-upstream-rq-timeout-ms``, ``x-envoy-retry-on``,
``x-envoy-max-retries``: a retried ``tools/call`` runs the tool twice), and none is the
MCP server's business. Envoy's own (``x-envoy-original-path`` after a rewrite) it adds later.
"""

from __future__ import annotations

from typing import Any, Final

from extproc.render.options import BootstrapOptions

_T: Final = "type.googleapis.com/"
CONNECTION_MONITOR: Final = "envoy.resource_monitors.global_downstream_max_connections"
MEMORY_MONITOR: Final = "envoy.resource_monitors.cgroup_memory"
ADMIN_SOCKET_MODE: Final = 0o600
SCALING_THRESHOLD: Final = 0.80
"""From this share of the connection limit, idle connections get shorter timeouts..."""
SATURATION_THRESHOLD: Final = 0.95
"""...down to :data:`MIN_IDLE_TIMEOUT` at this share."""
MIN_IDLE_TIMEOUT: Final = "1s"
MAX_STREAMS_PER_CONNECTION: Final = 100
UNTRUSTED_REQUEST_HEADERS: Final = (
    "x-request-id",
    "x-envoy-original-path",
    "x-mcp-backend",
    "x-mcp-splice",
    "x-mcp-stream",
)
"""Request headers removed before Envoy reads them: their values are Envoy's or ours to set (the
request id; the path before a route's rewrite, which the access log reads; the routing headers
of a virtual server, which pick a backend's route once a stage or the Check decided)."""
ENVOY_HEADER_PREFIX: Final = "x-envoy-"
"""Every client request header with this prefix is removed on arrival too."""


def admin(options: BootstrapOptions) -> dict[str, Any] | None:
    """Envoy's admin interface on a private unix socket; ``None`` renders none."""
    if options.admin_socket is None:
        return None
    return {
        "address": {"pipe": {"path": options.admin_socket, "mode": ADMIN_SOCKET_MODE}},
        # Readiness and stats still answer when agents hold every connection.
        "ignore_global_conn_limit": True,
    }


def overload_manager(options: BootstrapOptions) -> dict[str, Any]:
    """The connection limit, and what Envoy sheds as connections approach it."""
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": CONNECTION_MONITOR,
                "typed_config": {
                    "@type": _T
                    + "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    "max_active_downstream_connections": options.max_connections,
                },
            },
            {
                "name": MEMORY_MONITOR,
                "typed_config": {
                    "@type": _T + "envoy.extensions.resource_monitors.cgroup_memory.v3.CgroupMemoryConfig"
                },
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.reduce_timeouts",
                "triggers": [
                    {
                        "name": CONNECTION_MONITOR,
                        "scaled": {
                            "scaling_threshold": SCALING_THRESHOLD,
                            "saturation_threshold": SATURATION_THRESHOLD,
                        },
                    }
                ],
                "typed_config": {
                    "@type": _T + "envoy.config.overload.v3.ScaleTimersOverloadActionConfig",
                    # Connections without a stream only: never a GET/SSE stream or a call
                    # waiting for a slow tool.
                    "timer_scale_factors": [
                        {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_timeout": MIN_IDLE_TIMEOUT}
                    ],
                },
            },
            {
                "name": "envoy.overload_actions.shrink_heap",
                "triggers": [{"name": MEMORY_MONITOR, "threshold": {"value": 0.95}}],
            },
        ],
    }


def connection_limits(options: BootstrapOptions) -> dict[str, Any]:
    """HttpConnectionManager fields: header timeout, per-connection limits, Envoy's own request id."""
    return {
        "request_headers_timeout": f"{options.request_headers_timeout_s}s",
        "http2_protocol_options": {"max_concurrent_streams": MAX_STREAMS_PER_CONNECTION},
        "early_header_mutation_extensions": [
            {
                "name": "envoy.http.early_header_mutation.header_mutation",
                "typed_config": {
                    "@type": _T + "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                    "mutations": [
                        *({"remove": name} for name in UNTRUSTED_REQUEST_HEADERS),
                        # Every x-envoy-* header a client sends: Envoy reads some of them as
                        # orders for requests it deems internal (timeouts, retries that would
                        # run a tool call twice), and none is the upstream's business.
                        {"remove_on_match": {"key_matcher": {"prefix": ENVOY_HEADER_PREFIX}}},
                    ],
                },
            }
        ],
    }


__all__ = [
    "ADMIN_SOCKET_MODE",
    "CONNECTION_MONITOR",
    "ENVOY_HEADER_PREFIX",
    "MEMORY_MONITOR",
    "UNTRUSTED_REQUEST_HEADERS",
    "admin",
    "connection_limits",
    "overload_manager",
]
