"""The ``virtual`` stage: one endpoint, ``/<name>/mcp``, over several MCP servers (``MCPVirtualServer``).

It does nothing on a server's own route. On a virtual server's route it either answers
(from what the backends answer it) or picks the backend a request goes to, after which
the later stages judge the request exactly as on that backend's own route and Envoy
sends it straight to that backend's cluster::

    initialize (legacy)  ──▶ open a session on every backend (the client's capabilities and
                            clientInfo; then notifications/initialized) ──▶ answer: the union
                            of their capabilities, the virtual server's serverInfo, and
                            Mcp-Session-Id = a signed id (virtual session id, principal,
                            the client's initialize parameters)
    server/discover (modern), ping, notifications ──▶ answered here (notifications, and
                            logging/setLevel, are sent on to every backend of the session)
    tools/list, prompts/list, resources/list, resources/templates/list
                         ──▶ each backend asked (plugins.lib.backends: through the later
                            stages, so each list is filtered as on the backend's route:
                            list = call), every page ──▶ merged (plugins.lib.aggregate:
                            prefixes, conflicts left out), one page ──▶ answer
    tools/call, prompts/get, resources/read|subscribe|unsubscribe, completion/complete
                         ──▶ owner by name (prefix, else what each backend last listed)
                         ──▶ body (only the name's bytes changed: extproc.mcp.members; and
                            Mcp-Name) with the backend's own name, Mcp-Session-Id
                            of the backend's session (opened now if it is not yet, or was
                            lost), x-mcp-backend: <server> (Envoy re-routes to its cluster),
                            ctx.server = the backend ──▶ the later stages
    answer to a server request (id "mcpx~<server>~<id>") ──▶ back to that server, its own id
    response of a routed request ──▶ the backend's Mcp-Session-Id removed; a 404 (the backend
                            lost the session) ──▶ its session forgotten, a JSON-RPC error
                            asking to retry; SSE: each server request's id namespaced
    GET (legacy, a valid session) ──▶ each backend session opened (again) if need be ──▶ a
                            stream offer (extproc.streams): Envoy re-routes the GET to our
                            stream service, which streams every backend session's GET stream
                            as the keeper receives it (pings answered by the keeper; server
                            requests' ids namespaced; event ids dropped) until the client
                            goes; no stream service, or no backend with a stream ──▶ 405
    subscriptions/listen (2026-07-28) ──▶ a stream offer: every backend asked for its part of
                            the filter (its own resource URIs) through the later stages; one
                            acknowledgement (the union of theirs, URIs prefixed), then their
                            notifications, each stamped with the client's subscription id
    DELETE ──▶ every backend session ended

A backend that is down contributes nothing to a list; a call of its tools gets an error
naming it. Backend sessions live in this process (kept alive by a session keeper of
their own); the virtual session id carries what it takes to open them again, so after a
restart they are re-opened on first use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Final

import httpx
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field

from extproc.api import Answer, Context, Continue, Deny, Downstream, FailureMode, Stage, StageConfig, StateKey, Verdict
from extproc.config.models import VirtualBackend
from extproc.config.resources import Catalog, MCPServer, MCPVirtualServer
from extproc.config.session_keys import SessionKeys, load_key_set
from extproc.mcp.headers import MCP_NAME, MCP_PROTOCOL_VERSION, MCP_SESSION_ID, Era
from extproc.mcp.jsonrpc import McpRequest, Message, parse_request
from extproc.mcp.members import with_member
from extproc.mcp.spec import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
)
from extproc.mcp.sse import SseDecoder, SseTooLarge
from extproc.streams import OFFERS, STREAM_HEADER
from plugins.lib import aggregate
from plugins.lib.backends import BackendFailed, Backends, Reply, answer_of, next_id
from plugins.lib.keeper import KeeperMetrics, KeeperSettings, SessionKeeper, event_message
from plugins.lib.session_ids import DEFAULT_MAX_AGE_S, BadSessionId, SessionIds
from plugins.lib.tls import client_context
from plugins.mcp_stage import derived_headers

BACKEND_HEADER: Final = "x-mcp-backend"
"""Set on a routed request: the MCPServer whose route Envoy sends it on (removed before it leaves);
the renderer's twin is ``extproc.render.wire.BACKEND_HEADER``."""

_REMOVED_IN_MODERN: Final = frozenset({"ping", "logging/setLevel", "resources/subscribe", "resources/unsubscribe"})
"""Methods 2026-07-28 no longer has (a modern client gets 404 -32601, as from a server)."""

MAX_PAGES: Final = 50
"""Pages read from one backend for one list."""

MAX_QUEUED_EVENTS: Final = 1000
"""Events waiting for a slow client on its merged stream; past it a backend's request is refused."""

log = logging.getLogger("mcp_extproc.virtual")


class VirtualConfig(StageConfig):
    """Configuration of the ``virtual`` stage.

    Attributes:
        key_file: the session key set (``up``/``serve`` fill it from ``--session-key-file``).
        max_age_s: how long a virtual session id stays valid.
        backend_timeout_s: how long a backend may take to answer the gateway's own requests.
        idle_timeout_s: stop keeping a backend session no agent used for this long.
        max_sessions: bound on backend sessions held (the least recently used go first).
    """

    key_file: str | None = Field(default=None, alias="keyFile")
    max_age_s: float = Field(default=DEFAULT_MAX_AGE_S, gt=0, alias="maxSessionAgeSeconds")
    backend_timeout_s: float = Field(default=10.0, gt=0, alias="backendTimeoutSeconds")
    idle_timeout_s: float = Field(default=1800.0, gt=0, alias="idleTimeoutSeconds")
    max_sessions: int = Field(default=100_000, gt=0, alias="maxSessions")


@dataclass(frozen=True, slots=True)
class _Client:
    """A virtual session: its id and what the client said in ``initialize``."""

    sid: str
    version: str
    capabilities: Any
    info: Any

    def extra(self) -> dict[str, Any]:
        return {"v": self.version, "caps": self.capabilities, "info": self.info}


@dataclass
class _BackendSession:
    session_id: str
    version: str
    credential: Any = None
    capabilities: Any = None
    """What the backend answered ``initialize`` with (for the virtual server's own answer)."""


