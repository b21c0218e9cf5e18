"""The gRPC server: Envoy's ExternalProcessor service plus gRPC health checking.

Data flow::

    Envoy ──ext_proc stream──▶ ExtProcService.Process ──▶ Processor (one per stream)
                                   ▲  responses, one per request message  │
                                   └──────────────────────────────────────┘
    Envoy ──ext_authz Check───▶ AuthorizationService.Check (request side only)

Both services share the pipeline and the live catalog; :meth:`ExtProcServer.set_catalog`
swaps the catalog for new exchanges (reloads), in-flight ones keep theirs.

Lifecycle: ``start()`` starts the stages, binds TCP and/or a unix socket and
sets health to SERVING. ``stop(grace)`` (on SIGTERM) sets health to
NOT_SERVING first, so Envoy's health checks steer away, then stops the gRPC
server letting in-flight streams finish within ``grace``, then shuts the
stages down.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from envoy.service.auth.v3 import external_auth_pb2_grpc as authz_grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.config.resources import Catalog
from extproc.core.pipeline import Pipeline
from extproc.errors import ConfigError
from extproc.frontdoor.ext_proc import Processor
from extproc.frontdoor.grpc_check import AUTHZ_SERVICE, AuthorizationService
from extproc.frontdoor.http_check import AuthzHttpServer
from extproc.frontdoor.stream_service import StreamService
from extproc.render.wire import SERVER_METADATA_KEY

log = logging.getLogger("mcp_extproc.server")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


class ExtProcService(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Envoy's ``ExternalProcessor``: one :class:`Processor` per stream."""

    def __init__(self, pipeline: Pipeline, catalog: Catalog) -> None:
        self.pipeline = pipeline
        self.catalog = catalog

    async def Process(
        self, request_iterator: AsyncIterator[pb.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ProcessingResponse]:
        hint = envoy_trace = None
        for key, value in context.invocation_metadata() or ():
            if key == SERVER_METADATA_KEY:
                hint = value if isinstance(value, str) else value.decode()
            elif key == "traceparent":  # Envoy's own span, when it traces
                envoy_trace = value if isinstance(value, str) else value.decode()
        processor = Processor(self.pipeline, self.catalog, hint, envoy_trace)
        try:
            async for request in request_iterator:
                yield await processor.handle(request)
        finally:
            # Shielded: a reset stream cancels us, and the stages must still hear of it.
            await asyncio.shield(processor.close())


@dataclass(frozen=True)
class Listen:
    """Where the gRPC server listens: a TCP ``host:port`` and/or a unix socket path.

    ``authz_http``: also serve the fast ``tools/call`` routes' HTTP authorization
    service (:mod:`extproc.frontdoor.http_check`) on this unix socket.
    ``streams``: also serve the stream service (:mod:`extproc.frontdoor.stream_service`:
    a virtual server's GET stream) on this unix socket.
    """

    tcp: str | None = "127.0.0.1:0"
    unix: str | None = None
    authz_http: str | None = None
    streams: str | None = None


class ExtProcServer:
    """The running server; ``ports`` holds the bound TCP port after ``start``."""

    def __init__(self, pipeline: Pipeline, catalog: Catalog, listen: Listen) -> None:
        if not listen.tcp and not listen.unix:
            raise ConfigError("the gRPC server needs a TCP address or a unix socket path to listen on")
        self.pipeline = pipeline
        self.catalog = catalog
        self.listen = listen
        self.port: int | None = None
        self.health = health.aio.HealthServicer()
        self._extproc = ExtProcService(pipeline, catalog)
        self._authz = AuthorizationService(pipeline, catalog)
        self._authz_http = AuthzHttpServer(pipeline, catalog, listen.authz_http) if listen.authz_http else None
        self._streams = StreamService(listen.streams) if listen.streams else None
        self._server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ]
        )

    async def start(self) -> None:
        """Start the stages, bind, and report SERVING."""
        await self.pipeline.startup()
        pb_grpc.add_ExternalProcessorServicer_to_server(self._extproc, self._server)
        authz_grpc.add_AuthorizationServicer_to_server(self._authz, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        if self.listen.tcp:
            try:
                self.port = self._server.add_insecure_port(self.listen.tcp)
            except RuntimeError as exc:
                raise ConfigError(f"cannot listen on {self.listen.tcp}: {exc}") from None
        if self.listen.unix:
            path = Path(self.listen.unix)
            if path.exists() and path.is_socket():
                path.unlink()
            self._server.add_insecure_port(f"unix:{path}")
        # The HTTP service first: whoever sees the gRPC socket (a sidecar's startup probe)
        # may start Envoy, whose fast routes call this one.
        if self._authz_http is not None:
            await self._authz_http.start()
        if self._streams is not None:
            await self._streams.start()
        await self._server.start()
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "gRPC server listening (tcp=%s unix=%s) with stages %s",
            f"{self.listen.tcp.rsplit(':', 1)[0]}:{self.port}" if self.listen.tcp else None,
            self.listen.unix,
            list(self.pipeline.names),
        )

    def set_catalog(self, catalog: Catalog) -> None:
        """Serve new exchanges with ``catalog`` (a reload); in-flight exchanges keep theirs."""
        self.catalog = self._extproc.catalog = self._authz.catalog = catalog
        if self._authz_http is not None:
            self._authz_http.catalog = catalog

    async def _set_health(self, status: int) -> None:
        for service in ("", EXT_PROC_SERVICE, AUTHZ_SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, then stop(grace), then stage shutdown."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._authz_http is not None:
            await self._authz_http.stop()
        if self._streams is not None:
            await self._streams.stop()
        await self._server.stop(grace)
        await self.pipeline.shutdown()
        if self.listen.unix and os.path.exists(self.listen.unix):
            os.unlink(self.listen.unix)
        log.info("gRPC server stopped")

    async def wait(self) -> None:
        """Block until the server terminates."""
        await self._server.wait_for_termination()
