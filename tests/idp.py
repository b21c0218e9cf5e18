"""A test identity provider: real RSA/EC keys, real signed JWTs, a JWKS served on loopback.

    idp = Idp.start()                 # JWKS at idp.jwks_uri (a real HTTP server in a thread)
    token = idp.mint(sub="alice")     # RS256, kid of the current RSA key
    idp.rotate()                      # a new current key; the JWKS publishes both
    idp.down()                        # the JWKS endpoint answers 503 (idp.up() to heal)

Every fetch is counted (``idp.fetches``) so tests can see caching and refetches.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://issuer.test"
AUDIENCE = "mcp-extproc"


@dataclass
class Key:
    """A signing key with its id and algorithm."""

    kid: str
    alg: str
    private: Any

    def jwk(self) -> dict[str, Any]:
        public = self.private.public_key()
        algorithm = RSAAlgorithm if self.alg.startswith(("RS", "PS")) else ECAlgorithm
        data: dict[str, Any] = json.loads(algorithm.to_jwk(public))
        data.update(kid=self.kid, alg=self.alg, use="sig")
        return data

    def public_pem(self) -> bytes:
        key: bytes = self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return key


def rsa_key() -> Key:
    return Key(f"rsa-{uuid.uuid4().hex[:8]}", "RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key() -> Key:
    return Key(f"ec-{uuid.uuid4().hex[:8]}", "ES256", ec.generate_private_key(ec.SECP256R1()))


@dataclass
class Idp:
    """Keys, a JWKS endpoint and a token minter."""

    keys: list[Key]
    server: ThreadingHTTPServer | None = None
    fetches: int = 0
    healthy: bool = True
    issuer: str = ISSUER
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def jwks_uri(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    @property
    def current(self) -> Key:
        return self.keys[-1]

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk() for k in self.keys]}

    def rotate(self, key: Key | None = None) -> Key:
        new = key or rsa_key()
        self.keys.append(new)
        return new

    def down(self) -> None:
        self.healthy = False

    def up(self) -> None:
        self.healthy = True

    def mint(
        self,
        sub: str = "alice",
        *,
        key: Key | None = None,
        aud: str | list[str] = AUDIENCE,
        iss: str | None = None,
        lifetime_s: int = 300,
        nbf_in_s: int | None = None,
        headers: Mapping[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A token signed by ``key`` (the current key by default)."""
        signer = key or self.current
        now = int(time.time())
        payload: dict[str, Any] = {"iss": iss or self.issuer, "sub": sub, "aud": aud, "iat": now}
        payload["exp"] = now + lifetime_s
        if nbf_in_s is not None:
            payload["nbf"] = now + nbf_in_s
        payload.update(claims)
        return jwt.encode(payload, signer.private, algorithm=signer.alg, headers={"kid": signer.kid, **(headers or {})})

    def start_server(self) -> None:
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with idp._lock:
                    idp.fetches += 1
                if self.path != "/jwks.json":
                    self.send_error(404)
                    return
                if not idp.healthy:
                    self.send_error(503)
                    return
                body = json.dumps(idp.jwks()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@contextmanager
def running_idp(*keys: Key) -> Iterator[Idp]:
    """An :class:`Idp` with ``keys`` (one RSA key by default), serving its JWKS until exit."""
    idp = Idp(keys=list(keys) or [rsa_key()])
    idp.start_server()
    try:
        yield idp
    finally:
        idp.stop()


def none_token(**claims: Any) -> str:
    """An unsigned ``alg: none`` token (an attack)."""
    return jwt.encode(claims, "", algorithm="none")


def agent_doc(
    name: str,
    jwks_uri: str,
    servers: list[str],
    *,
    granted: str = "medium",
    consent_claim: str | None = "mcp_trust",
    subjects: list[str] | None = None,
    policy_refs: list[str] | None = None,
) -> dict[str, Any]:
    """An ``MCPAgent`` document trusting this test issuer."""
    jwt_spec: dict[str, Any] = {"issuer": ISSUER, "audiences": [AUDIENCE], "jwksUri": jwks_uri}
    if subjects:
        jwt_spec["subjects"] = subjects
    trust: dict[str, Any] = {"granted": granted}
    if consent_claim:
        trust["consentClaim"] = consent_claim
    spec: dict[str, Any] = {
        "mcpServerRefs": [{"name": s} for s in servers],
        "identity": {"jwt": jwt_spec},
        "trust": trust,
    }
    if policy_refs:
        spec["policyRefs"] = [{"name": p} for p in policy_refs]
    return {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPAgent", "metadata": {"name": name}, "spec": spec}
