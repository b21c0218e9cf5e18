"""Plugin stages through real Envoy: an installed in-process stage package, the Python and the
TypeScript external stages chained in one pipeline; faults of external services; bad Describe.

    agent ──▶ Envoy ──▶ mcp-extproc: mcp · allowlist · forbid-argument-keys (pip-installed package)
                                     · external ─gRPC/unix─▶ email-redactor (Python, stagekit)
                                                ─gRPC/TCP──▶ secret-guard (TypeScript, grpc-js)
          ──▶ MCP server (records what it receives)
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp.shared.exceptions import MCPError

from tests.agents import legacy_session, raw_post
from tests.integration.conftest import PY_TOOLS, metric_value, resource_doc, start_gateway
from tests.procs import Proc, free_port, start_pyserver, start_stage, start_ts_stage
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

POLICY_DENIED = -32003
INTERNAL_ERROR = -32603
SECRET_PATTERN = "sk-[A-Za-z0-9]{20,}"
INIT: dict[str, Any] = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-03-26", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}


@dataclass
class Stack:
    base: str
    records: dict[str, Path]
    stages: dict[str, Proc]

    def url(self, server: str) -> str:
        return f"{self.base}/{server}/mcp"

    def upstream_saw(self, server: str, text: str) -> bool:
        """True when ``text`` appears anywhere in what the MCP server behind ``server`` received."""
        return any(text in json.dumps(record) for record in read_records(self.records[server]))

    def calls(self, server: str, tool: str) -> list[dict[str, Any]]:
        found = []
        for record in read_records(self.records[server]):
            body = record["body"]
            if isinstance(body, dict) and body.get("method") == "tools/call" and body["params"]["name"] == tool:
                found.append({"arguments": body["params"].get("arguments"), "headers": record["headers"]})
        return found


def python_stage(module: str, *args: str, log_dir: Path) -> tuple[Proc, str]:
    return start_stage([sys.executable, "-m", module, *args], module.rsplit(".", 1)[-1], log_dir=log_dir)


def write_pipeline(path: Path, *stages: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump({"version": "v1", "stages": list(stages)}))
    return path


async def session_headers(url: str) -> dict[str, str]:
    reply = await raw_post(url, INIT)
    assert reply.status_code == 200, reply.text
    headers = {"mcp-session-id": reply.headers["mcp-session-id"], "mcp-protocol-version": "2025-03-26"}
    await raw_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    return headers


def call(tool: str, arguments: dict[str, Any], id: str = "c-1") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, "method": "tools/call", "params": {"name": tool, "arguments": arguments}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("chain")
    procs: list[Proc] = []
    try:
        records = {"py": tmp / "py.jsonl"}
        upstream, port = start_pyserver("legacy-json", records["py"])
        procs.append(upstream)
        redactor, redactor_at = python_stage(
            "examples.external_redactor", "--address", f"unix:{tmp}/redactor.sock", log_dir=tmp
        )
        guard, guard_at = start_ts_stage("127.0.0.1:0", [SECRET_PATTERN], log_dir=tmp)
        procs += [redactor, guard]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump(resource_doc("py", port, PY_TOOLS)))
        pipeline = write_pipeline(
            tmp / "pipeline.yaml",
            {"name": "mcp"},
            {"name": "allowlist"},
            {"name": "forbid-argument-keys", "config": {"keys": ["password"]}},
            {"name": "external", "config": {"services": [{"address": redactor_at}, {"address": guard_at}]}},
        )
        gateway, base, _metrics = start_gateway(resources, tmp, "--pipeline", str(pipeline))
        procs.append(gateway)
        yield Stack(base, records, {"redactor": redactor, "guard": guard})
    finally:
        for proc in reversed(procs):
            proc.stop()


def test_stages_command_lists_the_installed_package() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "extproc", "stages", "--json"], capture_output=True, text=True, check=True, timeout=60
    )
    stages = {item["name"]: item for item in json.loads(listed.stdout)}
    example = stages["forbid-argument-keys"]
    assert example["distribution"] == "mcp-extproc-stage-example 0.1.0"
    assert example["config_schema"]["required"] == ["keys"]
    assert stages["external"]["config_schema"]["required"] == ["services"]


async def test_a_clean_call_goes_through_all_three_stages(chain: Stack) -> None:
    async with legacy_session(chain.url("py")) as session:
        result = await session.call_tool("echo", {"text": "mail bob@example.com today"})
    assert not result.is_error
    assert result.structured_content == {"result": "mail [redacted email] today"}
    [seen] = [c for c in chain.calls("py", "echo") if "today" in json.dumps(c["arguments"])]
    assert seen["arguments"] == {"text": "mail [redacted email] today"}  # the Python stage rewrote params
    assert seen["headers"]["x-argument-keys-checked"] == "1"  # the in-process stage checked it
    assert not chain.upstream_saw("py", "bob@example.com")


async def test_the_typescript_stage_denies_a_secret(chain: Stack) -> None:
    secret = "sk-" + uuid.uuid4().hex
    async with legacy_session(chain.url("py")) as session:
        with pytest.raises(MCPError) as refused:
            await session.call_tool("echo", {"text": f"use {secret}"})
    assert refused.value.error.code == POLICY_DENIED
    assert refused.value.error.message == (
        "arguments of tool 'echo' contain a secret (pattern #1); the call was not forwarded"
    )
    assert not chain.upstream_saw("py", secret)


async def test_the_in_process_package_stage_denies_with_the_request_id(chain: Stack) -> None:
    marker = uuid.uuid4().hex
    headers = await session_headers(chain.url("py"))
    reply = await raw_post(chain.url("py"), call("echo", {"text": marker, "password": "p"}, "call-9"), headers)
    assert reply.status_code == 200
    assert reply.json() == {
        "jsonrpc": "2.0",
        "id": "call-9",
        "error": {"code": POLICY_DENIED, "message": "arguments of 'echo' carry the forbidden key 'password'"},
    }
    assert not chain.upstream_saw("py", marker)


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One gateway, one external service configuration per MCP server (``servers:``)."""
    tmp = tmp_path_factory.mktemp("faults")
    procs: list[Proc] = []
    try:
        records = {"json": tmp / "json.jsonl", "sse": tmp / "sse.jsonl"}
        json_up, json_port = start_pyserver("legacy-json", records["json"])
        sse_up, sse_port = start_pyserver("legacy-sse", records["sse"])
        down, down_at = python_stage(
            "tests.upstreams.stages", "--behaviour", "policy", "--address", f"unix:{tmp}/down.sock", log_dir=tmp
        )
        slow, slow_at = python_stage("tests.upstreams.stages", "--behaviour", "slow", log_dir=tmp)
        policy, policy_at = python_stage(
            "tests.upstreams.stages", "--behaviour", "policy", "--address", f"unix:{tmp}/policy.sock", log_dir=tmp
        )
        procs += [json_up, sse_up, down, slow, policy]
        servers = {"closed": json_port, "open": json_port, "slowclosed": json_port, "slowopen": json_port}
        servers |= {"policy": json_port, "policysse": sse_port}
        docs = [resource_doc(name, port, PY_TOOLS) for name, port in servers.items()]
        (tmp / "resources.yaml").write_text(yaml.safe_dump_all(docs))
        services = [
            {"address": down_at, "servers": ["closed"]},
            {"address": down_at, "servers": ["open"], "failureMode": "open"},
            {"address": slow_at, "servers": ["slowclosed"], "deadlineMs": 200},
            {"address": slow_at, "servers": ["slowopen"], "deadlineMs": 200, "failureMode": "open"},
            {"address": policy_at, "servers": ["policy", "policysse"]},
        ]
        pipeline = write_pipeline(
            tmp / "pipeline.yaml",
            {"name": "mcp"},
            {"name": "allowlist"},
            {"name": "external", "config": {"services": services}},
        )
        gateway, base, _metrics = start_gateway(tmp / "resources.yaml", tmp, "--pipeline", str(pipeline))
        procs.append(gateway)
        records_by_server = {name: records["sse" if name == "policysse" else "json"] for name in servers}
        yield Stack(base, records_by_server, {"down": down})
    finally:
        for proc in reversed(procs):
            proc.stop()


