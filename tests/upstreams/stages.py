"""External stage servers for the tests, built with :mod:`extproc.external.kit` (or raw gRPC where a
server must break the protocol on purpose).

Run as a process; prints ``READY <address>`` once it accepts calls::

    python -m tests.upstreams.stages --behaviour policy --address unix:/tmp/s.sock

Behaviours:

- ``policy`` (stage ``test-policy``, request and response phases, ``tools/call``): denies
  ``add`` when ``a`` is 13 (JSON-RPC error -32013 with data); upper-cases the text of
  ``echo`` results (text content and structured result); publishes the metadata it received from earlier stages as the
  ``x-seen-metadata`` header on the request to the MCP server.
- ``slow`` (stage ``test-slow``): answers every call after 5 s (past any test deadline).
- ``bad-name`` / ``no-phases``: a raw servicer whose ``Describe`` breaks the protocol.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from extproc.external.kit import Forward, Refuse, Request, StageService, serve, stage
from mcp_extproc.stage.v1 import stage_pb2 as pb
from mcp_extproc.stage.v1 import stage_pb2_grpc as pb_grpc

UNLUCKY = -32013


@stage("test-policy", phases=["request", "response"], methods=["tools/call"])
async def policy(request: Request) -> Forward | Refuse | None:
    if request.phase == "request":
        if request.tool == "add" and (request.arguments or {}).get("a") == 13:
            return Refuse("13 is unlucky", code=UNLUCKY, data={"tool": "add", "a": 13})
        return Forward(set_headers={"x-seen-metadata": json.dumps(dict(request.metadata), sort_keys=True)})
    if request.tool == "echo" and request.result is not None:
        return Forward(result=_upper(request.result))
    return None


def _upper(result: dict[str, Any]) -> dict[str, Any]:
    """The echo result with its text content and structured result upper-cased."""
    content = [
        {**item, "text": item["text"].upper()} if item.get("type") == "text" else item
        for item in result.get("content", [])
    ]
    out = {**result, "content": content}
    structured = result.get("structuredContent")
    if isinstance(structured, dict) and isinstance(structured.get("result"), str):
        out["structuredContent"] = {**structured, "result": structured["result"].upper()}
    return out


@stage("test-slow", methods=["tools/call"])
async def slow(request: Request) -> None:
    await asyncio.sleep(5)


class _Broken(pb_grpc.ExternalStageServicer):
    def __init__(self, answer: pb.DescribeResponse) -> None:
        self.answer = answer

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        return self.answer

    async def Process(self, request: pb.ProcessRequest, context: grpc.aio.ServicerContext) -> pb.ProcessResponse:
        return pb.ProcessResponse()


BROKEN = {
    "bad-name": pb.DescribeResponse(name="Bad Name!", phases=[pb.PHASE_REQUEST]),
    "no-phases": pb.DescribeResponse(name="no-phases"),
}
SERVICES: dict[str, StageService] = {"policy": policy, "slow": slow}


async def _serve_broken(answer: pb.DescribeResponse, address: str) -> None:
    server = grpc.aio.server()
    pb_grpc.add_ExternalStageServicer_to_server(_Broken(answer), server)
    port = server.add_insecure_port(address)
    await server.start()
    print(f"READY {address if address.startswith('unix:') else f'127.0.0.1:{port}'}", flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--behaviour", required=True, choices=sorted([*SERVICES, *BROKEN]))
    parser.add_argument("--address", default="127.0.0.1:0")
    args = parser.parse_args(argv)
    if args.behaviour in BROKEN:
        asyncio.run(_serve_broken(BROKEN[args.behaviour], args.address))
    else:
        serve(SERVICES[args.behaviour], args.address)
    return 0


if __name__ == "__main__":
    sys.exit(main())
