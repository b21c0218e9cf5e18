"""A base for stages that gate tools: refuse calls, hide tools from ``tools/list``.

The ``allowlist`` and ``policy`` stages share this machinery; they differ only
in how they decide (:meth:`ToolGate.refuse_call`, :meth:`ToolGate.hide_tool`).

Data flow::

    request body ─▶ tools/call a subclass refuses
                      single request → its Deny (status, JSON-RPC error, same id);
                                       the upstream never sees it
                      batch          → the refused elements are cut out of the batch
                                       the upstream receives; their errors are held
                                       and merged into the response
                 ─▶ tools/list → remember its id, ask for the response body
    response body ─▶ (plugins.lib.rewrite) JSON or SSE: drop hidden tools from the
                       tools/list result; held batch errors are appended (JSON) or
                       sent as extra events at the end of the stream (SSE)

Upstream compression would hide the body from us, so requests whose response
we read go out without ``accept-encoding``; a compressed answer anyway is
refused (fail closed) rather than passed through unfiltered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from extproc.api import Context, Continue, Deny, FailureMode, Stage, StageConfig, StateKey, Verdict
from extproc.config.resources import MCPServer
from extproc.mcp.headers import X_MCP_METHOD, X_MCP_TOOL
from extproc.mcp.jsonrpc import Era, McpRequest, Message, error_object
from plugins.lib.rewrite import ResponseRewriter, dumps
from plugins.mcp_stage import derived_headers

C = TypeVar("C", bound=StageConfig)


@dataclass
class _Exchange:
    """Per-exchange state of one gate."""

    list_ids: set[Any] = field(default_factory=set)
    held_errors: list[dict[str, Any]] = field(default_factory=list)
    response: ResponseRewriter = field(default_factory=ResponseRewriter)
    removed: int = 0


class ToolGate(Stage[C]):
    """Refuse ``tools/call`` and filter ``tools/list``; subclasses say what to refuse."""

    requires: ClassVar[tuple[str, ...]] = ("mcp",)
    # Responses are read for tools/list filtering and a batch's held errors, bodies
    # rewritten only to cut a batch: never for a single tools/call (a refused call is
    # answered before the upstream sees it).
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: C, failure_mode: FailureMode = FailureMode.CLOSED) -> None:
        super().__init__(config, failure_mode)
        self._state_key = StateKey(f"toolgate:{self.name}", _Exchange)

    # -- what subclasses decide -------------------------------------------------------------

    def applies(self, ctx: Context, server: MCPServer) -> bool:
        """False when this gate has nothing to say about ``server`` (skips all work)."""
        return True

    async def refuse_call(self, ctx: Context, server: MCPServer, message: Message) -> Deny | None:
        """The denial of one ``tools/call``, or ``None`` to let it through."""
        raise NotImplementedError

    async def hide_tool(self, ctx: Context, server: MCPServer, name: str, tool: Mapping[str, Any]) -> bool:
        """True to remove the tool ``name`` (described by ``tool``) from a ``tools/list`` result."""
        raise NotImplementedError

    # -- hooks ------------------------------------------------------------------------------

    def needs_response(self, ctx: Context) -> bool | None:
        if ctx.http_method in ("GET", "DELETE"):
            return False  # GET streams and DELETE never carry a tools/list result
        if ctx.server is not None and not self.applies(ctx, ctx.server):
            return False
        hints = ctx.hints
        if hints is not None and hints.era is Era.MODERN and hints.method is not None:
            return hints.method == "tools/list"
        return None

    async def on_request_body(self, ctx: Context) -> Verdict:
        request, server = ctx.mcp, ctx.server
        if request is None or server is None or not self.applies(ctx, server):
            return None
        state = ctx.state(self._state_key)
        denied: list[tuple[int, Deny]] = []
        for index, message in enumerate(request.messages):
            if message.method == "tools/call" and message.tool_name is not None:
                deny = await self.refuse_call(ctx, server, message)
                if deny is not None:
                    denied.append((index, deny))
            elif message.method == "tools/list" and message.id is not None:
                state.list_ids.add(message.id)
        if denied and not request.is_batch:
            deny = denied[0][1]
            ctx.log.info("%s: refused tools/call of %r on %r", self.name, request.messages[0].tool_name, server.name)
            return deny
        if denied:
            return self._cut_batch(ctx, request, server, denied, state)
        if state.list_ids:
            ctx.want_response_body()
            return Continue(remove_headers=("accept-encoding",))
        return None

    def _cut_batch(
        self, ctx: Context, request: McpRequest, server: MCPServer, denied: list[tuple[int, Deny]], state: _Exchange
    ) -> Verdict:
        errors = [error_object(request.messages[i].id, deny.code, deny.message, deny.data) for i, deny in denied]
        cut = {i for i, _ in denied}
        keep = [i for i in range(len(request.messages)) if i not in cut]
        if not any(request.messages[i].kind == "request" for i in keep):
            # Nothing left that the upstream would answer: answer the batch here.
            if keep:
                ctx.log.warning("batch: every request was denied; %d notification(s) not forwarded", len(keep))
            first = denied[0][1]
            return Deny(
                status=200,
                code=first.code,
                message="every call in the batch was denied",
                reason=first.reason,
                body=dumps(errors),
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
        state = ctx.state(self._state_key)
        if server is None or not (state.list_ids or state.held_errors):
            return None

        async def filter_tools(message: Any) -> Any:
            return await self._maybe_filter(ctx, message, server, state)

        body = await state.response.rewrite(
            ctx, chunk, filter_tools if state.list_ids else None, reader="mcp-extproc", extra=state.held_errors
        )
        return body if body is None or isinstance(body, Deny) else Continue(body=body)

    async def _maybe_filter(self, ctx: Context, message: Any, server: MCPServer, state: _Exchange) -> Any:
        """A tools/list response with hidden tools removed; ``message`` itself when none were."""
        if not (isinstance(message, dict) and message.get("id") in state.list_ids and "result" in message):
            return message
        result = message["result"]
        if not isinstance(result, dict) or not isinstance(tools := result.get("tools"), list):
            return message
        kept = []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if isinstance(name, str) and not await self.hide_tool(ctx, server, name, tool):
                kept.append(tool)
        removed = len(tools) - len(kept)
        state.removed += removed
        if not removed:
            return message
        return {**message, "result": {**result, "tools": kept}}
