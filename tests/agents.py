"""MCP agents for tests: official SDK clients on either protocol era, and hand-made requests.

`legacy_session(url)` and `modern_session(url)` yield an `mcp.client.session.ClientSession`
over the SDK's Streamable HTTP transport. The era is forced, not discovered:

- legacy: `ClientSession.initialize()` -- the `initialize` handshake at 2025-11-25, then
  `Mcp-Session-Id` (if the server issues one), a GET SSE stream and a DELETE on exit.
- modern: `ClientSession.discover()` -- one `server/discover` at 2026-07-28, whose result
  is adopted; no handshake, no session, every later request is self-contained. It fails
  against a server that has no 2026-07-28 (server-everything answers 400 -32000).

(The SDK's high-level `mcp.client.Client(mode="auto")` would probe `server/discover`
first and fall back to `initialize`; tests want to know which era they speak.)

A modern request on the wire
----------------------------
What the SDK client 2.3.0 sends for `call_tool("echo", {"text": "hi"}, progress_callback=...)`
as recorded by `tests.upstreams.pyserver` (clientInfo is the SDK default; the helpers here
announce `CLIENT_INFO` instead)::

    POST /mcp HTTP/1.1
    accept: application/json, text/event-stream
    content-type: application/json
    mcp-protocol-version: 2026-07-28
    mcp-method: tools/call
    mcp-name: echo

    {"jsonrpc": "2.0", "id": 3, "method": "tools/call",
     "params": {"name": "echo", "arguments": {"text": "hi"},
                "_meta": {"io.modelcontextprotocol/protocolVersion": "2026-07-28",
                          "io.modelcontextprotocol/clientInfo": {"name": "mcp", "version": "0.1.0"},
                          "io.modelcontextprotocol/clientCapabilities": {},
                          "progressToken": 3}}}

- The first request is `server/discover` with the same envelope (no `mcp-name`); its
  result lists `supportedVersions`. Every request, discover included, carries both
  `mcp-protocol-version` and `params._meta["io.modelcontextprotocol/protocolVersion"]`.
  No `mcp-session-id`, no GET, no DELETE, no `initialize`, no `notifications/initialized`.
- `mcp-method` mirrors `method` on every request; `mcp-name` only on `tools/call`
  (`params.name`), `prompts/get` (`params.name`) and `resources/read` (`params.uri`).
  Non-printable-ASCII names are sent as `=?base64?<b64>?=`.
- `_meta` must carry protocolVersion and clientCapabilities; clientInfo is optional;
  `progressToken` appears only when a progress callback was given. The SDK server
  answers a header that disagrees with the body with HTTP 400 and JSON-RPC error -32020
  (HEADER_MISMATCH), an unsupported version with 400 and -32022, an unknown method with
  404 and -32601 (`mcp.shared.inbound.ERROR_CODE_HTTP_STATUS`).
- Tool arguments annotated `x-mcp-header` in the tool's schema are mirrored into
  `Mcp-Param-<Name>` headers (none of the test tools have one).
- The response is `application/json`, or `text/event-stream` once the server emits a
  notification (e.g. progress) before the result.
- `ClientSession.call_tool` on a tool the session has not listed yet is followed by a
  `tools/list` (both eras): the SDK fetches the outputSchema to validate structuredContent.

`modern_request(method, params, id)` builds exactly this envelope for `raw_post`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, Final

import httpx
import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    NAME_BEARING_METHODS,
    encode_header_value,
)
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    Implementation,
)
from mcp_types.version import LATEST_HANDSHAKE_VERSION, LATEST_MODERN_VERSION

MODERN_VERSION: Final = LATEST_MODERN_VERSION
"""The modern protocol revision these helpers speak (2026-07-28)."""

LEGACY_VERSION: Final = LATEST_HANDSHAKE_VERSION
"""The handshake revision `legacy_session` offers (2025-11-25)."""

CLIENT_INFO: Final = Implementation(name="mcp-extproc-tests", version="0")
"""Client identity both session helpers and `modern_request` announce."""

BASE_HEADERS: Final[Mapping[str, str]] = {
    "accept": "application/json, text/event-stream",
    "content-type": "application/json",
}
"""Headers every Streamable HTTP POST carries."""

DEFAULT_TIMEOUT_S: Final = 30.0


def _http_client(headers: Mapping[str, str] | None, timeout_s: float) -> httpx2.AsyncClient:
    # The SDK transport takes an httpx2 client (not httpx); extra headers ride on every request.
    return httpx2.AsyncClient(headers=dict(headers or {}), timeout=httpx2.Timeout(timeout_s))


@asynccontextmanager
async def _session(
    url: str, headers: Mapping[str, str] | None, timeout_s: float, session_kwargs: Mapping[str, Any]
) -> AsyncIterator[ClientSession]:
    kwargs: dict[str, Any] = {"client_info": CLIENT_INFO, "read_timeout_seconds": timeout_s, **session_kwargs}
    async with (
        _http_client(headers, timeout_s) as client,
        streamable_http_client(url, http_client=client) as (read, write),
        ClientSession(read, write, **kwargs) as session,
    ):
        yield session


@asynccontextmanager
async def legacy_session(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **session_kwargs: Any,
) -> AsyncIterator[ClientSession]:
    """An SDK client session on the legacy era: `initialize` handshake, then session requests.

    Args:
        url: Streamable HTTP endpoint, e.g. `http://127.0.0.1:8000/mcp`.
        headers: Extra headers on every HTTP request (e.g. `authorization`).
        timeout_s: HTTP timeout and per-request read timeout.
        **session_kwargs: Passed to `ClientSession` (e.g. `message_handler`).

    Yields:
        The initialized session; on exit the SDK DELETEs the session if it has an id.
    """
    async with _session(url, headers, timeout_s, session_kwargs) as session:
        await session.initialize()
        yield session


@asynccontextmanager
async def modern_session(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    **session_kwargs: Any,
) -> AsyncIterator[ClientSession]:
    """An SDK client session on the 2026-07-28 revision: `server/discover`, then stateless POSTs.

    Args:
        url: Streamable HTTP endpoint.
        headers: Extra headers on every HTTP request.
        timeout_s: HTTP timeout and per-request read timeout.
        **session_kwargs: Passed to `ClientSession`.

    Yields:
        A session whose `protocol_version` is 2026-07-28.

    Raises:
        mcp.shared.exceptions.MCPError: The server does not serve 2026-07-28.
    """
    async with _session(url, headers, timeout_s, session_kwargs) as session:
        await session.discover()
        yield session


def modern_request(
    method: str,
    params: Mapping[str, Any] | None = None,
    id: int | str | None = 1,
    *,
    protocol_version: str = MODERN_VERSION,
    client_capabilities: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Build a hand-made 2026-07-28 request: the JSON-RPC body and its HTTP headers.

    The result matches what the SDK client sends (see the module docstring); edit either
    half to make a request that disagrees with itself.

    Args:
        method: JSON-RPC method, e.g. `tools/call`.
        params: Method params without `_meta` (a `_meta` given here is merged in).
        id: Request id; None builds a notification (no `id` member).
        protocol_version: Version for both the header and `_meta`.
        client_capabilities: The `_meta` capabilities object; defaults to `{}`.

    Returns:
        `(body, headers)`, ready for `raw_post(url, body, headers=headers)`.
    """
    body_params: dict[str, Any] = dict(params or {})
    meta: dict[str, Any] = {
        PROTOCOL_VERSION_META_KEY: protocol_version,
        CLIENT_INFO_META_KEY: CLIENT_INFO.model_dump(mode="json", exclude_none=True),
        CLIENT_CAPABILITIES_META_KEY: dict(client_capabilities or {}),
    }
    meta.update(body_params.get("_meta") or {})
    body_params["_meta"] = meta
    body: dict[str, Any] = {"jsonrpc": "2.0"}
    if id is not None:
        body["id"] = id
    body["method"] = method
    body["params"] = body_params

    headers = {**BASE_HEADERS, MCP_PROTOCOL_VERSION_HEADER: protocol_version, MCP_METHOD_HEADER: method}
    name_key = NAME_BEARING_METHODS.get(method)
    if name_key is not None and isinstance(name := body_params.get(name_key), str):
        headers[MCP_NAME_HEADER] = encode_header_value(name)
    return body, headers


