"""Upstream credentials through real Envoy: the agent's token never reaches the upstream.

One pyserver stands behind several MCPServer routes that differ only in
``upstreamAuth``; the mcp stage's ``x-mcp-server`` header on each recorded request
tells which route it came through. A local OAuth server (real RS256 tokens) issues
client-credentials and exchanged tokens and records every token request.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.agents import legacy_session, modern_request, raw_post, response_messages
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import Proc, free_port, start_pyserver, start_ready_server
from tests.upstreams.pyserver import Record, read_records

pytestmark = pytest.mark.integration

AGENT_TOKEN = "agent-secret-token-do-not-forward"
STATIC_TOKEN = "static-upstream-token-1"
ENV_TOKEN = "env-upstream-token-2"
FILE_TOKEN = "file-upstream-token-3"
CLIENT_SECRET = "gw-client-s3cret"
ENV_VAR = "MCP_EXTPROC_TEST_UPSTREAM_TOKEN"
AGENT = {"authorization": f"Bearer {AGENT_TOKEN}", "cookie": "session=agent-cookie"}


@dataclass
class Setup:
    base: str
    metrics: str
    gateway: Proc
    records: Path
    oauth: str

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def received(self, server: str) -> list[Record]:
        return [r for r in read_records(self.records) if r["headers"].get("x-mcp-server") == server]

    def token_requests(self, **match: Any) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = httpx.get(f"{self.oauth}/admin/requests").json()
        return [r for r in found if all(r.get(k) == v for k, v in match.items())]

    def behave(self, **changes: Any) -> None:
        httpx.post(f"{self.oauth}/admin/behaviour", json=changes).raise_for_status()


def _server(name: str, url: str, auth: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": url, "allowedTools": ["echo", "add"]}
    if auth is not None:
        spec["upstreamAuth"] = auth
    return {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name}, "spec": spec}


def _client_credentials(token_url: str, audience: str, **more: Any) -> dict[str, Any]:
    return {
        "clientCredentials": {
            "tokenUrl": token_url,
            "clientId": "gateway",
            "clientSecretRef": {"name": "oauth-client", "key": "secret"},
            "audience": audience,
            **more,
        }
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("credentials")
    procs: list[Proc] = []
    os.environ[ENV_VAR] = ENV_TOKEN
    try:
        oauth, oauth_port = start_ready_server(
            "tests.upstreams.oauth_server", "--client", f"gateway:{CLIENT_SECRET}", name="oauth", log_dir=tmp
        )
        procs.append(oauth)
        records = tmp / "upstream.jsonl"
        upstream, port = start_pyserver("legacy-json", records)
        procs.append(upstream)
        url = f"http://127.0.0.1:{port}/mcp"
        token_url = f"http://127.0.0.1:{oauth_port}/token"
        dead_url = f"http://127.0.0.1:{free_port()}/token"
        token_file = tmp / "token.txt"
        token_file.write_text(FILE_TOKEN + "\n")
        docs: list[dict[str, Any]] = [
            _server("plain", url, None),
            _server("static", url, {"bearer": {"secretRef": {"name": "upstream", "key": "token"}}}),
            _server("envtok", url, {"bearer": {"env": ENV_VAR}}),
            _server("filetok", url, {"bearer": {"file": str(token_file)}}),
            _server(
                "cc",
                url,
                _client_credentials(token_url, "aud-cc", scopes=["tools.read", "tools.call"], resource=url),
            ),
            _server("flight", url, _client_credentials(token_url, "aud-flight")),
            _server("short", url, _client_credentials(token_url, "aud-short")),
            _server("failing", url, _client_credentials(token_url, "aud-failing")),
            _server("down", url, _client_credentials(dead_url, "aud-down")),
            _server(
                "xchg",
                url,
                {
                    "tokenExchange": {
                        "tokenUrl": token_url,
                        "clientId": "gateway",
                        "clientSecretRef": {"name": "oauth-client", "key": "secret"},
                        "audience": "aud-xchg",
                    }
                },
            ),
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "upstream"},
                "stringData": {"token": STATIC_TOKEN},
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "oauth-client"},
                "stringData": {"secret": CLIENT_SECRET},
            },
        ]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        gateway, base, metrics = start_gateway(resources, tmp)
        procs.append(gateway)
        yield Setup(base, metrics, gateway, records, f"http://127.0.0.1:{oauth_port}")
    finally:
        os.environ.pop(ENV_VAR, None)
        for proc in reversed(procs):
            proc.stop()


async def call_echo(setup: Setup, server: str, text: str = "hi") -> httpx.Response:
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": text}})
    return await raw_post(setup.url(server), body, {**headers, **AGENT})


def bearer_of(record: Record) -> str | None:
    value = record["headers"].get("authorization")
    return value.removeprefix("Bearer ") if value is not None else None


def claims_of(setup: Setup, token: str) -> dict[str, Any]:
    """Verify ``token`` against the authorization server's published JWKS."""
    keys = KeySet.import_key_set(httpx.get(f"{setup.oauth}/jwks").json())
    return dict(jwt.decode(token, keys, algorithms=["RS256"]).claims)


def assert_ok(reply: httpx.Response, text: str = "hi") -> None:
    assert reply.status_code == 200, reply.text
    [message] = response_messages(reply)
    assert message["result"]["content"][0]["text"] == text


async def test_without_upstream_auth_the_agent_token_is_removed(setup: Setup) -> None:
    assert_ok(await call_echo(setup, "plain"))
    [record] = setup.received("plain")
    assert "authorization" not in record["headers"]
    assert "cookie" not in record["headers"]  # not on the allow-list, not in forwardHeaders


