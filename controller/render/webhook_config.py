"""The injection webhook's registration and TLS material. Pure (apart from key generation's randomness).

Data flow::

    ControllerSettings + CA bundle ──▶ MutatingWebhookConfiguration mcp-extproc-injector
        (pods, CREATE, namespaces labelled mcp.extproc.io/injection=enabled,
         failurePolicy Ignore: a down controller never blocks pod creation)
    self-managed: new_ca() ──▶ serving_cert(ca, service DNS names) ──▶ Secret (ca.crt, tls.crt, tls.key)
    cert-manager: the configuration carries cert-manager.io/inject-ca-from and the
        controller leaves caBundle to cert-manager's CA injector.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller.render.meta import CERT_MANAGER_ANNOTATION, MANAGED_BY, MANAGER, ControllerSettings

WEBHOOK_NAME: Final = "mcp-extproc-injector"
WEBHOOK_PATH: Final = "/inject"
TLS_SECRET: Final = "mcp-extproc-webhook-tls"  # noqa: S105 - a Secret name, not a secret
INJECTION_LABEL: Final = "mcp.extproc.io/injection"


@dataclass(frozen=True)
class TlsMaterial:
    """PEM-encoded CA certificate, serving certificate and its key."""

    ca_crt: bytes
    tls_crt: bytes
    tls_key: bytes

    def as_secret(self, settings: ControllerSettings) -> dict[str, Any]:
        """The Secret that stores this material across controller restarts."""
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": TLS_SECRET, "namespace": settings.namespace, "labels": {MANAGED_BY: MANAGER}},
            "type": "kubernetes.io/tls",
            "data": {
                "ca.crt": base64.b64encode(self.ca_crt).decode(),
                "tls.crt": base64.b64encode(self.tls_crt).decode(),
                "tls.key": base64.b64encode(self.tls_key).decode(),
            },
        }

    @classmethod
    def from_secret(cls, secret: dict[str, Any]) -> TlsMaterial | None:
        """The material in a Secret, or None when a key is missing."""
        data = secret.get("data") or {}
        if not all(k in data for k in ("ca.crt", "tls.crt", "tls.key")):
            return None
        return cls(*(base64.b64decode(data[k]) for k in ("ca.crt", "tls.crt", "tls.key")))


def service_dns_names(settings: ControllerSettings) -> list[str]:
    """The names the API server may use for the webhook Service."""
    svc, ns = settings.webhook_service, settings.namespace
    return [svc, f"{svc}.{ns}", f"{svc}.{ns}.svc", f"{svc}.{ns}.svc.cluster.local"]


def new_tls(dns_names: list[str], *, days: int = 365) -> TlsMaterial:
    """A fresh self-signed CA and a serving certificate for ``dns_names`` signed by it."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mcp-extproc webhook CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TlsMaterial(
        ca.public_bytes(pem),
        cert.public_bytes(pem),
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )


def mutating_webhook(
    settings: ControllerSettings, ca_bundle: bytes | None = None, *, cert_manager_certificate: str | None = None
) -> dict[str, Any]:
    """The MutatingWebhookConfiguration; ``cert_manager_certificate`` is ``<namespace>/<Certificate>``."""
    client: dict[str, Any] = {
        "service": {
            "name": settings.webhook_service,
            "namespace": settings.namespace,
            "path": WEBHOOK_PATH,
            "port": settings.webhook_port,
        }
    }
    if ca_bundle is not None:
        client["caBundle"] = base64.b64encode(ca_bundle).decode()
    metadata: dict[str, Any] = {"name": WEBHOOK_NAME, "labels": {MANAGED_BY: MANAGER}}
    if cert_manager_certificate:
        metadata["annotations"] = {CERT_MANAGER_ANNOTATION: cert_manager_certificate}
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": metadata,
        "webhooks": [
            {
                "name": "inject.mcp.extproc.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "reinvocationPolicy": "Never",
                "timeoutSeconds": 5,
                "clientConfig": client,
                "namespaceSelector": {"matchLabels": {INJECTION_LABEL: "enabled"}},
                "objectSelector": {
                    "matchExpressions": [{"key": "mcp.extproc.io/inject", "operator": "NotIn", "values": ["false"]}]
                },
                "rules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE"],
                        "resources": ["pods"],
                        "scope": "Namespaced",
                    }
                ],
            }
        ],
    }
