"""The injection webhook: AdmissionReview over HTTPS → a JSON patch. The I/O edge of inject.py.

Data flow::

    POST /inject AdmissionReview(v1) ──pod, namespace──▶ Kube.list(MCPAgent, namespace)
        ──build_view──▶ valid agents ──injection_patch──▶ AdmissionReview response
            (allowed: true always; patchType JSONPatch when something is injected)
    TLS: ensure_tls() loads the serving certificate from Secret mcp-extproc-webhook-tls,
    creating a self-managed CA and certificate when it is missing (unless the webhook
    configuration is annotated for cert-manager), and keeps caBundle in the
    MutatingWebhookConfiguration in step.

A failure reading agents answers "allowed, no patch" and logs it: the webhook's
failurePolicy is Ignore, so a pod is never blocked by the controller, and the
agent's NetworkPolicy still limits its egress.
"""

from __future__ import annotations

import base64
import json
import logging
import ssl
import tempfile
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from controller.render.inject import injection_patch
from controller.render.meta import CERT_MANAGER_ANNOTATION, ControllerSettings
from controller.render.view import build_view
from controller.render.webhook_config import (
    TLS_SECRET,
    WEBHOOK_NAME,
    WEBHOOK_PATH,
    TlsMaterial,
    mutating_webhook,
    new_tls,
    service_dns_names,
)
from controller.runtime.kube import Kube, KubeError
from extproc.config.models import MCPAgent

log = logging.getLogger("mcp_extproc.webhook")
MAX_REVIEW_BYTES = 4 * 1024 * 1024

AgentSource = Callable[[str], list[MCPAgent]]


def review_response(review: dict[str, Any], agents_for: AgentSource, settings: ControllerSettings) -> dict[str, Any]:
    """The AdmissionReview answer for one request."""
    request = review.get("request") or {}
    uid = request.get("uid", "")
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    pod = request.get("object") or {}
    namespace = request.get("namespace") or (pod.get("metadata") or {}).get("namespace") or "default"
    try:
        agents = agents_for(namespace)
    except KubeError as exc:
        log.warning("injection skipped for a pod in %s: cannot read MCPAgents: %s", namespace, exc)
        return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
    ops, agent = injection_patch(pod, agents, settings)
    if ops:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(json.dumps(ops).encode()).decode()
        log.info("injected MCPAgent %s into a pod in %s", agent, namespace)
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}


def cluster_agents(kube: Kube) -> AgentSource:
    """Agents of a namespace, read from the API server at each review (always current)."""

    def agents_for(namespace: str) -> list[MCPAgent]:
        view = build_view(namespace, kube.list("MCPAgent", namespace))
        return list(view.catalog.agents.values())

    return agents_for


class WebhookServer(ThreadingHTTPServer):
    """An HTTPS server answering AdmissionReviews at ``/inject``."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], tls: TlsMaterial, agents_for: AgentSource, settings: ControllerSettings
    ) -> None:
        super().__init__(address, _ReviewHandler)
        self.agents_for = agents_for
        self.settings = settings
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        with tempfile.TemporaryDirectory() as tmp:  # ssl loads keys from files only
            cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
            cert.write_bytes(tls.tls_crt)
            key.write_bytes(tls.tls_key)
            context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)


class _ReviewHandler(BaseHTTPRequestHandler):
    server: WebhookServer

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != WEBHOOK_PATH:
            self._send(404, {"error": f"not found; the webhook is at {WEBHOOK_PATH}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if length <= 0 or length > MAX_REVIEW_BYTES:
            self._send(400, {"error": "expected an AdmissionReview body (at most 4 MiB)"})
            return
        try:
            review = json.loads(self.rfile.read(length))
            if not isinstance(review, dict) or review.get("kind") != "AdmissionReview":
                raise ValueError("not an AdmissionReview")
        except ValueError as exc:
            self._send(400, {"error": f"expected an admission.k8s.io/v1 AdmissionReview: {exc}"})
            return
        self._send(200, review_response(review, self.server.agents_for, self.server.settings))

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("webhook: " + format, *args)


def ensure_tls(kube: Kube, settings: ControllerSettings) -> TlsMaterial:
    """The serving certificate: from the Secret, created (self-managed CA) when missing.

    With the webhook configuration annotated ``cert-manager.io/inject-ca-from`` the
    Secret is cert-manager's and ``caBundle`` is left to its CA injector.
    """
    config = kube.get("MutatingWebhookConfiguration", WEBHOOK_NAME)
    cert_manager = (((config or {}).get("metadata") or {}).get("annotations") or {}).get(CERT_MANAGER_ANNOTATION)
    secret = kube.get("Secret", TLS_SECRET, settings.namespace)
    tls = TlsMaterial.from_secret(secret) if secret else None
    if tls is None:
        if cert_manager:
            raise KubeError(f"waiting for cert-manager to write Secret {settings.namespace}/{TLS_SECRET}", 503)
        tls = new_tls(service_dns_names(settings))
        try:
            kube.create(tls.as_secret(settings))
        except KubeError as exc:
            if exc.status != 409:
                raise
            raced = kube.get("Secret", TLS_SECRET, settings.namespace)  # another replica won: use theirs
            tls = TlsMaterial.from_secret(raced or {}) or tls
    if not cert_manager:
        kube.apply(mutating_webhook(settings, tls.ca_crt))
    return tls


def start_webhook(kube: Kube, settings: ControllerSettings, address: tuple[str, int]) -> WebhookServer:
    """Ensure TLS and serve the webhook in a daemon thread."""
    tls = ensure_tls(kube, settings)
    server = WebhookServer(address, tls, cluster_agents(kube), settings)
    threading.Thread(target=server.serve_forever, name="controller-webhook", daemon=True).start()
    return server
