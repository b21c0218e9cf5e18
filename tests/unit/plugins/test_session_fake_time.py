"""The ``session`` stage through the stage harness, its keeper on fake time.

A session (``Mcp-Session-Id`` issued on an ``initialize`` response) belongs to the
principal that opened it: another principal, or an id this gateway never issued, gets
HTTP 404 with JSON-RPC error -32600 and nothing is forwarded. Bindings end when the
agent DELETEs the session, when the upstream answers 404, or when ``maxSessions`` newer
ones push them out (least recently used first); they do not expire with time. What does
expire with time is the keeping: a session unused for ``idleTimeoutSeconds`` is no
longer kept alive, on the fake clock here.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import httpx

from extproc.api import Context, Principal, Stage, StageConfig, Verdict
from extproc.mcp.spec import INVALID_REQUEST
from extproc.testing import ExchangeResult, Reply, StageHarness
from plugins.session import SessionConfig, SessionStage
from tests.unit.plugins.test_keeper_fake_time import (  # noqa: F401 - no_real_sleep is an autouse fixture
    URL,
    FakeClock,
    Stream,
    Upstream,
    no_real_sleep,
    ping,
    settle,
)

VERSION = "2025-06-18"
ISSUER = "https://idp.test"


def resources(keepalive: str) -> list[dict[str, Any]]:
    spec = {"url": URL, "allowedTools": ["*"], "keepalive": keepalive}
    return [{"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": "demo"}, "spec": spec}]


class UserFromHeader(Stage[StageConfig]):
    """Stands in for ``authn``: the principal is the ``x-user`` header (``anonymous`` without one)."""

    name: ClassVar[str] = "user-from-header"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        user = ctx.request_headers.get("x-user")
        ctx.principal = Principal(subject=user, issuer=ISSUER) if user else Principal(subject="anonymous")
        return None


def session_harness(clock: FakeClock, keepalive: str = "Never", **config: Any) -> tuple[StageHarness, SessionStage]:
    stage = SessionStage(SessionConfig.model_validate(config), clock=clock)
    assert stage.keeper.clock is clock
    harness = StageHarness(stage, stages_before=[UserFromHeader(StageConfig()), "mcp"], resources=resources(keepalive))
    return harness, stage


def request(method: str, id_: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": {}}


async def open_session(harness: StageHarness, user: str | None, session_id: str) -> None:
    headers = {"x-user": user} if user else {}
    opened = await harness.post(request("initialize"), headers=headers, protocol_version=VERSION)
    await opened.respond(headers={"mcp-session-id": session_id}, body=b'{"jsonrpc":"2.0","id":1,"result":{}}')


async def send(harness: StageHarness, user: str | None, session_id: str, method: str = "tools/list") -> ExchangeResult:
    headers = {"mcp-session-id": session_id, **({"x-user": user} if user else {})}
    return await harness.post(request(method, 9), headers=headers, protocol_version=VERSION)


def refusal(result: ExchangeResult) -> Reply:
    assert result.reply is not None and result.body_forwarded is None, "expected a refusal"
    assert result.reply.status == 404
    assert result.reply.json()["error"]["code"] == INVALID_REQUEST == -32600
    return result.reply


def refused(harness: StageHarness, reason: str) -> float:
    value = harness.pipeline.metrics.registry.get_sample_value(
        "mcp_extproc_session_refused_total", {"server": "demo", "reason": reason}
    )
    return value or 0.0


async def test_a_session_opened_by_one_principal_is_refused_to_another() -> None:
    harness, _ = session_harness(FakeClock(auto=False))
    async with harness:
        await open_session(harness, "alice", "s-1")

        reply = refusal(await send(harness, "bob", "s-1"))
        assert reply.json()["id"] == 9  # POSTs are decided on the body: the error carries the id
        assert "belongs to another caller" in reply.json()["error"]["message"]
        refusal(await send(harness, None, "s-1"))  # nor to the anonymous caller
        stream = await harness.get(headers={"mcp-session-id": "s-1", "x-user": "bob"})
        assert refusal(stream).json()["id"] is None  # a GET has no body: refused on its headers
        assert refused(harness, "session_principal_mismatch") == 3

        allowed = await send(harness, "alice", "s-1")
        assert not allowed.denied and allowed.body_forwarded is not None
        unknown = refusal(await send(harness, "alice", "never-issued"))
        assert "send initialize to start one" in unknown.json()["error"]["message"]
        assert refused(harness, "unknown_session") == 1


async def test_an_anonymous_session_is_the_anonymous_callers_and_only_a_2xx_initialize_binds() -> None:
    harness, _ = session_harness(FakeClock(auto=False))
    async with harness:
        await open_session(harness, None, "anon")
        assert not (await send(harness, None, "anon")).denied
        refusal(await send(harness, "alice", "anon"))
        failed = await harness.post(request("initialize"), headers={"x-user": "alice"}, protocol_version=VERSION)
        await failed.respond(500, headers={"mcp-session-id": "s-500"}, body=b"{}")
        refusal(await send(harness, "alice", "s-500"))


async def test_bindings_end_with_delete_upstream_404_and_max_sessions_least_recently_used_first() -> None:
    harness, stage = session_harness(FakeClock(auto=False), maxSessions=2)
    async with harness:
        for session_id in ("s-1", "s-2"):
            await open_session(harness, "alice", session_id)
        assert not (await send(harness, "alice", "s-1")).denied  # s-1 used: s-2 is now the oldest
        await open_session(harness, "alice", "s-3")
        assert list(stage.owners) == [("demo", "s-1"), ("demo", "s-3")]
        refusal(await send(harness, "alice", "s-2"))

        ended = await harness.delete(headers={"mcp-session-id": "s-1", "x-user": "alice"})
        assert not ended.denied
        await ended.respond(200)
        refusal(await send(harness, "alice", "s-1"))

        lost = await send(harness, "alice", "s-3")
        await lost.respond(404, body=b"{}")  # the upstream forgot it
        refusal(await send(harness, "alice", "s-3"))


@asynccontextmanager
async def keeping(
    upstream: Upstream, clock: FakeClock, **config: Any
) -> AsyncIterator[tuple[StageHarness, SessionStage]]:
    """The stage with keepalive Auto, its keeper talking to ``upstream``, started and stopped."""
    harness, stage = session_harness(clock, "Auto", **config)
    client = httpx.AsyncClient(transport=upstream.transport)
    stage.keeper.client = stage.keeper.answers = client  # the fake upstream instead of the network
    try:
        async with harness:
            yield harness, stage
    finally:
        await client.aclose()


async def test_a_kept_session_unused_for_idle_timeout_stops_being_kept_but_stays_bound() -> None:
    upstream = Upstream(Stream([ping("p-1")]))
    clock = FakeClock(auto=False)
    async with keeping(upstream, clock, idleTimeoutSeconds=100) as (harness, stage):
        await settle(lambda: clock.sleeping == 1, "the sweeper started with the stage")
        await open_session(harness, "alice", "s-1")
        assert upstream.gets == []  # initialize alone keeps nothing
        await (await send(harness, "alice", "s-1", "notifications/initialized")).respond(202)
        await settle(lambda: len(upstream.posts) == 1, "the keeper answered the ping")
        get = upstream.gets[0]
        assert (get.headers["mcp-session-id"], get.headers["mcp-protocol-version"]) == ("s-1", VERSION)
        assert json.loads(upstream.posts[0].content) == {"jsonrpc": "2.0", "id": "p-1", "result": {}}

        for _ in range(4):
            await clock.advance(25.0)  # t+100: not yet
        assert stage.keeper.get("demo", "s-1") is not None
        await clock.advance(25.0)
        await settle(lambda: stage.keeper.get("demo", "s-1") is None, "stopped as idle")
        assert upstream.open == 0

        again = await send(harness, "alice", "s-1")
        assert not again.denied  # the binding outlives the keeping
        await again.respond(body=b'{"jsonrpc":"2.0","id":9,"result":{"tools":[]}}')
        await settle(lambda: upstream.open == 1, "kept again after a 2xx")
        assert len(upstream.gets) == 2


async def test_the_agents_own_get_stream_takes_over_until_it_ends() -> None:
    upstream = Upstream()
    clock = FakeClock(auto=False)
    async with keeping(upstream, clock) as (harness, stage):
        await open_session(harness, "alice", "s-1")
        await (await send(harness, "alice", "s-1", "notifications/initialized")).respond(202)
        await settle(lambda: upstream.open == 1, "kept")

        stream = await harness.get(headers={"mcp-session-id": "s-1", "x-user": "alice"})
        assert upstream.open == 0  # closed before the agent's GET reaches the upstream
        assert stream.wants_response_body and stream.response_phases and not stream.ended
        kept = stage.keeper.get("demo", "s-1")
        assert kept is not None and kept.agent_streams == 1
        reply = await stream.respond(headers={"content-type": "text/event-stream"}, chunks=[ping(3), b": bye\n\n"])
        assert reply.body == ping(3) + b": bye\n\n"  # the agent's stream passes untouched
        assert stream.ended and kept.agent_streams == 0
        await settle(lambda: upstream.open == 1, "the keeper holds the stream again")
        assert len(upstream.gets) == 2 and clock.sleeps == [60.0]  # only the sweeper's: no backoff
