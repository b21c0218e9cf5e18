"""Caches keyed on the token, not on its subject: policy decisions and exchanged upstream tokens.

Data flow of every test: the default pipeline (authn, mcp, allowlist, policy, credentials,
session) behind the ext_proc front door, a real signing issuer (:mod:`tests.idp`); one
subject (``alice``) sends a first token that the policy allows (the decision is then
cached for ``decisionCacheSeconds``, 5 s), then at once a second token that must be
refused: it lacks the scope, carries a lower consent, or carries a claim Rego denies.
On the old key (``issuer|subject``, agent, server, tool, arguments) the second token got
the first one's cached *allow*. Also the other way round (a cached refusal does not hold
back a stronger token), and ``tools/list`` filtering, whose decisions share the cache.

Token exchange likewise: the ``credentials`` stage's cache of exchanged tokens was keyed
on (server, subject, scopes), so a second token of ``alice`` got the upstream token
exchanged for her first one. Here a real OAuth server (:mod:`tests.upstreams.oauth_server`,
served in process by uvicorn on 127.0.0.1) signs the agents' tokens and exchanges them.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn

from extproc.api import Principal
from extproc.config.pipeline_file import StageSpec
from extproc.config.resources import API_VERSION, Catalog, parse_documents
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.testing import StageHarness
from plugins.policy import caller_digest
from tests.idp import AUDIENCE, ISSUER, Idp, agent_doc
from tests.messages import body_msg, headers_msg
from tests.policies import call, catalog_of, policy_doc, refused, send
from tests.upstreams.oauth_server import TOKEN_EXCHANGE, AuthServer, build_app
from tests.upstreams.serving import bind_loopback

DEPARTMENT_REGO = """package mcp
import rego.v1
default allow := true
allow := false if { input.principal.claims.department == "sales" }
"""


def _scope_policy() -> dict[str, Any]:
    return policy_doc([{"tools": ["add"], "scopes": ["tools.write"]}])


def _trust_policy() -> dict[str, Any]:
    return policy_doc([{"tools": ["add"], "requiredTrust": "high"}])


def _rego_policy() -> dict[str, Any]:
    return policy_doc([], rego={"query": "data.mcp.allow", "module": DEPARTMENT_REGO})


@dataclass(frozen=True)
class Case:
    """A policy, the claims of a token it allows and of one it refuses, and the refusal."""

    policy: Callable[[], dict[str, Any]]
    strong: dict[str, Any]
    weak: dict[str, Any]
    status: int
    code: int


CASES = {
    "scope": Case(_scope_policy, {"scope": "tools.write"}, {"scope": "tools.read"}, 403, -32001),
    "consent": Case(_trust_policy, {"mcp_trust": "high"}, {"mcp_trust": "low"}, 200, -32003),
    "rego claim": Case(_rego_policy, {"department": "support"}, {"department": "sales"}, 200, -32003),
}


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_a_weaker_token_of_the_same_subject_is_refused_right_after_an_allowed_one(
    pipeline: Pipeline, idp: Idp, case: str
) -> None:
    chosen = CASES[case]
    catalog = catalog_of(idp, chosen.policy(), granted="high")
    arguments = {"a": 1, "b": 2}
    _proc, allowed = await send(pipeline, catalog, idp.mint("alice", **chosen.strong), call("add", arguments))
    assert allowed.HasField("request_body"), "the first token must be allowed"
    _proc, second = await send(pipeline, catalog, idp.mint("alice", **chosen.weak), call("add", arguments))
    status, _headers, body = refused(second)
    assert (status, body["id"], body["error"]["code"]) == (chosen.status, 7, chosen.code)


@pytest.mark.parametrize("case", CASES, ids=str)
async def test_a_cached_refusal_does_not_hold_back_a_stronger_token(pipeline: Pipeline, idp: Idp, case: str) -> None:
    chosen = CASES[case]
    catalog = catalog_of(idp, chosen.policy(), granted="high")
    _proc, first = await send(pipeline, catalog, idp.mint("alice", **chosen.weak), call("add", {"a": 1}))
    refused(first)
    _proc, second = await send(pipeline, catalog, idp.mint("alice", **chosen.strong), call("add", {"a": 1}))
    assert second.HasField("request_body"), "the stronger token got the weaker one's cached refusal"


async def _listed(pipeline: Pipeline, catalog: Catalog, token: str) -> list[str]:
    proc, response = await send(pipeline, catalog, token, {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    assert response.HasField("request_body")
    await proc.handle(headers_msg({":status": "200", "content-type": "application/json"}, response=True))
    tools = [{"name": "echo"}, {"name": "add"}]
    answer = await proc.handle(body_msg({"jsonrpc": "2.0", "id": 3, "result": {"tools": tools}}, response=True))
    mutation = answer.response_body.response.body_mutation.body
    listed = json.loads(mutation) if mutation else {"result": {"tools": tools}}
    return [t["name"] for t in listed["result"]["tools"]]


async def test_tools_list_is_filtered_for_each_token_not_for_the_subject(pipeline: Pipeline, idp: Idp) -> None:
    catalog = catalog_of(idp, _trust_policy(), granted="high")
    assert await _listed(pipeline, catalog, idp.mint("alice", mcp_trust="high")) == ["echo", "add"]
    assert await _listed(pipeline, catalog, idp.mint("alice", mcp_trust="low")) == ["echo"]
    assert await _listed(pipeline, catalog, idp.mint("alice", mcp_trust="high")) == ["echo", "add"]


def test_the_cache_key_holds_a_digest_never_the_token(idp: Idp) -> None:
    token = idp.mint("alice")
    one = Principal(subject="alice", issuer="https://issuer.test", token=token, consented="high")
    other = Principal(subject="alice", issuer="https://issuer.test", token=token, consented="low")
    assert caller_digest(one) != caller_digest(other)
    assert token not in caller_digest(one) and len(caller_digest(one)) == 64


@dataclass
class OAuth:
    """The OAuth server running in this process, and where it listens."""

    state: AuthServer
    base: str

    def agent_token(self, sub: str, **claims: Any) -> str:
        now = int(time.time())
        return self.state.sign({"iss": ISSUER, "sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims})

    def exchanges(self) -> list[dict[str, Any]]:
        return [r for r in self.state.requests if r["grant_type"] == TOKEN_EXCHANGE and r["outcome"] == "issued"]


@pytest.fixture
async def oauth() -> AsyncIterator[OAuth]:
    sock = bind_loopback(0)
    state = AuthServer(clients={"gateway": "gw-secret"}, issuer=ISSUER)
    server = uvicorn.Server(uvicorn.Config(build_app(state), log_level="warning", access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not task.done(), "the OAuth server did not start"
        await asyncio.sleep(0.01)
    yield OAuth(state, f"http://127.0.0.1:{sock.getsockname()[1]}")
    server.should_exit = True
    await task


def _exchange_catalog(oauth: OAuth) -> Catalog:
    exchange = {
        "tokenUrl": f"{oauth.base}/token",
        "clientId": "gateway",
        "clientSecretRef": {"name": "oauth-client", "key": "secret"},
        "audience": "aud-xchg",
    }
    server = {
        "apiVersion": API_VERSION,
        "kind": "MCPServer",
        "metadata": {"name": "demo"},
        "spec": {"url": "http://127.0.0.1:9/mcp", "allowedTools": ["*"], "upstreamAuth": {"tokenExchange": exchange}},
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "oauth-client"}}
    docs = [
        server,
        {**secret, "stringData": {"secret": "gw-secret"}},
        agent_doc("agent", f"{oauth.base}/jwks", ["demo"]),
    ]
    return parse_documents(docs, "test")


async def test_two_tokens_of_one_subject_get_two_exchanges(oauth: OAuth) -> None:
    credentials = Registry().build(StageSpec(name="credentials"))
    first, second = oauth.agent_token("alice", scope="tools.read"), oauth.agent_token("alice", scope="tools.call")
    async with StageHarness(credentials, stages_before=["authn", "mcp"], resources=_exchange_catalog(oauth)) as h:
        sent = []
        for token in (first, second, first):
            result = await h.post(call("echo"), headers={"authorization": f"Bearer {token}"})
            assert result.stop is None, result.reply
            sent.append(result.upstream_headers["authorization"])
    assert [r["subject"] for r in oauth.exchanges()] == ["alice", "alice"]  # one exchange per token
    assert sent[0] != sent[1], "the second token was given the first token's exchanged credential"
    assert sent[2] == sent[0]  # the first token's exchange is still cached
    assert first not in sent and second not in sent