async def raw_post(
    url: str,
    body: Mapping[str, Any] | list[Any] | bytes,
    headers: Mapping[str, str] | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> httpx.Response:
    """POST a hand-made body and return the whole response (an SSE body is read to its end).

    Args:
        url: Endpoint URL.
        body: A JSON object or batch (serialized compactly), or raw bytes sent as-is.
        headers: Headers layered over `BASE_HEADERS` (accept both JSON and SSE, JSON body).
        timeout_s: Overall timeout.

    Returns:
        The response, body fully read.
    """
    content = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
    merged = {**BASE_HEADERS, **(headers or {})}
    async with httpx.AsyncClient(timeout=timeout_s) as client:
        return await client.post(url, content=content, headers=merged)


def response_messages(response: httpx.Response) -> list[Any]:
    """The JSON-RPC messages in a response, whether its body is JSON or an SSE stream.

    SSE events without data (keepalive comments, server-everything's priming event
    `id: <uuid>` + `data:` with an empty payload) are skipped.

    Returns:
        One decoded message per JSON body or per SSE event with data; `[]` for an empty body.
    """
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("text/event-stream"):
        return [response.json()] if response.content else []
    messages: list[Any] = []
    data: list[str] = []
    for line in [*response.text.splitlines(), ""]:
        if line == "":
            payload = "\n".join(data)
            data = []
            if payload.strip():
                messages.append(json.loads(payload))
        elif line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
    return messages
