"""Where an ``MCPAgent`` without identity may run: ``check``/``up``/``render envoy`` say, ``serve`` is told.

``up`` (and ``check``, ``render envoy``, which show what ``up`` runs) serve the file's only
agent as the workload on a loopback listener; with several agents, on another address, or
for ``serve`` without ``workloadAgent`` in its pipeline file, a JWT is required.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.commands.cli import main
from extproc.commands.inspect import checked
from extproc.config.settings import Settings
from extproc.errors import ConfigError
from tests.messages import SERVER_DOC


def bare_agent(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPAgent",
        "metadata": {"name": name},
        "spec": {"mcpServerRefs": [{"name": "demo"}]},
    }


def write(tmp_path: Path, *docs: Mapping[str, object]) -> Path:
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all([dict(d) for d in docs]))
    return path


def test_check_accepts_one_agent_without_identity(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "-f", str(write(tmp_path, SERVER_DOC, bare_agent("assistant")))]) == 0
    assert "1 MCPServer: demo; 0 MCPToolPolicy; 1 MCPAgent" in capsys.readouterr().out


def test_check_says_several_agents_need_a_jwt(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, SERVER_DOC, bare_agent("assistant"), bare_agent("helper"))
    assert main(["check", "-f", str(path)]) == 2
    err = capsys.readouterr().err
    for name in ("assistant", "helper"):
        assert f"stage 'authn': MCPAgent '{name}' declares no spec.identity" in err
    assert "a JWT is required (spec.identity.jwt) on a gateway and with several MCPAgents" in err
    assert "Traceback" not in err


def test_up_serves_the_workload_only_on_loopback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(write(tmp_path, SERVER_DOC, bare_agent("assistant")))
    assert main(["render", "envoy", "-f", path, "--listen", "0.0.0.0:10000"]) == 2
    err = capsys.readouterr().err
    assert "--listen 0.0.0.0:10000: MCPAgent 'assistant' declares no spec.identity" in err
    assert "listen on a loopback address or give it spec.identity.jwt" in err
    for listen in ("127.0.0.1:10000", "[::1]:10000", "localhost:10000"):
        _, pipeline, _ = checked(Settings(resources=Path(path), listen=listen), None, lone_agent_is_workload=True)
        assert pipeline.stages[0].config.workload_agent == "assistant"


def test_serve_needs_to_be_told_which_agent_it_serves(tmp_path: Path) -> None:
    path = write(tmp_path, SERVER_DOC, bare_agent("assistant"))
    with pytest.raises(ConfigError, match=r"MCPAgent 'assistant' declares no spec\.identity.*a JWT is required"):
        checked(Settings(resources=path), None)
    pipeline_file = tmp_path / "pipeline.yaml"
    stages = [{"name": "authn", "config": {"workloadAgent": "assistant"}}]
    stages += [{"name": n} for n in ("mcp", "allowlist", "policy", "credentials", "session")]
    pipeline_file.write_text(yaml.safe_dump({"version": "v1", "stages": stages}))
    _, pipeline, _ = checked(Settings(resources=path, pipeline=pipeline_file), None)
    assert pipeline.stages[0].config.workload_agent == "assistant"
