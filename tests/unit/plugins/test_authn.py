"""The authn stage, in process through the ext_proc adapter, against a real JWKS on loopback.

Real RSA and EC keys, real signed tokens; the answers asserted are what Envoy
would send the agent (status, WWW-Authenticate, JSON-RPC error).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.api import Principal
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig, StageSpec
from extproc.config.resources import Catalog, parse_documents
from extproc.core.pipeline import Pipeline
from extproc.core.registry import Registry
from extproc.frontdoor.ext_proc import Processor
from tests.idp import AUDIENCE, Idp, agent_doc, ec_key, none_token, rsa_key, running_idp
from tests.messages import SERVER_DOC, headers_msg, post_headers

OTHER_SERVER = {**SERVER_DOC, "metadata": {"name": "other"}}


@pytest.fixture
def idp() -> Iterator[Idp]:
    with running_idp(rsa_key(), ec_key()) as running:
        yield running


@pytest.fixture
def catalog_with_agent(idp: Idp) -> Catalog:
    return parse_documents([SERVER_DOC, OTHER_SERVER, agent_doc("agent", idp.jwks_uri, ["demo"])], "test")


class Exchange:
    def __init__(self, pipeline: Pipeline, catalog: Catalog) -> None:
        self.processor = Processor(pipeline, catalog)

    async def headers(self, path: str = "/demo/mcp", **extra: str) -> pb.ProcessingResponse:
        return await self.processor.handle(headers_msg(post_headers(path, **extra)))

    @property
    def principal(self) -> Principal | None:
        assert self.processor.ctx is not None
        return self.processor.ctx.principal


async def answer(pipeline: Pipeline, catalog: Catalog, token: str | None, path: str = "/demo/mcp") -> Exchange:
    exchange = Exchange(pipeline, catalog)
    extra = {"authorization": f"Bearer {token}"} if token is not None else {}
    exchange.last = await exchange.headers(path, **extra)  # type: ignore[attr-defined]
    return exchange


def refusal(response: pb.ProcessingResponse) -> tuple[int, dict[str, str], dict[str, Any]]:
    assert response.HasField("immediate_response"), "expected the request to be refused"
    immediate = response.immediate_response
    headers = {h.header.key: h.header.raw_value.decode() for h in immediate.headers.set_headers}
    return immediate.status.code, headers, json.loads(immediate.body)


async def test_valid_token_sets_the_principal_and_drops_the_agents_token(
    pipeline: Pipeline, catalog_with_agent: Catalog, idp: Idp
) -> None:
    token = idp.mint("alice", scope="tools.read tools.write", mcp_trust="low")
    exchange = await answer(pipeline, catalog_with_agent, token)
    response: pb.ProcessingResponse = exchange.last  # type: ignore[attr-defined]
    assert response.HasField("request_headers")
    assert "authorization" in response.request_headers.response.header_mutation.remove_headers
    principal = exchange.principal
    assert principal is not None
    assert (principal.subject, principal.agent, principal.issuer) == ("alice", "agent", idp.issuer)
    assert principal.scopes == {"tools.read", "tools.write"}
    assert (principal.granted, principal.consented) == ("medium", "low")
    assert token not in repr(principal)


async def test_ec_keys_work_too(pipeline: Pipeline, catalog_with_agent: Catalog, idp: Idp) -> None:
    exchange = await answer(pipeline, catalog_with_agent, idp.mint("bob", key=idp.keys[1]))
    assert exchange.principal is not None and exchange.principal.subject == "bob"


async def test_no_token_is_401_with_a_resource_metadata_challenge(
    pipeline: Pipeline, catalog_with_agent: Catalog
) -> None:
    exchange = await answer(pipeline, catalog_with_agent, None)
    status, headers, body = refusal(exchange.last)  # type: ignore[attr-defined]
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer resource_metadata=")
    assert "/.well-known/oauth-protected-resource/demo/mcp" in headers["www-authenticate"]
    assert body["error"]["code"] == -32001
    assert "Authorization: Bearer" in body["error"]["message"]


def _hs256_with_public_key(idp: Idp) -> str:
    # The classic RS/HS confusion: sign HS256 with the RSA public key as the secret.
    # PyJWT refuses to do it on purpose, so build the JWS by hand.
    import base64
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": idp.keys[0].kid}).encode())
    claims = {"iss": idp.issuer, "sub": "mallory", "aud": AUDIENCE, "exp": 4102444800}
    payload = b64(json.dumps(claims).encode())
    signature = hmac.new(idp.keys[0].public_pem(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


@pytest.mark.parametrize(
    ("attack", "expected"),
    [
        ("alg_none", "algorithm 'none' is not accepted"),
        ("hs256_public_key", "algorithm 'HS256' is not accepted"),
        ("wrong_audience", "audience is not one of"),
        ("expired", "expired"),
        ("not_yet_valid", "not valid yet"),
        ("unknown_key", "does not contain"),
        ("foreign_key_same_kid", "invalid"),
        ("unknown_issuer", "issuer is not trusted"),
        ("garbage", "not a well-formed JWT"),
        ("no_sub", "lacks the 'sub' claim"),
    ],
)
async def test_attack_tokens_are_401(
    pipeline: Pipeline, catalog_with_agent: Catalog, idp: Idp, attack: str, expected: str
) -> None:
    tokens: dict[str, Callable[[], str]] = {
        "alg_none": lambda: none_token(iss=idp.issuer, sub="mallory", aud=AUDIENCE, exp=4102444800),
        "hs256_public_key": lambda: _hs256_with_public_key(idp),
        "wrong_audience": lambda: idp.mint(aud="someone-else"),
        "expired": lambda: idp.mint(lifetime_s=-120),
        "not_yet_valid": lambda: idp.mint(nbf_in_s=600),
        "unknown_key": lambda: idp.mint(key=rsa_key()),
        "foreign_key_same_kid": lambda: jwt.encode(
            {"iss": idp.issuer, "sub": "m", "aud": AUDIENCE, "exp": 4102444800},
            rsa_key().private,
            algorithm="RS256",
            headers={"kid": idp.keys[0].kid},
        ),
        "unknown_issuer": lambda: idp.mint(iss="https://evil.test"),
        "garbage": lambda: "not.a.jwt",
        "no_sub": lambda: jwt.encode(
            {"iss": idp.issuer, "aud": AUDIENCE, "exp": 4102444800},
            idp.keys[0].private,
            algorithm="RS256",
            headers={"kid": idp.keys[0].kid},
        ),
    }
    token = tokens[attack]()
    exchange = await answer(pipeline, catalog_with_agent, token)
    status, headers, body = refusal(exchange.last)  # type: ignore[attr-defined]
    assert status == 401
    assert 'error="invalid_token"' in headers["www-authenticate"]
    assert expected in body["error"]["message"]
    assert token not in json.dumps(body) and token not in headers["www-authenticate"]
    assert exchange.principal is None


async def test_an_agent_may_only_reach_the_servers_it_references(
    pipeline: Pipeline, catalog_with_agent: Catalog, idp: Idp
) -> None:
    exchange = await answer(pipeline, catalog_with_agent, idp.mint(), path="/other/mcp")
    status, _headers, body = refusal(exchange.last)  # type: ignore[attr-defined]
    assert status == 403
    assert "does not reference MCPServer 'other'" in body["error"]["message"]


async def test_a_rotated_key_is_fetched_once_and_unknown_kids_are_rate_limited(
    pipeline: Pipeline, catalog_with_agent: Catalog, idp: Idp
) -> None:
    await answer(pipeline, catalog_with_agent, idp.mint())
    assert idp.fetches == 1
    await answer(pipeline, catalog_with_agent, idp.mint())
    assert idp.fetches == 1, "keys are cached"
    rotated = idp.rotate()
    exchange = await answer(pipeline, catalog_with_agent, idp.mint("carol", key=rotated))
    assert exchange.principal is not None and exchange.principal.subject == "carol"
    assert idp.fetches == 2, "an unknown kid triggers one refetch"
    for _ in range(5):
        refused = await answer(pipeline, catalog_with_agent, idp.mint(key=rsa_key()))
        assert refusal(refused.last)[0] == 401  # type: ignore[attr-defined]
    assert idp.fetches == 2, "made-up kids do not cause a refetch within the minimum interval"


async def test_unreachable_jwks_is_503_and_not_forwarded(
    pipeline: Pipeline, catalog_with_agent: Catalog, idp: Idp
) -> None:
    idp.down()
    exchange = await answer(pipeline, catalog_with_agent, idp.mint())
    status, headers, body = refusal(exchange.last)  # type: ignore[attr-defined]
    assert status == 503
    assert headers["retry-after"]
    assert "keys cannot be fetched" in body["error"]["message"]


@pytest.mark.parametrize(("claim", "consented"), [("high", "high"), ("low", "low"), (None, "medium"), ("bogus", "low")])
async def test_consent_comes_from_the_claim_else_the_grant(
    pipeline: Pipeline, catalog_with_agent: Catalog, idp: Idp, claim: str | None, consented: str
) -> None:
    extra: dict[str, Any] = {"mcp_trust": claim} if claim is not None else {}
    exchange = await answer(pipeline, catalog_with_agent, idp.mint(**extra))
    assert exchange.principal is not None
    assert (exchange.principal.granted, exchange.principal.consented) == ("medium", consented)


async def test_protected_resource_metadata(catalog_with_agent: Catalog, idp: Idp) -> None:
    # The resource is the configured public URL's, never the request's Host (forged here).
    specs = [StageSpec(name="authn", config={"publicUrl": "https://gw.test"}), *DEFAULT_PIPELINE.stages[1:]]
    pipeline = Registry().build_pipeline(PipelineConfig(stages=specs))
    exchange = Exchange(pipeline, catalog_with_agent)
    response = await exchange.headers("/.well-known/oauth-protected-resource/demo/mcp", **{":authority": "evil.test"})
    assert response.immediate_response.status.code == 200
    document = json.loads(response.immediate_response.body)
    assert document["resource"] == "https://gw.test/demo/mcp"
    assert document["authorization_servers"] == [idp.issuer]
    assert document["bearer_methods_supported"] == ["header"]
    root = await Exchange(pipeline, catalog_with_agent).headers("/.well-known/oauth-protected-resource")
    assert json.loads(root.immediate_response.body)["authorization_servers"] == [idp.issuer]


async def test_without_agents_everyone_is_anonymous(pipeline: Pipeline, catalog: Catalog) -> None:
    exchange = await answer(pipeline, catalog, None)
    assert exchange.last.HasField("request_headers")  # type: ignore[attr-defined]
    assert exchange.principal is not None and exchange.principal.anonymous
    assert any("not authenticated" in p for p in pipeline.check(catalog))
