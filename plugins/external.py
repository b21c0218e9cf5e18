"""The ``external`` stage: call out-of-process stages over the external stage protocol.

Each configured service speaks ``mcp_extproc.stage.v1.ExternalStage`` (see
``protos/``) over TCP or a unix socket. At startup every service is asked
``Describe``; afterwards it is called only for the phases and methods it asked for,
and only for the MCP servers it is configured for (``servers:``).

Data flow::

    request body ─▶ for each message (each batch element), for each service wanting
                    PHASE_REQUEST and its method, in order:
                      Process(message, principal, server, metadata) ─▶
                        deny      → Deny (HTTP 200, JSON-RPC error, same id); the MCP
                                    server never sees the request (a batch is refused whole)
                        continue  → optionally new params (later services and the MCP
                                    server see them), header mutations, metadata
                      a fault     → the service's failure mode: closed → HTTP 503 and a
                                    JSON-RPC error; open → skip, log
                 ─▶ remember the ids of requests some service wants PHASE_RESPONSE for
    response body ─▶ JSON (whole) or SSE (event by event): each response to a
                    remembered id ─▶ Process ─▶ continue (optionally a new result) or
                    deny (the agent gets the JSON-RPC error instead of the result)

Metadata a service returns is published as Envoy dynamic metadata (namespace
``mcp_extproc``) and passed to later services of the same exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

from extproc.api import Context, Continue, Deny, FailureMode, Stage, StateKey, Verdict
from extproc.errors import PluginError
from extproc.external.wire import from_struct, from_value, to_struct, to_value
from extproc.mcp.codes import POLICY_DENIED
from extproc.mcp.headers import X_MCP_METHOD, X_MCP_TOOL
from extproc.mcp.jsonrpc import Era, McpRequest, Message, error_object, parse_message
from extproc.mcp.spec import INTERNAL_ERROR
from mcp_extproc.stage.v1 import stage_pb2 as pb
from plugins.lib.external_client import ExternalConfig, Service, ServiceFault
from plugins.lib.rewrite import ResponseRewriter, dumps
from plugins.mcp_stage import derived_headers

# Headers a service may not touch: routing, framing and credentials are not theirs.
_PROTECTED: Final = frozenset({"host", "content-length", "authorization", "transfer-encoding", "cookie"})


@dataclass
class _Exchange:
    """Per-exchange state: what later services and the response phase need."""

    metadata: dict[str, str] = field(default_factory=dict)
    watched: dict[Any, tuple[str, str]] = field(default_factory=dict)  # request id → (method, tool)
    response: ResponseRewriter = field(default_factory=ResponseRewriter)


_STATE = StateKey("external", _Exchange)


@dataclass
class _Outcome:
    """The merged answers of the services for one message."""

    raw: dict[str, Any]
    changed: bool = False
    set_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: list[str] = field(default_factory=list)
    deny: Deny | None = None


class ExternalStage(Stage[ExternalConfig]):
    """Call out-of-process stages (any language) over gRPC, at the MCP level."""

    name: ClassVar[str] = "external"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)

    def __init__(self, config: ExternalConfig, failure_mode: FailureMode = FailureMode.CLOSED) -> None:
        super().__init__(config, failure_mode)
        self.services = [Service(service, index) for index, service in enumerate(config.services)]

    @classmethod
    def eras_needing_ext_proc(cls, config: ExternalConfig) -> frozenset[str]:
        # With fastCalls the configuration vouches for every service (checked at startup).
        return frozenset() if config.fast_calls else cls.calls_need_ext_proc

    async def startup(self) -> None:
        opened: list[Service] = []
        for service in self.services:
            try:
                await service.open()
                opened.append(service)
                if self.config.fast_calls and service.wants(pb.PHASE_RESPONSE, "tools/call"):
                    raise PluginError(
                        f"{service.where} asks for tools/call responses, but the external stage is configured "
                        "with fastCalls: true (tools/call takes the fast route, which has no response phase); "
                        "remove fastCalls, or drop tools/call from the service's response methods"
                    )
            except BaseException:
                for done in opened:
                    await done.close()
                raise

    async def shutdown(self) -> None:
        for service in self.services:
            await service.close()

    def needs_response(self, ctx: Context) -> bool | None:
        wanting = [s for s in self.services if pb.PHASE_RESPONSE in (s.description.phases if s.description else ())]
        if not wanting or ctx.http_method in ("GET", "DELETE"):
            return False
        server = ctx.server.name if ctx.server else ""
        if not any(s.applies_to(server) for s in wanting):
            return False
        hints = ctx.hints
        if hints is not None and hints.era is Era.MODERN and hints.method is not None:
            return any(s.applies_to(server) and s.wants(pb.PHASE_RESPONSE, hints.method) for s in wanting)
        return None

    # -- request -----------------------------------------------------------------------------

    async def on_request_body(self, ctx: Context) -> Verdict:
        request, server = ctx.mcp, ctx.server
        if request is None or server is None:
            return None
        services = [s for s in self.services if s.applies_to(server.name)]
        state = ctx.state(_STATE)
        outcomes: list[_Outcome] = []
        for message in request.messages:
            outcome = _Outcome(raw=dict(message.raw))
            outcomes.append(outcome)
            if message.kind == "response":
                continue  # the agent answering the server (sampling, elicitation): not a call
            for service in services:
                if service.wants(pb.PHASE_RESPONSE, message.method) and message.id is not None:
                    state.watched[message.id] = (message.method or "", message.tool_name or "")
                if outcome.deny is None and service.wants(pb.PHASE_REQUEST, message.method):
                    await self._request_one(ctx, service, outcome, request)
        denied = [o for o in outcomes if o.deny is not None]
        if denied:
            return self._refuse(request, outcomes)
        set_headers: dict[str, str] = {}
        remove_headers: list[str] = []
        for outcome in outcomes:
            set_headers.update(outcome.set_headers)
            remove_headers.extend(outcome.remove_headers)
        body = None
        derived: dict[str, Any] = {}
        if any(o.changed for o in outcomes):
            messages = tuple(parse_message(o.raw) or m for o, m in zip(outcomes, request.messages, strict=True))
            rewritten = McpRequest(messages, request.is_batch, request.era, request.protocol_version)
            ctx.mcp = rewritten
            body = rewritten.encode()
            headers, derived = derived_headers(rewritten, server.name)
            set_headers.update(headers)
            remove_headers.extend(h for h in (X_MCP_METHOD, X_MCP_TOOL) if h not in headers)
        if state.watched:
            ctx.want_response_body()
            remove_headers.append("accept-encoding")
        if body is None and not set_headers and not remove_headers and not state.metadata:
            return None
        metadata = {**derived, **state.metadata}
        return Continue(body=body, set_headers=set_headers, remove_headers=tuple(remove_headers), metadata=metadata)

    async def _request_one(self, ctx: Context, service: Service, outcome: _Outcome, request: McpRequest) -> None:
        message = parse_message(outcome.raw)
        assert message is not None
        wire = _wire_message(message, message.method)
        reply = await self._call(ctx, service, pb.PHASE_REQUEST, wire, request)
        if isinstance(reply, Deny):
            outcome.deny = reply
            return
        if reply is None:
            return
        if reply.WhichOneof("verdict") == "deny":
            outcome.deny = _deny_of(reply.deny, service)
            ctx.log.info("external stage %r denied %s", service.name, message.method)
            return
        proceed = getattr(reply, "continue")  # `continue` is a Python keyword
        if reply.WhichOneof("verdict") == "continue" and proceed.HasField("params"):
            outcome.raw["params"] = from_struct(proceed.params)
            outcome.changed = True
        outcome.set_headers.update(_allowed_headers(reply.set_headers))
        outcome.remove_headers.extend(h.lower() for h in reply.remove_headers if h.lower() not in _PROTECTED)

    def _refuse(self, request: McpRequest, outcomes: list[_Outcome]) -> Deny:
        first = next(o.deny for o in outcomes if o.deny is not None)
        assert first is not None
        if not request.is_batch:
            return first
        errors = []
        for outcome, message in zip(outcomes, request.messages, strict=True):
            if message.kind != "request":
                continue
            if outcome.deny is not None:
                errors.append(error_object(message.id, outcome.deny.code, outcome.deny.message, outcome.deny.data))
            else:
                errors.append(
                    error_object(message.id, POLICY_DENIED, "not forwarded: another call in this batch was denied")
                )
        return Deny(
            status=first.status,
            code=first.code,
            message=first.message,
            reason=first.reason,
            body=dumps(errors),
        )

    async def _call(
        self, ctx: Context, service: Service, phase: pb.Phase.ValueType, message: pb.McpMessage, request: McpRequest
    ) -> pb.ProcessResponse | Deny | None:
        """One ``Process`` call; a fault becomes a ``Deny`` (closed) or ``None`` (open)."""
        state = ctx.state(_STATE)
        wire = pb.ProcessRequest(
            phase=phase,
            message=message,
            server=ctx.server.name if ctx.server else "",
            request_id=ctx.request_id,
            era=request.era.value,
            protocol_version=request.protocol_version or "",
            batch=request.is_batch,
            metadata=state.metadata,
        )
        _principal_into(ctx, wire)
        try:
            reply = await service.process(wire)
        except ServiceFault as fault:
            mode = service.failure_mode
            ctx.log.warning(
                "external stage %r at %s %s (failure mode %s)", service.name, service.config.address, fault, mode.value
            )
            if mode is FailureMode.OPEN:
                return None
            what = "request was not forwarded" if phase == pb.PHASE_REQUEST else "result was withheld"
            return Deny(
                status=503,
                code=INTERNAL_ERROR,
                message=f"external stage {service.name!r} {fault}; the {what}",
                reason=f"external_fault:{service.name}",
            )
        state.metadata.update(reply.metadata)
        return reply

    # -- response ----------------------------------------------------------------------------

    async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict:
        state = ctx.state(_STATE)
        if not state.watched or ctx.mcp is None:
            return None
        headers: dict[str, str] = {}
        removed: list[str] = []

        async def one(item: Any) -> Any:
            return await self._response_one(ctx, item, headers, removed)

        body = await state.response.rewrite(ctx, chunk, one, reader="external stages")
        if isinstance(body, Deny):
            return body
        if ctx.response_is_sse:  # header mutations of a streamed response's events are not applied
            return None if body is None else Continue(body=body, metadata=dict(state.metadata))
        if body is None and not headers and not removed:
            return None
        return Continue(body=body, set_headers=headers, remove_headers=tuple(removed), metadata=dict(state.metadata))

    async def _response_one(self, ctx: Context, item: Any, headers: dict[str, str], removed: list[str]) -> Any:
        """``item`` (a response to a watched request) after every service; ``item`` itself if unchanged."""
        state = ctx.state(_STATE)
        message = parse_message(item)
        if message is None or message.kind != "response" or message.id not in state.watched:
            return item
        method, tool = state.watched[message.id]
        assert ctx.mcp is not None and ctx.server is not None
        current: dict[str, Any] = dict(item)
        for service in self.services:
            if not (service.applies_to(ctx.server.name) and service.wants(pb.PHASE_RESPONSE, method)):
                continue
            wire = _wire_message(message, method, current)
            wire.tool = tool
            reply = await self._call(ctx, service, pb.PHASE_RESPONSE, wire, ctx.mcp)
            if isinstance(reply, Deny):
                return error_object(message.id, reply.code, reply.message)
            if reply is None:
                continue
            verdict = reply.WhichOneof("verdict")
            if verdict == "deny":
                deny = _deny_of(reply.deny, service)
                return error_object(message.id, deny.code, deny.message, deny.data)
            if verdict == "continue" and getattr(reply, "continue").HasField("result") and "result" in current:
                current = {**current, "result": from_struct(getattr(reply, "continue").result)}
            headers.update(_allowed_headers(reply.set_headers))
            removed.extend(h.lower() for h in reply.remove_headers if h.lower() not in _PROTECTED)
        return item if current == item else current


def _wire_message(message: Message, method: str | None, raw: dict[str, Any] | None = None) -> pb.McpMessage:
    """The protocol's ``McpMessage`` for a request (or, with ``raw``, the response to one)."""
    wire = pb.McpMessage(method=method or "")
    if message.id is not None:
        wire.id.CopyFrom(to_value(message.id))
    if raw is None:
        if message.tool_name:
            wire.tool = message.tool_name
        if message.arguments is not None:
            wire.arguments.CopyFrom(to_struct(message.arguments))
        if message.params is not None:
            wire.params.CopyFrom(to_struct(message.params))
        return wire
    result, error = raw.get("result"), raw.get("error")
    if isinstance(result, dict):
        wire.result.CopyFrom(to_struct(result))
    if isinstance(error, dict):
        wire.error.code = int(error.get("code", 0)) if isinstance(error.get("code"), int) else 0
        wire.error.message = str(error.get("message", ""))
        if "data" in error:
            wire.error.data.CopyFrom(to_value(error["data"]))
    return wire


def _principal_into(ctx: Context, wire: pb.ProcessRequest) -> None:
    principal = getattr(ctx, "principal", None)
    if principal is None:
        return
    wire.agent = principal.agent or ""
    wire.principal.subject = principal.subject
    wire.principal.issuer = principal.issuer
    wire.principal.scopes.extend(sorted(principal.scopes))
    wire.principal.granted = principal.granted
    wire.principal.consented = principal.consented
    try:
        wire.principal.claims.CopyFrom(to_struct(principal.claims))
    except (ValueError, TypeError) as exc:
        ctx.log.warning("claims not sent to external stages: %s", exc)


def _deny_of(deny: pb.Deny, service: Service) -> Deny:
    message = deny.message or f"denied by external stage {service.name!r}"
    data = from_value(deny.data) if deny.HasField("data") else None
    return Deny(
        status=200, code=deny.code or POLICY_DENIED, message=message, data=data, reason=f"external:{service.name}"
    )


def _allowed_headers(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower() not in _PROTECTED and not k.startswith(":")}
