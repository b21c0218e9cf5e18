"""Envoy-shaped messages for the in-process front door tests: ext_proc requests, and the demo MCPServer."""

from __future__ import annotations

import json
from typing import Any

from envoy.config.core.v3 import base_pb2 as core_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

SERVER_DOC = {
    "apiVersion": "mcp.extproc.io/v1alpha1",
    "kind": "MCPServer",
    "metadata": {"name": "demo"},
    "spec": {
        "url": "http://127.0.0.1:9/mcp",
        "allowedTools": ["echo", "add*"],
        "deniedTools": ["add_secret"],
    },
}


def headers_msg(
    headers: dict[str, str], *, end_of_stream: bool = False, response: bool = False
) -> pb.ProcessingRequest:
    hmap = core_pb.HeaderMap(headers=[core_pb.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])
    http = pb.HttpHeaders(headers=hmap, end_of_stream=end_of_stream)
    return pb.ProcessingRequest(response_headers=http) if response else pb.ProcessingRequest(request_headers=http)


def body_msg(body: bytes | Any, *, end_of_stream: bool = True, response: bool = False) -> pb.ProcessingRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    http = pb.HttpBody(body=raw, end_of_stream=end_of_stream)
    return pb.ProcessingRequest(response_body=http) if response else pb.ProcessingRequest(request_body=http)


def post_headers(path: str = "/demo/mcp", **extra: str) -> dict[str, str]:
    return {
        ":method": "POST",
        ":path": path,
        "content-type": "application/json",
        "x-request-id": "req-1",
        **extra,
    }


def mutated(common: pb.CommonResponse) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}
