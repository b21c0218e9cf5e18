"""A pipeline that cannot enforce the resources is refused: by ``posture_problems`` and every command.

MCPAgent → authn, MCPServer → allowlist (and mcp closed), MCPToolPolicy → policy,
spec.upstreamAuth → credentials; each with failureMode: closed.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.commands import envoy
from extproc.commands.cli import main
from extproc.config.pipeline_file import DEFAULT_PIPELINE, FailureMode
from extproc.config.resources import Catalog, parse_documents
from extproc.core.posture import StagePosture, posture_problems, weakening
from extproc.frontdoor.servers import ExtProcServer
from tests.messages import SERVER_DOC

CLOSED, OPEN = FailureMode.CLOSED, FailureMode.OPEN
DEFAULT: list[StagePosture] = [(s.name, s.failure_mode) for s in DEFAULT_PIPELINE.stages]
AGENT: dict[str, Any] = {
    "apiVersion": "mcp.extproc.io/v1alpha1",
    "kind": "MCPAgent",
    "metadata": {"name": "agent"},
    "spec": {
        "mcpServerRefs": [{"name": "demo"}],
        "identity": {"jwt": {"issuer": "https://issuer.test", "audiences": ["a"], "jwksUri": "http://127.0.0.1:9/j"}},
    },
}
POLICY: dict[str, Any] = {
    "apiVersion": "mcp.extproc.io/v1alpha1",
    "kind": "MCPToolPolicy",
    "metadata": {"name": "demo-policy"},
    "spec": {"targetRefs": [{"kind": "MCPServer", "name": "demo"}], "rules": [{"tools": ["add*"], "action": "Deny"}]},
}
UPSTREAM: dict[str, Any] = {
    **SERVER_DOC,
    "metadata": {"name": "vault"},
    "spec": {"url": "http://127.0.0.1:9/mcp", "upstreamAuth": {"bearer": {"env": "VAULT_TOKEN"}}},
}


def catalog(*docs: Mapping[str, Any]) -> Catalog:
    return parse_documents([SERVER_DOC, *docs], "resources.yaml")


def without(*names: str, stages: Sequence[StagePosture] = DEFAULT) -> list[StagePosture]:
    return [s for s in stages if s[0] not in names]


def opened(name: str) -> list[StagePosture]:
    return [(n, OPEN if n == name else m) for n, m in DEFAULT]


def test_the_default_pipeline_enforces_everything() -> None:
    assert posture_problems(catalog(AGENT, POLICY, UPSTREAM), DEFAULT) == []


def test_no_authn_while_an_agent_exists() -> None:
    assert posture_problems(catalog(AGENT), without("authn")) == [
        "the pipeline has no 'authn' stage, but MCPAgent 'agent' (resources.yaml) declares an identity: "
        "requests would be served unauthenticated; add authn before mcp"
    ]
    assert posture_problems(catalog(), without("authn")) == []  # no agent: anonymous is the documented mode


def test_no_allowlist_while_a_server_exists() -> None:
    assert posture_problems(catalog(), without("allowlist")) == [
        "the pipeline has no 'allowlist' stage, but MCPServer 'demo' (resources.yaml) declares "
        "allowedTools/deniedTools: every tool would be callable; add allowlist after mcp"
    ]
    assert posture_problems(catalog(UPSTREAM), without("allowlist", "credentials"))[0].startswith(
        "the pipeline has no 'allowlist' stage, but MCPServers 'demo', 'vault' (resources.yaml) declare "
    )


def test_no_policy_while_a_policy_exists() -> None:
    assert posture_problems(catalog(POLICY), without("policy")) == [
        "the pipeline has no 'policy' stage, but MCPToolPolicy 'demo-policy' (resources.yaml) declares tool "
        "rules: the rules would not be enforced; add policy after allowlist"
    ]
    assert posture_problems(catalog(), without("policy")) == []


def test_no_credentials_while_a_server_has_upstream_auth() -> None:
    assert posture_problems(catalog(UPSTREAM), without("credentials")) == [
        "the pipeline has no 'credentials' stage, but MCPServer 'vault' (resources.yaml) declares "
        "spec.upstreamAuth: requests would reach the server without that credential, and with the agent's own "
        "Authorization; add credentials after policy"
    ]
    assert posture_problems(catalog(), without("credentials")) == []


@pytest.mark.parametrize(
    ("stage", "docs", "resource"),
    [
        ("authn", [AGENT], "MCPAgent 'agent' (resources.yaml) declares an identity"),
        ("allowlist", [], "MCPServer 'demo' (resources.yaml) declares allowedTools/deniedTools"),
        ("policy", [POLICY], "MCPToolPolicy 'demo-policy' (resources.yaml) declares tool rules"),
        ("credentials", [UPSTREAM], "MCPServer 'vault' (resources.yaml) declares spec.upstreamAuth"),
    ],
)
def test_failure_mode_open_on_an_enforcing_stage(stage: str, docs: list[dict[str, Any]], resource: str) -> None:
    [problem] = posture_problems(catalog(*docs), opened(stage))
    assert problem.startswith(f"stage {stage!r} has failureMode: open, but {resource}: on a fault in {stage} ")
    assert problem.endswith(f"; set failureMode: closed (the default) on {stage}")


def test_failure_mode_open_on_mcp_would_let_calls_past_the_allowlist() -> None:
    [problem] = posture_problems(catalog(), opened("mcp"))
    assert problem.startswith("stage 'mcp' has failureMode: open, but allowlist enforces what MCPServer 'demo'")
    assert posture_problems(catalog(), opened("session")) == []  # session enforces nothing


def test_a_stage_of_another_name_does_not_stand_in() -> None:
    stages = [("my-authn", CLOSED), *without("authn")]
    assert [p.split(",")[0] for p in posture_problems(catalog(AGENT), stages)] == ["the pipeline has no 'authn' stage"]


def test_many_resources_are_named_up_to_three() -> None:
    agents = [{**AGENT, "metadata": {"name": f"agent-{i}"}} for i in range(5)]
    [problem] = posture_problems(catalog(*agents), without("authn"), pipeline="the running pipeline")
    assert problem.startswith(
        "the running pipeline has no 'authn' stage, but MCPAgents 'agent-0', 'agent-1', 'agent-2' and 2 more "
        "(resources.yaml) declare identities:"
    )


def test_weakening_counts_agents_and_policies_gone_not_changed() -> None:
    both = catalog(AGENT, POLICY)
    assert weakening(both, catalog(AGENT, POLICY)) == []
    assert weakening(catalog(), both) == []  # adding is never weaker
    [auth, policy] = weakening(both, catalog())
    assert auth.startswith(
        "the new resources (resources.yaml) declare no MCPAgent, but MCPAgent 'agent' is in force: authentication "
        "would be switched off"
    )
    assert policy.startswith("the new resources (resources.yaml) declare no MCPToolPolicy, but MCPToolPolicy")
    assert auth.endswith("restart with the new file to do this on purpose")


# -- every command that builds a pipeline refuses, exit 2 -------------------------------------


def files(tmp_path: Path, stages: Sequence[str], *docs: Mapping[str, Any]) -> tuple[Path, Path]:
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump_all([SERVER_DOC, *docs]))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"version": "v1", "stages": [{"name": n} for n in stages]}))
    return resources, pipeline


NO_AUTHN = ["mcp", "allowlist", "policy", "credentials", "session"]


async def not_started(*_args: object) -> Any:
    raise AssertionError("the pipeline was accepted: the command went on to start Envoy or the server")


@pytest.mark.parametrize(
    "command",
    [
        ["check"],
        ["render", "envoy"],
        ["serve", "--grpc", "127.0.0.1:0", "--metrics", ""],
        ["up", "--listen", "127.0.0.1:0", "--metrics", ""],
    ],
)
def test_commands_refuse_a_pipeline_without_authn_while_an_agent_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # up's work directory
    # Were the pipeline accepted, fail here rather than start Envoy or a server.
    monkeypatch.setattr(envoy, "start", not_started)
    monkeypatch.setattr(ExtProcServer, "start", not_started)
    resources, pipeline = files(tmp_path, NO_AUTHN, AGENT)
    assert main([*command, "-f", str(resources), "--pipeline", str(pipeline)]) == 2
    err = capsys.readouterr().err
    assert (
        f"{pipeline}: the pipeline has no 'authn' stage, but MCPAgent 'agent' ({resources}) declares an identity: "
        "requests would be served unauthenticated; add authn before mcp"
    ) in err


def test_check_names_every_problem_with_the_pipeline_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    resources, pipeline = files(tmp_path, ["mcp"], AGENT, POLICY)
    assert main(["check", "-f", str(resources), "--pipeline", str(pipeline)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "has no" in line]
    assert [line.split(" stage, ")[0] for line in lines] == [
        f"mcp-extproc: error: {pipeline}: the pipeline has no 'authn'",
        f"{pipeline}: the pipeline has no 'allowlist'",
        f"{pipeline}: the pipeline has no 'policy'",
    ]


def test_check_accepts_a_pipeline_that_enforces_what_is_declared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resources, pipeline = files(tmp_path, ["mcp", "allowlist"])
    assert main(["check", "-f", str(resources), "--pipeline", str(pipeline)]) == 0
    assert "OK (1 MCPServer: demo" in capsys.readouterr().out
