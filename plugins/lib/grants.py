"""Grants and consent: the trust a caller has on a server (``MCPAccessGrant``, ``MCPConsent``).

Pure: no I/O, no clock of its own (the caller passes ``now``). The ``policy`` stage asks
:func:`standing` for every ``tools/call`` and for every tool of a ``tools/list`` before
its rules and Rego, and never caches the answer (a revocation or an expiry counts from
the next request)::

    grants = MCPAccessGrants targeting the server, or the virtual server the call came through
    caller = (user: the validated token's user claim; groups: its groups claim; agent)
        no grants and no consent for the caller ──▶ None: nothing changes (as before grants)
        no grants ──▶ the ceiling is MCPAgent.spec.trust.granted; consents below apply
    matching = enabled grants whose subject matches the caller
        none ──▶ 403 no_matching_grant
    side effect of the tool = an MCPToolPolicy rule's sideEffect, else its annotations
        (readOnlyHint ─▶ read, destructiveHint ─▶ destructive, else write), else unknown
        (never listed: counted as destructive, so only a grant allowing it covers it)
    counting = matching grants allowing that side effect whose first matching tool rule
        is not a Deny
        none ──▶ -32003 grant_side_effect (or grant_deny when a rule took the tool out)
    ceiling = highest maxTrust of counting (the grant: the first with it, by name)
    consents covering the server and the caller
        any revoked ──▶ 403 consent_revoked; any expired ──▶ 403 consent_expired
        consented = the lowest consentedTrust of them, else the ceiling
        (the agent's consent claim, when it declares one, lowers it further)
    effective = min(ceiling, consented); required = highest requiredTrust of the counting
    grants' matching Allow rules
        effective < required ──▶ -32003 insufficient_trust
    ──▶ Standing: the policy rules and Rego then decide with granted = ceiling and
        consented = consented (so MCPToolPolicy requiredTrust is checked against effective)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from extproc.api import Principal
from extproc.config.models import MCPAccessGrant, MCPConsent, MCPToolPolicy, SideEffect, Subject, Trust
from plugins.lib.policy_rules import first_rule, matching_rule


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, as grants and consents match it.

    Attributes:
        user: the validated token's user (``None`` without a token: a header never names one).
        groups: the token's groups.
        agent: the ``MCPAgent`` the caller was matched to.
    """

    user: str | None
    groups: frozenset[str]
    agent: str | None

    def matches(self, subject: Subject) -> bool:
        """Every field ``subject`` gives matches."""
        return (
            (subject.user is None or subject.user == self.user)
            and (subject.agent is None or subject.agent == self.agent)
            and (subject.group is None or subject.group in self.groups)
        )

    def shown(self) -> str:
        """``user alice, agent ops`` (for messages: names, never a token)."""
        parts = [
            f"user {self.user!r}" if self.user else "no user",
            f"agent {self.agent!r}" if self.agent else "no agent",
        ]
        return ", ".join(parts)


def caller_of(principal: Principal, *, user_claim: str, groups_claim: str) -> Caller:
    """The caller of ``principal``: its user and groups from the validated token only."""
    claims: Mapping[str, Any] = principal.claims if principal.token else {}
    user = claims.get(user_claim)
    groups = claims.get(groups_claim)
    if isinstance(groups, str):
        found = frozenset(groups.split())
    elif isinstance(groups, list):
        found = frozenset(g for g in groups if isinstance(g, str))
    else:
        found = frozenset()
    return Caller(user if isinstance(user, str) and user else None, found, principal.agent)


def side_effect(
    policies: Sequence[MCPToolPolicy], tool: str, annotations: Mapping[str, Any] | None
) -> SideEffect | None:
    """What calling ``tool`` may do: declared by a policy rule, else from its annotations; ``None``: unknown."""
    for policy in policies:
        found = matching_rule(policy, tool)
        if found is not None and found[1].side_effect is not None:
            return found[1].side_effect
    if annotations is None:
        return None
    if annotations.get("readOnlyHint") is True:
        return SideEffect.READ
    if annotations.get("destructiveHint") is True:
        return SideEffect.DESTRUCTIVE
    return SideEffect.WRITE


