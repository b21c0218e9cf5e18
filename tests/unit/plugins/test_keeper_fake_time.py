"""The session keeper on fake time, against a fake upstream (httpx.MockTransport).

Time is a :class:`FakeClock` passed to the keeper: ``sleep`` records the delay asked for
and either moves virtual time on at once (``auto``) or waits until the test calls
:meth:`FakeClock.advance`. Nothing here waits on the wall clock: the ``no_real_sleep``
fixture fails a test that reaches ``asyncio.sleep`` with a positive delay or ``time.sleep``.

The upstream is the HTTP side of a heartbeating MCP server: each GET gets the next
scripted reply (a status, a transport error, or an SSE stream that may stay open), and
POSTed ping answers are recorded. The real heartbeat server, through Envoy, is
tests/integration/test_keepalive.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import httpx
import pytest
from prometheus_client import CollectorRegistry

from plugins.lib.keeper import Clock, KeeperMetrics, KeeperSettings, SessionKeeper

URL = "http://upstream.test/mcp"
VERSION = "2025-06-18"
_real_sleep = asyncio.sleep  # captured before no_real_sleep patches asyncio.sleep


@pytest.fixture(autouse=True)
def no_real_sleep(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail the test if anything waits on the wall clock (asyncio.sleep > 0, time.sleep)."""
    waited: list[float] = []

    async def guarded(delay: float, result: Any = None) -> Any:
        if delay > 0:
            waited.append(delay)
        return await _real_sleep(0, result)

    def forbidden(delay: float) -> None:
        waited.append(delay)

    monkeypatch.setattr(asyncio, "sleep", guarded)
    monkeypatch.setattr(time, "sleep", forbidden)
    yield
    assert waited == [], f"real sleeps of {waited} s: pass the fake clock"


class FakeClock:
    """Virtual time for :class:`~plugins.lib.keeper.Clock`.

    Attributes:
        t: the current virtual time.
        sleeps: every delay asked of :meth:`sleep`, in order.
        jitters: every ``(low, high)`` asked of :meth:`jitter`; it answers the midpoint.
    """

    def __init__(self, *, auto: bool = True, start: float = 1000.0) -> None:
        self.t = start
        self.auto = auto
        self.sleeps: list[float] = []
        self.jitters: list[tuple[float, float]] = []
        self._waiting: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.auto:
            self.t += seconds
            await _real_sleep(0)
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((self.t + seconds, wake))
        await wake

    def jitter(self, low: float, high: float) -> float:
        self.jitters.append((low, high))
        return (low + high) / 2

    @property
    def sleeping(self) -> int:
        """How many sleepers wait for :meth:`advance` (manual clocks)."""
        return sum(1 for _, wake in self._waiting if not wake.done())

    async def advance(self, seconds: float) -> None:
        """Move time on and wake the sleepers that are due."""
        self.t += seconds
        for due, wake in list(self._waiting):
            if due <= self.t or wake.done():
                self._waiting.remove((due, wake))
                if not wake.done():
                    wake.set_result(None)
        await settle()


async def settle(until: Callable[[], bool] = lambda: False, what: str = "") -> None:
    """Let the event loop run (no time passes); with ``until``, until it holds."""
    for _ in range(500):
        if until():
            return
        await _real_sleep(0)
    assert not what, f"never happened: {what}"


def _event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(message).encode() + b"\n\n"


def ping(id_: object) -> bytes:
    return _event({"jsonrpc": "2.0", "id": id_, "method": "ping"})


@dataclass
class Stream:
    """A 200 SSE reply: these events, then the stream stays open (``hold``) or ends,
    ``lasted`` virtual seconds after it opened."""

    events: list[bytes] = field(default_factory=list)
    hold: bool = True
    lasted: float = 0.0


class Fail:
    """A transport error (connection refused)."""


Step: TypeAlias = int | Stream | Fail


class Upstream:
    """The fake MCP server: scripted GET replies (then ``then``), recorded GETs and POSTs."""

    def __init__(self, *script: Step, then: Step | None = None) -> None:
        self.script = list(script)
        self.then: Step = then if then is not None else Stream()
        self.gets: list[httpx.Request] = []
        self.posts: list[httpx.Request] = []
        self.open = 0
        self.transport = httpx.MockTransport(self.handle)
        self.clock: FakeClock | None = None
        """Advanced by a stream's ``lasted``, when set."""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.posts.append(request)
            return httpx.Response(202)
        self.gets.append(request)
        step = self.script.pop(0) if self.script else self.then
        if isinstance(step, Fail):
            raise httpx.ConnectError("connection refused", request=request)
        if isinstance(step, int):
            return httpx.Response(step)
        if self.clock is not None:
            self.clock.t += step.lasted
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self._sse(step))

    async def _sse(self, stream: Stream) -> AsyncIterator[bytes]:
        self.open += 1
        try:
            for event in stream.events:
                yield event
            if stream.hold:
                await asyncio.get_running_loop().create_future()  # until the keeper closes it
        finally:
            self.open -= 1


