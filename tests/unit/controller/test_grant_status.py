"""Status of MCPAccessGrant and MCPConsent: the conditions every kind has, a consent's Expired
and Revoked (on fake time), refs that do not resolve, and the loop coming back when a consent lapses."""

from __future__ import annotations

import datetime
import threading
import time
from typing import Any

from controller.render.meta import ControllerSettings
from controller.render.status import (
    EXPIRED,
    REVOKED,
    compute_status,
    consent_conditions,
    next_expiry,
)
from controller.runtime.kube import Kube
from controller.runtime.loop import EXPIRY_SLACK_S, Controller, ControllerOptions, Metrics
from controller.runtime.reconcile import Reconciler
from extproc.config.models import MCPConsent
from tests.fakekube import FakeApiServer
from tests.kubedocs import NS, agent, server

API = "mcp.extproc.io/v1alpha1"
SETTINGS = ControllerSettings(namespace="mcp-system")
COLLECTIONS = {
    "MCPServer": f"{API}/mcpservers",
    "MCPAgent": f"{API}/mcpagents",
    "MCPVirtualServer": f"{API}/mcpvirtualservers",
    "MCPAccessGrant": f"{API}/mcpaccessgrants",
    "MCPConsent": f"{API}/mcpconsents",
}
T = datetime.datetime(2026, 12, 31, tzinfo=datetime.UTC)
ALICE = {"user": "alice", "agent": "assistant"}


def grant(name: str, targets: list[dict[str, str]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPAccessGrant",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"targetRefs": targets, "subject": ALICE, "maxTrust": "high", **spec},
    }


def consent(name: str, server_ref: dict[str, str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "MCPConsent",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"serverRef": server_ref, "subject": ALICE, "consentedTrust": "medium", **spec},
    }


def seed(api: FakeApiServer, *docs: dict[str, Any]) -> None:
    for doc in docs:
        meta = {k: v for k, v in doc["metadata"].items() if k not in ("uid", "generation")}
        api.put(COLLECTIONS[doc["kind"]], {**doc, "metadata": meta})


def conditions(api: FakeApiServer, kind: str, name: str) -> dict[str, dict[str, Any]]:
    obj = api.get(COLLECTIONS[kind], NS, name) or {}
    return {c["type"]: c for c in (obj.get("status") or {}).get("conditions", [])}


def states(api: FakeApiServer, kind: str, name: str) -> dict[str, tuple[str, str]]:
    return {t: (c["status"], c["reason"]) for t, c in conditions(api, kind, name).items()}


class Clock:
    """A settable aware clock for the reconciler."""

    def __init__(self, now: datetime.datetime) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now


def _model(expires_at: str | None = None, revoked: bool = False) -> MCPConsent:
    doc = consent("c", {"name": "demo"}, revoked=revoked, **({"expiresAt": expires_at} if expires_at else {}))
    return MCPConsent.model_validate({**doc, "metadata": {"name": "c"}})


# --- pure -------------------------------------------------------------------------------


def test_a_consent_is_live_until_its_expiry_then_expired_from_that_instant() -> None:
    live = _model("2026-12-31T01:00:00+01:00")  # = T
    [lapse, revoked] = consent_conditions(live, T - datetime.timedelta(microseconds=1))
    assert (lapse.type, lapse.status, lapse.reason) == (EXPIRED, False, "NotExpired")
    assert lapse.message == "expires at 2026-12-31T00:00:00Z"
    assert (revoked.type, revoked.status, revoked.reason) == (REVOKED, False, "NotRevoked")
    [lapse, _] = consent_conditions(live, T)
    assert (lapse.status, lapse.reason) == (True, "Expired")
    assert lapse.message.startswith("expired at 2026-12-31T00:00:00Z")


def test_a_consent_without_expiry_never_lapses_and_revocation_is_its_own_condition() -> None:
    [lapse, revoked] = consent_conditions(_model(revoked=True), T + datetime.timedelta(days=3650))
    assert (lapse.status, lapse.reason) == (False, "NoExpiry")
    assert (revoked.status, revoked.reason) == (True, "Revoked")


def test_next_expiry_is_the_earliest_still_to_come() -> None:
    stamps = ["2026-12-31T00:00:00Z", "2026-06-01T00:00:00Z", None, "2025-01-01T00:00:00Z"]
    consents = [_model(stamp) for stamp in stamps]
    june = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
    assert next_expiry(consents, datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)) == june
    assert next_expiry(consents, T) is None  # T itself has come
    assert next_expiry([], T) is None


