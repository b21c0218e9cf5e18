"""``MCPAccessGrant`` and ``MCPConsent`` documents: what a user is told when one is wrong, what
their references must name, what a subset catalog keeps of them, and that a pipeline
without the ``policy`` stage is refused while they exist."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from extproc.config.models import SideEffect, Trust
from extproc.config.pipeline_file import DEFAULT_PIPELINE, FailureMode
from extproc.config.resources import Catalog, load_text, parse_documents, reference_problems
from extproc.core.posture import StagePosture, posture_problems
from extproc.errors import ConfigError

API = "mcp.extproc.io/v1alpha1"
DEFAULT: list[StagePosture] = [(s.name, s.failure_mode) for s in DEFAULT_PIPELINE.stages]
NO_POLICY = [s for s in DEFAULT if s[0] != "policy"]


def server(name: str) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPServer",
        "metadata": {"name": name},
        "spec": {"url": f"http://{name}.test/mcp"},
    }


def virtual(name: str, backends: list[str]) -> dict[str, Any]:
    spec = {"servers": [{"name": b} for b in backends]}
    return {"apiVersion": API, "kind": "MCPVirtualServer", "metadata": {"name": name}, "spec": spec}


def grant(name: str = "g", targets: list[Any] | None = None, **spec: Any) -> dict[str, Any]:
    refs = [t if isinstance(t, dict) else {"kind": "MCPServer", "name": t} for t in (targets or ["demo"])]
    body = {"targetRefs": refs, "subject": {"user": "alice"}, "maxTrust": "high", **spec}
    return {"apiVersion": API, "kind": "MCPAccessGrant", "metadata": {"name": name}, "spec": body}


def consent(name: str = "c", target: Any = "demo", **spec: Any) -> dict[str, Any]:
    ref = target if isinstance(target, dict) else {"kind": "MCPServer", "name": target}
    body = {"serverRef": ref, "subject": {"user": "alice", "agent": "ops"}, "consentedTrust": "medium", **spec}
    return {"apiVersion": API, "kind": "MCPConsent", "metadata": {"name": name}, "spec": body}


def parse(*docs: dict[str, Any]) -> Catalog:
    return parse_documents([server("demo"), *docs], "resources.yaml")


def refusal(*docs: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse(*docs)
    return str(caught.value)


# -- what a user is told --------------------------------------------------------------------


def test_a_valid_grant_and_consent_with_their_defaults() -> None:
    catalog = parse(grant(), consent(expiresAt="2026-12-31T00:00:00Z"))
    spec = catalog.grants["g"].spec
    assert (spec.max_trust, spec.allowed_side_effects, spec.tool_rules, spec.disabled) == (
        Trust.HIGH,
        [SideEffect.READ, SideEffect.WRITE],
        [],
        False,
    )
    c = catalog.consents["c"].spec
    assert (c.consented_trust, c.revoked, c.expires_at) == (Trust.MEDIUM, False, datetime(2026, 12, 31, tzinfo=UTC))


@pytest.mark.parametrize("make", [grant, consent])
def test_an_empty_subject_is_refused(make: Any) -> None:
    doc = make()
    doc["spec"]["subject"] = {}
    kind = doc["kind"]
    name = doc["metadata"]["name"]
    assert refusal(doc) == (
        f"resources.yaml: document 2 ({kind} {name!r}): spec.subject: Value error, set user, agent, group or "
        "several: an empty subject would match every caller"
    )


def test_an_empty_subject_field_is_refused() -> None:
    assert refusal(grant(subject={"user": ""})).endswith("spec.subject.user: String should have at least 1 character")


@pytest.mark.parametrize(
    ("rule", "index"),
    [
        ({"tools": ["add"], "scopes": ["tools.write"]}, 0),
        ({"tools": ["add"], "sideEffect": "read"}, 1),
    ],
)
def test_a_grant_rule_with_scopes_or_side_effect_is_refused(rule: dict[str, Any], index: int) -> None:
    rules = [rule] if index == 0 else [{"tools": ["echo"], "requiredTrust": "medium"}, rule]
    assert refusal(grant(toolRules=rules)) == (
        f"resources.yaml: document 2 (MCPAccessGrant 'g'): spec: Value error, toolRules[{index}]: a grant's rules "
        "take tools, action and requiredTrust only; declare scopes and sideEffect in an MCPToolPolicy rule"
    )


def test_a_grant_rule_with_tools_action_and_required_trust_is_accepted() -> None:
    rules = [{"tools": ["delete_*"], "action": "Deny"}, {"tools": ["add"], "requiredTrust": "high"}]
    spec = parse(grant(toolRules=rules)).grants["g"].spec
    assert [(r.action, r.required_trust) for r in spec.tool_rules] == [("Deny", Trust.LOW), ("Allow", Trust.HIGH)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"allowedSideEffects": ["delete"]},
            "spec.allowedSideEffects[0]: Input should be 'read', 'write' or 'destructive'",
        ),
        (
            {"allowedSideEffects": []},
            "spec.allowedSideEffects: List should have at least 1 item after validation, not 0",
        ),
        ({"maxTrust": "root"}, "spec.maxTrust: Input should be 'low', 'medium' or 'high'"),
        ({"targetRefs": []}, "spec.targetRefs: List should have at least 1 item after validation, not 0"),
        (
            {"targetRefs": [{"kind": "MCPAgent", "name": "ops"}]},
            "spec.targetRefs[0].kind: Input should be 'MCPServer' or 'MCPVirtualServer'",
        ),
        ({"maxtrust": "high"}, "spec.maxtrust: Extra inputs are not permitted"),
    ],
)
def test_grant_fields_a_user_gets_wrong(spec: dict[str, Any], message: str) -> None:
    assert refusal(grant(**spec)) == f"resources.yaml: document 2 (MCPAccessGrant 'g'): {message}"


def test_max_trust_is_required() -> None:
    doc = grant()
    del doc["spec"]["maxTrust"]
    assert refusal(doc) == "resources.yaml: document 2 (MCPAccessGrant 'g'): spec.maxTrust: Field required"


def test_consented_trust_is_required_and_checked() -> None:
    doc = consent()
    del doc["spec"]["consentedTrust"]
    assert refusal(doc).endswith("(MCPConsent 'c'): spec.consentedTrust: Field required")
    assert refusal(consent(consentedTrust="max")).endswith(
        "spec.consentedTrust: Input should be 'low', 'medium' or 'high'"
    )


def text_with_expiry(value: str) -> str:
    return (
        f"apiVersion: {API}\nkind: MCPServer\nmetadata: {{name: demo}}\nspec: {{url: 'http://demo.test/mcp'}}\n"
        f"---\napiVersion: {API}\nkind: MCPConsent\nmetadata: {{name: c}}\nspec:\n"
        "  serverRef: {name: demo}\n  subject: {user: alice}\n  consentedTrust: high\n"
        f"  expiresAt: {value}\n"
    )


@pytest.mark.parametrize("value", ["2026-12-31T00:00:00", "2026-12-31", "'2026-12-31T00:00:00'"])
def test_an_expiry_without_a_time_zone_is_refused(value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(text_with_expiry(value), "resources.yaml")
    assert (
        str(caught.value)
        == "resources.yaml: document 2 (MCPConsent 'c'): spec.expiresAt: Input should have timezone info"
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-31T00:00:00Z", datetime(2026, 12, 31, tzinfo=UTC)),  # YAML reads a timestamp itself
        ("'2026-12-31T00:00:00Z'", datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-12-31T02:00:00+02:00", datetime(2026, 12, 31, 2, tzinfo=timezone(timedelta(hours=2)))),
    ],
)
def test_an_expiry_with_a_zone_is_read_as_that_instant(value: str, expected: datetime) -> None:
    found = load_text(text_with_expiry(value), "resources.yaml").consents["c"].spec.expires_at
    assert found == expected and found is not None and found.utcoffset() is not None


def test_a_duplicate_grant_name_is_refused() -> None:
    assert refusal(grant("g"), grant("g")) == (
        "resources.yaml: document 3 (MCPAccessGrant 'g'): metadata.name: duplicate MCPAccessGrant 'g'"
    )


# -- references -----------------------------------------------------------------------------


def test_references_to_unknown_servers_and_of_the_wrong_kind() -> None:
    catalog = parse(
        server("other"),
        virtual("tools", ["other"]),
        grant("a-ghost", ["demo", "ghost"]),
        grant("b-kind", [{"kind": "MCPVirtualServer", "name": "demo"}]),  # demo is an MCPServer
        grant("c-ok", ["demo", {"kind": "MCPVirtualServer", "name": "tools"}]),
        consent("d-ghost", "ghost"),
        consent("e-kind", {"kind": "MCPServer", "name": "tools"}),  # tools is an MCPVirtualServer
        consent("f-ok", {"kind": "MCPVirtualServer", "name": "tools"}),
    )
    assert reference_problems(catalog) == [
        "MCPAccessGrant 'a-ghost': spec.targetRefs[1]: no MCPServer named 'ghost'",
        "MCPAccessGrant 'b-kind': spec.targetRefs[0]: no MCPVirtualServer named 'demo'",
        "MCPConsent 'd-ghost': spec.serverRef: no MCPServer named 'ghost'",
        "MCPConsent 'e-kind': spec.serverRef: no MCPServer named 'tools'",
    ]


def test_a_file_with_a_dangling_grant_does_not_load() -> None:
    text = (
        f"apiVersion: {API}\nkind: MCPServer\nmetadata: {{name: demo}}\nspec: {{url: 'http://demo.test/mcp'}}\n"
        f"---\napiVersion: {API}\nkind: MCPAccessGrant\nmetadata: {{name: g}}\nspec:\n"
        "  targetRefs: [{name: gone}]\n  subject: {group: ops}\n  maxTrust: low\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_text(text, "resources.yaml")
    assert str(caught.value) == "resources.yaml: MCPAccessGrant 'g': spec.targetRefs[0]: no MCPServer named 'gone'"


# -- subset ---------------------------------------------------------------------------------


FULL = [
    server("other"),
    server("third"),
    virtual("tools", ["other"]),
    grant("g-demo", ["demo"]),
    grant("g-both", ["demo", "other", {"kind": "MCPVirtualServer", "name": "tools"}]),
    grant("g-tools", [{"kind": "MCPVirtualServer", "name": "tools"}]),
    grant("g-third", ["third"]),
    grant("g-kind", [{"kind": "MCPVirtualServer", "name": "demo"}]),  # a ref of another kind than the kept one
    consent("c-demo", "demo"),
    consent("c-other", "other"),
    consent("c-tools", {"kind": "MCPVirtualServer", "name": "tools"}),
    consent("c-third", "third"),
    consent("c-kind", {"kind": "MCPServer", "name": "tools"}),
]


def refs(catalog: Catalog) -> dict[str, list[tuple[str, str]]]:
    return {n: [(r.kind, r.name) for r in g.spec.target_refs] for n, g in sorted(catalog.grants.items())}


def test_a_subset_keeps_the_grants_and_consents_of_the_kept_servers() -> None:
    sub = parse(*FULL).subset(["demo"])
    assert refs(sub) == {"g-both": [("MCPServer", "demo")], "g-demo": [("MCPServer", "demo")]}
    assert sorted(sub.consents) == ["c-demo"]
    assert reference_problems(sub) == []
    # The full catalog is untouched.
    assert len(parse(*FULL).grants["g-both"].spec.target_refs) == 3


def test_a_subset_of_a_virtual_server_keeps_its_own_and_its_backends() -> None:
    sub = parse(*FULL).subset(["tools"])
    assert sorted(sub.servers) == ["other"] and sorted(sub.virtual_servers) == ["tools"]
    assert refs(sub) == {
        "g-both": [("MCPServer", "other"), ("MCPVirtualServer", "tools")],
        "g-tools": [("MCPVirtualServer", "tools")],
    }
    assert sorted(sub.consents) == ["c-other", "c-tools"]
    # What it kept decides as in the full catalog.
    assert [g.name for g in sub.grants_for("other", "tools")] == ["g-both", "g-tools"]
    assert [g.name for g in sub.grants_for("other")] == ["g-both"]


def test_a_subset_without_their_servers_has_no_grants_or_consents() -> None:
    sub = parse(*FULL).subset(["nothing"])
    assert (sub.grants, sub.consents) == ({}, {})
    full = parse(*FULL).subset(["demo", "third", "tools"])
    assert sorted(full.grants) == ["g-both", "g-demo", "g-third", "g-tools"]
    assert sorted(full.consents) == ["c-demo", "c-other", "c-third", "c-tools"]


# -- posture --------------------------------------------------------------------------------


def test_grants_need_the_policy_stage() -> None:
    assert posture_problems(parse(grant()), NO_POLICY) == [
        "the pipeline has no 'policy' stage, but MCPAccessGrant 'g' (resources.yaml) grants trust to its subject: "
        "the grants would not limit anyone; add policy after allowlist"
    ]
    opened = [(n, FailureMode.OPEN if n == "policy" else m) for n, m in DEFAULT]
    assert posture_problems(parse(grant()), opened) == [
        "stage 'policy' has failureMode: open, but MCPAccessGrant 'g' (resources.yaml) grants trust to its subject: "
        "on a fault in policy the grants would not limit anyone; set failureMode: closed (the default) on policy"
    ]
    assert posture_problems(parse(grant()), DEFAULT) == []


def test_consents_alone_need_the_policy_stage() -> None:
    assert posture_problems(parse(consent()), NO_POLICY) == [
        "the pipeline has no 'policy' stage, but MCPConsent 'c' (resources.yaml) records consent: lowered, revoked "
        "and expired consents would be ignored; add policy after allowlist"
    ]
    assert posture_problems(parse(consent()), DEFAULT) == []
    # Without grants or consents (or policies), no policy stage is needed.
    assert posture_problems(parse(), NO_POLICY) == []


def test_a_disabled_grant_still_needs_the_policy_stage() -> None:
    # A disabled grant still shuts the server to everyone it does not cover: only policy enforces that.
    assert len(posture_problems(parse(grant(disabled=True)), NO_POLICY)) == 1
