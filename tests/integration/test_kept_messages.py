"""Nothing the upstream sends while the keeper holds the stream is silently dropped.

Through real Envoy and `mcp-extproc up`, against the official Python SDK server
(tests.upstreams.pyserver, legacy era, SSE). The agent initializes and never opens its
GET stream, so the keeper holds it. The tool `push_unrelated` then makes the server
send twelve log notifications and one `elicitation/create` related to no request: they
travel on the standalone stream, the keeper's. The SDK server waits for an answer to the
elicitation; the agent cannot see it, so the keeper answers with an error at once. When
the agent opens its GET stream, the twelve notifications come first, in order.

The kept messages ride the first bytes the upstream sends on the agent's stream (an
ext_proc filter cannot write to a response before the upstream does): here a
notification pushed after the GET opened.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.agents import BASE_HEADERS
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import Proc, start_pyserver

pytestmark = pytest.mark.integration

VERSION = "2025-06-18"
PUSHED = 12


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    tmp: Path = tmp_path_factory.mktemp("kept")
    procs: list[Proc] = []
    try:
        upstream, port = start_pyserver("legacy-sse", tmp / "records.jsonl")
        procs.append(upstream)
        server = {
            "apiVersion": "mcp.extproc.io/v1alpha1",
            "kind": "MCPServer",
            "metadata": {"name": "py"},
            "spec": {"url": f"http://127.0.0.1:{port}/mcp", "allowedTools": ["*"]},
        }
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump(server))
        proc, base, metrics = start_gateway(resources, tmp, "--session-key-file", str(tmp / "keys.json"))
        procs.append(proc)
        yield f"{base}/py/mcp", metrics
    finally:
        for proc in reversed(procs):
            proc.stop()


async def _post(client: httpx.AsyncClient, url: str, headers: dict[str, str], message: dict[str, Any]) -> Any:
    reply = await client.post(url, content=json.dumps(message), headers={**BASE_HEADERS, **headers})
    assert reply.status_code in (200, 202), reply.text
    if reply.status_code == 202:
        return None
    for line in reply.text.splitlines():
        if line.startswith("data: ") and '"id"' in line:
            return json.loads(line[6:])
    return reply.json()


def _call(id_: int, name: str, **arguments: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


async def test_notifications_are_kept_for_the_agent_and_unseen_server_requests_fail_fast(
    gateway: tuple[str, str],
) -> None:
    url, metrics = gateway
    async with httpx.AsyncClient(timeout=30) as client:
        params = {
            "protocolVersion": VERSION,
            "capabilities": {"elicitation": {}},
            "clientInfo": {"name": "agent", "version": "0"},
        }
        opened = await client.post(
            url,
            content=json.dumps({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}),
            headers=BASE_HEADERS,
        )
        assert opened.status_code == 200, opened.text
        headers = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": VERSION}
        await _post(client, url, headers, {"jsonrpc": "2.0", "method": "notifications/initialized"})
        assert (await _post(client, url, headers, _call(1, "push_unrelated", count=PUSHED, delay=1.0)))["result"]

        # The keeper holds the stream: the elicitation is answered for the agent, quickly.
        outcome: list[str] = []
        for _ in range(100):
            await asyncio.sleep(0.1)
            reply = await _post(client, url, headers, _call(2, "pushed_outcomes"))
            outcome = [item["text"] for item in reply["result"]["content"]]
            if outcome:
                break
        assert len(outcome) == 1 and outcome[0].startswith("error: ")
        assert "the agent is not connected to this session's stream" in outcome[0]
        assert metric_value(metrics, "mcp_extproc_keeper_messages_total", server="py", outcome="kept") == PUSHED
        assert metric_value(metrics, "mcp_extproc_keeper_messages_total", server="py", outcome="refused_request") == 1

        # The agent opens its stream; one more notification after it opened carries the kept ones.
        received: list[dict[str, Any]] = []
        stream_headers = {**headers, "accept": "text/event-stream"}
        async with client.stream("GET", url, headers=stream_headers) as stream:
            assert stream.status_code == 200
            await _post(client, url, headers, _call(3, "push_unrelated", count=1, delay=0.2))
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    received.append(json.loads(line[6:]))
                if len(received) == PUSHED + 1:
                    break
        texts = [m["params"]["data"] for m in received if m.get("method") == "notifications/message"]
        assert texts[:PUSHED] == [f"unrelated {n}" for n in range(1, PUSHED + 1)]
        assert texts[PUSHED:] == ["unrelated 1"]  # the one sent after the stream opened
        assert metric_value(metrics, "mcp_extproc_keeper_messages_total", server="py", outcome="delivered") == PUSHED
