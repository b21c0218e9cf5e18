"""One endpoint over several real MCP servers: an ``MCPVirtualServer`` through `mcp-extproc up`.

Behind ``/tools/mcp``: server-everything (TypeScript, prefix ``every_``), a Python SDK
stateful server (``py``, no prefix; it records what it receives) and a Python SDK server
in its 2026-07-28 mode (``mod``, prefix ``mod_``). ``/clash/mcp`` puts ``py`` and ``mod``
side by side without prefixes, so their tools collide. The one MCPAgent references the
virtual servers only, so the backends' own routes refuse it. Driven by the official
Python SDK client, on both protocol eras.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mcp_types as types
import pytest
import yaml
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError

from tests.agents import (
    BASE_HEADERS,
    LEGACY_VERSION,
    legacy_session,
    modern_request,
    modern_session,
    raw_post,
    response_messages,
)
from tests.integration.conftest import metric_value, resource_doc, start_gateway
from tests.procs import Proc, start_everything, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

API = "mcp.extproc.io/v1alpha1"


def virtual_doc(name: str, servers: list[dict[str, str]]) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "MCPVirtualServer", "metadata": {"name": name}, "spec": {"servers": servers}}


@dataclass
class Stack:
    base: str
    metrics: str
    every_url: str
    py_record: Path
    procs: dict[str, Proc]
    tmp: Path
    resources: Path

    def url(self, name: str) -> str:
        return f"{self.base}/{name}/mcp"

    def py_calls(self) -> list[str]:
        return [
            r["body"]["params"]["name"]
            for r in read_records(self.py_record)
            if isinstance(r["body"], dict) and r["body"].get("method") == "tools/call"
        ]


def _start(tmp: Path) -> Stack:
    procs: dict[str, Proc] = {}
    try:
        every, every_port = start_everything(log_dir=tmp)
        procs["every"] = every
        py_record = tmp / "py.jsonl"
        procs["py"], py_port = start_pyserver("legacy-sse", py_record)
        procs["mod"], mod_port = start_pyserver("modern", tmp / "mod.jsonl")
        docs = [
            resource_doc("every", every_port, {"allowedTools": ["*"], "deniedTools": ["get-env"]}),
            resource_doc("py", py_port, {"allowedTools": ["*"], "deniedTools": ["delete_*"]}),
            resource_doc("mod", mod_port, {"allowedTools": ["*"]}),
            virtual_doc(
                "tools", [{"name": "every", "prefix": "every_"}, {"name": "py"}, {"name": "mod", "prefix": "mod_"}]
            ),
            virtual_doc("clash", [{"name": "py"}, {"name": "mod"}]),
            {
                "apiVersion": API,
                "kind": "MCPAgent",
                "metadata": {"name": "agent"},
                "spec": {
                    "mcpServerRefs": [
                        {"kind": "MCPVirtualServer", "name": "tools"},
                        {"kind": "MCPVirtualServer", "name": "clash"},
                    ]
                },
            },
        ]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        procs["up"], base, metrics = start_gateway(resources, tmp)
    except BaseException:
        for proc in procs.values():
            proc.stop()
        raise
    return Stack(base, metrics, f"http://127.0.0.1:{every_port}/mcp", py_record, procs, tmp, resources)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    found = _start(tmp_path_factory.mktemp("virtual"))
    yield found
    for proc in reversed(found.procs.values()):
        proc.stop()


@pytest.fixture
def own_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own, for tests that kill or restart parts of it."""
    found = _start(tmp_path)
    yield found
    for proc in reversed(found.procs.values()):
        proc.stop()


async def _sampling(context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
    asked = params.messages[0].content
    text = asked.text if isinstance(asked, types.TextContent) else "?"
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(type="text", text=f"sampled: {text}"), model="test-model"
    )


async def _elicitation(context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
    return types.ElicitResult(action="accept", content={"name": "Ada", "check": True, "color": "red"})


async def _tools(session: ClientSession) -> dict[str, dict[str, Any]]:
    listed = await session.list_tools()
    return {t.name: t.model_dump(by_alias=True, exclude_none=True) for t in listed.tools}


def _text(result: types.CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, types.TextContent))


async def test_the_merged_list_is_every_backends_tools_prefixed_and_otherwise_unchanged(stack: Stack) -> None:
    async with legacy_session(stack.url("tools")) as session:
        merged = await _tools(session)
    async with legacy_session(stack.every_url) as session:
        direct = await _tools(session)
    every = {name.removeprefix("every_"): tool for name, tool in merged.items() if name.startswith("every_")}
    # server-everything's own list, less the tool its MCPServer denies; each object as it sent it
    assert set(every) == set(direct) - {"get-env"}
    for name, tool in every.items():
        assert {**tool, "name": name} == direct[name]
    assert {"echo", "add", "slow_count"} <= set(merged)  # py, unprefixed
    assert "delete_everything" not in merged  # denied by py's own deniedTools
    assert {"mod_echo", "mod_add", "mod_delete_everything"} <= set(merged)  # mod allows every tool
    assert any("outputSchema" in tool for tool in every.values())  # structured output survives the merge


