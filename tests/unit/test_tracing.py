"""The tracing switch: where traces go (``--otel``, ``OTEL_*``), the off path, the helpers' spans.

The spans of an exchange are tests/unit/core/test_traces.py; through real Envoy and a
collector stand-in, tests/integration/test_tracing.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from extproc import tracing
from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.frontdoor.ext_proc import Processor
from plugins.lib.keeper import KeeperMetrics, KeeperSettings, SessionKeeper
from plugins.lib.tokens import TokenEndpoint, TokenError
from tests.messages import body_msg, headers_msg, mutated, post_headers

AGENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# -- where traces go ----------------------------------------------------------------------


def test_off_unless_asked() -> None:
    assert tracing.target(None, {}) is None
    assert tracing.target(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) is None
    assert tracing.target("", {"OTEL_SDK_DISABLED": "true"}) is None


def test_the_flag_or_the_standard_exporter_variable_turns_it_on() -> None:
    assert tracing.target("", {}) == tracing.Target("http/protobuf", "http://localhost:4318/v1/traces")
    assert tracing.target(None, {"OTEL_TRACES_EXPORTER": "otlp"}) == tracing.target("", {})
    assert tracing.target("", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) == tracing.Target(
        "grpc", "http://localhost:4317"
    )


@pytest.mark.parametrize(
    ("flag", "environ", "url"),
    [
        ("http://c.example:4318", {}, "http://c.example:4318/v1/traces"),
        ("c.example:4318/", {}, "http://c.example:4318/v1/traces"),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://c.example"}, "https://c.example/v1/traces"),
        ("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/custom"}, "http://c:9/custom"),
        # The flag wins over the variables.
        ("http://f:1", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:9/custom"}, "http://f:1/v1/traces"),
    ],
)
def test_the_http_endpoint(flag: str, environ: dict[str, str], url: str) -> None:
    found = tracing.target(flag, environ)
    assert found is not None and found.url == url


def test_the_grpc_endpoint_is_host_and_port() -> None:
    found = tracing.target("10.0.0.7:4317", {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"})
    assert found == tracing.Target("grpc", "http://10.0.0.7:4317")
    assert (found.host, found.port, found.secure) == ("10.0.0.7", 4317, False)


@pytest.mark.parametrize(
    ("environ", "name", "ratio"),
    [
        ({"OTEL_SERVICE_NAME": "gw"}, "gw", 1.0),
        ({"OTEL_RESOURCE_ATTRIBUTES": "team=a,service.name=edge"}, "edge", 1.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, "mcp-extproc", 0.25),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, "mcp-extproc", 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, "mcp-extproc", 0.0),
    ],
)
def test_service_name_and_sampling(environ: dict[str, str], name: str, ratio: float) -> None:
    found = tracing.target("", environ)
    assert found is not None and (found.service_name, found.sample_ratio) == (name, ratio)


@pytest.mark.parametrize(
    ("flag", "environ", "message"),
    [
        ("", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "http/protobuf or grpc"),
        ("ftp://c:1", {}, "--otel: expected a collector URL"),
        ("http://c:port", {}, "not a number"),
        ("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
    ],
)
def test_bad_settings_are_one_line(flag: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        tracing.target(flag, environ)


def test_without_the_extra_tracing_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError, match=r"pip install 'mcp-extproc\[otel\]'"):
        tracing.start(tracing.Target("http/protobuf", "http://c/v1/traces"))
    assert tracing.ACTIVE is None


# -- off ----------------------------------------------------------------------------------


def test_off_every_helper_is_a_no_op() -> None:
    assert tracing.ACTIVE is None
    assert tracing.span("x", {"a": 1}) is tracing.NO_SPAN
    assert tracing.root_span("x", None) is tracing.NO_SPAN
    with tracing.span("x") as span:
        span.set_attribute("a", 1)
    headers = {"accept": "*/*"}
    tracing.inject(headers)
    assert headers == {"accept": "*/*"}
    assert tracing.link_here() is None


async def test_off_the_front_door_adds_no_trace_header(catalog: Catalog) -> None:
    proc = Processor(Registry().build_pipeline(DEFAULT_PIPELINE), catalog)
    first = await proc.handle(headers_msg(post_headers(traceparent=AGENT)))
    assert proc.ctx is not None and proc.ctx.book.trace is None
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}}
    second = await proc.handle(body_msg(call))
    await proc.close()
    assert "traceparent" not in mutated(first.request_headers.response)
    assert "traceparent" not in mutated(second.request_body.response)


def test_safe_url_drops_what_can_carry_a_credential() -> None:
    assert (
        tracing.safe_url("https://user:pw@idp.example:8443/token?client_secret=s#x") == "https://idp.example:8443/token"
    )


# -- on: the helpers --------------------------------------------------------------------------


async def test_a_token_fetch_names_the_endpoint_never_the_secret(spans: InMemorySpanExporter) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"error": "invalid_client"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        endpoint = TokenEndpoint(client, lambda lifetime: 0.0)
        with pytest.raises(TokenError):
            await endpoint.request(
                "https://idp.test/token?tenant=t", "gw", "s3cret", {"grant_type": "client_credentials"}
            )
    [fetch] = spans.get_finished_spans()
    assert fetch.name == "token fetch" and fetch.kind is SpanKind.CLIENT
    attributes = dict(fetch.attributes or {})
    assert attributes == {
        "url.full": "https://idp.test/token",
        "mcp_extproc.token.grant": "client_credentials",
        "http.response.status_code": 401,
    }
    assert fetch.context is not None
    assert seen[0].headers["traceparent"].split("-")[2] == f"{fetch.context.span_id:016x}"
    events = " ".join(str(dict(e.attributes or {})) for e in fetch.events)
    assert "s3cret" not in events and "HTTP 401" in events


class _Parked:
    """A clock whose sleeps never end: the keeper holds one GET and never reconnects."""

    def now(self) -> float:
        return 0.0

    async def sleep(self, seconds: float) -> None:
        await asyncio.Event().wait()

    def jitter(self, low: float, high: float) -> float:
        return low


async def test_the_keepers_requests_are_root_spans_linked_to_the_session(spans: InMemorySpanExporter) -> None:
    seen: list[httpx.Request] = []
    answered = asyncio.Event()

    async def ping_then_hold() -> AsyncIterator[bytes]:
        yield b'event: message\ndata: {"jsonrpc": "2.0", "id": 9, "method": "ping"}\n\n'
        await asyncio.get_running_loop().create_future()  # open until the keeper closes it

    async def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            answered.set()
            return httpx.Response(202)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=ping_then_hold())

    settings = KeeperSettings()
    async with httpx.AsyncClient(transport=httpx.MockTransport(upstream)) as client:
        keeper = SessionKeeper(settings, KeeperMetrics(CollectorRegistry()), client, clock=_Parked())
        with tracing.span("the exchange that began it"):
            keeper.keep("srv", "http://up.test/mcp", "upstream-session-id", "2025-11-25", None)
        await asyncio.wait_for(answered.wait(), 5)
        await keeper.close()
    found = {span.name: span for span in spans.get_finished_spans()}
    exchange, stream, answer = found["the exchange that began it"], found["keeper stream"], found["keeper ping answer"]
    assert exchange.context is not None
    for root in (stream, answer):
        assert root.parent is None and root.kind is SpanKind.CLIENT
        assert root.context is not None and root.context.trace_id != exchange.context.trace_id
        assert [link.context.span_id for link in root.links] == [exchange.context.span_id]
        attributes = dict(root.attributes or {})
        assert attributes["mcp_extproc.server.name"] == "srv"
        assert attributes["mcp_extproc.upstream_session.id"] == tracing.session_digest("upstream-session-id")
        assert "upstream-session-id" not in str(attributes)
    get, post = seen[0], next(r for r in seen if r.method == "POST")
    assert stream.context is not None and answer.context is not None
    assert get.headers["traceparent"].split("-")[1:3] == [
        f"{stream.context.trace_id:032x}",
        f"{stream.context.span_id:016x}",
    ]
    assert post.headers["traceparent"].split("-")[2] == f"{answer.context.span_id:016x}"


def test_recorded_spans_replay_under_their_parent(spans: InMemorySpanExporter) -> None:
    pending: list[tracing.Recorded] = []
    with tracing.record("outer", {"a": 1}, parent=pending) as outer:
        with tracing.span("inner", client=True) as inner:
            inner.set_attribute("b", 2)
        outer.set_attribute("c", 3)
    with tracing.span("parent"):
        tracing.replay(pending, otel_context.get_current())
    found = {span.name: span for span in spans.get_finished_spans()}
    assert dict(found["outer"].attributes or {}) == {"a": 1, "c": 3}
    assert dict(found["inner"].attributes or {}) == {"b": 2}
    assert found["inner"].kind is SpanKind.CLIENT
    assert found["inner"].parent is not None and found["outer"].context is not None
    assert found["inner"].parent.span_id == found["outer"].context.span_id
    assert found["outer"].parent is not None and found["parent"].context is not None
    assert found["outer"].parent.span_id == found["parent"].context.span_id
