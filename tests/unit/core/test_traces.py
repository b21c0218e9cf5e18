"""Exchange spans in process: the ext_proc front door and the Check decision, an in-memory exporter.

The same front doors as in production, fed Envoy's messages (``tests.messages``); the SDK's
``InMemorySpanExporter`` stands where the OTLP exporter would be.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from extproc import tracing
from extproc.api import Context, FrontDoor, Principal, Stage, StateKey, Verdict
from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog
from extproc.core.exchange import new_context
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.core.traces import exchange_attributes, meta_carrier, span_name
from extproc.frontdoor.decision import decide
from extproc.frontdoor.ext_proc import Processor
from extproc.mcp.jsonrpc import McpRequest, parse_request
from tests.messages import body_msg, headers_msg, mutated, post_headers

AGENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
AGENT_SPAN = "b7ad6b7169203331"
AGENT = f"00-{AGENT_TRACE}-{AGENT_SPAN}-01"
META_TRACE = "11111111111111111111111111111111"
META = f"00-{META_TRACE}-2222222222222222-01"
ENVOY_SAME = f"00-{AGENT_TRACE}-3333333333333333-01"
ENVOY_OTHER = "00-44444444444444444444444444444444-5555555555555555-01"
TOKEN = "agent-bearer-token-never-in-a-span"


def call(tool: str, id_: int = 7, meta: dict[str, str] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": tool, "arguments": {"text": "hi"}}
    if meta is not None:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": params}


def processor(catalog: Catalog, envoy: str | None = None) -> Processor:
    return Processor(Registry().build_pipeline(DEFAULT_PIPELINE), catalog, envoy_trace=envoy)


async def exchange(proc: Processor, headers: dict[str, str], body: Any) -> tuple[Any, Any]:
    first = await proc.handle(headers_msg(headers))
    second = await proc.handle(body_msg(body))
    await proc.close()
    return first, second


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {span.name: span for span in exporter.get_finished_spans()}


def hex_of(span: ReadableSpan) -> tuple[str, str, str | None]:
    assert span.context is not None
    parent = f"{span.parent.span_id:016x}" if span.parent is not None else None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}", parent


async def test_the_exchange_span_continues_the_agents_traceparent(
    catalog: Catalog, spans: InMemorySpanExporter
) -> None:
    headers = post_headers(traceparent=AGENT, authorization=f"Bearer {TOKEN}")
    first, second = await exchange(processor(catalog), headers, call("echo"))
    found = by_name(spans)
    ours = found["tools/call echo"]
    trace_id, span_id, parent = hex_of(ours)
    assert (trace_id, parent) == (AGENT_TRACE, AGENT_SPAN)
    assert ours.kind is SpanKind.SERVER
    assert dict(ours.attributes or {}) == {
        "network.transport": "tcp",
        "network.protocol.name": "http",
        "http.request.method": "POST",
        "mcp_extproc.front_door": "ext_proc",
        "mcp.method.name": "tools/call",
        "gen_ai.operation.name": "execute_tool",
        "gen_ai.tool.name": "echo",
        "jsonrpc.request.id": "7",
        "mcp_extproc.server.name": "demo",
        "enduser.id": "anonymous",
        "mcp_extproc.decision": "allow",
    }
    # Every stage hook is a child of the exchange's span.
    hooks = [s for s in spans.get_finished_spans() if s.name.endswith(("request_headers", "request_body"))]
    assert {s.name for s in hooks} >= {"authn request_headers", "mcp request_body", "allowlist request_body"}
    assert {hex_of(s)[2] for s in hooks} == {span_id}
    # Forwarded at the first phase: the upstream's parent is our span.
    assert mutated(first.request_headers.response)["traceparent"] == f"00-{AGENT_TRACE}-{span_id}-01"
    assert "traceparent" not in mutated(second.request_body.response)


async def test_context_only_in_meta_is_taken_from_the_body(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    first, second = await exchange(processor(catalog), post_headers(), call("echo", meta={"traceparent": META}))
    found = by_name(spans)
    trace_id, span_id, parent = hex_of(found["tools/call echo"])
    assert (trace_id, parent) == (META_TRACE, "2222222222222222")
    # The request headers went out before the parent was known: the traceparent goes with the body.
    assert "traceparent" not in mutated(first.request_headers.response)
    assert mutated(second.request_body.response)["traceparent"].startswith(f"00-{META_TRACE}-{span_id}-")
    # The request-headers hooks were recorded then, and replayed under the span with their times.
    authn = found["authn request_headers"]
    assert hex_of(authn)[0] == META_TRACE and hex_of(authn)[2] == span_id
    assert authn.start_time is not None and found["tools/call echo"].start_time is not None
    assert found["tools/call echo"].start_time <= authn.start_time


async def test_envoys_span_in_the_agents_trace_is_the_parent(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    await exchange(processor(catalog, ENVOY_SAME), post_headers(traceparent=AGENT), call("echo"))
    ours = by_name(spans)["tools/call echo"]
    assert hex_of(ours)[0::2] == (AGENT_TRACE, "3333333333333333")
    assert not ours.links


async def test_envoys_span_in_another_trace_is_a_link(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    await exchange(processor(catalog, ENVOY_OTHER), post_headers(), call("echo", meta={"traceparent": META}))
    ours = by_name(spans)["tools/call echo"]
    assert hex_of(ours)[0] == META_TRACE
    [link] = ours.links
    assert f"{link.context.trace_id:032x}" == "44444444444444444444444444444444"


async def test_a_denied_call_has_its_decision_reason_and_code(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    await exchange(processor(catalog), post_headers(traceparent=AGENT), call("add_secret"))
    found = by_name(spans)
    ours = found["tools/call add_secret"]
    attributes = dict(ours.attributes or {})
    assert attributes["mcp_extproc.decision"] == "deny"
    assert attributes["mcp_extproc.reason"] == "tool_not_allowed"
    assert attributes["rpc.response.status_code"] == attributes["error.type"] == "-32003"
    assert attributes["http.response.status_code"] == 200
    assert ours.status.status_code is StatusCode.ERROR
    assert "add_secret" in (ours.status.description or "")
    refusing = dict(found["allowlist request_body"].attributes or {})
    assert refusing["mcp_extproc.verdict"] == "deny"


async def test_a_callers_mistake_is_not_an_error(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    await exchange(processor(catalog), post_headers(traceparent=AGENT), b'{"jsonrpc": "2.0", "id": 1,')
    [ours] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert dict(ours.attributes or {})["rpc.response.status_code"] == "-32700"
    assert ours.status.status_code is StatusCode.UNSET


async def test_a_check_is_one_span_and_forwards_the_traceparent(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    pairs = tuple(post_headers(traceparent=AGENT).items())
    body = json.dumps(call("echo", meta={"traceparent": META})).encode()
    pipeline = Registry().build_pipeline(DEFAULT_PIPELINE)
    _, outcome = await decide(
        pipeline, catalog, pairs=pairs, method="POST", path="/demo/mcp", body=body, server_hint=None, promised_era=None
    )
    ours = by_name(spans)["tools/call echo"]
    trace_id, span_id, parent = hex_of(ours)
    assert (trace_id, parent) == (AGENT_TRACE, AGENT_SPAN)  # the header wins over _meta
    assert dict(ours.attributes or {})["mcp_extproc.front_door"] == "check"
    assert outcome.set_headers["traceparent"] == f"00-{AGENT_TRACE}-{span_id}-01"  # type: ignore[union-attr]


async def test_the_http_checks_traceparent_from_envoy_yields_to_meta(
    catalog: Catalog, spans: InMemorySpanExporter
) -> None:
    # Envoy's HTTP authorization request carries Envoy's span in place of the agent's header.
    pairs = tuple(post_headers(traceparent=ENVOY_OTHER).items())
    body = json.dumps(call("echo", meta={"traceparent": META})).encode()
    pipeline = Registry().build_pipeline(DEFAULT_PIPELINE)
    await decide(
        pipeline,
        catalog,
        pairs=pairs,
        method="POST",
        path="/demo/mcp",
        body=body,
        server_hint=None,
        promised_era=None,
        envoy_trace=ENVOY_OTHER,
    )
    ours = by_name(spans)["tools/call echo"]
    assert hex_of(ours)[0] == META_TRACE
    assert [f"{link.context.span_id:016x}" for link in ours.links] == ["5555555555555555"]


class _Seen(dict[str, str]):
    """What the helper's ``inject`` put in its headers."""


