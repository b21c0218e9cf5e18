"""The whole data path: official MCP clients → real Envoy → our server → real MCP servers.

Each test asserts what the agent sees (status, JSON-RPC result or error) and, where it
matters, what the upstream received or did not.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jwt
import pytest
from mcp.shared.exceptions import MCPError

from tests.agents import legacy_session, modern_request, modern_session, raw_post, response_messages
from tests.integration.conftest import Gateway, metric_value

pytestmark = pytest.mark.integration

POLICY_DENIED = -32003
INIT: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


def calls_of(gateway: Gateway, server: str, tool: str) -> list[Any]:
    """Every tools/call of ``tool`` the upstream ``server`` received (batches included)."""
    found = []
    for record in gateway.received(server):
        body = record["body"]
        for message in body if isinstance(body, list) else [body]:
            is_call = isinstance(message, dict) and message.get("method") == "tools/call"
            if is_call and (message.get("params") or {}).get("name") == tool:
                found.append(message)
    return found


async def legacy_handshake(url: str, version: str = "2025-03-26") -> dict[str, str]:
    """Initialize a legacy session by hand; the headers later requests must carry."""
    reply = await raw_post(url, {**INIT, "params": {**INIT["params"], "protocolVersion": version}})
    assert reply.status_code == 200, reply.text
    headers = {"mcp-session-id": reply.headers["mcp-session-id"], "mcp-protocol-version": version}
    note = await raw_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    assert note.status_code == 202
    return headers


@pytest.mark.parametrize("server", ["py", "pyjson"])
async def test_allowed_call_succeeds(gateway: Gateway, server: str) -> None:
    async with legacy_session(gateway.url(server)) as session:
        result = await session.call_tool("add", {"a": 2, "b": 40})
    assert not result.is_error
    assert result.structured_content == {"result": 42}


async def test_allowed_call_to_the_typescript_server(gateway: Gateway) -> None:
    async with legacy_session(gateway.url("everything")) as session:
        result = await session.call_tool("echo", {"message": "through envoy"})
    assert [c.text for c in result.content if c.type == "text"] == ["Echo: through envoy"]


@pytest.mark.parametrize("server", ["py", "everything"])
async def test_denied_call_never_reaches_the_upstream(gateway: Gateway, server: str) -> None:
    tool = "delete_everything" if server == "py" else "get-env"
    async with legacy_session(gateway.url(server)) as session:
        with pytest.raises(MCPError) as refused:
            await session.call_tool(tool, {})
    assert refused.value.error.code == POLICY_DENIED
    assert tool in refused.value.error.message
    if server == "py":
        assert calls_of(gateway, server, tool) == []


async def test_denied_call_keeps_the_request_id(gateway: Gateway) -> None:
    headers = await legacy_handshake(gateway.url("py"))
    call = {"jsonrpc": "2.0", "id": "call-77", "method": "tools/call", "params": {"name": "delete_everything"}}
    reply = await raw_post(gateway.url("py"), call, headers)
    assert reply.status_code == 200
    assert reply.json() == {
        "jsonrpc": "2.0",
        "id": "call-77",
        "error": {"code": POLICY_DENIED, "message": "tool 'delete_everything' is not allowed on MCP server 'py'"},
    }
    assert calls_of(gateway, "py", "delete_everything") == []


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        ("py", {"echo", "add", "slow_count"}),  # SSE, chunked
        ("pyjson", {"echo", "add", "slow_count"}),  # JSON
        ("everything", None),  # SSE from the TypeScript server
    ],
)
async def test_tools_list_is_filtered(gateway: Gateway, server: str, expected: set[str] | None) -> None:
    async with legacy_session(gateway.url(server)) as session:
        listed = {tool.name for tool in (await session.list_tools()).tools}
    if expected is not None:
        assert listed == expected
    else:
        assert "echo" in listed
        assert "get-sum" in listed
        assert "get-env" not in listed  # denied by deniedTools
        assert not any(name.startswith("toggle-") for name in listed)  # not in allowedTools
        assert all(name == "echo" or name.startswith(("get-", "trigger-")) for name in listed)


async def test_tools_list_content_type_and_framing_survive(gateway: Gateway) -> None:
    headers = await legacy_handshake(gateway.url("py"))
    reply = await raw_post(gateway.url("py"), {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, headers)
    assert reply.headers["content-type"].startswith("text/event-stream")
    [message] = response_messages(reply)
    assert message["id"] == 5
    assert "delete_everything" not in {t["name"] for t in message["result"]["tools"]}


async def test_batch_with_one_denied_element(gateway: Gateway) -> None:
    url = gateway.url("everything")
    headers = await legacy_handshake(url, "2025-03-26")
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"message": "a"}}},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "get-env", "arguments": {}}},
        {
            "jsonrpc": "2.0",
            "id": 3,
            "method": "tools/call",
            "params": {"name": "get-sum", "arguments": {"a": 1, "b": 2}},
        },
    ]
    reply = await raw_post(url, batch, headers)
    assert reply.status_code == 200
    by_id = {m["id"]: m for m in response_messages(reply)}
    assert set(by_id) == {1, 2, 3}
    assert by_id[1]["result"]["content"][0]["text"] == "Echo: a"
    assert by_id[2]["error"]["code"] == POLICY_DENIED
    assert "result" in by_id[3]


async def test_batch_is_refused_after_2025_03_26(gateway: Gateway) -> None:
    headers = await legacy_handshake(gateway.url("py"), "2025-06-18")
    batch = [{"jsonrpc": "2.0", "id": 1, "method": "ping"}, {"jsonrpc": "2.0", "id": 2, "method": "ping"}]
    reply = await raw_post(gateway.url("py"), batch, headers)
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == -32600


async def test_modern_era_calls_and_lists(gateway: Gateway) -> None:
    async with modern_session(gateway.url("modern")) as session:
        assert session.protocol_version == "2026-07-28"
        result = await session.call_tool("echo", {"text": "modern"})
        listed = {tool.name for tool in (await session.list_tools()).tools}
        with pytest.raises(MCPError) as refused:
            await session.call_tool("delete_everything", {})
    assert result.structured_content == {"result": "modern"}
    assert listed == {"echo", "add", "slow_count"}
    assert refused.value.error.code == POLICY_DENIED
    assert calls_of(gateway, "modern", "delete_everything") == []


@pytest.mark.parametrize(
    ("header", "value"),
    [("mcp-name", "add"), ("mcp-method", "tools/list"), ("mcp-protocol-version", "2025-11-25")],
)
async def test_2026_header_body_mismatch_is_refused(gateway: Gateway, header: str, value: str) -> None:
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "x"}}, id=9)
    before = len(gateway.received("modern"))
    reply = await raw_post(gateway.url("modern"), body, {**headers, header: value})
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == -32020
    assert reply.json()["id"] == 9
    assert len(gateway.received("modern")) == before  # the upstream never saw it


async def test_get_stream_and_delete_pass_through(gateway: Gateway) -> None:
    url = gateway.url("py")
    headers = await legacy_handshake(url, "2025-06-18")
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("GET", url, headers={**headers, "accept": "text/event-stream"}) as stream,
    ):
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
    async with httpx.AsyncClient(timeout=10) as client:
        deleted = await client.delete(url, headers=headers)
        assert deleted.status_code in (200, 204)
        after = await client.post(
            url,
            content=json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}),
            headers={**headers, "content-type": "application/json", "accept": "application/json, text/event-stream"},
        )
    assert after.status_code == 404  # the session is gone upstream: the DELETE got through
    # The upstream receives its own session id, never the gateway's signed one.
    upstream_id = jwt.decode(headers["mcp-session-id"], options={"verify_signature": False})["sid"]
    methods = [(r["method"], r["headers"].get("mcp-session-id")) for r in gateway.received("py")]
    assert ("GET", upstream_id) in methods
    assert ("DELETE", upstream_id) in methods
    assert not any(session == headers["mcp-session-id"] for _, session in methods)


async def test_progress_streams_before_the_result(gateway: Gateway) -> None:
    """Progress events reach the agent while the call is still running: SSE is never buffered whole.

    The tool sleeps 0.5 s between steps, so a streamed response shows the first progress
    event about a second before the result; a buffered one would deliver them together.
    """
    url = gateway.url("py")
    headers = await legacy_handshake(url, "2025-06-18")
    call = {
        "jsonrpc": "2.0",
        "id": 11,
        "method": "tools/call",
        "params": {"name": "slow_count", "arguments": {"steps": 3, "delay": 0.5}, "_meta": {"progressToken": "p"}},
    }
    seen: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream(
            "POST",
            url,
            content=json.dumps(call),
            headers={**headers, "content-type": "application/json", "accept": "application/json, text/event-stream"},
        ) as stream,
    ):
        async for line in stream.aiter_lines():
            if line.startswith("data:") and line[5:].strip():
                message = json.loads(line[5:])
                seen.append((message.get("method") or f"result:{message.get('id')}", loop.time()))
    assert [kind for kind, _ in seen] == ["notifications/progress"] * 3 + ["result:11"]
    first_progress, result = seen[0][1], seen[-1][1]
    assert result - first_progress > 0.5, "progress was held back until the result: the SSE stream was buffered"


async def test_progress_with_the_sdk_client(gateway: Gateway) -> None:
    seen_progress: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen_progress.append(progress)

    async with legacy_session(gateway.url("py")) as session:
        result = await session.call_tool("slow_count", {"steps": 3, "delay": 0.05}, progress_callback=on_progress)
    assert seen_progress == [1.0, 2.0, 3.0]
    assert result.structured_content == {"result": "counted to 3"}


async def test_malformed_json_is_a_parse_error(gateway: Gateway) -> None:
    reply = await raw_post(gateway.url("py"), b'{"jsonrpc": "2.0", "method": ')
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == -32700


async def test_empty_batch_is_an_invalid_request(gateway: Gateway) -> None:
    reply = await raw_post(gateway.url("py"), [])
    assert reply.status_code == 400
    assert reply.json()["error"]["code"] == -32600


async def test_tools_call_without_a_name_is_invalid_params(gateway: Gateway) -> None:
    reply = await raw_post(gateway.url("py"), {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {}})
    assert reply.json()["error"]["code"] == -32602
    assert reply.json()["id"] == 4


async def test_oversized_body_is_refused_before_the_upload(gateway: Gateway) -> None:
    """A Content-Length over the limit gets 413 and a JSON-RPC error before a byte of the body is sent.

    (Sending the body anyway races Envoy's early answer against the upload, which a
    client sees as a connection reset; so the test sends only the head.)
    """
    port = int(gateway.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /py/mcp HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"accept: application/json, text/event-stream\r\ncontent-length: 5242880\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    body = await asyncio.wait_for(reader.readexactly(length), timeout=10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413")
    error = json.loads(body)["error"]
    assert error["code"] == -32600
    assert "exceeds the 4194304-byte limit" in error["message"]


async def test_unknown_path_is_a_json_rpc_404(gateway: Gateway) -> None:
    reply = await raw_post(f"{gateway.base}/nope/mcp", {"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert reply.status_code == 404
    assert "/py/mcp" in reply.json()["error"]["message"]


async def test_spoofed_x_mcp_headers_are_replaced(gateway: Gateway) -> None:
    headers = await legacy_handshake(gateway.url("py"))
    call = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "s"}}}
    spoof = {"x-mcp-tool": "innocent", "x-mcp-server": "other"}
    reply = await raw_post(gateway.url("py"), call, {**headers, **spoof})
    assert reply.status_code == 200
    [record] = [r for r in gateway.received("py") if isinstance(r["body"], dict) and r["body"].get("id") == 8]
    assert record["headers"]["x-mcp-tool"] == "echo"
    assert record["headers"]["x-mcp-server"] == "py"
    assert record["headers"]["x-mcp-method"] == "tools/call"


async def test_decisions_are_counted_in_metrics(gateway: Gateway) -> None:
    before = metric_value(gateway.metrics_url, "mcp_extproc_requests_total", method="tools/call", decision="deny")
    headers = await legacy_handshake(gateway.url("py"))
    call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_everything"}}
    await raw_post(gateway.url("py"), call, headers)
    after = metric_value(gateway.metrics_url, "mcp_extproc_requests_total", method="tools/call", decision="deny")
    assert after == before + 1
    assert metric_value(gateway.metrics_url, "mcp_extproc_stage_seconds_count", stage="allowlist") > 0


async def test_method_and_tool_reach_envoy_as_dynamic_metadata(gateway: Gateway) -> None:
    """Envoy's access log (rendered to print our dynamic metadata) names server, method and tool."""
    async with legacy_session(gateway.url("pyjson")) as session:
        await session.call_tool("echo", {"text": "metadata"})
    # One JSON object per request (tests/integration/test_access_log.py checks the rest).
    expected = '"mcp_method":"tools/call","mcp_server":"pyjson","mcp_tool":"echo"'
    # Envoy flushes its access log asynchronously (every 0.5 s under `up`).
    gateway.proc.wait_for_line(re.escape(expected), 10)
