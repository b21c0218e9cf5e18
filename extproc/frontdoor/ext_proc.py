"""The only module that touches Envoy's ext_proc protobufs.

One :class:`Processor` per ext_proc gRPC stream (= one HTTP exchange). It turns
each ``ProcessingRequest`` into a :class:`~extproc.api.Context` update plus one
pipeline phase, and the pipeline's outcome into the matching
``ProcessingResponse``::

    ProcessingRequest.request_headers ─▶ new Context (ctx.peer: the SPIFFE ID in the
        request's ``attributes``, when the filter asks Envoy for it; with tracing on, its
        span: extproc.core.traces) ─▶ run(REQUEST_HEADERS)
        ─▶ HeadersResponse (+ mode_override: skip the response when no stage
           will read it) | ImmediateResponse (deny)
    ProcessingRequest.request_body    ─▶ ctx.body     ─▶ run(REQUEST_BODY)
        ─▶ BodyResponse (header/body mutations, route cache cleared when headers
           change) | ImmediateResponse
    ProcessingRequest.response_headers ─▶ ctx.response_* ─▶ run(RESPONSE_HEADERS)
        ─▶ HeadersResponse (+ mode_override: response body STREAMED for SSE,
           BUFFERED otherwise, NONE when nobody asked for it)
    ProcessingRequest.response_body   ─▶ chunk        ─▶ run(RESPONSE_BODY)
        ─▶ BodyResponse (chunk replaced) | ImmediateResponse
    response phase first (no request headers: Envoy's own local reply, e.g. a
    malformed path or a refused upgrade) ─▶ plain HeadersResponse / BodyResponse /
        TrailersResponse: the reply goes out with its own status, untouched

A denial is always an ``ImmediateResponse`` with a JSON-RPC error body, never
an aborted gRPC stream: Envoy treats a failed stream per
``failure_mode_allow`` and a closed one as "carry on".
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extproc import tracing
from extproc.api import Context, Continue, Deny, FrontDoor, Phase, Stop
from extproc.config.resources import Catalog
from extproc.core.audit import decision_of, record
from extproc.core.exchange import answer_of, first_values, new_context
from extproc.core.pipeline import Pipeline
from extproc.core.traces import begin
from extproc.mcp.headers import CONTENT_LENGTH
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.render.wire import EXT_PROC_FILTER, METADATA_NAMESPACE, PEER_ATTRIBUTE

_Mode = mode_pb.ProcessingMode
_OVERWRITE = core_pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def header_pairs(header_map: core_pb.HeaderMap) -> tuple[tuple[str, str], ...]:
    """Every header line of an Envoy ``HeaderMap``, in order, with lower-case names."""
    return tuple(
        (h.key.lower(), h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value) for h in header_map.headers
    )


def peer_of(request: pb.ProcessingRequest) -> str | None:
    """The verified client certificate's URI SAN Envoy attached to ``request`` (:data:`PEER_ATTRIBUTE`), if any."""
    if EXT_PROC_FILTER not in request.attributes:
        return None
    field = request.attributes[EXT_PROC_FILTER].fields.get(PEER_ATTRIBUTE)
    if field is None or field.WhichOneof("kind") != "string_value":
        return None
    return field.string_value or None


def _mutation(set_headers: Mapping[str, str], remove: Iterable[str]) -> pb.HeaderMutation:
    return pb.HeaderMutation(
        set_headers=[
            core_pb.HeaderValueOption(
                header=core_pb.HeaderValue(key=key, raw_value=value.encode()), append_action=_OVERWRITE
            )
            for key, value in set_headers.items()
        ],
        remove_headers=list(remove),
    )


def immediate(deny: Stop, jsonrpc_id: Any) -> pb.ProcessingResponse:
    """The ``ImmediateResponse`` that answers the agent for a denial or a direct answer."""
    body, headers = answer_of(deny, jsonrpc_id)
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=deny.status),
            headers=_mutation(headers, ()),
            body=body,
            details=f"mcp_extproc_{deny.reason}".replace(" ", "_")[:120],
        )
    )


