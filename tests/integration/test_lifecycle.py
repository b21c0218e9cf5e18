"""Processes and failure: fail closed, clean shutdown, the rendered bootstrap, the CLI's errors."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extproc.commands.envoy import envoy_binary
from extproc.config.pipeline_file import DEFAULT_PIPELINE
from extproc.config.resources import load_resources
from extproc.core.registry import Registry
from extproc.render.bootstrap import render_bootstrap_yaml
from extproc.render.options import BootstrapOptions
from tests.agents import modern_request, raw_post, response_messages
from tests.integration.conftest import PY_TOOLS, resource_doc, start_gateway
from tests.procs import Proc, admin_get, admin_ready, assert_envoy_accepts, free_port, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

CALL = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A legacy-era upstream; yields (resources file, record file)."""
    record = tmp_path / "upstream.jsonl"
    proc, port = start_pyserver("legacy-json", record)
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(resource_doc("py", port, PY_TOOLS)))
    try:
        yield resources, record
    finally:
        proc.stop()


def envoy_pids(parent: int | None = None) -> set[int]:
    """Envoy processes (children of ``parent`` only, when given: other test runs may have their own)."""
    command = ["pgrep", "-x", "envoy"] + (["-P", str(parent)] if parent is not None else [])
    out = subprocess.run(command, capture_output=True, text=True, check=False).stdout
    return {int(pid) for pid in out.split()}


