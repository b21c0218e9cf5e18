"""A base for stages that gate tools: refuse calls, hide tools from ``tools/list``.

The ``allowlist``, ``policy``, ``pins`` and ``tool-scan`` stages share this machinery;
they differ only in how they decide (:meth:`ToolGate.refuse_call`, :meth:`ToolGate.hide_tool`,
or :meth:`ToolGate.filter_tools` for a gate that reads a whole list at once). A gate that only
watches a server (:meth:`ToolGate.observes_only`: ``pins`` and ``tool-scan`` in ``Observe``)
reads its lists leniently and never changes or refuses an answer.

Data flow::

    request body ─▶ tools/call a subclass refuses
                      single request → its Deny (status, JSON-RPC error, same id);
                                       the upstream never sees it
                      notification   → not forwarded, never answered (202, no body)
                      batch          → the refused elements are cut out of the batch
                                       the upstream receives; the errors of refused
                                       requests are held and merged into the response
                                       (a refused notification gets none)
                 ─▶ tools/list → read the response
    GET (a standalone stream, or a resumption with Last-Event-ID that replays stored
        events) ─▶ read the response: a replayed tools/list result is filtered too
    response body ─▶ (plugins.lib.rewrite, failing closed) JSON or SSE: every message
                       shaped like a tools/list result (``result.tools`` a list), whatever
                       its id, loses its hidden tools; held batch errors are appended
                       (JSON) or sent as extra events at the end of the stream (SSE);
                       what cannot be read with certainty is refused (502 for JSON, error
                       events in place of an SSE event), never passed on

Why any id: clients match answers loosely (the TypeScript SDK looks up
``Number(id)``, so ``"1"`` answers request ``1``), so a result is filtered by its
shape, not by whether its id is one we asked. The ids of the exchange's requests
are tracked only to answer those still unanswered when an SSE event is refused.

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
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.mcp.sse import SseTooLarge
from plugins.lib.rewrite import FailClosed, ResponseRewriter, RewriteMessage, Unreadable, dumps
from plugins.mcp_stage import derived_headers

C = TypeVar("C", bound=StageConfig)


def _key(value: Any) -> tuple[str, Any]:
    """An id compared as JSON compares it: ``1``, ``"1"`` and ``true`` are three ids."""
    return type(value).__name__, value


@dataclass
class _Exchange:
    """Per-exchange state of one gate."""

    reads: bool = False
    pending: dict[tuple[str, Any], Any] = field(default_factory=dict)
    held_errors: list[dict[str, Any]] = field(default_factory=list)
    response: ResponseRewriter = field(default_factory=ResponseRewriter)
    removed: int = 0

    def read_response(self, ctx: Context, *, stream: bool = False, strict: bool = True) -> None:
        """Read this exchange's response, failing closed (``strict``, or errors are held to add to it)."""
        self.reads = True
        if strict or self.held_errors:
            self.response.fail_closed = FailClosed(self.refusals, stream=stream)
        ctx.want_response_body()

    def refusals(self, message: str) -> list[Any]:
        """Errors for the requests still unanswered (then answered): what stands in for an unreadable answer."""
        errors = [error_object(id_, INTERNAL_ERROR, message) for id_ in self.pending.values()]
        self.pending.clear()
        return errors


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

    async def filter_tools(
        self, ctx: Context, server: MCPServer, tools: list[Any], result: Mapping[str, Any]
    ) -> list[Any]:
        """The tools of one ``tools/list`` ``result`` to keep; by default those :meth:`hide_tool` keeps.

        Entries without a string ``name`` are never kept.
        """
        kept = []
        for tool in tools:
            name = tool.get("name") if isinstance(tool, dict) else None
            if isinstance(name, str) and not await self.hide_tool(ctx, server, name, tool):
                kept.append(tool)
        return kept

    def observes_only(self, ctx: Context, server: MCPServer) -> bool:
        """True when this gate only watches ``server``'s lists: read leniently, never changed or refused."""
        return False

    def reads_streams(self, ctx: Context, server: MCPServer) -> bool:
        """True to read ``server``'s GET streams (a resumption may replay a ``tools/list`` result)."""
        return self.applies(ctx, server)

    # -- hooks ------------------------------------------------------------------------------

    def needs_response(self, ctx: Context) -> bool | None:
        if ctx.http_method == "DELETE":
            return False
        if ctx.server is not None and not self.applies(ctx, ctx.server):
            return False
        if ctx.http_method == "GET":  # a resumed stream may replay a stored tools/list result
            return ctx.server is None or self.reads_streams(ctx, ctx.server)
        hints = ctx.hints
        if hints is not None and hints.era is Era.MODERN and hints.method is not None:
            return hints.method == "tools/list"
        return None

    async def on_request_headers(self, ctx: Context) -> Verdict:
        server = ctx.server
        if ctx.http_method != "GET" or server is None or not ctx.sees_responses or not self.reads_streams(ctx, server):
            return None
        ctx.state(self._state_key).read_response(ctx, stream=True, strict=not self.observes_only(ctx, server))
        return Continue(remove_headers=("accept-encoding",))

    async def on_request_body(self, ctx: Context) -> Verdict:
        request, server = ctx.mcp, ctx.server
        if request is None or server is None or not self.applies(ctx, server):
            return None
        state = ctx.state(self._state_key)
        denied: list[tuple[int, Deny]] = []
        lists = False
        for index, message in enumerate(request.messages):
            if message.method == "tools/call" and message.tool_name is not None:
                deny = await self.refuse_call(ctx, server, message)
                if deny is not None:
                    denied.append((index, deny))
            elif message.method == "tools/list":
                lists = True
        if denied and not request.is_batch:
            deny = denied[0][1]
            ctx.log.info("%s: refused tools/call of %r on %r", self.name, request.messages[0].tool_name, server.name)
            if request.messages[0].kind == "notification":
                return _unanswered(deny)
            return deny
        if denied:
            return self._cut_batch(ctx, request, server, denied, state)
        if lists:
            self._expect(ctx, request, state, strict=not self.observes_only(ctx, server))
            return Continue(remove_headers=("accept-encoding",))
        return None

    def _expect(self, ctx: Context, forwarded: McpRequest, state: _Exchange, *, strict: bool = True) -> None:
        """Read the response to ``forwarded``, its requests' ids pending until answered."""
        state.pending = {_key(m.id): m.id for m in forwarded.messages if m.kind == "request"}
        state.read_response(ctx, strict=strict)

    def _cut_batch(
        self, ctx: Context, request: McpRequest, server: MCPServer, denied: list[tuple[int, Deny]], state: _Exchange
    ) -> Verdict:
        # JSON-RPC 2.0: a notification is never answered, not even with an error.
        errors = [
            error_object(request.messages[i].id, deny.code, deny.message, deny.data)
            for i, deny in denied
            if request.messages[i].kind == "request"
        ]
        cut = {i for i, _ in denied}
        keep = [i for i in range(len(request.messages)) if i not in cut]
        if not any(request.messages[i].kind == "request" for i in keep):
            # Nothing left that the upstream would answer: answer the batch here.
            if keep:
                ctx.log.warning("batch: every request was denied; %d notification(s) not forwarded", len(keep))
            first = denied[0][1]
            if not errors:
                return _unanswered(first)
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
        self._expect(ctx, kept, state)
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
        if server is None or not state.reads:
            return None

        async def filter_tools(message: Any) -> Any:
            return await self._filter(ctx, message, server, state)

        if state.response.fail_closed is None:
            await self._observe(ctx, chunk, filter_tools, state)
            return None
        body = await state.response.rewrite(ctx, chunk, filter_tools, reader="mcp-extproc", extra=state.held_errors)
        return body if body is None or isinstance(body, Deny) else Continue(body=body)

    async def _observe(self, ctx: Context, chunk: bytes, read: RewriteMessage, state: _Exchange) -> None:
        """Read ``chunk`` leniently for a gate that only watches: the answer passes on as it is, whatever happens."""
        try:
            outcome = await state.response.rewrite(ctx, chunk, read, reader=self.name)
        except SseTooLarge as exc:
            outcome = Deny(code=INTERNAL_ERROR, message=str(exc))
        if isinstance(outcome, Deny):
            state.reads = False
            ctx.log.warning(
                "%s: stopped reading an answer it cannot read (%s); passed on unread", self.name, outcome.message
            )
        return None

    async def _filter(self, ctx: Context, message: Any, server: MCPServer, state: _Exchange) -> Any:
        """``message`` with hidden tools removed if it is shaped like a tools/list result; itself when none were.

        Raises:
            Unreadable: a result's ``tools`` is there but not a list.
        """
        if not isinstance(message, dict):
            return message
        if "method" not in message and "id" in message:
            state.pending.pop(_key(message["id"]), None)
        result = message.get("result")
        if not isinstance(result, dict) or "tools" not in result:
            return message
        tools = result["tools"]
        if not isinstance(tools, list) and state.response.fail_closed is None:
            return message  # only watching: what cannot be read is passed on
        if not isinstance(tools, list):
            kinds: dict[type, str] = {dict: "an object", str: "a string", bool: "a boolean", type(None): "null"}
            kind = kinds.get(type(tools), "a number")
            raise Unreadable(f"a result's tools is {kind}, not a list")
        kept = await self.filter_tools(ctx, server, tools, result)
        removed = len(tools) - len(kept)
        state.removed += removed
        if not removed:
            return message
        return {**message, "result": {**result, "tools": kept}}


def _unanswered(deny: Deny) -> Deny:
    """``deny`` for what gets no answer (notifications only): 202 with no body, as an upstream accepts them."""
    return Deny(status=202, code=deny.code, message=deny.message, reason=deny.reason, body=b"")
