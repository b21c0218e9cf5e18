"""A stand-in for a remote OPA server: its Data API, evaluated with the embedded engine.

No OPA binary can be installed on this machine, so the remote-OPA mode is tested
against this small server instead. It speaks the part of OPA's REST API the
``policy`` stage uses, and evaluates with regopy (rego-cpp)::

    POST /v1/data/<package path>/<rule>  {"input": {...}}  ──▶  {"result": <value>}
                                                              (no "result" when undefined)
    GET  /health                                           ──▶  {}
    GET  /_requests                                        ──▶  {"count": N, "inputs": [...]}

Run: ``python -m tests.upstreams.opa_standin --module policy.rego --port 0``; it
prints ``READY <port>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn
from regopy import Input, Interpreter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def build_app(module: str) -> Starlette:
    seen: list[Any] = []

    async def data(request: Request) -> JSONResponse:
        path = request.path_params["path"].strip("/").replace("/", ".")
        payload = await request.json()
        seen.append(payload.get("input"))
        interpreter = Interpreter()
        interpreter.add_module("policy.rego", module)
        interpreter.set_input(Input(payload.get("input")))
        output = interpreter.query(f"x = data.{path}")
        if str(output) == "undefined":
            return JSONResponse({})
        return JSONResponse({"result": json.loads(output.binding("x").json())})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({})

    async def requests(request: Request) -> JSONResponse:
        return JSONResponse({"count": len(seen), "inputs": seen})

    return Starlette(
        routes=[
            Route("/v1/data/{path:path}", data, methods=["POST"]),
            Route("/health", health),
            Route("/_requests", requests),
        ]
    )


async def serve(module: str, port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(build_app(module), log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            await task
            raise SystemExit("opa_standin: uvicorn exited during startup")
        await asyncio.sleep(0.01)
    sys.stdout.write(f"READY {sock.getsockname()[1]}\n")
    sys.stdout.flush()
    await task


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.upstreams.opa_standin")
    parser.add_argument("--module", type=Path, required=True, help="the Rego module to serve")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.module.read_text(), args.port))


if __name__ == "__main__":
    main()
