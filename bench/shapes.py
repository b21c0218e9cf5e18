"""The MCP requests the benchmark sends: what goes on the wire, and the wrk script for it.

Pure: no I/O. Shapes of the same ``tools/call`` (and of a ``tools/list``, for the
virtual server rows):

* ``2025-06-18``: legacy era, the protocol version only in a header;
* ``2026-07-28``: the method and tool mirrored in ``Mcp-Method`` / ``Mcp-Name`` and the
  protocol version in ``params._meta``;
* ``2025-06-18+session``: the legacy call inside a session: with the gateway-signed
  ``Mcp-Session-Id`` the ``session`` stage verifies and swaps for the upstream's (what the
  signature check costs; the id is minted by the bench with the server's key set).

:func:`initialize` opens a legacy session (on a virtual server: the gateway answers it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

ALLOWED_TOOL: Final = "echo"
"""The tool the benchmark calls; the only entry of the MCPServer's ``allowedTools``."""

DENIED_TOOL: Final = "not_on_the_list"
"""A tool outside ``allowedTools``: the default pipeline must refuse it."""

LEGACY_VERSION: Final = "2025-06-18"
MODERN_VERSION: Final = "2026-07-28"


@dataclass(frozen=True)
class Shape:
    """One request: its headers and JSON body.

    Attributes:
        name: Label in the report (the protocol revision).
        headers: Request headers (besides Host and Content-Length).
        body: The JSON-RPC request.
    """

    name: str
    headers: Mapping[str, str]
    body: Mapping[str, Any] = field(hash=False)

    @property
    def body_bytes(self) -> bytes:
        """The body as sent: compact JSON."""
        return json.dumps(self.body, separators=(",", ":")).encode()


def _common_headers(version: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "accept": "application/json, text/event-stream",
        "mcp-protocol-version": version,
    }


def legacy_call(tool: str = ALLOWED_TOOL) -> Shape:
    """A 2025-06-18 ``tools/call`` of ``tool``."""
    params: dict[str, Any] = {"name": tool, "arguments": {"text": "hi"}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    return Shape(LEGACY_VERSION, _common_headers(LEGACY_VERSION), body)


def _modern_meta() -> dict[str, Any]:
    return {
        "io.modelcontextprotocol/protocolVersion": MODERN_VERSION,
        "io.modelcontextprotocol/clientCapabilities": {},
    }


def modern_call(tool: str = ALLOWED_TOOL) -> Shape:
    """A 2026-07-28 ``tools/call`` of ``tool`` (routing headers plus ``params._meta``)."""
    params: dict[str, Any] = {"name": tool, "arguments": {"text": "hi"}, "_meta": _modern_meta()}
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": params}
    headers = {**_common_headers(MODERN_VERSION), "mcp-method": "tools/call", "mcp-name": tool}
    return Shape(MODERN_VERSION, headers, body)


def modern_list() -> Shape:
    """A 2026-07-28 ``tools/list``."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": _modern_meta()}}
    return Shape(MODERN_VERSION, {**_common_headers(MODERN_VERSION), "mcp-method": "tools/list"}, body)


SESSION_SHAPE: Final = f"{LEGACY_VERSION}+session"


def session_call(session_id: str, tool: str = ALLOWED_TOOL) -> Shape:
    """The legacy ``tools/call`` of ``tool`` in the session ``session_id``."""
    plain = legacy_call(tool)
    return Shape(SESSION_SHAPE, {**plain.headers, "mcp-session-id": session_id}, plain.body)


def session_list(session_id: str) -> Shape:
    """A legacy ``tools/list`` in the session ``session_id``."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    return Shape(SESSION_SHAPE, {**_common_headers(LEGACY_VERSION), "mcp-session-id": session_id}, body)


def initialize() -> Shape:
    """A legacy ``initialize`` (no session yet)."""
    params = {"protocolVersion": LEGACY_VERSION, "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    return Shape(LEGACY_VERSION, _common_headers(LEGACY_VERSION), body)


SHAPES: Final = (legacy_call(), modern_call())
"""What is measured without a session, in report order (:func:`session_call` comes third)."""


def denied_variant(shape: Shape) -> Shape:
    """The same request for :data:`DENIED_TOOL` (for the sanity check)."""
    if shape.name == SESSION_SHAPE:
        return session_call(shape.headers["mcp-session-id"], DENIED_TOOL)
    return modern_call(DENIED_TOOL) if shape.name == MODERN_VERSION else legacy_call(DENIED_TOOL)


def external_denied_variant(shape: Shape, text: str) -> Shape:
    """The same request with ``arguments.text`` set to ``text`` (the benchmark stage denies it)."""
    params = {**shape.body["params"], "arguments": {"text": text}}
    return Shape(shape.name, shape.headers, {**shape.body, "params": params})


def _lua_string(value: str) -> str:
    # JSON string escaping is valid Lua string escaping for the ASCII we send.
    return json.dumps(value)


def wrk_script(shape: Shape) -> str:
    """A wrk Lua script sending ``shape`` as a POST on every request."""
    lines = ['wrk.method = "POST"', f"wrk.body = {_lua_string(shape.body_bytes.decode())}"]
    lines += [f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in shape.headers.items()]
    return "\n".join(lines) + "\n"
