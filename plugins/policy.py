"""The ``policy`` stage: ``MCPToolPolicy`` rules, trust, scopes, Rego and rate limits.

Data flow for a ``tools/call`` (and, with ``listing`` set and no arguments, for
each tool of a ``tools/list`` result, so a tool the caller may not call is not
listed)::

    grants and consents for the server (plugins.lib.grants.standing, never cached: a
        revocation or an expiry counts from the next request)
        refused ──▶ 403 no_matching_grant / consent_revoked / consent_expired, or -32003
        a standing ──▶ the caller's granted = its ceiling, consented = its consent
        no grants ──▶ the caller as authn found it (MCPAgent.spec.trust)
    policies = MCPToolPolicies targeting the server, plus the agent's policyRefs
    cache[(catalog generation, caller digest, server, tool, sha256(arguments),
           sha256(annotations), listing)] hit? ──▶ decision
        caller digest = sha256 of the validated token and of every Principal field a
        decision reads (claims, scopes, agent, granted and consented trust), so a token of
        the same subject with fewer scopes, lower consent or another claim decides afresh
    rules (policy_rules.check_rules): first matching rule per policy
        Deny rule, trust too low (200, -32003), scopes missing (403 insufficient_scope)
    Rego, per policy that has one: EmbeddedRego (compiled once per module) or RemoteOpa
        false / undefined ──▶ deny (-32003); backend down ──▶ deny 503 (fail closed)
    ──▶ decision cached for decisionCacheSeconds
    allowed calls ──▶ rate limit (token bucket per principal, or per principal and tool)
        empty ──▶ 429 + Retry-After

Each decision is explained on the context (the audit line's ``rule``). The
batch, JSON and SSE handling is :class:`plugins.lib.toolgate.ToolGate`'s. Cache keys hold
digests only, never a token. Rate-limit buckets are per caller (``issuer|subject``), not
per token: a fresh token does not refill them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, ClassVar, Final

from pydantic import Field

from extproc.api import Context, Deny, FailureMode, Principal, StageConfig, StateKey
from extproc.config.models import MCPAccessGrant, MCPConsent, MCPToolPolicy, Rego
from extproc.config.resources import Catalog, MCPServer
from extproc.errors import ConfigError, PolicyBackendError
from extproc.mcp.codes import POLICY_DENIED, RATE_LIMITED
from extproc.mcp.jsonrpc import Message
from extproc.mcp.spec import INTERNAL_ERROR
from plugins.authn import insufficient_scope
from plugins.lib import grants
from plugins.lib.buckets import TokenBuckets, TtlCache
from plugins.lib.policy_rules import Decision, check_rules, read_rego_value, rego_input, trust_level
from plugins.lib.rego import EmbeddedRego, RegoBackend, RemoteOpa, compile_problem
from plugins.lib.toolgate import ToolGate

log = logging.getLogger("mcp_extproc.policy")

_ANONYMOUS: Final = Principal(subject="anonymous")
_ANNOTATIONS_KEPT_S: Final = 7 * 24 * 3600.0
"""How long a tool's annotations from a ``tools/list`` are remembered (its side effect for grants)."""


