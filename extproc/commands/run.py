"""``mcp-extproc up`` and ``serve``: run the gRPC server (and, for ``up``, Envoy).

Data flow for ``up``::

    resources.yaml ─▶ Catalog ─▶ Pipeline ─▶ gRPC server (this process, unix socket)
                              │             + HTTP authorization service (fast routes)
                              └─▶ render bootstrap ─▶ envoy -c bootstrap.yaml (child; its admin
                                  on <workdir>/envoy-admin.sock, mode 0600)
    agent ─▶ http://<listen>/<server>/mcp ─▶ Envoy ─ext_proc/ext_authz─▶ this process
                                                 └─▶ MCP server

The public URL (``--public-url``; ``up``: ``http://<listen>`` by default) becomes the
``authn`` stage's ``publicUrl`` unless the pipeline file sets one, before any stage
starts: the URLs ``authn`` hands agents never come from the request's ``Host``.
``serve`` with an ``MCPAgent`` and no public URL refuses to start. The session key set
(``--session-key-file``; ``up``: ``$XDG_STATE_HOME/mcp-extproc/session-keys.json`` by
default) is created or checked before anything starts and becomes the ``session`` stage's
``keyFile``: a restarted ``up`` keeps its sessions.

Before anything starts, the addresses they listen on are checked (:mod:`extproc.commands.ports`):
a ``--listen``, ``--grpc`` or ``--metrics`` someone already listens on is one line and exit 2,
never a second Envoy sharing the port.

On SIGINT/SIGTERM Envoy is stopped first (no new exchanges), then the gRPC server
(NOT_SERVING, ``stop(grace)``, stage shutdown). The Envoy child itself is handled by
:mod:`extproc.commands.envoy`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

from extproc import tracing
from extproc.commands import envoy, ports
from extproc.commands.inspect import bootstrap_options, build
from extproc.config.pins_file import default_pins_file
from extproc.config.resources import Catalog
from extproc.config.session_keys import default_key_file, load_key_set
from extproc.config.settings import Settings, public_origin, split_hostport
from extproc.core import reload
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.errors import ConfigError, ProcessError
from extproc.frontdoor.report import ReportServer
from extproc.frontdoor.servers import ExtProcServer, Listen
from extproc.render.bootstrap import render_bootstrap_yaml

log = logging.getLogger("mcp_extproc.up")


def _watch(settings: Settings, server: ExtProcServer, metrics: Metrics) -> asyncio.Task[None] | None:
    if settings.reload_interval_s <= 0:
        return None
    return asyncio.create_task(reload.watch(settings.resources, server, metrics, settings.reload_interval_s))


def _serve_metrics(settings: Settings, metrics: Metrics) -> None:
    if settings.metrics:
        host, port = split_hostport(settings.metrics, "--metrics")
        try:
            bound = metrics.serve(host, port)
        except OSError as exc:  # taken since ports.check_*
            raise ConfigError(f"--metrics {settings.metrics}: cannot listen there: {exc.strerror or exc}") from None
        log.info("metrics at http://%s:%d/metrics", host, bound)


def _serve_report(settings: Settings, server: ExtProcServer) -> ReportServer | None:
    """``--report``: what the stages observed, for bearers of a token signed with the session keys.

    Raises:
        ConfigError: no ``--session-key-file`` (the report's readers sign with that set), or
            the address cannot be bound.
    """
    if not settings.report:
        return None
    if settings.session_key_file is None:
        raise ConfigError("--report needs --session-key-file: the controller signs its requests with that key set")
    keys = load_key_set(Path(settings.session_key_file), create=True)
    host, port = split_hostport(settings.report, "--report")
    report = ReportServer(host, port, keys, lambda: server.pipeline.report())
    try:
        bound = report.start(asyncio.get_running_loop())
    except OSError as exc:
        raise ConfigError(f"--report {settings.report}: cannot listen there: {exc.strerror or exc}") from None
    log.info("report at http://%s:%d/report", host, bound)
    return report


def _public_url(settings: Settings, catalog: Catalog, pipeline: Pipeline, default: str | None) -> None:
    """Give the ``authn`` stage its public origin: the pipeline file's ``publicUrl``, else
    ``--public-url``, else ``default``. Before startup, so no request ever sees another.

    Raises:
        ConfigError: ``--public-url`` is malformed or contradicts the pipeline file's, or an
            ``MCPAgent`` is declared and there is no public URL at all.
    """
    flag = public_origin(settings.public_url, "--public-url") if settings.public_url is not None else None
    for stage in pipeline.stages:
        if stage.name != "authn" or "public_url" not in type(stage.config).model_fields:
            continue
        configured: str | None = stage.config.public_url
        if configured is not None and flag is not None and flag != configured:
            raise ConfigError(f"--public-url {flag} contradicts the pipeline's authn publicUrl {configured}")
        url = configured or flag or default
        if url is None:
            if catalog.agents:
                raise ConfigError(
                    "--public-url is required when an MCPAgent is declared: the origin agents reach Envoy at "
                    "(e.g. https://mcp.example.com), for WWW-Authenticate and the protected-resource metadata"
                )
            continue
        stage.config = stage.config.model_copy(update={"public_url": url})
        log.info("public URL: %s", url)


def _stop_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def _session_keys(settings: Settings, pipeline: Pipeline, default: Path | None) -> None:
    """Give the ``session`` and ``virtual`` stages their key set: the pipeline file's ``keyFile``, else
    ``--session-key-file``, else ``default`` (``up``'s state directory; ``serve``: none, a key
    in memory). The file is created (mode 0600) or checked here, before anything starts.

    Raises:
        ConfigError: the key file cannot be created or read, or is not a key set.
    """
    for stage in pipeline.stages:
        if stage.name not in ("session", "virtual") or "key_file" not in type(stage.config).model_fields:
            continue
        configured: str | None = stage.config.key_file
        chosen = configured or settings.session_key_file or default
        if chosen is None:
            continue
        keys = load_key_set(Path(chosen), create=True)
        stage.config = stage.config.model_copy(update={"key_file": str(chosen)})
        log.info("session key set: %s (%d key%s)", keys.source, len(keys.by_kid), "" if len(keys.by_kid) == 1 else "s")


def _pins_file(pipeline: Pipeline, default: Path) -> None:
    """Give the ``pins`` stage ``up``'s state file (``pins.json`` beside the session keys) unless
    the pipeline file names one, before startup: a restarted ``up`` keeps its tool pins."""
    for stage in pipeline.stages:
        if stage.name == "pins" and "state_file" in type(stage.config).model_fields and not stage.config.state_file:
            stage.config = stage.config.model_copy(update={"state_file": str(default)})


def _tracing(settings: Settings) -> None:
    """Traces on when ``--otel`` or the ``OTEL_*`` variables ask for them (:mod:`extproc.tracing`)."""
    where = tracing.target(settings.otel, os.environ)
    if where is not None:
        tracing.start(where)
        log.info("traces: OTLP %s to %s as %r", where.protocol, where.url, where.service_name)


async def serve(settings: Settings) -> int:
    """``mcp-extproc serve``: the gRPC server alone."""
    ports.check_serve(settings)
    metrics = Metrics()
    catalog, pipeline = build(settings, metrics)
    _public_url(settings, catalog, pipeline, None)
    _session_keys(settings, pipeline, None)
    _tracing(settings)
    listen = Listen(
        tcp=settings.grpc or None, unix=settings.unix, authz_http=settings.authz_http, streams=settings.streams
    )
    server = ExtProcServer(pipeline, catalog, listen)
    report = _serve_report(settings, server)
    await server.start()
    _serve_metrics(settings, metrics)
    watcher = _watch(settings, server, metrics)
    stop = _stop_signals()
    await stop.wait()
    log.info("stopping")
    if watcher is not None:
        watcher.cancel()
    if report is not None:
        report.stop()
    await server.stop(settings.grace_s)
    tracing.stop()
    return 0


async def up(settings: Settings) -> int:
    """``mcp-extproc up``: gRPC server plus Envoy, until SIGINT/SIGTERM."""
    host, port = split_hostport(settings.listen, "--listen")
    ports.check_up(settings)  # before anything starts: a busy port is one line and exit 2
    workdir = Path(tempfile.mkdtemp(prefix="mcp-extproc-"))
    socket_path = settings.unix or str(workdir / "extproc.sock")
    metrics = Metrics()
    catalog, pipeline = build(settings, metrics, lone_agent_is_workload=True)
    _public_url(settings, catalog, pipeline, public_origin(f"http://{settings.listen}", "--listen"))
    _session_keys(settings, pipeline, default_key_file())
    _tracing(settings)
    _pins_file(pipeline, default_pins_file())
    # The fast tools/call routes call our HTTP authorization service: grpc-python is the
    # slow part of a Check, not the hop (extproc.frontdoor.http_check).
    authz_socket = str(workdir / "authz.sock")
    # A virtual server's GET stream is served by our stream service (extproc.frontdoor.stream_service).
    streams = str(workdir / "streams.sock") if catalog.virtual_servers else None
    options = bootstrap_options(
        settings,
        pipeline.plan,
        extproc=(f"unix:{socket_path}",),
        authz_http=(authz_socket,),
        streams=(streams,) if streams else (),
    )
    authz_http = authz_socket if options.fast_calls else None
    # Envoy's admin API has no authentication: a unix socket only Envoy's user may open,
    # in this process's private (0700) work directory.
    admin_socket = workdir / "envoy-admin.sock"
    # Without SO_REUSEPORT, so a second Envoy on a port taken meanwhile fails instead of sharing it.
    options = dataclasses.replace(options, admin_socket=str(admin_socket), listen_reuse_port=False)
    bootstrap = workdir / "envoy.yaml"
    bootstrap.write_text(render_bootstrap_yaml(catalog, pipeline.needs, options))
    stop = _stop_signals()
    # Envoy is forked before gRPC starts its threads; it connects to the socket lazily.
    child = await envoy.start(bootstrap, settings.envoy_log_level)
    assert child.stdout is not None
    forward = asyncio.create_task(envoy.forward(child.stdout, "[envoy]"))
    server = ExtProcServer(
        pipeline, catalog, Listen(tcp=None, unix=socket_path, authz_http=authz_http, streams=streams)
    )
    code = 0
    watcher = None
    try:
        await server.start()
        _serve_metrics(settings, metrics)
        watcher = _watch(settings, server, metrics)
        await envoy.wait_ready(admin_socket, child, 30)
        log.info("envoy admin at unix:%s", admin_socket)
        for name in catalog.servers:
            log.info("ready: MCP server %r at http://%s:%d/%s/mcp", name, host, port, name)
        log.info("front door: %s", settings.front_door)
        waiter = asyncio.create_task(child.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if child.returncode is not None:
            log.error("envoy exited unexpectedly with status %s", child.returncode)
            code = 1
    except ProcessError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        if watcher is not None:
            watcher.cancel()
        await envoy.stop(child, settings.grace_s)
        await asyncio.wait_for(forward, timeout=5)
        await server.stop(settings.grace_s)
        tracing.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return code
