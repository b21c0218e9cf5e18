"""The token cache: single flight, refresh before expiry, errors shared and not cached."""

from __future__ import annotations

import asyncio
import time

from extproc.api import Context, Stage, StageConfig
from extproc.core.pipeline import Pipeline
from plugins.lib.tokens import Token, TokenCache, TokenError, TokenKey, client_credentials_form, token_exchange_form

KEY = TokenKey("srv", "client_credentials", "", ("a",))


def token(value: str, lifetime: float, margin: float = 0.0) -> Token:
    now = time.monotonic()
    return Token(value=value, expires_at=now + lifetime, refresh_at=now + lifetime - margin)


async def test_concurrent_callers_share_one_fetch() -> None:
    cache = TokenCache()
    calls = 0
    release = asyncio.Event()

    async def fetch() -> Token:
        nonlocal calls
        calls += 1
        await release.wait()
        return token("t1", 60)

    waiters = [asyncio.create_task(cache.get(KEY, fetch)) for _ in range(5)]
    await asyncio.sleep(0)
    release.set()
    got = await asyncio.gather(*waiters)
    assert calls == 1
    assert {t.value for t in got} == {"t1"}


async def test_a_token_past_its_refresh_time_is_fetched_again() -> None:
    cache = TokenCache()
    issued = iter([token("old", 60, margin=60), token("new", 60)])

    async def fetch() -> Token:
        return next(issued)

    assert (await cache.get(KEY, fetch)).value == "old"
    assert (await cache.get(KEY, fetch)).value == "new"  # "old" was already due for refresh
    assert (await cache.get(KEY, fetch)).value == "new"
    assert cache.fetches == 2


async def test_a_failure_reaches_every_waiter_and_is_not_cached() -> None:
    cache = TokenCache()
    release = asyncio.Event()
    fail = True

    async def fetch() -> Token:
        await release.wait()
        if fail:
            raise TokenError("the token endpoint x cannot be reached", 503)
        return token("ok", 60)

    waiters = [asyncio.create_task(cache.get(KEY, fetch)) for _ in range(3)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(r, TokenError) and r.status == 503 for r in results)
    fail = False
    assert (await cache.get(KEY, fetch)).value == "ok"


def test_token_repr_hides_the_value() -> None:
    assert "s3cret" not in repr(token("s3cret", 60))


def test_grant_forms() -> None:
    form = client_credentials_form(["a", "b"], "aud", "https://mcp/x")
    assert form == {"grant_type": "client_credentials", "scope": "a b", "audience": "aud", "resource": "https://mcp/x"}
    exchange = token_exchange_form("subj", [], None, None)
    assert exchange["grant_type"] == "urn:ietf:params:oauth:grant-type:token-exchange"
    assert exchange["subject_token"] == "subj"
    assert "scope" not in exchange


class Ender(Stage[StageConfig]):
    name = "ender"

    def __init__(self) -> None:
        super().__init__(Stage.Config())
        self.ended = 0

    async def on_exchange_end(self, ctx: Context) -> None:
        self.ended += 1
        raise RuntimeError("boom")


async def test_exchange_end_reaches_stages_and_swallows_their_errors() -> None:
    stage = Ender()
    pipeline = Pipeline([stage])
    await pipeline.end(Context(request_id="r", http_method="GET", path="/x/mcp", request_headers={}))
    assert stage.ended == 1
    assert pipeline.metrics.stage_faults.labels("ender", "closed")._value.get() == 1
