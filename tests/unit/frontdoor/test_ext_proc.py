"""The ext_proc adapter with the default pipeline, in process: Envoy's messages in, Envoy's answers out."""

from __future__ import annotations

import json
import logging

import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as mode_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog
from extproc.core.registry import Registry
from extproc.frontdoor.ext_proc import Processor
from extproc.mcp.codes import POLICY_DENIED
from tests.messages import body_msg, headers_msg, mutated, post_headers

Mode = mode_pb.ProcessingMode


def processor(catalog: Catalog) -> Processor:
    return Processor(Registry().build_pipeline(DEFAULT_PIPELINE), catalog)


def call(tool: str, id_: int = 7) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": tool, "arguments": {}}}


async def test_allowed_call_is_forwarded_with_derived_headers(catalog: Catalog) -> None:
    proc = processor(catalog)
    first = await proc.handle(headers_msg(post_headers(**{"x-mcp-tool": "spoofed"})))
    assert first.WhichOneof("response") == "request_headers"
    assert "x-mcp-tool" in first.request_headers.response.header_mutation.remove_headers
    second = await proc.handle(body_msg(call("echo")))
    assert second.WhichOneof("response") == "request_body"
    headers = mutated(second.request_body.response)
    assert headers == {"x-mcp-server": "demo", "x-mcp-method": "tools/call", "x-mcp-tool": "echo"}
    assert second.request_body.response.clear_route_cache
    meta = second.dynamic_metadata.fields["mcp_extproc"].struct_value
    assert meta.fields["tool"].string_value == "echo"


