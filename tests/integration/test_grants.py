"""Grants and consent through real ``mcp-extproc up`` and Envoy, with real signed JWTs.

    alice, bob, carol (real JWTs of one issuer; all matched to MCPAgent ``ops``)
        ──▶ Envoy ──▶ mcp-extproc (authn, mcp, allowlist, policy: grants and consents)
        ──▶ tests.upstreams.pyserver (Python SDK; echo is readOnlyHint, delete_everything
            destructiveHint, add unannotated; records what it receives)

Resources: an MCPToolPolicy makes ``add`` need trust high; alice's grant gives high, bob's
low, both for read and write tools only; carol has none. Consents are changed while the
gateway runs with ``mcp-extproc consent`` on its resource file (reloaded every 0.2 s).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from mcp.shared.exceptions import MCPError

from tests.agents import legacy_session, raw_post, response_messages
from tests.idp import Idp, agent_doc, running_idp
from tests.integration.conftest import metric_value, resource_doc, start_gateway
from tests.procs import Proc, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

API = "mcp.extproc.io/v1alpha1"
RELOAD_DEADLINE_S = 20.0
PROTOCOL_VERSION = "2025-06-18"


def ops_agent(jwks_uri: str) -> dict[str, Any]:
    """The one agent: py and fresh directly, and py through the virtual server vt."""
    agent = agent_doc("ops", jwks_uri, ["py", "fresh"], granted="low", consent_claim=None)
    agent["spec"]["mcpServerRefs"].append({"kind": "MCPVirtualServer", "name": "vt"})
    return agent


def grant(name: str, user: str, max_trust: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPAccessGrant",
        "metadata": {"name": name},
        "spec": {
            "targetRefs": [{"kind": "MCPServer", "name": "py"}, {"kind": "MCPServer", "name": "fresh"}],
            "subject": {"user": user, "agent": "ops"},
            "maxTrust": max_trust,
            "allowedSideEffects": ["read", "write"],
        },
    }


@dataclass
class Stack:
    url: str
    proc: Proc
    metrics: str
    idp: Idp
    records: Path
    resources: Path
    sessions: dict[tuple[str, str], str] = field(default_factory=dict)

    def auth(self, user: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.idp.mint(user)}"}

    def consent(self, *args: str) -> str:
        """``mcp-extproc consent ...`` on the gateway's resource file; waits for the reload it causes."""
        before = self.proc.output().count("reloaded ")
        done = subprocess.run(
            [sys.executable, "-m", "extproc", "consent", *args, "-f", str(self.resources)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        if args[0] != "list":
            end = time.monotonic() + RELOAD_DEADLINE_S
            while self.proc.output().count("reloaded ") == before:
                assert time.monotonic() < end, "the gateway did not reload the resource file"
                time.sleep(0.05)
        return done.stdout

    def calls_of(self, tool: str, marker: int) -> int:
        return sum(
            1
            for r in read_records(self.records)
            if isinstance(r["body"], dict)
            and r["body"].get("method") == "tools/call"
            and r["body"]["params"].get("name") == tool
            and r["body"]["params"].get("arguments", {}).get("a") == marker
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("grants")
    procs: list[Proc] = []
    with running_idp() as idp:
        try:
            records = tmp / "py.jsonl"
            upstream, port = start_pyserver("legacy-json", records)
            procs.append(upstream)
            docs = [
                resource_doc("py", port, {"allowedTools": ["*"]}),
                resource_doc("fresh", port, {"allowedTools": ["*"]}),
                ops_agent(idp.jwks_uri),
                {
                    "apiVersion": API,
                    "kind": "MCPVirtualServer",
                    "metadata": {"name": "vt"},
                    "spec": {"servers": [{"name": "py", "prefix": "p_"}]},
                },
                {
                    "apiVersion": API,
                    "kind": "MCPToolPolicy",
                    "metadata": {"name": "py-rules"},
                    "spec": {
                        "targetRefs": [{"kind": "MCPServer", "name": "py"}],
                        "rules": [{"tools": ["add"], "requiredTrust": "high"}],
                    },
                },
                grant("alice-ops", "alice", "high"),
                grant("bob-ops", "bob", "low"),
                {
                    **grant("bob-vt", "bob", "high"),
                    "spec": {
                        **grant("bob-vt", "bob", "high")["spec"],
                        "targetRefs": [{"kind": "MCPVirtualServer", "name": "vt"}],
                    },
                },
            ]
            resources = tmp / "resources.yaml"
            resources.write_text(yaml.safe_dump_all(docs))
            up, base, metrics = start_gateway(resources, tmp, "--reload-interval", "0.2")
            procs.append(up)
            stack = Stack(f"{base}/py/mcp", up, metrics, idp, records, resources)
            # An agent lists the tools before it calls them: the gateway learns their annotations.
            listed = asyncio.run(post(stack, stack.url, "alice", {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}))
            assert listed.status_code == 200
            yield stack
        finally:
            for proc in reversed(procs):
                proc.stop()


def add(marker: int, id_: int = 7) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": "add", "arguments": {"a": marker, "b": 1}},
    }


async def post(stack: Stack, url: str, user: str, body: dict[str, Any]) -> httpx.Response:
    """``body`` on ``user``'s legacy session at ``url`` (opened with a raw initialize the first time)."""
    headers = {**stack.auth(user), "mcp-protocol-version": PROTOCOL_VERSION}
    if (url, user) not in stack.sessions:
        hello = await raw_post(url, initialize(), headers)
        assert hello.status_code == 200, hello.text
        stack.sessions[url, user] = hello.headers["mcp-session-id"]
        headers["mcp-session-id"] = stack.sessions[url, user]
        initialized = await raw_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
        assert initialized.status_code == 202
    headers["mcp-session-id"] = stack.sessions[url, user]
    return await raw_post(url, body, headers)


def initialize() -> dict[str, Any]:
    params = {"protocolVersion": PROTOCOL_VERSION, "capabilities": {}, "clientInfo": {"name": "grants", "version": "1"}}
    return {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}


async def call_add(stack: Stack, user: str, marker: int) -> tuple[int, dict[str, Any]]:
    reply = await post(stack, stack.url, user, add(marker))
    messages = response_messages(reply)
    return reply.status_code, messages[0] if messages else {}


async def test_a_high_tool_is_allowed_for_alice_and_refused_for_bob(stack: Stack) -> None:
    status, answer = await call_add(stack, "alice", 1001)
    assert status == 200 and answer["result"]["content"][0]["text"] == "1002"
    status, answer = await call_add(stack, "bob", 1002)
    assert status == 200 and answer["error"]["code"] == -32003
    assert "requires trust high" in answer["error"]["message"]
    assert stack.calls_of("add", 1001) == 1 and stack.calls_of("add", 1002) == 0


async def test_a_user_without_a_grant_is_403(stack: Stack) -> None:
    status, answer = await call_add(stack, "carol", 1003)
    assert status == 403 and answer["error"]["code"] == -32003
    assert "no MCPAccessGrant" in answer["error"]["message"]
    assert stack.calls_of("add", 1003) == 0
    assert metric_value(stack.metrics, "mcp_extproc_decisions_total", decision="deny", reason="no_matching_grant") >= 1


async def test_tools_list_shows_each_user_exactly_what_they_may_call(stack: Stack) -> None:
    listed: dict[str, set[str]] = {}
    for user in ("alice", "bob"):
        async with legacy_session(stack.url, headers=stack.auth(user)) as session:
            listed[user] = {tool.name for tool in (await session.list_tools()).tools}
            for name in ("echo", "add", "delete_everything"):
                known: dict[str, dict[str, Any]] = {"echo": {"text": "hi"}, "add": {"a": 1, "b": 2}}
                arguments = known.get(name, {})
                try:
                    result = await session.call_tool(name, arguments)
                    callable_ = not result.is_error
                except MCPError:
                    callable_ = False
                assert callable_ == (name in listed[user]), (user, name, listed[user])
    assert {"echo", "add"} <= listed["alice"] and "delete_everything" not in listed["alice"]
    assert "echo" in listed["bob"] and "add" not in listed["bob"] and "delete_everything" not in listed["bob"]


async def test_a_destructive_tool_is_refused_under_a_read_and_write_grant(stack: Stack) -> None:
    async with legacy_session(stack.url, headers=stack.auth("alice")) as session:
        await session.list_tools()  # the gateway learns the annotations (destructiveHint)
        with pytest.raises(MCPError, match="destructive"):
            await session.call_tool("delete_everything", {})
    assert not any(
        isinstance(r["body"], dict) and (r["body"].get("params") or {}).get("name") == "delete_everything"
        for r in read_records(stack.records)
    )


async def test_consent_lowered_raised_revoked_and_expired(stack: Stack) -> None:
    try:
        await _consent_flow(stack)
    finally:  # the other tests expect alice at high
        stack.consent("grant", "--server", "py", "--user", "alice", "--agent", "ops", "--trust", "high")


async def _consent_flow(stack: Stack) -> None:
    for marker in (2001, 2002, 2003):  # allowed, and in the decision cache
        assert (await call_add(stack, "alice", marker))[1].get("result") is not None
    stack.consent("grant", "--server", "py", "--user", "alice", "--agent", "ops", "--trust", "medium")
    status, answer = await call_add(stack, "alice", 2004)  # at once: never a cached allow
    assert status == 200 and "requires trust high" in answer["error"]["message"]
    assert "medium" in answer["error"]["message"]

    stack.consent("grant", "--server", "py", "--user", "alice", "--agent", "ops", "--trust", "high")
    assert (await call_add(stack, "alice", 2005))[1].get("result") is not None

    stack.consent("revoke", "--server", "py", "--user", "alice", "--agent", "ops")
    status, answer = await call_add(stack, "alice", 2006)
    assert status == 403 and "revoked" in answer["error"]["message"]

    soon = (datetime.now(UTC) + timedelta(seconds=3)).isoformat()
    stack.consent("grant", "--server", "py", "--user", "alice", "--agent", "ops", "--trust", "high", "--expires", soon)
    assert (await call_add(stack, "alice", 2007))[1].get("result") is not None
    assert "live" in stack.consent("list")
    await asyncio.sleep(max(0.0, (datetime.fromisoformat(soon) - datetime.now(UTC)).total_seconds()) + 0.2)
    status, answer = await call_add(stack, "alice", 2008)  # no reload: the expiry itself refuses
    assert status == 403 and "expired" in answer["error"]["message"]
    assert "expired" in stack.consent("list")

    for marker in (2001, 2002, 2003, 2005, 2007):
        assert stack.calls_of("add", marker) == 1
    for marker in (2004, 2006, 2008):
        assert stack.calls_of("add", marker) == 0
    # bob is untouched by alice's consents
    assert "requires trust high" in (await call_add(stack, "bob", 2009))[1]["error"]["message"]


async def test_the_audit_line_carries_ceiling_consent_and_grant(stack: Stack) -> None:
    await call_add(stack, "alice", 3001)
    lines = [line for line in stack.proc.output().splitlines() if "mcp_extproc.audit: " in line]
    entries = [json.loads(line.split("mcp_extproc.audit: ", 1)[1]) for line in lines]
    decisions = [e for e in entries if e.get("event") == "decision" and e.get("principal") == "alice"]
    last = decisions[-1]
    assert last["tool"] == "add" and last["trust"]["grant"] == "alice-ops"
    assert set(last["trust"]) >= {"grant", "consent"}


async def test_a_tool_whose_side_effect_is_not_known_yet_is_refused_until_listed(stack: Stack) -> None:
    fresh = stack.url.replace("/py/mcp", "/fresh/mcp")
    [answer] = response_messages(await post(stack, fresh, "alice", add(4001)))
    assert answer["error"]["code"] == -32003 and "not known yet" in answer["error"]["message"]
    assert stack.calls_of("add", 4001) == 0
    listed = await post(stack, fresh, "alice", {"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
    assert "add" in {t["name"] for t in response_messages(listed)[0]["result"]["tools"]}
    [answer] = response_messages(await post(stack, fresh, "alice", add(4002)))
    assert answer["result"]["content"][0]["text"] == "4003"


async def test_a_grant_on_a_virtual_server_applies_only_through_it(stack: Stack) -> None:
    """bob's grant on vt (high) adds to his grant on py (low) only for calls through vt."""
    vt = stack.url.replace("/py/mcp", "/vt/mcp")
    listed = await post(stack, vt, "bob", {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    names = {t["name"] for t in response_messages(listed)[0]["result"]["tools"]}
    assert "p_add" in names and "p_delete_everything" not in names  # high now; destructive still not granted
    [answer] = response_messages(
        await post(stack, vt, "bob", {**add(5001), "params": {"name": "p_add", "arguments": {"a": 5001, "b": 1}}})
    )
    assert answer["result"]["content"][0]["text"] == "5002"
    status, answer = await call_add(stack, "bob", 5003)  # py's own route: bob's py grant alone
    assert status == 200 and "requires trust high" in answer["error"]["message"]
    assert stack.calls_of("add", 5001) == 1 and stack.calls_of("add", 5003) == 0
