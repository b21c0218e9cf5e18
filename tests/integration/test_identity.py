"""Identity and policy through real Envoy, on both front doors (ext_proc and ext_authz).

    agent (SDK client / raw HTTP, real signed JWTs)
        ──▶ Envoy ──ext_proc or ext_authz──▶ mcp-extproc (authn, mcp, allowlist, policy)
        ──▶ tests.upstreams.pyserver (records what it receives)

Servers behind the gateway:
    /py/mcp      rules (echo: low; add: medium + scope tools.write) and embedded Rego
                 (add with a > 100 is refused)
    /limited/mcp rate limit: 2 calls per hour per caller
    /remote/mcp  Rego on a remote OPA Data API (the loopback stand-in)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp.shared.exceptions import MCPError

from tests.agents import legacy_session, raw_post, response_messages
from tests.idp import Idp, agent_doc, running_idp
from tests.integration.conftest import metric_value, resource_doc, start_gateway
from tests.procs import Proc, start_opa_standin, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

REGO = """package mcp
import rego.v1
default allow := true
allow := false if { input.tool == "add"; input.arguments.a > 100 }
"""


def policy(name: str, server: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPToolPolicy",
        "metadata": {"name": name},
        "spec": {"targetRefs": [{"kind": "MCPServer", "name": server}], **spec},
    }


@dataclass
class Stack:
    base: str
    proc: Proc
    metrics: str
    idp: Idp
    records: Path
    front_door: str

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def auth(self, token: str) -> dict[str, str]:
        return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    front_door: str = request.param
    tmp = tmp_path_factory.mktemp(f"identity-{front_door}")
    procs: list[Proc] = []
    with running_idp() as idp:
        try:
            records = tmp / "py.jsonl"
            upstream, port = start_pyserver("legacy-json", records)
            procs.append(upstream)
            module = tmp / "remote.rego"
            module.write_text(REGO)
            standin, opa_port = start_opa_standin(module)
            procs.append(standin)
            tools = {"allowedTools": ["*"], "deniedTools": ["delete_*"]}
            docs = [
                resource_doc("py", port, tools),
                resource_doc("limited", port, tools),
                resource_doc("remote", port, tools),
                agent_doc("agent", idp.jwks_uri, ["py", "limited", "remote"], granted="medium"),
                policy(
                    "py-policy",
                    "py",
                    rules=[
                        {"tools": ["echo"], "requiredTrust": "low"},
                        {"tools": ["add"], "requiredTrust": "medium", "scopes": ["tools.write"]},
                    ],
                    rego={"query": "data.mcp.allow", "module": REGO},
                ),
                policy("limits", "limited", rateLimit={"requests": 2, "perSeconds": 3600, "key": "principal"}),
                policy(
                    "remote-policy",
                    "remote",
                    rego={"query": "data.mcp.allow", "remote": {"url": f"http://127.0.0.1:{opa_port}"}},
                ),
            ]
            resources = tmp / "resources.yaml"
            resources.write_text(yaml.safe_dump_all(docs))
            up, base, metrics = start_gateway(resources, tmp, "--front-door", front_door)
            procs.append(up)
            yield Stack(base, up, metrics, idp, records, front_door)
        finally:
            for proc in reversed(procs):
                proc.stop()


def call(tool: str, arguments: dict[str, Any], id_: int = 11) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


def calls_received(stack: Stack, tool: str, **arguments: Any) -> int:
    found = 0
    for record in read_records(stack.records):
        body = record["body"]
        if isinstance(body, dict) and body.get("method") == "tools/call":
            params = body.get("params") or {}
            if params.get("name") == tool and all(
                params.get("arguments", {}).get(k) == v for k, v in arguments.items()
            ):
                found += 1
    return found


async def test_no_token_is_401_with_a_challenge(stack: Stack) -> None:
    reply = await raw_post(stack.url("py"), call("echo", {"text": "hi"}))
    assert reply.status_code == 401
    challenge = reply.headers["www-authenticate"]
    assert (
        challenge.startswith("Bearer resource_metadata=")
        and "/.well-known/oauth-protected-resource/py/mcp" in challenge
    )
    assert reply.json()["error"]["code"] == -32001


async def test_protected_resource_metadata_is_served(stack: Stack) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        reply = await client.get(f"{stack.base}/.well-known/oauth-protected-resource/py/mcp")
    assert reply.status_code == 200
    document = reply.json()
    assert document["resource"] == stack.url("py")
    assert document["authorization_servers"] == [stack.idp.issuer]
    assert "tools.write" in document["scopes_supported"]


async def test_authenticated_session_works_and_the_agents_token_never_reaches_the_upstream(stack: Stack) -> None:
    token = stack.idp.mint("alice", scope="tools.write")
    async with legacy_session(stack.url("py"), headers=stack.auth(token)) as session:
        result = await session.call_tool("echo", {"text": f"hello via {stack.front_door}"})
        assert not result.is_error
        added = await session.call_tool("add", {"a": 2, "b": 3})
        assert not added.is_error
    records = read_records(stack.records)
    assert any(r["body"] and f"hello via {stack.front_door}" in json.dumps(r["body"]) for r in records)
    for record in records:
        assert "authorization" not in {k.lower() for k in record["headers"]}, "the agent's token went upstream"
        assert token not in json.dumps(record)


async def test_rego_refuses_by_arguments_before_the_upstream(stack: Stack) -> None:
    token = stack.idp.mint("alice", scope="tools.write")
    reply = await raw_post(stack.url("py"), call("add", {"a": 500, "b": 1}, id_=41), stack.auth(token))
    assert reply.status_code == 200
    [message] = response_messages(reply)
    assert message["id"] == 41 and message["error"]["code"] == -32003
    assert calls_received(stack, "add", a=500) == 0
    assert metric_value(stack.metrics, "mcp_extproc_decisions_total", decision="deny", reason="rego") >= 1


async def test_missing_scope_is_403(stack: Stack) -> None:
    reply = await raw_post(stack.url("py"), call("add", {"a": 7, "b": 1}), stack.auth(stack.idp.mint("bob")))
    assert reply.status_code == 403
    assert 'error="insufficient_scope"' in reply.headers["www-authenticate"]
    assert calls_received(stack, "add", a=7) == 0


async def test_remote_opa_decides(stack: Stack) -> None:
    token = stack.idp.mint("carol")
    denied = await raw_post(stack.url("remote"), call("add", {"a": 900, "b": 1}), stack.auth(token))
    assert response_messages(denied)[0]["error"]["code"] == -32003
    assert calls_received(stack, "add", a=900) == 0


async def test_rate_limit_is_429(stack: Stack) -> None:
    headers = stack.auth(stack.idp.mint(f"dave-{stack.front_door}"))
    async with legacy_session(stack.url("limited"), headers=headers) as session:
        for _ in range(2):
            assert not (await session.call_tool("echo", {"text": "x"})).is_error
    reply = await raw_post(stack.url("limited"), call("echo", {"text": "third"}), headers)
    assert reply.status_code == 429
    assert int(reply.headers["retry-after"]) > 0
    assert reply.json()["error"]["code"] == -32029


async def test_tools_list_is_filtered_by_trust(stack: Stack) -> None:
    token = stack.idp.mint("erin", scope="tools.write", mcp_trust="low")  # consented low < add's medium
    async with legacy_session(stack.url("py"), headers=stack.auth(token)) as session:
        names = {tool.name for tool in (await session.list_tools()).tools}
        with pytest.raises(MCPError, match="requires trust medium"):  # refused on both front doors
            await session.call_tool("add", {"a": 1, "b": 1})
    assert "echo" in names
    # ext_authz never sees responses, so only ext_proc can hide the tool (README: "Front doors").
    assert ("add" in names) == (stack.front_door == "ext_authz")


async def test_audit_line_explains_the_decision(stack: Stack) -> None:
    token = stack.idp.mint("frank", scope="tools.write")
    await raw_post(stack.url("py"), call("add", {"a": 101, "b": 0}), stack.auth(token))
    lines = [line for line in stack.proc.log_path.read_text().splitlines() if "mcp_extproc.audit: " in line]
    entries = [json.loads(line.split("mcp_extproc.audit: ", 1)[1]) for line in lines]
    entry = next(e for e in reversed(entries) if e["principal"] == "frank")
    assert entry["agent"] == "agent" and entry["server"] == "py" and entry["tool"] == "add"
    assert entry["decision"] == "deny" and entry["reason"] == "rego"
    assert "rego data.mcp.allow = false" in entry["rule"]
    assert entry["latency_ms"] >= 0
    assert token not in "\n".join(lines)
