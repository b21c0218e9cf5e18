"""``mcp-extproc check``: what it prints for good files, and how it refuses bad policy."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from extproc.commands.cli import main
from tests.messages import SERVER_DOC


def write(tmp_path: Path, *docs: Mapping[str, object]) -> Path:
    path = tmp_path / "resources.yaml"
    path.write_text(yaml.safe_dump_all([dict(d) for d in docs]))
    return path


def policy(rego_module: str) -> dict[str, object]:
    return {
        "apiVersion": "mcp.extproc.io/v1alpha1",
        "kind": "MCPToolPolicy",
        "metadata": {"name": "demo-policy"},
        "spec": {"targetRefs": [{"name": "demo"}], "rego": {"query": "data.mcp.allow", "module": rego_module}},
    }


def test_a_rego_syntax_error_is_refused_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = "package mcp\nimport rego.v1\n\ndefault allow := false\nallow if { input.tool == }\n"
    assert main(["check", "-f", str(write(tmp_path, SERVER_DOC, policy(bad)))]) == 2
    err = capsys.readouterr().err
    assert "MCPToolPolicy 'demo-policy': spec.rego: demo-policy.rego:5:" in err


def test_a_good_file_is_summarised_with_warnings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = "package mcp\nimport rego.v1\ndefault allow := true\n"
    assert main(["check", "-f", str(write(tmp_path, SERVER_DOC, policy(good)))]) == 0
    out = capsys.readouterr().out
    assert "1 MCPServer: demo; 1 MCPToolPolicy; 0 MCPAgent" in out
    assert "warning: " in out and "not authenticated" in out


def test_a_missing_reference_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    orphan = policy("package mcp\n")
    orphan["spec"] = {"targetRefs": [{"name": "nope"}]}
    assert main(["check", "-f", str(write(tmp_path, SERVER_DOC, orphan))]) == 2
    assert "MCPToolPolicy 'demo-policy': spec.targetRefs[0]: no MCPServer named 'nope'" in capsys.readouterr().err


def test_render_envoy_puts_the_admin_interface_on_a_private_socket_or_nowhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Envoy's admin API has no authentication: never on TCP, only on a 0600 unix socket when asked.
    resources = tmp_path / "resources.yaml"
    resources.write_text(yaml.safe_dump(SERVER_DOC))
    socket = str(tmp_path / "admin.sock")
    assert main(["render", "envoy", "-f", str(resources), "--admin-socket", socket]) == 0
    admin = yaml.safe_load(capsys.readouterr().out)["admin"]
    assert admin["address"] == {"pipe": {"path": socket, "mode": 0o600}}
    assert main(["render", "envoy", "-f", str(resources)]) == 0
    assert "admin" not in yaml.safe_load(capsys.readouterr().out)