def test_extra_conditions_follow_the_three_and_keep_their_transition_time() -> None:
    resource = {"metadata": {"generation": 4}}
    extra = consent_conditions(_model("2026-12-31T00:00:00Z"), T - datetime.timedelta(hours=1))
    first = compute_status(resource, extra=extra, now="2026-12-30T23:00:00Z")
    assert [c["type"] for c in first["conditions"]] == ["Accepted", "ResolvedRefs", "Ready", "Expired", "Revoked"]
    assert all(c["observedGeneration"] == 4 for c in first["conditions"])
    again = compute_status(resource, extra=extra, previous=first, now="2026-12-30T23:30:00Z")
    assert again == first  # nothing to write
    lapsed = consent_conditions(_model("2026-12-31T00:00:00Z"), T)
    later = compute_status(resource, extra=lapsed, previous=again, now="2026-12-31T00:00:00Z")
    times = {c["type"]: c["lastTransitionTime"] for c in later["conditions"]}
    assert times["Expired"] == "2026-12-31T00:00:00Z"
    assert times["Revoked"] == times["Ready"] == "2026-12-30T23:00:00Z"
    # An invalid spec says only that.
    invalid = compute_status(resource, invalid="spec.subject: empty", extra=lapsed, now="2026-12-31T00:00:00Z")
    assert [c["type"] for c in invalid["conditions"]] == ["Accepted", "ResolvedRefs", "Ready"]


# --- the reconciler, on fake time ----------------------------------------------------------


def test_an_expiry_turns_the_condition_at_that_time_and_the_pass_says_when(api: FakeApiServer, kube: Kube) -> None:
    seed(
        api,
        server("demo", "http://demo.mcp.svc:8080/mcp"),
        agent("assistant", ["demo"]),
        consent("soon", {"name": "demo"}, expiresAt="2026-12-31T00:00:00Z"),
        consent("later", {"name": "demo"}, expiresAt="2027-06-30T00:00:00Z"),
        consent("forever", {"name": "demo"}),
        consent("withdrawn", {"name": "demo"}, revoked=True),
    )
    clock = Clock(T - datetime.timedelta(seconds=90))
    reconciler = Reconciler(kube, SETTINGS, clock=clock, report_interval_s=None)  # expiries alone
    assert reconciler.reconcile(NS) == 90.0
    soon = conditions(api, "MCPConsent", "soon")
    assert {t: c["status"] for t, c in soon.items()} == {
        "Accepted": "True",
        "ResolvedRefs": "True",
        "Ready": "True",
        "Expired": "False",
        "Revoked": "False",
    }
    assert soon["Expired"]["message"] == "expires at 2026-12-31T00:00:00Z"
    assert states(api, "MCPConsent", "forever")[EXPIRED] == ("False", "NoExpiry")
    assert states(api, "MCPConsent", "withdrawn")[REVOKED] == ("True", "Revoked")
    writes = len([r for r in api.state.requests if r.path.endswith("/status")])
    clock.now = T - datetime.timedelta(seconds=30)
    assert reconciler.reconcile(NS) == 30.0
    assert len([r for r in api.state.requests if r.path.endswith("/status")]) == writes  # nothing changed
    clock.now = T
    later = (datetime.datetime(2027, 6, 30, tzinfo=datetime.UTC) - T).total_seconds()
    assert reconciler.reconcile(NS) == later  # the next one
    soon = conditions(api, "MCPConsent", "soon")
    assert (soon["Expired"]["status"], soon["Expired"]["reason"]) == ("True", "Expired")
    assert "2026-12-31T00:00:00Z" in soon["Expired"]["message"]
    assert soon["Expired"]["lastTransitionTime"] == "2026-12-31T00:00:00Z"
    assert soon["Ready"]["lastTransitionTime"] == "2026-12-30T23:58:30Z"
    assert states(api, "MCPConsent", "later")[EXPIRED] == ("False", "NotExpired")
    clock.now = datetime.datetime(2028, 1, 1, tzinfo=datetime.UTC)
    assert reconciler.reconcile(NS) is None  # nothing left to lapse
    assert states(api, "MCPConsent", "later")[EXPIRED] == ("True", "Expired")


