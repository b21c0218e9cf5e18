"""Workload identity through real Envoy: callers the deployment identifies, without a JWT.

Two deployments, each with a recording upstream (tests.upstreams.pyserver) behind it:

    sidecar   an MCPAgent with just selector and mcpServerRefs, rendered by the controller
              (controller.render.namespace + controller.render.inject) and run as the pod
              would run it: ``mcp-extproc serve`` + ``envoy -c envoy.yaml`` on the rendered
              files. The SDK agent sends no token; the pod is the agent.
    up        ``mcp-extproc up`` with a file whose only MCPAgent declares no identity.
    mtls      ``mcp-extproc serve`` and the bootstrap ``render envoy`` prints, its listener given
              a TLS context that asks for client certificates (what an Istio or mTLS gateway
              does); agents known by their service account; test certificates from a local CA.
              On both front doors: ext_proc (the connection.uri_san_peer_certificate
              attribute) and ext_authz (the Check's source.principal).

Either way a header an agent sends (X-Forwarded-Client-Cert and the like) identifies nobody.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp.shared.exceptions import MCPError

from controller.render.inject import sidecar_containers
from controller.render.meta import ControllerSettings
from controller.render.namespace import render_documents
from controller.render.sidecar import CONFIG_DIR
from extproc.commands.envoy import envoy_binary
from tests.agents import legacy_session, modern_request, raw_post
from tests.integration.conftest import start_gateway
from tests.procs import Proc, admin_ready, free_port, start_pyserver, unix_connects, until_ready
from tests.upstreams.pyserver import Record, read_records

pytestmark = pytest.mark.integration

NS = "agents"
UPSTREAM_TOKEN = "workload-upstream-token"
FORGED = {
    "x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/{NS}/sa/gw;URI=spiffe://cluster.local/ns/{NS}/sa/robot",
    "x-mcp-agent": "robot",
    "x-forwarded-user": "robot",
    "x-spiffe-id": f"spiffe://cluster.local/ns/{NS}/sa/robot",
}
"""Headers claiming to be agent ``robot``."""


def _decisions(proc: Proc) -> list[dict[str, Any]]:
    """The extension server's audit lines so far."""
    marker = "mcp_extproc.audit: "
    return [json.loads(line.split(marker, 1)[1]) for line in proc.output().splitlines() if marker in line]


def _calls(records: Path) -> list[Record]:
    return [r for r in read_records(records) if isinstance(r["body"], dict) and r["body"].get("method") == "tools/call"]


# --- the sidecar ---------------------------------------------------------------------------


@dataclass
class Pod:
    url: str
    extproc: Proc
    records: Path


