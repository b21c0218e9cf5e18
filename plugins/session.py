"""The ``session`` stage: legacy MCP sessions are bound to their principal and kept alive.

Legacy era only (2025-03-26 … 2025-11-25); 2026-07-28 has no sessions and no ping,
so its requests pass untouched and are never kept.

Data flow::

    initialize ──response 200 + Mcp-Session-Id──▶ bind (server, session) → principal
    request with Mcp-Session-Id (POSTs checked once the body is parsed: errors carry the id)
        unknown session or another principal ──▶ 404, JSON-RPC error; nothing forwarded
        POST  ──response 2xx──▶ keeper.keep (spec.keepalive Auto/Always; not Never)
        tools/call on the auto front door's fast route (one ext_authz Check, no
              response) ──▶ binding checked, keeper.keep from the request
        GET   ──▶ keeper.step_aside (its GET closes before the agent's reaches the
                  server); the response body is streamed through us only so that we
                  hear when the agent's stream ends (on_exchange_end) ──▶ keeper.take_over
        DELETE ──▶ keeper.stop, then unbind once the upstream agrees
        any response 404 ──▶ the upstream forgot the session: keeper.stop, unbind

Behind the ext_authz front door (no response phases) the stage does nothing: it
never sees a session being issued. The principal is ``ctx.principal.key`` (set by ``authn``), or ``anonymous`` when no
``authn`` stage runs. See :mod:`plugins.lib.keeper` for the keeper itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import httpx
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field

from extproc.api import Context, Deny, FailureMode, Stage, StageConfig, StateKey, Verdict
from extproc.config.models import Keepalive
from extproc.config.resources import MCPServer
from extproc.mcp.headers import MCP_PROTOCOL_VERSION, MCP_SESSION_ID
from extproc.mcp.jsonrpc import Era
from extproc.mcp.spec import INVALID_REQUEST
from plugins.credentials import UPSTREAM_CREDENTIAL
from plugins.lib.keeper import Clock, KeeperMetrics, KeeperSettings, SessionKeeper

ANONYMOUS = "anonymous"


class SessionConfig(StageConfig):
    """Configuration of the ``session`` stage.

    Attributes:
        idle_timeout_s: stop keeping a session the agent has not used for this long.
        max_sessions: bound on remembered session bindings (least recently used go first).
        backoff_initial_s / backoff_max_s: the keeper's reconnect delays (jittered).
    """

    idle_timeout_s: float = Field(default=3600.0, gt=0, alias="idleTimeoutSeconds")
    max_sessions: int = Field(default=100_000, gt=0, alias="maxSessions")
    backoff_initial_s: float = Field(default=0.2, gt=0, alias="backoffInitialSeconds")
    backoff_max_s: float = Field(default=30.0, gt=0, alias="backoffMaxSeconds")


@dataclass
class _Exchange:
    session_id: str | None = None
    agent_stream: bool = False
    handed_back: bool = False


_STATE = StateKey("session", _Exchange)


def _caller(ctx: Context) -> str:
    return ctx.principal.key if ctx.principal is not None else ANONYMOUS


def _legacy(ctx: Context) -> bool:
    if ctx.hints is not None and ctx.hints.era is Era.MODERN:
        return False
    return not (ctx.mcp is not None and ctx.mcp.era is Era.MODERN)


class SessionStage(Stage[SessionConfig]):
    """Bind legacy sessions to principals; keep heartbeating upstream sessions alive."""

    name: ClassVar[str] = "session"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)
    # A tools/call's response is not needed: on the auto front door's fast route the
    # binding is checked and the keeper (re)started from the request (see _admit); a
    # session the upstream lost shows as a 404 on the keeper's own GET.
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, config: SessionConfig, failure_mode: FailureMode = FailureMode.CLOSED, *, clock: Clock | None = None
    ) -> None:
        """``clock`` is the keeper's time (the real clock unless a test passes a fake)."""
        super().__init__(config, failure_mode)
        self.settings = config
        self.owners: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.refused: Counter | None = None
        self._client = httpx.AsyncClient(
            # Reads never time out: the GET stream may be quiet for a long time.
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
        )
        # Ping answers: short POSTs on a few reused connections, never queued behind streams.
        self._answers = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            follow_redirects=False,
        )
        self.keeper = SessionKeeper(
            KeeperSettings(
                idle_timeout_s=config.idle_timeout_s,
                backoff_initial_s=config.backoff_initial_s,
                backoff_max_s=config.backoff_max_s,
            ),
            KeeperMetrics(None),
            self._client,
            self._answers,
            clock,
        )
        self._sweeper: asyncio.Task[None] | None = None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self.keeper.metrics = KeeperMetrics(registry)
        self.refused = Counter(
            "mcp_extproc_session_refused",
            "Requests refused for naming a session of another principal, or one this gateway never saw.",
            ["server", "reason"],
            registry=registry,
        )

    async def startup(self) -> None:
        self._sweeper = asyncio.create_task(self.keeper.sweep(), name="keeper-sweep")

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await self.keeper.close()
        await self._client.aclose()
        await self._answers.aclose()

    def needs_response(self, ctx: Context) -> bool | None:
        if not _legacy(ctx):
            return False
        return not (ctx.http_method == "GET" and MCP_SESSION_ID not in ctx.request_headers)

    def _refuse(self, server: str, reason: str, message: str) -> Deny:
        if self.refused is not None:
            self.refused.labels(server, reason).inc()
        return Deny(status=404, code=INVALID_REQUEST, message=message, reason=reason)

    async def on_request_headers(self, ctx: Context) -> Verdict:
        if ctx.request_has_body:
            return None  # decided on the body, so that a refusal carries the JSON-RPC id
        return await self._admit(ctx)

    async def on_request_body(self, ctx: Context) -> Verdict:
        return await self._admit(ctx)

    async def _admit(self, ctx: Context) -> Verdict:
        if not ctx.sees_responses and not ctx.fast_call:
            # ext_authz front door: we never see the initialize response that issues the
            # session id, so sessions can be neither bound nor kept (README: front doors).
            # The auto door's fast tools/call route is different: its sessions were opened
            # through ext_proc, in this process.
            return None
        server = ctx.server
        session_id = ctx.request_headers.get(MCP_SESSION_ID)
        if server is None or not session_id or not _legacy(ctx):
            return None
        key = (server.name, session_id)
        owner = self.owners.get(key)
        if owner is None:
            return self._refuse(
                server.name,
                "unknown_session",
                f"session not found: MCP server {server.name!r} has no session with this Mcp-Session-Id "
                "opened through this gateway; send initialize to start one",
            )
        if owner != _caller(ctx):
            ctx.log.warning("refused a request for a session of %r opened by another principal", server.name)
            return self._refuse(
                server.name,
                "session_principal_mismatch",
                f"session not found: this Mcp-Session-Id of MCP server {server.name!r} belongs to another caller",
            )
        self.owners.move_to_end(key)
        state = ctx.state(_STATE)
        state.session_id = session_id
        keeper = self.keeper
        if ctx.http_method == "GET":
            if keeper.get(server.name, session_id) is None and self._keeps(server.name, server.spec.keepalive):
                # The agent opens its stream before we kept the session: keep it now, so
                # that the stream is taken over when the agent's ends.
                self._keep(ctx, server, session_id)
            if keeper.get(server.name, session_id) is not None:
                state.agent_stream = True
                await keeper.step_aside(server.name, session_id)
                # Keep the ext_proc stream open for the life of the agent's GET, so that
                # on_exchange_end tells us when it ends.
                ctx.want_response_body()
        elif ctx.http_method == "DELETE":
            await keeper.stop(server.name, session_id, "delete")
        else:
            keeper.touch(server.name, session_id, ctx.request_headers.get(MCP_PROTOCOL_VERSION))
            if (
                ctx.fast_call
                and keeper.get(server.name, session_id) is None
                and self._keeps(server.name, server.spec.keepalive)
            ):
                # No response phase will show us this call's 2xx: keep the session now
                # (after an idle expiry, say); a session the upstream forgot answers the
                # keeper's GET with 404, and the keeper stops.
                self._keep(ctx, server, session_id)
        return None

    async def on_response_headers(self, ctx: Context) -> Verdict:
        server = ctx.server
        if server is None or not _legacy(ctx):
            return None
        status = ctx.response_status or 0
        state = ctx.state(_STATE)
        keeper = self.keeper
        if state.session_id is None:
            issued = ctx.response_headers.get(MCP_SESSION_ID)
            is_initialize = ctx.mcp is not None and any(m.method == "initialize" for m in ctx.mcp.messages)
            if issued and is_initialize and 200 <= status < 300:
                self._bind((server.name, issued), _caller(ctx))
            return None
        session_id = state.session_id
        if status == 404:
            self.owners.pop((server.name, session_id), None)
            await keeper.stop(server.name, session_id, "lost")
            return None
        if ctx.http_method == "DELETE":
            if 200 <= status < 300:
                self.owners.pop((server.name, session_id), None)
            return None
        if state.agent_stream:
            if status != 200:  # the agent's stream did not open: hand the stream back now
                state.handed_back = True
                keeper.take_over(server.name, session_id)
            return None
        if 200 <= status < 300 and self._keeps(server.name, server.spec.keepalive):
            self._keep(ctx, server, session_id)
        return None

    def _keep(self, ctx: Context, server: MCPServer, session_id: str) -> None:
        self.keeper.keep(
            server.name,
            server.spec.url,
            session_id,
            ctx.request_headers.get(MCP_PROTOCOL_VERSION),
            ctx.state(UPSTREAM_CREDENTIAL).provider,
        )

    def _keeps(self, server: str, keepalive: Keepalive) -> bool:
        if keepalive is Keepalive.NEVER:
            return False
        keeper = self.keeper
        # Auto stops trying a server once it said it has no GET stream (405); Always keeps trying.
        return not (keepalive is Keepalive.AUTO and server in keeper.no_get_servers)

    async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict:
        return None  # read only to keep the agent's GET exchange open (see on_request_headers)

    async def on_exchange_end(self, ctx: Context) -> None:
        state = ctx.state(_STATE)
        if state.agent_stream and not state.handed_back and state.session_id and ctx.server is not None:
            state.handed_back = True
            self.keeper.take_over(ctx.server.name, state.session_id)

    def _bind(self, key: tuple[str, str], caller: str) -> None:
        self.owners[key] = caller
        self.owners.move_to_end(key)
        while len(self.owners) > self.settings.max_sessions:
            self.owners.popitem(last=False)
