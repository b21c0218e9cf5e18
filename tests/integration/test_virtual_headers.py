"""A backend's ``forwardHeaders`` hold through a virtual server: it gets them, the other backend does not.

Behind ``/both/mcp`` (through `mcp-extproc up`): two Python SDK servers that record every
request they receive, ``a`` (legacy, no prefix, ``forwardHeaders: [X-Tenant]``) and ``b``
(2026-07-28, prefix ``b_``, no forwardHeaders). The agent, the Python SDK client on both
eras, sends ``X-Tenant`` and ``X-Api-Key`` on every request of a session that lists the
merged tools and calls a tool of each backend.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from tests.agents import legacy_session, modern_session
from tests.integration.conftest import PY_TOOLS, resource_doc, start_gateway
from tests.procs import start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration


async def session_work(url: str, modern: bool, tenant: str) -> set[str]:
    headers = {"x-tenant": tenant, "x-api-key": "agent-secret-key"}
    opened = modern_session(url, headers=headers) if modern else legacy_session(url, headers=headers)
    async with opened as session:
        names = {t.name for t in (await session.list_tools()).tools}
        assert not (await session.call_tool("echo", {"text": tenant})).is_error  # a's
        assert not (await session.call_tool("b_echo", {"text": tenant})).is_error  # b's
    return names


@pytest.mark.parametrize("modern", [False, True], ids=["legacy", "modern"])
def test_forward_headers_reach_only_their_own_backend(tmp_path: Path, modern: bool) -> None:
    a, a_port = start_pyserver("legacy-sse", tmp_path / "a.jsonl")
    b, b_port = start_pyserver("modern", tmp_path / "b.jsonl")
    try:
        docs: list[dict[str, object]] = [
            resource_doc("a", a_port, {**PY_TOOLS, "forwardHeaders": ["X-Tenant"]}),
            resource_doc("b", b_port, PY_TOOLS),
            {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPVirtualServer",
                "metadata": {"name": "both"},
                "spec": {"servers": [{"name": "a"}, {"name": "b", "prefix": "b_"}]},
            },
        ]
        resources = tmp_path / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        up, base, _ = start_gateway(resources, tmp_path)
        try:
            tenant = f"tenant-{'modern' if modern else 'legacy'}"
            names = asyncio.run(session_work(f"{base}/both/mcp", modern, tenant))
            assert {"echo", "b_echo"} <= names
        finally:
            up.stop()
    finally:
        a.stop()
        b.stop()
    a_records = [r for r in read_records(tmp_path / "a.jsonl") if r["method"] == "POST"]
    b_records = [r for r in read_records(tmp_path / "b.jsonl") if r["method"] == "POST"]
    methods = {r["body"].get("method") for r in a_records if isinstance(r["body"], dict)}
    assert {"tools/list", "tools/call"} <= methods  # the gateway's own list request and the routed call
    assert all(
        r["headers"].get("x-tenant") == tenant
        for r in a_records
        if isinstance(r["body"], dict) and r["body"].get("method") in ("tools/list", "tools/call")
    )
    assert b_records and all("x-tenant" not in r["headers"] for r in b_records)
    assert all("x-api-key" not in r["headers"] for r in a_records + b_records)