async def test_extension_server_down_fails_closed(tmp_path: Path, upstream: tuple[Path, Path]) -> None:
    """Envoy pointed at a dead extension server answers 5xx and forwards nothing."""
    resources, record = upstream
    catalog = load_resources(resources)
    needs = Registry().build_pipeline(DEFAULT_PIPELINE).needs
    port = free_port()
    bootstrap = tmp_path / "envoy.yaml"
    admin = tmp_path / "admin.sock"
    options = BootstrapOptions(
        listen_port=port, extproc_tcp=None, extproc_unix=str(tmp_path / "nobody.sock"), admin_socket=str(admin)
    )
    bootstrap.write_text(render_bootstrap_yaml(catalog, needs, options))
    envoy = Proc([envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id"], name="envoy", log_dir=tmp_path)
    try:
        envoy.wait_for_line(r"starting main dispatch loop", 30)
        assert admin_ready(admin)
        reply = await raw_post(f"http://127.0.0.1:{port}/py/mcp", CALL)
    finally:
        envoy.stop()
    assert 500 <= reply.status_code < 600
    assert read_records(record) == []


def test_up_stops_cleanly_on_sigterm(tmp_path: Path, upstream: tuple[Path, Path]) -> None:
    resources, _record = upstream
    proc, _base, _metrics = start_gateway(resources, tmp_path)
    started = envoy_pids(proc.popen.pid)
    assert len(started) == 1, "up should run exactly one Envoy"
    os.killpg(proc.popen.pid, signal.SIGTERM)
    assert proc.popen.wait(timeout=20) == 0
    assert envoy_pids() & started == set(), "Envoy outlived `up`"
    log = proc.log_path.read_text()
    assert "gRPC server stopped" in log


def _listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_up_serves_envoys_admin_on_a_private_unix_socket_only(tmp_path: Path, upstream: tuple[Path, Path]) -> None:
    """Envoy's admin API (no authentication) is a 0600 unix socket: no TCP port but the agents' listener."""
    resources, _record = upstream
    proc, base, _metrics = start_gateway(resources, tmp_path)
    try:
        admin = Path(proc.wait_for_line(r"envoy admin at unix:(\S+)", 10).group(1))
        assert admin.stat().st_mode & 0o777 == 0o600
        status, body = admin_get(admin, "/listeners?format=json")
        assert status == 200
        [listener] = json.loads(body)["listener_statuses"]
        port = int(base.rsplit(":", 1)[1])
        assert listener["local_address"]["socket_address"]["port_value"] == port
        [envoy] = envoy_pids(proc.popen.pid)
        assert _listening_tcp_ports(envoy) == {port}
    finally:
        proc.stop()


def test_envoy_dies_with_a_killed_up(tmp_path: Path, upstream: tuple[Path, Path]) -> None:
    resources, _record = upstream
    proc, _base, _metrics = start_gateway(resources, tmp_path)
    started = envoy_pids(proc.popen.pid)
    assert len(started) == 1
    proc.popen.kill()  # no chance to clean up: the parent-death signal must stop Envoy
    proc.popen.wait(timeout=10)
    for _ in range(100):
        if not envoy_pids() & started:
            break
        subprocess.run(["sleep", "0.1"], check=True)
    assert envoy_pids() & started == set(), "Envoy was orphaned"


_FRONT_FILTERS = {
    # auto (the default): Envoy's MCP parser picks the route, ext_authz checks the fast
    # tools/call routes, ext_proc everything else; all of them fail closed.
    "auto": ["envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc"],
    "ext_proc": ["envoy.filters.http.ext_proc"],
    "ext_authz": ["envoy.filters.http.ext_authz"],
}


def test_rendered_bootstrap_passes_envoy_validate(tmp_path: Path, upstream: tuple[Path, Path]) -> None:
    resources, _record = upstream
    for door, extra in (
        ("auto", []),
        ("auto", ["--unix", "/tmp/x.sock"]),
        ("auto", ["--authz-http", "/tmp/authz.sock"]),
        # Two replicas: every address an endpoint, health-checked (tests/integration/test_replicas.py).
        ("auto", ["--grpc", "127.0.0.1:50051", "--grpc", "127.0.0.1:50052"]),
        (
            "auto",
            [
                "--grpc",
                "10.0.0.1:50051",
                "--grpc",
                "10.0.0.2:50051",
                "--authz-http",
                "/tmp/a.sock",
                "--authz-http",
                "/tmp/b.sock",
            ],
        ),
        ("ext_authz", ["--front-door", "ext_authz", "--grpc", "127.0.0.1:50051", "--grpc", "127.0.0.1:50052"]),
        ("ext_proc", ["--front-door", "ext_proc"]),
        ("ext_authz", ["--front-door", "ext_authz"]),
    ):
        rendered = subprocess.run(
            [sys.executable, "-m", "extproc", "render", "envoy", "-f", str(resources), *extra],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert_envoy_accepts(rendered, tmp_path / "rendered.yaml")
        filters = yaml.safe_load(rendered)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
        http_filters = filters[0]["typed_config"]["http_filters"]
        deciding = [f for f in http_filters if f["name"] in _FRONT_FILTERS["auto"]]
        assert [f["name"] for f in deciding] == _FRONT_FILTERS[door], door
        assert all(f["typed_config"].get("failure_mode_allow", False) is False for f in deciding)
        assert all(not f.get("disabled", False) for f in deciding)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ("kind: MCPServer\n", "apiVersion: must be"),
        (
            "apiVersion: mcp.extproc.io/v1alpha1\nkind: MCPServer\nmetadata: {name: a}\nspec: {url: nope}\n",
            "(MCPServer 'a'): spec.url:",
        ),
    ],
)
def test_check_reports_bad_documents(tmp_path: Path, document: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(document)
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "check", "-f", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert str(path) in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_check_accepts_the_example(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "resources.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "check", "-f", str(example)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "OK (1 MCPServer: demo" in result.stdout


async def test_serve_listens_on_tcp_and_unix_with_health(tmp_path: Path, upstream: tuple[Path, Path]) -> None:
    resources, _record = upstream
    port = free_port()
    sock = tmp_path / "extproc.sock"
    argv = [sys.executable, "-m", "extproc", "serve", "-f", str(resources), "--grpc", f"127.0.0.1:{port}"]
    proc = Proc([*argv, "--unix", str(sock), "--metrics", ""], name="serve", log_dir=tmp_path)
    try:
        proc.wait_for_line(r"gRPC server listening", 20)
        for target in (f"127.0.0.1:{port}", f"unix:{sock}"):
            async with grpc.aio.insecure_channel(target) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor")
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        os.killpg(proc.popen.pid, signal.SIGTERM)
        code = proc.popen.wait(timeout=20)
    assert code == 0
    assert "gRPC server stopped" in proc.log_path.read_text()
    assert not sock.exists()


async def test_unreachable_upstream_is_a_json_rpc_error(tmp_path: Path) -> None:
    """An MCP server nobody listens on: a 503 with a JSON-RPC error, not Envoy's plain text."""
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(resource_doc("gone", free_port(), PY_TOOLS)))
    proc, base, _metrics = start_gateway(resources, tmp_path)
    try:
        reply = await raw_post(f"{base}/gone/mcp", CALL)
        denied = await raw_post(f"{base}/gone/mcp", {**CALL, "params": {"name": "delete_everything"}})
    finally:
        proc.stop()
    assert reply.status_code == 503
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert error["code"] == -32603
    assert "could not be reached" in error["message"]
    # Our own answers are untouched by Envoy's local-reply rewriting.
    assert denied.json()["error"]["code"] == -32003


def _up(resources: Path, listen: str, metrics: str) -> subprocess.CompletedProcess[str]:
    """A second ``up``, run to its end (it must not get far)."""
    argv = [sys.executable, "-m", "extproc", "up", "-f", str(resources), "--listen", listen, "--metrics", metrics]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


async def _still_serves(base: str) -> None:
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "still here"}}, id=5)
    reply = await raw_post(f"{base}/py/mcp", body, headers)
    assert reply.status_code == 200, reply.text
    assert response_messages(reply)[-1]["result"]["structuredContent"] == {"result": "still here"}


