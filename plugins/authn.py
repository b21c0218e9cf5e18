"""The ``authn`` stage: who is calling? Validates the agent's bearer JWT.

Data flow (request headers only, so a bad token never costs a body round trip)::

    ?access_token= / ?id_token= in the query string (any case, percent-decoded)
        ──▶ Deny 400, JSON-RPC -32600: tokens go in the Authorization header
            (OAuth 2.1); the value is never logged nor explained
    GET /.well-known/oauth-protected-resource[/<server>/mcp]
        ──▶ Answer 200: RFC 9728 metadata (resource, authorization servers, scopes)
    no MCPAgent declared at all
        ──▶ ctx.principal = anonymous (local development; logged once at startup)
    no Authorization header at all: the deployment may say who is calling
        ──▶ ctx.peer (the SPIFFE ID of the client certificate Envoy verified, from
            Envoy's connection attributes) = an agent's serviceAccount identity
            ──▶ ctx.principal = Principal(the SPIFFE ID, agent)
        ──▶ else ``workloadAgent`` configured (a sidecar: the pod is that agent)
            ──▶ ctx.principal = Principal(the agent's name, issuer "workload", agent)
        ──▶ the agent must reference this server (else 403); nothing else identifies:
            401 below. No request header ever names the caller (X-Forwarded-Client-Cert
            and the like are never read).
    Authorization: Bearer <jwt>   (always validated when present, and it wins)
        ──▶ unverified iss ──▶ agents with that issuer (none: 401)
        ──▶ JWKS key by kid (cache, rotation; endpoint down: 503)
        ──▶ PyJWT: signature, alg allow-list (asymmetric only), iss, aud, exp, nbf
        ──▶ the agent whose audiences/subjects match and that references this
            server (none: 403)
        ──▶ ctx.principal = Principal(sub, claims, scopes, agent, granted, consented)
        ──▶ remove Authorization: the agent's token never goes upstream
    failure ──▶ 401 + WWW-Authenticate: Bearer resource_metadata="…" [, error=…]

Every URL we hand out (``resource_metadata``, the metadata's ``resource``) starts
with the configured public origin, ``publicUrl`` (``up``/``serve --public-url``
fill it in when the pipeline file does not), never with the request's ``Host`` or
``X-Forwarded-Proto``, which the caller chooses. Unconfigured, it is
:data:`UNCONFIGURED_ORIGIN`, an address that resolves nowhere.

Scope checks (403 ``insufficient_scope``) belong to the rules that require
scopes: the ``policy`` stage answers them with :func:`insufficient_scope`.
"""

from __future__ import annotations

import json
import logging
import re
from fnmatch import fnmatchcase
from typing import Any, ClassVar, Final
from urllib.parse import unquote_plus

import httpx
from pydantic import Field, field_validator

from extproc.api import (
    WORKLOAD_ISSUER,
    Answer,
    Context,
    Continue,
    Deny,
    Principal,
    Stage,
    StageConfig,
    StateKey,
    Verdict,
)
from extproc.config.models import MCPAgent, Trust
from extproc.config.resources import Catalog
from extproc.config.settings import public_origin
from extproc.errors import ConfigError
from extproc.mcp.codes import AUTH_UNAVAILABLE, UNAUTHENTICATED
from extproc.mcp.spec import INVALID_REQUEST
from plugins.lib.jwks import JwksCache, JwksUnavailable, UnknownKey
from plugins.lib.tls import client_context

log = logging.getLogger("mcp_extproc.authn")

WELL_KNOWN: Final = "/.well-known/oauth-protected-resource"
UNCONFIGURED_ORIGIN: Final = "http://public-url-not-configured.invalid"
"""The origin named when no ``publicUrl`` is configured: ``.invalid`` never resolves (RFC 6761)."""
URL_TOKEN_PARAMETERS: Final = frozenset({"access_token", "id_token"})
"""Query parameters that carry a token (RFC 6750 §2.3, OpenID Connect): refused in any case."""


