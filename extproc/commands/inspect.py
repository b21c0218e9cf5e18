"""Loading what a command runs, and the commands that only look: ``check`` and ``render envoy``.

Data flow::

    Settings ──▶ load_resources (-f) ──▶ Catalog
             ──▶ pipeline file (--pipeline, else the default) ──▶ Registry ──▶ Pipeline (built, not started)
             ──▶ posture_problems(catalog, stages): a pipeline that cannot enforce the resources
                 (no authn with an MCPAgent, no allowlist, …, or failureMode: open) is refused
             ──▶ every stage checks the catalog (e.g. Rego compiles): errors refuse, warnings print
    check:        a one-line summary of what was loaded
    render envoy: bootstrap_options(settings, plan) ──▶ the pure renderer ──▶ YAML
"""

from __future__ import annotations

import logging

from extproc.config.pipeline_file import DEFAULT_PIPELINE, load_pipeline_config
from extproc.config.resources import Catalog, load_resources
from extproc.config.settings import Settings, split_hostport
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.plan import Plan
from extproc.core.posture import posture_problems
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.render.bootstrap import render_bootstrap_yaml
from extproc.render.options import BootstrapOptions

log = logging.getLogger("mcp_extproc.commands")


def checked(settings: Settings, metrics: Metrics | None) -> tuple[Catalog, Pipeline, list[str]]:
    """Load the resources, build (not start) the pipeline and let the stages check the resources.

    Returns:
        The catalog, the pipeline and the stages' warnings.

    Raises:
        ConfigError: a document is invalid, the pipeline cannot enforce the resources (named
            with the pipeline file), or a stage finds a problem (e.g. a Rego syntax error).
    """
    catalog = load_resources(settings.resources)
    config = load_pipeline_config(settings.pipeline) if settings.pipeline else DEFAULT_PIPELINE
    pipeline = Registry().build_pipeline(config, metrics)
    unenforced = posture_problems(catalog, [(spec.name, spec.failure_mode) for spec in config.stages])
    if unenforced:
        where = settings.pipeline or "the default pipeline"
        raise ConfigError(f"{where}: " + f"\n{where}: ".join(unenforced))
    errors, warnings = pipeline.check_split(catalog)
    if errors:
        raise ConfigError(f"{settings.resources}: " + f"\n{settings.resources}: ".join(errors))
    return catalog, pipeline, warnings


def build(settings: Settings, metrics: Metrics | None = None) -> tuple[Catalog, Pipeline]:
    """:func:`checked`, logging the stages' warnings."""
    catalog, pipeline, warnings = checked(settings, metrics)
    for warning in warnings:
        log.warning("%s", warning)
    return catalog, pipeline


def bootstrap_options(
    settings: Settings,
    plan: Plan,
    *,
    extproc_tcp: str | None,
    extproc_unix: str | None,
    authz_http: str | None,
) -> BootstrapOptions:
    """What ``up`` and ``render envoy`` both render: the listener, limits and where the server is."""
    host, port = split_hostport(settings.listen, "--listen")
    return BootstrapOptions(
        listen_host=host,
        listen_port=port,
        extproc_tcp=extproc_tcp,
        extproc_unix=extproc_unix,
        stream_idle_timeout_s=settings.stream_idle_timeout_s,
        max_request_bytes=plan.max_request_bytes,
        front_door="ext_authz" if settings.front_door == "ext_authz" else "ext_proc",
        fast_calls=plan.fast_call_eras if settings.front_door == "auto" else frozenset(),
        authz_http_unix=authz_http,
        admin_socket=settings.admin_socket,
    )


def check(settings: Settings) -> str:
    """``mcp-extproc check``: validate resources and pipeline; a summary on success."""
    catalog, pipeline, warnings = checked(settings, None)
    servers = ", ".join(sorted(catalog.servers))
    counts = f"{len(catalog.servers)} MCPServer: {servers}; {len(catalog.policies)} MCPToolPolicy; "
    counts += f"{len(catalog.agents)} MCPAgent"
    lines = [f"{settings.resources}: {warning}" for warning in warnings]
    lines.append(f"{settings.resources}: OK ({counts}; stages: {', '.join(pipeline.names)})")
    return "\n".join(lines)


def render_envoy(settings: Settings) -> str:
    """``mcp-extproc render envoy``: the bootstrap ``up`` would run."""
    catalog, pipeline = build(settings)
    options = bootstrap_options(
        settings,
        pipeline.plan,
        extproc_tcp=settings.grpc if not settings.unix else None,
        extproc_unix=settings.unix,
        authz_http=settings.authz_http,
    )
    return render_bootstrap_yaml(catalog, pipeline.needs, options)
