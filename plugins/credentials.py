"""The ``credentials`` stage: the agent's credential never reaches the upstream; ours does.

Data flow (request headers for GET/DELETE; request body for POSTs, so that a refusal
carries the JSON-RPC id; before anything is forwarded)::

    request ─▶ remove Authorization (always) and every header in ``removeHeaders``
            ─▶ MCPServer.spec.upstreamAuth
                 none               → nothing injected
                 bearer             → Secret key | environment variable | file
                 clientCredentials  → TokenCache[(server, "", scopes)] ─▶ token endpoint
                 tokenExchange      → TokenCache[(server, principal, scopes)] ─▶ token endpoint,
                                      subject token = ctx.principal.token (set by ``authn``)
            ─▶ Authorization: Bearer <upstream credential>
            ─▶ ctx.state(UPSTREAM_CREDENTIAL).provider: how the session keeper gets the
               same (fresh) credential later, for its own GET stream and ping answers

A credential that cannot be had is a denial with a JSON-RPC error and nothing is
forwarded: 503 when the token endpoint cannot be reached or a bearer source is
missing, 502 when the token endpoint answers badly, 401 for token exchange without a
validated inbound token. Messages name the server, the source and the token URL,
never a token or secret.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field

from extproc.api import Context, Continue, Deny, FailureMode, Stage, StageConfig, StateKey, Verdict
from extproc.config.models import BearerAuth, ClientCredentials, TokenExchange
from extproc.config.resources import Catalog, MCPServer
from extproc.errors import ConfigError
from extproc.mcp.codes import UNAUTHENTICATED
from extproc.mcp.spec import INTERNAL_ERROR
from plugins.lib.tokens import (
    Token,
    TokenCache,
    TokenEndpoint,
    TokenError,
    TokenKey,
    client_credentials_form,
    token_exchange_form,
)

AUTHORIZATION = "authorization"

CredentialProvider = Callable[[], Awaitable[dict[str, str]]]
"""Returns the headers that carry the upstream credential (``{}`` when there is none)."""


@dataclass
class CredentialSlot:
    """Per-exchange: how to get this exchange's upstream credential again (for the session keeper)."""

    provider: CredentialProvider | None = None


UPSTREAM_CREDENTIAL = StateKey("upstream_credential", CredentialSlot)
"""Set by the ``credentials`` stage on every exchange it handles; read by ``session``."""


class CredentialsConfig(StageConfig):
    """Configuration of the ``credentials`` stage.

    Attributes:
        remove_headers: more request headers to remove (``authorization`` always is).
        token_timeout_s: how long one token request may take.
        refresh_before_s: refresh a token this long before it expires (at most a
            quarter of its lifetime).
        max_cached_tokens: bound on the token cache.
    """

    remove_headers: list[str] = Field(default_factory=list, alias="removeHeaders")
    token_timeout_s: float = Field(default=5.0, gt=0, alias="tokenTimeoutSeconds")
    refresh_before_s: float = Field(default=60.0, ge=0, alias="refreshBeforeSeconds")
    max_cached_tokens: int = Field(default=10_000, gt=0, alias="maxCachedTokens")


class _Unavailable(Exception):
    """A credential cannot be had; carries the denial to answer with."""

    def __init__(self, deny: Deny) -> None:
        super().__init__(deny.message)
        self.deny = deny


def _deny(status: int, message: str, reason: str) -> Deny:
    code = UNAUTHENTICATED if status == 401 else INTERNAL_ERROR
    return Deny(status=status, code=code, message=message, reason=reason)


