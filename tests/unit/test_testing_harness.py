"""The stage test harness (extproc.testing) behaves like the ext_proc and ext_authz front doors.

Each test drives installed stages through :class:`StageHarness` and asserts what an agent or
the upstream would notice; the first test replays the same exchanges through the real
ext_proc :class:`Processor` and compares.
"""

from __future__ import annotations

import json
import logging
from typing import Any, ClassVar

import pytest

from extproc.api import Answer, Context, Continue, Deny, Phase, Stage, StageConfig, Verdict
from extproc.config.pipeline_file import StageSpec
from extproc.config.resources import Catalog, parse_documents
from extproc.core.registry import Registry
from extproc.errors import ConfigError, PluginError
from extproc.frontdoor.ext_proc import Processor
from extproc.mcp.codes import POLICY_DENIED
from extproc.mcp.jsonrpc import Era
from extproc.mcp.spec import INTERNAL_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, PARSE_ERROR
from extproc.testing import DEFAULT_RESOURCES, ExchangeResult, Reply, StageHarness
from tests.unit.conftest import SERVER_DOC, body_msg, headers_msg, mutated, post_headers

MB = 1024 * 1024


def stage(name: str, **config: Any) -> Stage[Any]:
    return Registry().build(StageSpec(name=name, config=config))


def call(tool: str, id_: int | str = 7) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": tool, "arguments": {}}}


def gate() -> StageHarness:
    """``allowlist`` after ``mcp``, on the unit tests' server (echo, add*; not add_secret)."""
    return StageHarness(stage("allowlist"), stages_before=["mcp"], resources=[SERVER_DOC])


def reply_of(result: ExchangeResult) -> Reply:
    assert result.reply is not None, f"expected a stop, got {result.outcome}"
    return result.reply


def tools_of(message: Any) -> list[str]:
    return [tool["name"] for tool in message["result"]["tools"]]


# -- the same as the real ext_proc front door ------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [call("echo"), call("add_secret", 42), b'{"jsonrpc": "2.0", "id": 1,', [call("echo", 1), call("rm", 2)]],
    ids=["allowed", "denied", "malformed", "batch"],
)
async def test_the_request_side_matches_the_ext_proc_processor(body: Any, catalog: Catalog) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    harness = StageHarness(stage("allowlist"), stages_before=["mcp"], resources=catalog)
    result = await harness.post(raw, headers={"x-request-id": "req-1", "mcp-protocol-version": "2025-03-26"})

    proc = Processor(harness.pipeline, catalog)
    await proc.handle(headers_msg(post_headers(**{"mcp-protocol-version": "2025-03-26"})))
    real = await proc.handle(body_msg(raw))
    if real.WhichOneof("response") == "immediate_response":
        reply = reply_of(result)
        assert reply.status == real.immediate_response.status.code
        assert reply.body == real.immediate_response.body
    else:
        common = real.request_body.response
        rewritten = bool(common.body_mutation.body)
        assert result.body_forwarded is not None
        assert result.body_forwarded == (common.body_mutation.body if rewritten else raw)
        length = {"content-length": str(len(result.body_forwarded))} if rewritten else {}
        assert mutated(common) == {**result.headers_set, **length}
        assert proc.metadata == dict(result.metadata)


# -- allowlist and mcp, request side -----------------------------------------------------------


