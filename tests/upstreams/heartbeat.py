"""A heartbeating stateful MCP server (legacy Streamable HTTP), like Playwright MCP but faster.

Start it as a process::

    python -m tests.upstreams.heartbeat --port 0 --interval 1 --timeout 2

It prints `READY <port>`. At `/mcp` it speaks the legacy era (2025-03-26 … 2025-11-25):

- `POST` `initialize` (no session header) opens a session and answers with
  `Mcp-Session-Id`; later POSTs must carry it. Requests: `ping`, `tools/list`,
  `tools/call` of `echo(text)`; notifications are accepted (202); a JSON-RPC response
  to one of our pings (a *pong*) is accepted (202) and recorded. Answers are JSON.
- `GET` opens the session's standalone SSE stream; a second one while the first is
  open is answered **409** (as the TypeScript SDK does).
- `DELETE` ends the session.
- An unknown or closed session is answered **404** "Session not found".

Heartbeat (Playwright MCP's rule, with shorter times): it starts when a GET stream is
first opened for the session. Every `interval` seconds the server sends a `ping`
request on the GET stream (dropped when no stream is open, as the SDKs do); a ping
unanswered for `timeout` seconds closes the session.

It was written by hand because the SDK servers do not heartbeat on their own; the
protocol parts (session header, 404/409, SSE framing) follow the SDKs' behaviour.

`GET /admin/sessions` reports every session: pings sent, pongs received, GET streams
opened, whether a stream is open, whether it was closed and why, and the
`Authorization` values seen on its requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.upstreams.serving import bind_loopback, serve_ready

VERSIONS: Final = ("2025-03-26", "2025-06-18", "2025-11-25")


@dataclass(eq=False)
class Session:
    """One session's heartbeat state."""

    id: str
    stream: asyncio.Queue[bytes] | None = None
    pending: dict[str, float] = field(default_factory=dict)
    heartbeat: asyncio.Task[None] | None = None
    closed: str | None = None
    pings_sent: int = 0
    pongs: int = 0
    gets: int = 0
    conflicts: int = 0
    authorizations: list[str] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "closed": self.closed,
            "stream_open": self.stream is not None,
            "pings_sent": self.pings_sent,
            "pongs": self.pongs,
            "gets": self.gets,
            "conflicts": self.conflicts,
            "authorizations": sorted(set(self.authorizations)),
        }


@dataclass
class Heartbeat:
    """Server state: every session ever opened."""

    interval_s: float
    timeout_s: float
    sessions: dict[str, Session] = field(default_factory=dict)

    async def beat(self, session: Session) -> None:
        """Ping every interval; close the session when a ping stays unanswered for timeout."""
        n = 0
        while session.closed is None:
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            if any(now - sent > self.timeout_s for sent in session.pending.values()):
                self.close(session, "ping timeout")
                return
            n += 1
            ping_id = f"hb-{n}"
            session.pending[ping_id] = now
            session.pings_sent += 1
            if session.stream is not None:
                message = {"jsonrpc": "2.0", "id": ping_id, "method": "ping"}
                session.stream.put_nowait(f"event: message\ndata: {json.dumps(message)}\n\n".encode())

    def close(self, session: Session, reason: str) -> None:
        if session.closed is None:
            session.closed = reason
        if session.stream is not None:
            session.stream.put_nowait(b"")  # ends the GET stream
        if session.heartbeat is not None and session.heartbeat is not asyncio.current_task():
            session.heartbeat.cancel()


def _rpc_error(id: Any, code: int, message: str, status: int) -> JSONResponse:
    return JSONResponse({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}, status_code=status)