class CredentialsStage(Stage[CredentialsConfig]):
    """Strip the agent's credential; inject the upstream credential of the target server."""

    name: ClassVar[str] = "credentials"
    # Headers only (the upstream credential): works the same behind one ext_authz Check.
    calls_need_ext_proc: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, config: CredentialsConfig, failure_mode: FailureMode = FailureMode.CLOSED) -> None:
        super().__init__(config, failure_mode)
        self.settings = config
        self.remove = tuple(dict.fromkeys([AUTHORIZATION, *(h.lower() for h in config.remove_headers)]))
        self.cache = TokenCache(config.max_cached_tokens)
        self._client: httpx.AsyncClient | None = None
        self._files: dict[str, tuple[float, str]] = {}
        self.fetches: Counter | None = None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        self.fetches = Counter(
            "mcp_extproc_upstream_token_fetches",
            "Token requests to OAuth token endpoints, by server, grant and outcome.",
            ["server", "grant", "outcome"],
            registry=registry,
        )

    async def startup(self) -> None:
        # Opened here, not when the stage is built: `check` and the renderers build stages too.
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self.config.token_timeout_s),
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
            follow_redirects=False,
        )

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _margin(self, lifetime: float) -> float:
        return min(self.settings.refresh_before_s, lifetime / 4)

    async def on_request_headers(self, ctx: Context) -> Verdict:
        if ctx.request_has_body:
            # Strip now; inject once the body is parsed, so that a refusal carries the
            # JSON-RPC id and a call the earlier stages deny costs no token fetch.
            return Continue(remove_headers=self.remove)
        return await self._inject(ctx)

    async def on_request_body(self, ctx: Context) -> Verdict:
        return await self._inject(ctx)

    async def _inject(self, ctx: Context) -> Verdict:
        server = ctx.server
        auth = server.spec.upstream_auth if server is not None else None
        if server is None or auth is None:
            return Continue(remove_headers=self.remove)
        provider = self._provider(ctx, server)
        try:
            headers = await provider()
        except _Unavailable as exc:
            ctx.log.warning("upstream credential for %r unavailable: %s", server.name, exc.deny.message)
            return exc.deny
        ctx.state(UPSTREAM_CREDENTIAL).provider = provider
        removed = tuple(h for h in self.remove if h not in headers)
        return Continue(set_headers=headers, remove_headers=removed)

    def _provider(self, ctx: Context, server: MCPServer) -> CredentialProvider:
        """A callable giving the credential headers for this server and caller, now or later."""
        auth = server.spec.upstream_auth
        assert auth is not None
        catalog = ctx.catalog or Catalog()
        if auth.bearer is not None:
            bearer = auth.bearer

            async def static() -> dict[str, str]:
                return {AUTHORIZATION: f"Bearer {self._bearer(server, bearer, catalog)}"}

            return static
        if auth.client_credentials is not None:
            grant = auth.client_credentials

            async def client_credentials() -> dict[str, str]:
                key = TokenKey(server.name, "client_credentials", "", tuple(grant.scopes))
                form = client_credentials_form(grant.scopes, grant.audience, grant.resource)
                token = await self._token(server, key, grant, catalog, form)
                return {AUTHORIZATION: f"Bearer {token.value}"}

            return client_credentials
        exchange = auth.token_exchange
        assert exchange is not None
        principal = ctx.principal
        subject_token = principal.token if principal is not None else ""
        subject = principal.key if principal is not None else ""

        async def token_exchange() -> dict[str, str]:
            if not subject_token:
                raise _Unavailable(
                    _deny(
                        401,
                        f"MCP server {server.name!r} needs the caller's validated token for token exchange, "
                        "and none was presented (configure the authn stage and send Authorization: Bearer <JWT>)",
                        "no_subject_token",
                    )
                )
            key = TokenKey(server.name, "token_exchange", subject, tuple(exchange.scopes))
            form = token_exchange_form(subject_token, exchange.scopes, exchange.audience, exchange.resource)
            token = await self._token(server, key, exchange, catalog, form)
            return {AUTHORIZATION: f"Bearer {token.value}"}

        return token_exchange

    async def _token(
        self,
        server: MCPServer,
        key: TokenKey,
        grant: ClientCredentials | TokenExchange,
        catalog: Catalog,
        form: dict[str, str],
    ) -> Token:
        if self._client is None:
            raise RuntimeError("the credentials stage was not started")
        endpoint = TokenEndpoint(self._client, self._margin)

        async def fetch() -> Token:
            try:
                secret = catalog.secret_value(grant.client_secret_ref)
            except ConfigError as exc:
                self._count(server, key.grant, "config_error")
                raise TokenError(f"client secret unavailable: {exc}", 503) from None
            try:
                token = await endpoint.request(grant.token_url, grant.client_id, secret, form)
            except TokenError as exc:
                self._count(server, key.grant, "unreachable" if exc.status == 503 else "refused")
                raise
            self._count(server, key.grant, "ok")
            return token

        try:
            return await self.cache.get(key, fetch)
        except TokenError as exc:
            raise _Unavailable(
                _deny(
                    exc.status,
                    f"no upstream credential for MCP server {server.name!r}: {exc}; the request was not forwarded",
                    "token_endpoint_failed",
                )
            ) from None

    def _count(self, server: MCPServer, grant: str, outcome: str) -> None:
        if self.fetches is not None:
            self.fetches.labels(server.name, grant, outcome).inc()

    def _bearer(self, server: MCPServer, bearer: BearerAuth, catalog: Catalog) -> str:
        where = f"MCP server {server.name!r}: upstreamAuth.bearer"
        if bearer.secret_ref is not None:
            try:
                value = catalog.secret_value(bearer.secret_ref)
            except ConfigError as exc:
                raise _Unavailable(_deny(503, f"{where}.secretRef: {exc}", "bearer_missing")) from None
        elif bearer.env is not None:
            value = os.environ.get(bearer.env, "")
            if not value:
                raise _Unavailable(
                    _deny(503, f"{where}.env: environment variable {bearer.env!r} is not set", "bearer_missing")
                )
        else:
            assert bearer.file is not None
            value = self._read_file(where, bearer.file)
        value = value.strip()
        if not value or any(c in value for c in "\r\n"):
            raise _Unavailable(_deny(503, f"{where}: the credential is empty or spans lines", "bearer_invalid"))
        return value

    def _read_file(self, where: str, path: str) -> str:
        """The file's contents, re-read when its modification time changes (rotation)."""
        try:
            mtime = Path(path).stat().st_mtime
            cached = self._files.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            value = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise _Unavailable(_deny(503, f"{where}.file: cannot read {path}: {reason}", "bearer_missing")) from None
        self._files[path] = (mtime, value)
        return value