_SEEN = StateKey("seen", _Seen)


class _Inner(Stage[Any]):
    """Opens a span of its own in a hook, as the token, JWKS, Rego and external helpers do."""

    name: ClassVar[str] = "inner"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        with tracing.span("inner work", {"k": "v"}, client=True) as span:
            span.set_attribute("done", True)
            headers: dict[str, str] = {}
            tracing.inject(headers)
            ctx.state(_SEEN).update(headers)
        return None


@pytest.mark.parametrize("header", [True, False])
async def test_a_helpers_span_nests_under_its_hook(catalog: Catalog, spans: InMemorySpanExporter, header: bool) -> None:
    pipeline = Pipeline([_Inner(_Inner.Config())])
    proc = Processor(pipeline, catalog)
    headers = post_headers(traceparent=AGENT) if header else post_headers()
    await proc.handle(headers_msg(headers))
    assert proc.ctx is not None
    slot: _Seen = proc.ctx.state(_SEEN)
    seen = dict(slot)
    await proc.handle(body_msg(call("echo", meta={"traceparent": META})))
    await proc.close()
    found = by_name(spans)
    inner, hook = found["inner work"], found["inner request_headers"]
    assert hex_of(inner)[2] == hex_of(hook)[1]
    assert dict(inner.attributes or {}) == {"k": "v", "done": True}
    assert inner.kind is SpanKind.CLIENT
    if header:
        assert seen["traceparent"] == f"00-{AGENT_TRACE}-{hex_of(inner)[1]}-01"
    else:  # recorded before the parent was known (then replayed): nothing to propagate yet
        assert seen == {}
        assert hex_of(inner)[0] == META_TRACE


