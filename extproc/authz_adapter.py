"""The ext_authz front door: Envoy's ``Authorization.Check`` over the same pipeline.

When only a yes/no is needed, Envoy can call us once per request with
ext_authz instead of ext_proc. One ``Check`` carries the request headers and,
with ``with_request_body``, the body::

    CheckRequest ──▶ Context (headers, path, server from the route's
                     context_extensions, body)
                 ──▶ pipeline: request-headers hooks, then request-body hooks
                 ──▶ Continue ──▶ OkHttpResponse (headers to set/remove, metadata)
                     Deny     ──▶ DeniedHttpResponse (status, headers, JSON-RPC error body)

What ext_authz cannot do, and so what this front door refuses or skips:

* no response phases: ``tools/list`` filtering and merged batch errors need
  ext_proc;
* no body rewriting: a request a stage wants to rewrite (a batch with refused
  calls) is refused whole, with a JSON-RPC error saying why (fail closed).

The ``auto`` front door sends only ``tools/call`` here, on routes chosen by
Envoy's own MCP parser (:mod:`extproc.fast_calls`); their ``x-mcp-call``
context extension names the era the route promised. A request whose parse
breaks that promise (not one ``tools/call`` of that era) is refused: Envoy's
parser and ours disagreed about it, and a stage may have needed its response.

This module and :mod:`extproc.envoy_adapter` are the only ones that touch
Envoy's service protobufs.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extproc.api import Context, Continue, Deny, Phase
from extproc.audit import decision_of, record
from extproc.envoy_adapter import SERVER_METADATA_KEY, ExchangeLog, denial_answer, first_values, header_pairs, jsonable
from extproc.fast_calls import CALL_ERA_KEY
from extproc.pipeline import Pipeline
from extproc.resources import Catalog

_exchange_logger = logging.getLogger("mcp_extproc.exchange")
_OVERWRITE = core_pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

AUTHZ_SERVICE = "envoy.service.auth.v3.Authorization"


def _header(key: str, value: str) -> core_pb.HeaderValueOption:
    return core_pb.HeaderValueOption(header=core_pb.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def _request_header_pairs(http: Any) -> tuple[tuple[str, str], ...]:
    """Every header line: the raw ``header_map`` (``encode_raw_headers``) or else the joined map."""
    if http.header_map.headers:
        return header_pairs(http.header_map)
    return tuple((k.lower(), v) for k, v in http.headers.items())


def denied(deny: Deny, jsonrpc_id: Any) -> pb.CheckResponse:
    """The ``CheckResponse`` that answers the agent for a denial."""
    body, headers = denial_answer(deny, jsonrpc_id)
    return pb.CheckResponse(
        status=status_pb2.Status(code=code_pb2.PERMISSION_DENIED, message=deny.reason),
        denied_response=pb.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=deny.status),
            headers=[_header(k, v) for k, v in headers.items()],
            body=body.decode("utf-8", "replace"),
        ),
    )


class AuthorizationService(pb_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Envoy's ``Authorization`` service over the request side of the pipeline."""

    def __init__(self, pipeline: Pipeline, catalog: Catalog) -> None:
        self.pipeline = pipeline
        self.catalog = catalog

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        http = request.attributes.request.http
        pairs = _request_header_pairs(http)
        headers = first_values(pairs)
        headers.setdefault(":method", http.method)
        headers.setdefault(":path", http.path)
        headers.setdefault(":authority", http.host)
        headers.setdefault(":scheme", http.scheme)
        request_id = headers.get("x-request-id") or http.id or uuid.uuid4().hex
        catalog = self.catalog
        hint = request.attributes.context_extensions.get(SERVER_METADATA_KEY)
        server = catalog.servers.get(hint) if hint else None
        if server is None:
            server = catalog.server_for_path(http.path)
        ctx = Context(
            request_id=request_id,
            http_method=http.method or headers.get(":method", "GET"),
            path=http.path or headers.get(":path", "/"),
            request_headers=headers,
            request_header_list=pairs,
            server=server,
            catalog=catalog,
            log=ExchangeLog(_exchange_logger, {"request_id": request_id}),
        )
        ctx.sees_responses = False
        promised = request.attributes.context_extensions.get(CALL_ERA_KEY)
        ctx.fast_call = bool(promised)
        body = http.raw_body or http.body.encode()
        ctx.request_has_body = bool(body)
        self.pipeline.metrics.phase("check").inc()
        first = await self.pipeline.run(Phase.REQUEST_HEADERS, ctx)
        if isinstance(first, Deny):
            return self._deny(ctx, first)
        outcome = first
        if ctx.request_has_body and self.pipeline.needs.request_body:
            ctx.body = body
            second = await self.pipeline.run(Phase.REQUEST_BODY, ctx)
            if isinstance(second, Deny):
                return self._deny(ctx, second)
            if second.body is not None:
                why = (
                    "the fast tools/call route (one ext_authz Check) cannot; a stage that rewrites calls must "
                    "declare calls_need_ext_proc (the external stage: leave fastCalls off)"
                    if ctx.fast_call
                    else "the ext_authz front door cannot do; send the calls one by one or use ext_proc"
                )
                return self._deny(
                    ctx,
                    Deny(
                        status=403,
                        code=-32003,
                        message=f"this request would have to be rewritten (a stage changed it), which {why}",
                        reason="needs_rewrite",
                    ),
                )
            outcome = _merge(first, second)
        if promised and (broken := _broken_promise(ctx, promised)):
            return self._deny(ctx, broken)
        record(self.pipeline.metrics, ctx, "allow", "")
        ok = pb.OkHttpResponse(
            headers=[_header(k, v) for k, v in outcome.set_headers.items()],
            headers_to_remove=list(outcome.remove_headers),
        )
        response = pb.CheckResponse(status=status_pb2.Status(code=code_pb2.OK), ok_response=ok)
        if outcome.metadata:
            struct = struct_pb2.Struct()
            struct.update(jsonable(outcome.metadata))
            response.dynamic_metadata.CopyFrom(struct)
        return response

    def _deny(self, ctx: Context, deny: Deny) -> pb.CheckResponse:
        record(self.pipeline.metrics, ctx, decision_of(deny), deny.reason)
        response = denied(deny, ctx.jsonrpc_id)
        # What was refused, for access logs and RBAC (Envoy keeps it for denials too).
        facts = {"server": ctx.server.name if ctx.server else None, "decision": decision_of(deny)}
        if ctx.mcp is not None and not ctx.mcp.is_batch and ctx.mcp.messages:
            facts["method"] = ctx.mcp.messages[0].method
            facts["tool"] = ctx.mcp.messages[0].tool_name
        response.dynamic_metadata.update({k: v for k, v in facts.items() if v is not None})
        return response


