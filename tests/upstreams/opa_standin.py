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
from pathlib import Path
from typing import Any

from regopy import Input, Interpreter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.upstreams.serving import bind_loopback, serve_ready


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
    await serve_ready(bind_loopback(port), build_app(module), "opa_standin")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.upstreams.opa_standin")
    parser.add_argument("--module", type=Path, required=True, help="the Rego module to serve")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.module.read_text(), args.port))


if __name__ == "__main__":
    main()