class AuthnConfig(StageConfig):
    """Configuration of the ``authn`` stage.

    ``publicUrl``: the origin agents reach the gateway at (``https://mcp.example.com``);
    ``up`` and ``serve`` set it from ``--public-url`` (``up``: ``http://<listen>`` by
    default) when the pipeline file does not.

    ``workloadAgent``: the ``MCPAgent`` (one without ``spec.identity``) that every caller
    without an ``Authorization`` header is, because the deployment only lets that agent
    in: the controller sets it in an injected sidecar's pipeline, ``up`` (and ``check``)
    when the file's only agent declares no identity.
    """

    jwks_cache_seconds: float = Field(default=300.0, gt=0, alias="jwksCacheSeconds")
    jwks_refetch_seconds: float = Field(default=10.0, ge=0, alias="jwksRefetchSeconds")
    jwks_timeout_seconds: float = Field(default=2.0, gt=0, alias="jwksTimeoutSeconds")
    leeway_seconds: float = Field(default=30.0, ge=0, alias="leewaySeconds")
    public_url: str | None = Field(default=None, alias="publicUrl")
    workload_agent: str | None = Field(default=None, alias="workloadAgent")

    @field_validator("public_url")
    @classmethod
    def _origin(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return public_origin(value, "publicUrl")
        except ConfigError as exc:
            raise ValueError(str(exc)) from None


class _Public:
    """Per exchange: the origin the ``authn`` stage's challenges name (read by :func:`insufficient_scope`)."""

    __slots__ = ("origin",)

    def __init__(self) -> None:
        self.origin = UNCONFIGURED_ORIGIN


_PUBLIC: Final = StateKey("authn:public", _Public)


class _Refused(Exception):
    """A token was refused; ``status`` 401 or 403, ``error`` the RFC 6750 code."""

    def __init__(self, message: str, *, status: int = 401, error: str = "invalid_token") -> None:
        super().__init__(message)
        self.status = status
        self.error = error


def token_parameter(path: str) -> str | None:
    """The token-carrying query parameter of ``path`` (:data:`URL_TOKEN_PARAMETERS`), if any.

    Names are compared percent-decoded and in any case, split on ``&`` and ``;``
    as servers variously do; the value is never looked at.
    """
    _, sep, query = path.partition("?")
    if not sep:
        return None
    for field in re.split(r"[&;]", query.partition("#")[0]):
        name = unquote_plus(field.partition("=")[0]).strip().lower()
        if name in URL_TOKEN_PARAMETERS:
            return name
    return None


def public_origin_of(ctx: Context) -> str:
    """The configured public origin the ``authn`` stage recorded for this exchange."""
    return ctx.state(_PUBLIC).origin


def metadata_url(ctx: Context, server: str | None) -> str:
    """Where this server's RFC 9728 protected-resource metadata is served."""
    suffix = f"/{server}/mcp" if server else ""
    return f"{public_origin_of(ctx)}{WELL_KNOWN}{suffix}"


def challenge(ctx: Context, server: str | None, error: str | None = None, **params: str) -> str:
    """A ``WWW-Authenticate: Bearer`` challenge pointing at the metadata."""
    parts = [f'resource_metadata="{metadata_url(ctx, server)}"']
    if error:
        parts.append(f'error="{error}"')
    for name, value in params.items():
        parts.append(f'{name}="{value.replace(chr(34), chr(39))}"')
    return "Bearer " + ", ".join(parts)


def _route(ctx: Context) -> str:
    """``MCPServer 'x'`` or ``MCPVirtualServer 'x'``: what the agent called."""
    kind = "MCPVirtualServer" if ctx.virtual is not None else "MCPServer"
    return f"{kind} {ctx.route_name!r}"


def _references(agent: MCPAgent, ctx: Context) -> bool:
    """True when ``agent`` may use what the exchange addresses (a server, or a virtual server:
    its backends are then reached only through it)."""
    name = ctx.route_name
    if name is None:
        return True  # no server here: the mcp stage answers 404
    kind = "MCPVirtualServer" if ctx.virtual is not None else "MCPServer"
    return any(r.name == name and r.kind == kind for r in agent.spec.mcp_server_refs)


def insufficient_scope(ctx: Context, missing: list[str], message: str) -> Deny:
    """The 403 a rule answers when the token lacks scopes it requires."""
    server = ctx.route_name
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


def workload_problems(catalog: Catalog, workload_agent: str | None) -> list[str]:
    """What is wrong with who may call without a token: ``workloadAgent`` and the agents without ``spec.identity``.

    An agent without an identity is identified only by the deployment: it must be the
    ``workloadAgent`` (one per extension server). Everywhere else (a gateway, ``up``
    with several agents) nothing could tell its callers apart, so a JWT is required.
    """
    problems: list[str] = []
    if workload_agent is not None:
        agent = catalog.agents.get(workload_agent)
        if agent is None:
            problems.append(f"workloadAgent {workload_agent!r}: no MCPAgent of that name is declared")
        elif agent.spec.identity is not None:
            problems.append(
                f"workloadAgent {workload_agent!r}: MCPAgent {workload_agent!r} declares spec.identity, so its "
                "callers must prove it; workloadAgent names an agent without spec.identity"
            )
    for name, agent in sorted(catalog.agents.items()):
        if agent.spec.identity is None and name != workload_agent:
            problems.append(
                f"MCPAgent {name!r} declares no spec.identity, and this extension server does not serve it alone: "
                "a JWT is required (spec.identity.jwt) on a gateway and with several MCPAgents; only a sidecar, "
                "or up with this one MCPAgent, identifies its caller without one (authn's workloadAgent)"
            )
    for name, server in sorted(catalog.servers.items()):
        auth = server.spec.upstream_auth
        if auth is None or auth.token_exchange is None:
            continue
        for agent in catalog.agents_for(name):
            if agent.jwt is None:
                problems.append(
                    f"warning: MCPServer {name!r} exchanges the caller's token (upstreamAuth.tokenExchange), but "
                    f"MCPAgent {agent.name!r} declares no spec.identity.jwt: its calls there without a JWT get 401"
                )
    return problems


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
    """Authenticate every request: a declared ``MCPAgent``'s bearer JWT, else the agent the deployment identifies."""

    name: ClassVar[str] = "authn"
    _warned_unconfigured: bool = False

    @property
    def origin(self) -> str:
        """The public origin every URL this stage hands out starts with."""
        configured = self.config.public_url
        if configured is not None:
            return configured
        if not self._warned_unconfigured:
            self._warned_unconfigured = True
            log.warning(
                "authn: no public URL configured (--public-url, or publicUrl in the authn config): "
                "WWW-Authenticate and the protected-resource metadata name %s",
                UNCONFIGURED_ORIGIN,
            )
        return UNCONFIGURED_ORIGIN

    async def startup(self) -> None:
        config = self.config
        self._client = httpx.AsyncClient(
            timeout=config.jwks_timeout_seconds,
            trust_env=False,
            follow_redirects=False,
            verify=client_context(trust_env=False),
        )
        self.jwks = JwksCache(self._client, ttl=config.jwks_cache_seconds, min_refetch=config.jwks_refetch_seconds)

    async def shutdown(self) -> None:
        await self._client.aclose()

    def check(self, catalog: Catalog) -> list[str]:
        problems = workload_problems(catalog, self.config.workload_agent)
        if not catalog.agents:
            problems.append("warning: no MCPAgent declared: requests are not authenticated (anonymous principal)")
        return problems

    async def on_request_headers(self, ctx: Context) -> Verdict:
        catalog = ctx.catalog
        if (parameter := token_parameter(ctx.path)) is not None:
            ctx.explain(f"authn: a token in the URL ({parameter}) is refused")
            return Deny(
                status=400,
                code=INVALID_REQUEST,
                message=(
                    f"a token in the URL ({parameter}) is not accepted (OAuth 2.1): "
                    "send it in the Authorization header, Authorization: Bearer <token>"
                ),
                reason="token_in_url",
            )
        path = ctx.path.split("?", 1)[0]
        if path == WELL_KNOWN or path.startswith(WELL_KNOWN + "/"):
            return self._metadata(ctx, catalog, path)
        if catalog is None or not catalog.agents:
            ctx.principal = Principal(subject="anonymous")
            return None
        ctx.state(_PUBLIC).origin = self.origin
        server = ctx.route_name
        if "authorization" not in ctx.request_headers:
            known = self._without_token(ctx, catalog)
            if known is not None:
                return known
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

    def _without_token(self, ctx: Context, catalog: Catalog) -> Verdict:
        """A caller without a token whom the deployment identifies; ``None``: nobody (then 401)."""
        if ctx.peer is not None:
            agent = next((a for _, a in sorted(catalog.agents.items()) if a.spiffe_id == ctx.peer), None)
            if agent is None or agent.spec.identity is None:
                ctx.explain(f"authn: the mTLS peer {ctx.peer!r} is no MCPAgent's serviceAccount")
                return None
            issuer = f"spiffe://{agent.spec.identity.trust_domain}"
            subject, how = ctx.peer, f"mTLS peer {ctx.peer!r}"
        elif (name := self.config.workload_agent) is not None:
            agent = catalog.agents.get(name)
            if agent is None or agent.spec.identity is not None:
                return None  # refused by check(); never a principal the resources do not vouch for
            issuer, subject, how = WORKLOAD_ISSUER, agent.name, "the workload this extension server serves"
        else:
            return None
        if not _references(agent, ctx):
            message = f"MCPAgent {agent.name!r} does not reference {_route(ctx)}"
            ctx.explain(f"authn: {message}")
            return Deny(status=403, code=UNAUTHENTICATED, message=message, reason="forbidden_agent")
        granted, consented = _trust(agent, {})
        ctx.principal = Principal(
            subject=subject, issuer=issuer, agent=agent.name, granted=granted, consented=consented
        )
        ctx.explain(f"authn: MCPAgent {agent.name!r} as {how}")
        return Continue(metadata={"principal": subject})

    async def _authenticate(self, ctx: Context, catalog: Catalog, token: str) -> Principal:
        import jwt  # on first use: PyJWT and cryptography weigh about 9 MB, needless without agents

        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _Refused("the bearer token is not a well-formed JWT") from None
        issuer = unverified.get("iss")
        candidates = [a for _, a in sorted(catalog.agents.items()) if a.jwt is not None and a.jwt.issuer == issuer]
        if not candidates:
            raise _Refused("the token's issuer is not trusted by any MCPAgent")
        alg = header.get("alg")
        kid = header.get("kid")
        if not isinstance(kid, (str, type(None))):
            raise _Refused("the token's kid header is not a string")
        claims: dict[str, Any] | None = None
        last: _Refused | None = None
        for agent in candidates:
            ident = agent.jwt
            assert ident is not None
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
            if not _references(agent, ctx):
                last = _Refused(
                    f"MCPAgent {agent.name!r} does not reference {_route(ctx)}",
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
        origin = self.origin
        if server_name is None:
            agents = sorted(catalog.agents.values(), key=lambda a: a.name)
            resource = origin + "/"
        else:
            agents = catalog.agents_for(server_name)
            resource = f"{origin}/{server_name}/mcp"
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
            "authorization_servers": sorted({a.jwt.issuer for a in agents if a.jwt is not None}),
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
