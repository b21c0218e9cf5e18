"""Envoy's OpenTelemetry tracer and the cluster that reaches the collector. Pure: no I/O.

Data flow::

    BootstrapOptions.tracing (EnvoyTracing: the collector the extension server exports to)
        ──hcm_tracing()──▶ the connection manager's ``tracing``: the OpenTelemetry tracer
                           (OTLP over gRPC or HTTP), random sampling of new traces
        ──collector_cluster()──▶ the ``mcp_extproc_otel`` cluster (HTTP/2 for gRPC, TLS for https)

Envoy then starts a span per request (a child of the agent's ``traceparent``), one per
ext_proc stream and ext_authz call (sent to the extension server in their metadata or
headers, so its spans become their children) and sets ``traceparent`` on the request to
the upstream: with Envoy's tracer on, the upstream's parent is Envoy's span.
"""

from __future__ import annotations

from typing import Any, Final

from extproc.render.options import EnvoyTracing

_T: Final = "type.googleapis.com/"
OTEL_CLUSTER: Final = "mcp_extproc_otel"
"""The cluster of the OpenTelemetry collector."""
SYSTEM_CAS: Final = "/etc/ssl/certs/ca-certificates.crt"
"""The CA bundle an https collector is checked against (Debian's, the image's)."""


def hcm_tracing(tracing: EnvoyTracing) -> dict[str, Any]:
    """The connection manager's ``tracing`` block."""
    config: dict[str, Any] = {
        "@type": _T + "envoy.config.trace.v3.OpenTelemetryConfig",
        "service_name": tracing.service_name,
    }
    if tracing.protocol == "grpc":
        config["grpc_service"] = {"envoy_grpc": {"cluster_name": OTEL_CLUSTER}, "timeout": "1s"}
    else:
        scheme = "https" if tracing.tls else "http"
        config["http_service"] = {
            "http_uri": {
                "uri": f"{scheme}://{tracing.host}:{tracing.port}{tracing.path}",
                "cluster": OTEL_CLUSTER,
                "timeout": "1s",
            }
        }
    return {
        "random_sampling": {"value": tracing.sample_percent},
        "provider": {"name": "envoy.tracers.opentelemetry", "typed_config": config},
    }


def collector_cluster(tracing: EnvoyTracing) -> dict[str, Any]:
    """The cluster of the collector (a name is resolved by DNS, IPv4 first)."""
    address = {"socket_address": {"address": tracing.host, "port_value": tracing.port}}
    cluster: dict[str, Any] = {
        "name": OTEL_CLUSTER,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": OTEL_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }
    if tracing.protocol == "grpc":
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    if tracing.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": _T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": tracing.host,
                "common_tls_context": {"validation_context": {"trusted_ca": {"filename": SYSTEM_CAS}}},
            },
        }
    return cluster
