"""The ``external`` stage against real gRPC stage servers (``extproc.external.kit``) on unix sockets.

Envoy is not involved here (tests/integration/test_external_stages.py covers the data path);
these tests pin the protocol mapping: what a service receives, and what its answers do.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from extproc.api import Context, Continue, Deny, Principal
from extproc.config.pipeline_file import StageSpec
from extproc.config.resources import Catalog
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.errors import ConfigError, PluginError
from extproc.external.kit import Forward, Refuse, Reply, Request, StageService, start
from extproc.external.wire import from_struct, to_struct, validate_description
from extproc.mcp.jsonrpc import McpRequest, parse_request
from mcp_extproc.stage.v1 import stage_pb2 as pb
from plugins.external import ExternalStage

Starter = Callable[..., Any]


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[Starter]:
    started: list[grpc.aio.Server] = []

    async def serve(service: StageService, name: str = "s") -> str:
        server, address = await start(service, f"unix:{tmp_path}/{name}.sock")
        started.append(server)
        return address

    yield serve
    for server in started:
        await server.stop(None)


async def external(*services: dict[str, Any]) -> ExternalStage:
    stage = Registry().build(StageSpec(name="external", config={"services": list(services)}))
    assert isinstance(stage, ExternalStage)
    await stage.startup()
    return stage


def request_ctx(catalog: Catalog, body: Any, principal: Principal | None = None) -> Context:
    raw = json.dumps(body).encode()
    ctx = Context(request_id="rid-1", http_method="POST", path="/demo/mcp", request_headers={})
    ctx.server, ctx.catalog, ctx.body = catalog.servers["demo"], catalog, raw
    parsed = parse_request(raw, {})
    assert isinstance(parsed, McpRequest)
    ctx.mcp = parsed
    ctx.principal = principal
    return ctx


def tools_call(tool: str, arguments: dict[str, Any], id: int | str = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


async def test_params_metadata_and_principal_reach_the_services_in_order(servers: Starter, catalog: Catalog) -> None:
    seen: list[Request] = []

    async def first(request: Request) -> Reply:
        return Forward(params={"name": "echo", "arguments": {"text": "rewritten", "n": 3}}, metadata={"k": "v"})

    async def second(request: Request) -> Reply:
        seen.append(request)
        return Forward(set_headers={"x-second": "yes", "authorization": "not allowed"})

    a = await servers(StageService("first", first, methods=["tools/*"]), "a")
    b = await servers(StageService("second", second), "b")
    stage = await external({"address": a}, {"address": b})
    principal = Principal(subject="alice", issuer="https://idp", agent="bot", claims={"team": "x"}, token="SECRET")
    ctx = request_ctx(catalog, tools_call("echo", {"text": "original"}), principal)
    verdict = await stage.on_request_body(ctx)
    await stage.shutdown()
    [got] = seen
    assert (got.tool, got.arguments, got.metadata) == ("echo", {"text": "rewritten", "n": 3}, {"k": "v"})
    assert (got.server, got.agent, got.request_id, got.era) == ("demo", "bot", "rid-1", "legacy")
    assert got.caller is not None and (got.caller.subject, got.caller.claims) == ("alice", {"team": "x"})
    assert "SECRET" not in repr(got)
    assert isinstance(verdict, Continue) and verdict.body is not None
    assert json.loads(verdict.body)["params"]["arguments"] == {"text": "rewritten", "n": 3}  # ints stay ints
    assert verdict.set_headers["x-second"] == "yes"
    assert "authorization" not in verdict.set_headers
    assert verdict.metadata["k"] == "v"


async def test_only_declared_methods_are_sent(servers: Starter, catalog: Catalog) -> None:
    calls: list[str] = []

    async def record(request: Request) -> Reply:
        calls.append(request.method)
        return None

    stage = await external({"address": await servers(StageService("rec", record, methods=["tools/call"]))})
    await stage.on_request_body(request_ctx(catalog, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
    await stage.on_request_body(request_ctx(catalog, tools_call("echo", {})))
    await stage.shutdown()
    assert calls == ["tools/call"]
    assert stage.needs_response(request_ctx(catalog, tools_call("echo", {}))) is False  # no response phase asked


async def test_a_deny_in_a_batch_refuses_the_whole_batch(servers: Starter, catalog: Catalog) -> None:
    async def deny_add(request: Request) -> Reply:
        return Refuse("no adding", code=-32050) if request.tool == "add" else None

    stage = await external({"address": await servers(StageService("no-add", deny_add))})
    batch = [tools_call("echo", {"text": "x"}, 1), tools_call("add", {"a": 1}, 2)]
    verdict = await stage.on_request_body(request_ctx(catalog, batch))
    await stage.shutdown()
    assert isinstance(verdict, Deny) and verdict.body is not None
    assert json.loads(verdict.body) == [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "error": {"code": -32003, "message": "not forwarded: another call in this batch was denied"},
        },
        {"jsonrpc": "2.0", "id": 2, "error": {"code": -32050, "message": "no adding"}},
    ]


async def test_response_phase_replaces_a_result_or_an_error(servers: Starter, catalog: Catalog) -> None:
    async def on_response(request: Request) -> Reply:
        assert request.phase == "response"
        if request.tool == "add":
            return Refuse("result withheld")
        return Forward(result={"content": [], "structuredContent": {"result": "replaced"}})

    address = await servers(StageService("resp", on_response, phases=["response"]))
    stage = await external({"address": address})
    ctx = request_ctx(catalog, [tools_call("echo", {}, 1), tools_call("add", {}, 2)])
    verdict = await stage.on_request_body(ctx)
    assert isinstance(verdict, Continue) and "accept-encoding" in verdict.remove_headers
    assert ctx.book.wants_response_body
    ctx.response_headers = {"content-type": "application/json"}
    upstream = [{"jsonrpc": "2.0", "id": 1, "result": {"content": []}}, {"jsonrpc": "2.0", "id": 2, "result": {}}]
    out = await stage.on_response_body(ctx, json.dumps(upstream).encode())
    await stage.shutdown()
    assert isinstance(out, Continue) and out.body is not None
    assert json.loads(out.body) == [
        {"jsonrpc": "2.0", "id": 1, "result": {"content": [], "structuredContent": {"result": "replaced"}}},
        {"jsonrpc": "2.0", "id": 2, "error": {"code": -32003, "message": "result withheld"}},
    ]


async def test_a_failing_handler_is_a_fault_closed_by_default(servers: Starter, catalog: Catalog) -> None:
    async def broken(request: Request) -> Reply:
        raise RuntimeError("bug")

    stage = await external({"address": await servers(StageService("broken", broken))})
    verdict = await stage.on_request_body(request_ctx(catalog, tools_call("echo", {})))
    await stage.shutdown()
    assert isinstance(verdict, Deny)
    assert (verdict.status, verdict.code) == (503, -32603)
    assert verdict.message == (
        "external stage 'broken' failed: INTERNAL: stage 'broken' failed: RuntimeError; the request was not forwarded"
    )


async def test_a_service_asking_for_open_fails_open(servers: Starter, catalog: Catalog) -> None:
    async def broken(request: Request) -> Reply:
        raise RuntimeError("bug")

    stage = await external({"address": await servers(StageService("lenient", broken, failure_mode="open"))})
    assert await stage.on_request_body(request_ctx(catalog, tools_call("echo", {}))) is None
    await stage.shutdown()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (pb.DescribeResponse(name="", phases=[pb.PHASE_REQUEST]), "name=''; expected 1-63 characters"),
        (pb.DescribeResponse(name="x", phases=[pb.PHASE_UNSPECIFIED]), "phases containing PHASE_UNSPECIFIED"),
        (pb.DescribeResponse(name="x", phases=[pb.PHASE_REQUEST] * 2), "a phase twice"),
        (pb.DescribeResponse(name="x", phases=[pb.PHASE_REQUEST], methods=["tools call"]), "methods containing"),
        (pb.DescribeResponse(name="x", phases=[7]), "phases containing 7"),  # type: ignore[list-item]
    ],
)
def test_bad_descriptions_are_refused_naming_the_field(answer: pb.DescribeResponse, message: str) -> None:
    with pytest.raises(PluginError, match=r"^here[ :]") as refused:
        validate_description(answer, "here")
    assert message in str(refused.value)


@pytest.mark.parametrize(
    ("service", "where"),
    [
        ({"address": "localhost"}, "config.services.0.address"),
        ({"address": "unix:"}, "config.services.0.address"),
        ({"address": "a:1", "deadlineMs": 0}, "config.services.0.deadlineMs"),
        ({"address": "a:1", "tls": {"certFile": "c.pem"}}, "config.services.0.tls"),
        ({"address": "a:1", "extra": 1}, "config.services.0.extra"),
    ],
)
def test_bad_configuration_names_the_field(service: dict[str, Any], where: str) -> None:
    with pytest.raises(ConfigError, match=f"^stage 'external': {where.replace('.', '[.]')}"):
        Registry().build(StageSpec(name="external", config={"services": [service]}))


def test_numbers_survive_the_struct_round_trip() -> None:
    value = {"int": 2, "neg": -7, "float": 1.5, "big": 2**53, "list": [1, {"x": 0}], "none": None}
    assert from_struct(to_struct(value)) == value


async def test_fast_calls_takes_the_fast_route_and_refuses_a_service_reading_call_responses(
    servers: Starter, catalog: Catalog
) -> None:
    async def quiet(request: Request) -> Reply:
        return None

    request_only = await servers(StageService("request-only", quiet, phases=["request"]), "a")
    reads_calls = await servers(StageService("reads-calls", quiet, phases=["request", "response"]), "b")
    spec = {"services": [{"address": request_only}], "fastCalls": True}
    stage = Registry().build(StageSpec(name="external", config=spec))
    assert stage.eras_needing_ext_proc(stage.config) == frozenset()
    mcp = Registry().build(StageSpec(name="mcp"))
    assert Pipeline([mcp, stage]).fast_call_eras == {"legacy", "modern"}
    await stage.startup()
    await stage.shutdown()

    by_default = Registry().build(StageSpec(name="external", config={"services": [{"address": reads_calls}]}))
    assert by_default.eras_needing_ext_proc(by_default.config) == {"legacy", "modern"}  # calls stay on ext_proc
    refused = Registry().build(
        StageSpec(name="external", config={"services": [{"address": reads_calls}], "fastCalls": True})
    )
    with pytest.raises(PluginError, match=r"asks for tools/call responses.*fastCalls: true"):
        await refused.startup()