@pytest.fixture(scope="module")
def pod(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    tmp = tmp_path_factory.mktemp("workload-sidecar")
    config_dir, socket_dir = tmp / "etc", tmp / "run"
    config_dir.mkdir()
    socket_dir.mkdir()
    records = tmp / "tools.jsonl"
    procs: list[Proc] = []
    try:
        upstream, port = start_pyserver("legacy-json", records)
        procs.append(upstream)
        docs: list[dict[str, Any]] = [
            {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPServer",
                "metadata": {"name": "tools", "namespace": NS},
                "spec": {
                    "url": f"http://127.0.0.1:{port}/mcp",
                    "allowedTools": ["echo", "add"],
                    "upstreamAuth": {"bearer": {"secretRef": {"name": "tools-token", "key": "token"}}},
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "tools-token", "namespace": NS},
                "stringData": {"token": UPSTREAM_TOKEN},
            },
            {  # no spec.identity: the pods its selector matches are this agent
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPAgent",
                "metadata": {"name": "assistant", "namespace": NS},
                "spec": {"selector": {"matchLabels": {"app": "assistant"}}, "mcpServerRefs": [{"name": "tools"}]},
            },
        ]
        settings = ControllerSettings(sidecar_port=free_port(), socket_dir=str(socket_dir))
        [(view, rendered)] = render_documents(docs, settings).values()
        assert not rendered.problems, rendered.problems
        for obj in rendered.objects:
            if obj["kind"] in ("ConfigMap", "Secret") and obj["metadata"]["name"] == "mcp-agent-assistant":
                for key, value in {**obj.get("data", {}), **obj.get("stringData", {})}.items():
                    (config_dir / key).write_text(value)
        extproc, envoy = sidecar_containers(view.catalog.agents["assistant"], settings)

        def local(args: list[str]) -> list[str]:
            out = [arg.replace(CONFIG_DIR, str(config_dir)) for arg in args]
            if "--metrics" in out:
                out[out.index("--metrics") + 1] = "127.0.0.1:0"
            return out

        serve = Proc([sys.executable, "-m", "extproc", *local(extproc["args"])], name="sidecar-extproc", log_dir=tmp)
        procs.append(serve)
        until_ready(lambda: unix_connects(settings.socket_path), serve, "the extension server's socket")
        front = Proc([envoy_binary(), *local(envoy["args"])], name="sidecar-envoy", log_dir=tmp)
        procs.append(front)
        until_ready(lambda: admin_ready(settings.admin_socket_path), front, "the sidecar Envoy")
        yield Pod(f"http://127.0.0.1:{settings.sidecar_port}/tools/mcp", serve, records)
    finally:
        for proc in reversed(procs):
            proc.stop()


async def test_in_the_sidecar_the_pods_agent_is_the_principal_without_a_token(pod: Pod) -> None:
    async with legacy_session(pod.url) as session:
        result = await session.call_tool("echo", {"text": "no token needed"})
        assert result.content[0].text == "no token needed"  # type: ignore[union-attr]
        with pytest.raises(MCPError, match="not allowed"):
            await session.call_tool("delete_everything", {})
    allowed = [d for d in _decisions(pod.extproc) if d["tool"] == "echo" and d["decision"] == "allow"]
    assert allowed, pod.extproc.output()[-2000:]
    assert {(d["principal"], d["issuer"], d["agent"]) for d in allowed} == {("assistant", "workload", "assistant")}
    # The upstream credential is injected for the workload as for a token's subject.
    assert {r["headers"].get("authorization") for r in _calls(pod.records)} == {f"Bearer {UPSTREAM_TOKEN}"}


async def test_in_the_sidecar_forged_identity_headers_do_nothing(pod: Pod) -> None:
    async with legacy_session(pod.url, headers=FORGED) as session:  # on every request of the session
        result = await session.call_tool("echo", {"text": "forged headers"})
        assert result.content[0].text == "forged headers"  # type: ignore[union-attr]
    decision = [d for d in _decisions(pod.extproc) if d["tool"] == "echo"][-1]
    assert (decision["principal"], decision["agent"], decision["decision"]) == ("assistant", "assistant", "allow")
    forwarded = _calls(pod.records)[-1]
    assert forwarded["body"]["params"]["arguments"] == {"text": "forged headers"}
    assert not set(FORGED) & set(forwarded["headers"]), "the forged headers never reach the upstream"


async def test_in_the_sidecar_a_token_is_still_checked(pod: Pod) -> None:
    before = len(read_records(pod.records))
    call = {"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": {"name": "echo", "arguments": {"text": "x"}}}
    reply = await raw_post(pod.url, call, {"mcp-protocol-version": "2025-06-18", "authorization": "Bearer forged"})
    assert reply.status_code == 401
    assert len(read_records(pod.records)) == before


async def test_up_serves_its_only_agent_without_a_token(tmp_path: Path) -> None:
    records = tmp_path / "tools.jsonl"
    upstream, port = start_pyserver("legacy-json", records)
    try:
        server = {"url": f"http://127.0.0.1:{port}/mcp", "allowedTools": ["echo"]}
        docs = [
            {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPServer",
                "metadata": {"name": "tools"},
                "spec": server,
            },
            {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPAgent",
                "metadata": {"name": "laptop"},
                "spec": {"mcpServerRefs": [{"name": "tools"}]},
            },
        ]
        resources = tmp_path / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        up, base, _ = start_gateway(resources, tmp_path)
        try:
            async with legacy_session(f"{base}/tools/mcp", headers=FORGED) as session:
                result = await session.call_tool("echo", {"text": "on this machine"})
                assert result.content[0].text == "on this machine"  # type: ignore[union-attr]
            decision = [d for d in _decisions(up) if d["tool"] == "echo"][-1]
            assert (decision["principal"], decision["issuer"], decision["agent"]) == ("laptop", "workload", "laptop")
        finally:
            up.stop()
    finally:
        upstream.stop()


# --- mTLS: agents known by their service account -------------------------------------------


@dataclass
class Certs:
    ca: Path
    robot: tuple[Path, Path]
    """A client certificate with ``spiffe://cluster.local/ns/agents/sa/robot`` as its URI SAN."""
    intruder: tuple[Path, Path]
    """The same CA's certificate for service account ``intruder``."""
    self_signed_robot: tuple[Path, Path]
    """A certificate naming robot's SPIFFE ID, signed by no CA Envoy trusts."""


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    sans: list[x509.GeneralName],
    *,
    ca: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def _make_certs(directory: Path) -> tuple[Certs, tuple[Path, Path]]:
    ca_key = _key()
    ca = _cert("test mesh CA", ca_key, None, [], ca=True)
    ca_path, _ = _write(directory, "ca", ca, ca_key)
    signer = (ca.subject, ca_key)
    server_key = _key()
    server = _write(
        directory,
        "envoy",
        _cert("envoy", server_key, signer, [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
        server_key,
    )

    def workload(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None) -> tuple[Path, Path]:
        key = _key()
        uri = x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/{NS}/sa/{name.removeprefix('self-signed-')}")
        return _write(directory, name, _cert(name, key, issuer, [uri]), key)

    certs = Certs(ca_path, workload("robot", signer), workload("intruder", signer), workload("self-signed-robot", None))
    return certs, server


@dataclass
class Mesh:
    base: str
    extproc: Proc
    records: Path
    certs: Certs

    async def call(self, server: str, cert: tuple[Path, Path] | None, text: str, **headers: str) -> httpx.Response:
        context = ssl.create_default_context(cafile=str(self.certs.ca))
        if cert is not None:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
        body, request_headers = modern_request("tools/call", {"name": "echo", "arguments": {"text": text}})
        async with httpx.AsyncClient(verify=context, timeout=10) as client:
            return await client.post(f"{self.base}/{server}/mcp", json=body, headers={**request_headers, **headers})


@pytest.fixture(scope="module", params=["ext_proc", "ext_authz"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    front_door: str = request.param
    tmp = tmp_path_factory.mktemp(f"workload-mtls-{front_door}")
    certs, (server_cert, server_key) = _make_certs(tmp)
    records = tmp / "tools.jsonl"
    procs: list[Proc] = []
    try:
        upstream, port = start_pyserver("modern", records)
        procs.append(upstream)
        tools = {"url": f"http://127.0.0.1:{port}/mcp", "allowedTools": ["echo"]}

        def agent(name: str, servers: list[str]) -> dict[str, Any]:
            return {
                "apiVersion": "mcp.extproc.io/v1alpha1",
                "kind": "MCPAgent",
                "metadata": {"name": name, "namespace": NS},
                "spec": {"mcpServerRefs": [{"name": s} for s in servers], "identity": {"serviceAccount": name}},
            }

        docs = [
            {"apiVersion": "mcp.extproc.io/v1alpha1", "kind": "MCPServer", "metadata": {"name": n}, "spec": tools}
            for n in ("tools", "private")
        ]
        docs += [agent("robot", ["tools"]), agent("intruder", ["private"])]
        resources = tmp / "resources.yaml"
        resources.write_text(yaml.safe_dump_all(docs))
        sock, admin, listen = str(tmp / "extproc.sock"), str(tmp / "admin.sock"), free_port()
        base = f"https://127.0.0.1:{listen}"
        serve_argv = ["serve", "-f", str(resources), "--grpc", "", "--unix", sock, "--metrics", "127.0.0.1:0"]
        serve = Proc(
            [sys.executable, "-m", "extproc", *serve_argv, "--public-url", base], name="mtls-extproc", log_dir=tmp
        )
        procs.append(serve)
        until_ready(lambda: unix_connects(sock), serve, "the extension server's socket")
        render_argv = ["render", "envoy", "-f", str(resources), "--unix", sock, "--listen", f"127.0.0.1:{listen}"]
        rendered = Proc(
            [sys.executable, "-m", "extproc", *render_argv, "--admin-socket", admin, "--front-door", front_door],
            name="render-envoy",
            log_dir=tmp,
        )
        assert rendered.popen.wait(60) == 0, rendered.output()
        bootstrap = yaml.safe_load(rendered.output())
        [chain] = bootstrap["static_resources"]["listeners"][0]["filter_chains"]
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                # Asked for, verified when sent; a client without one gets in with no peer identity.
                "require_client_certificate": False,
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(server_cert)},
                            "private_key": {"filename": str(server_key)},
                        }
                    ],
                    "validation_context": {"trusted_ca": {"filename": str(certs.ca)}},
                },
            },
        }
        config = tmp / "envoy.yaml"
        config.write_text(yaml.safe_dump(bootstrap))
        envoy = Proc(
            [envoy_binary(), "-c", str(config), "--log-level", "warning", "--use-dynamic-base-id"],
            name="mtls-envoy",
            log_dir=tmp,
        )
        procs.append(envoy)
        until_ready(lambda: admin_ready(admin), envoy, "Envoy")
        yield Mesh(base, serve, records, certs)
    finally:
        for proc in reversed(procs):
            proc.stop()


