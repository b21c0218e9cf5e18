"""Tool pins hold on a virtual server's merged list: the backend's pins, judged as on its own route.

Behind ``/all/mcp`` (through `mcp-extproc up`, the default pipeline): ``tests.upstreams.rugpull``
(the Python SDK server that changes its tools at run time) as backend ``rp`` with prefix
``rp_`` and ``toolPinning: Enforce``. The agent is the Python SDK client on the virtual
server; the operator approves with `mcp-extproc pins approve`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mcp.shared.exceptions import MCPError

from extproc.config.pins_file import read_pins
from plugins.lib.fingerprints import fingerprint
from tests.agents import legacy_session
from tests.integration.conftest import start_gateway
from tests.integration.test_tool_pinning import direct_rug_pull, direct_tools, server_doc
from tests.procs import start_ready_server

pytestmark = pytest.mark.integration


async def merged(url: str) -> set[str]:
    async with legacy_session(url, timeout_s=10) as session:
        return {t.name for t in (await session.list_tools()).tools}


async def refusal(url: str, tool: str) -> tuple[int, str]:
    async with legacy_session(url, timeout_s=10) as session:
        await session.list_tools()
        with pytest.raises(MCPError) as refused:
            await session.call_tool(tool, {"text": "x"})
    return refused.value.error.code, refused.value.error.message


async def called(url: str, tool: str) -> str:
    async with legacy_session(url, timeout_s=10) as session:
        answer = await session.call_tool(tool, {"text": "approved"})
    assert not answer.is_error
    return str(getattr(answer.content[0], "text", ""))


def test_a_changed_backend_tool_is_hidden_from_the_merged_list_refused_and_approved(tmp_path: Path) -> None:
    upstream, port = start_ready_server("tests.upstreams.rugpull", name="rugpull", log_dir=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        virtual = {
            "apiVersion": "mcp.extproc.io/v1alpha1",
            "kind": "MCPVirtualServer",
            "metadata": {"name": "all"},
            "spec": {"servers": [{"name": "rp", "prefix": "rp_"}]},
        }
        resources = tmp_path / "resources.yaml"
        resources.write_text(yaml.safe_dump_all([server_doc("rp", url, toolPinning="Enforce"), virtual]))
        up, base, _ = start_gateway(resources, tmp_path)
        try:
            all_url = f"{base}/all/mcp"
            assert asyncio.run(merged(all_url)) == {"rp_echo", "rp_add", "rp_rug_pull"}
            state = tmp_path / "state" / "mcp-extproc" / "pins.json"
            pinned = read_pins(state).servers["rp"].tools  # the backend's own name, its own pins
            assert {n: t.pin.digest for n, t in pinned.items() if t.pin} == {
                t["name"]: fingerprint(t) for t in asyncio.run(direct_tools(url))
            }
            asyncio.run(direct_rug_pull(url, "changed"))
            assert asyncio.run(merged(all_url)) == {"rp_rug_pull"}
            code, message = asyncio.run(refusal(all_url, "rp_echo"))
            assert code == -32003
            assert message == "the definition of tool 'echo' on MCP server 'rp' changed since it was pinned"
            env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
            approve = [sys.executable, "-m", "extproc", "pins", "approve", "rp", "echo"]
            done = subprocess.run(approve, capture_output=True, text=True, timeout=60, check=False, env=env)
            assert done.returncode == 0, done.stderr
            deadline = time.monotonic() + 10  # the stage re-reads the file at most every second
            while asyncio.run(merged(all_url)) != {"rp_echo", "rp_rug_pull"}:
                assert time.monotonic() < deadline, "the approval never reached the merged list"
                time.sleep(0.3)
            assert asyncio.run(called(all_url, "rp_echo")) == "approved"
        finally:
            up.stop()
    finally:
        upstream.stop()
