"""URLs through real Envoy: tokens in the query string, and the configured public URL.

    agent (raw HTTP, real signed JWTs, forged Host / X-Forwarded-Proto)
        ──▶ Envoy ──ext_proc (initialize, metadata) / the fast route's HTTP Check (tools/call)
        ──▶ mcp-extproc up --public-url https://gw.example --log-level DEBUG (authn, …)
        ──▶ tests.upstreams.pyserver (records what it receives)

A token in the URL is refused with 400 and JSON-RPC -32600 on both front doors, the
upstream records nothing and none of our log lines carries it (Envoy's own access log,
prefixed ``[envoy]``, is another matter: its format is not this stage's). The
challenge and the protected-resource metadata name https://gw.example whatever Host
the agent sends.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.agents import BASE_HEADERS, raw_post
from tests.idp import Idp, agent_doc, running_idp
from tests.integration.conftest import resource_doc, start_gateway
from tests.procs import Proc, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

PUBLIC = "https://gw.example"
SECRET = "eyJhbGciOiJSUzI1NiJ9.cXVlcnktc3RyaW5nLXRva2Vu.bXVzdC1ub3QtYmUtbG9nZ2Vk"
FORGED = {"host": "evil.example", "x-forwarded-proto": "gopher", "x-forwarded-host": "evil.example"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
CALL = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}


@dataclass
class Stack:
    base: str
    proc: Proc
    idp: Idp
    records: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("public-url")
    procs: list[Proc] = []
    with running_idp() as idp:
        try:
            records = tmp / "py.jsonl"
            upstream, port = start_pyserver("legacy-json", records)
            procs.append(upstream)
            docs = [resource_doc("py", port, {"allowedTools": ["*"]}), agent_doc("agent", idp.jwks_uri, ["py"])]
            resources = tmp / "resources.yaml"
            resources.write_text(yaml.safe_dump_all(docs))
            up, base, _metrics = start_gateway(resources, tmp, "--public-url", PUBLIC, "--log-level", "DEBUG")
            procs.append(up)
            yield Stack(base, up, idp, records)
        finally:
            for proc in reversed(procs):
                proc.stop()


def _our_lines(proc: Proc) -> list[str]:
    return [line for line in proc.output().splitlines() if not line.startswith("[envoy]")]


@pytest.mark.parametrize("parameter", ["access_token", "ID_TOKEN"])
@pytest.mark.parametrize("body", [INIT, CALL], ids=["initialize", "tools-call"])
async def test_a_token_in_the_url_is_refused_and_never_logged(
    stack: Stack, parameter: str, body: dict[str, Any]
) -> None:
    headers = {"authorization": f"Bearer {stack.idp.mint('alice')}", "mcp-protocol-version": "2025-06-18"}
    before = len(read_records(stack.records))
    reply = await raw_post(f"{stack.base}/py/mcp?x=1&{parameter}={SECRET}", body, headers)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == -32600
    assert "Authorization header" in error["message"]
    assert SECRET not in reply.text
    assert len(read_records(stack.records)) == before  # the upstream recorded nothing
    lines = _our_lines(stack.proc)
    assert any('"reason":"token_in_url"' in line for line in lines)  # audited ...
    assert not [line for line in lines if SECRET in line]  # ... without the token


async def test_a_forged_host_never_reaches_the_challenge_or_the_metadata(stack: Stack) -> None:
    refused = await raw_post(f"{stack.base}/py/mcp", INIT, FORGED)
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    assert challenge.startswith(f'Bearer resource_metadata="{PUBLIC}/.well-known/oauth-protected-resource/py/mcp"')
    async with httpx.AsyncClient(timeout=10) as client:
        served = await client.get(
            f"{stack.base}/.well-known/oauth-protected-resource/py/mcp", headers={**BASE_HEADERS, **FORGED}
        )
    assert served.status_code == 200
    assert served.json()["resource"] == f"{PUBLIC}/py/mcp"
    for text in (challenge, served.text):
        assert "evil" not in text and "gopher" not in text
