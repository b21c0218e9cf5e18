"""The MCPAccessGrant and MCPConsent CRDs accept exactly the documents the models accept
(schema and CEL rules), and ``kubectl get`` shows their subject, server, trust, expiry and state."""

from __future__ import annotations

from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from controller.render import crds
from extproc.config.models import MCPAccessGrant, MCPConsent
from tests.kubeschemas import OUR_CRDS, cel_violations, crd_schema, load_crd, openapi_schema

GRANT_CRD = OUR_CRDS / "mcp.extproc.io_mcpaccessgrants.yaml"
CONSENT_CRD = OUR_CRDS / "mcp.extproc.io_mcpconsents.yaml"
ALICE = {"user": "alice", "agent": "ops-agent"}


def _grant(name: str = "alice-ops", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"targetRefs": [{"kind": "MCPServer", "name": "demo"}], "subject": ALICE, "maxTrust": "high"}
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPAccessGrant",
        "metadata": {"name": name},
        "spec": {k: v for k, v in {**base, **spec}.items() if v is not None},
    }


def _consent(name: str = "alice-ops-consent", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"serverRef": {"name": "demo"}, "subject": ALICE, "consentedTrust": "medium"}
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPConsent",
        "metadata": {"name": name},
        "spec": {k: v for k, v in {**base, **spec}.items() if v is not None},
    }


# Left out, where the API server is stricter than these checks can show:
# * a subject field set to null (``{user: null}``): the fields are nullable, and CEL's has()
#   is true for a null, as it is here; the model refuses it, so the controller reports
#   such a resource Accepted=False;
# * an expiresAt the model reads but that is not RFC 3339 (``+0200``, no seconds, a
#   number): the API server's ``format: date-time`` refuses it, which jsonschema skips;
# * a null sideEffect in a grant's rule (CEL's has() again);
# * a string for a boolean (``disabled: "yes"``), which the model's lax mode coerces.
GRANTS = [
    _grant(),
    _grant(subject={"group": "sre"}),
    _grant(subject={"user": "alice", "agent": "a", "group": "g"}, targetRefs=[{"name": "a"}, {"name": "b"}]),
    _grant(targetRefs=[{"kind": "MCPVirtualServer", "name": "tools"}], maxTrust="low"),
    _grant(allowedSideEffects=["read", "write", "destructive"], disabled=True),
    _grant(toolRules=[{"tools": ["delete_*"], "action": "Deny"}, {"tools": ["x"], "requiredTrust": "high"}]),
    _grant(toolRules=[{"tools": ["x"], "scopes": []}]),
    # An empty subject would match every caller.
    _grant(subject={}),
    _grant(subject=None),
    _grant(subject={"user": ""}),
    _grant(subject={"team": "sre"}),
    # Targets, trust, side effects and rules.
    _grant(targetRefs=[]),
    _grant(targetRefs=[{"kind": "MCPAgent", "name": "demo"}]),
    _grant(maxTrust="ultra"),
    _grant(maxTrust=None),
    _grant(allowedSideEffects=[]),
    _grant(allowedSideEffects=["delete"]),
    _grant(toolRules=[{"tools": []}]),
    _grant(toolRules=[{"tools": ["x"], "sideEffect": "rm"}]),
    # Scopes and side effects are declared in an MCPToolPolicy's rules, not a grant's.
    _grant(toolRules=[{"tools": ["x"], "sideEffect": "destructive"}]),
    _grant(toolRules=[{"tools": ["x"]}, {"tools": ["y"], "scopes": ["admin"]}]),
    _grant(expiresAt="2026-12-31T00:00:00Z"),
    _grant(name="Alice_Ops"),
]
GRANTS_VALID = 7

CONSENTS = [
    _consent(),
    _consent(expiresAt="2026-12-31T00:00:00Z", revoked=False),
    _consent(expiresAt="2026-12-31T00:00:00.5+02:00", revoked=True),
    _consent(expiresAt="2026-12-31t00:00:00z"),
    _consent(serverRef={"kind": "MCPVirtualServer", "name": "tools"}, subject={"group": "sre"}, consentedTrust="high"),
    # Without a time zone, the time would be read in whatever zone the reader is in.
    _consent(expiresAt="2026-12-31T00:00:00"),
    _consent(expiresAt="2026-12-31"),
    # Subjects, refs and trust.
    _consent(subject={}),
    _consent(subject={"agent": ""}),
    _consent(serverRef={"kind": "MCPToolPolicy", "name": "demo"}),
    _consent(serverRef=None),
    _consent(serverRef=[{"name": "demo"}]),
    _consent(consentedTrust="total"),
    _consent(consentedTrust=None),
    _consent(maxTrust="high"),
    _consent(name="-consent"),
]
CONSENTS_VALID = 5


def _schema_verdict(doc: dict[str, Any]) -> bool:
    crd = load_crd(GRANT_CRD if doc["kind"] == "MCPAccessGrant" else CONSENT_CRD)
    try:
        jsonschema.Draft4Validator(crd_schema(crd, "v1alpha1")).validate(doc)
    except jsonschema.ValidationError:
        return False
    return not cel_violations(openapi_schema(crd, "v1alpha1"), doc)


def _model_verdict(doc: dict[str, Any]) -> bool:
    model = MCPAccessGrant if doc["kind"] == "MCPAccessGrant" else MCPConsent
    try:
        model.model_validate(doc)
    except ValidationError:
        return False
    return True


