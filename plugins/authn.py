"""The ``authn`` stage: who is calling? Validates the agent's bearer JWT.

Data flow (request headers only, so a bad token never costs a body round trip)::

    GET /.well-known/oauth-protected-resource[/<server>/mcp]
        ──▶ Answer 200: RFC 9728 metadata (resource, authorization servers, scopes)
    no MCPAgent declared at all
        ──▶ ctx.principal = anonymous (local development; logged once at startup)
    Authorization: Bearer <jwt>
        ──▶ unverified iss ──▶ agents with that issuer (none: 401)
        ──▶ JWKS key by kid (cache, rotation; endpoint down: 503)
        ──▶ PyJWT: signature, alg allow-list (asymmetric only), iss, aud, exp, nbf
        ──▶ the agent whose audiences/subjects match and that references this
            server (none: 403)
        ──▶ ctx.principal = Principal(sub, claims, scopes, agent, granted, consented)
        ──▶ remove Authorization: the agent's token never goes upstream
    failure ──▶ 401 + WWW-Authenticate: Bearer resource_metadata="…" [, error=…]

Scope checks (403 ``insufficient_scope``) belong to the rules that require
scopes: the ``policy`` stage answers them with :func:`insufficient_scope`.
"""

from __future__ import annotations

import json
import logging
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Final

import httpx
from pydantic import Field

from extproc.api import Answer, Context, Continue, Deny, Principal, Stage, StageConfig, Verdict
from extproc.config.models import MCPAgent, Trust
from extproc.config.resources import Catalog
from extproc.mcp.codes import AUTH_UNAVAILABLE, UNAUTHENTICATED
from plugins.lib.jwks import JwksCache, JwksUnavailable, UnknownKey

log = logging.getLogger("mcp_extproc.authn")

WELL_KNOWN: Final = "/.well-known/oauth-protected-resource"


class AuthnConfig(StageConfig):
    """Configuration of the ``authn`` stage."""

    jwks_cache_seconds: float = Field(default=300.0, gt=0, alias="jwksCacheSeconds")
    jwks_refetch_seconds: float = Field(default=10.0, ge=0, alias="jwksRefetchSeconds")
    jwks_timeout_seconds: float = Field(default=2.0, gt=0, alias="jwksTimeoutSeconds")
    leeway_seconds: float = Field(default=30.0, ge=0, alias="leewaySeconds")


