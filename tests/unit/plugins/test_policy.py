"""The policy stage in process: rules, trust, scopes, Rego (embedded and remote), cache, rate limits.

(Remote OPA answering, and its decisions cached: tests/integration/plugins/test_policy.py.)

Requests go through the ext_proc adapter with the default pipeline and real
signed tokens; the assertions are on what the agent would get back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.resources import parse_documents
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.reload import try_reload
from tests.idp import Idp
from tests.messages import body_msg, headers_msg
from tests.policies import REGO, SERVER, call, catalog_of, policy_doc, refused, send
from tests.procs import free_port


@pytest.mark.parametrize(
    ("granted", "consent", "required", "allowed"),
    [
        ("high", "high", "high", True),
        ("high", "medium", "high", False),  # the user consented to less than the grant
        ("medium", "high", "high", False),  # consent cannot raise the grant
        ("medium", None, "medium", True),  # no consent claim: consented = granted
        ("low", None, "medium", False),
        ("low", "low", "low", True),
        ("high", "bogus", "medium", False),  # unreadable consent counts as low
    ],
)
async def test_trust_is_min_of_granted_and_consented(
    pipeline: Pipeline, idp: Idp, granted: str, consent: str | None, required: str, allowed: bool
) -> None:
    catalog = catalog_of(idp, policy_doc([{"tools": ["echo"], "requiredTrust": required}]), granted=granted)
    claims: dict[str, Any] = {"mcp_trust": consent} if consent is not None else {}
    proc, response = await send(pipeline, catalog, idp.mint(**claims), call("echo"))
    if allowed:
        assert response.HasField("request_body")
        return
    status, _headers, body = refused(response)
    assert (status, body["id"], body["error"]["code"]) == (200, 7, -32003)
    assert f"requires trust {required}" in body["error"]["message"]
    assert proc.ctx is not None and any("requires trust" in e for e in proc.ctx.book.explanations)


async def test_missing_scope_is_403_insufficient_scope(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp, policy_doc([{"tools": ["add"], "scopes": ["tools.write"]}]))
    _proc, response = await send(pipeline, catalog, idp.mint(scope="tools.read"), call("add", {"a": 1, "b": 2}))
    status, headers, body = refused(response)
    assert status == 403
    assert 'error="insufficient_scope"' in headers["www-authenticate"]
    assert 'scope="tools.write"' in headers["www-authenticate"]
    assert body["id"] == 7
    _proc, ok = await send(pipeline, catalog, idp.mint(scope="tools.read tools.write"), call("add", {"a": 1}))
    assert ok.HasField("request_body")


async def test_deny_rule(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp, policy_doc([{"tools": ["delete_*"], "action": "Deny"}, {"tools": ["*"]}]))
    _proc, response = await send(pipeline, catalog, idp.mint(), call("delete_everything"))
    assert "denied by policy 'p'" in refused(response)[2]["error"]["message"]


async def test_rego_decides_on_arguments(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp, policy_doc([], rego={"query": "data.mcp.allow", "module": REGO}))
    _proc, small = await send(pipeline, catalog, idp.mint(), call("add", {"a": 1, "b": 2}))
    assert small.HasField("request_body")
    proc, big = await send(pipeline, catalog, idp.mint(), call("add", {"a": 101, "b": 2}))
    status, _headers, body = refused(big)
    assert (status, body["error"]["code"]) == (200, -32003)
    assert proc.ctx is not None and "rego data.mcp.allow = false" in "; ".join(proc.ctx.book.explanations)


async def test_rego_sees_the_documented_input(pipeline: Pipeline, idp: Idp) -> None:
    module = """package mcp
import rego.v1
default decision := {"allow": false, "reason": "no match"}
decision := {"allow": true} if {
    input.version == "v1"
    input.principal.subject == "alice"
    input.agent == "agent"
    input.server == "demo"
    input.method == "tools/call"
    input.trust.effective == "medium"
    input.arguments.city == "Paris"
    "tools.read" in input.principal.scopes
}
"""
    catalog = catalog_of(idp, policy_doc([], rego={"query": "data.mcp.decision", "module": module}))
    token = idp.mint("alice", scope="tools.read")
    _proc, ok = await send(pipeline, catalog, token, call("weather", {"city": "Paris"}))
    assert ok.HasField("request_body")
    _proc, no = await send(pipeline, catalog, token, call("weather", {"city": "Oslo"}))
    assert refused(no)[2]["error"]["message"].endswith(": no match")


async def test_tools_list_hides_what_the_caller_may_not_call(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp, policy_doc([{"tools": ["add"], "requiredTrust": "high"}]), granted="medium")
    proc, response = await send(pipeline, catalog, idp.mint(), {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    assert response.HasField("request_body")
    await proc.handle(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    tools = [{"name": "echo"}, {"name": "add", "annotations": {"destructiveHint": False}}]
    answer = await proc.handle(body_msg({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}}, response=True))
    listed = json.loads(answer.response_body.response.body_mutation.body)
    assert [t["name"] for t in listed["result"]["tools"]] == ["echo"]


async def test_rate_limit_is_429_with_retry_after(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp, policy_doc([], rateLimit={"requests": 2, "perSeconds": 60, "key": "tool"}))
    token = idp.mint()
    for _ in range(2):
        assert (await send(pipeline, catalog, token, call("echo")))[1].HasField("request_body")
    status, headers, body = refused((await send(pipeline, catalog, token, call("echo")))[1])
    assert (status, body["error"]["code"]) == (429, -32029)
    assert 1 <= int(headers["retry-after"]) <= 30
    # key: tool → another tool has its own bucket; another caller too.
    assert (await send(pipeline, catalog, token, call("add")))[1].HasField("request_body")
    assert (await send(pipeline, catalog, idp.mint("bob"), call("echo")))[1].HasField("request_body")


async def test_unreachable_opa_fails_closed(pipeline: Pipeline, idp: Idp) -> None:
    remote = {"query": "data.mcp.allow", "remote": {"url": f"http://127.0.0.1:{free_port()}", "timeoutSeconds": 0.5}}
    catalog = catalog_of(idp, policy_doc([], rego=remote))
    status, _headers, body = refused((await send(pipeline, catalog, idp.mint(), call("echo")))[1])
    assert status == 503
    assert "policy backend cannot decide" in body["error"]["message"]


def test_rego_syntax_errors_name_the_line(pipeline: Pipeline, idp: Idp) -> None:
    bad = "package mcp\nimport rego.v1\n\nallow if { input.x == }\n"
    catalog = catalog_of(idp, policy_doc([], rego={"module": bad}))
    problems = pipeline.check(catalog)
    assert any("MCPToolPolicy 'p': spec.rego: p.rego:4:" in p for p in problems), problems


def test_a_bad_reload_keeps_the_last_good_policy(pipeline: Pipeline, idp: Idp, tmp_path: Path) -> None:
    good = [SERVER, policy_doc([], rego={"module": REGO})]
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all(good))
    metrics = Metrics()
    current = parse_documents(good, str(path))
    bad = [SERVER, policy_doc([], rego={"module": "package mcp\nallow := if {\n"})]
    path.write_text(yaml.safe_dump_all(bad))
    assert try_reload(path, pipeline, current, metrics) is None
    assert metrics.reloads.labels("refused")._value.get() == 1
    path.write_text(yaml.safe_dump_all([SERVER, policy_doc([{"tools": ["*"], "action": "Deny"}])]))
    reloaded = try_reload(path, pipeline, current, metrics)
    assert reloaded is not None and reloaded.generation == current.generation + 1
