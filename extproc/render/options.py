"""What the renderer is told: where things listen, and which phases the stages need. Pure.

Data flow::

    Settings / ControllerSettings ──(extproc.commands.inspect, controller.render.sidecar)──▶
        BootstrapOptions + PhaseNeeds ──▶ extproc.render.bootstrap (the pure renderer)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from extproc.mcp.jsonrpc import DEFAULT_MAX_REQUEST_BYTES


@dataclass(frozen=True, slots=True)
class PhaseNeeds:
    """Which ext_proc phases at least one stage reads."""

    request_headers: bool
    request_body: bool
    response_headers: bool
    response_body: bool

    @property
    def response(self) -> bool:
        """True when any stage reads the response (headers or body)."""
        return self.response_headers or self.response_body


@dataclass(frozen=True, slots=True)
class EnvoyTracing:
    """Envoy's OpenTelemetry tracer: the collector the extension server sends its spans to.

    Attributes:
        protocol: OTLP over ``grpc`` or ``http`` (protobuf).
        host / port: the collector.
        path: the traces path (``http``).
        tls: reach the collector over TLS (``https``), checked against the system's CAs.
        service_name: the ``service.name`` of Envoy's spans.
        sample_percent: the share of requests without a sampled parent that are traced.
    """

    protocol: Literal["grpc", "http"]
    host: str
    port: int
    path: str = "/v1/traces"
    tls: bool = False
    service_name: str = "mcp-extproc-envoy"
    sample_percent: float = 100.0


@dataclass(frozen=True)
class BootstrapOptions:
    """Where things listen and how long streams may stay quiet.

    Attributes:
        listen_host / listen_port: where agents connect.
        listen_reuse_port: bind the listener with ``SO_REUSEPORT`` (Envoy's default on
            Linux), which lets a second Envoy bind the same port and take half its
            connections; ``up`` turns it off, so a second ``up`` on a busy port fails.
        admin_socket: Envoy's admin interface on this unix socket, mode 0600 (only the
            user Envoy runs as may connect: the admin API has no authentication, and
            anything on a loopback TCP port is open to every process sharing the host's
            or pod's network); ``None``: no admin interface at all.
        extproc_tcp: the gRPC server as ``host:port``, or ``None`` with ``extproc_unix``.
        extproc_unix: the gRPC server's unix socket path.
        extproc_replicas: further addresses of the same extension server (its other
            replicas), each ``host:port`` or ``unix:PATH``: the cluster lists every one,
            Envoy balances streams and ``Check``s across them and leaves a dead one
            (:mod:`extproc.render.replicas`).
        max_request_bytes: request size limit (Envoy's buffer limit follows it).
        stream_idle_timeout_s: how long a stream (GET/SSE) may stay silent.
        request_headers_timeout_s: how long a client may take to send its request
            headers (from their first byte); a slow or stalled client is then
            answered 408 and its connection freed.
        message_timeout_ms: how long Envoy waits for one ext_proc answer.
        access_log: write an access log line per request to stdout.
        max_connections: Envoy's limit on open downstream connections.
        front_door: ``ext_proc`` (the full pipeline, request and response) or
            ``ext_authz`` (request-side decisions only: one ``Check`` per request).
        fast_calls: with ``ext_proc``, the eras (``"legacy"``, ``"modern"``) whose
            ``tools/call`` goes to one ext_authz ``Check`` instead (see
            :mod:`extproc.render.fast_routes`); empty: everything through ext_proc.
        authz_http_unix: with ``fast_calls``, the unix socket of our HTTP authorization
            service (:mod:`extproc.frontdoor.http_check`), which the fast routes then call
            instead of the gRPC ``Check``; ``None``: gRPC.
        authz_http_replicas: further unix sockets of that service (other replicas).
        tracing: Envoy's OpenTelemetry tracer (:mod:`extproc.render.tracer`); ``None``: Envoy
            traces nothing.
        streams_unix: the unix socket of our stream service
            (:mod:`extproc.frontdoor.stream_service`), where a virtual server's GET stream
            is routed; ``None``: no such route (the virtual stage answers GET with 405).
        streams_replicas: the stream sockets of the other replicas: each ticket is then
            routed to the socket of the replica that offered it (its tag).
    """

    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    listen_reuse_port: bool = True
    admin_socket: str | None = None
    extproc_tcp: str | None = "127.0.0.1:50051"
    extproc_unix: str | None = None
    extproc_replicas: tuple[str, ...] = ()
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    stream_idle_timeout_s: int = 3600
    request_headers_timeout_s: int = 10
    message_timeout_ms: int = 2000
    access_log: bool = True
    max_connections: int = 10000
    front_door: Literal["ext_proc", "ext_authz"] = "ext_proc"
    fast_calls: frozenset[str] = frozenset()
    authz_http_unix: str | None = None
    authz_http_replicas: tuple[str, ...] = ()
    tracing: EnvoyTracing | None = None
    streams_unix: str | None = None
    streams_replicas: tuple[str, ...] = ()

    @property
    def extproc_endpoints(self) -> tuple[str, ...]:
        """Every address of the extension server, ``host:port`` or ``unix:PATH``, the first one first."""
        first = f"unix:{self.extproc_unix}" if self.extproc_unix else self.extproc_tcp
        return ((first,) if first else ()) + self.extproc_replicas

    @property
    def authz_http_endpoints(self) -> tuple[str, ...]:
        """Every unix socket of the HTTP authorization service (none: the fast routes use gRPC)."""
        return ((self.authz_http_unix,) if self.authz_http_unix else ()) + self.authz_http_replicas
