"""``plugins.lib.grants``: who the caller is, what a tool does, and what its grants and consents give.

Pure functions, no pipeline: ``standing()`` is what the ``policy`` stage asks for every
``tools/call`` and every listed tool (its module docstring is the spec these tests follow).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from extproc.api import Principal
from extproc.config.models import MCPAccessGrant, MCPConsent, MCPToolPolicy, SideEffect, Trust
from extproc.config.resources import parse_documents
from plugins.lib.grants import Caller, Refusal, Standing, caller_of, side_effect, standing
from tests.messages import SERVER_DOC

API = "mcp.extproc.io/v1alpha1"
NOW = datetime(2026, 6, 1, 12, 0, 0, tzinfo=UTC)
ALICE = Caller("alice", frozenset({"ops"}), "agent")


def grant(
    name: str,
    subject: dict[str, str],
    max_trust: str = "medium",
    *,
    effects: list[str] | None = None,
    rules: list[dict[str, Any]] | None = None,
    targets: list[dict[str, str]] | None = None,
    disabled: bool = False,
) -> MCPAccessGrant:
    spec: dict[str, Any] = {
        "targetRefs": targets or [{"kind": "MCPServer", "name": "demo"}],
        "subject": subject,
        "maxTrust": max_trust,
        "disabled": disabled,
    }
    if effects is not None:
        spec["allowedSideEffects"] = effects
    if rules is not None:
        spec["toolRules"] = rules
    doc = {"apiVersion": API, "kind": "MCPAccessGrant", "metadata": {"name": name}, "spec": spec}
    return MCPAccessGrant.model_validate(doc)


def consent(
    name: str,
    trust: str,
    subject: dict[str, str] | None = None,
    *,
    expires: datetime | None = None,
    revoked: bool = False,
    server: dict[str, str] | None = None,
) -> MCPConsent:
    spec: dict[str, Any] = {
        "serverRef": server or {"kind": "MCPServer", "name": "demo"},
        "subject": subject or {"user": "alice", "agent": "agent"},
        "consentedTrust": trust,
        "revoked": revoked,
    }
    if expires is not None:
        spec["expiresAt"] = expires.isoformat()
    return MCPConsent.model_validate(
        {"apiVersion": API, "kind": "MCPConsent", "metadata": {"name": name}, "spec": spec}
    )


def tool_policy(name: str, rules: list[dict[str, Any]]) -> MCPToolPolicy:
    spec = {"targetRefs": [{"kind": "MCPServer", "name": "demo"}], "rules": rules}
    return MCPToolPolicy.model_validate(
        {"apiVersion": API, "kind": "MCPToolPolicy", "metadata": {"name": name}, "spec": spec}
    )


def decide(
    grants: list[MCPAccessGrant],
    consents: list[MCPConsent] | None = None,
    caller: Caller = ALICE,
    *,
    tool: str = "add",
    effect: SideEffect | None = SideEffect.WRITE,
    now: datetime = NOW,
    **kwargs: Any,
) -> Standing | Refusal | None:
    return standing(grants, consents or [], caller, server="demo", tool=tool, effect=effect, now=now, **kwargs)


def allowed(found: Standing | Refusal | None) -> Standing:
    assert isinstance(found, Standing), found
    return found


def refusal(found: Standing | Refusal | None) -> Refusal:
    assert isinstance(found, Refusal), found
    return found


# -- who is calling ------------------------------------------------------------------------


SIGNED = "header.payload.signature"  # stands for a validated token (caller_of only reads whether there is one)


def principal(token: str = SIGNED, **claims: Any) -> Principal:
    return Principal(subject="alice", issuer="https://issuer.test", agent="agent", claims=claims, token=token)


@pytest.mark.parametrize("groups", [["ops", "dev", 7], "ops dev"])
def test_groups_come_from_the_groups_claim_as_a_list_or_a_spaced_string(groups: Any) -> None:
    caller = caller_of(principal(sub="alice", groups=groups), user_claim="sub", groups_claim="groups")
    assert caller == Caller("alice", frozenset({"ops", "dev"}), "agent")
    ops = grant("ops", {"group": "ops"}, "high")
    assert allowed(decide([ops], caller=caller)).grant == "ops"
    assert refusal(decide([grant("sre", {"group": "sre"})], caller=caller)).reason == "no_matching_grant"


def test_the_claims_named_in_the_config_are_read() -> None:
    caller = caller_of(
        principal(sub="opaque-id", email="alice@example.com", roles="admins"), user_claim="email", groups_claim="roles"
    )
    assert (caller.user, caller.groups) == ("alice@example.com", frozenset({"admins"}))
    assert allowed(decide([grant("g", {"user": "alice@example.com", "group": "admins"})], caller=caller))


def test_a_user_comes_only_from_a_validated_token() -> None:
    # Claims without the token (a workload identity, a header-derived principal) name no user.
    caller = caller_of(principal(token="", sub="alice", groups=["ops"]), user_claim="sub", groups_claim="groups")
    assert caller == Caller(None, frozenset(), "agent")
    found = refusal(decide([grant("alice", {"user": "alice"}, "high")], caller=caller))
    assert (found.status, found.reason) == (403, "no_matching_grant")
    assert "no user, agent 'agent'" in found.message
    # The agent alone still matches an agent-only subject.
    assert allowed(decide([grant("by-agent", {"agent": "agent"})], caller=caller)).grant == "by-agent"


@pytest.mark.parametrize("user", [None, "", 42])
def test_a_missing_or_unusable_user_claim_is_no_user(user: Any) -> None:
    claims = {} if user is None else {"sub": user}
    assert caller_of(principal(**claims), user_claim="sub", groups_claim="groups").user is None


def test_every_field_of_the_subject_must_match() -> None:
    both = grant("both", {"user": "alice", "agent": "other-agent"})
    assert refusal(decide([both])).reason == "no_matching_grant"
    assert allowed(decide([grant("both", {"user": "alice", "agent": "agent", "group": "ops"})]))


# -- grants ---------------------------------------------------------------------------------


def test_no_grants_and_no_consents_change_nothing() -> None:
    assert decide([]) is None
    # A consent of someone else does not cover alice either.
    assert decide([], [consent("bob", "low", {"user": "bob"})]) is None


def test_grants_none_of_which_match_are_403_no_matching_grant() -> None:
    carol = Caller("carol", frozenset(), "agent")
    found = refusal(decide([grant("alice-ops", {"user": "alice"}, "high")], caller=carol))
    assert (found.status, found.reason) == (403, "no_matching_grant")
    assert found.message == "no MCPAccessGrant gives user 'carol', agent 'agent' access to MCP server 'demo'"
    assert "'alice-ops'" in found.explanation


def test_a_disabled_grant_gives_nothing_and_still_shuts_the_server() -> None:
    found = refusal(decide([grant("alice-ops", {"user": "alice"}, "high", disabled=True)]))
    assert (found.status, found.reason) == (403, "no_matching_grant")
    enabled = grant("alice-ro", {"user": "alice"}, "low")
    assert allowed(decide([grant("alice-ops", {"user": "alice"}, "high", disabled=True), enabled])).ceiling is Trust.LOW


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({"readOnlyHint": True}, SideEffect.READ),
        ({"readOnlyHint": True, "destructiveHint": True}, SideEffect.READ),
        ({"destructiveHint": True}, SideEffect.DESTRUCTIVE),
        ({"readOnlyHint": False, "destructiveHint": False}, SideEffect.WRITE),
        ({"readOnlyHint": "true"}, SideEffect.WRITE),  # only a JSON true counts
        ({}, SideEffect.WRITE),  # listed without annotations
        (None, None),  # never listed: unknown
    ],
)
def test_the_side_effect_from_annotations(annotations: dict[str, Any] | None, expected: SideEffect | None) -> None:
    assert side_effect([], "tool", annotations) is expected


def test_a_policy_rules_declared_side_effect_wins_over_annotations() -> None:
    declared = tool_policy("p", [{"tools": ["wipe*"], "sideEffect": "read"}, {"tools": ["*"]}])
    assert side_effect([declared], "wipe_cache", {"destructiveHint": True}) is SideEffect.READ
    assert side_effect([declared], "wipe_cache", None) is SideEffect.READ  # known without a listing
    # The first matching rule declares nothing: annotations decide (a later policy may declare).
    assert side_effect([declared], "other", {"destructiveHint": True}) is SideEffect.DESTRUCTIVE
    later = tool_policy("q", [{"tools": ["other"], "sideEffect": "destructive"}])
    assert side_effect([declared, later], "other", {"readOnlyHint": True}) is SideEffect.DESTRUCTIVE


@pytest.mark.parametrize(
    ("effect", "covered"),
    [(SideEffect.READ, True), (SideEffect.WRITE, True), (SideEffect.DESTRUCTIVE, False), (None, False)],
)
def test_a_default_grant_covers_read_and_write_tools(effect: SideEffect | None, covered: bool) -> None:
    found = decide([grant("alice", {"user": "alice"}, "high")], tool="wipe", effect=effect)
    if covered:
        assert allowed(found).side_effect is effect
        return
    refused = refusal(found)
    assert (refused.status, refused.reason) == (200, "grant_side_effect")
    if effect is None:
        assert "the side effect of tool 'wipe' is not known yet" in refused.message
    else:
        assert refused.message == "tool 'wipe' is destructive; the caller's grants do not allow destructive tools"


def test_a_read_only_grant_refuses_write_tools() -> None:
    reader = grant("reader", {"user": "alice"}, "high", effects=["read"])
    assert allowed(decide([reader], effect=SideEffect.READ))
    refused = refusal(decide([reader], effect=SideEffect.WRITE))
    assert (refused.reason, refused.message) == (
        "grant_side_effect",
        "tool 'add' is write; the caller's grants do not allow write tools",
    )


def test_an_unknown_side_effect_counts_as_destructive() -> None:
    wide = grant("wide", {"user": "alice"}, "low", effects=["destructive"])
    assert allowed(decide([wide], effect=None)).side_effect is None
    # Only a grant allowing destructive tools counts toward the ceiling of an unknown tool.
    narrow = grant("a-narrow", {"user": "alice"}, "high")
    found = allowed(decide([narrow, wide], effect=None))
    assert (found.ceiling, found.grant) == (Trust.LOW, "wide")


def test_a_grant_rule_deny_takes_the_tool_out_while_another_grant_still_covers_it() -> None:
    denying = grant("a-deny", {"user": "alice"}, "high", rules=[{"tools": ["delete_*"], "action": "Deny"}])
    refused = refusal(decide([denying], tool="delete_all"))
    assert (refused.status, refused.reason, refused.grant) == (200, "grant_deny", "a-deny")
    assert refused.message == "tool 'delete_all' is not granted to the caller"
    # Other tools still count under the denying grant.
    assert allowed(decide([denying], tool="add")).grant == "a-deny"
    covering = grant("b-ops", {"group": "ops"}, "low")
    found = allowed(decide([denying, covering], tool="delete_all"))
    assert (found.grant, found.ceiling) == ("b-ops", Trust.LOW)


def test_only_the_first_matching_grant_rule_counts() -> None:
    rules = [{"tools": ["add"], "requiredTrust": "low"}, {"tools": ["a*"], "action": "Deny"}]
    assert allowed(decide([grant("g", {"user": "alice"}, rules=rules)], tool="add"))
    assert refusal(decide([grant("g", {"user": "alice"}, rules=rules)], tool="append")).reason == "grant_deny"


def test_the_ceiling_is_the_highest_max_trust_of_the_covering_grants() -> None:
    grants = [
        grant("a-low", {"user": "alice"}, "low"),
        grant("b-high", {"group": "ops"}, "high"),
        grant("c-high", {"agent": "agent"}, "high"),
        grant("d-medium", {"user": "alice"}, "medium"),
    ]
    found = allowed(decide(grants))
    assert (found.ceiling, found.consented, found.effective, found.grant) == (
        Trust.HIGH,
        Trust.HIGH,
        Trust.HIGH,
        "b-high",  # the first (by name) of those with it
    )
    assert found.audit() == {
        "ceiling": "high",
        "consented": "high",
        "effective": "high",
        "grant": "b-high",
        "consent": None,
    }
    # A grant that does not cover the tool gives no ceiling for it.
    reader = grant("a-reader", {"user": "alice"}, "high", effects=["read"])
    assert allowed(decide([reader, grant("b-writer", {"user": "alice"}, "low")])).ceiling is Trust.LOW


def test_a_grant_rules_required_trust_refuses_a_lower_effective_trust() -> None:
    strict = grant("ops", {"user": "alice"}, "high", rules=[{"tools": ["add"], "requiredTrust": "high"}])
    assert allowed(decide([strict])).required is Trust.HIGH
    refused = refusal(decide([strict], [consent("alice-medium", "medium")]))
    assert (refused.status, refused.reason, refused.grant, refused.consent) == (
        200,
        "insufficient_trust",
        "ops",
        "alice-medium",
    )
    assert refused.message == "tool 'add' requires trust high; the caller has medium"
    assert "consented medium by MCPConsent 'alice-medium'" in refused.explanation
    # The highest requirement of all covering grants counts, even one with a lower ceiling.
    capped = grant("a-capped", {"user": "alice"}, "medium", rules=[{"tools": ["add"], "requiredTrust": "high"}])
    assert allowed(decide([capped, grant("b-open", {"user": "alice"}, "high")])).required is Trust.HIGH
    refused = refusal(decide([capped]))
    assert refused.message == "tool 'add' requires trust high; the caller has medium"


# -- consents -------------------------------------------------------------------------------


def test_a_consent_lowers_the_trust() -> None:
    found = allowed(decide([grant("ops", {"user": "alice"}, "high")], [consent("alice", "low")]))
    assert (found.ceiling, found.consented, found.effective, found.consent) == (
        Trust.HIGH,
        Trust.LOW,
        Trust.LOW,
        "alice",
    )


def test_a_consent_cannot_raise_the_trust_above_the_ceiling() -> None:
    found = allowed(decide([grant("ops", {"user": "alice"}, "low")], [consent("alice", "high")]))
    assert (found.ceiling, found.effective) == (Trust.LOW, Trust.LOW)
    strict = grant("ops", {"user": "alice"}, "medium", rules=[{"tools": ["add"], "requiredTrust": "high"}])
    assert refusal(decide([strict], [consent("alice", "high")])).reason == "insufficient_trust"


def test_the_lowest_of_several_consents_counts() -> None:
    consents = [consent("a-high", "high"), consent("b-low", "low", {"agent": "agent"}), consent("c-med", "medium")]
    found = allowed(decide([grant("ops", {"user": "alice"}, "high")], consents))
    assert (found.consented, found.consent) == (Trust.LOW, "b-low")


def test_a_revoked_consent_refuses_even_with_another_consent_live() -> None:
    consents = [consent("a-live", "high"), consent("b-revoked", "high", {"user": "alice"}, revoked=True)]
    found = refusal(decide([grant("ops", {"user": "alice"}, "high")], consents))
    assert (found.status, found.reason, found.consent, found.grant) == (403, "consent_revoked", "b-revoked", "ops")
    assert found.message == "the consent for user 'alice', agent 'agent' on MCP server 'demo' was revoked"


def test_an_expired_consent_refuses_from_the_second_it_expires() -> None:
    expires = NOW + timedelta(hours=1)
    grants = [grant("ops", {"user": "alice"}, "high")]
    consents = [consent("alice", "medium", expires=expires)]
    before = allowed(decide(grants, consents, now=expires - timedelta(seconds=1)))
    assert (before.consented, before.consent) == (Trust.MEDIUM, "alice")
    for moment in (expires, expires + timedelta(days=3)):
        found = refusal(decide(grants, consents, now=moment))
        assert (found.status, found.reason, found.consent) == (403, "consent_expired", "alice")
        assert "expired at 2026-06-01T13:00:00+00:00" in found.message
    # Expiry in another zone is the same instant.
    east = consent("alice", "medium", expires=expires.astimezone(timezone(timedelta(hours=9))))
    assert refusal(decide(grants, [east], now=expires)).reason == "consent_expired"


def test_an_expired_consent_is_not_skipped_for_another_live_one() -> None:
    consents = [consent("a-live", "high"), consent("b-old", "high", expires=NOW - timedelta(minutes=1))]
    assert refusal(decide([grant("ops", {"user": "alice"}, "high")], consents)).reason == "consent_expired"


def test_consents_without_grants_apply_under_the_agents_ceiling() -> None:
    found = allowed(decide([], [consent("alice", "medium")], agent_ceiling=Trust.HIGH))
    assert (found.ceiling, found.consented, found.effective, found.grant, found.consent) == (
        Trust.HIGH,
        Trust.MEDIUM,
        Trust.MEDIUM,
        None,
        "alice",
    )
    # The agent's ceiling caps a higher consent; the default ceiling is low.
    assert allowed(decide([], [consent("alice", "high")], agent_ceiling=Trust.MEDIUM)).effective is Trust.MEDIUM
    assert allowed(decide([], [consent("alice", "high")])).effective is Trust.LOW
    # Without grants no side effect is checked: even an unknown one is under the agent's ceiling.
    assert allowed(decide([], [consent("alice", "high")], effect=None, agent_ceiling=Trust.HIGH))
    assert refusal(decide([], [consent("alice", "high", revoked=True)])).reason == "consent_revoked"


def test_the_agents_consent_claim_lowers_the_consented_trust() -> None:
    grants = [grant("ops", {"user": "alice"}, "high")]
    found = allowed(decide(grants, claim_cap=Trust.LOW))
    assert (found.ceiling, found.consented, found.effective) == (Trust.HIGH, Trust.LOW, Trust.LOW)
    lowered = allowed(decide(grants, [consent("alice", "medium")], claim_cap=Trust.LOW))
    assert lowered.consented is Trust.LOW
    # It never raises a consent.
    assert allowed(decide(grants, [consent("alice", "medium")], claim_cap=Trust.HIGH)).consented is Trust.MEDIUM


# -- virtual servers ------------------------------------------------------------------------


def test_grants_and_consents_for_a_virtual_server_apply_only_through_it() -> None:
    through = {"kind": "MCPVirtualServer", "name": "tools"}
    by_virtual = grant("via-tools", {"user": "alice"}, "high", targets=[through])
    assert by_virtual.targets("demo", "tools")
    assert not by_virtual.targets("demo", None)
    assert not by_virtual.targets("demo", "other")
    assert not by_virtual.targets("tools", None)  # a virtual server's name is no MCPServer's
    direct = grant("direct", {"user": "alice"}, "low")
    assert direct.targets("demo", "tools") and direct.targets("demo", None) and not direct.targets("other", None)
    virtual_consent = consent("via-tools", "low", server=through)
    assert virtual_consent.targets("demo", "tools") and not virtual_consent.targets("demo", None)

    docs = [
        SERVER_DOC,
        {
            "apiVersion": API,
            "kind": "MCPVirtualServer",
            "metadata": {"name": "tools"},
            "spec": {"servers": [{"name": "demo"}]},
        },
        by_virtual.model_dump(by_alias=True, mode="json"),
        direct.model_dump(by_alias=True, mode="json"),
        virtual_consent.model_dump(by_alias=True, mode="json"),
    ]
    catalog = parse_documents(docs, "test")
    assert [g.name for g in catalog.grants_for("demo")] == ["direct"]
    assert [g.name for g in catalog.grants_for("demo", "tools")] == ["direct", "via-tools"]
    assert catalog.consents_for("demo") == []
    assert [c.name for c in catalog.consents_for("demo", "tools")] == ["via-tools"]
    # Directly: only the low grant; through the virtual server: the high one, and the consent.
    assert allowed(decide(catalog.grants_for("demo"), catalog.consents_for("demo"))).effective is Trust.LOW
    found = allowed(decide(catalog.grants_for("demo", "tools"), catalog.consents_for("demo", "tools")))
    assert (found.ceiling, found.grant, found.consented, found.consent) == (
        Trust.HIGH,
        "via-tools",
        Trust.LOW,
        "via-tools",
    )
