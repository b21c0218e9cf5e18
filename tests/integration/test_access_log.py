"""Envoy's access log and the audit line through real ``up``: ids Envoy chose, fields nobody can forge.

- An agent's ``x-request-id: forged`` names neither the audit line nor the access log line:
  Envoy generates its own id (loopback agents included), and both lines carry the same one.
- The access log line is one JSON object: a tool name with spaces, quotes and ``key=value``
  pairs is one value, never extra fields.
- The path is logged without its query string (a query can carry a token), and as the
  agent sent it, not as an ``x-envoy-original-path`` header it made up.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import httpx
import pytest
import yaml

from tests.agents import BASE_HEADERS, LEGACY_VERSION, modern_request, raw_post
from tests.integration.conftest import PY_TOOLS, resource_doc, start_gateway
from tests.procs import Proc, start_pyserver

pytestmark = pytest.mark.integration

FORGED_TOOL: Final = 'slow_ x" mcp_tool=forged principal="admin'
"""Allowed (``slow_*``), so it reaches the upstream; in a text log line it would add two fields."""
PATHS: Final = ("/py/mcp", "/nowhere")


@dataclass
class Logged:
    """A running ``up`` (default front door) in front of a legacy and a modern upstream."""

    base: str
    proc: Proc


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    tmp = tmp_path_factory.mktemp("access-log")
    procs: list[Proc] = []
    try:
        docs = []
        for name, mode in (("py", "legacy-json"), ("modern", "modern")):
            proc, port = start_pyserver(mode, tmp / f"{name}.jsonl")  # type: ignore[arg-type]
            procs.append(proc)
            docs.append(resource_doc(name, port, PY_TOOLS))
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        up, base, _metrics = start_gateway(resources, tmp)
        procs.append(up)
        yield Logged(base, up)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _access_lines(proc: Proc) -> list[dict[str, Any]]:
    """Every access log line so far (``up`` prints Envoy's stdout with an ``[envoy]`` prefix)."""
    lines = []
    for line in proc.output().splitlines():
        if line.startswith("[envoy] {"):
            entry = json.loads(line.removeprefix("[envoy] "))  # every line must parse
            assert isinstance(entry, dict)
            lines.append(entry)
    return lines


def _audit_lines(proc: Proc) -> list[dict[str, Any]]:
    found = []
    for line in proc.output().splitlines():
        if "mcp_extproc.audit: " in line:
            found.append(json.loads(line.split("mcp_extproc.audit: ", 1)[1]))
    return found


async def _logged(proc: Proc, match: Any, deadline_s: float = 10.0) -> dict[str, Any]:
    """The first access log line ``match`` accepts (Envoy flushes every 0.5 s under ``up``)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for entry in _access_lines(proc):
            if match(entry):
                return entry
        await asyncio.sleep(0.1)
    raise AssertionError(f"no matching access log line within {deadline_s}s; output:\n{proc.output()[-3000:]}")


async def test_a_client_chosen_request_id_is_replaced(logged: Logged) -> None:
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "which id"}}, 31)
    reply = await raw_post(f"{logged.base}/modern/mcp", body, {**headers, "x-request-id": "forged"})
    assert reply.status_code == 200
    entry = await _logged(logged.proc, lambda e: e["path"] == "/modern/mcp" and e["mcp_tool"] == "echo")
    assert entry["request_id"] not in (None, "forged")
    assert re.fullmatch(r"[0-9a-f-]{36}", entry["request_id"])  # Envoy's own UUID
    audits = [a for a in _audit_lines(logged.proc) if a["tool"] == "echo"]
    assert audits
    assert all(a["request_id"] != "forged" for a in audits)
    assert entry["request_id"] in {a["request_id"] for a in audits}  # the two logs name the same exchange


async def test_a_tool_name_with_spaces_and_quotes_is_one_json_value(logged: Logged) -> None:
    body, headers = modern_request("tools/call", {"name": FORGED_TOOL, "arguments": {}}, 32)
    await raw_post(f"{logged.base}/modern/mcp", body, headers)
    call = {"jsonrpc": "2.0", "id": 33, "method": "tools/call", "params": {"name": FORGED_TOOL, "arguments": {}}}
    await raw_post(f"{logged.base}/py/mcp", call, {"mcp-protocol-version": LEGACY_VERSION})
    for path in ("/modern/mcp", "/py/mcp"):
        entry = await _logged(logged.proc, lambda e, p=path: e["path"] == p and e["mcp_tool"] == FORGED_TOOL)
        assert entry["principal"] != "admin"
        assert entry["method"] == "POST"
        assert entry["mcp_method"] == "tools/call"


async def test_the_path_is_logged_without_query_and_unforged(logged: Logged) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        await client.get(f"{logged.base}/py/mcp?access_token=secret-in-query", headers=dict(BASE_HEADERS))
        await client.get(
            f"{logged.base}/nowhere?access_token=secret-in-query", headers={"x-envoy-original-path": "/forged/path"}
        )
    gets = [await _logged(logged.proc, lambda e, p=p: e["path"] == p and e["method"] == "GET") for p in PATHS]
    assert gets[1]["status"] == 404
    text = "\n".join(json.dumps(e) for e in _access_lines(logged.proc))
    assert "secret-in-query" not in text
    assert "/forged/path" not in text
    assert "secret-in-query" not in logged.proc.output()


def test_every_access_log_line_is_json(logged: Logged) -> None:
    lines = [line for line in logged.proc.output().splitlines() if line.startswith("[envoy] ") and '"status"' in line]
    assert lines
    for line in lines:
        json.loads(line.removeprefix("[envoy] "))
