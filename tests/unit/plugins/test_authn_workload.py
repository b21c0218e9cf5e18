"""The authn stage without a token: the agent the deployment identifies, never one a header names.

Through the real ext_proc front door (and the gRPC ``Check`` one for the mTLS peer), with
the stage configured as the controller's sidecar (``workloadAgent``) or fed the client
certificate's SPIFFE ID the way Envoy sends it (the ``connection.uri_san_peer_certificate``
attribute, ext_authz's ``source.principal``). Real signed JWTs from a loopback issuer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as attr_pb
from envoy.service.auth.v3 import external_auth_pb2 as authz_pb
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extproc.api import WORKLOAD_ISSUER, Principal
from extproc.config.pipeline_file import DEFAULT_PIPELINE, with_stage_config
from extproc.config.resources import Catalog, parse_documents
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.frontdoor.ext_proc import Processor
from extproc.frontdoor.grpc_check import AuthorizationService
from extproc.render.wire import EXT_PROC_FILTER, PEER_ATTRIBUTE
from tests.idp import Idp, agent_doc, running_idp
from tests.messages import SERVER_DOC, headers_msg, post_headers

OTHER_SERVER = {**SERVER_DOC, "metadata": {"name": "other"}}
ROBOT_ID = "spiffe://cluster.local/ns/agents/sa/robot"
FORGED = {
    "x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/agents/sa/gw;URI={ROBOT_ID}",
    "x-mcp-agent": "robot",
    "x-mcp-principal": "robot",
    "x-forwarded-user": "robot",
    "x-remote-user": "robot",
    "x-spiffe-id": ROBOT_ID,
}
"""Headers an agent could send to claim another identity: none of them may count."""


def bare_agent(name: str, servers: list[str], **spec: Any) -> dict[str, Any]:
    """An ``MCPAgent`` with no ``spec.identity`` (what a sidecar's agent needs)."""
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPAgent",
        "metadata": {"name": name, "namespace": spec.pop("namespace", "default")},
        "spec": {"mcpServerRefs": [{"name": s} for s in servers], "trust": {"granted": "medium"}, **spec},
    }


def robot_agent(**identity: Any) -> dict[str, Any]:
    """An ``MCPAgent`` known by its pods' service account (``robot`` in namespace ``agents``)."""
    return bare_agent("robot", ["demo"], namespace="agents", identity={"serviceAccount": "robot", **identity})


@pytest.fixture
def idp() -> Iterator[Idp]:
    with running_idp() as running:
        yield running


async def started(config: Any) -> AsyncIterator[Pipeline]:
    pipeline = Registry().build_pipeline(config)
    await pipeline.startup()
    try:
        yield pipeline
    finally:
        await pipeline.shutdown()


@pytest.fixture
async def sidecar() -> AsyncIterator[Pipeline]:
    """The pipeline as the controller renders it for an agent without identity named ``assistant``."""
    async for pipeline in started(with_stage_config(DEFAULT_PIPELINE, "authn", workloadAgent="assistant")):
        yield pipeline


@pytest.fixture
async def gateway() -> AsyncIterator[Pipeline]:
    """The default pipeline: no workload agent (a gateway, or ``serve`` not told otherwise)."""
    async for pipeline in started(DEFAULT_PIPELINE):
        yield pipeline


async def exchange(
    pipeline: Pipeline, catalog: Catalog, path: str = "/demo/mcp", *, peer: str | None = None, **headers: str
) -> tuple[pb.ProcessingResponse, Principal | None]:
    request = headers_msg(post_headers(path, **headers))
    if peer is not None:
        # What Envoy attaches when the ext_proc filter lists the attribute in request_attributes.
        attributes = struct_pb2.Struct()
        attributes.update({PEER_ATTRIBUTE: peer})
        request.attributes[EXT_PROC_FILTER].CopyFrom(attributes)
    processor = Processor(pipeline, catalog)
    response = await processor.handle(request)
    assert processor.ctx is not None
    return response, processor.ctx.principal


def refused(response: pb.ProcessingResponse) -> tuple[int, str]:
    assert response.HasField("immediate_response"), "expected the request to be refused"
    body = json.loads(response.immediate_response.body)
    return response.immediate_response.status.code, body["error"]["message"]


async def test_without_a_token_the_sidecars_agent_is_the_principal(sidecar: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, bare_agent("assistant", ["demo"])], "test")
    response, principal = await exchange(sidecar, catalog)
    assert response.HasField("request_headers"), "served"
    assert principal == Principal(
        subject="assistant", issuer=WORKLOAD_ISSUER, agent="assistant", granted="medium", consented="medium"
    )
    assert not principal.anonymous


async def test_forged_identity_headers_change_nothing(sidecar: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, bare_agent("assistant", ["demo"]), robot_agent()], "test")
    _, principal = await exchange(sidecar, catalog, **FORGED)
    assert principal is not None and principal.agent == "assistant", "the headers named robot; the pod is assistant"


async def test_forged_identity_headers_name_nobody_on_a_gateway(gateway: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, robot_agent()], "test")
    response, principal = await exchange(gateway, catalog, **FORGED)
    status, message = refused(response)
    assert (status, principal) == (401, None)
    assert "Authorization: Bearer" in message


async def test_the_workload_agent_reaches_only_its_servers(sidecar: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, OTHER_SERVER, bare_agent("assistant", ["demo"])], "test")
    response, principal = await exchange(sidecar, catalog, "/other/mcp")
    assert refused(response) == (403, "MCPAgent 'assistant' does not reference MCPServer 'other'")
    assert principal is None


