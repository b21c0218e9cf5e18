"""The injection webhook over real HTTPS with real AdmissionReview JSON, TLS from its self-managed CA."""

from __future__ import annotations

import base64
import copy
import json
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import jsonpatch
import pytest

from controller.render.meta import ControllerSettings
from controller.render.webhook_config import TLS_SECRET, WEBHOOK_NAME, TlsMaterial, mutating_webhook
from controller.runtime.kube import Kube
from controller.runtime.webhook import WebhookServer, cluster_agents, ensure_tls
from tests.fakekube import FakeApiServer
from tests.kubedocs import NS, agent
from tests.kubeschemas import validate_core

SETTINGS = ControllerSettings(namespace="mcp-system")
SNI = f"{SETTINGS.webhook_service}.{SETTINGS.namespace}.svc"
MWC = "admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


@pytest.fixture
def webhook(api: FakeApiServer, kube: Kube) -> Iterator[tuple[str, TlsMaterial]]:
    doc = agent("assistant", ["tools"])
    api.put("mcp.extproc.io/v1alpha1/mcpagents", {**doc, "metadata": {"name": "assistant", "namespace": NS}})
    api.put(MWC, mutating_webhook(SETTINGS))  # as `kubectl apply -k deploy/` leaves it: no caBundle
    tls = ensure_tls(kube, SETTINGS)
    server = WebhookServer(("127.0.0.1", 0), tls, cluster_agents(kube), SETTINGS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}", tls
    server.shutdown()
    server.server_close()


def review(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": NS,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": False,
        },
    }


def pod(**annotations: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"generateName": "assistant-", "labels": {"app": "assistant"}, "annotations": annotations},
        "spec": {"containers": [{"name": "agent", "image": "agent:1"}]},
    }


def post(base: str, tls: TlsMaterial, body: Any) -> httpx.Response:
    context = ssl.create_default_context(cadata=tls.ca_crt.decode())  # trust only the webhook's CA
    with httpx.Client(verify=context) as client:
        return client.post(f"{base}/inject", json=body, extensions={"sni_hostname": SNI}, timeout=10)


def test_tls_material_is_stored_and_the_ca_bundle_published(
    api: FakeApiServer, webhook: tuple[str, TlsMaterial]
) -> None:
    _base, tls = webhook
    secret = api.get("v1/secrets", "mcp-system", TLS_SECRET)
    assert secret is not None and TlsMaterial.from_secret(secret) == tls
    config = api.get(MWC, "", WEBHOOK_NAME)
    assert config is not None
    assert base64.b64decode(config["webhooks"][0]["clientConfig"]["caBundle"]) == tls.ca_crt
    validate_core(config)


def test_admission_review_over_https_injects_the_sidecars(webhook: tuple[str, TlsMaterial]) -> None:
    base, tls = webhook
    answer = post(base, tls, review(pod()))
    assert answer.status_code == 200
    body = answer.json()
    assert body["apiVersion"] == "admission.k8s.io/v1" and body["kind"] == "AdmissionReview"
    response = body["response"]
    assert response["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patched = jsonpatch.apply_patch(copy.deepcopy(pod()), json.loads(base64.b64decode(response["patch"])))
    validate_core({**patched, "metadata": {**patched["metadata"], "name": "assistant-x"}})
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["mcp-extproc", "mcp-envoy"]
    assert {"name": "MCP_SERVER_TOOLS_URL", "value": "http://127.0.0.1:15001/tools/mcp"} in patched["spec"][
        "containers"
    ][0]["env"]
    # Reinvocation or a retried request: the injected pod is left as it is.
    again = post(base, tls, review(patched))
    assert again.json()["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_opted_out_pod_is_allowed_without_a_patch(webhook: tuple[str, TlsMaterial]) -> None:
    base, tls = webhook
    answer = post(base, tls, review(pod(**{"mcp.extproc.io/inject": "false"})))
    assert answer.json()["response"] == {"uid": "705ab4f5-6393-11e8-b7cc-42010a800002", "allowed": True}


def test_garbage_is_a_400_not_a_crash(webhook: tuple[str, TlsMaterial]) -> None:
    base, tls = webhook
    assert post(base, tls, {"kind": "Pod"}).status_code == 400
    assert "AdmissionReview" in post(base, tls, [1, 2]).json()["error"]
    assert post(base, tls, review(pod())).status_code == 200  # still serving


def test_certificate_is_only_valid_for_the_service_name(webhook: tuple[str, TlsMaterial]) -> None:
    base, tls = webhook
    context = ssl.create_default_context(cadata=tls.ca_crt.decode())
    with httpx.Client(verify=context) as client, pytest.raises(httpx.ConnectError):
        client.post(f"{base}/inject", json=review(pod()), extensions={"sni_hostname": "evil.example"}, timeout=10)


def test_existing_tls_secret_is_reused(api: FakeApiServer, kube: Kube, webhook: tuple[str, TlsMaterial]) -> None:
    _base, tls = webhook
    assert ensure_tls(kube, SETTINGS) == tls  # a restart (or a second replica) keeps the same CA


def test_cert_manager_annotation_leaves_the_ca_bundle_alone(api: FakeApiServer, kube: Kube) -> None:
    api.put(MWC, mutating_webhook(SETTINGS, cert_manager_certificate="mcp-system/webhook-cert"))
    with pytest.raises(Exception, match="waiting for cert-manager"):
        ensure_tls(kube, SETTINGS)
    assert api.get("v1/secrets", "mcp-system", TLS_SECRET) is None  # never creates cert-manager's Secret
    from controller.render.webhook_config import new_tls, service_dns_names

    issued = new_tls(service_dns_names(SETTINGS))
    api.put("v1/secrets", issued.as_secret(SETTINGS))
    assert ensure_tls(kube, SETTINGS) == issued
    config = api.get(MWC, "", WEBHOOK_NAME)
    assert config is not None and "caBundle" not in config["webhooks"][0]["clientConfig"]
