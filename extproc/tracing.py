"""Traces: off unless asked for; then OpenTelemetry's SDK, which is imported only then.

Data flow::

    --otel [ENDPOINT], OTEL_* ──target(flag, environ)──▶ Target | None (endpoint, protocol,
        service name, sampling: what our exporter and Envoy's tracer are both given)
    start(target) ──▶ import opentelemetry: TracerProvider (resource, OTEL_TRACES_SAMPLER)
                      + BatchSpanProcessor (OTLP over http/protobuf or grpc) ──▶ ACTIVE
    stages and helpers ──span(name, attributes)──▶ a child of the current span (the stage
                           hook's), ended when the ``with`` block is left; an exception
                           marks it failed
                       ──root_span(name, link)───▶ a trace of its own, linked to a span of
                           another (the session keeper's requests)
                       ──inject(headers)─────────▶ + traceparent/tracestate of the current span
    stop() ──▶ flush and shut the exporter down

Off (the default) ``ACTIVE`` is ``None``: :func:`span` and :func:`root_span` return one
shared no-op context manager, :func:`inject` and :func:`link_here` return at once, and no
OpenTelemetry module is ever imported.

While an exchange's parent is not known yet (:mod:`extproc.core.traces`: a request whose
trace context may be in a body still to come), spans are *recorded* (:func:`record`) and
replayed under the exchange's span once it exists (:func:`replay`).

Attribute values are names, ids and URLs without their query; never a token or a secret.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

from extproc.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, SpanContext, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

Value = str | bool | int | float
"""An attribute value."""

SERVICE_NAME: Final = "mcp-extproc"
_TRUE: Final = frozenset({"true", "1", "yes"})


class SpanHandle(Protocol):
    """What the code inside ``with span(...) as handle`` may do with its span."""

    def set_attribute(self, key: str, value: Value) -> None: ...


class _NoSpan:
    """The no-op span and context manager (tracing off)."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def set_attribute(self, key: str, value: Value) -> None:
        return None


NO_SPAN: Final = _NoSpan()


@dataclass(frozen=True)
class Target:
    """Where traces go, from ``--otel`` and the standard ``OTEL_*`` variables.

    Attributes:
        protocol: ``http/protobuf`` or ``grpc`` (OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL).
        url: the collector's URL: for http/protobuf the traces endpoint itself
            (``…/v1/traces``), for grpc the ``scheme://host:port`` of the service.
        service_name: OTEL_SERVICE_NAME (or ``service.name`` in OTEL_RESOURCE_ATTRIBUTES).
        sample_ratio: the ratio OTEL_TRACES_SAMPLER(_ARG) samples new traces at, for
            Envoy's tracer (ours reads the variables itself).
    """

    protocol: Literal["http/protobuf", "grpc"]
    url: str
    service_name: str = SERVICE_NAME
    sample_ratio: float = 1.0

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "localhost"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def path(self) -> str:
        return urlsplit(self.url).path or "/"

    @property
    def secure(self) -> bool:
        return urlsplit(self.url).scheme == "https"


