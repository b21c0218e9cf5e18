"""``serve --report``: its token (signed with the session key set) and its HTTP endpoint."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import jwt
import pytest

from extproc.config.session_keys import SessionKeys
from extproc.core.report import AUDIENCE, BadReportToken, mint_token, verify_token
from extproc.frontdoor.report import ReportServer
from plugins.lib.session_ids import BadSessionId, SessionIds

KEYS = SessionKeys.ephemeral()
OTHER = SessionKeys.ephemeral()


def test_a_minted_token_is_accepted_by_the_same_key_set_only() -> None:
    token = mint_token(KEYS)
    verify_token(KEYS, token)
    with pytest.raises(BadReportToken) as caught:
        verify_token(OTHER, token)
    assert caught.value.reason == "unknown_key"


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": -10}, "expired"),
        ({"iat": 3600, "exp": 3660}, "issued_in_the_future"),
        ({"exp": 3600}, "too_long_lived"),
        ({"aud": "demo"}, "other_audience"),
        ({"iss": "someone-else"}, "malformed"),
    ],
)
def test_tokens_that_must_not_pass(claims: dict[str, Any], reason: str) -> None:
    now = int(time.time())
    payload = {"iss": "mcp-extproc", "aud": AUDIENCE, "iat": now, "exp": now + 60}
    payload.update({k: now + v if k in ("iat", "exp") else v for k, v in claims.items()})
    token = jwt.encode(payload, KEYS.signing.secret, algorithm="HS256", headers={"kid": KEYS.signing.kid})
    with pytest.raises(BadReportToken) as caught:
        verify_token(KEYS, token)
    assert caught.value.reason == reason


def test_a_tampered_token_and_garbage_are_refused() -> None:
    head, _, signature = mint_token(KEYS).split(".")
    _, body, _ = mint_token(KEYS, now=time.time() + 10).split(".")  # another payload, the first signature
    with pytest.raises(BadReportToken, match="bad_signature"):
        verify_token(KEYS, f"{head}.{body}.{signature}")
    with pytest.raises(BadReportToken, match="malformed"):
        verify_token(KEYS, "not-a-token")


def test_a_report_token_is_never_a_session_id_nor_a_session_id_a_report_token() -> None:
    ids = SessionIds(KEYS)
    session_id = ids.mint("upstream-1", "demo", "issuer|alice", None)
    with pytest.raises(BadReportToken):
        verify_token(KEYS, session_id)
    with pytest.raises(BadSessionId):
        ids.verify(mint_token(KEYS), "demo")


def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, httpx.Headers, Any]:
    headers = {"authorization": f"Bearer {token}"} if token is not None else {}
    answer = httpx.request(method, url, headers=headers, timeout=5)
    return answer.status_code, answer.headers, json.loads(answer.content) if answer.content else None


async def test_the_endpoint_answers_only_a_valid_token_with_the_stages_report() -> None:
    made: list[bool] = []
    loop = asyncio.get_running_loop()

    def report() -> dict[str, Any]:
        made.append(asyncio.get_running_loop() is loop)
        return {"pins": {"servers": {"demo": {"complete": True, "tools": {}}}}}

    server = ReportServer("127.0.0.1", 0, KEYS, report)
    port = server.start(asyncio.get_running_loop())
    try:
        url = f"http://127.0.0.1:{port}/report"
        status, headers, body = await asyncio.to_thread(_get, url)
        assert status == 401 and "Bearer" in headers["www-authenticate"] and made == []
        status, _, body = await asyncio.to_thread(_get, url, mint_token(OTHER))
        assert status == 401 and made == []
        status, headers, body = await asyncio.to_thread(_get, url, mint_token(KEYS))
        assert status == 200 and headers["content-type"] == "application/json"
        assert body == {"version": 1, "stages": {"pins": {"servers": {"demo": {"complete": True, "tools": {}}}}}}
        assert made == [True]  # made on the event loop, once
        status, _, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{port}/metrics", mint_token(KEYS))
        assert status == 404
        status, headers, _ = await asyncio.to_thread(_get, url, mint_token(KEYS), "POST")
        assert status == 405 and headers["allow"] == "GET"
    finally:
        server.stop()
