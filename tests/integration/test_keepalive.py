"""The session keeper through real Envoy, against a heartbeating server.

The heartbeat server (tests.upstreams.heartbeat) pings every second on the session's
GET stream once one was opened, and closes the session when a ping stays unanswered
for 2 s. The agent here is a plain HTTP client that opens the GET stream once, answers
the first ping it sees, drops the stream, and then goes quiet, as a request/response
agent behind a proxy that cut its stream would.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from tests.agents import BASE_HEADERS, modern_session
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import Proc, start_pyserver, start_ready_server
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

VERSION = "2025-06-18"
IDLE_S = 10.0
BEARER = "keeper-upstream-token"


@dataclass
class Setup:
    base: str
    metrics: str
    heartbeat: str
    modern_records: Path
    gateway: Proc

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(self.metrics, name, **labels)

    async def session(self, session_id: str) -> dict[str, Any]:
        """The heartbeat server's state of the session the agent knows as ``session_id``
        (the gateway's signed id: its ``sid`` claim is the upstream's own)."""
        upstream_id = jwt.decode(session_id, options={"verify_signature": False})["sid"]
        async with httpx.AsyncClient() as client:
            found: list[dict[str, Any]] = (await client.get(f"{self.heartbeat}/admin/sessions")).json()
        return next(s for s in found if s["id"] == upstream_id)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("keepalive")
    procs: list[Proc] = []
    try:
        heartbeat, port = start_ready_server(
            "tests.upstreams.heartbeat", "--interval", "1", "--timeout", "2", name="heartbeat", log_dir=tmp
        )
        procs.append(heartbeat)
        records = tmp / "modern.jsonl"
        modern, modern_port = start_pyserver("modern", records)
        procs.append(modern)
        url = f"http://127.0.0.1:{port}/mcp"
        auth = {"bearer": {"secretRef": {"name": "hb", "key": "token"}}}
        docs: list[dict[str, Any]] = [
            _server("hb", {"url": url, "upstreamAuth": auth}),
            _server("hbnever", {"url": url, "keepalive": "Never"}),
            _server("modern", {"url": f"http://127.0.0.1:{modern_port}/mcp"}),
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hb"}, "stringData": {"token": BEARER}},
        ]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        gateway, base, metrics = start_gateway(resources, tmp)
        procs.append(gateway)
        yield Setup(base, metrics, f"http://127.0.0.1:{port}", records, gateway)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _server(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"allowedTools": ["*"], **spec},
    }


class Agent:
    """A hand-driven legacy-era agent: every request explicit, nothing in the background."""

    def __init__(self, client: httpx.AsyncClient, url: str) -> None:
        self.client = client
        self.url = url
        self.headers: dict[str, str] = {}
        self.next_id = 1

    async def initialize(self) -> str:
        params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": "agent", "version": "0"}}
        reply = await self.post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params})
        assert reply.status_code == 200, reply.text
        session_id = reply.headers["mcp-session-id"]
        self.headers = {"mcp-session-id": session_id, "mcp-protocol-version": VERSION}
        note = await self.post({"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert note.status_code == 202, note.text
        return session_id

    async def post(self, message: dict[str, Any]) -> httpx.Response:
        headers = {**BASE_HEADERS, **self.headers, "authorization": "Bearer agent-token"}
        return await self.client.post(self.url, content=json.dumps(message), headers=headers)

    async def call_echo(self, text: str) -> httpx.Response:
        self.next_id += 1
        params = {"name": "echo", "arguments": {"text": text}}
        return await self.post({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call", "params": params})

    @asynccontextmanager
    async def get_stream(self) -> AsyncIterator[httpx.Response]:
        headers = {**self.headers, "accept": "text/event-stream"}
        async with self.client.stream("GET", self.url, headers=headers) as reply:
            yield reply

    async def drop_at_first_ping(self, reply: httpx.Response) -> list[str]:
        """Read the stream until a ping (or the gateway's note that it answered one) arrives;
        return the lines read. The caller then drops the stream without answering."""
        lines: list[str] = []
        async for line in reply.aiter_lines():
            lines.append(line)
            if line.startswith(":") and "answered a ping" in line:
                return lines
            if line.startswith("data:") and json.loads(line[5:]).get("method") == "ping":
                return lines
        return lines

    async def answer_first_ping(self, reply: httpx.Response) -> None:
        """Read the stream until a ping arrives, answer it like an SDK client would."""
        async for line in reply.aiter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("method") == "ping":
                    pong = await self.post({"jsonrpc": "2.0", "id": message["id"], "result": {}})
                    assert pong.status_code == 202
                    return


async def until(check: Callable[[], Any], deadline_s: float = 10.0) -> None:
    """Poll an async predicate until it holds (or fail at the deadline)."""
    end = time.monotonic() + deadline_s
    while not await check():
        assert time.monotonic() < end, "condition not met before the deadline"
        await asyncio.sleep(0.05)


async def test_keeper_keeps_a_session_whose_agent_dropped_its_stream_with_a_ping_unanswered(setup: Setup) -> None:
    """The agent's own stream carries a ping; the agent drops the stream without answering.
    The gateway answered that ping itself (and showed the agent a comment instead), so the
    server's 2 s ping timeout never fires."""
    async with httpx.AsyncClient(timeout=30) as client:
        agent = Agent(client, setup.url("hb"))
        session_id = await agent.initialize()

        async def keeper_holds(gets: int) -> bool:
            state = await setup.session(session_id)
            return bool(state["stream_open"] and state["gets"] == gets)

        await until(lambda: keeper_holds(1))  # the keeper opened the session's GET stream
        async with agent.get_stream() as stream:
            assert stream.status_code == 200  # the keeper stepped aside: no 409
            seen = await agent.drop_at_first_ping(stream)
        assert not any(line.startswith("data:") for line in seen), seen  # the ping never reached the agent
        await until(lambda: keeper_holds(3))  # the agent's stream was #2; the keeper took over
        await asyncio.sleep(IDLE_S)  # the agent goes quiet; the server keeps pinging
        reply = await agent.call_echo("still here")
    assert reply.status_code == 200, reply.text
    assert reply.json()["result"]["content"][0]["text"] == "still here"
    state = await setup.session(session_id)
    assert state["closed"] is None
    # (The server may have answered a 409 while one stream was being handed over; the
    # agent never sees one: Envoy retries its GET, and the keeper reconnects.)
    assert state["pongs"] >= IDLE_S - 1
    # The keeper's GETs and pongs carry the upstream credential, never the agent's.
    assert state["authorizations"] == [f"Bearer {BEARER}"]
    assert setup.metric("mcp_extproc_keeper_pings_answered_total", server="hb") >= IDLE_S - 2
    # One line per ping answered would flood the log (and httpx writes whole URLs).
    assert "HTTP Request:" not in setup.gateway.output()


async def test_without_keepalive_the_session_is_reaped(setup: Setup) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        agent = Agent(client, setup.url("hbnever"))
        session_id = await agent.initialize()
        async with agent.get_stream() as stream:
            assert stream.status_code == 200
            await agent.answer_first_ping(stream)

        async def closed() -> bool:
            return bool((await setup.session(session_id))["closed"] == "ping timeout")

        await until(closed, IDLE_S)
        reply = await agent.call_echo("anyone?")
    assert reply.status_code == 404
    # A tools/call takes the fast route (no response phase): the server's own 404, with the id.
    assert reply.json()["error"]["message"] == "Session not found" and reply.json()["id"] == agent.next_id
    assert (await setup.session(session_id))["gets"] == 1  # nobody but the agent ever opened a stream


async def test_delete_stops_the_keeper(setup: Setup) -> None:
    stopped = setup.metric("mcp_extproc_keeper_sessions_stopped_total", reason="delete")
    lost = setup.metric("mcp_extproc_keeper_sessions_lost_total", server="hb")
    async with httpx.AsyncClient(timeout=30) as client:
        agent = Agent(client, setup.url("hb"))
        session_id = await agent.initialize()

        async def holding() -> bool:
            return bool((await setup.session(session_id))["stream_open"])

        await until(holding)
        headers = {**agent.headers, "authorization": "Bearer agent-token"}
        reply = await client.delete(agent.url, headers=headers)
    assert reply.status_code == 200
    assert setup.metric("mcp_extproc_keeper_sessions_stopped_total", reason="delete") == stopped + 1
    state = await setup.session(session_id)
    assert state["closed"] == "deleted" and not state["stream_open"]
    assert state["gets"] == 1  # the keeper did not come back after the DELETE
    assert setup.metric("mcp_extproc_keeper_sessions_lost_total", server="hb") == lost


async def test_modern_requests_are_never_kept(setup: Setup) -> None:
    kept = setup.metric("mcp_extproc_keeper_sessions")
    async with modern_session(setup.url("modern")) as session:
        result = await session.call_tool("echo", {"text": "stateless"})
    assert not result.is_error
    assert setup.metric("mcp_extproc_keeper_sessions") == kept
    methods = {r["method"] for r in read_records(setup.modern_records)}
    assert methods == {"POST"}  # no keeper GET, no ping answers


async def test_a_call_on_the_fast_route_keeps_the_session_again_after_an_idle_expiry(tmp_path: Path) -> None:
    # Its own heartbeat server (slow to give up on a session) and a gateway whose keeper
    # lets sessions go after 1 s idle. A tools/call takes the auto front door's fast route
    # (one ext_authz Check, no response phase), so the keeper must restart from the request.
    heartbeat, port = start_ready_server(
        "tests.upstreams.heartbeat", "--interval", "1", "--timeout", "60", name="heartbeat-slow", log_dir=tmp_path
    )
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(_server("hb", {"url": f"http://127.0.0.1:{port}/mcp"})))
    stages: list[dict[str, Any]] = [{"name": n} for n in ("authn", "mcp", "allowlist", "policy", "credentials")]
    stages.append({"name": "session", "config": {"idleTimeoutSeconds": 1}})
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"version": "v1", "stages": stages}))
    gateway, base, metrics = start_gateway(resources, tmp_path, "--pipeline", str(pipeline))
    admin = f"http://127.0.0.1:{port}/admin/sessions"
    try:
        async with httpx.AsyncClient(timeout=30) as client:

            async def state() -> dict[str, Any]:
                upstream_id = jwt.decode(session_id, options={"verify_signature": False})["sid"]
                found: list[dict[str, Any]] = (await client.get(admin)).json()
                return next(s for s in found if s["id"] == upstream_id)

            agent = Agent(client, f"{base}/hb/mcp")
            session_id = await agent.initialize()

            async def kept_then_dropped() -> bool:
                return metric_value(metrics, "mcp_extproc_keeper_sessions_stopped_total", reason="idle") >= 1

            await until(kept_then_dropped)
            assert (await state())["gets"] == 1 and not (await state())["stream_open"]
            checks = metric_value(metrics, "mcp_extproc_phases_total", phase="check")
            reply = await agent.call_echo("back again")
            assert reply.status_code == 200, reply.text
            assert metric_value(metrics, "mcp_extproc_phases_total", phase="check") == checks + 1

            async def kept_again() -> bool:
                current = await state()
                return bool(current["gets"] == 2 and current["stream_open"])

            await until(kept_again)
    finally:
        gateway.stop()
        heartbeat.stop()
