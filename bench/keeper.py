"""What the session keeper costs: memory per kept session, CPU with many idle kept sessions.

Run::

    python -m bench.keeper --sessions 1000 --window 30 --interval 0
    python -m bench.keeper --sessions 1000 --window 30 --interval 3   # Playwright's ping cadence

Data flow::

    heartbeat upstream (tests.upstreams.heartbeat; keeps every GET stream open,
                        pings each session every --interval s, 0 = never)
        ▲ 1 GET stream per session, held by the keeper; ping answers
    mcp-extproc up (the process measured: RSS from /proc/<pid>/status,
        ▲            CPU from /proc/<pid>/stat utime+stime)
        │ N x (initialize, notifications/initialized) through Envoy, 32 at a time
    this script

It reports the server's RSS before any session, after N sessions are kept (every
keeper stream open at the upstream), the difference per session, and the CPU the
server used over an idle window of --window seconds (no agent traffic at all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.integration.conftest import start_gateway
from tests.procs import Proc, start_ready_server

VERSION = "2025-06-18"
HEADERS = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def open_session(client: httpx.AsyncClient, url: str, n: int) -> None:
    params = {"protocolVersion": VERSION, "capabilities": {}, "clientInfo": {"name": f"bench{n}", "version": "0"}}
    body = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}
    reply = await client.post(url, content=json.dumps(body), headers=HEADERS)
    reply.raise_for_status()
    headers = {**HEADERS, "mcp-session-id": reply.headers["mcp-session-id"], "mcp-protocol-version": VERSION}
    note = await client.post(url, content='{"jsonrpc":"2.0","method":"notifications/initialized"}', headers=headers)
    assert note.status_code == 202, note.text


async def open_streams(admin: str) -> int:
    async with httpx.AsyncClient() as client:
        sessions: list[dict[str, Any]] = (await client.get(admin)).json()
    return sum(1 for s in sessions if s["stream_open"])


async def run(sessions: int, window_s: float, interval_s: float, python: str = sys.executable) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-keeper-"))
    procs: list[Proc] = []
    try:
        # interval 0: a ping every 10 days, i.e. never within the window.
        interval = str(interval_s or 864000)
        upstream, port = start_ready_server(
            "tests.upstreams.heartbeat", "--interval", interval, "--timeout", "5", name="heartbeat", log_dir=tmp
        )
        procs.append(upstream)
        doc = {
            "apiVersion": "mcp.extproc.io/v1alpha1",
            "kind": "MCPServer",
            "metadata": {"name": "hb"},
            "spec": {"url": f"http://127.0.0.1:{port}/mcp", "allowedTools": ["*"]},
        }
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump(doc))
        gateway, base, _metrics = start_gateway(resources, tmp, python=python)
        procs.append(gateway)
        pid = gateway.pid
        url = f"{base}/hb/mcp"
        admin = f"http://127.0.0.1:{port}/admin/sessions"
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(timeout=60, limits=limits) as client:
            await open_session(client, url, -1)  # warm every code path once
            await asyncio.sleep(2)
            before = rss_mb(pid)
            gate = asyncio.Semaphore(32)

            async def one(n: int) -> None:
                async with gate:
                    await open_session(client, url, n)

            started = time.monotonic()
            await asyncio.gather(*(one(n) for n in range(sessions)))
            opened_s = time.monotonic() - started
        deadline = time.monotonic() + 120
        while await open_streams(admin) < sessions + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {await open_streams(admin)} of {sessions + 1} keeper streams opened")
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        after = rss_mb(pid)
        cpu_before = cpu_s(pid)
        await asyncio.sleep(window_s)
        cpu_used = cpu_s(pid) - cpu_before
        still_open = await open_streams(admin)
        return {
            "sessions": sessions,
            "ping_interval_s": interval_s or None,
            "rss_before_mb": round(before, 1),
            "rss_after_mb": round(after, 1),
            "rss_per_session_kb": round((after - before) * 1024 / sessions, 1),
            "cpu_window_s": window_s,
            "cpu_seconds": round(cpu_used, 2),
            "cpu_percent_of_one_core": round(100 * cpu_used / window_s, 1),
            "streams_open_at_end": still_open,
            "sessions_opened_in_s": round(opened_s, 1),
        }
    finally:
        for proc in reversed(procs):
            proc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.keeper", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--window", type=float, default=30.0, help="idle seconds over which CPU is measured")
    parser.add_argument("--interval", type=float, default=0.0, help="upstream ping interval (0: no pings)")
    parser.add_argument(
        "--server-python",
        default=sys.executable,
        help="the Python that runs the gateway (make bench: a venv with the runtime dependencies only, "
        "as users install it; the dev venv's tools make httpx import its CLI, 7 MB more)",
    )
    args = parser.parse_args()
    result = asyncio.run(run(args.sessions, args.window, args.interval, args.server_python))
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
