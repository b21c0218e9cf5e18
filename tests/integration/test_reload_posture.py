"""A reload of a running gateway never switches authentication off (real ``mcp-extproc up`` and Envoy).

    agent (no token / a real signed JWT) ──▶ Envoy ──▶ mcp-extproc (default pipeline)
        ──▶ tests.upstreams.pyserver (records what it receives; its upstream credential is a Secret)

The resource file is rewritten without its only MCPAgent while the gateway runs: the reload
is refused (an ERROR line, ``mcp_extproc_config_reloads_total{result="refused"}``), the last
good resources stay, and an anonymous caller still gets 401 and never reaches the upstream
with the injected credential.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.agents import legacy_session, raw_post
from tests.idp import Idp, agent_doc
from tests.integration.conftest import metric_value, start_gateway
from tests.procs import start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

UPSTREAM_TOKEN = "reload-posture-upstream-token"
"""A made-up token: the test upstream ignores it."""


def documents(port: int, agents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The server (its upstream credential from a Secret), the Secret and ``agents``."""
    server = {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPServer",
        "metadata": {"name": "py"},
        "spec": {
            "url": f"http://127.0.0.1:{port}/mcp",
            "allowedTools": ["echo"],
            "upstreamAuth": {"bearer": {"secretRef": {"name": "upstream", "key": "t"}}},
        },
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "upstream"}}
    secret["stringData"] = {"t": UPSTREAM_TOKEN}
    return [server, secret, *agents]


def echo(text: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": text}}}


async def test_removing_the_last_agent_is_refused_and_anonymous_callers_stay_out(tmp_path: Path, idp: Idp) -> None:
    records = tmp_path / "py.jsonl"
    upstream, port = start_pyserver("legacy-json", records)
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump_all(documents(port, [agent_doc("agent", idp.jwks_uri, ["py"])])))
    gateway, base, metrics = start_gateway(resources, tmp_path, "--reload-interval", "0.2")
    url = f"{base}/py/mcp"
    try:
        before = await raw_post(url, echo("before"))
        assert before.status_code == 401, before.text

        resources.write_text(yaml.safe_dump_all(documents(port, [])))
        refused = gateway.wait_for_line(r"ERROR .*reload of \S+ refused", 20)
        assert refused is not None
        output = gateway.output()
        assert "declare no MCPAgent, but MCPAgent 'agent' is in force: authentication would be switched off" in output
        assert "INFO mcp_extproc.reload: reloaded" not in output
        assert metric_value(metrics, "mcp_extproc_config_reloads_total", result="refused") == 1
        assert metric_value(metrics, "mcp_extproc_config_reloads_total", result="applied") == 0

        marker = f"anonymous {uuid.uuid4().hex}"
        after = await raw_post(url, echo(marker))
        assert after.status_code == 401, after.text
        assert not any(marker in json.dumps(record) for record in read_records(records))

        # The last good resources are in force: the agent's token still works.
        async with legacy_session(url, headers={"authorization": f"Bearer {idp.mint('alice')}"}) as session:
            result = await session.call_tool("echo", {"text": "with a token"})
        assert result.structured_content == {"result": "with a token"}
    finally:
        gateway.stop()
        upstream.stop()