@dataclass
class _Exchange:
    backend: str | None = None
    client: _Client | None = None
    rewrite: bool = False
    decoder: SseDecoder | None = None


_STATE = StateKey("virtual", _Exchange)


@dataclass
class _Sessions:
    """Backend sessions by (virtual session id, backend), opened once each; the least recently
    used go first past ``limit`` (their keeping stops; a later request opens them again)."""

    limit: int
    open: OrderedDict[tuple[str, str], _BackendSession] = field(default_factory=OrderedDict)
    locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def get(self, key: tuple[str, str]) -> _BackendSession | None:
        found = self.open.get(key)
        if found is not None:
            self.open.move_to_end(key)
        return found

    def put(self, key: tuple[str, str], session: _BackendSession) -> list[tuple[str, _BackendSession]]:
        """Remember ``session``; returns the evicted ones as (backend, session)."""
        self.open[key] = session
        self.open.move_to_end(key)
        evicted = []
        while len(self.open) > self.limit:
            (_, backend), old = self.open.popitem(last=False)
            self.locks.pop((_, backend), None)
            evicted.append((backend, old))
        return evicted

    def drop(self, key: tuple[str, str]) -> _BackendSession | None:
        self.locks.pop(key, None)
        return self.open.pop(key, None)


class VirtualStage(Stage[VirtualConfig]):
    """Serve ``MCPVirtualServer`` routes: answer discovery and lists, route calls to their backend."""

    name: ClassVar[str] = "virtual"
    requires: ClassVar[tuple[str, ...]] = ("mcp",)
    # A virtual server's routes always take ext_proc; on a server's own route this stage
    # does nothing, so it never keeps a call off the fast route.
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: VirtualConfig, failure_mode: FailureMode = FailureMode.CLOSED) -> None:
        super().__init__(config, failure_mode)
        self.ids = SessionIds(SessionKeys.ephemeral(), max_age_s=config.max_age_s)
        tls = client_context()  # one CA bundle loaded, shared with the other stages' clients
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.backend_timeout_s), follow_redirects=False, verify=tls
        )
        self._streams = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), follow_redirects=False, verify=tls)
        self.backends = Backends(self._client)
        self.keeper = SessionKeeper(
            KeeperSettings(idle_timeout_s=config.idle_timeout_s), KeeperMetrics(None), self._streams, self._client
        )
        self.sessions = _Sessions(config.max_sessions)
        self.ended: OrderedDict[str, None] = OrderedDict()
        """Virtual sessions the client ended (DELETE): their ids are refused from then on."""
        self.names: dict[str, aggregate.Names] = {}
        self.events: Counter | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def bind_downstream(self, downstream: Downstream) -> None:
        """The stages after this one judge every request this stage sends a backend."""
        self.backends.downstream = downstream

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "mcp_extproc_virtual_events",
            "Virtual server events: backend sessions opened/reopened, backends failed, name conflicts.",
            ["virtual", "backend", "event"],
            registry=registry,
        )

    async def startup(self) -> None:
        if self.config.key_file is not None:
            self.ids = SessionIds(
                load_key_set(Path(self.config.key_file), create=True), max_age_s=self.config.max_age_s
            )
        self._sweeper = asyncio.create_task(self.keeper.sweep(), name="virtual-keeper-sweep")

    async def shutdown(self) -> None:
        for task in [*self._background, *([self._sweeper] if self._sweeper else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.keeper.close()
        await self._client.aclose()
        await self._streams.aclose()

    def check(self, catalog: Catalog) -> list[str]:
        """Name conflicts the resources alone prove: tools two backends both declare (by a
        literal ``allowedTools`` entry or a ``pinnedTools`` key) under the same final name."""
        problems = []
        for virtual in catalog.virtual_servers.values():
            names = aggregate.Names(virtual)
            for backend in virtual.spec.servers:
                server = catalog.servers.get(backend.name)
                if server is not None:
                    names.learn(backend.name, "tools/list", _declared_tools(server))
            for name, conflict in sorted(names.conflicts("tools/list").items()):
                problems.append(
                    f"warning: MCPVirtualServer {virtual.name!r}: {conflict.message(name, virtual.name)} "
                    "(both are hidden and refused)"
                )
        return problems

    def needs_response(self, ctx: Context) -> bool | None:
        return None if ctx.virtual is not None else False

    def report(self) -> dict[str, Any]:
        """Per virtual server, how many tools each backend last listed, and the names two
        backends both take (the controller writes these into ``MCPVirtualServer`` status)."""
        found: dict[str, Any] = {}
        for name, names in self.names.items():
            backends = {
                b.name: {"tools": len(listed)}
                for b in names.virtual.spec.servers
                if (listed := names.listed.get((b.name, "tools/list"))) is not None
            }
            conflicts = {final: list(c.backends) for final, c in sorted(names.conflicts("tools/list").items())}
            found[name] = {"backends": backends, "conflicts": conflicts}
        return {"virtualServers": found}

    def _names(self, virtual: MCPVirtualServer) -> aggregate.Names:
        """What ``virtual``'s backends last listed (forgotten when a reload changes ``virtual``)."""
        names = self.names.get(virtual.name)
        if names is None or names.virtual != virtual:
            names = self.names[virtual.name] = aggregate.Names(virtual)
        return names

    def _count(self, virtual: str, backend: str, event: str) -> None:
        if self.events is not None:
            self.events.labels(virtual, backend, event).inc()

    # -- request -------------------------------------------------------------------------------

    async def on_request_headers(self, ctx: Context) -> Verdict:
        virtual = ctx.virtual
        if virtual is None:
            return None
        if ctx.http_method == "GET":
            return await self._get(ctx, virtual)
        if ctx.http_method == "DELETE":
            return await self._delete(ctx, virtual)
        return Continue(remove_headers=(BACKEND_HEADER, STREAM_HEADER))

    async def on_request_body(self, ctx: Context) -> Verdict:
        virtual, request = ctx.virtual, ctx.mcp
        if virtual is None or request is None:
            return None
        if request.is_batch:
            return Deny(
                code=INVALID_REQUEST, message=f"virtual server {virtual.name!r} takes no batches", reason="batch"
            )
        message = request.messages[0]
        legacy = request.era is Era.LEGACY
        client = None
        if legacy:
            if message.method == "initialize":
                return await self._initialize(ctx, virtual, message)
            found = self._client_of(ctx, virtual)
            if isinstance(found, Deny):
                return found
            client = found
        ctx.state(_STATE).client = client
        if message.kind == "response":
            return await self._answer_to_server(ctx, virtual, message, client)
        if message.kind == "notification":
            self._in_background(self._broadcast(ctx, virtual, message, client))
            return Answer(body=b"", status=202, reason="virtual_notification")
        method = message.method or ""
        if not legacy and method in _REMOVED_IN_MODERN:
            return Deny(
                code=METHOD_NOT_FOUND,
                message=f"method {method!r} does not exist in protocol version 2026-07-28",
                reason="method",
            )
        if method == "ping":
            return _result(message, {})
        if method == "server/discover":
            return await self._discover(ctx, virtual, message)
        if method in aggregate.LISTS:
            return await self._list(ctx, virtual, message, client)
        if method == "logging/setLevel":
            await self._broadcast(ctx, virtual, message, client)
            return _result(message, {})
        if method in aggregate.KIND_OF_CALL or method == "completion/complete":
            return await self._route(ctx, virtual, message, client)
        if method == "subscriptions/listen" and not legacy:
            return await self._listen(ctx, virtual, message)
        return Deny(
            code=METHOD_NOT_FOUND, message=f"virtual server {virtual.name!r} does not serve {method!r}", reason="method"
        )

    # -- sessions ------------------------------------------------------------------------------

    def _client_of(self, ctx: Context, virtual: MCPVirtualServer) -> _Client | Deny:
        token = ctx.request_headers.get(MCP_SESSION_ID)
        if not token:
            return Deny(
                status=400,
                code=INVALID_REQUEST,
                message="missing Mcp-Session-Id: send initialize first",
                reason="no_session",
            )
        try:
            claims = self.ids.verify(token, virtual.name)
        except BadSessionId as exc:
            return _lost_session(virtual, exc.reason)
        if claims.upstream_id in self.ended:
            return _lost_session(virtual, "ended")
        principal = ctx.principal.key if ctx.principal is not None else "anonymous"
        if not claims.belongs_to(principal, ctx.principal.agent if ctx.principal else None):
            ctx.log.warning("refused a session of virtual server %r opened by another principal", virtual.name)
            return _lost_session(virtual, "session_principal_mismatch")
        extra = claims.extra
        version = extra.get("v") if isinstance(extra.get("v"), str) else HANDSHAKE_PROTOCOL_VERSIONS[-1]
        return _Client(claims.upstream_id, str(version), extra.get("caps") or {}, extra.get("info") or {})

    async def _session(
        self, ctx: Context, virtual: MCPVirtualServer, server: MCPServer, client: _Client
    ) -> _BackendSession:
        """The backend session of ``client`` on ``server``, opened (again) if need be.

        Raises:
            BackendFailed: the backend could not open one.
        """
        key = (client.sid, server.name)
        lock = self.sessions.locks.setdefault(key, asyncio.Lock())
        async with lock:
            known = self.sessions.get(key)
            if known is not None and self._alive(server, known):
                self.keeper.touch(server.name, known.session_id)
                return known
            if known is not None:
                self._count(virtual.name, server.name, "reopened")
                log.info("virtual server %r: the session on %r was lost; opening a new one", virtual.name, server.name)
            opened = await self._open(ctx, server, client)
            for backend, old in self.sessions.put(key, opened):
                await self.keeper.stop(backend, old.session_id, "evicted")
            self._count(virtual.name, server.name, "opened")
            return opened

    def _alive(self, server: MCPServer, session: _BackendSession) -> bool:
        if not session.session_id:
            return True  # a server without sessions loses none
        if server.name in self.keeper.no_get_servers or server.spec.keepalive.value == "Never":
            return True
        return self.keeper.get(server.name, session.session_id) is not None

    async def _open(self, ctx: Context, server: MCPServer, client: _Client) -> _BackendSession:
        rid = next_id()
        params = {"protocolVersion": client.version, "capabilities": client.capabilities, "clientInfo": client.info}
        reply = await self._send(
            ctx, server, {"jsonrpc": "2.0", "id": rid, "method": "initialize", "params": params}, client.version
        )
        session_id = reply.headers.get(MCP_SESSION_ID, "")
        answer = answer_of(reply, rid)
        result = answer.get("result") if answer else None
        if not (200 <= reply.status < 300) or not isinstance(result, dict):
            raise BackendFailed(f"MCP server {server.name!r} refused initialize (HTTP {reply.status})", reply.status)
        version = result.get("protocolVersion")
        version = version if isinstance(version, str) else client.version
        opened = _BackendSession(session_id, version, reply.credential, result.get("capabilities"))
        await self._send(
            ctx, server, {"jsonrpc": "2.0", "method": "notifications/initialized"}, version, session_id or None
        )
        if session_id and server.spec.keepalive.value != "Never":
            self.keeper.keep(
                server.name, server.spec.url, session_id, version, reply.credential, server.spec.keepalive_idle_s
            )
        return opened

    async def _send(
        self, ctx: Context, server: MCPServer, message: dict[str, Any], version: str, session_id: str | None = None
    ) -> Reply:
        """Raises BackendFailed, also for a stage's refusal (its message names why)."""
        outcome = await self.backends.send(ctx, server, message, protocol_version=version, session_id=session_id)
        if isinstance(outcome, Deny | Answer):
            why = outcome.message if isinstance(outcome, Deny) else "answered by a stage"
            raise BackendFailed(f"MCP server {server.name!r}: {why}")
        return outcome

    async def _initialize(self, ctx: Context, virtual: MCPVirtualServer, message: Message) -> Verdict:
        params = message.params or {}
        asked = params.get("protocolVersion")
        version = asked if asked in HANDSHAKE_PROTOCOL_VERSIONS else HANDSHAKE_PROTOCOL_VERSIONS[-1]
        client = _Client(
            uuid.uuid4().hex, str(version), params.get("capabilities") or {}, params.get("clientInfo") or {}
        )
        refused: list[BackendFailed] = []
        opened = await self._each_backend(
            ctx, virtual, lambda server: self._session(ctx, virtual, server, client), refused
        )
        if not opened and refused and all(400 <= f.status < 500 for f in refused):
            # Every backend refused this client (a bad Origin, say): so does the virtual server.
            return Deny(
                status=refused[0].status,
                code=INVALID_REQUEST,
                message=f"no MCP server behind virtual server {virtual.name!r} accepted initialize: {refused[0]}",
                reason="virtual_initialize_refused",
            )
        capabilities = aggregate.union_capabilities(s.capabilities for _, s in opened)
        principal = ctx.principal.key if ctx.principal is not None else "anonymous"
        agent = ctx.principal.agent if ctx.principal is not None else None
        token = self.ids.mint(client.sid, virtual.name, principal, agent, client.extra())
        result = {"protocolVersion": version, "capabilities": capabilities, "serverInfo": _server_info(virtual)}
        return _result(message, result, headers={MCP_SESSION_ID: token}, reason="virtual_initialize")

    async def _each_backend(
        self, ctx: Context, virtual: MCPVirtualServer, work: Any, failures: list[BackendFailed] | None = None
    ) -> list[tuple[VirtualBackend, Any]]:
        """``work(server)`` for every backend at once; those that fail are logged, counted, left out
        (and their :class:`BackendFailed` added to ``failures``)."""
        entries = [b for b in virtual.spec.servers if ctx.catalog is not None and b.name in ctx.catalog.servers]
        assert ctx.catalog is not None
        servers = [ctx.catalog.servers[b.name] for b in entries]
        results = await asyncio.gather(*(work(s) for s in servers), return_exceptions=True)
        done: list[tuple[VirtualBackend, Any]] = []
        for entry, outcome in zip(entries, results, strict=True):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, BackendFailed | httpx.HTTPError | asyncio.TimeoutError):
                    raise outcome
                if failures is not None and isinstance(outcome, BackendFailed):
                    failures.append(outcome)
                self._count(virtual.name, entry.name, "failed")
                ctx.log.warning("virtual server %r: backend %r left out: %s", virtual.name, entry.name, outcome)
                continue
            done.append((entry, outcome))
        return done

    async def _delete(self, ctx: Context, virtual: MCPVirtualServer) -> Verdict:
        found = self._client_of(ctx, virtual)
        if isinstance(found, Deny):
            return found
        self.ended[found.sid] = None
        while len(self.ended) > self.config.max_sessions:
            self.ended.popitem(last=False)
        for backend in virtual.spec.servers:
            opened = self.sessions.drop((found.sid, backend.name))
            if opened is None or ctx.catalog is None or backend.name not in ctx.catalog.servers:
                continue
            await self.keeper.stop(backend.name, opened.session_id, "delete")
            server = ctx.catalog.servers[backend.name]
            headers = {MCP_SESSION_ID: opened.session_id, MCP_PROTOCOL_VERSION: opened.version}
            with contextlib.suppress(Exception):
                if opened.credential is not None:
                    headers.update(await opened.credential())
                await self._client.delete(server.spec.url, headers=headers)
        return Answer(body=b"", status=200, reason="virtual_delete")

    # -- the client's GET stream ---------------------------------------------------------------

    async def _get(self, ctx: Context, virtual: MCPVirtualServer) -> Verdict:
        """The merged stream of every backend session's GET stream, or 405 when there is none."""
        if OFFERS.services == 0 or MCP_SESSION_ID not in ctx.request_headers:
            return _no_get(virtual)
        found = self._client_of(ctx, virtual)
        if isinstance(found, Deny):
            return found
        client = found
        opened = await self._each_backend(ctx, virtual, lambda s: self._session(ctx, virtual, s, client))
        kept = [(entry, s.session_id) for entry, s in opened if self.keeper.get(entry.name, s.session_id) is not None]
        if not kept:
            return _no_get(virtual)
        ticket = OFFERS.offer(lambda: self._merged(virtual, kept))
        ctx.log.info("virtual server %r: client stream over %s", virtual.name, [e.name for e, _ in kept])
        return Continue(set_headers={STREAM_HEADER: ticket}, remove_headers=(BACKEND_HEADER,))

    async def _merged(self, virtual: MCPVirtualServer, kept: list[tuple[VirtualBackend, str]]) -> AsyncIterator[bytes]:
        """Every event of the backend sessions' streams, server requests' ids namespaced, until closed."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=MAX_QUEUED_EVENTS)
        listening: list[tuple[str, str, Any]] = []

        def listener_of(entry: VirtualBackend) -> Any:
            def listener(raw: bytes) -> bool:
                event = _merged_event(raw, entry)
                if not event:
                    return True
                try:
                    queue.put_nowait(event)
                except asyncio.QueueFull:
                    log.warning(
                        "virtual server %r: the client's stream is full; dropped an event of %r",
                        virtual.name,
                        entry.name,
                    )
                    return False
                return True

            return listener

        for entry, session_id in kept:
            listener = listener_of(entry)
            if self.keeper.listen(entry.name, session_id, listener):
                listening.append((entry.name, session_id, listener))
        try:
            while True:
                yield await queue.get()
        finally:
            for name, session_id, listener in listening:
                self.keeper.unlisten(name, session_id, listener)

    # -- subscriptions/listen (2026-07-28) --------------------------------------------------

    async def _listen(self, ctx: Context, virtual: MCPVirtualServer, message: Message) -> Verdict:
        """One listen stream over every backend's: each asked for its part of the filter."""
        if OFFERS.services == 0:
            return Deny(
                code=METHOD_NOT_FOUND,
                message=f"virtual server {virtual.name!r} merges no subscriptions/listen here (no stream service)",
                reason="virtual_no_listen",
            )
        params = message.params or {}
        wanted = params.get("notifications")
        if not isinstance(wanted, dict):
            return Deny(code=INVALID_PARAMS, message="subscriptions/listen needs params.notifications", reason="listen")
        uris = wanted.get("resourceSubscriptions") or []
        owned: dict[str, list[str]] = {}
        for uri in uris if isinstance(uris, list) else []:
            owner = await self._owner(ctx, virtual, "resources/list", uri, None) if isinstance(uri, str) else None
            if isinstance(owner, aggregate.Owner):
                owned.setdefault(owner.backend.name, []).append(owner.inner)
        assert ctx.catalog is not None
        plans = []
        for entry in virtual.spec.servers:
            server = ctx.catalog.servers.get(entry.name)
            part: dict[str, Any] = {k: True for k in _LIST_CHANGED_FLAGS if wanted.get(k) is True}
            if entry.name in owned:
                part["resourceSubscriptions"] = owned[entry.name]
            if server is not None and part:
                request: dict[str, Any] = {"jsonrpc": "2.0", "id": next_id(), "method": "subscriptions/listen"}
                request["params"] = {**({"_meta": params["_meta"]} if "_meta" in params else {}), "notifications": part}
                plans.append((entry, server, request))
        version = ctx.request_headers.get(MCP_PROTOCOL_VERSION, "")
        ticket = OFFERS.offer(lambda: self._listened(ctx, virtual, message.id, plans, version))
        return Continue(set_headers={STREAM_HEADER: ticket})

    async def _listened(
        self, ctx: Context, virtual: MCPVirtualServer, client_id: Any, plans: list[Any], version: str
    ) -> AsyncIterator[bytes]:
        """The merged listen stream: one acknowledgement (what the backends honor, prefixed), then
        their notifications stamped with the client's subscription id, until the client goes."""
        queue: asyncio.Queue[tuple[VirtualBackend, dict[str, Any] | None]] = asyncio.Queue(MAX_QUEUED_EVENTS)
        async with contextlib.AsyncExitStack() as stack:
            pumps = []
            for entry, server, request in plans:
                try:
                    reply = await self.backends.open_stream(ctx, server, request, protocol_version=version)
                except BackendFailed as exc:
                    log.warning("virtual server %r: no listen stream of %r: %s", virtual.name, entry.name, exc)
                    continue
                if not isinstance(reply, httpx.Response):
                    log.warning("virtual server %r: listen of %r refused by a stage", virtual.name, entry.name)
                    continue
                stack.push_async_callback(reply.aclose)
                if reply.status_code != 200 or not reply.headers.get("content-type", "").startswith(
                    "text/event-stream"
                ):
                    log.warning(
                        "virtual server %r: %r answered listen with HTTP %d",
                        virtual.name,
                        entry.name,
                        reply.status_code,
                    )
                    continue
                pumps.append(asyncio.create_task(_pump(entry, reply, queue)))
            for task in pumps:
                stack.callback(task.cancel)
            honored: dict[str, Any] = {}
            waiting = len(pumps)
            held: list[tuple[VirtualBackend, dict[str, Any]]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.backend_timeout_s
            while waiting and loop.time() < deadline:
                try:
                    entry, note = await asyncio.wait_for(queue.get(), deadline - loop.time())
                except TimeoutError:
                    break
                if note is None or note.get("method") == _ACKNOWLEDGED:
                    waiting -= 1
                    _honor(honored, entry, _acknowledged(note))
                else:
                    held.append((entry, note))
            ack = {"jsonrpc": "2.0", "method": _ACKNOWLEDGED, "params": {"notifications": honored}}
            yield _stamped(ack, client_id)
            for entry, note in held:
                yield _stamped(_outward_message(note, entry.name, entry), client_id)
            while True:
                entry, note = await queue.get()
                if note is not None and note.get("method") != _ACKNOWLEDGED:
                    yield _stamped(_outward_message(note, entry.name, entry), client_id)

    # -- lists ---------------------------------------------------------------------------------

    async def _list(self, ctx: Context, virtual: MCPVirtualServer, message: Message, client: _Client | None) -> Verdict:
        kind = message.method or ""
        if (message.params or {}).get("cursor") is not None:
            return Deny(code=INVALID_PARAMS, message="unknown cursor: this list has one page", reason="cursor")
        names = self._names(virtual)
        failed: list[BackendFailed] = []
        answers = await self._each_backend(
            ctx, virtual, lambda s: self._pages(ctx, virtual, s, kind, message, client), failed
        )
        refused = [(f.status, f.error) for f in failed if f.error is not None]
        if not answers and refused:
            return _passed_on(*refused[0])  # the client's request was wrong for every backend
        for entry, (raw_names, _) in answers:
            names.learn(entry.name, kind, raw_names)
        template: dict[str, Any] = next((result for _, (_, result) in answers), {})
        merged, conflicts = aggregate.merge(kind, names, [(entry, result) for entry, (_, result) in answers])
        for name, conflict in conflicts.items():
            for backend in conflict.backends:
                self._count(virtual.name, backend, "conflict")
            ctx.log.warning("virtual server %r: %s", virtual.name, conflict.message(name, virtual.name))
        array = aggregate.LISTS[kind][0]
        result = {k: v for k, v in template.items() if k not in (array, "nextCursor")}
        result.update(merged)
        return _result(message, result, reason="virtual_list")

    async def _pages(
        self,
        ctx: Context,
        virtual: MCPVirtualServer,
        server: MCPServer,
        kind: str,
        message: Message,
        client: _Client | None,
    ) -> tuple[list[str], dict[str, Any]]:
        """Every page of ``server``'s list: (the names it really has, its filtered result)."""
        raw_names: list[str] = []
        result: dict[str, Any] = {}
        items: list[Any] = []
        cursor = None
        array = aggregate.LISTS[kind][0]
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {k: v for k, v in (message.params or {}).items() if k != "cursor"}
            if cursor is not None:
                params["cursor"] = cursor
            reply, answer = await self._ask(ctx, virtual, server, kind, params, client)
            if answer is None or not isinstance(answer.get("result"), dict):
                raise BackendFailed(
                    f"MCP server {server.name!r} gave no {kind} result (HTTP {reply.status})",
                    reply.status,
                    answer.get("error") if answer else None,
                )
            raw = answer_of(reply, answer["id"], raw=True)
            raw_names += aggregate.list_names(kind, raw.get("result") if raw else None)
            result = answer["result"]
            page = result.get(array)
            items += page if isinstance(page, list) else []
            cursor = result.get("nextCursor")
            if not isinstance(cursor, str) or not cursor:
                break
        return raw_names, {**result, array: items}

    async def _ask(
        self,
        ctx: Context,
        virtual: MCPVirtualServer,
        server: MCPServer,
        method: str,
        params: dict[str, Any],
        client: _Client | None,
    ) -> tuple[Reply, dict[str, Any] | None]:
        """One request of the gateway's own to ``server`` (in the client's session, if legacy)."""
        rid = next_id()
        body = {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}
        if client is None:
            version = ctx.request_headers.get(MCP_PROTOCOL_VERSION, "")
            reply = await self._send(ctx, server, body, version)
            return reply, answer_of(reply, rid)
        session = await self._session(ctx, virtual, server, client)
        reply = await self._send(ctx, server, body, session.version, session.session_id or None)
        if reply.status == 404 and session.session_id:
            # Lost upstream: open a new session and ask once more.
            self.sessions.drop((client.sid, server.name))
            await self.keeper.stop(server.name, session.session_id, "lost")
            session = await self._session(ctx, virtual, server, client)
            reply = await self._send(ctx, server, body, session.version, session.session_id or None)
        return reply, answer_of(reply, rid)

    async def _discover(self, ctx: Context, virtual: MCPVirtualServer, message: Message) -> Verdict:
        params = dict(message.params or {})
        answers = await self._each_backend(
            ctx, virtual, lambda s: self._ask(ctx, virtual, s, "server/discover", params, None)
        )
        results = [a["result"] for _, (_, a) in answers if a is not None and isinstance(a.get("result"), dict)]
        refusals = [
            (r.status, a["error"]) for _, (r, a) in answers if a is not None and isinstance(a.get("error"), dict)
        ]
        if not results and refusals:
            return _passed_on(*refusals[0])
        statuses = [r.status for _, (r, _) in answers if 400 <= r.status < 500]
        if not results and statuses:
            return _passed_on(statuses[0], {"code": INVALID_REQUEST, "message": f"refused (HTTP {statuses[0]})"})
        if not results:
            return Deny(
                status=502,
                code=INTERNAL_ERROR,
                message=f"no MCP server behind virtual server {virtual.name!r} answered server/discover",
                reason="virtual_no_backend",
            )
        result = dict(results[0])
        capabilities = aggregate.union_capabilities(r.get("capabilities") for r in results)
        for feature in capabilities.values():
            if isinstance(feature, dict) and OFFERS.services == 0:
                # No stream service, no merged subscriptions/listen: promise no list_changed, no subscribe.
                feature.pop("listChanged", None)
                feature.pop("subscribe", None)
        result["capabilities"] = capabilities
        versions = [set(r.get("supportedVersions") or []) for r in results]
        result["supportedVersions"] = sorted(set.intersection(*versions)) if versions else []
        result.pop("instructions", None)
        meta = result.get("_meta")
        if isinstance(meta, dict):
            result["_meta"] = {k: (_server_info(virtual) if k.endswith("/serverInfo") else v) for k, v in meta.items()}
        return _result(message, result, reason="virtual_discover")

    # -- routing -------------------------------------------------------------------------------

    async def _owner(
        self, ctx: Context, virtual: MCPVirtualServer, kind: str, name: str, client: _Client | None
    ) -> aggregate.Owner | Deny:
        names = self._names(virtual)
        owners = names.owners(kind, name)
        if not owners:
            # Not listed yet (a call before any list, a new tool, a restart): ask again, once.
            await self._list_quietly(ctx, virtual, kind, client)
            if kind == "resources/list":
                await self._list_quietly(ctx, virtual, "resources/templates/list", client)
            owners = names.owners(kind, name)
        if len(owners) > 1:
            conflict = aggregate.Conflict(tuple(o.backend.name for o in owners))
            return Deny(
                status=200, code=INVALID_PARAMS, message=conflict.message(name, virtual.name), reason="virtual_conflict"
            )
        if not owners:
            what = "resource" if aggregate.is_uri_kind(kind) else kind.split("/")[0].rstrip("s")
            return Deny(
                status=200,  # a well-formed call refused at the JSON-RPC level, as a server would
                code=INVALID_PARAMS,
                message=f"no MCP server behind virtual server {virtual.name!r} has the {what} {name!r}",
                reason="virtual_unknown_name",
            )
        return owners[0]

    async def _list_quietly(self, ctx: Context, virtual: MCPVirtualServer, kind: str, client: _Client | None) -> None:
        names = self._names(virtual)
        fake = Message(kind="request", id=None, method=kind, params={}, raw={})
        if client is None and ctx.mcp is not None:
            meta = (ctx.mcp.messages[0].params or {}).get("_meta")
            fake = Message(kind="request", id=None, method=kind, params={"_meta": meta} if meta else {}, raw={})
        answers = await self._each_backend(ctx, virtual, lambda s: self._pages(ctx, virtual, s, kind, fake, client))
        for entry, (raw_names, _) in answers:
            names.learn(entry.name, kind, raw_names)

    async def _route(
        self, ctx: Context, virtual: MCPVirtualServer, message: Message, client: _Client | None
    ) -> Verdict:
        method = message.method or ""
        params = dict(message.params or {})
        if method == "completion/complete":
            ref = params.get("ref")
            if not isinstance(ref, dict):
                return Deny(code=INVALID_PARAMS, message="completion/complete needs params.ref", reason="virtual_ref")
            kind, key = ("prompts/list", "name") if ref.get("type") == "ref/prompt" else ("resources/list", "uri")
            holder: dict[str, Any] = dict(ref)
        else:
            kind = aggregate.KIND_OF_CALL[method]
            key = "uri" if aggregate.is_uri_kind(kind) else "name"
            holder = params
        name = holder.get(key)
        if not isinstance(name, str):
            return Deny(code=INVALID_PARAMS, message=f"{method} needs a string params.{key}", reason="virtual_name")
        owner = await self._owner(ctx, virtual, kind, name, client)
        if isinstance(owner, Deny):
            return owner
        holder[key] = owner.inner
        if method == "completion/complete":
            params["ref"] = holder
        where = ("params", "ref", key) if method == "completion/complete" else ("params", key)
        body = _rewritten(ctx.body, where, owner.inner, {**message.raw, "params": params})
        assert ctx.catalog is not None
        server = ctx.catalog.servers[owner.backend.name]
        return await self._forward(ctx, virtual, server, body, client, name=owner.inner)

    async def _forward(
        self,
        ctx: Context,
        virtual: MCPVirtualServer,
        server: MCPServer,
        body: bytes,
        client: _Client | None,
        *,
        name: str | None = None,
    ) -> Verdict:
        headers = dict(ctx.request_headers)
        set_headers = {BACKEND_HEADER: server.name}
        if client is not None:
            try:
                session = await self._session(ctx, virtual, server, client)
            except BackendFailed as exc:
                return _unavailable(virtual, server, str(exc))
            if session.session_id:
                set_headers[MCP_SESSION_ID] = session.session_id
            set_headers[MCP_PROTOCOL_VERSION] = session.version
        elif name is not None and MCP_NAME in headers:
            set_headers[MCP_NAME] = name
        headers.update(set_headers)
        parsed = parse_request(body, headers)
        if not isinstance(parsed, McpRequest):
            return Deny(code=INVALID_REQUEST, message=parsed.message, reason="virtual_rewrite")
        ctx.server, ctx.mcp, ctx.request_headers = server, parsed, headers
        derived, metadata = derived_headers(parsed, server.name)
        ctx.state(_STATE).backend = server.name
        return Continue(
            body=body,
            set_headers={**derived, **set_headers},
            metadata={**metadata, "virtual": virtual.name},
        )

    async def _answer_to_server(
        self, ctx: Context, virtual: MCPVirtualServer, message: Message, client: _Client | None
    ) -> Verdict:
        unwrapped = aggregate.unwrap_id(message.id)
        backend = virtual.backend(unwrapped[0]) if unwrapped else None
        if unwrapped is None or backend is None or ctx.catalog is None or backend.name not in ctx.catalog.servers:
            ctx.log.info("virtual server %r: dropped an answer to no request of its servers", virtual.name)
            return Answer(body=b"", status=202, reason="virtual_stray_answer")
        body = _rewritten(ctx.body, ("id",), unwrapped[1], {**message.raw, "id": unwrapped[1]})
        return await self._forward(ctx, virtual, ctx.catalog.servers[backend.name], body, client)

    async def _broadcast(
        self, ctx: Context, virtual: MCPVirtualServer, message: Message, client: _Client | None
    ) -> None:
        if message.method == "notifications/initialized":
            return  # each backend session got its own when it was opened
        body = dict(message.raw)
        if client is None:
            return  # 2026-07-28: no sessions, nothing to tell
        for backend in virtual.spec.servers:
            opened = self.sessions.get((client.sid, backend.name))
            if opened is None or ctx.catalog is None or backend.name not in ctx.catalog.servers:
                continue
            with contextlib.suppress(BackendFailed, httpx.HTTPError):
                await self._send(ctx, ctx.catalog.servers[backend.name], body, opened.version, opened.session_id)

    def _in_background(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- response ------------------------------------------------------------------------------

    async def on_response_headers(self, ctx: Context) -> Verdict:
        state = ctx.state(_STATE)
        virtual = ctx.virtual
        if virtual is None or state.backend is None:
            return None
        if ctx.response_status == 404 and state.client is not None:
            opened = self.sessions.drop((state.client.sid, state.backend))
            if opened is not None:
                await self.keeper.stop(state.backend, opened.session_id, "lost")
            self._count(virtual.name, state.backend, "lost")
            return Deny(
                code=INTERNAL_ERROR,
                message=f"MCP server {state.backend!r} behind virtual server {virtual.name!r} lost this session; "
                "the gateway opens a new one: send the request again",
                reason="virtual_backend_session_lost",
            )
        if ctx.response_is_sse:
            state.rewrite = True
            ctx.want_response_body()
        return Continue(remove_headers=(MCP_SESSION_ID,))

    async def on_response_body(self, ctx: Context, chunk: bytes) -> Verdict:
        state = ctx.state(_STATE)
        if ctx.virtual is None or state.backend is None or not state.rewrite:
            return None
        if state.decoder is None:
            state.decoder = SseDecoder()
        try:
            events = state.decoder.feed(chunk)
        except SseTooLarge:
            state.rewrite = False  # an event too big to read holds no request of the server's
            return Continue(body=state.decoder.flush() + chunk)
        entry = ctx.virtual.backend(state.backend)
        out = bytearray()
        for event in events:
            out += _outward_event(event.raw, event.data, state.backend, entry)
        if ctx.end_of_stream:
            out += state.decoder.flush()
        return None if out == chunk else Continue(body=bytes(out))


def _rewritten(body: bytes | None, where: tuple[str, ...], value: Any, message: dict[str, Any]) -> bytes:
    """The client's body with the value at ``where`` replaced and every other byte kept (the
    backend reads what the client wrote); re-encoded from ``message`` should it not be found."""
    kept = with_member(body, where, value) if body else None
    return kept if kept is not None else json.dumps(message, separators=(",", ":")).encode()


def _outward_message(message: dict[str, Any], backend: str, entry: VirtualBackend | None) -> dict[str, Any]:
    """A backend's request or notification as the agent must see it: a request's id namespaced,
    resource URIs prefixed (anything else unchanged)."""
    if not isinstance(message.get("method"), str):
        return message
    changed = dict(message)
    if "id" in message and message["id"] is not None:
        changed["id"] = aggregate.wrap_id(backend, message["id"])
    params = message.get("params")
    if entry is not None and message["method"] == "notifications/resources/updated" and isinstance(params, dict):
        uri = params.get("uri")
        if isinstance(uri, str):
            changed["params"] = {**params, "uri": aggregate.outward(entry, "resources/list", uri)}
    return changed


def _outward_event(raw: bytes, data: str, backend: str, entry: VirtualBackend | None) -> bytes:
    """An SSE event as the agent must see it (:func:`_outward_message`), else as it came."""
    message = event_message(data)
    if not isinstance(message, dict):
        return raw
    changed = _outward_message(message, backend, entry)
    if changed == message:
        return raw
    head = b"".join(line + b"\n" for line in raw.splitlines() if line and not line.startswith(b"data:"))
    return head + b"data: " + json.dumps(changed, separators=(",", ":")).encode() + b"\n\n"


def _merged_event(raw: bytes, entry: VirtualBackend) -> bytes:
    """A backend's SSE event as the client's merged stream carries it: ids of server requests
    namespaced, resource URIs prefixed, the backend's event ids and retry hints dropped (they
    mean nothing across backends)."""
    decoder = SseDecoder(max_event_bytes=len(raw) + 2)
    out = bytearray()
    for event in [*decoder.feed(raw if raw.endswith(b"\n\n") else raw + b"\n\n"), *decoder.finish()]:
        if not event.data:
            continue
        outward = _outward_event(event.raw, event.data, entry.name, entry)
        lines = [line for line in outward.splitlines() if line and not line.startswith((b"id:", b"retry:"))]
        out += b"".join(line + b"\n" for line in lines) + b"\n"
    return bytes(out)


_ACKNOWLEDGED: Final = "notifications/subscriptions/acknowledged"
_LIST_CHANGED_FLAGS: Final = ("toolsListChanged", "promptsListChanged", "resourcesListChanged")
_SUBSCRIPTION_ID: Final = "io.modelcontextprotocol/subscriptionId"


async def _pump(
    entry: VirtualBackend, reply: httpx.Response, queue: asyncio.Queue[tuple[VirtualBackend, dict[str, Any] | None]]
) -> None:
    """Every JSON-RPC message of one backend's listen stream onto ``queue``; ``None`` when it ends."""
    decoder = SseDecoder()
    try:
        async for chunk in reply.aiter_raw():
            for event in decoder.feed(chunk):
                message = event_message(event.data)
                if isinstance(message, dict):
                    await queue.put((entry, message))
    except (httpx.HTTPError, SseTooLarge) as exc:
        log.info("listen stream of %r ended: %s", entry.name, type(exc).__name__)
    await queue.put((entry, None))


def _acknowledged(note: dict[str, Any] | None) -> Any:
    """What an acknowledgement says a backend honors (``None`` for a stream that ended, or any
    other shape: a hostile ``params`` honors nothing)."""
    params = note.get("params") if note is not None else None
    return params.get("notifications") if isinstance(params, dict) else None


def _honor(honored: dict[str, Any], entry: VirtualBackend, part: Any) -> None:
    """Add what one backend acknowledged to the merged acknowledgement (its resource URIs prefixed)."""
    if not isinstance(part, dict):
        return
    for flag in _LIST_CHANGED_FLAGS:
        if part.get(flag) is True:
            honored[flag] = True
    uris = part.get("resourceSubscriptions")
    if isinstance(uris, list):
        outward = [aggregate.outward(entry, "resources/list", u) for u in uris if isinstance(u, str)]
        honored.setdefault("resourceSubscriptions", []).extend(outward)


def _stamped(note: dict[str, Any], client_id: Any) -> bytes:
    """``note`` as an SSE event of the client's listen stream: its ``_meta`` names the client's subscription."""
    found = note.get("params")
    params: dict[str, Any] = found if isinstance(found, dict) else {}
    given = params.get("_meta")
    meta: dict[str, Any] = given if isinstance(given, dict) else {}
    stamped = {**note, "params": {**params, "_meta": {**meta, _SUBSCRIPTION_ID: client_id}}}
    return b"data: " + json.dumps(stamped, separators=(",", ":")).encode() + b"\n\n"


def _no_get(virtual: MCPVirtualServer) -> Deny:
    return Deny(
        status=405,
        code=METHOD_NOT_FOUND,
        message=f"virtual server {virtual.name!r} offers no standalone GET stream here; POST requests to it",
        reason="virtual_no_get",
        headers={"allow": "POST, DELETE"},
    )


def _declared_tools(server: MCPServer) -> set[str]:
    """The tool names ``server``'s resource names outright (no glob)."""
    literal = {n for n in server.spec.allowed_tools if not any(c in n for c in "*?[")}
    return literal | set(server.spec.pinned_tools)


def _server_info(virtual: MCPVirtualServer) -> dict[str, str]:
    return {"name": virtual.name, "title": f"{virtual.name} (mcp-extproc virtual server)", "version": "1"}


def _passed_on(status: int, error: dict[str, Any] | None) -> Deny:
    """A backend's JSON-RPC refusal, passed on as it is (the client's request was at fault)."""
    error = error or {}
    code = error.get("code")
    return Deny(
        status=status if 400 <= status < 600 else 0,
        code=code if isinstance(code, int) and not isinstance(code, bool) else INTERNAL_ERROR,
        message=str(error.get("message", "refused")),
        data=error.get("data"),
        reason="virtual_backend_refused",
    )


def _result(message: Message, result: Any, *, headers: dict[str, str] | None = None, reason: str = "virtual") -> Answer:
    body = json.dumps({"jsonrpc": "2.0", "id": message.id, "result": result}, separators=(",", ":")).encode()
    return Answer(body=body, headers={"content-type": "application/json", **(headers or {})}, reason=reason)


_WHY: Final[dict[str, str]] = {
    "ended": "the session was ended with DELETE",
    "malformed": "it is not a session id this gateway issued",
    "unknown_key": "it was signed with a key this gateway no longer has",
    "bad_signature": "its signature does not verify",
    "expired": "it has expired",
    "other_server": "it belongs to another server",
    "session_principal_mismatch": "it belongs to another caller",
}


def _lost_session(virtual: MCPVirtualServer, reason: str) -> Deny:
    why = _WHY.get(reason, reason)
    return Deny(
        status=404,
        code=INVALID_REQUEST,
        message=f"session not found: this Mcp-Session-Id is not valid for virtual server {virtual.name!r} ({why}); "
        "send initialize to start a session",
        reason=reason,
    )


def _unavailable(virtual: MCPVirtualServer, server: MCPServer, why: str) -> Deny:
    return Deny(
        status=200,
        code=INTERNAL_ERROR,
        message=f"MCP server {server.name!r} behind virtual server {virtual.name!r} is unavailable: {why}",
        reason="virtual_backend_unavailable",
    )
