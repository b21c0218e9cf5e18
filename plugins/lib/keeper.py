"""The session keeper: answer a stateful MCP server's pings while the agent cannot.

Heartbeating servers (Playwright MCP: a ping about every 3 s, the session closed
when one goes unanswered for 5 s) send their pings on the session's standalone GET
stream. An agent that never opens that stream, or whose stream a proxy dropped,
never answers, and the server reaps the session. The keeper holds the stream for it.

Data flow, one asyncio task per kept session (none while the agent holds its own
stream)::

    start(session) ─▶ task: GET upstream url (Mcp-Session-Id, MCP-Protocol-Version,
                            the upstream credential)
                        200 ─▶ read SSE events (bounded) ─▶
                               {"method": "ping", "id": X}
                                 ─▶ POST {"jsonrpc":"2.0","id":X,"result":{}} (same headers)
                               another request (elicitation, sampling, roots: the agent
                               cannot see it) ─▶ POST an error answer at once, so the tool
                                 that asked fails fast instead of hanging
                               anything else (notifications) ─▶ kept for the agent
                                 (at most max_pending events of max_pending_bytes each;
                                 overflow counted and logged), handed to its next GET
                        404 / 405 ─▶ stop (session gone / server has no GET stream)
                        409 ─▶ another process (a replica) holds the stream: stand by,
                               retry every standby_s and at the session's next request
                        errors, stream ended ─▶ reconnect after a jittered backoff
    agent opens its own GET ─▶ step_aside: cancel the task (its GET is closed first, so
                               the server sees one stream at a time); take_pending
                               gives the kept messages to that stream
    agent's GET ends        ─▶ take_over: start a new task
    listen(listener)        ─▶ every event but pings (server requests too) goes to the
                               listener instead (a virtual server's merged client stream,
                               plugins.virtual); it refuses one: handled as above; unlisten
    DELETE, idle expiry     ─▶ stop

Pings on the agent's own stream are answered here too (answer_ping, called by the
``session`` stage), so a ping is never lost because the agent's stream closed. The
keeper never sends anything but GETs, ping answers and refusals of server requests:
an agent's call is never replayed. With tracing on, each GET and each answer is a root
span of its own (``keeper stream``, ``keeper ping answer``), linked to the exchange that
began keeping the session; its ``traceparent`` goes upstream.

Idle expiry and the reconnect backoff read time from a :class:`Clock`
(:class:`SystemClock` unless one is passed), so tests run them on fake time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge

from extproc import tracing
from extproc.mcp.headers import MCP_PROTOCOL_VERSION, MCP_SESSION_ID
from extproc.mcp.spec import INTERNAL_ERROR
from extproc.mcp.sse import SseDecoder, SseTooLarge

STEADY_STREAM_S: Final = 1.0
"""A GET stream open at least this long counts as held: the reconnect backoff starts over."""

log = logging.getLogger("mcp_extproc.keeper")

CredentialProvider = Callable[[], Awaitable[dict[str, str]]]

MAX_EVENT_BYTES: Final = 1024 * 1024
"""Largest SSE event the keeper reads; a bigger one drops the stream (and reconnects)."""

UNSEEN_REQUEST: Final = (
    "the agent is not connected to this session's stream, so it cannot answer; mcp-extproc answered for it"
)
"""The error message of a server request the keeper refuses for the agent."""


class Clock(Protocol):
    """Where the keeper's time comes from: :class:`SystemClock` in production, a fake in tests."""

    def now(self) -> float:
        """Seconds on a monotonic clock."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...

    def jitter(self, low: float, high: float) -> float:
        """A random delay in ``[low, high]``."""
        ...


class SystemClock:
    """The real clock: ``time.monotonic``, ``asyncio.sleep``, ``random.uniform``."""

    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def jitter(self, low: float, high: float) -> float:
        return random.uniform(low, high)  # noqa: S311 - jitter, not crypto


@dataclass(frozen=True)
class KeeperSettings:
    """How the keeper behaves.

    Attributes:
        idle_timeout_s: stop keeping a session the agent has not used for this long.
        backoff_initial_s / backoff_max_s: reconnect delays (full jitter, doubling).
        request_timeout_s: connect/write timeout of the keeper's requests (reads on the
            GET stream never time out: a quiet stream is fine).
        standby_s: how often to retry a stream another process holds (409).
        max_pending / max_pending_bytes: bound on the messages kept for the agent per
            session (count, and size of each); what does not fit is counted and logged.
    """

    idle_timeout_s: float = 1800.0
    backoff_initial_s: float = 0.2
    backoff_max_s: float = 30.0
    request_timeout_s: float = 10.0
    standby_s: float = 3.0
    max_pending: int = 256
    max_pending_bytes: int = 64 * 1024


@dataclass(eq=False)
class KeptSession:
    """One session the keeper looks after."""

    server: str
    url: str
    session_id: str
    protocol_version: str | None = None
    credential: CredentialProvider | None = None
    last_used: float = field(default_factory=time.monotonic)
    agent_streams: int = 0
    task: asyncio.Task[None] | None = None
    stopped: bool = False
    idle_timeout_s: float | None = None
    """This session's idle timeout (its server's), else the keeper's."""
    standby: bool = False
    """Another process holds the stream (the last GET got 409)."""
    pending: deque[bytes] = field(default_factory=deque)
    """SSE events for the agent, received while the keeper held the stream."""
    link: object | None = None
    """With tracing on: the span of the exchange that began keeping it (the keeper's spans link to it)."""
    listener: Callable[[bytes], bool] | None = None
    """Takes every event of the stream but pings (server requests included) instead of the keeper:
    a virtual server's client stream (:meth:`SessionKeeper.listen`); False: it could not."""


