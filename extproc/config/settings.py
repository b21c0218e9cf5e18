"""The process settings: one frozen object, built once from flags in ``cli``.

Nothing reads the environment at import time; ``cli.main`` builds a
:class:`Settings` and hands it down. The field defaults are the command line's
defaults too (``cli`` reads them from here; they are written nowhere else).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from extproc.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to run.

    Attributes:
        resources: the resource file (``-f``).
        pipeline: an optional pipeline configuration file; the embedded default
            (``mcp`` then ``allowlist``) otherwise.
        listen: where ``up``'s Envoy accepts agents, ``host:port``.
        grpc: the gRPC server's TCP address (``serve``), ``host:port``.
        unix: the gRPC server's unix socket path, if any.
        authz_http: the unix socket of the HTTP authorization service the fast
            ``tools/call`` routes call (``serve`` listens there, ``render envoy`` points
            Envoy at it); ``None``: those routes use the gRPC ``Check``. ``up`` always
            uses one, on a private socket.
        extproc_addresses: ``render envoy --grpc``, given once or more: every address
            (``host:port``) of the extension server's replicas, all endpoints of one
            cluster; empty: ``grpc``. (``serve --grpc`` listens on exactly one: ``grpc``.)
        streams: the unix socket of the stream service (a virtual server's GET stream:
            ``serve`` listens there, ``render envoy`` points Envoy at it); ``None``: a
            virtual server answers GET with 405. ``up`` always uses one, on a private socket.
        authz_http_sockets: ``render envoy --authz-http``, given once or more: the HTTP
            authorization service's unix socket of every replica; empty: ``authz_http``.
        streams_sockets: ``render envoy --streams``, given once or more: the stream
            service's unix socket of every replica (each GET goes to the replica that offered it).
        metrics: ``host:port`` for ``/metrics``, or ``None`` to disable.
        report: ``host:port`` for ``/report`` (what the stages observed, for the
            controller; :mod:`extproc.frontdoor.report`), or ``None`` (the default).
        grace_s: how long in-flight streams may finish on shutdown.
        stream_idle_timeout_s: Envoy's stream idle timeout (GET/SSE silence).
        log_level: Python logging level name.
        envoy_log_level: Envoy's ``--log-level``.
        front_door: how Envoy calls us: ``auto`` (ext_proc, except one ext_authz
            ``Check`` for a ``tools/call`` no stage reads the response of),
            ``ext_proc`` (full pipeline for everything) or ``ext_authz``
            (request-side yes/no).
        reload_interval_s: how often the resource file is checked for changes
            (0 disables reloads).
        public_url: the origin agents reach Envoy at (``https://mcp.example.com``),
            ``--public-url``: the ``authn`` stage's ``WWW-Authenticate`` challenges and
            RFC 9728 metadata name it, never the request's ``Host``. ``None``: ``up``
            uses ``http://<listen>``; ``serve`` refuses to start when an ``MCPAgent``
            is declared (unless the pipeline's ``authn`` config sets ``publicUrl``).
        admin_socket: ``render envoy --admin-socket``: Envoy's admin interface on this
            unix socket (mode 0600); ``None``: the rendered bootstrap has no admin
            interface (it has no authentication, so never on TCP). ``up`` always puts
            one in its private directory.
        session_key_file: ``--session-key-file``: the JSON Web Key Set the gateway signs
            its legacy ``Mcp-Session-Id`` values with, created (mode 0600) when missing.
            ``None``: ``up`` keeps one in its state directory
            (:func:`extproc.config.session_keys.default_key_file`), ``serve`` holds a key in
            memory (sessions then survive neither a restart nor a move to another replica).
        otel: ``--otel [ENDPOINT]`` (``up``, ``serve``, ``render envoy``): traces on, to the
            collector at ENDPOINT (``""``: the one the ``OTEL_*`` variables name); ``None``:
            traces only if ``OTEL_TRACES_EXPORTER=otlp`` (:func:`extproc.tracing.target`).
    """

    resources: Path
    pipeline: Path | None = None
    listen: str = "127.0.0.1:10000"
    grpc: str = "127.0.0.1:50051"
    unix: str | None = None
    authz_http: str | None = None
    streams: str | None = None
    extproc_addresses: tuple[str, ...] = ()
    authz_http_sockets: tuple[str, ...] = ()
    streams_sockets: tuple[str, ...] = ()
    metrics: str | None = "127.0.0.1:9464"
    report: str | None = None
    grace_s: float = 5.0
    stream_idle_timeout_s: int = 3600
    log_level: str = "INFO"
    envoy_log_level: str = "warning"
    front_door: Literal["auto", "ext_proc", "ext_authz"] = "auto"
    reload_interval_s: float = 1.0
    public_url: str | None = None
    admin_socket: str | None = None
    session_key_file: Path | None = None
    otel: str | None = None


def split_hostport(value: str, flag: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` too), naming the flag on error."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{flag}: expected host:port (e.g. 127.0.0.1:10000), got {value!r}")
    return host.strip("[]"), int(port)


_ORIGIN: Final = re.compile(
    r"(?P<scheme>https?)://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
    r"(?::(?P<port>[0-9]{1,5}))?/?",
    re.IGNORECASE,
)


def public_origin(value: str, flag: str) -> str:
    """An http(s) origin (``https://mcp.example.com[:port]``), lower-cased, without a trailing ``/``.

    Nothing but a scheme, a host and a port: the value is written into a quoted
    ``WWW-Authenticate`` parameter, so anything else (a path, a query, a quote,
    a space) is refused, naming ``flag``.
    """
    found = _ORIGIN.fullmatch(value)
    if found is None or int(found["port"] or 0) > 65535:
        raise ConfigError(
            f"{flag}: expected an http or https origin such as https://mcp.example.com "
            f"(scheme, host, optional port; no path, query or fragment), got {value!r}"
        )
    port = f":{found['port']}" if found["port"] else ""
    return f"{found['scheme'].lower()}://{found['host'].lower()}{port}"
