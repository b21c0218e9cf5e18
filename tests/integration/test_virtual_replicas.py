"""A virtual server's GET stream with two replicas of the extension server: each stream reaches
the replica that decided it.

    agent (Python SDK, legacy sessions) ──▶ Envoy (render envoy --grpc A --grpc B --streams S1 --streams S2)
        ext_proc ──▶ serve A | serve B (one key set: any replica serves any session)
        a GET stream's ticket (tagged with its replica) ──▶ S1 or S2, the socket of the replica that offered it
    backend: the Python SDK server (legacy, SSE).

Before tickets carried their replica, the renderer took one stream socket, and a GET
decided by the other replica found no offer there. Not covered, because it does not hold
yet: each replica opens backend sessions of its own, so a backend's unsolicited messages
reach the client's stream only from the sessions the stream's replica holds
(docs/virtual-servers.md).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from extproc.commands.envoy import envoy_binary
from tests.agents import LEGACY_VERSION, raw_post
from tests.integration.conftest import resource_doc
from tests.procs import Proc, admin_ready, assert_envoy_accepts, free_port, start_pyserver

pytestmark = pytest.mark.integration

STREAMS = 8


async def get_streams(url: str, count: int) -> list[tuple[int, str]]:
    """Open one legacy session, then ``count`` GET streams on it: (status, content type) of each."""
    init = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    opened = await raw_post(url, {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": init})
    session = {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": LEGACY_VERSION}
    await raw_post(url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    found = []
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(count):
            async with client.stream("GET", url, headers={**session, "accept": "text/event-stream"}) as stream:
                found.append((stream.status_code, stream.headers.get("content-type", "")))
    return found


def get_upstreams(envoy: Proc) -> list[str]:
    """The upstream of every GET in Envoy's access log (JSON lines)."""
    lines = [json.loads(line[line.index("{") :]) for line in envoy.output().splitlines() if '"method":"GET"' in line]
    return [str(line["upstream"]) for line in lines]


def test_every_get_stream_reaches_the_replica_that_offered_it(tmp_path: Path) -> None:
    procs: list[Proc] = []
    try:
        backend, port = start_pyserver("legacy-sse", tmp_path / "py.jsonl")
        procs.append(backend)
        virtual = {
            "apiVersion": "mcp.extproc.io/v1alpha1",
            "kind": "MCPVirtualServer",
            "metadata": {"name": "tools"},
            "spec": {"servers": [{"name": "py"}]},
        }
        resources = tmp_path / "resources.yaml"
        resources.write_text(yaml.safe_dump_all([resource_doc("py", port, {"allowedTools": ["*"]}), virtual]))
        keys = tmp_path / "keys.json"
        render = [sys.executable, "-m", "extproc", "render", "envoy", "-f", str(resources)]
        replicas: list[Proc] = []
        for index in (1, 2):
            grpc, streams = f"127.0.0.1:{free_port()}", str(tmp_path / f"streams-{index}.sock")
            argv = [sys.executable, "-m", "extproc", "serve", "-f", str(resources), "--grpc", grpc, "--metrics", ""]
            argv += ["--streams", streams, "--session-key-file", str(keys)]
            replica = Proc(argv, name=f"serve-{index}", log_dir=tmp_path)
            procs.append(replica)
            replicas.append(replica)
            replica.wait_for_line(r"gRPC server listening", 30)
            render += ["--grpc", grpc, "--streams", streams]
        listen, admin = free_port(), tmp_path / "admin.sock"
        render += ["--listen", f"127.0.0.1:{listen}", "--admin-socket", str(admin)]
        bootstrap = tmp_path / "envoy.yaml"
        assert_envoy_accepts(subprocess.run(render, capture_output=True, text=True, check=True).stdout, bootstrap)
        envoy = Proc([envoy_binary(), "-c", str(bootstrap), "--use-dynamic-base-id"], name="envoy", log_dir=tmp_path)
        procs.append(envoy)
        deadline = time.monotonic() + 30
        while not admin_ready(admin):
            assert envoy.popen.poll() is None, envoy.output()
            assert time.monotonic() < deadline, "Envoy did not become ready"
            time.sleep(0.05)

        url = f"http://127.0.0.1:{listen}/tools/mcp"
        answers = asyncio.run(get_streams(url, STREAMS))
        assert [status for status, _ in answers] == [200] * STREAMS
        assert all(kind.startswith("text/event-stream") for _, kind in answers)
        # Both replicas decided GETs, and each GET was streamed by the one that decided it.
        decided = [r.output().count("client stream over") for r in replicas]
        assert all(decided) and sum(decided) == STREAMS, decided
        deadline = time.monotonic() + 10  # Envoy writes an access log line when the stream has ended
        while len(upstreams := get_upstreams(envoy)) < STREAMS and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(Path(u).name for u in upstreams) == sorted(
            f"streams-{i}.sock" for i, count in enumerate(decided, 1) for _ in range(count)
        )
    finally:
        for proc in reversed(procs):
            proc.stop()