def target(flag: str | None, environ: Mapping[str, str]) -> Target | None:
    """Where traces go, or ``None`` when tracing is off.

    On with ``--otel`` (``flag`` not ``None``; its value, when given, is the collector's base
    URL as OTEL_EXPORTER_OTLP_ENDPOINT would be) or with ``OTEL_TRACES_EXPORTER=otlp``; always
    off with ``OTEL_SDK_DISABLED=true``.

    Raises:
        ConfigError: an unsupported protocol or an endpoint that is not an http(s) URL.
    """
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() in _TRUE:
        return None
    if flag is None and environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() != "otlp":
        return None
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (protocol or "http/protobuf").strip()
    if protocol not in ("http/protobuf", "grpc"):
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: mcp-extproc sends http/protobuf or grpc")
    signal = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    base = (flag or "").strip() or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    http = protocol == "http/protobuf"
    if flag:
        url = _url(base, "--otel")
        url = url.rstrip("/") + "/v1/traces" if http else url
    elif signal:
        url = _url(signal, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    elif base:
        url = _url(base, "OTEL_EXPORTER_OTLP_ENDPOINT")
        url = url.rstrip("/") + "/v1/traces" if http else url
    else:
        url = "http://localhost:4318/v1/traces" if http else "http://localhost:4317"
    return Target(protocol, url, _service_name(environ), _sample_ratio(environ))  # type: ignore[arg-type]


def _url(value: str, where: str) -> str:
    if "://" not in value:
        value = f"http://{value}"  # host:port, as a gRPC endpoint is often written
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: expected a collector URL such as http://127.0.0.1:4318, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(f"{where}: the port of {value!r} is not a number") from None
    return value


def _service_name(environ: Mapping[str, str]) -> str:
    name = environ.get("OTEL_SERVICE_NAME", "").strip()
    if name:
        return name
    for pair in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = pair.partition("=")
        if key.strip() == "service.name" and value.strip():
            return value.strip()
    return SERVICE_NAME


def _sample_ratio(environ: Mapping[str, str]) -> float:
    sampler = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if sampler.endswith("always_off"):
        return 0.0
    if not sampler.endswith("traceidratio"):
        return 1.0
    try:
        return min(1.0, max(0.0, float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
    except ValueError:
        return 1.0


@dataclass
class Active:
    """Tracing on: the provider, our tracer, the W3C propagator and the API module (``trace``)."""

    provider: TracerProvider
    tracer: Tracer
    propagator: TraceContextTextMapPropagator
    trace: ModuleType
    empty: OtelContext
    """A context with no span: the parent of a root span."""
    context: ModuleType
    """``opentelemetry.context`` (attach, detach)."""


ACTIVE: Active | None = None
"""Set by :func:`start`; ``None`` while tracing is off."""


def start(where: Target, exporter: Any = None) -> Active:
    """Turn tracing on: build the SDK's provider and exporter (importing them now).

    ``exporter``: an SDK ``SpanExporter`` to use instead of OTLP, synchronously (tests).

    Raises:
        ConfigError: the ``otel`` extra is not installed, or its protobuf files were
            overwritten by xds-protos' older copies.
    """
    global ACTIVE
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        raise ConfigError("tracing needs the otel extra: pip install 'mcp-extproc[otel]'") from None
    from importlib.metadata import PackageNotFoundError, version

    from opentelemetry import context, trace

    try:
        ours = version("mcp-extproc")
    except PackageNotFoundError:  # pragma: no cover - a source tree
        ours = "unknown"
    # Our own provider, not the global one: libraries in this process trace nothing unasked.
    provider = TracerProvider(resource=Resource.create({"service.name": where.service_name, "service.version": ours}))
    if exporter is None:
        provider.add_span_processor(BatchSpanProcessor(_exporter(where)))
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("mcp-extproc", ours)
    ACTIVE = Active(provider, tracer, TraceContextTextMapPropagator(), trace, context.Context(), context)
    return ACTIVE


_PROTO_CLOBBERED = (
    "the OpenTelemetry exporter cannot load its protobuf messages: xds-protos (an Envoy dependency) installs "
    "older copies of the opentelemetry/proto files, and it was installed after opentelemetry-proto; run "
    "pip install --force-reinstall --no-deps opentelemetry-proto"
)


def _exporter(where: Target) -> Any:
    try:
        if where.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

            return GrpcExporter(endpoint=where.url, insecure=not where.secure)
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        # Both packages ship opentelemetry/proto/...; whichever pip installed last wins.
        raise ConfigError(f"{_PROTO_CLOBBERED} ({exc})") from None
    return OTLPSpanExporter(endpoint=where.url)


def stop() -> None:
    """Flush what is buffered and turn tracing off (server shutdown)."""
    global ACTIVE
    active, ACTIVE = ACTIVE, None
    if active is not None:
        active.provider.shutdown()


# -- spans for stages and their helpers ---------------------------------------------------


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment (any of them can carry a credential)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    host = (parts.hostname or "") + (f":{port}" if port is not None else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))[:512]


def session_digest(session_id: str) -> str:
    """What a span says of a session id: the first 32 hex digits of its SHA-256, never the id."""
    return hashlib.sha256(session_id.encode()).hexdigest()[:32]


def span(
    name: str, attributes: Mapping[str, Value] | None = None, *, client: bool = False
) -> contextlib.AbstractContextManager[SpanHandle]:
    """A child span of the current one for the ``with`` block (``client``: an outbound call)."""
    active = ACTIVE
    if active is None:
        return NO_SPAN
    recording = _RECORDING.get()
    if recording is not None:
        return record(name, attributes, parent=recording, client=client)
    kind = active.trace.SpanKind.CLIENT if client else active.trace.SpanKind.INTERNAL
    return active.tracer.start_as_current_span(name, kind=kind, attributes=attributes)


def root_span(
    name: str, link: object | None, attributes: Mapping[str, Value] | None = None
) -> contextlib.AbstractContextManager[SpanHandle]:
    """A client span starting a trace of its own, linked to ``link`` (what :func:`link_here` gave)."""
    active = ACTIVE
    if active is None:
        return NO_SPAN
    links = [active.trace.Link(link)] if link is not None else None
    kind = active.trace.SpanKind.CLIENT
    return active.tracer.start_as_current_span(
        name, context=active.empty, kind=kind, attributes=attributes, links=links
    )


def link_here() -> SpanContext | None:
    """The current span's context, for a later :func:`root_span` to link to (``None`` when off)."""
    active = ACTIVE
    if active is None or _RECORDING.get() is not None:
        return None
    found: SpanContext = active.trace.get_current_span().get_span_context()
    return found if found.is_valid else None


def inject(headers: dict[str, str]) -> None:
    """Add the current span's ``traceparent`` (and ``tracestate``) to ``headers``; nothing when off."""
    active = ACTIVE
    if active is not None and _RECORDING.get() is None:
        active.propagator.inject(headers)


# -- recording spans until their parent is known --------------------------------------------


@dataclass
class Recorded:
    """A span that ran before its parent existed: replayed later with these times."""

    name: str
    attributes: dict[str, Value] = field(default_factory=dict)
    start_ns: int = field(default_factory=time.time_ns)
    end_ns: int = 0
    error: BaseException | None = None
    children: list[Recorded] = field(default_factory=list)
    client: bool = False

    def set_attribute(self, key: str, value: Value) -> None:
        self.attributes[key] = value


_RECORDING: ContextVar[Recorded | None] = ContextVar("mcp_extproc_recording", default=None)


@contextlib.contextmanager
def record(
    name: str,
    attributes: Mapping[str, Value] | None = None,
    *,
    parent: Recorded | list[Recorded],
    client: bool = False,
) -> Iterator[Recorded]:
    """Record a span (and the spans opened inside it) under ``parent`` instead of exporting it."""
    recorded = Recorded(name, dict(attributes or {}), client=client)
    (parent.children if isinstance(parent, Recorded) else parent).append(recorded)
    token = _RECORDING.set(recorded)
    try:
        yield recorded
    except BaseException as exc:
        recorded.error = exc
        raise
    finally:
        recorded.end_ns = time.time_ns()
        _RECORDING.reset(token)


def replay(records: Sequence[Recorded], parent: OtelContext) -> None:
    """Export recorded spans (and their children) under ``parent``, with their own times."""
    active = ACTIVE
    if active is None:
        return
    trace = active.trace
    for done in records:
        kind = trace.SpanKind.CLIENT if done.client else trace.SpanKind.INTERNAL
        child: Span = active.tracer.start_span(
            done.name, context=parent, kind=kind, attributes=done.attributes, start_time=done.start_ns
        )
        if isinstance(done.error, Exception):
            child.record_exception(done.error)
            child.set_status(trace.Status(trace.StatusCode.ERROR, f"{type(done.error).__name__}: {done.error}"))
        replay(done.children, trace.set_span_in_context(child))
        child.end(end_time=done.end_ns or done.start_ns)