def test_grants_and_consents_get_the_usual_conditions_and_ref_problems(api: FakeApiServer, kube: Kube) -> None:
    seed(
        api,
        server("demo", "http://demo.mcp.svc:8080/mcp"),
        agent("assistant", ["demo"]),
        grant("ok", [{"name": "demo"}], disabled=True),
        grant("half", [{"name": "demo"}, {"name": "ghost"}]),
        grant("virtual", [{"kind": "MCPVirtualServer", "name": "demo"}]),
        consent("dangling", {"kind": "MCPVirtualServer", "name": "tools"}, expiresAt="2026-12-31T00:00:00Z"),
        # Stored as a cluster without the CRD's checks would keep it: the model refuses it.
        {**consent("empty", {"name": "demo"}), "spec": {"serverRef": {"name": "demo"}, "subject": {}}},
    )
    Reconciler(kube, SETTINGS, clock=Clock(T)).reconcile(NS)
    assert states(api, "MCPAccessGrant", "ok") == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
        "Ready": ("True", "Ready"),
    }
    half = conditions(api, "MCPAccessGrant", "half")
    assert (half["ResolvedRefs"]["status"], half["ResolvedRefs"]["reason"]) == ("False", "RefNotResolved")
    assert half["ResolvedRefs"]["message"] == "spec.targetRefs[1]: no MCPServer named 'ghost'"
    assert half["Ready"]["status"] == "False"
    virtual = conditions(api, "MCPAccessGrant", "virtual")
    assert virtual["ResolvedRefs"]["message"] == "spec.targetRefs[0]: no MCPVirtualServer named 'demo'"
    dangling = conditions(api, "MCPConsent", "dangling")
    assert dangling["ResolvedRefs"]["message"] == "spec.serverRef: no MCPVirtualServer named 'tools'"
    assert (dangling["Expired"]["status"], dangling["Expired"]["reason"]) == ("True", "Expired")  # still judged
    empty = conditions(api, "MCPConsent", "empty")
    assert (empty["Accepted"]["status"], empty["Accepted"]["reason"]) == ("False", "Invalid")
    assert "spec.subject" in empty["Accepted"]["message"]
    assert EXPIRED not in empty and REVOKED not in empty
    # Every one of them read by the kinds' REST paths.
    paths = {r.path for r in api.state.requests if r.method == "GET"}
    assert {f"/apis/{API}/namespaces/{NS}/mcpaccessgrants", f"/apis/{API}/namespaces/{NS}/mcpconsents"} <= paths


def test_a_namespace_with_only_grants_and_consents_is_found(api: FakeApiServer, kube: Kube) -> None:
    seed(api, consent("lonely", {"name": "demo"}))
    assert Reconciler(kube, SETTINGS).namespaces() == {NS}


# --- the loop -------------------------------------------------------------------------------


class _Stub:
    """Stands for the reconciler: records when it ran, answers what the test says."""

    def __init__(self, answers: list[float | None]) -> None:
        self.answers = answers
        self.runs: list[float] = []

    def reconcile(self, namespace: str) -> float | None:
        self.runs.append(time.monotonic())
        return self.answers.pop(0) if self.answers else None


def _work(kube: Kube, stub: _Stub, resync_s: float, seconds: float) -> None:
    controller = Controller(kube, SETTINGS, ControllerOptions(leader_election=False, resync_s=resync_s), Metrics())
    controller.reconciler = stub  # type: ignore[assignment]
    stop = threading.Event()
    worker = threading.Thread(target=controller.work, args=(stop,), daemon=True)
    worker.start()
    controller.enqueue(NS)
    time.sleep(seconds)
    stop.set()
    worker.join(timeout=5)


def test_the_loop_comes_back_when_a_consent_lapses_with_no_event(kube: Kube) -> None:
    stub = _Stub([0.3, None])
    _work(kube, stub, resync_s=3600, seconds=0.3 + EXPIRY_SLACK_S + 1.0)
    assert len(stub.runs) == 2
    assert 0.3 + EXPIRY_SLACK_S - 0.05 <= stub.runs[1] - stub.runs[0] <= 0.3 + EXPIRY_SLACK_S + 0.6


def test_an_expiry_beyond_the_resync_is_left_to_a_later_pass(kube: Kube) -> None:
    # The resync (every resync_s) reconciles again first, and that pass schedules it.
    stub = _Stub([0.6])
    _work(kube, stub, resync_s=0.5, seconds=0.6 + EXPIRY_SLACK_S + 0.4)
    assert len(stub.runs) == 1