async def test_no_attribute_carries_a_token_or_a_session_id(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    headers = post_headers(traceparent=AGENT, authorization=f"Bearer {TOKEN}", **{"mcp-session-id": "sess-raw-id"})
    await exchange(processor(catalog), headers, call("echo"))
    for span in spans.get_finished_spans():
        text = json.dumps(dict(span.attributes or {})) + span.name + (span.status.description or "")
        assert TOKEN not in text and "sess-raw-id" not in text


def _ctx(catalog: Catalog, body: Any, **headers: str) -> Context:
    pairs = tuple(post_headers(**headers).items())
    ctx = new_context(catalog, pairs, server_hint=None, front_door=FrontDoor.EXT_PROC)
    parsed = parse_request(json.dumps(body).encode(), ctx.request_headers)
    assert isinstance(parsed, McpRequest)
    ctx.mcp = parsed
    return ctx


def test_attributes_of_a_resource_read_and_a_session(catalog: Catalog) -> None:
    body = {"jsonrpc": "2.0", "id": "a", "method": "resources/read", "params": {"uri": "https://u:p@h.example/x?k=s#f"}}
    ctx = _ctx(catalog, body, **{"mcp-session-id": "abc", "mcp-protocol-version": "2025-11-25"})
    ctx.principal = Principal(subject="alice", issuer="https://issuer.test", agent="agent", token=TOKEN)
    attributes = exchange_attributes(ctx)
    assert attributes["mcp.resource.uri"] == "https://h.example/x"
    assert attributes["mcp.session.id"] == tracing.session_digest("abc") != "abc"
    assert attributes["mcp.protocol.version"] == "2025-11-25"
    assert (attributes["enduser.id"], attributes["mcp_extproc.agent"]) == ("alice", "agent")
    assert attributes["jsonrpc.request.id"] == "a"
    assert span_name(ctx) == "resources/read"
    assert TOKEN not in json.dumps(attributes)


def test_a_batch_is_named_by_its_first_request(catalog: Catalog) -> None:
    body = [
        {"jsonrpc": "2.0", "id": 1, "method": "prompts/get", "params": {"name": "greet"}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
    ]
    ctx = _ctx(catalog, body, **{"mcp-protocol-version": "2025-03-26"})
    attributes = exchange_attributes(ctx)
    assert span_name(ctx) == "prompts/get greet"
    assert attributes["gen_ai.prompt.name"] == "greet"
    assert attributes["mcp_extproc.batch.size"] == 2


def test_a_get_stream_is_named_by_its_http_method(catalog: Catalog) -> None:
    pairs = (("x-request-id", "r"),)
    ctx = new_context(catalog, pairs, server_hint="demo", front_door=FrontDoor.EXT_PROC, method="GET", path="/demo/mcp")
    assert span_name(ctx) == "GET"
    assert "mcp.method.name" not in exchange_attributes(ctx)


BOTH = {"traceparent": "tp", "tracestate": "ts"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"params": {"_meta": {"traceparent": "tp", "tracestate": "ts"}}}',
            {"traceparent": "tp", "tracestate": "ts"},
        ),
        (b'[{"params": {"_meta": {"traceparent": "tp"}}}, {}]', {"traceparent": "tp"}),
        (b'{"params": {"_meta": {"tracestate": "ts"}}}', None),
        (b'{"params": {"arguments": {"traceparent": "not meta"}}}', None),
        (b'{"params": {"_meta": {"traceparent": 7}}}', None),
        (b"not json, says traceparent", None),
        (b'{"params": {}}', None),
    ],
)
def test_meta_carrier(body: bytes, expected: dict[str, str] | None) -> None:
    assert meta_carrier(body) == expected


async def test_a_trace_the_sampler_dropped_costs_no_hook_spans(catalog: Catalog, spans: InMemorySpanExporter) -> None:
    unsampled = AGENT[:-2] + "00"
    first, _ = await exchange(processor(catalog), post_headers(traceparent=unsampled), call("echo"))
    assert spans.get_finished_spans() == ()
    # The context still goes upstream, unsampled, so the MCP server does not sample it either.
    forwarded = mutated(first.request_headers.response)["traceparent"]
    assert forwarded.startswith(f"00-{AGENT_TRACE}-") and forwarded.endswith("-00")