async def test_a_python_stage_deny_carries_its_code_and_data(faults: Stack) -> None:
    headers = await session_headers(faults.url("policy"))
    reply = await raw_post(faults.url("policy"), call("add", {"a": 13, "b": 7777}, "unlucky"), headers)
    assert reply.status_code == 200
    assert reply.json() == {
        "jsonrpc": "2.0",
        "id": "unlucky",
        "error": {"code": -32013, "message": "13 is unlucky", "data": {"tool": "add", "a": 13}},
    }
    assert not any(c["arguments"] == {"a": 13, "b": 7777} for c in faults.calls("policy", "add"))


@pytest.mark.parametrize("server", ["policy", "policysse"])
async def test_a_stage_rewrites_results_in_json_and_sse(faults: Stack, server: str) -> None:
    marker = f"quiet {uuid.uuid4().hex}"
    async with legacy_session(faults.url(server)) as session:
        result = await session.call_tool("echo", {"text": marker})
    assert result.structured_content == {"result": marker.upper()}
    assert [c.text for c in result.content if c.type == "text"] == [marker.upper()]
    assert faults.upstream_saw(server, marker)  # the upstream got (and answered) the original


async def test_a_slow_service_fails_closed_by_default_and_open_when_configured(faults: Stack) -> None:
    marker = uuid.uuid4().hex
    headers = await session_headers(faults.url("slowclosed"))
    reply = await raw_post(faults.url("slowclosed"), call("echo", {"text": marker}, "slow-1"), headers)
    assert reply.status_code == 503
    assert reply.json()["error"] == {
        "code": INTERNAL_ERROR,
        "message": "external stage 'test-slow' did not answer within 200 ms; the request was not forwarded",
    }
    assert not faults.upstream_saw("slowclosed", marker)
    async with legacy_session(faults.url("slowopen")) as session:
        result = await session.call_tool("echo", {"text": marker})
    assert result.structured_content == {"result": marker}