async def test_the_mtls_peer_is_the_agent_of_its_service_account(mesh: Mesh) -> None:
    reply = await mesh.call("tools", mesh.certs.robot, "as robot")
    assert reply.status_code == 200, reply.text
    assert "as robot" in reply.text
    decision = [d for d in _decisions(mesh.extproc) if d["tool"] == "echo"][-1]
    assert decision["decision"] == "allow"
    robot = f"spiffe://cluster.local/ns/{NS}/sa/robot"
    assert (decision["principal"], decision["issuer"], decision["agent"]) == (robot, "spiffe://cluster.local", "robot")


async def test_over_mtls_forged_identity_headers_do_nothing(mesh: Mesh) -> None:
    before = len(_calls(mesh.records))
    # No client certificate: a header claiming robot's identity is nobody.
    reply = await mesh.call("tools", None, "no cert", **FORGED)
    assert reply.status_code == 401, reply.text
    # Another agent's certificate: it stays that agent, which may not use this server.
    reply = await mesh.call("tools", mesh.certs.intruder, "intruder", **FORGED)
    assert reply.status_code == 403, reply.text
    assert "MCPAgent 'intruder' does not reference MCPServer 'tools'" in reply.text
    assert len(_calls(mesh.records)) == before, "neither reached the upstream"


async def test_a_certificate_from_another_ca_never_gets_through(mesh: Mesh) -> None:
    before = len(_calls(mesh.records))
    # Envoy refuses the handshake; with TLS 1.3 the client may learn it only on its first read.
    with pytest.raises((httpx.HTTPError, ssl.SSLError)):
        await mesh.call("tools", mesh.certs.self_signed_robot, "forged cert")
    assert len(_calls(mesh.records)) == before
