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

With `--event-store`, a stateful mode keeps every SSE event in memory
(`MemoryEventStore`): streams of 2025-11-25 clients open with a priming event whose
id a GET with `Last-Event-ID` resumes from, and the events that followed it (a
`tools/list` result, say) are replayed on that GET.

Every mode also answers 2026-07-28 requests: the SDK's session manager routes a POST
whose `MCP-Protocol-Version` header names a non-handshake revision to its stateless
modern handler, whatever `stateless_http` says. The era is therefore chosen by the
client (`tests.agents.legacy_session` / `modern_session`); the mode only decides how the
legacy era is served. A modern response is JSON unless the handler emits a notification
(e.g. progress) first, in which case it commits to SSE.

Tools: `echo(text)` (annotated `readOnlyHint`), `add(a, b)` (no annotations),
`delete_everything()` (annotated `destructiveHint`; the tool allow-list tests deny it, so
the record shows it never arrived), `slow_count(steps, delay)`, which
reports progress once per step before returning, and `push_unrelated(count, delay)` /
`pushed_outcomes()`: notifications and an `elicitation/create` sent later on the
session's standalone stream, and what became of the elicitation; `announce_change()`:
`notifications/tools/list_changed` (in 2026-07-28, on the listen streams asking for it).

With `--record FILE`, every HTTP request is appended to FILE as one JSON line as soon
as its body has arrived (before the MCP handler runs)::

    {"method": "POST", "path": "/mcp", "query": "", "headers": {"mcp-method": "tools/call", ...},
     "body": {"jsonrpc": "2.0", "id": 1, "method": "tools/call", ...}, "body_text": null,
     "body_latin1": "{\"jsonrpc\": ..."}

Header names are lower-cased; repeated headers are joined with ", ". `body` is the
decoded JSON (None when the body is empty or not JSON, in which case `body_text` holds
the raw text); `body_latin1` is every byte as it arrived (one character per byte:
`.encode("latin-1")` gives the bytes back). Use `read_records` to load the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypedDict, cast, get_args

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import JSONRPCMessage, ToolAnnotations
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
    body_latin1: str


def build_server() -> MCPServer[Any]:
    """Build the `MCPServer` with the test tools registered."""
    srv: MCPServer[Any] = MCPServer(name="pyserver", version="0.1.0", log_level="WARNING")

    @srv.tool(annotations=ToolAnnotations(read_only_hint=True))
    def echo(text: str) -> str:
        """Return `text` unchanged."""
        return text

    @srv.tool()
    def add(a: int, b: int) -> int:
        """Return the sum of `a` and `b`."""
        return a + b

    @srv.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True))
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

    pushed: list[str] = []
    background: set[asyncio.Task[None]] = set()

    @srv.tool()
    async def push_unrelated(ctx: Context[Any, Any], count: int = 3, delay: float = 1.0) -> str:
        """After `delay` s, send `count` log notifications and one `elicitation/create`
        related to no request (they travel on the session's standalone GET stream);
        `pushed` tells what became of the elicitation."""
        session = ctx.session

        async def push() -> None:
            await asyncio.sleep(delay)
            for n in range(1, count + 1):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    await session.send_log_message("info", f"unrelated {n}")
            try:
                result = await session.elicit("unrelated question", {"type": "object", "properties": {}})
                pushed.append(f"answered: {result.action}")
            except Exception as exc:  # the client's (or the gateway's) error answer
                pushed.append(f"error: {exc}")

        task = asyncio.create_task(push())
        background.add(task)
        task.add_done_callback(background.discard)
        return "scheduled"

    @srv.tool()
    async def announce_change(ctx: Context[Any, Any]) -> str:
        """Say the tool list changed (2026-07-28: to the subscriptions/listen streams asking for it)."""
        await ctx.notify_tools_changed()
        return "announced"

    @srv.tool()
    def pushed_outcomes() -> list[str]:
        """What became of the elicitations `push_unrelated` sent, in order."""
        return pushed

    return srv


class MemoryEventStore(EventStore):
    """Every event of every stream, in memory, for resumability: a GET with Last-Event-ID replays what followed."""

    def __init__(self) -> None:
        self._events: list[tuple[str, str, JSONRPCMessage | None]] = []  # (event id, stream id, message)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = f"{stream_id}_{len(self._events)}"
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        found = [i for i, (event_id, _, _) in enumerate(self._events) if event_id == last_event_id]
        if not found:
            return None
        stream_id = self._events[found[0]][1]
        for event_id, stream, message in self._events[found[0] + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


def build_app(mode: Mode, *, event_store: bool = False) -> ASGIApp:
    """Build the Starlette app serving `/mcp` in `mode` (resumable with `event_store`)."""
    srv = build_server()
    return srv.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=mode == "modern",
        json_response=mode == "legacy-json",
        event_store=MemoryEventStore() if event_store else None,
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
            "body_latin1": body.decode("latin-1"),
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
    parser.add_argument("--event-store", action="store_true", help="keep SSE events in memory for resumption")
    return parser.parse_args(argv)


async def serve(mode: Mode, port: int, record: Path | None, *, event_store: bool = False) -> None:
    """Serve until SIGTERM/SIGINT, printing `READY <port>` once connections are accepted."""
    app = build_app(mode, event_store=event_store)
    if record is not None:
        app = RecordingMiddleware(app, record)
    # Open SSE streams (GET streams, long tool calls) would otherwise hold shutdown forever.
    options = {"lifespan": "on", "timeout_graceful_shutdown": _GRACEFUL_SHUTDOWN_S}
    await serve_ready(bind_loopback(port), app, f"pyserver (mode={mode})", **options)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    args = _parse_args(argv)
    asyncio.run(serve(cast(Mode, args.mode), args.port, args.record, event_store=args.event_store))


if __name__ == "__main__":
    main()
