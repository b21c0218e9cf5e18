"""Identity-bound upstream features through real Envoy: session binding and token exchange.

An ``MCPAgent`` trusts JWTs of the local OAuth server; the ``authn`` stage validates
them and sets the principal. Two agents (``alice``, ``bob``) hold real signed tokens.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.agents import BASE_HEADERS, modern_request, raw_post, response_messages
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import Proc, start_pyserver, start_ready_server
from tests.upstreams.pyserver import Record, read_records

pytestmark = pytest.mark.integration

CLIENT_SECRET = "exchange-client-s3cret"
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


@dataclass
class Setup:
    base: str
    oauth: str
    records: Path
    gateway: Proc
    metrics: str

    def checks(self) -> float:
        """ext_authz Checks served: tools/calls that took the auto front door's fast route."""
        return metric_value(self.metrics, "mcp_extproc_phases_total", phase="check")

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def token_for(self, subject: str) -> str:
        reply = httpx.post(f"{self.oauth}/issue", json={"sub": subject, "aud": "mcp-gateway"})
        token: str = reply.json()["token"]
        return token

    def received(self, server: str) -> list[Record]:
        return [r for r in read_records(self.records) if r["headers"].get("x-mcp-server") == server]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("identity")
    procs: list[Proc] = []
    try:
        oauth, oauth_port = start_ready_server(
            "tests.upstreams.oauth_server", "--client", f"gateway:{CLIENT_SECRET}", name="oauth", log_dir=tmp
        )
        procs.append(oauth)
        issuer = f"http://127.0.0.1:{oauth_port}"
        records = tmp / "upstream.jsonl"
        upstream, port = start_pyserver("legacy-json", records)
        procs.append(upstream)
        url = f"http://127.0.0.1:{port}/mcp"
        exchange = {
            "tokenExchange": {
                "tokenUrl": f"{issuer}/token",
                "clientId": "gateway",
                "clientSecretRef": {"name": "oauth-client", "key": "secret"},
                "audience": "aud-upstream",
                "scopes": ["tools.call"],
            }
        }
        docs: list[dict[str, Any]] = [
            _doc("MCPServer", "sessions", {"url": url, "allowedTools": ["*"], "keepalive": "Never"}),
            _doc("MCPServer", "xchg", {"url": url, "allowedTools": ["*"], "upstreamAuth": exchange}),
            _doc(
                "MCPAgent",
                "agents",
                {
                    "mcpServerRefs": [{"name": "sessions"}, {"name": "xchg"}],
                    "identity": {"jwt": {"issuer": issuer, "audiences": ["mcp-gateway"], "jwksUri": f"{issuer}/jwks"}},
                },
            ),
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
        yield Setup(base, issuer, records, gateway, metrics)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _doc(kind: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


async def post(url: str, token: str, message: dict[str, Any], session: str | None = None) -> httpx.Response:
    headers = {**BASE_HEADERS, "authorization": f"Bearer {token}", "mcp-protocol-version": "2025-06-18"}
    if session is not None:
        headers["mcp-session-id"] = session
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.post(url, content=json.dumps(message), headers=headers)


async def get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=30) as client:
        return (await client.get(url)).json()


def echo(id_: int, text: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": text}},
    }


async def test_a_session_is_refused_to_another_principal(setup: Setup) -> None:
    alice, bob = setup.token_for("alice"), setup.token_for("bob")
    url = setup.url("sessions")
    opened = await post(url, alice, INIT)
    assert opened.status_code == 200, opened.text
    session = opened.headers["mcp-session-id"]
    initialized = await post(url, alice, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    assert initialized.status_code == 202

    # The calls take the fast route (one ext_authz Check each): the binding holds there too.
    checks = setup.checks()
    stolen = await post(url, bob, echo(5, "from bob"), session)
    assert stolen.status_code == 404
    assert stolen.json()["id"] == 5
    assert "belongs to another caller" in stolen.json()["error"]["message"]
    assert not [r for r in setup.received("sessions") if "from bob" in json.dumps(r["body"])]

    own = await post(url, alice, echo(6, "from alice"), session)
    assert own.status_code == 200, own.text
    assert response_messages(own)[0]["result"]["content"][0]["text"] == "from alice"
    # The SDK server repeats its own session id on every response; on the fast route (no
    # response phase to swap it) it is removed, so the client keeps the signed one.
    assert own.headers.get("mcp-session-id") in (None, session)

    made_up = await post(url, alice, echo(7, "guess"), "0" * 32)
    assert made_up.status_code == 404
    assert "not a session id this gateway issued" in made_up.json()["error"]["message"]
    assert setup.checks() == checks + 3

    # A refreshed token (new bytes, same issuer and subject) keeps the session; the id names
    # the principal, not the token.
    refreshed = setup.token_for("alice")
    assert refreshed != alice
    again = await post(url, refreshed, echo(8, "refreshed"), session)
    assert again.status_code == 200, again.text
    # Declaring 2026-07-28 (no sessions there) does not skip the check: bob is still refused,
    # and nothing reaches the upstream.
    call = echo(9, "bob as modern")
    call["params"]["_meta"] = {"io.modelcontextprotocol/protocolVersion": "2026-07-28"}
    headers = {
        **BASE_HEADERS,
        "authorization": f"Bearer {bob}",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "echo",
        "mcp-session-id": session,
    }
    async with httpx.AsyncClient(timeout=30) as client:
        modern = await client.post(url, content=json.dumps(call), headers=headers)
    assert modern.status_code == 404, modern.text
    assert "belongs to another caller" in modern.json()["error"]["message"]
    # Two Mcp-Session-Id headers (one of them the raw upstream id): which one would the
    # server read? Neither: 400, nothing forwarded. (Envoy hands them to us joined by ", ".)
    payload = session.split(".")[1]
    upstream_id = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sid"]
    lines = [(k, v) for k, v in {**BASE_HEADERS, "authorization": f"Bearer {alice}"}.items()]
    lines += [("mcp-protocol-version", "2025-06-18"), ("mcp-session-id", session), ("mcp-session-id", upstream_id)]
    async with httpx.AsyncClient(timeout=30) as client:
        twice = await client.post(url, content=json.dumps(echo(10, "twice")), headers=lines)
    assert twice.status_code == 400, twice.text
    assert "mcp-session-id header was sent more than once" in twice.json()["error"]["message"]
    assert not [r for r in setup.received("sessions") if "twice" in json.dumps(r["body"])]
    assert not [r for r in setup.received("sessions") if "bob as modern" in json.dumps(r["body"])]


async def test_token_exchange_sends_the_exchanged_token_upstream(setup: Setup) -> None:
    alice = setup.token_for("alice")
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "exchanged"}})
    reply = await raw_post(setup.url("xchg"), body, {**headers, "authorization": f"Bearer {alice}"})
    assert reply.status_code == 200, reply.text
    [record] = setup.received("xchg")
    sent = record["headers"]["authorization"].removeprefix("Bearer ")
    assert sent != alice
    keys = KeySet.import_key_set(await get_json(f"{setup.oauth}/jwks"))
    claims = jwt.decode(sent, keys, algorithms=["RS256"]).claims
    assert claims["sub"] == "alice"
    assert claims["act"] == {"sub": "gateway"}
    assert claims["aud"] == "aud-upstream"
    assert claims["scope"] == "tools.call"
    [exchange] = [r for r in await get_json(f"{setup.oauth}/admin/requests") if r["audience"] == "aud-upstream"]
    assert exchange["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert exchange["subject"] == "alice"
    assert alice not in setup.gateway.output() and sent not in setup.gateway.output()


async def test_each_principal_gets_its_own_exchanged_token(setup: Setup) -> None:
    bob = setup.token_for("bob")
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "bob exchanged"}})
    reply = await raw_post(setup.url("xchg"), body, {**headers, "authorization": f"Bearer {bob}"})
    assert reply.status_code == 200, reply.text
    subjects = set()
    keys = KeySet.import_key_set(await get_json(f"{setup.oauth}/jwks"))
    for record in setup.received("xchg"):
        token = record["headers"]["authorization"].removeprefix("Bearer ")
        subjects.add(jwt.decode(token, keys, algorithms=["RS256"]).claims["sub"])
    assert subjects == {"alice", "bob"}
