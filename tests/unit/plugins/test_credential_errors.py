"""An upstream credential that cannot be read: the caller learns which server, only the log learns where.

Data flow: the ``credentials`` stage (after ``mcp``) in a :class:`~extproc.testing.StageHarness`,
for an ``MCPServer`` whose ``upstreamAuth.bearer`` names a file that does not exist, or an
environment variable that is not set, or a Secret key that is missing at run time
(its value removed after loading). The agent gets 503 and a JSON-RPC error naming the
server; the file path, the variable's name and the Secret's name stay in the
exchange's log line. Before the fix, the caller's message carried them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from extproc.config.pipeline_file import StageSpec
from extproc.config.resources import API_VERSION, parse_documents
from extproc.core.registry import Registry
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.testing import StageHarness

ENV_VAR = "MCP_EXTPROC_TEST_UNSET_UPSTREAM_TOKEN"
CALL = {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "echo", "arguments": {}}}


def _server(bearer: dict[str, Any]) -> dict[str, Any]:
    spec = {"url": "http://127.0.0.1:9/mcp", "allowedTools": ["*"], "upstreamAuth": {"bearer": bearer}}
    return {"apiVersion": API_VERSION, "kind": "MCPServer", "metadata": {"name": "vault"}, "spec": spec}


def _harness(resources: Any) -> StageHarness:
    credentials = Registry().build(StageSpec(name="credentials"))
    return StageHarness(credentials, stages_before=["mcp"], resources=resources)


async def _refusal(harness: StageHarness, method: str) -> dict[str, Any]:
    result = await (harness.post(CALL) if method == "POST" else harness.get())
    assert result.reply is not None, "the request must not be forwarded"
    assert result.reply.status == 503
    body: dict[str, Any] = result.reply.json()
    assert body["error"]["code"] == INTERNAL_ERROR
    assert body["id"] == (4 if method == "POST" else None)
    return body


def _logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "mcp_extproc.exchange")


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_a_missing_bearer_file_is_named_in_the_log_not_to_the_caller(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    path = tmp_path / "secrets-dir" / "upstream-token.txt"
    caplog.set_level(logging.WARNING, logger="mcp_extproc.exchange")
    body = await _refusal(_harness([_server({"file": str(path)})]), method)
    message = body["error"]["message"]
    assert "'vault'" in message and "could not be read" in message
    assert str(path) not in message and "secrets-dir" not in message and "upstream-token" not in message
    assert str(path) in _logged(caplog)


@pytest.mark.parametrize("method", ["POST", "GET"])
async def test_an_unset_environment_variable_is_named_in_the_log_not_to_the_caller(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, method: str
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    caplog.set_level(logging.WARNING, logger="mcp_extproc.exchange")
    body = await _refusal(_harness([_server({"env": ENV_VAR})]), method)
    message = body["error"]["message"]
    assert "'vault'" in message and "could not be read" in message
    assert ENV_VAR not in message
    assert ENV_VAR in _logged(caplog)


async def test_a_secret_missing_at_run_time_is_named_in_the_log_not_to_the_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "vault-key"}, "stringData": {"token": "t0k"}}
    loaded = parse_documents([_server({"secretRef": {"name": "vault-key", "key": "token"}}), secret], "test")
    catalog = dataclasses.replace(loaded, secrets={})  # gone since it was loaded (a cluster Secret deleted, say)
    caplog.set_level(logging.WARNING, logger="mcp_extproc.exchange")
    body = await _refusal(_harness(catalog), "POST")
    assert "vault-key" not in body["error"]["message"] and "'vault'" in body["error"]["message"]
    logged = _logged(caplog)
    assert "vault-key" in logged and "t0k" not in logged


async def test_a_readable_file_still_injects_its_credential(tmp_path: Path) -> None:
    path = tmp_path / "token.txt"
    path.write_text("upstream-file-token\n")
    result = await _harness([_server({"file": str(path)})]).post(CALL, headers={"authorization": "Bearer agent"})
    assert result.upstream_headers["authorization"] == "Bearer upstream-file-token"
