"""Envoy's own answers through real ``up``: with their own status, and JSON-RPC where they are about a body.

- A request Envoy refuses before routing (a path with ``#``, a WebSocket upgrade no route
  allows) still passes through our ext_proc encoder: the stream starts at the response
  headers. It keeps Envoy's status (400, 403), never a 500 "phase without request headers".
- A chunked POST (no Content-Length) over the size limit is refused 413 with a JSON-RPC
  -32600, on the default front door ``auto`` (whose Envoy MCP filter must not see it: it
  would stop reading at the limit and hold the stream) and on ``ext_proc`` (where Envoy's
  own 413 is turned into the JSON-RPC error by the rendered local replies); nothing
  reaches the upstream. A chunked POST under the limit is still served.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import yaml

from extproc.mcp.jsonrpc import DEFAULT_MAX_REQUEST_BYTES
from tests.agents import BASE_HEADERS, LEGACY_VERSION, modern_request
from tests.integration.conftest import PY_TOOLS, resource_doc, start_gateway
from tests.procs import Proc, start_pyserver
from tests.upstreams.pyserver import read_records

pytestmark = pytest.mark.integration

INVALID_REQUEST: Final = -32600
CHUNK: Final = 64 * 1024


@dataclass
class Door:
    """A running ``up`` on one front door, a legacy upstream at /py/mcp and a modern one at /modern/mcp."""

    name: str
    base: str
    port: int
    records: dict[str, Path]


@pytest.fixture(scope="module", params=["auto", "ext_proc"])
def door(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    tmp = tmp_path_factory.mktemp(f"replies-{request.param}")
    procs: list[Proc] = []
    try:
        records: dict[str, Path] = {}
        docs = []
        for name, mode in (("py", "legacy-json"), ("modern", "modern")):
            records[name] = tmp / f"{name}.jsonl"
            proc, port = start_pyserver(mode, records[name])  # type: ignore[arg-type]
            procs.append(proc)
            docs.append(resource_doc(name, port, PY_TOOLS))
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        up, base, _metrics = start_gateway(resources, tmp, "--front-door", request.param)
        procs.append(up)
        yield Door(request.param, base, int(base.rsplit(":", 1)[1]), records)
    finally:
        for proc in reversed(procs):
            proc.stop()


def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send ``request`` as is; the status and body of the answer (Envoy closes these connections)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_a_path_with_a_fragment_keeps_envoys_400(door: Door) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"ping"}'
    request = (
        b"POST /py/mcp#fragment HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    status, answer = _raw(door.port, request)
    assert status == 400
    assert b"phase without request headers" not in answer


def test_a_websocket_upgrade_keeps_envoys_403(door: Door) -> None:
    request = (
        b"GET /py/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    status, answer = _raw(door.port, request)
    assert status == 403
    assert b"phase without request headers" not in answer


def _chunked(body: bytes) -> Iterator[bytes]:
    # An iterator body: httpx sends it with Transfer-Encoding: chunked, no Content-Length.
    for start in range(0, len(body), CHUNK):
        yield body[start : start + CHUNK]


def _call(size: int, id_: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id_,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "x" * size}},
    }


def _received(door: Door, server: str, id_: int) -> list[Any]:
    """What the upstream ``server`` received of the request with JSON-RPC id ``id_``."""
    return [r for r in read_records(door.records[server]) if isinstance(r["body"], dict) and r["body"].get("id") == id_]


def _post_chunked(url: str, message: dict[str, Any], headers: dict[str, str]) -> httpx.Response:
    body = json.dumps(message).encode()
    return httpx.post(url, content=_chunked(body), headers={**BASE_HEADERS, **headers}, timeout=20)


@pytest.mark.parametrize("size", [DEFAULT_MAX_REQUEST_BYTES + 1, 2 * DEFAULT_MAX_REQUEST_BYTES])
def test_a_chunked_legacy_call_over_the_limit_is_413_invalid_request(door: Door, size: int) -> None:
    reply = _post_chunked(f"{door.base}/py/mcp", _call(size, 91), {"mcp-protocol-version": LEGACY_VERSION})
    assert reply.status_code == 413, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["code"] == INVALID_REQUEST
    assert not _received(door, "py", 91)


def test_a_chunked_modern_call_over_the_limit_is_413_invalid_request(door: Door) -> None:
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "x" * (5 << 20)}}, 92)
    reply = _post_chunked(f"{door.base}/modern/mcp", body, headers)
    assert reply.status_code == 413, reply.text
    assert reply.json()["error"]["code"] == INVALID_REQUEST
    assert not _received(door, "modern", 92)


def test_a_chunked_call_under_the_limit_is_served(door: Door) -> None:
    body, headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": "y" * 200_000}}, 93)
    reply = _post_chunked(f"{door.base}/modern/mcp", body, headers)
    assert reply.status_code == 200, reply.text
    assert '"id":93' in reply.text.replace(" ", "")