async def test_calls_reach_each_backend_with_its_own_tool_name(stack: Stack) -> None:
    async with legacy_session(stack.url("tools")) as session:
        assert _text(await session.call_tool("every_echo", {"message": "hi"})) == "Echo: hi"
        assert _text(await session.call_tool("echo", {"text": "to py"})) == "to py"
        assert _text(await session.call_tool("mod_add", {"a": 2, "b": 40})) == "42"
    assert "echo" in stack.py_calls()


async def test_a_denied_tool_is_hidden_and_refused_before_its_server_sees_it(stack: Stack) -> None:
    async with legacy_session(stack.url("tools")) as session:
        assert "delete_everything" not in await _tools(session)
        with pytest.raises(MCPError, match="tool 'delete_everything' is not allowed on MCP server 'py'"):
            await session.call_tool("delete_everything", {})
        with pytest.raises(MCPError, match="tool 'get-env' is not allowed on MCP server 'every'"):
            await session.call_tool("every_get-env", {})
    assert "delete_everything" not in stack.py_calls()


async def test_progress_streams_through_from_the_backend(stack: Stack) -> None:
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with legacy_session(stack.url("tools")) as session:
        result = await session.call_tool("slow_count", {"steps": 3, "delay": 0.05}, progress_callback=on_progress)
        assert _text(result) == "counted to 3"
        assert len(seen) == 3
        seen.clear()
        args = {"duration": 0.3, "steps": 3}
        await session.call_tool("every_trigger-long-running-operation", args, progress_callback=on_progress)
        assert len(seen) == 3


async def test_sampling_and_elicitation_round_trips_reach_the_server_that_asked(stack: Stack) -> None:
    async with legacy_session(
        stack.url("tools"), sampling_callback=_sampling, elicitation_callback=_elicitation
    ) as session:
        tools = await _tools(session)
        assert "every_trigger-sampling-request" in tools  # offered: the client declared sampling
        sampled = await session.call_tool("every_trigger-sampling-request", {"prompt": "two backends"})
        assert "sampled: Resource trigger-sampling-request context: two backends" in _text(sampled)
        elicited = await session.call_tool("every_trigger-elicitation-request", {})
        assert "Ada" in json.dumps(elicited.model_dump(mode="json"))


async def test_prompts_and_resources_are_merged_and_read_through_their_prefix(stack: Stack) -> None:
    async with legacy_session(stack.url("tools")) as session:
        prompts = [p.name for p in (await session.list_prompts()).prompts]
        assert "every_simple-prompt" in prompts
        got = await session.get_prompt("every_simple-prompt")
        assert got.messages
        resources = [str(r.uri) for r in (await session.list_resources()).resources]
        assert resources and all(uri.startswith("every+") for uri in resources)
        read = await session.read_resource(resources[0])
        assert read.contents and str(read.contents[0].uri) == resources[0].removeprefix("every+")


async def test_the_modern_era_merges_and_routes_without_sessions(stack: Stack) -> None:
    async with modern_session(stack.url("tools")) as session:
        tools = await _tools(session)
        # server-everything has no 2026-07-28: it contributes nothing rather than something false
        assert not any(name.startswith("every_") for name in tools)
        assert {"echo", "mod_echo"} <= set(tools)
        assert _text(await session.call_tool("mod_echo", {"text": "modern"})) == "modern"
        assert _text(await session.call_tool("echo", {"text": "modern py"})) == "modern py"


async def test_names_no_backend_owns_get_errors_with_the_request_id_and_nothing_is_forwarded(stack: Stack) -> None:
    async with legacy_session(stack.url("tools")) as session:
        for name in ("every_no_such_tool", "no_such_tool"):
            with pytest.raises(MCPError, match=f"no MCP server behind virtual server 'tools' has the tool '{name}'"):
                await session.call_tool(name, {})
        with pytest.raises(MCPError, match="has the resource 'nobody://x'"):
            await session.read_resource("nobody://x")
    assert "no_such_tool" not in stack.py_calls()


async def test_colliding_names_are_hidden_and_refused_naming_both_servers(stack: Stack) -> None:
    before = metric_value(stack.metrics, "mcp_extproc_virtual_events_total", virtual="clash", event="conflict")
    async with legacy_session(stack.url("clash")) as session:
        tools = await _tools(session)
        assert "echo" not in tools and "add" not in tools  # both py and mod have them
        assert "push_unrelated" not in tools  # so is every other tool of theirs
        with pytest.raises(MCPError, match="MCP servers 'py' and 'mod' both provide it"):
            await session.call_tool("echo", {"text": "which one?"})
    assert metric_value(stack.metrics, "mcp_extproc_virtual_events_total", virtual="clash", event="conflict") > before


