"""The test upstreams and agent helpers, exercised directly (no proxy in between).

If these fail, every proxy test built on them is meaningless, so they pin down what the
upstreams put on the wire: content types per mode, sessions or none, the modern
headers, the request record and progress streaming ahead of results.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mcp.client.session import ClientSession
from mcp_types import HEADER_MISMATCH, CallToolResult, TextContent

from tests.agents import (
    LEGACY_VERSION,
    MODERN_VERSION,
    legacy_session,
    modern_request,
    modern_session,
    raw_post,
    response_messages,
)
from tests.procs import Proc, start_everything, start_pyserver
from tests.upstreams.pyserver import Mode, Record, read_records

pytestmark = pytest.mark.integration

PYSERVER_TOOLS = {
    "echo",
    "add",
    "delete_everything",
    "slow_count",
    "push_unrelated",
    "pushed_outcomes",
    "announce_change",
}


@dataclass(frozen=True)
class Upstream:
    """A running upstream: its process, MCP endpoint and (for pyserver) request record."""

    proc: Proc
    port: int
    record: Path | None = None
    mode: str = ""

    @property
    def url(self) -> str:
        """The Streamable HTTP endpoint."""
        return f"http://127.0.0.1:{self.port}/mcp"

    def records(self) -> list[Record]:
        """Every request the upstream has recorded so far."""
        assert self.record is not None, "this upstream records nothing"
        return read_records(self.record)


@pytest.fixture(scope="module", params=["legacy-sse", "legacy-json", "modern"])
def pyserver(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """One recording pyserver per mode, shared by the tests of this module."""
    mode: Mode = request.param
    record = tmp_path_factory.mktemp(mode) / "requests.jsonl"
    proc, port = start_pyserver(mode, record)
    yield Upstream(proc, port, record, mode)
    assert proc.stop() == 0, proc.output()


@pytest.fixture(scope="module")
def everything(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """server-everything from the pinned npm package."""
    proc, port = start_everything(log_dir=tmp_path_factory.mktemp("everything"))
    yield Upstream(proc, port)
    proc.stop()


def text_of(result: object) -> str:
    """The single text block of a tool result."""
    assert isinstance(result, CallToolResult), result
    assert not result.is_error, result
    [block] = result.content
    assert isinstance(block, TextContent), block
    return block.text


async def test_legacy_client_lists_tools_and_echoes(pyserver: Upstream) -> None:
    mark = len(pyserver.records())
    async with legacy_session(pyserver.url) as session:
        assert session.protocol_version == LEGACY_VERSION
        tools = await session.list_tools()
        assert {tool.name for tool in tools.tools} == PYSERVER_TOOLS
        assert text_of(await session.call_tool("echo", {"text": "hello"})) == "hello"

    records = pyserver.records()[mark:]
    posts = [r for r in records if r["method"] == "POST"]
    assert [p["body"].get("method") for p in posts] == [
        "initialize",
        "notifications/initialized",
        "tools/list",
        "tools/call",
    ]
    assert posts[-1]["body"]["params"]["arguments"] == {"text": "hello"}
    assert all(r["path"] == "/mcp" for r in records)
    stateful = pyserver.mode != "modern"
    # Stateful modes issue a session: every later request carries it and the client DELETEs it.
    assert all(("mcp-session-id" in p["headers"]) == stateful for p in posts[1:])
    assert ("DELETE" in {r["method"] for r in records}) == stateful


async def test_legacy_response_content_type_follows_mode(pyserver: Upstream) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": LEGACY_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    response = await raw_post(pyserver.url, body)

    assert response.status_code == 200
    expected = "application/json" if pyserver.mode == "legacy-json" else "text/event-stream"
    assert response.headers["content-type"].startswith(expected)
    [message] = response_messages(response)
    assert message["id"] == 1
    assert message["result"]["protocolVersion"] == LEGACY_VERSION


async def test_modern_client_echoes_without_session(pyserver: Upstream) -> None:
    mark = len(pyserver.records())
    async with modern_session(pyserver.url) as session:
        assert session.protocol_version == MODERN_VERSION
        assert text_of(await session.call_tool("echo", {"text": "hi"})) == "hi"

    records = pyserver.records()[mark:]
    # ClientSession.call_tool lists tools after calling one it has not seen listed, to
    # validate structuredContent against the tool's outputSchema.
    assert [(r["method"], r["headers"].get("mcp-method")) for r in records] == [
        ("POST", "server/discover"),
        ("POST", "tools/call"),
        ("POST", "tools/list"),
    ]
    discover, call, _ = records
    assert discover["body"]["method"] == "server/discover"
    assert call["headers"]["mcp-protocol-version"] == MODERN_VERSION
    assert call["headers"]["mcp-method"] == "tools/call"
    assert call["headers"]["mcp-name"] == "echo"
    assert "mcp-session-id" not in call["headers"]
    assert call["body"]["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == MODERN_VERSION


async def test_hand_made_modern_request_matches_the_sdk(pyserver: Upstream) -> None:
    body, headers = modern_request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}}, id=7)
    response = await raw_post(pyserver.url, body, headers)

    assert response.status_code == 200, response.text
    [message] = response_messages(response)
    assert message["id"] == 7
    assert message["result"]["structuredContent"] == {"result": 5}


async def test_modern_header_disagreeing_with_body_is_rejected(pyserver: Upstream) -> None:
    mark = len(pyserver.records())
    body, headers = modern_request("tools/call", {"name": "delete_everything", "arguments": {}}, id=8)
    headers["mcp-name"] = "echo"
    response = await raw_post(pyserver.url, body, headers)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == HEADER_MISMATCH
    # The record shows what arrived, whatever the server then did with it.
    [record] = pyserver.records()[mark:]
    assert record["headers"]["mcp-name"] == "echo"
    assert record["body"]["params"]["name"] == "delete_everything"


@pytest.mark.parametrize("era", ["legacy", "modern"])
async def test_progress_arrives_before_the_result(pyserver: Upstream, era: str) -> None:
    events: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        events.append(f"progress {progress:g}/{total:g}")

    connect = legacy_session if era == "legacy" else modern_session
    async with connect(pyserver.url) as session:
        result = await session.call_tool("slow_count", {"steps": 3, "delay": 0.05}, progress_callback=on_progress)
        events.append(text_of(result))

    if pyserver.mode == "legacy-json":
        # json_response=True answers both eras with one JSON body: the SDK drops the
        # progress notifications, as they have no stream to travel on.
        assert events == ["counted to 3"]
    else:
        assert events == ["progress 1/3", "progress 2/3", "progress 3/3", "counted to 3"]


async def test_record_file_is_one_json_line_per_request(pyserver: Upstream) -> None:
    mark = len(pyserver.records())
    await raw_post(pyserver.url, b"not json")
    [record] = pyserver.records()[mark:]
    assert record["method"] == "POST"
    assert record["body"] is None
    assert record["body_text"] == "not json"


def test_pyserver_exits_cleanly_on_sigterm(tmp_path: Path) -> None:
    proc, port = start_pyserver("legacy-sse", tmp_path / "requests.jsonl")
    assert proc.stop() == 0
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


async def echo_via(session: ClientSession) -> str:
    """Call server-everything's echo tool."""
    return text_of(await session.call_tool("echo", {"message": "hi"}))


async def test_everything_lists_tools_and_echoes(everything: Upstream) -> None:
    async with legacy_session(everything.url) as session:
        tools = {tool.name for tool in (await session.list_tools()).tools}
        assert {"echo", "get-sum", "trigger-long-running-operation"} <= tools
        assert await echo_via(session) == "Echo: hi"


async def test_everything_streams_progress_over_sse(everything: Upstream) -> None:
    events: list[str] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        events.append(f"progress {progress:g}/{total:g}")

    async with legacy_session(everything.url) as session:
        result = await session.call_tool(
            "trigger-long-running-operation", {"duration": 0.3, "steps": 3}, progress_callback=on_progress
        )
        events.append("result" if text_of(result).startswith("Long running operation completed") else "?")

    assert events == ["progress 1/3", "progress 2/3", "progress 3/3", "result"]


async def test_everything_answers_posts_with_sse_and_has_no_modern_era(everything: Upstream) -> None:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": LEGACY_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    response = await raw_post(everything.url, body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["mcp-session-id"]
    [message] = response_messages(response)
    assert message["result"]["serverInfo"]["name"] == "mcp-servers/everything"

    body, headers = modern_request("server/discover")
    response = await raw_post(everything.url, body, headers)
    assert response.status_code == 400
