"""The ``session`` stage through the stage harness, its keeper on fake time.

The agent never sees the upstream's ``Mcp-Session-Id``: ``initialize`` hands it a JWS
signed by the gateway (upstream id, server, principal), and every request's id is
verified and swapped back before anything is forwarded. Anything else (the raw upstream
id, a tampered, expired or foreign id, another principal's) gets HTTP 404 with JSON-RPC
error -32600 and nothing is forwarded. What expires with time is the keeping: a session
unused for ``idleTimeoutSeconds`` is no longer kept alive, on the fake clock here.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import httpx
import jwt
import pytest

from extproc.api import Context, Principal, Stage, StageConfig, Verdict
from extproc.config.session_keys import load_key_set, rotate_key_set
from extproc.mcp.spec import INVALID_REQUEST
from extproc.testing import ExchangeResult, Reply, StageHarness
from plugins.lib.session_ids import SessionIds
from plugins.session import PING_REMOVED, SessionConfig, SessionStage
from tests.unit.plugins.test_keeper_fake_time import (  # noqa: F401 - no_real_sleep is an autouse fixture
    URL,
    FakeClock,
    Stream,
    Upstream,
    _event,
    no_real_sleep,
    ping,
    settle,
)

VERSION = "2025-06-18"
MODERN = "2026-07-28"
ISSUER = "https://idp.test"


def resources(keepalive: str, **spec: Any) -> list[dict[str, Any]]:
    demo = {"url": URL, "allowedTools": ["*"], "keepalive": keepalive, **spec}
    other = {"url": "http://other.test/mcp", "allowedTools": ["*"]}
    return [
        {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": name}, "spec": body}
        for name, body in (("demo", demo), ("other", other))
    ]


class UserFromHeader(Stage[StageConfig]):
    """Stands in for ``authn``: the principal is the ``x-user`` header (``anonymous`` without one);
    ``x-token`` stands for the bytes of the caller's token (a refresh changes them)."""

    name: ClassVar[str] = "user-from-header"

    async def on_request_headers(self, ctx: Context) -> Verdict:
        user = ctx.request_headers.get("x-user")
        token = ctx.request_headers.get("x-token", "")
        ctx.principal = Principal(subject=user, issuer=ISSUER, token=token) if user else Principal(subject="anonymous")
        return None


def session_harness(
    clock: FakeClock, keepalive: str = "Never", spec: dict[str, Any] | None = None, **config: Any
) -> tuple[StageHarness, SessionStage]:
    stage = SessionStage(SessionConfig.model_validate(config), clock=clock)
    assert stage.keeper.clock is clock
    harness = StageHarness(
        stage, stages_before=[UserFromHeader(StageConfig()), "mcp"], resources=resources(keepalive, **(spec or {}))
    )
    return harness, stage


def request(method: str, id_: int = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id_, "method": method, "params": {}}


async def open_session(harness: StageHarness, user: str | None, upstream_id: str, server: str = "demo") -> str:
    """Initialize as ``user``; the upstream issues ``upstream_id``; returns the id the agent got."""
    headers = {"x-user": user} if user else {}
    opened = await harness.post(request("initialize"), headers=headers, protocol_version=VERSION, server=server)
    reply = await opened.respond(headers={"mcp-session-id": upstream_id}, body=b'{"jsonrpc":"2.0","id":1,"result":{}}')
    return reply.headers["mcp-session-id"]


async def send(
    harness: StageHarness, user: str | None, session_id: str, method: str = "tools/list", **options: Any
) -> ExchangeResult:
    headers = {"mcp-session-id": session_id, **({"x-user": user} if user else {}), **options.pop("headers", {})}
    options.setdefault("protocol_version", VERSION)
    return await harness.post(request(method, 9), headers=headers, **options)


def refusal(result: ExchangeResult, status: int = 404) -> Reply:
    assert result.reply is not None and result.body_forwarded is None, "expected a refusal"
    assert result.reply.status == status
    assert result.reply.json()["error"]["code"] == INVALID_REQUEST == -32600
    return result.reply


def refused(harness: StageHarness, reason: str) -> float:
    value = harness.pipeline.metrics.registry.get_sample_value(
        "mcp_extproc_session_refused_total", {"server": "demo", "reason": reason}
    )
    return value or 0.0


def pending(stage: SessionStage, session_id: str) -> int:
    kept = stage.keeper.get("demo", session_id)
    return len(kept.pending) if kept is not None else 0


