"""JWKS: fetch, cache and rotate the signing keys of token issuers.

Data flow::

    key(uri, kid) ──cached set fresh?──yes──▶ kid in set? ──yes──▶ PyJWK
                        │ no (absent or older than ttl)   │ no
                        ▼                                  ▼
                   fetch (one per uri at a time)      last kid-triggered fetch older
                        │ fails: stale set if any,    than min_refetch? ──yes──▶ fetch once more
                        │        else JwksUnavailable      │ no
                        ▼                                  ▼
                   parse with PyJWKSet                UnknownKey

An unknown ``kid`` (a rotated key) triggers at most one refetch per
``min_refetch`` seconds, so a flood of tokens with made-up key ids cannot turn
into a flood of requests to the issuer. Concurrent callers share one fetch.
Key parsing and signature checks are PyJWT's. With tracing on, a fetch is a ``jwks fetch`` span.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

from extproc import tracing
from extproc.errors import ExtProcError

if TYPE_CHECKING:
    import jwt


class JwksUnavailable(ExtProcError):
    """The JWKS endpoint could not be fetched and no keys are cached (answer 503)."""


class UnknownKey(ExtProcError):
    """The token names a key the issuer does not publish (answer 401)."""


@dataclass
class _Entry:
    keys: dict[str, jwt.PyJWK] = field(default_factory=dict)
    fetched_at: float = 0.0
    refetched_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JwksCache:
    """Signing keys by JWKS URI and key id.

    Args:
        client: the HTTP client used for fetches (owned by the caller).
        ttl: seconds a fetched key set is used before it is fetched again.
        min_refetch: least seconds between two fetches of one URI caused by
            unknown key ids.
    """

    def __init__(self, client: httpx.AsyncClient, *, ttl: float = 300.0, min_refetch: float = 10.0) -> None:
        self._client = client
        self._ttl = ttl
        self._min_refetch = min_refetch
        self._entries: dict[str, _Entry] = {}
        self.fetches = 0

    async def key(self, uri: str, kid: str | None) -> jwt.PyJWK:
        """The key ``kid`` published at ``uri`` (the only key when ``kid`` is None).

        Raises:
            JwksUnavailable: nothing could be fetched and nothing is cached.
            UnknownKey: the issuer does not publish that key.
        """
        entry = self._entries.setdefault(uri, _Entry())
        if not entry.keys or time.monotonic() - entry.fetched_at > self._ttl:
            await self._refresh(uri, entry, stale_ok=True, since=entry.fetched_at)
        found = _pick(entry.keys, kid)
        if found is None and time.monotonic() - entry.refetched_at >= self._min_refetch:
            entry.refetched_at = time.monotonic()
            await self._refresh(uri, entry, stale_ok=True, since=entry.fetched_at)
            found = _pick(entry.keys, kid)
        if found is None:
            which = f"key id {kid!r}" if kid else "a key id (the issuer publishes several keys)"
            raise UnknownKey(f"the token names {which} that the issuer's JWKS does not contain")
        return found

    async def _refresh(self, uri: str, entry: _Entry, *, stale_ok: bool, since: float) -> None:
        async with entry.lock:
            if entry.fetched_at != since:
                return  # someone else fetched while we waited
            try:
                keys = await self._fetch(uri)
            except JwksUnavailable:
                if stale_ok and entry.keys:
                    entry.fetched_at = time.monotonic()  # retry after min_refetch / ttl, not on every token
                    return
                raise
            entry.keys = keys
            entry.fetched_at = time.monotonic()

    async def _fetch(self, uri: str) -> dict[str, jwt.PyJWK]:
        import jwt  # on first use: PyJWT and cryptography weigh about 9 MB, needless without agents

        self.fetches += 1
        with tracing.span("jwks fetch", {"url.full": tracing.safe_url(uri)}, client=True) as span:
            headers = {"accept": "application/json"}
            tracing.inject(headers)
            try:
                response = await self._client.get(uri, headers=headers)
            except httpx.HTTPError as exc:
                raise JwksUnavailable(f"cannot fetch JWKS from {uri}: {type(exc).__name__}") from None
            span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code != 200:
            raise JwksUnavailable(f"JWKS at {uri} answered HTTP {response.status_code}")
        try:
            key_set = jwt.PyJWKSet.from_dict(response.json())
        except (ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            raise JwksUnavailable(f"JWKS at {uri} is not a usable key set: {exc}") from None
        keys: dict[str, jwt.PyJWK] = {}
        for index, key in enumerate(key_set.keys):
            if key.public_key_use in (None, "sig"):
                keys[key.key_id or f"#{index}"] = key
        if not keys:
            raise JwksUnavailable(f"JWKS at {uri} has no signing keys")
        return keys


def _pick(keys: dict[str, jwt.PyJWK], kid: str | None) -> jwt.PyJWK | None:
    if kid is not None:
        return keys.get(kid)
    return next(iter(keys.values())) if len(keys) == 1 else None
