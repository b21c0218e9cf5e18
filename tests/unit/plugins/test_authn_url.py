"""The ``authn`` stage and URLs: tokens in the query string, and the public URL it hands out.

In process, through :class:`extproc.testing.StageHarness` (the audit line is written as
the front door writes it), against a real JWKS on loopback::

    ?access_token=… / ?id_token=…  ──▶ 400, JSON-RPC -32600, the upstream sees nothing,
                                       and no log record carries the token
    forged Host / :authority / X-Forwarded-Proto
        ──▶ WWW-Authenticate resource_metadata, the metadata's resource and the policy
            stage's insufficient_scope name the configured publicUrl (or the
            unconfigured placeholder), never the forged values
    publicUrl / --public-url ──▶ validated as an http(s) origin; run._public_url fills the
        stage's config (up: http://<listen>), serve refuses without one when agents exist
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.commands import cli, run
from extproc.config.pipeline_file import DEFAULT_PIPELINE, PipelineConfig, StageSpec
from extproc.config.resources import Catalog, parse_documents
from extproc.config.settings import Settings, public_origin
from extproc.core.registry import Registry
from extproc.errors import ConfigError
from extproc.testing import DEFAULT_RESOURCES, StageHarness
from plugins.authn import UNCONFIGURED_ORIGIN, AuthnConfig, AuthnStage, token_parameter
from tests.idp import Idp, agent_doc

SECRET = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXBheWxvYWQ.c2lnbmF0dXJlLXRoYXQtbXVzdC1ub3QtbGVhaw"
FORGED = {":authority": "evil.example", "host": "evil.example", "x-forwarded-proto": "gopher", ":scheme": "gopher"}
INIT = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}


def _resources(idp: Idp, *extra: dict[str, Any]) -> list[dict[str, Any]]:
    return [*DEFAULT_RESOURCES, agent_doc("agent", idp.jwks_uri, ["demo"]), *extra]


def _harness(idp: Idp, public_url: str | None = None, *, agents: bool = True) -> StageHarness:
    config = AuthnConfig.model_validate({"publicUrl": public_url} if public_url else {})
    resources = _resources(idp) if agents else DEFAULT_RESOURCES
    return StageHarness(AuthnStage(config), stages_after=["mcp"], resources=resources)


# --- tokens in the URL -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        f"access_token={SECRET}",
        f"ACCESS_TOKEN={SECRET}",
        f"a=1&Access_Token={SECRET}",
        f"id_token={SECRET}",
        f"access%5Ftoken={SECRET}",  # percent-encoded name
        f"x=1;access_token={SECRET}",
        "access_token=",
    ],
)
@pytest.mark.parametrize("agents", [True, False], ids=["agents", "anonymous"])
async def test_a_token_in_the_query_string_is_refused_and_never_logged(
    idp: Idp, query: str, agents: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with _harness(idp, "https://gw.example", agents=agents) as harness:
        result = await harness.post(INIT, path=f"/demo/mcp?{query}")
    assert result.deny is not None and result.deny.reason == "token_in_url"
    assert result.body_forwarded is None  # the upstream sees nothing
    reply = result.reply
    assert reply is not None and reply.status == 400
    error = reply.json()["error"]
    assert error["code"] == -32600
    assert "Authorization header" in error["message"]
    assert SECRET not in reply.body.decode()
    assert any(r.name == "mcp_extproc.audit" for r in caplog.records)  # the decision was logged ...
    for record in caplog.records:
        assert SECRET not in record.getMessage()  # ... without the token
        assert SECRET not in json.dumps(record.__dict__, default=str)


@pytest.mark.parametrize("query", ["", "?token=abc", "?state=access_token", "?x=id_token%3D1", "?access_tokens=1"])
def test_only_the_token_parameters_are_refused(query: str) -> None:
    assert token_parameter(f"/demo/mcp{query}") is None
    assert token_parameter(f"/demo/mcp?access_token=1{query.replace('?', '&')}") == "access_token"


# --- the public URL: never from the request's headers -------------------------------------------


@pytest.mark.parametrize("public_url", ["https://gw.example", None], ids=["configured", "unconfigured"])
async def test_forged_host_headers_never_reach_the_challenge_or_the_metadata(idp: Idp, public_url: str | None) -> None:
    origin = public_url or UNCONFIGURED_ORIGIN
    async with _harness(idp, public_url) as harness:
        refused = await harness.post(INIT, headers=FORGED)
        served = await harness.get(path="/.well-known/oauth-protected-resource/demo/mcp", headers=FORGED)
        root = await harness.get(path="/.well-known/oauth-protected-resource", headers=FORGED)
    assert refused.reply is not None and refused.reply.status == 401
    challenge = refused.reply.headers["www-authenticate"]
    assert challenge.startswith(f'Bearer resource_metadata="{origin}/.well-known/oauth-protected-resource/demo/mcp"')
    assert served.reply is not None and served.reply.status == 200
    document = served.reply.json()
    assert document["resource"] == f"{origin}/demo/mcp"
    assert root.reply is not None and root.reply.json()["resource"] == f"{origin}/"
    for text in (challenge, served.reply.body.decode(), root.reply.body.decode()):
        assert "evil" not in text and "gopher" not in text


async def test_insufficient_scope_from_the_policy_stage_names_the_public_url(idp: Idp) -> None:
    policy = {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPToolPolicy",
        "metadata": {"name": "p"},
        "spec": {"targetRefs": [{"kind": "MCPServer", "name": "demo"}], "rules": [{"tools": ["add"], "scopes": ["w"]}]},
    }
    stage = AuthnStage(AuthnConfig.model_validate({"publicUrl": "https://gw.example"}))
    call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "add", "arguments": {}}}
    headers = {**FORGED, "authorization": f"Bearer {idp.mint('alice')}"}
    resources = _resources(idp, policy)
    async with StageHarness(stage, stages_after=["mcp", "policy"], resources=resources) as harness:
        result = await harness.post(call, headers=headers)
    assert result.reply is not None and result.reply.status == 403
    challenge = result.reply.headers["www-authenticate"]
    assert 'resource_metadata="https://gw.example/.well-known/oauth-protected-resource/demo/mcp"' in challenge
    assert 'error="insufficient_scope"' in challenge and "evil" not in challenge


# --- publicUrl and --public-url: validated origins ----------------------------------------------


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("https://mcp.example.com", "https://mcp.example.com"),
        ("HTTPS://MCP.Example.com/", "https://mcp.example.com"),
        ("http://127.0.0.1:10000", "http://127.0.0.1:10000"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_a_public_url_is_an_origin(given: str, normalized: str) -> None:
    assert public_origin(given, "--public-url") == normalized
    assert AuthnConfig.model_validate({"publicUrl": given}).public_url == normalized


@pytest.mark.parametrize(
    "bad",
    [
        "mcp.example.com",
        "ftp://mcp.example.com",
        "https://mcp.example.com/mcp",
        "https://mcp.example.com?x=1",
        "https://mcp.example.com#top",
        "https://user@mcp.example.com",
        'https://mcp.example.com",x="y',
        "https://mcp.example.com:99999",
        "https://",
        "https://mcp.example.com\r\nx: y",
    ],
)
def test_anything_else_is_refused_naming_the_flag(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^--public-url: expected an http or https origin"):
        public_origin(bad, "--public-url")
    with pytest.raises(ConfigError, match=r"stage 'authn': config\.publicUrl: .*expected an http or https origin"):
        Registry().build(StageSpec(name="authn", config={"publicUrl": bad}))


# --- up and serve fill the stage's publicUrl -----------------------------------------------------


def _built(idp: Idp, config: PipelineConfig = DEFAULT_PIPELINE) -> tuple[Catalog, AuthnStage, Any]:
    catalog = parse_documents(_resources(idp), "test")
    pipeline = Registry().build_pipeline(config)
    stage = pipeline.stages[pipeline.names.index("authn")]
    assert isinstance(stage, AuthnStage)
    return catalog, stage, pipeline


def _settings(tmp_path: Path, public_url: str | None = None) -> Settings:
    return Settings(resources=tmp_path / "resources.yaml", public_url=public_url)


def test_serve_with_an_agent_and_no_public_url_refuses_to_start(idp: Idp, tmp_path: Path) -> None:
    catalog, _stage, pipeline = _built(idp)
    with pytest.raises(ConfigError, match=r"^--public-url is required when an MCPAgent is declared"):
        run._public_url(_settings(tmp_path), catalog, pipeline, None)
    without_agents = parse_documents(DEFAULT_RESOURCES, "test")
    run._public_url(_settings(tmp_path), without_agents, pipeline, None)  # nobody is authenticated: fine


def test_the_flag_up_default_and_pipeline_file_fill_publicurl(idp: Idp, tmp_path: Path) -> None:
    catalog, stage, pipeline = _built(idp)
    run._public_url(_settings(tmp_path, "HTTPS://GW.example/"), catalog, pipeline, None)
    assert stage.config.public_url == "https://gw.example"
    catalog, stage, pipeline = _built(idp)
    run._public_url(_settings(tmp_path), catalog, pipeline, "http://127.0.0.1:10000")  # up: http://<listen>
    assert stage.config.public_url == "http://127.0.0.1:10000"
    configured = PipelineConfig(stages=[StageSpec(name="authn", config={"publicUrl": "https://file.example"})])
    catalog, stage, pipeline = _built(idp, configured)
    run._public_url(_settings(tmp_path), catalog, pipeline, "http://127.0.0.1:10000")
    assert stage.config.public_url == "https://file.example"  # the pipeline file's wins over up's default
    with pytest.raises(ConfigError, match="contradicts the pipeline's authn publicUrl"):
        run._public_url(_settings(tmp_path, "https://other.example"), catalog, pipeline, None)


def test_serve_names_the_flag_on_a_bad_or_missing_public_url(
    idp: Idp, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump_all(_resources(idp)))
    argv = ["serve", "-f", str(resources), "--grpc", "", "--metrics", ""]
    assert cli.main([*argv, "--public-url", "https://gw.example/mcp"]) == 2
    assert "mcp-extproc: error: --public-url: expected an http or https origin" in capsys.readouterr().err
    assert cli.main(argv) == 2
    assert "mcp-extproc: error: --public-url is required when an MCPAgent is declared" in capsys.readouterr().err
