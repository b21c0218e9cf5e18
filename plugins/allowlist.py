"""The ``allowlist`` stage: enforce ``MCPServer.spec.allowedTools`` / ``deniedTools``.

A tool is callable when it matches a glob of ``allowedTools`` (empty: none;
``["*"]``: all) and no glob of ``deniedTools``.

Data flow::

    request body ─▶ tools/call of a tool that is not callable
                      single request → Deny (HTTP 200, JSON-RPC error, same id);
                                       the upstream never sees it
                      batch          → the denied elements are cut out of the batch
                                       the upstream receives; their errors are held
                                       and merged into the response
                 ─▶ tools/list → remember its id, ask for the response body
    response body ─▶ JSON (buffered): drop tools that are not callable from the
                       tools/list result; append held batch errors
                 ─▶ SSE (streamed, chunk by chunk): decode complete events, rewrite
                       the tools/list result event, pass every other byte through
                       untouched, hold back only an incomplete trailing event;
                       held batch errors are sent as extra events at the end

Upstream compression would hide the body from us, so requests whose response
we read go out without ``accept-encoding``; a compressed answer anyway is
refused (fail closed) rather than passed through unfiltered.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, ClassVar

from mcp_types.jsonrpc import INTERNAL_ERROR

from extproc.api import POLICY_DENIED, Context, Continue, Deny, Stage, StateKey, Verdict
from extproc.mcp.headers import X_MCP_METHOD, X_MCP_TOOL
from extproc.mcp.jsonrpc import Era, McpRequest, error_object
from extproc.mcp.sse import SseDecoder, SseEvent, encode_event
from extproc.resources import MCPServer
from plugins.mcp_stage import derived_headers


def tool_allowed(server: MCPServer, tool: str) -> bool:
    """True when ``tool`` matches ``allowedTools`` and no glob of ``deniedTools``."""
    spec = server.spec
    if not any(fnmatchcase(tool, glob) for glob in spec.allowed_tools):
        return False
    return not any(fnmatchcase(tool, glob) for glob in spec.denied_tools)


@dataclass
class _Exchange:
    """Per-exchange state of this stage."""

    list_ids: set[Any] = field(default_factory=set)
    held_errors: list[dict[str, Any]] = field(default_factory=list)
    decoder: SseDecoder | None = None
    removed: int = 0


_STATE = StateKey("allowlist", _Exchange)


def _deny_message(server: MCPServer, tool: str) -> str:
    return f"tool {tool!r} is not allowed on MCP server {server.name!r}"


def _filter_result(message: Any, server: MCPServer) -> tuple[Any, int]:
    """A tools/list response with uncallable tools removed, and how many were removed."""
    if not isinstance(message, dict):
        return message, 0
    result = message.get("result")
    if not isinstance(result, dict) or not isinstance(tools := result.get("tools"), list):
        return message, 0
    kept = [
        t for t in tools if isinstance(t, dict) and isinstance(t.get("name"), str) and tool_allowed(server, t["name"])
    ]
    if len(kept) == len(tools):
        return message, 0
    return {**message, "result": {**result, "tools": kept}}, len(tools) - len(kept)


class AllowlistStage(Stage):
    """Refuse calls to tools outside the server's allow-list; hide them from tools/list."""

    name: ClassVar[str] = "allowlist"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)

    def needs_response(self, ctx: Context) -> bool | None:
        if ctx.http_method in ("GET", "DELETE"):
            return False  # GET streams and DELETE never carry a tools/list result
        hints = ctx.hints
        if hints is not None and hints.era is Era.MODERN and hints.method is not None:
            return hints.method == "tools/list"
        return None

    async def on_request_body(self, ctx: Context) -> Verdict:
        request, server = ctx.mcp, ctx.server
        if request is None or server is None:
            return None
        state = ctx.state(_STATE)
        denied: list[int] = []
        for index, message in enumerate(request.messages):
            if message.method == "tools/call" and message.tool_name is not None:
                if not tool_allowed(server, message.tool_name):
                    denied.append(index)
            elif message.method == "tools/list" and message.id is not None:
                state.list_ids.add(message.id)
        if denied and not request.is_batch:
            tool = request.messages[0].tool_name or ""
            ctx.log.info("denied tools/call of %r on %r", tool, server.name)
            return Deny(status=200, code=POLICY_DENIED, message=_deny_message(server, tool), reason="tool_not_allowed")
        if denied:
            return self._cut_batch(ctx, request, server, denied, state)
        if state.list_ids:
            ctx.want_response_body()
            return Continue(remove_headers=("accept-encoding",))
        return None

    def _cut_batch(
        self, ctx: Context, request: McpRequest, server: MCPServer, denied: list[int], state: _Exchange
    ) -> Verdict:
        errors = [
            error_object(
                request.messages[i].id,
                POLICY_DENIED,
                _deny_message(server, request.messages[i].tool_name or ""),
            )
            for i in denied
        ]
        keep = [i for i in range(len(request.messages)) if i not in denied]
        answers_expected = any(request.messages[i].kind == "request" for i in keep)
        if not answers_expected:
            # Nothing left that the upstream would answer: answer the batch here.
            dropped = len(keep)
            if dropped:
                ctx.log.warning("batch: every request was denied; %d notification(s) not forwarded", dropped)
            return Deny(
                status=200,
                code=POLICY_DENIED,
                message="every call in the batch was denied",
                reason="tool_not_allowed",
                body=json.dumps(errors, separators=(",", ":")).encode(),
            )
        kept = request.keep(keep)
        ctx.mcp = kept
        state.held_errors.extend(errors)
        ctx.want_response_body()
        # The upstream's x-mcp-* headers describe what it receives, not what was cut.
        headers, metadata = derived_headers(kept, server.name)
        stale = tuple(h for h in (X_MCP_METHOD, X_MCP_TOOL) if h not in headers)
        return Continue(
            body=kept.encode(),
            set_headers=headers,
            metadata=metadata,
            remove_headers=("accept-encoding", *stale),
        )

    async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict:
        server = ctx.server
        state = ctx.state(_STATE)
        if server is None or not (state.list_ids or state.held_errors):
            return None
        encoding = ctx.response_headers.get("content-encoding", "identity").lower()
        if encoding not in ("", "identity"):
            return Deny(
                status=502,
                code=INTERNAL_ERROR,
                message=f"the upstream answered with content-encoding {encoding!r}; mcp-extproc cannot filter it",
                reason="compressed_response",
            )
        if ctx.response_is_sse:
            return self._sse_chunk(ctx, chunk, server, state)
        return self._json_body(chunk, server, state)

    def _json_body(self, body: bytes, server: MCPServer, state: _Exchange) -> Verdict:
        try:
            decoded = json.loads(body)
        except ValueError:
            return None  # not JSON (an upstream error page): nothing of ours to filter
        changed = False
        if isinstance(decoded, list):
            out: Any = []
            for item in decoded:
                new, removed = self._maybe_filter(item, server, state)
                changed |= removed > 0
                out.append(new)
            if state.held_errors:
                out.extend(state.held_errors)
                changed = True
        else:
            out, removed = self._maybe_filter(decoded, server, state)
            changed = removed > 0
            if state.held_errors:
                out = [out, *state.held_errors]
                changed = True
        if not changed:
            return None
        return Continue(body=json.dumps(out, separators=(",", ":")).encode())

    def _maybe_filter(self, message: Any, server: MCPServer, state: _Exchange) -> tuple[Any, int]:
        if isinstance(message, dict) and message.get("id") in state.list_ids and "result" in message:
            new, removed = _filter_result(message, server)
            state.removed += removed
            return new, removed
        return message, 0

    def _sse_chunk(self, ctx: Context, chunk: bytes, server: MCPServer, state: _Exchange) -> Verdict:
        if state.decoder is None:
            state.decoder = SseDecoder()
        out = bytearray()
        for event in state.decoder.feed(chunk):
            out += self._sse_event(event, server, state)
        if ctx.end_of_stream:
            out += state.decoder.flush()
            for error in state.held_errors:
                out += encode_event(json.dumps(error, separators=(",", ":")), event="message")
            state.held_errors.clear()
        if bytes(out) == chunk:
            return None
        return Continue(body=bytes(out))

    def _sse_event(self, event: SseEvent, server: MCPServer, state: _Exchange) -> bytes:
        if not event.data or not state.list_ids:
            return event.raw
        try:
            message = json.loads(event.data)
        except ValueError:
            return event.raw
        new, removed = self._maybe_filter(message, server, state)
        if not removed:
            return event.raw
        return encode_event(json.dumps(new, separators=(",", ":")), event=event.event, id=event.id)
