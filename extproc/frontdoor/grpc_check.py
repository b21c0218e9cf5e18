"""The ext_authz front door: Envoy's ``Authorization.Check`` over the same pipeline.

When only a yes/no is needed, Envoy can call us once per request with
ext_authz instead of ext_proc. One ``Check`` carries the request headers and,
with ``with_request_body``, the body::

    CheckRequest ──▶ Context (headers, path, server from the route's
                     context_extensions, body; peer: ``source.principal``, the
                     client certificate's identity Envoy verified)
                 ──▶ pipeline: request-headers hooks, then request-body hooks
                 ──▶ Continue ──▶ OkHttpResponse (headers to set/remove, metadata)
                     Deny     ──▶ DeniedHttpResponse (status, headers, JSON-RPC error body)

What ext_authz cannot do, and so what this front door refuses or skips:

* no response phases: ``tools/list`` filtering and merged batch errors need
  ext_proc;
* no body rewriting: a request a stage wants to rewrite (a batch with refused
  calls) is refused whole, with a JSON-RPC error saying why (fail closed).

The ``auto`` front door sends only ``tools/call`` here, on routes chosen by
Envoy's own MCP parser (:mod:`extproc.render.fast_routes`); their ``x-mcp-call``
context extension names the era the route promised. A request whose parse
breaks that promise (not one ``tools/call`` of that era) is refused: Envoy's
parser and ours disagreed about it, and a stage may have needed its response.

This module and :mod:`extproc.frontdoor.ext_proc` are the only ones that touch
Envoy's service protobufs.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extproc import tracing
from extproc.api import Continue, Stop
from extproc.config.resources import Catalog
from extproc.core.exchange import answer_of
from extproc.core.pipeline import Pipeline
from extproc.frontdoor.decision import decide, denial_facts
from extproc.frontdoor.ext_proc import header_pairs, jsonable
from extproc.render.wire import CALL_ERA_KEY, SERVER_METADATA_KEY

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


def _traceparent(context: grpc.aio.ServicerContext) -> str | None:
    """The traceparent of Envoy's own span, which Envoy sends along when it traces."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return value if isinstance(value, str) else value.decode()
    return None


def denied(deny: Stop, jsonrpc_id: Any) -> pb.CheckResponse:
    """The ``CheckResponse`` that answers the agent for a denial or a direct answer."""
    body, headers = answer_of(deny, jsonrpc_id)
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
        extensions = request.attributes.context_extensions
        ctx, outcome = await decide(
            self.pipeline,
            self.catalog,
            pairs=(*pairs, (":authority", http.host), (":scheme", http.scheme)),
            method=http.method or "GET",
            path=http.path or "/",
            body=http.raw_body or http.body.encode(),
            server_hint=extensions.get(SERVER_METADATA_KEY),
            promised_era=extensions.get(CALL_ERA_KEY),
            request_id=http.id,
            peer=request.attributes.source.principal or None,
            envoy_trace=_traceparent(context) if tracing.ACTIVE is not None else None,
        )
        if not isinstance(outcome, Continue):
            response = denied(outcome, ctx.jsonrpc_id)
            # What was refused, for access logs and RBAC (Envoy keeps it for denials too).
            response.dynamic_metadata.update(denial_facts(ctx, outcome))
            return response
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