def _case_id(doc: dict[str, Any]) -> str:
    shown = {"name": doc["metadata"]["name"], **doc["spec"]}
    text: str = yaml.safe_dump(shown, default_flow_style=True, width=400)
    return str(doc["kind"])[3:] + " " + text[:90]


@pytest.mark.parametrize("doc", GRANTS + CONSENTS, ids=_case_id)
def test_crd_accepts_exactly_what_the_model_accepts(doc: dict[str, Any]) -> None:
    assert _schema_verdict(doc) is _model_verdict(doc)


def test_the_cases_hold_both_verdicts() -> None:
    # Were every case accepted (or every one refused), agreement would prove nothing.
    assert [_model_verdict(d) for d in GRANTS].count(True) == GRANTS_VALID
    assert [_model_verdict(d) for d in CONSENTS].count(True) == CONSENTS_VALID


def test_the_issue_example_fits_both_crds() -> None:
    grant = _grant(
        allowedSideEffects=["read", "write"], toolRules=[{"tools": ["delete_*"], "action": "Deny"}], disabled=False
    )
    consent = _consent(expiresAt="2026-12-31T00:00:00Z", revoked=False)
    assert _schema_verdict(grant) and _model_verdict(grant)
    assert _schema_verdict(consent) and _model_verdict(consent)


def test_an_empty_subject_is_refused_by_cel_with_the_models_message() -> None:
    for crd_file, doc in ((GRANT_CRD, _grant(subject={})), (CONSENT_CRD, _consent(subject={}))):
        [problem] = cel_violations(openapi_schema(load_crd(crd_file), "v1alpha1"), doc)
        assert problem.startswith(".spec.subject: set user, agent, group or several")


def test_expires_at_is_a_date_time_with_a_time_zone() -> None:
    spec = openapi_schema(load_crd(CONSENT_CRD), "v1alpha1")["properties"]["spec"]
    expires = spec["properties"]["expiresAt"]
    assert expires["type"] == "string" and expires["format"] == "date-time"
    assert "pattern" in expires


def _columns(crd_file: Any) -> list[tuple[str, str, str, int]]:
    [version] = load_crd(crd_file)["spec"]["versions"]
    return [(c["name"], c["type"], c["jsonPath"], c.get("priority", 0)) for c in version["additionalPrinterColumns"]]


def test_kubectl_get_shows_a_grants_subject_targets_trust_and_state() -> None:
    shown = [(n, p) for n, _, p, priority in _columns(GRANT_CRD) if priority == 0]
    assert shown == [
        ("User", ".spec.subject.user"),
        ("Agent", ".spec.subject.agent"),
        ("Group", ".spec.subject.group"),
        ("Targets", ".spec.targetRefs[*].name"),
        ("Max Trust", ".spec.maxTrust"),
        ("Disabled", ".spec.disabled"),
        ("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        ("Age", ".metadata.creationTimestamp"),
    ]
    assert ("Side Effects", "string", ".spec.allowedSideEffects", 1) in _columns(GRANT_CRD)  # -o wide


def test_kubectl_get_shows_a_consents_subject_server_trust_expiry_and_state() -> None:
    columns = _columns(CONSENT_CRD)
    shown = [(n, p) for n, _, p, priority in columns if priority == 0]
    assert shown == [
        ("User", ".spec.subject.user"),
        ("Agent", ".spec.subject.agent"),
        ("Server", ".spec.serverRef.name"),
        ("Trust", ".spec.consentedTrust"),
        ("Expires", ".spec.expiresAt"),
        ("Revoked", ".spec.revoked"),
        ("Expired", '.status.conditions[?(@.type=="Expired")].status'),
        ("Ready", '.status.conditions[?(@.type=="Ready")].status'),
        ("Age", ".metadata.creationTimestamp"),
    ]
    types = {n: t for n, t, _, _ in columns}
    # A future date as a "date" column would print as <invalid> (kubectl shows dates as ages).
    assert types["Expires"] == "string" and types["Revoked"] == "boolean"


def test_both_kinds_are_generated_with_the_others() -> None:
    kinds = {k.kind: k for k in crds.CRD_KINDS}
    assert kinds["MCPAccessGrant"].plural == "mcpaccessgrants"
    assert kinds["MCPConsent"].plural == "mcpconsents"
    assert {GRANT_CRD.name, CONSENT_CRD.name} <= set(crds.render_crd_files())


def test_a_policys_rules_still_take_scopes_and_side_effects() -> None:
    # The grant's restriction sits on the grant's rules only: ToolRule is MCPToolPolicy's too.
    rules = [{"tools": ["rm_*"], "scopes": ["admin"], "sideEffect": "destructive"}]
    policy = {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPToolPolicy",
        "metadata": {"name": "p"},
        "spec": {
            "targetRefs": [{"name": "demo"}],
            "rules": rules,
        },
    }
    crd = load_crd(OUR_CRDS / "mcp.extproc.io_mcptoolpolicies.yaml")
    jsonschema.Draft4Validator(crd_schema(crd, "v1alpha1")).validate(policy)
    assert cel_violations(openapi_schema(crd, "v1alpha1"), policy) == []
    [problem] = cel_violations(openapi_schema(load_crd(GRANT_CRD), "v1alpha1"), _grant(toolRules=rules))
    assert problem.startswith(".spec.toolRules[0]: a grant's rules take tools, action and requiredTrust only")
