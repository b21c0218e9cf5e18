"""A hostile MCP upstream: it answers ``tools/list`` in ways a lenient client reads and a naive filter does not.

Start it as a process::

    python -m tests.upstreams.hostile --port 0

It binds 127.0.0.1 and prints ``READY <port>`` once it accepts connections. It is a
hand-written peer on purpose (no SDK would send these answers): Streamable HTTP, legacy
era, no sessions, at ``/<case>/mcp``, where ``<case>`` picks how ``tools/list`` is
answered. Every case lists ``echo`` and ``secret_tool``; a gateway that allows only
``echo`` must never let ``secret_tool`` reach the agent::

    POST initialize             ─▶ JSON result (the protocol version the client asked for)
    POST notifications/*        ─▶ 202
    POST tools/list             ─▶ per case:
        bigint    JSON, with an integer of 5,000 digits in result._meta (JavaScript's
                  JSON.parse reads it; Python's json refuses it)
        utf8      JSON, with a byte that is not UTF-8 in a description (a client's
                  decoder replaces it; a strict one refuses the body)
        idtype    JSON, the result's id a string ("1" for 1: the TypeScript SDK looks up
                  Number(id))
        sse-cr    SSE, the last event's blank line a lone CR at the very end of the
                  stream (httpx's SSE parser dispatches it at end of stream)
        plain     JSON, well-formed (the control)
    POST tools/call             ─▶ JSON result, text "called <name>"
    POST anything else          ─▶ JSON-RPC error -32601
    GET, DELETE                 ─▶ 405 (no standalone stream, no session)
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.upstreams.serving import bind_loopback, serve_ready

CASES: Final = ("bigint", "utf8", "idtype", "sse-cr", "plain")
HIDDEN_TOOL: Final = "secret_tool"
TOOLS: Final = [
    {"name": "echo", "description": "Echo the text", "inputSchema": {"type": "object"}},
    {"name": HIDDEN_TOOL, "description": "Never to be listed", "inputSchema": {"type": "object"}},
]


def _json(value: Any, status: int = 200) -> Response:
    return Response(json.dumps(value).encode(), status, media_type="application/json")


def _tools_list(case: str, id_: Any) -> Response:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "result": {"tools": TOOLS}}
    raw = json.dumps(message).encode()
    if case == "bigint":
        raw = raw[:-2] + b',"_meta":{"n":' + b"7" * 5000 + b"}}}"
    elif case == "utf8":
        raw = raw.replace(b"Echo the text", b"Echo the caf\xe9 text")
    elif case == "idtype":
        raw = json.dumps({**message, "id": str(id_)}).encode()
    elif case == "sse-cr":
        return Response(b"event: message\ndata: " + raw + b"\n\r", media_type="text/event-stream")
    return Response(raw, media_type="application/json")


async def _mcp(request: Request) -> Response:
    case = request.path_params["case"]
    if request.method != "POST" or case not in CASES:
        return Response(status_code=405 if case in CASES else 404)
    message = json.loads(await request.body())
    method, id_ = message.get("method"), message.get("id")
    if id_ is None:
        return Response(status_code=202)
    if method == "initialize":
        version = message.get("params", {}).get("protocolVersion", "2025-06-18")
        info = {"name": f"hostile-{case}", "version": "0"}
        result = {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": info}
        return _json({"jsonrpc": "2.0", "id": id_, "result": result})
    if method == "tools/list":
        return _tools_list(case, id_)
    if method == "tools/call":
        text = f"called {message.get('params', {}).get('name')}"
        return _json({"jsonrpc": "2.0", "id": id_, "result": {"content": [{"type": "text", "text": text}]}})
    return _json({"jsonrpc": "2.0", "id": id_, "error": {"code": -32601, "message": f"no method {method!r}"}})


def build_app() -> Starlette:
    """The Starlette app serving ``/<case>/mcp``."""
    return Starlette(routes=[Route("/{case}/mcp", _mcp, methods=["GET", "POST", "DELETE"])])


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m tests.upstreams.hostile", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (0 = pick a free one)")
    args = parser.parse_args(argv)
    asyncio.run(serve_ready(bind_loopback(args.port), build_app(), "hostile"))


if __name__ == "__main__":
    main()