def build_app(state: Heartbeat) -> Starlette:
    """The Starlette app; see the module docstring."""

    def session_of(request: Request) -> Session | None:
        found = state.sessions.get(request.headers.get("mcp-session-id", ""))
        if found is not None:
            found.authorizations.append(request.headers.get("authorization", ""))
        return found if found is not None and found.closed is None else None

    async def post(request: Request) -> Response:
        try:
            message = json.loads(await request.body())
        except ValueError:
            return _rpc_error(None, -32700, "Parse error", 400)
        if not isinstance(message, dict):
            return _rpc_error(None, -32600, "Invalid Request", 400)
        if "mcp-session-id" not in request.headers:
            if message.get("method") != "initialize":
                return _rpc_error(message.get("id"), -32600, "Bad Request: no session", 400)
            session = Session(id=uuid.uuid4().hex)
            state.sessions[session.id] = session
            session.authorizations.append(request.headers.get("authorization", ""))
            asked = (message.get("params") or {}).get("protocolVersion")
            opened: dict[str, Any] = {
                "protocolVersion": asked if asked in VERSIONS else VERSIONS[-1],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "heartbeat", "version": "0"},
            }
            return JSONResponse(
                {"jsonrpc": "2.0", "id": message.get("id"), "result": opened},
                headers={"mcp-session-id": session.id},
            )
        found = session_of(request)
        if found is None:
            return _rpc_error(message.get("id"), -32001, "Session not found", 404)
        if "method" not in message:  # a response: a pong, or an answer we did not ask for
            if found.pending.pop(str(message.get("id")), None) is not None:
                found.pongs += 1
            return Response(status_code=202)
        if "id" not in message:
            return Response(status_code=202)
        method = message["method"]
        if method == "ping":
            result: Any = {}
        elif method == "tools/list":
            schema = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
            result = {"tools": [{"name": "echo", "inputSchema": schema}]}
        elif method == "tools/call":
            text = ((message.get("params") or {}).get("arguments") or {}).get("text", "")
            result = {"content": [{"type": "text", "text": str(text)}], "isError": False}
        else:
            return _rpc_error(message["id"], -32601, f"Method not found: {method}", 200)
        return JSONResponse({"jsonrpc": "2.0", "id": message["id"], "result": result})

    async def get(request: Request) -> Response:
        found = session_of(request)
        if found is None:
            return _rpc_error(None, -32001, "Session not found", 404)
        if found.stream is not None:
            found.conflicts += 1
            return _rpc_error(None, -32000, "Conflict: only one SSE stream is allowed per session", 409)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        found.stream = queue
        found.gets += 1
        if found.heartbeat is None:
            found.heartbeat = asyncio.create_task(state.beat(found))

        async def events() -> AsyncIterator[bytes]:
            try:
                yield b": stream open\n\n"
                while True:
                    chunk = await queue.get()
                    if not chunk:
                        return
                    yield chunk
            finally:
                if found.stream is queue:
                    found.stream = None

        return StreamingResponse(events(), media_type="text/event-stream", headers={"cache-control": "no-cache"})

    async def delete(request: Request) -> Response:
        found = session_of(request)
        if found is None:
            return _rpc_error(None, -32001, "Session not found", 404)
        state.close(found, "deleted")
        return Response(status_code=200)

    async def mcp(request: Request) -> Response:
        handler = {"POST": post, "GET": get, "DELETE": delete}.get(request.method)
        if handler is None:
            return Response(status_code=405)
        return await handler(request)

    async def sessions(request: Request) -> Response:
        return JSONResponse([s.report() for s in state.sessions.values()])

    return Starlette(
        routes=[
            Route("/mcp", mcp, methods=["GET", "POST", "DELETE"]),
            Route("/admin/sessions", sessions, methods=["GET"]),
        ]
    )


async def serve(port: int, interval_s: float, timeout_s: float) -> None:
    """Serve until SIGTERM/SIGINT, printing `READY <port>` once connections are accepted."""
    app = build_app(Heartbeat(interval_s, timeout_s))
    options = {"lifespan": "off", "timeout_graceful_shutdown": 1, "backlog": 4096}
    await serve_ready(bind_loopback(port), app, "heartbeat", **options)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tests.upstreams.heartbeat")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between pings")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds a ping may stay unanswered")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port, args.interval, args.timeout))


if __name__ == "__main__":
    main()
