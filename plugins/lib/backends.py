"""Exchanges the ``virtual`` stage sends a virtual server's backends itself, through the later stages.

A virtual server answers ``initialize`` and the lists itself, from what its backends
answer. Each of those backend requests is an exchange of its own, judged by the same
stages as on the backend's own route (allow-list, policy, pins, credentials), so a
merged list hides exactly what those stages would refuse to call (list = call) and
the backend gets its own credential, never the agent's::

    message ──▶ sub-Context(server=backend, virtual, principal of the agent's exchange)
            ──▶ downstream REQUEST_BODY  (Deny: returned as is)
            ──▶ POST backend url: the MCP headers and what the stages set, nothing else
                of the agent's (connect/read timeout, answer size bounded)
            ──▶ downstream RESPONSE_HEADERS, then RESPONSE_BODY (the whole answer, one chunk)
            ──▶ Reply(status, headers, body after the stages, the backend's raw answer)

:func:`answer_of` finds the JSON-RPC answer to our request in a reply (JSON or SSE).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any, Final

import httpx

from extproc.api import Context, Continue, Downstream, FrontDoor, Phase, Stop
from extproc.config.resources import MCPServer
from extproc.mcp.headers import MCP_METHOD, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, Era, header_hints
from extproc.mcp.jsonrpc import McpRequest, parse_request
from extproc.mcp.spec import MODERN_PROTOCOL_VERSIONS
from extproc.mcp.sse import SseDecoder
from plugins.credentials import UPSTREAM_CREDENTIAL

MAX_ANSWER_BYTES: Final = 8 * 1024 * 1024
"""The largest answer read from a backend (a list of many tools fits easily)."""

_ids = itertools.count(1)


class BackendFailed(Exception):
    """A backend could not be reached or did not answer usefully; the message says how.

    Attributes:
        status: the HTTP status the backend refused with (0: it did not answer).
        error: the JSON-RPC error object it answered with, if it did.
    """

    def __init__(self, message: str, status: int = 0, error: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.error = error if isinstance(error, dict) else None


@dataclass(frozen=True, slots=True)
class Reply:
    """A backend's answer, after the stages read it.

    Attributes:
        status: the HTTP status.
        headers: the response headers (lower-case names, first values).
        body: the body the stages passed on (filtered lists).
        raw: the body as the backend sent it (the names a backend really has).
        credential: how the credentials stage gets this backend's credential (for the keeper).
    """

    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes
    credential: Any = None


def next_id() -> str:
    """A JSON-RPC id for a request the gateway sends on its own."""
    return f"mcp-extproc-{next(_ids)}"


class Backends:
    """Sends backend exchanges through the stages after the ``virtual`` stage."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.downstream: Downstream | None = None

    async def send(
        self,
        parent: Context,
        server: MCPServer,
        message: dict[str, Any],
        *,
        protocol_version: str,
        session_id: str | None = None,
    ) -> Reply | Stop:
        """Send ``message`` to ``server`` on behalf of ``parent``'s caller.

        Returns a stage's refusal as is.

        Raises:
            BackendFailed: the server is unreachable, too slow, or its answer too big.
        """
        prepared = await self._prepare(parent, server, message, protocol_version, session_id)
        if not isinstance(prepared, tuple):
            return prepared
        ctx, sent, body = prepared
        try:
            status, answer_headers, raw = await self._post(server.spec.url, sent, body)
        except httpx.HTTPError as exc:
            raise BackendFailed(f"MCP server {server.name!r} could not be reached: {type(exc).__name__}") from None
        ctx.response_status, ctx.response_headers = status, answer_headers
        ctx.end_of_stream = not raw
        outcome = await self.downstream_run(Phase.RESPONSE_HEADERS, ctx)
        if not isinstance(outcome, Continue):
            return outcome
        final = raw
        if ctx.book.wants_response_body and raw:
            ctx.end_of_stream = True
            outcome = await self.downstream_run(Phase.RESPONSE_BODY, ctx, raw)
            if not isinstance(outcome, Continue):
                return outcome
            final = outcome.body if outcome.body is not None else raw
        return Reply(status, answer_headers, final, raw, ctx.state(UPSTREAM_CREDENTIAL).provider)

    async def open_stream(
        self, parent: Context, server: MCPServer, message: dict[str, Any], *, protocol_version: str
    ) -> httpx.Response | Stop:
        """Send ``message`` (a request answered by a long-lived stream: ``subscriptions/listen``)
        through the request stages and return the open response: the caller reads and closes it.
        The response stages do not see it (it carries notifications, no list).

        Raises:
            BackendFailed: the server is unreachable.
        """
        prepared = await self._prepare(parent, server, message, protocol_version, None)
        if not isinstance(prepared, tuple):
            return prepared
        _, sent, body = prepared
        request = self.client.build_request("POST", server.spec.url, headers=sent, content=body)
        try:
            return await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise BackendFailed(f"MCP server {server.name!r} could not be reached: {type(exc).__name__}") from None

    async def downstream_run(self, phase: Phase, ctx: Context, chunk: bytes = b"") -> Continue | Stop:
        """``phase`` of a backend exchange over the stages after ``virtual``."""
        assert self.downstream is not None, "bind_downstream was not called"
        return await self.downstream.run(phase, ctx, chunk)

    async def _prepare(
        self,
        parent: Context,
        server: MCPServer,
        message: dict[str, Any],
        protocol_version: str,
        session_id: str | None,
    ) -> tuple[Context, dict[str, str], bytes] | Stop:
        """The backend exchange's context, after the request stages: (ctx, headers to send, body)."""
        body = json.dumps(message, separators=(",", ":")).encode()
        headers = {
            "content-type": "application/json",
            "accept": "application/json, text/event-stream",
            MCP_PROTOCOL_VERSION: protocol_version,
        }
        if session_id:
            headers[MCP_SESSION_ID] = session_id
        if "origin" in parent.request_headers:
            # The backend judges the agent's Origin (DNS rebinding protection) as on its own route.
            headers["origin"] = parent.request_headers["origin"]
        for name in server.spec.forward_headers:  # what the backend gets from the agent on its own route
            if name.lower() in parent.request_headers and name.lower() not in headers:
                headers[name.lower()] = parent.request_headers[name.lower()]
        method = message.get("method")
        modern = parent.mcp is not None and parent.mcp.era is Era.MODERN
        if (modern or protocol_version in MODERN_PROTOCOL_VERSIONS) and isinstance(method, str):
            headers[MCP_METHOD] = method
        ctx = Context(
            request_id=parent.request_id,
            http_method="POST",
            path=f"/{server.name}/mcp",
            request_headers=headers,
            server=server,
            virtual=parent.virtual,
            catalog=parent.catalog,
            front_door=FrontDoor.EXT_PROC,
            log=parent.log,
        )
        ctx.principal, ctx.peer = parent.principal, parent.peer
        ctx.hints = header_hints(headers)
        ctx.body, ctx.request_has_body = body, True
        parsed = parse_request(body, headers)
        if not isinstance(parsed, McpRequest):
            raise BackendFailed(f"the gateway built a request it cannot parse: {parsed.message}")
        ctx.mcp = parsed
        outcome = await self.downstream_run(Phase.REQUEST_BODY, ctx)
        if not isinstance(outcome, Continue):
            return outcome
        sent = dict(headers)
        for name in outcome.remove_headers:
            sent.pop(name, None)
        sent.update(outcome.set_headers)
        sent = {k: v for k, v in sent.items() if not k.startswith(("x-mcp-", ":"))}
        return ctx, sent, outcome.body or ctx.body

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        async with self.client.stream("POST", url, headers=headers, content=body) as response:
            chunks = bytearray()
            async for chunk in response.aiter_raw():
                chunks += chunk
                if len(chunks) > MAX_ANSWER_BYTES:
                    raise BackendFailed(f"the answer is larger than {MAX_ANSWER_BYTES} bytes")
            found = {k.lower(): v for k, v in reversed(response.headers.multi_items())}
            return response.status_code, found, bytes(chunks)


def answer_of(reply: Reply, request_id: str, *, raw: bool = False) -> dict[str, Any] | None:
    """The JSON-RPC answer to ``request_id`` in ``reply`` (JSON or SSE), if there is one."""
    body = reply.raw if raw else reply.body
    if reply.headers.get("content-type", "").startswith("text/event-stream"):
        decoder = SseDecoder(max_event_bytes=MAX_ANSWER_BYTES)
        events = [*decoder.feed(body), *decoder.finish()]
        candidates: list[Any] = []
        for event in events:
            try:
                candidates.append(json.loads(event.data))
            except ValueError:
                continue
    else:
        try:
            decoded = json.loads(body)
        except ValueError:
            return None
        candidates = decoded if isinstance(decoded, list) else [decoded]
    for message in candidates:
        if isinstance(message, dict) and message.get("id") == request_id and "method" not in message:
            return message
    for message in candidates:  # an error the server could not tie to a request (id null)
        if isinstance(message, dict) and message.get("id") is None and isinstance(message.get("error"), dict):
            return message
    return None


__all__ = ["MAX_ANSWER_BYTES", "BackendFailed", "Backends", "Reply", "answer_of", "next_id"]