async def test_a_service_that_went_down_fails_closed_by_default_and_open_when_configured(faults: Stack) -> None:
    faults.stages["down"].stop()
    marker = uuid.uuid4().hex
    headers = await session_headers(faults.url("closed"))
    reply = await raw_post(faults.url("closed"), call("echo", {"text": marker}, "down-1"), headers)
    assert reply.status_code == 503
    assert reply.json() == {
        "jsonrpc": "2.0",
        "id": "down-1",
        "error": {
            "code": INTERNAL_ERROR,
            "message": "external stage 'test-policy' is unreachable (UNAVAILABLE); the request was not forwarded",
        },
    }
    assert not faults.upstream_saw("closed", marker)
    async with legacy_session(faults.url("open")) as session:
        result = await session.call_tool("echo", {"text": marker})
    assert result.structured_content == {"result": marker}  # not upper-cased: the stage was skipped


def run_up(tmp: Path, services: list[dict[str, Any]], **config: Any) -> subprocess.CompletedProcess[str]:
    (tmp / "resources.yaml").write_text(yaml.safe_dump(resource_doc("py", 1, PY_TOOLS)))
    external = {"name": "external", "config": {"services": services, **config}}
    pipeline = write_pipeline(tmp / "p.yaml", {"name": "mcp"}, {"name": "allowlist"}, external)
    argv = [sys.executable, "-m", "extproc", "up", "-f", str(tmp / "resources.yaml"), "--pipeline", str(pipeline)]
    argv += ["--listen", f"127.0.0.1:{free_port()}", "--metrics", ""]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (
            "bad-name",
            "Describe answered name='Bad Name!'; expected 1-63 characters of [a-z0-9-] starting with a letter",
        ),
        ("no-phases", "(stage 'no-phases'): Describe answered no phases; expected PHASE_REQUEST and/or PHASE_RESPONSE"),
    ],
)
def test_a_bad_describe_answer_stops_startup(tmp_path: Path, behaviour: str, expected: str) -> None:
    server, address = python_stage(
        "tests.upstreams.stages", "--behaviour", behaviour, "--address", f"unix:{tmp_path}/bad.sock", log_dir=tmp_path
    )
    with server:
        done = run_up(tmp_path, [{"address": address}])
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"stage 'external': services[0] at {address}" in done.stderr
    assert expected in done.stderr


def test_an_unreachable_service_stops_startup(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/nobody.sock"
    done = run_up(tmp_path, [{"address": address, "describeDeadlineMs": 300}])
    assert done.returncode == 2
    assert f"stage 'external': services[0] at {address}: Describe failed: DEADLINE_EXCEEDED" in done.stderr
    assert "is the service running and listening there?" in done.stderr


def test_fast_calls_refuses_a_service_that_reads_call_responses(tmp_path: Path) -> None:
    # The redactor example rewrites tools/call results: it cannot vouch for the fast route.
    server, address = python_stage(
        "examples.external_redactor", "--address", f"unix:{tmp_path}/redactor.sock", log_dir=tmp_path
    )
    with server:
        done = run_up(tmp_path, [{"address": address}], fastCalls=True)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "asks for tools/call responses, but the external stage is configured with fastCalls: true" in done.stderr


async def test_with_fast_calls_a_typescript_stage_decides_a_call_in_one_check(tmp_path: Path) -> None:
    records = tmp_path / "py.jsonl"
    upstream, port = start_pyserver("legacy-json", records)
    guard, guard_at = start_ts_stage("127.0.0.1:0", [SECRET_PATTERN], log_dir=tmp_path)
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(resource_doc("py", port, PY_TOOLS)))
    external = {"name": "external", "config": {"services": [{"address": guard_at}], "fastCalls": True}}
    pipeline = write_pipeline(tmp_path / "pipeline.yaml", {"name": "mcp"}, {"name": "allowlist"}, external)
    gateway, base, metrics = start_gateway(resources, tmp_path, "--pipeline", str(pipeline))
    try:
        secret = "sk-" + uuid.uuid4().hex
        async with legacy_session(f"{base}/py/mcp") as session:
            checks = metric_value(metrics, "mcp_extproc_phases_total", phase="check")
            ok = await session.call_tool("echo", {"text": "harmless"})
            with pytest.raises(MCPError) as refused:
                await session.call_tool("echo", {"text": f"use {secret}"})
            assert metric_value(metrics, "mcp_extproc_phases_total", phase="check") == checks + 2
        assert ok.structured_content == {"result": "harmless"}
        assert refused.value.error.code == POLICY_DENIED
        assert not any(secret in json.dumps(record) for record in read_records(records))
    finally:
        for proc in (gateway, guard, upstream):
            proc.stop()