class KeeperMetrics:
    """The keeper's Prometheus metrics."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.kept = Gauge(
            "mcp_extproc_keeper_sessions", "Legacy MCP sessions the keeper looks after.", registry=registry
        )
        self.holding = Gauge(
            "mcp_extproc_keeper_streams", "GET streams the keeper holds open right now.", registry=registry
        )
        self.pings = Counter(
            "mcp_extproc_keeper_pings_answered", "Server pings the keeper answered.", ["server"], registry=registry
        )
        self.reconnects = Counter(
            "mcp_extproc_keeper_reconnects", "GET streams the keeper had to reopen.", ["server"], registry=registry
        )
        self.lost = Counter(
            "mcp_extproc_keeper_sessions_lost",
            "Kept sessions the upstream no longer knows (404 on the keeper's GET).",
            ["server"],
            registry=registry,
        )
        self.stopped = Counter(
            "mcp_extproc_keeper_sessions_stopped",
            "Sessions the keeper stopped keeping, by reason.",
            ["reason"],
            registry=registry,
        )
        self.messages = Counter(
            "mcp_extproc_keeper_messages",
            "Messages the upstream sent on a stream the keeper held, by outcome "
            "(kept, delivered, overflow, too_large, refused_request, lost).",
            ["server", "outcome"],
            registry=registry,
        )


class SessionKeeper:
    """Keeps legacy MCP sessions alive; one task per session at most.

    Two HTTP clients: ``streams`` holds one long GET per kept session, ``answers``
    sends the ping answers. Apart because httpcore looks for a free connection by
    scanning its pool: with the answers in the pool of 1,000 held streams, every
    answer scanned 1,000 connections. ``clock`` is where idle expiry and reconnect
    backoff get their time (the real one unless a test passes a fake).
    """

    def __init__(
        self,
        settings: KeeperSettings,
        metrics: KeeperMetrics,
        streams: httpx.AsyncClient,
        answers: httpx.AsyncClient | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.metrics = metrics
        self.client = streams
        self.answers = answers or streams
        self.sessions: dict[tuple[str, str], KeptSession] = {}
        self.no_get_servers: set[str] = set()
        """Servers that answered the keeper's GET with 405 (they offer no standalone stream)."""

    def get(self, server: str, session_id: str) -> KeptSession | None:
        """The kept session, if any."""
        return self.sessions.get((server, session_id))

    def keep(
        self,
        server: str,
        url: str,
        session_id: str,
        protocol_version: str | None,
        credential: CredentialProvider | None,
        idle_timeout_s: float | None = None,
    ) -> KeptSession:
        """Start keeping a session (or refresh what we know of it); returns it."""
        key = (server, session_id)
        kept = self.sessions.get(key)
        if kept is None:
            kept = KeptSession(server, url, session_id, last_used=self.clock.now(), link=tracing.link_here())
            self.sessions[key] = kept
            self.metrics.kept.inc()
        kept.last_used = self.clock.now()
        if protocol_version:
            kept.protocol_version = protocol_version
        if credential is not None:
            kept.credential = credential
        if idle_timeout_s is not None:
            kept.idle_timeout_s = idle_timeout_s
        if kept.task is None and kept.agent_streams == 0:
            self._start(kept)
        else:
            self._wake(kept)
        return kept

    def touch(self, server: str, session_id: str, protocol_version: str | None = None) -> None:
        """The agent used the session: push back idle expiry; retry a stream held elsewhere now."""
        kept = self.get(server, session_id)
        if kept is not None:
            kept.last_used = self.clock.now()
            if protocol_version:
                kept.protocol_version = protocol_version
            self._wake(kept)

    def _wake(self, kept: KeptSession) -> None:
        """A standing-by session retries its GET at once (its holder may be gone)."""
        if kept.standby and kept.task is not None and kept.agent_streams == 0:
            kept.task.cancel()
            kept.task = None
            kept.standby = False
            self._start(kept)

    async def step_aside(self, server: str, session_id: str) -> None:
        """The agent opens its own GET stream: close ours first and stay away until it ends."""
        kept = self.get(server, session_id)
        if kept is None:
            return
        kept.agent_streams += 1
        kept.last_used = self.clock.now()
        await self._cancel(kept)

    def take_over(self, server: str, session_id: str) -> None:
        """One of the agent's GET streams ended: hold the stream again when none is left."""
        kept = self.get(server, session_id)
        if kept is None:
            return
        kept.agent_streams = max(0, kept.agent_streams - 1)
        kept.last_used = self.clock.now()
        if kept.agent_streams == 0 and kept.task is None and not kept.stopped:
            self._start(kept)

    def listen(self, server: str, session_id: str, listener: Callable[[bytes], bool]) -> bool:
        """Hand the events of a kept session's stream to ``listener`` (the kept ones first), until
        :meth:`unlisten`; pings are still answered here. False: the session is not kept."""
        kept = self.sessions.get((server, session_id))
        if kept is None or kept.stopped:
            return False
        kept.listener = listener
        while kept.pending:
            if not listener(kept.pending.popleft()):
                break
        self._wake(kept)
        return True

    def unlisten(self, server: str, session_id: str, listener: Callable[[bytes], bool]) -> None:
        """Keep the session's events (and refuse its requests) again, as before :meth:`listen`."""
        kept = self.sessions.get((server, session_id))
        if kept is not None and kept.listener is listener:
            kept.listener = None

    def take_pending(self, server: str, session_id: str) -> list[bytes]:
        """The SSE events kept for the agent, handed to its stream (see :meth:`give_back`)."""
        kept = self.get(server, session_id)
        if kept is None or not kept.pending:
            return []
        events = list(kept.pending)
        kept.pending.clear()
        return events

    def give_back(self, server: str, session_id: str, events: list[bytes]) -> None:
        """Events taken for an agent stream that ended before it sent them: keep them again."""
        kept = self.get(server, session_id)
        if kept is None:
            self.metrics.messages.labels(server, "lost").inc(len(events))
            return
        kept.pending.extendleft(reversed(events))

    def delivered(self, server: str, count: int) -> None:
        """``count`` kept events went out on the agent's stream."""
        self.metrics.messages.labels(server, "delivered").inc(count)

    async def stop(self, server: str, session_id: str, reason: str) -> None:
        """Stop keeping a session and forget it (DELETE, upstream 404, idle expiry)."""
        kept = self.sessions.pop((server, session_id), None)
        if kept is None:
            return
        kept.stopped = True
        self.metrics.kept.dec()
        self.metrics.stopped.labels(reason).inc()
        if kept.pending:
            self.metrics.messages.labels(server, "lost").inc(len(kept.pending))
            log.warning(
                "%d kept messages of a session of %r were never delivered (%s)", len(kept.pending), server, reason
            )
        await self._cancel(kept)
        log.info("stopped keeping a session of %r (%s)", server, reason)

    def _idle(self, kept: KeptSession) -> float:
        return kept.idle_timeout_s if kept.idle_timeout_s is not None else self.settings.idle_timeout_s

    async def sweep(self) -> None:
        """Forever: stop keeping sessions idle for longer than their idle timeout (one task for all)."""
        while True:
            shortest = min((self._idle(k) for k in self.sessions.values()), default=self.settings.idle_timeout_s)
            await self.clock.sleep(max(0.5, min(60.0, shortest / 4)))
            now = self.clock.now()
            for kept in list(self.sessions.values()):
                if now - kept.last_used > self._idle(kept) and kept.agent_streams == 0:
                    await self.stop(kept.server, kept.session_id, "idle")

    async def close(self) -> None:
        """Stop every session (server shutdown)."""
        for server, session_id in list(self.sessions):
            await self.stop(server, session_id, "shutdown")

    def _start(self, kept: KeptSession) -> None:
        kept.task = asyncio.create_task(self._run(kept), name=f"keeper:{kept.server}")

    async def _cancel(self, kept: KeptSession) -> None:
        task, kept.task = kept.task, None
        kept.standby = False
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, kept: KeptSession) -> None:
        """Hold the GET stream until told to stop; reconnect with jittered backoff."""
        delay = self.settings.backoff_initial_s
        first = True
        try:
            while not kept.stopped:
                if self.clock.now() - kept.last_used > self._idle(kept):
                    asyncio.get_running_loop().call_soon(self._stop_soon, kept, "idle")
                    return
                if kept.standby:
                    # A replica holds the stream: ask again now and then (and at the next request).
                    await self.clock.sleep(self.clock.jitter(self.settings.standby_s / 2, self.settings.standby_s))
                elif not first:
                    self.metrics.reconnects.labels(kept.server).inc()
                    await self.clock.sleep(self.clock.jitter(0, delay))
                    delay = min(delay * 2, self.settings.backoff_max_s)
                first = False
                opened = self.clock.now()
                with tracing.root_span("keeper stream", kept.link, _span_attributes(kept, "GET")) as span:
                    outcome = await self._hold(kept)
                    span.set_attribute("http.response.status_code", outcome)
                kept.standby = outcome == 409
                if outcome in (404, 405):
                    if outcome == 404:
                        self.metrics.lost.labels(kept.server).inc()
                    else:
                        self.no_get_servers.add(kept.server)
                    asyncio.get_running_loop().call_soon(self._stop_soon, kept, "lost" if outcome == 404 else "no_get")
                    return
                if outcome == 200 and self.clock.now() - opened >= STEADY_STREAM_S:
                    # Only a stream that stayed open resets the backoff: one that ends at
                    # once, every time, must not make the keeper reconnect in a tight loop.
                    delay = self.settings.backoff_initial_s
        finally:
            if kept.task is asyncio.current_task():
                kept.task = None

    def _stop_soon(self, kept: KeptSession, reason: str) -> None:
        if self.sessions.get((kept.server, kept.session_id)) is kept:
            asyncio.get_running_loop().create_task(self.stop(kept.server, kept.session_id, reason))

    async def _headers(self, kept: KeptSession) -> dict[str, str]:
        headers = {MCP_SESSION_ID: kept.session_id}
        if kept.protocol_version:
            headers[MCP_PROTOCOL_VERSION] = kept.protocol_version
        if kept.credential is not None:
            headers.update(await kept.credential())
        tracing.inject(headers)  # the keeper's own span, when tracing is on
        return headers

    async def _hold(self, kept: KeptSession) -> int:
        """One GET stream: the HTTP status it got (200 once it ran), 0 on a transport error."""
        try:
            headers = await self._headers(kept)
        except Exception as exc:  # the credential could not be had (token endpoint down, ...)
            log.warning("keeper: no upstream credential for %r: %s", kept.server, exc)
            return 0
        try:
            async with self.client.stream("GET", kept.url, headers={**headers, "accept": "text/event-stream"}) as reply:
                if reply.status_code != 200:
                    return reply.status_code
                if not reply.headers.get("content-type", "").startswith("text/event-stream"):
                    # Not a stream (the spec allows only SSE or 405): the server offers none.
                    log.info(
                        "keeper: %r answered GET with %r, not a stream", kept.server, reply.headers.get("content-type")
                    )
                    return 405
                self.metrics.holding.inc()
                try:
                    await self._read(kept, reply)
                finally:
                    self.metrics.holding.dec()
                return 200
        except (httpx.HTTPError, SseTooLarge) as exc:
            log.info("keeper: GET stream of %r ended: %s", kept.server, type(exc).__name__)
            return 0

    async def _read(self, kept: KeptSession, reply: httpx.Response) -> None:
        decoder = SseDecoder(max_event_bytes=MAX_EVENT_BYTES)
        async for chunk in reply.aiter_raw():
            for event in decoder.feed(chunk):
                if not event.data:
                    continue
                message = event_message(event.data)
                request = server_request(message)
                if request != "ping" and kept.listener is not None and kept.listener(event.raw):
                    self.metrics.messages.labels(kept.server, "relayed").inc()
                elif request is not None:
                    await self._answer_for_agent(kept, message)
                else:
                    self._keep_for_agent(kept, event.raw)

    async def _answer_for_agent(self, kept: KeptSession, message: dict[str, object]) -> None:
        if message.get("method") == "ping":
            await self.answer_ping(kept, message["id"])
            return
        self.metrics.messages.labels(kept.server, "refused_request").inc()
        log.warning(
            "keeper: refused a %r request of %r: the agent is not on the session's stream",
            message.get("method"),
            kept.server,
        )
        error = {"code": INTERNAL_ERROR, "message": UNSEEN_REQUEST}
        await self._post(kept, {"jsonrpc": "2.0", "id": message["id"], "error": error}, "refusal")

    def _keep_for_agent(self, kept: KeptSession, raw: bytes) -> None:
        settings = self.settings
        if len(raw) > settings.max_pending_bytes:
            outcome = "too_large"
        elif len(kept.pending) >= settings.max_pending:
            outcome = "overflow"
        else:
            kept.pending.append(raw if raw.endswith((b"\n\n", b"\r\n\r\n", b"\r\r")) else raw + b"\n\n")
            self.metrics.messages.labels(kept.server, "kept").inc()
            return
        self.metrics.messages.labels(kept.server, outcome).inc()
        log.warning("keeper: dropped a message of %r for the agent (%s)", kept.server, outcome.replace("_", " "))

    async def answer_ping(self, kept: KeptSession, ping_id: object) -> None:
        """Answer the upstream's ping ``ping_id`` for the agent (from our stream or the agent's)."""
        await self._post(kept, {"jsonrpc": "2.0", "id": ping_id, "result": {}}, "ping answer")

    async def _post(self, kept: KeptSession, message: dict[str, object], what: str) -> None:
        with tracing.root_span(f"keeper {what}", kept.link, _span_attributes(kept, "POST")):
            await self._send(kept, message, what)

    async def _send(self, kept: KeptSession, message: dict[str, object], what: str) -> None:
        body = json.dumps(message, separators=(",", ":"))
        try:
            headers = await self._headers(kept)  # a token may have been refreshed since the GET
            reply = await self.answers.post(
                kept.url,
                content=body,
                headers={
                    **headers,
                    "content-type": "application/json",
                    "accept": "application/json, text/event-stream",
                },
            )
        except Exception as exc:
            log.warning("keeper: the %s to %r could not be sent: %s", what, kept.server, type(exc).__name__)
            return
        if reply.status_code >= 300:
            log.warning("keeper: the %s to %r got HTTP %d", what, kept.server, reply.status_code)
        elif what == "ping answer":
            self.metrics.pings.labels(kept.server).inc()


def _span_attributes(kept: KeptSession, method: str) -> dict[str, tracing.Value] | None:
    """What the keeper's root spans say: the server, and the upstream's session id as a digest."""
    if tracing.ACTIVE is None:
        return None  # tracing off: no digest to compute
    return {
        "mcp_extproc.server.name": kept.server,
        "mcp_extproc.upstream_session.id": tracing.session_digest(kept.session_id),
        "http.request.method": method,
    }


def event_message(data: str) -> Any:
    """An SSE event's data as JSON (``None`` when it is empty or not JSON)."""
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


def server_request(message: object) -> str | None:
    """The method of a JSON-RPC request from the server (it has an id and a method), else ``None``."""
    if not isinstance(message, dict):
        return None
    method = message.get("method")
    return method if isinstance(method, str) and "id" in message else None