def tampered(token: str) -> str:
    """The same id with its payload's subject changed (the signature no longer matches)."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = f"{ISSUER}|mallory"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


async def test_the_agent_gets_a_signed_id_and_the_upstream_gets_its_own_back() -> None:
    harness, _ = session_harness(FakeClock(auto=False))
    async with harness:
        token = await open_session(harness, "alice", "upstream-s-1")
        assert token != "upstream-s-1" and token.count(".") == 2
        assert jwt.get_unverified_header(token)["alg"] == "HS256"
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sid"] == "upstream-s-1" and claims["aud"] == "demo" and claims["sub"] == f"{ISSUER}|alice"

        used = await send(harness, "alice", token)
        assert not used.denied and used.upstream_headers["mcp-session-id"] == "upstream-s-1"
        reply = await used.respond(headers={"mcp-session-id": "upstream-s-1"}, body=b'{"jsonrpc":"2.0","id":9}')
        assert reply.headers["mcp-session-id"] == token  # an echoed upstream id never reaches the agent

        raw = refusal(await send(harness, "alice", "upstream-s-1"))  # the upstream's own id is not ours
        assert raw.json()["id"] == 9 and "send initialize" in raw.json()["error"]["message"]
        assert refused(harness, "malformed") == 1


async def test_another_principal_gets_404_whatever_protocol_version_it_declares() -> None:
    harness, _ = session_harness(FakeClock(auto=False))
    async with harness:
        token = await open_session(harness, "alice", "s-1")
        reply = refusal(await send(harness, "bob", token))
        assert reply.json()["id"] == 9  # POSTs are decided on the body: the error carries the id
        assert "belongs to another caller" in reply.json()["error"]["message"]
        refusal(await send(harness, None, token))  # nor to the anonymous caller
        # A 2026-07-28 request has no sessions, but a version-agnostic upstream would still
        # read the header: it is checked all the same, and never forwarded unchecked.
        refusal(await send(harness, "bob", token, protocol_version=MODERN))
        modern = await send(harness, "alice", token, protocol_version=MODERN)
        assert not modern.denied and modern.upstream_headers["mcp-session-id"] == "s-1"
        stream = await harness.get(headers={"mcp-session-id": token, "x-user": "bob"})
        assert refusal(stream).json()["id"] is None  # a GET has no body: refused on its headers
        assert refused(harness, "session_principal_mismatch") == 4


async def test_a_refreshed_token_of_the_same_principal_keeps_the_session() -> None:
    harness, _ = session_harness(FakeClock(auto=False))
    async with harness:
        opened = await harness.post(
            request("initialize"), headers={"x-user": "alice", "x-token": "first"}, protocol_version=VERSION
        )
        reply = await opened.respond(headers={"mcp-session-id": "s-1"}, body=b'{"jsonrpc":"2.0","id":1,"result":{}}')
        token = reply.headers["mcp-session-id"]
        assert "first" not in json.dumps(jwt.decode(token, options={"verify_signature": False}))
        refreshed = await send(harness, "alice", token, headers={"x-token": "second"})
        assert not refreshed.denied and refreshed.upstream_headers["mcp-session-id"] == "s-1"


async def test_tampered_foreign_expired_and_unknown_key_ids_get_404_and_nothing_is_forwarded(tmp_path: Path) -> None:
    clock = FakeClock(auto=False)
    harness, stage = session_harness(clock, keyFile=str(tmp_path / "keys.json"))
    async with harness:
        token = await open_session(harness, "alice", "s-1")
        for forged, reason in [
            (tampered(token), "bad_signature"),
            (token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"), "bad_signature"),
            (await open_session(harness, "alice", "s-9", server="other"), "other_server"),
            (
                SessionIds(load_key_set(tmp_path / "elsewhere.json", create=True)).mint("s-1", "demo", "x", None),
                "unknown_key",
            ),
            ("not-a-jws", "malformed"),
        ]:
            reply = refusal(await send(harness, "alice", forged))
            assert refused(harness, reason) >= 1, reason
            assert "s-1" not in json.dumps(reply.json())
        later = stage.ids.clock() + stage.config.max_age_s + 1
        stage.ids.clock = lambda: later
        assert "has expired" in refusal(await send(harness, "alice", token)).json()["error"]["message"]


async def test_any_stage_with_the_key_file_serves_the_session_and_rotated_keys_still_verify(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    first, _ = session_harness(FakeClock(auto=False), keyFile=str(keys))
    async with first:
        token = await open_session(first, "alice", "s-1")
    assert oct(keys.stat().st_mode & 0o777) == "0o600"
    # A restarted gateway (or another replica) holding the same file: same session.
    rotate_key_set(keys)  # and a new signing key put first meanwhile
    second, _ = session_harness(FakeClock(auto=False), keyFile=str(keys))
    async with second:
        resumed = await send(second, "alice", token)
        assert not resumed.denied and resumed.upstream_headers["mcp-session-id"] == "s-1"
        fresh = await open_session(second, "alice", "s-2")
        assert jwt.get_unverified_header(fresh)["kid"] == load_key_set(keys, create=False).signing.kid
        assert jwt.get_unverified_header(fresh)["kid"] != jwt.get_unverified_header(token)["kid"]
    # A gateway with its own key (no file): the id is not valid there.
    third, _ = session_harness(FakeClock(auto=False))
    async with third:
        refusal(await send(third, "alice", token))


async def test_only_a_2xx_initialize_issues_an_id_and_no_upstream_id_leaks() -> None:
    harness, _ = session_harness(FakeClock(auto=False))
    async with harness:
        failed = await harness.post(request("initialize"), headers={"x-user": "alice"}, protocol_version=VERSION)
        reply = await failed.respond(500, headers={"mcp-session-id": "s-500"}, body=b"{}")
        assert "mcp-session-id" not in reply.headers
        anonymous = await open_session(harness, None, "anon")
        assert not (await send(harness, None, anonymous)).denied
        refusal(await send(harness, "alice", anonymous))


async def test_a_second_session_id_header_is_refused_with_400() -> None:
    harness, _ = session_harness(FakeClock(auto=False))
    async with harness:
        token = await open_session(harness, "alice", "s-1")
        lines = [("mcp-session-id", token), ("x-user", "alice"), ("mcp-session-id", "s-1")]
        reply = refusal(await harness.post(request("tools/list", 9), headers=lines, protocol_version=VERSION), 400)
        assert "mcp-session-id header was sent more than once" in reply.json()["error"]["message"]
        joined = await send(harness, "alice", f"{token}, s-1")  # Envoy joins repeated headers so
        assert "sent more than once" in refusal(joined, 400).json()["error"]["message"]


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (404, b'{"jsonrpc":"2.0","id":"server-error","error":{"code":-32001,"message":"Session not found"}}'),
        (400, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32000,"message":"Bad Request: No valid session ID"}}'),
    ],
)
async def test_an_upstream_that_lost_the_session_gives_the_agent_404_with_its_id(status: int, body: bytes) -> None:
    upstream = Upstream()
    clock = FakeClock(auto=False)
    async with keeping(upstream, clock) as (harness, stage):
        token = await open_session(harness, "alice", "s-1")
        await (await send(harness, "alice", token, "notifications/initialized")).respond(202)
        assert stage.keeper.get("demo", "s-1") is not None
        lost = await send(harness, "alice", token)
        reply = await lost.respond(status, headers={"content-type": "application/json"}, body=body)
        assert reply.status == 404 and reply.json()["id"] == 9
        assert "no longer knows this session" in reply.json()["error"]["message"]
        assert stage.keeper.get("demo", "s-1") is None  # the keeper stopped
        other = await send(harness, "alice", token)
        passed = await other.respond(400, body=b'{"jsonrpc":"2.0","id":9,"error":{"code":-32602,"message":"bad"}}')
        assert passed.status == 400  # a 400 that does not name the session is the server's answer


@asynccontextmanager
async def keeping(
    upstream: Upstream, clock: FakeClock, spec: dict[str, Any] | None = None, **config: Any
) -> AsyncIterator[tuple[StageHarness, SessionStage]]:
    """The stage with keepalive Auto, its keeper talking to ``upstream``, started and stopped."""
    harness, stage = session_harness(clock, "Auto", spec, **config)
    client = httpx.AsyncClient(transport=upstream.transport)
    stage.keeper.client = stage.keeper.answers = client  # the fake upstream instead of the network
    try:
        async with harness:
            yield harness, stage
    finally:
        await client.aclose()


async def test_a_kept_session_unused_for_its_servers_idle_timeout_stops_being_kept_but_stays_valid() -> None:
    upstream = Upstream(Stream([ping("p-1")]))
    clock = FakeClock(auto=False)
    async with keeping(upstream, clock, {"keepaliveIdleSeconds": 100}) as (harness, stage):
        await settle(lambda: clock.sleeping == 1, "the sweeper started with the stage")
        token = await open_session(harness, "alice", "s-1")
        assert upstream.gets == []  # initialize alone keeps nothing
        await (await send(harness, "alice", token, "notifications/initialized")).respond(202)
        await settle(lambda: len(upstream.posts) == 1, "the keeper answered the ping")
        get = upstream.gets[0]
        assert (get.headers["mcp-session-id"], get.headers["mcp-protocol-version"]) == ("s-1", VERSION)
        assert json.loads(upstream.posts[0].content) == {"jsonrpc": "2.0", "id": "p-1", "result": {}}

        assert stage.config.idle_timeout_s == 1800  # the stage's default; the server says 100
        await clock.advance(120.0)  # the sweeper's rounds (every 60 s at most): past 100 s idle
        await settle(lambda: stage.keeper.get("demo", "s-1") is None, "stopped as idle after 100 s")
        assert upstream.open == 0

        again = await send(harness, "alice", token)
        assert not again.denied  # the id outlives the keeping
        await again.respond(body=b'{"jsonrpc":"2.0","id":9,"result":{"tools":[]}}')
        await settle(lambda: upstream.open == 1, "kept again after a 2xx")
        assert len(upstream.gets) == 2


async def test_max_sessions_stops_keeping_the_least_recently_used() -> None:
    upstream = Upstream()
    clock = FakeClock(auto=False)
    async with keeping(upstream, clock, maxSessions=2) as (harness, stage):
        tokens = [await open_session(harness, "alice", f"s-{n}") for n in (1, 2, 3)]
        for token in tokens[:2]:
            await (await send(harness, "alice", token, "notifications/initialized")).respond(202)
            await clock.advance(1.0)
        await (await send(harness, "alice", tokens[0])).respond(body=b"{}")  # s-1 used: s-2 is the oldest
        await clock.advance(1.0)
        await (await send(harness, "alice", tokens[2], "notifications/initialized")).respond(202)
        assert sorted(sid for _, sid in stage.keeper.sessions) == ["s-1", "s-3"]


async def test_the_agents_own_stream_gets_kept_messages_first_and_its_pings_are_answered_by_the_gateway() -> None:
    note = _event({"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": "while away"}})
    upstream = Upstream(Stream([note]))
    clock = FakeClock(auto=False)
    async with keeping(upstream, clock) as (harness, stage):
        token = await open_session(harness, "alice", "s-1")
        await (await send(harness, "alice", token, "notifications/initialized")).respond(202)
        await settle(lambda: upstream.open == 1 and pending(stage, "s-1") == 1, "kept a notification")

        stream = await harness.get(headers={"mcp-session-id": token, "x-user": "alice"})
        assert upstream.open == 0  # closed before the agent's GET reaches the upstream
        assert stream.upstream_headers["mcp-session-id"] == "s-1"
        assert stream.wants_response_body and stream.response_phases and not stream.ended
        kept = stage.keeper.get("demo", "s-1")
        assert kept is not None and kept.agent_streams == 1
        progress = _event({"jsonrpc": "2.0", "method": "notifications/progress", "params": {}})
        reply = await stream.respond(
            headers={"content-type": "text/event-stream"}, chunks=[ping(3)[:10], ping(3)[10:] + progress, b": bye\n\n"]
        )
        # The kept notification first, then the stream with the ping answered by us and
        # replaced by a comment: the agent cannot lose it by dropping its stream.
        assert reply.body == note + PING_REMOVED + progress + b": bye\n\n"
        await settle(lambda: len(upstream.posts) == 1, "the gateway answered the ping")
        assert json.loads(upstream.posts[0].content) == {"jsonrpc": "2.0", "id": 3, "result": {}}
        assert upstream.posts[0].headers["mcp-session-id"] == "s-1"
        assert stream.ended and kept.agent_streams == 0
        await settle(lambda: upstream.open == 1, "the keeper holds the stream again")
        assert len(upstream.gets) == 2 and clock.sleeps == [60.0]  # only the sweeper's: no backoff


async def test_kept_messages_go_back_when_the_agents_stream_ends_before_carrying_them() -> None:
    note = _event({"jsonrpc": "2.0", "method": "notifications/message", "params": {}})
    upstream = Upstream(Stream([note]), then=Stream())
    clock = FakeClock(auto=False)
    async with keeping(upstream, clock) as (harness, stage):
        token = await open_session(harness, "alice", "s-1")
        await (await send(harness, "alice", token, "notifications/initialized")).respond(202)
        await settle(lambda: pending(stage, "s-1") == 1, "kept a notification")
        stream = await harness.get(headers={"mcp-session-id": token, "x-user": "alice"})
        await stream.respond(headers={"content-type": "text/event-stream"}, chunks=[])  # ended with no byte
        assert stage.keeper.take_pending("demo", "s-1") == [note]
