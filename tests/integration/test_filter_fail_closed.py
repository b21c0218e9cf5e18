"""Through `mcp-extproc up`, a hidden tool never reaches an official client, however the upstream answers.

Two upstreams behind one gateway:

- `tests.upstreams.hostile`, at one path per case, answers `tools/list` with `echo` and
  `secret_tool` in ways the official clients read and a naive filter does not (an
  integer of 5,000 digits, a byte that is not UTF-8, a string id for a number, an SSE
  stream whose last blank line is a lone CR). Each case is an `MCPServer` allowing only
  `echo`. Each test first shows the client listing `secret_tool` straight from the
  upstream (the attack is real), then through the gateway: filtered, or refused with the
  gateway's -32603, never listed.
- `tests.upstreams.pyserver --event-store` (the Python SDK server, resumable): a GET with
  `Last-Event-ID` replays a stored `tools/list` result, which must be filtered like the
  original (`delete_everything` is denied).

The TypeScript client is `@modelcontextprotocol/sdk` (from ./node_modules) run by the
`node` package's Node.js; the Python client is the SDK's `ClientSession`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import yaml

from extproc.mcp.sse import SseDecoder
from tests.agents import legacy_session
from tests.integration.conftest import PY_TOOLS, start_gateway
from tests.procs import REPO_ROOT, Proc, start_ready_server
from tests.upstreams.hostile import CASES, HIDDEN_TOOL

pytestmark = pytest.mark.integration

NODE: Final = REPO_ROOT / "node_modules/node/bin/node"
TS_SDK: Final = REPO_ROOT / "node_modules/@modelcontextprotocol/sdk/dist/esm"
UNREADABLE: Final = "the gateway could not read the upstream's answer"
LIST_TOOLS: Final = """
const { Client } = await import(`${process.env.SDK}/client/index.js`);
const { StreamableHTTPClientTransport } = await import(`${process.env.SDK}/client/streamableHttp.js`);
const client = new Client({ name: "mcp-extproc-tests", version: "0" });
const out = {};
try {
  await client.connect(new StreamableHTTPClientTransport(new URL(process.argv[2])));
  out.tools = (await client.listTools(undefined, { timeout: 5000 })).tools.map((t) => t.name);
} catch (e) {
  out.error = String((e && e.message) || e);
}
console.log(JSON.stringify(out));
process.exit(0);
"""
VERSION: Final = "2025-11-25"  # the first revision whose SDK server primes its streams for resumption


@dataclass(frozen=True)
class Setup:
    gateway: str
    hostile: str
    script: Path

    def direct(self, case: str) -> str:
        return f"{self.hostile}/{case}/mcp"

    def through(self, case: str) -> str:
        return f"{self.gateway}/hostile-{case}/mcp"


def server_doc(name: str, url: str, tools: dict[str, list[str]]) -> dict[str, Any]:
    kind = {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer"}
    return {**kind, "metadata": {"name": name}, "spec": {"url": url, **tools}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not NODE.is_file() or not TS_SDK.is_dir():
        pytest.fail(f"Node.js or the TypeScript SDK is missing under {REPO_ROOT / 'node_modules'}: run `make node`")
    tmp = tmp_path_factory.mktemp("fail-closed")
    procs: list[Proc] = []
    try:
        hostile, hostile_port = start_ready_server("tests.upstreams.hostile", name="hostile", log_dir=tmp)
        procs.append(hostile)
        resumable, resumable_port = start_ready_server(
            "tests.upstreams.pyserver", "--mode", "legacy-sse", "--event-store", name="pyserver-resumable", log_dir=tmp
        )
        procs.append(resumable)
        base = f"http://127.0.0.1:{hostile_port}"
        docs = [server_doc(f"hostile-{c}", f"{base}/{c}/mcp", {"allowedTools": ["echo"]}) for c in CASES]
        docs.append(server_doc("resumable", f"http://127.0.0.1:{resumable_port}/mcp", PY_TOOLS))
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        up, gateway, _ = start_gateway(resources, tmp)
        procs.append(up)
        script = tmp / "list-tools.mjs"
        script.write_text(LIST_TOOLS)
        yield Setup(gateway=gateway, hostile=base, script=script)
    finally:
        for proc in reversed(procs):
            proc.stop()


def ts_list(setup: Setup, url: str) -> dict[str, Any]:
    """The TypeScript SDK client's ``listTools`` against ``url``: ``{"tools": [...]}`` or ``{"error": ...}``."""
    env = {**os.environ, "SDK": TS_SDK.as_uri()}
    run = subprocess.run(
        [str(NODE), str(setup.script), url], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert run.returncode == 0, run.stderr
    out: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return out


async def py_list(url: str) -> list[str]:
    async with legacy_session(url, timeout_s=10) as session:
        return [tool.name for tool in (await session.list_tools()).tools]


@pytest.mark.parametrize("case", ["bigint", "utf8"])
def test_the_typescript_client_gets_a_refusal_for_an_answer_the_gateway_cannot_read(setup: Setup, case: str) -> None:
    assert HIDDEN_TOOL in ts_list(setup, setup.direct(case)).get("tools", [])  # what the client would list
    through = ts_list(setup, setup.through(case))
    assert "tools" not in through and UNREADABLE in through["error"], through
    assert HIDDEN_TOOL not in json.dumps(through)


def test_the_typescript_client_gets_a_result_with_a_string_id_filtered(setup: Setup) -> None:
    assert HIDDEN_TOOL in ts_list(setup, setup.direct("idtype"))["tools"]  # Number("1") answers request 1
    assert ts_list(setup, setup.through("idtype")) == {"tools": ["echo"]}
    assert ts_list(setup, setup.through("plain")) == {"tools": ["echo"]}


@pytest.mark.parametrize("case", ["idtype", "sse-cr"])
async def test_the_python_client_gets_the_list_filtered(setup: Setup, case: str) -> None:
    assert HIDDEN_TOOL in await py_list(setup.direct(case))
    assert await py_list(setup.through(case)) == ["echo"]


# -- resumption: a GET with Last-Event-ID replays a stored tools/list result ---------------------


def sse_events(body: bytes) -> list[tuple[str | None, Any]]:
    """(id, message) of every event with data."""
    return [(e.id, json.loads(e.data)) for e in SseDecoder().feed(body) if e.data]


async def test_a_replayed_tools_list_result_is_filtered_like_the_original(setup: Setup) -> None:
    url = f"{setup.gateway}/resumable/mcp"
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    init = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}
    async with httpx.AsyncClient(timeout=20) as client:
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init}
        opened = await client.post(url, headers=headers, json=initialize)
        assert opened.status_code == 200, opened.text
        session = {**headers, "mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": VERSION}
        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await client.post(url, headers=session, json=initialized)).status_code == 202

        listed = await client.post(url, headers=session, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        events = sse_events(listed.content)
        [(_, first)] = [(i, m) for i, m in events if m.get("id") == 2]
        assert HIDDEN_TOOL not in listed.text and "delete_everything" not in listed.text
        assert [t["name"] for t in first["result"]["tools"]] == ["echo", "add", "slow_count"]
        priming = next(e.id for e in SseDecoder().feed(listed.content) if e.id is not None and not e.data)

        # Resume the tools/list stream from its priming event: the upstream replays the result.
        resume = {**session, "accept": "text/event-stream", "last-event-id": priming}
        got = b""
        async with client.stream("GET", url, headers=resume) as replay:
            assert replay.status_code == 200
            async for chunk in replay.aiter_bytes():
                got += chunk
                if any(m.get("id") == 2 for _, m in sse_events(got)):
                    break
        [(_, replayed)] = [(i, m) for i, m in sse_events(got) if m.get("id") == 2]
        assert b"delete_everything" not in got
        assert [t["name"] for t in replayed["result"]["tools"]] == ["echo", "add", "slow_count"]
