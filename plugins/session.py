"""The ``session`` stage: gateway-signed session ids, and legacy sessions kept alive.

The agent never sees the upstream's ``Mcp-Session-Id``: on ``initialize`` the gateway
hands out its own, a JWS naming the upstream id, the server and the principal
(:mod:`plugins.lib.session_ids`), and swaps it back on every request. Any process
holding the key set (``--session-key-file``) can serve any session: ``up`` after a
restart, every replica of ``serve``.

Data flow::

    initialize ──response 2xx + Mcp-Session-Id: U──▶ agent gets S = sign(U, server, principal)
    any other response carrying Mcp-Session-Id ──▶ the agent's S, or removed (never U)
    request with Mcp-Session-Id S, whatever protocol version it declares (POSTs checked
    once the body is parsed, so errors carry the id; a second copy of the header: 400,
    from the ``mcp`` stage)
        not ours, tampered, expired, another server or another principal
            ──▶ 404, JSON-RPC error; nothing forwarded
        valid ──▶ forwarded with Mcp-Session-Id: U, and (legacy only):
        POST  ──response 2xx──▶ keeper.keep (spec.keepalive Auto/Always; not Never)
        tools/call on the auto front door's fast route (one ext_authz Check, no
              response) ──▶ keeper.keep from the request
        GET   ──▶ keeper.step_aside (its GET closes before the agent's reaches the
                  server); the agent's stream is read through us: pings on it are
                  answered by the keeper and replaced by an SSE comment, the messages
                  kept while the keeper held the stream go out first; when the stream
                  ends (on_exchange_end) ──▶ keeper.take_over
        DELETE ──▶ keeper.stop
        response 404 (or a 400 whose error names the session) ──▶ the upstream lost the
              session: keeper.stop, and the agent gets 404 with its JSON-RPC id

On a virtual server's route (``ctx.virtual``) the stage does nothing: the ``virtual`` stage
issues and swaps those ids (:mod:`plugins.virtual`).

Behind the ext_authz front door (no response phases) the stage cannot see a session
being issued: upstream ids pass as they are and nothing is kept. The principal is
``ctx.principal.key`` (set by ``authn``), or ``anonymous`` when no ``authn`` stage
runs. See :mod:`plugins.lib.keeper` for the keeper itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import httpx
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field

from extproc.api import Context, Continue, Deny, FailureMode, Stage, StageConfig, StateKey, Verdict
from extproc.config.models import Keepalive
from extproc.config.resources import MCPServer
from extproc.config.session_keys import SessionKeys, load_key_set
from extproc.mcp.headers import MCP_PROTOCOL_VERSION, MCP_SESSION_ID
from extproc.mcp.jsonrpc import Era
from extproc.mcp.spec import INVALID_REQUEST
from extproc.mcp.sse import SseDecoder, SseTooLarge
from plugins.credentials import UPSTREAM_CREDENTIAL
from plugins.lib.keeper import Clock, KeeperMetrics, KeeperSettings, SessionKeeper, event_message, server_request
from plugins.lib.session_ids import DEFAULT_MAX_AGE_S, BadSessionId, SessionIds
from plugins.lib.tls import client_context

ANONYMOUS = "anonymous"
PING_REMOVED = b": mcp-extproc answered a ping of the server\n\n"
"""What replaces a ping on the agent's stream (a comment: every client skips it)."""

log = logging.getLogger("mcp_extproc.session")

_WHY: dict[str, str] = {
    "malformed": "it is not a session id this gateway issued",
    "unknown_key": "it was signed with a key this gateway no longer has",
    "bad_signature": "its signature does not verify",
    "expired": "it has expired",
    "other_server": "it belongs to another MCP server",
    "session_principal_mismatch": "it belongs to another caller",
}


