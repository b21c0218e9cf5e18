"""One span per MCP exchange, named and attributed by the OpenTelemetry MCP semantic conventions.

Only while tracing is on (:data:`extproc.tracing.ACTIVE`). Off, the front doors never call
:func:`begin`, ``ctx.book.trace`` stays ``None`` and the pipeline runs its hooks as before.

Data flow::

    front door ──begin(ctx, envoy, body)──▶ ExchangeTrace in ctx.book.trace
        parent: the agent's context (traceparent/tracestate header, else params._meta), or
                Envoy's own span (the traceparent of the ext_proc stream's or Check's gRPC
                metadata) when it continues the agent's trace; an Envoy span in another
                trace (the agent's context was only in the body) becomes a link
        not known yet (ext_proc: no header, a body still to come): the request-headers
                hooks are recorded, and replayed under the span once body() names it
    pipeline ──hook(stage, phase, call)──▶ child span "{stage} {phase}", current while the hook
                runs, so token, JWKS, Rego and external calls nest under it (the chunks of a
                streamed response are counted, not spanned; a trace the sampler dropped gets
                no hook spans, its context is current all the same)
    front door ──forward(outcome)──▶ + traceparent/tracestate of our span, for the upstream
               ──decided(decision, reason) / stopped(stop)──▶ decision, reason, JSON-RPC code
               ──end()──▶ name "{mcp.method.name} {target}", the MCP attributes, ended
                   (ext_proc: when the stream closes; a Check: once answered)

No attribute carries a header value, a token, a secret, tool arguments or a raw session id
(:func:`extproc.tracing.session_digest`); a resource URI loses its user info, query and fragment.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from dataclasses import replace
from types import ModuleType
from typing import TYPE_CHECKING, Final

from extproc import tracing
from extproc.api import Answer, Context, Continue, Deny, Phase, Stop, Verdict
from extproc.mcp.headers import MCP_PROTOCOL_VERSION, MCP_SESSION_ID, TRACE_HEADERS
from extproc.tracing import Value, safe_url, session_digest

if TYPE_CHECKING:
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.trace import Span

NOT_ERRORS: Final = frozenset({-32700, -32600, -32601, -32602, -32002})
"""JSON-RPC codes the conventions do not count as the server's error: the caller's mistakes."""
_MAX_NAME: Final = 128
_RESOURCE_METHODS: Final = frozenset({"resources/read", "resources/subscribe", "resources/unsubscribe"})


def span_name(ctx: Context) -> str:
    """``{mcp.method.name} {target}`` (the tool or prompt), ``{mcp.method.name}``, else the HTTP method."""
    request = ctx.mcp
    if request is None or not request.messages or request.messages[0].method is None:
        method = ctx.hints.method if ctx.hints is not None else None
        return method[:_MAX_NAME] if method else ctx.http_method
    first = request.messages[0]
    method = str(first.method)[:_MAX_NAME]
    target = _target(method, first.params)
    return f"{method} {target}" if target else method


def _target(method: str, params: object) -> str | None:
    if method not in ("tools/call", "prompts/get") or not isinstance(params, dict):
        return None
    name = params.get("name")
    return name[:_MAX_NAME] if isinstance(name, str) else None


def exchange_attributes(ctx: Context) -> dict[str, Value]:
    """The exchange span's attributes, from what the stages established (the conventions' names
    first, ``mcp_extproc.*`` for the gateway's own)."""
    attributes: dict[str, Value] = {
        "network.transport": "tcp",
        "network.protocol.name": "http",
        "http.request.method": ctx.http_method,
        "mcp_extproc.front_door": ctx.front_door.value,
    }
    request = ctx.mcp
    version = request.protocol_version if request is not None else None
    if request is not None and request.messages:
        first = request.messages[0]
        if first.method is not None:
            method = str(first.method)[:_MAX_NAME]
            attributes["mcp.method.name"] = method
            params = first.params if isinstance(first.params, dict) else {}
            name = _target(method, params)
            if method == "tools/call":
                attributes["gen_ai.operation.name"] = "execute_tool"
                if name:
                    attributes["gen_ai.tool.name"] = name
            elif method == "prompts/get" and name:
                attributes["gen_ai.prompt.name"] = name
            elif method in _RESOURCE_METHODS and isinstance(params.get("uri"), str):
                attributes["mcp.resource.uri"] = safe_url(params["uri"])
        if first.id is not None and first.kind == "request":
            attributes["jsonrpc.request.id"] = str(first.id)[:_MAX_NAME]
        if request.is_batch:
            attributes["mcp_extproc.batch.size"] = len(request.messages)
    elif ctx.hints is not None and ctx.hints.method:
        attributes["mcp.method.name"] = ctx.hints.method[:_MAX_NAME]
    version = version or ctx.request_headers.get(MCP_PROTOCOL_VERSION)
    if version:
        attributes["mcp.protocol.version"] = version[:_MAX_NAME]
    session = ctx.request_headers.get(MCP_SESSION_ID)
    if session:
        attributes["mcp.session.id"] = session_digest(session)
    if ctx.server is not None:
        attributes["mcp_extproc.server.name"] = ctx.server.name
    principal = ctx.principal
    if principal is not None:
        attributes["enduser.id"] = principal.subject[:256]
        if principal.agent:
            attributes["mcp_extproc.agent"] = principal.agent
        if principal.issuer:
            attributes["mcp_extproc.principal.issuer"] = principal.issuer[:256]
    if ctx.response_status:
        attributes["http.response.status_code"] = ctx.response_status
    return attributes


