"""Loading what a command runs, and the commands that only look: ``check`` and ``render envoy``.

Data flow::

    Settings ──▶ load_resources (-f) ──▶ Catalog
             ──▶ pipeline file (--pipeline, else the default)
             ──▶ up, check, render envoy: the file's only MCPAgent, when it declares no identity,
                 becomes authn's workloadAgent (every caller without a token is it; --listen
                 must then be loopback); serve is told so only by its pipeline file
             ──▶ Registry ──▶ Pipeline (built, not started)
             ──▶ posture_problems(catalog, stages): a pipeline that cannot enforce the resources
                 (no authn with an MCPAgent, no allowlist, …, or failureMode: open) is refused
             ──▶ every stage checks the catalog (e.g. Rego compiles): errors refuse, warnings print
    check:        a one-line summary of what was loaded
    render envoy: bootstrap_options(settings, plan) ──▶ the pure renderer ──▶ YAML
                  (every --grpc / --authz-http an endpoint: one per replica of the server;
                  --otel / OTEL_*: Envoy's tracer, to the collector the server's spans go to)
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Sequence

from extproc import tracing
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig, load_pipeline_config, with_stage_config
from extproc.config.resources import Catalog, load_resources
from extproc.config.settings import Settings, split_hostport
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.plan import Plan
from extproc.core.posture import posture_problems
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.render.bootstrap import render_bootstrap_yaml
from extproc.render.options import BootstrapOptions, EnvoyTracing

log = logging.getLogger("mcp_extproc.commands")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def with_lone_workload(settings: Settings, catalog: Catalog, config: PipelineConfig) -> PipelineConfig:
    """``config`` with the file's only ``MCPAgent`` as authn's ``workloadAgent``, when it declares no identity.

    What ``up`` runs: one agent on this machine, the only caller of a loopback listener.

    Raises:
        ConfigError: ``--listen`` is not a loopback address (anyone reaching it would be that agent).
    """
    agent = catalog.lone_agent_without_identity()
    if agent is None:
        return config
    host, _ = split_hostport(settings.listen, "--listen")
    if not _loopback(host):
        raise ConfigError(
            f"--listen {settings.listen}: MCPAgent {agent.name!r} declares no spec.identity, so every caller "
            "without a token would be served as it; listen on a loopback address or give it spec.identity.jwt"
        )
    return with_stage_config(config, "authn", workloadAgent=agent.name)


def checked(
    settings: Settings, metrics: Metrics | None, *, lone_agent_is_workload: bool = False
) -> tuple[Catalog, Pipeline, list[str]]:
    """Load the resources, build (not start) the pipeline and let the stages check the resources.

    ``lone_agent_is_workload``: ``up``'s view (also ``check``'s and ``render envoy``'s), see
    :func:`with_lone_workload`; ``serve`` leaves it False.

    Returns:
        The catalog, the pipeline and the stages' warnings.

    Raises:
        ConfigError: a document is invalid, the pipeline cannot enforce the resources (named
            with the pipeline file), or a stage finds a problem (e.g. a Rego syntax error, an
            MCPAgent without identity that nothing identifies).
    """
    catalog = load_resources(settings.resources)
    config = load_pipeline_config(settings.pipeline) if settings.pipeline else DEFAULT_PIPELINE
    if lone_agent_is_workload:
        config = with_lone_workload(settings, catalog, config)
    pipeline = Registry().build_pipeline(config, metrics)
    unenforced = posture_problems(catalog, [(spec.name, spec.failure_mode) for spec in config.stages])
    if unenforced:
        where = settings.pipeline or "the default pipeline"
        raise ConfigError(f"{where}: " + f"\n{where}: ".join(unenforced))
    errors, warnings = pipeline.check_split(catalog)
    if errors:
        raise ConfigError(f"{settings.resources}: " + f"\n{settings.resources}: ".join(errors))
    return catalog, pipeline, warnings


def build(
    settings: Settings, metrics: Metrics | None = None, *, lone_agent_is_workload: bool = False
) -> tuple[Catalog, Pipeline]:
    """:func:`checked`, logging the stages' warnings."""
    catalog, pipeline, warnings = checked(settings, metrics, lone_agent_is_workload=lone_agent_is_workload)
    for warning in warnings:
        log.warning("%s", warning)
    return catalog, pipeline


