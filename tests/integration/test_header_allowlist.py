"""What the upstream receives through real Envoy, on every front door: the allow-list, never the agent's credentials.

Data flow: one recording SDK upstream (:mod:`tests.upstreams.pyserver`) behind three
``mcp-extproc up`` gateways, ``--front-door ext_proc``, ``--front-door ext_authz`` and the
default ``auto`` (whose ``tools/call`` is one ext_authz Check over HTTP: the fast route).
The ``MCPServer`` injects a static upstream bearer and names ``x-tenant`` in
``forwardHeaders``. Agents send ``Cookie``, ``Proxy-Authorization``, ``X-Api-Key``,
``X-Auth-Token``, ``X-Forwarded-Authorization``, ``Authentication``, a custom header and
``x-tenant`` (a value unique to each test, which also finds the test's records) on a
hand-made 2026-07-28 ``tools/call`` and on a whole legacy SDK session (initialize, GET
stream, calls, DELETE). Before the fix every one of them but ``Authorization`` reached
the upstream.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agents import legacy_session, modern_request, raw_post, response_messages
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import Proc, start_pyserver
from tests.upstreams.pyserver import Record, read_records

pytestmark = pytest.mark.integration

TOKEN = "allow-list-upstream-token"
AGENT_CREDENTIALS = {
    "authorization": "Bearer agent-token-never-forwarded",
    "cookie": "session=agent-cookie",
    "proxy-authorization": "Basic YWdlbnQ6cHJveHk=",
    "x-api-key": "agent-api-key",
    "x-auth-token": "agent-auth-token",
    "x-forwarded-authorization": "Bearer agent-forwarded-token",
    "authentication": "agent-authentication",
    "x-custom-thing": "not-for-the-upstream",
}
DOORS = ("ext_proc", "ext_authz", "auto")


@dataclass
class Setup:
    gateways: dict[str, tuple[str, str]]
    records: Path

    def url(self, door: str) -> str:
        return f"{self.gateways[door][0]}/hdr/mcp"

    def checks(self, door: str) -> float:
        return metric_value(self.gateways[door][1], "mcp_extproc_phases_total", phase="check")

    def received(self, tenant: str) -> list[Record]:
        return [r for r in read_records(self.records) if r["headers"].get("x-tenant") == tenant]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("header-allowlist")
    procs: list[Proc] = []
    try:
        records = tmp / "upstream.jsonl"
        upstream, port = start_pyserver("legacy-sse", records)
        procs.append(upstream)
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPServer",
                "metadata": {"name": "hdr"},
                "spec": {
                    "url": f"http://127.0.0.1:{port}/mcp",
                    "allowedTools": ["echo", "add", "slow_count"],
                    "forwardHeaders": ["X-Tenant"],
                    "upstreamAuth": {"bearer": {"secretRef": {"name": "upstream", "key": "token"}}},
                },
            },
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "upstream"}, "stringData": {"token": TOKEN}},
        ]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        gateways: dict[str, tuple[str, str]] = {}
        for door in DOORS:
            flags = () if door == "auto" else ("--front-door", door)
            (tmp / door).mkdir()
            gateway, base, metrics = start_gateway(resources, tmp / door, *flags)
            procs.append(gateway)
            gateways[door] = (base, metrics)
        yield Setup(gateways, records)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _assert_only_allowed(records: list[Record], tenant: str) -> None:
    assert records, "the upstream received nothing"
    for record in records:
        headers = record["headers"]
        leaked = {name for name in AGENT_CREDENTIALS if name in headers and name != "authorization"}
        assert not leaked, f"{record['method']} {sorted(leaked)} reached the upstream"
        assert headers["authorization"] == f"Bearer {TOKEN}"
        assert headers["x-tenant"] == tenant  # named in forwardHeaders
        assert "agent-" not in " ".join(headers.values())


@pytest.mark.parametrize("door", DOORS)
def test_a_tools_call_carries_only_the_allowed_headers(setup: Setup, door: str) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "hi"}})
    before = setup.checks(door)
    reply = asyncio.run(raw_post(setup.url(door), body, {**headers, **AGENT_CREDENTIALS, "x-tenant": tenant}))
    assert reply.status_code == 200, reply.text
    assert response_messages(reply)[0]["result"]["content"][0]["text"] == "hi"
    if door != "ext_proc":
        assert setup.checks(door) == before + 1  # auto: the fast route, one Check
    [record] = setup.received(tenant)
    _assert_only_allowed([record], tenant)
    # What the MCP server needs still arrives.
    for name in ("mcp-protocol-version", "mcp-method", "mcp-name", "content-type", "accept"):
        assert record["headers"][name] == headers[name]
    assert record["headers"]["x-mcp-tool"] == "echo"


@pytest.mark.parametrize("door", DOORS)
def test_a_legacy_session_carries_only_the_allowed_headers_on_every_request(setup: Setup, door: str) -> None:
    tenant = f"s-{uuid.uuid4().hex[:8]}"

    async def run() -> Any:
        async with legacy_session(setup.url(door), headers={**AGENT_CREDENTIALS, "x-tenant": tenant}) as session:
            return await session.call_tool("add", {"a": 2, "b": 3})

    result = asyncio.run(run())
    assert result.structured_content == {"result": 5}
    records = setup.received(tenant)
    methods = {r["method"] for r in records}
    assert {"POST", "GET", "DELETE"} <= methods
    _assert_only_allowed(records, tenant)


ENVOY_CONTROLS = {
    # Honored by Envoy's router for requests it deems internal (loopback is): a 1 ms upstream
    # timeout, and retries that would run a tool call twice.
    "x-envoy-upstream-rq-timeout-ms": "1",
    "x-envoy-upstream-rq-per-try-timeout-ms": "1",
    "x-envoy-retry-on": "5xx,reset,connect-failure",
    "x-envoy-max-retries": "5",
    "x-envoy-force-trace": "true",
    "x-envoy-made-up": "agent",
}


@pytest.mark.parametrize("door", DOORS)
def test_an_agents_x_envoy_headers_neither_steer_envoy_nor_reach_the_upstream(setup: Setup, door: str) -> None:
    tenant = f"e-{uuid.uuid4().hex[:8]}"
    body, headers = modern_request("tools/call", {"name": "slow_count", "arguments": {"steps": 1, "delay": 0.05}})
    reply = asyncio.run(raw_post(setup.url(door), body, {**headers, **ENVOY_CONTROLS, "x-tenant": tenant}))
    assert reply.status_code == 200, reply.text  # the agent's 1 ms timeout was not Envoy's
    assert "result" in response_messages(reply)[0]
    [record] = setup.received(tenant)  # received once: no retry of the agent's asking
    assert not set(ENVOY_CONTROLS) & set(record["headers"])
    # What remains of x-envoy-* is Envoy's own account of the route's rewrite, not the agent's.
    assert {n for n in record["headers"] if n.startswith("x-envoy-")} <= {
        "x-envoy-original-path",
        "x-envoy-original-host",
    }
    assert record["headers"].get("x-envoy-original-path") == "/hdr/mcp"