def meta_carrier(body: bytes) -> dict[str, str] | None:
    """``params._meta``'s traceparent and tracestate (of the first request of a batch), if any."""
    if b"traceparent" not in body:
        return None  # the usual case: no parse
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    first = decoded[0] if isinstance(decoded, list) and decoded else decoded
    params = first.get("params") if isinstance(first, dict) else None
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("traceparent"), str):
        return None
    return {key: meta[key] for key in TRACE_HEADERS if isinstance(meta.get(key), str)}


def begin(ctx: Context, *, envoy: str | None = None, body: bytes | None = None) -> ExchangeTrace | None:
    """Start tracing ``ctx``'s exchange (``None`` when tracing is off).

    ``envoy``: the traceparent Envoy sent with the ext_proc stream or the Check (its own span,
    when Envoy traces); ``body``: the request body when it is already here (a Check).
    """
    active = tracing.ACTIVE
    if active is None:
        return None
    trace = ExchangeTrace(ctx, active, envoy)
    ctx.book.trace = trace
    if trace.header is not None or body is not None or not ctx.request_has_body:
        trace.open(meta_carrier(body) if body and trace.header is None else None)
    return trace


class ExchangeTrace:
    """The span of one exchange and what it needs until it ends."""

    __slots__ = (
        "active",
        "chunks",
        "context",
        "ctx",
        "envoy",
        "failed",
        "forwarded",
        "header",
        "pending",
        "sampled",
        "span",
        "start_ns",
    )

    def __init__(self, ctx: Context, active: tracing.Active, envoy: str | None) -> None:
        self.ctx = ctx
        self.active = active
        self.start_ns = time.time_ns()
        self.span: Span | None = None
        self.context: OtelContext | None = None
        self.pending: list[tracing.Recorded] = []
        self.forwarded = False
        self.failed = False
        self.sampled = True
        self.chunks = 0
        self.envoy = self._extract({"traceparent": envoy}) if envoy else None
        headers = ctx.request_headers
        carrier = {key: headers[key] for key in TRACE_HEADERS if key in headers}
        # Envoy's HTTP authorization request carries Envoy's context in place of the agent's.
        agents = "traceparent" in carrier and carrier["traceparent"] != envoy
        self.header = self._extract(carrier) if agents else None

    def _extract(self, carrier: dict[str, str]) -> OtelContext | None:
        found = self.active.propagator.extract(carrier)
        return found if self.active.trace.get_current_span(found).get_span_context().is_valid else None

    def open(self, meta: dict[str, str] | None) -> None:
        """Start the span under its parent (see the module docstring) and replay what was recorded."""
        if self.span is not None:
            return
        trace = self.active.trace
        agent = self.header or (self._extract(meta) if meta else None)
        links = None
        if self.envoy is not None and (agent is None or _trace_id(trace, self.envoy) == _trace_id(trace, agent)):
            parent = self.envoy
        elif agent is not None:
            parent = agent
            if self.envoy is not None:
                links = [trace.Link(trace.get_current_span(self.envoy).get_span_context())]
        else:
            parent = self.active.empty
        self.span = self.active.tracer.start_span(
            self.ctx.http_method, context=parent, kind=trace.SpanKind.SERVER, start_time=self.start_ns, links=links
        )
        self.context = trace.set_span_in_context(self.span)
        self.sampled = self.span.is_recording()
        if self.pending:
            tracing.replay(self.pending, self.context)
            self.pending = []

    def body(self, body: bytes) -> None:
        """The request body arrived: its ``_meta`` may name the parent."""
        if self.span is None:
            self.open(meta_carrier(body) if self.header is None else None)

    async def hook(self, stage: str, phase: Phase, call: Awaitable[Verdict]) -> Verdict:
        """Run one stage hook under its own span, ``{stage} {phase}``, current while it runs."""
        name = f"{stage} {phase.value}"
        if self.span is None:
            with tracing.record(name, parent=self.pending) as recorded:
                verdict = await call
                _verdict_attributes(recorded, verdict)
            return verdict
        if phase is Phase.RESPONSE_BODY and self.ctx.book.response_streamed:
            self.chunks += 1
            return await call
        active = self.active
        if not self.sampled:
            # A trace the sampler dropped: no hook spans (each costs ~20 us), but the context is
            # current, so what the hook sends out (a token request) still carries it.
            token = active.context.attach(self.context)
            try:
                return await call
            finally:
                active.context.detach(token)
        # By hand rather than start_as_current_span: a third less per span, and every hook has one.
        span = active.tracer.start_span(name, context=self.context)
        token = active.context.attach(active.trace.set_span_in_context(span, self.context))
        try:
            verdict = await call
            _verdict_attributes(span, verdict)
            return verdict
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(active.trace.Status(active.trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            active.context.detach(token)
            span.end()

    def forward(self, outcome: Continue) -> Continue:
        """``outcome`` with our span's traceparent (and tracestate) for the upstream, once."""
        if self.span is None or self.forwarded:
            return outcome
        self.forwarded = True
        carrier: dict[str, str] = {}
        self.active.propagator.inject(carrier, context=self.context)
        return replace(outcome, set_headers={**outcome.set_headers, **carrier}) if carrier else outcome

    def decided(self, decision: str, reason: str) -> None:
        """The request-side decision (the audit line's)."""
        self.open(None)
        assert self.span is not None
        self.span.set_attribute("mcp_extproc.decision", decision)
        if reason:
            self.span.set_attribute("mcp_extproc.reason", reason)

    def stopped(self, stop: Stop) -> None:
        """The exchange was answered by the gateway: a refusal's code and message, or an answer."""
        self.open(None)
        span = self.span
        assert span is not None
        span.set_attribute("http.response.status_code", stop.status)
        if isinstance(stop, Answer):
            return
        span.set_attribute("rpc.response.status_code", str(stop.code))
        if stop.code not in NOT_ERRORS:
            self.failed = True
            span.set_attribute("error.type", str(stop.code))
            trace = self.active.trace
            span.set_status(trace.Status(trace.StatusCode.ERROR, stop.message[:512]))

    def end(self) -> None:
        """Name the span, give it the exchange's attributes and end it."""
        self.open(None)
        span = self.span
        assert span is not None
        span.update_name(span_name(self.ctx))
        span.set_attributes(exchange_attributes(self.ctx))
        if self.chunks:
            span.set_attribute("mcp_extproc.response.chunks", self.chunks)
        status = self.ctx.response_status or 0
        if status >= 500 and not self.failed:
            span.set_attribute("error.type", str(status))  # the upstream's failure
        span.end()


def _trace_id(trace: ModuleType, context: OtelContext) -> int:
    found: int = trace.get_current_span(context).get_span_context().trace_id
    return found


def _verdict_attributes(span: tracing.SpanHandle, verdict: Verdict) -> None:
    if isinstance(verdict, Deny | Answer):
        span.set_attribute("mcp_extproc.verdict", "deny" if isinstance(verdict, Deny) else "answer")
        span.set_attribute("mcp_extproc.reason", verdict.reason)