def bootstrap_options(
    settings: Settings,
    plan: Plan,
    *,
    extproc: Sequence[str],
    authz_http: Sequence[str],
    streams: Sequence[str] = (),
) -> BootstrapOptions:
    """What ``up`` and ``render envoy`` both render: the listener, limits and where the server is.

    ``extproc``: every address of the extension server (``host:port`` or ``unix:PATH``, one
    per replica); ``authz_http``: every unix socket of its HTTP authorization service;
    ``streams``: its stream service's unix socket (one per replica).
    """
    host, port = split_hostport(settings.listen, "--listen")
    if not extproc:
        raise ConfigError("the bootstrap needs the extension server's TCP address or unix socket")
    first, *others = extproc
    unix = first.removeprefix("unix:") if first.startswith("unix:") else None
    return BootstrapOptions(
        listen_host=host,
        listen_port=port,
        extproc_tcp=None if unix else first,
        extproc_unix=unix,
        extproc_replicas=tuple(others),
        stream_idle_timeout_s=settings.stream_idle_timeout_s,
        max_request_bytes=plan.max_request_bytes,
        front_door="ext_authz" if settings.front_door == "ext_authz" else "ext_proc",
        fast_calls=plan.fast_call_eras if settings.front_door == "auto" else frozenset(),
        authz_http_unix=authz_http[0] if authz_http else None,
        authz_http_replicas=tuple(authz_http[1:]),
        admin_socket=settings.admin_socket,
        tracing=envoy_tracing(settings),
        streams_unix=streams[0] if streams else None,
        streams_replicas=tuple(streams[1:]),
    )


def envoy_tracing(settings: Settings) -> EnvoyTracing | None:
    """Envoy's tracer, to the collector the extension server's traces go to (``None``: traces off)."""
    where = tracing.target(settings.otel, os.environ)
    if where is None:
        return None
    return EnvoyTracing(
        protocol="grpc" if where.protocol == "grpc" else "http",
        host=where.host,
        port=where.port,
        path=where.path,
        tls=where.secure,
        service_name=f"{where.service_name}-envoy",
        sample_percent=round(where.sample_ratio * 100, 4),
    )


def check(settings: Settings) -> str:
    """``mcp-extproc check``: validate resources and pipeline; a summary on success."""
    catalog, pipeline, warnings = checked(settings, None, lone_agent_is_workload=True)
    servers = ", ".join(sorted(catalog.servers))
    counts = f"{len(catalog.servers)} MCPServer: {servers}; {len(catalog.policies)} MCPToolPolicy; "
    counts += f"{len(catalog.agents)} MCPAgent"
    if catalog.virtual_servers:
        counts += f"; {len(catalog.virtual_servers)} MCPVirtualServer: {', '.join(sorted(catalog.virtual_servers))}"
    if catalog.grants or catalog.consents:
        counts += f"; {len(catalog.grants)} MCPAccessGrant, {len(catalog.consents)} MCPConsent"
    lines = [f"{settings.resources}: {warning}" for warning in warnings]
    lines.append(f"{settings.resources}: OK ({counts}; stages: {', '.join(pipeline.names)})")
    return "\n".join(lines)


def render_envoy(settings: Settings) -> str:
    """``mcp-extproc render envoy``: the bootstrap ``up`` would run."""
    catalog, pipeline = build(settings, lone_agent_is_workload=True)
    extproc = (f"unix:{settings.unix}",) if settings.unix else settings.extproc_addresses or (settings.grpc,)
    authz_http = settings.authz_http_sockets or ((settings.authz_http,) if settings.authz_http else ())
    streams = settings.streams_sockets or ((settings.streams,) if settings.streams else ())
    options = bootstrap_options(settings, pipeline.plan, extproc=extproc, authz_http=authz_http, streams=streams)
    return render_bootstrap_yaml(catalog, pipeline.needs, options)