async def test_the_agent_reaches_the_backends_only_through_its_virtual_server(stack: Stack) -> None:
    async with httpx.AsyncClient() as client:
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
        direct = await client.post(stack.url("py"), json=body, headers=BASE_HEADERS)
        assert direct.status_code == 403
        assert "does not reference MCPServer 'py'" in direct.text
        virtual = await client.post(stack.url("tools"), json=body, headers=BASE_HEADERS)
        assert virtual.status_code == 200
        assert response_messages(virtual)[0]["result"]["serverInfo"]["name"] == "tools"


async def test_a_routing_header_from_the_agent_routes_nothing(stack: Stack) -> None:
    async with legacy_session(stack.url("tools"), headers={"x-mcp-backend": "py"}) as session:
        # every_echo still goes to server-everything, which answers "Echo: ..."; py has no such tool
        assert _text(await session.call_tool("every_echo", {"message": "spoof"})) == "Echo: spoof"


async def test_a_session_id_not_issued_for_the_virtual_server_is_refused(stack: Stack) -> None:
    headers = {**BASE_HEADERS, "mcp-session-id": "not-ours", "mcp-protocol-version": LEGACY_VERSION}
    body = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
    reply = await raw_post(stack.url("tools"), body, headers=headers)
    assert reply.status_code == 404
    assert response_messages(reply)[0]["id"] == 7


async def test_a_backend_that_dies_leaves_the_others_working_and_its_calls_get_a_clear_error(own_stack: Stack) -> None:
    async with legacy_session(own_stack.url("tools")) as session:
        assert "mod_echo" in await _tools(session)
        own_stack.procs["mod"].stop()
        tools = await _tools(session)
        assert "mod_echo" not in tools and "every_echo" in tools and "echo" in tools
        assert _text(await session.call_tool("echo", {"text": "still here"})) == "still here"
        with pytest.raises(MCPError, match="MCP server 'mod' behind virtual server 'tools' could not be reached"):
            await session.call_tool("mod_echo", {"text": "anyone?"})


async def test_a_session_survives_a_restart_of_up(own_stack: Stack) -> None:
    async with legacy_session(own_stack.url("tools")) as session:
        assert _text(await session.call_tool("echo", {"text": "before"})) == "before"
        own_stack.procs["up"].stop()
        port = own_stack.base.rsplit(":", 1)[1]
        own_stack.procs["up"], _, _ = start_gateway(own_stack.resources, own_stack.tmp, "--listen", f"127.0.0.1:{port}")
        # The same client, the same session id: the backend sessions are opened again.
        assert _text(await session.call_tool("echo", {"text": "after"})) == "after"
        assert _text(await session.call_tool("every_echo", {"message": "after"})) == "Echo: after"


async def test_the_clients_get_stream_carries_what_a_backend_sends_unasked_and_answers_reach_it(stack: Stack) -> None:
    """The SDK client opens its GET stream on the virtual server: py's log notifications and its
    elicitation (related to no request, so on py's own standalone stream) reach the client, whose
    answer goes back to py."""
    logged: list[str] = []

    async def log_message(params: types.LoggingMessageNotificationParams) -> None:
        logged.append(str(params.data))

    async with legacy_session(
        stack.url("tools"), elicitation_callback=_elicitation, logging_callback=log_message
    ) as session:
        assert _text(await session.call_tool("push_unrelated", {"count": 3, "delay": 0.5})) == "scheduled"
        for _ in range(100):
            outcomes = _text(await session.call_tool("pushed_outcomes", {}))
            if "answered" in outcomes or "error" in outcomes:
                break
            await asyncio.sleep(0.1)
        assert "answered: accept" in outcomes, outcomes
        assert [m for m in logged if m.startswith("unrelated")] == ["unrelated 1", "unrelated 2", "unrelated 3"]


async def test_subscriptions_listen_is_merged_and_carries_a_backends_list_changed(stack: Stack) -> None:
    """2026-07-28: one listen stream on the virtual server; every backend is asked and those that
    speak 2026-07-28 (mod) acknowledge; the acknowledgement and every notification carry the
    client's subscription id (not the gateway's own request ids); mod's tools/list_changed
    (its announce_change tool) comes through."""
    body, headers = modern_request("subscriptions/listen", {"notifications": {"toolsListChanged": True}}, "listen-7")
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream("POST", stack.url("tools"), json=body, headers={**BASE_HEADERS, **headers}) as stream,
    ):
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        events = stream.aiter_lines()

        async def next_message() -> dict[str, Any]:
            async for line in events:
                if line.startswith("data:"):
                    return dict(json.loads(line[5:]))
            raise AssertionError("the listen stream ended")

        ack = await asyncio.wait_for(next_message(), 20)
        assert ack["method"] == "notifications/subscriptions/acknowledged"
        assert ack["params"]["notifications"] == {"toolsListChanged": True}
        assert ack["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-7"
        async with modern_session(stack.url("tools")) as session:
            assert _text(await session.call_tool("mod_announce_change", {})) == "announced"
        changed = await asyncio.wait_for(next_message(), 20)
        assert changed["method"] == "notifications/tools/list_changed"
        assert changed["params"]["_meta"]["io.modelcontextprotocol/subscriptionId"] == "listen-7"