async def test_a_token_wins_and_is_still_checked(sidecar: Pipeline, idp: Idp) -> None:
    docs = [SERVER_DOC, bare_agent("assistant", ["demo"]), agent_doc("agent", idp.jwks_uri, ["demo"])]
    catalog = parse_documents(docs, "test")
    _, principal = await exchange(sidecar, catalog, authorization=f"Bearer {idp.mint('alice')}")
    assert principal is not None and (principal.subject, principal.agent) == ("alice", "agent")
    assert principal.token, "the subject token stays, for token exchange"
    for bad in ("Bearer not-a-jwt", "Basic YTpi", "Bearer "):
        response, principal = await exchange(sidecar, catalog, authorization=bad)
        assert refused(response)[0] == 401, f"{bad!r} is refused, never read as 'no token'"
        assert principal is None


async def test_the_default_pipeline_identifies_no_agent_without_a_token(gateway: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, bare_agent("assistant", ["demo"])], "test")
    response, principal = await exchange(gateway, catalog)
    assert (refused(response)[0], principal) == (401, None)
    [problem] = [p for p in gateway.check(catalog) if "assistant" in p]
    assert "a JWT is required" in problem and ": warning:" not in problem


async def test_the_mtls_peer_is_the_agent_of_its_service_account(gateway: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, robot_agent()], "test")
    response, principal = await exchange(gateway, catalog, peer=ROBOT_ID, **FORGED)
    assert response.HasField("request_headers")
    assert principal == Principal(
        subject=ROBOT_ID, issuer="spiffe://cluster.local", agent="robot", granted="medium", consented="medium"
    )


@pytest.mark.parametrize(
    "peer",
    [
        "spiffe://cluster.local/ns/default/sa/robot",  # another namespace's robot
        "spiffe://other.domain/ns/agents/sa/robot",  # another trust domain
        "spiffe://cluster.local/ns/agents/sa/robot/x",
        "robot",  # a DNS SAN or subject ext_authz may report instead of a URI SAN
        "",
    ],
)
async def test_any_other_peer_is_nobody(gateway: Pipeline, peer: str) -> None:
    catalog = parse_documents([SERVER_DOC, robot_agent()], "test")
    response, principal = await exchange(gateway, catalog, peer=peer)
    assert (refused(response)[0], principal) == (401, None)


async def test_a_trust_domain_other_than_istios_default(gateway: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, robot_agent(trustDomain="example.org")], "test")
    _, principal = await exchange(gateway, catalog, peer="spiffe://example.org/ns/agents/sa/robot")
    assert principal is not None and principal.issuer == "spiffe://example.org"
    response, principal = await exchange(gateway, catalog, peer=ROBOT_ID)
    assert (refused(response)[0], principal) == (401, None)


async def test_the_grpc_check_reads_the_peer_from_source_principal(gateway: Pipeline) -> None:
    catalog = parse_documents([SERVER_DOC, robot_agent()], "test")
    service = AuthorizationService(gateway, catalog)

    def check(principal: str, **headers: str) -> authz_pb.CheckRequest:
        http = attr_pb.AttributeContext.HttpRequest(method="POST", path="/demo/mcp", headers=headers)
        return authz_pb.CheckRequest(
            attributes=attr_pb.AttributeContext(
                source=attr_pb.AttributeContext.Peer(principal=principal),
                request=attr_pb.AttributeContext.Request(http=http),
            )
        )

    assert (await service.Check(check(ROBOT_ID), None)).HasField("ok_response")
    denied = await service.Check(check("", **FORGED), None)
    assert denied.denied_response.status.code == 401


def test_check_says_where_a_jwt_is_required(sidecar: Pipeline, gateway: Pipeline, idp: Idp) -> None:
    two = parse_documents([SERVER_DOC, bare_agent("assistant", ["demo"]), bare_agent("helper", ["demo"])], "test")
    [problem] = sidecar.check(two)
    assert problem.startswith("stage 'authn': MCPAgent 'helper' declares no spec.identity")
    assert "a JWT is required (spec.identity.jwt) on a gateway and with several MCPAgents" in problem
    assert len(gateway.check(two)) == 2
    with_jwt = parse_documents([SERVER_DOC, agent_doc("assistant", idp.jwks_uri, ["demo"])], "test")
    [problem] = sidecar.check(with_jwt)
    assert "MCPAgent 'assistant' declares spec.identity, so its callers must prove it" in problem
    nobody = parse_documents([SERVER_DOC, agent_doc("agent", idp.jwks_uri, ["demo"])], "test")
    assert "workloadAgent 'assistant': no MCPAgent of that name is declared" in sidecar.check(nobody)[0]


def test_token_exchange_without_a_jwt_is_a_warning(sidecar: Pipeline) -> None:
    exchange_auth = {
        "tokenExchange": {
            "tokenUrl": "https://idp.test/token",
            "clientId": "gw",
            "clientSecretRef": {"name": "gw", "key": "secret"},
        }
    }
    server = {**SERVER_DOC, "spec": {**SERVER_DOC["spec"], "upstreamAuth": exchange_auth}}  # type: ignore[dict-item]
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "gw"}, "stringData": {"secret": "x"}}
    catalog = parse_documents([server, secret, bare_agent("assistant", ["demo"])], "test")
    errors, warnings = sidecar.check_split(catalog)
    assert errors == []
    assert any("exchanges the caller's token" in w and "'assistant'" in w for w in warnings)