async def test_denied_call_is_answered_with_the_same_id(catalog: Catalog, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    proc = processor(catalog)
    await proc.handle(headers_msg(post_headers()))
    answer = await proc.handle(body_msg(call("add_secret", 42)))
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 200
    body = json.loads(answer.immediate_response.body)
    assert body["id"] == 42
    assert body["error"]["code"] == POLICY_DENIED
    assert "add_secret" in body["error"]["message"]
    assert "[req-1] allowlist: refused tools/call of 'add_secret'" in caplog.text
    decision = json.loads(next(r.message for r in caplog.records if r.name == "mcp_extproc.audit"))
    assert decision.pop("latency_ms") >= 0
    assert decision.pop("time").endswith("+00:00")
    assert "not in allowedTools" in decision.pop("rule")
    assert decision == {
        "principal": "anonymous",
        "issuer": None,
        "agent": None,
        "event": "decision",
        "request_id": "req-1",
        "server": "demo",
        "virtual_server": None,
        "http_method": "POST",
        "method": "tools/call",
        "tool": "add_secret",
        "decision": "deny",
        "reason": "tool_not_allowed",
    }


async def test_malformed_json_is_400_parse_error(catalog: Catalog) -> None:
    proc = processor(catalog)
    await proc.handle(headers_msg(post_headers()))
    answer = await proc.handle(body_msg(b'{"jsonrpc": "2.0", "id": 1,'))
    assert answer.immediate_response.status.code == 400
    assert json.loads(answer.immediate_response.body)["error"]["code"] == -32700


async def test_oversized_content_length_is_413_before_the_body(catalog: Catalog) -> None:
    proc = processor(catalog)
    answer = await proc.handle(headers_msg(post_headers(**{"content-length": str(5 * 1024 * 1024)})))
    assert answer.immediate_response.status.code == 413


async def test_unknown_server_is_404(catalog: Catalog) -> None:
    proc = processor(catalog)
    answer = await proc.handle(headers_msg(post_headers(path="/nope/mcp")))
    assert answer.immediate_response.status.code == 404
    assert "no MCPServer" in json.loads(answer.immediate_response.body)["error"]["message"]


async def test_get_stream_is_read_where_tools_are_hidden(catalog: Catalog) -> None:
    # A GET may resume a stream (Last-Event-ID) whose replay holds a tools/list result: it is filtered too.
    proc = processor(catalog)
    answer = await proc.handle(headers_msg({":method": "GET", ":path": "/demo/mcp"}, end_of_stream=True))
    assert answer.WhichOneof("response") == "request_headers"
    assert answer.mode_override.response_header_mode != Mode.SKIP


async def test_tools_list_over_sse_is_filtered_chunk_by_chunk(catalog: Catalog) -> None:
    proc = processor(catalog)
    await proc.handle(headers_msg(post_headers()))
    await proc.handle(body_msg({"jsonrpc": "2.0", "id": 3, "method": "tools/list"}))
    reply = await proc.handle(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    assert reply.mode_override.response_body_mode == Mode.STREAMED
    tools = [{"name": n} for n in ("echo", "add", "add_secret", "rm")]
    event = b"event: message\ndata: " + json.dumps({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}}).encode()
    progress = b'event: message\ndata: {"jsonrpc":"2.0","method":"notifications/progress","params":{}}\n\n'
    # A progress event passes through untouched and at once; the result event is split across chunks.
    out1 = await proc.handle(body_msg(progress + event[:20], end_of_stream=False, response=True))
    out2 = await proc.handle(body_msg(event[20:] + b"\n\n", end_of_stream=True, response=True))
    sent = out1.response_body.response.body_mutation.body + out2.response_body.response.body_mutation.body
    assert out1.response_body.response.body_mutation.body == progress
    data = sent[len(progress) :].split(b"data: ", 1)[1].strip()
    assert [t["name"] for t in json.loads(data)["result"]["tools"]] == ["echo", "add"]


async def test_tools_list_json_is_filtered_and_length_fixed(catalog: Catalog) -> None:
    proc = processor(catalog)
    await proc.handle(headers_msg(post_headers()))
    await proc.handle(body_msg({"jsonrpc": "2.0", "id": "a", "method": "tools/list"}))
    reply = await proc.handle(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    assert reply.mode_override.response_body_mode == Mode.BUFFERED
    body = {"jsonrpc": "2.0", "id": "a", "result": {"tools": [{"name": "rm"}, {"name": "echo"}]}}
    out = await proc.handle(body_msg(body, response=True))
    new = out.response_body.response.body_mutation.body
    assert [t["name"] for t in json.loads(new)["result"]["tools"]] == ["echo"]
    assert mutated(out.response_body.response)["content-length"] == str(len(new))


async def test_call_response_is_not_read(catalog: Catalog) -> None:
    proc = processor(catalog)
    await proc.handle(headers_msg(post_headers()))
    await proc.handle(body_msg(call("echo")))
    reply = await proc.handle(headers_msg({":status": "200", "content-type": "text/event-stream"}, response=True))
    assert not reply.HasField("mode_override")


async def test_batch_with_one_denied_element(catalog: Catalog) -> None:
    proc = processor(catalog)
    await proc.handle(headers_msg(post_headers(**{"mcp-protocol-version": "2025-03-26"})))
    forwarded = await proc.handle(body_msg([call("echo", 1), call("rm", 2)]))
    sent = json.loads(forwarded.request_body.response.body_mutation.body)
    assert [m["id"] for m in sent] == [1]
    assert mutated(forwarded.request_body.response)["x-mcp-tool"] == "echo"
    await proc.handle(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    upstream = [{"jsonrpc": "2.0", "id": 1, "result": {"content": []}}]
    out = await proc.handle(body_msg(upstream, response=True))
    merged = json.loads(out.response_body.response.body_mutation.body)
    assert [m["id"] for m in merged] == [1, 2]
    assert merged[1]["error"]["code"] == POLICY_DENIED


async def test_batch_of_only_denied_calls_is_answered_here(catalog: Catalog) -> None:
    proc = processor(catalog)
    await proc.handle(headers_msg(post_headers()))
    answer = await proc.handle(body_msg([call("rm", 1), call("add_secret", 2)]))
    assert answer.WhichOneof("response") == "immediate_response"
    assert [m["id"] for m in json.loads(answer.immediate_response.body)] == [1, 2]


async def test_phase_before_headers_fails_closed(catalog: Catalog) -> None:
    answer = await processor(catalog).handle(body_msg(call("echo")))
    assert answer.WhichOneof("response") == "immediate_response"
    assert answer.immediate_response.status.code == 500


def test_pipeline_phase_needs(catalog: Catalog) -> None:
    needs = Registry().build_pipeline(DEFAULT_PIPELINE).needs
    assert (needs.request_headers, needs.request_body, needs.response_headers, needs.response_body) == (
        True,
        True,
        True,
        True,
    )
    assert pb.ProcessingResponse  # the adapter is the only module using these protos outside tests