class SessionConfig(StageConfig):
    """Configuration of the ``session`` stage.

    Attributes:
        idle_timeout_s: stop keeping a session the agent has not used for this long
            (an MCPServer's ``keepaliveIdleSeconds`` overrides it).
        max_sessions: bound on kept sessions (the least recently used go first).
        backoff_initial_s / backoff_max_s: the keeper's reconnect delays (jittered).
        key_file: the session key set (a JWKS file, created when missing); ``up`` and
            ``serve`` fill it from ``--session-key-file``. ``None``: a key in memory.
        max_age_s: how long a session id stays valid after ``initialize``.
    """

    idle_timeout_s: float = Field(default=1800.0, gt=0, alias="idleTimeoutSeconds")
    max_sessions: int = Field(default=100_000, gt=0, alias="maxSessions")
    backoff_initial_s: float = Field(default=0.2, gt=0, alias="backoffInitialSeconds")
    backoff_max_s: float = Field(default=30.0, gt=0, alias="backoffMaxSeconds")
    key_file: str | None = Field(default=None, alias="keyFile")
    max_age_s: float = Field(default=DEFAULT_MAX_AGE_S, gt=0, alias="maxSessionAgeSeconds")


@dataclass
class _Exchange:
    token: str | None = None
    session_id: str | None = None
    agent_stream: bool = False
    handed_back: bool = False
    check_lost: bool = False
    unread: bool = False
    decoder: SseDecoder | None = None
    kept_events: list[bytes] = field(default_factory=list)


_STATE = StateKey("session", _Exchange)


def _caller(ctx: Context) -> str:
    return ctx.principal.key if ctx.principal is not None else ANONYMOUS


def _agent(ctx: Context) -> str | None:
    return ctx.principal.agent if ctx.principal is not None else None


def _legacy(ctx: Context) -> bool:
    if ctx.hints is not None and ctx.hints.era is Era.MODERN:
        return False
    return not (ctx.mcp is not None and ctx.mcp.era is Era.MODERN)


def _names_the_session(body: bytes) -> bool:
    """True for a JSON-RPC error body that says the session is unknown (some servers send 400)."""
    try:
        message = json.loads(body)
    except ValueError:
        return False
    error = message.get("error") if isinstance(message, dict) else None
    text = error.get("message") if isinstance(error, dict) else None
    return isinstance(text, str) and "session" in text.lower()


