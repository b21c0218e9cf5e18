"""A runnable MCP test upstream built on the official Python SDK's `MCPServer`.

Start it as a process::

    python -m tests.upstreams.pyserver --port 0 --mode legacy-sse --record /tmp/rec.jsonl

It binds 127.0.0.1, serves Streamable HTTP at `/mcp` and prints exactly one line,
`READY <port>`, to stdout once it accepts connections. SIGTERM (or SIGINT) stops it
with exit status 0.

Modes (how requests of the *legacy* era are served):

- `legacy-sse`: stateful sessions (`Mcp-Session-Id`, GET stream, DELETE); POSTs are
  answered with `text/event-stream`.
- `legacy-json`: stateful sessions; POSTs are answered with `application/json`
  (progress notifications then have no per-request stream to travel on).
- `modern`: stateless, SSE-capable; the server a 2026-07-28 client talks to.

Every mode also answers 2026-07-28 requests: the SDK's session manager routes a POST
whose `MCP-Protocol-Version` header names a non-handshake revision to its stateless
modern handler, whatever `stateless_http` says. The era is therefore chosen by the
client (`tests.agents.legacy_session` / `modern_session`); the mode only decides how the
legacy era is served. A modern response is JSON unless the handler emits a notification
(e.g. progress) first, in which case it commits to SSE.

Tools: `echo(text)`, `add(a, b)`, `delete_everything()` (the tool allow-list tests
deny, so the record shows it never arrived) and `slow_count(steps, delay)`, which
reports progress once per step before returning.

With `--record FILE`, every HTTP request is appended to FILE as one JSON line as soon
as its body has arrived (before the MCP handler runs)::

    {"method": "POST", "path": "/mcp", "query": "", "headers": {"mcp-method": "tools/call", ...},
     "body": {"jsonrpc": "2.0", "id": 1, "method": "tools/call", ...}, "body_text": null}

Header names are lower-cased; repeated headers are joined with ", ". `body` is the
decoded JSON (None when the body is empty or not JSON, in which case `body_text` holds
the raw text). Use `read_records` to load the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypedDict, cast, get_args

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tests.upstreams.serving import bind_loopback, serve_ready

Mode = Literal["legacy-sse", "legacy-json", "modern"]
MODES: Final[tuple[str, ...]] = get_args(Mode)

MCP_PATH: Final = "/mcp"
_GRACEFUL_SHUTDOWN_S: Final = 2


class Record(TypedDict):
    """One recorded HTTP request, as written to the `--record` file."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    body_text: str | None


def build_server() -> MCPServer[Any]:
    """Build the `MCPServer` with the four test tools registered."""
    srv: MCPServer[Any] = MCPServer(name="pyserver", version="0.1.0", log_level="WARNING")

    @srv.tool()
    def echo(text: str) -> str:
        """Return `text` unchanged."""
        return text

    @srv.tool()
    def add(a: int, b: int) -> int:
        """Return the sum of `a` and `b`."""
        return a + b

    @srv.tool()
    def delete_everything() -> str:
        """A destructive-sounding tool that allow-list tests deny."""
        return "deleted everything"

    @srv.tool()
    async def slow_count(ctx: Context[Any, Any], steps: int = 3, delay: float = 0.2) -> str:
        """Count to `steps`, reporting progress after each step of `delay` seconds."""
        for step in range(1, steps + 1):
            await asyncio.sleep(delay)
            await ctx.report_progress(step, steps, f"step {step}/{steps}")
        return f"counted to {steps}"

    return srv


def build_app(mode: Mode) -> ASGIApp:
    """Build the Starlette app serving `/mcp` in `mode`."""
    srv = build_server()
    return srv.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=mode == "modern",
        json_response=mode == "legacy-json",
        # DNS-rebinding protection would answer 421 to any Host a proxy forwards that is
        # not 127.0.0.1:*/localhost:*; this server only ever binds loopback.
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        host="127.0.0.1",
    )


class RecordingMiddleware:
    """ASGI middleware appending each HTTP request (method, path, headers, body) to a JSONL file.

    The whole request body is read before the app sees it, then replayed; the record is
    written before the app runs, so it exists even when the response streams forever.
    """

    def __init__(self, app: ASGIApp, path: Path) -> None:
        """Wrap `app`, recording into `path` (created if missing, appended to otherwise)."""
        self._app = app
        self._path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Record an HTTP request, then pass it on unchanged."""
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        chunks: list[bytes] = []
        disconnected = False
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        self._write(scope, body)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                if disconnected:
                    return {"type": "http.disconnect"}
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)

    def _write(self, scope: Scope, body: bytes) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        text = body.decode("utf-8", errors="replace")
        parsed: Any = None
        raw_text: str | None = None
        if body:
            try:
                parsed = json.loads(body)
            except ValueError:
                raw_text = text
        record: Record = {
            "method": scope["method"],
            "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": headers,
            "body": parsed,
            "body_text": raw_text,
        }
        # One write of one line in append mode: lines never interleave, even across processes.
        with self._path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")


def read_records(path: Path) -> list[Record]:
    """Load every request recorded so far in `path` (empty if nothing was recorded yet)."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [cast(Record, json.loads(line)) for line in lines if line.strip()]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.upstreams.pyserver", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    parser.add_argument("--mode", choices=MODES, default="legacy-sse", help="how legacy-era requests are served")
    parser.add_argument("--record", type=Path, default=None, help="append one JSON line per HTTP request here")
    return parser.parse_args(argv)


async def serve(mode: Mode, port: int, record: Path | None) -> None:
    """Serve until SIGTERM/SIGINT, printing `READY <port>` once connections are accepted."""
    app = build_app(mode)
    if record is not None:
        app = RecordingMiddleware(app, record)
    # Open SSE streams (GET streams, long tool calls) would otherwise hold shutdown forever.
    options = {"lifespan": "on", "timeout_graceful_shutdown": _GRACEFUL_SHUTDOWN_S}
    await serve_ready(bind_loopback(port), app, f"pyserver (mode={mode})", **options)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    args = _parse_args(argv)
    asyncio.run(serve(cast(Mode, args.mode), args.port, args.record))


if __name__ == "__main__":
    main()