def answered(upstream: Upstream) -> list[bytes]:
    return [request.content for request in upstream.posts]


class Metrics:
    """The keeper's Prometheus registry, read back."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def __call__(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)


@asynccontextmanager
async def keeper_of(upstream: Upstream, clock: Clock, **settings: Any) -> AsyncIterator[tuple[SessionKeeper, Metrics]]:
    client = httpx.AsyncClient(transport=upstream.transport)
    metrics = Metrics()
    keeper = SessionKeeper(KeeperSettings(**settings), KeeperMetrics(metrics.registry), client, clock=clock)
    assert keeper.clock is clock
    try:
        yield keeper, metrics
    finally:
        await keeper.close()
        await client.aclose()


def credential_source() -> tuple[list[str], Callable[[], Any]]:
    """An upstream credential that changes on every fetch (as a refreshed token would)."""
    issued: list[str] = []

    async def credential() -> dict[str, str]:
        issued.append(f"up-{len(issued) + 1}")
        return {"authorization": f"Bearer {issued[-1]}"}

    return issued, credential


async def test_pings_are_answered_server_requests_refused_and_notifications_kept_for_the_agent() -> None:
    sampling = _event({"jsonrpc": "2.0", "id": "s-1", "method": "sampling/createMessage", "params": {}})
    note = _event({"jsonrpc": "2.0", "method": "notifications/message", "params": {}})
    upstream = Upstream(Stream([ping("p-1"), sampling, note, b": keepalive\n\n", ping(7)]))
    clock = FakeClock()
    issued, credential = credential_source()
    async with keeper_of(upstream, clock) as (keeper, metric):
        keeper.keep("demo", URL, "sess-1", VERSION, credential)
        await settle(lambda: len(upstream.posts) == 3, "both pings answered, the sampling request refused")
        await settle()
        (get,) = upstream.gets
        assert get.url == URL
        assert get.headers["mcp-session-id"] == "sess-1"
        assert get.headers["mcp-protocol-version"] == VERSION
        assert get.headers["authorization"] == "Bearer up-1"
        assert get.headers["accept"] == "text/event-stream"
        # Pings get a result with the same id; the sampling request, which the agent cannot
        # see while the keeper holds the stream, an error at once (the tool fails fast).
        refusal, message = answered(upstream)[1], "the agent is not connected to this session's stream"
        assert answered(upstream) == [
            b'{"jsonrpc":"2.0","id":"p-1","result":{}}',
            refusal,
            b'{"jsonrpc":"2.0","id":7,"result":{}}',
        ]
        assert json.loads(refusal)["id"] == "s-1" and message in json.loads(refusal)["error"]["message"]
        # The notification is kept for the agent's next GET, byte for byte; the comment is not.
        assert keeper.take_pending("demo", "sess-1") == [note] and keeper.take_pending("demo", "sess-1") == []
        assert metric("mcp_extproc_keeper_messages_total", server="demo", outcome="kept") == 1
        assert metric("mcp_extproc_keeper_messages_total", server="demo", outcome="refused_request") == 1
        for number, post in enumerate(upstream.posts, start=2):
            assert post.url == URL
            assert post.headers["mcp-session-id"] == "sess-1"
            assert post.headers["mcp-protocol-version"] == VERSION
            assert post.headers["authorization"] == f"Bearer up-{number}"  # fetched again: may have been refreshed
            assert post.headers["content-type"] == "application/json"
        assert issued == ["up-1", "up-2", "up-3", "up-4"]
        assert metric("mcp_extproc_keeper_pings_answered_total", server="demo") == 2
        assert metric("mcp_extproc_keeper_streams") == 1 and upstream.open == 1
        assert clock.sleeps == []  # held, never reconnected


@pytest.mark.parametrize(("status", "reason"), [(404, "lost"), (405, "no_get")])
async def test_a_404_or_405_on_the_get_stops_keeping_the_session(status: int, reason: str) -> None:
    upstream = Upstream(status)
    clock = FakeClock()
    async with keeper_of(upstream, clock) as (keeper, metric):
        keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: keeper.get("demo", "sess-1") is None, "session forgotten")
        assert len(upstream.gets) == 1 and clock.sleeps == []  # no retry
        assert "authorization" not in upstream.gets[0].headers  # no credential configured
        assert metric("mcp_extproc_keeper_sessions_stopped_total", reason=reason) == 1
        assert metric("mcp_extproc_keeper_sessions") == 0
        assert (metric("mcp_extproc_keeper_sessions_lost_total", server="demo") or 0) == (status == 404)
        assert ("demo" in keeper.no_get_servers) is (status == 405)


async def test_errors_reconnect_with_jittered_doubling_backoff_bounded_by_backoff_max_s() -> None:
    upstream = Upstream(Fail(), 503, Fail(), 500, Fail(), Stream(hold=False, lasted=2.0), 404)
    clock = FakeClock()
    upstream.clock = clock
    async with keeper_of(upstream, clock, backoff_initial_s=1.0, backoff_max_s=5.0) as (keeper, metric):
        keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: keeper.get("demo", "sess-1") is None, "stopped by the final 404")
        assert len(upstream.gets) == 7
        # Full jitter over a doubling delay capped at 5 s; a stream that stayed open (200, 2 s) resets it.
        assert clock.jitters == [(0, 1.0), (0, 2.0), (0, 4.0), (0, 5.0), (0, 5.0), (0, 1.0)]
        assert clock.sleeps == [0.5, 1.0, 2.0, 2.5, 2.5, 0.5]  # what jitter answered, slept as is
        assert metric("mcp_extproc_keeper_reconnects_total", server="demo") == 6


async def test_a_stream_that_ends_at_once_every_time_backs_off_instead_of_spinning() -> None:
    upstream = Upstream(*[Stream(hold=False) for _ in range(5)], 404)
    clock = FakeClock()
    upstream.clock = clock
    async with keeper_of(upstream, clock, backoff_initial_s=1.0, backoff_max_s=5.0) as (keeper, _metric):
        keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: keeper.get("demo", "sess-1") is None, "stopped by the final 404")
        assert clock.jitters == [(0, 1.0), (0, 2.0), (0, 4.0), (0, 5.0), (0, 5.0)]


async def test_a_get_answered_with_json_is_no_stream_and_stops_keeping() -> None:
    class JsonGet(Upstream):
        async def handle(self, request: httpx.Request) -> httpx.Response:
            if request.method == "GET":
                self.gets.append(request)
                return httpx.Response(200, json={"jsonrpc": "2.0", "id": 1, "result": {}})
            return await super().handle(request)

    upstream = JsonGet()
    clock = FakeClock()
    async with keeper_of(upstream, clock) as (keeper, metric):
        keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: keeper.get("demo", "sess-1") is None, "session forgotten")
        assert len(upstream.gets) == 1 and clock.sleeps == []
        assert metric("mcp_extproc_keeper_sessions_stopped_total", reason="no_get") == 1
        assert "demo" in keeper.no_get_servers


async def test_a_409_stands_by_retrying_every_standby_s_and_at_the_sessions_next_request() -> None:
    """409: another process (a replica) holds the stream. No doubling backoff: the holder may die."""
    upstream = Upstream(409, 409, 409, then=Stream())
    clock = FakeClock(auto=False)
    async with keeper_of(upstream, clock, standby_s=4.0, backoff_max_s=30.0) as (keeper, metric):
        keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: clock.sleeping == 1, "standing by after the first 409")
        assert clock.jitters == [(2.0, 4.0)] and clock.sleeps == [3.0]
        await clock.advance(3.0)
        await settle(lambda: len(upstream.gets) == 2 and clock.sleeping == 1, "second 409, standing by again")
        assert clock.sleeps == [3.0, 3.0]  # never more than standby_s, however often
        keeper.touch("demo", "sess-1")  # the agent's next request: try again now, not in 3 s
        await settle(lambda: len(upstream.gets) == 3, "retried at the request")
        await settle(lambda: clock.sleeping == 1, "third 409")
        await clock.advance(3.0)
        await settle(lambda: upstream.open == 1, "the holder is gone: the stream is ours")
        assert len(upstream.gets) == 4 and metric("mcp_extproc_keeper_streams") == 1
        assert (metric("mcp_extproc_keeper_reconnects_total", server="demo") or 0) == 0


async def test_a_reconnecting_session_not_used_for_idle_timeout_s_stops_itself() -> None:
    upstream = Upstream(then=503)
    clock = FakeClock()
    async with keeper_of(upstream, clock, idle_timeout_s=10.0, backoff_initial_s=4.0, backoff_max_s=4.0) as (
        keeper,
        metric,
    ):
        keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: keeper.get("demo", "sess-1") is None, "stopped as idle")
        # GETs at t=0, 2, ..., 12 s after its last use; past 10 s idle it gives up.
        assert len(upstream.gets) == 7 and clock.sleeps == [2.0] * 6 and clock.now() == 1012.0
        assert metric("mcp_extproc_keeper_sessions_stopped_total", reason="idle") == 1


async def test_the_sweeper_stops_sessions_not_used_for_idle_timeout_s() -> None:
    upstream = Upstream()
    clock = FakeClock(auto=False)
    async with keeper_of(upstream, clock, idle_timeout_s=100.0) as (keeper, metric):
        keeper.keep("demo", URL, "idle", VERSION, None)
        keeper.keep("demo", URL, "agent-holds-it", VERSION, None)
        await settle(lambda: upstream.open == 2, "both streams held")
        await keeper.step_aside("demo", "agent-holds-it")  # the agent holds its own stream: never idle
        sweeper = asyncio.create_task(keeper.sweep())
        try:
            await settle(lambda: clock.sleeping == 1, "sweeper asleep")
            assert clock.sleeps == [25.0]  # a quarter of the idle timeout
            await clock.advance(50.0)
            keeper.touch("demo", "idle")  # used at t+50: expiry pushed back
            for _ in range(4):  # t+150: 100 s unused, not more
                await clock.advance(25.0)
            assert keeper.get("demo", "idle") is not None and upstream.open == 1
            await clock.advance(25.0)
            await settle(lambda: keeper.get("demo", "idle") is None, "idle session stopped")
            assert upstream.open == 0  # its GET stream was closed
            assert keeper.get("demo", "agent-holds-it") is not None
            assert metric("mcp_extproc_keeper_sessions_stopped_total", reason="idle") == 1
        finally:
            sweeper.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sweeper


async def test_step_aside_closes_the_keepers_stream_and_take_over_reopens_it() -> None:
    upstream = Upstream()
    clock = FakeClock()
    async with keeper_of(upstream, clock) as (keeper, metric):
        kept = keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: upstream.open == 1, "stream held")
        await keeper.step_aside("demo", "sess-1")
        assert upstream.open == 0 and kept.task is None  # closed before the agent's GET goes on
        await keeper.step_aside("demo", "sess-1")  # a second agent stream
        keeper.keep("demo", URL, "sess-1", "2025-11-25", None)  # used meanwhile: no GET of ours
        keeper.take_over("demo", "sess-1")
        await settle()
        assert kept.agent_streams == 1 and kept.task is None and len(upstream.gets) == 1
        keeper.take_over("demo", "sess-1")  # the last agent stream ended
        await settle(lambda: upstream.open == 1, "stream reopened")
        assert len(upstream.gets) == 2 and upstream.gets[1].headers["mcp-protocol-version"] == "2025-11-25"
        assert clock.sleeps == []  # taken over at once, no backoff
        await keeper.stop("demo", "sess-1", "delete")
        assert upstream.open == 0 and keeper.get("demo", "sess-1") is None
        keeper.take_over("demo", "sess-1")  # a stopped session stays stopped
        await keeper.step_aside("demo", "unknown")
        await settle()
        assert len(upstream.gets) == 2
        assert metric("mcp_extproc_keeper_sessions_stopped_total", reason="delete") == 1


async def test_a_listener_gets_the_kept_events_then_every_event_but_pings_and_can_refuse() -> None:
    """A virtual server's client stream: server requests and notifications go to the listener,
    pings are still answered here; a listener that refuses a request leaves it to the keeper."""
    first = _event({"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "before"}})
    upstream = Upstream(Stream([first]))
    clock = FakeClock()
    async with keeper_of(upstream, clock) as (keeper, metric):
        keeper.keep("demo", URL, "sess-1", VERSION, None)
        await settle(lambda: metric("mcp_extproc_keeper_messages_total", server="demo", outcome="kept") == 1, "kept")
        heard: list[bytes] = []
        full = False

        def listener(raw: bytes) -> bool:
            if full:
                return False
            heard.append(raw)
            return True

        assert keeper.listen("demo", "sess-1", listener)
        assert len(heard) == 1 and b"before" in heard[0]  # what was kept, first
        kept = keeper.get("demo", "sess-1")
        assert kept is not None
        elicit = {"jsonrpc": "2.0", "id": "e-1", "method": "elicitation/create", "params": {}}
        reply = _sse_reply(ping("p-1") + _event(elicit) + _event({"jsonrpc": "2.0", "method": "notifications/x"}))
        await keeper._read(kept, reply)  # the same reader the GET stream feeds
        assert [b"e-1" in h for h in heard[1:]] == [True, False]
        assert answered(upstream) == [b'{"jsonrpc":"2.0","id":"p-1","result":{}}']  # only the ping
        full = True
        await keeper._read(kept, _sse_reply(_event({**elicit, "id": "e-2"})))
        assert b'"id":"e-2"' in answered(upstream)[-1] and b"error" in answered(upstream)[-1]  # refused
        keeper.unlisten("demo", "sess-1", listener)
        await keeper._read(kept, _sse_reply(first))
        assert len(heard) == 3 and len(kept.pending) == 1  # kept again, not heard
    assert not keeper.listen("demo", "gone", listener)


def _sse_reply(data: bytes) -> httpx.Response:
    """An SSE response not yet read (as the keeper's GET stream hands it to its reader)."""
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=httpx.ByteStream(data))
