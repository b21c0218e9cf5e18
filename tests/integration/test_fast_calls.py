"""The ``auto`` front door through real Envoy: a tools/call is one ext_authz Check, and no less safe.

Two gateways (``mcp-extproc up``) share the same resources, the same four stages
(mcp, allowlist, policy, credentials: no stage reads a tools/call response, so both
eras take the fast route) and the same two SDK upstreams (legacy, recording, and
2026-07-28): one with the default front door ``auto``, one with ``--front-door
ext_proc``. The fast path must decide exactly as the ext_proc path does: a request
the ext_proc gateway keeps from the upstream, the auto gateway must keep from it too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp_types import PROTOCOL_VERSION_META_KEY

from tests.agents import legacy_session, modern_request, raw_post, response_messages
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import Proc, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

UPSTREAM_TOKEN = "fast-path-upstream-token"
AGENT_TOKEN = "agent-token-never-forwarded"
LEGACY_VERSION = "2025-06-18"
REGO = """package mcp
import rego.v1
default allow := true
allow := false if { input.tool == "echo"; input.arguments.text == "forbidden" }
"""


@dataclass
class Gateway:
    base: str
    metrics: str

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def checks(self) -> float:
        return metric_value(self.metrics, "mcp_extproc_phases_total", phase="check")


@dataclass
class Setup:
    auto: Gateway
    ext_proc: Gateway
    records: dict[str, Path]

    def received(self, server: str) -> list[dict[str, Any]]:
        return [dict(r) for r in read_records(self.records[server])]


def _documents(ports: dict[str, int]) -> list[dict[str, Any]]:
    api = "mcp.extproc.io/v1alpha1"
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": api,
            "kind": "MCPServer",
            "metadata": {"name": name},
            "spec": {
                "url": f"http://127.0.0.1:{port}/mcp",
                "allowedTools": ["echo", "add"],
                "upstreamAuth": {"bearer": {"secretRef": {"name": "upstream", "key": "token"}}},
            },
        }
        for name, port in ports.items()
    ]
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "upstream"},
            "stringData": {"token": UPSTREAM_TOKEN},
        }
    )
    docs.append(
        {
            "apiVersion": api,
            "kind": "MCPToolPolicy",
            "metadata": {"name": "no-forbidden-echo"},
            "spec": {
                "targetRefs": [{"kind": "MCPServer", "name": name} for name in ports],
                "rego": {"query": "data.mcp.allow", "module": REGO},
            },
        }
    )
    return docs


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("fast-calls")
    procs: list[Proc] = []
    try:
        records = {"legacy": tmp / "legacy.jsonl", "modern": tmp / "modern.jsonl"}
        ports = {}
        for name, mode in (("legacy", "legacy-json"), ("modern", "modern")):
            proc, ports[name] = start_pyserver(mode, records[name])  # type: ignore[arg-type]
            procs.append(proc)
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(_documents(ports), sort_keys=False))
        pipeline = tmp / "pipeline.yaml"
        stages = [{"name": n} for n in ("mcp", "allowlist", "policy", "credentials")]
        pipeline.write_text(yaml.safe_dump({"version": "v1", "stages": stages}))
        gateways = []
        for door in ("auto", "ext_proc"):
            proc, base, metrics = start_gateway(resources, tmp, "--pipeline", str(pipeline), "--front-door", door)
            procs.append(proc)
            gateways.append(Gateway(base, metrics))
        yield Setup(gateways[0], gateways[1], records)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _legacy_call(tool: str, arguments: dict[str, Any], id: int = 7) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}
    return body, {"mcp-protocol-version": LEGACY_VERSION}


def test_legacy_sdk_session_calls_take_one_check_with_the_upstream_credential(setup: Setup) -> None:
    async def run() -> str:
        headers = {"authorization": f"Bearer {AGENT_TOKEN}"}
        async with legacy_session(setup.auto.url("legacy"), headers=headers) as session:
            before = setup.auto.checks()
            result = await session.call_tool("echo", {"text": "through the fast path"})
            assert setup.auto.checks() == before + 1  # the call was one Check, nothing else
            first = result.content[0]
            return first.text if hasattr(first, "text") else ""

    assert asyncio.run(run()) == "through the fast path"
    calls = [
        r for r in setup.received("legacy") if isinstance(r["body"], dict) and r["body"].get("method") == "tools/call"
    ]
    assert calls, "the upstream never saw the call"
    assert calls[-1]["headers"]["authorization"] == f"Bearer {UPSTREAM_TOKEN}"
    assert all(AGENT_TOKEN not in json.dumps(r["headers"]) for r in setup.received("legacy"))
    # The HTTP authorization service's answer leaks nothing of its own upstream.
    leaked = {"server", "method", "tool", "decision", "x-envoy-auth-headers-to-remove"} & set(calls[-1]["headers"])
    assert not leaked
    assert calls[-1]["headers"]["x-mcp-tool"] == "echo"


def test_modern_call_takes_one_check(setup: Setup) -> None:
    body, headers = modern_request("tools/call", {"name": "add", "arguments": {"a": 2, "b": 3}})
    before = setup.auto.checks()
    response = asyncio.run(raw_post(setup.auto.url("modern"), body, {**headers, "authorization": "Bearer x"}))
    assert response.status_code == 200, response.text
    assert response_messages(response)[0]["result"]["content"][0]["text"] == "5"
    assert setup.auto.checks() == before + 1
    last = setup.received("modern")[-1]
    assert last["headers"]["authorization"] == f"Bearer {UPSTREAM_TOKEN}"


@pytest.mark.parametrize("era", ["legacy", "modern"])
@pytest.mark.parametrize(
    ("tool", "arguments", "code"),
    [("delete_everything", {}, -32003), ("echo", {"text": "forbidden"}, -32003)],
    ids=["allowlist", "rego-on-arguments"],
)
def test_refusals_on_the_fast_route(setup: Setup, era: str, tool: str, arguments: dict[str, Any], code: int) -> None:
    if era == "modern":
        body, headers = modern_request("tools/call", {"name": tool, "arguments": arguments}, id=7)
    else:
        body, headers = _legacy_call(tool, arguments)
    seen = len(setup.received(era))
    before = setup.auto.checks()
    response = asyncio.run(raw_post(setup.auto.url(era), body, headers))
    reply = response.json()
    assert reply["id"] == 7
    assert reply["error"]["code"] == code, reply
    assert setup.auto.checks() == before + 1
    assert len(setup.received(era)) == seen, "the upstream saw a refused call"


def _corpus() -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(name, server, raw body, headers): requests meant to make Envoy's parser and ours disagree."""
    modern_body, modern_headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
    meta = modern_body["params"]["_meta"]
    legacy = {"mcp-protocol-version": LEGACY_VERSION}
    call = '"jsonrpc":"2.0","id":3,"method":"tools/call"'
    return [
        # Envoy's parser keeps the last copy of a repeated key; ours refuses the body.
        (
            "repeated name",
            "legacy",
            f'{{{call},"params":{{"name":"delete_everything","name":"echo"}}}}'.encode(),
            legacy,
        ),
        (
            "repeated method",
            "legacy",
            b'{"jsonrpc":"2.0","id":3,"method":"tools/list","method":"tools/call","params":{"name":"echo"}}',
            legacy,
        ),
        (
            "escaped allowed name",
            "legacy",
            f'{{{call},"params":{{"name":"ech\\u006f","arguments":{{"text":"a"}}}}}}'.encode(),
            legacy,
        ),
        (
            "escaped refused name",
            "legacy",
            f'{{{call},"params":{{"name":"delete_everythin\\u0067"}}}}'.encode(),
            legacy,
        ),
        # A 2026-07-28 body without its headers: routed as legacy by Envoy, modern by us.
        ("modern body, legacy headers", "modern", json.dumps(modern_body).encode(), legacy),
        # Headers say tools/call, the body is something else.
        (
            "header says call, body lists",
            "modern",
            json.dumps({**modern_body, "method": "tools/list", "params": {"_meta": meta}}).encode(),
            modern_headers,
        ),
        ("header says call, empty body", "modern", b"", modern_headers),
        (
            "batch with a refused call",
            "legacy",
            json.dumps(
                [{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "delete_everything"}}]
            ).encode(),
            {"mcp-protocol-version": "2025-03-26"},
        ),
        (
            "meta version only",
            "legacy",
            json.dumps(
                {**modern_body, "params": {"name": "echo", "_meta": {PROTOCOL_VERSION_META_KEY: "2026-07-28"}}}
            ).encode(),
            legacy,
        ),
    ]


@pytest.mark.parametrize("case", _corpus(), ids=lambda case: case[0])
def test_fast_path_never_forwards_what_ext_proc_refuses(
    setup: Setup, case: tuple[str, str, bytes, dict[str, str]]
) -> None:
    _name, server, body, headers = case

    def forwarded(gateway: Gateway) -> tuple[bool, str]:
        seen = len(setup.received(server))
        response = asyncio.run(raw_post(gateway.url(server), body, headers))
        return len(setup.received(server)) > seen, f"{response.status_code} {response.text}"

    by_ext_proc, ext_proc_answer = forwarded(setup.ext_proc)
    by_auto, auto_answer = forwarded(setup.auto)
    if not by_ext_proc:
        assert not by_auto, f"auto forwarded what ext_proc refused: {ext_proc_answer}"
        assert '"error"' in auto_answer, auto_answer  # refused with a JSON-RPC error, not dropped
