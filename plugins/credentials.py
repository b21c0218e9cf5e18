"""The ``credentials`` stage: the agent's credentials never reach the upstream; ours does.

Data flow (request headers for GET/DELETE; request body for POSTs, so that a refusal
carries the JSON-RPC id; before anything is forwarded)::

    request headers ─▶ remove every agent header the upstream does not need:
                         all but FORWARDED_HEADERS, the server's spec.forwardHeaders,
                         pseudo-headers and Envoy's own x-envoy-*; always Authorization
                         and every header in ``removeHeaders`` (a virtual server's route:
                         every backend's forwardHeaders kept until the body names the
                         backend, then the others' removed)
                    ─▶ MCPServer.spec.upstreamAuth
                 none               → nothing injected
                 bearer             → Secret key | environment variable | file
                 clientCredentials  → TokenCache[(server, "", scopes)] ─▶ token endpoint
                 tokenExchange      → TokenCache[(server, principal, scopes,
                                      sha256(subject token))] ─▶ token endpoint,
                                      subject token = ctx.principal.token (set by ``authn``)
            ─▶ Authorization: Bearer <upstream credential>
            ─▶ ctx.state(UPSTREAM_CREDENTIAL).provider: how the session keeper gets the
               same (fresh) credential later, for its own GET stream and ping answers

The removals go out with the request-headers phase on every front door (ext_proc
header mutations, ext_authz ``headers_to_remove``, ``x-envoy-auth-headers-to-remove``
over HTTP); headers stages set later (the credential, the ``mcp`` stage's ``x-mcp-*``
from the body) are set after them and survive.

A credential that cannot be had is a denial with a JSON-RPC error and nothing is
forwarded: 503 when the token endpoint cannot be reached or a credential source is
missing, 502 when the token endpoint answers badly, 401 for token exchange without a
validated inbound token. The caller's message names the server and what failed
(and, for a token endpoint, its URL and answer); where a source is unreadable, the
file path, environment variable or Secret goes to the log line only. Never a token
or secret, anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Final

import httpx
from prometheus_client import CollectorRegistry, Counter
from pydantic import Field

from extproc.api import Context, Continue, Deny, FailureMode, Stage, StageConfig, StateKey, Verdict
from extproc.config.models import BearerAuth, ClientCredentials, TokenExchange
from extproc.config.resources import Catalog, MCPServer
from extproc.errors import ConfigError
from extproc.mcp.codes import UNAUTHENTICATED
from extproc.mcp.spec import INTERNAL_ERROR
from plugins.lib.tls import client_context
from plugins.lib.tokens import (
    Token,
    TokenCache,
    TokenEndpoint,
    TokenError,
    TokenKey,
    client_credentials_form,
    subject_token_digest,
    token_exchange_form,
)

AUTHORIZATION = "authorization"

FORWARDED_HEADERS: Final = frozenset(
    {
        # The body and what the agent accepts back.
        "content-type",
        "content-length",
        "transfer-encoding",
        "accept",
        "accept-encoding",
        # MCP's own headers: every ``mcp-*`` name (see _MCP_PREFIX), and the resumption cursor.
        "last-event-id",
        # Trace context (W3C).
        "traceparent",
        "tracestate",
        "baggage",
        # Who is asking, for the upstream's logs and its Origin check (DNS rebinding).
        "user-agent",
        "origin",
        # Envoy's: the route rewrites host; the request id and scheme are Envoy's to set.
        "host",
        "x-request-id",
        "x-forwarded-proto",
    }
)
"""Agent request headers every upstream receives; other names go unless ``spec.forwardHeaders``
lists them. Pseudo-headers (``:path``...) and Envoy's ``x-envoy-*`` are left to Envoy (its
ext_proc mutation rules do not let us touch them)."""

_UNTOUCHED: Final = (":", "x-envoy-")
_MCP_PREFIX: Final = "mcp-"
"""MCP's protocol headers: ``Mcp-Session-Id``, ``MCP-Protocol-Version``, ``Mcp-Method``,
``Mcp-Name`` and the 2026-07-28 ``Mcp-Param-*`` headers that mirror a call's arguments
(the server checks them against the body, so they must reach it)."""

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
        remove_headers: more request headers to remove, even those the allow-list
            (:data:`FORWARDED_HEADERS`) or the server's ``forwardHeaders`` name
            (``authorization`` always is).
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
    """A credential cannot be had; carries the denial to answer with and the details to log."""

    def __init__(self, deny: Deny, detail: str = "") -> None:
        super().__init__(deny.message)
        self.deny = deny
        self.detail = detail or deny.message


def _deny(status: int, message: str, reason: str) -> Deny:
    code = UNAUTHENTICATED if status == 401 else INTERNAL_ERROR
    return Deny(status=status, code=code, message=message, reason=reason)


_UNREADABLE: Final = "the upstream credential could not be read"


def _unreadable(server: MCPServer, detail: str, reason: str) -> _Unavailable:
    """A credential source that cannot be read: the caller learns which server, the log where."""
    message = f"no upstream credential for MCP server {server.name!r}: {_UNREADABLE}; the request was not forwarded"
    return _Unavailable(_deny(503, message, reason), f"MCP server {server.name!r}: {detail}")


def dropped_headers(names: Iterable[str], forward: Iterable[str] = (), remove: Iterable[str] = ()) -> tuple[str, ...]:
    """The request headers the upstream must not receive, of those named in ``names``.

    Args:
        names: the agent's header names (lower-case), as sent.
        forward: names the server forwards besides :data:`FORWARDED_HEADERS` (its
            ``spec.forwardHeaders``).
        remove: names removed whatever the lists say (``authorization`` and the
            stage's ``removeHeaders``); they come first, sent or not.

    Returns:
        Lower-case names, each once: ``remove``, then every other name in ``names``
        that is neither forwarded, an MCP header (``mcp-*``) nor Envoy's (a pseudo-header,
        ``x-envoy-*``).
    """
    always = tuple(dict.fromkeys(h.lower() for h in remove))
    kept = FORWARDED_HEADERS.union(h.lower() for h in forward).difference(always)
    sent = (n.lower() for n in names)
    dropped = (n for n in sent if n not in kept and not n.startswith(_UNTOUCHED) and not n.startswith(_MCP_PREFIX))
    return tuple(dict.fromkeys([*always, *dropped]))


def _backends_forward(ctx: Context) -> tuple[str, ...]:
    """The ``forwardHeaders`` of every backend of the virtual server ``ctx`` addresses (none: not one)."""
    if ctx.virtual is None or ctx.catalog is None:
        return ()
    servers = (ctx.catalog.servers.get(b.name) for b in ctx.virtual.spec.servers)
    return tuple(dict.fromkeys(h for s in servers if s is not None for h in s.spec.forward_headers))


class CredentialsStage(Stage[CredentialsConfig]):
    """Strip the agent's credentials and every header the upstream does not need; inject ours."""

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
            verify=client_context(),
        )

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _margin(self, lifetime: float) -> float:
        return min(self.settings.refresh_before_s, lifetime / 4)

    def removals(self, ctx: Context) -> tuple[str, ...]:
        """Every header of this request the upstream must not receive (see :func:`dropped_headers`).

        On a virtual server's route the backend is not known before the body: what any of
        its backends forwards is kept for now, and :meth:`on_request_body` removes what the
        chosen one does not.
        """
        forward = ctx.server.spec.forward_headers if ctx.server is not None else _backends_forward(ctx)
        return dropped_headers((name for name, _ in ctx.request_header_list), forward, self.remove)

    async def on_request_headers(self, ctx: Context) -> Verdict:
        # Every removal goes out now, in the first phase of every front door: headers set
        # later (the credential, x-mcp-* from the body) are set after it and survive.
        removed = self.removals(ctx)
        if ctx.request_has_body:
            # Inject once the body is parsed, so that a refusal carries the JSON-RPC id
            # and a call the earlier stages deny costs no token fetch.
            return Continue(remove_headers=removed)
        return await self._inject(ctx, removed)

    async def on_request_body(self, ctx: Context) -> Verdict:
        removed: tuple[str, ...] = ()
        if ctx.virtual is not None and ctx.server is not None:  # the backend the virtual stage chose
            own = {h.lower() for h in ctx.server.spec.forward_headers}
            others = {h.lower() for h in _backends_forward(ctx)} - own - FORWARDED_HEADERS
            removed = tuple(dict.fromkeys(n.lower() for n, _ in ctx.request_header_list if n.lower() in others))
        return await self._inject(ctx, removed)

    async def _inject(self, ctx: Context, removed: tuple[str, ...]) -> Verdict:
        server = ctx.server
        auth = server.spec.upstream_auth if server is not None else None
        if server is None or auth is None:
            return Continue(remove_headers=removed) if removed else None
        provider = self._provider(ctx, server)
        try:
            headers = await provider()
        except _Unavailable as exc:
            # The details (a file path, a variable's or Secret's name) go here, not to the caller.
            ctx.log.warning("upstream credential for %r unavailable: %s", server.name, exc.detail)
            return exc.deny
        ctx.state(UPSTREAM_CREDENTIAL).provider = provider
        return Continue(set_headers=headers, remove_headers=tuple(h for h in removed if h not in headers))

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
            digest = subject_token_digest(subject_token)
            key = TokenKey(server.name, "token_exchange", subject, tuple(exchange.scopes), digest)
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
                raise TokenError(_UNREADABLE, 503, f"clientSecretRef: {exc}") from None
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
            message = f"no upstream credential for MCP server {server.name!r}: {exc}; the request was not forwarded"
            detail = f"MCP server {server.name!r}: upstreamAuth {exc.detail}" if exc.detail else message
            raise _Unavailable(_deny(exc.status, message, "token_endpoint_failed"), detail) from None

    def _count(self, server: MCPServer, grant: str, outcome: str) -> None:
        if self.fetches is not None:
            self.fetches.labels(server.name, grant, outcome).inc()

    def _bearer(self, server: MCPServer, bearer: BearerAuth, catalog: Catalog) -> str:
        where = "upstreamAuth.bearer"
        if bearer.secret_ref is not None:
            where += ".secretRef"
            try:
                value = catalog.secret_value(bearer.secret_ref)
            except ConfigError as exc:
                raise _unreadable(server, f"{where}: {exc}", "bearer_missing") from None
        elif bearer.env is not None:
            where += f".env: environment variable {bearer.env!r}"
            value = os.environ.get(bearer.env, "")
            if not value:
                raise _unreadable(server, f"{where} is not set", "bearer_missing")
        else:
            assert bearer.file is not None
            where += f".file {bearer.file}"
            value = self._read_file(server, where, bearer.file)
        value = value.strip()
        if not value or any(c in value for c in "\r\n"):
            raise _unreadable(server, f"{where}: the credential is empty or spans lines", "bearer_invalid")
        return value

    def _read_file(self, server: MCPServer, where: str, path: str) -> str:
        """The file's contents, re-read when its modification time changes (rotation)."""
        try:
            mtime = Path(path).stat().st_mtime
            cached = self._files.get(path)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            value = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise _unreadable(server, f"{where}: cannot read it: {reason}", "bearer_missing") from None
        self._files[path] = (mtime, value)
        return value