def _sha256(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def caller_digest(principal: Principal) -> str:
    """A digest of everything a decision reads about the caller: the key the cache uses for it.

    The validated token (its claims, scopes, consent) and the fields the ``authn`` stage
    derived from it and the catalog (agent, granted and consented trust). Two tokens of
    one subject that differ in anything get different digests. The token itself never
    enters a cache key: only this digest does.
    """
    fields = [
        principal.issuer,
        principal.subject,
        principal.agent,
        principal.granted,
        principal.consented,
        sorted(principal.scopes),
        dict(principal.claims),
    ]
    digest = hashlib.sha256(principal.token.encode())
    digest.update(b"\0" + json.dumps(fields, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class _Caller:
    """Per exchange: the caller digest, computed once for every tool of a ``tools/list``."""

    __slots__ = ("digest", "principal")

    def __init__(self) -> None:
        self.principal: Principal | None = None
        self.digest = ""


_CALLER = StateKey("policy_caller", _Caller)


class PolicyConfig(StageConfig):
    """Configuration of the ``policy`` stage.

    Attributes:
        user_claim: the validated token's claim that names the user grants and consents match.
        groups_claim: the claim listing the user's groups (a list, or a space-separated string).
    """

    decision_cache_seconds: float = Field(default=5.0, ge=0, alias="decisionCacheSeconds")
    decision_cache_size: int = Field(default=10_000, gt=0, alias="decisionCacheSize")
    rate_limit_keys: int = Field(default=100_000, gt=0, alias="rateLimitKeys")
    user_claim: str = Field(default="sub", min_length=1, alias="userClaim")
    groups_claim: str = Field(default="groups", min_length=1, alias="groupsClaim")


def rego_module(catalog: Catalog, policy: MCPToolPolicy) -> str | None:
    """The Rego source of ``policy`` (inline or from its ConfigMap), ``None`` for remote OPA.

    Raises:
        ConfigError: the ConfigMap or key is missing.
    """
    rego = policy.spec.rego
    if rego is None or rego.remote is not None:
        return None
    if rego.module is not None:
        return rego.module
    assert rego.config_map_ref is not None
    return catalog.config_value(rego.config_map_ref)


class PolicyStage(ToolGate[PolicyConfig]):
    """Decide every tool call with rules, trust, scopes and Rego; hide what may not be called."""

    name: ClassVar[str] = "policy"

    def __init__(
        self,
        config: PolicyConfig,
        failure_mode: FailureMode = FailureMode.CLOSED,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(config, failure_mode)
        self._cache: TtlCache[Decision] = TtlCache(config.decision_cache_seconds, config.decision_cache_size)
        self._buckets = TokenBuckets(config.rate_limit_keys)
        self._backends: dict[str, RegoBackend] = {}  # by the Rego source, so reloads reuse compiled policies
        # Every listed tool: (its annotations, None when it has none); absent: never listed.
        self._listed: TtlCache[tuple[Mapping[str, Any] | None]] = TtlCache(_ANNOTATIONS_KEPT_S, 10_000)
        self._now = now

    async def shutdown(self) -> None:
        for backend in self._backends.values():
            await backend.close()

    def check(self, catalog: Catalog) -> list[str]:
        problems = []
        for name, policy in sorted(catalog.policies.items()):
            try:
                module = rego_module(catalog, policy)
            except ConfigError as exc:
                problems.append(f"MCPToolPolicy {name!r}: spec.rego.configMapRef: {exc}")
                continue
            if module is not None and policy.spec.rego is not None:
                problem = compile_problem(f"{name}.rego", module, policy.spec.rego.query)
                if problem is not None:
                    problems.append(f"MCPToolPolicy {name!r}: spec.rego: {problem}")
        return problems + self._grant_warnings(catalog)

    def _grant_warnings(self, catalog: Catalog) -> list[str]:
        """Grants and consents that can never match, and consents already lapsed (warnings: nothing is refused)."""
        found: list[str] = []
        tokens = any(a.jwt is not None for a in catalog.agents.values())
        documents = [("MCPAccessGrant", n, g.spec.subject) for n, g in sorted(catalog.grants.items())]
        documents += [("MCPConsent", n, c.spec.subject) for n, c in sorted(catalog.consents.items())]
        for kind, name, subject in documents:
            if subject.agent is not None and subject.agent not in catalog.agents:
                found.append(
                    f"warning: {kind} {name!r}: subject.agent {subject.agent!r} is no MCPAgent: it never matches"
                )
            if (subject.user is not None or subject.group is not None) and not tokens:
                found.append(
                    f"warning: {kind} {name!r}: subject names a user or group, but no MCPAgent declares "
                    "identity.jwt: users and groups come only from validated tokens, so it never matches"
                )
        now = self._now()
        for name, consent in sorted(catalog.consents.items()):
            if consent.expired(now) and not consent.spec.revoked:
                assert consent.spec.expires_at is not None
                found.append(
                    f"warning: MCPConsent {name!r}: expired at {consent.spec.expires_at.isoformat()}: "
                    "the calls it covers are refused"
                )
        return found

    # -- which policies ---------------------------------------------------------------------

    def _policies(self, ctx: Context, server: MCPServer) -> list[MCPToolPolicy]:
        catalog = ctx.catalog
        if catalog is None or not catalog.policies:
            return []
        found = catalog.policies_for(server.name)
        principal = ctx.principal
        agent = catalog.agents.get(principal.agent) if principal is not None and principal.agent else None
        if agent is not None:
            for ref in agent.spec.policy_refs:
                extra = catalog.policies.get(ref.name)
                if extra is not None and extra not in found:
                    found.append(extra)
        return found

    def applies(self, ctx: Context, server: MCPServer) -> bool:
        return bool(self._policies(ctx, server)) or any(_grants_and_consents(ctx, server))

    def _annotations(self, server: MCPServer, tool: str) -> Mapping[str, Any] | None:
        """The tool's annotations in the last ``tools/list`` seen (``None``: none, or never listed)."""
        found = self._listed.get((server.name, tool))
        return found[0] if found is not None else None

    # -- grants and consents ----------------------------------------------------------------

    def _standing(
        self,
        ctx: Context,
        server: MCPServer,
        policies: list[MCPToolPolicy],
        principal: Principal,
        tool: str,
        annotations: Mapping[str, Any] | None,
    ) -> grants.Standing | grants.Refusal | None:
        found, consents = _grants_and_consents(ctx, server)
        if not found and not consents:
            return None
        assert ctx.catalog is not None
        agent = ctx.catalog.agents.get(principal.agent) if principal.agent else None
        claim_cap = None
        claim = agent.spec.trust.consent_claim if agent is not None else None
        if claim is not None and principal.token and claim in principal.claims:
            claim_cap = trust_level(principal.consented)  # authn read the claim into consented
        return grants.standing(
            found,
            consents,
            grants.caller_of(principal, user_claim=self.config.user_claim, groups_claim=self.config.groups_claim),
            server=server.name,
            tool=tool,
            effect=grants.side_effect(policies, tool, annotations),
            now=self._now(),
            agent_ceiling=trust_level(principal.granted),
            claim_cap=claim_cap,
        )

    # -- decisions --------------------------------------------------------------------------

    async def refuse_call(self, ctx: Context, server: MCPServer, message: Message) -> Deny | None:
        tool = message.tool_name or ""
        policies = self._policies(ctx, server)
        principal = ctx.principal or _ANONYMOUS
        seen = self._listed.get((server.name, tool))
        listed = None if seen is None else (seen[0] or {})  # listed without annotations: {}
        found = self._standing(ctx, server, policies, principal, tool, listed)
        if isinstance(found, grants.Refusal):
            ctx.explain(found.explanation)
            ctx.audit("trust", {"grant": found.grant, "consent": found.consent})
            return Deny(status=found.status, code=POLICY_DENIED, message=found.message, reason=found.reason)
        if found is not None:
            ctx.audit("trust", found.audit())
            principal = _with_standing(principal, found)
        decision = await self._decide(
            ctx, policies, principal, server, tool, message.arguments, listing=False, standing=found
        )
        if decision.explanation:
            ctx.explain(decision.explanation)
        if not decision.allowed:
            if decision.missing_scopes:
                return insufficient_scope(ctx, list(decision.missing_scopes), decision.message)
            status = 503 if decision.reason == "policy_backend" else 200
            code = INTERNAL_ERROR if status == 503 else POLICY_DENIED
            return Deny(status=status, code=code, message=decision.message, reason=decision.reason)
        return self._rate_limit(ctx, policies, principal, tool)

    async def hide_tool(self, ctx: Context, server: MCPServer, name: str, tool: Mapping[str, Any]) -> bool:
        given = tool.get("annotations")
        annotations = given if isinstance(given, Mapping) else None
        self._listed.put((server.name, name), (annotations,))
        listed = annotations or {}
        principal = ctx.principal or _ANONYMOUS
        policies = self._policies(ctx, server)
        found = self._standing(ctx, server, policies, principal, name, listed)
        if isinstance(found, grants.Refusal):
            return True
        if found is not None:
            principal = _with_standing(principal, found)
        decision = await self._decide(ctx, policies, principal, server, name, None, listing=True, standing=found)
        return not decision.allowed

    async def _decide(
        self,
        ctx: Context,
        policies: list[MCPToolPolicy],
        principal: Principal,
        server: MCPServer,
        tool: str,
        arguments: Mapping[str, Any] | None,
        *,
        listing: bool,
        standing: grants.Standing | None = None,
    ) -> Decision:
        generation = ctx.catalog.generation if ctx.catalog is not None else -1
        annotations = self._annotations(server, tool)
        key = (
            generation,
            self._caller(ctx, principal),
            server.name,
            ctx.virtual.name if ctx.virtual is not None else None,
            tool,
            _sha256(arguments),
            None if annotations is None else _sha256(annotations),
            listing,
            None if standing is None else (standing.grant, standing.consent),
        )
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        decision = check_rules(policies, principal, tool)
        if decision.allowed:
            decision = await self._rego(
                ctx,
                policies,
                principal,
                server,
                tool,
                arguments,
                decision,
                listing=listing,
                annotations=annotations,
                standing=standing,
            )
        if decision.reason != "policy_backend":
            self._cache.put(key, decision)
        return decision

    @staticmethod
    def _caller(ctx: Context, principal: Principal) -> str:
        memo = ctx.state(_CALLER)
        if memo.principal is not principal:
            memo.principal, memo.digest = principal, caller_digest(principal)
        return memo.digest

    async def _rego(
        self,
        ctx: Context,
        policies: list[MCPToolPolicy],
        principal: Principal,
        server: MCPServer,
        tool: str,
        arguments: Mapping[str, Any] | None,
        ruled: Decision,
        *,
        listing: bool,
        annotations: Mapping[str, Any] | None,
        standing: grants.Standing | None,
    ) -> Decision:
        explanations = list(ruled.checks)
        for policy in policies:
            rego = policy.spec.rego
            if rego is None:
                continue
            document = rego_input(
                principal=principal,
                server=server.name,
                tool=tool,
                arguments=arguments,
                annotations=annotations,
                required=ruled.required,
                policy=policy.name,
                listing=listing,
                virtual=ctx.virtual.name if ctx.virtual is not None else None,
                standing=None if standing is None else standing.audit(),
            )
            try:
                backend = self._backend(ctx, policy, rego)
                value = await backend.evaluate(document)
            except (PolicyBackendError, ConfigError) as exc:
                log.warning("MCPToolPolicy %r: %s", policy.name, exc)
                return Decision(
                    False,
                    "policy_backend",
                    f"MCPToolPolicy {policy.name!r}: {exc}",
                    message="the policy backend cannot decide; the call was not forwarded",
                )
            allowed, why = read_rego_value(value)
            shown = json.dumps(value, default=str)[:200]
            where = f"MCPToolPolicy {policy.name!r} rego {rego.query} = {shown}"
            if not allowed:
                return Decision(
                    False,
                    "rego",
                    where,
                    message=f"tool {tool!r} is denied by policy {policy.name!r}" + (f": {why}" if why else ""),
                )
            explanations.append(where)
        return Decision(True, "", "; ".join(explanations), required=ruled.required)

    def _backend(self, ctx: Context, policy: MCPToolPolicy, rego: Rego) -> RegoBackend:
        if rego.remote is not None:
            key = f"remote:{rego.remote.url}:{rego.query}:{rego.remote.timeout_seconds}"
            if key not in self._backends:
                self._backends[key] = RemoteOpa(rego.remote.url, rego.query, rego.remote.timeout_seconds)
            return self._backends[key]
        assert ctx.catalog is not None
        module = rego_module(ctx.catalog, policy) or ""
        key = f"embedded:{rego.query}:{hashlib.sha256(module.encode()).hexdigest()}"
        if key not in self._backends:
            self._backends[key] = EmbeddedRego(f"{policy.name}.rego", module, rego.query)
        return self._backends[key]

    def _rate_limit(self, ctx: Context, policies: list[MCPToolPolicy], principal: Principal, tool: str) -> Deny | None:
        for policy in policies:
            limit = policy.spec.rate_limit
            if limit is None:
                continue
            key = (policy.name, principal.key) if limit.key == "principal" else (policy.name, principal.key, tool)
            wait = self._buckets.take(key, limit.requests, limit.per_seconds)
            if wait > 0:
                retry = max(1, math.ceil(wait))
                per = "caller" if limit.key == "principal" else "caller and tool"
                ctx.explain(
                    f"MCPToolPolicy {policy.name!r} rateLimit: {limit.requests}/{limit.per_seconds:g}s per {per}"
                )
                return Deny(
                    status=429,
                    code=RATE_LIMITED,
                    message=f"rate limit of policy {policy.name!r} exceeded; retry in {retry} s",
                    reason="rate_limited",
                    data={"retryAfterSeconds": retry},
                    headers={"retry-after": str(retry)},
                )
        return None


def _grants_and_consents(ctx: Context, server: MCPServer) -> tuple[list[MCPAccessGrant], list[MCPConsent]]:
    """The grants and consents for ``server``, or for the virtual server the call came through."""
    catalog = ctx.catalog
    if catalog is None or not (catalog.grants or catalog.consents):
        return [], []
    virtual = ctx.virtual.name if ctx.virtual is not None else None
    return catalog.grants_for(server.name, virtual), catalog.consents_for(server.name, virtual)


def _with_standing(principal: Principal, standing: grants.Standing) -> Principal:
    """``principal`` with the trust its grants and consents give (what rules and Rego read)."""
    return dataclasses.replace(principal, granted=standing.ceiling.value, consented=standing.consented.value)
