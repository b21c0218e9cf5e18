"""One request-side decision, whatever carried it: ext_authz over gRPC or over HTTP. No protobufs.

Data flow::

    header lines, method, path, body, server hint, promised era, peer identity
        ──▶ Context ──▶ pipeline: request-headers hooks, then request-body hooks
        ──▶ refuse a rewrite (ext_authz cannot rewrite a body: fail closed), but on a
            virtual server's fast call carry it as a splice header (extproc.core.splice)
        ──▶ refuse a broken route promise (the fast route's one tools/call of an era)
        ──▶ audit line + metrics (+ with tracing on, the exchange's span: extproc.core.traces,
            and the traceparent of that span among the headers to set)
        ──▶ Continue (headers to set/remove, metadata) | Deny

:mod:`extproc.frontdoor.grpc_check` (gRPC ``Check``) and :mod:`extproc.frontdoor.http_check`
(Envoy's HTTP authorization service) turn the outcome into their wire format.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from extproc import tracing
from extproc.api import Context, Continue, Deny, FrontDoor, Phase, Stop
from extproc.config.resources import Catalog
from extproc.core.audit import decision_of, record
from extproc.core.exchange import Mutations, new_context
from extproc.core.pipeline import Pipeline
from extproc.core.splice import splice_of
from extproc.core.traces import begin
from extproc.mcp.codes import POLICY_DENIED
from extproc.mcp.spec import INVALID_REQUEST
from extproc.render.wire import SPLICE_HEADER


async def decide(
    pipeline: Pipeline,
    catalog: Catalog,
    *,
    pairs: tuple[tuple[str, str], ...],
    method: str,
    path: str,
    body: bytes,
    server_hint: str | None,
    promised_era: str | None,
    request_id: str | None = None,
    peer: str | None = None,
    envoy_trace: str | None = None,
) -> tuple[Context, Continue | Stop]:
    """Run the request side of the pipeline once; the outcome is already audited (and traced).

    ``peer``: the verified client certificate's identity Envoy reported (gRPC ``Check``
    only; the HTTP authorization service is told none). ``envoy_trace``: the traceparent of
    Envoy's own span (the gRPC ``Check``'s metadata, when Envoy traces).
    """
    ctx = new_context(
        catalog,
        pairs,
        server_hint=server_hint,
        front_door=FrontDoor.FAST_CALL if promised_era else FrontDoor.CHECK,
        method=method,
        path=path,
        request_id=request_id,
    )
    ctx.request_has_body = bool(body)
    ctx.peer = peer
    pipeline.metrics.phase("check").inc()
    trace = begin(ctx, envoy=envoy_trace, body=body) if tracing.ACTIVE is not None else None
    outcome = await _run(pipeline, ctx, body)
    if isinstance(outcome, Continue) and promised_era and (broken := _broken_promise(ctx, promised_era)):
        outcome = broken
    decision = "allow" if isinstance(outcome, Continue) else decision_of(outcome)
    record(pipeline.metrics, ctx, decision, _reason(outcome))
    if trace is not None:
        trace.decided(decision, _reason(outcome))
        if isinstance(outcome, Continue):
            outcome = trace.forward(outcome)
        else:
            trace.stopped(outcome)
        trace.end()
    return ctx, outcome


def _reason(outcome: Continue | Stop) -> str:
    return "" if isinstance(outcome, Continue) else outcome.reason


async def _run(pipeline: Pipeline, ctx: Context, body: bytes) -> Continue | Stop:
    first = await pipeline.run(Phase.REQUEST_HEADERS, ctx)
    if not isinstance(first, Continue) or not (ctx.request_has_body and pipeline.needs.request_body):
        return first
    ctx.body = body
    second = await pipeline.run(Phase.REQUEST_BODY, ctx)
    if not isinstance(second, Continue):
        return second
    merged = Mutations()
    merged.add(first)
    if ctx.fast_call and ctx.virtual is not None:
        # A virtual server's fast route: Envoy's Lua filter applies the rewrite (the
        # backend's own name) from this header, which also picks the backend route.
        splice = splice_of(body, body if second.body is None else second.body)
        if splice is not None:
            merged.add(replace(second, body=None))
            merged.add(Continue(set_headers={SPLICE_HEADER: splice}))
            return merged.result()
    if second.body is not None:
        why = (
            "the fast tools/call route (one ext_authz Check) cannot; a stage that rewrites calls must "
            "declare calls_need_ext_proc (the external stage: leave fastCalls off)"
            if ctx.fast_call
            else "the ext_authz front door cannot do; send the calls one by one or use ext_proc"
        )
        return Deny(
            status=403,
            code=POLICY_DENIED,
            message=f"this request would have to be rewritten (a stage changed it), which {why}",
            reason="needs_rewrite",
        )
    merged.add(second)
    return merged.result()


def denial_facts(ctx: Context, deny: Stop) -> dict[str, Any]:
    """What was refused (server, decision, method, tool), for access logs and RBAC."""
    facts: dict[str, Any] = {"server": ctx.server.name if ctx.server else None, "decision": decision_of(deny)}
    if ctx.mcp is not None and not ctx.mcp.is_batch and ctx.mcp.messages:
        facts["method"] = ctx.mcp.messages[0].method
        facts["tool"] = ctx.mcp.messages[0].tool_name
    return {k: v for k, v in facts.items() if v is not None}


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
        code=INVALID_REQUEST,
        message=f"Envoy's MCP parser routed this request as one {era}-era tools/call, but it is {seen}; "
        "send one JSON-RPC request per POST, its headers matching its body",
        reason="route_mismatch",
    )
