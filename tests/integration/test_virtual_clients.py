"""An ``MCPVirtualServer`` driven by two more real clients: the MCP Inspector CLI and the TypeScript SDK client.

Behind ``/tools/mcp``: server-everything (TypeScript, prefix ``every_``, every tool
allowed) and a Python SDK stateful server (``py``, no prefix; its MCPServer denies
``delete_*``; it records what it receives). The Inspector (``--cli ... --format json``, one
process a run, as in ``test_inspector``) and ``tests/clients/ts_virtual_client.mjs`` (the
official ``@modelcontextprotocol/sdk`` client, pinned in package.json, declaring sampling
and elicitation) are each run against the virtual server and against server-everything's
own URL: through the virtual server server-everything's part is its own, prefixed.
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
from tests.procs import REPO_ROOT, Proc, start_everything, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

API: Final = "mcp.extproc.io/v1alpha1"
NODE: Final = REPO_ROOT / "node_modules/node/bin/node"
INSPECTOR: Final = REPO_ROOT / "node_modules/@modelcontextprotocol/inspector/clients/launcher/build/index.js"
TS_CLIENT: Final = REPO_ROOT / "tests/clients/ts_virtual_client.mjs"
TS_SDK: Final = REPO_ROOT / "node_modules/@modelcontextprotocol/sdk/package.json"
RUN_TIMEOUT_S: Final = 90
TOOL_ERROR_EXIT: Final = 5
"""The Inspector CLI's exit status for a tool it cannot call (its ``EXIT_CODES.TOOL_ERROR``)."""
PREFIX: Final = "every_"
URI_PREFIX: Final = "every+"
PY_TOOLS: Final = {"echo", "add", "slow_count", "push_unrelated", "pushed_outcomes", "announce_change"}
"""``tests.upstreams.pyserver``'s tools but ``delete_everything``, which ``py``'s MCPServer denies."""


@dataclass(frozen=True)
class Stack:
    virtual: str
    direct: str
    py_record: Path
    home: Path

    def py_calls(self) -> list[str]:
        return [
            r["body"]["params"]["name"]
            for r in read_records(self.py_record)
            if isinstance(r["body"], dict) and r["body"].get("method") == "tools/call"
        ]


@dataclass(frozen=True)
class Run:
    status: int
    result: Any
    error: Any
    stderr: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for needed in (NODE, INSPECTOR, TS_SDK):
        if not needed.is_file():
            pytest.fail(f"{needed} is missing: run `make node` (npm ci) in {REPO_ROOT}")
    tmp = tmp_path_factory.mktemp("virtual-clients")
    procs: list[Proc] = []
    try:
        every, every_port = start_everything(log_dir=tmp)
        procs.append(every)
        py_record = tmp / "py.jsonl"
        py, py_port = start_pyserver("legacy-sse", py_record)
        procs.append(py)
        docs = [
            resource_doc("every", every_port, {"allowedTools": ["*"]}),
            resource_doc("py", py_port, {"allowedTools": ["*"], "deniedTools": ["delete_*"]}),
            {
                "apiVersion": API,
                "kind": "MCPVirtualServer",
                "metadata": {"name": "tools"},
                "spec": {"servers": [{"name": "every", "prefix": PREFIX}, {"name": "py"}]},
            },
            {
                "apiVersion": API,
                "kind": "MCPAgent",
                "metadata": {"name": "agent"},
                "spec": {"mcpServerRefs": [{"kind": "MCPVirtualServer", "name": "tools"}]},
            },
        ]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs, sort_keys=False))
        up, base, _metrics = start_gateway(resources, tmp)
        procs.append(up)
        home = tmp / "home"  # the Inspector keeps a catalog and its storage under ~/.mcp-inspector
        home.mkdir()
        yield Stack(f"{base}/tools/mcp", f"http://127.0.0.1:{every_port}/mcp", py_record, home)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _env(stack: Stack) -> dict[str, str]:
    return {
        **os.environ,
        "HOME": str(stack.home),
        "NO_COLOR": "1",
        "PATH": f"{NODE.parent}{os.pathsep}{os.environ['PATH']}",
    }


def inspector(stack: Stack, url: str, method: str, *args: str) -> Run:
    """Run ``inspector --cli <url> --method <method> <args> --format json`` to its end."""
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
        argv, capture_output=True, text=True, env=_env(stack), timeout=RUN_TIMEOUT_S, check=False, cwd=stack.home
    )
    stdout = json.loads(done.stdout) if done.stdout.strip() else {}
    stderr_lines = [line for line in done.stderr.splitlines() if line.startswith("{")]
    error = json.loads(stderr_lines[-1]).get("error") if stderr_lines else None
    return Run(done.returncode, stdout.get("result"), error, done.stderr)


def ok(run: Run) -> Any:
    assert run.status == 0, run.stderr
    return run.result


def ts_client(stack: Stack, url: str, *args: str) -> dict[str, Any]:
    """Run ``tests/clients/ts_virtual_client.mjs <url> <args>``; its one JSON object."""
    done = subprocess.run(
        [str(NODE), str(TS_CLIENT), url, *args],
        capture_output=True,
        text=True,
        env=_env(stack),
        timeout=RUN_TIMEOUT_S,
        check=False,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr}"
    seen: dict[str, Any] = json.loads(done.stdout)
    return seen


# The MCP Inspector CLI


