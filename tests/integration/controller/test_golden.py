"""``mcp-extproc render k8s`` as a command: its output matches the golden files and validates; its problems."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.golden import GOLDEN, check
from tests.kubeschemas import ROOT, validate_any

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("source", "golden"),
    [(ROOT / "deploy" / "examples" / "mcp.yaml", "examples.yaml"), (GOLDEN / "istio-input.yaml", "istio.yaml")],
    ids=["examples", "istio"],
)
def test_render_k8s_command(source: Path, golden: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "render", "k8s", "-f", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    for obj in yaml.safe_load_all(result.stdout):
        validate_any(obj)
    check(golden, result.stdout)


def test_render_k8s_reports_problems_and_errors(tmp_path: Path) -> None:
    source = tmp_path / "r.yaml"
    source.write_text(
        (GOLDEN / "istio-input.yaml")
        .read_text()
        .replace("mcpServerRefs: [{name: tools}]", "mcpServerRefs: [{name: gone}]")
    )
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "render", "k8s", "-f", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "warning: MCPAgent mesh/planner: spec.mcpServerRefs[0]: no MCPServer named 'gone'" in result.stderr
    source.write_text((GOLDEN / "istio-input.yaml").read_text().replace("http://tools", "tcp://tools"))
    result = subprocess.run(
        [sys.executable, "-m", "extproc", "render", "k8s", "-f", str(source)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "MCPServer mesh/tools: spec.url" in result.stderr and "Traceback" not in result.stderr
