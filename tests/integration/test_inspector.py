"""The MCP Inspector's CLI through `mcp-extproc up` against server-everything: what a person would run.

The official Inspector (`@modelcontextprotocol/inspector`, pinned in package.json, run
with the Node.js of the `node` npm package, as it needs Node 22) is pointed at the
gateway's URL and at server-everything's own URL. Through the gateway every list is the
upstream's, less the tool the server's resource denies, a call answers as the upstream
does, and a refused call comes back as the gateway's refusal. Each run is one process
(`--cli ... --format json`), its result one JSON object on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

from tests.integration.conftest import resource_doc, start_gateway
from tests.procs import REPO_ROOT, Proc, start_everything

pytestmark = pytest.mark.integration

INSPECTOR: Final = REPO_ROOT / "node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js"
NODE: Final = REPO_ROOT / "node_modules/node/bin/node"
RUN_TIMEOUT_S: Final = 60
TOOL_ERROR_EXIT: Final = 5
"""The Inspector CLI's exit status for a tool it cannot call (its ``EXIT_CODES.TOOL_ERROR``)."""

REGO: Final = """package mcp
import rego.v1
default allow := true
allow := false if { input.tool == "echo"; input.arguments.message == "forbidden" }
"""


@dataclass(frozen=True)
class Setup:
    direct: str
    gateway: str
    home: Path


@dataclass(frozen=True)
class Run:
    status: int
    result: Any
    error: Any
    stderr: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not INSPECTOR.is_file() or not NODE.is_file():
        pytest.fail(f"the Inspector or its Node.js is missing under {REPO_ROOT / 'node_modules'}: run `make node`")
    tmp = tmp_path_factory.mktemp("inspector")
    procs: list[Proc] = []
    try:
        everything, port = start_everything(log_dir=tmp)
        procs.append(everything)
        docs = [
            resource_doc("everything", port, {"allowedTools": ["*"], "deniedTools": ["get-env"]}),
            {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPToolPolicy",
                "metadata": {"name": "no-forbidden-echo"},
                "spec": {
                    "targetRefs": [{"kind": "MCPServer", "name": "everything"}],
                    "rego": {"query": "data.mcp.allow", "module": REGO},
                },
            },
        ]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        up, base, _metrics = start_gateway(resources, tmp)
        procs.append(up)
        home = tmp / "home"  # the Inspector keeps a catalog and its storage under ~/.mcp-inspector
        home.mkdir()
        yield Setup(direct=f"http://127.0.0.1:{port}/mcp", gateway=f"{base}/everything/mcp", home=home)
    finally:
        for proc in reversed(procs):
            proc.stop()


def inspector(setup: Setup, url: str, method: str, *args: str) -> Run:
    """Run ``inspector --cli <url> --method <method> <args> --format json`` to its end."""
    env = {
        **os.environ,
        "HOME": str(setup.home),
        "NO_COLOR": "1",
        "PATH": f"{NODE.parent}{os.pathsep}{os.environ['PATH']}",
    }
    argv = [
        str(NODE),
        str(INSPECTOR),
        "--cli",
        url,
        "--method",
        method,
        *args,
        "--format",
        "json",
        "--stored-auth-only",
    ]
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT_S, check=False, cwd=setup.home
    )
    stdout = json.loads(done.stdout) if done.stdout.strip() else {}
    stderr_lines = [line for line in done.stderr.splitlines() if line.startswith("{")]
    error = json.loads(stderr_lines[-1]).get("error") if stderr_lines else None
    return Run(done.returncode, stdout.get("result"), error, done.stderr)


def ok(run: Run) -> Any:
    assert run.status == 0, run.stderr
    return run.result


def test_tools_list_is_the_upstreams_less_the_denied_tool(setup: Setup) -> None:
    direct = [tool["name"] for tool in ok(inspector(setup, setup.direct, "tools/list"))["tools"]]
    through = [tool["name"] for tool in ok(inspector(setup, setup.gateway, "tools/list"))["tools"]]
    assert "get-env" in direct and "echo" in direct
    assert through == [name for name in direct if name != "get-env"]


def test_tools_call_answers_as_the_upstream_does(setup: Setup) -> None:
    args = ("--tool-name", "echo", "--tool-arg", "message=through the gateway")
    through = ok(inspector(setup, setup.gateway, "tools/call", *args))
    assert through == ok(inspector(setup, setup.direct, "tools/call", *args))
    assert through["content"] == [{"type": "text", "text": "Echo: through the gateway"}]


@pytest.mark.parametrize(("method", "key"), [("resources/list", "resources"), ("prompts/list", "prompts")])
def test_lists_are_the_upstreams(setup: Setup, method: str, key: str) -> None:
    through = ok(inspector(setup, setup.gateway, method))[key]
    assert through, f"server-everything lists {key}"
    assert through == ok(inspector(setup, setup.direct, method))[key]


def test_a_denied_tool_is_not_offered_so_the_inspector_cannot_call_it(setup: Setup) -> None:
    refused = inspector(setup, setup.gateway, "tools/call", "--tool-name", "get-env")
    assert refused.status == TOOL_ERROR_EXIT, refused.stderr
    assert refused.error["code"] == "tool_not_found", refused.stderr


def test_a_call_the_policy_denies_comes_back_as_the_gateways_refusal(setup: Setup) -> None:
    args = ("--tool-name", "echo", "--tool-arg", "message=forbidden")
    assert ok(inspector(setup, setup.direct, "tools/call", *args))["content"][0]["text"] == "Echo: forbidden"
    refused = inspector(setup, setup.gateway, "tools/call", *args)
    assert refused.status != 0 and refused.result is None, refused.stderr
    assert refused.error["message"] == "tool 'echo' is denied by policy 'no-forbidden-echo'", refused.stderr
