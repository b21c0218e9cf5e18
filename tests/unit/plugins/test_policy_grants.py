"""The policy stage with MCPAccessGrants and MCPConsents, in process, with real signed tokens.

    alice: grant alice-ops, maxTrust high    bob: grant bob-ops, maxTrust low    carol: none
    MCPToolPolicy p: ``add`` needs trust high (sideEffect write; echo read: no listing is needed)

Requests go through the ext_proc adapter with the default pipeline (or one whose policy
stage has a fake clock); the assertions are on what the agent gets back, the audit line
and the Rego input. (Through Envoy and ``mcp-extproc up``: tests/integration/test_grants.py.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import Catalog, parse_documents
from extproc.core.metrics import Metrics
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.core.reload import try_reload
from plugins.policy import PolicyConfig, PolicyStage
from tests.idp import Idp, agent_doc
from tests.messages import body_msg, headers_msg
from tests.policies import SERVER, call, policy_doc, refused, send

API = "mcp.extproc.io/v1alpha1"
T0 = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
HIGH_ADD = policy_doc(
    [{"tools": ["add"], "requiredTrust": "high", "sideEffect": "write"}, {"tools": ["echo"], "sideEffect": "read"}]
)
LISTED: list[dict[str, Any]] = [
    {"name": "echo", "annotations": {"readOnlyHint": True}},
    {"name": "add"},
    {"name": "delete_everything", "annotations": {"destructiveHint": True}},
]


def grant(name: str, user: str, max_trust: str, **spec: Any) -> dict[str, Any]:
    body = {"targetRefs": [{"kind": "MCPServer", "name": "demo"}], "subject": {"user": user, "agent": "agent"}}
    return {
        "apiVersion": API,
        "kind": "MCPAccessGrant",
        "metadata": {"name": name},
        "spec": {**body, "maxTrust": max_trust, **spec},
    }


def consent(name: str, user: str, trust: str, **spec: Any) -> dict[str, Any]:
    body = {"serverRef": {"kind": "MCPServer", "name": "demo"}, "subject": {"user": user, "agent": "agent"}}
    return {
        "apiVersion": API,
        "kind": "MCPConsent",
        "metadata": {"name": name},
        "spec": {**body, "consentedTrust": trust, **spec},
    }


def documents(
    idp: Idp, *extra: dict[str, Any], policy: dict[str, Any] = HIGH_ADD, **agent: Any
) -> list[dict[str, Any]]:
    # The agent declares no consent claim: the grants and MCPConsents alone decide the trust.
    options: dict[str, Any] = {"granted": "low", "consent_claim": None, **agent}
    return [
        SERVER,
        policy,
        agent_doc("agent", idp.jwks_uri, ["demo"], **options),
        grant("alice-ops", "alice", "high"),
        grant("bob-ops", "bob", "low"),
        *extra,
    ]


def catalog_of(idp: Idp, *extra: dict[str, Any], **kwargs: Any) -> Catalog:
    return parse_documents(documents(idp, *extra, **kwargs), "test")


def forwarded(response: Any) -> bool:
    return bool(response.HasField("request_body"))


async def listed(pipeline: Pipeline, catalog: Catalog, token: str, tools: list[dict[str, Any]]) -> list[str]:
    """The names the agent gets back from a tools/list whose upstream answer is ``tools``."""
    proc, response = await send(pipeline, catalog, token, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    assert forwarded(response)
    await proc.handle(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    answer = await proc.handle(body_msg({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}}, response=True))
    mutation = answer.response_body.response.body_mutation
    body = json.loads(mutation.body) if mutation.HasField("body") else {"result": {"tools": tools}}
    return [t["name"] for t in body["result"]["tools"]]


@asynccontextmanager
async def clocked(now: Callable[[], datetime]) -> AsyncIterator[Pipeline]:
    """The default pipeline, its policy stage on the clock ``now``."""
    registry = Registry()
    stages = [
        PolicyStage(PolicyConfig(), now=now) if spec.name == "policy" else registry.build(spec)
        for spec in DEFAULT_PIPELINE.stages
    ]
    assert any(isinstance(s, PolicyStage) for s in stages)
    built = Pipeline(stages)
    await built.startup()
    try:
        yield built
    finally:
        await built.shutdown()


async def test_a_high_tool_is_allowed_for_a_high_grant_and_refused_for_a_low_one(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp)
    _proc, ok = await send(pipeline, catalog, idp.mint("alice"), call("add", {"a": 1}))
    assert forwarded(ok)
    proc, no = await send(pipeline, catalog, idp.mint("bob"), call("add", {"a": 1}))
    status, _headers, body = refused(no)
    assert (status, body["id"], body["error"]["code"]) == (200, 7, -32003)
    assert body["error"]["message"] == "tool 'add' requires trust high; the caller has low"
    assert proc.ctx is not None and any("requires trust high" in e for e in proc.ctx.book.explanations)
    # bob's grant covers the tools that need no more than low.
    assert forwarded((await send(pipeline, catalog, idp.mint("bob"), call("echo")))[1])


async def test_a_user_without_a_grant_is_403(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp)
    _proc, response = await send(pipeline, catalog, idp.mint("carol"), call("echo"))
    status, _headers, body = refused(response)
    assert (status, body["id"], body["error"]["code"]) == (403, 7, -32003)
    assert body["error"]["message"] == "no MCPAccessGrant gives user 'carol', agent 'agent' access to MCP server 'demo'"
    assert pipeline.metrics.decisions.labels("deny", "no_matching_grant")._value.get() == 1


async def test_tools_list_shows_each_user_what_they_may_call(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp)
    assert await listed(pipeline, catalog, idp.mint("alice"), LISTED) == ["echo", "add"]
    assert await listed(pipeline, catalog, idp.mint("bob"), LISTED) == ["echo"]
    assert await listed(pipeline, catalog, idp.mint("carol"), LISTED) == []
    # What was hidden is refused when called, for the reason the list hid it.
    destructive = refused((await send(pipeline, catalog, idp.mint("alice"), call("delete_everything")))[1])
    assert "tool 'delete_everything' is destructive" in destructive[2]["error"]["message"]


async def test_a_tool_never_listed_has_an_unknown_side_effect_until_listed(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp, policy=policy_doc([{"tools": ["*"]}]))
    token = idp.mint("alice")
    status, _headers, body = refused((await send(pipeline, catalog, token, call("echo")))[1])
    assert (status, body["error"]["code"]) == (200, -32003)
    assert "the side effect of tool 'echo' is not known yet" in body["error"]["message"]
    assert await listed(pipeline, catalog, token, LISTED) == ["echo", "add"]
    assert forwarded((await send(pipeline, catalog, token, call("echo")))[1])
    assert forwarded((await send(pipeline, catalog, token, call("add")))[1])  # listed without annotations: write


async def test_a_lowered_consent_refuses_the_very_next_call(pipeline: Pipeline, idp: Idp, tmp_path: Path) -> None:
    path = tmp_path / "resources.yaml"
    high = documents(idp, consent("alice-consent", "alice", "high"))
    path.write_text(yaml.safe_dump_all(high))
    current = parse_documents(high, str(path))
    token = idp.mint("alice")
    for _ in range(3):  # allowed, and from the second on answered by the decision cache
        assert forwarded((await send(pipeline, current, token, call("add", {"a": 1})))[1])

    path.write_text(yaml.safe_dump_all(documents(idp, consent("alice-consent", "alice", "medium"))))
    lowered = try_reload(path, pipeline, current, Metrics())
    assert lowered is not None
    status, _headers, body = refused((await send(pipeline, lowered, token, call("add", {"a": 1})))[1])
    assert (status, body["error"]["code"]) == (200, -32003)
    assert body["error"]["message"] == "tool 'add' requires trust high; the caller has medium"

    # Even a catalog of the same generation as the cached allow (not a reload) is decided afresh.
    same = parse_documents(documents(idp, consent("alice-consent", "alice", "low")), str(path))
    assert same.generation == current.generation
    status, _headers, body = refused((await send(pipeline, same, token, call("add", {"a": 1})))[1])
    assert body["error"]["message"] == "tool 'add' requires trust high; the caller has low"

    path.write_text(yaml.safe_dump_all(documents(idp, consent("alice-consent", "alice", "high", revoked=True))))
    revoked = try_reload(path, pipeline, lowered, Metrics())
    assert revoked is not None
    status, _headers, body = refused((await send(pipeline, revoked, token, call("echo")))[1])
    assert status == 403
    assert body["error"]["message"] == "the consent for user 'alice', agent 'agent' on MCP server 'demo' was revoked"


async def test_a_consent_expires_on_the_clock_without_a_reload(idp: Idp) -> None:
    clock = [T0]
    expires = T0 + timedelta(seconds=5)
    catalog = catalog_of(idp, consent("alice-consent", "alice", "high", expiresAt=expires.isoformat()))
    token = idp.mint("alice")
    async with clocked(lambda: clock[0]) as pipeline:
        for moment in (T0, expires - timedelta(seconds=1)):
            clock[0] = moment
            assert forwarded((await send(pipeline, catalog, token, call("add", {"a": 1})))[1]), moment
        clock[0] = expires
        proc, response = await send(pipeline, catalog, token, call("add", {"a": 1}))
        status, _headers, body = refused(response)
        assert (status, body["id"], body["error"]["code"]) == (403, 7, -32003)
        assert "expired at 2026-06-01T12:00:05+00:00" in body["error"]["message"]
        assert proc.ctx is not None and proc.ctx.book.audit["trust"] == {
            "grant": "alice-ops",
            "consent": "alice-consent",
        }
        # A listing after the expiry shows alice nothing of the server.
        assert await listed(pipeline, catalog, token, LISTED) == []
        # bob has no consent: his calls do not lapse.
        assert forwarded((await send(pipeline, catalog, idp.mint("bob"), call("echo")))[1])


async def test_the_audit_line_carries_the_trust(pipeline: Pipeline, idp: Idp, caplog: pytest.LogCaptureFixture) -> None:
    catalog = catalog_of(idp, consent("alice-consent", "alice", "medium"))
    caplog.set_level(logging.INFO, logger="mcp_extproc.audit")
    proc, response = await send(pipeline, catalog, idp.mint("alice"), call("echo"))
    assert forwarded(response)
    trust = {"ceiling": "high", "consented": "medium", "effective": "medium", "grant": "alice-ops"}
    trust["consent"] = "alice-consent"
    assert proc.ctx is not None and proc.ctx.book.audit["trust"] == trust
    _proc, no = await send(pipeline, catalog, idp.mint("carol"), call("echo"))
    assert refused(no)[0] == 403
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mcp_extproc.audit"]
    assert [(line["principal"], line["decision"], line.get("trust")) for line in lines] == [
        ("alice", "allow", trust),
        ("carol", "deny", {"grant": None, "consent": None}),
    ]
    assert lines[1]["reason"] == "no_matching_grant"


REGO = """package mcp
import rego.v1
default decision := {"allow": false, "reason": "not under grant alice-ops"}
decision := {"allow": true} if {
    input.trust.grant == "alice-ops"
    input.trust.ceiling == "high"
    input.trust.consented == "medium"
    input.trust.effective == "medium"
    input.trust.consent == "alice-consent"
}
"""


async def test_rego_reads_the_grant_ceiling_and_consent(pipeline: Pipeline, idp: Idp) -> None:
    rego_policy = policy_doc(
        [{"tools": ["*"], "sideEffect": "read"}], rego={"query": "data.mcp.decision", "module": REGO}
    )
    catalog = catalog_of(idp, consent("alice-consent", "alice", "medium"), policy=rego_policy)
    assert forwarded((await send(pipeline, catalog, idp.mint("alice"), call("echo")))[1])
    status, _headers, body = refused((await send(pipeline, catalog, idp.mint("bob"), call("echo")))[1])
    assert (status, body["error"]["code"]) == (200, -32003)
    assert body["error"]["message"] == "tool 'echo' is denied by policy 'p': not under grant alice-ops"
    # The same alice without her consent record: the Rego input says so (consent null, consented high).
    without = catalog_of(idp, policy=rego_policy)
    status, _headers, body = refused((await send(pipeline, without, idp.mint("alice"), call("echo")))[1])
    assert body["error"]["message"] == "tool 'echo' is denied by policy 'p': not under grant alice-ops"


async def test_the_agents_consent_claim_lowers_a_grant_only_when_the_token_carries_it(
    pipeline: Pipeline, idp: Idp
) -> None:
    """docs/identity-and-policy.md step 5: "when the agent declares a consentClaim, the token's claim lowers it"."""
    catalog = catalog_of(idp, consent_claim="mcp_trust", granted="low")
    lowered = refused((await send(pipeline, catalog, idp.mint("alice", mcp_trust="medium"), call("add")))[1])
    assert lowered[2]["error"]["message"] == "tool 'add' requires trust high; the caller has medium"
    assert forwarded((await send(pipeline, catalog, idp.mint("alice", mcp_trust="high"), call("add")))[1])
    # No claim in the token: nothing lowers alice's high grant.
    assert forwarded((await send(pipeline, catalog, idp.mint("alice"), call("add")))[1])