class _Refused(Exception):
    """A token was refused; ``status`` 401 or 403, ``error`` the RFC 6750 code."""

    def __init__(self, message: str, *, status: int = 401, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


def _scheme_host(ctx: Context) -> str:
    scheme = ctx.request_headers.get("x-forwarded-proto") or ctx.request_headers.get(":scheme") or "http"
    host = ctx.request_headers.get(":authority") or ctx.request_headers.get("host") or "localhost"
    return f"{scheme}://{host}"


def metadata_url(ctx: Context, server: str | None) -> str:
    """Where this server's RFC 9728 protected-resource metadata is served."""
    suffix = f"/{server}/mcp" if server else ""
    return f"{_scheme_host(ctx)}{WELL_KNOWN}{suffix}"


def challenge(ctx: Context, server: str | None, error: str | None = None, **params: str) -> str:
    """A ``WWW-Authenticate: Bearer`` challenge pointing at the metadata."""
    parts = [f'resource_metadata="{metadata_url(ctx, server)}"']
    if error:
        parts.append(f'error="{error}"')
    for name, value in params.items():
        parts.append(f'{name}="{value.replace(chr(34), chr(39))}"')
    return "Bearer " + ", ".join(parts)


def insufficient_scope(ctx: Context, missing: list[str], message: str) -> Deny:
    """The 403 a rule answers when the token lacks scopes it requires."""
    server = ctx.server.name if ctx.server else None
    return Deny(
        status=403,
        code=UNAUTHENTICATED,
        message=message,
        reason="insufficient_scope",
        headers={"www-authenticate": challenge(ctx, server, "insufficient_scope", scope=" ".join(missing))},
    )


def token_scopes(claims: dict[str, Any]) -> frozenset[str]:
    """Scopes from ``scope`` (space-separated) or ``scp`` (list or string)."""
    raw = claims.get("scope", claims.get("scp", ""))
    if isinstance(raw, str):
        return frozenset(raw.split())
    if isinstance(raw, list):
        return frozenset(s for s in raw if isinstance(s, str))
    return frozenset()


def _trust(agent: MCPAgent, claims: dict[str, Any]) -> tuple[str, str]:
    granted = agent.spec.trust.granted
    claim = agent.spec.trust.consent_claim
    if claim is None or claim not in claims:
        return granted.value, granted.value
    value = claims[claim]
    try:
        return granted.value, Trust(value).value
    except ValueError:
        return granted.value, Trust.LOW.value  # an unreadable consent grants the least


class AuthnStage(Stage[AuthnConfig]):
    """Authenticate every request with the bearer JWT of a declared ``MCPAgent``."""

    name: ClassVar[str] = "authn"

    async def startup(self) -> None:
        config = self.config
        self._client = httpx.AsyncClient(timeout=config.jwks_timeout_seconds, trust_env=False, follow_redirects=False)
        self.jwks = JwksCache(self._client, ttl=config.jwks_cache_seconds, min_refetch=config.jwks_refetch_seconds)

    async def shutdown(self) -> None:
        await self._client.aclose()

    def check(self, catalog: Catalog) -> list[str]:
        if not catalog.agents:
            return ["warning: no MCPAgent declared: requests are not authenticated (anonymous principal)"]
        return []

    async def on_request_headers(self, ctx: Context) -> Verdict:
        catalog = ctx.catalog
        path = ctx.path.split("?", 1)[0]
        if path == WELL_KNOWN or path.startswith(WELL_KNOWN + "/"):
            return self._metadata(ctx, catalog, path)
        if catalog is None or not catalog.agents:
            ctx.principal = Principal(subject="anonymous")
            return None
        server = ctx.server.name if ctx.server else None
        header = ctx.request_headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            ctx.explain("authn: no bearer token")
            return Deny(
                status=401,
                code=UNAUTHENTICATED,
                message="authentication required: send Authorization: Bearer <token>",
                reason="unauthenticated",
                headers={"www-authenticate": challenge(ctx, server)},
            )
        try:
            ctx.principal = await self._authenticate(ctx, catalog, token.strip())
        except JwksUnavailable as exc:
            ctx.explain(f"authn: {exc}")
            log.warning("%s", exc)
            return Deny(
                status=503,
                code=AUTH_UNAVAILABLE,
                message="the token issuer's keys cannot be fetched; try again later",
                reason="jwks_unavailable",
                headers={"retry-after": "5"},
            )
        except _Refused as exc:
            ctx.explain(f"authn: {exc}")
            return Deny(
                status=exc.status,
                code=UNAUTHENTICATED,
                message=str(exc),
                reason="forbidden_agent" if exc.status == 403 else "invalid_token",
                headers={"www-authenticate": challenge(ctx, server, exc.error, error_description=str(exc))},
            )
        principal = ctx.principal
        ctx.explain(f"authn: {principal.subject!r} as MCPAgent {principal.agent!r}")
        return Continue(remove_headers=("authorization",), metadata={"principal": principal.subject})

    async def _authenticate(self, ctx: Context, catalog: Catalog, token: str) -> Principal:
        import jwt  # on first use: PyJWT and cryptography weigh about 9 MB, needless without agents

        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _Refused("the bearer token is not a well-formed JWT") from None
        issuer = unverified.get("iss")
        candidates = [a for _, a in sorted(catalog.agents.items()) if a.spec.identity.jwt.issuer == issuer]
        if not candidates:
            raise _Refused("the token's issuer is not trusted by any MCPAgent")
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(kid, (str, type(None))):
            raise _Refused("the token's kid header is not a string")
        claims: dict[str, Any] | None = None
        last: _Refused | None = None
        for agent in candidates:
            ident = agent.spec.identity.jwt
            if alg not in ident.algorithms:
                last = _Refused(f"the token's algorithm {alg!r} is not accepted; accepted: {ident.algorithms}")
                continue
            try:
                key = await self.jwks.key(ident.jwks_uri, kid)
                claims = jwt.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    audience=ident.audiences,
                    issuer=ident.issuer,
                    leeway=self.config.leeway_seconds,
                    options={"require": ["exp", "iss", "aud", "sub"]},
                )
            except UnknownKey as exc:
                last = _Refused(str(exc))
                continue
            except jwt.ExpiredSignatureError:
                last = _Refused("the token has expired")
                continue
            except jwt.ImmatureSignatureError:
                last = _Refused("the token is not valid yet (nbf)")
                continue
            except jwt.InvalidAudienceError:
                last = _Refused(f"the token's audience is not one of {ident.audiences}")
                continue
            except jwt.MissingRequiredClaimError as exc:
                last = _Refused(f"the token lacks the {exc.claim!r} claim")
                continue
            except jwt.PyJWTError as exc:
                last = _Refused(f"the token is invalid: {type(exc).__name__}")
                continue
            subject = str(claims["sub"])
            if ident.subjects and not any(fnmatchcase(subject, g) for g in ident.subjects):
                last = _Refused(f"subject {subject!r} is not one of MCPAgent {agent.name!r}'s subjects")
                claims = None
                continue
            if ctx.server is not None and not any(r.name == ctx.server.name for r in agent.spec.mcp_server_refs):
                last = _Refused(
                    f"MCPAgent {agent.name!r} does not reference MCPServer {ctx.server.name!r}",
                    status=403,
                    error="insufficient_scope",
                )
                claims = None
                continue
            granted, consented = _trust(agent, claims)
            return Principal(
                subject=subject,
                issuer=ident.issuer,
                agent=agent.name,
                claims=claims,
                scopes=token_scopes(claims),
                granted=granted,
                consented=consented,
                token=token,
            )
        assert last is not None
        raise last

    def _metadata(self, ctx: Context, catalog: Catalog | None, path: str) -> Verdict:
        rest = path[len(WELL_KNOWN) :].strip("/")
        server_name = rest.removesuffix("/mcp") if rest else None
        if catalog is None or not catalog.agents:
            return None  # no identity declared: nothing to describe (the mcp stage answers 404)
        if server_name is not None and (not rest.endswith("mcp") or server_name not in catalog.servers):
            return None
        if server_name is None:
            agents = sorted(catalog.agents.values(), key=lambda a: a.name)
            resource = _scheme_host(ctx) + "/"
        else:
            agents = catalog.agents_for(server_name)
            resource = f"{_scheme_host(ctx)}/{server_name}/mcp"
        scopes = sorted(
            {
                scope
                for policy in (catalog.policies_for(server_name) if server_name else catalog.policies.values())
                for rule in policy.spec.rules
                for scope in rule.scopes
            }
        )
        document = {
            "resource": resource,
            "authorization_servers": sorted({a.spec.identity.jwt.issuer for a in agents}),
            "bearer_methods_supported": ["header"],
            "scopes_supported": scopes,
        }
        if server_name:
            document["resource_name"] = server_name
        return Answer(
            status=200,
            body=json.dumps(document, separators=(",", ":")).encode(),
            reason="protected_resource_metadata",
        )