class SessionStage(Stage[SessionConfig]):
    """Sign and verify session ids; keep heartbeating upstream sessions alive."""

    name: ClassVar[str] = "session"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)
    # A tools/call's response is not needed: on the auto front door's fast route the
    # id is verified and the keeper (re)started from the request (see _admit); a
    # session the upstream lost shows as a 404 on the keeper's own GET.
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, config: SessionConfig, failure_mode: FailureMode = FailureMode.CLOSED, *, clock: Clock | None = None
    ) -> None:
        """``clock`` is the keeper's time (the real clock unless a test passes a fake)."""
        super().__init__(config, failure_mode)
        self.settings = config
        self.ids = SessionIds(SessionKeys.ephemeral(), max_age_s=config.max_age_s)
        self.refused: Counter | None = None
        self._client = httpx.AsyncClient(
            # Reads never time out: the GET stream may be quiet for a long time.
            timeout=httpx.Timeout(10.0, read=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            follow_redirects=False,
            verify=client_context(),
        )
        # Ping answers: short POSTs on a few reused connections, never queued behind streams.
        self._answers = httpx.AsyncClient(
            timeout=httpx.Timeout(10.0),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32),
            follow_redirects=False,
            verify=client_context(),
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
        self._answering: set[asyncio.Task[None]] = set()

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self.keeper.metrics = KeeperMetrics(registry)
        self.refused = Counter(
            "mcp_extproc_session_refused",
            "Requests refused for a session id that is not valid here or belongs to another principal.",
            ["server", "reason"],
            registry=registry,
        )

    async def startup(self) -> None:
        if self.config.key_file is not None:
            keys = load_key_set(Path(self.config.key_file), create=True)
            self.ids = SessionIds(keys, max_age_s=self.config.max_age_s)
            log.info("session ids signed with key %s of %s", keys.signing.kid, keys.source)
        else:
            log.warning(
                "session ids are signed with a key held in memory: sessions will not survive a restart "
                "or reach another replica (give --session-key-file)"
            )
        self._sweeper = asyncio.create_task(self.keeper.sweep(), name="keeper-sweep")

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._answering):
            task.cancel()
        await self.keeper.close()
        await self._client.aclose()
        await self._answers.aclose()

    def needs_response(self, ctx: Context) -> bool | None:
        if ctx.virtual is not None:
            return False  # a virtual server's sessions are the virtual stage's
        if MCP_SESSION_ID in ctx.request_headers:
            return True
        return _legacy(ctx) and ctx.http_method != "GET"

    def _refuse(self, ctx: Context, server: str, reason: str) -> Deny:
        if self.refused is not None:
            self.refused.labels(server, reason).inc()
        if reason == "session_principal_mismatch":
            ctx.log.warning("refused a request for a session of %r opened by another principal", server)
        return Deny(
            status=404,
            code=INVALID_REQUEST,
            message=f"session not found: this Mcp-Session-Id is not valid for MCP server {server!r} "
            f"({_WHY.get(reason, reason)}); send initialize to start a session",
            reason=reason,
        )

    async def on_request_headers(self, ctx: Context) -> Verdict:
        if ctx.request_has_body or ctx.virtual is not None:
            return None  # decided on the body, so that a refusal carries the JSON-RPC id
        return await self._admit(ctx)

    async def on_request_body(self, ctx: Context) -> Verdict:
        return await self._admit(ctx)

    async def _admit(self, ctx: Context) -> Verdict:
        if ctx.virtual is not None:
            return None  # the virtual stage swaps a virtual server's session ids itself
        if not ctx.sees_responses and not ctx.fast_call:
            # ext_authz front door: we never see the initialize response, so no id of
            # ours was ever issued; upstream ids pass (README: front doors).
            return None
        server = ctx.server
        token = ctx.request_headers.get(MCP_SESSION_ID)
        if server is None or not token:
            return None
        if "," in token:
            # Envoy joins repeated headers with ", "; our ids (base64url and dots) never hold one.
            return Deny(
                status=400,
                code=INVALID_REQUEST,
                message="the mcp-session-id header was sent more than once; send it once",
                reason="duplicate_header",
            )
        try:
            claims = self.ids.verify(token, server.name)
        except BadSessionId as exc:
            return self._refuse(ctx, server.name, exc.reason)
        if not claims.belongs_to(_caller(ctx), _agent(ctx)):
            return self._refuse(ctx, server.name, "session_principal_mismatch")
        state = ctx.state(_STATE)
        state.token, state.session_id = token, claims.upstream_id
        upstream = Continue(set_headers={MCP_SESSION_ID: claims.upstream_id})
        if _legacy(ctx):
            await self._keep_alive(ctx, server, state)
        return upstream

    async def _keep_alive(self, ctx: Context, server: MCPServer, state: _Exchange) -> None:
        session_id = state.session_id
        assert session_id is not None
        keeper = self.keeper
        if ctx.http_method == "GET":
            if keeper.get(server.name, session_id) is None and self._keeps(server.name, server.spec.keepalive):
                # The agent opens its stream before we kept the session: keep it now, so
                # that the stream is taken over when the agent's ends.
                await self._keep(ctx, server, session_id)
            if keeper.get(server.name, session_id) is not None:
                state.agent_stream = True
                await keeper.step_aside(server.name, session_id)
                # Read the agent's stream: its pings are answered here, and its end
                # (on_exchange_end) hands the stream back to the keeper.
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
                # (after an idle expiry or a restart, say); a session the upstream forgot
                # answers the keeper's GET with 404, and the keeper stops.
                await self._keep(ctx, server, session_id)

    async def on_response_headers(self, ctx: Context) -> Verdict:
        server = ctx.server
        if server is None or ctx.virtual is not None:
            return None
        state = ctx.state(_STATE)
        issued = ctx.response_headers.get(MCP_SESSION_ID)
        if state.session_id is None:
            if not issued:
                return None
            is_initialize = ctx.mcp is not None and any(m.method == "initialize" for m in ctx.mcp.messages)
            if is_initialize and 200 <= (ctx.response_status or 0) < 300 and _legacy(ctx):
                token = self.ids.mint(issued, server.name, _caller(ctx), _agent(ctx))
                return Continue(set_headers={MCP_SESSION_ID: token})
            return Continue(remove_headers=(MCP_SESSION_ID,))  # an upstream id never reaches the agent
        echoed = Continue(set_headers={MCP_SESSION_ID: state.token}) if issued and state.token else None
        status = ctx.response_status or 0
        if status == 404:
            return await self._lost(ctx, server, state.session_id)
        if status == 400 and ctx.response_content_type == "application/json":
            state.check_lost = True  # some servers answer an unknown session with 400: read why
            ctx.want_response_body()
            return echoed
        if not _legacy(ctx) or ctx.http_method == "DELETE":
            return echoed
        if state.agent_stream:
            if status != 200:  # the agent's stream did not open: hand the stream back now
                state.handed_back = True
                self.keeper.take_over(server.name, state.session_id)
            else:
                state.kept_events = self.keeper.take_pending(server.name, state.session_id)
            return echoed
        if 200 <= status < 300 and self._keeps(server.name, server.spec.keepalive):
            await self._keep(ctx, server, state.session_id)
        return echoed

    async def _lost(self, ctx: Context, server: MCPServer, session_id: str) -> Deny:
        await self.keeper.stop(server.name, session_id, "lost")
        if self.refused is not None:
            self.refused.labels(server.name, "upstream_session_lost").inc()
        return Deny(
            status=404,
            code=INVALID_REQUEST,
            message=f"session not found: MCP server {server.name!r} no longer knows this session; "
            "send initialize to start a new one",
            reason="upstream_session_lost",
        )

    async def _keep(self, ctx: Context, server: MCPServer, session_id: str) -> None:
        keeper = self.keeper
        if keeper.get(server.name, session_id) is None and len(keeper.sessions) >= self.settings.max_sessions:
            oldest = min(keeper.sessions.values(), key=lambda kept: kept.last_used)
            await keeper.stop(oldest.server, oldest.session_id, "evicted")
        keeper.keep(
            server.name,
            server.spec.url,
            session_id,
            ctx.request_headers.get(MCP_PROTOCOL_VERSION),
            ctx.state(UPSTREAM_CREDENTIAL).provider,
            server.spec.keepalive_idle_s,
        )

    def _keeps(self, server: str, keepalive: Keepalive) -> bool:
        if keepalive is Keepalive.NEVER:
            return False
        # Auto stops trying a server once it said it has no GET stream (405); Always keeps trying.
        return not (keepalive is Keepalive.AUTO and server in self.keeper.no_get_servers)

    async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict:
        state = ctx.state(_STATE)
        server = ctx.server
        if server is None or state.session_id is None or ctx.virtual is not None:
            return None
        if state.check_lost:
            if _names_the_session(chunk):
                return await self._lost(ctx, server, state.session_id)
            return None
        if not state.agent_stream or state.unread:
            return None
        out = bytearray(b"".join(state.kept_events))
        if state.kept_events:
            self.keeper.delivered(server.name, len(state.kept_events))
            state.kept_events = []
        out += self._answer_pings(ctx, server, state, chunk)
        return None if out == chunk else Continue(body=bytes(out))

    def _answer_pings(self, ctx: Context, server: MCPServer, state: _Exchange, chunk: bytes) -> bytes:
        """The agent's stream with every ping answered by the keeper and replaced by a comment."""
        assert state.session_id is not None
        if state.decoder is None:
            state.decoder = SseDecoder()
        out = bytearray()
        try:
            events = state.decoder.feed(chunk)
        except SseTooLarge:
            state.unread = True  # too big to read: pass the rest through untouched
            return state.decoder.flush() + chunk
        kept = self.keeper.get(server.name, state.session_id)
        for event in events:
            message = event_message(event.data)
            if kept is not None and server_request(message) == "ping":
                assert isinstance(message, dict)
                task = asyncio.create_task(self.keeper.answer_ping(kept, message["id"]))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
                out += PING_REMOVED
            else:
                out += event.raw
        if ctx.end_of_stream:
            out += state.decoder.flush()
        return bytes(out)

    async def on_exchange_end(self, ctx: Context) -> None:
        state = ctx.state(_STATE)
        if ctx.server is None or not state.session_id:
            return
        if state.kept_events:  # the agent's stream ended before it carried them
            self.keeper.give_back(ctx.server.name, state.session_id, state.kept_events)
            state.kept_events = []
        if state.agent_stream and not state.handed_back:
            state.handed_back = True
            self.keeper.take_over(ctx.server.name, state.session_id)
