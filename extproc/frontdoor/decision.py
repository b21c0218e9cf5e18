"""One request-side decision, whatever carried it: ext_authz over gRPC or over HTTP. No protobufs.

Data flow::

    header lines, method, path, body, server hint, promised era
        ──▶ Context ──▶ pipeline: request-headers hooks, then request-body hooks
        ──▶ refuse a rewrite (ext_authz cannot rewrite a body: fail closed)
        ──▶ refuse a broken route promise (the fast route's one tools/call of an era)
        ──▶ audit line + metrics
        ──▶ Continue (headers to set/remove, metadata) | Deny

:mod:`extproc.frontdoor.grpc_check` (gRPC ``Check``) and :mod:`extproc.frontdoor.http_check`
(Envoy's HTTP authorization service) turn the outcome into their wire format.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from extproc.api import Context, Continue, Deny, Phase
from extproc.config.resources import Catalog
from extproc.core.audit import decision_of, record
from extproc.core.pipeline import Pipeline
from extproc.frontdoor.ext_proc import ExchangeLog, first_values

_exchange_logger = logging.getLogger("mcp_extproc.exchange")


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
) -> tuple[Context, Continue | Deny]:
    """Run the request side of the pipeline once; the outcome is already audited."""
    headers = first_values(pairs)
    headers.setdefault(":method", method)
    headers.setdefault(":path", path)
    request_id = headers.get("x-request-id") or request_id or uuid.uuid4().hex
    server = catalog.servers.get(server_hint) if server_hint else None
    if server is None:
        server = catalog.server_for_path(path)
    ctx = Context(
        request_id=request_id,
        http_method=method,
        path=path,
        request_headers=headers,
        request_header_list=pairs,
        server=server,
        catalog=catalog,
        log=ExchangeLog(_exchange_logger, {"request_id": request_id}),
    )
    ctx.sees_responses = False
    ctx.fast_call = bool(promised_era)
    ctx.request_has_body = bool(body)
    pipeline.metrics.phase("check").inc()
    outcome = await _run(pipeline, ctx, body)
    if isinstance(outcome, Continue) and promised_era and (broken := _broken_promise(ctx, promised_era)):
        outcome = broken
    record(pipeline.metrics, ctx, "allow" if isinstance(outcome, Continue) else decision_of(outcome), _reason(outcome))
    return ctx, outcome


def _reason(outcome: Continue | Deny) -> str:
    return outcome.reason if isinstance(outcome, Deny) else ""


async def _run(pipeline: Pipeline, ctx: Context, body: bytes) -> Continue | Deny:
    first = await pipeline.run(Phase.REQUEST_HEADERS, ctx)
    if isinstance(first, Deny) or not (ctx.request_has_body and pipeline.needs.request_body):
        return first
    ctx.body = body
    second = await pipeline.run(Phase.REQUEST_BODY, ctx)
    if isinstance(second, Deny):
        return second
    if second.body is not None:
        why = (
            "the fast tools/call route (one ext_authz Check) cannot; a stage that rewrites calls must "
            "declare calls_need_ext_proc (the external stage: leave fastCalls off)"
            if ctx.fast_call
            else "the ext_authz front door cannot do; send the calls one by one or use ext_proc"
        )
        return Deny(
            status=403,
            code=-32003,
            message=f"this request would have to be rewritten (a stage changed it), which {why}",
            reason="needs_rewrite",
        )
    return _merge(first, second)


def denial_facts(ctx: Context, deny: Deny) -> dict[str, Any]:
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