def test_inspector_tools_list_is_server_everythings_prefixed_and_pys_less_the_denied_tool(stack: Stack) -> None:
    direct = ok(inspector(stack, stack.direct, "tools/list"))["tools"]
    through = ok(inspector(stack, stack.virtual, "tools/list"))["tools"]
    assert "echo" in {tool["name"] for tool in direct}
    every = [tool for tool in through if tool["name"].startswith(PREFIX)]
    # server-everything's own list, in its order, each object as it sent it but its name
    assert every == [{**tool, "name": PREFIX + tool["name"]} for tool in direct]
    assert {tool["name"] for tool in through} - {tool["name"] for tool in every} == PY_TOOLS


def test_inspector_call_of_a_prefixed_tool_answers_as_server_everything_does(stack: Stack) -> None:
    message = ("--tool-arg", "message=through the virtual server")
    through = ok(inspector(stack, stack.virtual, "tools/call", "--tool-name", f"{PREFIX}echo", *message))
    assert through == ok(inspector(stack, stack.direct, "tools/call", "--tool-name", "echo", *message))
    assert through["content"] == [{"type": "text", "text": "Echo: through the virtual server"}]


def test_inspector_call_of_the_python_servers_tool_reaches_it_unprefixed(stack: Stack) -> None:
    through = ok(
        inspector(stack, stack.virtual, "tools/call", "--tool-name", "add", "--tool-arg", "a=2", "--tool-arg", "b=40")
    )
    assert through["content"][0]["text"] == "42"
    assert "add" in stack.py_calls()


def test_inspector_cannot_call_the_denied_tool(stack: Stack) -> None:
    refused = inspector(stack, stack.virtual, "tools/call", "--tool-name", "delete_everything")
    assert refused.status == TOOL_ERROR_EXIT and refused.result is None, refused.stderr
    assert refused.error["code"] == "tool_not_found", refused.stderr  # not offered, so not called
    assert "delete_everything" not in stack.py_calls()


def test_inspector_prompts_are_server_everythings_prefixed(stack: Stack) -> None:
    direct = ok(inspector(stack, stack.direct, "prompts/list"))["prompts"]
    through = ok(inspector(stack, stack.virtual, "prompts/list"))["prompts"]
    assert direct, "server-everything lists prompts"
    assert through == [{**prompt, "name": PREFIX + prompt["name"]} for prompt in direct]


def test_inspector_resources_are_server_everythings_with_prefixed_uris(stack: Stack) -> None:
    direct = ok(inspector(stack, stack.direct, "resources/list"))["resources"]
    through = ok(inspector(stack, stack.virtual, "resources/list"))["resources"]
    assert direct, "server-everything lists resources"
    assert through == [{**resource, "uri": URI_PREFIX + resource["uri"]} for resource in direct]


# The TypeScript SDK client


@pytest.fixture(scope="module")
def ts_direct(stack: Stack) -> dict[str, Any]:
    return ts_client(stack, stack.direct, "--prefix", "", "--no-py")


@pytest.fixture(scope="module")
def ts_through(stack: Stack) -> dict[str, Any]:
    return ts_client(stack, stack.virtual)


def test_ts_client_connects_to_the_virtual_server_on_the_legacy_era(ts_through: dict[str, Any]) -> None:
    assert ts_through["serverInfo"]["name"] == "tools"
    assert ts_through["protocolVersion"] == "2025-11-25"
    assert ts_through["sessionId"] is True
    assert ts_through["terminated"] is True  # its DELETE was answered
    assert ts_through["transportErrors"] == []  # the GET for a standalone stream got 405, which it accepts


def test_ts_client_sees_server_everythings_tools_prefixed_and_pys(
    ts_through: dict[str, Any], ts_direct: dict[str, Any]
) -> None:
    tools: list[str] = ts_through["tools"]
    # offered because the client declared sampling and elicitation, to the backend too
    assert {"trigger-sampling-request", "trigger-elicitation-request"} <= set(ts_direct["tools"])
    assert [name for name in tools if name.startswith(PREFIX)] == [PREFIX + name for name in ts_direct["tools"]]
    assert {name for name in tools if not name.startswith(PREFIX)} == PY_TOOLS


def test_ts_client_calls_reach_each_backend(ts_through: dict[str, Any], ts_direct: dict[str, Any]) -> None:
    assert ts_through["everyEcho"] == ts_direct["everyEcho"]
    assert ts_through["everyEcho"]["texts"] == ["Echo: from the TS SDK"]
    assert ts_through["pyEcho"]["texts"] == ["py from TS"]


def test_ts_client_answers_server_everythings_sampling_request_through_the_gateway(
    ts_through: dict[str, Any], ts_direct: dict[str, Any]
) -> None:
    asked = "Resource trigger-sampling-request context: ts client"
    assert [s["asked"] for s in ts_through["sampling"]] == [asked]
    # the request's id is namespaced by the backend that sent it; the answer still reached it
    assert str(ts_through["sampling"][0]["id"]).startswith("mcpx~every~"), ts_through["sampling"]
    assert f"sampled: {asked}" in "".join(ts_through["sampled"]["texts"])
    assert ts_through["sampled"] == ts_direct["sampled"]


def test_ts_client_answers_server_everythings_elicitation_through_the_gateway(
    ts_through: dict[str, Any], ts_direct: dict[str, Any]
) -> None:
    assert len(ts_through["elicitation"]) == 1
    assert str(ts_through["elicitation"][0]["id"]).startswith("mcpx~every~"), ts_through["elicitation"]
    assert "- Name: Ada" in "".join(ts_through["elicited"]["texts"])
    assert ts_through["elicited"] == ts_direct["elicited"]
