"""The ``external`` stage over mutual TLS, against a real stagekit server with certificates
made here (a throw-away CA, a server and a client certificate)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extproc.config.pipeline_file import StageSpec
from extproc.core.registry import Registry
from extproc.errors import PluginError
from extproc.external.kit import Reply, Request, ServerTls, StageService, start
from plugins.external import ExternalStage


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(
    directory: Path, stem: str, subject: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0].subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{stem}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert, key


async def _allow(request: Request) -> Reply:
    return None


async def test_mutual_tls_is_required_and_works(tmp_path: Path) -> None:
    ca = _issue(tmp_path, "ca", "test ca", None)
    _issue(tmp_path, "server", "localhost", ca)
    _issue(tmp_path, "client", "mcp-extproc", ca)
    tls = ServerTls(tmp_path / "server.pem", tmp_path / "server.key", client_ca=tmp_path / "ca.pem")
    server, address = await start(StageService("tls-stage", _allow), "127.0.0.1:0", tls=tls)
    try:
        mutual = {"caFile": str(tmp_path / "ca.pem"), "certFile": str(tmp_path / "client.pem")}
        mutual["keyFile"] = str(tmp_path / "client.key")
        stage = Registry().build(StageSpec(name="external", config={"services": [{"address": address, "tls": mutual}]}))
        assert isinstance(stage, ExternalStage)
        await stage.startup()
        assert stage.services[0].name == "tls-stage"
        await stage.shutdown()

        no_client_cert = {"address": address, "tls": {"caFile": str(tmp_path / "ca.pem")}, "describeDeadlineMs": 500}
        refused = Registry().build(StageSpec(name="external", config={"services": [no_client_cert]}))
        with pytest.raises(PluginError, match=r"services\[0\] at 127\.0\.0\.1:\d+: Describe failed: DEADLINE_EXCEEDED"):
            await refused.startup()
    finally:
        await server.stop(None)
