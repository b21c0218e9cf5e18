"""Envoy's OpenTelemetry tracer in the bootstrap: rendered only with tracing on, checked by Envoy's schema.

``envoy --mode validate`` and real spans: tests/integration/test_tracing.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.render.bootstrap import render_bootstrap
from extproc.render.options import BootstrapOptions, EnvoyTracing
from extproc.render.tracer import OTEL_CLUSTER

PIPELINE = Registry().build_pipeline(DEFAULT_PIPELINE)
FAST = BootstrapOptions(fast_calls=PIPELINE.fast_call_eras, authz_http_unix="/tmp/authz.sock")


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    typed: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def authz_upstream_patterns(config: dict[str, Any]) -> list[dict[str, Any]]:
    [authz] = [f for f in hcm(config)["http_filters"] if "http_service" in f["typed_config"]]
    patterns: list[dict[str, Any]] = authz["typed_config"]["http_service"]["authorization_response"][
        "allowed_upstream_headers"
    ]["patterns"]
    return patterns


def test_off_nothing_is_rendered(catalog: Catalog) -> None:
    config = render_bootstrap(catalog, PIPELINE.needs, FAST)
    assert "tracing" not in hcm(config)
    assert OTEL_CLUSTER not in clusters(config)
    # The extension server's traceparent reaches the upstream from the fast routes, whether
    # Envoy traces or not (the service sets it only while it traces).
    exact = {p["exact"] for p in authz_upstream_patterns(config) if "exact" in p}
    assert exact == {"traceparent", "tracestate"}


def test_grpc_collector(catalog: Catalog) -> None:
    tracing = EnvoyTracing("grpc", "127.0.0.1", 4317, sample_percent=25.0)
    config = render_bootstrap(catalog, PIPELINE.needs, BootstrapOptions(tracing=tracing))
    block = hcm(config)["tracing"]
    assert block["random_sampling"] == {"value": 25.0}
    provider = block["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"] == {"cluster_name": OTEL_CLUSTER}
    assert provider["typed_config"]["service_name"] == "mcp-extproc-envoy"
    cluster = clusters(config)[OTEL_CLUSTER]
    assert "http2_protocol_options" in str(cluster["typed_extension_protocol_options"])
    assert "transport_socket" not in cluster


@pytest.mark.parametrize("tls", [False, True])
def test_http_collector(catalog: Catalog, tls: bool) -> None:
    tracing = EnvoyTracing("http", "collector.example", 4318, "/v1/traces", tls=tls)
    config = render_bootstrap(catalog, PIPELINE.needs, dataclasses.replace(FAST, tracing=tracing))
    uri = hcm(config)["tracing"]["provider"]["typed_config"]["http_service"]["http_uri"]
    scheme = "https" if tls else "http"
    assert uri["uri"] == f"{scheme}://collector.example:4318/v1/traces"
    assert uri["cluster"] == OTEL_CLUSTER
    cluster = clusters(config)[OTEL_CLUSTER]
    assert cluster["type"] == "STRICT_DNS"
    assert ("transport_socket" in cluster) is tls