def _refused(result: subprocess.CompletedProcess[str], flag: str, address: str) -> None:
    """Exit 2 with one line naming the flag and the address; no traceback, no Envoy, no "ready"."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"mcp-extproc: error: {flag} {address} is already in use (another mcp-extproc, or another program, "
        "listens there): stop it or pick another address"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert "[envoy]" not in result.stdout and "ready:" not in result.stdout


async def test_a_second_up_on_a_busy_listen_port_refuses_and_the_first_keeps_serving(
    tmp_path: Path, upstream: tuple[Path, Path]
) -> None:
    resources, _record = upstream
    first, base, _metrics = start_gateway(resources, tmp_path)
    try:
        listen = base.removeprefix("http://")
        started = envoy_pids(first.popen.pid)
        _refused(_up(resources, listen, "127.0.0.1:0"), "--listen", listen)
        assert envoy_pids(first.popen.pid) == started and first.popen.poll() is None
        for _ in range(4):  # every request reaches the first gateway: no second Envoy shares the port
            await _still_serves(base)
    finally:
        first.stop()


async def test_a_second_up_on_a_busy_metrics_port_refuses_and_the_first_keeps_serving(
    tmp_path: Path, upstream: tuple[Path, Path]
) -> None:
    resources, _record = upstream
    first, base, metrics_url = start_gateway(resources, tmp_path)
    try:
        metrics = metrics_url.removeprefix("http://").removesuffix("/metrics")
        _refused(_up(resources, f"127.0.0.1:{free_port()}", metrics), "--metrics", metrics)
        await _still_serves(base)
    finally:
        first.stop()


@contextlib.contextmanager
def _held_port(*, reuse_port: bool) -> Iterator[str]:
    """A port someone listens on, with SO_REUSEPORT as Envoy's listeners set it when ``reuse_port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        if reuse_port:
            holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        yield f"127.0.0.1:{holder.getsockname()[1]}"


@pytest.mark.parametrize("reuse_port", [True, False])
@pytest.mark.parametrize("flag", ["--grpc", "--metrics"])
def test_serve_refuses_a_busy_address(tmp_path: Path, upstream: tuple[Path, Path], flag: str, reuse_port: bool) -> None:
    resources, _record = upstream
    with _held_port(reuse_port=reuse_port) as busy:
        given = {"--grpc": f"127.0.0.1:{free_port()}", "--metrics": "127.0.0.1:0", flag: busy}
        argv = [sys.executable, "-m", "extproc", "serve", "-f", str(resources)]
        argv += ["--grpc", given["--grpc"], "--metrics", given["--metrics"]]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    _refused(result, flag, busy)
    assert "gRPC server listening" not in result.stdout