async def test_a_tool_outside_allowed_tools_is_refused_with_200_and_the_calls_id(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    result = await gate().post(call("add_secret", 42))
    assert result.denied and result.answer is None
    assert result.deny is not None and result.deny.code == POLICY_DENIED == -32003
    reply = reply_of(result)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()
    assert error["id"] == 42 and error["error"]["code"] == -32003
    assert "add_secret" in error["error"]["message"]
    assert result.body_forwarded is None  # the upstream never sees it
    assert isinstance(result.verdicts[Phase.REQUEST_HEADERS], Continue)
    assert result.verdicts[Phase.REQUEST_BODY] is result.deny
    assert any("not in allowedTools" in line for line in result.ctx.book.explanations)
    audit = json.loads(next(r.message for r in caplog.records if r.name == "mcp_extproc.audit"))
    assert (audit["decision"], audit["reason"], audit["tool"]) == ("deny", "tool_not_allowed", "add_secret")
    assert "not in allowedTools" in audit["rule"]


async def test_an_allowed_call_is_forwarded_with_the_derived_headers_and_without_spoofed_ones() -> None:
    result = await gate().post(call("echo"), headers={"X-Mcp-Tool": "spoofed"})
    assert not result.denied and result.reply is None
    assert result.headers_set == {"x-mcp-server": "demo", "x-mcp-method": "tools/call", "x-mcp-tool": "echo"}
    assert "x-mcp-tool" not in result.headers_removed  # removed at the headers phase, then set from the body
    assert result.upstream_headers["x-mcp-tool"] == "echo"
    assert result.metadata["tool"] == "echo" and result.metadata["server"] == "demo"
    assert result.body_forwarded == json.dumps(call("echo")).encode()
    assert not result.wants_response_body


async def test_malformed_json_is_400_parse_error() -> None:
    result = await StageHarness(stage("mcp")).post(b'{"jsonrpc": "2.0", "id": 1,')
    reply = reply_of(result)
    assert reply.status == 400
    assert reply.json()["error"]["code"] == PARSE_ERROR == -32700


async def test_the_headers_phase_refuses_before_the_body_is_read() -> None:
    harness = StageHarness(stage("mcp"))
    too_large = await harness.post(call("echo"), headers={"content-length": str(5 * MB)})
    assert reply_of(too_large).status == 413
    assert list(too_large.verdicts) == [Phase.REQUEST_HEADERS]
    unknown = await harness.post(call("echo"), server="nope")
    assert reply_of(unknown).status == 404
    assert reply_of(unknown).json()["error"]["code"] == METHOD_NOT_FOUND
    twice = await harness.post(call("echo"), headers=[("mcp-name", "echo"), ("mcp-name", "echo")])
    assert reply_of(twice).status == 400


async def test_a_modern_request_gets_its_envelope_from_protocol_version() -> None:
    result = await gate().post(call("echo"), protocol_version="2026-07-28")
    assert not result.denied
    assert result.ctx.mcp is not None and result.ctx.mcp.era is Era.MODERN
    assert result.upstream_headers["mcp-method"] == "tools/call"
    assert result.upstream_headers["mcp-name"] == "echo"
    assert result.metadata["era"] == "modern"


# -- responses ---------------------------------------------------------------------------------


async def test_tools_list_json_comes_back_without_the_denied_tools_and_with_its_new_length() -> None:
    result = await gate().post({"jsonrpc": "2.0", "id": "a", "method": "tools/list"})
    assert result.wants_response_body and result.response_phases
    assert "accept-encoding" in result.headers_removed
    upstream = {"jsonrpc": "2.0", "id": "a", "result": {"tools": [{"name": n} for n in ("rm", "echo", "add_secret")]}}
    reply = await result.respond(body=json.dumps(upstream).encode())
    assert reply.status == 200 and reply.stop is None
    assert tools_of(reply.json()) == ["echo"]
    assert reply.headers["content-length"] == str(len(reply.body))


async def test_tools_list_over_sse_is_filtered_chunk_by_chunk() -> None:
    result = await gate().post({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    tools = [{"name": n} for n in ("echo", "add", "add_secret", "rm")]
    event = b"event: message\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}}).encode()
    progress = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    reply = await result.respond(
        headers={"content-type": "text/event-stream"}, chunks=[progress + event[:20], event[20:] + b"\n\n"]
    )
    assert result.ctx.book.response_streamed
    assert reply.chunks[0] == progress  # the progress event at once; the split event held back
    assert "content-length" not in reply.headers
    data = reply.body[len(progress) :].split(b"data: ", 1)[1].strip()
    assert tools_of(json.loads(data)) == ["echo", "add"]


async def test_an_sse_reply_with_a_content_length_arrives_whole() -> None:
    result = await gate().post({"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    listed = {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "rm"}]}}
    body = b"event: message\ndata: " + json.dumps(listed).encode() + b"\n\n"
    reply = await result.respond(
        headers={"content-type": "text/event-stream", "content-length": str(len(body))}, body=body
    )
    assert not result.ctx.book.response_streamed
    assert b'"tools":[]' in reply.body and reply.headers["content-length"] == str(len(reply.body))


async def test_responses_nobody_reads_pass_untouched() -> None:
    harness = gate()
    called = await harness.post(call("echo"))
    body = b'{"jsonrpc":"2.0","id":7,"result":{"content":[]}}'
    reply = await called.respond(body=body)
    assert reply.body == body and Phase.RESPONSE_BODY not in reply.verdicts
    # A GET may replay a tools/list result, so it is read where tools are hidden; on a server
    # that allows every tool and denies none there is nothing to hide.
    stream = await StageHarness(stage("allowlist"), stages_before=["mcp"]).get()
    assert not stream.response_phases
    assert (
        await stream.respond(headers={"content-type": "text/event-stream"}, chunks=[b": hi\n\n"])
    ).body == b": hi\n\n"


async def test_a_stopped_exchange_has_no_response() -> None:
    result = await gate().post(call("rm"))
    with pytest.raises(RuntimeError, match="no response"):
        await result.respond(body=b"{}")


# -- building the pipeline ---------------------------------------------------------------------


def test_a_stage_that_requires_mcp_without_it_is_refused() -> None:
    with pytest.raises(PluginError, match="requires stage 'mcp' before it"):
        StageHarness(stage("allowlist"))
    with pytest.raises(PluginError, match="requires stage 'mcp' before it"):
        StageHarness(stage("allowlist"), stages_after=["mcp"])


def test_unknown_stages_and_broken_resources_are_refused() -> None:
    with pytest.raises(PluginError, match="no stage named 'nope'"):
        StageHarness(stage("mcp"), stages_after=["nope"])
    policy = {"apiVersion": DEFAULT_RESOURCES[0]["apiVersion"], "kind": "MCPToolPolicy", "metadata": {"name": "p"}}
    with pytest.raises(ConfigError, match="no MCPServer named 'ghost'"):
        StageHarness(stage("mcp"), resources=[{**policy, "spec": {"targetRefs": [{"name": "ghost"}]}}])


# -- credentials -------------------------------------------------------------------------------

UPSTREAM_AUTH = """
apiVersion: mcp.extproc.io/v1alpha1
kind: MCPServer
metadata: {name: demo}
spec:
  url: http://127.0.0.1:9/mcp
  allowedTools: ["*"]
  upstreamAuth: {bearer: {secretRef: {name: up, key: token}}}
---
apiVersion: v1
kind: Secret
metadata: {name: up}
stringData: {token: upstream-token}
"""


async def test_credentials_removes_the_agents_authorization_header() -> None:
    harness = StageHarness(stage("credentials"), stages_before=["mcp"])
    result = await harness.post(call("echo"), headers={"Authorization": "Bearer agent-token"})
    assert "authorization" in result.headers_removed
    assert "authorization" not in result.upstream_headers


async def test_credentials_swaps_the_agents_token_for_the_upstream_one_on_every_method() -> None:
    harness = StageHarness(
        stage("credentials", removeHeaders=["Cookie"]), stages_before=["mcp"], resources=UPSTREAM_AUTH
    )
    agent = {"authorization": "Bearer agent-token", "cookie": "c=1"}
    for result in (await harness.post(call("echo"), headers=agent), await harness.get(headers=agent)):
        assert result.upstream_headers["authorization"] == "Bearer upstream-token"
        assert "cookie" not in result.upstream_headers and "cookie" in result.headers_removed


# -- the ext_authz front doors -----------------------------------------------------------------


async def test_check_decides_the_request_side_once_and_cannot_rewrite() -> None:
    harness = gate()
    refused = await harness.check(call("rm", 5))
    assert reply_of(refused).status == 200 and reply_of(refused).json()["id"] == 5
    assert not refused.response_phases and not refused.ctx.sees_responses
    batch = await harness.check([call("echo", 1), call("rm", 2)])
    assert batch.deny is not None and batch.deny.reason == "needs_rewrite" and batch.deny.status == 403
    allowed = await harness.check(call("echo"))
    assert allowed.headers_set["x-mcp-tool"] == "echo" and allowed.verdicts == {}


async def test_fast_call_holds_envoys_route_promise() -> None:
    harness = gate()
    called = await harness.fast_call(call("echo"))
    assert not called.denied and called.ctx.fast_call
    listed = await harness.fast_call({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert listed.deny is not None and listed.deny.code == INVALID_REQUEST and listed.deny.reason == "route_mismatch"
    with pytest.raises(ValueError, match="no fast route for legacy-era tools/call"):
        await StageHarness(Rewriter(StageConfig()), stages_before=["mcp"]).fast_call(call("echo"))


# -- hooks of a stage written for the test -----------------------------------------------------


class Rewriter(Stage[StageConfig]):
    """Answers /demo/ping, fails on tool 'boom', rewrites other calls; records the exchange's end."""

    name: ClassVar[str] = "rewriter"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)
    ended: ClassVar[list[str]] = []

    async def on_request_headers(self, ctx: Context) -> Verdict:
        if ctx.path == "/demo/ping":
            return Answer(body=b"pong", headers={"content-type": "text/plain"})
        return None

    async def on_request_body(self, ctx: Context) -> Verdict:
        if ctx.mcp is not None and ctx.mcp.tool_name == "boom":
            raise RuntimeError("boom")
        ctx.want_response_body()
        return Continue(body=b'{"rewritten":true}')

    async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict:
        if ctx.response_status == 500:
            return Deny(status=502, code=INTERNAL_ERROR, message="upstream failed")
        return Continue(body=chunk.upper())

    async def on_exchange_end(self, ctx: Context) -> None:
        self.ended.append(ctx.request_id)


async def test_answers_faults_rewrites_and_the_end_of_the_exchange() -> None:
    Rewriter.ended.clear()
    harness = StageHarness(Rewriter(StageConfig()), stages_before=["mcp"])
    answered = await harness.get(path="/demo/ping", headers={"x-request-id": "a"})
    assert answered.answer is not None and not answered.denied
    assert reply_of(answered).body == b"pong" and reply_of(answered).headers["content-type"] == "text/plain"
    assert Rewriter.ended == ["a"]  # stopped: the stream ends at once

    fault = await harness.post(call("boom"), headers={"x-request-id": "b"})
    assert reply_of(fault).status == 503 and reply_of(fault).json()["error"]["code"] == INTERNAL_ERROR

    rewritten = await harness.post(call("echo"), headers={"x-request-id": "c"})
    assert rewritten.body_forwarded == b'{"rewritten":true}'
    assert rewritten.upstream_headers["content-length"] == str(len(b'{"rewritten":true}'))
    assert Rewriter.ended == ["a", "b"]  # c waits for its response
    reply = await rewritten.respond(body=b'{"ok":1}')
    assert reply.body == b'{"OK":1}' and Rewriter.ended == ["a", "b", "c"]

    failed = await (await harness.post(call("echo"))).respond(500, body=b"oops")
    assert failed.status == 502 and isinstance(failed.stop, Deny)


async def test_async_with_starts_and_stops_every_stage() -> None:
    events: list[str] = []

    class Lifecycle(Stage[StageConfig]):
        name: ClassVar[str] = "lifecycle"

        async def startup(self) -> None:
            events.append("up")

        async def shutdown(self) -> None:
            events.append("down")

    async with StageHarness(Lifecycle(StageConfig()), resources=parse_documents(DEFAULT_RESOURCES, "t")) as harness:
        assert events == ["up"]
        assert harness.server == "demo"
    assert events == ["up", "down"]
