"""Upstream OAuth tokens: fetch, cache per (server, subject token, scopes), refresh early, single flight.

Data flow::

    credentials stage ──TokenCache.get(key, fetch)──▶ cached and fresh?  ──▶ token
                                                    │ a fetch in flight? ──▶ await it (single flight)
                                                    └ else start one: fetch() ──▶ TokenEndpoint.request
                                                          POST tokenUrl (form, client_secret_basic)
                                                          ◀── {"access_token", "expires_in", ...}
                                                    ──▶ cache until ``expires_at - refresh margin``

Two grants are spoken (:func:`client_credentials_form`, :func:`token_exchange_form`):
OAuth 2.1 client credentials (with RFC 8707 ``resource`` and ``audience``) and
RFC 8693 token exchange, whose subject token is the agent's validated inbound token.
An exchanged token is cached under a digest of the subject token it was exchanged for
(:func:`subject_token_digest`), never under the subject alone: another token of the same
subject (fewer scopes, another audience, revoked consent) is exchanged on its own.

Failures become :class:`TokenError` with the HTTP status the agent should see (503
when the endpoint cannot be reached, 502 when it answers badly). No message, log line
or metric label carries a token or a client secret: errors name the token URL, the
HTTP status and the OAuth ``error`` code only. With tracing on, each request is a
``token fetch`` span (the endpoint's URL without its query, the grant, the status).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote_plus

import httpx

from extproc import tracing
from extproc.errors import ExtProcError

TOKEN_EXCHANGE_GRANT: Final = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a name
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105 - a name
DEFAULT_LIFETIME_S: Final = 300.0
"""Lifetime assumed for a token whose response has no ``expires_in``."""


class TokenError(ExtProcError):
    """A token could not be obtained.

    Attributes:
        status: the HTTP status to answer the agent with.
        detail: what the log line says besides the message (e.g. which Secret is
            missing), for the operator's eyes only; never a token or secret.
    """

    def __init__(self, message: str, status: int, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Token:
    """An access token and when it stops being used (monotonic seconds)."""

    value: str = field(repr=False)
    expires_at: float
    refresh_at: float


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What a cached token is for.

    Attributes:
        server: the MCPServer's name.
        grant: ``client_credentials`` or ``token_exchange``.
        subject: the caller (``issuer|subject``; ``""`` for client credentials), for reading.
        scopes: the scopes asked for.
        subject_token: for token exchange, :func:`subject_token_digest` of the inbound
            token exchanged (``""`` for client credentials). A digest: keys may be
            printed, tokens never.
    """

    server: str
    grant: str
    subject: str
    scopes: tuple[str, ...]
    subject_token: str = ""


def subject_token_digest(token: str) -> str:
    """The SHA-256 of a subject token, hex: what :class:`TokenKey` holds instead of the token."""
    return hashlib.sha256(token.encode()).hexdigest()


def client_credentials_form(scopes: list[str], audience: str | None, resource: str | None) -> dict[str, str]:
    """The form of a client credentials token request (client authentication goes in a header)."""
    form = {"grant_type": "client_credentials"}
    return _common(form, scopes, audience, resource)


def token_exchange_form(
    subject_token: str, scopes: list[str], audience: str | None, resource: str | None
) -> dict[str, str]:
    """The form of an RFC 8693 token exchange request for an access token."""
    form = {
        "grant_type": TOKEN_EXCHANGE_GRANT,
        "subject_token": subject_token,
        "subject_token_type": ACCESS_TOKEN_TYPE,
        "requested_token_type": ACCESS_TOKEN_TYPE,
    }
    return _common(form, scopes, audience, resource)


def _common(form: dict[str, str], scopes: list[str], audience: str | None, resource: str | None) -> dict[str, str]:
    if scopes:
        form["scope"] = " ".join(scopes)
    if audience:
        form["audience"] = audience
    if resource:
        form["resource"] = resource
    return form