class Processor:
    """Drives one exchange through the pipeline; create one per ext_proc stream."""

    def __init__(
        self, pipeline: Pipeline, catalog: Catalog, server_hint: str | None = None, envoy_trace: str | None = None
    ) -> None:
        self.pipeline = pipeline
        self.catalog = catalog
        self.server_hint = server_hint
        self.envoy_trace = envoy_trace
        self.ctx: Context | None = None
        self.metadata: dict[str, Any] = {}
        self._response_buffered = False
        self._decided = False

    async def handle(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """Answer one ``ProcessingRequest``."""
        which = request.WhichOneof("request")
        self.pipeline.metrics.phase(which or "unknown").inc()
        if which == "request_headers":
            return await self._request_headers(request.request_headers, peer_of(request))
        ctx = self.ctx
        if ctx is None:
            if which in _RESPONSE_PHASES:
                # Envoy answered on its own before the request reached this filter (a
                # malformed path, a refused upgrade, ...): the stream starts with the
                # local reply's response. Nothing was forwarded and no stage has a
                # request to judge, so the reply goes out as Envoy wrote it.
                return _pass_through(which)
            # A request body or trailers before the request headers: refuse rather than
            # guess (fail closed).
            deny = Deny(code=INTERNAL_ERROR, message="mcp-extproc: phase without request headers", reason="protocol")
            return immediate(deny, None)
        if which == "request_body":
            return await self._request_body(ctx, request.request_body)
        if which == "response_headers":
            return await self._response_headers(ctx, request.response_headers)
        if which == "response_body":
            return await self._response_body(ctx, request.response_body)
        if which == "request_trailers":
            return pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
        return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    async def close(self) -> None:
        """The ext_proc stream ended (normally or reset): let the stages know once."""
        ctx, self.ctx = self.ctx, None
        if ctx is not None:
            await self.pipeline.end(ctx)
            if ctx.book.trace is not None:
                ctx.book.trace.end()

    # -- request ---------------------------------------------------------------------------

    async def _request_headers(self, message: pb.HttpHeaders, peer: str | None) -> pb.ProcessingResponse:
        ctx = new_context(
            self.catalog, header_pairs(message.headers), server_hint=self.server_hint, front_door=FrontDoor.EXT_PROC
        )
        ctx.peer = peer
        ctx.request_has_body = not message.end_of_stream
        self.ctx = ctx
        if tracing.ACTIVE is not None:
            begin(ctx, envoy=self.envoy_trace)
        outcome = await self.pipeline.run(Phase.REQUEST_HEADERS, ctx)
        if not isinstance(outcome, Continue):
            return self._deny(ctx, outcome)
        if ctx.book.trace is not None:
            outcome = ctx.book.trace.forward(outcome)
        if not ctx.request_has_body:
            self._decide(ctx, "allow", "")
        common = self._common(outcome)
        if outcome.set_headers:
            # Routes may match on headers a stage sets (x-mcp-stream: the stream service): re-route.
            common.clear_route_cache = True
        response = pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))
        self._attach_metadata(response, outcome)
        if self.pipeline.needs.response and not self.pipeline.needs_response(ctx):
            response.mode_override.CopyFrom(
                _Mode(
                    request_body_mode=_Mode.BUFFERED if self.pipeline.needs.request_body else _Mode.NONE,
                    response_header_mode=_Mode.SKIP,
                    response_body_mode=_Mode.NONE,
                )
            )
        return response

    async def _request_body(self, ctx: Context, message: pb.HttpBody) -> pb.ProcessingResponse:
        ctx.body = message.body
        if ctx.book.trace is not None:
            ctx.book.trace.body(ctx.body)
        outcome = await self.pipeline.run(Phase.REQUEST_BODY, ctx)
        if not isinstance(outcome, Continue):
            return self._deny(ctx, outcome)
        if ctx.book.trace is not None:
            outcome = ctx.book.trace.forward(outcome)
        self._decide(ctx, "allow", "")
        common = self._common(outcome, buffered=True)
        if outcome.set_headers:
            # Routes may match on the headers we derive (x-mcp-tool, ...): re-route.
            common.clear_route_cache = True
        response = pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))
        self._attach_metadata(response, outcome)
        return response

    # -- response --------------------------------------------------------------------------

    async def _response_headers(self, ctx: Context, message: pb.HttpHeaders) -> pb.ProcessingResponse:
        headers = first_values(header_pairs(message.headers))
        ctx.response_headers = headers
        try:
            ctx.response_status = int(headers.get(":status", "0"))
        except ValueError:
            ctx.response_status = 0
        # An SSE stream of unknown length is streamed chunk by chunk; anything with a
        # Content-Length (JSON, or an SSE reply the server finished at once) is bounded
        # and arrives whole, so its length can be fixed after a rewrite.
        ctx.book.response_streamed = ctx.response_is_sse and CONTENT_LENGTH not in headers
        ctx.end_of_stream = message.end_of_stream
        outcome = await self.pipeline.run(Phase.RESPONSE_HEADERS, ctx)
        if not isinstance(outcome, Continue):
            return self._deny(ctx, outcome)
        common = self._common(outcome)
        response = pb.ProcessingResponse(response_headers=pb.HeadersResponse(response=common))
        if ctx.book.wants_response_body and not message.end_of_stream and self.pipeline.needs.response_body:
            if ctx.book.response_streamed:
                body_mode = _Mode.STREAMED
            else:
                body_mode = _Mode.BUFFERED
                self._response_buffered = True
            response.mode_override.CopyFrom(_Mode(response_header_mode=_Mode.SEND, response_body_mode=body_mode))
        self._attach_metadata(response, outcome)
        return response

    async def _response_body(self, ctx: Context, message: pb.HttpBody) -> pb.ProcessingResponse:
        ctx.end_of_stream = message.end_of_stream
        outcome = await self.pipeline.run(Phase.RESPONSE_BODY, ctx, message.body)
        if not isinstance(outcome, Continue):
            return self._deny(ctx, outcome)
        common = self._common(outcome, buffered=self._response_buffered)
        response = pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
        self._attach_metadata(response, outcome)
        return response

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _common(outcome: Continue, *, buffered: bool = False) -> pb.CommonResponse:
        """Header and body mutations; a replaced *buffered* body also gets its new Content-Length."""
        common = pb.CommonResponse()
        set_headers = dict(outcome.set_headers)
        if outcome.body is not None:
            common.body_mutation.body = outcome.body
            if buffered:
                set_headers[CONTENT_LENGTH] = str(len(outcome.body))
        if set_headers or outcome.remove_headers:
            common.header_mutation.CopyFrom(_mutation(set_headers, outcome.remove_headers))
        return common

    def _attach_metadata(self, response: pb.ProcessingResponse, outcome: Continue) -> None:
        if not outcome.metadata:
            return
        self.metadata.update(outcome.metadata)
        struct = struct_pb2.Struct()
        struct.update({METADATA_NAMESPACE: jsonable(self.metadata)})
        response.dynamic_metadata.CopyFrom(struct)

    def _deny(self, ctx: Context, deny: Stop) -> pb.ProcessingResponse:
        self._decide(ctx, decision_of(deny), deny.reason)
        if ctx.book.trace is not None:
            ctx.book.trace.stopped(deny)
        return immediate(deny, ctx.jsonrpc_id)

    def _decide(self, ctx: Context, decision: str, reason: str) -> None:
        """Record the request-side decision once (audit line and metrics)."""
        if self._decided:
            return
        self._decided = True
        record(self.pipeline.metrics, ctx, decision, reason)
        if ctx.book.trace is not None:
            ctx.book.trace.decided(decision, reason)


_RESPONSE_PHASES = frozenset({"response_headers", "response_body", "response_trailers"})


def _pass_through(which: str) -> pb.ProcessingResponse:
    """The plain "carry on" answer for a response phase: nothing changed."""
    if which == "response_headers":
        return pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    if which == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    return pb.ProcessingResponse(response_trailers=pb.TrailersResponse())


_PLAIN = (str, bool, int, float, type(None))


def jsonable(value: Any) -> Any:
    """Metadata values as JSON types (Struct accepts only those)."""
    if isinstance(value, dict) and all(isinstance(v, _PLAIN) for v in value.values()):
        return value  # the usual case (server, method, tool, era, ...): nothing to convert
    return json.loads(json.dumps(value, default=str))