def _broken_promise(ctx: Context, era: str) -> Deny | None:
    """A refusal when the request is not the one ``tools/call`` of ``era`` its route promised."""
    request = ctx.mcp
    if (
        request is not None
        and not request.is_batch
        and len(request.messages) == 1
        and request.messages[0].method == "tools/call"
        and request.era.value == era
    ):
        return None
    if request is None:
        seen = "no JSON-RPC request"
    else:
        methods = ", ".join(str(m.method) for m in request.messages)
        seen = f"{'a batch of ' if request.is_batch else ''}{methods} ({request.era.value} era)"
    return Deny(
        status=400,
        code=-32600,
        message=f"Envoy's MCP parser routed this request as one {era}-era tools/call, but it is {seen}; "
        "send one JSON-RPC request per POST, its headers matching its body",
        reason="route_mismatch",
    )


def _merge(first: Continue, second: Continue) -> Continue:
    """The header phase's mutations overlaid by the body phase's (the later word wins)."""
    set_headers = {k: v for k, v in first.set_headers.items() if k not in second.remove_headers}
    set_headers.update(second.set_headers)
    remove = [h for h in first.remove_headers if h not in second.set_headers]
    remove.extend(h for h in second.remove_headers if h not in remove)
    return Continue(
        set_headers=set_headers,
        remove_headers=tuple(remove),
        metadata={**first.metadata, **second.metadata},
    )