class TokenEndpoint:
    """Talks to OAuth token endpoints over one shared ``httpx.AsyncClient``."""

    def __init__(self, client: httpx.AsyncClient, refresh_margin: Callable[[float], float]) -> None:
        self._client = client
        self._margin = refresh_margin

    async def request(self, url: str, client_id: str, client_secret: str, form: Mapping[str, str]) -> Token:
        """POST ``form`` to ``url`` with ``client_secret_basic`` authentication.

        Raises:
            TokenError: unreachable (503), or a non-2xx / malformed answer (502).
        """
        started = time.monotonic()
        # The span names the endpoint and the grant, never the client secret or a token.
        where = {"url.full": tracing.safe_url(url), "mcp_extproc.token.grant": form.get("grant_type", "")}
        with tracing.span("token fetch", where, client=True) as span:
            headers = {"accept": "application/json"}
            tracing.inject(headers)
            try:
                reply = await self._client.post(
                    url,
                    data=dict(form),
                    auth=httpx.BasicAuth(_form_encode(client_id), _form_encode(client_secret)),
                    headers=headers,
                )
            except httpx.TimeoutException:
                raise TokenError(f"the token endpoint {url} did not answer in time", 503) from None
            except httpx.HTTPError as exc:
                raise TokenError(f"the token endpoint {url} cannot be reached ({type(exc).__name__})", 503) from None
            span.set_attribute("http.response.status_code", reply.status_code)
            return self._parse(url, reply, started)

    def _parse(self, url: str, reply: httpx.Response, started: float) -> Token:
        body: Any = None
        try:
            body = reply.json()
        except ValueError:
            body = None
        if reply.status_code != 200:
            code = body.get("error") if isinstance(body, dict) else None
            oauth = f" ({code})" if isinstance(code, str) and code.isprintable() and len(code) < 64 else ""
            raise TokenError(f"the token endpoint {url} refused the request: HTTP {reply.status_code}{oauth}", 502)
        if not isinstance(body, dict) or not isinstance(body.get("access_token"), str) or not body["access_token"]:
            raise TokenError(f"the token endpoint {url} answered without an access_token", 502)
        token_type = body.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise TokenError(f"the token endpoint {url} issued a token_type other than Bearer", 502)
        expires_in = body.get("expires_in", DEFAULT_LIFETIME_S)
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
            raise TokenError(f"the token endpoint {url} answered with an invalid expires_in", 502)
        lifetime = float(expires_in)
        expires_at = started + lifetime
        return Token(value=body["access_token"], expires_at=expires_at, refresh_at=expires_at - self._margin(lifetime))


def _form_encode(value: str) -> str:
    # RFC 6749 section 2.3.1: client id and secret are form-urlencoded before Basic encoding.
    return quote_plus(value)


class TokenCache:
    """Tokens by :class:`TokenKey`; one fetch at a time per key, refreshed before expiry."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._tokens: dict[TokenKey, Token] = {}
        self._inflight: dict[TokenKey, asyncio.Future[Token]] = {}
        self._max = max_entries
        self.fetches = 0

    def __len__(self) -> int:
        return len(self._tokens)

    async def get(self, key: TokenKey, fetch: Callable[[], Awaitable[Token]]) -> Token:
        """A fresh token for ``key``, fetching it (once, however many callers wait) when needed.

        Raises:
            TokenError: the fetch failed (every waiting caller gets the same error).
        """
        now = time.monotonic()
        cached = self._tokens.get(key)
        if cached is not None and now < cached.refresh_at:
            return cached
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[key] = pending
            try:
                token = await fetch()
            except BaseException as exc:
                if isinstance(exc, TokenError):
                    pending.set_exception(exc)
                    # Mark retrieved so an unawaited error does not warn at shutdown.
                    pending.exception()
                else:
                    pending.cancel()
                raise
            finally:
                self._inflight.pop(key, None)
                self.fetches += 1
            self._store(key, token)
            pending.set_result(token)
            return token
        try:
            return await asyncio.shield(pending)
        except asyncio.CancelledError:
            if pending.cancelled():
                raise TokenError("the token fetch was cancelled", 503) from None
            raise

    def _store(self, key: TokenKey, token: Token) -> None:
        if key not in self._tokens and len(self._tokens) >= self._max:
            # Drop the entry closest to expiry: cheap, and it would be refreshed first anyway.
            oldest = min(self._tokens, key=lambda k: self._tokens[k].expires_at)
            del self._tokens[oldest]
        self._tokens[key] = token