@pytest.mark.parametrize(
    ("server", "expected"), [("static", STATIC_TOKEN), ("envtok", ENV_TOKEN), ("filetok", FILE_TOKEN)]
)
async def test_static_bearer_replaces_the_agent_token(setup: Setup, server: str, expected: str) -> None:
    assert_ok(await call_echo(setup, server))
    assert [bearer_of(r) for r in setup.received(server)] == [expected]


async def test_client_credentials_token_is_injected_and_cached(setup: Setup) -> None:
    assert_ok(await call_echo(setup, "cc", "one"), "one")
    assert_ok(await call_echo(setup, "cc", "two"), "two")
    tokens = [bearer_of(r) for r in setup.received("cc")]
    assert len(tokens) == 2 and tokens[0] == tokens[1] and tokens[0] is not None
    claims = claims_of(setup, tokens[0])
    assert claims["sub"] == "gateway"
    assert claims["scope"] == "tools.read tools.call"
    assert claims["aud"] == "aud-cc"
    [fetch] = setup.token_requests(audience="aud-cc")
    assert fetch["grant_type"] == "client_credentials"
    host = setup.received("cc")[0]["headers"]["host"]
    assert fetch["resource"] == f"http://{host}/mcp"
    assert fetch["client_id"] == "gateway" and fetch["outcome"] == "issued"
    assert metric_value(setup.metrics, "mcp_extproc_upstream_token_fetches_total", server="cc", outcome="ok") == 1


async def test_a_legacy_session_carries_the_upstream_token_on_every_request(setup: Setup) -> None:
    async with legacy_session(setup.url("cc"), headers=AGENT) as session:
        result = await session.call_tool("add", {"a": 1, "b": 2})
    assert result.structured_content == {"result": 3}
    # GET and DELETE carry no body, hence no x-mcp-server: find them by session id.
    sessions = {r["headers"].get("mcp-session-id") for r in setup.received("cc")} - {None}
    records = setup.received("cc") + [
        r
        for r in read_records(setup.records)
        if r["method"] != "POST" and r["headers"].get("mcp-session-id") in sessions
    ]
    methods = {r["method"] for r in records}
    assert {"POST", "GET", "DELETE"} <= methods
    assert {bearer_of(r) for r in records} == {bearer_of(records[0])}
    assert all(AGENT_TOKEN not in json.dumps(r) for r in records)


async def test_concurrent_requests_share_one_token_fetch(setup: Setup) -> None:
    setup.behave(delay_s=0.5)
    try:
        replies = await asyncio.gather(*(call_echo(setup, "flight", f"n{i}") for i in range(8)))
    finally:
        setup.behave(delay_s=0)
    for i, reply in enumerate(replies):
        assert_ok(reply, f"n{i}")
    assert len(setup.token_requests(audience="aud-flight")) == 1
    assert len({bearer_of(r) for r in setup.received("flight")}) == 1


async def test_a_token_is_refreshed_before_it_expires(setup: Setup) -> None:
    setup.behave(expires_in=2)
    try:
        assert_ok(await call_echo(setup, "short"))
        assert_ok(await call_echo(setup, "short"))
        assert len(setup.token_requests(audience="aud-short")) == 1
        # Refreshed a quarter of the lifetime before expiry: 1.5 s after it was issued.
        issued = setup.token_requests(audience="aud-short")[0]["at"]
        await asyncio.sleep(max(0.0, issued + 1.6 - time.time()))
        assert_ok(await call_echo(setup, "short"))
    finally:
        setup.behave(expires_in=300)
    fetches = setup.token_requests(audience="aud-short")
    assert len(fetches) == 2
    tokens = [bearer_of(r) for r in setup.received("short")]
    assert tokens[0] == tokens[1] != tokens[2]
    assert claims_of(setup, tokens[2] or "")["exp"] > claims_of(setup, tokens[0] or "")["exp"]


async def test_a_token_endpoint_that_is_down_refuses_with_503(setup: Setup) -> None:
    reply = await call_echo(setup, "down")
    assert reply.status_code == 503
    error = reply.json()["error"]
    assert error["code"] == -32603
    assert "cannot be reached" in error["message"] and "'down'" in error["message"]
    assert reply.json()["id"] == 1
    assert setup.received("down") == []


async def test_a_failing_token_endpoint_refuses_with_502(setup: Setup) -> None:
    setup.behave(fail_status=500)
    try:
        reply = await call_echo(setup, "failing")
    finally:
        setup.behave(fail_status=None)
    assert reply.status_code == 502
    assert "HTTP 500 (server_error)" in reply.json()["error"]["message"]
    assert setup.received("failing") == []
    # The next request fetches again (failures are not cached) and goes through.
    assert_ok(await call_echo(setup, "failing"))


async def test_token_exchange_without_a_validated_token_is_refused(setup: Setup) -> None:
    reply = await call_echo(setup, "xchg")
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["code"] == -32001
    assert "token exchange" in error["message"]
    assert setup.received("xchg") == []
    assert setup.token_requests(audience="aud-xchg") == []


async def test_no_token_or_secret_appears_in_logs_or_metrics(setup: Setup) -> None:
    assert_ok(await call_echo(setup, "cc", "again"), "again")
    await call_echo(setup, "down")
    secrets = [AGENT_TOKEN, CLIENT_SECRET, STATIC_TOKEN, ENV_TOKEN, FILE_TOKEN, "agent-cookie"]
    secrets += [t for r in setup.received("cc") if (t := bearer_of(r))]
    output = setup.gateway.output()
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(setup.metrics)).text
    for secret in secrets:
        assert secret not in output
        assert secret not in metrics
