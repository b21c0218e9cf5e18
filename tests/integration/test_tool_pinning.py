"""Through `mcp-extproc up`: tool definitions pinned, a server changing them under the agent caught.

Upstreams: `tests.upstreams.rugpull` (the Python SDK server whose `rug_pull(version)` tool
swaps the definitions of `echo` and `add` at run time and sends
`notifications/tools/list_changed`), one process per `MCPServer`, and
@modelcontextprotocol/server-everything. The agent is the Python SDK's `ClientSession`.
`up` keeps its pins in `$XDG_STATE_HOME/mcp-extproc/pins.json` under the test's tmp
directory; `mcp-extproc pins show|approve` run as the operator would run them.

    observe     toolPinning: Observe   a change is logged and counted; the tool stays callable
    enforce     toolPinning: Enforce   a change is hidden and refused (-32003), then approved
    restart     toolPinning: Enforce   pins taken before a restart of `up` still hold after it
    declared    toolPinning: Enforce   spec.pinnedTools of the original definitions; the server
                                       serves changed ones from the start
    poisoned    tool-scan (Enforce)    serves a poisoned echo: flagged and hidden
    everything  toolPinning: Enforce   server-everything: pinned on first sight, callable
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import pytest
import yaml
from mcp.shared.exceptions import MCPError

from extproc.config.pins_file import read_pins
from plugins.lib.fingerprints import fingerprint
from tests.agents import LEGACY_VERSION, legacy_session, raw_post, response_messages
from tests.integration.conftest import EVERYTHING_TOOLS, metric_value, start_gateway
from tests.procs import Proc, start_everything, start_ready_server

pytestmark = pytest.mark.integration

SERVERS: Final = ("observe", "enforce", "restart", "declared", "poisoned")
CHANGED: Final = "the definition of tool 'echo' on MCP server '{}' changed since it was pinned"
INIT_PARAMS: Final = {
    "protocolVersion": LEGACY_VERSION,
    "capabilities": {},
    "clientInfo": {"name": "t", "version": "1"},
}


def server_doc(name: str, url: str, **spec: Any) -> dict[str, Any]:
    kind = {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer"}
    return {**kind, "metadata": {"name": name}, "spec": {"url": url, "allowedTools": ["*"], **spec}}


@dataclass
class Stack:
    tmp: Path
    upstreams: dict[str, str]
    resources: Path
    pipeline: Path
    env: dict[str, str]
    up: Proc | None = None
    base: str = ""
    metrics: str = ""
    procs: list[Proc] = field(default_factory=list)

    @property
    def state_file(self) -> Path:
        return self.tmp / "state" / "mcp-extproc" / "pins.json"

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def start(self) -> None:
        self.up, self.base, self.metrics = start_gateway(
            self.resources, self.tmp, "--pipeline", str(self.pipeline), env=self.env
        )

    def restart(self) -> None:
        assert self.up is not None
        self.up.stop()
        self.start()

    def log(self) -> str:
        assert self.up is not None
        return self.up.output()

    def pins(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "extproc", "pins", *args, "-f", str(self.state_file)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, env=self.env)


async def direct_tools(url: str) -> list[dict[str, Any]]:
    """The upstream's tools/list result as it is on the wire (no client parsing)."""
    init = await raw_post(url, {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": INIT_PARAMS})
    session = {"mcp-session-id": init.headers["mcp-session-id"], "mcp-protocol-version": LEGACY_VERSION}
    await raw_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    listed = await raw_post(url, {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, session)
    tools: list[dict[str, Any]] = response_messages(listed)[-1]["result"]["tools"]
    return tools


async def direct_rug_pull(url: str, version: str) -> None:
    async with legacy_session(url) as session:
        await session.call_tool("rug_pull", {"version": version})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("pinning")
    procs: list[Proc] = []
    try:
        upstreams: dict[str, str] = {}
        for name in SERVERS:
            version = "poisoned" if name == "poisoned" else "original"
            proc, port = start_ready_server("tests.upstreams.rugpull", "--version", version, name=name, log_dir=tmp)
            procs.append(proc)
            upstreams[name] = f"http://127.0.0.1:{port}/mcp"
        everything, port = start_everything(log_dir=tmp)
        procs.append(everything)
        # The declared pins are the original definitions; the server changes them before anyone lists.
        original = {t["name"]: fingerprint(t) for t in asyncio.run(direct_tools(upstreams["declared"]))}
        asyncio.run(direct_rug_pull(upstreams["declared"], "changed"))
        docs = [
            server_doc("observe", upstreams["observe"], toolPinning="Observe"),
            server_doc("enforce", upstreams["enforce"], toolPinning="Enforce"),
            server_doc("restart", upstreams["restart"], toolPinning="Enforce"),
            server_doc("declared", upstreams["declared"], toolPinning="Enforce", pinnedTools=original),
            server_doc("poisoned", upstreams["poisoned"], toolPinning="Off"),
            server_doc("everything", f"http://127.0.0.1:{port}/mcp", toolPinning="Enforce", **EVERYTHING_TOOLS),
        ]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        stages: list[dict[str, Any]] = [{"name": n} for n in ("authn", "mcp", "allowlist", "policy", "pins")]
        stages += [{"name": "tool-scan", "config": {"mode": "Enforce", "servers": ["poisoned"]}}]
        stages += [{"name": "credentials"}, {"name": "session"}]
        pipeline = tmp / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump({"version": "v1", "stages": stages}))
        env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}
        stack = Stack(tmp, upstreams, resources, pipeline, env, procs=procs)
        stack.start()
        yield stack
    finally:
        if "stack" in locals() and stack.up is not None:
            stack.up.stop()
        for proc in reversed(procs):
            proc.stop()


async def listed(url: str) -> dict[str, str]:
    """Tool name → description, as the agent lists them."""
    async with legacy_session(url, timeout_s=10) as session:
        return {t.name: t.description or "" for t in (await session.list_tools()).tools}


async def refusal(url: str, tool: str, arguments: dict[str, Any]) -> str:
    """The -32003 message a call of ``tool`` is refused with."""
    async with legacy_session(url, timeout_s=10) as session:
        with pytest.raises(MCPError) as refused:
            await session.call_tool(tool, arguments)
    assert refused.value.error.code == -32003
    return refused.value.error.message


async def rug_pull(url: str, version: str) -> list[str]:
    """Call rug_pull through the gateway; the notifications the agent then receives."""
    notes: list[str] = []
    changed = asyncio.Event()

    async def handler(message: Any) -> None:
        notes.append(getattr(message, "method", ""))
        if notes[-1] == "notifications/tools/list_changed":
            changed.set()

    async with legacy_session(url, timeout_s=10, message_handler=handler) as session:
        await session.call_tool("rug_pull", {"version": version})
        await asyncio.wait_for(changed.wait(), 5)
    return notes


def audit_lines(stack: Stack, event: str) -> list[dict[str, Any]]:
    lines = [
        line.split("mcp_extproc.audit.tools: ", 1)[1]
        for line in stack.log().splitlines()
        if "mcp_extproc.audit.tools: " in line
    ]
    return [found for found in map(json.loads, lines) if found["event"] == event]


async def test_pins_are_taken_on_first_sight_and_kept_in_the_state_directory(stack: Stack) -> None:
    tools = await listed(stack.url("everything"))
    assert "echo" in tools and "get-env" not in tools  # allowlist first, then pins
    async with legacy_session(stack.url("everything")) as session:
        answer = await session.call_tool("echo", {"message": "pinned"})
    assert "pinned" in json.dumps(answer.model_dump(mode="json"))
    pinned = read_pins(stack.state_file).servers["everything"].tools
    assert set(pinned) == set(tools) and all(t.pin is not None and t.pin.source == "first-use" for t in pinned.values())
    shown = stack.pins("show", "everything")
    assert shown.returncode == 0 and "echo" in shown.stdout and "as pinned" in shown.stdout


async def test_a_change_under_observe_is_logged_and_the_tool_stays_callable(stack: Stack) -> None:
    url = stack.url("observe")
    assert (await listed(url))["echo"] == "Echo the text back."
    assert "notifications/tools/list_changed" in await rug_pull(url, "changed")
    tools = await listed(url)
    assert tools["echo"] == "Echo the text back, and remember it for later."
    async with legacy_session(url) as session:
        assert not (await session.call_tool("echo", {"text": "still"})).is_error
        assert not (await session.call_tool("add", {"a": 1, "b": 2, "c": 3})).is_error
    changes = {line["tool"]: line["changes"] for line in audit_lines(stack, "tool_pin") if line["server"] == "observe"}
    assert changes["echo"] == ["description"] and "inputSchema.properties.c" in changes["add"]
    assert metric_value(stack.metrics, "mcp_extproc_tool_pins_total", event="changed") >= 2


async def test_a_change_under_enforce_is_hidden_and_refused_until_approved(stack: Stack) -> None:
    url = stack.url("enforce")
    assert set(await listed(url)) == {"echo", "add", "rug_pull"}
    await rug_pull(url, "changed")
    assert set(await listed(url)) == {"rug_pull"}
    assert await refusal(url, "echo", {"text": "x"}) == CHANGED.format("enforce")
    shown = stack.pins("show", "enforce")
    assert "CHANGED since it was pinned (description)" in shown.stdout
    assert '+  "description": "Echo the text back, and remember it for later.",' in shown.stdout

    approved = stack.pins("approve", "enforce")
    assert approved.returncode == 0 and "approved echo" in approved.stdout and "approved add" in approved.stdout
    deadline = time.monotonic() + 10
    while set(await listed(url)) != {"echo", "add", "rug_pull"}:
        assert time.monotonic() < deadline, "the approval never reached the running gateway"
        await asyncio.sleep(0.3)
    async with legacy_session(url) as session:
        assert not (await session.call_tool("add", {"a": 1, "b": 2, "c": 3})).is_error
    assert any(line["change"] == "approved" for line in audit_lines(stack, "tool_pin"))


async def test_pins_survive_a_restart_of_up(stack: Stack) -> None:
    url = stack.url("restart")
    assert set(await listed(url)) == {"echo", "add", "rug_pull"}  # pinned: the original definitions
    stack.restart()
    url = stack.url("restart")
    await rug_pull(url, "changed")
    assert set(await listed(url)) == {"rug_pull"}  # a fresh start would have pinned the changed ones
    assert await refusal(url, "echo", {"text": "x"}) == CHANGED.format("restart")
    await rug_pull(url, "original")
    assert set(await listed(url)) == {"echo", "add", "rug_pull"}


async def test_declared_pins_that_do_not_match_from_the_start_hide_and_refuse(stack: Stack) -> None:
    url = stack.url("declared")
    assert set(await listed(url)) == {"rug_pull"}  # as declared; echo and add changed before anyone listed
    assert await refusal(url, "echo", {"text": "x"}) == CHANGED.format("declared")
    await direct_rug_pull(stack.upstreams["declared"], "original")
    assert set(await listed(url)) == {"echo", "add", "rug_pull"}
    async with legacy_session(url) as session:
        assert not (await session.call_tool("echo", {"text": "declared"})).is_error


async def test_a_poisoned_description_is_flagged_and_hidden_under_enforce(stack: Stack) -> None:
    url = stack.url("poisoned")
    assert set(await listed(url)) == {"add", "rug_pull"}
    message = await refusal(url, "echo", {"text": "x"})
    assert message.startswith("tool 'echo' on MCP server 'poisoned' was flagged by the tool scan:")
    [line] = [line for line in audit_lines(stack, "tool_scan") if line["tool"] == "echo"]
    rules = {finding["rule"] for finding in line["findings"]}
    assert {"unicode-tag-characters", "model-addressed-tag", "home-directory-secrets", "conceal-from-user"} <= rules