@dataclass(frozen=True, slots=True)
class Standing:
    """What the grants and consents give the caller for one tool.

    Attributes:
        ceiling: the highest ``maxTrust`` of the grants that cover the tool (without
            grants: the agent's granted trust).
        consented: what the consents (and the agent's consent claim) allow, else the ceiling.
        grant: the grant that gave the ceiling (``None``: no grants apply).
        consent: the consent that set ``consented`` (``None``: no consent record).
        required: the highest ``requiredTrust`` of the grants' matching rules.
        side_effect: the tool's side effect as judged (``None``: unknown).
    """

    ceiling: Trust
    consented: Trust
    grant: str | None
    consent: str | None
    required: Trust
    side_effect: SideEffect | None

    @property
    def effective(self) -> Trust:
        """``min(ceiling, consented)``."""
        return min(self.ceiling, self.consented, key=lambda t: t.rank)

    def audit(self) -> dict[str, Any]:
        """The audit line's ``trust`` field and the Rego input's additions."""
        return {
            "ceiling": self.ceiling.value,
            "consented": self.consented.value,
            "effective": self.effective.value,
            "grant": self.grant,
            "consent": self.consent,
        }


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why the grants or consents refuse the tool.

    Attributes:
        status: 403 (no grant, consent revoked or expired) or 200 (a JSON-RPC error).
        reason: the machine reason (``no_matching_grant``, ``consent_revoked``…).
        message: what the caller reads.
        explanation: what the audit line says (grant and consent names).
        grant, consent: the grant and consent involved, if any.
    """

    status: int
    reason: str
    message: str
    explanation: str
    grant: str | None = None
    consent: str | None = None


def standing(
    grants: Sequence[MCPAccessGrant],
    consents: Sequence[MCPConsent],
    caller: Caller,
    *,
    server: str,
    tool: str,
    effect: SideEffect | None,
    now: datetime,
    agent_ceiling: Trust = Trust.LOW,
    claim_cap: Trust | None = None,
) -> Standing | Refusal | None:
    """Decide ``caller``'s standing for ``tool`` (``None``: no grant or consent applies, nothing changes).

    ``agent_ceiling``: the agent's granted trust, the ceiling where no grant applies.
    """
    covering = [c for c in consents if caller.matches(c.spec.subject)]
    if not grants:
        if not covering:
            return None
        return _consented(covering, caller, server, tool, agent_ceiling, None, Trust.LOW, effect, now, claim_cap)
    matching = [g for g in grants if not g.spec.disabled and caller.matches(g.spec.subject)]
    if not matching:
        return Refusal(
            403,
            "no_matching_grant",
            f"no MCPAccessGrant gives {caller.shown()} access to MCP server {server!r}",
            f"MCPAccessGrants {[g.name for g in grants]}: none enabled for {caller.shown()}",
        )
    counting, required, denied_by = _counting(matching, tool, effect)
    if not counting:
        return _not_covered(matching, tool, effect, denied_by)
    top = max(counting, key=lambda g: g.spec.max_trust.rank)
    return _consented(covering, caller, server, tool, top.spec.max_trust, top.name, required, effect, now, claim_cap)


def _consented(
    covering: Sequence[MCPConsent],
    caller: Caller,
    server: str,
    tool: str,
    ceiling: Trust,
    grant: str | None,
    required: Trust,
    effect: SideEffect | None,
    now: datetime,
    claim_cap: Trust | None,
) -> Standing | Refusal:
    """The standing under ``ceiling`` once the consents covering the caller are applied."""
    for consent in covering:
        if consent.spec.revoked:
            return Refusal(
                403,
                "consent_revoked",
                f"the consent for {caller.shown()} on MCP server {server!r} was revoked",
                f"MCPConsent {consent.name!r}: revoked",
                grant,
                consent.name,
            )
    for consent in covering:
        expires = consent.spec.expires_at
        if expires is not None and consent.expired(now):
            return Refusal(
                403,
                "consent_expired",
                f"the consent for {caller.shown()} on MCP server {server!r} expired at {expires.isoformat()}",
                f"MCPConsent {consent.name!r}: expired at {expires.isoformat()}",
                grant,
                consent.name,
            )
    consented, consent_name = ceiling, None
    if covering:
        lowest = min(covering, key=lambda c: c.spec.consented_trust.rank)
        consented, consent_name = lowest.spec.consented_trust, lowest.name
    if claim_cap is not None and claim_cap.rank < consented.rank:
        consented = claim_cap
    found = Standing(ceiling, consented, grant, consent_name, required, effect)
    if found.effective.rank < required.rank:
        return Refusal(
            200,
            "insufficient_trust",
            f"tool {tool!r} requires trust {required.value}; the caller has {found.effective.value}",
            f"MCPAccessGrant {grant!r}: requires trust {required.value}; effective {found.effective.value} "
            f"(ceiling {ceiling.value}, consented {consented.value}"
            + (f" by MCPConsent {consent_name!r})" if consent_name else ")"),
            grant,
            consent_name,
        )
    return found


def _counting(
    matching: Sequence[MCPAccessGrant], tool: str, effect: SideEffect | None
) -> tuple[list[MCPAccessGrant], Trust, str | None]:
    """The grants covering ``tool``, the trust their rules require, and a grant whose rule denied it."""
    needed = effect or SideEffect.DESTRUCTIVE
    counting: list[MCPAccessGrant] = []
    required = Trust.LOW
    denied_by = None
    for grant in matching:
        if needed not in grant.spec.allowed_side_effects:
            continue
        found = first_rule(grant.spec.tool_rules, tool)
        rule = found[1] if found is not None else None
        if rule is not None and rule.action == "Deny":
            denied_by = denied_by or grant.name
            continue
        if rule is not None and rule.required_trust.rank > required.rank:
            required = rule.required_trust
        counting.append(grant)
    return counting, required, denied_by


def _not_covered(
    matching: Sequence[MCPAccessGrant], tool: str, effect: SideEffect | None, denied_by: str | None
) -> Refusal:
    names = [g.name for g in matching]
    if denied_by is not None:
        return Refusal(
            200,
            "grant_deny",
            f"tool {tool!r} is not granted to the caller",
            f"MCPAccessGrant {denied_by!r}: a tool rule denies {tool!r}",
            denied_by,
        )
    if effect is None:
        return Refusal(
            200,
            "grant_side_effect",
            f"the side effect of tool {tool!r} is not known yet (list the tools first, or declare sideEffect in "
            "an MCPToolPolicy rule); the caller's grants do not allow destructive tools",
            f"MCPAccessGrants {names}: unknown side effect counts as destructive; none allows it",
        )
    return Refusal(
        200,
        "grant_side_effect",
        f"tool {tool!r} is {effect.value}; the caller's grants do not allow {effect.value} tools",
        f"MCPAccessGrants {names}: none allows side effect {effect.value!r}",
    )


__all__ = ["Caller", "Refusal", "Standing", "caller_of", "side_effect", "standing"]
